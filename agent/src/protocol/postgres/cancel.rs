//! Cancel keys of the proxy's own making.
//!
//! A client cancels a running query by opening a new connection and sending
//! CancelRequest with the (pid, secret) that BackendKeyData gave it. The
//! proxy never shows the server's key: it hands the client a random pid and
//! a random secret of the same length and keeps, in one registry shared by
//! all sessions, what each stands for (the real backend pid and secret, and
//! the upstream address the session is connected to). A CancelRequest with
//! a known key is sent to that upstream with the real key; an unknown key is
//! dropped (the protocol answers neither). Keys are forgotten when their
//! session ends, so a late cancel cannot reach another session's query.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use ring::rand::{SecureRandom, SystemRandom};

/// What a client-visible key stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    /// The server's backend pid.
    pub pid: i32,
    /// The server's secret.
    pub secret: Vec<u8>,
    /// The upstream the session connected to.
    pub upstream: SocketAddr,
}

struct Entry {
    /// The secret the client was given.
    secret: Vec<u8>,
    target: CancelTarget,
    /// Woken by a CancelRequest with this key: what the proxy itself is
    /// doing for the session (holding a statement for review) stops too.
    interrupt: Arc<tokio::sync::Notify>,
}

/// Client-visible cancel keys of every open session.
pub struct CancelRegistry {
    keys: Mutex<HashMap<i32, Entry>>,
    random: SystemRandom,
}

impl Default for CancelRegistry {
    fn default() -> Self {
        CancelRegistry::new()
    }
}

impl CancelRegistry {
    /// An empty registry.
    pub fn new() -> CancelRegistry {
        CancelRegistry {
            keys: Mutex::new(HashMap::new()),
            random: SystemRandom::new(),
        }
    }

    /// Makes a client-visible key for a backend's key: a random positive
    /// pid not in use and a random secret as long as the server's. `None`
    /// only if the system's random source fails.
    pub fn register(
        &self,
        backend_pid: i32,
        backend_secret: &[u8],
        upstream: SocketAddr,
    ) -> Option<(i32, Vec<u8>)> {
        let mut secret = vec![0u8; backend_secret.len()];
        self.random.fill(&mut secret).ok()?;
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let pid = loop {
            let mut raw = [0u8; 4];
            self.random.fill(&mut raw).ok()?;
            // Positive, as real pids are; 0 is never a pid.
            let pid = i32::from_be_bytes(raw) & i32::MAX;
            if pid != 0 && !keys.contains_key(&pid) {
                break pid;
            }
        };
        keys.insert(
            pid,
            Entry {
                secret: secret.clone(),
                target: CancelTarget {
                    pid: backend_pid,
                    secret: backend_secret.to_vec(),
                    upstream,
                },
                interrupt: Arc::new(tokio::sync::Notify::new()),
            },
        );
        Some((pid, secret))
    }

    /// The backend a client-visible key stands for, if it is known.
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<CancelTarget> {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = keys.get(&pid)?;
        constant_time_eq(&entry.secret, secret).then(|| entry.target.clone())
    }

    /// Wakes whatever waits on the interrupt of key `pid` (a CancelRequest
    /// with that key, already checked by [`CancelRegistry::lookup`]).
    pub fn interrupt(&self, pid: i32) {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = keys.get(&pid) {
            entry.interrupt.notify_waiters();
        }
    }

    /// What a CancelRequest with key `pid` wakes (see
    /// [`CancelRegistry::interrupt`]).
    pub fn interrupt_of(&self, pid: i32) -> Option<Arc<tokio::sync::Notify>> {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.get(&pid).map(|e| Arc::clone(&e.interrupt))
    }

    /// Forgets a client-visible key (its session ended).
    pub fn forget(&self, pid: i32) {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&pid);
    }

    /// Number of keys known.
    pub fn len(&self) -> usize {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no key is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Compares secrets without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn upstream() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 5432))
    }

    #[test]
    fn a_registered_key_maps_to_the_backend_until_forgotten() {
        let registry = CancelRegistry::new();
        let (pid, secret) = registry.register(4242, &[1, 2, 3, 4], upstream()).unwrap();
        assert!(pid > 0);
        assert_eq!(secret.len(), 4, "the server's secret length is kept");
        let target = registry.lookup(pid, &secret).unwrap();
        assert_eq!(
            target,
            CancelTarget {
                pid: 4242,
                secret: vec![1, 2, 3, 4],
                upstream: upstream()
            }
        );
        registry.forget(pid);
        assert_eq!(registry.lookup(pid, &secret), None);
        assert!(registry.is_empty());
    }

    #[test]
    fn wrong_secrets_and_unknown_pids_find_nothing() {
        let registry = CancelRegistry::new();
        let (pid, secret) = registry.register(7, &[9; 32], upstream()).unwrap();
        assert_eq!(secret.len(), 32, "3.2 keys keep their length");
        let mut wrong = secret.clone();
        wrong[0] ^= 1;
        assert_eq!(registry.lookup(pid, &wrong), None);
        assert_eq!(registry.lookup(pid, &secret[..4]), None);
        assert_eq!(registry.lookup(pid.wrapping_add(1), &secret), None);
        // The server's own key is not a client key.
        assert_eq!(registry.lookup(7, &[9; 32]), None);
        assert!(registry.lookup(pid, &secret).is_some());
    }

    #[test]
    fn keys_are_distinct_per_session() {
        let registry = CancelRegistry::new();
        let keys: Vec<_> = (0..200)
            .map(|i| registry.register(i, &[0; 4], upstream()).unwrap())
            .collect();
        let pids: std::collections::HashSet<_> = keys.iter().map(|k| k.0).collect();
        assert_eq!(pids.len(), 200);
        assert_eq!(registry.len(), 200);
        for (i, (pid, secret)) in keys.iter().enumerate() {
            assert_eq!(registry.lookup(*pid, secret).unwrap().pid, i as i32);
        }
    }
}
