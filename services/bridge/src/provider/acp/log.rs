//! A session's event log: ids unique in the session, a ring of recent events
//! for catch-up, and a broadcast of live ones.
//!
//! Every event gets a sequence number in the order it was appended; a
//! stream remembers the last one it delivered, so a reader that catches up
//! from the ring and then reads the broadcast (or falls behind the
//! broadcast and re-reads the ring) never sees an event twice.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use tokio::sync::broadcast;

use super::super::{EventStream, ProviderError, Result, RuntimeEvent};

/// Prefix of every event id of this runtime.
const ID_PREFIX: &str = "acp_";

/// One appended event and its position.
#[derive(Clone)]
struct Entry {
    seq: u64,
    event: RuntimeEvent,
}

struct Inner {
    next_id: u64,
    next_seq: u64,
    ring: VecDeque<Entry>,
    capacity: usize,
    /// `None` once the session is destroyed: live streams end.
    live: Option<broadcast::Sender<Entry>>,
}

/// The events of one session.
pub(super) struct EventLog {
    inner: Mutex<Inner>,
}

impl EventLog {
    /// An empty log keeping the last `capacity` events (at least 16).
    pub(super) fn new(capacity: usize) -> Arc<Self> {
        let capacity = capacity.max(16);
        let (live, _) = broadcast::channel(capacity);
        Arc::new(EventLog {
            inner: Mutex::new(Inner {
                next_id: 1,
                next_seq: 1,
                ring: VecDeque::with_capacity(capacity.min(1024)),
                capacity,
                live: Some(live),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The log stays consistent even if a holder panicked: every
        // mutation is a single push.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves a fresh event id (for an event appended later, such as the
    /// complete message its deltas refer to).
    pub(super) fn reserve_id(&self) -> String {
        let mut inner = self.lock();
        let id = format!("{ID_PREFIX}{}", inner.next_id);
        inner.next_id += 1;
        id
    }

    /// Appends the event built from a fresh id; returns that id.
    pub(super) fn emit(&self, build: impl FnOnce(String) -> RuntimeEvent) -> String {
        let id = self.reserve_id();
        self.push(build(id.clone()));
        id
    }

    /// Appends an event whose id was reserved before.
    pub(super) fn push(&self, event: RuntimeEvent) {
        let mut inner = self.lock();
        let entry = Entry {
            seq: inner.next_seq,
            event,
        };
        inner.next_seq += 1;
        if inner.ring.len() >= inner.capacity {
            inner.ring.pop_front();
        }
        inner.ring.push_back(entry.clone());
        if let Some(live) = &inner.live {
            // No receiver is not an error: the ring keeps the event.
            let _ = live.send(entry);
        }
    }

    /// Ends every live stream of the session.
    pub(super) fn close(&self) {
        self.lock().live = None;
    }

    /// Events after `after` (or none with `None`), then live ones.
    pub(super) fn stream(self: &Arc<Self>, after: Option<&str>) -> Result<EventStream> {
        let inner = self.lock();
        let Some(live) = &inner.live else {
            return Err(ProviderError::SessionNotFound(
                "session was destroyed".into(),
            ));
        };
        // Snapshot and subscribe under one lock: no gap, no duplicate.
        let rx = live.subscribe();
        let last_seq = match after {
            None => inner.next_seq - 1,
            Some(after) => match inner.ring.iter().find(|e| e.event.id() == after) {
                Some(entry) => entry.seq,
                None => {
                    // Older than anything kept (a very long turn) or never
                    // seen: the best we can do is everything we still have.
                    tracing::warn!(
                        after,
                        "acp catch-up event no longer kept, replaying the whole log"
                    );
                    inner.ring.front().map_or(inner.next_seq - 1, |e| e.seq - 1)
                }
            },
        };
        let backlog = inner
            .ring
            .iter()
            .filter(|e| e.seq > last_seq)
            .cloned()
            .collect();
        drop(inner);
        let reader = Reader {
            log: self.clone(),
            rx,
            last_seq,
            backlog,
        };
        Ok(futures::stream::unfold(reader, |mut reader| async move {
            reader.next().await.map(|item| (item, reader))
        })
        .boxed())
    }

    /// Kept events after sequence number `seq`; `None` when some were
    /// already dropped from the ring.
    fn after_seq(&self, seq: u64) -> Option<VecDeque<Entry>> {
        let inner = self.lock();
        if let Some(first) = inner.ring.front()
            && first.seq > seq + 1
        {
            return None;
        }
        Some(inner.ring.iter().filter(|e| e.seq > seq).cloned().collect())
    }
}

/// One reader's position in the log.
struct Reader {
    log: Arc<EventLog>,
    rx: broadcast::Receiver<Entry>,
    last_seq: u64,
    backlog: VecDeque<Entry>,
}

impl Reader {
    async fn next(&mut self) -> Option<Result<RuntimeEvent>> {
        loop {
            if let Some(entry) = self.backlog.pop_front() {
                if entry.seq > self.last_seq {
                    self.last_seq = entry.seq;
                    return Some(Ok(entry.event));
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(entry) if entry.seq <= self.last_seq => continue,
                Ok(entry) => {
                    self.last_seq = entry.seq;
                    return Some(Ok(entry.event));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    match self.log.after_seq(self.last_seq) {
                        Some(backlog) => self.backlog = backlog,
                        None => {
                            return Some(Err(ProviderError::Protocol(
                                "acp event stream fell too far behind".into(),
                            )));
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
