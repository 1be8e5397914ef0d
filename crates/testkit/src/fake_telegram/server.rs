//! HTTP side of the fake Bot API: routing, parameters, and the methods.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{Call, Failure, Sent, Shared, State as FakeState, lock, parse_html, unix_now};

/// Serves until the shutdown signal.
pub(super) async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let mut stop = shared.shutdown.subscribe();
    let app = Router::new()
        .route("/file/{bot}/{*path}", get(download))
        .route("/{bot}/{method}", post(method))
        .with_state(shared);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        })
        .await;
    if let Err(err) = result {
        tracing::warn!(error = %err, "fake telegram server failed");
    }
}

/// A Bot API error: status, description, and `retry_after` for 429.
struct ApiError {
    code: u16,
    description: String,
    retry_after: Option<u32>,
}

fn bad(description: &str) -> ApiError {
    ApiError {
        code: 400,
        description: description.to_owned(),
        retry_after: None,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "ok": false,
            "error_code": self.code,
            "description": self.description,
        });
        if let Some(seconds) = self.retry_after {
            body["parameters"] = json!({ "retry_after": seconds });
        }
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::BAD_REQUEST);
        (status, axum::Json(body)).into_response()
    }
}

fn ok(result: Value) -> Response {
    axum::Json(json!({ "ok": true, "result": result })).into_response()
}

/// The request's parameters, and the uploaded files by part name (a
/// parameter refers to one as `attach://<name>`).
struct Params {
    values: Value,
    files: HashMap<String, (String, Vec<u8>)>,
}

async fn read_params(request: Request) -> Result<Params, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if content_type.starts_with("multipart/form-data") {
        let mut multipart = Multipart::from_request(request, &())
            .await
            .map_err(|e| bad(&format!("Bad Request: {e}")))?;
        let mut values = serde_json::Map::new();
        let mut files = HashMap::new();
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| bad(&format!("Bad Request: {e}")))?
        {
            let name = field.name().unwrap_or("").to_owned();
            let file_name = field.file_name().map(str::to_owned);
            let data = field
                .bytes()
                .await
                .map_err(|e| bad(&format!("Bad Request: {e}")))?;
            match file_name {
                Some(file_name) => {
                    files.insert(name, (file_name, data.to_vec()));
                }
                None => {
                    let text = String::from_utf8_lossy(&data).into_owned();
                    // Nested objects travel as JSON text.
                    let value = if text.starts_with(['{', '[']) {
                        serde_json::from_str(&text).unwrap_or(Value::String(text))
                    } else {
                        Value::String(text)
                    };
                    values.insert(name, value);
                }
            }
        }
        return Ok(Params {
            values: Value::Object(values),
            files,
        });
    }
    let body = axum::body::to_bytes(request.into_body(), 64 * 1024 * 1024)
        .await
        .map_err(|e| bad(&format!("Bad Request: {e}")))?;
    let values = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body).map_err(|_| bad("Bad Request: invalid JSON"))?
    };
    Ok(Params {
        values,
        files: HashMap::new(),
    })
}

/// A number given as a JSON number or as text (multipart).
fn int(value: &Value) -> Option<i64> {
    value
        .as_i64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
}

/// Identity of the bot a request is for.
#[derive(Clone)]
struct BotInfo {
    token: String,
    id: i64,
    username: String,
}

async fn method(
    State(shared): State<Arc<Shared>>,
    Path((bot, method)): Path<(String, String)>,
    request: Request,
) -> Response {
    let method = method.to_ascii_lowercase();
    let Some(token) = bot.strip_prefix("bot").map(str::to_owned) else {
        return ApiError {
            code: 404,
            description: "Not Found".into(),
            retry_after: None,
        }
        .into_response();
    };
    let info = {
        let state = lock(&shared);
        state.bots.get(&token).map(|b| BotInfo {
            token: token.clone(),
            id: b.id,
            username: b.username.clone(),
        })
    };
    let Some(bot) = info else {
        return ApiError {
            code: 401,
            description: "Unauthorized".into(),
            retry_after: None,
        }
        .into_response();
    };
    let params = match read_params(request).await {
        Ok(params) => params,
        Err(e) => return e.into_response(),
    };
    let injected = lock(&shared)
        .failures
        .get_mut(&method)
        .and_then(|q| q.pop_front());
    if let Some(failure) = injected {
        let error = match failure {
            Failure::TooManyRequests { retry_after } => ApiError {
                code: 429,
                description: format!("Too Many Requests: retry after {retry_after}"),
                retry_after: Some(retry_after),
            },
            Failure::Error { code, description } => ApiError {
                code,
                description,
                retry_after: None,
            },
        };
        record(
            &shared,
            &bot,
            &method,
            &params.values,
            Some(&error.description),
        );
        return error.into_response();
    }
    if method == "getupdates" {
        return get_updates(&shared, &bot, &params.values).await;
    }
    let result = {
        let mut state = lock(&shared);
        dispatch(&mut state, &bot, &method, &params)
    };
    record(
        &shared,
        &bot,
        &method,
        &params.values,
        result.as_ref().err().map(|e| e.description.as_str()),
    );
    match result {
        Ok(value) => ok(value),
        Err(e) => e.into_response(),
    }
}

fn record(shared: &Shared, bot: &BotInfo, method: &str, params: &Value, error: Option<&str>) {
    lock(shared).calls.push(Call {
        bot: bot.id,
        method: method.to_owned(),
        params: params.clone(),
        at: Instant::now(),
        error: error.map(str::to_owned),
    });
}

fn dispatch(
    state: &mut FakeState,
    bot: &BotInfo,
    method: &str,
    params: &Params,
) -> Result<Value, ApiError> {
    let p = &params.values;
    match method {
        "getme" => Ok(json!({
            "id": bot.id, "is_bot": true, "first_name": bot.username, "username": bot.username,
            "can_join_groups": true, "can_read_all_group_messages": false,
            "supports_inline_queries": false, "can_connect_to_business": false,
            "has_main_web_app": false,
        })),
        "setwebhook" => {
            let url = p["url"].as_str().unwrap_or("").to_owned();
            let secret = p["secret_token"].as_str().unwrap_or("").to_owned();
            if let Some(b) = state.bots.get_mut(&bot.token) {
                b.webhook = (!url.is_empty()).then_some((url, secret));
            }
            Ok(json!(true))
        }
        "deletewebhook" => {
            if let Some(b) = state.bots.get_mut(&bot.token) {
                b.webhook = None;
            }
            Ok(json!(true))
        }
        "setmycommands" => {
            let Some(commands) = p["commands"].as_array() else {
                return Err(bad("Bad Request: commands must be an array"));
            };
            if commands.len() > 100 {
                return Err(bad("Bad Request: too many commands"));
            }
            for c in commands {
                let name = c["command"].as_str().unwrap_or("");
                let valid = (1..=32).contains(&name.len())
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !valid {
                    return Err(bad("Bad Request: BOT_COMMAND_INVALID"));
                }
                let description = c["description"].as_str().unwrap_or("");
                if !(1..=256).contains(&description.chars().count()) {
                    return Err(bad("Bad Request: BOT_COMMAND_DESCRIPTION_INVALID"));
                }
            }
            Ok(json!(true))
        }
        "getwebhookinfo" => {
            let b = state.bots.get(&bot.token);
            Ok(json!({
                "url": b.and_then(|b| b.webhook.as_ref()).map(|w| w.0.clone()).unwrap_or_default(),
                "has_custom_certificate": false,
                "pending_update_count": b.map_or(0, |b| b.pending.len()),
            }))
        }
        "sendmessage" => {
            let chat = chat_id(p)?;
            let text = p["text"].as_str().unwrap_or("").to_owned();
            let parse_mode = p["parse_mode"].as_str().map(str::to_owned);
            let visible = visible(state, &text, parse_mode.as_deref())?;
            if visible.trim().is_empty() {
                return Err(bad("Bad Request: message text is empty"));
            }
            if utf16(&visible) > 4096 {
                return Err(bad("Bad Request: message is too long"));
            }
            let thread = thread(state, chat, p)?;
            let markup = markup(p)?;
            let fields = json!({ "text": visible });
            Ok(store(
                state,
                bot,
                "sendmessage",
                chat,
                thread,
                p,
                text,
                visible,
                parse_mode,
                markup,
                None,
                fields,
            ))
        }
        "editmessagetext" | "editmessagecaption" => {
            let caption = method == "editmessagecaption";
            let chat = chat_id(p)?;
            let message_id = int(&p["message_id"])
                .ok_or_else(|| bad("Bad Request: message identifier is not specified"))?;
            let field = if caption { "caption" } else { "text" };
            let text = p[field].as_str().unwrap_or("").to_owned();
            let parse_mode = p["parse_mode"].as_str().map(str::to_owned);
            let visible = visible(state, &text, parse_mode.as_deref())?;
            if caption {
                if utf16(&visible) > 1024 {
                    return Err(bad("Bad Request: message caption is too long"));
                }
            } else {
                if visible.trim().is_empty() {
                    return Err(bad("Bad Request: message text is empty"));
                }
                if utf16(&visible) > 4096 {
                    return Err(bad("Bad Request: MESSAGE_TOO_LONG"));
                }
            }
            let markup = markup(p)?;
            let Some(current) = state.messages.get(&(chat, message_id)) else {
                return Err(bad("Bad Request: message to edit not found"));
            };
            // Photos and documents have a caption, not a text.
            let media = state.media.contains(&(chat, message_id));
            if media && !caption {
                return Err(bad("Bad Request: there is no text in the message to edit"));
            }
            if !media && caption {
                return Err(bad(
                    "Bad Request: there is no caption in the message to edit",
                ));
            }
            if current.0 == visible && current.1 == markup {
                return Err(bad(
                    "Bad Request: message is not modified: specified new message content and reply markup are exactly the same as a current content and reply markup of the message",
                ));
            }
            state
                .messages
                .insert((chat, message_id), (visible.clone(), markup.clone()));
            let mut json = message_json(
                state,
                bot,
                chat,
                message_id,
                None,
                json!({ field: visible }),
            );
            json["edit_date"] = json!(unix_now());
            state.sent.push(Sent {
                bot: bot.id,
                method: method.to_owned(),
                chat_id: chat,
                message_id,
                text,
                visible_text: visible,
                parse_mode,
                thread_id: None,
                reply_to: None,
                reply_markup: markup,
                file: None,
                json: json.clone(),
                at: Instant::now(),
            });
            Ok(json)
        }
        "sendphoto" | "senddocument" => {
            let chat = chat_id(p)?;
            let field = if method == "sendphoto" {
                "photo"
            } else {
                "document"
            };
            let (file_name, data) = match p[field].as_str() {
                Some(value) => match value.strip_prefix("attach://") {
                    Some(part) => params
                        .files
                        .get(part)
                        .cloned()
                        .ok_or_else(|| bad("Bad Request: file must be non-empty"))?,
                    // A file id or URL: nothing uploaded.
                    None => (String::new(), Vec::new()),
                },
                None => return Err(bad("Bad Request: there is no document in the request")),
            };
            let caption = p["caption"].as_str().unwrap_or("").to_owned();
            let parse_mode = p["parse_mode"].as_str().map(str::to_owned);
            let visible = visible(state, &caption, parse_mode.as_deref())?;
            if utf16(&visible) > 1024 {
                return Err(bad("Bad Request: message caption is too long"));
            }
            let thread = thread(state, chat, p)?;
            let markup = markup(p)?;
            state.next_id += 1;
            let file = json!({
                "file_id": format!("sent-{}", state.next_id),
                "file_unique_id": format!("sentu{}", state.next_id),
                "file_size": data.len(),
            });
            let mut fields = if method == "sendphoto" {
                let mut size = file.clone();
                size["width"] = json!(100);
                size["height"] = json!(100);
                json!({ "photo": [size] })
            } else {
                let mut document = file.clone();
                document["file_name"] = json!(file_name);
                json!({ "document": document })
            };
            if !visible.is_empty() {
                fields["caption"] = json!(visible);
            }
            Ok(store(
                state,
                bot,
                method,
                chat,
                thread,
                p,
                caption,
                visible,
                parse_mode,
                markup,
                Some((file_name, data)),
                fields,
            ))
        }
        "sendchataction" => {
            let chat = chat_id(p)?;
            thread(state, chat, p)?;
            Ok(json!(true))
        }
        "answercallbackquery" => {
            if p["callback_query_id"].as_str().unwrap_or("").is_empty() {
                return Err(bad(
                    "Bad Request: query is too old and response timeout expired or query id is invalid",
                ));
            }
            if p["text"].as_str().is_some_and(|t| t.chars().count() > 200) {
                return Err(bad("Bad Request: MESSAGE_TOO_LONG"));
            }
            Ok(json!(true))
        }
        "deletemessage" => {
            let chat = chat_id(p)?;
            let id = int(&p["message_id"]).unwrap_or_default();
            if state.messages.remove(&(chat, id)).is_none() {
                return Err(bad("Bad Request: message to delete not found"));
            }
            Ok(json!(true))
        }
        "getfile" => {
            let file_id = p["file_id"].as_str().unwrap_or("");
            let file = state
                .files
                .get(file_id)
                .ok_or_else(|| bad("Bad Request: invalid file id"))?;
            Ok(json!({
                "file_id": file_id, "file_unique_id": file.unique_id,
                "file_size": file.data.len(), "file_path": file.path,
            }))
        }
        _ => Err(ApiError {
            code: 404,
            description: "Not Found".into(),
            retry_after: None,
        }),
    }
}

#[allow(clippy::too_many_arguments)]
fn store(
    state: &mut FakeState,
    bot: &BotInfo,
    method: &str,
    chat: i64,
    thread: Option<i64>,
    p: &Value,
    text: String,
    visible: String,
    parse_mode: Option<String>,
    markup: Option<Value>,
    file: Option<(String, Vec<u8>)>,
    fields: Value,
) -> Value {
    let next = state.next_message.entry(chat).or_insert(0);
    *next += 1;
    let message_id = *next;
    let mut json = message_json(state, bot, chat, message_id, thread, fields);
    if let Some(markup) = &markup {
        json["reply_markup"] = markup.clone();
    }
    state
        .messages
        .insert((chat, message_id), (visible.clone(), markup.clone()));
    if file.is_some() {
        state.media.insert((chat, message_id));
    }
    state.sent.push(Sent {
        bot: bot.id,
        method: method.to_owned(),
        chat_id: chat,
        message_id,
        text,
        visible_text: visible,
        parse_mode,
        thread_id: thread,
        reply_to: int(&p["reply_parameters"]["message_id"]),
        reply_markup: markup,
        file,
        json: json.clone(),
        at: Instant::now(),
    });
    json
}

fn message_json(
    state: &FakeState,
    bot: &BotInfo,
    chat: i64,
    message_id: i64,
    thread: Option<i64>,
    fields: Value,
) -> Value {
    let chat_json = state.chats.get(&chat).cloned().unwrap_or_else(|| {
        if chat > 0 {
            json!({"id": chat, "type": "private", "first_name": "User"})
        } else {
            json!({"id": chat, "type": "supergroup", "title": "Group"})
        }
    });
    let mut json = json!({
        "message_id": message_id,
        "date": unix_now(),
        "chat": chat_json,
        "from": {"id": bot.id, "is_bot": true, "first_name": bot.username, "username": bot.username},
    });
    if let Some(thread) = thread {
        json["message_thread_id"] = json!(thread);
        json["is_topic_message"] = json!(true);
    }
    if let Some(fields) = fields.as_object() {
        for (k, v) in fields {
            json[k] = v.clone();
        }
    }
    json
}

fn chat_id(p: &Value) -> Result<i64, ApiError> {
    int(&p["chat_id"]).ok_or_else(|| bad("Bad Request: chat not found"))
}

/// The visible text after parse mode, or the parse error.
fn visible(state: &FakeState, text: &str, parse_mode: Option<&str>) -> Result<String, ApiError> {
    match parse_mode {
        Some(mode) if mode.eq_ignore_ascii_case("html") => {
            if let Some(needle) = state.reject_html.iter().find(|n| text.contains(n.as_str())) {
                return Err(bad(&format!(
                    "Bad Request: can't parse entities: Unsupported start tag \"{needle}\" at byte offset 0"
                )));
            }
            parse_html(text).map_err(|d| bad(&d))
        }
        Some(mode) if !mode.is_empty() => Err(bad("Bad Request: unsupported parse_mode")),
        _ => Ok(text.to_owned()),
    }
}

fn thread(state: &FakeState, chat: i64, p: &Value) -> Result<Option<i64>, ApiError> {
    match int(&p["message_thread_id"]) {
        None => Ok(None),
        Some(thread) if state.topics.contains(&(chat, thread)) => Ok(Some(thread)),
        Some(_) => Err(bad("Bad Request: message thread not found")),
    }
}

fn markup(p: &Value) -> Result<Option<Value>, ApiError> {
    let markup = &p["reply_markup"];
    if markup.is_null() {
        return Ok(None);
    }
    for row in markup["inline_keyboard"].as_array().into_iter().flatten() {
        for button in row.as_array().into_iter().flatten() {
            if let Some(data) = button["callback_data"].as_str()
                && (data.is_empty() || data.len() > 64)
            {
                return Err(bad("Bad Request: BUTTON_DATA_INVALID"));
            }
        }
    }
    Ok(Some(markup.clone()))
}

fn utf16(s: &str) -> usize {
    s.encode_utf16().count()
}

/// Marks a long poll as running for its bot, until dropped (also when the
/// client goes away and the handler is dropped).
struct Polling {
    shared: Arc<Shared>,
    token: String,
}

impl Drop for Polling {
    fn drop(&mut self) {
        if let Some(bot) = lock(&self.shared).bots.get_mut(&self.token) {
            bot.polling = bot.polling.saturating_sub(1);
        }
    }
}

async fn get_updates(shared: &Arc<Shared>, bot: &BotInfo, p: &Value) -> Response {
    let conflict = |description: &str| ApiError {
        code: 409,
        description: description.to_owned(),
        retry_after: None,
    };
    let refused = {
        let mut state = lock(shared);
        let b = state.bots.get_mut(&bot.token).expect("bot exists");
        if b.webhook.is_some() {
            Some(conflict(
                "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first",
            ))
        } else if b.polling > 0 {
            b.conflicts += 1;
            Some(conflict(
                "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running",
            ))
        } else {
            b.polling += 1;
            if let Some(offset) = int(&p["offset"]).filter(|&o| o > 0) {
                b.confirmed = b.confirmed.max(offset);
                let confirmed = b.confirmed;
                b.pending
                    .retain(|u| u["update_id"].as_i64().unwrap_or_default() >= confirmed);
            }
            None
        }
    };
    if let Some(error) = refused {
        record(shared, bot, "getupdates", p, Some(&error.description));
        return error.into_response();
    }
    record(shared, bot, "getupdates", p, None);
    let _polling = Polling {
        shared: Arc::clone(shared),
        token: bot.token.clone(),
    };
    let limit = int(&p["limit"])
        .filter(|&l| (1..=100).contains(&l))
        .unwrap_or(100) as usize;
    let timeout = Duration::from_secs(int(&p["timeout"]).unwrap_or(0).clamp(0, 50) as u64);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = shared.updates.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let updates: Vec<Value> = {
            let state = lock(shared);
            let b = state.bots.get(&bot.token).expect("bot exists");
            b.pending.iter().take(limit).cloned().collect()
        };
        if !updates.is_empty() || tokio::time::Instant::now() >= deadline {
            return ok(Value::Array(updates));
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

async fn download(
    State(shared): State<Arc<Shared>>,
    Path((bot, path)): Path<(String, String)>,
) -> Response {
    let state = lock(&shared);
    let known = bot
        .strip_prefix("bot")
        .is_some_and(|t| state.bots.contains_key(t));
    let file = state.files.values().find(|f| f.path == path);
    match (known, file) {
        (true, Some(file)) => file.data.clone().into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}
