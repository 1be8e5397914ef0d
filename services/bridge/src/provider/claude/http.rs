//! The shared HTTP client: headers, retries and error mapping.
//!
//! Headers and the retry policy are the SDK's (`_client.py`,
//! `_base_client.py`): `Authorization: Bearer <key>`, `anthropic-version`,
//! `anthropic-beta: managed-agents-2026-04-01`, JSON accept/content type;
//! retries on connection errors, timeouts, 408, 409, 429 and 5xx (or as
//! `x-should-retry` says), waiting `retry-after-ms` / `retry-after` when
//! given, else an exponential backoff with jitter.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, Response, StatusCode, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::ClaudeConfig;
use crate::provider::{ProviderError, Result};

/// `anthropic-version` the SDK sends (`_constants.py`).
pub(super) const API_VERSION: &str = "2026-10-21";
/// Beta flag every sessions call carries (`resources/beta/sessions/*.py`).
pub(super) const BETA: &str = "managed-agents-2026-04-01";

const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
const ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");

/// Largest error body kept for a message.
const ERROR_BODY_LIMIT: usize = 512;

/// What a 404 means for a call.
#[derive(Debug, Clone, Copy)]
pub(super) enum Scope<'a> {
    /// A call on this session: 404 means the session is gone.
    Session(&'a str),
    /// A call on no particular session (creating one).
    Global,
}

/// One failed attempt, with what the retry loop needs to know.
struct Failure {
    error: ProviderError,
    retryable: bool,
    retry_after: Option<Duration>,
}

/// The shared client and the retry settings.
pub(super) struct Http {
    client: reqwest::Client,
    base: Url,
    request_timeout: Duration,
    max_retries: u32,
    retry_backoff: Duration,
    retry_max_backoff: Duration,
    max_retry_wait: Duration,
}

impl Http {
    pub(super) fn new(config: &ClaudeConfig) -> Result<Self> {
        let base = Url::parse(config.base_url.trim_end_matches('/'))
            .map_err(|err| ProviderError::Rejected(format!("invalid claude base url: {err}")))?;
        if base.cannot_be_a_base() {
            return Err(ProviderError::Rejected(
                "invalid claude base url: not a base".to_owned(),
            ));
        }

        let mut headers = HeaderMap::new();
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", config.api_key)).map_err(|_| {
                ProviderError::Rejected("claude api key contains invalid characters".to_owned())
            })?;
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
        headers.insert(ANTHROPIC_VERSION, HeaderValue::from_static(API_VERSION));
        headers.insert(ANTHROPIC_BETA, HeaderValue::from_static(BETA));
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));

        let client = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("harnessgate/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
            .tcp_nodelay(true)
            .tcp_keepalive(Some(Duration::from_secs(30)))
            // Every concurrent session keeps its event stream on a connection
            // of its own (HTTP/1.1) and sends its events on others: keep every
            // idle connection, so a busy moment does not end in a burst of
            // new connections.
            .pool_max_idle_per_host(usize::MAX)
            .pool_idle_timeout(Some(Duration::from_secs(90)))
            .build()
            .map_err(|err| ProviderError::Rejected(format!("build http client: {err}")))?;

        Ok(Http {
            client,
            base,
            request_timeout: config.request_timeout,
            max_retries: config.max_retries,
            retry_backoff: config.retry_backoff,
            retry_max_backoff: config.retry_max_backoff.max(config.retry_backoff),
            max_retry_wait: config.max_retry_wait,
        })
    }

    pub(super) fn base_url(&self) -> &str {
        self.base.as_str()
    }

    pub(super) fn max_retries(&self) -> u32 {
        self.max_retries
    }

    pub(super) fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The base URL with these path segments appended (each one escaped).
    pub(super) fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Sends a request, retrying transient failures like the SDK, and
    /// returns the successful response.
    pub(super) async fn send(
        &self,
        method: Method,
        url: Url,
        query: &[(&str, &str)],
        body: Option<Bytes>,
        scope: Scope<'_>,
    ) -> Result<Response> {
        self.send_with(method, url, query, body, scope, false, self.max_retries)
            .await
    }

    /// Opens a session's event stream (headers received, body unread).
    /// `retries` is how often a transient failure is retried.
    pub(super) async fn open_stream(
        &self,
        session_id: &str,
        deltas: bool,
        retries: u32,
    ) -> Result<Response> {
        let url = self.url(&["v1", "sessions", session_id, "events", "stream"]);
        let query: &[(&str, &str)] = if deltas {
            &[("event_deltas[]", "agent.message")]
        } else {
            &[]
        };
        self.send_with(
            Method::GET,
            url,
            query,
            None,
            Scope::Session(session_id),
            true,
            retries,
        )
        .await
    }

    /// One page of a session's history, oldest first.
    pub(super) async fn list_events(
        &self,
        session_id: &str,
        limit: &str,
        order: &str,
        page: Option<&str>,
    ) -> Result<Bytes> {
        let url = self.url(&["v1", "sessions", session_id, "events"]);
        let mut query = vec![("limit", limit), ("order", order)];
        if let Some(page) = page {
            query.push(("page", page));
        }
        let response = self
            .send(Method::GET, url, &query, None, Scope::Session(session_id))
            .await?;
        read_body(response, self.request_timeout).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_with(
        &self,
        method: Method,
        url: Url,
        query: &[(&str, &str)],
        body: Option<Bytes>,
        scope: Scope<'_>,
        streaming: bool,
        max_retries: u32,
    ) -> Result<Response> {
        let mut attempt: u32 = 0;
        loop {
            let failure = match self
                .attempt(
                    method.clone(),
                    url.clone(),
                    query,
                    body.clone(),
                    scope,
                    streaming,
                )
                .await
            {
                Ok(response) => return Ok(response),
                Err(failure) => failure,
            };
            if !failure.retryable || attempt >= max_retries {
                return Err(failure.error);
            }
            let wait = match failure.retry_after {
                Some(wait) if wait > self.max_retry_wait => {
                    tracing::debug!(
                        path = %url.path(),
                        wait_ms = wait.as_millis() as u64,
                        "retry-after longer than allowed, giving up"
                    );
                    return Err(failure.error);
                }
                Some(wait) if !wait.is_zero() => wait,
                _ => self.backoff(attempt),
            };
            tracing::debug!(
                method = %method,
                path = %url.path(),
                attempt = attempt + 1,
                wait_ms = wait.as_millis() as u64,
                error = %failure.error,
                "retrying claude request"
            );
            metrics::counter!("hg_bridge_claude_retries_total").increment(1);
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// The SDK's backoff: `initial * 2^attempt`, capped, times a jitter in
    /// `(0.75, 1]`.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .retry_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.retry_max_backoff);
        let jitter = 1.0 - 0.25 * rand::random::<f64>();
        base.mul_f64(jitter)
    }

    async fn attempt(
        &self,
        method: Method,
        url: Url,
        query: &[(&str, &str)],
        body: Option<Bytes>,
        scope: Scope<'_>,
        streaming: bool,
    ) -> std::result::Result<Response, Failure> {
        let mut request = self.client.request(method, url);
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let sent = if streaming {
            // The body of a stream lives as long as the session; only the
            // wait for the response headers is bounded.
            match tokio::time::timeout(self.request_timeout, request.send()).await {
                Ok(sent) => sent,
                Err(_) => {
                    return Err(Failure {
                        error: ProviderError::Unavailable(
                            "timed out waiting for the event stream".to_owned(),
                        ),
                        retryable: true,
                        retry_after: None,
                    });
                }
            }
        } else {
            request.timeout(self.request_timeout).send().await
        };
        let response = match sent {
            Ok(response) => response,
            Err(err) => {
                return Err(Failure {
                    error: ProviderError::Unavailable(describe(&err)),
                    retryable: true,
                    retry_after: None,
                });
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let headers = response.headers().clone();
        // A small error body is read so the connection can be reused and the
        // message reported; a body that does not arrive in time is dropped.
        let body = tokio::time::timeout(self.request_timeout, response.bytes())
            .await
            .ok()
            .and_then(|body| body.ok())
            .unwrap_or_default();
        Err(status_failure(status, &headers, &body, scope))
    }
}

/// Reads a whole response body within the request timeout.
pub(super) async fn read_body(response: Response, timeout: Duration) -> Result<Bytes> {
    match tokio::time::timeout(timeout, response.bytes()).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(err)) => Err(ProviderError::Unavailable(describe(&err))),
        Err(_) => Err(ProviderError::Unavailable(
            "timed out reading the response body".to_owned(),
        )),
    }
}

/// Reads and decodes a JSON response body.
pub(super) async fn read_json<T: DeserializeOwned>(
    response: Response,
    timeout: Duration,
) -> Result<T> {
    let body = read_body(response, timeout).await?;
    serde_json::from_slice(&body)
        .map_err(|err| ProviderError::Protocol(format!("decode response body: {err}")))
}

/// The API's error body: `{"type":"error","error":{"type","message"},"request_id"}`
/// (`types/shared/error_response.py`).
#[derive(Deserialize)]
struct ErrorResponse {
    error: ErrorObject,
    #[serde(default)]
    request_id: Option<String>,
}

#[derive(Deserialize)]
struct ErrorObject {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

/// A short description of an error body: `type: message (request_id)`, or
/// the start of the body when it is not the API's error shape.
pub(super) fn error_detail(status: StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(parsed) => match parsed.request_id {
            Some(request_id) => format!(
                "http {}: {}: {} (request {request_id})",
                status.as_u16(),
                parsed.error.kind,
                parsed.error.message
            ),
            None => format!(
                "http {}: {}: {}",
                status.as_u16(),
                parsed.error.kind,
                parsed.error.message
            ),
        },
        Err(_) if body.is_empty() => format!("http {status}"),
        Err(_) => {
            let end = body.len().min(ERROR_BODY_LIMIT);
            format!(
                "http {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&body[..end]).trim()
            )
        }
    }
}

/// Maps an error status to a [`ProviderError`] and decides whether the SDK
/// would retry it.
fn status_failure(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    scope: Scope<'_>,
) -> Failure {
    let retry_after = retry_after(headers);
    let code = status.as_u16();
    let retryable = match headers.get("x-should-retry").map(HeaderValue::as_bytes) {
        Some(b"true") => true,
        Some(b"false") => false,
        _ => matches!(code, 408 | 409 | 429) || status.is_server_error(),
    };
    let error = match code {
        429 => ProviderError::RateLimited { retry_after },
        401 | 403 => ProviderError::Unauthorized(error_detail(status, body)),
        404 => match scope {
            Scope::Session(id) => ProviderError::SessionNotFound(id.to_owned()),
            Scope::Global => ProviderError::Rejected(error_detail(status, body)),
        },
        408 => ProviderError::Unavailable(error_detail(status, body)),
        _ if status.is_server_error() => ProviderError::Unavailable(error_detail(status, body)),
        _ => ProviderError::Rejected(error_detail(status, body)),
    };
    Failure {
        error,
        retryable,
        retry_after,
    }
}

/// `retry-after-ms` (milliseconds) or `retry-after` (seconds, fractions
/// allowed), as the SDK reads them. The HTTP-date form is not read.
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds = |name: &str, scale: f64| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<f64>().ok())
            .filter(|value| value.is_finite() && *value >= 0.0)
            .map(|value| value / scale)
    };
    seconds("retry-after-ms", 1000.0)
        .or_else(|| seconds("retry-after", 1.0))
        .map(|secs| Duration::from_secs_f64(secs.min(4_294_967.0)))
}

/// A transport error with its causes, e.g. "error sending request for url
/// (…): connection refused".
pub(super) fn describe(err: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        headers.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(250)));
        headers.insert("retry-after-ms", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
    }

    #[test]
    fn error_detail_reads_the_api_shape() {
        let body = br#"{"type":"error","error":{"type":"not_found_error","message":"no such session"},"request_id":"req_1"}"#;
        assert_eq!(
            error_detail(StatusCode::NOT_FOUND, body),
            "http 404: not_found_error: no such session (request req_1)"
        );
        assert_eq!(
            error_detail(StatusCode::BAD_GATEWAY, b"upstream down"),
            "http 502: upstream down"
        );
    }

    #[test]
    fn statuses_map_like_the_sdk() {
        let headers = HeaderMap::new();
        let f = status_failure(StatusCode::CONFLICT, &headers, b"", Scope::Global);
        assert!(f.retryable);
        assert!(matches!(f.error, ProviderError::Rejected(_)));
        let f = status_failure(StatusCode::NOT_FOUND, &headers, b"", Scope::Session("s"));
        assert!(!f.retryable);
        assert!(matches!(f.error, ProviderError::SessionNotFound(ref id) if id == "s"));
        let mut headers = HeaderMap::new();
        headers.insert("x-should-retry", HeaderValue::from_static("false"));
        let f = status_failure(
            StatusCode::SERVICE_UNAVAILABLE,
            &headers,
            b"",
            Scope::Global,
        );
        assert!(!f.retryable);
        assert!(matches!(f.error, ProviderError::Unavailable(_)));
    }
}
