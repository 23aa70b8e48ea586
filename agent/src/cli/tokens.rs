//! `tollgate approvals tokens`: reviewer tokens for the reviewer API over
//! TLS. Edits the token file directly (root only), so it works whether or
//! not the agent runs; the agent notices the change at the next login.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{TokensCommand, TokensFile};
use crate::approval::reviewers::user_ids;
use crate::approval::tokens::{self, TokenEntry, DEFAULT_TOKENS_PATH};
use crate::config::Config;

/// Runs one `tollgate approvals tokens` subcommand.
pub(super) fn tokens_command(command: &TokensCommand) -> ExitCode {
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("tollgate: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("tollgate: {message}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    /// Bad usage or configuration: exit 2.
    Usage(String),
    /// Failed at run time: exit 1.
    Runtime(String),
}

fn run(command: &TokensCommand) -> Result<(), Failure> {
    match command {
        TokensCommand::Add { file, name, user } => add(&path_of(file)?, name, user),
        TokensCommand::List { file, json } => list(&path_of(file)?, *json),
        TokensCommand::Revoke { file, name } => revoke(&path_of(file)?, name),
    }
}

/// `--file`, else the configuration's `approvals_tokens`, else the default
/// when there is no configuration file.
fn path_of(file: &TokensFile) -> Result<PathBuf, Failure> {
    if let Some(path) = &file.file {
        return Ok(path.clone());
    }
    let config = &file.config.config;
    if !config.exists() {
        return Ok(PathBuf::from(DEFAULT_TOKENS_PATH));
    }
    Config::load(config)
        .map(|c| c.agent.approvals_tokens)
        .map_err(|e| Failure::Usage(format!("{e}")))
}

/// The token file must stay root's: only root edits it.
fn require_root(what: &str) -> Result<(), Failure> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    // "Uid: real effective saved filesystem"
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|uid| uid.parse::<u32>().ok());
    if effective == Some(0) {
        Ok(())
    } else {
        Err(Failure::Runtime(format!(
            "{what} needs root: the token file is root's alone"
        )))
    }
}

fn load(path: &Path) -> Result<tokens::TokenFile, Failure> {
    tokens::load(path, 0).map_err(|e| Failure::Runtime(e.to_string()))
}

fn add(path: &Path, name: &str, user: &str) -> Result<(), Failure> {
    tokens::check_name(name).map_err(Failure::Usage)?;
    require_root("tollgate approvals tokens add")?;
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    if user_ids(&passwd, user).is_none() {
        return Err(Failure::Usage(format!(
            "there is no user \"{user}\" in /etc/passwd; a token acts as a Unix user of this host (its groups make it an approver)"
        )));
    }
    let mut file = load(path)?;
    if file.entries.iter().any(|e| e.name == name) {
        return Err(Failure::Runtime(format!(
            "{}: a token named \"{name}\" exists; revoke it first or choose another name",
            path.display()
        )));
    }
    let (token, sha256) = tokens::new_token().map_err(|e| Failure::Runtime(e.to_string()))?;
    file.entries.push(TokenEntry {
        name: name.to_owned(),
        user: user.to_owned(),
        sha256,
        created: crate::approval::unix_seconds(std::time::SystemTime::now()),
    });
    tokens::save(path, &file).map_err(|e| Failure::Runtime(e.to_string()))?;
    // The token alone on standard output, for scripts; the rest for people.
    println!("{token}");
    eprintln!(
        "tollgate: token \"{name}\" acts as {user}; it is shown this once ({} keeps only its hash). \
         Give it to the reviewer privately; revoke with: tollgate approvals tokens revoke {name}",
        path.display()
    );
    Ok(())
}

fn list(path: &Path, json: bool) -> Result<(), Failure> {
    require_root("tollgate approvals tokens list")?;
    let file = load(path)?;
    if json {
        let text = serde_json::to_string_pretty(&file.entries)
            .map_err(|e| Failure::Runtime(e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    print!("{}", list_text(&file.entries));
    Ok(())
}

fn list_text(entries: &[TokenEntry]) -> String {
    if entries.is_empty() {
        return "no reviewer tokens\n".to_owned();
    }
    let width = entries
        .iter()
        .map(|e| e.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let user_width = entries
        .iter()
        .map(|e| e.user.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let mut out = format!("{:width$}  {:user_width$}  CREATED\n", "NAME", "USER");
    for e in entries {
        let created = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.created),
        );
        out.push_str(&format!(
            "{:width$}  {:user_width$}  {created}\n",
            e.name, e.user
        ));
    }
    out
}

fn revoke(path: &Path, name: &str) -> Result<(), Failure> {
    require_root("tollgate approvals tokens revoke")?;
    let mut file = load(path)?;
    let before = file.entries.len();
    file.entries.retain(|e| e.name != name);
    if file.entries.len() == before {
        return Err(Failure::Runtime(format!(
            "{}: no token named \"{name}\" (tollgate approvals tokens list shows them)",
            path.display()
        )));
    }
    tokens::save(path, &file).map_err(|e| Failure::Runtime(e.to_string()))?;
    println!("revoked token {name}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_listed_with_their_user_and_when_they_were_made() {
        assert_eq!(list_text(&[]), "no reviewer tokens\n");
        let entries = [
            TokenEntry {
                name: "alice-laptop".into(),
                user: "alice".into(),
                sha256: [0; 32],
                created: 1_780_000_000,
            },
            TokenEntry {
                name: "bob".into(),
                user: "robert".into(),
                sha256: [1; 32],
                created: 1_780_000_060,
            },
        ];
        assert_eq!(
            list_text(&entries),
            "NAME          USER    CREATED\n\
             alice-laptop  alice   2026-05-28T20:26:40Z\n\
             bob           robert  2026-05-28T20:27:40Z\n"
        );
    }
}
