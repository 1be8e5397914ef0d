//! A fake Telegram Bot API server that real clients (teloxide) talk to
//! through their API URL, speaking the Bot API's wire format.
//!
//! # Protocol
//! - `POST /bot<token>/<method>` with a JSON or `multipart/form-data`
//!   body; method names match case-insensitively (teloxide sends
//!   `GetMe`, `SendMessage`…). An unknown token gets 401 `Unauthorized`,
//!   an unknown method 404 `Not Found`.
//! - Every answer is `{"ok":true,"result":…}` or
//!   `{"ok":false,"error_code":N,"description":"…","parameters":{…}}`.
//! - `getMe` returns every field teloxide requires. `getUpdates` honours
//!   `offset` (confirming every update before it), `limit` and `timeout`
//!   (long poll); a second `getUpdates` while one is in flight gets 409
//!   "Conflict: terminated by other getUpdates request; …", and any
//!   `getUpdates` while a webhook is set gets 409 "Conflict: can't use
//!   getUpdates method while webhook is active; …".
//! - `setWebhook` registers a URL and secret: pushed updates are then
//!   POSTed there with `X-Telegram-Bot-Api-Secret-Token`, retried until
//!   answered 2xx. `deleteWebhook`, `getWebhookInfo`.
//! - `sendMessage`, `editMessageText`, `editMessageCaption`, `sendPhoto`,
//!   `sendDocument` validate
//!   like the Bot API: HTML parse mode ([`parse_html`]; "Bad Request: can't
//!   parse entities: …"), text 1-4096 UTF-16 units after parsing ("message is
//!   too long", "message text is empty"), captions ≤ 1024, `callback_data`
//!   1-64 bytes (`BUTTON_DATA_INVALID`), `message_thread_id` only for topics
//!   registered with [`FakeTelegram::add_topic`] ("Bad Request: message
//!   thread not found"), an identical edit ("Bad Request: message is not
//!   modified: …"), `editMessageText` of a photo or document ("Bad
//!   Request: there is no text in the message to edit") and
//!   `editMessageCaption` of a text message ("… there is no caption in the
//!   message to edit").
//! - `sendChatAction`, `answerCallbackQuery`, `deleteMessage` answer `true`.
//! - `getFile` → `{file_id, file_unique_id, file_size, file_path}`; the
//!   content is served at `GET /file/bot<token>/<file_path>`.
//! - Injected failures ([`FakeTelegram::fail_next`]): 429 with
//!   `parameters.retry_after`, or any status and description.

mod html;
mod server;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

pub use html::parse_html;

/// A failure to answer instead of the real result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// 429 "Too Many Requests: retry after N" with `retry_after` N.
    TooManyRequests {
        /// Seconds the client is told to wait.
        retry_after: u32,
    },
    /// Any error status and description.
    Error {
        /// HTTP status and `error_code`.
        code: u16,
        /// The `description`.
        description: String,
    },
}

/// A call the fake received.
#[derive(Debug, Clone)]
pub struct Call {
    /// The bot's id.
    pub bot: i64,
    /// The method, lowercase (`sendmessage`).
    pub method: String,
    /// The parameters (JSON body, or the text fields of a multipart body).
    pub params: Value,
    /// When it arrived.
    pub at: Instant,
    /// The error answered, if any.
    pub error: Option<String>,
}

/// A message a bot sent (or edited), as accepted.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The bot that sent it.
    pub bot: i64,
    /// `sendmessage`, `editmessagetext`, `editmessagecaption`, `sendphoto`
    /// or `senddocument`.
    pub method: String,
    pub chat_id: i64,
    pub message_id: i64,
    /// The text or caption as sent (HTML when `parse_mode` is HTML).
    pub text: String,
    /// The text after entity parsing.
    pub visible_text: String,
    pub parse_mode: Option<String>,
    pub thread_id: Option<i64>,
    pub reply_to: Option<i64>,
    pub reply_markup: Option<Value>,
    /// Uploaded file name and content.
    pub file: Option<(String, Vec<u8>)>,
    /// The Message object returned, e.g. to put in a callback query.
    pub json: Value,
    pub at: Instant,
}

/// Telegram's flood limits, to check sent messages against
/// ([`FakeTelegram::flood_violations`]).
#[derive(Debug, Clone)]
pub struct FloodLimits {
    /// Least time between two messages to one chat.
    pub per_chat: Duration,
    /// Most messages of one bot within any second.
    pub per_bot_per_second: usize,
    /// Most messages to one group (negative chat id) within any minute.
    pub per_group_per_minute: usize,
    /// Tolerance for network jitter: gaps are shortened and windows
    /// narrowed by this much.
    pub slack: Duration,
}

/// An update pushed to a bot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    pub update_id: i64,
    /// The message's id, when the update carries a new message.
    pub message_id: i64,
}

struct Bot {
    id: i64,
    username: String,
    pending: VecDeque<Value>,
    next_update: i64,
    confirmed: i64,
    polling: usize,
    conflicts: usize,
    webhook: Option<(String, String)>,
}

struct StoredFile {
    unique_id: String,
    path: String,
    data: Vec<u8>,
}

#[derive(Default)]
struct State {
    bots: HashMap<String, Bot>,
    calls: Vec<Call>,
    sent: Vec<Sent>,
    /// Current text (or caption) and markup of every message, for edits.
    messages: HashMap<(i64, i64), (String, Option<Value>)>,
    /// Messages that are photos or documents (edited by caption).
    media: HashSet<(i64, i64)>,
    chats: HashMap<i64, Value>,
    next_message: HashMap<i64, i64>,
    topics: HashSet<(i64, i64)>,
    files: HashMap<String, StoredFile>,
    failures: HashMap<String, VecDeque<Failure>>,
    reject_html: Vec<String>,
    next_id: u64,
}

struct Shared {
    state: Mutex<State>,
    updates: Notify,
    http: reqwest::Client,
    shutdown: watch::Sender<bool>,
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running fake Bot API; it stops when dropped.
pub struct FakeTelegram {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FakeTelegram {
    /// Starts the fake on a free loopback port.
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start() -> FakeTelegram {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake telegram listener");
        let addr = listener.local_addr().expect("fake telegram address");
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            updates: Notify::new(),
            http: reqwest::Client::new(),
            shutdown,
        });
        let task = tokio::spawn(server::serve(listener, Arc::clone(&shared)));
        FakeTelegram {
            addr,
            shared,
            task: Some(task),
        }
    }

    /// `http://127.0.0.1:<port>`: the API URL to give the client.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers a bot and returns its token (`<id>:<35 characters>`).
    pub fn add_bot(&self, id: i64, username: &str) -> String {
        let token = format!("{id}:AAfake{:0>29}", id.unsigned_abs());
        lock(&self.shared).bots.insert(
            token.clone(),
            Bot {
                id,
                username: username.to_owned(),
                pending: VecDeque::new(),
                next_update: 1000,
                confirmed: 0,
                polling: 0,
                conflicts: 0,
                webhook: None,
            },
        );
        token
    }

    /// Makes `thread_id` a forum topic of `chat_id`.
    pub fn add_topic(&self, chat_id: i64, thread_id: i64) {
        lock(&self.shared).topics.insert((chat_id, thread_id));
    }

    /// Stores a file for `getFile`; returns its `file_id` and
    /// `file_unique_id`.
    pub fn add_file(&self, data: Vec<u8>, file_path: &str) -> (String, String) {
        let mut state = lock(&self.shared);
        state.next_id += 1;
        let file_id = format!("file-{}", state.next_id);
        let unique_id = format!("uniq{}", state.next_id);
        state.files.insert(
            file_id.clone(),
            StoredFile {
                unique_id: unique_id.clone(),
                path: file_path.to_owned(),
                data,
            },
        );
        (file_id, unique_id)
    }

    /// Answers the next `times` calls of `method` (any case) with `failure`.
    pub fn fail_next(&self, method: &str, failure: Failure, times: usize) {
        let mut state = lock(&self.shared);
        let queue = state
            .failures
            .entry(method.to_ascii_lowercase())
            .or_default();
        queue.extend(std::iter::repeat_n(failure, times));
    }

    /// Rejects HTML-formatted texts containing `needle` with "can't parse
    /// entities", as Telegram does with markup it dislikes.
    pub fn reject_html_containing(&self, needle: &str) {
        lock(&self.shared).reject_html.push(needle.to_owned());
    }

    /// Queues an update for `token` (filling in `update_id`), or POSTs it
    /// to the bot's webhook when one is set.
    pub fn push_update(&self, token: &str, mut update: Value) -> i64 {
        let mut state = lock(&self.shared);
        let bot = state.bots.get_mut(token).expect("known bot token");
        let id = bot.next_update;
        bot.next_update += 1;
        update["update_id"] = json!(id);
        match bot.webhook.clone() {
            Some((url, secret)) => {
                drop(state);
                let http = self.shared.http.clone();
                tokio::spawn(async move {
                    for _ in 0..20 {
                        let sent = http
                            .post(&url)
                            .header("X-Telegram-Bot-Api-Secret-Token", &secret)
                            .json(&update)
                            .send()
                            .await;
                        if sent.is_ok_and(|r| r.status().is_success()) {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                });
            }
            None => {
                bot.pending.push_back(update);
                drop(state);
                self.shared.updates.notify_waiters();
            }
        }
        id
    }

    /// Pushes a new message from `from` in `chat` with extra fields (`text`,
    /// `entities`, `message_thread_id`, `reply_to_message`, `photo`…).
    pub fn push_message(&self, token: &str, chat: &Value, from: &Value, fields: Value) -> Pushed {
        let message_id = self.next_message_id(chat["id"].as_i64().expect("chat id"));
        let mut message = json!({
            "message_id": message_id,
            "date": unix_now(),
            "chat": chat,
            "from": from,
        });
        if let Some(fields) = fields.as_object() {
            for (k, v) in fields {
                message[k] = v.clone();
            }
        }
        lock(&self.shared)
            .chats
            .insert(chat["id"].as_i64().unwrap_or_default(), chat.clone());
        let update_id = self.push_update(token, json!({ "message": message }));
        Pushed {
            update_id,
            message_id,
        }
    }

    /// Pushes a text message.
    pub fn push_text(&self, token: &str, chat: &Value, from: &Value, text: &str) -> Pushed {
        self.push_message(token, chat, from, json!({ "text": text }))
    }

    /// Pushes a button press on `message` (a [`Sent::json`]).
    pub fn push_callback(&self, token: &str, from: &Value, message: &Value, data: &str) -> i64 {
        let id = {
            let mut state = lock(&self.shared);
            state.next_id += 1;
            format!("cq{}", state.next_id)
        };
        self.push_update(
            token,
            json!({"callback_query": {
                "id": id, "from": from, "chat_instance": "instance-1",
                "data": data, "message": message,
            }}),
        )
    }

    /// Allocates the next message id in `chat_id`.
    pub fn next_message_id(&self, chat_id: i64) -> i64 {
        let mut state = lock(&self.shared);
        let next = state.next_message.entry(chat_id).or_insert(0);
        *next += 1;
        *next
    }

    /// Messages the bots sent or edited, in order.
    pub fn sent(&self) -> Vec<Sent> {
        lock(&self.shared).sent.clone()
    }

    /// Where the accepted sends and edits broke `limits`, one line each;
    /// empty when they kept to them.
    pub fn flood_violations(&self, limits: &FloodLimits) -> Vec<String> {
        let sent = self.sent();
        let mut violations = Vec::new();
        let mut chats: HashMap<(i64, i64), Vec<Instant>> = HashMap::new();
        let mut bots: HashMap<i64, Vec<Instant>> = HashMap::new();
        for m in &sent {
            chats.entry((m.bot, m.chat_id)).or_default().push(m.at);
            bots.entry(m.bot).or_default().push(m.at);
        }
        let min_gap = limits.per_chat.saturating_sub(limits.slack);
        for ((bot, chat), times) in &chats {
            for pair in times.windows(2) {
                let gap = pair[1].duration_since(pair[0]);
                if gap < min_gap {
                    violations.push(format!(
                        "bot {bot} chat {chat}: two messages {gap:?} apart (limit {:?})",
                        limits.per_chat
                    ));
                }
            }
            let budget = limits.per_group_per_minute;
            if *chat < 0 && budget > 0 {
                let window = Duration::from_secs(60).saturating_sub(limits.slack);
                if let Some(n) = most_within(times, window).filter(|&n| n > budget) {
                    violations.push(format!(
                        "bot {bot} group {chat}: {n} messages within a minute (limit {budget})"
                    ));
                }
            }
        }
        let budget = limits.per_bot_per_second;
        if budget > 0 {
            let window = Duration::from_secs(1).saturating_sub(limits.slack);
            for (bot, times) in &bots {
                if let Some(n) = most_within(times, window).filter(|&n| n > budget) {
                    violations.push(format!(
                        "bot {bot}: {n} messages within a second (limit {budget})"
                    ));
                }
            }
        }
        violations
    }

    /// Messages sent to `chat_id`.
    pub fn sent_to(&self, chat_id: i64) -> Vec<Sent> {
        self.sent()
            .into_iter()
            .filter(|s| s.chat_id == chat_id)
            .collect()
    }

    /// Calls of `method` (any case), failed ones included.
    pub fn calls(&self, method: &str) -> Vec<Call> {
        let method = method.to_ascii_lowercase();
        lock(&self.shared)
            .calls
            .iter()
            .filter(|c| c.method == method)
            .cloned()
            .collect()
    }

    /// Waits until `done` holds for the sent messages; returns them, or
    /// `None` after `timeout`.
    pub async fn wait_sent(
        &self,
        timeout: Duration,
        done: impl Fn(&[Sent]) -> bool,
    ) -> Option<Vec<Sent>> {
        let deadline = Instant::now() + timeout;
        loop {
            let sent = self.sent();
            if done(&sent) {
                return Some(sent);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The offset the bot confirmed (every update before it is gone).
    pub fn confirmed_offset(&self, token: &str) -> i64 {
        lock(&self.shared)
            .bots
            .get(token)
            .map_or(0, |b| b.confirmed)
    }

    /// Updates not yet confirmed.
    pub fn pending_updates(&self, token: &str) -> usize {
        lock(&self.shared)
            .bots
            .get(token)
            .map_or(0, |b| b.pending.len())
    }

    /// How many `getUpdates` calls were refused because another was running.
    pub fn conflicts(&self, token: &str) -> usize {
        lock(&self.shared)
            .bots
            .get(token)
            .map_or(0, |b| b.conflicts)
    }

    /// The webhook URL and secret registered for the bot.
    pub fn webhook(&self, token: &str) -> Option<(String, String)> {
        lock(&self.shared)
            .bots
            .get(token)
            .and_then(|b| b.webhook.clone())
    }

    /// Stops the server.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.shared.shutdown.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for FakeTelegram {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The most of `times` (in order) that fall within one `window`.
fn most_within(times: &[Instant], window: Duration) -> Option<usize> {
    let mut most = None;
    let mut start = 0;
    for (end, &t) in times.iter().enumerate() {
        while t.duration_since(times[start]) >= window {
            start += 1;
        }
        most = most.max(Some(end - start + 1));
    }
    most
}

/// A user, as in `from` fields.
pub fn user(id: i64, first_name: &str) -> Value {
    json!({"id": id, "is_bot": false, "first_name": first_name,
        "username": first_name.to_ascii_lowercase(), "language_code": "en"})
}

/// The private chat with a user.
pub fn private_chat(user_id: i64, first_name: &str) -> Value {
    json!({"id": user_id, "type": "private", "first_name": first_name})
}

/// A supergroup (`forum`: with topics).
pub fn supergroup(id: i64, title: &str, forum: bool) -> Value {
    if forum {
        json!({"id": id, "type": "supergroup", "title": title, "is_forum": true})
    } else {
        json!({"id": id, "type": "supergroup", "title": title})
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
