//! `pg-cancel-probe HOST PORT`: a client that cancels its own queries with
//! hand-made CancelRequests, for tests that run it where a real client
//! would run (e.g. under `tollgate exec`, so that its session, its cancel
//! connections and its monitoring session all take the redirect).
//!
//! Once its query `select 'slept' from pg_sleep(1.5)` is running it sends
//! two forged keys (a foreign pid; its own pid with a wrong secret); once
//! `select pg_sleep(30)` is running it sends the key it was given. It
//! prints, one per line: its pid, the first query's outcome, the second's,
//! and how many milliseconds the second took after its cancel was sent.
#![allow(clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use tollgate_tests::pg_wire::{cancel_request, RawSession};

/// Waits until the server runs a query on backend `backend_pid`, so that a
/// cancel cannot arrive before there is anything to cancel.
fn wait_until_running(monitor: &mut RawSession, backend_pid: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let sql = format!("select state from pg_stat_activity where pid = {backend_pid}");
    while monitor.query(&sql) != Ok(vec!["active".to_string()]) {
        assert!(
            Instant::now() < deadline,
            "backend {backend_pid} never ran the query"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(host), Some(port), None) = (args.next(), args.next(), args.next()) else {
        panic!("usage: pg-cancel-probe HOST PORT");
    };
    let port: u16 = port.parse().expect("PORT is a TCP port number");
    let server = (host.as_str(), port);
    println!("pid {}", std::process::id());

    let mut session = RawSession::start(server);
    let mut monitor = RawSession::start(server);
    let (pid, secret) = session.key.clone();
    let backend_pid = session
        .query("select pg_backend_pid()")
        .expect("asking the backend's pid")
        .pop()
        .expect("pg_backend_pid() returns a row");

    session.send_query("select 'slept' from pg_sleep(1.5)");
    wait_until_running(&mut monitor, &backend_pid);
    cancel_request(server, pid ^ 0x5a5a_5a5a, &secret);
    let mut wrong = secret.clone();
    *wrong.first_mut().expect("the cancel secret is not empty") ^= 0xff;
    cancel_request(server, pid, &wrong);
    println!("forged keys: {:?}", session.results());

    session.send_query("select pg_sleep(30)");
    wait_until_running(&mut monitor, &backend_pid);
    let began = Instant::now();
    cancel_request(server, pid, &secret);
    println!("own key: {:?}", session.results());
    println!("ms after cancel: {}", began.elapsed().as_millis());
}
