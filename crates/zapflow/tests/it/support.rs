//! Shared setup: a user with a key and a zap over gRPC.

use std::time::Duration;

use serde_json::{Value, json};
use zapflow_proto::v1 as pb;
use zapflow_testkit::{Stack, with_key};

pub const WAIT: Duration = Duration::from_secs(60);

/// JSON object -> protobuf Struct, as a gRPC client would send it.
pub fn to_struct(json: Value) -> prost_types::Struct {
    let Value::Object(map) = json else {
        panic!("not an object: {json}")
    };
    zapflow_proto::json::json_to_struct(&map)
}

pub fn email_action(to: &str, subject: &str, body: &str) -> pb::Action {
    pb::Action {
        r#type: "email".into(),
        config: Some(to_struct(
            json!({ "to": to, "subject": subject, "body": body }),
        )),
        retry: None,
    }
}

/// A new user's API key.
pub async fn new_user(stack: &Stack, name: &str) -> String {
    let (_, key) = stack.store.create_user(name).await.unwrap();
    key.to_string()
}

/// Creates a zap of a name of its own; returns it and its webhook URL.
pub async fn create_zap(stack: &Stack, key: &str, actions: Vec<pb::Action>) -> (pb::Zap, String) {
    let reply = stack
        .zap_client()
        .await
        .create_zap(with_key(
            key,
            pb::CreateZapRequest {
                // Names are unique per user; tests make many zaps.
                name: zapflow_testkit::unique("test zap"),
                actions,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    (reply.zap.unwrap(), reply.webhook_url)
}

/// A zap with one email action to `to@example.com`.
pub async fn simple_zap(stack: &Stack, key: &str) -> (pb::Zap, String) {
    create_zap(
        stack,
        key,
        vec![email_action(
            "to@example.com",
            "hello {{ trigger.n }}",
            "body",
        )],
    )
    .await
}

/// POSTs `body` as JSON; returns the status and the JSON answer.
pub async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    post_json_text(url, &body.to_string()).await
}

/// POSTs `body`, as it is, with a JSON content type.
pub async fn post_json_text(url: &str, body: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub async fn count_runs(stack: &Stack) -> i64 {
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM zap_runs")
        .fetch_one(stack.store.postgres().expect("a PostgreSQL stack"))
        .await
        .unwrap();
    count
}

/// Waits until GetRun shows the run in `status`.
pub async fn wait_for_run(
    stack: &Stack,
    key: &str,
    run_id: &str,
    status: pb::RunStatus,
) -> pb::Run {
    wait_for_run_at(&stack.zap_client().await, key, run_id, status).await
}

/// [`wait_for_run`] through a given client.
pub async fn wait_for_run_at(
    client: &zapflow_proto::v1::zap_service_client::ZapServiceClient<tonic::transport::Channel>,
    key: &str,
    run_id: &str,
    status: pb::RunStatus,
) -> pb::Run {
    zapflow_testkit::eventually(&format!("run {run_id} to be {status:?}"), WAIT, || {
        let mut client = client.clone();
        let request = with_key(
            key,
            pb::GetRunRequest {
                id: run_id.to_owned(),
            },
        );
        async move {
            let run = client
                .get_run(request)
                .await
                .unwrap()
                .into_inner()
                .run
                .unwrap();
            (run.status == status as i32).then_some(run)
        }
    })
    .await
}

/// The deployments zapflow can run as.
#[derive(Debug, Clone, Copy)]
pub enum Deployment {
    /// PostgreSQL and Kafka: processor relays, workers consume.
    Distributed,
    /// PostgreSQL alone: workers lease outbox rows.
    PostgresOnly,
    /// One SQLite file: workers lease outbox rows.
    Embedded,
}

/// A stack of `deployment` whose email goes to `smtp`.
pub async fn stack_with_smtp(smtp: &zapflow_testkit::SmtpSink, deployment: Deployment) -> Stack {
    let options = zapflow_testkit::StackOptions {
        smtp_url: Some(smtp.url()),
        ..Default::default()
    };
    stack_of(deployment, options).await
}

/// A stack of `deployment` whose email goes to `smtp` and whose HTTP
/// action may reach loopback targets in the test.
pub async fn stack_with_loopback_http(
    smtp: &zapflow_testkit::SmtpSink,
    deployment: Deployment,
) -> Stack {
    let options = zapflow_testkit::StackOptions {
        smtp_url: Some(smtp.url()),
        http_allow_cidrs: vec!["127.0.0.0/8".parse().unwrap()],
        ..Default::default()
    };
    stack_of(deployment, options).await
}

/// A stack of `deployment` with `options`.
pub async fn stack_of(deployment: Deployment, options: zapflow_testkit::StackOptions) -> Stack {
    let (store, bus) = match deployment {
        Deployment::Distributed => (
            zapflow_testkit::test_store().await,
            Some(zapflow_testkit::test_bus(3).await),
        ),
        Deployment::PostgresOnly => (zapflow_testkit::test_store().await, None),
        Deployment::Embedded => (zapflow_testkit::test_sqlite_store().await.store, None),
    };
    Stack::start(store, bus, options).await
}

/// An http action calling `url` with `method`.
pub fn http_action(method: &str, url: &str) -> pb::Action {
    pb::Action {
        r#type: "http".into(),
        config: Some(to_struct(json!({ "method": method, "url": url }))),
        retry: None,
    }
}

/// A run as the store keeps it (outputs and history as recorded).
pub async fn stored_run(stack: &Stack, run_id: &str) -> zapflow_store::Run {
    stack
        .store
        .run(run_id.parse().unwrap())
        .await
        .unwrap()
        .expect("the run exists")
}

/// The run id of a webhook's 202 answer.
pub async fn deliver(url: &str, payload: &Value) -> String {
    let (status, answer) = post_json(url, payload).await;
    assert_eq!(status, 202, "{answer}");
    answer["run_id"].as_str().unwrap().to_owned()
}
