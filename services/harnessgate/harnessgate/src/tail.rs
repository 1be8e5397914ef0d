//! `harnessgate tail <subject>`: print bus traffic, decoded by its `Hg-Type`
//! header, one message per line.

use futures::StreamExt;
use hg_bus::{Bus, HEADER_TYPE};
use hg_proto::{
    AgentEvent, DeadLetter, DeliveryReceipt, InboundMessage, Message, OutboundMessage,
    ResolveRequest, ResolveResponse,
};

use crate::config::Config;

/// Subscribes to `subject` and prints each message until `count` messages
/// or Ctrl-C.
pub async fn tail(config: &Config, subject: &str, count: Option<usize>) -> anyhow::Result<()> {
    let mut nats = config.nats.clone();
    if nats.url.is_empty() {
        nats.url = format!("nats://127.0.0.1:{}", config.up.nats_port);
    }
    let bus = Bus::connect(&nats).await?;
    let mut sub = bus.client().subscribe(subject.to_owned()).await?;
    eprintln!("listening on {subject} at {}", nats.url);
    let mut seen = 0;
    loop {
        let message = tokio::select! {
            m = sub.next() => m,
            () = hg_service::shutdown_signal() => None,
        };
        let Some(message) = message else { break };
        let type_name = message
            .headers
            .as_ref()
            .and_then(|h| h.get(HEADER_TYPE))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        println!(
            "{} {}",
            message.subject,
            describe(&type_name, &message.payload)
        );
        seen += 1;
        if count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    Ok(())
}

/// One readable line for a payload of protobuf type `type_name`.
pub fn describe(type_name: &str, payload: &[u8]) -> String {
    fn show<M: Message + Default + std::fmt::Debug>(payload: &[u8]) -> String {
        match M::decode(payload) {
            Ok(m) => format!("{m:?}"),
            Err(e) => format!("<undecodable: {e}>"),
        }
    }
    let body = match type_name.strip_prefix("harnessgate.v1.") {
        Some("InboundMessage") => show::<InboundMessage>(payload),
        Some("OutboundMessage") => show::<OutboundMessage>(payload),
        Some("DeliveryReceipt") => show::<DeliveryReceipt>(payload),
        Some("AgentEvent") => show::<AgentEvent>(payload),
        Some("ResolveRequest") => show::<ResolveRequest>(payload),
        Some("ResolveResponse") => show::<ResolveResponse>(payload),
        Some("DeadLetter") => show::<DeadLetter>(payload),
        _ => match std::str::from_utf8(payload) {
            Ok(text) => text.to_owned(),
            Err(_) => format!("<{} bytes>", payload.len()),
        },
    };
    if type_name.is_empty() {
        body
    } else {
        format!("{type_name} {body}")
    }
}
