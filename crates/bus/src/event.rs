//! The event an outbox row announces, and its protobuf form on the topics.
//!
//! Workers take an [`Event`] whichever way it reaches them: decoded from a
//! Kafka message, or read from the outbox directly. The conversions to and
//! from [`ZapEvent`] live here and nowhere else.

use std::time::SystemTime;

use chrono::{DateTime, Utc};
use prost::Message;
use uuid::Uuid;
use zapflow_proto::v1::ZapEvent;
use zapflow_store::{OutboxKind, OutboxRow};

/// A piece of work announced by the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Unique per outbox row; a redelivered event keeps its id.
    pub id: Uuid,
    pub run_id: Uuid,
    pub zap_id: Uuid,
    /// The index of the run's action this event is about.
    pub stage: u32,
    pub kind: EventKind,
    pub created_at: DateTime<Utc>,
    /// The W3C trace context of the work that announced the event (a
    /// Kafka message carries it in its `traceparent` header).
    pub trace_parent: Option<String>,
}

/// What an event asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// Run action `stage` of the run.
    Step,
    /// The run failed for good at `stage`; for whoever watches the
    /// dead-letter topic.
    DeadLetter { reason: String },
}

/// Why bytes from a topic are not an [`Event`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("undecodable event: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("event {event_id:?} has an event, run or zap id that is not a UUID")]
    InvalidId { event_id: String },
}

impl From<&OutboxRow> for Event {
    fn from(row: &OutboxRow) -> Self {
        let kind = match row.kind {
            OutboxKind::Step => EventKind::Step,
            OutboxKind::DeadLetter => EventKind::DeadLetter {
                reason: row.reason.clone().unwrap_or_default(),
            },
        };
        Self {
            id: row.event_id,
            run_id: row.run_id,
            zap_id: row.zap_id,
            stage: row.stage,
            kind,
            created_at: row.created_at,
            trace_parent: row.trace_parent.clone(),
        }
    }
}

impl From<&Event> for ZapEvent {
    fn from(event: &Event) -> Self {
        let dead_letter_reason = match &event.kind {
            EventKind::Step => String::new(),
            EventKind::DeadLetter { reason } => reason.clone(),
        };
        Self {
            event_id: event.id.to_string(),
            run_id: event.run_id.to_string(),
            zap_id: event.zap_id.to_string(),
            stage: event.stage,
            create_time: Some(prost_types::Timestamp::from(SystemTime::from(
                event.created_at,
            ))),
            dead_letter_reason,
        }
    }
}

impl TryFrom<ZapEvent> for Event {
    type Error = DecodeError;

    /// An event without a dead-letter reason is a step; one without a
    /// creation time counts as created at the Unix epoch.
    fn try_from(event: ZapEvent) -> Result<Self, DecodeError> {
        let parse = |id: &str| Uuid::parse_str(id).ok();
        let (Some(id), Some(run_id), Some(zap_id)) = (
            parse(&event.event_id),
            parse(&event.run_id),
            parse(&event.zap_id),
        ) else {
            return Err(DecodeError::InvalidId {
                event_id: event.event_id,
            });
        };
        let kind = match event.dead_letter_reason.is_empty() {
            true => EventKind::Step,
            false => EventKind::DeadLetter {
                reason: event.dead_letter_reason,
            },
        };
        let created_at = event
            .create_time
            .and_then(|time| SystemTime::try_from(time).ok())
            .map(DateTime::<Utc>::from)
            .unwrap_or_default();
        Ok(Self {
            id,
            run_id,
            zap_id,
            stage: event.stage,
            kind,
            created_at,
            trace_parent: None,
        })
    }
}

/// `event` as a message payload.
pub fn encode(event: &Event) -> Vec<u8> {
    ZapEvent::from(event).encode_to_vec()
}

/// A message payload as an event.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    Event::try_from(ZapEvent::decode(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind) -> Event {
        Event {
            id: Uuid::new_v4(),
            run_id: Uuid::now_v7(),
            zap_id: Uuid::new_v4(),
            stage: 2,
            kind,
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            trace_parent: None,
        }
    }

    #[test]
    fn events_survive_the_topic() {
        for kind in [
            EventKind::Step,
            EventKind::DeadLetter {
                reason: "550 no such user".into(),
            },
        ] {
            let event = event(kind);
            assert_eq!(decode(&encode(&event)).unwrap(), event);
        }
    }

    #[test]
    fn ids_that_are_not_uuids_are_refused() {
        let garbage = ZapEvent {
            run_id: "not-a-uuid".into(),
            ..ZapEvent::from(&event(EventKind::Step))
        };
        let error = decode(&garbage.encode_to_vec()).unwrap_err();
        assert!(matches!(error, DecodeError::InvalidId { .. }), "{error}");
        let error = decode(b"\xff\xffnot a protobuf event").unwrap_err();
        assert!(
            error.to_string().starts_with("undecodable event"),
            "{error}"
        );
    }
}
