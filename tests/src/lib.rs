//! End-to-end test support: a whole stack in-process (real nats-server,
//! bridge replicas, web replicas) and a web chat client that speaks the
//! public HTTP API the way a browser does.

pub mod browser;
pub mod telegram;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hg_bridge::provider::Provider;
use hg_bridge::provider::echo::EchoProvider;
use hg_bridge::routing::Route;
use hg_bridge::{BridgeConfig, Providers};
use hg_bus::{Bus, BusConfig};
use hg_service::Health;
use hg_testkit::nats::NatsServer;
use hg_web::WebConfig;
use hg_web::hub::WebEvent;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_test_writer()
        .try_init();
}

/// A running component and how to stop it.
pub struct Component {
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl Component {
    /// Graceful stop: finish work in hand.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.handle).await;
    }

    /// Crash: the task is dropped mid-work, nothing is acked.
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

/// A stack: nats-server plus the components tests start on it.
pub struct Stack {
    pub nats: NatsServer,
    pub bus: Bus,
}

impl Stack {
    /// Starts a nats-server and connects to it.
    pub async fn start() -> Stack {
        init_logging();
        let nats = NatsServer::start();
        let bus = Bus::connect(&Self::bus_config(&nats))
            .await
            .expect("connect to nats");
        Stack { nats, bus }
    }

    fn bus_config(nats: &NatsServer) -> BusConfig {
        BusConfig {
            url: nats.url(),
            ..BusConfig::default()
        }
    }

    /// A separate connection, as another process would have.
    pub async fn connect(&self) -> Bus {
        Bus::connect(&Self::bus_config(&self.nats))
            .await
            .expect("connect to nats")
    }

    /// A bridge replica routing everything to `route` on `providers`.
    pub async fn bridge(&self, mut config: BridgeConfig, providers: Providers) -> Component {
        let bus = self.connect().await;
        if config.default_route.is_none() {
            config.default_route = Some(echo_route());
        }
        let stop = CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            if let Err(e) = hg_bridge::run(config, bus, providers, token).await {
                panic!("bridge failed: {e}");
            }
        });
        Component { stop, handle }
    }

    /// A bridge replica whose clock the test moves.
    pub async fn bridge_with_clock(
        &self,
        mut config: BridgeConfig,
        providers: Providers,
        clock: hg_bridge::clock::ManualClock,
    ) -> Component {
        let bus = self.connect().await;
        if config.default_route.is_none() {
            config.default_route = Some(echo_route());
        }
        let stop = CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            if let Err(e) =
                hg_bridge::run_with_clock(config, bus, providers, Arc::new(clock), token).await
            {
                panic!("bridge failed: {e}");
            }
        });
        Component { stop, handle }
    }

    /// A bridge replica on the echo runtime with test-friendly retry timing.
    pub async fn echo_bridge(&self) -> Component {
        self.bridge(fast_bridge_config(), echo_providers()).await
    }

    /// A web replica on a random port; returns it and its base URL.
    pub async fn web(&self, config: WebConfig) -> (Component, String) {
        self.web_at(config, "127.0.0.1:0").await
    }

    /// A web replica listening on `addr` (for example where a stopped
    /// replica was, so a browser reconnects to it); returns it and its
    /// base URL.
    pub async fn web_at(&self, config: WebConfig, addr: &str) -> (Component, String) {
        let bus = self.connect().await;
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            if let Err(e) = hg_web::run(config, bus, listener, Health::default(), token).await {
                panic!("web failed: {e}");
            }
        });
        wait_http(&url).await;
        (Component { stop, handle }, url)
    }

    /// A web replica with a fixed signing key, so several replicas accept
    /// each other's tokens even before they share KV.
    pub async fn default_web(&self) -> (Component, String) {
        self.web(web_config()).await
    }
}

/// Web settings for tests.
pub fn web_config() -> WebConfig {
    WebConfig {
        listen: "127.0.0.1:0".into(),
        ..WebConfig::default()
    }
}

/// Bridge settings with short retries for tests.
pub fn fast_bridge_config() -> BridgeConfig {
    BridgeConfig {
        retry_backoff: Duration::from_millis(200),
        max_attempts: 3,
        session_lease_ttl: Duration::from_secs(2),
        ack_wait: Duration::from_secs(2),
        ..BridgeConfig::default()
    }
}

/// Claude Managed Agents settings for the fake at `base_url`, with fast
/// retries and reconnects.
pub fn claude_config(base_url: &str) -> hg_bridge::provider::claude::ClaudeConfig {
    hg_bridge::provider::claude::ClaudeConfig {
        api_key: hg_testkit::fake_claude::FakeClaude::API_KEY.into(),
        base_url: base_url.into(),
        retry_backoff: Duration::from_millis(50),
        reconnect_backoff: Duration::from_millis(50),
        reconnect_attempts: 3,
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

/// The Claude provider with `config` (plus echo).
pub fn claude_providers(config: hg_bridge::provider::claude::ClaudeConfig) -> Providers {
    let provider =
        hg_bridge::provider::claude::ClaudeProvider::new(config).expect("claude provider");
    providers_with(Arc::new(provider))
}

/// Just the echo runtime.
pub fn echo_providers() -> Providers {
    Providers::default().with(Arc::new(EchoProvider::new()))
}

/// Providers with `provider` (plus echo).
pub fn providers_with(provider: Arc<dyn Provider>) -> Providers {
    echo_providers().with(provider)
}

/// The route to the echo runtime.
pub fn echo_route() -> Route {
    Route {
        runtime: "echo".into(),
        ..Route::default()
    }
}

async fn wait_http(base: &str) {
    let client = reqwest::Client::new();
    for _ in 0..100 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{base} did not come up");
}

/// A web chat user, talking to the HTTP API as the page does.
pub struct WebUser {
    pub base: String,
    pub token: String,
    pub user_id: String,
    client: reqwest::Client,
}

impl WebUser {
    /// Signs up through `POST /api/v1/sessions`.
    pub async fn signup(base: &str) -> WebUser {
        let client = reqwest::Client::new();
        let res = client
            .post(format!("{base}/api/v1/sessions"))
            .send()
            .await
            .expect("signup request");
        assert_eq!(res.status(), 201, "signup");
        let body: serde_json::Value = res.json().await.unwrap();
        WebUser {
            base: base.to_owned(),
            token: body["token"].as_str().unwrap().to_owned(),
            user_id: body["user_id"].as_str().unwrap().to_owned(),
            client,
        }
    }

    /// The same user talking to another replica.
    pub fn via(&self, base: &str) -> WebUser {
        WebUser {
            base: base.to_owned(),
            token: self.token.clone(),
            user_id: self.user_id.clone(),
            client: self.client.clone(),
        }
    }

    /// Sends a message; panics unless it was accepted.
    pub async fn send(&self, text: &str) {
        let res = self
            .post_message(&serde_json::json!({ "text": text }))
            .await;
        assert_eq!(
            res.status(),
            202,
            "send: {}",
            res.text().await.unwrap_or_default()
        );
    }

    /// Presses a button of a received event (sends its label as text).
    pub async fn press(&self, button: &hg_web::hub::WebButton) {
        let body = serde_json::json!({
            "text": button.label,
            "action": {"action_id": button.action_id, "value": button.value},
        });
        let res = self.post_message(&body).await;
        assert_eq!(
            res.status(),
            202,
            "press: {}",
            res.text().await.unwrap_or_default()
        );
    }

    /// `POST /api/v1/messages` with `body`.
    pub async fn post_message(&self, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(format!("{}/api/v1/messages", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .expect("send request")
    }

    /// Opens the SSE stream (optionally after `last_event_id`) and waits
    /// until it is live.
    pub async fn events(&self, last_event_id: Option<u64>) -> EventReader {
        let mut url = format!("{}/api/v1/events?token={}", self.base, self.token);
        if let Some(id) = last_event_id {
            url.push_str(&format!("&last_event_id={id}"));
        }
        let res = self.client.get(url).send().await.expect("events request");
        assert_eq!(res.status(), 200, "events");
        let mut reader = EventReader {
            stream: Box::pin(eventsource_stream::EventStream::new(res.bytes_stream())),
            held: Default::default(),
        };
        let ready = reader
            .next_raw(Duration::from_secs(5))
            .await
            .expect("ready event");
        assert_eq!(ready.0, "ready");
        reader
    }
}

impl WebUser {
    /// Opens the WebSocket event stream (optionally after `last_event_id`)
    /// and waits until it is live.
    pub async fn socket(&self, last_event_id: Option<u64>) -> EventReader {
        self.chat_socket(last_event_id).await.events
    }

    /// Opens the WebSocket and uses it both ways, as the chat page does:
    /// events in, messages out.
    pub async fn chat_socket(&self, last_event_id: Option<u64>) -> ChatSocket {
        let ws_base = self.base.replacen("http://", "ws://", 1);
        let mut url = format!("{ws_base}/api/v1/ws?token={}", self.token);
        if let Some(id) = last_event_id {
            url.push_str(&format!("&last_event_id={id}"));
        }
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket handshake");
        let (sink, socket) = socket.split();
        let frames = socket.filter_map(|frame| async move {
            match frame {
                Ok(tokio_tungstenite::tungstenite::Message::Text(text)) => {
                    let event: serde_json::Value =
                        serde_json::from_str(text.as_str()).expect("frame json");
                    let kind = event["kind"].as_str().unwrap_or_default().to_owned();
                    let id = event["seq"].as_u64().unwrap_or(0).to_string();
                    Some(Ok(eventsource_stream::Event {
                        event: kind,
                        id,
                        data: text.as_str().to_owned(),
                        retry: None,
                    }))
                }
                Ok(tokio_tungstenite::tungstenite::Message::Close(frame)) => {
                    Some(Ok(eventsource_stream::Event {
                        event: "close".into(),
                        id: String::new(),
                        data: frame
                            .map(|f| u16::from(f.code).to_string())
                            .unwrap_or_default(),
                        retry: None,
                    }))
                }
                Ok(_) => None,
                Err(_) => None,
            }
        });
        let mut events = EventReader {
            stream: Box::pin(frames),
            held: Default::default(),
        };
        let ready = events
            .next_raw(Duration::from_secs(5))
            .await
            .expect("ready frame");
        assert_eq!(ready.0, "ready");
        ChatSocket { sink, events }
    }
}

type SocketSink = futures::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::Message,
>;

/// A user's chat WebSocket: messages go out on it, events come in.
pub struct ChatSocket {
    sink: SocketSink,
    pub events: EventReader,
}

impl ChatSocket {
    /// Sends a raw frame.
    pub async fn send_frame(&mut self, frame: tokio_tungstenite::tungstenite::Message) {
        use futures::SinkExt as _;
        self.sink.send(frame).await.expect("websocket send");
    }

    /// Sends `body` (what `POST /api/v1/messages` takes) as a text frame
    /// and returns the server's answer to it: `{"kind":"accepted",…}` or
    /// `{"kind":"error",…}`. Events read meanwhile stay readable.
    pub async fn post(&mut self, body: &serde_json::Value) -> serde_json::Value {
        self.send_frame(tokio_tungstenite::tungstenite::Message::Text(
            body.to_string().into(),
        ))
        .await;
        self.answer().await
    }

    /// The server's answer to the last frame sent.
    pub async fn answer(&mut self) -> serde_json::Value {
        self.events.answer(Duration::from_secs(10)).await
    }

    /// Sends a message; panics unless it was accepted.
    pub async fn send(&mut self, text: &str) -> String {
        let answer = self.post(&serde_json::json!({ "text": text })).await;
        assert_eq!(answer["kind"], "accepted", "send over the socket: {answer}");
        answer["id"].as_str().expect("accepted id").to_owned()
    }
}

type SseStream = std::pin::Pin<
    Box<
        dyn futures::Stream<
                Item = Result<
                    eventsource_stream::Event,
                    eventsource_stream::EventStreamError<reqwest::Error>,
                >,
            > + Send,
    >,
>;

/// Reads a user's event stream, SSE or WebSocket.
pub struct EventReader {
    stream: SseStream,
    /// Events read while looking for a socket answer, not yet taken.
    held: std::collections::VecDeque<(String, String, String)>,
}

impl EventReader {
    async fn next_raw(&mut self, timeout: Duration) -> Option<(String, String, String)> {
        if let Some(held) = self.held.pop_front() {
            return Some(held);
        }
        let event = tokio::time::timeout(timeout, self.stream.next())
            .await
            .ok()??;
        let event = event.ok()?;
        Some((event.event, event.id, event.data))
    }

    /// The next message event (typing skipped), or None after `timeout`
    /// or when the connection closed.
    pub async fn next_message(&mut self, timeout: Duration) -> Option<WebEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (kind, _id, data) = self.next_raw(left).await?;
            if kind == "typing" || kind == "accepted" {
                continue;
            }
            if kind == "close" {
                return None;
            }
            return Some(serde_json::from_str(&data).expect("event json"));
        }
    }

    /// The next message event of `kind`, skipping others; panics after
    /// `timeout`.
    pub async fn next_kind(&mut self, kind: &str, timeout: Duration) -> WebEvent {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = self
                .next_message(left)
                .await
                .unwrap_or_else(|| panic!("no {kind} event within {timeout:?}"));
            if event.kind == kind {
                return event;
            }
        }
    }

    /// The next answer to a message sent on the socket (`accepted` or
    /// `error`); events before it stay readable. Panics after `timeout`.
    async fn answer(&mut self, timeout: Duration) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut passed = Vec::new();
        let answer = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let raw = tokio::time::timeout(left, self.stream.next())
                .await
                .ok()
                .flatten()
                .and_then(Result::ok)
                .unwrap_or_else(|| panic!("no answer on the socket within {timeout:?}"));
            if raw.event == "accepted" || raw.event == "error" {
                break serde_json::from_str(&raw.data).expect("answer json");
            }
            passed.push((raw.event, raw.id, raw.data));
        };
        self.held.extend(passed);
        answer
    }

    /// The close code the server sent (WebSocket only), skipping events;
    /// None if the connection did not close within `timeout`.
    pub async fn closed(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (kind, _id, data) = self.next_raw(left).await?;
            if kind == "close" {
                return data.parse().ok();
            }
        }
    }

    /// Every message event arriving within `window`.
    pub async fn collect(&mut self, window: Duration) -> Vec<WebEvent> {
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + window;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return events;
            }
            match self.next_message(left).await {
                Some(event) => events.push(event),
                None => return events,
            }
        }
    }
}

/// Decodes every bus message on `filter` into a channel, from now on.
pub async fn collect<M: hg_proto::BusMessage + Send + 'static>(
    bus: &Bus,
    filter: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<M> {
    let mut sub = bus.client().subscribe(filter.to_owned()).await.unwrap();
    bus.client().flush().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = sub.next().await {
            if let Ok(decoded) = hg_bus::decode::<M>(&message.payload)
                && tx.send(decoded).is_err()
            {
                return;
            }
        }
    });
    rx
}

/// The next item of `rx`; panics naming `what` after 30 s.
pub async fn next<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap()
}

/// Publishes `message` on its platform's outbound subject, deduplicated by
/// its id.
pub async fn publish_outbound(bus: &Bus, message: &hg_proto::OutboundMessage) {
    bus.publish(
        &hg_proto::subject::outbound(&message.platform, &message.app_id),
        message,
        Some(&message.id),
    )
    .await
    .unwrap();
}

/// Dead letters stored so far.
pub async fn dead_letters(bus: &Bus) -> Vec<hg_proto::DeadLetter> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull};
    let stream = bus
        .jetstream()
        .get_stream(hg_proto::subject::STREAM_DLQ)
        .await
        .unwrap();
    let info = stream.get_info().await.unwrap();
    if info.state.messages == 0 {
        return Vec::new();
    }
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut letters = Vec::new();
    while letters.len() < info.state.messages as usize {
        let Ok(Some(Ok(message))) =
            tokio::time::timeout(Duration::from_secs(2), messages.next()).await
        else {
            break;
        };
        letters.push(hg_bus::decode(&message.payload).unwrap());
    }
    letters
}

/// CPU time (user + system, seconds) a process has used, from /proc; `pid`
/// may be `"self"`.
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    (ticks(11) + ticks(12)) / 100.0
}
