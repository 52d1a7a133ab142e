//! Running pgferry as a service: metrics, dashboard, alert rules, systemd
//! unit, compose stack.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pgferry_e2e::*;

use crate::{fence_is_up, seeded, synced_with, target_has, OPS};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every PromQL expression of the dashboard's panels and the alert rules.
fn queries() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("dashboards/pgferry.json")).unwrap())
            .unwrap();
    let mut exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    let rules = std::fs::read_to_string(repo().join("dashboards/alerts.yml")).unwrap();
    exprs.extend(
        rules
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr: "))
            .map(str::to_string),
    );
    exprs
}

/// The `pgferry_*` metric names a query uses (histogram series reduced to
/// their metric name).
fn names_in(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("pgferry_"))
        .map(|w| {
            w.trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
                .to_string()
        })
        .collect()
}

async fn promtool_check_metrics(text: &str) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed by scripts/install-deps");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_migration_and_feed_the_dashboard() {
    let env = seeded().await;
    env.config("[sync]\npoll_interval_ms = 50\n");
    let port = free_port();
    let writers = Workload::start(&env, &[APP, WRITER], OPS).await;
    writers.progress(50).await;
    let mut agent = env
        .cmd(&["migrate"])
        .env("PGFERRY_METRICS__LISTEN", format!("127.0.0.1:{port}"))
        .env("PGFERRY_METRICS__SAMPLE_INTERVAL_MS", "100")
        // Limits far above what the test moves: they only make the
        // rate-limit histogram appear.
        .env("PGFERRY_COPY__RATE_BYTES_PER_SEC", "1000000000")
        .env("PGFERRY_SYNC__RATE_ROWS_PER_SEC", "100000000")
        .spawn()
        .unwrap();

    // Scrape through the phases; each distinct phase's scrape is linted.
    let phases_seen = std::sync::Mutex::new(BTreeSet::new());
    let scrape = || async {
        http_get(port, "/metrics")
            .await
            .filter(|t| t.contains("pgferry_phase"))
    };
    wait_for(
        "the sync phase in the metrics",
        Duration::from_secs(120),
        || async {
            let text = scrape().await?;
            let phase = ["installing", "installed", "copying", "syncing"]
                .into_iter()
                .find(|p| metric_value(&text, "pgferry_phase", &format!("phase=\"{p}\"")) == Some(1.0))?;
            let first_time = phases_seen.lock().unwrap().insert(phase);
            if first_time {
                promtool_check_metrics(&text).await;
            }
            (phase == "syncing").then_some(())
        },
    )
    .await;
    writers.stop().await;
    let text = wait_for(
        "the backlog to drain to zero",
        Duration::from_secs(60),
        || async {
            let text = scrape().await?;
            let backlog: Vec<f64> = text
                .lines()
                .filter(|l| l.starts_with("pgferry_backlog_rows{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
                .collect();
            (backlog.len() == 7 && backlog.iter().all(|b| *b == 0.0)).then_some(text)
        },
    )
    .await;
    promtool_check_metrics(&text).await;
    for name in pgferry::telemetry::ALL {
        assert!(text.contains(&format!("\n{name}")), "{name} is exported:\n{text}");
    }
    // The counters agree with the data.
    let status = env.status().await;
    for t in status["tables"].as_array().unwrap() {
        // Label values are escaped in the exposition format.
        let value = t["table"]
            .as_str()
            .unwrap()
            .replace('\\', "\\\\")
            .replace('"', "\\\"");
        let label = format!("table=\"{value}\"");
        let copied = metric_value(&text, "pgferry_copy_rows_total", &label);
        assert_eq!(copied, t["copied_rows"].as_f64(), "copied rows of {label}");
        assert_eq!(metric_value(&text, "pgferry_copy_table_done", &label), Some(1.0));
        assert!(metric_value(&text, "pgferry_copy_bytes_total", &label) > Some(0.0));
    }
    let applied: f64 = text
        .lines()
        .filter(|l| l.starts_with("pgferry_applied_rows_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(applied > 0.0, "the drain applied the writers' changes");
    assert_eq!(metric_value(&text, "pgferry_fence_raised", ""), Some(0.0));
    assert!(metric_value(&text, "pgferry_source_connections", "") >= Some(1.0));

    // Every metric the dashboard and the alerts query is exported.
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .flat_map(names_in)
        .collect();
    for q in queries() {
        for name in names_in(&q) {
            assert!(
                exported.contains(&name),
                "{q} uses {name}, which the agent does not export"
            );
        }
    }

    // A real Prometheus scrapes the agent and answers every query.
    let prom_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo().join("dashboards/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [alerts.yml]\n\
             scrape_configs:\n  - job_name: pgferry\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (Debian package) is installed by scripts/install-deps");
    let query = |q: String| async move {
        let body = http_get(prom_port, &format!("/api/v1/query?query={}", urlencode(&q))).await?;
        serde_json::from_str::<serde_json::Value>(&body).ok()
    };
    wait_for(
        "Prometheus to hold two scrapes of the agent",
        Duration::from_secs(60),
        || async {
            let v = query("count_over_time(pgferry_up[1m])".into()).await?;
            let n: f64 = v["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
            (n >= 2.0).then_some(())
        },
    )
    .await;
    for q in queries() {
        let v = query(q.clone())
            .await
            .unwrap_or_else(|| panic!("no answer to {q}"));
        assert_eq!(v["status"], "success", "{q}: {v}");
    }
    for q in [
        "pgferry_backlog_rows",
        "max by (phase) (pgferry_phase) == 1",
        "sum by (table) (rate(pgferry_copy_bytes_total[1m]))",
        "pgferry_table_lag_seconds",
        "pgferry_source_connections",
    ] {
        let v = query(q.to_string()).await.unwrap();
        assert!(
            !v["data"]["result"].as_array().unwrap().is_empty(),
            "{q} has data: {v}"
        );
    }
    prometheus.kill().await.unwrap();

    let pid = agent.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn alert_rules_pass_promtool() {
    let out = tokio::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo().join("dashboards/alerts.yml"))
        .output()
        .await
        .expect("promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_systemd_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("pgferry.env");
    std::fs::copy(repo().join("docker/pgferry.env.example"), &env_file).unwrap();
    let unit = std::fs::read_to_string(repo().join("docker/pgferry.service")).unwrap();
    assert!(unit.contains("EnvironmentFile=") && !unit.contains("--source") && !unit.contains("--target"));
    let unit: String = unit
        .lines()
        .map(|l| {
            if let Some(rest) = l.strip_prefix("ExecStart=/usr/local/bin/pgferry") {
                format!("ExecStart={}{rest}", crate::BIN)
            } else if l.starts_with("EnvironmentFile=") {
                format!("EnvironmentFile={}", env_file.display())
            } else {
                l.to_string()
            }
        })
        .map(|l| l + "\n")
        .collect();
    let path = dir.path().join("pgferry.service");
    std::fs::write(&path, unit).unwrap();
    let out = tokio::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .await
        .unwrap();
    // systemd-analyze exits 0 on unknown keys or bad values: any output is a failure.
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_compose_stack_refers_to_files_that_exist() {
    let docker = repo().join("docker");
    let compose = std::fs::read_to_string(docker.join("compose.yml")).unwrap();
    let mut refs = 0;
    for line in compose.lines().map(str::trim) {
        let value = line
            .trim_start_matches("- ")
            .trim_start_matches("env_file:")
            .trim_start_matches("context:")
            .trim_start_matches("dockerfile:")
            .trim();
        if value.starts_with("./") || value.starts_with("../") || value.starts_with("docker/") {
            let path = value.split(':').next().unwrap();
            let base = if value.starts_with("docker/") {
                repo()
            } else {
                docker.clone()
            };
            assert!(
                base.join(path).exists(),
                "compose.yml refers to {path}, which does not exist"
            );
            refs += 1;
        }
    }
    assert!(refs >= 8, "found {refs} file references");
    for service in [
        "source:",
        "target:",
        "agent:",
        "prometheus:",
        "grafana:",
        "workload:",
    ] {
        assert!(compose.contains(&format!("  {service}\n")), "service {service}");
    }
    let env = std::fs::read_to_string(docker.join("demo.env")).unwrap();
    assert!(env.contains("PGFERRY_METRICS__LISTEN=0.0.0.0:9187"));
    let prom = std::fs::read_to_string(docker.join("prometheus.yml")).unwrap();
    assert!(prom.contains("agent:9187") && prom.contains("alerts.yml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_drawn_on_a_terminal_only() {
    let env = seeded().await;
    env.ok(&["install"]).await;
    // `script` gives the agent a pseudo-terminal, as an operator's shell would.
    let on_terminal = |args: &str| {
        let line = format!("{} {args}", crate::BIN);
        tokio::process::Command::new("script")
            .args(["-qfec", &line, "/dev/null"])
            .env("PGFERRY_SOURCE", env.source_url())
            .env("PGFERRY_TARGET", env.target_url())
            .env("PGFERRY_METRICS__LISTEN", "off")
            .stdin(Stdio::null())
            .output()
    };
    let out = on_terminal("copy").await.unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains("ETA") && screen.contains("9000 rows"),
        "copy draws a bar per table:\n{screen}"
    );
    assert!(screen.contains("Table copied"), "log lines still show:\n{screen}");
    env.source_as(APP)
        .await
        .batch_execute("UPDATE accounts SET name = 'x' WHERE id < 10")
        .await
        .unwrap();
    let out = on_terminal("sync --until-caught-up").await.unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains("sync: ") && screen.contains("keys applied"),
        "sync draws its status line:\n{screen}"
    );

    // Not a terminal (a pipe, journald): log lines only.
    env.source_as(APP)
        .await
        .batch_execute("UPDATE accounts SET name = 'y' WHERE id < 10")
        .await
        .unwrap();
    let out = env.run(&["sync", "--until-caught-up"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success());
    assert!(
        !stderr.contains("sync: ") && !stderr.contains("ETA") && !stderr.contains('\u{1b}'),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_drain_rate_limits_are_honoured() {
    let env = seeded().await;
    env.source_as(APP)
        .await
        .batch_execute(
            "CREATE TABLE blob (id int PRIMARY KEY, pad text NOT NULL);
                        INSERT INTO blob SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, 15000) g;",
        )
        .await
        .unwrap();
    let bytes_limit = 1_000_000.0;
    env.config(&format!("[copy]\nrate_bytes_per_sec = {bytes_limit}\n[sync]\nrate_rows_per_sec = 5000\npoll_interval_ms = 50\n"));
    env.ok(&["install"]).await;
    let report: serde_json::Value = serde_json::from_str(&env.ok(&["copy", "--json"]).await).unwrap();
    let (bytes, secs) = (
        report["bytes"].as_f64().unwrap(),
        report["data_secs"].as_f64().unwrap(),
    );
    assert!(bytes > 3_000_000.0, "{report}");
    let rate = bytes / secs;
    assert!(
        rate <= bytes_limit * 1.05,
        "copy ran at {rate:.0} B/s, limit {bytes_limit}"
    );
    assert!(
        rate >= bytes_limit * 0.6,
        "copy ran at {rate:.0} B/s, far below the limit {bytes_limit}"
    );

    env.source_as(APP)
        .await
        .batch_execute("UPDATE accounts SET balance = balance + 1; UPDATE ledger SET amount = amount + 1;")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let report: serde_json::Value =
        serde_json::from_str(&env.ok(&["sync", "--until-caught-up", "--json"]).await).unwrap();
    let keys = report["keys_applied"].as_f64().unwrap();
    assert_eq!(keys, 12_000.0, "{report}");
    let rate = keys / started.elapsed().as_secs_f64();
    assert!(
        rate <= 5000.0 * 1.05,
        "the drain ran at {rate:.0} rows/s, limit 5000"
    );
    assert!(
        rate >= 5000.0 * 0.5,
        "the drain ran at {rate:.0} rows/s, far below the limit 5000"
    );

    // A TRUNCATE is applied by copying the whole table again: a bulk copy
    // from the source, held to copy.rate_bytes_per_sec like the first one.
    env.source_as(APP)
        .await
        .batch_execute(
            "TRUNCATE blob; INSERT INTO blob SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, 15000) g",
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let report: serde_json::Value =
        serde_json::from_str(&env.ok(&["sync", "--until-caught-up", "--json"]).await).unwrap();
    assert_eq!(report["truncates_applied"], 1, "{report}");
    // 15,000 rows of 192 characters stream as at least 2.88 MB.
    let floor = 0.95 * 2_880_000.0 / bytes_limit;
    let secs = started.elapsed().as_secs_f64();
    assert!(
        secs >= floor,
        "the table was copied again in {secs:.1} s, faster than {bytes_limit} B/s allows ({floor:.1} s)"
    );
}

/// With the fence up the application cannot write, and every second is
/// downtime: the final drain does not keep `sync.rate_rows_per_sec` (unless
/// `cutover.rate_limited`). 3,000 changes made after the catch-up, at 100
/// rows/s, would hold the fence for 30 s; unlimited, they take a moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_drain_under_the_fence_is_not_rate_limited() {
    let env = synced_with("[sync]\nrate_rows_per_sec = 100\npoll_interval_ms = 50\n").await;
    let agent = env
        .run_until_failpoint(&["cutover", "--json"], "cutover.before_fence")
        .await;
    // Caught up, not yet fenced: these are the final drain's.
    env.source_as(APP)
        .await
        .batch_execute("UPDATE accounts SET balance = balance + 1")
        .await
        .unwrap();
    std::fs::write(env.failpoint_release(), "").unwrap();
    let out = agent.wait_with_output().await.expect("the cutover's exit");
    assert!(out.status.success(), "cutover failed");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["final_drain_keys"], 3000, "{report}");
    let blocked = report["writes_blocked_ms"].as_i64().unwrap();
    assert!(
        blocked < 15_000,
        "writes were blocked for {blocked} ms: the final drain kept the 100 rows/s limit (30 s)"
    );
    assert_same_rows(&env).await;
}

/// `status` reads the registered tables, then their backlogs: a delta table
/// dropped in between (sync dropping a detached partition's as it follows
/// it) failed it with "relation does not exist" and exit 3, as a full run of
/// the partition test once showed. It reads again now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_again_when_a_delta_table_goes_meanwhile() {
    let env = crate::synced().await;
    let agent = env
        .run_until_failpoint(&["status", "--json"], "backlog.listed")
        .await;
    let app = env.source_as(APP).await;
    let id: i32 = app
        .query_one(
            "SELECT id FROM pgferry.tables WHERE relid = 'scratch'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    app.batch_execute(&format!("DROP TABLE pgferry.d_{id}"))
        .await
        .unwrap();
    std::fs::write(env.failpoint_release(), "").unwrap();
    let out = agent.wait_with_output().await.expect("the status's exit");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tables = status["tables"].as_array().unwrap();
    let scratch = tables
        .iter()
        .find(|t| t["table"] == "public.scratch")
        .expect("scratch is still registered");
    assert_eq!(scratch["backlog_rows"], 0, "{status}");
    assert!(tables.len() > 1, "{status}");
}

/// Source pressure: one session (the application's role) runs `hold` and
/// keeps what it locked; a second one, of `waiter_role`, runs `wait` in the
/// background, which waits on that lock. Returns the holder and the
/// waiter's task.
async fn lock_and_wait(
    env: &Env,
    hold: &str,
    waiter_role: (&str, &str),
    wait: &'static str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let holder = env.source_as(APP).await;
    holder.batch_execute(hold).await.expect("hold a lock");
    let waiter = env.source_as(waiter_role).await;
    (
        holder,
        tokio::spawn(async move { waiter.batch_execute(wait).await }),
    )
}

/// The drain backs off while sessions of the source wait on locks: no pass
/// runs while one waits (the pause doubles and shows in the metrics), and
/// draining resumes once the lock is gone.
#[tokio::test]
async fn the_drain_pauses_while_source_sessions_wait_on_locks() {
    let env = seeded().await;
    let port = free_port();
    env.config("[sync]\npoll_interval_ms = 50\nmax_lock_waiters = 1\n");
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    let mut agent = env
        .cmd(&["sync"])
        .env("PGFERRY_METRICS__LISTEN", format!("127.0.0.1:{port}"))
        .spawn()
        .expect("start sync");
    let backoff = || async {
        let text = http_get(port, "/metrics").await?;
        metric_value(&text, "pgferry_sync_backoff_seconds", "")
    };
    wait_for("the drain to run", Duration::from_secs(60), || async {
        backoff().await.filter(|b| *b == 0.0)
    })
    .await;

    // One session holds a lock, another of the same role waits.
    let (holder, waiting) = lock_and_wait(
        &env,
        "BEGIN; LOCK TABLE scratch IN ACCESS EXCLUSIVE MODE",
        APP,
        "SELECT count(*) FROM scratch",
    )
    .await;
    let first = wait_for("the drain to pause", Duration::from_secs(30), || async {
        backoff().await.filter(|b| *b > 0.0)
    })
    .await;
    env.source_as(APP)
        .await
        .batch_execute("INSERT INTO accounts (name) VALUES ('written under pressure')")
        .await
        .expect("write");
    // Later probes still find the waiter, so the pause keeps doubling and
    // no pass runs: the row stays on the source only.
    wait_for("the pause to grow", Duration::from_secs(30), || async {
        backoff().await.filter(|b| *b >= 2.0 * first)
    })
    .await;
    let has_row = "SELECT EXISTS (SELECT 1 FROM accounts WHERE name = 'written under pressure')";
    assert!(!target_has(&env, has_row).await, "a pass ran under pressure");

    holder.batch_execute("COMMIT").await.expect("release the lock");
    waiting.await.expect("waiter").expect("the waiter's query");
    wait_for("the row on the target", Duration::from_secs(60), || async {
        target_has(&env, has_row).await.then_some(())
    })
    .await;
    assert_eq!(backoff().await, Some(0.0));
    agent.start_kill().expect("stop the agent");
    let _ = agent.wait().await;
}

/// The cutover's catch-up pauses like `sync` does: while a source session
/// waits on a lock (an advisory one here, so that nothing of pgferry's waits
/// too), no pass runs and the fence is not raised. The waiter is the
/// application's second role, whose wait events `pg_stat_activity` hides
/// from pgferry's role: the pressure must be seen all the same. Pressure that outlasts
/// `cutover.catch_up_timeout_ms` gives the cutover up (exit 3), the source
/// still writable and the migration still syncing; once the lock is gone
/// the drain goes on.
#[tokio::test]
async fn the_cutover_does_not_fence_while_source_sessions_wait_on_locks() {
    let env = seeded().await;
    env.config(
        "[sync]\npoll_interval_ms = 50\nmax_lock_waiters = 1\n[cutover]\ncatch_up_timeout_ms = 3000\n",
    );
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    let (holder, waiting) = lock_and_wait(
        &env,
        "SELECT pg_advisory_lock(4242)",
        WRITER,
        "SELECT pg_advisory_lock(4242)",
    )
    .await;
    let probe = env.source_as(APP).await;
    wait_for(
        "a session waiting on the lock",
        Duration::from_secs(30),
        || async {
            let n: i64 = probe
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'advisory'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (n > 0).then_some(())
        },
    )
    .await;
    let has_row = "SELECT EXISTS (SELECT 1 FROM accounts WHERE name = 'written under pressure')";
    probe
        .batch_execute("INSERT INTO accounts (name) VALUES ('written under pressure')")
        .await
        .unwrap();

    let out = env.run(&["cutover"]).await;
    assert_eq!(out.status.code(), Some(3), "the cutover gives up under pressure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("under pressure"), "{stderr}");
    assert!(!target_has(&env, has_row).await, "a pass ran under pressure");
    assert!(!fence_is_up(&env).await, "the fence was raised under pressure");
    probe
        .batch_execute("INSERT INTO accounts (name) VALUES ('still writable')")
        .await
        .expect("the source still takes writes");
    assert_eq!(env.status().await["phase"], "syncing");

    holder
        .batch_execute("SELECT pg_advisory_unlock(4242)")
        .await
        .expect("release the lock");
    waiting.await.expect("waiter").expect("the waiter's lock");
    env.ok(&["sync", "--until-caught-up"]).await;
    assert!(target_has(&env, has_row).await);
}

/// `sync --until-caught-up` ends while the application keeps writing, once
/// passes leave behind only what was written while they ran (at most
/// `cutover.max_backlog_rows`, no longer shrinking). Waiting for a pass that
/// finds nothing, as it once did, never ends under steady writes: that
/// version fails here by timeout. What was committed before the sync began
/// is on the target when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_until_caught_up_ends_while_writes_go_on() {
    let env = seeded().await;
    env.config("[sync]\npoll_interval_ms = 50\n");
    env.ok(&["install"]).await;
    let writers = Workload::start(&env, &[APP, WRITER], OPS).await;
    env.ok(&["copy"]).await;
    writers.progress(50).await;
    // Ids above 3001 are beyond the writers' deletes and updates.
    env.source_as(APP)
        .await
        .batch_execute("INSERT INTO accounts (name) VALUES ('committed before sync')")
        .await
        .unwrap();
    let before = writers.committed();
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        env.run(&["sync", "--until-caught-up", "--json"]),
    )
    .await
    .expect("sync --until-caught-up ends while the writers keep writing");
    assert!(out.status.success());
    let during = writers.committed() - before;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let left = report["backlog_left"].as_i64().expect("backlog_left");
    assert!((0..=10_000).contains(&left), "{report}");
    assert!(during > 0, "the writers kept writing while sync ran");
    assert!(
        target_has(
            &env,
            "SELECT EXISTS (SELECT 1 FROM accounts WHERE name = 'committed before sync')"
        )
        .await,
        "a change committed before the sync began is on the target when it ends"
    );
    writers.stop().await;
    env.ok(&["sync", "--until-caught-up"]).await;
    assert_same_rows(&env).await;
}

/// A table held exclusively past lock_timeout (a long VACUUM FULL or
/// CLUSTER) waits for a later pass: the batch that cannot lock it ends as
/// busy, and the others go on draining meanwhile instead of waiting out
/// its retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_locked_exclusively_does_not_hold_up_the_others() {
    let env = synced_with("[sync]\npoll_interval_ms = 50\nadaptive = false\n").await;
    // A change to drain while it is locked (a table without one is not
    // batched at all).
    env.source_as(APP)
        .await
        .batch_execute("INSERT INTO scratch VALUES (776, 'before the lock')")
        .await
        .unwrap();
    let holder = env.source_as(APP).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE scratch IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut agent = env.cmd(&["sync"]).spawn().expect("start sync");
    env.source_as(APP)
        .await
        .batch_execute("INSERT INTO accounts (name) VALUES ('while scratch is locked')")
        .await
        .unwrap();
    let has_row = "SELECT EXISTS (SELECT 1 FROM accounts WHERE name = 'while scratch is locked')";
    wait_for("the row to reach the target", Duration::from_secs(30), || async {
        target_has(&env, has_row).await.then_some(())
    })
    .await;
    holder.batch_execute("COMMIT").await.unwrap();
    assert!(agent.try_wait().unwrap().is_none(), "sync still runs");
    env.source_as(APP)
        .await
        .batch_execute("INSERT INTO scratch VALUES (777, 'after the lock')")
        .await
        .unwrap();
    wait_for("scratch to drain again", Duration::from_secs(30), || async {
        target_has(&env, "SELECT count(*) = 2 FROM scratch WHERE id IN (776, 777)")
            .await
            .then_some(())
    })
    .await;
    agent.start_kill().expect("stop the agent");
    agent.wait().await.unwrap();
}

/// A pass batches only the tables with something to drain: with a schema
/// per tenant, thousands of idle tables made every pass thousands of
/// transactions on the source. The idle ones are in sync as of the pass's
/// reading, and their lag says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_batches_only_the_tables_with_changes_and_idle_ones_show_no_lag() {
    let env = synced_with("[sync]\npoll_interval_ms = 50\n").await;
    // As if every table had last been drained an hour ago.
    env.source_superuser("UPDATE pgferry.tables SET synced_through = now() - interval '1 hour'")
        .await;
    let port = free_port();
    let mut agent = env
        .cmd(&["sync"])
        .env("PGFERRY_METRICS__LISTEN", format!("127.0.0.1:{port}"))
        .spawn()
        .expect("start sync");
    env.source_as(APP)
        .await
        .batch_execute("INSERT INTO accounts (name) VALUES ('the only change')")
        .await
        .unwrap();
    let text = wait_for("the change to be drained", Duration::from_secs(30), || async {
        let text = http_get(port, "/metrics").await?;
        let label = r#"table="public.accounts",outcome="applied""#;
        (metric_value(&text, "pgferry_batches_total", label) >= Some(1.0)).then_some(text)
    })
    .await;
    let batched: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("pgferry_batches_total{") && !l.contains("public.accounts"))
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert!(batched.is_empty(), "idle tables were batched: {batched:?}");
    let status = env.status().await;
    for t in status["tables"].as_array().unwrap() {
        let lag = t["lag_secs"].as_f64().unwrap_or(f64::MAX);
        assert!(lag < 600.0, "{}: lag {lag} s", t["table"]);
    }
    agent.start_kill().expect("stop the agent");
    agent.wait().await.unwrap();
}

/// A client tool's failure that a new attempt cannot get past (here the
/// target role may not create an extension the source has) ends the step
/// at once, saying why; before, every pg_restore failure was retried like
/// a lost connection, for most of a minute of "Retrying" lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_tool_failure_that_would_recur_is_not_retried() {
    let env = crate::seeded().await;
    env.source
        .superuser(DB)
        .await
        .unwrap()
        .batch_execute("CREATE EXTENSION pg_buffercache")
        .await
        .unwrap();
    env.ok(&["install"]).await;
    let err = env.fails(&["copy"], 3).await;
    assert!(
        err.contains("permission denied to create extension \"pg_buffercache\""),
        "{err}"
    );
    assert!(!err.contains("Retrying"), "{err}");
    env.ok(&["cleanup"]).await;
}
