//! The figures of a run, and the plain-text tables they are printed as.

use std::time::{Duration, Instant};

use crate::cluster::{CpuClock, Deployment, Settings, Stopped, Usage};
use crate::load::{Phase, Sent};
use crate::mail::{Anomalies, MIN_INTERVAL};
use crate::sync_check::CommitRate;

/// The ~rate at which the test broker consumes on the reference machine;
/// quoted, not measured here.
const BROKER_NOTE: &str = "The test broker tansu (SQLite storage) consumes only ~2,000 msg/s on this machine: \
                           it bounds the distributed end-to-end figures.";
/// Measured with tansu 0.6 and librdkafka: a message produced while a fetch
/// waits reaches the consumer ~460 ms later with librdkafka's default
/// fetch.wait.max.ms of 500, ~17 ms with 10; workers use 20.
const FETCH_NOTE: &str = "tansu answers a waiting consumer fetch only when fetch.wait.max.ms runs out \
                          (20 ms in zapflow's workers), not when a message arrives; Kafka answers at once.";

/// What the warm-up showed.
#[derive(Debug, Clone)]
pub struct WarmUp {
    /// From the first POST to its email: includes the worker joining its
    /// consumer group and every connection being opened.
    pub first_email: Duration,
}

/// Webhooks sent one at a time, each after the previous one's email.
#[derive(Debug, Clone)]
pub struct Unloaded {
    pub webhooks: usize,
    /// POST to the email at the sink.
    pub end_to_end: Option<Percentiles>,
}

/// Nearest-rank percentiles of a set of durations.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Percentiles {
    pub fn of(mut values: Vec<Duration>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_unstable();
        let rank =
            |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Some(Self {
            p50: rank(0.50),
            p99: rank(0.99),
            max: values[values.len() - 1],
        })
    }
}

/// The figures of one phase.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    pub phase: Phase,
    pub requests: usize,
    pub accepted: usize,
    pub first_error: Option<String>,
    /// From the first POST to the last answer.
    pub sending: Duration,
    /// POST to 202, over accepted webhooks.
    pub accept_latency: Option<Percentiles>,
    pub delivered: usize,
    /// POST to the email at the sink, over delivered webhooks.
    pub end_to_end: Option<Percentiles>,
    /// From the phase's first POST to its last email.
    pub delivery_span: Duration,
    /// From the phase's last answer to its last email.
    pub drain: Duration,
}

impl PhaseResult {
    /// `arrivals` belong to `accepted`, the sequence numbers answered 202,
    /// in order.
    pub fn new(
        phase: Phase,
        started: Instant,
        sent: Sent,
        accepted: &[u64],
        arrivals: Vec<Option<Instant>>,
    ) -> Self {
        let accepted_samples: Vec<_> = sent
            .samples
            .iter()
            .filter(|sample| sample.accepted)
            .collect();
        debug_assert!(
            accepted_samples
                .iter()
                .map(|s| s.sequence)
                .eq(accepted.iter().copied())
        );
        let first_post = sent
            .samples
            .iter()
            .map(|s| s.sent_at)
            .min()
            .unwrap_or(started);
        let last_answer = sent
            .samples
            .iter()
            .map(|s| s.sent_at + s.latency)
            .max()
            .unwrap_or(started);
        let delays: Vec<Duration> = accepted_samples
            .iter()
            .zip(&arrivals)
            .filter_map(|(sample, arrival)| {
                Some(arrival.as_ref()?.saturating_duration_since(sample.sent_at))
            })
            .collect();
        let last_email = arrivals.iter().flatten().max().copied();
        Self {
            phase,
            requests: sent.samples.len(),
            accepted: accepted_samples.len(),
            first_error: sent.first_error,
            sending: sent.elapsed,
            accept_latency: Percentiles::of(accepted_samples.iter().map(|s| s.latency).collect()),
            delivered: delays.len(),
            end_to_end: Percentiles::of(delays),
            delivery_span: last_email.map_or(Duration::ZERO, |last| {
                last.saturating_duration_since(first_post)
            }),
            drain: last_email.map_or(Duration::ZERO, |last| {
                last.saturating_duration_since(last_answer)
            }),
        }
    }
}

/// Everything printed after the run.
#[derive(Debug)]
pub struct Report {
    pub deployment: Deployment,
    pub warm_up: WarmUp,
    pub unloaded: Unloaded,
    pub phases: Vec<PhaseResult>,
    pub anomalies: Anomalies,
    pub usage: Vec<(&'static str, Usage)>,
    pub own_usage: Usage,
    /// CPU time outside the roles while measuring (from the warm-up to the
    /// last phase's last email), which took `measured_for`.
    pub other_cpu: CpuClock,
    pub measured_for: Duration,
    pub stopped: Vec<Stopped>,
}

/// `sink_capacity`: messages per second the sink took alone from
/// `sink_senders` connections; `store_commits`: how fast the deployment's
/// store took one-row commits alone.
pub fn print_setup(
    settings: &Settings,
    sink_capacity: f64,
    sink_senders: usize,
    store_commits: CommitRate,
) {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let deployment = settings.deployment;
    println!("zapflow {} benchmark", deployment.name());
    println!(
        "  processes {}: one process each of {}",
        deployment.roles().join(", "),
        settings.binary.display()
    );
    match &settings.database_url {
        Some(url) => println!("  database  {url}"),
        None => println!("  database  SQLite in {}", settings.work_dir.display()),
    }
    if deployment == Deployment::Distributed {
        println!(
            "  broker    {} (topics {}, {})",
            settings.kafka_brokers, settings.events_topic, settings.dead_letter_topic
        );
    }
    println!(
        "  smtp      in-process sink at {} (alone, it takes {sink_capacity:.0} messages/s from {sink_senders} connections)",
        settings.smtp_url
    );
    println!(
        "  gateway   rate limits off (ZAPFLOW_ZAP_RATE_LIMIT=0, ZAPFLOW_IP_RATE_LIMIT=0); other settings default"
    );
    println!(
        "  disk      {:.0} one-row commits/s to {}, each synced before the next ({:.0} µs each): \
         a ceiling for accepted/s at concurrency 1",
        store_commits.per_second(),
        store_commits.store,
        store_commits.each().as_secs_f64() * 1e6,
    );
    println!("  logs      {}", settings.work_dir.display());
    println!(
        "  cpus      {cpus}, shared by the roles, PostgreSQL, the broker and this load generator"
    );
    println!();
}

pub fn print(report: &Report) {
    println!(
        "Warm-up: first email {} after its POST (worker joining its consumer group, connections opening)",
        seconds(report.warm_up.first_email)
    );
    println!();

    if report.unloaded.webhooks > 0 {
        let delay = report.unloaded.end_to_end;
        println!(
            "Unloaded: {} webhooks one at a time, each after the previous email; POST -> email p50 {} ms, p99 {} ms, max {} ms",
            report.unloaded.webhooks,
            millis(delay.map(|p| p.p50)),
            millis(delay.map(|p| p.p99)),
            millis(delay.map(|p| p.max)),
        );
        println!();
    }

    println!("Accepted webhooks (POST -> 202 Accepted)");
    println!(
        "{:>11} {:>9} {:>7} {:>9} {:>11} {:>9} {:>9} {:>9}",
        "concurrency", "requests", "errors", "elapsed", "accepted/s", "p50 ms", "p99 ms", "max ms"
    );
    for result in &report.phases {
        let latency = result.accept_latency;
        println!(
            "{:>11} {:>9} {:>7} {:>9} {:>11.1} {:>9} {:>9} {:>9}",
            result.phase.concurrency,
            result.requests,
            result.requests - result.accepted,
            seconds(result.sending),
            per_second(result.accepted, result.sending),
            millis(latency.map(|p| p.p50)),
            millis(latency.map(|p| p.p99)),
            millis(latency.map(|p| p.max)),
        );
    }
    println!();

    println!("End to end (POST -> email at the SMTP sink)");
    println!(
        "{:>11} {:>9} {:>7} {:>9} {:>11} {:>9} {:>9} {:>9}",
        "concurrency", "emails", "missing", "drain", "emails/s", "p50 ms", "p99 ms", "max ms"
    );
    for result in &report.phases {
        let delay = result.end_to_end;
        println!(
            "{:>11} {:>9} {:>7} {:>9} {:>11.1} {:>9} {:>9} {:>9}",
            result.phase.concurrency,
            result.delivered,
            result.accepted - result.delivered,
            seconds(result.drain),
            per_second(result.delivered, result.delivery_span),
            millis(delay.map(|p| p.p50)),
            millis(delay.map(|p| p.p99)),
            millis(delay.map(|p| p.max)),
        );
    }
    println!("  emails/s: the phase's emails over the time from its first POST to its last email.");
    println!("  drain: from the phase's last 202 to its last email.");
    let (shortest, longest) = (
        MIN_INTERVAL.as_millis(),
        report.anomalies.max_interval.max(MIN_INTERVAL).as_millis(),
    );
    let every = if longest > shortest {
        format!("{shortest}-{longest}")
    } else {
        shortest.to_string()
    };
    println!(
        "  Arrivals are stamped by the sink as each message's last line is read; it was looked at every {every} ms (a look took {:.2} ms on average).",
        report.anomalies.mean_look.as_secs_f64() * 1000.0
    );
    if report.deployment == Deployment::Distributed {
        println!("{}", wrap(BROKER_NOTE, "  ", 100));
        println!("{}", wrap(FETCH_NOTE, "  ", 100));
    }
    if report.anomalies.duplicates > 0 || report.anomalies.unmatched > 0 {
        println!(
            "  The sink also got {} duplicate and {} unrecognised emails.",
            report.anomalies.duplicates, report.anomalies.unmatched
        );
    }
    for result in &report.phases {
        if let Some(error) = &result.first_error {
            println!(
                "  First error at concurrency {}: {error}",
                result.phase.concurrency
            );
        }
    }
    println!();

    println!("Processes at the end (/proc/<pid>/status, /proc/<pid>/stat)");
    println!(
        "{:<30} {:>10} {:>10} {:>10}",
        "process", "VmRSS MiB", "VmHWM MiB", "CPU s"
    );
    let rows = report
        .usage
        .iter()
        .map(|(role, usage)| (format!("zapflow {role}"), usage))
        .chain(std::iter::once((
            "zapflow-bench (load + sink)".to_owned(),
            &report.own_usage,
        )));
    for (name, usage) in rows {
        println!(
            "{:<30} {:>10} {:>10} {:>10}",
            name,
            mebibytes(usage.rss_kib),
            mebibytes(usage.peak_rss_kib),
            usage
                .cpu_seconds
                .map_or("-".to_owned(), |s| format!("{s:.1}")),
        );
    }
    println!();

    print_other_cpu(report.deployment, &report.other_cpu, report.measured_for);

    println!("Shutdown (SIGTERM to every role at once)");
    for stopped in &report.stopped {
        let how = match stopped.status {
            Some(status) => status.to_string(),
            None => "did not stop; killed".to_owned(),
        };
        println!("  {:<10} {:>8}  {how}", stopped.role, seconds(stopped.took));
    }
}

/// `text` in lines of at most `width` characters (longer words stay
/// whole), each starting with `indent`.
fn wrap(text: &str, indent: &str, width: usize) -> String {
    let mut lines = vec![indent.to_owned()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("never empty");
        if line.len() > indent.len() && line.len() + 1 + word.len() > width {
            lines.push(format!("{indent}{word}"));
        } else {
            if line.len() > indent.len() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines.join("\n")
}

fn seconds(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

fn millis(duration: Option<Duration>) -> String {
    duration.map_or("-".to_owned(), |d| {
        format!("{:.1}", d.as_secs_f64() * 1000.0)
    })
}

fn mebibytes(kib: Option<u64>) -> String {
    kib.map_or("-".to_owned(), |kib| format!("{:.1}", kib as f64 / 1024.0))
}

fn per_second(count: usize, over: Duration) -> f64 {
    if over.is_zero() {
        0.0
    } else {
        count as f64 / over.as_secs_f64()
    }
}

/// CPU time the database server, the broker and the whole machine used
/// while measuring, beside the roles' own.
fn print_other_cpu(deployment: Deployment, cpu: &CpuClock, measured_for: Duration) {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "CPU while measuring ({:.1} s; /proc/<pid>/stat, /proc/stat)",
        measured_for.as_secs_f64()
    );
    let rows = match deployment {
        Deployment::Embedded => vec![],
        Deployment::Postgres => vec![("postgres (every server process)", cpu.postgres_seconds)],
        Deployment::Distributed => vec![
            ("postgres (every server process)", cpu.postgres_seconds),
            ("tansu (broker)", cpu.broker_seconds),
        ],
    };
    for (name, seconds) in rows {
        let seconds = seconds.map_or("-".to_owned(), |s| format!("{s:.1}"));
        println!("{name:<52} {seconds:>10}");
    }
    if let Some(seconds) = cpu.machine_seconds {
        let capacity = measured_for.as_secs_f64() * cpus as f64;
        println!(
            "{:<52} {seconds:>10.1}  of {capacity:.1} ({cpus} cpus)",
            "machine (every process)"
        );
    }
    if let Some(seconds) = cpu.stolen_seconds {
        println!(
            "{:<52} {seconds:>10.1}",
            "stolen by the hypervisor for other guests (steal)"
        );
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_at_the_width_with_an_indent() {
        assert_eq!(wrap("aa bb cc", "  ", 7), "  aa bb\n  cc");
        assert_eq!(wrap("toolongword x", "- ", 5), "- toolongword\n- x");
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(values).unwrap();
        assert_eq!(p.p50, Duration::from_millis(50));
        assert_eq!(p.p99, Duration::from_millis(99));
        assert_eq!(p.max, Duration::from_millis(100));
        assert!(Percentiles::of(Vec::new()).is_none());
    }
}
