//! The failures a real migration meets: the agent killed anywhere, stopped by
//! a signal, its backends terminated, servers restarted. Each test has writers
//! running and ends with a row-by-row comparison.

use std::time::Duration;

use pgferry_e2e::*;

use crate::{fence_is_up, seeded, synced, synced_with, target_has, OPS};

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
        env.kill_at(&[cmd], point).await;
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
    // re-run finishes that (and verifies nothing again), and cleanup runs to
    // the end.
    let report: serde_json::Value = serde_json::from_str(&env.ok(&["cutover", "--json"]).await).unwrap();
    assert!(report["verify_scope"].is_null(), "{report}");
    assert_eq!(report["tables_verified"], 0, "{report}");
    env.ok(&["cleanup"]).await;
    writers.stop().await;
    assert_same_data(&env).await;
    assert_same_schema(&env).await;
    assert_no_leftovers(&env).await;
    // The copy resumed after its kills analyzed what the killed runs loaded.
    assert!(
        crate::target_has(
            &env,
            "SELECT bool_and(last_analyze IS NOT NULL) FROM pg_stat_user_tables"
        )
        .await
    );
}

pub(crate) fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
}

pub(crate) async fn exits_ok_within(child: &mut tokio::process::Child, secs: u64) {
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

    crate::gated_config(&env);
    let out = env
        .cutover_while_writing(&["migrate", "--cutover"], &[&writers])
        .await;
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

/// `sync` reads the catalog for drift every few seconds, not every pass: a
/// column dropped and another added in its place in between stops the next
/// batch of its table, and the drift check follows it as the drop and the
/// addition it is, told apart by the columns' attribute numbers, not as a
/// rename (which would keep the dropped column's values under the new
/// name): the old rows hold nothing in the new column on either side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_replaced_between_drift_checks_is_followed_as_a_drop_and_an_addition() {
    let env = synced().await;
    let mut agent = env.cmd(&["sync"]).spawn().expect("start sync");
    let app = env.source_as(APP).await;
    // A first pass, and so the first drift check, is over.
    app.batch_execute("INSERT INTO scratch VALUES (900, 'first')")
        .await
        .unwrap();
    wait_for("the first pass", Duration::from_secs(30), || async {
        target_has(&env, "SELECT EXISTS (SELECT 1 FROM scratch WHERE id = 900)")
            .await
            .then_some(())
    })
    .await;
    app.batch_execute(
        "ALTER TABLE scratch DROP COLUMN v, ADD COLUMN w text; INSERT INTO scratch VALUES (901, 'replaced')",
    )
    .await
    .unwrap();
    wait_for(
        "the replaced column on the target",
        Duration::from_secs(60),
        || async {
            target_has(
                &env,
                "SELECT EXISTS (SELECT 1 FROM pg_attribute
                             WHERE attrelid = 'scratch'::regclass AND attname = 'w' AND NOT attisdropped)
                AND EXISTS (SELECT 1 FROM scratch WHERE id = 901)",
            )
            .await
            .then_some(())
        },
    )
    .await;
    assert!(
        target_has(
            &env,
            "SELECT (SELECT w FROM scratch WHERE id = 901) = 'replaced'
                AND (SELECT w IS NULL FROM scratch WHERE id = 900)
                AND NOT EXISTS (SELECT 1 FROM pg_attribute
                                 WHERE attrelid = 'scratch'::regclass AND attname = 'v' AND NOT attisdropped)",
        )
        .await,
        "v dropped, w added holding nothing for the old rows"
    );
    sigterm(&agent);
    exits_ok_within(&mut agent, 60).await;
    env.ok(&["cutover"]).await;
    assert_same_data(&env).await;
}

/// Drift made after the cutover's check ahead of the fence is caught under
/// it (the check now runs beside the final drain): the cutover stops before
/// the switch, with the fence lifted and the drift named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_drift_just_before_the_fence_stops_the_cutover() {
    let env = synced().await;
    let mut agent = env
        .run_until_failpoint(&["cutover"], "cutover.before_fence")
        .await;
    env.source_as(APP)
        .await
        .batch_execute("ALTER TABLE scratch ADD COLUMN late int; INSERT INTO scratch VALUES (902, 'late', 1)")
        .await
        .unwrap();
    std::fs::write(env.failpoint_release(), "").unwrap();
    env.wait_for_log(&agent, "table public.scratch: columns changed")
        .await;
    let status = agent.wait().await.expect("the cutover ends");
    assert!(!status.success(), "no cutover over a drifted schema");
    assert!(!fence_is_up(&env).await, "the fence is lifted");
    assert_eq!(env.status().await["phase"], "syncing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_drift_stops_sync_by_name_and_the_migration_recovers() {
    // As without sync following the deploy's changes (see deploys.rs).
    let env = synced_with("[sync]\npoll_interval_ms = 50\nfollow_schema_changes = false\n").await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        "ALTER TABLE accounts ADD COLUMN vip boolean NOT NULL DEFAULT false;
         UPDATE accounts SET vip = true WHERE id < 100;
         CREATE TABLE fresh (id int PRIMARY KEY, v text);
         INSERT INTO fresh SELECT g, 'f' || g FROM generate_series(1, 50) g;",
    )
    .await
    .unwrap();
    let err = env.fails(&["sync", "--until-caught-up"], 3).await;
    assert!(err.contains("table public.accounts: columns changed"), "{err}");
    assert!(
        err.contains("table public.fresh was created after install"),
        "{err}"
    );
    assert!(
        err.contains("pgferry install"),
        "the error says what to do: {err}"
    );
    let out = env.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(1), "check reports the drift too");
    assert!(String::from_utf8_lossy(&out.stdout).contains("the schema changed since install"));
    let out = env.run(&["cutover"]).await;
    assert_ne!(out.status.code(), Some(0), "no cutover over a drifted schema");
    assert!(!fence_is_up(&env).await);

    // The operator repeats the change on the target, then install + copy.
    env.target_client()
        .await
        .batch_execute(
            "ALTER TABLE accounts ADD COLUMN vip boolean NOT NULL DEFAULT false;
             CREATE TABLE fresh (id int, v text);",
        )
        .await
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&env.ok(&["install", "--json"]).await).unwrap();
    assert_eq!(report["refreshed"], 2, "{report}");
    assert_eq!(env.status().await["phase"], "copying");
    app.batch_execute(
        "UPDATE accounts SET vip = true WHERE id BETWEEN 100 AND 120; INSERT INTO fresh VALUES (51, 'late')",
    )
    .await
    .unwrap();
    env.ok(&["copy"]).await;
    env.ok(&["sync", "--until-caught-up"]).await;
    env.ok(&["cutover"]).await;
    assert_same_then_clean_up(&env).await;
    assert_no_leftovers(&env).await;
}

/// A plain table's UPDATE capture takes old keys from a trigger on its key
/// columns, which cannot see a key that a BEFORE UPDATE trigger changes. So
/// such a trigger created after install is schema drift: sync stops and
/// names the table; `install` captures it afresh (with old keys from every
/// UPDATE, as for any table with such a trigger) and `copy` copies it again.
/// Without the drift check, sync goes on and the row whose key the trigger
/// moved stays on the target under its old key too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_before_update_trigger_created_after_install_is_drift() {
    let env = synced().await;
    let renumber = "CREATE FUNCTION renumber() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.v = 'move' THEN NEW.id := NEW.id + 1000; NEW.v := 'moved'; END IF;
            RETURN NEW;
        END $$;";
    let app = env.source_as(APP).await;
    app.batch_execute(&format!(
        "{renumber}
         CREATE TRIGGER renumber BEFORE UPDATE ON scratch FOR EACH ROW EXECUTE FUNCTION renumber();
         UPDATE scratch SET v = 'move' WHERE id = 1;"
    ))
    .await
    .unwrap();
    let err = env.fails(&["sync", "--until-caught-up"], 3).await;
    assert!(
        err.contains("table public.scratch: a BEFORE UPDATE row trigger was created after install"),
        "{err}"
    );
    assert!(
        err.contains("create only the function it calls, if the target lacks it"),
        "{err}"
    );
    let out = env.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(1), "check reports the drift too");

    // The operator creates the function on the target (the trigger itself
    // arrives at cutover), then install + copy.
    env.target_client().await.batch_execute(renumber).await.unwrap();
    let report: serde_json::Value = serde_json::from_str(&env.ok(&["install", "--json"]).await).unwrap();
    assert_eq!(report["refreshed"], 1, "{report}");
    app.batch_execute("UPDATE scratch SET v = 'move' WHERE id = 2")
        .await
        .unwrap();
    env.ok(&["copy"]).await;
    app.batch_execute("UPDATE scratch SET v = 'move' WHERE id = 3")
        .await
        .unwrap();
    env.ok(&["sync", "--until-caught-up"]).await;
    assert_same_rows(&env).await;
    env.ok(&["cutover"]).await;
    assert_same_data(&env).await;
}

/// A capture trigger that the table's owner disables (or drops) after
/// install lets writes through uncaptured, so it is drift: sync stops and
/// names the table, and `install` captures it afresh (enabled) for `copy` to
/// copy again. Disabling only the key column trigger counts too: with it
/// off, a key change leaves the row under its old key on the target. So
/// does a capture trigger disabled and enabled again the plain way (it was
/// `ENABLE ALWAYS`), and one enabled again `ENABLE ALWAYS`, by name, which
/// leaves the catalog as it was but for the row's version. Without the
/// check, sync goes on and the cutover's verification is the first to
/// notice, with the fence up (or, verifying only changed rows, none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_capture_trigger_is_drift() {
    let env = synced().await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        r#"ALTER TABLE "; drop table accounts; --" DISABLE TRIGGER pgferry_capture_key;
           UPDATE "; drop table accounts; --" SET id = -id WHERE id = 5;
           ALTER TABLE codes DISABLE TRIGGER USER;
           INSERT INTO codes VALUES ('unseen', 1);
           ALTER TABLE codes ENABLE TRIGGER USER;
           ALTER TABLE scratch DISABLE TRIGGER pgferry_capture_ins;
           INSERT INTO scratch VALUES (4242, 'unseen');
           ALTER TABLE scratch ENABLE ALWAYS TRIGGER pgferry_capture_ins;"#,
    )
    .await
    .unwrap();
    let err = env.fails(&["sync", "--until-caught-up"], 3).await;
    for table in [
        "public.; drop table accounts; --",
        "public.codes",
        "public.scratch",
    ] {
        assert!(
            err.contains(&format!(
                "table {table}: a capture trigger of pgferry's was disabled or dropped"
            )),
            "{err}"
        );
    }
    let out = env.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(1), "check reports it too");
    let out = env.run(&["cutover"]).await;
    assert_ne!(out.status.code(), Some(0), "no cutover with capture off");
    assert!(!fence_is_up(&env).await);

    let report: serde_json::Value = serde_json::from_str(&env.ok(&["install", "--json"]).await).unwrap();
    assert_eq!(report["refreshed"], 3, "{report}");
    assert_eq!(env.status().await["phase"], "copying");
    app.batch_execute(
        r#"UPDATE "; drop table accounts; --" SET id = -id WHERE id = 6;
           INSERT INTO codes VALUES ('seen', 2);"#,
    )
    .await
    .unwrap();
    env.ok(&["copy"]).await;
    app.batch_execute(r#"UPDATE "; drop table accounts; --" SET id = -id WHERE id = 7"#)
        .await
        .unwrap();
    env.ok(&["sync", "--until-caught-up"]).await;
    env.ok(&["cutover"]).await;
    assert_same_data(&env).await;
}

/// An agent killed while its scratch directories hold the schema archive
/// and the `dump` method's staged data cannot remove them; the next run
/// does, before it stages anything again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scratch_left_by_a_killed_agent_is_removed_by_the_next_run() {
    let env = seeded().await;
    env.config("[copy]\nmethod = \"dump\"\n");
    env.ok(&["install"]).await;
    // The agent's TMPDIR is the test's directory.
    let scratch = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(env.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("pgferry-"))
            .collect();
        names.sort();
        names
    };
    // Killed with its schema dumped, then with its data dumped: each run
    // removes what the one before left of the same kind.
    env.kill_at(&["copy"], "copy.schema_dumped").await;
    let left = scratch();
    assert!(
        left.len() == 1 && left[0].starts_with("pgferry-schema-"),
        "{left:?}"
    );
    env.kill_at(&["copy"], "copy.dumped").await;
    let left = scratch();
    assert!(
        left.len() == 1 && left[0].starts_with("pgferry-data-"),
        "{left:?}"
    );
    env.ok(&["copy"]).await;
    assert_eq!(scratch(), Vec::<String>::new());
    env.ok(&["sync", "--until-caught-up"]).await;
    assert_same_rows(&env).await;
}

/// A table captured before control schema v11 keeps the transaction id
/// column in its delta table (dropping it would lock out every writer), so
/// its capture functions must go on filling it, also once the fence is
/// lifted again; the drain does not read it. A table captured since has a
/// delta table of its key columns only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_table_from_before_v11_still_captures_and_drains() {
    let env = synced().await;
    let app = env.source_as(APP).await;
    let delta_columns = |table: &'static str| {
        let app = &app;
        async move {
            let row = app
                .query_one(
                    "SELECT d.id, array_agg(a.attname::text ORDER BY a.attnum)
                       FROM pgferry.tables d
                       JOIN pg_attribute a ON a.attrelid = format('pgferry.d_%s', d.id)::regclass
                      WHERE d.table_name = $1 AND a.attnum > 0 AND NOT a.attisdropped
                      GROUP BY d.id",
                    &[&table],
                )
                .await
                .unwrap();
            (row.get::<_, i32>(0), row.get::<_, Vec<String>>(1))
        }
    };
    assert_eq!(delta_columns("accounts").await.1, ["k1"], "keys only since v11");

    // scratch's delta table as version 10 made it, and its functions made
    // again for it.
    let (id, _) = delta_columns("scratch").await;
    app.batch_execute(&format!(
        "DROP TABLE pgferry.d_{id};
         CREATE TABLE pgferry.d_{id} (xid xid8 NOT NULL, k1 integer NOT NULL);
         SELECT pgferry.capture_functions({id});"
    ))
    .await
    .unwrap();
    assert_eq!(delta_columns("scratch").await.1, ["xid", "k1"]);
    // An INSERT, an UPDATE moving a key (the key column trigger) and a
    // DELETE: each would break the NOT NULL on xid without it.
    let writes = |i: i32| {
        format!(
            "INSERT INTO scratch VALUES (700000 + {i}, 'legacy delta');
             UPDATE scratch SET id = 700100 + {i} WHERE id = 10 + {i};
             DELETE FROM scratch WHERE id = 50 + {i};"
        )
    };
    app.batch_execute(&writes(0)).await.unwrap();
    env.ok(&["sync", "--until-caught-up"]).await;
    assert_same_rows(&env).await;

    app.batch_execute("SELECT pgferry.fence_set(true)").await.unwrap();
    assert_fenced(&app, &writes(1), "refused by the fence").await;
    app.batch_execute("SELECT pgferry.fence_set(false)")
        .await
        .unwrap();
    app.batch_execute(&writes(2)).await.unwrap();
    let left: i64 = app
        .query_one(
            &format!("SELECT count(*) FROM pgferry.d_{id} WHERE xid IS NOT NULL"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        left, 4,
        "the new key, the old key, the insert and the delete, with their transaction id"
    );
    env.ok(&["cutover"]).await;
    assert_same_data(&env).await;
}

/// The control schema's version this release brings.
const LATEST_CONTROL_VERSION: i32 = 21;

/// A control schema left by a pgferry from before the functions lived in
/// one file (version 15), with a migration in flight, is upgraded by the
/// next `install`: versions 16 on and the functions file applied once, in
/// place of a function that release had otherwise; capture goes on through
/// the upgrade, and a second `install` applies nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_control_schema_takes_the_functions_file_in_flight() {
    let env = synced().await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        "DELETE FROM pgferry.schema_migrations WHERE version >= 16;
         DROP TABLE pgferry.repeatable;
         DROP TABLE pgferry.disabled_triggers;
         ALTER TABLE pgferry.tables DROP COLUMN attnums;
         ALTER TABLE pgferry.run DROP COLUMN apply_pass, DROP COLUMN direction, DROP COLUMN reverse_synced_through,
           DROP COLUMN switched_back_at;
         CREATE OR REPLACE FUNCTION pgferry.delta_storage() RETURNS text
           LANGUAGE sql IMMUTABLE AS $$ SELECT 'fillfactor = 100' $$;
         INSERT INTO scratch VALUES (710000, 'before the upgrade');",
    )
    .await
    .unwrap();
    let applied = || {
        let app = &app;
        async move {
            let row = app
                .query_one(
                    "SELECT (SELECT max(version) FROM pgferry.schema_migrations),
                            (SELECT applied_at::text FROM pgferry.repeatable WHERE name = 'functions.sql'),
                            pgferry.delta_storage()",
                    &[],
                )
                .await
                .unwrap();
            (
                row.get::<_, i32>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2),
            )
        }
    };
    env.ok(&["install"]).await;
    let (version, first, storage) = applied().await;
    assert_eq!(version, LATEST_CONTROL_VERSION);
    assert!(
        storage.contains("autovacuum_vacuum_threshold"),
        "the function as this release has it: {storage}"
    );
    app.batch_execute(
        "INSERT INTO scratch VALUES (710001, 'after the upgrade');
         UPDATE scratch SET id = 710002 WHERE id = 710000;
         DELETE FROM scratch WHERE id = 12;",
    )
    .await
    .unwrap();
    env.ok(&["install"]).await;
    assert_eq!(applied().await.1, first, "applied once, not on every install");
    env.ok(&["sync", "--until-caught-up"]).await;
    assert_same_rows(&env).await;
    env.ok(&["cutover"]).await;
    assert_same_data(&env).await;
}

/// The control schema as version 10 made it, the one before delta rows
/// were keys only: its files as they are in the tree today, plus the two
/// functions of those versions that have not changed since and so live in
/// the functions file now (`fence_install`, `key_trigger_fits`).
const CONTROL_V10: [&str; 10] = [
    include_str!("../../../agent/src/control/sql/0001_control.sql"),
    include_str!("../../../agent/src/control/sql/0002_switch_marker.sql"),
    include_str!("../../../agent/src/control/sql/0003_copy_only.sql"),
    include_str!("../../../agent/src/control/sql/0004_partitions.sql"),
    include_str!("../../../agent/src/control/sql/0005_inheritance.sql"),
    include_str!("../../../agent/src/control/sql/0006_copy_parts.sql"),
    include_str!("../../../agent/src/control/sql/0007_cheaper_capture.sql"),
    include_str!("../../../agent/src/control/sql/0008_qualified_capture.sql"),
    include_str!("../../../agent/src/control/sql/0009_key_change_trigger.sql"),
    include_str!("../../../agent/src/control/sql/0010_fence_in_bodies.sql"),
];

/// A migration begun under control schema 10 is upgraded in flight by a
/// newer `install`: versions 11 on and the functions file apply, the
/// table that release captured keeps capturing into its delta table of
/// that shape, and the migration ends equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_begun_under_control_schema_10_is_upgraded_in_flight() {
    let env = seeded().await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        "CREATE SCHEMA pgferry;
         CREATE TABLE pgferry.schema_migrations (
             version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());",
    )
    .await
    .unwrap();
    for (i, sql) in CONTROL_V10.iter().enumerate() {
        app.batch_execute(&format!(
            "BEGIN; SET LOCAL search_path = pgferry, pg_catalog;
             {sql}
             ; INSERT INTO pgferry.schema_migrations (version) VALUES ({}); COMMIT;",
            i + 1
        ))
        .await
        .unwrap_or_else(|e| panic!("control schema version {}: {e}", i + 1));
    }
    let functions = include_str!("../../../agent/src/control/sql/functions.sql");
    for name in ["fence_install", "key_trigger_fits"] {
        let from = functions
            .find(&format!("CREATE OR REPLACE FUNCTION {name}("))
            .expect("defined");
        let revoke = format!("REVOKE ALL ON FUNCTION {name}(");
        let to = from + functions[from..].find(&revoke).expect("revoked");
        let end = to + functions[to..].find('\n').expect("a line");
        app.batch_execute(&format!(
            "SET search_path = pgferry, pg_catalog; {}; RESET search_path;",
            &functions[from..end]
        ))
        .await
        .unwrap();
    }
    // scratch registered and captured as version 10 did it, and written.
    app.batch_execute(
        "INSERT INTO pgferry.run (phase) VALUES ('installed');
         INSERT INTO pgferry.tables (relid, schema_name, table_name, key_columns, copy_columns, lock_relid)
              VALUES ('scratch'::regclass, 'public', 'scratch', '{id}', '{id,v}', 'scratch'::regclass);
         SELECT pgferry.capture_install(id) FROM pgferry.tables;
         INSERT INTO scratch VALUES (720000, 'captured under version 10');",
    )
    .await
    .unwrap();

    env.ok(&["install"]).await;
    let row = app
        .query_one(
            "SELECT (SELECT max(version) FROM pgferry.schema_migrations),
                    (SELECT count(*) FROM pgferry.repeatable),
                    (SELECT array_agg(a.attname::text ORDER BY a.attnum)
                       FROM pgferry.tables t
                       JOIN pg_attribute a ON a.attrelid = format('pgferry.d_%s', t.id)::regclass
                      WHERE t.table_name = 'scratch' AND a.attnum > 0 AND NOT a.attisdropped)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), LATEST_CONTROL_VERSION);
    assert_eq!(row.get::<_, i64>(1), 1, "the functions file applied");
    assert_eq!(
        row.get::<_, Vec<String>>(2),
        ["xid", "k1"],
        "scratch's delta table as version 10 made it"
    );
    app.batch_execute(
        "INSERT INTO scratch VALUES (720001, 'captured since');
         UPDATE scratch SET id = 720002 WHERE id = 720000;
         DELETE FROM scratch WHERE id = 13;",
    )
    .await
    .unwrap();
    env.ok(&["copy"]).await;
    app.batch_execute("UPDATE scratch SET v = 'after the copy' WHERE id IN (720001, 14)")
        .await
        .unwrap();
    env.ok(&["sync", "--until-caught-up"]).await;
    assert_same_rows(&env).await;
    env.ok(&["cutover"]).await;
    assert_same_data(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_target_privilege_consumes_nothing() {
    let env = seeded().await;
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    env.ok(&["sync", "--until-caught-up"]).await;
    let t = env.target_client().await;
    t.batch_execute("REVOKE INSERT ON scratch FROM rds_master")
        .await
        .unwrap();
    env.source_as(APP)
        .await
        .batch_execute("INSERT INTO scratch VALUES (600000, 'needs insert')")
        .await
        .unwrap();
    let err = env.fails(&["sync", "--until-caught-up"], 3).await;
    assert!(
        err.contains("public.scratch") && err.contains("permission denied"),
        "{err}"
    );
    let status = env.status().await;
    let scratch = status["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "public.scratch")
        .unwrap();
    assert_eq!(
        scratch["backlog_rows"], 1,
        "the delta that could not be applied is kept: {status}"
    );
    t.batch_execute("GRANT INSERT ON scratch TO rds_master")
        .await
        .unwrap();
    env.ok(&["sync", "--until-caught-up"]).await;
    assert!(target_has(&env, "SELECT EXISTS (SELECT 1 FROM scratch WHERE id = 600000)").await);
    env.ok(&["cutover"]).await;
    assert_same_data(&env).await;
}

/// Runs single-row writes to `tables` until stopped; returns the slowest
/// statement's latency.
async fn measure_writes(
    env: &Env,
    tables: &'static [&'static str],
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Duration {
    let c = env.source_as(WRITER).await;
    let mut worst = Duration::ZERO;
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for table in tables {
            n += 1;
            let started = std::time::Instant::now();
            let sql = match *table {
                "scratch" => format!("UPDATE scratch SET v = 'w{n}' WHERE id = 50"),
                "codes" => format!("UPDATE codes SET n = n + 1 WHERE code = 'code-{}'", 1 + n % 400),
                _ => format!(
                    "UPDATE accounts SET balance = balance + 1 WHERE id = {}",
                    2000 + n % 900
                ),
            };
            c.batch_execute(&sql).await.expect("application write");
            worst = worst.max(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_and_cleanup_never_queue_the_application_behind_a_blocker() {
    let env = seeded().await;
    env.config("[source_limits]\nlock_timeout_ms = 200\nretry_max_backoff_ms = 400\n");
    let lock_timeout = Duration::from_millis(200);
    // Generous for a loaded CI machine, far below the blockers' 2 s.
    let margin = Duration::from_millis(800);
    let blocked_tables = |env: &Env, name: &'static str| {
        let (port, name) = (env.source.port(), name);
        async move {
            let c = connect(port, APP).await;
            c.query_one(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname LIKE 'pgferry%'",
                &[&name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };

    for (phase, blocker_sql) in [
        // An open write transaction on scratch (ROW EXCLUSIVE, like a long
        // application transaction), and an anti-wraparound-vacuum-like lock
        // on codes (SHARE UPDATE EXCLUSIVE).
        ("install", "BEGIN; UPDATE scratch SET v = 'held' WHERE id = 1; LOCK TABLE codes IN SHARE UPDATE EXCLUSIVE MODE"),
        ("cleanup", "BEGIN; UPDATE scratch SET v = 'held' WHERE id = 1; LOCK TABLE codes IN SHARE UPDATE EXCLUSIVE MODE"),
    ] {
        let blocker = env.source_as(APP).await;
        blocker.batch_execute(blocker_sql).await.unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writes = measure_writes(&env, &["scratch", "codes", "accounts"], stop.clone());
        let agent = async {
            let mut child = env.cmd(&[phase]).spawn().unwrap();
            // The agent gets every other table done and keeps retrying these
            // two. Scratch's capture is five triggers: four statement
            // triggers and the key column trigger; accounts has no key
            // column trigger (it has a BEFORE UPDATE trigger of its own).
            let want: i64 = if phase == "install" { 0 } else { 5 };
            wait_for("the other tables", Duration::from_secs(60), || async {
                let accounts = blocked_tables(&env, "accounts").await;
                let done = if phase == "install" { accounts == 4 } else { accounts == 0 };
                (done && blocked_tables(&env, "scratch").await == want).then_some(())
            })
            .await;
            // Hold the blockers through several retry rounds, then let go.
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(blocked_tables(&env, "scratch").await, want, "{phase} waits for the blocker");
            blocker.batch_execute("COMMIT").await.unwrap();
            let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.unwrap().unwrap();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            status
        };
        let (worst, status) = tokio::join!(writes, agent);
        assert!(status.success(), "{phase} completes once the blocker is gone");
        assert!(
            worst < lock_timeout + margin,
            "{phase}: an application write waited {worst:?}, more than lock_timeout {lock_timeout:?} + {margin:?}"
        );
    }
    assert_no_leftovers(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_completes_while_the_network_cuts_connections() {
    let env = seeded().await;
    let (source_proxy, target_proxy) = (
        ChaosProxy::start(env.source.port()).await,
        ChaosProxy::start(env.target.port()).await,
    );
    let (_, release) = crate::gated_config(&env);
    let writers = Workload::start(&env, &[APP, WRITER], OPS).await;
    writers.progress(50).await;
    let mut agent = env
        .cmd(&["migrate", "--cutover"])
        .env("PGFERRY_SOURCE", env.source_url_via(source_proxy.port))
        .env("PGFERRY_TARGET", env.target_url_via(target_proxy.port))
        // Install is over in milliseconds: it waits here until the cuts of
        // its phase are done, so they always land.
        .env("PGFERRY_FAILPOINTS", "install.table_done@2")
        .env("PGFERRY_FAILPOINT_RELEASE", env.failpoint_release())
        .spawn()
        .unwrap();
    // Cuts start once the preflight has passed (a cut during the preflight is
    // reported as a blocker, by design) and stop after a bounded number.
    wait_for("capture to start", Duration::from_secs(60), || async {
        let c = env.source_as(APP).await;
        let row = c
            .query_one("SELECT to_regclass('pgferry.run') IS NOT NULL", &[])
            .await
            .ok()?;
        row.get::<_, bool>(0).then_some(())
    })
    .await;
    // Two cuts on each side in every phase the agent passes through, the
    // phase read directly from the source (not through the proxy).
    let chaos = async {
        let watcher = env.source_as(APP).await;
        let mut cut_in: std::collections::HashMap<String, usize> = Default::default();
        let mut round = 0usize;
        loop {
            tokio::time::sleep(Duration::from_millis(40)).await;
            round += 1;
            let phase: Option<String> = match watcher.query_opt("SELECT phase FROM pgferry.run", &[]).await {
                Ok(row) => row.map(|r| r.get(0)),
                Err(_) => break, // the control schema is gone: cleanup ran
            };
            let Some(phase) = phase else { continue };
            if phase == "cut_over" {
                break;
            }
            let n = cut_in.entry(phase).or_default();
            if *n < 2 {
                let source_cut = source_proxy.cut(round * 7);
                let target_cut = target_proxy.cut(round * 11);
                *n += usize::from(source_cut || target_cut);
            }
            if cut_in.get("installing") == Some(&2) {
                std::fs::write(env.failpoint_release(), "").unwrap();
            }
        }
        cut_in
    };
    let gate = async {
        writers.wait_all_fenced().await;
        std::fs::write(&release, "").unwrap();
    };
    let (cuts, (), status) = tokio::join!(chaos, gate, async {
        tokio::time::timeout(Duration::from_secs(300), agent.wait()).await
    });
    let status = status.expect("the migration finished").unwrap();
    assert!(
        status.success(),
        "the migration completes despite the cuts {cuts:?}"
    );
    for phase in ["installing", "copying", "syncing", "cutting_over"] {
        assert_eq!(
            cuts.get(phase),
            Some(&2),
            "connections cut in phase {phase}: {cuts:?}"
        );
    }
    writers.stop().await;
    assert_same_data(&env).await;
    assert_no_leftovers(&env).await;
}
