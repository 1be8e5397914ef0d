//! Telegram bots added at runtime (`harnessgate apps add telegram`), next to
//! the bots of the configuration file.
//!
//! Each is one entry in the KV bucket [`APPS_BUCKET`] under
//! `telegram.<bot id>`, a JSON [`AppRecord`]. `apps add` checks the token
//! with `getMe` first, so only tokens Telegram accepts are stored. Running
//! ingress and egress replicas follow the bucket ([`AppWatch`]): a new entry
//! starts the bot (polled by one replica, through the same per-bot lease as
//! configured bots), a deleted one stops it within moments.
//!
//! The token is a secret: [`AppRecord`]'s `Debug` leaves it out, errors
//! never contain it, and [`mask_token`] is all a listing shows.

use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use hg_bus::{Bus, BusError};
use serde::{Deserialize, Serialize};
use teloxide_core::prelude::Requester;

use crate::PLATFORM;
use crate::api::ClientFactory;
use crate::config::BotConfig;

/// KV bucket of apps added at runtime, shared by every platform.
pub const APPS_BUCKET: &str = "hg_apps";

/// Key prefix of Telegram apps in [`APPS_BUCKET`].
const KEY_PREFIX: &str = "telegram.";

/// How long `apps add` waits for `getMe`.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(15);

/// A Telegram bot added at runtime, as stored in [`APPS_BUCKET`].
#[derive(Clone, Serialize, Deserialize)]
pub struct AppRecord {
    /// Always `telegram`.
    pub platform: String,
    /// The bot id (the app id on the bus).
    pub app_id: String,
    /// `<bot id>:<secret>`. Secret: never logged or printed.
    pub token: String,
    /// The operator's name for it (may be empty).
    #[serde(default)]
    pub label: String,
    /// The bot's `@username`, from `getMe`.
    #[serde(default)]
    pub username: String,
    /// When it was added, Unix milliseconds.
    #[serde(default)]
    pub added_ms: i64,
}

impl AppRecord {
    /// The token with its secret part hidden.
    pub fn masked_token(&self) -> String {
        mask_token(&self.token)
    }
}

impl std::fmt::Debug for AppRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppRecord")
            .field("platform", &self.platform)
            .field("app_id", &self.app_id)
            .field("token", &self.masked_token())
            .field("label", &self.label)
            .field("username", &self.username)
            .field("added_ms", &self.added_ms)
            .finish()
    }
}

/// `<bot id>:****`: enough to tell tokens apart, nothing to use.
pub fn mask_token(token: &str) -> String {
    match token.split_once(':') {
        Some((id, _)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{id}:****")
        }
        _ => "****".to_owned(),
    }
}

/// Why an apps command failed.
#[derive(Debug, thiserror::Error)]
pub enum AppsError {
    /// The text is not shaped like a bot token.
    #[error("not a telegram bot token (expected <bot id>:<secret> from @BotFather)")]
    Malformed,
    /// Telegram answered, and refused the token.
    #[error("telegram rejected the token: {0}")]
    Rejected(String),
    /// The Bot API could not be asked.
    #[error("cannot reach the telegram bot api at {url}: {reason}")]
    Unreachable {
        /// The configured `telegram.api_url`.
        url: String,
        /// What went wrong (without the token).
        reason: String,
    },
    /// `getMe` answered for another bot than the token names.
    #[error("getMe answered bot {answered}, but the token is for bot {expected}")]
    Mismatch {
        /// The id in the token.
        expected: String,
        /// The id Telegram answered.
        answered: String,
    },
    /// `apps remove` of an app that was not added at runtime.
    #[error("no runtime app {0} (bots from the configuration file are removed there)")]
    NotFound(String),
    /// The bucket holds something that is not an app record.
    #[error("app entry {key} is not readable: {reason}")]
    Corrupt {
        /// The KV key.
        key: String,
        /// The decode error.
        reason: String,
    },
    /// NATS failed.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Opens (or creates) the apps bucket.
pub async fn open(bus: &Bus) -> Result<kv::Store, BusError> {
    bus.kv(hg_bus::kv_config(
        APPS_BUCKET,
        "platform apps added at runtime (harnessgate apps)",
    ))
    .await
}

fn kv_error(e: impl std::fmt::Display) -> BusError {
    BusError::Kv {
        bucket: APPS_BUCKET.to_owned(),
        reason: e.to_string(),
    }
}

/// The KV key of the Telegram app `app_id`.
fn key(app_id: &str) -> String {
    format!("{KEY_PREFIX}{app_id}")
}

/// Asks Telegram (`getMe` at `api_url`) who the token belongs to: the bot's
/// id and username.
pub async fn verify(api_url: &str, token: &str) -> Result<(String, String), AppsError> {
    let expected = BotConfig {
        token: token.to_owned(),
    }
    .id()
    .ok_or(AppsError::Malformed)?
    .to_owned();
    let unreachable = |reason: String| AppsError::Unreachable {
        url: api_url.to_owned(),
        reason,
    };
    let factory = ClientFactory::new(api_url).map_err(|e| unreachable(e.to_string()))?;
    let client = factory.client(token).ok_or(AppsError::Malformed)?;
    let me = tokio::time::timeout(VERIFY_TIMEOUT, client.bot.get_me())
        .await
        .map_err(|_| unreachable(format!("no answer within {VERIFY_TIMEOUT:?}")))?;
    match me {
        Ok(me) => {
            let answered = me.user.id.0.to_string();
            if answered != expected {
                return Err(AppsError::Mismatch { expected, answered });
            }
            Ok((answered, me.user.username.clone().unwrap_or_default()))
        }
        Err(e @ teloxide_core::RequestError::Api(_)) => {
            Err(AppsError::Rejected(client.describe(&e)))
        }
        Err(e) => Err(unreachable(client.describe(&e))),
    }
}

/// `apps add telegram`: checks `token` with `getMe` at `api_url` and stores
/// the bot; running replicas start serving it. Adding a bot again replaces
/// its token and label.
pub async fn add(
    bus: &Bus,
    api_url: &str,
    token: &str,
    label: &str,
) -> Result<AppRecord, AppsError> {
    let token = token.trim();
    let (app_id, username) = verify(api_url, token).await?;
    let record = AppRecord {
        platform: PLATFORM.to_owned(),
        app_id,
        token: token.to_owned(),
        label: label.to_owned(),
        username,
        added_ms: hg_proto::now_ms(),
    };
    let value = serde_json::to_vec(&record).map_err(kv_error)?;
    open(bus)
        .await?
        .put(key(&record.app_id), value.into())
        .await
        .map_err(kv_error)?;
    tracing::info!(app = %record.app_id, username = %record.username, "telegram app added");
    Ok(record)
}

/// The Telegram apps added at runtime, by id.
pub async fn list(bus: &Bus) -> Result<Vec<AppRecord>, AppsError> {
    load(&open(bus).await?).await
}

/// Every stored Telegram app.
pub(crate) async fn load(store: &kv::Store) -> Result<Vec<AppRecord>, AppsError> {
    let mut keys: Vec<String> = store
        .keys()
        .await
        .map_err(kv_error)?
        .filter_map(|k| async move { k.ok() })
        .filter(|k| futures::future::ready(k.starts_with(KEY_PREFIX)))
        .collect()
        .await;
    keys.sort();
    let mut records = Vec::with_capacity(keys.len());
    for key in keys {
        let Some(value) = store.get(&key).await.map_err(kv_error)? else {
            continue;
        };
        records.push(decode(&key, &value)?);
    }
    Ok(records)
}

/// The stored app `app_id`, if any.
pub(crate) async fn get(store: &kv::Store, app_id: &str) -> Result<Option<AppRecord>, AppsError> {
    let key = key(app_id);
    match store.get(&key).await.map_err(kv_error)? {
        Some(value) => decode(&key, &value).map(Some),
        None => Ok(None),
    }
}

fn decode(key: &str, value: &[u8]) -> Result<AppRecord, AppsError> {
    serde_json::from_slice(value).map_err(|e| AppsError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// `apps remove`: deletes the app (`<bot id>`, or `telegram.<bot id>` /
/// `telegram:<bot id>`); running replicas stop serving it.
pub async fn remove(bus: &Bus, app: &str) -> Result<AppRecord, AppsError> {
    let app_id = app
        .strip_prefix(KEY_PREFIX)
        .or_else(|| app.strip_prefix("telegram:"))
        .unwrap_or(app);
    if app_id.is_empty() || !app_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AppsError::NotFound(app.to_owned()));
    }
    let store = open(bus).await?;
    let record = get(&store, app_id)
        .await?
        .ok_or_else(|| AppsError::NotFound(app_id.to_owned()))?;
    store.delete(key(app_id)).await.map_err(kv_error)?;
    tracing::info!(app = %app_id, "telegram app removed");
    Ok(record)
}

/// A change of the stored apps.
pub(crate) enum AppEvent {
    /// Added, or its token or label changed.
    Added(AppRecord),
    /// Removed, by app id.
    Removed(String),
}

/// Follows [`APPS_BUCKET`]: first every stored app, then changes as they
/// happen. A lost watch is opened again, which replays the current state,
/// so receivers must take repeated events in their stride.
pub(crate) struct AppWatch {
    store: kv::Store,
    watch: Option<kv::Watch>,
    backoff: Duration,
}

impl AppWatch {
    /// Opens the bucket; the watch itself starts on the first
    /// [`AppWatch::next`].
    pub async fn open(bus: &Bus) -> Result<AppWatch, BusError> {
        Ok(AppWatch {
            store: open(bus).await?,
            watch: None,
            backoff: Duration::from_millis(200),
        })
    }

    /// The bucket.
    pub fn store(&self) -> &kv::Store {
        &self.store
    }

    /// The next change. Waits as long as it takes; safe to cancel (in a
    /// `select!`).
    pub async fn next(&mut self) -> AppEvent {
        loop {
            let watch = match &mut self.watch {
                Some(watch) => watch,
                None => match self
                    .store
                    .watch_with_history(format!("{KEY_PREFIX}>"))
                    .await
                {
                    Ok(watch) => {
                        self.backoff = Duration::from_millis(200);
                        self.watch.insert(watch)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch the apps bucket, retrying");
                        tokio::time::sleep(self.backoff).await;
                        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            match watch.next().await {
                Some(Ok(entry)) => {
                    let Some(app_id) = entry.key.strip_prefix(KEY_PREFIX) else {
                        continue;
                    };
                    match entry.operation {
                        kv::Operation::Put => match decode(&entry.key, &entry.value) {
                            Ok(record) => return AppEvent::Added(record),
                            Err(e) => tracing::warn!(error = %e, "ignoring an app entry"),
                        },
                        kv::Operation::Delete | kv::Operation::Purge => {
                            return AppEvent::Removed(app_id.to_owned());
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "apps watch failed, watching again");
                    self.watch = None;
                }
                None => {
                    tracing::debug!("apps watch ended, watching again");
                    self.watch = None;
                    tokio::time::sleep(self.backoff).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_never_shows() {
        let record = AppRecord {
            platform: "telegram".into(),
            app_id: "42".into(),
            token: "42:very-secret".into(),
            label: "support".into(),
            username: "support_bot".into(),
            added_ms: 1,
        };
        let debug = format!("{record:?}");
        assert!(!debug.contains("very-secret"), "{debug}");
        assert_eq!(record.masked_token(), "42:****");
        assert_eq!(mask_token("garbage"), "****");
    }
}
