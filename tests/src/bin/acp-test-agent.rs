//! A scripted ACP v1 agent for the ACP provider's tests, built with the
//! agent side of the `agent-client-protocol` crate. What it does depends on
//! the prompt text:
//!
//! - plain text: a thought chunk, then `echo: <text>` in several message
//!   chunks (plus ` [image <mime>]` per image block), a usage update,
//!   `end_turn`;
//! - `permission:<Tool>`: a tool call, then `session/request_permission`
//!   with the options `allow-once`, `allow-always`, `reject-once`; replies
//!   `chosen: <option id>` (or `chosen: cancelled`);
//! - `slow:…`: a chunk every 100 ms until cancelled, then `cancelled`;
//! - `crash`: exits mid-turn; `hang`: never answers;
//! - `spawn-child`: starts a long `sleep` and writes its pid to
//!   `<cwd>/.acp-grandchild.pid`;
//! - `session-id`: replies `session: <its ACP session id>`;
//! - `refuse`: stops with `refusal`.
//!
//! It writes its own pid to `<cwd>/.acp-agent.pid` on start. With
//! `ACP_TEST_NO_LOAD=1` it does not advertise `session/load`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_client_protocol::schema::ProtocolVersion;
use agent_client_protocol::v1::schema::{
    AgentCapabilities, CancelNotification, ContentBlock, ContentChunk, Cost, InitializeRequest,
    InitializeResponse, LoadSessionRequest, LoadSessionResponse, NewSessionRequest,
    NewSessionResponse, PermissionOption, PermissionOptionKind, PromptCapabilities, PromptRequest,
    PromptResponse, RequestPermissionOutcome, RequestPermissionRequest, SessionId,
    SessionNotification, SessionUpdate, StopReason, TextContent, ToolCall, ToolCallContent,
    ToolCallStatus, ToolCallUpdate, ToolCallUpdateFields, ToolKind, UsageUpdate,
};
use agent_client_protocol::v1::{ConnectionTo, Responder};
use agent_client_protocol::{Agent, ByteStreams, Client};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// State shared by the handlers.
#[derive(Default)]
struct State {
    sessions: AtomicU64,
    /// Set by `session/cancel`, cleared when a prompt starts.
    cancelled: AtomicBool,
    session: Mutex<Option<SessionId>>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), agent_client_protocol::Error> {
    let cwd = std::env::current_dir().map_err(agent_client_protocol::Error::into_internal_error)?;
    let pid = std::process::id();
    std::fs::write(cwd.join(".acp-agent.pid"), pid.to_string())
        .map_err(agent_client_protocol::Error::into_internal_error)?;
    eprintln!("acp-test-agent started pid={pid}");
    let load = std::env::var("ACP_TEST_NO_LOAD").is_err();
    let state = Arc::new(State::default());
    let (on_new, on_load, on_prompt, on_cancel) =
        (state.clone(), state.clone(), state.clone(), state.clone());

    Agent
        .v1()
        .name("acp-test-agent")
        .on_receive_request(
            async move |init: InitializeRequest, responder: Responder<InitializeResponse>, _cx| {
                responder.respond(
                    InitializeResponse::new(init.protocol_version.min(ProtocolVersion::V1))
                        .agent_capabilities(
                            AgentCapabilities::new()
                                .load_session(load)
                                .prompt_capabilities(PromptCapabilities::new().image(true)),
                        ),
                )
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |_: NewSessionRequest, responder: Responder<NewSessionResponse>, _cx| {
                let n = on_new.sessions.fetch_add(1, Ordering::SeqCst);
                let id = SessionId::from(format!("sess-{pid}-{n}"));
                *on_new.session.lock().expect("lock") = Some(id.clone());
                responder.respond(NewSessionResponse::new(id))
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |request: LoadSessionRequest,
                        responder: Responder<LoadSessionResponse>,
                        cx: ConnectionTo<Client>| {
                // Replay some history, as real agents do.
                let id = request.session_id;
                send(
                    &cx,
                    &id,
                    SessionUpdate::UserMessageChunk(text_chunk("earlier question")),
                )?;
                send(
                    &cx,
                    &id,
                    SessionUpdate::AgentMessageChunk(text_chunk("replayed answer")),
                )?;
                *on_load.session.lock().expect("lock") = Some(id);
                responder.respond(LoadSessionResponse::new())
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |request: PromptRequest,
                        responder: Responder<PromptResponse>,
                        cx: ConnectionTo<Client>| {
                on_prompt.cancelled.store(false, Ordering::SeqCst);
                let state = on_prompt.clone();
                // Off the dispatch loop: the turn sends requests of its own.
                cx.clone().spawn(async move {
                    let stop = turn(&cx, &state, request).await?;
                    match stop {
                        Some(stop) => responder.respond(PromptResponse::new(stop)),
                        None => {
                            // "hang": keep the request open forever.
                            let _keep = responder;
                            futures::future::pending::<()>().await;
                            Ok(())
                        }
                    }
                })
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_notification(
            async move |_: CancelNotification, _cx| {
                on_cancel.cancelled.store(true, Ordering::SeqCst);
                Ok(())
            },
            agent_client_protocol::on_receive_notification!(),
        )
        .connect_to(ByteStreams::new(
            tokio::io::stdout().compat_write(),
            tokio::io::stdin().compat(),
        ))
        .await
}

/// Runs one prompt; `None` means never answer.
async fn turn(
    cx: &ConnectionTo<Client>,
    state: &State,
    request: PromptRequest,
) -> Result<Option<StopReason>, agent_client_protocol::Error> {
    let id = request.session_id;
    let mut text = String::new();
    let mut images = Vec::new();
    for block in &request.prompt {
        match block {
            ContentBlock::Text(t) => text.push_str(&t.text),
            ContentBlock::Image(i) => images.push(i.mime_type.clone()),
            _ => {}
        }
    }
    let say = |text: &str| send(cx, &id, SessionUpdate::AgentMessageChunk(text_chunk(text)));

    if text == "crash" {
        say("about to crash")?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::process::exit(3);
    }
    if text == "hang" {
        return Ok(None);
    }
    if text == "refuse" {
        say("no")?;
        return Ok(Some(StopReason::Refusal));
    }
    if text == "session-id" {
        let current = state.session.lock().expect("lock").clone();
        say(&format!(
            "session: {}",
            current.map(|s| s.to_string()).unwrap_or_default()
        ))?;
        return Ok(Some(StopReason::EndTurn));
    }
    if text == "spawn-child" {
        let child = std::process::Command::new("sleep")
            .arg("300")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(agent_client_protocol::Error::into_internal_error)?;
        let cwd =
            std::env::current_dir().map_err(agent_client_protocol::Error::into_internal_error)?;
        std::fs::write(cwd.join(".acp-grandchild.pid"), child.id().to_string())
            .map_err(agent_client_protocol::Error::into_internal_error)?;
        // Deliberately not waited for: only killing the group stops it.
        drop(child);
        say("spawned")?;
        return Ok(Some(StopReason::EndTurn));
    }
    if text.starts_with("slow:") {
        for _ in 0..600 {
            if state.cancelled.load(Ordering::SeqCst) {
                return Ok(Some(StopReason::Cancelled));
            }
            say("tick ")?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        return Ok(Some(StopReason::EndTurn));
    }
    if let Some(tool) = text.strip_prefix("permission:") {
        let input = serde_json::json!({ "command": format!("run {tool}") });
        send(
            cx,
            &id,
            SessionUpdate::ToolCall(
                ToolCall::new("call-1", tool)
                    .kind(ToolKind::Execute)
                    .status(ToolCallStatus::Pending)
                    .raw_input(input.clone()),
            ),
        )?;
        let options = vec![
            PermissionOption::new("allow-once", "Allow once", PermissionOptionKind::AllowOnce),
            PermissionOption::new(
                "allow-always",
                "Always allow",
                PermissionOptionKind::AllowAlways,
            ),
            PermissionOption::new("reject-once", "Reject", PermissionOptionKind::RejectOnce),
        ];
        let asked = RequestPermissionRequest::new(
            id.clone(),
            ToolCallUpdate::new(
                "call-1",
                ToolCallUpdateFields::new()
                    .title(tool.to_owned())
                    .raw_input(input),
            ),
            options,
        );
        let answer = cx.send_request(asked).block_task().await?;
        let chosen = match answer.outcome {
            RequestPermissionOutcome::Selected(selected) => selected.option_id.to_string(),
            _ => "cancelled".to_owned(),
        };
        let status = if chosen.starts_with("allow") {
            ToolCallStatus::Completed
        } else {
            ToolCallStatus::Failed
        };
        send(
            cx,
            &id,
            SessionUpdate::ToolCallUpdate(ToolCallUpdate::new(
                "call-1",
                ToolCallUpdateFields::new()
                    .status(status)
                    .content(vec![ToolCallContent::from(ContentBlock::Text(
                        TextContent::new(format!("{tool} {chosen}")),
                    ))]),
            )),
        )?;
        say(&format!("chosen: {chosen}"))?;
        let stop = if chosen == "cancelled" || state.cancelled.load(Ordering::SeqCst) {
            StopReason::Cancelled
        } else {
            StopReason::EndTurn
        };
        return Ok(Some(stop));
    }

    send(
        cx,
        &id,
        SessionUpdate::AgentThoughtChunk(text_chunk("thinking about it")),
    )?;
    let mut reply = format!("echo: {text}");
    for mime in images {
        reply.push_str(&format!(" [image {mime}]"));
    }
    // Three chunks, split on character boundaries.
    let chars: Vec<char> = reply.chars().collect();
    let third = chars.len().div_ceil(3).max(1);
    for part in chars.chunks(third) {
        say(&part.iter().collect::<String>())?;
    }
    send(
        cx,
        &id,
        SessionUpdate::UsageUpdate(UsageUpdate::new(42, 1000).cost(Cost::new(0.0125, "USD"))),
    )?;
    Ok(Some(StopReason::EndTurn))
}

fn text_chunk(text: &str) -> ContentChunk {
    ContentChunk::new(ContentBlock::Text(TextContent::new(text)))
}

fn send(
    cx: &ConnectionTo<Client>,
    session: &SessionId,
    update: SessionUpdate,
) -> Result<(), agent_client_protocol::Error> {
    cx.send_notification(SessionNotification::new(session.clone(), update))
}
