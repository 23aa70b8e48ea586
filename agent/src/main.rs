//! The `tollgate` command.

use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use tollgate_agent::cli::{self, Cli, Command, ConfigCommand};
use tollgate_agent::config::Config;
use tollgate_agent::control;
use tollgate_agent::logging;
use tollgate_agent::proxy::RunningAgent;

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
            finish(runtime().and_then(|rt| rt.block_on(run(config))))
        }
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
            finish(
                runtime()
                    .and_then(|rt| rt.block_on(control::query_status(&socket)))
                    .map(|report| {
                        if args.json {
                            println!(
                                "{}",
                                serde_json::to_string_pretty(&report).unwrap_or_default()
                            );
                        } else {
                            print!("{}", cli::print_status(&report));
                        }
                    }),
            )
        }
    }
}

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
    let agent = RunningAgent::start(config).await?;
    tracing::info!(pid = std::process::id(), "tollgate ready");
    loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = interrupt.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: no reloadable policy is configured; the configuration itself is read at start only");
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
