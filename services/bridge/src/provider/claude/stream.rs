//! Shared, self-healing event streams: one live connection per session.
//!
//! A session's *feed* is one background task that reads the session's
//! server-sent event stream and fans its events out to every
//! [`EventStream`] of that session (its subscribers). Consecutive turns of
//! a conversation share the connection instead of opening one each: a
//! feed stays connected while it has subscribers, and for
//! [`StreamOptions::linger`] after the last one left, so the next turn
//! attaches at once. An unused feed then closes, so an idle session holds
//! no connection.
//!
//! Reconnecting belongs to the feed (one per session, not per subscriber).
//! Like the SDK's session runner (`lib/tools/_beta_session_runner.py`,
//! `_stream_loop` and `_reconcile`), every reconnection first opens the
//! live stream, then lists the session's history, delivers what came after
//! the last delivered event, and drops live events already delivered.
//!
//! The feed keeps its recent events in a ring, numbered in order. A
//! subscriber is a cursor into that ring: it reads at its own pace and the
//! feed never waits for it. One that asks for the events after an id still
//! in the ring is served from memory; one that asks for an older id, or
//! falls so far behind that the ring no longer holds its next event,
//! catches up from the history (the list endpoint), then goes on in the
//! ring, dropping the overlap by id. Nothing is skipped silently: when a
//! catch-up is impossible the subscriber gets an error.
//!
//! Positions in the history are found by id: a reader remembers the ids of
//! the last events it delivered (as salted 64-bit hashes, in a bounded
//! set, so remembering costs no allocation) plus an anchor. A catch-up
//! delivers the listed events that follow the oldest remembered one (or
//! the anchor) and are not remembered themselves.
//!
//! A feed that loses its connection before its first event knows no
//! position yet. It then starts at the first event that a call through
//! this provider sent while the feed was connected (it waits for those
//! calls to return their event ids), else after the newest event a
//! subscriber's catch-up listed, else, the one case where events produced
//! while it was down may be missed, after the newest event in the history.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
/// Ids of sent events a feed keeps while it knows no position.
const MAX_SENT_HINTS: usize = 16;
/// The smallest ring of recent events a feed keeps.
pub(super) const MIN_REPLAY_EVENTS: usize = 16;

/// Numbers deltas across the process, so the id of a delta given as a
/// cursor never matches a delta read by another connection.
static DELTA_SEQ: AtomicU64 = AtomicU64::new(0);

/// Settings of event streams, from [`super::ClaudeConfig`].
#[derive(Debug, Clone, Copy)]
pub(super) struct StreamOptions {
    pub deltas: bool,
    pub idle_timeout: Duration,
    pub reconnect_backoff: Duration,
    pub reconnect_max_backoff: Duration,
    pub reconnect_attempts: u32,
    /// How long a feed without subscribers stays connected.
    pub linger: Duration,
    /// How many recent events a feed keeps (at least [`MIN_REPLAY_EVENTS`]).
    pub replay_events: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// Feeds: the provider's open feeds
// ---------------------------------------------------------------------------

/// The open feeds of one provider, by session id. Dropping it (with the
/// last clone of the provider) stops every feed.
///
/// Lock order: `open`, then a feed's `state`.
pub(super) struct Feeds {
    http: Arc<Http>,
    options: StreamOptions,
    open: Mutex<HashMap<Box<str>, Arc<Feed>>>,
    cancel: CancellationToken,
}

impl Drop for Feeds {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Feeds {
    /// No feed open yet; each opens on its session's first subscriber.
    pub(super) fn new(http: Arc<Http>, options: StreamOptions) -> Arc<Feeds> {
        Arc::new(Feeds {
            http,
            options,
            open: Mutex::new(HashMap::new()),
            cancel: CancellationToken::new(),
        })
    }

    /// A stream of the session's events: with `after`, every event after
    /// that id first; without, the events the feed receives from now on.
    /// The session's feed is connected (opened if needed) and, with
    /// `after`, the history after it read, before this returns.
    pub(super) async fn subscribe(
        self: &Arc<Self>,
        session_id: &str,
        after: Option<&str>,
    ) -> Result<EventStream> {
        let mut subscriber = self.attach(session_id);
        subscriber.connected().await?;
        match after {
            None => subscriber.start_now(),
            Some(after) => subscriber.start_after(after).await?,
        }
        tracing::debug!(session = %session_id, after = ?after, "subscribed to claude event stream");
        let stream: BoxStream<'static, Result<RuntimeEvent>> =
            futures::stream::unfold(subscriber, |mut subscriber| async move {
                let item = subscriber.next_item().await?;
                Some((item, subscriber))
            })
            .boxed();
        Ok(stream)
    }

    /// Counts a new subscriber of the session's feed, opening the feed when
    /// there is none.
    fn attach(self: &Arc<Self>, session_id: &str) -> Subscriber {
        let feed = {
            let mut open = lock(&self.open);
            match open.get(session_id) {
                Some(feed) => {
                    lock(&feed.state).subscribers += 1;
                    feed.clone()
                }
                None => {
                    let feed = Arc::new(Feed::new(session_id, self.cancel.child_token()));
                    open.insert(session_id.into(), feed.clone());
                    tokio::spawn(run(
                        Arc::downgrade(self),
                        feed.clone(),
                        self.http.clone(),
                        self.options,
                    ));
                    feed
                }
            }
        };
        Subscriber::new(feed, self.http.clone())
    }

    /// Called before sending events to the session: while its feed knows no
    /// position, the feed waits for the returned event id (see
    /// [`SendGuard::sent`]) before it would have to guess one.
    pub(super) fn sending(&self, session_id: &str) -> Option<SendGuard> {
        let open = lock(&self.open);
        let feed = open.get(session_id)?;
        let state = lock(&feed.state);
        if !matches!(state.phase, Phase::Live) || state.positioned() {
            return None;
        }
        feed.pending_sends.send_modify(|pending| *pending += 1);
        Some(SendGuard { feed: feed.clone() })
    }

    /// The session is gone: its feed takes no new subscribers and closes
    /// as soon as its current ones are done.
    pub(super) fn close(&self, session_id: &str) {
        let removed = lock(&self.open).remove(session_id);
        if let Some(feed) = removed {
            lock(&feed.state).closing = true;
            feed.idle.notify_one();
        }
    }
}

/// A send in flight while its session's feed knows no position.
pub(super) struct SendGuard {
    feed: Arc<Feed>,
}

impl SendGuard {
    /// The runtime's id of the first event sent.
    pub(super) fn sent(self, event_id: &str) {
        let mut state = lock(&self.feed.state);
        if !state.positioned() && state.sent_hints.len() < MAX_SENT_HINTS {
            state.sent_hints.push(event_id.to_owned());
        }
    }
}

impl Drop for SendGuard {
    fn drop(&mut self) {
        self.feed
            .pending_sends
            .send_modify(|pending| *pending = pending.saturating_sub(1));
    }
}

// ---------------------------------------------------------------------------
// Feed: one session's connection and recent events
// ---------------------------------------------------------------------------

/// What the feed task and the subscribers of one session share.
struct Feed {
    session_id: Box<str>,
    state: Mutex<FeedState>,
    /// Bumped after events were added or the phase changed.
    changed: watch::Sender<u64>,
    /// Wakes the task when the subscriber count or `closing` changed.
    idle: Notify,
    /// Sends waiting for their event id (see [`Feeds::sending`]).
    pending_sends: watch::Sender<usize>,
    cancel: CancellationToken,
}

enum Phase {
    /// Opening the first connection.
    Connecting,
    /// Connected, or reconnecting by itself.
    Live,
    /// Done; subscribers get this error after the events they have left.
    Ended(ProviderError),
}

struct FeedState {
    phase: Phase,
    /// The most recent events, oldest first; `ring[0]` is number `base`.
    ring: VecDeque<RuntimeEvent>,
    base: u64,
    /// The first and the last event received that is not a delta.
    first_id: Option<String>,
    last_id: Option<String>,
    subscribers: usize,
    /// When `subscribers` last dropped to zero.
    idle_since: Instant,
    /// The session was destroyed: close once unused, without lingering.
    closing: bool,
    /// Ids of events sent while no position was known (inclusive starts).
    sent_hints: Vec<String>,
    /// The newest event a subscriber's catch-up listed while no position
    /// was known.
    listed_hint: Option<String>,
}

impl FeedState {
    /// Number of the next event.
    fn head(&self) -> u64 {
        self.base + self.ring.len() as u64
    }

    /// Whether the feed has received an event to find its place by.
    fn positioned(&self) -> bool {
        self.last_id.is_some()
    }

    /// Index in the ring of the event with this id, newest first.
    fn find(&self, id: &str) -> Option<usize> {
        self.ring.iter().rposition(|event| event.id() == id)
    }
}

impl Feed {
    fn new(session_id: &str, cancel: CancellationToken) -> Feed {
        Feed {
            session_id: session_id.into(),
            state: Mutex::new(FeedState {
                phase: Phase::Connecting,
                ring: VecDeque::new(),
                base: 0,
                first_id: None,
                last_id: None,
                subscribers: 1,
                idle_since: Instant::now(),
                closing: false,
                sent_hints: Vec::new(),
                listed_hint: None,
            }),
            changed: watch::Sender::new(0),
            idle: Notify::new(),
            pending_sends: watch::Sender::new(0),
            cancel,
        }
    }

    fn notify(&self) {
        self.changed
            .send_modify(|version| *version = version.wrapping_add(1));
    }

    fn set_live(&self) {
        lock(&self.state).phase = Phase::Live;
        self.notify();
    }

    /// Appends an event for the subscribers, forgetting the oldest one when
    /// the ring is full.
    fn push(&self, event: RuntimeEvent, capacity: usize) {
        {
            let mut state = lock(&self.state);
            if !matches!(event, RuntimeEvent::AgentMessageDelta { .. }) {
                let id = event.id();
                if state.first_id.is_none() {
                    state.first_id = Some(id.to_owned());
                    state.sent_hints = Vec::new();
                    state.listed_hint = None;
                }
                match &mut state.last_id {
                    Some(last) => {
                        last.clear();
                        last.push_str(id);
                    }
                    None => state.last_id = Some(id.to_owned()),
                }
            }
            if state.ring.len() >= capacity {
                state.ring.pop_front();
                state.base += 1;
            }
            state.ring.push_back(event);
        }
        self.notify();
    }

    /// Remembers the newest event a catch-up listed, while no position is
    /// known.
    fn hint_listed(&self, newest: Option<String>) {
        let mut state = lock(&self.state);
        if !state.positioned() && state.listed_hint.is_none() {
            state.listed_hint = newest;
        }
    }

    fn take_hints(&self) -> (Vec<String>, Option<String>) {
        let mut state = lock(&self.state);
        (
            std::mem::take(&mut state.sent_hints),
            state.listed_hint.take(),
        )
    }

    /// Ends the feed with an error for its subscribers and forgets it, unless
    /// it already ended.
    fn finish(self: &Arc<Self>, feeds: &Weak<Feeds>, error: ProviderError) {
        let feeds = feeds.upgrade();
        {
            let mut open = feeds.as_ref().map(|feeds| lock(&feeds.open));
            let mut state = lock(&self.state);
            if matches!(state.phase, Phase::Ended(_)) {
                return;
            }
            if let Some(open) = open.as_mut() {
                forget(open, self);
            }
            state.phase = Phase::Ended(error);
        }
        self.notify();
    }

    /// Ends the feed if it still has no subscribers.
    fn close_if_unused(self: &Arc<Self>, feeds: &Weak<Feeds>) -> bool {
        let feeds = feeds.upgrade();
        let mut open = feeds.as_ref().map(|feeds| lock(&feeds.open));
        let mut state = lock(&self.state);
        if state.subscribers > 0 {
            return false;
        }
        if let Some(open) = open.as_mut() {
            forget(open, self);
        }
        state.phase = Phase::Ended(ProviderError::Unavailable(
            "claude event stream closed while unused".to_owned(),
        ));
        true
    }

    /// Completes once the feed was closed for having had no subscribers
    /// for `linger` (or at once when the session was destroyed).
    async fn unused(self: &Arc<Self>, feeds: &Weak<Feeds>, linger: Duration) {
        loop {
            let deadline = {
                let state = lock(&self.state);
                (state.subscribers == 0).then(|| {
                    if state.closing {
                        state.idle_since
                    } else {
                        state.idle_since + linger
                    }
                })
            };
            match deadline {
                // A wake-up between the check and the wait is kept as a
                // permit by `notify_one`.
                None => self.idle.notified().await,
                Some(deadline) => tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {
                        if self.close_if_unused(feeds) {
                            return;
                        }
                    }
                    () = self.idle.notified() => {}
                },
            }
        }
    }
}

/// Removes this feed from the map, unless the session has a newer one.
fn forget(open: &mut HashMap<Box<str>, Arc<Feed>>, feed: &Arc<Feed>) {
    if open
        .get(&feed.session_id)
        .is_some_and(|current| Arc::ptr_eq(current, feed))
    {
        open.remove(&feed.session_id);
    }
}

/// Ends the feed when its task stops for any reason (a panic included).
struct RunGuard {
    feeds: Weak<Feeds>,
    feed: Arc<Feed>,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.feed.finish(
            &self.feeds,
            ProviderError::Unavailable("claude event stream stopped".to_owned()),
        );
        metrics::gauge!("hg_bridge_claude_streams_open").decrement(1.0);
    }
}

/// The feed's task: connects, then reads and fans out events until the
/// stream fails for good, the feed is unused for its linger time, or the
/// provider is dropped.
async fn run(feeds: Weak<Feeds>, feed: Arc<Feed>, http: Arc<Http>, options: StreamOptions) {
    metrics::gauge!("hg_bridge_claude_streams_open").increment(1.0);
    let guard = RunGuard { feeds, feed };
    let (feeds, feed) = (&guard.feeds, &guard.feed);
    let opened = tokio::select! {
        biased;
        () = feed.cancel.cancelled() => Err(shut_down()),
        opened = State::open(http, options, &feed.session_id) => opened,
    };
    let mut state = match opened {
        Ok(state) => state,
        Err(err) => {
            tracing::debug!(session = %feed.session_id, error = %err, "claude event stream failed to open");
            feed.finish(feeds, err);
            return;
        }
    };
    feed.set_live();
    tracing::debug!(session = %feed.session_id, "claude event stream connected");
    let error = loop {
        tokio::select! {
            biased;
            () = feed.cancel.cancelled() => break shut_down(),
            () = feed.unused(feeds, options.linger) => {
                tracing::debug!(session = %feed.session_id, "closed unused claude event stream");
                return;
            }
            item = state.next_item(feed) => match item {
                Some(Ok(event)) => feed.push(event, options.replay_events),
                Some(Err(err)) => break err,
                None => break ProviderError::Unavailable("claude event stream ended".to_owned()),
            },
        }
    };
    tracing::debug!(session = %feed.session_id, error = %error, "claude event stream ended");
    feed.finish(feeds, error);
}

fn shut_down() -> ProviderError {
    ProviderError::Unavailable("claude provider shut down".to_owned())
}

// ---------------------------------------------------------------------------
// Subscriber: one caller's cursor into a feed
// ---------------------------------------------------------------------------

/// One [`EventStream`]: a cursor into its feed's ring, with its own
/// catch-up from the history when the ring cannot serve it.
struct Subscriber {
    feed: Arc<Feed>,
    http: Arc<Http>,
    changes: watch::Receiver<u64>,
    /// Number of the next event to read from the ring.
    next: u64,
    /// Events from the history, delivered before the ring.
    queue: VecDeque<RuntimeEvent>,
    /// What this subscriber delivered, to catch up and dedup by.
    position: Position,
    /// Attached before the feed received any event: a catch-up starts at
    /// the feed's first event.
    from_feed_start: bool,
    done: bool,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let mut state = lock(&self.feed.state);
        state.subscribers -= 1;
        if state.subscribers == 0 {
            state.idle_since = Instant::now();
            drop(state);
            self.feed.idle.notify_one();
        }
    }
}

/// What the ring holds for a subscriber.
enum Step {
    Event(RuntimeEvent),
    Lagged,
    End(ProviderError),
    Wait,
}

impl Subscriber {
    fn new(feed: Arc<Feed>, http: Arc<Http>) -> Subscriber {
        Subscriber {
            changes: feed.changed.subscribe(),
            feed,
            http,
            next: 0,
            queue: VecDeque::new(),
            position: Position::new(),
            from_feed_start: false,
            done: false,
        }
    }

    /// Waits until the feed's first connection is up.
    async fn connected(&mut self) -> Result<()> {
        loop {
            self.changes.borrow_and_update();
            match &lock(&self.feed.state).phase {
                Phase::Connecting => {}
                Phase::Live => return Ok(()),
                Phase::Ended(err) => return Err(clone_error(err)),
            }
            if self.changes.changed().await.is_err() {
                return Err(ProviderError::Unavailable(
                    "claude event stream stopped".to_owned(),
                ));
            }
        }
    }

    /// Starts with the next event the feed receives.
    fn start_now(&mut self) {
        let state = lock(&self.feed.state);
        self.next = state.head();
        match &state.last_id {
            Some(last) => self.position.anchor = Some(self.position.hash(last)),
            None => self.from_feed_start = true,
        }
    }

    /// Starts after the event `after`: in the ring when it is there, else
    /// from the history.
    async fn start_after(&mut self, after: &str) -> Result<()> {
        // A delta's id stands for its message, which may not have been
        // delivered yet: start at that message, inclusive.
        let message_id = after.split_once(DELTA_ID).map(|(message_id, _)| message_id);
        {
            let state = lock(&self.feed.state);
            let in_ring = match message_id {
                Some(message_id) => state
                    .find(message_id)
                    .or_else(|| state.find(after).map(|index| index + 1)),
                None => state.find(after).map(|index| index + 1),
            };
            match message_id {
                Some(message_id) => self
                    .position
                    .include_from
                    .push(self.position.hash(message_id)),
                None => self.position.anchor = Some(self.position.hash(after)),
            }
            if let Some(index) = in_ring {
                self.next = state.base + index as u64;
                return Ok(());
            }
            // Every event the feed received before this point is in the
            // listing below; the overlap after it is dropped by id.
            self.next = state.head();
        }
        let listed = list_after(&self.http, &self.feed.session_id, &mut self.position).await?;
        if !listed.found {
            return Err(ProviderError::Rejected(format!(
                "event {after} not found in session {}",
                self.feed.session_id
            )));
        }
        self.feed.hint_listed(listed.newest);
        self.queue.extend(listed.events);
        Ok(())
    }

    /// The next item: caught-up history first, then the ring.
    async fn next_item(&mut self) -> Option<Result<RuntimeEvent>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(event) = self.queue.pop_front() {
                if self.position.admit(event.id()) {
                    return Some(Ok(event));
                }
                continue;
            }
            self.changes.borrow_and_update();
            let step = {
                let state = lock(&self.feed.state);
                if self.next < state.base {
                    Step::Lagged
                } else if let Some(event) = state.ring.get((self.next - state.base) as usize) {
                    self.next += 1;
                    Step::Event(event.clone())
                } else {
                    match &state.phase {
                        Phase::Ended(err) => Step::End(clone_error(err)),
                        Phase::Connecting | Phase::Live => Step::Wait,
                    }
                }
            };
            match step {
                Step::Event(event) => {
                    if let RuntimeEvent::AgentMessageDelta { message_id, .. } = &event {
                        // A late preview of a message a catch-up already gave.
                        if !self.position.delivered(message_id) {
                            return Some(Ok(event));
                        }
                    } else if self.position.admit(event.id()) {
                        return Some(Ok(event));
                    }
                }
                Step::Lagged => {
                    if let Err(err) = self.catch_up().await {
                        self.done = true;
                        return Some(Err(err));
                    }
                }
                Step::End(err) => {
                    self.done = true;
                    return Some(Err(err));
                }
                Step::Wait => {
                    if self.changes.changed().await.is_err() {
                        self.done = true;
                        return None;
                    }
                }
            }
        }
    }

    /// The ring dropped events this subscriber has not read: reads them
    /// from the history, then goes on from where the ring was then.
    async fn catch_up(&mut self) -> Result<()> {
        metrics::counter!("hg_bridge_claude_stream_lagged_total").increment(1);
        let head = {
            let state = lock(&self.feed.state);
            tracing::debug!(
                session = %self.feed.session_id,
                missed = state.base - self.next,
                "claude stream reader fell behind, catching up from the history"
            );
            if self.from_feed_start
                && self.position.is_unknown()
                && let Some(first) = &state.first_id
            {
                self.position.include_from.push(self.position.hash(first));
            }
            state.head()
        };
        if self.position.is_unknown() {
            return Err(ProviderError::Unavailable(format!(
                "event stream of session {} fell behind before delivering anything",
                self.feed.session_id
            )));
        }
        let listed = list_after(&self.http, &self.feed.session_id, &mut self.position).await?;
        if !listed.found {
            return Err(ProviderError::Unavailable(format!(
                "event stream of session {} fell behind and its last event is not in the history",
                self.feed.session_id
            )));
        }
        self.queue.extend(listed.events);
        self.next = head;
        Ok(())
    }
}

/// A copy of an error, for each subscriber of a feed that ended with it.
fn clone_error(err: &ProviderError) -> ProviderError {
    match err {
        ProviderError::Unavailable(message) => ProviderError::Unavailable(message.clone()),
        ProviderError::RateLimited { retry_after } => ProviderError::RateLimited {
            retry_after: *retry_after,
        },
        ProviderError::SessionNotFound(id) => ProviderError::SessionNotFound(id.clone()),
        ProviderError::Unauthorized(message) => ProviderError::Unauthorized(message.clone()),
        ProviderError::Rejected(message) => ProviderError::Rejected(message.clone()),
        ProviderError::Protocol(message) => ProviderError::Protocol(message.clone()),
        ProviderError::Unsupported(what) => ProviderError::Unsupported(what),
    }
}

// ---------------------------------------------------------------------------
// History: positions and catch-up
// ---------------------------------------------------------------------------

/// The id of the session's newest event, if it has any.
async fn newest_event(http: &Http, session_id: &str) -> Result<Option<String>> {
    let body = http.list_events(session_id, "1", "desc", None).await?;
    let page: Page<'_> = decode_page(&body)?;
    Ok(page
        .data
        .first()
        .and_then(|raw| wire::event_id(raw.get().as_bytes()))
        .map(|id| id.into_owned()))
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
    /// Keyed hashes of the ids: already uniform, so not hashed again.
    set: HashSet<u64, std::hash::BuildHasherDefault<Prehashed>>,
}

/// The hasher of a set of keyed hashes: passes them through.
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

impl SeenIds {
    fn new() -> Self {
        SeenIds {
            hasher: RandomState::new(),
            order: VecDeque::new(),
            set: HashSet::default(),
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

/// Where a reader is in the session's history.
struct Position {
    /// Recently delivered events.
    seen: SeenIds,
    /// Start after this event when no remembered one is listed.
    anchor: Option<u64>,
    /// Start at the first listed of these events, inclusive.
    include_from: Vec<u64>,
    /// Everything in the history is new (it was empty when looked at).
    from_start: bool,
}

impl Position {
    fn new() -> Self {
        Position {
            seen: SeenIds::new(),
            anchor: None,
            include_from: Vec::new(),
            from_start: false,
        }
    }

    fn hash(&self, id: &str) -> u64 {
        self.seen.hash(id)
    }

    /// Nothing to find a place in the history by.
    fn is_unknown(&self) -> bool {
        !self.from_start
            && self.seen.is_empty()
            && self.anchor.is_none()
            && self.include_from.is_empty()
    }

    fn delivered(&self, id: &str) -> bool {
        self.seen.contains(self.seen.hash(id))
    }

    /// Whether an event is new; remembers it.
    fn admit(&mut self, id: &str) -> bool {
        let hash = self.seen.hash(id);
        let new = self.seen.insert(hash);
        self.from_start = false;
        if self.seen.is_full() {
            // Once ids are forgotten the anchor could lead a catch-up to
            // deliver forgotten events again; the remembered ids suffice.
            self.anchor = None;
        }
        new
    }
}

/// What a catch-up found in the history.
struct Listed {
    /// The position was in the history.
    found: bool,
    /// Events after the position that were not delivered yet.
    events: Vec<RuntimeEvent>,
    /// The newest event listed.
    newest: Option<String>,
}

/// Lists the history and returns the events not yet delivered that come
/// after the oldest remembered delivered event (or after the anchor, or at
/// an `include_from` event).
///
/// Starting at the oldest remembered event rather than the newest keeps
/// an event listed a little out of stream order (the list is sorted by
/// `processed_at`) from being skipped.
async fn list_after(http: &Http, session_id: &str, position: &mut Position) -> Result<Listed> {
    let mut found = position.from_start;
    let mut events: Vec<RuntimeEvent> = Vec::new();
    let mut newest = None;
    let mut page: Option<String> = None;
    loop {
        let body = http
            .list_events(session_id, LIST_LIMIT, "asc", page.as_deref())
            .await?;
        let listed = decode_page(&body)?;
        for raw in &listed.data {
            let json = raw.get().as_bytes();
            // Only the id is read of events that are not delivered.
            let Some(id) = wire::event_id(json) else {
                continue;
            };
            let hash = position.hash(&id);
            let known = position.seen.contains(hash) || position.anchor == Some(hash);
            if !found {
                found = known || position.include_from.contains(&hash);
                if !found || known {
                    continue;
                }
            } else if known {
                continue;
            }
            match wire::decode(json) {
                Decoded::Event(event) | Decoded::Deleted(event) => events.push(event),
                Decoded::Delta { .. } | Decoded::Skip => {}
            }
        }
        if let Some(id) = listed
            .data
            .iter()
            .rev()
            .find_map(|raw| wire::event_id(raw.get().as_bytes()))
        {
            newest = Some(id.into_owned());
        }
        match listed.next_page {
            Some(next) if !next.is_empty() => page = Some(next),
            _ => break,
        }
    }
    position.include_from.clear();
    Ok(Listed {
        found,
        events,
        newest,
    })
}

// ---------------------------------------------------------------------------
// State: the feed's connection that survives disconnects
// ---------------------------------------------------------------------------

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

/// The feed's reader between two events.
struct State {
    http: Arc<Http>,
    options: StreamOptions,
    session_id: Box<str>,
    live: Option<Live>,
    /// Events read from the history, to deliver before live ones.
    queue: VecDeque<RuntimeEvent>,
    position: Position,
    failures: u32,
    backoff: Duration,
    /// Ends the stream after the next item.
    fatal: Option<ProviderError>,
    done: bool,
}

impl State {
    /// Connects, retrying transient failures like any request.
    async fn open(http: Arc<Http>, options: StreamOptions, session_id: &str) -> Result<State> {
        let response = http
            .open_stream(session_id, options.deltas, http.max_retries())
            .await?;
        let mut state = State {
            http,
            options,
            session_id: session_id.into(),
            live: None,
            queue: VecDeque::new(),
            position: Position::new(),
            failures: 0,
            backoff: options.reconnect_backoff,
            fatal: None,
            done: false,
        };
        state.connect(response);
        Ok(state)
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
    async fn next_item(&mut self, feed: &Feed) -> Option<Result<RuntimeEvent>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(err) = self.fatal.take() {
                self.done = true;
                return Some(Err(err));
            }
            if let Some(event) = self.queue.pop_front() {
                if self.position.admit(event.id()) {
                    return Some(Ok(event));
                }
                continue;
            }
            let Some(live) = self.live.as_mut() else {
                if let Err(err) = self.reconnect(feed).await {
                    self.done = true;
                    return Some(Err(err));
                }
                continue;
            };
            match live.read(self.options.idle_timeout).await {
                Read::Decoded(Decoded::Event(event)) => {
                    live.delivered = true;
                    if self.position.admit(event.id()) {
                        return Some(Ok(event));
                    }
                }
                Read::Decoded(Decoded::Delta { message_id, text }) => {
                    live.delivered = true;
                    // A late preview of a message a catch-up already gave.
                    if self.position.delivered(&message_id) {
                        continue;
                    }
                    let seq = DELTA_SEQ.fetch_add(1, Ordering::Relaxed) + 1;
                    let id = format!("{message_id}{DELTA_ID}{seq}");
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
                    if self.position.admit(event.id()) {
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

    /// Reconnects with backoff until connected and caught up, or until too
    /// many attempts failed in a row or the failure is permanent.
    async fn reconnect(&mut self, feed: &Feed) -> Result<()> {
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
                    self.catch_up(feed).await
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

    /// Queues the history after the last delivered event (finding a
    /// position first when there is none). Returns false when the position
    /// is not in the history.
    async fn catch_up(&mut self, feed: &Feed) -> Result<bool> {
        if self.position.is_unknown() {
            self.locate(feed).await?;
        }
        let listed = list_after(&self.http, &self.session_id, &mut self.position).await?;
        self.queue.extend(listed.events);
        Ok(listed.found)
    }

    /// Finds where to resume when the connection dropped before its first
    /// event (see the module documentation).
    async fn locate(&mut self, feed: &Feed) -> Result<()> {
        // Sends that started while connected produced their events after
        // the connection opened; their ids mark the start exactly.
        let mut pending = feed.pending_sends.subscribe();
        let _ = pending.wait_for(|pending| *pending == 0).await;
        let (sent, listed) = feed.take_hints();
        for id in &sent {
            let hash = self.position.hash(id);
            self.position.include_from.push(hash);
        }
        if let Some(id) = listed {
            self.position.anchor = Some(self.position.hash(&id));
        }
        if !self.position.is_unknown() {
            return Ok(());
        }
        match newest_event(&self.http, &self.session_id).await? {
            Some(id) => {
                tracing::warn!(
                    session = %self.session_id,
                    after = %id,
                    "claude stream dropped before its first event, events produced meanwhile may be missing"
                );
                self.position.anchor = Some(self.position.hash(&id));
            }
            None => self.position.from_start = true,
        }
        Ok(())
    }
}
