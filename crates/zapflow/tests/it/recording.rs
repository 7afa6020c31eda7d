//! Recording a step's outcome never repeats its effect: outputs of any
//! content are stored on every store, and a failed write of the result is
//! retried on its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::header::CONTENT_TYPE;
use serde_json::json;
use zapflow_proto::v1 as pb;
use zapflow_testkit::{SmtpSink, Stack};

use crate::support::{
    Deployment, WAIT, create_zap, deliver, email_action, http_action, new_user,
    stack_with_loopback_http, stored_run, wait_for_run,
};

/// Bytes no text type can hold: NUL, a control character, invalid UTF-8.
const BINARY: &[u8] = &[0, 1, 2, 0, 0xff, 0xfe, b'z'];
/// JSON whose string holds an escaped NUL, valid JSON that PostgreSQL's
/// jsonb refuses as it is.
const JSON_WITH_NUL: &str = r#"{"name": "a\u0000b", "order": 4711}"#;

/// A target answering `/binary` and `/json`, counting requests to each.
struct Target {
    base: String,
    binary_hits: Arc<AtomicUsize>,
    json_hits: Arc<AtomicUsize>,
}

async fn target() -> Target {
    let (binary_hits, json_hits) = (Arc::default(), Arc::default());
    let count = |hits: &Arc<AtomicUsize>| {
        let hits = Arc::clone(hits);
        move || hits.fetch_add(1, Ordering::SeqCst)
    };
    let (on_binary, on_json) = (count(&binary_hits), count(&json_hits));
    let app = axum::Router::new()
        .route(
            "/binary",
            axum::routing::get(move || async move {
                on_binary();
                ([(CONTENT_TYPE, "application/octet-stream")], BINARY)
            }),
        )
        .route(
            "/json",
            axum::routing::get(move || async move {
                on_json();
                ([(CONTENT_TYPE, "application/json")], JSON_WITH_NUL)
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Target {
        base,
        binary_hits,
        json_hits,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_binary_and_nul_responses_are_recorded_once() {
    binary_and_nul_responses_are_recorded_once(Deployment::PostgresOnly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_binary_and_nul_responses_are_recorded_once() {
    binary_and_nul_responses_are_recorded_once(Deployment::Embedded).await;
}

async fn binary_and_nul_responses_are_recorded_once(deployment: Deployment) {
    let target = target().await;
    let smtp = SmtpSink::start().await;
    let stack = stack_with_loopback_http(&smtp, deployment).await;
    let key = new_user(&stack, "ada").await;
    let (_, url) = create_zap(
        &stack,
        &key,
        vec![
            http_action("GET", &format!("{}/binary", target.base)),
            http_action("GET", &format!("{}/json", target.base)),
            email_action(
                "ops@example.com",
                "order {{ steps[1].body.order }}",
                "{{ steps[1].body.name }}",
            ),
        ],
    )
    .await;
    let run_id = deliver(&url, &json!({})).await;
    wait_for_run(&stack, &key, &run_id, pb::RunStatus::Succeeded).await;

    assert_eq!(target.binary_hits.load(Ordering::SeqCst), 1);
    assert_eq!(target.json_hits.load(Ordering::SeqCst), 1);
    let run = stored_run(&stack, &run_id).await;
    for step in &run.steps {
        assert_eq!(step.attempts, 1, "{step:?}");
    }
    assert_eq!(
        run.steps[0].output.as_ref().unwrap()["body"],
        json!({"base64": "AAECAP/+eg==", "content_type": "application/octet-stream"}),
        "a binary body is kept whole"
    );
    assert_eq!(
        run.steps[1].output.as_ref().unwrap()["body"],
        json!({"name": "a\u{FFFD}b", "order": 4711}),
        "NUL in text becomes U+FFFD"
    );
    let mails = smtp.wait_for(1, WAIT).await;
    assert_eq!(mails[0].header("Subject").unwrap(), "order 4711");
    stack.stop().await;
}

/// Makes the first recording of a succeeded step fail once, as a database
/// restart or a lost connection would. A sequence counts the calls: unlike
/// a table, it keeps counting when the failing transaction rolls back.
async fn fail_the_first_success_record(stack: &Stack) {
    let pool = stack.store.postgres().expect("a PostgreSQL stack");
    sqlx::raw_sql(
        "CREATE SEQUENCE success_records;
         CREATE FUNCTION fail_first_success_record() RETURNS trigger AS $$
         BEGIN
             IF NEW.status = 'succeeded' AND nextval('success_records') = 1 THEN
                 RAISE EXCEPTION 'injected: the database went away';
             END IF;
             RETURN NEW;
         END;
         $$ LANGUAGE plpgsql;
         CREATE TRIGGER fail_first_success_record BEFORE UPDATE ON zap_run_steps
             FOR EACH ROW EXECUTE FUNCTION fail_first_success_record();",
    )
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_recording_is_retried_without_repeating_the_effect() {
    let target = target().await;
    let smtp = SmtpSink::start().await;
    let stack = stack_with_loopback_http(&smtp, Deployment::PostgresOnly).await;
    fail_the_first_success_record(&stack).await;
    let key = new_user(&stack, "ada").await;
    let (_, url) = create_zap(
        &stack,
        &key,
        vec![
            email_action("bob@example.com", "once", "only once"),
            http_action("GET", &format!("{}/json", target.base)),
        ],
    )
    .await;
    let run_id = deliver(&url, &json!({})).await;
    wait_for_run(&stack, &key, &run_id, pb::RunStatus::Succeeded).await;

    let (records,): (i64,) = sqlx::query_as("SELECT last_value FROM success_records")
        .fetch_one(stack.store.postgres().unwrap())
        .await
        .unwrap();
    assert_eq!(records, 3, "one failed and two good recordings");
    assert_eq!(smtp.mails().len(), 1, "the email was sent once");
    assert_eq!(target.json_hits.load(Ordering::SeqCst), 1);
    let run = stored_run(&stack, &run_id).await;
    assert_eq!(run.steps[0].attempts, 1);
    assert_eq!(run.steps[0].history.len(), 1);
    stack.stop().await;
}
