//! Databases shaped as real ones are, beyond the application schema of the
//! other tests: values that name objects (the reg* types), values whose
//! binary form does not round-trip (an empty tsquery), foreign keys to
//! partitioned tables. Each migrates with live writes and ends with a
//! row-by-row comparison.

use pgferry_e2e::*;

use crate::preflight::{check_json, problem};
use crate::{migrate_while_writing_then_compare, seeded, OPS};

/// The application's tables of names and searches: reg* columns (plain, in
/// an array domain, in a composite type), and tsqueries, an empty one
/// among them (what `to_tsquery` makes of stopwords alone).
const NAMES_AND_QUERIES: &str = "
    CREATE SCHEMA audit;
    CREATE TABLE audit.shadow (id int PRIMARY KEY);
    CREATE DOMAIN rels AS regclass[];
    CREATE TYPE owner_ref AS (who regrole, since date);
    CREATE TABLE audit_rel (id int PRIMARY KEY, rel regclass, touched rels, owner owner_ref, kind regtype,
                            fn regprocedure, cfg regconfig, q tsquery);
    INSERT INTO audit_rel
    SELECT g, CASE WHEN g % 2 = 0 THEN 'accounts' ELSE 'audit.shadow' END, '{scratch,audit.shadow}',
           ROW('pg_monitor'::regrole, date '2026-01-01')::owner_ref, 'int4', 'lower(text)', 'english',
           CASE WHEN g % 3 = 0 THEN to_tsquery('english', 'the & a') ELSE to_tsquery('english', 'fat & rat') END
      FROM generate_series(1, 300) g;
    -- Beyond what the application's deletes reach: empty queries that stay.
    INSERT INTO audit_rel SELECT g, 'accounts', NULL, NULL, 'text', 'lower(text)', 'english', to_tsquery('english', 'of')
      FROM generate_series(301, 320) g;";

/// What the application keeps doing to them while the migration runs.
const NAME_OPS: &[&str] = &[
    "UPDATE audit_rel SET rel = 'ledger', q = to_tsquery('english', 'of & the') WHERE id = ($N * 7) % 300 + 1",
    "INSERT INTO audit_rel VALUES (1000 + $N % 5000, 'audit.shadow', '{accounts}', ROW('pg_read_all_data'::regrole, NULL::date)::owner_ref,
       'text', 'upper(text)', 'simple', to_tsquery('simple', 'x$N'))
     ON CONFLICT (id) DO UPDATE SET q = to_tsquery('english', 'and')",
    "DELETE FROM audit_rel WHERE id = ($N * 11) % 300 + 1",
];

/// Columns of the reg* types move by name, as pg_dump moves them, and an
/// empty tsquery arrives (binary COPY sends it, the target refuses it), in
/// the copy and in the drain alike; `check` says how they move and blocks
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_names_and_empty_tsqueries_move_as_pg_dump_moves_them() {
    let env = seeded().await;
    env.source_as(APP)
        .await
        .batch_execute(NAMES_AND_QUERIES)
        .await
        .expect("seed names and queries");
    let (code, report) = check_json(&env, &[], &[]).await;
    assert_eq!(code, 0, "{report}");
    let p = problem(&report, "column rel holds regclass values").unwrap_or_else(|| panic!("{report}"));
    assert_eq!(p["severity"], "warning", "{p}");
    static OPS_AND_NAMES: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    let ops = OPS_AND_NAMES.get_or_init(|| OPS.iter().chain(NAME_OPS).copied().collect());
    migrate_while_writing_then_compare(&env, &[APP, WRITER], ops, 100).await;
    // The names resolve to the same objects on the target, not to the
    // objects that hold the source's OIDs there.
    let rels = "SELECT string_agg(DISTINCT rel::text, ',' ORDER BY rel::text) FROM audit_rel";
    let (s, t) = (env.source_as(APP).await, env.target_client().await);
    let (a, b): (String, String) = (
        s.query_one(rels, &[]).await.unwrap().get(0),
        t.query_one(rels, &[]).await.unwrap().get(0),
    );
    assert_eq!(a, b);
    assert!(b.contains("audit.shadow"), "{b}");
    assert!(
        t.query_one("SELECT count(*) > 0 FROM audit_rel WHERE numnode(q) = 0", &[])
            .await
            .unwrap()
            .get::<_, bool>(0),
        "empty tsqueries arrived"
    );
}

/// A value naming an object the target lacks (a role not recreated there)
/// stops the copy with the name in its headline; once the object exists,
/// the copy goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_target_lacks_is_refused_by_name() {
    let env = seeded().await;
    env.source_as(APP)
        .await
        .batch_execute("CREATE TABLE grants_log (id int PRIMARY KEY, who regrole); INSERT INTO grants_log VALUES (1, 'writer2')")
        .await
        .unwrap();
    env.config("[sync]\npoll_interval_ms = 50\n[source_limits]\nstep_retries = 0\n");
    env.ok(&["install"]).await;
    let err = String::from_utf8_lossy(&env.run(&["copy"]).await.stderr).into_owned();
    assert!(err.contains("grants_log") && err.contains("writer2"), "{err}");
    env.target
        .superuser(DB)
        .await
        .unwrap()
        .batch_execute("CREATE ROLE writer2")
        .await
        .unwrap();
    env.ok(&["copy"]).await;
    env.ok(&["sync", "--until-caught-up"]).await;
    assert_same_rows(&env).await;
}

/// Foreign keys that reference a partitioned table, from a plain table and
/// from a partitioned one: PostgreSQL derives a constraint for each
/// referenced partition, and every one of them ends as validated as on the
/// source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_keys_to_partitioned_tables_end_as_validated_as_on_the_source() {
    let env = seeded().await;
    env.source_as(APP)
        .await
        .batch_execute(
            "CREATE TABLE regions (id int PRIMARY KEY, name text) PARTITION BY RANGE (id);
             CREATE TABLE regions_low PARTITION OF regions FOR VALUES FROM (0) TO (1000);
             CREATE TABLE regions_high PARTITION OF regions FOR VALUES FROM (1000) TO (1000000);
             CREATE TABLE shops (id int PRIMARY KEY, region int NOT NULL REFERENCES regions (id) ON DELETE CASCADE);
             CREATE TABLE visits (id int, region int REFERENCES regions (id), PRIMARY KEY (id)) PARTITION BY RANGE (id);
             CREATE TABLE visits_all PARTITION OF visits FOR VALUES FROM (0) TO (10000000);
             INSERT INTO regions SELECT g, 'r' || g FROM generate_series(1, 2000) g;
             INSERT INTO shops SELECT g, 1 + g % 2000 FROM generate_series(1, 3000) g;
             INSERT INTO visits SELECT g, 1 + g % 1999 FROM generate_series(1, 3000) g;",
        )
        .await
        .expect("seed partitioned references");
    let (code, report) = check_json(&env, &[], &[]).await;
    assert_eq!(code, 0, "{report}");
    let p = problem(
        &report,
        "foreign key shops_region_fkey references the partitioned table",
    )
    .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(p["severity"], "warning", "{p}");
    const REF_OPS: &[&str] = &[
        "INSERT INTO regions VALUES (5000 + $N % 100000, 'new') ON CONFLICT DO NOTHING",
        "INSERT INTO shops VALUES (10000 + $N, 1 + $N % 2000) ON CONFLICT DO NOTHING",
        "INSERT INTO visits VALUES (10000 + $N, 1 + ($N * 7) % 2000) ON CONFLICT DO NOTHING",
        "DELETE FROM regions WHERE id = 1 + ($N * 13) % 2000 AND NOT EXISTS (SELECT 1 FROM visits WHERE region = regions.id)",
        "UPDATE shops SET region = 1 + ($N * 3) % 2000 WHERE id = 1 + $N % 3000",
    ];
    migrate_while_writing_then_compare(&env, &[APP], REF_OPS, 100).await;
    let derived_valid = "SELECT count(*) FILTER (WHERE convalidated), count(*) FROM pg_constraint
                          WHERE contype = 'f' AND conparentid <> 0";
    let row = env
        .target_client()
        .await
        .query_one(derived_valid, &[])
        .await
        .unwrap();
    let (valid, all): (i64, i64) = (row.get(0), row.get(1));
    assert!(all >= 2, "derived constraints exist: {all}");
    assert_eq!(valid, all, "every derived constraint is valid on the target");
}

/// Creates PostGIS the way a platform does for the application: as the
/// superuser, then handed to the database owner `owner` (the extension and
/// its configuration table `spatial_ref_sys`), as Heroku does on the source
/// and the RDS master user's own CREATE EXTENSION does on the target.
pub(crate) async fn platform_creates_postgis(cluster: &pgferry::sandbox::Cluster, owner: &str) {
    cluster
        .superuser(DB)
        .await
        .expect("superuser")
        .batch_execute(&format!(
            "CREATE EXTENSION postgis;
             UPDATE pg_extension SET extowner = '{owner}'::regrole WHERE extname = 'postgis';
             ALTER TABLE spatial_ref_sys OWNER TO {owner};"
        ))
        .await
        .expect("the platform creates PostGIS");
}

/// PostGIS as a platform creates it, on both sides: geometry and geography
/// columns with typmods, GiST indexes, an application-defined SRID in
/// `spatial_ref_sys` that a view and a materialized view transform
/// through, a generated column computed by a PostGIS function, and live
/// writes. The extension's own objects are neither captured nor copied as
/// data; the application's SRID arrives and is verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgis_created_by_the_platform_migrates_with_the_applications_srid() {
    let env = seeded().await;
    platform_creates_postgis(&env.source, APP.0).await;
    platform_creates_postgis(&env.target, MASTER.0).await;
    env.source_as(APP)
        .await
        .batch_execute(
            "INSERT INTO spatial_ref_sys (srid, auth_name, auth_srid, srtext, proj4text)
             SELECT 990001, 'APP', 990001, srtext, proj4text FROM spatial_ref_sys WHERE srid = 3857;
             CREATE TABLE places (
                 id bigserial PRIMARY KEY,
                 name text NOT NULL,
                 geom geometry(Point, 4326) NOT NULL,
                 area geography(Polygon, 4326),
                 local geometry(Point, 990001),
                 geom_hash text GENERATED ALWAYS AS (ST_GeoHash(geom, 8)) STORED);
             CREATE INDEX places_geom ON places USING gist (geom);
             CREATE INDEX places_area ON places USING gist (area);
             INSERT INTO places (name, geom, area, local)
             SELECT 'p' || g, ST_SetSRID(ST_MakePoint(g % 180, g % 80), 4326),
                    ST_Buffer(ST_SetSRID(ST_MakePoint(g % 170, g % 70), 4326)::geography, 1000)::geometry::geography,
                    ST_Transform(ST_SetSRID(ST_MakePoint(g % 180, g % 80), 4326), 990001)
               FROM generate_series(1, 500) g;
             CREATE VIEW places_local AS SELECT id, ST_Transform(geom, 990001) AS local FROM places;
             CREATE MATERIALIZED VIEW places_near AS
               SELECT id, ST_AsText(ST_Transform(geom, 990001)) AS wkt FROM places WHERE id % 10 = 0;",
        )
        .await
        .expect("the application's spatial schema");
    const GIS_OPS: &[&str] = &[
        "INSERT INTO places (name, geom, local) VALUES ('w$N', ST_SetSRID(ST_MakePoint($N % 180, $N % 80), 4326),
            ST_Transform(ST_SetSRID(ST_MakePoint($N % 180, $N % 80), 4326), 990001))",
        "UPDATE places SET geom = ST_Translate(geom, 0.001, 0) WHERE id = 1 + ($N * 7) % 500",
        "DELETE FROM places WHERE id = 1 + ($N * 13) % 500",
        "UPDATE spatial_ref_sys SET auth_name = 'APP$N' WHERE srid = 990001",
    ];
    let (code, report) = check_json(&env, &[], &[]).await;
    assert_eq!(code, 0, "{report}");
    migrate_while_writing_then_compare(&env, &[APP], GIS_OPS, 100).await;
    let srid = "SELECT auth_name FROM spatial_ref_sys WHERE srid = 990001";
    let (s, t) = (env.source_as(APP).await, env.target_client().await);
    let a: String = s.query_one(srid, &[]).await.unwrap().get(0);
    let b: String = t
        .query_one(srid, &[])
        .await
        .expect("the application's SRID arrived")
        .get(0);
    assert_eq!(a, b);
    let count = "SELECT count(*) FROM spatial_ref_sys";
    let (a, b): (i64, i64) = (
        s.query_one(count, &[]).await.unwrap().get(0),
        t.query_one(count, &[]).await.unwrap().get(0),
    );
    assert_eq!(a, b, "the extension's own rows once each");
    let near = "SELECT count(*) FROM places_near";
    assert!(t.query_one(near, &[]).await.unwrap().get::<_, i64>(0) > 0);
}

/// An application transaction that holds a write lock on a table for long
/// (a slow request, a batch job): `install` waits for its turn on that
/// table instead of asking for the lock the triggers need, so the
/// application's other statements on the table never queue behind
/// pgferry, even with the source's `lock_timeout` at 30 s. Once the
/// transaction ends, install completes. (Statements that each take a while
/// back to back, with no long transaction, must not keep install waiting:
/// `fidelity::every_type_and_identifier_arrives_identical` rewrites a
/// growing TOAST value throughout its migration.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_waits_out_a_long_transaction_instead_of_queueing_the_application() {
    let env = seeded().await;
    let holder = env.source_as(APP).await;
    holder
        .batch_execute("BEGIN; UPDATE accounts SET balance = balance + 1 WHERE id = 1")
        .await
        .unwrap();
    let mut cmd = env.cmd(&["install"]);
    cmd.env("PGFERRY_SOURCE_LIMITS__LOCK_TIMEOUT_MS", "30000");
    let agent = env
        .spawn_until_failpoint(cmd, &["install"], "install.after_register")
        .await;
    std::fs::write(env.failpoint_release(), "").unwrap();
    env.wait_for_log(&agent, "in use by a longer transaction").await;
    // The application goes on writing other rows of the held table.
    let app = env.source_as(APP).await;
    app.batch_execute("SET statement_timeout = '2s'").await.unwrap();
    for i in 0..20 {
        app.execute(
            "UPDATE accounts SET balance = balance + 1 WHERE id = 2 + $1::int % 5",
            &[&i],
        )
        .await
        .expect("an application write queued behind install's lock request");
        let waiting: i64 = app
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgferry' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            waiting, 0,
            "a pgferry session waits for a lock the application holds"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    holder.batch_execute("COMMIT").await.unwrap();
    let out = agent.wait_with_output().await.unwrap();
    assert!(out.status.success(), "install failed after the transaction ended");
    let triggers: i64 = app
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'accounts'::regclass
                AND tgname IN ('pgferry_capture_ins', 'pgferry_capture_upd', 'pgferry_capture_del', 'pgferry_capture_trunc')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 4, "accounts is captured once its turn came");
}
