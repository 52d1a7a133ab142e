//! `pgferry-bench tables`: what many captured tables cost, the shape of a
//! schema per tenant.
//!
//! `--tables` small tables (20 rows each, 20 tables to a schema) and one
//! table `hot` are migrated: install, copy and `sync --until-caught-up` are
//! timed. Then `pgferry sync` runs for `--secs` while only `hot` is written:
//! a heartbeat row gets `clock_timestamp()` every 500 ms on the source, and
//! every 10 ms the benchmark reads it on the target; the lag is how long
//! each heartbeat took to arrive. Meanwhile the source's committed
//! transactions and WAL are counted (the heartbeat's own included): what
//! the drain costs an otherwise idle source. Last, a cutover, whose report
//! gives the write downtime and its parts. Prints JSON.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::{connect, connect_as, median};

/// Runs the many-tables benchmark and prints its JSON.
pub async fn run(v: &[String]) {
    let f = crate::flags(v, &["--tables", "--secs", "--poll-ms"]);
    let tables: u32 = crate::num(&f, "--tables", 2000);
    let secs: u64 = crate::num(&f, "--secs", 30);
    let poll_ms: u64 = crate::num(&f, "--poll-ms", 200);
    let pgferry = crate::copy::pgferry_binary();
    let (source, target) = crate::clusters("bench-tables").await;
    eprintln!("creating {tables} tables");
    connect(source.port(), "bench")
        .await
        .batch_execute(&format!(
            "DO $$ BEGIN
               FOR t IN 0..{last} LOOP
                 IF t % 20 = 0 THEN EXECUTE format('CREATE SCHEMA tenant_%s', t / 20); END IF;
                 EXECUTE format('CREATE TABLE tenant_%s.t%s (id bigserial PRIMARY KEY, v int NOT NULL, note text)',
                                t / 20, t % 20);
                 EXECUTE format('INSERT INTO tenant_%s.t%s (v, note) SELECT g, md5(g::text) FROM generate_series(1, 20) g',
                                t / 20, t % 20);
               END LOOP;
             END $$;
             CREATE TABLE hot (id int PRIMARY KEY, at timestamptz NOT NULL);
             INSERT INTO hot VALUES (1, clock_timestamp());",
            last = tables.saturating_sub(1)
        ))
        .await
        .expect("the tables");
    let agent = |args: &[&str]| {
        let mut c = crate::pgferry_command(&pgferry, &source, &target, args);
        c.env("PGFERRY_SYNC__POLL_INTERVAL_MS", poll_ms.to_string());
        c
    };
    let mut steps = serde_json::Map::new();
    for step in [&["install"][..], &["copy"], &["sync", "--until-caught-up"]] {
        let started = Instant::now();
        let st = agent(step).status().await.expect("pgferry");
        assert!(st.success(), "pgferry {step:?} failed");
        steps.insert(
            format!("{}_secs", step[0]),
            json!(started.elapsed().as_secs_f64()),
        );
    }

    eprintln!("sync for {secs} s, writing only the heartbeat");
    let mut sync = agent(&["sync"]).spawn().expect("pgferry sync");
    let src = connect(source.port(), "bench").await;
    let dst = connect_as(target.port(), "rds", "bench").await;
    let counters = "SELECT xact_commit, (pg_current_wal_lsn() - '0/0')::int8
                      FROM pg_stat_database WHERE datname = current_database()";
    // The first passes of a starting agent do more (a drift check).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = src.query_one(counters, &[]).await.expect("counters");
    let started = Instant::now();
    let mut lags = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        let at: f64 = src
            .query_one(
                "UPDATE hot SET at = clock_timestamp() WHERE id = 1 RETURNING extract(epoch FROM at)::float8",
                &[],
            )
            .await
            .expect("heartbeat")
            .get(0);
        let written = Instant::now();
        loop {
            let there: f64 = dst
                .query_one("SELECT extract(epoch FROM at)::float8 FROM hot WHERE id = 1", &[])
                .await
                .expect("read the heartbeat")
                .get(0);
            if there >= at {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        lags.push(written.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = src.query_one(counters, &[]).await.expect("counters");
    let per_sec = |i: usize| (after.get::<_, i64>(i) - before.get::<_, i64>(i)) as f64 / elapsed;
    let _ = sync.start_kill();
    let _ = sync.wait().await;

    eprintln!("cutover");
    let started = Instant::now();
    let out = agent(&["cutover", "--json"])
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .expect("pgferry cutover");
    assert!(
        out.status.success(),
        "pgferry cutover failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cutover_secs = started.elapsed().as_secs_f64();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cutover JSON");
    lags.sort_by(f64::total_cmp);
    let p99 = lags[((lags.len() - 1) as f64 * 0.99).round() as usize];
    let result = json!({
        "benchmark": "many small tables: migration steps, an idle source's load and one table's lag while syncing, the cutover",
        "tables": tables + 1,
        "poll_interval_ms": poll_ms,
        "steps": steps,
        "idle_sync": {
            "secs": elapsed,
            "source_commits_per_sec": per_sec(0),
            "source_wal_bytes_per_sec": per_sec(1),
            "heartbeats": lags.len(),
            "lag_secs": { "p50": median(&lags), "p99": p99, "max": lags.last() },
        },
        "cutover": {
            "wall_secs": cutover_secs,
            "writes_blocked_ms": report["writes_blocked_ms"],
            "final_drain_ms": report["final_drain_ms"],
            "verify_ms": report["verify_ms"],
            "tables_verified": report["tables_verified"],
        },
    });
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
}
