//! Generated columns, followed on the target (docs/design.md, "Schema
//! changes during sync").
//!
//! A generated column is never copied (the target computes it), so the
//! registrations do not name it and a deploy that adds one (Django's
//! `GeneratedField`) is no drift: the drift check compares the generated
//! columns of the registered tables on both sides instead (one catalog read
//! each), and adds on the target those only the source has, with the
//! source's expression (which PostgreSQL requires immutable: the target
//! computes what the source did from the same row), drops those only the
//! target has, and replaces one whose expression changed. Only columns of
//! a table's own: a hierarchy's members take their root's.

use std::collections::BTreeMap;

use super::attributes::Altered;
use crate::control::state::TableState;
use crate::db::ident::{Ident, QualifiedTable};
use crate::db::Migration;
use crate::drain::SyncError;

/// Every generated column a table defines itself, by table (its number
/// in the reading) and column: its type and expression (see
/// [`super::read_both`]).
const READ: &str =
    "SELECT x.i, a.attname::text, format_type(a.atttypid, a.atttypmod), pg_get_expr(d.adbin, d.adrelid)
                      FROM ({tables}) x(i, rel)
                      JOIN pg_attribute a ON a.attrelid = x.rel
                      JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                     WHERE a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = 's' AND a.attislocal";

/// The rows of [`READ`], keyed.
fn keyed(rows: &[tokio_postgres::Row]) -> BTreeMap<(i64, String), (String, String)> {
    rows.iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect()
}

/// The statements that make the target's generated columns of `tables`
/// the source's, roots of hierarchies first, each with what it does, and a
/// target session to run them on.
async fn plan(
    m: &Migration,
    tables: &[TableState],
) -> Result<(deadpool_postgres::Object, Vec<(Altered, String)>), crate::Error> {
    let read = super::read_both(m, tables, READ, "reading the target's generated columns").await?;
    let (tables, target) = (read.tables, read.target);
    let (ours, theirs) = (keyed(&read.ours), keyed(&read.theirs));
    let mut wanted = Vec::new();
    for ((i, column), generated) in &theirs {
        if ours.get(&(*i, column.clone())) != Some(generated) {
            let table = tables.table(*i);
            wanted.push((
                Altered {
                    table: table.clone(),
                    column: column.clone(),
                    action: "dropped (generated)".into(),
                },
                format!("ALTER TABLE {table} DROP COLUMN {}", Ident(column.clone())),
            ));
        }
    }
    for ((i, column), (ty, expression)) in &ours {
        if theirs.get(&(*i, column.clone())) != Some(&(ty.clone(), expression.clone())) {
            let table = tables.table(*i);
            wanted.push((
                Altered {
                    table: table.clone(),
                    column: column.clone(),
                    action: format!("added, GENERATED ALWAYS AS ({expression}) STORED"),
                },
                format!(
                    "ALTER TABLE {table} ADD COLUMN {} {ty} GENERATED ALWAYS AS ({expression}) STORED",
                    Ident(column.clone())
                ),
            ));
        }
    }
    Ok((target, wanted))
}

/// Whether some table of `tables` has other generated columns on the
/// target than on the source (reads only).
pub(super) async fn differ(m: &Migration, tables: &[TableState]) -> Result<bool, crate::Error> {
    Ok(!plan(m, tables).await?.1.is_empty())
}

/// Makes the target's generated columns of `tables` the source's; returns
/// what it changed. A statement that fails is logged and left for the
/// next time.
pub(super) async fn follow(m: &Migration, tables: &[TableState]) -> Result<Vec<Altered>, crate::Error> {
    let (target, wanted) = plan(m, tables).await?;
    Ok(super::apply_each(&target, wanted).await)
}

/// The `ADD COLUMN` statements, with their places, of the generated
/// columns of `relid` (`table` on the target) that come before the
/// column numbered `before` on the source and that the target (whose
/// columns are `on_target`) lacks: a deploy's columns are added on the
/// target in the source's order, generated or not.
pub(super) async fn missing_before(
    m: &Migration,
    relid: u32,
    table: &QualifiedTable,
    on_target: &[String],
    before: i16,
) -> Result<Vec<(i16, String)>, crate::Error> {
    let mut conn = m.source_conn().await?;
    let tx = conn.transaction().await.map_err(SyncError::Catalog)?;
    tx.batch_execute("SET LOCAL search_path = pg_catalog")
        .await
        .map_err(SyncError::Catalog)?;
    let rows = tx
        .query(
            "SELECT a.attnum, a.attname::text, format_type(a.atttypid, a.atttypmod), pg_get_expr(d.adbin, d.adrelid)
               FROM pg_attribute a JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = 's'
                AND a.attislocal AND a.attnum < $2",
            &[&relid, &before],
        )
        .await
        .map_err(SyncError::Catalog)?;
    tx.commit().await.map_err(SyncError::Catalog)?;
    Ok(rows
        .iter()
        .filter(|r| !on_target.contains(&r.get::<_, String>(1)))
        .map(|r| {
            (
                r.get(0),
                format!(
                    "ALTER TABLE {table} ADD COLUMN {} {} GENERATED ALWAYS AS ({}) STORED",
                    Ident(r.get::<_, String>(1)),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3)
                ),
            )
        })
        .collect())
}
