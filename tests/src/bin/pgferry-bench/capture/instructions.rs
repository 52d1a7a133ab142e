//! Instruction counts with valgrind's callgrind, on the stopped source:
//! what one single-row UPDATE and one pgbench TPC-B-like transaction cost
//! the server in each mode, figures that do not move with the machine's
//! load as TPS and CPU time do.

use std::time::Instant;

use pgferry::sandbox::Cluster;

use super::{mode_sql, update_loop};

/// The lengths, in transactions, of the two instruction counts whose
/// difference is taken.
const COUNTED_TXNS: [u32; 2] = [1_000, 5_000];

/// Runs `script` on the stopped source in single-user mode (`-j`: a
/// statement ends at a semicolon followed by a blank line), under valgrind's
/// callgrind when `counted`. Returns what the server printed.
fn single_user(source: &Cluster, script: &str, counted: bool) -> String {
    use std::io::Write;
    let postgres = source.bin_dir().join("postgres");
    let mut cmd = if counted {
        let mut c = callgrind();
        c.arg(postgres);
        c
    } else {
        std::process::Command::new(postgres)
    };
    cmd.args(["--single", "-j", "-D"])
        .arg(source.data_dir())
        .arg("bench")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = source
        .as_owner(&mut cmd)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", if counted { NO_VALGRIND } else { "postgres --single" }));
    // Small enough for the pipe: written whole before reading the output.
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("the single-user script");
    let out = child.wait_with_output().expect("single-user server");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("ERROR:"),
        "single-user run failed: {text}"
    );
    text
}

/// valgrind counting instructions with callgrind (the count is read from
/// its log, so no output file).
fn callgrind() -> std::process::Command {
    let mut c = std::process::Command::new("valgrind");
    c.args(["--tool=callgrind", "--callgrind-out-file=/dev/null"]);
    c
}

/// What failed to start, for a panic message.
const NO_VALGRIND: &str = "valgrind (Debian package valgrind; scripts/bench installs it)";

/// The instruction count callgrind reports in `text` (`Collected : N`).
fn collected(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .and_then(|n| n.trim().parse().ok())
}

/// Machine instructions that one single-row UPDATE transaction of
/// pgbench_tellers (`tellers` rows) costs the server in `mode`. The stopped
/// source runs in single-user mode under valgrind's callgrind, which counts
/// the instructions executed: the same count whatever else the machine is
/// doing, where CPU time moved by half the capture's cost between runs. Two
/// runs of different length, so that starting the server and selecting the
/// mode cancel out in their difference.
pub(super) fn instructions_per_update(source: &Cluster, mode: &str, tellers: u32) -> f64 {
    let count = |txns: u32| -> f64 {
        let script = format!(
            "{}\n\nVACUUM FULL pgbench_tellers;\n\n{};\n\n",
            mode_sql(mode),
            update_loop(txns, tellers)
        );
        let text = single_user(source, &script, true);
        collected(&text).unwrap_or_else(|| panic!("no instruction count from callgrind: {text}"))
    };
    let [short, long] = COUNTED_TXNS;
    (count(long) - count(short)) / f64::from(long - short)
}

/// The lengths, in pgbench transactions, of the two TPC-B counts whose
/// difference is taken.
const COUNTED_TPCB: [u32; 2] = [200, 1_200];

/// Machine instructions that one transaction of pgbench's TPC-B-like script
/// (the TPS rounds' workload, one client) costs the server in `mode`. The
/// stopped source, with the mode selected and vacuumed, is started under
/// callgrind, which follows every process the server forks and logs each
/// one's count when it exits. pgbench runs twice with the same random seed,
/// after a first connection that builds the caches later ones read; each
/// run's backends are summed once they have all exited, and the difference
/// is divided by the difference in transactions. A CPU-bound server's TPS
/// falls as its instructions per transaction rise: `1 - none / mode` is the
/// TPS loss without the noise of the machine or of concurrency.
pub(super) fn tpcb_instructions(source: &Cluster, mode: &str) -> f64 {
    single_user(source, &format!("{}\n\nVACUUM;\n\n", mode_sql(mode)), false);
    let prefix = format!("callgrind-{mode}-");
    let logs = || -> std::collections::BTreeSet<std::path::PathBuf> {
        std::fs::read_dir(source.socket_dir())
            .expect("the cluster's directory")
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            })
            .collect()
    };
    let server_log = std::fs::File::create(source.socket_dir().join(format!("{prefix}server.out")))
        .expect("the counted server's log");
    let mut cmd = callgrind();
    cmd.arg(format!(
        "--log-file={}",
        source.socket_dir().join(format!("{prefix}%p.log")).display()
    ))
    .arg(source.bin_dir().join("postgres"))
    .arg("-D")
    .arg(source.data_dir())
    .args(source.server_options())
    .args(["-c", "autovacuum=off"])
    .stdin(std::process::Stdio::null())
    .stdout(server_log.try_clone().expect("log"))
    .stderr(server_log);
    let mut server = source
        .as_owner(&mut cmd)
        .spawn()
        .unwrap_or_else(|e| panic!("{NO_VALGRIND}: {e}"));
    let env = crate::pgbench_env(source);
    let until = |what: &str, done: &mut dyn FnMut() -> bool| {
        let deadline = Instant::now() + std::time::Duration::from_secs(300);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: still waiting after 300 s");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    until("the counted server to accept connections", &mut || {
        std::process::Command::new(source.bin_dir().join("pg_isready"))
            .envs(env.clone())
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let pgbench = |txns: u32| -> f64 {
        let before = logs();
        let out = std::process::Command::new(source.bin_dir().join("pgbench"))
            .args(["-n", "-c", "1", "-t", &txns.to_string(), "--random-seed=1"])
            .envs(env.clone())
            .output()
            .expect("pgbench");
        assert!(
            out.status.success(),
            "pgbench under callgrind: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // This run's backends log their counts as they exit, after pgbench.
        let mut total = 0.0;
        until("this run's backends to exit", &mut || {
            let counts: Option<Vec<f64>> = logs()
                .difference(&before)
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .map(|p| collected(&std::fs::read_to_string(p).unwrap_or_default()))
                .collect();
            total = counts.map_or(0.0, |c| c.iter().sum());
            total > 0.0
        });
        total
    };
    pgbench(1);
    let [short, long] = COUNTED_TPCB;
    let short_run = pgbench(short);
    let long_run = pgbench(long);
    let per_txn = (long_run - short_run) / f64::from(long - short);
    let st = source
        .as_owner(
            std::process::Command::new(source.bin_dir().join("pg_ctl"))
                .args(["stop", "-m", "fast", "-w", "-D"])
                .arg(source.data_dir())
                .stdout(std::process::Stdio::null()),
        )
        .status()
        .expect("pg_ctl stop");
    assert!(st.success(), "stopping the counted server failed");
    server.wait().expect("the counted server");
    per_txn
}
