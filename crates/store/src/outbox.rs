use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::{PgStore, Result};

/// The channel on which every outbox insert is announced (see the
/// statement trigger in the migrations).
pub const OUTBOX_CHANNEL: &str = "zap_run_outbox";

/// What an outbox row announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxKind {
    /// Run action `stage` of the run.
    Step,
    /// The run failed for good; tell whoever watches the dead-letter topic.
    DeadLetter,
}

impl OutboxKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Step => "step",
            Self::DeadLetter => "dead_letter",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: Uuid,
    pub run_id: Uuid,
    pub zap_id: Uuid,
    pub stage: u32,
    pub kind: OutboxKind,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct OutboxRecord {
    id: i64,
    event_id: Uuid,
    run_id: Uuid,
    zap_id: Uuid,
    stage: i32,
    kind: String,
    reason: Option<String>,
    created_at: DateTime<Utc>,
}

impl From<OutboxRecord> for OutboxRow {
    fn from(record: OutboxRecord) -> Self {
        Self {
            id: record.id,
            event_id: record.event_id,
            run_id: record.run_id,
            zap_id: record.zap_id,
            stage: record.stage as u32,
            kind: if record.kind == "dead_letter" {
                OutboxKind::DeadLetter
            } else {
                OutboxKind::Step
            },
            reason: record.reason,
            created_at: record.created_at,
        }
    }
}

/// Rows claimed by one relay pass, locked until the pass commits.
pub struct OutboxClaim {
    tx: Transaction<'static, Postgres>,
    pub rows: Vec<OutboxRow>,
}

impl OutboxClaim {
    /// Deletes the rows the broker acknowledged and releases the others,
    /// which stay due for the next pass.
    pub async fn finish(mut self, delivered: &[i64]) -> Result<()> {
        if !delivered.is_empty() {
            sqlx::query("DELETE FROM zap_run_outbox WHERE id = ANY($1)")
                .bind(delivered)
                .execute(&mut *self.tx)
                .await?;
        }
        self.tx.commit().await?;
        Ok(())
    }
}

impl PgStore {
    /// Locks up to `limit` due rows, skipping rows another relay holds, so
    /// several processors share the work without relaying a row twice at once.
    /// Oldest first, but without an "id > last seen" cursor: a row whose
    /// transaction committed late is still found.
    pub async fn claim_due_outbox_rows(&self, limit: u32) -> Result<OutboxClaim> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<OutboxRecord> = sqlx::query_as(
            "SELECT id, event_id, run_id, zap_id, stage, kind, reason, created_at
             FROM zap_run_outbox WHERE available_at <= now()
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let rows = rows.into_iter().map(OutboxRow::from).collect();
        Ok(OutboxClaim { tx, rows })
    }

    /// Leases up to `limit` due step rows to the caller
    /// for `lease`, for workers that take work from the outbox directly,
    /// without Kafka: they are not due again until then, and come back if
    /// never deleted.
    pub async fn lease_due_outbox_rows(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>> {
        let records: Vec<OutboxRecord> = sqlx::query_as(
            "UPDATE zap_run_outbox SET available_at = now() + $2 * interval '1 microsecond'
             WHERE id IN (SELECT id FROM zap_run_outbox WHERE kind = 'step' AND available_at <= now()
                          ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING id, event_id, run_id, zap_id, stage, kind, reason, created_at",
        )
        .bind(i64::from(limit))
        .bind(micros(lease))
        .fetch_all(&self.pool)
        .await?;
        let mut rows: Vec<OutboxRow> = records.into_iter().map(OutboxRow::from).collect();
        rows.sort_by_key(|row| row.id);
        Ok(rows)
    }

    /// How long until the next step row comes due (zero if one is due now);
    /// `None` when there are none.
    pub async fn next_step_due_in(&self) -> Result<Option<Duration>> {
        let (seconds,): (Option<f64>,) = sqlx::query_as(
            "SELECT extract(epoch FROM min(available_at) - now())::float8
             FROM zap_run_outbox WHERE kind = 'step'",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(seconds.map(|seconds| Duration::from_secs_f64(seconds.max(0.0))))
    }

    pub async fn delete_outbox_rows(&self, ids: &[i64]) -> Result<()> {
        sqlx::query("DELETE FROM zap_run_outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Adds one outbox row in a transaction of its own.
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
        Ok(())
    }
}

/// Adds an outbox row inside the caller's transaction.
pub(crate) async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    run_id: Uuid,
    zap_id: Uuid,
    stage: u32,
    kind: OutboxKind,
    reason: Option<&str>,
    delay: Duration,
) -> Result<()> {
    let event_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO zap_run_outbox (event_id, run_id, zap_id, stage, kind, reason, available_at)
         VALUES ($1, $2, $3, $4, $5, $6, now() + $7 * interval '1 microsecond')",
    )
    .bind(event_id)
    .bind(run_id)
    .bind(zap_id)
    .bind(stage as i32)
    .bind(kind.as_str())
    .bind(reason)
    .bind(micros(delay))
    .execute(&mut **tx)
    .await?;
    if kind == OutboxKind::DeadLetter {
        // The record users list, under the announcing event's id.
        sqlx::query(
            "INSERT INTO zap_dead_letters (id, run_id, zap_id, owner_id, step, reason)
             SELECT $1, id, zap_id, owner_id, $2, $3 FROM zap_runs WHERE id = $4",
        )
        .bind(event_id)
        .bind(stage as i32)
        .bind(reason.unwrap_or_default())
        .bind(run_id)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// A duration as whole microseconds, PostgreSQL's interval precision.
pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
