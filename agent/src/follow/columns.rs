//! Columns added to or dropped from a captured table, followed on the
//! target (docs/design.md, "Schema changes during sync").
//!
//! Until the registration names the new columns, no batch applies the
//! table: each checks, in its own snapshot, that the source's columns are
//! the registered ones ([`crate::drain`]), so a row written after the
//! source's ALTER waits in its delta for the target to have its shape. Then:
//!
//! - a column **added** is added on the target with the source's type,
//!   collation, default and NOT NULL. The rows the source had then hold the
//!   value PostgreSQL stored for them at the ALTER (`attmissingval`, for a
//!   default that is not volatile, Django's and Rails' way), which the target
//!   is given as its default for its own rows, then the source's default is
//!   set; a nullable column without default holds NULL on both sides. So
//!   the rows agree without being copied. Anything else (a volatile default
//!   the source evaluated row by row, a default set after the column was
//!   added) cannot be known without reading every row: the table is emptied
//!   on the target and copied again, as `install` does after drift.
//! - a column **dropped** is dropped on the target.
//!
//! The registration then names the new columns (and the table loses its
//! ledger, whose hashes were of the old rows). Generated columns the
//! source added before them go in their place among them (the rest are
//! the drift check's: `generated.rs`). An identity column, or a change the
//! target refuses, stops sync as drift with the reason. Safe to re-run:
//! what the target has already is skipped.

use crate::control::state;
use crate::db::ident::{Ident, QualifiedTable};
use crate::db::Migration;
use crate::drain::SyncError;

/// What the source says of one column added.
struct Added {
    name: String,
    /// `format_type`, qualified.
    sql_type: String,
    not_null: bool,
    /// `COLLATE ...` when not the type's own.
    collate: Option<String>,
    /// The default's expression, qualified.
    default: Option<String>,
    /// The value the rows that existed at the ALTER hold, as a literal
    /// (`'5'` or `NULL`), when PostgreSQL stored one.
    missing: Option<String>,
    identity_or_generated: bool,
    /// Its place among the table's columns.
    attnum: i16,
}

impl Added {
    /// Whether the rows of the target, given this column as below, hold
    /// what the source's do.
    fn agrees_without_copy(&self) -> bool {
        self.missing.is_some() || (self.default.is_none() && !self.not_null)
    }

    /// `ADD COLUMN` for the rows the target holds, then its default.
    fn statements(&self, table: &QualifiedTable, copied_again: bool) -> Vec<String> {
        let name = Ident(self.name.clone());
        let collate = self
            .collate
            .as_ref()
            .map(|c| format!(" COLLATE {c}"))
            .unwrap_or_default();
        let not_null = if self.not_null { " NOT NULL" } else { "" };
        let (first_default, then) = match (&self.missing, &self.default, copied_again) {
            // Empty on the target: the definition as the source has it.
            (_, Some(d), true) => (format!(" DEFAULT {d}"), None),
            (_, None, true) => (String::new(), None),
            (Some(v), d, false) => (
                format!(" DEFAULT {v}::{}", self.sql_type),
                Some(match d {
                    Some(d) => format!("ALTER TABLE {table} ALTER COLUMN {name} SET DEFAULT {d}"),
                    None => format!("ALTER TABLE {table} ALTER COLUMN {name} DROP DEFAULT"),
                }),
            ),
            (None, _, false) => (String::new(), None),
        };
        let mut sql = vec![format!(
            "ALTER TABLE {table} ADD COLUMN {name} {}{collate}{first_default}{not_null}",
            self.sql_type
        )];
        sql.extend(then);
        sql
    }
}

/// Follows `added` or `dropped` columns of the captured table `relid` on
/// the target, and registers its columns as the source has them.
pub(super) async fn follow(
    m: &Migration,
    relid: u32,
    table: &QualifiedTable,
    added: &[String],
    dropped: &[String],
    now: &[String],
) -> Result<(), crate::Error> {
    let on_target = target_columns(m, table).await?;
    let mut sql = Vec::new();
    let mut copy_again = false;
    if !added.is_empty() {
        let wanted = read_added(m, relid, added).await?;
        if let Some(a) = wanted.iter().find(|a| a.identity_or_generated) {
            return Err(SyncError::SchemaDrift(vec![format!(
                "table {}: column {} was added as an identity column, whose values the source gave its rows in \
                 its own order, which sync does not follow: add it on the target as on the source, then run \
                 `pgferry install` and `pgferry copy`",
                table.display_name(),
                a.name
            )])
            .into());
        }
        // Decided on every added column, not only those the target lacks: a
        // partition whose root got the column on the target is copied again
        // as its root is.
        copy_again = wanted.iter().any(|a| !a.agrees_without_copy());
        let missing: Vec<&Added> = wanted.iter().filter(|a| !on_target.contains(&a.name)).collect();
        if copy_again {
            tracing::warn!(
                table = %table.display_name(),
                "A column was added with a default the source computed row by row: the table is copied again"
            );
            sql.push(format!("TRUNCATE {table}"));
        }
        // The generated columns the target lacks go in their place among
        // them (the registration does not name them: never copied), so
        // that the target's columns keep the source's order.
        let mut ordered: Vec<(i16, Vec<String>)> = missing
            .iter()
            .map(|a| (a.attnum, a.statements(table, copy_again)))
            .collect();
        let first = ordered.iter().map(|(n, _)| *n).min().unwrap_or(i16::MAX);
        for (attnum, statement) in
            super::generated::missing_before(m, relid, table, &on_target, first).await?
        {
            ordered.push((attnum, vec![statement]));
        }
        ordered.sort_by_key(|(attnum, _)| *attnum);
        sql.extend(ordered.into_iter().flat_map(|(_, s)| s));
    }
    for d in dropped.iter().filter(|d| on_target.contains(*d)) {
        sql.push(format!("ALTER TABLE {table} DROP COLUMN {}", Ident(d.clone())));
    }
    if !sql.is_empty() {
        let mut target = m.target_conn().await?;
        let tx = target
            .transaction()
            .await
            .map_err(target_err("altering the table"))?;
        for statement in &sql {
            tx.batch_execute(statement).await.map_err(|e| {
                SyncError::SchemaDrift(vec![format!(
                    "table {}: the target refused `{statement}` ({}): make the change there by hand, then run \
                     `pgferry install` and `pgferry copy`",
                    table.display_name(),
                    crate::db::errors::report(&e)
                )])
            })?;
        }
        tx.commit().await.map_err(target_err("altering the table"))?;
    }
    if !copy_again {
        // Copied again, `install` registers the columns and marks it.
        register(m, relid, now).await?;
    }
    Ok(())
}

/// Follows a column renamed on the source: renamed on the target too,
/// unless done already, and registered under its new name. Known `by_number`
/// (its attribute number kept), it is one. Known by names alone, a rename
/// is one name changed in its place; the same shape from a column dropped
/// and another added leaves a dropped column before the new one on the
/// source, and stops sync instead (following it so would keep the dropped
/// column's values under the new name).
pub(super) async fn rename(
    m: &Migration,
    relid: u32,
    table: &QualifiedTable,
    from: &str,
    to: &str,
    by_number: bool,
) -> Result<(), crate::Error> {
    if !by_number {
        refuse_a_drop_and_add(m, relid, table, from, to).await?;
    }
    let on_target = target_columns(m, table).await?;
    if on_target.iter().any(|c| c == from) && !on_target.iter().any(|c| c == to) {
        m.target_conn()
            .await?
            .batch_execute(&format!(
                "ALTER TABLE {table} RENAME COLUMN {} TO {}",
                Ident(from.to_string()),
                Ident(to.to_string())
            ))
            .await
            .map_err(target_err("renaming a column"))?;
    }
    let mut conn = m.source_conn().await?;
    let Some(t) = registration(&conn, relid).await? else {
        return Ok(());
    };
    let renamed = |cols: &[String]| -> Vec<String> {
        cols.iter()
            .map(|c| if c == from { to.to_string() } else { c.clone() })
            .collect()
    };
    let tx = tokio_postgres::Client::transaction(&mut conn)
        .await
        .map_err(SyncError::Catalog)?;
    state::set_copy_columns(&tx, t.id, &renamed(&t.copy_columns)).await?;
    state::drop_ledger(&tx, &t).await?;
    if t.key_columns.iter().any(|k| k == from) {
        // Every write to the table fails from the rename until this
        // commits: the capture functions name the key.
        tx.execute(
            "SELECT pgferry.capture_rekey($1, $2)",
            &[&t.id, &renamed(&t.key_columns)],
        )
        .await
        .map_err(SyncError::Catalog)?;
    }
    tx.commit().await.map_err(SyncError::Catalog)?;
    Ok(())
}

/// A column renamed by names alone (see [`rename`]): refused when the
/// source has a dropped column just before `to`, the mark of a column
/// dropped and another added in its place.
async fn refuse_a_drop_and_add(
    m: &Migration,
    relid: u32,
    table: &QualifiedTable,
    from: &str,
    to: &str,
) -> Result<(), crate::Error> {
    let source = m.source_conn().await?;
    let dropped_before: bool = source
        .query_one(
            "SELECT EXISTS (
                 SELECT 1 FROM pg_attribute d, pg_attribute n
                  WHERE n.attrelid = $1 AND n.attname = $2
                    AND d.attrelid = $1 AND d.attisdropped AND d.attnum < n.attnum
                    AND d.attnum > coalesce((SELECT max(p.attnum) FROM pg_attribute p
                                              WHERE p.attrelid = $1 AND p.attnum > 0 AND NOT p.attisdropped
                                                AND p.attnum < n.attnum), 0))",
            &[&relid, &to],
        )
        .await
        .map_err(SyncError::Catalog)?
        .get(0);
    drop(source);
    if dropped_before {
        return Err(SyncError::SchemaDrift(vec![format!(
            "table {}: column {from} was dropped and {to} added in its place, which sync does not follow: make \
             the same change on the target, then run `pgferry install` and `pgferry copy`",
            table.display_name()
        )])
        .into());
    }
    Ok(())
}

/// The target's columns of `table` (none when it is not there).
async fn target_columns(m: &Migration, table: &QualifiedTable) -> Result<Vec<String>, crate::Error> {
    let target = m.target_conn().await?;
    let rows = target
        .query(
            "SELECT attname::text FROM pg_attribute
              WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            &[&table.to_string()],
        )
        .await
        .map_err(target_err("reading the target's columns"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The added columns as the source defines them, names qualified, values
/// in a form any session reads back the same.
async fn read_added(m: &Migration, relid: u32, names: &[String]) -> Result<Vec<Added>, crate::Error> {
    let mut conn = m.source_conn().await?;
    let tx = conn.transaction().await.map_err(SyncError::Catalog)?;
    tx.batch_execute(
        "SET LOCAL search_path = pg_catalog; SET LOCAL DateStyle = ISO; SET LOCAL IntervalStyle = postgres;
         SET LOCAL extra_float_digits = 3",
    )
    .await
    .map_err(SyncError::Catalog)?;
    let rows = tx
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                    CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation THEN
                      (SELECT format('%I.%I', n.nspname, c.collname) FROM pg_collation c
                         JOIN pg_namespace n ON n.oid = c.collnamespace WHERE c.oid = a.attcollation)
                    END,
                    pg_get_expr(d.adbin, d.adrelid),
                    CASE WHEN c.relkind <> 'p' THEN
                      CASE WHEN a.atthasmissing THEN coalesce(quote_literal((a.attmissingval::text::text[])[1]), 'NULL') END
                    ELSE
                      -- A partitioned table stores no rows, nor a value for
                      -- them: its partitions do, each its own. Theirs when
                      -- every one holds the same.
                      (SELECT CASE WHEN count(*) = 0 THEN 'NULL'
                                   WHEN bool_and(l.m IS NOT NULL) AND count(DISTINCT l.m) = 1 THEN min(l.m) END
                         FROM (SELECT CASE WHEN la.atthasmissing
                                           THEN coalesce(quote_literal((la.attmissingval::text::text[])[1]), 'NULL') END
                                 FROM pg_partition_tree(a.attrelid) p
                                 JOIN pg_attribute la ON la.attrelid = p.relid AND la.attname = a.attname
                                WHERE p.isleaf) l(m))
                    END,
                    a.attidentity <> '' OR a.attgenerated <> '', a.attnum
               FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_type t ON t.oid = a.atttypid
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE a.attrelid = $1 AND a.attname = ANY ($2) AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&relid, &names],
        )
        .await
        .map_err(SyncError::Catalog)?;
    tx.commit().await.map_err(SyncError::Catalog)?;
    Ok(rows
        .iter()
        .map(|r| Added {
            name: r.get(0),
            sql_type: r.get(1),
            not_null: r.get(2),
            collate: r.get(3),
            default: r.get(4),
            missing: r.get(5),
            identity_or_generated: r.get(6),
            attnum: r.get(7),
        })
        .collect())
}

/// The registration's columns as the source has them `now`, the table's
/// ledger forgotten.
async fn register(m: &Migration, relid: u32, now: &[String]) -> Result<(), crate::Error> {
    let mut conn = m.source_conn().await?;
    let Some(t) = registration(&conn, relid).await? else {
        return Ok(());
    };
    let tx = tokio_postgres::Client::transaction(&mut conn)
        .await
        .map_err(SyncError::Catalog)?;
    state::set_copy_columns(&tx, t.id, now).await?;
    state::drop_ledger(&tx, &t).await?;
    tx.commit().await.map_err(SyncError::Catalog)?;
    Ok(())
}

/// The registration of the table `relid`, if it is still registered.
async fn registration(
    conn: &tokio_postgres::Client,
    relid: u32,
) -> Result<Option<state::TableState>, crate::Error> {
    Ok(state::tables(conn).await?.into_iter().find(|t| t.relid == relid))
}

fn target_err(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SyncError {
    move |source| SyncError::Follow { what, source }
}
