//! Everything a zapflow process is started with, typed.

use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use zapflow_actions::{DEFAULT_MAX_RECIPIENTS, EmailSettings, HttpSettings};
use zapflow_api::ApiSettings;
use zapflow_bus::BusSettings;
use zapflow_core::delivery::{DEFAULT_MAX_DEPTH, DeliveryLimits};
use zapflow_gateway::{GatewaySettings, RateLimit};
use zapflow_processor::RelaySettings;
use zapflow_worker::WorkerSettings;

/// How long a worker may go without asking the broker for events before
/// the group hands its partitions on: well above one action, so that a
/// worker with every permit taken by slow steps keeps its membership.
pub const CONSUMER_MAX_POLL_INTERVAL: Duration = Duration::from_secs(300);

/// How long a worker's dead letter (an event it cannot read) may wait for
/// the broker's acknowledgement before it is sent again.
pub const DEAD_LETTER_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The settings of every role; each role reads its own part.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The gRPC API. Its `broker` is set at start: the broker when this
    /// process also relays or consumes (health then waits for it too),
    /// none otherwise.
    pub api: ApiSettings,
    pub gateway: GatewaySettings,
    /// Where a gateway without the API in its process reaches IngestService
    /// (with `api.ingest_token` and `api.max_message_bytes`).
    pub ingest_url: String,
    /// Kafka, for the distributed deployment; without, workers lease due
    /// outbox rows from the database themselves.
    pub bus: Option<BusSettings>,
    /// The workers' consumer group on Kafka.
    pub consumer_group: String,
    /// The processor's relay; its poll interval is also how often workers
    /// without Kafka look for due rows without a wake-up.
    pub relay: RelaySettings,
    pub worker: WorkerSettings,
    /// How the email action sends.
    pub email: EmailSettings,
    /// What the HTTP action may reach.
    pub http: HttpSettings,
    /// How long dead letters are kept; `None` keeps them for good.
    pub dead_letter_retention: Option<Duration>,
    /// Relays the processor role runs; they share the outbox.
    pub processors: usize,
    /// Workers the worker role runs: each a member of the consumer group,
    /// or a leaser of outbox rows, with `worker.concurrency` steps at once.
    pub workers: usize,
}

impl Default for Settings {
    /// What `zapflow` runs with when given nothing: one machine, loopback
    /// addresses, the embedded mailbox under `data/`.
    fn default() -> Self {
        const MIB: usize = 1024 * 1024;
        let request_timeout = Duration::from_secs(30);
        let worker = WorkerSettings::default();
        Self {
            api: ApiSettings {
                public_url: "http://127.0.0.1:8080".into(),
                max_message_bytes: 4 * MIB,
                request_timeout,
                broker: None,
                delivery: DeliveryLimits {
                    max_body_bytes: MIB,
                    max_depth: DEFAULT_MAX_DEPTH,
                },
                ingest_token: None,
            },
            gateway: GatewaySettings {
                body_limit: MIB,
                request_timeout,
                per_zap_limit: Some(RateLimit {
                    per_second: 500.0,
                    burst: 1000,
                }),
                per_ip_limit: Some(RateLimit {
                    per_second: 1000.0,
                    burst: 2000,
                }),
            },
            ingest_url: "http://127.0.0.1:50052".into(),
            bus: None,
            consumer_group: "zapflow-workers".into(),
            relay: RelaySettings {
                batch_size: 500,
                poll_interval: Duration::from_secs(1),
                delivery_timeout: Duration::from_secs(30),
            },
            email: EmailSettings {
                smtp_url: None,
                mailbox_dir: PathBuf::from("data/mailbox"),
                from: "zapflow <zapflow@localhost>".into(),
                timeout: worker.action_timeout,
                max_recipients: DEFAULT_MAX_RECIPIENTS,
            },
            worker,
            http: HttpSettings::default(),
            dead_letter_retention: Some(Duration::from_secs(30 * 24 * 60 * 60)),
            processors: 1,
            workers: 1,
        }
    }
}

impl Settings {
    /// What one webhook delivery may carry: the gateway refuses a larger
    /// body before reading it, and the API holds deliveries from any
    /// gateway to the same limits.
    pub fn with_delivery_limits(mut self, limits: DeliveryLimits) -> Self {
        self.gateway.body_limit = limits.max_body_bytes;
        self.api.delivery = limits;
        self
    }
}

/// The sockets a process serves on, bound by the caller (tests bind port
/// 0 and read the addresses).
#[derive(Debug, Default)]
pub struct Listeners {
    /// ZapService and its health; the API role needs it.
    pub grpc: Option<TcpListener>,
    /// IngestService for gateways in other processes. Without it, only a
    /// gateway in this process reaches the API's ingest.
    pub ingest: Option<TcpListener>,
    /// The webhook gateway; the gateway role needs it.
    pub http: Option<TcpListener>,
    /// `/metrics`, `/livez` and `/readyz`, whatever the roles; none
    /// without it.
    pub admin: Option<TcpListener>,
}
