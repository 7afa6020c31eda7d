//! What operators see: the admin listener's metrics after a known scenario,
//! one trace per run received by an OTLP collector in the test, readiness
//! that follows the broker and the API, and a dashboard that only queries
//! metrics a scrape has. Each test runs the real binary, so that what is
//! counted is that process's alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use zapflow_proto::v1 as pb;
use zapflow_proto::v1::zap_service_client::ZapServiceClient;
use zapflow_testkit::{
    PrivateBroker, SmtpSink, eventually, free_address, test_bus, test_database_url, unique,
    with_key,
};

use crate::support::{email_action, http_action};

const START_TIMEOUT: Duration = Duration::from_secs(60);
const RUNS_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a zapflow deployment keeps its data and finds its broker.
pub(crate) struct Setup {
    dir: PathBuf,
    env: Vec<(&'static str, String)>,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl Setup {
    /// The embedded deployment (SQLite in a directory of the test's own).
    pub(crate) fn embedded() -> Self {
        Self::new(Vec::new())
    }

    /// PostgreSQL and the test broker, on topics of the test's own.
    pub(crate) async fn distributed(brokers: Option<String>) -> Self {
        let bus = test_bus(2).await;
        Self::new(vec![
            ("ZAPFLOW_DATABASE_URL", test_database_url().await),
            ("ZAPFLOW_KAFKA_BROKERS", brokers.unwrap_or(bus.brokers)),
            ("ZAPFLOW_EVENTS_TOPIC", bus.events_topic),
            ("ZAPFLOW_DEAD_LETTER_TOPIC", bus.dead_letter_topic),
            ("ZAPFLOW_TOPIC_PARTITIONS", "2".into()),
            ("ZAPFLOW_CONSUMER_GROUP", unique("zapflow-workers")),
        ])
    }

    fn new(mut env: Vec<(&'static str, String)>) -> Self {
        let dir = std::env::temp_dir().join(unique("zapflow-observability"));
        std::fs::create_dir_all(&dir).unwrap();
        let (grpc, http, ingest) = (free_address(), free_address(), free_address());
        env.extend([
            ("ZAPFLOW_DATA_DIR", dir.join("data").display().to_string()),
            ("ZAPFLOW_GRPC_LISTEN", grpc.to_string()),
            ("ZAPFLOW_HTTP_LISTEN", http.to_string()),
            ("ZAPFLOW_INGEST_LISTEN", ingest.to_string()),
            ("ZAPFLOW_INGEST_URL", format!("http://{ingest}")),
            ("ZAPFLOW_PUBLIC_URL", format!("http://{http}")),
            ("ZAPFLOW_HTTP_ALLOW_CIDRS", "127.0.0.0/8".into()),
            ("ZAPFLOW_IP_RATE_LIMIT", "0".into()),
            ("ZAPFLOW_POLL_INTERVAL_MS", "200".into()),
            ("RUST_LOG", "info,sqlx=warn".into()),
        ]);
        Self {
            dir,
            env,
            grpc,
            http,
        }
    }

    pub(crate) fn with(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.env.push((name, value.into()));
        self
    }

    fn command(&self, args: &[&str], log: &str) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_zapflow"));
        command.args(args);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ZAPFLOW_") {
                command.env_remove(name);
            }
        }
        // Logs go to stdout; people's messages (the first start's
        // greeting) to stderr.
        let file = |name: String| {
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(self.dir.join(name))
                .unwrap()
        };
        command
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdout(file(format!("{log}.log")))
            .stderr(file(format!("{log}.stderr")))
            .kill_on_drop(true);
        command
    }

    /// A user's API key (migrating the database first).
    pub(crate) async fn create_user(&self) -> String {
        let created = self
            .command(&["create-user", "operator"], "commands")
            .stdout(Stdio::piped())
            .output()
            .await
            .unwrap();
        assert!(created.status.success(), "zapflow create-user failed");
        String::from_utf8(created.stdout).unwrap().trim().to_owned()
    }

    /// `zapflow <role>` with its admin listener on a port of its own.
    pub(crate) fn spawn(&self, role: &str) -> Process {
        let admin = free_address();
        let child = self
            .command(&[role], role)
            .env("ZAPFLOW_ADMIN_LISTEN", admin.to_string())
            .spawn()
            .expect("starting zapflow");
        Process {
            _child: child,
            admin,
        }
    }

    pub(crate) async fn zaps(&self) -> ZapServiceClient<tonic::transport::Channel> {
        let url = format!("http://{}", self.grpc);
        eventually("the API to answer", START_TIMEOUT, || async {
            ZapServiceClient::connect(url.clone()).await.ok()
        })
        .await
    }
}

/// A running zapflow process; killed when dropped.
pub(crate) struct Process {
    _child: Child,
    admin: SocketAddr,
}

impl Process {
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let response = reqwest::get(format!("http://{}{path}", self.admin))
            .await
            .ok()?;
        Some((response.status().as_u16(), response.text().await.ok()?))
    }

    async fn readiness(&self) -> Option<(u16, String)> {
        self.get("/readyz").await
    }

    pub(crate) async fn wait_ready(&self, what: &str) {
        eventually(what, START_TIMEOUT, || async {
            let (status, _) = self.readiness().await?;
            (status == 200).then_some(())
        })
        .await;
    }

    async fn wait_unready(&self, what: &str, because: &str) -> String {
        eventually(what, START_TIMEOUT, || async {
            let (status, body) = self.readiness().await?;
            (status == 503 && body.contains(because)).then_some(body)
        })
        .await
    }

    async fn scrape(&self) -> Scrape {
        let (status, text) = self.get("/metrics").await.expect("scraping /metrics");
        assert_eq!(status, 200, "{text}");
        Scrape::parse(&text)
    }
}

/// A series' labels, as `(name, value)` pairs.
type Labels = Vec<(String, String)>;

/// One scrape: each series (name and labels) with its value.
struct Scrape {
    series: Vec<(String, Labels, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let series = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("a value per line");
                let (name, labels) = match series.split_once('{') {
                    Some((name, labels)) => (name, labels.trim_end_matches('}')),
                    None => (series, ""),
                };
                let labels = labels
                    .split("\",")
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (key, value) = pair.split_once('=').expect("label=value");
                        (key.to_owned(), value.trim_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels, value.parse().expect("a number"))
            })
            .collect();
        Self { series }
    }

    /// The sum of the series of `name` that carry every label of `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series
            .iter()
            .filter(|(series, have, _)| {
                series == name
                    && labels
                        .iter()
                        .all(|(key, value)| have.iter().any(|(k, v)| k == key && v == value))
            })
            .map(|(_, _, value)| value)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.series.iter().any(|(series, _, _)| series == name)
    }
}

/// An HTTP target answering 503 to everything.
async fn unavailable_target() -> SocketAddr {
    let app = axum::Router::new().fallback(|| async { StatusCode::SERVICE_UNAVAILABLE });
    serve(app).await
}

async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

pub(crate) async fn create_zap(
    zaps: &mut ZapServiceClient<tonic::transport::Channel>,
    key: &str,
    name: &str,
    actions: Vec<pb::Action>,
) -> String {
    zaps.create_zap(with_key(
        key,
        pb::CreateZapRequest {
            name: name.into(),
            actions,
            ..Default::default()
        },
    ))
    .await
    .unwrap()
    .into_inner()
    .webhook_url
}

pub(crate) async fn post(url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(json!({"to": "ops@example.com", "n": 1}).to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn wait_until_final(
    zaps: &mut ZapServiceClient<tonic::transport::Channel>,
    key: &str,
    run_ids: &[String],
) {
    for id in run_ids {
        eventually("the run to finish", RUNS_TIMEOUT, || {
            let mut zaps = zaps.clone();
            async move {
                let run = zaps
                    .get_run(with_key(key, pb::GetRunRequest { id: id.clone() }))
                    .await
                    .ok()?
                    .into_inner()
                    .run?;
                let finished = [pb::RunStatus::Succeeded, pb::RunStatus::Failed];
                finished.contains(&run.status()).then_some(())
            }
        })
        .await;
    }
}

/// Three webhooks to an email zap limited to 1/s with a burst of 2 (the
/// third is refused), one to a zap whose HTTP step fails twice (a retry,
/// then a dead letter), one to a URL that names no zap; then the counters
/// must have moved by exactly that much.
async fn counters_follow_the_scenario(setup: Setup, distributed: bool) -> Scrape {
    let smtp = SmtpSink::start().await;
    let target = unavailable_target().await;
    let setup = setup
        .with("ZAPFLOW_SMTP_URL", smtp.url())
        .with("ZAPFLOW_ZAP_RATE_LIMIT", "1")
        .with("ZAPFLOW_LOG_FORMAT", "json");
    let key = setup.create_user().await;
    let zapflow = setup.spawn("all");
    zapflow.wait_ready("zapflow to be ready").await;
    let mut zaps = setup.zaps().await;

    let email = create_zap(
        &mut zaps,
        &key,
        "mail",
        vec![email_action("{{ trigger.to }}", "n {{ trigger.n }}", "b")],
    )
    .await;
    let failing = pb::Action {
        retry: Some(pb::RetryPolicy {
            max_attempts: 2,
            initial_delay: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
            ..Default::default()
        }),
        ..http_action("POST", &format!("http://{target}/hook"))
    };
    let http = create_zap(&mut zaps, &key, "flaky", vec![failing]).await;

    let mut accepted = Vec::new();
    let mut statuses = Vec::new();
    for url in [&email, &email, &email, &http] {
        let (status, body) = post(url, &[]).await;
        statuses.push(status);
        if let Some(id) = body["run_id"].as_str() {
            accepted.push(id.to_owned());
        }
    }
    assert_eq!(statuses, [202, 202, 429, 202]);
    let unknown = format!(
        "http://{}/hooks/catch/{}/nope",
        setup.http,
        uuid::Uuid::now_v7()
    );
    assert_eq!(post(&unknown, &[]).await.0, 404);
    wait_until_final(&mut zaps, &key, &accepted).await;
    smtp.wait_for(2, RUNS_TIMEOUT).await;

    let scrape = zapflow.scrape().await;
    let webhooks = |status| scrape.value("zapflow_webhooks_total", &[("status", status)]);
    assert_eq!(
        (webhooks("202"), webhooks("429"), webhooks("404")),
        (3.0, 1.0, 1.0)
    );
    let limited = [("limit", "zap")];
    assert_eq!(
        scrape.value("zapflow_rate_limit_refusals_total", &limited),
        1.0
    );
    let steps = |action, outcome| {
        let labels = [("action", action), ("outcome", outcome)];
        scrape.value("zapflow_steps_finished_total", &labels)
    };
    assert_eq!(steps("email", "succeeded"), 2.0);
    assert_eq!(
        (steps("http", "retrying"), steps("http", "failed")),
        (1.0, 1.0)
    );
    let http_steps = [("action", "http")];
    assert_eq!(
        scrape.value("zapflow_step_retries_scheduled_total", &http_steps),
        1.0
    );
    assert_eq!(scrape.value("zapflow_dead_letters_total", &http_steps), 1.0);
    assert_eq!(
        scrape.value("zapflow_step_duration_seconds_count", &http_steps),
        2.0
    );
    // Ingest saw the three accepted deliveries and the unknown zap (the
    // refused one never reached it).
    assert_eq!(
        scrape.value("zapflow_ingest_duration_seconds_count", &[]),
        4.0
    );
    let ingest = [("method", "/zapflow.v1.IngestService/Ingest")];
    let calls = |code| {
        let labels = [ingest[0], ("code", code)];
        scrape.value("zapflow_grpc_requests_total", &labels)
    };
    assert_eq!((calls("OK"), calls("NOT_FOUND")), (3.0, 1.0));
    let ingest_batches = [("queue", "ingest")];
    let runs_committed = scrape.value("zapflow_group_commit_batch_size_sum", &ingest_batches);
    assert_eq!(runs_committed, 3.0);
    // The embedded database counts the writes each of its commits held.
    let writer = [("queue", "sqlite_writer")];
    let commits = scrape.value("zapflow_group_commit_batch_size_count", &writer);
    let writes = scrape.value("zapflow_group_commit_batch_size_sum", &writer);
    if distributed {
        assert_eq!(commits, 0.0);
    } else {
        assert!(
            commits > 0.0 && writes >= commits,
            "{commits} commits, {writes} writes"
        );
    }
    assert_eq!(scrape.value("zapflow_ready", &[]), 1.0);
    // Logs are JSON lines; one inside a step names its run, zap and step.
    let log = std::fs::read_to_string(setup.dir.join("all.log")).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).expect("every log line is JSON"))
        .collect();
    let retrying = lines
        .iter()
        .find(|line| line["message"] == "step failed; retrying")
        .expect("the retry is logged");
    let http_run = accepted.last().unwrap();
    assert_eq!(retrying["run_id"], http_run.as_str(), "{retrying}");
    assert_eq!(
        (retrying["step"].as_u64(), retrying["level"].as_str()),
        (Some(0), Some("WARN"))
    );
    assert!(retrying["zap_id"].is_string(), "{retrying}");
    assert_eq!(scrape.value("zapflow_outbox_due_rows", &[]), 0.0);
    assert!(scrape.value("zapflow_process_resident_memory_bytes", &[]) > 0.0);
    assert!(scrape.value("zapflow_process_open_fds", &[]) > 0.0);
    if distributed {
        // Two emails, the HTTP step's two attempts and its dead letter.
        assert_eq!(scrape.value("zapflow_outbox_relayed_total", &[]), 5.0);
        assert_eq!(
            scrape.value("zapflow_outbox_relay_failures_total", &[]),
            0.0
        );
        // Lag is reported every few seconds from offsets committed every
        // second: a report may predate the last commit, the next one not.
        return eventually("the consumer lag to fall to 0", START_TIMEOUT, || async {
            let scrape = zapflow.scrape().await;
            let caught_up = scrape.has("zapflow_consumer_lag")
                && scrape.value("zapflow_consumer_lag", &[]) == 0.0;
            caught_up.then_some(scrape)
        })
        .await;
    }
    scrape
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_metrics_count_what_happened() {
    counters_follow_the_scenario(Setup::embedded(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_metrics_count_what_happened_and_feed_the_dashboard() {
    let scrape = counters_follow_the_scenario(Setup::distributed(None).await, true).await;
    // Every metric the dashboard queries is in the scrape.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/grafana/dashboards/zapflow.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard has its queries");
    let mut queried: Vec<String> = exprs.iter().flat_map(|expr| metric_names(expr)).collect();
    queried.sort();
    queried.dedup();
    let missing: Vec<&String> = queried.iter().filter(|name| !scrape.has(name)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no scrape has: {missing:?}"
    );
}

fn collect_exprs(value: &Value, exprs: &mut Vec<String>) {
    match value {
        Value::Object(fields) => {
            for (name, field) in fields {
                match (name.as_str(), field) {
                    ("expr", Value::String(expr)) => exprs.push(expr.clone()),
                    _ => collect_exprs(field, exprs),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, exprs)),
        _ => {}
    }
}

/// The `zapflow_...` names a PromQL expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("zapflow_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Spans an OTLP collector received.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|resource| resource.scope_spans)
            .flat_map(|scope| scope.spans);
        self.spans.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        address
    }

    fn trace(&self, trace_id: &[u8]) -> Vec<Span> {
        let spans = self.spans.lock().unwrap();
        spans
            .iter()
            .filter(|span| span.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// A webhook sent with a `traceparent` whose zap calls an HTTP target and
/// then sends an email: the collector receives one trace from the sender's
/// span to the email, every span under the one that caused it, and the
/// HTTP target is called with the trace's context.
async fn one_trace_per_run(setup: Setup, distributed: bool) {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let smtp = SmtpSink::start().await;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let target = {
        let seen = seen.clone();
        serve(axum::Router::new().fallback(move |headers: HeaderMap| {
            let seen = seen.clone();
            async move {
                if let Some(value) = headers.get("traceparent") {
                    seen.lock()
                        .unwrap()
                        .push(value.to_str().unwrap().to_owned());
                }
                StatusCode::OK
            }
        }))
        .await
    };
    let setup = setup
        .with("ZAPFLOW_SMTP_URL", smtp.url())
        .with("ZAPFLOW_OTLP_ENDPOINT", format!("http://{endpoint}"))
        .with("OTEL_BSP_SCHEDULE_DELAY", "100");
    let key = setup.create_user().await;
    let zapflow = setup.spawn("all");
    zapflow.wait_ready("zapflow to be ready").await;
    let mut zaps = setup.zaps().await;
    let call = http_action("POST", &format!("http://{target}/hook"));
    let mail = email_action("{{ trigger.to }}", "traced", "b");
    let url = create_zap(&mut zaps, &key, "traced", vec![call, mail]).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let sender_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{sender_span}-01");
    let (status, _) = post(&url, &[("traceparent", &traceparent)]).await;
    assert_eq!(status, 202);
    smtp.wait_for(1, RUNS_TIMEOUT).await;

    let trace_bytes = hex(trace_id);
    let expected = match distributed {
        true => &[
            WEBHOOK, INGEST, "commit", "relay", "step", "http", "relay", "step", "smtp",
        ][..],
        false => &[WEBHOOK, INGEST, "commit", "step", "http", "step", "smtp"][..],
    };
    let spans = eventually(
        "the run's spans to reach the collector",
        RUNS_TIMEOUT,
        || async {
            let spans = collector.trace(&trace_bytes);
            (spans.len() >= expected.len() && spans.iter().any(|span| span.name == "smtp"))
                .then_some(spans)
        },
    )
    .await;
    let by_id: HashMap<&[u8], &Span> = spans
        .iter()
        .map(|span| (span.span_id.as_slice(), span))
        .collect();
    // From the email up to the webhook, each span under its cause.
    let smtp_span = spans.iter().find(|span| span.name == "smtp").unwrap();
    let mut chain = vec![smtp_span];
    while let Some(parent) = by_id.get(chain.last().unwrap().parent_span_id.as_slice()) {
        chain.push(parent);
    }
    let names: Vec<&str> = chain.iter().rev().map(|span| span.name.as_str()).collect();
    let expected_chain: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|name| *name != "http")
        .collect();
    assert_eq!(names, expected_chain, "every span of {spans:#?}");
    // The webhook continues the sender's trace.
    assert_eq!(chain.last().unwrap().parent_span_id, hex(sender_span));
    // The HTTP call sits under the first step and passed the trace on.
    let http = spans.iter().find(|span| span.name == "http").unwrap();
    assert_eq!(by_id[http.parent_span_id.as_slice()].name, "step");
    let sent = seen.lock().unwrap().clone();
    let http_span: String = http
        .span_id
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    assert_eq!(sent, [format!("00-{trace_id}-{http_span}-01")]);
    drop(zapflow);
}

const WEBHOOK: &str = "webhook";
/// The server span of the gateway's call, named after the method.
const INGEST: &str = "zapflow.v1.IngestService/Ingest";

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_runs_are_one_trace() {
    one_trace_per_run(Setup::embedded(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_runs_are_one_trace() {
    one_trace_per_run(Setup::distributed(None).await, true).await;
}

/// A worker and a relay, each in its own process, turn unready while their
/// broker is down and ready again when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_relays_are_ready_only_with_their_broker() {
    let mut broker = PrivateBroker::start().await;
    let setup = Setup::distributed(Some(broker.brokers())).await;
    setup.create_user().await;
    let worker = setup.spawn("worker");
    let relay = setup.spawn("processor");
    worker.wait_ready("the worker to be ready").await;
    relay.wait_ready("the relay to be ready").await;

    broker.stop().await;
    let why = worker
        .wait_unready("the worker to be unready", "broker")
        .await;
    assert!(!why.contains("database"), "{why}");
    relay
        .wait_unready("the relay to be unready", "broker")
        .await;
    assert_eq!(
        worker.get("/livez").await.unwrap().0,
        200,
        "alive all along"
    );
    assert_eq!(worker.scrape().await.value("zapflow_ready", &[]), 0.0);

    broker.restart().await;
    worker.wait_ready("the worker to be ready again").await;
    relay.wait_ready("the relay to be ready again").await;
}

/// A gateway in a process of its own is ready only while the API answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_is_ready_only_with_its_api() {
    let setup = Setup::embedded();
    setup.create_user().await;
    let api = setup.spawn("api");
    let gateway = setup.spawn("gateway");
    gateway.wait_ready("the gateway to be ready").await;

    drop(api);
    gateway
        .wait_unready("the gateway to be unready", "api:")
        .await;

    let _api = setup.spawn("api");
    gateway.wait_ready("the gateway to be ready again").await;
}
