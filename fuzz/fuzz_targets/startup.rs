//! The start-up packets a client sends before its first typed message
//! (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest), read as the
//! session reads them: length-framed, one after another.
//!
//! Beyond "no panic": a whole packet decodes and re-encodes to its own
//! bytes, and those decode to the same packet; every cut of a packet with a
//! valid length asks for more bytes (`Ok(None)`), never reports an error;
//! an invalid packet's error has a message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_agent::protocol::postgres::codec::{
    frame_startup, split_startup, MAX_CANCEL_KEY, MAX_STARTUP_PACKET, MIN_CANCEL_KEY,
};
use tollgate_agent::protocol::postgres::frontend::{decode_startup, FrontendMessage};

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    loop {
        let len = match frame_startup(buf) {
            Ok(None) => {
                assert!(buf.len() < 4);
                return;
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                assert!(split_startup(buf).is_err());
                return;
            }
            Ok(Some(len)) => len,
        };
        assert!((8..=MAX_STARTUP_PACKET).contains(&len));
        // A packet cut anywhere before its end is incomplete, not invalid.
        for cut in 0..len.min(buf.len() + 1) {
            let prefix = &buf[..cut];
            assert_eq!(split_startup(prefix), Ok(None), "cut at {cut}");
            if cut >= 4 {
                assert_eq!(frame_startup(prefix), Ok(Some(len)), "cut at {cut}");
            }
        }
        let Ok(Some(body)) = split_startup(buf) else {
            assert!(buf.len() < len);
            return;
        };
        assert_eq!(body.len() + 4, len);
        match decode_startup(body) {
            Ok(msg) => check_packet(&msg, &buf[..len]),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        buf = &buf[len..];
    }
});

fn check_packet(msg: &FrontendMessage<'_>, packet: &[u8]) {
    assert_eq!(msg.tag(), None);
    match msg {
        FrontendMessage::Startup { major, params, .. } => {
            assert_eq!(*major, 3);
            assert!(params.iter().all(|(name, _)| !name.is_empty()));
        }
        FrontendMessage::CancelRequest { secret, .. } => {
            assert!((MIN_CANCEL_KEY..=MAX_CANCEL_KEY).contains(&secret.len()));
        }
        FrontendMessage::SslRequest | FrontendMessage::GssEncRequest => {
            assert_eq!(packet.len(), 8);
        }
        other => panic!("a start-up packet decoded as {}", other.name()),
    }
    let mut out = Vec::new();
    msg.encode(&mut out);
    assert_eq!(out, packet, "{msg:?}");
    let again = split_startup(&out).ok().flatten().map(decode_startup);
    assert_eq!(again, Some(Ok(msg.clone())));
}
