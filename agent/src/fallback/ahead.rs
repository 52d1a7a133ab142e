//! The way back's verification ahead of the target's fence
//! (`cutover.verify = "changed"`, docs/design.md, "Fallback"): what the
//! switchback does before its catch-up, and what `pgferry fallback` does
//! while it follows, so that the switchback finds it done.

use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::apply::{checking_pass, Check};
use super::{query_err, FallbackError};
use crate::control::state::{self, TableState};
use crate::db::endpoint::Side;
use crate::db::Migration;
use crate::drain::{ledger_keys, unit_pages, Ahead, SETTLE_ROUNDS, SMALL_UNIT_PAGES};
use crate::verify::{TableVerdict, VerifyReport};

/// What a verification ahead did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Verified {
    /// Tables compared in full.
    pub tables: usize,
    /// Changed rows compared again by their ledgers' keys.
    pub changed_rows: i64,
    /// How long it took, in milliseconds.
    pub ms: u64,
}

/// Each unit of the target's tables (see [`crate::verify::ahead_units`])
/// with a table without its ledger is compared in full in the snapshot of
/// a pass of the way back, which then gives it its ledgers; large units
/// one pass each (the pass lock is held while both sides are read, so the
/// way back waits meanwhile), small ones a hundred to a pass. Then, as the
/// forward cutover does, the units whose ledgers hold more than
/// `cutover.max_keys_under_fence` keys are compared by them, which empties
/// them, for at most [`SETTLE_ROUNDS`] rounds: the fence then compares only
/// what changed since. A table that differs is an error
/// ([`FallbackError::Aborted`], as a mismatch), its ledgers dropped.
pub async fn verify_ahead(
    m: &Migration,
    tables: &[TableState],
    cancel: &CancellationToken,
) -> Result<Verified, crate::Error> {
    let started = Instant::now();
    let mut done = Verified::default();
    let back = m.reversed();
    let target_err = || query_err("reading the ledgers", Side::Target);
    let conn = back.source_conn().await?;
    let ledgers = state::ledgers(&**conn).await.map_err(target_err())?;
    let units: Vec<Vec<TableState>> = crate::verify::ahead_units(tables)
        .into_iter()
        .filter(|u| !u.iter().all(|t| ledgers.contains(&t.id)))
        .collect();
    let pages = unit_pages(&conn, &units).await.map_err(target_err())?;
    drop(conn);
    let (small, large): (Vec<_>, Vec<_>) = units
        .into_iter()
        .zip(pages)
        .partition(|(_, pages)| *pages <= SMALL_UNIT_PAGES);
    let mut groups: Vec<Vec<Vec<TableState>>> = large.into_iter().map(|(u, _)| vec![u]).collect();
    let small: Vec<Vec<TableState>> = small.into_iter().map(|(u, _)| u).collect();
    groups.extend(small.chunks(100).map(<[_]>::to_vec));
    let mut verdicts = Vec::new();
    for units in &groups {
        verdicts.extend(pass_comparing(m, units, Ahead::All, cancel).await?);
    }
    for v in &verdicts {
        tracing::info!(table = %v.table, equal = v.equal, rows = v.source_rows, "Verified ahead of the target's fence");
    }
    done.tables = verdicts.len();
    equal_ahead(verdicts)?;
    for _ in 0..SETTLE_ROUNDS {
        let mut busy = ledger_keys(&**back.source_conn().await?, tables)
            .await
            .map_err(target_err())?;
        busy.retain(|(_, keys)| *keys > m.cfg.cutover.max_keys_under_fence);
        if busy.is_empty() {
            break;
        }
        let units: Vec<Vec<TableState>> = busy.into_iter().map(|(u, _)| u).collect();
        let verdicts = pass_comparing(m, &units, Ahead::Ledger, cancel).await?;
        for v in &verdicts {
            tracing::info!(table = %v.table, equal = v.equal, rows = v.source_rows, "Changed rows verified ahead of the target's fence");
            done.changed_rows += v.source_rows;
        }
        equal_ahead(verdicts)?;
    }
    done.ms = started.elapsed().as_millis() as u64;
    Ok(done)
}

/// How long to wait for another agent's pass before trying again.
const BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// A pass of the way back that compares `units` once it applied, waiting
/// for another agent's pass in flight.
async fn pass_comparing(
    m: &Migration,
    units: &[Vec<TableState>],
    ahead: Ahead,
    cancel: &CancellationToken,
) -> Result<Vec<TableVerdict>, crate::Error> {
    let check = Check { units, ahead };
    loop {
        if let Some((_, verdicts)) = checking_pass(m, Some(&check)).await? {
            return Ok(verdicts);
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(crate::Error::Cancelled),
            () = tokio::time::sleep(BUSY_PAUSE) => {}
        }
    }
}

/// Verdicts reached ahead of the target's fence: a table that differs is
/// a mismatch.
fn equal_ahead(verdicts: Vec<TableVerdict>) -> Result<(), FallbackError> {
    let report = VerifyReport::of(verdicts);
    if report.mismatches > 0 {
        return Err(FallbackError::Aborted {
            why: format!(
                "the verification ahead of the target's fence found {}",
                differences(&report)
            ),
            mismatch: true,
        });
    }
    Ok(())
}

/// `N differing table(s): t (a rows on the target, b on the old source;
/// keys ...), ...`, of a comparison made through the migration reversed.
pub fn differences(report: &VerifyReport) -> String {
    let differ: Vec<String> = report
        .tables
        .iter()
        .filter(|t| !t.equal)
        .map(|t| {
            // Compared through the migration reversed: its target is the
            // old source.
            let keys: Vec<String> = t
                .differing_keys
                .iter()
                .take(5)
                .map(|k| match k.strip_suffix(" on target") {
                    Some(k) => format!("{k} on the old source"),
                    None => k.clone(),
                })
                .collect();
            format!(
                "{} ({} rows on the target, {} on the old source{})",
                t.table,
                t.source_rows,
                t.target_rows,
                if keys.is_empty() {
                    String::new()
                } else {
                    format!("; keys {}", keys.join(", "))
                }
            )
        })
        .collect();
    format!("{} differing table(s): {}", report.mismatches, differ.join(", "))
}
