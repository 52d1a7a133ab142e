//! `pgferry-bench capture`: what capture costs the source, measured.
//!
//! On a throwaway cluster with pgbench's TPC-B-like workload, runs pgbench in
//! five modes, alternating them in every round so that drift of the machine
//! hits all alike:
//! - `none`: no triggers;
//! - `floor`: a row-level AFTER trigger that only checks pgferry's fence and
//!   writes nothing, the least any trigger-based capture can cost;
//! - `row`: pgferry's delta rows written by a row-level trigger instead (the
//!   design pgferry does not use, measured for the choice);
//! - `pgferry`: pgferry's capture as installed by pgferry (statement-level
//!   triggers with transition tables, one unindexed delta table per table);
//! - `bucardo`: Bucardo's design (a row-level AFTER trigger inserting the key
//!   and now() into a per-table delta table indexed on both).
//!
//! Also times one 100k-row UPDATE per mode. Prints JSON: TPS per round,
//! medians, the TPS loss of each mode, and the ratio of pgferry's loss (and
//! of the floor's) to Bucardo's.

use std::time::Instant;

use crate::{connect, median};
use pgferry::sandbox::Cluster;

const MODES: [&str; 5] = ["none", "floor", "row", "pgferry", "bucardo"];
const TABLES: [(&str, &str); 4] = [
    ("pgbench_accounts", "aid int"),
    ("pgbench_branches", "bid int"),
    ("pgbench_tellers", "tid int"),
    ("pgbench_history", "id bigint"),
];

struct Args {
    scale: u32,
    clients: u32,
    secs: u32,
    rounds: u32,
}

fn args(v: &[String]) -> Args {
    let f = crate::flags(v, &["--scale", "--clients", "--secs", "--rounds"]);
    Args {
        scale: crate::num(&f, "--scale", 10),
        clients: crate::num(&f, "--clients", 8),
        secs: crate::num(&f, "--secs", 15),
        rounds: crate::num(&f, "--rounds", 3),
    }
}

/// Enables exactly the triggers of `mode` (pgferry's or Bucardo's), and
/// empties both designs' delta tables so every run starts alike.
async fn select_mode(c: &tokio_postgres::Client, mode: &str) {
    let mut sql = crate::triggers_for(TABLES.map(|(t, _)| t), mode);
    for (t, _) in TABLES {
        for design in ["floor", "row"] {
            let how = if mode == design { "ENABLE" } else { "DISABLE" };
            sql.push_str(&format!("ALTER TABLE {t} {how} TRIGGER bench_{design};"));
        }
        sql.push_str(&format!("TRUNCATE bucardo_delta_{t}, row_delta_{t};"));
    }
    sql.push_str(
        "DO $$ DECLARE r record; BEGIN
           FOR r IN SELECT relname FROM pg_class WHERE relnamespace = 'pgferry'::regnamespace
                     AND relname LIKE 'd\\_%' AND relkind = 'r' LOOP
             EXECUTE format('TRUNCATE pgferry.%I', r.relname);
           END LOOP; END $$;",
    );
    c.batch_execute(&sql).await.expect("select the mode");
}

/// Runs the capture benchmark and prints its JSON.
pub async fn run(v: &[String]) {
    let a = args(v);
    eprintln!("starting throwaway clusters");
    let (source, target) =
        tokio::try_join!(Cluster::start("bench-source"), Cluster::start("bench-target")).expect("clusters");
    source
        .create_role("app", "bench", "NOSUPERUSER NOREPLICATION", Some("bench"))
        .await
        .expect("role");
    target
        .create_role("rds", "bench", "NOSUPERUSER CREATEROLE", Some("bench"))
        .await
        .expect("role");
    let pgbench = source.bin_dir().join("pgbench");
    let env = crate::pgbench_env(&source);
    eprintln!("pgbench -i -s {}", a.scale);
    crate::pgbench_init(&source, a.scale).await;
    let c = connect(source.port(), "bench").await;

    // pgferry's capture, installed by pgferry itself.
    let cfg = pgferry::config::Config {
        source: Some(
            format!(
                "postgres://app:bench@127.0.0.1:{}/bench?sslmode=disable",
                source.port()
            )
            .into(),
        ),
        target: Some(
            format!(
                "postgres://rds:bench@127.0.0.1:{}/bench?sslmode=disable",
                target.port()
            )
            .into(),
        ),
        ..Default::default()
    };
    let m = pgferry::Migration::new(cfg).expect("config");
    pgferry::capture::install(&m, &tokio_util::sync::CancellationToken::new())
        .await
        .expect("install capture");

    // Bucardo's source-side design, reproduced.
    for (t, key) in TABLES {
        let col = key.split_whitespace().next().unwrap();
        c.batch_execute(&format!(
            "CREATE TABLE bucardo_delta_{t} ({key}, txntime timestamptz NOT NULL DEFAULT now());
             CREATE INDEX ON bucardo_delta_{t} ({col});
             CREATE INDEX ON bucardo_delta_{t} (txntime);
             CREATE FUNCTION bucardo_delta_{t}() RETURNS trigger LANGUAGE plpgsql AS $f$
             BEGIN
               IF TG_OP = 'INSERT' THEN INSERT INTO bucardo_delta_{t} ({col}) VALUES (NEW.{col});
               ELSIF TG_OP = 'UPDATE' THEN
                 INSERT INTO bucardo_delta_{t} ({col}) VALUES (NEW.{col});
                 IF NEW.{col} <> OLD.{col} THEN INSERT INTO bucardo_delta_{t} ({col}) VALUES (OLD.{col}); END IF;
               ELSE INSERT INTO bucardo_delta_{t} ({col}) VALUES (OLD.{col});
               END IF;
               RETURN NULL;
             END $f$;
             CREATE TRIGGER bucardo_delta AFTER INSERT OR UPDATE OR DELETE ON {t}
               FOR EACH ROW EXECUTE FUNCTION bucardo_delta_{t}();"
        ))
        .await
        .expect("bucardo-style trigger");
    }

    // The floor, and pgferry's delta rows written row by row (into tables
    // stored like pgferry's).
    let storage: String = c
        .query_one("SELECT pgferry.delta_storage()", &[])
        .await
        .expect("delta storage")
        .get(0);
    for (t, key) in TABLES {
        let col = key.split_whitespace().next().unwrap();
        c.batch_execute(&format!(
            "CREATE FUNCTION bench_floor_{t}() RETURNS trigger LANGUAGE plpgsql AS $f$
             BEGIN
               IF pg_sequence_last_value('pgferry.fence'::regclass) > 0 THEN RAISE EXCEPTION 'fenced'; END IF;
               RETURN NULL;
             END $f$;
             CREATE TRIGGER bench_floor AFTER INSERT OR UPDATE OR DELETE ON {t}
               FOR EACH ROW EXECUTE FUNCTION bench_floor_{t}();
             CREATE TABLE row_delta_{t} (xid xid8 NOT NULL, {key} NOT NULL) WITH ({storage});
             CREATE FUNCTION bench_row_{t}() RETURNS trigger LANGUAGE plpgsql AS $f$
             BEGIN
               IF pg_sequence_last_value('pgferry.fence'::regclass) > 0 THEN RAISE EXCEPTION 'fenced'; END IF;
               IF TG_OP = 'DELETE' THEN INSERT INTO row_delta_{t} VALUES (pg_current_xact_id(), OLD.{col}); RETURN NULL; END IF;
               INSERT INTO row_delta_{t} VALUES (pg_current_xact_id(), NEW.{col});
               IF TG_OP = 'UPDATE' AND NEW.{col} IS DISTINCT FROM OLD.{col} THEN
                 INSERT INTO row_delta_{t} VALUES (pg_current_xact_id(), OLD.{col});
               END IF;
               RETURN NULL;
             END $f$;
             CREATE TRIGGER bench_row AFTER INSERT OR UPDATE OR DELETE ON {t}
               FOR EACH ROW EXECUTE FUNCTION bench_row_{t}();",
        ))
        .await
        .expect("floor and row-level triggers");
    }

    let mut tps: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut bulk: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for round in 0..a.rounds {
        // Rotate the order each round.
        for i in 0..MODES.len() {
            let mode = MODES[(i + round as usize) % MODES.len()];
            select_mode(&c, mode).await;
            crate::settle(&[&source], &TABLES.map(|(t, _)| t).join(", ")).await;
            let out = std::process::Command::new(&pgbench)
                .args([
                    "-n",
                    "-c",
                    &a.clients.to_string(),
                    "-j",
                    "2",
                    "-T",
                    &a.secs.to_string(),
                ])
                .envs(env.clone())
                .output()
                .expect("pgbench");
            let text = String::from_utf8_lossy(&out.stdout);
            let t: f64 = text
                .lines()
                .find(|l| l.starts_with("tps = "))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|x| x.parse().ok())
                .unwrap_or_else(|| {
                    panic!(
                        "no tps in pgbench output: {text}{}",
                        String::from_utf8_lossy(&out.stderr)
                    )
                });
            eprintln!("round {round} {mode:>8}: {t:.0} tps");
            tps.entry(mode).or_default().push(t);
            let started = Instant::now();
            c.batch_execute("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 100000")
                .await
                .expect("bulk update");
            bulk.entry(mode)
                .or_default()
                .push(started.elapsed().as_secs_f64());
        }
    }
    let med = |m: &str| median(&tps[m]);
    let loss = |m: &str| 100.0 * (1.0 - med(m) / med("none"));
    let per_mode = |f: &dyn Fn(&str) -> f64| -> serde_json::Map<String, serde_json::Value> {
        MODES.iter().map(|m| (m.to_string(), f(m).into())).collect()
    };
    let report = serde_json::json!({
        "benchmark": "capture overhead, pgbench TPC-B-like",
        "scale": a.scale, "clients": a.clients, "threads": 2, "secs_per_run": a.secs, "rounds": a.rounds,
        "tps": tps,
        "tps_median": per_mode(&med),
        "tps_loss_pct": per_mode(&|m: &str| if m == "none" { 0.0 } else { loss(m) }),
        "pgferry_loss_vs_bucardo_loss": loss("pgferry") / loss("bucardo"),
        "floor_loss_vs_bucardo_loss": loss("floor") / loss("bucardo"),
        "bulk_update_100k_secs_median": per_mode(&|m: &str| median(&bulk[m])),
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    drop((source, target));
}
