//! The drain: applies captured deltas to the target, batch by batch.
//!
//! On entry: the copy has finished (phase `syncing` or later). A batch for
//! table T:
//! 1. takes a session advisory lock for T on the source, so that no other
//!    agent drains T at the same time (two overlapping batches could commit
//!    on the target in the wrong order);
//! 2. opens a REPEATABLE READ transaction on the source; its snapshot S
//!    decides everything: the batch consumes exactly the delta rows visible
//!    in S, every one of them (invariants 4 and 5);
//! 3. on the target, in one transaction, deletes every key named by those
//!    deltas and inserts the source rows for those keys as of S (state-based:
//!    re-applying changes nothing, invariant 3); a TRUNCATE delta replaces the
//!    whole table with its contents as of S;
//! 4. only after the target commit, deletes on the source exactly the delta
//!    rows visible in S: in the source transaction of step 2 itself, which
//!    commits last. A transaction that committed after S keeps its deltas
//!    for the next batch, whatever its xid or commit order; a delta row needs
//!    no transaction id or other watermark (control schema v11).
//!
//! A crash anywhere leaves deltas that are re-applied harmlessly. Workers stop
//! between batches, never inside one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Object;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_postgres::IsolationLevel;
use tokio_util::sync::CancellationToken;

use crate::copy::{pump, Pumped};
use crate::endpoint::Side;
use crate::ident::{column_list, Ident};
use crate::migration::Migration;
use crate::retry::{retry, Gave, Retryable};
use crate::state::{self, Phase, TableState};
use crate::throttle::Throttle;
use crate::verify::TableVerdict;

/// Advisory-lock class for "a batch of table N is in progress" (`pgfr`).
const BATCH_LOCK_CLASS: i32 = 0x7067_6672;

/// The batch lock's key: the root of the table's partition hierarchy (the
/// table itself when it is not a partition), so that a root batch and a
/// partition batch, which may name the same row, never overlap.
fn lock_key(t: &TableState) -> i32 {
    // An OID as the lock's int4 key: the bits matter, not the sign.
    t.lock_relid as i32
}

/// A table's backlog is drained in [`PARTS`] parallel batches, one per
/// hash of the key, once its delta table holds at least this many rows (and
/// fewer tables than workers have deltas).
const SPLIT_FROM_ROWS: i64 = 50_000;

/// How many parts a large backlog is split into. Every agent must agree on
/// it (parts are locked by number), so it is a constant, not a setting.
const PARTS: u32 = 4;

/// One part of a table's backlog: the delta rows whose key hashes to it.
/// `hash_record` uses each key type's default hash, so every session agrees
/// on which part a key belongs to.
#[derive(Debug, Clone, Copy)]
struct Part(u32);

impl Part {
    /// The predicate selecting this part's delta rows (columns `k1`...).
    fn predicate(self, t: &TableState) -> String {
        format!(
            "(hash_record(ROW({})) & {}) = {}",
            delta_key_list(t),
            PARTS - 1,
            self.0
        )
    }
}

/// The delta table's key columns: `k1, k2, ...`.
pub(crate) fn delta_key_list(t: &TableState) -> String {
    (1..=t.key_columns.len())
        .map(|i| format!("k{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Drain failures.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A statement of a batch failed.
    #[error("drain batch for {table} failed on the {side}")]
    Batch {
        /// The table.
        table: String,
        /// Which side failed.
        side: Side,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Counting the backlog failed.
    #[error("could not count the backlog of {table}")]
    Backlog {
        /// The table.
        table: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A session could not be opened.
    #[error(transparent)]
    Connect(#[from] crate::endpoint::ConnectError),
    /// Recording progress failed.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// A worker task panicked.
    #[error("a drain worker stopped unexpectedly")]
    Worker(#[source] tokio::task::JoinError),
    /// The source schema changed since install.
    #[error(
        "the source schema changed since install: {}. Make the same change on the target, then run \
         `pgferry install` (it captures new tables and marks changed ones for a fresh copy) and \
         `pgferry copy`, then sync again",
        .0.join("; ")
    )]
    SchemaDrift(Vec<String>),
    /// The target refused a value of an enum type that the source extended
    /// since the copy.
    #[error(
        "the source's enum types gained values since the copy, which the target refuses: {}. Run these on the \
         target, then sync again (nothing needs copying)",
        .0.join("; ")
    )]
    EnumDrift(Vec<String>),
    /// A batch failed on a column whose type the source changed since the
    /// copy (the drift check compares names, not types).
    #[error(
        "column types changed on the source since the copy, which the target's table does not take: {}. Make \
         the same change on the target, then sync again (nothing needs copying)",
        .0.join("; ")
    )]
    TypeDrift(Vec<String>),
    /// Reading the source catalog for drift failed.
    #[error("could not read the source catalog")]
    Catalog(#[source] tokio_postgres::Error),
    /// Repeating the source's partition maintenance on the target failed.
    #[error(
        "could not follow the source's partition maintenance on the target ({what}); sync again to retry, \
         or set sync.follow_partitions = false and make the change on the target by hand"
    )]
    Follow {
        /// The step.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Comparing a table before the fence failed.
    #[error(transparent)]
    Verify(Box<crate::verify::VerifyError>),
}

impl Retryable for SyncError {
    fn is_retryable(&self) -> bool {
        match self {
            SyncError::Batch { source, .. } | SyncError::Backlog { source, .. } => {
                crate::error::is_retryable(source)
            }
            SyncError::Connect(e) => e.is_retryable(),
            SyncError::State(e) => e.is_retryable(),
            SyncError::Catalog(source) | SyncError::Follow { source, .. } => {
                crate::error::is_retryable(source)
            }
            SyncError::Worker(_)
            | SyncError::SchemaDrift(_)
            | SyncError::EnumDrift(_)
            | SyncError::TypeDrift(_)
            | SyncError::Verify(_) => false,
        }
    }
}

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

/// What a drain did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SyncReport {
    /// Passes over all tables.
    pub passes: u64,
    /// Distinct keys applied.
    pub keys_applied: u64,
    /// Rows written to the target.
    pub rows_written: u64,
    /// Whole-table resynchronisations after TRUNCATE.
    pub truncates_applied: u64,
    /// Whole-table copies made because most of a table's rows changed (see
    /// `sync.recopy_fraction`).
    pub recopies: u64,
    /// Batches skipped because another agent was draining the table.
    pub busy: u64,
    /// Batches that applied one part of a large backlog (see [`PARTS`]).
    pub parts: u64,
    /// The source's partition maintenance repeated on the target (see
    /// `sync.follow_partitions`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions_followed: Vec<String>,
    /// Delta rows left when `--until-caught-up` stopped (written while the
    /// last pass ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog_left: Option<i64>,
}

impl SyncReport {
    /// True when the pass found nothing to apply and no table was skipped.
    pub fn is_idle(&self) -> bool {
        self.keys_applied == 0 && self.truncates_applied == 0 && self.busy == 0
    }

    /// Adds up a pass's counts into the report of the whole run.
    fn merge(&mut self, pass: &SyncReport) {
        self.passes += pass.passes;
        self.keys_applied += pass.keys_applied;
        self.rows_written += pass.rows_written;
        self.truncates_applied += pass.truncates_applied;
        self.recopies += pass.recopies;
        self.busy += pass.busy;
        self.parts += pass.parts;
    }

    fn add(&mut self, b: &BatchStats) {
        self.keys_applied += b.keys;
        self.rows_written += b.rows_written;
        self.truncates_applied += u64::from(b.truncated);
        self.recopies += u64::from(b.recopied);
        self.busy += u64::from(b.busy);
        self.parts += u64::from(b.part);
    }
}

/// One batch's outcome.
#[derive(Debug, Clone, Default)]
struct BatchStats {
    keys: u64,
    rows_deleted: u64,
    rows_written: u64,
    truncated: bool,
    /// Most of the table changed: copied whole instead of key by key.
    recopied: bool,
    /// Another agent held the table's batch lock.
    busy: bool,
    /// The batch applied one part of the table's keys.
    part: bool,
    /// The tables compared in full in the batch's snapshot, when asked.
    verified: Option<Vec<TableVerdict>>,
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

/// Schema drift that is only partition maintenance is repeated on the
/// target (see [`crate::follow`]); returns the captured tables then.
/// Anything else is `e` again.
async fn follow(
    m: &Migration,
    cancel: &CancellationToken,
    e: crate::Error,
    report: &mut SyncReport,
) -> Result<Vec<TableState>, crate::Error> {
    let (tables, changes) = follow_drift(m, cancel, e).await?;
    report.partitions_followed.extend(changes);
    Ok(tables)
}

/// [`follow`], for the cutover too: the captured tables once the target
/// followed, and what it followed.
pub(crate) async fn follow_drift(
    m: &Migration,
    cancel: &CancellationToken,
    e: crate::Error,
) -> Result<(Vec<TableState>, Vec<String>), crate::Error> {
    if !matches!(e, crate::Error::Sync(SyncError::SchemaDrift(_))) {
        return Err(e);
    }
    let Some(changes) = crate::follow::partitions(m, cancel).await? else {
        return Err(e);
    };
    tracing::info!(
        changes = changes.len(),
        "The target follows the source's partitions: draining on"
    );
    Ok((
        syncable_tables(m).await?,
        changes.iter().map(ToString::to_string).collect(),
    ))
}

/// How often `sync` checks the source for drift ([`check_drift`]): the
/// check reads the catalog of every captured table, 135 ms for 2,000 of
/// them, which every pass (a few a second) made a steady load on an idle
/// source. A schema change meanwhile is told when a batch fails on it, a
/// capture trigger disabled meanwhile sends its table to be captured and
/// copied afresh whenever it is seen, and the cutover checks before and
/// under the fence.
const DRIFT_EVERY: Duration = Duration::from_secs(5);

/// The drain's adaptive pause: doubles while the source is under pressure
/// (sessions waiting on locks, or a slow round trip), ends when it is not.
/// `sync` and the cutover's catch-up before the fence both go through it.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    current: Option<Duration>,
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
async fn pressure(m: &Migration) -> Result<(i64, Duration), SyncError> {
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

/// What changed in the source schema since the tables were registered: new
/// user tables, dropped or renamed ones, changed columns or keys.
pub fn drift(registered: &[TableState], current: &[crate::plan::SourceTable]) -> Vec<String> {
    let mut changes = Vec::new();
    for t in registered {
        match current.iter().find(|c| c.relid == t.relid) {
            None => changes.push(format!("table {} was dropped", t.table.display_name())),
            Some(c) if c.table != t.table => changes.push(format!(
                "table {} was renamed to {}",
                t.table.display_name(),
                c.table.display_name()
            )),
            // ATTACH/DETACH PARTITION, INHERIT/NO INHERIT: the table reads
            // and is verified as part of another hierarchy (or none) than
            // the target's copy of it, and a parent's rows would differ
            // while each table compared the same.
            Some(c) if c.lock_relid != t.lock_relid || c.parent_relid != t.parent_relid => changes.push(format!(
                "table {} joined or left a partitioned table or an inheritance parent (ATTACH/DETACH PARTITION, \
                 INHERIT/NO INHERIT)",
                t.table.display_name()
            )),
            Some(c) if !t.copy_only && c.key_columns.as_ref() != Some(&t.key_columns) => {
                changes.push(format!("table {}: its key changed", t.table.display_name()))
            }
            Some(c) if c.copy_columns != t.copy_columns => changes.push(format!(
                "table {}: columns changed (now {}, captured {})",
                t.table.display_name(),
                c.copy_columns.join(", "),
                t.copy_columns.join(", ")
            )),
            Some(_) => {}
        }
    }
    for c in current {
        if !registered.iter().any(|t| t.relid == c.relid) {
            changes.push(format!(
                "table {} was created after install and is not captured",
                c.table.display_name()
            ));
        }
    }
    changes
}

/// The captured tables whose capture must be installed afresh: a trigger
/// disabled or dropped (`lost`), or a key column trigger that a BEFORE
/// UPDATE row trigger created since install could bypass.
#[derive(Debug, Default)]
pub struct CaptureGaps {
    /// Source OIDs of tables whose capture was disabled or dropped.
    pub lost: Vec<u32>,
    /// Source OIDs of tables whose key column trigger can be bypassed.
    pub bypassed: Vec<u32>,
}

impl CaptureGaps {
    /// Reads both from the source catalog.
    pub async fn read(client: &impl tokio_postgres::GenericClient) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            lost: crate::capture::capture_lost(client).await?,
            bypassed: crate::capture::key_trigger_bypassed(client).await?,
        })
    }
}

/// [`drift`], plus the tables of `gaps`, each said as what it means.
pub fn changes(
    registered: &[TableState],
    current: &[crate::plan::SourceTable],
    gaps: &CaptureGaps,
) -> Vec<String> {
    let mut changes = drift(registered, current);
    for t in registered.iter().filter(|t| gaps.lost.contains(&t.relid)) {
        changes.push(format!(
            "table {}: a capture trigger of pgferry's was disabled or dropped, so writes made since may \
             not have been captured (nothing to change on the target: `install` captures the table \
             afresh and `copy` copies it again)",
            t.table.display_name()
        ));
    }
    for t in registered.iter().filter(|t| gaps.bypassed.contains(&t.relid)) {
        changes.push(format!(
            "table {}: a BEFORE UPDATE row trigger was created after install, and the capture of \
             key changes cannot see what such a trigger changes (on the target, create only the \
             function it calls, if the target lacks it: pgferry creates the trigger there at cutover)",
            t.table.display_name()
        ));
    }
    changes
}

/// [`changes`], with the capture gaps read from the source.
pub async fn schema_changes(
    client: &impl tokio_postgres::GenericClient,
    registered: &[TableState],
    current: &[crate::plan::SourceTable],
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(changes(registered, current, &CaptureGaps::read(client).await?))
}

/// Fails with [`SyncError::SchemaDrift`] when the source schema changed.
pub async fn check_drift(m: &Migration, tables: &[TableState]) -> Result<(), SyncError> {
    let conn = m.source_conn().await?;
    let current = crate::plan::source_tables(&**conn, false)
        .await
        .map_err(SyncError::Catalog)?;
    let changes = schema_changes(&**conn, tables, &current)
        .await
        .map_err(SyncError::Catalog)?;
    if changes.is_empty() {
        Ok(())
    } else {
        Err(SyncError::SchemaDrift(changes))
    }
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
        crate::migrate::preflight_for(m, true).await?;
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

/// One batch for every table, `sync.workers` tables at a time.
pub async fn drain_pass(
    m: &Migration,
    tables: &[TableState],
    cancel: &CancellationToken,
) -> Result<SyncReport, crate::Error> {
    let permits = Arc::new(Semaphore::new(m.sync_workers()));
    let mut tasks = JoinSet::new();
    // One task per partition hierarchy (a plain table is its own): its tables
    // share one batch lock, so they take turns inside the task instead of
    // finding each other busy. copy_only tables are not synced at all.
    let mut groups: Vec<Vec<TableState>> = Vec::new();
    for t in tables.iter().filter(|t| !t.copy_only) {
        match groups.iter_mut().find(|g| g[0].lock_relid == t.lock_relid) {
            Some(g) => g.push(t.clone()),
            None => groups.push(vec![t.clone()]),
        }
    }
    // Only where something is pending: the others were in sync as of the
    // reading, which is recorded once for all of them.
    let pending = {
        let mut conn = m.source_conn().await?;
        let syncing: Vec<&TableState> = groups.iter().flatten().collect();
        let pending = Pending::read(&conn, &syncing, Some(SPLIT_FROM_ROWS))
            .await
            .map_err(|source| SyncError::Backlog {
                table: "pgferry".into(),
                source,
            })?;
        groups.retain(|g| g.iter().any(|t| pending.backlog(t) > 0));
        let dirty: Vec<i32> = groups.iter().flatten().map(|t| t.id).collect();
        state::record_pass(&mut conn, pending.as_of, &dirty).await?;
        pending
    };
    // A plain table with a large backlog is drained in parts, in parallel,
    // when fewer tables have deltas than there are workers: parts cost every
    // part a read of the table's deltas and changed rows, which pays only
    // when workers would otherwise be idle.
    let busy = groups.len();
    let mut units: Vec<(Vec<TableState>, Option<Part>)> = Vec::new();
    for group in groups {
        let large = group.len() == 1 && !group[0].partitioned && pending.rows(&group[0]) >= SPLIT_FROM_ROWS;
        if large && busy < m.sync_workers() && splittable(m, &group[0]).await? {
            units.extend((0..PARTS).map(|i| (group.clone(), Some(Part(i)))));
        } else {
            units.push((group, None));
        }
    }
    for (group, part) in units {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        if cancel.is_cancelled() {
            break;
        }
        let (m, cancel) = (m.clone(), cancel.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let mut stats = Vec::with_capacity(group.len());
            for t in &group {
                match retry(m.retry_policy(), "batch", "drain a batch", &cancel, || {
                    drain_table(&m, t, &group, part, None)
                })
                .await
                {
                    Ok(s) => stats.push(s),
                    Err(Gave::Up(e)) => return Err(crate::Error::from(e)),
                    Err(Gave::Cancelled) => return Err(crate::Error::Cancelled),
                }
            }
            Ok(stats)
        });
    }
    let mut report = SyncReport {
        passes: 1,
        ..Default::default()
    };
    let mut first_err = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(stats)) => stats.iter().for_each(|s| report.add(s)),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(SyncError::Worker(e).into());
            }
        }
    }
    match first_err {
        Some(e) => Err(explained(m, tables, e).await),
        None => Ok(report),
    }
}

/// A batch that failed because the source's schema changed says what
/// changed, and so does one whose column types the source changed. One the
/// target refused for an invalid input value (SQLSTATE 22P02)
/// may carry a value of an enum type the source extended since the copy
/// (`ALTER TYPE ... ADD VALUE`, common in application deploys): the error
/// then says so, with what to run on the target. Looked for only then, so
/// it costs nothing while the drain works.
async fn explained(m: &Migration, tables: &[TableState], e: crate::Error) -> crate::Error {
    let crate::Error::Sync(SyncError::Batch { table, side, source }) = &e else {
        return e;
    };
    // `sync` checks for drift only every few seconds: a batch that met a
    // column changed since is told by what changed.
    if let Err(drift @ SyncError::SchemaDrift(_)) = check_drift(m, tables).await {
        return drift.into();
    }
    if *side != Side::Target {
        return e;
    }
    // A type changed on the source (`ALTER COLUMN ... TYPE bigint` as ids
    // near 2^31): the binary COPY fails with "incorrect binary data format",
    // or the value does not fit.
    if let Some(t) = tables.iter().find(|t| t.table.display_name() == *table) {
        if let Ok(changed) = types_changed(m, t).await {
            if !changed.is_empty() {
                return SyncError::TypeDrift(changed).into();
            }
        }
    }
    if source.code() != Some(&tokio_postgres::error::SqlState::INVALID_TEXT_REPRESENTATION) {
        return e;
    }
    match enum_values_missing(m).await {
        Ok(missing) if !missing.is_empty() => SyncError::EnumDrift(missing).into(),
        _ => e,
    }
}

/// The columns of `t` whose type differs between source and target, each
/// with the statement that makes the target's the source's.
async fn types_changed(m: &Migration, t: &TableState) -> Result<Vec<String>, crate::Error> {
    const TYPES: &str = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
                           FROM pg_attribute a
                          WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped";
    let name = t.table.to_string();
    let (source, target) = (m.source_conn().await?, m.target_conn().await?);
    let on = |rows: Vec<tokio_postgres::Row>| -> std::collections::HashMap<String, String> {
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    let theirs = on(source.query(TYPES, &[&name]).await.map_err(SyncError::Catalog)?);
    let ours = on(target
        .query(TYPES, &[&name])
        .await
        .map_err(|e| batch_err(t, Side::Target, e))?);
    Ok(t.copy_columns
        .iter()
        .filter_map(|c| match (theirs.get(c), ours.get(c)) {
            (Some(s), Some(g)) if s != g => Some(format!(
                "{}.{} is {s} on the source and {g} on the target (ALTER TABLE {} ALTER COLUMN {} TYPE {s})",
                t.table.display_name(),
                c,
                t.table,
                Ident(c.clone())
            )),
            _ => None,
        })
        .collect())
}

/// For each value of a source enum type that the target's type of that
/// name lacks, the `ALTER TYPE ... ADD VALUE` that adds it in its place
/// (after its predecessor, which comes first in this list if it is missing
/// too).
async fn enum_values_missing(m: &Migration) -> Result<Vec<String>, crate::Error> {
    const LABELS: &str = "SELECT format('%I.%I', n.nspname, t.typname), e.enumlabel::text,
                                 format('ALTER TYPE %I.%I ADD VALUE %L', n.nspname, t.typname, e.enumlabel)
                                 || CASE WHEN lag(e.enumlabel) OVER w IS NOT NULL
                                         THEN format(' AFTER %L', lag(e.enumlabel) OVER w)
                                         WHEN lead(e.enumlabel) OVER w IS NOT NULL
                                         THEN format(' BEFORE %L', lead(e.enumlabel) OVER w)
                                         ELSE '' END
                            FROM pg_enum e
                            JOIN pg_type t ON t.oid = e.enumtypid
                            JOIN pg_namespace n ON n.oid = t.typnamespace
                          WINDOW w AS (PARTITION BY e.enumtypid ORDER BY e.enumsortorder)
                           ORDER BY 1, e.enumsortorder";
    let source = m.source_conn().await?;
    let target = m.target_conn().await?;
    let wanted = source.query(LABELS, &[]).await.map_err(SyncError::Catalog)?;
    let have: std::collections::HashSet<(String, String)> = target
        .query(LABELS, &[])
        .await
        .map_err(|e| SyncError::Batch {
            table: "pg_enum".into(),
            side: Side::Target,
            source: e,
        })?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let types: std::collections::HashSet<&String> = have.iter().map(|(t, _)| t).collect();
    Ok(wanted
        .iter()
        .filter(|r| {
            let (ty, label): (String, String) = (r.get(0), r.get(1));
            types.contains(&ty) && !have.contains(&(ty, label))
        })
        .map(|r| r.get(2))
        .collect())
}

/// What is pending on the source: each table's delta rows and TRUNCATEs
/// still to apply, read in one round trip of one statement per table. One
/// `UNION ALL` over every delta table was planned anew each time, and its
/// planning grows faster than the tables: 1.4 s for 2,000 of them, against
/// 40 ms as separate statements.
pub struct Pending {
    /// `now()` of the reading transaction: every count below was read in a
    /// snapshot taken after it, so a table with nothing pending was in sync
    /// as of then (consumed deltas are removed only after the target commit).
    /// 0 (1970, the largest lag) if it could not be read.
    pub as_of: f64,
    /// Delta rows per table id (up to the limit asked for).
    rows: std::collections::HashMap<i32, i64>,
    /// TRUNCATE markers per table id.
    truncates: std::collections::HashMap<i32, i64>,
}

impl Pending {
    /// Reads what is pending for `tables`, counting at most `limit` delta
    /// rows of each (all of them without one). Their delta tables must exist.
    pub async fn read(
        client: &tokio_postgres::Client,
        tables: &[&TableState],
        limit: Option<i64>,
    ) -> Result<Pending, tokio_postgres::Error> {
        let limit = limit.map_or(String::new(), |n| format!(" LIMIT {n}"));
        // Each statement gets its own snapshot, after the first one's now()
        // (in READ COMMITTED; in REPEATABLE READ they share the first one).
        let mut sql = String::from(
            "SELECT 'e', 0, extract(epoch FROM now())::float8;
             SELECT 't', table_id, count(*) FROM pgferry.truncates GROUP BY table_id;",
        );
        for t in tables {
            sql.push_str(&format!(
                "SELECT 'd', {}, count(*) FROM (SELECT FROM {}{limit}) d;",
                t.id,
                t.delta_table()
            ));
        }
        let mut found = Pending {
            as_of: 0.0,
            rows: Default::default(),
            truncates: Default::default(),
        };
        for message in client.simple_query(&sql).await? {
            let tokio_postgres::SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            // Whatever does not read as a number is left out: a table
            // without a count is taken as pending, never as idle.
            let id = row.get(1).and_then(|v| v.parse::<i32>().ok());
            let n = row.get(2).and_then(|v| v.parse::<f64>().ok());
            match (row.get(0), id, n) {
                (Some("e"), _, Some(n)) => found.as_of = n,
                (Some("t"), Some(id), Some(n)) => _ = found.truncates.insert(id, n as i64),
                (Some("d"), Some(id), Some(n)) => _ = found.rows.insert(id, n as i64),
                _ => {}
            }
        }
        Ok(found)
    }

    /// Delta rows pending for `t`; one for a table the reading has no
    /// count of (each statement returns one row, so that is never expected).
    pub fn rows(&self, t: &TableState) -> i64 {
        self.rows.get(&t.id).copied().unwrap_or(1)
    }

    /// Delta rows and TRUNCATEs pending for `t`.
    pub fn backlog(&self, t: &TableState) -> i64 {
        self.rows(t) + self.truncates.get(&t.id).copied().unwrap_or(0)
    }
}

/// Whether `t`'s large backlog can be drained in parts: its key types can
/// be hashed (PostgreSQL 14+ has `hash_record`), and on the target its key
/// is its only unique index or constraint, so that parts applying different
/// keys at the same time never collide on another unique value moving
/// between rows.
async fn splittable(m: &Migration, t: &TableState) -> Result<bool, SyncError> {
    let source = m.source_conn().await?;
    let hashable = source
        .query(
            &format!("SELECT {} FROM {} LIMIT 1", Part(0).predicate(t), t.delta_table()),
            &[],
        )
        .await;
    match hashable {
        Ok(_) => {}
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_FUNCTION) => return Ok(false),
        Err(e) => return Err(batch_err(t, Side::Source, e)),
    }
    let target = m.target_conn().await?;
    let unique: i64 = target
        .query_one(
            "SELECT count(*) FROM pg_index WHERE indrelid = to_regclass($1) AND (indisunique OR indisexclusion)",
            &[&t.table.to_string()],
        )
        .await
        .map_err(|e| batch_err(t, Side::Target, e))?
        .get(0);
    Ok(unique <= 1)
}

/// Runs one batch for `t` (or one part of its backlog). On any failure the
/// source session is discarded rather than returned to the pool, which also
/// releases its batch locks.
///
/// A whole batch holds the table's batch lock exclusively. A part holds it
/// shared, plus its part's own lock: parts run side by side, never beside a
/// whole batch or the same part elsewhere. With `verify`, the batch is a
/// [`verify_batch`] of the unit `group`, whose first table is `t`.
async fn drain_table(
    m: &Migration,
    t: &TableState,
    group: &[TableState],
    part: Option<Part>,
    verify: Option<Ahead>,
) -> Result<BatchStats, SyncError> {
    let mut source = m.source_conn().await?;
    let locks = match part {
        None => vec![("", BATCH_LOCK_CLASS)],
        Some(Part(i)) => vec![
            ("_shared", BATCH_LOCK_CLASS),
            ("", BATCH_LOCK_CLASS + 1 + i as i32),
        ],
    };
    let mut held = 0;
    for (mode, class) in &locks {
        let locked: bool = source
            .query_one(
                &format!("SELECT pg_try_advisory_lock{mode}($1, $2)"),
                &[class, &lock_key(t)],
            )
            .await
            .map_err(|e| batch_err(t, Side::Source, e))?
            .get(0);
        if !locked {
            break;
        }
        held += 1;
    }
    let outcome = if held < locks.len() {
        tracing::debug!(table = %t.table.display_name(), "Another agent is draining this table");
        crate::telemetry::batch_idle(&t.table.display_name(), true);
        Ok(BatchStats {
            busy: true,
            ..Default::default()
        })
    } else if let Some(ahead) = verify {
        verify_batch(m, &mut source, group, ahead).await
    } else {
        batch(m, &mut source, t, group, part).await
    };
    match outcome {
        Ok(stats) => {
            for (mode, class) in &locks[..held] {
                source
                    .execute(
                        &format!("SELECT pg_advisory_unlock{mode}($1, $2)"),
                        &[class, &lock_key(t)],
                    )
                    .await
                    .map_err(|e| batch_err(t, Side::Source, e))?;
            }
            Ok(stats)
        }
        Err(e) => {
            let _ = Object::take(source);
            Err(e)
        }
    }
}

fn batch_err(t: &TableState, side: Side, source: tokio_postgres::Error) -> SyncError {
    SyncError::Batch {
        table: t.table.display_name(),
        side,
        source,
    }
}

/// Opens a batch's source transaction, REPEATABLE READ: its first query
/// takes the snapshot S that decides everything the batch does. `tables`
/// are locked ACCESS SHARE before that (a LOCK takes no snapshot), as any
/// reader holds them: TRUNCATE is not MVCC-safe, and one committed after S
/// but before the batch first read its table would show that table empty
/// to S, so that a batch applied, or a verification compared, an empty
/// table. Held first, the lock makes a TRUNCATE wait for the batch instead.
async fn begin<'a>(
    source: &'a mut Object,
    tables: &[&TableState],
) -> Result<deadpool_postgres::Transaction<'a>, tokio_postgres::Error> {
    let stx = source
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await?;
    // ONLY: each registered table is locked by the batches that read it
    // (a partition by its own, and a verification locks every member of
    // its unit), and pgferry's privileges are on those.
    let names: Vec<String> = tables.iter().map(|t| format!("ONLY {}", t.table)).collect();
    stx.batch_execute(&format!("LOCK TABLE {} IN ACCESS SHARE MODE", names.join(", ")))
        .await?;
    Ok(stx)
}

/// What a batch's snapshot shows of one table.
struct Seen {
    /// The snapshot's time (the lag it ends).
    epoch: f64,
    /// The table has deltas (of this part).
    deltas: bool,
    /// A TRUNCATE of the table waits (for a whole batch only).
    truncated: bool,
    /// The table has its ledger (`cutover.verify = "changed"`).
    ledger: bool,
}

impl Seen {
    /// Something to apply: deltas, or a TRUNCATE.
    fn pending(&self) -> bool {
        self.deltas || self.truncated
    }
}

/// Reads what the batch's snapshot shows of `t`. A batch's first call of it
/// is its first statement, the one that takes the snapshot.
async fn seen(
    stx: &tokio_postgres::Transaction<'_>,
    t: &TableState,
    part: Option<Part>,
) -> Result<Seen, tokio_postgres::Error> {
    let row = stx
        .query_one(
            &format!(
                "SELECT extract(epoch FROM now())::float8,
                        EXISTS (SELECT 1 FROM {} {}),
                        $2 AND EXISTS (SELECT 1 FROM pgferry.truncates WHERE table_id = $1),
                        EXISTS (SELECT 1 FROM pg_class
                                 WHERE relnamespace = to_regnamespace('pgferry') AND relname = $3)",
                t.delta_table(),
                part_filter(t, part)
            ),
            &[&t.id, &part.is_none(), &t.ledger_table().name],
        )
        .await?;
    Ok(Seen {
        epoch: row.get(0),
        deltas: row.get(1),
        truncated: row.get(2),
        ledger: row.get(3),
    })
}

/// The WHERE clause selecting a part's delta rows; nothing for a whole batch.
fn part_filter(t: &TableState, part: Option<Part>) -> String {
    match part {
        None => String::new(),
        Some(p) => format!("WHERE {}", p.predicate(t)),
    }
}

/// One batch of `t` (or of one part of its keys).
async fn batch(
    m: &Migration,
    source: &mut Object,
    t: &TableState,
    group: &[TableState],
    part: Option<Part>,
) -> Result<BatchStats, SyncError> {
    let src_err = |e| batch_err(t, Side::Source, e);
    let started = std::time::Instant::now();

    // The snapshot is taken by the first statement of this transaction, after
    // the batch lock is held (a snapshot taken before it could be older than a
    // batch that committed meanwhile). Its only writes are the removal of the
    // deltas it consumed, after the target commit.
    let stx = match begin(source, &[t]).await {
        Ok(stx) => stx,
        // Held exclusively past lock_timeout (a long VACUUM FULL, CLUSTER,
        // ALTER): its turn comes in a later pass, as when another agent
        // drains it. Not idle: a final drain goes on until it is done.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
            tracing::debug!(table = %t.table.display_name(), "The table is locked; next pass");
            return Ok(BatchStats {
                busy: true,
                ..Default::default()
            });
        }
        Err(e) => return Err(src_err(e)),
    };
    // A part applies only its keys; a TRUNCATE waits for a whole batch (what
    // a part applies is the state as of S for its keys all the same).
    let seen = seen(&stx, t, part).await.map_err(src_err)?;
    if !seen.pending() {
        stx.commit().await.map_err(src_err)?;
        let stats = BatchStats::default();
        return record(source, t, part, &seen, &stats, started)
            .await
            .map(|()| stats);
    }
    let mut target = m.target_conn().await?;
    let ttx = target
        .transaction()
        .await
        .map_err(|e| batch_err(t, Side::Target, e))?;
    let stats = apply(m, &stx, &ttx, t, group, part, &seen).await?;
    crate::failpoint::hit("sync.before_target_commit").await;
    ttx.commit().await.map_err(|e| batch_err(t, Side::Target, e))?;
    crate::failpoint::hit("sync.after_target_commit").await;
    if part.is_some() {
        crate::failpoint::hit("sync.part_applied").await;
    }
    consume(
        &stx,
        t,
        part,
        &seen,
        seen.ledger,
        stats.truncated || stats.recopied,
    )
    .await
    .map_err(src_err)?;
    stx.commit().await.map_err(src_err)?;
    crate::failpoint::hit("sync.after_delta_delete").await;
    record(source, t, part, &seen, &stats, started).await?;
    Ok(stats)
}

/// Makes `t` on the target, in `ttx`, what it is in the source snapshot
/// `stx` for the keys that snapshot's deltas of `t` name (of `part`), or
/// whole after a TRUNCATE or when most of its rows changed.
async fn apply(
    m: &Migration,
    stx: &tokio_postgres::Transaction<'_>,
    ttx: &tokio_postgres::Transaction<'_>,
    t: &TableState,
    group: &[TableState],
    part: Option<Part>,
    seen: &Seen,
) -> Result<BatchStats, SyncError> {
    let src_err = |e| batch_err(t, Side::Source, e);
    let tgt_err = |e| batch_err(t, Side::Target, e);
    let delta = t.delta_table();
    let mine = part_filter(t, part);
    // Rows written by the drain are compressed like the copy's.
    crate::copy::set_loading(m, ttx).await.map_err(tgt_err)?;
    let table = &t.table;
    // The tables this batch rewrites: the table itself, or for an
    // inheritance parent the parent and every table below it, since a
    // statement on the parent changes its children's rows too (and fires only
    // the parent's triggers). Each row is read from ONLY the table it lives in.
    let members: Vec<&TableState> = std::iter::once(t).chain(below(t, group)).collect();
    // What one DELETE or TRUNCATE covers: ONLY the table, the whole
    // partitioned table, or the whole inheritance hierarchy below a parent.
    let scope = if members.len() > 1 {
        table.to_string()
    } else {
        t.rel()
    };
    let pumped = |e| match e {
        Pumped::Source(e) => src_err(e),
        Pumped::Target(e) => tgt_err(e),
    };
    let mut stats = BatchStats {
        truncated: seen.truncated,
        part: part.is_some(),
        ..Default::default()
    };
    if seen.truncated {
        // Whole-table resynchronisation: the table (and what is below it) as of S.
        stats.rows_written = copy_whole(m, stx, ttx, &scope, &members).await.map_err(pumped)?;
    } else if seen.deltas {
        let keys = column_list(&t.key_columns, None);
        let delta_keys = delta_key_list(t);
        ttx.batch_execute(&format!(
            "CREATE TEMP TABLE pgferry_keys ON COMMIT DROP AS SELECT {keys} FROM ONLY {table} WITH NO DATA"
        ))
        .await
        .map_err(tgt_err)?;
        let sink = ttx
            .copy_in("COPY pgferry_keys FROM STDIN (FORMAT binary)")
            .await
            .map_err(tgt_err)?;
        let stream = stx
            .copy_out(&format!(
                "COPY (SELECT DISTINCT {delta_keys} FROM {delta} {mine}) TO STDOUT (FORMAT binary)"
            ))
            .await
            .map_err(src_err)?;
        stats.keys = pump(stream, sink, &Throttle::unlimited(), |_| {})
            .await
            .map_err(pumped)?
            .0;
        let join = t
            .key_columns
            .iter()
            .map(|k| format!("t.{k} = k.{k}", k = Ident(k.clone())))
            .collect::<Vec<_>>()
            .join(" AND ");
        // The rate limit counts changed rows; the source transaction stays
        // open while waiting, which only holds back its snapshot.
        m.sync_throttle.take(stats.keys).await;
        if part.is_none()
            && !t.partitioned
            && recopy_pays(m, stx, &members, stats.keys).await.map_err(src_err)?
        {
            // Most rows changed: the table as of S, whole, as after a TRUNCATE.
            stats.recopied = true;
            stats.rows_written = copy_whole(m, stx, ttx, &scope, &members).await.map_err(pumped)?;
        } else {
            ttx.batch_execute("ANALYZE pgferry_keys").await.map_err(tgt_err)?;
            stats.rows_deleted = ttx
                .execute(
                    &format!("DELETE FROM {scope} AS t USING pgferry_keys AS k WHERE {join}"),
                    &[],
                )
                .await
                .map_err(tgt_err)?;
            // The rows as of S go straight into the table they live in, by
            // binary COPY: no staging table, so each row is written once.
            let changed = format!("WHERE ({keys}) IN (SELECT {delta_keys} FROM {delta} {mine})");
            // Already limited: the rows counted by the keys above.
            let unlimited = Throttle::unlimited();
            for member in &members {
                stats.rows_written += copy_rows(stx, ttx, member, &changed, &unlimited)
                    .await
                    .map_err(pumped)?;
            }
        }
        // Another table of the same batch may stage its keys next.
        ttx.batch_execute("DROP TABLE pgferry_keys")
            .await
            .map_err(tgt_err)?;
    }
    Ok(stats)
}

/// Forgets, in the source snapshot `stx`, exactly the deltas of `t` (of
/// `part`) it saw, once the target holds what they named: in S itself, so a
/// row committed after S is not touched, and durably only once that
/// transaction commits. With `keep_ledger`, their keys move to the ledger,
/// once each (a hot row changes in many statements, and in many batches):
/// the rows the cutover compares again. A table `rewritten` whole is no longer the one verified,
/// and loses its ledger.
async fn consume(
    stx: &tokio_postgres::Transaction<'_>,
    t: &TableState,
    part: Option<Part>,
    seen: &Seen,
    keep_ledger: bool,
    rewritten: bool,
) -> Result<(), tokio_postgres::Error> {
    let (delta, ledger) = (t.delta_table(), t.ledger_table());
    let mine = part_filter(t, part);
    if keep_ledger && rewritten {
        stx.execute(&format!("DROP TABLE {ledger}"), &[]).await?;
    }
    if keep_ledger && !rewritten {
        let keys = delta_key_list(t);
        stx.execute(
            &format!(
                "WITH gone AS (DELETE FROM {delta} {mine} RETURNING {keys})
                 INSERT INTO {ledger} ({keys}) SELECT DISTINCT {keys} FROM gone ON CONFLICT DO NOTHING"
            ),
            &[],
        )
        .await?;
        // Past this size, comparing the table in full costs less.
        let size: i64 = stx
            .query_one(
                "SELECT pg_relation_size($1::text::regclass)",
                &[&ledger.to_string()],
            )
            .await?
            .get(0);
        if size > LEDGER_MAX_BYTES {
            stx.execute(&format!("DROP TABLE {ledger}"), &[]).await?;
        }
    } else {
        stx.execute(&format!("DELETE FROM {delta} {mine}"), &[]).await?;
    }
    if seen.truncated {
        stx.execute("DELETE FROM pgferry.truncates WHERE table_id = $1", &[&t.id])
            .await?;
    }
    Ok(())
}

/// After a batch's source commit: the table's progress and metrics.
async fn record(
    source: &Object,
    t: &TableState,
    part: Option<Part>,
    seen: &Seen,
    stats: &BatchStats,
    started: std::time::Instant,
) -> Result<(), SyncError> {
    // A part does not say the table is synced through S: other parts may not be.
    let synced_through = part.is_none().then_some(seen.epoch);
    state::record_batch(&***source, t.id, synced_through, stats.rows_written as i64).await?;
    if !seen.pending() {
        crate::telemetry::batch_idle(&t.table.display_name(), false);
        return Ok(());
    }
    let rewritten = stats.truncated || stats.recopied;
    crate::telemetry::batch_applied(
        &t.table.display_name(),
        stats.rows_deleted,
        stats.rows_written,
        rewritten,
        started.elapsed(),
    );
    tracing::debug!(
        table = %t.table.display_name(),
        keys = stats.keys,
        rows = stats.rows_written,
        truncated = stats.truncated,
        recopied = stats.recopied,
        "Batch applied"
    );
    Ok(())
}

/// What a verification ahead of the fence compares (see [`verify_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ahead {
    /// Every row: the unit gets its ledgers.
    All,
    /// The rows whose keys the unit's ledgers (and the deltas of the batch)
    /// name: its ledgers start again from the batch's snapshot.
    Ledger,
}

/// One batch of every table of `unit` (see [`ahead_units`]) in one source
/// snapshot S and one target transaction, which leaves the target equal to
/// the unit as of S; then, with the unit's lock still held so that nothing
/// else writes it, every table holding rows compared in full in S. When all
/// are equal, each table of the unit gets its ledger in S, and from then on
/// each batch moves the deltas it consumes there instead of deleting them:
/// every key that changed since S. With the fence up, the cutover then
/// compares only those keys' rows.
///
/// With [`Ahead::Ledger`], only the rows whose keys the ledgers and the
/// batch's deltas name are compared in S, and when equal the ledgers are
/// emptied in S: what the fence then compares is what changed since S, not
/// since the first verification, which at hundreds of gigabytes began long
/// before. A batch that rewrote a table whole (a TRUNCATE) compares all.
async fn verify_batch(
    m: &Migration,
    source: &mut Object,
    unit: &[TableState],
    ahead: Ahead,
) -> Result<BatchStats, SyncError> {
    let first = &unit[0];
    let started = std::time::Instant::now();
    let stx = begin(source, &unit.iter().collect::<Vec<_>>())
        .await
        .map_err(|e| batch_err(first, Side::Source, e))?;
    let mut seens = Vec::with_capacity(unit.len());
    for t in unit {
        seens.push(
            seen(&stx, t, None)
                .await
                .map_err(|e| batch_err(t, Side::Source, e))?,
        );
    }
    // S is taken: what commits from now on is for the next batch.
    crate::failpoint::hit("sync.verify_snapshot").await;
    let mut target = m.target_conn().await?;
    let ttx = target
        .transaction()
        .await
        .map_err(|e| batch_err(first, Side::Target, e))?;
    let mut applied = Vec::with_capacity(unit.len());
    for (t, seen) in unit.iter().zip(&seens) {
        applied.push(if seen.pending() {
            apply(m, &stx, &ttx, t, unit, None, seen).await?
        } else {
            BatchStats::default()
        });
    }
    ttx.commit()
        .await
        .map_err(|e| batch_err(first, Side::Target, e))?;
    let rewritten = applied.iter().any(|a| a.truncated || a.recopied);
    // A ledger dropped since (it grew past its limit) leaves all to compare.
    let ledgers: Vec<String> = unit.iter().map(|t| t.ledger_table().to_string()).collect();
    let by_ledger = ahead == Ahead::Ledger
        && !rewritten
        && stx
            .query_one(
                "SELECT bool_and(to_regclass(l) IS NOT NULL) FROM unnest($1::text[]) l",
                &[&ledgers],
            )
            .await
            .map_err(|e| batch_err(first, Side::Source, e))?
            .get::<_, Option<bool>>(0)
            .unwrap_or(false);
    let mut verdicts = Vec::new();
    if by_ledger {
        let verdict = crate::verify::compare_changed_on(&*stx, &mut target, unit, !first.partitioned)
            .await
            .map_err(|e| match e {
                crate::verify::VerifyError::Query { side, source, .. } => batch_err(first, side, source),
                other => SyncError::Verify(Box::new(other)),
            })?;
        verdicts.push(verdict);
    }
    for t in unit.iter().filter(|t| !t.partitioned && !by_ledger) {
        let subject = crate::verify::Subject {
            table: t.table.clone(),
            key_columns: t.key_columns.clone(),
        };
        let verdict = crate::verify::compare_on(&*stx, &**target, &subject, crate::verify::Rows::All)
            .await
            .map_err(|e| match e {
                crate::verify::VerifyError::Query { side, source, .. } => batch_err(t, side, source),
                other => SyncError::Verify(Box::new(other)),
            })?;
        verdicts.push(verdict);
    }
    crate::failpoint::hit("sync.verified_ahead").await;
    let equal = verdicts.iter().all(|v| v.equal);
    for (t, seen) in unit.iter().zip(&seens) {
        let ledger = t.ledger_table();
        let sql = if equal && by_ledger {
            // Nothing else writes the ledger while the batch lock is held.
            format!("DELETE FROM {ledger}")
        } else {
            let mut sql = format!("DROP TABLE IF EXISTS {ledger};");
            if equal {
                // Unique, so that a key changed in batch after batch (a hot
                // row) is there once.
                let keys = delta_key_list(t);
                sql += &format!(
                    "CREATE TABLE {ledger} AS SELECT {keys} FROM {} WITH NO DATA;
                     CREATE UNIQUE INDEX ON {ledger} ({keys});",
                    t.delta_table()
                );
            }
            sql
        };
        stx.batch_execute(&sql)
            .await
            .map_err(|e| batch_err(t, Side::Source, e))?;
        consume(&stx, t, None, seen, false, false)
            .await
            .map_err(|e| batch_err(t, Side::Source, e))?;
    }
    stx.commit()
        .await
        .map_err(|e| batch_err(first, Side::Source, e))?;
    let mut total = BatchStats::default();
    for ((t, seen), stats) in unit.iter().zip(&seens).zip(&applied) {
        record(source, t, None, seen, stats, started).await?;
        total.keys += stats.keys;
        total.rows_deleted += stats.rows_deleted;
        total.rows_written += stats.rows_written;
        total.truncated |= stats.truncated;
        total.recopied |= stats.recopied;
    }
    total.verified = Some(verdicts);
    Ok(total)
}

/// A ledger bigger than this is dropped: its table is compared in full
/// again, which then costs about as much as reading that many keys' rows.
const LEDGER_MAX_BYTES: i64 = 64 << 20;

/// Verifies `unit` (see [`ahead_units`]) ahead of the fence
/// (`cutover.verify = "changed"`) with a [`verify_batch`]. Waits while
/// another agent drains it. Returns the verdicts of its tables that hold
/// rows.
pub async fn verify_ahead(
    m: &Migration,
    unit: &[TableState],
    ahead: Ahead,
    cancel: &CancellationToken,
) -> Result<Vec<TableVerdict>, crate::Error> {
    loop {
        let stats = match retry(
            m.retry_policy(),
            "batch",
            "verify a table ahead of the fence",
            cancel,
            || drain_table(m, &unit[0], unit, None, Some(ahead)),
        )
        .await
        {
            Ok(s) => s,
            Err(Gave::Up(e)) => return Err(e.into()),
            Err(Gave::Cancelled) => return Err(crate::Error::Cancelled),
        };
        if let Some(v) = stats.verified {
            return Ok(v);
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(crate::Error::Cancelled),
            () = tokio::time::sleep(Duration::from_millis(m.cfg.sync.poll_interval_ms)) => {}
        }
    }
}

/// The units verified ahead of the fence, each in one snapshot: a synced
/// table alone in its hierarchy, and a partitioned table with all its
/// partitions. A partition's rows change through its own statements and
/// through those aimed at the partitioned tables above it (each firing only
/// its own triggers), never through another partition's: so the deltas of
/// the unit's tables name every key of the unit that changed. Not classic
/// inheritance, whose tables have keys of their own; not `copy_only`
/// tables. The unit's root comes first.
pub fn ahead_units(all: &[TableState]) -> Vec<Vec<TableState>> {
    let mut units: Vec<Vec<TableState>> = Vec::new();
    for t in all {
        match units.iter_mut().find(|u| u[0].lock_relid == t.lock_relid) {
            Some(u) if t.relid == t.lock_relid => u.insert(0, t.clone()),
            Some(u) => u.push(t.clone()),
            None => units.push(vec![t.clone()]),
        }
    }
    units.retain(|u| {
        let root = &u[0];
        root.relid == root.lock_relid
            && u.iter().all(|t| {
                !t.copy_only
                    && t.parent_relid.is_none()
                    && t.key_columns == root.key_columns
                    && (t.relid == root.relid || root.partitioned)
            })
    });
    units
}

/// Distinct changed keys from which a batch weighs copying the whole table
/// instead: below it the estimate costs a round trip for little to gain.
const RECOPY_FROM_KEYS: u64 = 10_000;

/// Whether `keys` distinct changed keys reach `sync.recopy_fraction` of the
/// rows of `members` (the table, or an inheritance parent and the tables
/// below it), by their row estimates as of their last VACUUM or ANALYZE
/// (`reltuples`, which autovacuum keeps current). Not the planner's
/// estimate, which scales them to the relations' size and so counts the
/// dead rows of a table that was just updated throughout; nor the
/// statistics system's live rows, which count a table's first rows twice
/// when an ANALYZE reports before its loading transaction's counts do.
/// Never for a table without an estimate.
///
/// An estimate gone stale low (a table that grew many times over since it
/// was last analyzed, autovacuum off) must not copy a big table whole, the
/// more so under the fence: each member counts at least half the rows its
/// present size holds at its last known density (half, so that the dead
/// rows of a table just updated throughout do not stop its recopy).
async fn recopy_pays(
    m: &Migration,
    stx: &tokio_postgres::Transaction<'_>,
    members: &[&TableState],
    keys: u64,
) -> Result<bool, tokio_postgres::Error> {
    let fraction = m.cfg.sync.recopy_fraction;
    if fraction <= 0.0 || keys < RECOPY_FROM_KEYS {
        return Ok(false);
    }
    let relids: Vec<u32> = members.iter().map(|t| t.relid).collect();
    let rows: f64 = stx
        .query_one(
            "SELECT CASE WHEN bool_or(reltuples < 0) THEN -1 ELSE sum(greatest(reltuples::float8,
                      reltuples::float8 / nullif(relpages, 0)
                        * pg_relation_size(oid) / current_setting('block_size')::int / 2))
                    END::float8
               FROM pg_class WHERE oid = ANY($1)",
            &[&relids],
        )
        .await?
        .get(0);
    Ok(rows > 0.0 && keys as f64 >= fraction * rows)
}

/// Replaces what the target holds under `scope` with `members` whole as of
/// the source transaction's snapshot: TRUNCATE, then each member's rows by
/// binary COPY, limited like the bulk copy (`copy.rate_bytes_per_sec`).
/// Returns the rows written.
async fn copy_whole(
    m: &Migration,
    stx: &tokio_postgres::Transaction<'_>,
    ttx: &tokio_postgres::Transaction<'_>,
    scope: &str,
    members: &[&TableState],
) -> Result<u64, Pumped> {
    ttx.batch_execute(&format!("TRUNCATE {scope}"))
        .await
        .map_err(Pumped::Target)?;
    let mut written = 0;
    for member in members {
        written += copy_rows(stx, ttx, member, "", &m.copy_throttle).await?;
    }
    Ok(written)
}

/// Copies `member`'s rows as of the source transaction's snapshot, those
/// matching `filter` (a WHERE clause, or nothing for all), straight into the
/// same table on the target by binary COPY, at most as fast as `throttle`
/// lets bytes through. Returns the rows written.
async fn copy_rows(
    stx: &tokio_postgres::Transaction<'_>,
    ttx: &tokio_postgres::Transaction<'_>,
    member: &TableState,
    filter: &str,
    throttle: &Throttle,
) -> Result<u64, Pumped> {
    let cols = column_list(&member.copy_columns, None);
    let format = member.copy_format();
    let target_path = crate::copy::pin_names(ttx, member)
        .await
        .map_err(Pumped::Target)?;
    let source_path = crate::copy::pin_names(stx, member)
        .await
        .map_err(Pumped::Source)?;
    let sink = ttx
        .copy_in(&format!(
            "COPY {} ({cols}) FROM STDIN (FORMAT {format})",
            member.table
        ))
        .await
        .map_err(Pumped::Target)?;
    let stream = stx
        .copy_out(&format!(
            "COPY (SELECT {cols} FROM {} {filter}) TO STDOUT (FORMAT {format})",
            member.rel()
        ))
        .await
        .map_err(Pumped::Source)?;
    let written = pump(stream, sink, throttle, |_| {}).await?.0;
    crate::copy::unpin_names(ttx, target_path)
        .await
        .map_err(Pumped::Target)?;
    crate::copy::unpin_names(stx, source_path)
        .await
        .map_err(Pumped::Source)?;
    Ok(written)
}

/// The tables below `t` in classic inheritance (children, grandchildren...),
/// among the tables of its hierarchy.
fn below<'a>(t: &TableState, group: &'a [TableState]) -> impl Iterator<Item = &'a TableState> {
    let mut found: Vec<u32> = vec![t.relid];
    let mut out = Vec::new();
    // Parents come before children in no particular order: repeat until stable.
    loop {
        let more: Vec<&TableState> = group
            .iter()
            .filter(|g| !found.contains(&g.relid) && g.parent_relid.is_some_and(|p| found.contains(&p)))
            .collect();
        if more.is_empty() {
            break;
        }
        found.extend(more.iter().map(|g| g.relid));
        out.extend(more);
    }
    out.into_iter()
}

/// Unconsumed delta rows per table (TRUNCATE events count as one). A table
/// whose capture is not installed yet has none, nor one whose delta table
/// goes while this reads (an agent following a partition's detach drops
/// it): the backlogs are then read again.
pub async fn backlog(client: &tokio_postgres::Client, tables: &[TableState]) -> Result<Vec<i64>, SyncError> {
    let err = |source| SyncError::Backlog {
        table: "pgferry".into(),
        source,
    };
    let mut again = 3;
    loop {
        let existing: std::collections::HashSet<String> = client
            .query(
                "SELECT relname::text FROM pg_class WHERE relnamespace = to_regnamespace('pgferry') AND relkind = 'r'",
                &[],
            )
            .await
            .map_err(err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        crate::failpoint::hit("backlog.listed").await;
        let counted: Vec<&TableState> = tables
            .iter()
            .filter(|t| existing.contains(&t.delta_table().name))
            .collect();
        let pending = match Pending::read(client, &counted, None).await {
            Err(e) if again > 0 && e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                again -= 1;
                continue;
            }
            read => read.map_err(err)?,
        };
        return Ok(tables
            .iter()
            .map(|t| {
                if existing.contains(&t.delta_table().name) {
                    pending.backlog(t)
                } else {
                    0
                }
            })
            .collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::QualifiedTable;
    use crate::state::CopyState;

    fn table(relid: u32, lock_relid: u32, partitioned: bool) -> TableState {
        TableState {
            id: relid as i32,
            relid,
            table: QualifiedTable::new("public", format!("t{relid}")),
            key_columns: vec!["id".into()],
            copy_columns: vec!["id".into()],
            copy_state: CopyState::Done,
            copied_rows: None,
            applied_rows: 0,
            lag_secs: None,
            copy_only: false,
            partitioned,
            lock_relid,
            parent_relid: None,
            text_form: false,
        }
    }

    fn relids(units: &[Vec<TableState>]) -> Vec<Vec<u32>> {
        units
            .iter()
            .map(|u| u.iter().map(|t| t.relid).collect())
            .collect()
    }

    #[test]
    fn a_partitioned_table_is_verified_with_its_partitions_and_root_first() {
        // A plain table; a partition listed before its root, under a
        // partitioned partition.
        let all = [
            table(1, 1, false),
            table(12, 10, false),
            table(11, 10, true),
            table(10, 10, true),
        ];
        assert_eq!(relids(&ahead_units(&all)), vec![vec![1], vec![10, 12, 11]]);
    }

    #[test]
    fn inheritance_copy_only_and_keys_of_their_own_are_compared_in_full() {
        let mut child = table(21, 20, false);
        child.parent_relid = Some(20);
        let mut copy_only = table(3, 3, false);
        copy_only.copy_only = true;
        let mut other_key = table(32, 30, false);
        other_key.key_columns = vec!["id".into(), "at".into()];
        let all = [
            table(20, 20, false),
            child,
            copy_only,
            table(30, 30, true),
            other_key,
            table(4, 4, false),
        ];
        assert_eq!(relids(&ahead_units(&all)), vec![vec![4]]);
    }
}
