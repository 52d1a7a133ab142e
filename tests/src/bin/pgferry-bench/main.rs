//! `pgferry-bench`: pgferry's speed, measured against the tools people use
//! today, on throwaway local clusters, in one run. Each subcommand prints
//! JSON on stdout (progress goes to stderr).
//!
//! - `capture`: what capture costs the source (pgbench TPS, a bulk UPDATE),
//!   against Bucardo's trigger design;
//! - `copy`: the bulk copy's wall time against `pg_dump | pg_restore`,
//!   `pg_dump -Fd -j` + `pg_restore -j` and `pgcopydb clone`;
//! - `cutover`: the write downtime of a cutover by database size and
//!   verification scope, pgbench writing throughout;
//! - `drain`: how fast a backlog of changed rows is applied, against
//!   Bucardo's apply done the simple way;
//! - `fallback`: the way back after a cutover with `cutover.fallback`: the
//!   old source's lag behind the new database under a fixed pgbench rate,
//!   and the switchback's write-blocked window under that load;
//! - `follow`: the lag a deploy's schema change causes a running sync,
//!   followed, next to the `install` + `copy` it took before;
//! - `install`: what installing capture adds to the latency of the
//!   application's writes while one of its transactions holds a table;
//! - `lag`: end-to-end lag (a heartbeat) and delta storage under a fixed
//!   pgbench rate, then a burst;
//! - `tables`: what thousands of small tables (a schema per tenant) cost
//!   the steps, an idle source while syncing, the lag and the cutover.

use std::collections::HashMap;

mod bootstrap;
mod capture;
mod copy;
mod cutover;
mod drain;
mod fallback;
mod follow;
mod install;
mod lag;
mod tables;

const USAGE: &str = "usage: pgferry-bench capture [--scale N] [--clients N] [--secs N] [--rounds N] [--modes none,pgferry,bucardo,...]
       pgferry-bench copy [--scale X] [--mix documents|indexes] [--rounds N] [--jobs N] [--tools a,b,...]
       pgferry-bench cutover [--scales N,N,...] [--verify full,changed] [--rate TPS] [--clients N] [--rounds N]
       pgferry-bench drain [--rows N] [--tables N] [--rounds N] [--workers N]
       pgferry-bench fallback [--scale N] [--clients N] [--rate TPS] [--secs N] [--poll-ms N] [--verify changed|full]
       pgferry-bench follow [--scale N] [--rate TPS] [--clients N] [--quiet-secs N] [--poll-ms N]
       pgferry-bench install [--scale N] [--rate N] [--hold-secs N] [--rounds N]
       pgferry-bench lag [--scale N] [--clients N] [--rate TPS] [--secs N] [--burst-secs N] [--poll-ms N]
       pgferry-bench tables [--tables N] [--secs N] [--poll-ms N]";

/// The heartbeat of the lag benchmarks: one row holding the time it was
/// last written, its write, and its age as the other side reads it (both
/// servers share this machine's clock).
pub(crate) const HEARTBEAT_TABLE: &str =
    "CREATE TABLE heartbeat (id int PRIMARY KEY, at timestamptz NOT NULL);
                                          INSERT INTO heartbeat VALUES (1, clock_timestamp());";
pub(crate) const HEARTBEAT_BEAT: &str = "UPDATE heartbeat SET at = clock_timestamp() WHERE id = 1";
pub(crate) const HEARTBEAT_AGE: &str =
    "SELECT extract(epoch FROM clock_timestamp() - at)::float8 FROM heartbeat WHERE id = 1";

/// Parses `--name value` pairs, allowing only `known` names.
pub(crate) fn flags(v: &[String], known: &[&str]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in v.chunks(2) {
        if !known.contains(&pair[0].as_str()) || pair.len() < 2 {
            eprintln!("unknown flag or missing value: {}\n{USAGE}", pair[0]);
            std::process::exit(2);
        }
        out.insert(pair[0].clone(), pair[1].clone());
    }
    out
}

/// A numeric flag, or its default.
pub(crate) fn num<T: std::str::FromStr>(f: &HashMap<String, String>, name: &str, default: T) -> T {
    match f.get(name) {
        None => default,
        Some(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("{name} needs a number, not {v:?}");
            std::process::exit(2)
        }),
    }
}

/// A comma-separated list flag, or its default.
pub(crate) fn list(f: &HashMap<String, String>, name: &str, default: &str) -> Vec<String> {
    f.get(name)
        .map_or(default, String::as_str)
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The value at quantile `p` (0..1) of `v`, nearest rank; 0 for none.
pub(crate) fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// The median; for an even count, the mean of the two middle values.
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n.is_multiple_of(2) {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    } else {
        s[n / 2]
    }
}

/// Before a timed run: VACUUM `vacuum` (so no autovacuum of the last run's
/// dead rows runs during this one) and CHECKPOINT (no dirty buffers left
/// behind), as the superuser, in database `bench` of each cluster.
pub(crate) async fn settle(clusters: &[&pgferry::sandbox::Cluster], vacuum: &str) {
    for c in clusters {
        let admin = c.superuser("bench").await.expect("superuser");
        admin
            .batch_execute(&format!("VACUUM {vacuum}"))
            .await
            .expect("vacuum");
        admin.batch_execute("CHECKPOINT").await.expect("checkpoint");
    }
}

/// A source cluster (owner `app`, like Heroku's) and a target cluster
/// (`rds`, CREATEROLE, like RDS's master user), each with a database
/// `bench`; every password is `bench`.
pub(crate) async fn clusters(name: &str) -> (pgferry::sandbox::Cluster, pgferry::sandbox::Cluster) {
    eprintln!("starting throwaway clusters");
    let (s, t) = (format!("{name}-source"), format!("{name}-target"));
    let (source, target) = tokio::try_join!(
        pgferry::sandbox::Cluster::start_with(&s, &copy::SERVER),
        pgferry::sandbox::Cluster::start_with(&t, &copy::SERVER)
    )
    .expect("clusters");
    source
        .create_role("app", "bench", "NOSUPERUSER NOREPLICATION", Some("bench"))
        .await
        .expect("role");
    target
        .create_role("rds", "bench", "NOSUPERUSER CREATEROLE CREATEDB", Some("bench"))
        .await
        .expect("role");
    (source, target)
}

/// pgferry from `source` to `target` (see [`clusters`]), quiet: URLs in the
/// environment, metrics off, warnings only, no JSON on stdout.
pub(crate) fn pgferry_command(
    pgferry: &std::path::Path,
    source: &pgferry::sandbox::Cluster,
    target: &pgferry::sandbox::Cluster,
    args: &[&str],
) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(pgferry);
    c.args(args)
        .env(
            "PGFERRY_SOURCE",
            format!(
                "postgres://app:bench@127.0.0.1:{}/bench?sslmode=disable",
                source.port()
            ),
        )
        .env(
            "PGFERRY_TARGET",
            format!(
                "postgres://rds:bench@127.0.0.1:{}/bench?sslmode=disable",
                target.port()
            ),
        )
        .env("PGFERRY_METRICS__LISTEN", "off")
        // Warnings only, unless BENCH_PGFERRY_LOG asks for more (say, info).
        .env(
            "PGFERRY_LOG",
            std::env::var("BENCH_PGFERRY_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    c
}

/// libpq's environment for pgbench against the source's `bench` as `app`.
pub(crate) fn pgbench_env(source: &pgferry::sandbox::Cluster) -> [(&'static str, String); 5] {
    [
        ("PGHOST", "127.0.0.1".to_string()),
        ("PGPORT", source.port().to_string()),
        ("PGUSER", "app".into()),
        ("PGPASSWORD", "bench".into()),
        ("PGDATABASE", "bench".into()),
    ]
}

/// `pgbench -i` at `scale` on the source, with the key pgferry (and
/// Bucardo) need on pgbench_history.
pub(crate) async fn pgbench_init(source: &pgferry::sandbox::Cluster, scale: u32) {
    let st = tokio::process::Command::new(source.bin_dir().join("pgbench"))
        .args(["-i", "-q", "-s", &scale.to_string()])
        .envs(pgbench_env(source))
        .status()
        .await
        .expect("pgbench -i");
    assert!(st.success(), "pgbench -i failed");
    connect(source.port(), "bench")
        .await
        .batch_execute("ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY")
        .await
        .expect("a key on pgbench_history");
}

/// SQL that enables exactly the triggers of `mode` (pgferry's capture, or
/// the benchmark's reproduction of Bucardo's delta trigger, named
/// `bucardo_style` so that it never stands in for Bucardo's own) on
/// `tables`, disabling the other design's and leaving none for "none".
pub(crate) fn triggers_for<T: std::fmt::Display>(tables: impl IntoIterator<Item = T>, mode: &str) -> String {
    let mut sql = String::new();
    for t in tables {
        for (name, mine) in [
            ("pgferry_capture_ins", mode == "pgferry"),
            ("pgferry_capture_upd", mode == "pgferry"),
            ("pgferry_capture_del", mode == "pgferry"),
            ("pgferry_capture_trunc", mode == "pgferry"),
            ("pgferry_capture_key", mode == "pgferry"),
            ("bucardo_style", mode == "bucardo_style"),
        ] {
            let how = if mine { "ENABLE ALWAYS" } else { "DISABLE" };
            sql.push_str(&format!("ALTER TABLE {t} {how} TRIGGER {name};"));
        }
    }
    sql
}

/// A session as `app` (password `bench`) on 127.0.0.1.
pub(crate) async fn connect(port: u16, dbname: &str) -> tokio_postgres::Client {
    connect_as(port, "app", dbname).await
}

/// A session as `user` (password `bench`) on 127.0.0.1.
pub(crate) async fn connect_as(port: u16, user: &str, dbname: &str) -> tokio_postgres::Client {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(user)
        .password("bench")
        .dbname(dbname);
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    c
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let v: Vec<String> = std::env::args().collect();
    let bench = async {
        match v.get(1).map(String::as_str) {
            Some("capture") => capture::run(&v[2..]).await,
            Some("copy") => copy::run(&v[2..]).await,
            Some("cutover") => cutover::run(&v[2..]).await,
            Some("drain") => drain::run(&v[2..]).await,
            Some("fallback") => fallback::run(&v[2..]).await,
            Some("follow") => follow::run(&v[2..]).await,
            Some("install") => install::run(&v[2..]).await,
            Some("lag") => lag::run(&v[2..]).await,
            Some("tables") => tables::run(&v[2..]).await,
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
        }
    };
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    // SIGINT or SIGTERM drops the benchmark where it waits (a pgbench or
    // tool run in progress finishes first): dropping its throwaway clusters
    // stops their servers and removes their directories, which an exit
    // straight from the signal would leave behind.
    let interrupted = tokio::select! {
        () = bench => false,
        _ = tokio::signal::ctrl_c() => true,
        _ = term.recv() => true,
    };
    if interrupted {
        eprintln!("interrupted: the throwaway clusters are stopped and removed");
        std::process::exit(130);
    }
}
