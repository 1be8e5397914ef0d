//! Telegram egress throughput: the real egress (teloxide client) against the
//! fake Bot API with rate limits switched off, through a real nats-server.
//!
//! ```text
//! cargo run --release -p hg-e2e --bin hg-tg-bench -- [--messages 2000] [--chats 50]
//! ```
//!
//! Publishes N replies of ~600 characters of Markdown (bold, code, a link)
//! spread over C private chats, and reports parts delivered per second and
//! the CPU time of this process (egress + fake + publisher) per part.

use std::time::{Duration, Instant};

use hg_bus::{Bus, BusConfig};
use hg_e2e::cpu_seconds;
use hg_egress::EgressConfig;
use hg_proto::{OutboundKind, OutboundMessage, subject};
use hg_telegram::{BotConfig, RateConfig, TelegramConfig};
use hg_testkit::fake_telegram::FakeTelegram;
use hg_testkit::nats::NatsServer;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let mut messages = 2000usize;
    let mut chats = 50i64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        match flag.as_str() {
            "--messages" => messages = value.parse().expect("--messages N"),
            "--chats" => chats = value.parse().expect("--chats N"),
            other => panic!("unknown flag {other}"),
        }
    }
    let nats = NatsServer::start();
    let bus = Bus::connect(&BusConfig {
        url: nats.url(),
        ..BusConfig::default()
    })
    .await
    .expect("connect");
    let fake = FakeTelegram::start().await;
    let bot_id = 4242;
    let token = fake.add_bot(bot_id, "bench_bot");
    let config = TelegramConfig {
        api_url: fake.api_url(),
        bots: vec![BotConfig { token }],
        egress: EgressConfig::default(),
        rate: RateConfig {
            per_chat: Duration::ZERO,
            per_group_per_minute: 0,
            per_bot_per_second: 0,
        },
        ..TelegramConfig::default()
    };
    let stop = CancellationToken::new();
    let egress = {
        let (bus, stop) = (bus.clone(), stop.clone());
        tokio::spawn(async move { hg_telegram::run_egress(config, bus, stop).await })
    };
    let text = "**Result** of the run: `ok`, see [the report](https://example.com/r). ".repeat(8);
    let out_subject = subject::outbound("telegram", &bot_id.to_string());
    let cpu_before = cpu_seconds("self");
    let started = Instant::now();
    for i in 0..messages {
        let message = OutboundMessage {
            id: format!("bench-{i}"),
            platform: "telegram".into(),
            app_id: bot_id.to_string(),
            channel_id: (1000 + (i as i64 % chats)).to_string(),
            text: text.clone(),
            kind: OutboundKind::Reply as i32,
            ..Default::default()
        };
        bus.publish(&out_subject, &message, Some(&message.id))
            .await
            .expect("publish");
    }
    let delivered = fake
        .wait_sent(Duration::from_secs(300), |sent| sent.len() >= messages)
        .await
        .map(|s| s.len())
        .unwrap_or_else(|| fake.sent().len());
    let elapsed = started.elapsed();
    let cpu = cpu_seconds("self") - cpu_before;
    println!(
        "{delivered} parts to {chats} chats in {:.2} s: {:.0} parts/s, {:.0} µs CPU per part (egress + fake + publisher)",
        elapsed.as_secs_f64(),
        delivered as f64 / elapsed.as_secs_f64(),
        cpu * 1e6 / delivered.max(1) as f64
    );
    stop.cancel();
    let _ = egress.await;
}
