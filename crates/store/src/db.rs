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
//! - wake-ups: on PostgreSQL a trigger NOTIFYs every outbox insert; on SQLite
//!   a committed transaction that added outbox rows marks a watch channel
//!   ([`Tx::announce`]), since only this process writes the file.
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
use sqlx::pool::PoolConnection;
use sqlx::postgres::{
    PgArguments, PgConnection, PgPool, PgPoolOptions, PgRow, PgTypeInfo, PgValueRef,
};
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteRow, SqliteSynchronous, SqliteTypeInfo, SqliteValueRef,
};
use sqlx::types::Json;
use sqlx::{Arguments, Decode, FromRow, Postgres, Sqlite, Transaction, Type};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{Result, StoreError};

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

/// A statement the same in both dialects but for one fragment:
/// `sql!("SELECT ... FROM t" ; postgres: " FOR UPDATE", sqlite: "" ; " LIMIT 1")`.
macro_rules! sql {
    ($($before:expr),* ; postgres: $postgres:expr, sqlite: $sqlite:expr ; $($after:expr),*) => {
        $crate::db::Sql {
            postgres: concat!($($before,)* $postgres $(, $after)*),
            sqlite: concat!($($before,)* $sqlite $(, $after)*),
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

fn sqlite_arguments(args: &[Arg<'_>]) -> Result<SqliteArguments, BoxDynError> {
    let mut bound = SqliteArguments::default();
    for arg in args {
        match arg {
            Arg::Uuid(id) => bound.add(*id)?,
            Arg::Text(text) => bound.add(*text)?,
            Arg::Int(number) => bound.add(*number)?,
            Arg::Bytes(bytes) => bound.add(*bytes)?,
            Arg::Json(json) => bound.add(json.as_deref().map(RawValue::get))?,
            Arg::Time(time) => bound.add(*time)?,
            Arg::Instant(time) => bound.add(time.map(|time| time.timestamp_micros()))?,
            Arg::Ids(ids) => bound.add(serde_json::to_string(ids)?)?,
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

impl Type<Sqlite> for Stamp {
    fn type_info() -> SqliteTypeInfo {
        <i64 as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <i64 as Type<Sqlite>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Sqlite> for Stamp {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let micros = <i64 as Decode<Sqlite>>::decode(value)?;
        DateTime::from_timestamp_micros(micros)
            .map(Self)
            .ok_or_else(|| format!("instant out of range: {micros} µs").into())
    }
}

/// A row type both dialects can read (a `#[derive(sqlx::FromRow)]` struct
/// or a tuple).
pub(crate) trait Record:
    for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}

impl<T> Record for T where
    T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}

/// What a committed write on the SQLite file survives. In WAL mode,
/// `synchronous=NORMAL` loses nothing when the process dies but may lose the
/// last commits when the machine loses power or the OS crashes; `FULL`
/// syncs the WAL on every commit (group commit shares the cost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every commit is on disk before it is acknowledged (`FULL`).
    #[default]
    PowerLoss,
    /// Commits survive a killed process, not a power loss (`NORMAL`).
    ProcessCrash,
}

/// Read-only connections beside an SQLite file's writer.
const READERS: u32 = 2;

/// A connection pool to either database.
#[derive(Debug, Clone)]
pub(crate) enum Db {
    Postgres(PgPool),
    Sqlite {
        /// The one connection that writes.
        pool: SqlitePool,
        /// Read-only connections: in WAL mode reads run beside the writer
        /// instead of queueing behind its transactions.
        reader: SqlitePool,
        /// Marked changed whenever outbox rows were committed. Unlike a bare
        /// notification, a change is kept for each subscriber until it
        /// looks, so a loop that was busy when rows arrived still sees it.
        outbox_written: Arc<watch::Sender<()>>,
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
        Ok(Self::Postgres(pool))
    }

    /// Opens (creating if missing) the SQLite file at `path`, in WAL mode.
    pub(crate) async fn sqlite_file(path: &Path, durability: Durability) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::PowerLoss => SqliteSynchronous::Full,
                Durability::ProcessCrash => SqliteSynchronous::Normal,
            });
        Self::sqlite(options, READERS).await
    }

    /// Opens a `sqlite:` URL (`sqlite::memory:` included: a database in
    /// memory is one connection's own, so that one also reads).
    pub(crate) async fn sqlite_url(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?.create_if_missing(true);
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        Self::sqlite(options, if in_memory { 0 } else { READERS }).await
    }

    async fn sqlite(options: SqliteConnectOptions, readers: u32) -> Result<Self> {
        let options = options
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        // One writing connection: SQLite has one writer anyway, and a single
        // connection never meets SQLITE_BUSY between its own transactions.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await?;
        let reader = match readers {
            0 => pool.clone(),
            readers => SqlitePoolOptions::new()
                .max_connections(readers)
                .acquire_timeout(Duration::from_secs(30))
                .connect_lazy_with(options.read_only(true)),
        };
        Ok(Self::Sqlite {
            pool,
            reader,
            outbox_written: Arc::new(watch::Sender::new(())),
        })
    }

    /// The same database for statements that only read: on SQLite, its
    /// read-only connections (a write there fails).
    pub(crate) fn reader(&self) -> Self {
        match self {
            Self::Postgres(_) => self.clone(),
            Self::Sqlite {
                reader,
                outbox_written,
                ..
            } => Self::Sqlite {
                pool: reader.clone(),
                reader: reader.clone(),
                outbox_written: outbox_written.clone(),
            },
        }
    }

    pub(crate) async fn begin(&self) -> Result<Tx> {
        Ok(match self {
            Self::Postgres(pool) => Tx::Postgres(pool.begin().await?),
            Self::Sqlite {
                pool,
                outbox_written,
                ..
            } => Tx::Sqlite {
                tx: pool.begin().await?,
                outbox_written: outbox_written.clone(),
                announced: false,
            },
        })
    }

    async fn acquire(&self) -> Result<Pooled> {
        Ok(match self {
            Self::Postgres(pool) => Pooled::Postgres(pool.acquire().await?),
            Self::Sqlite { pool, .. } => Pooled::Sqlite(pool.acquire().await?),
        })
    }

    /// Runs a statement; returns how many rows it changed.
    pub(crate) async fn execute(&self, sql: impl Statement, args: &[Arg<'_>]) -> Result<u64> {
        self.acquire().await?.link().execute(sql, args).await
    }

    pub(crate) async fn fetch_all<T: Record>(
        &self,
        sql: impl Statement,
        args: &[Arg<'_>],
    ) -> Result<Vec<T>> {
        self.acquire().await?.link().fetch_all(sql, args).await
    }

    pub(crate) async fn fetch_optional<T: Record>(
        &self,
        sql: impl Statement,
        args: &[Arg<'_>],
    ) -> Result<Option<T>> {
        self.acquire().await?.link().fetch_optional(sql, args).await
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

enum Pooled {
    Postgres(PoolConnection<Postgres>),
    Sqlite(PoolConnection<Sqlite>),
}

impl Pooled {
    fn link(&mut self) -> Link<'_> {
        match self {
            Self::Postgres(connection) => Link::Postgres(connection),
            Self::Sqlite(connection) => Link::Sqlite(connection),
        }
    }
}

/// A transaction on either database; rolled back when dropped uncommitted.
pub(crate) enum Tx {
    Postgres(Transaction<'static, Postgres>),
    Sqlite {
        tx: Transaction<'static, Sqlite>,
        outbox_written: Arc<watch::Sender<()>>,
        /// Whether this transaction added outbox rows.
        announced: bool,
    },
}

impl Tx {
    pub(crate) fn dialect(&self) -> Dialect {
        match self {
            Self::Postgres(_) => Dialect::Postgres,
            Self::Sqlite { .. } => Dialect::Sqlite,
        }
    }

    /// Notes that this transaction added outbox rows: committing it wakes
    /// whoever waits for them.
    pub(crate) fn announce(&mut self) {
        if let Self::Sqlite { announced, .. } = self {
            *announced = true;
        }
    }

    pub(crate) async fn commit(self) -> Result<()> {
        match self {
            Self::Postgres(tx) => tx.commit().await?,
            Self::Sqlite {
                tx,
                outbox_written,
                announced,
            } => {
                tx.commit().await?;
                if announced {
                    outbox_written.send_replace(());
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn rollback(self) -> Result<()> {
        match self {
            Self::Postgres(tx) => tx.rollback().await?,
            Self::Sqlite { tx, .. } => tx.rollback().await?,
        }
        Ok(())
    }

    fn link(&mut self) -> Link<'_> {
        match self {
            Self::Postgres(tx) => Link::Postgres(tx),
            Self::Sqlite { tx, .. } => Link::Sqlite(tx),
        }
    }

    pub(crate) async fn execute(&mut self, sql: impl Statement, args: &[Arg<'_>]) -> Result<u64> {
        self.link().execute(sql, args).await
    }

    pub(crate) async fn fetch_all<T: Record>(
        &mut self,
        sql: impl Statement,
        args: &[Arg<'_>],
    ) -> Result<Vec<T>> {
        self.link().fetch_all(sql, args).await
    }

    pub(crate) async fn fetch_optional<T: Record>(
        &mut self,
        sql: impl Statement,
        args: &[Arg<'_>],
    ) -> Result<Option<T>> {
        self.link().fetch_optional(sql, args).await
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

/// One connection, of a pool or inside a transaction: where statements run.
enum Link<'c> {
    Postgres(&'c mut PgConnection),
    Sqlite(&'c mut SqliteConnection),
}

/// Builds a query with `$build` for the link's dialect and runs it with
/// `$method`, then `$then` on what it returned.
macro_rules! on_link {
    ($link:expr, $sql:expr, $args:expr, $build:path, $method:ident $(, $then:ident)?) => {
        match $link {
            Link::Postgres(connection) => {
                let arguments = encoded(postgres_arguments($args))?;
                $build($sql.text(Dialect::Postgres), arguments)
                    .$method(connection)
                    .await?
                    $(.$then())?
            }
            Link::Sqlite(connection) => {
                let arguments = encoded(sqlite_arguments($args))?;
                $build($sql.text(Dialect::Sqlite), arguments)
                    .$method(connection)
                    .await?
                    $(.$then())?
            }
        }
    };
}

impl Link<'_> {
    async fn execute(self, sql: impl Statement, args: &[Arg<'_>]) -> Result<u64> {
        Ok(on_link!(
            self,
            sql,
            args,
            sqlx::query_with,
            execute,
            rows_affected
        ))
    }

    async fn fetch_all<T: Record>(self, sql: impl Statement, args: &[Arg<'_>]) -> Result<Vec<T>> {
        Ok(on_link!(self, sql, args, sqlx::query_as_with, fetch_all))
    }

    async fn fetch_optional<T: Record>(
        self,
        sql: impl Statement,
        args: &[Arg<'_>],
    ) -> Result<Option<T>> {
        Ok(on_link!(
            self,
            sql,
            args,
            sqlx::query_as_with,
            fetch_optional
        ))
    }
}
