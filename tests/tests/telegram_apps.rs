//! Telegram bots added and removed at runtime (`harnessgate apps`): running
//! ingress and egress replicas pick them up from the `hg_apps` bucket
//! without a restart, next to the configured bots, and the token never
//! reaches a log line.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hg_e2e::{Stack, dead_letters};
use hg_proto::{OutboundKind, OutboundMessage, subject};
use hg_telegram::TelegramConfig;
use hg_telegram::apps::{self, AppsError};
use hg_testkit::fake_telegram::{FakeTelegram, Sent, private_chat, user};

const WAIT: Duration = Duration::from_secs(30);

/// Everything the Telegram crates log in this test process.
static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures every log line of the Telegram components, at trace level.
/// Every test calls it first, so it is the process's subscriber.
fn capture_logs() -> Arc<Mutex<Vec<u8>>> {
    Arc::clone(LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buffer);
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "hg_telegram=trace,hg_egress=trace,hg_bus=debug",
            ))
            .with_writer(move || LogWriter(Arc::clone(&writer)))
            .try_init();
        buffer
    }))
}

/// The shared test settings, giving up on a delivery after two attempts.
fn config(fake: &FakeTelegram, tokens: &[&str]) -> TelegramConfig {
    let mut config = hg_e2e::telegram::config(fake, tokens);
    config.egress.max_attempts = 2;
    config
}

/// The bot that sent `m` (the `from` of the returned Message).
fn sender(m: &Sent) -> i64 {
    m.json["from"]["id"].as_i64().unwrap_or_default()
}

async fn answered_by(fake: &FakeTelegram, bot: i64, text: &str) {
    fake.wait_sent(WAIT, |s| {
        s.iter().any(|m| m.visible_text == text && sender(m) == bot)
    })
    .await
    .unwrap_or_else(|| panic!("bot {bot} did not answer {text:?}"));
}

#[tokio::test]
async fn an_added_bot_is_polled_by_one_replica_answered_and_stops_when_removed() {
    let logs = capture_logs();
    let stack = Stack::start().await;
    let fake = FakeTelegram::start().await;
    let configured = fake.add_bot(2001, "configured_bot");
    let added = fake.add_bot(2002, "added_bot");
    let _bridge = stack.echo_bridge().await;
    // Two ingress replicas and an egress, all started before the app exists.
    let ingress_a = stack.telegram_ingress(config(&fake, &[&configured])).await;
    let ingress_b = stack.telegram_ingress(config(&fake, &[&configured])).await;
    let egress = stack.telegram_egress(config(&fake, &[&configured])).await;
    let chat = private_chat(5, "Ana");
    let ana = user(5, "Ana");
    fake.push_text(&configured, &chat, &ana, "to the configured bot");
    answered_by(&fake, 2001, "to the configured bot").await;

    // Nobody polls a bot that was not added.
    assert!(fake.calls("getUpdates").iter().all(|c| c.bot != 2002));

    let record = apps::add(&stack.bus, &fake.api_url(), &added, "support")
        .await
        .expect("a valid token is added");
    assert_eq!(record.app_id, "2002");
    assert_eq!(record.username, "added_bot");
    assert_eq!(record.label, "support");
    assert!(!format!("{record:?}").contains(&added));
    let listed = apps::list(&stack.bus).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.app_id.as_str()).collect::<Vec<_>>(),
        ["2002"]
    );

    // The running replicas pick it up: polled, answered, sent from.
    fake.push_text(&added, &chat, &ana, "to the added bot");
    answered_by(&fake, 2002, "to the added bot").await;
    // The configured bot keeps working alongside.
    fake.push_text(&configured, &chat, &ana, "configured again");
    answered_by(&fake, 2001, "configured again").await;
    // One replica polls it (the per-bot lease): no 409 conflicts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.conflicts(&added), 0, "two replicas polled the bot");
    assert_eq!(
        fake.sent()
            .iter()
            .filter(|m| m.visible_text == "to the added bot")
            .count(),
        1,
        "answered once"
    );

    // Removed: polling stops within seconds.
    let removed = apps::remove(&stack.bus, "2002").await.unwrap();
    assert_eq!(removed.app_id, "2002");
    let removed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let late: Vec<_> = fake
        .calls("getUpdates")
        .into_iter()
        .filter(|c| c.bot == 2002 && c.at > settled)
        .collect();
    assert!(
        late.is_empty(),
        "still polled {:?} after the removal",
        removed_at.elapsed()
    );
    fake.push_text(&added, &chat, &ana, "after removal");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.pending_updates(&added), 1, "nobody takes its updates");
    assert!(apps::list(&stack.bus).await.unwrap().is_empty());
    assert!(matches!(
        apps::remove(&stack.bus, "2002").await,
        Err(AppsError::NotFound(_))
    ));

    // Its outbound messages are dead-lettered with a clear reason.
    let out = OutboundMessage {
        id: "late-1".into(),
        platform: "telegram".into(),
        app_id: "2002".into(),
        channel_id: "5".into(),
        text: "too late".into(),
        kind: OutboundKind::Reply as i32,
        ..Default::default()
    };
    stack
        .bus
        .publish(&subject::outbound("telegram", "2002"), &out, Some("late-1"))
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let letter = loop {
        let letters = dead_letters(&stack.bus).await;
        if let Some(letter) = letters.into_iter().find(|l| l.reason.contains("2002")) {
            break letter;
        }
        assert!(
            Instant::now() < deadline,
            "no dead letter for the removed bot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        letter.reason.contains("no telegram bot for app 2002"),
        "{}",
        letter.reason
    );
    assert!(!fake.sent().iter().any(|m| m.visible_text == "too late"));

    ingress_a.stop().await;
    ingress_b.stop().await;
    egress.stop().await;
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logs.contains("runtime telegram app added"),
        "logs were captured"
    );
    let secret = added.split_once(':').unwrap().1;
    assert!(!logs.contains(secret), "the token was logged");
}

#[tokio::test]
async fn a_bad_token_is_refused_and_not_stored() {
    // Before the stack: its logging setup must not win the race.
    capture_logs();
    let stack = Stack::start().await;
    let fake = FakeTelegram::start().await;
    let url = fake.api_url();
    let refused = apps::add(&stack.bus, &url, "999:not-a-real-secret", "")
        .await
        .unwrap_err();
    assert!(matches!(refused, AppsError::Rejected(_)), "{refused:?}");
    let text = refused.to_string();
    assert!(text.contains("rejected"), "{text}");
    assert!(!text.contains("not-a-real-secret"), "{text}");
    assert!(matches!(
        apps::add(&stack.bus, &url, "no token", "").await,
        Err(AppsError::Malformed)
    ));
    // Nothing listens there: unreachable, not rejected.
    let down = apps::add(&stack.bus, "http://127.0.0.1:9", "1:abc", "")
        .await
        .unwrap_err();
    assert!(matches!(down, AppsError::Unreachable { .. }), "{down:?}");
    assert!(!down.to_string().contains("1:abc"), "{down}");
    assert!(apps::list(&stack.bus).await.unwrap().is_empty());
}
