//! Zaps: a trigger (a webhook, or a schedule) and actions, owned by a user.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;
use zapflow_core::schedule::{Schedule, Trigger};
use zapflow_core::{ActionSpec, ZapStatus, secret};

use crate::db::from_sqlite;
use crate::db::{Arg, Db, Stamp, Tx};
use crate::schedules::{delete_schedule, ensure_schedule, set_schedule};
use crate::{Result, Store, StoreError, parse_status};

/// A zap as its owner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Zap {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub name: String,
    pub actions: Vec<ActionSpec>,
    pub status: ZapStatus,
    /// Whether deliveries must be signed (the secret itself stays inside).
    pub signature_required: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// What starts its runs.
    pub trigger: Trigger,
    /// For a scheduled zap: when its next tick is due (kept while paused).
    pub next_tick_at: Option<DateTime<Utc>>,
}

/// What ingestion needs to know about a zap.
#[derive(Debug, Clone)]
pub struct ZapForIngest {
    pub owner_id: Uuid,
    pub token_hash: Vec<u8>,
    pub status: ZapStatus,
    pub actions: Vec<ActionSpec>,
    /// The Standard Webhooks secret (`whsec_...`) deliveries are signed with.
    pub signing_secret: Option<String>,
    /// Whether a schedule starts its runs: then it has no webhook.
    pub scheduled: bool,
}

#[derive(sqlx::FromRow)]
struct IngestRow {
    owner_id: Uuid,
    token_hash: Vec<u8>,
    status: String,
    actions: Json<Vec<ActionSpec>>,
    signing_secret: Option<String>,
    scheduled: bool,
}

from_sqlite!(IngestRow {
    owner_id,
    token_hash,
    status,
    actions,
    signing_secret,
    scheduled
});

impl TryFrom<IngestRow> for ZapForIngest {
    type Error = StoreError;

    fn try_from(row: IngestRow) -> Result<Self> {
        Ok(Self {
            owner_id: row.owner_id,
            token_hash: row.token_hash,
            status: parse_status(&row.status)?,
            actions: row.actions.0,
            signing_secret: row.signing_secret,
            scheduled: row.scheduled,
        })
    }
}

#[derive(sqlx::FromRow)]
struct ZapRow {
    id: Uuid,
    owner_id: Uuid,
    name: String,
    actions: Json<Vec<ActionSpec>>,
    status: String,
    signature_required: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    trigger: Option<Json<Schedule>>,
    next_tick_at: Option<Stamp>,
}

from_sqlite!(ZapRow {
    id,
    owner_id,
    name,
    actions,
    status,
    signature_required,
    created_at,
    updated_at,
    trigger,
    next_tick_at
});

impl TryFrom<ZapRow> for Zap {
    type Error = StoreError;

    fn try_from(row: ZapRow) -> Result<Self> {
        Ok(Self {
            id: row.id,
            owner_id: row.owner_id,
            name: row.name,
            actions: row.actions.0,
            status: parse_status(&row.status)?,
            signature_required: row.signature_required,
            created_at: row.created_at,
            updated_at: row.updated_at,
            trigger: match row.trigger {
                Some(schedule) => Trigger::Schedule(schedule.0),
                None => Trigger::Webhook,
            },
            next_tick_at: row.next_tick_at.map(|stamp| stamp.0),
        })
    }
}

/// The columns a [`ZapRow`] reads.
macro_rules! zap_columns {
    () => {
        "id, owner_id, name, actions, status, signing_secret IS NOT NULL AS signature_required, \
         created_at, updated_at, trigger, \
         (SELECT next_tick_at FROM zap_schedules WHERE zap_schedules.zap_id = zaps.id) AS next_tick_at"
    };
}

/// The condition naming one live zap of one owner (`$1` the zap, `$2` the owner).
macro_rules! owned_zap {
    () => {
        " WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL"
    };
}

impl Store {
    /// Creates a webhook-triggered zap.
    pub async fn create_zap(
        &self,
        owner_id: Uuid,
        name: &str,
        actions: &[ActionSpec],
        token_hash: &[u8],
        signing_secret: Option<&str>,
    ) -> Result<Zap> {
        self.create_zap_triggered(
            owner_id,
            name,
            actions,
            token_hash,
            signing_secret,
            &Trigger::Webhook,
        )
        .await
    }

    /// Creates a zap started by `trigger`; a scheduled one gets its first
    /// tick in the same transaction.
    pub async fn create_zap_triggered(
        &self,
        owner_id: Uuid,
        name: &str,
        actions: &[ActionSpec],
        token_hash: &[u8],
        signing_secret: Option<&str>,
        trigger: &Trigger,
    ) -> Result<Zap> {
        let (id, now) = (Uuid::now_v7(), Utc::now());
        let mut tx = self.db.begin().await?;
        tx.execute(
            "INSERT INTO zaps (id, owner_id, name, actions, token_hash, status, created_at,
                               updated_at, signing_secret, trigger)
             VALUES ($1, $2, $3, $4, $5, 'active', $6, $6, $7, $8)",
            &[
                id.into(),
                owner_id.into(),
                name.into(),
                Arg::json(&actions)?,
                token_hash.into(),
                now.into(),
                signing_secret.into(),
                Arg::json_or_null(trigger.schedule())?,
            ],
        )
        .await?;
        set_schedule(&mut tx, id, trigger.schedule(), now).await?;
        let zap = read_zap(&mut tx, owner_id, id).await?;
        tx.commit().await?;
        Ok(zap)
    }

    pub async fn get_zap(&self, owner_id: Uuid, id: Uuid) -> Result<Zap> {
        let row: ZapRow = self
            .db
            .reader()
            .fetch_one(
                concat!("SELECT ", zap_columns!(), " FROM zaps", owned_zap!()),
                &[id.into(), owner_id.into()],
            )
            .await?;
        row.try_into()
    }

    /// Up to `limit` zaps in creation order, after the zap `after`.
    pub async fn list_zaps(
        &self,
        owner_id: Uuid,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<Zap>> {
        let rows: Vec<ZapRow> = self
            .db
            .reader()
            .fetch_all(
                concat!(
                    "SELECT ",
                    zap_columns!(),
                    " FROM zaps
                     WHERE owner_id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR id > $2)
                     ORDER BY id LIMIT $3"
                ),
                &[owner_id.into(), after.into(), limit.into()],
            )
            .await?;
        rows.into_iter().map(Zap::try_from).collect()
    }

    /// Replaces the name and actions of a zap.
    pub async fn update_zap(
        &self,
        owner_id: Uuid,
        id: Uuid,
        name: &str,
        actions: &[ActionSpec],
    ) -> Result<Zap> {
        self.update_zap_triggered(owner_id, id, name, actions, None)
            .await
    }

    /// Replaces the name and actions of a zap and, when given, its trigger.
    /// A trigger that differs from the zap's restarts its schedule from
    /// now; a webhook zap turned scheduled loses its webhook (its token
    /// becomes one nobody knows, its signing secret is forgotten).
    pub async fn update_zap_triggered(
        &self,
        owner_id: Uuid,
        id: Uuid,
        name: &str,
        actions: &[ActionSpec],
        trigger: Option<&Trigger>,
    ) -> Result<Zap> {
        let now = Utc::now();
        let mut tx = self.db.begin().await?;
        let changed = tx
            .execute(
                concat!(
                    "UPDATE zaps SET name = $3, actions = $4, updated_at = $5",
                    owned_zap!()
                ),
                &[
                    id.into(),
                    owner_id.into(),
                    name.into(),
                    Arg::json(&actions)?,
                    now.into(),
                ],
            )
            .await?;
        found(changed)?;
        if let Some(trigger) = trigger {
            let (current,): (Option<Json<Schedule>>,) = tx
                .fetch_one("SELECT trigger FROM zaps WHERE id = $1", &[id.into()])
                .await?;
            let current = current.map(|schedule| schedule.0);
            if current.as_ref() != trigger.schedule() {
                let unknown_token = secret::hash(&secret::random_token());
                tx.execute(
                    "UPDATE zaps SET trigger = $2,
                         token_hash = CASE WHEN trigger IS NULL THEN $3 ELSE token_hash END,
                         signing_secret = CASE WHEN $2 IS NULL THEN signing_secret END
                     WHERE id = $1",
                    &[
                        id.into(),
                        Arg::json_or_null(trigger.schedule())?,
                        unknown_token.as_slice().into(),
                    ],
                )
                .await?;
                set_schedule(&mut tx, id, trigger.schedule(), now).await?;
            }
        }
        let zap = read_zap(&mut tx, owner_id, id).await?;
        tx.commit().await?;
        self.forget_zap(id);
        Ok(zap)
    }

    /// Pauses or resumes a zap. A paused schedule keeps its next tick: on
    /// resuming, the ticks due meanwhile follow its missed-ticks policy.
    pub async fn set_zap_status(&self, owner_id: Uuid, id: Uuid, status: ZapStatus) -> Result<Zap> {
        let now = Utc::now();
        let mut tx = self.db.begin().await?;
        let changed = tx
            .execute(
                concat!("UPDATE zaps SET status = $3, updated_at = $4", owned_zap!()),
                &[
                    id.into(),
                    owner_id.into(),
                    status.as_str().into(),
                    now.into(),
                ],
            )
            .await?;
        found(changed)?;
        let mut zap = read_zap(&mut tx, owner_id, id).await?;
        if let (ZapStatus::Active, Trigger::Schedule(schedule), None) =
            (status, &zap.trigger, zap.next_tick_at)
        {
            ensure_schedule(&mut tx, id, schedule, now).await?;
            zap = read_zap(&mut tx, owner_id, id).await?;
        }
        tx.commit().await?;
        self.forget_zap(id);
        Ok(zap)
    }

    /// Replaces the hash of the zap's webhook token.
    pub async fn set_zap_token(&self, owner_id: Uuid, id: Uuid, token_hash: &[u8]) -> Result<()> {
        self.update_owned_zap(
            concat!(
                "UPDATE zaps SET token_hash = $3, updated_at = $4",
                owned_zap!()
            ),
            owner_id,
            id,
            token_hash.into(),
        )
        .await
    }

    /// Makes the zap require deliveries signed with `secret` (`whsec_...`).
    pub async fn set_zap_signing_secret(
        &self,
        owner_id: Uuid,
        id: Uuid,
        secret: &str,
    ) -> Result<()> {
        self.put_zap_signing_secret(owner_id, id, Some(secret))
            .await
    }

    /// Marks the zap deleted (and stops its schedule); its runs stay
    /// readable.
    pub async fn delete_zap(&self, owner_id: Uuid, id: Uuid) -> Result<()> {
        let mut tx = self.db.begin().await?;
        let changed = tx
            .execute(
                concat!("UPDATE zaps SET deleted_at = $3", owned_zap!()),
                &[id.into(), owner_id.into(), Utc::now().into()],
            )
            .await?;
        found(changed)?;
        delete_schedule(&mut tx, id).await?;
        tx.commit().await?;
        self.forget_zap(id);
        Ok(())
    }

    /// Runs `sql` on zap `$1` of owner `$2`, with `value` as `$3` and now as
    /// `$4`; [`StoreError::NotFound`] when no live zap matched.
    async fn update_owned_zap(
        &self,
        sql: &'static str,
        owner_id: Uuid,
        id: Uuid,
        value: Arg<'_>,
    ) -> Result<()> {
        let changed = self
            .db
            .execute(sql, &[id.into(), owner_id.into(), value, Utc::now().into()])
            .await?;
        self.forget_zap(id);
        found(changed)
    }

    /// A live zap by id alone: the webhook token is the caller's credential.
    /// Served from memory once read (see `zap_cache`).
    pub async fn zap_for_ingest(&self, id: Uuid) -> Result<Option<Arc<ZapForIngest>>> {
        if let Db::Postgres { pool, .. } = &self.db {
            self.zaps.listen(pool);
        }
        if let Some(zap) = self.zaps.get(id) {
            return Ok(Some(zap));
        }
        let generation = self.zaps.generation();
        let row: Option<IngestRow> = self
            .db
            .reader()
            .fetch_optional(
                "SELECT owner_id, token_hash, status, actions, signing_secret,
                        trigger IS NOT NULL AS scheduled
                 FROM zaps WHERE id = $1 AND deleted_at IS NULL",
                &[id.into()],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let zap = Arc::new(ZapForIngest::try_from(row)?);
        self.zaps.put(generation, id, zap.clone());
        Ok(Some(zap))
    }
}

/// Zap `id` of `owner_id`, live, inside a transaction (after writing it).
async fn read_zap(tx: &mut Tx, owner_id: Uuid, id: Uuid) -> Result<Zap> {
    let row: ZapRow = tx
        .fetch_one(
            concat!("SELECT ", zap_columns!(), " FROM zaps", owned_zap!()),
            &[id.into(), owner_id.into()],
        )
        .await?;
    row.try_into()
}

/// [`StoreError::NotFound`] when a statement changed no row.
fn found(rows_changed: u64) -> Result<()> {
    if rows_changed == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}

impl Store {
    /// The live zap `name` of an owner (names are unique among them).
    pub async fn zap_by_name(&self, owner_id: Uuid, name: &str) -> Result<Zap> {
        let row: ZapRow = self
            .db
            .reader()
            .fetch_one(
                concat!(
                    "SELECT ",
                    zap_columns!(),
                    " FROM zaps WHERE owner_id = $1 AND name = $2 AND deleted_at IS NULL"
                ),
                &[owner_id.into(), name.into()],
            )
            .await?;
        row.try_into()
    }

    /// Stops checking the zap's signatures and forgets its secret.
    pub async fn clear_zap_signing_secret(&self, owner_id: Uuid, id: Uuid) -> Result<()> {
        self.put_zap_signing_secret(owner_id, id, None).await
    }

    async fn put_zap_signing_secret(
        &self,
        owner_id: Uuid,
        id: Uuid,
        secret: Option<&str>,
    ) -> Result<()> {
        self.update_owned_zap(
            concat!(
                "UPDATE zaps SET signing_secret = $3, updated_at = $4",
                owned_zap!()
            ),
            owner_id,
            id,
            secret.into(),
        )
        .await
    }
}
