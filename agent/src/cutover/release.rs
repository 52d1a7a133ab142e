//! After the switch: the old source stays fenced until the application has
//! left it (invariant 8).
//!
//! On entry the cutover is done (phase `cut_over`) and the fence is up,
//! refusing writes with "this database has moved". An application instance
//! still connected to the old source (a dyno draining for 30 s, a pooled or
//! persistent connection, a cron job) would commit there, where nobody reads,
//! as soon as cleanup lifted the fence. So `migrate --cutover` waits until no
//! session that may write a captured table is connected to the source
//! database (pgferry's own, and those of `cutover.release_ignore_roles`,
//! aside), or `cutover.release_after_ms` has passed, or the operator has
//! run `pgferry cleanup` meanwhile; it logs who was still connected, and for
//! how long. Reads only; safe to re-run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{fence, CutoverError};
use crate::control::state::{self, Phase};
use crate::db::Migration;

/// How often the source's sessions are looked at.
const POLL: Duration = Duration::from_millis(250);

/// How often the wait says who it waits for.
const TELL_EVERY: Duration = Duration::from_secs(10);

/// Why the wait ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Released {
    /// No session that could write was connected.
    #[default]
    NoSessions,
    /// `cutover.release_after_ms` passed with sessions still connected.
    Deadline,
    /// The fence was lifted or pgferry's schema removed meanwhile (the
    /// operator ran cleanup).
    Elsewhere,
}

/// A session that could write the captured tables, seen after the switch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Straggler {
    /// Its backend's pid.
    pub pid: i32,
    /// Its role.
    pub role: String,
    /// Its `application_name` (empty when unset).
    pub application_name: String,
    /// Its client address (none over a Unix socket).
    pub client_addr: Option<String>,
    /// How long it stayed connected after the switch, as far as seen.
    pub connected_after_switch_ms: u64,
}

/// What the wait saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReleaseReport {
    /// How long the fence was held after the switch for sessions to leave.
    pub waited_ms: u64,
    /// Why the wait ended.
    pub ended: Released,
    /// Every session that held the fence, and for how long.
    pub sessions: Vec<Straggler>,
    /// Those still connected when the fence was released (at the deadline).
    pub still_connected: Vec<Straggler>,
}

/// Sessions of the source database whose role may write a captured table.
async fn stragglers(
    client: &tokio_postgres::Client,
    ignore: &[String],
) -> Result<Vec<(i32, String, String, Option<String>)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.pid, a.usename::text, coalesce(a.application_name, ''), host(a.client_addr)
               FROM pg_stat_activity a
              WHERE a.datname = current_database()
                AND a.pid <> pg_backend_pid()
                AND a.usesysid IS NOT NULL
                -- Another role's sessions show no backend_type to pgferry's.
                AND coalesce(a.backend_type, 'client backend') = 'client backend'
                AND a.application_name IS DISTINCT FROM 'pgferry'
                AND NOT (a.usename = ANY ($1::text[]))
                AND EXISTS (SELECT 1 FROM pgferry.tables t
                             WHERE has_table_privilege(a.usesysid, t.relid, 'INSERT, UPDATE, DELETE, TRUNCATE'))
              ORDER BY a.pid",
            &[&ignore],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}

/// Whether the fence still stands after the switch: the cutover is done and
/// nobody lifted it or cleaned up meanwhile.
async fn still_fenced(client: &tokio_postgres::Client) -> Result<bool, crate::Error> {
    let Some(run) = state::load(client).await? else {
        return Ok(false);
    };
    if run.phase != Phase::CutOver {
        return Ok(false);
    }
    Ok(fence::is_raised(client).await.map_err(CutoverError::Source)?)
}

/// Waits, fence up, until the application has left the source (see the
/// module's doc).
pub async fn wait_for_the_application_to_leave(
    m: &Migration,
    cancel: &CancellationToken,
) -> Result<ReleaseReport, crate::Error> {
    let started = Instant::now();
    let limit = Duration::from_millis(m.cfg.cutover.release_after_ms);
    let ignore = &m.cfg.cutover.release_ignore_roles;
    let mut first_seen: BTreeMap<i32, (Instant, Straggler)> = BTreeMap::new();
    let mut told = None::<Instant>;
    let mut report = ReleaseReport::default();
    loop {
        let conn = m.source_conn().await?;
        if !still_fenced(&conn).await? {
            report.ended = Released::Elsewhere;
            break;
        }
        let now = Instant::now();
        let seen = stragglers(&conn, ignore).await.map_err(CutoverError::Source)?;
        drop(conn);
        for (pid, role, application_name, client_addr) in &seen {
            first_seen.entry(*pid).or_insert_with(|| {
                (
                    now,
                    Straggler {
                        pid: *pid,
                        role: role.clone(),
                        application_name: application_name.clone(),
                        client_addr: client_addr.clone(),
                        connected_after_switch_ms: 0,
                    },
                )
            });
        }
        for (pid, (since, s)) in first_seen.iter_mut() {
            if seen.iter().any(|x| x.0 == *pid) {
                s.connected_after_switch_ms = (now - *since).as_millis() as u64 + POLL.as_millis() as u64;
            }
        }
        let current: Vec<Straggler> = seen
            .iter()
            .filter_map(|x| first_seen.get(&x.0).map(|(_, s)| s.clone()))
            .collect();
        if current.is_empty() {
            report.ended = Released::NoSessions;
            break;
        }
        if started.elapsed() >= limit {
            tracing::error!(
                sessions = %describe(&current),
                waited_secs = started.elapsed().as_secs(),
                "Releasing the old source with sessions still connected (cutover.release_after_ms passed): \
                 what they write there from now on is not migrated"
            );
            report.ended = Released::Deadline;
            report.still_connected = current;
            break;
        }
        if told.is_none_or(|t: Instant| t.elapsed() >= TELL_EVERY) {
            tracing::warn!(
                sessions = %describe(&current),
                waited_secs = started.elapsed().as_secs(),
                limit_secs = limit.as_secs(),
                "The old source stays fenced while sessions that could write to it are connected: \
                 point them at the new database (or run `pgferry cleanup` to release it now)"
            );
            told = Some(Instant::now());
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(crate::Error::Cancelled),
            () = tokio::time::sleep(POLL) => {}
        }
    }
    report.waited_ms = started.elapsed().as_millis() as u64;
    report.sessions = first_seen.into_values().map(|(_, s)| s).collect();
    if !report.sessions.is_empty() {
        tracing::info!(
            sessions = %describe(&report.sessions),
            waited_ms = report.waited_ms,
            "Sessions that held the old source's fence after the switch"
        );
    }
    Ok(report)
}

/// The sessions that could write to the source now, described, for a
/// cleanup run by hand after the switch (it lifts the fence).
pub async fn connected_now(m: &Migration) -> Result<Option<String>, crate::Error> {
    let conn = m.source_conn().await?;
    if !still_fenced(&conn).await? {
        return Ok(None);
    }
    let seen = stragglers(&conn, &m.cfg.cutover.release_ignore_roles)
        .await
        .map_err(CutoverError::Source)?;
    let sessions: Vec<Straggler> = seen
        .into_iter()
        .map(|(pid, role, application_name, client_addr)| Straggler {
            pid,
            role,
            application_name,
            client_addr,
            connected_after_switch_ms: 0,
        })
        .collect();
    Ok((!sessions.is_empty()).then(|| describe_who(&sessions)))
}

/// `role@address (application) pid N`.
fn who(s: &Straggler) -> String {
    format!(
        "{}@{}{} pid {}",
        s.role,
        s.client_addr.as_deref().unwrap_or("local"),
        if s.application_name.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.application_name)
        },
        s.pid
    )
}

/// [`who`] of each, joined.
fn describe_who(sessions: &[Straggler]) -> String {
    sessions.iter().map(who).collect::<Vec<_>>().join(", ")
}

/// [`who`] of each and for how long, for the log.
fn describe(sessions: &[Straggler]) -> String {
    sessions
        .iter()
        .map(|s| {
            format!(
                "{} for {:.1} s",
                who(s),
                s.connected_after_switch_ms as f64 / 1000.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
