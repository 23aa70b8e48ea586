//! The MySQL side on arbitrary input: statement analysis under each
//! reading of backslashes, the resolution of executable comments, the
//! connection phase's packets, and the masking of result rows.
//!
//! Beyond "no panic": the analysis is deterministic and each statement's
//! text is part of the input; text whose executable comments were resolved
//! holds none the analysis would refuse as such; a row the masking rewrites
//! still holds one field per column; tables qualified with the current
//! database all have one; a reviewer's view hides as many literals as it
//! says.

#![no_main]

use std::collections::HashSet;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tollgate_agent::masking::{ColumnSpec, MaskMethod, MaskRule};
use tollgate_agent::protocol::mysql::handshake::{self, ClientAnswer};
use tollgate_agent::protocol::mysql::mask::{self, MaskPlan, ResultMask};
use tollgate_agent::protocol::mysql::packet::Packet;
use tollgate_agent::sql::mysql::{self, Escapes, ServerVersion};
use tollgate_agent::sql::{Analysis, Shown};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => text(rest),
        1 => handshake_packets(rest),
        _ => rows(rest),
    }
});

fn text(data: &[u8]) {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    for escapes in [Escapes::Unknown, Escapes::Backslash, Escapes::NoBackslash] {
        let analysis = mysql::analyze_read(sql, escapes);
        assert_eq!(
            analysis,
            mysql::analyze_read(sql, escapes),
            "not deterministic"
        );
        match &analysis {
            Analysis::Parsed { statements } => {
                for s in statements {
                    assert!(
                        sql.contains(s.text.as_str()),
                        "{:?} is not in the input",
                        s.text
                    );
                    let _ = mysql::kill_target(&s.text);
                    let _ = mysql::used_database(&s.text);
                    let _ = mysql::client_charset_change(&s.text, handshake::UNSAFE_CHARSETS);
                    if let Some(name) = mysql::name_use(s) {
                        assert!(mysql::names_something(s), "{name:?} from {:?}", s.text);
                    }
                }
            }
            Analysis::Unparsable { error } => assert!(!error.is_empty()),
        }
        if let Some(Analysis::Parsed { statements }) =
            mysql::in_database(&analysis, Some("db"), false)
        {
            let Analysis::Parsed { statements: before } = &analysis else {
                panic!("qualified an unparsable analysis");
            };
            assert_eq!(statements.len(), before.len());
            assert!(statements
                .iter()
                .flat_map(|s| s.tables_read.iter().chain(&s.tables_written))
                .all(|t| t.schema.is_some()));
        }
        let sensitive: HashSet<String> = ["email".to_owned()].into();
        if let Shown::Hidden {
            literals, values, ..
        } = mysql::shown_to_reviewer(sql, escapes, &sensitive)
        {
            assert_eq!(literals, values.len());
        }
        for server in [
            ServerVersion {
                id: 101119,
                mariadb: true,
            },
            ServerVersion {
                id: 80036,
                mariadb: false,
            },
        ] {
            if let Ok(resolved) = mysql::resolve_executable_comments(sql, escapes, server) {
                if let Analysis::Unparsable { error } = mysql::analyze_read(&resolved, escapes) {
                    assert!(
                        !error.starts_with("executable comment"),
                        "{sql:?} resolved to {resolved:?}, which still holds one"
                    );
                }
            }
        }
    }
    let _ = mysql::may_read_columns(sql, &["email"]);
}

fn handshake_packets(data: &[u8]) {
    let mut greeting = Packet {
        seq: 0,
        payload: data.to_vec(),
    };
    let _ = handshake::server_version(&greeting);
    let _ = handshake::connection_id(&greeting);
    let _ = handshake::restrict_greeting(&mut greeting, data.len() % 2 == 0);
    let mut answer = Packet {
        seq: 1,
        payload: data.to_vec(),
    };
    if let Ok(ClientAnswer::Hello(_)) = handshake::read_client_answer(&mut answer) {
        handshake::set_tls(&mut answer, true);
        let request = handshake::ssl_request(&answer).expect("a readable answer makes one");
        assert_eq!(request.payload.len(), 32);
    }
    let mut ok = data.to_vec();
    let _ = mask::take_warnings(&mut ok);
    let _ = mask::withheld_error(data);
}

/// The first byte: how many columns; then column definitions, each
/// prefixed by its length, and what is left is a row.
fn rows(data: &[u8]) {
    let Some((&columns, mut rest)) = data.split_first() else {
        return;
    };
    let plan = MaskPlan {
        rules: vec![Arc::new(MaskRule {
            columns: vec![ColumnSpec::parse("customers.email").expect("a valid spec")],
            with: MaskMethod::Redact,
        })],
        computed: Some(MaskMethod::Null),
    };
    let mut result = ResultMask::default();
    for _ in 0..columns % 8 {
        let Some((&len, after)) = rest.split_first() else {
            return;
        };
        let len = usize::from(len).min(after.len());
        let mut definition = after[..len].to_vec();
        rest = &after[len..];
        if result.add(&plan, &mut definition).is_err() {
            return;
        }
    }
    if let Ok(Some(row)) = result.text_row(rest) {
        let again = result.text_row(&row).expect("a rewritten row reads back");
        assert!(again.is_some());
    }
    if let Ok(Some(row)) = result.binary_row(rest) {
        let _ = result.binary_row(&row).expect("a rewritten row reads back");
    }
}
