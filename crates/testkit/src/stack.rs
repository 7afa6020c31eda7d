//! zapflow inside the test process, started as the binary starts it, on
//! ports chosen by the OS.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::Channel;
use zapflow_actions::{EmailSettings, HttpSettings};
use zapflow_api::ApiSettings;
use zapflow_bus::BusSettings;
use zapflow_core::delivery::DeliveryLimits;
use zapflow_gateway::GatewaySettings;
use zapflow_processor::RelaySettings;
use zapflow_proto::v1::zap_service_client::ZapServiceClient;
use zapflow_server::{ALL_ROLES, Listeners, Server, Settings};
use zapflow_store::Store;
use zapflow_worker::WorkerSettings;

/// What a test may change about the stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub smtp_url: Option<String>,
    /// Non-public ranges the HTTP action may reach (127.0.0.0/8 for a
    /// target in the test).
    pub http_allow_cidrs: Vec<zapflow_actions::IpNet>,
    pub worker: WorkerSettings,
    pub body_limit: usize,
    pub per_zap_limit: Option<zapflow_gateway::RateLimit>,
    pub per_ip_limit: Option<zapflow_gateway::RateLimit>,
    /// Relays to run (they share the outbox).
    pub processors: usize,
    /// Workers to run (members of one consumer group, or leasers of the
    /// outbox without a broker).
    pub workers: usize,
    /// The workers' consumer group; a fresh one when `None`.
    pub consumer_group: Option<String>,
    /// Deepest JSON nesting a webhook body may have.
    pub max_json_depth: usize,
    /// The shared secret IngestService asks of callers on its listener.
    pub ingest_token: Option<String>,
    /// How often relays and local workers look for due outbox rows without
    /// a wake-up.
    pub poll_interval: Duration,
}

impl Default for StackOptions {
    /// `zapflow`'s defaults, but for what tests want otherwise: no rate
    /// limits, a short poll.
    fn default() -> Self {
        let defaults = Settings::default();
        Self {
            smtp_url: None,
            http_allow_cidrs: Vec::new(),
            worker: defaults.worker,
            body_limit: defaults.gateway.body_limit,
            per_zap_limit: None,
            per_ip_limit: None,
            processors: 1,
            workers: 1,
            consumer_group: None,
            max_json_depth: defaults.api.delivery.max_depth,
            ingest_token: None,
            poll_interval: Duration::from_millis(200),
        }
    }
}

impl StackOptions {
    /// What `zapflow` runs with by default, changed as the test asks.
    fn settings(&self, bus: Option<BusSettings>, http_address: SocketAddr) -> Settings {
        let defaults = Settings::default();
        Settings {
            api: ApiSettings {
                public_url: format!("http://{http_address}"),
                ingest_token: self.ingest_token.clone(),
                ..defaults.api
            },
            gateway: GatewaySettings {
                per_zap_limit: self.per_zap_limit,
                per_ip_limit: self.per_ip_limit,
                ..defaults.gateway
            },
            bus,
            consumer_group: self
                .consumer_group
                .clone()
                .unwrap_or_else(|| crate::unique("zapflow-workers")),
            relay: RelaySettings {
                poll_interval: self.poll_interval,
                ..defaults.relay
            },
            worker: self.worker.clone(),
            email: EmailSettings {
                smtp_url: self.smtp_url.clone(),
                mailbox_dir: std::env::temp_dir().join(crate::unique("zapflow-mailbox")),
                timeout: self.worker.action_timeout,
                ..defaults.email
            },
            http: HttpSettings {
                allow_cidrs: self.http_allow_cidrs.clone(),
                ..defaults.http
            },
            processors: self.processors,
            workers: self.workers,
            ..defaults
        }
        .with_delivery_limits(DeliveryLimits {
            max_body_bytes: self.body_limit,
            max_depth: self.max_json_depth,
        })
    }
}

/// A running zapflow (every role, as `zapflow all`); stops when dropped.
pub struct Stack {
    pub store: Store,
    /// The broker, for the Kafka deployment; without, workers take work
    /// from the outbox directly.
    pub bus: Option<BusSettings>,
    pub grpc_address: SocketAddr,
    /// IngestService's own listener, for gateways in other processes.
    pub ingest_address: SocketAddr,
    pub http_address: SocketAddr,
    /// `/metrics`, `/livez` and `/readyz`.
    pub admin_address: SocketAddr,
    server: Server,
}

impl Stack {
    pub async fn start(store: Store, bus: Option<BusSettings>, options: StackOptions) -> Self {
        let (grpc, ingest, http, admin) = (
            loopback().await,
            loopback().await,
            loopback().await,
            loopback().await,
        );
        let [grpc_address, ingest_address, http_address, admin_address] =
            [&grpc, &ingest, &http, &admin].map(|listener| listener.local_addr().unwrap());
        let listeners = Listeners {
            grpc: Some(grpc),
            ingest: Some(ingest),
            http: Some(http),
            admin: Some(admin),
        };
        let settings = options.settings(bus.clone(), http_address);
        let server = Server::start(
            &ALL_ROLES,
            settings,
            listeners,
            store.clone(),
            CancellationToken::new(),
        )
        .await
        .expect("starting zapflow");
        Self {
            store,
            bus,
            grpc_address,
            ingest_address,
            http_address,
            admin_address,
            server,
        }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_address)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_address)
    }

    pub async fn zap_client(&self) -> ZapServiceClient<Channel> {
        ZapServiceClient::connect(self.grpc_url())
            .await
            .expect("connecting to the API")
    }

    /// Stops every role and waits for them to drain.
    pub async fn stop(self) {
        if let Err(error) = self.server.stop().await {
            panic!("a role of the stack failed: {error:?}");
        }
    }
}

async fn loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding a loopback port")
}

/// `message` with `authorization: Bearer <key>`.
pub fn with_key<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}
