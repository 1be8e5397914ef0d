//! Which replicas of a service are running, through a NATS KV bucket.
//!
//! Every replica puts its id in the bucket each [`PresenceTimings::refresh`]
//! and deletes it when it stops, and watches the whole bucket. A replica is
//! [`Presence::alone`] when its watch works — its own latest put came back
//! through it within [`PresenceTimings::echo_window`] — and it has seen no
//! other replica within [`PresenceTimings::stale_after`] (a replica that
//! died without deleting its entry counts until then).
//!
//! A replica that finds others on joining waits
//! [`PresenceTimings::join_grace`] before [`Presence::join`] returns: by then
//! every other replica has either seen it, or has gone an echo window
//! without news from its own watch and stopped believing it is alone. So
//! work a replica does while "alone" never overlaps with work of one it has
//! not seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Bus, BusError, Result};

/// How often a replica announces itself, and what follows from it.
#[derive(Debug, Clone, Copy)]
pub struct PresenceTimings {
    /// Interval between two puts of a replica's entry.
    pub refresh: Duration,
    /// A replica's own put seen through the watch longer ago than this means
    /// the watch may have stopped delivering: not alone until it works again.
    pub echo_window: Duration,
    /// Another replica not heard of for this long is gone; also the
    /// bucket's `max_age`.
    pub stale_after: Duration,
    /// How long a replica that found others waits before it starts work.
    /// Must exceed `echo_window`.
    pub join_grace: Duration,
}

impl Default for PresenceTimings {
    fn default() -> Self {
        PresenceTimings {
            refresh: Duration::from_secs(1),
            echo_window: Duration::from_secs(2),
            stale_after: Duration::from_secs(3),
            join_grace: Duration::from_millis(2500),
        }
    }
}

/// This replica's membership of a group of replicas.
#[derive(Clone)]
pub struct Presence {
    inner: Arc<Inner>,
}

struct Inner {
    me: String,
    bucket: String,
    store: kv::Store,
    timings: PresenceTimings,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Other replicas, by id, with when we last heard of them.
    others: HashMap<String, Instant>,
    /// When our own latest put came back through the watch.
    echoed: Option<Instant>,
}

impl State {
    /// The other replicas heard of within `stale_after`.
    fn live(&self, stale_after: Duration) -> impl Iterator<Item = &String> {
        self.others
            .iter()
            .filter(move |(_, seen)| seen.elapsed() < stale_after)
            .map(|(id, _)| id)
    }
}

impl Presence {
    /// Joins the group kept in `bucket` as `me` with default timings; see
    /// [`Presence::join_with`].
    pub async fn join(
        bus: &Bus,
        bucket: &str,
        me: &str,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Presence> {
        Self::join_with(
            bus,
            bucket,
            me,
            PresenceTimings::default(),
            tracker,
            shutdown,
        )
        .await
    }

    /// Announces `me` in `bucket`, reads who else is there and keeps both up
    /// to date in a task on `tracker` until `shutdown`, when the entry is
    /// deleted. Returns once the others (if any) have had time to notice.
    pub async fn join_with(
        bus: &Bus,
        bucket: &str,
        me: &str,
        timings: PresenceTimings,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Presence> {
        let mut config = crate::kv_config(bucket, "harnessgate replicas that are running");
        config.max_age = timings.stale_after;
        let store = bus.kv(config).await?;
        let inner = Arc::new(Inner {
            me: me.to_owned(),
            bucket: bucket.to_owned(),
            store,
            timings,
            state: Mutex::default(),
        });
        inner.announce().await?;
        let mut watch = inner.watch().await?;
        // Our own entry is in the history, so it is never empty: read it up
        // to its last entry.
        tokio::time::timeout(timings.stale_after, async {
            while let Some(entry) = watch.next().await {
                let entry = entry.map_err(|e| inner.error(e))?;
                let last = entry.delta == 0;
                inner.saw(entry);
                if last {
                    return Ok(());
                }
            }
            Err(inner.error("the watch ended"))
        })
        .await
        .map_err(|_| inner.error("the watch did not deliver the current entries in time"))??;
        let others = inner.others();
        tracker.spawn(Arc::clone(&inner).keep(watch, shutdown.clone()));
        if !others.is_empty() {
            tracing::info!(
                others = ?others,
                wait_ms = timings.join_grace.as_millis() as u64,
                "other replicas are announced (running, or killed moments ago); waiting until they have seen this one"
            );
            tokio::select! {
                () = tokio::time::sleep(timings.join_grace) => {}
                () = shutdown.cancelled() => {}
            }
        }
        Ok(Presence { inner })
    }

    /// True when no other replica is running, as far as a working watch
    /// tells.
    pub fn alone(&self) -> bool {
        let timings = self.inner.timings;
        let state = self.inner.state.lock().expect("presence lock");
        state
            .echoed
            .is_some_and(|at| at.elapsed() < timings.echo_window)
            && state.live(timings.stale_after).next().is_none()
    }

    /// The other replicas heard of recently.
    pub fn others(&self) -> Vec<String> {
        self.inner.others()
    }
}

impl Inner {
    async fn announce(&self) -> Result<()> {
        self.store
            .put(&self.me, Bytes::from_static(b"up"))
            .await
            .map(drop)
            .map_err(|e| self.error(e))
    }

    async fn watch(&self) -> Result<kv::Watch> {
        self.store
            .watch_with_history(">")
            .await
            .map_err(|e| self.error(e))
    }

    fn saw(&self, entry: kv::Entry) {
        let mut state = self.state.lock().expect("presence lock");
        let put = entry.operation == kv::Operation::Put;
        if entry.key == self.me {
            state.echoed = put.then(Instant::now);
        } else if put {
            state.others.insert(entry.key, Instant::now());
        } else {
            state.others.remove(&entry.key);
        }
    }

    fn others(&self) -> Vec<String> {
        let state = self.state.lock().expect("presence lock");
        let mut others: Vec<String> = state.live(self.timings.stale_after).cloned().collect();
        others.sort();
        others
    }

    /// Forgets replicas not heard of within `stale_after` and reports how
    /// many replicas (this one included) are left.
    fn prune(&self) {
        let stale_after = self.timings.stale_after;
        let mut state = self.state.lock().expect("presence lock");
        state.others.retain(|_, seen| seen.elapsed() < stale_after);
        metrics::gauge!("hg_replicas_seen", "bucket" => self.bucket.clone())
            .set((state.others.len() + 1) as f64);
    }

    /// Re-announces every `refresh` and follows the watch (recreating it
    /// when it fails) until `shutdown`; then deletes our entry.
    async fn keep(self: Arc<Self>, watch: kv::Watch, shutdown: CancellationToken) {
        let mut watch = Some(watch);
        let mut refresh = tokio::time::interval(self.timings.refresh);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        refresh.reset();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = refresh.tick() => {
                    if let Err(e) = self.announce().await {
                        tracing::warn!(error = %e, "cannot announce this replica");
                    }
                    self.prune();
                    if watch.is_none() {
                        match self.watch().await {
                            Ok(w) => watch = Some(w),
                            Err(e) => tracing::warn!(error = %e, "cannot watch the other replicas"),
                        }
                    }
                }
                entry = next(&mut watch) => match entry {
                    Some(Ok(entry)) => self.saw(entry),
                    failed => {
                        let reason = match failed {
                            Some(Err(e)) => e.to_string(),
                            _ => "the watch ended".to_owned(),
                        };
                        tracing::warn!(reason, "lost the watch on the other replicas; recreating it");
                        self.state.lock().expect("presence lock").echoed = None;
                        watch = None;
                    }
                },
            }
        }
        if let Err(e) = self.store.delete(&self.me).await {
            tracing::debug!(error = %e, "cannot remove this replica's entry; it will expire");
        }
    }

    fn error(&self, reason: impl std::fmt::Display) -> BusError {
        BusError::Kv {
            bucket: self.bucket.clone(),
            reason: reason.to_string(),
        }
    }
}

/// The next entry of `watch`, or never when there is none.
async fn next(watch: &mut Option<kv::Watch>) -> Option<Result<kv::Entry, kv::WatcherError>> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}
