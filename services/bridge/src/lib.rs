//! The bridge: consumes inbound messages, keeps one runtime session per
//! conversation, drives the agent runtime and publishes its replies.
//!
//! All bridge replicas share one durable consumer on `hg.in.>`. Messages of
//! one conversation are processed in order: within a replica by a worker
//! per conversation, across replicas by a lease per conversation in KV.

pub mod access;
pub mod approvals;
pub mod clock;
pub mod commands;
mod ownership;
pub mod provider;
pub mod routing;
pub mod session;
mod supervise;
mod turn;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hg_bus::consumer::{ConsumerSpec, Delivery, WatchedConsumer};
use hg_bus::keyed::KeyedWorkers;
use hg_bus::lease::Lease;
use hg_bus::presence::Presence;
use hg_bus::{Bus, BusError};
use hg_proto::{InboundMessage, subject};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::{PairingConfig, PairingStore};
use crate::approvals::{ApprovalStore, ApprovalsConfig, GrantStore};
use crate::clock::{SharedClock, SystemClock};
use crate::commands::CustomCommand;
use crate::provider::Provider;
use crate::routing::{ResolverConfig, Route, RouteRule, Router};
use crate::session::SessionStore;

/// KV bucket where components publish facts for each other (for example
/// which runtime the bridge serves by default, shown by the web chat).
pub const META_BUCKET: &str = "hg_meta";
/// Key in [`META_BUCKET`] holding the chat commands as JSON
/// (`[{"command", "description"}]`, the shape of Telegram's `BotCommand`).
pub const META_COMMANDS: &str = "bridge.commands";
/// Key in [`META_BUCKET`] holding the default runtime's name.
pub const META_DEFAULT_RUNTIME: &str = "bridge.default_runtime";
/// KV bucket where running bridge replicas announce themselves.
pub const REPLICAS_BUCKET: &str = "hg_bridge_replicas";

/// Bridge settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeConfig {
    /// Static routing rules, first match wins.
    pub routes: Vec<RouteRule>,
    /// Route for messages no rule matched (none: not served).
    pub default_route: Option<Route>,
    pub resolver: ResolverConfig,
    /// A turn that has not ended after this long is abandoned and the user
    /// told so.
    #[serde(with = "humantime_serde")]
    pub turn_timeout: Duration,
    /// Deliveries of one inbound message while the runtime is unavailable,
    /// before it is dead-lettered.
    pub max_attempts: u32,
    /// First delay before retrying an inbound the runtime could not take;
    /// doubles per attempt.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// How long a replica's hold on a conversation lasts without refresh;
    /// after a replica dies its conversations move on within this time.
    #[serde(with = "humantime_serde")]
    pub session_lease_ttl: Duration,
    /// How long a replica keeps an idle conversation before another replica
    /// may take it; its messages arriving meanwhile are forwarded to it.
    #[serde(with = "humantime_serde")]
    pub session_lease_linger: Duration,
    /// An inbound message not acked (or marked in progress) for this long
    /// is redelivered, e.g. to another replica when this one died.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Inbound messages in flight across all replicas.
    pub max_in_flight: i64,
    /// A turn still running after this long shows "typing…".
    #[serde(with = "humantime_serde")]
    pub typing_delay: Duration,
    /// Timeout of a custom tool call on `hg.tool.<name>`.
    #[serde(with = "humantime_serde")]
    pub tool_timeout: Duration,
    /// Tool-permission requests, grants and their timing.
    pub approvals: ApprovalsConfig,
    /// Custom chat commands answered on `hg.command.<name>`.
    pub commands: Vec<CustomCommand>,
    /// Least time between two updates of a streaming reply (Telegram
    /// allows about one edit per second per chat).
    #[serde(with = "humantime_serde")]
    pub stream_interval: Duration,
    /// Timeout of a custom command.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Pairing codes for `access = "pairing"` routes.
    pub pairing: PairingConfig,
    /// Repeated runtime errors in one conversation within this window
    /// produce one message.
    #[serde(with = "humantime_serde")]
    pub error_debounce: Duration,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            routes: Vec::new(),
            default_route: None,
            resolver: ResolverConfig::default(),
            turn_timeout: Duration::from_secs(600),
            max_attempts: 5,
            retry_backoff: Duration::from_secs(2),
            session_lease_ttl: Duration::from_secs(10),
            session_lease_linger: Duration::from_secs(2),
            ack_wait: Duration::from_secs(10),
            max_in_flight: 10_000,
            typing_delay: Duration::from_millis(300),
            tool_timeout: Duration::from_secs(30),
            approvals: ApprovalsConfig::default(),
            commands: Vec::new(),
            command_timeout: Duration::from_secs(10),
            stream_interval: Duration::from_secs(1),
            pairing: PairingConfig::default(),
            error_debounce: Duration::from_secs(60),
        }
    }
}

/// The runtimes a bridge can route to, by name.
#[derive(Clone, Default)]
pub struct Providers {
    by_name: HashMap<String, Arc<dyn Provider>>,
}

impl Providers {
    /// Registers `provider` under its name.
    pub fn with(mut self, provider: Arc<dyn Provider>) -> Self {
        self.by_name.insert(provider.name().to_owned(), provider);
        self
    }

    /// The runtime called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.by_name.get(name)
    }

    /// Registered runtime names.
    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }
}

/// Errors that stop the bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("route refers to runtime {0:?}, which is not configured")]
    UnknownRuntime(String),
}

/// Runs a bridge replica until `shutdown` fires, then finishes the turns in
/// hand (they resume on another replica if this one is killed instead).
pub async fn run(
    config: BridgeConfig,
    bus: Bus,
    providers: Providers,
    shutdown: CancellationToken,
) -> Result<(), BridgeError> {
    run_with_clock(config, bus, providers, Arc::new(SystemClock), shutdown).await
}

/// [`run`] with an injected clock (tests move time instead of sleeping).
pub async fn run_with_clock(
    config: BridgeConfig,
    bus: Bus,
    providers: Providers,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> Result<(), BridgeError> {
    let runtimes = config
        .routes
        .iter()
        .filter(|r| !r.reject)
        .filter_map(|r| r.runtime.clone())
        .chain(config.default_route.iter().map(|r| r.runtime.clone()));
    for runtime in runtimes {
        if providers.get(&runtime).is_none() {
            return Err(BridgeError::UnknownRuntime(runtime));
        }
    }
    let replica = format!("bridge-{}", uuid::Uuid::new_v4().simple());
    let sessions = SessionStore::open(&bus).await?;
    let leases = Lease::open(
        &bus,
        "hg_session_leases",
        config.session_lease_ttl,
        &replica,
    )
    .await?;
    let meta = bus
        .kv(hg_bus::kv_config(META_BUCKET, "facts components share"))
        .await?;
    let default_runtime = config
        .default_route
        .as_ref()
        .map(|r| r.runtime.clone())
        .unwrap_or_default();
    if let Err(e) = meta
        .put(META_DEFAULT_RUNTIME, default_runtime.clone().into())
        .await
    {
        tracing::warn!(error = %e, "cannot publish the default runtime");
    }
    // Platforms with command menus (Telegram) advertise these.
    let menu: Vec<serde_json::Value> = commands::BUILTIN
        .iter()
        .map(|(name, description)| serde_json::json!({"command": name, "description": description}))
        .chain(config.commands.iter().map(|c| {
            serde_json::json!({"command": c.name, "description": if c.description.is_empty() { c.name.as_str() } else { c.description.as_str() }})
        }))
        .collect();
    if let Err(e) = meta
        .put(
            META_COMMANDS,
            serde_json::to_vec(&menu).unwrap_or_default().into(),
        )
        .await
    {
        tracing::warn!(error = %e, "cannot publish the command list");
    }
    if default_runtime == "echo" {
        tracing::warn!(
            "serving with the echo runtime: replies repeat the user's message (wiring check only); \
             set ANTHROPIC_API_KEY, an agent id and an environment id to use Claude Managed Agents"
        );
    }
    let tracker = TaskTracker::new();
    // Before consuming: replicas already running must know of this one.
    let presence =
        Presence::join(&bus, REPLICAS_BUCKET, &replica, &tracker, shutdown.clone()).await?;
    let mut spec = ConsumerSpec::new(subject::STREAM_IN, "bridge", "hg.in.>");
    spec.max_ack_pending = config.max_in_flight;
    spec.ack_wait = config.ack_wait;
    let consumer = WatchedConsumer::create(&bus, spec).await?;
    let router = Router::new(
        config.routes.clone(),
        config.default_route.clone(),
        config.resolver.clone(),
        bus.clone(),
    );
    let linger = config.session_lease_linger;
    let bridge = Arc::new(turn::Bridge {
        bus: bus.clone(),
        replica: replica.clone(),
        presence,
        config,
        providers,
        sessions: sessions.clone(),
        ownership: Arc::new(ownership::Ownership::new(
            leases,
            sessions,
            linger,
            tracker.clone(),
            shutdown.clone(),
        )),
        router,
        clock,
        approvals: ApprovalStore::open(&bus).await?,
        grants: GrantStore::open(&bus).await?,
        pairing: PairingStore::open(&bus).await?,
        running: Default::default(),
        error_notices: Default::default(),
    });
    let workers_stop = CancellationToken::new();
    let work = Arc::clone(&bridge);
    let workers = Arc::new(KeyedWorkers::new(
        move |key: String, (delivery, message): (Delivery, InboundMessage), queued: usize| {
            let work = Arc::clone(&work);
            async move { work.handle(key, delivery, message, queued).await }
        },
        tracker.clone(),
        workers_stop.clone(),
    ));
    let dispatch = {
        let (workers, bridge, tracker) =
            (Arc::clone(&workers), Arc::clone(&bridge), tracker.clone());
        move |delivery: Delivery| match hg_bus::decode::<InboundMessage>(delivery.payload()) {
            Ok(mut message) => {
                let key = session::session_key(&message);
                match commands::parse(&message.text, &bridge.config.commands) {
                    // Read-only commands do not wait behind a running turn.
                    Some(Ok(command)) if commands::is_immediate(&command) => {
                        let bridge = Arc::clone(&bridge);
                        tracker.spawn(async move {
                            bridge
                                .handle_immediate(key, delivery, message, command)
                                .await
                        });
                    }
                    // `/stop` interrupts the running turn now, then takes its
                    // place in line to cancel pending approvals and answer.
                    Some(Ok(commands::Command::Stop)) => {
                        let (bridge, workers) = (Arc::clone(&bridge), Arc::clone(&workers));
                        tracker.spawn(async move {
                            if bridge.stop_running(&key).await {
                                message
                                    .metadata
                                    .insert(supervise::META_INTERRUPTED.into(), "1".into());
                            }
                            workers.dispatch(&key, delivery.stream_sequence(), (delivery, message));
                        });
                    }
                    _ => workers.dispatch(&key, delivery.stream_sequence(), (delivery, message)),
                }
            }
            Err(e) => {
                let bridge = Arc::clone(&bridge);
                tracker.spawn(async move { bridge.reject_malformed(delivery, e).await });
            }
        }
    };
    // Messages of a conversation another replica holds are forwarded to it,
    // so one replica sees all of a conversation's messages, in order.
    let mut forwarded = bus
        .client()
        .subscribe(turn::forward_subject(&replica))
        .await
        .map_err(|e| BusError::Consumer {
            consumer: "bridge forward".into(),
            reason: e.to_string(),
        })?;
    {
        let (bus, dispatch, stop) = (bus.clone(), dispatch.clone(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                let request = tokio::select! {
                    () = stop.cancelled() => return,
                    request = futures::StreamExt::next(&mut forwarded) => request,
                };
                let Some(request) = request else { return };
                if let Some(delivery) = Delivery::from_forwarded(&bus, request).await {
                    dispatch(delivery);
                }
            }
        });
    }
    // The replica running a conversation's turn answers "status" and
    // "stop" for it.
    let mut control = bus
        .client()
        .subscribe("hg.bridge.turn.>")
        .await
        .map_err(|e| BusError::Consumer {
            consumer: "bridge turn control".into(),
            reason: e.to_string(),
        })?;
    {
        let (bridge, stop) = (Arc::clone(&bridge), shutdown.clone());
        tracker.spawn(async move {
            loop {
                let request = tokio::select! {
                    () = stop.cancelled() => return,
                    request = futures::StreamExt::next(&mut control) => request,
                };
                let Some(request) = request else { return };
                bridge.turn_control(request).await;
            }
        });
    }
    // Timed-out approvals become messages in their conversation.
    {
        let (bridge, stop) = (Arc::clone(&bridge), shutdown.clone());
        tracker.spawn(async move {
            let mut every = tokio::time::interval(bridge.config.approvals.sweep_interval);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => bridge.sweep_approvals().await,
                }
            }
        });
    }
    tracing::info!(replica = %replica, "bridge started");
    let result = consumer.run(shutdown.clone(), dispatch).await;
    workers_stop.cancel();
    tracker.close();
    tracker.wait().await;
    tracing::info!(replica = %replica, "bridge stopped");
    result.map_err(BridgeError::from)
}
