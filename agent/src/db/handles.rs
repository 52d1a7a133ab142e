//! The handles every phase works with: configuration, both endpoints, and
//! connection pools whose sizes are pgferry's connection budget.

use deadpool_postgres::{Object, Pool};

use crate::config::{Config, ConfigError};
use crate::db::endpoint::{ConnectError, Endpoint, Side};
use crate::db::retry::RetryPolicy;

/// One migration's configuration and connections.
#[derive(Debug, Clone)]
pub struct Migration {
    /// The validated configuration.
    pub cfg: Config,
    /// The source database.
    pub source: Endpoint,
    /// The target database (a placeholder when none was given, see
    /// [`Migration::without_target`]).
    pub target: Endpoint,
    /// Whether a target URL was given.
    target_given: bool,
    source_pool: Pool,
    target_pool: Pool,
    /// `copy.from`: where the bulk data is read from instead of the source.
    data: Option<(Endpoint, Pool)>,
    /// The copy's rate limit, shared by its workers.
    pub copy_throttle: std::sync::Arc<crate::db::throttle::Throttle>,
    /// The drain's rate limit, shared by its workers.
    pub sync_throttle: std::sync::Arc<crate::db::throttle::Throttle>,
}

impl Migration {
    /// Parses both URLs and sizes the pools. Connects lazily.
    pub fn new(cfg: Config) -> Result<Self, ConfigError> {
        let target = cfg.target_url()?.clone();
        Self::build(cfg, Some(target))
    }

    /// For the commands that work from the source alone (`cleanup` of the
    /// source from any machine, `status`): without a target URL, every
    /// target session is refused with [`ConnectError::NotGiven`].
    pub fn without_target(cfg: Config) -> Result<Self, ConfigError> {
        let target = cfg.target.clone();
        Self::build(cfg, target)
    }

    fn build(cfg: Config, target: Option<secrecy::SecretString>) -> Result<Self, ConfigError> {
        let lock_timeout = cfg.source_limits.lock_timeout_ms;
        let source = Endpoint::parse(cfg.source_url()?, Side::Source, lock_timeout)?;
        let target_given = target.is_some();
        let placeholder =
            secrecy::SecretString::from("postgres://pgferry@pgferry.invalid/none?sslmode=disable");
        let target = Endpoint::parse(
            target.as_ref().unwrap_or(&placeholder),
            Side::Target,
            lock_timeout,
        )?;
        // The source pool is the whole source budget; the target may take
        // what the widest phase needs plus a control session.
        let source_pool = source.pool(cfg.source_limits.max_connections);
        // The copy builds indexes (as many at a time as it copies) while
        // it copies.
        let target_pool = target.pool((2 * cfg.copy.workers).max(cfg.sync.workers) + 2);
        let data = match &cfg.copy.from {
            Some(url) => {
                let ep = Endpoint::parse(url, Side::Source, lock_timeout)?;
                let pool = ep.pool(cfg.source_limits.max_connections);
                Some((ep, pool))
            }
            None => None,
        };
        let copy_throttle =
            crate::db::throttle::Throttle::per_second(cfg.copy.rate_bytes_per_sec, "copy").into();
        let sync_throttle =
            crate::db::throttle::Throttle::per_second(cfg.sync.rate_rows_per_sec, "sync").into();
        Ok(Self {
            cfg,
            source,
            target,
            target_given,
            source_pool,
            target_pool,
            data,
            copy_throttle,
            sync_throttle,
        })
    }

    /// The same migration, same pools, without the copy's and the drain's
    /// rate limits.
    pub fn without_rate_limits(&self) -> Self {
        Self {
            copy_throttle: crate::db::throttle::Throttle::unlimited().into(),
            sync_throttle: crate::db::throttle::Throttle::unlimited().into(),
            ..self.clone()
        }
    }

    /// The same migration the other way round, on the same pools: the
    /// target read and captured as a source, the old source written as a
    /// target (`cutover.fallback`). Each endpoint keeps its own name in
    /// errors and logs.
    pub fn reversed(&self) -> Self {
        Self {
            source: self.target.clone(),
            target: self.source.clone(),
            target_given: true,
            source_pool: self.target_pool.clone(),
            target_pool: self.source_pool.clone(),
            data: None,
            ..self.clone()
        }
    }

    /// A pooled source session.
    pub async fn source_conn(&self) -> Result<Object, ConnectError> {
        self.source.get(&self.source_pool).await
    }

    /// A session on the database the bulk data is read from: `copy.from`
    /// when set, otherwise the source (sharing its budget).
    pub async fn data_conn(&self) -> Result<Object, ConnectError> {
        match &self.data {
            Some((ep, pool)) => ep.get(pool).await,
            None => self.source_conn().await,
        }
    }

    /// The database the bulk data is read from.
    pub fn data_endpoint(&self) -> &Endpoint {
        self.data.as_ref().map_or(&self.source, |(ep, _)| ep)
    }

    /// True when the bulk data is read from `copy.from`, not the source.
    pub fn reads_elsewhere(&self) -> bool {
        self.data.is_some()
    }

    /// A pooled target session.
    pub async fn target_conn(&self) -> Result<Object, ConnectError> {
        if !self.target_given {
            return Err(ConnectError::NotGiven { side: Side::Target });
        }
        self.target.get(&self.target_pool).await
    }

    /// Whether a target URL was given.
    pub fn has_target(&self) -> bool {
        self.target_given
    }

    /// Sessions currently open to the source.
    pub fn source_sessions(&self) -> usize {
        self.source_pool.status().size
    }

    /// Retry policy for source DDL and transient failures.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::from_limits(&self.cfg.source_limits)
    }

    /// Copy workers that fit the source budget (one session is kept for
    /// bookkeeping).
    pub fn copy_workers(&self) -> usize {
        self.cfg.copy.workers.min(self.cfg.source_worker_budget())
    }

    /// Drain workers that fit the source budget.
    pub fn sync_workers(&self) -> usize {
        self.cfg.sync.workers.min(self.cfg.source_worker_budget())
    }
}
