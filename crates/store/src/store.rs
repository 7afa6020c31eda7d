//! [`Store`]: one type for the rest of zapflow, whichever database is behind.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use uuid::Uuid;
use zapflow_core::retry::RetryPolicy;
use zapflow_core::secret::ApiKey;
use zapflow_core::{ActionSpec, ZapStatus};

use crate::{
    ClaimedStep, DeadLetterPage, Durability, NewRun, OUTBOX_CHANNEL, OutboxKind, OutboxRow,
    PgStore, Replay, Result, Run, RunPage, SqliteStore, StepClaim, StepOutcome, TimeWindow, Zap,
    ZapForIngest,
};

/// The database: PostgreSQL (distributed and PostgreSQL-only deployments)
/// or an SQLite file (embedded). Cheap to clone.
#[derive(Debug, Clone)]
pub enum Store {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

/// Calls the same method on whichever store this is.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            Store::Postgres(store) => store.$method($($arg),*).await,
            Store::Sqlite(store) => store.$method($($arg),*).await,
        }
    };
}

impl Store {
    /// Opens the database a URL names: `postgres://...` (lazily: the first
    /// query connects) or `sqlite://path` (created if missing).
    pub async fn open(url: &str, max_connections: u32) -> Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite(SqliteStore::connect(url).await?))
        } else {
            Ok(Self::Postgres(PgStore::connect_lazy(url, max_connections)?))
        }
    }

    /// Opens (creating) an SQLite database file.
    pub async fn open_file(path: &Path) -> Result<Self> {
        Self::open_file_with(path, Durability::default()).await
    }

    /// [`open_file`](Self::open_file) with a chosen durability.
    pub async fn open_file_with(path: &Path, durability: Durability) -> Result<Self> {
        Ok(Self::Sqlite(SqliteStore::open(path, durability).await?))
    }

    /// The PostgreSQL store, for what only it can do (relaying to Kafka).
    pub fn postgres(&self) -> Option<&PgStore> {
        match self {
            Self::Postgres(store) => Some(store),
            Self::Sqlite(_) => None,
        }
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        dispatch!(self.migrate())
    }

    pub async fn ping(&self) -> Result<()> {
        dispatch!(self.ping())
    }

    pub async fn create_user(&self, name: &str) -> Result<(Uuid, ApiKey)> {
        dispatch!(self.create_user(name))
    }

    pub async fn user_count(&self) -> Result<i64> {
        dispatch!(self.user_count())
    }

    pub async fn authenticate(&self, key: &ApiKey) -> Result<Option<Uuid>> {
        dispatch!(self.authenticate(key))
    }

    /// Creates a zap; `signing_secret` (`whsec_...`) makes it require
    /// signed deliveries.
    pub async fn create_zap(
        &self,
        owner_id: Uuid,
        name: &str,
        actions: &[ActionSpec],
        token_hash: &[u8],
        signing_secret: Option<&str>,
    ) -> Result<Zap> {
        dispatch!(self.create_zap(owner_id, name, actions, token_hash, signing_secret))
    }

    pub async fn get_zap(&self, owner_id: Uuid, id: Uuid) -> Result<Zap> {
        dispatch!(self.get_zap(owner_id, id))
    }

    pub async fn list_zaps(
        &self,
        owner_id: Uuid,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<Zap>> {
        dispatch!(self.list_zaps(owner_id, after, limit))
    }

    pub async fn update_zap(
        &self,
        owner_id: Uuid,
        id: Uuid,
        name: &str,
        actions: &[ActionSpec],
    ) -> Result<Zap> {
        dispatch!(self.update_zap(owner_id, id, name, actions))
    }

    pub async fn set_zap_status(&self, owner_id: Uuid, id: Uuid, status: ZapStatus) -> Result<Zap> {
        dispatch!(self.set_zap_status(owner_id, id, status))
    }

    pub async fn set_zap_token(&self, owner_id: Uuid, id: Uuid, token_hash: &[u8]) -> Result<()> {
        dispatch!(self.set_zap_token(owner_id, id, token_hash))
    }

    pub async fn set_zap_signing_secret(
        &self,
        owner_id: Uuid,
        id: Uuid,
        secret: &str,
    ) -> Result<()> {
        dispatch!(self.set_zap_signing_secret(owner_id, id, secret))
    }

    pub async fn delete_zap(&self, owner_id: Uuid, id: Uuid) -> Result<()> {
        dispatch!(self.delete_zap(owner_id, id))
    }

    /// A live zap by id alone: the webhook token is the caller's credential.
    pub async fn zap_for_ingest(&self, id: Uuid) -> Result<Option<ZapForIngest>> {
        dispatch!(self.zap_for_ingest(id))
    }

    /// Records a batch of webhook deliveries in one transaction: each new run
    /// with the outbox row of its first step. Returns, in input order, the
    /// run id and whether the delivery repeated an idempotency key already
    /// recorded (then the earlier run's id, and nothing is written).
    pub async fn insert_runs(&self, runs: &[NewRun]) -> Result<Vec<(Uuid, bool)>> {
        dispatch!(self.insert_runs(runs))
    }

    /// [`insert_runs`](Self::insert_runs), but one delivery the database
    /// refuses fails alone: when the batch fails for anything but an outage,
    /// each run is tried in a transaction of its own, so every other
    /// delivery is still recorded. `Err` means the database did not answer
    /// and nothing was written.
    pub async fn insert_runs_isolated(&self, runs: &[NewRun]) -> Result<Vec<Result<(Uuid, bool)>>> {
        match self.insert_runs(runs).await {
            Ok(results) => Ok(results.into_iter().map(Ok).collect()),
            Err(error) if error.is_transient() => Err(error),
            Err(error) if runs.len() == 1 => Ok(vec![Err(error)]),
            Err(error) => {
                tracing::warn!(%error, runs = runs.len(), "a batch of runs failed; recording each alone");
                let mut results = Vec::with_capacity(runs.len());
                for run in runs {
                    let result = self.insert_runs(std::slice::from_ref(run)).await;
                    results.push(result.map(|mut one| one.remove(0)));
                }
                Ok(results)
            }
        }
    }

    /// Records a replay of `original` as run `id`, starting at `start_stage`:
    /// the steps before it are copied with their outputs, and the outbox row
    /// of the first step to run is added, all in one transaction. A run has
    /// at most one replay: when `original` has one already (also one
    /// committed concurrently), nothing is written and that one is returned.
    pub async fn insert_replay(
        &self,
        original: &Run,
        id: Uuid,
        start_stage: u32,
    ) -> Result<Replay> {
        dispatch!(self.insert_replay(original, id, start_stage))
    }

    /// Ids of a zap's failed runs not replayed yet, created in `window`,
    /// oldest first, at most `limit`.
    pub async fn failed_runs(
        &self,
        owner_id: Uuid,
        zap_id: Uuid,
        window: &TimeWindow,
        limit: u32,
    ) -> Result<Vec<Uuid>> {
        dispatch!(self.failed_runs(owner_id, zap_id, window, limit))
    }

    /// A run with its steps, whoever owns it (for workers).
    pub async fn run(&self, id: Uuid) -> Result<Option<Run>> {
        dispatch!(self.run(id))
    }

    /// A run with its steps, if `owner_id` owns it.
    pub async fn owned_run(&self, owner_id: Uuid, id: Uuid) -> Result<Run> {
        dispatch!(self.owned_run(owner_id, id))
    }

    /// Runs of an owner (optionally of one zap), newest first, without steps
    /// and, unless `payloads`, without their trigger, headers and query
    /// (left `null`).
    pub async fn list_runs(
        &self,
        owner_id: Uuid,
        zap_id: Option<Uuid>,
        before: Option<Uuid>,
        limit: u32,
        payloads: bool,
    ) -> Result<RunPage> {
        dispatch!(self.list_runs(owner_id, zap_id, before, limit, payloads))
    }

    /// Leases step `stage` of a run for `lease`, unless it is done, held by
    /// another worker, waiting for a retry not yet due, or out of attempts
    /// under `retry` (the worker's policy; the action's override applies on
    /// top). A step out of attempts is failed, with its run, and
    /// dead-lettered ([`StepClaim::Exhausted`]).
    pub async fn claim_step(
        &self,
        run_id: Uuid,
        stage: u32,
        lease: Duration,
        retry: &RetryPolicy,
    ) -> Result<StepClaim> {
        dispatch!(self.claim_step(run_id, stage, lease, retry))
    }

    /// Records how an attempt ended and, in the same transaction, announces
    /// what follows: the next step, a delayed retry, or a dead letter.
    /// Returns false (and changes nothing) when the lease was lost.
    pub async fn finish_step(&self, step: &ClaimedStep, outcome: &StepOutcome) -> Result<bool> {
        dispatch!(self.finish_step(step, outcome))
    }

    /// Announces step `stage` again after `delay` (for a step another worker
    /// holds: if that worker vanished, its lease will have expired by then).
    pub async fn reschedule_step(
        &self,
        run_id: Uuid,
        zap_id: Uuid,
        stage: u32,
        delay: Duration,
    ) -> Result<()> {
        dispatch!(self.enqueue_one(run_id, zap_id, stage, OutboxKind::Step, None, delay))
    }

    /// Dead-letters an event that points at nothing runnable.
    pub async fn dead_letter(
        &self,
        run_id: Uuid,
        zap_id: Uuid,
        stage: u32,
        reason: &str,
    ) -> Result<()> {
        dispatch!(self.enqueue_one(
            run_id,
            zap_id,
            stage,
            OutboxKind::DeadLetter,
            Some(reason),
            Duration::ZERO
        ))
    }

    /// Leases up to `limit` due step rows for `lease`,
    /// for workers that take work from the outbox directly (no Kafka).
    pub async fn lease_due_outbox_rows(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>> {
        dispatch!(self.lease_due_outbox_rows(limit, lease))
    }

    /// Deletes outbox rows whose work is recorded.
    pub async fn delete_outbox_rows(&self, ids: &[i64]) -> Result<()> {
        dispatch!(self.delete_outbox_rows(ids))
    }

    /// How long until the next step row comes due (zero if one is due now);
    /// `None` when there are none. Loops sleep until then rather than until
    /// their next poll, so a retry runs when it is due.
    pub async fn next_step_due_in(&self) -> Result<Option<Duration>> {
        dispatch!(self.next_step_due_in())
    }

    /// An owner's dead letters (optionally of one zap), newest first.
    pub async fn list_dead_letters(
        &self,
        owner_id: Uuid,
        zap_id: Option<Uuid>,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<DeadLetterPage> {
        dispatch!(self.list_dead_letters(owner_id, zap_id, before, limit))
    }

    /// Deletes the outbox rows announcing dead letters, for deployments
    /// without a broker to announce them to; returns how many.
    pub async fn discard_dead_letter_announcements(&self) -> Result<u64> {
        dispatch!(self.discard_dead_letter_announcements())
    }

    /// Deletes dead letters recorded before `cutoff`; returns how many.
    pub async fn purge_dead_letters(&self, cutoff: DateTime<Utc>) -> Result<u64> {
        dispatch!(self.purge_dead_letters(cutoff))
    }

    /// Counts outbox rows (due or not).
    pub async fn outbox_len(&self) -> Result<i64> {
        dispatch!(self.outbox_len())
    }

    /// A subscription to "outbox rows were committed", for waking loops
    /// early; they still poll, since a wake-up can be missed.
    pub async fn outbox_wakeups(&self) -> OutboxWakeups {
        match self {
            Self::Postgres(store) => {
                let listener = async {
                    let mut listener = PgListener::connect_with(store.pool()).await.ok()?;
                    listener.listen(OUTBOX_CHANNEL).await.ok()?;
                    Some(listener)
                };
                OutboxWakeups::Postgres(listener.await)
            }
            Self::Sqlite(store) => OutboxWakeups::Local(store.outbox_changes()),
        }
    }
}

pub enum OutboxWakeups {
    /// LISTEN on the outbox channel; `None` while the connection is down.
    Postgres(Option<PgListener>),
    /// Committed by this process (SQLite has no other writer).
    Local(watch::Receiver<()>),
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
