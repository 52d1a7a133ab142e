//! Keys and indexes, built on the target after its data, in parallel.
//!
//! Definitions come from the source catalog (`pg_get_indexdef`,
//! `pg_get_constraintdef`, read with `search_path = pg_catalog` so every name
//! is qualified). Each index is one statement, skipped when an object of that
//! name exists: an interrupted build resumes with what is missing, and a
//! killed agent leaves no child process behind. Primary keys and unique
//! constraints are attached to their already-built index (`USING INDEX`), so
//! they cost nothing extra; exclusion constraints and NOT VALID checks are
//! added as constraints. Materialized views' indexes are built the same way.

use std::collections::HashMap;

use super::CopyError;
use crate::db::ident::{Ident, QualifiedTable};
use crate::db::Migration;

/// One index of a captured table (or materialized view), and the constraint
/// it backs, if any.
#[derive(Debug, Clone)]
pub struct IndexDef {
    /// The table.
    pub table: QualifiedTable,
    /// Index name (same schema as the table).
    pub name: String,
    /// `CREATE [UNIQUE] INDEX ...`, names qualified.
    pub definition: String,
    /// Build order: 0 for plain tables and partitions, then partitioned
    /// tables from the deepest level up (each phase waits for the previous).
    pub phase: i32,
    /// Constraint backed by this index: name and `PRIMARY KEY` / `UNIQUE`.
    pub constraint: Option<(String, &'static str, String)>,
}

/// A constraint added by definition (exclusion, NOT VALID check).
#[derive(Debug, Clone)]
pub struct ConstraintDef {
    /// The table.
    pub table: QualifiedTable,
    /// Constraint name.
    pub name: String,
    /// `EXCLUDE ...` / `CHECK (...) NOT VALID` / a partitioned key.
    pub definition: String,
    /// `ALTER TABLE ONLY` (false for a partitioned table, where it recurses).
    pub only: bool,
}

fn target_err(source: tokio_postgres::Error) -> CopyError {
    CopyError::Target {
        what: "building keys and indexes",
        source,
    }
}

/// The source's materialized views (outside pgferry's schema and
/// extensions): created empty on the target with the pre-data, they get
/// their indexes with the tables' and their rows at cutover.
pub async fn materialized_views(m: &Migration) -> Result<Vec<u32>, CopyError> {
    let conn = m.source_conn().await?;
    let rows = conn
        .query(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'm' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry')
                AND n.nspname NOT LIKE 'pg\\_%'
                AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')",
            &[],
        )
        .await
        .map_err(CopyError::catalog)?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What the source catalog says of some tables' keys and indexes.
#[derive(Debug, Default)]
pub struct Definitions {
    /// The indexes (with the keys they back).
    pub indexes: Vec<IndexDef>,
    /// The constraints added by definition.
    pub constraints: Vec<ConstraintDef>,
    /// Each table's clustered index and replica identity, made the
    /// target's once every index exists.
    pub marks: HashMap<QualifiedTable, Marks>,
    /// The source's invalid indexes, which are not built (`"schema"."index"
    /// on "schema"."table"`): left by a CREATE INDEX CONCURRENTLY that failed, or still
    /// running.
    pub invalid: Vec<String>,
}

/// What [`build`] did.
#[derive(Debug, Default)]
pub struct Built {
    /// Indexes built.
    pub indexes: usize,
    /// [`Definitions::invalid`]: not built.
    pub invalid: Vec<String>,
}

/// What pg_dump says of a table along with an index (`CLUSTER ON`,
/// `REPLICA IDENTITY USING INDEX`) or with the table (`REPLICA IDENTITY
/// FULL`/`NOTHING`), as the catalog has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marks {
    /// The index the table is clustered on.
    pub clustered: Option<String>,
    /// `relreplident` (`d`, `n`, `f` or `i`).
    pub identity: String,
    /// The replica identity index, with `i`.
    pub identity_index: Option<String>,
}

/// Every relation's [`Marks`], the relations filtered by what follows.
const MARKS: &str = "SELECT n.nspname::text, c.relname::text, c.relreplident::text,
                            (SELECT ic.relname::text FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                              WHERE i.indrelid = c.oid AND i.indisclustered),
                            (SELECT ic.relname::text FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                              WHERE i.indrelid = c.oid AND i.indisreplident)
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.oid = ANY ";

fn marks_of(rows: &[tokio_postgres::Row]) -> HashMap<QualifiedTable, Marks> {
    rows.iter()
        .map(|r| {
            (
                QualifiedTable::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                Marks {
                    identity: r.get(2),
                    clustered: r.get(3),
                    identity_index: r.get(4),
                },
            )
        })
        .collect()
}

/// The statements that give each table of `target` the source's marks:
/// set where the source gained one since the copy, unset where it dropped
/// one (`SET WITHOUT CLUSTER`, `REPLICA IDENTITY DEFAULT`), nothing where
/// both agree.
pub fn mark_statements(
    source: &HashMap<QualifiedTable, Marks>,
    target: &HashMap<QualifiedTable, Marks>,
) -> Vec<String> {
    let mut statements = Vec::new();
    for (table, theirs) in source {
        let Some(ours) = target.get(table) else {
            continue;
        };
        if theirs.clustered != ours.clustered {
            statements.push(match &theirs.clustered {
                Some(index) => format!("ALTER TABLE ONLY {table} CLUSTER ON {}", Ident(index.clone())),
                None => format!("ALTER TABLE ONLY {table} SET WITHOUT CLUSTER"),
            });
        }
        if (&theirs.identity, &theirs.identity_index) != (&ours.identity, &ours.identity_index) {
            let identity = match (theirs.identity.as_str(), &theirs.identity_index) {
                ("i", Some(index)) => format!("USING INDEX {}", Ident(index.clone())),
                ("n", _) => "NOTHING".into(),
                ("f", _) => "FULL".into(),
                _ => "DEFAULT".into(),
            };
            statements.push(format!("ALTER TABLE ONLY {table} REPLICA IDENTITY {identity}"));
        }
    }
    statements.sort();
    statements
}

/// Builds on the target every index and constraint of `tables` and of the
/// materialized views that it lacks: after the copy, all of them; at
/// cutover, those the source gained since (an index added during a sync
/// of days). Returns how many indexes it built.
pub async fn build_all(
    m: &Migration,
    tables: &[crate::control::state::TableState],
) -> Result<Built, crate::Error> {
    let mut relids: Vec<u32> = tables.iter().map(|t| t.relid).collect();
    relids.extend(materialized_views(m).await?);
    let defs = read(m, &relids).await?;
    build(m, defs).await
}

/// Reads the index and constraint definitions of `relids` from the source.
pub async fn read(m: &Migration, relids: &[u32]) -> Result<Definitions, CopyError> {
    let mut conn = m.source_conn().await?;
    let src = CopyError::catalog;
    let tx = conn.transaction().await.map_err(src)?;
    tx.batch_execute("SET LOCAL search_path = pg_catalog")
        .await
        .map_err(src)?;
    let indexes = tx
        .query(
            "SELECT n.nspname::text, c.relname::text, ic.relname::text, pg_get_indexdef(i.indexrelid),
                    con.conname::text, con.contype::text, con.condeferrable, con.condeferred,
                    c.relkind = 'p',
                    CASE WHEN con.oid IS NOT NULL THEN pg_get_constraintdef(con.oid) END,
                    (SELECT count(*) FROM pg_partition_ancestors(c.oid))::int4,
                    -- As pg_dump: not an index a failed (or running) CREATE
                    -- INDEX CONCURRENTLY left invalid (a unique one would
                    -- fail on the same rows); a partitioned one is invalid
                    -- until every partition has its own.
                    i.indisvalid OR c.relkind = 'p'
               FROM pg_index i
               JOIN pg_class ic ON ic.oid = i.indexrelid
               JOIN pg_class c ON c.oid = i.indrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_constraint con
                      ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u', 'x')
              WHERE i.indrelid = ANY ($1::oid[]) AND coalesce(con.contype, '') <> 'x'
              ORDER BY n.nspname, c.relname, ic.relname",
            &[&relids],
        )
        .await
        .map_err(src)?;
    let constraints = tx
        .query(
            "SELECT n.nspname::text, c.relname::text, con.conname::text, pg_get_constraintdef(con.oid)
               FROM pg_constraint con
               JOIN pg_class c ON c.oid = con.conrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE con.conrelid = ANY ($1::oid[]) AND con.conislocal
                AND (con.contype = 'x' OR (con.contype = 'c' AND NOT con.convalidated))
              ORDER BY 1, 2, 3",
            &[&relids],
        )
        .await
        .map_err(src)?;
    let marks = marks_of(
        &tx.query(&format!("{MARKS}($1::oid[])"), &[&relids])
            .await
            .map_err(src)?,
    );
    tx.commit().await.map_err(src)?;
    let (indexes, invalid): (Vec<_>, Vec<_>) = indexes.into_iter().partition(|r| r.get::<_, bool>(11));
    let invalid = invalid
        .iter()
        .map(|r| {
            let schema: String = r.get(0);
            format!(
                "{} on {}",
                QualifiedTable::new(schema.clone(), r.get::<_, String>(2)),
                QualifiedTable::new(schema, r.get::<_, String>(1))
            )
        })
        .collect();
    let mut partitioned_keys = Vec::new();
    let indexes = indexes
        .iter()
        .filter(|r| {
            // A partitioned table's key: ALTER TABLE ... ADD CONSTRAINT
            // (USING INDEX cannot), which adopts the keys its partitions
            // have by then under their own names, as pg_restore's ALTER
            // INDEX ... ATTACH PARTITION does; it would make missing ones
            // under names of its choosing.
            let partitioned: bool = r.get(8);
            match (partitioned, r.get::<_, Option<String>>(4)) {
                (true, Some(name)) => {
                    partitioned_keys.push((
                        r.get::<_, i32>(10),
                        ConstraintDef {
                            table: QualifiedTable::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                            name,
                            definition: r.get::<_, Option<String>>(9).unwrap_or_default(),
                            only: false,
                        },
                    ));
                    false
                }
                _ => true,
            }
        })
        .map(|r| {
            let table = QualifiedTable::new(r.get::<_, String>(0), r.get::<_, String>(1));
            let constraint = r.get::<_, Option<String>>(4).map(|name| {
                let kind = if r.get::<_, Option<String>>(5).as_deref() == Some("p") {
                    "PRIMARY KEY"
                } else {
                    "UNIQUE"
                };
                let timing = match (r.get::<_, Option<bool>>(6), r.get::<_, Option<bool>>(7)) {
                    (Some(true), Some(true)) => " DEFERRABLE INITIALLY DEFERRED",
                    (Some(true), _) => " DEFERRABLE",
                    _ => "",
                };
                (name, kind, timing.to_string())
            });
            let partitioned: bool = r.get(8);
            let definition: String = r.get(3);
            IndexDef {
                table,
                name: r.get(2),
                // Without ONLY, so it attaches the partitions' indexes
                // (built before it, under their source names).
                definition: if partitioned {
                    definition.replacen(" ON ONLY ", " ON ", 1)
                } else {
                    definition
                },
                // Deepest partitioned tables first: a partitioned index attaches the
                // ones below it, which must exist by then.
                phase: if partitioned {
                    1_000 - r.get::<_, i32>(10)
                } else {
                    0
                },
                constraint,
            }
        })
        .collect();
    // The deepest first: each adopts the keys of the level below it.
    partitioned_keys.sort_by_key(|(depth, _)| std::cmp::Reverse(*depth));
    let constraints = partitioned_keys
        .into_iter()
        .map(|(_, key)| key)
        .chain(constraints.iter().map(|r| ConstraintDef {
            table: QualifiedTable::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            name: r.get(2),
            definition: r.get(3),
            only: true,
        }))
        .collect();
    Ok(Definitions {
        indexes,
        constraints,
        marks,
        invalid,
    })
}

/// Of `defs`, what the target lacks, in one read of its catalog: at
/// cutover, everything usually exists already, and asking about each index
/// took a few round trips apiece (5.5 s for 2,000 tables). An index built
/// whose key was not attached yet (a crash in between) stays in.
async fn lacking(
    t: &tokio_postgres::Client,
    mut defs: Definitions,
) -> Result<Definitions, tokio_postgres::Error> {
    let rows = t
        .query(
            "SELECT n.nspname::text, c.relname::text, NULL::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('i', 'I')
             UNION ALL
             SELECT n.nspname::text, c.relname::text, con.conname::text
               FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace",
            &[],
        )
        .await?;
    let mut indexes = std::collections::HashSet::new();
    let mut constraints = std::collections::HashSet::new();
    for r in rows {
        let (schema, relation): (String, String) = (r.get(0), r.get(1));
        match r.get::<_, Option<String>>(2) {
            Some(name) => constraints.insert((schema, relation, name)),
            None => indexes.insert((schema, relation)),
        };
    }
    let has_constraint = |table: &QualifiedTable, name: &str| {
        constraints.contains(&(table.schema.clone(), table.name.clone(), name.to_string()))
    };
    defs.indexes.retain(|i| match &i.constraint {
        Some((name, _, _)) => !has_constraint(&i.table, name),
        None => !indexes.contains(&(i.table.schema.clone(), i.name.clone())),
    });
    defs.constraints.retain(|c| !has_constraint(&c.table, &c.name));
    Ok(defs)
}

/// True when the target has a constraint of that name on that table.
pub(crate) async fn constraint_exists(
    c: &tokio_postgres::Client,
    table: &QualifiedTable,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = $1::text::regclass AND conname = $2)",
            &[&table.to_string(), &name],
        )
        .await?;
    Ok(row.get(0))
}

/// Builds one index (and attaches its constraint) unless it exists.
async fn build_one(m: &Migration, idx: &IndexDef) -> Result<bool, CopyError> {
    let t = m.target_conn().await?;
    t.batch_execute(&format!(
        "SET maintenance_work_mem = '{}MB'",
        m.cfg.copy.index_maintenance_work_mem_mb
    ))
    .await
    .map_err(target_err)?;
    let qualified = QualifiedTable::new(idx.table.schema.clone(), idx.name.clone()).to_string();
    let exists: bool = t
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified])
        .await
        .map_err(target_err)?
        .get(0);
    let mut built = false;
    if let Some((con, _, _)) = &idx.constraint {
        // USING INDEX renames the index to the constraint's name.
        if constraint_exists(&t, &idx.table, con).await.map_err(target_err)? {
            return Ok(false);
        }
    }
    if !exists {
        let started = std::time::Instant::now();
        t.batch_execute(&idx.definition).await.map_err(target_err)?;
        tracing::info!(index = %idx.name, table = %idx.table.display_name(), secs = started.elapsed().as_secs_f64(), "Index built");
        built = true;
    }
    if let Some((con, kind, timing)) = &idx.constraint {
        t.batch_execute(&format!(
            "ALTER TABLE ONLY {} ADD CONSTRAINT {} {kind} USING INDEX {}{timing}",
            idx.table,
            Ident(con.clone()),
            Ident(idx.name.clone())
        ))
        .await
        .map_err(target_err)?;
    }
    crate::failpoint::hit("copy.index_done").await;
    Ok(built)
}

/// Builds one table's indexes (and the keys they back) right after its
/// data, `permits` at a time across all tables. Returns how many it built.
pub async fn build_table(
    m: &Migration,
    indexes: Vec<IndexDef>,
    limit: crate::parallel::Limit,
) -> Result<usize, crate::Error> {
    build_with(m, indexes, limit).await
}

/// Builds `indexes` in parallel, `copy.workers` at a time.
async fn build_phase(m: &Migration, indexes: Vec<IndexDef>) -> Result<usize, crate::Error> {
    build_with(m, indexes, crate::parallel::Limit::new(m.cfg.copy.workers)).await
}

async fn build_with(
    m: &Migration,
    indexes: Vec<IndexDef>,
    limit: crate::parallel::Limit,
) -> Result<usize, crate::Error> {
    let built = limit
        .run_all(indexes, None, |idx| {
            let m = m.clone();
            async move {
                let never = tokio_util::sync::CancellationToken::new();
                match crate::db::retry::retry(m.retry_policy(), "index", "build an index", &never, || {
                    build_one(&m, &idx)
                })
                .await
                {
                    Ok(b) => Ok(b),
                    Err(crate::db::retry::Gave::Up(e)) => Err(e),
                    Err(crate::db::retry::Gave::Cancelled) => unreachable!("the token is never cancelled"),
                }
            }
        })
        .await?;
    Ok(built.into_iter().filter(|b| *b).count())
}

/// Builds every missing index and constraint, `copy.workers` at a time,
/// then gives each table the source's clustered index and replica
/// identity. The source's invalid indexes are not built: each is logged
/// as a warning, for the operator to build once the CREATE INDEX
/// CONCURRENTLY that left it so succeeds.
pub async fn build(m: &Migration, defs: Definitions) -> Result<Built, crate::Error> {
    for index in &defs.invalid {
        tracing::warn!(
            index,
            "An index is INVALID on the source (a CREATE INDEX CONCURRENTLY failed or still runs): not built \
             on the target; build it there once it is valid on the source"
        );
    }
    let defs = lacking(&**m.target_conn().await?, defs)
        .await
        .map_err(target_err)?;
    if !defs.indexes.is_empty() || !defs.constraints.is_empty() {
        tracing::info!(
            indexes = defs.indexes.len(),
            constraints = defs.constraints.len(),
            "Building the keys and indexes the target lacks"
        );
    }
    let mut phases: std::collections::BTreeMap<i32, Vec<IndexDef>> = Default::default();
    for i in defs.indexes {
        phases.entry(i.phase).or_default().push(i);
    }
    let mut built = 0;
    // Partitions' indexes first, then the partitioned indexes that attach
    // them, level by level up to the roots.
    for (_, phase) in phases {
        built += build_phase(m, phase).await?;
    }
    let t = m.target_conn().await?;
    // [`lacking`] left only the constraints the target has not.
    for c in defs.constraints {
        t.batch_execute(&format!(
            "ALTER TABLE {}{} ADD CONSTRAINT {} {}",
            if c.only { "ONLY " } else { "" },
            c.table,
            Ident(c.name.clone()),
            c.definition
        ))
        .await
        .map_err(target_err)?;
    }
    let names: Vec<String> = defs.marks.keys().map(|t| t.to_string()).collect();
    let ours = t
        .query(
            &format!("{MARKS}(ARRAY(SELECT to_regclass(r)::oid FROM unnest($1::text[]) r))"),
            &[&names],
        )
        .await
        .map_err(target_err)?;
    for mark in mark_statements(&defs.marks, &marks_of(&ours)) {
        t.batch_execute(&mark).await.map_err(target_err)?;
    }
    Ok(Built {
        indexes: built,
        invalid: defs.invalid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(clustered: Option<&str>, identity: &str, index: Option<&str>) -> Marks {
        Marks {
            clustered: clustered.map(Into::into),
            identity: identity.into(),
            identity_index: index.map(Into::into),
        }
    }

    #[test]
    fn the_targets_marks_become_the_sources_set_or_unset() {
        let t = |name: &str| QualifiedTable::new("public", name);
        let source = HashMap::from([
            (t("same"), marks(Some("same_pkey"), "i", Some("same_pkey"))),
            (t("unclustered"), marks(None, "d", None)),
            (t("clustered"), marks(Some("Odd Name"), "d", None)),
            (t("identity dropped"), marks(None, "d", None)),
            (t("identity full"), marks(None, "f", None)),
            (t("identity index"), marks(None, "i", Some("other_key"))),
            (t("not on the target"), marks(Some("x"), "n", None)),
        ]);
        let target = HashMap::from([
            (t("same"), marks(Some("same_pkey"), "i", Some("same_pkey"))),
            (t("unclustered"), marks(Some("unclustered_pkey"), "d", None)),
            (t("clustered"), marks(Some("clustered_pkey"), "d", None)),
            (t("identity dropped"), marks(None, "i", Some("dropped_pkey"))),
            (t("identity full"), marks(None, "n", None)),
            (t("identity index"), marks(None, "i", Some("identity_pkey"))),
        ]);
        assert_eq!(
            mark_statements(&source, &target),
            [
                r#"ALTER TABLE ONLY "public"."clustered" CLUSTER ON "Odd Name""#,
                r#"ALTER TABLE ONLY "public"."identity dropped" REPLICA IDENTITY DEFAULT"#,
                r#"ALTER TABLE ONLY "public"."identity full" REPLICA IDENTITY FULL"#,
                r#"ALTER TABLE ONLY "public"."identity index" REPLICA IDENTITY USING INDEX "other_key""#,
                r#"ALTER TABLE ONLY "public"."unclustered" SET WITHOUT CLUSTER"#,
            ]
        );
    }
}
