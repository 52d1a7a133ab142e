//! Capture: the control schema and the triggers that record every change.
//!
//! On entry: the preflight has no blockers. On exit: every planned table has
//! its four statement-level capture triggers (INSERT, UPDATE, DELETE,
//! TRUNCATE) committed, and the phase is `installed`, so any snapshot taken
//! from now on misses nothing that the delta tables do not hold.
//!
//! Each table is handled in its own short transaction with the source's
//! `lock_timeout`; a timeout is retried with backoff, so the application never
//! queues behind pgferry for longer than that timeout. Safe to re-run: tables
//! already captured are skipped.

use tokio_util::sync::CancellationToken;

use crate::migration::Migration;
use crate::plan;
use crate::retry::{retry, Gave, Retryable};
use crate::state::{self, Phase, Registration};

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
}

/// Installs the control schema and capture triggers. The caller has run the
/// preflight.
pub async fn install(m: &Migration, cancel: &CancellationToken) -> Result<InstallReport, crate::Error> {
    let mut conn = m.source_conn().await?;
    let run = state::load(&**conn).await?;
    if let Some(run) = &run {
        if run.phase >= Phase::Installed {
            let tables = state::tables(&**conn).await?;
            return Ok(InstallReport {
                tables: tables.len(),
                installed_now: 0,
            });
        }
    }
    let regs: Vec<Registration> = plan::source_tables(&**conn)
        .await
        .map_err(CaptureError::Catalog)?
        .iter()
        .filter_map(plan::SourceTable::registration)
        .collect();
    // Creating the schema takes no lock on any application table.
    state::ensure_schema(&mut conn).await?;
    if run.is_none() {
        state::register_tables(&**conn, &regs).await?;
        state::set_phase(&**conn, Phase::Installing).await?;
        crate::failpoint::hit("install.after_register").await;
    }
    let tables = state::tables(&**conn).await?;
    let mut installed_now = 0;
    for t in &tables {
        if cancel.is_cancelled() {
            return Err(crate::Error::Cancelled);
        }
        if has_capture(&conn, t.relid).await.map_err(CaptureError::Catalog)? {
            continue;
        }
        let what = format!("install capture on {}", t.table.display_name());
        let c = &conn;
        retry_ddl(m, cancel, &what, || async move {
            c.execute("SELECT pgferry.capture_install($1)", &[&t.id])
                .await
                .map_err(|source| CaptureError::Install {
                    table: t.table.display_name(),
                    source,
                })
        })
        .await?;
        installed_now += 1;
        tracing::info!(table = %t.table.display_name(), "Capture installed");
        crate::failpoint::hit("install.table_done").await;
    }
    state::set_phase(&**conn, Phase::Installed).await?;
    Ok(InstallReport {
        tables: tables.len(),
        installed_now,
    })
}

/// True when all four capture triggers exist on the table.
async fn has_capture(client: &tokio_postgres::Client, relid: u32) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) = 4 FROM pg_trigger WHERE tgrelid = $1 AND tgname LIKE 'pgferry\\_capture\\_%'",
            &[&relid],
        )
        .await?;
    Ok(row.get(0))
}

impl Retryable for CaptureError {
    fn is_retryable(&self) -> bool {
        match self {
            CaptureError::Install { source, .. } | CaptureError::Catalog(source) => {
                crate::error::is_retryable(source)
            }
            CaptureError::AlreadyPast(_) => false,
        }
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
    E: Retryable + std::fmt::Display + Into<crate::Error>,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    match retry(m.retry_policy(), what, cancel, op).await {
        Ok(v) => Ok(v),
        Err(Gave::Up(e)) => Err(e.into()),
        Err(Gave::Cancelled) => Err(crate::Error::Cancelled),
    }
}
