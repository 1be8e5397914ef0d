//! A local coding agent over ACP, steered from the web chat: its permission
//! questions become approval messages with the agent's own options, `/new`
//! picks a directory within the allowed roots, `/stop` cancels, and an agent
//! that dies mid-turn is reported and restarted — through real NATS and the
//! real bridge, with the scripted `acp-test-agent`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hg_bridge::BridgeConfig;
use hg_bridge::provider::acp::{AcpConfig, AcpProvider};
use hg_bridge::routing::Route;
use hg_e2e::{Stack, WebUser, fast_bridge_config, providers_with};

const AGENT: &str = env!("CARGO_BIN_EXE_acp-test-agent");
const WAIT: Duration = Duration::from_secs(20);

fn bridge_config() -> BridgeConfig {
    BridgeConfig {
        default_route: Some(Route {
            runtime: "coder".into(),
            ..Route::default()
        }),
        ..fast_bridge_config()
    }
}

fn acp(root: &Path) -> hg_bridge::Providers {
    let work = root.join("work");
    std::fs::create_dir_all(work.join("app")).unwrap();
    let provider = AcpProvider::new(
        "coder",
        AcpConfig {
            command: AGENT.into(),
            default_cwd: work.clone(),
            allowed_roots: vec![work],
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            ..AcpConfig::default()
        },
    )
    .unwrap();
    providers_with(Arc::new(provider))
}

fn alive(pid: i32) -> bool {
    // A zombie is not alive: read the state from /proc.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit(')').next().map(|rest| rest.trim().to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z'))
}

fn pid_in(dir: &Path, file: &str) -> i32 {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_permission_question_is_answered_from_chat_with_the_agents_options() {
    let root = tempfile::tempdir().unwrap();
    let stack = Stack::start().await;
    let bridge = stack.bridge(bridge_config(), acp(root.path())).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;

    user.send("hello agent").await;
    assert_eq!(
        events.next_kind("reply", WAIT).await.text,
        "echo: hello agent"
    );

    user.send("permission:Bash").await;
    let request = events.next_kind("approval_request", WAIT).await;
    assert!(request.text.contains("Bash"), "{}", request.text);
    let labels: Vec<&str> = request.buttons.iter().map(|b| b.label.as_str()).collect();
    assert_eq!(
        &labels[..3],
        ["Allow once", "Always allow", "Reject"],
        "the agent's own options first: {labels:?}"
    );
    let always = request
        .buttons
        .iter()
        .find(|b| b.label == "Always allow")
        .unwrap();
    user.press(always).await;
    let edit = events.next_kind("edit", WAIT).await;
    assert!(edit.text.contains("Always allow by"), "{}", edit.text);
    assert_eq!(
        events.next_kind("reply", WAIT).await.text,
        "chosen: allow-always"
    );

    // In text: "deny" picks the agent's reject option, a number picks by position.
    user.send("permission:Edit").await;
    events.next_kind("approval_request", WAIT).await;
    user.send("deny").await;
    assert_eq!(
        events.next_kind("reply", WAIT).await.text,
        "chosen: reject-once"
    );
    user.send("permission:Edit").await;
    events.next_kind("approval_request", WAIT).await;
    user.send("1").await;
    assert_eq!(
        events.next_kind("reply", WAIT).await.text,
        "chosen: allow-once"
    );

    // The agent process ends with the bridge: no orphans.
    let pid = pid_in(&root.path().join("work"), ".acp-agent.pid");
    assert!(alive(pid));
    bridge.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent {pid} outlived the bridge"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn new_picks_a_directory_within_the_allowed_roots() {
    let root = tempfile::tempdir().unwrap();
    let stack = Stack::start().await;
    let _bridge = stack.bridge(bridge_config(), acp(root.path())).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;

    let outside = root.path().display().to_string();
    user.send(&format!("/new {outside}")).await;
    let refused = events.next_kind("status", WAIT).await;
    assert!(refused.text.starts_with("❌"), "{}", refused.text);
    user.send("/new ../../etc").await;
    let refused = events.next_kind("status", WAIT).await;
    assert!(refused.text.starts_with("❌"), "{}", refused.text);

    let inside = root.path().join("work/app");
    user.send(&format!("/new {}", inside.display())).await;
    let started = events.next_kind("status", WAIT).await;
    assert!(
        started.text.contains("New session started in"),
        "{}",
        started.text
    );
    user.send("hi there").await;
    assert_eq!(events.next_kind("reply", WAIT).await.text, "echo: hi there");
    assert!(
        inside.join(".acp-agent.pid").exists(),
        "the agent runs in the chosen directory"
    );
    user.send("/status").await;
    let status = events.next_kind("status", WAIT).await;
    assert!(status.text.contains("work/app"), "{}", status.text);
}

#[tokio::test]
async fn an_agent_that_dies_mid_turn_is_reported_and_the_next_message_works() {
    let root = tempfile::tempdir().unwrap();
    let stack = Stack::start().await;
    let _bridge = stack.bridge(bridge_config(), acp(root.path())).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("crash").await;
    let told = loop {
        let event = events.next_message(WAIT).await.expect("told");
        if event.kind == "status" || event.kind == "reply" {
            break event;
        }
    };
    assert!(told.text.contains("⚠️"), "the user is told: {}", told.text);
    user.send("are you back?").await;
    assert_eq!(
        events.next_kind("reply", WAIT).await.text,
        "echo: are you back?"
    );
}

#[tokio::test]
async fn stop_cancels_a_running_agent_turn() {
    let root = tempfile::tempdir().unwrap();
    let stack = Stack::start().await;
    let _bridge = stack.bridge(bridge_config(), acp(root.path())).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("slow:count").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    user.send("/stop").await;
    let stopped = events.next_kind("status", WAIT).await;
    assert_eq!(stopped.text, "⏹ Stopped.");
    user.send("after the stop").await;
    assert_eq!(
        events.next_kind("reply", WAIT).await.text,
        "echo: after the stop"
    );
}

#[tokio::test]
async fn allow_dir_lets_the_agent_work_in_that_directory_without_asking() {
    let root = tempfile::tempdir().unwrap();
    let stack = Stack::start().await;
    let _bridge = stack.bridge(bridge_config(), acp(root.path())).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("permission:Bash").await;
    let request = events.next_kind("approval_request", WAIT).await;
    let dir = request
        .buttons
        .iter()
        .find(|b| b.label.starts_with("Allow in this directory"))
        .expect("an allow-dir button");
    user.press(dir).await;
    assert_eq!(
        events.next_kind("reply", WAIT).await.text,
        "chosen: allow-once"
    );
    user.send("permission:Edit").await;
    let notice = events.next_kind("status", WAIT).await;
    assert!(
        notice.text.contains("auto-approved 1 tool: Edit"),
        "{}",
        notice.text
    );
    assert!(notice.text.contains("Allow in"), "{}", notice.text);
    assert_eq!(
        events.next_kind("reply", WAIT).await.text,
        "chosen: allow-once"
    );
}

#[tokio::test]
async fn with_two_bridge_replicas_a_conversation_stays_with_its_agent() {
    let root = tempfile::tempdir().unwrap();
    let stack = Stack::start().await;
    let config = || BridgeConfig {
        session_lease_linger: Duration::from_millis(100),
        ..bridge_config()
    };
    let _a = stack.bridge(config(), acp(root.path())).await;
    let _b = stack.bridge(config(), acp(root.path())).await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    let mut sessions = Vec::new();
    for _ in 0..4 {
        user.send("session-id").await;
        sessions.push(events.next_kind("reply", WAIT).await.text);
        // Longer than the linger: an idle conversation would move on.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(sessions[0].starts_with("session: "), "{sessions:?}");
    assert!(
        sessions.iter().all(|s| *s == sessions[0]),
        "one agent session throughout: {sessions:?}"
    );
}
