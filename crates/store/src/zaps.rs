use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;
use sqlx::types::Json;
use uuid::Uuid;
use zapflow_core::{ActionSpec, ZapStatus};

use crate::{PgStore, Result, StoreError};

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
}

pub(crate) type IngestRow = (Uuid, Vec<u8>, String, Json<Vec<ActionSpec>>, Option<String>);

#[derive(sqlx::FromRow)]
pub(crate) struct ZapRow {
    id: Uuid,
    owner_id: Uuid,
    name: String,
    actions: Json<Vec<ActionSpec>>,
    status: String,
    signature_required: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

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
        })
    }
}

pub(crate) fn parse_status<T: std::str::FromStr<Err = zapflow_core::model::UnknownStatus>>(
    text: &str,
) -> Result<T> {
    text.parse()
        .map_err(|error| StoreError::Db(sqlx::Error::Decode(Box::new(error))))
}

pub(crate) const ZAP_COLUMNS: &str = "id, owner_id, name, actions, status, signing_secret IS NOT NULL AS signature_required, created_at, updated_at";

impl PgStore {
    pub async fn create_zap(
        &self,
        owner_id: Uuid,
        name: &str,
        actions: &[ActionSpec],
        token_hash: &[u8],
        signing_secret: Option<&str>,
    ) -> Result<Zap> {
        let row: ZapRow = sqlx::query_as(AssertSqlSafe(format!(
            "INSERT INTO zaps (id, owner_id, name, actions, token_hash, status, signing_secret)
             VALUES ($1, $2, $3, $4, $5, 'active', $6) RETURNING {ZAP_COLUMNS}"
        )))
        .bind(Uuid::now_v7())
        .bind(owner_id)
        .bind(name)
        .bind(Json(actions))
        .bind(token_hash)
        .bind(signing_secret)
        .fetch_one(&self.pool)
        .await?;
        row.try_into()
    }

    pub async fn update_zap(
        &self,
        owner_id: Uuid,
        id: Uuid,
        name: &str,
        actions: &[ActionSpec],
    ) -> Result<Zap> {
        let row: ZapRow = sqlx::query_as(AssertSqlSafe(format!(
            "UPDATE zaps SET name = $3, actions = $4, updated_at = now()
             WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL
             RETURNING {ZAP_COLUMNS}"
        )))
        .bind(id)
        .bind(owner_id)
        .bind(name)
        .bind(Json(actions))
        .fetch_one(&self.pool)
        .await?;
        row.try_into()
    }

    pub async fn set_zap_status(&self, owner_id: Uuid, id: Uuid, status: ZapStatus) -> Result<Zap> {
        let row: ZapRow = sqlx::query_as(AssertSqlSafe(format!(
            "UPDATE zaps SET status = $3, updated_at = now()
             WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL
             RETURNING {ZAP_COLUMNS}"
        )))
        .bind(id)
        .bind(owner_id)
        .bind(status.as_str())
        .fetch_one(&self.pool)
        .await?;
        row.try_into()
    }

    pub async fn set_zap_token(&self, owner_id: Uuid, id: Uuid, token_hash: &[u8]) -> Result<()> {
        let done = sqlx::query(
            "UPDATE zaps SET token_hash = $3, updated_at = now()
             WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(owner_id)
        .bind(token_hash)
        .execute(&self.pool)
        .await?;
        found(done.rows_affected())
    }

    pub async fn set_zap_signing_secret(
        &self,
        owner_id: Uuid,
        id: Uuid,
        secret: &str,
    ) -> Result<()> {
        let done = sqlx::query(
            "UPDATE zaps SET signing_secret = $3, updated_at = now()
             WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(owner_id)
        .bind(secret)
        .execute(&self.pool)
        .await?;
        found(done.rows_affected())
    }

    pub async fn delete_zap(&self, owner_id: Uuid, id: Uuid) -> Result<()> {
        let done = sqlx::query(
            "UPDATE zaps SET deleted_at = now()
             WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(owner_id)
        .execute(&self.pool)
        .await?;
        found(done.rows_affected())
    }
}

pub(crate) fn found(rows_affected: u64) -> Result<()> {
    if rows_affected == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}
