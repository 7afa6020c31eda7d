//! Schedule triggers: validation, what a scheduled zap shows and refuses,
//! runs one second apart on every deployment, exactly one run per tick
//! across processes, and missed ticks after downtime and pauses.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::process::{Child, Command};
use tonic::Code;
use zapflow_proto::v1 as pb;
use zapflow_proto::v1::zap_service_client::ZapServiceClient;
use zapflow_testkit::{SmtpSink, Stack, StackOptions, eventually, free_address, unique, with_key};

use crate::cli::{Cli, path};
use crate::support::{
    Deployment, WAIT, email_action, new_user, post_json, stack_of, stack_with_smtp,
};

on_outbox_deployments!(
    a_schedule_is_checked_shown_and_has_no_webhook,
    ticks_missed_while_down_follow_the_policy,
    ticks_missed_while_paused_follow_the_policy,
    a_scheduled_zap_file_applies_unchanged,
);

mod distributed {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_interval_runs_once_a_second() {
        super::an_interval_runs_once_a_second(crate::support::Deployment::Distributed).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn ticks_missed_while_down_follow_the_policy() {
        let deployment = crate::support::Deployment::Distributed;
        super::ticks_missed_while_down_follow_the_policy(deployment).await;
    }
}

mod embedded_runs {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_interval_runs_once_a_second() {
        super::an_interval_runs_once_a_second(crate::support::Deployment::Embedded).await;
    }
}

type Client = ZapServiceClient<tonic::transport::Channel>;

fn interval(seconds: i64, missed_ticks: pb::MissedTicks) -> pb::Trigger {
    pb::Trigger {
        kind: Some(pb::trigger::Kind::Schedule(pb::ScheduleTrigger {
            every: Some(pb::schedule_trigger::Every::Interval(
                prost_types::Duration { seconds, nanos: 0 },
            )),
            time_zone: String::new(),
            missed_ticks: missed_ticks as i32,
        })),
    }
}

fn cron(expression: &str, time_zone: &str) -> pb::Trigger {
    pb::Trigger {
        kind: Some(pb::trigger::Kind::Schedule(pb::ScheduleTrigger {
            every: Some(pb::schedule_trigger::Every::Cron(expression.into())),
            time_zone: time_zone.into(),
            missed_ticks: pb::MissedTicks::Unspecified as i32,
        })),
    }
}

fn webhook() -> pb::Trigger {
    pb::Trigger {
        kind: Some(pb::trigger::Kind::Webhook(pb::WebhookTrigger {})),
    }
}

async fn create(
    client: &Client,
    key: &str,
    trigger: Option<pb::Trigger>,
) -> Result<pb::CreateZapResponse, tonic::Status> {
    client
        .clone()
        .create_zap(with_key(
            key,
            pb::CreateZapRequest {
                name: unique("scheduled"),
                actions: vec![email_action("to@example.com", "tick {{ run.id }}", "b")],
                trigger,
                ..Default::default()
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn get(client: &Client, key: &str, id: &str) -> pb::Zap {
    client
        .clone()
        .get_zap(with_key(
            key,
            pb::GetZapRequest {
                id: id.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .zap
        .unwrap()
}

fn time(timestamp: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    timestamp.map(|time| DateTime::from_timestamp(time.seconds, time.nanos as u32).unwrap())
}

/// Every run of a zap: (scheduled time, creation time, status).
async fn runs_of(client: &Client, key: &str, zap_id: &str) -> Vec<pb::Run> {
    let mut runs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .clone()
            .list_runs(with_key(
                key,
                pb::ListRunsRequest {
                    zap_id: zap_id.into(),
                    page_size: 500,
                    page_token: page_token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        runs.extend(page.runs);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    runs.sort_by_key(|run| time(run.scheduled_time.as_ref()));
    runs
}

fn scheduled_times(runs: &[pb::Run]) -> Vec<DateTime<Utc>> {
    runs.iter()
        .map(|run| time(run.scheduled_time.as_ref()).expect("a scheduled run's time"))
        .collect()
}

/// Waits until the zap has `count` runs more than `before`.
async fn wait_for_runs(client: &Client, key: &str, zap_id: &str, count: usize) -> Vec<pb::Run> {
    eventually(&format!("{count} runs of zap {zap_id}"), WAIT, || async {
        let runs = runs_of(client, key, zap_id).await;
        (runs.len() >= count).then_some(runs)
    })
    .await
}

/// Asserts that `times` are consecutive ticks one second apart.
fn assert_consecutive(times: &[DateTime<Utc>]) {
    for pair in times.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            TimeDelta::seconds(1),
            "a gap or a repeat between ticks: {times:?}"
        );
    }
}

async fn a_schedule_is_checked_shown_and_has_no_webhook(deployment: Deployment) {
    let stack = stack_of(deployment, StackOptions::default()).await;
    let key = new_user(&stack, "ada").await;
    let client = stack.zap_client().await;

    for (trigger, field) in [
        (cron("61 * * * *", ""), "trigger.schedule.cron"),
        (cron("every day", ""), "trigger.schedule.cron"),
        (
            cron("0 9 * * *", "Mars/Olympus"),
            "trigger.schedule.time_zone",
        ),
        (
            pb::Trigger {
                kind: Some(pb::trigger::Kind::Schedule(pb::ScheduleTrigger {
                    every: Some(pb::schedule_trigger::Every::Interval(
                        prost_types::Duration {
                            seconds: 0,
                            nanos: 500_000_000,
                        },
                    )),
                    ..Default::default()
                })),
            },
            "trigger.schedule.interval",
        ),
        (
            pb::Trigger {
                kind: Some(pb::trigger::Kind::Schedule(pb::ScheduleTrigger::default())),
            },
            "trigger.schedule",
        ),
    ] {
        let status = create(&client, &key, Some(trigger.clone()))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{trigger:?}: {status:?}"
        );
        assert!(
            status.message().starts_with(field),
            "{trigger:?}: {}",
            status.message()
        );
    }
    let signed = client
        .clone()
        .create_zap(with_key(
            &key,
            pb::CreateZapRequest {
                name: unique("signed"),
                actions: vec![email_action("to@example.com", "s", "b")],
                require_signature: true,
                trigger: Some(interval(60, pb::MissedTicks::Skip)),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(signed.code(), Code::InvalidArgument, "{signed:?}");
    assert!(signed.message().contains("require_signature"), "{signed:?}");

    // A cron read in Berlin: shown as given, its next tick ahead.
    let before = Utc::now();
    let created = create(
        &client,
        &key,
        Some(cron("0 9 * * MON-FRI", "Europe/Berlin")),
    )
    .await
    .unwrap();
    assert_eq!(created.webhook_url, "", "a scheduled zap has no webhook");
    assert!(created.signing_secret.is_empty());
    let zap = created.zap.unwrap();
    let shown = get(&client, &key, &zap.id).await;
    // Unspecified missed ticks read back as SKIP, what they mean.
    let mut expected = cron("0 9 * * MON-FRI", "Europe/Berlin");
    if let Some(pb::trigger::Kind::Schedule(schedule)) = &mut expected.kind {
        schedule.missed_ticks = pb::MissedTicks::Skip as i32;
    }
    assert_eq!(shown.trigger, Some(expected));
    let next = time(shown.next_tick_time.as_ref()).expect("a next tick");
    assert!(
        next > before && next - before <= TimeDelta::days(4),
        "{next}"
    );
    // 09:00 in Berlin is 08:00 UTC in winter, 07:00 UTC in summer.
    let utc = next.format("%H:%M:%S").to_string();
    assert!(utc == "08:00:00" || utc == "07:00:00", "{next}");
    assert_eq!(zap.next_tick_time, shown.next_tick_time);
    let listed = client
        .clone()
        .list_zaps(with_key(&key, pb::ListZapsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .zaps;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].trigger, shown.trigger);
    assert_eq!(listed[0].next_tick_time, shown.next_tick_time);

    // No webhook: any URL for it is not found, and it has no token to rotate.
    let url = format!(
        "{}/hooks/catch/{}/{}",
        stack.http_url(),
        zap.id,
        "a".repeat(43)
    );
    let (status, _) = post_json(&url, &serde_json::json!({})).await;
    assert_eq!(status, 404);
    for refused in [
        client
            .clone()
            .rotate_webhook_token(with_key(
                &key,
                pb::RotateWebhookTokenRequest { id: zap.id.clone() },
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
        client
            .clone()
            .rotate_signing_secret(with_key(
                &key,
                pb::RotateSigningSecretRequest { id: zap.id.clone() },
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
    ] {
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("no webhook"), "{refused:?}");
    }

    // Paused: no next tick shown; resumed: the same one.
    let paused = client
        .clone()
        .pause_zap(with_key(&key, pb::PauseZapRequest { id: zap.id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .zap
        .unwrap();
    assert_eq!(paused.next_tick_time, None);
    assert_eq!(paused.trigger, shown.trigger);
    let resumed = client
        .clone()
        .resume_zap(with_key(&key, pb::ResumeZapRequest { id: zap.id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .zap
        .unwrap();
    assert_eq!(resumed.next_tick_time, shown.next_tick_time);

    let update = |trigger: Option<pb::Trigger>| pb::UpdateZapRequest {
        id: zap.id.clone(),
        name: zap.name.clone(),
        actions: vec![email_action("to@example.com", "changed", "b")],
        require_signature: None,
        trigger,
    };
    // An update without a trigger keeps the schedule and its next tick; the
    // same schedule again changes nothing either.
    for trigger in [None, shown.trigger.clone()] {
        let kept = client
            .clone()
            .update_zap(with_key(&key, update(trigger)))
            .await
            .unwrap()
            .into_inner()
            .zap
            .unwrap();
        assert_eq!(
            (&kept.trigger, &kept.next_tick_time),
            (&shown.trigger, &shown.next_tick_time)
        );
    }
    // A new schedule counts from now.
    let every_hour = client
        .clone()
        .update_zap(with_key(
            &key,
            update(Some(interval(3600, pb::MissedTicks::RunLatest))),
        ))
        .await
        .unwrap()
        .into_inner()
        .zap
        .unwrap();
    let next = time(every_hour.next_tick_time.as_ref()).unwrap();
    let from_now = next - Utc::now();
    assert!(
        from_now > TimeDelta::minutes(59) && from_now <= TimeDelta::hours(1),
        "{from_now}"
    );
    assert_eq!(
        every_hour.trigger,
        Some(interval(3600, pb::MissedTicks::RunLatest))
    );
    // Back to a webhook: no next tick, and a URL once the token is rotated.
    let hooked = client
        .clone()
        .update_zap(with_key(&key, update(Some(webhook()))))
        .await
        .unwrap()
        .into_inner()
        .zap
        .unwrap();
    assert_eq!(
        (hooked.trigger, hooked.next_tick_time),
        (Some(webhook()), None)
    );
    assert_eq!(schedule_rows(&stack).await, 0);
    let url = client
        .clone()
        .rotate_webhook_token(with_key(
            &key,
            pb::RotateWebhookTokenRequest { id: zap.id.clone() },
        ))
        .await
        .unwrap()
        .into_inner()
        .webhook_url;
    let (status, answer) = post_json(&url, &serde_json::json!({"n": 1})).await;
    assert_eq!(status, 202, "{answer}");

    // A webhook zap says so; deleting a scheduled zap ends its schedule.
    let plain = create(&client, &key, None).await.unwrap();
    assert!(!plain.webhook_url.is_empty());
    assert_eq!(plain.zap.unwrap().trigger, Some(webhook()));
    let scheduled = create(&client, &key, Some(interval(60, pb::MissedTicks::Skip)))
        .await
        .unwrap()
        .zap
        .unwrap();
    assert_eq!(schedule_rows(&stack).await, 1);
    client
        .clone()
        .delete_zap(with_key(
            &key,
            pb::DeleteZapRequest {
                id: scheduled.id.clone(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(schedule_rows(&stack).await, 0);
    stack.stop().await;
}

/// The rows of `zap_schedules`.
async fn schedule_rows(stack: &Stack) -> i64 {
    let sql = "SELECT count(*) FROM zap_schedules";
    let (count,): (i64,) = match (stack.store.postgres(), stack.store.sqlite()) {
        (Some(pool), _) => sqlx::query_as(sql).fetch_one(pool).await.unwrap(),
        (_, Some(pool)) => sqlx::query_as(sql).fetch_one(pool).await.unwrap(),
        _ => unreachable!(),
    };
    count
}

async fn an_interval_runs_once_a_second(deployment: Deployment) {
    let smtp = SmtpSink::start().await;
    let stack = stack_with_smtp(&smtp, deployment).await;
    let key = new_user(&stack, "ada").await;
    let client = stack.zap_client().await;
    let zap = client
        .clone()
        .create_zap(with_key(
            &key,
            pb::CreateZapRequest {
                name: "every second".into(),
                actions: vec![email_action(
                    "to@example.com",
                    "tick {{ run.scheduled_time }}",
                    "scheduled",
                )],
                trigger: Some(interval(1, pb::MissedTicks::RunLatest)),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .zap
        .unwrap();
    let created = time(zap.create_time.as_ref()).unwrap();
    let runs = wait_for_runs(&client, &key, &zap.id, 4).await;
    let times = scheduled_times(&runs);
    assert_consecutive(&times);
    // Counted from the zap's creation, a second at a time.
    // (Times are kept to the microsecond.)
    let first = times[0].timestamp_micros() - created.timestamp_micros();
    assert!(
        first % 1_000_000 == 0 && first >= 1_000_000,
        "first tick {} after creation {created}",
        times[0]
    );
    for run in &runs {
        assert_eq!(run.trigger, None, "a BASIC list leaves the payload out");
    }
    // Each run sends its email, whose subject names its tick
    // (`run.scheduled_time`), and a run's payload is `{}`.
    smtp.wait_for(4, WAIT).await;
    let subjects = smtp.sorted_subjects();
    let ticks: Vec<String> = times[..4]
        .iter()
        .map(|time| format!("tick {}", time.to_rfc3339()))
        .collect();
    assert!(subjects.starts_with(&ticks), "{subjects:?} for {ticks:?}");
    let run = client
        .clone()
        .get_run(with_key(
            &key,
            pb::GetRunRequest {
                id: runs[0].id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(run.scheduled_time, runs[0].scheduled_time);
    assert_eq!(
        run.trigger,
        Some(zapflow_proto::json::json_to_value(&serde_json::json!({})))
    );
    stack.stop().await;
}

/// Down (or paused) from `gap_start` until `resume`, the first claim after
/// `resume` happened at C (the creation time of its runs). A tick is on
/// time when claimed within half a second of it (half the 1 s period), so
/// the ticks missed lie in [gap_start + 1.5 s, C - 0.5 s): SKIP runs none
/// of them, RUN_LATEST exactly one (and after it, ticks go on each second).
fn assert_caught_up(
    runs: &[pb::Run],
    gap_start: DateTime<Utc>,
    resume: DateTime<Utc>,
    policy: pb::MissedTicks,
) {
    let created = |run: &pb::Run| time(run.create_time.as_ref()).unwrap();
    let claimed = runs
        .iter()
        .map(created)
        .filter(|created| *created >= resume)
        .min()
        .expect("runs after the gap");
    let window = gap_start + TimeDelta::milliseconds(1500)..claimed - TimeDelta::milliseconds(500);
    let times = scheduled_times(runs);
    let missed_runs = times.iter().filter(|time| window.contains(time)).count();
    let expected = match policy {
        pb::MissedTicks::RunLatest => 1,
        _ => 0,
    };
    assert_eq!(
        missed_runs, expected,
        "{policy:?}: runs for ticks in {window:?}: {times:?}"
    );
    let on_time: Vec<_> = times
        .iter()
        .copied()
        .filter(|time| *time >= window.end)
        .collect();
    assert!(on_time.len() >= 2, "{times:?}");
    assert_consecutive(&on_time);
    // Nothing ran for a tick during the gap but the one RUN_LATEST allows.
    let during: Vec<_> = times
        .iter()
        .filter(|time| **time > gap_start + TimeDelta::milliseconds(100) && **time < window.end)
        .collect();
    assert_eq!(during.len(), expected, "{policy:?}: {times:?}");
}

/// Two zaps ticking each second, one per policy.
async fn two_policies(client: &Client, key: &str) -> [(String, pb::MissedTicks); 2] {
    let mut zaps = Vec::new();
    for policy in [pb::MissedTicks::Skip, pb::MissedTicks::RunLatest] {
        let zap = create(client, key, Some(interval(1, policy)))
            .await
            .unwrap()
            .zap
            .unwrap();
        zaps.push((zap.id, policy));
    }
    zaps.try_into().unwrap()
}

async fn ticks_missed_while_down_follow_the_policy(deployment: Deployment) {
    let store = match deployment {
        Deployment::Embedded => zapflow_testkit::test_sqlite_store().await.store,
        _ => zapflow_testkit::test_store().await,
    };
    let bus = match deployment {
        Deployment::Distributed => Some(zapflow_testkit::test_bus(3).await),
        _ => None,
    };
    // The same deployment before and after the downtime.
    let group = unique("zapflow-workers");
    let options = || StackOptions {
        consumer_group: Some(group.clone()),
        ..StackOptions::default()
    };
    let stack = Stack::start(store.clone(), bus.clone(), options()).await;
    let key = new_user(&stack, "ada").await;
    let client = stack.zap_client().await;
    let zaps = two_policies(&client, &key).await;
    for (id, _) in &zaps {
        wait_for_runs(&client, &key, id, 2).await;
    }

    let down = Utc::now();
    stack.stop().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let up = Utc::now();
    let stack = Stack::start(store, bus, options()).await;
    let client = stack.zap_client().await;
    for (id, policy) in &zaps {
        let before = runs_of(&client, &key, id).await.len();
        let runs = wait_for_runs(&client, &key, id, before + 3).await;
        assert_caught_up(&runs, down, up, *policy);
    }
    stack.stop().await;
}

async fn ticks_missed_while_paused_follow_the_policy(deployment: Deployment) {
    let stack = stack_of(deployment, StackOptions::default()).await;
    let key = new_user(&stack, "ada").await;
    let client = stack.zap_client().await;
    let zaps = two_policies(&client, &key).await;
    for (id, _) in &zaps {
        wait_for_runs(&client, &key, id, 2).await;
    }
    for (id, _) in &zaps {
        client
            .clone()
            .pause_zap(with_key(&key, pb::PauseZapRequest { id: id.clone() }))
            .await
            .unwrap();
    }
    let paused = Utc::now();
    let counts: Vec<usize> =
        futures::future::join_all(zaps.iter().map(|(id, _)| runs_of(&client, &key, id)))
            .await
            .iter()
            .map(Vec::len)
            .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for ((id, _), count) in zaps.iter().zip(&counts) {
        let runs = runs_of(&client, &key, id).await;
        assert_eq!(runs.len(), *count, "a paused zap does not tick");
        assert_eq!(get(&client, &key, id).await.next_tick_time, None);
    }
    let resumed = Utc::now();
    for (id, _) in &zaps {
        client
            .clone()
            .resume_zap(with_key(&key, pb::ResumeZapRequest { id: id.clone() }))
            .await
            .unwrap();
    }
    for ((id, policy), count) in zaps.iter().zip(&counts) {
        let runs = wait_for_runs(&client, &key, id, count + 3).await;
        assert_caught_up(&runs, paused, resumed, *policy);
    }
    stack.stop().await;
}

async fn a_scheduled_zap_file_applies_unchanged(deployment: Deployment) {
    let stack = stack_of(deployment, StackOptions::default()).await;
    let key = new_user(&stack, "ada").await;
    let cli = Cli::of(&stack, &key);
    let file = cli.write(
        "report.yaml",
        "name: Daily report\n\
         trigger:\n  type: schedule\n  cron: \"30 8 * * MON-FRI\"\n  time_zone: Europe/Berlin\n\
         actions:\n\
         \x20 - type: email\n\
         \x20   config: {to: ops@example.com, subject: \"Report\", body: \"{{ run.id }}\"}\n",
    );
    let created = cli.ok(&["apply", "-f", path(&file)]).await;
    assert_eq!(changes(&created), ["created Daily report"]);
    assert!(!created.contains("webhook URL"), "{created}");

    let yaml = cli.ok(&["zaps", "get", "Daily report", "-o", "yaml"]).await;
    assert!(
        yaml.contains(
            "trigger:\n  type: schedule\n  cron: 30 8 * * MON-FRI\n  time_zone: Europe/Berlin\n  missed_ticks: skip\n"
        ),
        "{yaml}"
    );
    let round_trip = cli.write("round-trip.yaml", &yaml);
    let again = cli.ok(&["apply", "-f", path(&round_trip)]).await;
    assert_eq!(changes(&again), ["unchanged Daily report"]);
    let listed = cli.ok(&["zaps", "list"]).await;
    assert!(
        listed.contains("cron 30 8 * * MON-FRI (Europe/Berlin)"),
        "{listed}"
    );

    // An interval, then back to a webhook, which gets its URL then.
    let every = cli.write(
        "report.yaml",
        &yaml.replace(
            "  cron: 30 8 * * MON-FRI\n  time_zone: Europe/Berlin\n",
            "  every: 90s\n",
        ),
    );
    let updated = cli.ok(&["apply", "-f", path(&every)]).await;
    assert_eq!(changes(&updated), ["updated Daily report"]);
    let yaml = cli.ok(&["zaps", "get", "Daily report", "-o", "yaml"]).await;
    assert!(yaml.contains("  every: 1m30s\n"), "{yaml}");
    let refused = cli.write(
        "signed.yaml",
        &yaml.replace(
            "  every: 1m30s\n",
            "  every: 1m30s\n  require_signature: true\n",
        ),
    );
    let ran = cli.run(&["apply", "-f", path(&refused)]).await;
    assert_eq!(ran.code, 1, "{ran:?}");
    assert!(ran.stderr.contains("require_signature"), "{ran:?}");
    let hooked = cli.write(
        "report.yaml",
        "name: Daily report\ntrigger:\n  type: webhook\nactions:\n  - type: email\n    config: {to: ops@example.com, subject: Report, body: hi}\n",
    );
    let updated = cli.ok(&["apply", "-f", path(&hooked)]).await;
    assert_eq!(changes(&updated), ["updated Daily report"]);
    assert!(updated.contains("/hooks/catch/"), "{updated}");
    stack.stop().await;
}

/// The lines of an apply's output, less the webhook URLs and secrets.
fn changes(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|line| !line.starts_with("  "))
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// `zapflow all` processes sharing one PostgreSQL database; killed when
/// dropped.
struct Processes {
    dir: PathBuf,
    database_url: String,
    smtp_url: String,
    children: Vec<Child>,
    grpc: Vec<std::net::SocketAddr>,
}

impl Processes {
    fn spawn(&mut self) {
        let n = self.children.len();
        let (grpc, http, ingest) = (free_address(), free_address(), free_address());
        let log = self.dir.join(format!("zapflow-{n}.log"));
        let log = || {
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap()
        };
        let mut command = Command::new(env!("CARGO_BIN_EXE_zapflow"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ZAPFLOW_") {
                command.env_remove(name);
            }
        }
        let child = command
            .arg("all")
            .envs([
                ("ZAPFLOW_DATABASE_URL", self.database_url.clone()),
                ("ZAPFLOW_SMTP_URL", self.smtp_url.clone()),
                ("ZAPFLOW_GRPC_LISTEN", grpc.to_string()),
                ("ZAPFLOW_HTTP_LISTEN", http.to_string()),
                ("ZAPFLOW_INGEST_LISTEN", ingest.to_string()),
                ("ZAPFLOW_PUBLIC_URL", format!("http://{http}")),
                ("ZAPFLOW_ADMIN_LISTEN", "127.0.0.1:0".into()),
                (
                    "ZAPFLOW_DATA_DIR",
                    self.dir.join(format!("data-{n}")).display().to_string(),
                ),
                ("ZAPFLOW_POLL_INTERVAL_MS", "200".into()),
                ("RUST_LOG", "info,sqlx=warn,zapflow_server=debug".into()),
                ("NO_COLOR", "1".into()),
            ])
            .stdin(Stdio::null())
            .stdout(log())
            .stderr(log())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.children.push(child);
        self.grpc.push(grpc);
    }

    fn logs(&self) -> Vec<String> {
        (0..self.children.len())
            .map(|n| {
                std::fs::read_to_string(self.dir.join(format!("zapflow-{n}.log")))
                    .unwrap_or_default()
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_run_each_tick_once() {
    let smtp = SmtpSink::start().await;
    let database_url = zapflow_testkit::test_database_url().await;
    let store = zapflow_store::Store::open(&database_url, 4).await.unwrap();
    store.migrate().await.unwrap();
    let (_, key) = store.create_user("ada").await.unwrap();
    let key = key.to_string();
    let dir = std::env::temp_dir().join(unique("zapflow-schedules"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut processes = Processes {
        dir,
        database_url,
        smtp_url: smtp.url(),
        children: Vec::new(),
        grpc: Vec::new(),
    };
    for _ in 0..3 {
        processes.spawn();
    }
    let mut clients = Vec::new();
    for grpc in processes.grpc.clone() {
        let client = eventually("a zapflow process to answer", WAIT, || async move {
            ZapServiceClient::connect(format!("http://{grpc}"))
                .await
                .ok()
        })
        .await;
        clients.push(client);
    }
    let zap = clients[0]
        .clone()
        .create_zap(with_key(
            &key,
            pb::CreateZapRequest {
                name: "every second".into(),
                actions: vec![email_action("to@example.com", "tick {{ run.id }}", "b")],
                trigger: Some(interval(1, pb::MissedTicks::RunLatest)),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .zap
        .unwrap();

    wait_for_runs(&clients[1], &key, &zap.id, 12).await;
    clients[2]
        .clone()
        .pause_zap(with_key(&key, pb::PauseZapRequest { id: zap.id.clone() }))
        .await
        .unwrap();
    // Whatever was claimed before the pause, read once every claim ended.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = runs_of(&clients[0], &key, &zap.id).await;
    let times = scheduled_times(&runs);
    assert!(times.len() >= 12, "{times:?}");
    let mut per_tick = BTreeMap::new();
    for time in &times {
        *per_tick.entry(*time).or_insert(0) += 1;
    }
    assert!(
        per_tick.values().all(|count| *count == 1),
        "a tick ran twice: {per_tick:?}"
    );
    assert_consecutive(&times);
    // Each run sent its email once.
    let mails = smtp.wait_for(times.len(), WAIT).await;
    assert_eq!(mails.len(), times.len());
    // The runs were started by the processes' schedulers (logged at debug).
    let claimers = processes
        .logs()
        .iter()
        .filter(|log| log.contains("scheduled run started"))
        .count();
    assert!(claimers >= 1, "no process logged a scheduled run");
    eprintln!("{claimers} of 3 processes started scheduled runs");
}
