//! Workers without Kafka: they lease due outbox rows straight from the
//! database (the embedded and PostgreSQL-only deployments).
//!
//! A leased row is not due again until its lease ends; it is deleted once
//! its step's outcome is recorded. A worker that dies leaves its rows to
//! come due again, and the step state absorbs the redelivery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use zapflow_bus::Event;
use zapflow_store::{OutboxRow, StepClaim, Store};

use crate::{Handled, Worker};

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

/// Takes work from the outbox until `shutdown`, then lets in-flight steps
/// finish; rows of abandoned steps come due again after their lease.
pub async fn run_local(
    worker: Worker,
    store: Store,
    poll_interval: Duration,
    shutdown: CancellationToken,
) {
    let concurrency = worker.settings().concurrency.max(1);
    // With steps in flight, lease for a quarter of the permits at a time:
    // a lease costs about the same for one row as for many (the database
    // reads past the rows in flight), so one per finished step would cost
    // as much as the steps. An idle worker has every permit free.
    let min_lease = (concurrency / 4).max(1);
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let mut wakeups = store.outbox_wakeups().await;
    let mut last_discard = Instant::now()
        .checked_sub(DISCARD_EVERY)
        .unwrap_or_else(Instant::now);

    while !shutdown.is_cancelled() {
        while tasks.try_join_next().is_some() {}
        let free = permits.available_permits();
        let rows = if free < min_lease {
            Vec::new()
        } else {
            lease(&worker, &store, free as u32).await
        };
        let idle = rows.is_empty();
        for (row, claim) in rows {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let (worker, store, shutdown) = (worker.clone(), store.clone(), shutdown.clone());
            tasks.spawn(async move {
                let _permit = permit;
                let event = Event::from(&row);
                // A step that ran is recorded with its row deleted; any
                // other answer leaves the row to delete here.
                let handled = worker
                    .execute_until_recorded(&event, Some(row.id), claim, &shutdown)
                    .await;
                if handled.is_some_and(|handled| !matches!(handled, Handled::Ran(_)))
                    && let Err(error) = store.delete_outbox_rows(&[row.id]).await
                {
                    // The row comes due again after its lease; the step
                    // state makes that a no-op.
                    tracing::warn!(%error, outbox_id = row.id, "cannot delete a handled outbox row");
                }
            });
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
        // Asleep until new rows are committed, a step finishes (a permit
        // frees up), or the next row comes due: a retry due in 100 ms runs
        // then, not at the next poll. The poll only covers lost wake-ups.
        // With steps in flight, each one finishing wakes the loop anyway:
        // a short bound saves asking for the next due time on every wake.
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
            () = wakeups.wait() => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            () = tokio::time::sleep(sleep) => {}
        }
    }
    tracing::info!(in_flight = tasks.len(), "worker draining");
    while tasks.join_next().await.is_some() {}
}
