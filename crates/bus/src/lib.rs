//! The Kafka side of zapflow: how events are encoded, and how producers,
//! consumers and topics are configured.

use std::time::{Duration, SystemTime};

use prost::Message;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use zapflow_proto::v1::ZapEvent;
use zapflow_store::{OutboxKind, OutboxRow};

pub use rdkafka::error::KafkaError;

/// Broker and topic names, shared by the processor and the worker.
#[derive(Debug, Clone)]
pub struct BusSettings {
    /// Comma-separated `host:port` list.
    pub brokers: String,
    pub events_topic: String,
    pub dead_letter_topic: String,
    /// Partitions given to topics zapflow creates.
    pub partitions: i32,
}

impl BusSettings {
    /// The topic an outbox row is relayed to.
    pub fn topic_for(&self, kind: OutboxKind) -> &str {
        match kind {
            OutboxKind::Step => &self.events_topic,
            OutboxKind::DeadLetter => &self.dead_letter_topic,
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        config
    }

    /// The relay's producer: idempotent, every in-sync replica acknowledges,
    /// and a message that cannot be delivered within `delivery_timeout`
    /// comes back as a failed delivery report (its row is kept).
    pub fn producer(&self, delivery_timeout: Duration) -> Result<FutureProducer, KafkaError> {
        self.client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                delivery_timeout.as_millis().to_string(),
            )
            .create()
    }

    /// A worker's consumer. Offsets are stored by hand, only once the step
    /// they carry is committed to the database, and auto-committed from
    /// there: a worker that dies mid-step gets the event redelivered.
    pub fn consumer(
        &self,
        group: &str,
        max_poll_interval: Duration,
    ) -> Result<StreamConsumer, KafkaError> {
        let consumer: StreamConsumer = self
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set(
                "max.poll.interval.ms",
                max_poll_interval.as_millis().to_string(),
            )
            .set("session.timeout.ms", "10000")
            // A fetch waits at most this long for data. Kafka answers as
            // soon as data arrives anyway; brokers that only answer when the
            // wait runs out (tansu) would otherwise add 500 ms to every step.
            .set("fetch.wait.max.ms", "20")
            .create()?;
        consumer.subscribe(&[&self.events_topic])?;
        Ok(consumer)
    }

    /// Creates the event and dead-letter topics unless they exist.
    pub async fn ensure_topics(&self) -> Result<(), KafkaError> {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        let topics = [&self.events_topic, &self.dead_letter_topic]
            .map(|name| NewTopic::new(name, self.partitions, TopicReplication::Fixed(1)));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics(&topics, &options).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                        tracing::error!(topic, %code, "cannot create topic");
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether the brokers answer a metadata request.
    pub async fn ping(&self) -> Result<(), KafkaError> {
        let config = self.client_config();
        tokio::task::spawn_blocking(move || {
            let consumer: rdkafka::consumer::BaseConsumer = config.create()?;
            consumer
                .fetch_metadata(None, Duration::from_secs(5))
                .map(drop)
        })
        .await
        .unwrap_or(Err(KafkaError::Canceled))
    }
}

/// The event an outbox row announces.
pub fn event_for(row: &OutboxRow) -> ZapEvent {
    ZapEvent {
        event_id: row.event_id.to_string(),
        run_id: row.run_id.to_string(),
        zap_id: row.zap_id.to_string(),
        stage: row.stage,
        create_time: Some(prost_types::Timestamp::from(SystemTime::from(
            row.created_at,
        ))),
        dead_letter_reason: row.reason.clone().unwrap_or_default(),
    }
}

pub fn encode(event: &ZapEvent) -> Vec<u8> {
    event.encode_to_vec()
}

pub fn decode(bytes: &[u8]) -> Result<ZapEvent, prost::DecodeError> {
    ZapEvent::decode(bytes)
}
