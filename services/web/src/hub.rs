//! Getting replies to browsers, whichever replica holds their connection.
//!
//! The web egress stores each reply part in the stream `HG_WEB_DELIVERY`
//! under `hgweb.deliver.<app>.<user>`. Every web replica follows that stream
//! with one ordered consumer and hands each part to the connections of its
//! user held here. A reconnecting browser sends the last event id it saw
//! (the stream sequence) and first gets what it missed from the stream.
//! Typing indicators are ephemeral and travel on core NATS
//! (`hgweb.typing.<app>.<user>`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, pull};
use async_nats::jetstream::stream;
use futures::StreamExt;
use hg_bus::{Bus, BusError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Stream holding reply parts for web users.
pub const DELIVERY_STREAM: &str = "HG_WEB_DELIVERY";

/// `hgweb.deliver.<app>.<user>`
pub fn delivery_subject(app: &str, user: &str) -> String {
    format!(
        "hgweb.deliver.{}.{}",
        hg_proto::subject::token(app),
        hg_proto::subject::token(user)
    )
}

/// `hgweb.typing.<app>.<user>`
pub fn typing_subject(app: &str, user: &str) -> String {
    format!(
        "hgweb.typing.{}.{}",
        hg_proto::subject::token(app),
        hg_proto::subject::token(user)
    )
}

/// One thing to show in the browser.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebEvent {
    /// Stream sequence; the SSE event id. 0 for ephemeral events.
    #[serde(default)]
    pub seq: u64,
    /// "reply", "status", "approval_request", "edit" or "typing".
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    /// Sanitized HTML rendering of `text`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub html: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub outbound_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub turn_id: String,
    #[serde(default)]
    pub part: u32,
    #[serde(default)]
    pub parts: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buttons: Vec<WebButton>,
    /// For typing: on or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typing: Option<bool>,
    #[serde(default)]
    pub timestamp_ms: i64,
}

/// A button shown under a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebButton {
    pub action_id: String,
    pub label: String,
    pub value: String,
}

/// Creates the delivery stream (idempotent).
pub async fn ensure_stream(bus: &Bus, max_age: Duration) -> Result<(), BusError> {
    bus.ensure_stream(stream::Config {
        name: DELIVERY_STREAM.to_owned(),
        subjects: vec!["hgweb.deliver.>".to_owned()],
        max_age,
        max_messages_per_subject: 1_000,
        duplicate_window: Duration::from_secs(120),
        num_replicas: bus.config().replicas,
        ..Default::default()
    })
    .await
    .map(|_| ())
}

/// Events are shared, not copied, between a user's connections; an
/// `Arc` also keeps each idle connection's channel small.
type Connections = HashMap<String, Vec<(u64, mpsc::Sender<Arc<WebEvent>>)>>;

/// Connections held by this replica, by user.
#[derive(Default)]
pub struct Hub {
    connections: Mutex<Connections>,
    next_id: AtomicU64,
}

/// Events one connection may queue before it is dropped as too slow (the
/// browser reconnects and catches up from the stream).
const CONNECTION_QUEUE: usize = 64;

impl Hub {
    /// Registers a connection of `user` in `app`; returns its id (for
    /// [`Hub::disconnect`]) and the receiver of its live events.
    pub fn register(&self, app: &str, user: &str) -> (u64, mpsc::Receiver<Arc<WebEvent>>) {
        let key = hub_key(app, user);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(CONNECTION_QUEUE);
        self.connections
            .lock()
            .expect("hub lock")
            .entry(key)
            .or_default()
            .push((id, tx));
        metrics::gauge!("hg_web_connections").increment(1.0);
        (id, rx)
    }

    /// Removes a connection registered with [`Hub::register`].
    pub fn disconnect(&self, app: &str, user: &str, id: u64) {
        self.remove(&hub_key(app, user), id);
    }

    fn remove(&self, key: &str, id: u64) {
        let mut connections = self.connections.lock().expect("hub lock");
        if let Some(list) = connections.get_mut(key) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                connections.remove(key);
            }
        }
        metrics::gauge!("hg_web_connections").decrement(1.0);
    }

    /// Hands `event` to every connection of the user behind `key`.
    fn dispatch(&self, key: &str, event: WebEvent) {
        let event = Arc::new(event);
        let mut connections = self.connections.lock().expect("hub lock");
        if let Some(list) = connections.get_mut(key) {
            // A full queue means a stalled browser: close it; it will
            // reconnect with its last event id and miss nothing.
            list.retain(|(_, tx)| tx.try_send(Arc::clone(&event)).is_ok());
        }
    }

    /// Follows the delivery stream and typing subject until `shutdown`,
    /// dispatching to local connections. Recreates its consumer when the
    /// stream stalls or the server restarts.
    pub async fn follow(&self, bus: Bus, shutdown: CancellationToken) {
        let typing = match bus.client().subscribe("hgweb.typing.>").await {
            Ok(sub) => Some(sub),
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to typing indicators");
                None
            }
        };
        let typing_loop = async {
            let Some(mut typing) = typing else { return };
            while let Some(msg) = typing.next().await {
                if let (Some(key), Ok(event)) = (
                    msg.subject.as_str().strip_prefix("hgweb.typing."),
                    serde_json::from_slice::<WebEvent>(&msg.payload),
                ) {
                    self.dispatch(key, event);
                }
            }
        };
        let delivery_loop = async {
            let mut after = None;
            loop {
                if let Err(e) = self.follow_deliveries(&bus, &mut after).await {
                    tracing::warn!(error = %e, "web delivery stream interrupted, resuming");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = typing_loop => {}
            () = delivery_loop => {}
        }
    }

    async fn follow_deliveries(&self, bus: &Bus, after: &mut Option<u64>) -> Result<(), BusError> {
        const NAME: &str = "web delivery follower";
        let consumer_error = |e: &dyn std::fmt::Display| consumer_error(NAME, e);
        let deliver_policy = match after {
            Some(seq) => DeliverPolicy::ByStartSequence {
                start_sequence: *seq + 1,
            },
            None => DeliverPolicy::New,
        };
        let stream = delivery_stream(bus, NAME).await?;
        let mut messages = ordered(&stream, "hgweb.deliver.>".into(), deliver_policy, NAME).await?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| consumer_error(&e))?;
            let seq = message
                .info()
                .map(|i| i.stream_sequence)
                .unwrap_or_default();
            *after = Some(seq);
            let Some(key) = message.subject.as_str().strip_prefix("hgweb.deliver.") else {
                continue;
            };
            match serde_json::from_slice::<WebEvent>(&message.payload) {
                Ok(mut event) => {
                    event.seq = seq;
                    self.dispatch(key, event);
                }
                Err(e) => tracing::warn!(seq, error = %e, "unreadable web delivery"),
            }
        }
        Err(consumer_error(&"ordered consumer ended"))
    }
}

/// The events of `user` stored after sequence `after`, oldest first.
pub async fn replay(
    bus: &Bus,
    app: &str,
    user: &str,
    after: u64,
) -> Result<Vec<WebEvent>, BusError> {
    const NAME: &str = "web replay";
    let consumer_error = |e: &dyn std::fmt::Display| consumer_error(NAME, e);
    let stream = delivery_stream(bus, NAME).await?;
    let subject = delivery_subject(app, user);
    // Most connections missed nothing: check the user's newest part first
    // rather than waiting on an empty consumer.
    match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(last) if last.sequence > after => {}
        _ => return Ok(Vec::new()),
    }
    let policy = DeliverPolicy::ByStartSequence {
        start_sequence: after + 1,
    };
    let mut messages = ordered(&stream, subject, policy, NAME).await?;
    let mut events = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_millis(500), messages.next()).await;
        let Ok(Some(message)) = next else { break };
        let message = message.map_err(|e| consumer_error(&e))?;
        let info = message.info().map_err(|e| consumer_error(&e))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        if let Ok(mut event) = serde_json::from_slice::<WebEvent>(&message.payload) {
            event.seq = seq;
            events.push(event);
        }
        if pending == 0 {
            break;
        }
    }
    Ok(events)
}

fn consumer_error(consumer: &str, e: &dyn std::fmt::Display) -> BusError {
    BusError::Consumer {
        consumer: consumer.to_owned(),
        reason: e.to_string(),
    }
}

async fn delivery_stream(bus: &Bus, name: &str) -> Result<stream::Stream, BusError> {
    bus.jetstream()
        .get_stream(DELIVERY_STREAM)
        .await
        .map_err(|e| consumer_error(name, &e))
}

/// An ordered consumer's messages on `filter` from `policy`.
async fn ordered(
    stream: &stream::Stream,
    filter: String,
    policy: DeliverPolicy,
    name: &str,
) -> Result<pull::Ordered, BusError> {
    stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: policy,
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        })
        .await
        .map_err(|e| consumer_error(name, &e))?
        .messages()
        .await
        .map_err(|e| consumer_error(name, &e))
}

fn hub_key(app: &str, user: &str) -> String {
    format!(
        "{}.{}",
        hg_proto::subject::token(app),
        hg_proto::subject::token(user)
    )
}
