//! Chat commands the bridge answers itself (`/help`, `/status`, `/new`,
//! `/stop`, `/usage`, `/list`, `/attach`) and custom ones answered by a
//! service on `hg.command.<name>`. `!` works like `/` where a platform
//! swallows slash commands; `/cmd@botname` (Telegram groups) is accepted.

use serde::{Deserialize, Serialize};

/// A custom command answered over NATS request-reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomCommand {
    /// Name without the slash.
    pub name: String,
    /// One line for `/help` and platform command menus.
    #[serde(default)]
    pub description: String,
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    Status,
    New { dir: Option<String> },
    Stop,
    Usage,
    List { page: usize },
    Attach { n: usize },
    Custom { name: String, args: String },
}

/// The built-in commands with their one-line descriptions.
pub const BUILTIN: &[(&str, &str)] = &[
    ("help", "the commands available here"),
    (
        "status",
        "this conversation's session, approvals and grants",
    ),
    (
        "new",
        "start a new session (/new <directory> where supported)",
    ),
    ("stop", "interrupt the running turn"),
    ("usage", "tokens and cost of this session"),
    ("list", "the runtime's sessions (/list <page>)"),
    (
        "attach",
        "attach this conversation to a listed session (/attach <n>)",
    ),
];

/// Parses `text` as a command; `None` for ordinary messages and for
/// unknown commands (those go to the agent, which may have its own).
pub fn parse(text: &str, custom: &[CustomCommand]) -> Option<Result<Command, String>> {
    let text = text.trim();
    let rest = text.strip_prefix('/').or_else(|| text.strip_prefix('!'))?;
    let (head, args) = match rest.split_once(char::is_whitespace) {
        Some((head, args)) => (head, args.trim()),
        None => (rest, ""),
    };
    let name = head.split('@').next().unwrap_or(head).to_lowercase();
    let command = match name.as_str() {
        "help" | "start" => Command::Help,
        "status" => Command::Status,
        "new" | "reset" => Command::New {
            dir: (!args.is_empty()).then(|| args.to_owned()),
        },
        "stop" | "cancel" => Command::Stop,
        "usage" => Command::Usage,
        "list" => match number(args, 1) {
            Ok(page) => Command::List { page },
            Err(e) => return Some(Err(e)),
        },
        "attach" => match number(args, 0) {
            Ok(0) => return Some(Err("usage: /attach <n>, n from /list".into())),
            Ok(n) => Command::Attach { n },
            Err(e) => return Some(Err(e)),
        },
        _ => {
            let custom = custom.iter().find(|c| c.name.eq_ignore_ascii_case(&name))?;
            Command::Custom {
                name: custom.name.clone(),
                args: args.to_owned(),
            }
        }
    };
    Some(Ok(command))
}

fn number(args: &str, default: usize) -> Result<usize, String> {
    if args.is_empty() {
        return Ok(default);
    }
    args.parse::<usize>()
        .map_err(|_| format!("{args:?} is not a number"))
}

/// Whether a command is answered right away by whichever replica receives
/// it, instead of waiting behind a running turn in the conversation.
pub fn is_immediate(command: &Command) -> bool {
    matches!(
        command,
        Command::Help | Command::Status | Command::Usage | Command::Custom { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_with_both_prefixes() {
        assert_eq!(parse("/help", &[]), Some(Ok(Command::Help)));
        assert_eq!(parse("!status", &[]), Some(Ok(Command::Status)));
        assert_eq!(parse("/stop@my_bot", &[]), Some(Ok(Command::Stop)));
        assert_eq!(
            parse("/new /work/app", &[]),
            Some(Ok(Command::New {
                dir: Some("/work/app".into())
            }))
        );
        assert_eq!(parse("/new", &[]), Some(Ok(Command::New { dir: None })));
        assert_eq!(parse("/list 2", &[]), Some(Ok(Command::List { page: 2 })));
        assert_eq!(parse("/attach 3", &[]), Some(Ok(Command::Attach { n: 3 })));
        assert!(matches!(parse("/attach", &[]), Some(Err(_))));
        assert!(matches!(parse("/list x", &[]), Some(Err(_))));
        assert_eq!(parse("hello /help", &[]), None);
        assert_eq!(
            parse("/compact", &[]),
            None,
            "unknown commands go to the agent"
        );
        let custom = [CustomCommand {
            name: "deploy".into(),
            description: "ship it".into(),
        }];
        assert_eq!(
            parse("/deploy prod now", &custom),
            Some(Ok(Command::Custom {
                name: "deploy".into(),
                args: "prod now".into()
            }))
        );
    }
}
