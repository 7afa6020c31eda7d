//! Runs handed from ingest to a worker of the same process, in memory.
//!
//! While the worker has steps to spare, a delivery starts in the commit that
//! records it ([`Delivery::start_for`](crate::Delivery::start_for)): its
//! first step claimed and its outbox row leased. The worker is then handed
//! the run rather than finding it in the outbox, which saves the lease and
//! the claim (a write each) and the wait for a wake-up. A hand-off that
//! never arrives (the process stopped) costs only time: the lease lapses
//! and the row comes due again, as any leased row does.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::Started;

/// Hands started runs to one worker; its clones share its permits.
#[derive(Clone)]
pub struct Handoff {
    permits: Arc<Semaphore>,
    /// Permits left to the worker's own leases: outbox rows (later steps,
    /// retries) keep their share while webhooks stream in.
    spare: usize,
    lease: Duration,
    sender: mpsc::UnboundedSender<HandedRun>,
}

/// A worker's side: its permits (one per step it runs at once) and the
/// runs handed to it.
pub struct Handed {
    pub permits: Arc<Semaphore>,
    concurrency: usize,
    receiver: mpsc::UnboundedReceiver<HandedRun>,
}

/// A started run and the permit it runs under.
pub struct HandedRun {
    pub started: Started,
    pub permit: OwnedSemaphorePermit,
}

/// A worker permit held for a delivery being recorded.
pub struct Reservation {
    permit: OwnedSemaphorePermit,
    handoff: Handoff,
}

/// A worker running up to `concurrency` steps at once, whose leases of the
/// outbox need `spare` permits free, and whose steps are leased for `lease`.
pub fn handoff(concurrency: usize, spare: usize, lease: Duration) -> (Handoff, Handed) {
    let permits = Arc::new(Semaphore::new(concurrency));
    let (sender, receiver) = mpsc::unbounded_channel();
    let handoff = Handoff {
        permits: permits.clone(),
        spare,
        lease,
        sender,
    };
    let handed = Handed {
        permits,
        concurrency,
        receiver,
    };
    (handoff, handed)
}

impl Handoff {
    /// A permit for one delivery, if the worker has one to spare.
    pub fn reserve(&self) -> Option<Reservation> {
        if self.permits.available_permits() <= self.spare || self.sender.is_closed() {
            return None;
        }
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(Reservation {
            permit,
            handoff: self.clone(),
        })
    }
}

impl Reservation {
    /// How long the run's first step is leased for.
    pub fn lease(&self) -> Duration {
        self.handoff.lease
    }

    /// Hands the started run to the worker. A worker that stopped taking
    /// runs leaves it to its lease.
    pub fn hand_over(self, started: Started) {
        let run = HandedRun {
            started,
            permit: self.permit,
        };
        if self.handoff.sender.send(run).is_err() {
            tracing::debug!("worker stopped; a started run waits for its lease");
        }
    }
}

impl Handed {
    /// The next run handed over; `None` once no ingest can hand any more.
    pub async fn recv(&mut self) -> Option<HandedRun> {
        self.receiver.recv().await
    }

    /// A run already handed over, if any.
    pub fn try_recv(&mut self) -> Option<HandedRun> {
        self.receiver.try_recv().ok()
    }

    /// Takes no more work (the worker is stopping): deliveries go to the
    /// outbox again. Runs reserved already still arrive.
    pub fn close(&self) {
        self.permits.close();
    }

    /// Whether every permit is back: no step runs and no run is on its way.
    pub fn idle(&self) -> bool {
        self.permits.available_permits() == self.concurrency
    }
}
