//! The worker: takes step events, runs the step's action and records the
//! result together with what comes next.

mod consume;
mod local;
mod offsets;

use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use uuid::Uuid;
use zapflow_actions::{ActionError, Executor, StepRef};
use zapflow_core::retry::RetryPolicy;
use zapflow_proto::v1::ZapEvent;
use zapflow_store::{ClaimedStep, StepClaim, StepOutcome, Store, StoreError};

pub use consume::{DeadLetters, consume};
pub use local::run_local;

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Bound on one action; well under the consumer's max.poll.interval.ms.
    pub action_timeout: Duration,
    /// How long a claimed step stays with this worker; longer than
    /// `action_timeout`, so a live worker never loses a step it is running.
    pub lease: Duration,
    pub retry: RetryPolicy,
    /// Steps run at once across runs.
    pub concurrency: usize,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            action_timeout: Duration::from_secs(30),
            lease: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            concurrency: 64,
        }
    }
}

/// What handling one event came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Handled {
    /// The action ran; this is how it ended (already recorded).
    Ran(StepOutcome),
    /// The step was already finished: a redelivery, nothing done.
    Duplicate,
    /// Another worker holds the step; it will be looked at again later.
    Rescheduled,
    /// The event points at nothing runnable; it went to the dead letters.
    DeadLettered(String),
    /// The event cannot be read at all; the caller dead-letters it as is.
    Poison(String),
}

#[derive(Clone)]
pub struct Worker {
    store: Store,
    executor: Executor,
    settings: WorkerSettings,
}

impl Worker {
    pub fn new(store: Store, executor: Executor, settings: WorkerSettings) -> Self {
        Self {
            store,
            executor,
            settings,
        }
    }

    pub fn settings(&self) -> &WorkerSettings {
        &self.settings
    }

    /// Handles one event: claims its step, runs the action and records the
    /// outcome. An error means nothing was recorded and the event should be
    /// delivered again.
    pub async fn execute(&self, event: &ZapEvent) -> Result<Handled, StoreError> {
        let (Ok(run_id), Ok(zap_id)) = (
            Uuid::parse_str(&event.run_id),
            Uuid::parse_str(&event.zap_id),
        ) else {
            return Ok(Handled::Poison(format!(
                "event {:?} has no valid run or zap id",
                event.event_id
            )));
        };
        let step = match self
            .store
            .claim_step(run_id, event.stage, self.settings.lease)
            .await?
        {
            StepClaim::Claimed(step) => step,
            StepClaim::AlreadyDone | StepClaim::RunFinished => return Ok(Handled::Duplicate),
            StepClaim::Busy { lease_until } => {
                let wait = (lease_until - Utc::now()).to_std().unwrap_or_default()
                    + Duration::from_secs(1);
                self.store
                    .reschedule_step(run_id, zap_id, event.stage, wait)
                    .await?;
                return Ok(Handled::Rescheduled);
            }
            StepClaim::Unknown => {
                let reason = format!("no step {} in run {run_id}", event.stage);
                self.store
                    .dead_letter(run_id, zap_id, event.stage, &reason)
                    .await?;
                return Ok(Handled::DeadLettered(reason));
            }
        };

        let outcome = self.run_action(&step).await;
        match &outcome {
            StepOutcome::Succeeded(_) => {
                tracing::debug!(%run_id, stage = step.stage, "step succeeded")
            }
            StepOutcome::Retry { error, delay } => {
                tracing::warn!(%run_id, stage = step.stage, attempt = step.attempt, ?delay, error, "step failed; retrying")
            }
            StepOutcome::Failed(error) => {
                tracing::warn!(%run_id, stage = step.stage, attempt = step.attempt, error, "step failed")
            }
        }
        if !self.store.finish_step(&step, &outcome).await? {
            tracing::warn!(%run_id, stage = step.stage, "lease lost before the result was recorded");
        }
        Ok(Handled::Ran(outcome))
    }

    /// [`execute`](Self::execute), retried while the database does not
    /// answer; `None` when given up at shutdown (nothing was recorded).
    pub(crate) async fn execute_until_recorded(
        &self,
        event: &ZapEvent,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Option<Handled> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.execute(event).await {
                Ok(handled) => return Some(handled),
                Err(error) => {
                    tracing::warn!(%error, run_id = event.run_id, stage = event.stage, "cannot record step; will retry");
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn run_action(&self, step: &ClaimedStep) -> StepOutcome {
        let action = &step.run.actions[step.stage as usize];
        let context = template_context(step);
        let step_ref = StepRef {
            run_id: step.run.id,
            stage: step.stage,
        };
        let result = tokio::time::timeout(
            self.settings.action_timeout,
            self.executor.execute(action, &context, step_ref),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ActionError::Transient(format!(
                "timed out after {:?}",
                self.settings.action_timeout
            )))
        });
        match result {
            Ok(output) => StepOutcome::Succeeded(output),
            Err(ActionError::Permanent(error)) => StepOutcome::Failed(error),
            Err(ActionError::Transient(error)) => {
                match self
                    .settings
                    .retry
                    .with_override(action.retry.as_ref())
                    .delay_after(step.attempt)
                {
                    Some(delay) => StepOutcome::Retry { error, delay },
                    None => StepOutcome::Failed(format!(
                        "{error} (gave up after {} attempts)",
                        step.attempt
                    )),
                }
            }
        }
    }
}

/// What templates see: `trigger`, `headers`, `query`, `steps` (earlier
/// steps' outputs by index) and `run`.
fn template_context(step: &ClaimedStep) -> Value {
    let run = &step.run;
    let steps: Vec<Value> = run
        .steps
        .iter()
        .take(step.stage as usize)
        .map(|earlier| earlier.output.clone().unwrap_or(Value::Null))
        .collect();
    json!({
        "trigger": run.trigger,
        "headers": run.headers,
        "query": run.query,
        "steps": steps,
        "run": {
            "id": run.id,
            "zap_id": run.zap_id,
            "created_at": run.created_at.to_rfc3339(),
            "attempt": step.attempt,
        },
    })
}
