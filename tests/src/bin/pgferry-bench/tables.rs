//! `pgferry-bench tables`: what many captured tables cost, the shape of a
//! schema per tenant.
//!
//! `--tables` small tables (20 rows each, 20 tables to a schema) and one
//! table `hot` are migrated: install, copy and `sync --until-caught-up` are
//! timed. Then `pgferry sync` runs for `--secs` while only `hot` is written:
//! a heartbeat row gets `clock_timestamp()` every 500 ms on the source, and
//! every 10 ms the benchmark reads it on the target; the lag is how long
//! each heartbeat took to arrive. Meanwhile (the source vacuumed first,
//! so that autovacuum has less to do then) the source's committed
//! transactions and WAL are counted (the heartbeat's own included): what
//! the drain costs an otherwise idle source. Then a partition of the
//! partitioned table `events` is created and written, as pg_partman's
//! maintenance does, and sync follows it: how long until its row is on the
//! target, and how long the heartbeat waited meanwhile (the drain's pause).
//! Last, a cutover, whose report gives the write downtime and its parts.
//! Prints JSON.

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
             INSERT INTO hot VALUES (1, clock_timestamp());
             CREATE TABLE events (id bigint PRIMARY KEY, note text) PARTITION BY RANGE (id);
             CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (100000);
             INSERT INTO events SELECT g, 'e' FROM generate_series(1, 1000) g;",
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

    // Autovacuum's first pass over thousands of new tables writes ten times
    // the WAL the drain does (visibility map records); when it fell within
    // the measured window, most of the figure was its, not pgferry's.
    connect(source.port(), "bench")
        .await
        .batch_execute("VACUUM")
        .await
        .expect("vacuum the source");
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
        lags.push(heartbeat(&src, &dst).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = src.query_one(counters, &[]).await.expect("counters");
    let per_sec = |i: usize| (after.get::<_, i64>(i) - before.get::<_, i64>(i)) as f64 / elapsed;

    eprintln!("a partition created and written while syncing");
    src.batch_execute(
        "CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM (100000) TO (200000);
         INSERT INTO events VALUES (150000, 'in the new partition')",
    )
    .await
    .expect("the new partition");
    let started = Instant::now();
    let mut follow_lags = Vec::new();
    let followed_secs = loop {
        follow_lags.push(heartbeat(&src, &dst).await);
        let there: i64 = dst
            .query_one("SELECT count(*) FROM events WHERE id = 150000", &[])
            .await
            .expect("read the new partition's row")
            .get(0);
        if there == 1 {
            break started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "sync never followed the new partition"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    follow_lags.sort_by(f64::total_cmp);
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
        "partitioned": "events: 1 partition, then 2",
        "poll_interval_ms": poll_ms,
        "steps": steps,
        "idle_sync": {
            "secs": elapsed,
            "source_commits_per_sec": per_sec(0),
            "source_wal_bytes_per_sec": per_sec(1),
            "heartbeats": lags.len(),
            "lag_secs": { "p50": median(&lags), "p99": p99, "max": lags.last() },
        },
        "partition_followed": {
            "secs_until_its_row_arrived": followed_secs,
            "heartbeats": follow_lags.len(),
            "heartbeat_lag_max_secs": follow_lags.last(),
        },
        "cutover": {
            "wall_secs": cutover_secs,
            "partitions_followed": report["partitions_followed"],
            "writes_blocked_ms": report["writes_blocked_ms"],
            "final_drain_ms": report["final_drain_ms"],
            "verify_ms": report["verify_ms"],
            "tables_verified": report["tables_verified"],
        },
    });
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
}

/// Writes the heartbeat on the source and waits until it is on the target;
/// returns how long that took.
async fn heartbeat(src: &tokio_postgres::Client, dst: &tokio_postgres::Client) -> f64 {
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
            return written.elapsed().as_secs_f64();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
