//! The worker's Kafka loop: events in, steps run concurrently, offsets
//! stored only behind finished work.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::offsets::OffsetTracker;
use crate::{Handled, Worker};

/// Where undecodable events go, as they came.
pub struct DeadLetters {
    pub producer: FutureProducer,
    pub topic: String,
}

/// Consumes step events until `shutdown`, then lets in-flight steps finish
/// (an abandoned step's event is redelivered: its offset was never stored)
/// and commits the stored offsets.
pub async fn consume(
    worker: Worker,
    consumer: StreamConsumer,
    dead_letters: DeadLetters,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(worker.settings().concurrency.max(1)));
    let dead_letters = Arc::new(dead_letters);
    let mut tasks: JoinSet<Option<(String, i32, i64)>> = JoinSet::new();
    let mut tracker = OffsetTracker::default();
    let store = |tracker: &mut OffsetTracker, topic: &str, partition: i32, offset: i64| {
        if let Some(done) = tracker.finish(partition, offset) {
            // Fails only for a partition revoked meanwhile; its new owner
            // sees the event again and finds the step done.
            if let Err(error) = consumer.store_offset(topic, partition, done) {
                tracing::debug!(%error, partition, offset = done, "offset not stored");
            }
        }
    };

    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(Ok(Some((topic, partition, offset)))) = tasks.join_next(), if !tasks.is_empty() => {
                store(&mut tracker, &topic, partition, offset);
                continue;
            }
            permit = permits.clone().acquire_owned() => permit.expect("semaphore never closed"),
        };
        let message = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(Ok(Some((topic, partition, offset)))) = tasks.join_next(), if !tasks.is_empty() => {
                store(&mut tracker, &topic, partition, offset);
                continue;
            }
            message = consumer.recv() => message,
        };
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "consumer error");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (topic, partition, offset) = (
            message.topic().to_owned(),
            message.partition(),
            message.offset(),
        );
        let payload = message.payload().unwrap_or_default().to_vec();
        drop(message);
        tracker.start(partition, offset);

        let worker = worker.clone();
        let dead_letters = dead_letters.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let _permit = permit;
            handle(&worker, &payload, &dead_letters, &shutdown)
                .await
                .then_some((topic, partition, offset))
        });
    }

    tracing::info!(in_flight = tasks.len(), "worker draining");
    while let Some(done) = tasks.join_next().await {
        if let Ok(Some((topic, partition, offset))) = done {
            store(&mut tracker, &topic, partition, offset);
        }
    }
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(%error, "final offset commit");
    }
}

/// Handles one event; true once its outcome is recorded (the offset may be
/// stored), false when abandoned at shutdown.
async fn handle(
    worker: &Worker,
    payload: &[u8],
    dead_letters: &DeadLetters,
    shutdown: &CancellationToken,
) -> bool {
    let event = match zapflow_bus::decode(payload) {
        Ok(event) => event,
        Err(error) => {
            return publish_poison(
                dead_letters,
                payload,
                &format!("undecodable event: {error}"),
                shutdown,
            )
            .await;
        }
    };
    match worker.execute_until_recorded(&event, shutdown).await {
        Some(Handled::Poison(reason)) => {
            publish_poison(dead_letters, payload, &reason, shutdown).await
        }
        Some(_) => true,
        None => false,
    }
}

async fn publish_poison(
    dead_letters: &DeadLetters,
    payload: &[u8],
    reason: &str,
    shutdown: &CancellationToken,
) -> bool {
    tracing::warn!(reason, "dead-lettering an event");
    loop {
        let headers = OwnedHeaders::new().insert(Header {
            key: "zapflow-dead-letter-reason",
            value: Some(reason),
        });
        let record = FutureRecord::<(), _>::to(&dead_letters.topic)
            .payload(payload)
            .headers(headers);
        match dead_letters
            .producer
            .send(record, Timeout::After(Duration::from_secs(5)))
            .await
        {
            Ok(_) => return true,
            Err((error, _)) => {
                tracing::warn!(%error, "cannot publish a dead letter; will retry");
                tokio::select! {
                    () = shutdown.cancelled() => return false,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}
