//! The drain's adaptive pause while the source is under pressure.

use std::time::Duration;

use super::SyncError;
use crate::db::Migration;

/// The drain's adaptive pause: doubles while the source is under pressure
/// (sessions waiting on locks, or a slow round trip), ends when it is not.
/// `sync` and the cutover's catch-up before the fence both go through it.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    pub(crate) current: Option<Duration>,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Backoff {
    /// Probes the source; returns how long to pause before the next pass,
    /// or `None` to drain now.
    pub(crate) async fn next(&mut self, m: &Migration) -> Result<Option<Duration>, SyncError> {
        if !m.cfg.sync.adaptive {
            return Ok(None);
        }
        let (waiters, probe) = pressure(m).await?;
        let limit = Duration::from_millis(m.cfg.sync.max_probe_ms);
        if waiters < m.cfg.sync.max_lock_waiters && probe <= limit {
            if self.current.take().is_some() {
                tracing::info!("Source pressure is over: draining again");
                crate::telemetry::sync_backoff(0.0);
            }
            return Ok(None);
        }
        let pause = self.current.map_or(BACKOFF_FIRST, |p| (p * 2).min(BACKOFF_MAX));
        self.current = Some(pause);
        tracing::info!(
            lock_waiters = waiters,
            probe_ms = probe.as_millis() as u64,
            pause_ms = pause.as_millis() as u64,
            "The source is under pressure: the drain pauses"
        );
        crate::telemetry::sync_backoff(pause.as_secs_f64());
        Ok(Some(pause))
    }
}

/// Sessions of the source database waiting on a lock, whatever their role,
/// and how long asking took. `pg_locks` shows every session's locks to any
/// role, where `pg_stat_activity` hides the wait events of other roles'
/// sessions from a role without `pg_read_all_stats` (an application's
/// second credential, say); it still names every session's database.
pub(crate) async fn pressure(m: &Migration) -> Result<(i64, Duration), SyncError> {
    let conn = m.source_conn().await?;
    let started = std::time::Instant::now();
    let waiters: i64 = conn
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE NOT l.granted AND a.datname = current_database() AND l.pid <> pg_backend_pid()",
            &[],
        )
        .await
        .map_err(SyncError::Catalog)?
        .get(0);
    Ok((waiters, started.elapsed()))
}
