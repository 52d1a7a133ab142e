//! Every DDL pgferry runs on the source's application tables (capture
//! triggers, fence triggers, their removal): its turn taken first
//! ([`take_turn`]: never queue the application behind pgferry), under a
//! short lock timeout, and retried with backoff ([`retry_ddl`]).
//! docs/design.md, "The source is someone's production database".

use tokio_util::sync::CancellationToken;

use crate::db::ident::Ident;
use crate::db::retry::{retry, Gave, Retryable};
use crate::db::Migration;

/// A DDL step that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DdlError {
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
    /// Looking at the table's locks failed.
    #[error("could not read the source's locks")]
    Query(#[source] tokio_postgres::Error),
    /// Removing one table's triggers failed.
    #[error("could not remove capture from {table}")]
    Remove {
        /// The table.
        table: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A session could not be opened.
    #[error(transparent)]
    Connect(#[from] crate::db::endpoint::ConnectError),
}

impl crate::error::Failure for DdlError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

impl Retryable for DdlError {
    fn is_retryable(&self) -> bool {
        match self {
            DdlError::Busy { .. } => true,
            DdlError::Query(e) | DdlError::Remove { source: e, .. } => crate::db::errors::is_retryable(e),
            DdlError::Connect(e) => e.is_retryable(),
        }
    }
}

/// How long another session's transaction must have held a table for
/// [`take_turn`] to wait it out rather than ask: long enough that the
/// application's ordinary statements, even slow ones, are not taken for it.
const LONG_TRANSACTION_MS: i64 = 1_000;

/// Before pgferry asks for a lock on an application table, in `tx` (to
/// create or drop its triggers: ACCESS EXCLUSIVE, behind which every
/// statement on the table queues while the request waits): asks only when
/// no other session has held a lock on the table or its partitions in a
/// transaction open for [`LONG_TRANSACTION_MS`] or more, nor waits for one,
/// and then with `source_limits.trigger_lock_timeout_ms` as its
/// `lock_timeout`. A long transaction of the application's is waited out
/// ([`DdlError::Busy`], retried with backoff) instead of asked behind
/// again and again; statements that each take a while (a growing TOAST
/// value rewritten back to back) are asked between, and a request that
/// meets one waits at most the timeout. Either way the application's
/// other statements on the table wait for pgferry at most that long. The
/// table is `relid`, or else `table` read as SQL text for it (which names
/// it in messages either way). Sessions whose details pg_stat_activity
/// hides (another role's) count as short.
pub async fn take_turn(
    m: &Migration,
    tx: &tokio_postgres::Transaction<'_>,
    relid: Option<u32>,
    table: &str,
) -> Result<(), DdlError> {
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
        .map_err(DdlError::Query)?;
    if let Some(row) = busy {
        return Err(DdlError::Busy {
            table: table.to_string(),
            holder: row.get(0),
        });
    }
    tx.batch_execute(&format!("SET LOCAL lock_timeout = {ms}"))
        .await
        .map_err(DdlError::Query)
}

/// Runs one source DDL step under the retry policy, mapping give-ups to errors.
pub async fn retry_ddl<T, E, F, Fut>(
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

/// Drops the named triggers of one table in one short transaction, under the
/// source's lock timeout and retries. `table` is SQL text for the table: a
/// `regclass` rendering or a [`QualifiedTable`](crate::db::ident::QualifiedTable).
pub async fn drop_triggers(
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
        let failed = |source| DdlError::Remove {
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
