//! Load benchmark of the whole stack.
//!
//! Starts a nats-server, the fake Claude Managed Agents server (no
//! artificial delay; a stream only carries events produced after it
//! connected) and `harnessgate run bridge web` as its own process, then
//! drives the web API with U concurrent users, each sending M messages one
//! after another and waiting for each reply, over one WebSocket per user
//! as the chat page does (or `--send-via http`: POST each message and read
//! replies from the SSE stream). Reports
//! messages/s, p50/p99 round trip, errors and lost replies, the stack's
//! peak RSS, and its RSS with many idle connected users.
//!
//! ```text
//! cargo build --release -p harnessgate -p hg-e2e
//! ulimit -n 65536; target/release/hg-bench [--users 1,10,100,500] [--messages 20] [--idle 10000] [--idle-via ws|sse] [--send-via ws|http]
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hg_e2e::cpu_seconds;
use hg_testkit::fake_claude::{FakeBehaviour, FakeClaude};
use hg_testkit::nats::{NatsServer, free_port};

/// The load generator and the fake share the two cores with the stack:
/// the same allocator as the stack's keeps their share small.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

struct Args {
    users: Vec<usize>,
    messages: usize,
    idle: usize,
    /// How idle users are connected: "ws" (`/api/v1/ws`) or "sse"
    /// (`/api/v1/events`).
    idle_via: String,
    /// How active users talk: "ws" (messages and replies on `/api/v1/ws`,
    /// as the chat page does) or "http" (`POST /api/v1/messages`, replies
    /// on `/api/v1/events`).
    send_via: String,
}

fn args() -> Args {
    let mut args = Args {
        users: vec![1, 10, 100, 500],
        messages: 20,
        idle: 10_000,
        idle_via: "ws".into(),
        send_via: "ws".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--users" => args.users = value.split(',').filter_map(|v| v.parse().ok()).collect(),
            "--messages" => args.messages = value.parse().expect("--messages N"),
            "--idle" => args.idle = value.parse().expect("--idle N"),
            "--idle-via" => {
                assert!(value == "ws" || value == "sse", "--idle-via ws|sse");
                args.idle_via = value;
            }
            "--send-via" => {
                assert!(value == "ws" || value == "http", "--send-via ws|http");
                args.send_via = value;
            }
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

fn harnessgate_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("HARNESSGATE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().expect("exe dir").join("harnessgate")
}

/// Resident memory of a process from /proc: (current, peak) in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct Stack {
    child: Child,
    base: String,
}

impl Drop for Stack {
    /// Stops the stack as an operator would (SIGTERM, then SIGKILL after
    /// 10 s), so a stack run under a profiler writes its results.
    fn drop(&mut self) {
        let terminated = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if terminated {
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_stack(nats: &NatsServer, fake: &FakeClaude) -> Stack {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(harnessgate_binary())
        .args(["run", "bridge", "web"])
        .env("HG_NATS__URL", nats.url())
        .env("ANTHROPIC_API_KEY", FakeClaude::API_KEY)
        .env("ANTHROPIC_BASE_URL", fake.base_url())
        .env("HG_CLAUDE__AGENT_ID", "agent_bench")
        .env("HG_CLAUDE__ENVIRONMENT_ID", "env_bench")
        .env("HG_WEB__LISTEN", format!("127.0.0.1:{port}"))
        .env("HG_ADMIN__LISTEN", "")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .spawn()
        .expect("start harnessgate (build it with cargo build --release -p harnessgate)");
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if let Ok(res) = client.get(format!("{base}/readyz")).send().await
            && res.status().is_success()
        {
            return Stack { child, base };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("harnessgate did not become ready");
}

struct User {
    token: String,
}

async fn signup(client: &reqwest::Client, base: &str) -> User {
    let res = client
        .post(format!("{base}/api/v1/sessions"))
        .send()
        .await
        .expect("signup");
    let body: serde_json::Value = res.json().await.expect("signup json");
    User {
        token: body["token"].as_str().expect("token").to_owned(),
    }
}

type Events = std::pin::Pin<Box<dyn futures::Stream<Item = eventsource_stream::Event> + Send>>;

async fn connect(client: &reqwest::Client, base: &str, user: &User) -> Events {
    let res = client
        .get(format!("{base}/api/v1/events?token={}", user.token))
        .send()
        .await
        .expect("events");
    let mut events: Events = Box::pin(
        eventsource_stream::EventStream::new(res.bytes_stream()).filter_map(|e| async { e.ok() }),
    );
    // Wait until the connection is registered.
    while let Some(event) = events.next().await {
        if event.event == "ready" {
            break;
        }
    }
    events
}

/// An active user's connection.
enum Chat {
    /// Messages over `POST /api/v1/messages`, replies on the SSE stream.
    Http(reqwest::Client, Events),
    /// Both on the WebSocket.
    Ws(Box<Socket>),
}

impl Chat {
    /// Sends `text` and waits for its echo.
    async fn round_trip(&mut self, base: &str, user: &User, text: &str) -> Result<(), Failure> {
        let expected = format!("echo: {text}");
        match self {
            Chat::Http(client, events) => {
                let sent = client
                    .post(format!("{base}/api/v1/messages"))
                    .bearer_auth(&user.token)
                    .json(&serde_json::json!({ "text": text }))
                    .send()
                    .await;
                if !matches!(sent, Ok(ref res) if res.status() == 202) {
                    return Err(Failure::Refused);
                }
                let wait = async {
                    while let Some(event) = events.next().await {
                        if event.event == "reply" && reply_is(&event.data, &expected) {
                            return true;
                        }
                    }
                    false
                };
                match tokio::time::timeout(Duration::from_secs(30), wait).await {
                    Ok(true) => Ok(()),
                    _ => Err(Failure::Lost),
                }
            }
            Chat::Ws(socket) => {
                use futures::SinkExt as _;
                use tokio_tungstenite::tungstenite::Message;
                let frame = serde_json::json!({ "text": text }).to_string();
                if socket.send(Message::Text(frame.into())).await.is_err() {
                    return Err(Failure::Refused);
                }
                let wait = async {
                    while let Some(Ok(frame)) = socket.next().await {
                        let Message::Text(data) = frame else { continue };
                        if data.contains(r#""kind":"error""#) {
                            return Err(Failure::Refused);
                        }
                        if data.contains(r#""kind":"reply""#) && reply_is(&data, &expected) {
                            return Ok(());
                        }
                    }
                    Err(Failure::Lost)
                };
                tokio::time::timeout(Duration::from_secs(30), wait)
                    .await
                    .unwrap_or(Err(Failure::Lost))
            }
        }
    }
}

enum Failure {
    /// The message was not accepted (an error).
    Refused,
    /// Accepted, but no reply within 30 s.
    Lost,
}

fn reply_is(data: &str, expected: &str) -> bool {
    let data: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
    data["text"] == expected
}

/// An idle user's open event connection.
enum Idle {
    Sse(#[allow(dead_code)] Events),
    Ws(#[allow(dead_code)] Box<Socket>),
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the user's WebSocket event stream and waits for its ready frame.
async fn connect_ws(base: &str, user: &User) -> Socket {
    let url = format!(
        "{}/api/v1/ws?token={}",
        base.replacen("http://", "ws://", 1),
        user.token
    );
    // The default 128 KiB read buffer is zeroed on every read: most of the
    // load generator's CPU went there, which the stack shares.
    let config =
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .expect("websocket");
    match socket.next().await {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text)))
            if text.as_str().contains("ready") => {}
        other => panic!("no ready frame: {other:?}"),
    }
    socket
}

#[derive(Default)]
struct Outcome {
    latencies: Vec<Duration>,
    /// Round trips of each user's first message, which also creates the
    /// runtime session (also in `latencies`).
    first: Vec<Duration>,
    /// Round trips of the other messages (also in `latencies`).
    later: Vec<Duration>,
    errors: usize,
    lost: usize,
}

async fn run_user(
    base: String,
    index: usize,
    messages: usize,
    user: User,
    mut chat: Chat,
) -> Outcome {
    let mut outcome = Outcome::default();
    for m in 0..messages {
        let text = format!("u{index}-m{m}");
        let started = Instant::now();
        match chat.round_trip(&base, &user, &text).await {
            Ok(()) => {
                let took = started.elapsed();
                outcome.latencies.push(took);
                if m == 0 {
                    outcome.first.push(took);
                } else {
                    outcome.later.push(took);
                }
            }
            Err(Failure::Refused) => outcome.errors += 1,
            Err(Failure::Lost) => outcome.lost += 1,
        }
    }
    outcome
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::main]
async fn main() {
    let args = args();
    let nats = NatsServer::start_monitored();
    let fake = FakeClaude::start_with(FakeBehaviour {
        record_requests: false,
        ping_interval: None,
        ..FakeBehaviour::default()
    })
    .await;
    let stack = start_stack(&nats, &fake).await;
    let pid = stack.child.id();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .expect("http client");
    println!(
        "stack pid {pid}, RSS after start-up: {} KiB; active users talk over {}",
        rss_kib(pid).0,
        if args.send_via == "ws" {
            "the WebSocket"
        } else {
            "HTTP POST + SSE"
        }
    );
    let nats_pid = nats.pid().expect("nats pid").to_string();
    let stack_pid = pid.to_string();
    println!(
        "| users | messages | msg/s | p50 ms | p99 ms | errors | lost | CPU µs/msg: stack | nats | fake+load |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut first_lines = Vec::new();
    for &users in &args.users {
        let mut prepared = Vec::with_capacity(users);
        for i in 0..users {
            let user = signup(&client, &stack.base).await;
            let chat = if args.send_via == "ws" {
                Chat::Ws(Box::new(connect_ws(&stack.base, &user).await))
            } else {
                Chat::Http(client.clone(), connect(&client, &stack.base, &user).await)
            };
            prepared.push((i, user, chat));
        }
        let bus_before = nats.message_counts();
        let cpu_before = [
            cpu_seconds(&stack_pid),
            cpu_seconds(&nats_pid),
            cpu_seconds("self"),
        ];
        let started = Instant::now();
        let tasks: Vec<_> = prepared
            .into_iter()
            .map(|(i, user, chat)| {
                tokio::spawn(run_user(stack.base.clone(), i, args.messages, user, chat))
            })
            .collect();
        let mut all = Outcome::default();
        for task in tasks {
            let outcome = task.await.expect("user task");
            all.latencies.extend(outcome.latencies);
            all.first.extend(outcome.first);
            all.later.extend(outcome.later);
            all.errors += outcome.errors;
            all.lost += outcome.lost;
        }
        let elapsed = started.elapsed();
        let bus_after = nats.message_counts();
        let cpu_after = [
            cpu_seconds(&stack_pid),
            cpu_seconds(&nats_pid),
            cpu_seconds("self"),
        ];
        let per_msg =
            |i: usize| (cpu_after[i] - cpu_before[i]) * 1e6 / (users * args.messages) as f64;
        all.latencies.sort();
        all.first.sort();
        all.later.sort();
        if let (Some((in0, out0)), Some((in1, out1))) = (bus_before, bus_after) {
            let n = (users * args.messages) as f64;
            first_lines.push(format!(
                "{users} users: NATS messages per chat message: {:.1} in, {:.1} out",
                (in1 - in0) as f64 / n,
                (out1 - out0) as f64 / n,
            ));
        }
        first_lines.push(format!(
            "{users} users: first message (creates the runtime session) p50 {:.1} ms, p99 {:.1} ms; later messages p50 {:.1} ms, p99 {:.1} ms",
            percentile(&all.first, 0.5).as_secs_f64() * 1000.0,
            percentile(&all.first, 0.99).as_secs_f64() * 1000.0,
            percentile(&all.later, 0.5).as_secs_f64() * 1000.0,
            percentile(&all.later, 0.99).as_secs_f64() * 1000.0,
        ));
        println!(
            "| {users} | {} | {:.0} | {:.1} | {:.1} | {} | {} | {:.0} | {:.0} | {:.0} |",
            users * args.messages,
            all.latencies.len() as f64 / elapsed.as_secs_f64(),
            percentile(&all.latencies, 0.5).as_secs_f64() * 1000.0,
            percentile(&all.latencies, 0.99).as_secs_f64() * 1000.0,
            all.errors,
            all.lost,
            per_msg(0),
            per_msg(1),
            per_msg(2),
        );
    }
    for line in first_lines {
        println!("{line}");
    }
    let (rss, peak) = rss_kib(pid);
    println!("stack RSS after load: {rss} KiB, peak {peak} KiB");

    if args.idle > 0 {
        // Let the load's buffers settle before measuring the idle baseline.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = rss_kib(pid).0;
        let connections = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(args.idle)));
        let mut joins = Vec::new();
        for chunk in 0..args.idle.div_ceil(100) {
            let (client, base, connections) =
                (client.clone(), stack.base.clone(), Arc::clone(&connections));
            let n = 100.min(args.idle - chunk * 100);
            let via_ws = args.idle_via == "ws";
            joins.push(tokio::spawn(async move {
                for _ in 0..n {
                    let user = signup(&client, &base).await;
                    let idle = if via_ws {
                        Idle::Ws(Box::new(connect_ws(&base, &user).await))
                    } else {
                        Idle::Sse(connect(&client, &base, &user).await)
                    };
                    connections.lock().await.push(idle);
                }
            }));
        }
        for join in joins {
            join.await.expect("idle connect");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(pid).0;
        let count = connections.lock().await.len();
        println!(
            "idle users: {count} connected over {}; stack RSS {before} KiB → {after} KiB ({:.1} KiB per idle user)",
            args.idle_via,
            (after.saturating_sub(before)) as f64 / count.max(1) as f64
        );
    }
}
