//! Tool-permission requests: pausing a turn for them, deciding them (by
//! people, grants or the timeout) and continuing the turn.

use std::collections::HashSet;

use hg_proto::{
    ApprovalDecision, ApprovalRequest, Button, ButtonPress, ButtonStyle, ChatType, InboundMessage,
    OutboundKind, ToolUse, agent_event, subject,
};

use super::{app_scope, sender_id, who};
use crate::approvals::{
    self, ACTION_APPROVAL, ACTION_TIMEOUT, Approval, Choice, DecideOutcome, Decided, Grant,
    GrantScope, StoredOption, Verdict,
};
use crate::provider::{Provider, ProviderError, ToolDecision};
use crate::routing::Route;
use crate::session::{SessionRecord, TurnRecord, Waiting};
use crate::turn::{Bridge, Outcome, TurnError, TurnStart};
use hg_bus::consumer::Delivery;

/// A request the runtime made in the current turn that may need a person.
#[derive(Debug, Clone)]
pub(crate) struct Ask {
    pub request_id: String,
    pub tool: String,
    pub input: serde_json::Value,
    pub options: Vec<StoredOption>,
}

/// Short, stable approval id of a runtime request.
fn approval_id(session_key: &str, request_id: &str) -> String {
    // FNV-1a: stable across processes, short enough for callback data.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in session_key.bytes().chain([0]).chain(request_id.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:012x}")[..12].to_owned()
}

/// How a decision changes things, worked out from a choice.
struct Resolved {
    decision: ToolDecision,
    decided: Decided,
    grant: Option<GrantScope>,
}

impl Bridge {
    /// Tells the user a request they answered no longer waits.
    async fn no_longer_pending(&self, message: &InboundMessage) -> Outcome {
        self.notify(
            message,
            "approval-unknown",
            "❔ That request is no longer pending.",
        )
        .await;
        Outcome::Done
    }

    // ----- approvals while a turn runs ------------------------------------

    /// Answers what grants cover; returns the requests that need a person.
    /// Auto-approved tools are added to `auto` for the batched notice.
    pub(crate) async fn apply_grants(
        &self,
        message: &InboundMessage,
        key: &str,
        provider: &dyn Provider,
        record: &SessionRecord,
        asks: Vec<Ask>,
        auto: &mut Vec<(String, Grant)>,
    ) -> Result<Vec<Ask>, TurnError> {
        let now = self.clock.now_ms();
        let grants = match self.grants.active(key, &app_scope(message), now).await {
            Ok(grants) => grants,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read grants; asking");
                Vec::new()
            }
        };
        let mut need = Vec::new();
        for ask in asks {
            let grant = grants
                .iter()
                .find(|g| g.covers(&ask.tool, record.cwd.as_deref()))
                .filter(|_| self.config.approvals.may_auto_approve(&ask.tool));
            let Some(grant) = grant else {
                need.push(ask);
                continue;
            };
            provider
                .confirm_tool(
                    &record.runtime_session_id,
                    &ask.request_id,
                    ToolDecision::Allow,
                )
                .await
                .map_err(TurnError::from)?;
            tracing::info!(tool = %ask.tool, grant = %grant.describe(), "tool auto-approved");
            self.audit(
                key,
                provider,
                &record.runtime_session_id,
                "",
                agent_event::Event::ApprovalDecision(ApprovalDecision {
                    approval_id: String::new(),
                    request_id: ask.request_id.clone(),
                    tool: ask.tool.clone(),
                    allowed: true,
                    outcome: format!("auto-approved ({})", grant.describe()),
                    decided_by: "grant".into(),
                    reason: String::new(),
                    decided_ms: now,
                }),
            )
            .await;
            auto.push((ask.tool, grant.clone()));
        }
        Ok(need)
    }

    /// One message for the tools auto-approved since the last notice.
    pub(crate) async fn announce_auto(
        &self,
        message: &InboundMessage,
        turn_id: &str,
        auto: &mut Vec<(String, Grant)>,
        sent: &mut u32,
    ) {
        let Some((_, grant)) = auto.last().cloned() else {
            return;
        };
        let names: Vec<&str> = auto.iter().map(|(tool, _)| tool.as_str()).collect();
        let shown = if names.len() > 5 {
            format!("{}, …", names[..5].join(", "))
        } else {
            names.join(", ")
        };
        let count = if names.len() == 1 {
            "1 tool".to_owned()
        } else {
            format!("{} tools", names.len())
        };
        let left = approvals::minutes_left(grant.expires_ms, self.clock.now_ms());
        let text = format!(
            "✅ auto-approved {count}: {shown} ({}, {left} min left)",
            grant.describe()
        );
        *sent += 1;
        self.notify(message, &format!("{turn_id}:auto:{sent}"), &text)
            .await;
        auto.clear();
    }

    /// Stores and shows approval requests, then pauses the turn.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn pause_for_approvals(
        &self,
        message: &InboundMessage,
        key: &str,
        route: &Route,
        provider: &dyn Provider,
        record: &mut SessionRecord,
        turn: &TurnRecord,
        anchor_event_id: &str,
        asks: Vec<Ask>,
        handled: &HashSet<String>,
    ) -> Result<(), TurnError> {
        let now = self.clock.now_ms();
        let expires_ms = now + self.config.approvals.timeout.as_millis() as i64;
        let mut ids = Vec::with_capacity(asks.len());
        for ask in asks {
            let id = approval_id(key, &ask.request_id);
            let (text, buttons, choices) = self.approval_message(&id, &ask, record, expires_ms);
            let approval = Approval {
                id: id.clone(),
                session_key: key.to_owned(),
                turn_id: turn.turn_id.clone(),
                request_id: ask.request_id.clone(),
                tool: ask.tool.clone(),
                input: approvals::render_input(&ask.input),
                options: ask.options.clone(),
                requester: sender_id(message).to_owned(),
                approvers: route.approvers.clone(),
                direct_chat: message.chat_type() == ChatType::Direct,
                chat_type: message.chat_type,
                platform: message.platform.clone(),
                app_id: message.app_id.clone(),
                channel_id: message.channel_id.clone(),
                thread_id: message.thread_id.clone(),
                message_id: format!("approval:{id}"),
                text: text.clone(),
                created_ms: now,
                expires_ms,
                decided: None,
            };
            // A resumed turn asks again for the same request: keep the
            // record (and any decision) that is already there.
            if self
                .approvals
                .get(key, &id)
                .await
                .map_err(TurnError::Bus)?
                .is_none()
            {
                self.approvals
                    .create(&approval)
                    .await
                    .map_err(TurnError::Bus)?;
            }
            let mut out = self.outbound(message, OutboundKind::ApprovalRequest, text);
            out.id = approval.message_id.clone();
            out.buttons = buttons;
            out.session_key = key.to_owned();
            out.turn_id = turn.turn_id.clone();
            self.send_out(&out, Some(&format!("approval:{key}:{id}")))
                .await
                .map_err(TurnError::Bus)?;
            self.audit(
                key,
                provider,
                &record.runtime_session_id,
                &turn.turn_id,
                agent_event::Event::ApprovalRequest(ApprovalRequest {
                    approval_id: id.clone(),
                    tool: Some(ToolUse {
                        tool_use_id: ask.request_id.clone(),
                        name: ask.tool.clone(),
                        input_json: ask.input.to_string(),
                        evaluated_permission: "ask".into(),
                        server_name: String::new(),
                    }),
                    choices,
                    expires_ms,
                }),
            )
            .await;
            tracing::info!(approval = %id, tool = %ask.tool, "waiting for approval");
            ids.push(id);
        }
        record.waiting = Some(Waiting {
            turn_id: turn.turn_id.clone(),
            anchor_event_id: anchor_event_id.to_owned(),
            approvals: ids,
            handled: handled.iter().cloned().collect(),
        });
        self.store_record(key, record).await
    }

    /// Text, buttons and choice labels of an approval message.
    fn approval_message(
        &self,
        id: &str,
        ask: &Ask,
        record: &SessionRecord,
        expires_ms: i64,
    ) -> (String, Vec<Button>, Vec<String>) {
        let input = approvals::render_input(&ask.input).replace("```", "'''");
        let mut text = format!("🔐 The agent wants to use **{}**", ask.tool);
        if !input.is_empty() {
            text.push_str(&format!("\n\n```\n{input}\n```"));
        }
        let minutes = self.config.approvals.grant_duration.as_secs().div_ceil(60);
        let mut choices: Vec<(String, Choice, ButtonStyle)> = if ask.options.is_empty() {
            let mut c = vec![
                ("Allow".to_owned(), Choice::Allow, ButtonStyle::Primary),
                (
                    "Deny".to_owned(),
                    Choice::Deny { reason: None },
                    ButtonStyle::Danger,
                ),
            ];
            if self.config.approvals.may_auto_approve(&ask.tool) {
                c.push((
                    format!("Allow {} for {minutes} min", ask.tool),
                    Choice::AllowTool,
                    ButtonStyle::Default,
                ));
                c.push((
                    format!("Allow all for {minutes} min"),
                    Choice::AllowAll,
                    ButtonStyle::Default,
                ));
            }
            c
        } else {
            ask.options
                .iter()
                .map(|o| {
                    let style = if o.allows {
                        ButtonStyle::Primary
                    } else {
                        ButtonStyle::Danger
                    };
                    (o.label.clone(), Choice::Option(o.id.clone()), style)
                })
                .collect()
        };
        if !ask.options.is_empty()
            && record.cwd.is_some()
            && self.config.approvals.may_auto_approve(&ask.tool)
        {
            choices.push((
                format!("Allow in this directory for {minutes} min"),
                Choice::AllowDir,
                ButtonStyle::Default,
            ));
        }
        let numbered: Vec<String> = choices
            .iter()
            .enumerate()
            .map(|(i, (label, ..))| format!("{}. {label}", i + 1))
            .collect();
        text.push_str(&format!(
            "\n\nReply with a number ({}), or allow / deny / deny: <reason> / allow all / allow {}. \
             Expires at {}.",
            numbered.join(", "),
            ask.tool,
            approvals::clock_time(expires_ms)
        ));
        let buttons = choices
            .iter()
            .map(|(label, choice, style)| Button {
                action_id: ACTION_APPROVAL.into(),
                label: label.clone(),
                value: approvals::button_value(id, choice),
                style: *style as i32,
            })
            .collect();
        let labels = choices.into_iter().map(|(label, ..)| label).collect();
        (text, buttons, labels)
    }

    // ----- decisions ------------------------------------------------------

    /// Handles a message while the conversation waits for approvals:
    /// a decision, a late button press, or anything else (told to decide
    /// first). Returns `None` when the message is not about approvals.
    pub(crate) async fn on_waiting(
        &self,
        key: &str,
        delivery: &Delivery,
        message: &InboundMessage,
        provider: &dyn Provider,
        record: &mut SessionRecord,
    ) -> Option<Outcome> {
        // A button of an approval message (this one or an old one).
        let pressed = message
            .button_press
            .as_ref()
            .filter(|p| p.action_id == ACTION_APPROVAL)
            .and_then(|p| approvals::parse_button(&p.value));
        let waiting = record.waiting.clone();
        let (approval_id, choice) = match (pressed, &waiting) {
            (Some(pressed), _) => pressed,
            (None, None) => return None,
            (None, Some(waiting)) => {
                let first = waiting.approvals.first()?.clone();
                let approval = match self.approvals.get(key, &first).await {
                    Ok(Some((approval, _))) => approval,
                    _ => return None,
                };
                match text_choice(&message.text, &approval) {
                    Some(choice) => (first, choice),
                    None => {
                        self.notify(
                            message,
                            "waiting",
                            &format!(
                                "⏳ The agent is waiting for a decision on **{}** first: reply allow or deny, or /stop.",
                                approval.tool
                            ),
                        )
                        .await;
                        return Some(Outcome::Done);
                    }
                }
            }
        };
        Some(
            self.decide(
                key,
                delivery,
                message,
                provider,
                record,
                &approval_id,
                choice,
            )
            .await,
        )
    }

    /// Records a person's decision and, when it was the last one pending,
    /// continues the turn.
    #[allow(clippy::too_many_arguments)]
    async fn decide(
        &self,
        key: &str,
        delivery: &Delivery,
        message: &InboundMessage,
        provider: &dyn Provider,
        record: &mut SessionRecord,
        approval_id: &str,
        choice: Choice,
    ) -> Outcome {
        let approval = match self.approvals.get(key, approval_id).await {
            Ok(Some((approval, _))) => approval,
            Ok(None) => {
                return self.no_longer_pending(message).await;
            }
            Err(e) => {
                return Outcome::retry(e);
            }
        };
        let sender = sender_id(message);
        if !approval.may_decide(sender) {
            tracing::warn!(sender, approval = %approval.id, tool = %approval.tool, "decision refused: not an approver");
            self.notify(
                message,
                "not-approver",
                &format!(
                    "🚫 {}, only approvers can answer this request.",
                    who(message)
                ),
            )
            .await;
            return Outcome::Done;
        }
        let resolved = match self.resolve(&approval, choice, message, record) {
            Ok(resolved) => resolved,
            Err(text) => {
                self.notify(message, "approval-choice", &text).await;
                return Outcome::Done;
            }
        };
        self.apply_decision(key, delivery, message, provider, record, approval, resolved)
            .await
    }

    /// Turns a choice into what the runtime is told and what is recorded.
    fn resolve(
        &self,
        approval: &Approval,
        choice: Choice,
        message: &InboundMessage,
        record: &SessionRecord,
    ) -> Result<Resolved, String> {
        let minutes = self.config.approvals.grant_duration.as_secs().div_ceil(60);
        let decided = |allowed: bool, outcome: String, reason: Option<String>| Decided {
            allowed,
            outcome,
            by: who(message),
            at_ms: self.clock.now_ms(),
            reason,
        };
        let may_grant = self.config.approvals.may_auto_approve(&approval.tool);
        let refuse_grant = || {
            format!(
                "{} always asks; answer allow or deny for this request.",
                approval.tool
            )
        };
        let choice = match choice {
            Choice::Pick(pick) => pick_choice(&pick, approval)
                .ok_or_else(|| format!("❔ \"{pick}\" is not one of the choices."))?,
            other => other,
        };
        Ok(match choice {
            Choice::Allow => Resolved {
                decision: ToolDecision::Allow,
                decided: decided(true, "Allowed".into(), None),
                grant: None,
            },
            Choice::Deny { reason } => Resolved {
                decision: ToolDecision::Deny {
                    message: reason.clone(),
                },
                decided: decided(false, "Denied".into(), reason),
                grant: None,
            },
            Choice::AllowTool if may_grant => Resolved {
                decision: ToolDecision::Allow,
                decided: decided(
                    true,
                    format!("Allowed {} for {minutes} min", approval.tool),
                    None,
                ),
                grant: Some(GrantScope::Tool {
                    name: approval.tool.clone(),
                }),
            },
            Choice::AllowAll if may_grant => Resolved {
                decision: ToolDecision::Allow,
                decided: decided(true, format!("Allowed all for {minutes} min"), None),
                grant: Some(GrantScope::All),
            },
            Choice::AllowDir if may_grant => {
                let Some(cwd) = record.cwd.clone() else {
                    return Err(
                        "This session has no working directory; answer allow or allow all.".into(),
                    );
                };
                Resolved {
                    decision: ToolDecision::Allow,
                    decided: decided(true, format!("Allowed in {cwd} for {minutes} min"), None),
                    grant: Some(GrantScope::Dir { path: cwd }),
                }
            }
            Choice::AllowTool | Choice::AllowAll | Choice::AllowDir => return Err(refuse_grant()),
            Choice::Option(id) => {
                let option = approval
                    .options
                    .iter()
                    .find(|o| o.id == id)
                    .ok_or_else(|| "❔ That choice is not offered.".to_owned())?;
                Resolved {
                    decision: ToolDecision::Option {
                        option_id: option.id.clone(),
                    },
                    decided: decided(option.allows, option.label.clone(), None),
                    grant: None,
                }
            }
            Choice::Pick(_) => return Err("❔ That choice is not offered.".into()),
        })
    }

    /// Records the decision (first wins), answers the runtime, edits the
    /// approval message, stores a grant, audits, and continues the turn
    /// when nothing else is pending.
    #[allow(clippy::too_many_arguments)]
    async fn apply_decision(
        &self,
        key: &str,
        delivery: &Delivery,
        message: &InboundMessage,
        provider: &dyn Provider,
        record: &mut SessionRecord,
        approval: Approval,
        resolved: Resolved,
    ) -> Outcome {
        let pending_here = record
            .waiting
            .as_ref()
            .is_some_and(|w| w.approvals.contains(&approval.id));
        let approval = match self
            .approvals
            .decide(key, &approval.id, resolved.decided.clone())
            .await
        {
            Ok(DecideOutcome::Recorded(approval)) => approval,
            // Redelivered after a crash: finish what was started.
            Ok(DecideOutcome::Already(approval))
                if pending_here
                    && approval.decided.as_ref().map(|d| &d.by) == Some(&resolved.decided.by) =>
            {
                approval
            }
            Ok(DecideOutcome::Already(approval)) => {
                let decided = approval
                    .decided
                    .as_ref()
                    .map(outcome_line)
                    .unwrap_or_default();
                self.notify(
                    message,
                    "approval-already",
                    &format!("ℹ️ Already decided: {decided}"),
                )
                .await;
                return Outcome::Done;
            }
            Ok(DecideOutcome::Unknown) => {
                return self.no_longer_pending(message).await;
            }
            Err(e) => {
                return Outcome::retry(e);
            }
        };
        let decided = approval.decided.clone().unwrap_or(resolved.decided);
        {
            match provider
                .confirm_tool(
                    &record.runtime_session_id,
                    &approval.request_id,
                    resolved.decision,
                )
                .await
            {
                Ok(()) => {}
                Err(e @ (ProviderError::Unavailable(_) | ProviderError::RateLimited { .. })) => {
                    return Outcome::retry(e);
                }
                Err(e) => {
                    tracing::warn!(error = %e, approval = %approval.id, "runtime did not take the decision")
                }
            }
        }
        tracing::info!(approval = %approval.id, tool = %approval.tool, allowed = decided.allowed, by = %decided.by, "approval decided");
        if let Some(scope) = resolved.grant {
            let now = self.clock.now_ms();
            let grant = Grant {
                scope: scope.clone(),
                expires_ms: now + self.config.approvals.grant_duration.as_millis() as i64,
                by: decided.by.clone(),
            };
            let stored = match scope {
                GrantScope::Dir { .. } => {
                    self.grants.add_dir(&app_scope(message), grant, now).await
                }
                _ => self.grants.add_session(key, grant, now).await,
            };
            if let Err(e) = stored {
                tracing::warn!(error = %e, "cannot store the grant");
            }
        }
        self.edit_approval(&approval, &decided).await;
        self.audit(
            key,
            provider,
            &record.runtime_session_id,
            &approval.turn_id,
            agent_event::Event::ApprovalDecision(ApprovalDecision {
                approval_id: approval.id.clone(),
                request_id: approval.request_id.clone(),
                tool: approval.tool.clone(),
                allowed: decided.allowed,
                outcome: decided.outcome.clone(),
                decided_by: if decided.by == "timeout" {
                    "timeout".into()
                } else {
                    sender_id(message).to_owned()
                },
                reason: decided.reason.clone().unwrap_or_default(),
                decided_ms: decided.at_ms,
            }),
        )
        .await;
        let Some(mut waiting) = record.waiting.clone().filter(|_| pending_here) else {
            return Outcome::Done;
        };
        waiting.approvals.retain(|id| id != &approval.id);
        waiting.handled.push(approval.request_id.clone());
        if !waiting.approvals.is_empty() {
            record.waiting = Some(waiting);
            return match self.store_record(key, record).await {
                Ok(()) => Outcome::Done,
                Err(e) => self.turn_failed(message, e).await,
            };
        }
        // Everything answered: the turn goes on, driven by this message.
        let turn = TurnRecord {
            inbound_id: message.id.clone(),
            turn_id: waiting.turn_id,
            anchor_event_id: waiting.anchor_event_id,
            handled: waiting.handled,
        };
        record.waiting = None;
        record.last_turn = Some(turn.clone());
        if let Err(e) = self.store_record(key, record).await {
            return self.turn_failed(message, e).await;
        }
        tracing::info!(turn = %turn.turn_id, "approvals answered, the turn continues");
        self.continue_turn(
            key,
            delivery,
            message,
            provider,
            record,
            TurnStart::Resume(turn),
        )
        .await
    }

    /// Edits an approval message to show its outcome, without buttons.
    async fn edit_approval(&self, approval: &Approval, decided: &Decided) {
        let mut out = hg_proto::OutboundMessage {
            id: format!("{}:decided", approval.message_id),
            platform: approval.platform.clone(),
            app_id: approval.app_id.clone(),
            channel_id: approval.channel_id.clone(),
            thread_id: approval.thread_id.clone(),
            text: format!(
                "{}\n\n{}",
                strip_hint(&approval.text),
                outcome_line(decided)
            ),
            kind: OutboundKind::Edit as i32,
            edit_of: approval.message_id.clone(),
            session_key: approval.session_key.clone(),
            turn_id: approval.turn_id.clone(),
            recipient_id: approval.requester.clone(),
            timestamp_ms: hg_proto::now_ms(),
            ..Default::default()
        };
        out.buttons.clear();
        let msg_id = format!("approval:{}:{}:decided", approval.session_key, approval.id);
        if let Err(e) = self.send_out(&out, Some(&msg_id)).await {
            tracing::warn!(error = %e, "cannot edit the approval message");
        }
    }

    /// A request timed out (the sweeper's message): apply the configured
    /// outcome unless someone decided meanwhile.
    pub(crate) async fn on_timeout(
        &self,
        key: &str,
        delivery: &Delivery,
        message: &InboundMessage,
        provider: &dyn Provider,
        record: &mut SessionRecord,
        approval_id: &str,
    ) -> Outcome {
        let approval = match self.approvals.get(key, approval_id).await {
            Ok(Some((approval, _))) => approval,
            Ok(None) => return Outcome::Done,
            Err(e) => {
                return Outcome::retry(e);
            }
        };
        if approval.decided.is_some() || approval.expires_ms > self.clock.now_ms() {
            return Outcome::Done;
        }
        let verdict = self.config.approvals.timeout_verdict(&approval.tool);
        let allowed = verdict == Verdict::Allow;
        let decision = match (allowed, approval.options.is_empty()) {
            (true, _) => ToolDecision::Allow,
            (false, true) => ToolDecision::Deny {
                message: Some("nobody answered the permission request in time".into()),
            },
            (false, false) => ToolDecision::Deny { message: None },
        };
        let resolved = Resolved {
            decision,
            decided: Decided {
                allowed,
                outcome: format!("Timed out, {}", if allowed { "allowed" } else { "denied" }),
                by: "timeout".into(),
                at_ms: self.clock.now_ms(),
                reason: None,
            },
            grant: None,
        };
        tracing::info!(approval = %approval.id, tool = %approval.tool, allowed, "approval timed out");
        self.apply_decision(key, delivery, message, provider, record, approval, resolved)
            .await
    }

    /// Answers every pending request of the conversation as cancelled.
    /// Returns how many there were.
    pub(crate) async fn cancel_pending(
        &self,
        key: &str,
        message: &InboundMessage,
        provider: &dyn Provider,
        record: &mut SessionRecord,
    ) -> usize {
        let Some(waiting) = record.waiting.take() else {
            return 0;
        };
        let mut cancelled = 0;
        for id in &waiting.approvals {
            let decided = Decided {
                allowed: false,
                outcome: "Cancelled".into(),
                by: who(message),
                at_ms: self.clock.now_ms(),
                reason: None,
            };
            if let Ok(DecideOutcome::Recorded(approval)) =
                self.approvals.decide(key, id, decided.clone()).await
            {
                if let Err(e) = provider
                    .confirm_tool(
                        &record.runtime_session_id,
                        &approval.request_id,
                        ToolDecision::Cancelled,
                    )
                    .await
                {
                    tracing::debug!(error = %e, "runtime did not take the cancellation");
                }
                self.edit_approval(&approval, &decided).await;
                cancelled += 1;
            }
        }
        cancelled
    }

    /// Turns timed-out approval requests into messages of their
    /// conversation, which apply the configured outcome in order.
    pub(crate) async fn sweep_approvals(&self) {
        let expired = match self.approvals.expired(self.clock.now_ms()).await {
            Ok(expired) => expired,
            Err(e) => {
                tracing::debug!(error = %e, "cannot look for timed-out approvals");
                return;
            }
        };
        for approval in expired {
            let message = timeout_message(&approval);
            if crate::session::session_key(&message) != approval.session_key {
                tracing::warn!(approval = %approval.id, "approval's conversation cannot be addressed; skipped");
                continue;
            }
            let subject = subject::inbound(&approval.platform, &approval.app_id);
            let msg_id = format!("approval-timeout:{}:{}", approval.session_key, approval.id);
            if let Err(e) = self.bus.publish(&subject, &message, Some(&msg_id)).await {
                tracing::warn!(error = %e, "cannot publish an approval timeout");
            }
        }
    }
}

/// A text reply's choice against one pending approval.
fn text_choice(text: &str, approval: &Approval) -> Option<Choice> {
    let trimmed = text.trim();
    if let Some(option) = approval
        .options
        .iter()
        .find(|o| o.label.eq_ignore_ascii_case(trimmed))
    {
        return Some(Choice::Option(option.id.clone()));
    }
    approvals::parse_reply(trimmed)
}

/// Resolves "allow <Tool>", a number or a label.
fn pick_choice(pick: &str, approval: &Approval) -> Option<Choice> {
    if let Some(tool) = pick.strip_prefix("allow ") {
        return tool
            .eq_ignore_ascii_case(&approval.tool)
            .then_some(Choice::AllowTool);
    }
    if let Ok(n) = pick.parse::<usize>() {
        let index = n.checked_sub(1)?;
        if approval.options.is_empty() {
            return [
                Choice::Allow,
                Choice::Deny { reason: None },
                Choice::AllowTool,
                Choice::AllowAll,
            ]
            .get(index)
            .cloned();
        }
        return approval
            .options
            .get(index)
            .map(|o| Choice::Option(o.id.clone()));
    }
    approval
        .options
        .iter()
        .find(|o| o.label.eq_ignore_ascii_case(pick))
        .map(|o| Choice::Option(o.id.clone()))
}

/// "✅ Allowed by @ana · 14:02 UTC" and the like.
fn outcome_line(decided: &Decided) -> String {
    let icon = if decided.allowed { "✅" } else { "🚫" };
    let mut line = if decided.by == "timeout" {
        format!(
            "⌛ {} · {}",
            decided.outcome,
            approvals::clock_time(decided.at_ms)
        )
    } else {
        format!(
            "{icon} {} by {} · {}",
            decided.outcome,
            decided.by,
            approvals::clock_time(decided.at_ms)
        )
    };
    if let Some(reason) = &decided.reason {
        line.push_str(&format!(" — \"{reason}\""));
    }
    line
}

/// The approval text without its "Reply with…" hint.
fn strip_hint(text: &str) -> &str {
    text.rsplit_once("\n\nReply with")
        .map(|(head, _)| head)
        .unwrap_or(text)
}

/// The sweeper's message for a timed-out approval: it travels through the
/// conversation's queue like a person's answer.
pub(crate) fn timeout_message(approval: &Approval) -> InboundMessage {
    InboundMessage {
        id: format!("approval-timeout:{}", approval.id),
        platform: approval.platform.clone(),
        app_id: approval.app_id.clone(),
        channel_id: approval.channel_id.clone(),
        thread_id: approval.thread_id.clone(),
        chat_type: approval.chat_type,
        sender: Some(hg_proto::Sender {
            id: approval.requester.clone(),
            ..Default::default()
        }),
        button_press: Some(ButtonPress {
            action_id: ACTION_TIMEOUT.into(),
            value: approval.id.clone(),
            message_id: String::new(),
        }),
        timestamp_ms: hg_proto::now_ms(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approval_ids_are_short_and_stable() {
        let a = approval_id("web:app:dm:ana", "sevt_1");
        assert_eq!(a.len(), 12);
        assert_eq!(a, approval_id("web:app:dm:ana", "sevt_1"));
        assert_ne!(a, approval_id("web:app:dm:ana", "sevt_2"));
        assert_ne!(a, approval_id("web:app:dm:bob", "sevt_1"));
    }
}
