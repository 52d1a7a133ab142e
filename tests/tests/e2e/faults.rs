//! The failures a real migration meets: the agent killed anywhere, stopped by
//! a signal, its backends terminated, servers restarted. Each test has writers
//! running and ends with a row-by-row comparison.

use std::time::Duration;

use pgferry_e2e::*;

use crate::{fence_is_up, seeded, target_has, OPS};

/// Every kill point, in the order the migration reaches them. `@n` is the
/// n-th time the agent passes there in that run.
const SCHEDULE: &[(&str, &str)] = &[
    ("migrate", "install.after_register"),
    ("migrate", "install.table_done@1"),
    ("migrate", "install.table_done@3"),
    ("migrate", "copy.after_pre_data"),
    ("migrate", "copy.mid_table@1"),
    ("migrate", "copy.before_mark_done@2"),
    ("migrate", "copy.table_done@1"),
    ("migrate", "copy.mid_table@2"),
    ("migrate", "copy.index_done@1"),
    ("migrate", "copy.index_done@3"),
    ("migrate", "copy.before_analyze"),
    ("migrate", "sync.before_target_commit@1"),
    ("migrate", "sync.after_target_commit@1"),
    ("migrate", "sync.after_delta_delete@1"),
    ("migrate", "sync.before_target_commit@4"),
    ("migrate", "sync.after_target_commit@5"),
    ("migrate", "sync.after_delta_delete@3"),
    ("cutover", "cutover.before_fence"),
    ("cutover", "cutover.after_fence"),
    ("cutover", "cutover.after_writers"),
    ("cutover", "cutover.after_final_drain"),
    ("cutover", "cutover.after_sequences"),
    ("cutover", "cutover.after_verify"),
    ("cutover", "cutover.after_objects"),
    ("cutover", "cutover.before_switch"),
    ("cutover", "cutover.after_switch"),
    ("cutover", "cutover.before_validate"),
    ("cleanup", "cleanup.table_done@1"),
    ("cleanup", "cleanup.table_done@3"),
    ("cleanup", "cleanup.before_schema_drop"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_thirty_points_every_run_resumes_and_ends_equal() {
    assert!(SCHEDULE.len() >= 30);
    let env = seeded().await;
    // One copy worker makes the per-table kill points land deterministically.
    env.config("[sync]\npoll_interval_ms = 50\n[copy]\nworkers = 1\n");
    let writers = Workload::start(&env, &[APP, WRITER], OPS).await;
    writers.progress(50).await;
    for (cmd, point) in SCHEDULE {
        let mut agent = env.run_until_failpoint(&[cmd], point).await;
        agent.kill().await.expect("SIGKILL");
        if *cmd == "migrate" {
            writers.progress(10).await;
        }
        if *point == "cutover.after_fence" {
            assert!(
                fence_is_up(&env).await,
                "a killed cutover leaves the fence up until it is resumed"
            );
        }
    }
    // The last cutover run was killed before validating foreign keys; a
    // re-run finishes that, and cleanup runs to the end.
    env.ok(&["cutover"]).await;
    env.ok(&["cleanup"]).await;
    writers.stop().await;
    assert_same_data(&env).await;
    assert_same_schema(&env).await;
    assert_no_leftovers(&env).await;
}

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn exits_ok_within(child: &mut tokio::process::Child, secs: u64) {
    let status = tokio::time::timeout(Duration::from_secs(secs), child.wait())
        .await
        .unwrap_or_else(|_| panic!("the agent did not stop within {secs} s of SIGTERM"))
        .expect("wait");
    assert_eq!(status.code(), Some(0), "SIGTERM is a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_a_clean_stop_and_the_next_run_continues() {
    let env = seeded().await;
    env.config("[sync]\npoll_interval_ms = 50\n[copy]\nworkers = 1\n");
    let writers = Workload::start(&env, &[APP, WRITER], OPS).await;
    writers.progress(50).await;

    // In the middle of a table's copy: the table in hand is rolled back.
    let mut agent = env.run_until_failpoint(&["migrate"], "copy.mid_table@2").await;
    sigterm(&agent);
    exits_ok_within(&mut agent, 10).await;
    let status = env.status().await;
    assert_eq!(status["phase"], "copying");
    let done = status["tables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["copy_state"] == "done")
        .count();
    assert_eq!(
        done, 1,
        "the finished table stays finished, the one in hand is pending: {status}"
    );

    // While syncing: the batch in hand finishes, the agent exits 0.
    let mut agent = env.cmd(&["migrate"]).spawn().unwrap();
    wait_for("sync to apply changes", Duration::from_secs(60), || async {
        let s = env.status().await;
        let applied: i64 = s["tables"]
            .as_array()?
            .iter()
            .filter_map(|t| t["applied_rows"].as_i64())
            .sum();
        (s["phase"] == "syncing" && applied > 0).then_some(())
    })
    .await;
    sigterm(&agent);
    exits_ok_within(&mut agent, 10).await;

    let (_, release) = crate::gated_config(&env);
    let gate = async {
        writers.wait_all_fenced().await;
        std::fs::write(&release, "").unwrap();
    };
    let out = env.run_alongside(&["migrate", "--cutover"], gate).await;
    assert_eq!(out.status.code(), Some(0));
    writers.stop().await;
    assert_same_data(&env).await;
    assert_no_leftovers(&env).await;
}

async fn terminate_agent_backends(cluster: &pgferry::sandbox::Cluster) -> i64 {
    let su = cluster.superuser("postgres").await.expect("superuser");
    let row = su
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
               FROM pg_stat_activity WHERE application_name = 'pgferry' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("terminate");
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backends_are_retried_without_help() {
    let env = seeded().await;
    env.config("[sync]\npoll_interval_ms = 50\n[copy]\nworkers = 1\n");
    let writers = Workload::start(&env, &[APP, WRITER], OPS).await;
    writers.progress(50).await;
    env.ok(&["install"]).await;

    // Mid-copy: the table's COPY is streaming on both sides.
    let mut agent = env.run_until_failpoint(&["copy"], "copy.mid_table@2").await;
    assert!(terminate_agent_backends(&env.source).await > 0);
    assert!(terminate_agent_backends(&env.target).await > 0);
    std::fs::write(env.failpoint_release(), "").unwrap();
    let status = tokio::time::timeout(Duration::from_secs(120), agent.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "copy retried the terminated table");
    std::fs::remove_file(env.failpoint_release()).unwrap();

    // Mid-batch: the source snapshot and the target transaction are open.
    writers.progress(20).await;
    let mut agent = env
        .run_until_failpoint(&["sync"], "sync.before_target_commit@2")
        .await;
    assert!(terminate_agent_backends(&env.source).await > 0);
    assert!(terminate_agent_backends(&env.target).await > 0);
    std::fs::write(env.failpoint_release(), "").unwrap();
    writers.progress(20).await;
    writers.stop().await;
    wait_for("the drain to catch up", Duration::from_secs(60), || async {
        let s = env.status().await;
        (s["backlog_rows"] == 0).then_some(())
    })
    .await;
    sigterm(&agent);
    exits_ok_within(&mut agent, 10).await;
    env.ok(&["cutover"]).await;
    assert_same_data(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarts_are_survived() {
    let mut env = seeded().await;
    env.config("[sync]\npoll_interval_ms = 50\n[copy]\nworkers = 1\n");
    env.ok(&["install"]).await;
    let app = env.source_as(APP).await;

    // The target restarts (immediate: a crash) in the middle of a table's
    // copy; the copy resumes with that table, the finished ones stay done.
    let mut agent = env.run_until_failpoint(&["copy"], "copy.mid_table@3").await;
    env.target.stop("immediate").await.unwrap();
    env.target.restart().await.unwrap();
    std::fs::write(env.failpoint_release(), "").unwrap();
    let status = tokio::time::timeout(Duration::from_secs(120), agent.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    std::fs::remove_file(env.failpoint_release()).unwrap();

    // During sync: the target restarts fast, then the source restarts fast.
    for (i, side) in ["target", "source"].into_iter().enumerate() {
        app.batch_execute(&format!(
            "INSERT INTO scratch VALUES ({}, 'before restart')",
            700_000 + i
        ))
        .await
        .unwrap_or(());
        let mut agent = env
            .run_until_failpoint(&["sync", "--until-caught-up"], "sync.before_target_commit")
            .await;
        if side == "target" {
            env.target.stop("fast").await.unwrap();
            env.target.restart().await.unwrap();
        } else {
            env.source.stop("fast").await.unwrap();
            env.source.restart().await.unwrap();
        }
        std::fs::write(env.failpoint_release(), "").unwrap();
        let status = tokio::time::timeout(Duration::from_secs(120), agent.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "sync reconnects after the {side} restarts");
        std::fs::remove_file(env.failpoint_release()).unwrap();
    }
    let app = env.source_as(APP).await;
    app.batch_execute("INSERT INTO scratch VALUES (700002, 'after restarts')")
        .await
        .unwrap();
    env.ok(&["sync", "--until-caught-up"]).await;
    for id in [700_000, 700_001, 700_002] {
        assert!(
            target_has(
                &env,
                &format!("SELECT EXISTS (SELECT 1 FROM scratch WHERE id = {id})")
            )
            .await
        );
    }
    env.ok(&["cutover"]).await;
    assert_same_data(&env).await;
}
