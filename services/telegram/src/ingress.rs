//! From Telegram to the bus: long polling (one replica per bot, by lease)
//! or a webhook, normalization, files, button presses.
//!
//! Exactly-once for the user rests on two rules: an update is confirmed to
//! Telegram (the next `getUpdates` offset, also kept in KV for the next
//! leader) only after JetStream stored its inbound message, and every
//! publish carries `Nats-Msg-Id` = `telegram:<bot id>:<update id>`, so an
//! update fetched again after a crash is dropped as a duplicate.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv;
use async_nats::jetstream::object_store::ObjectStore;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use bytes::Bytes;
use hg_bus::Bus;
use hg_bus::lease::Lease;
use hg_proto::{Attachment, ButtonPress, InboundMessage, OutboundKind, OutboundMessage, subject};
use subtle::ConstantTimeEq;
use teloxide_core::RequestError;
use teloxide_core::payloads::{AnswerCallbackQuerySetters, GetUpdatesSetters, SetWebhookSetters};
use teloxide_core::prelude::Requester;
use teloxide_core::types::{AllowedUpdate, CallbackQueryId, Update};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::{self, BotClient};
use crate::config::{Mode, TelegramConfig};
use crate::egress::ButtonRecord;
use crate::files::{self, FetchError};
use crate::normalize::{FileRef, Identity, Normalized, normalize};
use crate::{LEASE_BUCKET, PLATFORM, TelegramError, kv_error};

/// Header Telegram echoes the webhook's secret token in.
const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";

/// What the user reads when a pressed button's action is gone.
const EXPIRED_BUTTON: &str = "This button is no longer active.";

/// Tries of an update before a file that cannot be downloaded is given up.
const FILE_ATTEMPTS: u32 = 4;

/// The updates the ingress asks for.
const ALLOWED: [AllowedUpdate; 5] = [
    AllowedUpdate::Message,
    AllowedUpdate::EditedMessage,
    AllowedUpdate::ChannelPost,
    AllowedUpdate::EditedChannelPost,
    AllowedUpdate::CallbackQuery,
];

struct Ingress {
    bus: Bus,
    config: TelegramConfig,
    state: kv::Store,
    files: ObjectStore,
}

pub(crate) async fn run(
    config: TelegramConfig,
    bus: Bus,
    shutdown: CancellationToken,
) -> Result<(), TelegramError> {
    let clients = BotClient::all(&config)?;
    let ingress = Arc::new(Ingress {
        state: crate::state_store(&bus).await?,
        files: files::open(&bus).await?,
        bus: bus.clone(),
        config,
    });
    match ingress.config.mode {
        Mode::Polling => ingress.poll_all(clients, shutdown).await,
        Mode::Webhook => ingress.serve_webhook(clients, shutdown).await,
    }
}

impl Ingress {
    /// Polls every bot whose lease this replica gets, until `shutdown`. A bot
    /// Telegram refuses stops the ingress.
    async fn poll_all(
        self: Arc<Self>,
        clients: Vec<BotClient>,
        shutdown: CancellationToken,
    ) -> Result<(), TelegramError> {
        let owner = format!("telegram-ingress-{}", uuid::Uuid::new_v4().simple());
        let leases = Lease::open(&self.bus, LEASE_BUCKET, self.config.lease_ttl, &owner).await?;
        let stop = shutdown.child_token();
        let mut bots = JoinSet::new();
        for client in clients {
            let ingress = Arc::clone(&self);
            let leases = leases.clone();
            let stop = stop.clone();
            bots.spawn(async move { ingress.poll_bot(client, leases, stop).await });
        }
        tracing::info!(bots = bots.len(), owner = %owner, "telegram ingress started (polling)");
        let mut result = Ok(());
        while let Some(done) = bots.join_next().await {
            let outcome = match done {
                Ok(outcome) => outcome,
                Err(e) => Err(TelegramError::Task(e.to_string())),
            };
            if let Err(e) = outcome
                && result.is_ok()
            {
                tracing::error!(error = %e, "telegram ingress stopping");
                stop.cancel();
                result = Err(e);
            }
        }
        tracing::info!("telegram ingress stopped");
        result
    }

    /// Takes the bot's lease when it is free and polls while holding it.
    async fn poll_bot(
        &self,
        client: BotClient,
        leases: Lease,
        stop: CancellationToken,
    ) -> Result<(), TelegramError> {
        let Some(me) = identify(&client, &stop).await? else {
            return Ok(());
        };
        let key = format!("bot_{}", me.id);
        let retry = leases.ttl() / 3;
        while !stop.is_cancelled() {
            match leases.acquire(&key).await.map(|claim| claim.revision()) {
                Ok(Some(revision)) => {
                    self.lead(&client, &me, &leases, &key, revision, &stop)
                        .await?;
                }
                Ok(None) => tracing::trace!(bot = %me.id, "bot polled by another replica"),
                Err(e) => tracing::warn!(bot = %me.id, error = %e, "cannot take the polling lease"),
            }
            sleep_or_stop(retry, &stop).await;
        }
        Ok(())
    }

    /// Polls while the lease is ours: renews it every third of its ttl and
    /// stops polling as soon as it is lost.
    async fn lead(
        &self,
        client: &BotClient,
        me: &Identity,
        leases: &Lease,
        key: &str,
        revision: u64,
        stop: &CancellationToken,
    ) -> Result<(), TelegramError> {
        tracing::info!(bot = %me.id, "polling lease taken, polling");
        metrics::counter!("hg_telegram_lease_acquired_total").increment(1);
        let revision = AtomicU64::new(revision);
        let ttl = leases.ttl();
        let renew = async {
            let mut last_ok = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(ttl / 3).await;
                match leases.acquire(key).await.map(|claim| claim.revision()) {
                    Ok(Some(r)) => {
                        revision.store(r, Ordering::Relaxed);
                        last_ok = tokio::time::Instant::now();
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(bot = %me.id, error = %e, "cannot renew the polling lease");
                        // Past two thirds of the ttl it may have passed on.
                        if last_ok.elapsed() >= ttl * 2 / 3 {
                            return;
                        }
                    }
                }
            }
        };
        let result = tokio::select! {
            result = self.poll(client, me, stop) => result,
            () = renew => {
                tracing::warn!(bot = %me.id, "polling lease lost, stopping polling");
                Ok(())
            }
        };
        if stop.is_cancelled() {
            // Hand the bot over at once rather than after the ttl.
            let _ = leases.release(key, revision.load(Ordering::Relaxed)).await;
        }
        result
    }

    /// The `getUpdates` loop. Returns on `stop`, or with an error when
    /// Telegram refuses the bot.
    async fn poll(
        &self,
        client: &BotClient,
        me: &Identity,
        stop: &CancellationToken,
    ) -> Result<(), TelegramError> {
        let mut offset = self.load_offset(me).await;
        // getUpdates fails while a webhook is set.
        if let Err(e) = client.bot.delete_webhook().await {
            tracing::debug!(bot = %me.id, error = %client.describe(&e), "deleteWebhook failed");
        }
        let timeout = u32::try_from(self.config.poll_timeout.as_secs()).unwrap_or(10);
        let pause = self
            .config
            .poll_timeout
            .clamp(Duration::from_millis(200), Duration::from_secs(1));
        let mut backoff = Duration::from_millis(500);
        // Failed tries of the update at the head of the stream.
        let mut head_failures: (u32, u32) = (0, 0);
        loop {
            let mut request = client
                .bot
                .get_updates()
                .timeout(timeout)
                .allowed_updates(ALLOWED);
            if let Some(offset) = offset {
                request = request.offset(offset);
            }
            let updates = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                updates = request => updates,
            };
            match updates {
                Ok(updates) => {
                    backoff = Duration::from_millis(500);
                    let before = offset;
                    let mut failed = false;
                    for update in updates {
                        if stop.is_cancelled() {
                            break;
                        }
                        let next = i32::try_from(u64::from(update.id.0) + 1).unwrap_or(i32::MAX);
                        let attempt = if head_failures.0 == update.id.0 {
                            head_failures.1 + 1
                        } else {
                            1
                        };
                        match self.handle_update(client, me, &update, attempt).await {
                            Ok(()) => offset = Some(next),
                            Err(reason) => {
                                head_failures = (update.id.0, attempt);
                                // Not confirmed: the next getUpdates brings it again.
                                tracing::warn!(bot = %me.id, update = update.id.0, reason = %reason, "update not processed, retrying");
                                failed = true;
                                break;
                            }
                        }
                    }
                    // Once per batch: Telegram keeps the confirmed offset
                    // too, and the duplicate window covers a lost write.
                    if let Some(next) = offset
                        && offset != before
                    {
                        self.store_offset(me, next).await;
                    }
                    if stop.is_cancelled() {
                        return Ok(());
                    }
                    if failed {
                        sleep_or_stop(backoff, stop).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
                Err(RequestError::Api(teloxide_core::ApiError::TerminatedByOtherGetUpdates)) => {
                    metrics::counter!("hg_telegram_poll_conflicts_total").increment(1);
                    tracing::warn!(bot = %me.id, "another getUpdates runs for this bot");
                    sleep_or_stop(pause, stop).await;
                }
                Err(e) if api::webhook_active(&e) => {
                    tracing::warn!(bot = %me.id, "a webhook is set, deleting it to poll");
                    let _ = client.bot.delete_webhook().await;
                    sleep_or_stop(pause, stop).await;
                }
                Err(e) if api::invalid_token(&e) => {
                    return Err(TelegramError::Bot {
                        bot: me.app_id(),
                        reason: client.describe(&e),
                    });
                }
                Err(RequestError::RetryAfter(wait)) => {
                    sleep_or_stop(wait.duration(), stop).await;
                }
                Err(e) => {
                    tracing::warn!(bot = %me.id, error = %client.describe(&e), "getUpdates failed");
                    sleep_or_stop(backoff, stop).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn load_offset(&self, me: &Identity) -> Option<i32> {
        match self.state.get(offset_key(me)).await {
            Ok(Some(value)) => std::str::from_utf8(&value).ok()?.parse().ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(bot = %me.id, error = %e, "cannot read the polling offset");
                None
            }
        }
    }

    async fn store_offset(&self, me: &Identity, offset: i32) {
        if let Err(e) = self
            .state
            .put(offset_key(me), offset.to_string().into())
            .await
        {
            // Telegram keeps the offset too; the duplicate window covers
            // the rest.
            tracing::debug!(bot = %me.id, error = %e, "cannot store the polling offset");
        }
    }

    /// Publishes what an update means. `Err` means "not done, fetch it
    /// again later"; everything it did before failing is idempotent.
    /// `attempt` counts tries of this update: from [`FILE_ATTEMPTS`] on, a
    /// file that cannot be downloaded is passed on without its content
    /// rather than holding up every later update of the bot.
    async fn handle_update(
        &self,
        client: &BotClient,
        me: &Identity,
        update: &Update,
        attempt: u32,
    ) -> Result<(), String> {
        let msg_id = format!("{PLATFORM}:{}:{}", me.id, update.id.0);
        let subject = subject::inbound(PLATFORM, &me.app_id());
        match normalize(update, me, &self.config) {
            Normalized::Skip(reason) => {
                tracing::debug!(bot = %me.id, update = update.id.0, reason, "update skipped");
                metrics::counter!("hg_telegram_updates_total", "outcome" => "skipped").increment(1);
                Ok(())
            }
            Normalized::Message { mut inbound, files } => {
                let too_large = self
                    .fetch_files(client, me, &files, &mut inbound, attempt)
                    .await?;
                if !inbound.text.is_empty() || !inbound.attachments.is_empty() {
                    self.publish(&subject, &inbound, &msg_id).await?;
                }
                if !too_large.is_empty() {
                    self.notify_too_large(&inbound, &too_large, &msg_id).await?;
                }
                Ok(())
            }
            Normalized::Callback {
                mut inbound,
                query_id,
                data,
            } => {
                let record = match data.strip_prefix("b:") {
                    Some(short) => match self.state.get(ButtonRecord::key(short)).await {
                        Ok(value) => {
                            value.and_then(|v| serde_json::from_slice::<ButtonRecord>(&v).ok())
                        }
                        Err(e) => return Err(kv_error(e).to_string()),
                    },
                    // Buttons someone else put there: pass the data on as is.
                    None => Some(ButtonRecord {
                        action_id: data.clone(),
                        value: String::new(),
                    }),
                };
                let answer = match record {
                    Some(record) => {
                        inbound.button_press = Some(ButtonPress {
                            action_id: record.action_id,
                            value: record.value,
                            message_id: inbound.reply_to_message_id.clone(),
                        });
                        self.publish(&subject, &inbound, &msg_id).await?;
                        None
                    }
                    None => Some(EXPIRED_BUTTON),
                };
                let mut request = client.bot.answer_callback_query(CallbackQueryId(query_id));
                if let Some(text) = answer {
                    request = request.text(text);
                }
                if let Err(e) = request.await {
                    // Answered already, or too old: the press is passed on.
                    tracing::debug!(bot = %me.id, error = %client.describe(&e), "answerCallbackQuery failed");
                }
                Ok(())
            }
        }
    }

    async fn publish(
        &self,
        subject: &str,
        inbound: &InboundMessage,
        msg_id: &str,
    ) -> Result<(), String> {
        let published = self
            .bus
            .publish(subject, inbound, Some(msg_id))
            .await
            .map_err(|e| e.to_string())?;
        let outcome = if published.duplicate {
            "duplicate"
        } else {
            "published"
        };
        tracing::debug!(inbound = %inbound.id, outcome, "update published");
        metrics::counter!("hg_telegram_updates_total", "outcome" => outcome).increment(1);
        Ok(())
    }

    /// Downloads the message's files into the object store and lists them
    /// as attachments. Returns the files too large to pass on.
    async fn fetch_files(
        &self,
        client: &BotClient,
        me: &Identity,
        files: &[FileRef],
        inbound: &mut InboundMessage,
        attempt: u32,
    ) -> Result<Vec<FileRef>, String> {
        let max = self.config.max_file_bytes;
        let mut too_large = Vec::new();
        for file in files {
            if file.size > max {
                too_large.push(file.clone());
                continue;
            }
            let mut attachment = Attachment {
                id: file.file_id.clone(),
                file_name: file.file_name.clone(),
                mime_type: file.mime_type.clone(),
                size_bytes: file.size,
                ..Default::default()
            };
            match files::download(client, &file.file_id, max).await {
                Ok(data) => {
                    let key = format!("{PLATFORM}/{}/{}", me.id, file.unique_id);
                    files::put(&self.files, &key, &data)
                        .await
                        .map_err(|e| e.to_string())?;
                    attachment.size_bytes = data.len() as u64;
                    attachment.object_key = key;
                }
                Err(FetchError::TooLarge) => {
                    too_large.push(file.clone());
                    continue;
                }
                Err(FetchError::Refused(reason)) => {
                    // Passed on without content, so the agent knows of it.
                    tracing::warn!(bot = %me.id, file = %file.file_id, reason = %reason, "telegram refused a file");
                }
                Err(FetchError::Transient(reason)) if attempt < FILE_ATTEMPTS => {
                    return Err(reason);
                }
                Err(FetchError::Transient(reason)) => {
                    tracing::warn!(bot = %me.id, file = %file.file_id, attempt, reason = %reason, "file still not downloadable, passing the message on without it");
                }
            }
            inbound.attachments.push(attachment);
        }
        Ok(too_large)
    }

    /// Tells the user which files were not passed on, through the egress
    /// (so rate limits and ordering apply).
    async fn notify_too_large(
        &self,
        inbound: &InboundMessage,
        files: &[FileRef],
        msg_id: &str,
    ) -> Result<(), String> {
        let limit_mb = self.config.max_file_bytes as f64 / (1024.0 * 1024.0);
        let names: Vec<String> = files
            .iter()
            .map(|f| {
                format!(
                    "{} ({:.1} MB)",
                    f.file_name,
                    f.size as f64 / (1024.0 * 1024.0)
                )
            })
            .collect();
        let notice = OutboundMessage {
            id: format!("{}:too-large", inbound.id),
            platform: PLATFORM.into(),
            app_id: inbound.app_id.clone(),
            channel_id: inbound.channel_id.clone(),
            thread_id: inbound.thread_id.clone(),
            reply_to_message_id: inbound.id.clone(),
            text: format!(
                "⚠️ Not passed on, larger than {limit_mb:.0} MB: {}",
                names.join(", ")
            ),
            kind: OutboundKind::Status as i32,
            recipient_id: inbound
                .sender
                .as_ref()
                .map(|s| s.id.clone())
                .unwrap_or_default(),
            timestamp_ms: hg_proto::now_ms(),
            ..Default::default()
        };
        self.bus
            .publish(
                &subject::outbound(PLATFORM, &inbound.app_id),
                &notice,
                Some(&format!("{msg_id}:too-large")),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Serves Telegram's webhook calls until `shutdown`.
    async fn serve_webhook(
        self: Arc<Self>,
        clients: Vec<BotClient>,
        shutdown: CancellationToken,
    ) -> Result<(), TelegramError> {
        let webhook = self.config.webhook.clone();
        let mut bots = HashMap::new();
        for client in clients {
            let Some(me) = identify(&client, &shutdown).await? else {
                return Ok(());
            };
            if !webhook.public_url.is_empty() {
                register_webhook(&client, &me, &webhook.public_url, &webhook.secret_token).await;
            }
            bots.insert(me.app_id(), (client, me));
        }
        let listener = tokio::net::TcpListener::bind(&webhook.listen)
            .await
            .map_err(|e| {
                TelegramError::Webhook(format!("cannot listen on {}: {e}", webhook.listen))
            })?;
        let state = WebhookState {
            ingress: self,
            bots: Arc::new(bots),
            secret: Arc::from(webhook.secret_token.as_str()),
        };
        let app = Router::new()
            .route("/telegram/{bot_id}", post(receive))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(state);
        tracing::info!(listen = %webhook.listen, "telegram ingress started (webhook)");
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(|e| TelegramError::Webhook(e.to_string()))?;
        tracing::info!("telegram ingress stopped");
        Ok(())
    }
}

#[derive(Clone)]
struct WebhookState {
    ingress: Arc<Ingress>,
    bots: Arc<HashMap<String, (BotClient, Identity)>>,
    secret: Arc<str>,
}

/// One update from Telegram: published before it is acknowledged, so a
/// failure makes Telegram retry (and the duplicate window drops repeats).
async fn receive(
    State(state): State<WebhookState>,
    Path(bot_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let given = headers
        .get(SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !bool::from(given.ct_eq(state.secret.as_bytes())) {
        metrics::counter!("hg_telegram_webhook_rejected_total").increment(1);
        tracing::warn!(bot = %bot_id, "webhook call without the right secret token");
        return StatusCode::UNAUTHORIZED;
    }
    let Some((client, me)) = state.bots.get(&bot_id) else {
        return StatusCode::NOT_FOUND;
    };
    let update: Update = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(e) => {
            tracing::warn!(bot = %bot_id, error = %e, "webhook body is not an update");
            return StatusCode::BAD_REQUEST;
        }
    };
    // Telegram's own retries of a webhook call are not counted.
    match state.ingress.handle_update(client, me, &update, 1).await {
        Ok(()) => StatusCode::OK,
        Err(reason) => {
            tracing::warn!(bot = %bot_id, update = update.id.0, reason = %reason, "update not processed, telegram will retry");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

async fn register_webhook(client: &BotClient, me: &Identity, public_url: &str, secret: &str) {
    let url = format!("{}/telegram/{}", public_url.trim_end_matches('/'), me.id);
    let Ok(url) = reqwest::Url::parse(&url) else {
        tracing::error!(bot = %me.id, "webhook url is not valid");
        return;
    };
    match client
        .bot
        .set_webhook(url)
        .secret_token(secret.to_owned())
        .allowed_updates(ALLOWED)
        .await
    {
        Ok(_) => tracing::info!(bot = %me.id, "webhook registered"),
        Err(e) => {
            tracing::error!(bot = %me.id, error = %client.describe(&e), "cannot register the webhook")
        }
    }
}

/// Asks Telegram who the bot is, retrying until it answers. `None` when
/// stopped first; an error when Telegram does not know the token.
async fn identify(
    client: &BotClient,
    stop: &CancellationToken,
) -> Result<Option<Identity>, TelegramError> {
    let mut backoff = Duration::from_millis(500);
    loop {
        let me = tokio::select! {
            () = stop.cancelled() => return Ok(None),
            me = client.bot.get_me() => me,
        };
        match me {
            Ok(me) => {
                let identity = Identity {
                    id: me.user.id.0,
                    username: me.user.username.clone().unwrap_or_default(),
                };
                tracing::info!(bot = %identity.id, username = %identity.username, "telegram bot identified");
                return Ok(Some(identity));
            }
            Err(e) if api::invalid_token(&e) => {
                return Err(TelegramError::Bot {
                    bot: client.id.clone(),
                    reason: client.describe(&e),
                });
            }
            Err(e) => {
                tracing::warn!(bot = %client.id, error = %client.describe(&e), "getMe failed, retrying");
                sleep_or_stop(backoff, stop).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

fn offset_key(me: &Identity) -> String {
    format!("offset_{}", me.id)
}

async fn sleep_or_stop(wait: Duration, stop: &CancellationToken) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(wait) => {}
    }
}
