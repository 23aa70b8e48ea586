//! The statement gate against a hostile client: tables and functions hidden
//! from the analysis by SQL's own means (CTE names reused at another query
//! level, statements inside statements, functions a created object calls
//! later), sent by a real psql through the agent to a real server. Each
//! refusal is checked on the server too: what was refused did not happen.

use tollgate_tests::*;

/// Reads allowed, DDL allowed (so that what refuses a statement below is
/// the analysis of what it touches, not its kind), contact details masked,
/// the secrets table, writes to customers and server files refused.
const POLICY: &str = concat!(
    include_str!("../data/policy/allow-by-default.toml"),
    include_str!("../data/policy/mask-contact.toml"),
    include_str!("../data/policy/protect-secrets.toml"),
    r#"
[[rule]]
name = "customers-read-only"
action = "deny"
[rule.match]
tables_written = ["customers"]

[[rule]]
name = "no-server-files"
action = "deny"
[rule.match]
flags = ["server_file_access"]
"#
);

const SCHEMA: &str = "create table customers (id int primary key, email text);
insert into customers values (1, 'ada@example.com'), (2, 'alan@example.com');
create table secrets (s text); insert into secrets values ('the-key');
create table t (s text);";

/// Runs one command through the agent; returns (succeeded, stdout + stderr).
fn through_agent(governed: &Governed, sql: &str) -> (bool, String) {
    let out = psql_command(governed.port, sql).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Asserts the command is refused by `rule` and leaks nothing of `secret`.
fn refused_by(governed: &Governed, sql: &str, rule: &str) {
    let (ok, text) = through_agent(governed, sql);
    assert!(!ok, "{sql}\nran through the agent:\n{text}");
    assert!(
        text.contains(&format!("denied by rule \"{rule}\"")),
        "{sql}\nnot refused by {rule}:\n{text}"
    );
    for value in ["the-key", "ada@example.com"] {
        assert!(!text.contains(value), "{sql}\nleaked {value}:\n{text}");
    }
}

#[test]
fn cte_names_hide_tables_only_at_their_own_level() {
    let governed = Governed::start(POLICY, SCHEMA, "");
    for sql in [
        "SELECT * FROM secrets WHERE EXISTS (WITH secrets AS (SELECT 1) SELECT 1)",
        "(WITH secrets AS (SELECT 1) SELECT 'x' FROM secrets) UNION ALL SELECT s FROM secrets",
        "WITH a AS (SELECT * FROM secrets), secrets AS (SELECT 1) SELECT * FROM a",
        "CREATE TABLE copied AS SELECT * FROM secrets WHERE EXISTS (WITH secrets AS (SELECT 1) SELECT 1)",
    ] {
        refused_by(&governed, sql, "protect-secrets");
    }
    assert_eq!(governed.server("select to_regclass('copied') is null"), "t");

    // The target of a write is the table, whatever a CTE is called.
    refused_by(
        &governed,
        "WITH customers AS (SELECT 1) DELETE FROM customers",
        "customers-read-only",
    );
    assert_eq!(governed.server("select count(*) from customers"), "2");

    // A masked column read past a CTE of the same name comes back masked.
    let (ok, text) = through_agent(
        &governed,
        "SELECT email FROM customers WHERE EXISTS (WITH customers AS (SELECT 1) SELECT 1) ORDER BY id",
    );
    assert!(ok, "{text}");
    assert!(!text.contains("@example.com"), "unmasked:\n{text}");
    assert_eq!(text.lines().count(), 2, "{text}");

    // A CTE that really shadows the table hides nothing: its own rows.
    let (ok, text) = through_agent(
        &governed,
        "WITH secrets AS (SELECT 'mine' AS s) SELECT s FROM secrets",
    );
    assert!(ok, "{text}");
    assert_eq!(text.trim(), "mine");
}

#[test]
fn statements_inside_statements_are_decided() {
    let governed = Governed::start(POLICY, SCHEMA, "");
    let cases = [
        (
            "CREATE SCHEMA y CREATE VIEW v AS SELECT * FROM secrets",
            "protect-secrets",
            "select count(*) from pg_namespace where nspname = 'y'",
        ),
        (
            "CREATE RULE \"_RETURN\" AS ON SELECT TO t DO INSTEAD SELECT * FROM secrets",
            "protect-secrets",
            "select count(*) from pg_rewrite where ev_class = 't'::regclass",
        ),
        (
            "CREATE RULE r AS ON INSERT TO t DO ALSO UPDATE customers SET email = NEW.s WHERE id = 1",
            "customers-read-only",
            "select count(*) from pg_rewrite where ev_class = 't'::regclass",
        ),
        (
            "CREATE TABLE kid () INHERITS (customers)",
            "customers-read-only",
            "select count(*) from pg_class where relname = 'kid'",
        ),
        (
            "CREATE TABLE part (id int, email text) PARTITION BY LIST (id); \
             ALTER TABLE customers ADD COLUMN extra text",
            "customers-read-only",
            "select count(*) from pg_class where relname = 'part'",
        ),
        (
            "CREATE TRIGGER steal BEFORE UPDATE ON customers FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
            "customers-read-only",
            "select count(*) from pg_trigger where tgname = 'steal'",
        ),
        (
            "CREATE TABLE d (a text DEFAULT pg_read_file('/etc/hostname'))",
            "no-server-files",
            "select count(*) from pg_class where relname = 'd'",
        ),
        (
            "CREATE OPERATOR ### (FUNCTION = pg_read_file, RIGHTARG = text)",
            "no-server-files",
            "select count(*) from pg_operator where oprname = '###'",
        ),
        (
            "CREATE FUNCTION leak() RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT s FROM secrets; END",
            "protect-secrets",
            "select count(*) from pg_proc where proname = 'leak'",
        ),
    ];
    for (sql, rule, check) in cases {
        refused_by(&governed, sql, rule);
        assert_eq!(governed.server(check), "0", "{sql} took effect");
    }

    // DDL as such is allowed: what refused the statements above is what
    // they touch.
    let (ok, text) = through_agent(
        &governed,
        "CREATE TABLE ok (a int DEFAULT length('x')); CREATE VIEW okv AS SELECT s FROM t",
    );
    assert!(ok, "{text}");
    assert_eq!(
        governed.server("select count(*) from pg_class where relname in ('ok', 'okv')"),
        "2"
    );
}

/// In a session where a mask rule applies, a statement that could carry a
/// masked value out of its result (a notification, a setting, a large
/// object, planner statistics) is refused; nothing of it reaches the
/// server.
#[test]
fn masked_values_do_not_leave_through_side_channels() {
    let governed = Governed::start(POLICY, SCHEMA, "");
    // Planner statistics of customers exist on the server.
    governed.server("analyze customers");
    assert_ne!(
        governed.server("select count(*) from pg_stats where tablename = 'customers'"),
        "0"
    );
    let refused = |sql: &str, why: &str| {
        let (ok, text) = through_agent(&governed, sql);
        assert!(!ok, "{sql}\nran through the agent:\n{text}");
        assert!(
            text.contains("requires masking by rule \"mask-contact\"") && text.contains(why),
            "{sql}\nnot refused for {why}:\n{text}"
        );
        assert!(!text.contains("@example.com"), "{sql}\nleaked:\n{text}");
    };
    refused(
        "SELECT pg_notify('c', email) FROM customers",
        "pg_notify(), which is not a side-effect-free built-in",
    );
    refused(
        "SELECT set_config('application_name', email, false) FROM customers",
        "set_config(), which is not a side-effect-free built-in",
    );
    refused(
        "SELECT lo_from_bytea(0, convert_to(email, 'UTF8')) FROM customers",
        "lo_from_bytea(), which is not a side-effect-free built-in",
    );
    assert_eq!(
        governed.server("select count(*) from pg_largeobject_metadata"),
        "0"
    );
    refused(
        "SELECT histogram_bounds, most_common_vals FROM pg_stats WHERE tablename = 'customers'",
        "planner statistics (pg_stats) hold sample values of masked columns",
    );
    // Pure built-ins still run, masked.
    let (ok, text) = through_agent(
        &governed,
        "SELECT upper(email), length(email) FROM customers ORDER BY id",
    );
    assert!(ok, "{text}");
    assert!(!text.to_lowercase().contains("@example.com"), "{text}");
    assert_eq!(text.lines().count(), 2, "{text}");
}

/// psql's large-object commands reach the server as fast-path
/// `FunctionCall` messages, which name a function by oid: the built-in
/// large-object functions are decided by their names, so a rule on
/// `lowrite` refuses `\lo_import` while `\lo_export` of an existing object
/// runs.
#[test]
fn large_object_fast_path_calls_are_decided_by_function_name() {
    let policy = r#"
[defaults]
action = "allow"

[[rule]]
name = "no-large-object-writes"
action = "deny"
[rule.match]
functions = ["lowrite", "lo_put", "lo_from_bytea"]
"#;
    let governed = Governed::start(policy, "select 1", "");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload.txt");
    std::fs::write(&file, "uploaded").unwrap();
    let (ok, text) = through_agent(&governed, &format!("\\lo_import {}", file.display()));
    assert!(!ok, "{text}");
    assert!(
        text.contains("denied by rule \"no-large-object-writes\""),
        "{text}"
    );
    assert_eq!(
        governed.server("select count(*) from pg_largeobject_metadata"),
        "0",
        "the refused import left a large object"
    );

    // An object made on the server is read back through the agent.
    let oid = governed.server("select lo_from_bytea(0, 'stored'::bytea)");
    let out = dir.path().join("download.txt");
    let (ok, text) = through_agent(&governed, &format!("\\lo_export {oid} {}", out.display()));
    assert!(ok, "{text}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "stored");
    let decided: Vec<String> = governed
        .agent
        .log_lines()
        .iter()
        .filter_map(|l| l["text"].as_str().map(str::to_owned))
        .filter(|t| t.starts_with("FunctionCall"))
        .collect();
    assert!(
        decided.contains(&"FunctionCall pg_catalog.loread (oid 954)".to_owned()),
        "{decided:?}"
    );
}

/// Text the analysis cannot parse is refused by the default; the client
/// gets the server's own syntax error (message and position, so psql shows
/// the same caret), and nothing of the text runs. Text with backslashes
/// under `standard_conforming_strings = off` is read as the server reads it.
#[test]
fn unparsable_text_gets_the_servers_syntax_error_and_never_runs() {
    let governed = Governed::start("[defaults]\naction = \"allow\"\n", SCHEMA, "");
    for sql in [
        "SELECT CAST('42' AS text COLLATE \"C\")",
        "create table foo (with baz)",
        "SELECT 1; SELECT * FROM rank() OVER (ORDER BY random())",
    ] {
        let direct = psql_command(governed.pg.port, sql).output().unwrap();
        let (ok, through) = through_agent(&governed, sql);
        assert!(!ok, "{sql}: {through}");
        assert_eq!(
            String::from_utf8_lossy(&direct.stderr),
            through,
            "{sql}: the agent's answer differs from the server's"
        );
        assert!(through.contains("LINE 1:"), "{through}");
    }
    assert_eq!(
        governed.server("select count(*) from pg_class where relname = 'foo'"),
        "0"
    );

    // Under standard_conforming_strings = off the server reads backslashes
    // in plain literals as escapes, and so does the analysis: the text is
    // one SELECT of one literal, answered as the server answers it, and
    // the DROP inside the literal never runs.
    let sql = "select 'a\\'; drop table secrets; --'";
    let run = |port| {
        psql_command(port, "set standard_conforming_strings = off")
            .args(["-c", sql])
            .output()
            .unwrap()
    };
    let (direct, through) = (run(governed.pg.port), run(governed.port));
    assert!(through.status.success(), "{through:?}");
    assert_eq!(direct.stdout, through.stdout);
    assert!(
        String::from_utf8_lossy(&through.stdout).contains("a'; drop table secrets; --"),
        "{through:?}"
    );
    assert_eq!(
        governed.server("select to_regclass('secrets') is not null"),
        "t"
    );
    let refused = governed
        .agent
        .log_lines()
        .iter()
        .filter(|l| l["statement_action"] == "deny" && l["text"] == "create table foo (with baz)")
        .count();
    assert_eq!(refused, 1, "the refusal is logged as unparsable");
}

/// An error the server raises in a statement that reads masked columns may
/// quote a value: its text is withheld (the SQLSTATE stays), in the simple
/// and the extended protocol.
#[test]
fn error_messages_of_masked_statements_do_not_quote_masked_values() {
    let governed = Governed::start(POLICY, SCHEMA, "");
    let (ok, text) = through_agent(&governed, "SELECT email::int FROM customers");
    assert!(!ok, "{text}");
    assert!(!text.contains("@example.com"), "leaked: {text}");
    assert!(
        text.contains("withheld") && text.contains("22P02"),
        "{text}"
    );
    // The session goes on, masked.
    let (ok, text) = through_agent(&governed, "SELECT email FROM customers ORDER BY id");
    assert!(ok && !text.contains("@example.com"), "{text}");

    // The extended protocol (psycopg binds a parameter: Parse/Bind/Execute).
    let script = r#"
import sys, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
try:
    conn.execute("SELECT email::int FROM customers WHERE id = %s", (1,))
    print("ran")
except psycopg.Error as e:
    print("error", e.sqlstate, str(e).replace("\n", " "))
print(conn.execute("SELECT count(*) FROM customers WHERE id = %s", (1,)).fetchone()[0])
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=10",
            governed.port
        ))
        .output()
        .unwrap();
    let stdout = succeeded(&out);
    assert!(!stdout.contains("@example.com"), "leaked: {stdout}");
    assert!(stdout.contains("error 22P02"), "{stdout}");
    assert!(stdout.contains("withheld"), "{stdout}");
    assert!(stdout.trim_end().ends_with('1'), "{stdout}");
}
