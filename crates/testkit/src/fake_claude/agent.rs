//! The fake agent: how a session answers user events.

use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use super::{Log, Session, Shared};

/// An action the agent waits for.
pub(super) struct Pending {
    pub event_id: String,
    pub kind: PendingKind,
    pub answer: Option<Answer>,
}

pub(super) enum PendingKind {
    /// A tool use with `evaluated_permission: "ask"`.
    Confirm { command: String },
    /// An `agent.custom_tool_use`.
    Custom,
}

pub(super) enum Answer {
    Allow,
    Deny(Option<String>),
    Result { text: String, is_error: bool },
}

/// What the agent does once every pending action is answered.
pub(super) enum Resume {
    /// Run the confirmed tools, then say `done: <label>`.
    Tools { label: String },
    /// Say what the custom tool returned.
    Custom,
}

/// Checks a user event before anything is stored; the error is the
/// `invalid_request_error` message.
pub(super) fn validate(log: &Log, event: &Value) -> Result<(), String> {
    let kind = event["type"]
        .as_str()
        .ok_or("events: each event needs a type")?;
    match kind {
        "user.message" => {
            let content = event["content"]
                .as_array()
                .ok_or("user.message: content must be a list")?;
            if content.is_empty() {
                return Err("user.message: content must not be empty".into());
            }
            for block in content {
                match block["type"].as_str() {
                    Some("text") if block["text"].is_string() => {}
                    Some("image") | Some("document") if block["source"].is_object() => {}
                    _ => return Err("user.message: unsupported content block".into()),
                }
            }
            Ok(())
        }
        "user.interrupt" => Ok(()),
        "user.tool_confirmation" => {
            let id = event["tool_use_id"]
                .as_str()
                .ok_or("user.tool_confirmation: tool_use_id is required")?;
            match event["result"].as_str() {
                Some("allow") | Some("deny") => {}
                _ => return Err("user.tool_confirmation: result must be allow or deny".into()),
            }
            if event.get("deny_message").is_some_and(|m| !m.is_null()) && event["result"] != "deny"
            {
                return Err(
                    "user.tool_confirmation: deny_message is only allowed with deny".into(),
                );
            }
            waiting(log, id, |kind| matches!(kind, PendingKind::Confirm { .. }))
                .then_some(())
                .ok_or_else(|| format!("tool_use_id {id} is not awaiting confirmation"))
        }
        "user.custom_tool_result" => {
            let id = event["custom_tool_use_id"]
                .as_str()
                .ok_or("user.custom_tool_result: custom_tool_use_id is required")?;
            waiting(log, id, |kind| matches!(kind, PendingKind::Custom))
                .then_some(())
                .ok_or_else(|| format!("custom_tool_use_id {id} is not awaiting a result"))
        }
        other => Err(format!("events: unsupported event type {other}")),
    }
}

fn waiting(log: &Log, id: &str, kind: impl Fn(&PendingKind) -> bool) -> bool {
    log.pending
        .iter()
        .any(|p| p.event_id == id && p.answer.is_none() && kind(&p.kind))
}

/// Acts on a stored user event.
pub(super) fn react(shared: &Shared, session: &Session, log: &mut Log, event: &Value) {
    let agent = Agent { shared, session };
    match event["type"].as_str().unwrap_or_default() {
        "user.message" => {
            let text = text_of(&event["content"]);
            log.user_texts.push(text.clone());
            log.pending.clear();
            log.resume = None;
            let reply = shared
                .reply
                .read()
                .unwrap_or_else(|poison| poison.into_inner())
                .clone();
            match reply.and_then(|reply| reply(&text)) {
                Some(events) => {
                    for event in events {
                        agent.emit(log, event);
                    }
                }
                None => agent.turn(log, &text),
            }
        }
        "user.interrupt" if !log.pending.is_empty() || log.status == "running" => {
            log.pending.clear();
            log.resume = None;
            agent.idle(log, json!({"type": "end_turn"}));
        }
        "user.tool_confirmation" => {
            let id = event["tool_use_id"].as_str().unwrap_or_default();
            let answer = if event["result"] == "allow" {
                Answer::Allow
            } else {
                Answer::Deny(event["deny_message"].as_str().map(str::to_owned))
            };
            answer_pending(log, id, answer);
            agent.advance(log);
        }
        "user.custom_tool_result" => {
            let id = event["custom_tool_use_id"].as_str().unwrap_or_default();
            let answer = Answer::Result {
                text: text_of(&event["content"]),
                is_error: event["is_error"].as_bool().unwrap_or(false),
            };
            answer_pending(log, id, answer);
            agent.advance(log);
        }
        _ => {}
    }
}

fn answer_pending(log: &mut Log, id: &str, answer: Answer) {
    if let Some(pending) = log
        .pending
        .iter_mut()
        .find(|p| p.event_id == id && p.answer.is_none())
    {
        pending.answer = Some(answer);
    }
}

/// The text blocks of a content list, joined.
fn text_of(content: &Value) -> String {
    content
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .filter(|b| b["type"] == "text")
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default()
}

/// The events of an ordinary turn answering `text` (no ids).
pub(super) fn plain_turn(text: &str) -> Vec<Value> {
    vec![
        json!({"type": "session.status_running"}),
        json!({"type": "agent.message", "content": [{"type": "text", "text": text}]}),
        json!({"type": "session.status_idle", "stop_reason": {"type": "end_turn"}}),
    ]
}

struct Agent<'a> {
    shared: &'a Shared,
    session: &'a Session,
}

impl Agent<'_> {
    fn emit(&self, log: &mut Log, mut event: Value) -> Value {
        let kind = event["type"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "session.status_running" => log.status = "running",
            "session.status_idle" => log.status = "idle",
            "session.status_terminated" => log.status = "terminated",
            "agent.message" => {
                if event.get("id").is_none() {
                    event["id"] = Value::String(self.shared.new_id("sevt"));
                }
                self.previews(&event);
            }
            _ => {}
        }
        self.shared.emit(self.session, log, event)
    }

    /// `event_start` and `event_delta` frames for an agent message, when a
    /// live stream asked for them.
    fn previews(&self, message: &Value) {
        if self.session.delta_streams.load(Ordering::Relaxed) == 0 {
            return;
        }
        let id = message["id"].as_str().unwrap_or_default();
        self.shared.preview(
            self.session,
            "event_start",
            &json!({"type": "event_start", "event": {"id": id, "type": "agent.message"}}),
        );
        let Some(blocks) = message["content"].as_array() else {
            return;
        };
        for (index, block) in blocks.iter().enumerate() {
            let Some(text) = block["text"].as_str() else {
                continue;
            };
            let chars: Vec<char> = text.chars().collect();
            let chunk = self
                .shared
                .behaviour
                .delta_chunk_chars
                .max(chars.len().div_ceil(32))
                .max(1);
            for piece in chars.chunks(chunk) {
                let piece: String = piece.iter().collect();
                self.shared.preview(
                    self.session,
                    "event_delta",
                    &json!({
                        "type": "event_delta",
                        "event_id": id,
                        "delta": {"type": "content_delta", "content": {"type": "text", "text": piece}, "index": index},
                    }),
                );
            }
        }
    }

    fn running(&self, log: &mut Log) {
        self.emit(log, json!({"type": "session.status_running"}));
    }

    fn idle(&self, log: &mut Log, stop_reason: Value) {
        self.emit(
            log,
            json!({"type": "session.status_idle", "stop_reason": stop_reason}),
        );
    }

    fn span_start(&self, log: &mut Log) -> String {
        let started = self.emit(log, json!({"type": "span.model_request_start"}));
        started["id"].as_str().unwrap_or_default().to_owned()
    }

    fn span_end(&self, log: &mut Log, start: &str, output: usize, is_error: bool) {
        self.emit(
            log,
            json!({
                "type": "span.model_request_end",
                "model_request_start_id": start,
                "is_error": is_error,
                "model_usage": {
                    "input_tokens": 12,
                    "output_tokens": output.div_ceil(4),
                    "cache_read_input_tokens": 3,
                    "cache_creation_input_tokens": 0,
                },
            }),
        );
    }

    fn message(&self, log: &mut Log, blocks: &[&str]) {
        let content: Vec<Value> = blocks
            .iter()
            .map(|text| json!({"type": "text", "text": text}))
            .collect();
        self.emit(log, json!({"type": "agent.message", "content": content}));
    }

    /// A reply: model request span around thinking and a message.
    fn answer(&self, log: &mut Log, blocks: &[&str], before_message: Option<Value>) {
        let start = self.span_start(log);
        self.emit(log, json!({"type": "agent.thinking"}));
        if let Some(event) = before_message {
            self.emit(log, event);
        }
        self.message(log, blocks);
        let output = blocks.iter().map(|b| b.len()).sum();
        self.span_end(log, &start, output, false);
    }

    /// The built-in agent.
    fn turn(&self, log: &mut Log, text: &str) {
        self.running(log);
        // In shared chats the bridge prefixes the speaker ("[ana]: …"); the
        // magic prefixes apply to what they wrote.
        let text = match text.strip_prefix('[').and_then(|t| t.split_once("]: ")) {
            Some((_, said)) => said,
            None => text,
        };
        if let Some(n) = text.strip_prefix("long:") {
            let n = n.trim().parse().unwrap_or(4000);
            self.answer(log, &[&long_text(n)], None);
            self.idle(log, json!({"type": "end_turn"}));
        } else if let Some(parts) = text.strip_prefix("blocks:") {
            let parts: Vec<&str> = parts.split('|').collect();
            self.answer(log, &parts, None);
            self.idle(log, json!({"type": "end_turn"}));
        } else if let Some(kind) = text.strip_prefix("error:") {
            let kind = match kind.trim() {
                "" => "model_overloaded_error",
                kind => kind,
            };
            let start = self.span_start(log);
            for status in ["retrying", "exhausted"] {
                self.emit(
                    log,
                    json!({"type": "session.error", "error": {
                        "type": kind,
                        "message": "the model is overloaded",
                        "retry_status": {"type": status},
                    }}),
                );
            }
            self.span_end(log, &start, 0, true);
            self.idle(log, json!({"type": "retries_exhausted"}));
        } else if text.starts_with("terminate:") {
            self.emit(
                log,
                json!({"type": "session.error", "error": {
                    "type": "unknown_error",
                    "message": "the session hit a terminal error",
                    "retry_status": {"type": "terminal"},
                }}),
            );
            self.emit(log, json!({"type": "session.status_terminated"}));
        } else if text.starts_with("refuse:") {
            let start = self.span_start(log);
            self.span_end(log, &start, 0, false);
            self.emit(
                log,
                json!({
                    "type": "session.status_idle",
                    "stop_reason": {"type": "refusal"},
                    "stop_details": {"type": "refusal", "category": null, "explanation": "the request was refused"},
                }),
            );
        } else if text.starts_with("budget:") {
            self.answer(log, &["spending the budget"], None);
            self.idle(log, json!({"type": "budget_reached"}));
        } else if let Some(command) = text.strip_prefix("tool:") {
            self.ask_tools(log, &[command.to_owned()], command);
        } else if let Some(n) = text.strip_prefix("tools:") {
            let n: usize = n.trim().parse().unwrap_or(2).max(1);
            let commands: Vec<String> = (1..=n).map(|i| format!("step {i}")).collect();
            self.ask_tools(log, &commands, text);
        } else if let Some(query) = text.strip_prefix("custom:") {
            let start = self.span_start(log);
            let used = self.emit(
                log,
                json!({"type": "agent.custom_tool_use", "name": "lookup", "input": {"query": query}}),
            );
            self.span_end(log, &start, 10, false);
            let id = used["id"].as_str().unwrap_or_default().to_owned();
            log.pending.push(Pending {
                event_id: id.clone(),
                kind: PendingKind::Custom,
                answer: None,
            });
            log.resume = Some(Resume::Custom);
            self.idle(log, json!({"type": "requires_action", "event_ids": [id]}));
        } else if let Some(query) = text.strip_prefix("mcp:") {
            let start = self.span_start(log);
            let used = self.emit(
                log,
                json!({
                    "type": "agent.mcp_tool_use",
                    "name": "search",
                    "mcp_server_name": "docs",
                    "input": {"query": query},
                    "evaluated_permission": "allow",
                    "evaluation": {"type": "always_allow"},
                }),
            );
            let id = used["id"].as_str().unwrap_or_default().to_owned();
            self.emit(
                log,
                json!({
                    "type": "agent.mcp_tool_result",
                    "mcp_tool_use_id": id,
                    "content": [{"type": "text", "text": format!("found: {query}")}],
                    "is_error": false,
                }),
            );
            self.span_end(log, &start, 10, false);
            self.answer(log, &[&format!("echo: {text}")], None);
            self.idle(log, json!({"type": "end_turn"}));
        } else if text.starts_with("unknown:") {
            let future = json!({"type": "agent.future_event", "payload": {"anything": [1, 2, 3]}});
            self.answer(log, &[&format!("echo: {text}")], Some(future));
            self.idle(log, json!({"type": "end_turn"}));
        } else {
            self.answer(log, &[&format!("echo: {text}")], None);
            self.idle(log, json!({"type": "end_turn"}));
        }
    }

    fn ask_tools(&self, log: &mut Log, commands: &[String], label: &str) {
        let start = self.span_start(log);
        let mut ids = Vec::with_capacity(commands.len());
        for command in commands {
            let used = self.emit(
                log,
                json!({
                    "type": "agent.tool_use",
                    "name": "bash",
                    "input": {"command": command},
                    "evaluated_permission": "ask",
                    "evaluation": {"type": "always_ask"},
                }),
            );
            let id = used["id"].as_str().unwrap_or_default().to_owned();
            log.pending.push(Pending {
                event_id: id.clone(),
                kind: PendingKind::Confirm {
                    command: command.clone(),
                },
                answer: None,
            });
            ids.push(id);
        }
        self.span_end(log, &start, 20, false);
        log.resume = Some(Resume::Tools {
            label: label.to_owned(),
        });
        self.idle(log, json!({"type": "requires_action", "event_ids": ids}));
    }

    /// After an answer: wait for the rest, or finish the turn.
    fn advance(&self, log: &mut Log) {
        let open: Vec<String> = log
            .pending
            .iter()
            .filter(|p| p.answer.is_none())
            .map(|p| p.event_id.clone())
            .collect();
        if !open.is_empty() {
            self.idle(log, json!({"type": "requires_action", "event_ids": open}));
            return;
        }
        let pending = std::mem::take(&mut log.pending);
        let Some(resume) = log.resume.take() else {
            return;
        };
        self.running(log);
        match resume {
            Resume::Tools { label } => {
                for action in &pending {
                    let PendingKind::Confirm { command } = &action.kind else {
                        continue;
                    };
                    let (text, is_error) = match &action.answer {
                        Some(Answer::Allow) => (format!("ran: {command}"), false),
                        Some(Answer::Deny(Some(message))) => {
                            (format!("denied by the user: {message}"), true)
                        }
                        _ => ("denied by the user".to_owned(), true),
                    };
                    self.emit(
                        log,
                        json!({
                            "type": "agent.tool_result",
                            "tool_use_id": action.event_id,
                            "content": [{"type": "text", "text": text}],
                            "is_error": is_error,
                        }),
                    );
                }
                self.answer(log, &[&format!("done: {label}")], None);
            }
            Resume::Custom => {
                let result = pending
                    .iter()
                    .filter_map(|p| match &p.answer {
                        Some(Answer::Result { text, is_error }) => Some(if *is_error {
                            format!("error {text}")
                        } else {
                            text.clone()
                        }),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                self.answer(log, &[&format!("custom result: {result}")], None);
            }
        }
        self.idle(log, json!({"type": "end_turn"}));
    }
}

/// `n` characters of Markdown with a few code fences (ASCII only, so
/// characters and bytes agree).
fn long_text(n: usize) -> String {
    let mut text = String::with_capacity(n + 64);
    let mut line = 0usize;
    loop {
        line += 1;
        let segment = if line.is_multiple_of(12) {
            format!("```rust\nfn step_{line}() -> u32 {{\n    {line}\n}}\n```\n\n")
        } else {
            format!("Line {line} of a long answer, with *some* Markdown in it.\n\n")
        };
        if text.len() + segment.len() > n {
            break;
        }
        text.push_str(&segment);
    }
    while text.len() < n {
        text.push('.');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_has_the_length_and_balanced_fences() {
        for n in [0, 1, 100, 5000] {
            let text = long_text(n);
            assert_eq!(text.len(), n);
            assert_eq!(text.matches("```").count() % 2, 0);
        }
        assert!(long_text(5000).contains("```rust"));
    }
}
