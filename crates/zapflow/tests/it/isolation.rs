//! One sender never hurts another: what one delivery carries decides its
//! own answer only, on every store, and no way in skips the rules.

use std::time::Duration;

use serde_json::{Value, json};
use tonic::Code;
use zapflow_proto::v1 as pb;
use zapflow_proto::v1::ingest_service_client::IngestServiceClient;
use zapflow_store::{NewRun, StoreError};
use zapflow_testkit::{SmtpSink, Stack, StackOptions, test_store, with_key};

use crate::support::{
    Deployment, new_user, post_json, post_json_text, simple_zap, stack_with_smtp, wait_for_run,
};

on_outbox_deployments!(
    nul_anywhere_is_a_400_naming_where,
    refused_payloads_never_fail_another_tenant,
    deep_payloads_are_refused_past_the_limit_and_readable_below,
    run_lists_stay_under_four_mib_whatever_the_payloads,
);

const NUL_ANSWER: &str = "contains U+0000 (NUL), which zapflow does not accept";

async fn run_count(stack: &Stack, key: &str) -> usize {
    stack
        .zap_client()
        .await
        .list_runs(with_key(
            key,
            pb::ListRunsRequest {
                page_size: 500,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .runs
        .len()
}

async fn nul_anywhere_is_a_400_naming_where(deployment: Deployment) {
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, deployment).await;
    let key = new_user(&stack, "alice").await;
    let (_, url) = simple_zap(&stack, &key).await;

    let cases = [
        (url.clone(), r#"{"x": "\u0000"}"#, "body.x"),
        (url.clone(), r#"{"k\u0000": 1}"#, "body.k\u{0}"),
        (
            url.clone(),
            r#"[{"a": ["ok", "a\u0000b"]}]"#,
            "body[0].a[1]",
        ),
        (
            format!("{url}?q=%00"),
            r#"{"x": "ok"}"#,
            "query parameter \"q\"",
        ),
        (
            format!("{url}?%00=1"),
            r#"{"x": "ok"}"#,
            "query parameter \"\\0\"",
        ),
    ];
    for (target, body, place) in &cases {
        let (status, answer) = post_json_text(target, body).await;
        assert_eq!(status, 400, "{target} {body}: {answer}");
        assert_eq!(
            answer["error"],
            format!("{place} {NUL_ANSWER}"),
            "{target} {body}"
        );
    }
    assert_eq!(run_count(&stack, &key).await, 0, "no run for any of them");
    stack.stop().await;
}

/// Valid deliveries to one user's zap while another sender floods a second
/// zap with payloads the database could not store: every valid one is
/// accepted and its run succeeds.
async fn refused_payloads_never_fail_another_tenant(deployment: Deployment) {
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, deployment).await;
    let hostile_key = new_user(&stack, "mallory").await;
    let (_, hostile_url) = simple_zap(&stack, &hostile_key).await;
    let key = new_user(&stack, "bob").await;
    let (_, url) = simple_zap(&stack, &key).await;

    let mut hostile = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let hostile_url = hostile_url.clone();
        hostile.spawn(async move {
            for body in [r#"{"x": "\u0000"}"#, r#"{"k\u0000": 1}"#] {
                assert_eq!(post_json_text(&hostile_url, body).await.0, 400);
            }
        });
    }
    let mut valid = tokio::task::JoinSet::new();
    for n in 0..100 {
        let url = url.clone();
        valid.spawn(async move { post_json(&url, &json!({ "n": n })).await });
    }
    let mut run_ids = Vec::new();
    while let Some(answer) = valid.join_next().await {
        let (status, answer) = answer.unwrap();
        assert_eq!(status, 202, "{answer}");
        run_ids.push(answer["run_id"].as_str().unwrap().to_owned());
    }
    while let Some(done) = hostile.join_next().await {
        done.unwrap();
    }
    for run_id in &run_ids {
        wait_for_run(&stack, &key, run_id, pb::RunStatus::Succeeded).await;
    }
    assert_eq!(smtp.wait_for(100, Duration::from_secs(60)).await.len(), 100);
    assert_eq!(run_count(&stack, &hostile_key).await, 0);
    stack.stop().await;
}

/// Below the checks at the door: a row the database itself refuses in a
/// group commit fails alone, and the rest of its batch is recorded.
#[tokio::test]
async fn a_row_the_database_refuses_fails_alone_in_its_batch() {
    let store = test_store().await;
    let (owner, _) = store.create_user("ada").await.unwrap();
    let zap = store
        .create_zap(
            owner,
            "zap",
            &[zapflow_core::ActionSpec {
                action_type: "email".into(),
                config: json!({"to": "a@example.com", "subject": "s", "body": "b"})
                    .as_object()
                    .unwrap()
                    .clone(),
                retry: None,
            }],
            b"token-hash",
            None,
        )
        .await
        .unwrap();
    let run = |trigger: Value| NewRun {
        id: uuid::Uuid::now_v7(),
        zap_id: zap.id,
        owner_id: owner,
        trigger,
        headers: json!({}),
        query: json!({}),
        actions: zap.actions.clone(),
        idempotency_key: None,
        trace_parent: None,
        scheduled_time: None,
    };
    let batch = [
        run(json!({"n": 1})),
        run(json!({"x": "\u{0}"})),
        run(json!({"n": 3})),
    ];
    let results = store.insert_runs_isolated(&batch).await.unwrap();
    assert!(matches!(results[0], Ok(run) if !run.repeated && run.id == batch[0].id));
    assert!(
        matches!(results[1], Err(StoreError::Refused(_))),
        "{:?}",
        results[1]
    );
    assert!(matches!(results[2], Ok(run) if !run.repeated && run.id == batch[2].id));
    assert!(store.run(batch[0].id).await.unwrap().is_some());
    assert!(store.run(batch[1].id).await.unwrap().is_none());
    assert!(store.run(batch[2].id).await.unwrap().is_some());
    assert_eq!(store.outbox_len().await.unwrap(), 2);
}

fn nested_objects(depth: usize) -> String {
    "{\"a\":".repeat(depth) + "\"leaf\"" + &"}".repeat(depth)
}

/// The deepest payload accepted can be read back by a generated client with
/// default settings (prost, like the protobuf runtimes of Python, Java and
/// C++, stops at 100 nested messages), through GetRun and ListRuns alike.
async fn deep_payloads_are_refused_past_the_limit_and_readable_below(deployment: Deployment) {
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, deployment).await;
    let key = new_user(&stack, "alice").await;
    let (_, url) = simple_zap(&stack, &key).await;

    let (status, answer) = post_json_text(&url, &nested_objects(33)).await;
    assert_eq!(
        (status, answer),
        (
            400,
            json!({"error": "the body nests deeper than 32 levels"})
        )
    );
    let (status, answer) = post_json_text(&url, &("[".repeat(33) + &"]".repeat(33))).await;
    assert_eq!(status, 400, "{answer}");

    // `n` for the zap's email subject, beside 31 more levels.
    let deepest = format!("{{\"n\": \"x\", \"a\": {}}}", nested_objects(31));
    let (status, answer) = post_json_text(&url, &deepest).await;
    assert_eq!(status, 202, "{answer}");
    let run_id = answer["run_id"].as_str().unwrap().to_owned();
    let run = wait_for_run(&stack, &key, &run_id, pb::RunStatus::Succeeded).await;
    let trigger = zapflow_proto::json::value_to_json(run.trigger.as_ref().unwrap());
    assert_eq!(trigger, serde_json::from_str::<Value>(&deepest).unwrap());
    let listed = stack
        .zap_client()
        .await
        .list_runs(with_key(
            &key,
            pb::ListRunsRequest {
                view: pb::RunView::Full as i32,
                ..Default::default()
            },
        ))
        .await
        .expect("a page with the deepest payload decodes")
        .into_inner();
    assert_eq!(listed.runs[0].trigger, run.trigger);
    stack.stop().await;
}

/// A page of runs stays under the 4 MiB that clients take by default,
/// whatever the payloads, and paging still reaches every run.
async fn run_lists_stay_under_four_mib_whatever_the_payloads(deployment: Deployment) {
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, deployment).await;
    let key = new_user(&stack, "alice").await;
    let (zap, url) = simple_zap(&stack, &key).await;
    let big = json!({ "blob": "x".repeat(900 * 1024) });
    for _ in 0..12 {
        assert_eq!(post_json(&url, &big).await.0, 202);
    }
    let mut client = stack.zap_client().await;

    let basic = client
        .list_runs(with_key(
            &key,
            pb::ListRunsRequest {
                zap_id: zap.id.clone(),
                page_size: 50,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(basic.runs.len(), 12);
    assert!(basic.runs.iter().all(|run| run.trigger.is_none()));
    assert!(basic.next_page_token.is_empty());

    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_runs(with_key(
                &key,
                pb::ListRunsRequest {
                    zap_id: zap.id.clone(),
                    page_size: 50,
                    page_token: page_token.clone(),
                    view: pb::RunView::Full as i32,
                    ..Default::default()
                },
            ))
            .await
            .expect("every page fits the default receive limit")
            .into_inner();
        pages += 1;
        assert!(page.runs.iter().all(|run| run.trigger.is_some()));
        seen.extend(page.runs.into_iter().map(|run| run.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert!(pages >= 3, "{pages} pages");
    let mut expected: Vec<String> = basic.runs.into_iter().map(|run| run.id).collect();
    expected.sort();
    seen.sort();
    assert_eq!(seen, expected, "paging visits every run once");
    stack.stop().await;
}

async fn stack_with_ingest_token(token: &str) -> Stack {
    let options = StackOptions {
        ingest_token: Some(token.into()),
        ..StackOptions::default()
    };
    Stack::start(test_store().await, None, options).await
}

/// IngestService is not on the public port, asks for the gateway's token on
/// its own listener, and holds direct callers to the gateway's limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_service_is_internal_and_holds_every_caller_to_the_limits() {
    let stack = stack_with_ingest_token("gateway-secret").await;
    let key = new_user(&stack, "alice").await;
    let (zap, url) = simple_zap(&stack, &key).await;
    let token = url.rsplit('/').next().unwrap().to_owned();
    let request = |body: &str, idempotency_key: &str| pb::IngestRequest {
        zap_id: zap.id.clone(),
        token: token.clone(),
        body: body.as_bytes().to_vec(),
        idempotency_key: idempotency_key.to_owned(),
        ..Default::default()
    };

    let mut public = IngestServiceClient::connect(stack.grpc_url())
        .await
        .unwrap();
    let status = public.ingest(request("{}", "")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    let mut internal = IngestServiceClient::connect(format!("http://{}", stack.ingest_address))
        .await
        .unwrap();
    let status = internal.ingest(request("{}", "")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = internal
        .ingest(with_key("wrong", request("{}", "")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let call = |body: String, idempotency_key: String| {
        let message = request(&body, &idempotency_key);
        let mut internal = internal.clone();
        async move { internal.ingest(with_key("gateway-secret", message)).await }
    };
    let accepted = call("{\"n\": 1}".into(), String::new()).await.unwrap();
    assert!(!accepted.get_ref().duplicate);
    let too_large = format!("{{\"x\": \"{}\"}}", "x".repeat(1024 * 1024));
    let status = call(too_large, String::new()).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let status = call("{}".into(), "k".repeat(3000)).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::InvalidArgument,
            "the idempotency key is longer than 255 bytes"
        )
    );
    let status = call(nested_objects(33), String::new()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(run_count(&stack, &key).await, 1);

    // The gateway in the stack needs none of this: it calls in process.
    assert_eq!(post_json(&url, &json!({"n": 2})).await.0, 202);
    stack.stop().await;
}

/// A gateway of its own process reaches the API on the ingest listener with
/// the token, and is ready only while the API answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_separate_gateway_ingests_with_the_token_and_reports_readiness() {
    let stack = stack_with_ingest_token("gateway-secret").await;
    let key = new_user(&stack, "alice").await;
    let (_, url) = simple_zap(&stack, &key).await;
    let path = url.split_once("/hooks/").unwrap().1.to_owned();
    let settings = zapflow_gateway::GatewaySettings {
        body_limit: 1024 * 1024,
        request_timeout: Duration::from_secs(10),
        per_zap_limit: None,
        per_ip_limit: None,
    };
    let serve = |target: zapflow_gateway::IngestTarget| {
        let router = zapflow_gateway::router(target, &settings);
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let shutdown = tokio_util::sync::CancellationToken::new();
            tokio::spawn(zapflow_gateway::serve(listener, router, shutdown.clone()));
            (format!("http://{address}"), shutdown.drop_guard())
        }
    };
    let ingest_url = format!("http://{}", stack.ingest_address);

    let (with_token, _guard) = serve(
        zapflow_gateway::IngestTarget::connect(&ingest_url, 4 << 20, Some("gateway-secret"))
            .unwrap(),
    )
    .await;
    let ready = reqwest::get(format!("{with_token}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let (status, answer) = post_json(&format!("{with_token}/hooks/{path}"), &json!({})).await;
    assert_eq!(status, 202, "{answer}");

    let (without_token, _guard) =
        serve(zapflow_gateway::IngestTarget::connect(&ingest_url, 4 << 20, None).unwrap()).await;
    let (status, _) = post_json(&format!("{without_token}/hooks/{path}"), &json!({})).await;
    assert_eq!(status, 401, "refused by the API");

    let (nowhere, _guard) =
        serve(zapflow_gateway::IngestTarget::connect("http://127.0.0.1:1", 4 << 20, None).unwrap())
            .await;
    let ready = reqwest::get(format!("{nowhere}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let (status, _) = post_json(&format!("{nowhere}/hooks/{path}"), &json!({})).await;
    assert_eq!(status, 503);

    let ready = reqwest::get(format!("{}/readyz", stack.http_url()))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "in process");
    stack.stop().await;
}

/// Other spellings of a zap id are unknown URLs: they neither reach the zap
/// nor get a rate-limit budget of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_canonical_zap_id_reaches_a_zap_and_its_budget() {
    let options = StackOptions {
        per_zap_limit: Some(zapflow_gateway::RateLimit {
            per_second: 1.0,
            burst: 5,
        }),
        ..StackOptions::default()
    };
    let stack = Stack::start(test_store().await, None, options).await;
    let key = new_user(&stack, "alice").await;
    let (zap, url) = simple_zap(&stack, &key).await;
    let id: uuid::Uuid = zap.id.parse().unwrap();
    for spelling in [
        id.to_string().to_uppercase(),
        id.simple().to_string(),
        id.urn().to_string(),
        id.braced().to_string(),
    ] {
        let other = url.replace(&zap.id, &spelling);
        for _ in 0..10 {
            let (status, answer) = post_json(&other, &json!({})).await;
            assert_eq!(
                (status, answer),
                (404, json!({"error": "not found"})),
                "{other}"
            );
        }
    }
    let statuses: Vec<u16> = sequential_statuses(&url, 10).await;
    let accepted = statuses.iter().filter(|status| **status == 202).count();
    assert!(
        (5..=7).contains(&accepted),
        "one budget for the zap: {statuses:?}"
    );
    assert!(statuses.contains(&429));
    stack.stop().await;
}

async fn sequential_statuses(url: &str, count: usize) -> Vec<u16> {
    let mut statuses = Vec::with_capacity(count);
    for n in 0..count {
        statuses.push(post_json(url, &json!({ "n": n })).await.0);
    }
    statuses
}

/// Deadlocks, serialization failures and a database shutting down are worth
/// a retry: 503 with Retry-After, never 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_database_errors_are_503_with_retry_after_on_postgres() {
    let stack = Stack::start(test_store().await, None, StackOptions::default()).await;
    let key = new_user(&stack, "alice").await;
    let (_, url) = simple_zap(&stack, &key).await;
    let pool = stack.store.postgres().unwrap().clone();
    for sqlstate in ["40P01", "40001", "57P01", "55P03"] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE OR REPLACE FUNCTION fail_insert() RETURNS trigger AS $$
             BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{sqlstate}'; END $$ LANGUAGE plpgsql;
             DROP TRIGGER IF EXISTS fail_insert ON zap_runs;
             CREATE TRIGGER fail_insert BEFORE INSERT ON zap_runs
                 FOR EACH ROW EXECUTE FUNCTION fail_insert();"
        )))
        .execute(&pool)
        .await
        .unwrap();
        assert_retry_later(&url, sqlstate).await;
    }
    sqlx::raw_sql("DROP TRIGGER fail_insert ON zap_runs")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(post_json(&url, &json!({})).await.0, 202);
    stack.stop().await;
}

/// On SQLite, another writer holding the file past the busy timeout is an
/// outage too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_sqlite_file_is_503_with_retry_after() {
    use sqlx::Connection;

    let zapflow_testkit::SqliteTestStore { store, path } =
        zapflow_testkit::test_sqlite_store().await;
    let stack = Stack::start(store, None, StackOptions::default()).await;
    let key = new_user(&stack, "alice").await;
    let (_, url) = simple_zap(&stack, &key).await;
    let mut other = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    assert_retry_later(&url, "SQLITE_BUSY").await;
    sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
    assert_eq!(post_json(&url, &json!({})).await.0, 202);
    stack.stop().await;
}

/// POSTs a delivery and expects 503 with `Retry-After: 1`.
async fn assert_retry_later(url: &str, case: &str) {
    let response = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503, "{case}");
    assert_eq!(response.headers()["retry-after"], "1", "{case}");
}
