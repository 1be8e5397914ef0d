//! Tool-permission requests waiting for a person, and the grants that let
//! tools through without asking.
//!
//! A pending approval lives in the KV bucket [`APPROVALS_BUCKET`] (key
//! `<session token>.<approval id>`), so it survives restarts and every
//! replica sees it; the first decision wins by compare-and-set. Grants live
//! in [`GRANTS_BUCKET`]: per session (all tools or one tool) under the
//! session's token, per working directory under `dir.<app token>`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use hg_bus::{Bus, BusError};
use hg_proto::subject;
use serde::{Deserialize, Serialize};

use crate::provider::{PermissionKind, PermissionOption};

/// KV bucket of approval requests (pending and decided).
pub const APPROVALS_BUCKET: &str = "hg_approvals";
/// KV bucket of auto-approve grants.
pub const GRANTS_BUCKET: &str = "hg_grants";
/// `ButtonPress.action_id` of an approval button; the value is
/// `<approval id>:<choice>`.
pub const ACTION_APPROVAL: &str = "hg.approval";
/// `ButtonPress.action_id` of the bridge's own "this approval timed out"
/// message; the value is the approval id.
pub const ACTION_TIMEOUT: &str = "hg.approval.timeout";
/// Decided approvals are kept this long (late presses are told who decided).
const KEEP_DECIDED: Duration = Duration::from_secs(7 * 24 * 3600);

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// Approval settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// How long a request waits for a decision.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// What happens when nobody decided in time.
    pub on_timeout: Verdict,
    /// Per-tool override of `on_timeout`.
    pub on_timeout_per_tool: BTreeMap<String, Verdict>,
    /// How long "allow <tool>" / "allow all" / "allow dir" last.
    #[serde(with = "humantime_serde")]
    pub grant_duration: Duration,
    /// Tools that always ask, whatever was granted.
    pub never_auto_approve: Vec<String>,
    /// Auto-approvals within this window are announced in one message.
    #[serde(with = "humantime_serde")]
    pub notice_window: Duration,
    /// How often each replica looks for timed-out requests.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        ApprovalsConfig {
            timeout: Duration::from_secs(600),
            on_timeout: Verdict::Deny,
            on_timeout_per_tool: BTreeMap::new(),
            grant_duration: Duration::from_secs(30 * 60),
            never_auto_approve: ["ExitPlanMode", "EnterPlanMode", "Task", "Agent"]
                .map(String::from)
                .to_vec(),
            notice_window: Duration::from_secs(2),
            sweep_interval: Duration::from_secs(5),
        }
    }
}

impl ApprovalsConfig {
    /// The verdict applied when a request for `tool` times out.
    pub fn timeout_verdict(&self, tool: &str) -> Verdict {
        self.on_timeout_per_tool
            .get(tool)
            .copied()
            .unwrap_or(self.on_timeout)
    }

    /// Whether `tool` may be let through by a grant.
    pub fn may_auto_approve(&self, tool: &str) -> bool {
        !self.never_auto_approve.iter().any(|t| t == tool)
    }
}

/// A choice the runtime offered (ACP options), as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredOption {
    pub id: String,
    pub label: String,
    pub allows: bool,
    /// "allow_once", "allow_always", "reject_once" or "reject_always".
    pub kind: String,
}

impl From<&PermissionOption> for StoredOption {
    fn from(o: &PermissionOption) -> Self {
        let kind = match o.kind {
            PermissionKind::AllowOnce => "allow_once",
            PermissionKind::AllowAlways => "allow_always",
            PermissionKind::RejectOnce => "reject_once",
            PermissionKind::RejectAlways => "reject_always",
        };
        StoredOption {
            id: o.id.clone(),
            label: o.label.clone(),
            allows: matches!(
                o.kind,
                PermissionKind::AllowOnce | PermissionKind::AllowAlways
            ),
            kind: kind.to_owned(),
        }
    }
}

/// How a request was decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decided {
    pub allowed: bool,
    /// What was chosen, for people: "allow", "deny", "Allow all for 30 min",
    /// an option's label, "timed out", "cancelled".
    pub outcome: String,
    /// Who decided ("@ana", or "timeout" / "/stop").
    pub by: String,
    pub at_ms: i64,
    pub reason: Option<String>,
}

/// A tool-permission request shown to people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub id: String,
    pub session_key: String,
    pub turn_id: String,
    /// Runtime id to answer (`Provider::confirm_tool`).
    pub request_id: String,
    pub tool: String,
    /// The tool input as readable text.
    pub input: String,
    /// The runtime's own options (ACP); empty = allow/deny.
    pub options: Vec<StoredOption>,
    /// Platform user id of the person whose message started the turn.
    pub requester: String,
    /// Platform user ids allowed to decide; empty = the requester, and in
    /// direct chats whoever is in the chat.
    pub approvers: Vec<String>,
    pub direct_chat: bool,
    /// `ChatType` of the conversation (the timeout message needs it).
    pub chat_type: i32,
    pub platform: String,
    pub app_id: String,
    pub channel_id: String,
    pub thread_id: String,
    /// Outbound id of the approval message (edited after the decision).
    pub message_id: String,
    /// Text of the approval message.
    pub text: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub decided: Option<Decided>,
}

impl Approval {
    /// Whether the platform user `sender` may decide this request.
    pub fn may_decide(&self, sender: &str) -> bool {
        if !self.approvers.is_empty() {
            return self.approvers.iter().any(|a| a == sender);
        }
        self.direct_chat || sender == self.requester
    }
}

/// What a person chose, from a button or a text reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Allow,
    Deny {
        reason: Option<String>,
    },
    /// Allow, and let this tool through for the grant duration.
    AllowTool,
    /// Allow, and let every tool through for the grant duration.
    AllowAll,
    /// Allow, and let tools in the session's directory through.
    AllowDir,
    /// One of the runtime's options, by id.
    Option(String),
    /// The n-th offered choice (1-based) or an option label.
    Pick(String),
}

impl Choice {
    /// The button value token of this choice.
    fn token(&self) -> String {
        match self {
            Choice::Allow => "allow".into(),
            Choice::Deny { .. } => "deny".into(),
            Choice::AllowTool => "tool".into(),
            Choice::AllowAll => "all".into(),
            Choice::AllowDir => "dir".into(),
            Choice::Option(id) => format!("opt:{id}"),
            Choice::Pick(p) => format!("pick:{p}"),
        }
    }

    /// Parses a button value token.
    fn from_token(token: &str) -> Option<Choice> {
        Some(match token {
            "allow" => Choice::Allow,
            "deny" => Choice::Deny { reason: None },
            "tool" => Choice::AllowTool,
            "all" => Choice::AllowAll,
            "dir" => Choice::AllowDir,
            _ => {
                if let Some(id) = token.strip_prefix("opt:") {
                    Choice::Option(id.to_owned())
                } else {
                    Choice::Pick(token.strip_prefix("pick:")?.to_owned())
                }
            }
        })
    }
}

/// A button's value: `<approval id>:<choice>`.
pub fn button_value(approval_id: &str, choice: &Choice) -> String {
    format!("{approval_id}:{}", choice.token())
}

/// Parses a button value into (approval id, choice).
pub fn parse_button(value: &str) -> Option<(String, Choice)> {
    let (id, token) = value.split_once(':')?;
    Some((id.to_owned(), Choice::from_token(token)?))
}

/// Parses a text reply to an approval request; `None` when the text is not
/// an answer (it is then an ordinary message).
///
/// Accepted: `allow`/`yes`/`approve`/`proceed`/`continue`/`ok`,
/// `deny`/`no`/`reject`/`cancel`/`stop`/`abort`, `deny: <reason>` or
/// `deny <reason>`, `allow all`, `allow dir`, `allow <Tool>`, and a number
/// or an option's label (checked by the caller against the request).
pub fn parse_reply(text: &str) -> Option<Choice> {
    let text = text.trim();
    let lower = text.to_lowercase();
    let word = lower.trim_end_matches(['.', '!']);
    match word {
        "allow" | "yes" | "y" | "approve" | "approved" | "proceed" | "continue" | "ok" | "okay"
        | "allow once" => return Some(Choice::Allow),
        "deny" | "no" | "n" | "reject" | "cancel" | "stop" | "abort" => {
            return Some(Choice::Deny { reason: None });
        }
        "allow all" => return Some(Choice::AllowAll),
        "allow dir" | "allow directory" => return Some(Choice::AllowDir),
        _ => {}
    }
    for prefix in ["deny", "reject", "no"] {
        if let Some(rest) = lower.strip_prefix(prefix)
            && (rest.starts_with(':') || rest.starts_with(' '))
        {
            // Keep the reason as written (not lowercased).
            let reason = text[prefix.len()..]
                .trim_start_matches(':')
                .trim()
                .to_owned();
            if prefix != "deny" && !rest.starts_with(':') {
                // "no thanks, do X instead" is a message, not a decision.
                return None;
            }
            return Some(Choice::Deny {
                reason: (!reason.is_empty()).then_some(reason),
            });
        }
    }
    if let Some(tool) = lower.strip_prefix("allow ")
        && !tool.contains(char::is_whitespace)
    {
        // Keep the tool's spelling.
        return Some(Choice::Pick(format!("allow {}", &text[6..].trim())));
    }
    if !text.is_empty() && text.len() <= 3 && text.chars().all(|c| c.is_ascii_digit()) {
        return Some(Choice::Pick(text.to_owned()));
    }
    None
}

/// Renders a tool input for people: JSON objects as `key: value` lines,
/// long values shortened.
pub fn render_input(input: &serde_json::Value) -> String {
    const MAX_VALUE: usize = 300;
    const MAX_LINES: usize = 20;
    let value_text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut lines: Vec<String> = match input {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}: {}", shorten(&value_text(v), MAX_VALUE)))
            .collect(),
        serde_json::Value::Null => Vec::new(),
        other => vec![shorten(&value_text(other), MAX_VALUE)],
    };
    if lines.len() > MAX_LINES {
        let more = lines.len() - MAX_LINES;
        lines.truncate(MAX_LINES);
        lines.push(format!("… {more} more"));
    }
    lines.join("\n")
}

/// `s` cut to at most `max` characters, with "…" when cut.
pub fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Minutes from `now_ms` to `until_ms`, rounded up.
pub fn minutes_left(until_ms: i64, now_ms: i64) -> i64 {
    ((until_ms - now_ms).max(0) + 59_999) / 60_000
}

/// `HH:MM UTC` of a timestamp.
pub fn clock_time(ms: i64) -> String {
    let minutes = ms.div_euclid(60_000).rem_euclid(24 * 60);
    format!("{:02}:{:02} UTC", minutes / 60, minutes % 60)
}

/// Approval requests in KV.
#[derive(Clone)]
pub struct ApprovalStore {
    kv: kv::Store,
}

/// Result of trying to record a decision.
pub enum DecideOutcome {
    /// This decision was recorded.
    Recorded(Approval),
    /// Someone decided first.
    Already(Approval),
    /// No such request.
    Unknown,
}

impl ApprovalStore {
    /// Opens (or creates) the approvals bucket.
    pub async fn open(bus: &Bus) -> Result<Self, BusError> {
        let mut config = hg_bus::kv_config(APPROVALS_BUCKET, "tool-permission requests");
        config.max_age = KEEP_DECIDED;
        Ok(ApprovalStore {
            kv: bus.kv(config).await?,
        })
    }

    fn key(session_key: &str, id: &str) -> String {
        format!("{}.{id}", subject::token(session_key))
    }

    /// Stores a new request.
    pub async fn create(&self, approval: &Approval) -> Result<(), BusError> {
        let bytes = serde_json::to_vec(approval).expect("approval serializes");
        self.kv
            .put(Self::key(&approval.session_key, &approval.id), bytes.into())
            .await
            .map_err(kv_error)?;
        Ok(())
    }

    /// The request `id` of `session_key`, with its revision.
    pub async fn get(
        &self,
        session_key: &str,
        id: &str,
    ) -> Result<Option<(Approval, u64)>, BusError> {
        let entry = self
            .kv
            .entry(Self::key(session_key, id))
            .await
            .map_err(kv_error)?;
        Ok(entry.and_then(|e| {
            if e.operation != kv::Operation::Put {
                return None;
            }
            serde_json::from_slice(&e.value)
                .ok()
                .map(|a| (a, e.revision))
        }))
    }

    /// Records `decided` unless someone decided first.
    pub async fn decide(
        &self,
        session_key: &str,
        id: &str,
        decided: Decided,
    ) -> Result<DecideOutcome, BusError> {
        loop {
            let Some((mut approval, revision)) = self.get(session_key, id).await? else {
                return Ok(DecideOutcome::Unknown);
            };
            if approval.decided.is_some() {
                return Ok(DecideOutcome::Already(approval));
            }
            approval.decided = Some(decided.clone());
            let bytes = serde_json::to_vec(&approval).expect("approval serializes");
            match self
                .kv
                .update(Self::key(session_key, id), bytes.into(), revision)
                .await
            {
                Ok(_) => return Ok(DecideOutcome::Recorded(approval)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(kv_error(e)),
            }
        }
    }

    /// Undecided requests whose time ran out at `now_ms`.
    pub async fn expired(&self, now_ms: i64) -> Result<Vec<Approval>, BusError> {
        let mut keys = match self.kv.keys().await {
            Ok(keys) => keys,
            Err(e) => return Err(kv_error(e)),
        };
        let mut expired = Vec::new();
        while let Some(key) = keys.next().await {
            let Ok(key) = key else { continue };
            let Ok(Some(bytes)) = self.kv.get(&key).await else {
                continue;
            };
            if let Ok(approval) = serde_json::from_slice::<Approval>(&bytes)
                && approval.decided.is_none()
                && approval.expires_ms <= now_ms
            {
                expired.push(approval);
            }
        }
        Ok(expired)
    }
}

/// What a grant covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum GrantScope {
    /// Every tool of the session.
    All,
    /// One tool of the session.
    Tool { name: String },
    /// Sessions working in this directory or below it.
    Dir { path: String },
}

/// A time-limited auto-approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub scope: GrantScope,
    pub expires_ms: i64,
    pub by: String,
}

impl Grant {
    /// Whether this grant lets `tool` through for a session in `cwd`.
    pub fn covers(&self, tool: &str, cwd: Option<&str>) -> bool {
        match &self.scope {
            GrantScope::All => true,
            GrantScope::Tool { name } => name.eq_ignore_ascii_case(tool),
            GrantScope::Dir { path } => cwd.is_some_and(|cwd| Path::new(cwd).starts_with(path)),
        }
    }

    /// For people: "Allow all", "Allow Bash", "Allow in /src".
    pub fn describe(&self) -> String {
        match &self.scope {
            GrantScope::All => "Allow all".into(),
            GrantScope::Tool { name } => format!("Allow {name}"),
            GrantScope::Dir { path } => format!("Allow in {path}"),
        }
    }
}

/// Grants in KV.
#[derive(Clone)]
pub struct GrantStore {
    kv: kv::Store,
}

impl GrantStore {
    /// Opens (or creates) the grants bucket.
    pub async fn open(bus: &Bus) -> Result<Self, BusError> {
        Ok(GrantStore {
            kv: bus
                .kv(hg_bus::kv_config(GRANTS_BUCKET, "auto-approve grants"))
                .await?,
        })
    }

    fn session_key(session_key: &str) -> String {
        subject::token(session_key)
    }

    fn dir_key(app_scope: &str) -> String {
        format!("dir.{}", subject::token(app_scope))
    }

    async fn read(&self, key: &str) -> Result<(Vec<Grant>, u64), BusError> {
        let entry = self.kv.entry(key).await.map_err(kv_error)?;
        Ok(match entry {
            Some(e) if e.operation == kv::Operation::Put => (
                serde_json::from_slice(&e.value).unwrap_or_default(),
                e.revision,
            ),
            Some(e) => (Vec::new(), e.revision),
            None => (Vec::new(), 0),
        })
    }

    /// Adds `grant` (replacing one of the same scope), dropping expired ones.
    async fn add_at(&self, key: &str, grant: Grant, now_ms: i64) -> Result<(), BusError> {
        loop {
            let (mut grants, revision) = self.read(key).await?;
            grants.retain(|g| g.expires_ms > now_ms && g.scope != grant.scope);
            grants.push(grant.clone());
            let bytes: bytes::Bytes = serde_json::to_vec(&grants)
                .expect("grants serialize")
                .into();
            let result = if revision == 0 {
                self.kv.create(key, bytes).await.map(|_| ()).map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                })
            } else {
                self.kv
                    .update(key, bytes, revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    })
            };
            match result {
                Ok(()) => return Ok(()),
                Err((true, _)) => continue,
                Err((false, reason)) => {
                    return Err(BusError::Kv {
                        bucket: GRANTS_BUCKET.into(),
                        reason,
                    });
                }
            }
        }
    }

    /// Grants `grant` to one session (all tools or one tool).
    pub async fn add_session(
        &self,
        session_key: &str,
        grant: Grant,
        now_ms: i64,
    ) -> Result<(), BusError> {
        self.add_at(&Self::session_key(session_key), grant, now_ms)
            .await
    }

    /// Grants a directory to every session of one app.
    pub async fn add_dir(
        &self,
        app_scope: &str,
        grant: Grant,
        now_ms: i64,
    ) -> Result<(), BusError> {
        self.add_at(&Self::dir_key(app_scope), grant, now_ms).await
    }

    /// Grants in force for a session at `now_ms`: its own and its app's
    /// directory grants.
    pub async fn active(
        &self,
        session_key: &str,
        app_scope: &str,
        now_ms: i64,
    ) -> Result<Vec<Grant>, BusError> {
        let (mut grants, _) = self.read(&Self::session_key(session_key)).await?;
        let (dirs, _) = self.read(&Self::dir_key(app_scope)).await?;
        grants.extend(dirs);
        grants.retain(|g| g.expires_ms > now_ms);
        Ok(grants)
    }

    /// Drops a session's grants (a new session starts without them).
    pub async fn clear_session(&self, session_key: &str) -> Result<(), BusError> {
        self.kv
            .delete(Self::session_key(session_key))
            .await
            .map_err(kv_error)
    }
}

fn kv_error(e: impl std::fmt::Display) -> BusError {
    BusError::Kv {
        bucket: APPROVALS_BUCKET.to_owned(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_replies_parse() {
        for yes in [
            "allow", "Yes", "approve", "proceed", "continue", "OK", "ok.",
        ] {
            assert_eq!(parse_reply(yes), Some(Choice::Allow), "{yes}");
        }
        for no in ["deny", "No", "reject", "cancel", "stop", "abort"] {
            assert_eq!(parse_reply(no), Some(Choice::Deny { reason: None }), "{no}");
        }
        assert_eq!(
            parse_reply("deny: Use the staging DB"),
            Some(Choice::Deny {
                reason: Some("Use the staging DB".into())
            })
        );
        assert_eq!(
            parse_reply("deny too risky"),
            Some(Choice::Deny {
                reason: Some("too risky".into())
            })
        );
        assert_eq!(parse_reply("no thanks, do it differently"), None);
        assert_eq!(parse_reply("allow all"), Some(Choice::AllowAll));
        assert_eq!(parse_reply("allow dir"), Some(Choice::AllowDir));
        assert_eq!(
            parse_reply("allow Bash"),
            Some(Choice::Pick("allow Bash".into()))
        );
        assert_eq!(parse_reply("2"), Some(Choice::Pick("2".into())));
        assert_eq!(parse_reply("please list the files"), None);
        assert_eq!(parse_reply("allow me to explain this"), None);
    }

    #[test]
    fn button_values_round_trip() {
        for choice in [
            Choice::Allow,
            Choice::Deny { reason: None },
            Choice::AllowTool,
            Choice::AllowAll,
            Choice::AllowDir,
            Choice::Option("allow-once".into()),
        ] {
            let value = button_value("ab12cd34", &choice);
            assert!(value.len() <= 64);
            assert_eq!(parse_button(&value), Some(("ab12cd34".into(), choice)));
        }
        assert_eq!(parse_button("garbage"), None);
    }

    #[test]
    fn inputs_render_as_lines() {
        let input =
            serde_json::json!({"command": "ls -la", "timeout": 30, "long": "x".repeat(500)});
        let text = render_input(&input);
        assert!(text.contains("command: ls -la"));
        assert!(text.contains("timeout: 30"));
        let long = text.lines().find(|l| l.starts_with("long")).unwrap();
        assert!(long.chars().count() < 320 && long.ends_with('…'));
    }

    #[test]
    fn grants_cover_tools_and_directories() {
        let all = Grant {
            scope: GrantScope::All,
            expires_ms: 10,
            by: String::new(),
        };
        assert!(all.covers("Bash", None));
        let tool = Grant {
            scope: GrantScope::Tool {
                name: "Bash".into(),
            },
            ..all.clone()
        };
        assert!(tool.covers("bash", None) && !tool.covers("Edit", None));
        let dir = Grant {
            scope: GrantScope::Dir {
                path: "/work/src".into(),
            },
            ..all
        };
        assert!(dir.covers("Edit", Some("/work/src/app")));
        assert!(!dir.covers("Edit", Some("/work/srcx")));
        assert!(!dir.covers("Edit", None));
    }

    #[test]
    fn approvers_decide() {
        let mut approval = Approval {
            id: "a".into(),
            session_key: "k".into(),
            turn_id: "t".into(),
            request_id: "r".into(),
            tool: "Bash".into(),
            input: String::new(),
            options: Vec::new(),
            requester: "ana".into(),
            approvers: Vec::new(),
            direct_chat: false,
            chat_type: 2,
            platform: "web".into(),
            app_id: "app".into(),
            channel_id: "c".into(),
            thread_id: String::new(),
            message_id: "m".into(),
            text: String::new(),
            created_ms: 0,
            expires_ms: 0,
            decided: None,
        };
        assert!(approval.may_decide("ana") && !approval.may_decide("bob"));
        approval.approvers = vec!["bob".into()];
        assert!(!approval.may_decide("ana") && approval.may_decide("bob"));
        assert_eq!(clock_time(14 * 3_600_000 + 2 * 60_000), "14:02 UTC");
        assert_eq!(minutes_left(61_000, 0), 2);
    }
}
