//! `harnessgate apps`: platform apps (bots) added and removed at runtime.
//!
//! ```text
//! harnessgate apps add telegram --token <T> [--name <label>]
//! harnessgate apps list
//! harnessgate apps remove <app id>
//! ```
//!
//! Apps live in the KV bucket `hg_apps`; running ingress and egress
//! replicas follow it, so no restart is needed. Tokens are checked with the
//! platform before they are stored and are never printed: `list` shows a
//! masked form.

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use hg_bus::Bus;
use hg_telegram::apps::{self, AppRecord};

use crate::config::Config;

/// `harnessgate apps …`
#[derive(Subcommand)]
pub enum AppsCommand {
    /// Add a bot after checking its token with the platform; running
    /// replicas start serving it.
    Add {
        /// The platform.
        #[arg(value_enum)]
        platform: Platform,
        /// The bot token (Telegram: from @BotFather). Also read from
        /// HG_APP_TOKEN, which keeps it out of the process list.
        #[arg(long, env = "HG_APP_TOKEN", hide_env_values = true)]
        token: String,
        /// A label for `apps list`.
        #[arg(long)]
        name: Option<String>,
    },
    /// List the apps: from the configuration file and added at runtime.
    List,
    /// Remove an app added at runtime; running replicas stop serving it.
    Remove {
        /// The app id (Telegram: the bot id), as `apps list` shows it.
        app_id: String,
    },
}

/// Platforms whose apps can be managed at runtime.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Platform {
    /// A Telegram bot.
    Telegram,
}

/// Runs an apps command against the configured NATS (with `nats.url`
/// empty: the server `harnessgate up` starts) and Bot API.
pub async fn run(config: &Config, command: AppsCommand) -> anyhow::Result<()> {
    let mut nats = config.nats.clone();
    if nats.url.is_empty() {
        nats.url = format!("nats://127.0.0.1:{}", config.up.nats_port);
    }
    let bus = Bus::connect(&nats)
        .await
        .with_context(|| format!("cannot reach NATS at {} (set nats.url)", nats.url))?;
    match command {
        AppsCommand::Add {
            platform: Platform::Telegram,
            token,
            name,
        } => {
            let record = apps::add(
                &bus,
                &config.telegram.api_url,
                &token,
                name.as_deref().unwrap_or_default(),
            )
            .await
            .context("cannot add the telegram app")?;
            println!(
                "added telegram app {} (@{}){}",
                record.app_id,
                record.username,
                label_suffix(&record.label)
            );
        }
        AppsCommand::List => {
            let records = apps::list(&bus).await.context("cannot list the apps")?;
            print!("{}", table(config, &records));
        }
        AppsCommand::Remove { app_id } => {
            let record = apps::remove(&bus, &app_id)
                .await
                .context("cannot remove the app")?;
            println!(
                "removed telegram app {} (@{})",
                record.app_id, record.username
            );
        }
    }
    bus.client().flush().await.ok();
    Ok(())
}

fn label_suffix(label: &str) -> String {
    if label.is_empty() {
        String::new()
    } else {
        format!(" \"{label}\"")
    }
}

/// The listing: configured bots first, then runtime apps; tokens masked.
fn table(config: &Config, records: &[AppRecord]) -> String {
    let mut rows = vec![[
        "PLATFORM".to_owned(),
        "APP ID".to_owned(),
        "USERNAME".to_owned(),
        "LABEL".to_owned(),
        "SOURCE".to_owned(),
        "ADDED".to_owned(),
        "TOKEN".to_owned(),
    ]];
    for bot in &config.telegram.bots {
        rows.push([
            "telegram".to_owned(),
            bot.id().unwrap_or("?").to_owned(),
            "-".to_owned(),
            "-".to_owned(),
            "config".to_owned(),
            "-".to_owned(),
            apps::mask_token(&bot.token),
        ]);
    }
    for record in records {
        rows.push([
            record.platform.clone(),
            record.app_id.clone(),
            if record.username.is_empty() {
                "-".to_owned()
            } else {
                format!("@{}", record.username)
            },
            if record.label.is_empty() {
                "-".to_owned()
            } else {
                record.label.clone()
            },
            "runtime".to_owned(),
            utc(record.added_ms),
            record.masked_token(),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SSZ`.
fn utc(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .replacen('T', " ", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(1_709_251_199_000), "2024-02-29 23:59:59Z");
    }

    #[test]
    fn the_listing_masks_tokens() {
        let mut config = Config::default();
        config.telegram.bots.push(hg_telegram::BotConfig {
            token: "7:config-secret".into(),
        });
        let record = AppRecord {
            platform: "telegram".into(),
            app_id: "42".into(),
            token: "42:runtime-secret".into(),
            label: "support".into(),
            username: "support_bot".into(),
            added_ms: 0,
        };
        let text = table(&config, &[record]);
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("42:****"), "{text}");
        assert!(text.contains("config"), "{text}");
        assert!(text.contains("@support_bot"), "{text}");
    }
}
