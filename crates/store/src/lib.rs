//! Everything zapflow keeps, in PostgreSQL or an SQLite file, behind one
//! [`Store`].
//!
//! The database is the source of truth: every state change is committed
//! together with the outbox row that announces the work it causes. Each
//! query is written once, in the module of its concept (users, zaps, runs,
//! steps, outbox, dead letters); the differences between the two dialects
//! live in `db`.

mod claim;
mod db;
mod dead_letters;
mod group_commit;
pub mod handoff;
mod outbox;
mod runs;
mod schedules;
mod steps;
mod storable;
mod users;
mod wakeups;
mod zap_cache;
mod zaps;

use std::path::Path;
use std::sync::Arc;

use sqlx::migrate::Migrator;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;

use crate::db::Db;
use crate::zap_cache::ZapCache;

pub use db::Durability;
pub use dead_letters::{DeadLetter, DeadLetterPage};
pub use group_commit::{GroupCommit, answers};
pub use outbox::{OUTBOX_CHANNEL, OutboxClaim, OutboxKind, OutboxRow};
pub use runs::{
    Delivery, NewRun, RecordedRun, Replay, Run, RunChange, RunFilter, RunPage, Started, Step,
    TimeWindow,
};
pub use schedules::{MissedTicksReport, ScheduledRun, TickClaim};
pub use steps::{ClaimedStep, Finish, Patience, StepClaim, StepOutcome};
pub use wakeups::OutboxWakeups;
pub use zap_cache::ZAPS_CHANNEL;
pub use zaps::{Zap, ZapForIngest};

/// The schema, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/postgres");
/// The embedded deployment's schema.
pub static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("../../migrations/sqlite");

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What went wrong in the database. Cloneable, so that the operations
/// sharing a failed commit can each be told.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    /// The database cannot answer now (connection lost, pool exhausted,
    /// deadlock, serialization failure, shutdown, busy file): the same
    /// request may succeed when tried again.
    #[error("database unavailable")]
    Unavailable(#[source] Arc<sqlx::Error>),
    /// The database refused a value it cannot store (an invalid character,
    /// a value over a size limit): trying again cannot help.
    #[error("value refused by the database")]
    Refused(#[source] Arc<sqlx::Error>),
    #[error("internal database error")]
    Db(#[source] Arc<sqlx::Error>),
}

impl StoreError {
    /// What an operation gets whose commit task died before answering.
    pub fn crashed() -> Self {
        Self::Unavailable(Arc::new(sqlx::Error::WorkerCrashed))
    }

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
                Some(Class::Transient) => Self::Unavailable(Arc::new(error)),
                Some(Class::Refused) => Self::Refused(Arc::new(error)),
                None => Self::Db(Arc::new(error)),
            },
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable(Arc::new(error)),
            _ => Self::Db(Arc::new(error)),
        }
    }
}

/// A status as stored, read back.
pub(crate) fn parse_status<T: std::str::FromStr<Err = zapflow_core::model::UnknownStatus>>(
    text: &str,
) -> Result<T> {
    text.parse()
        .map_err(|error| StoreError::Db(Arc::new(sqlx::Error::Decode(Box::new(error)))))
}

enum Class {
    Transient,
    Refused,
}

/// Sorts the database errors that are neither bugs nor missing rows.
fn classify(error: &dyn sqlx::error::DatabaseError) -> Option<Class> {
    let code = error.code()?;
    if error.try_downcast_ref::<db::SqliteFailure>().is_some() {
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

/// The database: PostgreSQL (distributed and PostgreSQL-only deployments)
/// or an SQLite file (embedded). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
    zaps: Arc<ZapCache>,
}

impl Store {
    /// Opens the database a URL names: `postgres://...` (lazily: the first
    /// query connects) or `sqlite:...` (created if missing).
    pub async fn open(url: &str, max_connections: u32) -> Result<Self> {
        let db = if url.starts_with("sqlite:") {
            Db::sqlite_url(url).await?
        } else {
            Db::postgres_lazy(url, max_connections)?
        };
        Ok(Self::new(db))
    }

    fn new(db: Db) -> Self {
        Self {
            zaps: ZapCache::new(&db),
            db,
        }
    }

    /// Opens (creating) an SQLite database file.
    pub async fn open_file(path: &Path) -> Result<Self> {
        Self::open_file_with(path, Durability::default()).await
    }

    /// [`open_file`](Self::open_file) with a chosen durability.
    pub async fn open_file_with(path: &Path, durability: Durability) -> Result<Self> {
        Ok(Self::new(Db::sqlite_file(path, durability).await?))
    }

    /// The PostgreSQL pool, when this is PostgreSQL.
    pub fn postgres(&self) -> Option<&PgPool> {
        match &self.db {
            Db::Postgres { pool, .. } => Some(pool),
            Db::Sqlite { .. } => None,
        }
    }

    /// A pool of sqlx connections to the SQLite file, when this is one (the
    /// store itself uses its own connections; see `db::sqlite`).
    pub fn sqlite(&self) -> Option<&SqlitePool> {
        match &self.db {
            Db::Sqlite { file, .. } => Some(&file.pool),
            Db::Postgres { .. } => None,
        }
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        match &self.db {
            Db::Postgres { pool, .. } => MIGRATOR.run(pool).await,
            Db::Sqlite { file, .. } => SQLITE_MIGRATOR.run(&file.pool).await,
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<()> {
        self.db.execute("SELECT 1", &[]).await?;
        Ok(())
    }
}
