//! When each webhook's email reached the SMTP sink.
//!
//! The sink stamps each message as its last line arrives; a task looks at
//! it periodically and records the stamps of the messages new since the
//! last look, copying only those. Should looks grow slow all the same (a
//! busy CPU), the interval grows with them (up to [`MAX_INTERVAL`]),
//! keeping the watcher near a tenth of one CPU. The interval only delays
//! when a phase is seen to be over, not the arrival times.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zapflow_testkit::SmtpSink;

use crate::zap::sequence_in_subject;

/// The shortest interval between looks.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// The longest interval between looks.
pub const MAX_INTERVAL: Duration = Duration::from_millis(50);
/// The interval is this many times the recent mean look.
const INTERVAL_PER_LOOK: f64 = 10.0;

/// What else the sink saw, and what watching it cost.
#[derive(Debug, Clone, Default)]
pub struct Anomalies {
    /// Emails for a webhook that already had one (delivery is at least once).
    pub duplicates: usize,
    /// Emails whose subject carries no sequence number.
    pub unmatched: usize,
    /// Mean time of one look at the sink.
    pub mean_look: Duration,
    /// The longest interval between looks.
    pub max_interval: Duration,
}

#[derive(Debug, Default)]
struct Seen {
    /// First arrival of the email of each webhook sequence number.
    arrivals: HashMap<u64, Instant>,
    /// Emails for a sequence number that already had one.
    duplicates: usize,
    /// Emails whose subject carries no sequence number.
    unmatched: usize,
    /// Time spent reading the sink, and how many reads.
    sampling: Duration,
    samples: u32,
    max_interval: Duration,
}

/// Stamps arrivals until dropped.
pub struct Deliveries {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Deliveries {
    pub fn watch(sink: Arc<SmtpSink>) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                // Messages already kept (the sink's own check) are not
                // webhooks'.
                let mut read = sink.mails().len();
                let mut interval = MIN_INTERVAL;
                // Smoothed, so one look slowed by a busy CPU does not
                // stretch the interval.
                let mut recent_look = Duration::ZERO;
                loop {
                    tokio::time::sleep(interval).await;
                    let started = Instant::now();
                    let mails = sink.mails_after(read);
                    let mut guard = seen.lock().unwrap();
                    let seen = &mut *guard;
                    for mail in &mails {
                        match mail
                            .header("Subject")
                            .as_deref()
                            .and_then(sequence_in_subject)
                        {
                            Some(n) => match seen.arrivals.entry(n) {
                                Entry::Occupied(_) => seen.duplicates += 1,
                                Entry::Vacant(slot) => {
                                    slot.insert(mail.received);
                                }
                            },
                            None => seen.unmatched += 1,
                        }
                    }
                    read += mails.len();
                    let look = started.elapsed();
                    seen.sampling += look;
                    seen.samples += 1;
                    recent_look = recent_look.mul_f64(0.8) + look.mul_f64(0.2);
                    interval = recent_look
                        .mul_f64(INTERVAL_PER_LOOK)
                        .clamp(MIN_INTERVAL, MAX_INTERVAL);
                    seen.max_interval = seen.max_interval.max(interval);
                }
            }
        });
        Self { seen, task }
    }

    /// The arrival of each of `sequence` numbers' email seen so far.
    pub fn arrivals(&self, sequence: &[u64]) -> Vec<Option<Instant>> {
        let seen = self.seen.lock().unwrap();
        sequence
            .iter()
            .map(|n| seen.arrivals.get(n).copied())
            .collect()
    }

    /// Waits until every one of `sequence` numbers' email arrived, or
    /// `timeout` passed; returns their arrivals.
    pub async fn wait_for(&self, sequence: &[u64], timeout: Duration) -> Vec<Option<Instant>> {
        let deadline = Instant::now() + timeout;
        // Arrivals stay seen: each look goes on from the first one missing.
        let mut arrived = 0;
        loop {
            arrived += {
                let seen = self.seen.lock().unwrap();
                sequence[arrived..]
                    .iter()
                    .take_while(|n| seen.arrivals.contains_key(n))
                    .count()
            };
            if arrived == sequence.len() || Instant::now() >= deadline {
                return self.arrivals(sequence);
            }
            tokio::time::sleep(MIN_INTERVAL).await;
        }
    }

    pub fn anomalies(&self) -> Anomalies {
        let seen = self.seen.lock().unwrap();
        Anomalies {
            duplicates: seen.duplicates,
            unmatched: seen.unmatched,
            mean_look: seen.sampling / seen.samples.max(1),
            max_interval: seen.max_interval,
        }
    }
}

impl Drop for Deliveries {
    fn drop(&mut self) {
        self.task.abort();
    }
}
