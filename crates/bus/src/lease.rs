//! Ownership of a key by one replica at a time, through a NATS KV bucket.
//!
//! A lease is a KV entry holding the owner's id. The bucket's `max_age`
//! expires entries that are not refreshed, so a dead owner's leases pass to
//! another replica after at most `ttl`.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;

use crate::{Bus, BusError, Result};

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

    /// How long an unrefreshed lease lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// This replica's owner id.
    pub fn owner(&self) -> &str {
        std::str::from_utf8(&self.owner).unwrap_or_default()
    }

    /// Takes the lease on `key` when free, or refreshes it when already
    /// ours. Returns false when another owner holds it.
    pub async fn acquire(&self, key: &str) -> Result<bool> {
        match self.store.create(key, self.owner.clone()).await {
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(self.error(e)),
        }
        let Some(entry) = self.store.entry(key).await.map_err(|e| self.error(e))? else {
            // Expired between the two calls: try once more.
            return Ok(self.store.create(key, self.owner.clone()).await.is_ok());
        };
        if entry.operation != kv::Operation::Put {
            return Ok(self
                .store
                .update(key, self.owner.clone(), entry.revision)
                .await
                .is_ok());
        }
        if entry.value != self.owner {
            return Ok(false);
        }
        Ok(self
            .store
            .update(key, self.owner.clone(), entry.revision)
            .await
            .is_ok())
    }

    /// Gives up the lease on `key` if we hold it.
    pub async fn release(&self, key: &str) -> Result<()> {
        let Some(entry) = self.store.entry(key).await.map_err(|e| self.error(e))? else {
            return Ok(());
        };
        if entry.operation == kv::Operation::Put && entry.value == self.owner {
            // A concurrent takeover changes the revision; then it is not ours.
            let _ = self
                .store
                .delete_expect_revision(key, Some(entry.revision))
                .await;
        }
        Ok(())
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
