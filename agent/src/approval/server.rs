//! `tollgate review-server`: the reviewer API and web page for a whole
//! fleet, served from the shared approvals store (`[shared_approvals]`).
//!
//! It serves the same API as an agent's reviewer socket and TLS listener
//! (the same authentication, the same N-of-M and segregation-of-duties
//! checks, by the same code), over a registry filled from the database
//! rather than from sessions. It holds no statement: each approval or
//! denial is written back to the database, where the agent holding the
//! statement picks it up. A grant given here is kept in the review
//! server's grant store and written to the database, from where every
//! agent takes it in (and a revocation, either way).

use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{api, shared, Registry};
use crate::accept::{Endpoint, EndpointCounters, WhenFull};
use crate::config::Config;

/// Runs the review server until SIGTERM or SIGINT; SIGHUP reloads the
/// policy (whose review rules' approver groups may use the API).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let settings = config.shared_approvals.clone().context(
        "the review server needs a [shared_approvals] section naming the fleet's approvals database",
    )?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let policy = crate::policy::SharedPolicy::new(crate::agent::load_policy(&config)?);
    let registry = Arc::new(Registry::new(config.reviewers.clone()));
    let tokens = Arc::new(super::tokens::TokenStore::new(
        config.agent.approvals_tokens.clone(),
    ));
    let socket = super::bind_socket(&config.agent)?;
    let tls = super::bind_tls_listener(&config.agent, &tokens).await?;
    let grants = Arc::new(super::GrantStore::open(
        &config.agent.approvals_store,
        std::time::SystemTime::now(),
    )?);
    let state = Arc::new(api::ApiState {
        registry: registry.clone(),
        grants: grants.clone(),
        identity: Arc::new(crate::identity::IdentityResolver::new()),
        policy: policy.clone(),
        reviewer_groups: config.reviewers.clone(),
        etc: std::path::PathBuf::from("/etc"),
        tokens,
        events: None,
    });
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let endpoint = |name: &'static str| {
        Endpoint::new(
            name,
            api::MAX_CONNECTIONS,
            WhenFull::Wait,
            &tasks,
            Arc::new(EndpointCounters::default()),
        )
    };
    tracing::info!(socket = %config.agent.approvals_socket.display(), "review server: reviewer socket ready");
    tasks.spawn(api::serve(
        socket,
        state.clone(),
        endpoint("reviewer"),
        stop.clone(),
    ));
    if let Some((listener, acceptor)) = tls {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "review server: reviewer API and web page at https://{addr}/");
        }
        tasks.spawn(api::serve_tls(
            listener,
            acceptor,
            state,
            endpoint("reviewer_tls"),
            stop.clone(),
        ));
    }
    tasks.spawn(super::expire_requests(registry.clone(), stop.clone()));
    tasks.spawn(shared::link_review_server(
        registry,
        grants,
        settings,
        Arc::new(shared::Link::default()),
        stop.clone(),
    ));
    tasks.close();
    tracing::info!(
        pid = std::process::id(),
        "review server ready: listing the fleet's held statements"
    );
    loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = interrupt.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = hangup.recv() => match crate::agent::load_policy(&config) {
                Ok(reloaded) => {
                    policy.replace(reloaded);
                }
                Err(e) => tracing::error!(error = %format!("{e:#}"), "SIGHUP: the policy is invalid; the one in force stays"),
            },
        }
    }
    stop.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tasks.wait()).await;
    crate::control::remove(&config.agent.approvals_socket);
    Ok(())
}
