//! From Telegram to the bus: long polling (one replica per bot, by lease)
//! or a webhook, normalization, files, button presses.
//!
//! Exactly-once for the user rests on two rules: an update is confirmed to
//! Telegram (the next `getUpdates` offset, also kept in KV for the next
//! leader) only after JetStream stored its inbound message, and every
//! publish carries `Nats-Msg-Id` = `telegram:<bot id>:<update id>`, so an
//! update fetched again after a crash is dropped as a duplicate.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
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
use teloxide_core::types::{AllowedUpdate, BotCommand, CallbackQueryId, Update, UpdateKind};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::{self, BotClient, ClientFactory};
use crate::apps::{AppEvent, AppWatch};
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

/// How often `getUpdates` is asked again while an album collects parts.
const ALBUM_RECHECK: Duration = Duration::from_millis(100);

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
    let factory = ClientFactory::new(&config.api_url)?;
    let clients = BotClient::all(&factory, &config)?;
    let apps = AppWatch::open(&bus).await?;
    let ingress = Arc::new(Ingress {
        state: crate::state_store(&bus).await?,
        files: files::open(&bus).await?,
        bus: bus.clone(),
        config,
    });
    match ingress.config.mode {
        Mode::Polling => ingress.poll_all(clients, factory, apps, shutdown).await,
        Mode::Webhook => {
            ingress
                .serve_webhook(clients, factory, apps, shutdown)
                .await
        }
    }
}

/// Where a polled bot comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// `telegram.bots`: a bot Telegram refuses stops the ingress.
    Config,
    /// `hg_apps`: a bot Telegram refuses is only logged.
    Runtime,
}

/// A runtime app being polled: its token, its stop switch, and a number
/// that tells its task apart from an earlier one of the same app.
struct RuntimeBot {
    token: String,
    stop: CancellationToken,
    generation: u64,
}

impl Ingress {
    /// Polls every bot whose lease this replica gets, until `shutdown`:
    /// the configured ones, and the runtime apps as they are added and
    /// removed. A configured bot Telegram refuses stops the ingress.
    async fn poll_all(
        self: Arc<Self>,
        clients: Vec<BotClient>,
        factory: ClientFactory,
        mut apps: AppWatch,
        shutdown: CancellationToken,
    ) -> Result<(), TelegramError> {
        let owner = format!("telegram-ingress-{}", uuid::Uuid::new_v4().simple());
        let leases = Lease::open(&self.bus, LEASE_BUCKET, self.config.lease_ttl, &owner).await?;
        let stop = shutdown.child_token();
        let mut bots = JoinSet::new();
        let spawn = |bots: &mut JoinSet<_>,
                     client: BotClient,
                     source: Source,
                     generation: u64,
                     stop: CancellationToken| {
            let ingress = Arc::clone(&self);
            let leases = leases.clone();
            bots.spawn(async move {
                let id = client.id.clone();
                let result = ingress.poll_bot(client, leases, stop).await;
                (id, source, generation, result)
            });
        };
        let configured: HashSet<String> = clients.iter().map(|c| c.id.clone()).collect();
        for client in clients {
            spawn(&mut bots, client, Source::Config, 0, stop.clone());
        }
        let mut runtime: HashMap<String, RuntimeBot> = HashMap::new();
        let mut generation = 0;
        tracing::info!(bots = bots.len(), owner = %owner, "telegram ingress started (polling)");
        let mut result = Ok(());
        loop {
            if stop.is_cancelled() && bots.is_empty() {
                break;
            }
            tokio::select! {
                Some(done) = bots.join_next(), if !bots.is_empty() => {
                    let (id, source, ended, outcome) = match done {
                        Ok(done) => done,
                        Err(e) => (String::new(), Source::Config, 0, Err(TelegramError::Task(e.to_string()))),
                    };
                    if source == Source::Runtime {
                        if runtime.get(&id).is_some_and(|bot| bot.generation == ended) {
                            runtime.remove(&id);
                        }
                        if let Err(e) = outcome {
                            tracing::error!(bot = %id, error = %e, "runtime telegram app stopped; fix or remove it");
                        }
                    } else if let Err(e) = outcome
                        && result.is_ok()
                    {
                        tracing::error!(error = %e, "telegram ingress stopping");
                        stop.cancel();
                        result = Err(e);
                    }
                }
                event = apps.next(), if !stop.is_cancelled() => match event {
                    AppEvent::Added(record) => {
                        if configured.contains(&record.app_id) {
                            tracing::debug!(bot = %record.app_id, "runtime app is configured already");
                            continue;
                        }
                        if runtime.get(&record.app_id).is_some_and(|bot| bot.token == record.token) {
                            continue;
                        }
                        let Some(client) = factory.client(&record.token) else {
                            tracing::warn!(bot = %record.app_id, "runtime app has no valid token, ignoring it");
                            continue;
                        };
                        if let Some(old) = runtime.remove(&record.app_id) {
                            old.stop.cancel();
                        }
                        generation += 1;
                        let bot_stop = stop.child_token();
                        tracing::info!(bot = %record.app_id, "runtime telegram app added, polling it");
                        spawn(&mut bots, client, Source::Runtime, generation, bot_stop.clone());
                        runtime.insert(record.app_id, RuntimeBot { token: record.token, stop: bot_stop, generation });
                    }
                    AppEvent::Removed(id) => {
                        if let Some(bot) = runtime.remove(&id) {
                            tracing::info!(bot = %id, "runtime telegram app removed, polling stops");
                            bot.stop.cancel();
                        }
                    }
                },
                () = stop.cancelled(), if bots.is_empty() => {}
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
        let renew = crate::hold_lease(leases, key, &revision);
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
        self.advertise_commands(client, me).await;
        let timeout = u32::try_from(self.config.poll_timeout.as_secs()).unwrap_or(10);
        let pause = self
            .config
            .poll_timeout
            .clamp(Duration::from_millis(200), Duration::from_secs(1));
        let mut backoff = Duration::from_millis(500);
        // Failed tries of the update at the head of the stream.
        let mut head_failures: (u32, u32) = (0, 0);
        // The album waiting for more parts, and until when.
        let mut album: Option<(String, tokio::time::Instant)> = None;
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
                    let mut waiting = false;
                    let mut i = 0;
                    while i < updates.len() {
                        if stop.is_cancelled() {
                            break;
                        }
                        // An album: its parts are consecutive updates.
                        let group = media_group(&updates[i]);
                        let end = match &group {
                            Some(group) => {
                                i + updates[i..]
                                    .iter()
                                    .take_while(|u| media_group(u).as_ref() == Some(group))
                                    .count()
                            }
                            None => i + 1,
                        };
                        if let Some(group) = &group
                            && end == updates.len()
                        {
                            // More parts may follow: wait for them (without
                            // confirming anything) until the window is over.
                            let now = tokio::time::Instant::now();
                            let deadline = match &album {
                                Some((g, deadline)) if g == group => *deadline,
                                _ => {
                                    let deadline = now + self.config.album_window;
                                    album = Some((group.clone(), deadline));
                                    deadline
                                }
                            };
                            if now < deadline {
                                waiting = true;
                                break;
                            }
                        }
                        let parts = &updates[i..end];
                        let head = parts[0].id.0;
                        let last = parts[parts.len() - 1].id.0;
                        let next = i32::try_from(u64::from(last) + 1).unwrap_or(i32::MAX);
                        let attempt = if head_failures.0 == head {
                            head_failures.1 + 1
                        } else {
                            1
                        };
                        let handled = if group.is_some() {
                            self.handle_album(client, me, parts, attempt).await
                        } else {
                            self.handle_update(client, me, &parts[0], attempt).await
                        };
                        match handled {
                            Ok(()) => {
                                offset = Some(next);
                                if group.is_some() {
                                    album = None;
                                }
                                i = end;
                            }
                            Err(reason) => {
                                head_failures = (head, attempt);
                                // Not confirmed: the next getUpdates brings it again.
                                tracing::warn!(bot = %me.id, update = head, reason = %reason, "update not processed, retrying");
                                failed = true;
                                break;
                            }
                        }
                    }
                    if waiting {
                        // Telegram answers at once while updates are
                        // unconfirmed: ask again shortly.
                        sleep_or_stop(ALBUM_RECHECK, stop).await;
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

    /// Sets the bot's command menu (`setMyCommands`) to the commands the
    /// bridge published in KV (`hg_meta`, key `bridge.commands`). Best
    /// effort: a bot works without a menu.
    async fn advertise_commands(&self, client: &BotClient, me: &Identity) {
        let meta = match self
            .bus
            .kv(hg_bus::kv_config("hg_meta", "facts components share"))
            .await
        {
            Ok(meta) => meta,
            Err(e) => {
                tracing::debug!(error = %e, "cannot open hg_meta for the command menu");
                return;
            }
        };
        let Ok(Some(listed)) = meta.get("bridge.commands").await else {
            tracing::debug!(bot = %me.id, "no command list published yet");
            return;
        };
        let commands: Vec<BotCommand> = match serde_json::from_slice(&listed) {
            Ok(commands) => commands,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable command list in hg_meta");
                return;
            }
        };
        match client.bot.set_my_commands(commands).await {
            Ok(_) => tracing::debug!(bot = %me.id, "command menu set"),
            Err(e) => {
                tracing::warn!(bot = %me.id, error = %client.describe(&e), "cannot set the command menu")
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

    /// Publishes the parts of an album (updates sharing a `media_group_id`)
    /// as one message: the first part's ids and sender, the caption, every
    /// part's files. In a group, the album is for the bot when any part is
    /// (the caption carries the mention). Same contract as
    /// [`Ingress::handle_update`]; the message id is the first part's.
    async fn handle_album(
        &self,
        client: &BotClient,
        me: &Identity,
        parts: &[Update],
        attempt: u32,
    ) -> Result<(), String> {
        let Some(head) = parts.first() else {
            return Ok(());
        };
        if parts.len() == 1 {
            return self.handle_update(client, me, head, attempt).await;
        }
        let mut normalized: Vec<Normalized> = parts
            .iter()
            .map(|u| normalize(u, me, &self.config))
            .collect();
        let addressed = normalized
            .iter()
            .any(|n| matches!(n, Normalized::Message { .. }));
        if !addressed {
            tracing::debug!(bot = %me.id, update = head.id.0, parts = parts.len(), "album skipped");
            metrics::counter!("hg_telegram_updates_total", "outcome" => "skipped").increment(1);
            return Ok(());
        }
        if normalized.iter().any(|n| matches!(n, Normalized::Skip(_))) {
            let everything = TelegramConfig {
                group_trigger: crate::config::GroupTrigger::All,
                ..self.config.clone()
            };
            normalized = parts
                .iter()
                .map(|u| normalize(u, me, &everything))
                .collect();
        }
        let mut combined: Option<InboundMessage> = None;
        let mut too_large = Vec::new();
        for n in normalized {
            let Normalized::Message { inbound, files } = n else {
                continue;
            };
            let target = combined.get_or_insert_with(|| InboundMessage {
                text: String::new(),
                ..(*inbound).clone()
            });
            if target.text.is_empty() && !inbound.text.is_empty() {
                target.text = inbound.text.clone();
            }
            too_large.extend(
                self.fetch_files(client, me, &files, target, attempt)
                    .await?,
            );
        }
        let Some(mut inbound) = combined else {
            return Ok(());
        };
        inbound
            .metadata
            .insert("album_parts".into(), parts.len().to_string());
        let msg_id = format!("{PLATFORM}:{}:{}", me.id, head.id.0);
        let subject = subject::inbound(PLATFORM, &me.app_id());
        if !inbound.text.is_empty() || !inbound.attachments.is_empty() {
            self.publish(&subject, &inbound, &msg_id).await?;
        }
        if !too_large.is_empty() {
            self.notify_too_large(&inbound, &too_large, &msg_id).await?;
        }
        Ok(())
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

    /// Serves Telegram's webhook calls until `shutdown`, for the configured
    /// bots and the runtime apps as they come and go.
    async fn serve_webhook(
        self: Arc<Self>,
        clients: Vec<BotClient>,
        factory: ClientFactory,
        mut apps: AppWatch,
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
            self.advertise_commands(&client, &me).await;
            bots.insert(me.app_id(), (client, me));
        }
        let configured: HashSet<String> = bots.keys().cloned().collect();
        let bots = Arc::new(RwLock::new(bots));
        let listener = tokio::net::TcpListener::bind(&webhook.listen)
            .await
            .map_err(|e| {
                TelegramError::Webhook(format!("cannot listen on {}: {e}", webhook.listen))
            })?;
        let state = WebhookState {
            ingress: Arc::clone(&self),
            bots: Arc::clone(&bots),
            secret: Arc::from(webhook.secret_token.as_str()),
            albums: Arc::default(),
        };
        let app = Router::new()
            .route("/telegram/{bot_id}", post(receive))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(state);
        tracing::info!(listen = %webhook.listen, "telegram ingress started (webhook)");
        // Runtime apps: identified and registered as they are added.
        let follow = async {
            loop {
                match apps.next().await {
                    AppEvent::Added(record) => {
                        if configured.contains(&record.app_id) {
                            continue;
                        }
                        let known = read(&bots)
                            .get(&record.app_id)
                            .is_some_and(|(c, _)| c.bot.token() == record.token);
                        let Some(client) = factory.client(&record.token).filter(|_| !known) else {
                            continue;
                        };
                        match identify(&client, &shutdown).await {
                            Ok(Some(me)) => {
                                if !webhook.public_url.is_empty() {
                                    register_webhook(
                                        &client,
                                        &me,
                                        &webhook.public_url,
                                        &webhook.secret_token,
                                    )
                                    .await;
                                }
                                self.advertise_commands(&client, &me).await;
                                tracing::info!(bot = %me.id, "runtime telegram app added, serving its webhook");
                                write(&bots).insert(me.app_id(), (client, me));
                            }
                            Ok(None) => return,
                            Err(e) => {
                                tracing::error!(bot = %record.app_id, error = %e, "runtime telegram app refused; fix or remove it")
                            }
                        }
                    }
                    AppEvent::Removed(id) => {
                        if configured.contains(&id) {
                            continue;
                        }
                        let removed = write(&bots).remove(&id);
                        if let Some((client, _)) = removed {
                            tracing::info!(bot = %id, "runtime telegram app removed, its webhook calls are refused");
                            if !webhook.public_url.is_empty()
                                && let Err(e) = client.bot.delete_webhook().await
                            {
                                tracing::debug!(bot = %id, error = %client.describe(&e), "deleteWebhook failed");
                            }
                        }
                    }
                }
            }
        };
        let serve =
            axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let served = tokio::select! {
            served = serve => served,
            () = follow => Ok(()),
        };
        served.map_err(|e| TelegramError::Webhook(e.to_string()))?;
        tracing::info!("telegram ingress stopped");
        Ok(())
    }
}

/// The webhook's bots by app id.
type WebhookBots = Arc<RwLock<HashMap<String, (BotClient, Identity)>>>;

fn read(
    bots: &WebhookBots,
) -> std::sync::RwLockReadGuard<'_, HashMap<String, (BotClient, Identity)>> {
    bots.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write(
    bots: &WebhookBots,
) -> std::sync::RwLockWriteGuard<'_, HashMap<String, (BotClient, Identity)>> {
    bots.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Clone)]
struct WebhookState {
    ingress: Arc<Ingress>,
    bots: WebhookBots,
    secret: Arc<str>,
    albums: Arc<Mutex<HashMap<(String, String), AlbumSlot>>>,
}

/// An album being collected from webhook calls: its parts so far, and
/// where the outcome is announced to the calls waiting for it.
struct AlbumSlot {
    parts: Vec<Update>,
    done: tokio::sync::watch::Sender<Option<bool>>,
}

/// Removes the album's slot when its first call ends, however it ends, so
/// the other calls never wait for an outcome that cannot come.
struct SlotGuard<'a> {
    albums: &'a Mutex<HashMap<(String, String), AlbumSlot>>,
    key: (String, String),
}

impl SlotGuard<'_> {
    fn take(&self) -> Option<AlbumSlot> {
        self.albums
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key)
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        drop(self.take());
    }
}

/// One part of an album, by webhook: the first call collects the parts
/// arriving within `album_window`, publishes them as one message and
/// answers every call with the outcome (an error makes Telegram retry each
/// part), so no part is acknowledged before the message is stored.
async fn receive_album_part(
    state: &WebhookState,
    client: BotClient,
    me: Identity,
    group: String,
    update: Update,
) -> StatusCode {
    let key = (me.app_id(), group);
    let (first, mut outcome) = {
        let mut albums = state
            .albums
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match albums.get_mut(&key) {
            Some(slot) => {
                slot.parts.push(update);
                (false, slot.done.subscribe())
            }
            None => {
                let (done, outcome) = tokio::sync::watch::channel(None);
                albums.insert(
                    key.clone(),
                    AlbumSlot {
                        parts: vec![update],
                        done,
                    },
                );
                (true, outcome)
            }
        }
    };
    if !first {
        return match outcome.wait_for(Option::is_some).await.map(|v| *v) {
            Ok(Some(true)) => StatusCode::OK,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
    }
    let guard = SlotGuard {
        albums: &state.albums,
        key,
    };
    tokio::time::sleep(state.ingress.config.album_window).await;
    let Some(slot) = guard.take() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    let mut parts = slot.parts;
    parts.sort_by_key(|u| u.id.0);
    let handled = state.ingress.handle_album(&client, &me, &parts, 1).await;
    let _ = slot.done.send(Some(handled.is_ok()));
    match handled {
        Ok(()) => StatusCode::OK,
        Err(reason) => {
            tracing::warn!(bot = %me.id, parts = parts.len(), reason = %reason, "album not processed, telegram will retry");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
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
    let Some((client, me)) = read(&state.bots).get(&bot_id).cloned() else {
        return StatusCode::NOT_FOUND;
    };
    let update: Update = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(e) => {
            tracing::warn!(bot = %bot_id, error = %e, "webhook body is not an update");
            return StatusCode::BAD_REQUEST;
        }
    };
    if let Some(group) = media_group(&update) {
        return receive_album_part(&state, client, me, group, update).await;
    }
    // Telegram's own retries of a webhook call are not counted.
    match state.ingress.handle_update(&client, &me, &update, 1).await {
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

/// The album a new message belongs to, if any (edits are never combined).
fn media_group(update: &Update) -> Option<String> {
    match &update.kind {
        UpdateKind::Message(m) | UpdateKind::ChannelPost(m) => {
            m.media_group_id().map(|g| g.0.clone())
        }
        _ => None,
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
