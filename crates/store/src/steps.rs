use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use crate::outbox::{enqueue, micros};
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

impl PgStore {
    /// Leases step `stage` of a run for `lease`, unless it is done or held.
    pub async fn claim_step(&self, run_id: Uuid, stage: u32, lease: Duration) -> Result<StepClaim> {
        let Some(run) = self.run(run_id).await? else {
            return Ok(StepClaim::Unknown);
        };
        if run.status.is_final() {
            return Ok(StepClaim::RunFinished);
        }
        let Some(action) = run.actions.get(stage as usize) else {
            return Ok(StepClaim::Unknown);
        };

        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO zap_run_steps (run_id, step, action_type, status)
             VALUES ($1, $2, $3, 'pending') ON CONFLICT DO NOTHING",
        )
        .bind(run_id)
        .bind(stage as i32)
        .bind(&action.action_type)
        .execute(&mut *tx)
        .await?;
        let claimed: Option<(i32,)> = sqlx::query_as(
            "UPDATE zap_run_steps
             SET status = 'running', attempts = attempts + 1, lease_until = now() + $3 * interval '1 microsecond',
                 started_at = coalesce(started_at, now())
             WHERE run_id = $1 AND step = $2
               AND (status IN ('pending', 'retrying')
                    OR (status = 'running' AND lease_until < now()))
             RETURNING attempts",
        )
        .bind(run_id)
        .bind(stage as i32)
        .bind(micros(lease))
        .fetch_optional(&mut *tx)
        .await?;
        let Some((attempt,)) = claimed else {
            let (status, lease_until): (String, Option<DateTime<Utc>>) = sqlx::query_as(
                "SELECT status, lease_until FROM zap_run_steps WHERE run_id = $1 AND step = $2",
            )
            .bind(run_id)
            .bind(stage as i32)
            .fetch_one(&mut *tx)
            .await?;
            return Ok(match (status.as_str(), lease_until) {
                ("running", Some(lease_until)) => StepClaim::Busy { lease_until },
                _ => StepClaim::AlreadyDone,
            });
        };
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
            attempt: attempt as u32,
        })))
    }

    /// Records how an attempt ended and, in the same transaction, announces
    /// what follows: the next step, a delayed retry, or a dead letter.
    /// Returns false (and changes nothing) when the lease was lost.
    pub async fn finish_step(&self, step: &ClaimedStep, outcome: &StepOutcome) -> Result<bool> {
        let run = &step.run;
        let (status, output, error) = outcome.recorded();
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE zap_run_steps
             SET status = $4, output = $5, error = $6, lease_until = NULL,
                 finished_at = CASE WHEN $4 = 'retrying' THEN NULL ELSE now() END,
                 history = history || jsonb_build_array($7::jsonb)
             WHERE run_id = $1 AND step = $2 AND attempts = $3 AND status = 'running'",
        )
        .bind(run.id)
        .bind(step.stage as i32)
        .bind(step.attempt as i32)
        .bind(status)
        .bind(output.map(Json))
        .bind(error)
        .bind(Json(step.attempt_record(outcome, chrono::Utc::now())))
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(false);
        }

        let (stage, kind, reason, delay, run_status) = step.next(outcome);
        if let Some(stage) = stage {
            enqueue(&mut tx, run.id, run.zap_id, stage, kind, reason, delay).await?;
        }
        sqlx::query(
            "UPDATE zap_runs
             SET status = $2, updated_at = now(),
                 finished_at = CASE WHEN $2 IN ('succeeded', 'failed') THEN now() END
             WHERE id = $1",
        )
        .bind(run.id)
        .bind(run_status.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}
