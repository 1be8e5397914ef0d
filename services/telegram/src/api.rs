//! The Bot API client: one teloxide [`Bot`] per token, and what its errors
//! mean for us.

use std::time::Duration;

use hg_egress::DeliveryError;
use teloxide_core::{ApiError, Bot, RequestError};

use crate::TelegramError;
use crate::config::{BotConfig, TelegramConfig};

/// A bot's API client. Not `Debug`: the client holds the token.
#[derive(Clone)]
pub(crate) struct BotClient {
    /// The bot id from its token (the app id on the bus).
    pub id: String,
    pub bot: Bot,
}

/// Builds [`BotClient`]s that share one HTTP client (teloxide's long-running
/// settings: 17 s timeout) and the configured Bot API URL.
#[derive(Clone)]
pub(crate) struct ClientFactory {
    http: reqwest::Client,
    url: reqwest::Url,
}

impl ClientFactory {
    /// A factory for the Bot API at `api_url`.
    pub fn new(api_url: &str) -> Result<Self, TelegramError> {
        let http = teloxide_core::net::default_reqwest_settings()
            .build()
            .map_err(|e| TelegramError::Config(format!("cannot build the http client: {e}")))?;
        let url = reqwest::Url::parse(api_url.trim_end_matches('/'))
            .map_err(|e| TelegramError::Config(format!("telegram.api_url: {e}")))?;
        Ok(ClientFactory { http, url })
    }

    /// A client for `token`; `None` when it is not shaped like a token.
    pub fn client(&self, token: &str) -> Option<BotClient> {
        let id = BotConfig {
            token: token.to_owned(),
        }
        .id()?
        .to_owned();
        Some(BotClient {
            id,
            bot: Bot::with_client(token.to_owned(), self.http.clone())
                .set_api_url(self.url.clone()),
        })
    }
}

impl BotClient {
    /// Clients for every configured bot.
    pub fn all(
        factory: &ClientFactory,
        config: &TelegramConfig,
    ) -> Result<Vec<BotClient>, TelegramError> {
        config
            .bots
            .iter()
            .map(|b: &BotConfig| {
                factory
                    .client(&b.token)
                    .ok_or_else(|| TelegramError::Config("telegram.bots: not a bot token".into()))
            })
            .collect()
    }

    /// `error` as text that is safe to log: the token never appears.
    pub fn describe(&self, error: &dyn std::fmt::Display) -> String {
        let text = error.to_string();
        let token = self.bot.token();
        if token.is_empty() {
            text
        } else {
            text.replace(token, "<token>")
        }
    }
}

/// Whether Telegram refused the formatting of a message.
pub(crate) fn cant_parse_entities(error: &RequestError) -> bool {
    match error {
        RequestError::Api(ApiError::CantParseEntities(_)) => true,
        RequestError::Api(ApiError::Unknown(d)) => d.contains("can't parse entities"),
        _ => false,
    }
}

/// Whether an edit changed nothing, which is success for us.
pub(crate) fn not_modified(error: &RequestError) -> bool {
    match error {
        RequestError::Api(ApiError::MessageNotModified) => true,
        RequestError::Api(ApiError::Unknown(d)) => d.contains("message is not modified"),
        _ => false,
    }
}

/// Whether an edit used the wrong method for the message: text edits of a
/// photo or document, caption edits of a text message.
pub(crate) fn wrong_edit_kind(error: &RequestError) -> bool {
    match error {
        RequestError::Api(ApiError::Unknown(d)) => {
            d.contains("there is no text in the message to edit")
                || d.contains("there is no caption in the message to edit")
        }
        _ => false,
    }
}

/// Whether a forum topic does not exist (deleted, or the General topic).
pub(crate) fn thread_not_found(error: &RequestError) -> bool {
    matches!(error, RequestError::Api(ApiError::Unknown(d)) if d.contains("message thread not found"))
}

/// Whether Telegram refuses `getUpdates` because a webhook is set.
pub(crate) fn webhook_active(error: &RequestError) -> bool {
    match error {
        RequestError::Api(ApiError::CantGetUpdates) => true,
        RequestError::Api(ApiError::Unknown(d)) => {
            d.contains("can't use getUpdates method while webhook is active")
        }
        _ => false,
    }
}

/// Whether Telegram does not know the token at all.
pub(crate) fn invalid_token(error: &RequestError) -> bool {
    matches!(error, RequestError::Api(ApiError::InvalidToken))
}

/// What a failed send means to the egress pipeline: rate limits, network
/// trouble and server errors pass; refusals do not.
pub(crate) fn delivery_error(client: &BotClient, error: &RequestError) -> DeliveryError {
    let reason = client.describe(error);
    match error {
        RequestError::RetryAfter(seconds) => DeliveryError::Transient {
            reason,
            retry_after: Some(seconds.duration().max(Duration::from_millis(100))),
        },
        RequestError::Network(_) | RequestError::InvalidJson { .. } => DeliveryError::Transient {
            reason,
            retry_after: None,
        },
        RequestError::Api(ApiError::Unknown(d))
            if d.starts_with("Too Many Requests")
                || d.starts_with("Internal Server Error")
                || d.starts_with("Bad Gateway")
                || d.starts_with("Gateway Timeout")
                || d.starts_with("Service Unavailable") =>
        {
            DeliveryError::Transient {
                reason,
                retry_after: None,
            }
        }
        _ => DeliveryError::Permanent(reason),
    }
}
