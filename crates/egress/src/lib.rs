//! The egress pipeline every platform shares.
//!
//! It consumes `hg.out.<platform>.>` through one durable consumer shared by
//! the platform's egress replicas, splits each message's Markdown within the
//! platform's limit, delivers the parts in order per chat, retries transient
//! failures with backoff (honouring the platform's retry-after), acks only
//! after the platform accepted every part, and after `max_attempts` failures
//! dead-letters the message and tells the user. Every outcome is published
//! as a [`DeliveryReceipt`] on `hg.receipt.<platform>.<app>`.
//!
//! A platform plugs in by implementing [`Platform`].

mod elect;

pub use elect::{Election, run_elected};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hg_bus::consumer::{ConsumerSpec, Delivery, WatchedConsumer};
use hg_bus::keyed::KeyedWorkers;
use hg_bus::{Bus, BusError};
use hg_proto::{Button, DeliveryReceipt, OutboundKind, OutboundMessage, subject};
use hg_text::Limit;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Why a platform did not accept a part.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliveryError {
    /// Worth retrying: rate limited, server error, connection lost.
    #[error("transient delivery failure: {reason}")]
    Transient {
        reason: String,
        /// What the platform asked us to wait, when it said.
        retry_after: Option<Duration>,
    },
    /// Will fail again: bad request, unknown chat, bot blocked.
    #[error("delivery refused: {0}")]
    Permanent(String),
}

/// One part of a split message, as handed to the platform.
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    /// The part's text in Markdown (platforms render their dialect).
    pub text: &'a str,
    /// Position from 0, and the number of parts.
    pub index: usize,
    pub count: usize,
    /// Buttons: only on the last part.
    pub buttons: &'a [Button],
}

/// A messaging platform as the egress pipeline sees it.
#[async_trait]
pub trait Platform: Send + Sync + 'static {
    /// The platform token in subjects ("web", "telegram", …).
    fn name(&self) -> &str;

    /// How long one message may be.
    fn limit(&self) -> Limit;

    /// Splits a message's Markdown into parts within [`Platform::limit`].
    fn split(&self, markdown: &str) -> Vec<String> {
        hg_text::split_markdown(markdown, self.limit())
    }

    /// Delivers one part; returns the platform's id of the message created.
    async fn send(
        &self,
        message: &OutboundMessage,
        part: Part<'_>,
    ) -> Result<String, DeliveryError>;

    /// Shows or stops "typing…" in the message's chat.
    async fn typing(&self, _message: &OutboundMessage, _on: bool) -> Result<(), DeliveryError> {
        Ok(())
    }
}

/// Retry and consumer settings of an egress.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressConfig {
    /// Attempts per part before the message is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to `max_backoff`.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Messages in flight across all replicas.
    pub max_in_flight: i64,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_in_flight: 10_000,
        }
    }
}

/// Errors that stop an egress.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Text sent to the user when a message could not be delivered.
pub const DELIVERY_FAILED_NOTICE: &str = "⚠️ A reply could not be delivered.";

/// Runs the egress of `platform` until `shutdown` fires, then waits for the
/// messages in hand to finish.
pub async fn run(
    bus: Bus,
    platform: Arc<dyn Platform>,
    config: EgressConfig,
    shutdown: CancellationToken,
) -> Result<(), EgressError> {
    let name = platform.name().to_owned();
    let mut spec = ConsumerSpec::new(
        subject::STREAM_OUT,
        &format!("egress-{}", subject::token(&name)),
        &subject::outbound_platform_filter(&name),
    );
    spec.max_ack_pending = config.max_in_flight;
    spec.ack_wait = Duration::from_secs(60);
    let consumer = WatchedConsumer::create(&bus, spec).await?;
    let tracker = TaskTracker::new();
    let pipeline = Arc::new(Pipeline {
        bus: bus.clone(),
        platform,
        config,
    });
    let work = Arc::clone(&pipeline);
    // Stop taking new work on shutdown, but let workers finish what they
    // hold: they stop on their own token once the queue is drained.
    let workers_stop = CancellationToken::new();
    let workers = KeyedWorkers::new(
        move |_chat: String, (delivery, message): (Delivery, OutboundMessage), _queued: usize| {
            let work = Arc::clone(&work);
            async move {
                work.handle(delivery, message).await;
                None
            }
        },
        tracker.clone(),
        workers_stop.clone(),
    );
    tracing::info!(platform = %name, "egress started");
    let result = consumer
        .run(shutdown.clone(), |delivery| {
            match hg_bus::decode::<OutboundMessage>(delivery.payload()) {
                Ok(message) => {
                    let chat = format!(
                        "{}\u{1f}{}\u{1f}{}",
                        message.app_id, message.channel_id, message.thread_id
                    );
                    workers.dispatch(&chat, delivery.stream_sequence(), (delivery, message));
                }
                Err(e) => {
                    let pipeline = Arc::clone(&pipeline);
                    tracker.spawn(async move { pipeline.reject(delivery, e.to_string()).await });
                }
            }
        })
        .await;
    workers_stop.cancel();
    tracker.close();
    tracker.wait().await;
    tracing::info!(platform = %name, "egress stopped");
    result.map_err(EgressError::from)
}

struct Pipeline {
    bus: Bus,
    platform: Arc<dyn Platform>,
    config: EgressConfig,
}

impl Pipeline {
    /// This egress's name in dead letters.
    fn service(&self) -> String {
        format!("egress-{}", self.platform.name())
    }

    async fn reject(&self, delivery: Delivery, reason: String) {
        delivery
            .dead_letter(
                &self.bus,
                &self.service(),
                &format!("malformed outbound payload: {reason}"),
                delivery.deliveries(),
            )
            .await;
        let _ = delivery.term().await;
    }

    async fn handle(&self, delivery: Delivery, message: OutboundMessage) {
        let span =
            tracing::info_span!("egress", platform = %self.platform.name(), outbound = %message.id);
        hg_bus::trace::set_parent(&span, delivery.headers());
        self.handle_in_span(delivery, message)
            .instrument(span)
            .await
    }

    async fn handle_in_span(&self, delivery: Delivery, message: OutboundMessage) {
        if message.kind() == OutboundKind::Typing {
            if let Err(e) = self.platform.typing(&message, !message.typing_stop).await {
                tracing::debug!(error = %e, "typing indicator failed");
            }
            let _ = delivery.ack().await;
            return;
        }
        let started = std::time::Instant::now();
        let outcome = self.deliver(&delivery, &message).await;
        let (delivered, ids, error, attempts) = match outcome {
            Ok((ids, attempts)) => (true, ids, String::new(), attempts),
            Err((ids, attempts, error)) => {
                self.give_up(&delivery, &message, &error, attempts).await;
                (false, ids, error, attempts)
            }
        };
        metrics::histogram!("hg_egress_delivery_seconds", "platform" => self.platform.name().to_owned())
            .record(started.elapsed().as_secs_f64());
        let receipt = DeliveryReceipt {
            outbound_id: message.id.clone(),
            platform: message.platform.clone(),
            app_id: message.app_id.clone(),
            channel_id: message.channel_id.clone(),
            delivered,
            platform_message_ids: ids,
            error,
            attempts,
            timestamp_ms: hg_proto::now_ms(),
        };
        if let Err(e) = self
            .bus
            .publish_core(
                &subject::receipt(&message.platform, &message.app_id),
                &receipt,
            )
            .await
        {
            tracing::warn!(error = %e, "cannot publish receipt");
        }
        if let Err(e) = delivery.ack().await {
            tracing::warn!(error = %e, "ack failed; the message may be delivered again");
        }
    }

    /// Delivers every part in order. Returns the platform ids and the
    /// attempts of the slowest part, or what was delivered plus the error.
    async fn deliver(
        &self,
        delivery: &Delivery,
        message: &OutboundMessage,
    ) -> Result<(Vec<String>, u32), (Vec<String>, u32, String)> {
        let parts = self.platform.split(&message.text);
        let parts: Vec<&str> = if parts.is_empty()
            && (!message.buttons.is_empty() || !message.attachments.is_empty())
        {
            vec![""]
        } else {
            parts.iter().map(String::as_str).collect()
        };
        let count = parts.len();
        let mut ids = Vec::with_capacity(count);
        let mut max_attempts = 0;
        for (index, text) in parts.into_iter().enumerate() {
            let part = Part {
                text,
                index,
                count,
                buttons: if index + 1 == count {
                    &message.buttons
                } else {
                    &[]
                },
            };
            let mut attempt = 0;
            let mut backoff = self.config.initial_backoff;
            loop {
                attempt += 1;
                match self.platform.send(message, part).await {
                    Ok(id) => {
                        ids.push(id);
                        break;
                    }
                    Err(DeliveryError::Permanent(reason)) => {
                        return Err((ids, attempt, reason));
                    }
                    Err(DeliveryError::Transient {
                        reason,
                        retry_after,
                    }) => {
                        if attempt >= self.config.max_attempts {
                            return Err((ids, attempt, reason));
                        }
                        let wait = retry_after.unwrap_or(backoff);
                        tracing::info!(attempt, wait_ms = wait.as_millis() as u64, reason = %reason, "delivery failed, retrying");
                        metrics::counter!("hg_egress_retries_total", "platform" => self.platform.name().to_owned()).increment(1);
                        sleep_keeping_alive(delivery, wait).await;
                        backoff = (backoff * 2).min(self.config.max_backoff);
                    }
                }
            }
            max_attempts = max_attempts.max(attempt);
        }
        metrics::counter!("hg_egress_parts_total", "platform" => self.platform.name().to_owned())
            .increment(count as u64);
        Ok((ids, max_attempts))
    }

    async fn give_up(
        &self,
        delivery: &Delivery,
        message: &OutboundMessage,
        error: &str,
        attempts: u32,
    ) {
        delivery
            .dead_letter(
                &self.bus,
                &self.service(),
                &format!("delivery failed after {attempts} attempts: {error}"),
                attempts,
            )
            .await;
        // Tell the user once; if even that fails there is nothing more to do.
        let notice = OutboundMessage {
            id: format!("{}:failed", message.id),
            kind: OutboundKind::Status as i32,
            text: DELIVERY_FAILED_NOTICE.to_owned(),
            buttons: Vec::new(),
            attachments: Vec::new(),
            ..message.clone()
        };
        // Rendered like any text, so platforms with their own markup get
        // what they expect.
        let rendered = self.platform.split(DELIVERY_FAILED_NOTICE);
        let part = Part {
            text: rendered
                .first()
                .map_or(DELIVERY_FAILED_NOTICE, String::as_str),
            index: 0,
            count: 1,
            buttons: &[],
        };
        if let Err(e) = self.platform.send(&notice, part).await {
            tracing::warn!(error = %e, "cannot tell the user about the failed delivery");
        }
    }
}

/// Sleeps `wait`, telling the server every few seconds that the message is
/// still being worked on so it is not redelivered meanwhile.
async fn sleep_keeping_alive(delivery: &Delivery, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return;
        }
        tokio::time::sleep((deadline - now).min(Duration::from_secs(10))).await;
        let _ = delivery.progress().await;
    }
}
