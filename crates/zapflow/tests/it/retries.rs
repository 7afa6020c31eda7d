//! Transient failures are retried through delayed outbox rows; exhausted or
//! permanent ones dead-letter the run. Every attempt is on the record.

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use serde_json::json;
use tonic::Code;
use zapflow_proto::v1 as pb;
use zapflow_testkit::{SmtpSink, unique, with_key};

use crate::support::{
    Deployment, WAIT, create_zap, email_action, new_user, post_json, stack_with_smtp, wait_for_run,
};

/// An email action retried quickly: `attempts` in all, 200 ms apart.
fn quick_retry_email(attempts: u32) -> pb::Action {
    pb::Action {
        retry: Some(pb::RetryPolicy {
            max_attempts: attempts,
            initial_delay: Some(prost_types::Duration {
                seconds: 0,
                nanos: 200_000_000,
            }),
            multiplier: 1.0,
            max_delay: None,
        }),
        ..email_action("{{ trigger.to }}", "retried", "body")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_smtp_outage_is_retried_until_the_server_is_back() {
    let smtp = SmtpSink::start().await;
    smtp.reject_recipients(Some("451 4.3.0 mailbox busy"));
    let stack = stack_with_smtp(&smtp, Deployment::Distributed).await;
    let key = new_user(&stack, "ada").await;
    let (_, url) = create_zap(&stack, &key, vec![quick_retry_email(20)]).await;
    let (status, answer) = post_json(&url, &json!({"to": "bob@example.com"})).await;
    assert_eq!(status, 202);
    let run_id = answer["run_id"].as_str().unwrap().to_owned();

    // Let a few attempts fail, then bring the server back.
    zapflow_testkit::eventually("two failed attempts", WAIT, || async {
        let run = stack
            .store
            .run(run_id.parse().unwrap())
            .await
            .unwrap()
            .unwrap();
        (run.steps[0].history.len() >= 2).then_some(())
    })
    .await;
    smtp.reject_recipients(None);
    let run = wait_for_run(&stack, &key, &run_id, pb::RunStatus::Succeeded).await;
    let step = &run.steps[0];
    assert_eq!(smtp.mails().len(), 1);
    assert!(step.attempts >= 3, "{step:?}");
    assert_eq!(
        step.history.len() as u32,
        step.attempts,
        "every attempt is recorded"
    );
    let (last, failed) = step.history.split_last().unwrap();
    assert_eq!(last.outcome, pb::StepStatus::Succeeded as i32);
    for attempt in failed {
        assert_eq!(attempt.outcome, pb::StepStatus::Retrying as i32);
        assert!(attempt.error.contains("451"), "{attempt:?}");
    }
    let numbers: Vec<u32> = step.history.iter().map(|attempt| attempt.number).collect();
    assert_eq!(numbers, (1..=step.attempts).collect::<Vec<_>>());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exhausted_retries_fail_the_run_and_publish_a_dead_letter() {
    let smtp = SmtpSink::start().await;
    smtp.reject_recipients(Some("451 4.3.0 mailbox busy"));
    let stack = stack_with_smtp(&smtp, Deployment::Distributed).await;
    let key = new_user(&stack, "ada").await;
    let (_, url) = create_zap(&stack, &key, vec![quick_retry_email(2)]).await;
    let run_id = post_json(&url, &json!({"to": "bob@example.com"})).await.1["run_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let run = wait_for_run(&stack, &key, &run_id, pb::RunStatus::Failed).await;
    let step = &run.steps[0];
    assert_eq!(
        (step.status, step.attempts),
        (pb::StepStatus::Failed as i32, 2)
    );
    assert!(
        step.error.contains("gave up after 2 attempts"),
        "{}",
        step.error
    );
    assert_eq!(step.history.len(), 2);
    assert!(smtp.mails().is_empty());

    let bus = stack.bus.as_ref().unwrap();
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bus.brokers)
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&bus.dead_letter_topic]).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .expect("a dead letter within a minute")
        .unwrap();
    let event = zapflow_bus::decode(message.payload().unwrap()).unwrap();
    assert_eq!(event.run_id.to_string(), run_id);
    let zapflow_bus::EventKind::DeadLetter { reason } = event.kind else {
        panic!("a step event on the dead-letter topic: {event:?}");
    };
    assert!(reason.contains("gave up"), "{reason}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_retry_policy_names_its_field() {
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, Deployment::Embedded).await;
    let key = new_user(&stack, "ada").await;
    let mut client = stack.zap_client().await;
    for (attempts, multiplier, field) in [(99, 2.0, "max_attempts"), (3, 50.0, "multiplier")] {
        let mut action = quick_retry_email(attempts);
        action.retry.as_mut().unwrap().multiplier = multiplier;
        let status = client
            .create_zap(with_key(
                &key,
                pb::CreateZapRequest {
                    name: "z".into(),
                    actions: vec![action],
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status
                .message()
                .starts_with(&format!("actions[0].retry.{field}: ")),
            "{}",
            status.message()
        );
    }
    stack.stop().await;
}
