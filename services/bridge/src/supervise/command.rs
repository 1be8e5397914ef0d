//! Chat commands: the ones that change the conversation run in its order;
//! read-only and custom ones are answered at once, and `/stop` reaches the
//! replica running the turn.

use std::time::Duration;

use hg_proto::{InboundMessage, subject};

use super::app_scope;
use crate::approvals;
use crate::commands::{BUILTIN, Command};
use crate::provider::{Provider, ProviderError};
use crate::routing::{Decision, Route};
use crate::session::SessionRecord;
use crate::turn::{Bridge, Outcome};
use hg_bus::consumer::Delivery;

/// Metadata key the dispatcher sets on `/stop` when it interrupted a
/// running turn.
pub(crate) const META_INTERRUPTED: &str = "hg.interrupted";

/// Subject on which the replica running a conversation's turn answers
/// "status" and "stop" requests.
pub(crate) fn turn_control_subject(key: &str) -> String {
    format!("hg.bridge.turn.{}", subject::token(key))
}

impl Bridge {
    // ----- commands -------------------------------------------------------

    /// Commands that change the conversation: run in its order.
    pub(crate) async fn command(
        &self,
        key: &str,
        message: &InboundMessage,
        route: &Route,
        provider: &dyn Provider,
        record: Option<SessionRecord>,
        command: Command,
    ) -> Outcome {
        let reply = match command {
            Command::Stop => {
                let mut cancelled = 0;
                if let Some(mut record) = record {
                    cancelled = self
                        .cancel_pending(key, message, provider, &mut record)
                        .await;
                    if cancelled > 0 {
                        let _ = provider.interrupt(&record.runtime_session_id).await;
                        if let Err(e) = self.store_record(key, &record).await {
                            return self.turn_failed(message, e).await;
                        }
                    }
                }
                let interrupted = message.metadata.contains_key(META_INTERRUPTED);
                match (interrupted, cancelled) {
                    (_, n) if n > 0 => format!(
                        "⏹ Stopped; {n} pending approval{} cancelled.",
                        if n == 1 { "" } else { "s" }
                    ),
                    (true, _) => "⏹ Stopped.".to_owned(),
                    (false, _) => "Nothing is running.".to_owned(),
                }
            }
            Command::New { dir } => {
                let cwd = match dir {
                    None => None,
                    Some(dir) => match provider.validate_cwd(&dir) {
                        Ok(cwd) => Some(cwd),
                        Err(reason) => {
                            self.notify(message, "new-refused", &format!("❌ {reason}"))
                                .await;
                            return Outcome::Done;
                        }
                    },
                };
                if let Some(mut old) = record {
                    self.cancel_pending(key, message, provider, &mut old).await;
                    if let Err(e) = provider.destroy(&old.runtime_session_id).await {
                        tracing::warn!(error = %e, "cannot end the old runtime session");
                    }
                }
                let _ = self.grants.clear_session(key).await;
                match self.new_session(key, route, provider, cwd.clone()).await {
                    Ok(_) => match cwd {
                        Some(cwd) => format!("🆕 New session started in `{cwd}`."),
                        None => "🆕 New session started.".to_owned(),
                    },
                    Err(e) => return self.turn_failed(message, e).await,
                }
            }
            Command::List { page } => {
                let page = page.max(1);
                match provider.list_sessions((page - 1) * 10, 10).await {
                    Ok(sessions) if sessions.is_empty() => "No sessions on this page.".to_owned(),
                    Ok(sessions) => {
                        let current = record.as_ref().map(|r| r.runtime_session_id.as_str());
                        let mut lines = vec![format!("Sessions (page {page}):\n")];
                        for (i, s) in sessions.iter().enumerate() {
                            let title = if s.title.is_empty() {
                                "untitled"
                            } else {
                                &s.title
                            };
                            let mark = if Some(s.id.as_str()) == current {
                                " ← this chat"
                            } else {
                                ""
                            };
                            lines.push(format!(
                                "{}. {title} (`{}`){mark}",
                                (page - 1) * 10 + i + 1,
                                s.id
                            ));
                        }
                        lines.push(format!(
                            "\n/attach <n> to continue one; /list {} for more.",
                            page + 1
                        ));
                        lines.join("\n")
                    }
                    Err(ProviderError::Unsupported(_)) => {
                        "This runtime cannot list its sessions.".to_owned()
                    }
                    Err(e) => format!("❌ Cannot list sessions: {e}"),
                }
            }
            Command::Attach { n } => match provider.list_sessions(n - 1, 1).await {
                Ok(sessions) => match sessions.into_iter().next() {
                    None => format!("❔ There is no session {n}; see /list."),
                    Some(session) => {
                        let mut new = SessionRecord {
                            runtime: route.runtime.clone(),
                            runtime_session_id: session.id.clone(),
                            agent_id: route.agent_id.clone(),
                            environment_id: route.environment_id.clone(),
                            created_ms: if session.created_ms > 0 {
                                session.created_ms
                            } else {
                                self.clock.now_ms()
                            },
                            turns: 0,
                            last_turn: None,
                            cwd: None,
                            waiting: None,
                            usage: Default::default(),
                        };
                        if let Some(mut old) = record {
                            self.cancel_pending(key, message, provider, &mut old).await;
                            new.cwd = old.cwd;
                        }
                        if let Err(e) = self.store_record(key, &new).await {
                            return self.turn_failed(message, e).await;
                        }
                        let title = if session.title.is_empty() {
                            session.id.clone()
                        } else {
                            session.title.clone()
                        };
                        let mut text = format!("📎 Attached to {title}.");
                        if let Ok(recent) = provider.recent_messages(&session.id, 5).await
                            && !recent.is_empty()
                        {
                            text.push_str(" Last messages:");
                            for (role, line) in recent {
                                let who = if role == "user" { "You" } else { "Agent" };
                                text.push_str(&format!(
                                    "\n> **{who}:** {}",
                                    approvals::shorten(&line.replace('\n', " "), 200)
                                ));
                            }
                        }
                        text
                    }
                },
                Err(ProviderError::Unsupported(_)) => {
                    "This runtime cannot list its sessions.".to_owned()
                }
                Err(e) => format!("❌ Cannot attach: {e}"),
            },
            Command::Help | Command::Status | Command::Usage | Command::Custom { .. } => {
                return self.immediate(key, message, route, provider, command).await;
            }
        };
        self.notify(message, "command", &reply).await;
        Outcome::Done
    }

    /// Read-only and custom commands, answered by whichever replica got
    /// them, even while a turn runs.
    pub(crate) async fn immediate(
        &self,
        key: &str,
        message: &InboundMessage,
        route: &Route,
        provider: &dyn Provider,
        command: Command,
    ) -> Outcome {
        let reply = match command {
            Command::Help => self.help(provider),
            Command::Status => match self.status_text(key, message, route, provider).await {
                Ok(text) => text,
                Err(e) => {
                    return Outcome::retry(e);
                }
            },
            Command::Usage => match self.load_record(key).await {
                Ok(Some(record)) => usage_text(&record),
                Ok(None) => "No session yet: nothing used.".to_owned(),
                Err(e) => {
                    return Outcome::retry(e);
                }
            },
            Command::Custom { name, args } => self.custom_command(message, &name, &args).await,
            other => {
                tracing::error!(?other, "not an immediate command");
                return Outcome::Done;
            }
        };
        self.notify(message, "command", &reply).await;
        Outcome::Done
    }

    fn help(&self, provider: &dyn Provider) -> String {
        let caps = provider.capabilities();
        let mut lines = vec!["Commands (`!` works like `/`):\n".to_owned()];
        for (name, what) in BUILTIN {
            let shown = match *name {
                "list" | "attach" => caps.list_sessions,
                "stop" => caps.interrupt,
                _ => true,
            };
            if !shown {
                continue;
            }
            let what = if *name == "new" && !caps.working_directory {
                "start a new session"
            } else {
                what
            };
            lines.push(format!("- /{name} — {what}"));
        }
        for custom in &self.config.commands {
            lines.push(format!("- /{} — {}", custom.name, custom.description));
        }
        lines.push(
            "\nWhen the agent asks to use a tool, answer with the buttons or reply allow / deny / \
             deny: <reason> / allow all / allow <Tool>."
                .to_owned(),
        );
        lines.join("\n")
    }

    async fn status_text(
        &self,
        key: &str,
        message: &InboundMessage,
        route: &Route,
        provider: &dyn Provider,
    ) -> Result<String, hg_bus::BusError> {
        let Some(record) = self.load_record(key).await? else {
            return Ok(format!(
                "No session yet. Runtime: {}{}. Your next message starts one.",
                provider.name(),
                agent_suffix(route)
            ));
        };
        let now = self.clock.now_ms();
        let running = self.running_elsewhere(key).await;
        let state = if record.waiting.is_some() {
            "waiting for approval".to_owned()
        } else if let Some(ms) = running {
            format!("running ({}s)", ms / 1000)
        } else {
            "idle".to_owned()
        };
        let age_min = (now - record.created_ms).max(0) / 60_000;
        let mut lines = vec![
            format!("Runtime: {}{}", record.runtime, agent_suffix(route)),
            format!("Session: `{}`", record.runtime_session_id),
            format!("State: {state}"),
            format!(
                "Age: {} · turns: {}",
                if age_min >= 60 {
                    format!("{}h {}min", age_min / 60, age_min % 60)
                } else {
                    format!("{age_min} min")
                },
                record.turns
            ),
        ];
        if let Some(cwd) = &record.cwd {
            lines.push(format!("Directory: `{cwd}`"));
        }
        if let Some(waiting) = &record.waiting {
            for id in &waiting.approvals {
                if let Ok(Some((a, _))) = self.approvals.get(key, id).await {
                    lines.push(format!(
                        "Pending: {} (expires in {} min)",
                        a.tool,
                        approvals::minutes_left(a.expires_ms, now)
                    ));
                }
            }
        }
        let grants = self.grants.active(key, &app_scope(message), now).await?;
        if grants.is_empty() {
            lines.push("Grants: none".into());
        }
        for grant in grants {
            lines.push(format!(
                "Grant: {} ({} min left)",
                grant.describe(),
                approvals::minutes_left(grant.expires_ms, now)
            ));
        }
        Ok(lines
            .iter()
            .map(|line| format!("- {line}"))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// How long the conversation's turn has been running, if a replica is
    /// running one.
    async fn running_elsewhere(&self, key: &str) -> Option<i64> {
        let request = self
            .bus
            .client()
            .request(turn_control_subject(key), "status".into());
        let reply = tokio::time::timeout(Duration::from_millis(300), request)
            .await
            .ok()?
            .ok()?;
        std::str::from_utf8(&reply.payload).ok()?.parse().ok()
    }

    async fn custom_command(&self, message: &InboundMessage, name: &str, args: &str) -> String {
        let mut request = message.clone();
        request.text = args.to_owned();
        let payload = hg_proto::Message::encode_to_vec(&request);
        let call = self
            .bus
            .client()
            .request(subject::command(name), payload.into());
        match tokio::time::timeout(self.config.command_timeout, call).await {
            Ok(Ok(reply)) => {
                let text = String::from_utf8_lossy(&reply.payload).trim().to_owned();
                if text.is_empty() {
                    format!("/{name}: done.")
                } else {
                    text
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(command = name, error = %e, "custom command failed");
                format!("❌ /{name} is not available right now.")
            }
            Err(_) => {
                tracing::warn!(command = name, "custom command timed out");
                format!("⌛ /{name} did not answer in time.")
            }
        }
    }

    /// Answers a read-only or custom command out of line, then acks it.
    pub(crate) async fn handle_immediate(
        &self,
        key: String,
        delivery: Delivery,
        message: InboundMessage,
        command: Command,
    ) {
        let outcome = match self.router.route(&message, &key).await {
            Decision::Serve(route) if self.admitted(&message, &route).await => {
                match self.providers.get(&route.runtime).cloned() {
                    Some(provider) => {
                        self.immediate(&key, &message, &route, provider.as_ref(), command)
                            .await
                    }
                    None => Outcome::Done,
                }
            }
            _ => Outcome::Done,
        };
        match outcome {
            Outcome::Retry { reason } => self.retry_or_give_up(&delivery, &message, &reason).await,
            _ => {
                if let Err(e) = delivery.ack().await {
                    tracing::warn!(error = %e, "ack failed; the command may be answered again");
                }
            }
        }
    }

    /// Asks whichever replica runs the conversation's turn to interrupt it;
    /// true when one did.
    pub(crate) async fn stop_running(&self, key: &str) -> bool {
        let request = self
            .bus
            .client()
            .request(turn_control_subject(key), "stop".into());
        matches!(
            tokio::time::timeout(Duration::from_millis(300), request).await,
            Ok(Ok(reply)) if &reply.payload[..] == b"stopped"
        )
    }

    /// Answers "status" (running for how many ms) and "stop" for turns
    /// running on this replica; stays silent about others.
    pub(crate) async fn turn_control(&self, request: async_nats::Message) {
        let Some(reply) = request.reply.clone() else {
            return;
        };
        let token = request
            .subject
            .as_str()
            .strip_prefix("hg.bridge.turn.")
            .unwrap_or_default();
        let answer = {
            let running = self.running.lock().expect("running turns lock");
            let Some(turn) = running.get(token) else {
                return;
            };
            match &request.payload[..] {
                b"stop" => {
                    turn.stop.cancel();
                    "stopped".to_owned()
                }
                _ => (hg_proto::now_ms() - turn.started_ms).to_string(),
            }
        };
        let _ = self.bus.client().publish(reply, answer.into()).await;
    }
}

fn agent_suffix(route: &Route) -> String {
    if route.agent_id.is_empty() {
        String::new()
    } else {
        format!(" · agent `{}`", route.agent_id)
    }
}

fn usage_text(record: &SessionRecord) -> String {
    let u = &record.usage;
    if u.model_requests == 0 && u.input_tokens == 0 && u.output_tokens == 0 {
        return format!(
            "Session `{}`: no usage reported yet.",
            record.runtime_session_id
        );
    }
    let mut text = format!(
        "Session `{}` ({} turns, {} model requests):\n\ninput {} tokens · output {} · cache read {} · cache write {}",
        record.runtime_session_id,
        record.turns,
        u.model_requests,
        u.input_tokens,
        u.output_tokens,
        u.cache_read_input_tokens,
        u.cache_creation_input_tokens
    );
    match u.cost_micro_usd {
        Some(micro) => text.push_str(&format!("\n\ncost ${:.4}", micro as f64 / 1e6)),
        None => text.push_str("\n\ncost: not reported by this runtime"),
    }
    text
}
