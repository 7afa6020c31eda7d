//! Runs: one webhook delivery (or one tick of a schedule) each, with its
//! steps.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use uuid::Uuid;
use zapflow_core::{ActionSpec, Attempt, RunStatus, StepStatus};

use crate::db::from_sqlite;
use crate::db::{Arg, Dialect, Tx, instant_after};
use crate::group_commit::each_alone_on_refusal;
use crate::outbox::{Announcement, OutboxKind, OutboxRow};
use crate::parse_status;
use crate::steps::ClaimedStep;
use crate::{Result, Store, StoreError};

/// A webhook delivery to record as a run.
#[derive(Debug, Clone, Serialize)]
pub struct NewRun {
    pub id: Uuid,
    pub zap_id: Uuid,
    pub owner_id: Uuid,
    pub trigger: serde_json::Value,
    pub headers: serde_json::Value,
    pub query: serde_json::Value,
    pub actions: Vec<ActionSpec>,
    pub idempotency_key: Option<String>,
    /// The trace context of the delivery, kept with its first outbox row.
    pub trace_parent: Option<String>,
    /// For a run of a scheduled zap: the tick it runs for.
    pub scheduled_time: Option<DateTime<Utc>>,
}

/// A run with its steps (every action of the run, started or not).
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: Uuid,
    pub zap_id: Uuid,
    pub owner_id: Uuid,
    pub status: RunStatus,
    pub trigger: serde_json::Value,
    pub headers: serde_json::Value,
    pub query: serde_json::Value,
    pub actions: Vec<ActionSpec>,
    pub steps: Vec<Step>,
    /// The run this one replays.
    pub replay_of: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// For a run of a scheduled zap: the tick it runs for.
    pub scheduled_time: Option<DateTime<Utc>>,
    /// Why a filter ended the run early.
    pub stop_reason: Option<String>,
    /// While a delay holds the run: when its next step runs.
    pub resume_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub index: u32,
    pub action_type: String,
    pub status: StepStatus,
    pub attempts: u32,
    pub output: Option<serde_json::Value>,
    pub error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Every finished attempt, oldest first.
    pub history: Vec<Attempt>,
}

/// How a delivery was recorded by [`Store::insert_runs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedRun {
    /// The run: the new one, or the earlier run of a repeated key.
    pub id: Uuid,
    /// The delivery repeated an idempotency key already recorded (and
    /// nothing was written).
    pub repeated: bool,
}

/// A webhook delivery to record ([`Store::insert_deliveries`]).
#[derive(Debug, Clone)]
pub struct Delivery {
    pub run: NewRun,
    /// Starts the run in the commit that records it, for a worker of this
    /// process that takes it from the answer ([`Started`]) instead of the
    /// outbox: its first step claimed, and its outbox row leased, for this
    /// long. A run without actions never starts this way.
    pub start_for: Option<Duration>,
}

/// A run started as it was recorded ([`Delivery::start_for`]): its first
/// step, claimed for its first attempt, and the outbox row announcing it,
/// leased for as long. A worker that does not record the step's outcome
/// leaves both to lapse, and the row comes due again, as any leased row.
#[derive(Debug)]
pub struct Started {
    pub row: OutboxRow,
    pub step: ClaimedStep,
}

/// The replay of a run. A run has at most one: a retried or concurrent
/// replay request finds the one made first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Made by this request.
    Created(Uuid),
    /// Made earlier (or concurrently, by another request).
    Existing(Uuid),
}

impl Replay {
    /// The replay's run id.
    pub fn id(self) -> Uuid {
        match self {
            Self::Created(id) | Self::Existing(id) => id,
        }
    }
}

/// Creation times to select runs by: from `start` (inclusive) to `end`
/// (exclusive); an unset bound is open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeWindow {
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
}

/// One page of runs, newest first, and the id to continue before.
#[derive(Debug, Clone)]
pub struct RunPage {
    pub runs: Vec<Run>,
    pub next_before: Option<Uuid>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct RunRow {
    id: Uuid,
    zap_id: Uuid,
    owner_id: Uuid,
    status: String,
    /// NULL where a list leaves the payload out.
    trigger: Option<Json<serde_json::Value>>,
    headers: Option<Json<serde_json::Value>>,
    query: Option<Json<serde_json::Value>>,
    actions: Json<Vec<ActionSpec>>,
    replay_of: Option<Uuid>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    scheduled_time: Option<DateTime<Utc>>,
    stop_reason: Option<String>,
    resume_at: Option<DateTime<Utc>>,
}

from_sqlite!(RunRow {
    id,
    zap_id,
    owner_id,
    status,
    trigger,
    headers,
    query,
    actions,
    replay_of,
    created_at,
    updated_at,
    finished_at,
    scheduled_time,
    stop_reason,
    resume_at
});

#[derive(sqlx::FromRow)]
pub(crate) struct StepRow {
    step: i32,
    action_type: String,
    status: String,
    attempts: i32,
    output: Option<Json<serde_json::Value>>,
    error: Option<String>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    history: Json<Vec<Attempt>>,
}

from_sqlite!(StepRow {
    step,
    action_type,
    status,
    attempts,
    output,
    error,
    started_at,
    finished_at,
    history
});

/// The columns a [`RunRow`] reads.
macro_rules! run_columns {
    () => {
        "id, zap_id, owner_id, status, trigger, headers, query, actions, \
         replay_of, created_at, updated_at, finished_at, scheduled_time, stop_reason, resume_at"
    };
}

/// [`run_columns`] without the delivery's payload, for lists.
macro_rules! run_columns_without_payload {
    () => {
        "id, zap_id, owner_id, status, NULL AS trigger, NULL AS headers, NULL AS query, actions, \
         replay_of, created_at, updated_at, finished_at, scheduled_time, stop_reason, resume_at"
    };
}

impl RunRow {
    pub(crate) fn into_run(self, step_rows: Vec<StepRow>) -> Result<Run> {
        let mut recorded: HashMap<i32, StepRow> =
            step_rows.into_iter().map(|row| (row.step, row)).collect();
        let steps = (0..self.actions.0.len())
            .map(|index| match recorded.remove(&(index as i32)) {
                Some(row) => Ok(Step {
                    index: index as u32,
                    action_type: row.action_type,
                    status: parse_status(&row.status)?,
                    attempts: row.attempts as u32,
                    output: row.output.map(|json| json.0),
                    error: row.error,
                    started_at: row.started_at,
                    finished_at: row.finished_at,
                    history: row.history.0,
                }),
                // A step a filter stopped the run before never runs.
                None => Ok(Step {
                    index: index as u32,
                    action_type: self.actions.0[index].action_type.clone(),
                    status: match self.stop_reason {
                        Some(_) => StepStatus::Skipped,
                        None => StepStatus::Pending,
                    },
                    attempts: 0,
                    output: None,
                    error: None,
                    started_at: None,
                    finished_at: None,
                    history: Vec::new(),
                }),
            })
            .collect::<Result<_>>()?;
        Ok(Run {
            id: self.id,
            zap_id: self.zap_id,
            owner_id: self.owner_id,
            status: parse_status(&self.status)?,
            trigger: self.trigger.map_or(serde_json::Value::Null, |json| json.0),
            headers: self.headers.map_or(serde_json::Value::Null, |json| json.0),
            query: self.query.map_or(serde_json::Value::Null, |json| json.0),
            actions: self.actions.0,
            steps,
            replay_of: self.replay_of,
            created_at: self.created_at,
            updated_at: self.updated_at,
            finished_at: self.finished_at,
            scheduled_time: self.scheduled_time,
            stop_reason: self.stop_reason,
            resume_at: self.resume_at,
        })
    }
}

impl Store {
    /// Records a batch of webhook deliveries in one transaction: each new run
    /// with the outbox row of its first step. Returns, in input order, how
    /// each was recorded (a delivery repeating an idempotency key already
    /// recorded gets the earlier run, and nothing is written).
    pub async fn insert_runs(&self, runs: &[NewRun]) -> Result<Vec<RecordedRun>> {
        let runs: Vec<Inserting<'_>> = runs.iter().map(Inserting::waiting).collect();
        let recorded = self.record(&runs).await?;
        Ok(recorded.into_iter().map(|(recorded, _)| recorded).collect())
    }

    /// [`insert_runs`](Self::insert_runs), but one delivery the database
    /// refuses fails alone: when the batch fails for anything but an outage,
    /// each run is tried in a transaction of its own, so every other
    /// delivery is still recorded. `Err` means the database did not answer
    /// and nothing was written.
    pub async fn insert_runs_isolated(&self, runs: &[NewRun]) -> Result<Vec<Result<RecordedRun>>> {
        each_alone_on_refusal(runs, "runs", |runs| self.insert_runs(runs)).await
    }

    /// [`insert_runs`](Self::insert_runs) for deliveries, some of which
    /// start at once ([`Delivery::start_for`]): those new runs come with
    /// their [`Started`] first step.
    pub async fn insert_deliveries(
        &self,
        deliveries: &[Delivery],
    ) -> Result<Vec<(RecordedRun, Option<Started>)>> {
        let runs: Vec<Inserting<'_>> = deliveries
            .iter()
            .map(|delivery| match delivery.start_for {
                Some(lease) if !delivery.run.actions.is_empty() => Inserting {
                    run: &delivery.run,
                    lease_until: Some(instant_after(lease)),
                },
                _ => Inserting::waiting(&delivery.run),
            })
            .collect();
        self.record(&runs).await
    }

    /// [`insert_deliveries`](Self::insert_deliveries), where one delivery
    /// the database refuses fails alone (see
    /// [`insert_runs_isolated`](Self::insert_runs_isolated)).
    pub async fn insert_deliveries_isolated(
        &self,
        deliveries: &[Delivery],
    ) -> Result<Vec<Result<(RecordedRun, Option<Started>)>>> {
        each_alone_on_refusal(deliveries, "runs", |deliveries| {
            self.insert_deliveries(deliveries)
        })
        .await
    }

    /// Inserts `runs` in one transaction; how each was recorded, in input
    /// order, with the first step of each new run that started.
    async fn record(&self, runs: &[Inserting<'_>]) -> Result<Vec<(RecordedRun, Option<Started>)>> {
        let now = Utc::now();
        if self.db.dialect() == Dialect::Postgres && runs.iter().all(Inserting::keyless) {
            // No run can lose to an earlier delivery, so the one statement
            // that writes them all is the whole write: atomic alone, it
            // needs no transaction around it (two round trips fewer).
            let mut inserted = first_rows(
                self.db
                    .fetch_all(INSERT_RUNS_AT_ONCE, &insert_at_once_args(runs, now)?)
                    .await?,
            );
            if runs.iter().any(Inserting::waits) {
                self.db.announce();
            }
            return runs
                .iter()
                .map(|inserting| {
                    // Every run is inserted, or the statement fails.
                    let first_row = inserted
                        .remove(&inserting.run.id)
                        .ok_or(StoreError::NotFound)?;
                    inserting.recorded(first_row, now)
                })
                .collect();
        }
        let mut tx = self.db.begin().await?;
        let mut inserted = insert_runs_starting(&mut tx, runs, now).await?;
        let mut recorded = Vec::with_capacity(runs.len());
        for inserting in runs {
            let run = inserting.run;
            if let Some(first_row) = inserted.remove(&run.id) {
                recorded.push(inserting.recorded(first_row, now)?);
                continue;
            }
            // Lost to an earlier delivery with the same key (committed, or
            // earlier in this very batch).
            let (existing,): (Uuid,) = tx
                .fetch_one(
                    "SELECT id FROM zap_runs WHERE zap_id = $1 AND idempotency_key = $2",
                    &[run.zap_id.into(), (&run.idempotency_key).into()],
                )
                .await?;
            let repeated = RecordedRun {
                id: existing,
                repeated: true,
            };
            recorded.push((repeated, None));
        }
        tx.commit().await?;
        Ok(recorded)
    }

    /// Records a replay of `original` as run `id`, starting at `start_stage`:
    /// the steps before it are copied with their outputs, and the outbox row
    /// of the first step to run is added, all in one transaction. A run has
    /// at most one replay: when `original` has one already (also one
    /// committed concurrently), nothing is written and that one is returned.
    pub async fn insert_replay(
        &self,
        original: &Run,
        id: Uuid,
        start_stage: u32,
    ) -> Result<Replay> {
        let mut tx = self.db.begin().await?;
        let inserted = tx
            .execute(
                "INSERT INTO zap_runs (id, zap_id, owner_id, status, trigger, headers, query, actions,
                                       replay_of, created_at, updated_at)
                 SELECT $1, zap_id, owner_id, 'pending', trigger, headers, query, actions, id, $3, $3
                 FROM zap_runs WHERE id = $2
                 ON CONFLICT (replay_of) WHERE replay_of IS NOT NULL DO NOTHING",
                &[id.into(), original.id.into(), Utc::now().into()],
            )
            .await?;
        if inserted == 0 {
            // Free the connection (SQLite's only one) for the lookup.
            tx.rollback().await?;
            let (existing,): (Uuid,) = self
                .db
                .fetch_one(
                    "SELECT id FROM zap_runs WHERE replay_of = $1",
                    &[original.id.into()],
                )
                .await?;
            return Ok(Replay::Existing(existing));
        }
        tx.execute(
            "INSERT INTO zap_run_steps (run_id, step, action_type, status, attempts, output, error,
                                        started_at, finished_at, history)
             SELECT $1, step, action_type, status, attempts, output, error, started_at, finished_at,
                    history
             FROM zap_run_steps WHERE run_id = $2 AND step < $3",
            &[id.into(), original.id.into(), start_stage.into()],
        )
        .await?;
        crate::outbox::enqueue(
            &mut tx,
            id,
            original.zap_id,
            Announcement::step(start_stage, Duration::ZERO),
        )
        .await?;
        tx.commit().await?;
        Ok(Replay::Created(id))
    }

    /// Ids of a zap's failed runs not replayed yet, created in `window`,
    /// oldest first, at most `limit`.
    pub async fn failed_runs(
        &self,
        owner_id: Uuid,
        zap_id: Uuid,
        window: &TimeWindow,
        limit: u32,
    ) -> Result<Vec<Uuid>> {
        let ids: Vec<(Uuid,)> = self
            .db.reader()
            .fetch_all(
                "SELECT id FROM zap_runs
                 WHERE owner_id = $1 AND zap_id = $2 AND status = 'failed'
                   AND ($3 IS NULL OR created_at >= $3) AND ($4 IS NULL OR created_at < $4)
                   AND NOT EXISTS (SELECT 1 FROM zap_runs AS replay WHERE replay.replay_of = zap_runs.id)
                 ORDER BY created_at, id LIMIT $5",
                &[
                    owner_id.into(),
                    zap_id.into(),
                    window.start.into(),
                    window.end.into(),
                    limit.into(),
                ],
            )
            .await?;
        Ok(ids.into_iter().map(|(id,)| id).collect())
    }

    /// A run with its steps, whoever owns it (for workers).
    pub async fn run(&self, id: Uuid) -> Result<Option<Run>> {
        self.fetch_run(id, None).await
    }

    /// A run with its steps, if `owner_id` owns it.
    pub async fn owned_run(&self, owner_id: Uuid, id: Uuid) -> Result<Run> {
        self.fetch_run(id, Some(owner_id))
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// Run and steps read in one transaction: a consistent snapshot.
    async fn fetch_run(&self, id: Uuid, owner_id: Option<Uuid>) -> Result<Option<Run>> {
        let mut tx = self.db.reader().begin().await?;
        let run = read_run(&mut tx, id, owner_id, Steps::All).await?;
        tx.commit().await?;
        Ok(run)
    }

    /// Runs of an owner (optionally of one zap), newest first, without steps
    /// and, unless `payloads`, without their trigger, headers and query
    /// (left `null`).
    pub async fn list_runs(
        &self,
        owner_id: Uuid,
        zap_id: Option<Uuid>,
        before: Option<Uuid>,
        limit: u32,
        payloads: bool,
    ) -> Result<RunPage> {
        let filter = RunFilter {
            zap_id,
            ..RunFilter::default()
        };
        self.list_runs_where(owner_id, &filter, before, limit, payloads)
            .await
    }
}

/// A run, whoever owns it, with the steps before `stage` as recorded (the
/// others read as pending), inside the caller's transaction: what a worker
/// needs to run step `stage`.
pub(crate) async fn run_before(tx: &mut Tx, id: Uuid, stage: u32) -> Result<Option<Run>> {
    read_run(tx, id, None, Steps::Before(stage)).await
}

/// The runs with these ids that exist, in no order, as [`run_before`]
/// reads each for its first step: with one statement (PostgreSQL, where
/// each statement is a round trip).
pub(crate) async fn runs_before_first_step(tx: &mut Tx, ids: &[Uuid]) -> Result<Vec<Run>> {
    // One index lookup per id, whatever the table's size when PostgreSQL
    // planned the statement once for good (OFFSET 0 keeps it from turning
    // the lookups into a join).
    let rows: Vec<RunRow> = tx
        .fetch_all(
            concat!(
                "SELECT run.* FROM jsonb_array_elements_text($1) AS wanted(id)
                 CROSS JOIN LATERAL (SELECT ",
                run_columns!(),
                " FROM zap_runs WHERE zap_runs.id = wanted.id::uuid OFFSET 0) AS run"
            ),
            &[Arg::json(&ids)?],
        )
        .await?;
    rows.into_iter()
        .map(|row| row.into_run(Vec::new()))
        .collect()
}

/// Which of a run's recorded steps to read.
#[derive(Debug, Clone, Copy)]
enum Steps {
    All,
    Before(u32),
}

async fn read_run(
    tx: &mut Tx,
    id: Uuid,
    owner_id: Option<Uuid>,
    steps: Steps,
) -> Result<Option<Run>> {
    let row: Option<RunRow> = tx
        .fetch_optional(
            concat!(
                "SELECT ",
                run_columns!(),
                " FROM zap_runs WHERE id = $1 AND ($2 IS NULL OR owner_id = $2)"
            ),
            &[id.into(), owner_id.into()],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let steps = step_rows(tx, id, steps).await?;
    row.into_run(steps).map(Some)
}

/// Inserts runs, each with the outbox row of its first step, inside the
/// caller's transaction; a run repeating an idempotency key already
/// recorded is left out. Returns the ids inserted.
pub(crate) async fn insert_new_runs(
    tx: &mut Tx,
    runs: &[NewRun],
    now: DateTime<Utc>,
) -> Result<HashSet<Uuid>> {
    let runs: Vec<Inserting<'_>> = runs.iter().map(Inserting::waiting).collect();
    let inserted = insert_runs_starting(tx, &runs, now).await?;
    Ok(inserted.into_keys().collect())
}

/// A run to insert, and whether it starts at once.
#[derive(Serialize)]
struct Inserting<'a> {
    #[serde(flatten)]
    run: &'a NewRun,
    /// Set for a run that starts at once: its first step is claimed, and
    /// its outbox row leased, until then (see [`Delivery::start_for`]).
    lease_until: Option<DateTime<Utc>>,
}

/// The outbox row of a run's first step, as inserted: its id and event id.
type FirstRow = (i64, Uuid);

impl<'a> Inserting<'a> {
    /// A run whose first step waits in the outbox for a worker.
    fn waiting(run: &'a NewRun) -> Self {
        Self {
            run,
            lease_until: None,
        }
    }

    /// Whether the run's first step waits in the outbox for a worker (it
    /// does not start at once).
    fn waits(&self) -> bool {
        self.lease_until.is_none()
    }

    /// Whether the run has no idempotency key, so that no earlier delivery
    /// can stand in for it.
    fn keyless(&self) -> bool {
        self.run.idempotency_key.is_none()
    }

    /// How the run was recorded, inserted at `now` with `first_row`: new,
    /// and started if it starts at once.
    fn recorded(
        &self,
        first_row: FirstRow,
        now: DateTime<Utc>,
    ) -> Result<(RecordedRun, Option<Started>)> {
        let started = self
            .lease_until
            .map(|_| self.started(first_row, now))
            .transpose()?;
        let new = RecordedRun {
            id: self.run.id,
            repeated: false,
        };
        Ok((new, started))
    }

    /// The run's first step and outbox row, as the insert at `now` left
    /// them: what a worker reads and claims from the outbox otherwise.
    fn started(&self, (id, event_id): FirstRow, now: DateTime<Utc>) -> Result<Started> {
        let run = self.run;
        let row = OutboxRow {
            id,
            event_id,
            run_id: run.id,
            zap_id: run.zap_id,
            stage: 0,
            kind: OutboxKind::Step,
            reason: None,
            created_at: now,
            trace_parent: run.trace_parent.clone(),
        };
        let recorded = RunRow {
            id: run.id,
            zap_id: run.zap_id,
            owner_id: run.owner_id,
            status: RunStatus::Running.as_str().to_owned(),
            trigger: Some(Json(run.trigger.clone())),
            headers: Some(Json(run.headers.clone())),
            query: Some(Json(run.query.clone())),
            actions: Json(run.actions.clone()),
            replay_of: None,
            created_at: now,
            updated_at: now,
            finished_at: None,
            scheduled_time: run.scheduled_time,
            stop_reason: None,
            resume_at: None,
        };
        let step = ClaimedStep {
            run: recorded.into_run(Vec::new())?,
            stage: 0,
            attempt: 1,
        };
        Ok(Started { row, step })
    }

    /// The run's status as inserted.
    fn status(&self) -> RunStatus {
        match self.lease_until {
            Some(_) => RunStatus::Running,
            None => RunStatus::Pending,
        }
    }
}

/// Inserts runs, each with the outbox row of its first step, inside the
/// caller's transaction; a run repeating an idempotency key already
/// recorded is left out. A run that starts at once also gets its first
/// step's row, claimed, and its outbox row is leased. Returns each run
/// inserted with its outbox row.
async fn insert_runs_starting(
    tx: &mut Tx,
    runs: &[Inserting<'_>],
    now: DateTime<Utc>,
) -> Result<HashMap<Uuid, FirstRow>> {
    match tx.dialect() {
        Dialect::Postgres => insert_runs_at_once(tx, runs, now).await,
        Dialect::Sqlite => insert_runs_one_by_one(tx, runs, now).await,
    }
}

/// Inserts runs with one statement (PostgreSQL) inside the caller's
/// transaction: see [`INSERT_RUNS_AT_ONCE`].
async fn insert_runs_at_once(
    tx: &mut Tx,
    runs: &[Inserting<'_>],
    now: DateTime<Utc>,
) -> Result<HashMap<Uuid, FirstRow>> {
    let rows = tx
        .fetch_all(INSERT_RUNS_AT_ONCE, &insert_at_once_args(runs, now)?)
        .await?;
    if runs.iter().any(Inserting::waits) {
        tx.announce();
    }
    Ok(first_rows(rows))
}

/// Inserts runs ([`insert_at_once_args`]) with one statement (PostgreSQL):
/// the runs, the outbox rows of their first steps, and the first steps of
/// those that start at once; a run repeating an idempotency key already
/// recorded is left out. Returns each run inserted with its outbox row.
const INSERT_RUNS_AT_ONCE: &str = "WITH input AS (
        SELECT * FROM jsonb_to_recordset($1) AS r(
            id uuid, zap_id uuid, owner_id uuid, trigger jsonb, headers jsonb,
            query jsonb, actions jsonb, idempotency_key text, trace_parent text,
            scheduled_time timestamptz, lease_until timestamptz)
    ), inserted AS (
        INSERT INTO zap_runs (id, zap_id, owner_id, status, trigger, headers, query,
                              actions, idempotency_key, created_at, updated_at,
                              scheduled_time)
        SELECT id, zap_id, owner_id,
               CASE WHEN lease_until IS NULL THEN 'pending' ELSE 'running' END,
               trigger, headers, query, actions, idempotency_key, $2, $2, scheduled_time
        FROM input
        ON CONFLICT (zap_id, idempotency_key) DO NOTHING
        RETURNING id, zap_id
    ), outbox AS (
        INSERT INTO zap_run_outbox (event_id, run_id, zap_id, stage, kind, available_at,
                                    created_at, trace_parent)
        SELECT gen_random_uuid(), inserted.id, inserted.zap_id, 0, 'step',
               coalesce(input.lease_until, $2), $2, input.trace_parent
        FROM inserted JOIN input ON input.id = inserted.id
        RETURNING run_id, id, event_id
    ), first_steps AS (
        INSERT INTO zap_run_steps (run_id, step, action_type, status, attempts,
                                   lease_until, started_at)
        SELECT input.id, 0, input.actions -> 0 ->> 'type', 'running', 1,
               input.lease_until, $2
        FROM inserted JOIN input ON input.id = inserted.id
        WHERE input.lease_until IS NOT NULL
    )
    SELECT run_id, id, event_id FROM outbox";

fn insert_at_once_args<'a>(runs: &[Inserting<'_>], now: DateTime<Utc>) -> Result<[Arg<'a>; 2]> {
    Ok([Arg::json(&runs)?, now.into()])
}

/// The first outbox row of each run inserted, by run id.
fn first_rows(rows: Vec<(Uuid, i64, Uuid)>) -> HashMap<Uuid, FirstRow> {
    rows.into_iter()
        .map(|(run_id, id, event_id)| (run_id, (id, event_id)))
        .collect()
}

/// Inserts runs one statement each (SQLite, where each is a function call,
/// not a round trip to a server), with the outbox rows of their first
/// steps, and the first steps of those that start at once.
async fn insert_runs_one_by_one(
    tx: &mut Tx,
    runs: &[Inserting<'_>],
    now: DateTime<Utc>,
) -> Result<HashMap<Uuid, FirstRow>> {
    let mut inserted = HashMap::with_capacity(runs.len());
    for inserting in runs {
        let run = inserting.run;
        let added = tx
            .execute(
                "INSERT INTO zap_runs (id, zap_id, owner_id, status, trigger, headers, query,
                                       actions, idempotency_key, created_at, updated_at,
                                       scheduled_time)
                 VALUES ($1, $2, $3, $11, $4, $5, $6, $7, $8, $9, $9, $10)
                 ON CONFLICT (zap_id, idempotency_key) WHERE idempotency_key IS NOT NULL
                 DO NOTHING",
                &[
                    run.id.into(),
                    run.zap_id.into(),
                    run.owner_id.into(),
                    Arg::json(&run.trigger)?,
                    Arg::json(&run.headers)?,
                    Arg::json(&run.query)?,
                    Arg::json(&run.actions)?,
                    (&run.idempotency_key).into(),
                    now.into(),
                    run.scheduled_time.into(),
                    inserting.status().as_str().into(),
                ],
            )
            .await?;
        if added == 0 {
            continue;
        }
        let first = Announcement {
            trace_parent: run.trace_parent.as_deref(),
            ..Announcement::step(0, Duration::ZERO)
        };
        let first_row = match inserting.lease_until {
            None => crate::outbox::enqueue(tx, run.id, run.zap_id, first).await?,
            Some(lease_until) => {
                tx.execute(
                    "INSERT INTO zap_run_steps (run_id, step, action_type, status, attempts,
                                                lease_until, started_at)
                     VALUES ($1, 0, $2, 'running', 1, $3, $4)",
                    &[
                        run.id.into(),
                        run.actions[0].action_type.as_str().into(),
                        Arg::Instant(Some(lease_until)),
                        now.into(),
                    ],
                )
                .await?;
                crate::outbox::enqueue_leased(tx, run.id, run.zap_id, first, lease_until).await?
            }
        };
        inserted.insert(run.id, first_row);
    }
    Ok(inserted)
}

impl RunPage {
    /// A page from up to `limit + 1` rows, newest first: the extra row only
    /// tells that there is a next page.
    pub(crate) fn from_rows(rows: Vec<RunRow>, limit: u32) -> Result<Self> {
        let more = rows.len() > limit as usize;
        let runs = rows
            .into_iter()
            .take(limit as usize)
            .map(|row| {
                let mut run = row.into_run(Vec::new())?;
                run.steps.clear();
                Ok(run)
            })
            .collect::<Result<Vec<_>>>()?;
        let next_before = more.then(|| runs.last().map(|run| run.id)).flatten();
        Ok(RunPage { runs, next_before })
    }
}

/// Which of an owner's runs a list shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunFilter {
    /// Only this zap's runs.
    pub zap_id: Option<Uuid>,
    /// Only runs in one of these statuses; empty for any.
    pub statuses: Vec<RunStatus>,
    /// Only runs created in this window.
    pub created: TimeWindow,
    /// Only runs a filter stopped (`Some(true)`) or only the others.
    pub stopped: Option<bool>,
}

/// When a run last changed, as [`Store::runs_changed_since`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct RunChange {
    pub id: Uuid,
    pub updated_at: DateTime<Utc>,
}

from_sqlite!(RunChange { id, updated_at });

impl Store {
    /// The runs of an owner that `filter` selects, newest first, without
    /// steps and, unless `payloads`, without their trigger, headers and
    /// query (left `null`).
    pub async fn list_runs_where(
        &self,
        owner_id: Uuid,
        filter: &RunFilter,
        before: Option<Uuid>,
        limit: u32,
        payloads: bool,
    ) -> Result<RunPage> {
        macro_rules! page_of_runs {
            ($columns:expr) => {
                concat!(
                    "SELECT ",
                    $columns,
                    " FROM zap_runs
                     WHERE owner_id = $1 AND ($2 IS NULL OR zap_id = $2) AND ($3 IS NULL OR id < $3)
                       AND ($5 IS NULL OR status IN ($5, $6, $7, $8))
                       AND ($9 IS NULL OR created_at >= $9) AND ($10 IS NULL OR created_at < $10)
                       AND ($11 IS NULL OR ($11 = 'stopped') = (stop_reason IS NOT NULL))
                     ORDER BY id DESC LIMIT $4"
                )
            };
        }
        let sql = match payloads {
            true => page_of_runs!(run_columns!()),
            false => page_of_runs!(run_columns_without_payload!()),
        };
        // Four places for statuses (there are four); unused ones repeat the first.
        let status = |index: usize| {
            filter
                .statuses
                .get(index)
                .or(filter.statuses.first())
                .map(|status| status.as_str())
        };
        let rows: Vec<RunRow> = self
            .db
            .reader()
            .fetch_all(
                sql,
                &[
                    owner_id.into(),
                    filter.zap_id.into(),
                    before.into(),
                    (i64::from(limit) + 1).into(),
                    status(0).into(),
                    status(1).into(),
                    status(2).into(),
                    status(3).into(),
                    filter.created.start.into(),
                    filter.created.end.into(),
                    filter
                        .stopped
                        .map(|stopped| if stopped { "stopped" } else { "not stopped" })
                        .into(),
                ],
            )
            .await?;
        RunPage::from_rows(rows, limit)
    }

    /// The runs of an owner (optionally of one zap) changed at or after
    /// `since`, oldest change first, at most `limit`.
    /// (On SQLite `updated_at` is RFC 3339 text, always in UTC, which sorts
    /// as the times do: the same comparison serves both dialects.)
    pub async fn runs_changed_since(
        &self,
        owner_id: Uuid,
        zap_id: Option<Uuid>,
        since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<RunChange>> {
        self.db
            .reader()
            .fetch_all(
                "SELECT id, updated_at FROM zap_runs
                 WHERE owner_id = $1 AND updated_at >= $2 AND ($3 IS NULL OR zap_id = $3)
                 ORDER BY updated_at, id LIMIT $4",
                &[owner_id.into(), since.into(), zap_id.into(), limit.into()],
            )
            .await
    }

    /// A run of `owner_id` with its steps but without its payload.
    pub async fn run_without_payload(&self, owner_id: Uuid, id: Uuid) -> Result<Run> {
        let mut tx = self.db.reader().begin().await?;
        let row: RunRow = tx
            .fetch_one(
                concat!(
                    "SELECT ",
                    run_columns_without_payload!(),
                    " FROM zap_runs WHERE id = $1 AND owner_id = $2"
                ),
                &[id.into(), owner_id.into()],
            )
            .await?;
        let steps = step_rows(&mut tx, id, Steps::All).await?;
        tx.commit().await?;
        row.into_run(steps)
    }
}

/// The recorded steps of a run (steps not started yet have no row).
async fn step_rows(tx: &mut Tx, run_id: Uuid, steps: Steps) -> Result<Vec<StepRow>> {
    let before = match steps {
        Steps::All => i64::MAX,
        Steps::Before(0) => return Ok(Vec::new()),
        Steps::Before(stage) => i64::from(stage),
    };
    tx.fetch_all(
        "SELECT step, action_type, status, attempts, output, error, started_at, finished_at,
                history
         FROM zap_run_steps WHERE run_id = $1 AND step < $2",
        &[run_id.into(), before.into()],
    )
    .await
}
