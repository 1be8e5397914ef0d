//! A session's event stream that survives disconnects.
//!
//! Like the SDK's session runner (`lib/tools/_beta_session_runner.py`,
//! `_stream_loop` and `_reconcile`), every (re)connection first opens the
//! live stream, then lists the session's history, delivers what came after
//! the last delivered event, and drops live events already delivered.
//!
//! The position in the history is found by id: the stream remembers the ids
//! of the last events it delivered (as salted 64-bit hashes, in a bounded
//! set, so remembering costs no allocation) plus an anchor, the event the
//! caller asked to start after or the newest event when the stream opened.
//! A catch-up delivers the listed events that follow the oldest remembered
//! one (or the anchor) and are not remembered themselves.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::http::{self, Http};
use super::sse::SseDecoder;
use super::wire::{self, Decoded};
use crate::provider::{EventStream, ProviderError, Result, RuntimeEvent};

/// Separator of the ids given to deltas: `<message id>#delta-<n>`.
const DELTA_ID: &str = "#delta-";
/// Page size of history listings (what the SDK runner asks for).
const LIST_LIMIT: &str = "1000";
/// How many delivered ids are remembered for dedup.
const SEEN_CAPACITY: usize = 512;

/// Settings of event streams, from [`super::ClaudeConfig`].
#[derive(Debug, Clone, Copy)]
pub(super) struct StreamOptions {
    pub deltas: bool,
    pub idle_timeout: Duration,
    pub reconnect_backoff: Duration,
    pub reconnect_max_backoff: Duration,
    pub reconnect_attempts: u32,
}

/// Opens a connected stream: the live connection is up (and, with `after`,
/// the history after it is read) before this returns.
pub(super) async fn open(
    http: Arc<Http>,
    options: StreamOptions,
    session_id: &str,
    after: Option<&str>,
) -> Result<EventStream> {
    let mut state = State::new(http, options, session_id);
    match after {
        Some(after) => {
            // A delta's id stands for its message, which may not have been
            // delivered yet: start at that message, inclusive.
            match after.split_once(DELTA_ID) {
                Some((message_id, _)) => state.include_from = Some(state.seen.hash(message_id)),
                None => state.anchor = Some(state.seen.hash(after)),
            }
            let response = state
                .http
                .open_stream(session_id, options.deltas, state.http_retries())
                .await?;
            state.connect(response);
            if !state.catch_up().await? {
                return Err(ProviderError::Rejected(format!(
                    "event {after} not found in session {session_id}"
                )));
            }
        }
        None => {
            // The newest event now marks where "from now on" starts, should
            // the connection drop before anything was delivered.
            let (response, newest) = tokio::join!(
                state
                    .http
                    .open_stream(session_id, options.deltas, state.http_retries()),
                newest_event(&state.http, session_id)
            );
            let response = response?;
            state.anchor = newest?.map(|id| state.seen.hash(&id));
            state.connect(response);
        }
    }
    tracing::debug!(session = %session_id, after = ?after, "claude event stream connected");
    let stream: BoxStream<'static, Result<RuntimeEvent>> =
        futures::stream::unfold(state, |mut state| async move {
            let item = state.next_item().await?;
            Some((item, state))
        })
        .boxed();
    Ok(stream)
}

/// The id of the session's newest event, if it has any.
async fn newest_event(http: &Http, session_id: &str) -> Result<Option<String>> {
    let body = http.list_events(session_id, "1", "desc", None).await?;
    let page: Page<'_> = decode_page(&body)?;
    Ok(page.data.first().and_then(|raw| {
        #[derive(Deserialize)]
        struct Id {
            id: Option<String>,
        }
        serde_json::from_str::<Id>(raw.get()).ok()?.id
    }))
}

/// A page of `GET /v1/sessions/{id}/events` (`pagination.py`, `PageCursor`).
#[derive(Deserialize)]
struct Page<'a> {
    #[serde(borrow, default)]
    data: Vec<&'a RawValue>,
    #[serde(default)]
    next_page: Option<String>,
}

fn decode_page(body: &Bytes) -> Result<Page<'_>> {
    serde_json::from_slice(body)
        .map_err(|err| ProviderError::Protocol(format!("decode event list: {err}")))
}

/// Ids of recently delivered events, as salted hashes, oldest evicted first.
struct SeenIds {
    hasher: RandomState,
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

impl SeenIds {
    fn new() -> Self {
        SeenIds {
            hasher: RandomState::new(),
            order: VecDeque::new(),
            set: HashSet::new(),
        }
    }

    fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    fn contains(&self, hash: u64) -> bool {
        self.set.contains(&hash)
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn is_full(&self) -> bool {
        self.order.len() >= SEEN_CAPACITY
    }

    /// Remembers an id; false when it was already there.
    fn insert(&mut self, hash: u64) -> bool {
        if !self.set.insert(hash) {
            return false;
        }
        if self.order.len() == SEEN_CAPACITY
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        self.order.push_back(hash);
        true
    }
}

/// The live HTTP connection and its decoder.
struct Live {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    decoder: SseDecoder,
    /// Something was delivered from this connection.
    delivered: bool,
}

/// What reading the live connection gave.
enum Read {
    Decoded(Decoded),
    /// The data of an `event: error` frame.
    ErrorFrame(Vec<u8>),
    /// The connection ended, broke or went quiet.
    Closed(String),
}

impl Live {
    async fn read(&mut self, idle_timeout: Duration) -> Read {
        loop {
            if let Some(frame) = self.decoder.next_frame() {
                match frame.event {
                    // The SDK drops frames without an event name, and pings.
                    None | Some("ping") => continue,
                    Some("error") => return Read::ErrorFrame(frame.data.to_vec()),
                    Some(_) if frame.data.is_empty() => continue,
                    Some(_) => match wire::decode(frame.data) {
                        Decoded::Skip => continue,
                        decoded => return Read::Decoded(decoded),
                    },
                }
            }
            match tokio::time::timeout(idle_timeout, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.decoder.push(&chunk),
                Ok(Some(Err(err))) => return Read::Closed(http::describe(&err)),
                Ok(None) => return Read::Closed("connection closed".to_owned()),
                Err(_) => return Read::Closed("no data within the idle timeout".to_owned()),
            }
        }
    }
}

/// The stream's state between two items.
struct State {
    http: Arc<Http>,
    options: StreamOptions,
    session_id: Box<str>,
    live: Option<Live>,
    /// Events read from the history, to deliver before live ones.
    queue: VecDeque<RuntimeEvent>,
    seen: SeenIds,
    /// Where to start in the history when nothing delivered is found there.
    anchor: Option<u64>,
    /// Start at this event, inclusive (a delta id given as `after`).
    include_from: Option<u64>,
    delta_seq: u64,
    failures: u32,
    backoff: Duration,
    /// Ends the stream after the next item.
    fatal: Option<ProviderError>,
    done: bool,
}

impl State {
    fn new(http: Arc<Http>, options: StreamOptions, session_id: &str) -> Self {
        State {
            http,
            options,
            session_id: session_id.into(),
            live: None,
            queue: VecDeque::new(),
            seen: SeenIds::new(),
            anchor: None,
            include_from: None,
            delta_seq: 0,
            failures: 0,
            backoff: options.reconnect_backoff,
            fatal: None,
            done: false,
        }
    }

    /// Retries of the first connection: the usual request policy.
    fn http_retries(&self) -> u32 {
        self.http.max_retries()
    }

    fn connect(&mut self, response: reqwest::Response) {
        self.live = Some(Live {
            body: response.bytes_stream().boxed(),
            decoder: SseDecoder::default(),
            delivered: false,
        });
    }

    /// The next item: queued history first, then the live connection,
    /// reconnecting as needed.
    async fn next_item(&mut self) -> Option<Result<RuntimeEvent>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(err) = self.fatal.take() {
                self.done = true;
                return Some(Err(err));
            }
            if let Some(event) = self.queue.pop_front() {
                if self.admit(&event) {
                    return Some(Ok(event));
                }
                continue;
            }
            let Some(live) = self.live.as_mut() else {
                if let Err(err) = self.reconnect().await {
                    self.done = true;
                    return Some(Err(err));
                }
                continue;
            };
            match live.read(self.options.idle_timeout).await {
                Read::Decoded(Decoded::Event(event)) => {
                    live.delivered = true;
                    if self.admit(&event) {
                        return Some(Ok(event));
                    }
                }
                Read::Decoded(Decoded::Delta { message_id, text }) => {
                    live.delivered = true;
                    // A late preview of a message a catch-up already gave.
                    if self.seen.contains(self.seen.hash(&message_id)) {
                        continue;
                    }
                    self.delta_seq += 1;
                    let id = format!("{message_id}{DELTA_ID}{}", self.delta_seq);
                    return Some(Ok(RuntimeEvent::AgentMessageDelta {
                        id,
                        message_id,
                        text,
                    }));
                }
                Read::Decoded(Decoded::Deleted(event)) => {
                    tracing::debug!(session = %self.session_id, "claude session deleted");
                    self.live = None;
                    self.fatal = Some(ProviderError::SessionNotFound(self.session_id.to_string()));
                    if self.admit(&event) {
                        return Some(Ok(event));
                    }
                }
                Read::Decoded(Decoded::Skip) => {}
                Read::ErrorFrame(data) => {
                    self.live = None;
                    let (err, transient) = wire::stream_error(&data, &self.session_id);
                    if !transient {
                        self.done = true;
                        return Some(Err(err));
                    }
                    tracing::warn!(session = %self.session_id, error = %err, "claude stream sent an error, reconnecting");
                }
                Read::Closed(reason) => {
                    if live.delivered {
                        self.backoff = self.options.reconnect_backoff;
                    }
                    self.live = None;
                    tracing::debug!(session = %self.session_id, reason = %reason, "claude stream disconnected");
                }
            }
        }
    }

    /// Whether an event is new; remembers it.
    fn admit(&mut self, event: &RuntimeEvent) -> bool {
        let hash = self.seen.hash(event.id());
        let new = self.seen.insert(hash);
        if self.seen.is_full() {
            // Once ids are forgotten the anchor could lead a catch-up to
            // deliver forgotten events again; the remembered ids suffice.
            self.anchor = None;
        }
        new
    }

    /// Reconnects with backoff until connected and caught up, or until too
    /// many attempts failed in a row or the failure is permanent.
    async fn reconnect(&mut self) -> Result<()> {
        loop {
            let wait = self.backoff;
            self.backoff = (self.backoff * 2).min(self.options.reconnect_max_backoff);
            tokio::time::sleep(wait).await;
            metrics::counter!("hg_bridge_claude_stream_reconnects_total").increment(1);
            let attempt = match self
                .http
                .open_stream(&self.session_id, self.options.deltas, 0)
                .await
            {
                Ok(response) => {
                    self.connect(response);
                    self.catch_up().await
                }
                Err(err) => Err(err),
            };
            match attempt {
                Ok(found) => {
                    if !found {
                        tracing::warn!(
                            session = %self.session_id,
                            "last delivered event not in the history, events may be missing"
                        );
                    }
                    self.failures = 0;
                    tracing::debug!(session = %self.session_id, queued = self.queue.len(), "claude stream reconnected");
                    return Ok(());
                }
                Err(err) if err.is_transient() => {
                    self.live = None;
                    self.failures += 1;
                    if let ProviderError::RateLimited {
                        retry_after: Some(retry_after),
                    } = err
                    {
                        self.backoff = self.backoff.max(retry_after);
                    }
                    if self.failures >= self.options.reconnect_attempts {
                        tracing::warn!(session = %self.session_id, failures = self.failures, error = %err, "claude stream gave up reconnecting");
                        return Err(ProviderError::Unavailable(format!(
                            "event stream lost after {} reconnect attempts: {err}",
                            self.failures
                        )));
                    }
                    tracing::debug!(session = %self.session_id, failures = self.failures, error = %err, "claude stream reconnect failed");
                }
                Err(err) => {
                    self.live = None;
                    return Err(err);
                }
            }
        }
    }

    /// Lists the history and queues the events not yet delivered that come
    /// after the oldest remembered delivered event (or after the anchor).
    /// Returns false when neither is in the history.
    ///
    /// Starting at the oldest remembered event rather than the newest keeps
    /// an event listed a little out of stream order (the list is sorted by
    /// `processed_at`) from being skipped.
    async fn catch_up(&mut self) -> Result<bool> {
        let mut found =
            self.seen.is_empty() && self.anchor.is_none() && self.include_from.is_none();
        let mut fresh: Vec<RuntimeEvent> = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let body = self
                .http
                .list_events(&self.session_id, LIST_LIMIT, "asc", page.as_deref())
                .await?;
            let listed = decode_page(&body)?;
            for raw in &listed.data {
                let json = raw.get().as_bytes();
                // Only the id is read of events that are not delivered.
                let Some(id) = wire::event_id(json) else {
                    continue;
                };
                let hash = self.seen.hash(&id);
                let known = self.seen.contains(hash) || self.anchor == Some(hash);
                if !found {
                    found = known || self.include_from == Some(hash);
                    if !found || known {
                        continue;
                    }
                } else if known {
                    continue;
                }
                match wire::decode(json) {
                    Decoded::Event(event) | Decoded::Deleted(event) => fresh.push(event),
                    Decoded::Delta { .. } | Decoded::Skip => {}
                }
            }
            match listed.next_page {
                Some(next) if !next.is_empty() => page = Some(next),
                _ => break,
            }
        }
        self.include_from = None;
        self.queue.extend(fresh);
        Ok(found)
    }
}
