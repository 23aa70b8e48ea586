//! The approvals store a fleet shares (`[shared_approvals]`): review
//! requests in a PostgreSQL database that every agent and one
//! `tollgate review-server` reach, so that reviewers decide any host's
//! held statements from one list.
//!
//! The statement stays where it is held. The agent keeps its own registry
//! (the session waits on it, expiry and cancellation stay local) and
//! mirrors every request into `tollgate_review_requests`; the review
//! server takes the pending rows into a registry of its own, where the
//! reviewer API decides them with the same N-of-M and segregation-of-duties
//! checks, and writes each approval or denial back into the row. `NOTIFY`
//! on both sides (`tollgate_requests`, `tollgate_decisions`) carries a
//! change within milliseconds; a poll every few seconds catches what a
//! notification missed.
//!
//! Grants are fleet-wide: `tollgate_grants` holds every grant given on
//! any agent or on the review server (its subject names a target, a
//! statement shape and a CI workflow or executable, nothing of one host),
//! and every side takes the table into its own grant store, which the
//! statement path reads without a round trip. A revocation travels the
//! same way; a grant is never un-revoked. A grant given with a central
//! approval travels inside the decision too, so that it is in force on the
//! agent before the held statement runs.
//!
//! A decision counts only once it is in the database: the agent applies
//! the row's decision, never anything else, and only to a request still
//! pending here. An agent that cannot reach the database keeps its held
//! statements waiting until their timeout and reconnects; nothing is
//! approved by default.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::{api, unix_seconds, ApprovalRecord, Outcome, Registry, RequestEventKind, RequestId};
use super::{Grant, GrantStore, Merged, RequestEvent, RequestView};
use crate::config::SharedApprovalsSettings;
use crate::events::Events;

/// The tables, made on first connection by whichever side connects first
/// (under an advisory lock, so two agents starting together do not race).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tollgate_review_requests (
    id text PRIMARY KEY,
    host text NOT NULL,
    state text NOT NULL DEFAULT 'pending',
    submitted_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    view jsonb NOT NULL,
    decision jsonb,
    decided_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS tollgate_review_requests_pending
    ON tollgate_review_requests (state, expires_at);
CREATE TABLE IF NOT EXISTS tollgate_grants (
    id text PRIMARY KEY,
    given_on text NOT NULL,
    expires_at timestamptz NOT NULL,
    revoked boolean NOT NULL DEFAULT false,
    grant_record jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
";
/// An arbitrary key for `pg_advisory_xact_lock` while the schema is made.
const SCHEMA_LOCK: i64 = 0x746f_6c6c_6761_7465;
/// Agents notify this channel (payload: the request id) when a row changes.
const REQUESTS_CHANNEL: &str = "tollgate_requests";
/// The review server notifies this channel when it wrote a decision.
const DECISIONS_CHANNEL: &str = "tollgate_decisions";
/// Either side notifies this channel (payload: the grant id) when it added
/// or revoked a grant.
const GRANTS_CHANNEL: &str = "tollgate_grants";
/// How often both sides look at the table whatever the notifications say.
const POLL: Duration = Duration::from_secs(5);
/// Longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a stopping agent spends writing its last request changes.
const DRAIN: Duration = Duration::from_secs(2);

/// A reviewer's decision as the review server writes it into the row.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Enough reviewers approved.
    Approved {
        /// The reviewers whose approvals counted.
        by: Vec<String>,
        /// A reviewer's replacement text, which the policy decides again;
        /// `None`: the held statement as the agent has it.
        edit: Option<String>,
        /// Who wrote the edit.
        #[serde(default)]
        edited_by: Option<String>,
        /// The approvals, for the record.
        approvals: Vec<ApprovalRecord>,
        /// The grant the approval gave, if the reviewers asked for one.
        #[serde(default)]
        grant: Option<Box<Grant>>,
    },
    /// A reviewer refused it.
    Denied {
        /// The reviewer.
        by: String,
        /// Why.
        reason: String,
        /// How the reviewer authenticated.
        via: String,
    },
}

impl Decision {
    /// The decision a reviewer took on the review server, if `outcome` is
    /// one (not an expiry or a withdrawal).
    fn of(
        outcome: &Outcome,
        view: Option<&RequestView>,
        grant: Option<Box<Grant>>,
    ) -> Option<Decision> {
        match outcome {
            Outcome::Approved { text, edited, by } => Some(Decision::Approved {
                by: by.clone(),
                edit: edited.then(|| text.clone()),
                edited_by: view.and_then(|v| v.edited_by.clone()),
                approvals: view.map(|v| v.approvals.clone()).unwrap_or_default(),
                grant,
            }),
            Outcome::Denied { by, reason, via } => Some(Decision::Denied {
                by: by.clone(),
                reason: reason.clone(),
                via: via.clone(),
            }),
            Outcome::Expired | Outcome::Cancelled | Outcome::Aborted => None,
        }
    }

    /// The row's `state` for it.
    fn state(&self) -> &'static str {
        match self {
            Decision::Approved { .. } => "approved",
            Decision::Denied { .. } => "denied",
        }
    }

    /// The outcome the held session gets: an unedited approval runs the
    /// text held here, which never left the host. The approvals and the
    /// edit are noted on the request held here, for its recording.
    fn outcome(self, held: &mut RequestView) -> Outcome {
        match self {
            Decision::Approved {
                by,
                edit,
                edited_by,
                approvals,
                grant: _,
            } => {
                held.approvals = approvals;
                if let Some(edit) = &edit {
                    held.text.clone_from(edit);
                    held.run_text.clone_from(edit);
                    held.edited_by = edited_by;
                }
                Outcome::Approved {
                    edited: edit.is_some(),
                    text: edit.unwrap_or_else(|| held.run_text.clone()),
                    by,
                }
            }
            Decision::Denied { by, reason, via } => Outcome::Denied { by, reason, via },
        }
    }
}

/// The link's state, for `tollgate status` and the metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkStatus {
    /// Whether the database is reachable now.
    pub connected: bool,
    /// Unix seconds of the last successful exchange.
    pub last_success_unix: Option<u64>,
    /// Why the last attempt failed, while it is not connected.
    pub last_error: Option<String>,
    /// Decisions taken from the database and applied here.
    pub decisions_applied: u64,
    /// Grants taken in from the database (given elsewhere).
    pub grants_taken_in: u64,
    /// Revocations taken in from the database (revoked elsewhere).
    pub revocations_taken_in: u64,
}

/// The shared link state.
#[derive(Debug, Default)]
pub struct Link {
    status: Mutex<LinkStatus>,
}

impl Link {
    /// A copy of the state now.
    pub fn status(&self) -> LinkStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Its Prometheus series.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let s = self.status();
        let _ = writeln!(
            out,
            "# HELP tollgate_shared_approvals_connected Whether the shared approvals database is reachable (1) or not (0).\n# TYPE tollgate_shared_approvals_connected gauge\ntollgate_shared_approvals_connected {}",
            u8::from(s.connected)
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_shared_approvals_last_success_timestamp_seconds When the shared approvals database last answered (Unix seconds; 0: never).\n# TYPE tollgate_shared_approvals_last_success_timestamp_seconds gauge\ntollgate_shared_approvals_last_success_timestamp_seconds {}",
            s.last_success_unix.unwrap_or(0)
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_shared_approvals_decisions_total Decisions of the review server applied to statements held here.\n# TYPE tollgate_shared_approvals_decisions_total counter\ntollgate_shared_approvals_decisions_total {}",
            s.decisions_applied
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_shared_grants_taken_in_total Grants and revocations made elsewhere in the fleet and taken in here.\n# TYPE tollgate_shared_grants_taken_in_total counter\ntollgate_shared_grants_taken_in_total{{change=\"given\"}} {}\ntollgate_shared_grants_taken_in_total{{change=\"revoked\"}} {}",
            s.grants_taken_in, s.revocations_taken_in
        );
    }

    fn update(&self, change: impl FnOnce(&mut LinkStatus)) {
        change(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn connected(&self) {
        self.update(|s| {
            s.connected = true;
            s.last_error = None;
            s.last_success_unix = Some(unix_seconds(SystemTime::now()));
        });
    }

    fn lost(&self, why: &str) {
        self.update(|s| {
            s.connected = false;
            s.last_error = Some(why.to_owned());
        });
    }
}

/// What the connection's driver task reports.
enum Heard {
    /// A `NOTIFY` on a channel listened to: the channel and the payload.
    Notified(String, String),
    /// The connection ended.
    Lost(String),
}

/// A connected client and what its connection hears.
struct Connected {
    client: tokio_postgres::Client,
    heard: mpsc::UnboundedReceiver<Heard>,
}

/// Connects, makes the tables if they are missing and listens on
/// `channels`.
async fn connect(
    settings: &SharedApprovalsSettings,
    channels: &[&str],
) -> Result<Connected, String> {
    let mut config: tokio_postgres::Config = settings
        .database
        .parse()
        .map_err(|e| format!("the connection string: {e}"))?;
    if let Some(path) = &settings.password_file {
        let secret = crate::config::secret::read_secret_file(path)?;
        config.password(secret.expose());
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name("tollgate");
    }
    let tls = tls_connector(settings.ca_file.as_deref())?;
    let (client, mut connection) = config
        .connect(tls)
        .await
        .map_err(|e| describe(&e, "cannot connect"))?;
    let (tell, heard) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tell.send(Heard::Notified(
                        n.channel().to_owned(),
                        n.payload().to_owned(),
                    ));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tell.send(Heard::Lost(describe(&e, "the connection failed")));
                    return;
                }
            }
        }
        let _ = tell.send(Heard::Lost("the database closed the connection".into()));
    });
    let listen: String = channels.iter().map(|c| format!("LISTEN {c};")).collect();
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({SCHEMA_LOCK}); {SCHEMA} COMMIT; {listen}"
        ))
        .await
        .map_err(|e| describe(&e, "cannot set up the tables"))?;
    Ok(Connected { client, heard })
}

/// A PostgreSQL error with the server's message and SQLSTATE when it sent
/// one.
/// Runs `change` (an INSERT or UPDATE of rows with an `id`) and notifies
/// `channel` of every row it changed, in one statement, so that no
/// listener hears of a change before it can read it; `doing` names the
/// change in an error. Returns how many rows changed.
async fn change_and_notify(
    client: &tokio_postgres::Client,
    change: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    channel: &str,
    doing: &str,
) -> Result<u64, String> {
    let sql = format!(
        "WITH changed AS ({change} RETURNING id) SELECT pg_notify(${}, id) FROM changed",
        params.len() + 1
    );
    let mut all = params.to_vec();
    all.push(&channel);
    client
        .execute(sql.as_str(), &all)
        .await
        .map_err(|e| describe(&e, doing))
}

fn describe(e: &tokio_postgres::Error, doing: &str) -> String {
    match e.as_db_error() {
        Some(db) => format!("{doing}: {} ({})", db.message(), db.code().code()),
        // "error connecting to server" alone does not say why: add the
        // causes ("Connection refused (os error 111)").
        None => {
            let mut text = format!("{doing}: {e}");
            let mut cause = std::error::Error::source(e);
            while let Some(inner) = cause {
                text.push_str(&format!(": {inner}"));
                cause = inner.source();
            }
            text
        }
    }
}

/// TLS for the database: certificates signed by `ca_file`, else by the
/// system's roots. Used when the connection string asks for it
/// (`sslmode=require`; `prefer`, the default, tries it first).
fn tls_connector(
    ca_file: Option<&std::path::Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("ca_file {} holds no certificate", path.display()));
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Connects, waiting with backoff between failed attempts (each new reason
/// logged once as `unreachable`); `None` when stopping.
async fn connect_with_backoff(
    settings: &SharedApprovalsSettings,
    channels: &[&str],
    link: &Link,
    backoff: &mut Duration,
    stop: &CancellationToken,
    unreachable: &str,
) -> Option<Connected> {
    loop {
        match connect(settings, channels).await {
            Ok(connected) => return Some(connected),
            Err(why) => {
                if link.status().last_error.as_deref() != Some(why.as_str()) {
                    tracing::warn!(error = %why, "{unreachable}");
                }
                link.lost(&why);
                if !back_off(backoff, stop).await {
                    return None;
                }
            }
        }
    }
}

/// Waits before the next connection attempt; false when stopping.
async fn back_off(backoff: &mut Duration, stop: &CancellationToken) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

fn seconds_f64(unix: u64) -> f64 {
    unix as f64
}

/// What the agent's side of the link works on.
pub struct AgentSide {
    /// The requests held here.
    pub registry: Arc<Registry>,
    /// The grants the statement path reads.
    pub grants: Arc<GrantStore>,
    /// Where grants taken in are recorded, in the sessions they concern.
    pub events: Events,
}

/// The agent's side: mirrors this agent's requests into the table, applies
/// the decisions the review server writes there, and keeps the fleet's
/// grants in step with this agent's, until `stop`.
pub async fn link_agent(
    side: AgentSide,
    settings: SharedApprovalsSettings,
    link: Arc<Link>,
    stop: CancellationToken,
) {
    let registry = &side.registry;
    let mut grants = GrantSync::new(side.grants.clone(), &settings.host);
    // Grants and revocations made elsewhere: counted, and recorded in the
    // sessions of this agent they concern.
    let taken = |grant: &Grant, merged: Merged| {
        match merged {
            Merged::Added => {
                link.update(|s| s.grants_taken_in += 1);
                api::record_grant_given(Some(&side.events), grant);
            }
            Merged::Revoked => {
                link.update(|s| s.revocations_taken_in += 1);
                api::record_revocation(Some(&side.events), registry, grant);
            }
            Merged::Unchanged => {}
        }
        tracing::info!(grant = %grant.id, change = ?merged, "shared approvals: grant taken in from the fleet");
    };
    let mut backoff = Duration::from_secs(1);
    loop {
        let Some(Connected { client, mut heard }) = connect_with_backoff(
            &settings,
            &[DECISIONS_CHANNEL, GRANTS_CHANNEL],
            &link,
            &mut backoff,
            &stop,
            "shared approvals: the database is unreachable; held statements wait here until it is back or they time out",
        )
        .await
        else {
            return;
        };
        // Subscribed before the resync: a change during it is seen after.
        let mut events = registry.subscribe();
        let resynced = async {
            resync_agent(&client, &side, &settings.host, &link).await?;
            grants.take_in(&client, None, taken).await?;
            grants.write_out(&client).await
        };
        if let Err(why) = resynced.await {
            link.lost(&why);
            tracing::warn!(error = %why, "shared approvals: cannot bring the tables up to date");
            if back_off(&mut backoff, &stop).await {
                continue;
            }
            return;
        }
        tracing::info!(host = %settings.host, "shared approvals: connected; requests held here are listed for the fleet's reviewers");
        link.connected();
        backoff = Duration::from_secs(1);
        let mut poll = tokio::time::interval(POLL);
        let why = loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    // The agent aborted its pending requests before this
                    // stop: write those last changes, briefly.
                    let _ = tokio::time::timeout(DRAIN, async {
                        while let Ok(event) = events.try_recv() {
                            if write_event(&client, &settings.host, &event).await.is_err() {
                                return;
                            }
                        }
                    })
                    .await;
                    return;
                }
                event = events.recv() => match event {
                    Ok(event) => {
                        if let Err(why) = write_event(&client, &settings.host, &event).await {
                            break why;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if let Err(why) = resync_agent(&client, &side, &settings.host, &link).await {
                            break why;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                () = side.grants.changed() => {
                    if let Err(why) = grants.write_out(&client).await {
                        break why;
                    }
                }
                note = heard.recv() => match note {
                    Some(Heard::Notified(channel, id)) if channel == GRANTS_CHANNEL => {
                        if let Err(why) = grants.take_in(&client, Some(&[id]), taken).await {
                            break why;
                        }
                    }
                    Some(Heard::Notified(_, id)) => {
                        if let Some(id) = RequestId::parse(&id) {
                            if let Err(why) = apply_decisions(&client, &side, &settings.host, &[id], &link).await {
                                break why;
                            }
                        }
                    }
                    Some(Heard::Lost(why)) => break why,
                    None => break "the connection ended".to_owned(),
                },
                _ = poll.tick() => {
                    let pending: Vec<RequestId> = registry.list().into_iter().map(|v| v.id).collect();
                    let polled = async {
                        apply_decisions(&client, &side, &settings.host, &pending, &link).await?;
                        grants.take_in(&client, None, taken).await?;
                        grants.write_out(&client).await
                    };
                    if let Err(why) = polled.await {
                        break why;
                    }
                    link.connected();
                }
            }
        };
        tracing::warn!(error = %why, "shared approvals: lost the database; reconnecting (held statements keep waiting)");
        link.lost(&why);
        if !back_off(&mut backoff, &stop).await {
            return;
        }
    }
}

/// Keeps a grant store and `tollgate_grants` in step: grants given or
/// revoked here are written out, rows written elsewhere are taken in.
struct GrantSync {
    store: Arc<GrantStore>,
    /// Whether the table has each grant revoked, as far as this side knows.
    known: HashMap<RequestId, bool>,
    /// The row's `given_on` for grants given here: the host's name.
    given_on: String,
}

impl GrantSync {
    fn new(store: Arc<GrantStore>, given_on: &str) -> GrantSync {
        GrantSync {
            store,
            known: HashMap::new(),
            given_on: given_on.to_owned(),
        }
    }

    /// Writes out the grants in force given here, and the revocations made
    /// here, that the table does not have yet.
    async fn write_out(&mut self, client: &tokio_postgres::Client) -> Result<(), String> {
        let now = unix_seconds(SystemTime::now());
        let ours = self
            .store
            .all()
            .map_err(|e| format!("the grant store: {e}"))?;
        for grant in ours {
            let revoked = grant.revoked_by.is_some();
            // Ended ones are nothing for the fleet to learn.
            if self.known.get(&grant.id) == Some(&revoked) || grant.expires_at <= now {
                continue;
            }
            let json = serde_json::to_string(&grant).map_err(|e| format!("a grant: {e}"))?;
            // A revocation wins over a grant in force; nothing un-revokes.
            change_and_notify(
                client,
                "INSERT INTO tollgate_grants (id, given_on, expires_at, revoked, grant_record) VALUES ($1, $2, to_timestamp($3), $4, $5::text::jsonb) ON CONFLICT (id) DO UPDATE SET revoked = true, grant_record = EXCLUDED.grant_record, updated_at = now() WHERE EXCLUDED.revoked AND NOT tollgate_grants.revoked",
                &[
                    &grant.id.as_str(),
                    &self.given_on,
                    &seconds_f64(grant.expires_at),
                    &revoked,
                    &json,
                ],
                GRANTS_CHANNEL,
                "cannot write a grant",
            )
            .await?;
            self.known.insert(grant.id, revoked);
        }
        Ok(())
    }

    /// Takes in the rows of `ids`, or of every grant not yet ended; `taken`
    /// hears of each that changed something here.
    async fn take_in(
        &mut self,
        client: &tokio_postgres::Client,
        ids: Option<&[String]>,
        mut taken: impl FnMut(&Grant, Merged),
    ) -> Result<(), String> {
        let rows = match ids {
            Some(ids) => {
                client
                    .query(
                        "SELECT id, revoked, grant_record::text FROM tollgate_grants WHERE id = ANY($1)",
                        &[&ids],
                    )
                    .await
            }
            None => {
                client
                    .query(
                        "SELECT id, revoked, grant_record::text FROM tollgate_grants WHERE expires_at > now()",
                        &[],
                    )
                    .await
            }
        }
        .map_err(|e| describe(&e, "cannot read grants"))?;
        for row in rows {
            let (id, revoked, text): (String, bool, String) = (row.get(0), row.get(1), row.get(2));
            let Some(id) = RequestId::parse(&id) else {
                continue;
            };
            if self.known.get(&id) == Some(&revoked) {
                continue;
            }
            let theirs: Grant = match serde_json::from_str(&text) {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(grant = %id, error = %e, "shared approvals: a grant in the table is not readable; it grants nothing here");
                    continue;
                }
            };
            // A row whose record disagrees with its columns grants nothing.
            if theirs.id != id || theirs.revoked_by.is_some() != revoked {
                tracing::warn!(grant = %id, "shared approvals: a grant row contradicts itself; it grants nothing here");
                continue;
            }
            let merged = self
                .store
                .merge(&theirs)
                .map_err(|e| format!("the grant store: {e}"))?;
            self.known.insert(id, revoked);
            if merged != Merged::Unchanged {
                taken(&theirs, merged);
            }
        }
        Ok(())
    }
}

/// Brings the table in line with this agent after a (re)connection: every
/// request pending here is in it, rows of this host that are no longer
/// pending here are ended, and decisions written while the link was down
/// are applied.
async fn resync_agent(
    client: &tokio_postgres::Client,
    side: &AgentSide,
    host: &str,
    link: &Link,
) -> Result<(), String> {
    let registry = &side.registry;
    let pending = registry.list();
    for view in &pending {
        insert_request(client, host, view).await?;
    }
    let ids: Vec<String> = pending.iter().map(|v| v.id.to_string()).collect();
    let stale = client
        .query(
            "SELECT id FROM tollgate_review_requests WHERE host = $1 AND state = 'pending' AND NOT (id = ANY($2))",
            &[&host, &ids],
        )
        .await
        .map_err(|e| describe(&e, "cannot read this host's requests"))?;
    for row in stale {
        let id: String = row.get(0);
        // Ended here while the link was down (or before a restart).
        let ended = RequestId::parse(&id).and_then(|id| registry.show(&id));
        let state = ended
            .as_ref()
            .and_then(|v| v.outcome.as_ref())
            .map_or("aborted", |o| RequestEventKind::of_outcome(o).as_str());
        let view = ended.map(|v| serde_json::to_string(&v).unwrap_or_default());
        change_and_notify(
            client,
            "UPDATE tollgate_review_requests SET state = $2, view = COALESCE($3::text::jsonb, view), updated_at = now() WHERE id = $1 AND state = 'pending'",
            &[&id, &state, &view],
            REQUESTS_CHANNEL,
            "cannot end a request",
        )
        .await?;
    }
    let pending: Vec<RequestId> = pending.into_iter().map(|v| v.id).collect();
    apply_decisions(client, side, host, &pending, link).await
}

async fn insert_request(
    client: &tokio_postgres::Client,
    host: &str,
    view: &RequestView,
) -> Result<(), String> {
    let json = serde_json::to_string(view).map_err(|e| format!("a request: {e}"))?;
    change_and_notify(
        client,
        "INSERT INTO tollgate_review_requests (id, host, submitted_at, expires_at, view) VALUES ($1, $2, to_timestamp($3), to_timestamp($4), $5::text::jsonb) ON CONFLICT (id) DO NOTHING",
        &[
            &view.id.as_str(),
            &host,
            &seconds_f64(view.submitted_at),
            &seconds_f64(view.expires_at),
            &json,
        ],
        REQUESTS_CHANNEL,
        "cannot add a request",
    )
    .await?;
    Ok(())
}

/// Writes one change of a request held here.
async fn write_event(
    client: &tokio_postgres::Client,
    host: &str,
    event: &RequestEvent,
) -> Result<(), String> {
    let view = &*event.request;
    let state = match event.event {
        RequestEventKind::Pending => return Ok(()),
        RequestEventKind::Requested => return insert_request(client, host, view).await,
        // A reviewer of this agent's own API acted.
        RequestEventKind::ApprovalCounted | RequestEventKind::Edited => "pending",
        // An ended request: the row's state is the event's name.
        ended => ended.as_str(),
    };
    let json = serde_json::to_string(view).map_err(|e| format!("a request: {e}"))?;
    // A row decided by the review server stays as it was written there.
    change_and_notify(
        client,
        "UPDATE tollgate_review_requests SET state = $2, view = $3::text::jsonb, updated_at = now() WHERE id = $1 AND host = $4 AND state = 'pending'",
        &[&view.id.as_str(), &state, &json, &host],
        REQUESTS_CHANNEL,
        "cannot update a request",
    )
    .await?;
    Ok(())
}

/// Applies the decisions the table holds for `ids` (requests of this host
/// still pending here).
async fn apply_decisions(
    client: &tokio_postgres::Client,
    side: &AgentSide,
    host: &str,
    ids: &[RequestId],
    link: &Link,
) -> Result<(), String> {
    if ids.is_empty() {
        return Ok(());
    }
    let wanted: Vec<&str> = ids.iter().map(RequestId::as_str).collect();
    let rows = client
        .query(
            "SELECT id, decision::text FROM tollgate_review_requests WHERE id = ANY($1) AND host = $2 AND state IN ('approved', 'denied') AND decision IS NOT NULL",
            &[&wanted, &host],
        )
        .await
        .map_err(|e| describe(&e, "cannot read decisions"))?;
    for row in rows {
        let (id, text): (String, String) = (row.get(0), row.get(1));
        let Some(id) = RequestId::parse(&id) else {
            continue;
        };
        let decision: Decision = match serde_json::from_str(&text) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(request = %id, error = %e, "shared approvals: a decision in the table is not readable; the statement keeps waiting");
                continue;
            }
        };
        let summary = format!("{decision:?}");
        let state = decision.state();
        // The grant is in force before the held statement runs, so that
        // the next one of its shape does not wait again.
        if let Decision::Approved {
            grant: Some(grant), ..
        } = &decision
        {
            let merged = side
                .grants
                .merge(grant)
                .map_err(|e| format!("the grant store: {e}"))?;
            if merged == Merged::Added {
                link.update(|s| s.grants_taken_in += 1);
                api::record_grant_given(Some(&side.events), grant);
            }
        }
        if side
            .registry
            .settle(&id, SystemTime::now(), |held| decision.outcome(held))
        {
            link.update(|s| s.decisions_applied += 1);
            tracing::info!(request = %id, decision = state, detail = %summary, "shared approvals: decision from the review server applied");
        }
    }
    Ok(())
}

/// The review server's side: takes the fleet's pending requests into
/// `registry` and writes the decisions its reviewers take back into the
/// table, and keeps the fleet's grants in step with `grant_store`, until
/// `stop`.
pub async fn link_review_server(
    registry: Arc<Registry>,
    grant_store: Arc<GrantStore>,
    settings: SharedApprovalsSettings,
    link: Arc<Link>,
    stop: CancellationToken,
) {
    let mut grants = GrantSync::new(grant_store.clone(), &settings.host);
    let taken = |grant: &Grant, merged: Merged| {
        tracing::info!(grant = %grant.id, change = ?merged, "review server: grant taken in from the fleet");
    };
    // Decisions taken here, written back as soon as the database takes them.
    let (decided, mut decisions) = mpsc::unbounded_channel::<(RequestId, Outcome)>();
    let mut unsent: BTreeMap<RequestId, (Decision, u64)> = BTreeMap::new();
    // Requests ended elsewhere: their outcome here is no decision to write.
    let mut withdrawn: HashSet<RequestId> = HashSet::new();
    let mut backoff = Duration::from_secs(1);
    loop {
        let Some(Connected { client, mut heard }) = connect_with_backoff(
            &settings,
            &[REQUESTS_CHANNEL, GRANTS_CHANNEL],
            &link,
            &mut backoff,
            &stop,
            "review server: the approvals database is unreachable; decisions wait until it is back",
        )
        .await
        else {
            return;
        };
        tracing::info!("review server: connected to the approvals database");
        backoff = Duration::from_secs(1);
        let mut poll = tokio::time::interval(POLL);
        let why = loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = poll.tick() => {
                    if let Err(why) = take_pending(&client, &registry, &decided, &mut withdrawn).await {
                        break why;
                    }
                    if let Err(why) = write_unsent(&client, &mut unsent).await {
                        break why;
                    }
                    let synced = async {
                        grants.take_in(&client, None, taken).await?;
                        grants.write_out(&client).await
                    };
                    if let Err(why) = synced.await {
                        break why;
                    }
                    link.connected();
                }
                () = grant_store.changed() => {
                    if let Err(why) = grants.write_out(&client).await {
                        break why;
                    }
                }
                note = heard.recv() => match note {
                    Some(Heard::Notified(channel, id)) if channel == GRANTS_CHANNEL => {
                        if let Err(why) = grants.take_in(&client, Some(&[id]), taken).await {
                            break why;
                        }
                    }
                    Some(Heard::Notified(..)) => {
                        if let Err(why) = take_pending(&client, &registry, &decided, &mut withdrawn).await {
                            break why;
                        }
                    }
                    Some(Heard::Lost(why)) => break why,
                    None => break "the connection ended".to_owned(),
                },
                Some((id, outcome)) = decisions.recv() => {
                    if withdrawn.remove(&id) {
                        continue;
                    }
                    let view = registry.show(&id);
                    // The grant the approval gave here, if any.
                    let grant = grant_store
                        .all()
                        .ok()
                        .and_then(|all| all.into_iter().find(|g| g.request == id))
                        .map(Box::new);
                    if let Some(decision) = Decision::of(&outcome, view.as_ref(), grant) {
                        let expires = view.map_or(0, |v| v.expires_at);
                        unsent.insert(id, (decision, expires));
                        if let Err(why) = write_unsent(&client, &mut unsent).await {
                            break why;
                        }
                    }
                }
            }
        };
        tracing::warn!(error = %why, unsent = unsent.len(), "review server: lost the approvals database; reconnecting");
        link.lost(&why);
        if !back_off(&mut backoff, &stop).await {
            return;
        }
    }
}

/// Takes new pending rows into the registry, and withdraws from it the
/// requests whose rows are no longer pending (ended on their agent).
async fn take_pending(
    client: &tokio_postgres::Client,
    registry: &Registry,
    decided: &mpsc::UnboundedSender<(RequestId, Outcome)>,
    withdrawn: &mut HashSet<RequestId>,
) -> Result<(), String> {
    let rows = client
        .query(
            "SELECT id, host, view::text FROM tollgate_review_requests WHERE state = 'pending' AND expires_at > now() ORDER BY id",
            &[],
        )
        .await
        .map_err(|e| describe(&e, "cannot read the pending requests"))?;
    let now = SystemTime::now();
    let mut listed = HashSet::new();
    for row in rows {
        let (id, host, text): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let mut view: RequestView = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(request = %id, host = %host, error = %e, "review server: a request in the table is not readable; skipped");
                continue;
            }
        };
        if view.id.as_str() != id {
            tracing::warn!(request = %id, host = %host, "review server: a row's view names another request; skipped");
            continue;
        }
        view.host = Some(host);
        listed.insert(view.id.clone());
        let id = view.id.clone();
        if let Some(outcome) = registry.adopt(view, now) {
            let decided = decided.clone();
            tokio::spawn(async move {
                if let Ok(outcome) = outcome.await {
                    let _ = decided.send((id, outcome));
                }
            });
        }
    }
    for view in registry.list() {
        if listed.contains(&view.id) {
            continue;
        }
        // Ended on its agent (answered, cancelled, expired, stopped).
        let row = client
            .query_opt(
                "SELECT state, view::text FROM tollgate_review_requests WHERE id = $1",
                &[&view.id.as_str()],
            )
            .await
            .map_err(|e| describe(&e, "cannot read a request"))?;
        let ended: Option<RequestView> = row
            .as_ref()
            .and_then(|r| serde_json::from_str(&r.get::<_, String>(1)).ok());
        let outcome = ended.and_then(|v| v.outcome).unwrap_or(Outcome::Expired);
        withdrawn.insert(view.id.clone());
        registry.settle(&view.id, now, |_| outcome);
    }
    Ok(())
}

/// Writes the decisions not yet in the table; one whose request ended on
/// its agent first (or expired) is dropped with a warning.
async fn write_unsent(
    client: &tokio_postgres::Client,
    unsent: &mut BTreeMap<RequestId, (Decision, u64)>,
) -> Result<(), String> {
    while let Some((id, (decision, expires))) = unsent.pop_first() {
        let json = serde_json::to_string(&decision).map_err(|e| format!("a decision: {e}"))?;
        let written = change_and_notify(
            client,
            "UPDATE tollgate_review_requests SET state = $2, decision = $3::text::jsonb, decided_at = now(), updated_at = now() WHERE id = $1 AND state = 'pending' AND expires_at > now()",
            &[&id.as_str(), &decision.state(), &json],
            DECISIONS_CHANNEL,
            "cannot write a decision",
        )
        .await;
        match written {
            Ok(0) => {
                tracing::warn!(request = %id, decision = decision.state(), "review server: the request ended on its agent before the decision reached it; nothing runs");
            }
            Ok(_) => {
                tracing::info!(request = %id, decision = decision.state(), "review server: decision written; the agent applies it");
            }
            Err(why) => {
                if expires > unix_seconds(SystemTime::now()) {
                    unsent.insert(id, (decision, expires));
                } else {
                    tracing::warn!(request = %id, "review server: a decision could not be written before the request expired; nothing runs");
                }
                return Err(why);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "shared_tests.rs"]
mod tests;
