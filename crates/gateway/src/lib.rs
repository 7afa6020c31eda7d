//! The webhook gateway: `POST /hooks/catch/{zap_id}/{token}` with a JSON body
//! becomes an `IngestService.Ingest` call, answered `202` with the run id.

pub mod rate_limit;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, Query, RawPathParams, Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::Instrument;
use uuid::Uuid;
use zapflow_core::{delivery, webhook_signature};
use zapflow_proto::v1::ingest_service_client::IngestServiceClient;
use zapflow_proto::v1::{IngestRequest, IngestResponse};
use zapflow_telemetry::metrics as telemetry;
use zapflow_telemetry::trace;

use crate::rate_limit::RateLimiter;

#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// Largest webhook body accepted; larger ones get 413 before being read
    /// in full, with or without Content-Length.
    pub body_limit: usize,
    pub request_timeout: Duration,
    /// Deliveries per second (and burst) one zap's URL accepts; `None`
    /// turns the limit off.
    pub per_zap_limit: Option<RateLimit>,
    /// The same per source address.
    pub per_ip_limit: Option<RateLimit>,
}

/// A sustained rate with a burst allowance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// The limiters of the webhook route: a flooded zap or sender is refused
/// with 429 before its body is read, and nobody else notices.
struct Limits {
    per_zap: Option<RateLimiter<Uuid>>,
    per_ip: Option<RateLimiter<IpAddr>>,
}

/// Headers never stored with a run: credentials meant for a proxy or the
/// gateway itself, not for templates.
const DROPPED_HEADERS: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];
/// How long a readiness probe waits for the API.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// A gRPC connection to the API, over the network or inside this process.
/// (A concrete error type: with a boxed one, handler futures trip over a
/// higher-ranked lifetime limitation of the compiler.)
type ApiChannel = BoxCloneSyncService<
    axum::http::Request<tonic::body::Body>,
    axum::http::Response<tonic::body::Body>,
    tonic::transport::Error,
>;

/// The API's IngestService as the gateway reaches it: on the API's ingest
/// listener (`connect`) or in this process with no socket (`in_process`).
/// Either way the gateway speaks the IngestService contract.
#[derive(Clone)]
pub struct IngestTarget {
    ingest: IngestServiceClient<ApiChannel>,
    health: HealthClient<ApiChannel>,
    /// Presented as `authorization: Bearer` when the API asks for it.
    token: Option<MetadataValue<Ascii>>,
}

impl IngestTarget {
    /// The API's ingest listener at `url`; connects on first use and
    /// reconnects after failures.
    pub fn connect(
        url: &str,
        max_message_bytes: usize,
        token: Option<&str>,
    ) -> Result<Self, InvalidTarget> {
        let channel = Channel::from_shared(url.to_owned())
            .map_err(|_| InvalidTarget::Url(url.to_owned()))?
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        let token = token
            .map(|token| format!("Bearer {token}").parse())
            .transpose()
            .map_err(|_| InvalidTarget::Token)?;
        Ok(Self::over(
            BoxCloneSyncService::new(channel),
            max_message_bytes,
            token,
        ))
    }

    /// The API's ingest service running in this process.
    pub fn in_process<S>(service: S, max_message_bytes: usize) -> Self
    where
        S: tower::Service<
                axum::http::Request<tonic::body::Body>,
                Response = axum::http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let service = ServiceExt::<axum::http::Request<tonic::body::Body>>::map_err(
            service,
            |never| -> tonic::transport::Error { match never {} },
        );
        Self::over(BoxCloneSyncService::new(service), max_message_bytes, None)
    }

    fn over(
        channel: ApiChannel,
        max_message_bytes: usize,
        token: Option<MetadataValue<Ascii>>,
    ) -> Self {
        Self {
            ingest: IngestServiceClient::new(channel.clone())
                .max_encoding_message_size(max_message_bytes),
            health: HealthClient::new(channel),
            token,
        }
    }

    async fn ingest(&self, request: IngestRequest) -> Result<IngestResponse, tonic::Status> {
        let mut request = tonic::Request::new(request);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        if let Some(traceparent) = trace::current_traceparent()
            && let Ok(value) = traceparent.parse()
        {
            request.metadata_mut().insert(trace::TRACEPARENT, value);
        }
        Ok(self.ingest.clone().ingest(request).await?.into_inner())
    }

    /// Whether the API answers and says its IngestService is serving.
    pub async fn ready(&self) -> bool {
        let mut health = self.health.clone();
        let check = health.check(HealthCheckRequest {
            service: "zapflow.v1.IngestService".into(),
        });
        matches!(
            tokio::time::timeout(READY_TIMEOUT, check).await,
            Ok(Ok(answer)) if answer.get_ref().status == ServingStatus::Serving as i32
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InvalidTarget {
    #[error("invalid IngestService URL {0:?}")]
    Url(String),
    #[error("the ingest token is not valid header text")]
    Token,
}

/// The gateway's routes, forwarding to `ingest`.
pub fn router(ingest: IngestTarget, settings: &GatewaySettings) -> Router {
    let limits = Arc::new(Limits {
        per_zap: settings
            .per_zap_limit
            .map(|limit| RateLimiter::new(limit.per_second, limit.burst)),
        per_ip: settings
            .per_ip_limit
            .map(|limit| RateLimiter::new(limit.per_second, limit.burst)),
    });
    Router::new()
        .route("/hooks/catch/{zap_id}/{token}", post(catch))
        .route_layer(middleware::from_fn_with_state(limits, rate_limit))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(ingest)
        .layer(DefaultBodyLimit::max(settings.body_limit))
        .layer(RequestBodyLimitLayer::new(settings.body_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            settings.request_timeout,
        ))
        .layer(TraceLayer::new_for_http())
        .layer(middleware::from_fn(observe_webhook))
}

/// Counts every webhook's answer by status, and makes it the root span of
/// its run's trace (or a child of the sender's, given a `traceparent`).
async fn observe_webhook(request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with("/hooks/") {
        return next.run(request).await;
    }
    let span = trace::span(|| {
        tracing::info_span!(
            "webhook",
            otel.kind = "server",
            http.request.method = %request.method(),
            http.response.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        )
    });
    trace::continue_trace(&span, trace::from_headers(request.headers()));
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    metrics::counter!(telemetry::WEBHOOKS, "status" => status.as_str().to_owned()).increment(1);
    response
}

/// Serves `router` on `listener` until `shutdown`, then finishes requests
/// under way.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

/// 200 while the API answers, 503 while it does not.
async fn ready(State(ingest): State<IngestTarget>) -> Response {
    if ingest.ready().await {
        (StatusCode::OK, "ready").into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "the API does not answer")
    }
}

/// The zap a webhook URL names, as the route's `{zap_id}` spells it. Only
/// the canonical spelling of a zap id names a zap: other spellings are
/// unknown URLs, so no spelling gets a rate-limit budget of its own.
#[derive(Debug, Clone, Copy)]
struct ZapId(Uuid);

impl<S: Send + Sync> FromRequestParts<S> for ZapId {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        // Raw, not percent-decoded: an encoded id is another spelling.
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| not_found())?;
        params
            .iter()
            .find(|(name, _)| *name == "zap_id")
            .and_then(|(_, id)| delivery::parse_zap_id(id))
            .map(Self)
            .ok_or_else(not_found)
    }
}

async fn rate_limit(
    State(limits): State<Arc<Limits>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ZapId(zap_id): ZapId,
    request: Request,
    next: Next,
) -> Response {
    let verdict = limits
        .per_ip
        .as_ref()
        .map_or(Ok(()), |limiter| limiter.check(&peer.ip()))
        .map_err(|retry_after| ("ip", retry_after))
        .and_then(|()| {
            limits
                .per_zap
                .as_ref()
                .map_or(Ok(()), |limiter| limiter.check(&zap_id))
                .map_err(|retry_after| ("zap", retry_after))
        });
    match verdict {
        Ok(()) => next.run(request).await,
        Err((limit, retry_after)) => {
            metrics::counter!(telemetry::RATE_LIMIT_REFUSALS, "limit" => limit).increment(1);
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests; retry later",
            );
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_header_secs()),
            );
            response
        }
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not found")
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

async fn catch(
    State(ingest): State<IngestTarget>,
    ZapId(zap_id): ZapId,
    Path((_, token)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_json(&headers) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "webhooks must be sent as JSON (Content-Type: application/json)",
        );
    }
    let idempotency_key = ["idempotency-key", webhook_signature::HEADER_ID]
        .iter()
        .find_map(|name| headers.get(*name))
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .unwrap_or_default();

    let mut forwarded: HashMap<String, String> = HashMap::new();
    for (name, value) in &headers {
        if DROPPED_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes());
        forwarded
            .entry(name.as_str().to_owned())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }

    // The API checks the body, the key and the rest of the delivery: one
    // set of rules whoever calls it.
    let request = IngestRequest {
        zap_id: zap_id.to_string(),
        token,
        body: body.to_vec(),
        headers: forwarded,
        query,
        idempotency_key,
    };
    match ingest.ingest(request).await {
        Ok(reply) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({ "run_id": reply.run_id, "duplicate": reply.duplicate })),
        )
            .into_response(),
        Err(status) => status_to_response(&status),
    }
}

/// The one table from IngestService answers to HTTP.
fn status_to_response(status: &tonic::Status) -> Response {
    match status.code() {
        Code::NotFound => not_found(),
        Code::Unauthenticated => error(StatusCode::UNAUTHORIZED, status.message()),
        Code::InvalidArgument => error(StatusCode::BAD_REQUEST, status.message()),
        Code::OutOfRange | Code::ResourceExhausted => {
            error(StatusCode::PAYLOAD_TOO_LARGE, status.message())
        }
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
            tracing::warn!(%status, "ingest unavailable");
            let mut response = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily unavailable; retry",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
        _ => {
            tracing::error!(%status, "ingest failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}
