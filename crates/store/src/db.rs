//! The seam between the two databases. Every query of the store is written
//! once, in its concept's module, and runs through here; what really differs
//! between PostgreSQL and SQLite is confined to this module:
//!
//! - binding: an [`Arg::Instant`] (a time that queries compare: due times,
//!   leases) is a `timestamptz` on PostgreSQL and integer microseconds on
//!   SQLite, whose text times would not compare as times; [`Arg::Ids`] is an
//!   array on PostgreSQL and a JSON array on SQLite. [`Stamp`] reads an
//!   instant back from either;
//! - statement text, where the dialects disagree ([`Sql`], written with
//!   [`sql!`]): row locks (`FOR UPDATE [SKIP LOCKED]`; SQLite has one writer
//!   and locks nothing), appending to a JSON array, lists of ids;
//! - wake-ups: a committed transaction that added outbox rows
//!   ([`Tx::announce`]) marks a watch channel for this process's loops (on
//!   SQLite the only writer); on PostgreSQL it also NOTIFYs other processes,
//!   after the commit (see [`Announcer`]);
//! - drivers: PostgreSQL through sqlx's pool; the SQLite file through
//!   `rusqlite`, each statement run on the task that asks for it (see
//!   [`sqlite`]), reading rows with [`FromSqlite`] beside sqlx's `FromRow`.
//!
//! Times are always bound from Rust, never taken from the database's clock,
//! so that both dialects read the same. On PostgreSQL with processes on
//! several hosts, their clocks (kept by NTP, milliseconds apart) only shift
//! a due row or an expired lease by that much.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::error::BoxDynError;
use sqlx::postgres::{
    PgArguments, PgConnection, PgPool, PgPoolOptions, PgRow, PgTypeInfo, PgValueRef,
};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::types::Json;
use sqlx::{Arguments, Decode, FromRow, Postgres, Transaction, Type};
use uuid::Uuid;

use self::sqlite::SqliteFile;
pub(crate) use self::sqlite::{Column, FromSqlite, SqliteFailure, from_sqlite};
use crate::wakeups::Announcer;
use crate::{Result, StoreError};

mod sqlite;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Postgres,
    Sqlite,
}

/// A statement whose text differs between the dialects.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sql {
    pub postgres: &'static str,
    pub sqlite: &'static str,
}

/// Statement text: the same for both dialects (`&'static str`) or not ([`Sql`]).
pub(crate) trait Statement: Copy {
    fn text(self, dialect: Dialect) -> &'static str;

    /// Whether PostgreSQL keeps the statement prepared on each connection,
    /// and with it, after a few runs, one plan for any parameters.
    fn prepared(self) -> bool {
        true
    }
}

/// A statement PostgreSQL plans each time it runs, with its parameters and
/// the tables as they are then: one that joins a batch to a table. A plan
/// kept for good, made while the table was small, would go on reading it
/// whole.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlannedEachTime<S>(pub S);

impl<S: Statement> Statement for PlannedEachTime<S> {
    fn text(self, dialect: Dialect) -> &'static str {
        self.0.text(dialect)
    }

    fn prepared(self) -> bool {
        false
    }
}

impl Statement for &'static str {
    fn text(self, _: Dialect) -> &'static str {
        self
    }
}

impl Statement for Sql {
    fn text(self, dialect: Dialect) -> &'static str {
        match dialect {
            Dialect::Postgres => self.postgres,
            Dialect::Sqlite => self.sqlite,
        }
    }
}

/// A statement the same in both dialects but for one fragment, or two:
/// `sql!("SELECT ... FROM t" ; postgres: " FOR UPDATE", sqlite: "" ; " LIMIT 1")`.
macro_rules! sql {
    ($($before:expr),* ; postgres: $postgres:expr, sqlite: $sqlite:expr ; $($after:expr),*) => {
        $crate::db::Sql {
            postgres: concat!($($before,)* $postgres $(, $after)*),
            sqlite: concat!($($before,)* $sqlite $(, $after)*),
        }
    };
    ($($before:expr),* ; postgres: $postgres:expr, sqlite: $sqlite:expr ;
     $($between:expr),* ; postgres: $postgres2:expr, sqlite: $sqlite2:expr ; $($after:expr),*) => {
        $crate::db::Sql {
            postgres: concat!($($before,)* $postgres, $($between,)* $postgres2 $(, $after)*),
            sqlite: concat!($($before,)* $sqlite, $($between,)* $sqlite2 $(, $after)*),
        }
    };
}
pub(crate) use sql;

/// One bound parameter.
#[derive(Debug)]
pub(crate) enum Arg<'a> {
    Uuid(Option<Uuid>),
    Text(Option<&'a str>),
    Int(i64),
    Bytes(&'a [u8]),
    Json(Option<Box<RawValue>>),
    /// A time kept as a record (`created_at`, `finished_at`).
    Time(Option<DateTime<Utc>>),
    /// A time that queries compare (see the module doc).
    Instant(Option<DateTime<Utc>>),
    Ids(&'a [i64]),
}

impl Arg<'_> {
    /// `value` as JSON (`jsonb` on PostgreSQL, text on SQLite).
    pub(crate) fn json(value: &impl Serialize) -> Result<Self> {
        serde_json::value::to_raw_value(value)
            .map(|raw| Self::Json(Some(raw)))
            .map_err(|error| StoreError::Db(Arc::new(sqlx::Error::Encode(Box::new(error)))))
    }

    /// `value` as JSON, or NULL.
    pub(crate) fn json_or_null(value: Option<&impl Serialize>) -> Result<Self> {
        value.map_or(Ok(Self::Json(None)), Self::json)
    }

    /// `delay` from now, as an instant.
    pub(crate) fn after(delay: Duration) -> Self {
        Self::Instant(Some(instant_after(delay)))
    }
}

/// `delay` from now (a delay too long to add lands at the end of time).
pub(crate) fn instant_after(delay: Duration) -> DateTime<Utc> {
    chrono::TimeDelta::from_std(delay)
        .ok()
        .and_then(|delay| Utc::now().checked_add_signed(delay))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl From<Uuid> for Arg<'_> {
    fn from(id: Uuid) -> Self {
        Self::Uuid(Some(id))
    }
}

impl From<Option<Uuid>> for Arg<'_> {
    fn from(id: Option<Uuid>) -> Self {
        Self::Uuid(id)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(text: &'a str) -> Self {
        Self::Text(Some(text))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(text: Option<&'a str>) -> Self {
        Self::Text(text)
    }
}

impl<'a> From<&'a Option<String>> for Arg<'a> {
    fn from(text: &'a Option<String>) -> Self {
        Self::Text(text.as_deref())
    }
}

impl From<i64> for Arg<'_> {
    fn from(number: i64) -> Self {
        Self::Int(number)
    }
}

impl From<u32> for Arg<'_> {
    fn from(number: u32) -> Self {
        Self::Int(i64::from(number))
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(bytes: &'a [u8]) -> Self {
        Self::Bytes(bytes)
    }
}

impl From<DateTime<Utc>> for Arg<'_> {
    fn from(time: DateTime<Utc>) -> Self {
        Self::Time(Some(time))
    }
}

impl From<Option<DateTime<Utc>>> for Arg<'_> {
    fn from(time: Option<DateTime<Utc>>) -> Self {
        Self::Time(time)
    }
}

fn postgres_arguments(args: &[Arg<'_>]) -> Result<PgArguments, BoxDynError> {
    let mut bound = PgArguments::default();
    for arg in args {
        match arg {
            Arg::Uuid(id) => bound.add(*id)?,
            Arg::Text(text) => bound.add(*text)?,
            Arg::Int(number) => bound.add(*number)?,
            Arg::Bytes(bytes) => bound.add(*bytes)?,
            Arg::Json(json) => bound.add(json.as_deref().map(Json))?,
            Arg::Time(time) | Arg::Instant(time) => bound.add(*time)?,
            Arg::Ids(ids) => bound.add(*ids)?,
        }
    }
    Ok(bound)
}

/// Arguments that could not be encoded are a bug, not a database's answer.
fn encoded<A>(arguments: Result<A, BoxDynError>) -> Result<A> {
    arguments.map_err(|error| StoreError::Db(Arc::new(sqlx::Error::Encode(error))))
}

/// An instant read back (see [`Arg::Instant`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamp(pub DateTime<Utc>);

impl Type<Postgres> for Stamp {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <DateTime<Utc> as Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for Stamp {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Self(<DateTime<Utc> as Decode<Postgres>>::decode(value)?))
    }
}

/// A row type both dialects can read (a `#[derive(sqlx::FromRow)]` struct
/// or a tuple).
pub(crate) trait Record: for<'r> FromRow<'r, PgRow> + FromSqlite + Send + Unpin {}

impl<T> Record for T where T: for<'r> FromRow<'r, PgRow> + FromSqlite + Send + Unpin {}

/// What a committed write on the SQLite file survives. In WAL mode,
/// `synchronous=NORMAL` loses nothing when the process dies but may lose the
/// last commits when the machine loses power or the OS crashes; `FULL`
/// syncs the WAL on every commit (writes that arrive together share one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every commit is on disk before it is acknowledged (`FULL`).
    #[default]
    PowerLoss,
    /// Commits survive a killed process, not a power loss (`NORMAL`).
    ProcessCrash,
}

impl Durability {
    /// SQLite's `synchronous` setting for it.
    pub(crate) fn synchronous(self) -> &'static str {
        match self {
            Self::PowerLoss => "FULL",
            Self::ProcessCrash => "NORMAL",
        }
    }
}

/// Which rows of a query are read: all, or the first (the rest are never
/// fetched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rows {
    All,
    First,
}

/// A connection pool to either database.
#[derive(Debug, Clone)]
pub(crate) enum Db {
    Postgres {
        pool: PgPool,
        announcer: Arc<Announcer>,
    },
    Sqlite {
        file: Arc<SqliteFile>,
        /// Whether statements go to the file's read-only connections.
        read_only: bool,
    },
}

impl Db {
    /// Connects to PostgreSQL without waiting for the server: the first
    /// query does.
    pub(crate) fn postgres_lazy(url: &str, max_connections: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy(url)?;
        let announcer = Announcer::spawn(&pool);
        Ok(Self::Postgres { pool, announcer })
    }

    /// Opens (creating if missing) the SQLite file at `path`, in WAL mode.
    pub(crate) async fn sqlite_file(path: &Path, durability: Durability) -> Result<Self> {
        Ok(Self::Sqlite {
            file: Arc::new(SqliteFile::open(path, durability).await?),
            read_only: false,
        })
    }

    /// Opens the file a `sqlite:` URL names. A database in memory would be
    /// each connection's own, so the URL must name a file.
    pub(crate) async fn sqlite_url(url: &str) -> Result<Self> {
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Err(StoreError::from(sqlx::Error::Configuration(
                format!("{url}: the embedded database must be a file").into(),
            )));
        }
        let options = SqliteConnectOptions::from_str(url)?;
        Self::sqlite_file(options.get_filename(), Durability::default()).await
    }

    pub(crate) fn dialect(&self) -> Dialect {
        match self {
            Self::Postgres { .. } => Dialect::Postgres,
            Self::Sqlite { .. } => Dialect::Sqlite,
        }
    }

    /// Wakes whoever waits for outbox rows: a statement run alone
    /// committed some.
    pub(crate) fn announce(&self) {
        match self {
            Self::Postgres { announcer, .. } => announcer.announce(),
            Self::Sqlite { file, .. } => {
                file.outbox_written.send_replace(());
            }
        }
    }

    /// The same database for statements that only read: on SQLite, its
    /// read-only connections (a write there fails).
    pub(crate) fn reader(&self) -> Self {
        match self {
            Self::Postgres { .. } => self.clone(),
            Self::Sqlite { file, .. } => Self::Sqlite {
                file: file.clone(),
                read_only: true,
            },
        }
    }

    pub(crate) async fn begin(&self) -> Result<Tx> {
        Ok(match self {
            Self::Postgres { pool, announcer } => Tx::Postgres {
                tx: pool.begin().await?,
                announcer: announcer.clone(),
                announced: false,
            },
            Self::Sqlite { file, read_only } => Tx::Sqlite {
                tx: file.begin(*read_only).await?,
                announced: false,
            },
        })
    }

    /// Runs a statement; returns how many rows it changed.
    pub(crate) async fn execute(&self, sql: impl Statement, args: &[Arg<'_>]) -> Result<u64> {
        match self {
            Self::Postgres { pool, .. } => {
                postgres_execute(&mut *pool.acquire().await?, sql, args).await
            }
            Self::Sqlite { file, read_only } => {
                let sql = sql.text(Dialect::Sqlite);
                file.run(*read_only, |connection| {
                    sqlite::execute(connection, sql, args)
                })
                .await
            }
        }
    }

    pub(crate) async fn fetch_all<T: Record>(
        &self,
        sql: impl Statement,
        args: &[Arg<'_>],
    ) -> Result<Vec<T>> {
        self.fetch(sql, args, Rows::All).await
    }

    pub(crate) async fn fetch_optional<T: Record>(
        &self,
        sql: impl Statement,
        args: &[Arg<'_>],
    ) -> Result<Option<T>> {
        Ok(self.fetch(sql, args, Rows::First).await?.pop())
    }

    async fn fetch<T: Record>(
        &self,
        sql: impl Statement,
        args: &[Arg<'_>],
        wanted: Rows,
    ) -> Result<Vec<T>> {
        match self {
            Self::Postgres { pool, .. } => {
                postgres_fetch(&mut *pool.acquire().await?, sql, args, wanted).await
            }
            Self::Sqlite { file, read_only } => {
                let sql = sql.text(Dialect::Sqlite);
                file.run(*read_only, |connection| {
                    sqlite::fetch(connection, sql, args, wanted)
                })
                .await
            }
        }
    }

    /// The one row a query returns; [`StoreError::NotFound`] without.
    pub(crate) async fn fetch_one<T: Record>(
        &self,
        sql: impl Statement,
        args: &[Arg<'_>],
    ) -> Result<T> {
        self.fetch_optional(sql, args)
            .await?
            .ok_or(StoreError::NotFound)
    }
}

/// A transaction on either database; rolled back when dropped uncommitted.
pub(crate) enum Tx {
    Postgres {
        tx: Transaction<'static, Postgres>,
        announcer: Arc<Announcer>,
        /// Whether this transaction added outbox rows.
        announced: bool,
    },
    Sqlite {
        tx: sqlite::Tx,
        /// Whether this transaction added outbox rows.
        announced: bool,
    },
}

impl Tx {
    pub(crate) fn dialect(&self) -> Dialect {
        match self {
            Self::Postgres { .. } => Dialect::Postgres,
            Self::Sqlite { .. } => Dialect::Sqlite,
        }
    }

    /// Notes that this transaction added outbox rows: committing it wakes
    /// whoever waits for them.
    pub(crate) fn announce(&mut self) {
        match self {
            Self::Postgres { announced, .. } | Self::Sqlite { announced, .. } => *announced = true,
        }
    }

    pub(crate) async fn commit(self) -> Result<()> {
        match self {
            Self::Postgres {
                tx,
                announcer,
                announced,
            } => {
                tx.commit().await?;
                if announced {
                    announcer.announce();
                }
            }
            Self::Sqlite { tx, announced } => tx.commit(announced).await?,
        }
        Ok(())
    }

    /// [`commit`](Self::commit) for a write whose caller can wait: in
    /// the embedded database, unless it added outbox rows, it lingers a
    /// moment for another write to share its commit and sync.
    pub(crate) async fn commit_lingering(self) -> Result<()> {
        match self {
            Self::Postgres { .. } => self.commit().await?,
            Self::Sqlite { tx, announced } => tx.commit_lingering(announced).await?,
        }
        Ok(())
    }

    pub(crate) async fn rollback(self) -> Result<()> {
        match self {
            Self::Postgres { tx, .. } => tx.rollback().await?,
            Self::Sqlite { tx, .. } => tx.rollback()?,
        }
        Ok(())
    }

    pub(crate) async fn execute(&mut self, sql: impl Statement, args: &[Arg<'_>]) -> Result<u64> {
        match self {
            Self::Postgres { tx, .. } => postgres_execute(tx, sql, args).await,
            Self::Sqlite { tx, .. } => {
                sqlite::execute(tx.connection(), sql.text(Dialect::Sqlite), args)
                    .map_err(sqlite::store_error)
            }
        }
    }

    pub(crate) async fn fetch_all<T: Record>(
        &mut self,
        sql: impl Statement,
        args: &[Arg<'_>],
    ) -> Result<Vec<T>> {
        self.fetch(sql, args, Rows::All).await
    }

    pub(crate) async fn fetch_optional<T: Record>(
        &mut self,
        sql: impl Statement,
        args: &[Arg<'_>],
    ) -> Result<Option<T>> {
        Ok(self.fetch(sql, args, Rows::First).await?.pop())
    }

    async fn fetch<T: Record>(
        &mut self,
        sql: impl Statement,
        args: &[Arg<'_>],
        wanted: Rows,
    ) -> Result<Vec<T>> {
        match self {
            Self::Postgres { tx, .. } => postgres_fetch(tx, sql, args, wanted).await,
            Self::Sqlite { tx, .. } => {
                sqlite::fetch(tx.connection(), sql.text(Dialect::Sqlite), args, wanted)
                    .map_err(sqlite::store_error)
            }
        }
    }

    /// The one row a query returns; [`StoreError::NotFound`] without.
    pub(crate) async fn fetch_one<T: Record>(
        &mut self,
        sql: impl Statement,
        args: &[Arg<'_>],
    ) -> Result<T> {
        self.fetch_optional(sql, args)
            .await?
            .ok_or(StoreError::NotFound)
    }
}

async fn postgres_execute(
    connection: &mut PgConnection,
    sql: impl Statement,
    args: &[Arg<'_>],
) -> Result<u64> {
    let arguments = encoded(postgres_arguments(args))?;
    let done = sqlx::query_with(sql.text(Dialect::Postgres), arguments)
        .persistent(sql.prepared())
        .execute(connection)
        .await?;
    Ok(done.rows_affected())
}

async fn postgres_fetch<T: Record>(
    connection: &mut PgConnection,
    sql: impl Statement,
    args: &[Arg<'_>],
    wanted: Rows,
) -> Result<Vec<T>> {
    let arguments = encoded(postgres_arguments(args))?;
    let query =
        sqlx::query_as_with(sql.text(Dialect::Postgres), arguments).persistent(sql.prepared());
    Ok(match wanted {
        Rows::First => query
            .fetch_optional(connection)
            .await?
            .into_iter()
            .collect(),
        Rows::All => query.fetch_all(connection).await?,
    })
}
