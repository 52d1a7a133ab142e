//! End-to-end tests against real clusters, with the agent binary run the way
//! operators run it: the correctness contract (docs/design.md) and the failures a
//! real migration meets.

mod bulk;
mod contract;
mod deploys;
mod fallback;
mod faults;
mod fidelity;
mod habits;
mod operability;
mod preflight;
mod rds;
mod switch;
mod tls;
mod world;

use pgferry_e2e::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_pgferry-under-test");

/// The application's schema: a serial key, a composite key with a cascading
/// foreign key, a generated column, an identity column, a unique NOT NULL
/// index instead of a primary key, a user trigger, and names that need
/// quoting (one of them shaped like SQL injection).
pub const SCHEMA: &str = r#"
CREATE TABLE accounts (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    balance numeric(14,2) NOT NULL DEFAULT 0,
    balance_cents bigint GENERATED ALWAYS AS ((balance * 100)::bigint) STORED,
    tags text[],
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE ledger (
    account_id bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    seq int NOT NULL,
    amount numeric(14,2) NOT NULL,
    note text,
    PRIMARY KEY (account_id, seq));
CREATE TABLE "Mixed Case ""Quoted"" Table" ("Key" int PRIMARY KEY, "select" text, payload jsonb);
CREATE TABLE "; drop table accounts; --" (id int PRIMARY KEY, v text NOT NULL);
CREATE TABLE scratch (id int PRIMARY KEY, v text);
CREATE TABLE codes (code text NOT NULL UNIQUE, n int NOT NULL);
CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, kind text NOT NULL,
                     at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.updated_at := now(); RETURN NEW; END $$;
CREATE TRIGGER accounts_touch BEFORE UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION touch();
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA public TO writer2;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO writer2;
INSERT INTO accounts (name, balance, tags) SELECT 'acct ' || g, g, ARRAY['t' || g % 3] FROM generate_series(1, 3000) g;
INSERT INTO ledger SELECT a.id, s, s * 1.5, 'seed' FROM accounts a, generate_series(1, 3) s;
INSERT INTO "Mixed Case ""Quoted"" Table" SELECT g, 'v' || g, jsonb_build_object('g', g) FROM generate_series(1, 1000) g;
INSERT INTO "; drop table accounts; --" SELECT g, 'x' || g FROM generate_series(1, 1000) g;
INSERT INTO scratch SELECT g, 's' FROM generate_series(1, 100) g;
INSERT INTO codes SELECT 'code-' || g, g FROM generate_series(1, 500) g;
INSERT INTO events (kind) SELECT 'seed' FROM generate_series(1, 500);
"#;

/// What the application does: multi-row inserts and updates, deletes that
/// cascade, primary-key and unique-key changes, upserts, TRUNCATE, identity
/// inserts, multi-statement transactions.
pub const OPS: &[&str] = &[
    "INSERT INTO accounts (name, balance, tags) VALUES ('w$N', $N % 1000, ARRAY['w']), ('w$N b', 1, NULL)",
    "UPDATE accounts SET balance = balance + 1 WHERE id BETWEEN ($N * 13) % 3000 AND ($N * 13) % 3000 + 5",
    "INSERT INTO ledger (account_id, seq, amount, note)
       SELECT id, 100 + $N % 50, 1, 'w' FROM accounts WHERE id = ($N * 7) % 3000 + 1 ON CONFLICT DO NOTHING",
    "DELETE FROM accounts WHERE id = ($N * 31) % 3000 + 1",
    r#"UPDATE "; drop table accounts; --" SET id = id + 100000 WHERE id = ($N * 17) % 1000 + 1"#,
    r#"INSERT INTO "Mixed Case ""Quoted"" Table" VALUES ($N % 1500, 'u$N', '{"n": $N}')
       ON CONFLICT ("Key") DO UPDATE SET "select" = EXCLUDED."select", payload = EXCLUDED.payload"#,
    "UPDATE codes SET code = code || '+', n = n + 1 WHERE code = (SELECT code FROM codes ORDER BY n, code LIMIT 1)",
    "INSERT INTO events (kind) VALUES ('w$N'); DELETE FROM events WHERE id = (SELECT min(id) FROM events)",
    "BEGIN; UPDATE accounts SET name = name || '!' WHERE id = ($N * 3) % 3000 + 1;
       INSERT INTO ledger VALUES (($N * 3) % 3000 + 1, 200 + $N % 100, 2, 'tx') ON CONFLICT DO NOTHING; COMMIT",
    "BEGIN; TRUNCATE scratch; INSERT INTO scratch SELECT g, 'after $N' FROM generate_series(1, 20) g; COMMIT",
];

pub async fn seeded() -> Env {
    let env = Env::new(BIN).await;
    env.source_as(APP)
        .await
        .batch_execute(SCHEMA)
        .await
        .expect("seed the source");
    env
}

/// The seeded world installed, copied and synced once (drain passes 50 ms
/// apart).
pub async fn synced() -> Env {
    synced_with("[sync]\npoll_interval_ms = 50\n").await
}

/// [`synced`] with this configuration.
pub async fn synced_with(config: &str) -> Env {
    let env = seeded().await;
    env.config(config);
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    env.ok(&["sync", "--until-caught-up"]).await;
    env
}

/// Config with a fast drain and a switch command gated by the test.
pub fn gated_config(env: &Env) -> (std::path::PathBuf, std::path::PathBuf) {
    let (started, release) = (env.path("switch-started"), env.path("release"));
    env.config(&format!(
        "[sync]\npoll_interval_ms = 50\n[cutover]\nswitch_command = '''{}'''\n",
        gated_switch(&started, &release)
    ));
    (started, release)
}

/// `migrate --cutover` with `cutover.verify = "changed"` while `roles` run
/// `ops`; returns the cutover's JSON report.
pub async fn migrate_verifying_changes_while_writing(
    env: &Env,
    roles: &[(&'static str, &'static str)],
    ops: &'static [&'static str],
) -> serde_json::Value {
    env.config(&format!(
        "[sync]\npoll_interval_ms = 50\n[cutover]\nverify = \"changed\"\nswitch_command = '''{}'''\n",
        gated_switch(&env.path("switch-started"), &env.path("release"))
    ));
    let writers = Workload::start(env, roles, ops).await;
    writers.progress(100).await;
    let out = env
        .cutover_while_writing(&["migrate", "--cutover", "--json"], &[&writers])
        .await;
    assert_succeeded(&out, "migrate --cutover");
    writers.stop().await;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    report["cutover"].clone()
}

pub async fn fence_is_up(env: &Env) -> bool {
    env.source_as(APP)
        .await
        .query_one("SELECT last_value <> 0 FROM pgferry.fence", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(false)
}

pub async fn target_has(env: &Env, sql: &str) -> bool {
    env.target_client()
        .await
        .query_one(sql, &[])
        .await
        .expect(sql)
        .get(0)
}

/// The common end of a fidelity test: `migrate --cutover` while `roles` run
/// `ops` (each writer commits `progress` transactions first), then the target
/// must equal the source, row by row and schema object by schema object, and
/// nothing of pgferry's may be left.
pub async fn migrate_while_writing_then_compare(
    env: &Env,
    roles: &[(&'static str, &'static str)],
    ops: &'static [&'static str],
    progress: u64,
) {
    gated_config(env);
    let writers = Workload::start(env, roles, ops).await;
    writers.progress(progress).await;
    let out = env
        .cutover_while_writing(&["migrate", "--cutover"], &[&writers])
        .await;
    assert_succeeded(&out, "migrate --cutover");
    let stats = writers.stop().await;
    let committed: u64 = stats
        .iter()
        .map(|s| s.committed.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert!(committed >= progress, "the writers wrote during the migration");
    assert_same_data(env).await;
    assert_same_schema(env).await;
    assert_no_leftovers(env).await;
}
