//! Everything zapflow keeps, in PostgreSQL.
//!
//! The database is the source of truth: every state change is committed
//! together with the outbox row that announces the work it causes.

mod claim;
mod outbox;
mod portable;
mod runs;
mod sqlite;
mod steps;
mod storable;
mod store;
mod users;
mod zaps;

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};

pub use outbox::{OUTBOX_CHANNEL, OutboxClaim, OutboxKind, OutboxRow};
pub use runs::{NewRun, Replay, Run, RunPage, Step, TimeWindow};
pub use sqlite::SqliteStore;
pub use steps::{ClaimedStep, StepClaim, StepOutcome};
pub use store::{OutboxWakeups, Store};
pub use zaps::{Zap, ZapForIngest};

/// The schema, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/postgres");
/// The embedded deployment's schema.
pub static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("../../migrations/sqlite");

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    #[error("internal database error")]
    Db(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    /// The one place where database error codes become domain errors.
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::RowNotFound => Self::NotFound,
            // SQLSTATE 23505 on PostgreSQL, SQLITE_CONSTRAINT_UNIQUE on SQLite.
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::AlreadyExists,
            _ => Self::Db(error),
        }
    }
}

/// The PostgreSQL store: the distributed deployment's.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects without waiting for the server: the first query does.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy(url)?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    portable::portable_queries!();
}
