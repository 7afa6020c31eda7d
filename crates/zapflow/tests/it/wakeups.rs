//! Due work is picked up when it is due, not at the next poll: the poll is
//! set to 30 s here, so any step that waited for it would show.

use std::time::{Duration, Instant};

use serde_json::json;
use zapflow_proto::v1 as pb;
use zapflow_testkit::{SmtpSink, Stack, StackOptions};

use crate::support::{
    Deployment, create_zap, email_action, new_user, post_json, simple_zap, wait_for_run,
};

const POLL: Duration = Duration::from_secs(30);

async fn stack_polling_rarely(smtp: &SmtpSink, deployment: Deployment) -> Stack {
    let store = match deployment {
        Deployment::Embedded => zapflow_testkit::test_sqlite_store().await.store,
        Deployment::PostgresOnly => zapflow_testkit::test_store().await,
        Deployment::Distributed => unreachable!("relayed through Kafka"),
    };
    let options = StackOptions {
        smtp_url: Some(smtp.url()),
        poll_interval: POLL,
        ..StackOptions::default()
    };
    Stack::start(store, None, options).await
}

/// One webhook at a time, each email well before any poll: no wake-up is
/// lost while the worker is busy with the one before.
async fn sequential_webhooks_never_wait_for_the_poll(deployment: Deployment) {
    let smtp = SmtpSink::start().await;
    let stack = stack_polling_rarely(&smtp, deployment).await;
    let key = new_user(&stack, "ada").await;
    let (_, url) = simple_zap(&stack, &key).await;
    let mut slowest = Duration::ZERO;
    for n in 0..100 {
        let sent = Instant::now();
        assert_eq!(post_json(&url, &json!({ "n": n })).await.0, 202);
        smtp.wait_for(n + 1, Duration::from_secs(10)).await;
        slowest = slowest.max(sent.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(2),
        "a webhook waited {slowest:?} for its email"
    );
    stack.stop().await;
}

/// A retry due in 100 ms runs about then.
async fn a_retry_runs_when_it_is_due(deployment: Deployment) {
    let smtp = SmtpSink::start().await;
    smtp.reject_recipients(Some("451 4.3.0 mailbox busy"));
    let stack = stack_polling_rarely(&smtp, deployment).await;
    let key = new_user(&stack, "ada").await;
    let action = pb::Action {
        retry: Some(pb::RetryPolicy {
            max_attempts: 4,
            initial_delay: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
            multiplier: 1.0,
            max_delay: None,
        }),
        ..email_action("bob@example.com", "retried", "b")
    };
    let (_, url) = create_zap(&stack, &key, vec![action]).await;
    let sent = Instant::now();
    let (status, answer) = post_json(&url, &json!({})).await;
    assert_eq!(status, 202);
    let run_id = answer["run_id"].as_str().unwrap();
    let run = wait_for_run(&stack, &key, run_id, pb::RunStatus::Failed).await;
    let elapsed = sent.elapsed();
    assert_eq!(run.steps[0].attempts, 4);
    // Three delays of 50-100 ms, plus the attempts themselves.
    assert!(
        elapsed < Duration::from_secs(3),
        "four attempts took {elapsed:?}"
    );
    stack.stop().await;
}

on_outbox_deployments!(
    sequential_webhooks_never_wait_for_the_poll,
    a_retry_runs_when_it_is_due,
);
