//! `pgferry-bench fallback`: the way back (`cutover.fallback`) under load.
//!
//! A pgbench database is migrated and cut over with a way back; then
//! pgbench's TPC-B-like workload runs on the new database at a fixed rate
//! (`--rate`) for `--secs` while `pgferry fallback` applies it to the old
//! source. A heartbeat row on the target gets `clock_timestamp()` every
//! 100 ms; every 100 ms the benchmark reads it on the old source, and the
//! reverse lag is how old the heartbeat there is (both servers share this
//! machine's clock). Then `pgferry switchback` runs with the load still on:
//! its write-blocked window is the figure, next to the forward cutover's of
//! the same run. Prints JSON.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::{connect, connect_as, percentile};

/// Runs the fallback benchmark and prints its JSON.
pub async fn run(v: &[String]) {
    let f = crate::flags(
        v,
        &[
            "--scale",
            "--clients",
            "--rate",
            "--secs",
            "--poll-ms",
            "--verify",
        ],
    );
    let scale: u32 = crate::num(&f, "--scale", 10);
    let clients: u32 = crate::num(&f, "--clients", 4);
    let rate: u32 = crate::num(&f, "--rate", 500);
    let secs: u64 = crate::num(&f, "--secs", 60);
    let poll_ms: u64 = crate::num(&f, "--poll-ms", 50);
    // `changed` (the default) or `full`: the switchback's comparison.
    let verify = f.get("--verify").cloned().unwrap_or_else(|| "changed".into());
    let pgferry = crate::copy::pgferry_binary();

    let (source, target) = crate::clusters("bench-fallback").await;
    crate::pgbench_init(&source, scale).await;
    connect(source.port(), "bench")
        .await
        .batch_execute(crate::HEARTBEAT_TABLE)
        .await
        .expect("heartbeat table");
    let agent = |args: &[&str]| {
        let mut c = crate::pgferry_command(&pgferry, &source, &target, args);
        c.env("PGFERRY_SYNC__POLL_INTERVAL_MS", poll_ms.to_string())
            .env("PGFERRY_CUTOVER__FALLBACK", "true")
            .env("PGFERRY_CUTOVER__VERIFY", &verify);
        c
    };
    let mut cutover = serde_json::Value::Null;
    for step in [
        &["install"][..],
        &["copy"],
        &["sync", "--until-caught-up"],
        &["cutover", "--json"],
    ] {
        let out = agent(step)
            .stdout(std::process::Stdio::piped())
            .output()
            .await
            .expect("pgferry");
        assert!(out.status.success(), "pgferry {step:?} failed");
        if step[0] == "cutover" {
            cutover = serde_json::from_slice(&out.stdout).expect("cutover JSON");
        }
    }
    let mut follow = agent(&["fallback"]).spawn().expect("pgferry fallback");

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let beat = {
        let (stop, c) = (stop.clone(), connect_as(target.port(), "rds", "bench").await);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // Refused once the switchback fences the target.
                if c.batch_execute(crate::HEARTBEAT_BEAT).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let lags: Arc<Mutex<Vec<(f64, f64)>>> = Default::default();
    let sampler = {
        let (stop, lags) = (stop.clone(), lags.clone());
        let old = connect(source.port(), "bench").await;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let lag: f64 = old
                    .query_one(crate::HEARTBEAT_AGE, &[])
                    .await
                    .expect("read the heartbeat on the old source")
                    .get(0);
                lags.lock().unwrap().push((started.elapsed().as_secs_f64(), lag));
            }
        })
    };
    let on_target = [
        ("PGHOST", "127.0.0.1".to_string()),
        ("PGPORT", target.port().to_string()),
        ("PGUSER", "rds".into()),
        ("PGPASSWORD", "bench".into()),
        ("PGDATABASE", "bench".into()),
    ];
    let load = |secs: u64| {
        let mut c = tokio::process::Command::new(source.bin_dir().join("pgbench"));
        c.args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &secs.to_string(),
            "--rate",
            &rate.to_string(),
        ])
        .envs(on_target.clone())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
        c
    };
    eprintln!("the application on the new database: {rate} tps for {secs} s");
    let out = load(secs).output().await.expect("pgbench");
    let achieved = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|x| x.parse::<f64>().ok());
    stop.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler task");
    // The switchback with the load still on: pgbench's clients end on the
    // target's fence.
    let mut writers = load(7200).kill_on_drop(true).spawn().expect("pgbench");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let t0 = Instant::now();
    let out = agent(&["switchback", "--json"])
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .expect("pgferry switchback");
    let wall = t0.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "pgferry switchback failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let switchback: serde_json::Value = serde_json::from_slice(&out.stdout).expect("switchback JSON");
    let _ = writers.start_kill();
    let _ = writers.wait().await;
    beat.await.expect("heartbeat task");
    if let Some(pid) = follow.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = follow.wait().await;

    // The first 5 s are warm-up.
    let steady: Vec<f64> = lags
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| *t >= 5.0)
        .map(|l| l.1)
        .collect();
    let report = json!({
        "benchmark": "the way back: pgbench on the new database at a fixed rate, applied to the old source (heartbeat every 100 ms sampled every 100 ms), then a switchback under that load",
        "scale": scale, "clients": clients, "rate_tps": rate, "secs": secs, "poll_interval_ms": poll_ms,
        "verify": verify,
        "achieved_tps": achieved,
        "reverse_lag_secs": {
            "samples": steady.len(),
            "p50": percentile(&steady, 0.5), "p90": percentile(&steady, 0.9),
            "p99": percentile(&steady, 0.99), "max": percentile(&steady, 1.0),
        },
        "switchback": {
            "writes_blocked_ms": switchback["writes_blocked_ms"],
            "final_drain_keys": switchback["final_drain_keys"],
            "rows_verified": switchback["rows_verified"],
            "verified_ahead": switchback["verified_ahead"],
            "verify_ahead_ms": switchback["verify_ahead_ms"],
            "changed_rows_verified_ahead": switchback["changed_rows_verified_ahead"],
            "wall_secs": wall,
        },
        "forward_cutover_writes_blocked_ms": cutover["writes_blocked_ms"],
        "targets": { "reverse_lag_p99_secs_max": 1.0 },
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
