//! Grants: an approval given `--for 30m` lets the same statement shape from
//! the same identity to the same target run without review until it
//! expires or is revoked.
//!
//! Kept in redb, an embedded key-value database in pure Rust: one file,
//! ACID transactions with crash-safe commits, no C library and no server,
//! so grants survive agent restarts and crashes without another moving part.
//! One table maps a grant's id to its JSON.

use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::SystemTime;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{unix_seconds, ApprovalError, RequestId};
use crate::identity::ProcessIdentity;

const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("grants");
/// Expired or revoked grants are kept this long for `grants --all`, then
/// removed when the store opens.
const KEEP_ENDED_SECONDS: u64 = 30 * 86_400;

/// What a grant covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantSubject {
    /// The target's configured name.
    pub target: String,
    /// The statement shape (pg_query fingerprint).
    pub fingerprint: String,
    /// Who: `ci:PROVIDER:REPOSITORY:WORKFLOW` for a verified CI job with a
    /// repository, else `exe:PATH` (and its SHA-256 when known).
    pub identity: String,
}

impl GrantSubject {
    /// The identity part of a grant for `identity`; `None` when neither a
    /// verified CI repository nor an executable is known.
    pub fn identity_key(identity: &ProcessIdentity) -> Option<String> {
        if let Some(ci) = identity.ci.as_ref().filter(|ci| ci.verified) {
            if let Some(repository) = &ci.repository {
                return Some(format!(
                    "ci:{}:{}:{}",
                    ci.provider.as_str(),
                    repository,
                    ci.workflow.as_deref().unwrap_or("-")
                ));
            }
        }
        identity.exe.as_ref().map(|exe| match &identity.exe_sha256 {
            Some(hash) => format!("exe:{exe}@sha256:{hash}"),
            None => format!("exe:{exe}"),
        })
    }
}

/// A stored grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Its id (same form as request ids).
    pub id: RequestId,
    /// What it covers.
    pub subject: GrantSubject,
    /// The statement whose approval gave it.
    pub statement: String,
    /// The request that gave it.
    pub request: RequestId,
    /// The session that request came in. Absent in grants stored before
    /// it was kept.
    #[serde(default)]
    pub session: Option<String>,
    /// The rule that held that request.
    pub rule: String,
    /// The reviewers whose approvals gave it.
    pub approved_by: Vec<String>,
    /// When it was given and when it ends, in Unix seconds.
    pub created_at: u64,
    /// End of validity.
    pub expires_at: u64,
    /// Who revoked it, if someone did.
    pub revoked_by: Option<String>,
    /// How that reviewer authenticated (`unix:UID` or `token:NAME`).
    #[serde(default)]
    pub revoked_via: Option<String>,
    /// When.
    pub revoked_at: Option<u64>,
}

impl Grant {
    /// Not expired and not revoked at `now`.
    pub fn active(&self, now: SystemTime) -> bool {
        self.revoked_at.is_none() && unix_seconds(now) < self.expires_at
    }
}

/// The grant database.
pub struct GrantStore {
    db: Database,
    /// Woken when a grant is given or revoked here (not when one is merged
    /// from elsewhere): the shared approvals link then writes it out.
    changed: tokio::sync::Notify,
}

/// What merging a grant known elsewhere changed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merged {
    /// It was not known here: it is now.
    Added,
    /// It was known here and in force; it is revoked now.
    Revoked,
    /// Nothing: known already, with the same or a later state.
    Unchanged,
}

fn store_error(e: impl std::fmt::Display) -> ApprovalError {
    ApprovalError::Store(e.to_string())
}

impl GrantStore {
    /// Opens (or creates, mode 0600) the store at `path`, and removes
    /// grants that ended more than 30 days before `now`.
    pub fn open(path: &Path, now: SystemTime) -> anyhow::Result<GrantStore> {
        use anyhow::Context as _;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("cannot create the grant store directory {}", dir.display())
            })?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create the grant store {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make the grant store {} root-only", path.display()))?;
        let db = Database::create(path)
            .with_context(|| format!("cannot open the grant store {}", path.display()))?;
        let store = GrantStore {
            db,
            changed: tokio::sync::Notify::new(),
        };
        // Creates the table, so readers never find it missing.
        let tx = store.db.begin_write()?;
        tx.open_table(GRANTS)?;
        tx.commit()?;
        store.purge(now)?;
        Ok(store)
    }

    fn purge(&self, now: SystemTime) -> Result<usize, ApprovalError> {
        let now = unix_seconds(now);
        let old: Vec<RequestId> = self
            .all()?
            .into_iter()
            .filter(|g| {
                let ended = g.revoked_at.unwrap_or(g.expires_at).min(g.expires_at);
                ended.saturating_add(KEEP_ENDED_SECONDS) < now
            })
            .map(|g| g.id)
            .collect();
        let tx = self.db.begin_write().map_err(store_error)?;
        {
            let mut table = tx.open_table(GRANTS).map_err(store_error)?;
            for id in &old {
                table.remove(id.as_str()).map_err(store_error)?;
            }
        }
        tx.commit().map_err(store_error)?;
        Ok(old.len())
    }

    /// Stores a new grant.
    pub fn insert(&self, grant: &Grant) -> Result<(), ApprovalError> {
        self.put(grant)?;
        self.changed.notify_one();
        Ok(())
    }

    /// Resolves when a grant was given or revoked here since the last call
    /// (one waiter: the shared approvals link).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Takes in a grant as another agent or the review server has it: an
    /// unknown one is added, a revocation of one in force here applies.
    /// A grant is never un-revoked, nor its subject or end changed.
    pub fn merge(&self, theirs: &Grant) -> Result<Merged, ApprovalError> {
        let ours = self.get(&theirs.id)?;
        let merged = match ours {
            None => {
                self.put(theirs)?;
                Merged::Added
            }
            Some(mut ours) if ours.revoked_by.is_none() && theirs.revoked_by.is_some() => {
                ours.revoked_by.clone_from(&theirs.revoked_by);
                ours.revoked_via.clone_from(&theirs.revoked_via);
                ours.revoked_at = theirs.revoked_at;
                self.put(&ours)?;
                Merged::Revoked
            }
            Some(_) => Merged::Unchanged,
        };
        Ok(merged)
    }

    /// The grant `id`, whatever its state.
    pub fn get(&self, id: &RequestId) -> Result<Option<Grant>, ApprovalError> {
        let tx = self.db.begin_read().map_err(store_error)?;
        let table = tx.open_table(GRANTS).map_err(store_error)?;
        let found = table.get(id.as_str()).map_err(store_error)?;
        found
            .map(|value| serde_json::from_slice(value.value()).map_err(store_error))
            .transpose()
    }

    fn put(&self, grant: &Grant) -> Result<(), ApprovalError> {
        let json = serde_json::to_vec(grant).map_err(store_error)?;
        let tx = self.db.begin_write().map_err(store_error)?;
        {
            let mut table = tx.open_table(GRANTS).map_err(store_error)?;
            table
                .insert(grant.id.as_str(), json.as_slice())
                .map_err(store_error)?;
        }
        tx.commit().map_err(store_error)
    }

    /// Every stored grant, oldest first.
    pub fn all(&self) -> Result<Vec<Grant>, ApprovalError> {
        let tx = self.db.begin_read().map_err(store_error)?;
        let table = tx.open_table(GRANTS).map_err(store_error)?;
        let mut grants = Vec::new();
        for entry in table.iter().map_err(store_error)? {
            let (_, value) = entry.map_err(store_error)?;
            match serde_json::from_slice::<Grant>(value.value()) {
                Ok(g) => grants.push(g),
                // A record this version cannot read grants nothing.
                Err(e) => tracing::warn!(error = %e, "grant store: unreadable grant skipped"),
            }
        }
        Ok(grants)
    }

    /// Grants in force at `now`.
    pub fn active(&self, now: SystemTime) -> Result<Vec<Grant>, ApprovalError> {
        Ok(self.all()?.into_iter().filter(|g| g.active(now)).collect())
    }

    /// The grant in force for `subject`, if any.
    pub fn find(
        &self,
        subject: &GrantSubject,
        now: SystemTime,
    ) -> Result<Option<Grant>, ApprovalError> {
        Ok(self
            .active(now)?
            .into_iter()
            .find(|g| g.subject == *subject))
    }

    /// Revokes a grant in force for reviewer `by`, authenticated `via`;
    /// the revoked grant.
    pub fn revoke(
        &self,
        id: &RequestId,
        by: &str,
        via: &str,
        now: SystemTime,
    ) -> Result<Grant, ApprovalError> {
        let tx = self.db.begin_write().map_err(store_error)?;
        let grant = {
            let mut table = tx.open_table(GRANTS).map_err(store_error)?;
            let found: Option<Vec<u8>> = table
                .get(id.as_str())
                .map_err(store_error)?
                .map(|value| value.value().to_vec());
            let mut grant: Grant = match found {
                Some(bytes) => serde_json::from_slice(&bytes).map_err(store_error)?,
                None => return Err(ApprovalError::UnknownGrant),
            };
            if let Some(by) = &grant.revoked_by {
                return Err(ApprovalError::GrantEnded(format!(
                    "the grant was revoked by {by} already"
                )));
            }
            if !grant.active(now) {
                return Err(ApprovalError::GrantEnded("the grant has expired".into()));
            }
            grant.revoked_by = Some(by.to_owned());
            grant.revoked_via = Some(via.to_owned());
            grant.revoked_at = Some(unix_seconds(now));
            let json = serde_json::to_vec(&grant).map_err(store_error)?;
            table
                .insert(id.as_str(), json.as_slice())
                .map_err(store_error)?;
            grant
        };
        tx.commit().map_err(store_error)?;
        self.changed.notify_one();
        Ok(grant)
    }
}
