//! `pg-param-query HOST PORT SQL N`: runs `SQL` with the one integer
//! parameter `N` through tokio-postgres (Parse of a named statement, then
//! Bind and Execute), for tests that run a Rust driver where an application
//! would run. Prints the first column of each row (an integer), or
//! `error SQLSTATE MESSAGE` when the statement fails (exit code 1).
#![allow(clippy::expect_used, clippy::panic)]

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [host, port, sql, n] = args.as_slice() else {
        panic!("usage: pg-param-query HOST PORT SQL N");
    };
    let n: i32 = n.parse().expect("N is an integer");
    let (client, connection) = tokio_postgres::connect(
        &format!("host={host} port={port} user=postgres dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connected");
    tokio::spawn(connection);
    match client.query(sql.as_str(), &[&n]).await {
        Ok(rows) => {
            for row in rows {
                let value: i32 = row.get(0);
                println!("{value}");
            }
        }
        Err(e) => {
            let (code, message) = e
                .as_db_error()
                .map(|d| (d.code().code().to_owned(), d.message().to_owned()))
                .unwrap_or_else(|| ("-".to_owned(), e.to_string()));
            println!("error {code} {message}");
            std::process::exit(1);
        }
    }
}
