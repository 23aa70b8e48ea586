//! Sessions open right now, for `tollgate status`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use uuid::Uuid;

use crate::events::SessionInfo;

/// Byte counters of one session, updated by its relay as data flows.
#[derive(Debug, Default)]
pub struct SessionCounters {
    /// Bytes from the client.
    pub from_client: AtomicU64,
    /// Bytes from the upstream.
    pub from_upstream: AtomicU64,
}

struct Entry {
    info: Arc<SessionInfo>,
    counters: Arc<SessionCounters>,
    since: Instant,
}

/// The registry of open sessions.
#[derive(Default)]
pub struct LiveSessions {
    map: Mutex<HashMap<Uuid, Entry>>,
}

/// One open session as `tollgate status` shows it.
#[derive(Debug, Serialize, serde::Deserialize, Clone)]
pub struct LiveSessionView {
    /// The session.
    pub info: serde_json::Value,
    /// Seconds open.
    pub open_seconds: f64,
    /// Bytes from the client so far.
    pub bytes_from_client: u64,
    /// Bytes from the upstream so far.
    pub bytes_from_upstream: u64,
}

impl LiveSessions {
    /// Registers an open session.
    pub fn insert(&self, info: Arc<SessionInfo>, counters: Arc<SessionCounters>) {
        if let Ok(mut map) = self.map.lock() {
            map.insert(
                info.id,
                Entry {
                    info,
                    counters,
                    since: Instant::now(),
                },
            );
        }
    }

    /// Forgets a session.
    pub fn remove(&self, id: &Uuid) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(id);
        }
    }

    /// Number of open sessions.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot, oldest first.
    pub fn snapshot(&self) -> Vec<LiveSessionView> {
        let Ok(map) = self.map.lock() else {
            return Vec::new();
        };
        let mut entries: Vec<&Entry> = map.values().collect();
        entries.sort_by_key(|e| e.since);
        entries
            .into_iter()
            .map(|e| LiveSessionView {
                info: serde_json::to_value(&*e.info).unwrap_or(serde_json::Value::Null),
                open_seconds: e.since.elapsed().as_secs_f64(),
                bytes_from_client: e.counters.from_client.load(Ordering::Relaxed),
                bytes_from_upstream: e.counters.from_upstream.load(Ordering::Relaxed),
            })
            .collect()
    }
}
