//! Queries whose SQL reads the same on PostgreSQL and SQLite, written once
//! and expanded into both stores (sqlx sends each parameter's type, so no
//! casts are needed for PostgreSQL to read `$2 IS NULL`).

/// The shared methods, for an `impl` block of a store with a `pool` field.
macro_rules! portable_queries {
    () => {
        /// Whether the database answers.
        pub async fn ping(&self) -> $crate::Result<()> {
            ::sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        }

        /// The user an API key belongs to, if the key is valid.
        pub async fn authenticate(
            &self,
            key: &::zapflow_core::secret::ApiKey,
        ) -> $crate::Result<Option<::uuid::Uuid>> {
            let row: Option<(::uuid::Uuid, Vec<u8>)> =
                ::sqlx::query_as("SELECT user_id, secret_hash FROM api_keys WHERE id = $1")
                    .bind(key.id)
                    .fetch_optional(&self.pool)
                    .await?;
            Ok(row.and_then(|(user_id, stored)| {
                ::zapflow_core::secret::verify(&key.secret, &stored).then_some(user_id)
            }))
        }

        pub async fn user_count(&self) -> $crate::Result<i64> {
            let (count,): (i64,) = ::sqlx::query_as("SELECT count(*) FROM users")
                .fetch_one(&self.pool)
                .await?;
            Ok(count)
        }

        pub async fn get_zap(&self, owner_id: ::uuid::Uuid, id: ::uuid::Uuid) -> $crate::Result<$crate::Zap> {
            let row: $crate::zaps::ZapRow = ::sqlx::query_as(::sqlx::AssertSqlSafe(format!(
                "SELECT {} FROM zaps WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL",
                $crate::zaps::ZAP_COLUMNS
            )))
            .bind(id)
            .bind(owner_id)
            .fetch_one(&self.pool)
            .await?;
            row.try_into()
        }

        /// Up to `limit` zaps in creation order, after the zap `after`.
        pub async fn list_zaps(
            &self,
            owner_id: ::uuid::Uuid,
            after: Option<::uuid::Uuid>,
            limit: u32,
        ) -> $crate::Result<Vec<$crate::Zap>> {
            let rows: Vec<$crate::zaps::ZapRow> = ::sqlx::query_as(::sqlx::AssertSqlSafe(format!(
                "SELECT {} FROM zaps
                 WHERE owner_id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR id > $2)
                 ORDER BY id LIMIT $3",
                $crate::zaps::ZAP_COLUMNS
            )))
            .bind(owner_id)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            rows.into_iter().map($crate::Zap::try_from).collect()
        }

        /// A live zap by id alone: the webhook token is the caller's credential.
        pub async fn zap_for_ingest(&self, id: ::uuid::Uuid) -> $crate::Result<Option<$crate::ZapForIngest>> {
            let row: Option<$crate::zaps::IngestRow> = ::sqlx::query_as(
                "SELECT owner_id, token_hash, status, actions, signing_secret FROM zaps
                 WHERE id = $1 AND deleted_at IS NULL",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
            row.map($crate::ZapForIngest::try_from).transpose()
        }

        /// A run with its steps, whoever owns it (for workers).
        pub async fn run(&self, id: ::uuid::Uuid) -> $crate::Result<Option<$crate::Run>> {
            self.fetch_run(id, None).await
        }

        /// A run with its steps, if `owner_id` owns it.
        pub async fn owned_run(&self, owner_id: ::uuid::Uuid, id: ::uuid::Uuid) -> $crate::Result<$crate::Run> {
            self.fetch_run(id, Some(owner_id)).await?.ok_or($crate::StoreError::NotFound)
        }

        async fn fetch_run(
            &self,
            id: ::uuid::Uuid,
            owner_id: Option<::uuid::Uuid>,
        ) -> $crate::Result<Option<$crate::Run>> {
            let row: Option<$crate::runs::RunRow> = ::sqlx::query_as(::sqlx::AssertSqlSafe(format!(
                "SELECT {} FROM zap_runs WHERE id = $1 AND ($2 IS NULL OR owner_id = $2)",
                $crate::runs::RUN_COLUMNS
            )))
            .bind(id)
            .bind(owner_id)
            .fetch_optional(&self.pool)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let steps: Vec<$crate::runs::StepRow> = ::sqlx::query_as(
                "SELECT step, action_type, status, attempts, output, error, started_at, finished_at, history
                 FROM zap_run_steps WHERE run_id = $1",
            )
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
            row.into_run(steps).map(Some)
        }

        /// Runs of an owner (optionally of one zap), newest first, without steps.
        pub async fn list_runs(
            &self,
            owner_id: ::uuid::Uuid,
            zap_id: Option<::uuid::Uuid>,
            before: Option<::uuid::Uuid>,
            limit: u32,
            payloads: bool,
        ) -> $crate::Result<$crate::RunPage> {
            let columns = if payloads {
                $crate::runs::RUN_COLUMNS
            } else {
                $crate::runs::RUN_COLUMNS_WITHOUT_PAYLOAD
            };
            let rows: Vec<$crate::runs::RunRow> = ::sqlx::query_as(::sqlx::AssertSqlSafe(format!(
                "SELECT {columns} FROM zap_runs
                 WHERE owner_id = $1 AND ($2 IS NULL OR zap_id = $2) AND ($3 IS NULL OR id < $3)
                 ORDER BY id DESC LIMIT $4"
            )))
            .bind(owner_id)
            .bind(zap_id)
            .bind(before)
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await?;
            $crate::RunPage::from_rows(rows, limit)
        }

        /// Ids of a zap's failed runs not replayed yet, created in `window`,
        /// oldest first, at most `limit`.
        pub async fn failed_runs(
            &self,
            owner_id: ::uuid::Uuid,
            zap_id: ::uuid::Uuid,
            window: &$crate::TimeWindow,
            limit: u32,
        ) -> $crate::Result<Vec<::uuid::Uuid>> {
            let ids: Vec<(::uuid::Uuid,)> = ::sqlx::query_as(
                "SELECT id FROM zap_runs
                 WHERE owner_id = $1 AND zap_id = $2 AND status = 'failed'
                   AND ($3 IS NULL OR created_at >= $3) AND ($4 IS NULL OR created_at < $4)
                   AND NOT EXISTS (SELECT 1 FROM zap_runs AS replay WHERE replay.replay_of = zap_runs.id)
                 ORDER BY created_at, id LIMIT $5",
            )
            .bind(owner_id)
            .bind(zap_id)
            .bind(window.start)
            .bind(window.end)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            Ok(ids.into_iter().map(|(id,)| id).collect())
        }

        /// The replay `original` has (an insert of another one found it).
        async fn existing_replay(&self, original: ::uuid::Uuid) -> $crate::Result<$crate::Replay> {
            let (id,): (::uuid::Uuid,) = ::sqlx::query_as("SELECT id FROM zap_runs WHERE replay_of = $1")
                .bind(original)
                .fetch_one(&self.pool)
                .await?;
            Ok($crate::Replay::Existing(id))
        }

        /// The run a claim of step `stage` works on, with the step's action
        /// type; or the claim's answer when there is no step to take.
        async fn run_to_claim(
            &self,
            run_id: ::uuid::Uuid,
            stage: u32,
        ) -> $crate::Result<Result<($crate::Run, String), $crate::StepClaim>> {
            let Some(run) = self.run(run_id).await? else {
                return Ok(Err($crate::StepClaim::Unknown));
            };
            if run.status.is_final() {
                return Ok(Err($crate::StepClaim::RunFinished));
            }
            let Some(action) = run.actions.get(stage as usize) else {
                return Ok(Err($crate::StepClaim::Unknown));
            };
            let action_type = action.action_type.clone();
            Ok(Ok((run, action_type)))
        }

        /// An owner's dead letters (optionally of one zap), newest first.
        pub async fn list_dead_letters(
            &self,
            owner_id: ::uuid::Uuid,
            zap_id: Option<::uuid::Uuid>,
            before: Option<::uuid::Uuid>,
            limit: u32,
        ) -> $crate::Result<$crate::DeadLetterPage> {
            let rows: Vec<$crate::dead_letters::DeadLetterRow> = ::sqlx::query_as(
                "SELECT id, zap_id, run_id, step, reason, created_at FROM zap_dead_letters
                 WHERE owner_id = $1 AND ($2 IS NULL OR zap_id = $2) AND ($3 IS NULL OR id < $3)
                 ORDER BY id DESC LIMIT $4",
            )
            .bind(owner_id)
            .bind(zap_id)
            .bind(before)
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await?;
            Ok($crate::DeadLetterPage::from_rows(rows, limit))
        }

        /// Deletes the outbox rows announcing dead letters, for deployments
        /// without a broker to announce them to; returns how many.
        pub async fn discard_dead_letter_announcements(&self) -> $crate::Result<u64> {
            let done = ::sqlx::query("DELETE FROM zap_run_outbox WHERE kind = 'dead_letter'")
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        }

        /// Deletes dead letters recorded before `cutoff`; returns how many.
        pub async fn purge_dead_letters(
            &self,
            cutoff: ::chrono::DateTime<::chrono::Utc>,
        ) -> $crate::Result<u64> {
            let done = ::sqlx::query("DELETE FROM zap_dead_letters WHERE created_at < $1")
                .bind(cutoff)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        }

        /// Counts outbox rows (due or not).
        pub async fn outbox_len(&self) -> $crate::Result<i64> {
            let (count,): (i64,) = ::sqlx::query_as("SELECT count(*) FROM zap_run_outbox")
                .fetch_one(&self.pool)
                .await?;
            Ok(count)
        }
    };
}

pub(crate) use portable_queries;
