//! The bridge driving Claude Managed Agents (the fake server speaking the
//! SDK's wire format) behind the web chat, through real NATS.

use std::time::Duration;

use futures::StreamExt;
use hg_bridge::routing::Route;
use hg_bridge::{BridgeConfig, Providers};
use hg_e2e::{
    Component, Stack, WebUser, claude_config, claude_providers, dead_letters, fast_bridge_config,
};
use hg_proto::{AgentEvent, agent_event};
use hg_testkit::fake_claude::{Endpoint, FakeClaude};

const WAIT: Duration = Duration::from_secs(15);

fn claude(base_url: &str) -> Providers {
    claude_providers(claude_config(base_url))
}

fn claude_route() -> BridgeConfig {
    BridgeConfig {
        default_route: Some(Route {
            runtime: "claude".into(),
            agent_id: "agent_test".into(),
            environment_id: "env_test".into(),
            ..Route::default()
        }),
        ..fast_bridge_config()
    }
}

async fn claude_bridge(stack: &Stack, fake_url: &str) -> Component {
    stack.bridge(claude_route(), claude(fake_url)).await
}

#[tokio::test]
async fn a_web_message_is_answered_by_claude_and_observers_see_the_agents_events() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let _bridge = claude_bridge(&stack, &fake.base_url()).await;
    let (_web, url) = stack.default_web().await;
    let mut observed = stack.bus.client().subscribe("hg.events.>").await.unwrap();
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("hello claude").await;
    let reply = events.next_message(WAIT).await.expect("reply");
    assert_eq!(reply.kind, "reply");
    assert_eq!(reply.text, "echo: hello claude");
    let sessions = fake.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(fake.user_messages(&sessions[0]), vec!["hello claude"]);

    let mut kinds = Vec::new();
    while let Ok(Some(msg)) =
        tokio::time::timeout(Duration::from_millis(500), observed.next()).await
    {
        let event: AgentEvent = hg_bus::decode(&msg.payload).unwrap();
        kinds.push(match event.event.unwrap() {
            agent_event::Event::Thinking(_) => "thinking",
            agent_event::Event::Status(s) => {
                if s.state == "idle" {
                    "idle"
                } else {
                    "running"
                }
            }
            agent_event::Event::Message(_) => "message",
            agent_event::Event::Usage(_) => "usage",
            _ => "other",
        });
    }
    for kind in ["running", "thinking", "message", "usage", "idle"] {
        assert!(kinds.contains(&kind), "{kind} not observed in {kinds:?}");
    }
}

#[tokio::test]
async fn a_restarted_bridge_continues_the_same_runtime_session() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let bridge = claude_bridge(&stack, &fake.base_url()).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("first").await;
    assert_eq!(events.next_message(WAIT).await.unwrap().text, "echo: first");
    bridge.stop().await;

    let _bridge = claude_bridge(&stack, &fake.base_url()).await;
    user.send("second").await;
    assert_eq!(
        events.next_message(WAIT).await.unwrap().text,
        "echo: second"
    );
    let sessions = fake.sessions();
    assert_eq!(
        sessions.len(),
        1,
        "no new runtime session after the restart"
    );
    assert_eq!(fake.user_messages(&sessions[0]), vec!["first", "second"]);
}

#[tokio::test]
async fn a_bridge_killed_mid_turn_resumes_the_turn_without_sending_it_twice() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    // A custom tool that takes a while: the turn is in flight when the
    // bridge dies.
    let mut tool = stack
        .bus
        .client()
        .subscribe("hg.tool.lookup")
        .await
        .unwrap();
    let client = stack.bus.client().clone();
    tokio::spawn(async move {
        while let Some(request) = tool.next().await {
            tokio::time::sleep(Duration::from_millis(800)).await;
            if let Some(reply) = request.reply {
                let _ = client.publish(reply, "42 results".into()).await;
            }
        }
    });
    let bridge = claude_bridge(&stack, &fake.base_url()).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("custom:rust").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    bridge.kill().await;

    let _bridge = claude_bridge(&stack, &fake.base_url()).await;
    let mut got = vec![
        events
            .next_message(WAIT)
            .await
            .expect("the resumed turn's reply"),
    ];
    got.extend(events.collect(Duration::from_secs(2)).await);
    let replies: Vec<_> = got
        .iter()
        .filter(|e| e.kind == "reply")
        .map(|e| e.text.as_str())
        .collect();
    assert_eq!(replies, vec!["custom result: 42 results"], "{got:?}");
    let sessions = fake.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(
        fake.user_messages(&sessions[0]),
        vec!["custom:rust"],
        "the message reached the agent once"
    );
}

#[tokio::test]
async fn a_runtime_stream_dropped_mid_turn_is_caught_up_and_answered_once() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let _bridge = claude_bridge(&stack, &fake.base_url()).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    fake.drop_stream_after(2);
    user.send("through a flaky stream").await;
    let got = events.collect(Duration::from_secs(5)).await;
    let texts: Vec<_> = got.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(texts, vec!["echo: through a flaky stream"]);
}

#[tokio::test]
async fn a_runtime_that_is_down_gets_the_user_told_and_the_message_dead_lettered() {
    let stack = Stack::start().await;
    let closed = format!("http://127.0.0.1:{}", hg_testkit::nats::free_port());
    let config = BridgeConfig {
        max_attempts: 2,
        ..claude_route()
    };
    let _bridge = stack.bridge(config, claude(&closed)).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("anyone there?").await;
    let first = events.next_message(WAIT).await.expect("retry notice");
    assert_eq!(first.kind, "status");
    assert!(first.text.contains("unavailable"), "{}", first.text);
    let second = events.next_message(WAIT).await.expect("give-up notice");
    assert!(second.text.contains("not processed"), "{}", second.text);
    let letters = dead_letters(&stack.bus).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].service, "bridge");
    assert!(
        letters[0].reason.contains("runtime unavailable"),
        "{}",
        letters[0].reason
    );
    let original: hg_proto::InboundMessage = hg_bus::decode(&letters[0].payload).unwrap();
    assert_eq!(original.text, "anyone there?", "the message itself is kept");
}

#[tokio::test]
async fn server_errors_are_retried_and_the_message_is_answered_once_the_runtime_recovers() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let _bridge = claude_bridge(&stack, &fake.base_url()).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    // More 500s than the provider retries by itself: the bridge must retry.
    fake.fail_next(Endpoint::CreateSession, 500, None, 4);
    user.send("eventually").await;
    let got = events.collect(Duration::from_secs(6)).await;
    let kinds: Vec<_> = got
        .iter()
        .map(|e| (e.kind.as_str(), e.text.as_str()))
        .collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert_eq!(kinds[0].0, "status");
    assert_eq!(kinds[1], ("reply", "echo: eventually"));
    assert!(dead_letters(&stack.bus).await.is_empty());
}

#[tokio::test]
async fn agent_errors_reach_the_user_as_a_short_message() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let _bridge = claude_bridge(&stack, &fake.base_url()).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("error:").await;
    let reply = events.next_message(WAIT).await.unwrap();
    assert_eq!(reply.kind, "status");
    assert!(
        reply.text.starts_with("⚠️ The agent ran into a problem"),
        "{}",
        reply.text
    );
    user.send("refuse:").await;
    let reply = events.next_message(WAIT).await.unwrap();
    assert!(reply.text.contains("⚠️"), "{}", reply.text);
}
