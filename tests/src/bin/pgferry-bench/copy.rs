//! `pgferry-bench copy`: the bulk copy against the tools people use today.
//!
//! Builds a source of about 1.9 GB at `--scale 1` (pgbench tables, a table
//! of 2-8 KB JSON documents in a TEXT column, a wide table with six secondary
//! indexes and a foreign key, an inheritance parent with two children; with
//! `--mix documents`, the default, the JSON table is the biggest, as in the
//! issue that set the first targets; with `--mix indexes`, pgbench's
//! accounts and the indexed wide table weigh most), then
//! copies it into a fresh target database with each tool in turn, rotating
//! the order every round: pgferry (`install`, then the timed `copy`: data,
//! keys and indexes, ANALYZE), `pg_dump -Fc | pg_restore`, `pg_dump -Fd -jN`
//! then `pg_restore -jN`, and `pgcopydb clone` when it is installed. Every
//! run's row counts are checked against the source. Prints JSON: wall and
//! CPU times, their medians and ratios to pgferry's, pgferry's data/index
//! split and its peak RSS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use pgferry::sandbox::Cluster;
use serde_json::json;

use crate::{connect, connect_as, median};

const TOOLS: [&str; 4] = ["pgferry", "pg_dump_restore", "pg_dump_dir_jobs", "pgcopydb"];
/// Server settings of the benchmark clusters. New WAL segments are not
/// zero-filled, so that the first run (a fresh cluster creates its WAL
/// files) costs what the later ones (which recycle them) do.
pub(crate) const SERVER: [&str; 6] = [
    "wal_init_zero=off",
    "shared_buffers=1GB",
    "max_wal_size=8GB",
    "checkpoint_timeout=30min",
    "maintenance_work_mem=256MB",
    "max_parallel_maintenance_workers=0",
];

struct Args {
    scale: f64,
    mix: Mix,
    rounds: usize,
    jobs: usize,
    tools: Vec<String>,
}

fn args(v: &[String]) -> Args {
    let f = crate::flags(v, &["--scale", "--mix", "--rounds", "--jobs", "--tools"]);
    let tools = crate::list(&f, "--tools", &TOOLS.join(","));
    for t in &tools {
        if !TOOLS.contains(&t.as_str()) {
            eprintln!("unknown tool {t}; known: {}", TOOLS.join(", "));
            std::process::exit(2);
        }
    }
    let mix = match f.get("--mix").map_or("documents", String::as_str) {
        "documents" => Mix::Documents,
        "indexes" => Mix::Indexes,
        other => {
            eprintln!("--mix is documents or indexes, not {other:?}");
            std::process::exit(2);
        }
    };
    Args {
        scale: crate::num(&f, "--scale", 1.0),
        mix,
        rounds: crate::num(&f, "--rounds", 3),
        jobs: crate::num(&f, "--jobs", 2),
        tools,
    }
}

/// Which tables weigh most in the dataset (`--mix`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mix {
    /// The JSON documents (TOAST) are the biggest table: 1.9 GB at scale 1
    /// of pgbench scale 30, 330,000 documents and 1M wide rows.
    Documents,
    /// pgbench's accounts and the wide table with its six indexes weigh
    /// most: 1.84 GB at scale 1 of pgbench scale 50, 125,000 documents
    /// (656 MB) and 1.5M wide rows.
    Indexes,
}

impl Mix {
    /// pgbench's scale factor at `--scale 1`, documents, wide rows.
    fn sizes(self) -> (f64, f64, f64) {
        match self {
            Mix::Documents => (30.0, 330_000.0, 1_000_000.0),
            Mix::Indexes => (50.0, 125_000.0, 1_500_000.0),
        }
    }
}

/// The dataset beside pgbench's `branches` branches; `s` scales row counts.
fn dataset_sql(s: f64, mix: Mix, branches: i64) -> String {
    let n = |base: f64| ((base * s).round() as i64).max(10);
    let (_, docs, wide) = mix.sizes();
    format!(
        "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY;
         CREATE TABLE docs (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL, body text NOT NULL);
         INSERT INTO docs (created_at, body)
           SELECT now() - g * interval '1 minute',
                  (SELECT json_agg(json_build_object('line', i, 'sku', md5((g * 100 + i)::text),
                                                     'qty', (g + i) % 17, 'price', ((g * i) % 10000) / 100.0,
                                                     'note', 'item ' || i || ' of order ' || g))::text
                     FROM generate_series(1, 18 + g % 55) i)
             FROM generate_series(1, {docs}) g;
         CREATE TABLE wide (
             id bigserial PRIMARY KEY,
             branch int NOT NULL REFERENCES pgbench_branches (bid),
             customer_id bigint NOT NULL, email text NOT NULL, status text NOT NULL,
             amount numeric(12,2) NOT NULL, currency char(3) NOT NULL,
             created_at timestamptz NOT NULL, updated_at timestamptz,
             flags int NOT NULL, score double precision, ref uuid NOT NULL,
             city text, country text, note text);
         INSERT INTO wide (branch, customer_id, email, status, amount, currency, created_at, updated_at,
                           flags, score, ref, city, country, note)
           SELECT 1 + g % {branches}, g % 100000, 'user' || (g % 100000) || '@example.com',
                  (ARRAY['new','paid','shipped','returned'])[1 + g % 4], (g % 100000) / 7.0, 'EUR',
                  now() - g * interval '1 second', CASE WHEN g % 3 = 0 THEN now() END,
                  g % 64, g / 1000.0, md5(g::text)::uuid, 'city ' || g % 500, 'country ' || g % 40,
                  CASE WHEN g % 10 = 0 THEN repeat('note ', 10) END
             FROM generate_series(1, {wide}) g;
         CREATE INDEX ON wide (customer_id);
         CREATE INDEX ON wide (email);
         CREATE INDEX ON wide (status, created_at);
         CREATE INDEX ON wide (created_at);
         CREATE INDEX ON wide (ref);
         CREATE INDEX ON wide (city, country);
         CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz NOT NULL, kind text NOT NULL, payload text);
         CREATE TABLE events_a (CHECK (kind = 'a')) INHERITS (events);
         CREATE TABLE events_b (CHECK (kind = 'b')) INHERITS (events);
         ALTER TABLE events_a ADD PRIMARY KEY (id);
         ALTER TABLE events_b ADD PRIMARY KEY (id);
         INSERT INTO events SELECT g, now() - g * interval '1 second', 'root', md5(g::text)
           FROM generate_series(1, {parent}) g;
         INSERT INTO events_a SELECT g, now() - g * interval '1 second', 'a', repeat(md5(g::text), 2)
           FROM generate_series({parent} + 1, {parent} + {child}) g;
         INSERT INTO events_b SELECT g, now() - g * interval '1 second', 'b', repeat(md5(g::text), 2)
           FROM generate_series({parent} + {child} + 1, {parent} + 2 * {child}) g;",
        docs = n(docs),
        wide = n(wide),
        parent = n(50_000.0),
        child = n(300_000.0),
    )
}

/// Table name → rows (`ONLY` each table), in the database behind `c`.
async fn row_counts(c: &tokio_postgres::Client) -> BTreeMap<String, i64> {
    let tables: Vec<String> = c
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'r' AND n.nspname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .expect("list tables")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut out = BTreeMap::new();
    for t in tables {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM ONLY {t}"), &[])
            .await
            .expect("count")
            .get(0);
        out.insert(t, n);
    }
    out
}

struct Bench {
    source: Cluster,
    target: Cluster,
    jobs: usize,
    pgferry: PathBuf,
    scratch: tempfile::TempDir,
}

/// One tool's run: wall seconds, and what pgferry reports of itself.
struct Run {
    secs: f64,
    report: Option<serde_json::Value>,
}

/// CPU seconds of the source server, the target server and the tool.
fn cpu_now(b: &Bench) -> [f64; 3] {
    [
        tree_cpu_secs(postmaster_pid(&b.source)),
        tree_cpu_secs(postmaster_pid(&b.target)),
        tree_cpu_secs(std::process::id()) - tree_cpu_secs_self(),
    ]
}

/// The benchmark's own CPU time (excluded from the tool's).
fn tree_cpu_secs_self() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    f.get(11)
        .zip(f.get(12))
        .map_or(0.0, |(u, s)| (u + s) as f64 / 100.0)
}

impl Bench {
    fn url(&self, side: &str) -> String {
        match side {
            "source" => format!(
                "postgres://app:bench@127.0.0.1:{}/bench?sslmode=disable",
                self.source.port()
            ),
            _ => format!(
                "postgres://rds:bench@127.0.0.1:{}/dst?sslmode=disable",
                self.target.port()
            ),
        }
    }

    fn bin(&self, tool: &str) -> PathBuf {
        self.source.bin_dir().join(tool)
    }

    /// Drops and recreates the target database.
    async fn fresh_target(&self) {
        let admin = self.target.superuser("postgres").await.expect("target superuser");
        for sql in [
            "DROP DATABASE IF EXISTS dst WITH (FORCE)",
            "CREATE DATABASE dst OWNER rds",
        ] {
            admin.batch_execute(sql).await.expect("fresh target database");
        }
    }

    async fn sh(&self, what: &str, cmd: &mut tokio::process::Command) -> String {
        let out = cmd
            .env("PGPASSWORD", "bench")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        if !out.status.success() {
            panic!(
                "{what} failed ({:?}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn pgferry_cmd(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.pgferry);
        c.args(args)
            .env("PGFERRY_SOURCE", self.url("source"))
            .env("PGFERRY_TARGET", self.url("target"))
            .env("PGFERRY_METRICS__LISTEN", "off")
            .env("PGFERRY_COPY__WORKERS", self.jobs.to_string())
            .env(
                "PGFERRY_SOURCE_LIMITS__MAX_CONNECTIONS",
                (self.jobs + 2).to_string(),
            )
            .env("PGFERRY_LOG", "warn");
        c
    }

    async fn run_tool(&self, tool: &str) -> Run {
        self.fresh_target().await;
        // Every run starts with no dirty buffers left by the one before.
        for c in [&self.source, &self.target] {
            let admin = c.superuser("postgres").await.expect("superuser");
            admin.batch_execute("CHECKPOINT").await.expect("checkpoint");
        }
        let jobs = self.jobs.to_string();
        let sp = self.source.port().to_string();
        let tp = self.target.port().to_string();
        match tool {
            "pgferry" => {
                self.sh("pgferry install", &mut self.pgferry_cmd(&["install"]))
                    .await;
                let started = Instant::now();
                let out = self
                    .sh("pgferry copy", &mut self.pgferry_cmd(&["--json", "copy"]))
                    .await;
                let secs = started.elapsed().as_secs_f64();
                self.sh("pgferry cleanup", &mut self.pgferry_cmd(&["cleanup"]))
                    .await;
                let report =
                    serde_json::from_str(&out).unwrap_or_else(|e| panic!("pgferry copy JSON: {e}: {out}"));
                Run {
                    secs,
                    report: Some(report),
                }
            }
            "pg_dump_restore" => {
                let script = format!(
                    "{} -Fc -h 127.0.0.1 -p {sp} -U app -d bench | {} --no-owner -h 127.0.0.1 -p {tp} -U rds -d dst",
                    self.bin("pg_dump").display(),
                    self.bin("pg_restore").display()
                );
                let started = Instant::now();
                self.sh(
                    "pg_dump | pg_restore",
                    tokio::process::Command::new("bash").args(["-o", "pipefail", "-c", &script]),
                )
                .await;
                Run {
                    secs: started.elapsed().as_secs_f64(),
                    report: None,
                }
            }
            "pg_dump_dir_jobs" => {
                let dir = self.scratch.path().join("dump");
                let _ = std::fs::remove_dir_all(&dir);
                let started = Instant::now();
                self.sh(
                    "pg_dump -Fd -j",
                    tokio::process::Command::new(self.bin("pg_dump"))
                        .args([
                            "-Fd",
                            "-j",
                            &jobs,
                            "-h",
                            "127.0.0.1",
                            "-p",
                            &sp,
                            "-U",
                            "app",
                            "-d",
                            "bench",
                            "-f",
                        ])
                        .arg(&dir),
                )
                .await;
                self.sh(
                    "pg_restore -j",
                    tokio::process::Command::new(self.bin("pg_restore"))
                        .args([
                            "--no-owner",
                            "-j",
                            &jobs,
                            "-h",
                            "127.0.0.1",
                            "-p",
                            &tp,
                            "-U",
                            "rds",
                            "-d",
                            "dst",
                        ])
                        .arg(&dir),
                )
                .await;
                let secs = started.elapsed().as_secs_f64();
                let _ = std::fs::remove_dir_all(&dir);
                Run { secs, report: None }
            }
            "pgcopydb" => {
                let dir = self.scratch.path().join("pgcopydb");
                let _ = std::fs::remove_dir_all(&dir);
                let started = Instant::now();
                self.sh(
                    "pgcopydb clone",
                    tokio::process::Command::new("pgcopydb")
                        .args([
                            "clone",
                            "--no-owner",
                            "--no-acl",
                            "--table-jobs",
                            &jobs,
                            "--index-jobs",
                            &jobs,
                        ])
                        .arg("--source")
                        .arg(self.url("source"))
                        .arg("--target")
                        .arg(self.url("target"))
                        .arg("--dir")
                        .arg(&dir)
                        .env("PGCOPYDB_LOG_LEVEL", "warn"),
                )
                .await;
                let secs = started.elapsed().as_secs_f64();
                let _ = std::fs::remove_dir_all(&dir);
                Run { secs, report: None }
            }
            other => unreachable!("tool {other}"),
        }
    }
}

/// CPU seconds used so far by `pid`'s process tree as /proc shows it: its
/// own time, its reaped children's, and its live children's.
fn tree_cpu_secs(pid: u32) -> f64 {
    let fields = |pid: u32| -> Option<Vec<u64>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which may hold spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        Some(rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
    };
    // rest[0] is field 3 (state): utime = 14, stime = 15, cutime = 16,
    // cstime = 17, ppid = 4.
    let ticks = |f: &[u64], own_only: bool| {
        let own = f[11] + f[12];
        if own_only {
            own
        } else {
            own + f[13] + f[14]
        }
    };
    let Some(me) = fields(pid) else { return 0.0 };
    let mut total = ticks(&me, false);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(f) = fields(child) {
            if f[1] == u64::from(pid) {
                total += ticks(&f, true);
            }
        }
    }
    total as f64 / 100.0
}

fn postmaster_pid(c: &Cluster) -> u32 {
    std::fs::read_to_string(c.data_dir().join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
        .expect("postmaster.pid")
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn version(cmd: &Path) -> String {
    std::process::Command::new(cmd)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// The pgferry binary built beside this one.
pub(crate) fn pgferry_binary() -> PathBuf {
    let pgferry = std::env::current_exe()
        .expect("own path")
        .with_file_name("pgferry");
    if !pgferry.is_file() {
        eprintln!(
            "{} is missing: build it first (cargo build --release --workspace)",
            pgferry.display()
        );
        std::process::exit(2);
    }
    pgferry
}

/// Runs the copy benchmark and prints its JSON.
pub async fn run(v: &[String]) {
    let mut a = args(v);
    let pgferry = pgferry_binary();
    if a.tools.iter().any(|t| t == "pgcopydb") && !which("pgcopydb") {
        eprintln!("pgcopydb is not installed (Debian package pgcopydb): leaving it out");
        a.tools.retain(|t| t != "pgcopydb");
    }
    eprintln!("starting throwaway clusters");
    let (source, target) = tokio::try_join!(
        Cluster::start_with("bench-copy-source", &SERVER),
        Cluster::start_with("bench-copy-target", &SERVER)
    )
    .expect("clusters");
    source
        .create_role("app", "bench", "NOSUPERUSER NOREPLICATION", Some("bench"))
        .await
        .expect("role");
    target
        .create_role("rds", "bench", "NOSUPERUSER CREATEROLE CREATEDB", None)
        .await
        .expect("role");
    let bench = Bench {
        source,
        target,
        jobs: a.jobs,
        pgferry,
        scratch: tempfile::tempdir().expect("scratch"),
    };

    let scale = ((a.mix.sizes().0 * a.scale).round() as i64).max(1);
    eprintln!("building the dataset: pgbench -i -s {scale}, documents, wide table, inheritance");
    let started = Instant::now();
    bench
        .sh(
            "pgbench -i",
            tokio::process::Command::new(bench.bin("pgbench"))
                .args([
                    "-i",
                    "-q",
                    "-s",
                    &scale.to_string(),
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "app",
                    "bench",
                ])
                .args(["-p", &bench.source.port().to_string()]),
        )
        .await;
    let c = connect(bench.source.port(), "bench").await;
    c.batch_execute(&dataset_sql(a.scale, a.mix, scale))
        .await
        .expect("build the dataset");
    c.batch_execute("VACUUM ANALYZE")
        .await
        .expect("vacuum the dataset");
    let bytes: i64 = c
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .expect("size")
        .get(0);
    let expected = row_counts(&c).await;
    let sizes: BTreeMap<String, i64> = c
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname), pg_total_relation_size(c.oid) FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname = 'public'",
            &[],
        )
        .await
        .expect("sizes")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    eprintln!(
        "dataset: {:.2} GB in {:.0} s, {} tables",
        bytes as f64 / 1e9,
        started.elapsed().as_secs_f64(),
        expected.len()
    );

    let mut secs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut data_secs = Vec::new();
    let mut index_secs = Vec::new();
    let mut analyze_secs = Vec::new();
    let mut peak_rss: u64 = 0;
    let mut cpu: BTreeMap<String, Vec<Vec<f64>>> = BTreeMap::new();
    let mut toast: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for round in 0..a.rounds {
        for i in 0..a.tools.len() {
            let tool = a.tools[(i + round) % a.tools.len()].clone();
            eprintln!("round {round}: {tool}");
            let before = cpu_now(&bench);
            let run = bench.run_tool(&tool).await;
            let after = cpu_now(&bench);
            let used: Vec<f64> = (0..3).map(|i| after[i] - before[i]).collect();
            eprintln!(
                "round {round}: {tool:>16} CPU s: source {:.1}, target {:.1}, tool {:.1}",
                used[0], used[1], used[2]
            );
            cpu.entry(tool.clone()).or_default().push(used);
            let t = connect_as(bench.target.port(), "rds", "dst").await;
            let got = row_counts(&t).await;
            assert_eq!(got, expected, "{tool} copied different row counts");
            let compression: Vec<String> = t
                .query(
                    "SELECT c || ': ' || n FROM (SELECT coalesce(pg_column_compression(body), 'none') AS c,
                                                       count(*) AS n FROM docs GROUP BY 1) x ORDER BY 1",
                    &[],
                )
                .await
                .expect("read TOAST compression")
                .iter()
                .map(|r| r.get(0))
                .collect();
            eprintln!(
                "round {round}: {tool:>16} docs TOAST compression: {}",
                compression.join(", ")
            );
            toast.insert(tool.clone(), compression);
            eprintln!("round {round}: {tool:>16} {:.1} s, row counts match", run.secs);
            secs.entry(tool).or_default().push(run.secs);
            if let Some(r) = run.report {
                data_secs.push(r["data_secs"].as_f64().unwrap_or(0.0));
                index_secs.push(r["index_secs"].as_f64().unwrap_or(0.0));
                analyze_secs.push(r["analyze_secs"].as_f64().unwrap_or(0.0));
                peak_rss = peak_rss.max(r["peak_rss_bytes"].as_u64().unwrap_or(0));
            }
        }
    }
    let medians: BTreeMap<&String, f64> = secs.iter().map(|(k, v)| (k, median(v))).collect();
    let ours = medians
        .iter()
        .find(|(k, _)| k.as_str() == "pgferry")
        .map(|(_, v)| *v);
    let ratio = |tool: &str| -> Option<f64> {
        let theirs = medians.iter().find(|(k, _)| k.as_str() == tool)?.1;
        Some(ours? / theirs)
    };
    let report = json!({
        "benchmark": "bulk copy: data, keys and indexes, ANALYZE",
        "scale": a.scale, "mix": format!("{:?}", a.mix).to_lowercase(),
        "dataset_bytes": bytes,
        "dataset_rows": expected,
        "dataset_table_bytes": sizes,
        "jobs": a.jobs,
        "rounds": a.rounds,
        "versions": {
            "pg_dump": version(&bench.bin("pg_dump")),
            "pgcopydb": if which("pgcopydb") { version(Path::new("pgcopydb")) } else { String::new() },
        },
        "wall_secs": secs,
        "cpu_secs_source_target_tool": cpu,
        "docs_toast_compression": toast,
        "median_secs": medians,
        "pgferry_over_tool": {
            "pgcopydb": ratio("pgcopydb"),
            "pg_dump_restore": ratio("pg_dump_restore"),
            "pg_dump_dir_jobs": ratio("pg_dump_dir_jobs"),
        },
        "targets": { "pgferry_over_pgcopydb_max": 0.8, "pgferry_over_pg_dump_restore_max": 0.45,
                     "peak_rss_bytes_max": 200u64 << 20 },
        "pgferry": {
            "data_secs_median": (!data_secs.is_empty()).then(|| median(&data_secs)),
            "index_secs_median": (!index_secs.is_empty()).then(|| median(&index_secs)),
            "analyze_secs_median": (!analyze_secs.is_empty()).then(|| median(&analyze_secs)),
            "peak_rss_bytes": peak_rss,
        },
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
