//! CHECK constraints, and the indexes and unique constraints the source
//! dropped, followed on the target (docs/design.md, "Schema changes during
//! sync").
//!
//! What the source no longer has, the target must not keep: a unique index
//! or constraint, or a CHECK, that the source dropped refuses the rows the
//! application writes next, and stops the drain. So the drift check
//! compares both sides' indexes and CHECK constraints of the registered
//! tables by name (one catalog read each), drops on the target what only
//! it has (a primary key aside: a key changed is drift, and a partition's
//! index goes with its parent's), and adds the CHECK constraints only the
//! source has: `NOT VALID` first, since a row the drain has yet to bring up
//! to date may not satisfy it (every row the drain writes does: the source
//! holds it), then validated when the source's is, once the target's rows
//! allow it (each check tries again; the cutover's comparison of the
//! schemas names one still missing then). Indexes the source gained are
//! built by the cutover, ahead of the fence, as before.

use std::collections::BTreeMap;

use crate::control::state::TableState;
use crate::db::ident::{Ident, QualifiedTable};
use crate::db::Migration;

/// What one side has on a table, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Object {
    /// An index, with the constraint it backs if any, whether it is never
    /// dropped here (a primary key's, a partition's index attached to its
    /// parent's: it goes with that), and its definition without its name
    /// (with its constraint's): how a renamed one is known. Read from the
    /// catalog's columns, not `pg_get_indexdef`, which waits for a lock on
    /// the table (the drift check must not queue behind the application's
    /// own ALTER); so none for an index on expressions or with a predicate,
    /// whose deparsing would.
    Index(Option<String>, bool, Option<String>),
    /// A CHECK constraint: its definition, and whether it is validated.
    Check(String, bool),
}

/// A constraint or index made so on the target as on the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constrained {
    /// The table.
    pub table: QualifiedTable,
    /// What was done (`index x dropped`, `constraint c added`...).
    pub action: String,
}

/// Every index and CHECK constraint, by table (its number in the reading)
/// and name (see [`super::read_both`]).
const READ: &str = "SELECT x.i, ic.relname::text, con.conname::text, NULL::text,
                           ix.indisprimary OR EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = ix.indexrelid),
                           CASE WHEN ix.indexprs IS NULL AND ix.indpred IS NULL THEN
                               concat_ws(' ', CASE WHEN ix.indisunique THEN 'UNIQUE' END, am.amname,
                                         (SELECT string_agg(concat_ws(' ', quote_ident(a.attname), op.opcname, k.opt),
                                                            ', ' ORDER BY k.ord)
                                            FROM unnest(ix.indkey::int2[], ix.indclass::oid[], ix.indoption::int2[])
                                                 WITH ORDINALITY AS k(attnum, cls, opt, ord)
                                            JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = k.attnum
                                            LEFT JOIN pg_opclass op ON op.oid = k.cls),
                                         'keys ' || ix.indnkeyatts, 'nulls ' || ix.indnullsnotdistinct,
                                         pg_get_constraintdef(con.oid))
                           END
                      FROM ({tables}) x(i, rel)
                      JOIN pg_index ix ON ix.indrelid = x.rel
                      JOIN pg_class ic ON ic.oid = ix.indexrelid
                      JOIN pg_am am ON am.oid = ic.relam
                      LEFT JOIN pg_constraint con ON con.conindid = ix.indexrelid AND con.conrelid = x.rel
                    UNION ALL
                    SELECT x.i, con.conname::text, NULL, pg_get_constraintdef(con.oid), con.convalidated, NULL
                      FROM ({tables}) x(i, rel)
                      JOIN pg_constraint con ON con.conrelid = x.rel
                     WHERE con.contype = 'c' AND con.conislocal";

/// The rows of [`READ`], keyed.
fn keyed(rows: &[tokio_postgres::Row]) -> BTreeMap<(i64, String), Object> {
    rows.iter()
        .map(|r| {
            let object = match r.get::<_, Option<String>>(3) {
                Some(definition) => Object::Check(definition, r.get(4)),
                None => Object::Index(r.get(2), r.get(4), r.get(5)),
            };
            ((r.get(0), r.get(1)), object)
        })
        .collect()
}

/// The statements that make the target's indexes and CHECK constraints of
/// `tables` the source's, roots of hierarchies first, each with what it
/// does, and a target session to run them on.
async fn plan(
    m: &Migration,
    tables: &[TableState],
) -> Result<(deadpool_postgres::Object, Vec<(Constrained, String)>), crate::Error> {
    let read = super::read_both(m, tables, READ, "reading the target's indexes and constraints").await?;
    let (tables, target) = (read.tables, read.target);
    let (ours, theirs) = (keyed(&read.ours), keyed(&read.theirs));
    let mut wanted = Vec::new();
    let mut want = |i: i64, action: String, sql: &dyn Fn(&QualifiedTable) -> String| {
        let table = tables.table(i).clone();
        let sql = sql(&table);
        wanted.push((Constrained { table, action }, sql));
    };
    // The source's indexes the target lacks by name: one of the target's
    // that only it has, of the same definition, was renamed on the source.
    let mut renamed: Vec<(i64, &String, &String)> = ours
        .iter()
        .filter(|(key, _)| !theirs.contains_key(key))
        .filter_map(|((i, name), o)| match o {
            Object::Index(_, _, Some(definition)) => Some((*i, name, definition)),
            Object::Index(..) | Object::Check(..) => None,
        })
        .collect();
    for ((i, name), object) in &theirs {
        if ours
            .get(&(*i, name.clone()))
            .is_some_and(|o| same_kind(o, object))
        {
            continue;
        }
        if let Object::Index(_, _, Some(definition)) = object {
            let to = renamed.iter().position(|(j, _, d)| j == i && *d == definition);
            if let Some(to) = to {
                let (_, new_name, _) = renamed.remove(to);
                // Its constraint, if it backs one, is renamed with it.
                want(*i, format!("index {name} renamed to {new_name}"), &|table| {
                    format!(
                        "ALTER INDEX {} RENAME TO {}",
                        QualifiedTable::new(table.schema.clone(), name.clone()),
                        Ident(new_name.clone())
                    )
                });
                continue;
            }
        }
        match object {
            Object::Index(_, true, _) => {}
            Object::Index(None, false, _) => want(*i, format!("index {name} dropped"), &|table| {
                format!(
                    "DROP INDEX {}",
                    QualifiedTable::new(table.schema.clone(), name.clone())
                )
            }),
            Object::Index(Some(_), false, _) | Object::Check(..) => {
                let con = match object {
                    Object::Index(Some(con), _, _) => con,
                    _ => name,
                };
                want(*i, format!("constraint {con} dropped"), &|table| {
                    format!("ALTER TABLE {table} DROP CONSTRAINT {}", Ident(con.clone()))
                })
            }
        }
    }
    for ((i, name), object) in &ours {
        let Object::Check(definition, validated) = object else {
            continue;
        };
        let con = Ident(name.clone());
        let validate = |table: &QualifiedTable| format!("ALTER TABLE {table} VALIDATE CONSTRAINT {con}");
        match theirs.get(&(*i, name.clone())) {
            Some(Object::Check(d, v)) if d == definition => {
                if *validated && !v {
                    want(*i, format!("constraint {name} validated"), &validate);
                }
            }
            _ => {
                want(*i, format!("constraint {name} added"), &|table| {
                    format!("ALTER TABLE {table} ADD CONSTRAINT {con} {definition} NOT VALID")
                });
                if *validated {
                    want(*i, format!("constraint {name} validated"), &validate);
                }
            }
        }
    }
    Ok((target, wanted))
}

/// Whether the source's `ours` is what the target has as `theirs` under
/// the same name: an index, or a CHECK of the same definition (one whose
/// validation differs is validated, not dropped).
fn same_kind(ours: &Object, theirs: &Object) -> bool {
    match (ours, theirs) {
        (Object::Index(..), Object::Index(..)) => true,
        (Object::Check(a, _), Object::Check(b, _)) => a == b,
        _ => false,
    }
}

/// Whether some table of `tables` has other indexes or CHECK constraints
/// on the target than on the source (reads only).
pub(super) async fn differ(m: &Migration, tables: &[TableState]) -> Result<bool, crate::Error> {
    Ok(!plan(m, tables).await?.1.is_empty())
}

/// Makes the target's indexes and CHECK constraints of `tables` the
/// source's (see the module); returns what it changed. A statement that
/// fails (a CHECK the target's rows do not satisfy yet, a member whose
/// root's change reached it already) is logged and left for the next time.
pub(super) async fn follow(m: &Migration, tables: &[TableState]) -> Result<Vec<Constrained>, crate::Error> {
    let (target, wanted) = plan(m, tables).await?;
    Ok(super::apply_each(&target, wanted).await)
}
