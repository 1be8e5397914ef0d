//! Claude Managed Agents over HTTP and server-sent events.
//!
//! Every wire shape here follows the official `anthropic` Python SDK 2.12.0
//! (`resources/beta/sessions/`, `types/beta/sessions/`, `_streaming.py`,
//! `_base_client.py`): the same headers, the same request bodies, the same
//! retry policy, and the same reading of the event stream (pings skipped,
//! `event: error` raised, frames without an `event:` line dropped).
//!
//! One [`reqwest::Client`] is shared by every session, so hundreds of
//! concurrent sessions reuse one connection pool and one TLS config.
//!
//! Each session in use has one live event stream, shared by every
//! [`Provider::event_stream`] of that session (see `stream.rs`): the turns
//! of a conversation reuse the connection instead of opening one each, and
//! it closes after [`ClaudeConfig::stream_linger`] without a reader. The
//! shared stream is built like the SDK's session runner
//! (`lib/tools/_beta_session_runner.py`): when the connection drops it
//! reconnects with backoff, lists the history to catch up from the last
//! event it delivered, and deduplicates the overlap by event id, so a
//! caller sees every event once and in order.

mod http;
mod sse;
mod stream;
mod wire;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use self::http::{Http, Scope};
use super::{
    Capabilities, EventStream, Provider, ProviderError, Result, SessionInfo, SessionSpec,
    ToolDecision, ToolOutput, UserMessage,
};

/// Settings of the Claude Managed Agents provider.
///
/// Every field has a default, so a config file only names what it changes;
/// durations are written like `"30s"` or `"500ms"`.
#[derive(Clone, Deserialize)]
#[serde(default)]
pub struct ClaudeConfig {
    /// API key, sent as `Authorization: Bearer <key>` like the SDK does.
    /// Never logged: `Debug` prints it redacted.
    pub api_key: String,
    /// API origin, without the `/v1` path.
    pub base_url: String,
    /// Limit for one non-streaming request, and for an event stream to
    /// return its response headers.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often a failed request is retried (timeouts, connection errors,
    /// 408, 409, 429 and 5xx), as the SDK does.
    pub max_retries: u32,
    /// First retry delay when the server gives no `retry-after`; doubles per
    /// attempt up to [`ClaudeConfig::retry_max_backoff`].
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest delay between two retries without `retry-after`.
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// Longest `retry-after` honoured inside a call; a longer one ends the
    /// call with [`ProviderError::RateLimited`] so the caller can decide.
    #[serde(with = "humantime_serde")]
    pub max_retry_wait: Duration,
    /// Ask the stream for partial agent text (`event_deltas[]=agent.message`).
    pub stream_deltas: bool,
    /// First delay before an event stream reconnects; doubles per failure.
    #[serde(with = "humantime_serde")]
    pub reconnect_backoff: Duration,
    /// Longest delay between two reconnect attempts.
    #[serde(with = "humantime_serde")]
    pub reconnect_max_backoff: Duration,
    /// Consecutive failed reconnect attempts after which the stream yields
    /// [`ProviderError::Unavailable`] and ends.
    pub reconnect_attempts: u32,
    /// A stream that delivers nothing (not even a ping) for this long is
    /// considered dead and reconnected.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// How long a session's event stream stays connected after its last
    /// reader went away, so the next turn reuses it instead of connecting
    /// again. Zero closes it at once.
    #[serde(with = "humantime_serde")]
    pub stream_linger: Duration,
    /// Recent events kept per connected session (at least 16): a reader that
    /// falls this far behind, or resumes after an event no longer kept,
    /// catches up from the history instead of memory.
    pub stream_replay_events: usize,
}

impl Default for ClaudeConfig {
    fn default() -> Self {
        ClaudeConfig {
            api_key: String::new(),
            base_url: "https://api.anthropic.com".to_owned(),
            request_timeout: Duration::from_secs(60),
            max_retries: 2,
            retry_backoff: Duration::from_millis(500),
            retry_max_backoff: Duration::from_secs(8),
            max_retry_wait: Duration::from_secs(60),
            stream_deltas: false,
            reconnect_backoff: Duration::from_millis(100),
            reconnect_max_backoff: Duration::from_secs(5),
            reconnect_attempts: 10,
            stream_idle_timeout: Duration::from_secs(300),
            stream_linger: Duration::from_secs(30),
            stream_replay_events: 64,
        }
    }
}

impl fmt::Debug for ClaudeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let api_key = if self.api_key.is_empty() {
            "<empty>"
        } else {
            "<redacted>"
        };
        f.debug_struct("ClaudeConfig")
            .field("api_key", &api_key)
            .field("base_url", &self.base_url)
            .field("request_timeout", &self.request_timeout)
            .field("max_retries", &self.max_retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("retry_max_backoff", &self.retry_max_backoff)
            .field("max_retry_wait", &self.max_retry_wait)
            .field("stream_deltas", &self.stream_deltas)
            .field("reconnect_backoff", &self.reconnect_backoff)
            .field("reconnect_max_backoff", &self.reconnect_max_backoff)
            .field("reconnect_attempts", &self.reconnect_attempts)
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .field("stream_linger", &self.stream_linger)
            .field("stream_replay_events", &self.stream_replay_events)
            .finish()
    }
}

/// A [`Provider`] for Claude Managed Agents (`/v1/sessions`, beta
/// `managed-agents-2026-04-01`).
#[derive(Clone)]
pub struct ClaudeProvider {
    http: Arc<Http>,
    stream: stream::StreamOptions,
    /// The sessions' shared event streams; they stop when the last clone
    /// of the provider is dropped.
    feeds: Arc<stream::Feeds>,
}

impl fmt::Debug for ClaudeProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaudeProvider")
            .field("base_url", &self.http.base_url())
            .finish_non_exhaustive()
    }
}

impl ClaudeProvider {
    /// Builds the provider and its shared HTTP client.
    ///
    /// # Errors
    /// [`ProviderError::Rejected`] when the base URL does not parse or the
    /// API key cannot be sent as a header.
    pub fn new(config: ClaudeConfig) -> Result<Self> {
        let http = Arc::new(Http::new(&config)?);
        let options = stream::StreamOptions {
            deltas: config.stream_deltas,
            idle_timeout: config.stream_idle_timeout,
            reconnect_backoff: config.reconnect_backoff,
            reconnect_max_backoff: config.reconnect_max_backoff.max(config.reconnect_backoff),
            reconnect_attempts: config.reconnect_attempts.max(1),
            linger: config.stream_linger,
            replay_events: config.stream_replay_events.max(stream::MIN_REPLAY_EVENTS),
        };
        Ok(ClaudeProvider {
            feeds: stream::Feeds::new(http.clone(), options),
            http,
            stream: options,
        })
    }

    async fn send_events(&self, session_id: &str, events: &[wire::OutEvent<'_>]) -> Result<String> {
        let body = serde_json::to_vec(&wire::SendEvents { events })
            .map_err(|err| ProviderError::Protocol(format!("encode events: {err}")))?;
        let url = self.http.url(&["v1", "sessions", session_id, "events"]);
        let sending = self.feeds.sending(session_id);
        let response = self
            .http
            .send(
                reqwest::Method::POST,
                url,
                &[],
                Some(body.into()),
                Scope::Session(session_id),
            )
            .await?;
        let sent: wire::SentEvents = http::read_json(response, self.http.request_timeout()).await?;
        let id = sent
            .data
            .and_then(|data| data.into_iter().next())
            .map(|event| event.id)
            .ok_or_else(|| {
                ProviderError::Protocol("send events response has no event".to_owned())
            })?;
        if let Some(sending) = sending {
            sending.sent(&id);
        }
        Ok(id)
    }
}

#[async_trait]
impl Provider for ClaudeProvider {
    fn name(&self) -> &'static str {
        "claude"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            streaming_deltas: self.stream.deltas,
            tool_confirmation: true,
            custom_tools: true,
            interrupt: true,
            list_sessions: true,
            ..Capabilities::default()
        }
    }

    async fn list_sessions(&self, offset: usize, limit: usize) -> Result<Vec<SessionInfo>> {
        // Cursor pages, newest first, walked until `offset + limit`.
        let mut sessions = Vec::new();
        let mut page: Option<String> = None;
        while sessions.len() < offset + limit {
            let url = self.http.url(&["v1", "sessions"]);
            let mut query = vec![("limit", "100"), ("order", "desc")];
            if let Some(page) = &page {
                query.push(("page", page));
            }
            let response = self
                .http
                .send(reqwest::Method::GET, url, &query, None, Scope::Global)
                .await?;
            let listed: wire::SessionPage =
                http::read_json(response, self.http.request_timeout()).await?;
            let last = listed.data.is_empty();
            sessions.extend(listed.data.into_iter().map(|s| SessionInfo {
                id: s.id,
                title: s.title.unwrap_or_default(),
                created_ms: wire::parse_time_ms(&s.created_at).unwrap_or(0),
            }));
            match listed.next_page {
                Some(next) if !last => page = Some(next),
                _ => break,
            }
        }
        Ok(sessions.into_iter().skip(offset).take(limit).collect())
    }

    async fn recent_messages(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        let url = self.http.url(&["v1", "sessions", session_id, "events"]);
        let query = [
            ("limit", "100"),
            ("order", "desc"),
            ("types[]", "user.message"),
            ("types[]", "agent.message"),
        ];
        let response = self
            .http
            .send(
                reqwest::Method::GET,
                url,
                &query,
                None,
                Scope::Session(session_id),
            )
            .await?;
        let page: wire::HistoryPage =
            http::read_json(response, self.http.request_timeout()).await?;
        let mut messages: Vec<(String, String)> = page
            .data
            .into_iter()
            .filter_map(|event| {
                let role = match event.kind.as_str() {
                    "user.message" => "user",
                    "agent.message" => "agent",
                    _ => return None,
                };
                let text: String = event
                    .content
                    .iter()
                    .filter_map(|block| block.text.as_deref())
                    .collect();
                (!text.is_empty()).then(|| (role.to_owned(), text))
            })
            .take(limit)
            .collect();
        messages.reverse();
        Ok(messages)
    }

    async fn create_session(&self, spec: &SessionSpec) -> Result<String> {
        let body = wire::CreateSession {
            agent: &spec.agent_id,
            environment_id: &spec.environment_id,
            title: (!spec.title.is_empty()).then_some(spec.title.as_str()),
            metadata: (!spec.metadata.is_empty()).then_some(&spec.metadata),
        };
        let body = serde_json::to_vec(&body)
            .map_err(|err| ProviderError::Protocol(format!("encode session: {err}")))?;
        let url = self.http.url(&["v1", "sessions"]);
        let response = self
            .http
            .send(
                reqwest::Method::POST,
                url,
                &[],
                Some(body.into()),
                Scope::Global,
            )
            .await?;
        let created: wire::Created = http::read_json(response, self.http.request_timeout()).await?;
        tracing::debug!(session = %created.id, agent = %spec.agent_id, "created claude session");
        Ok(created.id)
    }

    async fn event_stream(&self, session_id: &str, after: Option<&str>) -> Result<EventStream> {
        self.feeds.subscribe(session_id, after).await
    }

    async fn send_message(&self, session_id: &str, message: &UserMessage) -> Result<String> {
        let content = wire::user_content(message)?;
        let id = self
            .send_events(session_id, &[wire::OutEvent::Message { content }])
            .await?;
        tracing::debug!(session = %session_id, event = %id, "sent user message");
        Ok(id)
    }

    async fn interrupt(&self, session_id: &str) -> Result<()> {
        self.send_events(session_id, &[wire::OutEvent::Interrupt {}])
            .await?;
        tracing::debug!(session = %session_id, "interrupted turn");
        Ok(())
    }

    async fn confirm_tool(
        &self,
        session_id: &str,
        tool_use_id: &str,
        decision: ToolDecision,
    ) -> Result<()> {
        let (result, deny_message) = match &decision {
            ToolDecision::Allow => ("allow", None),
            ToolDecision::Deny { message } => ("deny", message.as_deref()),
            ToolDecision::Cancelled => ("deny", Some("cancelled by the user")),
            ToolDecision::Option { .. } => {
                return Err(ProviderError::Unsupported(
                    "permission options (Claude takes allow or deny)",
                ));
            }
        };
        self.send_events(
            session_id,
            &[wire::OutEvent::ToolConfirmation {
                tool_use_id,
                result,
                deny_message,
            }],
        )
        .await?;
        tracing::debug!(session = %session_id, tool_use = %tool_use_id, result, "answered tool confirmation");
        Ok(())
    }

    async fn submit_tool_result(
        &self,
        session_id: &str,
        tool_use_id: &str,
        output: ToolOutput,
    ) -> Result<()> {
        let content = if output.content.is_empty() {
            None
        } else {
            Some([wire::OutBlock::Text {
                text: &output.content,
            }])
        };
        self.send_events(
            session_id,
            &[wire::OutEvent::CustomToolResult {
                custom_tool_use_id: tool_use_id,
                content: content.as_ref().map(|blocks| blocks.as_slice()),
                is_error: output.is_error,
            }],
        )
        .await?;
        tracing::debug!(session = %session_id, tool_use = %tool_use_id, is_error = output.is_error, "sent custom tool result");
        Ok(())
    }

    async fn destroy(&self, session_id: &str) -> Result<()> {
        let url = self.http.url(&["v1", "sessions", session_id]);
        match self
            .http
            .send(
                reqwest::Method::DELETE,
                url,
                &[],
                None,
                Scope::Session(session_id),
            )
            .await
        {
            Ok(_) => {
                tracing::debug!(session = %session_id, "deleted claude session");
                self.feeds.close(session_id);
                Ok(())
            }
            Err(ProviderError::SessionNotFound(_)) => {
                self.feeds.close(session_id);
                Ok(())
            }
            Err(err) => Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_durations_and_keeps_defaults() {
        let config: ClaudeConfig = serde_json::from_value(serde_json::json!({
            "api_key": "sk-secret",
            "request_timeout": "30s",
            "reconnect_backoff": "250ms",
            "stream_deltas": true,
        }))
        .expect("config");
        assert_eq!(config.request_timeout, Duration::from_secs(30));
        assert_eq!(config.reconnect_backoff, Duration::from_millis(250));
        assert!(config.stream_deltas);
        assert_eq!(config.base_url, "https://api.anthropic.com");
        assert_eq!(config.max_retries, 2);
        assert_eq!(config.stream_linger, Duration::from_secs(30));
        assert_eq!(config.stream_replay_events, 64);
        let debug = format!("{config:?}");
        assert!(!debug.contains("sk-secret"), "{debug}");
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn bad_settings_are_rejected() {
        let err = ClaudeProvider::new(ClaudeConfig {
            base_url: "not a url".to_owned(),
            ..ClaudeConfig::default()
        })
        .expect_err("bad url");
        assert!(matches!(err, ProviderError::Rejected(_)));
        let err = ClaudeProvider::new(ClaudeConfig {
            api_key: "line\nbreak".to_owned(),
            ..ClaudeConfig::default()
        })
        .expect_err("bad key");
        assert!(matches!(err, ProviderError::Rejected(ref m) if !m.contains("break")));
    }

    #[test]
    fn urls_escape_session_ids() {
        let provider = ClaudeProvider::new(ClaudeConfig {
            base_url: "http://127.0.0.1:9/".to_owned(),
            ..ClaudeConfig::default()
        })
        .expect("provider");
        let url = provider.http.url(&["v1", "sessions", "a/b?c", "events"]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9/v1/sessions/a%2Fb%3Fc/events"
        );
    }
}
