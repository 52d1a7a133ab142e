//! `pgferry-bench follow`: what a deploy's schema change costs a running
//! sync, followed, next to the recopy it took before.
//!
//! pgbench's TPC-B-like workload updates `pgbench_accounts` (1M rows at
//! `--scale 10`) at a fixed rate while `pgferry sync` drains it; a
//! heartbeat row on the source gets `clock_timestamp()` every 100 ms and is
//! read on the target every 100 ms (the lag is its age there). After a
//! quiet stretch, one column is added to the accounts (`NOT NULL DEFAULT`,
//! the usual ORM migration), later another one's type is widened (`integer`
//! to `bigint`, which rewrites the table on both sides), then the key
//! itself (after `pgferry release-keys`); each is followed
//! by sync, and the lag spike each causes is measured: its worst lag and how
//! long until it fell under 1 s again. Then the way without following, as
//! an operator did it before: the same kind of column added on both sides,
//! then `install` and `copy` (which copies the table again) with sync
//! stopped, and the drain of what piled up meanwhile. Prints JSON.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::{connect, connect_as, percentile};

/// The lag samples (seconds since start, lag) from `from` on: the worst,
/// and seconds after `from` until the lag was under 1 s again.
fn spike(lags: &[(f64, f64)], from: f64, to: f64) -> serde_json::Value {
    let window: Vec<&(f64, f64)> = lags.iter().filter(|(t, _)| *t >= from && *t < to).collect();
    let worst = window.iter().map(|l| l.1).fold(0.0, f64::max);
    let peak_at = window.iter().find(|l| l.1 == worst).map_or(from, |l| l.0);
    let under_1s_after = window
        .iter()
        .find(|(t, l)| *t >= peak_at && *l < 1.0)
        .map(|(t, _)| t - from);
    json!({ "max_lag_secs": worst, "lag_under_1s_again_secs_after_change": under_1s_after })
}

/// Runs the follow benchmark and prints its JSON.
pub async fn run(v: &[String]) {
    let f = crate::flags(
        v,
        &["--scale", "--rate", "--clients", "--quiet-secs", "--poll-ms"],
    );
    let scale: u32 = crate::num(&f, "--scale", 10);
    let rate: u32 = crate::num(&f, "--rate", 200);
    let clients: u32 = crate::num(&f, "--clients", 2);
    let quiet: u64 = crate::num(&f, "--quiet-secs", 20);
    let poll_ms: u64 = crate::num(&f, "--poll-ms", 50);
    let pgferry = crate::copy::pgferry_binary();

    let (source, target) = crate::clusters("bench-follow").await;
    let pgbench = source.bin_dir().join("pgbench");
    let env = crate::pgbench_env(&source);
    crate::pgbench_init(&source, scale).await;
    let src = connect(source.port(), "bench").await;
    src.batch_execute(crate::HEARTBEAT_TABLE)
        .await
        .expect("heartbeat table");
    let rows: i64 = src
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await
        .expect("count")
        .get(0);
    let agent = |args: &[&str], follow: bool| {
        let mut c = crate::pgferry_command(&pgferry, &source, &target, args);
        c.env("PGFERRY_SYNC__POLL_INTERVAL_MS", poll_ms.to_string())
            .env("PGFERRY_SYNC__FOLLOW_SCHEMA_CHANGES", follow.to_string());
        c
    };
    for step in ["install", "copy"] {
        let st = agent(&[step], true).status().await.expect("pgferry");
        assert!(st.success(), "pgferry {step} failed");
    }
    let mut sync = agent(&["sync"], true).spawn().expect("pgferry sync");

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let beat = {
        let (stop, c) = (stop.clone(), connect(source.port(), "bench").await);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // Refused while the table is rewritten: tried again.
                let _ = c.batch_execute(crate::HEARTBEAT_BEAT).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let lags: Arc<Mutex<Vec<(f64, f64)>>> = Default::default();
    let sampler = {
        let (stop, lags) = (stop.clone(), lags.clone());
        let dst = connect_as(target.port(), "rds", "bench").await;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if let Ok(row) = dst.query_one(crate::HEARTBEAT_AGE, &[]).await {
                    lags.lock()
                        .unwrap()
                        .push((started.elapsed().as_secs_f64(), row.get(0)));
                }
            }
        })
    };
    let total = 4 * quiet + 60;
    eprintln!("load: {rate} tps for up to {total} s");
    let mut load = tokio::process::Command::new(&pgbench)
        .args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &total.to_string(),
        ])
        .args(["--rate", &rate.to_string()])
        .envs(env.clone())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("pgbench");

    tokio::time::sleep(Duration::from_secs(quiet)).await;
    let added_at = started.elapsed().as_secs_f64();
    eprintln!("a column added");
    let t = Instant::now();
    src.batch_execute("ALTER TABLE pgbench_accounts ADD COLUMN tier text NOT NULL DEFAULT 'basic'")
        .await
        .expect("add a column");
    let add_ddl_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(quiet)).await;
    let widened_at = started.elapsed().as_secs_f64();
    eprintln!("a column widened");
    let t = Instant::now();
    src.batch_execute("ALTER TABLE pgbench_accounts ALTER COLUMN abalance TYPE bigint")
        .await
        .expect("widen a column");
    let widen_ddl_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(quiet)).await;
    // The key itself: PostgreSQL takes it only once `release-keys` has
    // moved the table off its key column trigger.
    let keyed_at = started.elapsed().as_secs_f64();
    eprintln!("the key widened, after release-keys");
    let t = Instant::now();
    let st = agent(&["release-keys", "--table", "public.pgbench_accounts"], false)
        .status()
        .await
        .expect("release-keys");
    assert!(st.success(), "release-keys");
    let release_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    src.batch_execute("ALTER TABLE pgbench_accounts ALTER COLUMN aid TYPE bigint")
        .await
        .expect("widen the key");
    let key_ddl_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(quiet)).await;
    let followed_end = started.elapsed().as_secs_f64();

    // Before: sync stops on the drift; the operator makes the change on the
    // target, then install and copy (the table copied again), then sync.
    eprintln!("the same kind of change, not followed: install + copy");
    if let Some(pid) = sync.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = sync.wait().await;
    let recopy_at = started.elapsed().as_secs_f64();
    let t = Instant::now();
    src.batch_execute("ALTER TABLE pgbench_accounts ADD COLUMN region text NOT NULL DEFAULT 'eu'")
        .await
        .expect("add a column");
    connect_as(target.port(), "rds", "bench")
        .await
        .batch_execute("ALTER TABLE pgbench_accounts ADD COLUMN region text NOT NULL DEFAULT 'eu'")
        .await
        .expect("the operator's change on the target");
    let st = agent(&["install"], false).status().await.expect("install");
    assert!(st.success(), "install after the change");
    let install_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let st = agent(&["copy"], false).status().await.expect("copy");
    assert!(st.success(), "copy after the change");
    let copy_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let st = agent(&["sync", "--until-caught-up"], false)
        .status()
        .await
        .expect("sync");
    assert!(st.success(), "sync after the recopy");
    let catch_up_secs = t.elapsed().as_secs_f64();
    let recopy_end = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if let Some(pid) = load.id() {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
    }
    let _ = load.wait().await;
    beat.await.expect("heartbeat task");
    sampler.await.expect("sampler task");

    let lags = lags.lock().unwrap().clone();
    let before: Vec<f64> = lags
        .iter()
        .filter(|(t, _)| *t >= 5.0 && *t < added_at)
        .map(|l| l.1)
        .collect();
    let report = json!({
        "benchmark": "a schema change during sync under pgbench load: followed, against install + copy",
        "scale": scale, "accounts_rows": rows, "rate_tps": rate, "clients": clients,
        "sync_poll_interval_ms": poll_ms,
        "lag_secs_before": { "p50": percentile(&before, 0.5), "p99": percentile(&before, 0.99) },
        "column_added_followed": {
            "ddl": "ADD COLUMN tier text NOT NULL DEFAULT 'basic'",
            "source_ddl_secs": add_ddl_secs,
            "lag": spike(&lags, added_at, widened_at),
        },
        "column_widened_followed": {
            "ddl": "ALTER COLUMN abalance TYPE bigint (rewrites the table on both sides)",
            "source_ddl_secs": widen_ddl_secs,
            "lag": spike(&lags, widened_at, keyed_at),
        },
        "key_widened_followed": {
            "ddl": "release-keys, then ALTER COLUMN aid TYPE bigint (the key: rewrites the table and its primary key on both sides)",
            "release_keys_secs": release_secs,
            "source_ddl_secs": key_ddl_secs,
            "lag": spike(&lags, keyed_at, followed_end),
        },
        "column_added_by_recopy": {
            "install_secs": install_secs,
            "copy_secs": copy_secs,
            "catch_up_secs": catch_up_secs,
            "lag": spike(&lags, recopy_at, recopy_end + 1.0),
        },
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
