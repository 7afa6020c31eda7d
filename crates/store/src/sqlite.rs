//! The SQLite store of the embedded deployment: one file, WAL mode, one
//! writer at a time.
//!
//! The same operations as [`PgStore`](crate::PgStore), in SQLite's dialect:
//! ids and times are bound from Rust, and the two times that queries compare
//! (`available_at`, `lease_until`) are integer microseconds.

use std::collections::HashSet;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::types::Json;
use sqlx::{Sqlite, Transaction};
use tokio::sync::watch;
use uuid::Uuid;
use zapflow_core::retry::RetryPolicy;
use zapflow_core::secret::{self, ApiKey};
use zapflow_core::{ActionSpec, Attempt, RunStatus, ZapStatus};

use crate::claim::{Decision, StepState, decide, max_attempts};
use crate::outbox::{OutboxKind, OutboxRecord};
use crate::zaps::{IngestRow, ZAP_COLUMNS, ZapRow, found, parse_status};
use crate::{
    ClaimedStep, NewRun, OutboxRow, Replay, Result, Run, SQLITE_MIGRATOR, StepClaim, StepOutcome,
    StoreError, Zap, ZapForIngest,
};

/// What a committed write on the SQLite file survives. In WAL mode,
/// `synchronous=NORMAL` loses nothing when the process dies but may lose the
/// last commits when the machine loses power or the OS crashes; `FULL`
/// syncs the WAL on every commit (group commit shares the cost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every commit is on disk before it is acknowledged (`FULL`).
    #[default]
    PowerLoss,
    /// Commits survive a killed process, not a power loss (`NORMAL`).
    ProcessCrash,
}

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Marked changed whenever outbox rows were committed. Unlike a bare
    /// notification, a change is kept for each subscriber until it looks,
    /// so a loop that was busy when rows arrived still sees it.
    outbox_written: Arc<watch::Sender<()>>,
}

fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

fn micros_after(delay: Duration) -> i64 {
    now_micros().saturating_add(i64::try_from(delay.as_micros()).unwrap_or(i64::MAX))
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path`.
    pub async fn open(path: &Path, durability: Durability) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::PowerLoss => SqliteSynchronous::Full,
                Durability::ProcessCrash => SqliteSynchronous::Normal,
            })
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        Self::with_options(options).await
    }

    /// Opens a `sqlite:` URL (`sqlite::memory:` included).
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        Self::with_options(options).await
    }

    async fn with_options(options: SqliteConnectOptions) -> Result<Self> {
        // One connection: SQLite has one writer anyway, and a single
        // connection never meets SQLITE_BUSY between its own transactions.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            outbox_written: Arc::new(watch::Sender::new(())),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub(crate) fn outbox_changes(&self) -> watch::Receiver<()> {
        self.outbox_written.subscribe()
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        SQLITE_MIGRATOR.run(&self.pool).await
    }

    crate::portable::portable_queries!();

    pub async fn create_user(&self, name: &str) -> Result<(Uuid, ApiKey)> {
        let user_id = Uuid::now_v7();
        let key = ApiKey::generate();
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO users (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(user_id)
            .bind(name)
            .bind(Utc::now())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO api_keys (id, user_id, secret_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(key.id)
        .bind(user_id)
        .bind(secret::hash(&key.secret))
        .bind(Utc::now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((user_id, key))
    }

    pub async fn create_zap(
        &self,
        owner_id: Uuid,
        name: &str,
        actions: &[ActionSpec],
        token_hash: &[u8],
        signing_secret: Option<&str>,
    ) -> Result<Zap> {
        let now = Utc::now();
        let row: ZapRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO zaps (id, owner_id, name, actions, token_hash, status, created_at, updated_at,
                               signing_secret)
             VALUES ($1, $2, $3, $4, $5, 'active', $6, $6, $7) RETURNING {ZAP_COLUMNS}"
        )))
        .bind(Uuid::now_v7())
        .bind(owner_id)
        .bind(name)
        .bind(Json(actions))
        .bind(token_hash)
        .bind(now)
        .bind(signing_secret)
        .fetch_one(&self.pool)
        .await?;
        row.try_into()
    }

    pub async fn update_zap(
        &self,
        owner_id: Uuid,
        id: Uuid,
        name: &str,
        actions: &[ActionSpec],
    ) -> Result<Zap> {
        let row: ZapRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE zaps SET name = $3, actions = $4, updated_at = $5
             WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL RETURNING {ZAP_COLUMNS}"
        )))
        .bind(id)
        .bind(owner_id)
        .bind(name)
        .bind(Json(actions))
        .bind(Utc::now())
        .fetch_one(&self.pool)
        .await?;
        row.try_into()
    }

    pub async fn set_zap_status(&self, owner_id: Uuid, id: Uuid, status: ZapStatus) -> Result<Zap> {
        let row: ZapRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE zaps SET status = $3, updated_at = $4
             WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL RETURNING {ZAP_COLUMNS}"
        )))
        .bind(id)
        .bind(owner_id)
        .bind(status.as_str())
        .bind(Utc::now())
        .fetch_one(&self.pool)
        .await?;
        row.try_into()
    }

    pub async fn set_zap_token(&self, owner_id: Uuid, id: Uuid, token_hash: &[u8]) -> Result<()> {
        let done = sqlx::query(
            "UPDATE zaps SET token_hash = $3, updated_at = $4
             WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(owner_id)
        .bind(token_hash)
        .bind(Utc::now())
        .execute(&self.pool)
        .await?;
        found(done.rows_affected())
    }

    pub async fn set_zap_signing_secret(
        &self,
        owner_id: Uuid,
        id: Uuid,
        secret: &str,
    ) -> Result<()> {
        let done = sqlx::query(
            "UPDATE zaps SET signing_secret = $3, updated_at = $4
             WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(owner_id)
        .bind(secret)
        .bind(Utc::now())
        .execute(&self.pool)
        .await?;
        found(done.rows_affected())
    }

    pub async fn delete_zap(&self, owner_id: Uuid, id: Uuid) -> Result<()> {
        let done = sqlx::query("UPDATE zaps SET deleted_at = $3 WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL")
            .bind(id)
            .bind(owner_id)
            .bind(Utc::now())
            .execute(&self.pool)
            .await?;
        found(done.rows_affected())
    }

    pub async fn insert_runs(&self, runs: &[NewRun]) -> Result<Vec<(Uuid, bool)>> {
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        let mut results = Vec::with_capacity(runs.len());
        for run in runs {
            let inserted = sqlx::query(
                "INSERT INTO zap_runs (id, zap_id, owner_id, status, trigger, headers, query, actions,
                                       idempotency_key, created_at, updated_at)
                 VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9, $9)
                 ON CONFLICT (zap_id, idempotency_key) DO NOTHING",
            )
            .bind(run.id)
            .bind(run.zap_id)
            .bind(run.owner_id)
            .bind(Json(&run.trigger))
            .bind(Json(&run.headers))
            .bind(Json(&run.query))
            .bind(Json(&run.actions))
            .bind(&run.idempotency_key)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 1 {
                enqueue(
                    &mut tx,
                    run.id,
                    run.zap_id,
                    0,
                    OutboxKind::Step,
                    None,
                    Duration::ZERO,
                )
                .await?;
                results.push((run.id, false));
            } else {
                let (existing,): (Uuid,) = sqlx::query_as(
                    "SELECT id FROM zap_runs WHERE zap_id = $1 AND idempotency_key = $2",
                )
                .bind(run.zap_id)
                .bind(&run.idempotency_key)
                .fetch_one(&mut *tx)
                .await?;
                results.push((existing, true));
            }
        }
        tx.commit().await?;
        self.outbox_written.send_replace(());
        Ok(results)
    }

    pub async fn insert_replay(
        &self,
        original: &Run,
        id: Uuid,
        start_stage: u32,
    ) -> Result<Replay> {
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO zap_runs (id, zap_id, owner_id, status, trigger, headers, query, actions, replay_of,
                                   created_at, updated_at)
             SELECT $1, zap_id, owner_id, 'pending', trigger, headers, query, actions, id, $3, $3
             FROM zap_runs WHERE id = $2
             ON CONFLICT (replay_of) WHERE replay_of IS NOT NULL DO NOTHING",
        )
        .bind(id)
        .bind(original.id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            // The pool's one connection must be free for the lookup.
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
        enqueue(
            &mut tx,
            id,
            original.zap_id,
            start_stage,
            OutboxKind::Step,
            None,
            Duration::ZERO,
        )
        .await?;
        tx.commit().await?;
        self.outbox_written.send_replace(());
        Ok(Replay::Created(id))
    }

    /// Leases step `stage` of a run for `lease`, unless it is done, held,
    /// not due, or out of attempts under `retry` (see
    /// [`PgStore::claim_step`](crate::PgStore::claim_step)).
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
        let now = Utc::now();
        // The one connection makes this transaction the only writer: the
        // step cannot change between reading and updating it.
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO zap_run_steps (run_id, step, action_type, status) VALUES ($1, $2, $3, 'pending')
             ON CONFLICT DO NOTHING",
        )
        .bind(run_id)
        .bind(stage as i32)
        .bind(&action_type)
        .execute(&mut *tx)
        .await?;
        let (status, attempts, lease_until, retry_at): (String, i32, Option<i64>, Option<i64>) =
            sqlx::query_as(
                "SELECT status, attempts, lease_until, retry_at FROM zap_run_steps
                 WHERE run_id = $1 AND step = $2",
            )
            .bind(run_id)
            .bind(stage as i32)
            .fetch_one(&mut *tx)
            .await?;
        let state = StepState {
            status: parse_status(&status)?,
            attempts: attempts as u32,
            lease_until: lease_until.and_then(DateTime::from_timestamp_micros),
            retry_at: retry_at.and_then(DateTime::from_timestamp_micros),
        };
        let attempt = match decide(&state, now, max_attempts(&run, stage, retry)) {
            Decision::Leave(answer) => return Ok(answer),
            Decision::GiveUp { error, abandoned } => {
                let step = ClaimedStep {
                    run,
                    stage,
                    attempt: state.attempts,
                };
                give_up(&mut tx, &step, &error, abandoned, now).await?;
                tx.commit().await?;
                self.outbox_written.send_replace(());
                return Ok(StepClaim::Exhausted { error });
            }
            Decision::Claim => state.attempts + 1,
        };
        sqlx::query(
            "UPDATE zap_run_steps
             SET status = 'running', attempts = $3, retry_at = NULL, lease_until = $4,
                 started_at = coalesce(started_at, $5)
             WHERE run_id = $1 AND step = $2",
        )
        .bind(run_id)
        .bind(stage as i32)
        .bind(attempt as i32)
        .bind(micros_after(lease))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE zap_runs SET status = 'running', updated_at = $2 WHERE id = $1 AND status = 'pending'")
            .bind(run_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(StepClaim::Claimed(Box::new(ClaimedStep {
            run,
            stage,
            attempt,
        })))
    }

    pub async fn finish_step(&self, step: &ClaimedStep, outcome: &StepOutcome) -> Result<bool> {
        let now = Utc::now();
        let outcome = outcome.storable();
        let (status, output, error) = outcome.recorded();
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE zap_run_steps
             SET status = $4, output = $5, error = $6, lease_until = NULL,
                 finished_at = CASE WHEN $4 = 'retrying' THEN NULL ELSE $7 END,
                 retry_at = CASE WHEN $4 = 'retrying' THEN $9 END,
                 history = json_insert(history, '$[#]', json($8))
             WHERE run_id = $1 AND step = $2 AND attempts = $3 AND status = 'running'",
        )
        .bind(step.run.id)
        .bind(step.stage as i32)
        .bind(step.attempt as i32)
        .bind(status)
        .bind(output.map(Json))
        .bind(error)
        .bind(now)
        .bind(Json(step.attempt_record(&outcome, now)))
        .bind(micros_after(outcome.retry_delay()))
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(false);
        }
        follow_up(&mut tx, step, &outcome, now).await?;
        tx.commit().await?;
        self.outbox_written.send_replace(());
        Ok(true)
    }

    pub async fn enqueue_one(
        &self,
        run_id: Uuid,
        zap_id: Uuid,
        stage: u32,
        kind: OutboxKind,
        reason: Option<&str>,
        delay: Duration,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        enqueue(&mut tx, run_id, zap_id, stage, kind, reason, delay).await?;
        tx.commit().await?;
        self.outbox_written.send_replace(());
        Ok(())
    }

    /// Leases up to `limit` due step rows to the caller
    /// for `lease`: they
    /// are not due again until then, and come back if never deleted.
    pub async fn lease_due_outbox_rows(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>> {
        let records: Vec<OutboxRecord> = sqlx::query_as(
            "UPDATE zap_run_outbox SET available_at = $3
             WHERE id IN (SELECT id FROM zap_run_outbox WHERE kind = 'step' AND available_at <= $1
                          ORDER BY id LIMIT $2)
             RETURNING id, event_id, run_id, zap_id, stage, kind, reason, created_at",
        )
        .bind(now_micros())
        .bind(i64::from(limit))
        .bind(micros_after(lease))
        .fetch_all(&self.pool)
        .await?;
        let mut rows: Vec<OutboxRow> = records.into_iter().map(OutboxRow::from).collect();
        rows.sort_by_key(|row| row.id);
        Ok(rows)
    }

    /// How long until the next step row comes due (zero if one is due now);
    /// `None` when there are none.
    pub async fn next_step_due_in(&self) -> Result<Option<Duration>> {
        let (due,): (Option<i64>,) =
            sqlx::query_as("SELECT min(available_at) FROM zap_run_outbox WHERE kind = 'step'")
                .fetch_one(&self.pool)
                .await?;
        Ok(due.map(|due| Duration::from_micros(due.saturating_sub(now_micros()).max(0) as u64)))
    }

    pub async fn delete_outbox_rows(&self, ids: &[i64]) -> Result<()> {
        let unique: HashSet<i64> = ids.iter().copied().collect();
        let mut tx = self.pool.begin().await?;
        for id in unique {
            sqlx::query("DELETE FROM zap_run_outbox WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

async fn enqueue(
    tx: &mut Transaction<'_, Sqlite>,
    run_id: Uuid,
    zap_id: Uuid,
    stage: u32,
    kind: OutboxKind,
    reason: Option<&str>,
    delay: Duration,
) -> Result<()> {
    let event_id = Uuid::now_v7();
    let now = Utc::now();
    sqlx::query(
        "INSERT INTO zap_run_outbox (event_id, run_id, zap_id, stage, kind, reason, available_at, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(event_id)
    .bind(run_id)
    .bind(zap_id)
    .bind(stage as i32)
    .bind(kind.as_str())
    .bind(reason)
    .bind(micros_after(delay))
    .bind(now)
    .execute(&mut **tx)
    .await?;
    if kind == OutboxKind::DeadLetter {
        // The record users list, under the announcing event's id.
        sqlx::query(
            "INSERT INTO zap_dead_letters (id, run_id, zap_id, owner_id, step, reason, created_at)
             SELECT $1, id, zap_id, owner_id, $2, $3, $4 FROM zap_runs WHERE id = $5",
        )
        .bind(event_id)
        .bind(stage as i32)
        .bind(reason.unwrap_or_default())
        .bind(now)
        .bind(run_id)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Fails a step whose attempts are used up, keeping the history entry of
/// an attempt that was never recorded, and fails its run.
async fn give_up(
    tx: &mut Transaction<'_, Sqlite>,
    step: &ClaimedStep,
    error: &str,
    abandoned: Option<Attempt>,
    now: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(
        "UPDATE zap_run_steps
         SET status = 'failed', error = $3, lease_until = NULL, retry_at = NULL, finished_at = $4,
             history = CASE WHEN $5 IS NULL THEN history
                            ELSE json_insert(history, '$[#]', json($5)) END
         WHERE run_id = $1 AND step = $2",
    )
    .bind(step.run.id)
    .bind(step.stage as i32)
    .bind(error)
    .bind(now)
    .bind(abandoned.map(Json))
    .execute(&mut **tx)
    .await?;
    follow_up(tx, step, &StepOutcome::Failed(error.to_owned()), now).await
}

/// What follows a recorded outcome: its outbox row and the run's status.
async fn follow_up(
    tx: &mut Transaction<'_, Sqlite>,
    step: &ClaimedStep,
    outcome: &StepOutcome,
    now: DateTime<Utc>,
) -> Result<()> {
    let run = &step.run;
    let (stage, kind, reason, delay, run_status) = step.next(outcome);
    if let Some(stage) = stage {
        enqueue(tx, run.id, run.zap_id, stage, kind, reason, delay).await?;
    }
    sqlx::query(
        "UPDATE zap_runs SET status = $2, updated_at = $3,
             finished_at = CASE WHEN $2 IN ('succeeded', 'failed') THEN $3 END
         WHERE id = $1",
    )
    .bind(run.id)
    .bind(run_status.as_str())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl TryFrom<IngestRow> for ZapForIngest {
    type Error = StoreError;

    fn try_from(
        (owner_id, token_hash, status, actions, signing_secret): IngestRow,
    ) -> Result<Self> {
        Ok(Self {
            owner_id,
            token_hash,
            status: parse_status(&status)?,
            actions: actions.0,
            signing_secret,
        })
    }
}

impl StepOutcome {
    /// The step's new status, output and error as stored.
    pub(crate) fn recorded(&self) -> (&'static str, Option<&serde_json::Value>, Option<&str>) {
        match self {
            Self::Succeeded(output) => ("succeeded", Some(output), None),
            Self::Retry { error, .. } => ("retrying", None, Some(error.as_str())),
            Self::Failed(error) => ("failed", None, Some(error.as_str())),
        }
    }

    /// How long until the next attempt (zero unless a retry).
    pub(crate) fn retry_delay(&self) -> Duration {
        match self {
            Self::Retry { delay, .. } => *delay,
            Self::Succeeded(_) | Self::Failed(_) => Duration::ZERO,
        }
    }
}

impl ClaimedStep {
    /// The history entry of this attempt ending with `outcome` at `now`.
    pub(crate) fn attempt_record(&self, outcome: &StepOutcome, now: DateTime<Utc>) -> Attempt {
        let (status, _, error) = outcome.recorded();
        Attempt {
            number: self.attempt,
            outcome: status.to_owned(),
            error: error.map(str::to_owned),
            finished_at: now,
        }
    }

    /// What follows an attempt's outcome: the outbox row to add (stage,
    /// kind, reason, delay; none once the run succeeded) and the run's status.
    pub(crate) fn next<'a>(
        &self,
        outcome: &'a StepOutcome,
    ) -> (
        Option<u32>,
        OutboxKind,
        Option<&'a str>,
        Duration,
        RunStatus,
    ) {
        let next_stage = self.stage + 1;
        match outcome {
            StepOutcome::Succeeded(_) if (next_stage as usize) < self.run.actions.len() => (
                Some(next_stage),
                OutboxKind::Step,
                None,
                Duration::ZERO,
                RunStatus::Running,
            ),
            StepOutcome::Succeeded(_) => (
                None,
                OutboxKind::Step,
                None,
                Duration::ZERO,
                RunStatus::Succeeded,
            ),
            StepOutcome::Retry { delay, .. } => (
                Some(self.stage),
                OutboxKind::Step,
                None,
                *delay,
                RunStatus::Running,
            ),
            StepOutcome::Failed(reason) => (
                Some(self.stage),
                OutboxKind::DeadLetter,
                Some(reason.as_str()),
                Duration::ZERO,
                RunStatus::Failed,
            ),
        }
    }
}
