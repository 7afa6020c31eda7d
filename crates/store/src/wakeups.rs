//! Waking loops when outbox rows are committed, instead of at their next poll.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::db::Db;
use crate::{OUTBOX_CHANNEL, Store};

/// Announces outbox rows committed on PostgreSQL: to this process's loops
/// at once, and to other processes with a NOTIFY on [`OUTBOX_CHANNEL`],
/// sent after the commit by one task, so that the commits made while one is
/// on its way share the next. A NOTIFY inside the writing transaction would
/// hold PostgreSQL's notification lock (one per database) through its
/// commit and sync to disk, and so commit every writer one at a time.
#[derive(Debug)]
pub(crate) struct Announcer {
    /// The payload of this process's notifications: its own loops, woken
    /// already, skip them when they come back.
    id: String,
    local: watch::Sender<()>,
    remote: mpsc::Sender<()>,
}

impl Announcer {
    /// Starts the task that notifies other processes; it stops once the
    /// announcer is dropped.
    pub(crate) fn spawn(pool: &PgPool) -> Arc<Self> {
        let id = Uuid::new_v4().to_string();
        let (remote, mut pending) = mpsc::channel(1);
        let pool = pool.clone();
        let payload = id.clone();
        tokio::spawn(async move {
            while pending.recv().await.is_some() {
                let notified = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(OUTBOX_CHANNEL)
                    .bind(&payload)
                    .execute(&pool)
                    .await;
                if let Err(error) = notified {
                    tracing::warn!(%error, "cannot notify other processes of outbox rows; they poll");
                }
            }
        });
        Arc::new(Self {
            id,
            local: watch::Sender::new(()),
            remote,
        })
    }

    /// Outbox rows were committed.
    pub(crate) fn announce(&self) {
        self.local.send_replace(());
        // When full, a notification is on its way already and covers these
        // rows too: it is sent after they were committed.
        let _ = self.remote.try_send(());
    }
}

pub enum OutboxWakeups {
    /// This process's commits, and LISTEN on the outbox channel for other
    /// processes' (the listener is `None` while the connection is down).
    Postgres {
        local: watch::Receiver<()>,
        listener: Option<PgListener>,
        /// This process's notifications, already seen through `local`.
        own: String,
    },
    /// Committed by this process (SQLite has no other writer).
    Local(watch::Receiver<()>),
}

impl Store {
    /// A subscription to "outbox rows were committed", for waking loops
    /// early; they still poll, since a wake-up can be missed.
    pub async fn outbox_wakeups(&self) -> OutboxWakeups {
        match &self.db {
            Db::Postgres { pool, announcer } => {
                let listener = async {
                    let mut listener = PgListener::connect_with(pool).await.ok()?;
                    listener.listen(OUTBOX_CHANNEL).await.ok()?;
                    Some(listener)
                };
                OutboxWakeups::Postgres {
                    local: announcer.local.subscribe(),
                    listener: listener.await,
                    own: announcer.id.clone(),
                }
            }
            Db::Sqlite { file, .. } => OutboxWakeups::Local(file.outbox_written.subscribe()),
        }
    }
}

impl OutboxWakeups {
    /// Waits for a wake-up; never returns while there is no way to get one.
    pub async fn wait(&mut self) {
        match self {
            Self::Postgres {
                local,
                listener,
                own,
            } => {
                tokio::select! {
                    () = changed(local) => {}
                    () = notified(listener.as_mut(), own) => {}
                }
            }
            Self::Local(changes) => changed(changes).await,
        }
    }
}

/// Waits for a change; forever once the store is gone and nothing will be
/// written any more.
async fn changed(changes: &mut watch::Receiver<()>) {
    if changes.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Waits for another process's notification; forever without a listener.
async fn notified(listener: Option<&mut PgListener>, own: &str) {
    let Some(listener) = listener else {
        return std::future::pending().await;
    };
    loop {
        match listener.recv().await {
            Ok(notification) if notification.payload() == own => continue,
            Ok(_) => return,
            // The listener reconnects on the next call; until then, and for
            // what was missed meanwhile, the caller's poll covers.
            Err(error) => {
                tracing::warn!(%error, "outbox notifications lost; polling until reconnected");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return;
            }
        }
    }
}
