//! One drain pass: a batch for every table, `sync.workers` at a time, and
//! the explanation of a batch that failed on a change of the source's types.

use tokio_util::sync::CancellationToken;

use super::batch::{batch_err, drain_table, splittable, Part, PARTS, SPLIT_FROM_ROWS};
use super::pending::Pending;
use super::{SyncError, SyncReport};
use crate::control::state::{self, TableState};
use crate::db::endpoint::Side;
use crate::db::ident::Ident;
use crate::db::retry::{retry, Gave};
use crate::db::Migration;

/// One batch for every table, `sync.workers` tables at a time.
pub async fn drain_pass(
    m: &Migration,
    tables: &[TableState],
    cancel: &CancellationToken,
) -> Result<SyncReport, crate::Error> {
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
    let drained = crate::parallel::Limit::new(m.sync_workers())
        .run_all(units, Some(cancel), |(group, part)| {
            let (m, cancel) = (m.clone(), cancel.clone());
            async move {
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
            }
        })
        .await;
    let mut report = SyncReport {
        passes: 1,
        ..Default::default()
    };
    match drained {
        Ok(stats) => {
            stats.iter().flatten().for_each(|s| report.add(s));
            Ok(report)
        }
        Err(e) => Err(explained(m, tables, e).await),
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
    let Some(SyncError::Batch { table, side, source }) = e.downcast_ref() else {
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

/// Fails with [`SyncError::SchemaDrift`] when the source schema changed,
/// and with [`SyncError::TypeDrift`] when a column's type on the target no
/// longer takes the source's values.
pub async fn check_drift(m: &Migration, tables: &[TableState]) -> Result<(), SyncError> {
    let conn = m.source_conn().await?;
    let current = crate::plan::source_tables(&**conn, false)
        .await
        .map_err(SyncError::Catalog)?;
    let changes = crate::plan::drift::schema_changes(&**conn, tables, &current)
        .await
        .map_err(SyncError::Catalog)?;
    if !changes.is_empty() {
        return Err(SyncError::SchemaDrift(changes));
    }
    drop(conn);
    // ALTER COLUMN ... TYPE changes no column's name: told by the types.
    let retyped = super::types::drifted(m, tables).await?;
    if retyped.is_empty() {
        return Ok(());
    }
    Err(SyncError::TypeDrift(
        retyped
            .iter()
            .map(|(i, c, _)| {
                format!(
                    "{}.{c} changed type on the source",
                    tables[*i].table.display_name()
                )
            })
            .collect(),
    ))
}
