//! The preflight an operator trusts: health, compatibility, sizing, and a
//! corruption scan.

use pgferry_e2e::*;

use crate::seeded;

pub(crate) async fn check_json(
    env: &Env,
    extra_env: &[(&str, &str)],
    args: &[&str],
) -> (i32, serde_json::Value) {
    let mut cmd = env.cmd(&[&["check", "--json"], args].concat());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}

/// `migrate --cutover` stops at its check (exit 1), before installing
/// anything on the source.
async fn assert_refused_before_install(env: &Env) {
    let out = env.run(&["migrate", "--cutover"]).await;
    assert_eq!(out.status.code(), Some(1));
    let installed: bool = env
        .source_as(APP)
        .await
        .query_one("SELECT to_regnamespace('pgferry') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!installed, "refused before install");
}

pub(crate) fn problem<'a>(report: &'a serde_json::Value, text: &str) -> Option<&'a serde_json::Value> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["message"].as_str().unwrap().contains(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_health_compatibility_and_sizing() {
    let env = seeded().await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        "SELECT lo_create(0); CREATE UNLOGGED TABLE sessions (id int PRIMARY KEY, v text);
         CREATE MATERIALIZED VIEW balances AS SELECT sum(balance) FROM accounts;
         CREATE TABLE outbox (id int PRIMARY KEY, at_xact xid8 NOT NULL DEFAULT pg_current_xact_id());
         CREATE PUBLICATION to_warehouse FOR TABLE accounts;",
    )
    .await
    .unwrap();
    env.source_superuser(
        "CREATE FUNCTION note_ddl() RETURNS event_trigger LANGUAGE plpgsql AS 'BEGIN END';
         CREATE EVENT TRIGGER ddl_log ON ddl_command_end EXECUTE FUNCTION note_ddl();
         CREATE SEQUENCE public.hidden_counter;",
    )
    .await;
    // An index left INVALID by a failed concurrent build.
    app.batch_execute("INSERT INTO scratch VALUES (9001, 'twice'), (9002, 'twice')")
        .await
        .unwrap();
    app.batch_execute("CREATE UNIQUE INDEX CONCURRENTLY scratch_v_once ON scratch (v)")
        .await
        .expect_err("duplicates");
    // A target database with another encoding and collation.
    let su = env.target.superuser("postgres").await.unwrap();
    su.batch_execute("CREATE DATABASE latin OWNER rds_master ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
        .await
        .unwrap();
    let latin = env.target_url().replace(&format!("/{DB}?"), "/latin?");

    let (code, report) = check_json(
        &env,
        &[
            ("PGFERRY_TARGET", &latin),
            ("PGFERRY_SOURCE_LIMITS__MAX_CONNECTIONS", "500"),
            ("PGFERRY_COPY__METHOD", "dump"),
            ("PGFERRY_COPY__RATE_BYTES_PER_SEC", "1000000"),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 1, "{report}");
    let blocker = |text: &str| {
        let p = problem(&report, text).unwrap_or_else(|| panic!("no problem about {text:?}: {report}"));
        assert_eq!(p["severity"], "blocker", "{p}");
        assert!(!p["fix"].as_str().unwrap().is_empty());
    };
    blocker("large object");
    // Its value is copied at cutover, with writes fenced: a refusal then
    // failed the cutover after the whole copy and sync.
    blocker("may not read this sequence");
    assert_eq!(
        problem(&report, "may not read this sequence").unwrap()["subject"],
        "public.hidden_counter"
    );
    blocker("encoding is LATIN1");
    blocker("connection slot");
    let w = problem(&report, "collation differs").expect("collation warning");
    assert_eq!(w["severity"], "warning");
    for text in [
        "column at_xact holds xid8 values",
        "1 publication(s) (to_warehouse) are not migrated",
        "1 event trigger(s) (ddl_log) are not migrated",
    ] {
        let w = problem(&report, text).unwrap_or_else(|| panic!("no warning {text:?}: {report}"));
        assert_eq!(w["severity"], "warning", "{w}");
    }
    let w = problem(&report, "index scratch_v_once is INVALID").expect("invalid index warning");
    assert_eq!(w["severity"], "warning");
    assert_eq!(w["subject"], "public.scratch");
    let w = problem(&report, "UNLOGGED").expect("unlogged warning");
    assert_eq!(w["subject"], "public.sessions");
    let w = problem(&report, "does not hold back pg_dump").expect("unlimited dump warning");
    assert_eq!(w["severity"], "warning");
    let w = problem(&report, "1 materialized view(s) are refreshed").expect("materialized view warning");
    assert_eq!(w["severity"], "warning");
    let sizing = &report["sizing"];
    assert_eq!(sizing["recommended_storage_gb"], 20, "{sizing}");
    assert_eq!(sizing["suggested_instance_class"], "db.t4g.medium");
    assert!(sizing["database_bytes"].as_i64() > Some(1_000_000));
    assert!(sizing["estimated_copy_secs"].as_f64() > Some(0.0), "{sizing}");

    // Fixed: only warnings remain, and check passes.
    app.batch_execute("SELECT lo_unlink(oid) FROM pg_largeobject_metadata")
        .await
        .unwrap();
    env.source_superuser(&format!("GRANT SELECT ON SEQUENCE hidden_counter TO {}", APP.0))
        .await;
    let (code, report) = check_json(
        &env,
        &[("PGFERRY_CUTOVER__MATERIALIZED_VIEWS", "after_switch")],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{report}");
    assert!(problem(&report, "UNLOGGED").is_some());
    assert!(problem(&report, "materialized view").is_none(), "{report}");
    assert!(
        problem(&report, "does not hold back pg_dump").is_none(),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_scan_finds_rows_whose_toast_is_lost() {
    let mut env = seeded().await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, body text);
         ALTER TABLE docs ALTER body SET STORAGE EXTERNAL;
         INSERT INTO docs SELECT g, (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 400) i)
           FROM generate_series(1, 3) g;",
    )
    .await
    .unwrap();
    let (code, report) = check_json(&env, &[], &["--scan"]).await;
    assert_eq!(code, 0, "a healthy database scans clean: {report}");

    // Lose the first page of the TOAST table, as a disk or a bad restore
    // would (as the cluster's superuser, in this test only).
    let su = env.source.superuser(DB).await.unwrap();
    let path: String = su
        .query_one(
            "SELECT pg_relation_filepath(reltoastrelid) FROM pg_class WHERE relname = 'docs'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    drop(su);
    drop(app);
    env.source.stop("fast").await.unwrap();
    let file = env.source.data_dir().join(path);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[..8192].fill(0);
    std::fs::write(&file, bytes).unwrap();
    env.source.restart().await.unwrap();

    let (code, report) = check_json(&env, &[], &["--scan"]).await;
    assert_eq!(code, 1, "{report}");
    let p = problem(&report, "cannot be read").unwrap_or_else(|| panic!("{report}"));
    assert_eq!(p["subject"], "public.docs");
    let msg = p["message"].as_str().unwrap();
    // "missing chunk number 0 for toast value ..." or "unexpected chunk
    // number 4 (expected 0) for toast value ...", depending on what is left.
    assert!(
        msg.contains("ctid (0,1)") && msg.contains("chunk number") && msg.contains("for toast value"),
        "{msg}"
    );
    assert!(
        problem(&report, "ctid (0,3)").is_none(),
        "only the damaged rows are reported: {report}"
    );
}

/// A table whose row-level security policies apply to pgferry's role (FORCE
/// on its owner, or enabled on a table another role owns) would be read
/// only as far as the policies show it: refused before anything is
/// installed, with the way out. Row security the owner is exempt from is
/// not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_whose_policies_apply_to_pgferry_are_refused_up_front() {
    let env = seeded().await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        "ALTER TABLE accounts ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
         CREATE POLICY even ON accounts USING (id % 2 = 0);
         ALTER TABLE scratch ENABLE ROW LEVEL SECURITY;",
    )
    .await
    .unwrap();
    env.source_superuser(
        "CREATE TABLE notes (id int PRIMARY KEY, body text);
         INSERT INTO notes VALUES (1, 'a'), (2, 'b');
         ALTER TABLE notes OWNER TO writer2;
         GRANT SELECT, TRIGGER ON notes TO app;
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         CREATE POLICY mine ON notes USING (body = current_user);",
    )
    .await;
    let (code, report) = check_json(&env, &[], &[]).await;
    assert_eq!(code, 1, "{report}");
    let blocked = |subject: &str| {
        report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| {
                p["subject"] == subject && p["message"].as_str().unwrap().contains("row-level security")
            })
            .cloned()
    };
    let forced = blocked("public.accounts").unwrap_or_else(|| panic!("{report}"));
    assert_eq!(forced["severity"], "blocker", "{forced}");
    assert!(
        forced["message"]
            .as_str()
            .unwrap()
            .contains("FORCE ROW LEVEL SECURITY"),
        "{forced}"
    );
    let fix = forced["fix"].as_str().unwrap();
    assert!(
        fix.contains("BYPASSRLS") && fix.contains("NO FORCE ROW LEVEL SECURITY"),
        "{fix}"
    );
    let not_owned = blocked("public.notes").unwrap_or_else(|| panic!("{report}"));
    assert!(
        not_owned["message"].as_str().unwrap().contains("does not own"),
        "{not_owned}"
    );
    assert!(
        blocked("public.scratch").is_none(),
        "the owner reads past its own policies: {report}"
    );
    assert_refused_before_install(&env).await;
}
