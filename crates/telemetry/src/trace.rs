//! One trace per run, across the places a run crosses: the webhook's
//! headers, the gRPC call, the outbox row, the Kafka message and the HTTP
//! action's request all carry a W3C `traceparent`.
//!
//! With tracing off (no OTLP endpoint) every function here returns at
//! once: nothing is formatted, stored or sent.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_otlp::{ExporterBuildError, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header (and outbox column, and Kafka header) that carries a span's
/// context: `00-<trace id>-<span id>-<flags>`.
pub const TRACEPARENT: &str = "traceparent";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Spans batched to the OTLP/gRPC collector at `endpoint`.
pub(crate) fn provider(endpoint: &str) -> Result<SdkTracerProvider, ExporterBuildError> {
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "zapflow".into());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    ENABLED.store(true, Ordering::Relaxed);
    Ok(provider)
}

/// The span `make` opens when spans are exported, else none: a span that
/// only a trace needs costs nothing with tracing off. (Spans whose fields
/// logs need, such as a step's run and zap, are opened either way.)
pub fn span(make: impl FnOnce() -> Span) -> Span {
    match enabled() {
        true => make(),
        false => Span::none(),
    }
}

/// `span`'s context as a `traceparent` value, to send or store with the
/// work it starts; `None` with tracing off.
pub fn traceparent(span: &Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let mut carrier = Traceparent(None);
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.0
}

/// The current span's context as a `traceparent` value.
pub fn current_traceparent() -> Option<String> {
    traceparent(&Span::current())
}

/// Makes the new `span` continue the trace `traceparent` names (a
/// malformed value starts a new trace) and records the trace id in its
/// `trace_id` field, for the logs. Call it before entering the span.
pub fn continue_trace(span: &Span, traceparent: Option<&str>) {
    if !enabled() {
        return;
    }
    if let Some(value) = traceparent {
        let parent = TraceContextPropagator::new().extract(&Traceparent(Some(value.to_owned())));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
}

/// The `traceparent` of a request's headers, if any.
pub fn from_headers(headers: &http::HeaderMap) -> Option<&str> {
    if !enabled() {
        return None;
    }
    headers.get(TRACEPARENT)?.to_str().ok()
}

/// Adds the current span's `traceparent` to outgoing headers.
pub fn inject_current(headers: &mut http::HeaderMap) {
    if let Some(value) = current_traceparent()
        && let Ok(value) = http::HeaderValue::from_str(&value)
    {
        headers.insert(TRACEPARENT, value);
    }
}

/// A carrier of the one header W3C trace context needs here (`tracestate`
/// is not kept).
struct Traceparent(Option<String>);

impl Injector for Traceparent {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

impl Extractor for Traceparent {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0.as_deref()).flatten()
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}
