//! `copy.method = "dump"`: the data staged on local disk, `pg_dump -Fd -j N`
//! then `pg_restore -j N`.
//!
//! pg_dump's workers share one snapshot, taken after capture was installed
//! (invariant 2), from `copy.from` when set. The pending tables are emptied
//! on the target first and marked copied only after the whole restore, so an
//! interrupted run dumps and restores them again from scratch.

use crate::control::state::{self, TableState};
use crate::db::Migration;
use crate::schema::PgTools;

use super::{CopyError, CopyReport};

/// Copies every pending table through a dump directory.
pub(super) async fn copy(
    m: &Migration,
    tools: &PgTools,
    tables: &[TableState],
    report: &mut CopyReport,
) -> Result<(), crate::Error> {
    let pending: Vec<&TableState> = tables
        .iter()
        .filter(|t| t.copy_state == state::CopyState::Pending)
        .collect();
    let (partitioned, plain): (Vec<&TableState>, Vec<&TableState>) =
        pending.into_iter().partition(|t| t.partitioned);
    let conn = m.source_conn().await?;
    for t in &partitioned {
        state::mark_copied(&**conn, t.id, 0).await?;
    }
    drop(conn);
    if plain.is_empty() {
        return Ok(());
    }

    let target = m.target_conn().await?;
    let names: Vec<String> = plain.iter().map(|t| t.table.to_string()).collect();
    target
        .batch_execute(&format!("TRUNCATE ONLY {}", names.join(", ")))
        .await
        .map_err(|source| CopyError::Target {
            what: "emptying the tables before the restore",
            source,
        })?;
    let options = match m.cfg.copy.toast_compression {
        crate::config::ToastCompression::Server => None,
        c => {
            let name = if c == crate::config::ToastCompression::Lz4 {
                "lz4"
            } else {
                "pglz"
            };
            let available: bool = target
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_settings
                                     WHERE name = 'default_toast_compression' AND $1 = ANY (enumvals))",
                    &[&name],
                )
                .await
                .map_err(|source| CopyError::Target {
                    what: "reading the TOAST compression methods",
                    source,
                })?
                .get(0);
            available.then(|| format!("-c default_toast_compression={name}"))
        }
    };
    drop(target);

    let parent = match &m.cfg.copy.dump_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir(),
    };
    let scratch = crate::scratch::Scratch::new_in(&parent, "pgferry-data-").map_err(CopyError::Scratch)?;
    let dir = scratch.path().join("data");
    let jobs = m.copy_workers();
    tracing::info!(tables = plain.len(), jobs, dir = %dir.display(), "Dumping the data");
    let started = std::time::Instant::now();
    tools
        .dump_data(
            m.data_endpoint(),
            &dir,
            &names,
            jobs,
            m.cfg.source_limits.lock_timeout_ms,
        )
        .await?;
    crate::failpoint::hit("copy.dumped").await;
    tracing::info!(secs = started.elapsed().as_secs_f64(), "Restoring the data");
    tools.restore_data(&m.target, &dir, jobs, options).await?;
    drop(scratch);

    let target = m.target_conn().await?;
    let conn = m.source_conn().await?;
    for t in plain {
        let rows: i64 = target
            .query_one(&format!("SELECT count(*) FROM ONLY {}", t.table), &[])
            .await
            .map_err(|source| CopyError::Target {
                what: "counting restored rows",
                source,
            })?
            .get(0);
        state::mark_copied(&**conn, t.id, rows).await?;
        crate::telemetry::table_copied(&t.table.display_name(), rows as u64);
        report.tables_copied += 1;
        report.rows += rows as u64;
    }
    Ok(())
}
