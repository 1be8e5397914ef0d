//! Wiring: start components in this process, wait for a signal, drain.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use hg_bridge::Providers;
use hg_bridge::provider::acp::AcpProvider;
use hg_bridge::provider::claude::ClaudeProvider;
use hg_bridge::provider::echo::EchoProvider;
use hg_bus::Bus;
use hg_service::Health;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// NATS URL used by `run` when none is configured.
const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// `harnessgate up`: every component, plus a local nats-server when no NATS
/// URL is configured.
pub async fn up(mut config: Config) -> anyhow::Result<()> {
    let _telemetry = hg_service::init_telemetry("harnessgate", config.log.format)?;
    let nats = if config.nats.url.is_empty() {
        let nats = LocalNats::start(&config.up.data_dir, config.up.nats_port).await?;
        config.nats.url = nats.url.clone();
        Some(nats)
    } else {
        None
    };
    // Telegram runs even without configured bots: bots added later with
    // `harnessgate apps add telegram` are picked up without a restart.
    let components = vec!["bridge", "web", "telegram-ingress", "telegram-egress"];
    let result = run_components(config, &components).await;
    if let Some(nats) = nats {
        nats.stop().await;
    }
    result
}

/// `harnessgate run <component>…`
pub async fn run(mut config: Config, components: &[String]) -> anyhow::Result<()> {
    let _telemetry = hg_service::init_telemetry("harnessgate", config.log.format)?;
    if config.nats.url.is_empty() {
        config.nats.url = DEFAULT_NATS_URL.into();
    }
    let components: Vec<&str> = components.iter().map(String::as_str).collect();
    run_components(config, &components).await
}

async fn run_components(config: Config, components: &[&str]) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let health = Health::default();
    tracing::info!(nats = %config.nats.url, components = ?components, "starting");
    let bus = Bus::connect(&config.nats)
        .await
        .context("cannot reach NATS (set nats.url or HG_NATS__URL)")?;
    let (exited_tx, mut exited) = mpsc::unbounded_channel::<(&'static str, anyhow::Result<()>)>();

    if !config.admin.listen.is_empty() {
        let addr = hg_service::serve(
            &config.admin.listen,
            hg_service::admin_router(health.clone()),
            shutdown.clone(),
            &tracker,
        )
        .await?;
        tracing::info!(%addr, "health and metrics endpoint listening");
    }
    if components.contains(&"bridge") {
        let providers = providers(&config)?;
        let bridge_config = config.bridge.clone();
        let (bus, stop, tx) = (bus.clone(), shutdown.clone(), exited_tx.clone());
        tracker.spawn(async move {
            let result = hg_bridge::run(bridge_config, bus, providers, stop).await;
            let _ = tx.send(("bridge", result.map_err(anyhow::Error::from)));
        });
    }
    if components.contains(&"web") {
        let listener = tokio::net::TcpListener::bind(&config.web.listen)
            .await
            .with_context(|| format!("cannot listen on web.listen = {}", config.web.listen))?;
        tracing::info!(url = %format!("http://{}", display_addr(&config.web.listen)), "web chat ready");
        let web_config = config.web.clone();
        let (bus, stop, tx, health) = (
            bus.clone(),
            shutdown.clone(),
            exited_tx.clone(),
            health.clone(),
        );
        tracker.spawn(async move {
            let result = hg_web::run(web_config, bus, listener, health, stop).await;
            let _ = tx.send(("web", result.map_err(anyhow::Error::from)));
        });
    }
    for (component, ingress) in [("telegram-ingress", true), ("telegram-egress", false)] {
        if !components.contains(&component) {
            continue;
        }
        if config.telegram.bots.is_empty() {
            tracing::info!(
                component,
                "no bot in telegram.bots: serving the bots added with `harnessgate apps add telegram`"
            );
        }
        let telegram = config.telegram.clone();
        let (bus, stop, tx) = (bus.clone(), shutdown.clone(), exited_tx.clone());
        tracker.spawn(async move {
            let result = if ingress {
                hg_telegram::run_ingress(telegram, bus, stop).await
            } else {
                hg_telegram::run_egress(telegram, bus, stop).await
            };
            let name = if ingress {
                "telegram-ingress"
            } else {
                "telegram-egress"
            };
            let _ = tx.send((name, result.map_err(anyhow::Error::from)));
        });
    }
    drop(exited_tx);
    health.set_ready(true);

    let failure = tokio::select! {
        () = hg_service::shutdown_signal() => {
            tracing::info!("stopping: draining work in hand (a second signal stops at once)");
            None
        }
        Some((name, result)) = exited.recv() => match result {
            Ok(()) => Some(anyhow::anyhow!("component {name} stopped unexpectedly")),
            Err(e) => Some(e.context(format!("component {name} failed"))),
        },
    };
    health.set_ready(false);
    shutdown.cancel();
    tracker.close();
    tokio::select! {
        () = tracker.wait() => tracing::info!("stopped"),
        () = tokio::time::sleep(config.admin.drain_grace) => {
            tracing::warn!(grace = ?config.admin.drain_grace, "drain grace period over, exiting");
        }
        () = hg_service::shutdown_signal() => tracing::warn!("second signal, exiting now"),
    }
    bus.client().flush().await.ok();
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn providers(config: &Config) -> anyhow::Result<Providers> {
    let mut providers = Providers::default().with(Arc::new(EchoProvider::new()));
    if config.claude.enabled() {
        let claude = ClaudeProvider::new(config.claude.provider_config())
            .context("cannot set up the Claude provider")?;
        providers = providers.with(Arc::new(claude));
        tracing::info!(base_url = %config.claude.base_url, agent = %config.claude.agent_id, "claude managed agents configured");
    } else if config
        .bridge
        .default_route
        .as_ref()
        .is_none_or(|route| route.runtime == "echo")
    {
        tracing::warn!(
            "no ANTHROPIC_API_KEY: the default runtime is echo, which only repeats messages (wiring check)"
        );
    }
    for (name, acp) in &config.acp {
        // Runtime names live as long as the process.
        let name: &'static str = Box::leak(name.clone().into_boxed_str());
        let provider = AcpProvider::new(name, acp.clone())
            .with_context(|| format!("cannot set up the acp runtime {name}"))?;
        tracing::info!(runtime = name, command = %acp.command, cwd = %provider.default_cwd().display(), "acp agent runtime configured");
        providers = providers.with(Arc::new(provider));
    }
    Ok(providers)
}

fn display_addr(listen: &str) -> String {
    listen.replace("0.0.0.0", "localhost")
}

/// A nats-server child with JetStream, killed when dropped.
struct LocalNats {
    url: String,
    child: tokio::process::Child,
}

impl LocalNats {
    async fn start(data_dir: &Path, port: u16) -> anyhow::Result<LocalNats> {
        let Some(binary) = find_on_path("nats-server") else {
            bail!(
                "nats-server is not installed. Install it (Debian/Ubuntu: `sudo apt-get install nats-server`, \
                 or ./scripts/start.sh does it for you), or point nats.url / HG_NATS__URL at a running server"
            );
        };
        let store = data_dir.join("nats");
        std::fs::create_dir_all(&store)
            .with_context(|| format!("cannot create {}", store.display()))?;
        let log = std::fs::File::create(data_dir.join("nats-server.log"))
            .context("cannot create the nats-server log file")?;
        let mut child = tokio::process::Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let url = format!("nats://127.0.0.1:{port}");
        for _ in 0..100 {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "nats-server exited ({status}); see {} — is port {port} in use? set up.nats_port",
                    data_dir.join("nats-server.log").display()
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                tracing::info!(%url, store = %store.display(), "started local nats-server with jetstream");
                return Ok(LocalNats { url, child });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("nats-server did not accept connections on port {port} within 10 s")
    }

    /// Stops the server and reaps it.
    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}
