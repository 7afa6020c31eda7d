//! Waking loops when outbox rows are committed, instead of at their next poll.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::watch;

use crate::db::Db;
use crate::{OUTBOX_CHANNEL, Store};

pub enum OutboxWakeups {
    /// LISTEN on the outbox channel; `None` while the connection is down.
    Postgres(Option<PgListener>),
    /// Committed by this process (SQLite has no other writer).
    Local(watch::Receiver<()>),
}

impl Store {
    /// A subscription to "outbox rows were committed", for waking loops
    /// early; they still poll, since a wake-up can be missed.
    pub async fn outbox_wakeups(&self) -> OutboxWakeups {
        match &self.db {
            Db::Postgres(pool) => {
                let listener = async {
                    let mut listener = PgListener::connect_with(pool).await.ok()?;
                    listener.listen(OUTBOX_CHANNEL).await.ok()?;
                    Some(listener)
                };
                OutboxWakeups::Postgres(listener.await)
            }
            Db::Sqlite { file, .. } => OutboxWakeups::Local(file.outbox_written.subscribe()),
        }
    }
}

impl OutboxWakeups {
    /// Waits for a wake-up; never returns while there is no way to get one.
    pub async fn wait(&mut self) {
        match self {
            Self::Postgres(Some(listener)) => {
                // The listener reconnects on the next call; until then, and
                // for what was missed meanwhile, the caller's poll covers.
                if let Err(error) = listener.recv().await {
                    tracing::warn!(%error, "outbox notifications lost; polling until reconnected");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Self::Postgres(None) => std::future::pending().await,
            Self::Local(changes) => {
                if changes.changed().await.is_err() {
                    // The store is gone; nothing will be written any more.
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}
