//! Approvals on Telegram: the agent's tool request arrives as a message
//! with an inline keyboard; a press (or a text reply) decides it, the
//! message is edited to show who decided, and the agent goes on — through
//! the fake Bot API, real NATS, the bridge and the fake Managed Agents API.

use std::time::Duration;

use hg_bridge::BridgeConfig;
use hg_bridge::routing::Route;
use hg_e2e::{Component, Stack, claude_config, claude_providers, fast_bridge_config};
use hg_testkit::fake_claude::FakeClaude;
use hg_testkit::fake_telegram::{FakeTelegram, Sent, private_chat, supergroup, user};

const WAIT: Duration = Duration::from_secs(20);
const BOT_ID: i64 = 2002;

struct World {
    _stack: Stack,
    claude: FakeClaude,
    telegram: FakeTelegram,
    token: String,
    _bridge: Component,
    _parts: Vec<Component>,
}

async fn world(approvers: Vec<String>) -> World {
    let stack = Stack::start().await;
    let claude = FakeClaude::start().await;
    let telegram = FakeTelegram::start().await;
    let token = telegram.add_bot(BOT_ID, "ops_bot");
    let bridge = stack
        .bridge(
            BridgeConfig {
                default_route: Some(Route {
                    runtime: "claude".into(),
                    agent_id: "agent_ops".into(),
                    environment_id: "env_ops".into(),
                    approvers,
                    ..Route::default()
                }),
                ..fast_bridge_config()
            },
            claude_providers(claude_config(&claude.base_url())),
        )
        .await;
    // The bridge publishes its command list; the ingress advertises it.
    let meta = stack
        .bus
        .kv(hg_bus::kv_config(
            hg_bridge::META_BUCKET,
            "facts components share",
        ))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !matches!(meta.get(hg_bridge::META_COMMANDS).await, Ok(Some(_))) {
        assert!(tokio::time::Instant::now() < deadline, "no command list");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let config = hg_e2e::telegram::config(&telegram, &[&token]);
    let parts = vec![
        stack.telegram_ingress(config.clone()).await,
        stack.telegram_egress(config).await,
    ];
    World {
        _stack: stack,
        claude,
        telegram,
        token,
        _bridge: bridge,
        _parts: parts,
    }
}

/// The first message the bot sent or edited, after `skip` such messages,
/// whose visible text contains `needle`.
async fn sent_with(fake: &FakeTelegram, method: &str, needle: &str) -> Sent {
    let sent = fake
        .wait_sent(WAIT, |sent| {
            sent.iter()
                .any(|s| s.method == method && s.visible_text.contains(needle))
        })
        .await
        .unwrap_or_else(|| panic!("no {method} with {needle:?}: {:?}", texts(fake)));
    sent.into_iter()
        .find(|s| s.method == method && s.visible_text.contains(needle))
        .unwrap()
}

fn texts(fake: &FakeTelegram) -> Vec<String> {
    fake.sent()
        .iter()
        .map(|s| format!("{}: {}", s.method, s.visible_text))
        .collect()
}

/// Message fields of a group message that mentions the bot.
fn mention(text: &str) -> serde_json::Value {
    serde_json::json!({"text": text, "entities": [{"type": "mention", "offset": 0, "length": 8}]})
}

/// The callback data of the inline button labelled `label`.
fn callback(message: &Sent, label: &str) -> String {
    let keyboard = message.reply_markup.as_ref().expect("an inline keyboard");
    keyboard["inline_keyboard"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap())
        .find(|b| b["text"] == label)
        .and_then(|b| b["callback_data"].as_str())
        .unwrap_or_else(|| panic!("no {label} button in {keyboard}"))
        .to_owned()
}

#[tokio::test]
async fn a_tool_request_is_allowed_with_an_inline_button() {
    let w = world(Vec::new()).await;
    let ana = user(5, "Ana");
    w.telegram
        .push_text(&w.token, &private_chat(5, "Ana"), &ana, "tool:deploy prod");
    let request = sent_with(&w.telegram, "sendmessage", "The agent wants to use bash").await;
    assert!(
        request.visible_text.contains("command: deploy prod"),
        "{}",
        request.visible_text
    );
    let data = callback(&request, "Allow");
    assert!(data.len() <= 64);
    w.telegram
        .push_callback(&w.token, &ana, &request.json, &data);

    let edited = sent_with(&w.telegram, "editmessagetext", "Allowed by @ana").await;
    assert_eq!(
        edited.message_id, request.message_id,
        "the request message is edited"
    );
    assert!(
        edited
            .reply_markup
            .as_ref()
            .is_none_or(|m| m["inline_keyboard"]
                .as_array()
                .is_none_or(|rows| rows.is_empty())),
        "the buttons are gone: {:?}",
        edited.reply_markup
    );
    sent_with(&w.telegram, "sendmessage", "done: deploy prod").await;
    assert_eq!(
        w.claude.tool_confirmations(),
        vec![("allow".to_owned(), None)]
    );
    assert!(!w.telegram.calls("answerCallbackQuery").is_empty());
}

#[tokio::test]
async fn a_text_reply_denies_with_a_reason_and_non_approvers_are_refused_in_groups() {
    let w = world(vec!["7".into()]).await;
    let group = supergroup(-100_500, "ops", false);
    let ana = user(5, "Ana");
    let boss = user(7, "Boss");
    w.telegram.push_message(
        &w.token,
        &group,
        &ana,
        mention("@ops_bot tool:drop table users"),
    );
    let request = sent_with(&w.telegram, "sendmessage", "The agent wants to use bash").await;
    // Ana is not on the approvers list: her press is refused.
    let data = callback(&request, "Allow");
    w.telegram
        .push_callback(&w.token, &ana, &request.json, &data);
    sent_with(&w.telegram, "sendmessage", "only approvers can answer").await;
    assert!(w.claude.tool_confirmations().is_empty());
    // The approver answers in text, replying to the bot.
    w.telegram.push_message(
        &w.token,
        &group,
        &boss,
        mention("@ops_bot deny: never on production"),
    );
    let edited = sent_with(&w.telegram, "editmessagetext", "Denied by @boss").await;
    assert!(
        edited.visible_text.contains("never on production"),
        "{}",
        edited.visible_text
    );
    sent_with(&w.telegram, "sendmessage", "done: drop table users").await;
    assert_eq!(
        w.claude.tool_confirmations(),
        vec![("deny".to_owned(), Some("never on production".to_owned()))]
    );
}

#[tokio::test]
async fn the_bots_command_menu_lists_the_bridges_commands() {
    let w = world(Vec::new()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let call = loop {
        if let Some(call) = w.telegram.calls("setMyCommands").pop() {
            break call;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "setMyCommands was not called"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let names: Vec<&str> = call.params["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["command"].as_str().unwrap())
        .collect();
    for name in ["help", "status", "new", "stop", "usage", "list", "attach"] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    assert!(call.error.is_none(), "accepted: {:?}", call.error);
}
