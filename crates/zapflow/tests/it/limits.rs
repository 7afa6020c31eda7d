//! Bounds a payload cannot push an action past.

use serde_json::json;
use zapflow_proto::v1 as pb;
use zapflow_testkit::SmtpSink;

use crate::support::{
    Deployment, create_zap, deliver, email_action, new_user, stack_with_smtp, wait_for_run,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_email_to_more_recipients_than_the_limit_fails_without_sending() {
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, Deployment::Embedded).await;
    let key = new_user(&stack, "ada").await;
    let action = pb::Action {
        config: Some(crate::support::to_struct(json!({
            "to": "{{ trigger.to }}",
            "cc": "{{ trigger.cc }}",
            "subject": "hello",
            "body": "b",
        }))),
        ..email_action("", "", "")
    };
    let (_, url) = create_zap(&stack, &key, vec![action]).await;
    let addresses = |range: std::ops::Range<u32>| {
        range
            .map(|n| format!("user{n}@example.com"))
            .collect::<Vec<_>>()
            .join(", ")
    };

    let run_id = deliver(
        &url,
        &json!({"to": addresses(0..40), "cc": addresses(40..51)}),
    )
    .await;
    let run = wait_for_run(&stack, &key, &run_id, pb::RunStatus::Failed).await;
    let step = &run.steps[0];
    assert_eq!(step.attempts, 1, "a permanent failure: no retry");
    assert_eq!(
        step.error, "to, cc: 51 recipients; at most 50 per email",
        "the error names the limit"
    );
    assert!(smtp.mails().is_empty());

    // Fifty go out.
    let run_id = deliver(
        &url,
        &json!({"to": addresses(0..40), "cc": addresses(40..50)}),
    )
    .await;
    wait_for_run(&stack, &key, &run_id, pb::RunStatus::Succeeded).await;
    assert_eq!(smtp.mails().len(), 1);
    assert_eq!(smtp.mails()[0].recipients.len(), 50);
    stack.stop().await;
}
