//! The embedded deployment keeps everything across a restart.

use std::time::Duration;

use serde_json::json;
use zapflow_proto::v1 as pb;
use zapflow_store::Store;
use zapflow_testkit::{SmtpSink, SqliteTestStore, Stack, StackOptions, test_sqlite_store};

use crate::support::{create_zap, email_action, new_user, post_json, wait_for_run};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_accepted_before_a_restart_finish_after_it_exactly_once() {
    let smtp = SmtpSink::start().await;
    let SqliteTestStore { store, path } = test_sqlite_store().await;
    let options = |workers| StackOptions {
        smtp_url: Some(smtp.url()),
        workers,
        ..StackOptions::default()
    };

    // Before: webhooks are accepted, but no worker runs them yet.
    let before = Stack::start(store, None, options(0)).await;
    let key = new_user(&before, "ada").await;
    let (_, webhook_url) = create_zap(
        &before,
        &key,
        vec![email_action("{{ trigger.to }}", "n={{ trigger.n }}", "b")],
    )
    .await;
    let mut run_ids = Vec::new();
    for n in 0..3 {
        let (status, answer) = post_json(
            &webhook_url,
            &json!({"to": format!("r{n}@example.com"), "n": n}),
        )
        .await;
        assert_eq!(status, 202);
        run_ids.push(answer["run_id"].as_str().unwrap().to_owned());
    }
    before.stop().await;
    assert!(smtp.mails().is_empty());

    // After: the same file, now with a worker.
    let store = Store::open_file(&path).await.unwrap();
    assert_eq!(
        store.outbox_len().await.unwrap(),
        3,
        "undelivered work survived"
    );
    let after = Stack::start(store, None, options(1)).await;
    for run_id in &run_ids {
        wait_for_run(&after, &key, run_id, pb::RunStatus::Succeeded).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        smtp.sorted_subjects(),
        ["n=0", "n=1", "n=2"],
        "each run's email exactly once"
    );
    // The zap and its token survived too (the gateway's port is new).
    let path = webhook_url.split_once("/hooks/").unwrap().1;
    let moved = format!("{}/hooks/{path}", after.http_url());
    assert_eq!(
        post_json(&moved, &json!({"to": "x@example.com", "n": 9}))
            .await
            .0,
        202
    );
    after.stop().await;
}

/// A 202 from the embedded deployment is a promise that survives a power
/// loss, not only a killed process: every commit is synced (FULL), unless
/// the operator chose otherwise.
#[tokio::test]
async fn the_embedded_database_syncs_every_commit_by_default() {
    let path = std::env::temp_dir().join(format!("zapflow-sync-{}.db", uuid::Uuid::new_v4()));
    let synchronous = |store: Store| async move {
        let (level,): (i64,) = sqlx::query_as("PRAGMA synchronous")
            .fetch_one(store.sqlite().expect("an SQLite file"))
            .await
            .unwrap();
        level
    };
    assert_eq!(
        synchronous(Store::open_file(&path).await.unwrap()).await,
        2,
        "FULL"
    );
    let relaxed = Store::open_file_with(&path, zapflow_store::Durability::ProcessCrash)
        .await
        .unwrap();
    assert_eq!(synchronous(relaxed).await, 1, "NORMAL");
}
