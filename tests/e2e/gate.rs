//! The statement gate against a hostile (or merely unusual) client: the
//! message orderings real drivers use are not refused, and no ordering lets
//! a statement run other than as it was decided.

use std::process::Command;

use tollgate_tests::pg_wire::{self, RawSession};
use tollgate_tests::*;

const POLICY: &str = r#"
[defaults]
action = "allow"

[[rule]]
name = "mask-contact"
action = "mask"
message = "contact details are personal data"
mask_columns = ["customers.email"]

[[rule]]
name = "protect-secrets"
action = "deny"
message = "the secrets table is off limits"
[rule.match]
tables = ["secrets"]
"#;

const SCHEMA: &str = "create table customers (id int primary key, name text, email text);
insert into customers values (1, 'Ada', 'ada@example.com'), (2, 'Alan', 'alan@example.com');
create table orders (id int primary key, customer_id int, total numeric);
create table secrets (id int, value text); insert into secrets values (1, 'hunter2');";

fn setup() -> Governed {
    Governed::start(POLICY, SCHEMA, "")
}

/// psycopg ends every pipeline and every `executemany` with Sync then
/// Flush; the Flush must not count as the start of a new batch, or the
/// next masked statement is refused, and inside a transaction the refusal
/// rolls back what `executemany` wrote.
#[test]
fn a_flush_after_sync_does_not_make_the_next_masked_statement_pipelined() {
    let g = setup();
    let script = format!(
        r#"
import psycopg
conn = psycopg.connect("host=127.0.0.1 port={port} user=postgres dbname=postgres")
cur = conn.cursor()
cur.executemany("insert into orders (id, customer_id, total) values (%s, %s, %s)", [(i, 1, i) for i in range(1, 4)])
cur.execute("select id, email from customers where id = %s", (1,))
print(cur.fetchall())
conn.commit()
with conn.pipeline():
    cur.execute("insert into orders (id, customer_id, total) values (%s, %s, %s)", (10, 2, 5))
    cur.execute("insert into orders (id, customer_id, total) values (%s, %s, %s)", (11, 2, 5))
cur.execute("select id, email from customers where id = %s", (2,))
print(cur.fetchall())
conn.commit()
with conn.transaction():
    cur.executemany("insert into orders (id, customer_id, total) values (%s, %s, %s)", [(20, 1, 1), (21, 1, 1)])
    cur.execute("select email from customers where id = %s", (1,), prepare=True)
    print(cur.fetchall())
"#,
        port = g.port
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = succeeded(&out);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["[(1, '****')]", "[(2, '****')]", "[('****',)]"],
        "{stdout}"
    );
    // Every row the client committed is there.
    assert_eq!(
        g.server("select string_agg(id::text, ',' order by id) from orders"),
        "1,2,3,10,11,20,21"
    );
    assert!(
        !g.agent.log_text().contains("pipelining"),
        "{}",
        g.agent.log_text()
    );
}

/// The same on the wire: Sync then Flush, then a masked Parse, Bind,
/// Describe, Execute and Sync, in a transaction block; answered in its
/// own write and pipelined behind it in the same write.
#[test]
fn a_raw_sync_and_flush_then_a_masked_batch_is_masked_not_refused() {
    let g = setup();
    let mut s = RawSession::start(g.addr());
    assert_eq!(s.query("begin"), Ok(vec![]));
    let insert = |id: &str| {
        [
            pg_wire::parse(
                "",
                "insert into orders (id, customer_id, total) values ($1, 1, 1)",
            ),
            pg_wire::bind("", "", &[id]),
            pg_wire::execute(""),
            pg_wire::sync(),
            pg_wire::flush(),
        ]
        .concat()
    };
    let select = [
        pg_wire::parse("", "select id, email from customers where id = $1"),
        pg_wire::bind("", "", &["1"]),
        pg_wire::describe_portal(""),
        pg_wire::execute(""),
        pg_wire::sync(),
    ]
    .concat();
    // In two writes, the first answered before the second is sent.
    s.send(&insert("30"));
    let got = s.read_until_ready(1);
    assert_eq!(pg_wire::errors(&got), vec![]);
    s.send(&select);
    let got = s.read_until_ready(1);
    assert_eq!(pg_wire::errors(&got), vec![]);
    assert_eq!(pg_wire::rows(&got), ["1|****"]);
    assert_eq!(pg_wire::statuses(&got), "T");
    // In one write: the masked batch waits for the first one's answer.
    s.send(&[insert("31"), select].concat());
    let got = s.read_until_ready(2);
    assert_eq!(pg_wire::errors(&got), vec![]);
    assert_eq!(pg_wire::rows(&got), ["1|****"]);
    assert_eq!(pg_wire::statuses(&got), "TT");
    assert_eq!(s.query("commit"), Ok(vec![]));
    assert_eq!(
        g.server("select string_agg(id::text, ',' order by id) from orders"),
        "30,31"
    );
}
