//! The API server as grpcurl and orchestrators see it: health and reflection.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use zapflow_api::ApiSettings;
use zapflow_store::Store;
use zapflow_testkit::{Stack, StackOptions, eventually, test_store};

async fn health(channel: Channel, service: &str) -> i32 {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_and_reflection_lists_the_services() {
    let stack = Stack::start(test_store().await, None, StackOptions::default()).await;
    let channel = Channel::from_shared(stack.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // IngestService is for gateways: its health is on its own listener.
    let ingest_channel = Channel::from_shared(format!("http://{}", stack.ingest_address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    for (channel, service) in [
        (&channel, ""),
        (&channel, "zapflow.v1.ZapService"),
        (&ingest_channel, ""),
        (&ingest_channel, "zapflow.v1.IngestService"),
    ] {
        eventually("health SERVING", Duration::from_secs(10), || {
            let channel = channel.clone();
            async move {
                (health(channel, service).await == ServingStatus::Serving as i32).then_some(())
            }
        })
        .await;
    }

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer {answer:?}");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    for expected in ["zapflow.v1.ZapService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(
        !names.iter().any(|name| name == "zapflow.v1.IngestService"),
        "IngestService is not served here: {names:?}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_while_the_database_does_not_answer() {
    let store = Store::open("postgres://postgres@127.0.0.1:1/nowhere", 2)
        .await
        .unwrap();
    assert_not_serving(store, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_while_the_broker_of_this_process_does_not_answer() {
    let broker = zapflow_bus::BusSettings {
        brokers: "127.0.0.1:1".into(),
        events_topic: "unused".into(),
        dead_letter_topic: "unused-dlq".into(),
        partitions: 1,
    };
    assert_not_serving(test_store().await, Some(broker)).await;
}

/// Serves the API with `store` and `broker` and checks that health stays
/// NOT_SERVING.
async fn assert_not_serving(store: Store, broker: Option<zapflow_bus::BusSettings>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let settings = ApiSettings {
        public_url: "http://127.0.0.1:8080".into(),
        max_message_bytes: 1024 * 1024,
        request_timeout: Duration::from_secs(5),
        broker,
        delivery: Default::default(),
        ingest_token: None,
    };
    let shutdown = CancellationToken::new();
    let email = zapflow_actions::EmailSettings {
        mailbox_dir: std::env::temp_dir().join(zapflow_testkit::unique("zapflow-mailbox")),
        ..zapflow_server::Settings::default().email
    };
    let previews = zapflow_actions::Executor::new(zapflow_actions::Mailer::new(&email).unwrap());
    let server = tokio::spawn(zapflow_api::serve(
        listener,
        store,
        settings,
        previews,
        shutdown.clone(),
    ));
    let channel = eventually(
        "the API to listen",
        Duration::from_secs(10),
        || async move {
            Channel::from_shared(format!("http://{address}"))
                .unwrap()
                .connect()
                .await
                .ok()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        health(channel.clone(), "").await,
        ServingStatus::NotServing as i32
    );
    assert_eq!(
        health(channel, "zapflow.v1.ZapService").await,
        ServingStatus::NotServing as i32
    );
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_and_the_server_carries_on() {
    use tonic::Code;
    use zapflow_proto::v1 as pb;
    use zapflow_testkit::with_key;

    let stack = Stack::start(test_store().await, None, StackOptions::default()).await;
    let key = crate::support::new_user(&stack, "alice").await;
    let mut client = stack.zap_client().await;
    let huge = pb::CreateZapRequest {
        name: "x".repeat(5 * 1024 * 1024),
        ..Default::default()
    };
    let status = client.create_zap(with_key(&key, huge)).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    let (zap, _) = crate::support::simple_zap(&stack, &key).await;
    assert!(!zap.id.is_empty(), "the server still answers");
    stack.stop().await;
}
