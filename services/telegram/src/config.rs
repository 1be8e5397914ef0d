//! Settings of the Telegram ingress and egress.

use std::time::Duration;

use hg_egress::EgressConfig;
use serde::{Deserialize, Serialize};

use crate::TelegramError;

/// Settings of the Telegram components (`[telegram]` in the configuration).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelegramConfig {
    /// Bot API base URL, without a trailing slash.
    pub api_url: String,
    /// The bots to serve; each is one app (`hg.in.telegram.<bot id>`). More
    /// can be added at runtime (`harnessgate apps add telegram`), so it may
    /// be empty.
    pub bots: Vec<BotConfig>,
    /// How updates arrive: long polling or a webhook.
    pub mode: Mode,
    /// Webhook settings, used when `mode = "webhook"`.
    pub webhook: WebhookConfig,
    /// When a group message is for the bot.
    pub group_trigger: GroupTrigger,
    /// Pass on messages sent by other bots.
    pub allow_bots: bool,
    /// Larger incoming files are not downloaded; the user is told.
    pub max_file_bytes: u64,
    /// Long-poll timeout of `getUpdates`; must stay below the HTTP client's
    /// 17 s timeout.
    #[serde(with = "humantime_serde")]
    pub poll_timeout: Duration,
    /// How long a replica's hold on a bot's polling (ingress), or on
    /// sending (egress: one replica sends at a time, so rate limits hold),
    /// lasts without renewal; another replica takes over within about this
    /// long after one dies.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How long the parts of an album (photos or documents sent together,
    /// one update each with the same `media_group_id`) are collected into
    /// one message; nothing is confirmed to Telegram meanwhile.
    #[serde(with = "humantime_serde")]
    pub album_window: Duration,
    /// How often "typing…" is refreshed while a turn runs (Telegram shows
    /// it for about 5 s).
    #[serde(with = "humantime_serde")]
    pub typing_interval: Duration,
    /// Retry and consumer settings of the egress.
    pub egress: EgressConfig,
    /// Proactive sending limits.
    pub rate: RateConfig,
}

impl Default for TelegramConfig {
    fn default() -> Self {
        TelegramConfig {
            api_url: "https://api.telegram.org".into(),
            bots: Vec::new(),
            mode: Mode::Polling,
            webhook: WebhookConfig::default(),
            group_trigger: GroupTrigger::MentionOrReply,
            allow_bots: false,
            max_file_bytes: 20 * 1024 * 1024,
            poll_timeout: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(15),
            album_window: Duration::from_secs(1),
            typing_interval: Duration::from_secs(4),
            egress: EgressConfig::default(),
            rate: RateConfig::default(),
        }
    }
}

impl TelegramConfig {
    /// Checks the settings, naming the offending key.
    pub fn validate(&self) -> Result<(), TelegramError> {
        let bad = |key: &str, reason: &str| {
            Err(TelegramError::Config(format!("telegram.{key}: {reason}")))
        };
        if reqwest::Url::parse(&self.api_url).is_err() {
            return bad("api_url", "not a valid url");
        }
        for (i, bot) in self.bots.iter().enumerate() {
            if bot.id().is_none() {
                return bad(
                    &format!("bots[{i}].token"),
                    "not a bot token (expected <bot id>:<secret>)",
                );
            }
        }
        if self.poll_timeout < Duration::from_secs(1)
            || self.poll_timeout >= Duration::from_secs(15)
        {
            return bad(
                "poll_timeout",
                "must be from 1s to below 15s (the http client gives up after 17s)",
            );
        }
        if self.lease_ttl < Duration::from_millis(300) {
            return bad("lease_ttl", "must be at least 300ms");
        }
        if self.album_window > Duration::from_secs(10) {
            return bad("album_window", "must be at most 10s");
        }
        if self.typing_interval.is_zero() {
            return bad("typing_interval", "must be positive");
        }
        if self.mode == Mode::Webhook {
            if self.webhook.listen.parse::<std::net::SocketAddr>().is_err() {
                return bad("webhook.listen", "not a socket address");
            }
            let secret = &self.webhook.secret_token;
            if secret.is_empty()
                || secret.len() > 256
                || !secret
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return bad(
                    "webhook.secret_token",
                    "required in webhook mode: 1-256 characters of A-Z a-z 0-9 _ -",
                );
            }
            if !self.webhook.public_url.is_empty()
                && reqwest::Url::parse(&self.webhook.public_url).is_err()
            {
                return bad("webhook.public_url", "not a valid url");
            }
        }
        Ok(())
    }
}

/// One bot, identified by its token from @BotFather.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BotConfig {
    /// `<bot id>:<secret>`. Secret: never logged.
    pub token: String,
}

impl BotConfig {
    /// The bot's id, the part of the token before `:`.
    pub fn id(&self) -> Option<&str> {
        let (id, secret) = self.token.split_once(':')?;
        (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && !secret.is_empty())
            .then_some(id)
    }
}

impl std::fmt::Debug for BotConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BotConfig")
            .field("id", &self.id().unwrap_or("?"))
            .field("token", &"<redacted>")
            .finish()
    }
}

/// How updates reach the ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `getUpdates` long polling; one replica polls each bot (a lease in KV).
    Polling,
    /// Telegram POSTs updates to `webhook.public_url`; any replica serves.
    Webhook,
}

/// Webhook settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Address the webhook server listens on.
    pub listen: String,
    /// Public base URL Telegram posts to; updates for a bot go to
    /// `<public_url>/telegram/<bot id>`. Empty: `setWebhook` is left to the
    /// operator.
    pub public_url: String,
    /// Telegram echoes it in `X-Telegram-Bot-Api-Secret-Token`; requests
    /// without it are refused. Secret.
    pub secret_token: String,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("listen", &self.listen)
            .field("public_url", &self.public_url)
            .field("secret_token", &"<redacted>")
            .finish()
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            listen: "0.0.0.0:8443".into(),
            public_url: String::new(),
            secret_token: String::new(),
        }
    }
}

/// When a message in a group is passed to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupTrigger {
    /// Only when the bot is mentioned (`@username`, a text mention, a
    /// `/command@username`) or the message replies to the bot.
    MentionOrReply,
    /// Every message the bot can see.
    All,
}

/// Proactive limits that keep the bot below Telegram's flood control.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateConfig {
    /// Least time between two messages to one chat (0: no limit).
    #[serde(with = "humantime_serde")]
    pub per_chat: Duration,
    /// Messages per minute to one group (0: no limit).
    pub per_group_per_minute: u32,
    /// Messages per second across all chats of one bot (0: no limit).
    pub per_bot_per_second: u32,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            per_chat: Duration::from_secs(1),
            per_group_per_minute: 20,
            per_bot_per_second: 30,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_redacted_in_debug_but_serialized() {
        let bot = BotConfig {
            token: "123:secret-part".into(),
        };
        assert_eq!(bot.id(), Some("123"));
        let debug = format!("{bot:?}");
        assert!(!debug.contains("secret-part"), "{debug}");
        let json = serde_json::to_string(&bot).unwrap();
        assert!(json.contains("secret-part"));
    }

    #[test]
    fn defaults_parse_and_validate_names_the_key() {
        let config: TelegramConfig = serde_json::from_str(
            r#"{"bots":[{"token":"1:a"}],"poll_timeout":"5s","rate":{"per_chat":"500ms"}}"#,
        )
        .unwrap();
        assert_eq!(config.poll_timeout, Duration::from_secs(5));
        assert_eq!(config.rate.per_chat, Duration::from_millis(500));
        assert_eq!(config.max_file_bytes, 20 * 1024 * 1024);
        config.validate().unwrap();
        let mut bad = config.clone();
        bad.bots[0].token = "nope".into();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("bots[0].token")
        );
        let mut bad = config.clone();
        bad.mode = Mode::Webhook;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("webhook.secret_token")
        );
        assert!(serde_json::from_str::<TelegramConfig>(r#"{"nope":1}"#).is_err());
    }
}
