//! Telegram components for tests: settings tuned for speed against the fake
//! Bot API, and the ingress and egress running in this process.

use std::time::Duration;

use hg_egress::EgressConfig;
use hg_proto::{OutboundKind, OutboundMessage};
use hg_telegram::{BotConfig, RateConfig, TelegramConfig};
use hg_testkit::fake_telegram::FakeTelegram;
use tokio_util::sync::CancellationToken;

use crate::{Component, Stack};

/// Settings for `tokens` on `fake`: short poll and lease timings, fast
/// retries, and no proactive pacing (tests that check pacing set `rate`).
pub fn config(fake: &FakeTelegram, tokens: &[&str]) -> TelegramConfig {
    TelegramConfig {
        api_url: fake.api_url(),
        bots: tokens
            .iter()
            .map(|t| BotConfig {
                token: (*t).to_owned(),
            })
            .collect(),
        poll_timeout: Duration::from_secs(1),
        lease_ttl: Duration::from_secs(1),
        typing_interval: Duration::from_millis(150),
        egress: EgressConfig {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            ..EgressConfig::default()
        },
        rate: RateConfig {
            per_chat: Duration::ZERO,
            per_group_per_minute: 0,
            per_bot_per_second: 0,
        },
        ..TelegramConfig::default()
    }
}

/// An outbound message from bot `bot` to chat `chat`.
pub fn outbound(bot: i64, chat: i64, id: &str, kind: OutboundKind, text: &str) -> OutboundMessage {
    OutboundMessage {
        id: id.into(),
        platform: "telegram".into(),
        app_id: bot.to_string(),
        channel_id: chat.to_string(),
        text: text.into(),
        kind: kind as i32,
        ..Default::default()
    }
}

impl Stack {
    /// A Telegram ingress replica.
    pub async fn telegram_ingress(&self, config: TelegramConfig) -> Component {
        let bus = self.connect().await;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            if let Err(e) = hg_telegram::run_ingress(config, bus, token).await {
                panic!("telegram ingress failed: {e}");
            }
        });
        Component { stop, handle }
    }

    /// A Telegram egress replica.
    pub async fn telegram_egress(&self, config: TelegramConfig) -> Component {
        let bus = self.connect().await;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            if let Err(e) = hg_telegram::run_egress(config, bus, token).await {
                panic!("telegram egress failed: {e}");
            }
        });
        Component { stop, handle }
    }
}
