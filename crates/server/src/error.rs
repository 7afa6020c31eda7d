//! Why a process could not start its roles, or a role stopped.

use std::error::Error;

use zapflow_bus::KafkaError;
use zapflow_gateway::InvalidTarget;

use crate::Role;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("the Kafka deployment needs PostgreSQL: set ZAPFLOW_DATABASE_URL=postgres://...")]
    KafkaWithoutPostgres,
    #[error("the processor relays the outbox to Kafka: set ZAPFLOW_KAFKA_BROKERS")]
    ProcessorWithoutKafka,
    #[error("the {0} role needs a listener")]
    NoListener(Role),
    #[error("creating topics on Kafka at {brokers}")]
    Topics {
        brokers: String,
        #[source]
        source: KafkaError,
    },
    #[error("setting up a Kafka client")]
    Kafka(#[from] KafkaError),
    #[error("setting up the actions: {0}")]
    Actions(String),
    #[error(transparent)]
    IngestTarget(#[from] InvalidTarget),
    #[error("gRPC API")]
    Api(#[source] tonic::transport::Error),
    #[error("gateway")]
    Gateway(#[source] std::io::Error),
    #[error("admin listener")]
    Admin(#[source] std::io::Error),
}

/// `error: cause: cause ...`, for logs.
pub(crate) fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
