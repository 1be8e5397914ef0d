//! The one configuration file, with `HG_…` environment overrides.
//!
//! Layers: defaults → TOML file → `HG_SECTION__KEY` variables (for example
//! `HG_NATS__URL`, `HG_WEB__LISTEN`) → `ANTHROPIC_API_KEY` and
//! `ANTHROPIC_BASE_URL`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use hg_bridge::BridgeConfig;
use hg_bridge::provider::acp::AcpConfig;
use hg_bridge::provider::claude::ClaudeConfig;
use hg_bridge::routing::Route;
use hg_bus::BusConfig;
use hg_service::LogFormat;
use hg_telegram::TelegramConfig;
use hg_web::WebConfig;
use serde::{Deserialize, Serialize};

/// Everything `harnessgate` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: BusConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub up: UpConfig,
    pub claude: ClaudeSection,
    /// Local coding agents over ACP, by runtime name (`[acp.<name>]`);
    /// routes use them with `runtime = "<name>"`.
    pub acp: BTreeMap<String, AcpConfig>,
    pub bridge: BridgeConfig,
    pub web: WebConfig,
    pub telegram: TelegramConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            // Empty: `up` starts a local server, `run` uses localhost:4222.
            nats: BusConfig {
                url: String::new(),
                ..BusConfig::default()
            },
            log: LogConfig::default(),
            admin: AdminConfig::default(),
            up: UpConfig::default(),
            claude: ClaudeSection::default(),
            acp: BTreeMap::new(),
            bridge: BridgeConfig::default(),
            web: WebConfig::default(),
            telegram: TelegramConfig::default(),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// The health and metrics endpoint of components other than web.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Serves `/healthz`, `/readyz`, `/metrics`; empty disables it.
    pub listen: String,
    /// How long a stopping process waits for work in hand.
    #[serde(with = "humantime_serde")]
    pub drain_grace: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "0.0.0.0:9090".into(),
            drain_grace: hg_service::DRAIN_GRACE,
        }
    }
}

/// `harnessgate up` only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpConfig {
    /// Where the local nats-server keeps its JetStream data.
    pub data_dir: PathBuf,
    /// Port of the local nats-server started when `nats.url` is empty.
    pub nats_port: u16,
}

impl Default for UpConfig {
    fn default() -> Self {
        UpConfig {
            data_dir: PathBuf::from(".hg-data"),
            nats_port: 14222,
        }
    }
}

/// Claude Managed Agents. With an API key, an agent id and an environment
/// id, Claude is the default route; without a key the echo runtime is.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClaudeSection {
    /// Also read from `ANTHROPIC_API_KEY`.
    pub api_key: String,
    /// Also read from `ANTHROPIC_BASE_URL`.
    pub base_url: String,
    pub agent_id: String,
    pub environment_id: String,
    /// Stream partial text (needed for streaming delivery).
    pub stream_deltas: bool,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    pub max_retries: u32,
}

impl Default for ClaudeSection {
    fn default() -> Self {
        let base = ClaudeConfig::default();
        ClaudeSection {
            api_key: String::new(),
            base_url: base.base_url,
            agent_id: String::new(),
            environment_id: String::new(),
            stream_deltas: base.stream_deltas,
            request_timeout: base.request_timeout,
            max_retries: base.max_retries,
        }
    }
}

impl std::fmt::Debug for ClaudeSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaudeSection")
            .field(
                "api_key",
                &if self.api_key.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("base_url", &self.base_url)
            .field("agent_id", &self.agent_id)
            .field("environment_id", &self.environment_id)
            .finish_non_exhaustive()
    }
}

impl ClaudeSection {
    /// Whether an API key is configured.
    pub fn enabled(&self) -> bool {
        !self.api_key.is_empty()
    }

    /// The provider's own configuration.
    pub fn provider_config(&self) -> ClaudeConfig {
        ClaudeConfig {
            api_key: self.api_key.clone(),
            base_url: self.base_url.clone(),
            stream_deltas: self.stream_deltas,
            request_timeout: self.request_timeout,
            max_retries: self.max_retries,
            ..ClaudeConfig::default()
        }
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Loads defaults, then `path` (if given, it must exist; otherwise
    /// `harnessgate.toml` when present), then the environment; validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(path) if !path.exists() => {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            Some(path) => figment = figment.merge(Toml::file_exact(path)),
            None if Path::new("harnessgate.toml").exists() => {
                figment = figment.merge(Toml::file_exact("harnessgate.toml"));
            }
            None => {}
        }
        figment = figment
            .merge(Env::prefixed("HG_").split("__").ignore(&["config"]))
            .merge(
                Env::raw()
                    .only(&["ANTHROPIC_API_KEY"])
                    .map(|_| "claude.api_key".into()),
            )
            .merge(
                Env::raw()
                    .only(&["ANTHROPIC_BASE_URL"])
                    .map(|_| "claude.base_url".into()),
            );
        let mut config: Config = figment.extract().map_err(|e| {
            let mut message = String::from("invalid configuration");
            for error in e {
                let key = error.path.join(".");
                if key.is_empty() {
                    message.push_str(&format!("\n  {}", error.kind));
                } else {
                    message.push_str(&format!("\n  {key}: {}", error.kind));
                }
            }
            ConfigError(message)
        })?;
        config.validate()?;
        if config.bridge.default_route.is_none() {
            config.bridge.default_route = Some(config.default_route());
        }
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.claude.enabled() {
            for (key, value) in [
                ("claude.agent_id", &self.claude.agent_id),
                ("claude.environment_id", &self.claude.environment_id),
            ] {
                if value.is_empty() && self.bridge.default_route.is_none() {
                    return Err(ConfigError(format!(
                        "{key} is required when a Claude API key is set (or set bridge.default_route)"
                    )));
                }
            }
        }
        for (name, acp) in &self.acp {
            if matches!(name.as_str(), "claude" | "echo") {
                return Err(ConfigError(format!(
                    "acp.{name}: the name {name:?} is taken by a built-in runtime"
                )));
            }
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError(format!(
                    "acp.{name}: runtime names use letters, digits, '-' and '_'"
                )));
            }
            acp.validate()
                .map_err(|e| ConfigError(format!("acp.{name}.{e}")))?;
        }
        for (i, rule) in self.bridge.routes.iter().enumerate() {
            if !rule.reject && rule.runtime.is_none() {
                return Err(ConfigError(format!(
                    "bridge.routes[{i}].runtime is required unless reject = true"
                )));
            }
        }
        if !self.telegram.bots.is_empty() {
            self.telegram
                .validate()
                .map_err(|e| ConfigError(e.to_string()))?;
        }
        if self.web.max_body_bytes == 0 {
            return Err(ConfigError(
                "web.max_body_bytes must be greater than 0".into(),
            ));
        }
        if !self.web.allow_signup && self.web.static_tokens.is_empty() {
            return Err(ConfigError(
                "web.static_tokens must list at least one token when web.allow_signup = false"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Claude when configured, echo otherwise.
    fn default_route(&self) -> Route {
        if self.claude.enabled() {
            Route {
                runtime: "claude".into(),
                agent_id: self.claude.agent_id.clone(),
                environment_id: self.claude.environment_id.clone(),
                ..Route::default()
            }
        } else {
            Route {
                runtime: "echo".into(),
                ..Route::default()
            }
        }
    }

    /// The effective configuration as TOML, with every secret redacted.
    pub fn redacted_toml(&self) -> String {
        let mut value = toml::Value::try_from(self).expect("config serializes");
        redact(&mut value);
        toml::to_string_pretty(&value).expect("toml renders")
    }
}

/// Tables whose keys are shown but whose values are secrets (an ACP
/// agent's environment holds its API keys).
const SECRET_VALUE_TABLES: &[&str] = &["env"];

/// Keys whose values are secrets wherever they appear.
const SECRET_KEYS: &[&str] = &[
    "api_key",
    "token",
    "password",
    "token_secret",
    "static_tokens",
    "secret_token",
];

fn redact(value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table.iter_mut() {
                if SECRET_VALUE_TABLES.contains(&key.as_str())
                    && let toml::Value::Table(entries) = v
                {
                    for (_, value) in entries.iter_mut() {
                        *value = toml::Value::String("<redacted>".into());
                    }
                } else if SECRET_KEYS.contains(&key.as_str()) {
                    let empty = matches!(v, toml::Value::String(s) if s.is_empty())
                        || matches!(v, toml::Value::Table(t) if t.is_empty());
                    if !empty {
                        *v = toml::Value::String("<redacted>".into());
                    }
                } else {
                    redact(v);
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_appear_in_the_printed_config() {
        let mut config = Config::default();
        config.claude.api_key = "sk-ant-very-secret".into();
        config
            .web
            .static_tokens
            .insert("tok-123".into(), "ops".into());
        config.nats.password = Some("hunter2".into());
        config.telegram.bots.push(hg_telegram::BotConfig {
            token: "123456:telegram-bot-token".into(),
        });
        config.telegram.webhook.secret_token = "webhook-secret".into();
        let text = config.redacted_toml();
        for secret in [
            "sk-ant-very-secret",
            "tok-123",
            "hunter2",
            "123456:telegram-bot-token",
            "webhook-secret",
        ] {
            assert!(!text.contains(secret), "{secret} leaked:\n{text}");
        }
        assert!(text.contains("<redacted>"));
        assert!(text.contains("listen = \"0.0.0.0:8080\""));
    }

    #[test]
    fn acp_runtimes_are_read_validated_and_their_env_redacted() {
        let config: Config = toml::from_str(
            r#"
            [acp.gemini]
            command = "gemini"
            args = ["--acp"]
            idle_timeout = "5m"
            env = { GEMINI_API_KEY = "gm-very-secret" }
            "#,
        )
        .unwrap();
        let gemini = &config.acp["gemini"];
        assert_eq!(gemini.args, ["--acp"]);
        assert_eq!(gemini.idle_timeout, Duration::from_secs(300));
        config.validate().unwrap();
        let text = config.redacted_toml();
        assert!(!text.contains("gm-very-secret"), "{text}");
        assert!(text.contains("GEMINI_API_KEY"), "{text}");
        assert!(text.contains("command = \"gemini\""), "{text}");

        let unknown = toml::from_str::<Config>("[acp.x]\ncommand = \"x\"\nnope = 1\n");
        assert!(unknown.is_err());
        let mut no_command = Config::default();
        no_command.acp.insert("x".into(), AcpConfig::default());
        let err = no_command.validate().unwrap_err().to_string();
        assert!(err.contains("acp.x.command"), "{err}");
        let mut taken = Config::default();
        taken.acp.insert(
            "echo".into(),
            AcpConfig {
                command: "x".into(),
                ..AcpConfig::default()
            },
        );
        assert!(taken.validate().is_err());
    }
}
