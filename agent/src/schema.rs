//! Schema transfer with `pg_dump`/`pg_restore`.
//!
//! The schema is dumped afresh from the source whenever a step needs it (it is
//! cheap, and keeps no local state), excluding pgferry's own schema. Its table
//! of contents is split into three steps:
//! - pre-data (types, tables, functions, sequences) before the copy, in one
//!   transaction, so an interrupted restore leaves nothing behind;
//! - everything that must not act during sync (policies, rules, comments that
//!   may refer to triggers, extended statistics) at cutover.
//!
//! Keys and indexes (after the copy, `copy::indexes`) and foreign keys and
//! triggers (at cutover, `cutover::objects`) are built from the catalog
//! instead: each statement is idempotent by name, and pgferry's own capture
//! triggers are told apart from the application's by their function's schema.
//!
//! Passwords reach the child processes through the environment, never argv.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use crate::db::endpoint::Endpoint;
use crate::scratch::Scratch;

/// Schema transfer failures.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The client tools are missing.
    #[error("{tool} was not found in pg_bin_dir, PATH or /usr/lib/postgresql/*/bin")]
    ToolMissing {
        /// Which tool.
        tool: &'static str,
    },
    /// A tool could not be started or its output read.
    #[error("could not run {tool}")]
    Spawn {
        /// Which tool.
        tool: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The scratch directory for a dump could not be created.
    #[error("cannot create a scratch directory for the schema dump")]
    Scratch(#[source] std::io::Error),
    /// A tool ran and failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        /// Which tool and step.
        tool: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// What it printed (last lines).
        stderr: String,
    },
}

impl crate::error::Failure for SchemaError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

/// What a client tool prints for failures a later attempt may get past: a
/// connection lost, refused or cut (libpq's messages, in the C locale the
/// tools run in), a server starting, stopping or out of slots, a lock or
/// serialization conflict, a standby's recovery conflict (`copy.from` a
/// replica), a pooler's server connection gone.
const TRANSIENT: &[&str] = &[
    "could not connect",
    "connection to server",
    "server closed the connection",
    "could not receive data from server",
    "could not send data to server",
    "no connection to the server",
    "lost synchronization with server",
    "ssl syscall error",
    "ssl connection has been closed",
    "timeout expired",
    "terminating connection",
    "the database system is",
    "too many connections",
    "remaining connection slots",
    "lock timeout",
    "could not obtain lock",
    "deadlock detected",
    "could not serialize access",
    "conflict with recovery",
    "server conn crashed",
    "query_wait_timeout",
];

impl SchemaError {
    /// True when running the tool again may succeed: it was killed, or
    /// failed on something [`TRANSIENT`]. A failure on the schema itself (an
    /// extension the target role may not create, a missing role or type)
    /// would recur on every attempt, and is reported at once.
    pub fn is_retryable(&self) -> bool {
        match self {
            SchemaError::Failed { status, stderr, .. } => {
                let stderr = stderr.to_lowercase();
                status.code().is_none() || TRANSIENT.iter().any(|m| stderr.contains(m))
            }
            _ => false,
        }
    }
}

/// A schema archive in a scratch directory of its own, removed (with the
/// lists written next to the archive) when this is dropped.
#[derive(Debug)]
pub struct SchemaDump {
    /// The archive.
    pub archive: PathBuf,
    _scratch: Scratch,
}

/// Located `pg_dump`/`pg_restore` binaries and their major version.
#[derive(Debug, Clone)]
pub struct PgTools {
    /// pg_dump.
    pub pg_dump: PathBuf,
    /// pg_restore.
    pub pg_restore: PathBuf,
    /// pg_dumpall (roles).
    pub pg_dumpall: PathBuf,
    /// Major version of pg_dump.
    pub major: u32,
}

impl PgTools {
    /// Finds the tools: `pg_bin_dir`, then `PATH`, then the newest
    /// `/usr/lib/postgresql/*/bin`.
    pub async fn locate(bin_dir: Option<&Path>) -> Result<Self, SchemaError> {
        let dir = match bin_dir {
            Some(d) => Some(d.to_path_buf()),
            None => search_dirs().into_iter().find(|d| d.join("pg_dump").is_file()),
        };
        let dir = dir.ok_or(SchemaError::ToolMissing { tool: "pg_dump" })?;
        let pg_dump = dir.join("pg_dump");
        let pg_restore = dir.join("pg_restore");
        let pg_dumpall = dir.join("pg_dumpall");
        if !pg_dump.is_file() {
            return Err(SchemaError::ToolMissing { tool: "pg_dump" });
        }
        if !pg_restore.is_file() {
            return Err(SchemaError::ToolMissing { tool: "pg_restore" });
        }
        let out = Command::new(&pg_dump)
            .arg("--version")
            .output()
            .await
            .map_err(|source| SchemaError::Spawn {
                tool: "pg_dump".into(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let major = text
            .split_whitespace()
            .last()
            .and_then(|v| v.split('.').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(Self {
            pg_dump,
            pg_restore,
            pg_dumpall,
            major,
        })
    }

    /// Dumps the source schema (custom format) into a scratch directory of
    /// its own; waits at most `lock_wait_ms` for each table lock so it never
    /// queues the application. With `privileges`, grants and default
    /// privileges are in the archive.
    pub async fn dump_schema(
        &self,
        source: &Endpoint,
        lock_wait_ms: u64,
        privileges: bool,
    ) -> Result<SchemaDump, SchemaError> {
        self.dump_schema_of(source, lock_wait_ms, privileges, &[]).await
    }

    /// [`PgTools::dump_schema`] of some tables only (`pg_dump --table`, each
    /// name quoted so that it matches itself and nothing else); all of them
    /// when `tables` is empty.
    pub async fn dump_schema_of(
        &self,
        source: &Endpoint,
        lock_wait_ms: u64,
        privileges: bool,
        tables: &[crate::db::ident::QualifiedTable],
    ) -> Result<SchemaDump, SchemaError> {
        let scratch =
            Scratch::new_in(&std::env::temp_dir(), "pgferry-schema-").map_err(SchemaError::Scratch)?;
        let archive = scratch.path().join("schema.dump");
        let mut cmd = Command::new(&self.pg_dump);
        cmd.args(["--format=custom", "--schema-only", "--no-owner"]);
        if !privileges {
            cmd.arg("--no-privileges");
        }
        for t in tables {
            cmd.arg(format!("--table={t}"));
        }
        cmd.arg("--exclude-schema=pgferry")
            .arg(format!("--lock-wait-timeout={lock_wait_ms}"))
            .arg("--file")
            .arg(&archive);
        run(cmd, source, "pg_dump").await?;
        Ok(SchemaDump {
            archive,
            _scratch: scratch,
        })
    }

    /// Dumps the data of `tables` (quoted names) into the new directory
    /// `dir` with `jobs` parallel workers sharing one snapshot (`pg_dump -Fd
    /// -j`), waiting at most `lock_wait_ms` for each table lock.
    pub async fn dump_data(
        &self,
        source: &Endpoint,
        dir: &Path,
        tables: &[String],
        jobs: usize,
        lock_wait_ms: u64,
    ) -> Result<(), SchemaError> {
        let mut cmd = Command::new(&self.pg_dump);
        cmd.args(["--format=directory", "--data-only", "--no-sync"])
            .arg(format!("--jobs={jobs}"))
            // lz4 (pg_dump 16+) costs a fraction of the default gzip's CPU.
            .arg(if self.major >= 16 {
                "--compress=lz4"
            } else {
                "--compress=0"
            })
            .arg(format!("--lock-wait-timeout={lock_wait_ms}"))
            .arg("--file")
            .arg(dir);
        for t in tables {
            cmd.arg(format!("--table={t}"));
        }
        run(cmd, source, "pg_dump (data)").await
    }

    /// Restores a [`PgTools::dump_data`] directory into the target with
    /// `jobs` parallel workers; `options` become the sessions' PGOPTIONS.
    pub async fn restore_data(
        &self,
        target: &Endpoint,
        dir: &Path,
        jobs: usize,
        options: Option<String>,
    ) -> Result<(), SchemaError> {
        let mut cmd = Command::new(&self.pg_restore);
        cmd.args(["--data-only", "--no-owner", "--exit-on-error"])
            .arg(format!("--jobs={jobs}"))
            .arg(format!("--dbname={}", target.dbname()))
            .arg(dir);
        run_with(
            cmd,
            target,
            "pg_restore (data)",
            options.map(|o| ("PGOPTIONS", o)),
        )
        .await
    }

    /// The archive's table of contents for one section.
    pub async fn toc(&self, archive: &Path, section: &str) -> Result<Vec<TocEntry>, SchemaError> {
        let out = Command::new(&self.pg_restore)
            .arg("--list")
            .arg(format!("--section={section}"))
            .arg(archive)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| SchemaError::Spawn {
                tool: "pg_restore --list".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(SchemaError::Failed {
                tool: "pg_restore --list".into(),
                status: out.status,
                stderr: tail(&out.stderr),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(TocEntry::parse)
            .collect())
    }

    /// One section of `archive` as SQL, as the pre-data is restored: without
    /// owners, grants or tablespaces.
    pub async fn section_sql(&self, archive: &Path, section: &str) -> Result<String, SchemaError> {
        let mut cmd = Command::new(&self.pg_restore);
        cmd.arg(format!("--section={section}"))
            .args(["--no-owner", "--no-privileges", "--no-tablespaces", "--file=-"])
            .arg(archive);
        script(cmd, format!("pg_restore ({section})")).await
    }

    /// Restores the pre-data section into the target in one transaction.
    /// Everything lands in the target's default tablespace: Aurora has no
    /// others, and RDS only those made there (`check` warns).
    pub async fn restore_pre_data(&self, target: &Endpoint, archive: &Path) -> Result<(), SchemaError> {
        let mut cmd = Command::new(&self.pg_restore);
        cmd.args([
            "--section=pre-data",
            "--no-owner",
            "--no-privileges",
            "--no-tablespaces",
            "--single-transaction",
            "--exit-on-error",
        ])
        .arg(format!("--dbname={}", target.dbname()))
        .arg(archive);
        run(cmd, target, "pg_restore (pre-data)").await
    }

    /// Restores `entries` of `archive` into the target in one transaction,
    /// as [`PgTools::restore_pre_data`] restores its section.
    pub async fn restore_entries(
        &self,
        target: &Endpoint,
        archive: &Path,
        entries: &[TocEntry],
        step: &str,
    ) -> Result<(), SchemaError> {
        if entries.is_empty() {
            return Ok(());
        }
        let list = write_list(archive, entries, step).await?;
        let mut cmd = Command::new(&self.pg_restore);
        cmd.args([
            "--no-owner",
            "--no-privileges",
            "--no-tablespaces",
            "--single-transaction",
            "--exit-on-error",
        ])
        .arg("--use-list")
        .arg(&list)
        .arg(format!("--dbname={}", target.dbname()))
        .arg(archive);
        run(cmd, target, &format!("pg_restore ({step})")).await
    }

    /// The source's roles as SQL (`pg_dumpall --roles-only
    /// --no-role-passwords`, which needs no superuser), read through the
    /// source database itself.
    pub async fn roles_sql(&self, source: &Endpoint) -> Result<String, SchemaError> {
        let mut cmd = Command::new(&self.pg_dumpall);
        cmd.args(["--roles-only", "--no-role-passwords"])
            .arg(format!("--database={}", source.dbname()))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(source.libpq_env())
            .stdin(Stdio::null());
        let out = cmd.output().await.map_err(|source| SchemaError::Spawn {
            tool: "pg_dumpall".into(),
            source,
        })?;
        if !out.status.success() {
            return Err(SchemaError::Failed {
                tool: "pg_dumpall --roles-only".into(),
                status: out.status,
                stderr: tail(&out.stderr),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The SQL that restoring `entries` would run (`pg_restore --file=-`),
    /// for callers that run it statement by statement.
    pub async fn entries_sql(
        &self,
        archive: &Path,
        entries: &[TocEntry],
        step: &str,
    ) -> Result<String, SchemaError> {
        if entries.is_empty() {
            return Ok(String::new());
        }
        let list = write_list(archive, entries, step).await?;
        let mut cmd = Command::new(&self.pg_restore);
        cmd.args(["--no-owner", "--no-tablespaces", "--use-list"])
            .arg(&list)
            .arg("--file=-")
            .arg(archive);
        script(cmd, format!("pg_restore ({step})")).await
    }
}

/// Writes the `--use-list` file selecting `entries` next to the archive.
async fn write_list(archive: &Path, entries: &[TocEntry], step: &str) -> Result<PathBuf, SchemaError> {
    let list = archive.with_extension(format!("{step}.list"));
    let text: String = entries.iter().map(|e| format!("{}\n", e.line)).collect();
    tokio::fs::write(&list, text)
        .await
        .map_err(|source| SchemaError::Spawn {
            tool: format!("pg_restore ({step})"),
            source,
        })?;
    Ok(list)
}

/// Where PostgreSQL binaries are looked for: `PATH`, then
/// `/usr/lib/postgresql/*/bin`, newest version first.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versioned.sort_by_key(|v| std::cmp::Reverse(v.0));
    dirs.extend(versioned.into_iter().map(|(_, p)| p));
    dirs
}

async fn run(cmd: Command, ep: &Endpoint, tool: &str) -> Result<(), SchemaError> {
    run_with(cmd, ep, tool, None).await
}

async fn run_with(
    mut cmd: Command,
    ep: &Endpoint,
    tool: &str,
    extra: Option<(&'static str, String)>,
) -> Result<(), SchemaError> {
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(ep.libpq_env())
        .envs(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = cmd.output().await.map_err(|source| SchemaError::Spawn {
        tool: tool.to_string(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SchemaError::Failed {
            tool: tool.to_string(),
            status: out.status,
            stderr: tail(&out.stderr),
        })
    }
}

/// Runs a pg_restore that prints SQL (`--file=-`); returns the SQL.
async fn script(mut cmd: Command, tool: String) -> Result<String, SchemaError> {
    let out = match cmd.stdin(Stdio::null()).output().await {
        Ok(out) => out,
        Err(source) => return Err(SchemaError::Spawn { tool, source }),
    };
    if !out.status.success() {
        return Err(SchemaError::Failed {
            tool,
            status: out.status,
            stderr: tail(&out.stderr),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    // pg_restore quotes the statement that failed ("Command was: ..."),
    // which for a routine is its code, and code may hold a secret: the
    // error says what failed, never the statement.
    let mut quoting = false;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            if l.starts_with("Command was:") {
                quoting = true;
            } else if l.starts_with("pg_restore:") || l.starts_with("pg_dump:") {
                quoting = false;
            }
            !quoting
        })
        .collect();
    lines[lines.len().saturating_sub(6)..].join(" | ")
}

/// Where a post-data archive entry is restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// At cutover, before writes move: policies, rules, comments, statistics.
    AtCutover,
    /// At cutover, leniently: grants and default privileges.
    Grants,
    /// Never by pg_restore: keys, indexes, foreign keys and triggers come from
    /// the catalog; publications, subscriptions and event triggers are not
    /// migrated.
    Never,
}

/// One line of `pg_restore --list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocEntry {
    /// The line as printed (fed back with `--use-list`).
    pub line: String,
    /// The entry type (`INDEX`, `FK CONSTRAINT`, ...).
    pub desc: &'static str,
}

/// Entry types, longest first so that `FK CONSTRAINT` is not read as `CONSTRAINT`.
const DESCS: &[(&str, Step)] = &[
    ("PUBLICATION TABLES IN SCHEMA", Step::Never),
    ("PUBLICATION TABLE", Step::Never),
    ("MATERIALIZED VIEW DATA", Step::Never),
    ("CHECK CONSTRAINT", Step::Never),
    ("FK CONSTRAINT", Step::Never),
    ("EVENT TRIGGER", Step::Never),
    ("SECURITY LABEL", Step::AtCutover),
    ("INDEX ATTACH", Step::Never),
    ("TABLE ATTACH", Step::Never),
    ("DEFAULT ACL", Step::Grants),
    ("ROW SECURITY", Step::AtCutover),
    ("SUBSCRIPTION", Step::Never),
    ("PUBLICATION", Step::Never),
    ("STATISTICS", Step::AtCutover),
    ("CONSTRAINT", Step::Never),
    ("TRIGGER", Step::Never),
    ("COMMENT", Step::AtCutover),
    ("POLICY", Step::AtCutover),
    ("INDEX", Step::Never),
    ("ACL", Step::Grants),
    ("RULE", Step::AtCutover),
];

impl TocEntry {
    /// Parses `123; 2606 16413 CONSTRAINT public t t_pkey owner`; comments
    /// and blank lines give `None`. Unknown types are kept with step `Never`.
    pub fn parse(line: &str) -> Option<Self> {
        let line = line.trim_end();
        if line.starts_with(';') || line.is_empty() {
            return None;
        }
        let (_, rest) = line.split_once("; ")?;
        let mut parts = rest.splitn(3, ' ');
        let (_catalog, _oid, rest) = (parts.next()?, parts.next()?, parts.next()?);
        let desc = DESCS
            .iter()
            .map(|(d, _)| *d)
            .find(|d| rest.starts_with(d) && rest[d.len()..].starts_with(' '))
            .unwrap_or("OTHER");
        Some(Self {
            line: line.to_string(),
            desc,
        })
    }

    /// The step that restores this entry.
    pub fn step(&self) -> Step {
        DESCS
            .iter()
            .find(|(d, _)| *d == self.desc)
            .map_or(Step::Never, |(_, s)| *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_statement_is_not_quoted_in_the_error() {
        let stderr = b"pg_restore: error: could not execute query: ERROR:  syntax error at or near \"x\"\n\
Command was: CREATE FUNCTION f() RETURNS text LANGUAGE sql\n    AS $$ SELECT 'postgres://u:s3cret@h/db' $$;\n\
pg_restore: warning: errors ignored on restore: 1\n";
        let said = tail(stderr);
        assert!(
            !said.contains("s3cret") && !said.contains("Command was"),
            "{said}"
        );
        assert!(
            said.contains("syntax error") && said.contains("errors ignored"),
            "{said}"
        );
    }

    #[test]
    fn classifies_post_data_entries_exactly() {
        let cases = [
            (
                "3219; 2606 16413 CONSTRAINT public child child_pkey app",
                "CONSTRAINT",
                Step::Never,
            ),
            (
                "3220; 2606 16414 FK CONSTRAINT public child child_pid_fkey app",
                "FK CONSTRAINT",
                Step::Never,
            ),
            (
                "3217; 1259 16419 INDEX public child_n_idx app",
                "INDEX",
                Step::Never,
            ),
            (
                "3221; 2620 16399 TRIGGER public t pgferry_capture_ins app",
                "TRIGGER",
                Step::Never,
            ),
            (
                "3300; 0 0 COMMENT public INDEX child_n_idx app",
                "COMMENT",
                Step::AtCutover,
            ),
            (
                "3301; 0 16500 INDEX ATTACH public p1_idx app",
                "INDEX ATTACH",
                Step::Never,
            ),
            (
                "3302; 1259 16501 MATERIALIZED VIEW DATA public mv app",
                "MATERIALIZED VIEW DATA",
                Step::Never,
            ),
        ];
        for (line, desc, step) in cases {
            let e = TocEntry::parse(line).unwrap();
            assert_eq!(e.desc, desc, "{line}");
            assert_eq!(e.step(), step, "{line}");
        }
        assert!(TocEntry::parse(";\n").is_none());
        assert!(TocEntry::parse("; Archive created at").is_none());
    }

    #[test]
    fn only_failures_another_attempt_may_get_past_are_retried() {
        use std::os::unix::process::ExitStatusExt;
        let failed = |raw: i32, stderr: &str| SchemaError::Failed {
            tool: "pg_restore (pre-data)".into(),
            status: std::process::ExitStatus::from_raw(raw),
            stderr: stderr.into(),
        };
        let exited = |stderr: &str| failed(1 << 8, stderr);
        for transient in [
            "pg_restore: error: connection to server at \"db.example\" (10.0.0.5), port 5432 failed: Connection refused",
            "pg_dump: error: Dumping the contents of table \"t\" failed: PQgetResult() failed. | \
             pg_dump: detail: Error message from server: server closed the connection unexpectedly",
            "pg_restore: error: could not execute query: FATAL:  terminating connection due to administrator command",
            "pg_dump: error: query failed: ERROR:  canceling statement due to lock timeout",
            "pg_dump: error: query failed: FATAL:  remaining connection slots are reserved for non-replication superuser connections",
            "pg_dump: error: connection to server on socket \"/tmp/.s.PGSQL.5432\" failed: FATAL:  the database system is starting up",
        ] {
            assert!(exited(transient).is_retryable(), "{transient}");
        }
        for lasting in [
            "pg_restore: error: could not execute query: ERROR:  permission denied to create extension \"pg_buffercache\" | \
             HINT:  Must be superuser to create this extension.",
            "pg_restore: error: could not execute query: ERROR:  role \"auditor\" does not exist",
            "pg_restore: error: could not execute query: ERROR:  type \"public.mood\" does not exist",
        ] {
            assert!(!exited(lasting).is_retryable(), "{lasting}");
        }
        // Killed (SIGKILL): whatever it printed, another run may finish.
        assert!(failed(9, "").is_retryable());
        assert!(!SchemaError::ToolMissing { tool: "pg_dump" }.is_retryable());
    }
}
