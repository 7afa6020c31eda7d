//! Workers without Kafka: they lease due outbox rows straight from the
//! database (the embedded and PostgreSQL-only deployments).
//!
//! A leased row is not due again until its lease ends; it is deleted once
//! its step's outcome is recorded. A worker that dies leaves its rows to
//! come due again, and the step state absorbs the redelivery.

use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use zapflow_bus::Event;
use zapflow_store::handoff::{Handed, HandedRun, Handoff, handoff};
use zapflow_store::{ClaimedStep, OutboxRow, StepClaim, Store};

use crate::{Handled, Worker, WorkerSettings, spare_steps};

/// How long a worker with steps in flight sleeps at most before it looks
/// for due rows again.
const IN_FLIGHT_RECHECK: Duration = Duration::from_millis(50);

/// How often an idle worker drops dead-letter announcements.
const DISCARD_EVERY: Duration = Duration::from_secs(1);

/// Leases up to `limit` due rows with their steps claimed; if the database
/// refuses a claim (which fails them all), leases the rows alone, so that
/// each step is claimed on its own and only the refused one fails.
async fn lease(worker: &Worker, store: &Store, limit: u32) -> Vec<(OutboxRow, Option<StepClaim>)> {
    let settings = worker.settings();
    let error = match store
        .lease_and_claim_due_steps(limit, settings.lease, &settings.retry)
        .await
    {
        Ok(claimed) => {
            let claimed = claimed.into_iter();
            return claimed.map(|(row, claim)| (row, Some(claim))).collect();
        }
        Err(error) if error.is_transient() => error,
        Err(_) => match store.lease_due_outbox_rows(limit, settings.lease).await {
            Ok(rows) => return rows.into_iter().map(|row| (row, None)).collect(),
            Err(error) => error,
        },
    };
    tracing::warn!(%error, "cannot lease outbox rows");
    Vec::new()
}

/// The hand-off from ingest to a worker that runs steps as `settings` say:
/// ingest uses what leases leave spare (see [`run_local`]).
pub fn local_handoff(settings: &WorkerSettings) -> (Handoff, Handed) {
    let concurrency = settings.concurrency.max(1);
    handoff(concurrency, spare_steps(concurrency), settings.lease)
}

/// Takes work from the outbox, and the runs ingest hands over in `handed`,
/// until `shutdown`; then lets in-flight steps finish. Rows of abandoned
/// steps come due again after their lease.
pub async fn run_local(
    worker: Worker,
    store: Store,
    poll_interval: Duration,
    mut handed: Handed,
    shutdown: CancellationToken,
) {
    let concurrency = worker.settings().concurrency.max(1);
    // With steps in flight, lease for at least the spare steps at a time:
    // a lease costs about the same for one row as for many (the database
    // reads past the rows in flight), so one per finished step would cost
    // as much as the steps. An idle worker has every permit free.
    let min_lease = spare_steps(concurrency);
    let permits = handed.permits.clone();
    let mut tasks = JoinSet::new();
    let mut wakeups = store.outbox_wakeups().await;
    let mut last_discard = Instant::now()
        .checked_sub(DISCARD_EVERY)
        .unwrap_or_else(Instant::now);
    let run = |tasks: &mut JoinSet<()>, row, claim, permit| {
        tasks.spawn(run_step(
            worker.clone(),
            store.clone(),
            row,
            claim,
            permit,
            shutdown.clone(),
        ));
    };

    // Whether rows may be due that no lease has read: set by a wake-up
    // (rows were committed), a timeout (a delayed row may have come due) or
    // a lease that filled every free permit; cleared by a lease that found
    // fewer. A step finishing does not set it: whatever it enqueued
    // announced itself, and a run handed over never waits in the outbox.
    let mut maybe_due = true;
    while !shutdown.is_cancelled() {
        while tasks.try_join_next().is_some() {}
        while let Some(HandedRun { started, permit }) = handed.try_recv() {
            run(&mut tasks, started.row, Some(claimed(started.step)), permit);
        }
        let free = permits.available_permits();
        let rows = if !maybe_due || free < min_lease {
            Vec::new()
        } else {
            let rows = lease(&worker, &store, free as u32).await;
            maybe_due = rows.len() >= free;
            rows
        };
        let idle = rows.is_empty();
        for (row, claim) in rows {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            run(&mut tasks, row, claim, permit);
        }
        if !idle {
            continue;
        }
        // Without a broker, a dead letter's announcement has nowhere to go:
        // its record is in the dead-letter table, so the row is dropped (at
        // most once a second, never on the busy path).
        if last_discard.elapsed() >= DISCARD_EVERY {
            last_discard = Instant::now();
            if let Err(error) = store.discard_dead_letter_announcements().await {
                tracing::warn!(%error, "cannot discard dead-letter announcements");
            }
        }
        // Asleep until new rows are committed, a run is handed over, a step
        // finishes (a permit frees up), or the next row comes due: a retry
        // due in 100 ms runs then, not at the next poll. The poll only
        // covers lost wake-ups. With steps in flight, each one finishing
        // wakes the loop anyway: a short bound saves asking for the next due
        // time on every wake.
        let sleep = if !tasks.is_empty() {
            poll_interval.min(IN_FLIGHT_RECHECK)
        } else {
            match store.next_step_due_in().await {
                Ok(Some(due_in)) => due_in.clamp(Duration::from_millis(1), poll_interval),
                _ => poll_interval,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = wakeups.wait() => maybe_due = true,
            Some(HandedRun { started, permit }) = handed.recv() => {
                run(&mut tasks, started.row, Some(claimed(started.step)), permit);
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            () = tokio::time::sleep(sleep) => maybe_due = true,
        }
    }
    // Runs reserved before the shutdown still arrive, and run.
    handed.close();
    tracing::info!(in_flight = tasks.len(), "worker draining");
    while !(tasks.is_empty() && handed.idle()) {
        tokio::select! {
            Some(HandedRun { started, permit }) = handed.recv() => {
                run(&mut tasks, started.row, Some(claimed(started.step)), permit);
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            else => break,
        }
    }
}

/// A step claimed with its run's start.
fn claimed(step: ClaimedStep) -> StepClaim {
    StepClaim::Claimed(Box::new(step))
}

/// Runs the step `row` announces (claimed already, given `claim`) under
/// `permit`, and deletes the row unless recording the outcome did.
async fn run_step(
    worker: Worker,
    store: Store,
    row: OutboxRow,
    claim: Option<StepClaim>,
    permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let _permit = permit;
    let event = Event::from(&row);
    // A step that ran is recorded with its row deleted; any other answer
    // leaves the row to delete here.
    let handled = worker
        .execute_until_recorded(&event, Some(row.id), claim, &shutdown)
        .await;
    if handled.is_some_and(|handled| !matches!(handled, Handled::Ran(_)))
        && let Err(error) = store.delete_outbox_rows(&[row.id]).await
    {
        // The row comes due again after its lease; the step state makes
        // that a no-op.
        tracing::warn!(%error, outbox_id = row.id, "cannot delete a handled outbox row");
    }
}
