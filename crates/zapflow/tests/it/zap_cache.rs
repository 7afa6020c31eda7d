//! Webhooks find their zap in memory, yet a zap changed by another process
//! on the same PostgreSQL database is never served as it was: its change
//! reaches every process, also one whose notifications were cut off.

use std::time::Duration;

use serde_json::json;
use zapflow_core::{ActionSpec, ZapStatus};
use zapflow_store::Store;
use zapflow_testkit::{eventually, test_database_url};

fn email() -> ActionSpec {
    serde_json::from_value(
        json!({"type": "email", "config": {"to": "a@example.com", "subject": "s", "body": "b"}}),
    )
    .unwrap()
}

/// The token hash `store` would check a webhook of `zap` against.
async fn token_seen(store: &Store, zap: uuid::Uuid) -> Option<Vec<u8>> {
    let zap = store.zap_for_ingest(zap).await.unwrap()?;
    (zap.status == ZapStatus::Active).then(|| zap.token_hash.clone())
}

#[tokio::test]
async fn a_zap_changed_elsewhere_is_never_served_as_it_was() {
    let url = test_database_url().await;
    let here = Store::open(&url, 4).await.unwrap();
    here.migrate().await.unwrap();
    let there = Store::open(&url, 4).await.unwrap();
    let (owner, _) = there.create_user("alice").await.unwrap();
    let zap = there
        .create_zap(owner, "z", &[email()], b"first", None)
        .await
        .unwrap()
        .id;
    let pool = here.postgres().unwrap().clone();
    let listening = || async {
        let (count,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'LISTEN%zapflow_zaps%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        (count == 1).then_some(())
    };

    // Read (and kept) here once this process listens for changes.
    assert_eq!(token_seen(&here, zap).await.as_deref(), Some(&b"first"[..]));
    eventually("the zap listener", Duration::from_secs(10), listening).await;
    assert_eq!(token_seen(&here, zap).await.as_deref(), Some(&b"first"[..]));

    there.set_zap_token(owner, zap, b"second").await.unwrap();
    eventually("the new token here", Duration::from_secs(5), || async {
        (token_seen(&here, zap).await.as_deref() == Some(&b"second"[..])).then_some(())
    })
    .await;

    // Notifications cut off: what changes meanwhile is read, not remembered.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%zapflow_zaps%'",
    )
    .execute(&pool)
    .await
    .unwrap();
    there
        .set_zap_status(owner, zap, ZapStatus::Paused)
        .await
        .unwrap();
    eventually("the pause here", Duration::from_secs(5), || async {
        token_seen(&here, zap).await.is_none().then_some(())
    })
    .await;
    eventually("the zap listener back", Duration::from_secs(10), listening).await;
    there
        .set_zap_status(owner, zap, ZapStatus::Active)
        .await
        .unwrap();
    there.delete_zap(owner, zap).await.unwrap();
    eventually("the deletion here", Duration::from_secs(5), || async {
        token_seen(&here, zap).await.is_none().then_some(())
    })
    .await;
}
