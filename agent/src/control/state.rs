//! The stored state machine: the only module that reads or writes pgferry's
//! control tables (schema `pgferry` on the source). Everything a re-run
//! needs to resume lives there, on the source, so a fresh machine can pick
//! up (or clean up) a migration without any local state.

use serde::Serialize;
use tokio_postgres::GenericClient;

use super::{exists, SCHEMA};
use crate::db::ident::QualifiedTable;

/// Control-schema failures.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A control-schema query failed.
    #[error("control schema operation failed: {what}")]
    Query {
        /// Which operation.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The stored phase is not one this version knows.
    #[error("the control schema holds an unknown phase {0:?}: was it written by a newer pgferry?")]
    UnknownPhase(String),
    /// The control schema is newer than this binary.
    #[error(
        "the control schema is at version {found}, newer than this pgferry ({known}): use the newer binary"
    )]
    TooNew {
        /// Version found.
        found: i32,
        /// Newest version this binary knows.
        known: i32,
    },
}

impl StateError {
    /// The underlying driver error, if any.
    pub fn db(&self) -> Option<&tokio_postgres::Error> {
        match self {
            StateError::Query { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl crate::db::retry::Retryable for StateError {
    fn is_retryable(&self) -> bool {
        self.db().is_some_and(crate::db::errors::is_retryable)
    }
}

impl crate::error::Failure for StateError {
    fn retryable(&self) -> bool {
        crate::db::retry::Retryable::is_retryable(self)
    }
}

pub(super) fn q(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StateError {
    move |source| StateError::Query { what, source }
}

/// Where the migration stands. Stored as text; ordered as the line runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Control schema present, capture triggers being installed.
    Installing,
    /// Every table captured; nothing copied yet.
    Installed,
    /// Schema and data being copied.
    Copying,
    /// Copy finished; deltas are drained.
    Syncing,
    /// The fence is up; final drain and verification in progress.
    CuttingOver,
    /// Writes moved to the target; the source stays fenced until cleanup.
    CutOver,
}

impl Phase {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Installing => "installing",
            Phase::Installed => "installed",
            Phase::Copying => "copying",
            Phase::Syncing => "syncing",
            Phase::CuttingOver => "cutting_over",
            Phase::CutOver => "cut_over",
        }
    }

    fn parse(s: &str) -> Result<Self, StateError> {
        Ok(match s {
            "installing" => Phase::Installing,
            "installed" => Phase::Installed,
            "copying" => Phase::Copying,
            "syncing" => Phase::Syncing,
            "cutting_over" => Phase::CuttingOver,
            "cut_over" => Phase::CutOver,
            other => return Err(StateError::UnknownPhase(other.to_string())),
        })
    }
}

/// The run row.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Current phase.
    pub phase: Phase,
    /// Schema pre-data restored on the target.
    pub pre_data_done: bool,
    /// Indexes and keys built on the target.
    pub post_data_done: bool,
    /// Seconds since the fence was raised, while it is.
    pub fence_age_secs: Option<f64>,
    /// How long writes were blocked by the finished cutover.
    pub writes_blocked_ms: Option<i64>,
    /// The switch command has started: the cutover can no longer be aborted.
    pub switch_started: bool,
}

impl Run {
    /// An aborted cutover lifted the fence but could not yet remove what it
    /// restored on the target (foreign keys, triggers...): phase
    /// `cutting_over` with the fence down and no switch. Nothing may drain
    /// into the target until the abort is finished.
    pub fn target_untidied(&self) -> bool {
        self.phase == Phase::CuttingOver && self.fence_age_secs.is_none() && !self.switch_started
    }
}

/// Copy progress of one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    /// Not copied (or interrupted; copied again from scratch).
    Pending,
    /// Copied and committed on the target.
    Done,
}

/// One captured table and its progress.
#[derive(Debug, Clone, Serialize)]
pub struct TableState {
    /// pgferry's id for the table (names its delta table `d_<id>`).
    pub id: i32,
    /// The table's OID on the source.
    pub relid: u32,
    /// The table.
    pub table: QualifiedTable,
    /// Key columns, in key order.
    pub key_columns: Vec<String>,
    /// Columns copied and applied (generated columns excluded).
    pub copy_columns: Vec<String>,
    /// Their attribute numbers on the table, in their order (control
    /// schema 21; none for a registration older, whose columns have changed
    /// since): how a column renamed is told from one dropped and another
    /// added.
    pub attnums: Option<Vec<i16>>,
    /// Copy progress.
    pub copy_state: CopyState,
    /// Rows copied by the bulk copy.
    pub copied_rows: Option<i64>,
    /// Rows written to the target by the drain.
    pub applied_rows: i64,
    /// Seconds between now and the snapshot of the last completed batch.
    pub lag_secs: Option<f64>,
    /// Copied whole under the fence instead of synced.
    pub copy_only: bool,
    /// A partitioned table: read and written without ONLY.
    pub partitioned: bool,
    /// The root of its hierarchy: all its batches share one lock.
    pub lock_relid: u32,
    /// Its parent in classic inheritance.
    pub parent_relid: Option<u32>,
    /// Moved in COPY's text form, as pg_dump moves it: a column's binary
    /// form does not round-trip ([`TEXT_FORM_TABLES`]).
    pub text_form: bool,
}

/// SQL: common table expressions (the query says `WITH RECURSIVE`) whose
/// `text_form` lists the registered tables (`id`) that have a copied column
/// of a type, or holding one within a domain, array or composite type,
/// whose binary form does not move between servers: the reg* types (object
/// OIDs, which differ on the target; their text is the object's name),
/// `tsquery` (an empty one, what `to_tsquery` makes of stopwords, is sent by
/// the source and refused by the target's receive function), and types
/// without binary I/O. Set-based over the distinct column types: the status
/// sampler reads the tables every few seconds, and a correlated recursion
/// per table took 0.6 s of the source's time at 2,000 tables (this, 50 ms).
pub const TEXT_FORM_TABLES: &str = "cols AS (
    SELECT t.id, a.atttypid AS typ
      FROM pgferry.tables t
      JOIN pg_catalog.pg_attribute a ON a.attrelid = t.relid AND a.attnum > 0 AND NOT a.attisdropped
                                    AND a.attname::text = ANY (t.copy_columns)),
ty(root, t) AS (
    SELECT DISTINCT typ, typ FROM cols
    UNION
    SELECT ty.root, inner_t.t FROM ty JOIN pg_catalog.pg_type p ON p.oid = ty.t
    CROSS JOIN LATERAL (
        SELECT p.typbasetype WHERE p.typtype = 'd'
        UNION ALL SELECT p.typelem WHERE p.typcategory = 'A' AND p.typelem <> 0
        UNION ALL SELECT ca.atttypid FROM pg_catalog.pg_attribute ca
                   WHERE p.typtype = 'c' AND ca.attrelid = p.typrelid AND ca.attnum > 0 AND NOT ca.attisdropped
    ) inner_t(t)),
text_form AS (
    SELECT DISTINCT cols.id FROM cols JOIN ty ON ty.root = cols.typ JOIN pg_catalog.pg_type p ON p.oid = ty.t
     WHERE p.oid = ANY ('{regclass,regtype,regproc,regprocedure,regoper,regoperator,regconfig,regdictionary,
                         regnamespace,regrole,regcollation,tsquery}'::pg_catalog.regtype[])
        OR p.typsend = 0 OR p.typreceive = 0)";

impl TableState {
    /// The COPY format this table moves in: `binary`, or `text`.
    pub fn copy_format(&self) -> &'static str {
        if self.text_form {
            "text"
        } else {
            "binary"
        }
    }

    /// The table as a FROM/UPDATE/DELETE target: `ONLY t` for a plain table or
    /// a partition (its own rows), `t` for a partitioned table (all its
    /// partitions' rows; ONLY would silently see none).
    pub fn rel(&self) -> String {
        if self.partitioned {
            self.table.to_string()
        } else {
            format!("ONLY {}", self.table)
        }
    }

    /// The delta table holding this table's captured keys.
    pub fn delta_table(&self) -> QualifiedTable {
        QualifiedTable::new(SCHEMA, format!("d_{}", self.id))
    }

    /// The key columns of its delta table (and ledger), in the order of
    /// the table's key: `k1, k2, ...`. The one place the Rust side knows
    /// the layout `capture_install` gives a delta table.
    pub fn delta_key_list(&self) -> String {
        (1..=self.key_columns.len())
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Its ledger: the keys of the deltas consumed since the table was
    /// last verified equal before the fence (`cutover.verify = "changed"`).
    /// It exists only while that verification holds.
    pub fn ledger_table(&self) -> QualifiedTable {
        QualifiedTable::new(SCHEMA, format!("v_{}", self.id))
    }
}

/// What the plan registers for capture.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Source OID.
    pub relid: u32,
    /// The table.
    pub table: QualifiedTable,
    /// Key columns.
    pub key_columns: Vec<String>,
    /// Columns to copy.
    pub copy_columns: Vec<String>,
    /// Copied whole under the fence instead of synced (no usable key).
    pub copy_only: bool,
    /// A partitioned table (root or intermediate): read and written without ONLY.
    pub partitioned: bool,
    /// The root of its hierarchy (itself when it has no parent).
    pub lock_relid: u32,
    /// Its parent in classic inheritance.
    pub parent_relid: Option<u32>,
}

/// Reads the run row, if the migration has begun.
pub async fn load(client: &impl GenericClient) -> Result<Option<Run>, StateError> {
    if !exists(client).await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT phase, pre_data_done, post_data_done,
                    extract(epoch FROM clock_timestamp() - fence_raised_at)::float8,
                    writes_blocked_ms, switch_started_at IS NOT NULL
               FROM pgferry.run",
            &[],
        )
        .await
        .map_err(q("read the run state"))?;
    row.map(|r| {
        Ok(Run {
            phase: Phase::parse(r.get(0))?,
            pre_data_done: r.get(1),
            post_data_done: r.get(2),
            fence_age_secs: r.get(3),
            writes_blocked_ms: r.get(4),
            switch_started: r.get(5),
        })
    })
    .transpose()
}

/// Moves the run to `phase`.
pub async fn set_phase(client: &impl GenericClient, phase: Phase) -> Result<(), StateError> {
    client
        .execute(
            "INSERT INTO pgferry.run (phase) VALUES ($1)
             ON CONFLICT (singleton) DO UPDATE SET phase = EXCLUDED.phase, updated_at = now()",
            &[&phase.as_str()],
        )
        .await
        .map_err(q("set the phase"))?;
    tracing::info!(phase = phase.as_str(), "Phase changed");
    crate::telemetry::phase(phase.as_str());
    Ok(())
}

/// Which one-time schema step finished.
#[derive(Debug, Clone, Copy)]
pub enum SchemaStep {
    /// Tables, types, functions restored.
    PreData,
    /// Indexes and keys built.
    PostData,
}

/// Records that a schema step finished on the target.
pub async fn mark_schema_step(client: &impl GenericClient, step: SchemaStep) -> Result<(), StateError> {
    let sql = match step {
        SchemaStep::PreData => "UPDATE pgferry.run SET pre_data_done = true, updated_at = now()",
        SchemaStep::PostData => "UPDATE pgferry.run SET post_data_done = true, updated_at = now()",
    };
    client
        .execute(sql, &[])
        .await
        .map_err(q("record a schema step"))?;
    Ok(())
}

/// Registers tables for capture (those already registered are kept as they are).
pub async fn register_tables(client: &impl GenericClient, regs: &[Registration]) -> Result<(), StateError> {
    for r in regs {
        client
            .execute(
                &format!(
                    "INSERT INTO pgferry.tables (relid, schema_name, table_name, key_columns, copy_columns, copy_only,
                                                 partitioned, lock_relid, parent_relid, attnums)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, {}) ON CONFLICT (relid) DO NOTHING",
                    attnums("$5", "NULL::int2[]", "NULL::text[]", "$1")
                ),
                &[
                    &r.relid,
                    &r.table.schema,
                    &r.table.name,
                    &r.key_columns,
                    &r.copy_columns,
                    &r.copy_only,
                    &r.partitioned,
                    &r.lock_relid,
                    &r.parent_relid,
                ],
            )
            .await
            .map_err(q("register a table"))?;
    }
    Ok(())
}

/// Updates a registration whose columns changed and marks the table for a
/// fresh copy.
pub async fn reregister_columns(
    client: &impl GenericClient,
    id: i32,
    copy_columns: &[String],
) -> Result<(), StateError> {
    set_copy_columns(client, id, copy_columns).await?;
    client
        .execute(
            "UPDATE pgferry.tables SET copy_state = 'pending', copied_rows = NULL WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(q("update a registration"))?;
    client
        .execute("DELETE FROM pgferry.copy_parts WHERE table_id = $1", &[&id])
        .await
        .map_err(q("forget a table's copy parts"))?;
    Ok(())
}

/// SQL: the attribute numbers of the columns `columns` (text[]) of the
/// table `relid`, in their order: a column the registration names already
/// (`old_columns`, with their numbers `old_attnums`) keeps its number, since
/// its name may be gone from the table while sync follows a deploy in
/// steps; another is looked up by name. NULL when one is not found.
fn attnums(columns: &str, old_attnums: &str, old_columns: &str, relid: &str) -> String {
    format!(
        "(SELECT CASE WHEN count(coalesce(o.num, a.attnum)) = cardinality({columns}::text[])
                      THEN array_agg(coalesce(o.num, a.attnum) ORDER BY u.ord) END
            FROM unnest({columns}::text[]) WITH ORDINALITY AS u(name, ord)
            LEFT JOIN unnest({old_columns}, {old_attnums}) AS o(name, num) ON o.name = u.name
            LEFT JOIN pg_catalog.pg_attribute a
                   ON a.attrelid = {relid} AND a.attname = u.name AND a.attnum > 0 AND NOT a.attisdropped)"
    )
}

/// Updates a registration whose columns changed on both sides alike (sync
/// followed the change): no fresh copy.
pub async fn set_copy_columns(
    client: &impl GenericClient,
    id: i32,
    copy_columns: &[String],
) -> Result<(), StateError> {
    client
        .execute(
            &format!(
                "UPDATE pgferry.tables t SET copy_columns = $2, attnums = {} WHERE id = $1",
                attnums("$2", "t.attnums", "t.copy_columns", "t.relid")
            ),
            &[&id, &copy_columns],
        )
        .await
        .map_err(q("update a registration's columns"))?;
    Ok(())
}

/// Updates the name of a registered table (renamed on the source, and on
/// the target by sync).
pub async fn rename_registration(
    client: &impl GenericClient,
    relid: u32,
    to: &crate::db::ident::QualifiedTable,
) -> Result<(), StateError> {
    client
        .execute(
            "UPDATE pgferry.tables SET schema_name = $2, table_name = $3 WHERE relid = $1",
            &[&relid, &to.schema, &to.name],
        )
        .await
        .map_err(q("rename a registration"))?;
    Ok(())
}

/// Forgets a table: its registration, its TRUNCATE events and its delta table.
pub async fn unregister(client: &impl GenericClient, t: &TableState) -> Result<(), StateError> {
    client
        .batch_execute(&format!(
            "DELETE FROM pgferry.truncates WHERE table_id = {id};
             DELETE FROM pgferry.tables WHERE id = {id};
             DROP TABLE IF EXISTS {delta};
             DROP TABLE IF EXISTS {ledger};",
            id = t.id,
            delta = t.delta_table(),
            ledger = t.ledger_table()
        ))
        .await
        .map_err(q("unregister a table"))?;
    Ok(())
}

/// The ids of the tables that have a ledger (see
/// [`TableState::ledger_table`]).
pub async fn ledgers(client: &impl GenericClient) -> Result<Vec<i32>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT substr(relname, 3)::int FROM pg_class
              WHERE relnamespace = to_regnamespace('pgferry') AND relkind = 'r' AND relname ~ '^v_[0-9]+$'",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Forgets that the table was verified before the fence: its next cutover
/// compares it in full, or verifies it afresh first.
pub async fn drop_ledger(client: &impl GenericClient, t: &TableState) -> Result<(), StateError> {
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS {}", t.ledger_table()))
        .await
        .map_err(q("drop a ledger"))
}

/// Every registered table with its progress, in id order.
pub async fn tables(client: &impl GenericClient) -> Result<Vec<TableState>, StateError> {
    let rows = client
        .query(
            &format!(
                "WITH RECURSIVE {TEXT_FORM_TABLES}
                 SELECT t.id, relid, schema_name, table_name, key_columns, copy_columns, copy_state,
                    copied_rows, applied_rows,
                    extract(epoch FROM clock_timestamp() - greatest(
                        synced_through,
                        CASE WHEN copy_state = 'done' AND NOT coalesce(id = ANY (r.pass_dirty), true)
                             THEN r.pass_checked_at END))::float8,
                    copy_only, partitioned, lock_relid, parent_relid,
                        t.id IN (SELECT id FROM text_form), t.attnums
               FROM pgferry.tables t LEFT JOIN pgferry.run r ON true ORDER BY t.id"
            ),
            &[],
        )
        .await
        .map_err(q("read the registered tables"))?;
    Ok(rows
        .iter()
        .map(|r| TableState {
            id: r.get(0),
            relid: r.get(1),
            table: QualifiedTable::new(r.get::<_, String>(2), r.get::<_, String>(3)),
            key_columns: r.get(4),
            copy_columns: r.get(5),
            copy_state: if r.get::<_, &str>(6) == "done" {
                CopyState::Done
            } else {
                CopyState::Pending
            },
            copied_rows: r.get(7),
            applied_rows: r.get(8),
            lag_secs: r.get(9),
            copy_only: r.get(10),
            partitioned: r.get(11),
            lock_relid: r.get(12),
            parent_relid: r.get(13),
            text_form: r.get(14),
            attnums: r.get(15),
        })
        .collect())
}

/// Records a table's finished bulk copy.
pub async fn mark_copied(client: &impl GenericClient, id: i32, rows: i64) -> Result<(), StateError> {
    client
        .execute(
            "UPDATE pgferry.tables SET copy_state = 'done', copied_rows = $2, copied_at = now() WHERE id = $1",
            &[&id, &rows],
        )
        .await
        .map_err(q("record a finished table copy"))?;
    client
        .execute("DELETE FROM pgferry.copy_parts WHERE table_id = $1", &[&id])
        .await
        .map_err(q("forget a table's copy parts"))?;
    Ok(())
}

/// One block range of a table copied in parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyPart {
    /// Its number within the table, from 0.
    pub part: i32,
    /// First block of the range.
    pub first_block: i64,
    /// End of the range (exclusive); `None` runs to the end of the table.
    pub end_block: Option<i64>,
    /// The target transaction that loads it, once recorded.
    pub target_xid: Option<String>,
    /// Rows it loaded, recorded with `target_xid`.
    pub rows: Option<i64>,
    /// Its target transaction has committed.
    pub done: bool,
}

/// The parts of a table being copied in parts, by part number (empty when
/// none are planned).
pub async fn copy_parts(client: &impl GenericClient, table_id: i32) -> Result<Vec<CopyPart>, StateError> {
    let rows = client
        .query(
            "SELECT part, first_block, end_block, target_xid, rows, done
               FROM pgferry.copy_parts WHERE table_id = $1 ORDER BY part",
            &[&table_id],
        )
        .await
        .map_err(q("read a table's copy parts"))?;
    Ok(rows
        .iter()
        .map(|r| CopyPart {
            part: r.get(0),
            first_block: r.get(1),
            end_block: r.get(2),
            target_xid: r.get(3),
            rows: r.get(4),
            done: r.get(5),
        })
        .collect())
}

/// Plans a table's parts: block ranges `[first, end)`, the last one open.
pub async fn plan_copy_parts(
    client: &impl GenericClient,
    table_id: i32,
    ranges: &[(i64, Option<i64>)],
) -> Result<(), StateError> {
    let first: Vec<i64> = ranges.iter().map(|r| r.0).collect();
    let end: Vec<Option<i64>> = ranges.iter().map(|r| r.1).collect();
    client
        .execute(
            "INSERT INTO pgferry.copy_parts (table_id, part, first_block, end_block)
             SELECT $1, o::int - 1, f, e FROM unnest($2::bigint[], $3::bigint[]) WITH ORDINALITY AS u(f, e, o)
             ON CONFLICT DO NOTHING",
            &[&table_id, &first, &end],
        )
        .await
        .map_err(q("plan a table's copy parts"))?;
    Ok(())
}

/// Records the target transaction loading a part, before it commits.
pub async fn part_in_doubt(
    client: &impl GenericClient,
    table_id: i32,
    part: i32,
    target_xid: &str,
    rows: i64,
) -> Result<(), StateError> {
    client
        .execute(
            "UPDATE pgferry.copy_parts SET target_xid = $3, rows = $4 WHERE table_id = $1 AND part = $2",
            &[&table_id, &part, &target_xid, &rows],
        )
        .await
        .map_err(q("record a part's target transaction"))?;
    Ok(())
}

/// Settles a part: done when its target transaction committed, otherwise
/// forgotten so that it is copied again.
pub async fn settle_part(
    client: &impl GenericClient,
    table_id: i32,
    part: i32,
    committed: bool,
) -> Result<(), StateError> {
    let sql = if committed {
        "UPDATE pgferry.copy_parts SET done = true WHERE table_id = $1 AND part = $2"
    } else {
        "UPDATE pgferry.copy_parts SET target_xid = NULL, rows = NULL WHERE table_id = $1 AND part = $2"
    };
    client
        .execute(sql, &[&table_id, &part])
        .await
        .map_err(q("settle a copy part"))?;
    Ok(())
}

/// Records a committed drain batch: the table is on the target as of
/// `snapshot_epoch` (seconds since the epoch, source clock), when given; a
/// batch of only part of the table's keys adds its rows and says nothing.
pub async fn record_batch(
    client: &impl GenericClient,
    id: i32,
    snapshot_epoch: Option<f64>,
    applied_rows: i64,
) -> Result<(), StateError> {
    client
        .execute(
            "UPDATE pgferry.tables
                SET synced_through = coalesce(to_timestamp($2), synced_through), applied_rows = applied_rows + $3
              WHERE id = $1",
            &[&id, &snapshot_epoch, &applied_rows],
        )
        .await
        .map_err(q("record a drain batch"))?;
    Ok(())
}

/// Records what a drain pass found: every table but `dirty` was in sync
/// as of `checked_epoch` (see `control/sql/0013_drain_pass.sql`). Committed
/// asynchronously: it only tells the lag, and one lost in a crash of the
/// source leaves an older, larger one.
pub async fn record_pass(
    client: &mut tokio_postgres::Client,
    checked_epoch: f64,
    dirty: &[i32],
) -> Result<(), StateError> {
    let tx = client.transaction().await.map_err(q("record a drain pass"))?;
    tx.batch_execute("SET LOCAL synchronous_commit = off")
        .await
        .map_err(q("record a drain pass"))?;
    tx.execute(
        "UPDATE pgferry.run SET pass_checked_at = to_timestamp($1), pass_dirty = $2",
        &[
            &checked_epoch as &(dyn tokio_postgres::types::ToSql + Sync),
            &dirty,
        ],
    )
    .await
    .map_err(q("record a drain pass"))?;
    tx.commit().await.map_err(q("record a drain pass"))
}

/// Records when the fence went up (or clears it).
pub async fn record_fence(client: &impl GenericClient, raised: bool) -> Result<(), StateError> {
    let sql = if raised {
        "UPDATE pgferry.run SET fence_raised_at = coalesce(fence_raised_at, clock_timestamp()), updated_at = now()"
    } else {
        "UPDATE pgferry.run SET fence_raised_at = NULL, updated_at = now()"
    };
    client.execute(sql, &[]).await.map_err(q("record the fence"))?;
    Ok(())
}

/// Records the point of no return: the switch command is about to run.
pub async fn record_switch_started(client: &impl GenericClient) -> Result<(), StateError> {
    client
        .execute(
            "UPDATE pgferry.run SET switch_started_at = coalesce(switch_started_at, clock_timestamp()), updated_at = now()",
            &[],
        )
        .await
        .map_err(q("record the switch"))?;
    Ok(())
}

/// Clears the switch marker: the switch command reported that it did not switch.
pub async fn clear_switch_started(client: &impl GenericClient) -> Result<(), StateError> {
    client
        .execute(
            "UPDATE pgferry.run SET switch_started_at = NULL, updated_at = now()",
            &[],
        )
        .await
        .map_err(q("clear the switch marker"))?;
    Ok(())
}

/// Records the finished cutover and returns how long writes were blocked.
pub async fn record_cutover_done(client: &impl GenericClient) -> Result<i64, StateError> {
    let row = client
        .query_one(
            "UPDATE pgferry.run
                SET phase = 'cut_over', cutover_done_at = clock_timestamp(), updated_at = now(),
                    writes_blocked_ms = (extract(epoch FROM clock_timestamp() - fence_raised_at) * 1000)::bigint
              RETURNING writes_blocked_ms",
            &[],
        )
        .await
        .map_err(q("record the finished cutover"))?;
    Ok(row.get::<_, Option<i64>>(0).unwrap_or(0))
}

/// Records on the old source that a switchback went back to it, or (`on`
/// false, when a cutover finishes) forgets it (control schema 19; an older
/// one records nothing).
pub async fn record_switched_back(client: &impl GenericClient, on: bool) -> Result<(), StateError> {
    client
        .batch_execute(&format!(
            "DO $$ BEGIN
               IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                           WHERE attrelid = 'pgferry.run'::regclass
                             AND attname = 'switched_back_at' AND NOT attisdropped) THEN
                 UPDATE pgferry.run SET switched_back_at = {};
               END IF;
             END $$",
            if on { "now()" } else { "NULL" }
        ))
        .await
        .map_err(q("record the switchback"))?;
    Ok(())
}

/// Whether a switchback went back to this source since its last cutover
/// (see [`record_switched_back`]).
pub async fn switched_back(client: &impl GenericClient) -> Result<bool, StateError> {
    let row = client
        .query_opt(
            "SELECT (to_jsonb(r) ->> 'switched_back_at') IS NOT NULL FROM pgferry.run r",
            &[],
        )
        .await
        .map_err(q("read the switchback"))?;
    Ok(row.is_some_and(|r| r.get(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_gauge_knows_every_phase() {
        let all = [
            Phase::Installing,
            Phase::Installed,
            Phase::Copying,
            Phase::Syncing,
            Phase::CuttingOver,
            Phase::CutOver,
        ];
        let names: Vec<&str> = all.iter().map(|p| p.as_str()).collect();
        assert_eq!(names, crate::telemetry::PHASES);
        for name in crate::telemetry::PHASES {
            assert_eq!(Phase::parse(name).unwrap().as_str(), name);
        }
    }
}
