//! Which replica processes a conversation.
//!
//! A replica that takes a conversation holds its lease in KV while it works
//! on it and for a short linger afterwards. Messages of the conversation
//! that reach other replicas meanwhile are forwarded to the holder, which
//! queues them in stream order, so a conversation stays on one replica while
//! it is active and its messages are processed one at a time, in order.
//! Holding on through the linger also means consecutive messages cost no KV
//! operations (the lease is only refreshed every third of its lifetime).
//!
//! While a replica holds a conversation it also holds the latest session
//! record. Changes that a crash may lose (usage totals) stay in memory and
//! reach KV with the next write that matters (a turn's anchor) or when the
//! conversation is let go.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hg_bus::BusError;
use hg_bus::lease::{Claim, Lease};

use crate::session::{SessionRecord, SessionStore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct Held {
    /// The conversation's session record while we hold it: no other replica
    /// can change it meanwhile, so it need not be read from KV each time.
    record: Option<SessionRecord>,
    /// `record` has changes KV does not have yet.
    unsaved: bool,
    revision: u64,
    refreshed: Instant,
    /// Bumped on every use, so a pending release knows it is stale.
    generation: u64,
}

/// This replica's conversation leases.
pub(crate) struct Ownership {
    lease: Lease,
    sessions: SessionStore,
    linger: Duration,
    held: Mutex<HashMap<String, Held>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Ownership {
    pub(crate) fn new(
        lease: Lease,
        sessions: SessionStore,
        linger: Duration,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Ownership {
            lease,
            sessions,
            linger,
            held: Mutex::new(HashMap::new()),
            tracker,
            shutdown,
        }
    }

    /// Takes (or keeps) the conversation `key`, or says who has it. `fresh`
    /// is true when this replica did not hold it before the call.
    pub(crate) async fn claim(&self, key: &str) -> Result<(Claim, bool), BusError> {
        {
            let mut held = self.held.lock().expect("held lock");
            if let Some(h) = held.get_mut(key) {
                h.generation += 1;
                if h.refreshed.elapsed() < self.lease.ttl() / 3 {
                    return Ok((Claim::Ours(h.revision), false));
                }
            }
        }
        let fresh = !self.held.lock().expect("held lock").contains_key(key);
        Ok((self.refresh(key).await?, fresh))
    }

    /// Renews the lease of `key` in KV.
    pub(crate) async fn refresh(&self, key: &str) -> Result<Claim, BusError> {
        let claim = self.lease.acquire(key).await;
        let mut held = self.held.lock().expect("held lock");
        match &claim {
            Ok(Claim::Ours(revision)) => {
                let h = held.entry(key.to_owned()).or_insert(Held {
                    record: None,
                    unsaved: false,
                    revision: *revision,
                    refreshed: Instant::now(),
                    generation: 0,
                });
                h.revision = *revision;
                h.refreshed = Instant::now();
            }
            _ => {
                held.remove(key);
            }
        }
        claim
    }

    /// The cached session record of a conversation we hold.
    pub(crate) fn cached_record(&self, key: &str) -> Option<SessionRecord> {
        let held = self.held.lock().expect("held lock");
        held.get(key).and_then(|h| h.record.clone())
    }

    /// Remembers (or forgets, with `None`) the session record of a
    /// conversation we hold, as it is in KV.
    pub(crate) fn cache_record(&self, key: &str, record: Option<SessionRecord>) {
        if let Some(h) = self.held.lock().expect("held lock").get_mut(key) {
            h.record = record;
            h.unsaved = false;
        }
    }

    /// Remembers a record of a conversation we hold that KV does not have
    /// yet; it is stored when the conversation is let go, unless a
    /// [`Ownership::cache_record`] after a write comes first. Returns false
    /// when we do not hold `key` (the caller must store it itself).
    pub(crate) fn cache_unsaved(&self, key: &str, record: SessionRecord) -> bool {
        match self.held.lock().expect("held lock").get_mut(key) {
            Some(h) => {
                h.record = Some(record);
                h.unsaved = true;
                true
            }
            None => false,
        }
    }

    /// Lets `key` go: stores its unsaved record, then releases the lease.
    async fn let_go(&self, key: &str, held: Held) {
        if held.unsaved
            && let Some(record) = &held.record
            && let Err(e) = self.sessions.put_token(key, record).await
        {
            tracing::warn!(error = %e, "cannot store a session record when letting it go");
        }
        if let Err(e) = self.lease.release(key, held.revision).await {
            tracing::debug!(error = %e, "cannot release a conversation lease; it will expire");
        }
    }

    /// How often to refresh while working on a conversation.
    pub(crate) fn refresh_every(&self) -> Duration {
        self.lease.ttl() / 3
    }

    /// The use counter of a conversation we hold.
    fn generation(&self, key: &str) -> Option<u64> {
        let held = self.held.lock().expect("held lock");
        held.get(key).map(|h| h.generation)
    }

    /// Keeps `key` while no work is running for it, for conversations
    /// whose runtime lives in this process (an ACP agent started here):
    /// the lease is refreshed until new work starts (which refreshes it
    /// itself and calls this again when done), the lease is lost, or the
    /// replica stops, when it is released so another replica takes over
    /// at once.
    pub(crate) fn keep(self: &std::sync::Arc<Self>, key: &str) {
        let Some(generation) = self.generation(key) else {
            return;
        };
        let this = std::sync::Arc::clone(self);
        let key = key.to_owned();
        self.tracker.spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(this.refresh_every()) => {}
                    () = this.shutdown.cancelled() => {
                        let held = this.held.lock().expect("held lock").remove(&key);
                        if let Some(held) = held {
                            this.let_go(&key, held).await;
                        }
                        return;
                    }
                }
                if this.generation(&key) != Some(generation) {
                    return;
                }
                match this.refresh(&key).await {
                    Ok(Claim::Ours(_)) => {}
                    Ok(Claim::Theirs(owner)) => {
                        tracing::warn!(owner = %owner, "a kept conversation moved to another replica");
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot refresh a kept conversation"),
                }
            }
        });
    }

    /// Work on `key` is done for now: release it after the linger unless
    /// more work for it starts meanwhile.
    pub(crate) fn idle(self: &std::sync::Arc<Self>, key: &str) {
        let Some(generation) = self.generation(key) else {
            return;
        };
        let this = std::sync::Arc::clone(self);
        let key = key.to_owned();
        self.tracker.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(this.linger) => {}
                () = this.shutdown.cancelled() => {}
            }
            let held = {
                let mut held = this.held.lock().expect("held lock");
                match held.get(&key) {
                    Some(h) if h.generation == generation => held.remove(&key),
                    _ => None,
                }
            };
            if let Some(held) = held {
                this.let_go(&key, held).await;
            }
        });
    }
}
