//! The workers' consumer: a member of the consumer group that says which
//! partitions it holds, reports how far each partition of the topic is
//! consumed, and can leave the group and join it again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::{BusSettings, KafkaError};

/// How long the group coordinator waits without a heartbeat before it
/// hands a member's partitions to the others.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// How often stored offsets are committed.
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on each request of a [`EventConsumer::progress`] report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Logs what the group coordinator gives and takes, and counts assignments.
pub struct Membership {
    group: String,
    /// Assignments received so far: a change means a rebalance finished.
    assignments: Arc<AtomicU64>,
}

impl ClientContext for Membership {}

impl ConsumerContext for Membership {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            tracing::info!(group = self.group, partitions = %partition_list(partitions), "partitions revoked");
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                self.assignments.fetch_add(1, Ordering::SeqCst);
                tracing::info!(group = self.group, partitions = %partition_list(partitions), "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => {
                tracing::warn!(group = self.group, %error, "rebalance failed")
            }
        }
    }
}

/// `0,2,4`, or `none`.
fn partition_list(partitions: &TopicPartitionList) -> String {
    let list: Vec<String> = partitions
        .elements()
        .iter()
        .map(|element| element.partition().to_string())
        .collect();
    match list.is_empty() {
        true => "none".to_owned(),
        false => list.join(","),
    }
}

/// How far one partition of the events topic is consumed by the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionProgress {
    pub partition: i32,
    /// The group's committed offset (the low watermark before any commit).
    pub committed: i64,
    /// The offset the next event will get.
    pub high_watermark: i64,
    /// Whether this consumer holds the partition.
    pub assigned_here: bool,
}

impl PartitionProgress {
    /// Events in the partition that the group has not finished.
    pub fn backlog(&self) -> i64 {
        (self.high_watermark - self.committed).max(0)
    }
}

/// A worker's membership of the consumer group on the events topic.
pub struct EventConsumer {
    config: ClientConfig,
    group: String,
    topic: String,
    assignments: Arc<AtomicU64>,
    consumer: Arc<StreamConsumer<Membership>>,
}

impl BusSettings {
    /// A worker's consumer. Offsets are stored by hand, only once the step
    /// they carry is committed to the database, and auto-committed from
    /// there: a worker that dies mid-step gets the event redelivered.
    pub fn consumer(
        &self,
        group: &str,
        max_poll_interval: Duration,
    ) -> Result<EventConsumer, KafkaError> {
        let mut config = self.client_config();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set(
                "auto.commit.interval.ms",
                COMMIT_INTERVAL.as_millis().to_string(),
            )
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set(
                "max.poll.interval.ms",
                max_poll_interval.as_millis().to_string(),
            )
            .set(
                "session.timeout.ms",
                SESSION_TIMEOUT.as_millis().to_string(),
            )
            // A fetch waits at most this long for data. Kafka answers as
            // soon as data arrives anyway; brokers that only answer when the
            // wait runs out (tansu) would otherwise add 500 ms to every step.
            .set("fetch.wait.max.ms", "20")
            // Events are small and steps slow: a short local queue keeps a
            // backlog in one partition from holding the others' events back
            // for long (and what a rebalance discards small).
            .set("queued.max.messages.kbytes", "1024");
        let assignments = Arc::new(AtomicU64::new(0));
        let consumer = subscribed(&config, group, &self.events_topic, &assignments)?;
        Ok(EventConsumer {
            config,
            group: group.to_owned(),
            topic: self.events_topic.clone(),
            assignments,
            consumer: Arc::new(consumer),
        })
    }
}

fn subscribed(
    config: &ClientConfig,
    group: &str,
    topic: &str,
    assignments: &Arc<AtomicU64>,
) -> Result<StreamConsumer<Membership>, KafkaError> {
    let consumer: StreamConsumer<Membership> = config.create_with_context(Membership {
        group: group.to_owned(),
        assignments: assignments.clone(),
    })?;
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}

impl EventConsumer {
    /// The topic consumed.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub async fn recv(&self) -> Result<BorrowedMessage<'_>, KafkaError> {
        self.consumer.recv().await
    }

    /// Stores `offset` as done, to be committed with the next commit.
    pub fn store_offset(&self, partition: i32, offset: i64) -> Result<(), KafkaError> {
        self.consumer.store_offset(&self.topic, partition, offset)
    }

    /// Commits the stored offsets now.
    pub fn commit(&self) -> Result<(), KafkaError> {
        self.consumer.commit_consumer_state(CommitMode::Sync)
    }

    /// How many assignments this member has received; a change means a
    /// rebalance finished.
    pub fn assignments(&self) -> u64 {
        self.assignments.load(Ordering::SeqCst)
    }

    /// Every partition of the events topic: what the group committed, what
    /// is there, and whether this member holds it.
    pub async fn progress(&self) -> Result<Vec<PartitionProgress>, KafkaError> {
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || progress(&consumer, &topic))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }

    /// Commits the stored offsets, leaves the group and joins it again as a
    /// new member: the group coordinator forms the group anew and hands out
    /// every partition. The caller has finished the events it received.
    pub async fn rejoin(&mut self) -> Result<(), KafkaError> {
        if let Err(error) = self.commit() {
            tracing::debug!(%error, "offset commit before leaving the group");
        }
        let fresh: StreamConsumer<Membership> = self.config.create_with_context(Membership {
            group: self.group.clone(),
            assignments: self.assignments.clone(),
        })?;
        // Closing waits for the LeaveGroup answer: off the async threads,
        // and before the new member subscribes, so the coordinator never
        // sees both at once.
        let old = std::mem::replace(&mut self.consumer, Arc::new(fresh));
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        self.consumer.subscribe(&[&self.topic])
    }
}

fn progress(
    consumer: &StreamConsumer<Membership>,
    topic: &str,
) -> Result<Vec<PartitionProgress>, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), REPORT_TIMEOUT)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|found| found.name() == topic)
        .flat_map(|found| found.partitions().iter().map(|partition| partition.id()))
        .collect();
    let mut wanted = TopicPartitionList::new();
    for &partition in &partitions {
        wanted.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(wanted, REPORT_TIMEOUT)?;
    let assigned = consumer.assignment()?;
    partitions
        .into_iter()
        .map(|partition| {
            let (low, high) = consumer.fetch_watermarks(topic, partition, REPORT_TIMEOUT)?;
            let committed = match committed
                .find_partition(topic, partition)
                .map(|element| element.offset())
            {
                Some(Offset::Offset(offset)) => offset,
                _ => low,
            };
            Ok(PartitionProgress {
                partition,
                committed,
                high_watermark: high,
                assigned_here: assigned.find_partition(topic, partition).is_some(),
            })
        })
        .collect()
}
