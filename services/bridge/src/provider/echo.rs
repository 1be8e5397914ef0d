//! The `echo` runtime: replies with what it was sent. For checking the
//! wiring before spending money on a real agent; labelled as such wherever
//! it runs.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::broadcast;

use super::{
    Capabilities, EventStream, Provider, ProviderError, Result, RuntimeEvent, SessionSpec,
    SessionState, StopReason, ToolDecision, ToolOutput, UserMessage,
};

/// Events kept per session for catch-up.
const KEPT_EVENTS: usize = 64;

/// In-process echo runtime.
#[derive(Default)]
pub struct EchoProvider {
    sessions: Mutex<HashMap<String, EchoSession>>,
    next_id: AtomicU64,
}

struct EchoSession {
    log: VecDeque<RuntimeEvent>,
    live: broadcast::Sender<RuntimeEvent>,
}

impl EchoProvider {
    /// A new echo runtime with no sessions.
    pub fn new() -> Self {
        Self::default()
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}_{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn emit(&self, session_id: &str, events: Vec<RuntimeEvent>) -> Result<()> {
        let mut sessions = self.sessions.lock().expect("echo sessions lock");
        let session = sessions
            .get_mut(session_id)
            .ok_or_else(|| ProviderError::SessionNotFound(session_id.to_owned()))?;
        for event in events {
            if session.log.len() == KEPT_EVENTS {
                session.log.pop_front();
            }
            session.log.push_back(event.clone());
            let _ = session.live.send(event);
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for EchoProvider {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            interrupt: true,
            ..Capabilities::default()
        }
    }

    async fn create_session(&self, _spec: &SessionSpec) -> Result<String> {
        let id = self.id("echo_session");
        let (live, _) = broadcast::channel(KEPT_EVENTS);
        self.sessions.lock().expect("echo sessions lock").insert(
            id.clone(),
            EchoSession {
                log: VecDeque::new(),
                live,
            },
        );
        Ok(id)
    }

    async fn event_stream(&self, session_id: &str, after: Option<&str>) -> Result<EventStream> {
        let sessions = self.sessions.lock().expect("echo sessions lock");
        let session = sessions
            .get(session_id)
            .ok_or_else(|| ProviderError::SessionNotFound(session_id.to_owned()))?;
        // Snapshot and subscribe under one lock: no gap, no duplicate.
        let backlog: Vec<RuntimeEvent> = match after {
            Some(after) => session
                .log
                .iter()
                .skip_while(|e| e.id() != after)
                .skip(1)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        let live = tokio_stream_from(session.live.subscribe());
        Ok(futures::stream::iter(backlog.into_iter().map(Ok))
            .chain(live)
            .boxed())
    }

    async fn send_message(&self, session_id: &str, message: &UserMessage) -> Result<String> {
        let user_event = self.id("echo_user");
        let mut text = message.text.clone();
        for file in &message.files {
            text.push_str(&format!(
                "\n[file {} ({}, {} bytes)]",
                file.file_name,
                file.mime_type,
                file.data.len()
            ));
        }
        let events = vec![
            RuntimeEvent::Other {
                id: user_event.clone(),
                event_type: "user.message".into(),
            },
            RuntimeEvent::Status {
                id: self.id("echo_status"),
                state: SessionState::Running,
                stop_reason: None,
            },
            RuntimeEvent::AgentMessage {
                id: self.id("echo_message"),
                text,
            },
            RuntimeEvent::Status {
                id: self.id("echo_status"),
                state: SessionState::Idle,
                stop_reason: Some(StopReason::EndTurn),
            },
        ];
        self.emit(session_id, events)?;
        Ok(user_event)
    }

    async fn interrupt(&self, session_id: &str) -> Result<()> {
        let idle = RuntimeEvent::Status {
            id: self.id("echo_status"),
            state: SessionState::Idle,
            stop_reason: Some(StopReason::EndTurn),
        };
        self.emit(session_id, vec![idle])
    }

    async fn confirm_tool(&self, _: &str, _: &str, _: ToolDecision) -> Result<()> {
        Err(ProviderError::Unsupported("tool confirmation"))
    }

    async fn submit_tool_result(&self, _: &str, _: &str, _: ToolOutput) -> Result<()> {
        Err(ProviderError::Unsupported("custom tools"))
    }

    async fn destroy(&self, session_id: &str) -> Result<()> {
        self.sessions
            .lock()
            .expect("echo sessions lock")
            .remove(session_id);
        Ok(())
    }
}

/// Turns a broadcast receiver into a stream; a lagging reader gets an error
/// rather than silently missing events.
fn tokio_stream_from(
    rx: broadcast::Receiver<RuntimeEvent>,
) -> impl futures::Stream<Item = Result<RuntimeEvent>> {
    futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(event) => Some((Ok(event), rx)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some((
                Err(ProviderError::Protocol(format!(
                    "echo stream lagged by {n} events"
                ))),
                rx,
            )),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replies_with_what_it_was_sent_and_catches_up() {
        let echo = EchoProvider::new();
        let session = echo.create_session(&SessionSpec::default()).await.unwrap();
        let mut stream = echo.event_stream(&session, None).await.unwrap();
        let message = UserMessage {
            text: "hello".into(),
            files: vec![],
        };
        let anchor = echo.send_message(&session, &message).await.unwrap();
        let mut text = None;
        while let Some(event) = stream.next().await {
            let event = event.unwrap();
            if let RuntimeEvent::AgentMessage { text: t, .. } = &event {
                text = Some(t.clone());
            }
            if event.ends_turn() {
                break;
            }
        }
        assert_eq!(text.as_deref(), Some("hello"));

        let replay: Vec<_> = echo
            .event_stream(&session, Some(&anchor))
            .await
            .unwrap()
            .take(3)
            .collect()
            .await;
        assert_eq!(replay.len(), 3);
        assert!(replay[2].as_ref().unwrap().ends_turn());
        assert!(matches!(
            echo.event_stream("nope", None).await,
            Err(ProviderError::SessionNotFound(_))
        ));
    }
}
