//! The Kafka side of zapflow: the events workers take and how they are
//! encoded, and how producers, consumers and topics are configured.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;

mod consumer;
mod event;

pub use consumer::{COMMIT_INTERVAL, EventConsumer, PartitionProgress, SESSION_TIMEOUT};
pub use event::{DecodeError, Event, EventKind, decode, encode};
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
    /// The topic an event of `kind` goes to.
    pub fn topic_for(&self, kind: &EventKind) -> &str {
        match kind {
            EventKind::Step => &self.events_topic,
            EventKind::DeadLetter { .. } => &self.dead_letter_topic,
        }
    }

    pub(crate) fn client_config(&self) -> ClientConfig {
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
            .set("linger.ms", "1")
            .set(
                "message.timeout.ms",
                delivery_timeout.as_millis().to_string(),
            )
            .create()
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
