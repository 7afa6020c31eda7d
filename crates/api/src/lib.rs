//! zapflow's gRPC API: ZapService for users, IngestService for the webhook
//! gateway (on a listener of its own, or in process), with health and
//! reflection beside them.

mod convert;
mod dry_run;
mod error;
mod ingest;
mod observe;
mod watch;
mod zaps;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::{Routes, interceptor::InterceptedService};
use tonic::transport::Server;
use tonic::{Request, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use zapflow_actions::Executor;
use zapflow_core::delivery::DeliveryLimits;
use zapflow_core::secret;
use zapflow_proto::v1::ingest_service_server::IngestServiceServer;
use zapflow_proto::v1::zap_service_server::ZapServiceServer;
use zapflow_store::Store;

pub use error::ApiError;
pub use ingest::IngestApi;
pub use observe::{Observe, ObserveLayer};
pub use zaps::ZapApi;

/// IngestService and its health, observed, for a gateway in this process.
pub type InProcessIngest = Observe<Routes>;

/// A tonic server whose calls are observed.
type ObservedServer = Server<tower::layer::util::Stack<ObserveLayer, tower::layer::util::Identity>>;

#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// The gateway's address as users reach it, for webhook URLs.
    pub public_url: String,
    /// Largest request message accepted (bigger ones: OUT_OF_RANGE).
    pub max_message_bytes: usize,
    /// Calls taking longer are cancelled with DEADLINE_EXCEEDED.
    pub request_timeout: Duration,
    /// The broker, when this process also relays or consumes through it:
    /// health is SERVING only while it answers too.
    pub broker: Option<zapflow_bus::BusSettings>,
    /// What a webhook delivery may carry, however it arrives.
    pub delivery: DeliveryLimits,
    /// When set, IngestService calls over the network must carry
    /// `authorization: Bearer <token>` (the gateway sends it).
    pub ingest_token: Option<String>,
}

const PUBLIC_SERVICES: [&str; 2] = ["", "zapflow.v1.ZapService"];
const INGEST_SERVICES: [&str; 2] = ["", "zapflow.v1.IngestService"];

/// The API of one process: ZapService for users on the public listener,
/// IngestService for gateways on a listener of its own (or inside this
/// process, with no socket at all), each with health.
pub struct Api {
    store: Store,
    previews: Executor,
    settings: ApiSettings,
    ingest: IngestApi,
    public_health: HealthReporter,
    ingest_health: HealthReporter,
}

impl Api {
    /// Health answers NOT_SERVING until the database (and the broker, if
    /// any) does.
    /// `previews` renders steps for DryRunZap: give it the settings the
    /// workers run with, so that a dry run refuses what they would.
    pub async fn new(store: Store, settings: ApiSettings, previews: Executor) -> Self {
        let public_health = HealthReporter::new();
        let ingest_health = HealthReporter::new();
        for (reporter, services) in [
            (&public_health, PUBLIC_SERVICES),
            (&ingest_health, INGEST_SERVICES),
        ] {
            for service in services {
                reporter
                    .set_service_status(service, ServingStatus::NotServing)
                    .await;
            }
        }
        let ingest = IngestApi::new(store.clone(), settings.delivery);
        Self {
            store,
            previews,
            settings,
            ingest,
            public_health,
            ingest_health,
        }
    }

    /// Starts runs for `worker`, a worker of this process, while it has
    /// steps to spare: they skip the outbox's lease and claim.
    pub fn with_local_worker(mut self, worker: zapflow_store::handoff::Handoff) -> Self {
        self.ingest = self.ingest.with_local_worker(worker);
        self
    }

    /// IngestService and its health as one service to call inside this
    /// process: what a gateway in the same process uses instead of a socket.
    pub fn in_process_ingest(&self) -> InProcessIngest {
        let routes = Routes::new(self.ingest_server()).add_service(HealthServer::new(
            HealthService::from_health_reporter(self.ingest_health.clone()),
        ));
        tower::Layer::layer(&ObserveLayer, routes)
    }

    fn ingest_server(&self) -> IngestServiceServer<IngestApi> {
        IngestServiceServer::new(self.ingest.clone())
            .max_decoding_message_size(self.settings.max_message_bytes)
    }

    /// Serves ZapService on `listener` and, given one, IngestService on
    /// `ingest_listener` until `shutdown`, then finishes the calls under way.
    pub async fn serve(
        self,
        listener: TcpListener,
        ingest_listener: Option<TcpListener>,
        shutdown: CancellationToken,
    ) -> Result<(), tonic::transport::Error> {
        tokio::spawn(watch_dependencies(
            self.store.clone(),
            self.settings.broker.clone(),
            [
                (self.public_health.clone(), PUBLIC_SERVICES),
                (self.ingest_health.clone(), INGEST_SERVICES),
            ],
            shutdown.clone(),
        ));
        let public = self.serve_public(listener, shutdown.clone());
        match ingest_listener {
            Some(ingest_listener) => {
                let ingest = self.serve_ingest(ingest_listener, shutdown);
                tokio::try_join!(public, ingest).map(|_| ())
            }
            None => public.await,
        }
    }

    async fn serve_public(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), tonic::transport::Error> {
        // Reflection lists what this listener serves: not IngestService,
        // although its contract is in the same descriptor set.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(zapflow_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("zapflow.v1.ZapService")
                .with_service_name("grpc.health.v1.Health")
        };
        let reflection_v1 = reflection()
            .build_v1()
            .expect("the embedded descriptor sets are valid");
        let reflection_alpha = reflection()
            .build_v1alpha()
            .expect("the embedded descriptor sets are valid");
        let zap_api = ZapApi::new(
            self.store.clone(),
            &self.settings.public_url,
            self.previews.clone(),
        )
        .with_shutdown(shutdown.clone());
        let zaps = ZapServiceServer::new(zap_api)
            .max_decoding_message_size(self.settings.max_message_bytes);
        let health = HealthServer::new(HealthService::from_health_reporter(
            self.public_health.clone(),
        ));
        self.server()
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_alpha)
            .add_service(zaps)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
            .await
    }

    async fn serve_ingest(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), tonic::transport::Error> {
        let token = self.settings.ingest_token.clone();
        let ingest = InterceptedService::new(self.ingest_server(), move |request: Request<()>| {
            check_ingest_token(token.as_deref(), &request)?;
            Ok(request)
        });
        let health = HealthServer::new(HealthService::from_health_reporter(
            self.ingest_health.clone(),
        ));
        self.server()
            .add_service(health)
            .add_service(ingest)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
            .await
    }

    fn server(&self) -> ObservedServer {
        Server::builder()
            .timeout(self.settings.request_timeout)
            .concurrency_limit_per_connection(256)
            .layer(ObserveLayer)
    }
}

/// Serves ZapService on `listener` alone until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    settings: ApiSettings,
    previews: Executor,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    Api::new(store, settings, previews)
        .await
        .serve(listener, None, shutdown)
        .await
}

/// Refuses an IngestService call without the configured token; the
/// comparison is over hashes, in constant time.
fn check_ingest_token(token: Option<&str>, request: &Request<()>) -> Result<(), Status> {
    let Some(token) = token else {
        return Ok(());
    };
    let presented = request
        .metadata()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    if secret::verify(presented, &secret::hash(token)) {
        Ok(())
    } else {
        Err(Status::unauthenticated(
            "IngestService is for the webhook gateway",
        ))
    }
}

/// Keeps the health statuses in step with whether the database (and the
/// broker, when this process needs one) answers.
async fn watch_dependencies<const N: usize>(
    store: Store,
    broker: Option<zapflow_bus::BusSettings>,
    reporters: [(HealthReporter, [&'static str; N]); 2],
    shutdown: CancellationToken,
) {
    let mut serving = None;
    loop {
        let broker_up = match &broker {
            Some(broker) => broker.ping().await.is_ok(),
            None => true,
        };
        let now_serving = broker_up && store.ping().await.is_ok();
        if serving != Some(now_serving) {
            let status = if now_serving {
                ServingStatus::Serving
            } else {
                tracing::warn!("database or broker unreachable; health is NOT_SERVING");
                ServingStatus::NotServing
            };
            for (reporter, services) in &reporters {
                for service in services {
                    reporter.set_service_status(service, status).await;
                }
            }
            serving = Some(now_serving);
        }
        let pause = if now_serving {
            Duration::from_secs(5)
        } else {
            Duration::from_millis(500)
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}
