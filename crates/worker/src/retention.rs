//! Dead letters are kept for a while, then trimmed, so that the table stays
//! bounded whatever fails.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use zapflow_store::Store;

/// How often the trim runs.
const TRIM_EVERY: Duration = Duration::from_secs(60 * 60);

/// Deletes dead letters older than `retention` now and every hour until
/// `shutdown`. Several workers may trim at once; each row goes once.
pub async fn trim_dead_letters(store: Store, retention: Duration, shutdown: CancellationToken) {
    loop {
        trim_once(&store, retention).await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(TRIM_EVERY) => {}
        }
    }
}

/// One trim: dead letters recorded more than `retention` ago go.
pub async fn trim_once(store: &Store, retention: Duration) {
    let Ok(retention) = chrono::Duration::from_std(retention) else {
        return;
    };
    let cutoff = chrono::Utc::now() - retention;
    match store.purge_dead_letters(cutoff).await {
        Ok(0) => {}
        Ok(deleted) => {
            tracing::info!(deleted, %cutoff, "dead letters past their retention deleted")
        }
        Err(error) => tracing::warn!(%error, "cannot trim dead letters"),
    }
}
