//! Users and their API keys.

use chrono::Utc;
use uuid::Uuid;
use zapflow_core::secret::{self, ApiKey};

use crate::{Result, Store};

impl Store {
    /// Creates a user with one API key, returned in full only here.
    pub async fn create_user(&self, name: &str) -> Result<(Uuid, ApiKey)> {
        let user_id = Uuid::now_v7();
        let key = ApiKey::generate();
        let now = Utc::now();
        let mut tx = self.db.begin().await?;
        tx.execute(
            "INSERT INTO users (id, name, created_at) VALUES ($1, $2, $3)",
            &[user_id.into(), name.into(), now.into()],
        )
        .await?;
        let secret_hash = secret::hash(&key.secret);
        tx.execute(
            "INSERT INTO api_keys (id, user_id, secret_hash, created_at) VALUES ($1, $2, $3, $4)",
            &[
                key.id.into(),
                user_id.into(),
                secret_hash.as_slice().into(),
                now.into(),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok((user_id, key))
    }

    pub async fn user_count(&self) -> Result<i64> {
        let (count,): (i64,) = self
            .db
            .reader()
            .fetch_one("SELECT count(*) FROM users", &[])
            .await?;
        Ok(count)
    }

    /// The user an API key belongs to, if the key is valid.
    pub async fn authenticate(&self, key: &ApiKey) -> Result<Option<Uuid>> {
        let row: Option<(Uuid, Vec<u8>)> = self
            .db
            .reader()
            .fetch_optional(
                "SELECT user_id, secret_hash FROM api_keys WHERE id = $1",
                &[key.id.into()],
            )
            .await?;
        Ok(row
            .and_then(|(user_id, stored)| secret::verify(&key.secret, &stored).then_some(user_id)))
    }
}
