//! Ownership of a key by one replica at a time, through a NATS KV bucket.
//!
//! A lease is a KV entry holding the owner's id. The bucket's `max_age`
//! expires entries that are not refreshed, so a dead owner's leases pass to
//! another replica after at most `ttl`.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;

use crate::{Bus, BusError, Result};

/// Who holds a lease after [`Lease::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// We do, at this revision (needed to release it).
    Ours(u64),
    /// Another owner, by id.
    Theirs(String),
}

impl Claim {
    /// The revision when the lease is ours.
    pub fn revision(&self) -> Option<u64> {
        match self {
            Claim::Ours(revision) => Some(*revision),
            Claim::Theirs(_) => None,
        }
    }
}

/// Leases in one bucket, held under one owner id.
#[derive(Clone)]
pub struct Lease {
    store: kv::Store,
    bucket: String,
    owner: Bytes,
    ttl: Duration,
}

impl Lease {
    /// Opens (or creates) the lease bucket `bucket` whose entries live `ttl`
    /// unless refreshed, acting as `owner`.
    pub async fn open(bus: &Bus, bucket: &str, ttl: Duration, owner: &str) -> Result<Lease> {
        let mut config = crate::kv_config(bucket, "harnessgate leases");
        config.max_age = ttl;
        let store = bus.kv(config).await?;
        Ok(Lease {
            store,
            bucket: bucket.to_owned(),
            owner: Bytes::copy_from_slice(owner.as_bytes()),
            ttl,
        })
    }

    /// Keeps the lease on `key` (taken at `revision`) by renewing it every
    /// third of the ttl, storing each new revision; returns once it is
    /// lost: another owner has it, or renewals failed for two thirds of the
    /// ttl (it may have passed on by then).
    pub async fn hold(&self, key: &str, revision: &std::sync::atomic::AtomicU64) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.ttl / 3).await;
            match self.acquire(key).await.map(|claim| claim.revision()) {
                Ok(Some(r)) => {
                    revision.store(r, std::sync::atomic::Ordering::Relaxed);
                    last_ok = tokio::time::Instant::now();
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(lease = key, error = %e, "cannot renew a lease");
                    if last_ok.elapsed() >= self.ttl * 2 / 3 {
                        return;
                    }
                }
            }
        }
    }

    /// How long an unrefreshed lease lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// This replica's owner id.
    pub fn owner(&self) -> &str {
        std::str::from_utf8(&self.owner).unwrap_or_default()
    }

    /// Takes the lease on `key` when free, or refreshes it when already
    /// ours; otherwise says who holds it.
    pub async fn acquire(&self, key: &str) -> Result<Claim> {
        match self.store.create(key, self.owner.clone()).await {
            Ok(revision) => return Ok(Claim::Ours(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(self.error(e)),
        }
        let Some(entry) = self.store.entry(key).await.map_err(|e| self.error(e))? else {
            // Expired between the two calls: try once more.
            return match self.store.create(key, self.owner.clone()).await {
                Ok(revision) => Ok(Claim::Ours(revision)),
                Err(_) => Ok(Claim::Theirs(String::new())),
            };
        };
        if entry.operation == kv::Operation::Put && entry.value != self.owner {
            return Ok(Claim::Theirs(
                String::from_utf8_lossy(&entry.value).into_owned(),
            ));
        }
        // Ours (refresh) or deleted (take it); a concurrent writer makes
        // the revision check fail, and then it is not ours.
        match self
            .store
            .update(key, self.owner.clone(), entry.revision)
            .await
        {
            Ok(revision) => Ok(Claim::Ours(revision)),
            Err(_) => Ok(Claim::Theirs(String::new())),
        }
    }

    /// Gives up the lease on `key` taken at `revision`. Does nothing when
    /// someone else has taken it since.
    pub async fn release(&self, key: &str, revision: u64) -> Result<()> {
        match self.store.delete_expect_revision(key, Some(revision)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => Ok(()),
            Err(e) => Err(self.error(e)),
        }
    }

    /// The current owner of `key`, if any.
    pub async fn holder(&self, key: &str) -> Result<Option<String>> {
        let entry = self.store.entry(key).await.map_err(|e| self.error(e))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| String::from_utf8_lossy(&e.value).into_owned()))
    }

    fn error(&self, e: impl std::fmt::Display) -> BusError {
        BusError::Kv {
            bucket: self.bucket.clone(),
            reason: e.to_string(),
        }
    }
}
