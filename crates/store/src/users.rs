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
}
