//! Capture: the control schema and the triggers that record every change.
//!
//! On entry: the preflight has no blockers. On exit: every planned table has
//! its four statement-level capture triggers (INSERT, UPDATE, DELETE,
//! TRUNCATE) committed, and a plain table also the row trigger that records
//! an UPDATE's old key when the key changes (see
//! `sql/0009_key_change_trigger.sql`), and the phase is `installed`, so any
//! snapshot taken from now on misses nothing that the delta tables do not
//! hold.
//!
//! Each table is handled in its own short transaction with the source's
//! `lock_timeout`; a timeout is retried with backoff, so the application never
//! queues behind pgferry for longer than that timeout. Safe to re-run: tables
//! already captured are skipped.

use tokio_util::sync::CancellationToken;

use crate::db::ident::Ident;
use crate::db::Migration;
use crate::plan;
use crate::db::retry::{retry, Gave, Retryable};
use crate::state::{self, Phase, Registration, TableState};

/// Capture failures.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Reading the plan failed.
    #[error("could not read the source catalog")]
    Catalog(#[source] tokio_postgres::Error),
    /// Installing one table's triggers failed for good.
    #[error("could not install capture on {table}")]
    Install {
        /// The table.
        table: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Removing one table's triggers failed for good.
    #[error("could not remove capture from {table}")]
    Remove {
        /// The table.
        table: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Another session holds (or waits for) a lock on the table in a
    /// transaction older than `source_limits.trigger_lock_timeout_ms`:
    /// asking now would queue the application behind pgferry.
    #[error("{table} is in use by a longer transaction ({holder}); pgferry waits for its turn")]
    Busy {
        /// The table.
        table: String,
        /// Who holds it.
        holder: String,
    },
    /// A session could not be opened.
    #[error(transparent)]
    Connect(#[from] crate::db::endpoint::ConnectError),
    /// A migration is already past installation.
    #[error("capture is already installed and the migration is in phase {0:?}")]
    AlreadyPast(Phase),
}

/// What install did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstallReport {
    /// Tables captured (including those captured by an earlier run).
    pub tables: usize,
    /// Tables whose triggers this run installed.
    pub installed_now: usize,
    /// Registrations changed to follow the source schema.
    pub refreshed: usize,
}

/// Installs the control schema and capture triggers. The caller has run the
/// preflight. On a migration already under way it re-registers what changed
/// in the source schema since (see [`refresh`]).
pub async fn install(m: &Migration, cancel: &CancellationToken) -> Result<InstallReport, crate::Error> {
    install_as(m, cancel, Seen::Now).await
}

/// Which source tables [`install_as`] brings the registrations in line with.
#[derive(Debug)]
pub enum Seen {
    /// The catalog as it is now.
    Now,
    /// The catalog as read before: a partition follow registers what it
    /// repeated on the target, not what the source's maintenance created,
    /// attached, detached or dropped since (the next follow's).
    Then(Vec<plan::SourceTable>),
    /// The registrations as they are: only capture what they name and a
    /// killed run left uncaptured.
    Registered,
}

/// [`install`], the registrations brought in line with `seen`.
pub async fn install_as(
    m: &Migration,
    cancel: &CancellationToken,
    seen: Seen,
) -> Result<InstallReport, crate::Error> {
    let mut conn = m.source_conn().await?;
    let run = state::load(&**conn).await?;
    if let Some(run) = &run {
        if run.phase >= Phase::CuttingOver {
            return Err(crate::Error::Phase(format!(
                "the migration is in phase {}: finish (or abort) the cutover before installing again",
                run.phase.as_str()
            )));
        }
    }
    let registered_only = matches!(seen, Seen::Registered) && run.is_some();
    let current = match seen {
        Seen::Then(current) => current,
        // Nothing is registered anew, so the catalog is not read.
        _ if registered_only => Vec::new(),
        Seen::Now | Seen::Registered => plan::source_tables(&**conn, false)
            .await
            .map_err(CaptureError::Catalog)?,
    };
    // Creating the schema takes no lock on any application table; on an
    // existing one this applies the migrations a newer pgferry brings.
    state::ensure_schema(&mut conn).await?;
    let mut refreshed = 0;
    match &run {
        None => {
            let regs: Vec<Registration> = current
                .iter()
                .filter_map(|t| t.registration(&m.cfg.copy_only))
                .collect();
            state::register_tables(&**conn, &regs).await?;
            state::set_phase(&**conn, Phase::Installing).await?;
            crate::failpoint::hit("install.after_register").await;
        }
        Some(_) if registered_only => {}
        Some(run) => {
            refreshed = refresh(m, &conn, cancel, &current).await?;
            if refreshed > 0 && run.phase >= Phase::Syncing {
                // Until every table registered now is captured: the copy
                // must not start before, nor the drain meet a table
                // without its delta table.
                state::set_phase(&**conn, Phase::Installing).await?;
            }
        }
    }
    let tables = state::tables(&**conn).await?;
    let done = captured(&conn).await.map_err(CaptureError::Catalog)?;
    let mut installed_now = 0;
    for t in tables.iter().filter(|t| !done.contains(&t.id)) {
        if cancel.is_cancelled() {
            return Err(crate::Error::Cancelled);
        }
        // A copy_only table only needs the fence.
        let install = if t.copy_only {
            "SELECT pgferry.fence_install($1)"
        } else {
            "SELECT pgferry.capture_install($1)"
        };
        let what = format!("install capture on {}", t.table.display_name());
        // A fresh session per attempt: the one that failed may be gone.
        retry_ddl(m, cancel, &what, || async move {
            let failed = |source| CaptureError::Install {
                table: t.table.display_name(),
                source,
            };
            let mut conn = m.source_conn().await?;
            let tx = conn.transaction().await.map_err(failed)?;
            take_turn(m, &tx, Some(t.relid), &t.table.display_name()).await?;
            tx.execute(install, &[&t.id]).await.map_err(failed)?;
            tx.execute(
                &format!("UPDATE pgferry.tables t SET trigger_stamp = {TRIGGER_STAMP} WHERE t.id = $1"),
                &[&t.id],
            )
            .await
            .map_err(failed)?;
            tx.commit().await.map_err(failed)
        })
        .await?;
        installed_now += 1;
        tracing::info!(table = %t.table.display_name(), "Capture installed");
        crate::failpoint::hit("install.table_done").await;
    }
    // Writes to extensions' configuration tables are fenced with the rest.
    crate::extension_config::fence(m, cancel).await?;
    match run.map(|r| r.phase) {
        None | Some(Phase::Installing) => state::set_phase(&**conn, Phase::Installed).await?,
        Some(phase) if refreshed > 0 && phase >= Phase::Syncing => {
            // Changed and new tables must be copied before sync resumes.
            state::set_phase(&**conn, Phase::Copying).await?;
        }
        Some(_) => {}
    }
    Ok(InstallReport {
        tables: tables.len(),
        installed_now,
        refreshed,
    })
}

/// Brings the registrations in line with the source schema: dropped tables
/// are forgotten; renamed tables, tables attached to or detached from a
/// hierarchy, tables whose key changed, tables whose
/// key column trigger a new BEFORE UPDATE trigger bypasses and tables whose
/// capture was disabled or dropped are captured afresh; tables whose columns
/// changed are marked for a fresh copy; new tables are registered. Returns
/// how many tables changed.
async fn refresh(
    m: &Migration,
    conn: &tokio_postgres::Client,
    cancel: &CancellationToken,
    current: &[plan::SourceTable],
) -> Result<usize, crate::Error> {
    let registered = state::tables(conn).await?;
    let gaps = crate::drift::CaptureGaps::read(conn)
        .await
        .map_err(CaptureError::Catalog)?;
    let mut changed = 0;
    for t in &registered {
        let now = current.iter().find(|c| c.relid == t.relid);
        match now {
            None => {
                remove(m, conn, cancel, t, false).await?;
                state::unregister(conn, t).await?;
            }
            Some(c)
                if c.table != t.table
                    || c.lock_relid != t.lock_relid
                    || c.parent_relid != t.parent_relid
                    || c.registered_key(&m.cfg.copy_only) != t.key_columns
                    || gaps.bypassed.contains(&t.relid)
                    || gaps.lost.contains(&t.relid) =>
            {
                remove(m, conn, cancel, t, true).await?;
                state::unregister(conn, t).await?;
                state::register_tables(
                    conn,
                    &c.registration(&m.cfg.copy_only).into_iter().collect::<Vec<_>>(),
                )
                .await?;
            }
            Some(c) if c.copy_columns != t.copy_columns => {
                state::reregister_columns(conn, t.id, &c.copy_columns).await?;
            }
            Some(_) => continue,
        }
        tracing::info!(table = %t.table.display_name(), "Registration refreshed after a schema change");
        changed += 1;
    }
    let new: Vec<Registration> = current
        .iter()
        .filter(|c| !registered.iter().any(|t| t.relid == c.relid))
        .filter_map(|t| t.registration(&m.cfg.copy_only))
        .collect();
    changed += new.len();
    state::register_tables(conn, &new).await?;
    Ok(changed)
}

/// Removes one registered table's capture: its triggers (when the table still
/// exists) and its trigger functions.
async fn remove(
    m: &Migration,
    conn: &tokio_postgres::Client,
    cancel: &CancellationToken,
    t: &TableState,
    table_exists: bool,
) -> Result<(), crate::Error> {
    if table_exists {
        let names: Vec<String> = SUFFIXES
            .iter()
            .map(|s| format!("pgferry_capture_{s}"))
            .chain(std::iter::once("pgferry_fence".to_string()))
            .collect();
        let relid_table: String = conn
            .query_one("SELECT $1::oid::regclass::text", &[&t.relid])
            .await
            .map_err(CaptureError::Catalog)?
            .get(0);
        drop_triggers(m, cancel, &relid_table, &names).await?;
    }
    let functions: String = SUFFIXES
        .iter()
        .map(|s| {
            format!(
                "DROP FUNCTION IF EXISTS pgferry.{}();",
                Ident(format!("capture_{}_{s}", t.id))
            )
        })
        .collect();
    conn.batch_execute(&functions)
        .await
        .map_err(CaptureError::Catalog)?;
    Ok(())
}

/// The capture triggers and functions, by the suffix of their names: the
/// four events, and the key column trigger of plain tables.
const SUFFIXES: [&str; 5] = ["ins", "upd", "del", "trunc", "key"];

/// Drops the named triggers of one table in one short transaction, under the
/// source's lock timeout and retries. `table` is SQL text for the table: a
/// `regclass` rendering or a [`QualifiedTable`](crate::db::ident::QualifiedTable).
pub(crate) async fn drop_triggers(
    m: &Migration,
    cancel: &CancellationToken,
    table: &str,
    names: &[String],
) -> Result<(), crate::Error> {
    let sql: String = names
        .iter()
        .map(|n| format!("DROP TRIGGER IF EXISTS {} ON {table};", Ident(n.clone())))
        .collect();
    let what = format!("drop capture triggers on {table}");
    let sql = &sql;
    // A fresh session per attempt: the one that failed may be gone.
    retry_ddl(m, cancel, &what, || async move {
        let failed = |source| CaptureError::Remove {
            table: table.to_string(),
            source,
        };
        let mut conn = m.source_conn().await?;
        let tx = conn.transaction().await.map_err(failed)?;
        take_turn(m, &tx, None, table).await?;
        tx.batch_execute(sql).await.map_err(failed)?;
        tx.commit().await.map_err(failed)
    })
    .await
}

/// Before pgferry asks for a lock on an application table, in `tx` (to
/// create or drop its triggers: ACCESS EXCLUSIVE, behind which every
/// statement on the table queues while the request waits): asks only when
/// no other session has held a lock on the table or its partitions in a
/// transaction open for [`LONG_TRANSACTION_MS`] or more, nor waits for one,
/// and then with `source_limits.trigger_lock_timeout_ms` as its
/// `lock_timeout`. A long transaction of the application's is waited out
/// ([`CaptureError::Busy`], retried with backoff) instead of asked behind
/// again and again; statements that each take a while (a growing TOAST
/// value rewritten back to back) are asked between, and a request that
/// meets one waits at most the timeout. Either way the application's
/// other statements on the table wait for pgferry at most that long. The
/// table is `relid`, or else `table` read as SQL text for it (which names
/// it in messages either way). Sessions whose details pg_stat_activity
/// hides (another role's) count as short.
/// How long another session's transaction must have held a table for
/// [`take_turn`] to wait it out rather than ask: long enough that the
/// application's ordinary statements, even slow ones, are not taken for it.
const LONG_TRANSACTION_MS: i64 = 1_000;

pub(crate) async fn take_turn(
    m: &Migration,
    tx: &tokio_postgres::Transaction<'_>,
    relid: Option<u32>,
    table: &str,
) -> Result<(), CaptureError> {
    let ms = m.cfg.source_limits.trigger_lock_timeout_ms as i64;
    let long = LONG_TRANSACTION_MS.max(ms);
    let busy = tx
        .query_opt(
            "SELECT format('pid %s %s %s', l.pid, CASE WHEN l.granted THEN 'holds' ELSE 'waits for' END, l.mode)
               FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'relation'
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.relation IN (SELECT r.oid FROM (SELECT coalesce($1::oid, to_regclass($2))::regclass AS oid) r
                                   UNION ALL SELECT p.relid FROM pg_partition_tree(coalesce($1::oid, to_regclass($2))::regclass) p)
                AND l.pid <> pg_backend_pid()
                AND (NOT l.granted OR a.xact_start < clock_timestamp() - $3::int8 * interval '1 millisecond')
              LIMIT 1",
            &[&relid, &table, &long],
        )
        .await
        .map_err(CaptureError::Catalog)?;
    if let Some(row) = busy {
        return Err(CaptureError::Busy {
            table: table.to_string(),
            holder: row.get(0),
        });
    }
    tx.batch_execute(&format!("SET LOCAL lock_timeout = {ms}"))
        .await
        .map_err(CaptureError::Catalog)
}

/// The registered tables whose UPDATE capture takes old keys from the key
/// column trigger and that have since got a BEFORE UPDATE row trigger of
/// their own: a key that such a trigger changes goes unseen by the column
/// trigger, so these tables must be captured (and copied) afresh.
/// None before control schema version 9, which brought the key column
/// trigger.
pub(crate) async fn key_trigger_bypassed(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Vec<u32>, tokio_postgres::Error> {
    let v9: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pgferry.schema_migrations WHERE version = 9)",
            &[],
        )
        .await?
        .get(0);
    if !v9 {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT t.relid FROM pgferry.tables t
              WHERE t.key_trigger AND NOT pgferry.key_trigger_fits(t.relid)
                AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.relid)",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The names and row versions (xmin) of registered table `t`'s pgferry
/// triggers: any ALTER TABLE ... ENABLE/DISABLE TRIGGER on one changes it
/// (`sql/0012_trigger_stamps.sql`).
const TRIGGER_STAMP: &str = r"(SELECT string_agg(s.tgname || ':' || s.xmin::text, ',' ORDER BY s.tgname)
                                FROM pg_trigger s WHERE s.tgrelid = t.relid AND s.tgname LIKE 'pgferry\_%')";

/// The registered tables (still on the source) whose capture is not all
/// there and enabled: a capture trigger (or a copy_only table's fence
/// trigger) dropped, or disabled (`ALTER TABLE ... DISABLE TRIGGER`, which
/// the table's owner may run). pgferry's triggers are `ENABLE ALWAYS`, so
/// `session_replication_role` does not bypass them, and one disabled and
/// enabled again the plain way (`ENABLE TRIGGER`) shows here too; one
/// enabled again `ENABLE ALWAYS` shows by its row version, recorded at
/// install. Writes made meanwhile may have gone uncaptured, so these tables
/// must be captured and copied afresh. None while the first install is
/// still under way: a table it has yet to reach has no triggers.
pub(crate) async fn capture_lost(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Vec<u32>, tokio_postgres::Error> {
    // `key_trigger` arrived with control schema version 9 and
    // `trigger_stamp` with 12; read through jsonb so that an older schema
    // reads as "no key column trigger" and "nothing recorded".
    let rows = client
        .query(
            &format!(
                r"SELECT t.relid FROM pgferry.tables t
               CROSS JOIN LATERAL (
                 SELECT count(*) AS present, count(*) FILTER (WHERE g.tgenabled = 'A') AS enabled
                   FROM pg_trigger g
                  WHERE g.tgrelid = t.relid
                    AND g.tgname LIKE CASE WHEN t.copy_only THEN 'pgferry\_fence' ELSE 'pgferry\_capture\_%' END
               ) g
              WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.relid)
                AND (SELECT phase FROM pgferry.run) <> 'installing'
                AND (g.enabled < g.present
                     OR g.present < CASE WHEN t.copy_only THEN 1
                                         WHEN coalesce((to_jsonb(t) ->> 'key_trigger')::boolean, false) THEN 5
                                         ELSE 4 END
                     OR coalesce((to_jsonb(t) ->> 'trigger_stamp') <> {TRIGGER_STAMP}, false))"
            ),
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The registered tables that have all their triggers: the four capture
/// triggers, or the fence trigger of a copy_only table. One round trip for
/// all (a follow of partition maintenance runs `install` with thousands of
/// tables captured already).
async fn captured(client: &tokio_postgres::Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    // A table's capture is installed in one statement: all of it or nothing
    // (four triggers, or five with the key column trigger).
    let rows = client
        .query(
            "SELECT t.id FROM pgferry.tables t
              WHERE (SELECT count(*) FROM pg_trigger g
                      WHERE g.tgrelid = t.relid
                        AND g.tgname LIKE CASE WHEN t.copy_only THEN 'pgferry\\_fence'
                                               ELSE 'pgferry\\_capture\\_%' END)
                    >= CASE WHEN t.copy_only THEN 1 ELSE 4 END",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

impl Retryable for CaptureError {
    fn is_retryable(&self) -> bool {
        match self {
            CaptureError::Install { source, .. }
            | CaptureError::Remove { source, .. }
            | CaptureError::Catalog(source) => crate::db::errors::is_retryable(source),
            CaptureError::Connect(e) => e.is_retryable(),
            CaptureError::Busy { .. } => true,
            CaptureError::AlreadyPast(_) => false,
        }
    }
}

impl crate::error::Failure for CaptureError {
    fn retryable(&self) -> bool {
        crate::db::retry::Retryable::is_retryable(self)
    }
}

/// Runs one source DDL step under the retry policy, mapping give-ups to errors.
pub(crate) async fn retry_ddl<T, E, F, Fut>(
    m: &Migration,
    cancel: &CancellationToken,
    what: &str,
    op: F,
) -> Result<T, crate::Error>
where
    E: Retryable + std::error::Error + 'static + Into<crate::Error>,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    match retry(m.retry_policy(), "ddl", what, cancel, op).await {
        Ok(v) => Ok(v),
        Err(Gave::Up(e)) => Err(e.into()),
        Err(Gave::Cancelled) => Err(crate::Error::Cancelled),
    }
}
