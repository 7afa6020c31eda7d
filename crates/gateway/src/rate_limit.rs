//! Keyed rate limits kept in memory, one limiter per kind of key (a zap, a
//! source address): `governor`'s GCRA over a sharded map.
//!
//! Each key's state is a single instant, its "theoretical arrival time"
//! (the GCRA form of a token bucket): when its bucket will be full again.
//! A key whose bucket has refilled answers exactly like a key never seen,
//! so it can be dropped without changing any answer; the limiter drops such
//! keys as it goes, which bounds memory by the keys active in the last
//! `burst / rate` seconds (one second at least).
//!
//! Time is tokio's clock, so that tests can pause and advance it.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::Quota;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use tokio::time::Instant;

/// The shortest time between sweeps of idle keys, so that a limiter with a
/// tiny burst window does not walk its map on nearly every request.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The longest a bucket may take to refill completely; keeps instant
/// arithmetic far from overflow.
const MAX_REFILL: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// A request refused: the caller should wait this long (the `Retry-After`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds for the `Retry-After` header, rounded up and at least 1,
    /// so a client that waits that long will be let through.
    pub fn as_header_secs(&self) -> u64 {
        let secs = self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0);
        secs.max(1)
    }
}

/// Allows `burst` requests per key at once, refilled at `rate_per_second`.
pub struct RateLimiter<K: Hash + Eq + Clone> {
    limiter: governor::RateLimiter<K, DashMapStateStore<K>, TokioClock, NoOpMiddleware<Nanos>>,
    clock: TokioClock,
    /// How long idle keys may pile up between sweeps.
    sweep_interval: Duration,
    /// When the next sweep of idle keys is due, in [`TokioClock`]
    /// nanoseconds. The check that moves it forward does the sweep; the
    /// others go on without waiting.
    next_sweep: AtomicU64,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// # Panics
    ///
    /// If `rate_per_second` is not a positive finite number, `burst` is 0, or
    /// an empty bucket would take more than a year to refill: settings are
    /// validated before they get here.
    pub fn new(rate_per_second: f64, burst: u32) -> Self {
        assert!(
            rate_per_second.is_finite() && rate_per_second > 0.0,
            "rate limit must be positive, got {rate_per_second}"
        );
        let burst = NonZeroU32::new(burst).expect("rate limit burst must be at least 1");
        let interval = Duration::try_from_secs_f64(1.0 / rate_per_second)
            .ok()
            .filter(|interval| *interval <= MAX_REFILL)
            .expect("rate limit must refill a bucket within a year");
        let capacity = interval
            .checked_mul(burst.get())
            .filter(|capacity| *capacity <= MAX_REFILL)
            .expect("rate limit must refill a bucket within a year");
        // A rate too high for nanoseconds to tell apart is as good as none.
        let quota = Quota::with_period(interval.max(Duration::from_nanos(1)))
            .expect("the period is positive")
            .allow_burst(burst);
        let clock = TokioClock {
            origin: Instant::now(),
        };
        let sweep_interval = capacity.max(MIN_SWEEP_INTERVAL);
        Self {
            limiter: governor::RateLimiter::dashmap_with_clock(quota, clock),
            clock,
            sweep_interval,
            next_sweep: AtomicU64::new(Nanos::from(sweep_interval).as_u64()),
        }
    }

    /// Takes a token from `key`'s bucket now, or says how long until one is
    /// there.
    pub fn check(&self, key: &K) -> Result<(), RetryAfter> {
        let now = self.clock.now();
        self.sweep_when_due(now);
        self.limiter
            .check_key(key)
            .map_err(|refused| RetryAfter(refused.wait_time_from(now)))
    }

    /// Drops every key whose bucket has refilled. Runs on its own during
    /// [`check`](Self::check); calling it is only useful to free memory
    /// after a burst of traffic has stopped.
    pub fn evict_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// How many keys are held, for metrics and tests.
    pub fn tracked_keys(&self) -> usize {
        self.limiter.len()
    }

    fn sweep_when_due(&self, now: Nanos) {
        let now = now.as_u64();
        let due = self.next_sweep.load(Ordering::Relaxed);
        if now < due {
            return;
        }
        let next = now.saturating_add(Nanos::from(self.sweep_interval).as_u64());
        if self
            .next_sweep
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.evict_idle();
        }
    }
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for RateLimiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("sweep_interval", &self.sweep_interval)
            .finish_non_exhaustive()
    }
}

/// tokio's clock, as the time since the limiter was made.
#[derive(Debug, Clone, Copy)]
struct TokioClock {
    origin: Instant,
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.origin.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use tokio::time::advance;

    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_allowed_then_limited_with_a_retry_after() {
        let limiter = RateLimiter::new(2.0, 5);
        for _ in 0..5 {
            assert_eq!(limiter.check(&"zap"), Ok(()));
        }
        // 2 per second: the next token is half a second away.
        assert_eq!(limiter.check(&"zap"), Err(RetryAfter(ms(500))));
        advance(ms(200)).await;
        assert_eq!(limiter.check(&"zap"), Err(RetryAfter(ms(300))));
    }

    #[tokio::test(start_paused = true)]
    async fn refused_requests_do_not_use_up_tokens() {
        let limiter = RateLimiter::new(1.0, 1);
        assert_eq!(limiter.check(&"zap"), Ok(()));
        for _ in 0..100 {
            assert!(limiter.check(&"zap").is_err());
        }
        advance(ms(1000)).await;
        assert_eq!(limiter.check(&"zap"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_refill_at_the_rate_up_to_the_burst() {
        let limiter = RateLimiter::new(10.0, 3);
        for _ in 0..3 {
            limiter.check(&"zap").unwrap();
        }
        assert!(limiter.check(&"zap").is_err());

        // One token after 100 ms, and only one.
        advance(ms(100)).await;
        assert_eq!(limiter.check(&"zap"), Ok(()));
        assert_eq!(limiter.check(&"zap"), Err(RetryAfter(ms(100))));

        // A long pause refills the bucket to the burst, not beyond.
        advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert_eq!(limiter.check(&"zap"), Ok(()));
        }
        assert!(limiter.check(&"zap").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_the_retry_after_is_enough() {
        let limiter = RateLimiter::new(3.0, 2);
        let mut allowed = 0;
        for _ in 0..50 {
            match limiter.check(&"zap") {
                Ok(()) => allowed += 1,
                Err(RetryAfter(wait)) => {
                    advance(wait).await;
                    assert_eq!(limiter.check(&"zap"), Ok(()));
                    allowed += 1;
                }
            }
        }
        assert_eq!(allowed, 50);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flooded_key_does_not_limit_another() {
        let limiter = RateLimiter::new(1.0, 2);
        for _ in 0..1000 {
            let _ = limiter.check(&"flooded");
        }
        assert!(limiter.check(&"flooded").is_err());
        assert_eq!(limiter.check(&"quiet"), Ok(()));
        assert_eq!(limiter.check(&"quiet"), Ok(()));
        assert!(limiter.check(&"quiet").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn works_with_address_keys() {
        let limiter = RateLimiter::<IpAddr>::new(1.0, 1);
        let one = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let two = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
        assert_eq!(limiter.check(&one), Ok(()));
        assert!(limiter.check(&one).is_err());
        assert_eq!(limiter.check(&two), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_evicted_once_refilled() {
        // A token every 100 ms: a key checked once is full again 100 ms
        // later, and governor drops it one token's time after that.
        let limiter = RateLimiter::new(10.0, 5);
        for key in 0..100 {
            limiter.check(&key).unwrap();
        }
        advance(ms(50)).await;
        limiter.check(&1000).unwrap();
        assert_eq!(limiter.tracked_keys(), 101);

        // Still refilling: nothing may be dropped yet.
        advance(ms(49)).await;
        limiter.evict_idle();
        assert_eq!(limiter.tracked_keys(), 101);

        advance(ms(101)).await;
        limiter.evict_idle();
        assert_eq!(limiter.tracked_keys(), 1);
        advance(ms(50)).await;
        limiter.evict_idle();
        assert_eq!(limiter.tracked_keys(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_new_keys_stays_bounded_without_explicit_eviction() {
        let limiter = RateLimiter::<u64>::new(100.0, 1);
        // One new key every millisecond for 100 s; each is idle after 10 ms.
        for key in 0..100_000u64 {
            limiter.check(&key).unwrap();
            advance(ms(1)).await;
        }
        // Idle keys are swept once a second: at most the keys of the last
        // two seconds are held.
        let tracked = limiter.tracked_keys();
        assert!(tracked <= 2_000, "{tracked} keys held");
        // Evicting an idle key changes no answer: it comes back with a full
        // bucket.
        assert_eq!(limiter.check(&0), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn check_follows_the_runtime_clock() {
        let limiter = RateLimiter::new(1.0, 1);
        assert_eq!(limiter.check(&"zap"), Ok(()));
        let Err(retry) = limiter.check(&"zap") else {
            panic!("second request in the same instant was allowed");
        };
        assert_eq!(retry.0, Duration::from_secs(1));
        tokio::time::advance(retry.0).await;
        assert_eq!(limiter.check(&"zap"), Ok(()));
    }

    #[test]
    fn retry_after_header_rounds_up() {
        assert_eq!(RetryAfter(ms(1)).as_header_secs(), 1);
        assert_eq!(RetryAfter(ms(1000)).as_header_secs(), 1);
        assert_eq!(RetryAfter(ms(1001)).as_header_secs(), 2);
        assert_eq!(RetryAfter(Duration::ZERO).as_header_secs(), 1);
    }

    #[test]
    #[should_panic(expected = "rate limit must be positive")]
    fn a_zero_rate_is_refused() {
        let _ = RateLimiter::<String>::new(0.0, 1);
    }

    #[test]
    #[should_panic(expected = "within a year")]
    fn a_rate_too_slow_to_represent_is_refused() {
        let _ = RateLimiter::<String>::new(1e-30, u32::MAX);
    }

    /// Nanoseconds per check, printed; run by hand with
    /// `cargo test --release -p zapflow-gateway rate_limit::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing loop to run by hand"]
    fn timing() {
        use std::net::{IpAddr, Ipv4Addr};
        const CHECKS: u32 = 2_000_000;
        let time = |name: &str, mut check: Box<dyn FnMut(u32) -> bool>| {
            let started = std::time::Instant::now();
            let mut allowed = 0u32;
            for n in 0..CHECKS {
                allowed += u32::from(check(n));
            }
            let per_check = started.elapsed().as_nanos() / u128::from(CHECKS);
            println!("{name}: {per_check} ns per check ({allowed} allowed)");
        };
        let zap = uuid::Uuid::from_u128(7);
        let generous = RateLimiter::<uuid::Uuid>::new(1e9, 1_000_000_000);
        time(
            "one key, allowed",
            Box::new(move |_| generous.check(&zap).is_ok()),
        );
        let strict = RateLimiter::<uuid::Uuid>::new(1.0, 1);
        time(
            "one key, refused",
            Box::new(move |_| strict.check(&zap).is_ok()),
        );
        let addresses = RateLimiter::<IpAddr>::new(1e9, 1_000_000_000);
        time(
            "100,000 addresses in turn",
            Box::new(move |n| {
                let address = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n % 100_000));
                addresses.check(&address).is_ok()
            }),
        );
    }
}
