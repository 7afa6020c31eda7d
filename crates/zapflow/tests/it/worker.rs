//! The worker's step state makes redeliveries harmless.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;
use zapflow_actions::{EmailSettings, Executor, Mailer, StepRef};
use zapflow_bus::{Event, EventKind};
use zapflow_core::ActionSpec;
use zapflow_core::retry::RetryPolicy;
use zapflow_store::{NewRun, StepClaim, StepOutcome, Store};
use zapflow_testkit::{SmtpSink, test_store};
use zapflow_worker::{Handled, Worker, WorkerSettings};

fn worker(store: &Store, smtp: &SmtpSink) -> Worker {
    worker_with(store, smtp, WorkerSettings::default())
}

fn worker_with(store: &Store, smtp: &SmtpSink, settings: WorkerSettings) -> Worker {
    let mailer = Mailer::new(&EmailSettings {
        smtp_url: Some(smtp.url()),
        mailbox_dir: std::env::temp_dir(),
        from: "zapflow@localhost".into(),
        timeout: Duration::from_secs(5),
        max_recipients: zapflow_actions::DEFAULT_MAX_RECIPIENTS,
    })
    .unwrap();
    Worker::new(store.clone(), Executor::new(mailer), settings)
}

/// A run of a one-email zap, recorded as ingestion would; returns its first
/// step's event.
async fn accepted_run(store: &Store) -> Event {
    let (owner_id, _) = store.create_user("alice").await.unwrap();
    let action: ActionSpec = serde_json::from_value(json!({
        "type": "email",
        "config": {"to": "{{ trigger.to }}", "subject": "once", "body": "only once"}
    }))
    .unwrap();
    let zap = store
        .create_zap(
            owner_id,
            "zap",
            std::slice::from_ref(&action),
            b"hash",
            None,
        )
        .await
        .unwrap();
    let run = NewRun {
        id: Uuid::now_v7(),
        zap_id: zap.id,
        owner_id,
        trigger: json!({"to": "bob@example.com"}),
        headers: json!({}),
        query: json!({}),
        actions: vec![action],
        idempotency_key: None,
        trace_parent: None,
        scheduled_time: None,
    };
    store.insert_runs(std::slice::from_ref(&run)).await.unwrap();
    step_event(run.id, zap.id)
}

/// The event of step 0 of run `run_id`.
fn step_event(run_id: Uuid, zap_id: Uuid) -> Event {
    Event {
        id: Uuid::new_v4(),
        run_id,
        zap_id,
        stage: 0,
        kind: EventKind::Step,
        created_at: Default::default(),
        trace_parent: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_twice_sends_one_email() {
    let store = test_store().await;
    let smtp = SmtpSink::start().await;
    let worker = worker(&store, &smtp);
    let event = accepted_run(&store).await;

    let first = worker.execute(&event).await.unwrap();
    assert!(
        matches!(first, Handled::Ran(StepOutcome::Succeeded(_))),
        "{first:?}"
    );
    let second = worker.execute(&event).await.unwrap();
    assert_eq!(second, Handled::Duplicate);

    assert_eq!(smtp.mails().len(), 1);
    assert_eq!(smtp.mails()[0].recipients, ["bob@example.com"]);
    let run = store.run(event.run_id).await.unwrap().unwrap();
    assert_eq!(run.status, zapflow_core::RunStatus::Succeeded);
    assert_eq!(run.steps[0].attempts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_for_an_unknown_run_is_dead_lettered() {
    let store = test_store().await;
    let smtp = SmtpSink::start().await;
    let worker = worker(&store, &smtp);
    let event = step_event(Uuid::new_v4(), Uuid::new_v4());
    let handled = worker.execute(&event).await.unwrap();
    assert!(matches!(handled, Handled::DeadLettered(_)), "{handled:?}");
    let (kind, reason): (String, String) =
        sqlx::query_as("SELECT kind, reason FROM zap_run_outbox")
            .fetch_one(store.postgres().unwrap())
            .await
            .unwrap();
    assert_eq!(kind, "dead_letter");
    assert!(reason.contains(&event.run_id.to_string()));
    assert!(smtp.mails().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smtp_server_that_says_try_later_schedules_a_retry() {
    let store = test_store().await;
    let smtp = SmtpSink::start().await;
    smtp.reject_recipients(Some("451 4.3.0 try again later"));
    let worker = worker(&store, &smtp);
    let event = accepted_run(&store).await;

    let handled = worker.execute(&event).await.unwrap();
    let Handled::Ran(StepOutcome::Retry { error, delay }) = handled else {
        panic!("expected a retry, got {handled:?}");
    };
    assert!(
        error.contains("451") || error.contains("try again"),
        "{error}"
    );
    assert!(delay >= Duration::from_secs(1));
    // Besides the accepted run's first event (never relayed here), the
    // retry waits in the outbox until its time comes.
    let (delayed,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM zap_run_outbox WHERE available_at > now()")
            .fetch_one(store.postgres().unwrap())
            .await
            .unwrap();
    assert_eq!(delayed, 1);
    let run = store.run(event.run_id).await.unwrap().unwrap();
    assert_eq!(run.steps[0].status, zapflow_core::StepStatus::Retrying);
    assert_eq!(run.steps[0].error.as_deref(), Some(error.as_str()));

    // The server accepts again, but an event that comes before the retry
    // is due (a duplicate) leaves the step alone...
    smtp.reject_recipients(None);
    assert_eq!(worker.execute(&event).await.unwrap(), Handled::NotDue);
    assert!(smtp.mails().is_empty());
    let run = store.run(event.run_id).await.unwrap().unwrap();
    assert_eq!(run.steps[0].attempts, 1);
    // ...and the retry succeeds once due.
    tokio::time::sleep(delay).await;
    let handled = worker.execute(&event).await.unwrap();
    assert!(
        matches!(handled, Handled::Ran(StepOutcome::Succeeded(_))),
        "{handled:?}"
    );
    let run = store.run(event.run_id).await.unwrap().unwrap();
    assert_eq!(run.steps[0].attempts, 2);
    assert_eq!(smtp.mails().len(), 1);
}

/// The documented policy for a worker that dies after the SMTP server said
/// 250 but before the step was recorded: the step's lease runs out, another
/// attempt sends the email again, with the same Message-ID, and the step is
/// recorded once. At least once, never silently lost; the receiver can
/// drop the repeat by its Message-ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_smtp_250_resends_once_with_the_same_message_id() {
    let store = test_store().await;
    let smtp = SmtpSink::start().await;
    let event = accepted_run(&store).await;
    let run_id = event.run_id;

    // The doomed worker: claims with a short lease, sends, and dies before
    // recording anything.
    let StepClaim::Claimed(step) = store
        .claim_step(
            run_id,
            0,
            // Long enough to outlast the send below on a loaded machine.
            Duration::from_secs(2),
            &RetryPolicy::default(),
        )
        .await
        .unwrap()
    else {
        panic!("the first claim takes the step");
    };
    let mailer = Mailer::new(&EmailSettings {
        smtp_url: Some(smtp.url()),
        mailbox_dir: std::env::temp_dir(),
        from: "zapflow@localhost".into(),
        timeout: Duration::from_secs(5),
        max_recipients: zapflow_actions::DEFAULT_MAX_RECIPIENTS,
    })
    .unwrap();
    let context = json!({"trigger": step.run.trigger});
    Executor::new(mailer)
        .execute(&step.run.actions[0], &context, StepRef { run_id, stage: 0 })
        .await
        .unwrap();
    assert_eq!(smtp.mails().len(), 1);

    // The event comes again (its offset or outbox row was never released).
    // While the lease holds, the step is left alone and looked at later...
    let worker = worker(&store, &smtp);
    assert_eq!(worker.execute(&event).await.unwrap(), Handled::Rescheduled);
    assert_eq!(smtp.mails().len(), 1);
    // ...and once it lapsed, the step runs again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let handled = worker.execute(&event).await.unwrap();
    assert!(
        matches!(handled, Handled::Ran(StepOutcome::Succeeded(_))),
        "{handled:?}"
    );

    let mails = smtp.mails();
    assert_eq!(mails.len(), 2, "the effect is repeated once");
    assert_eq!(mails[0].header("Message-ID"), mails[1].header("Message-ID"));
    assert_eq!(
        mails[0].header("Message-ID").unwrap(),
        format!("<{run_id}.0@zapflow>")
    );
    let run = store.run(run_id).await.unwrap().unwrap();
    assert_eq!(run.status, zapflow_core::RunStatus::Succeeded);
    assert_eq!(run.steps[0].attempts, 2);
    // A further redelivery is a no-op.
    assert_eq!(worker.execute(&event).await.unwrap(), Handled::Duplicate);
    assert_eq!(smtp.mails().len(), 2);
}

/// However a step comes back (an expired lease, a duplicate event, a
/// failed recording), it never runs more than its policy's attempts: past
/// them it fails and dead-letters like an exhausted retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_back_past_its_attempts_is_dead_lettered_without_running() {
    let store = test_store().await;
    let smtp = SmtpSink::start().await;
    let event = accepted_run(&store).await;
    let run_id = event.run_id;
    let two_attempts = RetryPolicy {
        max_attempts: 2,
        ..RetryPolicy::default()
    };

    // Two workers take the step in turn and die before recording.
    for attempt in 1..=2 {
        let StepClaim::Claimed(step) = store
            .claim_step(run_id, 0, Duration::from_millis(50), &two_attempts)
            .await
            .unwrap()
        else {
            panic!("attempt {attempt} is claimed");
        };
        assert_eq!(step.attempt, attempt);
        tokio::time::sleep(Duration::from_millis(80)).await;
    }

    let worker = worker_with(
        &store,
        &smtp,
        WorkerSettings {
            retry: two_attempts,
            ..WorkerSettings::default()
        },
    );
    let handled = worker.execute(&event).await.unwrap();
    let Handled::DeadLettered(reason) = handled else {
        panic!("expected a dead letter, got {handled:?}");
    };
    assert!(reason.contains("gave up after 2 attempts"), "{reason}");
    assert_eq!(worker.execute(&event).await.unwrap(), Handled::Duplicate);
    assert!(smtp.mails().is_empty(), "no third attempt ran");

    let run = store.run(run_id).await.unwrap().unwrap();
    assert_eq!(run.status, zapflow_core::RunStatus::Failed);
    assert_eq!(run.steps[0].attempts, 2);
    assert_eq!(run.steps[0].error.as_deref(), Some(reason.as_str()));
    let (kind, dead_reason): (String, String) =
        sqlx::query_as("SELECT kind, reason FROM zap_run_outbox WHERE kind = 'dead_letter'")
            .fetch_one(store.postgres().unwrap())
            .await
            .unwrap();
    assert_eq!(
        (kind.as_str(), dead_reason.as_str()),
        ("dead_letter", reason.as_str())
    );
}
