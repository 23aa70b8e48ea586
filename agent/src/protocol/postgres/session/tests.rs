//! The session's rules driven from tables of messages, without sockets:
//! client bytes go through [`ClientSide`] and server bytes through
//! [`UpstreamSide`], both stepped by [`step_batch`] as the pumps step them,
//! under a policy loaded from TOML text. Each row is the bytes one side
//! sends and what the other side gets, message by message.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::path::Path;

use super::super::backend::{decode_backend, Auth, FieldDescription, Fields};
use super::super::codec::split_frame;
use super::super::frontend::decode_frontend;
use super::*;
use crate::events::{EventSink, Events};
use crate::policy::PolicySet;
use crate::protocol::tls::TlsState;
use crate::protocol::SessionStart;
use crate::sql::AnalysisCache;

/// Shared with the end-to-end tests (tests/data/policy).
const POLICY: &str = concat!(
    include_str!("../../../../../tests/data/policy/allow-by-default.toml"),
    include_str!("../../../../../tests/data/policy/no-drop.toml"),
    include_str!("../../../../../tests/data/policy/mask-contact.toml"),
);

/// The OID the tables' rows and RowDescriptions say `customers` has.
const CUSTOMERS: u32 = 16400;

/// Keeps the statements the session reports.
#[derive(Default)]
struct Reported(Mutex<Vec<Arc<StatementEvent>>>);

impl EventSink for Reported {
    fn emit(&self, event: &SessionEvent) {
        if let SessionEvent::Statement(statement) = event {
            self.0.lock().unwrap().push(statement.clone());
        }
    }
}

/// A session context with nothing behind it but the policy.
struct Fixture {
    ctx: SessionContext,
    handler: super::super::PostgresHandler,
    identity: ProcessIdentity,
    reported: Arc<Reported>,
    // Owns the identity lookup's task, which nothing here awaits.
    _runtime: tokio::runtime::Runtime,
}

impl Fixture {
    fn new(policy: &str) -> Fixture {
        let policy = PolicySet::from_str(Path::new("session-test.toml"), policy).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let lookup = runtime.spawn(async { (ProcessIdentity::default(), Duration::ZERO) });
        let start = SessionStart::new(
            lookup,
            Box::new(|_| panic!("the sides decide without announcing the session")),
        );
        let reported = Arc::new(Reported::default());
        let ctx = SessionContext {
            id: uuid::Uuid::now_v7(),
            target: "pg".to_owned(),
            start,
            counters: Arc::default(),
            target_metrics: Arc::default(),
            idle_timeout: Duration::from_secs(60),
            force_close: tokio_util::sync::CancellationToken::new(),
            policy: crate::policy::SharedPolicy::new(policy),
            analysis: Arc::new(AnalysisCache::new(1024)),
            events: Events::new(reported.clone()),
            upstream_addr: "127.0.0.1:5432".parse().unwrap(),
            upstream_name: "127.0.0.1".to_owned(),
            approvals: None,
        };
        Fixture {
            ctx,
            handler: super::super::PostgresHandler::with_tls(TlsState::plaintext()),
            identity: ProcessIdentity::default(),
            reported,
            _runtime: runtime,
        }
    }

    /// The context a PostgreSQL session of this fixture runs with.
    fn pg(&self) -> PostgresContext<'_> {
        self.handler.context(&self.ctx)
    }

    /// The statements reported so far, each with the rule that decided it.
    fn rules(&self) -> Vec<String> {
        let reported = self.reported.0.lock().unwrap();
        reported
            .iter()
            .map(|s| format!("{}: {}", s.text, s.rule.as_deref().unwrap_or("-")))
            .collect()
    }
}

/// Both sides of one session, past authentication.
struct Session<'a> {
    shared: &'a BetweenSides,
    client: ClientSide<'a>,
    upstream: UpstreamSide<'a>,
    /// Client bytes not stepped yet (behind a message that waits).
    pending: Vec<u8>,
}

impl<'a> Session<'a> {
    fn start(fixture: &'a Fixture, shared: &'a BetweenSides) -> Session<'a> {
        let mut session = Session {
            shared,
            client: ClientSide::new(&fixture.pg(), &fixture.identity, shared, None),
            upstream: UpstreamSide::new(&fixture.pg(), shared),
            pending: Vec::new(),
        };
        session.server(
            &[backend(BackendMessage::Authentication(Auth::Ok)), ready()],
            &["Authentication Ok", "ReadyForQuery I"],
        );
        session
    }

    /// The client sends `messages` (after what waited before); the server
    /// gets `expected`, then `(waits)` if the rest waits for the server.
    fn client(&mut self, messages: &[Vec<u8>], expected: &[&str]) {
        self.pending.extend(messages.iter().flatten());
        let data = std::mem::take(&mut self.pending);
        let mut spliced = Vec::new();
        let (batch, from) = step_batch(&mut self.client, &data, &mut spliced).unwrap();
        spliced.extend_from_slice(&data[from..batch.handled]);
        self.pending = data[batch.handled..].to_vec();
        let mut got = self.summaries(&spliced, frontend_summary);
        if batch.wait {
            got.push("(waits)".to_owned());
        }
        if batch.hold {
            got.push("(held)".to_owned());
        }
        assert_rows("to the server", &got, expected);
    }

    /// The server sends `messages`; the client gets `expected`.
    fn server(&mut self, messages: &[Vec<u8>], expected: &[&str]) -> Vec<String> {
        let data: Vec<u8> = messages.iter().flatten().copied().collect();
        let mut spliced = Vec::new();
        let (batch, from) = step_batch(&mut self.upstream, &data, &mut spliced).unwrap();
        assert_eq!(batch.handled, data.len(), "the server's messages are whole");
        spliced.extend_from_slice(&data[from..batch.handled]);
        let got = self.summaries(&spliced, backend_summary);
        assert_rows("to the client", &got, expected);
        got
    }

    /// One line per message, the session's markers written `<deny>` and
    /// `<mask>`.
    fn summaries(&self, bytes: &[u8], summary: fn(u8, &[u8]) -> String) -> Vec<String> {
        let mut rest = bytes;
        let mut lines = Vec::new();
        while let Some(f) = split_frame(rest, MAX_MESSAGE).unwrap() {
            lines.push(self.unmark(&summary(f.tag, f.body)));
            rest = &rest[f.wire_len()..];
        }
        assert!(rest.is_empty(), "whole messages only");
        lines
    }

    fn unmark(&self, text: &str) -> String {
        text.replace(&self.shared.marker, "<deny>")
            .replace(&self.shared.mask_marker, "<mask>")
    }

    fn mark(&self, text: &str) -> String {
        text.replace("<deny>", &self.shared.marker)
            .replace("<mask>", &self.shared.mask_marker)
    }

    /// The server's error for the substitute of denial `<deny>n`.
    fn substitute_fails(&self, n: u32) -> Vec<u8> {
        let message = self.mark(&format!("type \"pg_catalog.<deny>{n}\" does not exist"));
        backend(BackendMessage::ErrorResponse(Fields(vec![
            (b'S', "ERROR"),
            (b'C', "42704"),
            (b'M', &message),
        ])))
    }

    /// The answer to a masking lookup of `customers.email` (column 3).
    fn lookup_answer(&self, number: u32) -> Vec<Vec<u8>> {
        let name = self.mark(&format!("<mask>{number}"));
        let text = |name| FieldDescription {
            name,
            table_oid: 0,
            column: 0,
            type_oid: 25,
            type_len: -1,
            type_mod: -1,
            format: 0,
        };
        let oid = CUSTOMERS.to_string();
        vec![
            backend(BackendMessage::RowDescription(vec![
                text(&name),
                text("attnum"),
                text("attname"),
                text("attrelid"),
            ])),
            backend(BackendMessage::DataRow(vec![
                Some(oid.as_bytes()),
                Some(b"3"),
                Some(b"email"),
                Some(b"customers"),
            ])),
            backend(BackendMessage::CommandComplete("SELECT 1")),
        ]
    }
}

/// `got` matches `expected` line by line; `…` in an expected line stands
/// for any text.
fn assert_rows(direction: &str, got: &[String], expected: &[&str]) {
    let matches = |pattern: &str, line: &str| {
        let mut parts = pattern.split('…');
        let first = parts.next().unwrap_or_default();
        let Some(mut rest) = line.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        for (i, part) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                return rest.ends_with(part);
            }
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        rest.is_empty()
    };
    let ok = got.len() == expected.len() && got.iter().zip(expected).all(|(g, e)| matches(e, g));
    assert!(
        ok,
        "{direction}:\n  got      {got:#?}\n  expected {expected:#?}"
    );
}

fn frontend_summary(tag: u8, body: &[u8]) -> String {
    match decode_frontend(tag, body).unwrap() {
        FrontendMessage::Query(q) => format!("Query {q}"),
        FrontendMessage::Parse { name, query, .. } => format!("Parse {name}: {query}"),
        FrontendMessage::Bind {
            portal, statement, ..
        } => format!("Bind {portal}<-{statement}"),
        FrontendMessage::Describe { kind, name } => {
            format!("Describe {}{name}", kind.byte() as char)
        }
        FrontendMessage::Execute { portal, .. } => format!("Execute {portal}"),
        other => other.name().to_owned(),
    }
}

fn backend_summary(tag: u8, body: &[u8]) -> String {
    match decode_backend(tag, body).unwrap() {
        BackendMessage::Authentication(Auth::Ok) => "Authentication Ok".to_owned(),
        BackendMessage::ReadyForQuery(status) => format!("ReadyForQuery {}", status.byte() as char),
        BackendMessage::ErrorResponse(fields) => format!(
            "ErrorResponse {} {}",
            fields.get(b'C').unwrap_or("-"),
            fields.get(b'M').unwrap_or("-")
        ),
        BackendMessage::RowDescription(fields) => {
            let names: Vec<&str> = fields.iter().map(|f| f.name).collect();
            format!("RowDescription {}", names.join(","))
        }
        BackendMessage::DataRow(values) => {
            let values: Vec<String> = values
                .iter()
                .map(|v| v.map_or("NULL".into(), |v| String::from_utf8_lossy(v).into_owned()))
                .collect();
            format!("DataRow {}", values.join(","))
        }
        BackendMessage::CommandComplete(tag) => format!("CommandComplete {tag}"),
        other => other.name().to_owned(),
    }
}

fn frontend(message: FrontendMessage<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    message.encode(&mut out);
    out
}

fn backend(message: BackendMessage<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    message.encode(&mut out);
    out
}

fn query(text: &str) -> Vec<u8> {
    frontend(FrontendMessage::Query(text))
}

fn parse(name: &str, text: &str) -> Vec<u8> {
    frontend(FrontendMessage::Parse {
        name,
        query: text,
        param_types: Vec::new(),
    })
}

fn bind(portal: &str, statement: &str) -> Vec<u8> {
    frontend(FrontendMessage::Bind {
        portal,
        statement,
        param_formats: Vec::new(),
        params: Vec::new(),
        result_formats: Vec::new(),
    })
}

fn execute(portal: &str) -> Vec<u8> {
    frontend(FrontendMessage::Execute {
        portal,
        max_rows: 0,
    })
}

fn sync() -> Vec<u8> {
    frontend(FrontendMessage::Sync)
}

fn flush() -> Vec<u8> {
    frontend(FrontendMessage::Flush)
}

fn ready() -> Vec<u8> {
    backend(BackendMessage::ReadyForQuery(TransactionStatus::Idle))
}

fn complete(tag: &str) -> Vec<u8> {
    backend(BackendMessage::CommandComplete(tag))
}

fn row(values: &[&str]) -> Vec<u8> {
    backend(BackendMessage::DataRow(
        values.iter().map(|v| Some(v.as_bytes())).collect(),
    ))
}

const DENIED_DROP: &str = "ErrorResponse 42501 tollgate: DROP TABLE denied by rule \"no-drop\"…";

#[test]
fn a_denied_query_is_replaced_and_the_client_gets_the_refusal_then_ready() {
    let fixture = Fixture::new(POLICY);
    let shared = BetweenSides::new();
    let mut s = Session::start(&fixture, &shared);
    s.client(
        &[query("DROP TABLE customers")],
        &["Query SELECT 1::pg_catalog.\"<deny>1\""],
    );
    s.server(
        &[s.substitute_fails(1), ready()],
        &[DENIED_DROP, "ReadyForQuery I"],
    );
    // The next statement is the client's own again.
    s.client(&[query("SELECT 1")], &["Query SELECT 1"]);
    s.server(
        &[row(&["1"]), complete("SELECT 1"), ready()],
        &["DataRow 1", "CommandComplete SELECT 1", "ReadyForQuery I"],
    );
    assert_eq!(
        fixture.rules(),
        ["DROP TABLE customers: no-drop", "SELECT 1: -"]
    );
}

#[test]
fn a_denied_statement_in_an_extended_batch_fails_where_it_stood() {
    let fixture = Fixture::new(POLICY);
    let shared = BetweenSides::new();
    let mut s = Session::start(&fixture, &shared);
    s.client(
        &[
            parse("", "SELECT 1"),
            bind("", ""),
            execute(""),
            parse("s2", "DROP TABLE customers"),
            bind("", "s2"),
            execute(""),
            sync(),
        ],
        &[
            "Parse : SELECT 1",
            "Bind <-",
            "Execute ",
            // The same statement name, so the server fails here.
            "Parse s2: SELECT 1::pg_catalog.\"<deny>1\"",
            // Nothing prepared s2: its Bind is refused too (the server
            // discards it after the error anyway).
            "Bind <-<deny>2",
            "Execute ",
            "Sync",
        ],
    );
    // The server discards everything after the error up to the Sync.
    s.server(
        &[
            backend(BackendMessage::ParseComplete),
            backend(BackendMessage::BindComplete),
            row(&["1"]),
            complete("SELECT 1"),
            s.substitute_fails(1),
            ready(),
        ],
        &[
            "ParseComplete",
            "BindComplete",
            "DataRow 1",
            "CommandComplete SELECT 1",
            DENIED_DROP,
            "ReadyForQuery I",
        ],
    );
}

/// The Parse of the session's prepared lookup, as the tests describe it.
const PREPARED_LOOKUP_PARSE: &str = "Parse <mask>s0: SELECT a.attrelid::pg_catalog.int8 AS \"<mask>0\", a.attnum, a.attname, a.attrelid::pg_catalog.regclass::pg_catalog.text FROM pg_catalog.pg_attribute a WHERE a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped AND pg_catalog.lower(a.attname::pg_catalog.text) OPERATOR(pg_catalog.=) ANY ($2) AND a.attrelid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT pg_catalog.to_regclass(r) FROM pg_catalog.unnest($1) r))";

#[test]
fn a_flush_after_sync_starts_no_batch() {
    let fixture = Fixture::new(POLICY);
    let shared = BetweenSides::new();
    let mut s = Session::start(&fixture, &shared);
    // psycopg ends a pipeline with Sync then Flush.
    s.client(
        &[
            parse("", "SELECT 1"),
            bind("", ""),
            execute(""),
            sync(),
            flush(),
        ],
        &["Parse : SELECT 1", "Bind <-", "Execute ", "Sync", "Flush"],
    );
    s.server(
        &[
            backend(BackendMessage::ParseComplete),
            backend(BackendMessage::BindComplete),
            row(&["1"]),
            complete("SELECT 1"),
            ready(),
        ],
        &[
            "ParseComplete",
            "BindComplete",
            "DataRow 1",
            "CommandComplete SELECT 1",
            "ReadyForQuery I",
        ],
    );
    // So a masked statement after it starts a batch of its own (with its
    // lookup in front), rather than being refused as pipelined.
    s.client(
        &[parse("", "SELECT email AS e FROM customers"), sync()],
        &[
            PREPARED_LOOKUP_PARSE,
            "Bind <mask>p<-<mask>s0",
            "Execute <mask>p",
            "Close",
            "Parse : SELECT email AS e FROM customers",
            "Sync",
        ],
    );
    assert_eq!(
        fixture.rules(),
        [
            "SELECT 1: -",
            "SELECT email AS e FROM customers: mask-contact"
        ]
    );
}

#[test]
fn a_sql_execute_of_a_protocol_prepared_masked_statement_is_decided_as_what_it_runs() {
    let fixture = Fixture::new(POLICY);
    let shared = BetweenSides::new();
    let mut s = Session::start(&fixture, &shared);
    // A masked Parse opening a batch: the session's prepared lookup, as
    // extended-protocol messages, in front of it.
    s.client(
        &[parse("s1", "SELECT email AS e FROM customers"), sync()],
        &[
            PREPARED_LOOKUP_PARSE,
            "Bind <mask>p<-<mask>s0",
            "Execute <mask>p",
            "Close",
            "Parse s1: SELECT email AS e FROM customers",
            "Sync",
        ],
    );
    let mut answer = vec![
        backend(BackendMessage::ParseComplete),
        backend(BackendMessage::BindComplete),
    ];
    answer.extend(s.lookup_answer(1).into_iter().skip(1));
    answer.extend([
        backend(BackendMessage::CloseComplete),
        backend(BackendMessage::ParseComplete),
        ready(),
    ]);
    // The lookup's answer is the proxy's own: the client sees its Parse's.
    s.server(&answer, &["ParseComplete", "ReadyForQuery I"]);
    // The next one only binds it.
    s.client(
        &[parse("", "SELECT email AS e FROM customers"), sync()],
        &[
            "Bind <mask>p<-<mask>s0",
            "Execute <mask>p",
            "Close",
            "Parse : SELECT email AS e FROM customers",
            "Sync",
        ],
    );
    let mut answer = vec![backend(BackendMessage::BindComplete)];
    answer.extend(s.lookup_answer(1).into_iter().skip(1));
    answer.extend([
        backend(BackendMessage::CloseComplete),
        backend(BackendMessage::ParseComplete),
        ready(),
    ]);
    s.server(&answer, &["ParseComplete", "ReadyForQuery I"]);
    // `EXECUTE s1` runs the masked SELECT: it goes with a lookup in front.
    s.client(&[query("EXECUTE s1")], &["Query …<mask>…EXECUTE s1"]);
    // Reported as itself and as the statement it runs.
    assert_eq!(
        fixture.rules(),
        [
            "SELECT email AS e FROM customers: mask-contact",
            "SELECT email AS e FROM customers: mask-contact",
            "EXECUTE s1: -",
            "SELECT email AS e FROM customers: mask-contact"
        ]
    );
}

#[test]
fn a_statement_behind_an_unanswered_set_of_standard_conforming_strings_waits() {
    let fixture = Fixture::new(POLICY);
    let shared = BetweenSides::new();
    let mut s = Session::start(&fixture, &shared);
    s.client(
        &[
            query("SET standard_conforming_strings = off"),
            query("SELECT 'a\\''; DROP TABLE customers; --'"),
        ],
        &["Query SET standard_conforming_strings = off", "(waits)"],
    );
    s.server(
        &[
            complete("SET"),
            backend(BackendMessage::ParameterStatus {
                name: "standard_conforming_strings",
                value: "off",
            }),
            ready(),
        ],
        &["CommandComplete SET", "ParameterStatus", "ReadyForQuery I"],
    );
    // Read as the server now reads it, a backslash escaping the quote
    // after it: a SELECT of a literal, then the DROP the rule denies.
    s.client(&[], &["Query SELECT 1::pg_catalog.\"<deny>1\""]);
}

/// What the client gets for a batch of `SELECT 1` then a masked statement.
const PIPELINE_ANSWERS: [&str; 9] = [
    "ParseComplete",
    "BindComplete",
    "DataRow 1",
    "CommandComplete SELECT 1",
    "ParseComplete",
    "BindComplete",
    "DataRow …",
    "CommandComplete SELECT 1",
    "ReadyForQuery I",
];

fn customers_field(name: &str, column: i16) -> Vec<u8> {
    backend(BackendMessage::RowDescription(vec![FieldDescription {
        name,
        table_oid: CUSTOMERS,
        column,
        type_oid: 25,
        type_len: -1,
        type_mod: -1,
        format: 0,
    }]))
}

#[test]
fn a_plain_query_of_one_table_goes_without_a_lookup_and_is_masked_by_field_name() {
    let fixture = Fixture::new(POLICY);
    let shared = BetweenSides::new();
    let mut s = Session::start(&fixture, &shared);
    s.client(
        &[query("SELECT email FROM customers")],
        &["Query SELECT email FROM customers"],
    );
    let got = s.server(
        &[
            customers_field("email", 3),
            row(&["ada@example.com"]),
            complete("SELECT 1"),
            ready(),
        ],
        &[
            "RowDescription email",
            "DataRow …",
            "CommandComplete SELECT 1",
            "ReadyForQuery I",
        ],
    );
    assert!(!got[1].contains("ada@"), "{got:?}");
    assert!(s.upstream.masked.is_none(), "the masked answer ended");
    // An error raised while it runs may quote a value: withheld, as it is
    // behind a lookup.
    s.client(
        &[query("SELECT email FROM customers")],
        &["Query SELECT email FROM customers"],
    );
    let error = backend(BackendMessage::ErrorResponse(Fields(vec![
        (b'S', "ERROR"),
        (b'C', "22P02"),
        (
            b'M',
            "invalid input syntax for type integer: \"ada@example.com\"",
        ),
    ])));
    let got = s.server(
        &[error, ready()],
        &[
            "ErrorResponse 22P02 tollgate: the server's error message is withheld…",
            "ReadyForQuery I",
        ],
    );
    assert!(!got[0].contains("ada@"), "{got:?}");
    assert_eq!(
        fixture.rules(),
        [
            "SELECT email FROM customers: mask-contact",
            "SELECT email FROM customers: mask-contact"
        ]
    );
}

#[test]
fn a_masked_value_is_replaced_in_the_data_row_behind_the_lookup() {
    let fixture = Fixture::new(POLICY);
    let shared = BetweenSides::new();
    let mut s = Session::start(&fixture, &shared);
    // An alias on the column: the field's name is not the column's.
    s.client(
        &[query("SELECT email AS contact FROM customers")],
        &["Query PREPARE <mask>s0…;EXECUTE <mask>s0(…);SELECT email AS contact FROM customers"],
    );
    let mut answer = vec![complete("PREPARE")];
    answer.extend(s.lookup_answer(0));
    answer.extend([
        customers_field("contact", 3),
        row(&["ada@example.com"]),
        complete("SELECT 1"),
        ready(),
    ]);
    let got = s.server(
        &answer,
        &[
            "RowDescription contact",
            "DataRow …",
            "CommandComplete SELECT 1",
            "ReadyForQuery I",
        ],
    );
    // The value is the masking method's; the address is gone.
    assert!(!got[1].contains("ada@"), "{got:?}");
    assert!(s.upstream.masked.is_none(), "the masked answer ended");
    assert_eq!(
        fixture.rules(),
        ["SELECT email AS contact FROM customers: mask-contact"]
    );
}

#[test]
fn a_plain_query_of_one_table_in_a_batch_goes_without_a_lookup() {
    let fixture = Fixture::new(POLICY);
    let shared = BetweenSides::new();
    let mut s = Session::start(&fixture, &shared);
    // An unmasked statement, then a masked one, in one batch: only the
    // proxy's Describe goes in front of the masked Execute.
    s.client(
        &[
            parse("", "SELECT 1"),
            bind("", ""),
            execute(""),
            parse("", "SELECT email FROM customers"),
            bind("", ""),
            execute(""),
            sync(),
        ],
        &[
            "Parse : SELECT 1",
            "Bind <-",
            "Execute ",
            "Parse : SELECT email FROM customers",
            "Bind <-",
            "Describe P",
            "Execute ",
            "Sync",
        ],
    );
    let got = s.server(
        &[
            backend(BackendMessage::ParseComplete),
            backend(BackendMessage::BindComplete),
            row(&["1"]),
            complete("SELECT 1"),
            backend(BackendMessage::ParseComplete),
            backend(BackendMessage::BindComplete),
            // The proxy's Describe: dropped.
            customers_field("email", 3),
            row(&["ada@example.com"]),
            complete("SELECT 1"),
            ready(),
        ],
        &PIPELINE_ANSWERS,
    );
    assert!(!got[6].contains("ada@"), "{got:?}");
    assert!(shared.batch().is_none(), "the batch is over");
    // An error raised while it runs is withheld; the batch skips to Sync.
    s.client(
        &[
            parse("", "SELECT email FROM customers"),
            bind("", ""),
            execute(""),
            sync(),
        ],
        &[
            "Parse : SELECT email FROM customers",
            "Bind <-",
            "Describe P",
            "Execute ",
            "Sync",
        ],
    );
    let error = backend(BackendMessage::ErrorResponse(Fields(vec![
        (b'S', "ERROR"),
        (b'C', "22P02"),
        (
            b'M',
            "invalid input syntax for type integer: \"ada@example.com\"",
        ),
    ])));
    let got = s.server(
        &[
            backend(BackendMessage::ParseComplete),
            backend(BackendMessage::BindComplete),
            customers_field("email", 3),
            error,
            ready(),
        ],
        &[
            "ParseComplete",
            "BindComplete",
            "ErrorResponse 22P02 tollgate: the server's error message is withheld…",
            "ReadyForQuery I",
        ],
    );
    assert!(!got[2].contains("ada@"), "{got:?}");
    // A batch that holds a masked statement is not let go before its
    // Sync, as one with a lookup is not.
    s.client(
        &[
            parse("", "SELECT email FROM customers"),
            bind("", ""),
            execute(""),
        ],
        &[
            "Parse : SELECT email FROM customers",
            "Bind <-",
            "Describe P",
            "Execute ",
        ],
    );
    assert!(shared.batch().as_ref().is_some_and(|b| b.holds_masked()));
}

const REVIEW_POLICY: &str = r#"
[defaults]
action = "allow"

[[rule]]
name = "review-deletes"
action = "review"
approvers = ["group:dba"]
[rule.match]
kinds = ["delete"]
"#;

#[test]
fn a_held_statement_waits_then_runs_as_approved_edited_or_refused() {
    let mut fixture = Fixture::new(REVIEW_POLICY);
    let store = tempfile::tempdir().unwrap();
    fixture.ctx.approvals = Some(Arc::new(crate::approval::Desk {
        registry: Arc::new(crate::approval::Registry::new(Default::default())),
        grants: Arc::new(
            crate::approval::GrantStore::open(
                &store.path().join("grants.redb"),
                std::time::SystemTime::now(),
            )
            .unwrap(),
        ),
    }));
    let shared = BetweenSides::new();
    let mut s = Session::start(&fixture, &shared);
    // Held: nothing reaches the server, the message stays to be stepped
    // again, and nothing is reported until the outcome.
    s.client(&[query("DELETE FROM t WHERE id = 1")], &["(held)"]);
    let pending = s.client.pending_review.take().unwrap();
    assert_eq!(pending.text, "DELETE FROM t WHERE id = 1");
    assert!(fixture.rules().is_empty());
    s.client.review_outcome = Some(ReviewOutcome::Approved {
        held_text: pending.text,
    });
    s.client(&[], &["Query DELETE FROM t WHERE id = 1"]);
    s.server(
        &[complete("DELETE 1"), ready()],
        &["CommandComplete DELETE 1", "ReadyForQuery I"],
    );
    // Approval covers that text only: the next delete is held again.
    s.client(&[query("DELETE FROM t WHERE id = 2")], &["(held)"]);
    let pending = s.client.pending_review.take().unwrap();
    s.client.review_outcome = Some(ReviewOutcome::Refused {
        held_text: pending.text,
        message: "tollgate: statement denied by reviewer bob: no".to_owned(),
        sqlstate: "42501",
    });
    s.client(&[], &["Query SELECT 1::pg_catalog.\"<deny>1\""]);
    s.server(
        &[s.substitute_fails(1), ready()],
        &[
            "ErrorResponse 42501 tollgate: statement denied by reviewer bob: no",
            "ReadyForQuery I",
        ],
    );
    // An edit in a Parse keeps the statement's name and parameter types.
    s.client(&[parse("s1", "DELETE FROM t"), sync()], &["(held)"]);
    s.client.pending_review.take().unwrap();
    s.client.review_outcome = Some(ReviewOutcome::Edited {
        text: "DELETE FROM t WHERE id = 3".to_owned(),
        rule: "review-deletes".to_owned(),
    });
    s.client(&[], &["Parse s1: DELETE FROM t WHERE id = 3", "Sync"]);
    // An edit another rule would hold is refused.
    s.client(&[query("DELETE FROM t")], &["(held)"]);
    s.client.pending_review.take().unwrap();
    s.client.review_outcome = Some(ReviewOutcome::Edited {
        text: "DELETE FROM t WHERE id = 4".to_owned(),
        rule: "another-rule".to_owned(),
    });
    s.client(&[], &["Query SELECT 1::pg_catalog.\"<deny>2\""]);
    assert_eq!(
        fixture.rules(),
        [
            "DELETE FROM t WHERE id = 1: review-deletes",
            "DELETE FROM t WHERE id = 2: review-deletes",
            "DELETE FROM t WHERE id = 3: review-deletes",
            "DELETE FROM t WHERE id = 4: review-deletes",
        ]
    );
}

#[test]
fn a_masked_statement_inside_a_pipelined_batch_has_its_lookup_sent_in_front_of_it() {
    let fixture = Fixture::new(POLICY);
    let shared = BetweenSides::new();
    let mut s = Session::start(&fixture, &shared);
    // psycopg's pipeline(): an unmasked statement, then a masked one, in
    // one batch with one Sync.
    s.client(
        &[
            parse("", "SELECT 1"),
            bind("", ""),
            execute(""),
            parse("", "SELECT email AS e FROM customers"),
            bind("", ""),
            execute(""),
            sync(),
        ],
        &[
            "Parse : SELECT 1",
            "Bind <-",
            "Execute ",
            "Parse <mask>1: SELECT …",
            "Bind <mask>1<-<mask>1",
            "Execute <mask>1",
            "Close",
            "Close",
            "Parse : SELECT email AS e FROM customers",
            "Bind <-",
            "Describe P",
            "Execute ",
            "Sync",
        ],
    );
    let email = |format| {
        backend(BackendMessage::RowDescription(vec![FieldDescription {
            name: "email",
            table_oid: CUSTOMERS,
            column: 3,
            type_oid: 25,
            type_len: -1,
            type_mod: -1,
            format,
        }]))
    };
    let lookup_row = s.lookup_answer(0).swap_remove(1);
    let got = s.server(
        &[
            backend(BackendMessage::ParseComplete),
            backend(BackendMessage::BindComplete),
            row(&["1"]),
            complete("SELECT 1"),
            // The lookup's answers: dropped.
            backend(BackendMessage::ParseComplete),
            backend(BackendMessage::BindComplete),
            lookup_row,
            complete("SELECT 1"),
            backend(BackendMessage::CloseComplete),
            backend(BackendMessage::CloseComplete),
            backend(BackendMessage::ParseComplete),
            backend(BackendMessage::BindComplete),
            // The proxy's Describe: dropped.
            email(0),
            row(&["ada@example.com"]),
            complete("SELECT 1"),
            ready(),
        ],
        &PIPELINE_ANSWERS,
    );
    assert!(!got[6].contains("ada@"), "{got:?}");
    assert_eq!(
        fixture.rules(),
        [
            "SELECT 1: -",
            "SELECT email AS e FROM customers: mask-contact"
        ]
    );
    // The batch is over: the next one starts afresh.
    assert!(shared.batch().is_none());
}

#[test]
fn an_error_before_the_inline_lookup_is_the_servers_and_the_batch_skips_to_sync() {
    let fixture = Fixture::new(POLICY);
    let shared = BetweenSides::new();
    let mut s = Session::start(&fixture, &shared);
    s.client(
        &[
            parse("", "SELECT 1/0"),
            bind("", ""),
            execute(""),
            parse("", "SELECT email AS e FROM customers"),
            bind("", ""),
            execute(""),
            sync(),
        ],
        &[
            "Parse : SELECT 1/0",
            "Bind <-",
            "Execute ",
            "Parse <mask>1: SELECT …",
            "Bind <mask>1<-<mask>1",
            "Execute <mask>1",
            "Close",
            "Close",
            "Parse : SELECT email AS e FROM customers",
            "Bind <-",
            "Describe P",
            "Execute ",
            "Sync",
        ],
    );
    let division = backend(BackendMessage::ErrorResponse(Fields(vec![
        (b'S', "ERROR"),
        (b'C', "22012"),
        (b'M', "division by zero"),
    ])));
    s.server(
        &[
            backend(BackendMessage::ParseComplete),
            backend(BackendMessage::BindComplete),
            division,
            ready(),
        ],
        &[
            "ParseComplete",
            "BindComplete",
            // Not withheld: it answers a statement before the lookup.
            "ErrorResponse 22012 division by zero",
            "ReadyForQuery I",
        ],
    );
    assert!(shared.batch().is_none());
    // A Query after the Sync is answered as usual.
    s.client(&[query("SELECT 2")], &["Query SELECT 2"]);
}

#[test]
fn a_query_inside_a_followed_batch_lets_the_batch_go() {
    let fixture = Fixture::new(POLICY);
    let shared = BetweenSides::new();
    let mut s = Session::start(&fixture, &shared);
    s.client(
        &[
            parse("", "SELECT 1"),
            bind("", ""),
            execute(""),
            query("SELECT 2"),
        ],
        &["Parse : SELECT 1", "Bind <-", "Execute ", "Query SELECT 2"],
    );
    assert!(shared.batch().is_none(), "no longer followed");
    s.server(
        &[
            backend(BackendMessage::ParseComplete),
            backend(BackendMessage::BindComplete),
            row(&["1"]),
            complete("SELECT 1"),
        ],
        &[
            "ParseComplete",
            "BindComplete",
            "DataRow 1",
            "CommandComplete SELECT 1",
        ],
    );
}
