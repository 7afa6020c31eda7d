//! `zapflow-bench`: starts one deployment of zapflow on this machine (the
//! embedded one, PostgreSQL-only, or distributed with one process per role),
//! sends it webhooks at several concurrencies and measures how fast they are
//! accepted and how long their emails take to reach an SMTP server.
//!
//! The postgres and distributed deployments need PostgreSQL (an empty
//! database, `--database-url`), the distributed one a Kafka-protocol broker
//! (`--kafka-brokers`); `scripts/bench.sh` provides both. Every address it
//! uses is on 127.0.0.1.

mod cluster;
mod load;
mod mail;
mod report;
mod sink_check;
mod sync_check;
mod zap;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use zapflow_testkit::{SmtpSink, unique};

use crate::cluster::{Cluster, Deployment, Settings};
use crate::load::Phase;
use crate::mail::Deliveries;
use crate::report::{Percentiles, PhaseResult, Report, Unloaded, WarmUp};

#[derive(Debug, Parser)]
#[command(
    name = "zapflow-bench",
    about = "Benchmarks a zapflow deployment on this machine"
)]
struct Args {
    /// Which deployment to start.
    #[arg(long, value_enum, default_value = "distributed")]
    deployment: Deployment,
    /// The zapflow binary; by default the one next to this program.
    #[arg(long, env = "ZAPFLOW_BENCH_BINARY")]
    zapflow: Option<PathBuf>,
    /// An empty PostgreSQL database (postgres and distributed); the roles
    /// migrate it.
    #[arg(long, env = "ZAPFLOW_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// The Kafka-protocol broker; topic and group names are fresh each run.
    #[arg(
        long,
        env = "ZAPFLOW_BENCH_KAFKA_BROKERS",
        default_value = "127.0.0.1:19092"
    )]
    kafka_brokers: String,
    /// Webhooks sent one at a time, each after the previous one's email,
    /// for the latency of an unloaded deployment (0 to skip).
    #[arg(long, default_value_t = 200)]
    unloaded: u64,
    /// Load phases as concurrency:requests, run in order; the last, long
    /// one measures sustained throughput.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1:2000,16:3000,64:3000,64:20000"
    )]
    phases: Vec<Phase>,
    /// Longest a phase keeps sending, in seconds.
    #[arg(long, default_value_t = 60)]
    phase_time_limit: u64,
    /// Longest wait for a phase's emails after its last answer, in seconds.
    #[arg(long, default_value_t = 90)]
    drain_timeout: u64,
    /// Where the roles' logs go; a new temporary directory by default.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// Webhooks sent, after the first, to warm connections and caches.
const WARM_UP_REQUESTS: u64 = 100;
/// The sink is checked alone first: this many messages from this many
/// senders, as many as zapflow's mailer keeps connections.
const SINK_CHECK_MESSAGES: usize = 20_000;
const SINK_CHECK_SENDERS: usize = 64;
/// Longest wait for the first email; it includes the worker joining its
/// consumer group.
const FIRST_EMAIL_TIMEOUT: Duration = Duration::from_secs(60);

/// The load, the SMTP sink and the watcher share one thread, as `wrk -t1`
/// sends from one: on two cores every CPU second the harness spends is one
/// the deployment cannot, and a second thread only adds wake-ups between
/// the two (it took 40% more CPU seconds for the same run). The sink alone
/// still takes several times the deployment's email rate (see the setup's
/// `smtp` line).
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let binary = match &args.zapflow {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("locating this program's directory")?
            .join("zapflow"),
    };
    if !binary.is_file() {
        bail!(
            "no zapflow binary at {} (build it with `cargo build --release -p zapflow`, or pass --zapflow)",
            binary.display()
        );
    }
    let work_dir = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(unique("zapflow-bench")),
    };
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;

    let database_url = match args.deployment {
        Deployment::Embedded => None,
        Deployment::Postgres | Deployment::Distributed => Some(
            args.database_url
                .clone()
                .context("the postgres and distributed deployments need --database-url")?,
        ),
    };
    let sink = Arc::new(SmtpSink::start().await);
    let sink_capacity =
        sink_check::messages_per_second(&sink, SINK_CHECK_SENDERS, SINK_CHECK_MESSAGES).await?;
    let store_commits = match &database_url {
        Some(url) => sync_check::postgres(url, sync_check::COMMITS).await?,
        None => {
            let dir = work_dir.clone();
            tokio::task::spawn_blocking(move || sync_check::sqlite(&dir, sync_check::COMMITS))
                .await??
        }
    };
    let settings = Settings {
        binary,
        deployment: args.deployment,
        database_url,
        kafka_brokers: args.kafka_brokers.clone(),
        smtp_url: sink.url(),
        events_topic: unique("bench-events"),
        dead_letter_topic: unique("bench-events-dlq"),
        consumer_group: unique("bench-workers"),
        work_dir,
    };
    report::print_setup(&settings, sink_capacity, SINK_CHECK_SENDERS, store_commits);

    let mut cluster = tokio::select! {
        cluster = Cluster::start(&settings) => cluster.context("starting the deployment")?,
        () = interrupted() => bail!("interrupted while starting"),
    };
    let clock = cluster::CpuClock::read();
    let started = Instant::now();
    let measured = tokio::select! {
        measured = measure(&args, &mut cluster, sink.clone()) => measured,
        () = interrupted() => Err(anyhow!("interrupted")),
    };
    let other_cpu = cluster::CpuClock::read().since(clock);
    let measured_for = started.elapsed();
    let usage = cluster.usage();
    let own_usage = cluster::usage("self");
    let alive = cluster.check_alive();
    let stopped = cluster.stop().await;

    let (warm_up, unloaded, phases, anomalies) = measured.inspect_err(|_| {
        for role in settings.deployment.roles() {
            let log = settings.work_dir.join(format!("{role}.log"));
            eprintln!(
                "--- the end of {}:\n{}",
                log.display(),
                cluster::log_tail(&log, 10)
            );
        }
    })?;
    report::print(&Report {
        deployment: settings.deployment,
        warm_up,
        unloaded,
        phases,
        anomalies,
        usage,
        own_usage,
        other_cpu,
        measured_for,
        stopped,
    });
    alive.context("a role died during the run")
}

/// Creates the zap, warms up, then runs each phase and waits for its emails.
async fn measure(
    args: &Args,
    cluster: &mut Cluster,
    sink: Arc<SmtpSink>,
) -> Result<(WarmUp, Unloaded, Vec<PhaseResult>, mail::Anomalies)> {
    let webhook_url = zap::create(&cluster.grpc_url(), &cluster.api_key).await?;
    let webhook_host = reqwest::Url::parse(&webhook_url)?
        .host_str()
        .map(str::to_owned);
    if webhook_host.as_deref() != Some("127.0.0.1") {
        bail!("the webhook URL {webhook_url} does not point at 127.0.0.1");
    }
    let deliveries = Deliveries::watch(sink);
    let max_concurrency = args
        .phases
        .iter()
        .map(|phase| phase.concurrency)
        .max()
        .unwrap_or(1);
    let client = load::client(max_concurrency)?;
    let phase_time_limit = Duration::from_secs(args.phase_time_limit);
    let drain_timeout = Duration::from_secs(args.drain_timeout);
    let mut next_sequence = 0;

    // The first email pays for the consumer group forming and every
    // connection being opened; it is reported on its own.
    let first_email = one_webhook(
        &client,
        &webhook_url,
        &deliveries,
        next_sequence,
        phase_time_limit,
        FIRST_EMAIL_TIMEOUT,
    )
    .await
    .context("the first webhook")?;
    next_sequence += 1;
    let warm = Phase {
        concurrency: 4,
        requests: WARM_UP_REQUESTS,
    };
    let warm_sent = load::send(&client, &webhook_url, warm, next_sequence, phase_time_limit).await;
    next_sequence += warm.requests;
    let warm_sequence: Vec<u64> = warm_sent
        .samples
        .iter()
        .map(|sample| sample.sequence)
        .collect();
    deliveries.wait_for(&warm_sequence, drain_timeout).await;
    let warm_up = WarmUp { first_email };
    cluster.check_alive()?;

    // One at a time: nothing else in flight, each email before the next POST.
    let mut unloaded = Vec::new();
    for _ in 0..args.unloaded {
        let delay = one_webhook(
            &client,
            &webhook_url,
            &deliveries,
            next_sequence,
            phase_time_limit,
            drain_timeout,
        )
        .await
        .context("an unloaded webhook")?;
        unloaded.push(delay);
        next_sequence += 1;
    }
    cluster.check_alive()?;

    let mut results = Vec::new();
    for phase in &args.phases {
        let started = Instant::now();
        let sent = load::send(
            &client,
            &webhook_url,
            *phase,
            next_sequence,
            phase_time_limit,
        )
        .await;
        next_sequence += phase.requests;
        let accepted: Vec<u64> = sent
            .samples
            .iter()
            .filter(|sample| sample.accepted)
            .map(|sample| sample.sequence)
            .collect();
        let arrivals = deliveries.wait_for(&accepted, drain_timeout).await;
        results.push(PhaseResult::new(*phase, started, sent, &accepted, arrivals));
        cluster.check_alive()?;
    }
    let unloaded = Unloaded {
        webhooks: unloaded.len(),
        end_to_end: Percentiles::of(unloaded),
    };
    Ok((warm_up, unloaded, results, deliveries.anomalies()))
}

/// Sends webhook `sequence` alone and waits for its email; returns the
/// time from its POST to the email.
async fn one_webhook(
    client: &reqwest::Client,
    webhook_url: &str,
    deliveries: &Deliveries,
    sequence: u64,
    time_limit: Duration,
    email_timeout: Duration,
) -> Result<Duration> {
    let sent = load::send(client, webhook_url, Phase::single(), sequence, time_limit).await;
    if let Some(error) = &sent.first_error {
        bail!("not accepted: {error}");
    }
    let arrival = deliveries.wait_for(&[sequence], email_timeout).await[0]
        .with_context(|| format!("its email did not arrive within {email_timeout:?}"))?;
    Ok(arrival.saturating_duration_since(sent.samples[0].sent_at))
}

/// SIGINT or SIGTERM.
async fn interrupted() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
