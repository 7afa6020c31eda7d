//! The scenario zapflow exists for: webhook in, emails out, run recorded.

use serde_json::json;
use zapflow_proto::v1 as pb;
use zapflow_testkit::{SmtpSink, with_key};

use crate::support::{
    Deployment, WAIT, create_zap, email_action, new_user, post_json, stack_with_smtp, wait_for_run,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_a_webhook_sends_both_emails_in_order_and_records_each_step() {
    webhook_to_two_emails(Deployment::Distributed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_only_a_webhook_sends_both_emails_in_order_and_records_each_step() {
    webhook_to_two_emails(Deployment::PostgresOnly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_a_webhook_sends_both_emails_in_order_and_records_each_step() {
    webhook_to_two_emails(Deployment::Embedded).await;
}

/// The scenario zapflow exists for, on one deployment: a zap with two
/// emails over gRPC, a webhook, both emails in order with the payload's
/// fields, and the run's record.
async fn webhook_to_two_emails(deployment: Deployment) {
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, deployment).await;
    let key = new_user(&stack, "ada").await;

    let (zap, webhook_url) = create_zap(
        &stack,
        &key,
        vec![
            email_action(
                "{{ trigger.comment.email }}",
                "New comment from {{ trigger.comment.author }}",
                "{{ trigger.comment.author }} wrote: {{ trigger.comment.text }} (via {{ query.source }})",
            ),
            email_action(
                "audit@example.com",
                "Comment relayed",
                "Sent {{ steps[0].message_id }} to {{ steps[0].to[0] }}",
            ),
        ],
    )
    .await;
    assert!(webhook_url.starts_with(&format!("{}/hooks/catch/{}/", stack.http_url(), zap.id)));

    let payload =
        json!({"comment": {"email": "grace@example.com", "author": "Grace", "text": "Nice work"}});
    let (status, answer) = post_json(&format!("{webhook_url}?source=blog"), &payload).await;
    assert_eq!(status, 202, "{answer}");
    let run_id = answer["run_id"].as_str().unwrap().to_owned();

    let mails = smtp.wait_for(2, WAIT).await;
    assert_eq!(mails.len(), 2, "{mails:#?}");
    assert_eq!(mails[0].recipients, ["grace@example.com"]);
    assert_eq!(
        mails[0].header("Subject").unwrap(),
        "New comment from Grace"
    );
    assert_eq!(
        mails[0].body().trim_end(),
        "Grace wrote: Nice work (via blog)"
    );
    let message_id = mails[0].header("Message-ID").unwrap();
    assert_eq!(message_id, format!("<{run_id}.0@zapflow>"));
    assert_eq!(mails[1].recipients, ["audit@example.com"]);
    assert_eq!(mails[1].header("Subject").unwrap(), "Comment relayed");
    assert_eq!(
        mails[1].body().trim_end(),
        format!("Sent {message_id} to grace@example.com")
    );

    let run = wait_for_run(&stack, &key, &run_id, pb::RunStatus::Succeeded).await;
    assert_eq!(run.zap_id, zap.id);
    assert!(run.finish_time.is_some());
    assert_eq!(run.steps.len(), 2);
    for (index, step) in run.steps.iter().enumerate() {
        assert_eq!(step.index as usize, index);
        assert_eq!(step.action_type, "email");
        assert_eq!(step.status, pb::StepStatus::Succeeded as i32, "{step:?}");
        assert_eq!(step.attempts, 1);
        assert!(step.error.is_empty());
        assert!(step.start_time.is_some() && step.finish_time.is_some());
    }
    let output = run.steps[0].output.as_ref().unwrap();
    assert!(output.fields.contains_key("message_id"));

    let listed = stack
        .zap_client()
        .await
        .list_runs(with_key(
            &key,
            pb::ListRunsRequest {
                zap_id: zap.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.runs.len(), 1);
    assert_eq!(listed.runs[0].id, run_id);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_template_field_fails_the_step_with_a_recorded_error() {
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, Deployment::Distributed).await;
    let key = new_user(&stack, "ada").await;
    let (_, webhook_url) = create_zap(
        &stack,
        &key,
        vec![email_action("{{ trigger.email }}", "hi", "body")],
    )
    .await;
    let (status, answer) = post_json(&webhook_url, &json!({"name": "no email here"})).await;
    assert_eq!(status, 202);
    let run_id = answer["run_id"].as_str().unwrap().to_owned();

    let run = wait_for_run(&stack, &key, &run_id, pb::RunStatus::Failed).await;
    let step = &run.steps[0];
    assert_eq!(step.status, pb::StepStatus::Failed as i32);
    assert_eq!(step.attempts, 1, "a template error is permanent: no retry");
    assert!(
        step.error.starts_with("to: ") && step.error.contains("undefined"),
        "{}",
        step.error
    );
    assert!(smtp.mails().is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payload_with_a_line_break_cannot_inject_a_header() {
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, Deployment::Distributed).await;
    let key = new_user(&stack, "ada").await;
    let (_, webhook_url) = create_zap(
        &stack,
        &key,
        vec![
            email_action("ok@example.com", "{{ trigger.subject }}", "body"),
            email_action("{{ trigger.to }}", "second", "body"),
        ],
    )
    .await;
    let payload = json!({
        "subject": "hello\r\nBcc: evil@example.com",
        "to": "x@example.com\r\nBcc: evil@example.com",
    });
    let (status, answer) = post_json(&webhook_url, &payload).await;
    assert_eq!(status, 202);
    let run_id = answer["run_id"].as_str().unwrap().to_owned();

    let run = wait_for_run(&stack, &key, &run_id, pb::RunStatus::Failed).await;
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "only the first email goes out");
    assert_eq!(mails[0].recipients, ["ok@example.com"]);
    assert_eq!(
        mails[0].header("Subject").unwrap(),
        "hello  Bcc: evil@example.com"
    );
    assert!(mails[0].header("Bcc").is_none());
    assert_eq!(run.steps[1].status, pb::StepStatus::Failed as i32);
    assert_eq!(
        run.steps[1].attempts, 1,
        "an invalid recipient is permanent"
    );
    assert!(
        run.steps[1].error.starts_with("to: "),
        "{}",
        run.steps[1].error
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_step_calls_out_and_a_later_step_uses_its_response() {
    use axum::http::HeaderMap;

    // The system the zap calls: answers with an order number and keeps
    // what it received.
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let app = axum::Router::new().route(
        "/orders",
        axum::routing::post({
            let received = received.clone();
            move |headers: HeaderMap, body: String| async move {
                let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                received.lock().unwrap().push((key, body));
                axum::Json(json!({"order": 4711}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}/orders", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let smtp = SmtpSink::start().await;
    let options = zapflow_testkit::StackOptions {
        smtp_url: Some(smtp.url()),
        http_allow_cidrs: vec!["127.0.0.0/8".parse().unwrap()],
        ..Default::default()
    };
    let stack = zapflow_testkit::Stack::start(
        zapflow_testkit::test_sqlite_store().await.store,
        None,
        options,
    )
    .await;
    let key = new_user(&stack, "ada").await;
    let http = pb::Action {
        r#type: "http".into(),
        config: Some(crate::support::to_struct(json!({
            "url": target,
            "body": "{\"item\": \"{{ trigger.item }}\"}",
        }))),
        retry: None,
    };
    let email = email_action(
        "ops@example.com",
        "Order {{ steps[0].body.order }}",
        "status {{ steps[0].status }}",
    );
    let (_, webhook_url) = create_zap(&stack, &key, vec![http, email]).await;
    let (status, answer) = post_json(&webhook_url, &json!({"item": "book"})).await;
    assert_eq!(status, 202);
    let run_id = answer["run_id"].as_str().unwrap().to_owned();

    let run = wait_for_run(&stack, &key, &run_id, pb::RunStatus::Succeeded).await;
    let output = run.steps[0].output.as_ref().unwrap();
    assert_eq!(
        output.fields["status"].kind,
        Some(prost_types::value::Kind::NumberValue(200.0))
    );
    assert_eq!(
        *received.lock().unwrap(),
        [(format!("{run_id}:0"), "{\"item\": \"book\"}".to_owned())]
    );
    let mails = smtp.wait_for(1, WAIT).await;
    assert_eq!(mails[0].header("Subject").unwrap(), "Order 4711");
    assert_eq!(mails[0].body().trim_end(), "status 200");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_smtp_server_does_not_serialize_a_partition() {
    let smtp = SmtpSink::start().await;
    let bus = zapflow_testkit::test_bus(1).await;
    let options = zapflow_testkit::StackOptions {
        smtp_url: Some(smtp.url()),
        ..Default::default()
    };
    let stack =
        zapflow_testkit::Stack::start(zapflow_testkit::test_store().await, Some(bus), options)
            .await;
    let key = new_user(&stack, "ada").await;
    let (_, webhook_url) = create_zap(
        &stack,
        &key,
        vec![email_action("r@example.com", "{{ trigger.n }}", "b")],
    )
    .await;

    // Every message hangs at the server; ten runs on one partition must
    // still all be under way at once.
    smtp.stall(std::time::Duration::from_secs(3));
    let mut run_ids = Vec::new();
    for n in 0..10 {
        run_ids.push(
            post_json(&webhook_url, &json!({"n": n})).await.1["run_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    zapflow_testkit::eventually("ten emails under way together", WAIT, || async {
        (smtp.data_started() == 10 && smtp.mails().is_empty()).then_some(())
    })
    .await;
    for run_id in &run_ids {
        wait_for_run(&stack, &key, run_id, pb::RunStatus::Succeeded).await;
    }
    assert_eq!(smtp.mails().len(), 10);
    stack.stop().await;
}
