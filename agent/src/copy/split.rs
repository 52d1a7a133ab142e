//! Big tables copied in parts: block (ctid) ranges of the heap, read by TID
//! range scans (PostgreSQL 14+), so that one big table keeps every worker
//! busy instead of leaving the others idle at the end of the copy.
//!
//! Each part is read in its own snapshot and loaded in its own target
//! transaction, which keeps the source's xmin horizon moving and makes the
//! copy resumable part by part. Parts read at different moments can disagree
//! about a row that an UPDATE moved from one block range to another: it may
//! be loaded twice, or not at all. Every such row was changed after capture
//! was installed, so its key is in the delta tables, and the drain makes the
//! target row for that key equal to the source's (invariant 3). Before the
//! table is marked copied, its target rows whose keys appear in the deltas
//! the drain will apply to it are deleted, so the two copies of a moved row
//! never meet the primary key built next. Deleting a row the drain will
//! write again loses nothing.
//!
//! A part's target transaction id and row count are recorded on the source
//! before it commits; after a crash, or a connection lost during the
//! commit, a part in doubt is settled by asking the target
//! (`pg_xact_status`) instead of being loaded twice.

use std::time::{Duration, Instant};

use crate::config::CopyConfig;
use crate::control::state::{self, CopyPart, TableState};
use crate::db::endpoint::Side;
use crate::db::ident::column_list;
use crate::db::Migration;

use super::CopyError;
use crate::rows::{pump, set_loading, Pumped};

/// Most parts, whatever the configuration says.
const MAX_PARTS: usize = 64;

/// How long a part's target transaction may stay "in progress" after its
/// agent went away before the copy gives up (the server ends such sessions
/// within `client_connection_check_interval`).
const IN_DOUBT_WAIT: Duration = Duration::from_secs(60);

fn err(t: &TableState, side: Side) -> impl Fn(tokio_postgres::Error) -> CopyError + '_ {
    move |source| CopyError::Table {
        table: t.table.display_name(),
        side,
        source,
    }
}

/// True when the database the data is read from has TID range scans.
pub(super) async fn supported(m: &Migration) -> Result<bool, CopyError> {
    if m.cfg.copy.split_tables_larger_than_mb == 0 {
        return Ok(false);
    }
    let conn = m.data_conn().await?;
    let version: i32 = conn
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(CopyError::catalog)?
        .get(0);
    if version < 140_000 {
        tracing::info!(
            version,
            "Big tables are copied whole: splitting them needs TID range scans (PostgreSQL 14+)"
        );
    }
    Ok(version >= 140_000)
}

/// Tables that may be split: plain tables (an inheritance parent or child
/// too, read with ONLY) that are drained. Partitions are parts already, and
/// copy_only tables are copied again under the fence, whole.
pub(super) fn splittable(t: &TableState) -> bool {
    !t.partitioned && !t.copy_only && (t.lock_relid == t.relid || t.parent_relid.is_some())
}

/// How many parts a table of `heap_bytes` is copied in.
pub(super) fn part_count(cfg: &CopyConfig, workers: usize, heap_bytes: u64) -> usize {
    let threshold = cfg.split_tables_larger_than_mb.saturating_mul(1 << 20);
    if threshold == 0 || heap_bytes <= threshold {
        return 1;
    }
    let max = cfg.max_parts.unwrap_or(workers).min(MAX_PARTS);
    if max < 2 {
        return 1;
    }
    // Parts of about the threshold's size, at most `max` of them.
    (heap_bytes.div_ceil(threshold) as usize).clamp(2, max)
}

/// Block ranges `[first, end)` cutting `blocks` into `parts`; the last is
/// open so that rows appended since the size was read are copied too.
pub(super) fn ranges(blocks: i64, parts: usize) -> Vec<(i64, Option<i64>)> {
    let parts = parts.max(1) as i64;
    let step = (blocks / parts).max(1);
    (0..parts)
        .map(|i| {
            let first = i * step;
            let end = (i + 1 < parts).then_some((i + 1) * step);
            (first, end)
        })
        .collect()
}

/// The parts already planned for `t` by an earlier run (empty if none).
pub(super) async fn planned(m: &Migration, t: &TableState) -> Result<Vec<CopyPart>, CopyError> {
    let conn = m.source_conn().await?;
    Ok(state::copy_parts(&**conn, t.id).await?)
}

/// Plans `t`'s parts unless an earlier run did (then its plan stands), and
/// returns the parts still to copy.
pub(super) async fn prepare(
    m: &Migration,
    t: &TableState,
    blocks: i64,
    parts: usize,
    planned: Vec<CopyPart>,
) -> Result<Vec<CopyPart>, CopyError> {
    if !planned.is_empty() {
        return Ok(planned.into_iter().filter(|p| !p.done).collect());
    }
    // Whatever an interrupted whole-table copy left goes first; the plan is
    // recorded after, so a crash in between only repeats this.
    let target = m.target_conn().await?;
    target
        .batch_execute(&format!("TRUNCATE ONLY {}", t.table))
        .await
        .map_err(err(t, Side::Target))?;
    let conn = m.source_conn().await?;
    state::plan_copy_parts(&**conn, t.id, &ranges(blocks, parts)).await?;
    tracing::info!(table = %t.table.display_name(), parts, blocks, "Copying in parts");
    Ok(state::copy_parts(&**conn, t.id).await?)
}

/// Settles a part whose target transaction was recorded but not known to
/// have committed. Returns its rows when it did commit.
async fn settle(m: &Migration, t: &TableState, p: &CopyPart, xid: &str) -> Result<Option<i64>, CopyError> {
    let target = m.target_conn().await?;
    let started = Instant::now();
    loop {
        let status: Option<String> = target
            .query_one("SELECT pg_xact_status($1::text::xid8)", &[&xid])
            .await
            .map_err(err(t, Side::Target))?
            .get(0);
        match status.as_deref() {
            Some("in progress") if started.elapsed() < IN_DOUBT_WAIT => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Some("in progress") => {
                return Err(CopyError::InDoubt {
                    table: t.table.display_name(),
                    part: p.part,
                    xid: xid.to_string(),
                })
            }
            Some("committed") => {
                let conn = m.source_conn().await?;
                state::settle_part(&**conn, t.id, p.part, true).await?;
                return Ok(Some(p.rows.unwrap_or(0)));
            }
            // Aborted, or too old to be known: it left nothing behind.
            _ => {
                let conn = m.source_conn().await?;
                state::settle_part(&**conn, t.id, p.part, false).await?;
                return Ok(None);
            }
        }
    }
}

/// Copies one part. Returns rows and bytes.
pub(super) async fn copy_part(
    m: &Migration,
    t: &TableState,
    p: &CopyPart,
    estimated_bytes: u64,
) -> Result<(u64, u64), CopyError> {
    // A retry after a failed commit, or a run after a crash, first learns
    // whether the part's last attempt committed.
    let current = {
        let conn = m.source_conn().await?;
        state::copy_parts(&**conn, t.id)
            .await?
            .into_iter()
            .find(|c| c.part == p.part)
            .unwrap_or_else(|| p.clone())
    };
    if current.done {
        return Ok((0, 0));
    }
    if let Some(xid) = &current.target_xid {
        if let Some(rows) = settle(m, t, &current, xid).await? {
            return Ok((rows as u64, 0));
        }
    }

    let started = Instant::now();
    let label = format!("{}[{}]", t.table.display_name(), p.part);
    let mut data = m.data_conn().await?;
    let mut target = m.target_conn().await?;
    let cols = column_list(&t.copy_columns, None);
    let format = t.copy_format();
    let upper = p
        .end_block
        .map(|e| format!(" AND ctid < '({e},0)'::tid"))
        .unwrap_or_default();
    let out_sql = format!(
        "COPY (SELECT {cols} FROM ONLY {} WHERE ctid >= '({},0)'::tid{upper}) TO STDOUT (FORMAT {format})",
        t.table, p.first_block
    );
    let in_sql = format!("COPY {} ({cols}) FROM STDIN (FORMAT {format})", t.table);

    let tx = target.transaction().await.map_err(err(t, Side::Target))?;
    set_loading(m, &tx).await.map_err(err(t, Side::Target))?;
    let xid: String = tx
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .map_err(err(t, Side::Target))?
        .get(0);
    crate::rows::pin_names(&tx, t)
        .await
        .map_err(err(t, Side::Target))?;
    let sink = tx.copy_in(&in_sql).await.map_err(err(t, Side::Target))?;
    // One statement: the transaction only scopes the pinned names.
    let stx = tokio_postgres::Client::transaction(&mut data)
        .await
        .map_err(err(t, Side::Source))?;
    crate::rows::pin_names(&stx, t)
        .await
        .map_err(err(t, Side::Source))?;
    let stream = stx.copy_out(&out_sql).await.map_err(err(t, Side::Source))?;
    crate::failpoint::hit("copy.mid_part").await;
    let bar = crate::progress::copy_bar(&label, estimated_bytes);
    let table_label = t.table.display_name();
    let progress = |n| {
        crate::telemetry::copy_progress(&table_label, n);
        bar.inc(n as u64);
    };
    let (rows, bytes) = pump(stream, sink, &m.copy_throttle, progress)
        .await
        .map_err(|e| match e {
            Pumped::Source(e) => err(t, Side::Source)(e),
            Pumped::Target(e) => err(t, Side::Target)(e),
        })?;
    stx.commit().await.map_err(err(t, Side::Source))?;
    drop(data);
    let control = m.source_conn().await?;
    state::part_in_doubt(&**control, t.id, p.part, &xid, rows as i64).await?;
    crate::failpoint::hit("copy.part_in_doubt").await;
    tx.commit().await.map_err(err(t, Side::Target))?;
    crate::failpoint::hit("copy.part_committed").await;
    state::settle_part(&**control, t.id, p.part, true).await?;
    crate::progress::copy_done(&bar, rows);
    tracing::info!(
        table = %t.table.display_name(),
        part = p.part,
        rows,
        bytes,
        secs = started.elapsed().as_secs_f64(),
        "Part copied"
    );
    Ok((rows, bytes))
}

/// Once every part is in: removes the target rows the drain will rewrite
/// (see the module notes), then marks the table copied.
pub(super) async fn finish(m: &Migration, t: &TableState, all: &[TableState]) -> Result<(), CopyError> {
    let parts = planned(m, t).await?;
    if parts.iter().any(|p| !p.done) {
        // An earlier failure left a part behind; the next run copies it.
        return Ok(());
    }
    let rows: i64 = parts.iter().filter_map(|p| p.rows).sum();
    // The table's own deltas, and its inheritance ancestors': their batches
    // rewrite the rows below them, this table's included.
    let mut chain = vec![t];
    while let Some(parent) = chain
        .last()
        .and_then(|c| c.parent_relid)
        .and_then(|p| all.iter().find(|a| a.relid == p))
    {
        chain.push(parent);
    }
    let mut removed = 0;
    for owner in chain {
        removed += remove_delta_keys(m, t, owner).await?;
    }
    let conn = m.source_conn().await?;
    state::mark_copied(&**conn, t.id, rows - removed as i64).await?;
    crate::telemetry::table_copied(&t.table.display_name(), rows as u64);
    tracing::info!(
        table = %t.table.display_name(),
        parts = parts.len(),
        rows,
        removed_for_the_drain = removed,
        "Table copied"
    );
    Ok(())
}

/// Deletes from the target's `t` every row whose key (in `owner`'s key
/// columns) is named by `owner`'s deltas. Returns the rows deleted.
async fn remove_delta_keys(m: &Migration, t: &TableState, owner: &TableState) -> Result<u64, CopyError> {
    let mut source = m.source_conn().await?;
    let delta = owner.delta_table();
    let any: bool = source
        .query_one(
            &format!("SELECT to_regclass($1) IS NOT NULL AND EXISTS (SELECT 1 FROM {delta})"),
            &[&delta.to_string()],
        )
        .await
        .map_err(err(t, Side::Source))?
        .get(0);
    if !any {
        return Ok(0);
    }
    let delta_keys = owner.delta_key_list();
    let join = owner
        .key_columns
        .iter()
        .map(|k| {
            let k = crate::db::ident::Ident(k.clone());
            format!("t.{k} = k.{k}")
        })
        .collect::<Vec<_>>()
        .join(" AND ");
    let mut target = m.target_conn().await?;
    let tx = target.transaction().await.map_err(err(t, Side::Target))?;
    let stx = source.transaction().await.map_err(err(t, Side::Source))?;
    crate::rows::stage_keys(
        &*stx,
        &tx,
        "pgferry_moved",
        &t.table,
        &owner.key_columns,
        &format!("SELECT DISTINCT {delta_keys} FROM {delta}"),
    )
    .await
    .map_err(|e| match e {
        Pumped::Source(e) => err(t, Side::Source)(e),
        Pumped::Target(e) => err(t, Side::Target)(e),
    })?;
    let removed = tx
        .execute(
            &format!(
                "DELETE FROM ONLY {} AS t USING pgferry_moved AS k WHERE {join}",
                t.table
            ),
            &[],
        )
        .await
        .map_err(err(t, Side::Target))?;
    tx.commit().await.map_err(err(t, Side::Target))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_every_block_once() {
        let r = ranges(10, 3);
        assert_eq!(r, vec![(0, Some(3)), (3, Some(6)), (6, None)]);
        assert_eq!(ranges(0, 2), vec![(0, Some(1)), (1, None)]);
        assert_eq!(ranges(5, 1), vec![(0, None)]);
    }

    #[test]
    fn part_count_follows_the_threshold() {
        let cfg = CopyConfig {
            split_tables_larger_than_mb: 100,
            ..Default::default()
        };
        assert_eq!(part_count(&cfg, 4, 50 << 20), 1);
        assert_eq!(part_count(&cfg, 4, 150 << 20), 2);
        assert_eq!(part_count(&cfg, 4, 10_000 << 20), 4);
        let capped = CopyConfig {
            max_parts: Some(3),
            ..cfg.clone()
        };
        assert_eq!(part_count(&capped, 8, 10_000 << 20), 3);
        let off = CopyConfig {
            split_tables_larger_than_mb: 0,
            ..cfg
        };
        assert_eq!(part_count(&off, 4, 10_000 << 20), 1);
    }
}
