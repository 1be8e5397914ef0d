//! HTTP side of the fake: routing, the checks every request passes, and
//! the handlers.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::{
    Endpoint, Failure, Frame, Log, ReceivedRequest, Session, Shared, StoredEvent, agent, lock,
};

const BETA: &str = "managed-agents-2026-04-01";
const PING: &[u8] = b"event: ping\ndata: {\"type\":\"ping\"}\n\n";

/// Serves until the shutdown signal.
pub(super) async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let mut stop = shared.shutdown.subscribe();
    let app = Router::new()
        .route("/v1/sessions", post(create_session).get(list_sessions))
        .route(
            "/v1/sessions/{id}",
            get(retrieve_session).delete(delete_session),
        )
        .route(
            "/v1/sessions/{id}/events",
            get(list_events).post(send_events),
        )
        .route("/v1/sessions/{id}/events/stream", get(stream_events))
        .fallback(|| async { api_error(StatusCode::NOT_FOUND, "not_found_error", "not found") })
        .layer(middleware::from_fn_with_state(shared.clone(), gate))
        .with_state(shared);
    // Small SSE frames: without TCP_NODELAY each waits ~40 ms for an ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        })
        .await;
    if let Err(err) = result {
        tracing::warn!(error = %err, "fake claude server failed");
    }
}

/// An error in the API's shape:
/// `{"type":"error","error":{"type","message"},"request_id"}`.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    retry_after: Option<u32>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = format!("req_{}", uuid::Uuid::new_v4().simple());
        let body = json!({
            "type": "error",
            "error": {"type": self.kind, "message": self.message},
            "request_id": request_id,
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert("request-id", value);
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

fn api_error(status: StatusCode, kind: &'static str, message: &str) -> ApiError {
    ApiError {
        status,
        kind,
        message: message.to_owned(),
        retry_after: None,
    }
}

fn error_kind(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 | 504 => "timeout_error",
        409 => "conflict_error",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ if status >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

fn endpoint(method: &Method, path: &str) -> Option<Endpoint> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["v1", "sessions"]) => Some(Endpoint::CreateSession),
        ("GET", ["v1", "sessions", _]) => Some(Endpoint::RetrieveSession),
        ("DELETE", ["v1", "sessions", _]) => Some(Endpoint::Delete),
        ("POST", ["v1", "sessions", _, "events"]) => Some(Endpoint::SendEvents),
        ("GET", ["v1", "sessions", _, "events"]) => Some(Endpoint::List),
        ("GET", ["v1", "sessions", _, "events", "stream"]) => Some(Endpoint::Stream),
        _ => None,
    }
}

const RECORDED_HEADERS: [&str; 7] = [
    "authorization",
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
    "content-type",
    "accept",
    "user-agent",
];

/// Records the request, checks key, version and beta like the API, and
/// serves injected failures.
async fn gate(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if shared.behaviour.record_requests {
        let recorded = ReceivedRequest {
            method: request.method().to_string(),
            path: request.uri().path().to_owned(),
            query: request.uri().query().map(str::to_owned),
            headers: RECORDED_HEADERS
                .iter()
                .filter_map(|name| {
                    let value = headers.get(*name)?.to_str().ok()?;
                    Some(((*name).to_owned(), value.to_owned()))
                })
                .collect::<BTreeMap<_, _>>(),
        };
        lock(&shared.requests).push(recorded);
    }

    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let bearer = text("authorization").and_then(|value| value.strip_prefix("Bearer "));
    let key = text("x-api-key").or(bearer);
    match key {
        None => {
            return api_error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "x-api-key header is required",
            )
            .into_response();
        }
        Some(key) if key != super::FakeClaude::API_KEY => {
            return api_error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid x-api-key",
            )
            .into_response();
        }
        Some(_) => {}
    }
    if text("anthropic-version").is_none() {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        )
        .into_response();
    }
    let beta_ok = text("anthropic-beta")
        .is_some_and(|betas| betas.split(',').any(|beta| beta.trim() == BETA));
    if !beta_ok {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "this endpoint requires the anthropic-beta header managed-agents-2026-04-01",
        )
        .into_response();
    }

    if let Some(endpoint) = endpoint(request.method(), request.uri().path())
        && let Some((status, retry_after)) = take_failure(&shared, endpoint)
    {
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut error = api_error(code, error_kind(status), "injected failure");
        error.retry_after = retry_after;
        return error.into_response();
    }
    next.run(request).await
}

fn take_failure(shared: &Shared, endpoint: Endpoint) -> Option<(u16, Option<u32>)> {
    let mut failures = lock(&shared.failures);
    let index = failures.iter().position(|f| f.endpoint == endpoint)?;
    let failure: &mut Failure = &mut failures[index];
    failure.remaining -= 1;
    let served = (failure.status, failure.retry_after);
    if failure.remaining == 0 {
        failures.remove(index);
    }
    Some(served)
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| {
            api_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "request body is not a valid JSON object",
            )
        })
}

fn bad_request(message: &str) -> ApiError {
    api_error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn session_not_found(id: &str) -> ApiError {
    api_error(
        StatusCode::NOT_FOUND,
        "not_found_error",
        &format!("session {id} not found"),
    )
}

fn find(shared: &Shared, id: &str) -> Result<Arc<Session>, ApiError> {
    shared.session(id).ok_or_else(|| session_not_found(id))
}

fn session_json(session: &Session, log: &Log) -> Value {
    let mut value = session.resource.clone();
    value["status"] = Value::String(log.status.to_owned());
    value
}

async fn create_session(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let agent_id = match &body["agent"] {
        Value::String(id) => id.clone(),
        Value::Object(agent) => match agent.get("id").and_then(Value::as_str) {
            Some(id) => id.to_owned(),
            None => return Err(bad_request("agent.id: field required")),
        },
        _ => return Err(bad_request("agent: field required")),
    };
    let Some(environment_id) = body["environment_id"].as_str() else {
        return Err(bad_request("environment_id: field required"));
    };
    let metadata = match &body["metadata"] {
        Value::Null => json!({}),
        Value::Object(pairs) if pairs.len() <= 16 && pairs.values().all(Value::is_string) => {
            Value::Object(pairs.clone())
        }
        _ => return Err(bad_request("metadata: at most 16 string values")),
    };
    let id = shared.new_id("sesn");
    let now = super::now_rfc3339();
    let resource = json!({
        "id": id,
        "type": "session",
        "agent": {
            "type": "agent",
            "id": agent_id,
            "version": 1,
            "name": "fake agent",
            "model": {"id": "claude-fake"},
            "execution_identity": {"type": "agent"},
            "mcp_servers": [],
            "skills": [],
            "tools": [],
        },
        "archived_at": null,
        "created_at": now,
        "updated_at": now,
        "environment_id": environment_id,
        "metadata": metadata,
        "outcome_evaluations": [],
        "resources": [],
        "stats": {"active_seconds": 0.0, "duration_seconds": 0.0},
        "title": body["title"].clone(),
        "usage": {"input_tokens": 0, "output_tokens": 0},
        "vault_ids": [],
    });
    let (tx, _) = broadcast::channel(shared.behaviour.stream_buffer.max(16));
    let session = Arc::new(Session {
        resource,
        log: std::sync::Mutex::new(Log {
            status: "idle",
            ..Log::default()
        }),
        tx,
        delta_streams: AtomicUsize::new(0),
    });
    let value = session_json(&session, &lock(&session.log));
    shared
        .sessions
        .write()
        .unwrap_or_else(|poison| poison.into_inner())
        .insert(id.clone(), session);
    lock(&shared.session_order).push(id);
    Ok(axum::Json(value).into_response())
}

/// Cursor paging parameters as the list endpoints take them: `limit`
/// (1–1000, default 20), `order` (`asc`/`desc`), `page` (a cursor of
/// ours, `page_<offset>`).
struct Page {
    limit: usize,
    descending: bool,
    offset: usize,
}

impl Page {
    fn parse(params: &[(String, String)], descending: bool) -> Result<Page, ApiError> {
        let mut page = Page {
            limit: 20,
            descending,
            offset: 0,
        };
        for (name, value) in params {
            match name.as_str() {
                "limit" => match value.parse::<usize>() {
                    Ok(n) if (1..=1000).contains(&n) => page.limit = n,
                    _ => return Err(bad_request("limit: must be between 1 and 1000")),
                },
                "order" => match value.as_str() {
                    "asc" => page.descending = false,
                    "desc" => page.descending = true,
                    _ => return Err(bad_request("order: must be asc or desc")),
                },
                "page" => match value.strip_prefix("page_").and_then(|n| n.parse().ok()) {
                    Some(n) => page.offset = n,
                    None => return Err(bad_request("page: invalid cursor")),
                },
                _ => {}
            }
        }
        Ok(page)
    }
}

/// `GET /v1/sessions`: newest first by default, cursor pages
/// (`{"data","next_page","prev_page"}`), archived ones left out.
async fn list_sessions(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let Page {
        limit,
        descending,
        offset,
    } = Page::parse(&params, true)?;
    let mut ids: Vec<String> = lock(&shared.session_order).clone();
    if descending {
        ids.reverse();
    }
    let sessions: Vec<Value> = ids
        .iter()
        .filter_map(|id| shared.session(id))
        .map(|session| session_json(&session, &lock(&session.log)))
        .collect();
    let end = offset.saturating_add(limit).min(sessions.len());
    let page = sessions[offset.min(end)..end].to_vec();
    let next_page = (end < sessions.len()).then(|| format!("page_{end}"));
    let prev_page = (offset > 0).then(|| format!("page_{}", offset.saturating_sub(limit)));
    Ok(
        axum::Json(json!({"data": page, "next_page": next_page, "prev_page": prev_page}))
            .into_response(),
    )
}

async fn retrieve_session(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let session = find(&shared, &id)?;
    let value = session_json(&session, &lock(&session.log));
    Ok(axum::Json(value).into_response())
}

async fn delete_session(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let removed = shared
        .sessions
        .write()
        .unwrap_or_else(|poison| poison.into_inner())
        .remove(&id);
    let Some(session) = removed else {
        return Err(session_not_found(&id));
    };
    let mut log = lock(&session.log);
    log.deleted = true;
    // `session.deleted` is stream-only: it ends live streams, it is not history.
    let deleted = json!({
        "id": shared.new_id("sevt"),
        "type": "session.deleted",
        "processed_at": super::now_rfc3339(),
    });
    let json = serde_json::to_vec(&deleted).unwrap_or_default();
    let _ = session
        .tx
        .send(Frame::Event(super::sse_frame("session.deleted", &json)));
    let _ = session.tx.send(Frame::Close);
    Ok(axum::Json(json!({"id": id, "type": "session_deleted"})).into_response())
}

async fn send_events(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let Some(events) = body["events"]
        .as_array()
        .filter(|events| !events.is_empty())
    else {
        return Err(bad_request("events: a non-empty list is required"));
    };
    let session = find(&shared, &id)?;
    let mut log = lock(&session.log);
    if log.deleted {
        return Err(session_not_found(&id));
    }
    for event in events {
        if let Err(message) = agent::validate(&log, event) {
            return Err(bad_request(&message));
        }
    }
    let mut data = Vec::with_capacity(events.len());
    for event in events {
        if event["type"] == "user.message" {
            log.drop_after = lock(&shared.drop_after).take();
            if log.drop_after == Some(0) {
                log.drop_after = None;
                let _ = session.tx.send(Frame::Close);
            }
        }
        let stored = shared.emit(&session, &mut log, event.clone());
        agent::react(&shared, &session, &mut log, &stored);
        data.push(stored);
    }
    Ok(axum::Json(json!({"data": data})).into_response())
}

async fn list_events(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let Page {
        limit,
        descending,
        offset,
    } = Page::parse(&params, false)?;
    let types: Vec<&str> = params
        .iter()
        .filter(|(name, _)| name == "types[]")
        .map(|(_, value)| value.as_str())
        .collect();
    let session = find(&shared, &id)?;
    let log = lock(&session.log);
    let wanted: Vec<&StoredEvent> = log
        .events
        .iter()
        .filter(|event| {
            types.is_empty()
                || serde_json::from_slice::<Value>(&event.json)
                    .is_ok_and(|v| types.iter().any(|t| v["type"] == *t))
        })
        .collect();
    let total = wanted.len();
    let end = offset.saturating_add(limit).min(total);
    let start = offset.min(total);
    let mut body = Vec::with_capacity(64 + (end - start) * 256);
    body.extend_from_slice(b"{\"data\":[");
    for (n, position) in (start..end).enumerate() {
        let index = if descending {
            total - 1 - position
        } else {
            position
        };
        if n > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&wanted[index].json);
    }
    drop(log);
    body.extend_from_slice(b"],\"next_page\":");
    if end < total {
        body.extend_from_slice(format!("\"page_{end}\"").as_bytes());
    } else {
        body.extend_from_slice(b"null");
    }
    body.push(b'}');
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Counts a live stream that asked for deltas while it is open.
struct DeltaListener(Arc<Session>);

impl Drop for DeltaListener {
    fn drop(&mut self) {
        self.0.delta_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One live stream's state.
struct Connection {
    rx: broadcast::Receiver<Frame>,
    deltas: bool,
    ping: Option<tokio::time::Interval>,
    opened: bool,
    stop: watch::Receiver<bool>,
    _listener: Option<DeltaListener>,
}

impl Connection {
    async fn next(&mut self) -> Option<Bytes> {
        if !self.opened {
            self.opened = true;
            return Some(Bytes::from_static(PING));
        }
        loop {
            let ping = async {
                match self.ping.as_mut() {
                    Some(ping) => {
                        ping.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                frame = self.rx.recv() => match frame {
                    Ok(Frame::Event(bytes)) => return Some(bytes),
                    Ok(Frame::Preview(bytes)) => {
                        if self.deltas {
                            return Some(bytes);
                        }
                    }
                    Ok(Frame::Close) | Err(broadcast::error::RecvError::Closed) => return None,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "fake claude stream fell behind, closing it");
                        return None;
                    }
                },
                () = ping => return Some(Bytes::from_static(PING)),
                _ = self.stop.wait_for(|stopped| *stopped) => return None,
            }
        }
    }
}

async fn stream_events(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let session = find(&shared, &id)?;
    let deltas = params.iter().any(|(name, value)| {
        (name == "event_deltas[]" || name == "event_deltas") && value == "agent.message"
    });
    let rx = {
        let log = lock(&session.log);
        if log.deleted {
            return Err(session_not_found(&id));
        }
        session.tx.subscribe()
    };
    let listener = deltas.then(|| {
        session.delta_streams.fetch_add(1, Ordering::Relaxed);
        DeltaListener(session.clone())
    });
    let ping = shared.behaviour.ping_interval.map(|period| {
        let period = period.max(Duration::from_millis(1));
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    let connection = Connection {
        rx,
        deltas,
        ping,
        opened: false,
        stop: shared.shutdown.subscribe(),
        _listener: listener,
    };
    let body = futures::stream::unfold(connection, |mut connection| async move {
        let bytes = connection.next().await?;
        Some((Ok::<_, Infallible>(bytes), connection))
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok((headers, Body::from_stream(body)).into_response())
}
