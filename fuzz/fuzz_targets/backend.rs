//! Server messages as a proxy reads them: a byte stream framed one typed
//! message at a time and decoded.
//!
//! Beyond "no panic": a whole message decodes and re-encodes to its own
//! bytes, and the re-encoded bytes decode to the same message; every cut of
//! a message whose header is valid asks for more bytes (`Ok(None)`), never
//! reports an error; an invalid message's error has a message.
//!
//! The first input byte picks the size limit in force (before
//! authentication, after it, or a small one); the rest is the stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_agent::protocol::postgres::backend::{decode_backend, BackendMessage};
use tollgate_agent::protocol::postgres::codec::{
    frame, split_frame, FrameHeader, MAX_MESSAGE, MAX_PRE_AUTH_MESSAGE,
};

fuzz_target!(|data: &[u8]| {
    let Some((&limit, mut buf)) = data.split_first() else {
        return;
    };
    let max = match limit % 3 {
        0 => MAX_PRE_AUTH_MESSAGE,
        1 => MAX_MESSAGE,
        _ => 64,
    };
    loop {
        let header = match frame(buf, max) {
            Ok(None) => {
                assert!(buf.len() < FrameHeader::SIZE);
                return;
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                assert!(split_frame(buf, max).is_err());
                return;
            }
            Ok(Some(header)) => header,
        };
        assert!(header.len >= FrameHeader::SIZE && header.len <= max + 1);
        // A message cut anywhere before its end is incomplete, not invalid.
        for cut in 0..header.len.min(buf.len() + 1) {
            let prefix = &buf[..cut];
            assert_eq!(split_frame(prefix, max), Ok(None), "cut at {cut}");
            if cut >= FrameHeader::SIZE {
                assert_eq!(frame(prefix, max), Ok(Some(header)), "cut at {cut}");
            }
        }
        // Streamed messages are forwarded in chunks that never run past
        // the message.
        let sent = buf.len().min(header.len) / 2;
        let rest = buf.get(sent..).unwrap_or_default();
        assert!(header.chunk(rest, sent).len() <= header.len - sent);
        let Ok(Some(f)) = split_frame(buf, max) else {
            assert!(buf.len() < header.len);
            return;
        };
        assert_eq!(f.wire_len(), header.len);
        check_message(f.tag, f.body);
        buf = &buf[header.len..];
    }
});

fn check_message(tag: u8, body: &[u8]) {
    match decode_backend(tag, body) {
        Ok(msg) => {
            assert_eq!(msg.tag(), tag);
            let mut out = Vec::new();
            msg.encode(&mut out);
            assert_eq!(out.first(), Some(&tag));
            assert_eq!(&out[FrameHeader::SIZE..], body, "{msg:?}");
            let again = split_frame(&out, MAX_MESSAGE)
                .ok()
                .flatten()
                .map(|f| decode_backend(f.tag, f.body));
            assert_eq!(again, Some(Ok(msg.clone())));
            if let BackendMessage::ErrorResponse(fields) | BackendMessage::NoticeResponse(fields) =
                &msg
            {
                let _ = (fields.severity(), fields.sqlstate(), fields.message());
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
