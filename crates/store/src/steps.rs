//! Steps: claiming one for an attempt, and recording how the attempt ended
//! together with what follows (the next step, a retry, a dead letter).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;
use zapflow_core::retry::RetryPolicy;
use zapflow_core::{Attempt, AttemptOutcome, RunStatus, StepStatus};

use crate::claim::{Decision, StepState, decide, max_attempts};
use crate::db::{Arg, Dialect, PlannedEachTime, Stamp, Tx, sql};
use crate::group_commit::each_alone_on_refusal;
use crate::outbox::{Announcement, OutboxRow, delete_outbox_rows, enqueue, lease_due};
use crate::runs::{run_before, runs_before_first_step};
use crate::{Result, Run, Store, parse_status};

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
    Exhausted {
        error: String,
        /// The step's action type.
        action: String,
    },
    /// The run is over (succeeded or failed).
    RunFinished,
    /// No such run, or no such step in it.
    Unknown,
}

#[derive(Debug)]
pub struct ClaimedStep {
    /// The run as it was when claimed, with the earlier steps' outputs (this
    /// step and later ones read as pending: a worker does not need them).
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
    /// Succeeded, and ends the run here, succeeded (a filter said no):
    /// later steps are skipped.
    Stopped {
        output: serde_json::Value,
        reason: String,
    },
    /// Succeeded, and the next step runs at `until` (a delay).
    Waiting {
        output: serde_json::Value,
        until: DateTime<Utc>,
    },
    /// A transient failure: try again after `delay`.
    Retry {
        error: String,
        delay: Duration,
    },
    /// A permanent failure (or the last attempt): the run fails.
    Failed(String),
}

/// Whether outcomes that start no further work (a run's last step, with
/// no outbox row to add) are committed at once, or may wait a moment in the
/// embedded database for another write to share their commit and its sync
/// to disk: worth it while the worker has steps to spare, whose callers
/// are not held up by the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    Urgent,
    CanWait,
}

/// An attempt's outcome to record ([`Store::finish_steps`]).
#[derive(Debug)]
pub struct Finish<'a> {
    pub step: &'a ClaimedStep,
    pub outcome: &'a StepOutcome,
    /// The outbox row that announced the step, when a worker leased it
    /// from the outbox: deleted in the same transaction.
    pub outbox_row: Option<i64>,
    /// The attempt's trace context, kept with the outbox row that follows.
    pub trace_parent: Option<String>,
}

impl Store {
    /// Leases step `stage` of a run for `lease`, unless it is done, held by
    /// another worker, waiting for a retry not yet due, or out of attempts
    /// under `retry` (the worker's policy; the action's override applies on
    /// top). A step out of attempts is failed, with its run, and
    /// dead-lettered ([`StepClaim::Exhausted`]).
    pub async fn claim_step(
        &self,
        run_id: Uuid,
        stage: u32,
        lease: Duration,
        retry: &RetryPolicy,
    ) -> Result<StepClaim> {
        let mut claims = self.claim_steps(&[(run_id, stage)], lease, retry).await?;
        Ok(claims.remove(0))
    }

    /// [`claim_step`](Self::claim_step) for each `(run id, stage)`, in one
    /// transaction; the answers in order.
    pub async fn claim_steps(
        &self,
        steps: &[(Uuid, u32)],
        lease: Duration,
        retry: &RetryPolicy,
    ) -> Result<Vec<StepClaim>> {
        let mut tx = self.db.begin().await?;
        let claims = claim_each(&mut tx, steps, lease, retry).await?;
        tx.commit().await?;
        Ok(claims)
    }

    /// Leases up to `limit` due step rows, as
    /// [`lease_due_outbox_rows`](Self::lease_due_outbox_rows), and claims
    /// each one's step, as [`claim_step`](Self::claim_step), in one
    /// transaction: a worker taking its work from the outbox pays one commit
    /// for both. A claim the database refuses fails them all: then lease
    /// alone and claim each step on its own.
    pub async fn lease_and_claim_due_steps(
        &self,
        limit: u32,
        lease: Duration,
        retry: &RetryPolicy,
    ) -> Result<Vec<(OutboxRow, StepClaim)>> {
        let mut tx = self.db.begin().await?;
        let rows = lease_due(&mut tx, limit, lease).await?;
        let steps: Vec<(Uuid, u32)> = rows.iter().map(|row| (row.run_id, row.stage)).collect();
        let claims = claim_each(&mut tx, &steps, lease, retry).await?;
        tx.commit().await?;
        Ok(rows.into_iter().zip(claims).collect())
    }

    /// [`claim_steps`](Self::claim_steps), where a claim the database
    /// refuses fails alone. `Err` means the database did not answer.
    pub async fn claim_steps_isolated(
        &self,
        steps: &[(Uuid, u32)],
        lease: Duration,
        retry: &RetryPolicy,
    ) -> Result<Vec<Result<StepClaim>>> {
        each_alone_on_refusal(steps, "claims", |steps| {
            self.claim_steps(steps, lease, retry)
        })
        .await
    }

    /// Records how an attempt ended and, in the same transaction, announces
    /// what follows: the next step, a delayed retry, or a dead letter.
    /// Returns false (and changes nothing) when the lease was lost.
    pub async fn finish_step(&self, step: &ClaimedStep, outcome: &StepOutcome) -> Result<bool> {
        let finish = Finish {
            step,
            outcome,
            outbox_row: None,
            trace_parent: None,
        };
        let mut finished = self.finish_steps(&[finish]).await?;
        Ok(finished.remove(0))
    }

    /// [`finish_step`](Self::finish_step) for each attempt, in one
    /// transaction; whether each was recorded, in order.
    pub async fn finish_steps(&self, finishes: &[Finish<'_>]) -> Result<Vec<bool>> {
        self.finish_steps_with(finishes, Patience::Urgent).await
    }

    /// [`finish_steps`](Self::finish_steps), committed as `patience` says.
    async fn finish_steps_with(
        &self,
        finishes: &[Finish<'_>],
        patience: Patience,
    ) -> Result<Vec<bool>> {
        let now = Utc::now();
        let last_steps = match self.db.dialect() {
            Dialect::Postgres => LastSteps::among(finishes, now),
            Dialect::Sqlite => LastSteps::default(),
        };
        if !finishes.is_empty() && last_steps.len() == finishes.len() {
            // One statement records every outcome, their outbox rows
            // included: atomic alone, it needs no transaction around it.
            let ended = self
                .db
                .fetch_all(RECORD_LAST_STEPS, &last_steps.args(now)?)
                .await?;
            return Ok(last_steps
                .answers(finishes, ended)
                .into_iter()
                .flatten()
                .collect());
        }
        let mut tx = self.db.begin().await?;
        let answers = match last_steps.len() {
            0 => finishes.iter().map(|_| None).collect(),
            _ => {
                let ended = tx
                    .fetch_all(RECORD_LAST_STEPS, &last_steps.args(now)?)
                    .await?;
                last_steps.answers(finishes, ended)
            }
        };
        let mut recorded = Vec::with_capacity(finishes.len());
        let mut handled_rows = Vec::new();
        for (finish, answer) in finishes.iter().zip(answers) {
            let done = match answer {
                Some(done) => done,
                None => {
                    let done = record(&mut tx, finish, now).await?;
                    if done {
                        handled_rows.extend(finish.outbox_row);
                    }
                    done
                }
            };
            recorded.push(done);
        }
        if !handled_rows.is_empty() {
            delete_outbox_rows(&mut tx, &handled_rows).await?;
        }
        match patience {
            Patience::Urgent => tx.commit().await?,
            Patience::CanWait => tx.commit_lingering().await?,
        }
        Ok(recorded)
    }

    /// [`finish_steps`](Self::finish_steps), where an outcome the database
    /// refuses fails alone. `Err` means the database did not answer.
    pub async fn finish_steps_isolated(
        &self,
        finishes: &[Finish<'_>],
        patience: Patience,
    ) -> Result<Vec<Result<bool>>> {
        each_alone_on_refusal(finishes, "step outcomes", |finishes| {
            self.finish_steps_with(finishes, patience)
        })
        .await
    }
}

/// Claims each `(run id, stage)` inside the caller's transaction; the
/// answers in order. On PostgreSQL, where every statement is a round trip,
/// the first attempts of runs' first steps are claimed together
/// ([`claim_first_attempts`]); every other step is claimed on its own.
async fn claim_each(
    tx: &mut Tx,
    steps: &[(Uuid, u32)],
    lease: Duration,
    retry: &RetryPolicy,
) -> Result<Vec<StepClaim>> {
    let first_attempts = match tx.dialect() {
        Dialect::Postgres => claim_first_attempts(tx, steps, lease, retry).await?,
        Dialect::Sqlite => steps.iter().map(|_| None).collect(),
    };
    let mut claims = Vec::with_capacity(steps.len());
    for (&(run_id, stage), claimed) in steps.iter().zip(first_attempts) {
        claims.push(match claimed {
            Some(claimed) => claimed,
            None => claim(tx, run_id, stage, lease, retry).await?,
        });
    }
    Ok(claims)
}

/// Claims the first steps among `steps` that have never been claimed (no
/// step row yet) and that [`decide`] gives their first attempt: the common
/// case, a run's first delivery. Two statements for all of them: one reads
/// the runs, one adds the steps' rows and starts the runs. Each answer is
/// `None` where the step is not such a step (a later stage, a step claimed
/// before, a run repeated in `steps`, finished or gone): [`claim`] decides
/// those alone.
async fn claim_first_attempts(
    tx: &mut Tx,
    steps: &[(Uuid, u32)],
    lease: Duration,
    retry: &RetryPolicy,
) -> Result<Vec<Option<StepClaim>>> {
    let mut claims: Vec<Option<StepClaim>> = steps.iter().map(|_| None).collect();
    let mut seen = HashSet::new();
    let wanted: Vec<usize> = (0..steps.len())
        .filter(|&index| steps[index].1 == 0 && seen.insert(steps[index].0))
        .collect();
    if wanted.is_empty() {
        return Ok(claims);
    }
    let ids: Vec<Uuid> = wanted.iter().map(|&index| steps[index].0).collect();
    let mut runs: HashMap<Uuid, Run> = runs_before_first_step(tx, &ids)
        .await?
        .into_iter()
        .map(|run| (run.id, run))
        .collect();
    let now = Utc::now();
    let never_claimed = StepState {
        status: StepStatus::Pending,
        attempts: 0,
        lease_until: None,
        retry_at: None,
    };
    let mut candidates: Vec<(usize, Run)> = wanted
        .into_iter()
        .filter_map(|index| Some((index, runs.remove(&steps[index].0)?)))
        .filter(|(_, run)| {
            !run.status.is_final()
                && !run.actions.is_empty()
                && matches!(
                    decide(&never_claimed, now, max_attempts(run, 0, retry)),
                    Decision::Claim
                )
        })
        .collect();
    if candidates.is_empty() {
        return Ok(claims);
    }
    // Rows go in in one order whoever inserts them, so that two workers
    // handed the same runs wait for each other instead of deadlocking.
    candidates.sort_by_key(|(_, run)| run.id);
    let first_steps: Vec<Value> = candidates
        .iter()
        .map(|(_, run)| {
            json!({
                "run_id": run.id,
                "action_type": run.actions[0].action_type,
                "starts": starts(run),
            })
        })
        .collect();
    // The step rows added, and their runs started, as [`claim`] and
    // [`start_run`] do one by one. The LIMIT tells the planner the batch's
    // size (it takes a set read from JSON for 100 rows, and would join
    // them by reading the table whole).
    let inserted: Vec<(Uuid,)> = tx
        .fetch_all(
            PlannedEachTime(
                "WITH first AS (
                     SELECT * FROM jsonb_to_recordset($1)
                         AS first(run_id uuid, action_type text, starts boolean)
                     LIMIT $4
                 ), inserted AS (
                     INSERT INTO zap_run_steps (run_id, step, action_type, status, attempts,
                                                lease_until, started_at)
                     SELECT run_id, 0, action_type, 'running', 1, $2, $3 FROM first
                     ON CONFLICT (run_id, step) DO NOTHING
                     RETURNING run_id
                 ), started AS (
                     UPDATE zap_runs SET status = 'running', resume_at = NULL, updated_at = $3
                     FROM inserted JOIN first USING (run_id)
                     WHERE zap_runs.id = inserted.run_id AND first.starts
                       AND zap_runs.status IN ('pending', 'running')
                 )
                 SELECT run_id FROM inserted",
            ),
            &[
                Arg::json(&first_steps)?,
                Arg::after(lease),
                now.into(),
                (first_steps.len() as i64).into(),
            ],
        )
        .await?;
    let inserted: HashSet<Uuid> = inserted.into_iter().map(|(id,)| id).collect();
    for (index, run) in candidates {
        if inserted.contains(&run.id) {
            claims[index] = Some(StepClaim::Claimed(Box::new(ClaimedStep {
                run,
                stage: 0,
                attempt: 1,
            })));
        }
    }
    Ok(claims)
}

/// Claims one step inside the caller's transaction (see
/// [`Store::claim_step`]).
async fn claim(
    tx: &mut Tx,
    run_id: Uuid,
    stage: u32,
    lease: Duration,
    retry: &RetryPolicy,
) -> Result<StepClaim> {
    let Some(run) = run_before(tx, run_id, stage).await? else {
        return Ok(StepClaim::Unknown);
    };
    if run.status.is_final() {
        return Ok(StepClaim::RunFinished);
    }
    let Some(action) = run.actions.get(stage as usize) else {
        return Ok(StepClaim::Unknown);
    };
    // Added if missing and, on PostgreSQL, locked (a conflicting upsert
    // locks the row it updates); on SQLite the transaction is the only
    // writer.
    let (status, attempts, lease_until, retry_at): StepStateRow = tx
        .fetch_one(
            "INSERT INTO zap_run_steps (run_id, step, action_type, status)
             VALUES ($1, $2, $3, 'pending')
             ON CONFLICT (run_id, step) DO UPDATE SET status = zap_run_steps.status
             RETURNING status, attempts, lease_until, retry_at",
            &[
                run_id.into(),
                stage.into(),
                action.action_type.as_str().into(),
            ],
        )
        .await?;
    let state = StepState {
        status: parse_status(&status)?,
        attempts: attempts as u32,
        lease_until: lease_until.map(|Stamp(at)| at),
        retry_at: retry_at.map(|Stamp(at)| at),
    };
    let now = Utc::now();
    let attempt = match decide(&state, now, max_attempts(&run, stage, retry)) {
        Decision::Leave(answer) => return Ok(answer),
        Decision::GiveUp { error, abandoned } => {
            let action = action.action_type.clone();
            let step = ClaimedStep {
                run,
                stage,
                attempt: state.attempts,
            };
            give_up(tx, &step, &error, abandoned, now).await?;
            return Ok(StepClaim::Exhausted { error, action });
        }
        Decision::Claim => state.attempts + 1,
    };
    tx.execute(
        "UPDATE zap_run_steps
         SET status = 'running', attempts = $3, retry_at = NULL, lease_until = $4,
             started_at = coalesce(started_at, $5)
         WHERE run_id = $1 AND step = $2",
        &[
            run_id.into(),
            stage.into(),
            attempt.into(),
            Arg::after(lease),
            now.into(),
        ],
    )
    .await?;
    start_run(tx, &run, now).await?;
    Ok(StepClaim::Claimed(Box::new(ClaimedStep {
        run,
        stage,
        attempt,
    })))
}

/// Whether claiming a step of `run` starts it, or lets it go on after a
/// delay.
fn starts(run: &Run) -> bool {
    run.status == RunStatus::Pending || run.resume_at.is_some()
}

/// Starts a run, or lets it go on after a delay, as one of its steps is
/// claimed (see [`starts`]).
async fn start_run(tx: &mut Tx, run: &Run, now: DateTime<Utc>) -> Result<()> {
    if starts(run) {
        tx.execute(
            "UPDATE zap_runs SET status = 'running', resume_at = NULL, updated_at = $2
             WHERE id = $1 AND status IN ('pending', 'running')",
            &[run.id.into(), now.into()],
        )
        .await?;
    }
    Ok(())
}

/// The outcomes among a batch that end their runs (PostgreSQL), recorded
/// with one statement for all of them: [`RECORD_LAST_STEPS`]. The others
/// (an outcome followed by another step, a retry or a dead letter, or a
/// second one for the same step) [`record`] records one by one.
#[derive(Default)]
struct LastSteps {
    /// Each one's index in the batch, and its row for the statement.
    rows: Vec<(usize, Value)>,
}

impl LastSteps {
    fn among(finishes: &[Finish<'_>], now: DateTime<Utc>) -> Self {
        let mut seen = HashSet::new();
        let mut rows = Vec::new();
        for (index, finish) in finishes.iter().enumerate() {
            let step = finish.step;
            let outcome = finish.outcome.storable();
            let next = step.next(&outcome);
            if !seen.insert((step.run.id, step.stage)) || next.announce.is_some() {
                continue;
            }
            let recorded = outcome.recorded();
            let (stop_reason, resume_at) = outcome.run_change();
            // The output as JSON text, so that a JSON null stays one.
            let output = recorded.output.map(Value::to_string);
            rows.push((
                index,
                json!({
                    "run_id": step.run.id,
                    "step": step.stage,
                    "attempt": step.attempt,
                    "status": recorded.status.as_str(),
                    "output": output,
                    "error": recorded.error,
                    "entry": step.attempt_record(&outcome, now),
                    "run_status": next.run_status.as_str(),
                    "stop_reason": stop_reason,
                    "resume_at": resume_at,
                    "outbox_row": finish.outbox_row,
                }),
            ));
        }
        // In one order whoever records them (see [`claim_first_attempts`]).
        rows.sort_by_key(|(index, _)| finishes[*index].step.run.id);
        Self { rows }
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    /// The statement's parameters.
    fn args(&self, now: DateTime<Utc>) -> Result<[Arg<'static>; 3]> {
        let rows: Vec<&Value> = self.rows.iter().map(|(_, row)| row).collect();
        Ok([Arg::json(&rows)?, now.into(), (rows.len() as i64).into()])
    }

    /// For each outcome of the batch, whether it was recorded, given the
    /// runs the statement ended; `None` where [`record`] records it.
    fn answers(&self, finishes: &[Finish<'_>], ended: Vec<(Uuid,)>) -> Vec<Option<bool>> {
        let ended: HashSet<Uuid> = ended.into_iter().map(|(id,)| id).collect();
        let mut answers: Vec<Option<bool>> = finishes.iter().map(|_| None).collect();
        for (index, _) in &self.rows {
            answers[*index] = Some(ended.contains(&finishes[*index].step.run.id));
        }
        answers
    }
}

/// Records the outcomes that end their runs ([`LastSteps`]): the steps'
/// rows and the runs', as [`record`] does one by one, and deletes the
/// outbox rows that announced them. Returns the runs ended. The LIMIT
/// tells the planner the batch's size (see [`claim_first_attempts`]); each
/// write returns what the next needs, so the batch is joined once, to the
/// steps, and the planner weighs no join of it with the rows written.
const RECORD_LAST_STEPS: PlannedEachTime<&str> = PlannedEachTime(
    "WITH finished AS (
         SELECT * FROM jsonb_to_recordset($1) AS finished(
             run_id uuid, step int, attempt int, status text, output text,
             error text, entry jsonb, run_status text, stop_reason text,
             resume_at timestamptz, outbox_row bigint)
         LIMIT $3
     ), recorded AS (
         UPDATE zap_run_steps
         SET status = finished.status, output = finished.output::jsonb,
             error = finished.error, lease_until = NULL, finished_at = $2,
             retry_at = NULL, history = history || jsonb_build_array(finished.entry)
         FROM finished
         WHERE zap_run_steps.run_id = finished.run_id
           AND zap_run_steps.step = finished.step
           AND zap_run_steps.attempts = finished.attempt
           AND zap_run_steps.status = 'running'
         RETURNING zap_run_steps.run_id, finished.run_status, finished.stop_reason,
                   finished.resume_at, finished.outbox_row
     ), ended AS (
         UPDATE zap_runs
         SET status = recorded.run_status, updated_at = $2,
             finished_at = CASE WHEN recorded.run_status IN ('succeeded', 'failed')
                                THEN $2 END,
             stop_reason = recorded.stop_reason, resume_at = recorded.resume_at
         FROM recorded
         WHERE zap_runs.id = recorded.run_id
         RETURNING zap_runs.id, recorded.outbox_row
     ), handled AS (
         DELETE FROM zap_run_outbox
         USING ended
         WHERE zap_run_outbox.id = ended.outbox_row
     )
     SELECT id FROM ended",
);

/// Records one attempt's outcome inside the caller's transaction (see
/// [`Store::finish_step`]), but for deleting its outbox row, which the
/// caller does for the batch.
async fn record(tx: &mut Tx, finish: &Finish<'_>, now: DateTime<Utc>) -> Result<bool> {
    let step = finish.step;
    let outcome = finish.outcome.storable();
    let recorded = outcome.recorded();
    let updated = tx
        .execute(
            sql!(
                "UPDATE zap_run_steps
                 SET status = $4, output = $5, error = $6, lease_until = NULL,
                     finished_at = CASE WHEN $4 = 'retrying' THEN NULL ELSE $7 END,
                     retry_at = CASE WHEN $4 = 'retrying' THEN $9 END,
                     history = ";
                postgres: "history || jsonb_build_array($8)",
                sqlite: "json_insert(history, '$[#]', json($8))";
                " WHERE run_id = $1 AND step = $2 AND attempts = $3 AND status = 'running'"
            ),
            &[
                step.run.id.into(),
                step.stage.into(),
                step.attempt.into(),
                recorded.status.as_str().into(),
                Arg::json_or_null(recorded.output)?,
                recorded.error.into(),
                now.into(),
                Arg::json(&step.attempt_record(&outcome, now))?,
                Arg::after(outcome.retry_delay()),
            ],
        )
        .await?;
    if updated == 0 {
        return Ok(false);
    }
    follow_up(tx, step, &outcome, finish.trace_parent.as_deref(), now).await?;
    Ok(true)
}

/// Fails a step whose attempts are used up, keeping the history entry of
/// an attempt that was never recorded, and fails its run.
async fn give_up(
    tx: &mut Tx,
    step: &ClaimedStep,
    error: &str,
    abandoned: Option<Attempt>,
    now: DateTime<Utc>,
) -> Result<()> {
    tx.execute(
        sql!(
            "UPDATE zap_run_steps
             SET status = 'failed', error = $3, lease_until = NULL, retry_at = NULL, finished_at = $4,
                 history = CASE WHEN $5 IS NULL THEN history ELSE ";
            postgres: "history || jsonb_build_array($5)",
            sqlite: "json_insert(history, '$[#]', json($5))";
            " END WHERE run_id = $1 AND step = $2"
        ),
        &[
            step.run.id.into(),
            step.stage.into(),
            error.into(),
            now.into(),
            Arg::json_or_null(abandoned.as_ref())?,
        ],
    )
    .await?;
    follow_up(tx, step, &StepOutcome::Failed(error.to_owned()), None, now).await
}

/// What follows a recorded outcome: its outbox row and the run's status.
async fn follow_up(
    tx: &mut Tx,
    step: &ClaimedStep,
    outcome: &StepOutcome,
    trace_parent: Option<&str>,
    now: DateTime<Utc>,
) -> Result<()> {
    let run = &step.run;
    let next = step.next(outcome);
    if let Some(announcement) = next.announce {
        let announcement = Announcement {
            trace_parent,
            ..announcement
        };
        enqueue(tx, run.id, run.zap_id, announcement).await?;
    }
    let (stop_reason, resume_at) = outcome.run_change();
    tx.execute(
        "UPDATE zap_runs SET status = $2, updated_at = $3,
             finished_at = CASE WHEN $2 IN ('succeeded', 'failed') THEN $3 END,
             stop_reason = $4, resume_at = $5
         WHERE id = $1",
        &[
            run.id.into(),
            next.run_status.as_str().into(),
            now.into(),
            stop_reason.into(),
            resume_at.into(),
        ],
    )
    .await?;
    Ok(())
}

type StepStateRow = (String, i32, Option<Stamp>, Option<Stamp>);

/// A step's new status, output and error as stored.
struct Recorded<'a> {
    status: StepStatus,
    output: Option<&'a Value>,
    error: Option<&'a str>,
}

/// What follows an attempt: the outbox row to add, if any, and the run's
/// status.
struct Next<'a> {
    announce: Option<Announcement<'a>>,
    run_status: RunStatus,
}

impl StepOutcome {
    fn recorded(&self) -> Recorded<'_> {
        match self {
            Self::Succeeded(output)
            | Self::Stopped { output, .. }
            | Self::Waiting { output, .. } => Recorded {
                status: StepStatus::Succeeded,
                output: Some(output),
                error: None,
            },
            Self::Retry { error, .. } => Recorded {
                status: StepStatus::Retrying,
                output: None,
                error: Some(error),
            },
            Self::Failed(error) => Recorded {
                status: StepStatus::Failed,
                output: None,
                error: Some(error),
            },
        }
    }

    /// The run's stop reason and the time it resumes at, after this outcome.
    fn run_change(&self) -> (Option<&str>, Option<DateTime<Utc>>) {
        match self {
            Self::Stopped { reason, .. } => (Some(reason.as_str()), None),
            Self::Waiting { until, .. } => (None, Some(*until)),
            _ => (None, None),
        }
    }

    fn attempt_outcome(&self) -> AttemptOutcome {
        match self {
            Self::Succeeded(_) | Self::Stopped { .. } | Self::Waiting { .. } => {
                AttemptOutcome::Succeeded
            }
            Self::Retry { .. } => AttemptOutcome::Retrying,
            Self::Failed(_) => AttemptOutcome::Failed,
        }
    }

    /// How long until the next attempt (zero unless a retry).
    fn retry_delay(&self) -> Duration {
        match self {
            Self::Retry { delay, .. } => *delay,
            _ => Duration::ZERO,
        }
    }
}

impl ClaimedStep {
    /// The history entry of this attempt ending with `outcome` at `now`.
    fn attempt_record(&self, outcome: &StepOutcome, now: DateTime<Utc>) -> Attempt {
        Attempt {
            number: self.attempt,
            outcome: outcome.attempt_outcome(),
            error: outcome.recorded().error.map(str::to_owned),
            finished_at: now,
        }
    }

    /// What follows an attempt's outcome: the next step, the same step
    /// again after the retry delay, or a dead letter; nothing once the run
    /// succeeded.
    fn next<'a>(&self, outcome: &'a StepOutcome) -> Next<'a> {
        let step = |stage, delay| Announcement::step(stage, delay);
        let next_stage = self.stage + 1;
        match outcome {
            StepOutcome::Succeeded(_) if (next_stage as usize) < self.run.actions.len() => Next {
                announce: Some(step(next_stage, Duration::ZERO)),
                run_status: RunStatus::Running,
            },
            StepOutcome::Waiting { until, .. }
                if (next_stage as usize) < self.run.actions.len() =>
            {
                let wait = (*until - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                Next {
                    announce: Some(step(next_stage, wait)),
                    run_status: RunStatus::Running,
                }
            }
            StepOutcome::Succeeded(_)
            | StepOutcome::Stopped { .. }
            | StepOutcome::Waiting { .. } => Next {
                announce: None,
                run_status: RunStatus::Succeeded,
            },
            StepOutcome::Retry { delay, .. } => Next {
                announce: Some(step(self.stage, *delay)),
                run_status: RunStatus::Running,
            },
            StepOutcome::Failed(reason) => Next {
                announce: Some(Announcement::dead_letter(self.stage, reason)),
                run_status: RunStatus::Failed,
            },
        }
    }
}
