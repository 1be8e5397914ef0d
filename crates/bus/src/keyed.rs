//! In-order processing per key with concurrency across keys.
//!
//! A conversation's messages must be handled one after another, but
//! different conversations should not wait for each other. [`KeyedWorkers`]
//! runs one worker task per key that has queued items; items of a key are
//! handled in the order of their sequence number (the stream sequence), so
//! an item that arrives late — forwarded from another replica, say — still
//! goes before later ones that are waiting. A worker ends as soon as its
//! queue is empty, so tasks and memory follow the number of busy keys.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Per-key ordered workers running `handler`.
pub struct KeyedWorkers<T, H> {
    inner: Arc<Inner<T, H>>,
}

struct Inner<T, H> {
    queues: Mutex<HashMap<String, VecDeque<(u64, T)>>>,
    handler: H,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl<T, H, F> KeyedWorkers<T, H>
where
    T: Send + 'static,
    H: Fn(String, T, usize) -> F + Send + Sync + 'static,
    F: Future<Output = Option<T>> + Send + 'static,
{
    /// Workers that call `handler(key, item, queued)` for each item, in
    /// sequence order per key, where `queued` is how many items of the key
    /// wait behind this one. A handler that returns the item puts it back
    /// in line (in sequence order, before anything later that arrived
    /// meanwhile). Workers are tracked by `tracker`; after
    /// `shutdown` they finish the item in hand and leave the rest queued
    /// (unacked work is redelivered by the server).
    pub fn new(handler: H, tracker: TaskTracker, shutdown: CancellationToken) -> Self {
        KeyedWorkers {
            inner: Arc::new(Inner {
                queues: Mutex::new(HashMap::new()),
                handler,
                tracker,
                shutdown,
            }),
        }
    }

    /// Queues `item` with sequence number `seq` behind the items of `key`
    /// with lower numbers.
    pub fn dispatch(&self, key: &str, seq: u64, item: T) {
        let mut queues = self.inner.queues.lock().expect("queues lock");
        if let Some(queue) = queues.get_mut(key) {
            // A worker is running for this key: it will pick the item up.
            insert_in_order(queue, seq, item);
            return;
        }
        queues.insert(key.to_owned(), VecDeque::from([(seq, item)]));
        let inner = Arc::clone(&self.inner);
        let key = key.to_owned();
        self.inner
            .tracker
            .spawn(async move { inner.work(key).await });
    }

    /// Number of keys with a running worker.
    pub fn active(&self) -> usize {
        self.inner.queues.lock().expect("queues lock").len()
    }
}

impl<T, H, F> Inner<T, H>
where
    T: Send + 'static,
    H: Fn(String, T, usize) -> F + Send + Sync + 'static,
    F: Future<Output = Option<T>> + Send + 'static,
{
    async fn work(self: Arc<Self>, key: String) {
        loop {
            let next = {
                let mut queues = self.queues.lock().expect("queues lock");
                let queue = queues.get_mut(&key).expect("a running worker has a queue");
                match queue.pop_front() {
                    Some((seq, item)) if !self.shutdown.is_cancelled() => {
                        Some((seq, item, queue.len()))
                    }
                    _ => {
                        queues.remove(&key);
                        None
                    }
                }
            };
            let Some((seq, item, queued)) = next else {
                return;
            };
            // Boxed: a handler's future (a whole bridge turn) is over 10 KiB,
            // and inline it would size the worker task, which is moved
            // (copied) as a whole on every spawn.
            let handled = Box::pin((self.handler)(key.clone(), item, queued));
            if let Some(item) = handled.await {
                let mut queues = self.queues.lock().expect("queues lock");
                let queue = queues.get_mut(&key).expect("a running worker has a queue");
                insert_in_order(queue, seq, item);
            }
        }
    }
}

fn insert_in_order<T>(queue: &mut VecDeque<(u64, T)>, seq: u64, item: T) {
    let at = queue
        .iter()
        .rposition(|(s, _)| *s <= seq)
        .map_or(0, |i| i + 1);
    queue.insert(at, (seq, item));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn items_run_in_sequence_order_per_key_and_keys_run_concurrently() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tracker = TaskTracker::new();
        let log = Arc::clone(&seen);
        let workers = KeyedWorkers::new(
            move |key: String, n: u64, _queued: usize| {
                let log = Arc::clone(&log);
                async move {
                    // Key "slow" sleeps; "fast" must not wait for it.
                    if key == "slow" {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                    log.lock().unwrap().push((key, n));
                    None
                }
            },
            tracker.clone(),
            CancellationToken::new(),
        );
        workers.dispatch("slow", 1, 1);
        workers.dispatch("fast", 1, 1);
        // While 1 runs, 4 arrives before 2 and 3: it must still go last.
        workers.dispatch("slow", 4, 4);
        workers.dispatch("slow", 2, 2);
        workers.dispatch("slow", 3, 3);
        workers.dispatch("fast", 2, 2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = seen.lock().unwrap().clone();
        let of = |k: &str| -> Vec<u64> {
            seen.iter()
                .filter(|(key, _)| key == k)
                .map(|(_, n)| *n)
                .collect()
        };
        assert_eq!(of("slow"), vec![1, 2, 3, 4]);
        assert_eq!(of("fast"), vec![1, 2]);
        assert_eq!(
            seen[0].0, "fast",
            "fast key waited for the slow one: {seen:?}"
        );
        assert_eq!(workers.active(), 0, "idle workers end");
    }
}
