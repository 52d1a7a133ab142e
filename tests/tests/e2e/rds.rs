//! `pgferry rds` against a local moto_server: the requests' effects, not
//! AWS's timing.

use pgferry_e2e::*;

const PASSWORD: &str = "never-in-argv-42";

async fn rds(env: &Env, moto: &MotoServer, args: &[&str], extra: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = env.cmd(&[&["rds"], args].concat());
    cmd.envs(moto.env());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().await.unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        !stdout.contains(PASSWORD) && !stderr.contains(PASSWORD),
        "the password never shows: {stdout}{stderr}"
    );
    (out.status.code().unwrap(), stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_wait_snapshot_and_delete_an_instance() {
    let env = crate::seeded().await;
    let moto = MotoServer::start().await;
    let pw = [("PGFERRY_RDS_MASTER_PASSWORD", PASSWORD)];

    let (code, _, err) = rds(
        &env,
        &moto,
        &["create", "--id", "nopw", "--class", "db.r6g.large"],
        &[],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("PGFERRY_RDS_MASTER_PASSWORD"),
        "says where the password goes: {err}"
    );

    let args = [
        "create",
        "--id",
        "target-1",
        "--class",
        "db.r6g.xlarge",
        "--storage-gb",
        "300",
        "--engine-version",
        "15.5",
        "--multi-az",
        "--tag",
        "team=data",
        "--tag",
        "migration=pgferry",
        "--json",
    ];
    let (code, out, err) = rds(&env, &moto, &args, &pw).await;
    assert_eq!(code, 0, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["class"], "db.r6g.xlarge");
    assert_eq!(info["storage_gb"], 300);
    assert_eq!(info["storage_type"], "gp3");
    assert_eq!(info["multi_az"], true);
    assert_eq!(info["engine_version"], "15.5");
    let tags = info["tags"].to_string();
    assert!(
        tags.contains("\"team\",\"data\"") && tags.contains("\"migration\",\"pgferry\""),
        "{tags}"
    );

    let (code, out, _) = rds(&env, &moto, &["wait", "--id", "target-1", "--json"], &[]).await;
    assert_eq!(code, 0);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["status"], "available");
    assert!(info["endpoint"].as_str().unwrap().ends_with(":5432"), "{info}");

    let (code, out, _) = rds(
        &env,
        &moto,
        &[
            "snapshot",
            "--id",
            "target-1",
            "--snapshot-id",
            "before-cutover",
            "--json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        info["snapshots"],
        serde_json::json!(["before-cutover"]),
        "only the manual snapshot is listed: {info}"
    );

    let (code, _, err) = rds(&env, &moto, &["delete", "--id", "target-1"], &[]).await;
    assert_eq!(code, 2, "deleting asks what to do about a final snapshot: {err}");
    let (code, _, _) = rds(
        &env,
        &moto,
        &["delete", "--id", "target-1", "--skip-final-snapshot"],
        &[],
    )
    .await;
    assert_eq!(code, 0);
    let (code, _, err) = rds(&env, &moto, &["describe", "--id", "target-1"], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("no RDS instance target-1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_defaults_from_the_source_and_reads_the_password_from_a_file() {
    let env = crate::seeded().await;
    let moto = MotoServer::start().await;
    let file = env.path("master-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let file = file.display().to_string();
    let (code, out, err) = rds(
        &env,
        &moto,
        &[
            "create",
            "--id",
            "sized",
            "--master-password-file",
            &file,
            "--json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The source is a small PostgreSQL 15 database.
    assert_eq!(info["storage_gb"], 20, "twice the data, at least 20 GB: {info}");
    assert_eq!(info["class"], "db.t4g.medium");
    assert_eq!(info["engine_version"], "15");
}
