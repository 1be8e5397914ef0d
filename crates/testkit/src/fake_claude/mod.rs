//! A fake Claude Managed Agents API: sessions, events, history and the
//! live event stream, in the wire format of the `anthropic` Python SDK
//! 2.12.0 (`resources/beta/sessions/`, `types/beta/sessions/`).
//!
//! The fake runs an axum server on `127.0.0.1:0` and plays an agent that
//! answers every `user.message` at once, with no artificial delay. It is
//! cheap enough to serve hundreds of concurrent sessions next to the
//! system under test: each session has a broadcast channel that its live
//! streams read, nothing polls.
//!
//! # Protocol
//! - Every request needs the key [`FakeClaude::API_KEY`] (`Authorization:
//!   Bearer …` as the SDK sends it, or `x-api-key`), else 401
//!   `authentication_error`; an `anthropic-version` header and an
//!   `anthropic-beta` header listing `managed-agents-2026-04-01`, else 400
//!   `invalid_request_error`. Errors have the API's shape:
//!   `{"type":"error","error":{"type","message"},"request_id"}`.
//! - `POST /v1/sessions`, `GET /v1/sessions` (newest first, cursor pages
//!   `{"data","next_page","prev_page"}`), `GET /v1/sessions/{id}`,
//!   `DELETE /v1/sessions/{id}`,
//!   `POST /v1/sessions/{id}/events` (`{"events":[…]}` → `{"data":[…]}`),
//!   `GET /v1/sessions/{id}/events` (`limit` ≤ 1000, `order=asc|desc`,
//!   `types[]` filter, `page` cursor → `{"data":[…],"next_page":…}`) and
//!   `GET /v1/sessions/{id}/events/stream` (SSE, `event_deltas[]=agent.message`
//!   for `event_start`/`event_delta` previews).
//! - A stream carries only events produced after it connected, each frame
//!   `event: <type>\ndata: <json>\n\n`, plus a `ping` frame when it opens and
//!   every [`FakeBehaviour::ping_interval`]. A stream that falls too far
//!   behind is closed, as a real server would drop a slow reader.
//!
//! # The agent
//! Every `user.message` with text `T` appends, each event with a fresh
//! `sevt_…` id and an RFC 3339 `processed_at`: the `user.message` itself
//! (also returned by the POST), `session.status_running`,
//! `span.model_request_start`, `agent.thinking`, `agent.message` with
//! `[{"type":"text","text":"echo: T"}]`, `span.model_request_end` with
//! `model_usage`, and `session.status_idle` with `end_turn`.
//!
//! Magic prefixes of `T` script other turns:
//!
//! | text | turn |
//! |---|---|
//! | `long:N` | the agent message is `N` characters of Markdown with code fences |
//! | `blocks:A\|B\|…` | the agent message has one text block per part |
//! | `error:` or `error:<type>` | `session.error` (`retrying`, then `exhausted`; type `model_overloaded_error` unless given), idle `retries_exhausted` |
//! | `terminate:` | `session.error` with `retry_status` `terminal`, then `session.status_terminated` |
//! | `refuse:` | idle with stop reason `refusal` and `stop_details.explanation` |
//! | `budget:` | idle with stop reason `budget_reached` |
//! | `tool:CMD` | `agent.tool_use` `bash` `{"command": CMD}` with `evaluated_permission` `ask`, idle `requires_action`; after `user.tool_confirmation` the tool runs (`agent.tool_result`, an error result when denied), then `agent.message` `done: CMD` and `end_turn` |
//! | `tools:N` | `N` such tool uses at once; answering only some re-emits idle `requires_action` with the rest |
//! | `custom:Q` | `agent.custom_tool_use` `lookup` `{"query": Q}`, idle `requires_action`; after `user.custom_tool_result` an `agent.message` `custom result: <text>` and `end_turn` |
//! | `mcp:Q` | `agent.mcp_tool_use` (server `docs`, `allow`) and `agent.mcp_tool_result`, then the echo |
//! | `unknown:` | the echo turn with an event of the unknown type `agent.future_event` before the message |
//!
//! `user.interrupt` ends a turn waiting for an action with idle `end_turn`.
//! [`FakeClaude::set_reply`] replaces the agent with a closure.

mod agent;
mod server;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{broadcast, watch};

/// Which API call a failure injected with [`FakeClaude::fail_next`] hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/sessions`
    CreateSession,
    /// `GET /v1/sessions/{id}`
    RetrieveSession,
    /// `POST /v1/sessions/{id}/events`
    SendEvents,
    /// `GET /v1/sessions/{id}/events/stream`
    Stream,
    /// `GET /v1/sessions/{id}/events`
    List,
    /// `DELETE /v1/sessions/{id}`
    Delete,
}

/// How the fake behaves beyond the defaults.
#[derive(Debug, Clone)]
pub struct FakeBehaviour {
    /// Interval of `ping` frames on live streams (`None`: only the one sent
    /// when a stream opens).
    pub ping_interval: Option<Duration>,
    /// Characters per `event_delta` (grown so no message has more than 32).
    pub delta_chunk_chars: usize,
    /// Frames a live stream may fall behind before it is closed.
    pub stream_buffer: usize,
    /// Keep a log of received requests (see [`FakeClaude::requests`]).
    pub record_requests: bool,
}

impl Default for FakeBehaviour {
    fn default() -> Self {
        FakeBehaviour {
            ping_interval: Some(Duration::from_secs(15)),
            delta_chunk_chars: 8,
            stream_buffer: 256,
            record_requests: true,
        }
    }
}

/// A request the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedRequest {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, e.g. `/v1/sessions/sesn_…/events`.
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// Headers of interest, lowercase names: `authorization`, `x-api-key`,
    /// `anthropic-version`, `anthropic-beta`, `content-type`, `accept`,
    /// `user-agent`.
    pub headers: BTreeMap<String, String>,
}

/// A scripted agent: given a user message's text, the events of the turn
/// (without `id`/`processed_at`, which the fake fills in), or `None` for
/// the built-in behaviour. Called while the session is locked: it must
/// not call back into the fake.
pub type ReplyFn = Arc<dyn Fn(&str) -> Option<Vec<Value>> + Send + Sync>;

/// A running fake server; it stops when dropped.
pub struct FakeClaude {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FakeClaude {
    /// The API key the fake accepts.
    pub const API_KEY: &'static str = "test-key";

    /// Starts the fake with the default behaviour.
    pub async fn start() -> FakeClaude {
        FakeClaude::start_with(FakeBehaviour::default()).await
    }

    /// Starts the fake on a free loopback port.
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start_with(behaviour: FakeBehaviour) -> FakeClaude {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake claude listener");
        let addr = listener.local_addr().expect("fake claude address");
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            behaviour,
            sessions: RwLock::new(HashMap::new()),
            session_order: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            failures: Mutex::new(Vec::new()),
            drop_after: Mutex::new(None),
            reply: RwLock::new(None),
            next_id: AtomicU64::new(1),
            id_prefix: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
            shutdown,
        });
        let task = tokio::spawn(server::serve(listener, shared.clone()));
        FakeClaude {
            addr,
            shared,
            task: Some(task),
        }
    }

    /// `http://127.0.0.1:<port>`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Ids of the sessions created so far (deleted ones too), oldest first.
    pub fn sessions(&self) -> Vec<String> {
        lock(&self.shared.session_order).clone()
    }

    /// Texts of the session's user messages, in order (empty once the
    /// session is deleted).
    pub fn user_messages(&self, session: &str) -> Vec<String> {
        self.with_session(session, |log| log.user_texts.clone())
            .unwrap_or_default()
    }

    /// Every user event the session received, as stored (with ids).
    pub fn user_events(&self, session: &str) -> Vec<Value> {
        self.events(session)
            .into_iter()
            .filter(|event| {
                event["type"]
                    .as_str()
                    .is_some_and(|kind| kind.starts_with("user."))
            })
            .collect()
    }

    /// The tool confirmations the newest session received, in order, as
    /// (`result`, `deny_message`).
    pub fn tool_confirmations(&self) -> Vec<(String, Option<String>)> {
        let Some(session) = self.sessions().pop() else {
            return Vec::new();
        };
        self.user_events(&session)
            .into_iter()
            .filter(|e| e["type"] == "user.tool_confirmation")
            .map(|e| {
                (
                    e["result"].as_str().unwrap_or_default().to_owned(),
                    e["deny_message"].as_str().map(str::to_owned),
                )
            })
            .collect()
    }

    /// The session's whole history, oldest first.
    pub fn events(&self, session: &str) -> Vec<Value> {
        self.with_session(session, |log| {
            log.events
                .iter()
                .filter_map(|event| serde_json::from_slice(&event.json).ok())
                .collect()
        })
        .unwrap_or_default()
    }

    /// Every request received so far (when recording is on).
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// How many received requests had this method and a path starting with
    /// `path_prefix`.
    pub fn request_count(&self, method: &str, path_prefix: &str) -> usize {
        lock(&self.shared.requests)
            .iter()
            .filter(|request| {
                request.method.eq_ignore_ascii_case(method) && request.path.starts_with(path_prefix)
            })
            .count()
    }

    /// How many live streams the session has open right now.
    pub fn live_streams(&self, session: &str) -> usize {
        self.shared
            .session(session)
            .map(|session| session.tx.receiver_count())
            .unwrap_or(0)
    }

    /// The next `times` requests to `what` fail with `status` (in the API's
    /// error shape) and, when given, a `retry-after` header in seconds.
    pub fn fail_next(&self, what: Endpoint, status: u16, retry_after: Option<u32>, times: usize) {
        if times == 0 {
            return;
        }
        lock(&self.shared.failures).push(Failure {
            endpoint: what,
            status,
            retry_after,
            remaining: times,
        });
    }

    /// The live streams of the next turn (the next `user.message` in any
    /// session) are closed after `events` events of that turn, counting the
    /// `user.message` itself. The rest of the turn is still produced and
    /// listed by `GET …/events`.
    pub fn drop_stream_after(&self, events: usize) {
        *lock(&self.shared.drop_after) = Some(events);
    }

    /// Closes the session's live streams now (a clean end of the response).
    pub fn close_streams(&self, session: &str) {
        if let Some(session) = self.shared.session(session) {
            let _ = session.tx.send(Frame::Close);
        }
    }

    /// Replaces the built-in agent (see [`ReplyFn`]).
    pub fn set_reply(&self, reply: impl Fn(&str) -> Option<Vec<Value>> + Send + Sync + 'static) {
        *self
            .shared
            .reply
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(Arc::new(reply));
    }

    /// Goes back to the built-in agent.
    pub fn clear_reply(&self) {
        *self
            .shared
            .reply
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = None;
    }

    /// The events of an ordinary turn that answers with `text`, for
    /// [`FakeClaude::set_reply`].
    pub fn turn(text: &str) -> Vec<Value> {
        agent::plain_turn(text)
    }

    /// Appends an event to the session's history and its live streams, as
    /// if the agent produced it (filling in `id` and `processed_at` when
    /// missing). Returns its id, or `None` for an unknown session.
    pub fn inject_event(&self, session: &str, event: Value) -> Option<String> {
        let session = self.shared.session(session)?;
        let mut log = lock(&session.log);
        let stored = self.shared.emit(&session, &mut log, event);
        stored["id"].as_str().map(str::to_owned)
    }

    /// Sends raw bytes to the session's live streams only (for frames a real
    /// server might send, such as `event: error` or frames without `event:`).
    pub fn inject_raw(&self, session: &str, frame: &str) {
        if let Some(session) = self.shared.session(session) {
            let _ = session
                .tx
                .send(Frame::Event(Bytes::copy_from_slice(frame.as_bytes())));
        }
    }

    /// Stops the server and closes every live stream.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.shared.shutdown.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    fn with_session<T>(&self, session: &str, f: impl FnOnce(&Log) -> T) -> Option<T> {
        let session = self.shared.session(session)?;
        let log = lock(&session.log);
        Some(f(&log))
    }
}

impl Drop for FakeClaude {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for FakeClaude {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeClaude")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A failure waiting to be served.
struct Failure {
    endpoint: Endpoint,
    status: u16,
    retry_after: Option<u32>,
    remaining: usize,
}

/// What the server and the handle share.
struct Shared {
    behaviour: FakeBehaviour,
    sessions: RwLock<HashMap<String, Arc<Session>>>,
    session_order: Mutex<Vec<String>>,
    requests: Mutex<Vec<ReceivedRequest>>,
    failures: Mutex<Vec<Failure>>,
    drop_after: Mutex<Option<usize>>,
    reply: RwLock<Option<ReplyFn>>,
    next_id: AtomicU64,
    id_prefix: String,
    shutdown: watch::Sender<bool>,
}

/// One fake session.
struct Session {
    /// The session object returned by create and retrieve, less status.
    resource: Value,
    log: Mutex<Log>,
    tx: broadcast::Sender<Frame>,
    /// Live streams that asked for deltas.
    delta_streams: AtomicUsize,
}

/// A message to a session's live streams.
#[derive(Clone)]
enum Frame {
    /// A complete SSE frame of a stored event (or raw injected bytes).
    Event(Bytes),
    /// An `event_start`/`event_delta` frame, only for streams that asked.
    Preview(Bytes),
    /// End the streams' responses.
    Close,
}

/// A session's history and agent state.
#[derive(Default)]
struct Log {
    events: Vec<StoredEvent>,
    user_texts: Vec<String>,
    status: &'static str,
    /// Actions the agent waits for, in the order it asked.
    pending: Vec<agent::Pending>,
    /// What the agent does once every pending action is answered.
    resume: Option<agent::Resume>,
    /// Close live streams after this many more events of the current turn.
    drop_after: Option<usize>,
    deleted: bool,
}

pub(super) struct StoredEvent {
    json: Bytes,
}

impl Shared {
    fn session(&self, id: &str) -> Option<Arc<Session>> {
        self.sessions
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .get(id)
            .cloned()
    }

    fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}_{}{n:010}", self.id_prefix)
    }

    /// Stores an event (filling `id` and `processed_at`), sends it to the
    /// live streams, and returns it.
    fn emit(&self, session: &Session, log: &mut Log, mut event: Value) -> Value {
        if let Value::Object(fields) = &mut event {
            if !fields.contains_key("id") {
                fields.insert("id".into(), Value::String(self.new_id("sevt")));
            }
            if !fields.contains_key("processed_at") {
                fields.insert("processed_at".into(), Value::String(now_rfc3339()));
            }
        }
        let json = serde_json::to_vec(&event).expect("serialize event");
        let kind = event["type"].as_str().unwrap_or("unknown");
        let frame = sse_frame(kind, &json);
        log.events.push(StoredEvent { json: json.into() });
        let _ = session.tx.send(Frame::Event(frame));
        if let Some(left) = log.drop_after.as_mut() {
            *left = left.saturating_sub(1);
            if *left == 0 {
                log.drop_after = None;
                let _ = session.tx.send(Frame::Close);
            }
        }
        event
    }

    /// Sends a preview frame to streams that asked for deltas.
    fn preview(&self, session: &Session, kind: &str, value: &Value) {
        let json = serde_json::to_vec(value).expect("serialize preview");
        let _ = session.tx.send(Frame::Preview(sse_frame(kind, &json)));
    }
}

/// `event: <kind>\ndata: <json>\n\n`
fn sse_frame(kind: &str, json: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(kind.len() + json.len() + 16);
    frame.extend_from_slice(b"event: ");
    frame.extend_from_slice(kind.as_bytes());
    frame.extend_from_slice(b"\ndata: ");
    frame.extend_from_slice(json);
    frame.extend_from_slice(b"\n\n");
    frame.into()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// The current UTC time as RFC 3339 with milliseconds.
fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_times_are_rfc3339_utc_with_milliseconds() {
        let now = now_rfc3339();
        assert_eq!(now.len(), "2026-03-01T00:00:00.000Z".len(), "{now}");
        assert!(now.ends_with('Z') && now.as_bytes()[10] == b'T', "{now}");
    }
}
