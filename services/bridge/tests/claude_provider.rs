//! The Claude Managed Agents provider against the fake API server: what a
//! user of the bridge would notice (turns complete, nothing lost or doubled,
//! errors mapped to the right kind).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use hg_bridge::provider::claude::{ClaudeConfig, ClaudeProvider};
use hg_bridge::provider::{
    EventStream, Provider, ProviderError, RuntimeEvent, SessionSpec, SessionState, StopReason,
    ToolDecision, ToolOutput, UserFile, UserMessage,
};
use hg_testkit::fake_claude::{Endpoint, FakeClaude};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

fn config(fake: &FakeClaude) -> ClaudeConfig {
    ClaudeConfig {
        api_key: FakeClaude::API_KEY.to_owned(),
        base_url: fake.base_url(),
        request_timeout: Duration::from_secs(5),
        retry_backoff: Duration::from_millis(10),
        retry_max_backoff: Duration::from_millis(50),
        reconnect_backoff: Duration::from_millis(10),
        reconnect_max_backoff: Duration::from_millis(100),
        ..ClaudeConfig::default()
    }
}

fn provider(fake: &FakeClaude) -> ClaudeProvider {
    ClaudeProvider::new(config(fake)).expect("provider")
}

fn spec() -> SessionSpec {
    SessionSpec {
        agent_id: "agent_1".to_owned(),
        environment_id: "env_1".to_owned(),
        title: "test chat".to_owned(),
        metadata: [("chat".to_owned(), "42".to_owned())].into(),
        cwd: None,
    }
}

fn text(text: &str) -> UserMessage {
    UserMessage {
        text: text.to_owned(),
        files: Vec::new(),
    }
}

async fn next(stream: &mut EventStream) -> RuntimeEvent {
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(err))) => panic!("stream error: {err}"),
        Ok(None) => panic!("stream ended"),
        Err(_) => panic!("no event within {WAIT:?}"),
    }
}

/// Events up to and including the one that ends the turn.
async fn turn(stream: &mut EventStream) -> Vec<RuntimeEvent> {
    until(stream, RuntimeEvent::ends_turn).await
}

/// Events up to and including the idle that asks for an action.
async fn until_action(stream: &mut EventStream) -> Vec<RuntimeEvent> {
    until(stream, |event| {
        matches!(
            event,
            RuntimeEvent::Status {
                stop_reason: Some(StopReason::RequiresAction { .. }),
                ..
            }
        )
    })
    .await
}

async fn until(
    stream: &mut EventStream,
    stop: impl Fn(&RuntimeEvent) -> bool,
) -> Vec<RuntimeEvent> {
    let mut events = Vec::new();
    loop {
        let event = next(stream).await;
        let done = stop(&event);
        events.push(event);
        if done {
            return events;
        }
    }
}

/// Nothing more arrives for a short while.
async fn quiet(stream: &mut EventStream) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
        panic!("unexpected item {item:?}");
    }
}

fn kinds(events: &[RuntimeEvent]) -> Vec<String> {
    events
        .iter()
        .map(|event| match event {
            RuntimeEvent::AgentMessage { .. } => "message".to_owned(),
            RuntimeEvent::AgentMessageDelta { .. } => "delta".to_owned(),
            RuntimeEvent::Thinking { .. } => "thinking".to_owned(),
            RuntimeEvent::ToolUse { .. } => "tool_use".to_owned(),
            RuntimeEvent::ToolResult { .. } => "tool_result".to_owned(),
            RuntimeEvent::CustomToolUse { .. } => "custom_tool_use".to_owned(),
            RuntimeEvent::PermissionRequest { .. } => "permission".to_owned(),
            RuntimeEvent::Status { state, .. } => format!("status:{state:?}"),
            RuntimeEvent::Usage { .. } => "usage".to_owned(),
            RuntimeEvent::Error { .. } => "error".to_owned(),
            RuntimeEvent::Other { event_type, .. } => event_type.clone(),
        })
        .collect()
}

fn ids(events: &[RuntimeEvent]) -> Vec<String> {
    events.iter().map(|event| event.id().to_owned()).collect()
}

fn assert_unique(events: &[RuntimeEvent]) {
    let mut seen = HashSet::new();
    for event in events {
        assert!(
            seen.insert(event.id()),
            "event {} delivered twice",
            event.id()
        );
    }
}

fn agent_texts(events: &[RuntimeEvent]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|event| match event {
            RuntimeEvent::AgentMessage { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

const ECHO_TURN: [&str; 7] = [
    "user.message",
    "status:Running",
    "span.model_request_start",
    "thinking",
    "message",
    "usage",
    "status:Idle",
];

#[tokio::test]
async fn a_full_turn_arrives_in_order() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    assert_eq!(fake.sessions(), vec![session.clone()]);

    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    let sent = claude
        .send_message(&session, &text("hello"))
        .await
        .expect("send");
    let events = turn(&mut stream).await;

    assert_eq!(kinds(&events), ECHO_TURN);
    assert_eq!(
        events[0].id(),
        sent,
        "the turn starts with the sent message"
    );
    assert_eq!(agent_texts(&events), ["echo: hello"]);
    assert!(matches!(
        events.last(),
        Some(RuntimeEvent::Status {
            state: SessionState::Idle,
            stop_reason: Some(StopReason::EndTurn),
            ..
        })
    ));
    assert!(events.iter().any(|event| matches!(
        event,
        RuntimeEvent::Usage { usage, .. } if usage.input_tokens > 0 && usage.output_tokens > 0
    )));
    assert_eq!(fake.user_messages(&session), ["hello"]);
    assert_unique(&events);
    assert_eq!(claude.name(), "claude");
    let caps = claude.capabilities();
    assert!(caps.tool_confirmation && caps.custom_tools && caps.interrupt);
    assert!(!caps.streaming_deltas);
}

#[tokio::test]
async fn requests_carry_the_sdk_headers_and_bodies() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    claude
        .send_message(&session, &text("hi"))
        .await
        .expect("send");
    turn(&mut stream).await;

    let requests = fake.requests();
    assert!(requests.len() >= 3, "create, stream, send: {requests:?}");
    for request in &requests {
        let header = |name: &str| request.headers.get(name).map(String::as_str);
        assert_eq!(
            header("authorization"),
            Some("Bearer test-key"),
            "{request:?}"
        );
        assert_eq!(
            header("x-api-key"),
            None,
            "the sdk sends the key as a bearer token"
        );
        assert_eq!(header("anthropic-version"), Some("2026-10-21"));
        assert_eq!(header("anthropic-beta"), Some("managed-agents-2026-04-01"));
        assert_eq!(header("accept"), Some("application/json"));
        assert_eq!(header("content-type"), Some("application/json"));
    }
    let stream_request = requests
        .iter()
        .find(|r| r.path.ends_with("/events/stream"))
        .expect("stream request");
    assert_eq!(stream_request.method, "GET");
    assert_eq!(stream_request.query, None, "no deltas asked for");

    let events = fake.events(&session);
    assert_eq!(
        events[0]["content"],
        json!([{"type": "text", "text": "hi"}]),
        "user.message content as the sdk sends it"
    );
}

#[tokio::test]
async fn a_wrong_key_is_unauthorized() {
    let fake = FakeClaude::start().await;
    let claude = ClaudeProvider::new(ClaudeConfig {
        api_key: "wrong".to_owned(),
        ..config(&fake)
    })
    .expect("provider");
    let err = claude.create_session(&spec()).await.expect_err("refused");
    assert!(
        matches!(err, ProviderError::Unauthorized(ref m) if m.contains("authentication_error")),
        "{err:?}"
    );
    assert!(!err.is_transient());
    // Not retried: a 401 does not get better.
    assert_eq!(fake.request_count("POST", "/v1/sessions"), 1);

    let good = provider(&fake);
    let session = good.create_session(&spec()).await.expect("create");
    let err = claude
        .event_stream(&session, None)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, ProviderError::Unauthorized(_)), "{err:?}");
}

#[tokio::test]
async fn a_dropped_stream_delivers_the_rest_of_the_turn_once() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");

    for drop_after in [1, 3, 4, 5] {
        fake.drop_stream_after(drop_after);
        let sent = claude
            .send_message(&session, &text(&format!("drop {drop_after}")))
            .await
            .expect("send");
        let events = turn(&mut stream).await;
        assert_eq!(kinds(&events), ECHO_TURN, "drop after {drop_after}");
        assert_eq!(events[0].id(), sent);
        assert_eq!(agent_texts(&events), [format!("echo: drop {drop_after}")]);
        assert_unique(&events);
    }
    quiet(&mut stream).await;
    assert!(
        fake.request_count("GET", &format!("/v1/sessions/{session}/events/stream")) >= 5,
        "the stream reconnected"
    );
}

#[tokio::test]
async fn a_stream_dropped_before_any_event_catches_up_from_when_it_opened() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut first = claude.event_stream(&session, None).await.expect("stream");
    claude
        .send_message(&session, &text("one"))
        .await
        .expect("send");
    let earlier = turn(&mut first).await;
    drop(first);

    // A new stream, closed before it delivered anything: the catch-up must
    // give this turn only, not the earlier one.
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    fake.drop_stream_after(0);
    claude
        .send_message(&session, &text("two"))
        .await
        .expect("send");
    let events = turn(&mut stream).await;
    assert_eq!(kinds(&events), ECHO_TURN);
    assert_eq!(agent_texts(&events), ["echo: two"]);
    let earlier: HashSet<String> = ids(&earlier).into_iter().collect();
    assert!(events.iter().all(|event| !earlier.contains(event.id())));
    quiet(&mut stream).await;
}

#[tokio::test]
async fn a_stream_after_an_event_replays_only_later_events() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    claude
        .send_message(&session, &text("one"))
        .await
        .expect("send");
    let one = turn(&mut stream).await;
    let sent_two = claude
        .send_message(&session, &text("two"))
        .await
        .expect("send");
    let two = turn(&mut stream).await;
    drop(stream);

    let last_of_one = one.last().expect("events").id();
    let mut resumed = claude
        .event_stream(&session, Some(last_of_one))
        .await
        .expect("resume");
    let replayed = turn(&mut resumed).await;
    assert_eq!(ids(&replayed), ids(&two));
    quiet(&mut resumed).await;

    // From the anchor of a turn: the rest of that turn.
    let mut resumed = claude
        .event_stream(&session, Some(&sent_two))
        .await
        .expect("resume");
    let rest = turn(&mut resumed).await;
    assert_eq!(ids(&rest), ids(&two[1..]));

    // Live events follow the replay.
    claude
        .send_message(&session, &text("three"))
        .await
        .expect("send");
    let three = turn(&mut resumed).await;
    assert_eq!(agent_texts(&three), ["echo: three"]);
    assert_unique(&[rest, three].concat());

    let err = claude
        .event_stream(&session, Some("sevt_unknown"))
        .await
        .err()
        .expect("unknown cursor");
    assert!(matches!(err, ProviderError::Rejected(_)), "{err:?}");
}

#[tokio::test]
async fn history_spanning_pages_is_followed() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let first = claude
        .send_message(&session, &text("start"))
        .await
        .expect("send");
    // More than one page of 1000 events.
    for n in 0..1200 {
        fake.inject_event(
            &session,
            json!({"type": "session.usage", "usage": {"n": n}}),
        );
    }
    claude
        .send_message(&session, &text("end"))
        .await
        .expect("send");
    let mut stream = claude
        .event_stream(&session, Some(&first))
        .await
        .expect("resume");
    let rest = turn(&mut stream).await; // the rest of the first turn
    assert_eq!(agent_texts(&rest), ["echo: start"]);
    let mut usage = 0;
    loop {
        match next(&mut stream).await {
            RuntimeEvent::Other { event_type, .. } if event_type == "session.usage" => usage += 1,
            RuntimeEvent::Other { event_type, .. } if event_type == "user.message" => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(usage, 1200);
    let end = turn(&mut stream).await;
    assert_eq!(agent_texts(&end), ["echo: end"]);
    assert!(fake.requests().iter().any(|r| {
        r.query
            .as_deref()
            .is_some_and(|q| q.contains("page=page_1000"))
    }));
}

#[tokio::test]
async fn rate_limits_are_waited_out() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    fake.fail_next(Endpoint::CreateSession, 429, Some(1), 1);
    let started = Instant::now();
    let session = claude
        .create_session(&spec())
        .await
        .expect("create after 429");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "retry-after honoured"
    );
    assert!(session.starts_with("sesn_"));
    assert_eq!(fake.request_count("POST", "/v1/sessions"), 2);

    // Without retries left, the caller learns how long to wait.
    let impatient = ClaudeProvider::new(ClaudeConfig {
        max_retries: 0,
        ..config(&fake)
    })
    .expect("provider");
    fake.fail_next(Endpoint::SendEvents, 429, Some(7), 1);
    let err = impatient
        .send_message(&session, &text("hi"))
        .await
        .expect_err("rate limited");
    assert!(
        matches!(err, ProviderError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(7)),
        "{err:?}"
    );
    assert!(err.is_transient());

    // A retry-after longer than allowed is not waited inside the call.
    let short = ClaudeProvider::new(ClaudeConfig {
        max_retry_wait: Duration::from_millis(500),
        ..config(&fake)
    })
    .expect("provider");
    fake.fail_next(Endpoint::SendEvents, 429, Some(30), 1);
    let started = Instant::now();
    let err = short
        .send_message(&session, &text("hi"))
        .await
        .expect_err("rate limited");
    assert!(matches!(err, ProviderError::RateLimited { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn server_errors_are_retried_then_unavailable() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");

    fake.fail_next(Endpoint::SendEvents, 500, None, 1);
    claude
        .send_message(&session, &text("once"))
        .await
        .expect("a single 500 is retried");

    fake.fail_next(Endpoint::SendEvents, 500, None, 10);
    let before = fake.request_count("POST", &format!("/v1/sessions/{session}/events"));
    let err = claude
        .send_message(&session, &text("again"))
        .await
        .expect_err("persistent 500");
    assert!(
        matches!(err, ProviderError::Unavailable(ref m) if m.contains("api_error")),
        "{err:?}"
    );
    let after = fake.request_count("POST", &format!("/v1/sessions/{session}/events"));
    assert_eq!(after - before, 3, "one try and two retries");

    fake.fail_next(Endpoint::Stream, 503, None, 10);
    let err = claude
        .event_stream(&session, None)
        .await
        .err()
        .expect("503");
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn a_refused_connection_is_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let claude = ClaudeProvider::new(ClaudeConfig {
        api_key: "k".to_owned(),
        base_url: format!("http://127.0.0.1:{port}"),
        max_retries: 1,
        retry_backoff: Duration::from_millis(10),
        ..ClaudeConfig::default()
    })
    .expect("provider");
    let err = claude.create_session(&spec()).await.expect_err("refused");
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");
    let err = claude
        .event_stream("sesn_x", None)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn an_unknown_session_is_not_found() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let err = claude
        .send_message("sesn_missing", &text("hi"))
        .await
        .expect_err("missing");
    assert!(
        matches!(err, ProviderError::SessionNotFound(ref id) if id == "sesn_missing"),
        "{err:?}"
    );
    let err = claude
        .event_stream("sesn_missing", None)
        .await
        .err()
        .expect("missing");
    assert!(matches!(err, ProviderError::SessionNotFound(_)), "{err:?}");
    let err = claude.interrupt("sesn_missing").await.expect_err("missing");
    assert!(matches!(err, ProviderError::SessionNotFound(_)), "{err:?}");
    claude
        .destroy("sesn_missing")
        .await
        .expect("destroying an unknown session is fine");
}

#[tokio::test]
async fn deleting_a_session_ends_its_stream() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    claude.destroy(&session).await.expect("destroy");
    assert!(matches!(
        next(&mut stream).await,
        RuntimeEvent::Other { ref event_type, .. } if event_type == "session.deleted"
    ));
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Err(ProviderError::SessionNotFound(id)))) => assert_eq!(id, session),
        other => panic!("expected session not found, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("ends")
            .is_none()
    );
    let err = claude
        .send_message(&session, &text("hi"))
        .await
        .expect_err("gone");
    assert!(matches!(err, ProviderError::SessionNotFound(_)));
}

#[tokio::test]
async fn session_errors_and_exhausted_retries_are_reported() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    claude
        .send_message(&session, &text("error:"))
        .await
        .expect("send");
    let events = turn(&mut stream).await;
    let errors: Vec<_> = events
        .iter()
        .filter_map(|event| match event {
            RuntimeEvent::Error {
                kind,
                retry_status,
                message,
                ..
            } => Some((kind.as_str(), retry_status.as_deref(), message.is_empty())),
            _ => None,
        })
        .collect();
    assert_eq!(
        errors,
        [
            ("model_overloaded_error", Some("retrying"), false),
            ("model_overloaded_error", Some("exhausted"), false)
        ]
    );
    assert!(matches!(
        events.last(),
        Some(RuntimeEvent::Status {
            state: SessionState::Idle,
            stop_reason: Some(StopReason::RetriesExhausted),
            ..
        })
    ));

    claude
        .send_message(&session, &text("refuse:"))
        .await
        .expect("send");
    let events = turn(&mut stream).await;
    assert!(matches!(
        events.last(),
        Some(RuntimeEvent::Status {
            stop_reason: Some(StopReason::Refusal {
                explanation: Some(_)
            }),
            ..
        })
    ));

    claude
        .send_message(&session, &text("terminate:"))
        .await
        .expect("send");
    let events = turn(&mut stream).await;
    assert!(matches!(
        events.as_slice(),
        [.., RuntimeEvent::Error { retry_status: Some(status), .. }, RuntimeEvent::Status { state: SessionState::Terminated, .. }]
            if status == "terminal"
    ));
}

#[tokio::test]
async fn a_tool_waiting_for_permission_runs_once_allowed() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    claude
        .send_message(&session, &text("tool:ls -la"))
        .await
        .expect("send");
    let asked = until_action(&mut stream).await;
    let Some(RuntimeEvent::ToolUse {
        id: tool_use,
        name,
        input,
        evaluated_permission,
        server_name,
    }) = asked
        .iter()
        .find(|event| matches!(event, RuntimeEvent::ToolUse { .. }))
        .cloned()
    else {
        panic!("no tool use in {asked:?}");
    };
    assert_eq!(name, "bash");
    assert_eq!(input, json!({"command": "ls -la"}));
    assert_eq!(evaluated_permission.as_deref(), Some("ask"));
    assert_eq!(server_name, None);
    assert!(matches!(
        asked.last(),
        Some(event @ RuntimeEvent::Status { stop_reason: Some(StopReason::RequiresAction { event_ids }), .. })
            if event_ids == &vec![tool_use.clone()] && !event.ends_turn()
    ));

    claude
        .confirm_tool(&session, &tool_use, ToolDecision::Allow)
        .await
        .expect("confirm");
    let done = turn(&mut stream).await;
    assert!(done.iter().any(|event| matches!(
        event,
        RuntimeEvent::ToolResult { tool_use_id, is_error: false, content, .. }
            if tool_use_id == &tool_use && content == "ran: ls -la"
    )));
    assert_eq!(agent_texts(&done), ["done: ls -la"]);
    assert!(matches!(
        done.last(),
        Some(RuntimeEvent::Status {
            stop_reason: Some(StopReason::EndTurn),
            ..
        })
    ));
    let confirmation = fake
        .user_events(&session)
        .into_iter()
        .find(|event| event["type"] == "user.tool_confirmation")
        .expect("confirmation");
    assert_eq!(confirmation["tool_use_id"], tool_use.as_str());
    assert_eq!(confirmation["result"], "allow");
    assert!(confirmation.get("deny_message").is_none());
}

#[tokio::test]
async fn answering_some_tools_asks_again_for_the_rest() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    claude
        .send_message(&session, &text("tools:2"))
        .await
        .expect("send");
    let asked = until_action(&mut stream).await;
    let Some(RuntimeEvent::Status {
        stop_reason: Some(StopReason::RequiresAction { event_ids }),
        ..
    }) = asked.last()
    else {
        panic!("no action asked: {asked:?}");
    };
    assert_eq!(event_ids.len(), 2);

    claude
        .confirm_tool(&session, &event_ids[0], ToolDecision::Allow)
        .await
        .expect("confirm");
    let again = until_action(&mut stream).await;
    assert!(matches!(
        again.as_slice(),
        [RuntimeEvent::Other { .. }, RuntimeEvent::Status { stop_reason: Some(StopReason::RequiresAction { event_ids: rest }), .. }]
            if rest == &vec![event_ids[1].clone()]
    ));

    claude
        .confirm_tool(
            &session,
            &event_ids[1],
            ToolDecision::Deny {
                message: Some("not now".to_owned()),
            },
        )
        .await
        .expect("deny");
    let done = turn(&mut stream).await;
    let results: Vec<bool> = done
        .iter()
        .filter_map(|event| match event {
            RuntimeEvent::ToolResult { is_error, .. } => Some(*is_error),
            _ => None,
        })
        .collect();
    assert_eq!(results, [false, true]);
    let denial = fake
        .user_events(&session)
        .into_iter()
        .find(|event| event["result"] == "deny")
        .expect("denial");
    assert_eq!(denial["deny_message"], "not now");

    // Confirming a tool nobody asked about is rejected by the runtime.
    let err = claude
        .confirm_tool(&session, "sevt_nothing", ToolDecision::Allow)
        .await
        .expect_err("nothing to confirm");
    assert!(matches!(err, ProviderError::Rejected(_)), "{err:?}");
}

#[tokio::test]
async fn a_custom_tool_result_completes_the_turn() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    claude
        .send_message(&session, &text("custom:weather in Oslo"))
        .await
        .expect("send");
    let asked = until_action(&mut stream).await;
    let Some(RuntimeEvent::CustomToolUse { id, name, input }) = asked
        .iter()
        .find(|event| matches!(event, RuntimeEvent::CustomToolUse { .. }))
        .cloned()
    else {
        panic!("no custom tool use in {asked:?}");
    };
    assert_eq!(name, "lookup");
    assert_eq!(input, json!({"query": "weather in Oslo"}));

    claude
        .submit_tool_result(
            &session,
            &id,
            ToolOutput {
                content: "sunny".to_owned(),
                is_error: false,
            },
        )
        .await
        .expect("result");
    let done = turn(&mut stream).await;
    assert_eq!(agent_texts(&done), ["custom result: sunny"]);
    let result = fake
        .user_events(&session)
        .into_iter()
        .find(|event| event["type"] == "user.custom_tool_result")
        .expect("result event");
    assert_eq!(result["custom_tool_use_id"], id.as_str());
    assert_eq!(
        result["content"],
        json!([{"type": "text", "text": "sunny"}])
    );
    assert_eq!(result["is_error"], false);
}

#[tokio::test]
async fn an_interrupt_ends_a_waiting_turn() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    claude
        .send_message(&session, &text("tool:rm -rf /"))
        .await
        .expect("send");
    until_action(&mut stream).await;
    claude.interrupt(&session).await.expect("interrupt");
    let events = turn(&mut stream).await;
    assert_eq!(kinds(&events), ["user.interrupt", "status:Idle"]);
}

#[tokio::test]
async fn mcp_tools_carry_their_server() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    claude
        .send_message(&session, &text("mcp:rust"))
        .await
        .expect("send");
    let events = turn(&mut stream).await;
    let tool_use = events
        .iter()
        .find_map(|event| match event {
            RuntimeEvent::ToolUse {
                id, server_name, ..
            } => Some((id.clone(), server_name.clone())),
            _ => None,
        })
        .expect("tool use");
    assert_eq!(tool_use.1.as_deref(), Some("docs"));
    assert!(events.iter().any(|event| matches!(
        event,
        RuntimeEvent::ToolResult { tool_use_id, content, .. } if *tool_use_id == tool_use.0 && content == "found: rust"
    )));
}

#[tokio::test]
async fn unknown_events_and_odd_frames_do_not_break_the_stream() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");

    claude
        .send_message(&session, &text("unknown:x"))
        .await
        .expect("send");
    let events = turn(&mut stream).await;
    assert!(kinds(&events).contains(&"agent.future_event".to_owned()));
    assert_eq!(agent_texts(&events), ["echo: unknown:x"]);

    // Frames the SDK skips: without an event line, pings, empty data, and
    // a known type with an unexpected shape.
    fake.inject_raw(
        &session,
        "data: {\"id\":\"x1\",\"type\":\"agent.message\"}\n\n",
    );
    fake.inject_raw(
        &session,
        ": keep-alive comment\n\nevent: ping\ndata: {}\n\n",
    );
    fake.inject_raw(&session, "event: agent.message\n\n");
    fake.inject_raw(&session, "event: agent.message\ndata: not json\n\n");
    let odd = fake
        .inject_event(
            &session,
            json!({"type": "agent.message", "content": "a string"}),
        )
        .expect("injected");
    claude
        .send_message(&session, &text("still here"))
        .await
        .expect("send");
    let odd_event = next(&mut stream).await;
    assert_eq!(odd_event.id(), odd);
    let events = turn(&mut stream).await;
    assert_eq!(agent_texts(&events), ["echo: still here"]);
}

#[tokio::test]
async fn a_transient_stream_error_reconnects_without_loss() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    fake.inject_raw(
        &session,
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"busy\"}}\n\n",
    );
    claude
        .send_message(&session, &text("after error"))
        .await
        .expect("send");
    let events = turn(&mut stream).await;
    assert_eq!(kinds(&events), ECHO_TURN);
    assert_unique(&events);

    // A permanent one ends the stream with its error.
    fake.inject_raw(
        &session,
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"permission_error\",\"message\":\"no\"}}\n\n",
    );
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Err(ProviderError::Unauthorized(_)))) => {}
        other => panic!("expected unauthorized, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stream_that_cannot_reconnect_gives_up() {
    let fake = FakeClaude::start().await;
    let claude = ClaudeProvider::new(ClaudeConfig {
        reconnect_attempts: 3,
        ..config(&fake)
    })
    .expect("provider");
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    let before = fake.request_count("GET", &format!("/v1/sessions/{session}/events/stream"));
    fake.fail_next(Endpoint::Stream, 503, None, 100);
    fake.close_streams(&session);
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Err(ProviderError::Unavailable(message)))) => {
            assert!(message.contains("3 reconnect attempts"), "{message}");
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("ends")
            .is_none()
    );
    let after = fake.request_count("GET", &format!("/v1/sessions/{session}/events/stream"));
    assert_eq!(after - before, 3);
}

#[tokio::test]
async fn a_failed_catch_up_is_retried() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    // The listing fails through its own retries once, so the reconnect
    // attempt fails and the next one catches up.
    fake.fail_next(Endpoint::List, 500, None, 3);
    fake.drop_stream_after(2);
    claude
        .send_message(&session, &text("list trouble"))
        .await
        .expect("send");
    let events = turn(&mut stream).await;
    assert_eq!(kinds(&events), ECHO_TURN);
    assert_unique(&events);
}

#[tokio::test]
async fn deltas_stream_partial_text_before_the_message() {
    let fake = FakeClaude::start().await;
    let claude = ClaudeProvider::new(ClaudeConfig {
        stream_deltas: true,
        ..config(&fake)
    })
    .expect("provider");
    assert!(claude.capabilities().streaming_deltas);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    claude
        .send_message(&session, &text("a reply long enough for deltas"))
        .await
        .expect("send");
    let events = turn(&mut stream).await;
    let message_at = events
        .iter()
        .position(|event| matches!(event, RuntimeEvent::AgentMessage { .. }))
        .expect("message");
    let RuntimeEvent::AgentMessage { id, text } = &events[message_at] else {
        unreachable!()
    };
    let deltas: Vec<&RuntimeEvent> = events
        .iter()
        .filter(|event| matches!(event, RuntimeEvent::AgentMessageDelta { .. }))
        .collect();
    assert!(deltas.len() >= 2, "{events:?}");
    let mut joined = String::new();
    for delta in &deltas {
        let RuntimeEvent::AgentMessageDelta {
            message_id, text, ..
        } = delta
        else {
            unreachable!()
        };
        assert_eq!(message_id, id);
        joined.push_str(text);
    }
    assert_eq!(&joined, text);
    assert!(
        events[..message_at]
            .iter()
            .filter(|event| matches!(event, RuntimeEvent::AgentMessageDelta { .. }))
            .count()
            == deltas.len()
    );
    assert_unique(&events);
    let stream_request = fake
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/events/stream"))
        .expect("stream request");
    assert_eq!(
        stream_request.query.as_deref(),
        Some("event_deltas%5B%5D=agent.message")
    );

    // A delta's id can be used as a cursor: the message it belongs to is
    // delivered again in full.
    let first_delta = deltas[0].id().to_owned();
    drop(stream);
    let mut resumed = claude
        .event_stream(&session, Some(&first_delta))
        .await
        .expect("resume");
    let rest = turn(&mut resumed).await;
    assert!(matches!(&rest[0], RuntimeEvent::AgentMessage { id: again, .. } if again == id));
}

#[tokio::test]
async fn files_are_sent_as_content_blocks() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let message = UserMessage {
        text: "see attached".to_owned(),
        files: vec![
            UserFile {
                file_name: "cat.png".to_owned(),
                mime_type: "image/png".to_owned(),
                data: vec![0x89, b'P', b'N', b'G'],
            },
            UserFile {
                file_name: "report.pdf".to_owned(),
                mime_type: "application/pdf".to_owned(),
                data: b"%PDF".to_vec(),
            },
        ],
    };
    claude.send_message(&session, &message).await.expect("send");
    let sent = &fake.user_events(&session)[0];
    assert_eq!(
        sent["content"],
        json!([
            {"type": "text", "text": "see attached"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw=="}},
            {"type": "document", "title": "report.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERg=="}},
        ])
    );
    assert_eq!(fake.user_messages(&session), ["see attached"]);
}

#[tokio::test]
async fn a_session_is_created_with_its_spec() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    fake.fail_next(Endpoint::CreateSession, 400, None, 1);
    let err = claude.create_session(&spec()).await.expect_err("400");
    assert!(
        matches!(err, ProviderError::Rejected(ref m) if m.contains("invalid_request_error")),
        "{err:?}"
    );
    let session = claude.create_session(&spec()).await.expect("create");
    assert_eq!(fake.sessions(), [session]);
    let debug = format!("{:?}", config(&fake));
    assert!(
        !debug.contains(FakeClaude::API_KEY),
        "the key is redacted: {debug}"
    );
}

#[tokio::test]
async fn many_sessions_run_at_once() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let mut tasks = Vec::new();
    for n in 0..50 {
        let claude = claude.clone();
        tasks.push(tokio::spawn(async move {
            let session = claude.create_session(&spec()).await.expect("create");
            let mut stream = claude.event_stream(&session, None).await.expect("stream");
            for turn_number in 0..3 {
                let said = format!("session {n} turn {turn_number}");
                claude
                    .send_message(&session, &text(&said))
                    .await
                    .expect("send");
                let events = turn(&mut stream).await;
                assert_eq!(agent_texts(&events), [format!("echo: {said}")]);
            }
        }));
    }
    for task in tasks {
        task.await.expect("session task");
    }
    assert_eq!(fake.sessions().len(), 50);
}

#[tokio::test]
async fn a_scripted_reply_is_delivered() {
    let fake = FakeClaude::start().await;
    fake.set_reply(|said| (said == "script me").then(|| FakeClaude::turn("scripted answer")));
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    assert_eq!(fake.live_streams(&session), 1);
    claude
        .send_message(&session, &text("script me"))
        .await
        .expect("send");
    let events = turn(&mut stream).await;
    assert_eq!(
        kinds(&events),
        ["user.message", "status:Running", "message", "status:Idle"]
    );
    assert_eq!(agent_texts(&events), ["scripted answer"]);
    claude
        .send_message(&session, &text("not scripted"))
        .await
        .expect("send");
    assert_eq!(
        agent_texts(&turn(&mut stream).await),
        ["echo: not scripted"]
    );
    drop(stream);
}

/// The fake's own contract, checked with a plain HTTP client.
#[tokio::test]
async fn the_fake_answers_in_the_api_error_shape() {
    let fake = FakeClaude::start().await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/sessions", fake.base_url());
    let call = |beta: Option<&'static str>, body: &'static str| {
        let mut request = http
            .post(&url)
            .header("x-api-key", FakeClaude::API_KEY)
            .header("anthropic-version", "2026-10-21")
            .body(body);
        if let Some(beta) = beta {
            request = request.header("anthropic-beta", beta);
        }
        request.send()
    };

    let response = call(Some("other-beta,managed-agents-2026-04-01"), "{not json")
        .await
        .expect("send");
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["request_id"].is_string());

    let response = call(None, r#"{"agent":"a","environment_id":"e"}"#)
        .await
        .expect("send");
    assert_eq!(response.status(), 400, "the beta header is required");

    let response = call(
        Some("managed-agents-2026-04-01"),
        r#"{"agent":{"type":"agent","id":"a","version":2},"environment_id":"e"}"#,
    )
    .await
    .expect("send");
    assert_eq!(response.status(), 200, "x-api-key works too");
    let session: serde_json::Value = response.json().await.expect("json");
    assert_eq!(session["type"], "session");
    assert_eq!(session["status"], "idle");

    let id = session["id"].as_str().expect("id");
    let response = http
        .get(format!(
            "{}/v1/sessions/{id}/events?limit=5000",
            fake.base_url()
        ))
        .bearer_auth(FakeClaude::API_KEY)
        .header("anthropic-version", "2026-10-21")
        .header("anthropic-beta", "managed-agents-2026-04-01")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 400);
    let response = http
        .get(format!(
            "{}/v1/sessions/{id}/events?limit=5&order=desc",
            fake.base_url()
        ))
        .bearer_auth(FakeClaude::API_KEY)
        .header("anthropic-version", "2026-10-21")
        .header("anthropic-beta", "managed-agents-2026-04-01")
        .send()
        .await
        .expect("send");
    let page: serde_json::Value = response.json().await.expect("json");
    assert_eq!(page, json!({"data": [], "next_page": null}));
}

#[tokio::test]
async fn deltas_and_a_dropped_stream_still_give_the_message_once() {
    let fake = FakeClaude::start().await;
    let claude = ClaudeProvider::new(ClaudeConfig {
        stream_deltas: true,
        ..config(&fake)
    })
    .expect("provider");
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    for drop_after in [3, 4, 5] {
        fake.drop_stream_after(drop_after);
        claude
            .send_message(&session, &text("long:300"))
            .await
            .expect("send");
        let events = turn(&mut stream).await;
        assert_unique(&events);
        let messages = agent_texts(&events);
        assert_eq!(messages.len(), 1, "drop after {drop_after}");
        assert_eq!(messages[0].len(), 300);
        let message_at = events
            .iter()
            .position(|event| matches!(event, RuntimeEvent::AgentMessage { .. }))
            .expect("message");
        assert!(
            events[message_at..]
                .iter()
                .all(|event| !matches!(event, RuntimeEvent::AgentMessageDelta { .. })),
            "no delta after its message"
        );
    }
}

// ---------------------------------------------------------------------------
// One shared event stream per session
// ---------------------------------------------------------------------------

fn stream_requests(fake: &FakeClaude, session: &str) -> usize {
    fake.request_count("GET", &format!("/v1/sessions/{session}/events/stream"))
}

/// `GET …/events` (the history), not the live stream.
fn list_requests(fake: &FakeClaude, session: &str) -> Vec<String> {
    let path = format!("/v1/sessions/{session}/events");
    fake.requests()
        .into_iter()
        .filter(|request| request.method == "GET" && request.path == path)
        .map(|request| request.query.unwrap_or_default())
        .collect()
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < WAIT,
            "{what} did not happen within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn consecutive_turns_share_one_stream_connection() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    for said in ["one", "two", "three"] {
        // What the bridge does per turn: open, send, read to the end, drop.
        let mut stream = claude.event_stream(&session, None).await.expect("stream");
        let sent = claude
            .send_message(&session, &text(said))
            .await
            .expect("send");
        let events = turn(&mut stream).await;
        assert_eq!(kinds(&events), ECHO_TURN, "turn {said}");
        assert_eq!(events[0].id(), sent);
        assert_eq!(agent_texts(&events), [format!("echo: {said}")]);
        drop(stream);
    }
    assert_eq!(stream_requests(&fake, &session), 1, "one connection");
    assert_eq!(
        fake.live_streams(&session),
        1,
        "kept open for the next turn"
    );
    assert_eq!(
        list_requests(&fake, &session),
        Vec::<String>::new(),
        "no history request (no limit=1 lookup)"
    );
    // create + stream + one POST per turn
    assert_eq!(fake.requests().len(), 5, "{:?}", fake.requests());
}

#[tokio::test]
async fn an_unused_stream_closes_after_its_linger_time_and_the_next_turn_reopens_it() {
    let fake = FakeClaude::start().await;
    let claude = ClaudeProvider::new(ClaudeConfig {
        stream_linger: Duration::from_millis(300),
        ..config(&fake)
    })
    .expect("provider");
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    claude
        .send_message(&session, &text("one"))
        .await
        .expect("send");
    turn(&mut stream).await;
    drop(stream);
    assert_eq!(fake.live_streams(&session), 1, "lingers for a while");
    eventually("the unused stream closing", || {
        fake.live_streams(&session) == 0
    })
    .await;

    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    assert_eq!(fake.live_streams(&session), 1);
    claude
        .send_message(&session, &text("two"))
        .await
        .expect("send");
    let events = turn(&mut stream).await;
    assert_eq!(kinds(&events), ECHO_TURN);
    assert_eq!(agent_texts(&events), ["echo: two"]);
    assert_eq!(stream_requests(&fake, &session), 2, "reopened once");

    // A stream in use does not close, however long the turn takes.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(fake.live_streams(&session), 1);
    claude
        .send_message(&session, &text("three"))
        .await
        .expect("send");
    assert_eq!(agent_texts(&turn(&mut stream).await), ["echo: three"]);
    assert_eq!(stream_requests(&fake, &session), 2);
}

#[tokio::test]
async fn a_shared_stream_dropped_mid_turn_delivers_every_event_once() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    claude
        .send_message(&session, &text("warm up"))
        .await
        .expect("send");
    turn(&mut stream).await;
    drop(stream);

    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    fake.drop_stream_after(3);
    let sent = claude
        .send_message(&session, &text("through a drop"))
        .await
        .expect("send");
    let events = turn(&mut stream).await;
    assert_eq!(kinds(&events), ECHO_TURN);
    assert_eq!(events[0].id(), sent);
    assert_eq!(agent_texts(&events), ["echo: through a drop"]);
    assert_unique(&events);
    quiet(&mut stream).await;
    assert_eq!(stream_requests(&fake, &session), 2, "one reconnect");
    let listed = list_requests(&fake, &session);
    assert_eq!(listed.len(), 1, "one catch-up: {listed:?}");
    assert!(!listed[0].contains("limit=1&"), "{listed:?}");
}

#[tokio::test]
async fn a_new_stream_dropped_before_its_first_event_starts_at_the_sent_message() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    // History from before this stream, which must not be replayed.
    let other = provider(&fake);
    let mut earlier = other.event_stream(&session, None).await.expect("stream");
    other
        .send_message(&session, &text("before"))
        .await
        .expect("send");
    let before = turn(&mut earlier).await;
    drop(earlier);

    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    fake.drop_stream_after(0);
    let sent = claude
        .send_message(&session, &text("after"))
        .await
        .expect("send");
    let events = turn(&mut stream).await;
    assert_eq!(kinds(&events), ECHO_TURN);
    assert_eq!(events[0].id(), sent);
    assert_eq!(agent_texts(&events), ["echo: after"]);
    let before: HashSet<String> = ids(&before).into_iter().collect();
    assert!(events.iter().all(|event| !before.contains(event.id())));
    quiet(&mut stream).await;
    assert!(
        list_requests(&fake, &session)
            .iter()
            .all(|query| !query.contains("limit=1&")),
        "the sent message gave the position, no lookup"
    );
}

#[tokio::test]
async fn two_concurrent_readers_each_get_every_event() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut readers = Vec::new();
    for _ in 0..2 {
        let mut stream = claude.event_stream(&session, None).await.expect("stream");
        readers.push(tokio::spawn(async move {
            let mut events = turn(&mut stream).await;
            events.extend(turn(&mut stream).await);
            events
        }));
    }
    claude
        .send_message(&session, &text("first"))
        .await
        .expect("send");
    claude
        .send_message(&session, &text("second"))
        .await
        .expect("send");
    let mut got = Vec::new();
    for reader in readers {
        got.push(reader.await.expect("reader"));
    }
    assert_eq!(agent_texts(&got[0]), ["echo: first", "echo: second"]);
    assert_eq!(
        ids(&got[0]),
        ids(&got[1]),
        "the same events, in the same order"
    );
    assert_unique(&got[0]);
    assert_eq!(stream_requests(&fake, &session), 1, "one shared connection");
}

#[tokio::test]
async fn a_reader_that_falls_behind_catches_up_from_the_history() {
    let fake = FakeClaude::start().await;
    let claude = ClaudeProvider::new(ClaudeConfig {
        stream_replay_events: 16,
        ..config(&fake)
    })
    .expect("provider");
    let session = claude.create_session(&spec()).await.expect("create");
    // The slow reader attaches before the stream received anything.
    let mut slow = claude.event_stream(&session, None).await.expect("stream");
    let mut fast = claude.event_stream(&session, None).await.expect("stream");
    let inject = |count: usize| {
        for n in 0..count {
            fake.inject_event(
                &session,
                json!({"type": "agent.message", "content": [{"type": "text", "text": format!("n{n}")}]}),
            );
        }
    };

    for round in 0..2 {
        let sent = claude
            .send_message(&session, &text(&format!("round {round}")))
            .await
            .expect("send");
        inject(40);
        let history: Vec<String> = fake
            .events(&session)
            .iter()
            .map(|event| event["id"].as_str().expect("id").to_owned())
            .collect();
        let start = history.iter().position(|id| *id == sent).expect("sent");
        let expected = &history[start..];
        assert_eq!(expected.len(), 47);
        // Both read after far more than the 16 kept events went by (the
        // "fast" one too, as all 40 arrive at once): each catches up from
        // the history, and gets every event once and in order.
        for reader in [&mut fast, &mut slow] {
            let mut got = turn(reader).await;
            for _ in 0..40 {
                got.push(next(reader).await);
            }
            assert_eq!(ids(&got), expected, "round {round}");
            quiet(reader).await;
        }
    }
    assert_eq!(stream_requests(&fake, &session), 1);
    let listed = list_requests(&fake, &session);
    assert!(listed.len() >= 2, "caught up from the history: {listed:?}");
}

#[tokio::test]
async fn resuming_after_a_recent_event_is_served_from_memory() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    let anchor = claude
        .send_message(&session, &text("one"))
        .await
        .expect("send");
    let one = turn(&mut stream).await;
    drop(stream);

    let mut resumed = claude
        .event_stream(&session, Some(&anchor))
        .await
        .expect("resume");
    let rest = turn(&mut resumed).await;
    assert_eq!(ids(&rest), ids(&one[1..]));
    claude
        .send_message(&session, &text("two"))
        .await
        .expect("send");
    assert_eq!(agent_texts(&turn(&mut resumed).await), ["echo: two"]);
    assert!(list_requests(&fake, &session).is_empty());
    assert_eq!(stream_requests(&fake, &session), 1);

    // A provider that never saw the session reads the history instead.
    let restarted = provider(&fake);
    let mut resumed = restarted
        .event_stream(&session, Some(&anchor))
        .await
        .expect("resume");
    assert_eq!(ids(&turn(&mut resumed).await), ids(&one[1..]));
    assert_eq!(list_requests(&fake, &session).len(), 1);
}

#[tokio::test]
async fn a_destroyed_session_gets_no_stale_stream() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let mut stream = claude.event_stream(&session, None).await.expect("stream");
    claude
        .send_message(&session, &text("one"))
        .await
        .expect("send");
    turn(&mut stream).await;
    drop(stream);
    claude.destroy(&session).await.expect("destroy");
    let err = claude
        .event_stream(&session, None)
        .await
        .err()
        .expect("gone");
    assert!(matches!(err, ProviderError::SessionNotFound(_)), "{err:?}");
}

#[tokio::test]
async fn dropping_the_provider_closes_its_streams() {
    let fake = FakeClaude::start().await;
    let claude = provider(&fake);
    let session = claude.create_session(&spec()).await.expect("create");
    let stream = claude.event_stream(&session, None).await.expect("stream");
    drop(stream);
    assert_eq!(fake.live_streams(&session), 1);
    drop(claude);
    eventually("the stream closing", || fake.live_streams(&session) == 0).await;
}
