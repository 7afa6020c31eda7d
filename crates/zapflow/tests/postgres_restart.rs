//! PostgreSQL restarts under a running zapflow. A test binary of its own:
//! cargo runs test binaries one after another, so no other test shares the
//! outage; within it, the tests take turns (`OUTAGE`).

#[allow(dead_code)]
#[path = "it/support.rs"]
mod support;

use std::time::Duration;

use serde_json::json;
use zapflow_proto::v1 as pb;
use zapflow_testkit::{SmtpSink, eventually};

use crate::support::{
    Deployment, create_zap, email_action, new_user, stack_with_smtp, wait_for_run,
};

/// Held by each test for its whole length: one test's restart must not
/// land in another's setup.
static OUTAGE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Restarts the local PostgreSQL cluster (the one the tests use).
async fn restart_postgres() {
    let command = std::env::var("ZAPFLOW_TEST_PG_RESTART").unwrap_or_else(|_| {
        let version = std::fs::read_dir("/etc/postgresql")
            .ok()
            .and_then(|dir| dir.filter_map(Result::ok).map(|entry| entry.file_name()).max())
            .expect("no /etc/postgresql: set ZAPFLOW_TEST_PG_RESTART to a command that restarts PostgreSQL");
        format!("pg_ctlcluster --skip-systemctl-redirect {} main restart", version.to_string_lossy())
    });
    let status = tokio::process::Command::new("sh")
        .args(["-c", &command])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "`{command}` failed: {status:?}");
}

/// POSTs like a webhook sender that retries on 5xx; the run id.
async fn deliver_with_retries(url: &str, body: &serde_json::Value) -> String {
    let client = reqwest::Client::new();
    eventually(
        "the delivery to be accepted",
        Duration::from_secs(60),
        || {
            let request = client
                .post(url)
                .header("content-type", "application/json")
                .header("idempotency-key", body["n"].to_string())
                .body(body.to_string())
                .send();
            async move {
                let response = request.await.ok()?;
                if response.status() != 202 {
                    return None;
                }
                let answer: serde_json::Value = response.json().await.ok()?;
                Some(answer["run_id"].as_str()?.to_owned())
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_delays_runs_and_loses_none() {
    let _turn = OUTAGE.lock().await;
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, Deployment::Distributed).await;
    let key = new_user(&stack, "ada").await;
    let (_, url) = create_zap(
        &stack,
        &key,
        vec![email_action("r@example.com", "{{ trigger.n }}", "b")],
    )
    .await;
    for n in 0..3 {
        deliver_with_retries(&url, &json!({"n": n})).await;
    }
    smtp.wait_for(3, support::WAIT).await;

    restart_postgres().await;
    let mut run_ids = Vec::new();
    for n in 3..8 {
        run_ids.push(deliver_with_retries(&url, &json!({"n": n})).await);
    }
    for run_id in &run_ids {
        wait_for_run(&stack, &key, run_id, pb::RunStatus::Succeeded).await;
    }
    assert_eq!(
        smtp.sorted_subjects(),
        ["0", "1", "2", "3", "4", "5", "6", "7"],
        "each email once"
    );
    stack.stop().await;
}

/// PostgreSQL restarts while the SMTP server holds a step's DATA reply:
/// the email is accepted during the outage, the worker keeps that outcome
/// and records it once the database is back, and sends nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_during_an_email_sends_it_once() {
    let _turn = OUTAGE.lock().await;
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, Deployment::PostgresOnly).await;
    let key = new_user(&stack, "ada").await;
    let (_, url) = create_zap(
        &stack,
        &key,
        vec![email_action("r@example.com", "held {{ trigger.n }}", "b")],
    )
    .await;
    smtp.stall(Duration::from_secs(6));
    let run_id = deliver_with_retries(&url, &json!({"n": 1})).await;
    eventually("the DATA to start", support::WAIT, || async {
        (smtp.data_started() == 1).then_some(())
    })
    .await;

    restart_postgres().await;
    smtp.stall(Duration::ZERO);
    wait_for_run(&stack, &key, &run_id, pb::RunStatus::Succeeded).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(smtp.sorted_subjects(), ["held 1"], "one email");
    assert_eq!(smtp.data_started(), 1, "no second attempt at sending");
    stack.stop().await;
}
