//! zapflow's gRPC API: ZapService for users, IngestService for the webhook
//! gateway, with health and reflection beside them.

mod convert;
mod error;
mod ingest;
mod zaps;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use zapflow_proto::v1::ingest_service_server::IngestServiceServer;
use zapflow_proto::v1::zap_service_server::ZapServiceServer;
use zapflow_store::Store;

pub use error::ApiError;
pub use ingest::IngestApi;
pub use zaps::ZapApi;

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
}

const SERVICES: [&str; 3] = ["", "zapflow.v1.ZapService", "zapflow.v1.IngestService"];

/// Serves the API on `listener` until `shutdown`, then finishes the calls
/// under way. Health answers NOT_SERVING until the database does.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    settings: ApiSettings,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for service in SERVICES {
        reporter
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
    tokio::spawn(watch_dependencies(
        store.clone(),
        settings.broker.clone(),
        reporter,
        shutdown.clone(),
    ));

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(zapflow_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(zapflow_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");

    let zaps = ZapServiceServer::new(ZapApi::new(store.clone(), &settings.public_url))
        .max_decoding_message_size(settings.max_message_bytes);
    let ingest = IngestServiceServer::new(IngestApi::new(store))
        .max_decoding_message_size(settings.max_message_bytes);

    Server::builder()
        .timeout(settings.request_timeout)
        .concurrency_limit_per_connection(256)
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(zaps)
        .add_service(ingest)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await
}

/// Keeps the health status in step with whether the database (and the
/// broker, when this process needs one) answers.
async fn watch_dependencies(
    store: Store,
    broker: Option<zapflow_bus::BusSettings>,
    reporter: HealthReporter,
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
            for service in SERVICES {
                reporter.set_service_status(service, status).await;
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
