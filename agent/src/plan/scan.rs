//! `check --scan`: reads every row of every table, TOAST included, and
//! reports the rows that cannot be read (with table and ctid), before a copy
//! would fail on them halfway through.
//!
//! Each table is read with one `COPY ... TO STDOUT` (binary, so every value
//! is detoasted), `copy.workers` tables at a time, under the copy's rate
//! limit. A table that fails is searched by page ranges, then row by row
//! inside the failing ranges.

use futures_util::StreamExt;

use super::{Problem, Severity};
use crate::db::ident::QualifiedTable;
use crate::db::Migration;

/// Pages checked at once while searching a failing table.
const PAGES_PER_PROBE: i64 = 128;
/// Unreadable rows reported per table at most.
const MAX_ROWS: usize = 100;

/// One row that cannot be read.
#[derive(Debug, Clone)]
pub struct Unreadable {
    /// The table.
    pub table: QualifiedTable,
    /// Its ctid.
    pub ctid: String,
    /// What the server said.
    pub error: String,
}

/// Scans every user table; returns one blocker per unreadable row.
pub async fn scan(m: &Migration) -> Result<Vec<Problem>, crate::Error> {
    let conn = m.source_conn().await?;
    let tables = super::source_tables(&**conn, false)
        .await
        .map_err(crate::db::errors::StatementFailed::source)?;
    drop(conn);
    let found = crate::parallel::Limit::new(m.copy_workers())
        .run_all(tables, None, |t| {
            let m = m.clone();
            async move { scan_table(&m, &t.table).await }
        })
        .await?;
    let problems = found
        .into_iter()
        .flatten()
        .map(|u| Problem {
            severity: Severity::Blocker,
            subject: u.table.display_name(),
            message: format!("the row at ctid {} cannot be read: {}", u.ctid, u.error),
            fix: "restore that row from a backup, or delete it (DELETE ... WHERE ctid = ...); the copy would fail on it"
                .into(),
        })
        .collect();
    Ok(problems)
}

async fn scan_table(m: &Migration, table: &QualifiedTable) -> Result<Vec<Unreadable>, crate::Error> {
    let c = m.source.connect().await?;
    let read_all = async {
        let stream = c
            .copy_out(&format!(
                "COPY (SELECT * FROM ONLY {table}) TO STDOUT (FORMAT binary)"
            ))
            .await?;
        futures_util::pin_mut!(stream);
        while let Some(chunk) = stream.next().await {
            m.copy_throttle.take(chunk?.len() as u64).await;
        }
        Ok::<(), tokio_postgres::Error>(())
    };
    match read_all.await {
        Ok(()) => Ok(Vec::new()),
        Err(e) if e.as_db_error().is_some() => {
            tracing::warn!(table = %table.display_name(), error = %crate::db::errors::db_message(&e), "Unreadable data: searching for the rows");
            locate(&c, table)
                .await
                .map_err(|e| crate::db::errors::StatementFailed::source(e).into())
        }
        Err(e) => Err(crate::db::errors::StatementFailed::source(e).into()),
    }
}

/// Finds the unreadable rows: page ranges first, then each row of a range
/// that fails.
async fn locate(
    c: &tokio_postgres::Client,
    table: &QualifiedTable,
) -> Result<Vec<Unreadable>, tokio_postgres::Error> {
    let pages: i64 = c
        .query_one(
            "SELECT pg_relation_size($1::text::regclass) / current_setting('block_size')::int8",
            &[&table.to_string()],
        )
        .await?
        .get(0);
    let mut found = Vec::new();
    let range = "ctid >= format('(%s,0)', $1::int8)::tid AND ctid < format('(%s,0)', $2::int8)::tid";
    let mut first = 0;
    while first < pages && found.len() < MAX_ROWS {
        let last = (first + PAGES_PER_PROBE).min(pages);
        let probe = format!("SELECT count(length(ROW(t.*)::text)) FROM ONLY {table} AS t WHERE {range}");
        if c.query_one(&probe, &[&first, &last]).await.is_err() {
            let ctids = c
                .query(
                    &format!("SELECT ctid::text FROM ONLY {table} WHERE {range} ORDER BY ctid"),
                    &[&first, &last],
                )
                .await?;
            for r in ctids {
                let ctid: String = r.get(0);
                let one = format!(
                    "SELECT length(ROW(t.*)::text) FROM ONLY {table} AS t WHERE ctid = $1::text::tid"
                );
                if let Err(e) = c.query_one(&one, &[&ctid]).await {
                    found.push(Unreadable {
                        table: table.clone(),
                        ctid,
                        error: crate::db::errors::db_message(&e),
                    });
                    if found.len() >= MAX_ROWS {
                        break;
                    }
                }
            }
        }
        first = last;
    }
    Ok(found)
}
