//! Every metric zapflow exports: its name, and its help text in the
//! scrape. Names carry the `zapflow_` prefix; labels never name a zap or a
//! user, so a scrape stays the same size whatever the number of zaps.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Webhooks the gateway answered, by `status` (the HTTP code).
pub const WEBHOOKS: &str = "zapflow_webhooks_total";
/// Webhooks refused by a rate limit, by `limit` (`zap` or `ip`).
pub const RATE_LIMIT_REFUSALS: &str = "zapflow_rate_limit_refusals_total";
/// From an ingest call's arrival to its run being committed.
pub const INGEST_DURATION: &str = "zapflow_ingest_duration_seconds";
/// Operations sharing one transaction, by `queue`.
pub const GROUP_COMMIT_BATCH_SIZE: &str = "zapflow_group_commit_batch_size";
/// Outbox rows due now and not taken yet.
pub const OUTBOX_DUE_ROWS: &str = "zapflow_outbox_due_rows";
/// How long the oldest due outbox row has been due.
pub const OUTBOX_OLDEST_DUE_AGE: &str = "zapflow_outbox_oldest_due_age_seconds";
/// Outbox rows published to Kafka.
pub const OUTBOX_RELAYED: &str = "zapflow_outbox_relayed_total";
/// Publishing attempts that failed (the rows stay and are tried again).
pub const OUTBOX_RELAY_FAILURES: &str = "zapflow_outbox_relay_failures_total";
/// Messages behind the end of a partition this worker consumes, by
/// `topic` and `partition`.
pub const CONSUMER_LAG: &str = "zapflow_consumer_lag";
/// Step attempts that ended, by `action` and `outcome`.
pub const STEPS_FINISHED: &str = "zapflow_steps_finished_total";
/// How long one step attempt took, by `action`.
pub const STEP_DURATION: &str = "zapflow_step_duration_seconds";
/// Attempts scheduled after a transient failure, by `action`.
pub const STEP_RETRIES_SCHEDULED: &str = "zapflow_step_retries_scheduled_total";
/// Steps that failed for good, by `action`.
pub const DEAD_LETTERS: &str = "zapflow_dead_letters_total";
/// gRPC calls answered, by `method` and `code`.
pub const GRPC_REQUESTS: &str = "zapflow_grpc_requests_total";
/// gRPC call latency, by `method`.
pub const GRPC_REQUEST_DURATION: &str = "zapflow_grpc_request_duration_seconds";
/// 1 while the process is ready, else 0.
pub const READY: &str = "zapflow_ready";

/// Latency buckets, in seconds: from half a millisecond to a minute.
const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Batch-size buckets: powers of two up to the largest batch.
const BATCH_SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

struct Exporter {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Installs the process's metrics recorder (once; later calls do nothing).
pub fn install() {
    exporter();
}

fn exporter() -> &'static Exporter {
    EXPORTER.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
            .and_then(|builder| {
                builder.set_buckets_for_metric(
                    Matcher::Full(GROUP_COMMIT_BATCH_SIZE.into()),
                    BATCH_SIZES,
                )
            })
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed (a test of several stacks in
        // one process): this handle then renders nothing of theirs.
        let _ = metrics::set_global_recorder(recorder);
        let process = metrics_process::Collector::new("zapflow_");
        process.describe();
        describe();
        Exporter { handle, process }
    })
}

/// The scrape: every metric in the Prometheus text format.
pub fn render() -> String {
    let exporter = exporter();
    exporter.process.collect();
    exporter.handle.render()
}

fn describe() {
    describe_counter!(
        WEBHOOKS,
        "Webhooks the gateway answered, by HTTP status code."
    );
    describe_counter!(
        RATE_LIMIT_REFUSALS,
        "Webhooks refused by a rate limit (zap or ip)."
    );
    describe_histogram!(
        INGEST_DURATION,
        metrics::Unit::Seconds,
        "From an ingest call's arrival to its run being committed."
    );
    describe_histogram!(
        GROUP_COMMIT_BATCH_SIZE,
        "Operations that shared one database transaction, by queue."
    );
    describe_gauge!(OUTBOX_DUE_ROWS, "Outbox rows due now and not taken yet.");
    describe_gauge!(
        OUTBOX_OLDEST_DUE_AGE,
        metrics::Unit::Seconds,
        "How long the oldest due outbox row has been due (0 when none is)."
    );
    describe_counter!(OUTBOX_RELAYED, "Outbox rows published to Kafka.");
    describe_counter!(
        OUTBOX_RELAY_FAILURES,
        "Failed attempts to publish an outbox row (the row is tried again)."
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Messages behind the end of each partition this worker consumes."
    );
    describe_counter!(
        STEPS_FINISHED,
        "Step attempts that ended, by action type and outcome."
    );
    describe_histogram!(
        STEP_DURATION,
        metrics::Unit::Seconds,
        "How long one step attempt took, by action type."
    );
    describe_counter!(
        STEP_RETRIES_SCHEDULED,
        "Attempts scheduled after a transient failure, by action type."
    );
    describe_counter!(DEAD_LETTERS, "Steps that failed for good, by action type.");
    describe_counter!(
        GRPC_REQUESTS,
        "gRPC calls answered, by method and status code."
    );
    describe_histogram!(
        GRPC_REQUEST_DURATION,
        metrics::Unit::Seconds,
        "gRPC call latency, by method."
    );
    describe_gauge!(READY, "1 while the process is ready (see /readyz), else 0.");
}
