//! Which agent serves a message: static rules from config, then an optional
//! resolver service on `hg.resolve`, then the default route.

use std::time::Duration;

use hg_bus::{Bus, BusError, RequestFailure};
use hg_proto::{ChatType, InboundMessage, ResolveRequest, ResolveResponse};
use serde::{Deserialize, Serialize};

use crate::access::AccessMode;

/// Where a conversation goes, and who may use and supervise it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Runtime name: "claude", "echo" or a configured ACP agent.
    pub runtime: String,
    #[serde(default)]
    pub agent_id: String,
    #[serde(default)]
    pub environment_id: String,
    /// Platform user ids who may answer tool-permission requests; empty =
    /// the person whose message started the turn (anyone in a direct chat).
    #[serde(default)]
    pub approvers: Vec<String>,
    /// Who may talk to the agent.
    #[serde(default)]
    pub access: AccessMode,
    /// Platform user ids let in by `access = "allowlist"` or `"pairing"`.
    #[serde(default)]
    pub allowlist: Vec<String>,
    /// One message per turn, or a message that grows while the agent writes.
    #[serde(default)]
    pub delivery: DeliveryMode,
}

/// How a turn's text reaches the user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// The whole reply when the turn ends.
    #[default]
    Buffered,
    /// A first message as soon as the agent writes, edited as it goes on
    /// (throttled by `stream_interval`), ending with the full text.
    Streaming,
}

/// The chat types a rule can match, as written in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatKind {
    Direct,
    Group,
    Channel,
    Thread,
}

impl ChatKind {
    fn matches(self, chat_type: ChatType) -> bool {
        matches!(
            (self, chat_type),
            (ChatKind::Direct, ChatType::Direct)
                | (ChatKind::Group, ChatType::Group)
                | (ChatKind::Channel, ChatType::Channel)
                | (ChatKind::Thread, ChatType::Thread)
        )
    }
}

/// A static routing rule: every given field must match; the first matching
/// rule wins. A rule either routes (`runtime`, `agent_id`,
/// `environment_id`) or rejects (`reject = true`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteRule {
    pub platform: Option<String>,
    pub app_id: Option<String>,
    pub chat_type: Option<ChatKind>,
    pub channel: Option<String>,
    pub sender: Option<String>,
    pub runtime: Option<String>,
    pub agent_id: String,
    pub environment_id: String,
    pub reject: bool,
    /// Told to a rejected user; empty = no answer.
    pub reject_message: String,
    /// See [`Route::approvers`].
    pub approvers: Vec<String>,
    /// See [`Route::access`].
    pub access: AccessMode,
    /// See [`Route::allowlist`].
    pub allowlist: Vec<String>,
    /// See [`Route::delivery`].
    pub delivery: DeliveryMode,
}

impl RouteRule {
    fn matches(&self, message: &InboundMessage) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.platform, &message.platform)
            && eq(&self.app_id, &message.app_id)
            && eq(&self.channel, &message.channel_id)
            && eq(
                &self.sender,
                message.sender.as_ref().map(|s| s.id.as_str()).unwrap_or(""),
            )
            && self
                .chat_type
                .is_none_or(|kind| kind.matches(message.chat_type()))
    }
}

/// What to do when the resolver cannot be asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResolverFallback {
    /// Use the default route.
    #[default]
    Default,
    /// Do not serve the message.
    Reject,
}

/// The optional resolver on `hg.resolve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResolverConfig {
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// When the resolver times out, has no responder or answers garbage.
    pub on_failure: ResolverFallback,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            enabled: false,
            timeout: Duration::from_secs(2),
            on_failure: ResolverFallback::Default,
        }
    }
}

/// The routing decision for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Serve(Route),
    /// Not served; tell the user `message` when not empty.
    Reject {
        message: String,
    },
}

/// Static rules + resolver + default route.
pub struct Router {
    rules: Vec<RouteRule>,
    default: Option<Route>,
    resolver: ResolverConfig,
    bus: Bus,
}

impl Router {
    /// A router over `rules`, falling back to `default` (no default: reject).
    pub fn new(
        rules: Vec<RouteRule>,
        default: Option<Route>,
        resolver: ResolverConfig,
        bus: Bus,
    ) -> Self {
        Router {
            rules,
            default,
            resolver,
            bus,
        }
    }

    /// Decides who serves `message`.
    pub async fn route(&self, message: &InboundMessage, session_key: &str) -> Decision {
        if let Some(rule) = self.rules.iter().find(|r| r.matches(message)) {
            return if rule.reject {
                Decision::Reject {
                    message: rule.reject_message.clone(),
                }
            } else {
                Decision::Serve(Route {
                    runtime: rule.runtime.clone().unwrap_or_default(),
                    agent_id: rule.agent_id.clone(),
                    environment_id: rule.environment_id.clone(),
                    approvers: rule.approvers.clone(),
                    access: rule.access,
                    allowlist: rule.allowlist.clone(),
                    delivery: rule.delivery,
                })
            };
        }
        if self.resolver.enabled {
            match self.ask_resolver(message, session_key).await {
                Ok(decision) => return decision,
                Err(e) => {
                    tracing::warn!(session = %session_key, error = %e, "resolver failed");
                    if self.resolver.on_failure == ResolverFallback::Reject {
                        return Decision::Reject {
                            message: String::new(),
                        };
                    }
                }
            }
        }
        match &self.default {
            Some(route) => Decision::Serve(route.clone()),
            None => Decision::Reject {
                message: String::new(),
            },
        }
    }

    async fn ask_resolver(
        &self,
        message: &InboundMessage,
        session_key: &str,
    ) -> Result<Decision, BusError> {
        let request = ResolveRequest {
            message: Some(message.clone()),
            session_key: session_key.to_owned(),
        };
        let reply: ResolveResponse = match self
            .bus
            .request(hg_proto::subject::RESOLVE, &request, self.resolver.timeout)
            .await
        {
            Ok(reply) => reply,
            Err(BusError::Request {
                kind: RequestFailure::NoResponders,
                ..
            }) => {
                tracing::debug!("no resolver listening on hg.resolve");
                return Err(BusError::Request {
                    subject: hg_proto::subject::RESOLVE.into(),
                    reason: "no responders".into(),
                    kind: RequestFailure::NoResponders,
                });
            }
            Err(e) => return Err(e),
        };
        if reply.reject {
            tracing::info!(session = %session_key, "resolver rejected the sender");
            return Ok(Decision::Reject {
                message: reply.reject_reason,
            });
        }
        if reply.runtime.is_empty() {
            return Err(BusError::Decode {
                type_name: "harnessgate.v1.ResolveResponse",
                reason: "resolver answered without a runtime".into(),
            });
        }
        Ok(Decision::Serve(Route {
            runtime: reply.runtime,
            agent_id: reply.agent_id,
            environment_id: reply.environment_id,
            ..Route::default()
        }))
    }
}
