//! The outbox relay: moves due `zap_run_outbox` rows to Kafka and deletes
//! each row only once the broker acknowledged it.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use zapflow_bus::{BusSettings, Event, KafkaError, encode};
use zapflow_store::{OUTBOX_CHANNEL, Store, StoreError};
use zapflow_telemetry::metrics::{OUTBOX_RELAY_FAILURES, OUTBOX_RELAYED};
use zapflow_telemetry::trace;

#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Rows claimed per pass.
    pub batch_size: u32,
    /// How often to look for due rows without a notification (delayed
    /// retries become due without one; a dropped LISTEN connection too).
    pub poll_interval: Duration,
    /// How long a message may wait for the broker's acknowledgement before
    /// its delivery counts as failed (`message.timeout.ms`).
    pub delivery_timeout: Duration,
}

/// What one relay pass came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayPass {
    /// Rows the pass claimed: due, and not locked by another relay.
    pub claimed: usize,
    /// Claimed rows the broker acknowledged; they are deleted. The others
    /// stay for a later pass.
    pub delivered: usize,
}

impl RelayPass {
    /// Whether some claimed rows could not be delivered.
    pub fn failed(&self) -> bool {
        self.delivered < self.claimed
    }
}

/// A row on its way to the broker.
struct Outgoing<'a> {
    outbox_id: i64,
    topic: &'a str,
    /// The run id: a run's events stay in order on one partition.
    key: String,
    payload: Vec<u8>,
    /// The relay's span, and its context for the message's header.
    span: tracing::Span,
    traceparent: Option<String>,
}

/// One relay; run several against one database to share the work.
pub struct Relay {
    store: Store,
    /// Replaced after a failed delivery: an idempotent producer whose
    /// broker lost its state (a restart, a failover) can stay broken for
    /// good, and a new one costs little next to an outage.
    producer: Mutex<FutureProducer>,
    bus: BusSettings,
    settings: RelaySettings,
}

impl Relay {
    pub fn new(
        store: Store,
        bus: BusSettings,
        settings: RelaySettings,
    ) -> Result<Self, KafkaError> {
        let producer = bus.producer(settings.delivery_timeout)?;
        Ok(Self {
            store,
            producer: Mutex::new(producer),
            bus,
            settings,
        })
    }

    fn producer(&self) -> FutureProducer {
        self.producer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn renew_producer(&self) {
        match self.bus.producer(self.settings.delivery_timeout) {
            Ok(fresh) => *self.producer.lock().unwrap_or_else(PoisonError::into_inner) = fresh,
            Err(error) => tracing::warn!(%error, "cannot create a new producer"),
        }
    }

    /// One pass: claims a batch of due rows, produces them, waits for every
    /// delivery report and deletes the acknowledged rows. Rows whose delivery
    /// failed stay for a later pass.
    pub async fn relay_once(&self) -> Result<RelayPass, StoreError> {
        let claim = self
            .store
            .claim_due_outbox_rows(self.settings.batch_size)
            .await?;
        let messages: Vec<Outgoing> = claim
            .rows
            .iter()
            .map(|row| {
                let event = Event::from(row);
                // Each row's relay continues its run's trace, and the
                // message carries the relay's context on.
                let span = trace::span(|| {
                    tracing::info_span!(
                        "relay",
                        otel.kind = "producer",
                        run_id = %row.run_id,
                        step = row.stage,
                        trace_id = tracing::field::Empty,
                    )
                });
                trace::continue_trace(&span, row.trace_parent.as_deref());
                Outgoing {
                    outbox_id: row.id,
                    topic: self.bus.topic_for(&event.kind),
                    key: row.run_id.to_string(),
                    payload: encode(&event),
                    traceparent: trace::traceparent(&span),
                    span,
                }
            })
            .collect();
        let producer = self.producer();
        let reports = join_all(messages.iter().map(|message| {
            let producer = &producer;
            async move {
                let mut record = FutureRecord::to(message.topic)
                    .key(&message.key)
                    .payload(&message.payload);
                if let Some(traceparent) = &message.traceparent {
                    record = record.headers(OwnedHeaders::new().insert(Header {
                        key: trace::TRACEPARENT,
                        value: Some(traceparent),
                    }));
                }
                let sent = producer
                    .send(record, Timeout::Never)
                    .instrument(message.span.clone())
                    .await;
                match sent {
                    Ok(_) => Some(message.outbox_id),
                    Err((error, _)) => {
                        tracing::warn!(outbox_id = message.outbox_id, %error, "delivery failed; row kept");
                        None
                    }
                }
            }
        }))
        .await;
        let delivered: Vec<i64> = reports.into_iter().flatten().collect();
        let pass = RelayPass {
            claimed: claim.rows.len(),
            delivered: delivered.len(),
        };
        metrics::counter!(OUTBOX_RELAYED).increment(pass.delivered as u64);
        metrics::counter!(OUTBOX_RELAY_FAILURES).increment((pass.claimed - pass.delivered) as u64);
        if pass.failed() {
            self.renew_producer();
        }
        claim.finish(&delivered).await?;
        Ok(pass)
    }

    /// Relays until `shutdown`: drains due rows, then sleeps until a
    /// notification, the next delayed row's due time or the poll interval. A pass under way when shutdown
    /// comes finishes (its delivery reports are awaited), so only
    /// acknowledged rows are ever deleted; no pass starts after it.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = self.listen().await;
        while !shutdown.is_cancelled() {
            // A full batch suggests more are due; go on without waiting,
            // but never past shutdown, however long the backlog.
            let mut failing = false;
            while !shutdown.is_cancelled() {
                match self.relay_once().await {
                    Ok(pass)
                        if pass.claimed == self.settings.batch_size as usize && !pass.failed() =>
                    {
                        continue;
                    }
                    Ok(pass) => {
                        failing = pass.failed();
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "relay pass failed");
                        failing = true;
                        break;
                    }
                }
            }
            let wake = async {
                match listener.as_mut() {
                    Some(listener) => {
                        if let Err(error) = listener.recv().await {
                            tracing::warn!(%error, "outbox notifications lost; polling");
                            tokio::time::sleep(self.settings.poll_interval).await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            // Delayed rows (retries) announce themselves when written, not
            // when due: sleep no longer than until the next one is.
            // After a failed pass, due rows are still due: wait for the poll.
            let sleep = match self.store.next_step_due_in().await {
                Ok(Some(due_in)) if !failing => {
                    due_in.clamp(Duration::from_millis(1), self.settings.poll_interval)
                }
                _ => self.settings.poll_interval,
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = wake => {}
                () = tokio::time::sleep(sleep) => {
                    if listener.is_none() {
                        listener = self.listen().await;
                    }
                }
            }
        }
        if let Err(error) = self
            .producer()
            .flush(Timeout::After(Duration::from_secs(10)))
        {
            tracing::warn!(%error, "producer flush at shutdown");
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut listener = PgListener::connect_with(self.store.postgres()?)
            .await
            .ok()?;
        listener.listen(OUTBOX_CHANNEL).await.ok()?;
        Some(listener)
    }
}
