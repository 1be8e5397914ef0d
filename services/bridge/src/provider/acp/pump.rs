//! The pump: turns one agent child's ACP traffic into the session's
//! [`RuntimeEvent`]s, and notices when the child exits or goes silent.
//!
//! Message and thought chunks are buffered: each chunk is streamed as a
//! delta, and the whole text is emitted once, as one `AgentMessage` (or
//! `Thinking`), when something else happens (another kind of update, a
//! permission request, the end of the turn).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agent_client_protocol::v1::schema::{
    ContentBlock, ContentChunk, PermissionOptionKind, PromptResponse, SessionUpdate,
    StopReason as AcpStopReason, ToolCallContent, ToolCallStatus, ToolKind,
};
use tokio::sync::mpsc;

use super::super::{
    PermissionKind, PermissionOption, RuntimeEvent, SessionState, StopReason, TokenUsage,
};
use super::process::{AgentProcess, Incoming};
use super::{PendingPermission, SessionShared};

/// Error kind when the child exits while it has work.
const AGENT_EXITED: &str = "agent_exited";
/// Error kind when the child stays silent mid-turn for too long.
const AGENT_HUNG: &str = "agent_hung";

/// A message being streamed: the id its complete form will have, the text
/// so far, and the agent's message id when it gives one.
struct Streaming {
    id: String,
    text: String,
    acp_id: Option<String>,
}

/// A tool call announced by the agent.
struct KnownTool {
    event_id: String,
    title: String,
    input: serde_json::Value,
}

/// Translates one child's traffic until it dies or is stopped.
pub(super) struct Pump {
    session: Arc<SessionShared>,
    agent: Arc<AgentProcess>,
    rx: mpsc::UnboundedReceiver<Incoming>,
    idle_timeout: Duration,
    message: Option<Streaming>,
    thought: Option<String>,
    tools: HashMap<String, KnownTool>,
}

impl Pump {
    pub(super) fn new(
        session: Arc<SessionShared>,
        agent: Arc<AgentProcess>,
        rx: mpsc::UnboundedReceiver<Incoming>,
        idle_timeout: Duration,
    ) -> Self {
        Pump {
            session,
            agent,
            rx,
            idle_timeout,
            message: None,
            thought: None,
            tools: HashMap::new(),
        }
    }

    /// Runs until the child dies, hangs, or is killed.
    pub(super) async fn run(mut self) {
        loop {
            // Silence only counts while the agent owes us something: during
            // a turn, and not while a person decides on a permission.
            let watching = *self.agent.turn.borrow() && self.session.pending_is_empty();
            let idle = self.idle_timeout;
            let incoming = tokio::select! {
                incoming = self.rx.recv() => incoming,
                () = tokio::time::sleep(idle), if watching => {
                    self.died(AGENT_HUNG, format!("the agent sent nothing for {idle:?} and was stopped"));
                    return;
                }
                () = self.agent.stopped() => return,
            };
            let Some(incoming) = incoming else { return };
            match incoming {
                Incoming::Update(notification) => self.update(notification.update),
                Incoming::Permission(request, responder) => {
                    self.flush();
                    let request = *request;
                    let known = self.tools.get(request.tool_call.tool_call_id.0.as_ref());
                    let fields = request.tool_call.fields;
                    let title = fields
                        .title
                        .clone()
                        .or_else(|| known.map(|t| t.title.clone()))
                        .unwrap_or_else(|| tool_name(fields.name.clone(), None, fields.kind));
                    let input = fields
                        .raw_input
                        .clone()
                        .or_else(|| known.map(|t| t.input.clone()))
                        .unwrap_or(serde_json::Value::Null);
                    let options: Vec<PermissionOption> = request
                        .options
                        .iter()
                        .filter_map(|option| {
                            Some(PermissionOption {
                                id: option.option_id.to_string(),
                                label: option.name.clone(),
                                kind: permission_kind(option.kind)?,
                            })
                        })
                        .collect();
                    let id = self.session.log.reserve_id();
                    // Pending before the event is out, so an answer to it
                    // always finds it.
                    self.session.add_pending(
                        id.clone(),
                        PendingPermission {
                            responder,
                            options: request.options,
                        },
                    );
                    self.session.log.push(RuntimeEvent::PermissionRequest {
                        id: id.clone(),
                        tool_call_id: request.tool_call.tool_call_id.to_string(),
                        title,
                        input,
                        options,
                    });
                    self.session.log.emit(|status| RuntimeEvent::Status {
                        id: status,
                        state: SessionState::Idle,
                        stop_reason: Some(StopReason::RequiresAction {
                            event_ids: vec![id],
                        }),
                    });
                }
                Incoming::PromptDone(Ok(response)) => self.turn_ended(&response),
                Incoming::PromptDone(Err(err)) => {
                    if agent_client_protocol::is_incoming_transport_closed(&err)
                        || agent_client_protocol::is_connection_terminated(&err)
                        || self.agent.conn.is_incoming_closed()
                    {
                        // The exit itself ends the turn.
                        continue;
                    }
                    self.flush();
                    self.session.cancel_pending();
                    self.agent.turn.send_replace(false);
                    self.session.log.emit(|id| RuntimeEvent::Error {
                        id,
                        kind: "prompt_failed".into(),
                        message: format!("the agent failed the prompt: {err}"),
                        retry_status: Some("terminal".into()),
                    });
                    self.idle(StopReason::Other("prompt_failed".into()));
                }
                Incoming::LoadDone(_) | Incoming::Poke => {}
                Incoming::Closed(reason) => {
                    self.died(AGENT_EXITED, format!("the agent stopped: {reason}"));
                    return;
                }
                Incoming::Exited(status) => {
                    self.died(AGENT_EXITED, format!("the agent exited ({status})"));
                    return;
                }
            }
        }
    }

    fn update(&mut self, update: SessionUpdate) {
        match update {
            SessionUpdate::AgentMessageChunk(chunk) => self.message_chunk(chunk),
            SessionUpdate::AgentThoughtChunk(chunk) => {
                self.flush_message();
                if let Some(text) = chunk_text(&chunk.content) {
                    self.thought.get_or_insert_default().push_str(text);
                }
            }
            SessionUpdate::ToolCall(call) => {
                self.flush();
                let tool_call_id = call.tool_call_id.to_string();
                self.announce(
                    &tool_call_id,
                    tool_name(call.name.clone(), Some(call.title.clone()), Some(call.kind)),
                    call.raw_input.clone(),
                );
                if matches!(
                    call.status,
                    ToolCallStatus::Completed | ToolCallStatus::Failed
                ) {
                    self.tool_result(
                        &tool_call_id,
                        call.status,
                        &call.content,
                        call.raw_output.as_ref(),
                    );
                }
            }
            SessionUpdate::ToolCallUpdate(update) => {
                self.flush();
                let tool_call_id = update.tool_call_id.to_string();
                let fields = update.fields;
                if !self.tools.contains_key(&tool_call_id) {
                    // An update for a call never announced: announce it.
                    self.announce(
                        &tool_call_id,
                        tool_name(fields.name.clone(), fields.title.clone(), fields.kind),
                        fields.raw_input.clone(),
                    );
                }
                if let Some(status @ (ToolCallStatus::Completed | ToolCallStatus::Failed)) =
                    fields.status
                {
                    self.tool_result(
                        &tool_call_id,
                        status,
                        fields.content.as_deref().unwrap_or_default(),
                        fields.raw_output.as_ref(),
                    );
                }
            }
            SessionUpdate::UsageUpdate(usage) => {
                self.flush();
                let cost_micro_usd = usage
                    .cost
                    .as_ref()
                    .filter(|cost| cost.currency.eq_ignore_ascii_case("USD"))
                    .filter(|cost| cost.amount.is_finite() && cost.amount >= 0.0)
                    // Whole micro-dollars; the cast saturates.
                    .map(|cost| (cost.amount * 1_000_000.0).round() as u64);
                self.session.log.emit(|id| RuntimeEvent::Usage {
                    id,
                    usage: TokenUsage {
                        // ACP reports the tokens in the context window, not
                        // a per-request split.
                        input_tokens: usage.used,
                        cost_micro_usd,
                        session_totals: true,
                        ..TokenUsage::default()
                    },
                });
            }
            other => {
                self.flush();
                let event_type = serde_json::to_value(&other)
                    .ok()
                    .and_then(|value| {
                        value
                            .get("sessionUpdate")
                            .and_then(|tag| tag.as_str())
                            .map(str::to_owned)
                    })
                    .unwrap_or_else(|| "session_update".into());
                self.session
                    .log
                    .emit(|id| RuntimeEvent::Other { id, event_type });
            }
        }
    }

    fn message_chunk(&mut self, chunk: ContentChunk) {
        self.flush_thought();
        let acp_id = chunk.message_id.as_ref().map(|id| id.to_string());
        if let (Some(current), Some(next)) = (&self.message, &acp_id)
            && current
                .acp_id
                .as_ref()
                .is_some_and(|current| current != next)
        {
            self.flush_message();
        }
        let Some(text) = chunk_text(&chunk.content) else {
            return;
        };
        if text.is_empty() {
            return;
        }
        let log = &self.session.log;
        let streaming = self.message.get_or_insert_with(|| Streaming {
            id: log.reserve_id(),
            text: String::new(),
            acp_id,
        });
        streaming.text.push_str(text);
        let message_id = streaming.id.clone();
        log.emit(|id| RuntimeEvent::AgentMessageDelta {
            id,
            message_id,
            text: text.to_owned(),
        });
    }

    /// Publishes the use of a tool call and remembers it for its result.
    fn announce(&mut self, tool_call_id: &str, title: String, input: Option<serde_json::Value>) {
        let input = input.unwrap_or(serde_json::Value::Null);
        let event_id = self.session.log.emit(|id| RuntimeEvent::ToolUse {
            id,
            name: title.clone(),
            input: input.clone(),
            evaluated_permission: None,
            server_name: None,
        });
        self.tools.insert(
            tool_call_id.to_owned(),
            KnownTool {
                event_id,
                title,
                input,
            },
        );
    }

    fn tool_result(
        &mut self,
        tool_call_id: &str,
        status: ToolCallStatus,
        content: &[ToolCallContent],
        raw_output: Option<&serde_json::Value>,
    ) {
        let Some(tool) = self.tools.get(tool_call_id) else {
            return;
        };
        let tool_use_id = tool.event_id.clone();
        let content = tool_output(content, raw_output);
        self.session.log.emit(|id| RuntimeEvent::ToolResult {
            id,
            tool_use_id,
            content,
            is_error: status == ToolCallStatus::Failed,
        });
    }

    fn turn_ended(&mut self, response: &PromptResponse) {
        self.flush();
        // The turn is over: a permission still asked for is moot.
        self.session.cancel_pending();
        self.agent.turn.send_replace(false);
        let reason = match response.stop_reason {
            AcpStopReason::EndTurn => StopReason::EndTurn,
            AcpStopReason::Refusal => StopReason::Refusal { explanation: None },
            AcpStopReason::Cancelled => StopReason::Other("cancelled".into()),
            AcpStopReason::MaxTokens => StopReason::Other("max_tokens".into()),
            AcpStopReason::MaxTurnRequests => StopReason::Other("max_turn_requests".into()),
            other => StopReason::Other(
                serde_json::to_value(other)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| "unknown".into()),
            ),
        };
        self.idle(reason);
    }

    /// The child is gone (or is being killed): the turn in progress ends
    /// with an error the user is told about.
    fn died(&mut self, kind: &str, message: String) {
        self.flush();
        let had_work = *self.agent.turn.borrow() || !self.session.pending_is_empty();
        self.agent.kill();
        self.session.cancel_pending();
        self.agent.turn.send_replace(false);
        if had_work {
            tracing::warn!(session = %self.session.id, kind, %message, "acp agent failed mid-turn");
            self.session.log.emit(|id| RuntimeEvent::Error {
                id,
                kind: kind.to_owned(),
                message,
                retry_status: Some("terminal".into()),
            });
            self.idle(StopReason::Other(kind.to_owned()));
        } else {
            tracing::info!(session = %self.session.id, %message, "acp agent stopped between turns");
        }
    }

    fn idle(&self, reason: StopReason) {
        self.session.log.emit(|id| RuntimeEvent::Status {
            id,
            state: SessionState::Idle,
            stop_reason: Some(reason),
        });
    }

    fn flush(&mut self) {
        self.flush_message();
        self.flush_thought();
    }

    fn flush_message(&mut self) {
        if let Some(message) = self.message.take() {
            self.session.log.push(RuntimeEvent::AgentMessage {
                id: message.id,
                text: message.text,
            });
        }
    }

    fn flush_thought(&mut self) {
        if let Some(text) = self.thought.take().filter(|t| !t.is_empty()) {
            self.session
                .log
                .emit(|id| RuntimeEvent::Thinking { id, text });
        }
    }
}

fn chunk_text(content: &ContentBlock) -> Option<&str> {
    match content {
        ContentBlock::Text(text) => Some(&text.text),
        _ => None,
    }
}

/// A tool's display name: its name, else the agent's title, else its kind.
fn tool_name(name: Option<String>, title: Option<String>, kind: Option<ToolKind>) -> String {
    name.filter(|n| !n.is_empty())
        .or_else(|| title.filter(|t| !t.is_empty()))
        .or_else(|| {
            kind.and_then(|kind| serde_json::to_value(kind).ok())
                .and_then(|v| v.as_str().map(str::to_owned))
        })
        .unwrap_or_else(|| "tool".into())
}

fn permission_kind(kind: PermissionOptionKind) -> Option<PermissionKind> {
    match kind {
        PermissionOptionKind::AllowOnce => Some(PermissionKind::AllowOnce),
        PermissionOptionKind::AllowAlways => Some(PermissionKind::AllowAlways),
        PermissionOptionKind::RejectOnce => Some(PermissionKind::RejectOnce),
        PermissionOptionKind::RejectAlways => Some(PermissionKind::RejectAlways),
        _ => None,
    }
}

/// The text of a tool's output: its text content, what it edited, else
/// its raw output.
fn tool_output(content: &[ToolCallContent], raw_output: Option<&serde_json::Value>) -> String {
    let parts: Vec<String> = content
        .iter()
        .filter_map(|item| match item {
            ToolCallContent::Content(content) => chunk_text(&content.content).map(str::to_owned),
            ToolCallContent::Diff(diff) => Some(format!("edited {}", diff.path.display())),
            _ => None,
        })
        .collect();
    if !parts.is_empty() {
        return parts.join("\n");
    }
    match raw_output {
        Some(serde_json::Value::String(text)) => text.clone(),
        Some(serde_json::Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}
