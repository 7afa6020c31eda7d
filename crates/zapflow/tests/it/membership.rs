//! The distributed deployment as users run it (one process of the real
//! binary per role, PostgreSQL, the Kafka-protocol broker) while workers
//! and processors are killed, stopped and added under load. Every run must
//! finish within a stated bound, and an email may repeat only under the
//! documented at-least-once policy (a kill between the SMTP server's 250 and
//! the step's commit), always with the same Message-ID.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use tokio::process::{Child, Command};
use zapflow_proto::v1 as pb;
use zapflow_proto::v1::zap_service_client::ZapServiceClient;
use zapflow_testkit::{
    SmtpSink, eventually, free_address, test_bus, test_database_url, unique, with_key,
};

use crate::crash::{deliver, signal};
use crate::support::{email_action, to_struct};

const WEBHOOKS: usize = 300;
/// Webhooks sent at once.
const SENDERS: usize = 16;
/// Steps of the zap: each run sends this many emails.
const STAGES: usize = 2;
/// Steps one worker runs at once: what one killed worker may repeat at most.
const WORKER_CONCURRENCY: usize = 16;
const PARTITIONS: i32 = 6;
/// How long a role gets to answer, a worker to join the group, a stopped
/// worker to drain.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// From the last kill (or join) until every run has succeeded. The group
/// coordinator hands a dead member's partitions on after the session
/// timeout; a worker rejoins when a backlog stands still for the session
/// timeout plus an action (2 s here) plus a commit and a check; tansu's
/// rebalances take up to 21 s; then the backlog drains.
const RUNS_BOUND: Duration = Duration::from_secs(120);
/// From a worker's SIGKILL until the survivor holds every partition:
/// eviction after the session timeout, then at worst a stalled backlog
/// noticed (session timeout + action + commit + check) and a rejoin.
const TAKEOVER_BOUND: Duration = Duration::from_secs(60);

/// These tests run five or six processes each: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One `zapflow` process per role, sharing a database, a topic and a
/// consumer group; any still running when this is dropped are killed.
struct Deployment {
    dir: PathBuf,
    env: Vec<(&'static str, String)>,
    /// By name (`api`, `processor`, `worker-1`, ...): the process and the
    /// log of this incarnation.
    processes: HashMap<String, (Child, PathBuf)>,
    incarnations: usize,
    database: sqlx::PgPool,
    webhook_url: String,
}

impl Deployment {
    /// Migrates, creates a user, starts the API, the gateway, a processor
    /// and `workers` workers, and creates a zap of two emails.
    async fn start(smtp: &SmtpSink, workers: usize, action_timeout_secs: u64) -> Self {
        let bus = test_bus(PARTITIONS).await;
        let database_url = test_database_url().await;
        let dir = std::env::temp_dir().join(unique("zapflow-membership"));
        std::fs::create_dir_all(&dir).unwrap();
        let (grpc, http, ingest) = (free_address(), free_address(), free_address());
        let env = vec![
            ("ZAPFLOW_DATABASE_URL", database_url.clone()),
            ("ZAPFLOW_KAFKA_BROKERS", bus.brokers.clone()),
            ("ZAPFLOW_EVENTS_TOPIC", bus.events_topic.clone()),
            ("ZAPFLOW_DEAD_LETTER_TOPIC", bus.dead_letter_topic.clone()),
            ("ZAPFLOW_CONSUMER_GROUP", unique("zapflow-workers")),
            ("ZAPFLOW_GRPC_LISTEN", grpc.to_string()),
            ("ZAPFLOW_HTTP_LISTEN", http.to_string()),
            ("ZAPFLOW_INGEST_LISTEN", ingest.to_string()),
            ("ZAPFLOW_INGEST_URL", format!("http://{ingest}")),
            ("ZAPFLOW_PUBLIC_URL", format!("http://{http}")),
            ("ZAPFLOW_SMTP_URL", smtp.url()),
            ("ZAPFLOW_ZAP_RATE_LIMIT", "0".into()),
            ("ZAPFLOW_IP_RATE_LIMIT", "0".into()),
            ("ZAPFLOW_DATA_DIR", dir.join("data").display().to_string()),
            ("ZAPFLOW_ACTION_TIMEOUT", action_timeout_secs.to_string()),
            ("ZAPFLOW_WORKER_CONCURRENCY", WORKER_CONCURRENCY.to_string()),
            ("ZAPFLOW_POLL_INTERVAL_MS", "200".into()),
            ("RUST_LOG", "info,sqlx=warn".into()),
            ("NO_COLOR", "1".into()),
        ];
        let mut deployment = Self {
            dir,
            env,
            processes: HashMap::new(),
            incarnations: 0,
            database: sqlx::PgPool::connect(&database_url).await.unwrap(),
            webhook_url: String::new(),
        };

        let created = deployment
            .command(
                &["create-user", "membership"],
                &deployment.dir.join("commands.log"),
            )
            .stdout(Stdio::piped())
            .output()
            .await
            .unwrap();
        assert!(created.status.success(), "zapflow create-user failed");
        let key = String::from_utf8(created.stdout).unwrap().trim().to_owned();

        for name in ["api", "gateway", "processor"] {
            deployment.spawn(name);
        }
        for n in 1..=workers {
            deployment.spawn(&format!("worker-{n}"));
        }
        let ready = format!("http://{http}/readyz");
        eventually("the gateway to be ready", START_TIMEOUT, || async {
            let response = reqwest::get(&ready).await.ok()?;
            (response.status() == 200).then_some(())
        })
        .await;

        let mut zaps = ZapServiceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let email = |subject: &str| pb::Action {
            config: Some(to_struct(
                json!({"to": "{{ trigger.to }}", "subject": subject, "body": "b"}),
            )),
            ..email_action("", "", "")
        };
        deployment.webhook_url = zaps
            .create_zap(with_key(
                &key,
                pb::CreateZapRequest {
                    name: "membership".into(),
                    actions: vec![email("a {{ trigger.n }}"), email("b {{ trigger.n }}")],
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .webhook_url;
        deployment
    }

    /// `zapflow <args>` with only this deployment's configuration, its
    /// output appended to `log`.
    fn command(&self, args: &[&str], log: &Path) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_zapflow"));
        command.args(args);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ZAPFLOW_") {
                command.env_remove(name);
            }
        }
        command.env("ZAPFLOW_ADMIN_LISTEN", "127.0.0.1:0");
        let log = || {
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(log)
                .unwrap()
        };
        command
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(log())
            .stderr(log())
            .kill_on_drop(true);
        command
    }

    /// Starts process `name` (its role is the part before any `-`).
    fn spawn(&mut self, name: &str) {
        self.incarnations += 1;
        let log = self.dir.join(format!("{name}.{}.log", self.incarnations));
        let role = name.split('-').next().unwrap();
        let child = self.command(&[role], &log).spawn().unwrap();
        self.processes.insert(name.to_owned(), (child, log));
    }

    /// SIGKILL: no goodbye to the group, nothing drained.
    async fn kill(&mut self, name: &str) {
        let (mut child, _) = self.processes.remove(name).expect("a running process");
        child.kill().await.unwrap();
    }

    /// SIGTERM, then waits for the process to drain and exit.
    async fn terminate(&mut self, name: &str) -> ExitStatus {
        let (child, _) = self.processes.get_mut(name).expect("a running process");
        signal(child, "TERM").await;
        tokio::time::timeout(START_TIMEOUT, child.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} did not exit within {START_TIMEOUT:?} of SIGTERM"))
            .unwrap()
    }

    /// What process `name` has logged in this incarnation.
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(&self.processes[name].1).unwrap_or_default()
    }

    /// The partitions worker `name` holds, as it last logged them.
    fn assignment(&self, name: &str) -> Vec<i32> {
        let mut held = Vec::new();
        for line in self.log(name).lines() {
            if line.contains("partitions revoked") {
                held.clear();
            } else if line.contains("partitions assigned") {
                held = field(line, "partitions")
                    .split(',')
                    .filter_map(|partition| partition.parse().ok())
                    .collect();
            }
        }
        held
    }

    /// Waits until `workers` share every partition, each holding some.
    async fn wait_for_assignment(&self, workers: &[&str]) {
        eventually(
            &format!("{workers:?} to share the partitions"),
            START_TIMEOUT,
            || async {
                let held: Vec<Vec<i32>> =
                    workers.iter().map(|name| self.assignment(name)).collect();
                let all: HashSet<i32> = held.iter().flatten().copied().collect();
                (held.iter().all(|mine| !mine.is_empty()) && all.len() == PARTITIONS as usize)
                    .then_some(())
            },
        )
        .await;
    }

    /// Sends the webhooks, `SENDERS` at a time, in the background; yields
    /// the run ids.
    fn send_webhooks(&self) -> tokio::task::JoinHandle<Vec<String>> {
        let url = self.webhook_url.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            futures::stream::iter(0..WEBHOOKS)
                .map(|n| {
                    let (client, url) = (client.clone(), url.clone());
                    async move {
                        // The API and the gateway stay up; a slow answer is
                        // asked again under the same idempotency key.
                        for _ in 0..10 {
                            if let Some(run_id) = deliver(&client, &url, n).await {
                                return run_id;
                            }
                        }
                        panic!("webhook {n} was never accepted")
                    }
                })
                .buffer_unordered(SENDERS)
                .collect()
                .await
        })
    }

    /// Waits until every run succeeded; fails after `bound` with how far
    /// they got and what the workers last said.
    async fn wait_for_runs(&self, bound: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let statuses: Vec<(String, i64)> =
                sqlx::query_as("SELECT status, count(*) FROM zap_runs GROUP BY status")
                    .fetch_all(&self.database)
                    .await
                    .unwrap();
            if statuses == [("succeeded".to_owned(), WEBHOOKS as i64)] {
                return started.elapsed();
            }
            if started.elapsed() > bound {
                panic!(
                    "runs not finished {bound:?} after the last fault: {statuses:?}\n{}",
                    self.worker_log_tails()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn worker_log_tails(&self) -> String {
        let mut tails = String::new();
        for (name, (_, log)) in &self.processes {
            if name.starts_with("worker") {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                tails.push_str(&format!("--- {} ---\n{tail}\n", log.display()));
            }
        }
        tails
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for (child, _) in self.processes.values_mut() {
            let _ = child.start_kill();
        }
    }
}

/// The value of `name=value` in a log line.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_default()
}

/// Checks that every run's emails arrived and no other; returns how many
/// arrived twice or more (always as the same message: one Message-ID per
/// step).
fn repeated_emails(smtp: &SmtpSink, run_ids: &[String]) -> usize {
    let mut by_message_id: HashMap<String, usize> = HashMap::new();
    for mail in smtp.mails() {
        *by_message_id
            .entry(mail.header("Message-ID").unwrap())
            .or_default() += 1;
    }
    for run_id in run_ids {
        for stage in 0..STAGES {
            let id = format!("<{run_id}.{stage}@zapflow>");
            assert!(by_message_id.contains_key(&id), "no email for {id}");
        }
    }
    assert_eq!(
        by_message_id.len(),
        WEBHOOKS * STAGES,
        "no email outside the runs"
    );
    by_message_id.values().map(|count| count - 1).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_and_processors_killed_and_restarted_under_load_strand_no_run() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let smtp = SmtpSink::start().await;
    let mut deployment = Deployment::start(&smtp, 2, 2).await;
    let sender = deployment.send_webhooks();
    smtp.wait_for(20, START_TIMEOUT).await;

    let victims = ["worker-1", "processor", "worker-2", "worker-1", "processor"];
    for victim in victims {
        deployment.kill(victim).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        deployment.spawn(victim);
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    let run_ids = sender.await.unwrap();
    let took = deployment.wait_for_runs(RUNS_BOUND).await;

    let repeats = repeated_emails(&smtp, &run_ids);
    let worker_kills = victims
        .iter()
        .filter(|name| name.starts_with("worker"))
        .count();
    assert!(
        repeats <= worker_kills * WORKER_CONCURRENCY,
        "{repeats} repeated emails"
    );
    println!(
        "kills: every run done {took:?} after the last restart; {repeats} emails repeated under the policy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_that_stays_dead_has_its_partitions_taken_over() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let smtp = SmtpSink::start().await;
    let mut deployment = Deployment::start(&smtp, 2, 2).await;
    deployment
        .wait_for_assignment(&["worker-1", "worker-2"])
        .await;
    let sender = deployment.send_webhooks();
    smtp.wait_for(30, START_TIMEOUT).await;

    let orphaned = deployment.assignment("worker-2");
    let killed = Instant::now();
    deployment.kill("worker-2").await;
    eventually(
        "the surviving worker to hold every partition",
        TAKEOVER_BOUND,
        || async { (deployment.assignment("worker-1").len() == PARTITIONS as usize).then_some(()) },
    )
    .await;
    let took_over = killed.elapsed();
    let run_ids = sender.await.unwrap();
    let took = deployment.wait_for_runs(RUNS_BOUND).await;

    let repeats = repeated_emails(&smtp, &run_ids);
    assert!(repeats <= WORKER_CONCURRENCY, "{repeats} repeated emails");
    println!(
        "takeover: partitions {orphaned:?} taken over {took_over:?} after the kill; every run done {took:?} later; {repeats} emails repeated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_joining_mid_stream_loses_and_repeats_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let smtp = SmtpSink::start().await;
    let mut deployment = Deployment::start(&smtp, 1, 2).await;
    deployment.wait_for_assignment(&["worker-1"]).await;
    let sender = deployment.send_webhooks();
    smtp.wait_for(50, START_TIMEOUT).await;

    deployment.spawn("worker-2");
    deployment
        .wait_for_assignment(&["worker-1", "worker-2"])
        .await;
    let joined = Instant::now();
    let run_ids = sender.await.unwrap();
    let took = deployment.wait_for_runs(RUNS_BOUND).await;

    assert_eq!(repeated_emails(&smtp, &run_ids), 0, "no email twice");
    assert!(deployment.log("worker-1").contains("partitions revoked"));
    println!(
        "join: every run done {took:?} after the rebalance ({:?} after worker-2 held partitions)",
        joined.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_stopped_with_events_in_flight_loses_and_repeats_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let smtp = SmtpSink::start().await;
    // A slow mail server keeps steps in flight.
    smtp.stall(Duration::from_millis(300));
    let mut deployment = Deployment::start(&smtp, 2, 10).await;
    deployment
        .wait_for_assignment(&["worker-1", "worker-2"])
        .await;
    let sender = deployment.send_webhooks();
    smtp.wait_for(40, START_TIMEOUT).await;

    let stopping = Instant::now();
    let status = deployment.terminate("worker-1").await;
    assert!(status.success(), "a drained exit: {status:?}");
    let drained = deployment
        .log("worker-1")
        .lines()
        .find(|line| line.contains("worker draining"))
        .map(|line| field(line, "in_flight").parse::<usize>().unwrap())
        .expect("the worker said it was draining");
    assert!(drained > 0, "steps were in flight at SIGTERM");
    let stopped = stopping.elapsed();
    let run_ids = sender.await.unwrap();
    let took = deployment.wait_for_runs(RUNS_BOUND).await;

    assert_eq!(repeated_emails(&smtp, &run_ids), 0, "no email twice");
    println!("sigterm: {drained} steps drained in {stopped:?}; every run done {took:?} later");
}
