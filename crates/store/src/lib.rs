//! Everything zapflow keeps, in PostgreSQL or an SQLite file.
//!
//! The database is the source of truth: every state change is committed
//! together with the outbox row that announces the work it causes.

mod claim;
mod dead_letters;
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

pub use dead_letters::{DeadLetter, DeadLetterPage};
pub use outbox::{OUTBOX_CHANNEL, OutboxClaim, OutboxKind, OutboxRow};
pub use runs::{NewRun, Replay, Run, RunPage, Step, TimeWindow};
pub use sqlite::{Durability, SqliteStore};
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
    /// The database cannot answer now (connection lost, pool exhausted,
    /// deadlock, serialization failure, shutdown, busy file): the same
    /// request may succeed when tried again.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The database refused a value it cannot store (an invalid character,
    /// a value over a size limit): trying again cannot help.
    #[error("value refused by the database")]
    Refused(#[source] sqlx::Error),
    #[error("internal database error")]
    Db(#[source] sqlx::Error),
}

impl StoreError {
    /// Whether trying the same operation again may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    /// The one place where database errors become domain errors.
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::RowNotFound => Self::NotFound,
            // SQLSTATE 23505 on PostgreSQL, SQLITE_CONSTRAINT_UNIQUE on SQLite.
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::AlreadyExists,
            sqlx::Error::Database(db) => match classify(db.as_ref()) {
                Some(Class::Transient) => Self::Unavailable(error),
                Some(Class::Refused) => Self::Refused(error),
                None => Self::Db(error),
            },
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable(error),
            _ => Self::Db(error),
        }
    }
}

enum Class {
    Transient,
    Refused,
}

/// Sorts the database errors that are neither bugs nor missing rows.
fn classify(error: &dyn sqlx::error::DatabaseError) -> Option<Class> {
    let code = error.code()?;
    if error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
    {
        // Extended result codes: the primary code is the low byte.
        return match code.parse::<i32>().ok()? & 0xff {
            // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_FULL, SQLITE_IOERR
            5 | 6 | 13 | 10 => Some(Class::Transient),
            // SQLITE_TOOBIG, SQLITE_MISMATCH
            18 | 20 => Some(Class::Refused),
            _ => None,
        };
    }
    match code.as_ref() {
        // serialization_failure, deadlock_detected, lock_not_available,
        // too_many_connections, admin/crash shutdown, cannot_connect_now.
        "40001" | "40P01" | "55P03" | "53300" | "57P01" | "57P02" | "57P03" => {
            Some(Class::Transient)
        }
        // Connection exceptions.
        code if code.starts_with("08") => Some(Class::Transient),
        // Data exceptions (NUL in text or jsonb, bad encodings, values out
        // of range) and program limits (an index row too large).
        code if code.starts_with("22") || code == "54000" => Some(Class::Refused),
        _ => None,
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
