//! Starting each role from the configuration.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use zapflow_gateway::IngestTarget;
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

    // The API first: a gateway in the same process calls it directly.
    let api = match roles.contains(&Role::Api) {
        true => {
            let mut settings = config.api();
            // In one process with the relay or the workers, the API is only
            // healthy while their broker answers too.
            if roles
                .iter()
                .any(|role| matches!(role, Role::Processor | Role::Worker))
            {
                settings.broker = bus.clone();
            }
            Some(zapflow_api::Api::new(store.clone(), settings).await)
        }
        false => None,
    };
    let in_process_ingest = api.as_ref().map(zapflow_api::Api::in_process_ingest);

    let mut tasks = JoinSet::new();
    if let Some(api) = api {
        let listener = bind(config.grpc_listen).await?;
        let ingest_listener = match config.ingest_listen(roles.contains(&Role::Gateway)) {
            Some(address) => Some(bind(address).await?),
            None => None,
        };
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            api.serve(listener, ingest_listener, shutdown)
                .await
                .context("gRPC API")
        });
    }
    for role in roles {
        let shutdown = shutdown.clone();
        match role {
            Role::Api => {}
            Role::Gateway => {
                let ingest = match &in_process_ingest {
                    Some(service) => {
                        IngestTarget::in_process(service.clone(), config.grpc_max_message)
                    }
                    None => IngestTarget::connect(
                        &config.ingest_url,
                        config.grpc_max_message,
                        config.ingest_token.as_deref(),
                    )?,
                };
                let listener = bind(config.http_listen).await?;
                let router = zapflow_gateway::router(ingest, &config.gateway());
                tasks.spawn(async move {
                    zapflow_gateway::serve(listener, router, shutdown)
                        .await
                        .context("gateway")
                });
            }
            Role::Processor => match (&bus, store.postgres()) {
                (Some(bus), Some(_)) => {
                    let relay = Relay::new(store.clone(), bus.clone(), config.relay())?;
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
                if let Some(retention) = config.dead_letter_retention() {
                    tokio::spawn(zapflow_worker::trim_dead_letters(
                        store.clone(),
                        retention,
                        shutdown.clone(),
                    ));
                }
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
