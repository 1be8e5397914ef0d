//! Durable pull consumers with explicit ack, and a watchdog.
//!
//! async-nats pull subscriptions have been seen to stall under load: the
//! server holds no pending pull while the client believes one is
//! outstanding, and nothing re-pulls (nats-io/nats.rs#860, #1285). The same
//! state follows a server restart, which forgets every pull request. So the
//! message stream here uses a short heartbeat and expiry, and a watchdog
//! recreates it when heartbeats go missing, when the stream ends, or when
//! the server reports undelivered messages while nothing arrives.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{Bus, BusError, HEADER_TYPE, Result};

/// Header carrying a forwarded message's original subject.
const HEADER_FORWARDED_SUBJECT: &str = "Hg-Forwarded-Subject";
/// Header carrying a forwarded message's ack subject.
const HEADER_FORWARDED_REPLY: &str = "Hg-Forwarded-Reply";

/// What to consume and how.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: String,
    /// Durable name, shared by every replica of a service.
    pub durable: String,
    pub filter_subject: String,
    /// Redelivery after this long without ack or progress.
    pub ack_wait: Duration,
    /// Deliveries before the server gives up on a message (-1: never).
    pub max_deliver: i64,
    /// Messages handed out and not yet acked, across all replicas.
    pub max_ack_pending: i64,
    /// Messages fetched per pull.
    pub batch: usize,
    /// Server heartbeat while a pull waits.
    pub heartbeat: Duration,
    /// Lifetime of one pull request.
    pub expires: Duration,
    /// Without a delivery for this long while the server reports pending
    /// messages, the watchdog recreates the message stream.
    pub stall_after: Duration,
}

impl ConsumerSpec {
    /// Defaults suited to a service consumer on `stream`.
    pub fn new(stream: &str, durable: &str, filter_subject: &str) -> Self {
        ConsumerSpec {
            stream: stream.to_owned(),
            durable: durable.to_owned(),
            filter_subject: filter_subject.to_owned(),
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            max_ack_pending: 10_000,
            batch: 200,
            heartbeat: Duration::from_secs(2),
            expires: Duration::from_secs(10),
            stall_after: Duration::from_secs(5),
        }
    }
}

/// One message handed to a service, to be acked when done.
pub struct Delivery {
    message: jetstream::Message,
    received: Instant,
    /// From the ack subject, parsed once: (times delivered, stream sequence).
    info: (u32, u64),
}

impl Delivery {
    fn new(message: jetstream::Message, received: Instant) -> Self {
        let info = message
            .info()
            .map(|i| (i.delivered.max(1) as u32, i.stream_sequence))
            .unwrap_or((1, 0));
        Delivery {
            message,
            received,
            info,
        }
    }

    /// The subject the message was published on.
    pub fn subject(&self) -> &str {
        self.message.subject.as_str()
    }

    /// The raw payload.
    pub fn payload(&self) -> &Bytes {
        &self.message.payload
    }

    /// The message headers.
    pub fn headers(&self) -> Option<&HeaderMap> {
        self.message.headers.as_ref()
    }

    /// The `Hg-Type` header, or "" when missing.
    pub fn payload_type(&self) -> &str {
        self.headers()
            .and_then(|h| h.get(HEADER_TYPE))
            .map(|v| v.as_str())
            .unwrap_or_default()
    }

    /// How many times the server has delivered this message (1 the first
    /// time).
    pub fn deliveries(&self) -> u32 {
        self.info.0
    }

    /// Sequence of the message in its stream.
    pub fn stream_sequence(&self) -> u64 {
        self.info.1
    }

    /// When this replica received the message.
    pub fn received(&self) -> Instant {
        self.received
    }

    /// Hands this message to another process subscribed to `subject` (see
    /// [`Delivery::from_forwarded`]), which then owns the ack. Fails when
    /// nobody answers within `timeout`; the caller still owns it then.
    pub async fn forward(&self, bus: &Bus, subject: &str, timeout: Duration) -> Result<()> {
        let mut headers = self.message.headers.clone().unwrap_or_default();
        headers.insert(HEADER_FORWARDED_SUBJECT, self.message.subject.as_str());
        if let Some(reply) = &self.message.reply {
            headers.insert(HEADER_FORWARDED_REPLY, reply.as_str());
        }
        let request = async_nats::Request::new()
            .payload(self.message.payload.clone())
            .headers(headers)
            .timeout(Some(timeout));
        bus.client()
            .send_request(subject.to_owned(), request)
            .await
            .map(|_| ())
            .map_err(|e| BusError::Consumer {
                consumer: subject.to_owned(),
                reason: format!("forward failed: {e}"),
            })
    }

    /// Rebuilds a delivery forwarded with [`Delivery::forward`]; acks from
    /// it go to the original consumer. Answers the forwarder.
    pub async fn from_forwarded(bus: &Bus, request: async_nats::Message) -> Option<Delivery> {
        let headers = request.headers.clone()?;
        let subject = headers.get(HEADER_FORWARDED_SUBJECT)?.as_str().to_owned();
        let reply = headers
            .get(HEADER_FORWARDED_REPLY)
            .map(|r| async_nats::Subject::from(r.as_str().to_owned()));
        if let Some(answer) = &request.reply {
            let _ = bus.client().publish(answer.clone(), Bytes::new()).await;
        }
        let message = async_nats::Message {
            subject: subject.into(),
            reply,
            payload: request.payload,
            headers: Some(headers),
            status: None,
            description: None,
            length: request.length,
        };
        Some(Delivery::new(
            jetstream::Message {
                message,
                context: bus.jetstream().clone(),
            },
            Instant::now(),
        ))
    }

    /// Publishes this message to `hg.dlq.<service>` with `reason`
    /// (best effort: a failure is logged, the caller still acks or terms).
    pub async fn dead_letter(&self, bus: &Bus, service: &str, reason: &str, attempts: u32) {
        if let Err(e) = bus
            .dead_letter(
                service,
                self.subject(),
                self.payload().clone(),
                self.payload_type(),
                reason,
                attempts,
            )
            .await
        {
            tracing::error!(service, error = %e, "cannot dead-letter a message");
        }
    }

    /// Done: the server will not deliver it again.
    pub async fn ack(&self) -> Result<()> {
        self.reply(AckKind::Ack).await
    }

    /// Not done: deliver again after `delay`.
    pub async fn nak(&self, delay: Duration) -> Result<()> {
        self.reply(AckKind::Nak(Some(delay))).await
    }

    /// Still working: resets the ack-wait timer.
    pub async fn progress(&self) -> Result<()> {
        self.reply(AckKind::Progress).await
    }

    /// Never deliver again (poison message; dead-letter it first).
    pub async fn term(&self) -> Result<()> {
        self.reply(AckKind::Term).await
    }

    async fn reply(&self, kind: AckKind) -> Result<()> {
        self.message
            .ack_with(kind)
            .await
            .map_err(|e| BusError::Consumer {
                consumer: self.subject().to_owned(),
                reason: e.to_string(),
            })
    }
}

/// A durable consumer whose message stream is watched and recreated when it
/// stalls.
pub struct WatchedConsumer {
    bus: Bus,
    spec: ConsumerSpec,
}

impl WatchedConsumer {
    /// Creates (or opens) the durable consumer.
    pub async fn create(bus: &Bus, spec: ConsumerSpec) -> Result<Self> {
        let watched = WatchedConsumer {
            bus: bus.clone(),
            spec,
        };
        watched.consumer().await?;
        Ok(watched)
    }

    async fn consumer(&self) -> Result<PullConsumer> {
        let spec = &self.spec;
        let topology = |reason: String| BusError::Topology {
            what: format!("consumer {} on {}", spec.durable, spec.stream),
            reason,
        };
        let stream = self
            .bus
            .jetstream()
            .get_stream(&spec.stream)
            .await
            .map_err(|e| topology(e.to_string()))?;
        stream
            .get_or_create_consumer(
                &spec.durable,
                pull::Config {
                    durable_name: Some(spec.durable.clone()),
                    filter_subject: spec.filter_subject.clone(),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: spec.ack_wait,
                    max_deliver: spec.max_deliver,
                    max_ack_pending: spec.max_ack_pending,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| topology(e.to_string()))
    }

    /// Hands every message to `on_message` until `shutdown` fires.
    /// `on_message` must return quickly (queue the work); it owns the ack.
    pub async fn run<F>(self, shutdown: CancellationToken, mut on_message: F) -> Result<()>
    where
        F: FnMut(Delivery),
    {
        let spec = self.spec.clone();
        let name = spec.durable.as_str();
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let consumer = match self.consumer().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(consumer = name, error = %e, "consumer unavailable, retrying");
                    wait_or_shutdown(&shutdown, backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let messages = consumer
                .stream()
                .max_messages_per_batch(spec.batch)
                .heartbeat(spec.heartbeat)
                .expires(spec.expires)
                .messages()
                .await;
            let mut messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(consumer = name, error = %e, "cannot open message stream, retrying");
                    wait_or_shutdown(&shutdown, backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let mut last_progress = Instant::now();
            let mut watchdog = tokio::time::interval(spec.stall_after / 2);
            watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let reason = loop {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    next = messages.next() => match next {
                        Some(Ok(message)) => {
                            last_progress = Instant::now();
                            on_message(Delivery::new(message, last_progress));
                        }
                        Some(Err(e)) => {
                            use async_nats::jetstream::consumer::pull::MessagesErrorKind as K;
                            match e.kind() {
                                K::MissingHeartbeat | K::ConsumerDeleted | K::NoResponders => {
                                    break format!("{e}");
                                }
                                _ => tracing::debug!(consumer = name, error = %e, "message stream error"),
                            }
                        }
                        None => break "message stream ended".to_owned(),
                    },
                    _ = watchdog.tick() => {
                        if last_progress.elapsed() < spec.stall_after {
                            continue;
                        }
                        match consumer.get_info().await {
                            Ok(info) if info.num_pending > 0
                                && (info.num_ack_pending as i64) < spec.max_ack_pending =>
                            {
                                break format!(
                                    "{} messages pending but none delivered for {:?}",
                                    info.num_pending,
                                    last_progress.elapsed()
                                );
                            }
                            Ok(_) => last_progress = Instant::now(),
                            Err(e) => break format!("consumer info failed: {e}"),
                        }
                    }
                }
            };
            metrics::counter!("hg_consumer_restarts_total", "consumer" => spec.durable.clone())
                .increment(1);
            tracing::warn!(consumer = name, reason = %reason, "recreating message stream");
        }
        Ok(())
    }
}

async fn wait_or_shutdown(shutdown: &CancellationToken, delay: Duration) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(delay) => {}
    }
}
