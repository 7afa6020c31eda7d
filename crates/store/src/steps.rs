use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;
use zapflow_core::Attempt;
use zapflow_core::retry::RetryPolicy;

use crate::claim::{Decision, StepState, decide, max_attempts};
use crate::outbox::{enqueue, micros};
use crate::zaps::parse_status;
use crate::{PgStore, Result, Run};

/// The answer to "may I run step `stage` of this run now?".
#[derive(Debug)]
pub enum StepClaim {
    /// Yes: the step is leased to the caller for this attempt.
    Claimed(Box<ClaimedStep>),
    /// The step already succeeded or failed: a redelivery, nothing to do.
    AlreadyDone,
    /// Another worker holds the step until its lease expires.
    Busy { lease_until: DateTime<Utc> },
    /// The step waits for a retry due at `retry_at`; the event announcing
    /// that retry comes then, so this one (a duplicate, a reschedule) has
    /// nothing to do.
    NotDue { retry_at: DateTime<Utc> },
    /// Every attempt the step's retry policy allows was started already (the
    /// step came back by an expired lease, a duplicate event, a failed
    /// recording): the claim failed the step and the run, with `error`, and
    /// dead-lettered it as an exhausted retry does.
    Exhausted { error: String },
    /// The run is over (succeeded or failed).
    RunFinished,
    /// No such run, or no such step in it.
    Unknown,
}

#[derive(Debug)]
pub struct ClaimedStep {
    /// The run as it was when claimed, earlier steps' outputs included.
    pub run: Run,
    pub stage: u32,
    /// This attempt's number, from 1. Finishing the step only counts while
    /// the step is still at this attempt: a worker whose lease was taken over
    /// cannot overwrite its successor's result.
    pub attempt: u32,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    Succeeded(serde_json::Value),
    /// A transient failure: try again after `delay`.
    Retry {
        error: String,
        delay: Duration,
    },
    /// A permanent failure (or the last attempt): the run fails.
    Failed(String),
}

type StepStateRow = (
    String,
    i32,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
);

impl PgStore {
    /// Leases step `stage` of a run for `lease`, unless it is done, held,
    /// not due, or out of attempts under `retry` (the worker's policy; the
    /// action's override applies on top).
    pub async fn claim_step(
        &self,
        run_id: Uuid,
        stage: u32,
        lease: Duration,
        retry: &RetryPolicy,
    ) -> Result<StepClaim> {
        let (run, action_type) = match self.run_to_claim(run_id, stage).await? {
            Ok(found) => found,
            Err(answer) => return Ok(answer),
        };

        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO zap_run_steps (run_id, step, action_type, status)
             VALUES ($1, $2, $3, 'pending') ON CONFLICT DO NOTHING",
        )
        .bind(run_id)
        .bind(stage as i32)
        .bind(&action_type)
        .execute(&mut *tx)
        .await?;
        // The database's clock, as for every lease and due time it wrote.
        let (status, attempts, lease_until, retry_at, now): StepStateRow = sqlx::query_as(
            "SELECT status, attempts, lease_until, retry_at, now() FROM zap_run_steps
             WHERE run_id = $1 AND step = $2 FOR UPDATE",
        )
        .bind(run_id)
        .bind(stage as i32)
        .fetch_one(&mut *tx)
        .await?;
        let state = StepState {
            status: parse_status(&status)?,
            attempts: attempts as u32,
            lease_until,
            retry_at,
        };
        let attempt = match decide(&state, now, max_attempts(&run, stage, retry)) {
            Decision::Leave(answer) => return Ok(answer),
            Decision::GiveUp { error, abandoned } => {
                let step = ClaimedStep {
                    run,
                    stage,
                    attempt: state.attempts,
                };
                give_up(&mut tx, &step, &error, abandoned).await?;
                tx.commit().await?;
                return Ok(StepClaim::Exhausted { error });
            }
            Decision::Claim => state.attempts + 1,
        };
        sqlx::query(
            "UPDATE zap_run_steps
             SET status = 'running', attempts = $3, retry_at = NULL,
                 lease_until = now() + $4 * interval '1 microsecond',
                 started_at = coalesce(started_at, now())
             WHERE run_id = $1 AND step = $2",
        )
        .bind(run_id)
        .bind(stage as i32)
        .bind(attempt as i32)
        .bind(micros(lease))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE zap_runs SET status = 'running', updated_at = now()
             WHERE id = $1 AND status = 'pending'",
        )
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(StepClaim::Claimed(Box::new(ClaimedStep {
            run,
            stage,
            attempt,
        })))
    }

    /// Records how an attempt ended and, in the same transaction, announces
    /// what follows: the next step, a delayed retry, or a dead letter.
    /// Returns false (and changes nothing) when the lease was lost.
    pub async fn finish_step(&self, step: &ClaimedStep, outcome: &StepOutcome) -> Result<bool> {
        let outcome = outcome.storable();
        let (status, output, error) = outcome.recorded();
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE zap_run_steps
             SET status = $4, output = $5, error = $6, lease_until = NULL,
                 finished_at = CASE WHEN $4 = 'retrying' THEN NULL ELSE now() END,
                 retry_at = CASE WHEN $4 = 'retrying' THEN now() + $8 * interval '1 microsecond' END,
                 history = history || jsonb_build_array($7::jsonb)
             WHERE run_id = $1 AND step = $2 AND attempts = $3 AND status = 'running'",
        )
        .bind(step.run.id)
        .bind(step.stage as i32)
        .bind(step.attempt as i32)
        .bind(status)
        .bind(output.map(Json))
        .bind(error)
        .bind(Json(step.attempt_record(&outcome, Utc::now())))
        .bind(micros(outcome.retry_delay()))
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(false);
        }
        follow_up(&mut tx, step, &outcome).await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// Fails a step whose attempts are used up, keeping the history entry of
/// an attempt that was never recorded, and fails its run.
async fn give_up(
    tx: &mut Transaction<'_, Postgres>,
    step: &ClaimedStep,
    error: &str,
    abandoned: Option<Attempt>,
) -> Result<()> {
    sqlx::query(
        "UPDATE zap_run_steps
         SET status = 'failed', error = $3, lease_until = NULL, retry_at = NULL, finished_at = now(),
             history = CASE WHEN $4::jsonb IS NULL THEN history
                            ELSE history || jsonb_build_array($4::jsonb) END
         WHERE run_id = $1 AND step = $2",
    )
    .bind(step.run.id)
    .bind(step.stage as i32)
    .bind(error)
    .bind(abandoned.map(Json))
    .execute(&mut **tx)
    .await?;
    follow_up(tx, step, &StepOutcome::Failed(error.to_owned())).await
}

/// What follows a recorded outcome: its outbox row and the run's status.
async fn follow_up(
    tx: &mut Transaction<'_, Postgres>,
    step: &ClaimedStep,
    outcome: &StepOutcome,
) -> Result<()> {
    let run = &step.run;
    let (stage, kind, reason, delay, run_status) = step.next(outcome);
    if let Some(stage) = stage {
        enqueue(tx, run.id, run.zap_id, stage, kind, reason, delay).await?;
    }
    sqlx::query(
        "UPDATE zap_runs
         SET status = $2, updated_at = now(),
             finished_at = CASE WHEN $2 IN ('succeeded', 'failed') THEN now() END
         WHERE id = $1",
    )
    .bind(run.id)
    .bind(run_status.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
