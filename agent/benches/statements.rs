//! What the PostgreSQL path costs per statement, piece by piece:
//!
//! - `framing/*`: splitting a buffer into messages and decoding them: a
//!   simple Query from the client, a 100-row result from the server.
//! - `analysis/*`: statement analysis cold (the parser runs), cached on the
//!   same text, and cached on the same shape with a new literal (what
//!   pgbench and ORMs that inline values send).
//! - `policy/*`: deciding one statement against 100 rules, where the
//!   deciding rule is the last one and every rule is evaluated.
//! - `masking/*`: what a masked statement adds in the proxy: walking its
//!   parse tree for the columns its expressions read, and rewriting one
//!   result row with a masked field.
//!
//! Run: `cargo bench -p tollgate-agent --bench statements`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use tollgate_agent::identity::ProcessIdentity;
use tollgate_agent::policy::{DecisionMemo, PolicySet};
use tollgate_agent::protocol::postgres::{
    decode_backend, decode_frontend, split_frame, MAX_MESSAGE,
};
use tollgate_agent::sql::{analyze, Analysis, AnalysisCache, Reading};

const QUERY: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 4242";

/// A typed message: tag, length (counting itself), body.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// RowDescription, 100 DataRows of three columns, CommandComplete and
/// ReadyForQuery, as a server sends them for a small SELECT.
fn result_stream() -> Vec<u8> {
    let mut row_description = 3u16.to_be_bytes().to_vec();
    for name in ["aid", "abalance", "filler"] {
        row_description.extend_from_slice(name.as_bytes());
        row_description.push(0);
        row_description.extend_from_slice(&[
            0, 0, 0, 1, 0, 1, 0, 0, 0, 23, 0, 4, 255, 255, 255, 255, 0, 0,
        ]);
    }
    let mut out = message(b'T', &row_description);
    for i in 0..100u32 {
        let mut row = 3u16.to_be_bytes().to_vec();
        for value in [i.to_string(), "0".to_string(), " ".repeat(84)] {
            row.extend_from_slice(&(value.len() as u32).to_be_bytes());
            row.extend_from_slice(value.as_bytes());
        }
        out.extend(message(b'D', &row));
    }
    out.extend(message(b'C', b"SELECT 100\0"));
    out.extend(message(b'Z', b"I"));
    out
}

fn framing(c: &mut Criterion) {
    let mut group = c.benchmark_group("framing");
    let mut query = QUERY.as_bytes().to_vec();
    query.push(0);
    let query = message(b'Q', &query);
    group.throughput(Throughput::Elements(1));
    group.bench_function("query_message", |b| {
        b.iter(|| {
            let frame = split_frame(black_box(&query), MAX_MESSAGE)
                .unwrap()
                .unwrap();
            black_box(decode_frontend(frame.tag, frame.body).unwrap());
        });
    });
    let stream = result_stream();
    group.throughput(Throughput::Elements(103));
    group.bench_function("result_103_messages", |b| {
        b.iter(|| {
            let mut rest = black_box(stream.as_slice());
            while let Some(frame) = split_frame(rest, MAX_MESSAGE).unwrap() {
                black_box(decode_backend(frame.tag, frame.body).unwrap());
                rest = &rest[frame.wire_len()..];
            }
        });
    });
    group.finish();
}

fn analysis(c: &mut Criterion) {
    let mut group = c.benchmark_group("analysis");
    group.throughput(Throughput::Elements(1));
    group.bench_function("cold", |b| {
        b.iter(|| black_box(analyze(black_box(QUERY))));
    });
    let cache = AnalysisCache::new(10_000);
    cache.analyze(QUERY);
    group.bench_function("cached_same_text", |b| {
        b.iter(|| black_box(cache.analyze(black_box(QUERY))));
    });
    // Texts are built outside the timed loop; a counter picks the next.
    let texts: Vec<String> = (0..4096)
        .map(|i| {
            format!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {}",
                i * 7919 % 1_000_000
            )
        })
        .collect();
    let next = AtomicU64::new(0);
    group.bench_function("cached_same_shape_new_literal", |b| {
        b.iter(|| {
            let i = next.fetch_add(1, Ordering::Relaxed) as usize % texts.len();
            black_box(cache.analyze(&texts[i]))
        });
    });
    group.finish();
}

/// 100 rules of the kinds a real policy holds (tables, kinds, flags,
/// identities, functions), none matching the benchmark statement but the
/// last one.
fn hundred_rules() -> String {
    let mut text = String::from("[defaults]\naction = \"deny\"\n\n");
    for i in 0..99 {
        let condition = match i % 5 {
            0 => format!("tables = [\"secret_{i}_*\"]"),
            1 => format!("kinds = [\"drop\", \"truncate\"]\ntables = [\"audit_{i}\"]"),
            2 => "flags = [\"no_where\"]".to_string(),
            3 => format!("users = [\"deploy{i}\"]\nkinds = [\"update\"]"),
            _ => format!("functions = [\"pg_read_file\", \"f_{i}\"]"),
        };
        write!(
            text,
            "[[rule]]\nname = \"rule-{i}\"\naction = \"deny\"\n[rule.match]\n{condition}\n\n"
        )
        .unwrap();
    }
    text.push_str(
        "[[rule]]\nname = \"reads\"\naction = \"allow\"\n[rule.match]\nkinds = [\"select\"]\n",
    );
    text
}

fn policy(c: &mut Criterion) {
    let policy = PolicySet::from_str(Path::new("bench.toml"), &hundred_rules()).unwrap();
    assert_eq!(policy.rule_count(), 100);
    let analysis = analyze(QUERY);
    assert!(matches!(analysis, Analysis::Parsed { .. }));
    let identity = ProcessIdentity {
        uid: Some(1001),
        user: Some("runner".to_string()),
        exe: Some("/usr/bin/pgbench".to_string()),
        ..ProcessIdentity::default()
    };
    let mut group = c.benchmark_group("policy");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decide_100_rules", |b| {
        b.iter(|| {
            black_box(policy.decide_analysis("orders-db", &identity, QUERY, black_box(&analysis)))
        });
    });
    // What a session pays for a statement of a shape it decided before.
    let mut memo = DecisionMemo::default();
    memo.decide(&policy, "orders-db", &identity, QUERY, &analysis);
    group.bench_function("decide_100_rules_memo_hit", |b| {
        b.iter(|| {
            black_box(memo.decide(&policy, "orders-db", &identity, QUERY, black_box(&analysis)))
        });
    });
    group.finish();
}

fn masking(c: &mut Criterion) {
    use tollgate_agent::masking::{MaskMethod, ResolvedColumns};
    use tollgate_agent::protocol::postgres::mask::{mask_data_row, row_masks};
    use tollgate_agent::protocol::postgres::FieldDescription;

    let mut group = c.benchmark_group("masking");
    group.throughput(Throughput::Elements(1));
    let sql = "SELECT aid, abalance, filler FROM pgbench_accounts WHERE aid = 4242";
    group.bench_function("column_refs", |b| {
        b.iter(|| {
            black_box(tollgate_agent::sql::column_refs(black_box(sql), Reading::Standard).unwrap())
        });
    });
    // What a session pays: the cache, hit by the same shape with a new literal.
    let cache = tollgate_agent::sql::AnalysisCache::new(64);
    let mut aid = 0u32;
    group.bench_function("column_refs_cached_new_literal", |b| {
        b.iter(|| {
            aid = aid.wrapping_add(1);
            let sql =
                format!("SELECT aid, abalance, filler FROM pgbench_accounts WHERE aid = {aid}");
            black_box(cache.column_refs(black_box(&sql), Reading::Standard))
        })
    });
    let mut resolved = ResolvedColumns::default();
    resolved.add(16397, 4, MaskMethod::Redact);
    let field = |name, column, type_oid| FieldDescription {
        name,
        table_oid: 16397,
        column,
        type_oid,
        type_len: -1,
        type_mod: -1,
        format: 0,
    };
    let fields = [
        field("aid", 1, 23),
        field("abalance", 3, 23),
        field("filler", 4, 1042),
    ];
    let masks = row_masks(&fields, &resolved, None).unwrap();
    let mut row = 3u16.to_be_bytes().to_vec();
    for value in ["4242".to_string(), "0".to_string(), " ".repeat(84)] {
        row.extend_from_slice(&(value.len() as u32).to_be_bytes());
        row.extend_from_slice(value.as_bytes());
    }
    let mut out = Vec::with_capacity(256);
    group.bench_function("data_row_3_fields_1_masked", |b| {
        b.iter(|| {
            out.clear();
            mask_data_row(black_box(&row), &masks, &mut out).unwrap();
            black_box(out.len())
        });
    });
    group.finish();
}

criterion_group!(benches, framing, analysis, policy, masking);
criterion_main!(benches);
