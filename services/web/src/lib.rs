//! The built-in web chat: its ingress and egress are one HTTP server.
//!
//! - `GET /` serves the chat page; `GET /openapi.yaml` the API description.
//! - `POST /api/v1/sessions` issues a signed user token.
//! - `POST /api/v1/messages` publishes the user's message to `hg.in.web.<app>`.
//! - `GET /api/v1/events` streams replies and typing over SSE, replaying
//!   what a reconnecting browser missed (`Last-Event-ID`).
//! - `GET /api/v1/ws` carries the chat both ways over one WebSocket: the
//!   same events as the SSE stream, and the user's messages (each answered
//!   `accepted` or with the error a POST would get). An idle WebSocket holds
//!   about a sixth of the memory of an idle SSE response.
//! - `/healthz`, `/readyz`, `/metrics`.
//!
//! The web egress consumes `hg.out.web.>` through the shared pipeline and
//! stores each part in a stream every web replica follows (see [`hub`]).

pub mod auth;
pub mod hub;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::{
    Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use futures::Stream;
use hg_bus::{Bus, BusError};
use hg_egress::{DeliveryError, EgressConfig, Part, Platform};
use hg_proto::{
    ButtonPress, ChatType, InboundMessage, OutboundKind, OutboundMessage, Sender, subject,
};
use hg_service::Health;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::{AuthError, Authenticator};
use crate::hub::{Hub, WebButton, WebEvent};

/// Platform name of the web chat on the bus.
pub const PLATFORM: &str = "web";

const PAGE: &str = include_str!("../assets/index.html");
const OPENAPI: &str = include_str!("../../../docs/openapi.yaml");

/// Web chat settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Address the HTTP server binds.
    pub listen: String,
    /// App id of this web chat on the bus (`hg.in.web.<app_id>`).
    pub app_id: String,
    /// Key that signs user tokens. Unset: a random key is generated once and
    /// shared by all replicas through NATS KV.
    pub token_secret: Option<String>,
    /// Lifetime of issued tokens.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Whether anyone may get a token from `POST /api/v1/sessions`. When
    /// false only `static_tokens` work.
    pub allow_signup: bool,
    /// Operator-issued tokens: token → user id.
    pub static_tokens: BTreeMap<String, String>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Longest message text accepted, in characters.
    pub max_message_chars: usize,
    /// How long replies are kept for reconnecting browsers.
    #[serde(with = "humantime_serde")]
    pub history_max_age: Duration,
    pub egress: EgressConfig,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            listen: "0.0.0.0:8080".into(),
            app_id: "default".into(),
            token_secret: None,
            token_ttl: Duration::from_secs(30 * 24 * 3600),
            allow_signup: true,
            static_tokens: BTreeMap::new(),
            max_body_bytes: 64 * 1024,
            max_message_chars: 16_000,
            history_max_age: Duration::from_secs(24 * 3600),
            egress: EgressConfig::default(),
        }
    }
}

/// Errors that stop the web service.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Egress(#[from] hg_egress::EgressError),
    #[error("http server failed: {0}")]
    Serve(String),
}

struct AppState {
    config: WebConfig,
    bus: Bus,
    auth: Authenticator,
    hub: Arc<Hub>,
    meta: Option<async_nats::jetstream::kv::Store>,
    health: Health,
    /// Fires when the service stops: WebSocket connections (which the HTTP
    /// server no longer tracks once upgraded) close on it.
    shutdown: CancellationToken,
}

/// Runs the web chat on `listener` until `shutdown` fires.
pub async fn run(
    config: WebConfig,
    bus: Bus,
    listener: tokio::net::TcpListener,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), WebError> {
    hub::ensure_stream(&bus, config.history_max_age).await?;
    let meta = bus
        .kv(hg_bus::kv_config("hg_meta", "facts components share"))
        .await?;
    let key = match &config.token_secret {
        Some(secret) => secret.as_bytes().to_vec(),
        None => shared_token_key(&meta).await?,
    };
    let auth = Authenticator::new(key, config.token_ttl, config.static_tokens.clone());
    let hub = Arc::new(Hub::default());
    let state = Arc::new(AppState {
        config: config.clone(),
        bus: bus.clone(),
        auth,
        hub: Arc::clone(&hub),
        meta: Some(meta),
        health: health.clone(),
        shutdown: shutdown.clone(),
    });
    let tracker = TaskTracker::new();
    let follower_stop = shutdown.clone();
    let follower_bus = bus.clone();
    tracker.spawn(async move { hub.follow(follower_bus, follower_stop).await });
    let egress_bus = bus.clone();
    let egress_stop = shutdown.clone();
    let platform = Arc::new(WebPlatform { bus: bus.clone() });
    let egress_config = config.egress.clone();
    let egress = tracker.spawn(async move {
        hg_egress::run_elected(
            egress_bus,
            platform,
            egress_config,
            hg_egress::Election::for_platform(PLATFORM),
            egress_stop,
        )
        .await
    });
    let addr = listener.local_addr().ok();
    tracing::info!(addr = ?addr, app = %config.app_id, "web chat listening");
    health.set_ready(true);
    // Replies are small writes: without TCP_NODELAY Nagle's algorithm and
    // delayed ACKs add ~40 ms to each.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, router(state))
        .with_graceful_shutdown({
            let shutdown = shutdown.clone();
            async move { shutdown.cancelled().await }
        })
        .await;
    health.set_ready(false);
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    server.map_err(|e| WebError::Serve(e.to_string()))?;
    match egress.await {
        Ok(result) => result.map_err(WebError::from),
        Err(e) => Err(WebError::Serve(format!("egress task failed: {e}"))),
    }
}

/// The token-signing key all replicas share: created once in KV.
async fn shared_token_key(meta: &async_nats::jetstream::kv::Store) -> Result<Vec<u8>, BusError> {
    const KEY: &str = "web.token_key";
    let kv_error = |e: &dyn std::fmt::Display| BusError::Kv {
        bucket: "hg_meta".into(),
        reason: e.to_string(),
    };
    let fresh = Authenticator::random_key();
    // The first replica creates the key, the others read it. A create that
    // fails otherwise (a timeout under load) may or may not have stored the
    // key: try again until one of the two answers.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let failure = match meta.create(KEY, fresh.clone().into()).await {
            Ok(_) => return Ok(fresh),
            Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
                match meta.get(KEY).await {
                    Ok(Some(key)) => return Ok(key.to_vec()),
                    Ok(None) => "the key was deleted meanwhile".to_owned(),
                    Err(e) => e.to_string(),
                }
            }
            Err(e) => e.to_string(),
        };
        if attempt >= 10 {
            return Err(kv_error(&failure));
        }
        tracing::warn!(attempt, reason = %failure, "cannot set up the token key yet, retrying");
        tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
    }
}

fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    let admin = hg_service::admin_router(state.health.clone());
    Router::new()
        .route("/", get(page))
        .route("/openapi.yaml", get(openapi))
        .route("/api/v1/info", get(info))
        .route("/api/v1/sessions", post(create_session))
        .route("/api/v1/messages", post(send_message))
        .route("/api/v1/events", get(events))
        .route("/api/v1/ws", get(websocket))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
        .merge(admin)
}

/// A JSON error: `{"error":{"code","message"}}`.
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// `{"code","message"}`: the `error` of an HTTP error body or of a
    /// socket's error frame.
    fn detail(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code, "message": self.message})
    }

    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.detail()});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

#[derive(Serialize)]
struct Info {
    app_id: String,
    runtime: String,
    /// True when replies come from the echo runtime (wiring check only).
    echo: bool,
    signup: bool,
}

async fn info(State(state): State<Arc<AppState>>) -> axum::Json<Info> {
    let runtime = match &state.meta {
        Some(meta) => meta
            .get("bridge.default_runtime")
            .await
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default(),
        None => String::new(),
    };
    axum::Json(Info {
        app_id: state.config.app_id.clone(),
        echo: runtime == "echo",
        runtime,
        signup: state.config.allow_signup,
    })
}

async fn create_session(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    if !state.config.allow_signup {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "signup_disabled",
            "this chat only accepts operator-issued tokens",
        ));
    }
    let issued = state.auth.issue();
    Ok((StatusCode::CREATED, axum::Json(issued)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    /// The message; with `action` it is the pressed button's label.
    #[serde(default)]
    text: String,
    /// A button press (approval buttons and the like).
    #[serde(default)]
    action: Option<SendAction>,
    /// Client-chosen id; a retried POST with the same id is answered once.
    #[serde(default)]
    client_message_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendAction {
    action_id: String,
    #[serde(default)]
    value: String,
}

/// Longest accepted button action id or value, in bytes.
const MAX_ACTION_BYTES: usize = 256;

#[derive(Serialize)]
struct Accepted {
    id: String,
}

async fn send_message(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let user = state.auth.verify(bearer(&headers).unwrap_or_default())?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(state.config.max_body_bytes)
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
        }
    })?;
    let id = accept(&state, &user, &body).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(Accepted { id })).into_response())
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body exceeds {limit} bytes"),
    )
}

/// Checks a message body (`{"text", "action", "client_message_id"}`, from
/// `POST /api/v1/messages` or a socket frame) and publishes it as `user`'s
/// inbound message. Returns the message id once the bus has stored it.
async fn accept(state: &AppState, user: &str, body: &[u8]) -> Result<String, ApiError> {
    let body: SendBody = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("body must be {{\"text\": string}}: {e}"),
        )
    })?;
    if let Some(action) = &body.action
        && (action.action_id.is_empty()
            || action.action_id.len() > MAX_ACTION_BYTES
            || action.value.len() > MAX_ACTION_BYTES)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_action",
            format!(
                "action.action_id must be 1-{MAX_ACTION_BYTES} bytes and action.value at most {MAX_ACTION_BYTES}"
            ),
        ));
    }
    if body.text.trim().is_empty() && body.action.is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_message",
            "text is empty",
        ));
    }
    let chars = body.text.chars().count();
    if chars > state.config.max_message_chars {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_long",
            format!(
                "text has {chars} characters; the limit is {}",
                state.config.max_message_chars
            ),
        ));
    }
    let id = match body.client_message_id {
        Some(id) if valid_client_id(&id) => id,
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_client_message_id",
                "client_message_id must be 1-64 characters of A-Z a-z 0-9 _ -",
            ));
        }
        None => uuid::Uuid::now_v7().simple().to_string(),
    };
    let app = &state.config.app_id;
    let inbound = InboundMessage {
        id: format!("{user}:{id}"),
        platform: PLATFORM.into(),
        app_id: app.clone(),
        channel_id: user.to_owned(),
        chat_type: ChatType::Direct as i32,
        sender: Some(Sender {
            id: user.to_owned(),
            ..Default::default()
        }),
        text: body.text,
        button_press: body.action.map(|a| ButtonPress {
            action_id: a.action_id,
            value: a.value,
            message_id: String::new(),
        }),
        timestamp_ms: hg_proto::now_ms(),
        ..Default::default()
    };
    let msg_id = format!("web:{}:{}", app, inbound.id);
    // The trace of this message starts here and follows it over the bus.
    let span = tracing::info_span!("web.inbound", user = %user, inbound = %inbound.id);
    state
        .bus
        .publish(&subject::inbound(PLATFORM, app), &inbound, Some(&msg_id))
        .instrument(span)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "cannot publish inbound message");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus_unavailable",
                "the message could not be queued; try again",
            )
        })?;
    metrics::counter!("hg_web_messages_total").increment(1);
    Ok(id)
}

fn valid_client_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Deserialize)]
struct EventsQuery {
    /// For EventSource, which cannot send headers.
    token: Option<String>,
    /// Replay what came after this event id (0 = everything kept).
    last_event_id: Option<u64>,
}

async fn events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let user = state.auth.verify(&stream_token(&headers, query.token))?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or(query.last_event_id);
    let app = state.config.app_id.clone();
    let stream = async_stream(state, app, user, after);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// How often an idle event connection is pinged (SSE comment or WebSocket
/// ping), so proxies keep it and dead peers are noticed.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Initial WebSocket read buffer. Clients send short messages, pongs and
/// close frames, so a small buffer (grown on demand) keeps idle
/// connections cheap; tungstenite's default is 128 KiB each.
const WS_READ_BUFFER: usize = 512;

/// `GET /api/v1/ws`: the chat over one WebSocket. Server to client: the
/// events of `/api/v1/events` as text frames, one JSON [`WebEvent`] each
/// (`seq` is its event id; reconnect with `last_event_id` to get what was
/// missed), after a first `{"kind":"ready"}`. Client to server: a text
/// frame with the body of `POST /api/v1/messages`, answered in order by
/// `{"kind":"accepted","id"}` once the message is stored on the bus, or by
/// `{"kind":"error","status","error":{"code","message"}}` with the status
/// and error the POST would have had. Authenticated like the SSE stream,
/// before upgrading.
async fn websocket(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let user = state.auth.verify(&stream_token(&headers, query.token))?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(
            e.status(),
            "websocket_required",
            format!("{e}: this endpoint speaks WebSocket (use /api/v1/events for SSE)"),
        )
    })?;
    let after = query.last_event_id;
    let app = state.config.app_id.clone();
    // Frames up to twice the body limit are read and refused with a JSON
    // error, like an oversize POST; a larger one closes the socket (1009).
    let frame_limit = state.config.max_body_bytes.saturating_mul(2).max(4096);
    Ok(upgrade
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(frame_limit)
        .max_frame_size(frame_limit)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| websocket_connection(state, app, user, after, socket)))
}

/// One chat socket: register for live events first, then replay what was
/// missed, then forward live events not already replayed and take the
/// client's messages, until the client goes or the service stops.
async fn websocket_connection(
    state: Arc<AppState>,
    app: String,
    user: String,
    after: Option<u64>,
    socket: WebSocket,
) {
    use futures::{SinkExt as _, StreamExt as _};
    let mut owned = OwnedConnection::new(Arc::clone(&state.hub), &app, &user);
    let (mut sink, mut incoming) = socket.split();
    let replayed = missed(&state, &app, &user, after).await;
    let mut high = replayed.last().map(|e| e.seq).or(after).unwrap_or(0);
    let backlog = std::iter::once(r#"{"kind":"ready"}"#.to_owned())
        .chain(replayed.iter().map(event_json))
        .map(|text| Ok(Message::Text(text.into())));
    if sink
        .send_all(&mut futures::stream::iter(backlog))
        .await
        .is_err()
    {
        return;
    }
    drop(replayed);
    let mut keep_alive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    loop {
        let frame = tokio::select! {
            event = owned.recv() => match event {
                Some(event) if unseen(&event, &mut high) => Message::Text(event_json(&event).into()),
                Some(_) => continue,
                // Dropped by the hub as too slow: the client reconnects
                // with its last event id.
                None => break,
            },
            // A message is published before the next frame is read, so a
            // client's messages keep their order. Pings are answered by
            // the library.
            received = incoming.next() => match received {
                // Boxed: inline, the publish's future would size every
                // idle connection's task (+2 KiB each).
                Some(Ok(Message::Text(text))) => Message::Text(
                    Box::pin(accept_frame(&state, &user, text.as_bytes()))
                        .await
                        .into(),
                ),
                Some(Ok(Message::Binary(_))) => Message::Text(
                    error_frame(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "text_frames_only",
                        "send messages as text frames of JSON",
                    ))
                    .into(),
                ),
                Some(Ok(Message::Close(_))) | None => return,
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "websocket read failed");
                    let (code, reason) = if e.to_string().contains("too long") {
                        (axum::extract::ws::close_code::SIZE, "message too big")
                    } else {
                        (axum::extract::ws::close_code::PROTOCOL, "protocol error")
                    };
                    let _ = sink
                        .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                            code,
                            reason: reason.into(),
                        })))
                        .await;
                    return;
                }
            },
            _ = keep_alive.tick() => Message::Ping(Bytes::new()),
            () = state.shutdown.cancelled() => break,
        };
        if sink.send(frame).await.is_err() {
            return;
        }
    }
    let _ = sink
        .send(Message::Close(Some(axum::extract::ws::CloseFrame {
            code: axum::extract::ws::close_code::AWAY,
            reason: "going away; reconnect".into(),
        })))
        .await;
}

/// The answer to a message sent on the socket: `accepted` with its id, or
/// the error a POST would have had.
async fn accept_frame(state: &AppState, user: &str, body: &[u8]) -> String {
    if body.len() > state.config.max_body_bytes {
        return error_frame(too_large(state.config.max_body_bytes));
    }
    match accept(state, user, body).await {
        Ok(id) => serde_json::json!({"kind": "accepted", "id": id}).to_string(),
        Err(e) => error_frame(e),
    }
}

fn error_frame(e: ApiError) -> String {
    serde_json::json!({
        "kind": "error",
        "status": e.status.as_u16(),
        "error": e.detail(),
    })
    .to_string()
}

/// An event as the JSON both streams carry.
fn event_json(event: &WebEvent) -> String {
    serde_json::to_string(event).unwrap_or_else(|_| "{}".into())
}

/// Whether a live event still has to be sent: one the replay already
/// delivered (sequence at or below `high`) is skipped. `high` follows what
/// was sent; typing indicators (sequence 0) always pass.
fn unseen(event: &WebEvent, high: &mut u64) -> bool {
    if event.seq != 0 && event.seq <= *high {
        return false;
    }
    *high = (*high).max(event.seq);
    true
}

/// The SSE stream of one connection: register for live events first, then
/// replay what was missed, then forward live events not already replayed.
fn async_stream(
    state: Arc<AppState>,
    app: String,
    user: String,
    after: Option<u64>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async move {
        let hub = Arc::clone(&state.hub);
        let owned = OwnedConnection::new(hub, &app, &user);
        let replayed = missed(&state, &app, &user, after).await;
        let high_water = replayed.last().map(|e| e.seq).or(after).unwrap_or(0);
        let ready = Event::default().event("ready").data("{}");
        let backlog = futures::stream::iter(
            std::iter::once(ready)
                .chain(replayed.iter().map(to_sse))
                .map(Ok)
                .collect::<Vec<_>>(),
        );
        let live =
            futures::stream::unfold((owned, high_water), |(mut owned, mut high)| async move {
                loop {
                    let event = owned.recv().await?;
                    if unseen(&event, &mut high) {
                        return Some((Ok(to_sse(&event)), (owned, high)));
                    }
                }
            });
        futures::StreamExt::chain(backlog, live)
    }
    .flatten_stream()
}

use futures::FutureExt as _;

/// What `user` missed after event `after` (nothing to replay without one).
/// The replay's JetStream future is large: boxed, it does not size the
/// stream or task that every connection keeps for its whole life.
async fn missed(state: &AppState, app: &str, user: &str, after: Option<u64>) -> Vec<WebEvent> {
    let Some(after) = after else {
        return Vec::new();
    };
    match Box::pin(hub::replay(&state.bus, app, user, after)).await {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!(error = %e, "cannot replay missed replies");
            Vec::new()
        }
    }
}

/// The token of an event stream request: the Authorization header, else
/// the `token` query parameter (browsers cannot set headers on
/// EventSource or WebSocket).
fn stream_token(headers: &HeaderMap, query_token: Option<String>) -> String {
    bearer(headers)
        .map(str::to_owned)
        .or(query_token)
        .unwrap_or_default()
}

/// A hub connection that owns its hub handle, so it can live in a stream.
struct OwnedConnection {
    rx: tokio::sync::mpsc::Receiver<Arc<WebEvent>>,
    _guard: ConnectionGuard,
}

struct ConnectionGuard {
    hub: Arc<Hub>,
    app: String,
    user: String,
    id: u64,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.hub.disconnect(&self.app, &self.user, self.id);
    }
}

impl OwnedConnection {
    fn new(hub: Arc<Hub>, app: &str, user: &str) -> Self {
        let (id, rx) = hub.register(app, user);
        OwnedConnection {
            rx,
            _guard: ConnectionGuard {
                hub,
                app: app.to_owned(),
                user: user.to_owned(),
                id,
            },
        }
    }

    async fn recv(&mut self) -> Option<Arc<WebEvent>> {
        self.rx.recv().await
    }
}

fn to_sse(event: &WebEvent) -> Event {
    let data = event_json(event);
    let sse = Event::default().event(event.kind.as_str()).data(data);
    if event.seq != 0 {
        sse.id(event.seq.to_string())
    } else {
        sse
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The web chat as an egress platform: a part is "delivered" once it is
/// stored in the delivery stream every web replica follows.
struct WebPlatform {
    bus: Bus,
}

#[async_trait]
impl Platform for WebPlatform {
    fn name(&self) -> &str {
        PLATFORM
    }

    fn limit(&self) -> hg_text::Limit {
        hg_text::Limit::WEB
    }

    async fn send(
        &self,
        message: &OutboundMessage,
        part: Part<'_>,
    ) -> Result<String, DeliveryError> {
        let kind = match message.kind() {
            OutboundKind::ApprovalRequest => "approval_request",
            OutboundKind::Status => "status",
            OutboundKind::Edit => "edit",
            _ => "reply",
        };
        let event = WebEvent {
            seq: 0,
            kind: kind.into(),
            text: part.text.to_owned(),
            html: hg_text::render_html(part.text),
            outbound_id: if message.kind() == OutboundKind::Edit {
                message.edit_of.clone()
            } else {
                message.id.clone()
            },
            turn_id: message.turn_id.clone(),
            part: part.index as u32,
            parts: part.count as u32,
            buttons: part
                .buttons
                .iter()
                .map(|b| WebButton {
                    action_id: b.action_id.clone(),
                    label: b.label.clone(),
                    value: b.value.clone(),
                })
                .collect(),
            typing: None,
            timestamp_ms: message.timestamp_ms,
        };
        let payload =
            serde_json::to_vec(&event).map_err(|e| DeliveryError::Permanent(e.to_string()))?;
        let subject = hub::delivery_subject(&message.app_id, &message.channel_id);
        let msg_id = format!("{}:{}", message.id, part.index);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id.as_str());
        let stored = self
            .bus
            .store(&subject, Some(headers), payload.into())
            .await
            .map_err(transient)?;
        Ok(stored.sequence.to_string())
    }

    async fn typing(&self, message: &OutboundMessage, on: bool) -> Result<(), DeliveryError> {
        let event = WebEvent {
            seq: 0,
            kind: "typing".into(),
            text: String::new(),
            html: String::new(),
            outbound_id: String::new(),
            turn_id: message.turn_id.clone(),
            part: 0,
            parts: 0,
            buttons: Vec::new(),
            typing: Some(on),
            timestamp_ms: message.timestamp_ms,
        };
        let payload =
            serde_json::to_vec(&event).map_err(|e| DeliveryError::Permanent(e.to_string()))?;
        self.bus
            .client()
            .publish(
                hub::typing_subject(&message.app_id, &message.channel_id),
                payload.into(),
            )
            .await
            .map_err(transient)
    }
}

fn transient(e: impl std::fmt::Display) -> DeliveryError {
    DeliveryError::Transient {
        reason: e.to_string(),
        retry_after: None,
    }
}
