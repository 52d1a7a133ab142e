//! Cleanup: removes every pgferry object from the source and the target.
//!
//! Works from the catalogs alone, so it needs no local state and no intact
//! control schema: capture triggers are found by their function's schema and
//! dropped one table per transaction with the source's `lock_timeout` and
//! retries; then the control schema goes with `DROP SCHEMA ... CASCADE`.
//! Dropping the triggers also lifts a fence that is still up. Safe to re-run.
//!
//! After a finished cutover, cleanup first leaves a marker on the target
//! (table `pgferry.finished`, naming the source database) and removes it
//! last: a run killed after the source's control schema went (so nothing on
//! the source says the migration finished) is recognised by the next
//! `migrate`, which completes the cleanup and exits 0 instead of starting
//! afresh against the new production database ([`finished_marker`]).

use tokio_util::sync::CancellationToken;

use crate::control::SCHEMA;
use crate::db::ident::{Ident, QualifiedTable};
use crate::db::retry::Retryable;
use crate::db::Migration;
use crate::ddl::retry_ddl;

/// Cleanup failures.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// A session could not be opened.
    #[error(transparent)]
    Connect(#[from] crate::db::endpoint::ConnectError),
    /// A statement failed on one side.
    #[error("{what} failed on the {side}")]
    Query {
        /// Which step.
        what: String,
        /// Which side.
        side: crate::db::endpoint::Side,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl Retryable for CleanupError {
    fn is_retryable(&self) -> bool {
        match self {
            CleanupError::Query { source, .. } => crate::db::errors::is_retryable(source),
            CleanupError::Connect(e) => e.is_retryable(),
        }
    }
}

impl crate::error::Failure for CleanupError {
    fn retryable(&self) -> bool {
        crate::db::retry::Retryable::is_retryable(self)
    }
}

/// What cleanup removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CleanupReport {
    /// Capture triggers dropped on the source.
    pub triggers_dropped: usize,
    /// The control schema was dropped on the source.
    pub source_schema_dropped: bool,
    /// A stray pgferry schema was dropped on the target.
    pub target_schema_dropped: bool,
    /// No target URL was given: only the source was cleaned.
    pub target_skipped: bool,
}

/// A finished migration whose cleanup was interrupted, as its marker on the
/// target tells it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finished {
    /// The source database it was migrated from.
    pub source_database: String,
    /// When its cleanup began, after the cutover (RFC 3339).
    pub finished_at: String,
}

/// The source's database name and OID: what the marker names.
async fn source_identity(source: &tokio_postgres::Client) -> Result<(String, u32), tokio_postgres::Error> {
    let row = source
        .query_one(
            "SELECT current_database()::text, oid FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Leaves the marker of a finished migration on the target.
async fn mark_finished(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
) -> Result<(), CleanupError> {
    use crate::db::endpoint::Side;
    let (name, oid) = source_identity(source)
        .await
        .map_err(|source| CleanupError::Query {
            what: "reading the source's identity".into(),
            side: Side::Source,
            source,
        })?;
    let q = |source| CleanupError::Query {
        what: "marking the migration finished".into(),
        side: Side::Target,
        source,
    };
    target
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS pgferry;
             CREATE TABLE IF NOT EXISTS pgferry.finished (
                 source_database text NOT NULL, source_database_oid oid NOT NULL,
                 finished_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(q)?;
    target
        .execute(
            "INSERT INTO pgferry.finished (source_database, source_database_oid)
             SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM pgferry.finished)",
            &[&name, &oid],
        )
        .await
        .map_err(q)?;
    Ok(())
}

/// The marker of a finished migration of this source whose cleanup did not
/// complete, if the target holds one.
pub async fn finished_marker(m: &Migration) -> Result<Option<Finished>, crate::Error> {
    use crate::db::endpoint::Side;
    let q = |what: &str, side| {
        let what = what.to_string();
        move |source| CleanupError::Query { what, side, source }
    };
    let target = m.target_conn().await?;
    let row = target
        .query_one("SELECT to_regclass('pgferry.finished') IS NOT NULL", &[])
        .await
        .map_err(q("looking for the finished marker", Side::Target))?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let marker = target
        .query_opt(
            "SELECT source_database, source_database_oid, to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
               FROM pgferry.finished LIMIT 1",
            &[],
        )
        .await
        .map_err(q("reading the finished marker", Side::Target))?;
    drop(target);
    let Some(marker) = marker else { return Ok(None) };
    let source = m.source_conn().await?;
    let identity = source_identity(&source)
        .await
        .map_err(q("reading the source's identity", Side::Source))?;
    let (name, oid): (String, u32) = (marker.get(0), marker.get(1));
    Ok((identity == (name.clone(), oid)).then(|| Finished {
        source_database: name,
        finished_at: marker.get(2),
    }))
}

/// The objects of pgferry's left in one database.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Leftovers {
    /// `table trigger` pairs whose function lives in schema pgferry, or named pgferry_*.
    pub triggers: Vec<String>,
    /// Whether a schema named pgferry exists.
    pub schema: bool,
    /// Functions named pgferry* outside that schema.
    pub functions: Vec<String>,
}

impl Leftovers {
    /// True when nothing of pgferry's is left.
    pub fn is_empty(&self) -> bool {
        self.triggers.is_empty() && !self.schema && self.functions.is_empty()
    }
}

/// Lists what of pgferry's is left in a database.
pub async fn leftovers(client: &tokio_postgres::Client) -> Result<Leftovers, tokio_postgres::Error> {
    let triggers = client
        .query(
            "SELECT n.nspname::text, c.relname::text, t.tgname::text
               FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_proc p ON p.oid = t.tgfoid
               JOIN pg_namespace pn ON pn.oid = p.pronamespace
              WHERE pn.nspname = $1 OR t.tgname LIKE 'pgferry\\_%'
              ORDER BY 1, 2, 3",
            &[&SCHEMA],
        )
        .await?
        .iter()
        .map(|r| {
            format!(
                "{}.{} {}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2)
            )
        })
        .collect();
    let schema = client
        .query_one("SELECT to_regnamespace($1) IS NOT NULL", &[&SCHEMA])
        .await?
        .get(0);
    let functions = client
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE p.proname LIKE 'pgferry%' AND n.nspname <> $1",
            &[&SCHEMA],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Leftovers {
        triggers,
        schema,
        functions,
    })
}

/// Removes pgferry from both sides.
pub async fn run(m: &Migration, cancel: &CancellationToken) -> Result<CleanupReport, crate::Error> {
    use crate::db::endpoint::Side;
    let mut report = CleanupReport::default();
    let source = m.source_conn().await?;
    // Before the source's last record of the migration goes.
    if m.has_target()
        && crate::control::state::load(&**source)
            .await?
            .is_some_and(|r| r.phase == crate::control::state::Phase::CutOver)
    {
        mark_finished(&source, &*m.target_conn().await?).await?;
    }
    let q = |what: &str, side| {
        let what = what.to_string();
        move |source| CleanupError::Query { what, side, source }
    };
    report.triggers_dropped = remove_capture(m, cancel).await?;
    crate::failpoint::hit("cleanup.before_schema_drop").await;
    let drop_schema = format!("DROP SCHEMA IF EXISTS {} CASCADE", Ident(SCHEMA.into()));
    let had_schema = leftovers(&source)
        .await
        .map_err(q("looking for the control schema", Side::Source))?
        .schema;
    if had_schema {
        let sql = &drop_schema;
        retry_ddl(m, cancel, "drop the control schema", || async move {
            m.source_conn()
                .await?
                .batch_execute(sql)
                .await
                .map_err(q("drop the control schema", Side::Source))
        })
        .await?;
        report.source_schema_dropped = true;
    }
    crate::failpoint::hit("cleanup.after_source_schema_drop").await;
    if !m.has_target() {
        tracing::warn!(
            "No target URL was given: only the source was cleaned; run `pgferry cleanup` with --target to remove \
             pgferry's leftovers there too"
        );
        report.target_skipped = true;
        return Ok(report);
    }
    let target = m.target_conn().await?;
    let had_schema = leftovers(&target)
        .await
        .map_err(q("looking for pgferry objects", Side::Target))?
        .schema;
    if had_schema {
        target
            .batch_execute(&drop_schema)
            .await
            .map_err(q("drop the pgferry schema", Side::Target))?;
        report.target_schema_dropped = true;
    }
    Ok(report)
}

/// Drops the capture triggers on `m`'s source, one table per transaction
/// with the source's `lock_timeout` and retries (which lifts a fence that
/// is still up). Returns how many it dropped.
pub async fn remove_capture(m: &Migration, cancel: &CancellationToken) -> Result<usize, crate::Error> {
    let rows = m
        .source_conn()
        .await?
        .query(
            "SELECT DISTINCT n.nspname::text, c.relname::text, t.tgname::text
               FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_proc p ON p.oid = t.tgfoid
               JOIN pg_namespace pn ON pn.oid = p.pronamespace
              WHERE pn.nspname = $1
              ORDER BY 1, 2, 3",
            &[&SCHEMA],
        )
        .await
        .map_err(|source| CleanupError::Query {
            what: "listing capture triggers".into(),
            side: m.source.side(),
            source,
        })?;
    let mut by_table: Vec<(QualifiedTable, Vec<String>)> = Vec::new();
    for r in &rows {
        let table = QualifiedTable::new(r.get::<_, String>(0), r.get::<_, String>(1));
        let trigger: String = r.get(2);
        match by_table.last_mut() {
            Some((t, names)) if *t == table => names.push(trigger),
            _ => by_table.push((table, vec![trigger])),
        }
    }
    let mut dropped = 0;
    for (table, names) in &by_table {
        crate::ddl::drop_triggers(m, cancel, &table.to_string(), names).await?;
        dropped += names.len();
        tracing::info!(table = %table.display_name(), "Capture removed");
        crate::failpoint::hit("cleanup.table_done").await;
    }
    Ok(dropped)
}
