//! `pgferry-bench cutover`: how long writes stay blocked, by verification
//! scope.
//!
//! A pgbench database (`--scale`) is migrated once per round and scope
//! (`cutover.verify = "full"`, then `"changed"`, alternating which goes
//! first): install, copy and sync into a fresh target database, then
//! `cutover` while pgbench writes at `--rate` transactions per second, then
//! cleanup. The cutover's report gives the write downtime and its parts
//! (final drain, verification), and for `changed` the verification ahead of
//! the fence (writes not blocked). Prints JSON with each run and the
//! medians.

use serde_json::json;

use crate::{connect, median};

/// Runs the cutover benchmark and prints its JSON.
pub async fn run(v: &[String]) {
    let f = crate::flags(v, &["--scale", "--rate", "--clients", "--rounds"]);
    let scale: u32 = crate::num(&f, "--scale", 50);
    let rate: u32 = crate::num(&f, "--rate", 200);
    let clients: u32 = crate::num(&f, "--clients", 2);
    let rounds: usize = crate::num(&f, "--rounds", 2);
    let pgferry = crate::copy::pgferry_binary();

    let (source, target) = crate::clusters("bench-cutover").await;
    crate::pgbench_init(&source, scale).await;
    let bytes: i64 = connect(source.port(), "bench")
        .await
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .expect("database size")
        .get(0);

    let mut runs = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            ["full", "changed"]
        } else {
            ["changed", "full"]
        };
        for scope in order {
            eprintln!("round {}: cutover.verify = {scope}", round + 1);
            // A fresh, empty target database each time.
            let admin = target.superuser("postgres").await.expect("superuser");
            for sql in [
                "DROP DATABASE IF EXISTS bench WITH (FORCE)",
                "CREATE DATABASE bench OWNER rds",
            ] {
                admin.batch_execute(sql).await.expect("fresh target database");
            }
            let agent = |args: &[&str]| {
                let mut c = crate::pgferry_command(&pgferry, &source, &target, args);
                c.env("PGFERRY_CUTOVER__VERIFY", scope)
                    .env("PGFERRY_SYNC__POLL_INTERVAL_MS", "100");
                c
            };
            for step in [&["install"][..], &["copy"], &["sync", "--until-caught-up"]] {
                let st = agent(step).status().await.expect("pgferry");
                assert!(st.success(), "pgferry {step:?} failed");
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
                    "3600",
                    "--rate",
                    &rate.to_string(),
                ])
                .envs(crate::pgbench_env(&source))
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
            assert!(
                out.status.success(),
                "pgferry cutover failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cutover JSON");
            // pgbench's clients end on the fence's error; end it all the same.
            let _ = writers.start_kill();
            let _ = writers.wait().await;
            let st = agent(&["cleanup"]).status().await.expect("pgferry cleanup");
            assert!(st.success(), "pgferry cleanup failed");
            runs.push(json!({
                "round": round + 1,
                "verify": scope,
                "cutover_wall_secs": wall,
                "writes_blocked_ms": report["writes_blocked_ms"],
                "final_drain_ms": report["final_drain_ms"],
                "verify_ms": report["verify_ms"],
                "verify_ahead_ms": report["verify_ahead_ms"],
                "tables_verified_by_changes": report["tables_verified_by_changes"],
                "rows_verified": report["rows_verified"],
            }));
        }
    }
    let med = |scope: &str, key: &str| {
        median(
            &runs
                .iter()
                .filter(|r| r["verify"] == scope)
                .filter_map(|r| r[key].as_f64())
                .collect::<Vec<_>>(),
        )
    };
    let blocked = |scope| med(scope, "writes_blocked_ms");
    let report = json!({
        "benchmark": "write downtime of a cutover by verification scope, pgbench writing at a fixed rate",
        "scale": scale, "database_bytes": bytes, "rate_tps": rate, "clients": clients, "rounds": rounds,
        "runs": runs,
        "median": {
            "full": {
                "writes_blocked_ms": blocked("full"),
                "verify_ms": med("full", "verify_ms"),
            },
            "changed": {
                "writes_blocked_ms": blocked("changed"),
                "verify_ms": med("changed", "verify_ms"),
                "verify_ahead_ms": med("changed", "verify_ahead_ms"),
            },
        },
        "changed_writes_blocked_vs_full": blocked("changed") / blocked("full"),
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
