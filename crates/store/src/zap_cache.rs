//! What ingestion needs of each zap, kept in memory: a webhook should not
//! cost a database read to find its zap, since zaps change rarely.
//!
//! An entry is trusted only while every change to zaps is sure to remove
//! it. This process removes what it changes as it commits
//! ([`Store::forget_zap`]). Other processes share only PostgreSQL: a trigger
//! there announces every changed zap on [`ZAPS_CHANNEL`], and a listener
//! removes what it names. While that listener is not connected (before its
//! first connection, after losing it) the cache is empty and unused, so a
//! change made elsewhere is never missed: a rotated token, a paused or
//! deleted zap stops webhooks at once, wherever it was changed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::db::Db;
use crate::{Store, ZapForIngest};

/// The channel on which PostgreSQL announces changed zaps (see the trigger
/// in the migrations); the payload is the zap's id.
pub const ZAPS_CHANNEL: &str = "zapflow_zaps";

/// Most zaps kept; past it the cache starts over (a bound, not an
/// eviction policy: deployments with more live zaps read the rest).
const CAPACITY: usize = 10_000;

/// How long the listener waits before connecting again.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct ZapCache {
    entries: RwLock<HashMap<Uuid, Arc<ZapForIngest>>>,
    /// Bumped by every removal: a read that started before a removal must
    /// not put back what was removed.
    generation: AtomicU64,
    /// Whether every change to zaps is sure to reach [`Self::forget`].
    trusted: AtomicBool,
    /// Handed to the listener when it starts (so it starts once); it
    /// resolves when the cache, holding its sender, is dropped.
    stop: Mutex<Option<oneshot::Receiver<()>>>,
    _stopping: oneshot::Sender<()>,
}

impl ZapCache {
    /// A cache for `db`: trusted at once on SQLite (this process is the
    /// file's only writer), on PostgreSQL once its listener is connected.
    pub(crate) fn new(db: &Db) -> Arc<Self> {
        let (stopping, stop) = oneshot::channel();
        Arc::new(Self {
            entries: RwLock::default(),
            generation: AtomicU64::new(0),
            trusted: AtomicBool::new(matches!(db, Db::Sqlite { .. })),
            stop: Mutex::new(Some(stop)),
            _stopping: stopping,
        })
    }

    pub(crate) fn get(&self, id: Uuid) -> Option<Arc<ZapForIngest>> {
        if !self.trusted.load(Ordering::Acquire) {
            return None;
        }
        self.entries
            .read()
            .expect("zap cache lock")
            .get(&id)
            .cloned()
    }

    /// The generation to pass to [`Self::put`] after reading a zap.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Keeps `zap`, read when the cache was at `generation`, unless
    /// something was removed since (it may have been this zap).
    pub(crate) fn put(&self, generation: u64, id: Uuid, zap: Arc<ZapForIngest>) {
        let mut entries = self.entries.write().expect("zap cache lock");
        if !self.trusted.load(Ordering::Acquire) || self.generation() != generation {
            return;
        }
        if entries.len() >= CAPACITY {
            entries.clear();
        }
        entries.insert(id, zap);
    }

    pub(crate) fn forget(&self, id: Uuid) {
        let mut entries = self.entries.write().expect("zap cache lock");
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.remove(&id);
    }

    /// Empties the cache and trusts it (or not) from now on.
    fn reset(&self, trusted: bool) {
        let mut entries = self.entries.write().expect("zap cache lock");
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.trusted.store(trusted, Ordering::Release);
        entries.clear();
    }

    /// Starts the PostgreSQL listener, once, on first use.
    pub(crate) fn listen(self: &Arc<Self>, pool: &PgPool) {
        let stop = self.stop.lock().expect("zap cache lock").take();
        if let Some(stop) = stop {
            tokio::spawn(listen(Arc::downgrade(self), pool.clone(), stop));
        }
    }
}

/// Removes the zaps PostgreSQL announces as changed until the cache is
/// dropped; the cache is trusted only while connected.
async fn listen(cache: Weak<ZapCache>, pool: PgPool, mut stop: oneshot::Receiver<()>) {
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(ZAPS_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let listener = tokio::select! {
            _ = &mut stop => return,
            connected = connected => connected,
        };
        match listener {
            Ok(mut listener) => {
                let Some(held) = cache.upgrade() else { return };
                // Whatever changed before the LISTEN took hold is gone with
                // the entries.
                held.reset(true);
                drop(held);
                loop {
                    let notification = tokio::select! {
                        _ = &mut stop => return,
                        notification = listener.try_recv() => notification,
                    };
                    let Some(cache) = cache.upgrade() else { return };
                    match notification {
                        Ok(Some(notification)) => match notification.payload().parse() {
                            Ok(id) => cache.forget(id),
                            Err(_) => cache.reset(true),
                        },
                        // The connection is lost: until a new one listens,
                        // changes made elsewhere go unannounced.
                        Ok(None) | Err(_) => {
                            tracing::warn!(
                                "zap change notifications lost; reading zaps from the database until reconnected"
                            );
                            cache.reset(false);
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                tracing::debug!(%error, "cannot listen for zap changes yet");
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep(RECONNECT_AFTER) => {}
        }
    }
}

impl Store {
    /// Drops what the cache knows of zap `id`, after this process changed it.
    pub(crate) fn forget_zap(&self, id: Uuid) {
        self.zaps.forget(id);
    }
}
