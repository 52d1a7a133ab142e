//! One batch of a table: its snapshot, the keys it saw, their rows applied
//! on the target, the deltas consumed on the source, the progress recorded;
//! or the whole table copied when most of it changed.

use deadpool_postgres::Object;
use tokio_postgres::IsolationLevel;

use super::ahead::{verify_batch, Ahead, LEDGER_MAX_BYTES};
use super::{BatchStats, SyncError};
use crate::control::state::{self, TableState};
use crate::db::endpoint::Side;
use crate::db::ident::{column_list, Ident};
use crate::db::throttle::Throttle;
use crate::db::Migration;
use crate::rows::{copy_rows, Pumped};

/// Advisory-lock class for "a batch of table N is in progress" (`pgfr`).
const BATCH_LOCK_CLASS: i32 = 0x7067_6672;

/// The batch lock's key: the root of the table's partition hierarchy (the
/// table itself when it is not a partition), so that a root batch and a
/// partition batch, which may name the same row, never overlap.
fn lock_key(t: &TableState) -> i32 {
    // An OID as the lock's int4 key: the bits matter, not the sign.
    t.lock_relid as i32
}

/// A table's backlog is drained in [`PARTS`] parallel batches, one per
/// hash of the key, once its delta table holds at least this many rows (and
/// fewer tables than workers have deltas).
pub(crate) const SPLIT_FROM_ROWS: i64 = 50_000;

/// How many parts a large backlog is split into. Every agent must agree on
/// it (parts are locked by number), so it is a constant, not a setting.
pub(crate) const PARTS: u32 = 4;

/// One part of a table's backlog: the delta rows whose key hashes to it.
/// `hash_record` uses each key type's default hash, so every session agrees
/// on which part a key belongs to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Part(pub(crate) u32);

impl Part {
    /// The predicate selecting this part's delta rows (columns `k1`...).
    pub(crate) fn predicate(self, t: &TableState) -> String {
        format!(
            "(hash_record(ROW({})) & {}) = {}",
            t.delta_key_list(),
            PARTS - 1,
            self.0
        )
    }
}

/// Whether `t`'s large backlog can be drained in parts: its key types can
/// be hashed (PostgreSQL 14+ has `hash_record`), and on the target its key
/// is its only unique index or constraint, so that parts applying different
/// keys at the same time never collide on another unique value moving
/// between rows.
pub(crate) async fn splittable(m: &Migration, t: &TableState) -> Result<bool, SyncError> {
    let source = m.source_conn().await?;
    let hashable = source
        .query(
            &format!("SELECT {} FROM {} LIMIT 1", Part(0).predicate(t), t.delta_table()),
            &[],
        )
        .await;
    match hashable {
        Ok(_) => {}
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_FUNCTION) => return Ok(false),
        Err(e) => return Err(batch_err(t, Side::Source, e)),
    }
    let target = m.target_conn().await?;
    let unique: i64 = target
        .query_one(
            "SELECT count(*) FROM pg_index WHERE indrelid = to_regclass($1) AND (indisunique OR indisexclusion)",
            &[&t.table.to_string()],
        )
        .await
        .map_err(|e| batch_err(t, Side::Target, e))?
        .get(0);
    Ok(unique <= 1)
}

/// Runs one batch for `t` (or one part of its backlog). On any failure the
/// source session is discarded rather than returned to the pool, which also
/// releases its batch locks.
///
/// A whole batch holds the table's batch lock exclusively. A part holds it
/// shared, plus its part's own lock: parts run side by side, never beside a
/// whole batch or the same part elsewhere. With `verify`, the batch is a
/// [`verify_batch`] of the unit `group`, whose first table is `t`.
pub(crate) async fn drain_table(
    m: &Migration,
    t: &TableState,
    group: &[TableState],
    part: Option<Part>,
    verify: Option<Ahead>,
) -> Result<BatchStats, SyncError> {
    let mut source = m.source_conn().await?;
    let locks = match part {
        None => vec![("", BATCH_LOCK_CLASS)],
        Some(Part(i)) => vec![
            ("_shared", BATCH_LOCK_CLASS),
            ("", BATCH_LOCK_CLASS + 1 + i as i32),
        ],
    };
    let mut held = 0;
    for (mode, class) in &locks {
        let locked: bool = source
            .query_one(
                &format!("SELECT pg_try_advisory_lock{mode}($1, $2)"),
                &[class, &lock_key(t)],
            )
            .await
            .map_err(|e| batch_err(t, Side::Source, e))?
            .get(0);
        if !locked {
            break;
        }
        held += 1;
    }
    let outcome = if held < locks.len() {
        tracing::debug!(table = %t.table.display_name(), "Another agent is draining this table");
        crate::telemetry::batch_idle(&t.table.display_name(), true);
        Ok(BatchStats {
            busy: true,
            ..Default::default()
        })
    } else if let Some(ahead) = verify {
        verify_batch(m, &mut source, group, ahead).await
    } else {
        batch(m, &mut source, t, group, part).await
    };
    match outcome {
        Ok(stats) => {
            for (mode, class) in &locks[..held] {
                source
                    .execute(
                        &format!("SELECT pg_advisory_unlock{mode}($1, $2)"),
                        &[class, &lock_key(t)],
                    )
                    .await
                    .map_err(|e| batch_err(t, Side::Source, e))?;
            }
            Ok(stats)
        }
        Err(e) => {
            let _ = Object::take(source);
            Err(e)
        }
    }
}

pub(crate) fn batch_err(t: &TableState, side: Side, source: tokio_postgres::Error) -> SyncError {
    SyncError::Batch {
        table: t.table.display_name(),
        side,
        source,
    }
}

/// Opens a batch's source transaction, REPEATABLE READ: its first query
/// takes the snapshot S that decides everything the batch does. `tables`
/// are locked ACCESS SHARE before that (a LOCK takes no snapshot), as any
/// reader holds them: TRUNCATE is not MVCC-safe, and one committed after S
/// but before the batch first read its table would show that table empty
/// to S, so that a batch applied, or a verification compared, an empty
/// table. Held first, the lock makes a TRUNCATE wait for the batch instead.
pub(crate) async fn begin<'a>(
    source: &'a mut Object,
    tables: &[&TableState],
) -> Result<deadpool_postgres::Transaction<'a>, tokio_postgres::Error> {
    let stx = source
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await?;
    // ONLY: each registered table is locked by the batches that read it
    // (a partition by its own, and a verification locks every member of
    // its unit), and pgferry's privileges are on those.
    let names: Vec<String> = tables.iter().map(|t| format!("ONLY {}", t.table)).collect();
    stx.batch_execute(&format!("LOCK TABLE {} IN ACCESS SHARE MODE", names.join(", ")))
        .await?;
    Ok(stx)
}

/// What a batch's snapshot shows of one table.
pub(crate) struct Seen {
    /// The snapshot's time (the lag it ends).
    pub(crate) epoch: f64,
    /// The table has deltas (of this part).
    pub(crate) deltas: bool,
    /// A TRUNCATE of the table waits (for a whole batch only).
    pub(crate) truncated: bool,
    /// The table has its ledger (`cutover.verify = "changed"`).
    pub(crate) ledger: bool,
    /// The table's columns in this snapshot are not the registered ones:
    /// an ALTER TABLE committed before it, whose rows the target could not
    /// take whole until sync follows it.
    pub(crate) columns_changed: bool,
    /// The types of the registered columns in this snapshot
    /// ([`type_signature`]), to be the target's before any row is applied.
    pub(crate) types: String,
}

/// The types of `relid_expr`'s columns named in `columns_param` (a text
/// array) as a JSON object, column to `schema.type:typmod`: the same on both
/// sides when the types are, whatever `search_path` and the columns' order
/// ([`super::types::misfits`] compares two).
pub(crate) fn type_signature(relid_expr: &str, columns_param: &str) -> String {
    format!(
        "(SELECT coalesce(jsonb_object_agg(a.attname, tn.nspname || '.' || ty.typname || ':' || a.atttypmod), '{{}}')::text
            FROM pg_attribute a
            JOIN pg_type ty ON ty.oid = a.atttypid
            JOIN pg_namespace tn ON tn.oid = ty.typnamespace
           WHERE a.attrelid = {relid_expr} AND a.attname = ANY ({columns_param}::text[]) AND NOT a.attisdropped)"
    )
}

impl Seen {
    /// Something to apply: deltas, or a TRUNCATE.
    pub(crate) fn pending(&self) -> bool {
        self.deltas || self.truncated
    }
}

/// Reads what the batch's snapshot shows of `t`. A batch's first call of it
/// is its first statement, the one that takes the snapshot.
pub(crate) async fn seen(
    stx: &tokio_postgres::Transaction<'_>,
    t: &TableState,
    part: Option<Part>,
) -> Result<Seen, tokio_postgres::Error> {
    let row = stx
        .query_one(
            &format!(
                "SELECT extract(epoch FROM now())::float8,
                        EXISTS (SELECT 1 FROM {} {}),
                        $2 AND EXISTS (SELECT 1 FROM pgferry.truncates WHERE table_id = $1),
                        EXISTS (SELECT 1 FROM pg_class
                                 WHERE relnamespace = to_regnamespace('pgferry') AND relname = $3),
                        ARRAY(SELECT a.attname::text FROM pg_attribute a
                               WHERE a.attrelid = $4 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                               ORDER BY a.attnum) <> $5::text[],
                        {}",
                t.delta_table(),
                part_filter(t, part),
                type_signature("$4", "$5")
            ),
            &[&t.id, &part.is_none(), &t.ledger_table().name, &t.relid, &t.copy_columns],
        )
        .await?;
    Ok(Seen {
        epoch: row.get(0),
        deltas: row.get(1),
        truncated: row.get(2),
        ledger: row.get(3),
        columns_changed: row.get(4),
        types: row.get(5),
    })
}

/// The WHERE clause selecting a part's delta rows; nothing for a whole batch.
fn part_filter(t: &TableState, part: Option<Part>) -> String {
    match part {
        None => String::new(),
        Some(p) => format!("WHERE {}", p.predicate(t)),
    }
}

/// One batch of `t` (or of one part of its keys).
pub(crate) async fn batch(
    m: &Migration,
    source: &mut Object,
    t: &TableState,
    group: &[TableState],
    part: Option<Part>,
) -> Result<BatchStats, SyncError> {
    let src_err = |e| batch_err(t, Side::Source, e);
    let started = std::time::Instant::now();

    // The snapshot is taken by the first statement of this transaction, after
    // the batch lock is held (a snapshot taken before it could be older than a
    // batch that committed meanwhile). Its only writes are the removal of the
    // deltas it consumed, after the target commit.
    let stx = match begin(source, &[t]).await {
        Ok(stx) => stx,
        // Held exclusively past lock_timeout (a long VACUUM FULL, CLUSTER,
        // ALTER): its turn comes in a later pass, as when another agent
        // drains it. Not idle: a final drain goes on until it is done.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
            tracing::debug!(table = %t.table.display_name(), "The table is locked; next pass");
            return Ok(BatchStats {
                busy: true,
                ..Default::default()
            });
        }
        Err(e) => return Err(src_err(e)),
    };
    // A part applies only its keys; a TRUNCATE waits for a whole batch (what
    // a part applies is the state as of S for its keys all the same).
    let seen = seen(&stx, t, part).await.map_err(src_err)?;
    if seen.pending() && seen.columns_changed {
        // A row of the new shape would lose what the target cannot hold
        // yet: its delta waits for sync to follow the change.
        return Err(SyncError::SchemaDrift(vec![format!(
            "table {}: columns changed",
            t.table.display_name()
        )]));
    }
    if !seen.pending() {
        stx.commit().await.map_err(src_err)?;
        let stats = BatchStats::default();
        return record(source, t, part, &seen, &stats, started)
            .await
            .map(|()| stats);
    }
    let mut target = m.target_conn().await?;
    let ttx = target
        .transaction()
        .await
        .map_err(|e| batch_err(t, Side::Target, e))?;
    let theirs: String = ttx
        .query_one(
            &format!("SELECT {}", type_signature("to_regclass($1)", "$2")),
            &[&t.table.to_string(), &t.copy_columns],
        )
        .await
        .map_err(|e| batch_err(t, Side::Target, e))?
        .get(0);
    let misfits = super::types::misfits(&theirs, &seen.types);
    if !misfits.is_empty() {
        // ALTER COLUMN ... TYPE on the source: a value of the new type
        // could fail on the target, or be rounded there without a word.
        return Err(SyncError::TypeDrift(
            misfits
                .iter()
                .map(|(c, _)| format!("{}.{c} changed type on the source", t.table.display_name()))
                .collect(),
        ));
    }
    let stats = apply(m, &stx, &ttx, t, group, part, &seen).await?;
    crate::failpoint::hit("sync.before_target_commit").await;
    ttx.commit().await.map_err(|e| batch_err(t, Side::Target, e))?;
    crate::failpoint::hit("sync.after_target_commit").await;
    if part.is_some() {
        crate::failpoint::hit("sync.part_applied").await;
    }
    consume(
        &stx,
        t,
        part,
        &seen,
        seen.ledger,
        stats.truncated || stats.recopied,
    )
    .await
    .map_err(src_err)?;
    stx.commit().await.map_err(src_err)?;
    crate::failpoint::hit("sync.after_delta_delete").await;
    record(source, t, part, &seen, &stats, started).await?;
    Ok(stats)
}

/// Makes `t` on the target, in `ttx`, what it is in the source snapshot
/// `stx` for the keys that snapshot's deltas of `t` name (of `part`), or
/// whole after a TRUNCATE or when most of its rows changed.
pub(crate) async fn apply(
    m: &Migration,
    stx: &tokio_postgres::Transaction<'_>,
    ttx: &tokio_postgres::Transaction<'_>,
    t: &TableState,
    group: &[TableState],
    part: Option<Part>,
    seen: &Seen,
) -> Result<BatchStats, SyncError> {
    let src_err = |e| batch_err(t, Side::Source, e);
    let tgt_err = |e| batch_err(t, Side::Target, e);
    let delta = t.delta_table();
    let mine = part_filter(t, part);
    // Rows written by the drain are compressed like the copy's.
    crate::rows::set_loading(m, ttx).await.map_err(tgt_err)?;
    let table = &t.table;
    // The tables this batch rewrites: the table itself, or for an
    // inheritance parent the parent and every table below it, since a
    // statement on the parent changes its children's rows too (and fires only
    // the parent's triggers). Each row is read from ONLY the table it lives in.
    let members: Vec<&TableState> = std::iter::once(t).chain(below(t, group)).collect();
    // What one DELETE or TRUNCATE covers: ONLY the table, the whole
    // partitioned table, or the whole inheritance hierarchy below a parent.
    let scope = if members.len() > 1 {
        table.to_string()
    } else {
        t.rel()
    };
    let pumped = |e| match e {
        Pumped::Source(e) => src_err(e),
        Pumped::Target(e) => tgt_err(e),
    };
    let mut stats = BatchStats {
        truncated: seen.truncated,
        part: part.is_some(),
        ..Default::default()
    };
    if seen.truncated {
        // Whole-table resynchronisation: the table (and what is below it) as of S.
        stats.rows_written = copy_whole(m, stx, ttx, &scope, &members).await.map_err(pumped)?;
    } else if seen.deltas {
        let keys = column_list(&t.key_columns, None);
        let delta_keys = t.delta_key_list();
        stats.keys = crate::rows::stage_keys(
            stx,
            ttx,
            "pgferry_keys",
            table,
            &t.key_columns,
            &format!("SELECT DISTINCT {delta_keys} FROM {delta} {mine}"),
        )
        .await
        .map_err(pumped)?;
        let join = t
            .key_columns
            .iter()
            .map(|k| format!("t.{k} = k.{k}", k = Ident(k.clone())))
            .collect::<Vec<_>>()
            .join(" AND ");
        // The rate limit counts changed rows; the source transaction stays
        // open while waiting, which only holds back its snapshot.
        m.sync_throttle.take(stats.keys).await;
        if part.is_none()
            && !t.partitioned
            && recopy_pays(m, stx, &members, stats.keys).await.map_err(src_err)?
        {
            // Most rows changed: the table as of S, whole, as after a TRUNCATE.
            stats.recopied = true;
            stats.rows_written = copy_whole(m, stx, ttx, &scope, &members).await.map_err(pumped)?;
        } else {
            ttx.batch_execute("ANALYZE pgferry_keys").await.map_err(tgt_err)?;
            stats.rows_deleted = ttx
                .execute(
                    &format!("DELETE FROM {scope} AS t USING pgferry_keys AS k WHERE {join}"),
                    &[],
                )
                .await
                .map_err(tgt_err)?;
            // The rows as of S go straight into the table they live in, by
            // binary COPY: no staging table, so each row is written once.
            let changed = format!("WHERE ({keys}) IN (SELECT {delta_keys} FROM {delta} {mine})");
            // Already limited: the rows counted by the keys above.
            let unlimited = Throttle::unlimited();
            for member in &members {
                stats.rows_written +=
                    copy_rows(stx, ttx, member, &member.table.to_string(), &changed, &unlimited)
                        .await
                        .map_err(pumped)?;
            }
        }
        // Another table of the same batch may stage its keys next.
        ttx.batch_execute("DROP TABLE pgferry_keys")
            .await
            .map_err(tgt_err)?;
    }
    Ok(stats)
}

/// Forgets, in the source snapshot `stx`, exactly the deltas of `t` (of
/// `part`) it saw, once the target holds what they named: in S itself, so a
/// row committed after S is not touched, and durably only once that
/// transaction commits. With `keep_ledger`, their keys move to the ledger,
/// once each (a hot row changes in many statements, and in many batches):
/// the rows the cutover compares again. A table `rewritten` whole is no longer the one verified,
/// and loses its ledger.
pub(crate) async fn consume(
    stx: &tokio_postgres::Transaction<'_>,
    t: &TableState,
    part: Option<Part>,
    seen: &Seen,
    keep_ledger: bool,
    rewritten: bool,
) -> Result<(), tokio_postgres::Error> {
    forget_deltas(stx, t, &part_filter(t, part), keep_ledger, rewritten).await?;
    if seen.truncated {
        stx.execute("DELETE FROM pgferry.truncates WHERE table_id = $1", &[&t.id])
            .await?;
    }
    Ok(())
}

/// Deletes, in `tx`'s snapshot, the deltas of `t` that `filter` keeps (a
/// WHERE clause, or nothing): with `keep_ledger`, their keys move to `t`'s
/// ledger, once each, and a ledger grown past [`LEDGER_MAX_BYTES`] is
/// dropped; a table `rewritten` whole loses its ledger instead. What a
/// forward batch and a pass of the way back do once the other side holds
/// what the deltas named.
pub(crate) async fn forget_deltas(
    tx: &tokio_postgres::Transaction<'_>,
    t: &TableState,
    filter: &str,
    keep_ledger: bool,
    rewritten: bool,
) -> Result<(), tokio_postgres::Error> {
    let (delta, ledger) = (t.delta_table(), t.ledger_table());
    if keep_ledger && rewritten {
        tx.execute(&format!("DROP TABLE {ledger}"), &[]).await?;
    }
    if keep_ledger && !rewritten {
        let keys = t.delta_key_list();
        tx.execute(
            &format!(
                "WITH gone AS (DELETE FROM {delta} {filter} RETURNING {keys})
                 INSERT INTO {ledger} ({keys}) SELECT DISTINCT {keys} FROM gone ON CONFLICT DO NOTHING"
            ),
            &[],
        )
        .await?;
        // Past this size, comparing the table in full costs less.
        let size: i64 = tx
            .query_one(
                "SELECT pg_relation_size($1::text::regclass)",
                &[&ledger.to_string()],
            )
            .await?
            .get(0);
        if size > LEDGER_MAX_BYTES {
            tx.execute(&format!("DROP TABLE {ledger}"), &[]).await?;
        }
    } else {
        tx.execute(&format!("DELETE FROM {delta} {filter}"), &[]).await?;
    }
    Ok(())
}

/// After a batch's source commit: the table's progress and metrics.
pub(crate) async fn record(
    source: &Object,
    t: &TableState,
    part: Option<Part>,
    seen: &Seen,
    stats: &BatchStats,
    started: std::time::Instant,
) -> Result<(), SyncError> {
    // A part does not say the table is synced through S: other parts may not be.
    let synced_through = part.is_none().then_some(seen.epoch);
    state::record_batch(&***source, t.id, synced_through, stats.rows_written as i64).await?;
    if !seen.pending() {
        crate::telemetry::batch_idle(&t.table.display_name(), false);
        return Ok(());
    }
    let rewritten = stats.truncated || stats.recopied;
    crate::telemetry::batch_applied(
        &t.table.display_name(),
        stats.rows_deleted,
        stats.rows_written,
        rewritten,
        started.elapsed(),
    );
    tracing::debug!(
        table = %t.table.display_name(),
        keys = stats.keys,
        rows = stats.rows_written,
        truncated = stats.truncated,
        recopied = stats.recopied,
        "Batch applied"
    );
    Ok(())
}

/// Distinct changed keys from which a batch weighs copying the whole table
/// instead: below it the estimate costs a round trip for little to gain.
const RECOPY_FROM_KEYS: u64 = 10_000;

/// Whether `keys` distinct changed keys reach `sync.recopy_fraction` of the
/// rows of `members` (the table, or an inheritance parent and the tables
/// below it), by their row estimates as of their last VACUUM or ANALYZE
/// (`reltuples`, which autovacuum keeps current). Not the planner's
/// estimate, which scales them to the relations' size and so counts the
/// dead rows of a table that was just updated throughout; nor the
/// statistics system's live rows, which count a table's first rows twice
/// when an ANALYZE reports before its loading transaction's counts do.
/// Never for a table without an estimate.
///
/// An estimate gone stale low (a table that grew many times over since it
/// was last analyzed, autovacuum off) must not copy a big table whole, the
/// more so under the fence: each member counts at least half the rows its
/// present size holds at its last known density (half, so that the dead
/// rows of a table just updated throughout do not stop its recopy).
async fn recopy_pays(
    m: &Migration,
    stx: &tokio_postgres::Transaction<'_>,
    members: &[&TableState],
    keys: u64,
) -> Result<bool, tokio_postgres::Error> {
    let fraction = m.cfg.sync.recopy_fraction;
    if fraction <= 0.0 || keys < RECOPY_FROM_KEYS {
        return Ok(false);
    }
    let relids: Vec<u32> = members.iter().map(|t| t.relid).collect();
    let rows: f64 = stx
        .query_one(
            "SELECT CASE WHEN bool_or(reltuples < 0) THEN -1 ELSE sum(greatest(reltuples::float8,
                      reltuples::float8 / nullif(relpages, 0)
                        * pg_relation_size(oid) / current_setting('block_size')::int / 2))
                    END::float8
               FROM pg_class WHERE oid = ANY($1)",
            &[&relids],
        )
        .await?
        .get(0);
    Ok(rows > 0.0 && keys as f64 >= fraction * rows)
}

/// Replaces what the target holds under `scope` with `members` whole as of
/// the source transaction's snapshot: TRUNCATE, then each member's rows by
/// binary COPY, limited like the bulk copy (`copy.rate_bytes_per_sec`).
/// Returns the rows written.
async fn copy_whole(
    m: &Migration,
    stx: &tokio_postgres::Transaction<'_>,
    ttx: &tokio_postgres::Transaction<'_>,
    scope: &str,
    members: &[&TableState],
) -> Result<u64, Pumped> {
    ttx.batch_execute(&format!("TRUNCATE {scope}"))
        .await
        .map_err(Pumped::Target)?;
    let mut written = 0;
    for member in members {
        written += copy_rows(stx, ttx, member, &member.table.to_string(), "", &m.copy_throttle).await?;
    }
    Ok(written)
}

/// The tables below `t` in classic inheritance (children, grandchildren...),
/// among the tables of its hierarchy.
pub(crate) fn below<'a>(t: &TableState, group: &'a [TableState]) -> impl Iterator<Item = &'a TableState> {
    let mut found: Vec<u32> = vec![t.relid];
    let mut out = Vec::new();
    // Parents come before children in no particular order: repeat until stable.
    loop {
        let more: Vec<&TableState> = group
            .iter()
            .filter(|g| !found.contains(&g.relid) && g.parent_relid.is_some_and(|p| found.contains(&p)))
            .collect();
        if more.is_empty() {
            break;
        }
        found.extend(more.iter().map(|g| g.relid));
        out.extend(more);
    }
    out.into_iter()
}
