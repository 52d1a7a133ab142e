//! `pgferry switchback`: back to the old source after a cutover with
//! `cutover.fallback` (docs/design.md, "Fallback"), the cutover's line run
//! the other way: catch up, fence the target, drain the rest, set the
//! sequences, verify, run `cutover.switchback_command`, open the old source
//! again (its triggers enabled, its fence lifted, which resumes forward
//! capture in the same transaction), then, once the application has left
//! the target, take the way back off it and return it to the shape the
//! forward sync writes into. A failure before the switchback command ran
//! lifts the target's fence first.
//!
//! Where it stands is read from both control schemas, so a killed run
//! resumes: the target's phase `cutting_over` (fenced), its switch marker
//! (the command may have run), its phase `cut_over` (the command ran: it is
//! not run again), the old source's fence (down: it is open), and the old
//! source's phase `cut_over` with its fence down and nothing left on the
//! target (only the last bookkeeping is missing). Once the command has run,
//! the application writes to the old source, so opening it is tried again
//! while it cannot be reached, for `cutover.fence_lift_timeout_ms`, before
//! the error says it is still fenced and that `pgferry switchback` opens it.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{fence, objects, release, CutoverError};
use crate::control::state::{self, Phase, TableState};
use crate::db::Migration;
use crate::fallback::FallbackError;
use crate::verify::{Subject, VerifyScope};

/// What the switchback did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SwitchbackReport {
    /// From the target's fence raised to the old source open again (this
    /// run's; 0 when it resumed past that).
    pub writes_blocked_ms: u64,
    /// Keys applied to the old source with the target fenced.
    pub final_drain_keys: u64,
    /// `copy_only` tables (no key) copied whole to the old source with the
    /// target fenced, with their rows.
    pub copied_under_fence: Vec<String>,
    /// Sequences set on the old source.
    pub sequences: usize,
    /// What the verification compared with the target fenced
    /// (`cutover.verify`); none when this run verified nothing there (it
    /// resumed past that).
    pub verify_scope: Option<VerifyScope>,
    /// Tables compared in full ahead of the target's fence by this run
    /// (`changed`), and how long that took (writes were not blocked then).
    pub verified_ahead: usize,
    /// See `verified_ahead`; with the comparisons of changed rows ahead of
    /// the fence.
    pub verify_ahead_ms: u64,
    /// Changed rows compared again ahead of the target's fence (`changed`),
    /// so that the fence compares only those changed since.
    pub changed_rows_verified_ahead: i64,
    /// Tables whose changed rows only were compared with the target fenced
    /// (a partitioned table with its partitions counts once).
    pub tables_verified_by_changes: usize,
    /// Tables compared, and rows, with the target fenced.
    pub tables_verified: usize,
    /// Rows compared.
    pub rows_verified: i64,
    /// The application's triggers enabled again on the old source.
    pub triggers_restored: usize,
    /// The wait for the application to leave the target before its fence
    /// (its capture) came off.
    pub release: Option<release::ReleaseReport>,
}

/// Runs (or resumes) the switchback.
pub async fn run(m: &Migration, cancel: &CancellationToken) -> Result<SwitchbackReport, crate::Error> {
    let mut report = SwitchbackReport::default();
    let source_run = state::load(&**m.source_conn().await?).await?;
    if source_run.as_ref().map(|r| r.phase) != Some(Phase::CutOver) {
        return Err(not_under_way().into());
    }
    let back = m.reversed();
    let source_open = !fence::is_raised(&**m.source_conn().await?)
        .await
        .map_err(CutoverError::Source)?;
    if !crate::fallback::under_way(m).await? {
        if source_open {
            // Killed after the target was tidied: only the bookkeeping is left.
            back_to_syncing(m).await?;
            return Ok(report);
        }
        return Err(not_under_way().into());
    }
    let target_run = state::load(&**back.source_conn().await?)
        .await?
        .ok_or_else(not_under_way)?;
    let mut fenced_at = None;
    if !target_run.switch_started && target_run.phase != Phase::CutOver {
        // Before any pass of ours, as `fallback` does: none may have run.
        crate::fallback::apply::disable_triggers(m, cancel).await?;
        let tables = state::tables(&**back.source_conn().await?).await?;
        if target_run.phase != Phase::CuttingOver {
            if m.cfg.cutover.verify == VerifyScope::Changed {
                let done = crate::fallback::ahead::verify_ahead(m, &tables, cancel).await?;
                report.verified_ahead = done.tables;
                report.changed_rows_verified_ahead = done.changed_rows;
                report.verify_ahead_ms = done.ms;
            }
            catch_up(m, cancel).await?;
            if m.cfg.cutover.verify == VerifyScope::Changed {
                super::ahead::refresh_key_statistics(&back, &tables).await?;
            }
        }
        crate::failpoint::hit("switchback.before_fence").await;
        raise(&back).await?;
        fenced_at = Some(Instant::now());
        tracing::warn!("Fence raised on the target: writes to the new database are blocked");
        crate::failpoint::hit("switchback.after_fence").await;
        match fenced(m, &back, &tables, cancel, &mut report).await {
            Ok(()) => {}
            Err(e) => {
                let why = crate::db::errors::report(&e);
                tracing::error!(error = %why, "Switchback failed with the target fenced: lifting its fence");
                reopen_target(&back).await?;
                return Err(e);
            }
        }
        if let Err(e) = state::record_switch_started(&**back.source_conn().await?).await {
            reopen_target(&back).await?;
            return Err(e.into());
        }
    }
    if target_run.phase != Phase::CutOver {
        crate::failpoint::hit("switchback.before_switch").await;
        if let Some(cmd) = &m.cfg.cutover.switchback_command {
            if let Err(e) = super::run_switch_command(cmd, "PGFERRY_SOURCE_URL", &m.cfg.source).await {
                tracing::error!(error = %e, "The switchback command failed: lifting the target's fence");
                let conn = back.source_conn().await?;
                state::clear_switch_started(&**conn).await?;
                drop(conn);
                reopen_target(&back).await?;
                return Err(FallbackError::Aborted {
                    why: format!("the switchback command failed ({e})"),
                    mismatch: false,
                }
                .into());
            }
        }
        crate::failpoint::hit("switchback.after_switch").await;
        // The target's phase says the command ran: a run resumed from here
        // on opens the old source without running it again.
        state::record_cutover_done(&**back.source_conn().await?).await?;
    }
    if !source_open {
        // The application now writes to the old source: it stays fenced
        // only as long as it cannot be reached.
        crate::failpoint::hit("switchback.before_open").await;
        report.triggers_restored = open_source_persistently(m, cancel).await?;
        if let Some(at) = fenced_at {
            report.writes_blocked_ms = at.elapsed().as_millis() as u64;
        }
        crate::failpoint::hit("switchback.after_open").await;
        tracing::info!(
            writes_blocked_ms = report.writes_blocked_ms,
            "Switched back: the old source takes writes again"
        );
    }
    // The target stays fenced until the application has left it.
    report.release = Some(release::wait_for_the_application_to_leave(&back, cancel).await?);
    crate::failpoint::hit("switchback.before_tidy").await;
    objects::remove_cutover_objects(&mut *back.source_conn().await?)
        .await
        .map_err(CutoverError::Target)?;
    crate::fallback::withdraw(m, cancel).await?;
    back_to_syncing(m).await?;
    tracing::info!(
        "The target is ready for the forward sync again: run `pgferry sync`, then `pgferry cutover`"
    );
    Ok(report)
}

/// How long to wait for another agent's pass before trying again.
const BUSY_PAUSE: Duration = Duration::from_millis(50);

fn not_under_way() -> FallbackError {
    FallbackError::NotUnderWay(
        "no fallback is under way: switchback follows a cutover made with cutover.fallback = true".into(),
    )
}

/// Applies the target's changes until at most `cutover.max_backlog_rows`
/// delta rows are left (what the writes add while a pass runs), or for
/// `cutover.catch_up_timeout_ms`: the less is left, the shorter the fence.
/// The passes may be another agent's (the service following the target).
async fn catch_up(m: &Migration, cancel: &CancellationToken) -> Result<(), crate::Error> {
    let started = Instant::now();
    let limit = Duration::from_millis(m.cfg.cutover.catch_up_timeout_ms);
    let back = m.reversed();
    let tables = state::tables(&**back.source_conn().await?).await?;
    while started.elapsed() < limit {
        if cancel.is_cancelled() {
            return Err(crate::Error::Cancelled);
        }
        let left: i64 = crate::drain::backlog(&*back.source_conn().await?, &tables)
            .await?
            .iter()
            .sum();
        if left <= m.cfg.cutover.max_backlog_rows {
            break;
        }
        if crate::fallback::apply::pass(m).await?.is_none() {
            tokio::time::sleep(BUSY_PAUSE).await;
        }
    }
    Ok(())
}

/// The target's fence, with its phase, in one transaction.
async fn raise(back: &Migration) -> Result<(), crate::Error> {
    let mut conn = back.source_conn().await?;
    fence::raise_recorded(&mut conn, CutoverError::Target).await
}

/// Lifts the target's fence: the application goes on writing there, the
/// old source goes on following. Tried again with backoff while the target
/// cannot be reached, for `cutover.fence_lift_timeout_ms`; then the error
/// names the command that lifts it.
async fn reopen_target(back: &Migration) -> Result<(), crate::Error> {
    let limit = Duration::from_millis(back.cfg.cutover.fence_lift_timeout_ms);
    fence::lift_persistently(limit, "THE TARGET", || reopen_target_once(back))
        .await
        .map_err(|(secs, cause)| FallbackError::TargetStillFenced {
            secs,
            cause: Box::new(cause),
        })?;
    tracing::warn!("Fence lifted on the target: the application writes there again");
    Ok(())
}

async fn reopen_target_once(back: &Migration) -> Result<(), crate::Error> {
    let mut conn = back.source_conn().await?;
    let tx = tokio_postgres::Client::transaction(&mut conn)
        .await
        .map_err(CutoverError::Target)?;
    fence::lift(&tx).await.map_err(CutoverError::Target)?;
    state::record_fence(&tx, false).await?;
    state::set_phase(&tx, Phase::Syncing).await?;
    tx.commit().await.map_err(CutoverError::Target)?;
    Ok(())
}

/// `switchback --abort`: lifts the target's fence of a switchback that
/// stopped before its command ran (killed, or its fence could not be
/// lifted then).
pub async fn abort(m: &Migration) -> Result<(), crate::Error> {
    if !crate::fallback::under_way(m).await? {
        return Err(not_under_way().into());
    }
    let back = m.reversed();
    let run = state::load(&**back.source_conn().await?)
        .await?
        .ok_or_else(not_under_way)?;
    if run.switch_started || run.phase == Phase::CutOver {
        return Err(FallbackError::NotUnderWay(
            "the switchback command may have run, so the application may already write to the old source: \
             run `pgferry switchback` to finish it"
                .into(),
        )
        .into());
    }
    reopen_target(&back).await
}

/// With the target fenced: writers in flight waited for, the rest applied,
/// the tables without a key copied whole, the sequences set, the tables
/// compared.
async fn fenced(
    m: &Migration,
    back: &Migration,
    tables: &[TableState],
    cancel: &CancellationToken,
    report: &mut SwitchbackReport,
) -> Result<(), crate::Error> {
    fence::wait_for_writers(back, tables, cancel).await?;
    // Nothing new can commit on the target: this ends with the first pass
    // of ours that finds nothing (another agent's pass in flight is waited
    // for: what it applies is not applied until it commits).
    loop {
        match crate::fallback::apply::pass(m).await? {
            Some(0) => break,
            Some(keys) => report.final_drain_keys += keys,
            None => tokio::time::sleep(BUSY_PAUSE).await,
        }
    }
    crate::failpoint::hit("switchback.after_final_drain").await;
    report.copied_under_fence = crate::fallback::apply::copy_keyless(m).await?;
    let (newdb, old) = (back.source_conn().await?, m.source_conn().await?);
    report.sequences = objects::copy_sequences(&newdb, &old)
        .await
        .map_err(CutoverError::Source)?;
    drop((newdb, old));
    // With no pass running: one that verifies ahead (`pgferry fallback`
    // following meanwhile) remakes ledgers this comparison reads.
    let verdict = crate::fallback::apply::without_passes(m, cancel, || async {
        Ok(match m.cfg.cutover.verify {
            VerifyScope::Changed => crate::verify::verify_changed(back, tables).await?,
            VerifyScope::Full => {
                crate::verify::verify(back, tables.iter().map(Subject::of).collect()).await?
            }
        })
    })
    .await?;
    if verdict.mismatches > 0 {
        return Err(FallbackError::Aborted {
            why: format!(
                "the verification found {}",
                crate::fallback::ahead::differences(&verdict)
            ),
            mismatch: true,
        }
        .into());
    }
    report.verify_scope = Some(m.cfg.cutover.verify);
    report.tables_verified_by_changes = verdict
        .tables
        .iter()
        .filter(|t| t.scope == VerifyScope::Changed)
        .count();
    report.tables_verified = verdict.tables.len();
    report.rows_verified = verdict.rows;
    crate::failpoint::hit("switchback.after_verify").await;
    Ok(())
}

/// [`open_source`], tried again with backoff while it fails, for
/// `cutover.fence_lift_timeout_ms`: the switchback command has pointed the
/// application at the old source.
async fn open_source_persistently(m: &Migration, cancel: &CancellationToken) -> Result<usize, crate::Error> {
    let limit = Duration::from_millis(m.cfg.cutover.fence_lift_timeout_ms);
    let restored = std::cell::Cell::new(0);
    fence::lift_persistently(limit, "THE OLD SOURCE", || async {
        restored.set(open_source(m, cancel).await?);
        Ok(())
    })
    .await
    .map_err(|(secs, cause)| FallbackError::SourceStillFenced {
        secs,
        cause: Box::new(cause),
    })?;
    Ok(restored.get())
}

/// The old source takes writes again: its triggers enabled, then its fence
/// lifted, which makes the capturing bodies again in the same transaction
/// (forward capture resumes with the first write). Its ledgers go: the
/// tables were compared in full under the target's fence, and the next
/// cutover compares them again ahead of its own. Idempotent.
async fn open_source(m: &Migration, cancel: &CancellationToken) -> Result<usize, crate::Error> {
    let restored = crate::fallback::apply::restore_triggers(m, cancel).await?;
    let mut conn = m.source_conn().await?;
    let tables = state::tables(&**conn).await?;
    let tx = tokio_postgres::Client::transaction(&mut conn)
        .await
        .map_err(CutoverError::Source)?;
    tx.execute("UPDATE pgferry.run SET apply_pass = NULL", &[])
        .await
        .map_err(CutoverError::Source)?;
    fence::lift(&tx).await.map_err(CutoverError::Source)?;
    state::record_fence(&tx, false).await?;
    for t in &tables {
        state::drop_ledger(&tx, t).await?;
    }
    tx.commit().await.map_err(CutoverError::Source)?;
    Ok(restored)
}

/// The old source's run back in `syncing`, its switch forgotten.
async fn back_to_syncing(m: &Migration) -> Result<(), crate::Error> {
    let mut conn = m.source_conn().await?;
    let tx = tokio_postgres::Client::transaction(&mut conn)
        .await
        .map_err(CutoverError::Source)?;
    state::clear_switch_started(&tx).await?;
    state::set_phase(&tx, Phase::Syncing).await?;
    state::record_switched_back(&tx, true).await?;
    tx.execute(
        "UPDATE pgferry.run SET cutover_done_at = NULL, writes_blocked_ms = NULL",
        &[],
    )
    .await
    .map_err(CutoverError::Source)?;
    tx.commit().await.map_err(CutoverError::Source)?;
    Ok(())
}
