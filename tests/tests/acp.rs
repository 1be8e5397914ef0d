//! The ACP provider against a real agent process: `acp-test-agent`, a
//! scripted agent built with the agent side of the same crate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use hg_bridge::provider::acp::{AcpConfig, AcpProvider};
use hg_bridge::provider::{
    EventStream, PermissionKind, Provider, ProviderError, RuntimeEvent, SessionSpec, SessionState,
    StopReason, ToolDecision, UserFile, UserMessage,
};

const AGENT: &str = env!("CARGO_BIN_EXE_acp-test-agent");

fn config(dir: &Path) -> AcpConfig {
    AcpConfig {
        command: AGENT.into(),
        default_cwd: dir.to_path_buf(),
        request_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(10),
        ..AcpConfig::default()
    }
}

fn provider(dir: &Path) -> AcpProvider {
    AcpProvider::new("acp-test", config(dir)).expect("provider")
}

fn text(text: &str) -> UserMessage {
    UserMessage {
        text: text.into(),
        files: vec![],
    }
}

/// Reads events until `done` says so (the matching event included).
async fn read_until(
    stream: &mut EventStream,
    mut done: impl FnMut(&RuntimeEvent) -> bool,
) -> Vec<RuntimeEvent> {
    let mut events = Vec::new();
    let read = async {
        while let Some(event) = stream.next().await {
            let event = event.expect("event");
            let finished = done(&event);
            events.push(event);
            if finished {
                return;
            }
        }
        panic!("stream ended; events so far: {events:#?}");
    };
    tokio::time::timeout(Duration::from_secs(15), read)
        .await
        .expect("timed out reading events");
    events
}

async fn read_turn(stream: &mut EventStream) -> Vec<RuntimeEvent> {
    read_until(stream, RuntimeEvent::ends_turn).await
}

fn messages(events: &[RuntimeEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            RuntimeEvent::AgentMessage { text, .. } => Some(text.clone()),
            _ => None,
        })
        .collect()
}

fn stop_reason(events: &[RuntimeEvent]) -> Option<StopReason> {
    match events.last() {
        Some(RuntimeEvent::Status {
            state: SessionState::Idle,
            stop_reason,
            ..
        }) => stop_reason.clone(),
        other => panic!("turn did not end with idle: {other:?}"),
    }
}

fn is_requires_action(event: &RuntimeEvent) -> bool {
    matches!(
        event,
        RuntimeEvent::Status {
            stop_reason: Some(StopReason::RequiresAction { .. }),
            ..
        }
    )
}

fn read_pid(path: PathBuf) -> i32 {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .expect("pid")
}

/// Running (a zombie waiting to be reaped counts as gone).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            !matches!(state, Some("Z" | "X"))
        }
        Err(_) => false,
    }
}

async fn gone(pid: i32) -> bool {
    for _ in 0..50 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Asks for a permission and returns the request's event id and the events
/// up to the `requires_action` status.
async fn ask_permission(
    acp: &AcpProvider,
    session: &str,
    stream: &mut EventStream,
    tool: &str,
) -> (String, Vec<RuntimeEvent>) {
    acp.send_message(session, &text(&format!("permission:{tool}")))
        .await
        .expect("send");
    let events = read_until(stream, is_requires_action).await;
    let Some(RuntimeEvent::Status {
        stop_reason: Some(StopReason::RequiresAction { event_ids }),
        ..
    }) = events.last()
    else {
        unreachable!()
    };
    assert_eq!(event_ids.len(), 1);
    (event_ids[0].clone(), events)
}

#[tokio::test]
async fn a_turn_streams_deltas_then_one_message_with_thinking_and_usage() {
    let dir = tempfile::tempdir().unwrap();
    let acp = provider(dir.path());
    assert!(acp.capabilities().working_directory && acp.capabilities().streaming_deltas);
    let session = acp.create_session(&SessionSpec::default()).await.unwrap();
    let mut stream = acp.event_stream(&session, None).await.unwrap();
    let message = UserMessage {
        text: "hello there".into(),
        files: vec![
            UserFile {
                file_name: "cat.png".into(),
                mime_type: "image/png".into(),
                data: vec![1, 2, 3],
            },
            UserFile {
                file_name: "notes.txt".into(),
                mime_type: "text/plain".into(),
                data: b"abc".to_vec(),
            },
        ],
    };
    let anchor = acp.send_message(&session, &message).await.unwrap();
    let events = read_turn(&mut stream).await;

    assert!(
        matches!(&events[0], RuntimeEvent::Other { id, event_type } if *id == anchor && event_type == "user.message"),
        "{events:#?}"
    );
    let mut ids: Vec<&str> = events.iter().map(RuntimeEvent::id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "event ids are unique");

    let replies = messages(&events);
    assert_eq!(replies.len(), 1, "one complete message: {events:#?}");
    let reply = &replies[0];
    assert!(reply.starts_with("echo: hello there"), "{reply}");
    assert!(
        reply.contains("notes.txt"),
        "non-image files are named: {reply}"
    );
    assert!(
        reply.ends_with(" [image image/png]"),
        "images are passed: {reply}"
    );
    let message_id = events
        .iter()
        .find_map(|e| match e {
            RuntimeEvent::AgentMessage { id, .. } => Some(id.clone()),
            _ => None,
        })
        .unwrap();
    let deltas: Vec<&RuntimeEvent> = events
        .iter()
        .filter(|e| matches!(e, RuntimeEvent::AgentMessageDelta { .. }))
        .collect();
    assert!(deltas.len() >= 3, "streamed in chunks: {deltas:#?}");
    let mut joined = String::new();
    for delta in deltas {
        let RuntimeEvent::AgentMessageDelta {
            message_id: of,
            text,
            ..
        } = delta
        else {
            unreachable!()
        };
        assert_eq!(*of, message_id);
        joined.push_str(text);
    }
    assert_eq!(&joined, reply, "the message is the chunks, concatenated");

    let thinking = events
        .iter()
        .position(
            |e| matches!(e, RuntimeEvent::Thinking { text, .. } if text == "thinking about it"),
        )
        .expect("thinking");
    let first_delta = events
        .iter()
        .position(|e| matches!(e, RuntimeEvent::AgentMessageDelta { .. }))
        .unwrap();
    assert!(thinking < first_delta);
    let usage = events
        .iter()
        .find_map(|e| match e {
            RuntimeEvent::Usage { usage, .. } => Some(*usage),
            _ => None,
        })
        .expect("usage");
    assert_eq!(usage.input_tokens, 42);
    assert_eq!(usage.cost_micro_usd, Some(12_500));
    assert_eq!(stop_reason(&events), Some(StopReason::EndTurn));

    // Catch-up from the anchor gives the same turn again.
    let mut replay = acp.event_stream(&session, Some(&anchor)).await.unwrap();
    let again = read_turn(&mut replay).await;
    assert_eq!(again, events[1..].to_vec());
}

#[tokio::test]
async fn a_permission_answered_with_an_option_reaches_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let acp = provider(dir.path());
    let session = acp.create_session(&SessionSpec::default()).await.unwrap();
    let mut stream = acp.event_stream(&session, None).await.unwrap();
    let (request_id, events) = ask_permission(&acp, &session, &mut stream, "Bash").await;

    let tool_use = events
        .iter()
        .find_map(|e| match e {
            RuntimeEvent::ToolUse {
                id, name, input, ..
            } => Some((id.clone(), name.clone(), input.clone())),
            _ => None,
        })
        .expect("tool use");
    assert_eq!(tool_use.1, "Bash");
    assert_eq!(tool_use.2["command"], "run Bash");
    let request = events
        .iter()
        .find(|e| e.id() == request_id)
        .expect("permission request");
    let RuntimeEvent::PermissionRequest {
        tool_call_id,
        title,
        input,
        options,
        ..
    } = request
    else {
        panic!("not a permission request: {request:?}")
    };
    assert_eq!(tool_call_id, "call-1");
    assert_eq!(title, "Bash");
    assert_eq!(input["command"], "run Bash");
    let offered: Vec<(&str, PermissionKind)> =
        options.iter().map(|o| (o.id.as_str(), o.kind)).collect();
    assert_eq!(
        offered,
        [
            ("allow-once", PermissionKind::AllowOnce),
            ("allow-always", PermissionKind::AllowAlways),
            ("reject-once", PermissionKind::RejectOnce),
        ]
    );

    let unknown = acp
        .confirm_tool(&session, "acp_999999", ToolDecision::Allow)
        .await;
    assert!(
        matches!(unknown, Err(ProviderError::Rejected(_))),
        "{unknown:?}"
    );
    let not_offered = acp
        .confirm_tool(
            &session,
            &request_id,
            ToolDecision::Option {
                option_id: "sudo".into(),
            },
        )
        .await;
    assert!(matches!(not_offered, Err(ProviderError::Rejected(_))));

    acp.confirm_tool(
        &session,
        &request_id,
        ToolDecision::Option {
            option_id: "allow-always".into(),
        },
    )
    .await
    .unwrap();
    let events = read_turn(&mut stream).await;
    assert_eq!(messages(&events), ["chosen: allow-always"]);
    let result = events
        .iter()
        .find_map(|e| match e {
            RuntimeEvent::ToolResult {
                tool_use_id,
                content,
                is_error,
                ..
            } => Some((tool_use_id.clone(), content.clone(), *is_error)),
            _ => None,
        })
        .expect("tool result");
    assert_eq!(result, (tool_use.0, "Bash allow-always".into(), false));
    assert_eq!(stop_reason(&events), Some(StopReason::EndTurn));

    let twice = acp
        .confirm_tool(&session, &request_id, ToolDecision::Allow)
        .await;
    assert!(
        matches!(twice, Err(ProviderError::Rejected(_))),
        "{twice:?}"
    );
}

#[tokio::test]
async fn allow_and_deny_pick_the_first_option_of_their_kind() {
    let dir = tempfile::tempdir().unwrap();
    let acp = provider(dir.path());
    let session = acp.create_session(&SessionSpec::default()).await.unwrap();
    let mut stream = acp.event_stream(&session, None).await.unwrap();

    let (id, _) = ask_permission(&acp, &session, &mut stream, "Edit").await;
    acp.confirm_tool(&session, &id, ToolDecision::Allow)
        .await
        .unwrap();
    let events = read_turn(&mut stream).await;
    assert_eq!(messages(&events), ["chosen: allow-once"]);

    let (id, _) = ask_permission(&acp, &session, &mut stream, "Edit").await;
    acp.confirm_tool(
        &session,
        &id,
        ToolDecision::Deny {
            message: Some("no".into()),
        },
    )
    .await
    .unwrap();
    let events = read_turn(&mut stream).await;
    assert_eq!(messages(&events), ["chosen: reject-once"]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, RuntimeEvent::ToolResult { is_error: true, .. })),
        "a rejected tool fails: {events:#?}"
    );
}

#[tokio::test]
async fn interrupt_cancels_a_pending_permission_and_the_turn() {
    let dir = tempfile::tempdir().unwrap();
    let acp = provider(dir.path());
    let session = acp.create_session(&SessionSpec::default()).await.unwrap();
    let mut stream = acp.event_stream(&session, None).await.unwrap();

    let (id, _) = ask_permission(&acp, &session, &mut stream, "Bash").await;
    acp.interrupt(&session).await.unwrap();
    let events = read_turn(&mut stream).await;
    assert_eq!(messages(&events), ["chosen: cancelled"]);
    assert_eq!(
        stop_reason(&events),
        Some(StopReason::Other("cancelled".into()))
    );
    let late = acp.confirm_tool(&session, &id, ToolDecision::Allow).await;
    assert!(matches!(late, Err(ProviderError::Rejected(_))), "{late:?}");

    // A streaming turn stops too.
    acp.send_message(&session, &text("slow:count"))
        .await
        .unwrap();
    let mut deltas = 0;
    read_until(&mut stream, |e| {
        if matches!(e, RuntimeEvent::AgentMessageDelta { .. }) {
            deltas += 1;
        }
        deltas >= 2
    })
    .await;
    acp.interrupt(&session).await.unwrap();
    let events = read_turn(&mut stream).await;
    assert_eq!(
        stop_reason(&events),
        Some(StopReason::Other("cancelled".into()))
    );
    let ticks = messages(&events).concat();
    assert!(ticks.starts_with("tick "), "{ticks}");

    // And the session goes on.
    acp.send_message(&session, &text("after")).await.unwrap();
    let events = read_turn(&mut stream).await;
    assert_eq!(messages(&events), ["echo: after"]);
}

#[tokio::test]
async fn a_dead_agent_ends_the_turn_and_the_next_message_restarts_it() {
    let dir = tempfile::tempdir().unwrap();
    let acp = provider(dir.path());
    let session = acp.create_session(&SessionSpec::default()).await.unwrap();
    let mut stream = acp.event_stream(&session, None).await.unwrap();
    acp.send_message(&session, &text("session-id"))
        .await
        .unwrap();
    let first_session = messages(&read_turn(&mut stream).await).concat();
    assert!(
        first_session.starts_with("session: sess-"),
        "{first_session}"
    );

    // Killed from outside mid-turn.
    let pid = read_pid(dir.path().join(".acp-agent.pid"));
    acp.send_message(&session, &text("slow:forever"))
        .await
        .unwrap();
    read_until(&mut stream, |e| {
        matches!(e, RuntimeEvent::AgentMessageDelta { .. })
    })
    .await;
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let events = read_turn(&mut stream).await;
    assert!(
        events.iter().any(
            |e| matches!(e, RuntimeEvent::Error { kind, retry_status, .. }
            if kind == "agent_exited" && retry_status.as_deref() == Some("terminal"))
        ),
        "{events:#?}"
    );
    assert_eq!(
        stop_reason(&events),
        Some(StopReason::Other("agent_exited".into()))
    );

    // The next message starts a new agent, which loads the session.
    acp.send_message(&session, &text("session-id"))
        .await
        .unwrap();
    let events = read_turn(&mut stream).await;
    assert_eq!(messages(&events), [first_session], "{events:#?}");
    let second = read_pid(dir.path().join(".acp-agent.pid"));
    assert_ne!(second, pid);
    assert!(gone(pid).await);

    // An agent that exits on its own mid-turn.
    acp.send_message(&session, &text("crash")).await.unwrap();
    let events = read_turn(&mut stream).await;
    assert_eq!(messages(&events), ["about to crash"]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, RuntimeEvent::Error { kind, .. } if kind == "agent_exited")),
        "{events:#?}"
    );
    acp.send_message(&session, &text("again")).await.unwrap();
    let events = read_turn(&mut stream).await;
    assert_eq!(messages(&events), ["echo: again"], "{events:#?}");
    assert_eq!(stop_reason(&events), Some(StopReason::EndTurn));
}

#[tokio::test]
async fn an_agent_without_session_load_starts_fresh_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.env.insert("ACP_TEST_NO_LOAD".into(), "1".into());
    let acp = AcpProvider::new("acp-test", config).unwrap();
    let session = acp.create_session(&SessionSpec::default()).await.unwrap();
    let mut stream = acp.event_stream(&session, None).await.unwrap();
    acp.send_message(&session, &text("session-id"))
        .await
        .unwrap();
    let first = messages(&read_turn(&mut stream).await).concat();
    acp.send_message(&session, &text("crash")).await.unwrap();
    read_turn(&mut stream).await;
    acp.send_message(&session, &text("session-id"))
        .await
        .unwrap();
    let second = messages(&read_turn(&mut stream).await).concat();
    assert!(second.starts_with("session: sess-"), "{second}");
    assert_ne!(first, second);
}

#[tokio::test]
async fn a_silent_agent_is_reported_hung_within_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.idle_timeout = Duration::from_millis(500);
    let acp = AcpProvider::new("acp-test", config).unwrap();
    let session = acp.create_session(&SessionSpec::default()).await.unwrap();
    let mut stream = acp.event_stream(&session, None).await.unwrap();
    let pid = read_pid(dir.path().join(".acp-agent.pid"));

    let started = tokio::time::Instant::now();
    acp.send_message(&session, &text("hang")).await.unwrap();
    let events = read_turn(&mut stream).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(
        events.iter().any(
            |e| matches!(e, RuntimeEvent::Error { kind, retry_status, .. }
            if kind == "agent_hung" && retry_status.as_deref() == Some("terminal"))
        ),
        "{events:#?}"
    );
    assert_eq!(
        stop_reason(&events),
        Some(StopReason::Other("agent_hung".into()))
    );
    assert!(gone(pid).await, "the hung agent is killed");

    // Waiting for a permission answer is not hanging.
    let (id, _) = ask_permission(&acp, &session, &mut stream, "Bash").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    acp.confirm_tool(&session, &id, ToolDecision::Allow)
        .await
        .unwrap();
    let events = read_turn(&mut stream).await;
    assert_eq!(messages(&events), ["chosen: allow-once"], "{events:#?}");
}

#[tokio::test]
async fn destroy_and_drop_leave_no_process_behind() {
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut config = config(first.path());
    config.allowed_roots = vec![
        first.path().to_path_buf(),
        second.path().to_path_buf(),
        root.path().to_path_buf(),
    ];
    let acp = AcpProvider::new("acp-test", config).unwrap();

    let spawn_child = async |cwd: &Path| {
        let spec = SessionSpec {
            cwd: Some(cwd.display().to_string()),
            ..SessionSpec::default()
        };
        let session = acp.create_session(&spec).await.unwrap();
        let mut stream = acp.event_stream(&session, None).await.unwrap();
        acp.send_message(&session, &text("spawn-child"))
            .await
            .unwrap();
        assert_eq!(messages(&read_turn(&mut stream).await), ["spawned"]);
        let agent = read_pid(cwd.join(".acp-agent.pid"));
        let grandchild = read_pid(cwd.join(".acp-grandchild.pid"));
        assert!(alive(agent) && alive(grandchild));
        (session, agent, grandchild)
    };

    let (session, agent, grandchild) = spawn_child(first.path()).await;
    acp.destroy(&session).await.unwrap();
    assert!(gone(agent).await, "agent killed on destroy");
    assert!(gone(grandchild).await, "grandchild killed on destroy");
    assert!(matches!(
        acp.event_stream(&session, None).await,
        Err(ProviderError::SessionNotFound(_))
    ));
    acp.destroy(&session).await.unwrap();

    let (_, agent, grandchild) = spawn_child(second.path()).await;
    // A session whose agent is between turns.
    let idle = SessionSpec {
        cwd: Some(root.path().display().to_string()),
        ..SessionSpec::default()
    };
    acp.create_session(&idle).await.unwrap();
    let idle_agent = read_pid(root.path().join(".acp-agent.pid"));
    drop(acp);
    for pid in [agent, grandchild, idle_agent] {
        assert!(gone(pid).await, "process {pid} left behind after drop");
    }
}

#[tokio::test]
async fn check_cwd_refuses_directories_outside_the_roots() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(root.join("project/src")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
    let mut config = config(&root);
    config.allowed_roots = vec![root.clone()];
    let acp = AcpProvider::new("acp-test", config).unwrap();
    let root = root.canonicalize().unwrap();

    assert_eq!(acp.check_cwd("project").unwrap(), root.join("project"));
    assert_eq!(
        acp.check_cwd(root.join("project/src/..")).unwrap(),
        root.join("project")
    );
    for refused in [
        outside.display().to_string(),
        "project/../../outside".into(),
        "..".into(),
        "escape".into(),
        "/".into(),
    ] {
        let err = acp.check_cwd(&refused).unwrap_err();
        assert!(err.contains("outside the directories"), "{refused}: {err}");
    }
    let missing = acp.check_cwd("nope").unwrap_err();
    assert!(missing.contains("nope"), "{missing}");

    let spec = SessionSpec {
        cwd: Some(outside.display().to_string()),
        ..SessionSpec::default()
    };
    assert!(matches!(
        acp.create_session(&spec).await,
        Err(ProviderError::Rejected(_))
    ));
    // No agent was started for it.
    assert!(!outside.join(".acp-agent.pid").exists());

    let mut bad = self::config(&outside);
    bad.allowed_roots = vec![root.clone()];
    assert!(
        AcpProvider::new("acp-test", bad).is_err(),
        "default outside roots"
    );
}

#[tokio::test]
async fn an_agent_that_never_answers_initialize_is_given_up() {
    let dir = tempfile::tempdir().unwrap();
    // A unique argument, to find the process afterwards.
    let marker = format!("31.{}", std::process::id());
    let config = AcpConfig {
        command: "sleep".into(),
        args: vec![marker.clone()],
        default_cwd: dir.path().to_path_buf(),
        request_timeout: Duration::from_millis(300),
        ..AcpConfig::default()
    };
    let acp = AcpProvider::new("acp-test", config).unwrap();
    let started = tokio::time::Instant::now();
    let result = acp.create_session(&SessionSpec::default()).await;
    assert!(
        matches!(&result, Err(ProviderError::Unavailable(m)) if m.contains("initialize")),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let mut left = true;
    for _ in 0..50 {
        left = sleeping_with(&marker);
        if !left {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!left, "the silent agent was not killed");

    let missing = AcpProvider::new(
        "acp-test",
        AcpConfig {
            command: "/nonexistent/agent".into(),
            default_cwd: dir.path().to_path_buf(),
            ..AcpConfig::default()
        },
    )
    .unwrap();
    assert!(matches!(
        missing.create_session(&SessionSpec::default()).await,
        Err(ProviderError::Rejected(_))
    ));
}

/// Whether a live process has `marker` in its command line.
fn sleeping_with(marker: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let pid: i32 = match entry.file_name().to_string_lossy().parse() {
            Ok(pid) => pid,
            Err(_) => return false,
        };
        std::fs::read(entry.path().join("cmdline"))
            .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(marker))
            .unwrap_or(false)
            && alive(pid)
    })
}
