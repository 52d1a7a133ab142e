//! `pgferry-bench capture`: what capture costs the source, measured.
//!
//! On a throwaway cluster with pgbench's TPC-B-like workload, runs pgbench in
//! up to six modes (`--modes` picks some; `none`, `pgferry` and `bucardo`
//! always run), alternating them in every round so that drift of the
//! machine hits all alike:
//! - `none`: no triggers;
//! - `floor`: an empty statement-level AFTER trigger, the least any
//!   trigger-based capture can cost;
//! - `row`: pgferry's delta rows written by a row-level trigger instead (the
//!   design pgferry does not use, measured for the choice);
//! - `pgferry`: pgferry's capture as installed by pgferry (statement-level
//!   triggers with transition tables, one unindexed delta table of key
//!   columns per table, and the row trigger on the key columns that records
//!   an UPDATE's old key when the key changes);
//! - `bucardo_style`: Bucardo's delta design as the issue describes it,
//!   reproduced here (a row-level AFTER trigger inserting the key and now()
//!   into a per-table delta table indexed on both);
//! - `bucardo`: Bucardo itself. The Debian package's `bucardo` command
//!   installs its control database on the throwaway cluster and adds a sync
//!   from the source, which puts on each table what Bucardo 5.6 puts there
//!   in production: its SECURITY DEFINER delta trigger, the statement-level
//!   trigger that NOTIFYs its daemon (autokick, its default), and its
//!   TRUNCATE trigger. Its daemon is not started: only the triggers' cost is
//!   measured, as for pgferry.
//!
//! Around each pgbench run, reads the server's CPU time from /proc (the
//! postmaster's, its exited backends' and its live children's, user and
//! system): the CPU one transaction costs the server in each mode, with
//! the kernel's share that instruction counts miss.
//!
//! Also times one 100k-row UPDATE per mode, and measures what one
//! single-row UPDATE costs the server's CPU, alone in its transaction
//! (`MICRO_TXNS` of them in one session, CPU time of that backend): the
//! capture's cost per statement without the noise of concurrency. Last,
//! with the source stopped, counts the instructions of the same UPDATE in
//! every mode under valgrind: a figure that does not move with the
//! machine's load, as TPS and CPU time do.
//!
//! Prints JSON: TPS per round, medians, the TPS loss of each mode (from the
//! medians, and paired: the median of each round's loss against that
//! round's no-trigger run, which the machine's drift between rounds does
//! not move), the ratio of pgferry's loss (and of the floor's) to
//! Bucardo's and to the reproduction's, the same runs as time added per
//! transaction (1/TPS) with pgferry's share of Bucardo's and the share a
//! capture losing half Bucardo's TPS would have, 90% bootstrap intervals
//! of pgferry's share of Bucardo's loss (from the medians, paired, and by
//! server CPU: how far five rounds on a noisy host may be from many more),
//! the bulk UPDATE's time,
//! the CPU per single-row UPDATE and its instructions, with the ratio of
//! those pgferry adds to those Bucardo adds.

use std::time::Instant;

use crate::{connect, median};
use pgferry::sandbox::Cluster;

mod instructions;
mod server_cpu;

use instructions::{instructions_per_update, tpcb_instructions};
use server_cpu::{await_backends_gone, clock_ticks, cpu_per_update, postmaster_pid, server_cpu};

const MODES: [&str; 6] = ["none", "floor", "row", "pgferry", "bucardo_style", "bucardo"];
const TABLES: [(&str, &str); 4] = [
    ("pgbench_accounts", "aid int"),
    ("pgbench_branches", "bid int"),
    ("pgbench_tellers", "tid int"),
    ("pgbench_history", "id bigint"),
];

/// Modes every run has: the figures that matter are pgferry's loss over
/// Bucardo's, both against no triggers.
const REQUIRED_MODES: [&str; 3] = ["none", "pgferry", "bucardo"];

struct Args {
    scale: u32,
    clients: u32,
    secs: u32,
    rounds: u32,
    /// The modes to run, in `MODES` order (`--modes none,pgferry,bucardo`:
    /// fewer modes put the compared runs closer together in time, and more
    /// rounds in the same time).
    modes: Vec<&'static str>,
}

fn args(v: &[String]) -> Args {
    let f = crate::flags(v, &["--scale", "--clients", "--secs", "--rounds", "--modes"]);
    let modes = match f.get("--modes") {
        None => MODES.to_vec(),
        Some(list) => modes(list).unwrap_or_else(|e| {
            eprintln!("--modes: {e}");
            std::process::exit(2)
        }),
    };
    Args {
        scale: crate::num(&f, "--scale", 10),
        clients: crate::num(&f, "--clients", 8),
        secs: crate::num(&f, "--secs", 15),
        rounds: crate::num(&f, "--rounds", 3),
        modes,
    }
}

/// The modes a comma-separated `--modes` list names, in `MODES` order.
fn modes(list: &str) -> Result<Vec<&'static str>, String> {
    let named: Vec<&str> = list.split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
    if let Some(unknown) = named.iter().find(|m| !MODES.contains(m)) {
        return Err(format!(
            "unknown mode {unknown:?}; the modes are {}",
            MODES.join(", ")
        ));
    }
    let missing: Vec<&str> = REQUIRED_MODES
        .into_iter()
        .filter(|m| !named.contains(m))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "every run needs {}: add {}",
            REQUIRED_MODES.join(", "),
            missing.join(", ")
        ));
    }
    Ok(MODES.into_iter().filter(|m| named.contains(m)).collect())
}

/// The sync the `bucardo` command adds; its triggers are named after it.
const BUCARDO_SYNC: &str = "bench";

/// Enables exactly the triggers of `mode`, and empties every design's delta
/// tables so every run starts alike (as the superuser, who may touch
/// Bucardo's objects).
async fn select_mode(c: &tokio_postgres::Client, mode: &str) {
    c.batch_execute(&mode_sql(mode)).await.expect("select the mode");
}

/// The statements of [`select_mode`], one query string without blank lines.
fn mode_sql(mode: &str) -> String {
    let mut sql = crate::triggers_for(TABLES.map(|(t, _)| t), mode);
    for (t, _) in TABLES {
        for design in ["floor", "row"] {
            let how = if mode == design { "ENABLE" } else { "DISABLE" };
            sql.push_str(&format!("ALTER TABLE {t} {how} TRIGGER bench_{design};"));
        }
        let how = if mode == "bucardo" { "ENABLE" } else { "DISABLE" };
        for trigger in [
            "bucardo_delta".to_string(),
            format!("bucardo_kick_{BUCARDO_SYNC}"),
            format!("bucardo_note_trunc_{BUCARDO_SYNC}"),
        ] {
            sql.push_str(&format!("ALTER TABLE {t} {how} TRIGGER {trigger};"));
        }
        sql.push_str(&format!(
            "TRUNCATE bucardo_delta_{t}, row_delta_{t}, bucardo.delta_public_{t};"
        ));
    }
    sql.push_str(
        "DO $$ DECLARE r record; BEGIN
           FOR r IN SELECT relname FROM pg_class WHERE relnamespace = 'pgferry'::regnamespace
                     AND relname LIKE 'd\\_%' AND relkind = 'r' LOOP
             EXECUTE format('TRUNCATE pgferry.%I', r.relname);
           END LOOP; END $$;",
    );
    sql
}

/// Runs the capture benchmark and prints its JSON.
pub async fn run(v: &[String]) {
    let a = args(v);
    // The other benchmarks' clusters and server settings: pgbench's tables
    // fit in shared_buffers, as a production server's working set does.
    let (mut source, target) = crate::clusters("bench").await;
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

    // Bucardo's delta design, reproduced.
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
             CREATE TRIGGER bucardo_style AFTER INSERT OR UPDATE OR DELETE ON {t}
               FOR EACH ROW EXECUTE FUNCTION bucardo_delta_{t}();"
        ))
        .await
        .expect("bucardo-style trigger");
    }

    install_bucardo(&source).await;
    // Bucardo's objects belong to the superuser: modes are switched as it.
    let admin = source.superuser("bench").await.expect("superuser");

    // The floor, and pgferry's delta rows written row by row (into tables
    // stored like pgferry's). Neither checks a fence: pgferry's fence is in
    // the functions' bodies (`control/sql/0010_fence_in_bodies.sql`), and a
    // row-level design would have it there too.
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
               RETURN NULL;
             END $f$;
             CREATE TRIGGER bench_floor AFTER INSERT OR UPDATE OR DELETE ON {t}
               FOR EACH STATEMENT EXECUTE FUNCTION bench_floor_{t}();
             CREATE TABLE row_delta_{t} ({key} NOT NULL) WITH ({storage});
             CREATE FUNCTION bench_row_{t}() RETURNS trigger LANGUAGE plpgsql AS $f$
             BEGIN
               IF TG_OP = 'DELETE' THEN INSERT INTO row_delta_{t} VALUES (OLD.{col}); RETURN NULL; END IF;
               INSERT INTO row_delta_{t} VALUES (NEW.{col});
               IF TG_OP = 'UPDATE' AND NEW.{col} IS DISTINCT FROM OLD.{col} THEN
                 INSERT INTO row_delta_{t} VALUES (OLD.{col});
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
    let mut cpu: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut server_cpu_us: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut server_system_us: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let ticks = clock_ticks();
    let postmaster = postmaster_pid(&source);
    for round in 0..a.rounds {
        // Rotate the order each round.
        for i in 0..a.modes.len() {
            let mode = a.modes[(i + round as usize) % a.modes.len()];
            select_mode(&admin, mode).await;
            crate::settle(&[&source], &TABLES.map(|(t, _)| t).join(", ")).await;
            let (cpu_before, sessions) = server_cpu(postmaster);
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
            let txns: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
                .and_then(|n| n.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no transaction count in pgbench output: {text}"));
            await_backends_gone(postmaster, &sessions);
            let ((user, system), _) = server_cpu(postmaster);
            let per_txn = |t: f64| t / ticks * 1e6 / txns;
            let (user, system) = (per_txn(user - cpu_before.0), per_txn(system - cpu_before.1));
            eprintln!(
                "round {round} {mode:>8}: {t:.0} tps, server CPU {:.1} µs per transaction ({system:.1} system)",
                user + system
            );
            tps.entry(mode).or_default().push(t);
            server_cpu_us.entry(mode).or_default().push(user + system);
            server_system_us.entry(mode).or_default().push(system);
            let started = Instant::now();
            c.batch_execute("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 100000")
                .await
                .expect("bulk update");
            bulk.entry(mode)
                .or_default()
                .push(started.elapsed().as_secs_f64());
            cpu.entry(mode)
                .or_default()
                .push(cpu_per_update(&admin, ticks, a.scale * 10).await);
        }
    }
    // The same single-row UPDATEs counted in instructions, on the stopped
    // source.
    source.stop("fast").await.expect("stop the source");
    let instructions: std::collections::BTreeMap<&str, f64> = a
        .modes
        .iter()
        .map(|m| (*m, instructions_per_update(&source, m, a.scale * 10)))
        .collect();
    let tpcb: std::collections::BTreeMap<&str, f64> = a
        .modes
        .iter()
        .map(|m| (*m, tpcb_instructions(&source, m)))
        .collect();
    let tpcb_loss = |m: &str| 100.0 * (1.0 - tpcb["none"] / tpcb[m]);
    let added = |m: &str| instructions[m] - instructions["none"];
    // Each wall-clock loss is computed from a set of rounds: all of them
    // for the figures, and the bootstrap's draws of them for the intervals.
    type PerMode<'a> = std::collections::BTreeMap<&'a str, Vec<f64>>;
    let median_of = |v: &PerMode, m: &str, rounds: &[usize]| -> f64 {
        median(&rounds.iter().map(|&i| v[m][i]).collect::<Vec<_>>())
    };
    let loss_in = |m: &str, r: &[usize]| 100.0 * (1.0 - median_of(&tps, m, r) / median_of(&tps, "none", r));
    // Paired: each round's loss against that round's no-trigger run, so
    // that the machine's drift from round to round cancels out.
    let paired_in = |m: &str, r: &[usize]| {
        median(
            &r.iter()
                .map(|&i| 100.0 * (1.0 - tps[m][i] / tps["none"][i]))
                .collect::<Vec<_>>(),
        )
    };
    // The server's CPU per transaction in the TPS rounds: `1 - none/mode`
    // is the TPS loss of a CPU-bound server, with what instructions do not
    // show (the kernel's share, cache misses) and without the run-to-run
    // swings of TPS on a shared host.
    let cpu_loss_in = |m: &str, r: &[usize]| {
        100.0 * (1.0 - median_of(&server_cpu_us, "none", r) / median_of(&server_cpu_us, m, r))
    };
    let all: Vec<usize> = (0..tps["none"].len()).collect();
    let med = |m: &str| median(&tps[m]);
    let loss = |m: &str| loss_in(m, &all);
    let paired = |m: &str| paired_in(m, &all);
    let cpu_med = |m: &str| median(&server_cpu_us[m]);
    let cpu_loss = |m: &str| cpu_loss_in(m, &all);
    // How far pgferry's share of Bucardo's loss could be from what many
    // more rounds would give: the rounds drawn again with replacement.
    let ci90 = |loss: &dyn Fn(&str, &[usize]) -> f64| -> [f64; 2] {
        let (lo, hi) =
            crate::bootstrap::interval(all.len(), 0.9, |d| loss("pgferry", d) / loss("bucardo", d));
        [lo, hi]
    };
    // The same runs as time: the machine's µs per transaction (1/TPS) and
    // what each mode adds to it. A loss ratio is not a cost ratio: a loss
    // cannot pass 100%, so the larger loss is squeezed more. At Bucardo's
    // loss L, a capture whose loss is L/2 adds this fraction of Bucardo's
    // time per transaction: (1/(1 - L/2) - 1) / (1/(1 - L) - 1).
    let machine_us = |m: &str| 1e6 / med(m);
    let time_added = |m: &str| machine_us(m) - machine_us("none");
    let cpu_added = |m: &str| cpu_med(m) - cpu_med("none");
    let half_loss_time_ratio = {
        let l = loss("bucardo") / 100.0;
        (1.0 / (1.0 - l / 2.0) - 1.0) / (1.0 / (1.0 - l) - 1.0)
    };
    let per_mode = |f: &dyn Fn(&str) -> f64| -> serde_json::Map<String, serde_json::Value> {
        a.modes.iter().map(|m| (m.to_string(), f(m).into())).collect()
    };
    // A figure that needs a mode this run left out is null.
    let with = |mode: &str, figure: &dyn Fn() -> f64| -> serde_json::Value {
        if a.modes.contains(&mode) {
            figure().into()
        } else {
            serde_json::Value::Null
        }
    };
    let report = serde_json::json!({
        "benchmark": "capture overhead, pgbench TPC-B-like",
        "scale": a.scale, "clients": a.clients, "threads": 2, "secs_per_run": a.secs, "rounds": a.rounds,
        "modes": a.modes,
        "tps": tps,
        "tps_median": per_mode(&med),
        "tps_loss_pct": per_mode(&|m: &str| if m == "none" { 0.0 } else { loss(m) }),
        "pgferry_loss_vs_bucardo_loss": loss("pgferry") / loss("bucardo"),
        "pgferry_loss_vs_bucardo_loss_ci90": ci90(&loss_in),
        "tps_loss_pct_paired_median": per_mode(&paired),
        "pgferry_paired_loss_vs_bucardo": paired("pgferry") / paired("bucardo"),
        "pgferry_paired_loss_vs_bucardo_ci90": ci90(&paired_in),
        "pgferry_loss_vs_bucardo_style_loss": with("bucardo_style", &|| loss("pgferry") / loss("bucardo_style")),
        "floor_loss_vs_bucardo_loss": with("floor", &|| loss("floor") / loss("bucardo")),
        "server_cpu_us_per_txn": server_cpu_us,
        "server_cpu_us_per_txn_median": per_mode(&cpu_med),
        "server_system_cpu_us_per_txn_median": per_mode(&|m: &str| median(&server_system_us[m])),
        "server_cpu_loss_pct": per_mode(&cpu_loss),
        "pgferry_server_cpu_loss_vs_bucardo": cpu_loss("pgferry") / cpu_loss("bucardo"),
        "pgferry_server_cpu_loss_vs_bucardo_ci90": ci90(&cpu_loss_in),
        "pgferry_server_cpu_loss_vs_bucardo_style": with("bucardo_style", &|| cpu_loss("pgferry") / cpu_loss("bucardo_style")),
        "machine_us_per_txn_median": per_mode(&machine_us),
        "time_added_us_per_txn": per_mode(&time_added),
        "pgferry_time_added_vs_bucardo": time_added("pgferry") / time_added("bucardo"),
        "pgferry_time_added_vs_bucardo_style": with("bucardo_style", &|| time_added("pgferry") / time_added("bucardo_style")),
        "pgferry_server_cpu_added_vs_bucardo": cpu_added("pgferry") / cpu_added("bucardo"),
        "time_added_vs_bucardo_at_half_its_loss": half_loss_time_ratio,
        "bulk_update_100k_secs_median": per_mode(&|m: &str| median(&bulk[m])),
        "cpu_us_per_single_row_update_median": per_mode(&|m: &str| median(&cpu[m])),
        "instructions_per_single_row_update": instructions,
        "instructions_added_per_single_row_update": per_mode(&added),
        "pgferry_instructions_added_vs_bucardo": added("pgferry") / added("bucardo"),
        "pgferry_instructions_added_vs_bucardo_style": with("bucardo_style", &|| added("pgferry") / added("bucardo_style")),
        "tpcb_instructions_per_txn": tpcb,
        "tpcb_instruction_loss_pct": per_mode(&|m: &str| tpcb_loss(m)),
        "pgferry_tpcb_instruction_loss_vs_bucardo": tpcb_loss("pgferry") / tpcb_loss("bucardo"),
        "pgferry_tpcb_instruction_loss_vs_bucardo_style": with("bucardo_style", &|| tpcb_loss("pgferry") / tpcb_loss("bucardo_style")),
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    drop((source, target));
}

/// Bucardo's own source-side objects, put there by the `bucardo` command of
/// the Debian package (5.6): its control database `bucardo` on the same
/// throwaway cluster, the source database and a stand-in target database
/// with pgbench's tables, and a sync between them. Adding the sync is what
/// installs Bucardo's triggers on the source's tables.
async fn install_bucardo(source: &Cluster) {
    let socket = source.socket_dir().display().to_string();
    let port = source.port().to_string();
    let admin = source.superuser("postgres").await.expect("superuser");
    admin
        .batch_execute("CREATE DATABASE bucardo_target")
        .await
        .expect("bucardo's target database");
    let st = std::process::Command::new(source.bin_dir().join("pgbench"))
        .args([
            "-i",
            "-q",
            "-I",
            "dtp",
            "-h",
            &socket,
            "-p",
            &port,
            "-U",
            "postgres",
            "bucardo_target",
        ])
        .status()
        .expect("pgbench -i for bucardo's target");
    assert!(st.success(), "pgbench -i on bucardo_target failed");
    source
        .superuser("bucardo_target")
        .await
        .expect("superuser")
        .batch_execute("ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY")
        .await
        .expect("a key on bucardo_target's pgbench_history");

    let piddir = source.socket_dir().join("bucardo-run");
    std::fs::create_dir_all(&piddir).expect("bucardo's pid directory");
    let bucardo = |args: &[&str]| {
        let out = std::process::Command::new("bucardo")
            .args(["--dbhost", &socket, "--dbport", &port, "--piddir"])
            .arg(&piddir)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("bucardo (Debian package bucardo; scripts/bench installs it): {e}"));
        assert!(
            out.status.success(),
            "bucardo {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    eprintln!("installing Bucardo's triggers with the bucardo command");
    bucardo(&["--dbuser", "postgres", "--batch", "install"]);
    // Every later command works on Bucardo's control database, as its user.
    let control = |args: &[&str]| bucardo(&[&["--dbuser", "bucardo", "--dbname", "bucardo"], args].concat());
    for (name, dbname) in [("src", "bench"), ("tgt", "bucardo_target")] {
        control(&[
            "add",
            "db",
            name,
            &format!("dbname={dbname}"),
            &format!("host={socket}"),
            &format!("port={port}"),
            "user=postgres",
        ]);
    }
    let names: Vec<String> = TABLES.iter().map(|(t, _)| format!("public.{t}")).collect();
    let mut add_tables = vec!["add", "table"];
    add_tables.extend(names.iter().map(String::as_str));
    add_tables.extend(["db=src", "relgroup=bench"]);
    control(&add_tables);
    control(&[
        "add",
        "sync",
        BUCARDO_SYNC,
        "relgroup=bench",
        "dbs=src:source,tgt:target",
        "autokick=1",
    ]);
    let installed: i64 = source
        .superuser("bench")
        .await
        .expect("superuser")
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'bucardo_delta' AND tgfoid::regproc::text LIKE 'bucardo.%'",
            &[],
        )
        .await
        .expect("bucardo's triggers")
        .get(0);
    assert_eq!(
        installed,
        TABLES.len() as i64,
        "Bucardo put its delta trigger on every table"
    );
}

/// `txns` single-row UPDATEs of pgbench_tellers (`tellers` rows), each in
/// its own transaction, in one DO statement on one line.
fn update_loop(txns: u32, tellers: u32) -> String {
    format!(
        "DO $$ BEGIN FOR i IN 1..{txns} LOOP \
         UPDATE pgbench_tellers SET tbalance = tbalance + 1 WHERE tid = i % {tellers} + 1; \
         COMMIT; END LOOP; END $$"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_run_in_their_order_and_must_include_the_compared_ones() {
        assert_eq!(
            modes("bucardo, none,pgferry").unwrap(),
            ["none", "pgferry", "bucardo"]
        );
        assert_eq!(
            modes("floor,none,pgferry,bucardo").unwrap(),
            ["none", "floor", "pgferry", "bucardo"]
        );
        let e = modes("none,pgferry").unwrap_err();
        assert!(e.contains("add bucardo"), "{e}");
        let e = modes("none,pgferry,bucardo,bucardo_stlye").unwrap_err();
        assert!(e.contains("unknown mode \"bucardo_stlye\""), "{e}");
    }
}
