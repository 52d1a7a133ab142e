//! `pgferry-bench lag`: end-to-end lag and delta storage under steady load.
//!
//! pgbench's TPC-B-like workload runs on the source at a fixed rate
//! (`--rate`) for `--secs` while `pgferry sync` drains it; then a burst at
//! full speed (`--burst-secs`), then the fixed rate again for 30 s. A
//! heartbeat row on the source gets `clock_timestamp()` every 100 ms; every
//! 100 ms the benchmark reads it on the target, and the lag is how old the
//! heartbeat the target shows is (both servers share this machine's clock).
//! Every second it also records the size of pgferry's objects on the source
//! (delta tables, indexes, TOAST), which must stay bounded however long the
//! load lasts. Prints JSON: lag percentiles during the steady load, the
//! worst lag of the burst and how long after it the lag fell under 1 s
//! again, and the delta storage over time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::{connect, connect_as, percentile};

/// pgbench's TPS from its output.
fn tps(out: &std::process::Output) -> f64 {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0)
}

/// Runs the lag benchmark and prints its JSON.
pub async fn run(v: &[String]) {
    let f = crate::flags(
        v,
        &[
            "--scale",
            "--clients",
            "--rate",
            "--secs",
            "--burst-secs",
            "--poll-ms",
        ],
    );
    let scale: u32 = crate::num(&f, "--scale", 10);
    let clients: u32 = crate::num(&f, "--clients", 4);
    let rate: u32 = crate::num(&f, "--rate", 500);
    let secs: u64 = crate::num(&f, "--secs", 60);
    let burst_secs: u64 = crate::num(&f, "--burst-secs", 10);
    let poll_ms: u64 = crate::num(&f, "--poll-ms", 50);
    let recovery_secs = 30;
    let pgferry = crate::copy::pgferry_binary();

    let (source, target) = crate::clusters("bench-lag").await;
    let pgbench = source.bin_dir().join("pgbench");
    let env = crate::pgbench_env(&source);
    crate::pgbench_init(&source, scale).await;
    let src = connect(source.port(), "bench").await;
    src.batch_execute(crate::HEARTBEAT_TABLE)
        .await
        .expect("heartbeat table");

    let agent = |args: &[&str]| {
        let mut c = crate::pgferry_command(&pgferry, &source, &target, args);
        c.env("PGFERRY_SYNC__POLL_INTERVAL_MS", poll_ms.to_string());
        c
    };
    for step in ["install", "copy"] {
        let st = agent(&[step]).status().await.expect("pgferry");
        assert!(st.success(), "pgferry {step} failed");
    }
    let mut sync = agent(&["sync"]).spawn().expect("pgferry sync");

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    // The heartbeat.
    let beat = {
        let (stop, c) = (stop.clone(), connect(source.port(), "bench").await);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                c.batch_execute(crate::HEARTBEAT_BEAT).await.expect("heartbeat");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // Lag samples (seconds since start, lag) and storage samples.
    let lags: Arc<Mutex<Vec<(f64, f64)>>> = Default::default();
    let storage: Arc<Mutex<Vec<(f64, i64)>>> = Default::default();
    let sampler = {
        let (stop, lags, storage) = (stop.clone(), lags.clone(), storage.clone());
        let dst = connect_as(target.port(), "rds", "bench").await;
        let s = connect(source.port(), "bench").await;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let lag: f64 = dst
                    .query_one(crate::HEARTBEAT_AGE, &[])
                    .await
                    .expect("read the heartbeat")
                    .get(0);
                lags.lock().unwrap().push((started.elapsed().as_secs_f64(), lag));
                if n.is_multiple_of(10) {
                    let bytes: i64 = s
                        .query_one(
                            "SELECT coalesce(sum(pg_total_relation_size(oid)), 0)::bigint FROM pg_class
                              WHERE relnamespace = 'pgferry'::regnamespace AND relkind = 'r'",
                            &[],
                        )
                        .await
                        .expect("delta storage")
                        .get(0);
                    storage
                        .lock()
                        .unwrap()
                        .push((started.elapsed().as_secs_f64(), bytes));
                }
                n += 1;
            }
        })
    };

    let bench = |secs: u64, rate: Option<u32>| {
        let mut c = tokio::process::Command::new(&pgbench);
        c.args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &secs.to_string(),
        ])
        .envs(env.clone());
        if let Some(r) = rate {
            c.args(["--rate", &r.to_string()]);
        }
        c
    };
    eprintln!("steady load: {rate} tps for {secs} s");
    let out = bench(secs, Some(rate)).output().await.expect("pgbench");
    let steady_tps = tps(&out);
    let steady_end = started.elapsed().as_secs_f64();
    eprintln!("burst: full speed for {burst_secs} s");
    let out = bench(burst_secs, None).output().await.expect("pgbench");
    let burst_tps = tps(&out);
    let burst_end = started.elapsed().as_secs_f64();
    eprintln!("steady load again for {recovery_secs} s");
    let out = bench(recovery_secs, Some(rate)).output().await.expect("pgbench");
    let after_tps = tps(&out);
    stop.store(true, Ordering::Relaxed);
    beat.await.expect("heartbeat task");
    sampler.await.expect("sampler task");
    if let Some(pid) = sync.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = sync.wait().await;

    let lags = lags.lock().unwrap().clone();
    let storage = storage.lock().unwrap().clone();
    // The first 5 s are warm-up: the drain starts with the copy's backlog.
    let steady: Vec<f64> = lags
        .iter()
        .filter(|(t, _)| *t >= 5.0 && *t < steady_end)
        .map(|l| l.1)
        .collect();
    let burst_max = lags
        .iter()
        .filter(|(t, _)| *t >= steady_end)
        .map(|l| l.1)
        .fold(0.0, f64::max);
    let recovered_after = lags
        .iter()
        .find(|(t, l)| *t >= burst_end && *l < 1.0)
        .map(|(t, _)| t - burst_end);
    let minute = |from: f64, to: f64| {
        storage
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|s| s.1)
            .max()
            .unwrap_or(0)
    };
    let report = json!({
        "benchmark": "lag under steady load, pgbench TPC-B-like, heartbeat every 100 ms sampled every 100 ms",
        "scale": scale, "clients": clients, "rate_tps": rate, "steady_secs": secs, "burst_secs": burst_secs,
        "sync_poll_interval_ms": poll_ms,
        "achieved_tps": { "steady": steady_tps, "burst": burst_tps, "after_burst": after_tps },
        "lag_secs_steady": {
            "samples": steady.len(),
            "p50": percentile(&steady, 0.5), "p90": percentile(&steady, 0.9),
            "p99": percentile(&steady, 0.99), "max": percentile(&steady, 1.0),
        },
        "lag_secs_burst_max": burst_max,
        "lag_under_1s_again_secs_after_burst": recovered_after,
        "delta_storage_bytes": {
            "max": storage.iter().map(|s| s.1).max(),
            "max_first_minute": minute(0.0, 60.0),
            "max_last_minute_of_steady_load": minute((steady_end - 60.0).max(0.0), steady_end),
            "every_10_s": storage.iter().step_by(10).map(|s| json!([s.0.round(), s.1])).collect::<Vec<_>>(),
        },
        "targets": { "lag_p99_secs_max": 1.0 },
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
