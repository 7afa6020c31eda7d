use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use uuid::Uuid;
use zapflow_core::{ActionSpec, Attempt, RunStatus, StepStatus};

use crate::zaps::parse_status as parse_stored_status;
use crate::{PgStore, Result};

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
}

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

pub(crate) const RUN_COLUMNS: &str = "id, zap_id, owner_id, status, trigger, headers, query, actions, \
                           replay_of, created_at, updated_at, finished_at";
/// [`RUN_COLUMNS`] without the delivery's payload, for lists.
pub(crate) const RUN_COLUMNS_WITHOUT_PAYLOAD: &str = "id, zap_id, owner_id, status, NULL AS trigger, NULL AS headers, NULL AS query, actions, \
     replay_of, created_at, updated_at, finished_at";

impl RunRow {
    pub(crate) fn into_run(self, step_rows: Vec<StepRow>) -> Result<Run> {
        let mut recorded: HashMap<i32, StepRow> =
            step_rows.into_iter().map(|row| (row.step, row)).collect();
        let steps = (0..self.actions.0.len())
            .map(|index| match recorded.remove(&(index as i32)) {
                Some(row) => Ok(Step {
                    index: index as u32,
                    action_type: row.action_type,
                    status: parse_stored_status(&row.status)?,
                    attempts: row.attempts as u32,
                    output: row.output.map(|json| json.0),
                    error: row.error,
                    started_at: row.started_at,
                    finished_at: row.finished_at,
                    history: row.history.0,
                }),
                None => Ok(Step {
                    index: index as u32,
                    action_type: self.actions.0[index].action_type.clone(),
                    status: StepStatus::Pending,
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
            status: parse_stored_status(&self.status)?,
            trigger: self.trigger.map_or(serde_json::Value::Null, |json| json.0),
            headers: self.headers.map_or(serde_json::Value::Null, |json| json.0),
            query: self.query.map_or(serde_json::Value::Null, |json| json.0),
            actions: self.actions.0,
            steps,
            replay_of: self.replay_of,
            created_at: self.created_at,
            updated_at: self.updated_at,
            finished_at: self.finished_at,
        })
    }
}

impl PgStore {
    /// Records a batch of webhook deliveries in one transaction: each new run
    /// together with the outbox row for its first step. Returns, in input
    /// order, the run id and whether it was a repeat of an idempotency key
    /// already recorded (then the earlier run's id, and nothing is written).
    pub async fn insert_runs(&self, runs: &[NewRun]) -> Result<Vec<(Uuid, bool)>> {
        let mut tx = self.pool.begin().await?;
        let inserted: Vec<(Uuid,)> = sqlx::query_as(
            "WITH input AS (
                 SELECT * FROM jsonb_to_recordset($1) AS r(
                     id uuid, zap_id uuid, owner_id uuid, trigger jsonb, headers jsonb,
                     query jsonb, actions jsonb, idempotency_key text)
             ), inserted AS (
                 INSERT INTO zap_runs (id, zap_id, owner_id, status, trigger, headers, query,
                                       actions, idempotency_key)
                 SELECT id, zap_id, owner_id, 'pending', trigger, headers, query, actions,
                        idempotency_key
                 FROM input
                 ON CONFLICT (zap_id, idempotency_key) DO NOTHING
                 RETURNING id, zap_id
             ), outbox AS (
                 INSERT INTO zap_run_outbox (event_id, run_id, zap_id, stage, kind)
                 SELECT gen_random_uuid(), id, zap_id, 0, 'step' FROM inserted
             )
             SELECT id FROM inserted",
        )
        .bind(Json(runs))
        .fetch_all(&mut *tx)
        .await?;
        let inserted: std::collections::HashSet<Uuid> =
            inserted.into_iter().map(|(id,)| id).collect();

        let mut results = Vec::with_capacity(runs.len());
        for run in runs {
            if inserted.contains(&run.id) {
                results.push((run.id, false));
                continue;
            }
            // Lost to an earlier delivery with the same key (committed, or
            // earlier in this very batch).
            let (existing,): (Uuid,) = sqlx::query_as(
                "SELECT id FROM zap_runs WHERE zap_id = $1 AND idempotency_key = $2",
            )
            .bind(run.zap_id)
            .bind(&run.idempotency_key)
            .fetch_one(&mut *tx)
            .await?;
            results.push((existing, true));
        }
        tx.commit().await?;
        Ok(results)
    }

    /// Records a replay of `original` as run `id`, starting at `start_stage`:
    /// the steps before it are copied with their outputs, and the outbox
    /// row of the first step to run is added, all in one transaction. When
    /// `original` has a replay already, nothing is written and that one is
    /// returned (a concurrent insert waits for the first to commit).
    pub async fn insert_replay(
        &self,
        original: &Run,
        id: Uuid,
        start_stage: u32,
    ) -> Result<Replay> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO zap_runs (id, zap_id, owner_id, status, trigger, headers, query, actions, replay_of)
             SELECT $1, zap_id, owner_id, 'pending', trigger, headers, query, actions, id
             FROM zap_runs WHERE id = $2
             ON CONFLICT (replay_of) WHERE replay_of IS NOT NULL DO NOTHING",
        )
        .bind(id)
        .bind(original.id)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            tx.rollback().await?;
            return self.existing_replay(original.id).await;
        }
        sqlx::query(
            "INSERT INTO zap_run_steps (run_id, step, action_type, status, attempts, output, error,
                                        started_at, finished_at, history)
             SELECT $1, step, action_type, status, attempts, output, error, started_at, finished_at, history
             FROM zap_run_steps WHERE run_id = $2 AND step < $3",
        )
        .bind(id)
        .bind(original.id)
        .bind(start_stage as i32)
        .execute(&mut *tx)
        .await?;
        crate::outbox::enqueue(
            &mut tx,
            id,
            original.zap_id,
            start_stage,
            crate::OutboxKind::Step,
            None,
            std::time::Duration::ZERO,
        )
        .await?;
        tx.commit().await?;
        Ok(Replay::Created(id))
    }
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
