//! The admin listener: `/metrics`, `/livez` and `/readyz`, one per
//! process whatever its roles.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::{BoxFuture, join_all};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A check: `Ok` while what it looks at answers, else why not.
pub type Check = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// How long a check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the admin listener of a process reports.
#[derive(Clone, Default)]
pub struct Admin {
    /// Named checks, all of which must pass for the process to be ready.
    readiness: Vec<(&'static str, Check)>,
    /// Run before each scrape, to sample gauges (failures are logged).
    samplers: Vec<Check>,
}

impl Admin {
    /// The process is ready only while `check` passes too.
    pub fn ready_when(mut self, name: &'static str, check: Check) -> Self {
        self.readiness.push((name, check));
        self
    }

    /// Runs `sample` before every scrape.
    pub fn sample_with(mut self, sample: Check) -> Self {
        self.samplers.push(sample);
        self
    }

    /// Serves the endpoints on `listener` until `shutdown`.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let router = Router::new()
            .route("/metrics", get(scrape))
            .route("/livez", get(|| async { "live" }))
            .route("/readyz", get(ready))
            .with_state(Arc::new(self));
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }

    /// The failing checks, each as `name: why`.
    async fn failures(&self) -> Vec<String> {
        let checks = self.readiness.iter().map(|(name, check)| async move {
            let outcome = match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            };
            outcome.err().map(|why| format!("{name}: {why}"))
        });
        let failures: Vec<String> = join_all(checks).await.into_iter().flatten().collect();
        metrics::gauge!(crate::metrics::READY).set(f64::from(u8::from(failures.is_empty())));
        failures
    }
}

async fn ready(State(admin): State<Arc<Admin>>) -> Response {
    let failures = admin.failures().await;
    if failures.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", failures.join("\n")),
        )
            .into_response()
    }
}

async fn scrape(State(admin): State<Arc<Admin>>) -> Response {
    let samples = admin.samplers.iter().map(|sample| async move {
        if let Err(error) = sample().await {
            tracing::warn!(%error, "sampling a metric failed");
        }
    });
    let ((), _) = futures::join!(
        async {
            join_all(samples).await;
        },
        admin.failures()
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
        .into_response()
}
