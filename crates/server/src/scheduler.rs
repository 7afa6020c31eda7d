//! The scheduler: one task in every process with workers. It claims the
//! ticks due (each tick makes one run, however many processes claim; see
//! the store's `schedules`), then sleeps until the earliest next tick, but
//! never longer than a second, so that new and changed schedules are seen
//! within one.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use zapflow_store::{Store, StoreError};

/// Zaps claimed per transaction.
const BATCH: u32 = 100;
/// The shortest and longest sleep between two claims.
const MIN_WAIT: Duration = Duration::from_millis(10);
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Claims due ticks until `shutdown`.
pub(crate) async fn run(store: Store, shutdown: CancellationToken) {
    loop {
        let wait = match claim_due(&store, &shutdown).await {
            Ok(wait) => wait,
            Err(error) => {
                tracing::warn!(%error, "claiming scheduled ticks failed; trying again");
                MAX_WAIT
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Claims every tick due now; returns how long to sleep.
async fn claim_due(store: &Store, shutdown: &CancellationToken) -> Result<Duration, StoreError> {
    loop {
        let claim = store.claim_ticks(Utc::now(), BATCH).await?;
        for run in &claim.started {
            tracing::debug!(
                run_id = %run.run_id,
                zap_id = %run.zap_id,
                scheduled_time = %run.scheduled_time.to_rfc3339(),
                "scheduled run started"
            );
        }
        for missed in &claim.missed {
            tracing::warn!(
                zap_id = %missed.zap_id,
                missed = missed.count,
                policy = missed.policy.as_str(),
                "scheduled ticks missed"
            );
        }
        if !claim.more || shutdown.is_cancelled() {
            break;
        }
    }
    let wait = match store.next_tick_due().await? {
        Some(next) => (next - Utc::now()).to_std().unwrap_or(Duration::ZERO),
        None => MAX_WAIT,
    };
    Ok(wait.clamp(MIN_WAIT, MAX_WAIT))
}
