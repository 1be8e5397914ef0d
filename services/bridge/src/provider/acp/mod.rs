//! Local coding agents over the Agent Client Protocol (ACP) v1.
//!
//! Each session runs its own agent child (`gemini --acp`,
//! `claude-agent-acp`, `codex-acp`, …) in a working directory, and talks
//! JSON-RPC to it over the child's stdin/stdout with the
//! `agent-client-protocol` crate. The client advertises no file system and
//! no terminal: the agent works on the directory by itself and asks before
//! running tools (`session/request_permission`), which the bridge answers
//! with [`Provider::confirm_tool`].
//!
//! The session id we hand out is our own and outlives the child: when the
//! child exits or hangs, the turn in progress ends with an error event, and
//! the next message starts a new child (loading the agent's session with
//! `session/load` when the agent can, else starting a fresh one in the same
//! directory).
//!
//! Every child runs in its own process group, killed as a whole on
//! [`Provider::destroy`], when it fails, and when the provider is dropped,
//! so wrappers such as `npx` leave nothing behind.

mod log;
mod process;
mod pump;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agent_client_protocol::v1::Responder;
use agent_client_protocol::v1::schema::{
    CancelNotification, ContentBlock, ImageContent, PermissionOption as AcpPermissionOption,
    PermissionOptionKind, PromptRequest, RequestPermissionOutcome, RequestPermissionResponse,
    SelectedPermissionOutcome, SessionId, TextContent,
};
use async_trait::async_trait;
use base64::Engine;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use self::log::EventLog;
use self::process::{AgentProcess, Incoming, Launch, ProcessGroups};
use super::{
    Capabilities, EventStream, Provider, ProviderError, Result, RuntimeEvent, SessionSpec,
    SessionState, ToolDecision, ToolOutput, UserMessage,
};

/// Settings of one ACP agent runtime (`[acp.<name>]` in the config).
///
/// Every field but `command` has a default; durations are written like
/// `"30s"` or `"10m"`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AcpConfig {
    /// The agent program, looked up on `PATH` (`gemini`, `claude-agent-acp`,
    /// `npx`). Required.
    pub command: String,
    /// Its arguments (`["--acp"]`). Default: none.
    pub args: Vec<String>,
    /// Extra environment variables for the agent (API keys, …), on top of
    /// the bridge's own. Default: none. Values are never logged.
    pub env: BTreeMap<String, String>,
    /// Working directory of sessions that name none. Default: empty, the
    /// bridge's own working directory.
    pub default_cwd: PathBuf,
    /// Directories under which sessions may work (`/new <dir>`); a directory
    /// outside all of them is refused. Default: empty, meaning only
    /// `default_cwd` and the directories below it.
    pub allowed_roots: Vec<PathBuf>,
    /// How long the agent may take to answer `initialize`, `session/new`
    /// or `session/load`, and how long a message waits for the previous
    /// turn to end. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// An agent that sends nothing for this long in the middle of a turn
    /// (not counting time spent waiting for a permission answer) is
    /// considered hung and stopped. Default `10m`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Recent events kept per session for catch-up (at least 16). Default
    /// 1024.
    pub replay_events: usize,
}

impl Default for AcpConfig {
    fn default() -> Self {
        AcpConfig {
            command: String::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            default_cwd: PathBuf::new(),
            allowed_roots: Vec::new(),
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(600),
            replay_events: 1024,
        }
    }
}

impl fmt::Debug for AcpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Environment values are often keys: names only.
        let env: Vec<&String> = self.env.keys().collect();
        f.debug_struct("AcpConfig")
            .field("command", &self.command)
            .field("args", &self.args)
            .field("env", &env)
            .field("default_cwd", &self.default_cwd)
            .field("allowed_roots", &self.allowed_roots)
            .field("request_timeout", &self.request_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("replay_events", &self.replay_events)
            .finish()
    }
}

impl AcpConfig {
    /// Checks what can be checked without touching the file system.
    ///
    /// # Errors
    /// A message naming the bad key (relative to the runtime's table).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.command.trim().is_empty() {
            return Err("command is required (the agent program, e.g. \"gemini\")".into());
        }
        if self.request_timeout.is_zero() {
            return Err("request_timeout must be greater than 0".into());
        }
        if self.idle_timeout.is_zero() {
            return Err("idle_timeout must be greater than 0".into());
        }
        Ok(())
    }
}

/// A permission request the agent waits on.
struct PendingPermission {
    responder: Responder<RequestPermissionResponse>,
    options: Vec<AcpPermissionOption>,
}

/// What a session's pump and the provider share.
struct SessionShared {
    id: String,
    log: Arc<EventLog>,
    /// Unanswered permission requests, by event id.
    pending: Mutex<HashMap<String, PendingPermission>>,
}

impl SessionShared {
    fn pending(&self) -> MutexGuard<'_, HashMap<String, PendingPermission>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending_is_empty(&self) -> bool {
        self.pending().is_empty()
    }

    fn add_pending(&self, id: String, pending: PendingPermission) {
        self.pending().insert(id, pending);
    }

    /// Answers every pending permission request with "cancelled".
    fn cancel_pending(&self) {
        let pending: Vec<PendingPermission> = self.pending().drain().map(|(_, p)| p).collect();
        for pending in pending {
            let _ = pending.responder.respond(RequestPermissionResponse::new(
                RequestPermissionOutcome::Cancelled,
            ));
        }
    }
}

/// One session: its log, its working directory and its current child.
struct Session {
    shared: Arc<SessionShared>,
    cwd: PathBuf,
    /// The running child, if any (it may have died since).
    agent: Mutex<Option<Arc<AgentProcess>>>,
    /// The agent's session id, to load it again after a restart.
    acp_session: Mutex<Option<SessionId>>,
    /// Serializes starting a child and sending prompts.
    sending: tokio::sync::Mutex<()>,
}

impl Session {
    fn agent(&self) -> Option<Arc<AgentProcess>> {
        self.agent.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_agent(&self, agent: Option<Arc<AgentProcess>>) {
        *self.agent.lock().unwrap_or_else(|e| e.into_inner()) = agent;
    }
}

/// A [`Provider`] running local agents over ACP, one child per session.
pub struct AcpProvider {
    name: &'static str,
    config: AcpConfig,
    default_cwd: PathBuf,
    roots: Vec<PathBuf>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    groups: Arc<ProcessGroups>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl fmt::Debug for AcpProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcpProvider")
            .field("name", &self.name)
            .field("command", &self.config.command)
            .field("default_cwd", &self.default_cwd)
            .finish_non_exhaustive()
    }
}

impl AcpProvider {
    /// A runtime called `name` (the name routes use) running the configured
    /// agent.
    ///
    /// # Errors
    /// [`ProviderError::Rejected`] when the configuration is invalid, the
    /// default directory or an allowed root does not exist, or the default
    /// directory is outside the allowed roots.
    pub fn new(name: &'static str, config: AcpConfig) -> Result<Self> {
        config
            .validate()
            .map_err(|e| ProviderError::Rejected(format!("acp.{name}: {e}")))?;
        let default_cwd = if config.default_cwd.as_os_str().is_empty() {
            std::env::current_dir().map_err(|e| {
                ProviderError::Rejected(format!("acp.{name}: no current directory: {e}"))
            })?
        } else {
            expand_home(&config.default_cwd)
        };
        let default_cwd = canonical_dir(&default_cwd)
            .map_err(|e| ProviderError::Rejected(format!("acp.{name}.default_cwd: {e}")))?;
        let roots = if config.allowed_roots.is_empty() {
            vec![default_cwd.clone()]
        } else {
            config
                .allowed_roots
                .iter()
                .map(|root| canonical_dir(&expand_home(root)))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| ProviderError::Rejected(format!("acp.{name}.allowed_roots: {e}")))?
        };
        if !roots.iter().any(|root| default_cwd.starts_with(root)) {
            return Err(ProviderError::Rejected(format!(
                "acp.{name}.default_cwd {} is outside allowed_roots",
                default_cwd.display()
            )));
        }
        Ok(AcpProvider {
            name,
            config,
            default_cwd,
            roots,
            sessions: Mutex::new(HashMap::new()),
            groups: Arc::new(ProcessGroups::default()),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        })
    }

    /// The directory a session would work in for `dir` (as typed after
    /// `/new`): `~` is the home directory, a relative path is relative to
    /// the default directory. The result is canonical (symlinks and `..`
    /// resolved), so it cannot escape the allowed roots.
    ///
    /// # Errors
    /// A message for the user when the directory does not exist, is not a
    /// directory, or is outside the allowed roots.
    pub fn check_cwd(&self, dir: impl AsRef<Path>) -> std::result::Result<PathBuf, String> {
        let dir = expand_home(dir.as_ref());
        let dir = if dir.is_absolute() {
            dir
        } else {
            self.default_cwd.join(dir)
        };
        let canonical = canonical_dir(&dir)?;
        if self.roots.iter().any(|root| canonical.starts_with(root)) {
            Ok(canonical)
        } else {
            let roots: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
            Err(format!(
                "{} is outside the directories agents may work in ({})",
                canonical.display(),
                roots.join(", ")
            ))
        }
    }

    /// The default working directory (canonical).
    pub fn default_cwd(&self) -> &Path {
        &self.default_cwd
    }

    fn session(&self, id: &str) -> Result<Arc<Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ProviderError::SessionNotFound(id.to_owned()))
    }

    /// Starts a child for the session and its pump.
    async fn launch(&self, session: &Session) -> Result<Arc<AgentProcess>> {
        let resume = session
            .acp_session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (agent, rx) = process::launch(Launch {
            runtime: self.name,
            session: &session.shared.id,
            config: &self.config,
            cwd: &session.cwd,
            resume,
            groups: &self.groups,
            tracker: &self.tracker,
            shutdown: &self.shutdown,
        })
        .await?;
        *session
            .acp_session
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(agent.acp_session.clone());
        let pump = pump::Pump::new(
            session.shared.clone(),
            agent.clone(),
            rx,
            self.config.idle_timeout,
        );
        let span = tracing::info_span!(parent: None, "acp_pump", runtime = self.name, session = %session.shared.id);
        self.tracker.spawn(pump.run().instrument(span));
        session.set_agent(Some(agent.clone()));
        Ok(agent)
    }

    /// The prompt's content blocks: the text, images when the agent takes
    /// them, and the names of the files it cannot take.
    fn prompt(agent: &AgentProcess, message: &UserMessage) -> Vec<ContentBlock> {
        let mut text = message.text.clone();
        let mut blocks = Vec::new();
        for file in &message.files {
            if agent.images && file.mime_type.starts_with("image/") {
                let data = base64::engine::general_purpose::STANDARD.encode(&file.data);
                blocks.push(ContentBlock::Image(ImageContent::new(
                    data,
                    file.mime_type.clone(),
                )));
            } else {
                text.push_str(&format!(
                    "\n[attached file {} ({}, {} bytes) could not be passed to the agent]",
                    file.file_name,
                    file.mime_type,
                    file.data.len()
                ));
            }
        }
        blocks.insert(0, ContentBlock::Text(TextContent::new(text)));
        blocks
    }
}

impl Drop for AcpProvider {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let sessions: Vec<Arc<Session>> = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, session)| session)
            .collect();
        for session in sessions {
            session.shared.cancel_pending();
        }
        // Synchronously: the runtime may be going away with the tasks that
        // would otherwise do it.
        self.groups.kill_all();
    }
}

#[async_trait]
impl Provider for AcpProvider {
    fn name(&self) -> &'static str {
        self.name
    }

    fn validate_cwd(&self, dir: &str) -> std::result::Result<String, String> {
        self.check_cwd(dir).map(|dir| dir.display().to_string())
    }

    fn default_working_dir(&self) -> Option<String> {
        Some(self.default_cwd.display().to_string())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            streaming_deltas: true,
            tool_confirmation: true,
            interrupt: true,
            working_directory: true,
            in_process: true,
            ..Capabilities::default()
        }
    }

    async fn create_session(&self, spec: &SessionSpec) -> Result<String> {
        let cwd = match &spec.cwd {
            Some(dir) => self.check_cwd(dir).map_err(ProviderError::Rejected)?,
            None => self.default_cwd.clone(),
        };
        let id = format!("acps_{}", uuid::Uuid::now_v7().simple());
        let session = Arc::new(Session {
            shared: Arc::new(SessionShared {
                id: id.clone(),
                log: EventLog::new(self.config.replay_events),
                pending: Mutex::new(HashMap::new()),
            }),
            cwd,
            agent: Mutex::new(None),
            acp_session: Mutex::new(None),
            sending: tokio::sync::Mutex::new(()),
        });
        self.launch(&session).await?;
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), session);
        tracing::info!(runtime = self.name, session = %id, "acp session created");
        Ok(id)
    }

    async fn event_stream(&self, session_id: &str, after: Option<&str>) -> Result<EventStream> {
        self.session(session_id)?.shared.log.stream(after)
    }

    async fn send_message(&self, session_id: &str, message: &UserMessage) -> Result<String> {
        let session = self.session(session_id)?;
        let _sending = session.sending.lock().await;
        // A turn still running (interrupted, but the agent has not confirmed
        // yet) must end first: agents take one prompt at a time.
        if let Some(agent) = session.agent().filter(|a| a.is_alive()) {
            let mut turn = agent.turn.subscribe();
            let ended = tokio::time::timeout(self.config.request_timeout, turn.wait_for(|t| !t));
            if !matches!(ended.await, Ok(Ok(_))) {
                return Err(ProviderError::Unavailable(
                    "the agent is still busy with the previous turn".into(),
                ));
            }
        }
        let agent = match session.agent().filter(|a| a.is_alive()) {
            Some(agent) => agent,
            None => {
                if let Some(dead) = session.agent() {
                    dead.kill();
                }
                tracing::info!(runtime = self.name, session = %session_id, "restarting acp agent");
                let agent = self.launch(&session).await?;
                session.shared.log.emit(|id| RuntimeEvent::Other {
                    id,
                    event_type: "agent.restarted".into(),
                });
                agent
            }
        };
        let blocks = Self::prompt(&agent, message);
        let log = &session.shared.log;
        let user_event = log.emit(|id| RuntimeEvent::Other {
            id,
            event_type: "user.message".into(),
        });
        log.emit(|id| RuntimeEvent::Status {
            id,
            state: SessionState::Running,
            stop_reason: None,
        });
        agent.turn.send_replace(true);
        agent.poke();
        let tx = agent.incoming();
        let sent = agent
            .conn
            .prepare_request(PromptRequest::new(agent.acp_session.clone(), blocks))
            .on_receiving_result(move |result| {
                let _ = tx.send(Incoming::PromptDone(result));
                futures::future::ready(Ok(()))
            });
        if let Err(err) = sent {
            // The connection is gone: the next message starts a new child.
            agent.kill();
            return Err(ProviderError::Unavailable(format!(
                "cannot send the prompt to the agent: {err}"
            )));
        }
        Ok(user_event)
    }

    async fn interrupt(&self, session_id: &str) -> Result<()> {
        let session = self.session(session_id)?;
        let Some(agent) = session.agent().filter(|a| a.is_alive()) else {
            return Ok(());
        };
        agent
            .conn
            .send_notification(CancelNotification::new(agent.acp_session.clone()))
            .map_err(|e| ProviderError::Unavailable(format!("cannot cancel the turn: {e}")))?;
        // ACP: after session/cancel the client answers every pending
        // permission request with "cancelled".
        session.shared.cancel_pending();
        agent.poke();
        Ok(())
    }

    async fn confirm_tool(
        &self,
        session_id: &str,
        tool_use_id: &str,
        decision: ToolDecision,
    ) -> Result<()> {
        let session = self.session(session_id)?;
        let pending = {
            let mut all = session.shared.pending();
            let Some(pending) = all.get(tool_use_id) else {
                return Err(ProviderError::Rejected(format!(
                    "no permission request {tool_use_id} is waiting in session {session_id} \
                     (unknown, already answered, or cancelled)"
                )));
            };
            let outcome = outcome(&pending.options, &decision)?;
            all.remove(tool_use_id).map(|p| (p, outcome))
        };
        let Some((pending, outcome)) = pending else {
            return Ok(());
        };
        pending
            .responder
            .respond(RequestPermissionResponse::new(outcome))
            .map_err(|e| ProviderError::Unavailable(format!("cannot answer the agent: {e}")))?;
        if let Some(agent) = session.agent() {
            session.shared.log.emit(|id| RuntimeEvent::Status {
                id,
                state: SessionState::Running,
                stop_reason: None,
            });
            agent.poke();
        }
        Ok(())
    }

    async fn submit_tool_result(&self, _: &str, _: &str, _: ToolOutput) -> Result<()> {
        Err(ProviderError::Unsupported("custom tools"))
    }

    async fn destroy(&self, session_id: &str) -> Result<()> {
        let session = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(session_id);
        if let Some(session) = session {
            if let Some(agent) = session.agent() {
                agent.kill();
            }
            session.set_agent(None);
            session.shared.cancel_pending();
            session.shared.log.close();
            tracing::info!(runtime = self.name, session = %session_id, "acp session destroyed");
        }
        Ok(())
    }
}

/// The answer to send for `decision`, given the options offered.
fn outcome(
    options: &[AcpPermissionOption],
    decision: &ToolDecision,
) -> Result<RequestPermissionOutcome> {
    let first_of = |kinds: &[PermissionOptionKind]| {
        kinds.iter().find_map(|kind| {
            options
                .iter()
                .find(|option| option.kind == *kind)
                .map(|option| option.option_id.clone())
        })
    };
    let selected = |id| RequestPermissionOutcome::Selected(SelectedPermissionOutcome::new(id));
    match decision {
        ToolDecision::Option { option_id } => options
            .iter()
            .find(|option| option.option_id.0.as_ref() == option_id.as_str())
            .map(|option| selected(option.option_id.clone()))
            .ok_or_else(|| {
                let offered: Vec<String> =
                    options.iter().map(|o| o.option_id.to_string()).collect();
                ProviderError::Rejected(format!(
                    "option {option_id} was not offered (offered: {})",
                    offered.join(", ")
                ))
            }),
        ToolDecision::Allow => first_of(&[
            PermissionOptionKind::AllowOnce,
            PermissionOptionKind::AllowAlways,
        ])
        .map(selected)
        .ok_or_else(|| ProviderError::Rejected("the agent offered no option to allow".into())),
        // ACP has no place for the reason. Without a reject option,
        // cancelling is the way to say no.
        ToolDecision::Deny { .. } => Ok(first_of(&[
            PermissionOptionKind::RejectOnce,
            PermissionOptionKind::RejectAlways,
        ])
        .map_or(RequestPermissionOutcome::Cancelled, selected)),
        ToolDecision::Cancelled => Ok(RequestPermissionOutcome::Cancelled),
    }
}

/// `~` and `~/…` relative to `$HOME`.
fn expand_home(path: &Path) -> PathBuf {
    let mut components = path.components();
    if components.next() == Some(Component::Normal("~".as_ref()))
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(components.as_path());
    }
    path.to_path_buf()
}

fn canonical_dir(path: &Path) -> std::result::Result<PathBuf, String> {
    let canonical = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if canonical.is_dir() {
        Ok(canonical)
    } else {
        Err(format!("{} is not a directory", canonical.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(id: &'static str, kind: PermissionOptionKind) -> AcpPermissionOption {
        AcpPermissionOption::new(id, id, kind)
    }

    #[test]
    fn decisions_pick_the_option_of_the_right_kind() {
        let options = vec![
            option("always", PermissionOptionKind::AllowAlways),
            option("once", PermissionOptionKind::AllowOnce),
            option("no", PermissionOptionKind::RejectAlways),
        ];
        let chosen = |decision| match outcome(&options, &decision) {
            Ok(RequestPermissionOutcome::Selected(s)) => s.option_id.to_string(),
            Ok(RequestPermissionOutcome::Cancelled) => "cancelled".into(),
            Ok(_) => "other".into(),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(chosen(ToolDecision::Allow), "once");
        assert_eq!(chosen(ToolDecision::Deny { message: None }), "no");
        assert_eq!(chosen(ToolDecision::Cancelled), "cancelled");
        assert_eq!(
            chosen(ToolDecision::Option {
                option_id: "always".into()
            }),
            "always"
        );
        assert!(
            chosen(ToolDecision::Option {
                option_id: "nope".into()
            })
            .starts_with("error")
        );
        let allow_only = vec![option("yes", PermissionOptionKind::AllowAlways)];
        assert!(matches!(
            outcome(&allow_only, &ToolDecision::Deny { message: None }),
            Ok(RequestPermissionOutcome::Cancelled)
        ));
    }

    #[test]
    fn config_needs_a_command_and_rejects_unknown_keys() {
        assert!(AcpConfig::default().validate().is_err());
        let config: AcpConfig =
            serde_json::from_str(r#"{"command":"gemini","args":["--acp"],"idle_timeout":"5m"}"#)
                .unwrap();
        assert_eq!(config.idle_timeout, Duration::from_secs(300));
        assert!(config.validate().is_ok());
        assert!(serde_json::from_str::<AcpConfig>(r#"{"command":"x","nope":1}"#).is_err());
    }
}
