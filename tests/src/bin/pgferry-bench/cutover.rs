//! `pgferry-bench cutover`: how long writes stay blocked, by database size
//! and verification scope.
//!
//! For each scale of `--scales` (pgbench scale factors; 70, 350 and 1400
//! make about 1, 5 and 20 GB), a pgbench database is initialised on the
//! source and migrated once per round and scope of `--verify` (alternating
//! the order each round): install, copy and sync into a fresh target
//! database, then `cutover` while pgbench writes at `--rate` transactions
//! per second (its updates spread over the largest table), then cleanup.
//! The cutover's report gives the write downtime and its steps, and for
//! `changed` the verification ahead of the fence (writes not blocked).
//! With `--backlog P`, before each cutover P% of `pgbench_accounts` rows
//! are changed at once on the source and the time `sync --until-caught-up`
//! takes to drain them is measured (`backlog_drain_secs`).
//! Prints JSON with each run and the medians by scale and scope.

use serde_json::json;

use crate::{connect, median};

/// Runs the cutover benchmark and prints its JSON.
pub async fn run(v: &[String]) {
    let f = crate::flags(
        v,
        &[
            "--scales",
            "--verify",
            "--rate",
            "--clients",
            "--rounds",
            "--backlog",
        ],
    );
    let scales: Vec<u32> = crate::list(&f, "--scales", "70,350,1400")
        .iter()
        .map(|s| {
            s.parse().unwrap_or_else(|_| {
                eprintln!("--scales takes pgbench scale factors, not {s:?}");
                std::process::exit(2)
            })
        })
        .collect();
    let scopes = crate::list(&f, "--verify", "changed");
    if let Some(bad) = scopes.iter().find(|s| !["full", "changed"].contains(&s.as_str())) {
        eprintln!("--verify takes full and/or changed, not {bad:?}");
        std::process::exit(2);
    }
    let rate: u32 = crate::num(&f, "--rate", 200);
    let clients: u32 = crate::num(&f, "--clients", 2);
    let rounds: usize = crate::num(&f, "--rounds", 1);
    let backlog: u32 = crate::num(&f, "--backlog", 0);
    if backlog > 100 {
        eprintln!("--backlog takes a percentage of pgbench_accounts' rows, 0 to 100");
        std::process::exit(2);
    }
    let pgferry = crate::copy::pgferry_binary();

    let (source, target) = crate::clusters("bench-cutover").await;
    let mut runs = Vec::new();
    let mut medians = Vec::new();
    for &scale in &scales {
        eprintln!("pgbench scale {scale}");
        crate::pgbench_init(&source, scale).await;
        let bytes: i64 = connect(source.port(), "bench")
            .await
            .query_one("SELECT pg_database_size(current_database())", &[])
            .await
            .expect("database size")
            .get(0);
        let first = runs.len();
        for round in 0..rounds {
            let mut order = scopes.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for scope in &order {
                eprintln!("scale {scale}, round {}: cutover.verify = {scope}", round + 1);
                let report = migrate_once(&pgferry, &source, &target, scope, rate, clients, backlog).await;
                runs.push(json!({
                    "scale": scale,
                    "database_bytes": bytes,
                    "round": round + 1,
                    "verify": scope,
                    "cutover_wall_secs": report["wall_secs"],
                    "writes_blocked_ms": report["writes_blocked_ms"],
                    "final_drain_ms": report["final_drain_ms"],
                    "final_drain_keys": report["final_drain_keys"],
                    "verify_ms": report["verify_ms"],
                    "verify_ahead_ms": report["verify_ahead_ms"],
                    "rows_verified": report["rows_verified"],
                    "fenced_steps": report["fenced_steps"],
                    "backlog_rows": report["backlog_rows"],
                    "backlog_drain_secs": report["backlog_drain_secs"],
                }));
            }
        }
        let of_scale = &runs[first..];
        let med = |scope: &str, key: &str| {
            median(
                &of_scale
                    .iter()
                    .filter(|r| r["verify"] == scope)
                    .filter_map(|r| r[key].as_f64())
                    .collect::<Vec<_>>(),
            )
        };
        for scope in &scopes {
            medians.push(json!({
                "scale": scale,
                "database_bytes": bytes,
                "verify": scope,
                "writes_blocked_ms": med(scope, "writes_blocked_ms"),
                "verify_ms": med(scope, "verify_ms"),
                "verify_ahead_ms": med(scope, "verify_ahead_ms"),
                "rows_verified": med(scope, "rows_verified"),
                "backlog_drain_secs": med(scope, "backlog_drain_secs"),
            }));
        }
    }
    let report = json!({
        "benchmark": "write downtime of a cutover by database size and verification scope, pgbench writing at a fixed rate",
        "goal": "cutover.verify = changed (the default): writes_blocked_ms under 1000 at every size",
        "rate_tps": rate, "clients": clients, "rounds": rounds, "backlog_percent": backlog,
        "runs": runs,
        "median": medians,
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}

/// One migration into a fresh target database with `cutover.verify =
/// scope`, pgbench writing through the cutover; returns the cutover's JSON
/// report with its wall time added (`wall_secs`), and with `backlog` > 0
/// the drain of that percentage of `pgbench_accounts` changed at once
/// (`backlog_rows`, `backlog_drain_secs`).
async fn migrate_once(
    pgferry: &std::path::Path,
    source: &pgferry::sandbox::Cluster,
    target: &pgferry::sandbox::Cluster,
    scope: &str,
    rate: u32,
    clients: u32,
    backlog: u32,
) -> serde_json::Value {
    let admin = target.superuser("postgres").await.expect("superuser");
    for sql in [
        "DROP DATABASE IF EXISTS bench WITH (FORCE)",
        "CREATE DATABASE bench OWNER rds",
    ] {
        admin.batch_execute(sql).await.expect("fresh target database");
    }
    let agent = |args: &[&str]| {
        let mut c = crate::pgferry_command(pgferry, source, target, args);
        c.env("PGFERRY_CUTOVER__VERIFY", scope)
            .env("PGFERRY_SYNC__POLL_INTERVAL_MS", "100");
        c
    };
    for step in [&["install"][..], &["copy"], &["sync", "--until-caught-up"]] {
        let st = agent(step).status().await.expect("pgferry");
        assert!(st.success(), "pgferry {step:?} failed");
    }
    let mut drained = None;
    if backlog > 0 {
        let changed = connect(source.port(), "bench")
            .await
            .execute(
                "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % (100 / $1::int) = 0",
                &[&(backlog as i32)],
            )
            .await
            .expect("make a backlog");
        let started = std::time::Instant::now();
        let st = agent(&["sync", "--until-caught-up"])
            .status()
            .await
            .expect("pgferry");
        assert!(st.success(), "pgferry sync (backlog) failed");
        drained = Some((changed, started.elapsed().as_secs_f64()));
    }
    // The application writes until the fence refuses it.
    let mut writers = tokio::process::Command::new(source.bin_dir().join("pgbench"))
        .args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "1",
            "-T",
            "7200",
            "--rate",
            &rate.to_string(),
        ])
        .envs(crate::pgbench_env(source))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("pgbench");
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let started = std::time::Instant::now();
    let out = agent(&["cutover", "--json"])
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .expect("pgferry cutover");
    let wall = started.elapsed().as_secs_f64();
    if std::env::var_os("BENCH_PGFERRY_LOG").is_some() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        out.status.success(),
        "pgferry cutover failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cutover JSON");
    report["wall_secs"] = json!(wall);
    report["backlog_rows"] = json!(drained.map(|d| d.0));
    report["backlog_drain_secs"] = json!(drained.map(|d| d.1));
    // pgbench's clients end on the fence's error; end it all the same.
    let _ = writers.start_kill();
    let _ = writers.wait().await;
    let st = agent(&["cleanup"]).status().await.expect("pgferry cleanup");
    assert!(st.success(), "pgferry cleanup failed");
    report
}
