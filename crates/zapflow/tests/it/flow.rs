//! Flow steps and dry runs: a filter that lets a run through and one that
//! stops it, a delay that outlives a restart of the process holding it,
//! and DryRunZap showing what a zap would do without doing it.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use zapflow_proto::json::{json_to_value, struct_to_json};
use zapflow_proto::v1 as pb;
use zapflow_proto::v1::zap_service_client::ZapServiceClient;
use zapflow_testkit::{SmtpSink, eventually, with_key};

use crate::cli::{Cli, path};
use crate::observability::{Setup, create_zap};
use crate::support::{
    Deployment, email_action, http_action, new_user, post_json, stack_with_loopback_http,
    stack_with_smtp, to_struct, wait_for_run_at,
};

const TIMEOUT: Duration = Duration::from_secs(60);

fn filter(condition: &str) -> pb::Action {
    pb::Action {
        r#type: "filter".into(),
        config: Some(to_struct(json!({ "condition": condition }))),
        retry: None,
    }
}

fn delay(config: Value) -> pb::Action {
    pb::Action {
        r#type: "delay".into(),
        config: Some(to_struct(config)),
        retry: None,
    }
}

type Client = ZapServiceClient<tonic::transport::Channel>;

async fn get_run(zaps: &Client, key: &str, id: &str) -> pb::Run {
    zaps.clone()
        .get_run(with_key(key, pb::GetRunRequest { id: id.into() }))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
}

async fn stopped_runs(zaps: &Client, key: &str, zap_id: &str, stopped: bool) -> Vec<String> {
    let request = pb::ListRunsRequest {
        zap_id: zap_id.into(),
        stopped: Some(stopped),
        ..Default::default()
    };
    let runs = zaps
        .clone()
        .list_runs(with_key(key, request))
        .await
        .unwrap();
    runs.into_inner()
        .runs
        .into_iter()
        .map(|run| run.id)
        .collect()
}

/// A filter passes one delivery and stops another; a delay of 2 s holds a
/// run while the only zapflow process is killed and started again, and
/// the run goes on once, after the 2 s, in the new process.
async fn filters_and_delays(setup: Setup) {
    let smtp = SmtpSink::start().await;
    let setup = setup.with("ZAPFLOW_SMTP_URL", smtp.url());
    let key = setup.create_user().await;
    let zapflow = setup.spawn("all");
    zapflow.wait_ready("zapflow to be ready").await;
    let zaps = setup.zaps().await;

    let filtered = vec![
        filter(r#"trigger.amount > 100 and trigger.country in ["DE", "FR"]"#),
        email_action("ops@example.com", "big order {{ trigger.amount }}", "b"),
    ];
    let url = create_zap(&mut zaps.clone(), &key, "big orders", filtered).await;
    let zap_id = url.split('/').rev().nth(1).unwrap().to_owned();
    let (_, passing) = post_json(&url, &json!({"amount": 150, "country": "DE"})).await;
    let (_, stopping) = post_json(&url, &json!({"amount": 150, "country": "US"})).await;
    let [passing, stopping] = [&passing, &stopping].map(|body| body["run_id"].as_str().unwrap());

    let passed = wait_for_run_at(&zaps, &key, passing, pb::RunStatus::Succeeded).await;
    assert_eq!(passed.stop_reason, "");
    assert_eq!(
        passed.steps[0].output.as_ref().map(struct_to_json),
        Some(to_map(json!({"passed": true})))
    );
    let stopped = wait_for_run_at(&zaps, &key, stopping, pb::RunStatus::Succeeded).await;
    assert_eq!(stopped.stop_reason, "stopped by filter at step 0");
    let statuses: Vec<_> = stopped.steps.iter().map(|step| step.status()).collect();
    assert_eq!(
        statuses,
        [pb::StepStatus::Succeeded, pb::StepStatus::Skipped]
    );
    assert_eq!(stopped_runs(&zaps, &key, &zap_id, true).await, [stopping]);
    assert_eq!(stopped_runs(&zaps, &key, &zap_id, false).await, [passing]);
    let mails = smtp.wait_for(1, TIMEOUT).await;
    assert_eq!(mails[0].header("Subject").as_deref(), Some("big order 150"));

    let delayed = vec![
        delay(json!({"for": "2s"})),
        email_action("ops@example.com", "later", "b"),
    ];
    let url = create_zap(&mut zaps.clone(), &key, "later", delayed).await;
    let accepted = Instant::now();
    let (status, body) = post_json(&url, &json!({})).await;
    assert_eq!(status, 202);
    let run_id = body["run_id"].as_str().unwrap();
    let waiting = eventually("the run to wait", TIMEOUT, || async {
        let run = get_run(&zaps, &key, run_id).await;
        run.resume_time.is_some().then_some(run)
    })
    .await;
    assert_eq!(waiting.status(), pb::RunStatus::Running);
    assert_eq!(waiting.steps[0].status(), pb::StepStatus::Succeeded);
    let resume = waiting.resume_time.unwrap();
    let created = waiting.create_time.unwrap();
    let wait =
        (resume.seconds - created.seconds) as f64 + f64::from(resume.nanos - created.nanos) / 1e9;
    assert!(
        (1.9..3.0).contains(&wait),
        "resumes {wait} s after it was created"
    );

    // The process holding the waiting run dies; another takes over.
    drop(zapflow);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let zapflow = setup.spawn("all");
    zapflow.wait_ready("zapflow to be ready again").await;
    let zaps = setup.zaps().await;
    let done = wait_for_run_at(&zaps, &key, run_id, pb::RunStatus::Succeeded).await;
    assert_eq!(done.resume_time, None, "a resumed run waits no more");
    let mails = smtp.wait_for(2, TIMEOUT).await;
    let later = mails
        .iter()
        .find(|mail| mail.header("Subject").as_deref() == Some("later"));
    let sent_after = later.expect("the delayed email").received - accepted;
    assert!(
        sent_after >= Duration::from_secs(2),
        "sent after {sent_after:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(smtp.mails().len(), 2, "each email once");
}

fn to_map(value: Value) -> serde_json::Map<String, Value> {
    value.as_object().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_filters_stop_runs_and_delays_survive_restarts() {
    filters_and_delays(Setup::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_filters_stop_runs_and_delays_survive_restarts() {
    filters_and_delays(Setup::distributed(None).await).await;
}

/// DryRunZap renders every field, stops where a filter would, and names
/// what the real run would refuse; nothing is sent and no run is written.
async fn dry_runs_do_nothing(deployment: Deployment) {
    let smtp = SmtpSink::start().await;
    // Loopback is allowed for the HTTP action, as a private network would
    // be in production; other private addresses are not.
    let stack = stack_with_loopback_http(&smtp, deployment).await;
    let key = new_user(&stack, "dry").await;
    let mut zaps = stack.zap_client().await;
    let actions = vec![
        filter("trigger.amount > 100"),
        email_action(
            "{{ trigger.email }}",
            "Hi {{ trigger.name }}",
            "You paid {{ trigger.amount }}",
        ),
        delay(json!({"until": "{{ trigger.ship_at }}", "time_zone": "Europe/Berlin"})),
        http_action("POST", "http://localhost:9/orders/{{ trigger.id }}"),
    ];
    let dry_run = |payload: Value, actions: Vec<pb::Action>| {
        let mut zaps = zaps.clone();
        let key = key.clone();
        async move {
            let request = pb::DryRunZapRequest {
                actions,
                payload: Some(json_to_value(&payload)),
                ..Default::default()
            };
            let answer = zaps.dry_run_zap(with_key(&key, request)).await.unwrap();
            answer.into_inner().steps
        }
    };
    let ship_at = (chrono::Utc::now() + chrono::Duration::days(2)).format("%Y-%m-%d 12:00");
    let order = json!({
        "amount": 150, "email": "Ada <ada@example.com>", "name": "Ada", "id": 7,
        "ship_at": ship_at.to_string(),
    });

    let steps = dry_run(order.clone(), actions.clone()).await;
    let statuses: Vec<_> = steps.iter().map(|step| step.status()).collect();
    assert_eq!(statuses, [pb::StepStatus::Succeeded; 4], "{steps:#?}");
    assert_eq!(steps[0].passed, Some(true));
    let email = struct_to_json(steps[1].rendered.as_ref().unwrap());
    assert_eq!(email["to"], json!(["Ada <ada@example.com>"]));
    assert_eq!(
        (email["subject"].as_str(), email["body"].as_str()),
        (Some("Hi Ada"), Some("You paid 150"))
    );
    let wait = struct_to_json(steps[2].rendered.as_ref().unwrap());
    assert!(
        wait["resume_time"].as_str().unwrap().contains("T1"),
        "{wait:?}"
    );
    let http = struct_to_json(steps[3].rendered.as_ref().unwrap());
    assert_eq!(http["url"], "http://localhost:9/orders/7");
    assert_eq!(http["method"], "POST");

    // A filter that says no: what follows is skipped.
    let small =
        json!({"amount": 5, "email": "ada@example.com", "name": "Ada", "id": 7, "ship_at": "x"});
    let steps = dry_run(small, actions.clone()).await;
    assert_eq!(steps[0].passed, Some(false));
    assert!(
        steps[1..]
            .iter()
            .all(|step| step.status() == pb::StepStatus::Skipped)
    );

    // A recipient the real run would refuse, and a URL it may not call.
    let mut refused = order.clone();
    refused["email"] = json!("not an address");
    let steps = dry_run(refused, actions.clone()).await;
    assert_eq!(steps[1].status(), pb::StepStatus::Failed);
    assert!(
        steps[1].error.contains("not a valid email address"),
        "{}",
        steps[1].error
    );
    assert!(
        steps[2..]
            .iter()
            .all(|step| step.status() == pb::StepStatus::Skipped)
    );
    let internal = vec![http_action(
        "GET",
        "http://169.254.169.254/latest/meta-data",
    )];
    let steps = dry_run(json!({}), internal).await;
    assert_eq!(steps[0].status(), pb::StepStatus::Failed);
    assert!(
        steps[0].error.contains("not a public address"),
        "{}",
        steps[0].error
    );

    // A saved zap, by id; a template naming a missing field.
    let (zap, _) = crate::support::create_zap(&stack, &key, actions).await;
    let request = pb::DryRunZapRequest {
        zap_id: zap.id.clone(),
        payload: Some(json_to_value(&json!({"amount": 500}))),
        ..Default::default()
    };
    let steps = zaps
        .dry_run_zap(with_key(&key, request))
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(steps[1].status(), pb::StepStatus::Failed);
    assert!(steps[1].error.contains("undefined"), "{}", steps[1].error);

    // The same from the command line, with a zap file.
    let cli = Cli::of(&stack, &key);
    let file = cli.write(
        "order.yaml",
        "name: order\nactions:\n  - type: filter\n    config:\n      condition: trigger.amount > 100\n  \
         - type: email\n    config:\n      to: \"{{ trigger.email }}\"\n      subject: Hi\n      body: b\n",
    );
    let shown = cli
        .json(&[
            "dry-run",
            "-f",
            path(&file),
            "--data",
            r#"{"amount": 200, "email": "ada@example.com"}"#,
            "-o",
            "json",
        ])
        .await;
    assert_eq!(shown[0]["passed"], true);
    assert_eq!(shown[1]["rendered"]["to"], json!(["ada@example.com"]));
    let refused = cli
        .run(&[
            "dry-run",
            "-f",
            path(&file),
            "--data",
            r#"{"amount": 200, "email": "nobody"}"#,
        ])
        .await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("would fail at step 1"),
        "{refused:?}"
    );

    // Nothing ran.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(smtp.mails().is_empty());
    let runs = zaps
        .list_runs(with_key(&key, pb::ListRunsRequest::default()))
        .await
        .unwrap();
    assert!(runs.into_inner().runs.is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_dry_runs_show_each_step_and_send_nothing() {
    dry_runs_do_nothing(Deployment::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_dry_runs_show_each_step_and_send_nothing() {
    dry_runs_do_nothing(Deployment::Distributed).await;
}

/// The catalog lists the flow steps, and a zap whose last step is a delay
/// is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_steps_are_in_the_catalog_and_checked() {
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, Deployment::Embedded).await;
    let key = new_user(&stack, "catalog").await;
    let mut zaps = stack.zap_client().await;
    let catalog = zaps
        .list_action_types(with_key(&key, pb::ListActionTypesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .action_types;
    let flow: Vec<&str> = catalog
        .iter()
        .filter(|kind| kind.flow)
        .map(|kind| kind.r#type.as_str())
        .collect();
    assert_eq!(flow, ["filter", "delay"]);
    let refused = zaps
        .create_zap(with_key(
            &key,
            pb::CreateZapRequest {
                name: "waits for nothing".into(),
                actions: vec![delay(json!({"for": "1m"}))],
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("last step"),
        "{}",
        refused.message()
    );
    stack.stop().await;
}
