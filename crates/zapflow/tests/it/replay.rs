//! A failed run can be run again, from its failed step or from the start,
//! as a new run that points at the original.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use tonic::Code;
use zapflow_proto::v1 as pb;
use zapflow_testkit::{SmtpSink, Stack, with_key};

use crate::support::{
    Deployment, WAIT, create_zap, deliver, email_action, new_user, post_json, stack_with_smtp,
    wait_for_run,
};

const REJECT: &str = "550 5.1.1 no such user";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_run_replays_from_its_failed_step_keeping_both_histories() {
    let smtp = SmtpSink::start().await;
    smtp.reject_address("flaky@example.com", Some(REJECT));
    let stack = stack_with_smtp(&smtp, Deployment::Embedded).await;
    let key = new_user(&stack, "ada").await;
    let (zap, url) = create_zap(
        &stack,
        &key,
        vec![
            email_action("first@example.com", "first", "b"),
            email_action("{{ trigger.second }}", "second", "b"),
        ],
    )
    .await;
    let payload = json!({"second": "flaky@example.com"});
    let original_id = post_json(&url, &payload).await.1["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let original = wait_for_run(&stack, &key, &original_id, pb::RunStatus::Failed).await;
    assert!(
        original.steps[1].error.contains("550"),
        "{}",
        original.steps[1].error
    );
    assert_eq!(smtp.sorted_subjects(), ["first"]);

    // The mailbox is fixed; replay from the failed step.
    smtp.reject_address("flaky@example.com", None);
    let mut client = stack.zap_client().await;
    let replay = client
        .replay_run(with_key(
            &key,
            pb::ReplayRunRequest {
                id: original_id.clone(),
                from_start: false,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(replay.replay_of, original_id);
    assert_ne!(replay.id, original_id);
    let replay = wait_for_run(&stack, &key, &replay.id, pb::RunStatus::Succeeded).await;
    assert_eq!(
        smtp.sorted_subjects(),
        ["first", "second"],
        "the step that succeeded is not repeated"
    );
    assert_eq!(
        replay.steps[0].output, original.steps[0].output,
        "its output is carried over"
    );
    assert_eq!(replay.trigger, original.trigger);
    let original_now = wait_for_run(&stack, &key, &original_id, pb::RunStatus::Failed).await;
    assert_eq!(
        original_now.steps[1].error, original.steps[1].error,
        "the original keeps its history"
    );

    // A succeeded run only replays from the start.
    let status = client
        .replay_run(with_key(
            &key,
            pb::ReplayRunRequest {
                id: replay.id.clone(),
                from_start: false,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let again = client
        .replay_run(with_key(
            &key,
            pb::ReplayRunRequest {
                id: replay.id.clone(),
                from_start: true,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    wait_for_run(&stack, &key, &again.id, pb::RunStatus::Succeeded).await;
    assert_eq!(
        smtp.sorted_subjects(),
        ["first", "first", "second", "second"]
    );

    // Another user cannot replay it.
    let mallory = new_user(&stack, "mallory").await;
    let status = client
        .replay_run(with_key(
            &mallory,
            pb::ReplayRunRequest {
                id: original_id.clone(),
                from_start: true,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .replay_runs(with_key(
            &mallory,
            pb::ReplayRunsRequest {
                zap_id: zap.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_runs_of_a_time_range_replay_in_bulk_once() {
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, Deployment::PostgresOnly).await;
    let (key, zap, url) = user_with_mail_zap(&stack).await;
    let mut failed = Vec::new();
    for n in 0..3 {
        let run_id = one_failed_run(&stack, &smtp, &key, &url, n).await;
        failed.push(wait_for_run(&stack, &key, &run_id, pb::RunStatus::Failed).await);
    }
    let ok = post_json(&url, &json!({"to": "fine@example.com", "n": 9}))
        .await
        .1["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_run(&stack, &key, &ok, pb::RunStatus::Succeeded).await;
    smtp.reject_address("flaky@example.com", None);

    let client = stack.zap_client().await;
    let replay_runs = |start: Option<prost_types::Timestamp>,
                       end: Option<prost_types::Timestamp>| {
        let mut client = client.clone();
        let request = with_key(
            &key,
            pb::ReplayRunsRequest {
                zap_id: zap.id.clone(),
                start_time: start,
                end_time: end,
                from_start: false,
            },
        );
        async move {
            client
                .replay_runs(request)
                .await
                .unwrap()
                .into_inner()
                .run_ids
        }
    };
    // A range that holds only the first two failures.
    let replayed = replay_runs(failed[0].create_time, failed[2].create_time).await;
    assert_eq!(replayed.len(), 2);
    for run_id in &replayed {
        let run = wait_for_run(&stack, &key, run_id, pb::RunStatus::Succeeded).await;
        assert!(run.replay_of == failed[0].id || run.replay_of == failed[1].id);
    }
    // Without bounds: only the one not replayed yet.
    let rest = replay_runs(None, None).await;
    assert_eq!(rest.len(), 1);
    let run = wait_for_run(&stack, &key, &rest[0], pb::RunStatus::Succeeded).await;
    assert_eq!(run.replay_of, failed[2].id);
    assert!(
        replay_runs(None, None).await.is_empty(),
        "each failed run is replayed once"
    );
    assert_eq!(smtp.sorted_subjects(), ["0", "1", "2", "9"]);
    stack.stop().await;
}

/// A user's key and a zap mailing `trigger.to` with subject `trigger.n`,
/// with its webhook URL.
async fn user_with_mail_zap(stack: &Stack) -> (String, pb::Zap, String) {
    let key = new_user(stack, "ada").await;
    let (zap, url) = create_zap(
        stack,
        &key,
        vec![email_action("{{ trigger.to }}", "{{ trigger.n }}", "b")],
    )
    .await;
    (key, zap, url)
}

/// A failed run of a zap from [`user_with_mail_zap`], whose recipient
/// the server refuses (until told otherwise); returns the run id.
async fn one_failed_run(stack: &Stack, smtp: &SmtpSink, key: &str, url: &str, n: u32) -> String {
    smtp.reject_address("flaky@example.com", Some(REJECT));
    let run_id = deliver(url, &json!({"to": "flaky@example.com", "n": n})).await;
    wait_for_run(stack, key, &run_id, pb::RunStatus::Failed).await;
    run_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_replays_of_one_run_make_one_replay_and_one_email() {
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, Deployment::PostgresOnly).await;
    let (key, _, url) = user_with_mail_zap(&stack).await;
    let original = one_failed_run(&stack, &smtp, &key, &url, 1).await;
    smtp.reject_address("flaky@example.com", None);

    let client = stack.zap_client().await;
    let replays = futures::future::join_all((0..5).map(|_| {
        let mut client = client.clone();
        let request = with_key(
            &key,
            pb::ReplayRunRequest {
                id: original.clone(),
                from_start: false,
            },
        );
        async move {
            client
                .replay_run(request)
                .await
                .unwrap()
                .into_inner()
                .run
                .unwrap()
        }
    }))
    .await;
    let ids: HashSet<&str> = replays.iter().map(|run| run.id.as_str()).collect();
    assert_eq!(ids.len(), 1, "one replay for five calls: {ids:?}");
    let replay = wait_for_run(&stack, &key, &replays[0].id, pb::RunStatus::Succeeded).await;
    assert_eq!(replay.replay_of, original);
    assert_eq!(smtp.wait_for(1, WAIT).await.len(), 1);

    // A later call returns the same replay and sends nothing.
    let again = client
        .clone()
        .replay_run(with_key(
            &key,
            pb::ReplayRunRequest {
                id: original.clone(),
                from_start: true,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(again.id, replay.id);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(smtp.mails().len(), 1, "one email");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_bulk_replays_replay_each_failed_run_once() {
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, Deployment::PostgresOnly).await;
    let (key, zap, url) = user_with_mail_zap(&stack).await;
    let mut failed = Vec::new();
    for n in 0..4 {
        failed.push(one_failed_run(&stack, &smtp, &key, &url, n).await);
    }
    smtp.reject_address("flaky@example.com", None);

    let client = stack.zap_client().await;
    let calls = futures::future::join_all((0..4).map(|_| {
        let mut client = client.clone();
        let request = with_key(
            &key,
            pb::ReplayRunsRequest {
                zap_id: zap.id.clone(),
                ..Default::default()
            },
        );
        async move {
            client
                .replay_runs(request)
                .await
                .unwrap()
                .into_inner()
                .run_ids
        }
    }))
    .await;
    let replays: Vec<&String> = calls.iter().flatten().collect();
    assert_eq!(replays.len(), failed.len(), "{calls:?}");
    let mut replayed = HashSet::new();
    for replay in replays {
        let run = wait_for_run(&stack, &key, replay, pb::RunStatus::Succeeded).await;
        assert!(replayed.insert(run.replay_of), "replayed once");
    }
    assert_eq!(replayed, failed.into_iter().collect());
    smtp.wait_for(4, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(smtp.sorted_subjects(), ["0", "1", "2", "3"]);
    stack.stop().await;
}
