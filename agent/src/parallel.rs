//! Bounded parallelism: jobs run as tasks, at most so many at a time, and
//! every job started is waited for, whatever the others did, so no
//! session is left inside a transaction when the caller goes on.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// At most so many jobs at a time, shared by every run given a clone of it
/// (the index builds of all tables, say).
#[derive(Debug, Clone)]
pub struct Limit(Arc<Semaphore>);

impl Limit {
    /// At most `n` (at least one) jobs at a time.
    pub fn new(n: usize) -> Self {
        Self(Arc::new(Semaphore::new(n.max(1))))
    }

    /// Spawns `job` on `tasks`, to start once a slot is free (jobs spawned
    /// earlier first), for a caller that takes each output as it comes.
    pub fn spawn<T: Send + 'static>(
        &self,
        tasks: &mut JoinSet<T>,
        job: impl Future<Output = T> + Send + 'static,
    ) {
        let slots = self.0.clone();
        tasks.spawn(async move {
            let _permit = slots.acquire_owned().await.expect("never closed");
            job.await
        });
    }

    /// Runs `work` on each of `items` in its own task, in their order, each
    /// once a slot is free; once `cancel` fires, starts no more. Waits for
    /// every started job, then returns their outputs in the items' order,
    /// or the first error to happen. A job that panicked panics here.
    pub async fn run_all<I, T, E, F, Fut>(
        &self,
        items: I,
        cancel: Option<&CancellationToken>,
        work: F,
    ) -> Result<Vec<T>, E>
    where
        I: IntoIterator,
        F: Fn(I::Item) -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let mut tasks = JoinSet::new();
        for (i, item) in items.into_iter().enumerate() {
            let permit = self.0.clone().acquire_owned().await.expect("never closed");
            if cancel.is_some_and(CancellationToken::is_cancelled) {
                break;
            }
            let job = work(item);
            tasks.spawn(async move {
                let _permit = permit;
                (i, job.await)
            });
        }
        let mut done = Vec::with_capacity(tasks.len());
        let mut first_err = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, Ok(out))) => done.push((i, out)),
                Ok((_, Err(e))) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        done.sort_by_key(|(i, _)| *i);
        Ok(done.into_iter().map(|(_, out)| out).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn at_most_the_limit_runs_and_outputs_keep_their_order() {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let out = Limit::new(2)
            .run_all(0..8u64, None, |i| {
                let (running, most) = (running.clone(), most.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(8 - i)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, ()>(i * 10)
                }
            })
            .await
            .unwrap();
        assert_eq!(out, vec![0, 10, 20, 30, 40, 50, 60, 70]);
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_error_waits_for_the_jobs_started_and_is_returned() {
        let finished = Arc::new(AtomicUsize::new(0));
        let out = Limit::new(3)
            .run_all(0..3u32, None, |i| {
                let finished = finished.clone();
                async move {
                    if i == 0 {
                        return Err("first");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                    Ok(i)
                }
            })
            .await;
        assert_eq!(out, Err("first"));
        assert_eq!(
            finished.load(Ordering::SeqCst),
            2,
            "the other jobs ran to their end"
        );
    }

    #[tokio::test]
    async fn a_cancelled_run_starts_nothing_more() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let out = Limit::new(1)
            .run_all(0..5u32, Some(&cancel), |i| async move { Ok::<_, ()>(i) })
            .await
            .unwrap();
        assert!(out.is_empty());
    }
}
