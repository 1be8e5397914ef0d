//! From the bus to Telegram, on the shared egress pipeline.
//!
//! The pipeline keeps order per chat, retries with Telegram's
//! `retry_after`, dead-letters and publishes receipts; this module renders
//! Telegram HTML and splits it (entity-aware, within 4096 UTF-16 units),
//! falls back to plain text when Telegram rejects the formatting, replies in
//! the right forum topic, keeps "typing…" alive during a turn, turns buttons
//! into inline keyboards, edits earlier messages, sends files from the
//! object store and paces messages below Telegram's flood limits.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use async_nats::jetstream::object_store::ObjectStore;
use async_trait::async_trait;
use hg_bus::Bus;
use hg_egress::{DeliveryError, Part, Platform};
use hg_proto::{Attachment, Button, OutboundKind, OutboundMessage, subject};
use hg_text::{Limit, Measure};
use serde::{Deserialize, Serialize};
use teloxide_core::RequestError;
use teloxide_core::payloads::{
    EditMessageCaptionSetters, EditMessageTextSetters, SendChatActionSetters, SendDocumentSetters,
    SendMessageSetters, SendPhotoSetters,
};
use teloxide_core::prelude::Requester;
use teloxide_core::types::{
    ChatAction, ChatId, InlineKeyboardButton, InlineKeyboardMarkup, InputFile, MessageId,
    ParseMode, ReplyParameters, ThreadId,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, BotClient, ClientFactory};
use crate::apps::{AppEvent, AppWatch};
use crate::config::TelegramConfig;
use crate::rate::RateLimiter;
use crate::{LEASE_BUCKET, PLATFORM, TelegramError, files};

/// Longest caption Telegram accepts, in UTF-16 units.
const CAPTION_LIMIT: Limit = Limit::new(1024, Measure::Utf16);

/// "typing…" stops on its own after this long without a reply.
const TYPING_MAX: Duration = Duration::from_secs(600);

/// Text sent with buttons when a message has none.
const BUTTONS_ONLY_TEXT: &str = "👇";

/// Photos Telegram shows inline (others go as documents).
const PHOTO_TYPES: [&str; 3] = ["image/jpeg", "image/png", "image/webp"];
const PHOTO_MAX_BYTES: usize = 10 * 1024 * 1024;

/// A button's action, kept in KV behind short callback data (Telegram
/// allows 64 bytes of it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ButtonRecord {
    pub action_id: String,
    pub value: String,
}

impl ButtonRecord {
    /// KV key of the button with callback data `b:<short>`.
    pub fn key(short: &str) -> String {
        format!("btn_{}", subject::token(short))
    }
}

/// Which Telegram messages an outbound became: the first message of each
/// part, for later edits.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MessageMap {
    chat_id: i64,
    parts: Vec<i32>,
    /// Per part: its first message is a photo or document, whose text is a
    /// caption (edited with `editMessageCaption`). Missing in maps written
    /// before it existed: such edits find out from Telegram's answer.
    #[serde(default)]
    media: Vec<bool>,
}

/// The Telegram messages one part became.
struct Delivered {
    ids: Vec<i32>,
    /// The first is a photo or document (its text is a caption).
    media: bool,
}

fn map_key(outbound_id: &str) -> String {
    format!("msg_{}", subject::token(outbound_id))
}

/// Lease key (in [`LEASE_BUCKET`]) of the replica that sends.
const SENDER_LEASE: &str = "egress_sender";

/// Runs the egress: follows the runtime apps, and delivers while this
/// replica holds the sender lease.
///
/// # Rate limits with several replicas
///
/// Telegram's flood limits are per chat (~1 msg/s), per group (~20/min)
/// and per bot (~30 msg/s). The shared pipeline hands any message to any
/// replica of the durable consumer `egress-telegram`, so neither a chat
/// nor a bot stays with one replica, and per-process pacing would let
/// every replica spend the whole budget (and two replicas could deliver
/// one chat's messages out of order). So exactly one replica sends at a
/// time: it holds the lease `egress_sender` in `hg_telegram_leases`
/// (renewed every third of `telegram.lease_ttl`) and runs the pipeline;
/// the others stand by and take over within about `lease_ttl` after it
/// stops or dies. Its in-process [`RateLimiter`] then sees every send, so
/// the per-chat, per-group and per-bot limits hold exactly, and the
/// pipeline's per-chat ordering is the global order. One replica easily
/// sends what Telegram allows per bot; a new leader waits one pacing
/// interval before its first send so its limiter does not start below the
/// old one's. Spreading the sending of hundreds of bots over replicas would
/// need the shared pipeline to route each chat to an owning replica.
pub(crate) async fn run(
    config: TelegramConfig,
    bus: Bus,
    shutdown: CancellationToken,
) -> Result<(), TelegramError> {
    let apps = AppWatch::open(&bus).await?;
    let platform = Arc::new(TelegramPlatform::new(&config, &bus, apps.store()).await?);
    let follower = Arc::clone(&platform);
    let stop = platform.stop.clone();
    platform
        .tasks
        .spawn(async move { follower.follow_apps(apps, stop).await });
    // The previous sender's last messages count against limits the new
    // sender's limiter has not seen: it waits one pacing interval first.
    let rate = &config.rate;
    let paced =
        !rate.per_chat.is_zero() || rate.per_bot_per_second > 0 || rate.per_group_per_minute > 0;
    let election = hg_egress::Election {
        bucket: LEASE_BUCKET.into(),
        key: SENDER_LEASE.into(),
        ttl: config.lease_ttl,
        warmup: if paced {
            rate.per_chat.max(Duration::from_secs(1))
        } else {
            Duration::ZERO
        },
    };
    let result = hg_egress::run_elected(
        bus.clone(),
        Arc::clone(&platform) as Arc<dyn Platform>,
        config.egress.clone(),
        election,
        shutdown.clone(),
    )
    .await
    .map_err(TelegramError::from);
    platform.stop.cancel();
    platform.tasks.close();
    platform.tasks.wait().await;
    result
}

/// Telegram as the egress pipeline sees it.
struct TelegramPlatform {
    /// Configured bots and runtime apps, by app id.
    bots: RwLock<HashMap<String, BotClient>>,
    /// App ids of the configured bots (runtime changes leave them alone).
    configured: HashSet<String>,
    factory: ClientFactory,
    /// The `hg_apps` bucket, to look up an app the watch has not shown yet.
    apps: kv::Store,
    state: kv::Store,
    files: ObjectStore,
    limiter: RateLimiter,
    typing_interval: Duration,
    /// Running "typing…" refreshers by chat, with a generation number.
    typing: Arc<Mutex<HashMap<String, (u64, CancellationToken)>>>,
    typing_generation: std::sync::atomic::AtomicU64,
    /// Messages sent so far for the steps of a part that failed midway
    /// (text, then files), so a retry does not send them twice.
    progress: Mutex<HashMap<String, Vec<i32>>>,
    /// First message of each part delivered so far (and whether it is a
    /// media message), by outbound id.
    delivered: Mutex<HashMap<String, Vec<(i32, bool)>>>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// Where a message goes.
#[derive(Clone)]
struct Target {
    client: BotClient,
    chat: i64,
    thread: Option<i32>,
    /// The user's message to reply to (groups only: in a private chat a
    /// quote adds nothing).
    reply_to: Option<i32>,
}

/// One Telegram message a part becomes.
enum Step {
    Text,
    File(usize),
}

impl TelegramPlatform {
    async fn new(
        config: &TelegramConfig,
        bus: &Bus,
        apps: &kv::Store,
    ) -> Result<Self, TelegramError> {
        let factory = ClientFactory::new(&config.api_url)?;
        let mut bots: HashMap<String, BotClient> = BotClient::all(&factory, config)?
            .into_iter()
            .map(|c| (c.id.clone(), c))
            .collect();
        let configured = bots.keys().cloned().collect();
        // Runtime apps known now are served from the first message on.
        match crate::apps::load(apps).await {
            Ok(records) => {
                for record in records {
                    if let Some(client) = factory.client(&record.token) {
                        bots.entry(record.app_id).or_insert(client);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list the runtime apps yet"),
        }
        Ok(TelegramPlatform {
            bots: RwLock::new(bots),
            configured,
            factory,
            apps: apps.clone(),
            state: crate::state_store(bus).await?,
            files: files::open(bus).await?,
            limiter: RateLimiter::new(config.rate.clone()),
            typing_interval: config.typing_interval,
            typing: Arc::new(Mutex::new(HashMap::new())),
            typing_generation: std::sync::atomic::AtomicU64::new(0),
            progress: Mutex::new(HashMap::new()),
            delivered: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        })
    }

    /// The bot of `app_id`: configured, or a runtime app (asked from KV
    /// when the watch has not brought it yet).
    async fn client(&self, app_id: &str) -> Result<BotClient, DeliveryError> {
        if let Some(client) = self.read_bots().get(app_id) {
            return Ok(client.clone());
        }
        let record =
            crate::apps::get(&self.apps, app_id)
                .await
                .map_err(|e| DeliveryError::Transient {
                    reason: format!("cannot look up app {app_id}: {e}"),
                    retry_after: None,
                })?;
        let client = record.and_then(|r| self.factory.client(&r.token)).ok_or_else(|| {
            DeliveryError::Permanent(format!(
                "no telegram bot for app {app_id}: not configured, not added (or removed with `harnessgate apps remove`)"
            ))
        })?;
        self.write_bots()
            .entry(app_id.to_owned())
            .or_insert_with(|| client.clone());
        Ok(client)
    }

    fn read_bots(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, BotClient>> {
        self.bots
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_bots(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, BotClient>> {
        self.bots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Follows the runtime apps until `stop`: added ones can be sent from,
    /// removed ones no longer.
    async fn follow_apps(&self, mut apps: AppWatch, stop: CancellationToken) {
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                event = apps.next() => event,
            };
            match event {
                AppEvent::Added(record) => {
                    if self.configured.contains(&record.app_id) {
                        continue;
                    }
                    if let Some(client) = self.factory.client(&record.token) {
                        tracing::info!(bot = %record.app_id, "runtime telegram app added, sending from it");
                        self.write_bots().insert(record.app_id, client);
                    }
                }
                AppEvent::Removed(id) => {
                    if !self.configured.contains(&id) && self.write_bots().remove(&id).is_some() {
                        tracing::info!(bot = %id, "runtime telegram app removed, its messages are dead-lettered");
                    }
                }
            }
        }
    }

    async fn target(&self, message: &OutboundMessage) -> Result<Target, DeliveryError> {
        let client = self.client(&message.app_id).await?;
        let chat: i64 = message.channel_id.parse().map_err(|_| {
            DeliveryError::Permanent(format!(
                "channel {:?} is not a telegram chat id",
                message.channel_id
            ))
        })?;
        let thread = message.thread_id.parse().ok();
        // The inbound id ends with the Telegram message id (see normalize);
        // a bare message id works too.
        let reply_to = (chat < 0)
            .then(|| message.reply_to_message_id.rsplit(':').next())
            .flatten()
            .and_then(|id| id.parse().ok());
        Ok(Target {
            client,
            chat,
            thread,
            reply_to,
        })
    }

    /// Sends one part as Telegram messages: its text, and on the last part
    /// the attachments (one with the text as caption when that fits).
    async fn deliver(
        &self,
        t: &Target,
        message: &OutboundMessage,
        part: Part<'_>,
    ) -> Result<Delivered, DeliveryError> {
        let last = part.index + 1 == part.count;
        let attachments: &[Attachment] = if last { &message.attachments } else { &[] };
        let caption = last
            && part.count == 1
            && attachments.len() == 1
            && !part.text.is_empty()
            && CAPTION_LIMIT.fits(part.text);
        let mut steps = Vec::new();
        if (!part.text.is_empty() && !caption)
            || (attachments.is_empty() && !part.buttons.is_empty())
        {
            steps.push(Step::Text);
        }
        steps.extend((0..attachments.len()).map(Step::File));
        if steps.is_empty() {
            tracing::debug!(outbound = %message.id, "nothing to send");
            return Ok(Delivered {
                ids: Vec::new(),
                media: false,
            });
        }
        let media = matches!(steps.first(), Some(Step::File(_)));
        let key = format!("{}#{}", message.id, part.index);
        let mut done = self
            .progress
            .lock()
            .expect("progress lock")
            .remove(&key)
            .unwrap_or_default();
        let final_step = steps.len() - 1;
        for (n, step) in steps.iter().enumerate() {
            if n < done.len() {
                continue;
            }
            let reply_to = if part.index == 0 && n == 0 {
                t.reply_to
            } else {
                None
            };
            let buttons = if n == final_step { part.buttons } else { &[] };
            let sent = match step {
                Step::Text => {
                    let text = if part.text.is_empty() {
                        BUTTONS_ONLY_TEXT
                    } else {
                        part.text
                    };
                    self.send_text(t, text, reply_to, buttons).await
                }
                Step::File(i) => {
                    let caption = caption.then_some(part.text);
                    self.send_file(t, &attachments[*i], caption, reply_to, buttons)
                        .await
                }
            };
            match sent {
                Ok(id) => done.push(id),
                Err(e) => {
                    if !done.is_empty() {
                        self.progress
                            .lock()
                            .expect("progress lock")
                            .insert(key, done);
                    }
                    return Err(e);
                }
            }
        }
        Ok(Delivered { ids: done, media })
    }

    /// `sendMessage` with Telegram HTML; as plain text when Telegram cannot
    /// parse the HTML, and outside the topic when the topic is gone.
    async fn send_text(
        &self,
        t: &Target,
        html: &str,
        reply_to: Option<i32>,
        buttons: &[Button],
    ) -> Result<i32, DeliveryError> {
        let keyboard = self.keyboard(buttons).await?;
        let mut formatted = true;
        let mut thread = t.thread;
        loop {
            self.limiter.acquire(&t.client.id, t.chat).await;
            let text = if formatted {
                html.to_owned()
            } else {
                hg_text::telegram::html_to_plain(html)
            };
            let mut request = t.client.bot.send_message(ChatId(t.chat), text);
            if formatted {
                request = request.parse_mode(ParseMode::Html);
            }
            if let Some(thread) = thread {
                request = request.message_thread_id(ThreadId(MessageId(thread)));
            }
            if let Some(id) = reply_to {
                request = request.reply_parameters(
                    ReplyParameters::new(MessageId(id)).allow_sending_without_reply(),
                );
            }
            if let Some(keyboard) = &keyboard {
                request = request.reply_markup(keyboard.clone());
            }
            match request.await {
                Ok(sent) => return Ok(sent.id.0),
                Err(e) => match self.fallback(t, &e, &mut formatted, &mut thread) {
                    Some(error) => return Err(error),
                    None => continue,
                },
            }
        }
    }

    /// What to do after a failed send: `None` to try again with the
    /// changed settings (plain text, no topic), else the error to report.
    fn fallback(
        &self,
        t: &Target,
        error: &RequestError,
        formatted: &mut bool,
        thread: &mut Option<i32>,
    ) -> Option<DeliveryError> {
        if *formatted && api::cant_parse_entities(error) {
            tracing::warn!(chat = t.chat, error = %t.client.describe(error), "telegram rejected the html, sending plain text");
            metrics::counter!("hg_telegram_plain_fallbacks_total").increment(1);
            *formatted = false;
            return None;
        }
        if thread.is_some() && api::thread_not_found(error) {
            tracing::warn!(chat = t.chat, "forum topic not found, sending to the chat");
            *thread = None;
            return None;
        }
        if let RequestError::RetryAfter(wait) = error {
            self.limiter.penalize(&t.client.id, t.chat, wait.duration());
        }
        Some(api::delivery_error(&t.client, error))
    }

    /// Sends an attachment as a photo (common image types) or a document.
    async fn send_file(
        &self,
        t: &Target,
        attachment: &Attachment,
        caption: Option<&str>,
        reply_to: Option<i32>,
        buttons: &[Button],
    ) -> Result<i32, DeliveryError> {
        let name = if attachment.file_name.is_empty() {
            "file".to_owned()
        } else {
            attachment.file_name.clone()
        };
        // Content from the object store, inline, or a URL Telegram fetches.
        let (data, url) = if !attachment.object_key.is_empty() {
            let data = files::get(&self.files, &attachment.object_key)
                .await
                .map_err(|e| DeliveryError::Transient {
                    reason: format!(
                        "cannot read {} from the object store: {e}",
                        attachment.object_key
                    ),
                    retry_after: None,
                })?;
            (data, None)
        } else if !attachment.data.is_empty() {
            (bytes::Bytes::from(attachment.data.clone()), None)
        } else if let Ok(url) = reqwest::Url::parse(&attachment.url) {
            (bytes::Bytes::new(), Some(url))
        } else {
            return Err(DeliveryError::Permanent(format!(
                "attachment {name:?} has no object key, data or url"
            )));
        };
        let photo =
            PHOTO_TYPES.contains(&attachment.mime_type.as_str()) && data.len() <= PHOTO_MAX_BYTES;
        let keyboard = self.keyboard(buttons).await?;
        let mut formatted = true;
        let mut thread = t.thread;
        loop {
            self.limiter.acquire(&t.client.id, t.chat).await;
            let file = match &url {
                Some(url) => InputFile::url(url.clone()),
                None => InputFile::memory(data.clone()).file_name(name.clone()),
            };
            let caption = caption.map(|c| {
                if formatted {
                    c.to_owned()
                } else {
                    hg_text::telegram::html_to_plain(c)
                }
            });
            let reply = reply_to
                .map(|id| ReplyParameters::new(MessageId(id)).allow_sending_without_reply());
            // sendPhoto and sendDocument take the same options but are
            // different request types.
            macro_rules! with_options {
                ($request:expr) => {{
                    let mut request = $request;
                    if let Some(caption) = caption {
                        request = request.caption(caption);
                        if formatted {
                            request = request.parse_mode(ParseMode::Html);
                        }
                    }
                    if let Some(thread) = thread {
                        request = request.message_thread_id(ThreadId(MessageId(thread)));
                    }
                    if let Some(reply) = reply {
                        request = request.reply_parameters(reply);
                    }
                    if let Some(keyboard) = &keyboard {
                        request = request.reply_markup(keyboard.clone());
                    }
                    request.await
                }};
            }
            let sent = if photo {
                with_options!(t.client.bot.send_photo(ChatId(t.chat), file))
            } else {
                with_options!(t.client.bot.send_document(ChatId(t.chat), file))
            };
            match sent {
                Ok(sent) => return Ok(sent.id.0),
                Err(e) => match self.fallback(t, &e, &mut formatted, &mut thread) {
                    Some(error) => return Err(error),
                    None => continue,
                },
            }
        }
    }

    /// Replaces the text of the messages an earlier outbound became, part
    /// by part; parts it did not have are sent as new messages. A photo or
    /// document gets its caption replaced (`editMessageCaption`); "message
    /// is not modified" counts as done.
    async fn edit(
        &self,
        t: &Target,
        message: &OutboundMessage,
        part: Part<'_>,
    ) -> Result<Delivered, DeliveryError> {
        let map = self.load_map(&message.edit_of).await?;
        let Some(&id) = map.as_ref().and_then(|m| m.parts.get(part.index)) else {
            tracing::debug!(edit_of = %message.edit_of, part = part.index, "no message to edit, sending a new one");
            let fresh = Target {
                reply_to: None,
                ..t.clone()
            };
            return self.deliver(&fresh, message, part).await;
        };
        let chat = map.as_ref().map_or(t.chat, |m| m.chat_id);
        let mut media = map
            .as_ref()
            .and_then(|m| m.media.get(part.index).copied())
            .unwrap_or(false);
        let keyboard = self.keyboard(part.buttons).await?;
        let mut formatted = true;
        let mut thread = None;
        // Maps without the media flag: Telegram's answer tells, once.
        let mut switched = false;
        loop {
            if media && !CAPTION_LIMIT.fits(part.text) {
                return Err(DeliveryError::Permanent(format!(
                    "cannot edit message {id}: it is a photo or document, and the new text is longer than a caption (1024)"
                )));
            }
            self.limiter.acquire(&t.client.id, chat).await;
            let text = if formatted {
                part.text.to_owned()
            } else {
                hg_text::telegram::html_to_plain(part.text)
            };
            let sent = if media {
                let mut request = t
                    .client
                    .bot
                    .edit_message_caption(ChatId(chat), MessageId(id))
                    .caption(text);
                if formatted {
                    request = request.parse_mode(ParseMode::Html);
                }
                if let Some(keyboard) = &keyboard {
                    request = request.reply_markup(keyboard.clone());
                }
                request.await
            } else {
                let mut request = t
                    .client
                    .bot
                    .edit_message_text(ChatId(chat), MessageId(id), text);
                if formatted {
                    request = request.parse_mode(ParseMode::Html);
                }
                if let Some(keyboard) = &keyboard {
                    request = request.reply_markup(keyboard.clone());
                }
                request.await
            };
            match sent {
                Ok(_) => break,
                Err(e) if api::not_modified(&e) => break,
                Err(e) if !switched && api::wrong_edit_kind(&e) => {
                    tracing::debug!(
                        message = id,
                        "telegram says the other edit method fits, switching"
                    );
                    media = !media;
                    switched = true;
                }
                Err(e) => {
                    if let Some(error) = self.fallback(t, &e, &mut formatted, &mut thread) {
                        return Err(error);
                    }
                }
            }
        }
        // A shorter text leaves messages over: remove them.
        if part.index + 1 == part.count
            && let Some(map) = &map
        {
            for &surplus in map.parts.iter().skip(part.count) {
                if let Err(e) = t
                    .client
                    .bot
                    .delete_message(ChatId(chat), MessageId(surplus))
                    .await
                {
                    tracing::debug!(error = %t.client.describe(&e), "cannot delete a surplus message");
                }
            }
        }
        Ok(Delivered {
            ids: vec![id],
            media,
        })
    }

    /// An inline keyboard for `buttons`, their actions stored in KV behind
    /// short callback data. Short labels share rows of three.
    async fn keyboard(
        &self,
        buttons: &[Button],
    ) -> Result<Option<InlineKeyboardMarkup>, DeliveryError> {
        if buttons.is_empty() {
            return Ok(None);
        }
        let per_row = if buttons.iter().all(|b| b.label.chars().count() <= 12) {
            3
        } else {
            1
        };
        let mut keys = Vec::with_capacity(buttons.len());
        for button in buttons {
            let short = uuid::Uuid::new_v4().simple().to_string()[..20].to_owned();
            let record = ButtonRecord {
                action_id: button.action_id.clone(),
                value: button.value.clone(),
            };
            let bytes = serde_json::to_vec(&record).unwrap_or_default();
            self.state
                .put(ButtonRecord::key(&short), bytes.into())
                .await
                .map_err(|e| DeliveryError::Transient {
                    reason: format!("cannot store a button: {e}"),
                    retry_after: None,
                })?;
            let label = if button.label.is_empty() {
                button.action_id.clone()
            } else {
                button.label.clone()
            };
            keys.push(InlineKeyboardButton::callback(label, format!("b:{short}")));
        }
        let rows: Vec<Vec<InlineKeyboardButton>> =
            keys.chunks(per_row).map(<[_]>::to_vec).collect();
        Ok(Some(InlineKeyboardMarkup::new(rows)))
    }

    async fn load_map(&self, outbound_id: &str) -> Result<Option<MessageMap>, DeliveryError> {
        match self.state.get(map_key(outbound_id)).await {
            Ok(value) => Ok(value.and_then(|v| serde_json::from_slice(&v).ok())),
            Err(e) => Err(DeliveryError::Transient {
                reason: format!("cannot read the message map: {e}"),
                retry_after: None,
            }),
        }
    }

    /// Records the first message of this part, so the outbound can be
    /// edited later; an edit's new layout replaces the edited one's.
    async fn remember(
        &self,
        t: &Target,
        message: &OutboundMessage,
        part: Part<'_>,
        sent: &Delivered,
    ) {
        let parts = {
            let mut delivered = self.delivered.lock().expect("delivered lock");
            let entry = delivered.entry(message.id.clone()).or_default();
            if part.index == 0 {
                entry.clear();
            }
            if let Some(&first) = sent.ids.first() {
                entry.push((first, sent.media));
            }
            let parts = entry.clone();
            if part.index + 1 == part.count {
                delivered.remove(&message.id);
            }
            parts
        };
        let map = MessageMap {
            chat_id: t.chat,
            parts: parts.iter().map(|(id, _)| *id).collect(),
            media: parts.iter().map(|(_, media)| *media).collect(),
        };
        let bytes: bytes::Bytes = serde_json::to_vec(&map).unwrap_or_default().into();
        let mut keys = vec![map_key(&message.id)];
        if message.kind() == OutboundKind::Edit
            && !message.edit_of.is_empty()
            && part.index + 1 == part.count
        {
            keys.push(map_key(&message.edit_of));
        }
        for key in keys {
            if let Err(e) = self.state.put(key, bytes.clone()).await {
                tracing::warn!(outbound = %message.id, error = %e, "cannot record the message ids, later edits will send anew");
            }
        }
    }

    fn chat_key(message: &OutboundMessage) -> String {
        format!(
            "{}\u{1f}{}\u{1f}{}",
            message.app_id, message.channel_id, message.thread_id
        )
    }

    fn typing_off(&self, message: &OutboundMessage) {
        if let Some((_, token)) = self
            .typing
            .lock()
            .expect("typing lock")
            .remove(&Self::chat_key(message))
        {
            token.cancel();
        }
    }

    /// Shows "typing…" now, then keeps refreshing it from a task until the
    /// reply, a stop, or [`TYPING_MAX`].
    async fn typing_on(&self, t: &Target, message: &OutboundMessage) {
        let key = Self::chat_key(message);
        let generation = self
            .typing_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = self.stop.child_token();
        if let Some((_, old)) = self
            .typing
            .lock()
            .expect("typing lock")
            .insert(key.clone(), (generation, token.clone()))
        {
            old.cancel();
        }
        let client = t.client.clone();
        let (chat, thread) = (t.chat, t.thread);
        let action = move || {
            let mut request = client
                .bot
                .send_chat_action(ChatId(chat), ChatAction::Typing);
            if let Some(thread) = thread {
                request = request.message_thread_id(ThreadId(MessageId(thread)));
            }
            let client = client.clone();
            async move {
                if let Err(e) = request.await {
                    tracing::debug!(chat, error = %client.describe(&e), "sendChatAction failed");
                }
            }
        };
        // The first one before the turn's reply can overtake it; bounded so
        // a slow API does not hold the chat up.
        let _ = tokio::time::timeout(Duration::from_secs(2), action()).await;
        let interval = self.typing_interval;
        let typing = Arc::clone(&self.typing);
        self.tasks.spawn(async move {
            let deadline = tokio::time::Instant::now() + TYPING_MAX;
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    () = tokio::time::sleep(interval) => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::select! {
                    () = token.cancelled() => break,
                    () = action() => {}
                }
            }
            let mut running = typing.lock().expect("typing lock");
            if running.get(&key).is_some_and(|(g, _)| *g == generation) {
                running.remove(&key);
            }
        });
    }
}

#[async_trait]
impl Platform for TelegramPlatform {
    fn name(&self) -> &str {
        PLATFORM
    }

    fn limit(&self) -> Limit {
        Limit::TELEGRAM
    }

    /// Telegram HTML parts. An empty text still gives one (empty) part, so
    /// a message with only attachments reaches [`Platform::send`].
    fn split(&self, markdown: &str) -> Vec<String> {
        let parts = hg_text::telegram::split_html(markdown, self.limit());
        if parts.is_empty() {
            vec![String::new()]
        } else {
            parts
        }
    }

    async fn send(
        &self,
        message: &OutboundMessage,
        part: Part<'_>,
    ) -> Result<String, DeliveryError> {
        let t = self.target(message).await?;
        let kind = message.kind();
        if part.index == 0 && kind != OutboundKind::Edit {
            // The answer is here: "typing…" ends.
            self.typing_off(message);
        }
        let delivered = if kind == OutboundKind::Edit && !message.edit_of.is_empty() {
            self.edit(&t, message, part).await?
        } else {
            self.deliver(&t, message, part).await?
        };
        self.remember(&t, message, part, &delivered).await;
        Ok(delivered
            .ids
            .iter()
            .map(i32::to_string)
            .collect::<Vec<_>>()
            .join(","))
    }

    async fn typing(&self, message: &OutboundMessage, on: bool) -> Result<(), DeliveryError> {
        if on {
            let t = self.target(message).await?;
            self.typing_on(&t, message).await;
        } else {
            self.typing_off(message);
        }
        Ok(())
    }
}
