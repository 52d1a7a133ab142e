//! Before the fence, while the application writes: the verification ahead
//! of the fence (`cutover.verify = "changed"`), the comparison again of the
//! rows changed during it, and the catch-up that drains until the backlog
//! is small enough to fence on; each pauses while the source is under
//! pressure, and the other tables keep draining while one is verified.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{decision, CutoverError};
use crate::control::state::{self, TableState};
use crate::db::Migration;
use crate::drain::{self, ledger_keys, unit_pages, SETTLE_ROUNDS, SMALL_UNIT_PAGES};
use crate::verify::VerifyReport;

/// `cutover.verify = "changed"`: verifies ahead of the fence each unit that
/// can be ([`crate::verify::ahead_units`]: a table, or a partitioned table
/// with its partitions) and has a table without its ledger. Each
/// verification holds its unit's batch lock while it reads the unit on
/// both sides, which can take minutes for a large table: large units go
/// one at a time, the other tables draining meanwhile; small ones
/// ([`SMALL_UNIT_PAGES`]) take milliseconds each and go `sync.workers` at a
/// time, a hundred between drain passes. Drift is read at most every few
/// seconds and a drain pass of every table at most once a second: with
/// thousands of small tables, those readings before each unit took eight
/// minutes at 2,000 tables. A table that differs ends the cutover before
/// the fence. Returns how many tables were compared, and in how many
/// milliseconds.
pub(super) async fn verify_ahead(
    m: &Migration,
    tables: &[TableState],
    cancel: &CancellationToken,
) -> Result<(usize, u64), crate::Error> {
    let started = Instant::now();
    let conn = m.source_conn().await?;
    let ledgers = state::ledgers(&**conn).await.map_err(CutoverError::Source)?;
    let units: Vec<Vec<TableState>> = crate::verify::ahead_units(tables)
        .into_iter()
        .filter(|u| !u.iter().all(|t| ledgers.contains(&t.id)))
        .collect();
    let pages = unit_pages(&conn, &units).await.map_err(CutoverError::Source)?;
    drop(conn);
    let (small, large): (Vec<_>, Vec<_>) = units
        .into_iter()
        .zip(pages)
        .partition(|(_, pages)| *pages <= SMALL_UNIT_PAGES);
    let mut verdicts = Vec::new();
    let mut ready = Readiness::default();
    for (unit, _) in large {
        ready.wait(m, tables, cancel).await?;
        let others: Vec<TableState> = tables
            .iter()
            .filter(|t| t.lock_relid != unit[0].lock_relid)
            .cloned()
            .collect();
        let verified = while_draining(
            m,
            &others,
            cancel,
            drain::verify_ahead(m, &unit, drain::Ahead::All, cancel),
        )
        .await?;
        verdicts.extend(verified);
    }
    let small: Vec<Vec<TableState>> = small.into_iter().map(|(unit, _)| unit).collect();
    for chunk in small.chunks(100) {
        ready.wait(m, tables, cancel).await?;
        let limit = crate::parallel::Limit::new(m.sync_workers());
        let work = limit.run_all(chunk.to_vec(), Some(cancel), |unit| {
            let (m, cancel) = (m.clone(), cancel.clone());
            async move { drain::verify_ahead(&m, &unit, drain::Ahead::All, &cancel).await }
        });
        // Every table drains meanwhile, those of the chunk included (one
        // whose verification holds its batch lock is skipped as busy): a
        // verification that waits holds back no other table's writes.
        let verified = while_draining(m, tables, cancel, work).await?;
        verdicts.extend(verified.into_iter().flatten());
    }
    if cancel.is_cancelled() {
        return Err(crate::Error::Cancelled);
    }
    for verdict in &verdicts {
        tracing::info!(table = %verdict.table, equal = verdict.equal, rows = verdict.source_rows, "Verified ahead of the fence");
    }
    let verified = verdicts.len();
    equal_ahead(verdicts)?;
    Ok((verified, started.elapsed().as_millis() as u64))
}

/// What the verification ahead does before each unit, or chunk of small
/// ones: waits out pressure on the source, checks drift every few seconds
/// ([`crate::sync::DRIFT_EVERY`]), drains every table at most once a second.
#[derive(Default)]
struct Readiness {
    backoff: drain::Backoff,
    drift_checked: Option<Instant>,
    drained: Option<Instant>,
}

impl Readiness {
    async fn wait(
        &mut self,
        m: &Migration,
        tables: &[TableState],
        cancel: &CancellationToken,
    ) -> Result<(), crate::Error> {
        // Each verification reads a whole unit on the source: not while
        // the source's own sessions wait.
        wait_out_pressure(m, &mut self.backoff, Instant::now(), cancel).await?;
        if self
            .drift_checked
            .is_none_or(|at| at.elapsed() >= crate::sync::DRIFT_EVERY)
        {
            drain::check_drift(m, tables).await?;
            self.drift_checked = Some(Instant::now());
        }
        if self
            .drained
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            drain::drain_pass(m, tables, cancel).await?;
            self.drained = Some(Instant::now());
        }
        Ok(())
    }
}

/// `cutover.verify = "changed"`, just before the catch-up: the ledgers
/// hold every key changed since their unit was verified, and at hundreds
/// of gigabytes that verification began an hour or more before, so the
/// fence would compare a number of rows that grows with the database.
/// Each unit whose ledgers hold more than `cutover.max_keys_under_fence`
/// is compared by them
/// ahead of the fence ([`drain::Ahead::Ledger`]), the others draining
/// meanwhile, which empties them; rounds go on while some unit has that
/// many, at most [`SETTLE_ROUNDS`]. The fence then compares what changed in
/// the last round. Returns the rows compared, and in how many
/// milliseconds.
pub(super) async fn settle_ledgers(
    m: &Migration,
    tables: &[TableState],
    cancel: &CancellationToken,
) -> Result<(i64, u64), crate::Error> {
    let started = Instant::now();
    let mut rows = 0;
    let mut backoff = drain::Backoff::default();
    for _ in 0..SETTLE_ROUNDS {
        let mut busy = ledger_keys(&**m.source_conn().await?, tables)
            .await
            .map_err(CutoverError::Source)?;
        busy.retain(|(_, keys)| *keys > m.cfg.cutover.max_keys_under_fence);
        if busy.is_empty() {
            break;
        }
        // The fullest first: it grew the longest.
        busy.sort_by_key(|(_, keys)| std::cmp::Reverse(*keys));
        let mut verdicts = Vec::new();
        for (unit, keys) in busy {
            wait_out_pressure(m, &mut backoff, Instant::now(), cancel).await?;
            drain::check_drift(m, tables).await?;
            let others: Vec<TableState> = tables
                .iter()
                .filter(|t| t.lock_relid != unit[0].lock_relid)
                .cloned()
                .collect();
            let work = drain::verify_ahead(m, &unit, drain::Ahead::Ledger, cancel);
            for verdict in while_draining(m, &others, cancel, work).await? {
                tracing::info!(table = %verdict.table, equal = verdict.equal, ledger_keys = keys, rows = verdict.source_rows, "Changed rows verified ahead of the fence");
                rows += verdict.source_rows;
                verdicts.push(verdict);
            }
        }
        equal_ahead(verdicts)?;
    }
    Ok((rows, started.elapsed().as_millis() as u64))
}

/// Just before the fence, with `cutover.verify = "changed"`: the planner's
/// statistics of the ledger and delta tables the fenced comparison reads.
/// A ledger is created by the verification ahead and never analyzed, and a
/// delta table's statistics may still count the rows of a backlog drained
/// since: either way the planner could take the changed keys for many, and
/// the fenced comparison of a thousand of them read the whole table
/// instead of looking them up (1.1-1.6 s of writes blocked at 1.1 GB after
/// 700,000 rows changed at once, against 9 ms). Those bigger than a few
/// pages, never analyzed or counted at more than
/// `cutover.max_keys_under_fence` rows, are analyzed here, while writes
/// still flow; one whose lock is taken is left as it is. Returns how many
/// were analyzed.
pub(super) async fn refresh_key_statistics(
    m: &Migration,
    tables: &[TableState],
) -> Result<usize, crate::Error> {
    let conn = m.source_conn().await?;
    let names: Vec<String> = tables
        .iter()
        .filter(|t| !t.copy_only)
        .flat_map(|t| [t.delta_table().to_string(), t.ledger_table().to_string()])
        .collect();
    // Only the plans of the fenced comparison depend on it: a failure to
    // look is said, not fatal.
    let found = conn
        .query(
            "SELECT u.t FROM unnest($1::text[]) AS u(t) JOIN pg_class c ON c.oid = to_regclass(u.t)
              WHERE (c.reltuples < 0 OR c.reltuples > $2::float4)
                AND pg_relation_size(c.oid) > 8 * current_setting('block_size')::int8",
            &[&names, &(m.cfg.cutover.max_keys_under_fence as f32)],
        )
        .await;
    let stale: Vec<String> = match found {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => {
            tracing::info!(error = %crate::db::errors::db_message(&e), "Statistics of ledgers and deltas not read");
            Vec::new()
        }
    };
    let mut analyzed = 0;
    for name in stale {
        // `name` is the quoted, qualified name of one of pgferry's tables.
        match conn.batch_execute(&format!("ANALYZE {name}")).await {
            Ok(()) => analyzed += 1,
            Err(e) => {
                tracing::info!(table = %name, error = %crate::db::errors::db_message(&e), "Statistics left as they are")
            }
        }
    }
    tracing::debug!(analyzed, "Statistics of ledgers and deltas refreshed");
    Ok(analyzed)
}

/// Verdicts reached ahead of the fence: a table that differs ends the
/// cutover there, the fence never raised.
fn equal_ahead(verdicts: Vec<crate::verify::TableVerdict>) -> Result<(), CutoverError> {
    let report = VerifyReport::of(verdicts);
    if report.mismatches > 0 {
        return Err(CutoverError::MismatchBeforeFence(Box::new(report)));
    }
    Ok(())
}

/// Runs `work` while `tables` drain in the background, pass after pass
/// (pausing while the source is under pressure, as `sync` does). Once
/// `work` is done, the drain finishes the batches in hand and stops; a drain
/// that failed fails the whole, after `work`.
pub(super) async fn while_draining<T>(
    m: &Migration,
    tables: &[TableState],
    cancel: &CancellationToken,
    work: impl std::future::Future<Output = Result<T, crate::Error>>,
) -> Result<T, crate::Error> {
    let stop = cancel.child_token();
    let drain = async {
        let mut backoff = drain::Backoff::default();
        while !stop.is_cancelled() {
            let pause = match backoff.next(m).await? {
                Some(pause) => pause,
                // A pass that only met tables being verified (busy) found
                // nothing to do either: no hurry for the next one.
                None => match drain::drain_pass(m, tables, &stop).await {
                    Ok(pass) if pass.keys_applied == 0 && pass.truncates_applied == 0 => {
                        Duration::from_millis(m.cfg.sync.poll_interval_ms)
                    }
                    Ok(_) => Duration::ZERO,
                    Err(crate::Error::Cancelled) if stop.is_cancelled() => break,
                    Err(e) => return Err(e),
                },
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        Ok(())
    };
    let work = async {
        let done = work.await;
        stop.cancel();
        done
    };
    match tokio::join!(work, drain) {
        (Ok(done), Ok(())) => Ok(done),
        (Err(e), _) | (Ok(_), Err(e)) => Err(e),
    }
}

/// Drains until the backlog is small enough to fence on. Like `sync`, it
/// pauses while the source is under pressure (`sync.adaptive`): the source's
/// own work wins, and the fence is not raised then. Pressure that outlasts
/// `cutover.catch_up_timeout_ms` gives the cutover up, the fence never
/// raised.
pub(super) async fn catch_up(
    m: &Migration,
    tables: &[TableState],
    cancel: &CancellationToken,
) -> Result<(), crate::Error> {
    let started = Instant::now();
    let timeout = Duration::from_millis(m.cfg.cutover.catch_up_timeout_ms);
    let mut backoff = drain::Backoff::default();
    loop {
        if cancel.is_cancelled() {
            return Err(crate::Error::Cancelled);
        }
        wait_out_pressure(m, &mut backoff, started, cancel).await?;
        drain::check_drift(m, tables).await?;
        drain::drain_pass(m, tables, cancel).await?;
        let conn = m.source_conn().await?;
        let backlog: i64 = drain::backlog(&conn, tables).await?.iter().sum();
        let d = decision::should_fence(&decision::Readiness {
            backlog_rows: backlog,
            max_backlog_rows: m.cfg.cutover.max_backlog_rows,
            catching_up_for: started.elapsed(),
            catch_up_timeout: timeout,
        });
        match d {
            decision::Decision::Fence => return Ok(()),
            decision::Decision::KeepDraining => {}
            decision::Decision::GiveUp(why) => return Err(CutoverError::Aborted(why).into()),
        }
    }
}

/// Pauses while the source is under pressure, as `sync` does
/// (`sync.adaptive`): the source's own work wins. Pressure that lasts past
/// `cutover.catch_up_timeout_ms` counted from `since` gives the cutover up,
/// the fence never raised.
pub(super) async fn wait_out_pressure(
    m: &Migration,
    backoff: &mut drain::Backoff,
    since: Instant,
    cancel: &CancellationToken,
) -> Result<(), crate::Error> {
    let timeout = Duration::from_millis(m.cfg.cutover.catch_up_timeout_ms);
    while let Some(pause) = backoff.next(m).await? {
        if since.elapsed() + pause > timeout {
            crate::telemetry::sync_backoff(0.0);
            return Err(CutoverError::Aborted(format!(
                "the source stayed under pressure (sessions waiting on locks, or slow to answer) for {} s \
                 before the fence (limit {} ms); the fence was not raised: cut over at a quieter time, \
                 or raise sync.max_lock_waiters / sync.max_probe_ms",
                since.elapsed().as_secs(),
                m.cfg.cutover.catch_up_timeout_ms
            ))
            .into());
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(crate::Error::Cancelled),
            () = tokio::time::sleep(pause) => {}
        }
    }
    Ok(())
}
