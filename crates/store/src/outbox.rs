//! The transactional outbox: work announced in the same transaction as the
//! state change behind it. A row with a future `available_at` is a delayed
//! retry (or a lease, while a local worker holds it).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::db::from_sqlite;
use crate::db::{Arg, PlannedEachTime, Stamp, Tx, instant_after, sql};
use crate::{Result, Store, StoreError};

/// The PostgreSQL channel on which writers announce the outbox rows they
/// committed, after the commit (see `wakeups::Announcer`).
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
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Step => "step",
            Self::DeadLetter => "dead_letter",
        }
    }

    fn parse(text: &str) -> Result<Self> {
        match text {
            "step" => Ok(Self::Step),
            "dead_letter" => Ok(Self::DeadLetter),
            other => Err(StoreError::Db(Arc::new(sqlx::Error::Decode(
                format!("unknown outbox row kind {other:?}").into(),
            )))),
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
    /// The W3C trace context of the work that wrote the row, if traced.
    pub trace_parent: Option<String>,
}

#[derive(sqlx::FromRow)]
struct OutboxRecord {
    id: i64,
    event_id: Uuid,
    run_id: Uuid,
    zap_id: Uuid,
    stage: i32,
    kind: String,
    reason: Option<String>,
    created_at: DateTime<Utc>,
    trace_parent: Option<String>,
}

from_sqlite!(OutboxRecord {
    id,
    event_id,
    run_id,
    zap_id,
    stage,
    kind,
    reason,
    created_at,
    trace_parent
});

/// The columns an [`OutboxRecord`] reads.
macro_rules! outbox_columns {
    () => {
        "id, event_id, run_id, zap_id, stage, kind, reason, created_at, trace_parent"
    };
}

impl TryFrom<OutboxRecord> for OutboxRow {
    type Error = StoreError;

    fn try_from(record: OutboxRecord) -> Result<Self> {
        Ok(Self {
            id: record.id,
            event_id: record.event_id,
            run_id: record.run_id,
            zap_id: record.zap_id,
            stage: record.stage as u32,
            kind: OutboxKind::parse(&record.kind)?,
            reason: record.reason,
            created_at: record.created_at,
            trace_parent: record.trace_parent,
        })
    }
}

/// Rows oldest first, as read.
fn rows(records: Vec<OutboxRecord>) -> Result<Vec<OutboxRow>> {
    let mut rows = records
        .into_iter()
        .map(OutboxRow::try_from)
        .collect::<Result<Vec<_>>>()?;
    rows.sort_by_key(|row| row.id);
    Ok(rows)
}

// The outbox's statements are planned each time they run: rows come and go
// by the thousand, and a plan kept from when the table was nearly empty
// goes on reading it whole.

/// Deletes the outbox rows `$1` names.
const DELETE_ROWS: PlannedEachTime<crate::db::Sql> = PlannedEachTime(crate::db::Sql {
    postgres: "DELETE FROM zap_run_outbox WHERE id = ANY($1)",
    sqlite: "DELETE FROM zap_run_outbox WHERE id IN (SELECT value FROM json_each($1))",
});

/// Leases up to `$1` due step rows until `$3` (see
/// [`Store::lease_due_outbox_rows`]), those due longest first.
///
/// Both read the first rows of the due index in its order, never every due
/// row. PostgreSQL asks for steps as `kind <> 'dead_letter'`: on an outbox
/// without statistics (it was empty when last analyzed, as it is between
/// bursts) its planner guesses that `kind = 'step'` matches a handful of
/// rows, and then sorts thousands of due rows on every lease.
const LEASE_DUE: PlannedEachTime<crate::db::Sql> = PlannedEachTime(sql!(
    "UPDATE zap_run_outbox SET available_at = $3
     WHERE id IN (SELECT id FROM zap_run_outbox WHERE ";
    postgres: "kind <> 'dead_letter'", sqlite: "kind = 'step'";
    " AND available_at <= $2 ORDER BY available_at, id LIMIT $1";
    postgres: " FOR UPDATE SKIP LOCKED", sqlite: "";
    ") RETURNING ", outbox_columns!()
));

fn lease_args(limit: u32, lease: Duration) -> [Arg<'static>; 3] {
    [
        limit.into(),
        Arg::Instant(Some(Utc::now())),
        Arg::after(lease),
    ]
}

/// [`Store::lease_due_outbox_rows`] inside the caller's transaction.
pub(crate) async fn lease_due(tx: &mut Tx, limit: u32, lease: Duration) -> Result<Vec<OutboxRow>> {
    let records = tx.fetch_all(LEASE_DUE, &lease_args(limit, lease)).await?;
    rows(records)
}

/// Rows claimed by one relay pass, locked until the pass commits.
pub struct OutboxClaim {
    tx: Tx,
    pub rows: Vec<OutboxRow>,
}

impl OutboxClaim {
    /// Deletes the rows the broker acknowledged and releases the others,
    /// which stay due for the next pass.
    pub async fn finish(mut self, delivered: &[i64]) -> Result<()> {
        if !delivered.is_empty() {
            delete_outbox_rows(&mut self.tx, delivered).await?;
        }
        self.tx.commit().await
    }
}

impl Store {
    /// Locks up to `limit` due rows, skipping rows another relay holds, so
    /// several processors share the work without relaying a row twice at once.
    /// Those due longest first, read in the due index's order, and without
    /// an "id > last seen" cursor: a row whose transaction committed late is
    /// still found.
    pub async fn claim_due_outbox_rows(&self, limit: u32) -> Result<OutboxClaim> {
        let mut tx = self.db.begin().await?;
        let records: Vec<OutboxRecord> = tx
            .fetch_all(
                PlannedEachTime(sql!(
                    "SELECT ", outbox_columns!(), " FROM zap_run_outbox WHERE available_at <= $2
                     ORDER BY available_at, id LIMIT $1";
                    postgres: " FOR UPDATE SKIP LOCKED", sqlite: "";
                )),
                &[limit.into(), Arg::Instant(Some(Utc::now()))],
            )
            .await?;
        Ok(OutboxClaim {
            tx,
            rows: rows(records)?,
        })
    }

    /// Leases up to `limit` due step rows to the caller for `lease`, for
    /// workers that take work from the outbox directly, without Kafka: they
    /// are not due again until then, and come back if never deleted.
    pub async fn lease_due_outbox_rows(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>> {
        let records = self
            .db
            .fetch_all(LEASE_DUE, &lease_args(limit, lease))
            .await?;
        rows(records)
    }

    /// How long until the next step row comes due (zero if one is due now);
    /// `None` when there are none. Loops sleep until then rather than until
    /// their next poll, so a retry runs when it is due.
    pub async fn next_step_due_in(&self) -> Result<Option<Duration>> {
        let (due,): (Option<Stamp>,) = self
            .db
            .reader()
            .fetch_one(
                "SELECT min(available_at) FROM zap_run_outbox WHERE kind = 'step'",
                &[],
            )
            .await?;
        Ok(due.map(|Stamp(due)| (due - Utc::now()).to_std().unwrap_or(Duration::ZERO)))
    }

    /// Deletes outbox rows whose work is recorded.
    pub async fn delete_outbox_rows(&self, ids: &[i64]) -> Result<()> {
        self.db.execute(DELETE_ROWS, &[Arg::Ids(ids)]).await?;
        Ok(())
    }

    /// Announces step `stage` again after `delay` (for a step another worker
    /// holds: if that worker vanished, its lease will have expired by then).
    pub async fn reschedule_step(
        &self,
        run_id: Uuid,
        zap_id: Uuid,
        stage: u32,
        delay: Duration,
    ) -> Result<()> {
        let mut tx = self.db.begin().await?;
        enqueue(&mut tx, run_id, zap_id, Announcement::step(stage, delay)).await?;
        tx.commit().await
    }

    /// Dead-letters an event that points at nothing runnable.
    pub async fn dead_letter(
        &self,
        run_id: Uuid,
        zap_id: Uuid,
        stage: u32,
        reason: &str,
    ) -> Result<()> {
        let mut tx = self.db.begin().await?;
        enqueue(
            &mut tx,
            run_id,
            zap_id,
            Announcement::dead_letter(stage, reason),
        )
        .await?;
        tx.commit().await
    }

    /// Deletes the outbox rows announcing dead letters, for deployments
    /// without a broker to announce them to; returns how many.
    pub async fn discard_dead_letter_announcements(&self) -> Result<u64> {
        self.db
            .execute("DELETE FROM zap_run_outbox WHERE kind = 'dead_letter'", &[])
            .await
    }

    /// How many rows are due now (not leased, not waiting for a retry),
    /// and how long the oldest of them has been due: all rows when a relay
    /// takes them, step rows alone when workers do (without a broker,
    /// dead-letter announcements are dropped, not taken).
    pub async fn outbox_backlog(&self, steps_only: bool) -> Result<(i64, Duration)> {
        let now = Utc::now();
        let query = match steps_only {
            true => {
                "SELECT count(*), min(available_at) FROM zap_run_outbox
                 WHERE available_at <= $1 AND kind = 'step'"
            }
            false => {
                "SELECT count(*), min(available_at) FROM zap_run_outbox WHERE available_at <= $1"
            }
        };
        let (due, oldest): (i64, Option<Stamp>) = self
            .db
            .reader()
            .fetch_one(query, &[Arg::Instant(Some(now))])
            .await?;
        let age = oldest.map_or(Duration::ZERO, |Stamp(oldest)| {
            (now - oldest).to_std().unwrap_or(Duration::ZERO)
        });
        Ok((due, age))
    }

    /// Counts outbox rows (due or not).
    pub async fn outbox_len(&self) -> Result<i64> {
        let (count,): (i64,) = self
            .db
            .reader()
            .fetch_one("SELECT count(*) FROM zap_run_outbox", &[])
            .await?;
        Ok(count)
    }
}

/// Deletes outbox rows inside the caller's transaction.
pub(crate) async fn delete_outbox_rows(tx: &mut Tx, ids: &[i64]) -> Result<()> {
    tx.execute(DELETE_ROWS, &[Arg::Ids(ids)]).await?;
    Ok(())
}

/// An outbox row to add to a run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Announcement<'a> {
    pub stage: u32,
    pub kind: OutboxKind,
    pub reason: Option<&'a str>,
    pub delay: Duration,
    pub trace_parent: Option<&'a str>,
}

impl<'a> Announcement<'a> {
    /// Step `stage`, due after `delay`.
    pub fn step(stage: u32, delay: Duration) -> Self {
        Self {
            stage,
            kind: OutboxKind::Step,
            reason: None,
            delay,
            trace_parent: None,
        }
    }

    /// The run failed for good at `stage`, for `reason`.
    pub fn dead_letter(stage: u32, reason: &'a str) -> Self {
        Self {
            stage,
            kind: OutboxKind::DeadLetter,
            reason: Some(reason),
            delay: Duration::ZERO,
            trace_parent: None,
        }
    }
}

/// Adds an outbox row inside the caller's transaction, due after its
/// delay; a dead letter is also recorded for users to list, under the
/// announcing event's id. Returns the row's id and event id.
pub(crate) async fn enqueue(
    tx: &mut Tx,
    run_id: Uuid,
    zap_id: Uuid,
    announcement: Announcement<'_>,
) -> Result<(i64, Uuid)> {
    let available_at = instant_after(announcement.delay);
    let added = insert(tx, run_id, zap_id, announcement, available_at).await?;
    tx.announce();
    Ok(added)
}

/// [`enqueue`] for a step already leased, until `lease_until`, to a worker
/// of this process that was handed it: no worker is woken for it.
pub(crate) async fn enqueue_leased(
    tx: &mut Tx,
    run_id: Uuid,
    zap_id: Uuid,
    announcement: Announcement<'_>,
    lease_until: DateTime<Utc>,
) -> Result<(i64, Uuid)> {
    insert(tx, run_id, zap_id, announcement, lease_until).await
}

async fn insert(
    tx: &mut Tx,
    run_id: Uuid,
    zap_id: Uuid,
    announcement: Announcement<'_>,
    available_at: DateTime<Utc>,
) -> Result<(i64, Uuid)> {
    let Announcement {
        stage,
        kind,
        reason,
        delay: _,
        trace_parent,
    } = announcement;
    let event_id = Uuid::now_v7();
    let now = Utc::now();
    let (id,): (i64,) = tx
        .fetch_one(
            "INSERT INTO zap_run_outbox (event_id, run_id, zap_id, stage, kind, reason,
                                         available_at, created_at, trace_parent)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             RETURNING id",
            &[
                event_id.into(),
                run_id.into(),
                zap_id.into(),
                stage.into(),
                kind.as_str().into(),
                reason.into(),
                Arg::Instant(Some(available_at)),
                now.into(),
                trace_parent.into(),
            ],
        )
        .await?;
    if kind == OutboxKind::DeadLetter {
        tx.execute(
            "INSERT INTO zap_dead_letters (id, run_id, zap_id, owner_id, step, reason, created_at)
             SELECT $1, id, zap_id, owner_id, $2, $3, $4 FROM zap_runs WHERE id = $5",
            &[
                event_id.into(),
                stage.into(),
                reason.unwrap_or_default().into(),
                now.into(),
                run_id.into(),
            ],
        )
        .await?;
    }
    Ok((id, event_id))
}
