//! Applying the target's changes to the old source, under its foreign keys
//! and without its triggers (docs/design.md, "Fallback").
//!
//! A pass reads every pending table of the target in one REPEATABLE READ
//! snapshot S (the target enforces its foreign keys, so S is consistent
//! across tables) and writes the old source in one transaction: rows are
//! upserted (`INSERT ... ON CONFLICT DO UPDATE`, never deleted and inserted
//! again, so no `ON DELETE` action fires for a row that still exists)
//! parents first, then the keys S no longer holds are deleted children
//! first; the constraints are checked at the end of each statement, and
//! each statement leaves them holding. Only after the old source committed
//! are the deltas S saw removed, in S (invariant 4, the other way round).

use tokio_postgres::IsolationLevel;
use tokio_util::sync::CancellationToken;

use super::query_err;
use crate::control::state::{self, TableState};
use crate::db::endpoint::Side;
use crate::db::ident::{column_list, Ident, QualifiedTable};
use crate::db::Migration;
use crate::drain::Ahead;
use crate::rows::Pumped;
use crate::verify::TableVerdict;

/// Advisory-lock class held on the target by the one pass applying at a
/// time (`pgfb`): two passes in different snapshots could commit in the
/// opposite order and leave the older state on the old source.
const PASS_LOCK_CLASS: i32 = 0x7067_6662;

/// One pass: applies every change the target's deltas hold to the old
/// source. Returns the keys applied (0 when nothing was pending), or None
/// when another agent's pass holds the lock: what it applies is not
/// applied yet.
pub async fn pass(m: &Migration) -> Result<Option<u64>, crate::Error> {
    Ok(checking_pass(m, None).await?.map(|(keys, _)| keys))
}

/// What a pass compares once it applied (`cutover.verify = "changed"`,
/// docs/design.md, "Fallback"): these units (see
/// [`crate::verify::ahead_units`]) of the target's tables, in full or by
/// their ledgers.
pub struct Check<'a> {
    /// The units compared, each with its own verdict on its ledgers.
    pub units: &'a [Vec<TableState>],
    /// In full (the units get their ledgers) or by their ledgers (emptied).
    pub ahead: Ahead,
}

/// [`pass`], and with `check`, the comparison of those units in the
/// pass's snapshot S once the old source committed: nothing else writes
/// the old source, and the pass lock keeps every other pass out, so it
/// then holds the target as of S. Returns the keys applied and the
/// verdicts of the tables compared.
///
/// The lock is a session lock taken before the pass's transaction, so that
/// its snapshot is taken after any other pass committed: a snapshot taken
/// before another pass committed and released could be older than that
/// pass's, and put its older rows back over the newer ones. On failure the
/// session is discarded, which releases the lock.
pub async fn checking_pass(
    m: &Migration,
    check: Option<&Check<'_>>,
) -> Result<Option<(u64, Vec<TableVerdict>)>, crate::Error> {
    let back = m.reversed();
    let mut newdb = back.source_conn().await?;
    let locked: bool = newdb
        .query_one("SELECT pg_try_advisory_lock($1, 0)", &[&PASS_LOCK_CLASS])
        .await
        .map_err(query_err("taking the pass lock", Side::Target))?
        .get(0);
    if !locked {
        return Ok(None);
    }
    let applied = async {
        // `finish` or a switchback may have taken the way back off the
        // target while this pass waited for its turn.
        if !super::under_way_on(&**newdb).await? {
            return Ok((0, Vec::new()));
        }
        pass_locked(m, &mut newdb, check).await
    }
    .await;
    match applied {
        Ok(done) => {
            newdb
                .execute("SELECT pg_advisory_unlock($1, 0)", &[&PASS_LOCK_CLASS])
                .await
                .map_err(query_err("releasing the pass lock", Side::Target))?;
            Ok(Some(done))
        }
        Err(e) => {
            let _ = deadpool_postgres::Object::take(newdb);
            Err(e)
        }
    }
}

/// Runs `f` with no pass applying, its own or another agent's: the pass
/// lock taken on a target session (waiting for a pass in flight), released
/// after, or its session discarded on failure, which releases it. What
/// takes the way back off (`finish`, a switchback's tidying) or enables the
/// old source's triggers runs so: a pass in flight at that moment would
/// fail on a dropped table, or fire the triggers on what it applies.
/// While a pass holds the lock it waits, saying every 10 s which session
/// of the target's holds it (a pass stuck on a lock of the old source's,
/// an agent's session the network lost and the server has yet to end),
/// until the lock is free or `cancel` fires.
pub async fn without_passes<T, F, Fut>(
    m: &Migration,
    cancel: &CancellationToken,
    f: F,
) -> Result<T, crate::Error>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::Error>>,
{
    const SAY_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
    let back = m.reversed();
    let newdb = back.source_conn().await?;
    let err = || query_err("waiting for the pass in flight", Side::Target);
    let started = std::time::Instant::now();
    let mut said = std::time::Instant::now();
    while !newdb
        .query_one("SELECT pg_try_advisory_lock($1, 0)", &[&PASS_LOCK_CLASS])
        .await
        .map_err(err())?
        .get::<_, bool>(0)
    {
        if said.elapsed() >= SAY_EVERY {
            said = std::time::Instant::now();
            let holder: Option<String> = newdb
                .query_opt(
                    "SELECT format('pid %s %s(%s)', l.pid,
                                   CASE WHEN a.application_name <> '' THEN a.application_name || ' ' ELSE '' END,
                                   coalesce(a.state, 'unknown'))
                       FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
                      WHERE l.locktype = 'advisory' AND l.classid::int4 = $1 AND l.objid = 0 AND l.granted
                      LIMIT 1",
                    &[&PASS_LOCK_CLASS],
                )
                .await
                .map_err(err())?
                .map(|r| r.get(0));
            tracing::warn!(
                holder = %holder.as_deref().unwrap_or("gone"),
                waited_secs = started.elapsed().as_secs(),
                "Waiting for the way back's pass in flight to end (the target's session holding its lock)"
            );
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(crate::Error::Cancelled),
            () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
        }
    }
    match f().await {
        Ok(v) => {
            newdb
                .execute("SELECT pg_advisory_unlock($1, 0)", &[&PASS_LOCK_CLASS])
                .await
                .map_err(query_err("releasing the pass lock", Side::Target))?;
            Ok(v)
        }
        Err(e) => {
            let _ = deadpool_postgres::Object::take(newdb);
            Err(e)
        }
    }
}

/// [`checking_pass`] with its lock held on `newdb`, the target's session.
async fn pass_locked(
    m: &Migration,
    newdb: &mut deadpool_postgres::Object,
    check: Option<&Check<'_>>,
) -> Result<(u64, Vec<TableVerdict>), crate::Error> {
    let tables = state::tables(&***newdb).await?;
    let tgt = |what: &str| query_err(what, Side::Target);
    let keyed: Vec<&TableState> = tables.iter().filter(|t| !t.copy_only).collect();
    if keyed.is_empty() {
        return Ok((0, Vec::new()));
    }
    let probe = keyed
        .iter()
        .map(|t| format!("SELECT {} WHERE EXISTS (SELECT 1 FROM {})", t.id, t.delta_table()))
        .chain(std::iter::once(
            "SELECT table_id FROM pgferry.truncates".to_string(),
        ))
        .collect::<Vec<_>>()
        .join(" UNION ");
    // First a look outside any transaction, which locks nothing: an idle
    // pass (most of them) takes no lock on the application's tables, and
    // a table the application holds locked (its own ALTER) holds up no
    // other's changes while it has none. The pass's time is that look's:
    // everything committed on the target before it, the look saw, and the
    // pass applies in a snapshot taken after it. Recorded after the
    // commit, outside S: the run row is also written by a switchback, and
    // an update in S would fail on that.
    let row = newdb
        .query_one(
            &format!("SELECT ARRAY({probe})::int4[], extract(epoch FROM now())::float8"),
            &[],
        )
        .await
        .map_err(tgt("reading the pending tables"))?;
    let (mut locked, at): (Vec<i32>, f64) = (row.get(0), row.get(1));
    if locked.is_empty() && check.is_none() {
        record_pass(newdb, at).await?;
        return Ok((0, Vec::new()));
    }
    locked.extend(check.iter().flat_map(|c| c.units.iter().flatten().map(|t| t.id)));
    let (ttx, pending_ids) = loop {
        let ttx = newdb
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .start()
            .await
            .map_err(tgt("starting a pass"))?;
        // ACCESS SHARE before the first query takes S, as a forward batch
        // does: a TRUNCATE committed after S but before a read would show S
        // an empty table.
        let names: Vec<String> = keyed
            .iter()
            .filter(|t| locked.contains(&t.id))
            .map(|t| format!("ONLY {}", t.table))
            .collect();
        if !names.is_empty() {
            ttx.batch_execute(&format!("LOCK TABLE {} IN ACCESS SHARE MODE", names.join(", ")))
                .await
                .map_err(tgt("locking the changed tables"))?;
        }
        let pending_ids: Vec<i32> = ttx
            .query(&probe, &[])
            .await
            .map_err(tgt("reading the pending tables"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // Every table S holds changes of is applied from S, together (a
        // row may reference one in another of them); one changed since
        // the look is not locked, so S may not read it: again, with it.
        if pending_ids.iter().all(|id| locked.contains(id)) {
            break (ttx, pending_ids);
        }
        ttx.rollback().await.map_err(tgt("starting a pass again"))?;
        locked.extend(
            pending_ids
                .into_iter()
                .filter(|id| !locked.contains(id))
                .collect::<Vec<_>>(),
        );
    };
    let truncated: Vec<i32> = ttx
        .query("SELECT DISTINCT table_id FROM pgferry.truncates", &[])
        .await
        .map_err(tgt("reading the truncations"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let pending: Vec<&TableState> = keyed
        .iter()
        .copied()
        .filter(|t| pending_ids.contains(&t.id))
        .collect();
    let ledgers = state::ledgers(&*ttx).await.map_err(tgt("listing the ledgers"))?;
    let mut old = m.source_conn().await?;
    let keys = if pending.is_empty() {
        0
    } else {
        apply(&ttx, &mut old, &pending, &truncated).await?
    };
    crate::failpoint::hit("fallback.after_source_commit").await;
    // The old source now holds the target as of S.
    let mut verdicts = Vec::new();
    let mut checked = Vec::new();
    for unit in check.map_or(&[][..], |c| c.units) {
        let rewritten = unit.iter().any(|t| truncated.contains(&t.id));
        let by_ledger = check.is_some_and(|c| c.ahead == Ahead::Ledger)
            && !rewritten
            && unit.iter().all(|t| ledgers.contains(&t.id));
        let mut found = Vec::new();
        if by_ledger {
            found.push(crate::verify::compare_changed_on(&*ttx, &mut old, unit, !unit[0].partitioned).await?);
        }
        for t in unit.iter().filter(|t| !t.partitioned && !by_ledger) {
            let subject = crate::verify::Subject::of(t);
            found.push(crate::verify::compare_on(&*ttx, &**old, &subject, crate::verify::Rows::All).await?);
        }
        let equal = found.iter().all(|v| v.equal);
        for t in unit {
            ttx.batch_execute(&crate::drain::ledger_after(t, equal, by_ledger))
                .await
                .map_err(tgt("keeping a ledger"))?;
            checked.push(t.id);
        }
        verdicts.extend(found);
    }
    if check.is_some() {
        crate::failpoint::hit("fallback.verified").await;
    }
    for t in &pending {
        // The keys of a table verified in S are not changes since.
        let keep_ledger = ledgers.contains(&t.id) && !checked.contains(&t.id);
        crate::drain::forget_deltas(&ttx, t, "", keep_ledger, truncated.contains(&t.id))
            .await
            .map_err(tgt("forgetting the applied deltas"))?;
    }
    ttx.execute("DELETE FROM pgferry.truncates", &[])
        .await
        .map_err(tgt("forgetting the applied truncations"))?;
    ttx.commit().await.map_err(tgt("committing a pass"))?;
    record_pass(newdb, at).await?;
    tracing::debug!(tables = pending.len(), keys, "Applied to the old source");
    Ok((keys, verdicts))
}

/// Writes `pending`'s changed rows as the target's snapshot `ttx` holds
/// them into the old source, in one transaction of `old`'s that passes
/// its fence, committed. Returns the keys applied.
async fn apply(
    ttx: &tokio_postgres::Transaction<'_>,
    old: &mut deadpool_postgres::Object,
    pending: &[&TableState],
    truncated: &[i32],
) -> Result<u64, crate::Error> {
    let src = |what: &str| query_err(what, Side::Source);
    let stx = old.transaction().await.map_err(src("starting a pass"))?;
    pass_the_fence(&stx).await?;
    // The target's snapshot satisfies every constraint; those the old
    // source may check at the commit (Django's foreign keys, a unique
    // constraint declared DEFERRABLE) take rows that reference each other,
    // or a unique value moved between rows, in any order.
    stx.batch_execute("SET CONSTRAINTS ALL DEFERRED")
        .await
        .map_err(src("deferring the constraints"))?;
    let mut keys = 0;
    for (i, t) in pending.iter().enumerate() {
        let whole = truncated.contains(&t.id);
        keys += crate::rows::stage_keys(
            ttx,
            &stx,
            &format!("pgferry_k_{i}"),
            &t.table,
            &t.key_columns,
            &format!("SELECT DISTINCT {} FROM {}", t.delta_key_list(), t.delta_table()),
        )
        .await
        .map_err(pumped("staging the changed keys"))?;
        let cols = column_list(&t.copy_columns, None);
        stx.batch_execute(&format!(
            "CREATE TEMP TABLE pgferry_r_{i} ON COMMIT DROP AS SELECT {cols} FROM ONLY {} WITH NO DATA",
            t.table
        ))
        .await
        .map_err(src("staging the rows"))?;
        let filter = if whole {
            String::new()
        } else {
            format!(
                "WHERE ({}) IN (SELECT {} FROM {})",
                column_list(&t.key_columns, None),
                t.delta_key_list(),
                t.delta_table()
            )
        };
        let unlimited = crate::db::throttle::Throttle::unlimited();
        crate::rows::copy_rows(ttx, &stx, t, &format!("pgferry_r_{i}"), &filter, &unlimited)
            .await
            .map_err(pumped("staging the rows"))?;
    }
    let order = parents_first(&stx, pending)
        .await
        .map_err(src("reading the foreign keys"))?;
    for &i in &order {
        upsert(&stx, pending[i], i)
            .await
            .map_err(refused("applying the rows"))?;
    }
    for &i in order.iter().rev() {
        remove(&stx, pending[i], i, truncated.contains(&pending[i].id))
            .await
            .map_err(refused("removing the deleted rows"))?;
    }
    crate::failpoint::hit("fallback.before_source_commit").await;
    stx.commit().await.map_err(src("committing a pass"))?;
    Ok(keys)
}

/// Lets `stx`, a transaction of the old source's, write past its fence as
/// the way back's passes do (and uncaptured).
async fn pass_the_fence(stx: &tokio_postgres::Transaction<'_>) -> Result<(), crate::Error> {
    stx.execute(
        "SELECT set_config('pgferry.apply', (SELECT apply_pass FROM pgferry.run), true)",
        &[],
    )
    .await
    .map_err(query_err("passing the fence", Side::Source))?;
    Ok(())
}

/// An error of a statement applying rows to the old source: a unique or
/// foreign key violation there is a constraint it checks within each
/// statement (see
/// [`super::FallbackError::NotDeferrable`]).
fn refused(what: &'static str) -> impl Fn(tokio_postgres::Error) -> super::FallbackError {
    use tokio_postgres::error::SqlState;
    move |e| {
        let named = e
            .as_db_error()
            .filter(|d| {
                matches!(
                    d.code(),
                    &SqlState::UNIQUE_VIOLATION | &SqlState::FOREIGN_KEY_VIOLATION
                )
            })
            .and_then(|d| {
                Some((
                    d.constraint()?.to_string(),
                    d.schema()?.to_string(),
                    d.table()?.to_string(),
                ))
            });
        match named {
            Some((constraint, schema, table)) => {
                let table = QualifiedTable::new(schema, table);
                super::FallbackError::NotDeferrable {
                    fix: format!(
                        "ALTER TABLE {table} ALTER CONSTRAINT {} DEFERRABLE",
                        Ident(constraint.clone())
                    ),
                    table: table.display_name(),
                    constraint,
                    source: e,
                }
            }
            None => query_err(what, Side::Source)(e),
        }
    }
}

/// A row-moving error of the way back: its source side is the target.
fn pumped(what: &'static str) -> impl Fn(Pumped) -> super::FallbackError {
    move |e| match e {
        Pumped::Source(e) => query_err(what, Side::Target)(e),
        Pumped::Target(e) => query_err(what, Side::Source)(e),
    }
}

/// With the target fenced, after the switchback's last pass: each
/// `copy_only` table of the target (no key, so no delta names its rows)
/// copied whole onto the old source, as the cutover copies it the other
/// way, in one transaction each that passes the old source's fence:
/// emptied there (TRUNCATE where the role may and no foreign key points at
/// it; DELETE otherwise, which `check` made sure it may), then filled by
/// COPY. Run again after a kill, it copies again. Returns `table (n rows)`
/// for each.
pub async fn copy_keyless(m: &Migration) -> Result<Vec<String>, crate::Error> {
    let back = m.reversed();
    let tables = state::tables(&**back.source_conn().await?).await?;
    let mut copied = Vec::new();
    for t in tables.iter().filter(|t| t.copy_only) {
        let (tgt, src) = (
            |what: &str| query_err(what, Side::Target),
            |what: &str| query_err(what, Side::Source),
        );
        let mut newdb = back.source_conn().await?;
        let ttx = newdb
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(tgt("reading a table without a key"))?;
        let mut old = m.source_conn().await?;
        let stx = old
            .transaction()
            .await
            .map_err(src("copying a table without a key"))?;
        pass_the_fence(&stx).await?;
        let truncate: bool = stx
            .query_one(
                "SELECT has_table_privilege(c.oid, 'TRUNCATE')
                        AND NOT EXISTS (SELECT 1 FROM pg_constraint f WHERE f.confrelid = c.oid AND f.contype = 'f')
                   FROM pg_class c WHERE c.oid = $1::text::regclass",
                &[&t.table.to_string()],
            )
            .await
            .map_err(src("copying a table without a key"))?
            .get(0);
        let empty = if truncate {
            "TRUNCATE ONLY"
        } else {
            "DELETE FROM ONLY"
        };
        stx.batch_execute(&format!("{empty} {}", t.table))
            .await
            .map_err(src("emptying a table without a key"))?;
        let unlimited = crate::db::throttle::Throttle::unlimited();
        let rows = crate::rows::copy_rows(&ttx, &stx, t, &t.table.to_string(), "", &unlimited)
            .await
            .map_err(pumped("copying a table without a key"))?;
        stx.commit().await.map_err(src("copying a table without a key"))?;
        ttx.commit().await.map_err(tgt("reading a table without a key"))?;
        tracing::info!(table = %t.table.display_name(), rows, "Copied whole to the old source (no key)");
        copied.push(format!("{} ({rows} rows)", t.table.display_name()));
    }
    Ok(copied)
}

/// Records a complete pass's time on the target (the way back's lag).
async fn record_pass(newdb: &deadpool_postgres::Object, at: f64) -> Result<(), crate::Error> {
    newdb
        .execute(
            "UPDATE pgferry.run SET reverse_synced_through = greatest(reverse_synced_through, to_timestamp($1))",
            &[&at],
        )
        .await
        .map_err(query_err("recording the pass", Side::Target))?;
    Ok(())
}

/// Writes the staged rows of `t` into the old source: inserted, or, where
/// the key exists, its other columns set.
async fn upsert(
    stx: &tokio_postgres::Transaction<'_>,
    t: &TableState,
    i: usize,
) -> Result<u64, tokio_postgres::Error> {
    let cols = column_list(&t.copy_columns, None);
    let keys = column_list(&t.key_columns, None);
    let set: Vec<String> = t
        .copy_columns
        .iter()
        .filter(|c| !t.key_columns.contains(c))
        .map(|c| format!("{c} = EXCLUDED.{c}", c = Ident(c.clone())))
        .collect();
    let action = if set.is_empty() {
        "NOTHING".to_string()
    } else {
        format!("UPDATE SET {}", set.join(", "))
    };
    stx.execute(
        &format!(
            "INSERT INTO {} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM pgferry_r_{i}
             ON CONFLICT ({keys}) DO {action}",
            t.table
        ),
        &[],
    )
    .await
}

/// Deletes from the old source the rows of `t` whose key changed and that
/// the target's snapshot no longer holds; after a TRUNCATE on the target,
/// every row it does not hold.
async fn remove(
    stx: &tokio_postgres::Transaction<'_>,
    t: &TableState,
    i: usize,
    whole: bool,
) -> Result<u64, tokio_postgres::Error> {
    let on = |a: &str, b: &str| {
        t.key_columns
            .iter()
            .map(|k| format!("{a}.{k} = {b}.{k}", k = Ident(k.clone())))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let gone = format!(
        "NOT EXISTS (SELECT 1 FROM pgferry_r_{i} AS r WHERE {})",
        on("r", "t")
    );
    let sql = if whole {
        format!("DELETE FROM {} AS t WHERE {gone}", t.rel())
    } else {
        format!(
            "DELETE FROM {} AS t USING pgferry_k_{i} AS k WHERE {} AND {gone}",
            t.rel(),
            on("t", "k")
        )
    };
    stx.execute(&sql, &[]).await
}

/// The indexes of `pending` ordered so that a table comes after every
/// table it references by a foreign key on the old source (a table that
/// references itself aside). Tables in a cycle keep their order after the
/// rest: their keys must be deferrable or the cycle's rows arrive in an
/// order each statement accepts.
async fn parents_first(
    stx: &tokio_postgres::Transaction<'_>,
    pending: &[&TableState],
) -> Result<Vec<usize>, tokio_postgres::Error> {
    let edges: Vec<(QualifiedTable, QualifiedTable)> = stx
        .query(
            "SELECT cn.nspname::text, c.relname::text, pn.nspname::text, p.relname::text
               FROM pg_constraint con
               JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
               JOIN pg_class p ON p.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
              WHERE con.contype = 'f' AND con.conrelid <> con.confrelid",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            (
                QualifiedTable::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                QualifiedTable::new(r.get::<_, String>(2), r.get::<_, String>(3)),
            )
        })
        .collect();
    Ok(order_parents_first(
        pending.iter().map(|t| &t.table).collect(),
        &edges,
    ))
}

/// [`parents_first`] over names: `edges` are (child, parent) pairs.
fn order_parents_first(
    tables: Vec<&QualifiedTable>,
    edges: &[(QualifiedTable, QualifiedTable)],
) -> Vec<usize> {
    let mut placed = vec![false; tables.len()];
    let mut order = Vec::with_capacity(tables.len());
    loop {
        let ready: Vec<usize> = (0..tables.len())
            .filter(|&i| !placed[i])
            .filter(|&i| {
                !edges.iter().any(|(child, parent)| {
                    child == tables[i]
                        && tables
                            .iter()
                            .enumerate()
                            .any(|(j, t)| !placed[j] && j != i && t == &parent)
                })
            })
            .collect();
        if ready.is_empty() {
            break;
        }
        for i in ready {
            placed[i] = true;
            order.push(i);
        }
    }
    order.extend((0..tables.len()).filter(|&i| !placed[i]));
    order
}

/// Disables, on the old source, the application's enabled triggers on the
/// captured tables, recording each one's mode: they fired on the new
/// database for the writes pgferry applies. Each table in its own short
/// transaction with the source's lock timeout, retried. Returns how many
/// are disabled (by this run or an earlier one).
pub async fn disable_triggers(m: &Migration, cancel: &CancellationToken) -> Result<usize, crate::Error> {
    let found = m
        .source_conn()
        .await?
        .query(
            "SELECT t.tgrelid, t.tgname::text, t.tgenabled::text, format('%I.%I', n.nspname, c.relname)
               FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE t.tgrelid IN (SELECT relid FROM pgferry.tables)
                AND NOT t.tgisinternal AND t.tgparentid = 0 AND t.tgenabled <> 'D'
                AND NOT EXISTS (SELECT 1 FROM pg_proc p
                                 WHERE p.oid = t.tgfoid AND p.pronamespace = 'pgferry'::regnamespace)",
            &[],
        )
        .await
        .map_err(query_err("listing the application's triggers", Side::Source))?;
    for r in &found {
        let (relid, name, mode, table): (u32, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let (name, mode, table) = (&name, &mode, &table);
        crate::ddl::retry_ddl(m, cancel, "disable a trigger on the old source", || async move {
            let mut conn = m.source_conn().await?;
            let tx = conn.transaction().await.map_err(query_err("disabling a trigger", Side::Source))?;
            tx.execute(
                "INSERT INTO pgferry.disabled_triggers (relid, tgname, mode) VALUES ($1, $2, $3::text::\"char\")
                 ON CONFLICT DO NOTHING",
                &[&relid, name, mode],
            )
            .await
            .map_err(query_err("disabling a trigger", Side::Source))?;
            tx.batch_execute(&format!("ALTER TABLE {table} DISABLE TRIGGER {}", Ident(name.clone())))
                .await
                .map_err(query_err("disabling a trigger", Side::Source))?;
            tx.commit().await.map_err(query_err("disabling a trigger", Side::Source))?;
            Ok::<_, crate::Error>(())
        })
        .await?;
        tracing::info!(table = %table, trigger = %name, "Trigger disabled on the old source while it follows the new database");
    }
    let disabled: i64 = m
        .source_conn()
        .await?
        .query_one("SELECT count(*) FROM pgferry.disabled_triggers", &[])
        .await
        .map_err(query_err("counting the disabled triggers", Side::Source))?
        .get(0);
    Ok(disabled as usize)
}

/// Enables again, in the modes they had, the triggers [`disable_triggers`]
/// disabled. Returns how many.
pub async fn restore_triggers(m: &Migration, cancel: &CancellationToken) -> Result<usize, crate::Error> {
    let conn = m.source_conn().await?;
    if !crate::control::exists(&**conn).await? {
        return Ok(0);
    }
    let listed = conn
        .query(
            "SELECT d.relid, d.tgname::text, d.mode::text, format('%I.%I', n.nspname, c.relname)
               FROM pgferry.disabled_triggers d
               JOIN pg_class c ON c.oid = d.relid JOIN pg_namespace n ON n.oid = c.relnamespace",
            &[],
        )
        .await;
    // A control schema older than version 17 has no such table.
    let found = match listed {
        Ok(rows) => rows,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => return Ok(0),
        Err(e) => return Err(query_err("listing the disabled triggers", Side::Source)(e).into()),
    };
    drop(conn);
    for r in &found {
        let (relid, name, mode, table): (u32, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let how = match mode.as_str() {
            "A" => "ENABLE ALWAYS",
            "R" => "ENABLE REPLICA",
            _ => "ENABLE",
        };
        let (name, table) = (&name, &table);
        crate::ddl::retry_ddl(m, cancel, "enable a trigger on the old source", || async move {
            let mut conn = m.source_conn().await?;
            let tx = conn
                .transaction()
                .await
                .map_err(query_err("enabling a trigger", Side::Source))?;
            tx.batch_execute(&format!(
                "ALTER TABLE {table} {how} TRIGGER {}",
                Ident(name.clone())
            ))
            .await
            .map_err(query_err("enabling a trigger", Side::Source))?;
            tx.execute(
                "DELETE FROM pgferry.disabled_triggers WHERE relid = $1 AND tgname = $2",
                &[&relid, name],
            )
            .await
            .map_err(query_err("enabling a trigger", Side::Source))?;
            tx.commit()
                .await
                .map_err(query_err("enabling a trigger", Side::Source))?;
            Ok::<_, crate::Error>(())
        })
        .await?;
    }
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> QualifiedTable {
        QualifiedTable::new("public", name)
    }

    #[test]
    fn parents_come_first_and_cycles_last() {
        let (a, b, c, d) = (t("orders"), t("lines"), t("customers"), t("x"));
        let edges = vec![
            (b.clone(), a.clone()),
            (a.clone(), c.clone()),
            (d.clone(), d.clone()),
        ];
        assert_eq!(
            order_parents_first(vec![&b, &a, &c, &d], &edges),
            vec![2, 3, 1, 0]
        );
        let cycle = vec![(a.clone(), b.clone()), (b.clone(), a.clone())];
        assert_eq!(order_parents_first(vec![&a, &b, &c], &cycle), vec![2, 0, 1]);
    }
}
