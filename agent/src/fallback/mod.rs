//! Fallback (`cutover.fallback`): after the switch the old source follows
//! the new database, until the operator finishes (docs/design.md,
//! "Fallback").
//!
//! Before the fence, [`prepare`] installs capture on the target, as
//! `install` does on a source, through the migration [reversed]: its
//! deltas then hold the forward drain's own writes, which [`forget_echo`]
//! empties under the fence, after the last of them and before the switch
//! command, so the first thing they hold after it is the application's
//! first write to the target. After the switch, [`run`] applies those
//! changes to the old source ([`apply`]), which stays fenced for everyone
//! but pgferry's apply sessions; [`finish`] removes it all from both sides.
//!
//! [reversed]: crate::db::Migration::reversed

pub mod ahead;
pub mod apply;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::control::state::{self, Phase};
use crate::db::Migration;

/// Fallback failures.
#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    /// Nothing of a fallback on these databases.
    #[error("{0}")]
    NotUnderWay(String),
    /// The switchback failed before its command ran; the target's fence
    /// is lifted.
    #[error("switchback aborted, the application writes to the target again: {why}")]
    Aborted {
        /// What failed.
        why: String,
        /// A verification found differences (exit 1).
        mismatch: bool,
    },
    /// A switchback failed with the target fenced, and its fence could not
    /// be lifted within `cutover.fence_lift_timeout_ms`.
    #[error(
        "THE TARGET IS STILL FENCED: the application cannot write to it. The switchback failed and pgferry could \
         not lift the target's fence in {secs} s of trying; once the target can be reached, run `pgferry \
         switchback --abort` to lift it"
    )]
    TargetStillFenced {
        /// How long lifting was tried.
        secs: u64,
        /// Why the last attempt failed.
        #[source]
        cause: Box<crate::Error>,
    },
    /// The switchback command ran, and the old source's fence could not be
    /// lifted within `cutover.fence_lift_timeout_ms`.
    #[error(
        "THE OLD SOURCE IS STILL FENCED: the switchback command ran, so the application writes to it, and pgferry \
         could not open it in {secs} s of trying; once it can be reached, run `pgferry switchback` to open it \
         (the command does not run again)"
    )]
    SourceStillFenced {
        /// How long opening it was tried.
        secs: u64,
        /// Why the last attempt failed.
        #[source]
        cause: Box<crate::Error>,
    },
    /// A statement failed on one side.
    #[error("{what} failed on the {side}")]
    Query {
        /// Which step.
        what: String,
        /// Which side (as the migration names them: the target is the new database).
        side: crate::db::endpoint::Side,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The old source refused a pass on a constraint that is not
    /// deferrable: the target's snapshot moved a unique value between
    /// rows, or holds rows that reference each other, and PostgreSQL
    /// checks such a constraint within each statement.
    #[error(
        "the old source refused the way back's changes on {constraint} of {table}: the new database moved a unique \
         value between rows, or wrote rows that reference each other, in one snapshot, and the old source checks \
         that constraint within each statement, not at the commit, because it is not DEFERRABLE. Nothing was \
         applied or lost; the way back stops here. Make it DEFERRABLE on the old source (a foreign key: {fix}; a \
         unique one: drop it and add it again DEFERRABLE) and run `pgferry fallback` again: each pass checks \
         deferrable constraints at its commit"
    )]
    NotDeferrable {
        /// The constraint.
        constraint: String,
        /// Its table, `schema.name`.
        table: String,
        /// The statement that makes it deferrable, were it a foreign key.
        fix: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A session could not be opened.
    #[error(transparent)]
    Connect(#[from] crate::db::endpoint::ConnectError),
}

impl crate::error::Failure for FallbackError {
    fn exit_code(&self) -> crate::error::ExitCode {
        match self {
            FallbackError::NotUnderWay(_) => crate::error::ExitCode::Usage,
            FallbackError::Aborted { mismatch: true, .. } => crate::error::ExitCode::CheckFailed,
            FallbackError::TargetStillFenced { .. } | FallbackError::SourceStillFenced { .. } => {
                crate::error::ExitCode::Fenced
            }
            _ => crate::error::ExitCode::Runtime,
        }
    }

    fn retryable(&self) -> bool {
        match self {
            FallbackError::Query { source, .. } => crate::db::errors::is_retryable(source),
            FallbackError::Connect(e) => e.is_retryable(),
            FallbackError::NotUnderWay(_)
            | FallbackError::Aborted { .. }
            | FallbackError::TargetStillFenced { .. }
            | FallbackError::SourceStillFenced { .. }
            | FallbackError::NotDeferrable { .. } => false,
        }
    }
}

pub(crate) fn query_err(
    what: &str,
    side: crate::db::endpoint::Side,
) -> impl FnOnce(tokio_postgres::Error) -> FallbackError {
    let what = what.to_string();
    move |source| FallbackError::Query { what, side, source }
}

/// Before the fence: capture on the target (committed, table by table, as
/// `install` does it), and on the source the pass its fence will let
/// through. Safe to run again.
pub async fn prepare(m: &Migration, cancel: &CancellationToken) -> Result<(), crate::Error> {
    use crate::db::endpoint::Side;
    m.source_conn()
        .await?
        .execute(
            "UPDATE pgferry.run SET apply_pass = md5(random()::text || clock_timestamp()::text)
              WHERE apply_pass IS NULL",
            &[],
        )
        .await
        .map_err(query_err("setting the apply pass", Side::Source))?;
    let back = m.reversed();
    let report = crate::capture::install(&back, cancel).await?;
    let conn = back.source_conn().await?;
    conn.execute("UPDATE pgferry.run SET direction = 'reverse'", &[])
        .await
        .map_err(query_err("recording the direction", Side::Target))?;
    state::set_phase(&**conn, Phase::Syncing).await?;
    tracing::info!(
        tables = report.tables,
        "Capture installed on the target for the way back"
    );
    Ok(())
}

/// Under the fence, after the last write of the forward line to the target
/// and before the switch: empties the target's deltas, which hold nothing
/// but those writes.
pub async fn forget_echo(m: &Migration) -> Result<(), crate::Error> {
    let back = m.reversed();
    let conn = back.source_conn().await?;
    let tables = state::tables(&**conn).await?;
    let mut names: Vec<String> = tables
        .iter()
        .filter(|t| !t.copy_only)
        .map(|t| t.delta_table().to_string())
        .collect();
    names.push("pgferry.truncates".into());
    conn.batch_execute(&format!("TRUNCATE {}", names.join(", ")))
        .await
        .map_err(query_err(
            "emptying the target's deltas",
            crate::db::endpoint::Side::Target,
        ))?;
    Ok(())
}

/// After an aborted cutover: the target is not the application's yet, and
/// its capture would keep recording the forward drain's writes for nobody.
/// Removed, table by table; the next cutover installs it again.
pub async fn withdraw(m: &Migration, cancel: &CancellationToken) -> Result<(), crate::Error> {
    if !m.has_target() || !under_way(m).await? {
        return Ok(());
    }
    let back = m.reversed();
    apply::without_passes(m, cancel, || async {
        crate::cleanup::remove_capture(&back, cancel).await?;
        withdraw_target_schema(&back).await
    })
    .await?;
    tracing::info!("Capture for the way back removed from the target");
    Ok(())
}

/// Whether the target captures for a way back.
pub async fn under_way(m: &Migration) -> Result<bool, crate::Error> {
    under_way_on(&**m.target_conn().await?).await
}

/// [`under_way`], on a session of the target's.
pub(crate) async fn under_way_on(conn: &impl tokio_postgres::GenericClient) -> Result<bool, crate::Error> {
    let err = || query_err("looking for the way back", crate::db::endpoint::Side::Target);
    let exists: bool = conn
        .query_one("SELECT to_regclass('pgferry.run') IS NOT NULL", &[])
        .await
        .map_err(err())?
        .get(0);
    if !exists {
        return Ok(false);
    }
    let direction: Option<String> = match conn.query_opt("SELECT direction FROM pgferry.run", &[]).await {
        Ok(row) => row.map(|r| r.get(0)),
        // Dropped since the look above (`finish` or a switchback, by
        // another agent): no way back any more.
        Err(e)
            if matches!(
                e.code(),
                Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
                    | Some(&tokio_postgres::error::SqlState::INVALID_SCHEMA_NAME)
            ) =>
        {
            None
        }
        Err(e) => return Err(err()(e).into()),
    };
    Ok(direction.as_deref() == Some("reverse"))
}

/// The way back, as the target's control schema tells it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReverseStatus {
    /// Changes on the target not yet applied to the old source (delta rows).
    pub backlog_rows: i64,
    /// Seconds since the snapshot of the last pass that applied all it saw:
    /// bounds the age of the oldest change not yet on the old source. None
    /// before the first pass.
    pub lag_secs: Option<f64>,
    /// Whether the target's fence is up (a switchback under way).
    pub target_fenced: bool,
}

/// The way back's backlog and lag, when the target captures for it.
pub async fn reverse_status(m: &Migration) -> Result<Option<ReverseStatus>, crate::Error> {
    if !m.has_target() || !under_way(m).await? {
        return Ok(None);
    }
    let back = m.reversed();
    let conn = back.source_conn().await?;
    let tables = state::tables(&**conn).await?;
    let backlog: i64 = crate::drain::backlog(&conn, &tables).await?.iter().sum();
    let row = conn
        .query_one(
            "SELECT extract(epoch FROM clock_timestamp() - reverse_synced_through)::float8,
                    (SELECT last_value <> 0 FROM pgferry.fence)
               FROM pgferry.run",
            &[],
        )
        .await
        .map_err(query_err(
            "reading the way back's lag",
            crate::db::endpoint::Side::Target,
        ))?;
    Ok(Some(ReverseStatus {
        backlog_rows: backlog,
        lag_secs: row.get(0),
        target_fenced: row.get(1),
    }))
}

/// What `pgferry fallback` did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FallbackReport {
    /// Passes that applied something.
    pub passes: u64,
    /// Keys applied to the old source.
    pub keys_applied: u64,
    /// The application's triggers disabled on the old source.
    pub triggers_disabled: usize,
}

/// After the switch: applies what the application writes to the target to
/// the old source, until cancelled (or, with `until_caught_up`, after a
/// pass that found nothing), or until [`finish`] removed the way back.
pub async fn run(
    m: &Migration,
    until_caught_up: bool,
    cancel: &CancellationToken,
) -> Result<FallbackReport, crate::Error> {
    let run = state::load(&**m.source_conn().await?).await?;
    if run.map(|r| r.phase) != Some(Phase::CutOver) || !under_way(m).await? {
        return Err(FallbackError::NotUnderWay(
            "no fallback is under way: the cutover must have finished with cutover.fallback = true".into(),
        )
        .into());
    }
    let mut report = FallbackReport {
        triggers_disabled: apply::disable_triggers(m, cancel).await?,
        ..Default::default()
    };
    let poll = Duration::from_millis(m.cfg.sync.poll_interval_ms);
    let mut failures = 0u32;
    let mut verified_at: Option<std::time::Instant> = None;
    loop {
        if cancel.is_cancelled() || !under_way(m).await? {
            return Ok(report);
        }
        match apply::pass(m).await {
            Ok(Some(keys)) => {
                failures = 0;
                if keys > 0 {
                    report.passes += 1;
                    report.keys_applied += keys;
                    continue;
                }
                if until_caught_up {
                    return Ok(report);
                }
                if m.cfg.cutover.verify == crate::verify::VerifyScope::Changed
                    && verified_at.is_none_or(|at| at.elapsed() >= VERIFY_EVERY)
                {
                    verified_at = Some(std::time::Instant::now());
                    if let Err(crate::Error::Cancelled) = verify_while_following(m, cancel).await {
                        return Ok(report);
                    }
                }
            }
            // Another agent applies; its pass is not ours to count as caught up.
            Ok(None) => {}
            Err(e)
                if crate::db::retry::Retryable::is_retryable(&e)
                    && failures < m.cfg.source_limits.lock_retries =>
            {
                failures += 1;
                tracing::warn!(error = %crate::db::errors::report(&e), "The way back failed a pass; retrying");
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(report),
            () = tokio::time::sleep(poll) => {}
        }
    }
}

/// How often `pgferry fallback`, caught up, verifies ahead of the
/// target's fence the tables it has not verified yet, and compares again
/// the changed rows of those whose ledgers grew past
/// `cutover.max_keys_under_fence`.
const VERIFY_EVERY: Duration = Duration::from_secs(300);

/// While the way back follows (`cutover.verify = "changed"`): the
/// switchback's verification ahead of the target's fence
/// ([`ahead::verify_ahead`]), done now, while nobody waits for it, so that
/// the switchback finds the tables verified and their ledgers small and
/// returns in seconds whatever the database's size. A difference is said
/// as an error and following goes on (the switchback will refuse until it
/// is repaired); a failure is said and tried again later.
async fn verify_while_following(m: &Migration, cancel: &CancellationToken) -> Result<(), crate::Error> {
    let back = m.reversed();
    let newdb = back.source_conn().await?;
    // Not once a switchback has fenced the target: it waits for every pass,
    // and a comparison of whole tables would lengthen its window.
    if state::load(&**newdb)
        .await?
        .is_none_or(|r| r.phase != Phase::Syncing)
    {
        return Ok(());
    }
    let tables = state::tables(&**newdb).await?;
    drop(newdb);
    match ahead::verify_ahead(m, &tables, cancel).await {
        Ok(done) => {
            if done.tables > 0 || done.changed_rows > 0 {
                tracing::info!(
                    tables = done.tables,
                    changed_rows = done.changed_rows,
                    ms = done.ms,
                    "Verified ahead of a switchback while following"
                );
            }
            Ok(())
        }
        Err(crate::Error::Cancelled) => Err(crate::Error::Cancelled),
        Err(e) => {
            match e.downcast_ref::<FallbackError>() {
                Some(FallbackError::Aborted { why, mismatch: true }) => tracing::error!(
                    "The old source differs from the new database: {why}. A switchback refuses until the rows are \
                     repaired (rewrite them on the new database)"
                ),
                _ => tracing::warn!(
                    error = %crate::db::errors::report(&e),
                    "Could not verify ahead of a switchback while following; trying again later"
                ),
            }
            Ok(())
        }
    }
}

/// What `pgferry finish` removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FinishReport {
    /// The application's triggers enabled again on the old source.
    pub triggers_restored: usize,
    /// Capture triggers dropped on the target.
    pub target_triggers_dropped: usize,
    /// The old source was left fenced, as asked (`--keep-source-fenced`):
    /// `pgferry cleanup` releases it.
    pub source_kept_fenced: bool,
    /// The forward cleanup: the old source's capture (its fence) and control
    /// schema; none when the source was kept fenced.
    pub cleanup: Option<crate::cleanup::CleanupReport>,
}

/// Ends the fallback window: the old source's triggers enabled again,
/// capture removed from the target (table by table, as from a source),
/// then everything of pgferry's from both sides, which lifts the old
/// source's fence. With `keep_source_fenced`, the old source keeps its
/// fence (and the control schema that holds it), now refusing pgferry's
/// sessions too, until `pgferry cleanup` releases it.
pub async fn finish(
    m: &Migration,
    keep_source_fenced: bool,
    cancel: &CancellationToken,
) -> Result<FinishReport, crate::Error> {
    crate::failpoint::hit("finish.start").await;
    if m.has_target() {
        // Not while the service applies: a pass after the triggers came
        // back would fire them, one during the removal fail on it.
        apply::without_passes(m, cancel, || finish_alone(m, keep_source_fenced, cancel)).await
    } else {
        finish_alone(m, keep_source_fenced, cancel).await
    }
}

/// [`finish`], no pass applying meanwhile.
async fn finish_alone(
    m: &Migration,
    keep_source_fenced: bool,
    cancel: &CancellationToken,
) -> Result<FinishReport, crate::Error> {
    let mut report = FinishReport {
        triggers_restored: apply::restore_triggers(m, cancel).await?,
        ..Default::default()
    };
    crate::failpoint::hit("finish.after_triggers").await;
    let back = m.reversed();
    if m.has_target() && crate::control::exists(&**back.source_conn().await?).await? {
        let removed = crate::cleanup::remove_capture(&back, cancel).await?;
        report.target_triggers_dropped = removed;
        crate::failpoint::hit("finish.after_target_capture").await;
    }
    if keep_source_fenced {
        withdraw_target_schema(&back).await?;
        m.source_conn()
            .await?
            .batch_execute(
                "UPDATE pgferry.run SET apply_pass = NULL;
                 SELECT pgferry.fence_apply(true, true) WHERE pg_sequence_last_value('pgferry.fence') = 1",
            )
            .await
            .map_err(query_err(
                "keeping the old source fenced",
                crate::db::endpoint::Side::Source,
            ))?;
        report.source_kept_fenced = true;
        tracing::info!("The old source stays fenced; `pgferry cleanup` releases it");
        return Ok(report);
    }
    report.cleanup = Some(crate::cleanup::run(m, cancel).await?);
    Ok(report)
}

/// Drops the target's control schema (its capture triggers gone already).
async fn withdraw_target_schema(back: &Migration) -> Result<(), crate::Error> {
    back.source_conn()
        .await?
        .batch_execute("DROP SCHEMA IF EXISTS pgferry CASCADE")
        .await
        .map_err(query_err(
            "removing the way back",
            crate::db::endpoint::Side::Target,
        ))?;
    Ok(())
}
