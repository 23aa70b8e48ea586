//! Tollgate's agent: a proxy that governs how automated actors (CI jobs, AI
//! coding agents) reach production systems.
//!
//! Layout, in the order data flows:
//! - [`config`]: the TOML configuration, validated with file:line errors.
//! - [`agent`]: start and shutdown; wires every room below together.
//! - [`accept`]: the one bounded accept loop every endpoint is served by.
//! - [`proxy`]: the listeners' and the redirect port's sessions: set-up,
//!   identity and upstream, then the protocol's handler.
//! - [`redirect`]: the eBPF redirect, governed cgroups and `tollgate exec`.
//! - [`identity`]: which process (and CI job) is behind a connection, from /proc.
//! - [`protocol`]: one handler per protocol (`postgres`, the opaque `tcp`
//!   relay) behind the `Handler` trait.
//! - [`sql`], [`policy`]: what a statement does, and what the policy decides.
//! - [`approval`]: statements held for human review, reviewers, grants,
//!   and the reviewer API.
//! - [`masking`]: which result columns `mask` rules hide, and how.
//! - [`events`]: the session event stream every consumer reads from.
//! - [`recording`]: sessions as hash-chained recording files, and reading them back.
//! - [`metrics`], [`control`]: Prometheus endpoint and the status socket.
//! - [`cli`], [`logging`]: the command line and log set-up.

pub mod accept;
pub mod agent;
pub mod approval;
pub mod cli;
pub mod config;
pub mod control;
pub mod events;
pub mod identity;
pub mod intervene;
pub mod jobs;
pub mod located;
pub mod logging;
pub mod masking;
pub mod metrics;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod recording;
pub mod redirect;
pub mod sql;
