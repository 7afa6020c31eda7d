//! Starting each role from the configuration.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use zapflow_processor::Relay;
use zapflow_store::Store;
use zapflow_worker::{DeadLetters, Worker};

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    store: &Store,
    shutdown: &CancellationToken,
) -> Result<JoinSet<Result<()>>> {
    let bus = config.bus();
    if bus.is_some() && store.postgres().is_none() {
        bail!("the Kafka deployment needs PostgreSQL: set ZAPFLOW_DATABASE_URL=postgres://...");
    }
    if let Some(bus) = &bus
        && roles
            .iter()
            .any(|role| matches!(role, Role::Processor | Role::Worker))
    {
        bus.ensure_topics()
            .await
            .with_context(|| format!("creating topics on Kafka at {}", bus.brokers))?;
    }

    let mut tasks = JoinSet::new();
    for role in roles {
        let shutdown = shutdown.clone();
        match role {
            Role::Api => {
                let listener = bind(config.grpc_listen).await?;
                let mut settings = config.api();
                // In one process with the relay or the workers, the API is
                // only healthy while their broker answers too.
                if roles
                    .iter()
                    .any(|role| matches!(role, Role::Processor | Role::Worker))
                {
                    settings.broker = bus.clone();
                }
                let store = store.clone();
                tasks.spawn(async move {
                    zapflow_api::serve(listener, store, settings, shutdown)
                        .await
                        .context("gRPC API")
                });
            }
            Role::Gateway => {
                let listener = bind(config.http_listen).await?;
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
            Role::Processor => match (&bus, store.postgres()) {
                (Some(bus), Some(pg)) => {
                    let relay = Relay::new(pg.clone(), bus.clone(), config.relay())?;
                    tasks.spawn(async move {
                        relay.run(shutdown).await;
                        Ok(())
                    });
                }
                // Without Kafka, workers read the outbox themselves.
                _ if roles.len() > 1 => {}
                _ => bail!("the processor relays the outbox to Kafka: set ZAPFLOW_KAFKA_BROKERS"),
            },
            Role::Worker => {
                let worker = Worker::new(store.clone(), config.executor()?, config.worker());
                match &bus {
                    Some(bus) => {
                        let consumer =
                            bus.consumer(&config.consumer_group, Duration::from_secs(300))?;
                        let dead_letters = DeadLetters {
                            producer: bus.producer(Duration::from_secs(30))?,
                            topic: bus.dead_letter_topic.clone(),
                        };
                        tasks.spawn(async move {
                            zapflow_worker::consume(worker, consumer, dead_letters, shutdown).await;
                            Ok(())
                        });
                    }
                    None => {
                        let (store, poll) = (store.clone(), config.relay().poll_interval);
                        tasks.spawn(async move {
                            zapflow_worker::run_local(worker, store, poll, shutdown).await;
                            Ok(())
                        });
                    }
                }
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
