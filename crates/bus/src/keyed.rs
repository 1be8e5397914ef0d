//! In-order processing per key with concurrency across keys.
//!
//! A conversation's messages must be handled one after another, but
//! different conversations should not wait for each other. [`KeyedWorkers`]
//! keeps one worker task per active key; a worker exits after it has been
//! idle for a while, so memory follows the number of active keys.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Per-key ordered workers running `handler`.
pub struct KeyedWorkers<T, H> {
    inner: Arc<Inner<T, H>>,
}

struct Inner<T, H> {
    workers: Mutex<HashMap<String, mpsc::UnboundedSender<T>>>,
    handler: H,
    idle: Duration,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl<T, H, F> KeyedWorkers<T, H>
where
    T: Send + 'static,
    H: Fn(String, T, usize) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    /// Workers that call `handler(key, item, queued)` for each item, in
    /// order per key, where `queued` is how many items of the key wait
    /// behind this one; workers stop after `idle` without items. Workers are tracked by
    /// `tracker` and stop taking new items when `shutdown` fires.
    pub fn new(
        handler: H,
        idle: Duration,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        KeyedWorkers {
            inner: Arc::new(Inner {
                workers: Mutex::new(HashMap::new()),
                handler,
                idle,
                tracker,
                shutdown,
            }),
        }
    }

    /// Queues `item` behind earlier items of the same key.
    pub fn dispatch(&self, key: &str, item: T) {
        let mut workers = self.inner.workers.lock().expect("workers lock");
        let item = match workers.get(key) {
            Some(tx) => match tx.send(item) {
                Ok(()) => return,
                // The worker is exiting; start a new one below.
                Err(mpsc::error::SendError(item)) => item,
            },
            None => item,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(item);
        workers.insert(key.to_owned(), tx);
        let inner = Arc::clone(&self.inner);
        let key = key.to_owned();
        self.inner
            .tracker
            .spawn(async move { inner.work(key, rx).await });
    }

    /// Number of keys with a live worker.
    pub fn active(&self) -> usize {
        self.inner.workers.lock().expect("workers lock").len()
    }
}

impl<T, H, F> Inner<T, H>
where
    T: Send + 'static,
    H: Fn(String, T, usize) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    async fn work(self: Arc<Self>, key: String, mut rx: mpsc::UnboundedReceiver<T>) {
        loop {
            let next = tokio::select! {
                biased;
                item = rx.recv() => item,
                () = tokio::time::sleep(self.idle) => None,
                () = self.shutdown.cancelled() => None,
            };
            match next {
                Some(item) => (self.handler)(key.clone(), item, rx.len()).await,
                None => {
                    // Retire, unless an item slipped in while we decided to.
                    let mut workers = self.workers.lock().expect("workers lock");
                    match rx.try_recv() {
                        Ok(item) if !self.shutdown.is_cancelled() => {
                            drop(workers);
                            (self.handler)(key.clone(), item, rx.len()).await;
                        }
                        _ => {
                            workers.remove(&key);
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn items_of_one_key_run_in_order_and_keys_run_concurrently() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tracker = TaskTracker::new();
        let log = Arc::clone(&seen);
        let workers = KeyedWorkers::new(
            move |key: String, n: u32, _queued: usize| {
                let log = Arc::clone(&log);
                async move {
                    // Key "slow" sleeps; "fast" must not wait for it.
                    if key == "slow" {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                    log.lock().unwrap().push((key, n));
                }
            },
            Duration::from_millis(50),
            tracker.clone(),
            CancellationToken::new(),
        );
        for n in 0..3 {
            workers.dispatch("slow", n);
            workers.dispatch("fast", n);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = seen.lock().unwrap().clone();
        let slow: Vec<u32> = seen
            .iter()
            .filter(|(k, _)| k == "slow")
            .map(|(_, n)| *n)
            .collect();
        let fast: Vec<u32> = seen
            .iter()
            .filter(|(k, _)| k == "fast")
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(slow, vec![0, 1, 2]);
        assert_eq!(fast, vec![0, 1, 2]);
        assert_eq!(
            seen[0].0, "fast",
            "fast key waited for the slow one: {seen:?}"
        );
        assert_eq!(workers.active(), 0, "idle workers retire");
    }
}
