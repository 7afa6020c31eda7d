//! What zapflow tells the people who operate it: Prometheus metrics, one
//! OpenTelemetry trace per run, logs as text or JSON, and the admin
//! listener every process serves (`/metrics`, `/livez`, `/readyz`).
//!
//! The other crates record metrics with the `metrics` macros and open
//! `tracing` spans; this crate installs what turns them into a scrape and
//! into exported spans, and carries trace context across the places a run
//! crosses: HTTP and gRPC headers, outbox rows and Kafka messages.

mod admin;
mod logs;
pub mod metrics;
pub mod trace;

use std::str::FromStr;

pub use admin::{Admin, Check};
pub use logs::LogFormat;

/// How a process reports.
#[derive(Debug, Clone, Default)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// An OTLP/gRPC collector; `None` turns tracing off.
    pub otlp_endpoint: Option<String>,
    /// The default log filter, unless `RUST_LOG` says otherwise.
    pub default_filter: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot export traces to {endpoint}: {source}")]
    Otlp {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("a logger is already installed in this process")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// The reporting of a process; [`Telemetry::shutdown`] sends the spans
/// still buffered.
pub struct Telemetry {
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the logger (and, with an OTLP endpoint, the trace
    /// exporter) for this process, and the metrics recorder.
    pub fn init(settings: &TelemetrySettings) -> Result<Self, TelemetryError> {
        metrics::install();
        let tracer = match &settings.otlp_endpoint {
            Some(endpoint) => {
                Some(
                    trace::provider(endpoint).map_err(|source| TelemetryError::Otlp {
                        endpoint: endpoint.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        logs::install(settings, tracer.as_ref())?;
        Ok(Self { tracer })
    }

    /// Flushes the spans not exported yet (at most a few seconds).
    pub async fn shutdown(self) {
        if let Some(tracer) = self.tracer {
            let _ = tokio::task::spawn_blocking(move || tracer.shutdown()).await;
        }
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?}: use text or json")),
        }
    }
}
