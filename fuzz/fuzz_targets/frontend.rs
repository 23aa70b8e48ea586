//! Client messages as a proxy reads them: a byte stream framed one typed
//! message at a time and decoded.
//!
//! Beyond "no panic": a whole message decodes and re-encodes to its own
//! bytes; every cut of a message whose header is valid asks for more bytes
//! (`Ok(None)`), never reports an error; `decode_head`, which the session
//! reads messages with, reads what `decode_frontend` reads, and fails where
//! it would too; an invalid message's error has a message.
//!
//! The first input byte picks the size limit in force (before
//! authentication, after it per message type, or a small one); the rest is
//! the stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_agent::protocol::postgres::codec::{
    frame, split_frame, FrameHeader, MAX_MESSAGE, MAX_PRE_AUTH_MESSAGE,
};
use tollgate_agent::protocol::postgres::frontend::{
    self, bind_names, decode_frontend, decode_head, password_text, Head, SaslInitialResponse,
};

fuzz_target!(|data: &[u8]| {
    let Some((&limit, mut buf)) = data.split_first() else {
        return;
    };
    loop {
        // The limit the session would apply to this message.
        let max = match (limit % 3, buf.first()) {
            (0, _) => MAX_PRE_AUTH_MESSAGE,
            (1, Some(&tag)) => frontend::max_len(tag),
            _ => 64,
        };
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
        let Ok(Some(f)) = split_frame(buf, max) else {
            // The rest of the message has not arrived.
            assert!(buf.len() < header.len);
            return;
        };
        assert_eq!(f.wire_len(), header.len);
        check_message(f.tag, f.body);
        buf = &buf[header.len..];
    }
});

fn check_message(tag: u8, body: &[u8]) {
    // The `p` bodies are read by the session once it knows the method.
    if let Ok(sasl) = SaslInitialResponse::decode(body) {
        let mut out = Vec::new();
        sasl.encode(&mut out);
        assert_eq!(&out[FrameHeader::SIZE..], body);
    }
    let _ = password_text(body);
    let head = decode_head(tag, body);
    if head.is_err() {
        // The session refuses what the codec cannot read.
        assert!(decode_frontend(tag, body).is_err());
    }
    match decode_frontend(tag, body) {
        Ok(msg) => {
            assert_eq!(msg.tag(), Some(tag));
            let mut out = Vec::new();
            msg.encode(&mut out);
            assert_eq!(out.first(), Some(&tag));
            assert_eq!(&out[FrameHeader::SIZE..], body, "{msg:?}");
            let again = split_frame(&out, MAX_MESSAGE)
                .ok()
                .flatten()
                .map(|f| decode_frontend(f.tag, f.body));
            assert_eq!(again, Some(Ok(msg.clone())));
            assert_eq!(head, Ok(msg.head()));
            if let Head::Bind { portal, statement } = msg.head() {
                // The session reads a Bind's names from its first bytes.
                for cut in 0..=body.len() {
                    let names = bind_names(&body[..cut]);
                    assert!(names.is_none() || names == Some((portal, statement)));
                }
                assert_eq!(bind_names(body), Some((portal, statement)));
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
