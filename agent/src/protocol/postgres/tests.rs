//! Pseudo-random input for every decoder: no panic, and whatever decodes
//! re-encodes to the same bytes.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use super::backend::{decode_backend, Auth, BackendMessage};
use super::codec::{
    frame, frame_startup, split_frame, split_startup, MAX_MESSAGE, MAX_PRE_AUTH_MESSAGE,
};
use super::frontend::{
    decode_frontend, decode_startup, password_text, FrontendMessage, SaslInitialResponse,
};

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Bytes skewed towards what parsers branch on: NULs, small numbers,
    /// 0xff (for -1 lengths) and printable text.
    fn byte(&mut self) -> u8 {
        match self.below(8) {
            0 | 1 => 0,
            2 => 0xff,
            3 => self.below(4) as u8,
            4 | 5 => b'a' + self.below(26) as u8,
            _ => self.next() as u8,
        }
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.byte()).collect()
    }
}

const FRONTEND_TAGS: &[u8] = b"QPBDESHCFdcfXp";
const BACKEND_TAGS: &[u8] = b"RSKZTDCIEN123nstGHWdcAvV";

/// Valid messages to mutate, so the fuzzer gets past the first field.
fn frontend_corpus() -> Vec<(u8, Vec<u8>)> {
    vec![
        (b'Q', b"SELECT 1;\0".to_vec()),
        (b'P', b"S_1\0SELECT $1\0\0\x01\0\0\0\x17".to_vec()),
        (
            b'B',
            b"\0S_1\0\0\x01\0\x01\0\x02\0\0\0\x04\0\0\0\x2a\xff\xff\xff\xff\0\x01\0\0".to_vec(),
        ),
        (b'D', b"SS_1\0".to_vec()),
        (b'E', b"\0\0\0\0\0".to_vec()),
        (b'C', b"PC_1\0".to_vec()),
        (
            b'F',
            b"\0\0\x03\xc8\0\x01\0\x01\0\x01\0\0\0\x04\0\0\0\x01\0\x01".to_vec(),
        ),
        (b'f', b"aborted\0".to_vec()),
        (b'p', b"SCRAM-SHA-256\0\0\0\0\x05n,,n=".to_vec()),
        (b'S', Vec::new()),
    ]
}

fn startup_corpus() -> Vec<Vec<u8>> {
    vec![
        b"\0\x03\0\0user\0alice\0database\0shop\0\0".to_vec(),
        b"\0\x03\0\x02user\0bob\0_pq_.x\0y\0\0".to_vec(),
        b"\x04\xd2\x16\x2f".to_vec(),
        b"\x04\xd2\x16\x30".to_vec(),
        b"\x04\xd2\x16\x2e\0\0\x30\x39\xde\xad\xbe\xef".to_vec(),
    ]
}

fn backend_corpus() -> Vec<(u8, Vec<u8>)> {
    vec![
        (
            b'R',
            b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0".to_vec(),
        ),
        (b'R', b"\0\0\0\x05\x01\x02\x03\x04".to_vec()),
        (b'R', b"\0\0\0\x0br=abc,s=def,i=4096".to_vec()),
        (b'S', b"client_encoding\0UTF8\0".to_vec()),
        (b'K', b"\0\0\x30\x39\x01\x02\x03\x04".to_vec()),
        (b'Z', b"I".to_vec()),
        (
            b'T',
            b"\0\x02id\0\0\0\x40\x01\0\x01\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0\
              name\0\0\0\x40\x01\0\x02\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0"
                .to_vec(),
        ),
        (b'D', b"\0\x02\0\0\0\x0242\xff\xff\xff\xff".to_vec()),
        (b'C', b"INSERT 0 1\0".to_vec()),
        (b'E', b"SERROR\0VERROR\0C42501\0Mdenied\0\0".to_vec()),
        (b't', b"\0\x02\0\0\0\x17\0\0\0\x19".to_vec()),
        (b'G', b"\0\0\x01\0\0".to_vec()),
        (b'A', b"\0\0\0\x01ch\0pl\0".to_vec()),
        (b'v', b"\0\0\0\0\0\0\0\x01_pq_.x\0".to_vec()),
        (b'V', b"\0\0\0\x01x".to_vec()),
    ]
}

/// Flips, inserts, deletes or cuts a few bytes.
fn mutate(rng: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(3) {
        match rng.below(4) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.byte();
            }
            1 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.byte());
            }
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.remove(i);
            }
            _ => {
                let n = rng.below(v.len() + 1);
                v.truncate(n);
            }
        }
    }
    v
}

fn check_frontend(tag: u8, body: &[u8]) -> bool {
    let head = super::frontend::decode_head(tag, body);
    if head.is_err() {
        // What the session refuses as unreadable, the codec cannot read.
        assert!(decode_frontend(tag, body).is_err());
    }
    let _ = password_text(body);
    if let Ok(sasl) = SaslInitialResponse::decode(body) {
        let mut out = Vec::new();
        sasl.encode(&mut out);
        assert_eq!(&out[5..], body);
    }
    match decode_frontend(tag, body) {
        Ok(msg) => {
            // The session reads the same fields through the same functions.
            assert_eq!(head, Ok(msg.head()), "{msg:?}");
            let mut out = Vec::new();
            msg.encode(&mut out);
            assert_eq!(out[0], tag);
            assert_eq!(&out[5..], body, "{msg:?}");
            let f = split_frame(&out, MAX_MESSAGE).unwrap().unwrap();
            assert_eq!(f.wire_len(), out.len());
            // Count only messages with structure to get right.
            !matches!(
                msg,
                FrontendMessage::CopyData(_)
                    | FrontendMessage::Password(_)
                    | FrontendMessage::Unknown { .. }
            )
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

fn check_backend(tag: u8, body: &[u8]) -> bool {
    match decode_backend(tag, body) {
        Ok(msg) => {
            let mut out = Vec::new();
            msg.encode(&mut out);
            assert_eq!(out[0], tag);
            assert_eq!(&out[5..], body, "{msg:?}");
            !matches!(
                msg,
                BackendMessage::CopyData(_) | BackendMessage::Unknown { .. }
            )
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

fn check_startup(body: &[u8]) -> bool {
    match decode_startup(body) {
        Ok(msg) => {
            let mut out = Vec::new();
            msg.encode(&mut out);
            assert_eq!(&out[4..], body, "{msg:?}");
            assert_eq!(msg.tag(), None);
            true
        }
        Err(_) => false,
    }
}

fn check_framing(buf: &[u8]) {
    for max in [MAX_PRE_AUTH_MESSAGE, MAX_MESSAGE, 64] {
        if let Ok(Some(h)) = frame(buf, max) {
            assert!(h.len >= 5 && h.len <= max + 1);
            let _ = h.body(buf);
            let _ = h.chunk(buf, buf.len() / 2);
            match split_frame(buf, max) {
                Ok(Some(f)) => assert_eq!(f.wire_len(), h.len),
                other => assert_eq!(other, Ok(None)),
            }
        }
    }
    if let Ok(Some(len)) = frame_startup(buf) {
        assert!((8..=10_000).contains(&len));
        let _ = split_startup(buf);
    }
}

#[test]
fn random_input_never_panics_and_round_trips() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let frontend = frontend_corpus();
    let backend = backend_corpus();
    let startup = startup_corpus();
    let (mut ok_front, mut ok_back, mut ok_start) = (0, 0, 0);
    for i in 0..10_000 {
        // Purely random bodies, for known tags and any tag.
        let body = rng.bytes(48);
        let tag = if i % 4 == 0 {
            rng.next() as u8
        } else {
            FRONTEND_TAGS[rng.below(FRONTEND_TAGS.len())]
        };
        ok_front += usize::from(check_frontend(tag, &body));
        let tag = if i % 4 == 0 {
            rng.next() as u8
        } else {
            BACKEND_TAGS[rng.below(BACKEND_TAGS.len())]
        };
        ok_back += usize::from(check_backend(tag, &body));
        let mut sbody = body.clone();
        if i % 2 == 0 {
            // Aim at the request codes the decoder branches on.
            let code: &[u8] = match rng.below(4) {
                0 => b"\0\x03\0\0",
                1 => b"\x04\xd2\x16\x2e",
                2 => b"\x04\xd2\x16\x2f",
                _ => b"\0\x03\0\x02",
            };
            sbody.splice(0..sbody.len().min(4), code.iter().copied());
        }
        ok_start += usize::from(check_startup(&sbody));
        check_framing(&body);

        // Mutations of valid messages.
        let (tag, valid) = &frontend[rng.below(frontend.len())];
        ok_front += usize::from(check_frontend(*tag, &mutate(&mut rng, valid.clone())));
        let (tag, valid) = &backend[rng.below(backend.len())];
        ok_back += usize::from(check_backend(*tag, &mutate(&mut rng, valid.clone())));
        let valid = &startup[rng.below(startup.len())];
        ok_start += usize::from(check_startup(&mutate(&mut rng, valid.clone())));
    }
    // The fuzzer must reach the success path of structured messages too, or
    // it tests little.
    assert!(ok_front > 1_000, "{ok_front}");
    assert!(ok_back > 1_000, "{ok_back}");
    assert!(ok_start > 100, "{ok_start}");
    eprintln!("decoded: {ok_front} frontend, {ok_back} backend, {ok_start} start-up");
}

#[test]
fn corpora_round_trip() {
    for (tag, body) in frontend_corpus() {
        check_frontend(tag, &body);
        assert!(decode_frontend(tag, &body).is_ok(), "{}", tag as char);
    }
    for (tag, body) in backend_corpus() {
        check_backend(tag, &body);
        assert!(decode_backend(tag, &body).is_ok(), "{}", tag as char);
    }
    for body in startup_corpus() {
        assert!(check_startup(&body));
    }
}

#[test]
fn every_variant_encodes_with_a_consistent_length() {
    let frontend = [
        FrontendMessage::Startup {
            major: 3,
            minor: 0,
            params: vec![("user", "u")],
        },
        FrontendMessage::SslRequest,
        FrontendMessage::GssEncRequest,
        FrontendMessage::CancelRequest {
            pid: 1,
            secret: b"abcd",
        },
        FrontendMessage::Query("SELECT 1"),
        FrontendMessage::Parse {
            name: "",
            query: "SELECT $1",
            param_types: vec![0],
        },
        FrontendMessage::Bind {
            portal: "",
            statement: "",
            param_formats: vec![],
            params: vec![None],
            result_formats: vec![1],
        },
        FrontendMessage::Describe {
            kind: super::frontend::Target::Portal,
            name: "",
        },
        FrontendMessage::Execute {
            portal: "",
            max_rows: 10,
        },
        FrontendMessage::Sync,
        FrontendMessage::Flush,
        FrontendMessage::Close {
            kind: super::frontend::Target::Statement,
            name: "s",
        },
        FrontendMessage::FunctionCall {
            oid: 1,
            arg_formats: vec![],
            args: vec![],
            result_format: 0,
        },
        FrontendMessage::CopyData(b"x"),
        FrontendMessage::CopyDone,
        FrontendMessage::CopyFail("no"),
        FrontendMessage::Terminate,
        FrontendMessage::Password(b"pw\0"),
        FrontendMessage::Unknown {
            tag: b'~',
            body: b"",
        },
    ];
    for msg in &frontend {
        let mut out = Vec::new();
        msg.encode(&mut out);
        let decoded = match msg.tag() {
            Some(tag) => {
                let f = split_frame(&out, MAX_MESSAGE).unwrap().unwrap();
                assert_eq!((f.tag, f.wire_len()), (tag, out.len()));
                decode_frontend(f.tag, f.body).unwrap()
            }
            None => decode_startup(split_startup(&out).unwrap().unwrap()).unwrap(),
        };
        assert_eq!(&decoded, msg);
        assert!(!msg.name().is_empty());
    }
    let backend = [
        BackendMessage::Authentication(Auth::Ok),
        BackendMessage::EmptyQueryResponse,
        BackendMessage::PortalSuspended,
        BackendMessage::CopyBothResponse {
            format: 0,
            column_formats: vec![0],
        },
        BackendMessage::NegotiateProtocolVersion {
            newest_minor: 2,
            unrecognized: vec![],
        },
        BackendMessage::FunctionCallResponse(None),
    ];
    for msg in &backend {
        let mut out = Vec::new();
        msg.encode(&mut out);
        let f = split_frame(&out, MAX_MESSAGE).unwrap().unwrap();
        assert_eq!(f.wire_len(), out.len());
        assert_eq!(&decode_backend(f.tag, f.body).unwrap(), msg);
        assert!(!msg.name().is_empty());
    }
}
