//! Masking: `mask` rules hide columns in the results real psql sessions
//! see, whatever the query does to reach them, and refuse what cannot be
//! masked.

use std::process::{Command, Output};
use std::time::Duration;

use tollgate_tests::pg_wire::{self, RawSession};
use tollgate_tests::*;

use crate::listener::{http_get, metric};

const POLICY: &str = r#"
[defaults]
action = "allow"

[[rule]]
name = "mask-contact"
action = "mask"
message = "contact details are personal data"
mask_columns = ["customers.email", "phone"]
[rule.match]
targets = ["pg"]

[[rule]]
name = "mask-birthdays"
action = "mask"
mask_with = "null"
mask_columns = ["public.customers.born"]
"#;

const SCHEMA: &str = "create table customers (id int primary key, name text, email text, phone varchar(20), born date);
insert into customers values (1, 'Ada', 'ada@example.com', '555-0101', '1815-12-10'), (2, 'Alan', 'alan@example.com', null, '1912-06-23');
create table orders (id int, customer_id int, total numeric, phone text);
insert into orders values (10, 1, 9.50, '555-0199');
create schema crm; create table crm.customers (id int, email text); insert into crm.customers values (1, 'crm@example.com');";

const ON_ERROR_STOP_ON: &str = "ON_ERROR_STOP=1";
const ON_ERROR_STOP_OFF: &str = "ON_ERROR_STOP=0";

/// [`Governed`] with [`POLICY`] and [`SCHEMA`], and a metrics endpoint.
struct Fixture {
    governed: Governed,
    metrics_port: u16,
}

impl std::ops::Deref for Fixture {
    type Target = Governed;
    fn deref(&self) -> &Governed {
        &self.governed
    }
}

impl Fixture {
    fn start() -> Fixture {
        let metrics_port = free_port();
        Fixture {
            governed: Governed::start(
                POLICY,
                SCHEMA,
                &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""),
            ),
            metrics_port,
        }
    }

    /// A psql session through the agent (unaligned, tuples only) that
    /// stops at the first error or not; the caller adds its statements.
    fn psql_session(&self, on_error_stop: &str) -> Command {
        let mut psql = Command::new(pg_tool("psql"));
        psql.args(["-X", "-A", "-t", "-v", on_error_stop])
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
            .args(["-p", &self.port.to_string()]);
        psql
    }

    /// [`Fixture::psql_session`] reading its statements from a pipe.
    fn psql_script(&self, on_error_stop: &str) -> std::process::Child {
        self.psql_session(on_error_stop)
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// psql through the agent: stdout (unaligned, tuples only) or stderr.
    fn query(&self, sql: &str) -> Result<String, String> {
        let out = psql_command(self.port, sql).output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

#[test]
fn masked_columns_are_hidden_however_they_are_reached() {
    let f = Fixture::start();
    let cases: &[(&str, &str)] = &[
        // Text is redacted, other types and `mask_with = "null"` give NULL;
        // NULL stays NULL, unmasked columns pass untouched.
        (
            "select id, name, email, phone, born from customers order by id",
            "1|Ada|****|****|\n2|Alan|****||",
        ),
        ("select email as contact from customers where id = 1", "****"),
        (
            "select x from (select email as x from customers) s order by 1 limit 1",
            "****",
        ),
        (
            "with c as (select * from customers) select c.email from c where id = 2",
            "****",
        ),
        (
            "select o.id, c.name, c.phone, o.phone from orders o join customers c on c.id = o.customer_id",
            "10|Ada|****|****",
        ),
        // Computed in a statement that reads a masked column: masked, with
        // the method of the rules whose columns it reads; otherwise as
        // computed.
        ("select upper(email) from customers where id = 1", "****"),
        ("select length(email) > 3 from customers where id = 1", ""),
        ("select count(*), max(id) from customers", "2|2"),
        (
            "select count(*) || ' customers' from customers",
            "2 customers",
        ),
        // Whole rows and JSON of them hold every column.
        ("select c from customers c where id = 1", ""),
        // (NULL: `mask-birthdays` names a column of them too, and its
        // method is the stricter.)
        ("select row_to_json(c)::text from customers c where id = 1", ""),
        // Tables the rules do not name are untouched; `phone` has no table
        // in its spec, so it is masked in every table.
        ("select total, phone from orders", "9.50|****"),
        ("select 'ada@example.com'", "ada@example.com"),
    ];
    for (sql, want) in cases {
        assert_eq!(f.query(sql).as_deref(), Ok(*want), "{sql}");
    }
    // The data itself is unchanged.
    assert_eq!(
        psql(f.pg.port, "select email, born from customers where id = 1").unwrap(),
        "ada@example.com|1815-12-10"
    );
    // Every masked statement is logged with its rule.
    let logged = f.agent.wait_for_statement("mask", "rule", "mask-contact");
    assert_eq!(logged["command"], "SELECT", "{logged}");
    assert_eq!(logged["level"], "INFO", "{logged}");
    // Prometheus counts the decisions and the values masked: the cases
    // above masked 15 values (NULLs stay NULL and are not counted).
    let metrics = http_get(f.metrics_port, "/metrics");
    assert_eq!(
        metric(&metrics, "tollgate_masked_values_total{target=\"pg\"}"),
        15.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "tollgate_statements_total{target=\"pg\",action=\"mask\"}"
        ),
        12.0,
        "{metrics}"
    );
}

#[test]
fn several_statements_transactions_and_errors() {
    let f = Fixture::start();
    // One message, several results: each statement masked as its own (a
    // value computed in a statement that reads `email` is masked, since
    // the server does not say what it was computed from).
    assert_eq!(
        f.query("select count(*) from orders; select email, upper(name) from customers where id = 1; select 'plain'")
            .as_deref(),
        Ok("1\n****|****\nplain")
    );
    // Inside a transaction block, and after a failed one.
    let out = f
        .psql_session(ON_ERROR_STOP_OFF)
        .args([
            "-c",
            "begin",
            "-c",
            "select email from customers where id = 1",
            "-c",
            "select 1/0",
            "-c",
            "select email from customers where id = 1",
            "-c",
            "rollback",
            "-c",
            "select email from customers where id = 2",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out), String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout, "BEGIN\n****\nROLLBACK\n****", "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("ERROR")).collect();
    assert_eq!(
        errors,
        [
            "ERROR:  division by zero",
            "ERROR:  current transaction is aborted, commands ignored until end of transaction block"
        ],
        "{stderr}"
    );
    // A search path changed earlier in the same message: the lookup finds
    // the table the statement reads in whichever schema it is.
    let out = f
        .query("set search_path = crm, public; select email from customers")
        .unwrap();
    assert_eq!(out.lines().last(), Some("****"), "{out}");
    assert!(!out.contains("crm@"), "{out}");
    // The lookup in front of a lone masked statement resolves its tables
    // on the session's search path, as the statement will: a search path
    // set by an earlier message, a temporary table that shadows, a schema
    // the statement names.
    let out = f
        .psql_session(ON_ERROR_STOP_ON)
        .args([
            "-c",
            "set search_path = crm, public",
            "-c",
            "select email from customers",
            "-c",
            "create temp table customers (id int, email text)",
            "-c",
            "insert into customers values (3, 'temp@example.com')",
            "-c",
            "select id, email from customers",
            "-c",
            "select email from crm.customers",
            "-c",
            "select email from public.customers where id = 1",
        ])
        .output()
        .unwrap();
    assert_eq!(
        text(&out),
        "SET\n****\nCREATE TABLE\nINSERT 0 1\n3|****\n****\n****",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An error in a masked statement points into the client's own text.
    let err = f.query("select id, emial from customers").unwrap_err();
    assert!(
        err.contains("ERROR:  column \"emial\" does not exist\nLINE 1: select id, emial from customers\n                   ^"),
        "{err}"
    );
    // A client cannot pass its results off as the lookup's.
    assert_eq!(
        f.query("select email as \"tollgate_mask_0000000000000000_1\" from customers where id = 1")
            .as_deref(),
        Ok("****")
    );
}

#[test]
fn a_plain_query_of_one_table_is_masked_by_the_names_the_server_gives_its_fields() {
    let f = Fixture::start();
    // A query of one table whose result fields keep their columns' names
    // goes to the server as it is, with no lookup in front: the server's
    // RowDescription names every field it takes from a table column.
    let script = r#"
select id, email, phone from customers where id = 1;
select * from customers where id = 2;
select "email", c.phone, (c).born from customers c where id = 1;
select email from crm.customers;
select count(*) from pg_prepared_statements;
"#;
    let out = run_script(&f, script);
    assert_eq!(
        out, "1|****|****\n2|Alan|****||\n****|****|\n****\n0",
        "no lookup was prepared"
    );
    // Every way a query of one table can give a masked column another
    // name is masked too (those queries take the lookup).
    let cases: &[(&str, &str)] = &[
        ("select email as x from customers where id = 1", "****"),
        (
            "select (c).email as x from customers c where id = 1",
            "****",
        ),
        (
            "select email::text as x from customers where id = 1",
            "****",
        ),
        ("select x from customers as c(i, n, x) where i = 1", "****"),
        ("table customers limit 1", "1|Ada|****|****|"),
    ];
    for (sql, want) in cases {
        assert_eq!(f.query(sql).as_deref(), Ok(*want), "{sql}");
    }
    // `email(c)` is `c.email` to the server; to the analysis it is a call
    // of a function that is not a side-effect-free built-in: refused.
    for sql in [
        "select email(c) as x from customers c where id = 1",
        "select email(customers) as x from customers where id = 1",
    ] {
        let err = f.query(sql).unwrap_err();
        assert!(
            err.contains("masking cannot follow a masked value through email()"),
            "{sql}: {err}"
        );
    }
    // Names are the server's, at the moment the statement runs: a column
    // renamed by another session between two statements is masked by its
    // new name, and the one renamed to the masked name is masked.
    let script = r#"
select name, email from customers where id = 1;
select pg_sleep(1);
select email from customers where id = 1;
select contact from customers where id = 1;
"#;
    let mut child = f.psql_script(ON_ERROR_STOP_ON);
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, script.as_bytes()).unwrap();
    drop(stdin);
    std::thread::sleep(Duration::from_millis(300));
    psql(
        f.pg.port,
        "alter table customers rename column email to contact; alter table customers rename column name to email",
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        text(&out),
        "Ada|****\n\n****\nada@example.com",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    psql(
        f.pg.port,
        "alter table customers rename column email to name; alter table customers rename column contact to email",
    )
    .unwrap();
    // A temporary table and a search path resolve the table the server
    // reads; the rules match it by the name written.
    let script = r#"
set search_path = crm, public;
select id, email from customers;
create temp table customers (id int, email text);
insert into customers values (3, 'temp@example.com');
select id, email from customers;
select email from public.customers where id = 1;
"#;
    assert_eq!(
        run_script(&f, script),
        "SET\n1|****\nCREATE TABLE\nINSERT 0 1\n3|****\n****"
    );
}

/// `script` through one psql session that stops at its first error.
fn run_script(f: &Fixture, script: &str) -> String {
    let mut child = f.psql_script(ON_ERROR_STOP_ON);
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text(&out)
}

#[test]
fn the_prepared_lookup_survives_what_clients_do_with_prepared_statements() {
    let f = Fixture::start();
    // One psql session, one statement per message: the lookup in front of
    // each masked one is the session's prepared statement (an alias on a
    // column needs the lookup: see
    // `a_plain_query_of_one_table_is_masked_by_the_names_the_server_gives_its_fields`).
    let script = r#"
select email as e from customers where id = 1;
select count(*) from pg_prepared_statements where name ~ '^tollgate_mask_[0-9a-f]{16}_s0$';
deallocate all;
select email as e from customers where id = 1;
discard all;
select email as e from customers where id = 2;
begin;
select email as e from customers where id = 1;
rollback;
select email as e from customers where id = 2;
prepare tollgate_mask_mine as select 1;
select name from pg_prepared_statements \gset
deallocate :"name";
select email as e from customers where id = 1;
select email as e from customers where id = 1;
select count(*) from pg_prepared_statements where name ~ '_s1$';
"#;
    let mut child = f.psql_script(ON_ERROR_STOP_OFF);
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Deallocated by the client, in or out of a transaction: prepared
    // again; a rolled back transaction keeps it.
    assert_eq!(
        text(&out),
        "****\n1\nDEALLOCATE ALL\n****\nDISCARD ALL\n****\nBEGIN\n****\nROLLBACK\n****\nDEALLOCATE\n****\n1",
        "{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    // A client cannot put its own statement under the lookup's name...
    assert!(
        errors[0].contains("tollgate: prepared statement names starting with tollgate_mask_ are reserved for the proxy's masking; refused"),
        "{stderr}"
    );
    // ...and one that deallocated it gets an error, once, not unmasked rows.
    assert!(
        errors[1].contains("prepared statement \"tollgate_mask_")
            && errors[1].contains("does not exist"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("@example.com"));
}

#[test]
fn what_cannot_be_masked_is_refused() {
    let f = Fixture::start();
    let refused = |sql: &str, command: &str, why: &str| {
        let err = f.query(sql).unwrap_err();
        let want = format!(
            "ERROR:  tollgate: {command} requires masking by rule \"mask-contact\" (contact details are personal data), and {why}; refused"
        );
        assert!(err.contains(&want), "{sql}: {err}");
    };
    let only_queries = "masking applies only to queries that write nothing";
    refused("copy customers to stdout", "COPY", only_queries);
    // Logged as refused, like a denial.
    let logged = f.agent.wait_for_statement("mask", "command", "COPY");
    assert_eq!(logged["level"], "WARN", "{logged}");
    refused(
        "create table leak as select * from customers",
        "CREATE TABLE AS",
        only_queries,
    );
    refused(
        "update customers set name = name where id = 1 returning email",
        "UPDATE",
        only_queries,
    );
    refused(
        "select 1; insert into orders select id, id, 0, phone from customers",
        "INSERT",
        only_queries,
    );
    assert_eq!(
        psql(f.pg.port, "select to_regclass('leak') is null").unwrap(),
        "t"
    );
    // Writes without RETURNING are not masking's business.
    assert_eq!(
        f.query("update customers set name = 'Ada L.' where id = 1")
            .as_deref(),
        Ok("UPDATE 1")
    );
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn raw_recordings_hold_the_masked_rows_the_client_received() {
    let pg = Postgres::start();
    psql(pg.port, SCHEMA).unwrap();
    let policy = policy_file(POLICY);
    let port = free_port();
    let config = listener_config(port, pg.port, &policy.line).replace(
        "protocol = \"postgres\"\n",
        "protocol = \"postgres\"\nrecord_raw = true\n",
    );
    let agent = Agent::start(&config);
    assert_eq!(
        psql(port, "select name, email from customers where id = 1").unwrap(),
        "Ada|****"
    );
    // The session's recording, once closed: the raw server stream holds
    // the masked row and never the value.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let recording = loop {
        let files = recording_files(&agent.recordings());
        let closed = files
            .iter()
            .map(|f| std::fs::read(f).unwrap())
            .find(|bytes| contains(bytes, b"completed"));
        if let Some(bytes) = closed {
            break bytes;
        }
        assert!(std::time::Instant::now() < deadline, "no closed recording");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(contains(&recording, b"Ada"), "the raw rows are recorded");
    assert!(contains(&recording, b"****"));
    assert!(!contains(&recording, b"ada@example.com"));
}

fn recording_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(recording_files(&path));
        } else if path.extension().is_some_and(|e| e == "tgrec") {
            files.push(path);
        }
    }
    files
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Drivers send statements through the extended protocol: tokio-postgres
/// (prepare, then bind and execute, binary results), psycopg 3 (all in one
/// batch, text and binary) and pgbench's extended and prepared modes.
/// psycopg's `pipeline()` sends every statement of the block in one batch
/// with one Sync at the end: a masked statement behind unmasked ones is
/// masked where it stands (its lookup sent in front of it inside the
/// batch), and the batch's transaction is the server's.
#[test]
fn a_masked_statement_in_the_middle_of_a_pipeline_is_masked() {
    let f = Fixture::start();
    let script = format!(
        r#"
import psycopg
dsn = "host=127.0.0.1 port={port} user=postgres dbname=postgres"
with psycopg.connect(dsn, autocommit=True) as conn:
    with conn.pipeline():
        one = conn.execute("select 1")
        everyone = conn.execute("select id, email from customers order by id")
        shouted = conn.execute("select upper(email) from customers where id = %s", (1,))
        phone = conn.execute("select phone from orders where id = %s", (10,))
    print(one.fetchall(), everyone.fetchall(), shouted.fetchall(), phone.fetchall())
# In a transaction: the insert before the masked read and the one after it
# are committed with it.
with psycopg.connect(dsn) as conn:
    with conn.pipeline():
        conn.execute("insert into orders values (%s, 1, 1.00, null)", (11,))
        masked = conn.execute("select email from customers where id = %s", (2,))
        conn.execute("insert into orders values (%s, 1, 2.00, null)", (12,))
    print(masked.fetchall())
    conn.commit()
# An error before the masked statement: the server's own, and the batch
# skips to its Sync as the server would have it.
with psycopg.connect(dsn, autocommit=True) as conn:
    try:
        with conn.pipeline():
            conn.execute("select 1/0")
            conn.execute("select email from customers")
    except psycopg.errors.DivisionByZero as e:
        print("error:", e.diag.sqlstate, e.diag.message_primary)
    print(conn.execute("select email from customers where id = 1").fetchall())
"#,
        port = f.port
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = succeeded(&out);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "[(1,)] [(1, '****'), (2, '****')] [('****',)] [('****',)]",
            "[('****',)]",
            "error: 22012 division by zero",
            "[('****',)]",
        ],
        "{stdout}"
    );
    assert_eq!(
        psql(
            f.pg.port,
            "select string_agg(id::text, ',' order by id) from orders"
        )
        .unwrap(),
        "10,11,12"
    );
    assert!(
        !f.agent.log_text().contains("pipelining"),
        "nothing was refused as pipelined"
    );
}

#[test]
fn drivers_through_the_extended_protocol_get_masked_rows() {
    let f = Fixture::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (mut client, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                f.port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        // A new statement: Parse and Describe in one batch, Bind and
        // Execute in the next; binary results.
        let rows = client
            .query(
                "select id, name, email, born::text as born from customers where id = $1",
                &[&1i32],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, i32>("id"), 1);
        assert_eq!(rows[0].get::<_, &str>("name"), "Ada");
        assert_eq!(rows[0].get::<_, &str>("email"), "****");
        assert_eq!(rows[0].get::<_, Option<&str>>("born"), None);
        // A prepared statement run again and again.
        let statement = client
            .prepare("select email, phone from customers order by id")
            .await
            .unwrap();
        for _ in 0..3 {
            let rows = client.query(&statement, &[]).await.unwrap();
            let got: Vec<(&str, Option<&str>)> =
                rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            assert_eq!(got, [("****", Some("****")), ("****", None)]);
        }
        // Unmasked statements in the same session are untouched.
        let count: i64 = client
            .query_one("select count(*) from customers", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(count, 2);
        // An error in a masked batch, then the session goes on.
        let err = client
            .query("select email from customers where id = 1/$1", &[&0i32])
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
        );
        let rows = client
            .query("select email from customers where id = $1", &[&2i32])
            .await
            .unwrap();
        assert_eq!(rows[0].get::<_, &str>(0), "****");
        // Inside a transaction.
        let tx = client.transaction().await.unwrap();
        let row = tx
            .query_one("select upper(email) from customers where id = $1", &[&1i32])
            .await
            .unwrap();
        assert_eq!(row.get::<_, Option<&str>>(0), Some("****"));
        tx.commit().await.unwrap();
        // Pipelined: two statements in flight at once, both masked.
        let first = client.query("select email from customers where id = $1", &[&1i32]);
        let second = client.query("select email from customers where id = $1", &[&2i32]);
        let (first, second) = tokio::join!(first, second);
        for result in [first, second] {
            let rows = result.unwrap();
            assert_eq!(rows[0].get::<_, &str>(0), "****");
        }
        let rows = client
            .query("select email from customers where id = $1", &[&1i32])
            .await
            .unwrap();
        assert_eq!(rows[0].get::<_, &str>(0), "****");
    });

    // psycopg 3: Parse, Bind, Describe, Execute and Sync in one batch.
    let script = format!(
        r#"
import psycopg
conn = psycopg.connect("host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True)
cur = conn.cursor()
cur.execute("select id, email from customers where id = %s", (1,))
print(cur.fetchall())
cur.execute("select email, born from customers order by id", binary=True)
print(cur.fetchall())
cur.execute("select email from customers where id = %s", (2,), prepare=True)
cur.execute("select email from customers where id = %s", (1,), prepare=True)
print(cur.fetchall())
"#,
        port = f.port
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = succeeded(&out);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "[(1, '****')]",
            "[('****', None), ('****', None)]",
            "[('****',)]"
        ],
        "{stdout}"
    );

    // pgbench's extended and prepared modes run masked statements.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("read.sql");
    std::fs::write(&script, "select email from customers where id = 1;\n").unwrap();
    for mode in ["extended", "prepared"] {
        succeeded(
            &Command::new(pg_tool("pgbench"))
                .args(["-h", "127.0.0.1", "-U", "postgres", "-n", "-t", "20"])
                .args(["-p", &f.port.to_string(), "-M", mode, "-f"])
                .arg(&script)
                .arg("postgres")
                .output()
                .unwrap(),
        );
    }
    // And the data is what it was.
    assert_eq!(
        psql(f.pg.port, "select email from customers where id = 1").unwrap(),
        "ada@example.com"
    );
}

/// One extended-protocol statement as libpq and pgbench send it (Parse,
/// Bind, Describe, Execute, Sync), with `params` bound.
fn masked_batch(sql: &str, params: &[&str]) -> Vec<u8> {
    [
        pg_wire::parse("", sql),
        pg_wire::bind("", "", params),
        pg_wire::describe_portal(""),
        pg_wire::execute(""),
        pg_wire::sync(),
    ]
    .concat()
}

/// Sends `batch` on a raw session: its rows, after checking no error came.
fn batch_rows(s: &mut RawSession, batch: &[u8]) -> Vec<String> {
    s.send(batch);
    let got = s.read_until_ready(1);
    assert_eq!(pg_wire::errors(&got), vec![], "{got:?}");
    pg_wire::rows(&got)
}

/// Masked statements of the extended protocol (`select` of `id` and
/// `email` by `id`, `all` of `email`), each in a batch of its own, across
/// renames made by another session, a search path changed inside a batch,
/// and a temporary table that shadows the table.
fn follows_renames_search_paths_and_shadows(
    f: &Fixture,
    s: &mut RawSession,
    select: &str,
    all: &str,
) {
    // Enough runs for the server to keep a generic plan of the prepared
    // lookup in front of each.
    for _ in 0..7 {
        assert_eq!(batch_rows(s, &masked_batch(select, &["1"])), ["1|****"]);
    }
    // Renamed on a connection that does not go through the proxy: the
    // value now named `email` is masked, from the next statement on.
    f.server(
        "alter table customers rename column email to email_was; \
         alter table customers rename column name to email",
    );
    assert_eq!(batch_rows(s, &masked_batch(select, &["1"])), ["1|****"]);
    assert_eq!(
        batch_rows(
            s,
            &masked_batch("select id, email_was from customers where id = $1", &["1"])
        ),
        ["1|ada@example.com"],
        "a column no longer named by the rule is not masked"
    );
    // And another table put in the first one's place.
    f.server(
        "alter table customers rename to customers_was; \
         create table customers (id int, email text); \
         insert into customers values (1, 'new@example.com')",
    );
    assert_eq!(batch_rows(s, &masked_batch(select, &["1"])), ["1|****"]);
    // The search path changed inside the batch, between the masked Parse
    // and its Bind: the statement is analysed again at the Bind and reads
    // crm.customers, which a lookup on the search path of the Parse's
    // moment did not resolve.
    let batch = [
        pg_wire::parse("", select),
        pg_wire::parse("path", "set search_path = crm, public"),
        pg_wire::bind("path", "path", &[]),
        pg_wire::execute("path"),
        pg_wire::bind("", "", &["1"]),
        pg_wire::describe_portal(""),
        pg_wire::execute(""),
        pg_wire::sync(),
    ]
    .concat();
    assert_eq!(batch_rows(s, &batch), ["1|****"]);
    assert_eq!(
        s.query("select current_schemas(false)::text"),
        Ok(vec!["{crm,public}".to_owned()])
    );
    assert_eq!(batch_rows(s, &masked_batch(all, &[])), ["****"]);
    // A temporary table that shadows it, made through the proxy.
    assert_eq!(
        s.query(
            "create temp table customers (id int, email text); \
             insert into customers values (1, 'temp@example.com')"
        ),
        Ok(vec![])
    );
    assert_eq!(batch_rows(s, &masked_batch(select, &["1"])), ["1|****"]);
}

#[test]
fn a_plain_query_of_one_table_through_the_extended_protocol_is_masked_without_a_lookup() {
    let f = Fixture::start();
    let mut s = RawSession::start(f.addr());
    let select = "select id, email from customers where id = $1";
    follows_renames_search_paths_and_shadows(&f, &mut s, select, "select email from customers");
    assert_eq!(
        s.query("select count(*) from pg_prepared_statements where name like 'tollgate_mask_%'"),
        Ok(vec!["0".to_owned()]),
        "no lookup was prepared"
    );
}

#[test]
fn the_lookup_in_front_of_a_masked_parse_follows_renames_search_paths_and_deallocation() {
    let f = Fixture::start();
    let mut s = RawSession::start(f.addr());
    // An alias on the masked column: the statement takes the lookup.
    let select = "select id, email as e from customers where id = $1";
    follows_renames_search_paths_and_shadows(
        &f,
        &mut s,
        select,
        "select email as e from customers",
    );
    // The client deallocates every prepared statement: the lookup is
    // prepared again. Deallocated by its name: one error, then masked.
    assert_eq!(s.query("deallocate all"), Ok(vec![]));
    assert_eq!(
        batch_rows(&mut s, &masked_batch(select, &["1"])),
        ["1|****"]
    );
    let names = s
        .query("select name from pg_prepared_statements where name like 'tollgate_mask_%'")
        .unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(s.query(&format!("deallocate \"{}\"", names[0])), Ok(vec![]));
    s.send(&masked_batch(select, &["1"]));
    let got = s.read_until_ready(1);
    assert_eq!(pg_wire::errors(&got).len(), 1, "{got:?}");
    assert_eq!(pg_wire::rows(&got), Vec::<String>::new());
    assert_eq!(
        batch_rows(&mut s, &masked_batch(select, &["1"])),
        ["1|****"]
    );
    // The simple protocol shares the statement.
    assert_eq!(
        s.query("select email from customers where id = 1"),
        Ok(vec!["****".to_owned()])
    );
    assert_eq!(
        batch_rows(&mut s, &masked_batch(select, &["1"])),
        ["1|****"]
    );
}
