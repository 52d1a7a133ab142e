//! Column types the source widened, followed on the target
//! (docs/design.md, "Schema changes during sync").
//!
//! `ALTER COLUMN ... TYPE` keeps the column's name, so the drift check and
//! every batch compare the types on both sides ([`crate::drain::types`]):
//! no batch applies a table whose target type would refuse or round the
//! source's values. When the source's type grew (`int` to `bigint`, a
//! longer `varchar` or `text`, more `numeric` precision at the same scale)
//! the target's is changed to it, a hierarchy's root first (its members
//! follow it); the rows need no copy, their values are the same. Any other
//! change stops sync with the statements that make the target's type the
//! source's.

use crate::control::state::{self, TableState};
use crate::db::ident::{Ident, QualifiedTable};
use crate::db::Migration;
use crate::drain::types::{self, ColumnType, Fit};
use crate::drain::SyncError;

/// A column's type widened on the target as on the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Widened {
    /// The table.
    pub table: QualifiedTable,
    /// The column.
    pub column: String,
    /// The source's type now (`format_type`).
    pub to: String,
}

/// Widens on the target the columns whose type the source widened; fails
/// with the statements to run by hand when some change is not a widening
/// (or `sync.follow_schema_changes` is off). Nothing to do: nothing done.
pub(super) async fn follow(
    m: &Migration,
    tables: &[TableState],
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Vec<Widened>, crate::Error> {
    let drifted = types::drifted(m, tables).await?;
    if drifted.is_empty() {
        return Ok(Vec::new());
    }
    let mut wanted = Vec::new();
    for (i, column, fit) in &drifted {
        let t = &tables[*i];
        let to = source_type(m, t.relid, column).await?;
        wanted.push((t, column.clone(), to, *fit));
    }
    if !m.cfg.sync.follow_schema_changes || wanted.iter().any(|w| w.3 != Fit::Narrower) {
        return Err(SyncError::TypeDrift(
            wanted
                .iter()
                .map(|(t, c, to, _)| {
                    format!(
                        "ALTER TABLE {} ALTER COLUMN {} TYPE {to}",
                        t.table,
                        Ident(c.clone())
                    )
                })
                .collect(),
        )
        .into());
    }
    // A hierarchy's root before its members, which it changes too.
    wanted.sort_by_key(|(t, ..)| t.lock_relid != t.relid || t.parent_relid.is_some());
    let mut done = Vec::new();
    for (t, column, to, _) in wanted {
        // A key column's delta column first: a batch stages the delta's
        // keys in binary as the target's type.
        widen_delta(m, t, &column, &to, cancel).await?;
        if still_narrower(m, t, &column).await? {
            tracing::info!(table = %t.table.display_name(), column, to, "Widening the column on the target as on the source");
            m.target_conn()
                .await?
                .batch_execute(&format!(
                    "ALTER TABLE {} ALTER COLUMN {} TYPE {to}",
                    t.table,
                    Ident(column.clone())
                ))
                .await
                .map_err(|source| SyncError::Follow {
                    what: "widening a column's type",
                    source,
                })?;
        }
        state::drop_ledger(&**m.source_conn().await?, t).await?;
        done.push(Widened {
            table: t.table.clone(),
            column,
            to,
        });
    }
    Ok(done)
}

/// Makes `t`'s delta column for key column `column` hold the source's new
/// type of it, `to`, when it does not already (a delta table has the key's
/// own type, or after `release-keys` the widest of its family,
/// `delta_key_type`, which holds any widening of it): the capture writes
/// the key's values into it, which the old type would refuse past its
/// range. Its turn taken, under the short lock timeout: the
/// application's writes to `t` wait for it while the delta table is
/// rewritten.
async fn widen_delta(
    m: &Migration,
    t: &TableState,
    column: &str,
    to: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), crate::Error> {
    let Some(ord) = t.key_columns.iter().position(|k| k == column) else {
        return Ok(());
    };
    if t.copy_only {
        return Ok(());
    }
    const TYPE_OF: &str = "SELECT tn.nspname || '.' || ty.typname, a.atttypmod
                             FROM pg_attribute a
                             JOIN pg_type ty ON ty.oid = a.atttypid
                             JOIN pg_namespace tn ON tn.oid = ty.typnamespace
                            WHERE a.attrelid = $1::text::regclass AND a.attname = $2 AND NOT a.attisdropped";
    let (delta, key) = (t.delta_table().to_string(), format!("k{}", ord + 1));
    let name = t.table.display_name();
    crate::ddl::retry_ddl(m, cancel, &format!("widen the delta table of {name}"), || async {
        let failed = |source| crate::capture::CaptureError::WidenDelta {
            table: name.clone(),
            source,
        };
        let mut conn = m.source_conn().await?;
        let tx = conn.transaction().await.map_err(failed)?;
        let type_of = |r: tokio_postgres::Row| ColumnType {
            name: r.get(0),
            typmod: r.get(1),
        };
        let held = tx
            .query_opt(TYPE_OF, &[&delta, &key])
            .await
            .map_err(failed)?
            .map(type_of);
        let wanted = tx
            .query_opt(TYPE_OF, &[&t.table.to_string(), &column])
            .await
            .map_err(failed)?
            .map(type_of);
        let (Some(held), Some(wanted)) = (held, wanted) else {
            return Ok(());
        };
        if types::holds(&held, &wanted) {
            return Ok(());
        }
        crate::ddl::take_turn(m, &tx, None, &delta).await?;
        tx.batch_execute(&format!("ALTER TABLE {delta} ALTER COLUMN {key} TYPE {to}"))
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        tracing::info!(table = %name, column, to, "The delta table's key column widened as the source's key");
        Ok::<_, crate::capture::CaptureError>(())
    })
    .await
}

/// The source's type of a column, names qualified.
async fn source_type(m: &Migration, relid: u32, column: &str) -> Result<String, crate::Error> {
    let mut conn = m.source_conn().await?;
    let tx = tokio_postgres::Client::transaction(&mut conn)
        .await
        .map_err(SyncError::Catalog)?;
    tx.batch_execute("SET LOCAL search_path = pg_catalog")
        .await
        .map_err(SyncError::Catalog)?;
    let ty: String = tx
        .query_one(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = $1 AND attname = $2",
            &[&relid, &column],
        )
        .await
        .map_err(SyncError::Catalog)?
        .get(0);
    tx.commit().await.map_err(SyncError::Catalog)?;
    Ok(ty)
}

/// Whether the target's type of the column still does not take the
/// source's values (its root's change may have changed it already).
async fn still_narrower(m: &Migration, t: &TableState, column: &str) -> Result<bool, crate::Error> {
    Ok(types::drifted(m, std::slice::from_ref(t))
        .await?
        .iter()
        .any(|(_, c, _)| c == column))
}
