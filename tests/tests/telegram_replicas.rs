//! Several Telegram egress replicas together keep Telegram's flood limits
//! (per chat, per group, per bot) and each chat's order, and one takes
//! over when the other stops.

use std::time::Duration;

use hg_bus::Bus;
use hg_e2e::{Stack, dead_letters};
use hg_proto::{OutboundKind, OutboundMessage, subject};
use hg_telegram::{RateConfig, TelegramConfig};
use hg_testkit::fake_telegram::{FakeTelegram, FloodLimits, Sent};

const BOT_ID: i64 = 5001;
/// The pacing under test, scaled down from Telegram's so the test is quick.
const PER_CHAT: Duration = Duration::from_millis(250);
const PER_BOT_PER_SECOND: u32 = 5;
const PER_GROUP_PER_MINUTE: u32 = 8;

/// The shared test settings with the pacing under test.
fn config(fake: &FakeTelegram, token: &str) -> TelegramConfig {
    TelegramConfig {
        rate: RateConfig {
            per_chat: PER_CHAT,
            per_group_per_minute: PER_GROUP_PER_MINUTE,
            per_bot_per_second: PER_BOT_PER_SECOND,
        },
        ..hg_e2e::telegram::config(fake, &[token])
    }
}

async fn publish(bus: &Bus, chat: i64, n: usize, round: &str) {
    let message = OutboundMessage {
        id: format!("{round}-{chat}-{n}"),
        platform: "telegram".into(),
        app_id: BOT_ID.to_string(),
        channel_id: chat.to_string(),
        text: format!("{round} {n}"),
        kind: OutboundKind::Reply as i32,
        ..Default::default()
    };
    bus.publish(
        &subject::outbound("telegram", &BOT_ID.to_string()),
        &message,
        Some(&message.id),
    )
    .await
    .unwrap();
}

/// Publishes `per_chat` messages to each chat, interleaved and a little
/// apart (so the shared consumer hands them to both replicas), and waits
/// until all arrived in order per chat.
async fn round(stack: &Stack, fake: &FakeTelegram, chats: &[i64], per_chat: usize, round: &str) {
    for n in 0..per_chat {
        for &chat in chats {
            publish(&stack.bus, chat, n, round).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let of = |sent: &[Sent], chat: i64| -> Vec<String> {
        sent.iter()
            .filter(|m| m.chat_id == chat && m.visible_text.starts_with(&format!("{round} ")))
            .map(|m| m.visible_text.clone())
            .collect()
    };
    let sent = fake
        .wait_sent(Duration::from_secs(60), |s| {
            chats.iter().all(|&c| of(s, c).len() >= per_chat)
        })
        .await
        .unwrap_or_else(|| panic!("round {round} was not delivered: {:#?}", fake.sent().len()));
    for &chat in chats {
        let expected: Vec<String> = (0..per_chat).map(|n| format!("{round} {n}")).collect();
        assert_eq!(of(&sent, chat), expected, "chat {chat}: order or count");
    }
}

fn limits() -> FloodLimits {
    FloodLimits {
        per_chat: PER_CHAT,
        per_bot_per_second: PER_BOT_PER_SECOND as usize,
        per_group_per_minute: PER_GROUP_PER_MINUTE as usize,
        slack: Duration::from_millis(40),
    }
}

#[tokio::test]
async fn two_egress_replicas_keep_the_flood_limits_and_the_order_and_fail_over() {
    let stack = Stack::start().await;
    let fake = FakeTelegram::start().await;
    let token = fake.add_bot(BOT_ID, "paced_bot");
    let a = stack.telegram_egress(config(&fake, &token)).await;
    let b = stack.telegram_egress(config(&fake, &token)).await;
    // Three private chats and a group: 20 messages, at most 5 a second.
    let chats = [11, 12, 13, -100900];
    round(&stack, &fake, &chats, 5, "one").await;
    let violations = fake.flood_violations(&limits());
    assert!(violations.is_empty(), "{violations:#?}");
    let sent = fake.sent();
    let span = sent.last().unwrap().at.duration_since(sent[0].at);
    assert!(
        span >= Duration::from_millis(3000),
        "20 messages at 5/s took only {span:?}"
    );

    // Whichever replica was sending, stopping one leaves the other to
    // carry on; then the same the other way round.
    a.stop().await;
    round(&stack, &fake, &[11, 12], 3, "two").await;
    let a = stack.telegram_egress(config(&fake, &token)).await;
    b.stop().await;
    round(&stack, &fake, &[11, 12], 3, "three").await;
    let violations = fake.flood_violations(&limits());
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(dead_letters(&stack.bus).await.is_empty());
    assert!(
        fake.calls("sendMessage").iter().all(|c| c.error.is_none()),
        "telegram refused a send"
    );
    a.stop().await;
}
