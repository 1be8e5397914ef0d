//! What every HarnessGate service shares: logging and tracing (with OTLP
//! export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set), Prometheus metrics,
//! the `/healthz`, `/readyz` and `/metrics` endpoints, and shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::serve::ListenerExt as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot set up otlp export: {0}")]
    Otlp(String),
    #[error("cannot bind {addr}: {reason}")]
    Bind { addr: String, reason: String },
}

/// Keeps the trace exporter alive; flushes it on drop.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global tracing subscriber (filter from `RUST_LOG`, default
/// `info`), the W3C trace-context propagator used for NATS headers, and an
/// OTLP/HTTP span exporter when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn init_telemetry(service_name: &str, format: LogFormat) -> Result<Telemetry, ServiceError> {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let exporting = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT")
        .is_some_and(|endpoint| !endpoint.is_empty());
    // Logs go to stderr: stdout stays for command output (`tail`).
    let fmt_text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_writer(std::io::stderr)
    });
    let fmt_json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_target(false)
            .with_writer(std::io::stderr)
    });
    // Spans become OpenTelemetry spans (and NATS headers carry their
    // context) only when they are exported: building them costs CPU on
    // every message, for nothing when nobody collects them.
    let (provider, otel) = if exporting {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| ServiceError::Otlp(e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service_name.to_owned())
                    .build(),
            )
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("harnessgate"));
        (Some(provider), Some(layer))
    } else {
        (None, None)
    };
    let result = tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(fmt_text)
        .with(fmt_json)
        .try_init();
    if result.is_err() {
        tracing::debug!("tracing subscriber already installed");
    }
    Ok(Telemetry { provider })
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Fails only when another recorder is installed (tests running
        // several stacks in one process); this handle then renders nothing.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Readiness of the components in this process.
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    /// Marks the process ready (or not) to take traffic.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// `/healthz` (alive), `/readyz` (connected and serving) and `/metrics`
/// (Prometheus text format).
pub fn admin_router(health: Health) -> Router {
    let handle = metrics();
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = health.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = handle.render();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        body,
                    )
                }
            }),
        )
}

/// Serves `router` on `addr` until `shutdown` fires. Returns the bound
/// address (useful with port 0) once listening.
pub async fn serve(
    addr: &str,
    router: Router,
    shutdown: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> Result<SocketAddr, ServiceError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ServiceError::Bind {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })?;
    let local = listener.local_addr().map_err(|e| ServiceError::Bind {
        addr: addr.to_owned(),
        reason: e.to_string(),
    })?;
    tracker.spawn(async move {
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let result = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok(local)
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install sigterm handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Default grace period for draining on shutdown.
pub const DRAIN_GRACE: Duration = Duration::from_secs(15);
