//! Materialized views: refreshed on the target at cutover, `sync.workers`
//! at a time, each once the views it reads are refreshed.
//!
//! With the fence up (the default, `cutover.materialized_views = "fenced"`)
//! their queries are write downtime, so independent views are refreshed side
//! by side. A view's query may read other materialized views, directly or
//! through plain views (the catalog's dependencies say so), or through a
//! function (the catalog cannot say): a view that calls a function of the
//! application waits for every view created before it, as one refresh after
//! another in order of creation did.

use std::future::Future;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio_postgres::Client;

use super::objects::USER_SCHEMA;
use super::CutoverError;
use crate::db::ident::QualifiedTable;
use crate::db::Migration;

/// A materialized view populated on the source.
#[derive(Debug, Clone)]
pub struct Matview {
    /// The view.
    pub name: QualifiedTable,
    /// The views (indexes into the same list) refreshed before this one.
    pub after: Vec<usize>,
}

/// The materialized views populated on the source, in order of creation,
/// each with the views it must be refreshed after.
async fn populated(source: &Client) -> Result<Vec<Matview>, tokio_postgres::Error> {
    // What a view's query names is what its rewrite rule depends on; a
    // plain view's own rule is followed, as far as it goes.
    let rows = source
        .query(
            &format!(
                "WITH RECURSIVE mv AS (
                     SELECT c.oid, n.nspname::text AS nsp, c.relname::text AS rel
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.relkind = 'm' AND c.relispopulated AND {USER_SCHEMA}
                 ), reads(mv, obj, kind) AS (
                     SELECT mv.oid, d.refobjid, d.refclassid
                       FROM mv
                       JOIN pg_rewrite r ON r.ev_class = mv.oid
                       JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                      WHERE NOT (d.refclassid = 'pg_class'::regclass AND d.refobjid = mv.oid)
                     UNION
                     SELECT reads.mv, d.refobjid, d.refclassid
                       FROM reads
                       JOIN pg_class v ON reads.kind = 'pg_class'::regclass AND v.oid = reads.obj AND v.relkind = 'v'
                       JOIN pg_rewrite r ON r.ev_class = v.oid
                       JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                      WHERE NOT (d.refclassid = 'pg_class'::regclass AND d.refobjid = v.oid)
                 )
                 SELECT mv.nsp, mv.rel, mv.oid,
                        coalesce(array_agg(DISTINCT reads.obj)
                                   FILTER (WHERE reads.kind = 'pg_class'::regclass
                                             AND reads.obj IN (SELECT oid FROM mv)),
                                 '{{}}'),
                        coalesce(bool_or(reads.kind = 'pg_proc'::regclass
                                         AND p.pronamespace <> 'pg_catalog'::regnamespace
                                         AND NOT EXISTS (SELECT 1 FROM pg_depend e
                                                          WHERE e.classid = 'pg_proc'::regclass
                                                            AND e.objid = p.oid AND e.deptype = 'e')),
                                 false)
                   FROM mv
                   LEFT JOIN reads ON reads.mv = mv.oid
                   LEFT JOIN pg_proc p ON reads.kind = 'pg_proc'::regclass AND p.oid = reads.obj
                  GROUP BY mv.oid, mv.nsp, mv.rel
                  ORDER BY mv.oid"
            ),
            &[],
        )
        .await?;
    let oids: Vec<u32> = rows.iter().map(|r| r.get(2)).collect();
    Ok(rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let reads: Vec<u32> = r.get(3);
            let calls_functions: bool = r.get(4);
            let mut after: Vec<usize> = reads
                .iter()
                .filter_map(|oid| oids.iter().position(|o| o == oid))
                .collect();
            if calls_functions {
                after.extend(0..i);
            }
            after.sort_unstable();
            after.dedup();
            Matview {
                name: QualifiedTable::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                after,
            }
        })
        .collect())
}

/// Runs `work` on every view, at most `workers` at once, each once the
/// views it comes after have had theirs (failed or not). After a failure
/// nothing new starts unless `keep_going`. Should the order be circular
/// (it cannot be, from the catalog), the first view not started goes
/// next. Returns each started view's outcome, by index.
async fn in_dependency_order<E, F, Fut>(
    views: &[Matview],
    workers: usize,
    keep_going: bool,
    work: F,
) -> Vec<(usize, Result<(), E>)>
where
    F: Fn(QualifiedTable) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let mut started = vec![false; views.len()];
    let mut done = vec![false; views.len()];
    let mut running = FuturesUnordered::new();
    let mut outcomes = Vec::with_capacity(views.len());
    let mut failed = false;
    let launch = |i: usize| {
        let job = work(views[i].name.clone());
        async move { (i, job.await) }
    };
    loop {
        if keep_going || !failed {
            for (i, view) in views.iter().enumerate() {
                if running.len() >= workers.max(1) {
                    break;
                }
                if !started[i] && view.after.iter().all(|&j| done[j]) {
                    started[i] = true;
                    running.push(launch(i));
                }
            }
            if running.is_empty() {
                if let Some(i) = started.iter().position(|s| !s) {
                    started[i] = true;
                    running.push(launch(i));
                }
            }
        }
        let Some((i, outcome)) = running.next().await else {
            break;
        };
        done[i] = true;
        failed |= outcome.is_err();
        outcomes.push((i, outcome));
    }
    outcomes
}

/// Refreshes one view, with row security on, as a plain `REFRESH` would
/// run: a table that FORCEs it on its owner is read through its policies,
/// as on the source, where pgferry's `row_security = off` would refuse it.
async fn refresh(m: &Migration, mv: &QualifiedTable, concurrently: bool) -> Result<(), CutoverError> {
    let how = if concurrently { "CONCURRENTLY " } else { "" };
    let mut conn = m.target_conn().await?;
    let tx = conn.transaction().await.map_err(CutoverError::Target)?;
    tx.batch_execute(&format!(
        "SET LOCAL row_security = on; REFRESH MATERIALIZED VIEW {how}{mv}"
    ))
    .await
    .map_err(CutoverError::Target)?;
    tx.commit().await.map_err(CutoverError::Target)
}

/// Refreshes on the target the materialized views that are populated on the
/// source. Returns how many.
pub async fn refresh_all(m: &Migration, source: &Client) -> Result<usize, CutoverError> {
    let views = populated(source).await.map_err(CutoverError::Source)?;
    let outcomes = in_dependency_order(&views, m.sync_workers(), false, |mv| async move {
        refresh(m, &mv, false).await
    })
    .await;
    for (_, outcome) in outcomes {
        outcome?;
    }
    Ok(views.len())
}

/// After the switch (`cutover.materialized_views = "after_switch"`), the
/// same again without blocking the application's reads where a unique
/// index allows (CONCURRENTLY). The application already writes to the
/// target, so a failure is reported, not fatal. Returns how many were
/// refreshed, and what failed.
pub async fn refresh_all_after_switch(
    m: &Migration,
    source: &Client,
) -> Result<(usize, Vec<String>), CutoverError> {
    let views = populated(source).await.map_err(CutoverError::Source)?;
    let outcomes = in_dependency_order(&views, m.sync_workers(), true, |mv| async move {
        match refresh(m, &mv, true).await {
            // No usable unique index (or not populated yet): the plain way.
            Err(CutoverError::Target(e))
                if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE) =>
            {
                refresh(m, &mv, false).await
            }
            other => other,
        }
    })
    .await;
    let mut failed: Vec<(usize, String)> = outcomes
        .into_iter()
        .filter_map(|(i, outcome)| {
            let why = match outcome.err()? {
                CutoverError::Target(e) | CutoverError::Source(e) => crate::db::errors::db_message(&e),
                other => crate::db::errors::report(&other),
            };
            Some((i, format!("{} -- {why}", views[i].name.display_name())))
        })
        .collect();
    failed.sort();
    Ok((
        views.len() - failed.len(),
        failed.into_iter().map(|(_, w)| w).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn views(after: &[&[usize]]) -> Vec<Matview> {
        after
            .iter()
            .enumerate()
            .map(|(i, a)| Matview {
                name: QualifiedTable::new("public", format!("v{i}")),
                after: a.to_vec(),
            })
            .collect()
    }

    /// Runs the views with `workers`, each taking a turn of the runtime;
    /// returns what started and ended, in order, and the most at once.
    async fn run(
        views: &[Matview],
        workers: usize,
        fail: Option<usize>,
        keep_going: bool,
    ) -> (Vec<String>, usize) {
        let log = Arc::new(Mutex::new((Vec::new(), 0usize, 0usize)));
        in_dependency_order(views, workers, keep_going, |mv| {
            let log = log.clone();
            async move {
                let name = mv.name.clone();
                {
                    let mut l = log.lock().unwrap();
                    l.0.push(format!("+{name}"));
                    l.1 += 1;
                    l.2 = l.2.max(l.1);
                }
                tokio::task::yield_now().await;
                let mut l = log.lock().unwrap();
                l.0.push(format!("-{name}"));
                l.1 -= 1;
                match fail {
                    Some(f) if name == format!("v{f}") => Err(()),
                    _ => Ok(()),
                }
            }
        })
        .await;
        let l = log.lock().unwrap();
        (l.0.clone(), l.2)
    }

    fn position(log: &[String], entry: &str) -> usize {
        log.iter()
            .position(|e| e == entry)
            .unwrap_or_else(|| panic!("{entry} not in {log:?}"))
    }

    #[tokio::test]
    async fn views_start_once_what_they_read_is_done_and_no_more_than_workers_at_once() {
        // v2 reads v0; v3 reads v2 and v1.
        let views = views(&[&[], &[], &[0], &[1, 2]]);
        let (log, most) = run(&views, 2, None, false).await;
        assert_eq!(most, 2, "{log:?}");
        assert!(
            position(&log, "+v1") < position(&log, "-v0"),
            "independent views overlap: {log:?}"
        );
        assert!(position(&log, "-v0") < position(&log, "+v2"), "{log:?}");
        assert!(position(&log, "-v2") < position(&log, "+v3"), "{log:?}");
        assert!(position(&log, "-v1") < position(&log, "+v3"), "{log:?}");
        assert_eq!(log.len(), 8, "each view once: {log:?}");
    }

    #[tokio::test]
    async fn a_failure_stops_new_refreshes_unless_asked_to_keep_going() {
        let views = views(&[&[], &[0], &[1]]);
        let (log, _) = run(&views, 2, Some(0), false).await;
        assert_eq!(log, ["+v0", "-v0"]);
        let (log, _) = run(&views, 2, Some(0), true).await;
        assert_eq!(log, ["+v0", "-v0", "+v1", "-v1", "+v2", "-v2"]);
    }

    #[tokio::test]
    async fn a_circular_order_still_refreshes_every_view() {
        let views = views(&[&[1], &[0]]);
        let (log, _) = run(&views, 2, None, false).await;
        assert_eq!(log, ["+v0", "-v0", "+v1", "-v1"]);
    }
}
