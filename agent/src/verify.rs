//! Verification: source and target compared table by table.
//!
//! Each table gets a row count and an order-independent checksum (the sum of a
//! 64-bit hash of every row's text form, computed by each server in identical
//! session settings). A table that differs also gets the list of its differing
//! keys, when it is small enough to list. Reads only; safe at any time, but
//! only meaningful when the source is quiet (after the fence, or after
//! cutover).

use std::collections::HashMap;

use serde::Serialize;
use tokio::task::JoinSet;

use crate::endpoint::Side;
use crate::ident::{column_list, QualifiedTable};
use crate::migration::Migration;

/// Above this many rows a differing table is reported without its keys.
const MAX_ROWS_FOR_KEY_DIFF: i64 = 1_000_000;
/// At most this many differing keys are listed per table.
const MAX_KEYS_LISTED: usize = 20;

/// Verification failures (not mismatches: those are results).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A checksum query failed.
    #[error("could not checksum {table} on the {side}")]
    Query {
        /// The table.
        table: String,
        /// Which side.
        side: Side,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Reading the source catalog failed.
    #[error("could not list the source tables")]
    Catalog(#[source] tokio_postgres::Error),
    /// A session could not be opened.
    #[error(transparent)]
    Connect(#[from] crate::endpoint::ConnectError),
    /// A worker task panicked.
    #[error("a verification worker stopped unexpectedly")]
    Worker(#[source] tokio::task::JoinError),
}

/// What to compare: a table and its key.
#[derive(Debug, Clone)]
pub struct Subject {
    /// The table.
    pub table: QualifiedTable,
    /// Its key columns.
    pub key_columns: Vec<String>,
}

/// One table's result.
#[derive(Debug, Clone, Serialize)]
pub struct TableVerdict {
    /// `schema.name`.
    pub table: String,
    /// Rows on the source.
    pub source_rows: i64,
    /// Rows on the target.
    pub target_rows: i64,
    /// Counts and checksums agree.
    pub equal: bool,
    /// Keys whose rows differ or exist on one side only (first few).
    pub differing_keys: Vec<String>,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Per table.
    pub tables: Vec<TableVerdict>,
    /// Tables that differ.
    pub mismatches: usize,
    /// Rows compared on the source.
    pub rows: i64,
}

/// Compares every user table of the source with the target.
pub async fn verify_all(m: &Migration) -> Result<VerifyReport, VerifyError> {
    let conn = m.source_conn().await?;
    let subjects: Vec<Subject> = crate::plan::source_tables(&**conn)
        .await
        .map_err(VerifyError::Catalog)?
        .into_iter()
        .map(|t| Subject {
            key_columns: t.key_columns.unwrap_or_default(),
            table: t.table,
        })
        .collect();
    drop(conn);
    verify(m, subjects).await
}

/// Compares the given tables, a few at a time.
pub async fn verify(m: &Migration, subjects: Vec<Subject>) -> Result<VerifyReport, VerifyError> {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(m.sync_workers()));
    let mut tasks = JoinSet::new();
    for (i, s) in subjects.into_iter().enumerate() {
        let (m, permits) = (m.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("never closed");
            compare(&m, &s).await.map(|v| (i, v))
        });
    }
    let mut verdicts = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        verdicts.push(joined.map_err(VerifyError::Worker)??);
    }
    verdicts.sort_by_key(|(i, _)| *i);
    let tables: Vec<TableVerdict> = verdicts.into_iter().map(|(_, v)| v).collect();
    Ok(VerifyReport {
        mismatches: tables.iter().filter(|t| !t.equal).count(),
        rows: tables.iter().map(|t| t.source_rows).sum(),
        tables,
    })
}

async fn compare(m: &Migration, s: &Subject) -> Result<TableVerdict, VerifyError> {
    let sql = format!(
        "SELECT count(*), coalesce(sum(hashtextextended(ROW(r.*)::text, 0)::numeric), 0)::text FROM ONLY {} AS r",
        s.table
    );
    let (src, tgt) = (m.source_conn().await?, m.target_conn().await?);
    let err = |side| {
        let table = s.table.display_name();
        move |source| VerifyError::Query { table, side, source }
    };
    let (a, b) = tokio::join!(src.query_one(&sql, &[]), tgt.query_one(&sql, &[]));
    let (a, b) = (a.map_err(err(Side::Source))?, b.map_err(err(Side::Target))?);
    let (source_rows, target_rows): (i64, i64) = (a.get(0), b.get(0));
    let equal = source_rows == target_rows && a.get::<_, String>(1) == b.get::<_, String>(1);
    let mut differing_keys = Vec::new();
    if !equal && !s.key_columns.is_empty() && source_rows.max(target_rows) <= MAX_ROWS_FOR_KEY_DIFF {
        let keys = column_list(&s.key_columns, Some("r"));
        let sql = format!(
            "SELECT ROW({keys})::text, hashtextextended(ROW(r.*)::text, 0) FROM ONLY {} AS r",
            s.table
        );
        let (a, b) = tokio::join!(src.query(&sql, &[]), tgt.query(&sql, &[]));
        let (a, b) = (a.map_err(err(Side::Source))?, b.map_err(err(Side::Target))?);
        let mut theirs: HashMap<String, i64> = b.iter().map(|r| (r.get(0), r.get(1))).collect();
        for r in &a {
            let key: String = r.get(0);
            match theirs.remove(&key) {
                Some(h) if h == r.get::<_, i64>(1) => {}
                Some(_) => differing_keys.push(format!("{key} differs")),
                None => differing_keys.push(format!("{key} missing on target")),
            }
        }
        differing_keys.extend(theirs.into_keys().map(|k| format!("{k} only on target")));
        differing_keys.sort();
        differing_keys.truncate(MAX_KEYS_LISTED);
    }
    Ok(TableVerdict {
        table: s.table.display_name(),
        source_rows,
        target_rows,
        equal,
        differing_keys,
    })
}

impl VerifyReport {
    /// The report as an operator reads it.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for t in &self.tables {
            let verdict = if t.equal { "equal" } else { "DIFFERS" };
            let _ = writeln!(
                out,
                "{verdict:<8} {} (source {} rows, target {} rows)",
                t.table, t.source_rows, t.target_rows
            );
            for k in &t.differing_keys {
                let _ = writeln!(out, "         key {k}");
            }
        }
        let _ = writeln!(
            out,
            "{} table(s), {} row(s) compared, {} differ",
            self.tables.len(),
            self.rows,
            self.mismatches
        );
        out
    }
}
