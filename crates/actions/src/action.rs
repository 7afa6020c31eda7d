//! The shape every action type has, and what running one yields.

use std::future::Future;

use serde_json::{Map, Value};

use crate::field::{ActionType, FieldError, Fields};

/// One type of action a zap can run: a typed configuration read from
/// `ActionSpec.config`, and the effect it has once rendered.
///
/// An implementation listed in [`crate::registry`] is in the catalog, in
/// the validation of zaps and in the [`Executor`](crate::Executor).
pub(crate) trait Action: Sized + Send {
    /// The catalog entry: the type's name, description and fields.
    const TYPE: ActionType;

    /// What performs the action (the mailer, the HTTP client), held by the
    /// executor.
    type Runner: Sync;

    /// Reads and checks a configuration, field by field in the order of
    /// [`Self::TYPE`]'s fields. Saving a zap runs it, and so does every step
    /// before it runs.
    fn parse(fields: &Fields<'_>) -> Result<Self, FieldError>;

    /// Renders the templated fields against the run's `context` and
    /// performs the action; the result is the step's output.
    fn execute(
        self,
        runner: &Self::Runner,
        context: &Value,
        step: StepRef,
    ) -> impl Future<Output = Result<Value, ActionError>> + Send;

    /// Reads `config`, which may hold only the type's fields.
    fn from_config(config: &Map<String, Value>) -> Result<Self, FieldError> {
        Self::parse(&Fields::of(&Self::TYPE, config)?)
    }
}

/// Why an action did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// Worth another attempt: the other side may recover.
    #[error("{0}")]
    Transient(String),
    /// Trying again would fail the same way (bad address, template error, 5xx).
    #[error("{0}")]
    Permanent(String),
}

/// A configuration or a rendered value that cannot work fails the same way
/// on every attempt.
impl From<FieldError> for ActionError {
    fn from(error: FieldError) -> Self {
        Self::Permanent(error.to_string())
    }
}

/// Which run and step an action executes for; effects derive their
/// idempotency keys from it.
#[derive(Debug, Clone, Copy)]
pub struct StepRef {
    pub run_id: uuid::Uuid,
    pub stage: u32,
}
