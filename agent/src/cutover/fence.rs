//! The write fence (invariant 6).
//!
//! Every capture trigger checks `pgferry.fence` before recording a change and
//! raises SQLSTATE 25006 when it is set. The flag is a sequence: `setval` is
//! not transactional and reading a sequence ignores MVCC, so the fence holds
//! for every session and role at once, including transactions whose snapshot
//! was taken before it went up. Writers that passed the check before the
//! fence are waited for with a SHARE lock per table (it conflicts with the
//! ROW EXCLUSIVE lock every writer holds until it ends).

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::decision::{after_fence, WriterDecision, WriterWait};
use super::CutoverError;
use crate::migration::Migration;
use crate::state::TableState;

/// Raises the fence: from now on no write to a captured table can commit.
pub async fn raise(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client.execute("SELECT setval('pgferry.fence', 1)", &[]).await?;
    Ok(())
}

/// Lifts the fence: writes are accepted (and captured) again.
pub async fn lift(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client.execute("SELECT setval('pgferry.fence', 0)", &[]).await?;
    Ok(())
}

/// Whether the fence is up.
pub async fn is_raised(client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
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
    let mut pending: Vec<&TableState> = tables.iter().collect();
    let conn = m.source_conn().await?;
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
                Err(e) if crate::error::is_lock_timeout(&e) => {
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
