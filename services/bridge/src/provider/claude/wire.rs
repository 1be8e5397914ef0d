//! Wire shapes: request bodies we send and the events we read, mapped to
//! [`RuntimeEvent`]. Types follow `anthropic/types/beta/sessions/` of the
//! SDK 2.12.0.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::provider::{
    ProviderError, Result, RuntimeEvent, SessionState, StopReason, TokenUsage, UserMessage,
};

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// `POST /v1/sessions` body (`types/beta/session_create_params.py`).
#[derive(Serialize)]
pub(super) struct CreateSession<'a> {
    pub agent: &'a str,
    pub environment_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<&'a BTreeMap<String, String>>,
}

/// The part of a created session we read.
#[derive(Deserialize)]
pub(super) struct Created {
    pub id: String,
}

/// `POST /v1/sessions/{id}/events` body (`event_send_params.py`).
#[derive(Serialize)]
pub(super) struct SendEvents<'a, 'b> {
    pub events: &'a [OutEvent<'b>],
}

/// The response to sending events (`beta_managed_agents_send_session_events.py`).
#[derive(Deserialize)]
pub(super) struct SentEvents {
    #[serde(default)]
    pub data: Option<Vec<Created>>,
}

/// Events the bridge sends (`beta_managed_agents_*_event_params.py`).
#[derive(Serialize)]
#[serde(tag = "type")]
pub(super) enum OutEvent<'a> {
    #[serde(rename = "user.message")]
    Message { content: Vec<OutBlock<'a>> },
    #[serde(rename = "user.interrupt")]
    Interrupt {},
    #[serde(rename = "user.tool_confirmation")]
    ToolConfirmation {
        tool_use_id: &'a str,
        result: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        deny_message: Option<&'a str>,
    },
    #[serde(rename = "user.custom_tool_result")]
    CustomToolResult {
        custom_tool_use_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        content: Option<&'a [OutBlock<'a>]>,
        is_error: bool,
    },
}

/// Content blocks of user events (text, image and document block params).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum OutBlock<'a> {
    Text {
        text: &'a str,
    },
    Image {
        source: OutSource<'a>,
    },
    Document {
        source: OutSource<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        title: Option<&'a str>,
    },
}

/// Sources of image and document blocks: base64 data or plain text.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum OutSource<'a> {
    Base64 {
        media_type: &'a str,
        data: String,
    },
    Text {
        media_type: &'static str,
        data: &'a str,
    },
}

/// Image types the API takes inline (`beta_managed_agents_base64_image_source_param.py`).
const IMAGE_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

/// The content blocks of a user message: its text, then one block per file
/// (images as image blocks, text files as plain-text documents, anything
/// else as a base64 document).
pub(super) fn user_content(message: &UserMessage) -> Result<Vec<OutBlock<'_>>> {
    let mut blocks = Vec::with_capacity(1 + message.files.len());
    if !message.text.is_empty() {
        blocks.push(OutBlock::Text {
            text: &message.text,
        });
    }
    for file in &message.files {
        let media_type = file.mime_type.split(';').next().unwrap_or_default().trim();
        let title = (!file.file_name.is_empty()).then_some(file.file_name.as_str());
        let base64 = || base64::engine::general_purpose::STANDARD.encode(&file.data);
        let block = if IMAGE_TYPES
            .iter()
            .any(|image| media_type.eq_ignore_ascii_case(image))
        {
            OutBlock::Image {
                source: OutSource::Base64 {
                    media_type,
                    data: base64(),
                },
            }
        } else if media_type.len() > 5 && media_type[..5].eq_ignore_ascii_case("text/") {
            match std::str::from_utf8(&file.data) {
                Ok(text) => OutBlock::Document {
                    source: OutSource::Text {
                        media_type: "text/plain",
                        data: text,
                    },
                    title,
                },
                Err(_) => OutBlock::Document {
                    source: OutSource::Base64 {
                        media_type,
                        data: base64(),
                    },
                    title,
                },
            }
        } else {
            OutBlock::Document {
                source: OutSource::Base64 {
                    media_type,
                    data: base64(),
                },
                title,
            }
        };
        blocks.push(block);
    }
    if blocks.is_empty() {
        return Err(ProviderError::Rejected(
            "a user message needs text or a file".to_owned(),
        ));
    }
    Ok(blocks)
}

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

/// One decoded frame or history entry.
#[derive(Debug)]
pub(super) enum Decoded {
    /// An event with an id, in history and on the stream.
    Event(RuntimeEvent),
    /// `session.deleted`: delivered as [`RuntimeEvent::Other`], after which
    /// the session is gone.
    Deleted(RuntimeEvent),
    /// A text fragment of an `agent.message` still being written
    /// (`event_delta`, stream only, no id of its own).
    Delta { message_id: String, text: String },
    /// Nothing to deliver (`event_start`, unreadable or id-less frames).
    Skip,
}

/// Every field of an event we look at first.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
}

/// Content block of events we read: text, or anything else (skipped).
#[derive(Deserialize)]
struct Block<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct AgentMessageWire<'a> {
    #[serde(default, borrow)]
    content: Vec<Block<'a>>,
}

#[derive(Deserialize)]
struct ToolUseWire {
    name: String,
    #[serde(default)]
    input: serde_json::Value,
    #[serde(default)]
    evaluated_permission: Option<String>,
    #[serde(default)]
    mcp_server_name: Option<String>,
}

#[derive(Deserialize)]
struct ToolResultWire<'a> {
    #[serde(alias = "mcp_tool_use_id")]
    tool_use_id: String,
    #[serde(default, borrow)]
    content: Option<Vec<Block<'a>>>,
    #[serde(default)]
    is_error: Option<bool>,
}

#[derive(Deserialize)]
struct CustomToolUseWire {
    name: String,
    #[serde(default)]
    input: serde_json::Value,
}

#[derive(Deserialize)]
struct IdleWire {
    #[serde(default)]
    stop_reason: Option<StopReasonWire>,
    #[serde(default)]
    stop_details: Option<StopDetailsWire>,
}

#[derive(Deserialize)]
struct StopReasonWire {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    event_ids: Vec<String>,
}

#[derive(Deserialize)]
struct StopDetailsWire {
    #[serde(default)]
    explanation: Option<String>,
}

#[derive(Deserialize)]
struct SessionErrorWire {
    error: SessionErrorObject,
}

#[derive(Deserialize)]
struct SessionErrorObject {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    retry_status: Option<Typed>,
}

#[derive(Deserialize)]
struct Typed {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct ModelRequestEndWire {
    model_usage: UsageWire,
}

#[derive(Deserialize)]
struct UsageWire {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: u64,
}

#[derive(Deserialize)]
struct DeltaWire<'a> {
    event_id: String,
    #[serde(borrow)]
    delta: DeltaContentWire<'a>,
}

#[derive(Deserialize)]
struct DeltaContentWire<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    content: Option<Block<'a>>,
}

/// Event types of the SDK (`beta_managed_agents_session_event_type.py` and
/// the stream-only ones) that map to [`RuntimeEvent::Other`] on purpose.
const PASSIVE_TYPES: &[&str] = &[
    "user.message",
    "user.interrupt",
    "user.tool_confirmation",
    "user.custom_tool_result",
    "user.tool_result",
    "user.define_outcome",
    "system.message",
    "agent.thread_message_received",
    "agent.thread_message_sent",
    "agent.thread_context_compacted",
    "session.thread_created",
    "session.thread_status_running",
    "session.thread_status_idle",
    "session.thread_status_terminated",
    "session.thread_status_rescheduled",
    "session.updated",
    "session.usage",
    "span.model_request_start",
    "span.outcome_evaluation_start",
    "span.outcome_evaluation_ongoing",
    "span.outcome_evaluation_end",
    "workflow_run.created",
    "workflow_run.status_running",
    "workflow_run.status_idle",
    "workflow_run.status_ended",
    "workflow_run.error",
    "workflow_run.phase_started",
    "workflow_run.phase_ended",
];

/// Decodes one event's JSON. Never fails: what cannot be read is logged and
/// skipped, an event of an unknown type becomes [`RuntimeEvent::Other`] so
/// cursors still move past it.
pub(super) fn decode(json: &[u8]) -> Decoded {
    let head: Head<'_> = match serde_json::from_slice(json) {
        Ok(head) => head,
        Err(err) => {
            tracing::warn!(error = %err, "skipping unreadable claude event");
            return Decoded::Skip;
        }
    };
    let kind = head.kind.as_ref();
    match kind {
        "event_delta" => return decode_delta(json),
        "event_start" => return Decoded::Skip,
        _ => {}
    }
    let Some(id) = head.id else {
        tracing::debug!(event_type = %kind, "skipping claude event without id");
        return Decoded::Skip;
    };
    let id = id.into_owned();
    let event = match kind {
        "agent.message" => {
            typed::<AgentMessageWire<'_>>(json, kind).map(|wire| RuntimeEvent::AgentMessage {
                id: id.clone(),
                text: join_text(&wire.content, ""),
            })
        }
        "agent.thinking" => Some(RuntimeEvent::Thinking {
            id: id.clone(),
            text: String::new(),
        }),
        "agent.tool_use" | "agent.mcp_tool_use" => {
            typed::<ToolUseWire>(json, kind).map(|wire| RuntimeEvent::ToolUse {
                id: id.clone(),
                name: wire.name,
                input: wire.input,
                evaluated_permission: wire.evaluated_permission,
                server_name: wire.mcp_server_name,
            })
        }
        "agent.tool_result" | "agent.mcp_tool_result" => typed::<ToolResultWire<'_>>(json, kind)
            .map(|wire| RuntimeEvent::ToolResult {
                id: id.clone(),
                tool_use_id: wire.tool_use_id,
                content: wire
                    .content
                    .as_deref()
                    .map(|blocks| join_text(blocks, "\n"))
                    .unwrap_or_default(),
                is_error: wire.is_error.unwrap_or(false),
            }),
        "agent.custom_tool_use" => {
            typed::<CustomToolUseWire>(json, kind).map(|wire| RuntimeEvent::CustomToolUse {
                id: id.clone(),
                name: wire.name,
                input: wire.input,
            })
        }
        "session.status_running" => Some(status(&id, SessionState::Running, None)),
        "session.status_rescheduled" => Some(status(&id, SessionState::Rescheduled, None)),
        "session.status_terminated" => Some(status(&id, SessionState::Terminated, None)),
        "session.status_idle" => typed::<IdleWire>(json, kind).map(|wire| {
            status(
                &id,
                SessionState::Idle,
                wire.stop_reason.map(|r| stop_reason(r, wire.stop_details)),
            )
        }),
        "session.error" => typed::<SessionErrorWire>(json, kind).map(|wire| RuntimeEvent::Error {
            id: id.clone(),
            kind: wire.error.kind,
            message: wire.error.message,
            retry_status: wire.error.retry_status.map(|status| status.kind),
        }),
        "span.model_request_end" => {
            typed::<ModelRequestEndWire>(json, kind).map(|wire| RuntimeEvent::Usage {
                id: id.clone(),
                usage: TokenUsage {
                    input_tokens: wire.model_usage.input_tokens,
                    output_tokens: wire.model_usage.output_tokens,
                    cache_read_input_tokens: wire.model_usage.cache_read_input_tokens,
                    cache_creation_input_tokens: wire.model_usage.cache_creation_input_tokens,
                    cost_micro_usd: None,
                    session_totals: false,
                },
            })
        }
        "session.deleted" => {
            return Decoded::Deleted(RuntimeEvent::Other {
                id,
                event_type: kind.to_owned(),
            });
        }
        _ => {
            if !PASSIVE_TYPES.contains(&kind) {
                tracing::debug!(event_type = %kind, event = %id, "unknown claude event type");
            }
            None
        }
    };
    Decoded::Event(event.unwrap_or_else(|| RuntimeEvent::Other {
        id,
        event_type: kind.to_owned(),
    }))
}

/// The `id` of an event, reading nothing else.
pub(super) fn event_id(json: &[u8]) -> Option<Cow<'_, str>> {
    serde_json::from_slice::<Head<'_>>(json).ok()?.id
}

/// Decodes an event type's own fields; a shape we do not understand is
/// logged and the event passed on as [`RuntimeEvent::Other`].
fn typed<'a, T: Deserialize<'a>>(json: &'a [u8], kind: &str) -> Option<T> {
    match serde_json::from_slice(json) {
        Ok(value) => Some(value),
        Err(err) => {
            tracing::warn!(event_type = %kind, error = %err, "unexpected claude event shape");
            None
        }
    }
}

fn decode_delta(json: &[u8]) -> Decoded {
    let Some(wire) = typed::<DeltaWire<'_>>(json, "event_delta") else {
        return Decoded::Skip;
    };
    if wire.delta.kind != "content_delta" {
        tracing::debug!(delta_type = %wire.delta.kind, "skipping unknown delta type");
        return Decoded::Skip;
    }
    match wire.delta.content {
        Some(Block {
            kind,
            text: Some(text),
        }) if kind == "text" => Decoded::Delta {
            message_id: wire.event_id,
            text: text.into_owned(),
        },
        _ => Decoded::Skip,
    }
}

fn status(id: &str, state: SessionState, stop_reason: Option<StopReason>) -> RuntimeEvent {
    RuntimeEvent::Status {
        id: id.to_owned(),
        state,
        stop_reason,
    }
}

fn stop_reason(wire: StopReasonWire, details: Option<StopDetailsWire>) -> StopReason {
    match wire.kind.as_str() {
        "end_turn" => StopReason::EndTurn,
        "requires_action" => StopReason::RequiresAction {
            event_ids: wire.event_ids,
        },
        "retries_exhausted" => StopReason::RetriesExhausted,
        "budget_reached" => StopReason::BudgetReached,
        "refusal" => StopReason::Refusal {
            explanation: details.and_then(|details| details.explanation),
        },
        _ => StopReason::Other(wire.kind),
    }
}

/// The text blocks' text joined (non-text blocks are left out).
fn join_text(blocks: &[Block<'_>], separator: &str) -> String {
    let mut texts = blocks
        .iter()
        .filter(|block| block.kind == "text")
        .filter_map(|block| block.text.as_deref());
    let Some(first) = texts.next() else {
        return String::new();
    };
    let mut joined = String::from(first);
    for text in texts {
        joined.push_str(separator);
        joined.push_str(text);
    }
    joined
}

/// An `event: error` frame on the stream, as the API's error shape.
#[derive(Deserialize)]
struct StreamErrorWire {
    error: StreamErrorObject,
}

#[derive(Deserialize)]
struct StreamErrorObject {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

/// Maps an `event: error` frame to an error, and whether reconnecting may
/// help (overloaded, api, timeout and rate-limit errors).
pub(super) fn stream_error(data: &[u8], session_id: &str) -> (ProviderError, bool) {
    let (kind, message) = match serde_json::from_slice::<StreamErrorWire>(data) {
        Ok(wire) => (wire.error.kind, wire.error.message),
        Err(_) => (
            String::new(),
            String::from_utf8_lossy(&data[..data.len().min(512)]).into_owned(),
        ),
    };
    let detail = format!("stream error: {kind}: {message}");
    match kind.as_str() {
        "not_found_error" => (ProviderError::SessionNotFound(session_id.to_owned()), false),
        "authentication_error" | "permission_error" => (ProviderError::Unauthorized(detail), false),
        "rate_limit_error" => (ProviderError::RateLimited { retry_after: None }, true),
        "invalid_request_error" | "billing_error" => (ProviderError::Rejected(detail), false),
        _ => (ProviderError::Unavailable(detail), true),
    }
}

/// `GET /v1/sessions`: a cursor page of sessions.
#[derive(Debug, Deserialize)]
pub(super) struct SessionPage {
    #[serde(default)]
    pub data: Vec<SessionSummary>,
    #[serde(default)]
    pub next_page: Option<String>,
}

/// The parts of a listed session the bridge shows.
#[derive(Debug, Deserialize)]
pub(super) struct SessionSummary {
    pub id: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub created_at: String,
}

/// A page of history events, read for `recent_messages`.
#[derive(Debug, Deserialize)]
pub(super) struct HistoryPage {
    #[serde(default)]
    pub data: Vec<HistoryEvent>,
}

/// A history event's type and text blocks.
#[derive(Debug, Deserialize)]
pub(super) struct HistoryEvent {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub content: Vec<HistoryBlock>,
}

/// A content block; only text blocks have `text`.
#[derive(Debug, Deserialize)]
pub(super) struct HistoryBlock {
    #[serde(default)]
    pub text: Option<String>,
}

/// Milliseconds since the epoch of an RFC 3339 UTC time such as
/// `2026-04-01T12:30:05.123Z` (offsets other than `Z` are not used by the API).
pub(super) fn parse_time_ms(time: &str) -> Option<i64> {
    let at = humantime::parse_rfc3339(time).ok()?;
    let since = at.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_times_parse() {
        assert_eq!(super::parse_time_ms("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(
            super::parse_time_ms("2026-04-01T12:30:05.123Z"),
            Some(1_775_046_605_123)
        );
        assert_eq!(super::parse_time_ms("yesterday"), None);
    }

    use super::*;

    fn event(json: &str) -> RuntimeEvent {
        match decode(json.as_bytes()) {
            Decoded::Event(event) => event,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[test]
    fn agent_message_joins_text_blocks() {
        let got = event(
            r#"{"id":"e1","type":"agent.message","processed_at":"2026-01-01T00:00:00Z","content":[{"type":"text","text":"a\"b"},{"type":"redacted"},{"type":"text","text":"c"}]}"#,
        );
        assert_eq!(
            got,
            RuntimeEvent::AgentMessage {
                id: "e1".into(),
                text: "a\"bc".into()
            }
        );
    }

    #[test]
    fn idle_stop_reasons() {
        let got = event(
            r#"{"id":"e2","type":"session.status_idle","stop_reason":{"type":"requires_action","event_ids":["t1","t2"]}}"#,
        );
        assert_eq!(
            got,
            RuntimeEvent::Status {
                id: "e2".into(),
                state: SessionState::Idle,
                stop_reason: Some(StopReason::RequiresAction {
                    event_ids: vec!["t1".into(), "t2".into()]
                })
            }
        );
        let got = event(
            r#"{"id":"e3","type":"session.status_idle","stop_reason":{"type":"refusal"},"stop_details":{"type":"refusal","category":null,"explanation":"no"}}"#,
        );
        assert!(matches!(
            got,
            RuntimeEvent::Status { stop_reason: Some(StopReason::Refusal { explanation: Some(ref e) }), .. } if e == "no"
        ));
    }

    #[test]
    fn mcp_tools_and_results() {
        let got = event(
            r#"{"id":"e4","type":"agent.mcp_tool_use","name":"search","mcp_server_name":"docs","input":{"q":1},"evaluated_permission":"allow","evaluation":{"type":"always_allow"}}"#,
        );
        assert_eq!(
            got,
            RuntimeEvent::ToolUse {
                id: "e4".into(),
                name: "search".into(),
                input: serde_json::json!({"q": 1}),
                evaluated_permission: Some("allow".into()),
                server_name: Some("docs".into())
            }
        );
        let got = event(
            r#"{"id":"e5","type":"agent.mcp_tool_result","mcp_tool_use_id":"e4","content":[{"type":"text","text":"x"},{"type":"text","text":"y"}],"is_error":true}"#,
        );
        assert_eq!(
            got,
            RuntimeEvent::ToolResult {
                id: "e5".into(),
                tool_use_id: "e4".into(),
                content: "x\ny".into(),
                is_error: true
            }
        );
    }

    #[test]
    fn unknown_and_odd_shapes_become_other() {
        assert_eq!(
            event(r#"{"id":"e6","type":"agent.future","content":"whatever"}"#),
            RuntimeEvent::Other {
                id: "e6".into(),
                event_type: "agent.future".into()
            }
        );
        // A known type with an unexpected shape still moves the cursor.
        assert_eq!(
            event(r#"{"id":"e7","type":"agent.message","content":"not a list"}"#),
            RuntimeEvent::Other {
                id: "e7".into(),
                event_type: "agent.message".into()
            }
        );
        assert!(matches!(decode(b"not json"), Decoded::Skip));
        assert!(matches!(
            decode(br#"{"type":"event_start","event":{"id":"m","type":"agent.message"}}"#),
            Decoded::Skip
        ));
    }

    #[test]
    fn deltas_and_errors() {
        match decode(
            br#"{"type":"event_delta","event_id":"m1","delta":{"type":"content_delta","content":{"type":"text","text":"he"},"index":0}}"#,
        ) {
            Decoded::Delta { message_id, text } => {
                assert_eq!(message_id, "m1");
                assert_eq!(text, "he");
            }
            other => panic!("unexpected {other:?}"),
        }
        let got = event(
            r#"{"id":"e8","type":"session.error","error":{"type":"model_overloaded_error","message":"busy","retry_status":{"type":"exhausted"}}}"#,
        );
        assert_eq!(
            got,
            RuntimeEvent::Error {
                id: "e8".into(),
                kind: "model_overloaded_error".into(),
                message: "busy".into(),
                retry_status: Some("exhausted".into())
            }
        );
        let got = event(
            r#"{"id":"e9","type":"span.model_request_end","model_request_start_id":"s","is_error":false,"model_usage":{"input_tokens":3,"output_tokens":4,"cache_read_input_tokens":1,"cache_creation_input_tokens":2}}"#,
        );
        assert_eq!(
            got,
            RuntimeEvent::Usage {
                id: "e9".into(),
                usage: TokenUsage {
                    input_tokens: 3,
                    output_tokens: 4,
                    cache_read_input_tokens: 1,
                    cache_creation_input_tokens: 2,
                    cost_micro_usd: None,
                    session_totals: false,
                }
            }
        );
    }

    #[test]
    fn user_content_blocks() {
        let message = UserMessage {
            text: "look".into(),
            files: vec![
                crate::provider::UserFile {
                    file_name: "a.png".into(),
                    mime_type: "image/png".into(),
                    data: vec![1, 2, 3],
                },
                crate::provider::UserFile {
                    file_name: "notes.md".into(),
                    mime_type: "text/markdown; charset=utf-8".into(),
                    data: b"# hi".to_vec(),
                },
                crate::provider::UserFile {
                    file_name: "r.pdf".into(),
                    mime_type: "application/pdf".into(),
                    data: vec![0xff],
                },
            ],
        };
        let blocks = user_content(&message).expect("content");
        let json = serde_json::to_value(OutEvent::Message { content: blocks }).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"type": "user.message", "content": [
                {"type": "text", "text": "look"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AQID"}},
                {"type": "document", "title": "notes.md", "source": {"type": "text", "media_type": "text/plain", "data": "# hi"}},
                {"type": "document", "title": "r.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": "/w=="}},
            ]})
        );
        assert!(user_content(&UserMessage::default()).is_err());
    }
}
