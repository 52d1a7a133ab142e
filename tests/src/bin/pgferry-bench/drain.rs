//! `pgferry-bench drain`: how fast a backlog of changed rows reaches the
//! target, pgferry's drain against Bucardo's apply done the simple way.
//!
//! `--tables` tables (default 3) of `--rows` rows each are copied to the
//! target by pgferry. Each round, every row of every table is updated once
//! and that backlog is applied, by one design a round. pgferry's capture
//! stays installed throughout (sync refuses to drain past a capture trigger
//! disabled or altered); Bucardo's trigger is enabled in its rounds only,
//! and what pgferry captured in one is drained, untimed, before its next.
//! - pgferry: `pgferry sync --until-caught-up` (set-based: keys staged by
//!   COPY, DELETE ... USING, the rows by binary COPY; tables in parallel, a
//!   large table's backlog in parallel parts by key hash). Every row
//!   changed is past `sync.recopy_fraction`, so each table is copied again
//!   whole;
//! - pgferry_by_key: the same with `sync.recopy_fraction = 0`, so that
//!   every table is applied key by key, as a smaller backlog would be;
//! - Bucardo-style: the distinct keys of its delta table, then per chunk of
//!   10,000 keys, `DELETE ... WHERE id = ANY(...)` on the target and COPY of
//!   the current source rows for those keys, one table after the other.
//!
//! Before each timed apply both clusters are vacuumed and checkpointed, so
//! that neither design pays for the other's leftovers. After each apply the
//! target must equal the source (row count and a sum). Prints JSON: changed
//! rows per second for each design and their ratio.

use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;

use crate::{connect, connect_as, median};

const CHUNK: usize = 10_000;

/// Bucardo's source-side design, reproduced (see `capture`). Its delta
/// tables get a serial key so that pgferry accepts them, as `copy_only`
/// tables (copied, never drained).
fn bucardo_sql(t: &str) -> String {
    format!(
        "CREATE TABLE bucardo_delta_{t} (seq bigserial PRIMARY KEY, k int, txntime timestamptz NOT NULL DEFAULT now());
         CREATE INDEX ON bucardo_delta_{t} (k);
         CREATE INDEX ON bucardo_delta_{t} (txntime);
         CREATE FUNCTION bucardo_delta_{t}() RETURNS trigger LANGUAGE plpgsql AS $f$
         BEGIN
           IF TG_OP = 'DELETE' THEN INSERT INTO bucardo_delta_{t} (k) VALUES (OLD.id);
           ELSE INSERT INTO bucardo_delta_{t} (k) VALUES (NEW.id); END IF;
           RETURN NULL;
         END $f$;
         CREATE TRIGGER bucardo_style AFTER INSERT OR UPDATE OR DELETE ON {t}
           FOR EACH ROW EXECUTE FUNCTION bucardo_delta_{t}();"
    )
}

/// Bucardo's apply, the simple way. Returns the keys applied.
async fn bucardo_apply(
    tables: &[String],
    src: &tokio_postgres::Client,
    dst: &mut tokio_postgres::Client,
) -> u64 {
    let mut applied = 0;
    for t in tables {
        let keys: Vec<i32> = src
            .query(&format!("SELECT DISTINCT k FROM bucardo_delta_{t}"), &[])
            .await
            .expect("read keys")
            .iter()
            .map(|r| r.get(0))
            .collect();
        for chunk in keys.chunks(CHUNK) {
            let list = chunk.iter().map(i32::to_string).collect::<Vec<_>>().join(",");
            let tx = dst.transaction().await.expect("target tx");
            tx.execute(&format!("DELETE FROM {t} WHERE id = ANY($1)"), &[&chunk])
                .await
                .expect("delete keys");
            let sink = tx
                .copy_in(&format!("COPY {t} FROM STDIN"))
                .await
                .expect("copy in");
            let stream = src
                .copy_out(&format!(
                    "COPY (SELECT * FROM {t} WHERE id = ANY('{{{list}}}'::int[])) TO STDOUT"
                ))
                .await
                .expect("copy out");
            futures_util::pin_mut!(sink);
            futures_util::pin_mut!(stream);
            while let Some(chunk) = stream.next().await {
                sink.send(chunk.expect("read rows")).await.expect("write rows");
            }
            sink.finish().await.expect("finish copy");
            tx.commit().await.expect("commit");
            src.execute(
                &format!("DELETE FROM bucardo_delta_{t} WHERE k = ANY($1)"),
                &[&chunk],
            )
            .await
            .expect("forget deltas");
            applied += chunk.len() as u64;
        }
    }
    applied
}

/// Row count and sum of `v` over all tables.
async fn fingerprint(tables: &[String], c: &tokio_postgres::Client) -> (i64, i64) {
    let mut out = (0, 0);
    for t in tables {
        let r = c
            .query_one(
                &format!("SELECT count(*), coalesce(sum(v), 0)::bigint FROM {t}"),
                &[],
            )
            .await
            .expect("fingerprint");
        out.0 += r.get::<_, i64>(0);
        out.1 += r.get::<_, i64>(1);
    }
    out
}

/// Runs the drain benchmark and prints its JSON.
pub async fn run(v: &[String]) {
    let f = crate::flags(v, &["--rows", "--tables", "--rounds", "--workers"]);
    let rows: i64 = crate::num(&f, "--rows", 400_000);
    let rounds: usize = crate::num(&f, "--rounds", 3);
    let workers: usize = crate::num(&f, "--workers", 2);
    let tables: Vec<String> = (1..=crate::num(&f, "--tables", 3))
        .map(|i: usize| format!("t{i}"))
        .collect();
    let pgferry = crate::copy::pgferry_binary();
    let (source, target) = crate::clusters("bench-drain").await;
    let src = connect(source.port(), "bench").await;
    for t in &tables {
        src.batch_execute(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, v int NOT NULL, at timestamptz NOT NULL, pad text NOT NULL);
             INSERT INTO {t} SELECT g, 0, now(), md5(g::text) FROM generate_series(1, {rows}) g;
             {}",
            bucardo_sql(t)
        ))
        .await
        .expect("tables");
    }
    let agent = |args: &[&str]| {
        let mut c = crate::pgferry_command(&pgferry, &source, &target, args);
        c.env("PGFERRY_SYNC__WORKERS", workers.to_string())
            .env(
                "PGFERRY_COPY_ONLY",
                tables
                    .iter()
                    .map(|t| format!("public.bucardo_delta_{t}"))
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .env(
                "PGFERRY_SOURCE_LIMITS__MAX_CONNECTIONS",
                (workers + 3).to_string(),
            );
        c
    };
    eprintln!("pgferry install + copy of {} rows", rows * tables.len() as i64);
    for step in ["install", "copy"] {
        let st = agent(&[step]).status().await.expect("pgferry");
        assert!(st.success(), "pgferry {step} failed");
    }
    let mut dst = connect_as(target.port(), "rds", "bench").await;

    let mut rate: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    const MODES: [&str; 3] = ["pgferry", "pgferry_by_key", "bucardo_style"];
    for round in 0..rounds {
        for i in 0..MODES.len() {
            let mode = MODES[(i + round) % MODES.len()];
            // pgferry's capture stays as installed: a capture trigger
            // disabled, or only altered, is a capture gap sync refuses to
            // drain past. So it also captures the Bucardo-style rounds, and
            // what it captured then is drained before a round of its own,
            // untimed (the target already has those rows).
            let bucardo = mode == "bucardo_style";
            let how = if bucardo { "ENABLE ALWAYS" } else { "DISABLE" };
            for t in &tables {
                src.batch_execute(&format!("ALTER TABLE {t} {how} TRIGGER bucardo_style"))
                    .await
                    .expect("select the mode");
            }
            if !bucardo {
                let st = agent(&["sync", "--until-caught-up"])
                    .status()
                    .await
                    .expect("pgferry sync");
                assert!(st.success(), "pgferry sync of the previous round failed");
            }
            for t in &tables {
                src.batch_execute(&format!("UPDATE {t} SET v = v + 1, at = now()"))
                    .await
                    .expect("change every row");
            }
            crate::settle(&[&source, &target], &tables.join(", ")).await;
            let changed = (rows * tables.len() as i64) as f64;
            let started = Instant::now();
            if mode != "bucardo_style" {
                let mut sync = agent(&["sync", "--until-caught-up"]);
                if mode == "pgferry_by_key" {
                    sync.env("PGFERRY_SYNC__RECOPY_FRACTION", "0");
                }
                let st = sync.status().await.expect("pgferry sync");
                assert!(st.success(), "pgferry sync failed");
            } else {
                let applied = bucardo_apply(&tables, &src, &mut dst).await;
                assert_eq!(applied as f64, changed, "every key applied");
            }
            let secs = started.elapsed().as_secs_f64();
            assert_eq!(
                fingerprint(&tables, &dst).await,
                fingerprint(&tables, &src).await,
                "{mode}: the target equals the source"
            );
            eprintln!(
                "round {round}: {mode:>8} {changed} rows in {secs:.1} s: {:.0} rows/s",
                changed / secs
            );
            rate.entry(mode).or_default().push(changed / secs);
        }
    }
    let med = |m: &str| median(&rate[m]);
    let report = json!({
        "benchmark": "drain throughput: every row of every table changed once, applied to an equal target",
        "tables": tables.len(),
        "changed_rows_per_round": rows * tables.len() as i64,
        "sync_workers": workers,
        "rounds": rounds,
        "rows_per_sec": rate,
        "rows_per_sec_median": {
            "pgferry": med("pgferry"),
            "pgferry_by_key": med("pgferry_by_key"),
            "bucardo_style": med("bucardo_style"),
        },
        "pgferry_over_bucardo_style": med("pgferry") / med("bucardo_style"),
        "pgferry_by_key_over_bucardo_style": med("pgferry_by_key") / med("bucardo_style"),
        "target_min": 3.0,
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
