//! Group commit: operations that arrive together share one transaction.
//!
//! Callers submit one operation each and wait for its answer; a few
//! committer tasks each take everything queued (up to a batch), hand it to
//! one call of the commit function and answer every caller. Nothing waits
//! for a batch to fill: an operation alone is committed at once, and under
//! load each commit (its round trips, its sync to disk) is shared by many.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use zapflow_telemetry::metrics::GROUP_COMMIT_BATCH_SIZE as BATCH_SIZE;

use crate::Result;

type Queued<T, R> = (T, oneshot::Sender<R>);

/// A queue of operations of type `T` answered with `R`. Cheap to clone; the
/// committers stop once every handle is dropped.
pub struct GroupCommit<T, R> {
    queue: mpsc::Sender<Queued<T, R>>,
}

impl<T, R> Clone for GroupCommit<T, R> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<T, R> std::fmt::Debug for GroupCommit<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl<T: Send + 'static, R: Send + 'static> GroupCommit<T, R> {
    /// Starts `committers` tasks that call `commit` with up to `max_batch`
    /// operations at a time. `commit` answers each operation, in order.
    /// Batch sizes are exported under the queue label `name`.
    pub fn spawn<F, Fut>(name: &'static str, committers: usize, max_batch: usize, commit: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (queue, receiver) = mpsc::channel(max_batch * committers);
        let receiver = Arc::new(Mutex::new(receiver));
        let commit = Arc::new(commit);
        for _ in 0..committers.max(1) {
            tokio::spawn(commit_batches(
                name,
                receiver.clone(),
                commit.clone(),
                max_batch,
            ));
        }
        Self { queue }
    }

    /// Queues `operation` and waits for its answer; `None` when the
    /// committers are gone (the runtime is shutting down).
    pub async fn submit(&self, operation: T) -> Option<R> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((operation, reply)).await.ok()?;
        answer.await.ok()
    }
}

async fn commit_batches<T, R, F, Fut>(
    name: &'static str,
    receiver: Arc<Mutex<mpsc::Receiver<Queued<T, R>>>>,
    commit: Arc<F>,
    max_batch: usize,
) where
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = Vec<R>>,
{
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        {
            let mut receiver = receiver.lock().await;
            if receiver.recv_many(&mut batch, max_batch).await == 0 {
                return;
            }
        }
        // A caller that gave up (its deadline passed, it was cancelled)
        // before its turn gets nothing done: it saw no answer, and whatever
        // it does next starts afresh.
        let (operations, replies): (Vec<T>, Vec<_>) = batch
            .drain(..)
            .filter(|(_, reply)| !reply.is_closed())
            .unzip();
        if operations.is_empty() {
            continue;
        }
        metrics::histogram!(BATCH_SIZE, "queue" => name).record(operations.len() as f64);
        let answers = commit(operations).await;
        debug_assert_eq!(answers.len(), replies.len(), "one answer per operation");
        for (reply, answer) in replies.into_iter().zip(answers) {
            let _ = reply.send(answer);
        }
    }
}

/// Runs `batch` over every item in one transaction; when that fails for
/// anything but an outage, runs it over each item alone, so that an item
/// the database refuses fails alone and every other is still done. `Err`
/// means the database did not answer and nothing was done.
pub(crate) async fn each_alone_on_refusal<'a, I, O, F, Fut>(
    items: &'a [I],
    what: &str,
    batch: F,
) -> Result<Vec<Result<O>>>
where
    F: Fn(&'a [I]) -> Fut,
    Fut: Future<Output = Result<Vec<O>>>,
{
    match batch(items).await {
        Ok(done) => Ok(done.into_iter().map(Ok).collect()),
        Err(error) if error.is_transient() => Err(error),
        Err(error) if items.len() == 1 => Ok(vec![Err(error)]),
        Err(error) => {
            tracing::warn!(%error, items = items.len(), "a batch of {what} failed; doing each alone");
            let mut done = Vec::with_capacity(items.len());
            for item in items {
                let one = batch(std::slice::from_ref(item)).await;
                done.push(one.map(|mut one| one.remove(0)));
            }
            Ok(done)
        }
    }
}

/// Each operation's answer from a batch's: a batch that failed as a whole
/// fails every operation with the same error.
pub fn answers<O>(batch: Result<Vec<Result<O>>>, operations: usize) -> Vec<Result<O>> {
    batch.unwrap_or_else(|error| (0..operations).map(|_| Err(error.clone())).collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::task::JoinSet;

    use super::*;

    #[tokio::test]
    async fn operations_that_arrive_together_share_a_commit() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let doubling = GroupCommit::spawn("test", 1, 8, move |operations: Vec<u32>| {
            seen.lock().unwrap().push(operations.len());
            async move { operations.into_iter().map(|n| n * 2).collect() }
        });

        let mut callers = JoinSet::new();
        for n in 0..20 {
            let doubling = doubling.clone();
            callers.spawn(async move { (n, doubling.submit(n).await) });
        }
        while let Some(answered) = callers.join_next().await {
            let (n, answer) = answered.unwrap();
            assert_eq!(answer, Some(n * 2), "each caller gets its own answer");
        }
        let batches = batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 20);
        assert!(batches.iter().all(|&size| size <= 8), "{batches:?}");
        assert!(
            batches.len() <= 4,
            "20 callers at once, few commits: {batches:?}"
        );

        // Alone, an operation does not wait for company.
        assert_eq!(doubling.submit(21).await, Some(42));
    }
}
