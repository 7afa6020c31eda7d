//! The http action against a real HTTP server on 127.0.0.1, reached through
//! the public `Executor` as the worker uses it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{any, get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use zapflow_actions::{ActionError, EmailSettings, Executor, HttpSettings, IpNet, Mailer, StepRef};
use zapflow_core::ActionSpec;

#[derive(Clone, Default)]
struct Hits {
    /// Every request the server answered.
    all: Arc<AtomicUsize>,
    /// Requests that reached the target of the test redirect.
    landing: Arc<AtomicUsize>,
}

struct Server {
    port: u16,
    hits: Hits,
}

async fn echo(State(hits): State<Hits>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    hits.all.fetch_add(1, Ordering::SeqCst);
    let header = |name: &str| {
        headers
            .get(name)
            .map(|value| value.to_str().unwrap().to_owned())
    };
    let reply = json!({
        "idempotency_key": header("idempotency-key"),
        "user_agent": header("user-agent"),
        "content_type": header("content-type"),
        "authorization": header("authorization"),
        "webhook_id": header("webhook-id"),
        "webhook_timestamp": header("webhook-timestamp"),
        "webhook_signature": header("webhook-signature"),
        "body": String::from_utf8_lossy(&body),
    });
    ([("x-reply", "yes")], axum::Json(reply))
}

async fn status(State(hits): State<Hits>, Path(code): Path<u16>) -> impl IntoResponse {
    hits.all.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::from_u16(code).unwrap(),
        format!("status {code}"),
    )
}

async fn serve() -> Server {
    let hits = Hits::default();
    let app = Router::new()
        .route("/echo", post(echo))
        .route("/status/{code}", any(status))
        .route(
            "/text",
            get(|State(hits): State<Hits>| async move {
                hits.all.fetch_add(1, Ordering::SeqCst);
                "hello"
            }),
        )
        .route(
            "/big",
            get(|State(hits): State<Hits>| async move {
                hits.all.fetch_add(1, Ordering::SeqCst);
                "a".repeat(100 * 1024)
            }),
        )
        .route(
            "/slow",
            any(|State(hits): State<Hits>| async move {
                hits.all.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .route(
            "/redirect",
            any(|State(hits): State<Hits>| async move {
                hits.all.fetch_add(1, Ordering::SeqCst);
                (StatusCode::FOUND, [(header::LOCATION, "/landing")])
            }),
        )
        .route(
            "/landing",
            any(|State(hits): State<Hits>| async move {
                hits.all.fetch_add(1, Ordering::SeqCst);
                hits.landing.fetch_add(1, Ordering::SeqCst);
                "landed"
            }),
        )
        .with_state(hits.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { port, hits }
}

fn mailer() -> Mailer {
    Mailer::new(&EmailSettings {
        smtp_url: None,
        mailbox_dir: std::env::temp_dir().join("zapflow-actions-http-tests"),
        from: "zapflow@example.com".into(),
        timeout: Duration::from_secs(5),
        max_recipients: zapflow_actions::DEFAULT_MAX_RECIPIENTS,
    })
    .unwrap()
}

/// An executor that may reach the given ranges besides public addresses.
fn executor(allow: &[&str]) -> Executor {
    let settings = HttpSettings {
        allow_cidrs: allow
            .iter()
            .map(|cidr| cidr.parse::<IpNet>().unwrap())
            .collect(),
        ..HttpSettings::default()
    };
    Executor::with_http(mailer(), &settings).unwrap()
}

fn loopback_executor() -> Executor {
    executor(&["127.0.0.0/8"])
}

const RUN_ID: uuid::Uuid = uuid::Uuid::from_u128(0x0192_0000_0000_7000_8000_0000_0000_00aa);

async fn run(executor: &Executor, config: Value) -> Result<Value, ActionError> {
    let action: ActionSpec =
        serde_json::from_value(json!({"type": "http", "config": config})).unwrap();
    zapflow_actions::validate_actions(std::slice::from_ref(&action)).unwrap();
    let context = json!({"trigger": {"name": "Ada", "token": "s3cret"}});
    let step = StepRef {
        run_id: RUN_ID,
        stage: 1,
    };
    executor
        .execute(&action, &context, step)
        .await
        .map(|completed| completed.output)
}

fn permanent(result: Result<Value, ActionError>) -> String {
    match result {
        Err(ActionError::Permanent(message)) => message,
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

fn transient(result: Result<Value, ActionError>) -> String {
    match result {
        Err(ActionError::Transient(message)) => message,
        other => panic!("expected a transient error, got {other:?}"),
    }
}

#[tokio::test]
async fn the_output_carries_status_headers_and_the_parsed_body() {
    let server = serve().await;
    let output = run(
        &loopback_executor(),
        json!({
            "url": format!("http://127.0.0.1:{}/echo", server.port),
            "headers": {"Authorization": "Bearer {{ trigger.token }}"},
            "body": r#"{"hello": "{{ trigger.name }}"}"#,
        }),
    )
    .await
    .unwrap();

    assert_eq!(output["status"], 200);
    assert_eq!(output["headers"]["x-reply"], "yes");
    assert_eq!(output["headers"]["content-type"], "application/json");
    let received = &output["body"];
    assert_eq!(
        received["idempotency_key"],
        format!("{RUN_ID}:1"),
        "the Idempotency-Key is run id and stage"
    );
    assert_eq!(received["user_agent"], "zapflow");
    assert_eq!(received["content_type"], "application/json");
    assert_eq!(received["authorization"], "Bearer s3cret");
    assert_eq!(received["body"], r#"{"hello": "Ada"}"#);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_kept_as_text_and_capped() {
    let server = serve().await;
    let executor = loopback_executor();
    let base = format!("http://127.0.0.1:{}", server.port);

    let text = run(
        &executor,
        json!({"method": "GET", "url": format!("{base}/text")}),
    )
    .await;
    assert_eq!(text.unwrap()["body"], "hello");

    let big = run(
        &executor,
        json!({"method": "GET", "url": format!("{base}/big")}),
    )
    .await;
    assert_eq!(big.unwrap()["body"].as_str().unwrap().len(), 64 * 1024);
}

#[tokio::test]
async fn failures_are_classified_by_status() {
    let server = serve().await;
    let executor = loopback_executor();
    let url = |code: u16| format!("http://127.0.0.1:{}/status/{code}", server.port);

    let message = transient(run(&executor, json!({"url": url(500)})).await);
    assert_eq!(message, "http 500 Internal Server Error: status 500");
    transient(run(&executor, json!({"url": url(503)})).await);
    transient(run(&executor, json!({"url": url(429)})).await);
    transient(run(&executor, json!({"url": url(408)})).await);
    let message = permanent(run(&executor, json!({"url": url(404)})).await);
    assert_eq!(message, "http 404 Not Found: status 404");
    permanent(run(&executor, json!({"url": url(400)})).await);
    permanent(run(&executor, json!({"url": url(401)})).await);
    let created = run(&executor, json!({"method": "PUT", "url": url(201)})).await;
    assert_eq!(created.unwrap()["status"], 201);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let server = serve().await;
    let url = format!("http://127.0.0.1:{}/redirect", server.port);
    let message = permanent(run(&loopback_executor(), json!({"url": url})).await);
    assert!(message.contains("redirects are not followed"), "{message}");
    assert!(message.contains("/landing"), "{message}");
    assert_eq!(server.hits.landing.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_target_that_is_down_or_slow_is_transient() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let message = transient(
        run(
            &loopback_executor(),
            json!({"url": format!("http://127.0.0.1:{port}/")}),
        )
        .await,
    );
    assert!(message.starts_with("http: "), "{message}");

    let server = serve().await;
    let message = transient(
        run(
            &loopback_executor(),
            json!({
                "url": format!("http://127.0.0.1:{}/slow", server.port),
                "timeout_seconds": 0.3,
            }),
        )
        .await,
    );
    assert!(message.contains("timed out"), "{message}");
}

/// Asserts that nothing connected to `listener`: a connection attempt
/// would be waiting in its backlog.
async fn assert_never_connected(listener: &TcpListener) {
    let accepted = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
    assert!(accepted.is_err(), "the guard let a connection through");
}

#[tokio::test]
async fn loopback_is_blocked_before_connecting_without_an_allowlist() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let executor = Executor::new(mailer());

    let loopback = "127.0.0.1 is not a public address (loopback 127.0.0.0/8)";
    for host in ["127.0.0.1", "2130706433", "0177.0.0.1", "0x7f.1", "127.1"] {
        let url = format!("http://{host}:{port}/");
        let message = permanent(run(&executor, json!({"url": url})).await);
        assert_eq!(message, format!("blocked: {loopback}"), "{url}");
    }
    let url = format!("http://[::ffff:127.0.0.1]:{port}/");
    let message = permanent(run(&executor, json!({"url": url})).await);
    assert_eq!(message, format!("blocked: ::ffff:{loopback}"), "{url}");
    assert_never_connected(&listener).await;
}

#[tokio::test]
async fn a_name_that_resolves_to_loopback_is_blocked() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let message = permanent(
        run(
            &Executor::new(mailer()),
            json!({"url": format!("http://localhost:{port}/")}),
        )
        .await,
    );
    assert!(
        message.starts_with("blocked: localhost resolves to "),
        "{message}"
    );
    assert_never_connected(&listener).await;
}

#[tokio::test]
async fn an_allowlisted_name_is_reached() {
    let server = serve().await;
    let output = run(
        &executor(&["127.0.0.0/8", "::1/128"]),
        json!({"method": "get", "url": format!("http://localhost:{}/text", server.port)}),
    )
    .await
    .unwrap();
    assert_eq!(output["body"], "hello");
    assert_eq!(server.hits.all.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_allowlist_for_another_range_does_not_open_loopback() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let message = permanent(
        run(
            &executor(&["10.0.0.0/8"]),
            json!({"url": format!("http://127.0.0.1:{port}/")}),
        )
        .await,
    );
    assert!(message.starts_with("blocked: "), "{message}");
    assert_never_connected(&listener).await;
}

#[tokio::test]
async fn a_signing_secret_adds_standard_webhooks_headers_the_receiver_can_verify() {
    use zapflow_core::webhook_signature::{Secret, SignatureHeaders, verify};

    let server = serve().await;
    let secret = Secret::generate();
    let config = json!({
        "url": format!("http://127.0.0.1:{}/echo", server.port),
        "body": "{\"name\": \"{{ trigger.name }}\"}",
        "signing_secret": secret.expose(),
    });
    let output = run(&loopback_executor(), config).await.unwrap();
    let seen = &output["body"];
    let headers = SignatureHeaders {
        id: seen["webhook_id"].as_str(),
        timestamp: seen["webhook_timestamp"].as_str(),
        signature: seen["webhook_signature"].as_str(),
    };
    assert_eq!(
        headers.id,
        seen["idempotency_key"].as_str(),
        "the message id is the idempotency key"
    );
    let body = seen["body"].as_str().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(verify(&[secret], headers, body.as_bytes(), now), Ok(()));
    assert!(verify(&[Secret::generate()], headers, body.as_bytes(), now).is_err());
}
