//! The application's rows in extensions' configuration tables.
//!
//! An extension's members (PostGIS's functions, types, views and its table
//! `spatial_ref_sys`) belong to the extension, which the target has already
//! (the RDS master user creates it there): pgferry never captures, copies,
//! grants or drops them. But the rows an application adds to a
//! configuration table, those `pg_extension_config_dump` marks for pg_dump
//! (an application-defined SRID), are its data. They are small: copied
//! before the tables' data (a generated column or a typmod may need them),
//! and again with the fence up, where they are also compared; during the
//! cutover a fence trigger refuses writes to them as to captured tables,
//! where the source role may create one (it owns the table on Heroku).
//! Cleanup removes those triggers with pgferry's others. Safe to re-run.

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::db::endpoint::Side;
use crate::db::ident::{column_list, QualifiedTable};
use crate::db::retry::Retryable;
use crate::db::Migration;

/// Failures reading or copying configuration rows.
#[derive(Debug, thiserror::Error)]
pub enum ExtensionConfigError {
    /// A statement failed on one side.
    #[error("{what} of extension configuration table {table} failed on the {side}")]
    Query {
        /// Which step.
        what: &'static str,
        /// The table.
        table: String,
        /// Which side.
        side: Side,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A session could not be opened.
    #[error(transparent)]
    Connect(#[from] crate::db::endpoint::ConnectError),
    /// The table's turn has not come (see [`crate::ddl::take_turn`]).
    #[error(transparent)]
    Turn(#[from] crate::ddl::DdlError),
}

impl Retryable for ExtensionConfigError {
    fn is_retryable(&self) -> bool {
        match self {
            ExtensionConfigError::Query { source, .. } => crate::db::errors::is_retryable(source),
            ExtensionConfigError::Connect(e) => e.is_retryable(),
            ExtensionConfigError::Turn(e) => e.is_retryable(),
        }
    }
}

impl crate::error::Failure for ExtensionConfigError {
    fn retryable(&self) -> bool {
        crate::db::retry::Retryable::is_retryable(self)
    }
}

/// One extension configuration table, as the source marks it.
#[derive(Debug, Clone)]
pub struct ConfigTable {
    /// The extension.
    pub extension: String,
    /// The table.
    pub table: QualifiedTable,
    /// `WHERE ...` selecting the application's rows (the extension's own
    /// condition, from its script); empty: every row is the application's.
    pub condition: String,
    /// Its columns, generated ones aside.
    pub columns: Vec<String>,
    /// The source role may put a fence trigger on it.
    pub can_fence: bool,
}

/// The configuration tables of the source's extensions.
pub async fn tables(source: &Client) -> Result<Vec<ConfigTable>, tokio_postgres::Error> {
    let rows = source
        .query(
            "SELECT e.extname::text, n.nspname::text, c.relname::text, coalesce(u.cond, ''),
                    ARRAY(SELECT a.attname::text FROM pg_attribute a
                           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                           ORDER BY a.attnum),
                    has_table_privilege(c.oid, 'TRIGGER')
               FROM pg_extension e
               CROSS JOIN LATERAL unnest(e.extconfig, e.extcondition) AS u(cfg, cond)
               JOIN pg_class c ON c.oid = u.cfg AND c.relkind = 'r'
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE has_table_privilege(c.oid, 'SELECT')
              ORDER BY 1, 2, 3",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ConfigTable {
            extension: r.get(0),
            table: QualifiedTable::new(r.get::<_, String>(1), r.get::<_, String>(2)),
            condition: r.get(3),
            columns: r.get(4),
            can_fence: r.get(5),
        })
        .collect())
}

/// [`tables`], its error told as this module's.
async fn list(source: &Client) -> Result<Vec<ConfigTable>, ExtensionConfigError> {
    tables(source)
        .await
        .map_err(|source| ExtensionConfigError::Query {
            what: "listing",
            table: "(all)".into(),
            side: Side::Source,
            source,
        })
}

/// Puts the fence trigger on every configuration table the source role may
/// (the one `copy_only` tables get: it refuses writes while the fence is up).
pub async fn fence(m: &Migration, cancel: &CancellationToken) -> Result<usize, crate::Error> {
    let list = list(&*m.source_conn().await?).await?;
    let mut fenced = 0;
    for t in list.iter().filter(|t| t.can_fence) {
        let what = format!("fence extension configuration table {}", t.table.display_name());
        let name = t.table.to_string();
        crate::ddl::retry_ddl(m, cancel, &what, || {
            let name = name.clone();
            async move {
                let failed = |source| ExtensionConfigError::Query {
                    what: "fencing",
                    table: t.table.display_name(),
                    side: Side::Source,
                    source,
                };
                let mut conn = m.source_conn().await?;
                let tx = conn.transaction().await.map_err(failed)?;
                // The name goes through regclass: the server quotes it.
                let sql: String = tx
                    .query_one(
                        "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname = 'pgferry_fence')
                                     THEN '' ELSE
                                format('CREATE TRIGGER pgferry_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s
                                          FOR EACH STATEMENT EXECUTE FUNCTION pgferry.fence_only();
                                        ALTER TABLE %s ENABLE ALWAYS TRIGGER pgferry_fence', $1::text::regclass, $1::text::regclass) END",
                        &[&name],
                    )
                    .await
                    .map_err(failed)?
                    .get(0);
                if !sql.is_empty() {
                    crate::ddl::take_turn(m, &tx, None, &name).await?;
                    tx.batch_execute(&sql).await.map_err(failed)?;
                }
                tx.commit().await.map_err(failed)?;
                Ok::<_, ExtensionConfigError>(())
            }
        })
        .await?;
        fenced += 1;
    }
    Ok(fenced)
}

/// Replaces the target's application rows of every configuration table
/// with the source's (in text form: these are small). Returns the rows
/// copied.
pub async fn copy(m: &Migration) -> Result<u64, crate::Error> {
    let source = m.source_conn().await?;
    let mut target = m.target_conn().await?;
    let list = list(&source).await?;
    let mut copied = 0;
    for t in &list {
        let err = |what, side| {
            let table = t.table.display_name();
            move |source| ExtensionConfigError::Query {
                what,
                table,
                side,
                source,
            }
        };
        let cols = column_list(&t.columns, None);
        let tx = target.transaction().await.map_err(err("copying", Side::Target))?;
        // The condition is the extension's own SQL, from its script.
        tx.batch_execute(&format!("DELETE FROM ONLY {} {}", t.table, t.condition))
            .await
            .map_err(err("clearing", Side::Target))?;
        let sink = tx
            .copy_in(&format!("COPY {} ({cols}) FROM STDIN", t.table))
            .await
            .map_err(err("copying", Side::Target))?;
        let stream = source
            .copy_out(&format!(
                "COPY (SELECT {cols} FROM ONLY {} {}) TO STDOUT",
                t.table, t.condition
            ))
            .await
            .map_err(err("copying", Side::Source))?;
        let (rows, _) = crate::rows::pump(stream, sink, &crate::db::throttle::Throttle::unlimited(), |_| {})
            .await
            .map_err(|e| match e {
                crate::rows::Pumped::Source(e) => err("copying", Side::Source)(e),
                crate::rows::Pumped::Target(e) => err("copying", Side::Target)(e),
            })?;
        tx.commit().await.map_err(err("copying", Side::Target))?;
        if rows > 0 {
            tracing::info!(extension = %t.extension, table = %t.table.display_name(), rows, "Application rows of an extension's configuration table copied");
        }
        copied += rows;
    }
    Ok(copied)
}

/// The configuration tables whose application rows differ between the two
/// sides, by name.
pub async fn differences(m: &Migration) -> Result<Vec<String>, crate::Error> {
    let source = m.source_conn().await?;
    let target = m.target_conn().await?;
    let list = list(&source).await?;
    let mut differ = Vec::new();
    for t in &list {
        let cols = column_list(&t.columns, None);
        let sql = format!(
            "SELECT coalesce(array_agg(r ORDER BY r), '{{}}') FROM (SELECT ROW({cols})::text AS r FROM ONLY {} {}) s",
            t.table, t.condition
        );
        let (a, b) = tokio::try_join!(
            read_rows(&source, &sql, t, Side::Source),
            read_rows(&target, &sql, t, Side::Target)
        )?;
        if a != b {
            differ.push(format!(
                "{} ({} application row(s) on the source, {} on the target)",
                t.table.display_name(),
                a.len(),
                b.len()
            ));
        }
    }
    Ok(differ)
}

/// The application rows of `t` on one side, as sorted text.
async fn read_rows(
    c: &Client,
    sql: &str,
    t: &ConfigTable,
    side: Side,
) -> Result<Vec<String>, ExtensionConfigError> {
    c.query_one(sql, &[])
        .await
        .map(|r| r.get::<_, Vec<String>>(0))
        .map_err(|source| ExtensionConfigError::Query {
            what: "comparing",
            table: t.table.display_name(),
            side,
            source,
        })
}
