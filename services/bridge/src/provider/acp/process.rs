//! One agent child process and its ACP connection: spawning it in its own
//! process group, logging its stderr, noticing its exit, the `initialize` +
//! `session/new` (or `session/load`) handshake, and killing the whole group.

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_client_protocol::schema::ProtocolVersion;
use agent_client_protocol::v1::schema::{
    ClientCapabilities, Implementation, InitializeRequest, LoadSessionRequest, LoadSessionResponse,
    NewSessionRequest, PromptResponse, RequestPermissionOutcome, RequestPermissionRequest,
    RequestPermissionResponse, SessionId, SessionNotification,
};
use agent_client_protocol::v1::{ConnectionTo, Responder};
use agent_client_protocol::{Agent, ByteStreams, Client};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::super::{ProviderError, Result};
use super::AcpConfig;

/// What the connection and the child report to the session's pump, in the
/// order they happened on the wire.
pub(super) enum Incoming {
    /// A `session/update` notification.
    Update(Box<SessionNotification>),
    /// A `session/request_permission` request, answered later.
    Permission(
        Box<RequestPermissionRequest>,
        Responder<RequestPermissionResponse>,
    ),
    /// The response to our `session/prompt`.
    PromptDone(std::result::Result<PromptResponse, agent_client_protocol::Error>),
    /// The response to `session/load` (only while launching).
    LoadDone(std::result::Result<LoadSessionResponse, agent_client_protocol::Error>),
    /// Something happened on our side (a prompt was sent, a permission
    /// answered): the agent has work again, restart the idle clock.
    Poke,
    /// The connection ended (stdout closed, or a protocol error).
    Closed(String),
    /// The child process exited.
    Exited(String),
}

/// Process groups of the agents still running, so that dropping the
/// provider can kill them all synchronously.
#[derive(Default)]
pub(super) struct ProcessGroups {
    live: Mutex<HashSet<i32>>,
}

impl ProcessGroups {
    fn insert(&self, pgid: i32) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pgid);
    }

    /// Kills every process of the group (the agent and whatever it
    /// started), once.
    pub(super) fn kill(&self, pgid: i32) {
        let was_live = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pgid);
        if was_live {
            kill_group(pgid);
        }
    }

    /// Kills every group still running.
    pub(super) fn kill_all(&self) {
        let groups: Vec<i32> = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for pgid in groups {
            kill_group(pgid);
        }
    }
}

fn kill_group(pgid: i32) {
    let Some(pid) = rustix::process::Pid::from_raw(pgid) else {
        return;
    };
    match rustix::process::kill_process_group(pid, rustix::process::Signal::KILL) {
        Ok(()) => tracing::debug!(pgid, "killed agent process group"),
        // Already gone.
        Err(rustix::io::Errno::SRCH) => {}
        Err(err) => tracing::warn!(pgid, error = %err, "cannot kill agent process group"),
    }
}

/// A running agent child with an initialized ACP session.
pub(super) struct AgentProcess {
    /// Process id of the child, also its process group id.
    pub(super) pid: i32,
    pub(super) conn: ConnectionTo<Agent>,
    /// The agent's id of the session.
    pub(super) acp_session: SessionId,
    /// The agent accepts image content blocks.
    pub(super) images: bool,
    /// Whether a turn (a `session/prompt`) is in flight.
    pub(super) turn: watch::Sender<bool>,
    incoming: mpsc::UnboundedSender<Incoming>,
    stop: CancellationToken,
    groups: Arc<ProcessGroups>,
    dead: AtomicBool,
}

impl AgentProcess {
    /// Kills the child's process group and stops its tasks.
    pub(super) fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.groups.kill(self.pid);
        self.stop.cancel();
    }

    /// Whether the child is still usable.
    pub(super) fn is_alive(&self) -> bool {
        !self.dead.load(Ordering::SeqCst) && !self.conn.is_incoming_closed()
    }

    /// Resolves once the process is killed or stopped.
    pub(super) async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    /// Tells the pump that the agent has work again.
    pub(super) fn poke(&self) {
        let _ = self.incoming.send(Incoming::Poke);
    }

    /// A sender for the response of a request we publish.
    pub(super) fn incoming(&self) -> mpsc::UnboundedSender<Incoming> {
        self.incoming.clone()
    }
}

/// What launching a child needs.
pub(super) struct Launch<'a> {
    pub(super) runtime: &'static str,
    /// Our session id, for logs.
    pub(super) session: &'a str,
    pub(super) config: &'a AcpConfig,
    pub(super) cwd: &'a Path,
    /// The agent's session to load, when restarting.
    pub(super) resume: Option<SessionId>,
    pub(super) groups: &'a Arc<ProcessGroups>,
    pub(super) tracker: &'a TaskTracker,
    pub(super) shutdown: &'a CancellationToken,
}

/// Starts the agent and opens its session; returns it with the receiver of
/// its traffic, for the pump.
pub(super) async fn launch(
    launch: Launch<'_>,
) -> Result<(Arc<AgentProcess>, mpsc::UnboundedReceiver<Incoming>)> {
    let Launch {
        runtime,
        session,
        config,
        cwd,
        resume,
        groups,
        tracker,
        shutdown,
    } = launch;
    let mut command = tokio::process::Command::new(&config.command);
    command
        .args(&config.args)
        .envs(&config.env)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group: killing the group also kills what a wrapper such
        // as npx started.
        .process_group(0);
    let mut child = command.spawn().map_err(|err| {
        ProviderError::Rejected(format!("cannot start agent `{}`: {err}", config.command))
    })?;
    let pid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .ok_or_else(|| ProviderError::Unavailable("agent exited at once".into()))?;
    groups.insert(pid);
    // Its own root: the child outlives the request that started it.
    let span = tracing::info_span!(parent: None, "acp_agent", runtime, session, pid);
    tracing::info!(parent: &span, command = %config.command, cwd = %cwd.display(), "started acp agent");

    let stop = shutdown.child_token();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        groups.kill(pid);
        return Err(ProviderError::Unavailable(
            "agent stdio was not captured".into(),
        ));
    };

    tracker.spawn(log_stderr(stderr, stop.clone()).instrument(span.clone()));
    tracker.spawn(
        {
            let (stop, tx, groups) = (stop.clone(), tx.clone(), groups.clone());
            async move {
                let status = tokio::select! {
                    status = child.wait() => Some(status),
                    () = stop.cancelled() => None,
                };
                // Whatever it started goes with it.
                groups.kill(pid);
                match status {
                    Some(status) => {
                        let status = match status {
                            Ok(status) => status.to_string(),
                            Err(err) => format!("cannot wait for it: {err}"),
                        };
                        tracing::info!(%status, "acp agent exited");
                        let _ = tx.send(Incoming::Exited(status));
                    }
                    // Reap it.
                    None => {
                        let _ = child.kill().await;
                    }
                }
            }
        }
        .instrument(span.clone()),
    );

    let (conn_tx, conn_rx) = oneshot::channel();
    tracker.spawn(
        serve_connection(
            ByteStreams::new(stdin.compat_write(), stdout.compat()),
            tx.clone(),
            conn_tx,
            stop.clone(),
        )
        .instrument(span.clone()),
    );
    let fail = |err: ProviderError| {
        groups.kill(pid);
        stop.cancel();
        err
    };
    let conn = conn_rx
        .await
        .map_err(|_| fail(ProviderError::Unavailable("agent connection ended".into())))?;

    let (acp_session, images) = handshake(&conn, &tx, &mut rx, config, cwd, resume)
        .instrument(span)
        .await
        .map_err(fail)?;
    let process = AgentProcess {
        pid,
        conn,
        acp_session,
        images,
        turn: watch::Sender::new(false),
        incoming: tx,
        stop,
        groups: groups.clone(),
        dead: AtomicBool::new(false),
    };
    Ok((Arc::new(process), rx))
}

/// `initialize`, then `session/load` (when resuming and the agent can) or
/// `session/new`, each within the request timeout.
/// Returns the agent's session id and whether it accepts images.
async fn handshake(
    conn: &ConnectionTo<Agent>,
    tx: &mpsc::UnboundedSender<Incoming>,
    rx: &mut mpsc::UnboundedReceiver<Incoming>,
    config: &AcpConfig,
    cwd: &Path,
    resume: Option<SessionId>,
) -> Result<(SessionId, bool)> {
    let limit = config.request_timeout;
    let init = InitializeRequest::new(ProtocolVersion::V1)
        // No file system, no terminal: the agent works in its own cwd.
        .client_capabilities(ClientCapabilities::new())
        .client_info(Implementation::new(
            "harnessgate",
            env!("CARGO_PKG_VERSION"),
        ));
    let init = within(limit, "initialize", conn.send_request(init).block_task()).await?;
    if init.protocol_version != ProtocolVersion::V1 {
        return Err(ProviderError::Rejected(format!(
            "agent speaks ACP protocol version {}, not 1",
            init.protocol_version
        )));
    }
    let capabilities = init.agent_capabilities;
    let images = capabilities.prompt_capabilities.image;

    if let Some(previous) = resume.filter(|_| capabilities.load_session) {
        let request = LoadSessionRequest::new(previous.clone(), cwd);
        let tx = tx.clone();
        conn.prepare_request(request)
            .on_receiving_result(move |result| {
                let _ = tx.send(Incoming::LoadDone(result));
                futures::future::ready(Ok(()))
            })
            .map_err(|err| ProviderError::Unavailable(format!("session/load: {err}")))?;
        // The agent replays the history as updates before it answers; the
        // bridge has seen it already.
        let loaded = tokio::time::timeout(limit, async {
            while let Some(incoming) = rx.recv().await {
                match incoming {
                    Incoming::LoadDone(result) => return Some(result),
                    Incoming::Permission(_, responder) => {
                        let _ = responder.respond(RequestPermissionResponse::new(
                            RequestPermissionOutcome::Cancelled,
                        ));
                    }
                    Incoming::Closed(_) | Incoming::Exited(_) => return None,
                    _ => {}
                }
            }
            None
        })
        .await
        .map_err(|_| timed_out("session/load", limit))?;
        match loaded {
            Some(Ok(_)) => {
                tracing::info!(acp_session = %previous, "acp session loaded");
                return Ok((previous, images));
            }
            Some(Err(err)) => {
                tracing::warn!(error = %err, "agent cannot load its session, starting a new one");
            }
            None => {
                return Err(ProviderError::Unavailable(
                    "agent exited during session/load".into(),
                ));
            }
        }
    }
    let created = within(
        limit,
        "session/new",
        conn.send_request(NewSessionRequest::new(cwd)).block_task(),
    )
    .await?;
    tracing::info!(acp_session = %created.session_id, "acp session created");
    Ok((created.session_id, images))
}

async fn within<T>(
    limit: Duration,
    method: &str,
    request: impl Future<Output = std::result::Result<T, agent_client_protocol::Error>>,
) -> Result<T> {
    match tokio::time::timeout(limit, request).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(err)) => Err(ProviderError::Unavailable(format!(
            "agent failed {method}: {err}"
        ))),
        Err(_) => Err(timed_out(method, limit)),
    }
}

fn timed_out(method: &str, limit: Duration) -> ProviderError {
    ProviderError::Unavailable(format!("agent did not answer {method} within {limit:?}"))
}

/// Runs the JSON-RPC connection until the agent closes stdout or we stop.
async fn serve_connection(
    transport: impl agent_client_protocol::ConnectTo<Client> + 'static,
    tx: mpsc::UnboundedSender<Incoming>,
    conn_tx: oneshot::Sender<ConnectionTo<Agent>>,
    stop: CancellationToken,
) {
    let updates = tx.clone();
    let permissions = tx.clone();
    let result = Client
        .v1()
        .name("harnessgate")
        .on_receive_notification(
            async move |notification: SessionNotification, _cx| {
                let _ = updates.send(Incoming::Update(Box::new(notification)));
                Ok(())
            },
            agent_client_protocol::on_receive_notification!(),
        )
        .on_receive_request(
            async move |request: RequestPermissionRequest,
                        responder: Responder<RequestPermissionResponse>,
                        _cx| {
                if let Err(mpsc::error::SendError(Incoming::Permission(_, responder))) =
                    permissions.send(Incoming::Permission(Box::new(request), responder))
                {
                    responder.respond(RequestPermissionResponse::new(
                        RequestPermissionOutcome::Cancelled,
                    ))?;
                }
                Ok(())
            },
            agent_client_protocol::on_receive_request!(),
        )
        .connect_with(transport, async move |cx: ConnectionTo<Agent>| {
            let _ = conn_tx.send(cx.clone());
            tokio::select! {
                () = stop.cancelled() => {}
                () = cx.incoming_closed() => {}
            }
            Ok(())
        })
        .await;
    let reason = match result {
        Ok(()) => "the agent closed its output".to_owned(),
        Err(err) => format!("connection failed: {err}"),
    };
    tracing::debug!(%reason, "acp connection ended");
    let _ = tx.send(Incoming::Closed(reason));
}

/// Logs the agent's stderr line by line.
async fn log_stderr(stderr: tokio::process::ChildStderr, stop: CancellationToken) {
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    loop {
        let line = tokio::select! {
            biased;
            line = lines.next_line() => line,
            () = stop.cancelled() => break,
        };
        match line {
            Ok(Some(line)) => {
                let lower = line.to_ascii_lowercase();
                if lower.contains("error") || lower.contains("panic") || lower.contains("fatal") {
                    tracing::warn!(line = %line, "agent stderr");
                } else {
                    tracing::info!(line = %line, "agent stderr");
                }
            }
            Ok(None) => break,
            Err(err) => {
                tracing::debug!(error = %err, "cannot read agent stderr");
                break;
            }
        }
    }
}
