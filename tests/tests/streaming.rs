//! Streaming delivery: with `delivery = "streaming"` the user sees one
//! message grow while the agent writes (Claude `event_deltas`), throttled,
//! and it ends with the full text — on the web chat and on Telegram.

use std::time::Duration;

use hg_bridge::BridgeConfig;
use hg_bridge::provider::claude::ClaudeConfig;
use hg_bridge::routing::{DeliveryMode, Route};
use hg_e2e::{Component, Stack, WebUser, claude_config, claude_providers, fast_bridge_config};
use hg_testkit::fake_claude::FakeClaude;
use hg_testkit::fake_telegram::{FakeTelegram, private_chat, user};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

fn bridge_config(delivery: DeliveryMode) -> BridgeConfig {
    BridgeConfig {
        default_route: Some(Route {
            runtime: "claude".into(),
            agent_id: "agent_s".into(),
            environment_id: "env_s".into(),
            delivery,
            ..Route::default()
        }),
        stream_interval: Duration::from_millis(150),
        ..fast_bridge_config()
    }
}

/// The agent writes "The answer is forty-two." slowly, in pieces, then
/// finishes the turn: the test plays the runtime's side.
async fn write_slowly(fake: &FakeClaude) {
    let session = loop {
        if let Some(session) = fake.sessions().pop()
            && fake.user_messages(&session).iter().any(|m| m == "tell me")
        {
            break session;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Let the bridge's stream see the turn start.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let frame = |kind: &str, data: serde_json::Value| format!("event: {kind}\ndata: {data}\n\n");
    fake.inject_raw(
        &session,
        &frame(
            "event_start",
            json!({"type": "event_start", "event": {"id": "sevt_live", "type": "agent.message"}}),
        ),
    );
    for piece in ["The answer ", "is forty", "-two."] {
        fake.inject_raw(
            &session,
            &frame(
                "event_delta",
                json!({"type": "event_delta", "event_id": "sevt_live",
                    "delta": {"type": "content_delta", "content": {"type": "text", "text": piece}}}),
            ),
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    fake.inject_event(
        &session,
        json!({"type": "agent.message", "content": [{"type": "text", "text": "The answer is forty-two."}]}),
    );
    fake.inject_event(
        &session,
        json!({"type": "session.status_idle", "stop_reason": {"type": "end_turn"}}),
    );
}

/// A fake runtime that keeps the turn of "tell me" open for
/// [`write_slowly`], and a bridge delivering in `delivery` with Claude's
/// deltas on.
async fn slow_agent(stack: &Stack, delivery: DeliveryMode) -> (FakeClaude, Component) {
    let fake = FakeClaude::start().await;
    fake.set_reply(|text| {
        (text == "tell me").then(|| vec![json!({"type": "session.status_running"})])
    });
    let bridge = stack
        .bridge(
            bridge_config(delivery),
            claude_providers(ClaudeConfig {
                stream_deltas: true,
                ..claude_config(&fake.base_url())
            }),
        )
        .await;
    (fake, bridge)
}

#[tokio::test]
async fn a_streaming_reply_grows_in_the_browser_and_ends_with_the_full_text() {
    let stack = Stack::start().await;
    let (fake, _bridge) = slow_agent(&stack, DeliveryMode::Streaming).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("tell me").await;
    write_slowly(&fake).await;
    let mut seen = Vec::new();
    loop {
        let event = events.next_message(WAIT).await.expect("stream updates");
        if event.kind != "reply" && event.kind != "edit" {
            continue;
        }
        seen.push((
            event.kind.clone(),
            event.outbound_id.clone(),
            event.text.clone(),
        ));
        if event.text == "The answer is forty-two." {
            break;
        }
    }
    assert_eq!(
        seen[0].0, "reply",
        "the first update is a new message: {seen:?}"
    );
    assert!(seen.len() >= 3, "the message grew in steps: {seen:?}");
    assert!(
        seen[1..]
            .iter()
            .all(|(kind, id, _)| kind == "edit" && *id == seen[0].1),
        "{seen:?}"
    );
    for (_, _, text) in &seen {
        assert!(
            "The answer is forty-two.".starts_with(text.as_str()),
            "{text:?}"
        );
    }
}

#[tokio::test]
async fn buffered_routes_still_get_one_message() {
    let stack = Stack::start().await;
    let (fake, _bridge) = slow_agent(&stack, DeliveryMode::Buffered).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("tell me").await;
    write_slowly(&fake).await;
    let replies: Vec<_> = events
        .collect(Duration::from_millis(800))
        .await
        .into_iter()
        .filter(|e| e.kind == "reply" || e.kind == "edit")
        .collect();
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].text, "The answer is forty-two.");
}

#[tokio::test]
async fn on_telegram_the_message_is_edited_as_the_agent_writes() {
    let stack = Stack::start().await;
    let (fake, _bridge) = slow_agent(&stack, DeliveryMode::Streaming).await;
    let telegram = FakeTelegram::start().await;
    let token = telegram.add_bot(3003, "stream_bot");
    let config = hg_e2e::telegram::config(&telegram, &[&token]);
    let _ingress = stack.telegram_ingress(config.clone()).await;
    let _egress = stack.telegram_egress(config).await;

    telegram.push_text(&token, &private_chat(9, "Ida"), &user(9, "Ida"), "tell me");
    write_slowly(&fake).await;
    let sent = telegram
        .wait_sent(WAIT, |sent| {
            sent.iter()
                .any(|s| s.visible_text == "The answer is forty-two.")
        })
        .await
        .expect("the full text arrives");
    let texts: Vec<(&str, &str)> = sent
        .iter()
        .filter(|s| s.chat_id == 9)
        .map(|s| (s.method.as_str(), s.visible_text.as_str()))
        .collect();
    assert_eq!(texts[0].0, "sendmessage", "{texts:?}");
    assert!(texts.len() >= 3, "edited as it grew: {texts:?}");
    assert!(
        texts[1..].iter().all(|(m, _)| *m == "editmessagetext"),
        "{texts:?}"
    );
    let first = sent.iter().find(|s| s.chat_id == 9).unwrap().message_id;
    assert!(
        sent.iter()
            .filter(|s| s.chat_id == 9)
            .all(|s| s.message_id == first)
    );
}
