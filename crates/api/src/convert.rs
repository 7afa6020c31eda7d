//! Conversions between protobuf messages and domain types, all in one place.

use std::time::SystemTime;

use chrono::{DateTime, Utc};
use prost_types::Timestamp;
use zapflow_core::schedule::{Every, MissedTicks, Schedule, Trigger};
use zapflow_core::{ActionSpec, AttemptOutcome, RetryOverride, RunStatus, StepStatus, ZapStatus};
use zapflow_proto::json::{json_to_struct, json_to_value, struct_to_json};
use zapflow_proto::v1 as pb;

use crate::error::{ApiError, Result};

pub fn timestamp(time: DateTime<Utc>) -> Timestamp {
    Timestamp::from(SystemTime::from(time))
}

pub fn actions_from_proto(actions: &[pb::Action]) -> Vec<ActionSpec> {
    actions
        .iter()
        .map(|action| ActionSpec {
            action_type: action.r#type.clone(),
            config: action
                .config
                .as_ref()
                .map(struct_to_json)
                .unwrap_or_default(),
            retry: action.retry.as_ref().map(retry_from_proto),
        })
        .collect()
}

fn action_to_proto(action: &ActionSpec) -> pb::Action {
    pb::Action {
        r#type: action.action_type.clone(),
        config: Some(json_to_struct(&action.config)),
        retry: action.retry.as_ref().map(retry_to_proto),
    }
}

fn millis(duration: &prost_types::Duration) -> u64 {
    let millis = i128::from(duration.seconds) * 1000 + i128::from(duration.nanos) / 1_000_000;
    u64::try_from(millis.max(0)).unwrap_or(u64::MAX)
}

fn duration(millis: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (millis / 1000) as i64,
        nanos: ((millis % 1000) * 1_000_000) as i32,
    }
}

fn retry_from_proto(retry: &pb::RetryPolicy) -> RetryOverride {
    RetryOverride {
        max_attempts: (retry.max_attempts != 0).then_some(retry.max_attempts),
        initial_delay_ms: retry.initial_delay.as_ref().map(millis),
        multiplier: (retry.multiplier != 0.0).then_some(retry.multiplier),
        max_delay_ms: retry.max_delay.as_ref().map(millis),
    }
}

fn retry_to_proto(retry: &RetryOverride) -> pb::RetryPolicy {
    pb::RetryPolicy {
        max_attempts: retry.max_attempts.unwrap_or_default(),
        initial_delay: retry.initial_delay_ms.map(duration),
        multiplier: retry.multiplier.unwrap_or_default(),
        max_delay: retry.max_delay_ms.map(duration),
    }
}

fn step_status_to_proto(status: StepStatus) -> pb::StepStatus {
    match status {
        StepStatus::Pending => pb::StepStatus::Pending,
        StepStatus::Running => pb::StepStatus::Running,
        StepStatus::Retrying => pb::StepStatus::Retrying,
        StepStatus::Succeeded => pb::StepStatus::Succeeded,
        StepStatus::Failed => pb::StepStatus::Failed,
        StepStatus::Skipped => pb::StepStatus::Skipped,
    }
}

pub fn zap_to_proto(zap: &zapflow_store::Zap) -> pb::Zap {
    pb::Zap {
        id: zap.id.to_string(),
        name: zap.name.clone(),
        actions: zap.actions.iter().map(action_to_proto).collect(),
        status: match zap.status {
            ZapStatus::Active => pb::ZapStatus::Active,
            ZapStatus::Paused => pb::ZapStatus::Paused,
        } as i32,
        create_time: Some(timestamp(zap.created_at)),
        update_time: Some(timestamp(zap.updated_at)),
        signature_required: zap.signature_required,
        trigger: Some(trigger_to_proto(&zap.trigger)),
        next_tick_time: match zap.status {
            ZapStatus::Active => zap.next_tick_at.map(timestamp),
            ZapStatus::Paused => None,
        },
    }
}

fn trigger_to_proto(trigger: &Trigger) -> pb::Trigger {
    use pb::schedule_trigger::Every as PbEvery;
    let kind = match trigger {
        Trigger::Webhook => pb::trigger::Kind::Webhook(pb::WebhookTrigger {}),
        Trigger::Schedule(schedule) => pb::trigger::Kind::Schedule(pb::ScheduleTrigger {
            every: Some(match &schedule.every {
                Every::Cron(expression) => PbEvery::Cron(expression.clone()),
                Every::IntervalMs(millis) => PbEvery::Interval(duration(*millis)),
            }),
            time_zone: schedule.time_zone.clone(),
            missed_ticks: match schedule.missed_ticks {
                MissedTicks::Skip => pb::MissedTicks::Skip,
                MissedTicks::RunLatest => pb::MissedTicks::RunLatest,
            } as i32,
        }),
    };
    pb::Trigger { kind: Some(kind) }
}

/// A request's trigger, checked; `None` when unset.
pub fn trigger_from_proto(trigger: Option<&pb::Trigger>) -> Result<Option<Trigger>> {
    use pb::schedule_trigger::Every as PbEvery;
    let Some(trigger) = trigger else {
        return Ok(None);
    };
    let schedule = match &trigger.kind {
        None => return Err(ApiError::invalid("trigger", "set webhook or schedule")),
        Some(pb::trigger::Kind::Webhook(_)) => return Ok(Some(Trigger::Webhook)),
        Some(pb::trigger::Kind::Schedule(schedule)) => schedule,
    };
    let missed_ticks = match pb::MissedTicks::try_from(schedule.missed_ticks) {
        Ok(pb::MissedTicks::Unspecified | pb::MissedTicks::Skip) => MissedTicks::Skip,
        Ok(pb::MissedTicks::RunLatest) => MissedTicks::RunLatest,
        Err(_) => {
            return Err(ApiError::invalid(
                "trigger.schedule.missed_ticks",
                "not a MissedTicks value",
            ));
        }
    };
    let time_zone = schedule.time_zone.as_str();
    let schedule = match &schedule.every {
        None => {
            return Err(ApiError::invalid(
                "trigger.schedule",
                "set cron or interval",
            ));
        }
        Some(PbEvery::Cron(expression)) => Schedule::cron(expression, time_zone, missed_ticks),
        Some(PbEvery::Interval(interval)) => {
            let nanos = i128::from(interval.seconds) * 1_000_000_000 + i128::from(interval.nanos);
            let interval = u64::try_from(nanos)
                .map(std::time::Duration::from_nanos)
                .unwrap_or(std::time::Duration::ZERO);
            Schedule::interval(interval, time_zone, missed_ticks)
        }
    }
    .map_err(|error| {
        ApiError::invalid(format!("trigger.schedule.{}", error.field), error.message)
    })?;
    Ok(Some(Trigger::Schedule(schedule)))
}

fn run_status_to_proto(status: RunStatus) -> pb::RunStatus {
    match status {
        RunStatus::Pending => pb::RunStatus::Pending,
        RunStatus::Running => pb::RunStatus::Running,
        RunStatus::Succeeded => pb::RunStatus::Succeeded,
        RunStatus::Failed => pb::RunStatus::Failed,
    }
}

/// The statuses a request filters on (`field`); unspecified ones are refused.
pub fn run_statuses_from_proto(statuses: &[i32], field: &str) -> Result<Vec<RunStatus>> {
    statuses
        .iter()
        .map(|&status| match pb::RunStatus::try_from(status) {
            Ok(pb::RunStatus::Pending) => Ok(RunStatus::Pending),
            Ok(pb::RunStatus::Running) => Ok(RunStatus::Running),
            Ok(pb::RunStatus::Succeeded) => Ok(RunStatus::Succeeded),
            Ok(pb::RunStatus::Failed) => Ok(RunStatus::Failed),
            Ok(pb::RunStatus::Unspecified) | Err(_) => {
                Err(ApiError::invalid(field, "not a run status"))
            }
        })
        .collect()
}

/// A request's optional time (`field`).
pub fn time_from_proto(time: Option<&Timestamp>, field: &str) -> Result<Option<DateTime<Utc>>> {
    time.map(|time| {
        DateTime::from_timestamp(time.seconds, time.nanos.max(0) as u32)
            .ok_or_else(|| ApiError::invalid(field, "not a valid time"))
    })
    .transpose()
}

pub fn run_to_proto(run: &zapflow_store::Run) -> pb::Run {
    pb::Run {
        id: run.id.to_string(),
        zap_id: run.zap_id.to_string(),
        status: run_status_to_proto(run.status) as i32,
        trigger: Some(json_to_value(&run.trigger)),
        steps: run.steps.iter().map(step_to_proto).collect(),
        create_time: Some(timestamp(run.created_at)),
        update_time: Some(timestamp(run.updated_at)),
        finish_time: run.finished_at.map(timestamp),
        replay_of: run.replay_of.map(|id| id.to_string()).unwrap_or_default(),
        scheduled_time: run.scheduled_time.map(timestamp),
        stop_reason: run.stop_reason.clone().unwrap_or_default(),
        resume_time: run.resume_at.map(timestamp),
    }
}

pub fn dead_letter_to_proto(dead_letter: &zapflow_store::DeadLetter) -> pb::DeadLetter {
    pb::DeadLetter {
        id: dead_letter.id.to_string(),
        zap_id: dead_letter.zap_id.to_string(),
        run_id: dead_letter.run_id.to_string(),
        step: dead_letter.step,
        reason: dead_letter.reason.clone(),
        create_time: Some(timestamp(dead_letter.created_at)),
    }
}

fn step_to_proto(step: &zapflow_store::Step) -> pb::Step {
    pb::Step {
        index: step.index,
        action_type: step.action_type.clone(),
        status: step_status_to_proto(step.status) as i32,
        attempts: step.attempts,
        error: step.error.clone().unwrap_or_default(),
        output: step.output.as_ref().and_then(|output| match output {
            serde_json::Value::Object(map) => Some(json_to_struct(map)),
            _ => None,
        }),
        start_time: step.started_at.map(timestamp),
        finish_time: step.finished_at.map(timestamp),
        history: step
            .history
            .iter()
            .map(|attempt| pb::Attempt {
                number: attempt.number,
                outcome: attempt_outcome_to_proto(attempt.outcome) as i32,
                error: attempt.error.clone().unwrap_or_default(),
                finish_time: Some(timestamp(attempt.finished_at)),
            })
            .collect(),
    }
}

fn attempt_outcome_to_proto(outcome: AttemptOutcome) -> pb::StepStatus {
    match outcome {
        AttemptOutcome::Succeeded => pb::StepStatus::Succeeded,
        AttemptOutcome::Retrying => pb::StepStatus::Retrying,
        AttemptOutcome::Failed => pb::StepStatus::Failed,
    }
}

pub fn action_type_to_proto(kind: &zapflow_actions::ActionType) -> pb::ActionType {
    pb::ActionType {
        r#type: kind.name.into(),
        description: kind.description.into(),
        fields: kind
            .fields
            .iter()
            .map(|field| pb::ActionField {
                name: field.name.into(),
                description: field.description.into(),
                required: field.required,
                templated: field.templated,
            })
            .collect(),
        flow: kind.flow,
    }
}

/// Parses an id field of a request. A malformed id cannot name anything the
/// caller owns, so it is reported like an unknown one.
pub fn parse_id(text: &str, what: &'static str) -> Result<uuid::Uuid> {
    uuid::Uuid::parse_str(text).map_err(|_| ApiError::NotFound(what))
}

/// Parses a page token (the id to continue after), empty for the first page.
pub fn parse_page_token(text: &str) -> Result<Option<uuid::Uuid>> {
    if text.is_empty() {
        return Ok(None);
    }
    uuid::Uuid::parse_str(text)
        .map(Some)
        .map_err(|_| ApiError::invalid("page_token", "not a token from a previous page"))
}

/// The page size to use: 50 by default, at most 500.
pub fn page_size(requested: i32) -> Result<u32> {
    match requested {
        0 => Ok(50),
        1..=500 => Ok(requested as u32),
        _ => Err(ApiError::invalid("page_size", "must be between 1 and 500")),
    }
}
