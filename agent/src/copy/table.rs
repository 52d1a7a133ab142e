//! One table's copy: the snapshot it is read in (one `COPY ... TO`
//! statement, taken after capture: invariant 2) and the target transaction
//! it is loaded in (`TRUNCATE`, then `COPY ... FREEZE`), and the recopy of
//! a table under the fence.

use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::CopyError;
use crate::control::state::{self, TableState};
use crate::db::ident::column_list;
use crate::db::retry::{retry, Gave};
use crate::db::Migration;
use crate::rows::{pin_names, pump, set_loading, Pumped};

/// Copies one table and marks it done. Returns rows and bytes.
pub(super) async fn copy_table(
    m: &Migration,
    t: &TableState,
    estimated_bytes: u64,
) -> Result<(u64, u64), CopyError> {
    let started = Instant::now();
    let name = t.table.display_name();
    let src_err = |source| CopyError::Table {
        table: name.clone(),
        side: crate::db::endpoint::Side::Source,
        source,
    };
    let tgt_err = |source| CopyError::Table {
        table: name.clone(),
        side: crate::db::endpoint::Side::Target,
        source,
    };
    let mut data = m.data_conn().await?;
    let mut target = m.target_conn().await?;

    let cols = column_list(&t.copy_columns, None);
    let format = t.copy_format();
    let out_sql = format!("COPY {} ({cols}) TO STDOUT (FORMAT {format})", t.table);
    let in_sql = format!("COPY {} ({cols}) FROM STDIN (FORMAT {format}, FREEZE)", t.table);

    // Not synchronous_commit = off: the table is marked done on the source
    // right after this commit, so the commit must be durable first.
    let tx = target.transaction().await.map_err(tgt_err)?;
    set_loading(m, &tx).await.map_err(tgt_err)?;
    tx.batch_execute(&format!("TRUNCATE ONLY {}", t.table))
        .await
        .map_err(tgt_err)?;
    pin_names(&tx, t).await.map_err(tgt_err)?;
    let sink = tx.copy_in(&in_sql).await.map_err(tgt_err)?;
    // One statement: the transaction only scopes the pinned names.
    let stx = tokio_postgres::Client::transaction(&mut data)
        .await
        .map_err(src_err)?;
    pin_names(&stx, t).await.map_err(src_err)?;
    let stream = stx.copy_out(&out_sql).await.map_err(src_err)?;
    crate::failpoint::hit("copy.mid_table").await;
    let label = t.table.display_name();
    let bar = crate::progress::copy_bar(&label, estimated_bytes);
    let progress = |n| {
        crate::telemetry::copy_progress(&label, n);
        bar.inc(n as u64);
    };
    let (rows, bytes) = pump(stream, sink, &m.copy_throttle, progress)
        .await
        .map_err(|e| match e {
            Pumped::Source(e) => src_err(e),
            Pumped::Target(e) => tgt_err(e),
        })?;
    stx.commit().await.map_err(src_err)?;
    tx.commit().await.map_err(tgt_err)?;
    // Back to the pool first: without copy.from it is the source session
    // the mark below takes again.
    drop(data);
    crate::failpoint::hit("copy.before_mark_done").await;
    let control = m.source_conn().await?;
    state::mark_copied(&**control, t.id, rows as i64).await?;
    crate::telemetry::table_copied(&label, rows);
    crate::progress::copy_done(&bar, rows);
    tracing::info!(
        table = %name,
        rows,
        bytes,
        secs = started.elapsed().as_secs_f64(),
        "Table copied"
    );
    crate::failpoint::hit("copy.table_done").await;
    Ok((rows, bytes))
}

/// Copies one table again from scratch (a copy_only table under the
/// fence), with the copy's retries.
pub(crate) async fn recopy(m: &Migration, t: &TableState) -> Result<u64, crate::Error> {
    let never = CancellationToken::new();
    match retry(
        m.retry_policy(),
        "copy",
        "copy a table under the fence",
        &never,
        || copy_table(m, t, 0),
    )
    .await
    {
        Ok((rows, _)) => Ok(rows),
        Err(Gave::Up(e)) => Err(e.into()),
        Err(Gave::Cancelled) => Err(crate::Error::Cancelled),
    }
}
