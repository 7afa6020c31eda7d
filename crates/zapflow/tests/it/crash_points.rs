//! Named crash points of the pipeline, each injected where it happens, and
//! the invariant after it: every accepted webhook has exactly one run, and
//! no step's effect happens twice because of a redelivery.

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use zapflow_bus::BusSettings;
use zapflow_proto::v1 as pb;
use zapflow_testkit::{SmtpSink, Stack, StackOptions, test_bus, test_store, unique};

use crate::support::{
    WAIT, count_runs, create_zap, email_action, new_user, post_json, wait_for_run,
};

fn options(smtp: &SmtpSink) -> StackOptions {
    StackOptions {
        smtp_url: Some(smtp.url()),
        ..StackOptions::default()
    }
}

/// Every message of `topic` until none comes for two seconds.
async fn read_topic(bus: &BusSettings, topic: &str) -> Vec<rdkafka::message::OwnedMessage> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bus.brokers)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut messages = Vec::new();
    let mut wait = Duration::from_secs(30);
    while let Ok(message) = tokio::time::timeout(wait, consumer.recv()).await {
        messages.push(message.unwrap().detach());
        wait = Duration::from_secs(2);
    }
    messages
}

async fn produce(bus: &BusSettings, topic: &str, key: &str, payload: &[u8]) {
    let producer: FutureProducer = bus.producer(Duration::from_secs(10)).unwrap();
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn between_insert_and_commit_no_run_is_left_and_the_retry_makes_exactly_one() {
    let smtp = SmtpSink::start().await;
    let stack = Stack::start(test_store().await, None, options(&smtp)).await;
    let key = new_user(&stack, "ada").await;
    let (_, url) = create_zap(
        &stack,
        &key,
        vec![email_action("r@example.com", "once", "b")],
    )
    .await;
    let pool = stack.store.postgres().unwrap().clone();

    // A deferred trigger fails every transaction at COMMIT, after the run
    // and its outbox row were inserted: the moment a crash would hit.
    sqlx::raw_sql(
        "CREATE FUNCTION crash_at_commit() RETURNS trigger AS $$
         BEGIN RAISE EXCEPTION 'injected crash before commit'; END $$ LANGUAGE plpgsql;
         CREATE CONSTRAINT TRIGGER crash_at_commit AFTER INSERT ON zap_run_outbox
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION crash_at_commit();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let send = || {
        reqwest::Client::new()
            .post(&url)
            .header("content-type", "application/json")
            .header("idempotency-key", "order-1")
            .body("{}")
            .send()
    };
    let failed = send().await.unwrap();
    assert!(failed.status().is_server_error(), "{}", failed.status());
    assert_eq!(
        count_runs(&stack).await,
        0,
        "nothing of the delivery is left"
    );
    assert_eq!(stack.store.outbox_len().await.unwrap(), 0);

    // The sender retries once the fault is gone.
    sqlx::raw_sql("DROP TRIGGER crash_at_commit ON zap_run_outbox")
        .execute(&pool)
        .await
        .unwrap();
    let accepted = send().await.unwrap();
    assert_eq!(accepted.status(), 202);
    let run_id = accepted.json::<serde_json::Value>().await.unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_run(&stack, &key, &run_id, pb::RunStatus::Succeeded).await;
    assert_eq!(count_runs(&stack).await, 1);
    assert_eq!(smtp.mails().len(), 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_the_broker_ack_and_before_the_delete_the_event_comes_twice_and_runs_once() {
    let smtp = SmtpSink::start().await;
    let store = test_store().await;
    let bus = test_bus(1).await;
    // No processor: this test relays by hand.
    let no_relay = StackOptions {
        processors: 0,
        ..options(&smtp)
    };
    let stack = Stack::start(store.clone(), Some(bus.clone()), no_relay).await;
    let key = new_user(&stack, "ada").await;
    let (_, url) = create_zap(
        &stack,
        &key,
        vec![email_action("r@example.com", "once", "b")],
    )
    .await;
    let run_id = post_json(&url, &json!({})).await.1["run_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The relay produced the row's event and the broker acknowledged it,
    // then the relay died before deleting the row...
    let claim = store.claim_due_outbox_rows(10).await.unwrap();
    assert_eq!(claim.rows.len(), 1);
    let event = zapflow_bus::Event::from(&claim.rows[0]);
    claim.finish(&[]).await.unwrap();
    produce(
        &bus,
        &bus.events_topic,
        &event.run_id.to_string(),
        &zapflow_bus::encode(&event),
    )
    .await;
    // ...so the next relay sends it again.
    let settings = zapflow_processor::RelaySettings {
        batch_size: 10,
        poll_interval: Duration::from_millis(100),
        delivery_timeout: Duration::from_secs(10),
    };
    let relay = zapflow_processor::Relay::new(store.clone(), bus.clone(), settings).unwrap();
    assert_eq!(
        relay.relay_once().await.unwrap(),
        zapflow_processor::RelayPass {
            claimed: 1,
            delivered: 1
        }
    );

    let run = wait_for_run(&stack, &key, &run_id, pb::RunStatus::Succeeded).await;
    let delivered = read_topic(&bus, &bus.events_topic).await;
    let copies = delivered
        .iter()
        .filter(|message| zapflow_bus::decode(message.payload().unwrap()).unwrap().id == event.id)
        .count();
    assert_eq!(copies, 2, "the event was on the topic twice");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(smtp.mails().len(), 1, "and its email went out once");
    assert_eq!(run.steps[0].attempts, 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_receiving_and_before_acting_the_event_is_delivered_again() {
    let smtp = SmtpSink::start().await;
    let bus = test_bus(1).await;
    let group = unique("zapflow-workers");
    let no_worker = StackOptions {
        workers: 0,
        ..options(&smtp)
    };
    let stack = Stack::start(test_store().await, Some(bus.clone()), no_worker).await;
    let key = new_user(&stack, "ada").await;
    let (_, url) = create_zap(
        &stack,
        &key,
        vec![email_action("r@example.com", "once", "b")],
    )
    .await;
    let run_id = post_json(&url, &json!({})).await.1["run_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // A worker of the group receives the event and dies before acting: it
    // never stores the offset.
    {
        let doomed = bus.consumer(&group, Duration::from_secs(60)).unwrap();
        let message = tokio::time::timeout(WAIT, doomed.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            zapflow_bus::decode(message.payload().unwrap())
                .unwrap()
                .run_id
                .to_string(),
            run_id
        );
    }
    assert!(smtp.mails().is_empty());

    // The next member of the group gets it again and runs it.
    let workers = StackOptions {
        processors: 0,
        consumer_group: Some(group),
        ..options(&smtp)
    };
    let next = Stack::start(stack.store.clone(), Some(bus), workers).await;
    wait_for_run(&stack, &key, &run_id, pb::RunStatus::Succeeded).await;
    assert_eq!(smtp.mails().len(), 1);
    next.stop().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_event_is_dead_lettered_and_its_partition_keeps_flowing() {
    let smtp = SmtpSink::start().await;
    let bus = test_bus(1).await;
    let stack = Stack::start(test_store().await, Some(bus.clone()), options(&smtp)).await;
    let key = new_user(&stack, "ada").await;
    let (_, url) = create_zap(
        &stack,
        &key,
        vec![email_action("r@example.com", "after", "b")],
    )
    .await;

    produce(
        &bus,
        &bus.events_topic,
        "garbage",
        b"\xff\xffnot a protobuf event",
    )
    .await;
    let run_id = post_json(&url, &json!({})).await.1["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_run(&stack, &key, &run_id, pb::RunStatus::Succeeded).await;
    assert_eq!(smtp.mails().len(), 1, "the event behind the poison ran");

    let dead = read_topic(&bus, &bus.dead_letter_topic).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].payload().unwrap(),
        b"\xff\xffnot a protobuf event",
        "dead-lettered as it came"
    );
    let headers = dead[0].headers().unwrap();
    let reason = headers
        .iter()
        .find(|header| header.key == "zapflow-dead-letter-reason")
        .unwrap();
    let reason = String::from_utf8_lossy(reason.value.unwrap());
    assert!(reason.contains("undecodable"), "{reason}");
    stack.stop().await;
}
