//! `mysql-driver-session HOST PORT`: a mysql_async session against the
//! MySQL e2e tests' schema and policy (`customers` with a masked `email`,
//! a denied `secrets`, a writable `t`), run where a real application would
//! run: through a listener, or under `tollgate exec` so that it takes the
//! redirect. Server-side prepared statements with binary parameters and
//! binary rows, a masked column, a refused statement, and a refusal inside
//! a transaction. It panics (exit code 101) at the first step that does
//! not go as expected and prints one line per part that did.
#![allow(clippy::expect_used, clippy::panic)]

use mysql_async::prelude::*;
use mysql_async::{Conn, Error, OptsBuilder, TxOpts};

/// Asserts `result` is the agent's refusal naming `rule`.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, Error>, rule: &str) {
    match result {
        Err(Error::Server(e)) => {
            assert_eq!(e.code, 1142, "{e:?}");
            assert_eq!(e.state, "42000", "{e:?}");
            assert!(e.message.contains(&format!("rule \"{rule}\"")), "{e:?}");
        }
        other => panic!("not refused: {other:?}"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(host), Some(port)) = (args.next(), args.next()) else {
        panic!("usage: mysql-driver-session HOST PORT");
    };
    let opts = OptsBuilder::default()
        .ip_or_hostname(host)
        .tcp_port(port.parse().expect("a port number"))
        .prefer_socket(false)
        .user(Some("app"))
        .pass(Some("secret"))
        .db_name(Some("shop"));
    let mut conn = Conn::new(opts).await.expect("the step succeeds");

    // Binary parameters through a prepared statement, executed many times.
    for x in 0..20i32 {
        conn.exec_drop("INSERT INTO t (x) VALUES (?)", (x,))
            .await
            .expect("the step succeeds");
    }
    let sum: Option<i64> = conn
        .exec_first(
            "SELECT CAST(SUM(x) AS SIGNED) FROM t WHERE x >= ?",
            (10i32,),
        )
        .await
        .expect("the step succeeds");
    assert_eq!(sum, Some(145));
    println!("prepared statements with binary parameters: ok");

    // Binary rows with a masked column; the others as the server sent them.
    let rows: Vec<(i32, String, Option<String>)> = conn
        .exec(
            "SELECT id, name, email FROM customers WHERE id >= ? ORDER BY id",
            (1i32,),
        )
        .await
        .expect("the step succeeds");
    assert_eq!(
        rows,
        vec![
            (1, "Ada".to_owned(), Some("****".to_owned())),
            (2, "Alan".to_owned(), Some("****".to_owned())),
        ]
    );
    // The same through the text protocol.
    let rows: Vec<(i32, String)> = conn
        .query("SELECT id, email FROM customers ORDER BY id")
        .await
        .expect("the step succeeds");
    assert_eq!(rows, vec![(1, "****".to_owned()), (2, "****".to_owned())]);
    println!("masked binary and text rows: ok");

    // A refused statement, prepared and as text; the connection goes on.
    assert_refused(
        conn.exec::<String, _, _>("SELECT s FROM secrets WHERE 1 = ?", (1i32,))
            .await,
        "protect-secrets",
    );
    assert_refused(
        conn.query::<String, _>("SELECT s FROM secrets").await,
        "protect-secrets",
    );
    let one: Option<i32> = conn
        .query_first("SELECT 1")
        .await
        .expect("the step succeeds");
    assert_eq!(one, Some(1));
    println!("refusals as server errors, the connection usable: ok");

    // A refusal inside a transaction leaves it open, as any statement
    // error does in MySQL: what came before and after it commits.
    let mut tx = conn
        .start_transaction(TxOpts::default())
        .await
        .expect("the step succeeds");
    tx.exec_drop("INSERT INTO t (x) VALUES (?)", (100i32,))
        .await
        .expect("the step succeeds");
    assert_refused(tx.query_drop("DROP TABLE customers").await, "no-drop");
    tx.exec_drop("INSERT INTO t (x) VALUES (?)", (101i32,))
        .await
        .expect("the step succeeds");
    tx.commit().await.expect("the step succeeds");
    let n: Option<i64> = conn
        .query_first("SELECT COUNT(*) FROM t WHERE x >= 100")
        .await
        .expect("the step succeeds");
    assert_eq!(n, Some(2));
    println!("a refusal inside a transaction: ok");

    conn.disconnect().await.expect("the step succeeds");
}
