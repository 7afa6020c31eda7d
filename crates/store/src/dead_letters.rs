//! Dead letters: steps that failed for good (a permanent error, or their
//! retries used up), kept for users to list until the retention ends.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::db::from_sqlite;
use crate::{Result, Store};

/// One step that failed for good.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Also the id of the event that announced it on the dead-letter topic.
    pub id: Uuid,
    pub zap_id: Uuid,
    pub run_id: Uuid,
    pub step: u32,
    pub reason: String,
    pub created_at: DateTime<Utc>,
}

/// One page of dead letters, newest first, and the id to continue before.
#[derive(Debug, Clone)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetter>,
    pub next_before: Option<Uuid>,
}

#[derive(sqlx::FromRow)]
struct DeadLetterRow {
    id: Uuid,
    zap_id: Uuid,
    run_id: Uuid,
    step: i32,
    reason: String,
    created_at: DateTime<Utc>,
}

from_sqlite!(DeadLetterRow {
    id,
    zap_id,
    run_id,
    step,
    reason,
    created_at
});

impl DeadLetterPage {
    /// A page from up to `limit + 1` rows: the extra row only tells that
    /// there is a next page.
    fn from_rows(rows: Vec<DeadLetterRow>, limit: u32) -> Self {
        let more = rows.len() > limit as usize;
        let dead_letters: Vec<DeadLetter> = rows
            .into_iter()
            .take(limit as usize)
            .map(|row| DeadLetter {
                id: row.id,
                zap_id: row.zap_id,
                run_id: row.run_id,
                step: row.step as u32,
                reason: row.reason,
                created_at: row.created_at,
            })
            .collect();
        let next_before = more
            .then(|| dead_letters.last().map(|last| last.id))
            .flatten();
        Self {
            dead_letters,
            next_before,
        }
    }
}

impl Store {
    /// An owner's dead letters (optionally of one zap), newest first.
    pub async fn list_dead_letters(
        &self,
        owner_id: Uuid,
        zap_id: Option<Uuid>,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<DeadLetterPage> {
        let rows: Vec<DeadLetterRow> = self
            .db
            .reader()
            .fetch_all(
                "SELECT id, zap_id, run_id, step, reason, created_at FROM zap_dead_letters
                 WHERE owner_id = $1 AND ($2 IS NULL OR zap_id = $2) AND ($3 IS NULL OR id < $3)
                 ORDER BY id DESC LIMIT $4",
                &[
                    owner_id.into(),
                    zap_id.into(),
                    before.into(),
                    (i64::from(limit) + 1).into(),
                ],
            )
            .await?;
        Ok(DeadLetterPage::from_rows(rows, limit))
    }

    /// Deletes dead letters recorded before `cutoff`; returns how many.
    pub async fn purge_dead_letters(&self, cutoff: DateTime<Utc>) -> Result<u64> {
        self.db
            .execute(
                "DELETE FROM zap_dead_letters WHERE created_at < $1",
                &[cutoff.into()],
            )
            .await
    }
}
