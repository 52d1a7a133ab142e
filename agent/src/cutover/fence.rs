//! The write fence (invariant 6).
//!
//! Raising it replaces, in one transaction, the body of every capture
//! function (and of the copy_only tables' `fence_only()`) by one that raises
//! SQLSTATE 25006; lifting it puts the capturing bodies back
//! (`control/sql/0010_fence_in_bodies.sql`). So the capture checks nothing in the
//! statements it records, and the fence holds for every session and role at
//! once: PL/pgSQL revalidates a function's catalog row at every call, and a
//! session reads the catalog afresh whenever it takes a lock it did not hold,
//! as every write does on its table, whatever its snapshot. Writers that held
//! that lock before the fence are waited for with a SHARE lock per table (it
//! conflicts with the ROW EXCLUSIVE lock every writer holds until it ends).
//! The sequence `pgferry.fence` is the flag: set in the same transaction, and
//! before control schema version 10 what the capture functions read.

use std::time::{Duration, Instant};

use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use super::decision::{after_fence, WriterDecision, WriterWait};
use super::CutoverError;
use crate::control::state::TableState;
use crate::db::Migration;

/// Raises the fence: from now on no write to a captured table can commit.
pub async fn raise(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    set(client, true).await
}

/// Raises the fence with its bookkeeping in one transaction: the phase
/// moves to `cutting_over` with it, so no stored state has the fence up in
/// phase `syncing`. `side` names the database in errors (the target's, for
/// a switchback).
pub async fn raise_recorded(
    conn: &mut tokio_postgres::Client,
    side: fn(tokio_postgres::Error) -> CutoverError,
) -> Result<(), crate::Error> {
    use crate::control::state;
    let tx = conn.transaction().await.map_err(side)?;
    state::set_phase(&tx, state::Phase::CuttingOver).await?;
    raise(&tx).await.map_err(side)?;
    state::record_fence(&tx, true).await?;
    tx.commit().await.map_err(side)?;
    Ok(())
}

/// Lifts the fence: writes are accepted (and captured) again.
pub async fn lift(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    set(client, false).await
}

/// Sets the fence in one transaction. A control schema from before version
/// 10 (a migration that began under an older pgferry and has not run
/// `install` since) has only the flag, which its capture functions read.
async fn set(client: &impl GenericClient, raised: bool) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "DO $$ BEGIN
               IF pg_catalog.to_regprocedure('pgferry.fence_set(boolean)') IS NULL THEN
                 PERFORM pg_catalog.setval('pgferry.fence', {flag});
               ELSE
                 PERFORM pgferry.fence_set({raised});
               END IF;
             END $$",
            flag = u8::from(raised)
        ))
        .await
}

/// Tries `attempt` (a fence lifted with its bookkeeping) again with backoff
/// while it fails, for `limit`: a database that cannot be reached for a
/// while must not stay fenced for want of one more try. Each failure is
/// logged as `who` still being fenced, and `pgferry_fence_raised` stays 1
/// so that the alert keeps firing. Gives up with how long it tried and the
/// last error.
pub async fn lift_persistently<F, Fut>(
    limit: Duration,
    who: &str,
    mut attempt: F,
) -> Result<(), (u64, crate::Error)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::Error>>,
{
    let started = Instant::now();
    let policy = crate::db::retry::RetryPolicy {
        retries: 0,
        base: Duration::from_millis(250),
        cap: Duration::from_secs(30),
    };
    let mut n = 0;
    loop {
        let Err(e) = attempt().await else {
            return Ok(());
        };
        n += 1;
        crate::telemetry::fence_still_up();
        let waited = started.elapsed();
        if waited >= limit {
            return Err((waited.as_secs(), e));
        }
        let pause = policy.backoff(n).min(limit - waited);
        tracing::error!(
            attempt = n,
            error = %crate::db::errors::report(&e),
            retry_in_ms = pause.as_millis() as u64,
            "{who} IS STILL FENCED: the fence could not be lifted; trying again"
        );
        tokio::time::sleep(pause).await;
    }
}

/// After the switch: the fence stays up, and its refusal now says that the
/// database has moved (control schema 15; an older one keeps its message).
pub async fn mark_moved(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(
            "DO $$ BEGIN
               IF pg_catalog.to_regprocedure('pgferry.fence_apply(boolean, boolean)') IS NOT NULL THEN
                 PERFORM pgferry.fence_apply(true, true);
               END IF;
             END $$",
        )
        .await
}

/// Whether the fence is up.
pub async fn is_raised(client: &impl GenericClient) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT last_value <> 0 FROM pgferry.fence", &[])
        .await?;
    Ok(row.get(0))
}

/// Waits until no transaction that wrote to a captured table before the fence
/// is still open, or gives up as [`after_fence`] decides.
pub async fn wait_for_writers(
    m: &Migration,
    tables: &[TableState],
    cancel: &CancellationToken,
) -> Result<(), CutoverError> {
    let started = Instant::now();
    let limit = Duration::from_millis(m.cfg.cutover.writer_wait_ms);
    let conn = m.source_conn().await?;
    // A writer that can still commit a captured change holds the write lock
    // it took on its table before the fence went up (one that takes it
    // after meets the fence), until it ends. So only the tables some other
    // transaction holds a write lock on now, as the lock table shows them
    // (fast-path locks and prepared transactions' included), need waiting
    // for: one read instead of a LOCK per table, which took 660 ms of write
    // downtime for 2,000 tables.
    let relids: Vec<u32> = tables.iter().map(|t| t.relid).collect();
    let written: std::collections::HashSet<u32> = conn
        .query(
            "SELECT DISTINCT relation FROM pg_locks
              WHERE locktype = 'relation' AND granted AND relation = ANY ($1::oid[])
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
                AND pid IS DISTINCT FROM pg_backend_pid()",
            &[&relids],
        )
        .await
        .map_err(CutoverError::Source)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut pending: Vec<&TableState> = tables.iter().filter(|t| written.contains(&t.relid)).collect();
    loop {
        let mut still = Vec::new();
        for t in pending {
            // The session's lock_timeout bounds each attempt; application
            // writers queued behind it would fail on the fence anyway.
            let res = conn
                .batch_execute(&format!(
                    "BEGIN; LOCK TABLE ONLY {} IN SHARE MODE; COMMIT",
                    t.table
                ))
                .await;
            match res {
                Ok(()) => {}
                Err(e) if crate::db::errors::is_lock_timeout(&e) => {
                    conn.batch_execute("ROLLBACK")
                        .await
                        .map_err(CutoverError::Source)?;
                    still.push(t);
                }
                Err(e) => return Err(CutoverError::Source(e)),
            }
        }
        pending = still;
        let decision = after_fence(&WriterWait {
            tables_with_writers: pending.len(),
            waited: started.elapsed(),
            limit,
        });
        match decision {
            WriterDecision::Drain => return Ok(()),
            WriterDecision::Abort(why) => return Err(CutoverError::Aborted(why)),
            WriterDecision::Wait => {
                tracing::info!(
                    tables = pending.len(),
                    "Waiting for writers that started before the fence"
                );
                if cancel.is_cancelled() {
                    return Err(CutoverError::Aborted("stopped by signal".into()));
                }
            }
        }
    }
}
