//! One accept loop for every endpoint the agent serves: the proxy's
//! listeners and redirect port, the control socket, the exec socket, the
//! reviewer API (Unix socket and TLS) and the metrics endpoint.
//!
//! Each connection is served on a task tracked by the caller's
//! [`TaskTracker`] (waited for at shutdown) and holds a permit of the
//! endpoint's semaphore for as long as it is served, so a flood of
//! connections costs at most that many tasks. A connection that arrives
//! when every permit is taken waits for one, holding the accept loop, so
//! the rest stay in the kernel's backlog ([`WhenFull::Wait`]), or is closed
//! at once with a short message ([`WhenFull::Refuse`]). Accept errors (out
//! of file descriptors, say) back off from 1 ms to 1 s instead of spinning.

use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A socket that accepts connections.
pub trait Listen: Send + 'static {
    /// An accepted connection.
    type Stream: Send + 'static;
    /// The peer's address.
    type Peer: Send + 'static;
    /// The next connection.
    fn next(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Peer)>> + Send;
    /// Writes `message` if the socket takes it now (never waits).
    fn try_tell(stream: &Self::Stream, message: &[u8]);
}

impl Listen for TcpListener {
    type Stream = TcpStream;
    type Peer = std::net::SocketAddr;
    fn next(&self) -> impl Future<Output = io::Result<(TcpStream, std::net::SocketAddr)>> + Send {
        self.accept()
    }
    fn try_tell(stream: &TcpStream, message: &[u8]) {
        let _ = stream.try_write(message);
    }
}

impl Listen for UnixListener {
    type Stream = UnixStream;
    type Peer = tokio::net::unix::SocketAddr;
    fn next(
        &self,
    ) -> impl Future<Output = io::Result<(UnixStream, tokio::net::unix::SocketAddr)>> + Send {
        self.accept()
    }
    fn try_tell(stream: &UnixStream, message: &[u8]) {
        let _ = stream.try_write(message);
    }
}

/// What happens to a connection that arrives when every permit is taken.
#[derive(Debug, Clone, Copy)]
pub enum WhenFull {
    /// It waits for a permit; later ones wait in the kernel's backlog.
    Wait,
    /// It is told this (best effort) and closed.
    Refuse(&'static str),
}

/// Counters of one endpoint, rendered by the metrics endpoint.
#[derive(Debug, Default)]
pub struct EndpointCounters {
    /// Connections being served now.
    pub open: AtomicU64,
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed unserved because every permit was taken.
    pub refused: AtomicU64,
    /// Errors from accept().
    pub accept_errors: AtomicU64,
}

/// One endpoint's accept loop settings.
pub struct Endpoint {
    /// Its name in logs and metrics (`control`, `metrics`, ...).
    pub name: &'static str,
    /// Connections served at once (shared by the proxy's listeners).
    pub permits: Arc<Semaphore>,
    /// What a connection past that gets.
    pub when_full: WhenFull,
    /// Where connection tasks run, waited for at shutdown.
    pub tasks: TaskTracker,
    /// Its counters.
    pub counters: Arc<EndpointCounters>,
}

impl Endpoint {
    /// An endpoint serving at most `limit` connections at once, on `tasks`.
    pub fn new(
        name: &'static str,
        limit: usize,
        when_full: WhenFull,
        tasks: &TaskTracker,
        counters: Arc<EndpointCounters>,
    ) -> Endpoint {
        Endpoint {
            name,
            permits: Arc::new(Semaphore::new(limit)),
            when_full,
            tasks: tasks.clone(),
            counters,
        }
    }
}

/// Decrements the open count when a connection's task ends, however it
/// ends.
struct Open(Arc<EndpointCounters>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts on `listener` until `stop` is cancelled; `serve` gives the task
/// for each connection (`None`: close it unserved).
pub async fn accept_each<L, S, F>(
    listener: L,
    endpoint: Endpoint,
    stop: CancellationToken,
    mut serve: S,
) where
    L: Listen,
    S: FnMut(L::Stream, L::Peer) -> Option<F>,
    F: Future<Output = ()> + Send + 'static,
{
    let Endpoint {
        name,
        permits,
        when_full,
        tasks,
        counters,
    } = endpoint;
    let mut backoff = Duration::from_millis(1);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.next() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                counters.accept_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(endpoint = name, error = %e, backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(1);
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        // The permit is taken once a connection is there: an idle listener
        // holds none, so one of the proxy's listeners never keeps another's
        // connections out. Waiters are served in order.
        let permit = match when_full {
            WhenFull::Wait => tokio::select! {
                _ = stop.cancelled() => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            },
            WhenFull::Refuse(message) => match permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        endpoint = name,
                        "connection refused: the endpoint serves as many as it may"
                    );
                    L::try_tell(&stream, message.as_bytes());
                    continue;
                }
            },
        };
        let Some(task) = serve(stream, peer) else {
            continue;
        };
        counters.open.fetch_add(1, Ordering::Relaxed);
        let open = Open(counters.clone());
        tasks.spawn(async move {
            task.await;
            drop(open);
            drop(permit);
        });
    }
    tracing::debug!(endpoint = name, "stopped accepting");
}

/// Binds a Unix socket of the agent with `mode`, creating its directory and
/// replacing a stale socket file. Refuses to take over a socket another
/// agent still answers on. `what` names it in errors, `setting` is the
/// configuration key that moves it.
pub fn bind_unix_socket(
    path: &Path,
    what: &str,
    mode: u32,
    setting: &str,
) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the {what} directory {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another agent is running with {what} {}; stop it first or set {setting} to another path",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale {what} {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot create the {what} {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set mode {mode:o} on the {what} {}", path.display()))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// An endpoint on a Unix socket whose connections are held open.
    struct Serving {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        tasks: TaskTracker,
        counters: Arc<EndpointCounters>,
        stop: CancellationToken,
        looping: tokio::task::JoinHandle<()>,
    }

    fn serve(limit: usize, when_full: WhenFull) -> Serving {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let tasks = TaskTracker::new();
        let endpoint = Endpoint::new("test", limit, when_full, &tasks, Arc::default());
        let counters = endpoint.counters.clone();
        let stop = CancellationToken::new();
        let looping = tokio::spawn(accept_each(listener, endpoint, stop.clone(), |s, _| {
            Some(hold_open(s))
        }));
        Serving {
            _dir: dir,
            path,
            tasks,
            counters,
            stop,
            looping,
        }
    }

    /// Serves each connection until it is closed by the peer.
    fn hold_open(mut stream: UnixStream) -> impl Future<Output = ()> + Send {
        use tokio::io::AsyncReadExt;
        async move {
            let mut buf = [0u8; 64];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    return;
                }
            }
        }
    }

    #[tokio::test]
    async fn a_flood_of_connections_is_served_a_bounded_number_at_a_time() {
        let Serving {
            _dir,
            path,
            tasks,
            counters,
            stop,
            looping,
        } = serve(4, WhenFull::Wait);
        let mut clients = Vec::new();
        for _ in 0..200 {
            clients.push(UnixStream::connect(&path).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(tasks.len(), 4, "one task per permit, however many connect");
        assert_eq!(counters.open.load(Ordering::Relaxed), 4);
        // Closing served connections lets waiting ones in, in turn.
        drop(clients.drain(..10));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(tasks.len(), 4);
        assert!(counters.accepted.load(Ordering::Relaxed) >= 14);
        stop.cancel();
        looping.await.unwrap();
        drop(clients);
        tasks.close();
        tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .expect("every connection task ends once its peer is gone");
        assert_eq!(counters.open.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn past_the_limit_a_refusing_endpoint_says_so_and_closes() {
        use tokio::io::AsyncReadExt;
        let Serving {
            _dir,
            path,
            tasks,
            counters,
            stop,
            ..
        } = serve(1, WhenFull::Refuse("error busy\n"));
        let _served = UnixStream::connect(&path).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut refused = UnixStream::connect(&path).await.unwrap();
        let mut said = String::new();
        tokio::time::timeout(Duration::from_secs(5), refused.read_to_string(&mut said))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(said, "error busy\n");
        assert_eq!(counters.refused.load(Ordering::Relaxed), 1);
        assert_eq!(tasks.len(), 1);
        stop.cancel();
    }
}
