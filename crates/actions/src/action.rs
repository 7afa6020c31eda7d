//! The shape every action type has, and what running one yields.

use std::future::Future;

use chrono::{DateTime, Utc};
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
    /// performs the action: the step's output, and what the run does next.
    fn execute(
        self,
        runner: &Self::Runner,
        context: &Value,
        step: StepRef,
    ) -> impl Future<Output = Result<Completed, ActionError>> + Send;

    /// Renders the templated fields and checks them as [`Self::execute`]
    /// would, with no effect: the fields as the step would use them (its
    /// "output" here), and what the run would do next.
    fn preview(
        self,
        runner: &Self::Runner,
        context: &Value,
        step: StepRef,
    ) -> impl Future<Output = Result<Completed, ActionError>> + Send;

    /// Reads `config`, which may hold only the type's fields.
    fn from_config(config: &Map<String, Value>) -> Result<Self, FieldError> {
        Self::parse(&Fields::of(&Self::TYPE, config)?)
    }
}

/// A step that completed: its output, and what its run does next.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    pub output: Value,
    pub next: Next,
}

impl Completed {
    /// An action's `output`; the run goes on.
    pub fn with(output: Value) -> Self {
        Self {
            output,
            next: Next::Continue,
        }
    }
}

/// What a run does after a step that completed.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Goes on with the next step, or succeeds after the last.
    Continue,
    /// Ends here, succeeded, for this reason (a filter said no).
    Stop(String),
    /// Goes on with the next step at this time (a delay).
    ResumeAt(DateTime<Utc>),
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
