//! End-to-end tests: the real agent between real PostgreSQL clients and a
//! real PostgreSQL server. One binary; the harness lives in `tollgate_tests`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod allow_lists;
mod approvals;
mod brokered;
mod bypass;
mod cli;
mod drivers;
mod endpoints;
mod gate;
mod hostile_local;
mod identity_spoof;
mod jobs;
mod listener;
mod masking;
mod mysql;
mod mysql_review;
mod on_match;
mod orderings;
mod policy_source;
mod postgres;
mod protect;
mod recording;
mod redirect;
mod regress;
mod review;
mod review_notify;
mod review_web;
mod shared_approvals;
mod ssh;
mod tls;
mod upload;
