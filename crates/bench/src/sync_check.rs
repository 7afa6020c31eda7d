//! What the machine's storage allows at best, measured before the
//! deployment starts: one-row commits, each synced to disk before the next
//! begins, as a webhook sent alone waits for its own. A deployment's
//! accepted/s at concurrency 1 stays below this rate (its commits write more
//! than one row), so the figure tells a slow disk from a slow zapflow when
//! runs on different machines disagree.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sqlx::Connection;

/// Commits timed for the figure.
pub const COMMITS: u32 = 1_000;

/// How fast one-row commits followed each other.
#[derive(Debug, Clone, Copy)]
pub struct CommitRate {
    pub store: &'static str,
    pub commits: u32,
    pub elapsed: Duration,
}

impl CommitRate {
    pub fn per_second(self) -> f64 {
        f64::from(self.commits) / self.elapsed.as_secs_f64()
    }

    pub fn each(self) -> Duration {
        self.elapsed / self.commits.max(1)
    }
}

/// `commits` one-row commits to a new SQLite file in `dir`, in WAL mode with
/// `synchronous=FULL` as the embedded store writes; the file is removed.
pub fn sqlite(dir: &Path, commits: u32) -> Result<CommitRate> {
    let path = dir.join("sync-check.db");
    let timed = sqlite_commits(&path, commits)
        .with_context(|| format!("timing commits to {}", path.display()));
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
    Ok(CommitRate {
        store: "SQLite (WAL, synchronous=FULL)",
        commits,
        elapsed: timed?,
    })
}

fn sqlite_commits(path: &Path, commits: u32) -> rusqlite::Result<Duration> {
    let connection = rusqlite::Connection::open(path)?;
    connection.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE sync_check (id INTEGER PRIMARY KEY, body BLOB);",
    )?;
    let mut insert =
        connection.prepare("INSERT INTO sync_check (body) VALUES (randomblob(100))")?;
    let started = Instant::now();
    for _ in 0..commits {
        insert.execute([])?;
    }
    Ok(started.elapsed())
}

/// `commits` one-row commits over one connection to the PostgreSQL database
/// at `url`, into a table of their own, dropped afterwards (a temporary
/// table would skip the write-ahead log and its sync).
pub async fn postgres(url: &str, commits: u32) -> Result<CommitRate> {
    let mut connection = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let timed = postgres_commits(&mut connection, commits).await;
    sqlx::query("DROP TABLE IF EXISTS zapflow_bench_sync_check")
        .execute(&mut connection)
        .await?;
    Ok(CommitRate {
        store: "PostgreSQL (one connection)",
        commits,
        elapsed: timed.context("timing commits to PostgreSQL")?,
    })
}

async fn postgres_commits(
    connection: &mut sqlx::PgConnection,
    commits: u32,
) -> sqlx::Result<Duration> {
    sqlx::query("CREATE TABLE zapflow_bench_sync_check (id bigserial PRIMARY KEY, body text)")
        .execute(&mut *connection)
        .await?;
    let started = Instant::now();
    for _ in 0..commits {
        sqlx::query("INSERT INTO zapflow_bench_sync_check (body) VALUES (repeat('x', 100))")
            .execute(&mut *connection)
            .await?;
    }
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use zapflow_testkit::unique;

    use super::*;

    #[test]
    fn times_sqlite_commits_and_leaves_no_file_behind() {
        let dir = std::env::temp_dir().join(unique("sync-check"));
        std::fs::create_dir_all(&dir).unwrap();
        let rate = sqlite(&dir, 20).unwrap();
        assert_eq!(rate.commits, 20);
        assert!(
            rate.per_second() > 0.0 && rate.each() > Duration::ZERO,
            "{rate:?}"
        );
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "files left behind: {left:?}");
        std::fs::remove_dir(&dir).unwrap();
    }

    #[tokio::test]
    async fn times_postgres_commits_and_drops_its_table() {
        let url = zapflow_testkit::test_database_url().await;
        let rate = postgres(&url, 20).await.unwrap();
        assert_eq!(rate.commits, 20);
        assert!(rate.per_second() > 0.0, "{rate:?}");
        let mut connection = sqlx::PgConnection::connect(&url).await.unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'zapflow_bench_sync_check'",
        )
        .fetch_one(&mut connection)
        .await
        .unwrap();
        assert_eq!(tables, 0, "the table is dropped");
    }
}
