//! Dead letters: steps that failed for good (a permanent error, or their
//! retries used up), kept for users to list until the retention ends.

use chrono::{DateTime, Utc};
use uuid::Uuid;

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
pub(crate) struct DeadLetterRow {
    id: Uuid,
    zap_id: Uuid,
    run_id: Uuid,
    step: i32,
    reason: String,
    created_at: DateTime<Utc>,
}

impl DeadLetterPage {
    /// A page from up to `limit + 1` rows: the extra row only tells that
    /// there is a next page.
    pub(crate) fn from_rows(rows: Vec<DeadLetterRow>, limit: u32) -> Self {
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
