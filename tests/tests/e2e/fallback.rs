//! The way back (`cutover.fallback`): after the switch the old source
//! follows the new database, refusing the application all along, and
//! `finish` leaves nothing of pgferry's on either side.

use pgferry_e2e::*;

use std::time::Duration;

use crate::{seeded, synced_with, OPS};

const FALLBACK: &str = "[sync]\npoll_interval_ms = 50\n[cutover]\nfallback = true\n";

/// Lets a session of the old source's write past its fence, as pgferry's
/// passes of the way back do (and uncaptured, as theirs).
const PAST_THE_FENCE: &str =
    "SELECT set_config('pgferry.apply', (SELECT apply_pass FROM pgferry.run), false);";

/// The application's triggers on the old source, with their modes.
async fn source_triggers(env: &Env) -> Vec<(String, String)> {
    env.source_as(APP)
        .await
        .query(
            "SELECT tgname::text, tgenabled::text FROM pg_trigger
              WHERE NOT tgisinternal AND tgname NOT LIKE 'pgferry%' ORDER BY 1",
            &[],
        )
        .await
        .expect("list triggers")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Writes made on the target after the switch, while `pgferry fallback`
/// runs (inserts, updates that a trigger on the old source would rewrite,
/// deletes that cascade, key changes, identity inserts, TRUNCATE), reach
/// the old source through its foreign keys; the application is refused
/// there throughout; `finish` enables its trigger again and removes
/// everything from both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_the_target_after_the_switch_reach_the_old_source() {
    let env = synced_with(FALLBACK).await;
    let before = source_triggers(&env).await;
    assert_eq!(before, vec![("accounts_touch".into(), "O".into())]);
    env.ok(&["cutover"]).await;
    let port = free_port();
    let agent = env
        .cmd(&["fallback"])
        .env("PGFERRY_METRICS__LISTEN", format!("127.0.0.1:{port}"))
        .env("PGFERRY_METRICS__SAMPLE_INTERVAL_MS", "100")
        .spawn()
        .expect("start fallback");
    let writers = Workload::start_with(vec![env.target_client().await, env.target_client().await], OPS);
    writers.progress(400).await;
    // The way back is on the dashboard: a lag of passes, not of the writes.
    let lag = wait_for(
        "the way back's lag in the metrics",
        Duration::from_secs(30),
        || async {
            let text = http_get(port, "/metrics").await?;
            metric_value(&text, "pgferry_reverse_lag_seconds", "").filter(|l| *l > 0.0)
        },
    )
    .await;
    assert!(lag < 30.0, "reverse lag {lag} s while the way back runs");
    assert_fenced(
        &env.source_as(APP).await,
        "UPDATE accounts SET balance = 0 WHERE id = 7",
        "the application on the old source during the fallback",
    )
    .await;
    let stats = writers.stop().await;
    assert!(stats
        .iter()
        .all(|s| !s.fenced.load(std::sync::atomic::Ordering::Relaxed)));
    stop(agent).await;
    assert_eq!(
        source_triggers(&env).await,
        vec![("accounts_touch".into(), "D".into())],
        "the old source's trigger is disabled while it follows"
    );
    on_target(
        &env,
        "INSERT INTO scratch VALUES (100001, 'after the agent stopped')",
    )
    .await;
    let status = env.status().await;
    assert_eq!(status["direction"], "reverse", "{status}");
    assert!(status["reverse"]["backlog_rows"].as_i64() >= Some(1), "{status}");
    env.ok(&["fallback", "--until-caught-up"]).await;
    assert_eq!(env.status().await["reverse"]["backlog_rows"], 0);
    assert_same_rows(&env).await;
    env.ok(&["finish"]).await;
    assert_eq!(source_triggers(&env).await, before);
    assert_same_rows(&env).await;
    assert_no_leftovers(&env).await;
}

/// Killed just before and just after the old source committed a pass, the
/// next run ends with the old source equal to the target, its fence up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_killed_around_its_commit_is_applied_once_the_agent_is_back() {
    let env = synced_with(FALLBACK).await;
    env.ok(&["cutover"]).await;
    let target = env.target_client().await;
    for point in ["fallback.before_source_commit", "fallback.after_source_commit"] {
        target
            .batch_execute(
                "INSERT INTO accounts (name, balance) SELECT 'after ' || g, g FROM generate_series(1, 50) g;
                 DELETE FROM accounts WHERE id IN (SELECT id FROM accounts ORDER BY id LIMIT 3);
                 UPDATE codes SET code = code || '*' WHERE n < 5;
                 TRUNCATE scratch; INSERT INTO scratch VALUES (1, 'one');",
            )
            .await
            .expect("write on the target");
        env.kill_at(&["fallback"], point).await;
        assert_fenced(
            &env.source_as(APP).await,
            "DELETE FROM scratch",
            "the application on the old source after a kill",
        )
        .await;
        env.ok(&["fallback", "--until-caught-up"]).await;
        assert_same_rows(&env).await;
    }
    env.ok(&["finish"]).await;
    assert_no_leftovers(&env).await;
}

/// A cutover aborted after the fence takes the way back off the target
/// (its capture would record the forward drain for nobody), and the next
/// cutover makes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_cutover_takes_the_way_back_off_the_target() {
    let env = synced_with(FALLBACK).await;
    env.kill_at(&["cutover"], "cutover.after_fence").await;
    env.ok(&["cutover", "--abort"]).await;
    let target_schema = || async {
        env.target_client()
            .await
            .query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'", &[])
            .await
            .expect("look for the schema")
            .get::<_, i64>(0)
    };
    assert_eq!(
        target_schema().await,
        0,
        "the target keeps nothing of the way back"
    );
    env.ok(&["sync", "--until-caught-up"]).await;
    env.ok(&["cutover"]).await;
    assert_eq!(target_schema().await, 1);
    on_target(&env, "UPDATE accounts SET name = 'moved back' WHERE id = 9").await;
    follow_then_finish(&env).await;
}

/// The application's first write to the target, made while the switch
/// command still runs, reaches the old source: the target captured before
/// the switch, and what it held of the forward line was forgotten before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_write_on_the_target_during_the_switch_reaches_the_old_source() {
    let env = seeded().await;
    let (started, release) = (env.path("switch-started"), env.path("release"));
    env.config(&format!(
        "{FALLBACK}switch_command = '''{}'''\n",
        gated_switch(&started, &release)
    ));
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    let writers = Workload::start(&env, &[APP, WRITER], OPS).await;
    writers.progress(50).await;
    let gate = async {
        writers.wait_all_fenced().await;
        wait_for("the switch command", Duration::from_secs(120), || async {
            started.exists().then_some(())
        })
        .await;
        let target = env.target_client().await;
        target
            .batch_execute(
                "INSERT INTO events (kind) VALUES ('first on the target');
                 UPDATE accounts SET balance = -1 WHERE id = 11;
                 DELETE FROM ledger WHERE account_id = 12",
            )
            .await
            .expect("the application's first writes on the target");
        std::fs::write(&release, "").unwrap();
    };
    let out = env.run_alongside(&["cutover"], gate).await;
    assert_succeeded(&out, "cutover");
    writers.stop().await;
    let pending: i64 = env
        .target_client()
        .await
        .query_one(
            "SELECT ((SELECT count(*) FROM pgferry.truncates)
                  + (SELECT sum((xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM pgferry.%I', 'd_' || id), false, true, '')))[1]::text::bigint)
                       FROM pgferry.tables WHERE NOT copy_only))::bigint",
            &[],
        )
        .await
        .expect("count the target's deltas")
        .get(0);
    assert!(
        (1..=10).contains(&pending),
        "the target's deltas hold the application's first writes only, not the forward drain's: {pending}"
    );
    follow_then_finish(&env).await;
}

/// `migrate --cutover` with a way back, run as the service: after the
/// switch it does not clean up but follows the new database, until stopped;
/// started again (as systemd would), it goes on following. A switchback
/// ends it; started again after that, it syncs and does not cut over on
/// its own: the operator went back on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_goes_on_following_after_the_switch() {
    let env = seeded().await;
    env.config(FALLBACK);
    let on_source = |id: i64| {
        let env = &env;
        async move {
            env.source_as(APP)
                .await
                .query_one(
                    "SELECT count(*) FROM accounts WHERE id = $1 AND name = 'on the target'",
                    &[&id],
                )
                .await
                .expect("read the old source")
                .get::<_, i64>(0)
                == 1
        }
    };
    let mut following = None;
    for (round, id) in [(1, 21_i64), (2, 22), (3, 23)] {
        let agent = env
            .cmd(&["migrate", "--cutover"])
            .spawn()
            .expect("start the service");
        wait_for("the cutover", Duration::from_secs(120), || async {
            let phase: Option<String> = env
                .source_as(APP)
                .await
                .query_one(
                    // A table with no row yet (install under way) reads as none.
                    "SELECT CASE WHEN to_regclass('pgferry.run') IS NOT NULL
                                 THEN (xpath('//p/text()', query_to_xml('SELECT phase AS p FROM pgferry.run', false, false, '')))[1]::text END",
                    &[],
                )
                .await
                .expect("read the phase")
                .get(0);
            (phase.as_deref() == Some("cut_over")).then_some(())
        })
        .await;
        env.target_client()
            .await
            .execute("UPDATE accounts SET name = 'on the target' WHERE id = $1", &[&id])
            .await
            .expect("write on the target");
        wait_for(
            &format!("round {round}: the write on the old source"),
            Duration::from_secs(60),
            || async { on_source(id).await.then_some(()) },
        )
        .await;
        if round < 3 {
            stop(agent).await;
        } else {
            following = Some(agent);
        }
    }
    env.ok(&["switchback"]).await;
    let mut agent = following.expect("the service follows");
    let ended = tokio::time::timeout(Duration::from_secs(60), agent.wait())
        .await
        .expect("the service ends with the way back")
        .expect("wait for the service");
    assert_eq!(
        ended.code(),
        Some(0),
        "the service ends cleanly after a switchback"
    );

    env.source_as(APP)
        .await
        .batch_execute("UPDATE accounts SET name = 'back on the source' WHERE id = 24")
        .await
        .expect("the old source is open");
    let restarted = env
        .spawn_until_failpoint(
            env.cmd(&["migrate", "--cutover"]),
            &["migrate", "--cutover"],
            "sync.after_target_commit",
        )
        .await;
    env.wait_for_log(&restarted, "waits for an explicit `pgferry cutover`")
        .await;
    assert_eq!(env.status().await["phase"], "syncing");
    std::fs::write(env.failpoint_release(), "").unwrap();
    env.source_as(APP)
        .await
        .batch_execute("UPDATE accounts SET name = 'synced forward' WHERE id = 25")
        .await
        .expect("the old source still takes writes");
    wait_for("the write on the target", Duration::from_secs(60), || async {
        let n: i64 = env
            .target_client()
            .await
            .query_one(
                "SELECT count(*) FROM accounts WHERE id = 25 AND name = 'synced forward'",
                &[],
            )
            .await
            .expect("read the target")
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    assert_eq!(env.status().await["phase"], "syncing");
    stop(restarted).await;
    env.ok(&["cutover"]).await;

    // `finish` while `fallback` follows: the follower ends cleanly.
    let mut follower = env.cmd(&["fallback"]).spawn().expect("start fallback");
    env.target_client()
        .await
        .execute("UPDATE accounts SET name = 'on the target' WHERE id = 26", &[])
        .await
        .expect("write on the target");
    wait_for(
        "the last write on the old source",
        Duration::from_secs(60),
        || async { on_source(26).await.then_some(()) },
    )
    .await;
    env.ok(&["finish"]).await;
    let ended = tokio::time::timeout(Duration::from_secs(60), follower.wait())
        .await
        .expect("the follower ends with the way back")
        .expect("wait for the follower");
    assert_eq!(ended.code(), Some(0), "the follower ends cleanly after finish");
    assert_same_rows(&env).await;
    assert_no_leftovers(&env).await;
}

/// The whole way, as the README tells it: cut over with a way back, run on
/// the new database (the service following), switch back under live
/// writes on the target (they are refused by its fence, none is lost, the
/// sequences follow), write on the old source again, sync forward, cut
/// over again, finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_over_switch_back_and_cut_over_again() {
    let env = seeded().await;
    let said = env.path("switched-back-to");
    env.config(&format!(
        "{FALLBACK}switchback_command = \"printenv PGFERRY_SOURCE_URL > '{}'\"\n",
        said.display()
    ));
    env.ok(&["install"]).await;
    env.ok(&["copy"]).await;
    env.ok(&["cutover"]).await;
    let service = env.cmd(&["fallback"]).spawn().expect("start fallback");
    let writers = Workload::start_with(vec![env.target_client().await, env.target_client().await], OPS);
    writers.progress(200).await;
    let out = env.run(&["switchback", "--json"]).await;
    assert_succeeded(&out, "switchback");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("switchback JSON");
    writers.wait_all_fenced().await;
    writers.stop().await;
    stop(service).await;
    assert!(report["tables_verified"].as_u64() > Some(0), "{report}");
    assert!(
        std::fs::read_to_string(&said)
            .expect("the switchback command ran")
            .starts_with("postgres"),
        "the command had the old source's URL"
    );
    assert_same_rows(&env).await;
    sequences_cover_the_rows(&env).await;
    assert_eq!(
        source_triggers(&env).await,
        vec![("accounts_touch".into(), "O".into())]
    );
    // The old source takes the application's writes again, captured.
    let again = Workload::start(&env, &[APP, WRITER], OPS).await;
    again.progress(100).await;
    env.ok(&["sync", "--until-caught-up"]).await;
    env.ok(&["cutover"]).await;
    again.wait_all_fenced().await;
    again.stop().await;
    assert_same_rows(&env).await;
    sequences_cover_the_rows(&env).await;
    env.ok(&["finish"]).await;
    assert_no_leftovers(&env).await;
}

/// Killed at every step of the switchback, the next run ends it: the old
/// source open and equal to the target, which is ready for the forward sync
/// again, each time before cutting over anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchback_killed_at_any_step_ends_equal_when_run_again() {
    let env = synced_with(FALLBACK).await;
    for (n, point) in [
        // A pass verifying ahead of the fence, its comparisons made on the
        // old source it committed, the target's side not committed yet.
        "fallback.verified",
        "switchback.before_fence",
        "switchback.after_fence",
        "switchback.after_final_drain",
        "switchback.after_verify",
        "switchback.before_switch",
        "switchback.after_switch",
        "switchback.before_open",
        "switchback.after_open",
        "switchback.before_tidy",
    ]
    .into_iter()
    .enumerate()
    {
        env.ok(&["cutover"]).await;
        env.target_client()
            .await
            .batch_execute(&format!(
                "INSERT INTO accounts (name, balance) VALUES ('round {n}', {n});
                 DELETE FROM ledger WHERE account_id = {};
                 INSERT INTO events (kind) VALUES ('round {n}')",
                100 + n
            ))
            .await
            .expect("write on the target");
        env.kill_at(&["switchback"], point).await;
        env.ok(&["switchback"]).await;
        assert_same_data(&env).await;
        env.source_as(APP)
            .await
            .batch_execute(&format!(
                "UPDATE accounts SET name = 'back {n}' WHERE id = {}",
                200 + n
            ))
            .await
            .unwrap_or_else(|e| panic!("the old source is open after a kill at {point}: {e}"));
        env.ok(&["sync", "--until-caught-up"]).await;
    }
    env.ok(&["cleanup"]).await;
    assert_no_leftovers(&env).await;
}

/// A switchback killed with the target fenced, then called off by hand:
/// the target takes writes again (an update that the old source's own
/// trigger would stamp differently), and a later switchback, with no
/// `fallback` run in between, ends it equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchback_called_off_reopens_the_target() {
    let env = synced_with(FALLBACK).await;
    env.ok(&["cutover"]).await;
    env.kill_at(&["switchback"], "switchback.after_verify").await;
    let target = env.target_client().await;
    assert_fenced(
        &target,
        "UPDATE accounts SET name = 'x' WHERE id = 6",
        "the target mid-switchback",
    )
    .await;
    env.ok(&["switchback", "--abort"]).await;
    target
        .batch_execute("UPDATE accounts SET name = 'after the abort' WHERE id = 6")
        .await
        .expect("the target takes writes again");
    // The application leaves the target once pointed back (the switchback
    // keeps the target fenced until it has).
    drop(target);
    env.ok(&["switchback"]).await;
    assert_same_data(&env).await;
    env.ok(&["cleanup"]).await;
    assert_no_leftovers(&env).await;
}

/// `cutover.verify = "changed"` (the default) on the way back: the
/// switchback compares every table in full ahead of the target's fence,
/// in the snapshot of a pass, while the application writes; with the fence
/// up only the rows whose keys changed since. A difference ahead ends it
/// before the fence (exit 1, the key named as the old source lacks it);
/// one in a row changed since is found under the fence, which is lifted
/// again. The target's ledgers outlive both aborts, and go with the way
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchback_verifies_ahead_of_the_target_fence_and_only_changed_rows_under_it() {
    let env = synced_with(FALLBACK).await;
    env.ok(&["cutover"]).await;
    // The old source lost a row (past its fence as pgferry's passes go).
    env.source_superuser(&format!(
        "{PAST_THE_FENCE} DELETE FROM ledger WHERE account_id = 8 AND seq = 2"
    ))
    .await;
    let err = env.fails(&["switchback"], 1).await;
    assert!(
        err.contains("the verification ahead of the target's fence found"),
        "{err}"
    );
    assert!(err.contains("(8,2) missing on the old source"), "{err}");
    on_target(
        &env,
        "UPDATE ledger SET note = 'again' WHERE account_id = 8 AND seq = 2",
    )
    .await;
    assert_fenced(
        &env.source_as(APP).await,
        "UPDATE accounts SET name = 'x' WHERE id = 5",
        "the old source after a switchback stopped ahead of the fence",
    )
    .await;

    // Every table verified ahead, then the agent stops before the fence; a
    // key changes on the target three times, reaches the old source, and
    // its row there goes wrong.
    env.kill_at(&["switchback"], "switchback.before_fence").await;
    on_target(
        &env,
        &"UPDATE accounts SET balance = balance + 1 WHERE id = 7;".repeat(3),
    )
    .await;
    env.ok(&["fallback", "--until-caught-up"]).await;
    let ledger: String = env
        .target_client()
        .await
        .query_one(
            "SELECT format('pgferry.v_%s', id) FROM pgferry.tables WHERE table_name = 'accounts'",
            &[],
        )
        .await
        .expect("accounts on the target")
        .get(0);
    let keys: i64 = env
        .target_client()
        .await
        .query_one(&format!("SELECT count(*) FROM {ledger}"), &[])
        .await
        .unwrap_or_else(|e| panic!("{ledger} on the target: {e}"))
        .get(0);
    assert_eq!(keys, 1, "the changed key, once");
    env.source_superuser(&format!(
        "{PAST_THE_FENCE} UPDATE accounts SET name = 'tampered' WHERE id = 7"
    ))
    .await;
    let err = env.fails(&["switchback"], 1).await;
    assert!(err.contains("(7) differs"), "{err}");
    assert!(
        !err.contains("ahead of the target's fence"),
        "found under the fence: {err}"
    );
    on_target(&env, "UPDATE accounts SET balance = balance + 1 WHERE id = 7").await;

    let out = env.run(&["switchback", "--json"]).await;
    assert_succeeded(&out, "switchback");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("switchback JSON");
    assert_eq!(report["verify_scope"], "changed", "{report}");
    assert_eq!(
        report["verified_ahead"], 0,
        "the ledgers outlived the aborts: {report}"
    );
    assert_eq!(report["tables_verified"], 7, "{report}");
    assert_eq!(report["tables_verified_by_changes"], 7, "{report}");
    assert_eq!(
        report["rows_verified"], 1,
        "only accounts' row 7 changed since: {report}"
    );
    assert_same_data(&env).await;
    env.ok(&["cleanup"]).await;
    assert_no_leftovers(&env).await;
}

/// What an application writes to a table without a key on the new database
/// (a log, a Rails join table without an id).
const KEYLESS_OPS: &[&str] = &[
    "INSERT INTO event_log (msg) VALUES ('t$N'), ('t$N again')",
    "DELETE FROM event_log WHERE msg = 'seed ' || ($N % 300)",
    "UPDATE event_log SET msg = msg || '!' WHERE msg = 't' || ($N - 1)",
];

/// A table without a key, listed `copy_only`, written on the target after
/// the switch and throughout the switchback: no delta names its rows, so
/// the switchback copies it whole to the old source with the target fenced
/// (its writers refused there too), and both sides end equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_key_is_copied_back_under_the_target_fence() {
    let env = seeded().await;
    env.source_as(APP)
        .await
        .batch_execute(
            "CREATE TABLE event_log (at timestamptz NOT NULL DEFAULT clock_timestamp(), msg text);
             INSERT INTO event_log (msg) SELECT 'seed ' || g FROM generate_series(1, 500) g;",
        )
        .await
        .expect("a table without a key");
    env.config(&format!("copy_only = [\"public.event_log\"]\n{FALLBACK}"));
    cut_over_with_a_way_back(&env).await;
    let service = env.cmd(&["fallback"]).spawn().expect("start fallback");
    let writers = Workload::start_with(vec![env.target_client().await, env.target_client().await], OPS);
    let loggers = Workload::start_with(vec![env.target_client().await], KEYLESS_OPS);
    writers.progress(100).await;
    loggers.progress(50).await;
    let out = env.run(&["switchback", "--json"]).await;
    assert_succeeded(&out, "switchback");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("switchback JSON");
    writers.wait_all_fenced().await;
    loggers.wait_all_fenced().await;
    writers.stop().await;
    loggers.stop().await;
    stop(service).await;
    let copied = report["copied_under_fence"].to_string();
    assert!(copied.contains("public.event_log ("), "{report}");
    assert_same_data(&env).await;
    env.ok(&["cleanup"]).await;
    assert_no_leftovers(&env).await;
}

/// What the shop's code does on whichever database it points at, through
/// Django's ORM: customers signing up with an order, a shipment and its
/// parcels in one transaction; orders deleted (Django deletes their
/// shipments and parcels first, itself); orders and customers changed.
/// `{tag}` marks the rows of each round.
const SHOP_CODE: &str = r#"
from django.db import transaction
from shop.models import Customer, Order, Shipment, Parcel
for i in range(15):
    with transaction.atomic():
        c = Customer.objects.create(name=f"{tag} {i}", email=f"{tag}{i}@example.com", vip=i % 2 == 0)
        o = Order.objects.create(customer=c, total=i)
        s = Shipment.objects.create(carrier="{tag}", order=o)
        Parcel.objects.bulk_create([Parcel(weight=w, shipment=s) for w in range(3)])
doomed = list(Order.objects.filter(shipment__isnull=False).order_by("id").values_list("id", flat=True)[:4])
Order.objects.filter(id__in=doomed).delete()
Order.objects.filter(total__lt=5).update(note="{tag}")
Customer.objects.filter(id__in=[1, 2]).update(tier="{tag}")
Customer.objects.filter(vip=True).update(points=7)
"#;

/// A Django application's way back: the shop migrated by `manage.py
/// migrate`, moved with a way back; its ORM code then writes on the new
/// database (deferrable foreign keys, Django's own cascading deletes),
/// which the old source follows; switched back, the same code writes on
/// the old source, which syncs forward again; cut over again, then
/// finished: equal row by row each time, nothing left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_django_application_moves_runs_switches_back_and_moves_again() {
    let env = Env::new(crate::BIN).await;
    crate::deploys::django_migrate(&env, "0007_replace_fields").await;
    let code = |tag: &str| SHOP_CODE.replace("{tag}", tag);
    crate::deploys::django_shell(env.source.port(), APP, &code("before")).await;
    env.config(FALLBACK);
    cut_over_with_a_way_back(&env).await;
    crate::deploys::django_shell(env.target.port(), MASTER, &code("moved")).await;
    env.ok(&["fallback", "--until-caught-up"]).await;
    assert_same_rows(&env).await;
    crate::deploys::django_shell(env.target.port(), MASTER, &code("moved again")).await;
    env.ok(&["switchback"]).await;
    assert_same_rows(&env).await;
    crate::deploys::django_shell(env.source.port(), APP, &code("back")).await;
    env.ok(&["sync", "--until-caught-up"]).await;
    env.ok(&["cutover"]).await;
    assert_same_rows(&env).await;
    crate::deploys::django_shell(env.target.port(), MASTER, &code("forward")).await;
    env.ok(&["fallback", "--until-caught-up"]).await;
    assert_same_rows(&env).await;
    env.ok(&["finish"]).await;
    assert_no_leftovers(&env).await;
}

/// Rows the new database changes together in ways the old source checks
/// constraint by constraint: seat holders swapped under a unique
/// constraint declared DEFERRABLE, and a team and its captain that
/// reference each other, inserted in one transaction under deferrable
/// foreign keys, arrive in one pass, checked at its commit. A swap under a
/// unique constraint that is not deferrable stops the way back with the
/// constraint named and the fix; made deferrable on the old source, the
/// next pass applies it, and nothing was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_changed_together_reach_the_old_source_under_its_constraints() {
    let env = seeded().await;
    env.source_as(APP)
        .await
        .batch_execute(
            "CREATE TABLE seats (id int PRIMARY KEY, holder text NOT NULL,
                                 CONSTRAINT seats_holder_key UNIQUE (holder) DEFERRABLE);
             INSERT INTO seats VALUES (1, 'ann'), (2, 'bob');
             CREATE TABLE teams (id int PRIMARY KEY, captain_id int);
             CREATE TABLE players (id int PRIMARY KEY,
                                   team_id int NOT NULL REFERENCES teams DEFERRABLE INITIALLY DEFERRED);
             ALTER TABLE teams ADD CONSTRAINT teams_captain_fkey
                   FOREIGN KEY (captain_id) REFERENCES players DEFERRABLE INITIALLY DEFERRED;
             CREATE TABLE badges (id int PRIMARY KEY, code text NOT NULL UNIQUE);
             INSERT INTO badges VALUES (1, 'gold'), (2, 'silver');",
        )
        .await
        .expect("the application's schema");
    env.config(FALLBACK);
    cut_over_with_a_way_back(&env).await;
    on_target(
        &env,
        "UPDATE seats SET holder = CASE id WHEN 1 THEN 'bob' ELSE 'ann' END;
         BEGIN; INSERT INTO teams VALUES (1, 10); INSERT INTO players VALUES (10, 1); COMMIT;",
    )
    .await;
    env.ok(&["fallback", "--until-caught-up"]).await;
    assert_same_rows(&env).await;

    // The application swaps them in three statements, as it must there.
    on_target(
        &env,
        "BEGIN;
         UPDATE badges SET code = 'swapping' WHERE id = 1;
         UPDATE badges SET code = 'gold' WHERE id = 2;
         UPDATE badges SET code = 'silver' WHERE id = 1;
         COMMIT;",
    )
    .await;
    let err = env.fails(&["fallback", "--until-caught-up"], 3).await;
    assert!(err.contains("public.badges"), "{err}");
    assert!(err.contains("badges_code_key"), "{err}");
    assert!(err.contains("DEFERRABLE"), "{err}");
    env.source_as(APP)
        .await
        .batch_execute(
            "ALTER TABLE badges DROP CONSTRAINT badges_code_key,
                                ADD CONSTRAINT badges_code_key UNIQUE (code) DEFERRABLE",
        )
        .await
        .expect("the constraint made deferrable on the old source");
    env.ok(&["fallback", "--until-caught-up"]).await;
    assert_same_rows(&env).await;
    env.ok(&["finish"]).await;
    assert_no_leftovers(&env).await;
}

/// A table the application holds locked on the new database (its own
/// ALTER TABLE, a long maintenance) holds up none of the others' changes on
/// the way back while it has none of its own: a pass locks only the tables
/// it applies, and an idle pass none. Once the lock goes, its changes
/// follow too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_locked_on_the_target_does_not_hold_up_the_way_back() {
    let env = synced_with(FALLBACK).await;
    env.ok(&["cutover"]).await;
    let holder = env.target_client().await;
    holder
        .batch_execute("BEGIN; LOCK TABLE scratch IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("the application locks a table");
    on_target(
        &env,
        "INSERT INTO accounts (name) VALUES ('while scratch is locked')",
    )
    .await;
    tokio::time::timeout(
        Duration::from_secs(60),
        env.ok(&["fallback", "--until-caught-up"]),
    )
    .await
    .expect("the way back catches up while scratch is locked");
    let arrived: bool = env
        .source_as(APP)
        .await
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM accounts WHERE name = 'while scratch is locked')",
            &[],
        )
        .await
        .expect("read the old source")
        .get(0);
    assert!(arrived, "the row reached the old source");
    holder.batch_execute("COMMIT").await.expect("the lock goes");
    on_target(&env, "INSERT INTO scratch VALUES (7777, 'after the lock')").await;
    env.ok(&["fallback", "--until-caught-up"]).await;
    assert_same_rows(&env).await;
    env.ok(&["finish"]).await;
    assert_no_leftovers(&env).await;
}

/// `pgferry fallback` verifies ahead of a switchback while it follows and
/// nobody waits (`cutover.verify = "changed"`): the switchback then
/// compares no table in full, ahead of the target's fence or under it,
/// only the rows changed since, so that it returns in seconds whatever the
/// database's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_way_back_verifies_ahead_while_it_follows() {
    let env = synced_with(FALLBACK).await;
    env.ok(&["cutover"]).await;
    // Its first pass that verifies, then on.
    let service = env
        .spawn_until_failpoint(env.cmd(&["fallback"]), &["fallback"], "fallback.verified")
        .await;
    std::fs::write(env.failpoint_release(), "").unwrap();
    env.wait_for_log(&service, "Verified ahead of a switchback while following")
        .await;
    on_target(&env, "UPDATE accounts SET balance = balance + 1 WHERE id = 3").await;
    stop(service).await;
    let out = env.run(&["switchback", "--json"]).await;
    assert_succeeded(&out, "switchback");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("switchback JSON");
    assert_eq!(report["verified_ahead"], 0, "done while following: {report}");
    assert_eq!(report["tables_verified_by_changes"], 7, "{report}");
    assert_eq!(report["rows_verified"], 1, "accounts' row 3 alone: {report}");
    assert_same_data(&env).await;
    env.ok(&["cleanup"]).await;
    assert_no_leftovers(&env).await;
}

/// A table truncated on the new database after its verification ahead
/// loses its ledger there (the rows the TRUNCATE removed are named by no
/// delta), so the switchback compares it in full again ahead of the
/// fence, alone, before every table is compared by its changed rows under
/// it; both sides end equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_truncated_on_the_target_after_its_verification_is_compared_in_full() {
    let env = synced_with(FALLBACK).await;
    env.ok(&["cutover"]).await;
    // Every table verified ahead, then the agent stops before the fence.
    env.kill_at(&["switchback"], "switchback.before_fence").await;
    on_target(
        &env,
        "BEGIN; TRUNCATE scratch; INSERT INTO scratch VALUES (1, 'after the truncate'); COMMIT;",
    )
    .await;
    env.ok(&["fallback", "--until-caught-up"]).await;
    let out = env.run(&["switchback", "--json"]).await;
    assert_succeeded(&out, "switchback");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("switchback JSON");
    assert_eq!(
        report["verified_ahead"], 1,
        "scratch alone verified again: {report}"
    );
    assert_eq!(report["tables_verified_by_changes"], 7, "{report}");
    assert_same_data(&env).await;
    env.ok(&["cleanup"]).await;
    assert_no_leftovers(&env).await;
}

/// A switchback command that fails lifts the target's fence: the
/// application goes on writing there, the old source goes on following.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_switchback_command_reopens_the_target() {
    let env = synced_with(&format!("{FALLBACK}switchback_command = 'exit 3'\n")).await;
    env.ok(&["cutover"]).await;
    let out = env.run(&["switchback"]).await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    on_target(&env, "UPDATE accounts SET name = 'still here' WHERE id = 5").await;
    assert_fenced(
        &env.source_as(APP).await,
        "UPDATE accounts SET name = 'x' WHERE id = 5",
        "the old source after a failed switchback",
    )
    .await;
    follow_then_finish(&env).await;
}

/// The old source cannot be reached just after the switchback command ran
/// (the application already points at it): pgferry keeps trying to open
/// it, says so and exits 4 when it gives up; run again, it opens it without
/// running the command again, waiting for it to come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_source_out_of_reach_after_the_switchback_command_is_opened_once_back() {
    let mut env = seeded().await;
    let ran = env.path("switchback-ran");
    let config = |limit_ms: u64| {
        format!(
            "{FALLBACK}switchback_command = 'echo ran >> {}'\nfence_lift_timeout_ms = {limit_ms}\n\
             [source_limits]\nstep_retries = 0\n",
            ran.display()
        )
    };
    env.config(&config(1_500));
    cut_over_with_a_way_back(&env).await;
    on_target(&env, "UPDATE accounts SET name = 'on the target' WHERE id = 9").await;
    let runs = || std::fs::read_to_string(&ran).unwrap_or_default().lines().count();

    // Gives up: exit 4, the last line says the old source is fenced and
    // how to open it.
    let mut agent = env
        .run_until_failpoint(&["switchback"], "switchback.before_open")
        .await;
    env.source.stop("fast").await.unwrap();
    std::fs::write(env.failpoint_release(), "").unwrap();
    let (code, log) = env.exited(&mut agent).await;
    assert_eq!(code, Some(4), "{log}");
    let said = log
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error said: {log}"));
    assert!(said.contains("THE OLD SOURCE IS STILL FENCED"), "{log}");
    assert!(said.contains("run `pgferry switchback` to open it"), "{log}");
    assert_eq!(runs(), 1);
    std::fs::remove_file(env.failpoint_release()).unwrap();
    env.source.restart().await.unwrap();
    assert_fenced(
        &env.source_as(APP).await,
        "UPDATE accounts SET name = 'x' WHERE id = 9",
        "the old source it could not open",
    )
    .await;

    // Run again while the old source is still away: it keeps trying, and
    // opens it once it is back.
    env.config(&config(120_000));
    let mut agent = env
        .run_until_failpoint(&["switchback"], "switchback.before_open")
        .await;
    env.source.stop("fast").await.unwrap();
    std::fs::write(env.failpoint_release(), "").unwrap();
    env.wait_for_log(
        &agent,
        "THE OLD SOURCE IS STILL FENCED: the fence could not be lifted; trying again",
    )
    .await;
    env.source.restart().await.unwrap();
    let (code, log) = env.exited(&mut agent).await;
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(runs(), 1, "the switchback command ran once");
    std::fs::remove_file(env.failpoint_release()).unwrap();
    env.source_as(APP)
        .await
        .batch_execute("UPDATE accounts SET name = 'back' WHERE id = 10")
        .await
        .expect("the old source is open");
    env.ok(&["sync", "--until-caught-up"]).await;
    assert_same_data(&env).await;
    env.ok(&["cleanup"]).await;
    assert_no_leftovers(&env).await;
}

/// `check` with a way back refuses, with the fix, a table whose triggers
/// the source role could not disable on the old source (another role owns
/// it), and one it could not write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_a_way_back_the_source_role_could_not_apply() {
    let env = seeded().await;
    env.source_superuser(
        "CREATE TABLE audited (id int PRIMARY KEY, v text);
         CREATE FUNCTION audited_stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
         CREATE TRIGGER audited_stamp BEFORE UPDATE ON audited FOR EACH ROW EXECUTE FUNCTION audited_stamp();
         GRANT SELECT, INSERT, UPDATE, DELETE, TRIGGER ON audited TO app;
         CREATE TABLE read_only (id int PRIMARY KEY);
         GRANT SELECT, TRIGGER ON read_only TO app;",
    )
    .await;
    env.config(FALLBACK);
    let out = env.run(&["check"]).await;
    assert_eq!(out.status.code(), Some(1));
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.contains("public.audited") && out.contains("audited_stamp") && out.contains("only its owner"),
        "{out}"
    );
    assert!(
        out.contains("public.read_only") && out.contains("GRANT INSERT, UPDATE, DELETE ON public.read_only"),
        "{out}"
    );
    env.config("");
    let out = env.run(&["check"]).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("cutover.fallback"),
        "no fallback, no such blocker: {text}"
    );
}

/// Killed at each step of `finish`, the next `finish` ends it: nothing of
/// pgferry's left on either side, the old source's trigger enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_killed_at_any_step_ends_clean_when_run_again() {
    for point in [
        "finish.after_triggers",
        "finish.after_target_capture",
        "cleanup.table_done",
    ] {
        let env = synced_with(FALLBACK).await;
        env.ok(&["cutover"]).await;
        env.target_client()
            .await
            .batch_execute("UPDATE accounts SET name = 'last on the target' WHERE id = 3")
            .await
            .expect("write on the target");
        env.ok(&["fallback", "--until-caught-up"]).await;
        env.kill_at(&["finish"], point).await;
        env.ok(&["finish"]).await;
        assert_same_rows(&env).await;
        assert_no_leftovers(&env).await;
        assert_eq!(
            source_triggers(&env).await,
            vec![("accounts_touch".into(), "O".into())],
            "after a kill at {point}"
        );
    }
}

/// A cutover killed while it installs capture on the target for the way
/// back (before the fence) goes on when run again, and the way back works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_killed_while_it_prepares_the_way_back_goes_on() {
    let env = synced_with(FALLBACK).await;
    env.kill_at(&["cutover"], "install.after_register").await;
    assert_eq!(env.status().await["phase"], "syncing", "the fence never went up");
    env.ok(&["cutover"]).await;
    on_target(&env, "DELETE FROM accounts WHERE id = 4").await;
    follow_then_finish(&env).await;
}

/// `finish --keep-source-fenced`: the target loses the way back, the old
/// source keeps refusing the application (and pgferry's pass no longer
/// opens it) until `cleanup` releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_can_keep_the_old_source_fenced() {
    let env = synced_with(FALLBACK).await;
    env.ok(&["cutover"]).await;
    on_target(&env, "UPDATE accounts SET name = 'kept' WHERE id = 8").await;
    env.ok(&["fallback", "--until-caught-up"]).await;
    let source = env.source_as(APP).await;
    let pass: String = source
        .query_one("SELECT apply_pass FROM pgferry.run", &[])
        .await
        .expect("the pass")
        .get(0);
    env.ok(&["finish", "--keep-source-fenced"]).await;
    let schemas: i64 = env
        .target_client()
        .await
        .query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'", &[])
        .await
        .expect("look for the schema")
        .get(0);
    assert_eq!(schemas, 0, "nothing of pgferry's on the target");
    source
        .execute("SELECT set_config('pgferry.apply', $1, false)", &[&pass])
        .await
        .expect("set the old pass");
    assert_fenced(
        &source,
        "UPDATE accounts SET name = 'x' WHERE id = 8",
        "the old source kept fenced",
    )
    .await;
    assert_eq!(
        source_triggers(&env).await,
        vec![("accounts_touch".into(), "O".into())]
    );
    assert_same_rows(&env).await;
    drop(source);
    env.ok(&["cleanup"]).await;
    assert_no_leftovers(&env).await;
}

/// `finish` while the way back's pass lock is held (a pass stuck, or an
/// agent's session the network lost): it waits, naming the session that
/// holds it, and finishes once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_waits_for_a_held_pass_lock_naming_its_holder() {
    let env = synced_with(FALLBACK).await;
    env.ok(&["cutover"]).await;
    on_target(&env, "UPDATE accounts SET name = 'late' WHERE id = 9").await;
    env.ok(&["fallback", "--until-caught-up"]).await;
    let holder = env.target_client().await;
    let pid: i32 = holder
        .query_one(
            "SELECT pg_backend_pid() FROM (SELECT pg_advisory_lock(x'70676662'::int, 0)) l",
            &[],
        )
        .await
        .expect("hold the pass lock")
        .get(0);
    let mut finish = env.run_until_failpoint(&["finish"], "finish.start").await;
    std::fs::write(env.failpoint_release(), "").unwrap();
    env.wait_for_log(&finish, &format!("holder=pid {pid} ")).await;
    holder
        .execute("SELECT pg_advisory_unlock(x'70676662'::int, 0)", &[])
        .await
        .expect("let the lock go");
    let (code, log) = env.exited(&mut finish).await;
    assert_eq!(code, Some(0), "finish once the lock is free: {log}");
    assert_same_rows(&env).await;
    assert_no_leftovers(&env).await;
}

/// Installs, copies, syncs and cuts over (the configuration gives the way
/// back).
async fn cut_over_with_a_way_back(env: &Env) {
    for step in [
        &["install"][..],
        &["copy"],
        &["sync", "--until-caught-up"],
        &["cutover"],
    ] {
        env.ok(step).await;
    }
}

/// The application writes `sql` on the target.
async fn on_target(env: &Env, sql: &str) {
    env.target_client()
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("on the target: {sql}: {e}"));
}

/// The old source catches up, equals the target row for row, and `finish`
/// leaves nothing of pgferry's on either side.
async fn follow_then_finish(env: &Env) {
    env.ok(&["fallback", "--until-caught-up"]).await;
    assert_same_rows(env).await;
    env.ok(&["finish"]).await;
    assert_no_leftovers(env).await;
}

/// The old source's sequences are past every value the rows hold on either
/// side: the next row made on the source collides with none. (Not equal to
/// the target's: a write the fence refuses has taken its value already.)
async fn sequences_cover_the_rows(env: &Env) {
    let source = env.source_as(APP).await;
    let target = env.target_client().await;
    for (seq, table, column) in [
        ("accounts_id_seq", "accounts", "id"),
        ("events_id_seq", "events", "id"),
    ] {
        let next: i64 = source
            .query_one(&format!("SELECT last_value FROM {seq}"), &[])
            .await
            .expect("read a sequence")
            .get(0);
        for side in [&source, &target] {
            let max: Option<i64> = side
                .query_one(&format!("SELECT max({column})::bigint FROM {table}"), &[])
                .await
                .expect("read the rows")
                .get(0);
            assert!(
                max.unwrap_or(0) <= next,
                "{seq} at {next} is behind {table}.{column} {max:?}"
            );
        }
    }
}

/// Ends an agent the way systemd stops it, and waits for it.
async fn stop(mut agent: tokio::process::Child) {
    crate::faults::sigterm(&agent);
    crate::faults::exits_ok_within(&mut agent, 60).await;
}
