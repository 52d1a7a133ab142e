//! Fidelity: every type family and awkward identifiers arrive identical,
//! with writes running during the migration.

use pgferry_e2e::*;

/// Every built-in type family, user-defined types (enum, domain, composite)
/// and trusted extension types, alone and in arrays, plus names that need
/// quoting, a 63-byte name and the same table name in two schemas.
const SCHEMA: &str = r#"
CREATE EXTENSION citext;
CREATE EXTENSION hstore;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive AS numeric CHECK (VALUE > 0);
CREATE TYPE pair AS (label text, weight float8, m mood);
CREATE SCHEMA "Other Schema";
CREATE TABLE everything (
    id bigint PRIMARY KEY,
    n numeric, f4 real, f8 double precision, i2 smallint, i4 int, money money,
    ts timestamp, tstz timestamptz, d date, t time, ttz timetz, iv interval,
    b bytea, txt text, vc varchar(20), ch char(5),
    js json, jb jsonb, x xml,
    inet inet, cidr cidr, mac macaddr, mac8 macaddr8,
    u uuid, bits bit(8), vbits varbit,
    tsv tsvector, tsq tsquery,
    r int4range, mr int4multirange, tr tstzrange,
    arr int[], arr2 text[][], arr_lb int[],
    e mood, e_arr mood[], dom positive, dom_arr positive[],
    comp pair, comp_arr pair[],
    ci citext, ci_arr citext[], hs hstore,
    pt point, bx box, circ circle,
    flag boolean, o oid);
CREATE TABLE "select" ("from" int PRIMARY KEY, "Mixed Case" text, "ünïcödé ✓" text);
CREATE TABLE "a_table_name_that_is_exactly_sixty_three_bytes_long_abcdefghijk" (id int PRIMARY KEY, v text);
CREATE TABLE public.dup (id int PRIMARY KEY, v text);
CREATE TABLE "Other Schema".dup (id int PRIMARY KEY, v text);
CREATE TABLE big (id int PRIMARY KEY, blob bytea, doc text);
INSERT INTO everything VALUES
 (1, 'NaN', '-0', '-Infinity', -32768, 2147483647, '$1,234.56',
  'infinity', '-infinity', 'infinity', '24:00:00', '23:59:59+14', '1 year 2 mons -3 days 04:05:06.789',
  '\x00ff10', E'tab\there ✓ 𝄞 ñ \u00e9', 'varchar', 'ab',
  '{"b": 1,  "a": [1, 2],   "b": 2}', '{"b": 1, "a": [1, 2]}', '<a x="1">text &amp; more</a>',
  '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', B'10101010', B'101',
  'a fat cat:1 sat:2', 'fat & (rat | cat)',
  '[1,10)', '{[1,3), [5,7)}', '[2024-01-01 00:00+00, infinity)',
  '{1,NULL,3}', '{{a,b},{c,NULL}}', '[0:2]={7,8,9}',
  'happy', '{sad,happy}', 12.5, '{1,2.5}',
  ROW('w', -0.0, 'ok'), ARRAY[ROW('x', 1.5, 'sad')::pair, NULL],
  'MiXeD', '{Aa,bB}', 'a=>1, b=>NULL',
  '(1.5,-2)', '((0,0),(1,1))', '<(0,0),2>', true, 4294967295),
 (2, '1e-30', 'NaN', 'Infinity', 0, 0, '-0.01', '1999-12-31 23:59:59.999999', '2000-01-01 00:00:00+00', '0001-01-01 BC',
  '00:00', '00:00+00', '0', '', '', '', '', 'null', 'null', '<empty/>', '::1', '::/0', '00:00:00:00:00:00',
  '00:00:00:00:00:00:00:00', '00000000-0000-0000-0000-000000000000', B'00000000', B'', '', 'x', 'empty', '{}',
  'empty', '{}', '{}', '[-5:-5]={0}', 'sad', '{}', 1, '{}', ROW(NULL, NULL, NULL), '{}', '', '{}', '', '(0,0)',
  '((0,0),(0,0))', '<(0,0),0>', false, 0),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
INSERT INTO "select" VALUES (1, 'x', 'ÿ'), (2, NULL, '✓✓');
INSERT INTO "a_table_name_that_is_exactly_sixty_three_bytes_long_abcdefghijk" VALUES (1, 'long');
INSERT INTO public.dup VALUES (1, 'public');
INSERT INTO "Other Schema".dup VALUES (1, 'other');
INSERT INTO big VALUES (1, (SELECT string_agg(decode(md5(g::text), 'hex'), '') FROM generate_series(1, 200000) g),
                           (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400000) g));
"#;

/// Writes that touch every kind of value while the migration runs.
const OPS: &[&str] = &[
    "UPDATE everything SET n = n + 1, e_arr = e_arr || 'ok'::mood, comp = ROW('upd$N', $N, 'ok'),
            comp_arr = comp_arr || ROW('a', 1, 'happy')::pair, ci_arr = ci_arr || 'Zz'::citext,
            hs = hs || hstore('k$N', 'v'), dom_arr = dom_arr || 3::positive WHERE id = 1",
    "INSERT INTO everything (id, e, e_arr, comp, ci, js, arr_lb) VALUES (1000 + $N, 'ok', '{happy}', ROW('new', $N, 'sad'),
            'New', '{\"dup\": 1, \"dup\": 2}', '[5:6]={1,2}') ON CONFLICT (id) DO NOTHING",
    "DELETE FROM everything WHERE id = 1000 + $N - 3",
    "UPDATE \"select\" SET \"Mixed Case\" = 'v$N' WHERE \"from\" = 1",
    "UPDATE \"Other Schema\".dup SET v = 'other $N'; UPDATE public.dup SET v = 'public $N'",
    "UPDATE big SET doc = doc || 'x' WHERE id = 1",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_and_identifier_arrives_identical() {
    let env = Env::new(crate::BIN).await;
    env.source_as(APP)
        .await
        .batch_execute(SCHEMA)
        .await
        .expect("seed every type");
    // A real target has a history of its own: its type OIDs differ from the
    // source's (binary COPY embeds element and field type OIDs).
    let su = env.target.superuser("postgres").await.unwrap();
    su.batch_execute("DO $$ BEGIN FOR i IN 1..40 LOOP EXECUTE format('CREATE TYPE t%s AS ENUM (''a'')', i); END LOOP; END $$")
        .await
        .unwrap();
    crate::migrate_while_writing_then_compare(&env, &[APP], OPS, 30).await;
    let oid = |c: tokio_postgres::Client| async move {
        c.query_one("SELECT 'mood'::regtype::oid", &[])
            .await
            .unwrap()
            .get::<_, u32>(0)
    };
    assert_ne!(
        oid(env.source_as(APP).await).await,
        oid(env.target_client().await).await,
        "the OIDs did differ"
    );
}

const SHAPES: &str = r#"
CREATE EXTENSION btree_gist;
CREATE SEQUENCE free_standing START 100 INCREMENT 7;
-- Not called since a setval(..., false): its value is the next nextval's.
CREATE SEQUENCE parked;
SELECT setval('parked', 5000, false);
CREATE TABLE parents (id int PRIMARY KEY, name text, dropped_later int, code text NOT NULL,
                      CONSTRAINT code_unique UNIQUE (code) DEFERRABLE INITIALLY DEFERRED);
ALTER TABLE parents DROP COLUMN dropped_later;
CREATE TABLE children (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                       parent int REFERENCES parents (id) ON DELETE CASCADE DEFERRABLE,
                       qty int CHECK (qty >= 0), note text);
ALTER TABLE children ADD CONSTRAINT note_short CHECK (length(note) < 100) NOT VALID;
CREATE TABLE bookings (id int PRIMARY KEY, room int NOT NULL, during tstzrange NOT NULL,
                       EXCLUDE USING gist (room WITH =, during WITH &&));
CREATE TABLE audit (id bigserial PRIMARY KEY, tbl text NOT NULL, op text NOT NULL, at_seq bigint);
CREATE FUNCTION audit_it() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit (tbl, op, at_seq) VALUES (TG_TABLE_NAME, TG_OP, nextval('free_standing')); RETURN NULL; END $$;
CREATE TRIGGER children_audit AFTER INSERT OR UPDATE OR DELETE ON children FOR EACH ROW EXECUTE FUNCTION audit_it();
CREATE VIEW child_totals AS SELECT parent, sum(qty) AS total FROM children GROUP BY parent;
COMMENT ON TABLE parents IS 'the parents';
COMMENT ON COLUMN children.qty IS 'how many';
COMMENT ON INDEX children_pkey IS 'the key of children';
CREATE TABLE counters (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
INSERT INTO parents SELECT g, 'p' || g, 'c' || g FROM generate_series(1, 200) g;
INSERT INTO children (parent, qty, note) SELECT 1 + g % 200, g % 7, 'n' FROM generate_series(1, 1000) g;
INSERT INTO bookings SELECT g, g % 10, tstzrange('2024-01-01'::timestamptz + g * interval '1 day', '2024-01-01'::timestamptz + (g + 1) * interval '1 day') FROM generate_series(1, 100) g;
INSERT INTO counters (v) SELECT 'c' FROM generate_series(1, 10);
CREATE TABLE groups (id int PRIMARY KEY);
CREATE TABLE members (id int PRIMARY KEY, grp int REFERENCES groups (id));
INSERT INTO groups SELECT g FROM generate_series(1, 5) g;
INSERT INTO members SELECT g, 1 + g % 5 FROM generate_series(1, 20) g;
CREATE MATERIALIZED VIEW parent_names AS SELECT id, upper(name) AS shout FROM parents;
CREATE UNIQUE INDEX parent_names_id ON parent_names (id);
ALTER TABLE children REPLICA IDENTITY USING INDEX children_pkey;
ALTER TABLE parents CLUSTER ON parents_pkey;
ALTER MATERIALIZED VIEW parent_names CLUSTER ON parent_names_id;
ALTER TABLE audit REPLICA IDENTITY FULL;
"#;

const SHAPE_OPS: &[&str] = &[
    "INSERT INTO children (parent, qty, note) VALUES (1 + $N % 99, 1, 'w$N')",
    "UPDATE children SET qty = qty + 1 WHERE id = 1 + $N % 1000",
    // Only parents 100..199 are deleted (with their children, by cascade):
    // parents 1..99 keep theirs, so nothing the test reads ends up empty.
    "DELETE FROM parents WHERE id = 100 + ($N * 13) % 100",
    "BEGIN; UPDATE parents SET code = 'tmp' || id WHERE id IN (2, 3); UPDATE parents SET code = 'c3' WHERE id = 2;
            UPDATE parents SET code = 'c2' WHERE id = 3; COMMIT",
    // The key is named: ON CONFLICT may not use the deferrable unique constraint.
    "INSERT INTO parents VALUES (1000 + $N, 'new', 'n$N') ON CONFLICT (id) DO NOTHING",
    "TRUNCATE counters RESTART IDENTITY; INSERT INTO counters (v) VALUES ('after $N'), ('again')",
    // TRUNCATE ... CASCADE empties members too: each table's own trigger fires.
    "BEGIN; TRUNCATE groups CASCADE; INSERT INTO groups SELECT g FROM generate_series(1, 1 + $N % 5) g;
            INSERT INTO members SELECT g, 1 FROM generate_series(1, $N % 7) g; COMMIT",
    "INSERT INTO bookings VALUES (1000 + $N, 99, tstzrange(now() + $N * interval '1 hour', now() + ($N + 1) * interval '1 hour'))
       ON CONFLICT DO NOTHING",
];

async fn parents(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM parents", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_shapes_arrive_and_nothing_fires_twice() {
    let env = Env::new(crate::BIN).await;
    let app = env.source_as(APP).await;
    app.batch_execute(SHAPES).await.expect("seed the shapes");
    // A unique index whose concurrent build failed is left INVALID; built on
    // the target, it would fail the copy on the same rows. pg_dump skips it.
    app.batch_execute("CREATE UNIQUE INDEX CONCURRENTLY parents_one_name ON parents ((left(name, 1)))")
        .await
        .expect_err("duplicates");
    drop(app);
    // The audit rows on the target are exactly the source's: the trigger did
    // not fire again when the drain applied children's changes.
    crate::migrate_while_writing_then_compare(&env, &[APP, APP], SHAPE_OPS, 100).await;
    let (s, t) = (env.source_as(APP).await, env.target_client().await);
    // A materialized view is refreshed at cutover: the target holds what its
    // query gives on the source now, not the source's older contents.
    let fresh: Option<String> = s
        .query_one(
            "SELECT array_agg(upper(name) ORDER BY id)::text FROM parents",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let refreshed: Option<String> = t
        .query_one("SELECT array_agg(shout ORDER BY id)::text FROM parent_names", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        fresh.is_some(),
        "source parents: {} rows, target: {}",
        parents(&s).await,
        parents(&t).await
    );
    assert_eq!(fresh, refreshed, "the materialized view was refreshed at cutover");
    let invalid = "SELECT count(*) FROM pg_class WHERE relname = 'parents_one_name'";
    let on_source: i64 = s.query_one(invalid, &[]).await.unwrap().get(0);
    let on_target: i64 = t.query_one(invalid, &[]).await.unwrap().get(0);
    assert_eq!((on_source, on_target), (1, 0), "the invalid index stays behind");
    for q in [
        "SELECT array_agg(total ORDER BY parent)::text FROM child_totals",
        "SELECT last_value::text || is_called::text FROM free_standing",
        "SELECT last_value::text || is_called::text FROM parked",
        "SELECT obj_description('parents'::regclass) || col_description('children'::regclass, 3) || obj_description('children_pkey'::regclass)",
        "SELECT string_agg(c.relname::text || ':' || c.relkind::text, ',' ORDER BY c.relname) FROM pg_class c
          WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('v', 'm', 'S')",
        // What pg_dump says along with an index, which the catalog gives too.
        "SELECT string_agg(c.relname::text || ' ' || c.relreplident::text || ' ' || i.relname::text
                           || ' clustered ' || x.indisclustered::text || ' replica ' || x.indisreplident::text,
                           ', ' ORDER BY c.relname, i.relname)
           FROM pg_index x JOIN pg_class c ON c.oid = x.indrelid JOIN pg_class i ON i.oid = x.indexrelid
          WHERE c.relnamespace = 'public'::regnamespace AND x.indisvalid",
        "SELECT string_agg(relname::text || ' ' || relreplident::text, ', ' ORDER BY relname) FROM pg_class
          WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'm')",
    ] {
        let a: Option<String> = s.query_one(q, &[]).await.unwrap().get(0);
        let b: Option<String> = t.query_one(q, &[]).await.unwrap().get(0);
        assert_eq!(a, b, "{q}");
        assert!(a.is_some(), "{q}");
    }
    // After the switch the application's trigger works on the target.
    let before: i64 = t
        .query_one("SELECT count(*) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    t.batch_execute("INSERT INTO children (parent, qty) SELECT min(id), 1 FROM parents")
        .await
        .unwrap();
    let after: i64 = t
        .query_one("SELECT count(*) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_grants_and_default_privileges_follow() {
    let env = crate::seeded().await;
    let su = env.source.superuser("postgres").await.unwrap();
    su.batch_execute(
        "CREATE ROLE reporting NOLOGIN;
         CREATE ROLE app_reader LOGIN PASSWORD 'source-only' IN ROLE reporting;
         CREATE ROLE \"Odd \"\"Role\"\"\" NOLOGIN;
         CREATE ROLE admin_here SUPERUSER NOLOGIN;
         CREATE ROLE replicator REPLICATION LOGIN;",
    )
    .await
    .unwrap();
    env.source_as(APP)
        .await
        .batch_execute(
            "GRANT USAGE ON SCHEMA public TO reporting;
             GRANT SELECT ON accounts, ledger TO reporting;
             GRANT INSERT, UPDATE ON scratch TO \"Odd \"\"Role\"\"\";
             ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO reporting;",
        )
        .await
        .unwrap();
    env.config("[schema]\nrecreate_roles = true\n");
    let out = env.run(&["migrate", "--cutover", "--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let roles = &report["copy"]["roles"];
    let created = roles["created"].to_string();
    for r in ["reporting", "app_reader", "Odd \\\"Role\\\"", "replicator"] {
        assert!(created.contains(r), "{r} recreated: {roles}");
    }
    assert!(
        !created.contains("admin_here") && roles["skipped"].to_string().contains("admin_here"),
        "{roles}"
    );
    assert!(
        roles["need_password"].to_string().contains("app_reader"),
        "{roles}"
    );

    let t = env.target_client().await;
    let yes = |q: &'static str| {
        let t = &t;
        async move { t.query_one(q, &[]).await.unwrap().get::<_, bool>(0) }
    };
    assert!(yes("SELECT has_table_privilege('reporting', 'accounts', 'SELECT')").await);
    assert!(
        yes("SELECT has_table_privilege('app_reader', 'ledger', 'SELECT')").await,
        "membership came along"
    );
    assert!(yes("SELECT has_table_privilege('Odd \"Role\"', 'scratch', 'UPDATE')").await);
    assert!(
        !yes("SELECT has_table_privilege('reporting', 'scratch', 'SELECT')").await,
        "no more than was granted"
    );
    assert!(
        yes("SELECT NOT rolreplication FROM pg_roles WHERE rolname = 'replicator'").await,
        "attributes RDS refuses are dropped"
    );
    assert!(yes("SELECT count(*) = 0 FROM pg_roles WHERE rolname = 'admin_here'").await);
    // Default privileges FOR ROLE app need membership in app, which a
    // non-superuser target role lacks: restored where allowed, else reported.
    let dflt = yes("SELECT count(*) > 0 FROM pg_default_acl").await;
    let warned = report["cutover"]["grant_warnings"].to_string();
    assert!(
        dflt || warned.contains("DEFAULT"),
        "default privileges restored or reported: {warned}"
    );
    assert_same_data(&env).await;
    assert_same_schema(&env).await;
}

/// Row security, policies, rules, extended statistics, comments and grants
/// are read from the source ahead of the fence and restored with it up;
/// one changed after that reading is read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_entries_changed_just_before_the_fence_arrive() {
    let env = crate::synced().await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        "ALTER TABLE accounts ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON accounts USING (true);
         CREATE RULE scratch_gone AS ON DELETE TO scratch DO ALSO NOTIFY scratch_gone;
         CREATE STATISTICS accounts_names ON name, balance FROM accounts;
         COMMENT ON INDEX accounts_pkey IS 'before';",
    )
    .await
    .unwrap();
    let mut agent = env
        .run_until_failpoint(&["cutover"], "cutover.before_fence")
        .await;
    // Read ahead of the fence; now they change.
    app.batch_execute(
        "COMMENT ON INDEX accounts_pkey IS 'after';
         CREATE POLICY late ON accounts FOR SELECT USING (balance >= 0);
         GRANT SELECT ON ledger TO PUBLIC;",
    )
    .await
    .unwrap();
    std::fs::write(env.failpoint_release(), "").unwrap();
    let status = agent.wait().await.expect("the cutover ends");
    assert!(status.success(), "{status}");
    let t = env.target_client().await;
    let on_target = |q: &'static str| {
        let t = &t;
        async move { t.query_one(q, &[]).await.expect(q).get::<_, String>(0) }
    };
    for (q, want) in [
        ("SELECT obj_description('accounts_pkey'::regclass)", "after"),
        (
            "SELECT string_agg(polname, ',' ORDER BY polname) FROM pg_policy",
            "late,own",
        ),
        (
            "SELECT relrowsecurity::text FROM pg_class WHERE oid = 'accounts'::regclass",
            "true",
        ),
        (
            "SELECT string_agg(rulename, ',') FROM pg_rules WHERE tablename = 'scratch'",
            "scratch_gone",
        ),
        (
            "SELECT string_agg(stxname, ',') FROM pg_statistic_ext",
            "accounts_names",
        ),
        (
            "SELECT has_table_privilege('public', 'ledger', 'SELECT')::text",
            "true",
        ),
    ] {
        assert_eq!(on_target(q).await, want, "{q}");
    }
    assert_same_then_clean_up(&env).await;
}

/// `cutover.materialized_views = "after_switch"`: materialized views are
/// refreshed just before the fence rather than with writes blocked, and
/// again after the switch (CONCURRENTLY where a unique index allows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialized_views_can_be_refreshed_around_the_fence_instead_of_under_it() {
    let env = crate::seeded().await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        "CREATE MATERIALIZED VIEW stamp AS SELECT 1 AS id, clock_timestamp() AS at;
         CREATE UNIQUE INDEX ON stamp (id);
         CREATE MATERIALIZED VIEW scratch_count AS SELECT count(*) AS n FROM scratch;",
    )
    .await
    .unwrap();
    env.config("[sync]\npoll_interval_ms = 50\n[cutover]\nmaterialized_views = \"after_switch\"\n");
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    env.ok(&["sync", "--until-caught-up"]).await;
    app.batch_execute("INSERT INTO scratch VALUES (5000, 'late')")
        .await
        .unwrap();
    // Stopped after the switch, before what follows it.
    env.kill_at(&["cutover"], "cutover.before_validate").await;
    let t = env.target_client().await;
    let fenced_at: std::time::SystemTime = app
        .query_one("SELECT fence_raised_at FROM pgferry.run", &[])
        .await
        .unwrap()
        .get(0);
    let stamp = || async {
        t.query_one("SELECT at FROM stamp", &[])
            .await
            .unwrap()
            .get::<_, std::time::SystemTime>(0)
    };
    assert!(
        stamp().await < fenced_at,
        "refreshed before the fence, not under it"
    );
    let report: serde_json::Value = serde_json::from_str(&env.ok(&["cutover", "--json"]).await).unwrap();
    assert_eq!(report["materialized_views_after_switch"], 2, "{report}");
    assert_eq!(
        report["materialized_view_warnings"],
        serde_json::json!([]),
        "{report}"
    );
    assert!(stamp().await > fenced_at, "refreshed again after the switch");
    let rows: i64 = app
        .query_one("SELECT count(*) FROM scratch", &[])
        .await
        .unwrap()
        .get(0);
    let counted: i64 = t
        .query_one("SELECT n FROM scratch_count", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(counted, rows, "the plain refresh, without a unique index");
    // The unique index that lets a refresh be CONCURRENTLY came along.
    assert_same_then_clean_up(&env).await;
}

/// Materialized views are refreshed side by side (`sync.workers`, 2 here),
/// each after the views it reads: directly, through a plain view, or
/// through a function. Under the fence a plain refresh would wait for the
/// lock of a view it reads; after the switch (CONCURRENTLY) it would read
/// that view's rows of before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialized_views_are_refreshed_side_by_side_after_the_views_they_read() {
    for mode in ["fenced", "after_switch"] {
        let env = crate::seeded().await;
        // Created in this order; `slow` ends a second after `quick`, so a
        // view started as soon as a worker is free would start before
        // `slow` ends.
        env.source_as(APP)
            .await
            .batch_execute(
                "CREATE MATERIALIZED VIEW slow AS
                   SELECT clock_timestamp() AS began, pg_sleep(2)::text AS slept, clock_timestamp() AS ended;
                 CREATE MATERIALIZED VIEW quick AS
                   SELECT clock_timestamp() AS began, pg_sleep(1)::text AS slept, clock_timestamp() AS ended;
                 CREATE VIEW slow_ends AS SELECT ended FROM slow;
                 CREATE MATERIALIZED VIEW through_view AS
                   SELECT clock_timestamp() AS began, (SELECT ended FROM slow_ends) AS read;
                 CREATE FUNCTION slow_ended() RETURNS timestamptz LANGUAGE sql STABLE
                   AS 'SELECT ended FROM public.slow';
                 CREATE MATERIALIZED VIEW through_function AS
                   SELECT clock_timestamp() AS began, slow_ended() AS read;
                 CREATE UNIQUE INDEX ON slow (began);
                 CREATE UNIQUE INDEX ON quick (began);
                 CREATE UNIQUE INDEX ON through_view (began);
                 CREATE UNIQUE INDEX ON through_function (began);",
            )
            .await
            .unwrap();
        env.config(&format!("[cutover]\nmaterialized_views = \"{mode}\"\n"));
        env.ok(&["migrate", "--cutover"]).await;
        let t = env.target_client().await;
        let mut spans = std::collections::HashMap::new();
        for view in ["slow", "quick", "through_view", "through_function"] {
            let row = t.query_one(&format!("SELECT * FROM {view}"), &[]).await.unwrap();
            let span: (std::time::SystemTime, Option<std::time::SystemTime>) =
                (row.get(0), row.get(row.len() - 1));
            spans.insert(view, span);
        }
        let (slow, quick) = (spans["slow"], spans["quick"]);
        let slow_ended = slow.1.unwrap();
        assert!(
            quick.0 < slow_ended && slow.0 < quick.1.unwrap(),
            "{mode}: independent views refreshed at once: slow {slow:?}, quick {quick:?}"
        );
        for view in ["through_view", "through_function"] {
            let (began, read) = spans[view];
            assert!(
                began >= slow_ended,
                "{mode}: {view} refreshed after slow: {began:?}, {slow:?}"
            );
            assert_eq!(
                read,
                Some(slow_ended),
                "{mode}: {view} read slow's refreshed rows"
            );
        }
        // Their indexes too: without them a refresh CONCURRENTLY fails.
        assert_same_schema(&env).await;
    }
}

/// Indexes created on the source after the copy (a sync can last days, and
/// someone adds an index meanwhile) are built on the target ahead of the
/// fence, marks included. Before, they never arrived. One a CREATE INDEX
/// CONCURRENTLY left INVALID is not built (as pg_dump would not), but the
/// report names it: it used to go unsaid, and the application found the
/// target without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_created_on_the_source_after_the_copy_arrive() {
    let env = crate::synced().await;
    let app = env.source_as(APP).await;
    for ddl in [
        "CREATE INDEX accounts_name_late ON accounts (name)",
        "CREATE UNIQUE INDEX CONCURRENTLY scratch_v_late ON scratch (id, v)",
        "ALTER TABLE scratch CLUSTER ON scratch_v_late",
    ] {
        app.batch_execute(ddl).await.unwrap();
    }
    app.batch_execute(r#"CREATE UNIQUE INDEX CONCURRENTLY "Accounts one" ON accounts ((1))"#)
        .await
        .expect_err("accounts has more than one row");
    let report: serde_json::Value = serde_json::from_str(&env.ok(&["cutover", "--json"]).await).unwrap();
    assert_eq!(report["indexes_built"], 2, "{report}");
    assert_eq!(
        report["indexes_not_migrated"],
        serde_json::json!([r#""public"."Accounts one" on "public"."accounts""#]),
        "{report}"
    );
    assert_same_then_clean_up(&env).await;
}

/// A table's clustered index and replica identity changed on the source
/// after the copy, unset as well as set, are the target's after the
/// cutover: before, only a newly set one arrived, and the target kept a
/// `CLUSTER ON` or `REPLICA IDENTITY USING INDEX` the source had dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clustered_indexes_and_replica_identities_changed_after_the_copy_arrive() {
    let env = Env::new(crate::BIN).await;
    let app = env.source_as(APP).await;
    app.batch_execute(SHAPES).await.expect("seed the shapes");
    env.config("[sync]\npoll_interval_ms = 50\n");
    // An index a concurrent build left INVALID is not copied, as pg_dump
    // would not, and the copy says so.
    app.batch_execute("CREATE UNIQUE INDEX CONCURRENTLY parents_one ON parents ((1))")
        .await
        .expect_err("parents has more than one row");
    env.ok(&["install"]).await;
    let copied: serde_json::Value = serde_json::from_str(&env.ok(&["copy", "--json"]).await).unwrap();
    assert_eq!(
        copied["indexes_not_migrated"],
        serde_json::json!([r#""public"."parents_one" on "public"."parents""#]),
        "{copied}"
    );
    env.ok(&["sync", "--until-caught-up"]).await;
    app.batch_execute(
        "ALTER TABLE parents SET WITHOUT CLUSTER;
         ALTER MATERIALIZED VIEW parent_names SET WITHOUT CLUSTER;
         ALTER TABLE children REPLICA IDENTITY DEFAULT;
         ALTER TABLE audit REPLICA IDENTITY USING INDEX audit_pkey;
         ALTER TABLE bookings REPLICA IDENTITY NOTHING;
         ALTER TABLE members CLUSTER ON members_pkey;",
    )
    .await
    .unwrap();
    env.ok(&["cutover"]).await;
    let marks = "SELECT string_agg(c.relname::text || ' ' || c.relreplident::text || coalesce(
                          (SELECT ' clustered on ' || i.indexrelid::regclass::text FROM pg_index i
                            WHERE i.indrelid = c.oid AND i.indisclustered), ''), ', ' ORDER BY c.relname)
                   FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'm')";
    let on =
        |c: tokio_postgres::Client| async move { c.query_one(marks, &[]).await.unwrap().get::<_, String>(0) };
    let (theirs, ours) = (on(app).await, on(env.target_client().await).await);
    assert_eq!(
        theirs,
        "audit i, bookings n, children d, counters d, groups d, members d clustered on members_pkey, \
         parent_names d, parents d"
    );
    assert_eq!(theirs, ours);
    assert_same_then_clean_up(&env).await;
}

/// Functions, views and types created on the source after the copy, or a
/// function whose body was replaced (an application deploy during a long
/// sync), would be missing or old on the target after the switch: the
/// cutover creates or replaces them there ahead of the fence, and sets the
/// default changed meanwhile. With `sync.follow_schema_changes = false` it
/// refuses before the fence instead, naming each, until the target has the
/// same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_created_or_replaced_on_the_source_after_the_copy_are_followed_by_the_cutover() {
    let env = crate::synced_with("[sync]\npoll_interval_ms = 50\nfollow_schema_changes = false\n").await;
    let app = env.source_as(APP).await;
    let before = "CREATE FUNCTION fee(amount numeric) RETURNS numeric LANGUAGE sql IMMUTABLE AS 'SELECT amount * 0.01';
                  CREATE FUNCTION legacy() RETURNS int LANGUAGE sql AS 'SELECT 1';";
    app.batch_execute(before).await.unwrap();
    // The copy happens again, so fee() is on the target as it was then.
    env.target_client().await.batch_execute(before).await.unwrap();
    let deploy = "CREATE OR REPLACE FUNCTION fee(amount numeric) RETURNS numeric LANGUAGE sql IMMUTABLE
                    AS 'SELECT amount * 0.02';
                  CREATE TYPE tier AS ENUM ('free', 'paid');
                  CREATE VIEW rich AS SELECT id, fee(balance) FROM accounts WHERE balance > 100;
                  ALTER TABLE scratch ALTER COLUMN v SET DEFAULT 'new';";
    app.batch_execute(deploy).await.unwrap();
    app.batch_execute("DROP FUNCTION legacy()").await.unwrap();
    let err = env.fails(&["cutover"], 1).await;
    assert!(err.contains("the fence was never raised"), "{err}");
    for what in [
        "FUNCTION public.fee(numeric) (changed since the copy)",
        "TABLE public.scratch (changed since the copy; source: `v text DEFAULT 'new'::text`; target: `v text`)",
        "TYPE public.tier (created since the copy)",
        "VIEW public.rich (created since the copy)",
    ] {
        assert!(err.contains(what), "{what}: {err}");
    }
    assert!(!crate::fence_is_up(&env).await);
    assert!(
        !err.contains("legacy"),
        "only on the target is not refused: {err}"
    );
    assert!(!err.contains("0.02"), "a routine's code is not shown: {err}");
    env.config("[sync]\npoll_interval_ms = 50\n");
    let report: serde_json::Value = serde_json::from_str(&env.ok(&["cutover", "--json"]).await).unwrap();
    assert_eq!(
        report["schema_only_on_target"],
        serde_json::json!(["FUNCTION public.legacy()"])
    );
    let followed = report["schema_changes_followed"].to_string();
    for what in [
        "table public.scratch: column v SET DEFAULT 'new'::text",
        "TYPE public.tier created",
        "VIEW public.rich created",
        "FUNCTION public.fee(numeric) replaced",
    ] {
        assert!(followed.contains(what), "{what}: {report}");
    }
    env.target_client()
        .await
        .batch_execute("DROP FUNCTION legacy()")
        .await
        .unwrap();
    assert_same_then_clean_up(&env).await;
}

/// A column's type widened on the source during the sync (`integer` to
/// `bigint`, as ids near 2^31) is widened on the target by sync itself,
/// nothing copied; a change that is no widening (a `numeric` scale moved,
/// which the target would round to without a word) stops sync naming the
/// statement for the target, and once it is run there, sync goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_widened_on_the_source_is_followed_and_another_type_change_named() {
    let env = crate::synced().await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        "ALTER TABLE codes ALTER COLUMN n TYPE bigint;
         UPDATE codes SET n = 3000000000 WHERE code = 'code-1';",
    )
    .await
    .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&env.ok(&["sync", "--until-caught-up", "--json"]).await).unwrap();
    assert_eq!(
        report["schema_changes_followed"],
        serde_json::json!(["table public.codes: column n widened to bigint"]),
        "{report}"
    );
    assert_same_rows(&env).await;

    app.batch_execute("ALTER TABLE ledger ALTER COLUMN amount TYPE numeric(16,4)")
        .await
        .unwrap();
    let err = env.fails(&["sync", "--until-caught-up"], 3).await;
    let fix = r#"ALTER TABLE "public"."ledger" ALTER COLUMN "amount" TYPE numeric(16,4)"#;
    assert!(err.contains(fix), "{err}");
    env.target_client().await.batch_execute(fix).await.unwrap();
    app.batch_execute("UPDATE ledger SET amount = amount + 0.0001 WHERE seq = 1")
        .await
        .unwrap();
    env.ok(&["sync", "--until-caught-up"]).await;
    assert_same_rows(&env).await;
}

/// A value added to an enum type on the source after the copy (an
/// application deploy) makes the target refuse the rows that use it: sync
/// adds the values there in their place and goes on, nothing copied; with
/// `sync.follow_schema_changes = false` it stops saying which values, with
/// the statements that add them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enum_value_added_on_the_source_is_followed() {
    let env = Env::new(crate::BIN).await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        "CREATE TYPE state AS ENUM ('new', 'done');
         CREATE TABLE jobs (id int PRIMARY KEY, s state);
         INSERT INTO jobs VALUES (1, 'new');",
    )
    .await
    .unwrap();
    env.config("[sync]\npoll_interval_ms = 50\nfollow_schema_changes = false\n");
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    env.ok(&["sync", "--until-caught-up"]).await;
    for ddl in [
        "ALTER TYPE state ADD VALUE 'failed'",
        "ALTER TYPE state ADD VALUE 'queued' BEFORE 'new'",
        "INSERT INTO jobs VALUES (2, 'failed'), (3, 'queued')",
    ] {
        app.batch_execute(ddl).await.unwrap();
    }
    let err = env.fails(&["sync", "--until-caught-up"], 3).await;
    let fix = [
        "ALTER TYPE public.state ADD VALUE 'queued' BEFORE 'new'",
        "ALTER TYPE public.state ADD VALUE 'failed' AFTER 'done'",
    ];
    for stmt in fix {
        assert!(err.contains(stmt), "{stmt}: {err}");
    }
    env.config("[sync]\npoll_interval_ms = 50\n");
    let report: serde_json::Value =
        serde_json::from_str(&env.ok(&["sync", "--until-caught-up", "--json"]).await).unwrap();
    for stmt in fix {
        assert!(
            report["schema_changes_followed"].to_string().contains(stmt),
            "{stmt}: {report}"
        );
    }
    env.ok(&["cutover"]).await;
    assert_same_data(&env).await;
    let order = "SELECT array_agg(enumlabel::text ORDER BY enumsortorder) FROM pg_enum WHERE enumtypid = 'state'::regtype";
    let labels = |c: tokio_postgres::Client| async move {
        c.query_one(order, &[]).await.unwrap().get::<_, Vec<String>>(0)
    };
    assert_eq!(
        labels(env.source_as(APP).await).await,
        labels(env.target_client().await).await
    );
}

/// Tables, indexes and materialized views in a tablespace of the source's
/// own: the target (Aurora has none, RDS only its own) gets them in its
/// default tablespace, and check says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_in_a_tablespace_land_in_the_targets_default_one() {
    use std::os::unix::fs::MetadataExt;
    let env = crate::seeded().await;
    let location = env.path("fast_disk");
    std::fs::create_dir(&location).unwrap();
    let owner = std::fs::metadata(env.source.data_dir()).unwrap();
    std::os::unix::fs::chown(&location, Some(owner.uid()), Some(owner.gid())).unwrap();
    let su = env.source.superuser(DB).await.unwrap();
    su.batch_execute(&format!(
        "CREATE TABLESPACE fast_disk LOCATION '{}'",
        location.display()
    ))
    .await
    .unwrap();
    su.batch_execute("GRANT CREATE ON TABLESPACE fast_disk TO app")
        .await
        .unwrap();
    env.source_as(APP)
        .await
        .batch_execute(
            "CREATE TABLE hot (id int PRIMARY KEY USING INDEX TABLESPACE fast_disk, v text) TABLESPACE fast_disk;
             CREATE INDEX hot_v ON hot (v) TABLESPACE fast_disk;
             INSERT INTO hot SELECT g, 'h' || g FROM generate_series(1, 100) g;
             CREATE MATERIALIZED VIEW hot_count TABLESPACE fast_disk AS SELECT count(*) FROM hot;
             CREATE TABLE slots (id int PRIMARY KEY, r int4range,
                                 EXCLUDE USING gist (r WITH &&) USING INDEX TABLESPACE fast_disk);
             INSERT INTO slots VALUES (1, '[1,5)'), (2, '[5,9)');
             ALTER TABLE scratch SET TABLESPACE fast_disk;",
        )
        .await
        .unwrap();
    let out = env.run(&["check"]).await;
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(report.contains("tablespace fast_disk"), "{report}");
    // A superuser's session left open would hold the fence after the
    // switch (it could write), as an application's would.
    drop(su);
    let out = env.run(&["migrate", "--cutover"]).await;
    assert_succeeded(&out, "migrate --cutover");
    assert_same_data(&env).await;
    let t = env.target_client().await;
    let elsewhere: i64 = t
        .query_one("SELECT count(*) FROM pg_class WHERE reltablespace <> 0 AND relnamespace = 'public'::regnamespace", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(elsewhere, 0);
    let indexes: i64 = t
        .query_one("SELECT count(*) FROM pg_indexes WHERE tablename = 'hot'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(indexes, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_to_missing_roles_are_reported_not_fatal() {
    let env = crate::seeded().await;
    env.source
        .superuser("postgres")
        .await
        .unwrap()
        .batch_execute("CREATE ROLE auditor NOLOGIN")
        .await
        .unwrap();
    env.source_as(APP)
        .await
        .batch_execute("GRANT SELECT ON accounts TO auditor")
        .await
        .unwrap();
    let out = env.run(&["migrate", "--cutover", "--json"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "a grant to a role the target lacks does not stop the cutover"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings = report["cutover"]["grant_warnings"].to_string();
    assert!(warnings.contains("TO auditor"), "{warnings}");
    // The seed also grants to writer2, which the target lacks too: each
    // failure is its own, and grants to existing roles are not lost with it.
    assert!(warnings.contains("TO writer2"), "{warnings}");
    assert_same_data(&env).await;
}

const LOG_OPS: &[&str] = &[
    "INSERT INTO event_log (msg) VALUES ('w$N'), ('w$N again')",
    "DELETE FROM event_log WHERE msg = 'seed ' || ($N % 500)",
    "UPDATE event_log SET msg = msg || '!' WHERE msg = 'seed ' || ($N % 700)",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_tables_listed_copy_only_move_under_the_fence() {
    let env = crate::seeded().await;
    env.source_as(APP)
        .await
        .batch_execute(
            "CREATE TABLE event_log (at timestamptz NOT NULL DEFAULT clock_timestamp(), msg text);
             INSERT INTO event_log (msg) SELECT 'seed ' || g FROM generate_series(1, 2000) g;
             GRANT SELECT, INSERT, UPDATE, DELETE ON event_log TO writer2;",
        )
        .await
        .unwrap();
    let out = env.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("list it under copy_only"));

    let (started, release) = (env.path("switch-started"), env.path("release"));
    env.config(&format!(
        "copy_only = [\"public.event_log\"]\n[sync]\npoll_interval_ms = 50\n[cutover]\nswitch_command = '''{}'''\n",
        gated_switch(&started, &release)
    ));
    let out = env.run(&["check", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "listed, it is a warning");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["copy_only"][0]["table"], "public.event_log");
    assert!(
        report["copy_only"][0]["estimated_blocked_secs"].as_f64() > Some(0.0),
        "{report}"
    );
    assert!(report.to_string().contains("write downtime"));
    // A cutover that keeps the copy's rate limit copies it no faster.
    let out = env
        .cmd(&["check", "--json"])
        .env("PGFERRY_CUTOVER__RATE_LIMITED", "true")
        .env("PGFERRY_COPY__RATE_BYTES_PER_SEC", "1000")
        .output()
        .await
        .unwrap();
    let limited: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes = limited["copy_only"][0]["bytes"].as_f64().unwrap();
    assert_eq!(
        limited["copy_only"][0]["estimated_blocked_secs"].as_f64(),
        Some(bytes / 1000.0),
        "{limited}"
    );

    let writers = Workload::start(&env, &[APP], crate::OPS).await;
    let loggers = Workload::start(&env, &[WRITER], LOG_OPS).await;
    writers.progress(50).await;
    loggers.progress(50).await;
    let out = env
        .cutover_while_writing(&["migrate", "--cutover", "--json"], &[&writers, &loggers])
        .await;
    assert_eq!(out.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["cutover"]["copied_under_fence"]
            .to_string()
            .contains("public.event_log"),
        "{report}"
    );
    writers.stop().await;
    loggers.stop().await;
    assert_same_data(&env).await;
    assert_same_schema(&env).await;
    assert_no_leftovers(&env).await;
}

const PARTITIONS: &str = r#"
CREATE TABLE devices (id int PRIMARY KEY, name text);
CREATE TABLE readings (device int NOT NULL REFERENCES devices (id), at date NOT NULL, v numeric, note text,
                       PRIMARY KEY (device, at)) PARTITION BY RANGE (at);
CREATE TABLE readings_2023 PARTITION OF readings FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE readings_2024 PARTITION OF readings FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')
    PARTITION BY RANGE (device);
CREATE TABLE readings_2024_lo PARTITION OF readings_2024 FOR VALUES FROM (MINVALUE) TO (50);
CREATE TABLE readings_2024_hi PARTITION OF readings_2024 FOR VALUES FROM (50) TO (MAXVALUE);
CREATE TABLE readings_other PARTITION OF readings DEFAULT;
CREATE INDEX readings_v_idx ON readings (v);
CREATE INDEX readings_2023_note_idx ON readings_2023 (note);
INSERT INTO devices SELECT g, 'd' || g FROM generate_series(1, 100) g;
-- Attached, not made a partition: its columns in another order, one dropped.
CREATE TABLE readings_2022 (note text, dropped int, v numeric, at date NOT NULL, device int NOT NULL);
ALTER TABLE readings_2022 DROP COLUMN dropped;
-- A key named its own way, adopted by the root's when attached.
ALTER TABLE readings_2022 ADD CONSTRAINT r22_key PRIMARY KEY (device, at);
ALTER TABLE readings ATTACH PARTITION readings_2022 FOR VALUES FROM ('2022-01-01') TO ('2023-01-01');
INSERT INTO readings SELECT 1 + g % 100, date '2022-01-01' + (g % 300), g, 'old' FROM generate_series(1, 500) g
    ON CONFLICT DO NOTHING;
INSERT INTO readings SELECT 1 + g % 100, date '2023-01-01' + (g % 900), g, 'seed' FROM generate_series(1, 5000) g
    ON CONFLICT DO NOTHING;
"#;

/// A source seeded with [`PARTITIONS`].
async fn partitioned() -> Env {
    let env = Env::new(crate::BIN).await;
    env.source_as(APP)
        .await
        .batch_execute(PARTITIONS)
        .await
        .expect("seed partitions");
    env
}

const PARTITION_OPS: &[&str] = &[
    // Through the root, moving rows to another partition (2023 -> 2024 -> default).
    "UPDATE readings SET at = at + 400 WHERE device = 1 + $N % 100
        AND at = (SELECT min(at) FROM readings WHERE device = 1 + $N % 100)",
    "INSERT INTO readings VALUES (1 + $N % 100, date '2023-01-01' + ($N % 1200), $N, 'root') ON CONFLICT DO NOTHING",
    // Straight at partitions.
    "INSERT INTO readings_2023 VALUES (1 + $N % 100, date '2023-06-01' + ($N % 100), $N, 'leaf') ON CONFLICT DO NOTHING",
    "DELETE FROM readings_2024_hi WHERE device = 50 + $N % 50 AND v < $N",
    "UPDATE readings SET v = v + 1 WHERE device = 1 + ($N * 7) % 100",
    "TRUNCATE readings_other",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_arrive_with_rows_moving_between_partitions() {
    let env = partitioned().await;
    let out = env.run(&["check"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "declarative partitioning is supported"
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("partitioned tables (public.readings)")
            && report.contains("sync repeats on the target a partition created")
            && report.contains(
                "keep partition maintenance (run_maintenance, cron jobs) from running during the cutover"
            ),
        "partition maintenance is warned about: {report}"
    );
    crate::migrate_while_writing_then_compare(&env, &[APP, APP], PARTITION_OPS, 100).await;
    // Every partition holds exactly the source's rows (each row once), and
    // the hierarchy is the same.
    let (s, t) = (env.source_as(APP).await, env.target_client().await);
    for q in [
        "SELECT string_agg(tableoid::regclass::text || ':' || n, ',' ORDER BY tableoid::regclass::text)
           FROM (SELECT tableoid, count(*) AS n FROM readings GROUP BY tableoid) x",
        "SELECT string_agg(inhrelid::regclass::text || '<' || inhparent::regclass::text, ',' ORDER BY inhrelid::regclass::text)
           FROM pg_inherits WHERE inhrelid::regclass::text LIKE 'readings%'",
    ] {
        let a: Option<String> = s.query_one(q, &[]).await.unwrap().get(0);
        let b: Option<String> = t.query_one(q, &[]).await.unwrap().get(0);
        assert_eq!(a, b, "{q}");
    }
}

/// `cutover.verify = "changed"` with partitions: a partitioned table and its
/// partitions are verified ahead of the fence in one snapshot, while rows
/// move between partitions through the root, partitions are written
/// directly and one is truncated over and over; with the fence up only
/// their changed rows are compared (a truncated partition in full).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_are_verified_by_their_changes_while_written() {
    let env = partitioned().await;
    let cutover = &crate::migrate_verifying_changes_while_writing(&env, &[APP, APP], PARTITION_OPS).await;
    assert_eq!(
        cutover["verified_ahead"], 6,
        "devices and the five partitions holding rows: {cutover}"
    );
    assert_eq!(
        cutover["tables_verified_by_changes"], 2,
        "devices, and readings with its partitions: {cutover}"
    );
    assert_same_data(&env).await;
    assert_same_schema(&env).await;
    assert_no_leftovers(&env).await;
}

/// The rows of a partitioned table change through its root, through a
/// partitioned partition and through a leaf, each firing only its own
/// capture: a difference in any of them is found, ahead of the fence and
/// with it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_changed_finds_a_difference_in_a_partition_whichever_table_a_statement_named() {
    let env = partitioned().await;
    let app = env.source_as(APP).await;
    env.config("[sync]\npoll_interval_ms = 50\n[cutover]\nverify = \"changed\"\n");
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    env.ok(&["sync", "--until-caught-up"]).await;
    let target = env.target_client().await;
    // The first row of a partition, the same on both sides while synced.
    let first = |leaf: &str| format!("(device, at) = (SELECT device, at FROM {leaf} ORDER BY 1, 2 LIMIT 1)");
    let key = |leaf: &'static str| {
        let app = &app;
        async move {
            let sql = format!("SELECT ROW(device, at)::text FROM {leaf} ORDER BY device, at LIMIT 1");
            app.query_one(&sql, &[]).await.expect(&sql).get::<_, String>(0)
        }
    };

    // Ahead of the fence: a row the target lost, in a partition of a
    // partition.
    let lost = key("readings_2024_hi").await;
    target
        .batch_execute(&format!(
            "DELETE FROM readings_2024_hi WHERE {}",
            first("readings_2024_hi")
        ))
        .await
        .unwrap();
    let err = env.fails(&["cutover"], 1).await;
    assert!(err.contains("the fence was never raised"), "{err}");
    assert!(err.contains(&format!("key {lost} missing on target")), "{err}");
    assert!(!crate::fence_is_up(&env).await);
    // The source rewrites it through the root.
    app.batch_execute(&format!(
        "UPDATE readings SET note = 'again' WHERE {}",
        first("readings_2024_hi")
    ))
    .await
    .unwrap();
    env.ok(&["sync", "--until-caught-up"]).await;

    // Verified ahead, then the agent stops before the fence.
    env.kill_at(&["cutover"], "cutover.before_fence").await;
    // Rows change through the root, through a partitioned partition and
    // through a leaf; once drained, each goes wrong on the target.
    let changed = [
        ("readings", "readings_2023"),
        ("readings_2024", "readings_2024_lo"),
        ("readings_other", "readings_other"),
    ];
    for (named, leaf) in changed {
        app.batch_execute(&format!(
            "UPDATE {named} SET note = 'later' WHERE {}",
            first(leaf)
        ))
        .await
        .unwrap();
    }
    env.ok(&["sync", "--until-caught-up"]).await;
    for (_, leaf) in changed {
        target
            .batch_execute(&format!("UPDATE {leaf} SET v = -1 WHERE {}", first(leaf)))
            .await
            .unwrap();
    }
    let out = env.run(&["cutover"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("writes resumed on the source"), "{err}");
    assert!(err.contains("changed rows"), "{err}");
    for (_, leaf) in changed {
        let k = key(leaf).await;
        assert!(err.contains(&format!("key {k} differs")), "{leaf}: {err}");
    }
    assert!(!crate::fence_is_up(&env).await);

    // The source rewrites them; a partition truncated since is compared in
    // full, the rest by their changes, and the cutover ends equal.
    for (named, leaf) in changed {
        app.batch_execute(&format!(
            "UPDATE {named} SET note = 'fixed' WHERE {}",
            first(leaf)
        ))
        .await
        .unwrap();
    }
    app.batch_execute(
        "BEGIN; TRUNCATE readings_other; INSERT INTO readings VALUES (1, '2030-01-01', 1, 'after'); COMMIT;",
    )
    .await
    .unwrap();
    let report: serde_json::Value = serde_json::from_str(&env.ok(&["cutover", "--json"]).await).unwrap();
    assert_eq!(
        report["verified_ahead"], 0,
        "the ledgers outlived the aborts: {report}"
    );
    assert_eq!(
        report["tables_verified_by_changes"], 2,
        "devices, and readings with its partitions: {report}"
    );
    assert_eq!(
        report["tables_verified"], 3,
        "and readings_other in full: {report}"
    );
    assert_same_data(&env).await;
    env.ok(&["cleanup"]).await;
    assert_no_leftovers(&env).await;
}

const INHERITANCE: &str = r#"
CREATE TABLE vehicles (id int PRIMARY KEY, name text NOT NULL, wheels int);
CREATE TABLE cars (doors int) INHERITS (vehicles);
ALTER TABLE cars ADD PRIMARY KEY (id);
CREATE TABLE trucks (payload numeric) INHERITS (vehicles);
ALTER TABLE trucks ADD PRIMARY KEY (id);
CREATE TABLE pickups (bed_len numeric) INHERITS (trucks);
ALTER TABLE pickups ADD PRIMARY KEY (id);
INSERT INTO vehicles SELECT g, 'v' || g, 2 FROM generate_series(1, 300) g;
INSERT INTO cars SELECT g, 'c' || g, 4, 4 FROM generate_series(1001, 1300) g;
INSERT INTO trucks SELECT g, 't' || g, 6, g FROM generate_series(2001, 2300) g;
INSERT INTO pickups SELECT g, 'p' || g, 4, 1, 2 FROM generate_series(3001, 3100) g;
"#;

const INHERITANCE_OPS: &[&str] = &[
    // Through the parent: changes rows of every level, fires only its triggers.
    "UPDATE vehicles SET wheels = wheels + 1 WHERE id % 97 = $N % 97",
    "DELETE FROM vehicles WHERE id = 1000 + ($N * 7) % 300",
    "UPDATE vehicles SET id = id + 100000 WHERE id = 3001 + ($N * 3) % 100",
    "UPDATE ONLY vehicles SET name = name || '.' WHERE id = 1 + $N % 300",
    // Straight at the children.
    "INSERT INTO cars VALUES (5000 + $N, 'new', 4, 2) ON CONFLICT DO NOTHING",
    "UPDATE trucks SET payload = payload + 1 WHERE id = 2001 + $N % 300",
    "BEGIN; TRUNCATE pickups; INSERT INTO pickups SELECT g, 'p', 4, 1, 2 FROM generate_series(3001, 3000 + $N % 50) g; COMMIT",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inheritance_hierarchies_arrive_with_changes_made_through_the_parent() {
    let env = Env::new(crate::BIN).await;
    env.source_as(APP)
        .await
        .batch_execute(INHERITANCE)
        .await
        .expect("seed the hierarchy");
    let out = env.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(0), "classic inheritance is supported");
    // Every table compared with ONLY: each row is where the source has it.
    crate::migrate_while_writing_then_compare(&env, &[APP, APP], INHERITANCE_OPS, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiple_inheritance_is_refused_with_a_reason() {
    let env = Env::new(crate::BIN).await;
    env.source_as(APP)
        .await
        .batch_execute(
            "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);
             CREATE TABLE ab () INHERITS (a, b); ALTER TABLE ab ADD PRIMARY KEY (id);",
        )
        .await
        .unwrap();
    let out = env.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("public.ab") && text.contains("more than one parent"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_are_copied_under_the_fence_when_enabled() {
    let env = crate::seeded().await;
    env.source_as(APP)
        .await
        .batch_execute(
            "SELECT lo_from_bytea(0, decode(repeat('ab', 50000), 'hex')) FROM generate_series(1, 3);
             SELECT lo_from_bytea(424242, convert_to('fixed oid ✓', 'UTF8'));",
        )
        .await
        .unwrap();
    let out = env.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(1), "refused unless enabled");
    assert!(String::from_utf8_lossy(&out.stdout).contains("large_objects = true"));
    let (started, release) = (env.path("switch-started"), env.path("release"));
    env.config(&format!(
        "large_objects = true\n[sync]\npoll_interval_ms = 50\n[cutover]\nswitch_command = '''{}'''\n",
        gated_switch(&started, &release)
    ));
    let out = env.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot be fenced"));
    let writers = Workload::start(&env, &[APP], crate::OPS).await;
    writers.progress(30).await;
    let out = env
        .cutover_while_writing(&["migrate", "--cutover", "--json"], &[&writers])
        .await;
    assert_eq!(out.status.code(), Some(0));
    writers.stop().await;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["cutover"]["large_objects"]["copied"], 4, "{report}");
    let q = "SELECT string_agg(oid::text || ':' || md5(lo_get(oid)), ',' ORDER BY oid) FROM pg_largeobject_metadata";
    let a: String = env.source_as(APP).await.query_one(q, &[]).await.unwrap().get(0);
    let b: String = env.target_client().await.query_one(q, &[]).await.unwrap().get(0);
    assert_eq!(a, b);
    assert!(a.contains("424242:"), "OIDs are kept: {a}");
    assert_same_data(&env).await;
    assert_same_schema(&env).await;
}

/// Row security FORCEd on its owner while syncing hides rows from
/// pgferry's role: its sessions run with `row_security = off`, so the
/// drain stops with PostgreSQL's reason instead of taking the hidden rows
/// for deleted ones and deleting them on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_security_forced_while_syncing_stops_the_drain_instead_of_deleting_what_it_hides() {
    let env = crate::synced().await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        "UPDATE accounts SET balance = balance + 1 WHERE id <= 10;
         ALTER TABLE accounts ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
         CREATE POLICY even ON accounts USING (id % 2 = 0);",
    )
    .await
    .unwrap();
    let err = env.fails(&["sync", "--until-caught-up"], 3).await;
    assert!(err.contains("row-level security"), "{err}");
    let odd_on_target = "SELECT count(*) = 5 FROM accounts WHERE id <= 10 AND id % 2 = 1";
    assert!(crate::target_has(&env, odd_on_target).await, "hidden rows kept");
    app.batch_execute("ALTER TABLE accounts NO FORCE ROW LEVEL SECURITY")
        .await
        .unwrap();
    env.ok(&["sync", "--until-caught-up"]).await;
    assert_same_rows(&env).await;
}

/// With a role that has BYPASSRLS, a table that FORCEs row security on its
/// owner migrates whole: the target gets its policies and both switches
/// only after the verification, a cutover resumed after restoring them
/// switches them off again first (its verification reads as the owner),
/// and materialized views are refreshed through the policies, as a plain
/// REFRESH by their owner would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_security_forced_on_the_owner_arrives_and_a_resumed_cutover_verifies_every_row() {
    let env = crate::seeded().await;
    env.source_superuser("ALTER ROLE app BYPASSRLS").await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        "ALTER TABLE accounts ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
         CREATE POLICY even ON accounts USING (id % 2 = 0);
         CREATE MATERIALIZED VIEW account_ids AS SELECT id FROM accounts;",
    )
    .await
    .unwrap();
    drop(app);
    // Every row verified with the fence up, through the policies' switch.
    env.config("[sync]\npoll_interval_ms = 50\n[cutover]\nverify = \"full\"\n");
    env.kill_at(&["migrate", "--cutover"], "cutover.after_objects")
        .await;
    assert!(
        crate::target_has(
            &env,
            "SELECT relrowsecurity AND relforcerowsecurity FROM pg_class WHERE oid = 'accounts'::regclass"
        )
        .await
    );
    let out = env.run(&["migrate", "--cutover", "--json"]).await;
    assert_succeeded(&out, "the resumed migrate --cutover");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["cutover"]["rows_verified"],
        3000 + 9000 + 1000 + 1000 + 100 + 500 + 500
    );
    let t = env.target.superuser(DB).await.unwrap();
    let row = t
        .query_one(
            "SELECT c.relrowsecurity AND c.relforcerowsecurity,
                    (SELECT string_agg(polname, ',') FROM pg_policy WHERE polrelid = c.oid),
                    (SELECT count(*) FROM account_ids),
                    (SELECT count(*) FROM account_ids WHERE id % 2 = 1)
               FROM pg_class c WHERE c.oid = 'accounts'::regclass",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "row security enabled and forced");
    assert_eq!(row.get::<_, String>(1), "even");
    assert_eq!(
        (row.get::<_, i64>(2), row.get::<_, i64>(3)),
        (1500, 0),
        "refreshed through the policy"
    );
    // PostgreSQL validates a foreign key as the owner, through the policies
    // of a table that FORCEs them: it stays NOT VALID, with the way out,
    // which works.
    assert_eq!(
        report["cutover"]["unvalidated_foreign_keys"],
        serde_json::json!(["public.ledger.ledger_account_id_fkey"])
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("NO FORCE ROW LEVEL SECURITY"), "{log}");
    env.target_client()
        .await
        .batch_execute(
            "BEGIN;
             ALTER TABLE accounts NO FORCE ROW LEVEL SECURITY;
             ALTER TABLE ledger VALIDATE CONSTRAINT ledger_account_id_fkey;
             ALTER TABLE accounts FORCE ROW LEVEL SECURITY;
             COMMIT;",
        )
        .await
        .unwrap();
    assert_same_then_clean_up(&env).await;
}

/// The JSON report `agent` (SIGTERMed, its stdout piped) printed as it
/// stopped, once it has exited 0.
async fn report_after_sigterm(agent: &mut tokio::process::Child) -> serde_json::Value {
    use tokio::io::AsyncReadExt;
    crate::faults::exits_ok_within(agent, 60).await;
    let mut stdout = String::new();
    agent
        .stdout
        .take()
        .expect("stdout piped")
        .read_to_string(&mut stdout)
        .await
        .unwrap();
    serde_json::from_str(&stdout).expect("sync's JSON report")
}

/// Partition maintenance as pg_partman does it, while the application
/// writes and sync runs: a partition made of rows moved out of the default
/// one (attached with a key of its own name), a partition created ahead and
/// written at once, directly and through the root, an old one detached and
/// kept, another dropped. Sync repeats each on the target, captures and
/// copies what it brings, and drains on; the cutover then finds both sides
/// the same, partition by partition and in pg_dump's eyes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_maintenance_while_syncing_is_followed_on_the_target() {
    let env = partitioned().await;
    crate::gated_config(&env);
    // Captured and copied as a table of its own, attached while syncing.
    env.source_as(APP)
        .await
        .batch_execute(
            "CREATE TABLE readings_2026 (LIKE readings INCLUDING ALL);
             INSERT INTO readings_2026 SELECT 1 + g % 100, date '2026-06-01' + g % 100, g, 'to attach'
               FROM generate_series(1, 300) g ON CONFLICT DO NOTHING",
        )
        .await
        .unwrap();
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    let writers = Workload::start(&env, &[APP, APP], PARTITION_OPS).await;
    let mut agent = env
        .cmd(&["sync", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start sync");
    writers.progress(50).await;
    env.source_as(APP)
        .await
        .batch_execute(
            "BEGIN;
             -- No writer may put a 2025 row there before the attach (as it takes anyway).
             LOCK TABLE readings_other IN ACCESS EXCLUSIVE MODE;
             CREATE TABLE readings_2025 (LIKE readings);
             ALTER TABLE readings_2025 ADD CONSTRAINT r25_key PRIMARY KEY (device, at);
             WITH moved AS (DELETE FROM readings_other WHERE at >= '2025-01-01' AND at < '2026-01-01' RETURNING *)
             INSERT INTO readings_2025 SELECT * FROM moved;
             ALTER TABLE readings ATTACH PARTITION readings_2025 FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
             COMMIT;
             CREATE TABLE readings_2027 PARTITION OF readings FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
             INSERT INTO readings_2027 VALUES (1, '2027-03-03', 1, 'straight in');
             INSERT INTO readings VALUES (2, '2027-04-04', 2, 'through the root');
             ALTER TABLE readings DETACH PARTITION readings_2022;
             INSERT INTO readings_2022 (device, at, v, note) VALUES (1, '2022-05-05', 1, 'after detach');
             DROP TABLE readings_2024_lo;
             UPDATE readings_2026 SET v = -v WHERE device < 10;
             ALTER TABLE readings ATTACH PARTITION readings_2026 FOR VALUES FROM ('2026-06-01') TO ('2027-01-01');",
        )
        .await
        .expect("partition maintenance");
    // The hierarchy and its indexes, by name, as each side has them.
    let shape = "SELECT string_agg(x, ',' ORDER BY x) FROM (
                   SELECT inhrelid::regclass::text || '<' || inhparent::regclass::text AS x FROM pg_inherits
                    WHERE inhrelid::regclass::text LIKE 'readings%'
                   UNION ALL
                   SELECT indexrelid::regclass::text || ' on ' || indrelid::regclass::text FROM pg_index
                    WHERE indrelid::regclass::text LIKE 'readings%') s";
    let source_shape: String = env
        .source_as(APP)
        .await
        .query_one(shape, &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        source_shape.contains("r25_key on readings_2025"),
        "{source_shape}"
    );
    // Followed to the end: every table captured again copied, the
    // dropped one forgotten, and sync draining.
    let followed = [
        "devices",
        "readings",
        "readings_2022",
        "readings_2023",
        "readings_2024",
        "readings_2024_hi",
        "readings_2025",
        "readings_2026",
        "readings_2027",
        "readings_other",
    ]
    .map(|t| format!("public.{t}"));
    wait_for("sync to follow", std::time::Duration::from_secs(120), || async {
        let status = env.status().await;
        let tables = status["tables"].as_array().cloned().unwrap_or_default();
        let mut names: Vec<String> = tables
            .iter()
            .map(|t| t["table"].as_str().unwrap_or_default().to_string())
            .collect();
        names.sort();
        (status["phase"] == "syncing"
            && names == followed
            && tables.iter().all(|t| t["copy_state"] == "done"))
        .then_some(())
    })
    .await;
    let target_shape: Option<String> = env
        .target_client()
        .await
        .query_one(shape, &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(target_shape.as_deref(), Some(source_shape.as_str()));
    // The drain goes on, through the new partition too.
    wait_for(
        "a row written through the root",
        std::time::Duration::from_secs(60),
        || async {
            crate::target_has(
                &env,
                "SELECT count(*) = 1 FROM readings_2027 WHERE note = 'through the root'",
            )
            .await
            .then_some(())
        },
    )
    .await;
    writers.progress(50).await;
    crate::faults::sigterm(&agent);
    let report = report_after_sigterm(&mut agent).await;
    let followed = report["partitions_followed"].to_string();
    for change in [
        "partition public.readings_2025 attached",
        "partition public.readings_2027 attached",
        "partition public.readings_2022 detached",
        "partition public.readings_2024_lo dropped",
        "partition public.readings_2026 attached",
    ] {
        assert!(followed.contains(change), "{change}: {report}");
    }
    let out = env.cutover_while_writing(&["cutover"], &[&writers]).await;
    assert_succeeded(&out, "cutover");
    writers.stop().await;
    assert_same_then_clean_up(&env).await;
    assert_no_leftovers(&env).await;
}

/// An agent killed anywhere in following partition maintenance (after a
/// change made on the target, with the new partitions half captured, at the
/// end of their copy) leaves what the next `sync` finishes: it captures,
/// copies and drains on. A partition created after sync stopped is followed
/// by the cutover, which then finds both sides the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_killed_while_following_partitions_finishes_on_the_next_run() {
    let env = partitioned().await;
    env.config("[sync]\npoll_interval_ms = 50\n");
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    env.ok(&["sync", "--until-caught-up"]).await;
    let app = env.source_as(APP).await;
    app.batch_execute(
        "CREATE TABLE readings_2027 PARTITION OF readings FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
         CREATE TABLE readings_2028 PARTITION OF readings FOR VALUES FROM ('2028-01-01') TO ('2029-01-01');
         INSERT INTO readings_2027 VALUES (1, '2027-03-03', 1, 'straight in');
         INSERT INTO readings VALUES (2, '2028-04-04', 2, 'through the root');
         DROP TABLE readings_2024_lo;",
    )
    .await
    .unwrap();
    for (month, point) in [
        (5, "follow.target_done"),
        (6, "install.table_done"),
        (7, "copy.before_analyze"),
    ] {
        env.kill_at(&["sync"], point).await;
        app.batch_execute(&format!(
            "INSERT INTO readings VALUES ({month}, '2027-0{month}-01', {month}, 'after a kill');
             INSERT INTO readings_2028 VALUES ({month}, '2028-0{month}-01', {month}, 'after a kill')"
        ))
        .await
        .unwrap();
    }
    // Partition maintenance while sync follows the last: what the source
    // did after the follow read its catalog is the next follow's (it was
    // captured at once, and its copy failed: no such table on the target).
    app.batch_execute(
        "CREATE TABLE readings_2031 PARTITION OF readings FOR VALUES FROM ('2031-01-01') TO ('2032-01-01');",
    )
    .await
    .unwrap();
    let mut agent = env
        .run_until_failpoint(&["sync", "--until-caught-up"], "follow.target_done")
        .await;
    app.batch_execute(
        "CREATE TABLE readings_2032 PARTITION OF readings FOR VALUES FROM ('2032-01-01') TO ('2033-01-01');
         INSERT INTO readings VALUES (6, '2032-06-06', 6, 'created mid-follow')",
    )
    .await
    .unwrap();
    std::fs::write(env.failpoint_release(), "").unwrap();
    let status = agent.wait().await.expect("sync ends");
    assert!(status.success(), "{status}");
    std::fs::remove_file(env.failpoint_release()).unwrap();
    assert!(
        crate::target_has(
            &env,
            "SELECT count(*) = 1 FROM readings_2032 WHERE note = 'created mid-follow'"
        )
        .await
    );
    // Stopped as a service is, mid-follow: a stop like any other, with its
    // report.
    app.batch_execute(
        "CREATE TABLE readings_2030 PARTITION OF readings FOR VALUES FROM ('2030-01-01') TO ('2031-01-01');
         INSERT INTO readings VALUES (3, '2030-03-03', 3, 'stopped mid-follow')",
    )
    .await
    .unwrap();
    let mut agent = env
        .run_until_failpoint(&["sync", "--json"], "follow.target_done")
        .await;
    crate::faults::sigterm(&agent);
    env.wait_for_log(&agent, "Stopping after the batch in hand").await;
    std::fs::write(env.failpoint_release(), "").unwrap();
    let report = report_after_sigterm(&mut agent).await;
    assert!(report["passes"].is_u64(), "{report}");
    env.ok(&["sync", "--until-caught-up"]).await;
    // Killed before its ANALYZE, the copy is finished by one that runs it.
    assert!(
        crate::target_has(
            &env,
            "SELECT count(*) = 2 FROM pg_stat_user_tables
              WHERE relname IN ('readings_2027', 'readings_2028') AND last_analyze IS NOT NULL"
        )
        .await
    );
    // Maintenance after sync stopped: the cutover follows it first.
    app.batch_execute(
        "CREATE TABLE readings_2029 PARTITION OF readings FOR VALUES FROM ('2029-01-01') TO ('2030-01-01');
         INSERT INTO readings VALUES (4, '2029-01-01', 4, 'after a kill')",
    )
    .await
    .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&env.ok(&["cutover", "--json"]).await).expect("cutover's JSON report");
    assert_eq!(
        report["partitions_followed"],
        serde_json::json!(["partition public.readings_2029 attached"]),
        "{report}"
    );
    assert!(
        crate::target_has(
            &env,
            "SELECT count(*) = 7 FROM readings WHERE note = 'after a kill' AND tableoid::regclass::text <> 'readings_other'"
        )
        .await
    );
    assert_same_then_clean_up(&env).await;
    assert_no_leftovers(&env).await;
}

/// Two agents syncing one migration (a service restarted beside the old
/// one, or a second bridge host) met the same partition maintenance: both
/// found the partition missing on the target, both restored it, and the
/// later one failed ("already exists", exit 3). A follow now holds a lock:
/// the second agent waits for the first, then finds nothing left to follow
/// and drains on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_follow_partition_maintenance_one_at_a_time() {
    let env = partitioned().await;
    env.config("[sync]\npoll_interval_ms = 50\n");
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    env.ok(&["sync", "--until-caught-up"]).await;
    env.source_as(APP)
        .await
        .batch_execute(
            "CREATE TABLE readings_2027 PARTITION OF readings FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
             INSERT INTO readings VALUES (1, '2027-03-03', 1, 'two agents')",
        )
        .await
        .unwrap();
    // The first has found the partition missing on the target; the second
    // meets the same drift and waits.
    let mut first = env
        .run_until_failpoint(&["sync", "--until-caught-up"], "follow.target_read")
        .await;
    let mut second = env
        .run_until_failpoint(&["sync", "--until-caught-up"], "follow.waiting")
        .await;
    std::fs::write(env.failpoint_release(), "").unwrap();
    env.wait_for_log(&second, "Another agent followed").await;
    for (name, agent) in [("first", &mut first), ("second", &mut second)] {
        let status = agent.wait().await.expect("sync ends");
        assert!(status.success(), "the {name} agent: {status}");
    }
    assert!(
        crate::target_has(
            &env,
            "SELECT count(*) = 1 FROM readings_2027 WHERE note = 'two agents'"
        )
        .await
    );
    env.ok(&["cutover"]).await;
    assert_same_then_clean_up(&env).await;
}

/// A partition detached on the source while syncing (an old one archived)
/// left the target's copy attached: every table compared equal, the
/// cutover succeeded, and the parent held the detached rows on the target
/// only. A table that joins or leaves a hierarchy is drift: sync stops
/// saying so, and once the change is made on the target, install and copy
/// take the table afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_detached_while_syncing_is_drift_until_the_target_follows() {
    let env = partitioned().await;
    env.config("[sync]\npoll_interval_ms = 50\nfollow_partitions = false\n");
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    env.ok(&["sync", "--until-caught-up"]).await;
    let detach = "ALTER TABLE readings DETACH PARTITION readings_2022";
    let app = env.source_as(APP).await;
    app.batch_execute(&format!(
        "{detach}; INSERT INTO readings_2022 (device, at, v, note) VALUES (1, '2022-05-05', 1, 'after detach')"
    ))
    .await
    .unwrap();
    let err = env.fails(&["sync", "--until-caught-up"], 3).await;
    assert!(
        err.contains("table public.readings_2022 joined or left a partitioned table"),
        "{err}"
    );
    let out = env.run(&["cutover"]).await;
    assert_ne!(out.status.code(), Some(0), "no cutover over a drifted hierarchy");
    env.target_client().await.batch_execute(detach).await.unwrap();
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    env.ok(&["sync", "--until-caught-up"]).await;
    env.ok(&["cutover"]).await;
    assert!(
        crate::target_has(
            &env,
            "SELECT count(*) = 0 FROM readings WHERE note = 'after detach' OR at < '2023-01-01'"
        )
        .await
    );
    assert_same_then_clean_up(&env).await;
}

/// The rows changed during a long verification ahead of the fence are
/// compared again ahead of it (`cutover.max_keys_under_fence`), for a
/// partitioned table at its root over the ledgers of its whole hierarchy,
/// whichever table each statement named: a difference in any partition is
/// found before the fence; once equal, the ledgers start afresh and the
/// fence compares none of those rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_partition_rows_are_compared_again_before_the_fence() {
    let env = partitioned().await;
    let app = env.source_as(APP).await;
    env.config("[sync]\npoll_interval_ms = 50\n[cutover]\nverify = \"changed\"\nmax_keys_under_fence = 0\n");
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    env.ok(&["sync", "--until-caught-up"]).await;
    let target = env.target_client().await;
    let first = |leaf: &str| format!("(device, at) = (SELECT device, at FROM {leaf} ORDER BY 1, 2 LIMIT 1)");
    let changed = [
        ("readings", "readings_2023"),
        ("readings_2024", "readings_2024_lo"),
        ("readings_other", "readings_other"),
    ];
    let change = |note: &'static str| {
        let app = &app;
        async move {
            for (named, leaf) in changed {
                app.batch_execute(&format!(
                    "UPDATE {named} SET note = '{note}' WHERE {}",
                    first(leaf)
                ))
                .await
                .unwrap();
            }
        }
    };

    // Verified ahead, then the agent stops before the fence; rows change
    // through the root, a partitioned partition and a leaf, and go wrong
    // on the target once drained.
    env.kill_at(&["cutover"], "cutover.before_fence").await;
    change("later").await;
    env.ok(&["sync", "--until-caught-up"]).await;
    for (_, leaf) in changed {
        target
            .batch_execute(&format!("UPDATE {leaf} SET v = -1 WHERE {}", first(leaf)))
            .await
            .unwrap();
    }
    let err = env.fails(&["cutover"], 1).await;
    assert!(err.contains("the fence was never raised"), "{err}");
    assert_eq!(err.matches(" differs").count(), 3, "one key per partition: {err}");
    assert!(!crate::fence_is_up(&env).await);

    // Rewritten by the source; the difference cost the hierarchy its
    // ledgers, so it is verified in full ahead again. Then three rows
    // change once more.
    change("fixed").await;
    env.ok(&["sync", "--until-caught-up"]).await;
    env.kill_at(&["cutover"], "cutover.before_fence").await;
    change("once more").await;
    env.ok(&["sync", "--until-caught-up"]).await;
    let report: serde_json::Value = serde_json::from_str(&env.ok(&["cutover", "--json"]).await).unwrap();
    assert_eq!(
        report["changed_rows_verified_ahead"], 3,
        "the three changed rows, compared ahead of the fence: {report}"
    );
    assert_eq!(
        report["rows_verified"], 0,
        "nothing changed since, so the fence compared no row: {report}"
    );
    assert_same_data(&env).await;
    env.ok(&["cleanup"]).await;
    assert_no_leftovers(&env).await;
}
