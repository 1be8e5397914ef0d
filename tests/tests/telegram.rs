//! Telegram end to end: a fake Bot API that the real teloxide client talks
//! to, a real nats-server, the real bridge on the echo runtime, and the
//! Telegram ingress and egress as the binary runs them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hg_e2e::{Component, Stack, collect, dead_letters, next};
use hg_proto::{
    Attachment, Button, DeliveryReceipt, InboundMessage, OutboundKind, OutboundMessage, subject,
};
use hg_telegram::{Mode, WebhookConfig};
use hg_testkit::fake_telegram::{
    Failure, FakeTelegram, Sent, parse_html, private_chat, supergroup, user,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
const BOT_ID: i64 = 1001;
const BOT_NAME: &str = "helper_bot";

use hg_e2e::telegram::config;

/// A stack with the echo bridge, a fake Bot API with one bot, and the
/// Telegram ingress and egress.
struct World {
    stack: Stack,
    fake: FakeTelegram,
    token: String,
    _parts: Vec<Component>,
    _bridge: hg_e2e::Component,
}

async fn world() -> World {
    let stack = Stack::start().await;
    let fake = FakeTelegram::start().await;
    let token = fake.add_bot(BOT_ID, BOT_NAME);
    let bridge = stack.echo_bridge().await;
    let parts = vec![
        stack.telegram_ingress(config(&fake, &[&token])).await,
        stack.telegram_egress(config(&fake, &[&token])).await,
    ];
    World {
        stack,
        fake,
        token,
        _parts: parts,
        _bridge: bridge,
    }
}

/// Waits for a sent message whose visible text is `text`.
async fn reply(fake: &FakeTelegram, text: &str) -> Sent {
    let sent = fake
        .wait_sent(WAIT, |s| s.iter().any(|m| m.visible_text == text))
        .await
        .unwrap_or_else(|| panic!("no reply {text:?}; sent: {:#?}", texts(&fake.sent())));
    sent.into_iter().find(|m| m.visible_text == text).unwrap()
}

fn texts(sent: &[Sent]) -> Vec<String> {
    sent.iter().map(|s| s.visible_text.clone()).collect()
}

fn mention(text: &str) -> serde_json::Value {
    let handle = format!("@{BOT_NAME}");
    let at = text.find(&handle).expect("text mentions the bot");
    let offset = text[..at].encode_utf16().count();
    json!({"text": text, "entities": [{"type": "mention", "offset": offset, "length": handle.len()}]})
}

#[tokio::test]
async fn private_group_and_topic_messages_reach_their_session_and_are_answered_in_place() {
    let w = world().await;
    let mut outbound = collect::<OutboundMessage>(&w.stack.bus, "hg.out.telegram.>").await;
    let ana = user(5, "Ana");

    // Private chat: one session per user, answered without a quote.
    w.fake
        .push_text(&w.token, &private_chat(5, "Ana"), &ana, "hello there");
    let dm = reply(&w.fake, "hello there").await;
    assert_eq!((dm.chat_id, dm.thread_id, dm.reply_to), (5, None, None));
    assert_eq!(dm.parse_mode.as_deref(), Some("HTML"));

    // A group: only messages for the bot count; answers quote the asker.
    let group = supergroup(-100200, "Team", false);
    w.fake
        .push_text(&w.token, &group, &ana, "nobody asked the bot");
    let asked = w
        .fake
        .push_message(&w.token, &group, &ana, mention("@helper_bot what time?"));
    let answer = reply(&w.fake, "[Ana]: what time?").await;
    assert_eq!(answer.chat_id, -100200);
    assert_eq!(answer.thread_id, None);
    assert_eq!(answer.reply_to, Some(asked.message_id));
    // A reply to the bot counts too, in a reply chain whose thread id is
    // not a topic: the answer must not carry it.
    let mut fields = json!({"text": "and tomorrow?", "message_thread_id": answer.message_id});
    fields["reply_to_message"] = answer.json.clone();
    w.fake
        .push_message(&w.token, &group, &user(6, "Bo"), fields);
    let followup = reply(&w.fake, "[Bo]: and tomorrow?").await;
    assert_eq!((followup.chat_id, followup.thread_id), (-100200, None));

    // A forum topic: its own session, answered in the topic.
    let forum = supergroup(-100300, "Forum", true);
    w.fake.add_topic(-100300, 77);
    let root = json!({"message_id": 77, "date": 1, "chat": forum, "from": ana,
        "forum_topic_created": {"name": "Plans", "icon_color": 7322096}});
    let mut fields = mention("@helper_bot in the topic");
    fields["message_thread_id"] = json!(77);
    fields["is_topic_message"] = json!(true);
    fields["reply_to_message"] = root;
    w.fake.push_message(&w.token, &forum, &ana, fields);
    let topic = reply(&w.fake, "[Ana]: in the topic").await;
    assert_eq!((topic.chat_id, topic.thread_id), (-100300, Some(77)));
    // The forum's General topic: no thread id (sending 1 would fail).
    w.fake
        .push_message(&w.token, &forum, &ana, mention("@helper_bot in general"));
    let general = reply(&w.fake, "[Ana]: in general").await;
    assert_eq!((general.chat_id, general.thread_id), (-100300, None));

    let mut sessions = HashMap::new();
    while sessions.len() < 5 {
        let out = next(&mut outbound, "replies").await;
        if out.kind() == OutboundKind::Reply {
            sessions.insert(out.text.clone(), out.session_key.clone());
        }
    }
    assert_eq!(sessions["hello there"], "telegram:1001:dm:5");
    assert_eq!(sessions["[Ana]: what time?"], "telegram:1001:chat:-100200");
    assert_eq!(
        sessions["[Bo]: and tomorrow?"],
        "telegram:1001:chat:-100200"
    );
    assert_eq!(
        sessions["[Ana]: in the topic"],
        "telegram:1001:thread:-100300:77"
    );
    assert_eq!(sessions["[Ana]: in general"], "telegram:1001:chat:-100300");
    assert!(
        !texts(&w.fake.sent())
            .iter()
            .any(|t| t.contains("nobody asked")),
        "a group message not for the bot was answered"
    );
}

/// About 12,000 characters of Markdown: headings, prose with links and
/// emoji, code blocks, lists.
fn long_markdown() -> String {
    let mut md = String::new();
    let mut i = 0;
    while md.chars().count() < 12_000 {
        i += 1;
        md.push_str(&format!("## Section {i} 🚀\n\n"));
        md.push_str(&format!(
            "Paragraph {i} with a [link](https://example.com/docs/{i}?a=1&b=2), **bold & brave** \
             text, `inline <code>`, emoji 👩‍💻🎉🇵🇹 and some words to fill the line nicely. \
             More words follow here so that the paragraph is long enough to matter.\n\n"
        ));
        md.push_str("```rust\n");
        for line in 0..12 {
            md.push_str(&format!(
                "fn f{i}_{line}(x: &str) -> bool {{ x.len() > {line} && x != \"<&>\" }}\n"
            ));
        }
        md.push_str("```\n\n");
        md.push_str(&format!("- item {i}.1 with *style*\n- item {i}.2 😀\n\n"));
    }
    md
}

fn balanced(html: &str) -> bool {
    let mut depth: Vec<&str> = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        let end = start + rest[start..].find('>').expect("tag closes");
        let tag = &rest[start + 1..end];
        match tag.strip_prefix('/') {
            Some(name) => {
                if depth.pop() != Some(name) {
                    return false;
                }
            }
            None => depth.push(tag.split(' ').next().unwrap()),
        }
        rest = &rest[end + 1..];
    }
    depth.is_empty()
}

fn squeeze(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

#[tokio::test]
async fn a_long_reply_arrives_as_valid_html_parts_in_order_with_nothing_lost() {
    let w = world().await;
    let mut receipts = collect::<DeliveryReceipt>(&w.stack.bus, "hg.receipt.telegram.>").await;
    let md = long_markdown();
    assert!(md.chars().count() >= 12_000);
    w.fake
        .push_text(&w.token, &private_chat(5, "Ana"), &user(5, "Ana"), &md);
    let receipt = loop {
        let receipt = next(&mut receipts, "the reply's receipt").await;
        if receipt.platform_message_ids.len() > 1 {
            break receipt;
        }
    };
    assert!(receipt.delivered, "{receipt:?}");
    let parts: Vec<Sent> = w
        .fake
        .sent_to(5)
        .into_iter()
        .filter(|s| s.method == "sendmessage")
        .collect();
    assert!(parts.len() >= 4, "{} parts", parts.len());
    let ids: Vec<String> = parts.iter().map(|p| p.message_id.to_string()).collect();
    assert_eq!(
        receipt.platform_message_ids, ids,
        "receipt lists every part in order"
    );
    let mut visible = String::new();
    for part in &parts {
        let units = part.text.encode_utf16().count();
        assert!(units <= 4096, "part of {units} UTF-16 units");
        assert!(balanced(&part.text), "unbalanced part: {}", part.text);
        assert_eq!(parse_html(&part.text).unwrap(), part.visible_text);
        assert_eq!(part.parse_mode.as_deref(), Some("HTML"));
        visible.push_str(&part.visible_text);
    }
    // Code blocks cut across parts continue as code blocks.
    assert!(
        parts[1..].iter().any(|p| p.text.starts_with("<pre>")),
        "no part continues a code block"
    );
    let whole = parse_html(&hg_text::telegram::render_html(&md)).unwrap();
    assert_eq!(squeeze(&visible), squeeze(&whole), "text lost or reordered");
    assert!(visible.contains("👩‍💻🎉🇵🇹"));
}

#[tokio::test]
async fn html_telegram_rejects_is_resent_as_plain_text() {
    let w = world().await;
    w.fake.reject_html_containing("<b>");
    w.fake.push_text(
        &w.token,
        &private_chat(5, "Ana"),
        &user(5, "Ana"),
        "this is **bold** & <fine>",
    );
    let sent = reply(&w.fake, "this is bold & <fine>").await;
    assert_eq!(sent.parse_mode, None);
    assert_eq!(sent.text, "this is bold & <fine>");
    let calls = w.fake.calls("sendMessage");
    let rejected = calls
        .iter()
        .find(|c| c.error.is_some())
        .expect("the html version was tried first");
    assert!(
        rejected
            .error
            .as_deref()
            .unwrap()
            .starts_with("Bad Request: can't parse entities")
    );
    assert_eq!(
        rejected.params["text"],
        "this is <b>bold</b> &amp; &lt;fine&gt;"
    );
    assert!(dead_letters(&w.stack.bus).await.is_empty());
}

#[tokio::test]
async fn flood_control_is_waited_out_and_order_is_kept() {
    let w = world().await;
    w.fake.fail_next(
        "sendMessage",
        Failure::TooManyRequests { retry_after: 1 },
        2,
    );
    let chat = private_chat(5, "Ana");
    for text in ["one", "two", "three"] {
        w.fake.push_text(&w.token, &chat, &user(5, "Ana"), text);
    }
    let sent = w
        .fake
        .wait_sent(WAIT, |s| s.len() >= 3)
        .await
        .expect("all three delivered");
    assert_eq!(texts(&sent), ["one", "two", "three"]);
    let calls = w.fake.calls("sendMessage");
    let limited: Vec<&hg_testkit::fake_telegram::Call> =
        calls.iter().filter(|c| c.error.is_some()).collect();
    assert_eq!(limited.len(), 2);
    for call in limited {
        let retry = calls
            .iter()
            .find(|c| c.at > call.at)
            .expect("a retry follows");
        let waited = retry.at - call.at;
        assert!(
            waited >= Duration::from_millis(950),
            "retried after {waited:?}, asked to wait 1 s"
        );
    }
    assert!(dead_letters(&w.stack.bus).await.is_empty());
}

#[tokio::test]
async fn a_killed_ingress_loses_no_update_and_answers_none_twice() {
    let stack = Stack::start().await;
    let fake = FakeTelegram::start().await;
    let token = fake.add_bot(BOT_ID, BOT_NAME);
    let _bridge = stack.echo_bridge().await;
    let _egress = stack.telegram_egress(config(&fake, &[&token])).await;
    let chat = private_chat(5, "Ana");
    let ana = user(5, "Ana");
    for n in 0..15 {
        fake.push_text(&token, &chat, &ana, &format!("message {n}"));
    }
    let first = stack.telegram_ingress(config(&fake, &[&token])).await;
    fake.wait_sent(WAIT, |s| s.len() >= 3)
        .await
        .expect("the first ingress got going");
    first.kill().await;
    for n in 15..30 {
        fake.push_text(&token, &chat, &ana, &format!("message {n}"));
    }
    let _second = stack.telegram_ingress(config(&fake, &[&token])).await;
    fake.wait_sent(WAIT, |s| s.len() >= 30)
        .await
        .unwrap_or_else(|| panic!("replies missing: {:?}", texts(&fake.sent())));
    // Give a duplicate time to show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent = texts(&fake.sent());
    let expected: Vec<String> = (0..30).map(|n| format!("message {n}")).collect();
    assert_eq!(
        sent, expected,
        "each update answered exactly once, in order"
    );
    assert_eq!(fake.pending_updates(&token), 0);
}

#[tokio::test]
async fn two_replicas_poll_each_bot_once_and_fail_over() {
    let stack = Stack::start().await;
    let fake = FakeTelegram::start().await;
    let tokens = [fake.add_bot(2001, "one_bot"), fake.add_bot(2002, "two_bot")];
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let _bridge = stack.echo_bridge().await;
    let _egress = stack.telegram_egress(config(&fake, &token_refs)).await;
    let a = stack.telegram_ingress(config(&fake, &token_refs)).await;
    // Replica A polls both bots before B exists.
    let deadline = Instant::now() + WAIT;
    while fake
        .calls("getUpdates")
        .iter()
        .filter(|c| c.error.is_none())
        .map(|c| c.bot)
        .collect::<std::collections::HashSet<_>>()
        .len()
        < 2
    {
        assert!(Instant::now() < deadline, "replica a never polled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = stack.telegram_ingress(config(&fake, &token_refs)).await;
    let ana = user(5, "Ana");
    for (i, token) in tokens.iter().enumerate() {
        fake.push_text(token, &private_chat(5, "Ana"), &ana, &format!("to bot {i}"));
    }
    reply(&fake, "to bot 0").await;
    reply(&fake, "to bot 1").await;
    // Both replicas running for a few poll cycles: never two pollers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for token in &tokens {
        assert_eq!(fake.conflicts(token), 0, "two replicas polled one bot");
    }
    // A dies; B takes both bots over within about the lease ttl.
    a.kill().await;
    let killed = Instant::now();
    for (i, token) in tokens.iter().enumerate() {
        fake.push_text(
            token,
            &private_chat(5, "Ana"),
            &ana,
            &format!("after failover {i}"),
        );
    }
    reply(&fake, "after failover 0").await;
    reply(&fake, "after failover 1").await;
    assert!(
        killed.elapsed() < Duration::from_secs(6),
        "failover took {:?}",
        killed.elapsed()
    );
    b.stop().await;
}

#[tokio::test]
async fn a_conflicting_poller_gets_409s_until_it_is_gone() {
    let stack = Stack::start().await;
    let fake = FakeTelegram::start().await;
    let token = fake.add_bot(BOT_ID, BOT_NAME);
    let _bridge = stack.echo_bridge().await;
    let _egress = stack.telegram_egress(config(&fake, &[&token])).await;
    // Someone else long-polls the same bot for 2 s (another deployment).
    let rogue = tokio::spawn(
        reqwest::Client::new()
            .post(format!("{}/bot{token}/getUpdates", fake.api_url()))
            .json(&json!({"timeout": 4}))
            .send(),
    );
    let deadline = Instant::now() + WAIT;
    while fake.calls("getUpdates").is_empty() {
        assert!(Instant::now() < deadline, "the rogue poll did not arrive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ingress = stack.telegram_ingress(config(&fake, &[&token])).await;
    while fake.conflicts(&token) == 0 {
        assert!(
            Instant::now() < deadline,
            "the ingress never met the conflict"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fake.push_text(
        &token,
        &private_chat(5, "Ana"),
        &user(5, "Ana"),
        "despite the conflict",
    );
    // The rogue poll sees the update too but never confirms it, so the
    // ingress gets it once the rogue poll is over.
    let body: serde_json::Value = rogue.await.unwrap().unwrap().json().await.unwrap();
    assert_eq!(body["result"][0]["message"]["text"], "despite the conflict");
    reply(&fake, "despite the conflict").await;
    assert!(fake.calls("getUpdates").iter().any(|c| {
        c.error
            .as_deref()
            .is_some_and(|e| e.starts_with("Conflict: terminated by other getUpdates"))
    }));
}

#[tokio::test]
async fn the_webhook_refuses_a_wrong_secret_and_publishes_before_answering() {
    let stack = Stack::start().await;
    let fake = FakeTelegram::start().await;
    let token = fake.add_bot(BOT_ID, BOT_NAME);
    let _bridge = stack.echo_bridge().await;
    let port = hg_testkit::nats::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut webhook_config = config(&fake, &[&token]);
    webhook_config.mode = Mode::Webhook;
    webhook_config.webhook = WebhookConfig {
        listen: format!("127.0.0.1:{port}"),
        public_url: base.clone(),
        secret_token: "s3cret-Token_1".into(),
    };
    let _ingress = stack.telegram_ingress(webhook_config.clone()).await;
    let _egress = stack.telegram_egress(webhook_config).await;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "webhook server did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("{base}/telegram/{BOT_ID}");
    assert_eq!(
        fake.webhook(&token),
        Some((url.clone(), "s3cret-Token_1".to_owned()))
    );
    let update = json!({"update_id": 1, "message": {"message_id": 1, "date": 1,
        "chat": private_chat(5, "Ana"), "from": user(5, "Ana"), "text": "forged"}});
    for secret in [None, Some("wrong"), Some("s3cret-Token_")] {
        let mut request = http.post(&url).json(&update);
        if let Some(secret) = secret {
            request = request.header("X-Telegram-Bot-Api-Secret-Token", secret);
        }
        assert_eq!(
            request.send().await.unwrap().status(),
            401,
            "secret {secret:?}"
        );
    }
    let stream = stack
        .bus
        .jetstream()
        .get_stream(subject::STREAM_IN)
        .await
        .unwrap();
    let mut stream = stream;
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        0,
        "a refused update was published"
    );
    // Telegram itself delivers with the registered secret.
    fake.push_text(
        &token,
        &private_chat(5, "Ana"),
        &user(5, "Ana"),
        "via webhook",
    );
    reply(&fake, "via webhook").await;
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
}

#[tokio::test]
async fn a_photo_reaches_the_bridge_through_the_object_store_and_a_document_goes_out() {
    let stack = Stack::start().await;
    let fake = FakeTelegram::start().await;
    let token = fake.add_bot(BOT_ID, BOT_NAME);
    let mut tg = config(&fake, &[&token]);
    tg.max_file_bytes = 1000;
    let _bridge = stack.echo_bridge().await;
    let _ingress = stack.telegram_ingress(tg.clone()).await;
    let _egress = stack.telegram_egress(tg).await;
    let mut inbound = collect::<InboundMessage>(&stack.bus, "hg.in.telegram.>").await;
    let photo: Vec<u8> = (0..700u32).map(|i| (i % 251) as u8).collect();
    let (file_id, unique) = fake.add_file(photo.clone(), "photos/file_1.jpg");
    let (big_id, big_unique) = fake.add_file(vec![0; 5000], "documents/big.bin");
    let chat = private_chat(5, "Ana");
    fake.push_message(&token, &chat, &user(5, "Ana"), json!({
        "caption": "look at this",
        "photo": [
            {"file_id": "thumb", "file_unique_id": "t", "file_size": 10, "width": 90, "height": 90},
            {"file_id": file_id, "file_unique_id": unique, "file_size": 700, "width": 800, "height": 600}
        ]
    }));
    let message = next(&mut inbound, "the photo message").await;
    assert_eq!(message.text, "look at this");
    assert_eq!(message.attachments.len(), 1);
    let attachment = &message.attachments[0];
    assert_eq!(attachment.mime_type, "image/jpeg");
    assert_eq!(attachment.size_bytes, 700);
    let store = stack
        .bus
        .jetstream()
        .get_object_store("hg_files")
        .await
        .unwrap();
    let mut object = store.get(&attachment.object_key).await.unwrap();
    let mut stored = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut object, &mut stored)
        .await
        .unwrap();
    assert_eq!(stored, photo);
    // The bridge read it from the object store and handed it to the agent
    // (the echo runtime lists the files it got).
    fake.wait_sent(WAIT, |s| {
        s.iter()
            .any(|m| m.visible_text.contains("image/jpeg, 700 bytes"))
    })
    .await
    .expect("the agent received the photo's bytes");

    // Too large: not passed on, and the user is told.
    fake.push_message(&token, &chat, &user(5, "Ana"), json!({
        "document": {"file_id": big_id, "file_unique_id": big_unique, "file_name": "big.bin", "file_size": 5000}
    }));
    let notice = fake
        .wait_sent(WAIT, |s| {
            s.iter().any(|m| m.visible_text.contains("big.bin"))
        })
        .await
        .expect("the user is told the file was too large");
    assert!(notice.iter().any(|m| m.visible_text.starts_with("⚠️")));

    // A document out, from the object store, with its caption.
    let report = b"quarterly numbers\n".repeat(20);
    let mut reader: &[u8] = &report;
    store.put("out/report.txt", &mut reader).await.unwrap();
    let out = OutboundMessage {
        id: "doc-1".into(),
        platform: "telegram".into(),
        app_id: BOT_ID.to_string(),
        channel_id: "5".into(),
        text: "the **report**".into(),
        kind: OutboundKind::Reply as i32,
        attachments: vec![Attachment {
            file_name: "report.txt".into(),
            mime_type: "text/plain".into(),
            object_key: "out/report.txt".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    stack
        .bus
        .publish(
            &subject::outbound("telegram", &BOT_ID.to_string()),
            &out,
            Some("doc-1"),
        )
        .await
        .unwrap();
    let sent = fake
        .wait_sent(WAIT, |s| s.iter().any(|m| m.method == "senddocument"))
        .await
        .expect("the document was sent");
    let document = sent.iter().find(|m| m.method == "senddocument").unwrap();
    assert_eq!(
        document.file,
        Some(("report.txt".to_owned(), report.clone()))
    );
    assert_eq!(document.text, "the <b>report</b>");
    assert_eq!(document.visible_text, "the report");
}

fn outbound(id: &str, kind: OutboundKind, text: &str) -> OutboundMessage {
    hg_e2e::telegram::outbound(BOT_ID, 5, id, kind, text)
}

#[tokio::test]
async fn a_button_press_reaches_the_bridge_and_the_callback_is_answered() {
    let w = world().await;
    let mut inbound = collect::<InboundMessage>(&w.stack.bus, "hg.in.telegram.>").await;
    let mut question = outbound("q-1", OutboundKind::ApprovalRequest, "Run `rm -rf build`?");
    question.buttons = vec![
        Button {
            action_id: "approval:tool_use_0123456789abcdef0123456789abcdef:allow".into(),
            label: "Allow".into(),
            value: "yes".into(),
            ..Default::default()
        },
        Button {
            action_id: "approval:tool_use_0123456789abcdef0123456789abcdef:deny".into(),
            label: "Deny".into(),
            value: "no".into(),
            ..Default::default()
        },
    ];
    hg_e2e::publish_outbound(&w.stack.bus, &question).await;
    let asked = reply(&w.fake, "Run rm -rf build?").await;
    let keyboard = asked.reply_markup.clone().expect("an inline keyboard");
    let buttons = keyboard["inline_keyboard"][0].as_array().unwrap();
    assert_eq!(buttons.len(), 2);
    assert_eq!(buttons[0]["text"], "Allow");
    let data = buttons[0]["callback_data"].as_str().unwrap();
    assert!(data.len() <= 64, "callback data of {} bytes", data.len());

    w.fake
        .push_callback(&w.token, &user(5, "Ana"), &asked.json, data);
    let press = next(&mut inbound, "the button press").await;
    let button = press.button_press.expect("a button press");
    assert_eq!(
        button.action_id,
        "approval:tool_use_0123456789abcdef0123456789abcdef:allow"
    );
    assert_eq!(button.value, "yes");
    assert_eq!(button.message_id, asked.message_id.to_string());
    assert_eq!(press.sender.unwrap().id, "5");
    // The echo agent got it as a button press and answered.
    reply(
        &w.fake,
        "[button approval:tool_use_0123456789abcdef0123456789abcdef:allow: yes]",
    )
    .await;
    let deadline = Instant::now() + WAIT;
    while w.fake.calls("answerCallbackQuery").is_empty() {
        assert!(Instant::now() < deadline, "the callback was not answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An unknown button is answered with a notice and not passed on.
    w.fake
        .push_callback(&w.token, &user(5, "Ana"), &asked.json, "b:unknown");
    let deadline = Instant::now() + WAIT;
    while w.fake.calls("answerCallbackQuery").len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the stale callback was not answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stale = &w.fake.calls("answerCallbackQuery")[1];
    assert_eq!(stale.params["text"], "This button is no longer active.");
}

#[tokio::test]
async fn typing_is_refreshed_until_the_reply_and_edits_replace_text() {
    let w = world().await;
    hg_e2e::publish_outbound(&w.stack.bus, &outbound("t-1", OutboundKind::Typing, "")).await;
    let deadline = Instant::now() + WAIT;
    while w.fake.calls("sendChatAction").len() < 3 {
        assert!(Instant::now() < deadline, "typing was not refreshed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hg_e2e::publish_outbound(
        &w.stack.bus,
        &outbound("r-1", OutboundKind::Reply, "first *draft*"),
    )
    .await;
    let first = reply(&w.fake, "first draft").await;
    let after_reply = w.fake.calls("sendChatAction").len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        w.fake.calls("sendChatAction").len() <= after_reply + 1,
        "typing kept going after the reply"
    );

    let mut receipts = collect::<DeliveryReceipt>(&w.stack.bus, "hg.receipt.telegram.>").await;
    let mut edit = outbound("e-1", OutboundKind::Edit, "final **text**");
    edit.edit_of = "r-1".into();
    hg_e2e::publish_outbound(&w.stack.bus, &edit).await;
    let edited = w
        .fake
        .wait_sent(WAIT, |s| s.iter().any(|m| m.method == "editmessagetext"))
        .await
        .expect("an edit");
    let edited = edited
        .iter()
        .find(|m| m.method == "editmessagetext")
        .unwrap();
    assert_eq!(edited.message_id, first.message_id);
    assert_eq!(edited.text, "final <b>text</b>");
    assert!(next(&mut receipts, "the edit's receipt").await.delivered);
    // The same edit again: Telegram says "not modified", which is success.
    let mut again = edit.clone();
    again.id = "e-2".into();
    hg_e2e::publish_outbound(&w.stack.bus, &again).await;
    let receipt = next(&mut receipts, "the repeated edit's receipt").await;
    assert!(receipt.delivered, "{receipt:?}");
    assert_eq!(receipt.platform_message_ids, [first.message_id.to_string()]);
    assert!(dead_letters(&w.stack.bus).await.is_empty());
}
