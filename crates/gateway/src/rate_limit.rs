//! A keyed token-bucket rate limiter kept in memory, one instance per kind
//! of key (a zap, a source address).
//!
//! Each key's bucket is a single instant, its "theoretical arrival time"
//! (the GCRA form of a token bucket): the moment the bucket would be full
//! again. A key whose instant has passed holds a full bucket, exactly like a
//! key never seen, so it can be dropped without changing any answer; that
//! is how memory stays bounded by the keys active in the last
//! `burst / rate` seconds.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Independent maps, so that requests for different keys rarely wait on the
/// same lock.
const SHARDS: usize = 16;

/// A shard is swept early once it holds this many keys (and then again at
/// twice what the sweep left), so a flood of new keys is trimmed well before
/// the timed sweep.
const MIN_SWEEP_LEN: usize = 1024;

/// The shortest time between timed sweeps of a shard, so that a limiter with
/// a tiny burst window does not walk its map on nearly every request.
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
pub struct RateLimiter<K> {
    /// The time one token takes to refill.
    interval: Duration,
    /// How far a key's arrival time may run ahead of now: a full bucket.
    capacity: Duration,
    hasher: RandomState,
    shards: Box<[Mutex<Shard<K>>]>,
}

struct Shard<K> {
    /// Per key, when its bucket will be full again.
    full_at: HashMap<K, Instant>,
    /// When the next timed sweep of idle keys is due.
    next_sweep: Instant,
    /// The size at which a sweep is due before `next_sweep`.
    sweep_at_len: usize,
}

impl<K: Hash + Eq> RateLimiter<K> {
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
        assert!(burst > 0, "rate limit burst must be at least 1");
        let interval = Duration::try_from_secs_f64(1.0 / rate_per_second)
            .ok()
            .filter(|interval| *interval <= MAX_REFILL)
            .expect("rate limit must refill a bucket within a year");
        let capacity = interval
            .checked_mul(burst)
            .filter(|capacity| *capacity <= MAX_REFILL)
            .expect("rate limit must refill a bucket within a year");
        let now = Instant::now();
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    full_at: HashMap::new(),
                    next_sweep: now + capacity.max(MIN_SWEEP_INTERVAL),
                    sweep_at_len: MIN_SWEEP_LEN,
                })
            })
            .collect();
        Self {
            interval,
            capacity,
            hasher: RandomState::new(),
            shards,
        }
    }

    /// Takes a token from `key`'s bucket now, or says how long until one is
    /// there.
    pub fn check<Q>(&self, key: &Q) -> Result<(), RetryAfter>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.check_at(key, Instant::now())
    }

    /// [`check`](Self::check) at a given time; `now` should not go backwards
    /// between calls.
    pub fn check_at<Q>(&self, key: &Q, now: Instant) -> Result<(), RetryAfter>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut shard = self.shard(key);
        if now >= shard.next_sweep || shard.full_at.len() >= shard.sweep_at_len {
            self.sweep(&mut shard, now);
        }
        let full_at = shard.full_at.get(key).copied().unwrap_or(now).max(now);
        let next_full_at = full_at + self.interval;
        let ahead = next_full_at - now;
        if ahead > self.capacity {
            return Err(RetryAfter(ahead - self.capacity));
        }
        match shard.full_at.get_mut(key) {
            Some(entry) => *entry = next_full_at,
            None => {
                shard.full_at.insert(key.to_owned(), next_full_at);
            }
        }
        Ok(())
    }

    /// Drops every key whose bucket has refilled completely. Runs on its own
    /// during [`check`](Self::check); calling it is only useful to free memory
    /// after a burst of traffic has stopped.
    pub fn evict_idle(&self) {
        self.evict_idle_at(Instant::now());
    }

    /// [`evict_idle`](Self::evict_idle) at a given time.
    pub fn evict_idle_at(&self, now: Instant) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            self.sweep(&mut shard, now);
        }
    }

    /// How many keys are held, for metrics and tests.
    pub fn tracked_keys(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
                shard.full_at.len()
            })
            .sum()
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> std::sync::MutexGuard<'_, Shard<K>> {
        let index = self.hasher.hash_one(key) as usize % SHARDS;
        // A panic while holding the lock leaves at worst one stale instant.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn sweep(&self, shard: &mut Shard<K>, now: Instant) {
        shard.full_at.retain(|_, full_at| *full_at > now);
        shard.next_sweep = now + self.capacity.max(MIN_SWEEP_INTERVAL);
        shard.sweep_at_len = (shard.full_at.len() * 2).max(MIN_SWEEP_LEN);
    }
}

impl<K> std::fmt::Debug for RateLimiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("interval", &self.interval)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn a_burst_is_allowed_then_limited_with_a_retry_after() {
        let limiter = RateLimiter::<String>::new(2.0, 5);
        let start = Instant::now();
        for _ in 0..5 {
            assert_eq!(limiter.check_at("zap", start), Ok(()));
        }
        // 2 per second: the next token is half a second away.
        assert_eq!(limiter.check_at("zap", start), Err(RetryAfter(ms(500))));
        assert_eq!(
            limiter.check_at("zap", start + ms(200)),
            Err(RetryAfter(ms(300)))
        );
    }

    #[test]
    fn refused_requests_do_not_use_up_tokens() {
        let limiter = RateLimiter::<String>::new(1.0, 1);
        let start = Instant::now();
        assert_eq!(limiter.check_at("zap", start), Ok(()));
        for _ in 0..100 {
            assert!(limiter.check_at("zap", start).is_err());
        }
        assert_eq!(limiter.check_at("zap", start + ms(1000)), Ok(()));
    }

    #[test]
    fn tokens_refill_at_the_rate_up_to_the_burst() {
        let limiter = RateLimiter::<String>::new(10.0, 3);
        let start = Instant::now();
        for _ in 0..3 {
            limiter.check_at("zap", start).unwrap();
        }
        assert!(limiter.check_at("zap", start).is_err());

        // One token after 100 ms, and only one.
        let later = start + ms(100);
        assert_eq!(limiter.check_at("zap", later), Ok(()));
        assert_eq!(limiter.check_at("zap", later), Err(RetryAfter(ms(100))));

        // A long pause refills the bucket to the burst, not beyond.
        let much_later = later + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(limiter.check_at("zap", much_later), Ok(()));
        }
        assert!(limiter.check_at("zap", much_later).is_err());
    }

    #[test]
    fn waiting_the_retry_after_is_enough() {
        let limiter = RateLimiter::<String>::new(3.0, 2);
        let mut now = Instant::now();
        let mut allowed = 0;
        for _ in 0..50 {
            match limiter.check_at("zap", now) {
                Ok(()) => allowed += 1,
                Err(RetryAfter(wait)) => {
                    now += wait;
                    assert_eq!(limiter.check_at("zap", now), Ok(()));
                    allowed += 1;
                }
            }
        }
        assert_eq!(allowed, 50);
    }

    #[test]
    fn a_flooded_key_does_not_limit_another() {
        let limiter = RateLimiter::<String>::new(1.0, 2);
        let now = Instant::now();
        for _ in 0..1000 {
            let _ = limiter.check_at("flooded", now);
        }
        assert!(limiter.check_at("flooded", now).is_err());
        assert_eq!(limiter.check_at("quiet", now), Ok(()));
        assert_eq!(limiter.check_at("quiet", now), Ok(()));
        assert!(limiter.check_at("quiet", now).is_err());
    }

    #[test]
    fn works_with_address_keys() {
        let limiter = RateLimiter::<IpAddr>::new(1.0, 1);
        let now = Instant::now();
        let one = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let two = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
        assert_eq!(limiter.check_at(&one, now), Ok(()));
        assert!(limiter.check_at(&one, now).is_err());
        assert_eq!(limiter.check_at(&two, now), Ok(()));
    }

    #[test]
    fn idle_keys_are_evicted_once_refilled() {
        let limiter = RateLimiter::<String>::new(10.0, 5);
        let start = Instant::now();
        for key in 0..100 {
            limiter.check_at(&key.to_string(), start).unwrap();
        }
        limiter.check_at("busy", start + ms(400)).unwrap();
        assert_eq!(limiter.tracked_keys(), 101);

        // Still refilling: nothing may be dropped yet.
        limiter.evict_idle_at(start + ms(99));
        assert_eq!(limiter.tracked_keys(), 101);

        limiter.evict_idle_at(start + ms(100));
        assert_eq!(limiter.tracked_keys(), 1);
        limiter.evict_idle_at(start + ms(500));
        assert_eq!(limiter.tracked_keys(), 0);
    }

    #[test]
    fn a_flood_of_new_keys_stays_bounded_without_explicit_eviction() {
        let limiter = RateLimiter::<u64>::new(100.0, 1);
        let start = Instant::now();
        // One new key every millisecond for 100 s; each is idle after 10 ms.
        for key in 0..100_000u64 {
            limiter.check_at(&key, start + ms(key)).unwrap();
        }
        let tracked = limiter.tracked_keys();
        assert!(tracked <= SHARDS * MIN_SWEEP_LEN, "{tracked} keys held");
        // Evicting an idle key changes no answer: it comes back with a full
        // bucket.
        assert_eq!(limiter.check_at(&0, start + ms(100_000)), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn check_follows_the_runtime_clock() {
        let limiter = RateLimiter::<String>::new(1.0, 1);
        assert_eq!(limiter.check("zap"), Ok(()));
        let Err(retry) = limiter.check("zap") else {
            panic!("second request in the same instant was allowed");
        };
        assert_eq!(retry.0, Duration::from_secs(1));
        tokio::time::advance(retry.0).await;
        assert_eq!(limiter.check("zap"), Ok(()));
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
}
