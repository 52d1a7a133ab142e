//! Capture: the control schema and the triggers that record every change.
//!
//! On entry: the preflight has no blockers. On exit: every planned table has
//! its four statement-level capture triggers (INSERT, UPDATE, DELETE,
//! TRUNCATE) committed, and a plain table also the row trigger that records
//! an UPDATE's old key when the key changes (see
//! `control/sql/0009_key_change_trigger.sql`), and the phase is `installed`, so any
//! snapshot taken from now on misses nothing that the delta tables do not
//! hold.
//!
//! Each table is handled in its own short transaction with the source's
//! `lock_timeout`; a timeout is retried with backoff, so the application never
//! queues behind pgferry for longer than that timeout. Safe to re-run: tables
//! already captured are skipped.

use tokio_util::sync::CancellationToken;

use crate::control::state::{self, Phase, Registration, TableState};
use crate::db::ident::Ident;
use crate::db::retry::Retryable;
use crate::db::Migration;
use crate::ddl::{retry_ddl, take_turn};
use crate::plan;

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
    /// The table's turn has not come (see [`crate::ddl::take_turn`]).
    #[error(transparent)]
    Turn(#[from] crate::ddl::DdlError),
    /// A session could not be opened.
    #[error(transparent)]
    Connect(#[from] crate::db::endpoint::ConnectError),
    /// A migration is already past installation.
    #[error("capture is already installed and the migration is in phase {0:?}")]
    AlreadyPast(Phase),
    /// Widening a delta table's key column as the source widened the key.
    #[error("could not widen the delta table's key column of {table} as the source widened the key")]
    WidenDelta {
        /// The table.
        table: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A table named on the command line that pgferry does not capture.
    #[error("{0}")]
    UnknownTable(String),
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
    crate::control::ensure_schema(&mut conn).await?;
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
            stamp(&tx, t.id).await.map_err(failed)?;
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
    let gaps = crate::plan::drift::CaptureGaps::read(conn)
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
        crate::ddl::drop_triggers(m, cancel, &relid_table, &names).await?;
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

/// What `release-keys` did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KeysReleased {
    /// Tables whose key column trigger this run released: their key
    /// columns' type may change now.
    pub released: Vec<String>,
    /// Tables that had none (released before, or captured without one: a
    /// partition, an inheritance member, a table with a BEFORE UPDATE
    /// trigger, a copy_only table).
    pub without_key_trigger: Vec<String>,
}

/// Before a deploy that changes the type of a key column: widens the delta
/// key columns of each of `names` (every captured table when none) to the
/// widest type of their family, and moves it off its key column trigger,
/// whose `UPDATE OF <key>` PostgreSQL would not let the column's type
/// change under, to the UPDATE trigger that reads both transition tables
/// (`control/sql/0020_key_release.sql`). Each table in its own short
/// transaction, its turn taken as for install, so it runs beside sync.
/// Sync then follows the type change itself (docs/design.md, "Schema
/// changes during sync").
pub async fn release_keys(
    m: &Migration,
    names: &[String],
    cancel: &CancellationToken,
) -> Result<KeysReleased, crate::Error> {
    let mut conn = m.source_conn().await?;
    let phase = state::load(&**conn).await?.map(|r| r.phase);
    match phase {
        None => {
            return Err(crate::Error::Phase(
                "pgferry is not installed on this source: there is no key column trigger to release".into(),
            ))
        }
        Some(p) if p >= Phase::CuttingOver => {
            return Err(crate::Error::Phase(format!(
                "the migration is in phase {}: key column triggers are released only before the cutover",
                p.as_str()
            )))
        }
        Some(_) => {}
    }
    // Brings `capture_key_release` to a control schema an older pgferry made.
    crate::control::ensure_schema(&mut conn).await?;
    let tables = state::tables(&**conn).await?;
    drop(conn);
    let mut report = KeysReleased::default();
    for t in named(&tables, names)? {
        if cancel.is_cancelled() {
            return Err(crate::Error::Cancelled);
        }
        let name = t.table.display_name();
        let released = if t.copy_only {
            false
        } else {
            retry_ddl(
                m,
                cancel,
                &format!("release the key column trigger of {name}"),
                || async {
                    let failed = |source| CaptureError::Install {
                        table: name.clone(),
                        source,
                    };
                    let mut conn = m.source_conn().await?;
                    let tx = conn.transaction().await.map_err(failed)?;
                    take_turn(m, &tx, Some(t.relid), &name).await?;
                    let released: bool = tx
                        .query_one("SELECT pgferry.capture_key_release($1)", &[&t.id])
                        .await
                        .map_err(failed)?
                        .get(0);
                    stamp(&tx, t.id).await.map_err(failed)?;
                    tx.commit().await.map_err(failed)?;
                    Ok::<_, CaptureError>(released)
                },
            )
            .await?
        };
        if released {
            tracing::info!(table = %name, "Key column trigger released: the key columns' type may change");
            report.released.push(name);
        } else {
            report.without_key_trigger.push(name);
        }
    }
    Ok(report)
}

/// Records the row versions of table `id`'s pgferry triggers as pgferry
/// left them, in the transaction that changed them: the drift check tells
/// one disabled or enabled again by another hand by them.
async fn stamp(tx: &tokio_postgres::Transaction<'_>, id: i32) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        &format!(
            "UPDATE pgferry.tables t SET trigger_stamp = {} WHERE t.id = $1",
            crate::plan::drift::TRIGGER_STAMP
        ),
        &[&id],
    )
    .await
    .map(|_| ())
}

/// The registered tables `names` name (all when none): `schema.table`, or
/// `table` when one schema has it. A name that matches none is refused
/// before anything is done.
fn named<'a>(tables: &'a [TableState], names: &[String]) -> Result<Vec<&'a TableState>, CaptureError> {
    if names.is_empty() {
        return Ok(tables.iter().collect());
    }
    let mut chosen = Vec::new();
    for name in names {
        let exact: Vec<&TableState> = tables
            .iter()
            .filter(|t| t.table.display_name() == *name)
            .collect();
        let bare: Vec<&TableState> = tables.iter().filter(|t| t.table.name == *name).collect();
        match (exact.as_slice(), bare.as_slice()) {
            ([t], _) | ([], [t]) => chosen.push(*t),
            ([], []) => {
                return Err(CaptureError::UnknownTable(format!(
                    "pgferry captures no table {name}: name it as schema.table, as `pgferry status` lists it"
                )))
            }
            _ => {
                return Err(CaptureError::UnknownTable(format!(
                    "more than one schema has a captured table {name}: name it as schema.table"
                )))
            }
        }
    }
    Ok(chosen)
}

/// The capture triggers and functions, by the suffix of their names: the
/// four events, and the key column trigger of plain tables.
const SUFFIXES: [&str; 5] = ["ins", "upd", "del", "trunc", "key"];

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
            | CaptureError::WidenDelta { source, .. }
            | CaptureError::Catalog(source) => crate::db::errors::is_retryable(source),
            CaptureError::Connect(e) => e.is_retryable(),
            CaptureError::Turn(e) => e.is_retryable(),
            CaptureError::AlreadyPast(_) | CaptureError::UnknownTable(_) => false,
        }
    }
}

impl crate::error::Failure for CaptureError {
    fn exit_code(&self) -> crate::error::ExitCode {
        match self {
            CaptureError::UnknownTable(_) => crate::error::ExitCode::Usage,
            _ => crate::error::ExitCode::Runtime,
        }
    }

    fn retryable(&self) -> bool {
        crate::db::retry::Retryable::is_retryable(self)
    }
}
