//! WatchRuns: what happens to an owner's runs, found by looking at when
//! they last changed.
//!
//! Every write that moves a run on (a step started, an attempt ended) sets
//! its `updated_at`, in the database every process shares, so one query by
//! change time sees the work of every process and every deployment alike,
//! without a broker or a notification channel. Each stream looks a few
//! times a second and tells what changed since it last looked.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;
use zapflow_core::{RunStatus, StepStatus};
use zapflow_proto::v1 as pb;
use zapflow_store::{Run, Store};

use crate::convert::run_to_proto;
use crate::error::{ApiError, Result};

/// How often a stream looks for changes.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How far before the newest change seen each look starts again. Times are
/// taken before a transaction commits, so a change stamped earlier can
/// become visible after a later one; changes already told are recognised
/// and not told twice.
const LOOKBACK: TimeDelta = TimeDelta::seconds(3);
/// Most changed runs one look reads.
const BATCH: u32 = 500;
/// Events waiting for a slow reader before the stream stops looking.
const BUFFER: usize = 256;

type Event = std::result::Result<pb::WatchRunsResponse, Status>;

/// One WatchRuns stream: its filter and what it has told so far.
pub(crate) struct RunWatch {
    store: Store,
    owner: Uuid,
    zap_id: Option<Uuid>,
    statuses: Vec<RunStatus>,
    /// Changes before this are not the watcher's concern.
    since: DateTime<Utc>,
    /// The newest change seen: the next look starts [`LOOKBACK`] before it.
    cursor: DateTime<Utc>,
    /// The last look read a full batch: the next one goes on from the
    /// cursor itself, so that a burst cannot hold the stream in place.
    behind: bool,
    /// What was told of each run under way, and of each run finished within
    /// [`LOOKBACK`] of the cursor.
    told: HashMap<Uuid, Told>,
}

/// A run as a stream last told it.
#[derive(Debug, Clone, PartialEq)]
struct Told {
    updated_at: DateTime<Utc>,
    status: RunStatus,
    /// Each step's status and attempts.
    steps: Vec<(StepStatus, u32)>,
}

impl Told {
    fn of(run: &Run) -> Self {
        Self {
            updated_at: run.updated_at,
            status: run.status,
            steps: run
                .steps
                .iter()
                .map(|step| (step.status, step.attempts))
                .collect(),
        }
    }
}

impl RunWatch {
    pub(crate) fn new(
        store: Store,
        owner: Uuid,
        zap_id: Option<Uuid>,
        statuses: Vec<RunStatus>,
        since: DateTime<Utc>,
    ) -> Self {
        Self {
            store,
            owner,
            zap_id,
            statuses,
            since,
            cursor: since,
            behind: false,
            told: HashMap::new(),
        }
    }

    /// Looks until the client goes away or `shutdown`, sending what it
    /// finds to the stream returned.
    pub(crate) fn spawn(mut self, shutdown: CancellationToken) -> ReceiverStream<Event> {
        let (sender, receiver) = mpsc::channel(BUFFER);
        tokio::spawn(async move {
            loop {
                match self.look().await {
                    Ok(events) => {
                        for event in events {
                            if sender.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                    }
                    // The next look may find the database back.
                    Err(ApiError::Unavailable) => {}
                    Err(error) => {
                        let _ = sender.send(Err(error.into())).await;
                        return;
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => {
                        let reconnect = Status::unavailable("zapflow is shutting down; reconnect to go on watching");
                        let _ = sender.send(Err(reconnect)).await;
                        return;
                    }
                    () = sender.closed() => return,
                    () = tokio::time::sleep(POLL_INTERVAL) => {}
                }
            }
        });
        ReceiverStream::new(receiver)
    }

    /// One look: the events of the runs changed since the last.
    async fn look(&mut self) -> Result<Vec<pb::WatchRunsResponse>> {
        let from = if self.behind {
            self.cursor
        } else {
            (self.cursor - LOOKBACK).max(self.since)
        };
        let changes = self
            .store
            .runs_changed_since(self.owner, self.zap_id, from, BATCH)
            .await
            .map_err(run_error)?;
        self.behind = changes.len() == BATCH as usize;
        let mut events = Vec::new();
        for change in changes {
            self.cursor = self.cursor.max(change.updated_at);
            let previous = self.told.get(&change.id);
            if previous.is_some_and(|told| told.updated_at == change.updated_at) {
                continue;
            }
            let run = self
                .store
                .run_without_payload(self.owner, change.id)
                .await
                .map_err(run_error)?;
            if self.statuses.is_empty() || self.statuses.contains(&run.status) {
                let proto = run_to_proto(&run);
                events.extend(
                    news(previous, &run, self.since)
                        .into_iter()
                        .map(|(kind, step)| pb::WatchRunsResponse {
                            kind: kind as i32,
                            run: Some(pb::Run {
                                trigger: None,
                                ..proto.clone()
                            }),
                            step,
                        }),
                );
            }
            self.told.insert(run.id, Told::of(&run));
        }
        // A run still under way may change again long after (a delayed
        // retry): it stays known, so that it is not told as new then.
        let horizon = self.cursor - LOOKBACK;
        self.told
            .retain(|_, told| told.updated_at >= horizon || !told.status.is_final());
        Ok(events)
    }
}

fn run_error(error: zapflow_store::StoreError) -> ApiError {
    ApiError::from_store(error, "run")
}

/// What is new about `run` since it was told as `previous` (never told:
/// what happened to it at or after `since`).
fn news(previous: Option<&Told>, run: &Run, since: DateTime<Utc>) -> Vec<(pb::RunEventKind, u32)> {
    let mut news = Vec::new();
    if previous.is_none() && run.created_at >= since {
        news.push((pb::RunEventKind::Accepted, 0));
    }
    for step in &run.steps {
        let ended = matches!(
            step.status,
            StepStatus::Succeeded | StepStatus::Failed | StepStatus::Retrying
        );
        let is_new = match previous {
            Some(told) => {
                told.steps.get(step.index as usize) != Some(&(step.status, step.attempts))
            }
            None => step
                .history
                .last()
                .is_some_and(|attempt| attempt.finished_at >= since),
        };
        if ended && is_new {
            news.push((pb::RunEventKind::StepFinished, step.index));
        }
    }
    let was_final = previous.is_some_and(|told| told.status.is_final());
    let finished_since = run.finished_at.is_some_and(|at| at >= since);
    if run.status.is_final() && !was_final && (previous.is_some() || finished_since) {
        news.push((pb::RunEventKind::Finished, 0));
    }
    news
}

#[cfg(test)]
mod tests {
    use zapflow_core::{Attempt, AttemptOutcome};
    use zapflow_store::Step;

    use super::*;

    fn step(index: u32, status: StepStatus, attempts: u32, at: DateTime<Utc>) -> Step {
        let outcome = match status {
            StepStatus::Succeeded => Some(AttemptOutcome::Succeeded),
            StepStatus::Failed => Some(AttemptOutcome::Failed),
            StepStatus::Retrying => Some(AttemptOutcome::Retrying),
            _ => None,
        };
        Step {
            index,
            action_type: "email".into(),
            status,
            attempts,
            output: None,
            error: None,
            started_at: None,
            finished_at: None,
            history: outcome
                .map(|outcome| Attempt {
                    number: attempts,
                    outcome,
                    error: None,
                    finished_at: at,
                })
                .into_iter()
                .collect(),
        }
    }

    fn run(status: RunStatus, steps: Vec<Step>, at: DateTime<Utc>) -> Run {
        Run {
            id: Uuid::now_v7(),
            zap_id: Uuid::now_v7(),
            owner_id: Uuid::now_v7(),
            status,
            trigger: serde_json::Value::Null,
            headers: serde_json::Value::Null,
            query: serde_json::Value::Null,
            actions: Vec::new(),
            steps,
            replay_of: None,
            created_at: at,
            updated_at: at,
            finished_at: status.is_final().then_some(at),
            scheduled_time: None,
            stop_reason: None,
            resume_at: None,
        }
    }

    use pb::RunEventKind::{Accepted, Finished, StepFinished};

    #[test]
    fn a_run_first_seen_finished_tells_its_whole_story() {
        let now = Utc::now();
        let finished = run(
            RunStatus::Succeeded,
            vec![
                step(0, StepStatus::Succeeded, 1, now),
                step(1, StepStatus::Succeeded, 2, now),
            ],
            now,
        );
        assert_eq!(
            news(None, &finished, now),
            vec![
                (Accepted, 0),
                (StepFinished, 0),
                (StepFinished, 1),
                (Finished, 0)
            ]
        );
    }

    #[test]
    fn only_what_changed_since_last_told() {
        let now = Utc::now();
        let running = run(
            RunStatus::Running,
            vec![
                step(0, StepStatus::Succeeded, 1, now),
                step(1, StepStatus::Retrying, 1, now),
            ],
            now,
        );
        let told = Told::of(&running);
        let mut failed = running.clone();
        failed.status = RunStatus::Failed;
        failed.steps[1] = step(1, StepStatus::Failed, 2, now);
        assert_eq!(
            news(Some(&told), &failed, now),
            vec![(StepFinished, 1), (Finished, 0)]
        );
        assert_eq!(news(Some(&Told::of(&failed)), &failed, now), vec![]);
    }

    #[test]
    fn what_happened_before_the_watch_began_is_not_told() {
        let before = Utc::now() - TimeDelta::seconds(60);
        let since = Utc::now();
        let mut old = run(
            RunStatus::Running,
            vec![
                step(0, StepStatus::Succeeded, 1, before),
                step(1, StepStatus::Running, 1, before),
            ],
            before,
        );
        assert_eq!(news(None, &old, since), vec![]);
        old.status = RunStatus::Succeeded;
        old.finished_at = Some(since);
        old.steps[1] = step(1, StepStatus::Succeeded, 1, since);
        assert_eq!(
            news(None, &old, since),
            vec![(StepFinished, 1), (Finished, 0)]
        );
    }
}
