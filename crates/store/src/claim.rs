//! Whether a step may run now: the one decision both stores make alike,
//! on the step's row locked inside the claiming transaction.

use chrono::{DateTime, Utc};
use zapflow_core::retry::RetryPolicy;
use zapflow_core::{Attempt, AttemptOutcome, StepStatus};

use crate::{Run, StepClaim};

/// A step's row as a claim reads it.
#[derive(Debug, Clone)]
pub(crate) struct StepState {
    pub status: StepStatus,
    /// Attempts started so far (claims, not recorded outcomes).
    pub attempts: u32,
    pub lease_until: Option<DateTime<Utc>>,
    pub retry_at: Option<DateTime<Utc>>,
}

/// What a claim does with the step.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Start the next attempt.
    Claim,
    /// Leave the step as it is and tell the caller why.
    Leave(StepClaim),
    /// Every attempt the policy allows was started: fail the step and the
    /// run, as an exhausted retry does.
    GiveUp {
        error: String,
        /// The history entry of an attempt whose worker never recorded it.
        abandoned: Option<Attempt>,
    },
}

/// The most attempts step `stage` of `run` may have: the worker's policy
/// with the action's override.
pub(crate) fn max_attempts(run: &Run, stage: u32, retry: &RetryPolicy) -> u32 {
    let action = run.actions.get(stage as usize);
    retry
        .with_override(action.and_then(|action| action.retry.as_ref()))
        .max_attempts
}

/// Decides on a step at `now`. A live lease wins over everything else (its
/// worker is running the last attempt); then a retry not yet due; then the
/// attempt cap, whatever brought the step back (an expired lease, a
/// duplicate event, a failed recording).
pub(crate) fn decide(state: &StepState, now: DateTime<Utc>, max_attempts: u32) -> Decision {
    match state.status {
        StepStatus::Succeeded | StepStatus::Failed | StepStatus::Skipped => {
            return Decision::Leave(StepClaim::AlreadyDone);
        }
        StepStatus::Running => {
            if let Some(lease_until) = state.lease_until.filter(|until| *until >= now) {
                return Decision::Leave(StepClaim::Busy { lease_until });
            }
        }
        StepStatus::Retrying => {
            if let Some(retry_at) = state.retry_at.filter(|due| *due > now) {
                return Decision::Leave(StepClaim::NotDue { retry_at });
            }
        }
        StepStatus::Pending => {}
    }
    if state.attempts < max_attempts {
        return Decision::Claim;
    }
    let attempts = state.attempts;
    if state.status == StepStatus::Running {
        let error = format!(
            "gave up after {attempts} attempts: the last one ended without a recorded outcome \
             (its worker stopped or lost the step)"
        );
        let abandoned = Attempt {
            number: attempts,
            outcome: AttemptOutcome::Failed,
            error: Some(error.clone()),
            finished_at: now,
        };
        Decision::GiveUp {
            error,
            abandoned: Some(abandoned),
        }
    } else {
        Decision::GiveUp {
            error: format!("gave up after {attempts} attempts (at most {max_attempts})"),
            abandoned: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    fn state(status: StepStatus, attempts: u32) -> StepState {
        StepState {
            status,
            attempts,
            lease_until: None,
            retry_at: None,
        }
    }

    #[test]
    fn decides_by_status_lease_due_time_and_cap() {
        let now = Utc::now();
        let later = now + TimeDelta::seconds(5);
        let earlier = now - TimeDelta::seconds(5);
        assert!(matches!(
            decide(&state(StepStatus::Pending, 0), now, 3),
            Decision::Claim
        ));
        for done in [StepStatus::Succeeded, StepStatus::Failed] {
            assert!(matches!(
                decide(&state(done, 9), now, 3),
                Decision::Leave(StepClaim::AlreadyDone)
            ));
        }
        let held = StepState {
            lease_until: Some(later),
            ..state(StepStatus::Running, 3)
        };
        assert!(matches!(
            decide(&held, now, 3),
            Decision::Leave(StepClaim::Busy { .. })
        ));
        let lapsed = StepState {
            lease_until: Some(earlier),
            ..state(StepStatus::Running, 2)
        };
        assert!(matches!(decide(&lapsed, now, 3), Decision::Claim));
        assert!(matches!(
            decide(&lapsed, now, 2),
            Decision::GiveUp {
                abandoned: Some(_),
                ..
            }
        ));
        let waiting = StepState {
            retry_at: Some(later),
            ..state(StepStatus::Retrying, 1)
        };
        assert!(matches!(
            decide(&waiting, now, 3),
            Decision::Leave(StepClaim::NotDue { .. })
        ));
        let due = StepState {
            retry_at: Some(earlier),
            ..waiting
        };
        assert!(matches!(decide(&due, now, 3), Decision::Claim));
        assert!(matches!(
            decide(&due, now, 1),
            Decision::GiveUp {
                abandoned: None,
                ..
            }
        ));
    }
}
