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
        Command::Exec(args) => exec_command(args),
        Command::Detach(args) => detach_command(args),
        Command::Policy(command) => policy_command(command),
        Command::Approvals(command) => cli::approvals_command(command),
        Command::Recordings(command) => recordings_command(command),
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
    Config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(2)
    })
}

fn exec_command(args: cli::ExecArgs) -> ExitCode {
    let socket = match args.socket {
        Some(s) => s,
        None => match load_config(&args.config.config) {
            Ok(c) => c.redirect.unwrap_or_default().exec_socket,
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
        None => match load_config(&args.config.config) {
            Ok(c) => c.redirect.unwrap_or_default().exec_socket,
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
                            && !e.to_string().contains("refused:") =>
                    {
                        tracing::debug!("waiting for the agent: {e:#}");
                        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                    }
                    Err(e) => return Err(e),
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
            sql,
        } => {
            let paths = if paths.is_empty() {
                match load_config(&config.config) {
                    Ok(c) if !c.agent.policy_paths.is_empty() => c.agent.policy_paths,
                    Ok(_) => {
                        eprintln!("tollgate: no policy given: pass --policy PATH or set agent.policy_paths");
                        return ExitCode::from(2);
                    }
                    Err(code) => return code,
                }
            } else {
                paths
            };
            let set = match policy::PolicySet::load(&paths) {
                Ok(s) => s,
                Err(errors) => return policy_failure(&errors, json),
            };
            let identity = match policy::parse_identity(&identity) {
                Ok(i) => i,
                Err(errors) => return policy_failure(&errors, json),
            };
            let explanation = policy::explain(&set, &target, &identity, &sql);
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

/// The recording file for an id or a path given on the command line.
fn find_recording(dir: &std::path::Path, id: &str) -> Result<std::path::PathBuf, String> {
    let as_path = std::path::Path::new(id);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    let uuid = uuid::Uuid::parse_str(id)
        .map_err(|_| format!("\"{id}\" is neither a recording file nor a session id"))?;
    tollgate_agent::recording::locate(dir, uuid)
        .ok_or_else(|| format!("no recording of session {id} under {}", dir.display()))
}

/// Reads the recording an id or path names. A file path needs no
/// configuration (for checking recordings off the host); an id is looked
/// up under the configuration's recording_dir. `Err` is the exit code.
fn open_recording(
    config: &cli::ConfigArg,
    id: &str,
) -> Result<tollgate_agent::recording::Recording, ExitCode> {
    let dir = if std::path::Path::new(id).is_file() {
        std::path::PathBuf::new()
    } else {
        load_config(&config.config)?.agent.recording_dir
    };
    find_recording(&dir, id)
        .and_then(|p| {
            tollgate_agent::recording::read_recording(&p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))
        })
        .map_err(|e| {
            eprintln!("tollgate: {e}");
            ExitCode::FAILURE
        })
}

fn recordings_command(command: cli::RecordingsCommand) -> ExitCode {
    use std::io::IsTerminal;
    use tollgate_agent::recording;
    let config_of = |c: &cli::ConfigArg| load_config(&c.config).map(|c| c.agent.recording_dir);
    match command {
        cli::RecordingsCommand::List {
            config,
            since,
            target,
            user,
            ci_repo,
            denied,
            json,
        } => {
            let dir = match config_of(&config) {
                Ok(d) => d,
                Err(code) => return code,
            };
            let filter = recording::RecordingFilter {
                since: since.and_then(|d| std::time::SystemTime::now().checked_sub(d)),
                target,
                user,
                ci_repo,
                denied_only: denied,
                ..Default::default()
            };
            let found = recording::list(&dir, &filter);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&found).unwrap_or_default()
                );
                return ExitCode::SUCCESS;
            }
            println!(
                "{:<36}  {:<24}  {:<12}  {:<10}  {:>7}  {:>6}  EXE",
                "SESSION", "STARTED", "TARGET", "USER", "STMTS", "DENIED"
            );
            for r in &found {
                println!(
                    "{:<36}  {:<24}  {:<12}  {:<10}  {:>7}  {:>6}  {}",
                    r.id.map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
                    r.started_at.as_deref().unwrap_or("?"),
                    r.target.as_deref().unwrap_or("?"),
                    r.user.as_deref().unwrap_or("?"),
                    r.statements,
                    r.denied,
                    r.exe.as_deref().unwrap_or("?"),
                );
            }
            ExitCode::SUCCESS
        }
        cli::RecordingsCommand::Show {
            config,
            id,
            no_color,
        } => match open_recording(&config, &id) {
            Ok(r) => {
                let color = !no_color && std::io::stdout().is_terminal();
                print_block(&recording::render_transcript(&r, color));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        cli::RecordingsCommand::Replay {
            config,
            id,
            speed,
            no_wait,
            max_wait,
            no_color,
        } => {
            let rec = match open_recording(&config, &id) {
                Ok(r) => r,
                Err(code) => return code,
            };
            let options = recording::ReplayOptions {
                speed: if no_wait { 0.0 } else { speed },
                max_wait,
                color: !no_color && std::io::stdout().is_terminal(),
            };
            let mut out = std::io::stdout().lock();
            match recording::replay(&rec, &options, &mut out, &mut std::thread::sleep) {
                Ok(_) => ExitCode::SUCCESS,
                // A closed pipe (`| head`) is the reader's choice, not a failure.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tollgate: cannot write the replay: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        cli::RecordingsCommand::Keygen { out } => match recording::generate_key(&out) {
            Ok(key) => {
                println!("private key: {} (mode 0600)", key.private.display());
                println!("public key:  {}", key.public_path.display());
                println!("key id:      {}", key.public.key_id());
                println!("{}", key.public.to_hex());
                println!(
                    "Set agent.recording_signing_key = \"{}\" and verify with --public-key {}",
                    key.private.display(),
                    key.public_path.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tollgate: cannot make a signing key: {e}");
                ExitCode::FAILURE
            }
        },
        cli::RecordingsCommand::Verify {
            config,
            id,
            all,
            public_keys,
        } => {
            let mut keys = Vec::new();
            for path in &public_keys {
                match recording::PublicKey::load(path) {
                    Ok(k) => keys.push(k),
                    Err(e) => {
                        eprintln!("tollgate: cannot use --public-key {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            // A recording file given by path needs no configuration.
            let dir = match id.as_deref() {
                Some(p) if !all && std::path::Path::new(p).is_file() => std::path::PathBuf::new(),
                _ => match config_of(&config) {
                    Ok(d) => d,
                    Err(code) => return code,
                },
            };
            let paths: Vec<std::path::PathBuf> = if all {
                recording::list(&dir, &recording::RecordingFilter::default())
                    .into_iter()
                    .map(|r| r.path)
                    .collect()
            } else {
                match find_recording(&dir, id.as_deref().unwrap_or_default()) {
                    Ok(p) => vec![p],
                    Err(e) => {
                        eprintln!("tollgate: {e}");
                        return ExitCode::from(2);
                    }
                }
            };
            let mut bad = 0;
            for p in &paths {
                let report = recording::verify_signed(p, &keys);
                if !report.ok() {
                    bad += 1;
                }
                println!("{report}");
            }
            if all {
                println!("{} verified, {} failed", paths.len() - bad, bad);
            }
            if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        cli::RecordingsCommand::Export {
            config,
            id,
            format,
            out,
        } => {
            let r = match open_recording(&config, &id) {
                Ok(r) => r,
                Err(code) => return code,
            };
            let bytes = if format == "pcap" {
                match recording::export_pcap(&r) {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("tollgate: cannot export {id} as pcap: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                recording::export_jsonl(&r).into_bytes()
            };
            write_export(&bytes, out.as_deref(), format == "pcap")
        }
    }
}

/// Writes an export to `out`, or to standard output; binary output is not
/// written to a terminal.
fn write_export(bytes: &[u8], out: Option<&std::path::Path>, binary: bool) -> ExitCode {
    use std::io::{IsTerminal as _, Write as _};
    let written = match out {
        Some(path) => {
            std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
        }
        None if binary && std::io::stdout().is_terminal() => {
            Err("a pcap is binary: give --out FILE or redirect standard output".to_string())
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(bytes)
                .and_then(|()| stdout.flush())
                .map_err(|e| format!("cannot write the export: {e}"))
        }
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints text ending with exactly one newline.
fn print_block(text: &str) {
    println!("{}", text.trim_end_matches('\n'));
}

fn detach_command(args: cli::DetachArgs) -> ExitCode {
    let config = match load_config(&args.config.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if std::os::unix::net::UnixStream::connect(&config.agent.control_socket).is_ok() {
        eprintln!(
            "tollgate: an agent is running (it answers on {}); stop it first, then detach",
            config.agent.control_socket.display()
        );
        return ExitCode::FAILURE;
    }
    let pin_dir = config.redirect.unwrap_or_default().pin_dir;
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
