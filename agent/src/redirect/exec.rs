//! The exec socket: how `tollgate exec` puts one command under governance.
//!
//! A client connects to the socket (mode 0666: asking to be governed only
//! restricts the asker) and sends `govern`. The agent takes the client's pid
//! from the kernel (`SO_PEERCRED`, not from anything the client says),
//! creates a transient cgroup `exec-<pid>-<n>` under the exec cgroup (where
//! the redirect programs are attached, so they apply to every child cgroup),
//! moves the client into it and answers `ok <path>`. The client then runs
//! its command, which inherits the cgroup. When the client's connection ends
//! (the command finished and `tollgate exec` exited), the agent removes the
//! cgroup once it is empty.
//!
//! Asking to be governed must never loosen: a client already in a governed
//! cgroup (or below one) whose mode is stricter than the exec cgroup's
//! (`unlisted = "deny"` there, `exec_unlisted = "pass"`) is not moved. It
//! stays where the kernel says it is, under its own cgroup's programs, and
//! is told so (`ok <its cgroup>`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::redirect::{cgroup, Redirect};

/// At most this many `tollgate exec` sessions at once.
pub const MAX_EXEC_SESSIONS: usize = 1024;

/// Binds the exec socket with mode 0666: asking to be governed only
/// restricts the asker, so every user may.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    crate::accept::bind_unix_socket(path, "exec socket", 0o666, "redirect.exec_socket")
}

/// What a requester past [`MAX_EXEC_SESSIONS`] is told.
pub const EXEC_BUSY: &str = "error too many tollgate exec sessions are running\n";

/// Serves exec requests until `stop` is cancelled.
pub async fn serve(
    listener: UnixListener,
    redirect: Arc<Redirect>,
    endpoint: crate::accept::Endpoint,
    stop: CancellationToken,
) {
    let exec_root = redirect.exec_root.clone();
    sweep(&exec_root);
    let mut counter = 0u64;
    crate::accept::accept_each(listener, endpoint, stop, |stream, _| {
        let redirect = redirect.clone();
        let n = counter;
        counter += 1;
        Some(async move {
            if let Err(e) = govern(stream, &redirect, n).await {
                tracing::warn!(error = %format!("{e:#}"), "exec request failed");
            }
        })
    })
    .await;
}

async fn govern(stream: UnixStream, redirect: &Arc<Redirect>, n: u64) -> anyhow::Result<()> {
    let exec_root = redirect.exec_root.as_path();
    let cred = stream
        .peer_cred()
        .context("reading the requester's credentials")?;
    let pid = cred
        .pid()
        .and_then(|p| u32::try_from(p).ok())
        .context("the kernel gave no pid for the requester")?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(256));
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .context("no request within 5 s")??;
    match line.trim() {
        "govern" => {}
        "attach-self" => {
            // A governed service's ExecStartPre= asks for its own cgroup to be
            // attached before the service's main process starts.
            let answer = tokio::task::spawn_blocking({
                let redirect = redirect.clone();
                move || redirect.attach_for_pid(pid)
            })
            .await?;
            let reply = match answer {
                Ok(path) => format!("ok {}\n", path.display()),
                Err(e) => format!("error {e}\n"),
            };
            write.write_all(reply.as_bytes()).await?;
            return Ok(());
        }
        _ => {
            write
                .write_all(b"error unknown request; expected \"govern\" or \"attach-self\"\n")
                .await?;
            return Ok(());
        }
    }
    // The requester's cgroup as the kernel reports it for the pid the
    // kernel gave: the requester has no say in it.
    let caller = tokio::task::spawn_blocking({
        let redirect = redirect.clone();
        move || redirect.caller_cgroup(pid)
    })
    .await?;
    let caller = match caller {
        Ok(c) => c,
        Err(e) => {
            write.write_all(format!("error {e}\n").as_bytes()).await?;
            return Ok(());
        }
    };
    if redirect.exec_would_loosen(&caller) {
        return stay_in_stricter_cgroup(redirect, caller, pid, write, reader).await;
    }
    let dir = exec_root.join(format!("exec-{pid}-{n}"));
    let made = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || -> std::io::Result<()> {
            std::fs::create_dir(&dir)?;
            cgroup::move_pid(&dir, pid)
        }
    })
    .await?;
    if let Err(e) = made {
        let _ = std::fs::remove_dir(&dir);
        write
            .write_all(
                format!(
                    "error cannot move process {pid} into {}: {e}\n",
                    dir.display()
                )
                .as_bytes(),
            )
            .await?;
        return Ok(());
    }
    redirect.remember_exec_cgroup(&dir);
    tracing::info!(pid, uid = cred.uid(), cgroup = %dir.display(), "tollgate exec: process governed");
    write
        .write_all(format!("ok {}\n", dir.display()).as_bytes())
        .await?;

    // The requester holds the connection open for as long as it lives.
    let mut rest = reader.into_inner();
    let mut sink = [0u8; 64];
    while matches!(rest.read(&mut sink).await, Ok(n) if n > 0) {}
    remove_when_empty(&dir).await;
    Ok(())
}

/// Answers a requester whose governed cgroup is stricter than exec
/// sessions: it stays in that cgroup (attached now if the periodic look has
/// not done it yet), and nothing is created or removed for it.
async fn stay_in_stricter_cgroup(
    redirect: &Arc<Redirect>,
    caller: crate::redirect::CallerCgroup,
    pid: u32,
    mut write: tokio::net::unix::OwnedWriteHalf,
    reader: BufReader<tokio::io::Take<tokio::net::unix::OwnedReadHalf>>,
) -> anyhow::Result<()> {
    let Some((governed, _)) = caller.governed_by.clone() else {
        write
            .write_all(b"error the agent lost track of the requester's governed cgroup\n")
            .await?;
        return Ok(());
    };
    let attached = tokio::task::spawn_blocking({
        let redirect = redirect.clone();
        let governed = governed.clone();
        move || redirect.ensure_governed_attached(&governed)
    })
    .await?;
    if let Err(e) = attached {
        // Moving it would loosen, leaving it would not govern: refuse.
        write
            .write_all(format!("error cannot govern {}: {e}\n", governed.display()).as_bytes())
            .await?;
        return Ok(());
    }
    tracing::info!(pid, cgroup = %caller.path.display(), governed_by = %governed.display(),
        "tollgate exec: the process stays in its governed cgroup, which restricts more than exec sessions");
    write
        .write_all(format!("ok {}\n", caller.path.display()).as_bytes())
        .await?;
    let mut rest = reader.into_inner();
    let mut sink = [0u8; 64];
    while matches!(rest.read(&mut sink).await, Ok(n) if n > 0) {}
    Ok(())
}

/// Removes a transient cgroup once its last process is gone (processes
/// take a moment to leave after their parent saw them exit).
async fn remove_when_empty(dir: &Path) {
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() {
            tracing::info!(cgroup = %dir.display(), "tollgate exec: session ended, cgroup removed");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!(cgroup = %dir.display(), populated = cgroup::populated(dir),
        "tollgate exec: processes outlived the command; the cgroup stays governed and is removed once empty");
}

/// Removes empty `exec-*` cgroups left by an earlier run.
fn sweep(exec_root: &Path) {
    let Ok(entries) = std::fs::read_dir(exec_root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if name.to_string_lossy().starts_with("exec-") && std::fs::remove_dir(e.path()).is_ok() {
            tracing::info!(cgroup = %e.path().display(), "removed an empty exec cgroup of an earlier run");
        }
    }
}

/// Client side: asks the agent at `socket` to govern this process. The
/// returned stream must stay open while the governed command runs.
pub async fn request_governance(socket: &Path) -> Result<(UnixStream, String), ExecRequestError> {
    request(socket, "govern").await
}

/// Client side: asks the agent to attach to the (configured) cgroup this
/// process runs in; returns the cgroup.
pub async fn request_attach_self(socket: &Path) -> Result<String, ExecRequestError> {
    request(socket, "attach-self")
        .await
        .map(|(_, cgroup)| cgroup)
}

/// Why a request on the exec socket failed. A caller that waits for the
/// agent to start retries the first two and gives up on a refusal.
#[derive(Debug, thiserror::Error)]
pub enum ExecRequestError {
    /// Nothing answers on the socket (the agent is not running, or not
    /// yet).
    #[error("no agent answers on the exec socket {} ({source}); `tollgate exec` needs `tollgate run` with a [redirect] section running on this host", socket.display())]
    NoAgent {
        /// The exec socket.
        socket: std::path::PathBuf,
        /// What connecting said.
        source: std::io::Error,
    },
    /// The exchange failed midway, or the agent did not answer in time.
    #[error("{0}")]
    Exchange(String),
    /// The agent answered, and refused.
    #[error("the agent refused: {0}")]
    Refused(String),
}

async fn request(socket: &Path, what: &str) -> Result<(UnixStream, String), ExecRequestError> {
    let exchange = |e: std::io::Error| {
        ExecRequestError::Exchange(format!("talking to the agent on {}: {e}", socket.display()))
    };
    let mut stream =
        UnixStream::connect(socket)
            .await
            .map_err(|source| ExecRequestError::NoAgent {
                socket: socket.to_path_buf(),
                source,
            })?;
    stream
        .write_all(format!("{what}\n").as_bytes())
        .await
        .map_err(exchange)?;
    let mut line = String::new();
    let mut reader = BufReader::new(&mut stream);
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .map_err(|_| ExecRequestError::Exchange("the agent did not answer within 10 s".into()))?
        .map_err(exchange)?;
    let line = line.trim_end().to_string();
    match line.split_once(' ') {
        Some(("ok", cgroup)) => Ok((stream, cgroup.to_string())),
        Some(("error", why)) => Err(ExecRequestError::Refused(why.to_string())),
        _ => Err(ExecRequestError::Exchange(format!(
            "unexpected answer from the agent: {line:?}"
        ))),
    }
}

/// Sends `signal` to `pid` (a child of ours).
#[allow(unsafe_code)]
pub fn forward_signal(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}
