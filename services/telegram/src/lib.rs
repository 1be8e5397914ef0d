//! Telegram for HarnessGate: the ingress that turns Bot API updates into
//! `InboundMessage`s on `hg.in.telegram.<bot id>`, and the egress that
//! delivers `OutboundMessage`s from `hg.out.telegram.<bot id>` as Telegram
//! HTML.
//!
//! This crate is the reference other platforms copy:
//!
//! - **Ingress** ([`run_ingress`]) long-polls `getUpdates` (or serves a
//!   webhook). An update's offset is confirmed to Telegram only after
//!   JetStream stored its message, with `Nats-Msg-Id` =
//!   `telegram:<bot id>:<update id>`, so a crash never loses an update and a
//!   redelivered one is dropped as a duplicate. Each bot is polled by one
//!   replica at a time, through a lease in KV (`hg_telegram_leases`).
//!   Files are downloaded into the object store bucket `hg_files`.
//! - **Egress** ([`run_egress`]) runs the shared [`hg_egress`] pipeline
//!   (ordering per chat, retries honouring `retry_after`, dead letters,
//!   receipts) with Telegram's rendering, splitting, buttons, edits, typing
//!   and proactive rate limits.
//!
//! Telegram-side state shared by replicas lives in the KV bucket
//! `hg_telegram`: polling offsets, button actions behind short callback
//! data, and which Telegram messages an outbound became (for edits).
//!
//! Bots come from the configuration file and from the KV bucket `hg_apps`
//! ([`apps`], filled by `harnessgate apps add telegram`); running replicas
//! pick up added and removed apps without a restart.

#![warn(missing_docs)]

mod api;
pub mod apps;
pub mod config;
mod egress;
mod files;
mod ingress;
mod normalize;
mod rate;

use std::time::Duration;

use hg_bus::{Bus, BusError};
use tokio_util::sync::CancellationToken;

pub use config::{BotConfig, GroupTrigger, Mode, RateConfig, TelegramConfig, WebhookConfig};

/// The platform token in subjects and messages.
pub const PLATFORM: &str = "telegram";

/// KV bucket of Telegram state shared by replicas.
pub const STATE_BUCKET: &str = "hg_telegram";

/// KV bucket of the polling leases, one per bot.
pub const LEASE_BUCKET: &str = "hg_telegram_leases";

/// How long button actions and message maps are kept.
const STATE_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// What stops a Telegram component.
#[derive(Debug, thiserror::Error)]
pub enum TelegramError {
    /// The configuration cannot work.
    #[error("invalid telegram configuration: {0}")]
    Config(String),
    /// NATS failed in a way the component cannot ride out.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Telegram refused the bot (for example, a revoked token).
    #[error("telegram refused bot {bot}: {reason}")]
    Bot {
        /// The bot's id.
        bot: String,
        /// What Telegram answered.
        reason: String,
    },
    /// The webhook server could not start or failed.
    #[error("telegram webhook server failed: {0}")]
    Webhook(String),
    /// A component task ended unexpectedly (panicked).
    #[error("telegram task failed: {0}")]
    Task(String),
    /// The egress pipeline stopped with an error.
    #[error(transparent)]
    Egress(#[from] hg_egress::EgressError),
}

/// Runs the Telegram ingress for every configured bot, and every bot added
/// at runtime, until `shutdown` fires.
pub async fn run_ingress(
    config: TelegramConfig,
    bus: Bus,
    shutdown: CancellationToken,
) -> Result<(), TelegramError> {
    config.validate()?;
    ingress::run(config, bus, shutdown).await
}

/// Runs the Telegram egress until `shutdown` fires, then finishes the
/// messages in hand.
pub async fn run_egress(
    config: TelegramConfig,
    bus: Bus,
    shutdown: CancellationToken,
) -> Result<(), TelegramError> {
    config.validate()?;
    egress::run(config, bus, shutdown).await
}

/// Opens (or creates) the shared state bucket.
async fn state_store(bus: &Bus) -> Result<async_nats::jetstream::kv::Store, BusError> {
    let mut config = hg_bus::kv_config(STATE_BUCKET, "telegram offsets, buttons and message maps");
    config.max_age = STATE_MAX_AGE;
    bus.kv(config).await
}

/// Keeps the lease on `key` (taken at `revision`) until it is lost.
async fn hold_lease(
    leases: &hg_bus::lease::Lease,
    key: &str,
    revision: &std::sync::atomic::AtomicU64,
) {
    leases.hold(key, revision).await
}

/// A KV error as a bus error.
fn kv_error(e: impl std::fmt::Display) -> BusError {
    BusError::Kv {
        bucket: STATE_BUCKET.to_owned(),
        reason: e.to_string(),
    }
}
