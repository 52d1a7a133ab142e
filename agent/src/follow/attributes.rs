//! Column defaults and NOT NULL, followed on the target (docs/design.md,
//! "Schema changes during sync").
//!
//! `SET/DROP DEFAULT` and `SET/DROP NOT NULL` change neither a column's
//! name nor its type, and no row: the drift check compares them on both
//! sides (one catalog read each) and makes the target's the source's, a
//! hierarchy's root first. A `SET NOT NULL` the target cannot take yet
//! (a row the drain has not brought up to date holds a NULL) is tried again
//! at the next check; the cutover's comparison of the schemas names it if
//! it is still missing then. A batch the target refuses for a NOT NULL the
//! source dropped is followed the same way before it is tried again.

use std::collections::BTreeMap;

use crate::control::state::TableState;
use crate::db::ident::{Ident, QualifiedTable};
use crate::db::Migration;

/// What one side says of a column: NOT NULL, and its default.
type Attributes = (bool, Option<String>);

/// A column's default or NOT NULL made the source's on the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Altered {
    /// The table.
    pub table: QualifiedTable,
    /// The column.
    pub column: String,
    /// What was done (`SET DEFAULT ...`, `DROP NOT NULL`...).
    pub action: String,
}

/// Every column's NOT NULL and default, by table (its number in the
/// reading) and column (see [`super::read_both`]).
const READ: &str = "SELECT x.i, a.attname::text, a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
                      FROM ({tables}) x(i, rel)
                      JOIN pg_attribute a ON a.attrelid = x.rel
                      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                     WHERE a.attnum > 0 AND NOT a.attisdropped AND a.attidentity = '' AND a.attgenerated = ''";

/// The rows of [`READ`], keyed.
fn keyed(rows: &[tokio_postgres::Row]) -> BTreeMap<(i64, String), Attributes> {
    rows.iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect()
}

/// Whether some column of `tables` has another default or NOT NULL on the
/// target than on the source (reads only).
pub(super) async fn differ(m: &Migration, tables: &[TableState]) -> Result<bool, crate::Error> {
    Ok(!plan(m, tables).await?.1.is_empty())
}

/// Makes the target's defaults and NOT NULL those of the source for
/// `tables`; returns what it changed. One that fails is logged and left
/// for the next time.
pub(super) async fn follow(m: &Migration, tables: &[TableState]) -> Result<Vec<Altered>, crate::Error> {
    let (target, wanted) = plan(m, tables).await?;
    Ok(super::apply_each(&target, wanted).await)
}

/// What to change on the target, roots first, each with its statement,
/// with a target session.
async fn plan(
    m: &Migration,
    tables: &[TableState],
) -> Result<(deadpool_postgres::Object, Vec<(Altered, String)>), crate::Error> {
    let read = super::read_both(m, tables, READ, "reading the target's columns").await?;
    let (tables, target) = (read.tables, read.target);
    let (ours, theirs) = (keyed(&read.ours), keyed(&read.theirs));
    let mut wanted = Vec::new();
    let mut want = |i: i64, column: &String, action: String| {
        let table = tables.table(i).clone();
        let sql = format!(
            "ALTER TABLE {table} ALTER COLUMN {} {action}",
            Ident(column.clone())
        );
        wanted.push((
            Altered {
                table,
                column: column.clone(),
                action,
            },
            sql,
        ));
    };
    for ((i, column), (not_null, default)) in &ours {
        let Some((their_not_null, their_default)) = theirs.get(&(*i, column.clone())) else {
            continue;
        };
        if default != their_default {
            let action = match default {
                Some(d) => format!("SET DEFAULT {d}"),
                None => "DROP DEFAULT".to_string(),
            };
            want(*i, column, action);
        }
        if not_null != their_not_null {
            let action = if *not_null {
                "SET NOT NULL"
            } else {
                "DROP NOT NULL"
            };
            want(*i, column, action.to_string());
        }
    }
    Ok((target, wanted))
}
