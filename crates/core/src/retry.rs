//! When a failed attempt is tried again.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter, capped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub multiplier: f64,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_secs(2),
            multiplier: 3.0,
            max_delay: Duration::from_secs(600),
        }
    }
}

/// Bounds on what an action may ask for.
const MAX_ATTEMPTS: u32 = 50;
const MAX_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

impl RetryPolicy {
    /// This policy with an action's overrides applied.
    pub fn with_override(self, changes: Option<&crate::RetryOverride>) -> Self {
        let Some(changes) = changes else { return self };
        Self {
            max_attempts: changes.max_attempts.unwrap_or(self.max_attempts),
            initial_delay: changes
                .initial_delay_ms
                .map_or(self.initial_delay, Duration::from_millis),
            multiplier: changes.multiplier.unwrap_or(self.multiplier),
            max_delay: changes
                .max_delay_ms
                .map_or(self.max_delay, Duration::from_millis),
        }
    }

    /// Checks an override; the error names the offending field.
    pub fn validate_override(changes: &crate::RetryOverride) -> Result<(), (&'static str, String)> {
        if let Some(attempts) = changes.max_attempts
            && !(1..=MAX_ATTEMPTS).contains(&attempts)
        {
            return Err((
                "max_attempts",
                format!("must be between 1 and {MAX_ATTEMPTS}"),
            ));
        }
        if let Some(multiplier) = changes.multiplier
            && !(1.0..=10.0).contains(&multiplier)
        {
            return Err(("multiplier", "must be between 1 and 10".into()));
        }
        for (field, delay) in [
            ("initial_delay", changes.initial_delay_ms),
            ("max_delay", changes.max_delay_ms),
        ] {
            if delay.is_some_and(|ms| ms == 0 || Duration::from_millis(ms) > MAX_DELAY) {
                return Err((field, "must be more than 0 and at most 24 hours".into()));
            }
        }
        Ok(())
    }

    /// The delay before the attempt after `attempt` (counted from 1), or
    /// `None` once the attempts are used up.
    pub fn delay_after(&self, attempt: u32) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let ceiling = self.initial_delay.as_secs_f64() * self.multiplier.powi(exponent);
        let ceiling = ceiling.min(self.max_delay.as_secs_f64());
        // Half fixed, half random: spreads a burst of failures without ever
        // retrying immediately.
        let jittered = ceiling / 2.0 + rand::rng().random_range(0.0..=ceiling / 2.0);
        Some(Duration::from_secs_f64(jittered))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_within_bounds_and_stop() {
        let policy = RetryPolicy::default();
        let mut previous_ceiling = 0.0;
        for attempt in 1..policy.max_attempts {
            let ceiling = (2.0 * 3f64.powi(attempt as i32 - 1)).min(600.0);
            for _ in 0..100 {
                let delay = policy.delay_after(attempt).unwrap().as_secs_f64();
                assert!(
                    delay >= ceiling / 2.0 && delay <= ceiling,
                    "{attempt}: {delay}"
                );
            }
            assert!(ceiling >= previous_ceiling);
            previous_ceiling = ceiling;
        }
        assert_eq!(policy.delay_after(policy.max_attempts), None);
    }

    proptest::proptest! {
        #[test]
        fn every_delay_is_within_half_and_all_of_its_capped_ceiling(
            max_attempts in 1u32..20,
            initial_ms in 1u64..60_000,
            multiplier in 1.0f64..10.0,
            max_ms in 1u64..3_600_000,
            attempt in 1u32..25,
        ) {
            let policy = RetryPolicy {
                max_attempts,
                initial_delay: Duration::from_millis(initial_ms),
                multiplier,
                max_delay: Duration::from_millis(max_ms),
            };
            match policy.delay_after(attempt) {
                None => proptest::prop_assert!(attempt >= max_attempts),
                Some(delay) => {
                    proptest::prop_assert!(attempt < max_attempts);
                    let ceiling = (initial_ms as f64 * multiplier.powi(attempt as i32 - 1)).min(max_ms as f64) / 1000.0;
                    let delay = delay.as_secs_f64();
                    proptest::prop_assert!(delay >= ceiling / 2.0 - 1e-9 && delay <= ceiling + 1e-9, "{} not in [{}, {}]", delay, ceiling / 2.0, ceiling);
                }
            }
        }

        #[test]
        fn ceilings_never_shrink_from_one_attempt_to_the_next(attempt in 1u32..30) {
            let policy = RetryPolicy { max_attempts: 40, ..RetryPolicy::default() };
            // The lower bound of the next delay is at least half the upper
            // bound of this one: later retries never come much sooner.
            let this = policy.delay_after(attempt).unwrap().as_secs_f64();
            let next = policy.delay_after(attempt + 1).unwrap().as_secs_f64();
            proptest::prop_assert!(next >= this / 2.0 - 1e-9);
        }
    }
}
