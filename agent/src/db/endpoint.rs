//! Database endpoints: URL parsing, connections, pools, and the environment
//! handed to `pg_dump`/`pg_restore`.
//!
//! Every session pgferry opens gets the same output settings (so checksums
//! computed on both sides are comparable), no statement timeout, and
//! `row_security = off`: a table whose policies apply to pgferry's role is
//! then an error, as it is to pg_dump, instead of a read that silently
//! leaves out the rows they hide (and a verification that compares two such
//! reads and finds them equal). JIT compilation is off: it cost more than
//! it saved on every statement measured. Source sessions also get the configured
//! `lock_timeout`, so nothing pgferry runs on the source can queue the
//! application behind it for longer than that.

use std::fmt;
use std::time::Duration;

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod};
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::config::Host;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::ConfigError;

/// Which side of the migration an endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The production database being moved.
    Source,
    /// The managed database it moves to.
    Target,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// Failure to reach or log in to a database.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server was reached but refused or failed the session.
    #[error("cannot connect to the {side} database {at}: {hint}")]
    Refused {
        /// Which side.
        side: Side,
        /// Redacted `user@host:port/db`.
        at: String,
        /// What to do about it.
        hint: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// No URL was given for this side (a command that can do without it).
    #[error("no {side} URL was given: pass --{side} URL or set PGFERRY_{}", .side.to_string().to_uppercase())]
    NotGiven {
        /// Which side.
        side: Side,
    },
    /// A pool could not be built.
    #[error("cannot open a connection pool to the {side} database")]
    Pool {
        /// Which side.
        side: Side,
        /// The pool's error.
        #[source]
        source: deadpool_postgres::PoolError,
    },
}

impl ConnectError {
    /// True when trying again later may succeed (server down or restarting,
    /// connection slots full), false for wrong credentials or names.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConnectError::Refused { source, .. } => crate::db::errors::is_retryable(source),
            ConnectError::Pool { .. } => true,
            ConnectError::NotGiven { .. } => false,
        }
    }
}

/// A parsed, validated connection target. Its `Debug`/`Display` never show the
/// password.
#[derive(Clone)]
pub struct Endpoint {
    side: Side,
    config: tokio_postgres::Config,
    lock_timeout_ms: u64,
    tls: crate::db::tls::TlsSettings,
    connector: MakeRustlsConnect,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Endpoint({} {})", self.side, self.redacted())
    }
}

impl Endpoint {
    /// Parses a libpq URL (`postgres://user:pass@host:port/db?sslmode=...`).
    /// What the URL leaves out comes from libpq's service file, environment
    /// and password file ([`crate::db::libpq`]).
    pub fn parse(url: &SecretString, side: Side, lock_timeout_ms: u64) -> Result<Self, ConfigError> {
        let url = crate::db::libpq::with_defaults(url.expose_secret(), &crate::db::libpq::ProcessEnv)
            .map_err(|why| ConfigError::Invalid(format!("the {side} URL: {why}")))?;
        let (driver_url, tls) = crate::db::tls::split_url(&url)
            .map_err(|why| ConfigError::Invalid(format!("the {side} URL: {why}")))?;
        let connector = crate::db::tls::connector(&tls)?;
        let mut config: tokio_postgres::Config = driver_url.parse().map_err(|e: tokio_postgres::Error| {
            // The driver names the option, never its value: safe to show.
            let what = std::error::Error::source(&e)
                .map(|c| c.to_string())
                .filter(|c| c.starts_with("unknown option `") || c.starts_with("invalid value for option `"))
                .map(|c| format!(": {c}"))
                .unwrap_or_default();
            ConfigError::Invalid(format!(
                "the {side} URL is not a valid libpq URL{what} (expected postgres://user:password@host:5432/dbname); \
                 percent-encode special characters in the password"
            ))
        })?;
        if config.get_hosts().is_empty() {
            return Err(ConfigError::Invalid(format!("the {side} URL names no host")));
        }
        if config.get_user().is_none() {
            return Err(ConfigError::Invalid(format!("the {side} URL names no user")));
        }
        if config.get_dbname().is_none() {
            return Err(ConfigError::Invalid(format!("the {side} URL names no database")));
        }

        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("pgferry");
        Ok(Self {
            side,
            config,
            lock_timeout_ms,
            tls,
            connector,
        })
    }

    /// Which side this endpoint is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// `user@host:port/db`, for reports and logs.
    pub fn redacted(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{}@{}:{}/{}",
            self.config.get_user().unwrap_or_default(),
            host,
            port,
            self.config.get_dbname().unwrap_or_default()
        )
    }

    /// The database name.
    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or_default()
    }

    /// The login role.
    pub fn user(&self) -> &str {
        self.config.get_user().unwrap_or_default()
    }

    /// The SQL every new session runs first.
    fn session_setup(&self) -> String {
        let mut sql = String::from(
            "SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET TimeZone = 'UTC'; \
             SET extra_float_digits = 3; SET bytea_output = 'hex'; SET statement_timeout = 0; \
             SET idle_in_transaction_session_timeout = 0; SET client_min_messages = 'warning'; \
             SET row_security = off;",
        );
        if self.side == Side::Source {
            sql.push_str(&format!(" SET lock_timeout = {};", self.lock_timeout_ms));
        }
        sql.push(' ');
        sql.push_str(Self::NO_JIT);
        sql.push(' ');
        sql.push_str(Self::VANISH_CHECK);
        sql
    }

    /// SQL that turns JIT compilation off (PostgreSQL 11+). The planner's
    /// estimates for pgferry's catalog reads (a recursive one over every
    /// column, one row per table with subqueries) and for a large batch's
    /// apply pass `jit_above_cost`: compiling took 730 ms of a 800 ms
    /// catalog read at 2,000 tables. A checksum of 2M rows ran as fast
    /// without.
    const NO_JIT: &'static str =
        "SELECT set_config('jit', 'off', false) WHERE current_setting('server_version_num')::int >= 110000;";

    /// SQL that makes the server end our queries promptly when pgferry itself
    /// vanishes (killed, host lost), instead of finishing a long COPY or index
    /// build for nobody. PostgreSQL 14+; a no-op on older servers.
    const VANISH_CHECK: &'static str =
        "SELECT set_config('client_connection_check_interval', '1000', false) \
           WHERE current_setting('server_version_num')::int >= 140000";

    /// Opens one session (its connection task runs in the background).
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let (client, connection) = self
            .config
            .connect(self.connector.clone())
            .await
            .map_err(|e| self.refused(e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "Connection ended with an error");
            }
        });
        client
            .batch_execute(&self.session_setup())
            .await
            .map_err(|e| self.refused(e))?;
        Ok(client)
    }

    /// A pool of at most `max_size` sessions, each set up like [`connect`](Self::connect).
    pub fn pool(&self, max_size: usize) -> Pool {
        let manager = Manager::from_config(
            self.config.clone(),
            self.connector.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let setup = self.session_setup();
        Pool::builder(manager)
            .max_size(max_size)
            .post_create(Hook::async_fn(move |client, _| {
                let setup = setup.clone();
                Box::pin(async move { client.batch_execute(&setup).await.map_err(HookError::Backend) })
            }))
            .build()
            .expect("a pool with a runtime and a manager always builds")
    }

    /// Gets a session from `pool`, mapping failure to a [`ConnectError`].
    pub async fn get(&self, pool: &Pool) -> Result<deadpool_postgres::Object, ConnectError> {
        pool.get().await.map_err(|source| match source {
            deadpool_postgres::PoolError::Backend(e) => self.refused(e),
            source => ConnectError::Pool {
                side: self.side,
                source,
            },
        })
    }

    /// Environment for libpq child processes (`pg_dump`, `pg_restore`): the
    /// password travels here, never in argv. Every host of the URL, in its
    /// order, and what a session must be (`target_session_attrs`), so a
    /// child reaches the server pgferry's own sessions do: given only the
    /// first host, a URL whose query adds one (`?host=/run/postgresql`,
    /// which the driver tries after the authority's) had pg_dump refused.
    pub fn libpq_env(&self) -> Vec<(&'static str, String)> {
        let mut env = Vec::new();
        let list = |items: Vec<String>| items.join(",");
        env.push((
            "PGHOST",
            list(
                self.config
                    .get_hosts()
                    .iter()
                    .map(|host| match host {
                        Host::Tcp(h) => h.clone(),
                        Host::Unix(p) => p.display().to_string(),
                    })
                    .collect(),
            ),
        ));
        if !self.config.get_ports().is_empty() {
            env.push((
                "PGPORT",
                list(self.config.get_ports().iter().map(u16::to_string).collect()),
            ));
        }
        if !self.config.get_hostaddrs().is_empty() {
            env.push((
                "PGHOSTADDR",
                list(
                    self.config
                        .get_hostaddrs()
                        .iter()
                        .map(|a| a.to_string())
                        .collect(),
                ),
            ));
        }
        env.push((
            "PGTARGETSESSIONATTRS",
            match self.config.get_target_session_attrs() {
                tokio_postgres::config::TargetSessionAttrs::ReadWrite => "read-write",
                tokio_postgres::config::TargetSessionAttrs::ReadOnly => "read-only",
                _ => "any",
            }
            .to_string(),
        ));
        env.push(("PGUSER", self.user().to_string()));
        env.push(("PGDATABASE", self.dbname().to_string()));
        if let Some(pw) = self.config.get_password() {
            env.push(("PGPASSWORD", String::from_utf8_lossy(pw).into_owned()));
        }
        env.push(("PGSSLMODE", self.tls.mode.as_str().to_string()));
        if let Some(root) = &self.tls.root_cert {
            env.push(("PGSSLROOTCERT", root.display().to_string()));
        }
        env.push(("PGAPPNAME", "pgferry".to_string()));
        env.push(("PGCONNECT_TIMEOUT", "10".to_string()));
        env
    }

    fn refused(&self, source: tokio_postgres::Error) -> ConnectError {
        let hint = match source.code().map(|c| c.code()) {
            Some("28P01") => "authentication failed: check the user and password in the URL",
            Some("28000") => {
                "the server refused this connection (pg_hba.conf): check the user and database, and sslmode \
                 (RDS requires TLS: sslmode=require or verify-full with sslrootcert)"
            }
            None if crate::db::tls::is_tls_failure(&source) => {
                "TLS failed: the server's certificate could not be verified for this sslmode; check sslrootcert \
                 (RDS: its CA bundle), and that the host name matches the certificate for verify-full"
            }
            Some("3D000") => "the database does not exist: check the database name in the URL",
            Some(c) if c.starts_with("53") => {
                "the server has no free connection slots: lower source_limits.max_connections or free connections"
            }
            Some(_) => "the server refused the session",
            // tokio-postgres keeps its error kinds private; their names are
            // what its Display prints.
            None if source.to_string() == "invalid configuration" => {
                "no password was found for this user: put it in the URL (percent-encoded), PGPASSWORD, a service \
                 file, or the password file (~/.pgpass or PGPASSFILE, mode 0600)"
            }
            None if source.to_string() == "error performing TLS handshake" => {
                "the server does not accept TLS: use sslmode=prefer (or disable) for it, or enable ssl on the server"
            }
            None if source.to_string() == "timeout waiting for server" => {
                "the server did not answer in time: check host and port, that it is running, and that this host may \
                 reach it"
            }
            None => {
                "the server did not answer: check host and port, that it is running, and that this host may reach it"
            }
        };
        ConnectError::Refused {
            side: self.side,
            at: self.redacted(),
            hint,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_redacts() {
        let url: SecretString = "postgres://app:s3cret@127.0.0.1:5433/shop".into();
        let ep = Endpoint::parse(&url, Side::Source, 1000).unwrap();
        assert_eq!(ep.redacted(), "app@127.0.0.1:5433/shop");
        assert!(!format!("{ep:?}").contains("s3cret"));
        let env = ep.libpq_env();
        assert!(env.contains(&("PGPASSWORD", "s3cret".to_string())));
    }

    #[test]
    fn children_get_every_host_in_order() {
        let env = |url: &str| {
            Endpoint::parse(&url.to_string().into(), Side::Target, 1000)
                .unwrap()
                .libpq_env()
        };
        let socket = env("postgres://app@localhost/shop?host=/tmp/pg&port=5499");
        assert!(
            socket.contains(&("PGHOST", "localhost,/tmp/pg".into())),
            "{socket:?}"
        );
        assert!(socket.contains(&("PGPORT", "5432,5499".into())), "{socket:?}");
        assert!(
            socket.contains(&("PGTARGETSESSIONATTRS", "any".into())),
            "{socket:?}"
        );
        let only = env("postgres://app@/shop?host=/tmp/pg&port=5499");
        assert!(only.contains(&("PGHOST", "/tmp/pg".into())), "{only:?}");
        assert!(only.contains(&("PGPORT", "5499".into())), "{only:?}");
        let pair = env("postgres://app@db1:5433,db2:5434/shop?target_session_attrs=read-write");
        assert!(pair.contains(&("PGHOST", "db1,db2".into())), "{pair:?}");
        assert!(pair.contains(&("PGPORT", "5433,5434".into())), "{pair:?}");
        assert!(
            pair.contains(&("PGTARGETSESSIONATTRS", "read-write".into())),
            "{pair:?}"
        );
    }

    #[test]
    fn refuses_incomplete_urls() {
        for (url, want) in [
            ("postgres://127.0.0.1/db", "no user"),
            ("postgres://u@127.0.0.1", "no database"),
            ("not a url at all ::", "not a valid libpq URL"),
            ("postgres://u@h/db?sslmode=bogus", "unknown sslmode"),
            (
                "postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem",
                "sslrootcert",
            ),
        ] {
            let err = Endpoint::parse(&url.into(), Side::Target, 1000).unwrap_err();
            assert!(err.to_string().contains(want), "{url}: {err}");
        }
    }
}
