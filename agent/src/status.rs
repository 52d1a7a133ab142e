//! Status: phase, per-table progress, backlog and lag. Reads only.

use serde::Serialize;

use crate::control::state::{self, CopyState, Phase};
use crate::db::Migration;

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
    /// Seconds since the snapshot of the last completed batch; none once
    /// cut over (the application writes to the target).
    pub lag_secs: Option<f64>,
    /// Size of the table on the source, indexes and TOAST included.
    pub size_bytes: i64,
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
    /// Seconds the fence has been up, blocking the application's writes:
    /// none once cut over, when the fence stays up on the old source but
    /// the application writes to the target (a post-switch step, such as
    /// validating foreign keys, would otherwise have its sampler report a
    /// fence held for minutes, and `PgferryFenceHeldTooLong` fire).
    pub fence_secs: Option<f64>,
    /// Age in transactions of the oldest snapshot pgferry holds on the source.
    pub source_xmin_age: i64,
    /// Disk used by pgferry's control schema and delta tables.
    pub delta_storage_bytes: i64,
    /// `forward` (source to target), or `reverse` after a cutover with
    /// `cutover.fallback`, while the old source follows the new database.
    pub direction: &'static str,
    /// The way back, while the old source follows the target.
    pub reverse: Option<crate::fallback::ReverseStatus>,
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
            fence_secs: None,
            source_xmin_age: 0,
            delta_storage_bytes: 0,
            direction: "forward",
            reverse: None,
            tables: Vec::new(),
        });
    };
    let tables = state::tables(&**conn).await?;
    let backlog = crate::drain::backlog(&conn, &tables).await?;
    let fence_raised = crate::cutover::fence::is_raised(&**conn)
        .await
        .map_err(crate::cutover::CutoverError::Source)?;
    let source_err = crate::cutover::CutoverError::Source;
    let relids: Vec<u32> = tables.iter().map(|t| t.relid).collect();
    let row = conn
        .query_one(
            "SELECT coalesce((SELECT max(age(backend_xmin)) FROM pg_stat_activity
                               WHERE application_name = 'pgferry' AND datname = current_database()), 0)::int8,
                    coalesce((SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c
                               WHERE c.relnamespace = to_regnamespace('pgferry') AND c.relkind IN ('r', 'S')), 0)::int8,
                    coalesce((SELECT array_agg(coalesce(pg_total_relation_size(r), 0) ORDER BY o)
                                FROM unnest($1::oid[]) WITH ORDINALITY AS u(r, o)), '{}')",
            &[&relids],
        )
        .await
        .map_err(source_err)?;
    let (source_xmin_age, delta_storage_bytes, sizes): (i64, i64, Vec<i64>) =
        (row.get(0), row.get(1), row.get(2));
    let switched = run.phase == Phase::CutOver;
    // A way back that cannot be read now is said as none: status reads.
    let reverse = if switched {
        match crate::fallback::reverse_status(m).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %crate::db::errors::report(&e), "The way back could not be read");
                None
            }
        }
    } else {
        None
    };
    let tables: Vec<TableStatus> = tables
        .into_iter()
        .zip(backlog)
        .zip(sizes)
        .map(|((t, backlog_rows), size_bytes)| TableStatus {
            table: t.table.display_name(),
            copy_state: t.copy_state,
            copied_rows: t.copied_rows,
            backlog_rows,
            applied_rows: t.applied_rows,
            lag_secs: t.lag_secs.filter(|_| !switched),
            size_bytes,
        })
        .collect();
    Ok(Status {
        phase: Some(run.phase),
        fence_raised,
        writes_blocked_ms: run.writes_blocked_ms,
        backlog_rows: tables.iter().map(|t| t.backlog_rows).sum(),
        max_lag_secs: tables.iter().filter_map(|t| t.lag_secs).reduce(f64::max),
        fence_secs: run.fence_age_secs.filter(|_| fence_raised && !switched),
        source_xmin_age,
        delta_storage_bytes,
        direction: if reverse.is_some() { "reverse" } else { "forward" },
        reverse,
        tables,
    })
}

/// Samples the source every `interval` for the metrics, until cancelled.
/// A failed sample is logged and skipped: metrics never stop the migration.
pub async fn sample_forever(
    m: Migration,
    interval: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut known: Vec<String> = Vec::new();
    loop {
        match read(&m).await {
            Ok(s) => {
                let names: Vec<String> = s.tables.iter().map(|t| t.table.clone()).collect();
                if names != known {
                    crate::telemetry::register_counters(&names);
                    known = names;
                }
                crate::telemetry::sampled(&crate::telemetry::Sample {
                    phase: s.phase.map(crate::control::state::Phase::as_str),
                    tables: s
                        .tables
                        .iter()
                        .map(|t| {
                            (
                                t.table.clone(),
                                t.copy_state == CopyState::Done,
                                t.backlog_rows,
                                t.lag_secs,
                                t.size_bytes,
                            )
                        })
                        .collect(),
                    fence: s.fence_secs.or(s.fence_raised.then_some(0.0)),
                    source_connections: m.source_sessions(),
                    xmin_age: s.source_xmin_age,
                    delta_bytes: s.delta_storage_bytes,
                    reverse: s
                        .reverse
                        .as_ref()
                        .map(|r| (r.backlog_rows, r.lag_secs.unwrap_or(0.0))),
                });
            }
            Err(e) => tracing::debug!(error = %crate::db::errors::report(&e), "Metrics sample skipped"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
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
        if let Some(r) = &self.reverse {
            let _ = writeln!(
                out,
                "way back: the old source follows the target{}; backlog {} rows; lag {}",
                if r.target_fenced {
                    " (target fenced: switchback under way)"
                } else {
                    ""
                },
                r.backlog_rows,
                r.lag_secs.map_or("-".into(), |l| format!("{l:.1} s"))
            );
        }
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
