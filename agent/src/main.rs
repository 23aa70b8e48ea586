//! The `tollgate` command.

use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use tollgate_agent::agent::RunningAgent;
use tollgate_agent::cli::{self, Cli, Command, ConfigCommand};
use tollgate_agent::config::Config;
use tollgate_agent::control;
use tollgate_agent::logging;
use tollgate_agent::redirect;
use tollgate_agent::redirect::exec;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, &cli.log_level);
    match cli.command {
        Command::Config(ConfigCommand::Check(arg)) => match Config::load(&arg.config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} targets, {} listeners, {} governed cgroups)",
                    arg.config.display(),
                    c.targets.len(),
                    c.listeners.len(),
                    c.cgroups.len()
                );
                if c.redirect.is_some() && !print_local_targets(&c) {
                    return ExitCode::from(2);
                }
                if let Some(p) = &c.protect {
                    let local = redirect::local::local_targets_of(&c);
                    for line in redirect::protect::describe(&c, p, &local) {
                        println!("{line}");
                    }
                }
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!(
                    "tollgate: {} error(s) in {}",
                    errors.0.len(),
                    arg.config.display()
                );
                ExitCode::from(2)
            }
        },
        Command::Run(arg) => {
            let config = match Config::load(&arg.config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    eprintln!(
                        "tollgate: not starting: the configuration {} is invalid",
                        arg.config.display()
                    );
                    return ExitCode::from(2);
                }
            };
            let threads = config.agent.session_threads();
            finish(agent_runtime(threads).and_then(|rt| rt.block_on(run(config))))
        }
        Command::ReviewServer(arg) => match load_config(&arg.config) {
            Ok(config) => finish(
                runtime().and_then(|rt| rt.block_on(tollgate_agent::approval::server::run(config))),
            ),
            Err(code) => code,
        },
        Command::Exec(args) => exec_command(args),
        Command::Detach(args) => detach_command(args),
        Command::Thaw(args) => match tollgate_agent::intervene::thaw(&args.what) {
            Ok(done) => {
                println!("{done}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tollgate: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Policy(command) => policy_command(command),
        Command::Approvals(command) => cli::approvals_command(command),
        Command::Recordings(command) => cli::finish(cli::recordings::run(command)),
        Command::Jobs(command) => cli::finish(cli::jobs::run(command)),
        Command::Ssh(cli::SshCommand::KnownHosts { config }) => ssh_known_hosts_command(&config),
        Command::Ssh(cli::SshCommand::UserCa { config }) => ssh_user_ca_command(&config),
        Command::EnsureGoverned(args) => ensure_governed_command(args),
        Command::Status(args) => {
            let socket = match args.socket {
                Some(s) => s,
                None => match Config::load(&args.config.config) {
                    Ok(c) => c.agent.control_socket,
                    Err(errors) => {
                        eprintln!("{errors}");
                        eprintln!("tollgate: cannot find the control socket: pass --socket PATH or a valid --config");
                        return ExitCode::from(2);
                    }
                },
            };
            let result = runtime().and_then(|rt| rt.block_on(control::query_status(&socket)));
            match &result {
                Ok(report) if args.json => cli::print_json(&report),
                Ok(report) => print!("{}", cli::print_status(report)),
                Err(e) if args.json => cli::print_json_error(&format!("{e:#}")),
                Err(_) => {}
            }
            finish(result.map(|_| ()))
        }
    }
}

/// What the redirect adds for targets on this host, and the Unix sockets
/// that bypass it. False when the agent would refuse the targets here.
fn print_local_targets(config: &Config) -> bool {
    let local = redirect::local::local_targets_of(config);
    for t in &local {
        println!("{}", t.describe());
    }
    let dirs = redirect::local::postgres_socket_dirs();
    for (name, path) in redirect::local::open_unix_sockets(&local, &dirs) {
        eprintln!(
            "warning: {}",
            redirect::local::unix_socket_warning(&name, &path)
        );
    }
    match redirect::check_targets(config, &local) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("tollgate: the redirect would not start on this host: {e}");
            false
        }
    }
}

/// Loads the configuration or prints its errors; `Err` is the exit code.
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(configuration_refused)
}

/// Reads the few paths a host command needs, leniently (see
/// [`tollgate_agent::config::HostPaths`]); `Err` is the exit code.
fn load_host_paths(path: &std::path::Path) -> Result<tollgate_agent::config::HostPaths, ExitCode> {
    Config::load_host_paths(path).map_err(configuration_refused)
}

/// Prints what is wrong with a configuration file; exit code 2.
fn configuration_refused(errors: tollgate_agent::config::ConfigErrors) -> ExitCode {
    eprintln!("{errors}");
    ExitCode::from(2)
}

fn exec_command(args: cli::ExecArgs) -> ExitCode {
    let socket = match args.socket {
        Some(s) => s,
        None => match load_host_paths(&args.config.config) {
            Ok(p) => p.exec_socket,
            Err(code) => return code,
        },
    };
    let Some((program, rest)) = args.command.split_first() else {
        eprintln!("tollgate: exec needs a command");
        return ExitCode::from(2);
    };
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let (connection, cgroup) = exec::request_governance(&socket).await?;
            tracing::debug!(%cgroup, "governed");
            let mut child = match tokio::process::Command::new(program).args(rest).spawn() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    eprintln!("tollgate: {}: command not found", program.to_string_lossy());
                    return Ok(127u8);
                }
                Err(e) => {
                    eprintln!("tollgate: cannot run {}: {e}", program.to_string_lossy());
                    return Ok(126u8);
                }
            };
            // Ctrl-C reaches the whole foreground process group, the command
            // included; exec itself waits for the command to react. SIGTERM is
            // passed on.
            let mut interrupt = signal(SignalKind::interrupt())?;
            let mut terminate = signal(SignalKind::terminate())?;
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status?,
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {
                        if let Some(pid) = child.id() {
                            exec::forward_signal(pid, libc::SIGTERM);
                        }
                    }
                }
            };
            drop(connection);
            Ok(exit_byte(status))
        })
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A child's exit status as a shell reports it: the code, or 128 + signal.
fn exit_byte(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        _ => 1,
    }
}

fn ensure_governed_command(args: cli::ExecSocketArgs) -> ExitCode {
    let socket = match args.socket {
        Some(s) => s,
        None => match load_host_paths(&args.config.config) {
            Ok(p) => p.exec_socket,
            Err(code) => return code,
        },
    };
    let deadline = std::time::Instant::now() + args.wait;
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            loop {
                match exec::request_attach_self(&socket).await {
                    Ok(cgroup) => return Ok(cgroup),
                    // The agent may still be starting (ordering at boot).
                    Err(e)
                        if std::time::Instant::now() < deadline
                            && !matches!(e, exec::ExecRequestError::Refused(_)) =>
                    {
                        tracing::debug!("waiting for the agent: {e:#}");
                        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        })
    });
    match result {
        Ok(cgroup) => {
            println!("governed: {cgroup}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn policy_command(command: cli::PolicyCommand) -> ExitCode {
    use tollgate_agent::policy;
    match command {
        cli::PolicyCommand::Check { paths } => match policy::check(&paths) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        },
        cli::PolicyCommand::Explain {
            policy: paths,
            config,
            target,
            identity,
            json,
            dialect,
            server_version,
            sql,
        } => {
            // The configuration, when it is needed or there to ask: for the
            // policy paths, and for the target's protocol.
            let loaded = if paths.is_empty() {
                match load_config(&config.config) {
                    Ok(c) => Some(c),
                    Err(code) => return code,
                }
            } else if dialect.is_none() && config.config.exists() {
                tollgate_agent::config::Config::load(&config.config).ok()
            } else {
                None
            };
            let paths = if paths.is_empty() {
                match loaded.as_ref() {
                    Some(c) if !c.agent.policy_paths.is_empty() => c.agent.policy_paths.clone(),
                    _ => {
                        eprintln!("tollgate: no policy given: pass --policy PATH or set agent.policy_paths");
                        return ExitCode::from(2);
                    }
                }
            } else {
                paths
            };
            let dialect = match dialect {
                Some(d) => d.into(),
                None => loaded
                    .as_ref()
                    .and_then(|c| c.targets.iter().find(|t| t.name == target))
                    .map_or(tollgate_agent::sql::Dialect::Postgres, |t| {
                        match t.protocol {
                            tollgate_agent::config::Protocol::Mysql => {
                                tollgate_agent::sql::Dialect::Mysql
                            }
                            _ => tollgate_agent::sql::Dialect::Postgres,
                        }
                    }),
            };
            let set = match policy::PolicySet::load(&paths) {
                Ok(s) => s,
                Err(errors) => return policy_failure(&errors, json),
            };
            let identity = match policy::parse_identity(&identity) {
                Ok(i) => i,
                Err(errors) => return policy_failure(&errors, json),
            };
            let sql = match server_version {
                None => sql,
                Some(_) if dialect != tollgate_agent::sql::Dialect::Mysql => {
                    eprintln!("tollgate: --server-version is for MySQL text (--dialect mysql, or a mysql target)");
                    return ExitCode::from(2);
                }
                Some(version) => {
                    let Some(server) = tollgate_agent::sql::mysql::ServerVersion::parse(&version)
                    else {
                        eprintln!("tollgate: --server-version {version:?} is not a version such as 10.11.6-MariaDB or 8.0.36");
                        return ExitCode::from(2);
                    };
                    match tollgate_agent::sql::mysql::resolve_executable_comments(
                        &sql,
                        tollgate_agent::sql::mysql::Escapes::Unknown,
                        server,
                    ) {
                        Ok(resolved) => resolved.into_owned(),
                        // Explained as the agent refuses it.
                        Err(_) => sql,
                    }
                }
            };
            let explanation = policy::explain(&set, &target, &identity, &sql, dialect);
            if json {
                cli::print_json(&explanation);
            } else {
                print_block(&explanation.to_string());
            }
            ExitCode::SUCCESS
        }
        cli::PolicyCommand::Test { dir, json } => match policy::run_tests(&dir) {
            Ok(report) => {
                if json {
                    cli::print_json(&report);
                } else {
                    print_block(&report.to_string());
                }
                if report.success() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(errors) => policy_failure(&errors, json),
        },
    }
}

/// A policy that does not load: its located errors on stderr (and, when
/// JSON was asked for, as a JSON error object on stdout); exit 2.
fn policy_failure(errors: &impl std::fmt::Display, json: bool) -> ExitCode {
    if json {
        cli::print_json_error(&errors.to_string());
    }
    eprintln!("{errors}");
    ExitCode::from(2)
}

/// Prints text ending with exactly one newline.
fn print_block(text: &str) {
    println!("{}", text.trim_end_matches('\n'));
}

fn ssh_known_hosts_command(arg: &cli::ConfigArg) -> ExitCode {
    let config = match load_config(&arg.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match tollgate_agent::protocol::ssh::known_hosts_lines(&config) {
        Ok(lines) if lines.is_empty() => {
            eprintln!("tollgate: {} has no ssh target", arg.config.display());
            ExitCode::FAILURE
        }
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn ssh_user_ca_command(arg: &cli::ConfigArg) -> ExitCode {
    let config = match load_config(&arg.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let ca = tollgate_agent::protocol::ssh::keys::UserCa::load(&config.agent.tls_dir);
    match ca.map(|ca| ca.public().to_openssh()) {
        Ok(Ok(line)) => {
            println!("{line} tollgate user CA");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("tollgate: cannot encode the SSH user CA: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn detach_command(args: cli::DetachArgs) -> ExitCode {
    let paths = match load_host_paths(&args.config.config) {
        Ok(p) => p,
        Err(code) => return code,
    };
    if std::os::unix::net::UnixStream::connect(&paths.control_socket).is_ok() {
        eprintln!(
            "tollgate: an agent is running (it answers on {}); stop it first, then detach",
            paths.control_socket.display()
        );
        return ExitCode::FAILURE;
    }
    let pin_dir = paths.pin_dir;
    match redirect::detach(&pin_dir) {
        Ok(removed) if removed.is_empty() => {
            println!("nothing pinned under {}", pin_dir.display());
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            for p in &removed {
                println!("removed {}", p.display());
            }
            println!("detached: governed connections are no longer redirected or refused");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate: cannot remove {}: {e}", pin_dir.display());
            ExitCode::FAILURE
        }
    }
}

/// The agent's runtime: `threads` workers run the sessions (blocking
/// work, such as reading `/proc`, has its own pool).
fn agent_runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?)
}

/// The runtime of a command that talks to the agent (`exec`, `status`).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Lowercase, with the chain of causes, printed once.
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let grace = config.agent.shutdown_grace;
    let threads = config.agent.session_threads();
    let agent = RunningAgent::start(config).await?;
    tracing::info!(pid = std::process::id(), threads, "tollgate ready");
    loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = interrupt.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the policy (the configuration itself is read at start only)");
                agent.reload_policy();
            }
        }
    }
    let hurry = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    };
    agent.shutdown(grace, hurry).await;
    Ok(())
}
