//! End-to-end harness: real PostgreSQL clusters, the real agent binary, live
//! writers, and a comparison of source and target that does not use pgferry.
//!
//! Every test gets its own source and target clusters (initdb takes half a
//! second). The source's owner role is NOSUPERUSER NOREPLICATION (like a Heroku
//! credential) and a second role writes too; the target's owner is
//! NOSUPERUSER with CREATEROLE (like the RDS master user). All agent traffic
//! is password-authenticated TCP on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgferry::sandbox::Cluster;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_postgres::{Client, NoTls};

/// Source owner (Heroku-like).
pub const APP: (&str, &str) = ("app", "app pw/with:odd@chars");
/// Second application role on the source.
pub const WRITER: (&str, &str) = ("writer2", "writer-pw");
/// Target owner (RDS-master-like).
pub const MASTER: (&str, &str) = ("rds_master", "master-pw");
/// Database name on both sides.
pub const DB: &str = "appdb";

/// One test's world: two clusters, a scratch directory and the agent binary.
pub struct Env {
    /// The source cluster.
    pub source: Cluster,
    /// The target cluster.
    pub target: Cluster,
    /// Scratch directory (config files, signal files).
    pub dir: tempfile::TempDir,
    bin: PathBuf,
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Env {
    /// Starts both clusters and creates the roles and databases.
    pub async fn new(bin: &str) -> Env {
        let (source, target) = tokio::try_join!(Cluster::start("e2e-source"), Cluster::start("e2e-target"))
            .expect("start clusters");
        source
            .create_role(
                APP.0,
                APP.1,
                "NOSUPERUSER NOREPLICATION NOCREATEDB NOCREATEROLE",
                Some(DB),
            )
            .await
            .expect("source owner");
        source
            .create_role(WRITER.0, WRITER.1, "NOSUPERUSER NOREPLICATION", None)
            .await
            .expect("second role");
        target
            .create_role(
                MASTER.0,
                MASTER.1,
                "NOSUPERUSER NOREPLICATION CREATEDB CREATEROLE",
                Some(DB),
            )
            .await
            .expect("target owner");
        Env {
            source,
            target,
            dir: tempfile::tempdir().expect("scratch dir"),
            bin: PathBuf::from(bin),
        }
    }

    /// Source URL of the owner role.
    pub fn source_url(&self) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{DB}?sslmode=disable",
            APP.0,
            enc(APP.1),
            self.source.port()
        )
    }

    /// Target URL of the master role.
    pub fn target_url(&self) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{DB}?sslmode=disable",
            MASTER.0,
            enc(MASTER.1),
            self.target.port()
        )
    }

    /// A session on the source as `role`.
    pub async fn source_as(&self, role: (&str, &str)) -> Client {
        connect(self.source.port(), role).await
    }

    /// Runs `sql` on the source as its superuser: setup that the
    /// application's role may not do.
    pub async fn source_superuser(&self, sql: &str) {
        self.source
            .superuser(DB)
            .await
            .expect("superuser on the source")
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// A session on the target as the master role (over the unix socket,
    /// so it works whatever the target demands of TCP clients, TLS included).
    pub async fn target_client(&self) -> Client {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(self.target.socket_dir())
            .port(self.target.port())
            .user(MASTER.0)
            .dbname(DB);
        let (client, conn) = cfg.connect(NoTls).await.expect("connect to the target");
        tokio::spawn(conn);
        client
    }

    /// A path in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a config file and returns its path.
    pub fn config(&self, toml: &str) -> PathBuf {
        let p = self.path("pgferry.toml");
        std::fs::write(&p, toml).expect("write config");
        p
    }

    /// The agent command, with URLs in the environment (never argv).
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("PGFERRY_SOURCE", self.source_url())
            .env("PGFERRY_TARGET", self.target_url())
            .env("PGFERRY_LOG", "info")
            .env("PGFERRY_METRICS__LISTEN", "off")
            // The agent's scratch (schema dumps) goes with the test's: an
            // agent killed on purpose cannot remove its own.
            .env("TMPDIR", self.dir.path())
            .env_remove("PGFERRY_FAILPOINTS")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let cfg = self.path("pgferry.toml");
        if cfg.exists() {
            cmd.arg("--config").arg(cfg);
        }
        cmd
    }

    /// Runs the agent to completion.
    pub async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.cmd(args);
        // Debugging aid: E2E_AGENT_LOG=/path keeps the agent's log of the
        // latest run in a file (it is not printed then).
        if let Ok(f) = std::env::var("E2E_AGENT_LOG") {
            cmd.stderr(std::fs::File::create(f).expect("agent log"));
        }
        let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("pgferry {args:?} did not finish in 180 s"))
            .expect("run pgferry");
        eprintln!(
            "--- pgferry {args:?} -> {:?}\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs the agent while `alongside` runs; returns as soon as the agent
    /// exits, even if `alongside` is still waiting for something.
    pub async fn run_alongside(
        &self,
        args: &[&str],
        alongside: impl std::future::Future<Output = ()>,
    ) -> Output {
        let run = self.run(args);
        tokio::pin!(run);
        tokio::select! {
            out = &mut run => out,
            () = alongside => run.await,
        }
    }

    /// Runs the agent (a cutover) while `workloads` write. The switch
    /// command of [`gated_switch`] in the config waits for the file
    /// `release`, created here once every writer has been refused by the
    /// fence: that is when the application "moves" to the target.
    pub async fn cutover_while_writing(&self, args: &[&str], workloads: &[&Workload]) -> Output {
        let release = self.path("release");
        let gate = async {
            for w in workloads {
                w.wait_all_fenced().await;
            }
            std::fs::write(&release, "").expect("release the switch");
        };
        self.run_alongside(args, gate).await
    }

    /// Runs the agent and asserts it succeeded; returns stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert_eq!(out.status.code(), Some(0), "pgferry {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the agent and asserts it exited with `code`; returns stderr.
    pub async fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args).await;
        assert_eq!(out.status.code(), Some(code), "pgferry {args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Starts the agent with failpoints armed and waits until it freezes at
    /// one; returns the frozen child (its stdout piped). Kill it with
    /// SIGKILL, or create [`Env::failpoint_release`] to let it carry on.
    pub async fn run_until_failpoint(&self, args: &[&str], failpoint: &str) -> Child {
        self.spawn_until_failpoint(self.cmd(args), args, failpoint).await
    }

    /// [`Env::run_until_failpoint`] for a command built by the caller
    /// (from [`Env::cmd`], with more environment).
    pub async fn spawn_until_failpoint(&self, mut cmd: Command, args: &[&str], failpoint: &str) -> Child {
        cmd.env("PGFERRY_FAILPOINTS", failpoint)
            .env("PGFERRY_FAILPOINT_RELEASE", self.failpoint_release())
            .stderr(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn pgferry");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let name = failpoint.split('@').next().unwrap_or(failpoint).to_string();
        let want = format!("pgferry failpoint reached: {name}");
        let mut before = Vec::new();
        let found = tokio::time::timeout(Duration::from_secs(120), async {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[agent] {line}");
                let reached = line.contains(&want);
                before.push(line);
                if reached {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(
            found,
            Ok(true),
            "pgferry {args:?} never reached failpoint {failpoint}"
        );
        // Keep draining stderr so the frozen agent never blocks on a full
        // pipe, into a file [`Env::wait_for_log`] reads, after the lines
        // up to the failpoint.
        let pid = child.id().expect("running");
        let log = self.path(&format!("agent-{pid}.log"));
        let ended = self.path(&format!("agent-{pid}.log.ended"));
        let mut file = std::fs::File::create(&log).expect("agent log");
        {
            use std::io::Write;
            for line in &before {
                writeln!(file, "{line}").expect("agent log");
            }
        }
        tokio::spawn(async move {
            use std::io::Write;
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(file, "{line}");
            }
            // Every line is in: see [`Env::final_log`].
            let _ = std::fs::write(ended, "");
        });
        child
    }

    /// The whole log of an agent started by [`Env::run_until_failpoint`]
    /// that has exited (`pid`), once its last line is in the file.
    pub async fn final_log(&self, pid: u32) -> String {
        let ended = self.path(&format!("agent-{pid}.log.ended"));
        wait_for("the agent's log to end", Duration::from_secs(10), || async {
            ended.exists().then_some(())
        })
        .await;
        std::fs::read_to_string(self.path(&format!("agent-{pid}.log"))).expect("agent log")
    }

    /// Waits for an agent released from its failpoint; returns its exit
    /// code and its whole log.
    pub async fn exited(&self, agent: &mut Child) -> (Option<i32>, String) {
        let pid = agent.id().expect("running");
        let status = tokio::time::timeout(Duration::from_secs(170), agent.wait())
            .await
            .expect("the agent exits")
            .expect("wait for the agent");
        (status.code(), self.final_log(pid).await)
    }

    /// Waits until an agent started by [`Env::run_until_failpoint`] has
    /// logged a line containing `needle` (before its failpoint too).
    pub async fn wait_for_log(&self, agent: &Child, needle: &str) {
        let log = self.path(&format!("agent-{}.log", agent.id().expect("running")));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(needle) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the agent never logged {needle:?}; it logged:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs the agent until it reaches `failpoint`, and SIGKILLs it there.
    pub async fn kill_at(&self, args: &[&str], failpoint: &str) {
        let mut agent = self.run_until_failpoint(args, failpoint).await;
        agent.kill().await.expect("SIGKILL the agent");
    }

    /// The file that releases a paused failpoint.
    pub fn failpoint_release(&self) -> PathBuf {
        self.path("failpoint-release")
    }

    /// The stored phase, read through `status --json`.
    pub async fn status(&self) -> serde_json::Value {
        let out = self.ok(&["status", "--json"]).await;
        serde_json::from_str(&out).expect("status JSON")
    }
}

/// The last line an agent printed.
pub fn last_line(log: &str) -> &str {
    log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

/// Connects over TCP with a password.
pub async fn connect(port: u16, role: (&str, &str)) -> Client {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(role.0)
        .password(role.1)
        .dbname(DB);
    let (client, conn) = cfg.connect(NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

/// Polls `probe` every 50 ms until it returns `Some`, failing after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// User tables of a database (not pgferry's), as quoted names.
pub async fn user_tables(c: &Client) -> Vec<String> {
    c.query(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
          WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'pgferry') ORDER BY 1",
        &[],
    )
    .await
    .expect("list tables")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn superusers(env: &Env) -> (Client, Client) {
    let (s, t) = tokio::join!(env.source.superuser(DB), env.target.superuser(DB));
    (
        s.expect("superuser on the source"),
        t.expect("superuser on the target"),
    )
}

async fn rows_as_text(c: &Client, table: &str) -> Vec<String> {
    let mut rows: Vec<String> = c
        .query(&format!("SELECT ROW(t.*)::text FROM ONLY {table} AS t"), &[])
        .await
        .unwrap_or_else(|e| panic!("read {table}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    rows.sort();
    rows
}

/// After a cutover: the same rows, then `cleanup`, then the same schema
/// (pgferry's own schema gone from the source, so the two compare whole).
pub async fn assert_same_then_clean_up(env: &Env) {
    assert_same_data(env).await;
    env.ok(&["cleanup"]).await;
    assert_same_schema(env).await;
}

/// Asserts that an agent run exited 0, showing its log if not.
pub fn assert_succeeded(out: &Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that every user table of the source has the same rows on the
/// target, compared row by row as text (before cutover too). Read as
/// superusers, whom no row-level security policy hides a row from.
pub async fn assert_same_rows(env: &Env) {
    let (s, t) = superusers(env).await;
    let tables = user_tables(&s).await;
    assert!(!tables.is_empty());
    assert_eq!(tables, user_tables(&t).await, "table sets differ");
    for table in &tables {
        let (a, b) = (rows_as_text(&s, table).await, rows_as_text(&t, table).await);
        if a != b {
            let only_src: Vec<_> = a.iter().filter(|r| b.binary_search(r).is_err()).take(5).collect();
            let only_tgt: Vec<_> = b.iter().filter(|r| a.binary_search(r).is_err()).take(5).collect();
            panic!(
                "{table} differs: source {} rows, target {} rows\n  only on source: {only_src:?}\n  only on target: {only_tgt:?}",
                a.len(),
                b.len()
            );
        }
    }
}

/// Asserts the same rows on both sides, as [`assert_same_rows`], and that
/// sequences agree (they arrive at cutover).
pub async fn assert_same_data(env: &Env) {
    assert_same_rows(env).await;
    let (s, t) = superusers(env).await;
    let seqs = "SELECT format('%I.%I', schemaname, sequencename), last_value FROM pg_sequences
                 WHERE schemaname <> 'pgferry' ORDER BY 1";
    let state = |rows: Vec<tokio_postgres::Row>| -> Vec<(String, Option<i64>)> {
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    assert_eq!(
        state(s.query(seqs, &[]).await.expect("source sequences")),
        state(t.query(seqs, &[]).await.expect("target sequences")),
        "sequences differ"
    );
}

/// Asserts that neither side holds a trigger, function, table or schema of
/// pgferry's.
pub async fn assert_no_leftovers(env: &Env) {
    for (side, c) in [
        ("source", env.source_as(APP).await),
        ("target", env.target_client().await),
    ] {
        let row = c
            .query_one(
                "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'),
                        (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgferry%'),
                        (SELECT count(*) FROM pg_proc WHERE proname LIKE 'pgferry%' OR proname LIKE 'capture\\_%'),
                        (SELECT count(*) FROM pg_class WHERE relname LIKE 'pgferry%')",
                &[],
            )
            .await
            .expect("look for leftovers");
        let counts: Vec<i64> = (0..4).map(|i| row.get(i)).collect();
        assert_eq!(
            counts,
            vec![0, 0, 0, 0],
            "{side}: schema/trigger/function/table counts of pgferry objects"
        );
    }
}

/// Whether an error is the fence's refusal (SQLSTATE 25006).
pub fn is_fenced(e: &tokio_postgres::Error) -> bool {
    e.code().map(|c| c.code()) == Some("25006")
}

/// Runs `sql` on `c` and asserts the fence refused it; `what` says why it
/// must be.
pub async fn assert_fenced(c: &Client, sql: &str, what: &str) {
    let err = c
        .batch_execute(sql)
        .await
        .expect_err(&format!("{what}: `{sql}` went through"));
    assert!(is_fenced(&err), "{what}: {err}");
}

/// What one writer saw.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Committed transactions.
    pub committed: AtomicU64,
    /// Refused by the fence (the writer then stopped).
    pub fenced: AtomicBool,
}

/// Concurrent application writers.
pub struct Workload {
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    /// Per writer.
    pub stats: Vec<Arc<WriterStats>>,
}

impl Workload {
    /// Starts one writer per role in `roles`, each running `ops` in turn
    /// until stopped or fenced. Errors other than the fence (conflicting
    /// concurrent writers) are part of life and ignored.
    pub async fn start(
        env: &Env,
        roles: &[(&'static str, &'static str)],
        ops: &'static [&'static str],
    ) -> Workload {
        let mut clients = Vec::new();
        for role in roles {
            clients.push(env.source_as(*role).await);
        }
        Workload::start_with(clients, ops)
    }

    /// [`Workload::start`] with sessions of the caller's (on the target,
    /// say): one writer each.
    pub fn start_with(clients: Vec<Client>, ops: &'static [&'static str]) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        let mut stats = Vec::new();
        for (i, c) in clients.into_iter().enumerate() {
            let st = Arc::new(WriterStats::default());
            let (stop, st2) = (stop.clone(), st.clone());
            handles.push(tokio::spawn(async move {
                let mut n: i64 = i as i64 * 7919;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let sql = ops[(n as usize) % ops.len()].replace("$N", &n.to_string());
                    match c.batch_execute(&sql).await {
                        Ok(()) => {
                            st2.committed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if is_fenced(&e) => {
                            st2.fenced.store(true, Ordering::Relaxed);
                            return;
                        }
                        Err(_) => {
                            let _ = c.batch_execute("ROLLBACK").await;
                        }
                    }
                    tokio::task::yield_now().await;
                }
            }));
            stats.push(st);
        }
        Workload { stop, handles, stats }
    }

    /// Total committed transactions so far.
    pub fn committed(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| s.committed.load(Ordering::Relaxed))
            .sum()
    }

    /// Waits until the writers have committed at least `n` more transactions.
    pub async fn progress(&self, n: u64) {
        let goal = self.committed() + n;
        wait_for("writer progress", Duration::from_secs(60), || async {
            (self.committed() >= goal).then_some(())
        })
        .await;
    }

    /// Waits until every writer has been refused by the fence.
    pub async fn wait_all_fenced(&self) {
        wait_for(
            "every writer to hit the fence",
            Duration::from_secs(120),
            || async {
                self.stats
                    .iter()
                    .all(|s| s.fenced.load(Ordering::Relaxed))
                    .then_some(())
            },
        )
        .await;
    }

    /// Stops the writers and waits for them.
    pub async fn stop(self) -> Vec<Arc<WriterStats>> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            h.await.expect("writer task");
        }
        self.stats
    }
}

/// A switch command that announces itself in `started` and waits (at most
/// 120 s) for `release` to exist, so a test decides when the cutover goes on.
pub fn gated_switch(started: &Path, release: &Path) -> String {
    format!(
        "touch '{}'; i=0; while [ ! -e '{}' ]; do i=$((i+1)); [ $i -gt 2400 ] && exit 1; sleep 0.05; done",
        started.display(),
        release.display()
    )
}

/// Asserts that indexes, constraints and triggers of the user tables are the
/// same on both sides (run after cleanup, when pgferry's triggers are gone).
pub async fn assert_same_schema(env: &Env) {
    let (s, t) = (env.source_as(APP).await, env.target_client().await);
    let queries = [
        // Valid indexes (as pg_dump: an invalid one is not migrated).
        "SELECT n.nspname || '.' || c.relname || ': ' || pg_get_indexdef(c.oid)
           FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
            AND i.indisvalid
          ORDER BY 1",
        "SELECT conrelid::regclass::text || '.' || conname || ': ' || pg_get_constraintdef(oid) || ' valid=' || convalidated
           FROM pg_constraint WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
          ORDER BY 1",
        "SELECT tgrelid::regclass::text || ': ' || pg_get_triggerdef(oid) || ' ' || tgenabled::text
           FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1",
    ];
    for q in queries {
        let rows =
            |rows: Vec<tokio_postgres::Row>| -> Vec<String> { rows.iter().map(|r| r.get(0)).collect() };
        let (a, b) = (
            rows(s.query(q, &[]).await.expect(q)),
            rows(t.query(q, &[]).await.expect(q)),
        );
        assert_eq!(a, b, "schema differs for: {q}");
    }
    // Then everything pg_dump says of the schema, line by line.
    let (a, b) = (dump_schema(&env.source), dump_schema(&env.target));
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let only = |x: &[&str], y: &[&str]| -> Vec<String> {
        x.iter()
            .filter(|l| !y.contains(l))
            .map(|l| l.to_string())
            .collect()
    };
    assert!(
        a == b,
        "pg_dump --schema-only differs (in order only, if these are empty)\nsource only: {:#?}\ntarget only: {:#?}",
        only(&a, &b),
        only(&b, &a)
    );
}

/// The schema of the test database as pg_dump prints it, without owners,
/// grants and pgferry's schema (or the random key of `\restrict`).
fn dump_schema(cluster: &Cluster) -> String {
    let mut cmd = std::process::Command::new(cluster.bin_dir().join("pg_dump"));
    cluster.as_owner(&mut cmd).args([
        "--schema-only",
        "--no-owner",
        // Grants to roles the target lacks are reported, not made; the
        // tests of roles and grants compare them.
        "--no-privileges",
        "--exclude-schema=pgferry",
        "--host",
    ]);
    let out = cmd
        .arg(cluster.socket_dir())
        .args([
            "--port",
            &cluster.port().to_string(),
            "--username",
            "postgres",
            DB,
        ])
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("a UTF-8 dump")
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A TCP forwarder on 127.0.0.1 in front of a server, which can cut its live
/// connections on demand (both directions dropped at once, as a broken
/// network path would).
pub struct ChaosProxy {
    /// The port to connect to instead of the server's.
    pub port: u16,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl ChaosProxy {
    /// Starts forwarding to `upstream` (a port on 127.0.0.1).
    pub async fn start(upstream: u16) -> ChaosProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let registry = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let task = tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                let mut list = registry.lock().expect("proxy registry");
                list.retain(|h| !h.is_finished());
                list.push(task.abort_handle());
            }
        });
        ChaosProxy { port, conns, accept }
    }

    /// Cuts one live connection chosen by `pick` (an index, taken modulo the
    /// number of live connections); returns whether there was one to cut.
    pub fn cut(&self, pick: usize) -> bool {
        let mut list = self.conns.lock().expect("proxy registry");
        list.retain(|h| !h.is_finished());
        if list.is_empty() {
            return false;
        }
        let i = pick % list.len();
        let victim = list.swap_remove(i);
        victim.abort();
        true
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for h in self.conns.lock().map(|l| l.clone()).unwrap_or_default() {
            h.abort();
        }
    }
}

impl Env {
    /// The source URL through another port (a proxy).
    pub fn source_url_via(&self, port: u16) -> String {
        self.source_url()
            .replace(&format!(":{}/", self.source.port()), &format!(":{port}/"))
    }

    /// The target URL through another port (a proxy).
    pub fn target_url_via(&self, port: u16) -> String {
        self.target_url()
            .replace(&format!(":{}/", self.target.port()), &format!(":{port}/"))
    }
}

/// A plain HTTP/1.0 GET on 127.0.0.1; the body, or `None` when nothing
/// answers (yet).
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_string())
}

/// Percent-encodes a query-string value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of one sample line `name{labels} value` in Prometheus text, by
/// exact name and a label fragment (`table="public.x"`, or "" for none).
pub fn metric_value(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' ')))
        .find(|l| l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A throwaway certificate authority and a server certificate it signed for
/// `localhost` (not for 127.0.0.1), made with the openssl command.
pub struct TestPki {
    /// The CA certificate (PEM): the `sslrootcert` that makes it trusted.
    pub ca: PathBuf,
    /// The server certificate (PEM).
    pub cert: PathBuf,
    /// The server key (PEM).
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestPki {
    /// Creates the CA and the server certificate.
    pub fn new(name: &str) -> TestPki {
        let dir = tempfile::tempdir().expect("pki dir");
        let p = |f: &str| dir.path().join(f);
        std::fs::write(
            p("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .expect("ext file");
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let subject = format!("/CN={name} test CA");
        run(&[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days",
            "2", "-subj", &subject,
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        TestPki {
            ca: p("ca.crt"),
            cert: p("server.crt"),
            key: p("server.key"),
            _dir: dir,
        }
    }
}

/// A local moto_server (PyPI `moto[server]`) answering the AWS RDS API on
/// 127.0.0.1; stopped when dropped.
pub struct MotoServer {
    /// Its port.
    pub port: u16,
    _child: tokio::process::Child,
}

impl MotoServer {
    /// Starts it and waits until it answers.
    pub async fn start() -> MotoServer {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 -m moto.server (PyPI moto[server], installed by scripts/install-deps)");
        wait_for("moto_server", Duration::from_secs(60), || async {
            http_get(port, "/").await.map(|_| ())
        })
        .await;
        MotoServer { port, _child: child }
    }

    /// Environment that points the AWS SDK at it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}
