//! One trace spans web → bridge → egress: the trace context travels in NATS
//! headers. (Its own test binary: it installs the global subscriber.)

use std::time::Duration;

use hg_e2e::{Stack, WebUser};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[tokio::test]
async fn one_trace_follows_a_message_across_services() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::INFO)
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .init();

    let stack = Stack::start().await;
    let _bridge = stack.echo_bridge().await;
    let (_web, url) = stack.default_web().await;
    let user = WebUser::signup(&url).await;
    let mut events = user.events(None).await;
    user.send("trace me").await;
    assert_eq!(
        events
            .next_message(Duration::from_secs(10))
            .await
            .unwrap()
            .text,
        "trace me"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = provider.force_flush();

    let spans = exporter.get_finished_spans().unwrap();
    let find = |name: &str| {
        spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
            panic!(
                "no {name} span among {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
    };
    let web = find("web.inbound");
    let bridge = find("inbound");
    let egress = spans
        .iter()
        .find(|s| s.name == "egress" && s.span_context.trace_id() == web.span_context.trace_id());
    assert_eq!(
        bridge.span_context.trace_id(),
        web.span_context.trace_id(),
        "bridge joins the web trace"
    );
    assert!(
        bridge.parent_span_is_remote,
        "the bridge span's parent came over NATS"
    );
    assert!(egress.is_some(), "egress joins the same trace");
}
