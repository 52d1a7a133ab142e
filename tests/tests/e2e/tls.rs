//! TLS as RDS demands it: sslmode semantics like libpq's, a custom root
//! bundle, and a whole migration over verify-full.

use std::time::Duration;

use pgferry_e2e::*;

use crate::{gated_config, seeded, OPS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_behave_like_libpq_and_a_migration_runs_over_verify_full() {
    let env = seeded().await;
    let pki = TestPki::new("pgferry");
    let other = TestPki::new("other");
    // Like RDS: TLS required for every TCP connection to the target.
    env.target.enable_tls(&pki.cert, &pki.key, true).await.unwrap();
    let url = |host: &str, params: String| {
        format!(
            "postgres://{}:{}@{host}:{}/{DB}?{params}",
            MASTER.0,
            MASTER.1,
            env.target.port()
        )
    };
    let ca = pki.ca.display().to_string();
    let cases = [
        (url("127.0.0.1", "sslmode=disable".into()), 1, Some("pg_hba.conf")),
        (url("127.0.0.1", "sslmode=require".into()), 0, None),
        (
            url("localhost", format!("sslmode=verify-full&sslrootcert={ca}")),
            0,
            None,
        ),
        (
            url("127.0.0.1", format!("sslmode=verify-ca&sslrootcert={ca}")),
            0,
            None,
        ),
        (
            url("127.0.0.1", format!("sslmode=verify-full&sslrootcert={ca}")),
            1,
            Some("TLS failed"),
        ),
        (
            url(
                "localhost",
                format!("sslmode=verify-full&sslrootcert={}", other.ca.display()),
            ),
            1,
            Some("TLS failed"),
        ),
        (
            url(
                "localhost",
                format!("sslmode=require&sslrootcert={}", other.ca.display()),
            ),
            1,
            Some("TLS failed"),
        ),
        (
            url("localhost", "sslmode=verify-full".into()),
            1,
            Some("TLS failed"),
        ),
    ];
    for (target, code, says) in cases {
        let out = env
            .cmd(&["check", "--json"])
            .env("PGFERRY_TARGET", &target)
            .output()
            .await
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(code), "{target}: {report}");
        if let Some(text) = says {
            assert!(
                report.contains(text),
                "{target} should explain {text:?}: {report}"
            );
        }
    }
    let missing = url(
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem".into(),
    );
    let out = env
        .cmd(&["check"])
        .env("PGFERRY_TARGET", &missing)
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing root bundle is a configuration error"
    );

    // The whole migration, pg_dump and pg_restore included, over verify-full.
    let (_, release) = gated_config(&env);
    let writers = Workload::start(&env, &[APP, WRITER], OPS).await;
    writers.progress(50).await;
    let gate = async {
        writers.wait_all_fenced().await;
        std::fs::write(&release, "").unwrap();
    };
    let secure = url("localhost", format!("sslmode=verify-full&sslrootcert={ca}"));
    let run = async {
        tokio::time::timeout(
            Duration::from_secs(180),
            env.cmd(&["migrate", "--cutover"])
                .env("PGFERRY_TARGET", &secure)
                .output(),
        )
        .await
        .unwrap()
        .unwrap()
    };
    let (out, ()) = tokio::join!(run, gate);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    writers.stop().await;
    let su = env.target.superuser(DB).await.unwrap();
    let row = su
        .query_one("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE NOT s.ssl AND a.client_addr IS NOT NULL", &[])
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        0,
        "no TCP session to the target without TLS"
    );
    assert_same_data(&env).await;
    assert_no_leftovers(&env).await;
}
