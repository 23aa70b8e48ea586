//! One MySQL session: the connection phase relayed, then one command at a
//! time, each decided before it reaches the server and its whole answer
//! relayed before the next command is read.
//!
//! The protocol has no pipelining a client may rely on: a client sends a
//! command and reads its answer. The proxy holds to that order, so an ERR
//! it writes for a refused command is the answer to that command and never
//! lands inside another command's answer; a client that sends ahead only
//! waits in the socket until its turn.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::broker;
use super::handshake::{self, ClientAnswer};
use super::mask::{self, MaskPlan, ResultMask};
use super::names::{Outcome, SessionNames};
use super::packet::{self, Packet, PacketError};
use crate::config::Target;
use crate::events::{CloseReason, RawDirection, SessionEvent, StatementEvent};
use crate::masking::MaskRule;
use crate::policy::{most_restrictive, Action, Decision, DecisionMemo};
use crate::protocol::tls::{self, ReadHalf, Stream, TlsState, UpstreamMode, WriteHalf};
use crate::protocol::SessionContext;
use crate::sql::mysql::{CharsetChange, Escapes, ServerVersion};
use crate::sql::{Analysis, Dialect, StatementKind};

/// The largest command or answer the proxy reads (MySQL's own
/// `max_allowed_packet` tops out at 1 GiB; its default is 16 MiB).
pub const MAX_PACKET: usize = 64 << 20;

/// Rows waiting for the client are written out once they reach this size,
/// so a large result streams rather than fills the proxy's memory.
const FLUSH_AT: usize = 64 * 1024;

/// `SERVER_MORE_RESULTS_EXISTS`: another result of the same command follows.
const MORE_RESULTS: u16 = 0x0008;
/// `SERVER_STATUS_CURSOR_EXISTS`: an executed statement opened a cursor;
/// its rows come with `COM_STMT_FETCH`.
const CURSOR_EXISTS: u16 = 0x0040;
/// `SERVER_STATUS_NO_BACKSLASH_ESCAPES`: the session's `sql_mode` reads a
/// backslash in a string as itself.
const NO_BACKSLASH_ESCAPES: u16 = 0x0200;

/// How long the rest of a refused packet is read and dropped before its
/// session closes (`Session::close_after_err`).
const LINGER_AFTER_ERR: Duration = Duration::from_secs(1);

/// Error codes the proxy answers with.
const ER_TABLEACCESS_DENIED: u16 = 1142;
const ER_ACCESS_DENIED: u16 = 1045;
const ER_SPECIFIC_ACCESS_DENIED: u16 = 1227;
const ER_NET_PACKET_TOO_LARGE: u16 = 1153;
const ER_UNKNOWN_COM: u16 = 1047;
const ER_KILL_DENIED: u16 = 1095;
const ER_NET_PACKETS_OUT_OF_ORDER: u16 = 1156;
const ER_MALFORMED_PACKET: u16 = 1835;

mod review;

use crate::protocol::review::RecentStatements;
use review::Reviewed;

/// Commands (`COM_*`).
mod com {
    pub(super) const QUIT: u8 = 0x01;
    pub(super) const INIT_DB: u8 = 0x02;
    pub(super) const QUERY: u8 = 0x03;
    pub(super) const FIELD_LIST: u8 = 0x04;
    pub(super) const STATISTICS: u8 = 0x09;
    pub(super) const PROCESS_KILL: u8 = 0x0C;
    pub(super) const PING: u8 = 0x0E;
    pub(super) const CHANGE_USER: u8 = 0x11;
    pub(super) const BINLOG_DUMP: u8 = 0x12;
    pub(super) const REGISTER_SLAVE: u8 = 0x15;
    pub(super) const STMT_PREPARE: u8 = 0x16;
    pub(super) const STMT_EXECUTE: u8 = 0x17;
    pub(super) const STMT_SEND_LONG_DATA: u8 = 0x18;
    pub(super) const STMT_CLOSE: u8 = 0x19;
    pub(super) const STMT_RESET: u8 = 0x1A;
    pub(super) const SET_OPTION: u8 = 0x1B;
    pub(super) const STMT_FETCH: u8 = 0x1C;
    pub(super) const BINLOG_DUMP_GTID: u8 = 0x1E;
    pub(super) const RESET_CONNECTION: u8 = 0x1F;
}

/// Why the session stops.
enum Stop {
    Closed(CloseReason),
}

impl From<CloseReason> for Stop {
    fn from(reason: CloseReason) -> Self {
        Stop::Closed(reason)
    }
}

/// The server connections sessions opened through one handler, by target
/// and the connection id the server gave them, with the uid of the process
/// behind each: what a `KILL` may name.
#[derive(Debug, Default)]
pub struct Connections {
    open: std::sync::Mutex<HashMap<(String, u32), OpenConnection>>,
}

/// One connection in [`Connections`].
#[derive(Debug)]
struct OpenConnection {
    /// The user of the process behind it, when known.
    uid: Option<u32>,
    /// Wakes the session's held statement when a `KILL` names it.
    interrupt: Arc<tokio::sync::Notify>,
}

impl Connections {
    /// Registers a session's connection; what a `KILL` of it wakes.
    fn register(&self, target: &str, id: u32, uid: Option<u32>) -> Arc<tokio::sync::Notify> {
        let interrupt = Arc::new(tokio::sync::Notify::new());
        if let Ok(mut open) = self.open.lock() {
            open.insert(
                (target.to_owned(), id),
                OpenConnection {
                    uid,
                    interrupt: Arc::clone(&interrupt),
                },
            );
        }
        interrupt
    }

    /// Ends the wait of connection `id`'s held statement, if it has one: a
    /// `KILL` of it was let through (the server, which never saw the
    /// statement, has nothing to interrupt).
    fn interrupt(&self, target: &str, id: u32) {
        if let Ok(open) = self.open.lock() {
            if let Some(connection) = open.get(&(target.to_owned(), id)) {
                connection.interrupt.notify_waiters();
            }
        }
    }

    fn remove(&self, target: &str, id: u32) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&(target.to_owned(), id));
        }
    }

    /// Whether connection `id` to `target` was opened through the agent by
    /// a process of user `uid` (never when the user is not known).
    pub fn owned_by(&self, target: &str, id: u32, uid: Option<u32>) -> bool {
        uid.is_some()
            && self
                .open
                .lock()
                .is_ok_and(|open| open.get(&(target.to_owned(), id)).and_then(|c| c.uid) == uid)
    }
}

/// A session's entry in [`Connections`], removed when the session ends.
struct Registration<'a> {
    connections: &'a Connections,
    target: &'a str,
    id: u32,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.connections.remove(self.target, self.id);
    }
}

/// Whether a decided command may run, and masked how.
enum Verdict {
    /// Answered with an ERR already.
    Refused,
    /// Forwarded, its results masked by the plan when there is one.
    Run(Option<MaskPlan>),
    /// A reviewer approved an edit of the held text: the edit is decided
    /// and run in its place.
    Edited(String),
}

/// What a prepared statement's decisions were made under: the policy's
/// generation, the session's database epoch and its names' epoch.
type DecidedUnder = (u64, u64, u64);

/// The decisions of a prepared statement's last execution, and what an
/// execution that ran under them reports: an execution under the same
/// policy and database costs a map lookup, not a decision and a new event.
struct Decided {
    under: DecidedUnder,
    decisions: Arc<[Decision]>,
    /// The events of an execution that ran, built at the first.
    ran: Option<Arc<[Arc<StatementEvent>]>>,
    /// What an execution under these decisions masks (or why it cannot
    /// be masked), made at the first: reading the statement's expressions
    /// for masked columns takes a pass over its text.
    plan: Option<Result<Option<MaskPlan>, String>>,
}

/// The server's current database, which tables named without one are in.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CurrentDatabase {
    /// None selected: such names are the server's error.
    None,
    /// This one (lowercased, as table names are).
    Known(String),
    /// Not known, for the reason given (a text that switched databases
    /// failed part-way; the server's answer about it could not be read):
    /// statements naming a table without its database are refused until
    /// a `USE`.
    Unknown(&'static str),
}

impl CurrentDatabase {
    fn from_name(name: Option<&str>) -> Self {
        match name.filter(|n| !n.is_empty()) {
            Some(name) => CurrentDatabase::Known(name.to_lowercase()),
            None => CurrentDatabase::None,
        }
    }
}

/// The command a decided text comes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `COM_QUERY`: runs now; held when a rule wants review.
    Query,
    /// `COM_STMT_PREPARE`: runs nothing; review waits for each execution.
    Prepare,
    /// `COM_STMT_EXECUTE` of this statement: runs now, held as a query is.
    Execute(u32),
}

/// What the session asks the server before the client's first command:
/// the client character set and the database as the server has them once
/// its `init_connect` ran (which may change both, unseen by the proxy), and
/// the largest packet it takes (fixed for the session).
const SESSION_STATE: &[u8] = b"SELECT @@character_set_client, DATABASE(), @@max_allowed_packet";

/// What the session runs to empty the server's list of warnings after a
/// masked statement (a statement that uses a table, here a derived one,
/// replaces the list).
const CLEAR_DIAGNOSTICS: &[u8] = b"SELECT 1 FROM (SELECT 1) AS tollgate_clear WHERE 0";

/// A statement the server prepared, kept to decide each execution again
/// under the policy in force then.
struct Prepared {
    text: String,
    analysis: Analysis,
}

struct Session<'a> {
    ctx: &'a SessionContext,
    connections: &'a Connections,
    client_in: BufReader<ReadHalf>,
    client_out: WriteHalf,
    server_in: BufReader<ReadHalf>,
    server_out: WriteHalf,
    /// Framed packets for the client, written at the end of each answer
    /// (or when large).
    to_client: Vec<u8>,
    /// The framed packet for the server, one buffer for every command.
    to_server: Vec<u8>,
    prepared: HashMap<u32, Arc<Prepared>>,
    last_prepared: Option<u32>,
    /// The masks of the open cursors of masked statements, by statement
    /// id: their rows come with `COM_STMT_FETCH`.
    cursor_masks: HashMap<u32, ResultMask>,
    /// The decisions of each prepared statement's last execution, with the
    /// generation of the policy that made them and the database epoch.
    decided: HashMap<u32, Decided>,
    /// The session's decisions by statement shape.
    memo: DecisionMemo,
    /// The policy in force, as of the last statement.
    policy: crate::policy::PolicyView,
    raw: bool,
    /// How the server reads backslashes now, from the last status flags.
    escapes: Escapes,
    /// The server's version, from its greeting: which executable comments
    /// it runs.
    server: Option<ServerVersion>,
    /// How the server reads the bytes of the client's text now, and at
    /// the start (what `COM_RESET_CONNECTION` goes back to).
    charset: CharsetChange,
    initial_charset: CharsetChange,
    /// Whether the last answer relayed held an ERR.
    answer_failed: bool,
    /// The capabilities client and server agreed on.
    capabilities: u32,
    /// The client file the command being answered may send: the file a
    /// `LOAD DATA LOCAL` that a rule allowed names.
    local_file: Option<String>,
    /// The database user now (for reviewers).
    database_user: Option<String>,
    /// The agent logged in with a brokered credential: the client may not
    /// change the user.
    brokered: bool,
    /// What the legs allow of a `COM_CHANGE_USER`'s authentication.
    auth_legs: AuthLegs,
    /// The largest packet read from the client: the server's
    /// `max_allowed_packet`, at most [`MAX_PACKET`]. A larger one is
    /// answered as the server would answer it, before the agent holds it.
    packet_limit: usize,
    /// The session's last statements, for reviewers of a held one.
    recent: RecentStatements,
    /// Woken when a `KILL` names this connection (ends a held statement).
    interrupt: Option<Arc<tokio::sync::Notify>>,
    /// The rule whose review a reviewer's edit, decided next, went through.
    edited_under: Option<String>,
    /// Bytes read from the server not yet added to the counters.
    from_server_uncounted: u64,
    /// The server's current database.
    database: CurrentDatabase,
    /// Counts changes of `database`: decisions of prepared statements made
    /// under another are made again.
    database_epoch: u64,
    /// What the session's handler and prepared-statement names stand for.
    names: SessionNames,
}

/// How long a TLS handshake with either side may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The two legs once the connection phase is over.
struct Connected {
    client: (ReadHalf, WriteHalf),
    upstream: (ReadHalf, WriteHalf),
    server: Option<ServerVersion>,
    /// The status flags of the OK that ended authentication.
    status: u16,
    /// The connection id the server gave the session.
    connection_id: Option<u32>,
    /// The collation the client's text is read in, from its answer.
    collation: u8,
    /// The capabilities in the client's answer (after the proxy's changes).
    capabilities: u32,
    /// The database user the session logged in as.
    user: String,
    /// Whether the agent logged in with a brokered credential.
    brokered: bool,
    /// What the legs allow of an authentication.
    auth_legs: AuthLegs,
    /// The database it asked for.
    database: Option<String>,
}

/// Serves one session until it ends and says why.
pub async fn run(
    ctx: &SessionContext,
    tls: &TlsState,
    connections: &Connections,
    brokered: Option<&Target>,
    client: TcpStream,
    upstream: TcpStream,
) -> CloseReason {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let serving = async {
        let connected = match connect(ctx, tls, brokered, client, upstream).await {
            Ok(connected) => connected,
            Err(reason) => return reason,
        };
        let uid = ctx.start.info().await.identity.uid;
        let registration = connected.connection_id.map(|id| {
            let interrupt = connections.register(&ctx.target, id, uid);
            let registration = Registration {
                connections,
                target: &ctx.target,
                id,
            };
            (registration, interrupt)
        });
        let (client_read, client_write) = connected.client;
        let (server_read, server_write) = connected.upstream;
        let mut session = Session {
            ctx,
            connections,
            client_in: BufReader::new(client_read),
            client_out: client_write,
            server_in: BufReader::new(server_read),
            server_out: server_write,
            to_client: Vec::with_capacity(16 * 1024),
            to_server: Vec::new(),
            policy: crate::policy::PolicyView::new(&ctx.policy),
            prepared: HashMap::new(),
            last_prepared: None,
            cursor_masks: HashMap::new(),
            decided: HashMap::new(),
            memo: DecisionMemo::default(),
            raw: ctx.events.records_raw(&ctx.target),
            escapes: Escapes::Unknown,
            server: connected.server,
            charset: initial_charset(connected.collation),
            initial_charset: initial_charset(connected.collation),
            answer_failed: false,
            capabilities: connected.capabilities,
            local_file: None,
            database_user: Some(connected.user),
            brokered: connected.brokered,
            auth_legs: connected.auth_legs,
            packet_limit: MAX_PACKET,
            recent: RecentStatements::default(),
            interrupt: registration
                .as_ref()
                .map(|(_, interrupt)| Arc::clone(interrupt)),
            edited_under: None,
            database: CurrentDatabase::from_name(connected.database.as_deref()),
            database_epoch: 0,
            names: SessionNames::default(),
            from_server_uncounted: 0,
        };
        session.note_status_flags(connected.status);
        if let Err(Stop::Closed(reason)) = session.ask_session_state().await {
            return reason;
        }
        loop {
            if let Err(Stop::Closed(reason)) = session.command().await {
                session.count_from_server();
                return reason;
            }
        }
    };
    tokio::select! {
        reason = serving => reason,
        _ = ctx.force_close.cancelled() => CloseReason::Shutdown,
    }
}

/// The connection phase: the greeting, TLS on each leg as configured, the
/// client's answer, authentication relayed.
///
/// The two legs negotiate TLS apart: the client is offered TLS when the
/// agent terminates it, and the server is asked for it as the target's
/// `tls` mode says, with an SSLRequest the proxy makes from the client's
/// answer. An SSLRequest on one leg and not the other shifts the sequence
/// ids of the authentication exchange by one; the proxy renumbers each
/// packet it relays until the exchange ends.
async fn connect(
    ctx: &SessionContext,
    tls: &TlsState,
    brokered: Option<&Target>,
    client: TcpStream,
    mut upstream: TcpStream,
) -> Result<Connected, CloseReason> {
    let raw = ctx.events.records_raw(&ctx.target);
    let mut client = Stream::Plain(client);
    let server_read = |e: PacketError| CloseReason::UpstreamError(e.to_string());
    let client_read = |e: PacketError| CloseReason::ClientError(e.to_string());
    let Some(mut greeting) =
        read_counted(&mut upstream, ctx, RawDirection::Server, raw, MAX_PACKET)
            .await
            .map_err(server_read)?
    else {
        return Err(CloseReason::UpstreamError(
            "closed before its greeting".into(),
        ));
    };
    if packet::is_err(&greeting.payload) {
        // Too many connections, a blocked host: the server's own words.
        write_to(&mut client, &greeting, false).await?;
        return Err(CloseReason::Completed);
    }
    let server = handshake::server_version(&greeting).and_then(ServerVersion::parse);
    let connection_id = handshake::connection_id(&greeting);
    let acceptor = tls.client();
    let offered = handshake::restrict_greeting(&mut greeting, acceptor.is_some())
        .map_err(|e| CloseReason::UpstreamError(e.0))?;
    write_to(&mut client, &greeting, false).await?;

    let mut answer = read_counted(&mut client, ctx, RawDirection::Client, raw, MAX_PACKET)
        .await
        .map_err(client_read)?
        .ok_or(CloseReason::Completed)?;
    let hello = match handshake::read_client_answer(&mut answer) {
        Ok(ClientAnswer::WantsTls) => {
            let Some(acceptor) = acceptor else {
                refuse_at_start(
                    &mut client,
                    answer.next_seq(),
                    "tollgate: the agent does not offer TLS to clients (client_tls is off); connect without it (--skip-ssl, ssl-mode=DISABLED)",
                )
                .await;
                return Err(CloseReason::ClientError(
                    "asked for TLS, not offered".into(),
                ));
            };
            let Stream::Plain(tcp) = client else {
                return Err(CloseReason::ClientError("asked for TLS twice".into()));
            };
            client = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => Stream::Tls(Box::new(tls.into())),
                Ok(Err(e)) => {
                    return Err(CloseReason::ClientError(format!(
                        "the TLS handshake with the client failed: {e}"
                    )))
                }
                Err(_) => {
                    return Err(CloseReason::ClientError(
                        "the TLS handshake with the client did not finish in time".into(),
                    ))
                }
            };
            answer = read_counted(&mut client, ctx, RawDirection::Client, raw, MAX_PACKET)
                .await
                .map_err(client_read)?
                .ok_or(CloseReason::Completed)?;
            match handshake::read_client_answer(&mut answer) {
                Ok(ClientAnswer::Hello(hello)) => hello,
                Ok(ClientAnswer::WantsTls) => {
                    return Err(CloseReason::ClientError("asked for TLS twice".into()))
                }
                Err(e) => {
                    let message = format!("tollgate: {}", e.0);
                    refuse_at_start(&mut client, answer.next_seq(), &message).await;
                    return Err(CloseReason::ClientError(e.0));
                }
            }
        }
        Ok(ClientAnswer::Hello(hello)) => hello,
        Err(e) => {
            let message = format!("tollgate: {}", e.0);
            refuse_at_start(&mut client, answer.next_seq(), &message).await;
            return Err(CloseReason::ClientError(e.0));
        }
    };

    // With brokered credentials, the process decides the login before the
    // server hears of the session.
    let login = match brokered {
        None => None,
        Some(target) => {
            let info = ctx.start.info().await;
            match brokered_login(target, &info.identity, &greeting, &mut answer) {
                Ok(login) => login,
                Err(message) => {
                    refuse_at_start(&mut client, answer.next_seq(), &message).await;
                    return Err(CloseReason::ClientError(message));
                }
            }
        }
    };
    let client_seq = answer.seq;
    let mut upstream = match upstream_leg(ctx, tls, offered, upstream, &answer).await {
        Ok(upstream) => upstream,
        Err(message) => {
            refuse_at_start(&mut client, client_seq.wrapping_add(1), &message).await;
            return Err(CloseReason::UpstreamError(message));
        }
    };
    handshake::set_tls(&mut answer, upstream.is_tls());
    answer.seq = if upstream.is_tls() { 2 } else { 1 };
    let shift = answer.seq.wrapping_sub(client_seq);
    tls::log_legs(ctx, &client, &upstream);
    // A brokered login sends the agent's answer, never the client's.
    let auth_legs = AuthLegs {
        withhold_clear_password: login.is_none()
            && tls::clear_password_exposed(&client, &upstream, ctx.upstream_addr),
        key_request_unanswered: !client.is_tls() && upstream.is_tls(),
    };
    let watch = AuthWatch {
        target: &ctx.target,
        legs: auth_legs,
        plugin: hello.auth_plugin.clone(),
    };
    if let Some(message) = watch.refusal_of_answer() {
        refuse_login(&mut client, client_seq.wrapping_add(1), &message).await;
        return Err(CloseReason::UpstreamError(message));
    }
    write_to(&mut upstream, &answer, true).await?;
    let (mut client_in, mut client_out) = client.split();
    let (mut server_in, mut server_out) = upstream.split();
    let legs = Legs {
        client_in: &mut client_in,
        client_out: &mut client_out,
        server_in: &mut server_in,
        server_out: &mut server_out,
    };
    let authenticated = match &login {
        None => relay_authentication(ctx, raw, legs, shift, watch).await?,
        Some(login) => {
            brokered_authentication(ctx, raw, legs, client_seq, login, &ctx.target).await?
        }
    };
    let Some(status) = authenticated else {
        return Err(CloseReason::Completed);
    };
    let collation = hello.collation;
    let capabilities = hello.capabilities;
    let info = ctx.start.info().await;
    let brokered_user = login.as_ref().map(|l| l.user.clone());
    let user = brokered_user.clone().unwrap_or_else(|| hello.user.clone());
    let database = hello.database.clone();
    ctx.events.emit(&SessionEvent::Startup {
        session: info.id,
        user: Some(hello.user),
        database: hello.database,
        application_name: None,
        brokered_user,
    });
    Ok(Connected {
        client: (client_in, client_out),
        upstream: (server_in, server_out),
        server,
        status,
        connection_id,
        collation,
        capabilities,
        user,
        brokered: login.is_some(),
        auth_legs,
        database,
    })
}

/// A login with a brokered credential: the user, and the password the
/// server's scrambles are answered with.
struct BrokeredLogin {
    user: String,
    password: crate::config::secret::Secret,
}

/// Chooses the credential `identity` logs in to `target` with and rewrites
/// the client's `answer` to log in with it over the greeting's scramble;
/// `None` when the client logs in with its own; the client's refusal when
/// no credential is for it or its password cannot be read.
fn brokered_login(
    target: &Target,
    identity: &crate::identity::ProcessIdentity,
    greeting: &Packet,
    answer: &mut Packet,
) -> Result<Option<BrokeredLogin>, String> {
    let Some((_, credential)) = target.login_for(identity)? else {
        return Ok(None);
    };
    let name = &target.name;
    let user = &credential.user;
    let Some(file) = &credential.password_file else {
        return Err(format!(
            "tollgate: target \"{name}\": the brokered credential for user \"{user}\" has no password_file"
        ));
    };
    let password = crate::config::secret::read_secret_file(file).map_err(|e| {
        format!("tollgate: target \"{name}\": the brokered credential for user \"{user}\" cannot be used: {e}")
    })?;
    let scramble = broker::scramble(greeting).ok_or_else(|| {
        format!("tollgate: target \"{name}\": the server's greeting has no scramble")
    })?;
    let auth = broker::native_password(password.expose(), &scramble);
    broker::login_as(answer, user, &auth).map_err(|e| format!("tollgate: {}", e.0))?;
    Ok(Some(BrokeredLogin {
        user: user.clone(),
        password,
    }))
}

/// The server's side of a brokered login, once the rewritten answer was
/// forwarded: an auth switch to `mysql_native_password` is answered with
/// the password, anything else refused; the client sees only the final OK
/// (numbered as the answer to its own packet `client_seq`) or an ERR that
/// names the target and the user. The OK's status flags; `None` after an
/// ERR.
async fn brokered_authentication<CR, CW, SR, SW>(
    ctx: &SessionContext,
    raw: bool,
    legs: Legs<'_, CR, CW, SR, SW>,
    client_seq: u8,
    login: &BrokeredLogin,
    target: &str,
) -> Result<Option<u16>, CloseReason>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let user = &login.user;
    loop {
        let mut reply = auth_packet(legs.server_in, ctx, raw).await?;
        let refusal = match reply.first() {
            Some(0x00) => {
                reply.seq = client_seq.wrapping_add(1);
                write_to(legs.client_out, &reply, false).await?;
                tracing::info!(session = %ctx.id, user = %user, "logged in to the server with a brokered credential");
                return Ok(Some(packet::status_flags(&reply.payload).unwrap_or(0)));
            }
            Some(0xFF) => format!(
                "tollgate: target \"{target}\": the server refused the brokered credential for user \"{user}\": {}",
                packet::err_message(&reply.payload).unwrap_or_default()
            ),
            Some(0xFE) => match broker::auth_switch(&reply.payload) {
                Some((broker::NATIVE_PASSWORD, scramble)) => {
                    let auth = broker::native_password(login.password.expose(), scramble);
                    let answer = Packet {
                        seq: reply.next_seq(),
                        payload: auth,
                    };
                    write_to(legs.server_out, &answer, true).await?;
                    continue;
                }
                Some((plugin, _)) => format!(
                    "tollgate: target \"{target}\": the server asks for the {plugin} plugin for user \"{user}\"; brokered credentials answer mysql_native_password"
                ),
                None => format!("tollgate: target \"{target}\": an authentication request the agent cannot read"),
            },
            _ => format!(
                "tollgate: target \"{target}\": the server asks for more authentication data for user \"{user}\"; brokered credentials answer mysql_native_password"
            ),
        };
        refuse_at_start(legs.client_out, client_seq.wrapping_add(1), &refusal).await;
        tracing::warn!(session = %ctx.id, "closing the session: {refusal}");
        return Ok(None);
    }
}

/// The upstream leg as the target's `tls` mode says, given the
/// capabilities the server `offered` and the client's `answer` (from which
/// an SSLRequest is made); the message for the client when it cannot be
/// had.
async fn upstream_leg(
    ctx: &SessionContext,
    tls: &TlsState,
    offered: u32,
    mut upstream: TcpStream,
    answer: &Packet,
) -> Result<Stream, String> {
    let target = &ctx.target;
    let mode = tls.upstream(target);
    let (connector, name, verify_full) = match mode {
        UpstreamMode::Disable => return Ok(Stream::Plain(upstream)),
        UpstreamMode::Prefer(_) if offered & handshake::caps::SSL == 0 => {
            tracing::debug!(session = %ctx.id, "the server does not offer TLS; going on in plaintext (tls = \"prefer\")");
            return Ok(Stream::Plain(upstream));
        }
        _ if offered & handshake::caps::SSL == 0 => {
            return Err(format!(
                "tollgate: target \"{target}\" requires TLS but the server does not offer it"
            ))
        }
        UpstreamMode::Prefer(c) | UpstreamMode::Require(c) => (c, None, false),
        UpstreamMode::VerifyFull {
            connector,
            server_name,
        } => (connector, server_name.as_deref(), true),
    };
    let mut request = handshake::ssl_request(answer).map_err(|e| format!("tollgate: {}", e.0))?;
    request.seq = 1;
    packet::write_packet(&mut upstream, &request)
        .await
        .map_err(|e| format!("tollgate: target \"{target}\": {e}"))?;
    let name = name.unwrap_or(&ctx.upstream_name);
    let server_name = tls::server_name(name)
        .map_err(|e| format!("tollgate: target \"{target}\": {e}; set tls_server_name"))?;
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, connector.connect(server_name, upstream))
        .await
    {
        Ok(Ok(tls)) => Ok(Stream::Tls(Box::new(tls.into()))),
        Ok(Err(e)) => Err(format!(
            "tollgate: target \"{target}\": TLS to the server failed ({} mode, server name \"{name}\"): {}",
            mode.name(),
            tls::describe_handshake_error(&e, verify_full)
        )),
        Err(_) => Err(format!(
            "tollgate: target \"{target}\": the TLS handshake with the server did not finish in time"
        )),
    }
}

/// Both legs of a session, each read and written apart.
struct Legs<'l, CR, CW, SR, SW> {
    client_in: &'l mut CR,
    client_out: &'l mut CW,
    server_in: &'l mut SR,
    server_out: &'l mut SW,
}

/// Relays an authentication exchange (at the start, or after a
/// `COM_CHANGE_USER`) once the packet that began it has been forwarded:
/// every server packet but the last asks the client for one more (an auth
/// switch, a plugin's challenge), except caching_sha2's "fast path done",
/// which an OK follows unasked. Sequence ids towards the server are the
/// client's plus `shift` (an SSLRequest on one leg only). The status flags
/// of the server's OK; `None` when it answered with an ERR.
async fn relay_authentication<CR, CW, SR, SW>(
    ctx: &SessionContext,
    raw: bool,
    legs: Legs<'_, CR, CW, SR, SW>,
    shift: u8,
    mut watch: AuthWatch<'_>,
) -> Result<Option<u16>, CloseReason>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    loop {
        let mut reply = auth_packet(legs.server_in, ctx, raw).await?;
        reply.seq = reply.seq.wrapping_sub(shift);
        if let Some(message) = watch.refusal_of(&reply.payload) {
            // The client never hears the request, so never sends the
            // password; the server's half-done exchange ends with the
            // session.
            refuse_login(legs.client_out, reply.seq, &message).await;
            return Err(CloseReason::UpstreamError(message));
        }
        write_to(legs.client_out, &reply, false).await?;
        match reply.first() {
            Some(0x00) => return Ok(Some(packet::status_flags(&reply.payload).unwrap_or(0))),
            Some(0xFF) => return Ok(None),
            _ if reply.payload == [0x01, 0x03] => continue,
            _ => {
                let mut more =
                    read_counted(legs.client_in, ctx, RawDirection::Client, raw, MAX_PACKET)
                        .await
                        .map_err(|e| CloseReason::ClientError(e.to_string()))?
                        .ok_or(CloseReason::Completed)?;
                if let Some(message) = watch.refusal_of_client(&more.payload) {
                    // The server would read the request as a wrong password.
                    refuse_login(legs.client_out, more.next_seq(), &message).await;
                    return Err(CloseReason::ClientError(message));
                }
                more.seq = more.seq.wrapping_add(shift);
                write_to(legs.server_out, &more, true).await?;
            }
        }
    }
}

/// What the TLS of a session's two legs allows of an authentication the
/// agent relays.
#[derive(Debug, Clone, Copy, Default)]
struct AuthLegs {
    /// A password the client would send in clear is not relayed
    /// (`tls::clear_password_exposed`).
    withhold_clear_password: bool,
    /// The client's leg is plaintext and the server's TLS: the server takes
    /// a request for its RSA key (caching_sha2_password's full path on a
    /// plaintext connection) for a wrong password, so the agent refuses it,
    /// saying why.
    key_request_unanswered: bool,
}

/// Watches a relayed authentication exchange for a request that would
/// have the client send its password in clear while that password may not
/// cross the server's leg in clear, and for a request for the server's
/// RSA key that the server will not answer.
struct AuthWatch<'t> {
    target: &'t str,
    legs: AuthLegs,
    /// The plugin the exchange is in: the client's, then the server's
    /// last switch.
    plugin: Option<String>,
}

impl AuthWatch<'_> {
    /// The refusal of a client's answer (or `COM_CHANGE_USER`) that was
    /// made with a plugin that sends the password itself.
    fn refusal_of_answer(&self) -> Option<String> {
        let plugin = self.plugin.as_deref()?;
        (self.legs.withhold_clear_password && handshake::sends_password_in_clear(plugin)).then(
            || {
                tls::clear_password_refusal(
                    self.target,
                    &format!("the client answered with {plugin}"),
                )
            },
        )
    }

    /// The refusal in place of the server's `reply`, when relaying it
    /// would have the client answer with its password in clear.
    fn refusal_of(&mut self, reply: &[u8]) -> Option<String> {
        if let Some(plugin) = handshake::auth_switch_plugin(reply) {
            let clear = handshake::sends_password_in_clear(&plugin);
            let how = format!("an authentication switch to {plugin}");
            self.plugin = Some(plugin);
            return (self.legs.withhold_clear_password && clear)
                .then(|| tls::clear_password_refusal(self.target, &how));
        }
        let full_path = reply == handshake::CACHING_SHA2_FULL_PATH
            && self.plugin.as_deref() == Some("caching_sha2_password");
        (self.legs.withhold_clear_password && full_path).then(|| {
            tls::clear_password_refusal(self.target, "caching_sha2_password's full authentication")
        })
    }

    /// The refusal in place of the client's `answer` to the server, when
    /// the server would not read it as the client means it.
    fn refusal_of_client(&self, answer: &[u8]) -> Option<String> {
        let key_request = answer == [handshake::REQUEST_PUBLIC_KEY]
            && self.plugin.as_deref() == Some("caching_sha2_password");
        (self.legs.key_request_unanswered && key_request).then(|| {
            format!(
                "tollgate: target \"{}\": the client asks for the server's RSA key (caching_sha2_password without TLS), but the agent's connection to the server is TLS, over which the server does not send it; connect with TLS (the agent's client_tls = \"terminate\")",
                self.target
            )
        })
    }
}

/// Ends the connection phase (or a `COM_CHANGE_USER`) with an access
/// denied error that says why.
async fn refuse_login<W: AsyncWrite + Unpin>(client: &mut W, seq: u8, message: &str) {
    let err = packet::err_payload(ER_ACCESS_DENIED, "28000", message);
    let _ = write_to(client, &Packet { seq, payload: err }, false).await;
}

/// The server's next packet of an authentication exchange (its end is an
/// error).
async fn auth_packet<R: AsyncRead + Unpin>(
    server: &mut R,
    ctx: &SessionContext,
    raw: bool,
) -> Result<Packet, CloseReason> {
    read_counted(server, ctx, RawDirection::Server, raw, MAX_PACKET)
        .await
        .map_err(|e| CloseReason::UpstreamError(e.to_string()))?
        .ok_or_else(|| CloseReason::UpstreamError("closed during authentication".into()))
}

/// Writes one packet of the connection phase to a leg (`to_server`: the
/// upstream).
async fn write_to<W: AsyncWrite + Unpin>(
    leg: &mut W,
    packet: &Packet,
    to_server: bool,
) -> Result<(), CloseReason> {
    let written = async {
        packet::write_packet(leg, packet).await?;
        leg.flush().await
    };
    written.await.map_err(|e| {
        if to_server {
            CloseReason::UpstreamError(e.to_string())
        } else {
            CloseReason::ClientError(e.to_string())
        }
    })
}

/// Answers during the connection phase, which then ends.
async fn refuse_at_start<W: AsyncWrite + Unpin>(client: &mut W, seq: u8, message: &str) {
    let err = packet::err_payload(ER_SPECIFIC_ACCESS_DENIED, "08004", message);
    let _ = write_to(client, &Packet { seq, payload: err }, false).await;
}

impl Session<'_> {
    /// Reads one command, decides it, and relays its answer.
    async fn command(&mut self) -> Result<(), Stop> {
        let idle = self.ctx.idle_timeout;
        let read = read_counted(
            &mut self.client_in,
            self.ctx,
            RawDirection::Client,
            self.raw,
            self.packet_limit,
        );
        let Ok(read) = tokio::time::timeout(idle, read).await else {
            return Err(CloseReason::IdleTimeout.into());
        };
        let mut command = match read {
            Ok(Some(command)) => command,
            Ok(None) => return Err(CloseReason::Completed.into()),
            Err(e @ PacketError::TooLarge { .. }) => {
                let whose = if self.packet_limit < MAX_PACKET {
                    " (the server's max_allowed_packet)"
                } else {
                    ""
                };
                let err = packet::err_payload(
                    ER_NET_PACKET_TOO_LARGE,
                    "08S01",
                    &format!("tollgate: {e}{whose}"),
                );
                self.answer_client(1, err).await?;
                self.close_after_err().await;
                return Err(CloseReason::ClientError(e.to_string()).into());
            }
            Err(e) => return Err(CloseReason::ClientError(e.to_string()).into()),
        };
        if let Some(cause) = self.ctx.events.recording_failure() {
            let err = packet::err_payload(
                ER_SPECIFIC_ACCESS_DENIED,
                "HY000",
                "tollgate: session recording has failed, and nothing may run unrecorded",
            );
            self.answer_client(command.next_seq(), err).await?;
            return Err(CloseReason::RecordingFailed(cause).into());
        }
        // A command starts an exchange: anything else is a client that lost
        // track of the protocol, which the server would end too.
        let fault = match (command.seq, command.payload.is_empty()) {
            (0, false) => None,
            (0, true) => Some((
                ER_MALFORMED_PACKET,
                "tollgate: an empty command packet".to_owned(),
            )),
            (seq, _) => Some((
                ER_NET_PACKETS_OUT_OF_ORDER,
                format!(
                    "tollgate: got packets out of order (a command with sequence id {seq}, not 0)"
                ),
            )),
        };
        if let Some((code, message)) = fault {
            let err = packet::err_payload(code, "08S01", &message);
            self.answer_client(command.next_seq(), err).await?;
            return Err(CloseReason::ClientError(message).into());
        }
        let reply_seq = command.next_seq();
        self.local_file = None;
        match command.first() {
            Some(com::QUIT) => {
                self.send_to_server(&command).await?;
                Err(CloseReason::Completed.into())
            }
            Some(com::QUERY) => {
                let Some(mut text) = self.text_of(&mut command, reply_seq).await? else {
                    return Ok(());
                };
                loop {
                    let analysis = self.analyze(&text);
                    match self
                        .decide(&text, &analysis, reply_seq, Phase::Query)
                        .await?
                    {
                        Verdict::Refused => return Ok(()),
                        Verdict::Run(plan) => {
                            self.send_to_server(&command).await?;
                            self.relay_results(false, plan.as_ref(), None).await?;
                            self.follow_names(&analysis);
                            self.interrupt_killed(&analysis);
                            self.follow_charset(&analysis);
                            self.follow_use(&analysis);
                            return Ok(());
                        }
                        Verdict::Edited(edit) => {
                            let mut payload = vec![com::QUERY];
                            payload.extend_from_slice(edit.as_bytes());
                            command.payload = payload;
                            let Some(resolved) = self.text_of(&mut command, reply_seq).await?
                            else {
                                self.edited_under = None;
                                return Ok(());
                            };
                            text = resolved;
                        }
                    }
                }
            }
            Some(com::STMT_PREPARE) => {
                let Some(text) = self.text_of(&mut command, reply_seq).await? else {
                    return Ok(());
                };
                let mut analysis = self.analyze(&text);
                // The server resolves the statement's tables when it
                // prepares it; each execution is decided under the
                // database current then too.
                if let CurrentDatabase::Known(db) = &self.database {
                    if let Some(qualified) =
                        crate::sql::mysql::in_database(&analysis, Some(db), true)
                    {
                        analysis = qualified;
                    }
                }
                if let Verdict::Run(_) = self
                    .decide(&text, &analysis, reply_seq, Phase::Prepare)
                    .await?
                {
                    self.send_to_server(&command).await?;
                    self.relay_prepare(text, analysis).await?;
                }
                Ok(())
            }
            Some(com::STMT_EXECUTE) => {
                let id = statement_id(&command.payload);
                let id = match id {
                    Some(u32::MAX) => self.last_prepared,
                    other => other,
                };
                let prepared = id.and_then(|id| self.prepared.get(&id)).map(Arc::clone);
                let mut plan = None;
                if let (Some(prepared), Some(id)) = (&prepared, id) {
                    match self
                        .decide(
                            &prepared.text,
                            &prepared.analysis,
                            reply_seq,
                            Phase::Execute(id),
                        )
                        .await?
                    {
                        Verdict::Refused => return Ok(()),
                        Verdict::Run(masked) => plan = masked,
                        Verdict::Edited(_) => {
                            let err = packet::err_payload(
                                ER_TABLEACCESS_DENIED,
                                "42000",
                                "tollgate: a reviewer's edit cannot take the place of an execution of a prepared statement (its parameters are bound to the original); refused",
                            );
                            self.answer_client(reply_seq, err).await?;
                            return Ok(());
                        }
                    }
                }
                // An id the proxy did not see prepared is the server's to
                // refuse: statements are only prepared through this session.
                if let Some(id) = id {
                    self.cursor_masks.remove(&id);
                }
                self.send_to_server(&command).await?;
                self.relay_results(true, plan.as_ref(), id).await?;
                if let Some(prepared) = prepared {
                    self.follow_names(&prepared.analysis);
                    self.interrupt_killed(&prepared.analysis);
                    self.follow_charset(&prepared.analysis);
                }
                Ok(())
            }
            Some(com::STMT_CLOSE) => {
                if let Some(id) = statement_id(&command.payload) {
                    self.prepared.remove(&id);
                    self.cursor_masks.remove(&id);
                    self.decided.remove(&id);
                }
                self.send_to_server(&command).await
            }
            Some(com::STMT_SEND_LONG_DATA) => self.send_to_server(&command).await,
            Some(com::STMT_FETCH) => {
                let mask = statement_id(&command.payload)
                    .and_then(|id| self.cursor_masks.get(&id).cloned());
                self.send_to_server(&command).await?;
                let (_, withheld) = self.relay_rows_after_metadata(mask.as_ref(), true).await?;
                self.flush_client().await?;
                if withheld {
                    self.clear_diagnostics().await?;
                }
                Ok(())
            }
            Some(com::FIELD_LIST) => {
                self.send_to_server(&command).await?;
                self.relay_rows_after_metadata(None, false).await?;
                self.flush_client().await
            }
            Some(com::RESET_CONNECTION) => {
                self.prepared.clear();
                self.cursor_masks.clear();
                self.decided.clear();
                self.charset = self.initial_charset.clone();
                self.last_prepared = None;
                self.send_to_server(&command).await?;
                self.relay_one().await
            }
            Some(com::INIT_DB) => {
                let name = String::from_utf8_lossy(command.payload.get(1..).unwrap_or_default())
                    .into_owned();
                self.send_to_server(&command).await?;
                let answer = self.server_packet().await?;
                self.queue_for_client(&answer);
                self.note_status(&answer.payload);
                if answer.first() == Some(0x00) {
                    self.set_database(CurrentDatabase::from_name(Some(&name)));
                }
                self.flush_client().await
            }
            Some(com::PING | com::STATISTICS | com::STMT_RESET | com::SET_OPTION) => {
                self.send_to_server(&command).await?;
                self.relay_one().await
            }
            Some(com::CHANGE_USER) => self.change_user(command).await,
            Some(com::PROCESS_KILL) => {
                let info = self.ctx.start.info().await;
                let id = statement_id(&command.payload);
                let owned = id.is_some_and(|id| {
                    self.connections
                        .owned_by(&self.ctx.target, id, info.identity.uid)
                });
                if let (true, Some(id)) = (owned, id) {
                    self.connections.interrupt(&self.ctx.target, id);
                    self.send_to_server(&command).await?;
                    return self.relay_one().await;
                }
                let err = packet::err_payload(
                    ER_KILL_DENIED,
                    "42000",
                    &format!(
                        "tollgate: COM_PROCESS_KILL of connection {} refused: it was not opened through the agent by a process of this user",
                        id.map_or_else(|| "?".to_owned(), |id| id.to_string())
                    ),
                );
                self.answer_client(reply_seq, err).await
            }
            Some(c @ (com::BINLOG_DUMP | com::BINLOG_DUMP_GTID | com::REGISTER_SLAVE)) => {
                self.replication(c, &command).await
            }
            Some(other) => {
                let err = packet::err_payload(
                    ER_UNKNOWN_COM,
                    "08S01",
                    &format!("tollgate: command 0x{other:02x} is not supported through the agent"),
                );
                self.answer_client(reply_seq, err).await
            }
            None => Err(CloseReason::ClientError("an empty command packet".into()).into()),
        }
    }

    /// A replication command: decided by the policy under its name
    /// (`COM_BINLOG_DUMP`, ...), and refused unless a rule (not a default)
    /// allows it, for it streams every change the server makes, of every
    /// table, past the statement gate. Allowed, the server's stream is
    /// relayed packet by packet to its end.
    async fn replication(&mut self, code: u8, command: &Packet) -> Result<(), Stop> {
        let name = command_name(code);
        let analysis = crate::sql::mysql::command_summary(name);
        let info = self.ctx.start.info().await;
        let policy = crate::policy::current_policy(&self.ctx.policy);
        let decisions = policy.decide_analysis(&self.ctx.target, &info.identity, name, &analysis);
        let top = most_restrictive(&decisions);
        let refusal = match top {
            Some(d) if d.action.is_refused() => Some(d.client_message(name)),
            Some(d) if d.deciding_rule().is_some() && matches!(d.action, Action::Allow | Action::Audit) => None,
            _ => Some(format!(
                "tollgate: {name} refused: no rule allows it (a rule with action \"allow\" matching commands = [\"{name}\"] does); replication streams every change of every table past the statement gate"
            )),
        };
        self.report(
            name,
            &analysis,
            &decisions,
            refusal.is_some(),
            &info.identity,
            None,
        );
        if let Some(message) = refusal {
            let err = packet::err_payload(ER_SPECIFIC_ACCESS_DENIED, "42000", &message);
            return self.answer_client(command.next_seq(), err).await;
        }
        self.send_to_server(command).await?;
        if code == com::REGISTER_SLAVE {
            return self.relay_one().await;
        }
        // Binlog events, each an OK-marked packet, up to an EOF (the end of
        // the logs with BINLOG_DUMP_NON_BLOCK) or an ERR; a blocking dump
        // never ends.
        loop {
            let at = self.relay_server_packet().await?;
            let payload = self.to_client.get(at.first.clone()).unwrap_or_default();
            let end =
                (at.len < 9 && payload.first() == Some(&0xFE)) || payload.first() == Some(&0xFF);
            // Written out whenever nothing more has arrived yet.
            if end || self.server_in.buffer().is_empty() || self.to_client.len() >= FLUSH_AT {
                self.flush_client().await?;
            }
            if end {
                return Ok(());
            }
        }
    }

    /// Analyses a statement text as the server will read it. A text of
    /// several statements may change `sql_mode` part way, so it must read
    /// alike either way.
    fn analyze(&self, text: &str) -> Analysis {
        let analysis = crate::sql::mysql::analyze_read(text, self.escapes);
        match &analysis {
            Analysis::Parsed { statements } if statements.len() > 1 => {
                crate::sql::mysql::analyze_read(text, Escapes::Unknown)
            }
            _ => analysis,
        }
    }

    /// Follows the server's status flags (an OK or EOF packet).
    fn note_status(&mut self, payload: &[u8]) {
        if let Some(status) = packet::status_flags(payload) {
            self.note_status_flags(status);
        }
    }

    fn note_status_flags(&mut self, status: u16) {
        self.escapes = if status & NO_BACKSLASH_ESCAPES != 0 {
            Escapes::NoBackslash
        } else {
            Escapes::Backslash
        };
    }

    /// The statement text of a COM_QUERY or COM_STMT_PREPARE, with its
    /// executable comments resolved for the server (the command is
    /// rewritten to carry that text: what is decided is what the server
    /// reads); `None` (after answering with an error) when it is not UTF-8,
    /// which the analysis could not read as the server would.
    async fn text_of(
        &mut self,
        command: &mut Packet,
        reply_seq: u8,
    ) -> Result<Option<String>, Stop> {
        let body = command.payload.get(1..).unwrap_or_default();
        let text = match std::str::from_utf8(body) {
            Ok(text) => text,
            Err(e) => {
                let err = packet::err_payload(
                    ER_TABLEACCESS_DENIED,
                    "42000",
                    &format!("tollgate: the statement is not valid UTF-8 ({e}); the agent decides UTF-8 text only"),
                );
                self.answer_client(reply_seq, err).await?;
                return Ok(None);
            }
        };
        // Unresolvable text stays as it is, and the analysis refuses it.
        let resolved = self.server.and_then(|server| {
            match crate::sql::mysql::resolve_executable_comments(text, self.escapes, server) {
                Ok(std::borrow::Cow::Owned(resolved)) => Some(resolved),
                _ => None,
            }
        });
        match resolved {
            Some(resolved) => {
                let mut payload = Vec::with_capacity(resolved.len() + 1);
                payload.extend_from_slice(command.payload.get(..1).unwrap_or_default());
                payload.extend_from_slice(resolved.as_bytes());
                command.payload = payload;
                Ok(Some(resolved))
            }
            None => Ok(Some(text.to_owned())),
        }
    }

    /// Decides a statement text and reports it; when it may not run,
    /// answers the client with an ERR naming the rule. An execution of a
    /// prepared statement reuses the decisions of its last execution under
    /// the same policy. A statement a `review` rule takes waits here for
    /// its reviewers (`review.rs`).
    async fn decide(
        &mut self,
        text: &str,
        analysis: &Analysis,
        reply_seq: u8,
        phase: Phase,
    ) -> Result<Verdict, Stop> {
        let edited_under = self.edited_under.take();
        let info = self.ctx.start.info().await;
        // A statement that uses a handler's or a prepared statement's name
        // is decided as reading what the name stands for.
        let (resolved, names_refusal) = match self.names.resolve(analysis) {
            Ok(resolved) => (resolved, None),
            Err(message) => (None, Some(message)),
        };
        let analysis = resolved.as_ref().unwrap_or(analysis);
        let generation = (
            self.policy.get(&self.ctx.policy).generation(),
            self.database_epoch,
            self.names.epoch(),
        );
        let prepared = match phase {
            Phase::Execute(id) => Some(id),
            Phase::Query | Phase::Prepare => None,
        };
        let known = prepared
            .and_then(|id| self.decided.get(&id))
            .filter(|decided| decided.under == generation)
            .map(|decided| Arc::clone(&decided.decisions));
        let decisions = match known {
            Some(decisions) => decisions,
            None => {
                // Tables named without a database are the current one's.
                let current = match &self.database {
                    CurrentDatabase::Known(db) => Some(db.as_str()),
                    CurrentDatabase::None | CurrentDatabase::Unknown(_) => None,
                };
                let qualified = crate::sql::mysql::in_database(analysis, current, false);
                let decisions = self.memo.decide(
                    self.policy.get(&self.ctx.policy),
                    &self.ctx.target,
                    &info.identity,
                    text,
                    qualified.as_ref().unwrap_or(analysis),
                );
                if let Some(id) = prepared {
                    self.decided.insert(
                        id,
                        Decided {
                            under: generation,
                            decisions: Arc::clone(&decisions),
                            ran: None,
                            plan: None,
                        },
                    );
                }
                decisions
            }
        };
        let mut effective: Arc<[Decision]> = Arc::clone(&decisions);
        // Refused before any review: nothing a reviewer says would let it run.
        let mut refusal = names_refusal
            .or_else(|| self.unknown_database_refusal(analysis))
            .map(|message| (ER_TABLEACCESS_DENIED, message));
        let wants_review = refusal.is_none()
            && most_restrictive(&decisions).is_some_and(|d| d.action == Action::Review);
        if wants_review && phase == Phase::Prepare {
            // Preparing runs nothing; each execution is held.
            effective = decisions.iter().map(Decision::reviewed).collect();
        } else if wants_review {
            match self
                .review(text, analysis, &decisions, &info.identity, edited_under)
                .await?
            {
                Reviewed::Approved => {
                    effective = decisions.iter().map(Decision::reviewed).collect();
                }
                Reviewed::Edited(edit) => {
                    // Only a query's edit runs (and is decided next).
                    if phase == Phase::Query {
                        self.edited_under = most_restrictive(&decisions)
                            .and_then(|d| d.deciding_rule())
                            .map(|r| r.name.to_string());
                    }
                    return Ok(Verdict::Edited(edit));
                }
                Reviewed::Refused { code, message } => refusal = Some((code, message)),
            }
        }
        let command = command_label(analysis);
        let refusal = refusal
            .or_else(|| {
                most_restrictive(&effective)
                    .filter(|d| d.action.is_refused())
                    .map(|d| (ER_TABLEACCESS_DENIED, d.client_message(command)))
            })
            .or_else(|| {
                self.charset_refusal(text, analysis)
                    .map(|message| (ER_TABLEACCESS_DENIED, message))
            })
            .or_else(|| {
                self.foreign_kill(analysis, info.identity.uid)
                    .map(|message| (ER_KILL_DENIED, message))
            })
            .or_else(|| {
                self.allow_local_file(analysis, &effective)
                    .err()
                    .map(|message| (ER_TABLEACCESS_DENIED, message))
            });
        let (plan, refusal) = match refusal {
            Some(refused) => (None, Some(refused)),
            None => {
                match self.mask_plan_for(prepared, generation, analysis, &decisions, &effective) {
                    Ok(plan) => (plan, None),
                    Err(message) => (None, Some((ER_TABLEACCESS_DENIED, message))),
                }
            }
        };
        self.report(
            text,
            analysis,
            &decisions,
            refusal.is_some(),
            &info.identity,
            prepared,
        );
        let Some((code, message)) = refusal else {
            return Ok(Verdict::Run(plan));
        };
        let sqlstate = if code == review::ER_QUERY_INTERRUPTED {
            "70100"
        } else {
            "42000"
        };
        let err = packet::err_payload(code, sqlstate, &message);
        self.answer_client(reply_seq, err).await?;
        Ok(Verdict::Refused)
    }

    /// [`mask_plan`] of a statement's effective decisions; for an
    /// execution of a prepared statement under its last decisions, the
    /// plan made at the first such execution.
    fn mask_plan_for(
        &mut self,
        prepared: Option<u32>,
        generation: DecidedUnder,
        analysis: &Analysis,
        decisions: &Arc<[Decision]>,
        effective: &Arc<[Decision]>,
    ) -> Result<Option<MaskPlan>, String> {
        // A reviewed execution's effective decisions are its own.
        let decided = prepared
            .filter(|_| Arc::ptr_eq(decisions, effective))
            .and_then(|id| self.decided.get_mut(&id))
            .filter(|decided| decided.under == generation);
        match decided {
            Some(decided) => decided
                .plan
                .get_or_insert_with(|| mask_plan(analysis, effective))
                .clone(),
            None => mask_plan(analysis, effective),
        }
    }

    /// Relays a `COM_CHANGE_USER` and its authentication exchange (the
    /// server checks the new user's own credentials, as at the start). On
    /// success the session starts afresh on the server: its prepared
    /// statements are gone, its character set is the one asked for, and
    /// the new user is recorded as a new start-up.
    async fn change_user(&mut self, command: Packet) -> Result<(), Stop> {
        if self.brokered {
            let err = packet::err_payload(
                ER_SPECIFIC_ACCESS_DENIED,
                "42000",
                "tollgate: COM_CHANGE_USER is refused on a session the agent logged in with a brokered credential",
            );
            return self.answer_client(command.next_seq(), err).await;
        }
        let Some(change) = handshake::read_change_user(&command.payload, self.capabilities) else {
            let err = packet::err_payload(
                ER_UNKNOWN_COM,
                "08S01",
                "tollgate: a COM_CHANGE_USER the agent cannot read",
            );
            return self.answer_client(command.next_seq(), err).await;
        };
        let watch = AuthWatch {
            target: &self.ctx.target,
            legs: self.auth_legs,
            plugin: change.auth_plugin.clone(),
        };
        if let Some(message) = watch.refusal_of_answer() {
            // Like a failed change at the server, it ends the session.
            refuse_login(&mut self.client_out, command.next_seq(), &message).await;
            return Err(CloseReason::UpstreamError(message).into());
        }
        self.send_to_server(&command).await?;
        let legs = Legs {
            client_in: &mut self.client_in,
            client_out: &mut self.client_out,
            server_in: &mut self.server_in,
            server_out: &mut self.server_out,
        };
        let Some(status) = relay_authentication(self.ctx, self.raw, legs, 0, watch).await? else {
            return Ok(());
        };
        self.prepared.clear();
        self.cursor_masks.clear();
        self.decided.clear();
        self.last_prepared = None;
        self.note_status_flags(status);
        self.charset = match change.collation {
            Some(collation) => initial_charset(collation),
            None => CharsetChange::Unknown,
        };
        let info = self.ctx.start.info().await;
        self.database_user = Some(change.user.clone());
        self.set_database(CurrentDatabase::from_name(change.database.as_deref()));
        // The new user's init_connect ran.
        self.ask_session_state().await?;
        self.ctx.events.emit(&SessionEvent::Startup {
            session: info.id,
            user: Some(change.user),
            database: change.database,
            application_name: None,
            brokered_user: None,
        });
        Ok(())
    }

    /// Why a text with non-ASCII characters may not run: the server reads
    /// it in a character set whose multi-byte characters can end in a
    /// quote or backslash byte (GBK's `0xbf5c`), or one not known, so its
    /// strings may end elsewhere than the UTF-8 analysis found; or the text
    /// itself changes the character set.
    fn charset_refusal(&self, text: &str, analysis: &Analysis) -> Option<String> {
        if text.is_ascii() {
            return None;
        }
        if charset_change(analysis).is_some() {
            return Some(
                "tollgate: a text with non-ASCII characters may not also change the client character set; send the SET on its own"
                    .to_owned(),
            );
        }
        match &self.charset {
            CharsetChange::Safe => None,
            CharsetChange::Unsafe(name) => Some(format!(
                "tollgate: text with non-ASCII characters is refused while the server reads it as {name}, whose multi-byte characters can hide a quote or backslash; use utf8mb4 (SET NAMES utf8mb4)"
            )),
            CharsetChange::Unknown => Some(
                "tollgate: text with non-ASCII characters is refused while the session's client character set is not known to the agent (changed by a variable, an expression or a CALL); SET NAMES utf8mb4 first"
                    .to_owned(),
            ),
        }
    }

    /// Follows what a command that ran did to the client character set; a
    /// change to a safe one counts only if the answer held no error.
    fn follow_charset(&mut self, analysis: &Analysis) {
        if let Some(change) = charset_change(analysis) {
            self.charset = match change {
                CharsetChange::Safe if self.answer_failed => CharsetChange::Unknown,
                other => other,
            };
        }
    }

    /// For a `LOAD DATA LOCAL`: the client file it may send, when a rule
    /// (not a default) allowed it and it is alone in its text; why not
    /// otherwise.
    fn allow_local_file(
        &mut self,
        analysis: &Analysis,
        decisions: &[Decision],
    ) -> Result<(), String> {
        let Analysis::Parsed { statements } = analysis else {
            return Ok(());
        };
        let Some(i) = statements
            .iter()
            .position(|s| s.command.starts_with("LOAD ") && s.command.ends_with(" LOCAL"))
        else {
            return Ok(());
        };
        let refused = |why: &str| {
            Err(format!(
                "tollgate: LOAD DATA LOCAL refused: {why}; it sends a file of the client's machine to the server"
            ))
        };
        if statements.len() > 1 {
            return refused("it must be sent alone, not with other statements in one text");
        }
        let allowed_by_rule = decisions.get(i).is_some_and(|d| {
            matches!(d.action, Action::Allow | Action::Audit) && d.deciding_rule().is_some()
        });
        if !allowed_by_rule {
            return refused(
                "no rule allows it (a rule with action \"allow\" matching commands = [\"LOAD DATA LOCAL\"] does)",
            );
        }
        self.local_file = statements
            .get(i)
            .and_then(|s| crate::sql::mysql::local_infile(&s.text));
        Ok(())
    }

    /// Why a `KILL` among the statements may not run: it names a
    /// connection that no process of user `uid` opened through the agent
    /// to this target. A client cancels its own queries (the `mariadb`
    /// client's Ctrl-C opens a second connection to send `KILL QUERY`), not
    /// other sessions'.
    fn foreign_kill(&self, analysis: &Analysis, uid: Option<u32>) -> Option<String> {
        let Analysis::Parsed { statements } = analysis else {
            return None;
        };
        statements
            .iter()
            .filter(|s| &*s.command == "KILL")
            .find_map(|s| match crate::sql::mysql::kill_target(&s.text) {
                Some(id)
                    if u32::try_from(id)
                        .is_ok_and(|id| self.connections.owned_by(&self.ctx.target, id, uid)) =>
                {
                    None
                }
                Some(id) => Some(format!(
                    "tollgate: KILL of connection {id} refused: it was not opened through the agent by a process of this user"
                )),
                None => Some(
                    "tollgate: KILL refused: it names no connection the agent can check (KILL USER, KILL QUERY ID)"
                        .to_owned(),
                ),
            })
    }

    /// Sends the server a COM_QUERY of the agent's own (its answer is
    /// read by the caller, never relayed).
    async fn send_own_query(&mut self, text: &[u8]) -> Result<(), Stop> {
        let mut payload = Vec::with_capacity(text.len() + 1);
        payload.push(com::QUERY);
        payload.extend_from_slice(text);
        self.send_to_server(&Packet { seq: 0, payload }).await
    }

    /// Answers the server's request for a client file (`request`) with an
    /// empty file.
    async fn send_empty_file(&mut self, request: &Packet) -> Result<(), Stop> {
        let empty = Packet {
            seq: request.next_seq(),
            payload: Vec::new(),
        };
        self.send_to_server(&empty).await
    }

    /// Asks the server for the session's client character set and current
    /// database ([`SESSION_STATE`]) before the client's first command, as
    /// the server's `init_connect` may have changed them. Nothing of it
    /// reaches the client; an answer that cannot be read leaves both
    /// unknown (non-ASCII text and tables named without a database are
    /// then refused until the client sets them).
    async fn ask_session_state(&mut self) -> Result<(), Stop> {
        self.send_own_query(SESSION_STATE).await?;
        let mut first = self.server_packet().await?;
        while first.first() == Some(0xFB) {
            // A server may ask for a client file in answer to anything:
            // it gets an empty one (the client never asked for this query).
            tracing::warn!(session = %self.ctx.id, "the server asked for a client file in answer to the session-state query; it gets an empty one");
            self.send_empty_file(&first).await?;
            first = self.server_packet().await?;
        }
        let row = if first.payload == [3] {
            // Three column definitions, their EOF, the row, the last EOF.
            for _ in 0..4 {
                self.server_packet().await?;
            }
            let row = self.server_packet().await?;
            let end = self.server_packet().await?;
            if !packet::is_eof(&end.payload) {
                return Err(self.malformed("the session state's answer did not end"));
            }
            self.note_status(&end.payload);
            text_row(&row.payload, 3)
        } else if packet::is_err(&first.payload) || first.first() == Some(0x00) {
            self.note_status(&first.payload);
            None
        } else {
            return Err(self.malformed("the session state's answer is not three columns"));
        };
        self.count_from_server();
        match row.as_deref() {
            Some([charset, database, max_packet]) => {
                self.packet_limit = max_packet
                    .as_deref()
                    .and_then(|n| n.parse::<usize>().ok())
                    .map_or(MAX_PACKET, |n| n.min(MAX_PACKET));
                self.charset = match charset {
                    Some(name)
                        if handshake::UNSAFE_CHARSETS.contains(&name.to_lowercase().as_str()) =>
                    {
                        CharsetChange::Unsafe(name.clone())
                    }
                    Some(_) => CharsetChange::Safe,
                    None => CharsetChange::Unknown,
                };
                self.set_database(CurrentDatabase::from_name(database.as_deref()));
            }
            _ => {
                tracing::warn!(session = %self.ctx.id, "the server's answer about the session's character set and database could not be read; both count as unknown");
                self.charset = CharsetChange::Unknown;
                self.set_database(CurrentDatabase::Unknown(
                    "the server's answer about it could not be read",
                ));
            }
        }
        Ok(())
    }

    /// Follows the handler and prepared-statement names a text that ran
    /// gave or dropped (before `follow_use`: its tables are qualified with
    /// the database it ran in).
    fn follow_names(&mut self, analysis: &Analysis) {
        let Analysis::Parsed { statements } = analysis else {
            return;
        };
        if !statements.iter().any(crate::sql::mysql::names_something) {
            return;
        }
        let outcome = match (statements.len(), self.answer_failed) {
            (1, false) => Outcome::Succeeded,
            (1, true) => Outcome::Failed,
            _ => Outcome::Partly,
        };
        let current = match &self.database {
            CurrentDatabase::Known(db) => Some(db.as_str()),
            CurrentDatabase::None | CurrentDatabase::Unknown(_) => None,
        };
        let qualified = crate::sql::mysql::in_database(analysis, current, false);
        self.names
            .follow(qualified.as_ref().unwrap_or(analysis), outcome);
    }

    /// Follows a `USE` that ran: its database is current once the text ran
    /// without error; a text of several statements that failed may have
    /// stopped before or after it.
    fn follow_use(&mut self, analysis: &Analysis) {
        let Analysis::Parsed { statements } = analysis else {
            return;
        };
        let Some(used) = statements
            .iter()
            .filter(|s| &*s.command == "USE")
            .filter_map(|s| crate::sql::mysql::used_database(&s.text))
            .next_back()
        else {
            return;
        };
        match (self.answer_failed, statements.len()) {
            (false, _) => self.set_database(CurrentDatabase::Known(used)),
            (true, 1) => {}
            (true, _) => self.set_database(CurrentDatabase::Unknown(
                "a text that switched databases failed part-way",
            )),
        }
    }

    /// Why a statement naming a table without its database may not run:
    /// which database that is, is not known.
    fn unknown_database_refusal(&self, analysis: &Analysis) -> Option<String> {
        let CurrentDatabase::Unknown(why) = self.database else {
            return None;
        };
        crate::sql::mysql::has_unqualified_tables(analysis).then(|| {
            format!("tollgate: the session's current database is not known ({why}), so a table named without its database cannot be decided; run USE first, or name the database")
        })
    }

    fn set_database(&mut self, database: CurrentDatabase) {
        if database != self.database {
            self.database = database;
            self.database_epoch += 1;
        }
    }

    /// Wakes the held statements of the connections a `KILL` that ran
    /// names (the server had nothing of theirs to interrupt). After the
    /// server's answer, not before: the woken session may end its
    /// connection, and a `KILL QUERY` of a connection gone is an error.
    fn interrupt_killed(&self, analysis: &Analysis) {
        let Analysis::Parsed { statements } = analysis else {
            return;
        };
        for s in statements.iter().filter(|s| &*s.command == "KILL") {
            if let Some(id) =
                crate::sql::mysql::kill_target(&s.text).and_then(|id| u32::try_from(id).ok())
            {
                self.connections.interrupt(&self.ctx.target, id);
            }
        }
    }

    /// One Statement event per statement (the whole text when unparsable),
    /// each kept among the session's last few for reviewers.
    fn report(
        &mut self,
        text: &str,
        analysis: &Analysis,
        decisions: &[Decision],
        refused: bool,
        identity: &crate::identity::ProcessIdentity,
        prepared: Option<u32>,
    ) {
        crate::intervene::act_on(decisions, identity, self.ctx.id, &self.ctx.events);
        let now = crate::approval::unix_seconds(std::time::SystemTime::now());
        // An execution that runs under the decisions of the last one that
        // ran reports the same events (the recorder writes each with its
        // own time and place in the chain).
        let ran_before = prepared
            .filter(|_| !refused)
            .and_then(|id| self.decided.get(&id))
            .and_then(|decided| decided.ran.clone());
        let events = match ran_before {
            Some(events) => events,
            None => {
                let event = |text: &str, command: Arc<str>, kind, fingerprint, d: &Decision| {
                    Arc::new(StatementEvent::decided(
                        self.ctx.id,
                        text,
                        command,
                        kind,
                        fingerprint,
                        d,
                        refused,
                    ))
                };
                let events: Arc<[Arc<StatementEvent>]> = match analysis {
                    Analysis::Parsed { statements } => statements
                        .iter()
                        .zip(decisions)
                        .map(|(s, d)| {
                            event(
                                &s.text,
                                Arc::clone(&s.command),
                                Some(s.kind),
                                Some(Arc::clone(&s.fingerprint)),
                                d,
                            )
                        })
                        .collect(),
                    Analysis::Unparsable { .. } => decisions
                        .iter()
                        .map(|d| event(text, Arc::from("statement"), None, None, d))
                        .collect(),
                };
                if let Some(decided) = prepared
                    .filter(|_| !refused)
                    .and_then(|id| self.decided.get_mut(&id))
                {
                    decided.ran = Some(Arc::clone(&events));
                }
                events
            }
        };
        for event in events.iter() {
            self.recent.remember(now, event);
            self.ctx.target_metrics.statement(event.action);
            self.ctx
                .events
                .emit(&SessionEvent::Statement(Arc::clone(event)));
        }
    }

    /// Relays the answer to COM_QUERY or COM_STMT_EXECUTE (of statement
    /// `id`): OK, ERR, or result sets, as many as the server says follow,
    /// masked as `plan` says. What a masked statement leaves in the
    /// server's list of warnings is cleared afterwards.
    async fn relay_results(
        &mut self,
        binary: bool,
        plan: Option<&MaskPlan>,
        id: Option<u32>,
    ) -> Result<(), Stop> {
        let mut withheld = false;
        self.answer_failed = false;
        loop {
            let mut first = self.server_packet().await?;
            if first.first() == Some(0xFB) {
                let asked = first.payload.get(1..).unwrap_or_default();
                let allowed = self
                    .local_file
                    .take()
                    .is_some_and(|file| file.as_bytes() == asked);
                if allowed {
                    self.relay_local_file(&first).await?;
                } else {
                    // A request for a file no allowed statement named (a
                    // server may ask for any file at any time): the server
                    // gets an empty file, the client nothing of the request.
                    tracing::warn!(session = %self.ctx.id, file = %String::from_utf8_lossy(asked), "the server asked for a client file no allowed LOAD DATA LOCAL names; it gets an empty one");
                    self.send_empty_file(&first).await?;
                }
                continue;
            }
            self.note_status(&first.payload);
            let status = match first.first() {
                Some(0x00) => {
                    if plan.is_some() {
                        withheld |= mask::take_warnings(&mut first.payload) > 0;
                    }
                    self.queue_for_client(&first);
                    packet::status_flags(&first.payload).unwrap_or(0)
                }
                Some(0xFF) => {
                    self.answer_failed = true;
                    if plan.is_some() {
                        first.payload = mask::withheld_error(&first.payload);
                        withheld = true;
                    }
                    self.queue_for_client(&first);
                    0
                }
                _ => {
                    self.queue_for_client(&first);
                    let Some((columns, _)) = packet::lenenc_int(&first.payload) else {
                        return Err(self.malformed("a result set without a column count"));
                    };
                    let mut result_mask = ResultMask::default();
                    for _ in 0..columns {
                        let Some(plan) = plan else {
                            // Nothing to mask: relayed as they come.
                            self.relay_server_packet().await?;
                            continue;
                        };
                        let mut column = self.server_packet().await?;
                        if let Err(e) = result_mask.add(plan, &mut column.payload) {
                            return Err(self.malformed(e.0));
                        }
                        self.queue_for_client(&column);
                    }
                    let mut end = self.server_packet().await?;
                    if !packet::is_eof(&end.payload) {
                        return Err(self.malformed("column definitions not ended by EOF"));
                    }
                    if plan.is_some() {
                        withheld |= mask::take_warnings(&mut end.payload) > 0;
                    }
                    self.queue_for_client(&end);
                    let status = packet::status_flags(&end.payload).unwrap_or(0);
                    if binary && status & CURSOR_EXISTS != 0 {
                        if let (Some(id), Some(_)) = (id, plan) {
                            self.cursor_masks.insert(id, result_mask);
                        }
                        status
                    } else {
                        let mask = plan.map(|_| &result_mask);
                        let (status, rows_withheld) =
                            self.relay_rows_after_metadata(mask, binary).await?;
                        withheld |= rows_withheld;
                        self.answer_failed |= status.is_none();
                        status.unwrap_or_default()
                    }
                }
            };
            if status & MORE_RESULTS == 0 {
                self.flush_client().await?;
                if withheld {
                    self.clear_diagnostics().await?;
                }
                return Ok(());
            }
        }
    }

    /// Relays rows, masked by `mask` (text or `binary` rows), until their
    /// EOF (its status flags) or an ERR (`None`); and whether anything of
    /// a masked result was withheld (warnings, an error's message).
    async fn relay_rows_after_metadata(
        &mut self,
        mask: Option<&ResultMask>,
        binary: bool,
    ) -> Result<(Option<u16>, bool), Stop> {
        if mask.is_none() {
            return self.relay_rows_as_they_are().await.map(|end| (end, false));
        }
        loop {
            let mut row = self.server_packet().await?;
            if packet::is_eof(&row.payload) {
                self.note_status(&row.payload);
                let warned = mask.is_some() && mask::take_warnings(&mut row.payload) > 0;
                self.queue_for_client(&row);
                let status = packet::status_flags(&row.payload).unwrap_or(0);
                return Ok((Some(status), warned));
            }
            if packet::is_err(&row.payload) {
                if mask.is_some() {
                    row.payload = mask::withheld_error(&row.payload);
                }
                self.queue_for_client(&row);
                return Ok((None, mask.is_some()));
            }
            if self.to_client.len() >= FLUSH_AT {
                self.flush_client().await?;
            }
            if let Some(mask) = mask {
                let masked = if binary {
                    mask.binary_row(&row.payload)
                } else {
                    mask.text_row(&row.payload)
                };
                match masked {
                    Ok(Some(payload)) => row.payload = payload,
                    Ok(None) => {}
                    Err(e) => return Err(self.malformed(e.0)),
                }
            }
            self.queue_for_client(&row);
        }
    }

    /// Relays rows unchanged until their EOF (its status flags) or an ERR
    /// (`None`): each read straight into the buffer for the client, which
    /// is written out whenever it is large.
    async fn relay_rows_as_they_are(&mut self) -> Result<Option<u16>, Stop> {
        loop {
            let at = self.relay_server_packet().await?;
            let payload = self.to_client.get(at.first.clone()).unwrap_or_default();
            if at.len < 9 && payload.first() == Some(&0xFE) {
                let status = packet::status_flags(payload);
                if let Some(status) = status {
                    self.note_status_flags(status);
                }
                return Ok(Some(status.unwrap_or(0)));
            }
            if payload.first() == Some(&0xFF) {
                return Ok(None);
            }
            if self.to_client.len() >= FLUSH_AT {
                self.flush_client().await?;
            }
        }
    }

    /// Reads a packet the server must send straight onto the end of the
    /// client's buffer, unchanged (no copy of its own); where it went.
    async fn relay_server_packet(&mut self) -> Result<packet::Appended, Stop> {
        let read = packet::read_packet_into(&mut self.server_in, &mut self.to_client, MAX_PACKET)
            .await
            .map_err(|e| Stop::from(CloseReason::UpstreamError(e.to_string())))?;
        let Some(at) = read else {
            return Err(
                CloseReason::UpstreamError("closed in the middle of an answer".into()).into(),
            );
        };
        self.from_server_uncounted += at.framed.len() as u64;
        if self.raw {
            let framed = self.to_client.get(at.framed.clone()).unwrap_or_default();
            self.ctx
                .events
                .emit_raw(self.ctx.id, RawDirection::Server, framed);
        }
        Ok(at)
    }

    /// Ends the client's leg after an ERR sent in the middle of its packet:
    /// the end of the stream follows the ERR, and what the client still
    /// sends is read and dropped for a moment, so closing does not reset
    /// the connection (and lose the ERR) while the client is still sending.
    async fn close_after_err(&mut self) {
        let _ = self.client_out.shutdown().await;
        let mut scratch = [0u8; 16 * 1024];
        let drained = async {
            while let Ok(n) = self.client_in.read(&mut scratch).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_AFTER_ERR, drained).await;
    }

    /// Passes the server's request for the allowed client file to the
    /// client, and the file's packets back, up to the empty one that ends
    /// it.
    async fn relay_local_file(&mut self, request: &Packet) -> Result<(), Stop> {
        self.send_to_client(request).await?;
        loop {
            let piece = read_counted(
                &mut self.client_in,
                self.ctx,
                RawDirection::Client,
                self.raw,
                self.packet_limit,
            )
            .await
            .map_err(|e| CloseReason::ClientError(e.to_string()))?
            .ok_or(CloseReason::Completed)?;
            let last = piece.payload.is_empty();
            self.send_to_server(&piece).await?;
            if last {
                return Ok(());
            }
        }
    }

    /// Empties the server's list of warnings and errors after a masked
    /// statement, whose messages may quote masked values (`SHOW WARNINGS`
    /// would show them): the next statement that uses a table (here a
    /// derived one) replaces the list. If that fails, the session ends
    /// rather than leave the list readable.
    async fn clear_diagnostics(&mut self) -> Result<(), Stop> {
        let failed = || -> Stop {
            CloseReason::UpstreamError(
                "the server did not clear the warnings of a masked statement".into(),
            )
            .into()
        };
        self.send_own_query(CLEAR_DIAGNOSTICS).await?;
        let first = self.server_packet().await?;
        if first.payload != [1] {
            return Err(failed());
        }
        // Its column definition, the EOF after it, no rows, the last EOF.
        let _definition = self.server_packet().await?;
        for _ in 0..2 {
            let end = self.server_packet().await?;
            if !packet::is_eof(&end.payload) {
                return Err(failed());
            }
            self.note_status(&end.payload);
        }
        tracing::debug!(session = %self.ctx.id, "cleared the warnings of a masked statement");
        Ok(())
    }

    /// Relays the answer to COM_STMT_PREPARE and remembers the statement.
    async fn relay_prepare(&mut self, text: String, analysis: Analysis) -> Result<(), Stop> {
        let first = self.server_packet().await?;
        self.queue_for_client(&first);
        if first.first() != Some(0x00) {
            return self.flush_client().await;
        }
        let p = &first.payload;
        let (Some(id), Some(columns), Some(params)) = (
            statement_id(p),
            p.get(5..7).map(|b| u16::from_le_bytes([b[0], b[1]])),
            p.get(7..9).map(|b| u16::from_le_bytes([b[0], b[1]])),
        ) else {
            return Err(self.malformed("a prepare answer cut short"));
        };
        for count in [params, columns] {
            if count > 0 {
                for _ in 0..count {
                    let definition = self.server_packet().await?;
                    self.queue_for_client(&definition);
                }
                let end = self.server_packet().await?;
                self.queue_for_client(&end);
                if !packet::is_eof(&end.payload) {
                    return Err(self.malformed("definitions not ended by EOF"));
                }
            }
        }
        self.decided.remove(&id);
        self.prepared
            .insert(id, Arc::new(Prepared { text, analysis }));
        self.last_prepared = Some(id);
        self.flush_client().await
    }

    /// Relays a one-packet answer.
    async fn relay_one(&mut self) -> Result<(), Stop> {
        let answer = self.server_packet().await?;
        self.queue_for_client(&answer);
        self.note_status(&answer.payload);
        self.flush_client().await
    }

    fn malformed(&self, what: &str) -> Stop {
        CloseReason::UpstreamError(format!("malformed answer from the server: {what}")).into()
    }

    /// A packet from the server that must come (the end of stream is an error).
    async fn server_packet(&mut self) -> Result<Packet, Stop> {
        match self.read_server().await? {
            Some(p) => Ok(p),
            None => {
                Err(CloseReason::UpstreamError("closed in the middle of an answer".into()).into())
            }
        }
    }

    async fn read_server(&mut self) -> Result<Option<Packet>, Stop> {
        let read = packet::read_packet(&mut self.server_in, MAX_PACKET)
            .await
            .map_err(|e| Stop::from(CloseReason::UpstreamError(e.to_string())))?;
        if let Some(p) = &read {
            self.from_server_uncounted += framed_len(p);
            if self.raw {
                let mut framed = Vec::with_capacity(p.payload.len() + 4);
                packet::frame(&mut framed, p.seq, &p.payload);
                self.ctx
                    .events
                    .emit_raw(self.ctx.id, RawDirection::Server, &framed);
            }
        }
        Ok(read)
    }

    /// Adds the bytes read from the server since the last call to the
    /// session's and the target's counters: once per answer (or per
    /// 64 KiB written), not per row, as those are shared between threads.
    fn count_from_server(&mut self) {
        let bytes = std::mem::take(&mut self.from_server_uncounted);
        if bytes > 0 {
            self.ctx
                .counters
                .from_upstream
                .fetch_add(bytes, Ordering::Relaxed);
            self.ctx
                .target_metrics
                .bytes_from_upstream
                .fetch_add(bytes, Ordering::Relaxed);
        }
    }

    async fn send_to_server(&mut self, packet: &Packet) -> Result<(), Stop> {
        self.to_server.clear();
        packet::frame(&mut self.to_server, packet.seq, &packet.payload);
        let sent = async {
            self.server_out.write_all(&self.to_server).await?;
            // A TLS leg holds written records until flushed.
            self.server_out.flush().await
        }
        .await;
        // A large command (a bulk INSERT) is rare: do not keep its buffer.
        if self.to_server.capacity() > 64 * 1024 {
            self.to_server = Vec::new();
        }
        sent.map_err(|e| CloseReason::UpstreamError(e.to_string()).into())
    }

    fn queue_for_client(&mut self, packet: &Packet) {
        packet::frame(&mut self.to_client, packet.seq, &packet.payload);
    }

    async fn flush_client(&mut self) -> Result<(), Stop> {
        self.count_from_server();
        if self.to_client.is_empty() {
            return Ok(());
        }
        let written = async {
            self.client_out.write_all(&self.to_client).await?;
            self.client_out.flush().await
        }
        .await;
        self.to_client.clear();
        written.map_err(|e| CloseReason::ClientError(e.to_string()).into())
    }

    async fn send_to_client(&mut self, packet: &Packet) -> Result<(), Stop> {
        self.queue_for_client(packet);
        self.flush_client().await
    }

    /// Answers the current command with `payload` (an ERR) at `seq`.
    async fn answer_client(&mut self, seq: u8, payload: Vec<u8>) -> Result<(), Stop> {
        self.send_to_client(&Packet { seq, payload }).await
    }
}

/// Reads a packet, counting its bytes (and recording them raw when the
/// target records raw bytes).
async fn read_counted<R: AsyncRead + Unpin>(
    reader: &mut R,
    ctx: &SessionContext,
    dir: RawDirection,
    raw: bool,
    limit: usize,
) -> Result<Option<Packet>, PacketError> {
    let packet = packet::read_packet(reader, limit).await?;
    if let Some(p) = &packet {
        let bytes = framed_len(p);
        let (session, target) = match dir {
            RawDirection::Client => (
                &ctx.counters.from_client,
                &ctx.target_metrics.bytes_from_client,
            ),
            RawDirection::Server => (
                &ctx.counters.from_upstream,
                &ctx.target_metrics.bytes_from_upstream,
            ),
        };
        session.fetch_add(bytes, Ordering::Relaxed);
        target.fetch_add(bytes, Ordering::Relaxed);
        if raw {
            let mut framed = Vec::with_capacity(p.payload.len() + 4);
            packet::frame(&mut framed, p.seq, &p.payload);
            ctx.events.emit_raw(ctx.id, dir, &framed);
        }
    }
    Ok(packet)
}

/// The values of a text result row of `columns` columns (`None` for
/// NULL); `None` when the row is not that.
fn text_row(payload: &[u8], columns: usize) -> Option<Vec<Option<String>>> {
    let mut values = Vec::with_capacity(columns);
    let mut at = 0;
    for _ in 0..columns {
        if payload.get(at) == Some(&0xFB) {
            values.push(None);
            at += 1;
            continue;
        }
        let (len, used) = packet::lenenc_int(payload.get(at..)?)?;
        let start = at.checked_add(used)?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        values.push(Some(
            String::from_utf8_lossy(payload.get(start..end)?).into_owned(),
        ));
        at = end;
    }
    (at == payload.len()).then_some(values)
}

/// The bytes a packet took on the wire (a header per piece).
fn framed_len(p: &Packet) -> u64 {
    let pieces = p.payload.len() / packet::MAX_WIRE_PAYLOAD + 1;
    (p.payload.len() + 4 * pieces) as u64
}

/// The statement id at bytes 1..5 of a COM_STMT_* command or a prepare OK.
fn statement_id(payload: &[u8]) -> Option<u32> {
    payload
        .get(1..5)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The label a refusal names (`DROP TABLE`), the first statement's.
fn command_label(analysis: &Analysis) -> &str {
    match analysis {
        Analysis::Parsed { statements } => statements.first().map_or("statement", |s| &s.command),
        Analysis::Unparsable { .. } => "statement",
    }
}

fn command_name(command: u8) -> &'static str {
    match command {
        com::BINLOG_DUMP => "COM_BINLOG_DUMP",
        com::BINLOG_DUMP_GTID => "COM_BINLOG_DUMP_GTID",
        com::REGISTER_SLAVE => "COM_REGISTER_SLAVE",
        _ => "?",
    }
}

/// How the results of a command are masked (`None`: not at all), or why
/// a statement that requires masking cannot run masked. A masked
/// statement must be a command's only statement, so that its results are
/// the command's.
fn mask_plan(analysis: &Analysis, decisions: &[Decision]) -> Result<Option<MaskPlan>, String> {
    let statements = match analysis {
        Analysis::Parsed { statements } => statements.as_slice(),
        Analysis::Unparsable { .. } => &[],
    };
    let mut plan: Option<MaskPlan> = None;
    for (i, decision) in decisions.iter().enumerate() {
        if decision.action != Action::Mask {
            continue;
        }
        let statement = statements.get(i);
        let command = statement.map_or("statement", |s| &*s.command);
        if let Some(why) = decision.mask_obstacle(statement, Dialect::Mysql) {
            return Err(decision.mask_refused_message(command, &why));
        }
        if decisions.len() > 1 {
            return Err(decision.mask_refused_message(
                command,
                "a statement that requires masking must be sent alone, not with others in one text",
            ));
        }
        let rules: Vec<Arc<MaskRule>> = decision
            .matched
            .iter()
            .filter(|r| r.action == Action::Mask)
            .filter_map(|r| r.mask.clone())
            .collect();
        // A computed field is masked, with the strictest method of the
        // rules whose columns the statement's expressions may read.
        let computed = rules
            .iter()
            .filter(|rule| {
                let names: Vec<&str> = rule.columns.iter().map(|c| &*c.column).collect();
                statement.is_none_or(|s| crate::sql::mysql::may_read_columns(&s.text, &names))
            })
            .map(|rule| rule.with)
            .max();
        plan = Some(MaskPlan { rules, computed });
    }
    Ok(plan)
}

/// How the server reads the client's text at the start: the collation of
/// the client's answer.
fn initial_charset(collation: u8) -> CharsetChange {
    if handshake::collation_is_unsafe(collation) {
        CharsetChange::Unsafe(format!("the character set of collation {collation}"))
    } else {
        CharsetChange::Safe
    }
}

/// What the statements of a text do to `character_set_client`, the last
/// change winning; a `CALL` may change it in ways not seen here.
fn charset_change(analysis: &Analysis) -> Option<CharsetChange> {
    let Analysis::Parsed { statements } = analysis else {
        return None;
    };
    statements.iter().fold(None, |change, s| match s.kind {
        StatementKind::Call => Some(CharsetChange::Unknown),
        StatementKind::Set => {
            crate::sql::mysql::client_charset_change(&s.text, handshake::UNSAFE_CHARSETS).or(change)
        }
        _ => change,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{text_row, AuthLegs, AuthWatch};

    #[test]
    fn a_text_row_gives_its_values_and_nothing_else() {
        let row = [&[4u8][..], b"utf8", &[0xFB]].concat();
        assert_eq!(
            text_row(&row, 2).unwrap(),
            vec![Some("utf8".to_owned()), None]
        );
        // Too few values, too many bytes, a length past the end.
        assert_eq!(text_row(&row, 3), None);
        assert_eq!(text_row(&[&row[..], b"x"].concat(), 2), None);
        assert_eq!(text_row(&[9, b'a'], 1), None);
        assert_eq!(
            text_row(&[0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], 1),
            None
        );
    }

    fn watch_for(withhold: bool, unanswered: bool, plugin: &str) -> AuthWatch<'static> {
        AuthWatch {
            target: "shop",
            legs: AuthLegs {
                withhold_clear_password: withhold,
                key_request_unanswered: unanswered,
            },
            plugin: Some(plugin.to_owned()),
        }
    }

    #[test]
    fn a_request_for_a_clear_password_is_refused_only_while_it_would_cross_in_clear() {
        let watch = |withhold: bool, plugin: &str| watch_for(withhold, false, plugin);
        let full_path = [0x01, 0x04];
        let fast_path = [0x01, 0x03];
        let to_clear = b"\xFEmysql_clear_password\0";
        let to_dialog = b"\xFEdialog\0\x04Password: ";

        let mut w = watch(true, "caching_sha2_password");
        assert_eq!(w.refusal_of(&fast_path), None);
        let refusal = w.refusal_of(&full_path).unwrap();
        assert!(
            refusal.contains("caching_sha2_password's full authentication"),
            "{refusal}"
        );
        // After a switch to caching_sha2 too; its 0x04 under another
        // plugin is that plugin's data.
        let mut w = watch(true, "mysql_native_password");
        assert_eq!(w.refusal_of(&full_path), None);
        assert_eq!(w.refusal_of(b"\xFEcaching_sha2_password\0scramble"), None);
        assert!(w.refusal_of(&full_path).is_some());
        let mut w = watch(true, "mysql_native_password");
        assert!(w
            .refusal_of(to_clear)
            .unwrap()
            .contains("switch to mysql_clear_password"));
        assert!(watch(true, "x").refusal_of(to_dialog).is_some());
        assert!(watch(true, "mysql_clear_password")
            .refusal_of_answer()
            .is_some());
        assert_eq!(
            watch(true, "mysql_native_password").refusal_of_answer(),
            None
        );

        // Nothing is refused while the password would not cross in clear.
        let mut w = watch(false, "caching_sha2_password");
        for reply in [&full_path[..], to_clear, to_dialog] {
            assert_eq!(w.refusal_of(reply), None);
        }
        assert_eq!(
            watch(false, "mysql_clear_password").refusal_of_answer(),
            None
        );
    }

    #[test]
    fn a_request_for_the_servers_key_is_refused_only_when_the_server_will_not_answer_it() {
        let watch = |unanswered: bool, plugin: &str| watch_for(false, unanswered, plugin);
        let refusal = watch(true, "caching_sha2_password")
            .refusal_of_client(&[0x02])
            .unwrap();
        assert!(refusal.contains("client_tls = \"terminate\""), "{refusal}");
        // The server answers it on a plaintext leg; other answers and
        // other plugins' bytes pass.
        assert_eq!(
            watch(false, "caching_sha2_password").refusal_of_client(&[0x02]),
            None
        );
        assert_eq!(
            watch(true, "caching_sha2_password").refusal_of_client(&[0x02, 0x00]),
            None
        );
        assert_eq!(
            watch(true, "caching_sha2_password").refusal_of_client(b"pw\0"),
            None
        );
        assert_eq!(
            watch(true, "mysql_native_password").refusal_of_client(&[0x02]),
            None
        );
    }
}
