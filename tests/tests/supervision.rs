//! Supervising the agent from chat: approvals by button and by text,
//! grants, timeouts, approvers, commands and pairing — through real NATS,
//! the bridge, the web chat and the fake Managed Agents server.

use std::time::Duration;

use futures::StreamExt;
use hg_bridge::BridgeConfig;
use hg_bridge::access::{AccessMode, PairingStore};
use hg_bridge::approvals::{Grant, GrantScope, GrantStore, Verdict};
use hg_bridge::clock::ManualClock;
use hg_bridge::commands::CustomCommand;
use hg_bridge::routing::Route;
use hg_e2e::{Stack, WebUser, claude_config, claude_providers, fast_bridge_config};
use hg_proto::{
    AgentEvent, ButtonPress, ChatType, InboundMessage, OutboundKind, OutboundMessage, Sender,
    agent_event, subject,
};
use hg_testkit::fake_claude::FakeClaude;
use hg_web::hub::WebEvent;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

fn config() -> BridgeConfig {
    let mut config = BridgeConfig {
        default_route: Some(Route {
            runtime: "claude".into(),
            agent_id: "agent_test".into(),
            environment_id: "env_test".into(),
            ..Route::default()
        }),
        ..fast_bridge_config()
    };
    config.approvals.sweep_interval = Duration::from_millis(100);
    config.approvals.notice_window = Duration::from_millis(300);
    config
}

fn button<'a>(event: &'a WebEvent, label_prefix: &str) -> &'a hg_web::hub::WebButton {
    event
        .buttons
        .iter()
        .find(|b| b.label.starts_with(label_prefix))
        .unwrap_or_else(|| panic!("no {label_prefix} button in {:?}", event.buttons))
}

#[tokio::test]
async fn a_tool_request_is_approved_by_button_and_the_message_shows_who_decided() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let _bridge = stack
        .bridge(config(), claude_providers(claude_config(&fake.base_url())))
        .await;
    let (_web, url) = stack.default_web().await;
    let mut audit = stack.bus.client().subscribe("hg.events.>").await.unwrap();
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;

    user.send("tool:rm -rf build").await;
    let request = events.next_kind("approval_request", WAIT).await;
    assert!(request.text.contains("bash"), "{}", request.text);
    assert!(
        request.text.contains("command: rm -rf build"),
        "{}",
        request.text
    );
    let labels: Vec<&str> = request.buttons.iter().map(|b| b.label.as_str()).collect();
    assert_eq!(labels.len(), 4, "{labels:?}");
    assert!(fake.tool_confirmations().is_empty(), "nothing decided yet");

    user.press(button(&request, "Allow")).await;
    let edit = events.next_kind("edit", WAIT).await;
    assert_eq!(
        edit.outbound_id, request.outbound_id,
        "the approval message is edited"
    );
    assert!(edit.text.contains("✅ Allowed by"), "{}", edit.text);
    assert!(edit.buttons.is_empty(), "no buttons after the decision");
    let reply = events.next_kind("reply", WAIT).await;
    assert_eq!(reply.text, "done: rm -rf build");
    assert_eq!(fake.tool_confirmations(), vec![("allow".to_owned(), None)]);

    // Both the request and the decision are on the audit trail.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < 2 && tokio::time::Instant::now() < deadline {
        let Ok(Some(msg)) = tokio::time::timeout(WAIT, audit.next()).await else {
            break;
        };
        let event: AgentEvent = hg_bus::decode(&msg.payload).unwrap();
        match event.event {
            Some(agent_event::Event::ApprovalRequest(r)) => {
                seen.push(format!("request {}", r.tool.unwrap().name))
            }
            Some(agent_event::Event::ApprovalDecision(d)) => {
                assert_eq!(d.decided_by, user.user_id);
                seen.push(format!("decision {}", d.allowed))
            }
            _ => {}
        }
    }
    assert_eq!(seen, ["request bash", "decision true"]);
}

#[tokio::test]
async fn every_text_form_reaches_the_agent_as_exactly_that_decision() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let _bridge = stack
        .bridge(config(), claude_providers(claude_config(&fake.base_url())))
        .await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    let forms: &[(&str, &str, Option<&str>)] = &[
        ("allow", "allow", None),
        ("yes", "allow", None),
        ("approve", "allow", None),
        ("proceed", "allow", None),
        ("continue", "allow", None),
        ("ok", "allow", None),
        ("1", "allow", None),
        ("deny", "deny", None),
        ("no", "deny", None),
        ("reject", "deny", None),
        ("cancel", "deny", None),
        ("stop", "deny", None),
        ("abort", "deny", None),
        ("2", "deny", None),
        (
            "deny: use the staging database",
            "deny",
            Some("use the staging database"),
        ),
        ("deny not on Fridays", "deny", Some("not on Fridays")),
    ];
    for (i, (form, result, reason)) in forms.iter().enumerate() {
        user.send(&format!("tool:step {i}")).await;
        events.next_kind("approval_request", WAIT).await;
        user.send(form).await;
        let edit = events.next_kind("edit", WAIT).await;
        let icon = if *result == "allow" { "✅" } else { "🚫" };
        assert!(edit.text.contains(icon), "{form}: {}", edit.text);
        events.next_kind("reply", WAIT).await;
        let got = fake.tool_confirmations().pop().unwrap();
        assert_eq!(
            got,
            (result.to_string(), reason.map(str::to_owned)),
            "form {form:?}"
        );
    }
    // Something else while a request is pending is not taken as an answer.
    user.send("tool:final").await;
    events.next_kind("approval_request", WAIT).await;
    user.send("what does it do?").await;
    let nudge = events.next_kind("status", WAIT).await;
    assert!(
        nudge.text.contains("waiting for a decision"),
        "{}",
        nudge.text
    );
    assert_eq!(fake.tool_confirmations().len(), forms.len());
}

#[tokio::test]
async fn grants_let_tools_through_until_they_expire_and_never_auto_tools_still_ask() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let clock = ManualClock::new();
    let _bridge = stack
        .bridge_with_clock(
            config(),
            claude_providers(claude_config(&fake.base_url())),
            clock.clone(),
        )
        .await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;

    user.send("tool:first").await;
    let request = events.next_kind("approval_request", WAIT).await;
    user.press(button(&request, "Allow all")).await;
    events.next_kind("reply", WAIT).await;

    // Three tools at once: auto-approved, announced in one message.
    user.send("tools:3").await;
    let notice = events.next_kind("status", WAIT).await;
    assert!(
        notice.text.contains("auto-approved 3 tools"),
        "{}",
        notice.text
    );
    assert!(
        notice.text.contains("Allow all, 30 min left"),
        "{}",
        notice.text
    );
    let reply = events.next_kind("reply", WAIT).await;
    assert_eq!(reply.text, "done: tools:3");
    assert_eq!(fake.tool_confirmations().len(), 4);

    // /status shows the grant.
    user.send("/status").await;
    let status = events.next_kind("status", WAIT).await;
    assert!(
        status.text.contains("Grant: Allow all (30 min left)"),
        "{}",
        status.text
    );

    // 31 minutes later the grant is over: asked again.
    clock.advance(Duration::from_secs(31 * 60));
    user.send("tool:later").await;
    let request = events.next_kind("approval_request", WAIT).await;
    assert!(request.text.contains("later"));

    // "allow bash": this tool for the session.
    user.send("allow bash").await;
    events.next_kind("reply", WAIT).await;
    user.send("tool:again").await;
    let notice = events.next_kind("status", WAIT).await;
    assert!(
        notice
            .text
            .contains("auto-approved 1 tool: bash (Allow bash"),
        "{}",
        notice.text
    );
    events.next_kind("reply", WAIT).await;
}

#[tokio::test]
async fn never_auto_approve_tools_ask_despite_a_grant() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let mut config = config();
    config.approvals.never_auto_approve = vec!["bash".into()];
    let clock = ManualClock::new();
    let _bridge = stack
        .bridge_with_clock(
            config,
            claude_providers(claude_config(&fake.base_url())),
            clock.clone(),
        )
        .await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    // A grant for everything in this conversation, stored as a replica would.
    let grants = GrantStore::open(&stack.bus).await.unwrap();
    let key = format!("web:default:dm:{}", user.user_id);
    grants
        .add_session(
            &key,
            Grant {
                scope: GrantScope::All,
                expires_ms: hg_proto::now_ms() + 3_600_000,
                by: "test".into(),
            },
            clock_now(&clock),
        )
        .await
        .unwrap();
    user.send("tool:dangerous").await;
    let request = events.next_kind("approval_request", WAIT).await;
    assert_eq!(
        request.buttons.len(),
        2,
        "no grant buttons for a never-auto tool"
    );
    user.send("allow all").await;
    let refused = events.next_kind("status", WAIT).await;
    assert!(refused.text.contains("always asks"), "{}", refused.text);
    assert!(fake.tool_confirmations().is_empty());
}

fn clock_now(clock: &ManualClock) -> i64 {
    use hg_bridge::clock::Clock;
    clock.now_ms()
}

#[tokio::test]
async fn a_pending_approval_survives_a_bridge_restart() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let bridge = stack
        .bridge(config(), claude_providers(claude_config(&fake.base_url())))
        .await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("tool:migrate").await;
    let request = events.next_kind("approval_request", WAIT).await;
    bridge.kill().await;
    let _bridge = stack
        .bridge(config(), claude_providers(claude_config(&fake.base_url())))
        .await;
    user.press(button(&request, "Deny")).await;
    let edit = events.next_kind("edit", WAIT).await;
    assert!(edit.text.contains("🚫 Denied by"), "{}", edit.text);
    let reply = events.next_kind("reply", WAIT).await;
    assert_eq!(reply.text, "done: migrate");
    assert_eq!(fake.tool_confirmations(), vec![("deny".to_owned(), None)]);
    // A second press is told it was decided already.
    user.press(button(&request, "Allow")).await;
    let late = events.next_kind("status", WAIT).await;
    assert!(
        late.text.contains("Already decided: 🚫 Denied"),
        "{}",
        late.text
    );
    assert_eq!(fake.tool_confirmations().len(), 1);
}

#[tokio::test]
async fn a_timed_out_request_gets_the_configured_outcome() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let clock = ManualClock::new();
    let mut config = config();
    config.approvals.on_timeout_per_tool = [("bash".to_owned(), Verdict::Allow)].into();
    let _bridge = stack
        .bridge_with_clock(
            config,
            claude_providers(claude_config(&fake.base_url())),
            clock.clone(),
        )
        .await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("tool:nightly").await;
    events.next_kind("approval_request", WAIT).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        fake.tool_confirmations().is_empty(),
        "not before the timeout"
    );
    clock.advance(Duration::from_secs(11 * 60));
    let edit = events.next_kind("edit", WAIT).await;
    assert!(edit.text.contains("⌛ Timed out, allowed"), "{}", edit.text);
    events.next_kind("reply", WAIT).await;
    assert_eq!(fake.tool_confirmations(), vec![("allow".to_owned(), None)]);
}

/// A custom ingress for a group chat, straight on the bus.
struct Group {
    bus: hg_bus::Bus,
    outbound: async_nats::Subscriber,
    n: std::sync::atomic::AtomicU32,
}

impl Group {
    async fn new(stack: &Stack) -> Group {
        let outbound = stack
            .bus
            .client()
            .subscribe(subject::outbound("team", "app"))
            .await
            .unwrap();
        Group {
            bus: stack.bus.clone(),
            outbound,
            n: Default::default(),
        }
    }

    async fn say(&self, who: &str, text: &str, press: Option<(&str, &str)>) {
        let n = self.n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let message = InboundMessage {
            id: format!("m{n}"),
            platform: "team".into(),
            app_id: "app".into(),
            channel_id: "room".into(),
            chat_type: ChatType::Group as i32,
            sender: Some(Sender {
                id: who.into(),
                username: who.into(),
                ..Default::default()
            }),
            text: text.into(),
            button_press: press.map(|(action_id, value)| ButtonPress {
                action_id: action_id.into(),
                value: value.into(),
                message_id: String::new(),
            }),
            ..Default::default()
        };
        self.bus
            .publish(
                &subject::inbound("team", "app"),
                &message,
                Some(&message.id),
            )
            .await
            .unwrap();
    }

    async fn next(&mut self, kind: OutboundKind) -> OutboundMessage {
        loop {
            let msg = tokio::time::timeout(WAIT, self.outbound.next())
                .await
                .expect("outbound in time")
                .unwrap();
            let out: OutboundMessage = hg_bus::decode(&msg.payload).unwrap();
            if out.kind() == kind {
                return out;
            }
        }
    }
}

#[tokio::test]
async fn in_a_group_only_approvers_decide() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let mut config = config();
    if let Some(route) = config.default_route.as_mut() {
        route.approvers = vec!["carol".into()];
    }
    let _bridge = stack
        .bridge(config, claude_providers(claude_config(&fake.base_url())))
        .await;
    let mut group = Group::new(&stack).await;
    group.say("ana", "tool:deploy", None).await;
    let request = group.next(OutboundKind::ApprovalRequest).await;
    let allow = request.buttons.iter().find(|b| b.label == "Allow").unwrap();
    // Ana started the turn but is not an approver; Bob neither.
    group
        .say("ana", "Allow", Some((&allow.action_id, &allow.value)))
        .await;
    let refused = group.next(OutboundKind::Status).await;
    assert!(refused.text.contains("only approvers"), "{}", refused.text);
    group.say("bob", "yes", None).await;
    let refused = group.next(OutboundKind::Status).await;
    assert!(
        refused.text.contains("@bob, only approvers"),
        "{}",
        refused.text
    );
    assert!(fake.tool_confirmations().is_empty());
    group
        .say("carol", "Allow", Some((&allow.action_id, &allow.value)))
        .await;
    let edit = group.next(OutboundKind::Edit).await;
    assert!(edit.text.contains("Allowed by @carol"), "{}", edit.text);
    let reply = group.next(OutboundKind::Reply).await;
    assert_eq!(reply.text, "done: deploy");
    assert_eq!(fake.tool_confirmations(), vec![("allow".to_owned(), None)]);
}

#[tokio::test]
async fn commands_answer_and_stop_interrupts_a_running_turn() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let mut config = config();
    config.commands = vec![CustomCommand {
        name: "deploy".into(),
        description: "ship the build".into(),
    }];
    let _bridge = stack
        .bridge(config, claude_providers(claude_config(&fake.base_url())))
        .await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;

    user.send("/help").await;
    let help = events.next_kind("status", WAIT).await;
    for command in [
        "/status",
        "/new",
        "/stop",
        "/usage",
        "/deploy — ship the build",
    ] {
        assert!(help.text.contains(command), "{command} in {}", help.text);
    }

    user.send("hello").await;
    events.next_kind("reply", WAIT).await;
    user.send("!usage").await;
    let usage = events.next_kind("status", WAIT).await;
    assert!(usage.text.contains("model requests"), "{}", usage.text);
    assert!(usage.text.contains("input"), "{}", usage.text);

    // A custom command, answered by a service on hg.command.deploy.
    let mut service = stack
        .bus
        .client()
        .subscribe("hg.command.deploy")
        .await
        .unwrap();
    let client = stack.bus.client().clone();
    tokio::spawn(async move {
        if let Some(request) = service.next().await {
            let inbound: InboundMessage = hg_bus::decode(&request.payload).unwrap();
            let answer = format!("deploying {}", inbound.text);
            client
                .publish(request.reply.unwrap(), answer.into())
                .await
                .unwrap();
        }
    });
    user.send("/deploy prod").await;
    let deployed = events.next_kind("status", WAIT).await;
    assert_eq!(deployed.text, "deploying prod");

    // /new with a directory: Claude has none.
    user.send("/new /tmp").await;
    let refused = events.next_kind("status", WAIT).await;
    assert!(
        refused.text.contains("does not work in a directory"),
        "{}",
        refused.text
    );

    // A turn that keeps running until interrupted.
    fake.set_reply(|text| {
        (text == "long task").then(|| vec![json!({"type": "session.status_running"}), json!({"type": "agent.message", "content": [{"type": "text", "text": "working on it"}]})])
    });
    user.send("long task").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    user.send("/status").await;
    let status = events.next_kind("status", WAIT).await;
    assert!(status.text.contains("State: running"), "{}", status.text);
    user.send("/stop").await;
    let partial = events.next_kind("reply", WAIT).await;
    assert_eq!(partial.text, "working on it\n\n⏹ Stopped.");
    let stopped = events.next_kind("status", WAIT).await;
    assert_eq!(stopped.text, "⏹ Stopped.");
    let session = fake.sessions().pop().unwrap();
    assert!(
        fake.user_events(&session)
            .iter()
            .any(|e| e["type"] == "user.interrupt")
    );

    // /new: a fresh runtime session.
    fake.clear_reply();
    let before = fake.sessions().len();
    user.send("/new").await;
    let fresh = events.next_kind("status", WAIT).await;
    assert!(fresh.text.contains("New session"), "{}", fresh.text);
    assert_eq!(fake.sessions().len(), before + 1);
    user.send("/stop").await;
    let nothing = events.next_kind("status", WAIT).await;
    assert_eq!(nothing.text, "Nothing is running.");
}

#[tokio::test]
async fn stop_cancels_pending_approvals() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let _bridge = stack
        .bridge(config(), claude_providers(claude_config(&fake.base_url())))
        .await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("tools:2").await;
    events.next_kind("approval_request", WAIT).await;
    events.next_kind("approval_request", WAIT).await;
    user.send("/stop").await;
    let mut edits = 0;
    let stopped = loop {
        let event = events.next_message(WAIT).await.expect("events");
        match event.kind.as_str() {
            "edit" => {
                assert!(event.text.contains("Cancelled by"), "{}", event.text);
                edits += 1;
            }
            "status" => break event,
            _ => {}
        }
    };
    assert_eq!(edits, 2);
    assert_eq!(stopped.text, "⏹ Stopped; 2 pending approvals cancelled.");
    assert_eq!(fake.tool_confirmations().len(), 2);
    assert!(fake.tool_confirmations().iter().all(|(r, _)| r == "deny"));
    // The conversation goes on normally.
    user.send("hello again").await;
    assert_eq!(
        events.next_kind("reply", WAIT).await.text,
        "echo: hello again"
    );
}

#[tokio::test]
async fn pairing_keeps_unknown_users_away_until_an_operator_approves() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let mut config = config();
    if let Some(route) = config.default_route.as_mut() {
        route.access = AccessMode::Pairing;
    }
    let _bridge = stack
        .bridge(config, claude_providers(claude_config(&fake.base_url())))
        .await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("hello?").await;
    let told = events.next_kind("status", WAIT).await;
    let code = told
        .text
        .split("**")
        .nth(1)
        .expect("a code in bold")
        .to_owned();
    assert_eq!(code.len(), 8, "{}", told.text);
    user.send("still there?").await;
    let again = events.next_kind("status", WAIT).await;
    assert!(again.text.contains(&code), "the same code while pending");
    assert!(fake.sessions().is_empty(), "nothing reached the agent");

    let pairing = PairingStore::open(&stack.bus).await.unwrap();
    let pending = pairing.pending(hg_proto::now_ms()).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].user_id, user.user_id);
    assert!(
        pairing
            .approve("WRONGCOD", hg_proto::now_ms())
            .await
            .is_err()
    );
    pairing
        .approve(&code.to_lowercase(), hg_proto::now_ms())
        .await
        .unwrap();

    user.send("hello now").await;
    assert_eq!(
        events.next_kind("reply", WAIT).await.text,
        "echo: hello now"
    );
    assert_eq!(fake.sessions().len(), 1);
}

#[tokio::test]
async fn at_most_three_codes_wait_per_app() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let mut config = config();
    if let Some(route) = config.default_route.as_mut() {
        route.access = AccessMode::Pairing;
    }
    let _bridge = stack
        .bridge(config, claude_providers(claude_config(&fake.base_url())))
        .await;
    let (_web, url) = stack.default_web().await;
    for i in 0..4 {
        let user = WebUser::signup(&url).await;
        let mut events = user.events(None).await;
        user.send("hi").await;
        let told = events.next_kind("status", WAIT).await;
        if i < 3 {
            assert!(told.text.contains("pairing code"), "{}", told.text);
        } else {
            assert!(told.text.contains("Too many people"), "{}", told.text);
        }
    }
}

#[tokio::test]
async fn list_and_attach_continue_an_existing_session() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let _bridge = stack
        .bridge(config(), claude_providers(claude_config(&fake.base_url())))
        .await;
    let (_web, url) = stack.default_web().await;
    // Ana's conversation makes a session with some history.
    let ana = WebUser::signup(&url).await;
    let mut ana_events = ana.events(None).await;
    ana.send("the plan is to ship on Friday").await;
    ana_events.next_kind("reply", WAIT).await;
    let ana_session = fake.sessions().pop().unwrap();

    let bob = WebUser::signup(&url).await;
    let mut events = bob.events(None).await;
    bob.send("hi").await;
    events.next_kind("reply", WAIT).await;
    bob.send("/list").await;
    let list = events.next_kind("status", WAIT).await;
    assert!(list.text.contains("1. "), "{}", list.text);
    assert!(list.text.contains("← this chat"), "{}", list.text);
    assert!(list.text.contains(&ana_session), "{}", list.text);
    // Newest first: Bob's own session is 1, Ana's is 2.
    bob.send("/attach 2").await;
    let attached = events.next_kind("status", WAIT).await;
    assert!(attached.text.contains("📎 Attached"), "{}", attached.text);
    assert!(
        attached.text.contains("the plan is to ship on Friday"),
        "replays the last messages: {}",
        attached.text
    );
    bob.send("and then?").await;
    events.next_kind("reply", WAIT).await;
    assert_eq!(
        fake.user_messages(&ana_session).last().map(String::as_str),
        Some("and then?"),
        "the message went to the attached session"
    );
    bob.send("/attach 9").await;
    let missing = events.next_kind("status", WAIT).await;
    assert!(missing.text.contains("no session 9"), "{}", missing.text);
}

#[tokio::test]
async fn repeated_runtime_errors_in_a_conversation_produce_one_notice() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    // Down for longer than both messages' first attempts.
    fake.fail_next(
        hg_testkit::fake_claude::Endpoint::CreateSession,
        500,
        None,
        6,
    );
    let mut config = config();
    config.max_attempts = 10;
    let _bridge = stack
        .bridge(config, claude_providers(claude_config(&fake.base_url())))
        .await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("first").await;
    user.send("second").await;
    let mut replies = Vec::new();
    let mut notices = 0;
    while replies.len() < 2 {
        let event = events
            .next_message(WAIT)
            .await
            .expect("both answered once up");
        match event.kind.as_str() {
            "status" if event.text.contains("unavailable right now") => notices += 1,
            "reply" => replies.push(event.text),
            _ => {}
        }
    }
    assert_eq!(replies, ["echo: first", "echo: second"]);
    assert_eq!(
        notices, 1,
        "one notice for the conversation, not one per message"
    );
}

#[tokio::test]
async fn several_requests_are_answered_one_by_one_and_the_turn_goes_on_after_the_last() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let _bridge = stack
        .bridge(config(), claude_providers(claude_config(&fake.base_url())))
        .await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("tools:2").await;
    let first = events.next_kind("approval_request", WAIT).await;
    let second = events.next_kind("approval_request", WAIT).await;
    assert!(first.text.contains("step 1") && second.text.contains("step 2"));
    // Text answers the oldest pending request.
    user.send("allow").await;
    let edit = events.next_kind("edit", WAIT).await;
    assert_eq!(edit.outbound_id, first.outbound_id);
    // The runtime re-announces what is left; nothing else happens yet.
    let quiet: Vec<_> = events
        .collect(Duration::from_millis(400))
        .await
        .into_iter()
        .filter(|e| e.kind == "reply" || e.kind == "approval_request")
        .collect();
    assert!(
        quiet.is_empty(),
        "no reply before the last answer: {quiet:?}"
    );
    user.press(button(&second, "Deny")).await;
    let edit = events.next_kind("edit", WAIT).await;
    assert_eq!(edit.outbound_id, second.outbound_id);
    assert_eq!(events.next_kind("reply", WAIT).await.text, "done: tools:2");
    assert_eq!(
        fake.tool_confirmations(),
        vec![("allow".to_owned(), None), ("deny".to_owned(), None)]
    );
}

#[tokio::test]
async fn an_allowlist_route_serves_only_its_users() {
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let (_web, url) = stack.default_web().await;
    let insider = WebUser::signup(&url).await;
    let outsider = WebUser::signup(&url).await;
    let mut config = config();
    if let Some(route) = config.default_route.as_mut() {
        route.access = AccessMode::Allowlist;
        route.allowlist = vec![insider.user_id.clone()];
    }
    let _bridge = stack
        .bridge(config, claude_providers(claude_config(&fake.base_url())))
        .await;
    let mut outside = outsider.events(None).await;
    outsider.send("let me in").await;
    let refused = outside.next_kind("status", WAIT).await;
    assert!(refused.text.contains("not allowed"), "{}", refused.text);
    assert!(fake.sessions().is_empty(), "nothing reached the agent");
    let mut inside = insider.events(None).await;
    insider.send("hello").await;
    assert_eq!(inside.next_kind("reply", WAIT).await.text, "echo: hello");
}

#[tokio::test]
async fn usage_counts_survive_a_bridge_restart() {
    // Usage is kept with the conversation and stored when the bridge lets
    // it go (here: on shutdown), not written after every turn.
    let stack = Stack::start().await;
    let fake = FakeClaude::start().await;
    let providers = || claude_providers(claude_config(&fake.base_url()));
    let bridge = stack.bridge(config(), providers()).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    for text in ["one", "two"] {
        user.send(text).await;
        events.next_kind("reply", WAIT).await;
    }
    user.send("/usage").await;
    let before = events.next_kind("status", WAIT).await.text;
    assert!(before.contains("2 turns, 2 model requests"), "{before}");

    bridge.stop().await;
    let _bridge = stack.bridge(config(), providers()).await;
    user.send("/usage").await;
    let after = events.next_kind("status", WAIT).await.text;
    assert_eq!(after, before, "usage after a restart");
}
