//! `zapflow runs tail`: runs as they happen, across processes and through a
//! restart of the server.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use zapflow_testkit::{Stack, StackOptions, eventually, free_address};

use crate::cli::{Cli, email_zap, path, send, webhook_url};
use crate::support::{Deployment, WAIT, new_user, stack_of};

/// A running `zapflow runs tail`, its lines collected as they come.
struct Tail {
    _child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Tail {
    fn start(cli: &Cli, args: &[&str]) -> Self {
        let mut child = cli
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting zapflow runs tail");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Self {
            _child: child,
            lines,
        }
    }

    /// Waits for a line holding every one of `parts`.
    async fn expect(&self, parts: &[&str]) {
        let what = format!("a line of `runs tail` with {parts:?}");
        let lines = self.lines.clone();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if lines
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|line| parts.iter().all(|part| line.contains(part)))
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "no {what} in {:#?}",
            self.lines.lock().unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_sees_runs_finished_by_another_process() {
    // Two zapflow processes on one PostgreSQL database: the one the tail
    // watches takes webhooks but runs no steps; the other runs them.
    let url = zapflow_testkit::test_database_url().await;
    let open = || async {
        let store = zapflow_store::Store::open(&url, 8).await.unwrap();
        store.migrate().await.unwrap();
        store
    };
    let watched = Stack::start(
        open().await,
        None,
        StackOptions {
            workers: 0,
            ..StackOptions::default()
        },
    )
    .await;
    let other = Stack::start(open().await, None, StackOptions::default()).await;
    let cli = Cli::of(&watched, &new_user(&watched, "ada").await);
    let applied = cli
        .ok(&[
            "apply",
            "-f",
            path(&cli.write("mail.yaml", &email_zap("Mail", "hi"))),
        ])
        .await;
    let tail = Tail::start(&cli, &["runs", "tail", "--zap", "Mail"]);
    tail.expect(&["watching runs"]).await;
    let first = send(&cli, &webhook_url(&applied), r#"{"to": "a@example.com"}"#).await;
    tail.expect(&[&first, "accepted"]).await;
    tail.expect(&[&first, "step 0 email succeeded (attempt 1)"])
        .await;
    tail.expect(&[&first, "finished", "succeeded"]).await;

    // Failures alone, in JSON.
    let failures = Tail::start(&cli, &["runs", "tail", "--status", "failed", "-o", "json"]);
    failures.expect(&["watching runs"]).await;
    let bad = send(&cli, &webhook_url(&applied), "{}").await;
    failures
        .expect(&[&bad, "\"event\":\"finished\"", "\"status\":\"failed\""])
        .await;
    tail.expect(&[&bad, "finished", "failed"]).await;
    assert!(
        !failures
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains(&first)),
        "a succeeded run is not a failure"
    );
    drop((tail, failures));
    other.stop().await;
    watched.stop().await;
}

/// A `zapflow` server process: embedded, its data in `data_dir`.
fn spawn_server(data_dir: &Path, grpc: &str, http: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_zapflow"))
        .env_clear()
        .env("ZAPFLOW_DATA_DIR", data_dir)
        .env("ZAPFLOW_GRPC_LISTEN", grpc)
        .env("ZAPFLOW_ADMIN_LISTEN", "127.0.0.1:0")
        .env("ZAPFLOW_HTTP_LISTEN", http)
        .env("ZAPFLOW_PUBLIC_URL", format!("http://{http}"))
        .env("ZAPFLOW_POLL_INTERVAL_MS", "200")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting zapflow")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_reconnects_after_a_server_restart() {
    let cli = Cli::new();
    let data_dir = cli.dir.join("data");
    let (grpc, http) = (free_address().to_string(), free_address().to_string());
    let mut server = spawn_server(&data_dir, &grpc, &http);
    // The client finds the admin key in the data directory.
    let cli = cli.with("ZAPFLOW_SERVER", &format!("http://{grpc}"));
    eventually("the server to answer", WAIT, || async {
        (cli.run(&["zaps", "list"]).await.code == 0).then_some(())
    })
    .await;
    let applied = cli
        .ok(&[
            "apply",
            "-f",
            path(&cli.write("mail.yaml", &email_zap("Mail", "hi"))),
        ])
        .await;
    let url = webhook_url(&applied);
    let tail = Tail::start(&cli, &["runs", "tail"]);
    tail.expect(&["watching runs"]).await;
    let before = send(&cli, &url, r#"{"to": "a@example.com"}"#).await;
    tail.expect(&[&before, "finished", "succeeded"]).await;

    // SIGTERM: the server drains and ends the stream; start it again.
    let pid = server.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    server.wait().await.unwrap();
    tail.expect(&["lost"]).await;
    let _server = spawn_server(&data_dir, &grpc, &http);
    tail.expect(&["reconnected"]).await;
    let after = eventually("the restarted server to take a webhook", WAIT, || async {
        let ran = cli
            .run(&["send", &url, "--data", r#"{"to": "b@example.com"}"#])
            .await;
        let answer: Value = serde_json::from_str(&ran.stdout).ok()?;
        answer["run_id"].as_str().map(str::to_owned)
    })
    .await;
    tail.expect(&[&after, "finished", "succeeded"]).await;
}

/// Accepted, the step, finished: what `runs tail -o json` prints of one run.
async fn tail_follows_a_run(deployment: Deployment) {
    let stack = stack_of(deployment, StackOptions::default()).await;
    let cli = Cli::of(&stack, &new_user(&stack, "ada").await);
    let applied = cli
        .ok(&[
            "apply",
            "-f",
            path(&cli.write("mail.yaml", &email_zap("Mail", "hi"))),
        ])
        .await;
    let tail = Tail::start(&cli, &["runs", "tail", "-o", "json"]);
    tail.expect(&["watching runs"]).await;
    let run = send(&cli, &webhook_url(&applied), r#"{"to": "a@example.com"}"#).await;
    tail.expect(&[&run, r#""event":"accepted""#]).await;
    tail.expect(&[&run, r#""event":"step","step":0"#]).await;
    tail.expect(&[&run, r#""event":"finished""#, r#""status":"succeeded""#])
        .await;
    drop(tail);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_follows_a_run_embedded() {
    tail_follows_a_run(Deployment::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_follows_a_run_postgres_only() {
    tail_follows_a_run(Deployment::PostgresOnly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_follows_a_run_distributed() {
    tail_follows_a_run(Deployment::Distributed).await;
}
