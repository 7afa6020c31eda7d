//! The worker: takes step events, runs the step's action and records the
//! result together with what comes next.

mod consume;
mod local;
mod offsets;
mod retention;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;
use zapflow_actions::{ActionError, Completed, Executor, Next, StepRef};
use zapflow_bus::{Event, EventKind};
use zapflow_core::retry::RetryPolicy;
use zapflow_store::{
    ClaimedStep, Finish, GroupCommit, Patience, StepClaim, StepOutcome, Store, StoreError, answers,
};

use zapflow_telemetry::metrics::{
    DEAD_LETTERS, STEP_DURATION, STEP_RETRIES_SCHEDULED, STEPS_FINISHED,
};
use zapflow_telemetry::trace;

pub use consume::{DeadLetters, consume};
pub use local::{local_handoff, run_local};
pub use retention::{trim_dead_letters, trim_once};

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
    /// The step waits for a retry that is not due yet; the event announcing
    /// that retry comes when it is, so nothing was done.
    NotDue,
    /// Another worker holds the step; it will be looked at again later.
    Rescheduled,
    /// The event points at nothing runnable, or its step has used up its
    /// attempts; it went to the dead letters.
    DeadLettered(String),
    /// The action ran, but shutdown came before its outcome could be
    /// recorded. The event must come again: once the step's lease ends the
    /// step runs again (the documented repeat after a crash).
    Unrecorded(StepOutcome),
}

/// Most claims, or outcomes, recorded in one transaction.
const MAX_BATCH: usize = 64;
/// Transactions of claims in flight at once.
const CLAIM_COMMITTERS: usize = 2;
/// Transactions of outcomes in flight at once: one, so that the outcomes
/// that end while it commits share the next. Steps end steadily under load,
/// unlike claims, which come a lease or a poll at a time; with two in
/// flight, PostgreSQL-only batches held about 10 outcomes instead of 16, and
/// each cost the database a statement plan and a commit of its own.
const OUTCOME_COMMITTERS: usize = 1;

/// The steps a worker running `concurrency` at once keeps in reserve: a
/// quarter. A local worker leases at least that many rows at a time and
/// ingest leaves them to its leases; a worker with no more than that many
/// in flight has steps to spare.
fn spare_steps(concurrency: usize) -> usize {
    (concurrency / 4).max(1)
}

/// An attempt's outcome waiting to be recorded.
struct Recording {
    step: Arc<ClaimedStep>,
    outcome: Arc<StepOutcome>,
    outbox_row: Option<i64>,
    /// The attempt's trace context, for the outbox row that follows.
    trace_parent: Option<String>,
}

#[derive(Clone)]
pub struct Worker {
    store: Store,
    executor: Executor,
    settings: WorkerSettings,
    /// Claims of steps taken together share a transaction...
    claims: GroupCommit<(Uuid, u32), Result<StepClaim, StoreError>>,
    /// ...and so do the outcomes of attempts that end together.
    recordings: GroupCommit<Recording, Result<bool, StoreError>>,
    /// Events being handled now.
    in_flight: Arc<AtomicUsize>,
}

/// One event being handled, counted while it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Worker {
    pub fn new(store: Store, executor: Executor, settings: WorkerSettings) -> Self {
        let claims = {
            let (store, lease, retry) = (store.clone(), settings.lease, settings.retry);
            GroupCommit::spawn(
                "step_claims",
                CLAIM_COMMITTERS,
                MAX_BATCH,
                move |steps: Vec<(Uuid, u32)>| {
                    let store = store.clone();
                    async move {
                        let claimed = store.claim_steps_isolated(&steps, lease, &retry).await;
                        answers(claimed, steps.len())
                    }
                },
            )
        };
        let in_flight = Arc::new(AtomicUsize::new(0));
        let recordings = {
            let store = store.clone();
            let in_flight = in_flight.clone();
            // A worker with steps to spare lets outcomes wait for a write
            // to share their commit (see [`Patience`]); a busy one needs
            // their permits back at once.
            let spare = spare_steps(settings.concurrency);
            GroupCommit::spawn(
                "step_outcomes",
                OUTCOME_COMMITTERS,
                MAX_BATCH,
                move |recordings: Vec<Recording>| {
                    let store = store.clone();
                    let patience = match in_flight.load(Ordering::Relaxed) <= spare {
                        true => Patience::CanWait,
                        false => Patience::Urgent,
                    };
                    async move {
                        let finishes: Vec<Finish<'_>> = recordings
                            .iter()
                            .map(|recording| Finish {
                                step: &recording.step,
                                outcome: &recording.outcome,
                                outbox_row: recording.outbox_row,
                                trace_parent: recording.trace_parent.clone(),
                            })
                            .collect();
                        let recorded = store.finish_steps_isolated(&finishes, patience).await;
                        answers(recorded, finishes.len())
                    }
                },
            )
        };
        Self {
            store,
            executor,
            settings,
            claims,
            recordings,
            in_flight,
        }
    }

    pub fn settings(&self) -> &WorkerSettings {
        &self.settings
    }

    /// Handles one event: claims its step, runs the action once and records
    /// the outcome. An error means the claim failed: nothing ran, and the
    /// event should be delivered again. Once the action ran, recording its
    /// outcome is retried (never the action) until the database takes it.
    pub async fn execute(&self, event: &Event) -> Result<Handled, StoreError> {
        self.execute_until(event, &CancellationToken::new()).await
    }

    /// [`execute`](Self::execute), whose recording gives up at `shutdown`
    /// ([`Handled::Unrecorded`]).
    pub async fn execute_until(
        &self,
        event: &Event,
        shutdown: &CancellationToken,
    ) -> Result<Handled, StoreError> {
        self.handle(event, None, None, shutdown).await
    }

    /// [`execute_until`](Self::execute_until) for an event read from
    /// `outbox_row`, which is deleted in the transaction that records the
    /// step's outcome; `claim` is the step's, when taken with the row.
    async fn handle(
        &self,
        event: &Event,
        outbox_row: Option<i64>,
        claim: Option<StepClaim>,
        shutdown: &CancellationToken,
    ) -> Result<Handled, StoreError> {
        let span = tracing::info_span!(
            "step",
            otel.kind = "consumer",
            run_id = %event.run_id,
            zap_id = %event.zap_id,
            step = event.stage,
            action = tracing::field::Empty,
            attempt = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        trace::continue_trace(&span, event.trace_parent.as_deref());
        let _counted = InFlight::new(&self.in_flight);
        self.handle_in(event, outbox_row, claim, shutdown)
            .instrument(span)
            .await
    }

    async fn handle_in(
        &self,
        event: &Event,
        outbox_row: Option<i64>,
        claim: Option<StepClaim>,
        shutdown: &CancellationToken,
    ) -> Result<Handled, StoreError> {
        let (run_id, zap_id) = (event.run_id, event.zap_id);
        if let EventKind::DeadLetter { .. } = event.kind {
            // Dead letters have a topic of their own and are never leased:
            // one that reaches a worker announces a step that already ended.
            tracing::debug!(%run_id, stage = event.stage, "dead-letter event; nothing to run");
            return Ok(Handled::Duplicate);
        }
        let claim = match claim {
            Some(claim) => claim,
            None => self
                .claims
                .submit((run_id, event.stage))
                .await
                .unwrap_or_else(|| Err(StoreError::crashed()))?,
        };
        let step = match claim {
            StepClaim::Claimed(step) => step,
            StepClaim::AlreadyDone | StepClaim::RunFinished => return Ok(Handled::Duplicate),
            StepClaim::NotDue { retry_at } => {
                tracing::debug!(%run_id, stage = event.stage, %retry_at, "retry not due yet");
                return Ok(Handled::NotDue);
            }
            StepClaim::Busy { lease_until } => {
                let wait = (lease_until - Utc::now()).to_std().unwrap_or_default()
                    + Duration::from_secs(1);
                self.store
                    .reschedule_step(run_id, zap_id, event.stage, wait)
                    .await?;
                return Ok(Handled::Rescheduled);
            }
            StepClaim::Exhausted { error, action } => {
                tracing::warn!(%run_id, stage = event.stage, error, "step out of attempts");
                metrics::counter!(DEAD_LETTERS, "action" => action).increment(1);
                return Ok(Handled::DeadLettered(error));
            }
            StepClaim::Unknown => {
                let reason = format!("no step {} in run {run_id}", event.stage);
                self.store
                    .dead_letter(run_id, zap_id, event.stage, &reason)
                    .await?;
                return Ok(Handled::DeadLettered(reason));
            }
        };

        let action = step.run.actions[step.stage as usize].action_type.clone();
        let span = tracing::Span::current();
        span.record("action", action.as_str());
        span.record("attempt", step.attempt);
        let started = Instant::now();
        let outcome = self.run_action(&step).await;
        observe_attempt(action, &outcome, started.elapsed());
        match &outcome {
            StepOutcome::Succeeded(_) => {
                tracing::debug!(%run_id, stage = step.stage, "step succeeded")
            }
            StepOutcome::Stopped { reason, .. } => {
                tracing::debug!(%run_id, stage = step.stage, reason, "run stopped by a filter")
            }
            StepOutcome::Waiting { until, .. } => {
                tracing::debug!(%run_id, stage = step.stage, %until, "run waits")
            }
            StepOutcome::Retry { error, delay } => {
                tracing::warn!(%run_id, stage = step.stage, attempt = step.attempt, ?delay, error, "step failed; retrying")
            }
            StepOutcome::Failed(error) => {
                tracing::warn!(%run_id, stage = step.stage, attempt = step.attempt, error, "step failed")
            }
        }
        Ok(self
            .record(step.into(), outcome, outbox_row, shutdown)
            .await)
    }

    /// Records an attempt's outcome, retrying with backoff while the
    /// database does not take it: the effect happened, so running the
    /// action again to get another outcome would repeat it.
    async fn record(
        &self,
        step: Arc<ClaimedStep>,
        outcome: StepOutcome,
        outbox_row: Option<i64>,
        shutdown: &CancellationToken,
    ) -> Handled {
        let outcome = Arc::new(outcome);
        let mut backoff = Backoff::default();
        loop {
            let recording = Recording {
                step: step.clone(),
                outcome: outcome.clone(),
                outbox_row,
                trace_parent: trace::current_traceparent(),
            };
            let recorded = self
                .recordings
                .submit(recording)
                .await
                .unwrap_or_else(|| Err(StoreError::crashed()));
            match recorded {
                Ok(true) => return Handled::Ran(unshared(outcome)),
                Ok(false) => {
                    tracing::warn!(run_id = %step.run.id, stage = step.stage, attempt = step.attempt, "lease lost before the result was recorded");
                    return Handled::Ran(unshared(outcome));
                }
                Err(error) => {
                    tracing::warn!(%error, run_id = %step.run.id, stage = step.stage, attempt = step.attempt, "cannot record the step's outcome; will retry");
                    if !backoff.wait(shutdown).await {
                        tracing::warn!(run_id = %step.run.id, stage = step.stage, "shutting down with an unrecorded outcome");
                        return Handled::Unrecorded(unshared(outcome));
                    }
                }
            }
        }
    }

    /// [`execute_until`](Self::execute_until), with a failed claim retried
    /// while the database does not answer; `None` when given up at shutdown
    /// (nothing was recorded: the event must come again). `claim`, when
    /// taken with the outbox row, serves the first try; later tries claim
    /// afresh.
    pub(crate) async fn execute_until_recorded(
        &self,
        event: &Event,
        outbox_row: Option<i64>,
        mut claim: Option<StepClaim>,
        shutdown: &CancellationToken,
    ) -> Option<Handled> {
        let mut backoff = Backoff::default();
        loop {
            match self.handle(event, outbox_row, claim.take(), shutdown).await {
                Ok(Handled::Unrecorded(_)) => return None,
                Ok(handled) => return Some(handled),
                Err(error) => {
                    tracing::warn!(%error, run_id = %event.run_id, stage = event.stage, "cannot claim the step; will retry");
                    if !backoff.wait(shutdown).await {
                        return None;
                    }
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
            Ok(Completed { output, next }) => match next {
                Next::Continue => StepOutcome::Succeeded(output),
                Next::Stop(reason) => StepOutcome::Stopped { output, reason },
                Next::ResumeAt(until) => StepOutcome::Waiting { output, until },
            },
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

/// Counts an attempt of an `action` step that ended with `outcome`.
fn observe_attempt(action: String, outcome: &StepOutcome, took: Duration) {
    let ended = match outcome {
        StepOutcome::Succeeded(_) | StepOutcome::Stopped { .. } | StepOutcome::Waiting { .. } => {
            "succeeded"
        }
        StepOutcome::Retry { .. } => {
            metrics::counter!(STEP_RETRIES_SCHEDULED, "action" => action.clone()).increment(1);
            "retrying"
        }
        StepOutcome::Failed(_) => {
            metrics::counter!(DEAD_LETTERS, "action" => action.clone()).increment(1);
            "failed"
        }
    };
    metrics::histogram!(STEP_DURATION, "action" => action.clone()).record(took.as_secs_f64());
    metrics::counter!(STEPS_FINISHED, "action" => action, "outcome" => ended).increment(1);
}

/// The outcome back from a recording that no longer holds it.
fn unshared(outcome: Arc<StepOutcome>) -> StepOutcome {
    Arc::try_unwrap(outcome).unwrap_or_else(|shared| (*shared).clone())
}

/// Waits between tries at a database that does not answer: from 100 ms,
/// doubling up to 5 s.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(100))
    }
}

impl Backoff {
    /// Waits for the next try; false when `shutdown` came first.
    async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(self.0) => {}
        }
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        true
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
            "scheduled_time": run.scheduled_time.map(|time| time.to_rfc3339()),
        },
    })
}
