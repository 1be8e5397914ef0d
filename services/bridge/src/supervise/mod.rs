//! People steering the agent from chat: tool-permission requests and their
//! decisions, auto-approve grants, commands and access control.
//!
//! A turn that needs approvals is *paused*: the requests are stored in KV,
//! shown with buttons, and the inbound message is acked. Decisions are
//! ordinary inbound messages of the conversation (a button press or a text
//! reply), so they are ordered with everything else and survive restarts;
//! when the last pending request is decided, the turn continues from the
//! runtime's event log where it paused.

mod approve;
mod command;

pub(crate) use approve::Ask;
pub(crate) use command::META_INTERRUPTED;

use hg_proto::{AgentEvent, ChatType, InboundMessage, agent_event, subject};

use crate::access::{AccessMode, PairingRequest, PairingStatus};
use crate::approvals;
use crate::provider::Provider;
use crate::routing::Route;
use crate::turn::Bridge;

/// How a person is named in messages: "@ana", else the display name or id.
fn who(message: &InboundMessage) -> String {
    match &message.sender {
        Some(s) if !s.username.is_empty() => format!("@{}", s.username),
        Some(s) if !s.display_name.is_empty() => s.display_name.clone(),
        Some(s) => s.id.clone(),
        None => "someone".into(),
    }
}

/// The platform user id of the sender ("" when unknown).
fn sender_id(message: &InboundMessage) -> &str {
    message.sender.as_ref().map(|s| s.id.as_str()).unwrap_or("")
}

/// `platform:app`, the scope of directory grants.
fn app_scope(message: &InboundMessage) -> String {
    format!("{}:{}", message.platform, message.app_id)
}

impl Bridge {
    // ----- access control -------------------------------------------------

    /// Whether the sender may use `route`; tells them why not where useful.
    pub(crate) async fn admitted(&self, message: &InboundMessage, route: &Route) -> bool {
        let sender = sender_id(message);
        match route.access {
            AccessMode::Open => return true,
            _ if route.allowlist.iter().any(|a| a == sender) => return true,
            AccessMode::Allowlist => {
                tracing::info!(sender, "sender not on the allowlist");
                if message.chat_type() == ChatType::Direct {
                    self.notify(
                        message,
                        "not-allowed",
                        "⛔ You are not allowed to use this agent.",
                    )
                    .await;
                }
                return false;
            }
            AccessMode::Pairing => {}
        }
        if message.chat_type() != ChatType::Direct {
            // Pairing happens in direct chats; unpaired group members are
            // ignored unless paired already.
            return self
                .pairing
                .is_paired(&message.platform, &message.app_id, sender)
                .await
                .unwrap_or(false);
        }
        let sender_info = message.sender.clone().unwrap_or_default();
        let request = PairingRequest {
            code: String::new(),
            platform: message.platform.clone(),
            app_id: message.app_id.clone(),
            user_id: sender.to_owned(),
            username: sender_info.username,
            display_name: sender_info.display_name,
            channel_id: message.channel_id.clone(),
            created_ms: 0,
            expires_ms: 0,
        };
        let now = self.clock.now_ms();
        match self
            .pairing
            .status(request, &self.config.pairing, now)
            .await
        {
            Ok(PairingStatus::Approved) => true,
            Ok(PairingStatus::Pending(request)) => {
                tracing::info!(sender, "unpaired sender, pairing code issued");
                let minutes = approvals::minutes_left(request.expires_ms, now);
                self.notify(
                    message,
                    "pairing",
                    &format!(
                        "🔐 This agent only talks to approved people. Your pairing code is **{}** \
                         (valid for {minutes} min). Ask the operator to run \
                         `harnessgate pairing approve {}`, then write again.",
                        request.code, request.code
                    ),
                )
                .await;
                false
            }
            Ok(PairingStatus::Full) => {
                tracing::warn!(sender, "too many pending pairing codes");
                self.notify(
                    message,
                    "pairing-full",
                    "🔐 Too many people are waiting for approval right now; please try again later.",
                )
                .await;
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check pairing; not admitting");
                false
            }
        }
    }

    /// Publishes an audit record on `hg.events.<session>` (stored).
    pub(crate) async fn audit(
        &self,
        key: &str,
        provider: &dyn Provider,
        runtime_session_id: &str,
        turn_id: &str,
        event: agent_event::Event,
    ) {
        let out = AgentEvent {
            id: uuid::Uuid::now_v7().to_string(),
            session_key: key.to_owned(),
            runtime: provider.name().to_owned(),
            runtime_session_id: runtime_session_id.to_owned(),
            turn_id: turn_id.to_owned(),
            timestamp_ms: hg_proto::now_ms(),
            event: Some(event),
        };
        if let Err(e) = self.bus.publish(&subject::events(key), &out, None).await {
            tracing::warn!(error = %e, "cannot publish the audit record");
        }
    }
}
