//! The shared egress pipeline against real NATS, with a recording platform
//! that fails the way real platforms do.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use hg_bus::Bus;
use hg_e2e::{Stack, dead_letters};
use hg_egress::{DeliveryError, EgressConfig, Part, Platform};
use hg_proto::{DeliveryReceipt, OutboundKind, OutboundMessage, subject};
use hg_text::{Limit, Measure};
use tokio_util::sync::CancellationToken;

/// A platform with a 2000-character limit that records what it accepted and
/// answers from a script of failures first.
#[derive(Default)]
struct Recording {
    accepted: Mutex<Vec<(String, String)>>,
    failures: Mutex<VecDeque<DeliveryError>>,
    attempts: Mutex<Vec<Instant>>,
}

#[async_trait]
impl Platform for Recording {
    fn name(&self) -> &str {
        "fakechat"
    }

    fn limit(&self) -> Limit {
        Limit {
            max: 2000,
            measure: Measure::Chars,
        }
    }

    async fn send(
        &self,
        message: &OutboundMessage,
        part: Part<'_>,
    ) -> Result<String, DeliveryError> {
        self.attempts.lock().unwrap().push(Instant::now());
        if let Some(failure) = self.failures.lock().unwrap().pop_front() {
            return Err(failure);
        }
        let mut accepted = self.accepted.lock().unwrap();
        accepted.push((message.id.clone(), part.text.to_owned()));
        Ok(format!("pm-{}", accepted.len()))
    }
}

fn outbound(id: &str, chat: &str, text: &str) -> OutboundMessage {
    OutboundMessage {
        id: id.into(),
        platform: "fakechat".into(),
        app_id: "app".into(),
        channel_id: chat.into(),
        text: text.into(),
        kind: OutboundKind::Reply as i32,
        ..Default::default()
    }
}

async fn start(bus: &Bus, platform: Arc<Recording>, config: EgressConfig) -> CancellationToken {
    let stop = CancellationToken::new();
    let token = stop.clone();
    let bus = bus.clone();
    tokio::spawn(async move { hg_egress::run(bus, platform, config, token).await.unwrap() });
    stop
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A reply of about 9,000 characters with code blocks.
fn long_reply() -> String {
    let mut text = String::from("# Report\n\n");
    for i in 0..12 {
        text.push_str(&format!(
            "Paragraph {i}: {}\n\n",
            "lorem ipsum dolor sit amet ".repeat(15)
        ));
        if i % 4 == 1 {
            text.push_str("```rust\n");
            for line in 0..40 {
                text.push_str(&format!("let value_{line} = compute({line}); // step\n"));
            }
            text.push_str("```\n\n");
        }
    }
    text
}

#[tokio::test]
async fn a_long_reply_arrives_as_ordered_parts_within_the_limit_with_fences_intact() {
    let stack = Stack::start().await;
    let platform = Arc::new(Recording::default());
    let _stop = start(&stack.bus, Arc::clone(&platform), EgressConfig::default()).await;
    let mut receipts = stack
        .bus
        .client()
        .subscribe(subject::receipt("fakechat", "app"))
        .await
        .unwrap();
    let text = long_reply();
    assert!(text.chars().count() > 9000, "{}", text.chars().count());
    hg_e2e::publish_outbound(&stack.bus, &outbound("long-1", "chat-1", &text)).await;

    let receipt = tokio::time::timeout(Duration::from_secs(10), receipts.next())
        .await
        .unwrap()
        .unwrap();
    let receipt: DeliveryReceipt = hg_bus::decode(&receipt.payload).unwrap();
    let parts: Vec<String> = platform
        .accepted
        .lock()
        .unwrap()
        .iter()
        .map(|(_, t)| t.clone())
        .collect();
    assert!(receipt.delivered);
    assert_eq!(receipt.platform_message_ids.len(), parts.len());
    assert!(parts.len() >= 5, "{} parts", parts.len());
    for part in &parts {
        assert!(
            part.chars().count() <= 2000,
            "part of {} chars",
            part.chars().count()
        );
        let fences = part
            .lines()
            .filter(|l| l.trim_start().starts_with("```"))
            .count();
        assert_eq!(fences % 2, 0, "unbalanced fence in part:\n{part}");
    }
    // Nothing lost, in order: every code line and paragraph appears once, in sequence.
    let joined = parts.join("\n");
    let mut last = 0;
    for needle in [
        "Paragraph 0:",
        "let value_39",
        "Paragraph 5:",
        "Paragraph 11:",
    ] {
        let at = joined[last..]
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} missing or out of order"))
            + last;
        last = at;
    }
    for line in 0..40 {
        let needle = format!("let value_{line} = compute({line});");
        assert_eq!(joined.matches(&needle).count(), 3, "{needle}");
    }
}

#[tokio::test]
async fn transient_failures_are_retried_after_the_platforms_wait_and_order_is_kept() {
    let stack = Stack::start().await;
    let platform = Arc::new(Recording::default());
    platform.failures.lock().unwrap().extend([
        DeliveryError::Transient {
            reason: "429 too many requests".into(),
            retry_after: Some(Duration::from_millis(700)),
        },
        DeliveryError::Transient {
            reason: "502 bad gateway".into(),
            retry_after: None,
        },
    ]);
    let config = EgressConfig {
        initial_backoff: Duration::from_millis(100),
        ..EgressConfig::default()
    };
    let _stop = start(&stack.bus, Arc::clone(&platform), config).await;
    for i in 0..5 {
        hg_e2e::publish_outbound(
            &stack.bus,
            &outbound(&format!("m{i}"), "chat-1", &format!("message {i}")),
        )
        .await;
    }
    wait_until("five deliveries", || {
        platform.accepted.lock().unwrap().len() == 5
    })
    .await;
    let order: Vec<String> = platform
        .accepted
        .lock()
        .unwrap()
        .iter()
        .map(|(_, t)| t.clone())
        .collect();
    assert_eq!(
        order,
        (0..5).map(|i| format!("message {i}")).collect::<Vec<_>>()
    );
    let attempts = platform.attempts.lock().unwrap().clone();
    assert!(
        attempts[1] - attempts[0] >= Duration::from_millis(650),
        "retry-after honoured: {:?}",
        attempts[1] - attempts[0]
    );
    assert!(dead_letters(&stack.bus).await.is_empty());
}

#[tokio::test]
async fn a_message_that_keeps_failing_is_dead_lettered_and_the_user_told() {
    let stack = Stack::start().await;
    let platform = Arc::new(Recording::default());
    let failures = (0..3).map(|_| DeliveryError::Transient {
        reason: "503 unavailable".into(),
        retry_after: None,
    });
    platform.failures.lock().unwrap().extend(failures);
    let config = EgressConfig {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(50),
        ..EgressConfig::default()
    };
    let _stop = start(&stack.bus, Arc::clone(&platform), config).await;
    let mut receipts = stack
        .bus
        .client()
        .subscribe(subject::receipt("fakechat", "app"))
        .await
        .unwrap();
    hg_e2e::publish_outbound(
        &stack.bus,
        &outbound("doomed", "chat-9", "will not make it"),
    )
    .await;
    let receipt = tokio::time::timeout(Duration::from_secs(10), receipts.next())
        .await
        .unwrap()
        .unwrap();
    let receipt: DeliveryReceipt = hg_bus::decode(&receipt.payload).unwrap();
    assert!(!receipt.delivered);
    assert_eq!(receipt.attempts, 3);
    assert!(receipt.error.contains("503"));
    let accepted = platform.accepted.lock().unwrap().clone();
    assert_eq!(
        accepted,
        vec![(
            "doomed:failed".to_owned(),
            hg_egress::DELIVERY_FAILED_NOTICE.to_owned()
        )]
    );
    let letters = dead_letters(&stack.bus).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].service, "egress-fakechat");
    assert!(
        letters[0].reason.contains("after 3 attempts"),
        "{}",
        letters[0].reason
    );
    let original: OutboundMessage = hg_bus::decode(&letters[0].payload).unwrap();
    assert_eq!(original.id, "doomed");
}

#[tokio::test]
async fn a_permanent_refusal_is_not_retried() {
    let stack = Stack::start().await;
    let platform = Arc::new(Recording::default());
    platform
        .failures
        .lock()
        .unwrap()
        .push_back(DeliveryError::Permanent("400 chat not found".into()));
    let _stop = start(&stack.bus, Arc::clone(&platform), EgressConfig::default()).await;
    hg_e2e::publish_outbound(&stack.bus, &outbound("bad-chat", "nowhere", "hello")).await;
    wait_until("the refusal and the notice", || {
        platform.attempts.lock().unwrap().len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One refused attempt, then only the notice.
    assert_eq!(platform.attempts.lock().unwrap().len(), 2);
    let letters = dead_letters(&stack.bus).await;
    assert_eq!(letters.len(), 1);
    assert!(letters[0].reason.contains("400 chat not found"));
}
