//! The NATS bus every HarnessGate service talks through.
//!
//! - [`Bus::connect`] connects with reconnect and creates the JetStream
//!   streams idempotently ([`Bus::ensure_streams`]).
//! - [`Bus::publish`] publishes a protobuf message to JetStream with the
//!   `Nats-Msg-Id`, `Content-Type`, `Hg-Type` and `traceparent` headers and
//!   waits for the stream's acknowledgement.
//! - [`consumer::WatchedConsumer`] consumes with explicit ack and recovers
//!   from stalled pull subscriptions.
//! - [`keyed::KeyedWorkers`] processes messages of one key (a conversation, a
//!   chat) in order while different keys run concurrently.
//! - [`lease::Lease`] gives one replica at a time ownership of a key.
//! - [`presence::Presence`] tells a replica whether others are running.

pub mod consumer;
pub mod keyed;
pub mod lease;
pub mod presence;
pub mod trace;

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use hg_proto::{BusMessage, DeadLetter, subject};
use serde::{Deserialize, Serialize};

/// Header naming the protobuf type of the payload.
pub const HEADER_TYPE: &str = "Hg-Type";
/// Content type of every bus payload.
pub const CONTENT_TYPE_PROTOBUF: &str = "application/protobuf";

/// Result type of bus operations.
pub type Result<T, E = BusError> = std::result::Result<T, E>;

/// What went wrong on the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to nats at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("cannot create or open {what}: {reason}")]
    Topology { what: String, reason: String },
    #[error("publish to {subject} failed: {reason}")]
    Publish { subject: String, reason: String },
    #[error("key-value operation on {bucket} failed: {reason}")]
    Kv { bucket: String, reason: String },
    #[error("cannot decode {type_name}: {reason}")]
    Decode {
        type_name: &'static str,
        reason: String,
    },
    #[error("request on {subject} got no answer: {reason}")]
    Request {
        subject: String,
        reason: String,
        kind: RequestFailure,
    },
    #[error("consumer {consumer} failed: {reason}")]
    Consumer { consumer: String, reason: String },
}

/// Why a request-reply call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFailure {
    /// Nobody subscribes to the subject.
    NoResponders,
    /// A responder exists but did not answer in time.
    TimedOut,
    /// Anything else (connection lost, bad subject).
    Other,
}

/// How to reach NATS and shape the streams.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// NATS server URL(s), comma separated.
    pub url: String,
    /// Name this connection reports to the server.
    pub name: String,
    /// Optional credentials: a token, or user + password.
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// JetStream replicas of each stream (1 for a single server).
    pub replicas: usize,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long inbound/outbound messages are kept.
    #[serde(with = "humantime_serde")]
    pub message_max_age: Duration,
    /// How long agent events are kept on `hg.events.>`.
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    /// How long the first connection may take before start-up fails.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            url: "nats://127.0.0.1:4222".into(),
            name: "harnessgate".into(),
            token: None,
            user: None,
            password: None,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            message_max_age: Duration::from_secs(7 * 24 * 3600),
            events_max_age: Duration::from_secs(24 * 3600),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A connection to the bus, cheap to clone.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    config: std::sync::Arc<BusConfig>,
}

impl Bus {
    /// Connects (retrying until `connect_timeout`), keeps reconnecting
    /// afterwards, and creates the streams.
    pub async fn connect(config: &BusConfig) -> Result<Bus> {
        let mut options = async_nats::ConnectOptions::new()
            .name(&config.name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    other => tracing::debug!(event = %other, "nats event"),
                }
            });
        if let Some(token) = &config.token {
            options = options.token(token.clone());
        }
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        let connect = async_nats::connect_with_options(config.url.as_str(), options);
        let client = tokio::time::timeout(config.connect_timeout, connect)
            .await
            .map_err(|_| BusError::Connect {
                url: config.url.clone(),
                reason: format!("no connection within {:?}", config.connect_timeout),
            })?
            .map_err(|e| BusError::Connect {
                url: config.url.clone(),
                reason: e.to_string(),
            })?;
        // Make sure the server really answers before declaring success.
        tokio::time::timeout(config.connect_timeout, client.flush())
            .await
            .map_err(|_| BusError::Connect {
                url: config.url.clone(),
                reason: "server did not answer".into(),
            })?
            .map_err(|e| BusError::Connect {
                url: config.url.clone(),
                reason: e.to_string(),
            })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(10));
        let bus = Bus {
            client,
            js,
            config: std::sync::Arc::new(config.clone()),
        };
        bus.ensure_streams().await?;
        Ok(bus)
    }

    /// The core NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The configuration this bus was opened with.
    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    /// Creates the HarnessGate streams when they do not exist. Safe to call
    /// from every replica at once.
    pub async fn ensure_streams(&self) -> Result<()> {
        let c = &self.config;
        let specs = [
            (
                subject::STREAM_IN,
                "hg.in.>",
                c.message_max_age,
                stream::RetentionPolicy::Limits,
            ),
            (
                subject::STREAM_OUT,
                "hg.out.>",
                c.message_max_age,
                stream::RetentionPolicy::Limits,
            ),
            (
                subject::STREAM_EVENTS,
                "hg.events.>",
                c.events_max_age,
                stream::RetentionPolicy::Limits,
            ),
            (
                subject::STREAM_DLQ,
                "hg.dlq.>",
                c.message_max_age,
                stream::RetentionPolicy::Limits,
            ),
        ];
        for (name, subjects, max_age, retention) in specs {
            self.ensure_stream(stream::Config {
                name: name.to_owned(),
                subjects: vec![subjects.to_owned()],
                max_age,
                retention,
                duplicate_window: c.duplicate_window,
                num_replicas: c.replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }

    /// Opens a stream, creating it with `config` when missing.
    pub async fn ensure_stream(&self, config: stream::Config) -> Result<stream::Stream> {
        let name = config.name.clone();
        match self.js.get_or_create_stream(config).await {
            Ok(stream) => Ok(stream),
            // Another process created it between our lookup and our create
            // (the server then answers "subjects overlap" or "name in use"):
            // theirs is the one to use.
            Err(e) => self
                .js
                .get_stream(&name)
                .await
                .map_err(|_| BusError::Topology {
                    what: format!("stream {name}"),
                    reason: e.to_string(),
                }),
        }
    }

    /// Opens a KV bucket, creating it with `config` when missing. Replicas
    /// racing to create the same bucket all end up with it.
    ///
    /// The bucket's stream is created here rather than through
    /// `create_key_value`, whose account-info query fails against
    /// nats-server 2.9 (Debian's package).
    pub async fn kv(&self, config: kv::Config) -> Result<kv::Store> {
        let bucket = config.bucket.clone();
        if let Ok(store) = self.js.get_key_value(&bucket).await {
            return Ok(store);
        }
        let history = config.history.max(1);
        let duplicate_window = if config.max_age > Duration::ZERO {
            config.max_age.min(Duration::from_secs(120))
        } else {
            Duration::from_secs(120)
        };
        self.ensure_stream(stream::Config {
            name: format!("KV_{bucket}"),
            description: Some(config.description.clone()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: history,
            max_bytes: if config.max_bytes == 0 {
                -1
            } else {
                config.max_bytes
            },
            max_age: config.max_age,
            max_message_size: if config.max_value_size == 0 {
                -1
            } else {
                config.max_value_size
            },
            storage: config.storage,
            num_replicas: config.num_replicas.max(self.config.replicas),
            allow_rollup: true,
            allow_direct: true,
            deny_delete: true,
            discard: stream::DiscardPolicy::New,
            duplicate_window,
            ..Default::default()
        })
        .await?;
        self.js
            .get_key_value(&bucket)
            .await
            .map_err(|e| BusError::Topology {
                what: format!("kv bucket {bucket}"),
                reason: e.to_string(),
            })
    }

    /// Publishes `message` to JetStream and waits for the stream to store it.
    /// `msg_id` becomes `Nats-Msg-Id`: a second publish with the same id
    /// within the duplicate window is dropped by the server. Returns the
    /// stream sequence and whether the server saw it as a duplicate.
    pub async fn publish<M: BusMessage>(
        &self,
        subject: &str,
        message: &M,
        msg_id: Option<&str>,
    ) -> Result<Published> {
        self.publish_raw(
            subject,
            M::TYPE_NAME,
            message.encode_to_vec().into(),
            msg_id,
        )
        .await
    }

    /// Publishes an already encoded payload of type `type_name` to JetStream.
    pub async fn publish_raw(
        &self,
        subject: &str,
        type_name: &str,
        payload: Bytes,
        msg_id: Option<&str>,
    ) -> Result<Published> {
        let mut headers = message_headers(type_name);
        if let Some(id) = msg_id {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        }
        self.store(subject, Some(headers), payload)
            .await
            .map_err(|reason| BusError::Publish {
                subject: subject.to_owned(),
                reason,
            })
    }

    /// Stores `payload` in the stream that takes `subject` and returns
    /// where, once the server acknowledged it.
    ///
    /// A JetStream publish is a request whose reply is the acknowledgement.
    /// It is sent here through the client's shared reply subscription and
    /// the acknowledgement read in one pass: async-nats's own publish first
    /// tries every acknowledgement as an error reply, which cost about 2 % of
    /// the bridge's instructions per message.
    pub async fn store(
        &self,
        subject: &str,
        headers: Option<HeaderMap>,
        payload: Bytes,
    ) -> std::result::Result<Published, String> {
        let mut request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(STORE_TIMEOUT));
        if let Some(headers) = headers {
            request = request.headers(headers);
        }
        let reply = self
            .client
            .send_request(subject.to_owned(), request)
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    "no stream takes this subject".to_owned()
                }
                _ => e.to_string(),
            })?;
        let ack: PubAck = serde_json::from_slice(&reply.payload)
            .map_err(|e| format!("unreadable acknowledgement: {e}"))?;
        if let Some(error) = ack.error {
            return Err(format!(
                "{} (code {}, error code {})",
                error.description, error.code, error.err_code
            ));
        }
        metrics::counter!("hg_bus_published_total", "stream" => ack.stream).increment(1);
        Ok(Published {
            sequence: ack.seq,
            duplicate: ack.duplicate,
        })
    }

    /// Puts `value` under `key` in `store`, like `kv::Store::put` but
    /// through [`Bus::store`]. Returns the new revision.
    pub async fn kv_put(&self, store: &kv::Store, key: &str, value: Bytes) -> Result<u64> {
        let kv_error = |reason: String| BusError::Kv {
            bucket: store.name.clone(),
            reason,
        };
        if store.use_jetstream_prefix {
            // A bucket behind a JetStream domain prefix: the library knows it.
            return store
                .put(key, value)
                .await
                .map_err(|e| kv_error(e.to_string()));
        }
        let prefix = store.put_prefix.as_deref().unwrap_or(&store.prefix);
        let mut subject = String::with_capacity(prefix.len() + key.len());
        subject.push_str(prefix);
        subject.push_str(key);
        self.store(&subject, None, value)
            .await
            .map(|published| published.sequence)
            .map_err(kv_error)
    }

    /// Publishes on core NATS (no stream, no acknowledgement): receipts and
    /// other best-effort notifications.
    pub async fn publish_core<M: BusMessage>(&self, subject: &str, message: &M) -> Result<()> {
        self.client
            .publish_with_headers(
                subject.to_owned(),
                message_headers(M::TYPE_NAME),
                message.encode_to_vec().into(),
            )
            .await
            .map_err(|e| BusError::Publish {
                subject: subject.to_owned(),
                reason: e.to_string(),
            })
    }

    /// Sends `request` on `subject` and decodes the reply as `R`.
    pub async fn request<M: BusMessage, R: BusMessage>(
        &self,
        subject: &str,
        request: &M,
        timeout: Duration,
    ) -> Result<R> {
        let req = async_nats::Request::new()
            .payload(request.encode_to_vec().into())
            .headers(message_headers(M::TYPE_NAME))
            .timeout(Some(timeout));
        let reply = self
            .client
            .send_request(subject.to_owned(), req)
            .await
            .map_err(|e| {
                let kind = match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => RequestFailure::NoResponders,
                    async_nats::RequestErrorKind::TimedOut => RequestFailure::TimedOut,
                    _ => RequestFailure::Other,
                };
                BusError::Request {
                    subject: subject.to_owned(),
                    reason: e.to_string(),
                    kind,
                }
            })?;
        decode::<R>(&reply.payload)
    }

    /// Publishes a dead letter for a payload that could not be processed or
    /// delivered, to `hg.dlq.<service>`.
    pub async fn dead_letter(
        &self,
        service: &str,
        original_subject: &str,
        payload: Bytes,
        payload_type: &str,
        reason: &str,
        attempts: u32,
    ) -> Result<()> {
        let letter = DeadLetter {
            subject: original_subject.to_owned(),
            payload: payload.to_vec(),
            reason: reason.to_owned(),
            service: service.to_owned(),
            attempts,
            timestamp_ms: hg_proto::now_ms(),
            payload_type: payload_type.to_owned(),
        };
        tracing::warn!(service, subject = original_subject, reason, "dead-lettered");
        metrics::counter!("hg_dead_letters_total", "service" => service.to_owned()).increment(1);
        self.publish(&subject::dead_letter(service), &letter, None)
            .await
            .map(|_| ())
    }
}

/// Outcome of a JetStream publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Sequence of the message in its stream.
    pub sequence: u64,
    /// The server had already stored a message with the same id.
    pub duplicate: bool,
}

/// How long a JetStream publish waits for the server's acknowledgement.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's answer to a JetStream publish: where the message was
/// stored, or why not.
#[derive(serde::Deserialize)]
struct PubAck {
    #[serde(default)]
    stream: String,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    error: Option<PubAckError>,
}

#[derive(serde::Deserialize)]
struct PubAckError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u16,
    #[serde(default)]
    description: String,
}

/// Decodes a bus payload.
pub fn decode<M: BusMessage>(payload: &[u8]) -> Result<M> {
    M::decode(payload).map_err(|e| BusError::Decode {
        type_name: M::TYPE_NAME,
        reason: e.to_string(),
    })
}

/// The headers every bus payload carries, plus the current trace context.
pub fn message_headers(type_name: &str) -> HeaderMap {
    // The fixed headers of each type are built (names checked, values
    // copied) once and cloned after: a publish needs them several times a
    // message.
    static FIXED: std::sync::RwLock<Vec<(String, HeaderMap)>> = std::sync::RwLock::new(Vec::new());
    let cached = FIXED
        .read()
        .expect("headers lock")
        .iter()
        .find(|(name, _)| name == type_name)
        .map(|(_, headers)| headers.clone());
    let mut headers = cached.unwrap_or_else(|| {
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", CONTENT_TYPE_PROTOBUF);
        headers.insert(HEADER_TYPE, type_name);
        let mut fixed = FIXED.write().expect("headers lock");
        if fixed.len() < 64 && !fixed.iter().any(|(name, _)| name == type_name) {
            fixed.push((type_name.to_owned(), headers.clone()));
        }
        headers
    });
    trace::inject(&mut headers);
    headers
}

/// A KV bucket config with the given name, history 1 and file storage.
pub fn kv_config(bucket: &str, description: &str) -> kv::Config {
    kv::Config {
        bucket: bucket.to_owned(),
        description: description.to_owned(),
        history: 1,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}
