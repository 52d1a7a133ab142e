//! Verification ahead of the fence (`cutover.verify = "changed"`): a batch
//! that leaves the target equal to a unit as of its snapshot, compares the
//! two there, and keeps the unit's ledger of the keys changed since.

use std::time::Duration;

use deadpool_postgres::Object;
use tokio_util::sync::CancellationToken;

use super::batch::{apply, batch_err, begin, consume, drain_table, record, seen};
use super::{BatchStats, SyncError};
use crate::control::state::TableState;
use crate::db::endpoint::Side;
use crate::db::retry::{retry, Gave};
use crate::db::Migration;
use crate::verify::TableVerdict;

/// What a verification ahead of the fence compares (see [`verify_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ahead {
    /// Every row: the unit gets its ledgers.
    All,
    /// The rows whose keys the unit's ledgers (and the deltas of the batch)
    /// name: its ledgers start again from the batch's snapshot.
    Ledger,
}

/// One batch of every table of `unit` (see [`ahead_units`]) in one source
/// snapshot S and one target transaction, which leaves the target equal to
/// the unit as of S; then, with the unit's lock still held so that nothing
/// else writes it, every table holding rows compared in full in S. When all
/// are equal, each table of the unit gets its ledger in S, and from then on
/// each batch moves the deltas it consumes there instead of deleting them:
/// every key that changed since S. With the fence up, the cutover then
/// compares only those keys' rows.
///
/// With [`Ahead::Ledger`], only the rows whose keys the ledgers and the
/// batch's deltas name are compared in S, and when equal the ledgers are
/// emptied in S: what the fence then compares is what changed since S, not
/// since the first verification, which at hundreds of gigabytes began long
/// before. A batch that rewrote a table whole (a TRUNCATE) compares all.
pub(crate) async fn verify_batch(
    m: &Migration,
    source: &mut Object,
    unit: &[TableState],
    ahead: Ahead,
) -> Result<BatchStats, SyncError> {
    let first = &unit[0];
    let started = std::time::Instant::now();
    let stx = begin(source, &unit.iter().collect::<Vec<_>>())
        .await
        .map_err(|e| batch_err(first, Side::Source, e))?;
    let mut seens = Vec::with_capacity(unit.len());
    for t in unit {
        seens.push(
            seen(&stx, t, None)
                .await
                .map_err(|e| batch_err(t, Side::Source, e))?,
        );
    }
    // S is taken: what commits from now on is for the next batch.
    crate::failpoint::hit("sync.verify_snapshot").await;
    let mut target = m.target_conn().await?;
    let ttx = target
        .transaction()
        .await
        .map_err(|e| batch_err(first, Side::Target, e))?;
    let mut applied = Vec::with_capacity(unit.len());
    for (t, seen) in unit.iter().zip(&seens) {
        applied.push(if seen.pending() {
            apply(m, &stx, &ttx, t, unit, None, seen).await?
        } else {
            BatchStats::default()
        });
    }
    ttx.commit()
        .await
        .map_err(|e| batch_err(first, Side::Target, e))?;
    let rewritten = applied.iter().any(|a| a.truncated || a.recopied);
    // A ledger dropped since (it grew past its limit) leaves all to compare.
    let ledgers: Vec<String> = unit.iter().map(|t| t.ledger_table().to_string()).collect();
    let by_ledger = ahead == Ahead::Ledger
        && !rewritten
        && stx
            .query_one(
                "SELECT bool_and(to_regclass(l) IS NOT NULL) FROM unnest($1::text[]) l",
                &[&ledgers],
            )
            .await
            .map_err(|e| batch_err(first, Side::Source, e))?
            .get::<_, Option<bool>>(0)
            .unwrap_or(false);
    let mut verdicts = Vec::new();
    if by_ledger {
        let verdict = crate::verify::compare_changed_on(&*stx, &mut target, unit, !first.partitioned)
            .await
            .map_err(|e| match e {
                crate::verify::VerifyError::Query { side, source, .. } => batch_err(first, side, source),
                other => SyncError::Verify(Box::new(other)),
            })?;
        verdicts.push(verdict);
    }
    for t in unit.iter().filter(|t| !t.partitioned && !by_ledger) {
        let subject = crate::verify::Subject::of(t);
        let verdict = crate::verify::compare_on(&*stx, &**target, &subject, crate::verify::Rows::All)
            .await
            .map_err(|e| match e {
                crate::verify::VerifyError::Query { side, source, .. } => batch_err(t, side, source),
                other => SyncError::Verify(Box::new(other)),
            })?;
        verdicts.push(verdict);
    }
    crate::failpoint::hit("sync.verified_ahead").await;
    let equal = verdicts.iter().all(|v| v.equal);
    for (t, seen) in unit.iter().zip(&seens) {
        // Nothing else writes the ledger while the batch lock is held.
        stx.batch_execute(&ledger_after(t, equal, by_ledger))
            .await
            .map_err(|e| batch_err(t, Side::Source, e))?;
        consume(&stx, t, None, seen, false, false)
            .await
            .map_err(|e| batch_err(t, Side::Source, e))?;
    }
    stx.commit()
        .await
        .map_err(|e| batch_err(first, Side::Source, e))?;
    let mut total = BatchStats::default();
    for ((t, seen), stats) in unit.iter().zip(&seens).zip(&applied) {
        record(source, t, None, seen, stats, started).await?;
        total.keys += stats.keys;
        total.rows_deleted += stats.rows_deleted;
        total.rows_written += stats.rows_written;
        total.truncated |= stats.truncated;
        total.recopied |= stats.recopied;
    }
    total.verified = Some(verdicts);
    Ok(total)
}

/// What a verification ahead leaves of `t`'s ledger, as statements: equal
/// by its ledger, the ledger emptied; equal in full, a new empty one;
/// different, none (the table is compared in full again).
pub(crate) fn ledger_after(t: &TableState, equal: bool, by_ledger: bool) -> String {
    let ledger = t.ledger_table();
    if equal && by_ledger {
        return format!("DELETE FROM {ledger}");
    }
    let mut sql = format!("DROP TABLE IF EXISTS {ledger};");
    if equal {
        // Unique, so that a key changed in batch after batch (a hot row)
        // is there once.
        let keys = t.delta_key_list();
        sql += &format!(
            "CREATE TABLE {ledger} AS SELECT {keys} FROM {} WITH NO DATA;
             CREATE UNIQUE INDEX ON {ledger} ({keys});",
            t.delta_table()
        );
    }
    sql
}

/// Units of at most this many pages (by the catalog's last count, all
/// their tables together) are verified ahead of a fence several at a time
/// (the cutover's, and the switchback's): each takes milliseconds.
pub(crate) const SMALL_UNIT_PAGES: i64 = 128;

/// Each unit's pages, by the source catalog's last count, in one statement.
pub(crate) async fn unit_pages(
    client: &tokio_postgres::Client,
    units: &[Vec<TableState>],
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let relids: Vec<u32> = units.iter().flatten().map(|t| t.relid).collect();
    let rows = client
        .query(
            "SELECT u.r, coalesce(c.relpages, 2147483647)::int8
               FROM unnest($1::oid[]) AS u(r) LEFT JOIN pg_class c ON c.oid = u.r",
            &[&relids],
        )
        .await?;
    let pages: std::collections::HashMap<u32, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(units
        .iter()
        .map(|u| {
            u.iter()
                .map(|t| pages.get(&t.relid).copied().unwrap_or(i64::MAX / 4))
                .sum()
        })
        .collect())
}

/// Rounds at most of comparing ahead of a fence the units whose ledgers
/// hold many keys (the cutover's `settle_ledgers`, the switchback's): a
/// round takes less time than the one before, as it compares fewer rows,
/// unless writes outpace it.
pub(crate) const SETTLE_ROUNDS: usize = 3;

/// The units (see [`crate::verify::ahead_units`]) whose every table has its ledger,
/// each with the keys its ledgers hold.
pub(crate) async fn ledger_keys(
    conn: &tokio_postgres::Client,
    tables: &[TableState],
) -> Result<Vec<(Vec<TableState>, i64)>, tokio_postgres::Error> {
    let ledgers = crate::control::state::ledgers(conn).await?;
    let units: Vec<Vec<TableState>> = crate::verify::ahead_units(tables)
        .into_iter()
        .filter(|u| u.iter().all(|t| ledgers.contains(&t.id)))
        .collect();
    let mut out = Vec::with_capacity(units.len());
    // A statement per hundred units: one round trip, not one per table.
    for chunk in units.chunks(100) {
        let arms: Vec<String> = chunk
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let counts: Vec<String> = u
                    .iter()
                    .map(|t| format!("(SELECT count(*) FROM {})", t.ledger_table()))
                    .collect();
                format!("SELECT {i}, {}", counts.join(" + "))
            })
            .collect();
        let rows = conn.query(&arms.join(" UNION ALL "), &[]).await?;
        for r in rows {
            let (i, keys): (i32, i64) = (r.get(0), r.get(1));
            out.push((chunk[i as usize].clone(), keys));
        }
    }
    Ok(out)
}

/// A ledger bigger than this is dropped: its table is compared in full
/// again, which then costs about as much as reading that many keys' rows.
pub(crate) const LEDGER_MAX_BYTES: i64 = 64 << 20;

/// Verifies `unit` (see [`ahead_units`]) ahead of the fence
/// (`cutover.verify = "changed"`) with a [`verify_batch`]. Waits while
/// another agent drains it. Returns the verdicts of its tables that hold
/// rows.
pub async fn verify_ahead(
    m: &Migration,
    unit: &[TableState],
    ahead: Ahead,
    cancel: &CancellationToken,
) -> Result<Vec<TableVerdict>, crate::Error> {
    loop {
        let stats = match retry(
            m.retry_policy(),
            "batch",
            "verify a table ahead of the fence",
            cancel,
            || drain_table(m, &unit[0], unit, None, Some(ahead)),
        )
        .await
        {
            Ok(s) => s,
            Err(Gave::Up(e)) => return Err(e.into()),
            Err(Gave::Cancelled) => return Err(crate::Error::Cancelled),
        };
        if let Some(v) = stats.verified {
            return Ok(v);
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(crate::Error::Cancelled),
            () = tokio::time::sleep(Duration::from_millis(m.cfg.sync.poll_interval_ms)) => {}
        }
    }
}
