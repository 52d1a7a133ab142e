//! The moments around the switch, where a failure or a still-connected
//! application instance costs what pgferry exists to protect: a cutover that
//! fails after the fence never leaves the source fenced (invariant 9), no
//! write commits on the old source after the switch (invariant 8), and a
//! finished migration stays finished.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgferry_e2e::*;

use crate::{fence_is_up, seeded, synced_with, OPS};

/// Every kill point between the fence and the switch at which a target
/// statement still follows.
const AFTER_FENCE: &[&str] = &[
    "cutover.after_fence",
    "cutover.after_writers",
    "cutover.after_final_drain",
    "cutover.after_sequences",
    "cutover.after_verify",
];

/// How the target fails under a fenced cutover.
#[derive(Debug, Clone, Copy)]
enum TargetFault {
    /// The server stops (a crash, a failover that takes long).
    Stopped,
    /// Every write statement errors: the database turned read-only, and
    /// pgferry's sessions were terminated to meet it.
    StatementsFail,
}

async fn terminate_masters(env: &Env) {
    env.target
        .superuser(DB)
        .await
        .expect("superuser on the target")
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{}'",
            MASTER.0
        ))
        .await
        .expect("terminate the target's sessions");
}

async fn inject(env: &mut Env, fault: TargetFault) {
    match fault {
        TargetFault::Stopped => env.target.stop("fast").await.expect("stop the target"),
        TargetFault::StatementsFail => {
            env.target
                .superuser(DB)
                .await
                .expect("superuser on the target")
                .batch_execute(&format!(
                    "ALTER DATABASE {DB} SET default_transaction_read_only = on"
                ))
                .await
                .expect("make the target read-only");
            terminate_masters(env).await;
        }
    }
}

async fn heal(env: &mut Env, fault: TargetFault) {
    match fault {
        TargetFault::Stopped => env.target.restart().await.expect("start the target"),
        TargetFault::StatementsFail => {
            let c = env.target.superuser(DB).await.expect("superuser on the target");
            // This session starts read-only too.
            c.batch_execute("SET default_transaction_read_only = off")
                .await
                .expect("a writable session");
            c.batch_execute(&format!(
                "ALTER DATABASE {DB} RESET default_transaction_read_only"
            ))
            .await
            .expect("make the target writable");
        }
    }
}

/// The application's role writes to the source, as it would once the fence
/// is down.
async fn app_writes(env: &Env) -> Result<(), tokio_postgres::Error> {
    env.source_as(APP)
        .await
        .batch_execute("INSERT INTO events (kind) VALUES ('after a failed cutover')")
        .await
}

/// Fails the target at every step after the fence, alternating `cutover`
/// and `migrate --cutover`, with the application writing until the fence;
/// after every exit the application writes to the source again. Then the
/// migration completes and the two sides are equal.
async fn a_target_failure_after_the_fence_reopens_the_source(fault: TargetFault) {
    let mut env = synced_with("[sync]\npoll_interval_ms = 50\n[source_limits]\nstep_retries = 0\n").await;
    for (i, point) in AFTER_FENCE.iter().enumerate() {
        let args: &[&str] = if i % 2 == 0 {
            &["cutover"]
        } else {
            &["migrate", "--cutover"]
        };
        let writers = Workload::start(&env, &[APP, WRITER], OPS).await;
        writers.progress(20).await;
        let mut agent = env.run_until_failpoint(args, point).await;
        inject(&mut env, fault).await;
        std::fs::write(env.failpoint_release(), "").unwrap();
        let (code, log) = env.exited(&mut agent).await;
        writers.stop().await;
        // 1 for a server that cannot be reached, 3 for a failed statement;
        // never 4, the source still fenced.
        assert!(
            matches!(code, Some(1 | 3)),
            "{args:?} failing after {point} ({fault:?}) exited {code:?}:\n{log}"
        );
        assert!(
            !fence_is_up(&env).await,
            "{point} ({fault:?}): the fence is down:\n{log}"
        );
        assert!(
            last_line(&log).contains("The source takes writes"),
            "{args:?} after {point} ({fault:?}): the last line says the fence is down:\n{log}"
        );
        app_writes(&env)
            .await
            .unwrap_or_else(|e| panic!("{point} ({fault:?}): the application writes again: {e}"));
        heal(&mut env, fault).await;
        std::fs::remove_file(env.failpoint_release()).unwrap();
    }
    // The target tidied by the next run, the migration completes.
    let writers = Workload::start(&env, &[APP, WRITER], OPS).await;
    writers.progress(20).await;
    let stats = writers.stop().await;
    assert!(stats.iter().all(|s| !s.fenced.load(Ordering::Relaxed)));
    env.ok(&["migrate", "--cutover"]).await;
    assert_same_data(&env).await;
    assert_same_schema(&env).await;
    assert_no_leftovers(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_stopped_after_the_fence_never_leaves_the_source_fenced() {
    a_target_failure_after_the_fence_reopens_the_source(TargetFault::Stopped).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_statements_failing_after_the_fence_never_leave_the_source_fenced() {
    a_target_failure_after_the_fence_reopens_the_source(TargetFault::StatementsFail).await;
}

/// pgferry's target sessions terminated at each step after the fence (an
/// RDS failover's first moments, an operator's `pg_terminate_backend`):
/// the cutover either gets past it and completes, with both sides equal,
/// or aborts with the fence down. Never the source left fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_target_sessions_after_the_fence_never_leave_the_source_fenced() {
    for (i, point) in AFTER_FENCE.iter().enumerate() {
        let env = synced_with("[sync]\npoll_interval_ms = 50\n[source_limits]\nstep_retries = 0\n").await;
        let args: &[&str] = if i % 2 == 0 {
            &["cutover"]
        } else {
            &["migrate", "--cutover"]
        };
        let writers = Workload::start(&env, &[APP, WRITER], OPS).await;
        writers.progress(20).await;
        let mut agent = env.run_until_failpoint(args, point).await;
        terminate_masters(&env).await;
        std::fs::write(env.failpoint_release(), "").unwrap();
        let pid = agent.id().expect("running");
        let status = tokio::time::timeout(Duration::from_secs(170), agent.wait())
            .await
            .expect("the agent exits")
            .unwrap();
        writers.stop().await;
        let log = env.final_log(pid).await;
        if status.success() {
            // Got past it: the migration is as complete as asked.
            assert_same_data(&env).await;
            if args.len() == 2 {
                assert_no_leftovers(&env).await;
            } else {
                assert_eq!(env.status().await["phase"], "cut_over", "{point}: {log}");
            }
        } else {
            assert!(
                matches!(status.code(), Some(1 | 3)),
                "{point}: exited {status:?}\n{log}"
            );
            assert!(!fence_is_up(&env).await, "{point}: the fence is down\n{log}");
            app_writes(&env)
                .await
                .unwrap_or_else(|e| panic!("{point}: the application writes again: {e}"));
        }
    }
}

/// The source itself goes away with the fence up: pgferry keeps trying to
/// lift it (the alert firing), says so and exits 4 when it gives up, naming
/// the command that lifts it; when the source comes back in time, it lifts
/// the fence itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_the_source_cannot_lift_is_retried_then_said() {
    let port = free_port();
    let config = |limit_ms: u64| {
        format!(
            "[sync]\npoll_interval_ms = 50\n[source_limits]\nstep_retries = 0\n\
             [cutover]\nfence_lift_timeout_ms = {limit_ms}\n"
        )
    };
    let mut env = synced_with(&config(1_500)).await;

    // Gives up: exit 4, the last line says the source is fenced and how to
    // lift it.
    let mut agent = env
        .run_until_failpoint(&["cutover"], "cutover.after_verify")
        .await;
    env.source.stop("fast").await.unwrap();
    std::fs::write(env.failpoint_release(), "").unwrap();
    let (code, log) = env.exited(&mut agent).await;
    assert_eq!(code, Some(4), "{log}");
    assert!(last_line(&log).contains("THE SOURCE IS STILL FENCED"), "{log}");
    assert!(log.contains("run `pgferry cutover --abort`"), "{log}");
    std::fs::remove_file(env.failpoint_release()).unwrap();
    env.source.restart().await.unwrap();
    assert!(fence_is_up(&env).await);
    let refused = app_writes(&env).await.expect_err("the fence is still up");
    assert!(is_fenced(&refused), "{refused}");
    env.ok(&["cutover", "--abort"]).await;
    app_writes(&env).await.expect("lifted by cutover --abort");

    // The source comes back while pgferry is still trying: it lifts the
    // fence itself, and the fence gauge stayed 1 meanwhile.
    env.config(&config(120_000));
    let mut cmd = env.cmd(&["cutover"]);
    cmd.env("PGFERRY_METRICS__LISTEN", format!("127.0.0.1:{port}"));
    let mut agent = env
        .spawn_until_failpoint(cmd, &["cutover"], "cutover.after_verify")
        .await;
    env.source.stop("fast").await.unwrap();
    std::fs::write(env.failpoint_release(), "").unwrap();
    env.wait_for_log(&agent, "the fence could not be lifted; trying again")
        .await;
    let metrics = http_get(port, "/metrics").await.expect("metrics while retrying");
    assert_eq!(
        metric_value(&metrics, "pgferry_fence_raised", ""),
        Some(1.0),
        "{metrics}"
    );
    env.source.restart().await.unwrap();
    let (code, log) = env.exited(&mut agent).await;
    assert!(matches!(code, Some(1 | 3)), "{log}");
    assert!(last_line(&log).contains("The source takes writes"), "{log}");
    app_writes(&env)
        .await
        .expect("the fence was lifted once the source came back");
    std::fs::remove_file(env.failpoint_release()).unwrap();

    env.ok(&["migrate", "--cutover"]).await;
    assert_same_data(&env).await;
    assert_no_leftovers(&env).await;
}

/// An application instance that keeps its connection through the switch:
/// it writes every 50 ms, whatever it is told, and disconnects a while
/// after the switch, as a dyno drained in a rolling restart would. None of
/// its writes may commit on the source after the switch; `migrate` waits
/// for it before cleanup lifts the fence, and says whom it waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_kept_through_the_switch_never_commits_after_it() {
    let env = seeded().await;
    let (started, release) = (env.path("switch-started"), env.path("release"));
    env.config(&format!(
        "[sync]\npoll_interval_ms = 50\n[cutover]\nswitch_command = '''{}'''\n",
        gated_switch(&started, &release)
    ));
    // Opened before the migration, kept to the end of the test.
    let straggler = env.source_as(APP).await;
    straggler
        .batch_execute("SET application_name = 'web.1'")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let moved = Arc::new(AtomicBool::new(false));
    let switched_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let late: Arc<std::sync::Mutex<Vec<i64>>> = Arc::default();
    let writer = {
        let (stop, committed, moved, switched_at, late) = (
            stop.clone(),
            committed.clone(),
            moved.clone(),
            switched_at.clone(),
            late.clone(),
        );
        tokio::spawn(async move {
            let mut n: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match straggler
                    .execute(
                        "INSERT INTO events (kind) VALUES ($1)",
                        &[&format!("straggler {n}")],
                    )
                    .await
                {
                    Ok(_) => {
                        committed.fetch_add(1, Ordering::Relaxed);
                        if switched_at.lock().unwrap().is_some() {
                            late.lock().unwrap().push(n);
                        }
                    }
                    Err(e) => {
                        if is_fenced(&e) && e.as_db_error().is_some_and(|d| d.message().contains("has moved"))
                        {
                            moved.store(true, Ordering::Relaxed);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // The instance shuts down: its connection closes.
            drop(straggler);
        })
    };
    let writers = Workload::start(&env, &[APP, WRITER], OPS).await;
    writers.progress(50).await;
    let gate = async {
        writers.wait_all_fenced().await;
        wait_for("the switch command", Duration::from_secs(120), || async {
            started.exists().then_some(())
        })
        .await;
        *switched_at.lock().unwrap() = Some(Instant::now());
        std::fs::write(&release, "").unwrap();
        // Still connected and writing for two seconds after the switch.
        wait_for(
            "the straggler to be told the database moved",
            Duration::from_secs(30),
            || async { moved.load(Ordering::Relaxed).then_some(()) },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
    };
    let out = env.run_alongside(&["migrate", "--cutover", "--json"], gate).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert_succeeded(&out, "migrate --cutover");
    writers.stop().await;
    assert!(
        committed.load(Ordering::Relaxed) > 0,
        "the straggler wrote during the migration"
    );
    assert_eq!(
        *late.lock().unwrap(),
        Vec::<i64>::new(),
        "writes committed on the source after the switch"
    );
    assert!(
        moved.load(Ordering::Relaxed),
        "the fence told the straggler the database moved"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let release = &report["release"];
    assert_eq!(release["ended"], "no_sessions", "{release}");
    let held = release["sessions"].as_array().expect("sessions");
    assert!(
        held.iter()
            .any(|s| s["application_name"] == "web.1" && s["role"] == APP.0),
        "{release}"
    );
    assert!(release["waited_ms"].as_u64().unwrap() >= 1_500, "{release}");
    // Every write it made is on the new database, none left behind. (Not
    // the sequences: its refused inserts still drew from the source's.)
    assert_same_rows(&env).await;
    assert_no_leftovers(&env).await;
}

/// A session that never leaves holds the fence until
/// `cutover.release_after_ms`, and is named; a role the operator lists as
/// harmless holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_never_leaves_is_named_when_the_wait_ends() {
    let env = seeded().await;
    env.source_superuser(&format!(
        "CREATE ROLE reporting LOGIN PASSWORD 'r'; GRANT CONNECT ON DATABASE {DB} TO reporting;
         CREATE ROLE idle_app LOGIN PASSWORD 'i'; GRANT CONNECT ON DATABASE {DB} TO idle_app;"
    ))
    .await;
    env.source_as(APP)
        .await
        .batch_execute("GRANT INSERT, UPDATE ON accounts TO reporting, idle_app")
        .await
        .unwrap();
    env.config(
        "[sync]\npoll_interval_ms = 50\n[cutover]\nrelease_after_ms = 1500\nrelease_ignore_roles = [\"reporting\"]\n",
    );
    let _reporting = connect(env.source.port(), ("reporting", "r")).await;
    let _idle = connect(env.source.port(), ("idle_app", "i")).await;
    let started = Instant::now();
    let out = env.ok(&["migrate", "--cutover", "--json"]).await;
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let release = &report["release"];
    assert_eq!(release["ended"], "deadline", "{release}");
    let still = release["still_connected"].as_array().expect("still_connected");
    assert_eq!(still.len(), 1, "{release}");
    assert_eq!(still[0]["role"], "idle_app", "{release}");
    assert!(release["waited_ms"].as_u64().unwrap() >= 1_500, "{release}");
    assert!(started.elapsed() < Duration::from_secs(170));
    assert_same_data(&env).await;
    assert_no_leftovers(&env).await;
}

/// A cleanup run by hand after a `cutover` lifts the old source's fence:
/// it names the sessions that could still write there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanup_by_hand_names_who_could_still_write() {
    let env = synced_with("[sync]\npoll_interval_ms = 50\n").await;
    env.ok(&["cutover"]).await;
    let worker = env.source_as(APP).await;
    worker
        .batch_execute("SET application_name = 'worker.3'")
        .await
        .unwrap();
    let out = env.run(&["cleanup"]).await;
    assert_succeeded(&out, "cleanup");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("Lifting the old source's fence while sessions that could write to it are connected")
            && log.contains("(worker.3)"),
        "{log}"
    );
    drop(worker);
    assert_no_leftovers(&env).await;
}

/// `migrate --cutover` killed after its cleanup removed the source's control
/// schema, then started again (as systemd would): it recognises the finished
/// migration, completes the cleanup and exits 0. A later run, with nothing
/// left to recognise, refuses without advising to remove anything from the
/// new production database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_migration_stays_finished() {
    let env = seeded().await;
    env.config("[sync]\npoll_interval_ms = 50\n");
    env.kill_at(&["migrate", "--cutover"], "cleanup.after_source_schema_drop")
        .await;
    let out = env.ok(&["migrate", "--cutover", "--json"]).await;
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(report["finished_earlier"]["source_database"], DB, "{report}");
    assert!(
        report["copy"].is_null() && report["install"].is_null(),
        "{report}"
    );
    assert_same_data(&env).await;
    assert_no_leftovers(&env).await;

    let out = env.run(&["migrate", "--cutover"]).await;
    assert_eq!(out.status.code(), Some(1));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("already holds every table of the source"), "{text}");
    assert!(!text.to_lowercase().contains("drop"), "{text}");
    assert_no_leftovers(&env).await;
}

/// The same database given as source and target: refused as such, with no
/// advice to remove anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_database_as_source_and_target_is_refused_as_such() {
    let env = seeded().await;
    let out = env
        .cmd(&["check"])
        .env("PGFERRY_TARGET", env.source_url())
        .output()
        .await
        .expect("run check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("the source and the target are the same database"),
        "{text}"
    );
    assert!(!text.to_lowercase().contains("drop"), "{text}");
}
