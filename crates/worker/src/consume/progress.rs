//! Noticing partitions whose events wait while nobody consumes them.
//!
//! A worker that dies without leaving the group keeps its partitions until
//! the group coordinator misses its heartbeats for the session timeout and
//! hands them to the others. Brokers do not all get that right: tansu 0.6
//! drops the dead member but keeps the group's old assignment and
//! generation, so the survivors rejoin, get their own partitions back and
//! the dead member's ones belong to nobody until some member leaves the
//! group. A worker therefore watches the committed offset of every
//! partition of the topic: one with a backlog that has not moved for
//! longer than a live owner or the coordinator would need is stalled.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use zapflow_bus::PartitionProgress;

/// The longest wait between two rejoins while partitions keep stalling.
const MAX_REJOIN_GAP: Duration = Duration::from_secs(600);

/// Remembers since when each partition's committed offset stands still.
#[derive(Debug)]
pub struct ProgressWatch {
    /// How long a backlog may stand still: beyond the session timeout (the
    /// coordinator's turn to reassign) and one action (a live owner's turn
    /// to finish the event at the head).
    stall_after: Duration,
    /// The member's assignment count at the last report: a finished
    /// rebalance gives every partition's new owner a fresh start.
    assignments: u64,
    partitions: HashMap<i32, StandingStill>,
    /// Rejoining is a rebalance for the whole group: while partitions keep
    /// stalling (say, the database is down), rejoin less and less often.
    next_rejoin: Option<Instant>,
    rejoin_gap: Duration,
}

#[derive(Debug)]
struct StandingStill {
    committed: i64,
    since: Instant,
}

/// A partition with a backlog whose committed offset stood still too long.
#[derive(Debug, Clone, PartialEq)]
pub struct Stall {
    pub progress: PartitionProgress,
    pub idle: Duration,
}

impl ProgressWatch {
    pub fn new(stall_after: Duration) -> Self {
        Self {
            stall_after,
            assignments: 0,
            partitions: HashMap::new(),
            next_rejoin: None,
            rejoin_gap: stall_after,
        }
    }

    /// Takes a progress report; returns the partitions that stalled. A
    /// stall is reported once per `stall_after` while it lasts.
    pub fn observe(
        &mut self,
        now: Instant,
        assignments: u64,
        report: &[PartitionProgress],
    ) -> Vec<Stall> {
        if assignments != self.assignments {
            self.assignments = assignments;
            self.partitions.clear();
        }
        if report.iter().all(|progress| progress.backlog() == 0) {
            self.rejoin_gap = self.stall_after;
        }
        let mut stalls = Vec::new();
        for progress in report {
            let still = self
                .partitions
                .entry(progress.partition)
                .or_insert(StandingStill {
                    committed: progress.committed,
                    since: now,
                });
            if progress.backlog() == 0 || still.committed != progress.committed {
                *still = StandingStill {
                    committed: progress.committed,
                    since: now,
                };
                continue;
            }
            let idle = now.saturating_duration_since(still.since);
            if idle >= self.stall_after {
                stalls.push(Stall {
                    progress: *progress,
                    idle,
                });
                still.since = now;
            }
        }
        stalls
    }

    /// Whether to rejoin now; each yes doubles the wait for the next one.
    pub fn may_rejoin(&mut self, now: Instant) -> bool {
        if self.next_rejoin.is_some_and(|next| now < next) {
            return false;
        }
        self.next_rejoin = Some(now + self.rejoin_gap);
        self.rejoin_gap = (self.rejoin_gap * 2).min(MAX_REJOIN_GAP);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(10);

    fn at(partition: i32, committed: i64, high_watermark: i64) -> PartitionProgress {
        PartitionProgress {
            partition,
            committed,
            high_watermark,
            assigned_here: false,
        }
    }

    fn stalled(stalls: &[Stall]) -> Vec<i32> {
        stalls
            .iter()
            .map(|stall| stall.progress.partition)
            .collect()
    }

    #[test]
    fn a_backlog_standing_still_stalls_once_per_period() {
        let mut watch = ProgressWatch::new(STALL);
        let start = Instant::now();
        let report = [at(0, 5, 9), at(1, 0, 0)];
        assert!(watch.observe(start, 1, &report).is_empty());
        assert!(watch.observe(start + STALL / 2, 1, &report).is_empty());
        assert_eq!(stalled(&watch.observe(start + STALL, 1, &report)), [0]);
        assert!(
            watch
                .observe(start + STALL + STALL / 2, 1, &report)
                .is_empty()
        );
        assert_eq!(stalled(&watch.observe(start + STALL * 2, 1, &report)), [0]);
    }

    #[test]
    fn moving_offsets_and_empty_partitions_never_stall() {
        let mut watch = ProgressWatch::new(STALL);
        let start = Instant::now();
        for step in 0..10 {
            let now = start + STALL / 2 * step;
            let moving = at(0, i64::from(step), 100);
            let drained = at(1, 7, 7);
            assert!(watch.observe(now, 1, &[moving, drained]).is_empty());
        }
    }

    #[test]
    fn a_finished_rebalance_restarts_every_clock() {
        let mut watch = ProgressWatch::new(STALL);
        let start = Instant::now();
        let report = [at(0, 5, 9)];
        watch.observe(start, 1, &report);
        assert!(watch.observe(start + STALL, 2, &report).is_empty());
        assert_eq!(stalled(&watch.observe(start + STALL * 2, 2, &report)), [0]);
    }

    #[test]
    fn rejoins_back_off_until_the_topic_is_drained() {
        let mut watch = ProgressWatch::new(STALL);
        let start = Instant::now();
        assert!(watch.may_rejoin(start));
        assert!(!watch.may_rejoin(start + STALL / 2));
        assert!(watch.may_rejoin(start + STALL));
        assert!(!watch.may_rejoin(start + STALL * 2));
        assert!(watch.may_rejoin(start + STALL * 3));
        watch.observe(start + STALL * 3, 1, &[at(0, 9, 9)]);
        assert!(watch.may_rejoin(start + STALL * 7));
        assert!(watch.may_rejoin(start + STALL * 8));
    }
}
