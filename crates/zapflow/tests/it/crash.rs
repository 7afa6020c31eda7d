//! Fault injection with a real process: `zapflow` is killed (SIGKILL) while
//! webhooks arrive and steps run, then restarted on the same data. Every
//! webhook that got a 2xx must have exactly one run, every run must finish,
//! and an email may repeat only as the documented policy allows (a crash
//! between the SMTP server's 250 and the step's commit), with the same
//! Message-ID.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::process::{Child, Command};
use zapflow_proto::v1 as pb;
use zapflow_proto::v1::zap_service_client::ZapServiceClient;
use zapflow_testkit::{SmtpSink, eventually, free_address, unique, with_key};

use crate::support::{email_action, to_struct};

struct Zapflow {
    child: Child,
}

impl Zapflow {
    /// Starts `zapflow` (every role, embedded) on `data_dir` and waits until
    /// it answers.
    async fn start(data_dir: &Path, grpc: SocketAddr, http: SocketAddr, smtp_url: &str) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_zapflow"))
            .env_remove("ZAPFLOW_DATABASE_URL")
            .env_remove("ZAPFLOW_KAFKA_BROKERS")
            .env("ZAPFLOW_DATA_DIR", data_dir)
            .env("ZAPFLOW_GRPC_LISTEN", grpc.to_string())
            .env("ZAPFLOW_ADMIN_LISTEN", "127.0.0.1:0")
            .env("ZAPFLOW_HTTP_LISTEN", http.to_string())
            .env("ZAPFLOW_PUBLIC_URL", format!("http://{http}"))
            .env("ZAPFLOW_SMTP_URL", smtp_url)
            .env("ZAPFLOW_ACTION_TIMEOUT", "2")
            .env("ZAPFLOW_POLL_INTERVAL_MS", "100")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting the zapflow binary");
        eventually(
            "zapflow to answer",
            Duration::from_secs(30),
            || async move {
                let key_written = data_dir.join("admin-api-key").exists();
                let up = tokio::net::TcpStream::connect(grpc).await.is_ok()
                    && tokio::net::TcpStream::connect(http).await.is_ok();
                (key_written && up).then_some(())
            },
        )
        .await;
        Self { child }
    }

    async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

fn admin_key(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("admin-api-key"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Sends webhook `n` with idempotency key `n`; the run id if it got 202.
pub(crate) async fn deliver(client: &reqwest::Client, url: &str, n: usize) -> Option<String> {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("idempotency-key", format!("delivery-{n}"))
        .body(json!({"to": format!("r{n}@example.com"), "n": n}).to_string())
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if response.status() != 202 {
        return None;
    }
    let body: serde_json::Value = response.json().await.ok()?;
    Some(body["run_id"].as_str()?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_webhook_and_repeats_no_email_beyond_the_policy() {
    const WEBHOOKS: usize = 120;
    let smtp = SmtpSink::start().await;
    let data_dir: PathBuf = std::env::temp_dir().join(unique("zapflow-crash"));
    let (grpc, http) = (free_address(), free_address());

    let first = Zapflow::start(&data_dir, grpc, http, &smtp.url()).await;
    let key = admin_key(&data_dir);
    let mut zaps = ZapServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let slow_email = |subject: &str| pb::Action {
        config: Some(to_struct(
            json!({"to": "{{ trigger.to }}", "subject": subject, "body": "b"}),
        )),
        ..email_action("", "", "")
    };
    let created = zaps
        .create_zap(with_key(
            &key,
            pb::CreateZapRequest {
                name: "crash".into(),
                actions: vec![
                    slow_email("a {{ trigger.n }}"),
                    slow_email("b {{ trigger.n }}"),
                ],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let url = created.webhook_url;
    let zap_id = created.zap.unwrap().id;

    // Deliveries in flight when the process dies.
    let client = reqwest::Client::new();
    let sender = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move {
            let mut accepted = HashMap::new();
            for n in 0..WEBHOOKS {
                if let Some(run_id) = deliver(&client, &url, n).await {
                    accepted.insert(n, run_id);
                }
            }
            accepted
        }
    });
    eventually("some emails to go out", Duration::from_secs(30), || async {
        (smtp.mails().len() >= 10).then_some(())
    })
    .await;
    first.kill().await;
    let accepted_before = sender.await.unwrap();
    assert!(
        !accepted_before.is_empty() && accepted_before.len() < WEBHOOKS,
        "the kill came mid-stream: {}",
        accepted_before.len()
    );

    // The restart, and the senders retrying every delivery (those whose
    // answer they got as well, as if it had been lost).
    let second = Zapflow::start(&data_dir, grpc, http, &smtp.url()).await;
    let mut run_ids = HashSet::new();
    for n in 0..WEBHOOKS {
        let run_id = deliver(&client, &url, n)
            .await
            .expect("accepted after the restart");
        if let Some(before) = accepted_before.get(&n) {
            assert_eq!(
                &run_id, before,
                "delivery {n} got 2xx before the crash: the same run"
            );
        }
        run_ids.insert(run_id);
    }
    assert_eq!(run_ids.len(), WEBHOOKS, "one run per delivery");

    // Every run finishes...
    let mut zaps = ZapServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    for run_id in &run_ids {
        crate::support::wait_for_run_at(&zaps, &key, run_id, pb::RunStatus::Succeeded).await;
    }
    let listed = zaps
        .list_runs(with_key(
            &key,
            pb::ListRunsRequest {
                zap_id,
                page_size: 500,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(listed.len(), WEBHOOKS, "no run beyond the deliveries");

    // ...each email went out, and a repeat is always of the same message.
    let mut by_message_id: HashMap<String, usize> = HashMap::new();
    for mail in smtp.mails() {
        *by_message_id
            .entry(mail.header("Message-ID").unwrap())
            .or_default() += 1;
    }
    for run_id in &run_ids {
        for stage in 0..2 {
            let id = format!("<{run_id}.{stage}@zapflow>");
            assert!(by_message_id.contains_key(&id), "no email for {id}");
        }
    }
    assert_eq!(
        by_message_id.len(),
        WEBHOOKS * 2,
        "no email outside the runs"
    );
    let repeats: usize = by_message_id.values().map(|count| count - 1).sum();
    // Only steps under way at the kill can repeat (64 at most run at once).
    assert!(repeats <= 64, "{repeats} repeated emails");
    println!(
        "crash test: {} accepted before the kill, {repeats} emails repeated under the policy",
        accepted_before.len()
    );
    second.kill().await;
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_delays_runs_and_loses_none() {
    use zapflow_testkit::{PrivateBroker, Stack, StackOptions, test_store};
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,zapflow=debug")
        .try_init();

    let smtp = SmtpSink::start().await;
    let mut broker = PrivateBroker::start().await;
    let bus = zapflow_bus::BusSettings {
        brokers: broker.brokers(),
        events_topic: unique("zap-events"),
        dead_letter_topic: unique("zap-events-dlq"),
        partitions: 2,
    };
    bus.ensure_topics().await.unwrap();
    let options = StackOptions {
        smtp_url: Some(smtp.url()),
        ..StackOptions::default()
    };
    let stack = Stack::start(test_store().await, Some(bus), options).await;
    let key = crate::support::new_user(&stack, "ada").await;
    let (_, url) = crate::support::create_zap(
        &stack,
        &key,
        vec![email_action("{{ trigger.to }}", "{{ trigger.n }}", "b")],
    )
    .await;
    let client = reqwest::Client::new();

    for n in 0..3 {
        deliver(&client, &url, n).await.expect("accepted");
    }
    smtp.wait_for(3, crate::support::WAIT).await;

    // The broker goes away: webhooks are still accepted (the outbox keeps
    // them), nothing is delivered, nothing is lost.
    broker.stop().await;
    let mut run_ids = Vec::new();
    for n in 3..8 {
        run_ids.push(
            deliver(&client, &url, n)
                .await
                .expect("accepted while the broker is down"),
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(smtp.mails().len(), 3);
    assert!(
        stack.store.outbox_len().await.unwrap() >= 5,
        "the outbox holds the undelivered work"
    );

    broker.restart().await;
    for run_id in &run_ids {
        crate::support::wait_for_run(&stack, &key, run_id, pb::RunStatus::Succeeded).await;
    }
    assert_eq!(
        smtp.sorted_subjects(),
        ["0", "1", "2", "3", "4", "5", "6", "7"],
        "each email once"
    );
    stack.stop().await;
}

/// Sends `signal` (by name, e.g. "INT") to a process with the `kill` command.
pub(crate) async fn signal(child: &Child, signal: &str) {
    let pid = child.id().expect("the process runs").to_string();
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_drains_and_exits_cleanly_and_a_second_one_exits_at_once() {
    let smtp = SmtpSink::start().await;
    let data_dir = std::env::temp_dir().join(unique("zapflow-signal"));

    let mut zapflow = Zapflow::start(&data_dir, free_address(), free_address(), &smtp.url()).await;
    signal(&zapflow.child, "INT").await;
    let status = tokio::time::timeout(Duration::from_secs(20), zapflow.child.wait())
        .await
        .expect("exits after draining")
        .unwrap();
    assert!(status.success(), "{status:?}");

    // Restarted on the same data: the key is kept (and not printed again).
    let key = admin_key(&data_dir);
    let (grpc, http) = (free_address(), free_address());
    let mut zapflow = Zapflow::start(&data_dir, grpc, http, &smtp.url()).await;
    assert_eq!(admin_key(&data_dir), key);

    // A slow SMTP server keeps a step in flight: the first signal waits
    // for it, the second ends the process at once.
    smtp.stall(Duration::from_secs(60));
    let mut zaps = ZapServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let url = zaps
        .create_zap(with_key(
            &key,
            pb::CreateZapRequest {
                name: "slow".into(),
                actions: vec![email_action("{{ trigger.to }}", "slow", "b")],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .webhook_url;
    deliver(&reqwest::Client::new(), &url, 1)
        .await
        .expect("accepted");
    eventually(
        "the email to be under way",
        Duration::from_secs(20),
        || async { (smtp.data_started() == 1).then_some(()) },
    )
    .await;
    signal(&zapflow.child, "INT").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        zapflow.child.try_wait().unwrap().is_none(),
        "the first signal waits for the step"
    );
    signal(&zapflow.child, "INT").await;
    let status = tokio::time::timeout(Duration::from_secs(5), zapflow.child.wait())
        .await
        .expect("the second signal exits at once")
        .unwrap();
    assert!(!status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// `zapflow` with its listeners moved (and nothing said about where the
/// API is) still turns webhooks into runs: the gateway calls the API in
/// process, and says it is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moved_listeners_still_ingest_and_report_ready() {
    let smtp = SmtpSink::start().await;
    let data_dir: PathBuf = std::env::temp_dir().join(unique("zapflow-moved"));
    let (grpc, http) = (free_address(), free_address());
    let zapflow = Zapflow::start(&data_dir, grpc, http, &smtp.url()).await;
    let key = admin_key(&data_dir);
    let zaps = ZapServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let url = zaps
        .clone()
        .create_zap(with_key(
            &key,
            pb::CreateZapRequest {
                name: "moved".into(),
                actions: vec![email_action("{{ trigger.to }}", "moved", "b")],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .webhook_url;
    assert!(url.starts_with(&format!("http://{http}/")), "{url}");

    let ready = reqwest::get(format!("http://{http}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let run_id = deliver(&reqwest::Client::new(), &url, 1)
        .await
        .expect("202 for the webhook");
    crate::support::wait_for_run_at(&zaps, &key, &run_id, pb::RunStatus::Succeeded).await;
    assert_eq!(smtp.wait_for(1, Duration::from_secs(10)).await.len(), 1);
    zapflow.kill().await;
}
