//! The client's side of an SSH session: the agent as the host.
//!
//! russh runs the client's connection and calls [`Front`] for every
//! authentication attempt, channel and request. A request is decided and,
//! when it may run, sent on the host's matching channel; the client gets
//! the host's answer. The callbacks run one at a time in the connection's
//! loop, so a request's answer is sent before the next request is read:
//! answers keep the order SSH requires. A request a `review` rule holds is
//! answered later instead, from [`super::held`] (its client waits for that
//! answer before asking more of the channel). Each channel's data is
//! relayed by [`relay`], polled by [`run`] beside the held requests.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use russh::server::{Auth, Msg, Session};
use russh::{
    Channel, ChannelId, ChannelMsg, ChannelOpenFailure, ChannelReadHalf, ChannelWriteHalf,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::keys::HostIdentity;
use super::Upstream;
use crate::events::{CloseReason, RawDirection, SessionEvent, SessionInfo, StatementEvent};
use crate::policy::{Action, Decision, Request, SharedPolicy, Statement};
use crate::protocol::SessionContext;
use crate::sql::{StatementKind, StatementSummary};

/// How long a refusal's message has to reach the client's terminal before
/// the request's failure (see [`Front::answer`]).
pub(super) const REFUSAL_DELAY: Duration = Duration::from_millis(100);

/// How long the host may take to answer a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The server configuration towards the client for this session.
fn client_config(
    host: &HostIdentity,
    names: &[String],
    ctx: &SessionContext,
) -> Result<russh::server::Config, String> {
    let certificate = host.certificate(names)?;
    let mut methods = russh::MethodSet::empty();
    for kind in [
        russh::MethodKind::None,
        russh::MethodKind::PublicKey,
        russh::MethodKind::Password,
        russh::MethodKind::KeyboardInteractive,
    ] {
        methods.push(kind);
    }
    Ok(russh::server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-tollgate".into()),
        methods,
        auth_rejection_time: Duration::ZERO,
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host.host_key().clone()],
        certificates: vec![certificate],
        inactivity_timeout: Some(ctx.idle_timeout),
        event_buffer_size: 64,
        nodelay: true,
        ..Default::default()
    })
}

/// The host's side of a session, logged in.
pub(super) struct LoggedIn {
    /// The connection.
    pub(super) upstream: Upstream,
    /// The user the agent logged in as.
    pub(super) user: String,
    /// Where the host's connections to an allowed remote forward go.
    pub(super) forwarded: ForwardSlot,
}

/// Runs the client's side until the client or the host ends it.
pub(super) async fn run(
    ctx: &SessionContext,
    host: &HostIdentity,
    names: &[String],
    info: Arc<SessionInfo>,
    client: TcpStream,
    logged_in: LoggedIn,
) -> CloseReason {
    let LoggedIn {
        upstream,
        user,
        forwarded,
    } = logged_in;
    let config = match client_config(host, names, ctx) {
        Ok(config) => Arc::new(config),
        Err(e) => return CloseReason::ClientError(e),
    };
    let (opened_tx, mut opened_rx) = mpsc::channel(8);
    let (held_tx, mut held_rx) = mpsc::channel(8);
    let upstream = Arc::new(upstream);
    let front = Front {
        target: ctx.target.clone(),
        info,
        policy: ctx.policy.clone(),
        events: ctx.events.clone(),
        metrics: Arc::clone(&ctx.target_metrics),
        upstream: Arc::clone(&upstream),
        opened: opened_tx,
        held: held_tx,
        forwarded,
        reviews: ctx.approvals.is_some(),
        channels: HashMap::new(),
        brokered_user: user,
        announced: false,
    };
    let session = match russh::server::run_stream(config, client, front).await {
        Ok(session) => session,
        Err(e) => return CloseReason::ClientError(format!("SSH handshake: {e}")),
    };
    tokio::pin!(session);
    let mut relays = FuturesUnordered::new();
    let reason = loop {
        tokio::select! {
            ended = &mut session => break match ended {
                Ok(()) => CloseReason::Completed,
                // The client hung up: how OpenSSH ends a session.
                Err(russh::Error::IO(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => CloseReason::Completed,
                Err(russh::Error::Disconnect | russh::Error::HUP) => CloseReason::Completed,
                Err(e) => CloseReason::ClientError(e.to_string()),
            },
            Some(opened) = opened_rx.recv() => relays.push(Box::pin(relay(ctx, opened)) as Pending<'_>),
            Some(held) = held_rx.recv() => relays.push(Box::pin(super::held::wait(ctx, held))),
            Some(ended) = relays.next(), if !relays.is_empty() => {
                if let Err(reason) = ended {
                    break reason;
                }
            }
            _ = ctx.force_close.cancelled() => break CloseReason::Shutdown,
        }
    };
    let _ = upstream
        .disconnect(russh::Disconnect::ByApplication, "session ended", "")
        .await;
    reason
}

/// Sends a request on `shared`'s host channel and waits for the host's
/// answer (at most [`REQUEST_TIMEOUT`]).
pub(super) async fn ask<F, Fut>(shared: Arc<ChannelShared>, send: F) -> bool
where
    F: FnOnce(Arc<ChannelShared>) -> Fut,
    Fut: std::future::Future<Output = Result<(), russh::Error>>,
{
    let (tx, rx) = oneshot::channel();
    if let Ok(mut answers) = shared.answers.lock() {
        answers.push_back(tx);
    }
    if send(shared).await.is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(REQUEST_TIMEOUT, rx).await,
        Ok(Ok(true))
    )
}

/// A channel's relay or a held request, polled by [`run`].
type Pending<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), CloseReason>> + Send + 'a>>;

/// Turns a client away before it can log in: the handshake completes, so
/// that the client can show `message` (as the login banner), and every
/// authentication attempt fails.
pub(super) async fn turn_away(
    host: &HostIdentity,
    names: &[String],
    client: TcpStream,
    ctx: &SessionContext,
    message: String,
) {
    let Ok(mut config) = client_config(host, names, ctx) else {
        return;
    };
    config.max_auth_attempts = 1;
    let refusal = Refusal {
        message: format!("{message}\r\n"),
    };
    if let Ok(session) = russh::server::run_stream(Arc::new(config), client, refusal).await {
        let _ = tokio::time::timeout(Duration::from_secs(10), session).await;
    }
}

/// A handler that lets nobody in, saying why.
struct Refusal {
    message: String,
}

impl russh::server::Handler for Refusal {
    type Error = russh::Error;

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        Ok(Some(self.message.clone()))
    }

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(refused())
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        _offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(refused())
    }

    async fn auth_password(&mut self, _user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(refused())
    }
}

/// A rejection that offers no other method: the client gives up at once.
fn refused() -> Auth {
    Auth::Reject {
        proceed_with_methods: Some(russh::MethodSet::empty()),
        partial_success: false,
    }
}

/// What a channel's relay and its requests share.
pub(super) struct ChannelShared {
    /// The host's side of the channel, for data and requests.
    pub(super) upstream: ChannelWriteHalf<russh::client::Msg>,
    /// Requests sent to the host and waiting for its answer, oldest first.
    pub(super) answers: Mutex<VecDeque<oneshot::Sender<bool>>>,
    /// Whether the channel's data is recorded: it has a terminal (a pty
    /// was granted), or the target records everything (`record_raw`).
    recorded: std::sync::atomic::AtomicBool,
    /// An sftp channel's file operations, followed for the recording.
    sftp: Mutex<Option<super::sftp::SftpFollower>>,
}

impl ChannelShared {
    /// Gets ready for `request` before it is sent: an sftp subsystem's
    /// file operations are followed from its first byte.
    pub(super) fn prepare(&self, request: &ToRun) {
        if matches!(request, ToRun::Subsystem(name) if name == "sftp") {
            if let Ok(mut sftp) = self.sftp.lock() {
                *sftp = Some(super::sftp::SftpFollower::default());
            }
        }
    }

    /// Follows `data` if this is an sftp channel; the operations it ends.
    fn follow_sftp(&self, data: &[u8], from_client: bool) -> Vec<super::sftp::SftpOp> {
        match self.sftp.lock() {
            Ok(mut guard) => match guard.as_mut() {
                Some(f) if from_client => f.from_client(data),
                Some(f) => f.from_server(data),
                None => Vec::new(),
            },
            Err(_) => Vec::new(),
        }
    }
}

/// Records sftp operations of `channel`.
fn record_sftp(
    ctx: &SessionContext,
    session: uuid::Uuid,
    channel: ChannelId,
    ops: Vec<super::sftp::SftpOp>,
) {
    for op in ops {
        ctx.events.emit(&SessionEvent::Sftp {
            session,
            record: crate::recording::format::SftpRecord {
                channel: u32::from(channel),
                op: op.op.to_owned(),
                path: op.path,
                to: op.to,
                bytes_read: op.bytes_read,
                bytes_written: op.bytes_written,
            },
        });
    }
}

/// A channel both sides opened, for [`relay`].
struct OpenedChannel {
    client: Channel<Msg>,
    upstream: ChannelReadHalf,
    shared: Arc<ChannelShared>,
    session: russh::server::Handle,
}

/// The client's connection, as russh calls it.
struct Front {
    target: String,
    info: Arc<SessionInfo>,
    policy: SharedPolicy,
    events: crate::events::Events,
    metrics: Arc<crate::metrics::TargetMetrics>,
    upstream: Arc<Upstream>,
    opened: mpsc::Sender<OpenedChannel>,
    /// Where the host's remote-forward connections go, once one is allowed.
    forwarded: ForwardSlot,
    /// Where held requests go, for [`run`] to wait on.
    held: mpsc::Sender<super::held::HeldRequest>,
    /// Whether the agent takes review requests.
    reviews: bool,
    channels: HashMap<ChannelId, Arc<ChannelShared>>,
    brokered_user: String,
    /// Whether the login was recorded.
    announced: bool,
}

impl Front {
    /// Any authentication is accepted: who may log in was decided from the
    /// kernel's identity before the handshake went on. The first is
    /// recorded with the user the client asked for.
    fn accept(&mut self, user: &str) -> Auth {
        if !self.announced {
            self.announced = true;
            self.events.emit(&SessionEvent::Startup {
                session: self.info.id,
                user: Some(user.to_owned()),
                database: None,
                application_name: None,
                brokered_user: Some(self.brokered_user.clone()),
            });
        }
        Auth::Accept
    }

    /// Decides one request and records the decision.
    fn decide(&self, kind: StatementKind, command: &str, text: &str) -> Verdict {
        let decision = match self.events.recording_failure() {
            Some(failure) => fixed_refusal(format!(
                "session recording has failed ({failure}), and nothing may run unrecorded"
            )),
            None => decide_request(&self.policy, &self.target, &self.info, kind, command, text),
        };
        let runs = matches!(decision.action, Action::Allow | Action::Audit);
        // A request a `review` rule names approvers for waits for them
        // (a forward is a channel to open, which cannot wait).
        let held = decision.action == Action::Review
            && self.reviews
            && kind != StatementKind::Forward
            && decision.deciding_rule().is_some_and(|r| r.review.is_some());
        self.record(kind, command, text, &decision, !runs && !held);
        // A rule's `on_match` acts before the client hears the answer.
        crate::intervene::act_on(
            std::slice::from_ref(&decision),
            &self.info.identity,
            self.info.id,
            &self.events,
        );
        if runs {
            Verdict::Run
        } else if held {
            Verdict::Hold(decision)
        } else if decision.matched.is_empty() && !decision.default_used {
            Verdict::Refuse(format!("tollgate: {command} refused: {}", decision.reason))
        } else {
            Verdict::Refuse(decision.client_message(command))
        }
    }

    /// Decides `request` and runs it on the host, refuses it, or hands it
    /// to [`run`] to wait for its reviewers (answered then).
    async fn run_request(
        &mut self,
        channel: ChannelId,
        request: ToRun,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let outcome = match self.decide(request.kind(), &request.command(), request.text()) {
            Verdict::Run => Ok(self
                .ask_host(channel, |shared| async move {
                    shared.prepare(&request);
                    request.send(&shared.upstream).await
                })
                .await),
            Verdict::Refuse(message) => Err(message),
            Verdict::Hold(decision) => {
                let Some(shared) = self.channels.get(&channel).cloned() else {
                    return session.channel_failure(channel);
                };
                let held = super::held::HeldRequest {
                    channel,
                    request,
                    decision,
                    shared,
                    session: session.handle(),
                    identity: Arc::clone(&self.info),
                    user: self.brokered_user.clone(),
                };
                if self.held.send(held).await.is_err() {
                    return Err(russh::Error::Disconnect);
                }
                return Ok(());
            }
        };
        Self::answer(session, channel, outcome)
    }

    /// Records a request that is always refused, saying why.
    fn refuse_always(&self, kind: StatementKind, command: &str, why: &str) -> String {
        let decision = fixed_refusal(why.to_owned());
        self.record(kind, command, "", &decision, true);
        format!("tollgate: {command} refused: {why}")
    }

    fn record(
        &self,
        kind: StatementKind,
        command: &str,
        text: &str,
        decision: &Decision,
        refused: bool,
    ) {
        self.metrics.statement(decision.action);
        let event = StatementEvent::decided(
            self.info.id,
            text,
            Arc::from(command),
            Some(kind),
            None,
            decision,
            refused,
        );
        self.events.emit(&SessionEvent::Statement(Arc::new(event)));
    }

    /// Sends a request on the host's channel and waits for its answer.
    async fn ask_host<F, Fut>(&self, channel: ChannelId, send: F) -> bool
    where
        F: FnOnce(Arc<ChannelShared>) -> Fut,
        Fut: std::future::Future<Output = Result<(), russh::Error>>,
    {
        match self.channels.get(&channel).cloned() {
            Some(shared) => ask(shared, send).await,
            None => false,
        }
    }

    /// Answers the client's request: the host's answer, or a refusal with
    /// its message on the channel's stderr.
    fn answer(
        session: &mut Session,
        channel: ChannelId,
        outcome: Result<bool, String>,
    ) -> Result<(), russh::Error> {
        match outcome {
            Ok(true) => session.channel_success(channel),
            Ok(false) => session.channel_failure(channel),
            Err(message) => {
                session.extended_data(channel, 1, format!("{message}\r\n").into_bytes())?;
                // OpenSSH drops what it has not yet written to stderr when a
                // request fails: the failure follows once the message is out.
                let handle = session.handle();
                tokio::spawn(async move {
                    tokio::time::sleep(REFUSAL_DELAY).await;
                    let _ = handle.channel_failure(channel).await;
                });
                Ok(())
            }
        }
    }
}

/// What the policy says of a request.
enum Verdict {
    /// It runs.
    Run,
    /// It is refused; the message for the client.
    Refuse(String),
    /// It waits for reviewers (the decision whose rule holds it).
    Hold(Decision),
}

/// A request that runs something on the host.
pub(super) enum ToRun {
    /// An interactive shell.
    Shell,
    /// A command line.
    Exec(String),
    /// A subsystem, by name.
    Subsystem(String),
}

impl ToRun {
    pub(super) fn kind(&self) -> StatementKind {
        match self {
            ToRun::Shell => StatementKind::Shell,
            ToRun::Exec(_) => StatementKind::Exec,
            ToRun::Subsystem(_) => StatementKind::Subsystem,
        }
    }

    /// Its label in messages and `commands` conditions.
    pub(super) fn command(&self) -> String {
        match self {
            ToRun::Shell => "SHELL".to_owned(),
            ToRun::Exec(line) => line.clone(),
            ToRun::Subsystem(name) => format!("SUBSYSTEM {name}"),
        }
    }

    /// Its text for `text_regex` conditions and reviewers.
    pub(super) fn text(&self) -> &str {
        match self {
            ToRun::Shell => "",
            ToRun::Exec(text) | ToRun::Subsystem(text) => text,
        }
    }

    /// Sends it on the host's channel, asking for an answer.
    pub(super) async fn send(
        &self,
        upstream: &ChannelWriteHalf<russh::client::Msg>,
    ) -> Result<(), russh::Error> {
        match self {
            ToRun::Shell => upstream.request_shell(true).await,
            ToRun::Exec(line) => upstream.exec(true, line.as_bytes()).await,
            ToRun::Subsystem(name) => upstream.request_subsystem(true, name.as_str()).await,
        }
    }
}

/// The policy's decision on one request of `info`'s session.
pub(super) fn decide_request(
    policy: &SharedPolicy,
    target: &str,
    info: &SessionInfo,
    kind: StatementKind,
    command: &str,
    text: &str,
) -> Decision {
    let summary = StatementSummary {
        kind,
        transaction: None,
        command: Arc::from(command),
        tables_read: Vec::new(),
        tables_written: Vec::new(),
        functions: Vec::new(),
        flags: Default::default(),
        fingerprint: Arc::from(""),
        text: text.to_owned(),
    };
    crate::policy::current_policy(policy).decide(&Request {
        target,
        identity: &info.identity,
        statement: Statement::Parsed(&summary),
        multi_statement: false,
    })
}

/// A decision no rule made: a refusal that is not the policy's.
fn fixed_refusal(reason: String) -> Decision {
    Decision {
        action: Action::Deny,
        matched: Vec::new(),
        default_used: false,
        reason: Arc::from(reason),
    }
}

impl russh::server::Handler for Front {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        Ok(self.accept(user))
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(self.accept(user))
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.accept(user))
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.accept(user))
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let upstream = self.upstream.channel_open_session().await;
        self.open_on_host(channel, upstream, reply, session, "a session channel")
            .await
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let destination = format!("{host_to_connect}:{port_to_connect}");
        let command = format!("FORWARD {destination}");
        if !matches!(
            self.decide(StatementKind::Forward, &command, &destination),
            Verdict::Run
        ) {
            tracing::info!(session = %self.info.id, "{command} refused");
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let upstream = self
            .upstream
            .channel_open_direct_tcpip(
                host_to_connect,
                port_to_connect,
                originator_address,
                originator_port,
            )
            .await;
        self.open_on_host(channel, upstream, reply, session, &command)
            .await
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self
            .ask_host(channel, |shared| async move {
                shared
                    .upstream
                    .request_pty(
                        true, term, col_width, row_height, pix_width, pix_height, modes,
                    )
                    .await
            })
            .await;
        if ok {
            // A terminal session: its streams are recorded, for replay.
            if let Some(shared) = self.channels.get(&channel) {
                shared.recorded.store(true, Ordering::Relaxed);
            }
        }
        Self::answer(session, channel, Ok(ok))
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self
            .ask_host(channel, |shared| async move {
                shared
                    .upstream
                    .set_env(true, variable_name, variable_value)
                    .await
            })
            .await;
        Self::answer(session, channel, Ok(ok))
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.run_request(channel, ToRun::Shell, session).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // What is decided must be what runs: a command that is not UTF-8
        // text, or that holds a NUL (the host's shell stops reading there),
        // would be matched as other text than the host runs.
        match std::str::from_utf8(data) {
            Ok(text) if !text.contains('\0') => {
                self.run_request(channel, ToRun::Exec(text.to_owned()), session)
                    .await
            }
            _ => {
                let shown = String::from_utf8_lossy(data).replace('\0', "\\0");
                let message = self.refuse_always(
                    StatementKind::Exec,
                    &shown,
                    "the command is not UTF-8 text without NUL bytes, so it cannot be decided as the host would run it",
                );
                Self::answer(session, channel, Err(message))
            }
        }
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.run_request(channel, ToRun::Subsystem(name.to_owned()), session)
            .await
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let message = self.refuse_always(
            StatementKind::Forward,
            "X11 FORWARDING",
            "X11 forwarding is always refused",
        );
        Self::answer(session, channel, Err(message))
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // russh answers the failure; the client says it could not forward.
        self.refuse_always(
            StatementKind::Forward,
            "AGENT FORWARDING",
            "agent forwarding is always refused: the host would reach the job's keys",
        );
        Ok(false)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let listen = format!("{address}:{port}");
        let command = format!("REMOTE FORWARD {listen}");
        if !matches!(
            self.decide(StatementKind::Forward, &command, &listen),
            Verdict::Run
        ) {
            tracing::info!(session = %self.info.id, "{command} refused");
            return Ok(false);
        }
        // The host's connections to the port come back as channels the
        // agent opens to the client.
        if let Ok(mut back) = self.forwarded.lock() {
            *back = Some(ForwardBack {
                session: session.handle(),
                opened: self.opened.clone(),
                recorded: self.events.records_raw(&self.target),
            });
        }
        match self.upstream.tcpip_forward(address, *port).await {
            Ok(bound) => {
                if *port == 0 {
                    *port = bound;
                }
                Ok(true)
            }
            Err(e) => {
                tracing::info!(session = %self.info.id, "the host refused {command}: {e}");
                Ok(false)
            }
        }
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refuse_always(
            StatementKind::Forward,
            &format!("REMOTE FORWARD {socket_path}"),
            "remote socket forwarding is not relayed",
        );
        Ok(false)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(shared) = self.channels.get(&channel) {
            let _ = shared
                .upstream
                .window_change(col_width, row_height, pix_width, pix_height)
                .await;
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: russh::Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(shared) = self.channels.get(&channel) {
            let _ = shared.upstream.signal(signal).await;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        Ok(())
    }
}

impl Front {
    /// Accepts the client's channel once the host opened its side (`what`
    /// names it for the log), or refuses it.
    async fn open_on_host(
        &mut self,
        client: Channel<Msg>,
        upstream: Result<Channel<russh::client::Msg>, russh::Error>,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
        what: &str,
    ) -> Result<(), russh::Error> {
        match upstream {
            Ok(upstream) => self.opened(client, upstream, reply, session).await,
            Err(e) => {
                tracing::debug!(session = %self.info.id, "the host refused {what}: {e}");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                Ok(())
            }
        }
    }

    /// Both sides of a channel are open: accept the client's and start its
    /// relay.
    async fn opened(
        &mut self,
        client: Channel<Msg>,
        upstream: Channel<russh::client::Msg>,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let recorded = self.events.records_raw(&self.target);
        let opened = OpenedChannel::pair(client, upstream, recorded, session.handle());
        self.channels
            .insert(opened.client.id(), Arc::clone(&opened.shared));
        reply.accept().await;
        if self.opened.send(opened).await.is_err() {
            return Err(russh::Error::Disconnect);
        }
        Ok(())
    }
}

impl OpenedChannel {
    /// The client's and the host's sides of one channel, for [`relay`].
    fn pair(
        client: Channel<Msg>,
        upstream: Channel<russh::client::Msg>,
        recorded: bool,
        session: russh::server::Handle,
    ) -> OpenedChannel {
        let (upstream_read, upstream_write) = upstream.split();
        let shared = Arc::new(ChannelShared {
            upstream: upstream_write,
            answers: Mutex::new(VecDeque::new()),
            recorded: std::sync::atomic::AtomicBool::new(recorded),
            sftp: Mutex::new(None),
        });
        OpenedChannel {
            client,
            upstream: upstream_read,
            shared,
            session,
        }
    }
}

/// Where the host's connections to a remote forward (`ssh -R`) go: the
/// client's connection, as channels the agent opens to it.
#[derive(Clone)]
pub(super) struct ForwardBack {
    session: russh::server::Handle,
    opened: mpsc::Sender<OpenedChannel>,
    recorded: bool,
}

impl ForwardBack {
    /// Opens a `forwarded-tcpip` channel to the client for the host's
    /// `upstream` one and relays them; `false` when the client refused.
    pub(super) async fn open(
        &self,
        upstream: Channel<russh::client::Msg>,
        connected: (&str, u32),
        originator: (&str, u32),
    ) -> bool {
        let client = self
            .session
            .channel_open_forwarded_tcpip(connected.0, connected.1, originator.0, originator.1)
            .await;
        let Ok(client) = client else {
            return false;
        };
        let opened = OpenedChannel::pair(client, upstream, self.recorded, self.session.clone());
        self.opened.send(opened).await.is_ok()
    }
}

/// The slot a session's [`ForwardBack`] goes into once a remote forward is
/// allowed, shared with the host's side.
pub(super) type ForwardSlot = Arc<Mutex<Option<ForwardBack>>>;

/// Accounts for a channel's data read from `from`: counted, recorded
/// when the channel is, and followed when it is an sftp channel.
fn took(
    ctx: &SessionContext,
    shared: &ChannelShared,
    session: uuid::Uuid,
    channel: ChannelId,
    data: &[u8],
    from: RawDirection,
) {
    let counter = match from {
        RawDirection::Client => &ctx.counters.from_client,
        RawDirection::Server => &ctx.counters.from_upstream,
    };
    counter.fetch_add(data.len() as u64, Ordering::Relaxed);
    if shared.recorded.load(Ordering::Relaxed) {
        ctx.events.emit_raw(session, from, data);
    }
    let ops = shared.follow_sftp(data, matches!(from, RawDirection::Client));
    record_sftp(ctx, session, channel, ops);
}

/// Relays one channel until either side closes it. `Err` ends the session
/// (recording failed and nothing may run unrecorded).
async fn relay(ctx: &SessionContext, opened: OpenedChannel) -> Result<(), CloseReason> {
    let OpenedChannel {
        client,
        mut upstream,
        shared,
        session,
    } = opened;
    let id = client.id();
    let session_id = ctx.start.get().map_or_else(uuid::Uuid::nil, |i| i.id);
    let (mut client_read, client_write) = client.split();
    let from_client = async {
        while let Some(msg) = client_read.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    took(ctx, &shared, session_id, id, &data, RawDirection::Client);
                    if shared.upstream.data_bytes(data).await.is_err() {
                        break;
                    }
                }
                ChannelMsg::ExtendedData { data, ext } => {
                    ctx.counters
                        .from_client
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if shared
                        .upstream
                        .extended_data_bytes(ext, data)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                ChannelMsg::Eof => {
                    let _ = shared.upstream.eof().await;
                }
                ChannelMsg::Close => break,
                // Requests reach the host through `Front`'s callbacks.
                _ => {}
            }
        }
        let _ = shared.upstream.close().await;
    };
    let from_upstream = async {
        while let Some(msg) = upstream.wait().await {
            if let Some(failure) = ctx.events.recording_failure() {
                let _ = client_write
                    .extended_data_bytes(
                        1,
                        format!("tollgate: session recording has failed ({failure}), and nothing may run unrecorded\r\n").into_bytes(),
                    )
                    .await;
                return Err(CloseReason::RecordingFailed(failure));
            }
            match msg {
                ChannelMsg::Data { data } => {
                    took(ctx, &shared, session_id, id, &data, RawDirection::Server);
                    if client_write.data_bytes(data).await.is_err() {
                        break;
                    }
                }
                ChannelMsg::ExtendedData { data, ext } => {
                    ctx.counters
                        .from_upstream
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if shared.recorded.load(Ordering::Relaxed) {
                        ctx.events.emit_raw(session_id, RawDirection::Server, &data);
                    }
                    if client_write.extended_data_bytes(ext, data).await.is_err() {
                        break;
                    }
                }
                ChannelMsg::Success | ChannelMsg::Failure => {
                    let waiting = shared.answers.lock().ok().and_then(|mut a| a.pop_front());
                    if let Some(waiting) = waiting {
                        let _ = waiting.send(matches!(msg, ChannelMsg::Success));
                    }
                }
                ChannelMsg::ExitStatus { exit_status } => {
                    ctx.events.emit(&SessionEvent::ChannelExit {
                        session: session_id,
                        channel: u32::from(id),
                        exit_status: Some(exit_status),
                        exit_signal: None,
                    });
                    let _ = client_write.exit_status(exit_status).await;
                }
                ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                } => {
                    ctx.events.emit(&SessionEvent::ChannelExit {
                        session: session_id,
                        channel: u32::from(id),
                        exit_status: None,
                        exit_signal: Some(format!("{signal_name:?}")),
                    });
                    let _ = session
                        .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                        .await;
                }
                ChannelMsg::Eof => {
                    let _ = client_write.eof().await;
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = client_write.close().await;
        Ok(())
    };
    let (_, ended) = tokio::join!(from_client, from_upstream);
    // Files left open when the channel closed.
    let left = match shared.sftp.lock() {
        Ok(mut guard) => guard
            .as_mut()
            .map(super::sftp::SftpFollower::finish)
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    record_sftp(ctx, session_id, id, left);
    ended
}
