//! Every role of zapflow inside the test process, on ports chosen by the OS.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::Channel;
use zapflow_actions::{EmailSettings, Executor, HttpSettings, Mailer};
use zapflow_api::{Api, ApiSettings};
use zapflow_bus::BusSettings;
use zapflow_core::delivery::DeliveryLimits;
use zapflow_gateway::{GatewaySettings, IngestTarget};
use zapflow_processor::{Relay, RelaySettings};
use zapflow_proto::v1::zap_service_client::ZapServiceClient;
use zapflow_store::Store;
use zapflow_worker::{DeadLetters, Worker, WorkerSettings};

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
    /// Processors to run (they share the outbox).
    pub processors: usize,
    /// Workers to run (members of one consumer group).
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
    fn default() -> Self {
        Self {
            smtp_url: None,
            http_allow_cidrs: Vec::new(),
            worker: WorkerSettings::default(),
            body_limit: 1024 * 1024,
            per_zap_limit: None,
            per_ip_limit: None,
            processors: 1,
            workers: 1,
            consumer_group: None,
            max_json_depth: zapflow_core::delivery::DEFAULT_MAX_DEPTH,
            ingest_token: None,
            poll_interval: Duration::from_millis(200),
        }
    }
}

/// A running zapflow; stops when dropped.
pub struct Stack {
    pub store: Store,
    /// The broker, for the Kafka deployment; without, workers take work
    /// from the outbox directly.
    pub bus: Option<BusSettings>,
    pub grpc_address: SocketAddr,
    /// IngestService's own listener, for gateways in other processes.
    pub ingest_address: SocketAddr,
    pub http_address: SocketAddr,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Stack {
    pub async fn start(store: Store, bus: Option<BusSettings>, options: StackOptions) -> Self {
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();

        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_address = grpc.local_addr().unwrap();
        let ingest = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ingest_address = ingest.local_addr().unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_address = http.local_addr().unwrap();

        let api_settings = ApiSettings {
            public_url: format!("http://{http_address}"),
            max_message_bytes: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            broker: bus.clone(),
            delivery: DeliveryLimits {
                max_body_bytes: options.body_limit,
                max_depth: options.max_json_depth,
            },
            ingest_token: options.ingest_token.clone(),
        };
        let api = Api::new(store.clone(), api_settings).await;
        // As in `zapflow all`: the gateway calls the API in process.
        let target = IngestTarget::in_process(api.in_process_ingest(), 4 * 1024 * 1024);
        tasks.spawn({
            let shutdown = shutdown.clone();
            async move {
                api.serve(grpc, Some(ingest), shutdown).await.unwrap();
            }
        });

        let router = zapflow_gateway::router(
            target,
            &GatewaySettings {
                body_limit: options.body_limit,
                request_timeout: Duration::from_secs(30),
                per_zap_limit: options.per_zap_limit,
                per_ip_limit: options.per_ip_limit,
            },
        );
        tasks.spawn({
            let shutdown = shutdown.clone();
            async move {
                zapflow_gateway::serve(http, router, shutdown)
                    .await
                    .unwrap();
            }
        });

        if let Some(bus) = &bus {
            assert!(
                store.postgres().is_some(),
                "the Kafka deployment runs on PostgreSQL"
            );
            for _ in 0..options.processors {
                let relay =
                    Relay::new(store.clone(), bus.clone(), relay_settings(&options)).unwrap();
                tasks.spawn(relay.run(shutdown.clone()));
            }
        }

        let group = options
            .consumer_group
            .clone()
            .unwrap_or_else(|| crate::unique("zapflow-workers"));
        let mailbox_dir = std::env::temp_dir().join(crate::unique("zapflow-mailbox"));
        for _ in 0..options.workers {
            let mailer = Mailer::new(&EmailSettings {
                smtp_url: options.smtp_url.clone(),
                mailbox_dir: mailbox_dir.clone(),
                from: "zapflow <zapflow@localhost>".into(),
                timeout: Duration::from_secs(10),
                max_recipients: zapflow_actions::DEFAULT_MAX_RECIPIENTS,
            })
            .unwrap();
            let http = HttpSettings {
                allow_cidrs: options.http_allow_cidrs.clone(),
                ..HttpSettings::default()
            };
            let executor = Executor::with_http(mailer, &http).unwrap();
            let worker = Worker::new(store.clone(), executor, options.worker.clone());
            match &bus {
                Some(bus) => {
                    let consumer = bus.consumer(&group, Duration::from_secs(60)).unwrap();
                    let dead_letters = DeadLetters {
                        producer: bus.producer(Duration::from_secs(10)).unwrap(),
                        topic: bus.dead_letter_topic.clone(),
                    };
                    tasks.spawn(zapflow_worker::consume(
                        worker,
                        consumer,
                        dead_letters,
                        shutdown.clone(),
                    ));
                }
                None => {
                    tasks.spawn(zapflow_worker::run_local(
                        worker,
                        store.clone(),
                        options.poll_interval,
                        shutdown.clone(),
                    ));
                }
            }
        }

        Self {
            store,
            bus,
            grpc_address,
            ingest_address,
            http_address,
            shutdown,
            tasks,
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
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn relay_settings(options: &StackOptions) -> RelaySettings {
    RelaySettings {
        batch_size: 500,
        poll_interval: options.poll_interval,
        delivery_timeout: Duration::from_secs(10),
    }
}

/// `message` with `authorization: Bearer <key>`.
pub fn with_key<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}
