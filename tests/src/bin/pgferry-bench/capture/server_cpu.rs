//! The server's CPU time, read from /proc: per transaction in the TPS
//! rounds (the postmaster, its exited backends and its live children), and
//! per single-row UPDATE in one session.

use std::time::Instant;

use pgferry::sandbox::Cluster;

use super::update_loop;

/// Single-row UPDATE transactions per CPU measurement.
pub(super) const MICRO_TXNS: u32 = 40_000;

/// The kernel's clock ticks per second, the unit of /proc's CPU times.
pub(super) fn clock_ticks() -> f64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf CLK_TCK");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("clock ticks per second")
}

/// CPU time (user + system) that `MICRO_TXNS` single-row UPDATEs of
/// pgbench_tellers (`tellers` rows), each in its own transaction, cost the backend of
/// `admin`'s session, in µs per transaction. The backend reads its own
/// /proc entry (the superuser may).
pub(super) async fn cpu_per_update(admin: &tokio_postgres::Client, ticks: f64, tellers: u32) -> f64 {
    let cpu = || async {
        let stat: String = admin
            .query_one("SELECT pg_read_file('/proc/self/stat')", &[])
            .await
            .expect("the backend's /proc/self/stat")
            .get(0);
        let t = cpu_times(&stat);
        t.user + t.system
    };
    let before = cpu().await;
    // Alone in its query string: COMMIT inside DO needs no outer transaction.
    admin
        .batch_execute(&update_loop(MICRO_TXNS, tellers))
        .await
        .expect("single-row updates");
    (cpu().await - before) / ticks * 1e6 / f64::from(MICRO_TXNS)
}

/// What a /proc/PID/stat line says of a process.
struct Stat {
    ppid: u32,
    /// CPU time in clock ticks: the process's own...
    user: f64,
    system: f64,
    /// ...and that of its children it has waited for (exited backends, for
    /// the postmaster).
    children_user: f64,
    children_system: f64,
}

/// Parses a /proc/PID/stat line (fields 4 and 14 to 17, counted after the
/// command name's parenthesis, which may hold spaces).
fn cpu_times(stat: &str) -> Stat {
    let f: Vec<&str> = stat[stat.rfind(')').expect("stat format") + 2..]
        .split_whitespace()
        .collect();
    let n = |i: usize| -> f64 { f[i].parse().expect("cpu ticks") };
    Stat {
        ppid: f[1].parse().expect("ppid"),
        user: n(11),
        system: n(12),
        children_user: n(13),
        children_system: n(14),
    }
}

/// The server's CPU time so far, (user, system) in clock ticks: the
/// postmaster's own, that of its children that have exited, and that of
/// its live children (background processes, sessions); with the live
/// children's PIDs.
pub(super) fn server_cpu(postmaster: u32) -> ((f64, f64), std::collections::BTreeSet<u32>) {
    let read = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
    let pm = cpu_times(&read(postmaster).expect("the postmaster's /proc entry"));
    let (mut user, mut system) = (pm.user + pm.children_user, pm.system + pm.children_system);
    let mut children = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Some(pid) = entry
            .expect("a /proc entry")
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that exited meanwhile has no entry left: skipped.
        if let Some(t) = read(pid).map(|s| cpu_times(&s)).filter(|t| t.ppid == postmaster) {
            user += t.user;
            system += t.system;
            children.insert(pid);
        }
    }
    ((user, system), children)
}

/// The postmaster's PID, from the first line of `postmaster.pid`.
pub(super) fn postmaster_pid(source: &Cluster) -> u32 {
    std::fs::read_to_string(source.data_dir().join("postmaster.pid"))
        .expect("postmaster.pid")
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("the postmaster's PID")
}

/// Waits until the backends the server started after `before` (its live
/// children then) have exited and been waited for, autovacuum workers
/// aside, so that their CPU time is in the postmaster's children's.
pub(super) fn await_backends_gone(postmaster: u32, before: &std::collections::BTreeSet<u32>) {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, now) = server_cpu(postmaster);
        let left: Vec<u32> = now
            .difference(before)
            .copied()
            .filter(|pid| {
                !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .unwrap_or_default()
                    .contains("autovacuum")
            })
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pgbench's backends {left:?} still there 30 s after it ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
