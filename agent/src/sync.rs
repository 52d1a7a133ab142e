//! `sync`: drains until stopped or caught up, checking the source for
//! drift every few seconds and following its partition maintenance (see
//! [`crate::follow`]); finishes first what a killed run left uncaptured or
//! uncopied. The drain itself is [`crate::drain`].

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::control::state::{self, Phase, TableState};
use crate::db::Migration;
use crate::drain::check_drift;
use crate::drain::{backlog, drain_pass, Backoff, SyncError, SyncReport};

/// How `sync` should end.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncOptions {
    /// Stop once caught up. A pass applies every change committed before it
    /// began, so what it leaves behind was written while it ran. The drain
    /// stops after a pass (shared with no other agent) that left nothing,
    /// or that left at most `cutover.max_backlog_rows` delta rows and no
    /// fewer than the pass before it: it no longer gains ground, what is
    /// left is what the writes add while one pass runs. So it ends under
    /// steady writes, and once they stop, only with nothing left.
    pub until_caught_up: bool,
}

/// Drains until cancelled, or until caught up when asked.
pub async fn run(
    m: &Migration,
    opts: SyncOptions,
    cancel: &CancellationToken,
) -> Result<SyncReport, crate::Error> {
    let mut report = SyncReport::default();
    if unless_stopped(finish_later_copy(m, cancel).await)?.is_none() {
        return Ok(report);
    }
    let mut tables = syncable_tables(m).await?;
    let line = crate::progress::sync_line();
    let mut backoff = Backoff::default();
    // Delta rows left after the previous pass (for --until-caught-up).
    let mut prev_left: Option<i64> = None;
    let mut drift_checked: Option<Instant> = None;
    crate::telemetry::sync_backoff(0.0);
    loop {
        if cancel.is_cancelled() || migration_over(m).await? {
            return Ok(report);
        }
        if let Some(pause) = backoff.next(m).await? {
            tokio::select! {
                () = cancel.cancelled() => return Ok(report),
                () = tokio::time::sleep(pause) => {}
            }
            continue;
        }
        // Reads the catalog of every captured table: not every pass.
        if drift_checked.is_none_or(|at| at.elapsed() >= DRIFT_EVERY) {
            if let Err(e) = check_drift(m, &tables).await {
                match unless_stopped(follow(m, cancel, e.into(), &mut report).await)? {
                    Some(followed) => tables = followed,
                    None => return Ok(report),
                }
                continue;
            }
            // Defaults and NOT NULL: no drift, changed where they differ.
            match unless_stopped(crate::follow::attributes(m, cancel).await)? {
                Some(altered) => report
                    .schema_changes_followed
                    .extend(altered.iter().map(ToString::to_string)),
                None => return Ok(report),
            }
            drift_checked = Some(Instant::now());
        }
        let pass = match drain_pass(m, &tables, cancel).await {
            Ok(pass) => pass,
            Err(e) => {
                match unless_stopped(follow(m, cancel, e, &mut report).await)? {
                    Some(followed) => tables = followed,
                    None => return Ok(report),
                }
                continue;
            }
        };
        let idle = pass.is_idle();
        report.merge(&pass);
        if idle && opts.until_caught_up {
            check_drift(m, &tables).await?;
            report.backlog_left = Some(0);
            return Ok(report);
        }
        if crate::progress::enabled() || opts.until_caught_up {
            let conn = m.source_conn().await?;
            let left: i64 = backlog(&conn, &tables).await?.iter().sum();
            line.set_message(format!(
                "{} passes, {} keys applied, backlog {left} rows",
                report.passes, report.keys_applied
            ));
            line.tick();
            let steady = left <= m.cfg.cutover.max_backlog_rows && prev_left.is_some_and(|p| left >= p);
            if opts.until_caught_up && pass.busy == 0 && (left == 0 || steady) {
                check_drift(m, &tables).await?;
                tracing::info!(
                    backlog_rows = left,
                    "Caught up: the last pass left only what was written while it ran"
                );
                report.backlog_left = Some(left);
                return Ok(report);
            }
            prev_left = Some(left);
        }
        if idle {
            tokio::select! {
                () = cancel.cancelled() => return Ok(report),
                () = tokio::time::sleep(Duration::from_millis(m.cfg.sync.poll_interval_ms)) => {}
            }
        }
    }
}

/// `None` for a stop asked for while sync captured or copied tables of its
/// own accord (a follow, or finishing what a killed run left): a stop like
/// any other, with the report so far; the next run finishes the rest.
fn unless_stopped<T>(r: Result<T, crate::Error>) -> Result<Option<T>, crate::Error> {
    match r {
        Err(crate::Error::Cancelled) => Ok(None),
        r => r.map(Some),
    }
}

/// Schema drift that sync can follow is repeated on the target (see
/// [`crate::follow`]); returns the captured tables then. Anything else is
/// `e` again.
async fn follow(
    m: &Migration,
    cancel: &CancellationToken,
    e: crate::Error,
    report: &mut SyncReport,
) -> Result<Vec<TableState>, crate::Error> {
    let (tables, changes) = follow_drift(m, cancel, e).await?;
    let (partitions, others) = changes.split();
    report.partitions_followed.extend(partitions);
    report.schema_changes_followed.extend(others);
    Ok(tables)
}

/// [`follow`], for the cutover too: the captured tables once the target
/// followed, and what it followed.
pub(crate) async fn follow_drift(
    m: &Migration,
    cancel: &CancellationToken,
    e: crate::Error,
) -> Result<(Vec<TableState>, crate::follow::Followed), crate::Error> {
    let changes = match e.downcast_ref() {
        Some(SyncError::SchemaDrift(_)) => match crate::follow::drift(m, cancel).await? {
            Some(changes) => changes,
            None => return Err(e),
        },
        Some(SyncError::TypeDrift(_)) => crate::follow::types(m, cancel).await?,
        Some(SyncError::EnumDrift(statements)) if m.cfg.sync.follow_schema_changes => {
            crate::follow::enum_values(m, cancel, statements).await?
        }
        // Refused by the target: a NOT NULL the source dropped, say.
        Some(SyncError::Batch {
            side: crate::db::endpoint::Side::Target,
            ..
        }) => match crate::follow::attributes(m, cancel).await {
            Ok(altered) if !altered.is_empty() => altered,
            _ => return Err(e),
        },
        _ => return Err(e),
    };
    tracing::info!(
        changes = changes.len(),
        "The target follows the source's schema: draining on"
    );
    Ok((syncable_tables(m).await?, crate::follow::Followed(changes)))
}

/// How often `sync` checks the source for drift ([`check_drift`]): the
/// check reads the catalog of every captured table, 135 ms for 2,000 of
/// them, which every pass (a few a second) made a steady load on an idle
/// source. A schema change meanwhile is told when a batch fails on it, a
/// capture trigger disabled meanwhile sends its table to be captured and
/// copied afresh whenever it is seen, and the cutover checks before and
/// under the fence.
pub(crate) const DRIFT_EVERY: Duration = Duration::from_secs(5);

/// True once the cutover is done or cleanup removed the control schema: a
/// long-running `sync` (say, a systemd service) then ends cleanly instead of
/// failing on the vanished delta tables.
async fn migration_over(m: &Migration) -> Result<bool, crate::Error> {
    let conn = m.source_conn().await?;
    Ok(match state::load(&**conn).await? {
        None => true,
        Some(run) => run.phase == Phase::CutOver,
    })
}

/// Finishes what an interrupted run left of capturing and copying tables
/// registered after the first copy (partitions sync followed, or `install`
/// after drift), as `migrate` would: the drain goes on once they are
/// copied. The first copy is `copy`'s to finish.
async fn finish_later_copy(m: &Migration, cancel: &CancellationToken) -> Result<(), crate::Error> {
    let run = {
        let conn = m.source_conn().await?;
        state::load(&**conn).await?
    };
    let Some(run) = run.filter(|r| r.post_data_done && r.phase < Phase::Syncing) else {
        return Ok(());
    };
    tracing::info!(
        phase = run.phase.as_str(),
        "Finishing the capture and copy of tables registered since the copy"
    );
    if run.phase < Phase::Installed {
        crate::plan::preflight_for(m, true).await?;
        // What the registrations name: what changed on the source since is
        // drift again (a follow's, or the operator's), and a table it
        // created may not be on the target yet.
        crate::capture::install_as(m, cancel, crate::capture::Seen::Registered).await?;
    }
    crate::copy::run(m, cancel).await?;
    Ok(())
}

/// The captured tables, once the copy has finished.
pub async fn syncable_tables(m: &Migration) -> Result<Vec<TableState>, crate::Error> {
    let conn = m.source_conn().await?;
    match state::load(&**conn).await? {
        Some(run) if run.target_untidied() => Err(crate::Error::Phase(
            "an aborted cutover left the foreign keys and triggers it restored on the target, where they would act \
             on the drain: run `pgferry cutover --abort` (or `pgferry migrate`) to remove them, then sync"
                .into(),
        )),
        Some(run) if run.phase >= Phase::Syncing => Ok(state::tables(&**conn).await?),
        Some(run) => Err(crate::Error::Phase(format!(
            "the copy has not finished (phase {}): run `pgferry copy` first",
            run.phase.as_str()
        ))),
        None => Err(crate::Error::Phase(
            "no migration is under way on this source: run `pgferry install` and `pgferry copy` first".into(),
        )),
    }
}
