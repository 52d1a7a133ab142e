//! `migrate`: the whole line, resumed from the stored phase.
//!
//! check → install → copy → then either sync until stopped, or (with
//! `--cutover`) cutover, the wait for the application to leave the old
//! source (fence up), and cleanup of the source; after a switchback,
//! `--cutover` syncs until an explicit `pgferry cutover` (the operator
//! went back on purpose). Each step is its own
//! command too and skips what an earlier run finished, so re-running
//! `migrate` after a crash continues where it stopped.

use tokio_util::sync::CancellationToken;

use crate::capture::{self, InstallReport};
use crate::cleanup::{self, CleanupReport};
use crate::control::state::{self, Phase};
use crate::copy::{self, CopyReport};
use crate::cutover::release::{self, ReleaseReport};
use crate::cutover::{self, CutoverOptions, CutoverReport};
use crate::db::Migration;
use crate::drain::SyncReport;
use crate::plan::{self, CheckReport};
use crate::sync::{self, SyncOptions};

/// Options of the `migrate` command.
#[derive(Debug, Clone, Copy, Default)]
pub struct MigrateOptions {
    /// Finish unattended: cutover, then cleanup of the source.
    pub cutover: bool,
}

/// What each step did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MigrateReport {
    /// Install step.
    pub install: Option<InstallReport>,
    /// Copy step.
    pub copy: Option<CopyReport>,
    /// Sync step (without `--cutover`).
    pub sync: Option<SyncReport>,
    /// Cutover step.
    pub cutover: Option<CutoverReport>,
    /// The wait, fence up, for the application to leave the old source.
    pub release: Option<ReleaseReport>,
    /// Cleanup step.
    pub cleanup: Option<CleanupReport>,
    /// With `cutover.fallback`: the old source following the new database
    /// after the switch, until stopped or finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<crate::fallback::FallbackReport>,
    /// The migration had finished already: an interrupted cleanup was
    /// completed, nothing else done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_earlier: Option<cleanup::Finished>,
}

/// Runs the preflight and refuses on blockers (printing the report).
pub async fn preflight(m: &Migration) -> Result<CheckReport, crate::Error> {
    plan::preflight_for(m, false).await
}

/// Runs the migration line from wherever it stands.
pub async fn run(
    m: &Migration,
    opts: MigrateOptions,
    cancel: &CancellationToken,
) -> Result<MigrateReport, crate::Error> {
    let mut report = MigrateReport::default();
    let run = {
        let conn = m.source_conn().await?;
        state::load(&**conn).await?
    };
    if run.as_ref().is_some_and(state::Run::target_untidied) {
        // An aborted cutover's objects on the target go before any drain.
        resilient(m, "cutover", cancel, || cutover::abort::finish(m)).await?;
    }
    if run.is_none() {
        // Nothing on the source: a new migration, or a finished one whose
        // cleanup was interrupted after the source's control schema went.
        if let Some(finished) = resilient(m, "cleanup", cancel, || cleanup::finished_marker(m)).await? {
            tracing::info!(
                source_database = %finished.source_database,
                finished_at = %finished.finished_at,
                "This migration finished already (its cleanup was interrupted): completing the cleanup"
            );
            report.cleanup = Some(resilient(m, "cleanup", cancel, || cleanup::run(m, cancel)).await?);
            report.finished_earlier = Some(finished);
            return Ok(report);
        }
    }
    let phase = run.map(|r| r.phase);
    if phase < Some(Phase::CuttingOver) {
        preflight(m).await?;
    }
    if phase < Some(Phase::Installed) {
        report.install = Some(resilient(m, "install", cancel, || capture::install(m, cancel)).await?);
    }
    if phase < Some(Phase::Syncing) {
        report.copy = Some(resilient(m, "copy", cancel, || copy::run(m, cancel)).await?);
    }
    let switched_back = phase == Some(Phase::Syncing) && {
        let conn = m.source_conn().await?;
        state::switched_back(&**conn).await?
    };
    if switched_back && opts.cutover {
        // Restarted after the operator went back: cutting over again is
        // the operator's decision, not the service's.
        tracing::warn!(
            "A switchback went back to this source: migrate --cutover syncs and waits for an explicit \
             `pgferry cutover` instead of cutting over again on its own"
        );
    }
    if !opts.cutover || switched_back {
        let opts = SyncOptions::default();
        report.sync = Some(resilient(m, "sync", cancel, || sync::run(m, opts, cancel)).await?);
        return Ok(report);
    }
    let opts = CutoverOptions::default();
    report.cutover = Some(resilient(m, "cutover", cancel, || cutover::run(m, opts, cancel)).await?);
    if m.cfg.cutover.fallback {
        // The old source follows the new database until `pgferry finish`
        // (or `switchback`); its fence stays.
        tracing::info!(
            "Cut over with a way back: the old source now follows the new database until `pgferry finish`"
        );
        report.fallback =
            Some(resilient(m, "fallback", cancel, || crate::fallback::run(m, false, cancel)).await?);
        return Ok(report);
    }
    // Cleanup lifts the fence: not while the application may still write
    // to the old source (invariant 8).
    report.release = Some(
        resilient(m, "cleanup", cancel, || {
            release::wait_for_the_application_to_leave(m, cancel)
        })
        .await?,
    );
    report.cleanup = Some(resilient(m, "cleanup", cancel, || cleanup::run(m, cancel)).await?);
    Ok(report)
}

/// Runs a whole step again after a transient failure. Every step resumes
/// from the stored state, so this is what a supervisor restarting the agent
/// would do, without losing the process. Errors that need an operator
/// (blockers, drift, a verification mismatch) are returned at once.
pub async fn resilient<T, F, Fut>(
    m: &Migration,
    step: &'static str,
    cancel: &CancellationToken,
    mut f: F,
) -> Result<T, crate::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::Error>>,
{
    let policy = crate::db::retry::RetryPolicy {
        retries: m.cfg.source_limits.step_retries,
        base: std::time::Duration::from_millis(500),
        cap: std::time::Duration::from_millis(m.cfg.source_limits.retry_max_backoff_ms),
    };
    match crate::db::retry::retry(policy, step, step, cancel, &mut f).await {
        Ok(v) => Ok(v),
        Err(crate::db::retry::Gave::Up(e)) => Err(e),
        Err(crate::db::retry::Gave::Cancelled) => Err(crate::Error::Cancelled),
    }
}
