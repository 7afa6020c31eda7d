//! Starting each role from the configuration.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use zapflow_actions::{Executor, Mailer};
use zapflow_processor::Relay;
use zapflow_store::Store;
use zapflow_worker::{DeadLetters, Worker};

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Api,
    Gateway,
    Processor,
    Worker,
}

pub const ALL_ROLES: [Role; 4] = [Role::Api, Role::Gateway, Role::Processor, Role::Worker];

/// Starts `roles` in this process; each runs until `shutdown`.
pub async fn start(
    roles: &[Role],
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<JoinSet<Result<()>>> {
    let store = Store::connect_lazy(&config.database_url, config.database_pool)?;
    let mut tasks = JoinSet::new();
    if roles
        .iter()
        .any(|role| matches!(role, Role::Processor | Role::Worker))
    {
        config
            .bus()
            .ensure_topics()
            .await
            .with_context(|| format!("creating topics on Kafka at {}", config.kafka_brokers))?;
    }
    for role in roles {
        let shutdown = shutdown.clone();
        match role {
            Role::Api => {
                let listener = bind(config.grpc_listen).await?;
                tracing::info!(address = %config.grpc_listen, "gRPC API listening");
                let (store, settings) = (store.clone(), config.api());
                tasks.spawn(async move {
                    zapflow_api::serve(listener, store, settings, shutdown)
                        .await
                        .context("gRPC API")
                });
            }
            Role::Gateway => {
                let listener = bind(config.http_listen).await?;
                tracing::info!(address = %config.http_listen, public_url = %config.public_url, "webhook gateway listening");
                let client =
                    zapflow_gateway::ingest_client(&config.api_url, config.grpc_max_message)
                        .with_context(|| format!("invalid API URL {:?}", config.api_url))?;
                let router = zapflow_gateway::router(client, &config.gateway());
                tasks.spawn(async move {
                    zapflow_gateway::serve(listener, router, shutdown)
                        .await
                        .context("gateway")
                });
            }
            Role::Processor => {
                let producer = config.bus().producer(Duration::from_secs(30))?;
                let relay = Relay::new(store.clone(), producer, config.bus(), config.relay());
                tasks.spawn(async move {
                    relay.run(shutdown).await;
                    Ok(())
                });
            }
            Role::Worker => {
                let mailer = Mailer::new(&config.email()).map_err(anyhow::Error::msg)?;
                match &config.smtp_url {
                    Some(_) => tracing::info!("email goes over SMTP"),
                    None => tracing::info!(
                        mailbox = %config.email().mailbox_dir.display(),
                        "no SMTP server configured: email is written to the mailbox directory"
                    ),
                }
                let worker = Worker::new(store.clone(), Executor::new(mailer), config.worker());
                let consumer = config
                    .bus()
                    .consumer(&config.consumer_group, Duration::from_secs(300))?;
                let dead_letters = DeadLetters {
                    producer: config.bus().producer(Duration::from_secs(30))?,
                    topic: config.dead_letter_topic.clone(),
                };
                tasks.spawn(async move {
                    zapflow_worker::consume(worker, consumer, dead_letters, shutdown).await;
                    Ok(())
                });
            }
        }
    }
    Ok(tasks)
}

async fn bind(address: std::net::SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))
}
