//! The source's health and size: what could make the migration hurt the
//! application, and what the target needs.

use serde::Serialize;
use tokio_postgres::GenericClient;

use super::check::Findings;
use super::Severity;
use crate::db::Migration;

/// Storage and capacity advice for the target.
#[derive(Debug, Clone, Serialize)]
pub struct Sizing {
    /// Size of the source database.
    pub database_bytes: i64,
    /// Twice the data, at least 20 GB (RDS allocated storage, gp3).
    pub recommended_storage_gb: i64,
    /// A starting point for the instance class.
    pub suggested_instance_class: &'static str,
    /// Bytes per second read from the source in a short measured sample.
    pub sampled_read_bytes_per_sec: Option<f64>,
    /// Copy time the sample suggests for the whole database (data only).
    pub estimated_copy_secs: Option<f64>,
}

/// RDS allocated storage for a database of `bytes`: twice the data, at
/// least 20 GB.
pub fn recommended_storage_gb(bytes: i64) -> i64 {
    let gb = (bytes as f64 * 2.0 / 1e9).ceil() as i64;
    gb.max(20)
}

/// A first instance class by data size (memory for the working set and
/// index builds; adjust to the application's load).
pub fn suggested_instance_class(bytes: i64) -> &'static str {
    match bytes {
        b if b < 20_000_000_000 => "db.t4g.medium",
        b if b < 200_000_000_000 => "db.r6g.large",
        b if b < 1_000_000_000_000 => "db.r6g.xlarge",
        _ => "db.r6g.2xlarge",
    }
}

/// Source health: vacuums and idle transactions that would make DDL wait,
/// the connection budget, large objects, unlogged tables.
pub(super) async fn source(
    m: &Migration,
    c: &impl GenericClient,
    f: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT pid, coalesce(extract(epoch FROM clock_timestamp() - xact_start)::int8, 0), query
               FROM pg_stat_activity
              WHERE datname = current_database() AND backend_type = 'autovacuum worker'
                AND query LIKE '%to prevent wraparound%'",
            &[],
        )
        .await?;
    for r in rows {
        f.add(
            Severity::Warning,
            "source",
            format!(
                "an anti-wraparound vacuum (backend {}) has run for {} s: it blocks trigger installation on its table until done",
                r.get::<_, i32>(0),
                r.get::<_, i64>(1)
            ),
            "let it finish before install (it cannot be cancelled safely); pgferry retries meanwhile",
        );
    }
    let idle: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND state LIKE 'idle in transaction%'
                AND state_change < clock_timestamp() - interval '1 minute'",
            &[],
        )
        .await?
        .get(0);
    if idle > 0 {
        f.add(
            Severity::Warning,
            "source",
            format!("{idle} session(s) have been idle in a transaction for over a minute: their locks make install and cutover wait"),
            "fix the application (or set idle_in_transaction_session_timeout) before the migration",
        );
    }
    let r = c
        .query_one(
            "SELECT current_setting('max_connections')::int
                    - current_setting('superuser_reserved_connections')::int
                    - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int",
            &[],
        )
        .await?;
    let free: i32 = r.get(0);
    let need = m.cfg.source_limits.max_connections as i32;
    if free < need {
        f.add(
            Severity::Blocker,
            "source",
            format!("only {free} connection slot(s) are free on the source; pgferry may open {need}"),
            "lower source_limits.max_connections, or free connections (pool size of the application)",
        );
    } else if free < need * 2 {
        f.add(
            Severity::Warning,
            "source",
            format!("{free} connection slots are free; pgferry may take {need} of them"),
            "lower source_limits.max_connections if the application needs headroom",
        );
    }
    // Their size is read (which reads them all) only once they are opted in.
    let sql = if m.cfg.large_objects {
        "SELECT count(*), coalesce(sum(length(lo_get(oid))), 0)::int8 FROM pg_largeobject_metadata"
    } else {
        "SELECT count(*), NULL::int8 FROM pg_largeobject_metadata"
    };
    let lo = c.query_one(sql, &[]).await?;
    let (count, bytes): (i64, Option<i64>) = (lo.get(0), lo.get(1));
    let bytes = bytes.map_or_else(String::new, |b| format!(", {b} bytes"));
    if count > 0 && !m.cfg.large_objects {
        f.add(
            Severity::Blocker,
            "source",
            format!("the database holds {count} large object(s){bytes}"),
            "set large_objects = true to copy them during the cutover (the application must not write large \
             objects then), or move them into bytea columns",
        );
    } else if count > 0 {
        f.add(
            Severity::Warning,
            "source",
            format!(
                "{count} large object(s){bytes} are copied during the cutover while writes are fenced; \
                 large-object writes cannot be fenced"
            ),
            "keep the application from writing large objects during the cutover",
        );
    }
    let unlogged = c
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relpersistence = 'u' AND c.relkind = 'r' AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1",
            &[],
        )
        .await?;
    for r in unlogged {
        f.add(
            Severity::Warning,
            r.get::<_, String>(0),
            "is UNLOGGED: it is migrated, and stays unlogged (emptied after a crash) on the target too",
            "ALTER TABLE ... SET LOGGED on the target after cutover if its contents matter",
        );
    }
    let elsewhere = c
        .query(
            "SELECT s.spcname::text, count(*), string_agg(format('%I.%I', n.nspname, c.relname), ', ' ORDER BY n.nspname, c.relname)
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_tablespace s ON s.oid = c.reltablespace
              WHERE c.relkind IN ('r', 'p', 'm', 'i', 'I')
                AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') AND n.nspname NOT LIKE 'pg\\_%'
              GROUP BY s.spcname ORDER BY 1",
            &[],
        )
        .await?;
    for r in elsewhere {
        f.add(
            Severity::Warning,
            "source",
            format!(
                "{} table(s), index(es) or materialized view(s) in tablespace {} ({}) are created in the \
                 target's default tablespace (Aurora has no other; RDS only those made there)",
                r.get::<_, i64>(1),
                r.get::<_, String>(0),
                r.get::<_, String>(2)
            ),
            "nothing, unless they must be elsewhere on the target: then create the tablespace there and move them \
             (ALTER ... SET TABLESPACE) after the cutover",
        );
    }
    let invalid = c
        .query(
            "SELECT format('%I.%I', n.nspname, t.relname), format('%I', ic.relname)
               FROM pg_index i
               JOIN pg_class ic ON ic.oid = i.indexrelid
               JOIN pg_class t ON t.oid = i.indrelid
               JOIN pg_namespace n ON n.oid = t.relnamespace
              WHERE NOT i.indisvalid AND t.relkind <> 'p'
                AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') AND n.nspname NOT LIKE 'pg\\_%'
              ORDER BY 1, 2",
            &[],
        )
        .await?;
    for r in invalid {
        f.add(
            Severity::Warning,
            r.get::<_, String>(0),
            format!(
                "index {} is INVALID (a CREATE INDEX CONCURRENTLY failed or was cancelled): it is not migrated, \
                 as pg_dump would not migrate it",
                r.get::<_, String>(1)
            ),
            "drop it on the source, or rebuild it there (REINDEX INDEX CONCURRENTLY) before the copy if it is needed",
        );
    }
    Ok(())
}

/// Database size, storage advice and a measured read rate: up to about a
/// second of `COPY ... TO STDOUT` from the largest table.
/// Opens its own session for the sample: a COPY left unfinished makes a
/// session unusable.
pub(super) async fn sizing(m: &Migration) -> Result<Sizing, crate::db::endpoint::ConnectError> {
    let c = m.source.connect().await?;
    sample(&c)
        .await
        .map_err(|source| crate::db::endpoint::ConnectError::Refused {
            side: crate::db::endpoint::Side::Source,
            at: m.source.redacted(),
            hint: "the sizing sample failed",
            source,
        })
}

async fn sample(c: &tokio_postgres::Client) -> Result<Sizing, tokio_postgres::Error> {
    use futures_util::StreamExt;
    let database_bytes: i64 = c
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await?
        .get(0);
    let largest = c
        .query_opt(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry')
                AND n.nspname NOT LIKE 'pg\\_%'
              ORDER BY pg_table_size(c.oid) DESC LIMIT 1",
            &[],
        )
        .await?;
    let mut rate = None;
    if let Some(r) = largest {
        // The name was quoted by the server's format('%I').
        let table: String = r.get(0);
        let started = std::time::Instant::now();
        let stream = c
            .copy_out(&format!(
                "COPY (SELECT * FROM ONLY {table} LIMIT 200000) TO STDOUT (FORMAT binary)"
            ))
            .await?;
        futures_util::pin_mut!(stream);
        let mut bytes = 0usize;
        while let Some(chunk) = stream.next().await {
            bytes += chunk?.len();
            if started.elapsed().as_secs_f64() > 1.0 {
                break;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        if bytes > 0 && secs > 0.0 {
            rate = Some(bytes as f64 / secs);
        }
    }
    Ok(Sizing {
        database_bytes,
        recommended_storage_gb: recommended_storage_gb(database_bytes),
        suggested_instance_class: suggested_instance_class(database_bytes),
        sampled_read_bytes_per_sec: rate,
        estimated_copy_secs: rate.map(|r| database_bytes as f64 / r),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_is_twice_the_data_and_at_least_20_gb() {
        assert_eq!(recommended_storage_gb(0), 20);
        assert_eq!(recommended_storage_gb(9_000_000_000), 20);
        assert_eq!(recommended_storage_gb(15_000_000_000), 30);
        assert_eq!(recommended_storage_gb(500_000_000_000), 1000);
        assert_eq!(suggested_instance_class(1_000_000), "db.t4g.medium");
        assert_eq!(suggested_instance_class(50_000_000_000), "db.r6g.large");
    }
}
