//! The worker's Kafka loop: events in, steps run concurrently, offsets
//! stored only behind finished work, and an eye on every partition so that
//! work stranded by a dead member is picked up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use zapflow_bus::{
    COMMIT_INTERVAL, Event, EventConsumer, KafkaError, PartitionProgress, SESSION_TIMEOUT,
};
use zapflow_telemetry::metrics::CONSUMER_LAG;
use zapflow_telemetry::trace;

use self::progress::{ProgressWatch, Stall};
use crate::offsets::OffsetTracker;
use crate::{Worker, WorkerSettings};

mod progress;

/// How often the progress of every partition is looked at.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);

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
    mut consumer: EventConsumer,
    dead_letters: DeadLetters,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(worker.settings().concurrency.max(1)));
    let dead_letters = Arc::new(dead_letters);
    let mut in_flight = InFlight::default();
    let mut watch = ProgressWatch::new(stall_after(worker.settings()));
    let mut check = tokio::time::interval(CHECK_INTERVAL);
    check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut permit: Option<OwnedSemaphorePermit> = None;

    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(joined) = in_flight.tasks.join_next(), if !in_flight.tasks.is_empty() => {
                in_flight.finished(joined, &consumer);
            }
            _ = check.tick() => {
                look_at_progress(&mut consumer, &mut watch, &mut in_flight).await;
            }
            acquired = permits.clone().acquire_owned(), if permit.is_none() => {
                permit = Some(acquired.expect("semaphore never closed"));
            }
            received = receive(&consumer), if permit.is_some() => match received {
                Ok(received) => {
                    let (permit, worker, dead_letters, shutdown) =
                        (permit.take(), worker.clone(), dead_letters.clone(), shutdown.clone());
                    in_flight.start(received.position, async move {
                        let _permit = permit;
                        handle(&worker, &received, &dead_letters, &shutdown).await
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }

    tracing::info!(in_flight = in_flight.tasks.len(), "worker draining");
    in_flight.drain(&consumer).await;
    if let Err(error) = consumer.commit() {
        tracing::debug!(%error, "final offset commit");
    }
}

/// How long a partition's backlog may stand still before the worker says so
/// and rejoins: the coordinator had the session timeout to hand a dead
/// member's partitions on, a live owner had one action to finish the event
/// at the head, and either's offset one commit and one check to show.
fn stall_after(settings: &WorkerSettings) -> Duration {
    SESSION_TIMEOUT + settings.action_timeout + COMMIT_INTERVAL + CHECK_INTERVAL
}

/// Where an event sits in the topic.
#[derive(Debug, Clone, Copy)]
struct Position {
    partition: i32,
    offset: i64,
}

/// An event as it came, owned.
struct Received {
    position: Position,
    payload: Vec<u8>,
    /// The trace context of the relay that published it.
    trace_parent: Option<String>,
}

/// The next event, owned: it outlives the consumer's borrow.
async fn receive(consumer: &EventConsumer) -> Result<Received, KafkaError> {
    let message = consumer.recv().await?;
    Ok(Received {
        position: Position {
            partition: message.partition(),
            offset: message.offset(),
        },
        payload: message.payload().unwrap_or_default().to_vec(),
        trace_parent: message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|header| header.key == trace::TRACEPARENT)
                .and_then(|header| std::str::from_utf8(header.value?).ok())
                .map(str::to_owned)
        }),
    })
}

/// The steps under way, and which offsets they hold back.
#[derive(Default)]
struct InFlight {
    /// Each yields its event's position once the outcome is recorded,
    /// `None` when abandoned at shutdown.
    tasks: JoinSet<Option<Position>>,
    offsets: OffsetTracker,
}

impl InFlight {
    fn start(&mut self, position: Position, handled: impl Future<Output = bool> + Send + 'static) {
        self.offsets.start(position.partition, position.offset);
        self.tasks
            .spawn(async move { handled.await.then_some(position) });
    }

    fn finished(&mut self, joined: Result<Option<Position>, JoinError>, consumer: &EventConsumer) {
        let Ok(Some(Position { partition, offset })) = joined else {
            return;
        };
        if let Some(done) = self.offsets.finish(partition, offset) {
            // Fails only for a partition revoked meanwhile; its new owner
            // sees the event again and finds the step done.
            if let Err(error) = consumer.store_offset(partition, done) {
                tracing::debug!(%error, partition, offset = done, "offset not stored");
            }
        }
    }

    /// Waits for every step under way and stores what they finished.
    async fn drain(&mut self, consumer: &EventConsumer) {
        while let Some(joined) = self.tasks.join_next().await {
            self.finished(joined, consumer);
        }
        self.offsets = OffsetTracker::default();
    }
}

/// Asks how far each partition is consumed; says which stalled, and leaves
/// and rejoins the group when that may be the remedy: a partition held by
/// no one here, or one of ours whose events do not arrive though this
/// worker has nothing else to do.
async fn look_at_progress(
    consumer: &mut EventConsumer,
    watch: &mut ProgressWatch,
    in_flight: &mut InFlight,
) {
    let report = match tokio::time::timeout(CHECK_INTERVAL * 5, consumer.progress()).await {
        Ok(Ok(report)) => report,
        Ok(Err(error)) => {
            tracing::debug!(%error, "no progress report");
            return;
        }
        Err(_) => return,
    };
    export_lag(consumer.topic(), &report);
    let mut rejoin = false;
    for Stall { progress, idle } in watch.observe(Instant::now(), consumer.assignments(), &report) {
        let in_flight_here = in_flight.offsets.in_flight(progress.partition);
        let (partition, committed, high_watermark) = (
            progress.partition,
            progress.committed,
            progress.high_watermark,
        );
        if progress.assigned_here {
            tracing::warn!(
                partition,
                committed,
                high_watermark,
                in_flight = in_flight_here,
                ?idle,
                "assigned partition has due work but makes no progress"
            );
            rejoin |= in_flight.tasks.is_empty();
        } else {
            tracing::warn!(
                partition,
                committed,
                high_watermark,
                ?idle,
                "partition has due work but no member of the group makes progress on it"
            );
            rejoin = true;
        }
    }
    if rejoin && watch.may_rejoin(Instant::now()) {
        tracing::info!(
            in_flight = in_flight.tasks.len(),
            "leaving and rejoining the consumer group"
        );
        in_flight.drain(consumer).await;
        if let Err(error) = consumer.rejoin().await {
            tracing::warn!(%error, "cannot rejoin the consumer group");
        }
    }
}

/// Handles one event; true once its outcome is recorded (the offset may be
/// stored), false when abandoned at shutdown.
async fn handle(
    worker: &Worker,
    received: &Received,
    dead_letters: &DeadLetters,
    shutdown: &CancellationToken,
) -> bool {
    let payload = &received.payload;
    match zapflow_bus::decode(payload) {
        Ok(event) => {
            let event = Event {
                trace_parent: received.trace_parent.clone(),
                ..event
            };
            worker
                .execute_until_recorded(&event, None, None, shutdown)
                .await
                .is_some()
        }
        Err(error) => publish_poison(dead_letters, payload, &error.to_string(), shutdown).await,
    }
}

/// Exports how far behind each partition's end the group is: the
/// partitions this worker holds with their lag, the others as 0 (their
/// owner reports them), so sums over workers count each partition once.
fn export_lag(topic: &str, report: &[PartitionProgress]) {
    for progress in report {
        let lag = match progress.assigned_here {
            true => progress.backlog(),
            false => 0,
        };
        metrics::gauge!(
            CONSUMER_LAG,
            "topic" => topic.to_owned(),
            "partition" => progress.partition.to_string()
        )
        .set(lag as f64);
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
