//! The embedded database: an SQLite file used through `rusqlite`, with
//! every statement run on the task that asks for it.
//!
//! A statement on SQLite takes microseconds; handing each one to a
//! connection's own thread and back (as an asynchronous driver must) costs
//! two cross-thread wake-ups, which on a small machine weigh more than the
//! statement. So the file has one writing connection and a few read-only
//! ones, each behind an asynchronous lock: a task takes a connection (a
//! transaction keeps it until it ends) and runs its statements inline.
//!
//! Writes that arrive together share a commit, and so its sync to disk:
//! each caller's transaction is a savepoint in a transaction left open
//! while other callers queue for the writer, and every caller waits for
//! that transaction's commit before it is answered. Readers see a write
//! only once it is committed, so nothing is read before it is durable.
//!
//! Nothing blocks the runtime waiting for another process: connections
//! never wait inside SQLite (no busy handler); a statement that finds the
//! file locked is tried again after an asynchronous pause, until
//! [`BUSY_TIMEOUT`]. Write transactions begin `IMMEDIATE`, so the lock is
//! only ever waited for before a transaction's first statement. A commit
//! that syncs to disk (a fraction of a millisecond) runs inline too:
//! handing it to a blocking thread measured no faster and cost 10 MB.
//!
//! Values are stored as sqlx stored them, so files written by earlier
//! versions read the same: UUIDs as 16-byte blobs, record times as
//! RFC 3339 text, JSON as text, compared instants as integer microseconds.
//! sqlx still runs the migrations (keeping its migration table).

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, OpenFlags, ffi};
use serde::de::DeserializeOwned;
use sqlx::error::{DatabaseError, ErrorKind};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::types::Json;
use tokio::sync::{Mutex, OwnedMutexGuard, watch};
use uuid::Uuid;
use zapflow_telemetry::metrics::GROUP_COMMIT_BATCH_SIZE;

use super::{Arg, Durability, Rows, Stamp};
use crate::{Result, StoreError};

/// How long a statement waits for another process's lock on the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Read-only connections beside the writer.
const READERS: usize = 2;
/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 256;
/// How long a write that starts no work waits for another to share its
/// commit (see [`Tx::commit_lingering`]): about the time between two
/// webhooks sent one at a time, so that a step's outcome recorded between
/// them shares the next one's sync instead of delaying it with its own.
const LINGER: Duration = Duration::from_millis(2);

type Shared = Arc<Mutex<Connection>>;
type SharedWriter = Arc<Mutex<Writer>>;
type Outcome = watch::Sender<Option<Result<()>>>;

/// The connection that writes, with the transaction its callers share.
#[derive(Debug)]
pub(crate) struct Writer {
    connection: Connection,
    open: Option<Open>,
    /// Transactions committed, for tests to count.
    commits: u64,
    /// Marked changed whenever outbox rows were committed.
    outbox_written: Arc<watch::Sender<()>>,
}

/// The transaction left open for the callers queued for the writer.
#[derive(Debug)]
struct Open {
    /// Callers whose writes it holds, each waiting for its commit.
    parts: usize,
    /// Whether one of them added outbox rows.
    announce: bool,
    committed: Arc<Outcome>,
}

/// An SQLite file's connections.
#[derive(Debug)]
pub(crate) struct SqliteFile {
    /// The one connection that writes: SQLite has one writer anyway.
    writer: SharedWriter,
    /// Read-only connections: in WAL mode reads run beside the writer
    /// instead of queueing behind its transactions.
    readers: Vec<Shared>,
    next_reader: AtomicUsize,
    /// Marked changed whenever outbox rows were committed. Unlike a bare
    /// notification, a change is kept for each subscriber until it looks,
    /// so a loop that was busy when rows arrived still sees it.
    pub(crate) outbox_written: Arc<watch::Sender<()>>,
    /// An sqlx pool on the same file, for migrations and inspection.
    pub(crate) pool: SqlitePool,
}

impl SqliteFile {
    /// Opens (creating if missing) the SQLite file at `path`, in WAL mode.
    pub(crate) async fn open(path: &Path, durability: Durability) -> Result<Self> {
        let synchronous = durability.synchronous();
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .pragma("synchronous", synchronous)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        // Creates the file and switches it to WAL before anyone reads it.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .idle_timeout(Duration::from_secs(30))
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        let outbox_written = Arc::new(watch::Sender::new(()));
        let writer = Writer {
            connection: connect(path, OpenFlags::SQLITE_OPEN_READ_WRITE, synchronous)?,
            open: None,
            commits: 0,
            outbox_written: outbox_written.clone(),
        };
        let readers = (0..READERS)
            .map(|_| connect(path, OpenFlags::SQLITE_OPEN_READ_ONLY, synchronous))
            .map(|connection| connection.map(|connection| Arc::new(Mutex::new(connection))))
            .collect::<Result<_>>()?;
        Ok(Self {
            writer: Arc::new(Mutex::new(writer)),
            readers,
            next_reader: AtomicUsize::new(0),
            outbox_written,
            pool,
        })
    }

    /// A reader, taking turns.
    async fn reader(&self) -> OwnedMutexGuard<Connection> {
        let first = self.next_reader.fetch_add(1, Ordering::Relaxed);
        let count = self.readers.len();
        for offset in 0..count {
            if let Ok(free) = self.readers[(first + offset) % count]
                .clone()
                .try_lock_owned()
            {
                return free;
            }
        }
        self.readers[first % count].clone().lock_owned().await
    }

    /// Runs `statement`: on a reader, trying again while the file is
    /// locked by another process; on the writer, as a transaction.
    pub(crate) async fn run<T>(
        &self,
        read_only: bool,
        mut statement: impl FnMut(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        if !read_only {
            let tx = self.begin(false).await?;
            let answer = statement(tx.connection()).map_err(store_error)?;
            tx.commit(false).await?;
            return Ok(answer);
        }
        let mut connection = self.reader().await;
        // The closure holds `&mut Connection`, which may cross threads
        // (a shared `&Connection` may not).
        let connection: &mut Connection = &mut connection;
        patiently(move || statement(connection)).await
    }

    /// Begins a transaction: on a reader, of its own; on the writer, a
    /// part of the shared one, beginning it `IMMEDIATE` (taking the file's
    /// write lock at once) when none is open.
    pub(crate) async fn begin(&self, read_only: bool) -> Result<Tx> {
        if read_only {
            let mut connection = self.reader().await;
            let held: &mut Connection = &mut connection;
            patiently(move || execute(held, "BEGIN", &[])).await?;
            return Ok(Tx {
                held: Held::Reader(connection),
            });
        }
        let mut writer = self.writer.clone().lock_owned().await;
        if writer.open.is_none() {
            let held = &mut writer.connection;
            patiently(move || execute(held, "BEGIN IMMEDIATE", &[])).await?;
            writer.open = Some(Open {
                parts: 0,
                announce: false,
                committed: Arc::new(watch::Sender::new(None)),
            });
        }
        if let Err(error) = execute(&writer.connection, "SAVEPOINT part", &[]) {
            writer.settle();
            return Err(store_error(error));
        }
        Ok(Tx {
            held: Held::Writer(writer),
        })
    }
}

impl Writer {
    /// Undoes the writes of the part being written.
    fn abandon_part(&mut self) {
        if !self.connection.is_autocommit() {
            let _ = self
                .connection
                .execute_batch("ROLLBACK TO part; RELEASE part");
        }
        self.settle();
    }

    /// After a part failed or was abandoned: a shared transaction that
    /// SQLite rolled back (as it may on a full disk or an I/O error) is
    /// reported to the callers whose parts it held, and one holding no
    /// part is ended.
    fn settle(&mut self) {
        let Some(open) = &self.open else { return };
        if self.connection.is_autocommit() {
            let lost =
                StoreError::Unavailable(Arc::new(sqlx::Error::Database(Box::new(SqliteFailure {
                    code: ffi::SQLITE_ABORT_ROLLBACK,
                    message: "rolled back with the transaction it shared".to_owned(),
                }))));
            open.committed.send_replace(Some(Err(lost)));
            self.open = None;
        } else if open.parts == 0 {
            let _ = self.connection.execute_batch("ROLLBACK");
            self.open = None;
        }
    }

    /// Commits the shared transaction and answers every part it holds.
    fn commit_open(&mut self) {
        let Some(open) = self.open.take() else { return };
        let committed = execute(&self.connection, "COMMIT", &[]).map_err(store_error);
        self.commits += 1;
        metrics::histogram!(GROUP_COMMIT_BATCH_SIZE, "queue" => "sqlite_writer")
            .record(open.parts as f64);
        if committed.is_err() && !self.connection.is_autocommit() {
            let _ = self.connection.execute_batch("ROLLBACK");
        }
        if committed.is_ok() && open.announce {
            self.outbox_written.send_replace(());
        }
        open.committed.send_replace(Some(committed.map(drop)));
    }
}

/// Waits until the shared transaction `committed` answers, committing it
/// when this caller reaches the writer first: callers queue for the writer
/// in turn, so the ones already queued add their parts before it commits.
/// A caller that `linger`s queues only after that long, unless a write
/// that came meanwhile committed the transaction.
async fn shared_commit(
    writer: SharedWriter,
    committed: Arc<Outcome>,
    linger: Duration,
) -> Result<()> {
    let waiting = Waiting { writer, committed };
    let mut outcome = waiting.committed.subscribe();
    if !linger.is_zero()
        && let Ok(answer) = tokio::time::timeout(linger, outcome.wait_for(Option::is_some)).await
    {
        let answer = answer.expect("the sender is held here").clone();
        return answer.expect("waited for an answer");
    }
    loop {
        tokio::select! {
            biased;
            answer = outcome.wait_for(Option::is_some) => {
                let answer = answer.expect("the sender is held here").clone();
                return answer.expect("waited for an answer");
            }
            mut writer = waiting.writer.clone().lock_owned() => {
                if writer.open.as_ref().is_some_and(|open| Arc::ptr_eq(&open.committed, &waiting.committed)) {
                    writer.commit_open();
                }
            }
        }
    }
}

/// A caller waiting for a shared commit; if it stops waiting (its task
/// was cancelled), a task of its own commits in its place, so that no part
/// is left waiting for a later writer.
struct Waiting {
    writer: SharedWriter,
    committed: Arc<Outcome>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.committed.borrow().is_some() {
            return;
        }
        let (writer, committed) = (self.writer.clone(), self.committed.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = shared_commit(writer, committed, Duration::ZERO).await;
            });
        }
    }
}

fn connect(path: &Path, access: OpenFlags, synchronous: &str) -> Result<Connection> {
    let flags = access | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let connection = Connection::open_with_flags(path, flags).map_err(store_error)?;
    connection
        // Temporary storage in memory: each caller sharing a commit is a
        // savepoint, and a savepoint's journal past 64 KiB would otherwise
        // become a temporary file, created and deleted inside the commit.
        .execute_batch(&format!(
            "PRAGMA synchronous = {synchronous}; PRAGMA foreign_keys = ON; \
             PRAGMA temp_store = MEMORY;"
        ))
        .map_err(store_error)?;
    connection
        .busy_timeout(Duration::ZERO)
        .map_err(store_error)?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(connection)
}

/// Tries `attempt` again, after short pauses, while the file is busy.
async fn patiently<T>(mut attempt: impl FnMut() -> rusqlite::Result<T>) -> Result<T> {
    let deadline = tokio::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        match attempt() {
            Err(error) if is_busy(&error) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            answer => return answer.map_err(store_error),
        }
    }
}

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// A transaction: on a reader, holding its connection; on the writer, a
/// part of the shared transaction. Rolled back when dropped open (a failed
/// `COMMIT` included).
pub(crate) struct Tx {
    held: Held,
}

enum Held {
    Reader(OwnedMutexGuard<Connection>),
    Writer(OwnedMutexGuard<Writer>),
    Ended,
}

impl Tx {
    pub(crate) fn connection(&self) -> &Connection {
        match &self.held {
            Held::Reader(connection) => connection,
            Held::Writer(writer) => &writer.connection,
            Held::Ended => unreachable!("a transaction is used only until it ends"),
        }
    }

    /// Commits; on the writer, waits until the shared transaction is
    /// committed. `announce`: this part added outbox rows, whose waiters
    /// are woken once they are committed.
    pub(crate) async fn commit(self, announce: bool) -> Result<()> {
        self.commit_after(announce, Duration::ZERO).await
    }

    /// [`commit`](Self::commit) for a write that starts no work (it adds
    /// no outbox rows) and whose caller can wait: on the writer, its part
    /// lingers for [`LINGER`] so that a write arriving meanwhile commits it
    /// with its own, one sync for both, and only then commits alone.
    pub(crate) async fn commit_lingering(self, announce: bool) -> Result<()> {
        let linger = if announce { Duration::ZERO } else { LINGER };
        self.commit_after(announce, linger).await
    }

    async fn commit_after(mut self, announce: bool, linger: Duration) -> Result<()> {
        match std::mem::replace(&mut self.held, Held::Ended) {
            Held::Reader(connection) => execute(&connection, "COMMIT", &[])
                .map(drop)
                .map_err(store_error),
            Held::Writer(mut writer) => {
                if let Err(error) = execute(&writer.connection, "RELEASE part", &[]) {
                    writer.abandon_part();
                    return Err(store_error(error));
                }
                let open = writer
                    .open
                    .as_mut()
                    .expect("a part is written in a transaction");
                open.parts += 1;
                open.announce |= announce;
                let committed = open.committed.clone();
                let shared = OwnedMutexGuard::mutex(&writer).clone();
                drop(writer);
                shared_commit(shared, committed, linger).await
            }
            Held::Ended => Ok(()),
        }
    }

    pub(crate) fn rollback(mut self) -> Result<()> {
        self.end();
        Ok(())
    }

    fn end(&mut self) {
        match std::mem::replace(&mut self.held, Held::Ended) {
            Held::Reader(connection) => {
                if !connection.is_autocommit() {
                    let _ = connection.execute_batch("ROLLBACK");
                }
            }
            Held::Writer(mut writer) => writer.abandon_part(),
            Held::Ended => {}
        }
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        self.end();
    }
}

/// Runs a statement to its end; returns how many rows it changed.
pub(crate) fn execute(
    connection: &Connection,
    sql: &str,
    args: &[Arg<'_>],
) -> rusqlite::Result<u64> {
    let mut statement = prepare(connection, sql, args)?;
    let mut rows = statement.raw_query();
    while rows.next()?.is_some() {}
    Ok(connection.changes())
}

/// Runs a query, reading each row as a `T`.
pub(crate) fn fetch<T: FromSqlite>(
    connection: &Connection,
    sql: &str,
    args: &[Arg<'_>],
    wanted: Rows,
) -> rusqlite::Result<Vec<T>> {
    let mut statement = prepare(connection, sql, args)?;
    let mut rows = statement.raw_query();
    let mut records = Vec::new();
    while records.is_empty() || wanted == Rows::All {
        match rows.next()? {
            Some(row) => records.push(T::from_sqlite(row)?),
            None => break,
        }
    }
    Ok(records)
}

/// The statement for `sql` with `args` bound: `$n` (and `?n`) name the
/// n-th argument, a bare `?` the next one.
fn prepare<'c>(
    connection: &'c Connection,
    sql: &str,
    args: &[Arg<'_>],
) -> rusqlite::Result<rusqlite::CachedStatement<'c>> {
    let mut statement = connection.prepare_cached(sql)?;
    for index in 1..=statement.parameter_count() {
        let position = match statement.parameter_name(index) {
            Some(name) => name[1..]
                .parse::<usize>()
                .map_err(|_| rusqlite::Error::InvalidParameterName(name.to_owned()))?,
            None => index,
        };
        let arg = args
            .get(position - 1)
            .ok_or(rusqlite::Error::InvalidParameterCount(position, args.len()))?;
        statement.raw_bind_parameter(index, bound(arg)?)?;
    }
    Ok(statement)
}

/// An argument as SQLite keeps it (see the module doc).
fn bound<'a>(arg: &'a Arg<'_>) -> rusqlite::Result<ToSqlOutput<'a>> {
    let null = ToSqlOutput::Owned(Value::Null);
    Ok(match arg {
        Arg::Uuid(id) => id.map_or(null, |id| {
            ToSqlOutput::Owned(Value::Blob(id.as_bytes().to_vec()))
        }),
        Arg::Text(text) => text.map_or(null, |text| {
            ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes()))
        }),
        Arg::Int(number) => ToSqlOutput::Owned(Value::Integer(*number)),
        Arg::Bytes(bytes) => ToSqlOutput::Borrowed(ValueRef::Blob(bytes)),
        Arg::Json(json) => json.as_ref().map_or(null, |json| {
            ToSqlOutput::Borrowed(ValueRef::Text(json.get().as_bytes()))
        }),
        Arg::Time(time) => time.map_or(null, |time| {
            ToSqlOutput::Owned(Value::Text(
                time.to_rfc3339_opts(SecondsFormat::AutoSi, false),
            ))
        }),
        Arg::Instant(time) => time.map_or(null, |time| {
            ToSqlOutput::Owned(Value::Integer(time.timestamp_micros()))
        }),
        Arg::Ids(ids) => ToSqlOutput::Owned(Value::Text(
            serde_json::to_string(ids)
                .map_err(|error| rusqlite::Error::ToSqlConversionFailure(Box::new(error)))?,
        )),
    })
}

/// A row read from SQLite.
pub(crate) trait FromSqlite: Sized {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self>;
}

/// A value read from one column.
pub(crate) trait Column: Sized {
    fn column(value: ValueRef<'_>) -> Result<Self, String>;

    fn read<I: rusqlite::RowIndex + Copy>(
        row: &rusqlite::Row<'_>,
        index: I,
    ) -> rusqlite::Result<Self> {
        let value = row.get_ref(index)?;
        Self::column(value).map_err(|error| {
            rusqlite::Error::FromSqlConversionFailure(0, value.data_type(), error.into())
        })
    }
}

fn mismatch(wanted: &str, value: ValueRef<'_>) -> String {
    format!("expected {wanted}, found {:?}", value.data_type())
}

impl Column for i64 {
    fn column(value: ValueRef<'_>) -> Result<Self, String> {
        value.as_i64().map_err(|_| mismatch("an integer", value))
    }
}

impl Column for i32 {
    fn column(value: ValueRef<'_>) -> Result<Self, String> {
        let number = i64::column(value)?;
        i32::try_from(number).map_err(|_| format!("{number} is out of range"))
    }
}

impl Column for bool {
    fn column(value: ValueRef<'_>) -> Result<Self, String> {
        Ok(i64::column(value)? != 0)
    }
}

impl Column for String {
    fn column(value: ValueRef<'_>) -> Result<Self, String> {
        value
            .as_str()
            .map(str::to_owned)
            .map_err(|_| mismatch("text", value))
    }
}

impl Column for Vec<u8> {
    fn column(value: ValueRef<'_>) -> Result<Self, String> {
        match value {
            ValueRef::Blob(bytes) | ValueRef::Text(bytes) => Ok(bytes.to_vec()),
            _ => Err(mismatch("a blob", value)),
        }
    }
}

impl Column for Uuid {
    fn column(value: ValueRef<'_>) -> Result<Self, String> {
        match value {
            ValueRef::Blob(bytes) => Uuid::from_slice(bytes).map_err(|error| error.to_string()),
            ValueRef::Text(text) => Uuid::try_parse_ascii(text).map_err(|error| error.to_string()),
            _ => Err(mismatch("a UUID", value)),
        }
    }
}

impl Column for DateTime<Utc> {
    fn column(value: ValueRef<'_>) -> Result<Self, String> {
        let text = value.as_str().map_err(|_| mismatch("a time", value))?;
        DateTime::parse_from_rfc3339(text)
            .map(|time| time.with_timezone(&Utc))
            .or_else(|_| NaiveDateTime::parse_from_str(text, "%F %T%.f").map(|time| time.and_utc()))
            .map_err(|_| format!("invalid time: {text}"))
    }
}

impl Column for Stamp {
    fn column(value: ValueRef<'_>) -> Result<Self, String> {
        let micros = i64::column(value)?;
        DateTime::from_timestamp_micros(micros)
            .map(Self)
            .ok_or_else(|| format!("instant out of range: {micros} µs"))
    }
}

impl<T: DeserializeOwned> Column for Json<T> {
    fn column(value: ValueRef<'_>) -> Result<Self, String> {
        match value {
            ValueRef::Text(text) | ValueRef::Blob(text) => serde_json::from_slice(text)
                .map(Json)
                .map_err(|error| error.to_string()),
            _ => Err(mismatch("JSON text", value)),
        }
    }
}

impl<T: Column> Column for Option<T> {
    fn column(value: ValueRef<'_>) -> Result<Self, String> {
        match value {
            ValueRef::Null => Ok(None),
            value => T::column(value).map(Some),
        }
    }
}

macro_rules! tuple_from_sqlite {
    ($($name:ident $index:tt),+) => {
        impl<$($name: Column),+> FromSqlite for ($($name,)+) {
            fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
                Ok(($($name::read(row, $index)?,)+))
            }
        }
    };
}

tuple_from_sqlite!(A 0);
tuple_from_sqlite!(A 0, B 1);
tuple_from_sqlite!(A 0, B 1, C 2);
tuple_from_sqlite!(A 0, B 1, C 2, D 3);
tuple_from_sqlite!(A 0, B 1, C 2, D 3, E 4);
tuple_from_sqlite!(A 0, B 1, C 2, D 3, E 4, F 5);
tuple_from_sqlite!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
tuple_from_sqlite!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);

/// Reads a struct's fields from the columns of the same names:
/// `from_sqlite!(RunRow { id, zap_id, ... })`.
macro_rules! from_sqlite {
    ($record:ident { $($field:ident),+ $(,)? }) => {
        impl $crate::db::FromSqlite for $record {
            fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
                Ok(Self {
                    $($field: $crate::db::Column::read(row, stringify!($field))?,)+
                })
            }
        }
    };
}
pub(crate) use from_sqlite;

/// An error SQLite reported, as sqlx's errors carry database errors.
#[derive(Debug)]
pub(crate) struct SqliteFailure {
    /// The extended result code.
    pub(crate) code: i32,
    message: String,
}

impl std::fmt::Display for SqliteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLite code {})", self.message, self.code)
    }
}

impl std::error::Error for SqliteFailure {}

impl DatabaseError for SqliteFailure {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Owned(self.code.to_string()))
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> ErrorKind {
        match self.code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

/// The one place where `rusqlite`'s errors become the store's.
pub(crate) fn store_error(error: rusqlite::Error) -> StoreError {
    let error = match error {
        rusqlite::Error::QueryReturnedNoRows => return StoreError::NotFound,
        rusqlite::Error::SqliteFailure(failure, message) => {
            sqlx::Error::Database(Box::new(SqliteFailure {
                code: failure.extended_code,
                message: message.unwrap_or_else(|| failure.to_string()),
            }))
        }
        error @ (rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::InvalidColumnName(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)) => sqlx::Error::Decode(Box::new(error)),
        error => sqlx::Error::Protocol(error.to_string()),
    };
    StoreError::from(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temporary_file() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("zapflow-sqlite-{}.db", Uuid::new_v4()))
    }

    #[tokio::test]
    async fn the_writer_syncs_as_the_durability_says() {
        let path = temporary_file();
        for (durability, level) in [(Durability::PowerLoss, 2), (Durability::ProcessCrash, 1)] {
            let file = SqliteFile::open(&path, durability).await.unwrap();
            let synchronous = |connection: &Connection| {
                connection.query_row("PRAGMA synchronous", [], |row| row.get::<_, i64>(0))
            };
            assert_eq!(file.run(false, synchronous).await.unwrap(), level);
        }
    }

    /// Savepoint journals (one per caller sharing a commit) and temporary
    /// tables never become files of their own, created and deleted on disk
    /// in the middle of a commit.
    #[tokio::test]
    async fn temporary_storage_stays_in_memory() {
        let file = SqliteFile::open(&temporary_file(), Durability::PowerLoss)
            .await
            .unwrap();
        let temp_store = |connection: &Connection| {
            connection.query_row("PRAGMA temp_store", [], |row| row.get::<_, i64>(0))
        };
        for read_only in [false, true] {
            assert_eq!(file.run(read_only, temp_store).await.unwrap(), 2, "MEMORY");
        }
    }

    /// Files written by sqlx read the same here, and the other way round.
    #[tokio::test]
    async fn values_are_stored_as_sqlx_stores_them() {
        let file = SqliteFile::open(&temporary_file(), Durability::ProcessCrash)
            .await
            .unwrap();
        let create = "CREATE TABLE t (id BLOB, at TEXT, instant INTEGER, doc TEXT)";
        sqlx::query(create).execute(&file.pool).await.unwrap();
        // Instants keep microseconds.
        let at = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
        let id = Uuid::now_v7();
        sqlx::query("INSERT INTO t VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(at)
            .bind(at.timestamp_micros())
            .bind(Json(serde_json::json!({"n": 1})))
            .execute(&file.pool)
            .await
            .unwrap();
        let select = "SELECT id, at, instant, doc FROM t";
        type Row = (Uuid, DateTime<Utc>, Stamp, Json<serde_json::Value>);
        let rows: Vec<Row> = file
            .run(true, |connection| fetch(connection, select, &[], Rows::All))
            .await
            .unwrap();
        let (read_id, read_at, read_instant, doc) = &rows[0];
        assert_eq!((*read_id, *read_at, read_instant.0), (id, at, at));
        assert_eq!(doc.0, serde_json::json!({"n": 1}));

        let doc = Arg::json(&serde_json::json!({"n": 2})).unwrap();
        let args = [Arg::from(id), Arg::from(at), Arg::Instant(Some(at)), doc];
        let insert = "INSERT INTO t VALUES ($1, $2, $3, $4)";
        file.run(false, |connection| execute(connection, insert, &args))
            .await
            .unwrap();
        let (read_id, read_at, read_instant): (Uuid, DateTime<Utc>, i64) =
            sqlx::query_as("SELECT id, at, instant FROM t WHERE doc = '{\"n\":2}'")
                .fetch_one(&file.pool)
                .await
                .unwrap();
        assert_eq!(
            (read_id, read_at, read_instant),
            (id, at, at.timestamp_micros())
        );
    }

    /// `$n` names the n-th argument wherever it appears, as on PostgreSQL.
    #[tokio::test]
    async fn numbered_parameters_bind_by_number() {
        let file = SqliteFile::open(&temporary_file(), Durability::ProcessCrash)
            .await
            .unwrap();
        let args = [Arg::Int(1), Arg::Text(Some("two"))];
        let row: Vec<(String, i64, i64)> = file
            .run(true, |connection| {
                fetch(connection, "SELECT $2, $1, $1 + 1", &args, Rows::All)
            })
            .await
            .unwrap();
        assert_eq!(row, [("two".to_owned(), 1, 2)]);
    }

    /// A transaction dropped before its end (a cancelled task) is rolled
    /// back, and the writer is free for the next one.
    #[tokio::test]
    async fn a_dropped_transaction_rolls_back() {
        let file = file_with_a_table().await;
        let tx = file.begin(false).await.unwrap();
        execute(tx.connection(), "INSERT INTO t VALUES (1)", &[]).unwrap();
        drop(tx);
        let tx = file.begin(false).await.unwrap();
        execute(tx.connection(), "INSERT INTO t VALUES (2)", &[]).unwrap();
        tx.commit(false).await.unwrap();
        assert_eq!(rows(&file).await, [(2,)]);
    }

    async fn rows(file: &SqliteFile) -> Vec<(i64,)> {
        let select = "SELECT n FROM t ORDER BY n";
        file.run(true, |connection| fetch(connection, select, &[], Rows::All))
            .await
            .unwrap()
    }

    async fn file_with_a_table() -> Arc<SqliteFile> {
        let file = SqliteFile::open(&temporary_file(), Durability::PowerLoss)
            .await
            .unwrap();
        let create =
            |connection: &Connection| connection.execute_batch("CREATE TABLE t (n INTEGER)");
        file.run(false, create).await.unwrap();
        Arc::new(file)
    }

    /// Writers queued while another writes join its transaction: one
    /// commit (one sync to disk) answers them all, and only once it is
    /// committed does a reader see their rows.
    #[tokio::test]
    async fn writes_queued_for_the_writer_share_its_commit() {
        let file = file_with_a_table().await;
        let commits_before = file.writer.lock().await.commits;
        let first = file.begin(false).await.unwrap();
        execute(first.connection(), "INSERT INTO t VALUES (0)", &[]).unwrap();
        let queued: Vec<_> = (1..=3)
            .map(|n| {
                let file = file.clone();
                tokio::spawn(async move {
                    let insert = "INSERT INTO t VALUES ($1)";
                    let args = [Arg::Int(n)];
                    file.run(false, |connection| execute(connection, insert, &args))
                        .await
                })
            })
            .collect();
        // Every one of them comes to wait for the writer.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            rows(&file).await.is_empty(),
            "nothing is read before its commit"
        );

        first.commit(false).await.unwrap();
        for writer in queued {
            assert_eq!(writer.await.unwrap().unwrap(), 1);
        }
        assert_eq!(rows(&file).await, [(0,), (1,), (2,), (3,)]);
        assert_eq!(file.writer.lock().await.commits - commits_before, 1);
    }

    /// A write that lingers is committed by a write that comes meanwhile,
    /// one commit for both; alone, it commits once its moment is up.
    #[tokio::test]
    async fn a_lingering_write_shares_the_next_commit_or_commits_alone() {
        let file = file_with_a_table().await;
        let commits_before = file.writer.lock().await.commits;
        let written = |n: i64| {
            let file = file.clone();
            async move {
                let tx = file.begin(false).await.unwrap();
                execute(tx.connection(), "INSERT INTO t VALUES ($1)", &[Arg::Int(n)]).unwrap();
                tx
            }
        };
        let first = written(1).await;
        let lingering = tokio::spawn(first.commit_lingering(false));
        // The lingering part is released and waits.
        tokio::task::yield_now().await;
        written(2).await.commit(false).await.unwrap();
        lingering.await.unwrap().unwrap();
        assert_eq!(rows(&file).await, [(1,), (2,)]);
        assert_eq!(file.writer.lock().await.commits - commits_before, 1);

        let alone = std::time::Instant::now();
        written(3).await.commit_lingering(false).await.unwrap();
        assert!(alone.elapsed() >= LINGER, "it waited for company first");
        assert_eq!(rows(&file).await, [(1,), (2,), (3,)]);
        assert_eq!(file.writer.lock().await.commits - commits_before, 2);
    }

    /// A part rolled back leaves the others of its transaction, and a part
    /// whose caller stopped waiting (a cancelled task) is still committed
    /// without waiting for a later writer.
    #[tokio::test]
    async fn parts_end_on_their_own() {
        let file = file_with_a_table().await;
        let first = file.begin(false).await.unwrap();
        execute(first.connection(), "INSERT INTO t VALUES (1)", &[]).unwrap();
        let (abandon, abandoned) = tokio::sync::oneshot::channel::<()>();
        let second = tokio::spawn({
            let file = file.clone();
            async move {
                let tx = file.begin(false).await.unwrap();
                execute(tx.connection(), "INSERT INTO t VALUES (2)", &[]).unwrap();
                abandoned.await.unwrap();
                drop(tx);
            }
        });
        // The second caller takes the writer next: the first waits in vain.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let waited = tokio::time::timeout(Duration::from_millis(50), first.commit(false)).await;
        assert!(waited.is_err(), "the commit waits for the writer");
        abandon.send(()).unwrap();
        second.await.unwrap();

        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while rows(&file).await.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(rows(&file).await, [(1,)]);
        assert!(file.writer.lock().await.open.is_none());
    }
}
