//! Cutover: fence, final drain, sequences, target objects, verify, switch.
//!
//! On entry: phase `syncing` (or `cutting_over` after an interrupted run,
//! which resumes with the fence already up). The agent drains until the
//! backlog is small ([`decision::should_fence`]), raises the fence, waits for
//! writers already in flight ([`fence::wait_for_writers`]), drains what is
//! left, copies sequences, verifies every table, creates foreign keys
//! (`NOT VALID`), triggers, rules and policies, and runs the switch command.
//! Any failure before the switch command has run goes to [`abort::abort`]:
//! the fence is lifted on the source first (retried while the source cannot
//! be reached), then the target's cutover objects are removed and sync can
//! continue. The point of no return is recorded on the source just before
//! the switch command runs; after it a re-run only completes the cutover.
//! Then the phase is `cut_over`, the fence's refusal says the database has
//! moved, the source stays fenced until cleanup (`migrate --cutover` waits
//! for the application to leave it first, [`release`]), and the foreign
//! keys are validated.

pub mod abort;
mod ahead;
pub mod decision;
mod entries;
pub mod fence;
pub mod large_objects;
mod matviews;
pub mod objects;
pub mod release;
mod schema_since;
pub mod switchback;

use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::config::MatviewRefresh;
use crate::control::state::{self, Phase, TableState};
use crate::db::ident::Ident;
use crate::db::Migration;
use crate::verify::{self, Subject, VerifyReport, VerifyScope};
use crate::{drain, sync};
use ahead::{catch_up, refresh_key_statistics, settle_ledgers, verify_ahead};

/// Cutover failures.
#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    /// A source statement failed.
    #[error("a cutover statement failed on the source")]
    Source(#[source] tokio_postgres::Error),
    /// A target statement failed.
    #[error("a cutover statement failed on the target")]
    Target(#[source] tokio_postgres::Error),
    /// A session could not be opened.
    #[error(transparent)]
    Connect(#[from] crate::db::endpoint::ConnectError),
    /// The cutover was abandoned; the fence is lifted.
    #[error("cutover aborted, writes resumed on the source: {0}")]
    Aborted(String),
    /// Verification found differences; the fence is lifted.
    #[error("cutover aborted, writes resumed on the source: verification found {} differing table(s)", .0.mismatches)]
    VerifyMismatch(Box<VerifyReport>),
    /// Verification ahead of the fence (`cutover.verify = "changed"`) found
    /// differences; the fence was never raised.
    #[error(
        "cutover not started, the fence was never raised: verification ahead of the fence found {} differing table(s)",
        .0.mismatches
    )]
    MismatchBeforeFence(Box<VerifyReport>),
    /// The source's schema gained or changed objects since the copy that
    /// the target lacks; the fence was never raised.
    #[error(
        "cutover not started, the fence was never raised: the source's schema changed since the copy: {}. \
         Make the same changes on the target, then run the cutover again",
        .0.join("; ")
    )]
    SchemaChanged(Vec<String>),
    /// The cutover failed with the fence up, and the fence could not be
    /// lifted within `cutover.fence_lift_timeout_ms`.
    #[error(
        "THE SOURCE IS STILL FENCED: the application cannot write to it. The cutover failed and pgferry could not \
         lift the fence in {secs} s of trying; once the source can be reached, run `{command}` to lift it"
    )]
    StillFenced {
        /// How long lifting was tried.
        secs: u64,
        /// The command that lifts it.
        command: &'static str,
        /// Why the last attempt failed.
        #[source]
        cause: Box<crate::Error>,
    },
    /// The switch command failed; the fence is lifted.
    #[error("cutover aborted, writes resumed on the source: the switch command failed ({0})")]
    SwitchFailed(String),
}

impl crate::error::Failure for CutoverError {
    fn exit_code(&self) -> crate::error::ExitCode {
        use crate::error::ExitCode;
        match self {
            CutoverError::VerifyMismatch(_)
            | CutoverError::MismatchBeforeFence(_)
            | CutoverError::SchemaChanged(_) => ExitCode::CheckFailed,
            CutoverError::StillFenced { .. } => ExitCode::Fenced,
            _ => ExitCode::Runtime,
        }
    }

    fn retryable(&self) -> bool {
        match self {
            CutoverError::Source(e) | CutoverError::Target(e) => crate::db::errors::is_retryable(e),
            CutoverError::Connect(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Options of the `cutover` command.
#[derive(Debug, Clone, Copy, Default)]
pub struct CutoverOptions {
    /// Only lift the fence of an interrupted cutover and return to syncing.
    pub abort: bool,
    /// With `abort`: even when the switch command may have run.
    pub force: bool,
}

/// What the cutover did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CutoverReport {
    /// From fence raised to switch done.
    pub writes_blocked_ms: i64,
    /// Of those, the final drain.
    pub final_drain_ms: u64,
    /// Of those, the verification.
    pub verify_ms: u64,
    /// What the verification compared with the fence up (`cutover.verify`);
    /// none when this run verified nothing (it resumed a cutover past its
    /// verification).
    pub verify_scope: Option<VerifyScope>,
    /// Tables verified ahead of the fence by this run (`changed`), and how long
    /// that took (writes were not blocked then).
    pub verified_ahead: usize,
    /// See `verified_ahead`; with the comparisons of changed rows ahead of
    /// the fence.
    pub verify_ahead_ms: u64,
    /// Changed rows compared again ahead of the fence (`changed`), so that
    /// the fence compares only those changed since.
    pub changed_rows_verified_ahead: i64,
    /// Tables whose changed rows only were compared with the fence up (a
    /// partitioned table with its partitions counts once).
    pub tables_verified_by_changes: usize,
    /// Keys applied by the drains under the fence.
    pub final_drain_keys: u64,
    /// Indexes the source gained since the copy, built on the target ahead
    /// of the fence.
    pub indexes_built: usize,
    /// The source's INVALID indexes (`index on table`), not on the target:
    /// a CREATE INDEX CONCURRENTLY failed, or still runs. Build them on
    /// the target once they are valid on the source.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub indexes_not_migrated: Vec<String>,
    /// Schema entries (functions, views, types...) only the target has:
    /// dropped on the source since the copy, or created on the target.
    /// Left in place.
    pub schema_only_on_target: Vec<String>,
    /// The source's partition maintenance since sync stopped, repeated on
    /// the target before the catch-up (see `sync.follow_partitions`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions_followed: Vec<String>,
    /// The source's other schema changes repeated on the target: tables
    /// created, columns added or dropped (see `sync.follow_schema_changes`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schema_changes_followed: Vec<String>,
    /// Sequences copied.
    pub sequences: usize,
    /// Foreign keys created.
    pub foreign_keys: usize,
    /// Triggers created.
    pub triggers: usize,
    /// Tables verified equal (with `changed`, a partitioned table compared
    /// by its changes counts once, with its partitions).
    pub tables_verified: usize,
    /// Rows verified.
    pub rows_verified: i64,
    /// Foreign keys that could not be validated after the switch.
    pub unvalidated_foreign_keys: Vec<String>,
    /// Materialized views refreshed after the switch
    /// (`cutover.materialized_views = "after_switch"`).
    pub materialized_views_after_switch: usize,
    /// Those whose refresh after the switch failed, each with its reason.
    pub materialized_view_warnings: Vec<String>,
    /// Grants that could not be restored (typically: the role is missing).
    pub grant_warnings: Vec<String>,
    /// copy_only tables copied while writes were fenced.
    pub copied_under_fence: Vec<String>,
    /// The application's rows in extensions' configuration tables (such as
    /// its own SRIDs in PostGIS's `spatial_ref_sys`), copied and compared
    /// while writes were fenced.
    pub extension_config_rows: u64,
    /// Large objects copied while writes were fenced (with `large_objects`).
    pub large_objects: Option<large_objects::LargeObjectReport>,
    /// Where the write downtime went: each step with the fence up before
    /// the switch, in order, with its milliseconds.
    pub fenced_steps: Vec<FencedStep>,
}

/// One step with the fence up (see [`CutoverReport::fenced_steps`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FencedStep {
    /// What it did.
    pub step: String,
    /// How long it took.
    pub ms: u64,
}

/// Runs (or resumes) the cutover.
pub async fn run(
    m: &Migration,
    opts: CutoverOptions,
    cancel: &CancellationToken,
) -> Result<CutoverReport, crate::Error> {
    let conn = m.source_conn().await?;
    let Some(run) = state::load(&**conn).await? else {
        return Err(crate::Error::Phase(
            "no migration is under way on this source".into(),
        ));
    };
    if opts.abort {
        if run.phase != Phase::CuttingOver {
            return Err(crate::Error::Phase(format!(
                "there is no cutover to abort (phase {})",
                run.phase.as_str()
            )));
        }
        if run.switch_started && !opts.force {
            return Err(crate::Error::Phase(
                "the switch command may have run, so the application may already write to the target: \
                 run `pgferry cutover` to finish; only if you are sure the application still uses the source, \
                 run `pgferry cutover --abort --force`"
                    .into(),
            ));
        }
        drop(conn);
        abort::abort(m, "requested by the operator", run.switch_started).await?;
        return Ok(CutoverReport::default());
    }
    let mut phase = run.phase;
    if run.target_untidied() {
        // The fence is down; what the aborted attempt restored on the
        // target must go before anything drains into it.
        tracing::warn!("An earlier cutover was aborted before its objects on the target were removed: removing them first");
        abort::finish(m).await?;
        phase = Phase::Syncing;
    }
    let mut tables = match phase {
        Phase::Syncing | Phase::CuttingOver | Phase::CutOver => state::tables(&**conn).await?,
        other => {
            return Err(crate::Error::Phase(format!(
                "the copy has not finished (phase {}): run `pgferry copy` and `pgferry sync` first",
                other.as_str()
            )))
        }
    };
    drop(conn);
    if phase == Phase::CutOver {
        let mut report = CutoverReport {
            writes_blocked_ms: run.writes_blocked_ms.unwrap_or_default(),
            ..Default::default()
        };
        validate_after_switch(m, &mut report).await?;
        return Ok(report);
    }
    if run.switch_started {
        tracing::warn!("Resuming a cutover whose switch had started; the fence stays up");
        return after_point_of_no_return(m, CutoverReport::default(), true, cancel).await;
    }
    let mut ahead = (0, 0);
    let mut settled = 0;
    let mut indexes = crate::copy::indexes::Built::default();
    let mut prepared = None;
    let mut only_on_target = Vec::new();
    let mut entries_followed = Vec::new();
    let mut report_followed = crate::follow::Followed::default();
    if phase == Phase::Syncing {
        // Partition maintenance since sync stopped is followed as sync
        // would; during the cutover it stops it.
        if let Err(e) = drain::check_drift(m, &tables).await {
            let followed;
            (tables, followed) = sync::follow_drift(m, cancel, e.into()).await?;
            report_followed = followed;
        }
        report_followed
            .0
            .extend(crate::follow::attributes(m, cancel).await?);
        if m.cfg.cutover.fallback {
            // Committed before the fence, so before the switch: the
            // application's first write to the target is captured.
            crate::fallback::prepare(m, cancel).await?;
        }
        if m.cfg.cutover.verify == VerifyScope::Changed {
            ahead = verify_ahead(m, &tables, cancel).await?;
        }
        // Before the final catch-up, as the dumps of both schemas: they take
        // a while, and the backlog grows meanwhile. Entries changed after
        // the dump are caught by the fingerprint, read again under the fence.
        indexes = crate::copy::indexes::build_all(m, &tables).await?;
        let p = entries::prepare(m).await?;
        only_on_target = p.only_on_target.clone();
        entries_followed = p.followed.clone();
        prepared = Some(p);
        if m.cfg.cutover.verify == VerifyScope::Changed {
            let (rows, ms) = settle_ledgers(m, &tables, cancel).await?;
            settled = rows;
            ahead.1 += ms;
            refresh_key_statistics(m, &tables).await?;
        }
        catch_up(m, &tables, cancel).await?;
        if m.cfg.cutover.materialized_views == MatviewRefresh::AfterSwitch {
            // Populated at the switch, with the data of a moment before.
            matviews::refresh_all(m, &**m.source_conn().await?).await?;
        }
        crate::failpoint::hit("cutover.before_fence").await;
    } else {
        tracing::warn!("Resuming an interrupted cutover");
    }
    // Raised again on resume too: an abort that lifted the fence but died
    // before recording it must not leave a resumed cutover unfenced. The
    // phase moves with the fence, in one transaction, so no stored state
    // has the fence up in phase `syncing`.
    let raised = async {
        let mut conn = m.source_conn().await?;
        fence::raise_recorded(&mut conn, CutoverError::Source).await
    }
    .await;
    if let Err(e) = raised {
        // The commit may have gone through before the error.
        return Err(reopen(m, e, cancel).await);
    }
    tracing::warn!("Fence raised: writes to captured tables are blocked on the source");
    crate::failpoint::hit("cutover.after_fence").await;
    match fenced(m, &tables, cancel, prepared).await {
        Ok(mut report) => {
            (report.verified_ahead, report.verify_ahead_ms) = ahead;
            report.changed_rows_verified_ahead = settled;
            report.indexes_built = indexes.indexes;
            report.indexes_not_migrated = indexes.invalid;
            report.schema_only_on_target = only_on_target;
            (report.partitions_followed, report.schema_changes_followed) = report_followed.split();
            report.schema_changes_followed.extend(entries_followed);
            after_point_of_no_return(m, report, false, cancel).await
        }
        Err(e) => Err(reopen(m, e, cancel).await),
    }
}

/// A failure with the fence up and the switch not run: lifts the fence
/// first ([`abort::abort`]), and returns the error to report: the failure
/// itself once the fence is down, or [`CutoverError::StillFenced`].
async fn reopen(m: &Migration, e: crate::Error, cancel: &CancellationToken) -> crate::Error {
    let why = crate::db::errors::report(&e);
    tracing::error!(error = %why, "The cutover failed with the fence up");
    if let Err(still) = abort::abort(m, &why, false).await {
        return still;
    }
    if cancel.is_cancelled() {
        return crate::Error::Cancelled;
    }
    e
}

/// Retries of a failed batch or statement with the fence up (backoff from
/// 100 ms: about 6 s in all before the cutover aborts).
const FENCED_RETRIES: u32 = 5;

/// Everything done with the fence up before the point of no return. Every
/// step is idempotent, and any error leads to [`abort`].
async fn fenced(
    m: &Migration,
    tables: &[TableState],
    cancel: &CancellationToken,
    prepared: Option<entries::Prepared>,
) -> Result<CutoverReport, crate::Error> {
    let mut report = CutoverReport::default();
    // Nothing can write now, and every second from here is downtime: the
    // rate limits that kept the source its headroom are off, unless the
    // operator keeps them (`cutover.rate_limited`).
    // And a failure is retried briefly: a terminated session or a blip is
    // got past, but a target that is down aborts the cutover in seconds
    // instead of holding the application's writes for the minutes the
    // drain would retry outside the fence.
    let mut fenced_m = if m.cfg.cutover.rate_limited {
        m.clone()
    } else {
        m.without_rate_limits()
    };
    let limits = &mut fenced_m.cfg.source_limits;
    limits.lock_retries = limits.lock_retries.min(FENCED_RETRIES);
    let m = &fenced_m;
    // A clean slate first: what an interrupted earlier attempt restored
    // (foreign keys, triggers, rules, policies, row security) must not act
    // on the final drain, hide rows from the verification, or make this
    // attempt fail on objects that already exist.
    let mut laps = Laps::new();
    objects::remove_cutover_objects(&mut *m.target_conn().await?)
        .await
        .map_err(CutoverError::Target)?;
    laps.lap("clean slate");
    fence::wait_for_writers(m, tables, cancel).await?;
    laps.lap("writers");
    crate::failpoint::hit("cutover.after_writers").await;
    // Final drain: everything committed is visible now and nothing new can
    // commit, so this ends with the first pass that finds nothing. The
    // drift check reads the source catalog meanwhile (a quarter of a
    // second at 2,000 tables); what it finds fails the cutover before the
    // drain's own error, which drift may have caused.
    let drain = async {
        let never = CancellationToken::new();
        let started = Instant::now();
        let mut keys = 0;
        loop {
            let pass = drain::drain_pass(m, tables, &never).await?;
            keys += pass.keys_applied;
            if pass.is_idle() {
                return Ok::<_, crate::Error>((keys, started.elapsed()));
            }
        }
    };
    let (drained, drift) = tokio::join!(drain, drain::check_drift(m, tables));
    drift?;
    let (keys, took) = drained?;
    report.final_drain_keys = keys;
    report.final_drain_ms = took.as_millis() as u64;
    laps.lap("final drain and drift");
    // Tables without a key are copied whole now that nothing can change them.
    for t in tables.iter().filter(|t| t.copy_only) {
        let rows = crate::copy::recopy(m, t).await?;
        report
            .copied_under_fence
            .push(format!("{} ({rows} rows)", t.table.display_name()));
    }
    // The application's rows of extensions' configuration tables (an
    // SRID of its own): fenced too, so final now.
    report.extension_config_rows = crate::extension_config::copy(m).await?;
    if m.cfg.large_objects {
        let lo = large_objects::copy_all(m).await?;
        tracing::info!(
            copied = lo.copied,
            bytes = lo.bytes,
            removed = lo.removed,
            "Large objects copied"
        );
        report.large_objects = Some(lo);
    }
    laps.lap("copy_only and large objects");
    crate::failpoint::hit("cutover.after_final_drain").await;
    // The sequences are set while the tables are verified: neither reads
    // what the other writes.
    let sequences = async {
        let (source, target) = (m.source_conn().await?, m.target_conn().await?);
        let copied = objects::copy_sequences(&source, &target)
            .await
            .map_err(CutoverError::Target)?;
        crate::failpoint::hit("cutover.after_sequences").await;
        Ok::<_, crate::Error>(copied)
    };
    let subjects = tables.iter().map(Subject::of).collect();
    let verification = async {
        let started = Instant::now();
        let verdict = match m.cfg.cutover.verify {
            VerifyScope::Full => verify::verify(m, subjects).await?,
            VerifyScope::Changed => verify::verify_changed(m, tables).await?,
        };
        Ok::<_, crate::Error>((verdict, started.elapsed()))
    };
    report.verify_scope = Some(m.cfg.cutover.verify);
    let (sequences, (verdict, took)) = tokio::try_join!(sequences, verification)?;
    report.sequences = sequences;
    report.verify_ms = took.as_millis() as u64;
    laps.lap("verification, and sequences alongside");
    report.tables_verified_by_changes = verdict
        .tables
        .iter()
        .filter(|t| t.scope == VerifyScope::Changed)
        .count();
    if m.cfg.large_objects {
        let diffs = large_objects::differences(m).await?;
        if !diffs.is_empty() {
            return Err(CutoverError::Aborted(format!("large objects differ: {}", diffs.join(", "))).into());
        }
    }
    let config_differ = crate::extension_config::differences(m).await?;
    if !config_differ.is_empty() {
        return Err(CutoverError::Aborted(format!(
            "extension configuration rows differ: {}",
            config_differ.join(", ")
        ))
        .into());
    }
    if verdict.mismatches > 0 {
        return Err(CutoverError::VerifyMismatch(Box::new(verdict)).into());
    }
    report.tables_verified = verdict.tables.len();
    report.rows_verified = verdict.rows;
    crate::failpoint::hit("cutover.after_verify").await;
    let mut source = m.source_conn().await?;
    let target = m.target_conn().await?;

    let fks = objects::foreign_keys(&mut source)
        .await
        .map_err(CutoverError::Source)?;
    let triggers = objects::triggers(&mut source)
        .await
        .map_err(CutoverError::Source)?;
    report.foreign_keys = objects::create_foreign_keys(&target, &fks)
        .await
        .map_err(CutoverError::Target)?;
    report.triggers = objects::create_triggers(&target, &triggers)
        .await
        .map_err(CutoverError::Target)?;
    laps.lap("foreign keys and triggers");
    report.grant_warnings = entries::restore(m, prepared).await?;
    laps.lap("schema entries and grants");
    if m.cfg.cutover.materialized_views == MatviewRefresh::Fenced {
        matviews::refresh_all(m, &source).await?;
        laps.lap("materialized views");
    }
    if m.cfg.cutover.fallback {
        // Everything the forward line wrote to the target is written:
        // what the target's capture holds is its echo.
        crate::fallback::forget_echo(m).await?;
        laps.lap("way back made ready");
    }
    tracing::info!(steps = %laps, "Under the fence so far");
    report.fenced_steps = laps.done;
    crate::failpoint::hit("cutover.after_objects").await;
    Ok(report)
}

/// How long each step under the fence took, for the log: where the write
/// downtime goes.
struct Laps {
    last: Instant,
    done: Vec<FencedStep>,
}

impl Laps {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            done: Vec::new(),
        }
    }

    fn lap(&mut self, step: &str) {
        let now = Instant::now();
        self.done.push(FencedStep {
            step: step.to_string(),
            ms: (now - self.last).as_millis() as u64,
        });
        self.last = now;
    }
}

impl std::fmt::Display for Laps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let steps: Vec<String> = self
            .done
            .iter()
            .map(|s| format!("{} {} ms", s.step, s.ms))
            .collect();
        f.write_str(&steps.join(", "))
    }
}

/// The switch and what follows it. `resumed`: an earlier run recorded the
/// point of no return, so the switch command may already have run and
/// nothing but that command's own failure lifts the fence.
async fn after_point_of_no_return(
    m: &Migration,
    mut report: CutoverReport,
    resumed: bool,
    cancel: &CancellationToken,
) -> Result<CutoverReport, crate::Error> {
    // Point of no return: once the switch command may have run, the
    // application may write to the target, so nothing lifts the fence on its
    // own any more; a re-run completes these steps (the switch command must
    // be idempotent). Only the command's own failure report undoes it.
    let recorded = async {
        let conn = m.source_conn().await?;
        state::record_switch_started(&**conn).await?;
        Ok::<_, crate::Error>(())
    }
    .await;
    match recorded {
        Ok(()) => {}
        // The switch command has not run in this attempt: still ours to undo.
        Err(e) if !resumed => return Err(reopen(m, e, cancel).await),
        Err(e) => return Err(e),
    }
    crate::failpoint::hit("cutover.before_switch").await;
    if let Some(cmd) = &m.cfg.cutover.switch_command {
        if let Err(e) = switch(m, cmd).await {
            let why = crate::db::errors::report(&e);
            abort::abort(m, &why, true).await?;
            return Err(e.into());
        }
    }
    crate::failpoint::hit("cutover.after_switch").await;
    let conn = m.source_conn().await?;
    report.writes_blocked_ms = state::record_cutover_done(&**conn).await?;
    state::record_switched_back(&**conn, false).await?;
    tracing::info!(writes_blocked_ms = report.writes_blocked_ms, "Cutover done");
    // The fence stays; a writer still connected is told where the data went.
    if let Err(e) = fence::mark_moved(&**conn).await {
        tracing::warn!(error = %crate::db::errors::report(&e), "The fence's message could not be changed to say the database moved");
    }
    drop(conn);
    crate::failpoint::hit("cutover.before_validate").await;
    validate_after_switch(m, &mut report).await?;
    Ok(report)
}

/// Validates the foreign keys that are valid on the source; writes are not
/// blocked by validation, and a failure leaves the key NOT VALID with a
/// warning. With `cutover.materialized_views = "after_switch"`, refreshes
/// the materialized views first. A re-run does both again.
async fn validate_after_switch(m: &Migration, report: &mut CutoverReport) -> Result<(), crate::Error> {
    let mut source = m.source_conn().await?;
    let target = m.target_conn().await?;
    if m.cfg.cutover.materialized_views == MatviewRefresh::AfterSwitch {
        (
            report.materialized_views_after_switch,
            report.materialized_view_warnings,
        ) = matviews::refresh_all_after_switch(m, &source).await?;
        for w in &report.materialized_view_warnings {
            tracing::warn!(warning = %w, "Materialized view not refreshed after the switch");
        }
    }
    let fks = objects::foreign_keys(&mut source)
        .await
        .map_err(CutoverError::Source)?;
    for fk in &fks {
        if let Err(e) = objects::validate_foreign_keys(&target, std::slice::from_ref(fk)).await {
            // The one refusal an owner meets: PostgreSQL validates as the
            // owner, and a table that FORCEs row security on its owner
            // subjects the validation to its policies.
            let validate = format!(
                "ALTER TABLE {} VALIDATE CONSTRAINT {}",
                fk.table,
                Ident(fk.name.clone())
            );
            let fix = if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
                format!(
                    "run {validate} as a role with BYPASSRLS, or at a quiet moment in one transaction between \
                     ALTER TABLE <the table named> NO FORCE ROW LEVEL SECURITY and FORCE ROW LEVEL SECURITY \
                     (which lock it exclusively until the end)"
                )
            } else {
                format!("run {validate} once the error is dealt with")
            };
            tracing::warn!(constraint = %fk.name, table = %fk.table.display_name(), error = %crate::db::errors::report(&e), fix, "Foreign key left NOT VALID");
            report
                .unvalidated_foreign_keys
                .push(format!("{}.{}", fk.table.display_name(), fk.name));
        }
    }
    Ok(())
}

/// Runs the operator's switch command; the target URL travels in its
/// environment only.
async fn switch(m: &Migration, cmd: &str) -> Result<(), CutoverError> {
    run_switch_command(cmd, "PGFERRY_TARGET_URL", &m.cfg.target).await
}

/// Runs a command of the operator's that points the application at the
/// database `url` names, given to it in `var` of its environment only.
async fn run_switch_command(
    cmd: &str,
    var: &str,
    url: &Option<secrecy::SecretString>,
) -> Result<(), CutoverError> {
    use secrecy::ExposeSecret;
    let url = url
        .as_ref()
        .map(|u| u.expose_secret().to_string())
        .unwrap_or_default();
    tracing::info!(url_in = var, "Running the switch command");
    let status = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env(var, url)
        .stdin(std::process::Stdio::null())
        .status()
        .await
        .map_err(|e| CutoverError::SwitchFailed(e.to_string()))?;
    if status.success() {
        Ok(())
    } else {
        Err(CutoverError::SwitchFailed(status.to_string()))
    }
}
