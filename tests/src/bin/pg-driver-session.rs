//! `pg-driver-session HOST PORT`: a tokio-postgres session, for tests that
//! run it where a real application would run (through a listener, or under
//! `tollgate exec` so that it takes the redirect), against the drivers
//! schema and policy of the e2e tests: binary parameters through prepared
//! statements, a refused statement in the extended protocol, and a refusal
//! inside a transaction. It panics (exit code 101) at the first step that
//! does not go as expected and prints one line per part that did.
#![allow(clippy::expect_used, clippy::panic)]

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(host), Some(port)) = (args.next(), args.next()) else {
        panic!("usage: pg-driver-session HOST PORT");
    };

    let (client, connection) = tokio_postgres::connect(
        &format!("host={host} port={port} user=postgres dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("the step succeeds");
    tokio::spawn(connection);

    // Binary parameters of several types through a prepared statement.
    let insert = client
        .prepare("insert into items (id, name, payload, at) values ($1, $2, $3, now())")
        .await
        .expect("the step succeeds");
    for i in 0..20i32 {
        let payload: Vec<u8> = (0..=255u8).cycle().take(1000 + i as usize).collect();
        let n = client
            .execute(&insert, &[&i, &format!("item {i}"), &payload])
            .await
            .expect("the step succeeds");
        assert_eq!(n, 1);
    }
    let rows = client
        .query(
            "select id, name, length(payload) from items where id >= $1 order by id",
            &[&15i32],
        )
        .await
        .expect("the step succeeds");
    assert_eq!(rows.len(), 5);
    let (id, name, len): (i32, String, i32) = (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert_eq!((id, name.as_str(), len), (15, "item 15", 1015));
    let doubled: i32 = client
        .query_one("select double_it($1)", &[&21i32])
        .await
        .expect("the step succeeds")
        .get(0);
    assert_eq!(doubled, 42);

    // A denied statement in the extended protocol: a clean error with the
    // rule's message and SQLSTATE 42501; the connection stays usable.
    let err = client
        .query("select value from secrets where id = $1", &[&1i32])
        .await
        .expect_err("the statement is refused");
    let db = err.as_db_error().expect("a server-style error");
    assert_eq!(db.code().code(), "42501");
    assert!(db.message().contains("protect-secrets"), "{}", db.message());
    assert!(
        db.message().contains("the secrets table is off limits"),
        "{}",
        db.message()
    );
    let n: i64 = client
        .query_one("select count(*) from items", &[])
        .await
        .expect("the step succeeds")
        .get(0);
    assert_eq!(n, 20);
    println!("binary parameters: ok");
    println!("denied: {}", db.code().code());

    // Inside a transaction the denial fails the transaction, as a
    // server error would: the earlier insert is rolled back.
    client
        .batch_execute("begin")
        .await
        .expect("the step succeeds");
    client
        .execute("insert into items (id, name) values (100, 'in tx')", &[])
        .await
        .expect("the step succeeds");
    assert!(client.query("select * from secrets", &[]).await.is_err());
    let aborted = client
        .query("select 1", &[])
        .await
        .expect_err("the statement is refused");
    assert_eq!(
        aborted.as_db_error().map(|e| e.code().code()),
        Some("25P02")
    );
    client
        .batch_execute("rollback")
        .await
        .expect("the step succeeds");
    let n: i64 = client
        .query_one("select count(*) from items where id = 100", &[])
        .await
        .expect("the step succeeds")
        .get(0);
    assert_eq!(n, 0);
    println!("in a transaction: 25P02, rolled back");
}
