//! Steps that failed for good are listed, kept apart from live work, and
//! trimmed after their retention.

use std::time::Duration;

use serde_json::json;
use tonic::Code;
use zapflow_proto::v1 as pb;
use zapflow_testkit::{SmtpSink, with_key};

use crate::support::{
    Deployment, create_zap, email_action, new_user, post_json, stack_with_smtp, wait_for_run,
};

const REJECT: &str = "550 5.1.1 no such user";

async fn dead_letters(
    stack: &zapflow_testkit::Stack,
    key: &str,
    zap_id: &str,
) -> Result<Vec<pb::DeadLetter>, tonic::Status> {
    Ok(stack
        .zap_client()
        .await
        .list_dead_letters(with_key(
            key,
            pb::ListDeadLettersRequest {
                zap_id: zap_id.to_owned(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .dead_letters)
}

async fn a_failed_run_is_listed_as_a_dead_letter_until_trimmed(deployment: Deployment) {
    let smtp = SmtpSink::start().await;
    smtp.reject_address("gone@example.com", Some(REJECT));
    let stack = stack_with_smtp(&smtp, deployment).await;
    let key = new_user(&stack, "ada").await;
    let (zap, url) = create_zap(
        &stack,
        &key,
        vec![
            email_action("first@example.com", "first", "b"),
            email_action("{{ trigger.to }}", "second", "b"),
        ],
    )
    .await;
    let (status, answer) = post_json(&url, &json!({"to": "gone@example.com"})).await;
    assert_eq!(status, 202);
    let run_id = answer["run_id"].as_str().unwrap().to_owned();
    wait_for_run(&stack, &key, &run_id, pb::RunStatus::Failed).await;

    let listed = dead_letters(&stack, &key, &zap.id).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let dead = &listed[0];
    assert_eq!(
        (dead.run_id.as_str(), dead.zap_id.as_str(), dead.step),
        (run_id.as_str(), zap.id.as_str(), 1)
    );
    assert!(dead.reason.contains("550"), "{}", dead.reason);
    assert!(dead.create_time.is_some());
    assert_eq!(dead_letters(&stack, &key, "").await.unwrap(), listed);

    // Not another user's to see.
    let other = new_user(&stack, "eve").await;
    assert!(dead_letters(&stack, &other, "").await.unwrap().is_empty());
    assert_eq!(
        dead_letters(&stack, &other, &zap.id)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Without a broker, the announcement ends with the record: nothing is
    // left in the outbox for the workers to lease again and again.
    if !matches!(deployment, Deployment::Distributed) {
        zapflow_testkit::eventually("the outbox to empty", Duration::from_secs(10), || async {
            (stack.store.outbox_len().await.unwrap() == 0).then_some(())
        })
        .await;
    }

    // Kept for the retention, then trimmed.
    zapflow_worker::trim_once(&stack.store, Duration::from_secs(3600)).await;
    assert_eq!(dead_letters(&stack, &key, "").await.unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(10)).await;
    zapflow_worker::trim_once(&stack.store, Duration::ZERO).await;
    assert!(dead_letters(&stack, &key, "").await.unwrap().is_empty());
    stack.stop().await;
}

on_outbox_deployments!(a_failed_run_is_listed_as_a_dead_letter_until_trimmed);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_a_failed_run_is_listed_as_a_dead_letter_until_trimmed() {
    a_failed_run_is_listed_as_a_dead_letter_until_trimmed(Deployment::Distributed).await;
}
