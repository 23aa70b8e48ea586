//! Command-line interface: every flag is defined once here, with its help.
//!
//! Exit status: 0 success; 1 the command failed at run time (an address in
//! use, an agent not answering); 2 bad usage or an invalid configuration.

mod approvals;
pub mod jobs;
pub mod recordings;
mod status;
mod tokens;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::DEFAULT_CONFIG_PATH;

/// Governs how CI jobs and AI coding agents reach production systems.
///
/// Tollgate proxies their connections to databases and other targets, names
/// the process and CI job behind every session, and records what they did.
#[derive(Parser, Debug)]
#[command(
    name = "tollgate",
    version,
    propagate_version = true,
    max_term_width = 100
)]
#[command(
    after_help = "Exit status: 0 success, 1 failure at run time, 2 bad usage or invalid configuration.\n\
Documentation: docs/operations.md and docs/architecture.md in the source tree."
)]
pub struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text, env = "TOLLGATE_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive
    /// such as "tollgate_agent=debug".
    #[arg(long, global = true, default_value = "info", env = "TOLLGATE_LOG")]
    pub log_level: String,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The configuration file argument shared by subcommands.
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArg {
    /// Configuration file (TOML). See docs/operations.md for every setting.
    #[arg(long, short = 'c', value_name = "FILE", env = "TOLLGATE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

/// `--remote`: read recordings from the bucket instead of this host.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct RemoteArg {
    /// Read the bucket that the configuration's [upload] section names
    /// (every host's uploaded recordings) instead of this host's
    /// recording directory.
    #[arg(long)]
    pub remote: bool,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: serve the configured listeners until SIGTERM or Ctrl-C.
    ///
    /// On SIGTERM the agent stops accepting, lets open sessions finish for
    /// agent.shutdown_grace, then closes the rest; a second signal closes them
    /// at once.
    Run(ConfigArg),

    /// Work with the configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),

    /// Show a running agent's listeners, targets and open sessions with the
    /// identity of the process behind each.
    Status(StatusArgs),

    /// Run a command under governance: its TCP connections to targets go
    /// through the agent, with no change to the command.
    ///
    /// Asks the running agent (which needs a [redirect] section) to move this
    /// process into a transient cgroup where the redirect applies, runs the
    /// command there with stdio passed through, and exits with its status.
    /// The cgroup is removed when the command is done. Example:
    ///
    ///   tollgate exec -- psql -h 10.0.0.5 -U app orders
    #[command(verbatim_doc_comment)]
    Exec(ExecArgs),

    /// Ask the agent to govern the cgroup this command runs in, and wait until
    /// it does. For `ExecStartPre=` of a governed systemd service, so the
    /// service's main process never starts ungoverned; the cgroup must be a
    /// configured [[cgroup]].
    EnsureGoverned(ExecSocketArgs),

    /// Check, explain and test statement policies.
    #[command(subcommand)]
    Policy(PolicyCommand),

    /// List, show, replay, verify and export session recordings; make a
    /// signing key.
    #[command(subcommand)]
    Recordings(RecordingsCommand),

    /// The job timeline: what each governed job (a `tollgate exec` command,
    /// a governed cgroup) ran, where it connected, and the statements its
    /// sessions sent, in order.
    ///
    /// The agent records every governed cgroup's commands (with their
    /// arguments), exits, connects and sessions in a job recording beside
    /// the session recordings. Examples:
    ///
    ///   tollgate jobs list --since 1h
    ///   tollgate jobs show exec-4242-0        # by cgroup, the newest job
    ///   tollgate jobs show 01935d3c-...       # by job id
    ///   tollgate jobs show JOB --json
    #[command(subcommand, verbatim_doc_comment)]
    Jobs(JobsCommand),

    /// Review statements held by `review` rules: list, show, approve, deny;
    /// list and revoke grants; manage reviewer tokens.
    ///
    /// Talks to the agent's reviewer socket, which authenticates the caller
    /// by its Unix credentials: only members of an approver group (or root,
    /// to list and revoke) are served. Reviewers on other hosts use the web
    /// page or the API over TLS with a token (`tokens add`). Examples:
    ///
    ///   tollgate approvals list
    ///   tollgate approvals approve 01KBM3... --reason "checked the WHERE"
    ///   tollgate approvals approve 01KBM3... --edit "DELETE FROM t WHERE id = 7"
    ///   tollgate approvals approve 01KBM3... --for 30m
    ///   tollgate approvals deny 01KBM3... --reason "not during the sale"
    ///   tollgate approvals grants --revoke 01KBM4...
    ///   tollgate approvals watch
    ///   tollgate approvals tokens add alice-laptop --user alice
    ///
    /// A statement a `review` rule holds waits in its session (the client
    /// sees a notice naming the request) until enough other approvers
    /// approve it, one denies it, or it expires (docs/approvals.md).
    ///
    /// Exit status: 0 done, 1 refused by the agent (the reason is printed) or
    /// the agent not reachable, 2 bad usage.
    #[command(subcommand, verbatim_doc_comment)]
    Approvals(ApprovalsCommand),

    /// Serve the reviewer API and web page for a whole fleet, from the
    /// approvals database that every agent's [shared_approvals] names.
    ///
    /// Reviewers see the held statements of every host in one list and
    /// decide them here, with the checks an agent makes (approver groups,
    /// N of M, never the requester); each decision is written to the
    /// database, and the agent holding the statement runs or refuses it
    /// within a second. Its configuration is an agent's, of which it reads
    /// [shared_approvals], [reviewers], the policy (for the approver groups
    /// allowed in) and agent.approvals_socket, approvals_listen,
    /// approvals_tls_cert, approvals_tls_key, approvals_tokens and
    /// approvals_store. Example:
    ///
    ///   tollgate review-server --config /etc/tollgate/review-server.toml
    ///   tollgate approvals list --socket /run/tollgate/approvals.sock
    ///
    /// A grant given here (approve --for 30m) is in force on every host;
    /// `approvals grants --revoke ID` here revokes it everywhere. SIGHUP
    /// reloads the policy; SIGTERM stops.
    #[command(verbatim_doc_comment)]
    ReviewServer(ConfigArg),

    /// Remove the pinned eBPF programs and maps, ending enforcement.
    ///
    /// Pinned programs keep governed connections failing closed while no agent
    /// runs, and `[protect]`'s program on the cgroup root keeps checking
    /// connections to protected targets; this is how to lift both. Refuses
    /// while an agent is running. Reads only agent.control_socket and
    /// redirect.pin_dir from the configuration, so one that no longer
    /// validates still detaches.
    Detach(DetachArgs),

    /// SSH targets: what clients need to trust the agent.
    ///
    ///   tollgate ssh known-hosts >> /etc/ssh/ssh_known_hosts
    ///
    /// prints one `@cert-authority` line per SSH target with the agent's
    /// SSH host CA (made in tls_dir on first use), so that ssh, scp, sftp
    /// and git accept the host certificates the agent presents for those
    /// hosts and nothing else. scripts/install.sh adds them.
    #[command(subcommand, verbatim_doc_comment)]
    Ssh(SshCommand),

    /// Let a process or job a rule's `on_match = "stop"` stopped run again.
    ///
    /// WHAT is a pid (it gets SIGCONT) or a cgroup as `tollgate status`
    /// lists it under "Stopped by on_match" (its cgroup.freeze is set to
    /// 0). Needs root, as stopping it did.
    Thaw(ThawArgs),
}

/// `tollgate ssh` subcommands.
#[derive(Subcommand, Debug)]
pub enum SshCommand {
    /// Print the known-hosts lines (`@cert-authority PATTERNS KEY`) that
    /// make clients accept the agent for the configured SSH targets.
    KnownHosts {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the agent's SSH user CA public key (made in tls_dir on first
    /// use), for the `TrustedUserCAKeys` file of hosts whose credentials
    /// say `ssh_certificate = true`.
    UserCa {
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// `tollgate jobs` subcommands.
#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    /// List job recordings, oldest first: commands run, sessions opened,
    /// connects denied, processes that failed.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Only jobs started within this long ("1h", "2d").
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a job's timeline: commands with their parents and arguments,
    /// connects with their verdicts, sessions with their statements, exits
    /// with their codes, in the order they happened.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// Job id, a job recording file, or the job's cgroup (its path or
        /// last component, such as exec-4242-0; the newest such job).
        #[arg(value_name = "JOB")]
        job: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `tollgate thaw` arguments.
#[derive(clap::Args, Debug)]
pub struct ThawArgs {
    /// A pid, or a cgroup path such as /tollgate.exec/exec-1234-0.
    #[arg(value_name = "WHAT")]
    pub what: String,
}

/// `tollgate exec` arguments.
#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    pub config: ConfigArg,

    /// Exec socket of the agent, instead of the one the configuration names.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<std::ffi::OsString>,
}

/// Arguments of commands that talk to the exec socket.
#[derive(clap::Args, Debug)]
pub struct ExecSocketArgs {
    #[command(flatten)]
    pub config: ConfigArg,

    /// Exec socket of the agent, instead of the one the configuration names.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// How long to wait for the agent to come up.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub wait: std::time::Duration,
}

/// A SQL dialect named on the command line.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialectArg {
    /// PostgreSQL.
    Postgres,
    /// MySQL and MariaDB.
    Mysql,
}

impl From<DialectArg> for crate::sql::Dialect {
    fn from(d: DialectArg) -> Self {
        match d {
            DialectArg::Postgres => crate::sql::Dialect::Postgres,
            DialectArg::Mysql => crate::sql::Dialect::Mysql,
        }
    }
}

/// `tollgate policy ...`
#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate policy files (or directories of them); errors are printed as
    /// FILE:LINE:COLUMN.
    Check {
        /// Policy files or directories.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },

    /// Show how a statement is analysed and decided: every statement's kind,
    /// tables, functions and flags, every rule that matched, and the verdict.
    ///
    /// Example:
    ///
    ///   tollgate policy explain --policy policies/ --target prod-db \
    ///       --identity 'user = "runner", ci_provider = "github_actions"' "DROP TABLE orders"
    #[command(verbatim_doc_comment)]
    Explain {
        /// Policy files or directories (default: the configuration's
        /// agent.policy_paths).
        #[arg(long = "policy", value_name = "PATH")]
        policy: Vec<PathBuf>,

        #[command(flatten)]
        config: ConfigArg,

        /// The target the statement is sent to.
        #[arg(long, value_name = "NAME")]
        target: String,

        /// Who sends it, written like a policy test case's identity:
        /// 'user = "runner", uid = 1001, exe = "/usr/bin/psql",
        /// ci_provider = "github_actions", ci_repository = "acme/shop", ci_verified = true'.
        #[arg(long, value_name = "FIELDS", default_value = "")]
        identity: String,

        /// Print the explanation as JSON.
        #[arg(long)]
        json: bool,

        /// How the text is read: postgres or mysql (MySQL and MariaDB).
        /// Default: the target's protocol in the configuration, when the
        /// configuration names the target; else postgres.
        #[arg(long, value_enum, value_name = "DIALECT")]
        dialect: Option<DialectArg>,

        /// For MySQL text: the server's version as its greeting gives it
        /// ("10.11.6-MariaDB", "8.0.36"). Executable comments
        /// (/*!40101 ... */, /*M! ... */) are resolved for it first, as
        /// the agent does with the version of the server it talks to;
        /// without it a text holding one is unparsable.
        #[arg(long, value_name = "VERSION")]
        server_version: Option<String>,

        /// The SQL text (several statements allowed).
        #[arg(value_name = "SQL")]
        sql: String,
    },

    /// Run the test cases kept next to policies (NAME.tests.toml beside
    /// NAME.toml), like `opa test`. Exit status 1 if any case fails.
    Test {
        /// Directory holding the policies and their tests.
        #[arg(value_name = "DIR")]
        dir: PathBuf,

        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `tollgate recordings ...`
#[derive(Subcommand, Debug)]
pub enum RecordingsCommand {
    /// List recorded sessions, newest last.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Only sessions started within this long ("1h", "2d").
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Only sessions to this target.
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// Only sessions of this OS or database user.
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        /// Only sessions from this CI repository.
        #[arg(long, value_name = "REPO")]
        ci_repo: Option<String>,
        /// Only sessions with a refused statement.
        #[arg(long)]
        denied: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// List the bucket's recordings (host, day, target and session, as
        /// their keys name them) instead of this host's. With --user,
        /// --ci-repo or --denied each candidate is read from the bucket and
        /// listed as local recordings are.
        #[arg(long)]
        remote: bool,
        /// With --remote: only recordings this host uploaded.
        #[arg(long, value_name = "NAME", requires = "remote")]
        host: Option<String>,
    },
    /// Show a session as a readable transcript.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        remote: RemoteArg,
        /// Session id (as `list` shows it) or a recording file.
        #[arg(value_name = "ID|FILE")]
        id: String,
        /// Never colour the output.
        #[arg(long)]
        no_color: bool,
    },
    /// Replay a session's timeline in real time or faster.
    ///
    /// Each event is printed as `show` prints it, after the delay recorded
    /// since the one before. Examples:
    ///
    ///   tollgate recordings replay ID              # real time
    ///   tollgate recordings replay ID --speed 10   # ten times faster
    ///   tollgate recordings replay ID --no-wait    # all at once
    #[command(verbatim_doc_comment)]
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        remote: RemoteArg,
        /// Session id (as `list` shows it) or a recording file.
        #[arg(value_name = "ID|FILE")]
        id: String,
        /// How many times faster than real time (0: no delay).
        #[arg(long, value_name = "N", default_value_t = 1.0, value_parser = parse_speed)]
        speed: f64,
        /// Print everything at once (the same as --speed 0).
        #[arg(long, conflicts_with = "speed")]
        no_wait: bool,
        /// Cut idle stretches: never wait longer than this between two
        /// events ("2s", "500ms").
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        max_wait: Option<std::time::Duration>,
        /// Never colour the output.
        #[arg(long)]
        no_color: bool,
    },
    /// Check recordings' hash chains, and signatures with --public-key.
    ///
    /// Exit status 1 if any recording is broken or cut, or, when a public key
    /// is given, unsigned, signed by another key, or badly signed.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        remote: RemoteArg,
        /// Session id or recording file.
        #[arg(value_name = "ID|FILE", required_unless_present = "all")]
        id: Option<String>,
        /// Verify every recording.
        #[arg(long)]
        all: bool,
        /// Check signatures with this public key: the PATH.pub file that
        /// `recordings keygen` wrote (64 hex digits), or a PEM PUBLIC KEY.
        /// Repeat it to accept any of several keys (rotation).
        #[arg(long = "public-key", value_name = "FILE")]
        public_keys: Vec<PathBuf>,
    },
    /// Make an ed25519 key pair for signing recordings.
    ///
    /// Writes the private key to PATH (PEM PKCS#8, mode 0600) for
    /// agent.recording_signing_key, and the public key to PATH.pub (64 hex
    /// digits) for `recordings verify --public-key`. Never overwrites a file.
    Keygen {
        /// Where to write the private key; the public key goes to PATH.pub.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
    /// Export a session: `jsonl`, one JSON object per record (for SIEMs;
    /// raw bytes in base64), `pcap`, the raw bytes of a session recorded
    /// with `record_raw = true` as a TCP capture for Wireshark, or
    /// `asciicast`, an SSH terminal session as asciicast v2 (asciinema).
    Export {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        remote: RemoteArg,
        /// Session id or recording file.
        #[arg(value_name = "ID|FILE")]
        id: String,
        /// Output format: jsonl, pcap (classic pcap, raw IP: one
        /// synthesized TCP connection from the recorded client to the
        /// server, timed as recorded), or asciicast (v2, an SSH session's
        /// terminal output, timed as recorded).
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "pcap", "asciicast"])]
        format: String,
        /// Write to FILE instead of standard output (pcap is not written to
        /// a terminal).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// Prints a value as pretty JSON on stdout. A value that cannot be
/// serialised prints a JSON error object, never an empty line, so a script
/// reading stdout always gets JSON.
pub fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => print_json_error(&format!("cannot encode the output as JSON: {e}")),
    }
}

/// Prints why a command asked for `--json` failed, as `{"error": "..."}` on
/// stdout; the caller still prints the message on stderr and exits non-zero.
pub fn print_json_error(message: &str) {
    println!("{}", serde_json::json!({ "error": message }));
}

/// `--speed`: a finite number, 0 or more.
fn parse_speed(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!(
            "\"{s}\" is not a speed; give a number such as 1, 10 or 0.5 (0: no delay)"
        )),
    }
}

/// How `tollgate approvals` reaches the agent.
#[derive(clap::Args, Debug, Clone)]
pub struct ApprovalsConn {
    #[command(flatten)]
    pub config: ConfigArg,

    /// Reviewer socket, instead of the one the configuration names (when the
    /// configuration cannot be read, /run/tollgate/approvals.sock).
    #[arg(long, value_name = "PATH", env = "TOLLGATE_APPROVALS_SOCKET")]
    pub socket: Option<PathBuf>,

    /// Print the agent's JSON answer.
    #[arg(long)]
    pub json: bool,
}

/// `tollgate approvals ...`
#[derive(Subcommand, Debug)]
pub enum ApprovalsCommand {
    /// List the statements waiting for review, oldest first.
    List {
        #[command(flatten)]
        conn: ApprovalsConn,
    },
    /// Show one request: the statement, target, database user, process, CI
    /// job, rule, approvals so far and outcome.
    Show {
        #[command(flatten)]
        conn: ApprovalsConn,
        /// The request id (as `list` and the held client show it).
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Approve a held statement, optionally changed, or for a while.
    ///
    /// The approval counts once per person; a rule may need several. An edit
    /// replaces the statement (it is decided by the policy again, and
    /// earlier approvals of the old text no longer count). --for gives a
    /// grant: the same statement shape from the same identity to the same
    /// target runs without review until it expires, if the rule allows it.
    Approve {
        #[command(flatten)]
        conn: ApprovalsConn,
        /// The request id.
        #[arg(value_name = "ID")]
        id: String,
        /// Why, recorded with the approval.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Run this statement instead of the held one.
        #[arg(long, value_name = "SQL", conflicts_with = "grant")]
        edit: Option<String>,
        /// Also grant the same statement shape for this long ("30m").
        #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
        grant: Option<std::time::Duration>,
    },
    /// Refuse a held statement, saying why.
    Deny {
        #[command(flatten)]
        conn: ApprovalsConn,
        /// The request id.
        #[arg(value_name = "ID")]
        id: String,
        /// Why (required: the client is told).
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
    /// List the grants in force, or revoke one.
    Grants {
        #[command(flatten)]
        conn: ApprovalsConn,
        /// Revoke this grant.
        #[arg(long, value_name = "ID")]
        revoke: Option<String>,
        /// Also list expired and revoked grants.
        #[arg(long, conflicts_with = "revoke")]
        all: bool,
    },
    /// Follow requests live: one line per event as it happens.
    ///
    /// Prints the pending requests first, then every request that is held,
    /// approved (or an approval counted), edited, denied, expires, is
    /// cancelled (the client went away) or aborted (the agent stopped):
    /// time, event, request id, requester, target and the statement,
    /// shortened. --json prints each event's JSON on one line instead (the
    /// `data:` lines of GET /v1/watch). Runs until Ctrl-C or until the
    /// agent stops.
    Watch {
        #[command(flatten)]
        conn: ApprovalsConn,
    },
    /// Make, list and revoke reviewer tokens (root only).
    ///
    /// A token lets a reviewer who is not on this host use the reviewer API
    /// and its web page over TLS (agent.approvals_listen), acting as a Unix
    /// user of this host: that user's groups make it an approver, and it can
    /// never approve a statement that user sent. The agent keeps only each
    /// token's SHA-256, in agent.approvals_tokens
    /// (/etc/tollgate/reviewer-tokens), and notices changes at the next
    /// login; these commands edit that file, so the agent need not run.
    /// Examples:
    ///
    ///   tollgate approvals tokens add alice-laptop --user alice
    ///   tollgate approvals tokens list
    ///   tollgate approvals tokens revoke alice-laptop
    #[command(subcommand, verbatim_doc_comment)]
    Tokens(TokensCommand),
}

/// Which token file `tollgate approvals tokens` edits.
#[derive(clap::Args, Debug, Clone)]
pub struct TokensFile {
    #[command(flatten)]
    pub config: ConfigArg,

    /// The token file, instead of the configuration's agent.approvals_tokens
    /// (/etc/tollgate/reviewer-tokens when there is no configuration file).
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
}

/// `tollgate approvals tokens ...`
#[derive(Subcommand, Debug)]
pub enum TokensCommand {
    /// Make a token for a reviewer and print it, once.
    ///
    /// The token is printed alone on standard output; only its hash is
    /// stored (the file is written whole and renamed into place, mode 0600).
    Add {
        #[command(flatten)]
        file: TokensFile,
        /// The token's name, shown in audit records as token:NAME (letters,
        /// digits, '.', '_', '-').
        #[arg(value_name = "NAME")]
        name: String,
        /// The Unix user of this host the token acts as.
        #[arg(long, value_name = "USER")]
        user: String,
    },
    /// List the tokens: name, user and when each was made (never the token).
    List {
        #[command(flatten)]
        file: TokensFile,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: the agent refuses it from the next request on.
    Revoke {
        #[command(flatten)]
        file: TokensFile,
        /// The token's name.
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// `tollgate detach` arguments.
#[derive(clap::Args, Debug)]
pub struct DetachArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

/// `tollgate config ...`
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate a configuration file; errors are printed as FILE:LINE:COLUMN.
    ///
    /// With [redirect], also lists what targets on this host add; with
    /// [protect], which targets the cgroup root's program covers and what it
    /// does with connections that skip the redirect.
    Check(ConfigArg),
}

/// `tollgate status` arguments.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArg,

    /// Control socket to query, instead of the one the configuration names.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

pub use approvals::approvals_command;

/// Why a command failed: what standard error gets, and the exit status.
#[derive(Debug)]
pub struct CliError {
    /// Printed on standard error as it is.
    text: String,
    /// 1 when the command ran and failed, 2 when what it was given (its
    /// arguments, the configuration, a key) is invalid.
    status: u8,
}

impl CliError {
    /// The command ran and failed (exit 1).
    pub fn failed(message: impl std::fmt::Display) -> CliError {
        CliError {
            text: format!("tollgate: {message}"),
            status: 1,
        }
    }

    /// What the command was given is invalid (exit 2).
    pub fn invalid(message: impl std::fmt::Display) -> CliError {
        CliError {
            text: format!("tollgate: {message}"),
            status: 2,
        }
    }

    /// Errors that name their own place (`FILE:LINE:COLUMN: ...`), such
    /// as a configuration's (exit 2).
    pub fn located(errors: impl std::fmt::Display) -> CliError {
        CliError {
            text: errors.to_string(),
            status: 2,
        }
    }

    /// The exit status.
    pub fn status(&self) -> u8 {
        self.status
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Ends a command: its error, if any, on standard error, and its status.
pub fn finish(result: Result<(), CliError>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::from(e.status)
        }
    }
}

/// Loads the configuration at `path`; its located errors otherwise.
pub fn load_config(path: &std::path::Path) -> Result<crate::config::Config, CliError> {
    crate::config::Config::load(path).map_err(CliError::located)
}
pub use status::print_status;
