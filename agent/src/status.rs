//! Status: phase, per-table progress, backlog and lag. Reads only.

use serde::Serialize;

use crate::migration::Migration;
use crate::state::{self, CopyState, Phase};

/// One table's line.
#[derive(Debug, Clone, Serialize)]
pub struct TableStatus {
    /// `schema.name`.
    pub table: String,
    /// Copy progress.
    pub copy_state: CopyState,
    /// Rows copied.
    pub copied_rows: Option<i64>,
    /// Unconsumed delta rows.
    pub backlog_rows: i64,
    /// Rows written by the drain.
    pub applied_rows: i64,
    /// Seconds since the snapshot of the last completed batch.
    pub lag_secs: Option<f64>,
}

/// The whole status.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Phase, or none when no migration is under way.
    pub phase: Option<Phase>,
    /// Whether the fence is up.
    pub fence_raised: bool,
    /// How long writes were blocked by a finished cutover.
    pub writes_blocked_ms: Option<i64>,
    /// Sum of the backlogs.
    pub backlog_rows: i64,
    /// Largest table lag.
    pub max_lag_secs: Option<f64>,
    /// Per table.
    pub tables: Vec<TableStatus>,
}

/// Reads the status from the source.
pub async fn read(m: &Migration) -> Result<Status, crate::Error> {
    let conn = m.source_conn().await?;
    let Some(run) = state::load(&**conn).await? else {
        return Ok(Status {
            phase: None,
            fence_raised: false,
            writes_blocked_ms: None,
            backlog_rows: 0,
            max_lag_secs: None,
            tables: Vec::new(),
        });
    };
    let tables = state::tables(&**conn).await?;
    let backlog = crate::sync::backlog(&conn, &tables).await?;
    let fence_raised = crate::cutover::fence::is_raised(&conn)
        .await
        .map_err(crate::cutover::CutoverError::Source)?;
    let tables: Vec<TableStatus> = tables
        .into_iter()
        .zip(backlog)
        .map(|(t, backlog_rows)| TableStatus {
            table: t.table.display_name(),
            copy_state: t.copy_state,
            copied_rows: t.copied_rows,
            backlog_rows,
            applied_rows: t.applied_rows,
            lag_secs: t.lag_secs,
        })
        .collect();
    Ok(Status {
        phase: Some(run.phase),
        fence_raised,
        writes_blocked_ms: run.writes_blocked_ms,
        backlog_rows: tables.iter().map(|t| t.backlog_rows).sum(),
        max_lag_secs: tables.iter().filter_map(|t| t.lag_secs).reduce(f64::max),
        tables,
    })
}

impl Status {
    /// The status as an operator reads it.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let Some(phase) = self.phase else {
            return "no migration is under way on this source\n".into();
        };
        let _ = writeln!(
            out,
            "phase {}{}; backlog {} rows; lag {}",
            phase.as_str(),
            if self.fence_raised {
                " (fence up: source writes blocked)"
            } else {
                ""
            },
            self.backlog_rows,
            self.max_lag_secs.map_or("-".into(), |l| format!("{l:.1} s"))
        );
        for t in &self.tables {
            let _ = writeln!(
                out,
                "  {:<40} copy {:<7} copied {:>10}  backlog {:>8}  applied {:>10}  lag {}",
                t.table,
                format!("{:?}", t.copy_state).to_lowercase(),
                t.copied_rows.map_or("-".into(), |r| r.to_string()),
                t.backlog_rows,
                t.applied_rows,
                t.lag_secs.map_or("-".into(), |l| format!("{l:.1} s"))
            );
        }
        out
    }
}
