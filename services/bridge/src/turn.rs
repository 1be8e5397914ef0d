//! One inbound message, start to finish: lease, route, session, turn,
//! reply, ack.

use std::time::{Duration, Instant};

use futures::StreamExt;
use hg_bus::consumer::Delivery;
use hg_bus::lease::Claim;
use hg_bus::presence::Presence;
use std::sync::Arc;

use crate::ownership::Ownership;
use hg_bus::{Bus, BusError};
use hg_proto::{
    AgentError, AgentEvent, AgentMessage, AgentThinking, ChatType, CustomToolRequest,
    InboundMessage, OutboundKind, OutboundMessage, Status, ToolResult, ToolUse, Usage, agent_event,
    subject,
};
use tracing::Instrument;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use crate::BridgeConfig;
use crate::Providers;
use crate::access::PairingStore;
use crate::approvals::{ACTION_TIMEOUT, ApprovalStore, Grant, GrantStore, StoredOption};
use crate::clock::SharedClock;
use crate::commands;
use crate::provider::{
    Provider, ProviderError, RuntimeEvent, SessionSpec, SessionState, StopReason, ToolDecision,
    ToolOutput, UserFile, UserMessage,
};
use crate::routing::{Decision, DeliveryMode, Route, Router};
use crate::session::{SessionRecord, SessionStore, TurnRecord, UsageTotals};
use crate::supervise::Ask;

/// Object store bucket where ingress services keep inbound files.
const FILES_BUCKET: &str = "hg_files";

/// What the user reads when the runtime cannot be reached for now.
const RETRYING_TEXT: &str =
    "⏳ The agent is unavailable right now. Your message is kept and will be retried.";
/// What the user reads when we gave up on a message.
const GAVE_UP_TEXT: &str =
    "❌ The agent could not be reached, so your message was not processed. Please try again later.";
/// What the user reads when a turn took too long.
const TIMEOUT_TEXT: &str = "⌛ The agent took too long to answer and was stopped.";

/// Subject on which a replica takes conversations forwarded to it.
pub(crate) fn forward_subject(replica: &str) -> String {
    format!("hg.bridge.forward.{}", subject::token(replica))
}

/// How long a replica that just took a conversation waits for earlier
/// messages forwarded by replicas that lost the race for it.
const CLAIM_SETTLE: Duration = Duration::from_millis(15);

/// How long a turn may take to end after `/stop` interrupted it.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub(crate) struct Bridge {
    pub bus: Bus,
    pub replica: String,
    /// Whether other replicas are running.
    pub presence: Presence,
    pub config: BridgeConfig,
    pub providers: Providers,
    pub sessions: SessionStore,
    pub ownership: Arc<Ownership>,
    pub router: Router,
    pub clock: SharedClock,
    pub approvals: ApprovalStore,
    pub grants: GrantStore,
    pub pairing: PairingStore,
    /// Turns running on this replica, by conversation key token.
    pub running: Mutex<HashMap<String, RunningTurn>>,
    /// When each conversation was last told about an error.
    pub error_notices: Mutex<HashMap<String, i64>>,
}

/// A turn running on this replica.
pub(crate) struct RunningTurn {
    pub started_ms: i64,
    pub stop: CancellationToken,
}

/// Removes a running turn from the registry when the turn ends.
struct RunningGuard<'a> {
    bridge: &'a Bridge,
    key: String,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.bridge
            .running
            .lock()
            .expect("running turns lock")
            .remove(&self.key);
    }
}

/// How handling an inbound message ended, which decides the ack.
pub(crate) enum Outcome {
    /// Done (answered, rejected, or given up with the user told).
    Done,
    /// Try again later.
    Retry { reason: String },
    /// Another replica holds the conversation.
    Busy { owner: String },
}

impl Outcome {
    /// Try again later, because of `reason`.
    pub(crate) fn retry(reason: impl std::fmt::Display) -> Outcome {
        Outcome::Retry {
            reason: reason.to_string(),
        }
    }
}

impl Bridge {
    pub(crate) async fn reject_malformed(&self, delivery: Delivery, error: BusError) {
        delivery
            .dead_letter(
                &self.bus,
                "bridge",
                &format!("malformed inbound payload: {error}"),
                delivery.deliveries(),
            )
            .await;
        let _ = delivery.term().await;
    }

    pub(crate) async fn handle(
        &self,
        key: String,
        delivery: Delivery,
        message: InboundMessage,
        queued: usize,
    ) -> Option<(Delivery, InboundMessage)> {
        let span = tracing::info_span!("inbound", session = %key, inbound = %message.id, platform = %message.platform);
        hg_bus::trace::set_parent(&span, delivery.headers());
        async {
            let lease_key = subject::token(&key);
            let outcome = match self.ownership.claim(&lease_key).await {
                Ok((Claim::Ours(_), true)) if !self.presence.alone() => {
                    // Just took the conversation: earlier messages of it may
                    // be on their way from replicas that lost the race. Let
                    // them arrive, then go back in line in stream order.
                    // (Alone, there is no one to lose a race.)
                    tokio::time::sleep(CLAIM_SETTLE).await;
                    return Some((delivery, message));
                }
                Ok((Claim::Ours(_), _)) => {
                    // Keep the conversation ours while the turn runs. The
                    // renewal (every third of the lease) is boxed so it
                    // does not size every turn's future.
                    let refresh = async {
                        loop {
                            tokio::time::sleep(self.ownership.refresh_every()).await;
                            match Box::pin(self.ownership.refresh(&lease_key)).await {
                                Ok(Claim::Ours(_)) => {}
                                Ok(Claim::Theirs(_)) => tracing::warn!("conversation lease lost mid-turn"),
                                Err(e) => tracing::warn!(error = %e, "cannot refresh the conversation lease"),
                            }
                        }
                    };
                    tokio::select! {
                        outcome = self.process(&key, &delivery, &message) => outcome,
                        () = refresh => unreachable!("the refresh loop never ends"),
                    }
                }
                Ok((Claim::Theirs(owner), _)) => Outcome::Busy { owner },
                Err(e) => Outcome::retry(e),
            };
            let ours = !matches!(outcome, Outcome::Busy { .. });
            match outcome {
                Outcome::Done => {
                    if let Err(e) = delivery.ack().await {
                        tracing::warn!(error = %e, "ack failed; the message may be redelivered");
                    }
                }
                Outcome::Busy { owner } => {
                    // The holder takes it into its ordered queue; if it does
                    // not answer (it died), the lease expires and the
                    // message comes back.
                    let forwarded = !owner.is_empty()
                        && owner != self.replica
                        && delivery
                            .forward(&self.bus, &forward_subject(&owner), Duration::from_secs(2))
                            .await
                            .is_ok();
                    if forwarded {
                        tracing::debug!(owner = %owner, "conversation held by another replica, forwarded");
                    } else {
                        let _ = delivery.nak(Duration::from_millis(200)).await;
                    }
                }
                Outcome::Retry { reason } => self.retry_or_give_up(&delivery, &message, &reason).await,
            }
            if ours && queued == 0 {
                // A runtime living in this process (an ACP agent) keeps its
                // conversation here; others move on after the linger.
                let local = self
                    .ownership
                    .cached_record(&lease_key)
                    .and_then(|r| self.providers.get(&r.runtime).cloned())
                    .is_some_and(|p| p.capabilities().in_process);
                if local {
                    self.ownership.keep(&lease_key);
                } else {
                    self.ownership.idle(&lease_key);
                }
            }
            None
        }
        .instrument(span)
        .await
    }

    pub(crate) async fn retry_or_give_up(
        &self,
        delivery: &Delivery,
        message: &InboundMessage,
        reason: &str,
    ) {
        let attempt = delivery.deliveries();
        if attempt >= self.config.max_attempts {
            tracing::error!(attempt, reason, "giving up on inbound message");
            delivery
                .dead_letter(
                    &self.bus,
                    "bridge",
                    &format!("runtime unavailable after {attempt} attempts: {reason}"),
                    attempt,
                )
                .await;
            self.notify(message, "gave-up", GAVE_UP_TEXT).await;
            let _ = delivery.term().await;
            return;
        }
        if attempt == 1 && !self.debounced(message) {
            self.notify(message, "retrying", RETRYING_TEXT).await;
        }
        let delay = self.config.retry_backoff * 2u32.saturating_pow(attempt.saturating_sub(1));
        let delay = delay.min(Duration::from_secs(300));
        tracing::warn!(
            attempt,
            delay_ms = delay.as_millis() as u64,
            reason,
            "runtime unavailable, will retry"
        );
        let _ = delivery.nak(delay).await;
    }

    async fn process(&self, key: &str, delivery: &Delivery, message: &InboundMessage) -> Outcome {
        let route = match self.router.route(message, key).await {
            Decision::Serve(route) => route,
            Decision::Reject { message: text } => {
                tracing::info!("sender not served");
                if !text.is_empty() {
                    self.notify(message, "rejected", &text).await;
                }
                return Outcome::Done;
            }
        };
        if !self.admitted(message, &route).await {
            return Outcome::Done;
        }
        let Some(provider) = self.providers.get(&route.runtime).cloned() else {
            tracing::error!(runtime = %route.runtime, "route names an unknown runtime");
            self.notify(
                message,
                "misrouted",
                "❌ This conversation is routed to a runtime that is not configured.",
            )
            .await;
            return Outcome::Done;
        };
        let record = match self.load_record(key).await {
            Ok(record) => record,
            Err(e) => {
                return Outcome::retry(e);
            }
        };
        let record = record.filter(|r| {
            r.runtime == route.runtime
                && r.agent_id == route.agent_id
                && r.environment_id == route.environment_id
        });
        let resume = record
            .as_ref()
            .and_then(|r| r.last_turn.as_ref())
            .filter(|t| t.inbound_id == message.id)
            .cloned();
        // Commands and approvals are boxed: inline, their futures (up to
        // 11 KiB) would size every turn's future, for a path most messages
        // never take.
        if resume.is_none() {
            let command = commands::parse(&message.text, &self.config.commands);
            if let Some(command) = command {
                return match command {
                    Ok(command) => {
                        Box::pin(self.command(
                            key,
                            message,
                            &route,
                            provider.as_ref(),
                            record,
                            command,
                        ))
                        .await
                    }
                    Err(usage) => {
                        self.notify(message, "command", &format!("❔ {usage}"))
                            .await;
                        Outcome::Done
                    }
                };
            }
            let about_approvals = message.button_press.is_some()
                || record.as_ref().is_some_and(|r| r.waiting.is_some());
            if about_approvals && let Some(mut record) = record.clone() {
                if let Some(press) = message
                    .button_press
                    .as_ref()
                    .filter(|p| p.action_id == ACTION_TIMEOUT)
                {
                    return Box::pin(self.on_timeout(
                        key,
                        delivery,
                        message,
                        provider.as_ref(),
                        &mut record,
                        &press.value,
                    ))
                    .await;
                }
                if let Some(outcome) = Box::pin(self.on_waiting(
                    key,
                    delivery,
                    message,
                    provider.as_ref(),
                    &mut record,
                ))
                .await
                {
                    return outcome;
                }
            }
        }
        let mut record = match record {
            Some(record) => record,
            None => match self
                .start_session(key, &route, provider.as_ref(), None)
                .await
            {
                Ok(record) => record,
                Err(e) => return self.turn_failed(message, e).await,
            },
        };
        let turn = match resume {
            Some(turn) => {
                tracing::info!(turn = %turn.turn_id, "resuming a turn started before a restart");
                TurnStart::Resume(turn)
            }
            None => TurnStart::New,
        };
        match self
            .run_turn(
                key,
                delivery,
                message,
                &route,
                provider.as_ref(),
                &mut record,
                turn,
            )
            .await
        {
            Err(TurnError::SessionGone) => {
                // The runtime forgot the session: start a fresh one, once.
                tracing::warn!("runtime session gone, starting a new one");
                let _ = self.sessions.remove(key).await;
                self.ownership.cache_record(&subject::token(key), None);
                let mut record = match self
                    .start_session(key, &route, provider.as_ref(), None)
                    .await
                {
                    Ok(record) => record,
                    Err(e) => return self.turn_failed(message, e).await,
                };
                match self
                    .run_turn(
                        key,
                        delivery,
                        message,
                        &route,
                        provider.as_ref(),
                        &mut record,
                        TurnStart::New,
                    )
                    .await
                {
                    Ok(()) => Outcome::Done,
                    Err(e) => self.turn_failed(message, e).await,
                }
            }
            Ok(()) => Outcome::Done,
            Err(e) => self.turn_failed(message, e).await,
        }
    }

    /// Continues a paused turn (after its approvals were answered).
    pub(crate) async fn continue_turn(
        &self,
        key: &str,
        delivery: &Delivery,
        message: &InboundMessage,
        provider: &dyn Provider,
        record: &mut SessionRecord,
        start: TurnStart,
    ) -> Outcome {
        let route = match self.router.route(message, key).await {
            Decision::Serve(route) => route,
            Decision::Reject { .. } => return Outcome::Done,
        };
        match self
            .run_turn(key, delivery, message, &route, provider, record, start)
            .await
        {
            Ok(()) => Outcome::Done,
            Err(e) => self.turn_failed(message, e).await,
        }
    }

    pub(crate) async fn turn_failed(&self, message: &InboundMessage, error: TurnError) -> Outcome {
        match error {
            TurnError::Transient(reason) => Outcome::Retry { reason },
            TurnError::Bus(e) => Outcome::Retry {
                reason: e.to_string(),
            },
            TurnError::SessionGone => Outcome::Retry {
                reason: "runtime session disappeared twice".into(),
            },
            TurnError::Permanent(reason) => {
                tracing::error!(reason = %reason, "runtime refused the message");
                if self.debounced(message) {
                    return Outcome::Done;
                }
                self.notify(
                    message,
                    "refused",
                    &format!("❌ The agent runtime refused this message: {reason}"),
                )
                .await;
                Outcome::Done
            }
        }
    }

    /// Creates a runtime session for `key` and stores its record.
    pub(crate) async fn new_session(
        &self,
        key: &str,
        route: &Route,
        provider: &dyn Provider,
        cwd: Option<String>,
    ) -> Result<SessionRecord, TurnError> {
        let record = self.create_session(key, route, provider, cwd).await?;
        self.store_record(key, &record).await?;
        Ok(record)
    }

    /// Creates a runtime session for `key` whose first turn follows at
    /// once: its record reaches KV with that turn's anchor (one write
    /// instead of two). Until then it is kept with the conversation's
    /// lease, so a retried first turn reuses the session.
    pub(crate) async fn start_session(
        &self,
        key: &str,
        route: &Route,
        provider: &dyn Provider,
        cwd: Option<String>,
    ) -> Result<SessionRecord, TurnError> {
        let record = self.create_session(key, route, provider, cwd).await?;
        self.keep_record(key, &record).await?;
        Ok(record)
    }

    /// Creates a runtime session for `key`; its record is not stored yet.
    async fn create_session(
        &self,
        key: &str,
        route: &Route,
        provider: &dyn Provider,
        cwd: Option<String>,
    ) -> Result<SessionRecord, TurnError> {
        let cwd = cwd.or_else(|| provider.default_working_dir());
        let spec = SessionSpec {
            agent_id: route.agent_id.clone(),
            environment_id: route.environment_id.clone(),
            title: format!("HarnessGate {key}"),
            metadata: [("harnessgate_session".to_owned(), truncate(key, 512))]
                .into_iter()
                .collect(),
            cwd: cwd.clone(),
        };
        let runtime_session_id = provider.create_session(&spec).await?;
        tracing::info!(runtime = %route.runtime, runtime_session = %runtime_session_id, "runtime session created");
        let record = SessionRecord {
            runtime: route.runtime.clone(),
            runtime_session_id,
            agent_id: route.agent_id.clone(),
            environment_id: route.environment_id.clone(),
            created_ms: hg_proto::now_ms(),
            turns: 0,
            last_turn: None,
            cwd,
            waiting: None,
            usage: UsageTotals::default(),
        };
        Ok(record)
    }

    /// The session record of `key`: from memory while this replica holds
    /// the conversation (with usage not stored yet), else from KV (which
    /// lags a conversation another replica holds by at most its latest
    /// turn's usage, until that replica's next turn or the end of its
    /// linger).
    pub(crate) async fn load_record(&self, key: &str) -> Result<Option<SessionRecord>, BusError> {
        let lease_key = subject::token(key);
        if let Some(record) = self.ownership.cached_record(&lease_key) {
            return Ok(Some(record));
        }
        let record = self.sessions.get(key).await?;
        self.ownership.cache_record(&lease_key, record.clone());
        Ok(record)
    }

    pub(crate) async fn store_record(
        &self,
        key: &str,
        record: &SessionRecord,
    ) -> Result<(), TurnError> {
        let lease_key = subject::token(key);
        if let Err(e) = self.sessions.put_token(&lease_key, record).await {
            // Unknown state in KV: read it again next time.
            self.ownership.cache_record(&lease_key, None);
            return Err(TurnError::Bus(e));
        }
        self.ownership
            .cache_record(&lease_key, Some(record.clone()));
        Ok(())
    }

    /// Keeps `record` with the conversation while this replica holds it,
    /// to be stored with the next write or when the conversation is let
    /// go; stores it now otherwise.
    async fn keep_record(&self, key: &str, record: &SessionRecord) -> Result<(), TurnError> {
        if self
            .ownership
            .cache_unsaved(&subject::token(key), record.clone())
        {
            return Ok(());
        }
        self.store_record(key, record).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_turn(
        &self,
        key: &str,
        delivery: &Delivery,
        message: &InboundMessage,
        route: &Route,
        provider: &dyn Provider,
        record: &mut SessionRecord,
        start: TurnStart,
    ) -> Result<(), TurnError> {
        let session_id = record.runtime_session_id.clone();
        let (turn, mut events) = match start {
            TurnStart::Resume(turn) => {
                let events = provider
                    .event_stream(&session_id, Some(&turn.anchor_event_id))
                    .await
                    .map_err(TurnError::from)?;
                (turn, events)
            }
            TurnStart::New => {
                // Open the stream first: the runtime streams only events
                // produced after it connected.
                let events = provider
                    .event_stream(&session_id, None)
                    .await
                    .map_err(TurnError::from)?;
                let mut user_message = to_user_message(message);
                user_message.files.extend(self.stored_files(message).await);
                let anchor = provider
                    .send_message(&session_id, &user_message)
                    .await
                    .map_err(TurnError::from)?;
                let turn = TurnRecord {
                    inbound_id: message.id.clone(),
                    turn_id: format!("turn-{}", uuid::Uuid::now_v7().simple()),
                    anchor_event_id: anchor,
                    handled: Vec::new(),
                };
                record.turns += 1;
                record.last_turn = Some(turn.clone());
                self.store_record(key, record).await?;
                (turn, events)
            }
        };
        let stop = CancellationToken::new();
        let lease_key = subject::token(key);
        self.running.lock().expect("running turns lock").insert(
            lease_key.clone(),
            RunningTurn {
                started_ms: hg_proto::now_ms(),
                stop: stop.clone(),
            },
        );
        let _running = RunningGuard {
            bridge: self,
            key: lease_key.clone(),
        };
        let observed = Observed {
            subject: subject::events(key),
            key,
            runtime: provider.name(),
            session_id: &session_id,
            turn_id: &turn.turn_id,
        };
        let mut handled: HashSet<String> = turn.handled.iter().cloned().collect();
        let mut asks: HashMap<String, Ask> = HashMap::new();
        let mut auto: Vec<(String, Grant)> = Vec::new();
        let mut notices = 0u32;
        let notice_window = self.config.approvals.notice_window;
        let notice_at = tokio::time::sleep(Duration::from_secs(86_400));
        tokio::pin!(notice_at);
        let mut usage = UsageTotals::default();
        let mut usage_changed = false;
        let mut stopped = false;
        let stop_grace = tokio::time::sleep(Duration::from_secs(86_400));
        tokio::pin!(stop_grace);
        let streaming = route.delivery == DeliveryMode::Streaming;
        let mut stream = StreamState::default();
        let stream_at = tokio::time::sleep(Duration::from_secs(86_400));
        tokio::pin!(stream_at);
        let mut buffer = TurnBuffer::default();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.config.turn_timeout;
        let mut progress = tokio::time::interval(self.config.ack_wait / 3);
        progress.tick().await;
        // "typing…" only for turns that take a noticeable time: a fast
        // answer needs no indicator (and saves a message per turn).
        let typing_at = tokio::time::sleep(self.config.typing_delay);
        tokio::pin!(typing_at);
        let mut typing = false;
        loop {
            let next = tokio::select! {
                next = events.next() => next,
                () = &mut typing_at, if !typing => {
                    typing = true;
                    self.typing(message, key, true).await;
                    continue;
                }
                _ = progress.tick() => {
                    let _ = delivery.progress().await;
                    continue;
                }
                () = &mut stream_at, if stream.dirty => {
                    stream.dirty = false;
                    stream.last = Some(tokio::time::Instant::now());
                    let text = buffer.live_text(&stream.partial);
                    self.publish_stream(message, key, &turn, &mut stream, text).await;
                    continue;
                }
                () = &mut notice_at, if !auto.is_empty() => {
                    self.announce_auto(message, &turn.turn_id, &mut auto, &mut notices).await;
                    continue;
                }
                () = stop.cancelled(), if !stopped => {
                    tracing::info!("turn stopped by /stop");
                    stopped = true;
                    if let Err(e) = provider.interrupt(&session_id).await {
                        tracing::warn!(error = %e, "cannot interrupt the runtime");
                    }
                    stop_grace.as_mut().reset(tokio::time::Instant::now() + STOP_GRACE);
                    continue;
                }
                () = &mut stop_grace, if stopped => {
                    tracing::warn!("runtime did not end the turn after an interrupt");
                    break;
                }
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("turn timed out");
                    let _ = provider.interrupt(&session_id).await;
                    self.notify(message, &format!("{}:timeout", turn.turn_id), TIMEOUT_TEXT).await;
                    return Ok(());
                }
            };
            let event = match next {
                Some(Ok(event)) => event,
                Some(Err(e)) => return Err(TurnError::from(e)),
                None => return Err(TurnError::Transient("runtime event stream ended".into())),
            };
            self.observe(&observed, &event).await;
            if streaming {
                match &event {
                    RuntimeEvent::AgentMessageDelta {
                        message_id, text, ..
                    } => {
                        if stream.partial_of != *message_id {
                            stream.partial_of = message_id.clone();
                            stream.partial.clear();
                        }
                        stream.partial.push_str(text);
                        stream.schedule(stream_at.as_mut(), self.config.stream_interval);
                    }
                    RuntimeEvent::AgentMessage { .. } => {
                        stream.partial.clear();
                        stream.schedule(stream_at.as_mut(), self.config.stream_interval);
                    }
                    _ => {}
                }
            }
            match &event {
                RuntimeEvent::AgentMessage { text, .. } => buffer.push(text),
                RuntimeEvent::ToolUse {
                    id,
                    name,
                    input,
                    evaluated_permission: Some(permission),
                    ..
                } if permission == "ask" => {
                    asks.insert(
                        id.clone(),
                        Ask {
                            request_id: id.clone(),
                            tool: name.clone(),
                            input: input.clone(),
                            options: Vec::new(),
                        },
                    );
                }
                RuntimeEvent::PermissionRequest {
                    id,
                    title,
                    input,
                    options,
                    ..
                } => {
                    asks.insert(
                        id.clone(),
                        Ask {
                            request_id: id.clone(),
                            tool: title.clone(),
                            input: input.clone(),
                            options: options.iter().map(StoredOption::from).collect(),
                        },
                    );
                }
                RuntimeEvent::Error {
                    message: text,
                    retry_status,
                    ..
                } if retry_status.as_deref() != Some("retrying") => {
                    buffer.error = Some(text.clone())
                }
                RuntimeEvent::Usage { usage: u, .. } if u.session_totals => {
                    // Totals, not increments: the latest one stands.
                    record.usage.input_tokens = u.input_tokens;
                    record.usage.output_tokens = u.output_tokens;
                    if u.cost_micro_usd.is_some() {
                        record.usage.cost_micro_usd = u.cost_micro_usd;
                    }
                    usage_changed = true;
                }
                RuntimeEvent::Usage { usage: u, .. } => {
                    usage.model_requests += 1;
                    usage.input_tokens += u.input_tokens;
                    usage.output_tokens += u.output_tokens;
                    usage.cache_read_input_tokens += u.cache_read_input_tokens;
                    usage.cache_creation_input_tokens += u.cache_creation_input_tokens;
                    if let Some(cost) = u.cost_micro_usd {
                        usage.cost_micro_usd = Some(usage.cost_micro_usd.unwrap_or(0) + cost);
                    }
                }
                RuntimeEvent::CustomToolUse { id, name, input } => {
                    handled.insert(id.clone());
                    self.run_custom_tool(provider, &session_id, id, name, input)
                        .await?;
                }
                RuntimeEvent::Status {
                    id: status_id,
                    state: SessionState::Idle,
                    stop_reason: Some(StopReason::RequiresAction { event_ids }),
                } => {
                    let mut need = Vec::new();
                    for event_id in event_ids {
                        if handled.contains(event_id) {
                            continue;
                        }
                        handled.insert(event_id.clone());
                        need.push(asks.remove(event_id).unwrap_or_else(|| Ask {
                            request_id: event_id.clone(),
                            tool: "a tool".into(),
                            input: serde_json::Value::Null,
                            options: Vec::new(),
                        }));
                    }
                    if stopped {
                        for ask in need {
                            let _ = provider
                                .confirm_tool(&session_id, &ask.request_id, ToolDecision::Cancelled)
                                .await;
                        }
                        continue;
                    }
                    let before = auto.len();
                    let need = self
                        .apply_grants(message, key, provider, record, need, &mut auto)
                        .await?;
                    if auto.len() > before && before == 0 {
                        notice_at
                            .as_mut()
                            .reset(tokio::time::Instant::now() + notice_window);
                    }
                    if !need.is_empty() {
                        // Pause: what the agent said so far, then the
                        // requests; the turn goes on once they are answered.
                        self.announce_auto(message, &turn.turn_id, &mut auto, &mut notices)
                            .await;
                        self.add_usage(record, usage);
                        let reply = std::mem::take(&mut buffer);
                        self.publish_reply(
                            message,
                            key,
                            &turn,
                            reply,
                            typing,
                            stream.started.as_deref(),
                        )
                        .await?;
                        return self
                            .pause_for_approvals(
                                message, key, route, provider, record, &turn, status_id, need,
                                &handled,
                            )
                            .await;
                    }
                }
                _ => {}
            }
            if event.ends_turn() {
                if let RuntimeEvent::Status {
                    state, stop_reason, ..
                } = &event
                {
                    buffer.note_stop(*state, stop_reason.as_ref());
                }
                break;
            }
        }
        metrics::histogram!("hg_bridge_turn_seconds", "runtime" => provider.name())
            .record(started.elapsed().as_secs_f64());
        self.announce_auto(message, &turn.turn_id, &mut auto, &mut notices)
            .await;
        if stopped {
            buffer.stopped = true;
        }
        self.publish_reply(
            message,
            key,
            &turn,
            buffer,
            typing,
            stream.started.as_deref(),
        )
        .await?;
        // Bookkeeping for /usage: kept with the conversation and stored
        // with the next turn's anchor or when the conversation is let go
        // (a crash loses at most this turn's counts, never a reply).
        if usage_changed || usage != UsageTotals::default() {
            self.add_usage(record, usage);
            if self.keep_record(key, record).await.is_err() {
                tracing::warn!("cannot store the session's usage");
            }
        }
        Ok(())
    }

    fn add_usage(&self, record: &mut SessionRecord, usage: UsageTotals) {
        let total = &mut record.usage;
        total.model_requests += usage.model_requests;
        total.input_tokens += usage.input_tokens;
        total.output_tokens += usage.output_tokens;
        total.cache_read_input_tokens += usage.cache_read_input_tokens;
        total.cache_creation_input_tokens += usage.cache_creation_input_tokens;
        if let Some(cost) = usage.cost_micro_usd {
            total.cost_micro_usd = Some(total.cost_micro_usd.unwrap_or(0) + cost);
        }
    }

    async fn publish_reply(
        &self,
        message: &InboundMessage,
        key: &str,
        turn: &TurnRecord,
        buffer: TurnBuffer,
        typing: bool,
        streamed: Option<&str>,
    ) -> Result<(), TurnError> {
        let (kind, text) = match buffer.finish() {
            Some(reply) => reply,
            None => {
                if typing {
                    self.typing(message, key, false).await;
                }
                return Ok(());
            }
        };
        let mut out = self.outbound(message, kind, text);
        // A turn paused for approvals replies once per part it ran.
        out.id = format!("{}:reply", segment_id(turn));
        if let Some(streamed) = streamed {
            // The final text replaces the message that grew while streaming.
            out.kind = OutboundKind::Edit as i32;
            out.edit_of = streamed.to_owned();
        }
        out.session_key = key.to_owned();
        out.turn_id = turn.turn_id.clone();
        // Same id on a resumed turn: the stream drops the duplicate.
        let msg_id = format!("{}:{}:reply", message.platform, message.id);
        self.send_out(&out, Some(&msg_id))
            .await
            .map_err(TurnError::Bus)?;
        metrics::counter!("hg_bridge_replies_total").increment(1);
        Ok(())
    }

    /// Shows the text so far of a streaming reply: the first time as a new
    /// message, then as edits of it.
    async fn publish_stream(
        &self,
        message: &InboundMessage,
        key: &str,
        turn: &TurnRecord,
        stream: &mut StreamState,
        text: String,
    ) {
        if text.is_empty() || text == stream.shown {
            return;
        }
        let stream_id = format!("{}:stream", segment_id(turn));
        let (kind, id) = if stream.updates == 0 {
            (OutboundKind::Reply, stream_id.clone())
        } else {
            (
                OutboundKind::Edit,
                format!("{stream_id}:{}", stream.updates),
            )
        };
        let mut out = self.outbound(message, kind, text.clone());
        out.id = id;
        if kind == OutboundKind::Edit {
            out.edit_of = stream_id.clone();
        }
        out.session_key = key.to_owned();
        out.turn_id = turn.turn_id.clone();
        let msg_id = format!(
            "{}:{}:{}:{}",
            message.platform, message.id, stream_id, stream.updates
        );
        match self.send_out(&out, Some(&msg_id)).await {
            Ok(_) => {
                stream.updates += 1;
                stream.shown = text;
                stream.started = Some(stream_id);
            }
            // An update lost is not a reply lost: the final text follows.
            Err(e) => tracing::debug!(error = %e, "cannot publish a streaming update"),
        }
    }

    async fn run_custom_tool(
        &self,
        provider: &dyn Provider,
        session_id: &str,
        tool_use_id: &str,
        name: &str,
        input: &serde_json::Value,
    ) -> Result<(), TurnError> {
        let request = self.bus.client().request(
            subject::tool(name),
            serde_json::to_vec(input).unwrap_or_default().into(),
        );
        let output = match tokio::time::timeout(self.config.tool_timeout, request).await {
            Ok(Ok(reply)) => ToolOutput {
                content: String::from_utf8_lossy(&reply.payload).into_owned(),
                is_error: reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Hg-Tool-Error"))
                    .is_some(),
            },
            Ok(Err(e)) => ToolOutput {
                content: format!("tool {name} is not available: {e}"),
                is_error: true,
            },
            Err(_) => ToolOutput {
                content: format!(
                    "tool {name} did not answer within {:?}",
                    self.config.tool_timeout
                ),
                is_error: true,
            },
        };
        provider
            .submit_tool_result(session_id, tool_use_id, output)
            .await
            .map_err(TurnError::from)
    }

    /// Publishes tool use, thinking, status, usage and errors on
    /// `hg.events.<session>` for observers (best effort, core NATS).
    async fn observe(&self, to: &Observed<'_>, event: &RuntimeEvent) {
        let payload = match event {
            RuntimeEvent::AgentMessage { text, .. } => {
                agent_event::Event::Message(AgentMessage { text: text.clone() })
            }
            RuntimeEvent::Thinking { text, .. } => {
                agent_event::Event::Thinking(AgentThinking { text: text.clone() })
            }
            RuntimeEvent::ToolUse {
                id,
                name,
                input,
                evaluated_permission,
                server_name,
            } => agent_event::Event::ToolUse(ToolUse {
                tool_use_id: id.clone(),
                name: name.clone(),
                input_json: input.to_string(),
                evaluated_permission: evaluated_permission.clone().unwrap_or_default(),
                server_name: server_name.clone().unwrap_or_default(),
            }),
            RuntimeEvent::ToolResult {
                tool_use_id,
                content,
                is_error,
                ..
            } => agent_event::Event::ToolResult(ToolResult {
                tool_use_id: tool_use_id.clone(),
                content: content.clone(),
                is_error: *is_error,
            }),
            RuntimeEvent::CustomToolUse { id, name, input } => {
                agent_event::Event::CustomToolRequest(CustomToolRequest {
                    tool_use_id: id.clone(),
                    name: name.clone(),
                    input_json: input.to_string(),
                })
            }
            RuntimeEvent::Status {
                state, stop_reason, ..
            } => agent_event::Event::Status(Status {
                state: state_name(*state).into(),
                stop_reason: stop_reason
                    .as_ref()
                    .map(stop_name)
                    .unwrap_or_default()
                    .into(),
            }),
            RuntimeEvent::Usage { usage, .. } => agent_event::Event::Usage(Usage {
                input_tokens: usage.input_tokens,
                output_tokens: usage.output_tokens,
                cache_read_input_tokens: usage.cache_read_input_tokens,
                cache_creation_input_tokens: usage.cache_creation_input_tokens,
            }),
            RuntimeEvent::Error {
                kind,
                message,
                retry_status,
                ..
            } => agent_event::Event::Error(AgentError {
                kind: kind.clone(),
                message: message.clone(),
                retry_status: retry_status.clone().unwrap_or_default(),
            }),
            RuntimeEvent::AgentMessageDelta { .. }
            | RuntimeEvent::PermissionRequest { .. }
            | RuntimeEvent::Other { .. } => return,
        };
        let out = AgentEvent {
            id: event.id().to_owned(),
            session_key: to.key.to_owned(),
            runtime: to.runtime.to_owned(),
            runtime_session_id: to.session_id.to_owned(),
            turn_id: to.turn_id.to_owned(),
            timestamp_ms: hg_proto::now_ms(),
            event: Some(payload),
        };
        if let Err(e) = self.bus.publish_core(&to.subject, &out).await {
            tracing::debug!(error = %e, "cannot publish agent event");
        }
    }

    /// Attachments an ingress put in the object store (`hg_files`). A file
    /// that cannot be read is left out and the agent told so in the text
    /// of its name, rather than failing the whole message.
    async fn stored_files(&self, message: &InboundMessage) -> Vec<UserFile> {
        let stored: Vec<_> = message
            .attachments
            .iter()
            .filter(|a| a.data.is_empty() && !a.object_key.is_empty())
            .collect();
        if stored.is_empty() {
            return Vec::new();
        }
        let store = match self.bus.jetstream().get_object_store(FILES_BUCKET).await {
            Ok(store) => store,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the files bucket");
                return Vec::new();
            }
        };
        let mut files = Vec::with_capacity(stored.len());
        for attachment in stored {
            let data = async {
                let mut object = store.get(&attachment.object_key).await.ok()?;
                let mut data = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut object, &mut data)
                    .await
                    .ok()?;
                Some(data)
            }
            .await;
            match data {
                Some(data) => files.push(UserFile {
                    file_name: attachment.file_name.clone(),
                    mime_type: attachment.mime_type.clone(),
                    data,
                }),
                None => {
                    tracing::warn!(object = %attachment.object_key, "stored attachment not readable")
                }
            }
        }
        files
    }

    async fn typing(&self, message: &InboundMessage, key: &str, on: bool) {
        let mut out = self.outbound(message, OutboundKind::Typing, String::new());
        out.typing_stop = !on;
        out.session_key = key.to_owned();
        if let Err(e) = self.send_out(&out, None).await {
            tracing::debug!(error = %e, "cannot publish typing");
        }
    }

    /// True when this conversation was told about an error within the
    /// debounce window (so this one is not sent); else notes the time.
    fn debounced(&self, message: &InboundMessage) -> bool {
        let key = crate::session::session_key(message);
        let now = self.clock.now_ms();
        let window = self.config.error_debounce.as_millis() as i64;
        let mut notices = self.error_notices.lock().expect("error notices lock");
        if notices.len() > 10_000 {
            notices.retain(|_, at| now - *at < window);
        }
        match notices.get(&key) {
            Some(at) if now - *at < window => true,
            _ => {
                notices.insert(key, now);
                false
            }
        }
    }

    /// Publishes an outbound message on its platform's subject.
    pub(crate) async fn send_out(
        &self,
        out: &OutboundMessage,
        msg_id: Option<&str>,
    ) -> Result<(), BusError> {
        self.bus
            .publish(&subject::outbound(&out.platform, &out.app_id), out, msg_id)
            .await
            .map(|_| ())
    }

    /// Sends a short status line to the user (idempotent per `tag`).
    pub(crate) async fn notify(&self, message: &InboundMessage, tag: &str, text: &str) {
        let mut out = self.outbound(message, OutboundKind::Status, text.to_owned());
        out.id = format!("{}:{tag}", message.id);
        let msg_id = format!("{}:{}:{tag}", message.platform, message.id);
        if let Err(e) = self.send_out(&out, Some(&msg_id)).await {
            tracing::warn!(error = %e, "cannot tell the user");
        }
    }

    pub(crate) fn outbound(
        &self,
        message: &InboundMessage,
        kind: OutboundKind,
        text: String,
    ) -> OutboundMessage {
        OutboundMessage {
            id: uuid::Uuid::now_v7().to_string(),
            platform: message.platform.clone(),
            app_id: message.app_id.clone(),
            channel_id: message.channel_id.clone(),
            thread_id: message.thread_id.clone(),
            reply_to_message_id: message.id.clone(),
            text,
            kind: kind as i32,
            recipient_id: message
                .sender
                .as_ref()
                .map(|s| s.id.clone())
                .unwrap_or_default(),
            timestamp_ms: hg_proto::now_ms(),
            ..Default::default()
        }
    }
}

pub(crate) enum TurnStart {
    New,
    Resume(TurnRecord),
}

pub(crate) enum TurnError {
    /// Try again later (runtime unavailable, rate limited, stream lost).
    Transient(String),
    /// The runtime will not take this message.
    Permanent(String),
    /// The runtime session no longer exists.
    SessionGone,
    Bus(BusError),
}

impl From<ProviderError> for TurnError {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::SessionNotFound(_) => TurnError::SessionGone,
            e if e.is_transient() => TurnError::Transient(e.to_string()),
            e => TurnError::Permanent(e.to_string()),
        }
    }
}

/// Where one turn's agent events go, worked out once per turn rather
/// than per event.
struct Observed<'a> {
    /// `hg.events.<session>`
    subject: String,
    key: &'a str,
    runtime: &'a str,
    session_id: &'a str,
    turn_id: &'a str,
}

/// The agent's text for one turn, collected until the turn ends.
#[derive(Default)]
struct TurnBuffer {
    text: String,
    error: Option<String>,
    stop: Option<String>,
    /// Ended by `/stop`.
    stopped: bool,
}

/// A streaming reply's progress within one turn segment.
#[derive(Default)]
struct StreamState {
    /// Outbound id of the growing message, once it was sent.
    started: Option<String>,
    updates: u32,
    /// Text last shown.
    shown: String,
    /// The agent message being written, from deltas.
    partial: String,
    partial_of: String,
    /// New text waits to be shown.
    dirty: bool,
    last: Option<tokio::time::Instant>,
}

impl StreamState {
    /// Marks new text and schedules its update, at most one per `interval`.
    fn schedule(&mut self, at: std::pin::Pin<&mut tokio::time::Sleep>, interval: Duration) {
        if self.dirty {
            return;
        }
        self.dirty = true;
        let when = match self.last {
            Some(last) => last + interval,
            None => tokio::time::Instant::now(),
        };
        at.reset(when);
    }
}

/// Id prefix of the messages of this turn segment: a turn paused for
/// approvals continues in a new segment.
fn segment_id(turn: &TurnRecord) -> String {
    if turn.handled.is_empty() {
        turn.turn_id.clone()
    } else {
        format!("{}-{}", turn.turn_id, turn.handled.len())
    }
}

impl TurnBuffer {
    /// The finished messages plus the one being written.
    fn live_text(&self, partial: &str) -> String {
        match (self.text.is_empty(), partial.is_empty()) {
            (_, true) => self.text.clone(),
            (true, false) => partial.to_owned(),
            (false, false) => format!("{}\n\n{partial}", self.text),
        }
    }

    fn push(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if !self.text.is_empty() {
            self.text.push_str("\n\n");
        }
        self.text.push_str(text);
    }

    fn note_stop(&mut self, state: SessionState, reason: Option<&StopReason>) {
        self.stop = match (state, reason) {
            (SessionState::Terminated, _) => Some("the agent session was terminated".into()),
            (_, Some(StopReason::RetriesExhausted)) => {
                Some("the agent gave up after repeated errors".into())
            }
            (_, Some(StopReason::BudgetReached)) => Some("the session's budget is used up".into()),
            (_, Some(StopReason::Refusal { explanation })) => Some(
                explanation
                    .clone()
                    .unwrap_or_else(|| "the agent declined to answer".into()),
            ),
            _ => None,
        };
    }

    /// The reply to publish: the agent's text, and a short error line when
    /// the turn failed, so the user never meets silence.
    fn finish(self) -> Option<(OutboundKind, String)> {
        if self.stopped {
            // `/stop` answers for itself; keep what the agent had said.
            return (!self.text.is_empty())
                .then(|| (OutboundKind::Reply, format!("{}\n\n⏹ Stopped.", self.text)));
        }
        let problem = self.error.or(self.stop);
        match (self.text.is_empty(), problem) {
            (false, None) => Some((OutboundKind::Reply, self.text)),
            (false, Some(p)) => Some((OutboundKind::Reply, format!("{}\n\n⚠️ {p}", self.text))),
            (true, Some(p)) => Some((
                OutboundKind::Status,
                format!("⚠️ The agent ran into a problem: {p}"),
            )),
            (true, None) => None,
        }
    }
}

fn to_user_message(message: &InboundMessage) -> UserMessage {
    let mut text = message.text.clone();
    if let Some(press) = &message.button_press
        && text.is_empty()
    {
        text = format!("[button {}: {}]", press.action_id, press.value);
    }
    // In shared conversations the agent needs to know who is speaking.
    let shared = matches!(
        message.chat_type(),
        ChatType::Group | ChatType::Channel | ChatType::Thread
    );
    if shared && let Some(sender) = &message.sender {
        let name = if !sender.display_name.is_empty() {
            &sender.display_name
        } else if !sender.username.is_empty() {
            &sender.username
        } else {
            &sender.id
        };
        text = format!("[{name}]: {text}");
    }
    let files = message
        .attachments
        .iter()
        .filter(|a| !a.data.is_empty())
        .map(|a| UserFile {
            file_name: a.file_name.clone(),
            mime_type: a.mime_type.clone(),
            data: a.data.clone(),
        })
        .collect();
    UserMessage { text, files }
}

fn state_name(state: SessionState) -> &'static str {
    match state {
        SessionState::Running => "running",
        SessionState::Idle => "idle",
        SessionState::Rescheduled => "rescheduled",
        SessionState::Terminated => "terminated",
    }
}

fn stop_name(reason: &StopReason) -> &str {
    match reason {
        StopReason::EndTurn => "end_turn",
        StopReason::RequiresAction { .. } => "requires_action",
        StopReason::RetriesExhausted => "retries_exhausted",
        StopReason::BudgetReached => "budget_reached",
        StopReason::Refusal { .. } => "refusal",
        StopReason::Other(other) => other,
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
