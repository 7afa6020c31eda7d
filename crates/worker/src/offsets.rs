//! Which offsets may be stored when events finish out of order.

use std::collections::{BTreeSet, HashMap};

/// Per partition, the offsets being worked on. Events of one partition run
/// concurrently (different runs), but an offset may only be stored once it
/// and every offset before it are done, or a crash would skip unfinished work.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<i32, Partition>,
}

#[derive(Debug, Default)]
struct Partition {
    in_flight: BTreeSet<i64>,
    highest_started: i64,
    /// The last offset handed back for storing.
    stored: Option<i64>,
}

impl OffsetTracker {
    pub fn start(&mut self, partition: i32, offset: i64) {
        let state = self.partitions.entry(partition).or_default();
        state.in_flight.insert(offset);
        state.highest_started = state.highest_started.max(offset);
    }

    /// Marks an offset done; returns the offset to store (every offset up to
    /// and including it is done), if that moved forward.
    pub fn finish(&mut self, partition: i32, offset: i64) -> Option<i64> {
        let state = self.partitions.get_mut(&partition)?;
        state.in_flight.remove(&offset);
        let done_up_to = match state.in_flight.first() {
            Some(first) => first - 1,
            None => state.highest_started,
        };
        if done_up_to < 0 || state.stored.is_some_and(|stored| stored >= done_up_to) {
            return None;
        }
        state.stored = Some(done_up_to);
        Some(done_up_to)
    }

    /// Events of `partition` being worked on.
    pub fn in_flight(&self, partition: i32) -> usize {
        self.partitions
            .get(&partition)
            .map_or(0, |state| state.in_flight.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_only_contiguous_finished_offsets() {
        let mut tracker = OffsetTracker::default();
        for offset in 0..4 {
            tracker.start(0, offset);
        }
        assert_eq!(tracker.finish(0, 2), None);
        assert_eq!(tracker.finish(0, 1), None);
        assert_eq!(tracker.finish(0, 0), Some(2));
        assert_eq!(tracker.finish(0, 3), Some(3));
    }

    #[test]
    fn partitions_are_independent() {
        let mut tracker = OffsetTracker::default();
        tracker.start(0, 10);
        tracker.start(1, 5);
        assert_eq!(tracker.finish(1, 5), Some(5));
        assert_eq!(tracker.finish(0, 10), Some(10));
    }
}
