//! One repository test suite, run on both stores: PostgreSQL and SQLite
//! must behave the same.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;
use zapflow_core::retry::RetryPolicy;
use zapflow_core::secret::ApiKey;
use zapflow_core::{ActionSpec, RunStatus, StepStatus, ZapStatus};
use zapflow_store::{
    Delivery, Finish, NewRun, OutboxKind, RecordedRun, StepClaim, StepOutcome, Store, StoreError,
    TimeWindow,
};

/// A worker's policy of five attempts.
const RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 5,
    initial_delay: Duration::from_secs(2),
    multiplier: 3.0,
    max_delay: Duration::from_secs(600),
};

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(zapflow_testkit::test_store().await).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(zapflow_testkit::test_sqlite_store().await.store).await;
                }
            )*
        }
    };
}

conformance!(
    users_and_keys,
    zaps_belong_to_their_owner,
    ingest_is_idempotent_per_key,
    a_step_goes_through_retry_success_and_failure,
    a_lapsed_lease_lets_another_worker_take_the_step,
    outbox_rows_are_leased_and_come_back,
    leased_steps_are_claimed_once_each,
    runs_started_at_ingest_are_claimed_and_leased_in_its_commit,
    outcomes_finished_together_are_each_recorded_once,
    runs_page_newest_first,
    a_step_is_never_claimed_past_its_attempt_cap,
    outputs_and_errors_with_nul_are_stored_alike,
    a_run_has_one_replay_and_failed_runs_are_selected_by_window,
);

fn email(to: &str) -> ActionSpec {
    serde_json::from_value(
        json!({"type": "email", "config": {"to": to, "subject": "s", "body": "b"}}),
    )
    .unwrap()
}

fn new_run(zap_id: Uuid, owner_id: Uuid, actions: usize, key: Option<&str>) -> NewRun {
    NewRun {
        id: Uuid::now_v7(),
        zap_id,
        owner_id,
        trigger: json!({"n": 1}),
        headers: json!({"x-test": "1"}),
        query: json!({}),
        actions: (0..actions)
            .map(|i| email(&format!("to{i}@example.com")))
            .collect(),
        idempotency_key: key.map(str::to_owned),
        trace_parent: None,
        scheduled_time: None,
    }
}

/// A user and a zap with `actions` emails.
async fn user_and_zap(store: &Store, actions: usize) -> (Uuid, Uuid) {
    let (owner, _) = store
        .create_user(&format!("user-{}", Uuid::new_v4()))
        .await
        .unwrap();
    let specs: Vec<_> = (0..actions)
        .map(|i| email(&format!("to{i}@example.com")))
        .collect();
    let zap = store
        .create_zap(owner, "zap", &specs, b"token-hash", None)
        .await
        .unwrap();
    (owner, zap.id)
}

async fn users_and_keys(store: Store) {
    assert_eq!(store.user_count().await.unwrap(), 0);
    let (user, key) = store.create_user("ada").await.unwrap();
    assert_eq!(store.user_count().await.unwrap(), 1);
    assert_eq!(store.authenticate(&key).await.unwrap(), Some(user));
    let wrong_secret = ApiKey {
        secret: "nope".into(),
        ..key.clone()
    };
    assert_eq!(store.authenticate(&wrong_secret).await.unwrap(), None);
    assert_eq!(store.authenticate(&ApiKey::generate()).await.unwrap(), None);
    assert!(matches!(
        store.create_user("ada").await,
        Err(StoreError::AlreadyExists)
    ));
}

async fn zaps_belong_to_their_owner(store: Store) {
    let (alice, _) = store.create_user("alice").await.unwrap();
    let (bob, _) = store.create_user("bob").await.unwrap();
    let zap = store
        .create_zap(
            alice,
            "first",
            &[email("a@example.com")],
            b"h1",
            Some("whsec_x"),
        )
        .await
        .unwrap();
    assert_eq!(
        (zap.status, zap.signature_required),
        (ZapStatus::Active, true)
    );
    assert_eq!(store.get_zap(alice, zap.id).await.unwrap(), zap);
    assert!(matches!(
        store.get_zap(bob, zap.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.update_zap(bob, zap.id, "x", &[]).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.delete_zap(bob, zap.id).await,
        Err(StoreError::NotFound)
    ));

    let updated = store
        .update_zap(alice, zap.id, "renamed", &[email("b@example.com")])
        .await
        .unwrap();
    assert_eq!(
        (updated.name.as_str(), updated.actions.len()),
        ("renamed", 1)
    );
    let paused = store
        .set_zap_status(alice, zap.id, ZapStatus::Paused)
        .await
        .unwrap();
    assert_eq!(paused.status, ZapStatus::Paused);
    store.set_zap_token(alice, zap.id, b"h2").await.unwrap();
    let ingest = store.zap_for_ingest(zap.id).await.unwrap().unwrap();
    assert_eq!(
        (ingest.owner_id, ingest.token_hash.as_slice(), ingest.status),
        (alice, &b"h2"[..], ZapStatus::Paused)
    );
    assert_eq!(ingest.signing_secret.as_deref(), Some("whsec_x"));
    assert!(matches!(
        store.set_zap_signing_secret(bob, zap.id, "whsec_b").await,
        Err(StoreError::NotFound)
    ));
    store
        .set_zap_signing_secret(alice, zap.id, "whsec_y")
        .await
        .unwrap();
    let ingest = store.zap_for_ingest(zap.id).await.unwrap().unwrap();
    assert_eq!(ingest.signing_secret.as_deref(), Some("whsec_y"));

    let mut ids = vec![zap.id];
    for i in 0..4 {
        ids.push(
            store
                .create_zap(
                    alice,
                    &format!("z{i}"),
                    &[email("a@example.com")],
                    b"h",
                    None,
                )
                .await
                .unwrap()
                .id,
        );
    }
    let first = store.list_zaps(alice, None, 3).await.unwrap();
    let rest = store.list_zaps(alice, Some(first[2].id), 3).await.unwrap();
    let listed: Vec<Uuid> = first.iter().chain(&rest).map(|zap| zap.id).collect();
    assert_eq!(listed, ids);
    assert!(store.list_zaps(bob, None, 10).await.unwrap().is_empty());

    store.delete_zap(alice, zap.id).await.unwrap();
    assert!(matches!(
        store.get_zap(alice, zap.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(store.zap_for_ingest(zap.id).await.unwrap().is_none());
}

async fn ingest_is_idempotent_per_key(store: Store) {
    let (owner, zap) = user_and_zap(&store, 1).await;
    let batch = [
        new_run(zap, owner, 1, Some("k1")),
        new_run(zap, owner, 1, None),
        new_run(zap, owner, 1, Some("k1")),
    ];
    let results = store.insert_runs(&batch).await.unwrap();
    assert_eq!(results[0], recorded(batch[0].id, false));
    assert_eq!(results[1], recorded(batch[1].id, false));
    assert_eq!(
        results[2],
        recorded(batch[0].id, true),
        "same key in one batch"
    );
    let again = store
        .insert_runs(&[new_run(zap, owner, 1, Some("k1"))])
        .await
        .unwrap();
    assert_eq!(
        again,
        [recorded(batch[0].id, true)],
        "same key in a later batch"
    );
    assert_eq!(
        store.outbox_len().await.unwrap(),
        2,
        "one outbox row per new run"
    );

    let run = store.run(batch[0].id).await.unwrap().unwrap();
    assert_eq!(
        (
            run.status,
            run.trigger.clone(),
            run.headers["x-test"].clone()
        ),
        (RunStatus::Pending, json!({"n": 1}), json!("1"))
    );
    assert_eq!(run.steps[0].status, StepStatus::Pending);
}

fn claimed(claim: StepClaim) -> Box<zapflow_store::ClaimedStep> {
    match claim {
        StepClaim::Claimed(step) => step,
        other => panic!("expected a claim, got {other:?}"),
    }
}

async fn a_step_goes_through_retry_success_and_failure(store: Store) {
    let (owner, zap) = user_and_zap(&store, 2).await;
    let run = new_run(zap, owner, 2, None);
    store.insert_runs(std::slice::from_ref(&run)).await.unwrap();
    let lease = Duration::from_secs(60);

    let first = claimed(store.claim_step(run.id, 0, lease, &RETRY).await.unwrap());
    assert_eq!(first.attempt, 1);
    assert!(matches!(
        store.claim_step(run.id, 0, lease, &RETRY).await.unwrap(),
        StepClaim::Busy { .. }
    ));
    let retry = StepOutcome::Retry {
        error: "451 later".into(),
        delay: Duration::from_millis(300),
    };
    assert!(store.finish_step(&first, &retry).await.unwrap());
    assert!(
        !store.finish_step(&first, &retry).await.unwrap(),
        "an attempt is recorded once"
    );
    let recorded = store.run(run.id).await.unwrap().unwrap();
    assert_eq!(
        (recorded.status, recorded.steps[0].status),
        (RunStatus::Running, StepStatus::Retrying)
    );
    assert_eq!(recorded.steps[0].error.as_deref(), Some("451 later"));
    assert!(
        store.lease_due_outbox_rows(10, lease).await.unwrap().len() == 1,
        "only the first event is due; the retry waits"
    );
    assert!(
        matches!(
            store.claim_step(run.id, 0, lease, &RETRY).await.unwrap(),
            StepClaim::NotDue { .. }
        ),
        "an event before the retry is due leaves the step alone"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;

    let second = claimed(store.claim_step(run.id, 0, lease, &RETRY).await.unwrap());
    assert_eq!(second.attempt, 2);
    assert!(
        store
            .finish_step(&second, &StepOutcome::Succeeded(json!({"ok": true})))
            .await
            .unwrap()
    );
    assert!(matches!(
        store.claim_step(run.id, 0, lease, &RETRY).await.unwrap(),
        StepClaim::AlreadyDone
    ));

    let last = claimed(store.claim_step(run.id, 1, lease, &RETRY).await.unwrap());
    assert_eq!(
        last.run.steps[0].output,
        Some(json!({"ok": true})),
        "earlier outputs come with the claim"
    );
    assert!(
        store
            .finish_step(&last, &StepOutcome::Failed("550 no such user".into()))
            .await
            .unwrap()
    );
    let recorded = store.run(run.id).await.unwrap().unwrap();
    assert_eq!(recorded.status, RunStatus::Failed);
    assert!(recorded.finished_at.is_some());
    assert_eq!(
        (recorded.steps[0].status, recorded.steps[0].attempts),
        (StepStatus::Succeeded, 2)
    );
    assert_eq!(
        (recorded.steps[1].status, recorded.steps[1].error.as_deref()),
        (StepStatus::Failed, Some("550 no such user"))
    );
    assert!(matches!(
        store.claim_step(run.id, 1, lease, &RETRY).await.unwrap(),
        StepClaim::RunFinished
    ));
    assert!(matches!(
        store.claim_step(run.id, 7, lease, &RETRY).await.unwrap(),
        StepClaim::RunFinished
    ));
    assert!(matches!(
        store
            .claim_step(Uuid::new_v4(), 0, lease, &RETRY)
            .await
            .unwrap(),
        StepClaim::Unknown
    ));
}

async fn a_lapsed_lease_lets_another_worker_take_the_step(store: Store) {
    let (owner, zap) = user_and_zap(&store, 1).await;
    let run = new_run(zap, owner, 1, None);
    store.insert_runs(std::slice::from_ref(&run)).await.unwrap();
    let vanished = claimed(
        store
            .claim_step(run.id, 0, Duration::from_millis(20), &RETRY)
            .await
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let successor = claimed(
        store
            .claim_step(run.id, 0, Duration::from_secs(60), &RETRY)
            .await
            .unwrap(),
    );
    assert_eq!(successor.attempt, 2);
    let late = StepOutcome::Succeeded(json!({"from": "vanished"}));
    assert!(
        !store.finish_step(&vanished, &late).await.unwrap(),
        "the old lease holder cannot record"
    );
    assert!(
        store
            .finish_step(&successor, &StepOutcome::Succeeded(json!({})))
            .await
            .unwrap()
    );
    assert_eq!(
        store.run(run.id).await.unwrap().unwrap().status,
        RunStatus::Succeeded
    );
}

async fn outbox_rows_are_leased_and_come_back(store: Store) {
    // Long enough that a loaded machine gets from one lease call to the next
    // before it ends.
    const LEASE: Duration = Duration::from_secs(1);
    let (owner, zap) = user_and_zap(&store, 1).await;
    let runs: Vec<NewRun> = (0..3).map(|_| new_run(zap, owner, 1, None)).collect();
    store.insert_runs(&runs).await.unwrap();
    let leased = store.lease_due_outbox_rows(10, LEASE).await.unwrap();
    assert_eq!(
        leased.iter().map(|row| row.run_id).collect::<Vec<_>>(),
        runs.iter().map(|run| run.id).collect::<Vec<_>>()
    );
    assert!(
        store
            .lease_due_outbox_rows(10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty(),
        "leased rows are not due"
    );
    store
        .delete_outbox_rows(&[leased[0].id, leased[1].id])
        .await
        .unwrap();
    tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
    let back = store
        .lease_due_outbox_rows(10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(back.len(), 1, "an undeleted row comes back after its lease");
    assert_eq!(
        back[0].event_id, leased[2].event_id,
        "with the same event id"
    );
    store
        .dead_letter(runs[0].id, zap, 0, "poison")
        .await
        .unwrap();
    assert!(
        store
            .lease_due_outbox_rows(10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty(),
        "dead letters are not work"
    );
    assert_eq!(store.outbox_len().await.unwrap(), 2);

    // Whatever order rows were written in, the one due longest goes first.
    let later = Duration::from_millis(200);
    store
        .reschedule_step(runs[0].id, zap, 0, later)
        .await
        .unwrap();
    store
        .reschedule_step(runs[1].id, zap, 0, Duration::ZERO)
        .await
        .unwrap();
    tokio::time::sleep(later + Duration::from_millis(100)).await;
    let first = store.lease_due_outbox_rows(1, LEASE).await.unwrap();
    assert_eq!(
        first.iter().map(|row| row.run_id).collect::<Vec<_>>(),
        [runs[1].id],
        "the row written later but due sooner is leased first"
    );
}

async fn runs_started_at_ingest_are_claimed_and_leased_in_its_commit(store: Store) {
    // Long enough that a loaded machine gets from the insert to the leases
    // below before it ends.
    const LEASE: Duration = Duration::from_secs(1);
    let (owner, zap) = user_and_zap(&store, 2).await;
    let delivery = |run: NewRun, start_for| Delivery { run, start_for };
    let started_run = new_run(zap, owner, 2, Some("k"));
    let deliveries = [
        delivery(started_run.clone(), Some(LEASE)),
        delivery(new_run(zap, owner, 2, None), None),
        // A repeated key starts nothing, and neither does a run without
        // actions.
        delivery(new_run(zap, owner, 2, Some("k")), Some(LEASE)),
        delivery(new_run(zap, owner, 0, None), Some(LEASE)),
    ];
    let answers = store.insert_deliveries(&deliveries).await.unwrap();
    assert_eq!(answers[2].0, recorded(started_run.id, true));
    let started: Vec<_> = answers
        .into_iter()
        .filter_map(|(_, started)| started)
        .collect();
    assert_eq!(started.len(), 1, "only the first delivery started");
    let started = started.into_iter().next().unwrap();
    assert_eq!((started.row.run_id, started.row.stage), (started_run.id, 0));
    assert_eq!((started.step.stage, started.step.attempt), (0, 1));
    assert_eq!(started.step.run.trigger, started_run.trigger);
    let run = store.run(started_run.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(
        (run.steps[0].status, run.steps[0].attempts),
        (StepStatus::Running, 1)
    );

    // Workers leasing the outbox find the waiting run only; a claim of the
    // started step finds it held.
    let leased = store.lease_due_outbox_rows(10, LEASE).await.unwrap();
    assert_eq!(
        leased.iter().map(|row| row.run_id).collect::<Vec<_>>(),
        [deliveries[1].run.id, deliveries[3].run.id]
    );
    assert!(matches!(
        store
            .claim_step(started_run.id, 0, LEASE, &RETRY)
            .await
            .unwrap(),
        StepClaim::Busy { .. }
    ));

    // Its outcome is recorded, and its outbox row deleted, as a leased one's.
    let finish = Finish {
        step: &started.step,
        outcome: &StepOutcome::Succeeded(json!({"sent": true})),
        outbox_row: Some(started.row.id),
        trace_parent: None,
    };
    assert_eq!(store.finish_steps(&[finish]).await.unwrap(), [true]);
    let next = store.lease_due_outbox_rows(10, LEASE).await.unwrap();
    assert_eq!(
        next.iter()
            .map(|row| (row.run_id, row.stage))
            .collect::<Vec<_>>(),
        [(started_run.id, 1)],
        "the next step is announced and the first one's row is gone"
    );

    // A started run whose worker never records comes back after its lease.
    let forgotten = new_run(zap, owner, 2, None);
    let answers = store
        .insert_deliveries(&[delivery(forgotten.clone(), Some(Duration::from_millis(20)))])
        .await
        .unwrap();
    assert!(answers[0].1.is_some());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let back = store
        .lease_and_claim_due_steps(10, LEASE, &RETRY)
        .await
        .unwrap();
    let [(row, StepClaim::Claimed(step))] = back.as_slice() else {
        panic!("the started run's row comes due again: {back:?}");
    };
    assert_eq!((row.run_id, step.attempt), (forgotten.id, 2));
}

async fn leased_steps_are_claimed_once_each(store: Store) {
    let (owner, zap) = user_and_zap(&store, 1).await;
    let runs: Vec<NewRun> = (0..3).map(|_| new_run(zap, owner, 1, None)).collect();
    store.insert_runs(&runs).await.unwrap();
    // The second run's step was claimed before, and its lease lapsed.
    let lapsed = claimed(
        store
            .claim_step(runs[1].id, 0, Duration::from_millis(20), &RETRY)
            .await
            .unwrap(),
    );
    assert_eq!(lapsed.attempt, 1);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let lease = Duration::from_secs(60);
    let leased = store
        .lease_and_claim_due_steps(10, lease, &RETRY)
        .await
        .unwrap();
    let attempts: Vec<(Uuid, u32)> = leased
        .into_iter()
        .map(|(row, claim)| (row.run_id, claimed(claim).attempt))
        .collect();
    assert_eq!(
        attempts,
        vec![(runs[0].id, 1), (runs[1].id, 2), (runs[2].id, 1)]
    );
    for run in &runs {
        let run = store.run(run.id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Running);
        assert_eq!(run.steps[0].status, StepStatus::Running);
    }

    // A step held, a step asked for twice at once, a run that does not exist.
    let fresh = new_run(zap, owner, 1, None);
    store
        .insert_runs(std::slice::from_ref(&fresh))
        .await
        .unwrap();
    let claims = store
        .claim_steps(
            &[
                (runs[0].id, 0),
                (fresh.id, 0),
                (fresh.id, 0),
                (Uuid::new_v4(), 0),
            ],
            lease,
            &RETRY,
        )
        .await
        .unwrap();
    assert!(
        matches!(
            &claims[..],
            [
                StepClaim::Busy { .. },
                StepClaim::Claimed(step),
                StepClaim::Busy { .. },
                StepClaim::Unknown,
            ] if step.attempt == 1 && step.run.id == fresh.id
        ),
        "{claims:?}"
    );
}

async fn outcomes_finished_together_are_each_recorded_once(store: Store) {
    let (owner, zap) = user_and_zap(&store, 1).await;
    let runs: Vec<NewRun> = (0..3).map(|_| new_run(zap, owner, 1, None)).collect();
    store.insert_runs(&runs).await.unwrap();
    let leased = store
        .lease_due_outbox_rows(10, Duration::from_secs(60))
        .await
        .unwrap();
    let row = |i: usize| {
        let row = leased.iter().find(|row| row.run_id == runs[i].id);
        Some(row.expect("each run's outbox row").id)
    };
    let steps: Vec<(Uuid, u32)> = runs.iter().map(|run| (run.id, 0)).collect();
    let claimed: Vec<_> = store
        .claim_steps(&steps, Duration::from_secs(60), &RETRY)
        .await
        .unwrap()
        .into_iter()
        .map(claimed)
        .collect();
    let null = StepOutcome::Succeeded(json!(null));
    let stopped = StepOutcome::Stopped {
        output: json!({"passed": false}),
        reason: "filtered out".into(),
    };
    let failed = StepOutcome::Failed("refused".into());
    let again = StepOutcome::Succeeded(json!({"twice": true}));
    let finish = |step, outcome, outbox_row| zapflow_store::Finish {
        step,
        outcome,
        outbox_row,
        trace_parent: None,
    };
    let recorded = store
        .finish_steps(&[
            finish(&claimed[0], &null, row(0)),
            finish(&claimed[1], &stopped, row(1)),
            finish(&claimed[2], &failed, row(2)),
            finish(&claimed[0], &again, row(0)),
        ])
        .await
        .unwrap();
    assert_eq!(recorded, vec![true, true, true, false]);
    // Recorded outcomes take their outbox rows with them; the failed run
    // announced its dead letter.
    let left = store.claim_due_outbox_rows(10).await.unwrap();
    let kinds: Vec<_> = left.rows.iter().map(|row| (row.run_id, row.kind)).collect();
    left.finish(&[]).await.unwrap();
    assert_eq!(kinds, [(runs[2].id, OutboxKind::DeadLetter)]);
    // An outcome not recorded leaves its row.
    store
        .reschedule_step(runs[2].id, zap, 0, Duration::ZERO)
        .await
        .unwrap();
    let again_row = store
        .lease_due_outbox_rows(10, Duration::from_secs(60))
        .await
        .unwrap()[0]
        .id;
    let late = store
        .finish_steps(&[finish(&claimed[2], &failed, Some(again_row))])
        .await
        .unwrap();
    assert_eq!(late, vec![false]);
    assert_eq!(store.outbox_len().await.unwrap(), 2);

    let first = store.run(runs[0].id).await.unwrap().unwrap();
    assert_eq!(first.status, RunStatus::Succeeded);
    assert_eq!(
        first.steps[0].output,
        Some(json!(null)),
        "a JSON null stays one"
    );
    assert_eq!(first.steps[0].history.len(), 1);
    let second = store.run(runs[1].id).await.unwrap().unwrap();
    assert_eq!(
        (second.status, second.stop_reason.as_deref()),
        (RunStatus::Succeeded, Some("filtered out"))
    );
    let third = store.run(runs[2].id).await.unwrap().unwrap();
    assert_eq!(third.status, RunStatus::Failed);
    assert_eq!(third.steps[0].error.as_deref(), Some("refused"));
}

async fn runs_page_newest_first(store: Store) {
    let (owner, zap) = user_and_zap(&store, 1).await;
    let (stranger, _) = store.create_user("stranger").await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..5 {
        let run = new_run(zap, owner, 1, None);
        store.insert_runs(std::slice::from_ref(&run)).await.unwrap();
        ids.push(run.id);
    }
    ids.reverse();
    let first = store
        .list_runs(owner, Some(zap), None, 2, true)
        .await
        .unwrap();
    let second = store
        .list_runs(owner, None, first.next_before, 2, true)
        .await
        .unwrap();
    let third = store
        .list_runs(owner, None, second.next_before, 2, true)
        .await
        .unwrap();
    let listed: Vec<Uuid> = [first.runs, second.runs, third.runs]
        .concat()
        .iter()
        .map(|run| run.id)
        .collect();
    assert_eq!(listed, ids);
    assert_eq!(third.next_before, None);
    assert!(
        store
            .list_runs(stranger, None, None, 10, true)
            .await
            .unwrap()
            .runs
            .is_empty()
    );
    assert!(matches!(
        store.owned_run(stranger, ids[0]).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.owned_run(owner, ids[0]).await.unwrap().id, ids[0]);
}

async fn a_step_is_never_claimed_past_its_attempt_cap(store: Store) {
    let (owner, zap) = user_and_zap(&store, 1).await;
    let mut run = new_run(zap, owner, 1, None);
    run.actions[0].retry = Some(zapflow_core::RetryOverride {
        max_attempts: Some(2),
        ..Default::default()
    });
    store.insert_runs(std::slice::from_ref(&run)).await.unwrap();
    let short = Duration::from_millis(20);

    // Two workers claim the step and vanish without recording anything.
    let first = claimed(store.claim_step(run.id, 0, short, &RETRY).await.unwrap());
    tokio::time::sleep(Duration::from_millis(40)).await;
    let second = claimed(store.claim_step(run.id, 0, short, &RETRY).await.unwrap());
    assert_eq!((first.attempt, second.attempt), (1, 2));
    tokio::time::sleep(Duration::from_millis(40)).await;

    // The step comes back once more (a duplicate event, the outbox row's
    // lease): the action's two attempts are used up.
    let StepClaim::Exhausted { error, .. } =
        store.claim_step(run.id, 0, short, &RETRY).await.unwrap()
    else {
        panic!("a third attempt must not start");
    };
    assert!(error.contains("gave up after 2 attempts"), "{error}");
    let recorded = store.run(run.id).await.unwrap().unwrap();
    assert_eq!(recorded.status, RunStatus::Failed);
    let step = &recorded.steps[0];
    assert_eq!(
        (step.status, step.attempts, step.error.as_deref()),
        (StepStatus::Failed, 2, Some(error.as_str()))
    );
    assert_eq!(step.history.len(), 1, "the abandoned attempt is on record");
    assert_eq!(step.history[0].number, 2);
    assert_eq!(
        store.outbox_len().await.unwrap(),
        2,
        "the first step's row and a dead letter"
    );
    assert!(
        !store
            .finish_step(&second, &StepOutcome::Succeeded(json!({})))
            .await
            .unwrap(),
        "a late worker cannot record"
    );
    assert!(matches!(
        store.claim_step(run.id, 0, short, &RETRY).await.unwrap(),
        StepClaim::RunFinished
    ));
}

async fn outputs_and_errors_with_nul_are_stored_alike(store: Store) {
    let (owner, zap) = user_and_zap(&store, 2).await;
    let run = new_run(zap, owner, 2, None);
    store.insert_runs(std::slice::from_ref(&run)).await.unwrap();
    let lease = Duration::from_secs(60);

    let first = claimed(store.claim_step(run.id, 0, lease, &RETRY).await.unwrap());
    let output = json!({"body": {"name\u{0}": "a\u{0}b", "list": ["\u{0}"]}, "status": 200});
    assert!(
        store
            .finish_step(&first, &StepOutcome::Succeeded(output))
            .await
            .unwrap()
    );
    let second = claimed(store.claim_step(run.id, 1, lease, &RETRY).await.unwrap());
    let failed = StepOutcome::Failed("http 400: bad \u{0} byte".into());
    assert!(store.finish_step(&second, &failed).await.unwrap());

    let recorded = store.run(run.id).await.unwrap().unwrap();
    assert_eq!(
        recorded.steps[0].output,
        Some(json!({"body": {"name\u{FFFD}": "a\u{FFFD}b", "list": ["\u{FFFD}"]}, "status": 200}))
    );
    let expected = "http 400: bad \u{FFFD} byte";
    assert_eq!(recorded.steps[1].error.as_deref(), Some(expected));
    assert_eq!(
        recorded.steps[1].history[0].error.as_deref(),
        Some(expected)
    );
    assert_eq!(recorded.status, RunStatus::Failed);
}

async fn a_run_has_one_replay_and_failed_runs_are_selected_by_window(store: Store) {
    let (owner, zap) = user_and_zap(&store, 1).await;
    let mut failed = Vec::new();
    for _ in 0..4 {
        let run = new_run(zap, owner, 1, None);
        store.insert_runs(std::slice::from_ref(&run)).await.unwrap();
        let step = claimed(
            store
                .claim_step(run.id, 0, Duration::from_secs(60), &RETRY)
                .await
                .unwrap(),
        );
        let outcome = StepOutcome::Failed("550".into());
        assert!(store.finish_step(&step, &outcome).await.unwrap());
        failed.push(store.run(run.id).await.unwrap().unwrap());
    }
    let ids = |runs: &[zapflow_store::Run]| runs.iter().map(|run| run.id).collect::<Vec<_>>();
    let select = |window: TimeWindow, limit: u32| {
        let store = store.clone();
        async move { store.failed_runs(owner, zap, &window, limit).await.unwrap() }
    };

    assert_eq!(select(TimeWindow::default(), 10).await, ids(&failed));
    // A window past the oldest `limit` runs still finds its runs.
    let late = TimeWindow {
        start: Some(failed[2].created_at),
        end: None,
    };
    assert_eq!(select(late, 1).await, ids(&failed[2..3]));
    let early = TimeWindow {
        start: None,
        end: Some(failed[1].created_at),
    };
    assert_eq!(
        select(early, 10).await,
        ids(&failed[..1]),
        "the end is exclusive"
    );

    let replay = store
        .insert_replay(&failed[2], Uuid::now_v7(), 0)
        .await
        .unwrap();
    let zapflow_store::Replay::Created(replay_id) = replay else {
        panic!("the first replay is created, got {replay:?}");
    };
    assert_eq!(
        store
            .insert_replay(&failed[2], Uuid::now_v7(), 0)
            .await
            .unwrap(),
        zapflow_store::Replay::Existing(replay_id),
        "a run has one replay"
    );
    assert_eq!(
        store.run(replay_id).await.unwrap().unwrap().replay_of,
        Some(failed[2].id)
    );
    assert_eq!(select(late, 10).await, ids(&failed[3..]));
    assert_eq!(
        store.outbox_len().await.unwrap(),
        4 + 4 + 1,
        "first steps, dead letters, and the one replay's step"
    );
}

fn recorded(id: Uuid, repeated: bool) -> RecordedRun {
    RecordedRun { id, repeated }
}

/// Outbox rows committed on PostgreSQL wake the loops of the process that
/// wrote them at once, and those of every other process (here, a second
/// store on the database) with a notification sent after the commit:
/// whether the rows were written by a statement alone (a run without a
/// key) or in a transaction (a run with one).
#[tokio::test]
async fn postgres_outbox_rows_wake_the_loops_of_every_process() {
    let url = zapflow_testkit::test_database_url().await;
    let writer = Store::open(&url, 4).await.unwrap();
    writer.migrate().await.unwrap();
    let other = Store::open(&url, 4).await.unwrap();
    let (owner, zap) = user_and_zap(&writer, 1).await;
    for key in [None, Some("k1")] {
        let mut ours = writer.outbox_wakeups().await;
        let mut theirs = other.outbox_wakeups().await;
        writer
            .insert_runs(&[new_run(zap, owner, 1, key)])
            .await
            .unwrap();
        for (wakeups, whose) in [(&mut ours, "its own"), (&mut theirs, "another's")] {
            tokio::time::timeout(Duration::from_secs(5), wakeups.wait())
                .await
                .unwrap_or_else(|_| panic!("{whose} loops were not woken (key {key:?})"));
        }
    }
}

/// Migration 0012 rebuilds SQLite's run and step tables: every row, step
/// output and replay link written before it reads back the same after, and
/// the rules the tables kept hold (one run per idempotency key, one replay
/// per run, steps deleted with their run, the database consistent).
#[tokio::test]
async fn sqlite_tables_rebuilt_by_a_migration_keep_their_rows_and_rules() {
    use sqlx::migrate::Migrator;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool};

    const REBUILD: i64 = 12;
    let path = std::env::temp_dir().join(format!("{}.db", zapflow_testkit::unique("rebuild")));
    let pool = SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal),
    )
    .await
    .unwrap();
    let before_rebuild = Migrator {
        migrations: zapflow_store::SQLITE_MIGRATOR
            .migrations
            .iter()
            .filter(|migration| migration.version < REBUILD)
            .cloned()
            .collect(),
        ..Migrator::DEFAULT
    };
    before_rebuild.run(&pool).await.unwrap();

    let store = Store::open_file(&path).await.unwrap();
    let (owner, zap) = user_and_zap(&store, 2).await;
    let keyed = new_run(zap, owner, 2, Some("k1"));
    let keyless = new_run(zap, owner, 2, None);
    store
        .insert_runs(&[keyed.clone(), keyless.clone()])
        .await
        .unwrap();
    let lease = Duration::from_secs(60);
    let step = claimed(store.claim_step(keyed.id, 0, lease, &RETRY).await.unwrap());
    let sent = StepOutcome::Succeeded(json!({"message_id": "m1"}));
    assert!(store.finish_step(&step, &sent).await.unwrap());
    claimed(
        store
            .claim_step(keyless.id, 0, lease, &RETRY)
            .await
            .unwrap(),
    );
    let keyed_run = store.run(keyed.id).await.unwrap().unwrap();
    let zapflow_store::Replay::Created(replay) = store
        .insert_replay(&keyed_run, Uuid::now_v7(), 1)
        .await
        .unwrap()
    else {
        panic!("the first replay is created");
    };
    let ids = [keyed.id, keyless.id, replay];
    let mut written = Vec::new();
    for id in ids {
        written.push(store.run(id).await.unwrap().unwrap());
    }
    let outbox = store.outbox_len().await.unwrap();

    store.migrate().await.unwrap();
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(applied.last(), Some(&REBUILD), "the rebuild ran");

    let mut read = Vec::new();
    for id in ids {
        read.push(store.run(id).await.unwrap().unwrap());
    }
    assert_eq!(read, written, "runs and their steps read back the same");
    assert_eq!(read[2].replay_of, Some(keyed.id));
    assert_eq!(store.outbox_len().await.unwrap(), outbox);
    assert_eq!(
        store
            .insert_runs(&[
                new_run(zap, owner, 1, Some("k1")),
                new_run(zap, owner, 1, None)
            ])
            .await
            .unwrap()[0],
        recorded(keyed.id, true),
        "a key recorded before the rebuild is still taken"
    );
    assert_eq!(
        store
            .insert_replay(&keyed_run, Uuid::now_v7(), 0)
            .await
            .unwrap(),
        zapflow_store::Replay::Existing(replay),
        "a run replayed before the rebuild has its one replay"
    );

    let without_rowid: i64 =
        sqlx::query_scalar("SELECT wr FROM pragma_table_list WHERE name = 'zap_run_steps'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(without_rowid, 1, "steps are keyed by (run_id, step) alone");
    let dangling: Vec<(String,)> = sqlx::query_as("SELECT \"table\" FROM pragma_foreign_key_check")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(
        dangling.is_empty(),
        "references left dangling in {dangling:?}"
    );
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(integrity, "ok");
    sqlx::query("DELETE FROM zap_runs WHERE id = $1")
        .bind(keyless.id)
        .execute(&pool)
        .await
        .unwrap();
    let steps: i64 = sqlx::query_scalar("SELECT count(*) FROM zap_run_steps WHERE run_id = $1")
        .bind(keyless.id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(steps, 0, "a run's steps go with it");
    pool.close().await;
    drop(store);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
