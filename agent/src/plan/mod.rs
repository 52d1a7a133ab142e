//! The migration plan: which source tables move, by which key, with which
//! columns; and the preflight that refuses what cannot move.
//!
//! Assumes nothing on entry; reads catalogs only, changes nothing anywhere.
//! Safe to run at any time and as often as wanted.

mod check;
mod compat;
pub mod drift;
mod health;
mod scan;

pub use scan::scan;

pub use health::{recommended_storage_gb, suggested_instance_class, Sizing};

pub use check::{check, check_with, CheckReport, Problem, Severity, DRIFT};

use serde::Serialize;
use tokio_postgres::GenericClient;

use crate::control::state::Registration;
use crate::db::ident::QualifiedTable;
use crate::db::Migration;

/// One user table on the source, as the catalog describes it.
#[derive(Debug, Clone, Serialize)]
pub struct SourceTable {
    /// OID on the source.
    pub relid: u32,
    /// The table.
    pub table: QualifiedTable,
    /// `r` plain table, `p` partitioned table.
    pub relkind: String,
    /// A partitioned table (root or intermediate).
    pub partitioned: bool,
    /// Inherits from more than one parent (not supported).
    pub multiple_inheritance: bool,
    /// Its parent in classic (non-partition) inheritance.
    pub parent_relid: Option<u32>,
    /// The root of its partition hierarchy (itself when not a partition).
    pub lock_relid: u32,
    /// Key columns (primary key, else the narrowest unique NOT NULL index).
    pub key_columns: Option<Vec<String>>,
    /// Non-generated columns, in attribute order.
    pub copy_columns: Vec<String>,
    /// Their attribute numbers.
    pub copy_attnums: Vec<i16>,
    /// The planner's row estimate (-1 when never analyzed).
    pub est_rows: i64,
    /// Size on disk including indexes and TOAST.
    pub total_bytes: i64,
    /// The session may create triggers on it.
    pub can_trigger: bool,
    /// The session may read it.
    pub can_select: bool,
}

impl SourceTable {
    /// What capture registers for this table: synced by its key, or copied
    /// whole under the fence when it is listed under `copy_only`; `None`
    /// when it has no key and is not listed.
    pub fn registration(&self, copy_only: &[String]) -> Option<Registration> {
        let listed = copy_only.contains(&self.table.display_name());
        Some(Registration {
            relid: self.relid,
            table: self.table.clone(),
            key_columns: if listed {
                Vec::new()
            } else {
                self.key_columns.clone()?
            },
            copy_columns: self.copy_columns.clone(),
            copy_only: listed,
            partitioned: self.partitioned,
            lock_relid: self.lock_relid,
            parent_relid: self.parent_relid,
        })
    }

    /// The key as registered: none for a copy_only table.
    pub fn registered_key(&self, copy_only: &[String]) -> Vec<String> {
        if copy_only.contains(&self.table.display_name()) {
            Vec::new()
        } else {
            self.key_columns.clone().unwrap_or_default()
        }
    }
}

/// Every user table of the current database, excluding system schemas,
/// pgferry's own schema and tables that belong to extensions.
///
/// With `sizes`, each table's total size, which takes a lock on it (and
/// waits, up to lock_timeout, behind a VACUUM FULL or an ALTER); without,
/// 0, and the catalog is all it reads: the drift check runs every pass.
pub async fn source_tables(
    client: &impl GenericClient,
    sizes: bool,
) -> Result<Vec<SourceTable>, tokio_postgres::Error> {
    let rows = client
        .query(
            r"
SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text,
       c.relkind = 'p',
       (SELECT count(*) > 1 FROM pg_inherits i WHERE i.inhrelid = c.oid),
       (SELECT i.inhparent FROM pg_inherits i WHERE i.inhrelid = c.oid AND NOT c.relispartition LIMIT 1),
       (WITH RECURSIVE up(rel) AS (SELECT c.oid UNION SELECT i.inhparent FROM pg_inherits i JOIN up ON i.inhrelid = up.rel)
        SELECT rel FROM up WHERE NOT EXISTS (SELECT 1 FROM pg_inherits i2 WHERE i2.inhrelid = up.rel) LIMIT 1),
       key.cols,
       coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''),
                '{}'::text[]),
       coalesce((SELECT array_agg(a.attnum ORDER BY a.attnum) FROM pg_attribute a
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''),
                '{}'::int2[]),
       c.reltuples::bigint,
       CASE WHEN $1 THEN pg_total_relation_size(c.oid) ELSE 0 END,
       has_table_privilege(c.oid, 'TRIGGER'),
       has_table_privilege(c.oid, 'SELECT')
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN LATERAL (
        SELECT array_agg(a.attname::text ORDER BY k.ord) AS cols
          FROM (SELECT i.indkey, i.indnkeyatts
                  FROM pg_index i
                 WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid
                   AND i.indpred IS NULL AND i.indexprs IS NULL
                   AND (i.indisprimary OR NOT EXISTS (
                          SELECT 1 FROM pg_attribute a2
                           WHERE a2.attrelid = c.oid AND a2.attnum = ANY (i.indkey::int2[]) AND NOT a2.attnotnull))
                 ORDER BY i.indisprimary DESC, i.indnkeyatts, i.indexrelid
                 LIMIT 1) best
         CROSS JOIN LATERAL unnest(best.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
         WHERE k.ord <= best.indnkeyatts
       ) key ON true
 WHERE c.relkind IN ('r', 'p')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry')
   AND n.nspname NOT LIKE 'pg\_%'
   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
 ORDER BY n.nspname, c.relname",
            &[&sizes],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| SourceTable {
            relid: r.get(0),
            table: QualifiedTable::new(r.get::<_, String>(1), r.get::<_, String>(2)),
            relkind: r.get(3),
            partitioned: r.get(4),
            multiple_inheritance: r.get(5),
            parent_relid: r.get(6),
            lock_relid: r.get(7),
            key_columns: r.get(8),
            copy_columns: r.get(9),
            copy_attnums: r.get(10),
            est_rows: r.get(11),
            total_bytes: r.get(12),
            can_trigger: r.get(13),
            can_select: r.get(14),
        })
        .collect())
}

/// Major version (e.g. 15) of the connected server.
pub async fn server_major(client: &impl GenericClient) -> Result<u32, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?;
    Ok(row.get::<_, i32>(0) as u32 / 10_000)
}

/// User objects in the target database (the first few names), to refuse a
/// non-empty target before anything is written to it.
pub async fn user_objects(client: &impl GenericClient) -> Result<(i64, Vec<String>), tokio_postgres::Error> {
    let row = client
        .query_one(
            r"
WITH objs AS (
  SELECT format('%s %I.%I',
                CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'v' THEN 'view'
                               WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence'
                               WHEN 'f' THEN 'foreign table' ELSE 'relation' END,
                n.nspname, c.relname) AS name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
     AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_%'
     AND NOT EXISTS (SELECT 1 FROM pg_depend d
                      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
  UNION ALL
  SELECT format('function %I.%I', n.nspname, p.proname)
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_%'
     AND NOT EXISTS (SELECT 1 FROM pg_depend d
                      WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
  UNION ALL
  SELECT format('schema %I', n.nspname)
    FROM pg_namespace n
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'public') AND n.nspname NOT LIKE 'pg\_%'
     AND NOT EXISTS (SELECT 1 FROM pg_depend d
                      WHERE d.classid = 'pg_namespace'::regclass AND d.objid = n.oid AND d.deptype = 'e')
)
SELECT count(*), coalesce((SELECT array_agg(name) FROM (SELECT name FROM objs ORDER BY name LIMIT 5) s), '{}')
  FROM objs",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// The preflight of `install`, which is the remedy for schema drift and so
/// proceeds past it.
pub async fn preflight_for(m: &Migration, installing: bool) -> Result<CheckReport, crate::Error> {
    let report = check_with(m, false).await;
    let blockers = if installing {
        report.blockers_but_drift()
    } else {
        report.blockers()
    };
    if blockers > 0 {
        eprint!("{}", report.render());
        return Err(crate::Error::CheckFailed(blockers));
    }
    Ok(report)
}
