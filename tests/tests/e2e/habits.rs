//! What operators bring from libpq and from a first try: passwords in the
//! password file, services, `PG*` variables; and the headlines of the
//! mistakes a new user makes, which must name the real cause and never a
//! secret.

use std::os::unix::fs::PermissionsExt;

use pgferry_e2e::*;

use crate::seeded;

/// A password-file line for `role` on `port`, escaped as libpq reads it.
fn pgpass_line(port: u16, role: (&str, &str)) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
    format!("127.0.0.1:{port}:{DB}:{}:{}\n", esc(role.0), esc(role.1))
}

/// The source's password in the password file, the target in a service
/// file: pgferry's sessions and its pg_dump/pg_restore children
/// authenticate alike, and the migration completes. A password file others
/// may read is ignored, as libpq ignores it, and the headline says where a
/// password may come from, showing none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_file_and_a_service_serve_sessions_and_client_tools_alike() {
    let env = seeded().await;
    env.config("[sync]\npoll_interval_ms = 50\n");
    let pgpass = env.path("pgpass");
    std::fs::write(&pgpass, pgpass_line(env.source.port(), APP)).unwrap();
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let services = env.path("pg_service.conf");
    std::fs::write(
        &services,
        format!(
            "[newdb]\nhost=127.0.0.1\nport={}\ndbname={DB}\nuser={}\npassword={}\nsslmode=disable\n",
            env.target.port(),
            MASTER.0,
            MASTER.1
        ),
    )
    .unwrap();
    let source_url = format!(
        "postgres://{}@127.0.0.1:{}/{DB}?sslmode=disable",
        APP.0,
        env.source.port()
    );
    let run = |args: &'static [&'static str]| {
        let mut cmd = env.cmd(args);
        cmd.env("PGFERRY_SOURCE", &source_url)
            .env("PGFERRY_TARGET", "postgres:///?service=newdb")
            .env("PGPASSFILE", &pgpass)
            .env("PGSERVICEFILE", &services)
            .env_remove("PGPASSWORD");
        cmd
    };
    let out = run(&["migrate", "--cutover"]).output().await.unwrap();
    assert_succeeded(&out, "migrate --cutover with the password file and a service");
    assert_same_data(&env).await;
    assert_no_leftovers(&env).await;

    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&["check"]).output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("readable by others"), "{text}");
    assert!(text.contains("no password was found"), "{text}");
    assert!(
        !text.contains(APP.1) && !text.contains(MASTER.1),
        "a password was shown: {text}"
    );
}

/// The mistakes of a first try, each named by its cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_try_gets_headlines_that_name_the_cause() {
    let env = seeded().await;
    let check = |source: String, target: String| {
        let mut cmd = env.cmd(&["check"]);
        cmd.env("PGFERRY_SOURCE", source).env("PGFERRY_TARGET", target);
        cmd
    };
    let text = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    // A server that does not do TLS, asked for it.
    let out = check(
        env.source_url(),
        env.target_url().replace("sslmode=disable", "sslmode=require"),
    )
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("does not accept TLS"), "{}", text(&out));
    // A URL parameter libpq does not know, and a port that is no port.
    let out = check(format!("{}&sslcompresion=1", env.source_url()), env.target_url())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("unknown option `sslcompresion`"),
        "{}",
        text(&out)
    );
    let bad_port = env
        .source_url()
        .replace(&format!(":{}/", env.source.port()), ":54x2/");
    let out = check(bad_port, env.target_url()).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("`port`"), "{}", text(&out));
    assert!(!text(&out).contains("odd@chars"), "{}", text(&out));
    // A setting misspelt in the environment names its variable.
    let out = env
        .cmd(&["check"])
        .env("PGFERRY_SYNC__POLL_INTERVAL", "50")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(
            "PGFERRY_SYNC__POLL_INTERVAL is not a setting: did you mean PGFERRY_SYNC__POLL_INTERVAL_MS"
        ),
        "{}",
        text(&out)
    );
    // verify meets an unreachable target as the other commands do.
    let gone = env
        .target_url()
        .replace(&format!(":{}/", env.target.port()), &format!(":{}/", free_port()));
    let out = env
        .cmd(&["verify"])
        .env("PGFERRY_TARGET", gone)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

/// Cleanup of the source works with the source URL alone, from any machine
/// (the target may be gone, or its URL not at hand); status too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_is_cleaned_up_with_its_url_alone() {
    let env = seeded().await;
    env.config("[sync]\npoll_interval_ms = 50\n");
    env.ok(&["install"]).await;
    for args in [&["status"][..], &["cleanup", "--json"][..]] {
        let out = env.cmd(args).env_remove("PGFERRY_TARGET").output().await.unwrap();
        assert_succeeded(&out, &format!("{args:?} without a target"));
    }
    let gone: bool = env
        .source_as(APP)
        .await
        .query_one(
            "SELECT to_regnamespace('pgferry') IS NULL AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname LIKE 'pgferry%')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(gone, "nothing of pgferry's is left on the source");
}

/// On a terminal shorter than the copy's bars (tmux, 8 rows), the bars
/// never wipe a log line already printed, and each finished table leaves
/// its total behind, as read from tmux's rendered screen and scrollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_on_a_small_terminal_keeps_every_log_line_and_each_total() {
    let env = seeded().await;
    env.ok(&["install"]).await;
    let socket = env.path("tmux.sock");
    let done = env.path("copy-done");
    let tmux = |args: &[&str]| {
        let out = std::process::Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args(args)
            .output()
            .expect("tmux (Debian package tmux, installed by scripts/install-deps)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let command = format!("{} copy; touch '{}'; exec sleep 300", crate::BIN, done.display());
    tmux(&[
        "new-session",
        "-d",
        "-s",
        "copy",
        "-x",
        "120",
        "-y",
        "8",
        "-e",
        &format!("PGFERRY_SOURCE={}", env.source_url()),
        "-e",
        &format!("PGFERRY_TARGET={}", env.target_url()),
        "-e",
        "PGFERRY_METRICS__LISTEN=off",
        "-e",
        "PGFERRY_COPY__WORKERS=2",
        &command,
    ]);
    wait_for(
        "the copy on the terminal",
        std::time::Duration::from_secs(120),
        || async { done.exists().then_some(()) },
    )
    .await;
    let screen = tmux(&["capture-pane", "-p", "-J", "-S", "-", "-t", "copy"]);
    tmux(&["kill-server"]);
    let copied = screen.lines().filter(|l| l.contains("Table copied")).count();
    assert_eq!(
        copied, 7,
        "every table's log line is still on the terminal:\n{screen}"
    );
    for rows in ["9000 rows", "3000 rows", "1000 rows", "500 rows", "100 rows"] {
        assert!(
            screen.contains(rows),
            "a finished table's total ({rows}) stays:\n{screen}"
        );
    }
}
