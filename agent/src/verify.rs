//! Verification: source and target compared table by table.
//!
//! Each table gets a row count and an order-independent checksum (the sum of a
//! 64-bit hash of every row's text form, computed by each server in identical
//! session settings). A table that differs also gets the list of its differing
//! keys, when it is small enough to list. Reads only; safe at any time, but
//! only meaningful when the source is quiet (after the fence, or after
//! cutover).

use std::collections::HashMap;

use serde::Serialize;
use tokio_postgres::GenericClient;

pub use crate::config::VerifyScope;
use crate::control::state::TableState;
use crate::db::endpoint::Side;
use crate::db::ident::{column_list, QualifiedTable};
use crate::db::Migration;

/// Above this many rows a differing table is reported without its keys.
const MAX_ROWS_FOR_KEY_DIFF: i64 = 1_000_000;
/// At most this many differing keys are listed per table.
const MAX_KEYS_LISTED: usize = 20;

/// Verification failures (not mismatches: those are results).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A checksum query failed.
    #[error("could not checksum {table} on the {side}")]
    Query {
        /// The table.
        table: String,
        /// Which side.
        side: Side,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Reading the source catalog failed.
    #[error("could not list the source tables")]
    Catalog(#[source] tokio_postgres::Error),
    /// A session could not be opened.
    #[error(transparent)]
    Connect(#[from] crate::db::endpoint::ConnectError),
}

impl crate::error::Failure for VerifyError {
    /// A server that cannot be reached is a failed check.
    fn exit_code(&self) -> crate::error::ExitCode {
        match self {
            VerifyError::Connect(_) => crate::error::ExitCode::CheckFailed,
            _ => crate::error::ExitCode::Runtime,
        }
    }

    fn retryable(&self) -> bool {
        match self {
            VerifyError::Query { source, .. } => crate::db::errors::is_retryable(source),
            VerifyError::Connect(e) => e.is_retryable(),
            VerifyError::Catalog(_) => false,
        }
    }
}

/// What to compare: a table and its key.
#[derive(Debug, Clone)]
pub struct Subject {
    /// The table.
    pub table: QualifiedTable,
    /// Its key columns.
    pub key_columns: Vec<String>,
}

impl Subject {
    /// A registered table, compared whole.
    pub fn of(t: &TableState) -> Self {
        Subject {
            table: t.table.clone(),
            key_columns: t.key_columns.clone(),
        }
    }
}

/// One table's result.
#[derive(Debug, Clone, Serialize)]
pub struct TableVerdict {
    /// `schema.name`.
    pub table: String,
    /// Rows on the source.
    pub source_rows: i64,
    /// Rows on the target.
    pub target_rows: i64,
    /// Counts and checksums agree.
    pub equal: bool,
    /// Keys whose rows differ or exist on one side only (first few).
    pub differing_keys: Vec<String>,
    /// Which rows were compared: all (`full`), or those whose keys changed
    /// since the table was verified before the fence (`changed`); the row
    /// counts are then of those rows.
    pub scope: VerifyScope,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Per table.
    pub tables: Vec<TableVerdict>,
    /// Tables that differ.
    pub mismatches: usize,
    /// Rows compared on the source.
    pub rows: i64,
}

/// Compares every user table of the source with the target.
pub async fn verify_all(m: &Migration) -> Result<VerifyReport, VerifyError> {
    let conn = m.source_conn().await?;
    let subjects: Vec<Subject> = crate::plan::source_tables(&**conn, false)
        .await
        .map_err(VerifyError::Catalog)?
        .into_iter()
        .map(|t| Subject {
            key_columns: t.key_columns.unwrap_or_default(),
            table: t.table,
        })
        .collect();
    drop(conn);
    verify(m, subjects).await
}

/// Compares the given tables in full, a few at a time.
pub async fn verify(m: &Migration, subjects: Vec<Subject>) -> Result<VerifyReport, VerifyError> {
    run(m, subjects.into_iter().map(Job::Full).collect()).await
}

/// With the fence up, after [`crate::drain::verify_ahead`]: each unit of
/// [`ahead_units`] whose root and partitioned tables still have
/// their ledgers compared over the rows whose keys changed since it was
/// verified (at its root: a partitioned table with its partitions), and
/// each partition of it that lost its ledger (truncated or copied whole
/// since) in full; every other table in full.
pub async fn verify_changed(m: &Migration, tables: &[TableState]) -> Result<VerifyReport, VerifyError> {
    let conn = m.source_conn().await?;
    let ledgers = crate::control::state::ledgers(&**conn)
        .await
        .map_err(VerifyError::Catalog)?;
    drop(conn);
    let units = ahead_units(tables);
    let trusted = |u: &&Vec<TableState>| {
        u.iter()
            .filter(|t| t.partitioned || t.relid == t.lock_relid)
            .all(|t| ledgers.contains(&t.id))
    };
    let mut jobs = Vec::new();
    for t in tables {
        let job = match units.iter().find(|u| u[0].relid == t.lock_relid).filter(trusted) {
            Some(u) if t.relid == t.lock_relid => Job::Changed(
                u.iter()
                    .filter(|member| ledgers.contains(&member.id))
                    .cloned()
                    .collect(),
            ),
            // Its rows are among its root's.
            Some(_) if ledgers.contains(&t.id) => continue,
            _ => Job::Full(Subject::of(t)),
        };
        jobs.push(job);
    }
    // A unit none of whose ledgers and deltas holds a key has had no row
    // changed since it was verified: nothing to read. Asked of every unit
    // in one round trip, so that thousands of tables unchanged since cost
    // the fence one statement each on the source, not a comparison each.
    let asked: Vec<&TableState> = jobs
        .iter()
        .flat_map(|j| match j {
            Job::Changed(unit) => unit.iter().collect(),
            _ => Vec::new(),
        })
        .collect();
    if !asked.is_empty() {
        let conn = m.source_conn().await?;
        let keyed = with_keys(&conn, &asked).await.map_err(VerifyError::Catalog)?;
        for job in &mut jobs {
            if let Job::Changed(unit) = job {
                if unit.iter().all(|t| !keyed.contains(&t.id)) {
                    *job = Job::Unchanged(unit[0].table.display_name());
                }
            }
        }
    }
    run(m, jobs).await
}

/// The tables among `tables` whose ledger or delta table holds a key, in
/// one round trip of one statement per table (a `UNION ALL` of thousands
/// is planned slower than they run).
async fn with_keys(
    client: &tokio_postgres::Client,
    tables: &[&TableState],
) -> Result<std::collections::HashSet<i32>, tokio_postgres::Error> {
    let sql: String = tables
        .iter()
        .map(|t| {
            format!(
                "SELECT {} WHERE EXISTS (SELECT FROM {}) OR EXISTS (SELECT FROM {});",
                t.id,
                t.ledger_table(),
                t.delta_table()
            )
        })
        .collect();
    let mut keyed = std::collections::HashSet::new();
    for message in client.simple_query(&sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
            // An id that does not read as one would be a bug: compared then.
            match row.get(0).and_then(|v| v.parse::<i32>().ok()) {
                Some(id) => _ = keyed.insert(id),
                None => return Ok(tables.iter().map(|t| t.id).collect()),
            }
        }
    }
    Ok(keyed)
}

/// One table to compare.
enum Job {
    /// Every row.
    Full(Subject),
    /// The rows of a unit's root (and of the tables below it) whose keys
    /// the ledgers or deltas of the given tables name, the root first.
    Changed(Vec<TableState>),
    /// A unit's root (by name) none of whose rows changed since it was
    /// verified: equal, no row to compare.
    Unchanged(String),
}

/// Tables of at most this many pages (by the source catalog's last count)
/// are compared in groups.
const SMALL_PAGES: i32 = 128;
/// How many small tables one statement per side compares: on cold
/// sessions, statements of 25-50 tables took the least server time per
/// table, of 100 more (planning).
const GROUP: usize = 50;

/// What a worker compares: one job, or small tables in one statement per
/// side (each with its place in the report).
enum Work {
    One(usize, Job),
    Small(Vec<(usize, Subject)>),
}

/// Runs the jobs, `sync.workers` at a time, the full comparisons of small
/// tables [`GROUP`] to a statement: compared one by one, each tiny table
/// cost a round trip per side with writes fenced (2,000 of them, from a
/// bridge host to RDS), besides its own reading.
async fn run(m: &Migration, jobs: Vec<Job>) -> Result<VerifyReport, VerifyError> {
    let full: Vec<String> = jobs
        .iter()
        .filter_map(|j| match j {
            Job::Full(s) => Some(s.table.to_string()),
            Job::Changed(_) | Job::Unchanged(_) => None,
        })
        .collect();
    let pages: Vec<i32> = {
        let conn = m.source_conn().await?;
        conn.query_one(
            // A table not found (dropped since) is compared alone, by name.
            "SELECT coalesce(array_agg(coalesce(c.relpages, 2147483647) ORDER BY u.o), '{}')
               FROM unnest($1::text[]) WITH ORDINALITY AS u(t, o) LEFT JOIN pg_class c ON c.oid = to_regclass(u.t)",
            &[&full],
        )
        .await
        .map_err(VerifyError::Catalog)?
        .get(0)
    };
    let mut pages = pages.into_iter();
    let mut work = Vec::new();
    let mut small = Vec::new();
    for (i, job) in jobs.into_iter().enumerate() {
        match job {
            Job::Full(s) if pages.next().unwrap_or(i32::MAX) <= SMALL_PAGES => small.push((i, s)),
            job => work.push(Work::One(i, job)),
        }
    }
    let mut small = small.into_iter().peekable();
    while small.peek().is_some() {
        work.push(Work::Small(small.by_ref().take(GROUP).collect()));
    }
    let done = crate::parallel::Limit::new(m.sync_workers())
        .run_all(work, None, |w| {
            let m = m.clone();
            async move {
                match w {
                    Work::One(i, Job::Full(s)) => Ok(vec![(i, compare(&m, &s).await?)]),
                    Work::One(i, Job::Changed(tables)) => Ok(vec![(i, compare_changed(&m, &tables).await?)]),
                    Work::One(i, Job::Unchanged(table)) => Ok(vec![(
                        i,
                        TableVerdict {
                            table,
                            source_rows: 0,
                            target_rows: 0,
                            equal: true,
                            differing_keys: Vec::new(),
                            scope: VerifyScope::Changed,
                        },
                    )]),
                    Work::Small(subjects) => compare_small(&m, subjects).await,
                }
            }
        })
        .await?;
    let mut verdicts: Vec<(usize, TableVerdict)> = done.into_iter().flatten().collect();
    verdicts.sort_by_key(|(i, _)| *i);
    let tables: Vec<TableVerdict> = verdicts.into_iter().map(|(_, v)| v).collect();
    Ok(VerifyReport::of(tables))
}

async fn compare(m: &Migration, s: &Subject) -> Result<TableVerdict, VerifyError> {
    let (src, tgt) = (m.source_conn().await?, m.target_conn().await?);
    compare_on(&**src, &**tgt, s, Rows::All).await
}

/// Compares small tables in full, all of them in one statement per side
/// (a row count and checksum each, as [`compare_on`] computes them); a
/// table that differs is compared again alone, for its differing keys.
async fn compare_small(
    m: &Migration,
    subjects: Vec<(usize, Subject)>,
) -> Result<Vec<(usize, TableVerdict)>, VerifyError> {
    let (src, tgt) = (m.source_conn().await?, m.target_conn().await?);
    // Each arm is one aggregate row, numbered: a parallel append need not
    // keep their order.
    let sql = subjects
        .iter()
        .enumerate()
        .map(|(k, (_, s))| format!("SELECT {k}::int4, x.* FROM {} AS x", sums("ONLY", &s.table, "")))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let err = |side| {
        let table = format!("{} tables at once", subjects.len());
        move |source| VerifyError::Query { table, side, source }
    };
    let (a, b) = tokio::join!(src.query(&sql, &[]), tgt.query(&sql, &[]));
    let (a, b) = (a.map_err(err(Side::Source))?, b.map_err(err(Side::Target))?);
    let by_arm = |rows: Vec<tokio_postgres::Row>| -> HashMap<i32, (i64, String)> {
        rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect()
    };
    let (a, b) = (by_arm(a), by_arm(b));
    let mut verdicts = Vec::new();
    for (k, (i, s)) in subjects.iter().enumerate() {
        let k = k as i32;
        let ((source_rows, theirs), (target_rows, ours)) = (&a[&k], &b[&k]);
        let (source_rows, target_rows) = (*source_rows, *target_rows);
        let verdict = if source_rows == target_rows && theirs == ours {
            TableVerdict {
                table: s.table.display_name(),
                source_rows,
                target_rows,
                equal: true,
                differing_keys: Vec::new(),
                scope: VerifyScope::Full,
            }
        } else {
            compare_on(&**src, &**tgt, s, Rows::All).await?
        };
        verdicts.push((*i, verdict));
    }
    Ok(verdicts)
}

/// The row count and checksum of `table`'s rows (alias `r`) that `filter`
/// keeps: what both sides compute, in identical session settings.
fn sums(only: &str, table: &QualifiedTable, filter: &str) -> String {
    format!(
        "(SELECT count(*), coalesce(sum(hashtextextended(ROW(r.*)::text, 0)::numeric), 0)::text \
           FROM {only} {table} AS r {filter})"
    )
}

/// Compares the rows of `tables[0]` (and of the tables below it) whose
/// keys the ledgers or delta tables of `tables` name: the keys go from the
/// source into a temporary table on the target, and each side sums the
/// rows with those keys.
async fn compare_changed(m: &Migration, tables: &[TableState]) -> Result<TableVerdict, VerifyError> {
    let mut src = m.source_conn().await?;
    let mut tgt = m.target_conn().await?;
    let stx = src.transaction().await.map_err(|source| VerifyError::Query {
        table: tables[0].table.display_name(),
        side: Side::Source,
        source,
    })?;
    // Read-only: ended without a commit round trip.
    compare_changed_on(&*stx, &mut tgt, tables, false).await
}

/// [`compare_changed`] as `src` (a transaction, or a batch's snapshot) and a
/// transaction of `tgt` see them; with `only`, the rows of `tables[0]`
/// itself (a table alone in its unit, whose children, if any, are drained
/// apart from it).
pub(crate) async fn compare_changed_on(
    src: &impl GenericClient,
    tgt: &mut tokio_postgres::Client,
    tables: &[TableState],
    only: bool,
) -> Result<TableVerdict, VerifyError> {
    let t = &tables[0];
    let err = |side| {
        let table = t.table.display_name();
        move |source| VerifyError::Query { table, side, source }
    };
    let ttx = tgt.transaction().await.map_err(err(Side::Target))?;
    let keys = column_list(&t.key_columns, None);
    let stored = t.delta_key_list();
    let changed = tables
        .iter()
        .flat_map(|t| [t.ledger_table(), t.delta_table()])
        .map(|keyed| format!("SELECT {stored} FROM {keyed}"))
        .collect::<Vec<_>>()
        .join(" UNION ");
    crate::rows::stage_keys(src, &ttx, "pgferry_keys", &t.table, &t.key_columns, &changed)
        .await
        .map_err(|e| match e {
            crate::rows::Pumped::Source(e) => err(Side::Source)(e),
            crate::rows::Pumped::Target(e) => err(Side::Target)(e),
        })?;
    ttx.batch_execute("ANALYZE pgferry_keys")
        .await
        .map_err(err(Side::Target))?;
    let mine = column_list(&t.key_columns, Some("r"));
    let (source, target) = (
        format!("WHERE ({mine}) IN ({changed})"),
        format!("WHERE ({mine}) IN (SELECT {keys} FROM pgferry_keys)"),
    );
    let subject = Subject::of(t);
    let verdict = compare_on(
        src,
        &ttx,
        &subject,
        Rows::Where {
            source: &source,
            target: &target,
            only,
        },
    )
    .await?;
    ttx.commit().await.map_err(err(Side::Target))?;
    Ok(verdict)
}

/// Which rows of a table [`compare_on`] compares.
pub(crate) enum Rows<'a> {
    /// Every row of the table itself (ONLY).
    All,
    /// The rows of the table and of the tables below it (the partitions of
    /// a partitioned table; with `only`, of the table itself) that each
    /// side's WHERE clause keeps (alias `r`).
    Where {
        /// On the source.
        source: &'a str,
        /// On the target.
        target: &'a str,
        /// The table's own rows only.
        only: bool,
    },
}

/// Compares `s` as two sessions (or transactions) see it: row count and
/// checksum, then the differing keys when the table differs and the rows
/// are few enough to list.
pub(crate) async fn compare_on(
    src: &impl GenericClient,
    tgt: &impl GenericClient,
    s: &Subject,
    rows: Rows<'_>,
) -> Result<TableVerdict, VerifyError> {
    let (src_filter, tgt_filter, scope, only) = match rows {
        Rows::All => ("", "", VerifyScope::Full, "ONLY"),
        Rows::Where { source, target, only } => (
            source,
            target,
            VerifyScope::Changed,
            if only { "ONLY" } else { "" },
        ),
    };
    let sql = |filter: &str| sums(only, &s.table, filter);
    let err = |side| {
        let table = s.table.display_name();
        move |source| VerifyError::Query { table, side, source }
    };
    let (sa, sb) = (sql(src_filter), sql(tgt_filter));
    let (a, b) = tokio::join!(src.query_one(&sa, &[]), tgt.query_one(&sb, &[]));
    let (a, b) = (a.map_err(err(Side::Source))?, b.map_err(err(Side::Target))?);
    let (source_rows, target_rows): (i64, i64) = (a.get(0), b.get(0));
    let equal = source_rows == target_rows && a.get::<_, String>(1) == b.get::<_, String>(1);
    let mut differing_keys = Vec::new();
    if !equal && !s.key_columns.is_empty() && source_rows.max(target_rows) <= MAX_ROWS_FOR_KEY_DIFF {
        let keys = column_list(&s.key_columns, Some("r"));
        let sql = |filter: &str| {
            format!(
                "SELECT ROW({keys})::text, hashtextextended(ROW(r.*)::text, 0) FROM {only} {} AS r {filter}",
                s.table
            )
        };
        let (sa, sb) = (sql(src_filter), sql(tgt_filter));
        let (a, b) = tokio::join!(src.query(&sa, &[]), tgt.query(&sb, &[]));
        let (a, b) = (a.map_err(err(Side::Source))?, b.map_err(err(Side::Target))?);
        let mut theirs: HashMap<String, i64> = b.iter().map(|r| (r.get(0), r.get(1))).collect();
        for r in &a {
            let key: String = r.get(0);
            match theirs.remove(&key) {
                Some(h) if h == r.get::<_, i64>(1) => {}
                Some(_) => differing_keys.push(format!("{key} differs")),
                None => differing_keys.push(format!("{key} missing on target")),
            }
        }
        differing_keys.extend(theirs.into_keys().map(|k| format!("{k} only on target")));
        differing_keys.sort();
        differing_keys.truncate(MAX_KEYS_LISTED);
    }
    Ok(TableVerdict {
        table: s.table.display_name(),
        source_rows,
        target_rows,
        equal,
        differing_keys,
        scope,
    })
}

impl VerifyReport {
    /// The report of these verdicts: how many differ, and the source rows
    /// they compared.
    pub fn of(tables: Vec<TableVerdict>) -> Self {
        Self {
            mismatches: tables.iter().filter(|t| !t.equal).count(),
            rows: tables.iter().map(|t| t.source_rows).sum(),
            tables,
        }
    }

    /// The report as an operator reads it.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for t in &self.tables {
            let verdict = if t.equal { "equal" } else { "DIFFERS" };
            let rows = match t.scope {
                VerifyScope::Full => "rows",
                VerifyScope::Changed => "changed rows",
            };
            let _ = writeln!(
                out,
                "{verdict:<8} {} (source {} {rows}, target {} {rows})",
                t.table, t.source_rows, t.target_rows
            );
            for k in &t.differing_keys {
                let _ = writeln!(out, "         key {k}");
            }
        }
        let _ = writeln!(
            out,
            "{} table(s), {} row(s) compared, {} differ",
            self.tables.len(),
            self.rows,
            self.mismatches
        );
        out
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::state::CopyState;
    use crate::db::ident::QualifiedTable;

    fn table(relid: u32, lock_relid: u32, partitioned: bool) -> TableState {
        TableState {
            id: relid as i32,
            relid,
            table: QualifiedTable::new("public", format!("t{relid}")),
            key_columns: vec!["id".into()],
            copy_columns: vec!["id".into()],
            attnums: None,
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
