//! Bulk copy: schema pre-data, table data by COPY streaming, then keys and
//! indexes.
//!
//! On entry: capture is installed (phase `installed` or later), so every
//! snapshot the copy reads from is taken after the capture triggers committed
//! and whatever it misses is in the delta tables (invariant 2). Each table is
//! read in its own snapshot (one `COPY ... TO` statement), which the invariant
//! allows and which keeps the source's xmin horizon moving during a long copy.
//!
//! On the target each table is `TRUNCATE`d and loaded with `COPY ... FREEZE`
//! in one transaction, so re-running an interrupted copy redoes only the
//! tables not marked done, from scratch. On exit the phase is `syncing`.

use std::time::Instant;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::control::state::{self, CopyState, Phase, SchemaStep, TableState};
use crate::db::ident::QualifiedTable;
use crate::db::retry::{retry, Gave, Retryable};
use crate::db::Migration;
use crate::schema::PgTools;

mod dump;
pub mod indexes;
mod split;
mod table;

use table::copy_table;
pub(crate) use table::recopy;

/// Copy failures.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Streaming one table failed.
    #[error("copying {table} failed on the {side}")]
    Table {
        /// The table.
        table: String,
        /// Which side failed.
        side: crate::db::endpoint::Side,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A target-side statement around the copy failed.
    #[error("{what} failed on the target")]
    Target {
        /// Which step.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The target holds some of the tables but not all.
    #[error("the target already holds {found} of the {expected} tables, but pgferry has no record of restoring them: drop the target database's objects and run copy again")]
    PartialTarget {
        /// Tables found.
        found: usize,
        /// Tables expected.
        expected: usize,
    },
    /// A session could not be opened.
    #[error(transparent)]
    Connect(#[from] crate::db::endpoint::ConnectError),
    /// Recording progress failed.
    #[error(transparent)]
    State(#[from] crate::control::state::StateError),
    /// A part's target transaction stayed in progress after its agent left.
    #[error("part {part} of {table} is in doubt: its target transaction {xid} is still in progress; end that session on the target (pg_terminate_backend) or wait, then run copy again")]
    InDoubt {
        /// The table.
        table: String,
        /// The part.
        part: i32,
        /// The target transaction.
        xid: String,
    },
    /// A worker task panicked.
    #[error("a copy worker stopped unexpectedly")]
    Worker(#[source] tokio::task::JoinError),
    /// Scratch space for the data dump (`copy.method = "dump"`) could not be
    /// created.
    #[error("cannot create a scratch directory for the data dump (copy.dump_dir)")]
    Scratch(#[source] std::io::Error),
}

impl CopyError {
    /// A read of the source's catalog failed.
    pub(crate) fn catalog(source: tokio_postgres::Error) -> CopyError {
        CopyError::Table {
            table: "catalog".into(),
            side: crate::db::endpoint::Side::Source,
            source,
        }
    }
}

impl Retryable for CopyError {
    fn is_retryable(&self) -> bool {
        match self {
            CopyError::Table { source, .. } | CopyError::Target { source, .. } => {
                crate::db::errors::is_retryable(source)
            }
            CopyError::Connect(e) => e.is_retryable(),
            CopyError::State(e) => e.is_retryable(),
            CopyError::InDoubt { .. } => true,
            _ => false,
        }
    }
}

impl crate::error::Failure for CopyError {
    fn retryable(&self) -> bool {
        crate::db::retry::Retryable::is_retryable(self)
    }
}

/// What the copy did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CopyReport {
    /// Tables copied by this run.
    pub tables_copied: usize,
    /// Rows copied by this run.
    pub rows: u64,
    /// Bytes streamed by this run (binary COPY format).
    pub bytes: u64,
    /// Wall time until the last table's data was in (index builds of the
    /// tables done by then overlap it).
    pub data_secs: f64,
    /// Wall time from then until every key and index was built.
    pub index_secs: f64,
    /// Wall time of the final ANALYZE.
    pub analyze_secs: f64,
    /// Indexes built by this run.
    pub indexes_built: usize,
    /// The source's INVALID indexes (`index on table`), not built: a CREATE
    /// INDEX CONCURRENTLY failed, or still runs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub indexes_not_migrated: Vec<String>,
    /// Parts of split tables copied by this run.
    pub parts_copied: usize,
    /// The agent's peak resident memory (Linux), at the end of the copy.
    pub peak_rss_bytes: Option<u64>,
    /// Roles recreated on the target (with `schema.recreate_roles`).
    pub roles: Option<crate::roles::RoleReport>,
}

/// Runs the copy phase, resuming where an earlier run stopped.
pub async fn run(m: &Migration, cancel: &CancellationToken) -> Result<CopyReport, crate::Error> {
    let conn = m.source_conn().await?;
    let run = state::load(&**conn).await?;
    let Some(run) = run else {
        return Err(crate::Error::Phase(
            "capture is not installed: run `pgferry install` first (the copy must start after capture)"
                .into(),
        ));
    };
    if run.phase < Phase::Installed {
        return Err(crate::Error::Phase(
            "capture installation has not finished: run `pgferry install` again to complete it".into(),
        ));
    }
    if run.phase > Phase::Copying {
        return Ok(CopyReport::default());
    }
    state::set_phase(&**conn, Phase::Copying).await?;
    let tables = state::tables(&**conn).await?;
    // A table copied again is no longer the one verified before the fence.
    for t in tables.iter().filter(|t| t.copy_state == CopyState::Pending) {
        state::drop_ledger(&**conn, t).await?;
    }
    drop(conn);
    check_copy_from(m, &tables).await?;

    let tools = PgTools::locate(m.cfg.pg_bin_dir.as_deref()).await?;
    let mut report = CopyReport::default();
    // Once restored, the pre-data is not dumped again: a later copy's
    // tables were created on the target by whoever made them there (the
    // operator after drift, or sync following a partition), and a dump of
    // the whole schema took seconds of a follow's drain pause at 2,000
    // tables.
    if !run.pre_data_done {
        let dump = tools
            .dump_schema(&m.source, m.cfg.source_limits.lock_timeout_ms, false)
            .await?;
        crate::failpoint::hit("copy.schema_dumped").await;
        if m.cfg.schema.recreate_roles {
            report.roles = Some(crate::roles::recreate(m).await?);
        }
        restore_pre_data(m, &tools, &dump.archive, &tables).await?;
    }
    crate::failpoint::hit("copy.after_pre_data").await;
    // Before the tables' data: a typmod or a generated column may need them.
    crate::extension_config::copy(m).await?;

    let started = Instant::now();
    match m.cfg.copy.method {
        crate::config::CopyMethod::Stream => copy_tables(m, &tables, cancel, &mut report).await?,
        crate::config::CopyMethod::Dump => dump::copy(m, &tools, &tables, &mut report).await?,
    }
    if report.data_secs == 0.0 {
        report.data_secs = started.elapsed().as_secs_f64();
    }

    // A later copy (tables captured since, partitions sync follows) builds
    // and analyzes what it copied, not the whole database again: the tables
    // it found to copy, and those an interrupted later copy loaded (never
    // analyzed on the target). At 2,000 tables, reading every index's
    // definition again was most of a follow's copy. The first copy,
    // resumed or not, does everything; the cutover builds whatever the
    // target still lacks.
    let target = m.target_conn().await?;
    let fresh: Option<Vec<TableState>> = if run.post_data_done {
        let never = target
            .query(
                "SELECT schemaname::text, relname::text FROM pg_stat_user_tables
                  WHERE last_analyze IS NULL AND last_autoanalyze IS NULL",
                &[],
            )
            .await
            .map_err(|source| CopyError::Target {
                what: "finding the tables never analyzed",
                source,
            })?;
        let never: std::collections::HashSet<QualifiedTable> = never
            .iter()
            .map(|r| QualifiedTable::new(r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        Some(
            tables
                .iter()
                .filter(|t| t.copy_state == CopyState::Pending || never.contains(&t.table))
                .cloned()
                .collect(),
        )
    } else {
        None
    };
    {
        let built = indexes::build_all(m, fresh.as_deref().unwrap_or(&tables)).await?;
        report.indexes_built += built.indexes;
        report.indexes_not_migrated = built.invalid;
        let conn = m.source_conn().await?;
        state::mark_schema_step(&**conn, SchemaStep::PostData).await?;
        report.index_secs = started.elapsed().as_secs_f64() - report.data_secs;
    }
    let analyzing = Instant::now();
    crate::failpoint::hit("copy.before_analyze").await;
    let analyze = match &fresh {
        Some(fresh) if fresh.is_empty() => None,
        Some(fresh) => Some(format!(
            "ANALYZE {}",
            fresh
                .iter()
                .map(|t| t.table.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => Some("ANALYZE".to_string()),
    };
    target
        .batch_execute(analyze.as_deref().unwrap_or(""))
        .await
        .map_err(|source| CopyError::Target {
            what: "ANALYZE",
            source,
        })?;
    report.analyze_secs = analyzing.elapsed().as_secs_f64();
    let conn = m.source_conn().await?;
    state::set_phase(&**conn, Phase::Syncing).await?;
    report.peak_rss_bytes = peak_rss_bytes();
    Ok(report)
}

/// The agent's peak resident set size so far (Linux), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// With `copy.from`, proves that database was taken from the source after
/// capture was installed: it must hold the same migration (the same tables
/// under the same ids and OIDs) at phase `installed` or later. A fork made
/// earlier would miss changes that no delta records.
async fn check_copy_from(m: &Migration, tables: &[TableState]) -> Result<(), crate::Error> {
    if !m.reads_elsewhere() {
        return Ok(());
    }
    let refuse = |why: String| {
        crate::Error::Phase(format!(
            "copy.from ({}) {why}: it must be a fork or replica of the source made after `pgferry install` finished",
            m.data_endpoint().redacted()
        ))
    };
    let conn = m.data_conn().await?;
    match state::load(&**conn).await? {
        None => return Err(refuse("holds no pgferry migration".into())),
        Some(run) if run.phase < Phase::Installed => {
            return Err(refuse(format!(
                "was taken while capture was still being installed (phase {})",
                run.phase.as_str()
            )))
        }
        Some(_) => {}
    }
    let theirs = state::tables(&**conn).await?;
    for t in tables {
        if !theirs
            .iter()
            .any(|o| o.id == t.id && o.relid == t.relid && o.table == t.table)
        {
            return Err(refuse(format!(
                "does not register {} as the source does (was it taken before that table was captured?)",
                t.table.display_name()
            )));
        }
    }
    tracing::info!(from = %m.data_endpoint().redacted(), "Reading the bulk data from copy.from");
    Ok(())
}

async fn restore_pre_data(
    m: &Migration,
    tools: &PgTools,
    archive: &std::path::Path,
    tables: &[TableState],
) -> Result<(), crate::Error> {
    // The restore is one transaction, but the "done" mark lives on the source:
    // if the agent died between the two, the tables are all there already.
    let target = m.target_conn().await?;
    let mut found = 0;
    for t in tables {
        let row = target
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t.table.to_string()])
            .await
            .map_err(|source| CopyError::Target {
                what: "looking for restored tables",
                source,
            })?;
        if row.get::<_, bool>(0) {
            found += 1;
        }
    }
    drop(target);
    if found == 0 {
        tracing::info!("Restoring schema pre-data");
        tools.restore_pre_data(&m.target, archive).await?;
    } else if found < tables.len() {
        return Err(CopyError::PartialTarget {
            found,
            expected: tables.len(),
        }
        .into());
    }
    let conn = m.source_conn().await?;
    state::mark_schema_step(&**conn, SchemaStep::PreData).await?;
    Ok(())
}

/// One unit of copy work: a whole table, or one block range of a big one.
enum Unit {
    Whole(TableState),
    Part(TableState, state::CopyPart),
}

async fn copy_tables(
    m: &Migration,
    tables: &[TableState],
    cancel: &CancellationToken,
    report: &mut CopyReport,
) -> Result<(), crate::Error> {
    let started = Instant::now();
    let workers = m.copy_workers();
    let sizes = table_sizes(m, tables).await?;
    let can_split = split::supported(m).await?;
    // Each table's own indexes are built as soon as its data is in, while
    // other tables are still copying (partitioned tables' indexes, and
    // constraints, wait for the pass after the data).
    let relids: Vec<u32> = tables.iter().map(|t| t.relid).collect();
    let defs = indexes::read(m, &relids).await?.indexes;
    let mut early: std::collections::HashMap<crate::db::ident::QualifiedTable, Vec<indexes::IndexDef>> =
        Default::default();
    for d in defs.into_iter().filter(|d| d.phase == 0) {
        early.entry(d.table.clone()).or_default().push(d);
    }

    let mut units: Vec<(u64, Unit)> = Vec::new();
    let mut parts_left: std::collections::HashMap<i32, usize> = Default::default();
    for (t, size) in tables
        .iter()
        .zip(sizes)
        .filter(|(t, _)| t.copy_state == CopyState::Pending)
    {
        if t.partitioned {
            // No rows of its own: its partitions are copied as tables.
            let conn = m.source_conn().await?;
            state::mark_copied(&**conn, t.id, 0).await?;
            continue;
        }
        let parts = if can_split && split::splittable(t) {
            split::part_count(&m.cfg.copy, workers, size.heap)
        } else {
            1
        };
        let planned = split::planned(m, t).await?;
        if parts > 1 || !planned.is_empty() {
            let todo = split::prepare(m, t, size.blocks, parts, planned).await?;
            let share = size.total / todo.len().max(1) as u64;
            parts_left.insert(t.id, todo.len());
            units.extend(todo.into_iter().map(|p| (share, Unit::Part(t.clone(), p))));
        } else {
            units.push((size.total, Unit::Whole(t.clone())));
        }
    }
    // Largest first, so that the last unit to finish is a small one.
    units.sort_by_key(|(size, _)| std::cmp::Reverse(*size));

    // Parts all done by an earlier run: only the finishing step is left.
    let mut finished: Vec<TableState> = Vec::new();
    for (id, left) in &parts_left {
        if *left == 0 {
            finished.extend(tables.iter().find(|t| t.id == *id).cloned());
        }
    }

    let copy_limit = crate::parallel::Limit::new(workers);
    let index_limit = crate::parallel::Limit::new(workers);
    let mut tasks = JoinSet::new();
    let mut index_tasks = JoinSet::new();
    for (size, unit) in units {
        let (m, cancel) = (m.clone(), cancel.clone());
        // Units start in spawn order: largest first.
        copy_limit.spawn(&mut tasks, async move {
            if cancel.is_cancelled() {
                return (unit, Err(crate::Error::Cancelled));
            }
            // A signal abandons the unit in hand: its target transaction
            // rolls back when the session closes, and it stays pending.
            let copy = retry(m.retry_policy(), "copy", "copy a table", &cancel, || async {
                match &unit {
                    Unit::Whole(t) => copy_table(&m, t, size).await,
                    Unit::Part(t, p) => split::copy_part(&m, t, p, size).await,
                }
            });
            let res = tokio::select! {
                res = copy => res,
                () = cancel.cancelled() => Err(Gave::Cancelled),
            };
            let res = match res {
                Ok(stats) => Ok(stats),
                Err(Gave::Up(e)) => Err(crate::Error::from(e)),
                Err(Gave::Cancelled) => Err(crate::Error::Cancelled),
            };
            (unit, res)
        });
    }
    let mut first_err = None;
    let spawn_indexes = |t: &TableState, index_tasks: &mut JoinSet<Result<usize, crate::Error>>| {
        let Some(defs) = early.get(&t.table) else {
            return;
        };
        let (m, defs, limit) = (m.clone(), defs.clone(), index_limit.clone());
        index_tasks.spawn(async move { indexes::build_table(&m, defs, limit).await });
    };
    for t in &finished {
        split::finish(m, t, tables).await?;
        report.tables_copied += 1;
        spawn_indexes(t, &mut index_tasks);
    }
    while let Some(joined) = tasks.join_next().await {
        let (unit, res) = match joined {
            Ok(r) => r,
            Err(e) => {
                first_err.get_or_insert(CopyError::Worker(e).into());
                continue;
            }
        };
        match res {
            Ok((rows, bytes)) => {
                report.rows += rows;
                report.bytes += bytes;
                match unit {
                    Unit::Whole(t) => {
                        report.tables_copied += 1;
                        spawn_indexes(&t, &mut index_tasks);
                    }
                    Unit::Part(t, _) => {
                        report.parts_copied += 1;
                        let left = parts_left.get_mut(&t.id).expect("planned");
                        *left -= 1;
                        if *left == 0 && first_err.is_none() {
                            match split::finish(m, &t, tables).await {
                                Ok(()) => {
                                    report.tables_copied += 1;
                                    spawn_indexes(&t, &mut index_tasks);
                                }
                                Err(e) => {
                                    first_err.get_or_insert(e.into());
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    report.data_secs = started.elapsed().as_secs_f64();
    while let Some(joined) = index_tasks.join_next().await {
        match joined.map_err(CopyError::Worker) {
            Ok(Ok(built)) => report.indexes_built += built,
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(e.into());
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if cancel.is_cancelled() {
        return Err(crate::Error::Cancelled);
    }
    Ok(())
}

/// How big a table is on the source.
#[derive(Debug, Clone, Copy, Default)]
struct TableSize {
    /// Heap and TOAST, for progress estimates and scheduling.
    total: u64,
    /// The heap alone, for the split decision.
    heap: u64,
    /// Blocks of the heap.
    blocks: i64,
}

/// On-disk size of each table, read where the data is read from.
async fn table_sizes(m: &Migration, tables: &[TableState]) -> Result<Vec<TableSize>, CopyError> {
    let relids: Vec<u32> = tables.iter().map(|t| t.relid).collect();
    let conn = m.data_conn().await?;
    let rows = conn
        .query(
            "SELECT coalesce(pg_table_size(r), 0), coalesce(pg_relation_size(r), 0),
                    coalesce(pg_relation_size(r), 0) / current_setting('block_size')::int
               FROM unnest($1::oid[]) WITH ORDINALITY AS u(r, o) ORDER BY o",
            &[&relids],
        )
        .await
        .map_err(CopyError::catalog)?;
    Ok(rows
        .iter()
        .map(|r| TableSize {
            total: r.get::<_, i64>(0).max(0) as u64,
            heap: r.get::<_, i64>(1).max(0) as u64,
            blocks: r.get(2),
        })
        .collect())
}
