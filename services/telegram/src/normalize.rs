//! Telegram updates as bus messages: who wrote what, where, and whether it
//! is for the bot at all.
//!
//! Ids: an inbound message's `id` is `<bot id>:<update id>:<message id>`.
//! The update id makes it unique per delivery (an edit of a message is a new
//! update, so a new turn, not a redelivery); the message id is the last
//! field, which the egress reads back from an outbound's
//! `reply_to_message_id` to reply to the user's message.

use std::collections::HashMap;

use hg_proto::{ChatType, InboundMessage, Sender};
use teloxide_core::types::{
    Chat, MaybeInaccessibleMessage, Message, MessageEntity, MessageEntityKind, Update, UpdateKind,
    User,
};

use crate::config::{GroupTrigger, TelegramConfig};

/// The bot the updates were sent to, from `getMe`.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub id: u64,
    pub username: String,
}

impl Identity {
    /// The bot's id as it appears in subjects and app ids.
    pub fn app_id(&self) -> String {
        self.id.to_string()
    }
}

/// A file attached to a message, still at Telegram.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FileRef {
    pub file_id: String,
    pub unique_id: String,
    pub size: u64,
    pub file_name: String,
    pub mime_type: String,
}

/// What an update means for the gateway.
#[derive(Debug)]
pub(crate) enum Normalized {
    /// Nothing to pass on (not for the bot, from another bot, a service
    /// message…), with the reason for the log.
    Skip(&'static str),
    /// A message (or an edit) for the agent; `files` still to download.
    Message {
        inbound: Box<InboundMessage>,
        files: Vec<FileRef>,
    },
    /// A button press: the button's data still to resolve, and the query to
    /// answer.
    Callback {
        inbound: Box<InboundMessage>,
        query_id: String,
        data: String,
    },
}

/// Reads an update as the bot `me` sees it.
pub(crate) fn normalize(update: &Update, me: &Identity, config: &TelegramConfig) -> Normalized {
    let update_id = update.id.0;
    match &update.kind {
        UpdateKind::Message(m) | UpdateKind::ChannelPost(m) => {
            message(update_id, m, false, me, config)
        }
        UpdateKind::EditedMessage(m) | UpdateKind::EditedChannelPost(m) => {
            message(update_id, m, true, me, config)
        }
        UpdateKind::CallbackQuery(q) => {
            let Some(data) = q.data.clone() else {
                return Normalized::Skip("callback query without data");
            };
            let Some(source) = &q.message else {
                return Normalized::Skip("callback query from an inline message");
            };
            let (chat, message_id, thread) = match source {
                MaybeInaccessibleMessage::Regular(m) => (&m.chat, m.id.0, topic(m)),
                MaybeInaccessibleMessage::Inaccessible(m) => (&m.chat, m.message_id.0, None),
            };
            if q.from.is_bot && !config.allow_bots {
                return Normalized::Skip("button pressed by a bot");
            }
            let mut inbound = base(update_id, me, chat, message_id, thread);
            inbound.sender = Some(sender(&q.from));
            inbound.reply_to_message_id = message_id.to_string();
            inbound.timestamp_ms = hg_proto::now_ms();
            inbound
                .metadata
                .insert("callback_query_id".into(), q.id.0.clone());
            Normalized::Callback {
                inbound: Box::new(inbound),
                query_id: q.id.0.clone(),
                data,
            }
        }
        _ => Normalized::Skip("update kind not handled"),
    }
}

fn message(
    update_id: u32,
    m: &Message,
    edited: bool,
    me: &Identity,
    config: &TelegramConfig,
) -> Normalized {
    if let Some(from) = &m.from
        && from.is_bot
        && !config.allow_bots
    {
        return Normalized::Skip("message from a bot");
    }
    let shared = !m.chat.is_private();
    if shared && config.group_trigger == GroupTrigger::MentionOrReply && !addressed(m, me) {
        return Normalized::Skip("group message not addressed to the bot");
    }
    let files = files(m);
    let raw_text = m.text().or_else(|| m.caption()).unwrap_or_default();
    let text = if shared {
        strip_mention(raw_text, &me.username)
    } else {
        raw_text.trim().to_owned()
    };
    if text.is_empty() && files.is_empty() {
        return Normalized::Skip("nothing to pass on");
    }
    let mut inbound = base(update_id, me, &m.chat, m.id.0, topic(m));
    inbound.text = text;
    inbound.sender = Some(match (&m.from, &m.sender_chat) {
        // Anonymous admins and channels speak as a chat.
        (_, Some(chat)) => chat_sender(chat),
        (Some(user), None) => sender(user),
        (None, None) => chat_sender(&m.chat),
    });
    if let Some(reply) = m.reply_to_message()
        && reply.forum_topic_created().is_none()
    {
        inbound.reply_to_message_id = reply.id.0.to_string();
    }
    let when = if edited {
        m.edit_date().copied().unwrap_or(m.date)
    } else {
        m.date
    };
    inbound.timestamp_ms = when.timestamp_millis();
    let meta = &mut inbound.metadata;
    if edited {
        meta.insert("edited".into(), "true".into());
    }
    if let Some(group) = m.media_group_id() {
        meta.insert("media_group_id".into(), group.0.clone());
    }
    if let Some(title) = m.chat.title() {
        meta.insert("chat_title".into(), title.to_owned());
    }
    if let Some(code) = m.from.as_ref().and_then(|u| u.language_code.clone()) {
        meta.insert("language_code".into(), code);
    }
    Normalized::Message {
        inbound: Box::new(inbound),
        files,
    }
}

/// The forum topic of a message: only for real topic messages. Replies in
/// ordinary groups carry a `message_thread_id` too, and sending into the
/// General topic with its id fails, so nothing else counts.
fn topic(m: &Message) -> Option<i32> {
    m.is_topic_message
        .then(|| m.thread_id.map(|t| t.0.0))
        .flatten()
}

fn base(
    update_id: u32,
    me: &Identity,
    chat: &Chat,
    message_id: i32,
    thread: Option<i32>,
) -> InboundMessage {
    let chat_type = if chat.is_private() {
        ChatType::Direct
    } else if thread.is_some() {
        ChatType::Thread
    } else if chat.is_channel() {
        ChatType::Channel
    } else {
        ChatType::Group
    };
    let mut metadata = HashMap::new();
    metadata.insert("update_id".into(), update_id.to_string());
    metadata.insert("message_id".into(), message_id.to_string());
    InboundMessage {
        id: format!("{}:{update_id}:{message_id}", me.id),
        platform: crate::PLATFORM.into(),
        app_id: me.app_id(),
        channel_id: chat.id.0.to_string(),
        thread_id: thread.map(|t| t.to_string()).unwrap_or_default(),
        chat_type: chat_type as i32,
        metadata,
        ..Default::default()
    }
}

fn sender(user: &User) -> Sender {
    let display_name = match &user.last_name {
        Some(last) => format!("{} {last}", user.first_name),
        None => user.first_name.clone(),
    };
    Sender {
        id: user.id.0.to_string(),
        username: user.username.clone().unwrap_or_default(),
        display_name,
        is_bot: user.is_bot,
    }
}

fn chat_sender(chat: &Chat) -> Sender {
    Sender {
        id: chat.id.0.to_string(),
        username: chat.username().unwrap_or_default().to_owned(),
        display_name: chat.title().unwrap_or_default().to_owned(),
        is_bot: false,
    }
}

/// Whether a group message is for the bot: it mentions the bot (by
/// username, as a text mention or in a `/command@bot`) or replies to it.
fn addressed(m: &Message, me: &Identity) -> bool {
    if let Some(reply) = m.reply_to_message()
        && reply.from.as_ref().is_some_and(|u| u.id.0 == me.id)
    {
        return true;
    }
    let (text, entities) = match (m.text(), m.entities(), m.caption(), m.caption_entities()) {
        (Some(t), Some(e), _, _) => (t, e),
        (_, _, Some(t), Some(e)) => (t, e),
        _ => return false,
    };
    let handle = format!("@{}", me.username);
    entities.iter().any(|e| match &e.kind {
        MessageEntityKind::TextMention { user } => user.id.0 == me.id,
        MessageEntityKind::Mention => {
            entity_text(text, e).is_some_and(|t| t.eq_ignore_ascii_case(&handle))
        }
        MessageEntityKind::BotCommand => entity_text(text, e).is_some_and(|t| {
            t.len() > handle.len()
                && t.is_char_boundary(t.len() - handle.len())
                && t[t.len() - handle.len()..].eq_ignore_ascii_case(&handle)
        }),
        _ => false,
    })
}

/// The text an entity covers. Entity offsets count UTF-16 units; a
/// malformed entity gives `None` rather than a panic.
fn entity_text<'t>(text: &'t str, entity: &MessageEntity) -> Option<&'t str> {
    let (mut start, mut end) = (None, None);
    let mut units = 0usize;
    for (i, c) in text.char_indices().chain([(text.len(), '\0')]) {
        if units == entity.offset {
            start = Some(i);
        }
        if units == entity.offset + entity.length {
            end = Some(i);
            break;
        }
        units += c.len_utf16();
    }
    text.get(start?..end?)
}

/// Removes the bot's `@username` from a group message, so the agent reads
/// what the user asked.
fn strip_mention(text: &str, username: &str) -> String {
    if username.is_empty() {
        return text.trim().to_owned();
    }
    let handle = format!("@{}", username.to_ascii_lowercase());
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (at, _) in lower.match_indices(&handle) {
        // Only a whole mention: not `@botname_other`.
        let after = lower[at + handle.len()..].chars().next();
        if after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        out.push_str(&text[last..at]);
        last = at + handle.len();
    }
    out.push_str(&text[last..]);
    // Keep newlines; only squeeze the spaces the mention left behind.
    out.lines()
        .map(|line| {
            line.split(' ')
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

/// The files of a message worth passing on: the largest photo size, a
/// document, audio, voice note, video or animation.
fn files(m: &Message) -> Vec<FileRef> {
    let mut out = Vec::new();
    if let Some(photo) = m
        .photo()
        .and_then(|sizes| sizes.iter().max_by_key(|p| p.width * p.height))
    {
        out.push(FileRef {
            file_id: photo.file.id.0.clone(),
            unique_id: photo.file.unique_id.0.clone(),
            size: u64::from(photo.file.size),
            file_name: "photo.jpg".into(),
            mime_type: "image/jpeg".into(),
        });
    }
    if let Some(d) = m.document() {
        out.push(FileRef {
            file_id: d.file.id.0.clone(),
            unique_id: d.file.unique_id.0.clone(),
            size: u64::from(d.file.size),
            file_name: d.file_name.clone().unwrap_or_else(|| "document".into()),
            mime_type: mime(d.mime_type.as_ref()),
        });
    }
    if let Some(a) = m.audio() {
        out.push(FileRef {
            file_id: a.file.id.0.clone(),
            unique_id: a.file.unique_id.0.clone(),
            size: u64::from(a.file.size),
            file_name: a.file_name.clone().unwrap_or_else(|| "audio".into()),
            mime_type: mime(a.mime_type.as_ref()),
        });
    }
    if let Some(v) = m.voice() {
        out.push(FileRef {
            file_id: v.file.id.0.clone(),
            unique_id: v.file.unique_id.0.clone(),
            size: u64::from(v.file.size),
            file_name: "voice.ogg".into(),
            mime_type: mime(v.mime_type.as_ref()),
        });
    }
    if let Some(v) = m.video() {
        out.push(FileRef {
            file_id: v.file.id.0.clone(),
            unique_id: v.file.unique_id.0.clone(),
            size: u64::from(v.file.size),
            file_name: v.file_name.clone().unwrap_or_else(|| "video.mp4".into()),
            mime_type: mime(v.mime_type.as_ref()),
        });
    }
    if let Some(a) = m.animation() {
        out.push(FileRef {
            file_id: a.file.id.0.clone(),
            unique_id: a.file.unique_id.0.clone(),
            size: u64::from(a.file.size),
            file_name: a
                .file_name
                .clone()
                .unwrap_or_else(|| "animation.mp4".into()),
            mime_type: mime(a.mime_type.as_ref()),
        });
    }
    out
}

fn mime(mime: Option<&impl std::fmt::Display>) -> String {
    mime.map(ToString::to_string).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn me() -> Identity {
        Identity {
            id: 42,
            username: "HelperBot".into(),
        }
    }

    fn update(value: serde_json::Value) -> Update {
        // Through text: teloxide's flattened update kind does not
        // deserialize from a `Value`.
        serde_json::from_str(&value.to_string()).expect("update parses")
    }

    fn user(id: u64) -> serde_json::Value {
        json!({"id": id, "is_bot": false, "first_name": "Ana", "last_name": "Silva", "username": "ana"})
    }

    fn group() -> serde_json::Value {
        json!({"id": -1001, "type": "supergroup", "title": "Team", "is_forum": true})
    }

    fn norm(value: serde_json::Value, config: &TelegramConfig) -> Normalized {
        normalize(&update(value), &me(), config)
    }

    fn inbound(n: Normalized) -> InboundMessage {
        match n {
            Normalized::Message { inbound, .. } | Normalized::Callback { inbound, .. } => *inbound,
            Normalized::Skip(reason) => panic!("skipped: {reason}"),
        }
    }

    #[test]
    fn private_message_is_direct() {
        let n = norm(
            json!({"update_id": 7, "message": {"message_id": 3, "date": 1700000000,
                "chat": {"id": 5, "type": "private", "first_name": "Ana"},
                "from": user(5), "text": "  hi  "}}),
            &TelegramConfig::default(),
        );
        let m = inbound(n);
        assert_eq!(m.id, "42:7:3");
        assert_eq!(m.app_id, "42");
        assert_eq!(m.channel_id, "5");
        assert_eq!(m.chat_type(), ChatType::Direct);
        assert_eq!(m.text, "hi");
        assert_eq!(m.thread_id, "");
        assert_eq!(m.timestamp_ms, 1_700_000_000_000);
        let s = m.sender.unwrap();
        assert_eq!((s.id.as_str(), s.display_name.as_str()), ("5", "Ana Silva"));
    }

    #[test]
    fn groups_need_a_mention_or_a_reply() {
        let config = TelegramConfig::default();
        let msg = |text: &str, entities: serde_json::Value, extra: serde_json::Value| {
            let mut m = json!({"message_id": 9, "date": 1, "chat": group(), "from": user(5),
                "text": text, "entities": entities});
            for (k, v) in extra.as_object().unwrap() {
                m[k] = v.clone();
            }
            json!({"update_id": 1, "message": m})
        };
        assert!(matches!(
            norm(msg("hello all", json!([]), json!({})), &config),
            Normalized::Skip(_)
        ));
        // "😀 @helperbot what?" — the emoji counts two UTF-16 units.
        let m = inbound(norm(
            msg(
                "😀 @helperbot what?",
                json!([{"type": "mention", "offset": 3, "length": 10}]),
                json!({}),
            ),
            &config,
        ));
        assert_eq!(m.text, "😀 what?");
        assert_eq!(m.chat_type(), ChatType::Group);
        // Someone else's mention does not count.
        assert!(matches!(
            norm(
                msg(
                    "@other hi",
                    json!([{"type": "mention", "offset": 0, "length": 6}]),
                    json!({})
                ),
                &config
            ),
            Normalized::Skip(_)
        ));
        let m = inbound(norm(
            msg(
                "/ask@HelperBot why",
                json!([{"type": "bot_command", "offset": 0, "length": 14}]),
                json!({}),
            ),
            &config,
        ));
        assert_eq!(m.text, "/ask why");
        let reply = json!({"reply_to_message": {"message_id": 8, "date": 1, "chat": group(),
            "from": {"id": 42, "is_bot": true, "first_name": "Helper"}, "text": "earlier"}});
        let m = inbound(norm(msg("and then?", json!([]), reply), &config));
        assert_eq!(m.reply_to_message_id, "8");
        let all = TelegramConfig {
            group_trigger: GroupTrigger::All,
            ..TelegramConfig::default()
        };
        assert_eq!(
            inbound(norm(msg("hello all", json!([]), json!({})), &all)).text,
            "hello all"
        );
    }

    #[test]
    fn topics_only_for_real_topic_messages() {
        let config = TelegramConfig {
            group_trigger: GroupTrigger::All,
            ..TelegramConfig::default()
        };
        let topic_msg = json!({"update_id": 2, "message": {"message_id": 11, "date": 1,
            "chat": group(), "from": user(5), "text": "in topic",
            "message_thread_id": 77, "is_topic_message": true,
            "reply_to_message": {"message_id": 77, "date": 1, "chat": group(), "from": user(6),
                "forum_topic_created": {"name": "t", "icon_color": 0}}}});
        let m = inbound(norm(topic_msg, &config));
        assert_eq!(m.chat_type(), ChatType::Thread);
        assert_eq!(m.thread_id, "77");
        assert_eq!(m.reply_to_message_id, "", "the topic root is not a reply");
        // A reply chain in a plain group carries a thread id but no topic.
        let reply_chain = json!({"update_id": 3, "message": {"message_id": 12, "date": 1,
            "chat": group(), "from": user(5), "text": "re", "message_thread_id": 10}});
        let m = inbound(norm(reply_chain, &config));
        assert_eq!(m.chat_type(), ChatType::Group);
        assert_eq!(m.thread_id, "");
    }

    #[test]
    fn bots_edits_files_and_buttons() {
        let config = TelegramConfig::default();
        let from_bot = json!({"update_id": 4, "message": {"message_id": 1, "date": 1,
            "chat": {"id": 5, "type": "private"}, "text": "x",
            "from": {"id": 9, "is_bot": true, "first_name": "B"}}});
        assert!(matches!(
            norm(from_bot.clone(), &config),
            Normalized::Skip(_)
        ));
        let allow = TelegramConfig {
            allow_bots: true,
            ..TelegramConfig::default()
        };
        assert!(matches!(norm(from_bot, &allow), Normalized::Message { .. }));

        let edit = json!({"update_id": 5, "edited_message": {"message_id": 3, "date": 1,
            "edit_date": 2, "chat": {"id": 5, "type": "private"}, "from": user(5), "text": "fixed"}});
        let m = inbound(norm(edit, &config));
        assert_eq!(m.id, "42:5:3");
        assert_eq!(m.metadata["edited"], "true");
        assert_eq!(m.timestamp_ms, 2000);

        let photo = json!({"update_id": 6, "message": {"message_id": 4, "date": 1,
        "chat": {"id": 5, "type": "private"}, "from": user(5), "caption": "look",
        "photo": [
            {"file_id": "small", "file_unique_id": "s", "file_size": 10, "width": 90, "height": 90},
            {"file_id": "big", "file_unique_id": "b", "file_size": 99, "width": 800, "height": 600}
        ]}});
        match norm(photo, &config) {
            Normalized::Message { inbound, files } => {
                assert_eq!(inbound.text, "look");
                assert_eq!(files.len(), 1);
                assert_eq!(files[0].file_id, "big");
                assert_eq!(files[0].size, 99);
            }
            other => panic!("{other:?}"),
        }

        let press = json!({"update_id": 8, "callback_query": {"id": "cq1", "from": user(5),
            "chat_instance": "ci", "data": "b:abc",
            "message": {"message_id": 20, "date": 1, "chat": group(), "text": "pick",
                "from": {"id": 42, "is_bot": true, "first_name": "Helper"}}}});
        match norm(press, &config) {
            Normalized::Callback {
                inbound,
                query_id,
                data,
            } => {
                assert_eq!((query_id.as_str(), data.as_str()), ("cq1", "b:abc"));
                assert_eq!(inbound.channel_id, "-1001");
                assert_eq!(inbound.reply_to_message_id, "20");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_entities_do_not_panic() {
        let e = MessageEntity {
            kind: MessageEntityKind::Mention,
            offset: 1,
            length: 40,
        };
        assert_eq!(entity_text("😀abc", &e), None);
        let e = MessageEntity {
            kind: MessageEntityKind::Mention,
            offset: 2,
            length: 2,
        };
        assert_eq!(entity_text("😀abc", &e), Some("ab"));
    }
}
