//! Sessions open right now, for `tollgate status`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use uuid::Uuid;

use crate::events::SessionInfo;
use crate::protocol::SessionCounters;

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

/// A session's description, with a hash that arrived after it started.
fn info_json(entry: &Entry) -> serde_json::Value {
    let mut info = serde_json::to_value(&*entry.info).unwrap_or(serde_json::Value::Null);
    if let Some(hash) = entry.counters.late_exe_sha256.get() {
        if let Some(identity) = info.get_mut("identity").and_then(|i| i.as_object_mut()) {
            identity.insert("exe_sha256".into(), serde_json::Value::String(hash.clone()));
        }
    }
    info
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
                info: info_json(e),
                open_seconds: e.since.elapsed().as_secs_f64(),
                bytes_from_client: e.counters.from_client.load(Ordering::Relaxed),
                bytes_from_upstream: e.counters.from_upstream.load(Ordering::Relaxed),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::identity::ProcessIdentity;

    #[test]
    fn a_hash_computed_after_the_start_shows_in_the_snapshot_once_known() {
        let live = LiveSessions::default();
        let counters = Arc::new(SessionCounters::default());
        let identity = ProcessIdentity {
            exe: Some("/usr/bin/node".into()),
            ..ProcessIdentity::default()
        };
        live.insert(
            crate::protocol::test_session_info(identity),
            counters.clone(),
        );
        let hash_of =
            |live: &LiveSessions| live.snapshot()[0].info["identity"]["exe_sha256"].clone();
        assert!(hash_of(&live).is_null());
        counters
            .late_exe_sha256
            .set("ab".repeat(32))
            .expect("set once");
        assert_eq!(hash_of(&live), serde_json::json!("ab".repeat(32)));
    }
}
