//! `pgferry-bench install`: what `pgferry install` costs the application's
//! writes while one of its transactions holds a table.
//!
//! On a pgbench database (`--scale`), two fixed-rate write streams run for
//! the whole round, each write scheduled on the clock and timed from its
//! schedule (so a write that waits for a free session counts that wait):
//! `--rate` updates per second of random rows of `pgbench_accounts` (the
//! held table), and `--rate` inserts per second into `pgbench_history`.
//! One second in, an application transaction updates row 1 of
//! `pgbench_accounts` and holds it for `--hold-secs`; a second later
//! `pgferry install` starts (mode `pgferry`), or nothing does (mode
//! `none`). Modes alternate over `--rounds`; pgferry's cleanup follows each
//! install. Prints JSON: each stream's latency percentiles by mode, the
//! install's wall time, and the p99 latency install added to the held
//! table's writes (the goal: at most 100 ms).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::{connect, median, percentile};

/// Sessions per stream: enough that a write never waits for one unless
/// the writes before it are stuck.
const SESSIONS: usize = 64;

/// Runs the install benchmark and prints its JSON.
pub async fn run(v: &[String]) {
    let f = crate::flags(v, &["--scale", "--rate", "--hold-secs", "--rounds"]);
    let scale: u32 = crate::num(&f, "--scale", 10);
    let rate: u32 = crate::num(&f, "--rate", 50);
    let hold_secs: u64 = crate::num(&f, "--hold-secs", 8);
    let rounds: usize = crate::num(&f, "--rounds", 2);
    let pgferry = crate::copy::pgferry_binary();

    let (source, target) = crate::clusters("bench-install").await;
    crate::pgbench_init(&source, scale).await;
    let rows = i64::from(scale) * 100_000;

    let mut runs = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            ["none", "pgferry"]
        } else {
            ["pgferry", "none"]
        };
        for mode in order {
            eprintln!("round {}: {mode}", round + 1);
            // Another row than the held one each time, chosen here: a
            // volatile expression in the WHERE clause would scan the table.
            let updates = Stream::start(source.port(), rate, move || {
                let aid = rand::random_range(2..=rows);
                format!("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = {aid}")
            })
            .await;
            let inserts = Stream::start(source.port(), rate, || {
                "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 1, now())"
                    .to_string()
            })
            .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let holder = connect(source.port(), "bench").await;
            holder
                .batch_execute("BEGIN; UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1")
                .await
                .expect("the application's long transaction");
            let released = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(hold_secs)).await;
                holder.batch_execute("COMMIT").await.expect("commit");
            });
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut install_secs = None;
            if mode == "pgferry" {
                let started = Instant::now();
                let st = crate::pgferry_command(&pgferry, &source, &target, &["install"])
                    .status()
                    .await
                    .expect("pgferry install");
                assert!(st.success(), "pgferry install failed");
                install_secs = Some(started.elapsed().as_secs_f64());
            }
            released.await.expect("the long transaction");
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (held, other) = (updates.stop().await, inserts.stop().await);
            if mode == "pgferry" {
                let st = crate::pgferry_command(&pgferry, &source, &target, &["cleanup"])
                    .status()
                    .await
                    .expect("pgferry cleanup");
                assert!(st.success(), "pgferry cleanup failed");
            }
            let summary = |v: &[f64]| {
                json!({
                    "writes": v.len(),
                    "p50_ms": percentile(v, 0.5),
                    "p99_ms": percentile(v, 0.99),
                    "max_ms": percentile(v, 1.0),
                })
            };
            runs.push(json!({
                "round": round + 1,
                "mode": mode,
                "install_secs": install_secs,
                "held_table_updates": summary(&held),
                "other_table_inserts": summary(&other),
            }));
        }
    }
    let med = |mode: &str, stream: &str, key: &str| {
        median(
            &runs
                .iter()
                .filter(|r| r["mode"] == mode)
                .filter_map(|r| r[stream][key].as_f64())
                .collect::<Vec<_>>(),
        )
    };
    let medians = |mode: &str| {
        json!({
            "held_table_updates": {
                "p99_ms": med(mode, "held_table_updates", "p99_ms"),
                "max_ms": med(mode, "held_table_updates", "max_ms"),
            },
            "other_table_inserts": {
                "p99_ms": med(mode, "other_table_inserts", "p99_ms"),
                "max_ms": med(mode, "other_table_inserts", "max_ms"),
            },
        })
    };
    let install_secs = median(
        &runs
            .iter()
            .filter_map(|r| r["install_secs"].as_f64())
            .collect::<Vec<_>>(),
    );
    let report = json!({
        "benchmark": "write latency while pgferry install runs and an application transaction holds one table",
        "goal": "added p99 latency on the held table at most 100 ms",
        "scale": scale, "rate_per_stream": rate, "hold_secs": hold_secs, "rounds": rounds,
        "runs": runs,
        "median": { "none": medians("none"), "pgferry": medians("pgferry"), "install_secs": install_secs },
        "held_table_p99_added_ms":
            med("pgferry", "held_table_updates", "p99_ms") - med("none", "held_table_updates", "p99_ms"),
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}

/// Writes at a fixed rate, each timed from its scheduled start.
struct Stream {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Vec<f64>>,
}

impl Stream {
    /// `sql` gives each write's statement.
    async fn start(port: u16, rate: u32, sql: impl Fn() -> String + Send + 'static) -> Stream {
        let (give, take) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..SESSIONS {
            give.send(connect(port, "bench").await).expect("pool");
        }
        let take = Arc::new(tokio::sync::Mutex::new(take));
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut writes = Vec::new();
            while !stopped.is_cancelled() {
                let due = tick.tick().await;
                let (take, give, sql) = (take.clone(), give.clone(), sql());
                writes.push(tokio::spawn(async move {
                    let client = take.lock().await.recv().await.expect("a session");
                    client.batch_execute(&sql).await.expect("the application's write");
                    let took = due.elapsed().as_secs_f64() * 1000.0;
                    let _ = give.send(client);
                    took
                }));
            }
            let mut latencies = Vec::with_capacity(writes.len());
            for w in writes {
                latencies.push(w.await.expect("a write"));
            }
            latencies
        });
        Stream { stop, task }
    }

    /// Stops scheduling writes, waits for those in flight and returns the
    /// latencies in milliseconds.
    async fn stop(self) -> Vec<f64> {
        self.stop.cancel();
        self.task.await.expect("the stream")
    }
}
