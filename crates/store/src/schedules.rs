//! The ticks of scheduled zaps. Every live scheduled zap has a row in
//! `zap_schedules` holding its next tick. The scheduler of each process
//! claims due rows: in one transaction it locks them (`FOR UPDATE SKIP
//! LOCKED` on PostgreSQL; SQLite has one writer), moves each to its next
//! tick and inserts the tick's runs with their first outbox rows. A tick
//! therefore makes one run however many processes claim; its run's
//! idempotency key (`tick:<time>`) makes sure of it even if two claims
//! overlapped.

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::types::Json;
use uuid::Uuid;
use zapflow_core::ActionSpec;
use zapflow_core::schedule::{MissedTicks, Schedule, TickPlan};

use crate::db::from_sqlite;
use crate::db::{Arg, Stamp, Tx, sql};
use crate::runs::insert_new_runs;
use crate::{NewRun, Result, Store};

/// A run a claim started for a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledRun {
    pub run_id: Uuid,
    pub zap_id: Uuid,
    pub scheduled_time: DateTime<Utc>,
}

/// Ticks of one zap that passed without a run of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissedTicksReport {
    pub zap_id: Uuid,
    /// How many (a lower bound after a very long gap).
    pub count: u64,
    pub policy: MissedTicks,
}

/// What one claim did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickClaim {
    pub started: Vec<ScheduledRun>,
    pub missed: Vec<MissedTicksReport>,
    /// Whether more zaps may be due than the claim took.
    pub more: bool,
}

#[derive(sqlx::FromRow)]
struct DueRow {
    zap_id: Uuid,
    next_tick_at: Stamp,
    owner_id: Uuid,
    actions: Json<Vec<ActionSpec>>,
    trigger: Json<Schedule>,
}

from_sqlite!(DueRow {
    zap_id,
    next_tick_at,
    owner_id,
    actions,
    trigger
});

/// The condition of a schedule that ticks: its zap live, active and
/// scheduled (`s` the schedule, `z` the zap).
macro_rules! ticking {
    () => {
        " FROM zap_schedules s JOIN zaps z ON z.id = s.zap_id
          WHERE z.status = 'active' AND z.deleted_at IS NULL AND z.trigger IS NOT NULL"
    };
}

impl Store {
    /// Claims the ticks due at `now` of up to `limit` zaps: starts their
    /// runs and moves each schedule to its next tick, in one transaction.
    pub async fn claim_ticks(&self, now: DateTime<Utc>, limit: u32) -> Result<TickClaim> {
        let mut tx = self.db.begin().await?;
        let due: Vec<DueRow> = tx
            .fetch_all(
                sql!(
                    "SELECT s.zap_id, s.next_tick_at, z.owner_id, z.actions, z.trigger",
                    ticking!(),
                    " AND s.next_tick_at <= $1 ORDER BY s.next_tick_at LIMIT $2";
                    postgres: " FOR UPDATE OF s SKIP LOCKED", sqlite: "";
                ),
                &[Arg::Instant(Some(now)), limit.into()],
            )
            .await?;
        let mut claim = TickClaim {
            more: due.len() >= limit as usize,
            ..TickClaim::default()
        };
        let mut runs = Vec::new();
        for row in due {
            let schedule = row.trigger.0;
            let plan = match schedule.ticks() {
                Ok(ticks) => ticks.plan(row.next_tick_at.0, now, schedule.missed_ticks),
                Err(error) => {
                    tracing::warn!(zap_id = %row.zap_id, %error, "stored schedule does not parse; it stops");
                    TickPlan {
                        run: Vec::new(),
                        missed: 0,
                        next: None,
                    }
                }
            };
            match plan.next {
                Some(next) => {
                    tx.execute(
                        "UPDATE zap_schedules SET next_tick_at = $2 WHERE zap_id = $1",
                        &[row.zap_id.into(), Arg::Instant(Some(next))],
                    )
                    .await?;
                }
                None => delete_schedule(&mut tx, row.zap_id).await?,
            }
            if plan.missed > 0 {
                claim.missed.push(MissedTicksReport {
                    zap_id: row.zap_id,
                    count: plan.missed,
                    policy: schedule.missed_ticks,
                });
            }
            runs.extend(plan.run.into_iter().map(|tick| NewRun {
                id: Uuid::now_v7(),
                zap_id: row.zap_id,
                owner_id: row.owner_id,
                trigger: serde_json::json!({}),
                headers: serde_json::json!({}),
                query: serde_json::json!({}),
                actions: row.actions.0.clone(),
                idempotency_key: Some(format!(
                    "tick:{}",
                    tick.to_rfc3339_opts(SecondsFormat::AutoSi, true)
                )),
                trace_parent: None,
                scheduled_time: Some(tick),
            }));
        }
        let inserted = insert_new_runs(&mut tx, &runs, now).await?;
        tx.commit().await?;
        claim.started = runs
            .iter()
            .filter(|run| inserted.contains(&run.id))
            .map(|run| ScheduledRun {
                run_id: run.id,
                zap_id: run.zap_id,
                scheduled_time: run.scheduled_time.unwrap_or(now),
            })
            .collect();
        Ok(claim)
    }

    /// The earliest next tick of the schedules that tick, if any.
    pub async fn next_tick_due(&self) -> Result<Option<DateTime<Utc>>> {
        let (next,): (Option<Stamp>,) = self
            .db
            .reader()
            .fetch_one(concat!("SELECT min(s.next_tick_at)", ticking!()), &[])
            .await?;
        Ok(next.map(|stamp| stamp.0))
    }
}

/// Gives zap `id` the schedule `schedule` from `now` on (its first tick
/// then), or none.
pub(crate) async fn set_schedule(
    tx: &mut Tx,
    id: Uuid,
    schedule: Option<&Schedule>,
    now: DateTime<Utc>,
) -> Result<()> {
    let first = schedule
        .and_then(|schedule| schedule.ticks().ok())
        .and_then(|ticks| ticks.first(now));
    let Some(first) = first else {
        return delete_schedule(tx, id).await;
    };
    tx.execute(
        "INSERT INTO zap_schedules (zap_id, next_tick_at) VALUES ($1, $2)
         ON CONFLICT (zap_id) DO UPDATE SET next_tick_at = excluded.next_tick_at",
        &[id.into(), Arg::Instant(Some(first))],
    )
    .await?;
    Ok(())
}

/// Gives zap `id` its schedule from `now` on unless it has a next tick.
pub(crate) async fn ensure_schedule(
    tx: &mut Tx,
    id: Uuid,
    schedule: &Schedule,
    now: DateTime<Utc>,
) -> Result<()> {
    let Some(first) = schedule.ticks().ok().and_then(|ticks| ticks.first(now)) else {
        return Ok(());
    };
    tx.execute(
        "INSERT INTO zap_schedules (zap_id, next_tick_at) VALUES ($1, $2)
         ON CONFLICT (zap_id) DO NOTHING",
        &[id.into(), Arg::Instant(Some(first))],
    )
    .await?;
    Ok(())
}

/// Stops zap `id`'s schedule.
pub(crate) async fn delete_schedule(tx: &mut Tx, id: Uuid) -> Result<()> {
    tx.execute("DELETE FROM zap_schedules WHERE zap_id = $1", &[id.into()])
        .await?;
    Ok(())
}
