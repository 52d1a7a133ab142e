//! The bulk paths: big tables copied in parts (rows moving between parts
//! while they are read, crashes around a part's commit), `copy.from` a fork,
//! `copy.method = "dump"`, lz4 TOAST compression on the target, and a large
//! drain backlog applied in parts.

use std::time::Duration;

use pgferry_e2e::*;

use crate::*;

/// A table of about 3 MB (3 parts of 1 MB), one row in 50 with a TOASTed,
/// compressible document.
const BIG: &str = "
CREATE TABLE big (id int PRIMARY KEY, pad text NOT NULL, doc text);
CREATE SEQUENCE big_new START 2000000;
GRANT ALL ON big TO writer2;
GRANT USAGE ON SEQUENCE big_new TO writer2;
INSERT INTO big SELECT g, repeat('p', 80), CASE WHEN g % 50 = 0 THEN repeat(md5(g::text), 100) END
  FROM generate_series(1, 25000) g;";

const BIG_OPS: &[&str] = &[
    "UPDATE big SET pad = pad || 'u' WHERE id = ($N * 37) % 25000 + 1",
    "INSERT INTO big VALUES (nextval('big_new'), 'new', NULL)",
    "DELETE FROM big WHERE id = ($N * 53) % 25000 + 1",
    "UPDATE big SET id = id + 1000000 WHERE id = ($N * 71) % 25000 + 1",
];

fn parts_config(env: &Env, extra: &str) {
    let (started, release) = (env.path("switch-started"), env.path("release"));
    env.config(&format!(
        "[copy]\nworkers = 1\nsplit_tables_larger_than_mb = 1\nmax_parts = 3\n{extra}\n\
         [sync]\npoll_interval_ms = 50\n[cutover]\nswitch_command = '''{}'''\n",
        gated_switch(&started, &release)
    ));
}

async fn with_big() -> Env {
    let env = seeded().await;
    env.source_as(APP)
        .await
        .batch_execute(BIG)
        .await
        .expect("seed the big table");
    env
}

/// `migrate --cutover` while `writers` write, then the target must equal
/// the source and nothing of pgferry's may be left.
async fn cutover_then_compare(env: &Env, writers: Workload) {
    let out = env
        .cutover_while_writing(&["migrate", "--cutover"], &[&writers])
        .await;
    assert_succeeded(&out, "migrate --cutover");
    writers.stop().await;
    assert_same_data(env).await;
    assert_no_leftovers(env).await;
}

/// The big table's TOASTed documents arrived compressed with lz4.
async fn assert_lz4_documents(env: &Env) {
    assert!(
        target_has(
            env,
            "SELECT bool_and(pg_column_compression(doc) = 'lz4') AND count(*) > 0 FROM big
              WHERE pg_column_compression(doc) IS NOT NULL"
        )
        .await,
        "the documents are compressed with lz4 on the target"
    );
}

async fn parts_planned(env: &Env) -> i64 {
    env.source_as(APP)
        .await
        .query_one("SELECT count(*) FROM pgferry.copy_parts", &[])
        .await
        .expect("read the parts")
        .get(0)
}

/// Part 0 is in when rows of its range move past it (an UPDATE writes the
/// new version at the end of the table, in the last part): that part then
/// holds them again. Without removing the keys the drain will rewrite, the
/// primary key built after the data would fail on the duplicates.
#[tokio::test]
async fn a_big_table_is_copied_in_parts_and_rows_moving_between_them_are_not_doubled() {
    let env = with_big().await;
    parts_config(&env, "");
    env.ok(&["install"]).await;
    let mut agent = env.run_until_failpoint(&["copy"], "copy.mid_part@2").await;
    assert_eq!(parts_planned(&env).await, 3, "the big table is split in 3 parts");
    env.source_as(APP)
        .await
        .batch_execute("UPDATE big SET pad = pad || ' moved' WHERE id <= 300")
        .await
        .expect("move rows of part 0");
    std::fs::write(env.failpoint_release(), "").expect("release");
    let status = tokio::time::timeout(Duration::from_secs(120), agent.wait())
        .await
        .expect("copy finishes")
        .expect("wait for copy");
    assert!(status.success(), "copy failed: {status:?}");
    assert!(
        target_has(
            &env,
            "SELECT count(*) = count(DISTINCT id) AND count(*) > 20000 FROM big"
        )
        .await
    );
    // The loading sessions compress TOASTed values with lz4.
    assert_lz4_documents(&env).await;
    let writers = Workload::start(&env, &[APP, WRITER], BIG_OPS).await;
    writers.progress(300).await;
    cutover_then_compare(&env, writers).await;
}

/// Killed after a part's target transaction id was recorded but before it
/// committed, then after a part committed but before it was marked done:
/// each run settles the part by asking the target, so no part is lost or
/// loaded twice.
#[tokio::test]
async fn a_part_in_doubt_after_a_kill_is_settled_by_the_target() {
    let env = with_big().await;
    parts_config(&env, "");
    let writers = Workload::start(&env, &[APP, WRITER], BIG_OPS).await;
    writers.progress(200).await;
    env.ok(&["install"]).await;
    for point in ["copy.part_in_doubt@2", "copy.part_committed@1"] {
        let mut agent = env.run_until_failpoint(&["copy"], point).await;
        writers.progress(100).await;
        agent.kill().await.expect("SIGKILL the agent");
    }
    cutover_then_compare(&env, writers).await;
}

/// The bulk data comes from a copy of the source made after install (as a
/// Heroku fork would be), while the writes after it reach the target
/// through the capture on the real source. A database holding no migration
/// is refused.
#[tokio::test]
async fn copy_from_a_fork_made_after_install_ends_equal_and_an_unrelated_one_is_refused() {
    let env = seeded().await;
    env.ok(&["install"]).await;
    let admin = env.source.superuser("postgres").await.expect("superuser");
    // The template must have no sessions; the agent's may take a moment to go.
    wait_for("the fork", Duration::from_secs(30), || async {
        admin
            .batch_execute(&format!("CREATE DATABASE fork TEMPLATE {DB} OWNER {}", APP.0))
            .await
            .ok()
    })
    .await;
    admin
        .batch_execute(&format!("CREATE DATABASE unrelated OWNER {}", APP.0))
        .await
        .expect("unrelated database");
    let url = |db: &str| env.source_url().replace(&format!("/{DB}?"), &format!("/{db}?"));

    let (started, release) = (env.path("switch-started"), env.path("release"));
    let switch = gated_switch(&started, &release);
    env.config(&format!("[copy]\nfrom = \"{}\"\n", url("unrelated")));
    let text = env.fails(&["copy"], 3).await;
    assert!(
        text.contains("copy.from") && text.contains("holds no pgferry migration"),
        "{text}"
    );
    assert!(
        target_has(
            &env,
            "SELECT NOT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = 'public')"
        )
        .await,
        "nothing was restored from a refused copy.from"
    );

    env.config(&format!(
        "[copy]\nfrom = \"{}\"\n[sync]\npoll_interval_ms = 50\n[cutover]\nswitch_command = '''{switch}'''\n",
        url("fork")
    ));
    let writers = Workload::start(&env, &[APP, WRITER], OPS).await;
    writers.progress(300).await;
    cutover_then_compare(&env, writers).await;
    // The fork was read: its accounts table was scanned.
    let fork = env.source.superuser("fork").await.expect("fork session");
    wait_for("the fork's statistics", Duration::from_secs(30), || async {
        let read: i64 = fork
            .query_one(
                "SELECT coalesce(seq_tup_read, 0) FROM pg_stat_user_tables WHERE relname = 'accounts'",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (read >= 3000).then_some(())
    })
    .await;
}

/// `copy.method = "dump"` stages the data with pg_dump -Fd -j and restores
/// it with pg_restore -j, with writes running, and ends equal.
#[tokio::test]
async fn the_dump_method_ends_equal_with_writes_running() {
    let env = with_big().await;
    let (started, release) = (env.path("switch-started"), env.path("release"));
    env.config(&format!(
        "[copy]\nmethod = \"dump\"\nworkers = 2\n[sync]\npoll_interval_ms = 50\n\
         [cutover]\nswitch_command = '''{}'''\n",
        gated_switch(&started, &release)
    ));
    let writers = Workload::start(&env, &[APP, WRITER], BIG_OPS).await;
    writers.progress(200).await;
    let out = env
        .cutover_while_writing(&["migrate", "--cutover"], &[&writers])
        .await;
    assert_succeeded(&out, "migrate --cutover");
    writers.stop().await;
    assert_same_data(&env).await;
    assert_same_schema(&env).await;
    assert_no_leftovers(&env).await;
    assert_lz4_documents(&env).await;
}

/// Two tables of 60,000 rows; `many_codes` has a unique column besides its
/// key.
const BACKLOG: &str = "
CREATE TABLE many (id int PRIMARY KEY, v int NOT NULL);
CREATE TABLE many_codes (id int PRIMARY KEY, code int NOT NULL UNIQUE);
GRANT ALL ON many, many_codes TO writer2;
INSERT INTO many SELECT g, 0 FROM generate_series(1, 60000) g;
INSERT INTO many_codes SELECT g, g FROM generate_series(1, 60000) g;";

const BACKLOG_OPS: &[&str] = &[
    "UPDATE many SET v = v + 1 WHERE id = ($N * 37) % 60000 + 1",
    "DELETE FROM many WHERE id = ($N * 53) % 60000 + 1",
    "INSERT INTO many VALUES (1000000 + $N, -1)",
    "UPDATE many SET id = id + 2000000 WHERE id = ($N * 71) % 60000 + 1",
    "UPDATE many_codes SET code = -code WHERE id = ($N * 13) % 60000 + 1",
];

/// A backlog of 60,000 changed rows in a table is applied in parallel parts
/// (one per hash of the key; two tables with deltas leave one of the three
/// workers idle), with writes going on while the parts read; a table with
/// another unique column is applied whole (parts applying different keys
/// could collide on it). Each part forgets only its own
/// deltas: the agent stops after the first part's commit, and the parts
/// after it must still find theirs.
#[tokio::test]
async fn a_large_drain_backlog_is_applied_in_parts_with_writes_going_on() {
    let env = seeded().await;
    let app = env.source_as(APP).await;
    app.batch_execute(BACKLOG).await.expect("seed the tables");
    let (started, release) = (env.path("switch-started"), env.path("release"));
    // Whole batches here apply key by key, never by copying the table again.
    env.config(&format!(
        "[sync]\nworkers = 3\npoll_interval_ms = 50\nrecopy_fraction = 0\n\
         [cutover]\nswitch_command = '''{}'''\n",
        gated_switch(&started, &release)
    ));
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    app.batch_execute("UPDATE many SET v = v + 1; UPDATE many_codes SET code = code + 100000")
        .await
        .expect("the backlog");
    let writers = Workload::start(&env, &[APP, WRITER], BACKLOG_OPS).await;
    writers.progress(200).await;
    let agent = env
        .run_until_failpoint(&["sync", "--until-caught-up", "--json"], "sync.part_applied")
        .await;
    writers.progress(200).await;
    writers.stop().await;
    std::fs::write(env.failpoint_release(), "").expect("release");
    let out = tokio::time::timeout(Duration::from_secs(120), agent.wait_with_output())
        .await
        .expect("sync finishes")
        .expect("wait for sync");
    assert!(out.status.success(), "sync failed: {:?}", out.status);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sync's JSON report");
    assert_eq!(
        report["parts"], 4,
        "many is applied in 4 parts, many_codes whole: {report}"
    );
    let writers = Workload::start(&env, &[APP, WRITER], BACKLOG_OPS).await;
    writers.progress(100).await;
    // The setup's session would hold the fence after the switch, as an
    // application instance still connected to the old source does.
    drop(app);
    cutover_then_compare(&env, writers).await;
}

/// A backlog that names most of a table's rows (every row of `many`
/// updated, 60,000 keys) is applied by copying the table again, as of the
/// batch's snapshot, while writers keep changing it (keys too); what they
/// change meanwhile arrives by the usual key-by-key batches after it.
#[tokio::test]
async fn a_backlog_naming_most_rows_copies_the_table_again_with_writes_going_on() {
    let env = seeded().await;
    let app = env.source_as(APP).await;
    app.batch_execute(BACKLOG).await.expect("seed the tables");
    // The estimate the choice is made on, as autovacuum would keep it.
    app.batch_execute("ANALYZE many, many_codes")
        .await
        .expect("analyze");
    let (started, release) = (env.path("switch-started"), env.path("release"));
    env.config(&format!(
        "[sync]\nworkers = 1\npoll_interval_ms = 50\n[cutover]\nswitch_command = '''{}'''\n",
        gated_switch(&started, &release)
    ));
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    app.batch_execute("UPDATE many SET v = v + 1")
        .await
        .expect("the backlog");
    let writers = Workload::start(&env, &[APP, WRITER], BACKLOG_OPS).await;
    writers.progress(200).await;
    let out = env.ok(&["sync", "--until-caught-up", "--json"]).await;
    let report: serde_json::Value = serde_json::from_str(&out).expect("sync's JSON report");
    assert_eq!(report["recopies"], 1, "many is copied again, once: {report}");
    writers.progress(200).await;
    drop(app);
    cutover_then_compare(&env, writers).await;
}

/// A row estimate gone stale low does not copy a big table whole: `grown`
/// was analyzed at 1,000 rows, then (autovacuum off for it) grew to 60,000.
/// Its 12,000 changed keys are past `sync.recopy_fraction` of the stale
/// estimate, not of the table: they are applied key by key.
#[tokio::test]
async fn a_stale_low_row_estimate_does_not_copy_a_big_table_again() {
    let env = seeded().await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        "CREATE TABLE grown (id int PRIMARY KEY, v int NOT NULL) WITH (autovacuum_enabled = false);
         INSERT INTO grown SELECT g, 0 FROM generate_series(1, 1000) g;
         ANALYZE grown;
         INSERT INTO grown SELECT g, 0 FROM generate_series(1001, 60000) g;",
    )
    .await
    .expect("a table grown since its last ANALYZE");
    env.config("[sync]\nworkers = 1\n");
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    app.batch_execute("UPDATE grown SET v = v + 1 WHERE id <= 12000")
        .await
        .expect("the backlog");
    let stale: f32 = app
        .query_one(
            "SELECT reltuples FROM pg_class WHERE oid = 'grown'::regclass",
            &[],
        )
        .await
        .expect("estimate")
        .get(0);
    assert_eq!(stale, 1000.0, "the estimate is still the stale one");
    let out = env.ok(&["sync", "--until-caught-up", "--json"]).await;
    let report: serde_json::Value = serde_json::from_str(&out).expect("sync's JSON report");
    assert_eq!(report["recopies"], 0, "grown is applied key by key: {report}");
    assert_eq!(report["keys_applied"], 12000, "{report}");
    assert_same_rows(&env).await;
}
