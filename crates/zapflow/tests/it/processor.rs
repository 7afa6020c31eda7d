//! The outbox relay: every row reaches the broker, none is lost.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use zapflow_bus::BusSettings;
use zapflow_processor::{Relay, RelayPass, RelaySettings};
use zapflow_store::Store;
use zapflow_testkit::{test_bus, test_store, unique};

/// A PostgreSQL store of this test's own: the relay needs PostgreSQL.
async fn pg_store() -> Store {
    let store = test_store().await;
    assert!(store.postgres().is_some(), "the relay needs PostgreSQL");
    store
}

async fn insert_outbox_rows(store: &Store, count: i64) {
    sqlx::query(
        "INSERT INTO zap_run_outbox (event_id, run_id, zap_id, stage, kind)
         SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 0, 'step'
         FROM generate_series(1, $1)",
    )
    .bind(count)
    .execute(store.postgres().unwrap())
    .await
    .unwrap();
}

fn relay(store: &Store, bus: &BusSettings, delivery_timeout: Duration) -> Relay {
    let settings = RelaySettings {
        batch_size: 250,
        poll_interval: Duration::from_millis(100),
        delivery_timeout,
    };
    Relay::new(store.clone(), bus.clone(), settings).unwrap()
}

/// A pass that delivered `delivered` of the `claimed` rows.
fn passed(delivered: usize, claimed: usize) -> RelayPass {
    RelayPass { claimed, delivered }
}

/// Reads `expected` messages from the events topic; returns their event ids.
async fn read_events(bus: &BusSettings, expected: usize) -> Vec<String> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bus.brokers)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&bus.events_topic]).unwrap();
    let mut ids = Vec::new();
    while ids.len() < expected {
        let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {expected} events arrived", ids.len()))
            .unwrap();
        ids.push(
            zapflow_bus::decode(message.payload().unwrap())
                .unwrap()
                .id
                .to_string(),
        );
    }
    // Nothing beyond what was expected.
    let extra = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await;
    assert!(extra.is_err(), "more events than rows");
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processors_relay_every_row_exactly_once() {
    let store = pg_store().await;
    let bus = test_bus(3).await;
    const ROWS: i64 = 3000;
    insert_outbox_rows(&store, ROWS).await;
    let (expected,): (Vec<uuid::Uuid>,) =
        sqlx::query_as("SELECT array_agg(event_id) FROM zap_run_outbox")
            .fetch_one(store.postgres().unwrap())
            .await
            .unwrap();

    let relays = [
        relay(&store, &bus, Duration::from_secs(30)),
        relay(&store, &bus, Duration::from_secs(30)),
    ];
    let passes = relays.iter().map(|relay| async move {
        let mut delivered = 0;
        loop {
            let pass = relay.relay_once().await.unwrap();
            delivered += pass.delivered;
            if pass.claimed == 0 {
                return delivered;
            }
        }
    });
    let delivered: Vec<usize> = futures::future::join_all(passes).await;
    assert_eq!(
        delivered.iter().sum::<usize>(),
        ROWS as usize,
        "{delivered:?}"
    );
    assert!(
        delivered.iter().all(|&n| n > 0),
        "both processors took part: {delivered:?}"
    );
    assert_eq!(store.outbox_len().await.unwrap(), 0);

    let ids = read_events(&bus, ROWS as usize).await;
    let unique_ids: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique_ids.len(), ROWS as usize, "no event relayed twice");
    let expected: HashSet<String> = expected.iter().map(ToString::to_string).collect();
    assert_eq!(unique_ids, expected.iter().collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_stay_when_the_broker_is_unreachable() {
    let store = pg_store().await;
    let unreachable = BusSettings {
        brokers: "127.0.0.1:1".into(),
        events_topic: unique("zap-events"),
        dead_letter_topic: unique("zap-events-dlq"),
        partitions: 1,
    };
    insert_outbox_rows(&store, 5).await;
    let relay = relay(&store, &unreachable, Duration::from_secs(2));
    assert_eq!(relay.relay_once().await.unwrap(), passed(0, 5));
    assert_eq!(
        store.outbox_len().await.unwrap(),
        5,
        "nothing deleted without an ack"
    );

    // Once a broker answers, the same rows go out.
    let bus = test_bus(1).await;
    let relay = self::relay(&store, &bus, Duration::from_secs(30));
    assert_eq!(relay.relay_once().await.unwrap(), passed(5, 5));
    assert_eq!(store.outbox_len().await.unwrap(), 0);
    assert_eq!(read_events(&bus, 5).await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_stops_promptly_at_shutdown_while_full_batches_keep_coming() {
    const BACKLOG: i64 = 100_000;
    let store = pg_store().await;
    let bus = test_bus(3).await;
    insert_outbox_rows(&store, BACKLOG).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let relay = tokio::spawn(relay(&store, &bus, Duration::from_secs(30)).run(shutdown.clone()));
    zapflow_testkit::eventually("the first batches", Duration::from_secs(60), || async {
        (store.outbox_len().await.unwrap() < BACKLOG).then_some(())
    })
    .await;

    shutdown.cancel();
    // A pass under way finishes (its delivery reports are awaited); none
    // starts after shutdown.
    tokio::time::timeout(Duration::from_secs(15), relay)
        .await
        .expect("the relay stops within a pass of shutdown")
        .unwrap();
    let left = store.outbox_len().await.unwrap();
    assert!(
        left > BACKLOG / 2,
        "it stopped, not drained the backlog: {left} rows left"
    );
}

/// A transaction that took a lower outbox id but commits after a higher one
/// is still relayed: there is no "id > last seen" cursor to skip it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lower_id_committed_later_is_still_relayed() {
    let store = pg_store().await;
    let bus = test_bus(1).await;
    let relay = relay(&store, &bus, Duration::from_secs(10));

    let mut late = store.postgres().unwrap().begin().await.unwrap();
    let (late_id,): (i64,) = sqlx::query_as(
        "INSERT INTO zap_run_outbox (event_id, run_id, zap_id, stage, kind)
         VALUES (gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 0, 'step')
         RETURNING id",
    )
    .fetch_one(&mut *late)
    .await
    .unwrap();
    insert_outbox_rows(&store, 1).await;
    assert_eq!(
        relay.relay_once().await.unwrap(),
        passed(1, 1),
        "the committed row"
    );

    late.commit().await.unwrap();
    assert_eq!(
        relay.relay_once().await.unwrap(),
        passed(1, 1),
        "the late one"
    );
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM zap_run_outbox")
        .fetch_one(store.postgres().unwrap())
        .await
        .unwrap();
    assert_eq!(left, 0, "row {late_id} was relayed and deleted too");
    assert_eq!(read_events(&bus, 2).await.len(), 2);
}

/// The relay's LISTEN connection is killed: rows are still relayed, within
/// the poll interval at worst, and notifications come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_listen_connection_falls_back_to_polling() {
    let store = pg_store().await;
    let bus = test_bus(1).await;
    let relay = relay(&store, &bus, Duration::from_secs(10));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    let outbox_empty = || async {
        let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM zap_run_outbox")
            .fetch_one(store.postgres().unwrap())
            .await
            .unwrap();
        (left == 0).then_some(())
    };

    zapflow_testkit::eventually("the relay to listen", Duration::from_secs(10), || async {
        let (listening,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .fetch_one(store.postgres().unwrap())
        .await
        .unwrap();
        (listening > 0).then_some(())
    })
    .await;
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .execute(store.postgres().unwrap())
    .await
    .unwrap();
    for round in 1..=3 {
        insert_outbox_rows(&store, 5).await;
        zapflow_testkit::eventually(
            &format!("round {round} relayed"),
            Duration::from_secs(10),
            outbox_empty,
        )
        .await;
    }
    assert_eq!(read_events(&bus, 15).await.len(), 15);
    shutdown.cancel();
    running.await.unwrap();
}
