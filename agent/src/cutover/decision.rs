//! The cutover decisions, without I/O (pgdog's `should_cutover`).

use std::time::Duration;

/// What the agent knows after a drain pass, before the fence.
#[derive(Debug, Clone, Copy)]
pub struct Readiness {
    /// Delta rows left after the pass.
    pub backlog_rows: i64,
    /// The configured largest backlog to fence on.
    pub max_backlog_rows: i64,
    /// How long the agent has been trying to catch up.
    pub catching_up_for: Duration,
    /// The configured limit for that.
    pub catch_up_timeout: Duration,
}

/// What to do before the fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The backlog is small: raise the fence now.
    Fence,
    /// Drain another pass.
    KeepDraining,
    /// The backlog does not shrink enough in time: do not fence.
    GiveUp(String),
}

/// Raise the fence only when the final drain under it will be short.
pub fn should_fence(r: &Readiness) -> Decision {
    if r.backlog_rows <= r.max_backlog_rows {
        Decision::Fence
    } else if r.catching_up_for >= r.catch_up_timeout {
        Decision::GiveUp(format!(
            "the backlog is still {} delta rows after {} s (limit {}): writes outpace the drain; \
             raise sync.workers or cutover.max_backlog_rows, or cut over at a quieter time",
            r.backlog_rows,
            r.catching_up_for.as_secs(),
            r.max_backlog_rows
        ))
    } else {
        Decision::KeepDraining
    }
}

/// What the agent knows while waiting, fence up, for in-flight writers.
#[derive(Debug, Clone, Copy)]
pub struct WriterWait {
    /// Tables on which a writer that started before the fence is still open.
    pub tables_with_writers: usize,
    /// How long the agent has waited.
    pub waited: Duration,
    /// The configured limit.
    pub limit: Duration,
}

/// What to do with the fence up and writers possibly in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriterDecision {
    /// No writer from before the fence is left: the final drain sees all.
    Drain,
    /// Give them more time.
    Wait,
    /// They would not finish: lift the fence, keep syncing.
    Abort(String),
}

/// In-flight writers either finish before the final drain or the cutover is
/// abandoned; the agent never drains while one could still commit.
pub fn after_fence(w: &WriterWait) -> WriterDecision {
    if w.tables_with_writers == 0 {
        WriterDecision::Drain
    } else if w.waited >= w.limit {
        WriterDecision::Abort(format!(
            "transactions that were writing when the fence went up were still open after {} s on {} table(s); \
             end them (or raise cutover.writer_wait_ms) and run cutover again",
            w.waited.as_secs(),
            w.tables_with_writers
        ))
    } else {
        WriterDecision::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(backlog: i64, secs: u64) -> Readiness {
        Readiness {
            backlog_rows: backlog,
            max_backlog_rows: 100,
            catching_up_for: Duration::from_secs(secs),
            catch_up_timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn fence_decisions() {
        assert_eq!(should_fence(&r(0, 0)), Decision::Fence);
        assert_eq!(should_fence(&r(100, 59)), Decision::Fence);
        assert_eq!(should_fence(&r(101, 0)), Decision::KeepDraining);
        assert_eq!(should_fence(&r(101, 59)), Decision::KeepDraining);
        assert!(matches!(should_fence(&r(101, 60)), Decision::GiveUp(_)));
        assert_eq!(
            should_fence(&r(5, 600)),
            Decision::Fence,
            "a small backlog fences even late"
        );
    }

    #[test]
    fn writer_decisions() {
        let w = |n, secs| WriterWait {
            tables_with_writers: n,
            waited: Duration::from_secs(secs),
            limit: Duration::from_secs(30),
        };
        assert_eq!(after_fence(&w(0, 0)), WriterDecision::Drain);
        assert_eq!(after_fence(&w(0, 100)), WriterDecision::Drain);
        assert_eq!(after_fence(&w(2, 29)), WriterDecision::Wait);
        assert!(matches!(after_fence(&w(1, 30)), WriterDecision::Abort(_)));
    }
}
