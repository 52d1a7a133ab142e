//! Throwaway local PostgreSQL clusters, for the demo and the tests.
//!
//! A cluster lives in its own temporary directory, listens on 127.0.0.1 at a
//! free port and on a unix socket in that directory, trusts local socket
//! connections (its superuser is for setting up roles only) and requires
//! passwords over TCP. When run as root, `initdb` and `pg_ctl` run as the
//! `postgres` OS user. Dropping a cluster stops its postmaster (by its own
//! pid file) and removes the directory.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio_postgres::{Client, NoTls};

/// Sandbox failures.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No PostgreSQL server binaries were found.
    #[error("no PostgreSQL server binaries (initdb, pg_ctl) in PATH or /usr/lib/postgresql/*/bin: install postgresql (apt-get install postgresql)")]
    NoServer,
    /// Running as root but there is no `postgres` OS user to run the server as.
    #[error("running as root, but there is no `postgres` OS user to run PostgreSQL as: create one (useradd --system postgres)")]
    NoPostgresUser,
    /// A file-system step failed.
    #[error("sandbox file operation failed: {0}")]
    Io(String, #[source] std::io::Error),
    /// A server tool failed.
    #[error("{tool} failed: {output}")]
    Tool {
        /// Which tool.
        tool: String,
        /// What it printed.
        output: String,
    },
    /// The superuser session failed.
    #[error("sandbox setup query failed")]
    Query(#[source] tokio_postgres::Error),
}

impl crate::error::Failure for SandboxError {}

/// A running throwaway cluster.
#[derive(Debug)]
pub struct Cluster {
    base: PathBuf,
    bin: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    stopped: bool,
    /// Extra server settings (`name=value`).
    settings: Vec<String>,
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> SandboxError + '_ {
    move |e| SandboxError::Io(what.to_string(), e)
}

/// Finds the directory with `initdb` and `pg_ctl`.
fn server_bin() -> Result<PathBuf, SandboxError> {
    let dir = crate::schema::search_dirs()
        .into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
        .ok_or(SandboxError::NoServer)?;
    // Where initdb really lives (PATH may hold symlinks to a few tools only),
    // so the others (pgbench...) are found beside it.
    Ok(std::fs::canonicalize(dir.join("initdb"))
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or(dir))
}

/// (uid, gid) of the `postgres` OS user, when this process runs as root.
fn run_as() -> Result<Option<(u32, u32)>, SandboxError> {
    let me = std::fs::metadata("/proc/self")
        .map_err(io("reading /proc/self"))?
        .uid();
    if me != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(io("reading /etc/passwd"))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == "postgres")
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .map(Some)
        .ok_or(SandboxError::NoPostgresUser)
}

fn free_port() -> Result<u16, SandboxError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

impl Cluster {
    /// Creates and starts a cluster named `name` (used in its directory name).
    pub async fn start(name: &str) -> Result<Self, SandboxError> {
        Self::start_with(name, &[]).await
    }

    /// Like [`Cluster::start`], with extra server settings (`name=value`),
    /// for benchmarks that need more memory or WAL than the tests.
    pub async fn start_with(name: &str, settings: &[&str]) -> Result<Self, SandboxError> {
        let bin = server_bin()?;
        let run_as = run_as()?;
        let base = tempfile::Builder::new()
            .prefix(&format!("pgferry-{name}-"))
            .tempdir_in(std::env::temp_dir())
            .map_err(io("creating the cluster directory"))?
            .keep();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&base, Some(uid), Some(gid))
                .map_err(io("handing the directory to postgres"))?;
        }
        let mut cluster = Self {
            base,
            bin,
            port: 0,
            run_as,
            stopped: true,
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        cluster
            .tool(
                "initdb",
                &[
                    "-D",
                    &cluster.data_dir().display().to_string(),
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "-N",
                ],
            )
            .await?;
        let mut last = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start().await {
                Ok(()) => {
                    cluster.stopped = false;
                    return Ok(cluster);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.base.join("data")
    }

    /// The directory holding the unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.base
    }

    /// The directory of the server binaries (initdb, pg_ctl, pgbench...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    async fn tool(&self, tool: &str, args: &[&str]) -> Result<String, SandboxError> {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.args(args)
            .current_dir(&self.base)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().await.map_err(io("running a server tool"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(SandboxError::Tool {
                tool: tool.to_string(),
                output: text.trim().to_string(),
            })
        }
    }

    /// The options the server runs with (`postgres` arguments): its port,
    /// socket directory and settings, for starting it some other way than
    /// with `pg_ctl`, e.g. under a profiler.
    pub fn server_options(&self) -> Vec<String> {
        let mut opts = vec![
            "-p".to_string(),
            self.port.to_string(),
            "-k".to_string(),
            self.base.display().to_string(),
        ];
        let defaults = [
            "listen_addresses=127.0.0.1",
            "fsync=off",
            "full_page_writes=off",
            "max_connections=200",
            "shared_buffers=64MB",
        ];
        for setting in defaults
            .iter()
            .copied()
            .chain(self.settings.iter().map(String::as_str))
        {
            opts.extend(["-c".to_string(), setting.to_string()]);
        }
        opts
    }

    async fn pg_ctl_start(&self) -> Result<(), SandboxError> {
        // The socket directory is a temporary directory: no spaces to quote.
        let opts = self.server_options().join(" ");
        self.tool(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir().display().to_string(),
                "-l",
                &self.base.join("server.log").display().to_string(),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .await
        .map(drop)
    }

    /// Stops the server (`fast` or `immediate`).
    pub async fn stop(&mut self, mode: &str) -> Result<(), SandboxError> {
        self.tool(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir().display().to_string(),
                "-m",
                mode,
                "-w",
                "stop",
            ],
        )
        .await?;
        self.stopped = true;
        Ok(())
    }

    /// Starts a stopped server again on the same port.
    pub async fn restart(&mut self) -> Result<(), SandboxError> {
        self.pg_ctl_start().await?;
        self.stopped = false;
        Ok(())
    }

    /// A superuser session over the unix socket (setup only).
    pub async fn superuser(&self, dbname: &str) -> Result<Client, SandboxError> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.base)
            .port(self.port)
            .user("postgres")
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(10));
        let (client, conn) = cfg.connect(NoTls).await.map_err(SandboxError::Query)?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Creates a login role with the given attributes (e.g. `NOSUPERUSER
    /// NOREPLICATION`) and a database it owns, when `dbname` is given.
    pub async fn create_role(
        &self,
        role: &str,
        password: &str,
        attributes: &str,
        dbname: Option<&str>,
    ) -> Result<(), SandboxError> {
        let su = self.superuser("postgres").await?;
        // The statement text is built by the server: identifiers with %I,
        // the password with %L. Attributes are fixed keywords from our code.
        let row = su
            .query_one(
                &format!(
                    "SELECT format('CREATE ROLE %I LOGIN PASSWORD %L {attributes}', $1::text, $2::text)"
                ),
                &[&role, &password],
            )
            .await
            .map_err(SandboxError::Query)?;
        su.batch_execute(row.get::<_, &str>(0))
            .await
            .map_err(SandboxError::Query)?;
        if let Some(db) = dbname {
            let row = su
                .query_one(
                    "SELECT format('CREATE DATABASE %I OWNER %I', $1::text, $2::text)",
                    &[&db, &role],
                )
                .await
                .map_err(SandboxError::Query)?;
            su.batch_execute(row.get::<_, &str>(0))
                .await
                .map_err(SandboxError::Query)?;
        }
        Ok(())
    }

    /// Serves TLS with this certificate and key (PEM files); with `require`,
    /// TCP connections without TLS are refused, as on RDS.
    pub async fn enable_tls(&self, cert: &Path, key: &Path, require: bool) -> Result<(), SandboxError> {
        let data = self.data_dir();
        for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
            let to = data.join(name);
            std::fs::copy(from, &to).map_err(io("installing the TLS files"))?;
            std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(io("chmod"))?;
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::fs::chown(&to, Some(uid), Some(gid)).map_err(io("chown"))?;
            }
        }
        if require {
            let hba = data.join("pg_hba.conf");
            let text = std::fs::read_to_string(&hba).map_err(io("reading pg_hba.conf"))?;
            let text: String = text
                .lines()
                .map(|l| match l.strip_prefix("host ") {
                    Some(rest) => format!("hostssl {rest}\n"),
                    None => format!("{l}\n"),
                })
                .collect();
            std::fs::write(&hba, text).map_err(io("writing pg_hba.conf"))?;
        }
        let su = self.superuser("postgres").await?;
        // Separate statements: ALTER SYSTEM refuses to run in the implicit
        // transaction of a multi-statement query.
        su.batch_execute("ALTER SYSTEM SET ssl = on")
            .await
            .map_err(SandboxError::Query)?;
        su.batch_execute("SELECT pg_reload_conf()")
            .await
            .map_err(SandboxError::Query)?;
        Ok(())
    }

    /// Makes `cmd` run as the OS user that owns the cluster's files (the
    /// `postgres` user when this process runs as root), in the cluster's
    /// directory: for running server binaries on a stopped cluster, such as
    /// `postgres --single`.
    pub fn as_owner<'a>(&self, cmd: &'a mut std::process::Command) -> &'a mut std::process::Command {
        use std::os::unix::process::CommandExt;
        cmd.current_dir(&self.base);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// A libpq URL for `user` over TCP.
    pub fn url(&self, user: &str, password: &str, dbname: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{dbname}?sslmode=disable",
            self.port
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.stopped {
            let mut cmd = std::process::Command::new(self.bin.join("pg_ctl"));
            cmd.args([
                "-D",
                &self.data_dir().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::process::CommandExt::uid(&mut cmd, uid);
                std::os::unix::process::CommandExt::gid(&mut cmd, gid);
            }
            let _ = cmd.status();
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}
