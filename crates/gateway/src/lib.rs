//! The webhook gateway: `POST /hooks/catch/{zap_id}/{token}` with a JSON body
//! becomes an `IngestService.Ingest` call, answered `202` with the run id.

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Channel;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use zapflow_proto::v1::IngestRequest;
use zapflow_proto::v1::ingest_service_client::IngestServiceClient;

#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// Largest webhook body accepted; larger ones get 413 before being read
    /// in full, with or without Content-Length.
    pub body_limit: usize,
    pub request_timeout: Duration,
}

/// Headers never stored with a run: credentials meant for a proxy or the
/// gateway itself, not for templates.
const DROPPED_HEADERS: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];
const MAX_IDEMPOTENCY_KEY: usize = 255;

#[derive(Clone)]
struct Gateway {
    ingest: IngestServiceClient<Channel>,
}

/// The gateway's routes, forwarding to `ingest`.
pub fn router(ingest: IngestServiceClient<Channel>, settings: &GatewaySettings) -> Router {
    Router::new()
        .route("/hooks/catch/{zap_id}/{token}", post(catch))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Gateway { ingest })
        .layer(DefaultBodyLimit::max(settings.body_limit))
        .layer(RequestBodyLimitLayer::new(settings.body_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            settings.request_timeout,
        ))
        .layer(TraceLayer::new_for_http())
}

/// A client for the API's IngestService at `url`; connects on first use and
/// reconnects after failures.
pub fn ingest_client(
    url: &str,
    max_message_bytes: usize,
) -> Result<IngestServiceClient<Channel>, axum::http::uri::InvalidUri> {
    let channel = Channel::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(IngestServiceClient::new(channel).max_encoding_message_size(max_message_bytes))
}

/// Serves `router` on `listener` until `shutdown`, then finishes requests
/// under way.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
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
    State(mut gateway): State<Gateway>,
    Path((zap_id, token)): Path<(String, String)>,
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
    if let Err(parse_error) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("the body is not valid JSON: {parse_error}"),
        );
    }
    let idempotency_key = ["idempotency-key", "webhook-id"]
        .iter()
        .find_map(|name| headers.get(*name))
        .map(|value| value.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    if idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
        return error(
            StatusCode::BAD_REQUEST,
            "the idempotency key is longer than 255 bytes",
        );
    }

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

    let request = IngestRequest {
        zap_id,
        token,
        body: body.to_vec(),
        headers: forwarded,
        query,
        idempotency_key,
    };
    match gateway.ingest.ingest(request).await {
        Ok(reply) => {
            let reply = reply.into_inner();
            (
                StatusCode::ACCEPTED,
                axum::Json(json!({ "run_id": reply.run_id, "duplicate": reply.duplicate })),
            )
                .into_response()
        }
        Err(status) => status_to_response(&status),
    }
}

/// The one table from IngestService answers to HTTP.
fn status_to_response(status: &tonic::Status) -> Response {
    match status.code() {
        Code::NotFound => error(StatusCode::NOT_FOUND, "not found"),
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
