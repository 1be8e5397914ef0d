//! Conversations and the runtime sessions that serve them.
//!
//! A conversation's key follows its chat type: a direct chat is one
//! conversation per user, a group or channel is one shared conversation, a
//! thread (or forum topic) is one conversation per thread. Keys are always
//! scoped by platform and app. The map from key to runtime session lives in
//! the NATS KV bucket `hg_sessions`, so any replica (or a restarted bridge)
//! continues the same runtime session.

use async_nats::jetstream::kv;
use hg_bus::{Bus, BusError};
use hg_proto::{ChatType, InboundMessage};
use serde::{Deserialize, Serialize};

/// KV bucket of session records.
pub const SESSIONS_BUCKET: &str = "hg_sessions";

/// The conversation key of an inbound message.
pub fn session_key(message: &InboundMessage) -> String {
    let sender = message.sender.as_ref().map(|s| s.id.as_str()).unwrap_or("");
    let scope = format!("{}:{}", message.platform, message.app_id);
    match message.chat_type() {
        ChatType::Direct | ChatType::Unspecified => format!("{scope}:dm:{sender}"),
        ChatType::Group | ChatType::Channel => format!("{scope}:chat:{}", message.channel_id),
        ChatType::Thread => format!(
            "{scope}:thread:{}:{}",
            message.channel_id, message.thread_id
        ),
    }
}

/// A turn that was started and may not have finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnRecord {
    /// The inbound message that started it.
    pub inbound_id: String,
    pub turn_id: String,
    /// Runtime id of the user event; every event of the turn follows it.
    pub anchor_event_id: String,
    /// Runtime requests (tool confirmations) already answered in this turn;
    /// re-announced ones are skipped.
    #[serde(default)]
    pub handled: Vec<String>,
}

/// A turn paused until people answer tool-permission requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    pub turn_id: String,
    /// Runtime id of the event that asked (the turn continues after it).
    pub anchor_event_id: String,
    /// Approval ids still undecided, oldest first.
    pub approvals: Vec<String>,
    /// Runtime requests answered so far in this turn.
    pub handled: Vec<String>,
}

/// Tokens and cost a session used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageTotals {
    pub model_requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_creation_input_tokens: u64,
    /// Millionths of a US dollar, when the runtime reports cost.
    pub cost_micro_usd: Option<u64>,
}

/// What the bridge remembers about a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub runtime: String,
    pub runtime_session_id: String,
    pub agent_id: String,
    pub environment_id: String,
    pub created_ms: i64,
    pub turns: u64,
    /// The latest turn; kept after it ends so a redelivered inbound resumes
    /// (and is deduplicated) instead of being sent to the runtime again.
    pub last_turn: Option<TurnRecord>,
    /// Working directory (runtimes that run locally).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Set while the latest turn waits for approvals.
    #[serde(default)]
    pub waiting: Option<Waiting>,
    #[serde(default)]
    pub usage: UsageTotals,
}

/// Session records in KV.
#[derive(Clone)]
pub struct SessionStore {
    store: kv::Store,
    bus: Bus,
}

impl SessionStore {
    /// Opens (or creates) the sessions bucket.
    pub async fn open(bus: &Bus) -> Result<Self, BusError> {
        let store = bus
            .kv(hg_bus::kv_config(
                SESSIONS_BUCKET,
                "conversation to runtime session",
            ))
            .await?;
        Ok(SessionStore {
            store,
            bus: bus.clone(),
        })
    }

    /// The record of `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<SessionRecord>, BusError> {
        let Some(bytes) = self
            .store
            .get(hg_proto::subject::token(key))
            .await
            .map_err(kv_error)?
        else {
            return Ok(None);
        };
        match serde_json::from_slice(&bytes) {
            Ok(record) => Ok(Some(record)),
            Err(e) => {
                tracing::warn!(session = %key, error = %e, "unreadable session record, starting over");
                Ok(None)
            }
        }
    }

    /// Stores the record of `key`.
    pub async fn put(&self, key: &str, record: &SessionRecord) -> Result<(), BusError> {
        self.put_token(&hg_proto::subject::token(key), record).await
    }

    /// Stores the record under its KV key (`subject::token` of the session
    /// key).
    pub(crate) async fn put_token(
        &self,
        token: &str,
        record: &SessionRecord,
    ) -> Result<(), BusError> {
        let bytes = serde_json::to_vec(record).expect("session record serializes");
        self.bus.kv_put(&self.store, token, bytes.into()).await?;
        Ok(())
    }

    /// Forgets `key` (the next message starts a new runtime session).
    pub async fn remove(&self, key: &str) -> Result<(), BusError> {
        self.store
            .delete(hg_proto::subject::token(key))
            .await
            .map_err(kv_error)
    }
}

fn kv_error(e: impl std::fmt::Display) -> BusError {
    BusError::Kv {
        bucket: SESSIONS_BUCKET.to_owned(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hg_proto::Sender;

    fn message(chat_type: ChatType, channel: &str, thread: &str, sender: &str) -> InboundMessage {
        InboundMessage {
            platform: "telegram".into(),
            app_id: "bot1".into(),
            channel_id: channel.into(),
            thread_id: thread.into(),
            chat_type: chat_type as i32,
            sender: Some(Sender {
                id: sender.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn keys_follow_the_chat_type() {
        let dm_a = session_key(&message(ChatType::Direct, "c1", "", "ana"));
        let dm_b = session_key(&message(ChatType::Direct, "c1", "", "bob"));
        assert_ne!(dm_a, dm_b, "direct chats are per user");
        let group_a = session_key(&message(ChatType::Group, "g1", "", "ana"));
        let group_b = session_key(&message(ChatType::Group, "g1", "", "bob"));
        assert_eq!(group_a, group_b, "a group shares one session");
        let t1 = session_key(&message(ChatType::Thread, "g1", "t1", "ana"));
        let t2 = session_key(&message(ChatType::Thread, "g1", "t2", "ana"));
        assert_ne!(t1, t2, "threads are separate");
        assert_ne!(t1, group_a);
        let mut other_app = message(ChatType::Group, "g1", "", "ana");
        other_app.app_id = "bot2".into();
        assert_ne!(session_key(&other_app), group_a, "keys are scoped by app");
    }
}
