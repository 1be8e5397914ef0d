//! `harnessgate pairing list` / `pairing approve <code>`: let people who
//! wrote to a `access = "pairing"` route talk to the agent.

use clap::Subcommand;
use hg_bridge::access::{ApproveError, PairingStore};
use hg_bus::Bus;
use hg_proto::{OutboundKind, OutboundMessage, subject};

use crate::config::Config;

/// Pairing commands.
#[derive(Debug, Subcommand)]
pub enum PairingCommand {
    /// Codes waiting for approval.
    List,
    /// Approve a code: its user may talk to the agent from now on.
    Approve {
        /// The 8-character code the user was given.
        code: String,
    },
}

/// Runs a pairing command against the configured NATS.
pub async fn run(config: &Config, command: PairingCommand) -> anyhow::Result<()> {
    let mut nats = config.nats.clone();
    if nats.url.is_empty() {
        nats.url = format!("nats://127.0.0.1:{}", config.up.nats_port);
    }
    let bus = Bus::connect(&nats).await?;
    let store = PairingStore::open(&bus).await?;
    let now = hg_proto::now_ms();
    match command {
        PairingCommand::List => {
            let pending = store.pending(now).await?;
            if pending.is_empty() {
                println!("no pairing codes waiting");
            }
            for request in pending {
                let name = if request.username.is_empty() {
                    request.display_name.clone()
                } else {
                    format!("@{}", request.username)
                };
                println!(
                    "{}  {}/{}  user {} {}  expires in {} min",
                    request.code,
                    request.platform,
                    request.app_id,
                    request.user_id,
                    name,
                    hg_bridge::approvals::minutes_left(request.expires_ms, now)
                );
            }
        }
        PairingCommand::Approve { code } => match store.approve(&code, now).await {
            Ok(request) => {
                println!(
                    "approved {} on {}/{}",
                    request.user_id, request.platform, request.app_id
                );
                let out = OutboundMessage {
                    id: format!("pairing:{}", request.code),
                    platform: request.platform.clone(),
                    app_id: request.app_id.clone(),
                    channel_id: request.channel_id.clone(),
                    recipient_id: request.user_id.clone(),
                    text: "✅ You can talk to the agent now.".into(),
                    kind: OutboundKind::Status as i32,
                    timestamp_ms: now,
                    ..Default::default()
                };
                let subject = subject::outbound(&request.platform, &request.app_id);
                if let Err(e) = bus.publish(&subject, &out, Some(&out.id)).await {
                    eprintln!("approved, but the user could not be told: {e}");
                }
            }
            Err(e @ (ApproveError::Unknown(_) | ApproveError::Expired(_))) => {
                anyhow::bail!("{e}");
            }
            Err(e) => return Err(e.into()),
        },
    }
    Ok(())
}
