use uuid::Uuid;
use zapflow_core::secret::{self, ApiKey};

use crate::{PgStore, Result};

impl PgStore {
    /// Creates a user with one API key, returned in full only here.
    pub async fn create_user(&self, name: &str) -> Result<(Uuid, ApiKey)> {
        let user_id = Uuid::now_v7();
        let key = ApiKey::generate();
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO users (id, name) VALUES ($1, $2)")
            .bind(user_id)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO api_keys (id, user_id, secret_hash) VALUES ($1, $2, $3)")
            .bind(key.id)
            .bind(user_id)
            .bind(secret::hash(&key.secret))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((user_id, key))
    }

    /// The user an API key belongs to, if the key is valid.
    pub async fn authenticate(&self, key: &ApiKey) -> Result<Option<Uuid>> {
        let row: Option<(Uuid, Vec<u8>)> =
            sqlx::query_as("SELECT user_id, secret_hash FROM api_keys WHERE id = $1")
                .bind(key.id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row
            .and_then(|(user_id, stored)| secret::verify(&key.secret, &stored).then_some(user_id)))
    }

    pub async fn user_count(&self) -> Result<i64> {
        let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM users")
            .fetch_one(&self.pool)
            .await?;
        Ok(count)
    }
}
