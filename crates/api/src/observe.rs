//! What every gRPC call leaves behind: a server span (continuing the
//! caller's trace, given a `traceparent`), and its count and latency by
//! method and status code.

use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tonic::Code;
use tower::{Layer, Service};
use tracing::Instrument;
use zapflow_telemetry::metrics::{GRPC_REQUEST_DURATION, GRPC_REQUESTS};
use zapflow_telemetry::trace;

/// Observes the calls of the services it wraps.
#[derive(Debug, Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for Observe<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let span = trace::span(|| {
            tracing::info_span!(
                "grpc",
                otel.name = method.trim_start_matches('/'),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.grpc.status_code = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            )
        });
        trace::continue_trace(&span, trace::from_headers(request.headers()));
        let started = Instant::now();
        let answer = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let response = answer.await?;
            // An error is a trailers-only answer: its status is in the
            // headers. A success's is in the trailers, after the body.
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|value| value.to_str().ok()?.parse::<i32>().ok())
                .map_or(Code::Ok, Code::from);
            span.record("rpc.grpc.status_code", code as i32);
            // Unknown paths would make a label per prober's guess.
            let method = match code {
                Code::Unimplemented => "unknown".to_owned(),
                _ => method,
            };
            metrics::counter!(GRPC_REQUESTS, "method" => method.clone(), "code" => code_name(code))
                .increment(1);
            metrics::histogram!(GRPC_REQUEST_DURATION, "method" => method)
                .record(started.elapsed().as_secs_f64());
            Ok(response)
        })
    }
}

/// The code's name as the gRPC specification spells it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
