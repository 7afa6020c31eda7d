//! The errors of the gRPC services and the one table that turns them into
//! gRPC status codes.

use tonic::{Code, Status};
use zapflow_core::delivery::DeliveryError;
use zapflow_store::StoreError;

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid API key")]
    Unauthenticated,
    /// A delivery to a zap that requires signatures was not signed right.
    #[error("invalid webhook signature: {0}")]
    BadSignature(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    /// Zap names are unique per owner.
    #[error("a zap named {0:?} already exists; choose another name, or update that zap")]
    ZapNameTaken(String),
    #[error("{0}")]
    FailedPrecondition(&'static str),
    /// A webhook delivery that breaks the delivery rules.
    #[error(transparent)]
    BadDelivery(#[from] DeliveryError),
    #[error("the database is unavailable; try again")]
    Unavailable,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Maps a store error, naming what was looked for when it is missing.
    /// Database details are logged, never sent.
    pub fn from_store(error: StoreError, what: &'static str) -> Self {
        match error {
            StoreError::NotFound => Self::NotFound(what),
            StoreError::AlreadyExists => Self::AlreadyExists(what),
            StoreError::Unavailable(error) => {
                tracing::warn!(%error, "database unavailable");
                Self::Unavailable
            }
            StoreError::Refused(error) => {
                tracing::warn!(%error, "database refused a value");
                Self::invalid(what, "refused by the database as invalid data")
            }
            StoreError::Db(error) => {
                tracing::error!(%error, "database error");
                Self::Internal
            }
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        let code = match &error {
            ApiError::Unauthenticated | ApiError::BadSignature(_) => Code::Unauthenticated,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::InvalidArgument { .. } => Code::InvalidArgument,
            ApiError::BadDelivery(DeliveryError::TooLarge { .. }) => Code::OutOfRange,
            ApiError::BadDelivery(_) => Code::InvalidArgument,
            ApiError::AlreadyExists(_) | ApiError::ZapNameTaken(_) => Code::AlreadyExists,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Unavailable => Code::Unavailable,
            ApiError::Internal => Code::Internal,
        };
        Status::new(code, error.to_string())
    }
}
