//! Agent runtimes behind one trait.
//!
//! A [`Provider`] owns runtime sessions. The bridge opens a session's event
//! stream *before* it sends a message (a runtime such as Claude Managed
//! Agents only streams events produced after the stream connected), then
//! reads events until the turn ends. Streams reconnect and catch up by
//! themselves, so a caller sees every event exactly once and in order.

pub mod acp;
pub mod claude;
pub mod echo;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

/// Result type of provider calls.
pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

/// A runtime's events for one session, in order, each once.
pub type EventStream = BoxStream<'static, Result<RuntimeEvent>>;

/// What the bridge needs to create a runtime session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionSpec {
    pub agent_id: String,
    pub environment_id: String,
    pub title: String,
    /// Small key/value pairs stored with the session (≤ 16 for Claude).
    pub metadata: BTreeMap<String, String>,
    /// Working directory of the session, for runtimes that run on this
    /// machine (ACP); `None` = the runtime's configured default.
    pub cwd: Option<String>,
}

/// A file sent along with a user message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFile {
    pub file_name: String,
    pub mime_type: String,
    pub data: Vec<u8>,
}

/// One user message to the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserMessage {
    pub text: String,
    pub files: Vec<UserFile>,
}

/// Answer to a tool-permission request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolDecision {
    Allow,
    Deny {
        message: Option<String>,
    },
    /// One of the options the runtime offered with the request
    /// ([`RuntimeEvent::PermissionRequest`]).
    Option {
        option_id: String,
    },
    /// The request was cancelled (`/stop`, the turn was interrupted).
    Cancelled,
}

/// What choosing a permission option means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermissionKind {
    AllowOnce,
    AllowAlways,
    RejectOnce,
    RejectAlways,
}

/// A choice a runtime offers with a permission request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionOption {
    pub id: String,
    pub label: String,
    pub kind: PermissionKind,
}

/// A runtime session as listed by [`Provider::list_sessions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: String,
    pub title: String,
    /// Creation time, milliseconds since the epoch (0 = unknown).
    pub created_ms: i64,
}

/// Output of a custom tool the agent asked the bridge to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutput {
    pub content: String,
    pub is_error: bool,
}

/// What a runtime can do beyond the basics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Streams partial text while the agent writes.
    pub streaming_deltas: bool,
    /// Asks for permission before running some tools.
    pub tool_confirmation: bool,
    /// Lets the bridge execute custom tools.
    pub custom_tools: bool,
    /// A running turn can be interrupted.
    pub interrupt: bool,
    /// Sessions run in a working directory chosen per session (`/new <dir>`).
    pub working_directory: bool,
    /// Existing sessions can be listed and attached to (`/list`, `/attach`).
    pub list_sessions: bool,
    /// Sessions live in this bridge process (an agent it started), so a
    /// conversation stays on the replica that holds its session.
    pub in_process: bool,
}

/// Session state as the runtime reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Running,
    Idle,
    Rescheduled,
    Terminated,
}

/// Why a session went idle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    EndTurn,
    /// Waiting for answers to these events (tool confirmations, custom tool
    /// results).
    RequiresAction {
        event_ids: Vec<String>,
    },
    RetriesExhausted,
    BudgetReached,
    Refusal {
        explanation: Option<String>,
    },
    Other(String),
}

/// Token usage of one model request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_creation_input_tokens: u64,
    /// Cost in millionths of a US dollar, when the runtime reports it.
    pub cost_micro_usd: Option<u64>,
    /// The session's totals so far (ACP `usage_update`: tokens in the
    /// context, cumulative cost) rather than one model request's usage.
    pub session_totals: bool,
}

/// One event from the runtime, normalized. `id` is the runtime's event id
/// (unique within the session).
#[derive(Debug, Clone, PartialEq)]
pub enum RuntimeEvent {
    /// A complete piece of agent text.
    AgentMessage {
        id: String,
        text: String,
    },
    /// Partial agent text (only with streaming deltas); the complete
    /// `AgentMessage` with the full text always follows.
    AgentMessageDelta {
        id: String,
        message_id: String,
        text: String,
    },
    Thinking {
        id: String,
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: serde_json::Value,
        /// "allow", "ask" or "deny" when the runtime evaluated it.
        evaluated_permission: Option<String>,
        /// MCP server name for MCP tools.
        server_name: Option<String>,
    },
    ToolResult {
        id: String,
        tool_use_id: String,
        content: String,
        is_error: bool,
    },
    CustomToolUse {
        id: String,
        name: String,
        input: serde_json::Value,
    },
    /// The agent asks before running a tool and offers these options (ACP
    /// `session/request_permission`). Answer with [`Provider::confirm_tool`]
    /// using this event's `id`; the runtime then reports
    /// `Status { Idle, RequiresAction { event_ids: [id] } }` like a Claude
    /// "ask" tool use.
    PermissionRequest {
        id: String,
        tool_call_id: String,
        /// Tool name or the agent's title for the call.
        title: String,
        input: serde_json::Value,
        options: Vec<PermissionOption>,
    },
    Status {
        id: String,
        state: SessionState,
        stop_reason: Option<StopReason>,
    },
    Usage {
        id: String,
        usage: TokenUsage,
    },
    Error {
        id: String,
        kind: String,
        message: String,
        /// "retrying", "exhausted" or "terminal".
        retry_status: Option<String>,
    },
    /// An event the bridge does not act on (user echoes, spans, threads…),
    /// kept so cursors advance past it.
    Other {
        id: String,
        event_type: String,
    },
}

impl RuntimeEvent {
    /// The runtime's id of this event.
    pub fn id(&self) -> &str {
        match self {
            RuntimeEvent::AgentMessage { id, .. }
            | RuntimeEvent::AgentMessageDelta { id, .. }
            | RuntimeEvent::Thinking { id, .. }
            | RuntimeEvent::ToolUse { id, .. }
            | RuntimeEvent::ToolResult { id, .. }
            | RuntimeEvent::CustomToolUse { id, .. }
            | RuntimeEvent::PermissionRequest { id, .. }
            | RuntimeEvent::Status { id, .. }
            | RuntimeEvent::Usage { id, .. }
            | RuntimeEvent::Error { id, .. }
            | RuntimeEvent::Other { id, .. } => id,
        }
    }

    /// True when this event ends the turn: the session went idle for any
    /// reason but waiting for an action, or terminated.
    pub fn ends_turn(&self) -> bool {
        match self {
            RuntimeEvent::Status {
                state: SessionState::Terminated,
                ..
            } => true,
            RuntimeEvent::Status {
                state: SessionState::Idle,
                stop_reason,
                ..
            } => !matches!(stop_reason, Some(StopReason::RequiresAction { .. })),
            _ => false,
        }
    }
}

/// What went wrong talking to a runtime; [`ProviderError::is_transient`]
/// decides whether the bridge retries.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Connection refused, timed out, dropped, or a 5xx.
    #[error("runtime unavailable: {0}")]
    Unavailable(String),
    /// HTTP 429; retry after the given time when the runtime said.
    #[error("runtime rate limited")]
    RateLimited { retry_after: Option<Duration> },
    /// The runtime session does not exist (deleted, expired).
    #[error("runtime session not found: {0}")]
    SessionNotFound(String),
    /// Bad credentials or permissions (401/403).
    #[error("runtime refused the credentials: {0}")]
    Unauthorized(String),
    /// The runtime rejected the request (other 4xx).
    #[error("runtime rejected the request: {0}")]
    Rejected(String),
    /// The runtime answered something we could not understand.
    #[error("unexpected runtime response: {0}")]
    Protocol(String),
    /// The provider does not support this operation.
    #[error("not supported by this runtime: {0}")]
    Unsupported(&'static str),
}

impl ProviderError {
    /// Whether trying the same call again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ProviderError::Unavailable(_) | ProviderError::RateLimited { .. }
        )
    }
}

/// An agent runtime.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Short name used in config and events ("claude", "echo").
    fn name(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// Creates a runtime session and returns its id.
    async fn create_session(&self, spec: &SessionSpec) -> Result<String>;

    /// Opens the session's event stream. With `after = None` the stream
    /// carries events produced from now on; with `Some(id)` it first
    /// delivers every event after that event id (catch-up), then live ones.
    /// When this returns the stream is connected, so events caused by a
    /// later [`Provider::send_message`] are not missed. The stream
    /// reconnects by itself and never yields an event twice; it ends only
    /// when dropped or on a permanent error.
    async fn event_stream(&self, session_id: &str, after: Option<&str>) -> Result<EventStream>;

    /// Sends a user message; returns the runtime's id of the user event,
    /// which anchors the turn (every event of the turn comes after it).
    async fn send_message(&self, session_id: &str, message: &UserMessage) -> Result<String>;

    /// Interrupts the running turn.
    async fn interrupt(&self, session_id: &str) -> Result<()>;

    /// Answers a tool-permission request.
    async fn confirm_tool(
        &self,
        session_id: &str,
        tool_use_id: &str,
        decision: ToolDecision,
    ) -> Result<()>;

    /// Returns a custom tool's output to the agent.
    async fn submit_tool_result(
        &self,
        session_id: &str,
        tool_use_id: &str,
        output: ToolOutput,
    ) -> Result<()>;

    /// Ends the runtime session. Unknown sessions are not an error.
    async fn destroy(&self, session_id: &str) -> Result<()>;

    /// Checks a working directory asked for with `/new <dir>` and returns
    /// it in the form the runtime will use; `Err` says why not, for people.
    fn validate_cwd(&self, dir: &str) -> std::result::Result<String, String> {
        let _ = dir;
        Err(format!(
            "The {} runtime does not work in a directory; use /new without one.",
            self.name()
        ))
    }

    /// The working directory of sessions created without one (runtimes
    /// that run locally); `None` for runtimes without directories.
    fn default_working_dir(&self) -> Option<String> {
        None
    }

    /// The runtime's existing sessions, newest first: `limit` of them after
    /// skipping `offset`.
    async fn list_sessions(&self, offset: usize, limit: usize) -> Result<Vec<SessionInfo>> {
        let _ = (offset, limit);
        Err(ProviderError::Unsupported("listing sessions"))
    }

    /// The last `limit` agent and user messages of a session, oldest first,
    /// as (role, text) with role "user" or "agent".
    async fn recent_messages(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        let _ = (session_id, limit);
        Err(ProviderError::Unsupported("reading session history"))
    }
}
