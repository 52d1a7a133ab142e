//! The configuration's sections, with their defaults (each field's doc
//! comment states it).

use std::path::PathBuf;

use secrecy::SecretString;
use serde::Deserialize;

use super::{list, ConfigError};

/// Roles and privileges.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    /// Recreate the source's roles on the target (from pg_dumpall
    /// --roles-only --no-role-passwords) before the schema. Default false.
    #[serde(default)]
    pub recreate_roles: bool,
    /// Restore grants and default privileges at cutover; a grant to a role
    /// the target lacks is reported, not fatal. Default true.
    #[serde(default = "default_true")]
    pub privileges: bool,
}

impl Default for SchemaConfig {
    fn default() -> Self {
        Self {
            recreate_roles: false,
            privileges: true,
        }
    }
}

fn default_true() -> bool {
    true
}

/// Prometheus metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the `/metrics` endpoint, or `off`. Default `127.0.0.1:9187`.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
    /// How often backlog, lag, fence and source figures are sampled.
    /// Default 5000 ms.
    #[serde(default = "default_sample_interval_ms")]
    pub sample_interval_ms: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
            sample_interval_ms: default_sample_interval_ms(),
        }
    }
}

impl MetricsConfig {
    /// The address to serve on, `None` when off.
    pub fn address(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        if self.listen == "off" {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|_| {
            ConfigError::Invalid(format!(
                "metrics.listen = {:?} is not an address like 127.0.0.1:9187 (or \"off\")",
                self.listen
            ))
        })
    }
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9187".into()
}
fn default_sample_interval_ms() -> u64 {
    5000
}

/// How pgferry treats the source, which is someone's production database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceLimits {
    /// Most connections pgferry opens to the source at once. Default 6.
    #[serde(default = "default_source_connections")]
    pub max_connections: usize,
    /// `lock_timeout` for every DDL statement on the source. Default 1000 ms.
    #[serde(default = "default_lock_timeout_ms")]
    pub lock_timeout_ms: u64,
    /// The `lock_timeout` of each attempt to create or drop pgferry's
    /// triggers on an application table (asked for only once no other
    /// session has held the table in a transaction open for a second or
    /// more, nor waits for it): the longest an application statement
    /// queues behind pgferry's triggers. Default 50 ms.
    #[serde(default = "default_trigger_lock_timeout_ms")]
    pub trigger_lock_timeout_ms: u64,
    /// How many times a DDL that hit its lock timeout is retried. Default 60.
    #[serde(default = "default_lock_retries")]
    pub lock_retries: u32,
    /// Cap of the exponential backoff between retries. Default 5000 ms.
    #[serde(default = "default_retry_max_backoff_ms")]
    pub retry_max_backoff_ms: u64,
    /// How many times a whole step (install, copy, sync, cutover, cleanup)
    /// is run again after a transient failure. Default 10.
    #[serde(default = "default_step_retries")]
    pub step_retries: u32,
}

/// Bulk copy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyConfig {
    /// Tables copied in parallel (each uses one source and one target
    /// connection). Default: the number of cores, at most 4.
    #[serde(default = "default_copy_workers")]
    pub workers: usize,
    /// Most bytes per second the copy reads from the source, all workers
    /// together; also what sync's whole-table copy after a TRUNCATE may
    /// read. Default: unlimited.
    #[serde(default)]
    pub rate_bytes_per_sec: Option<u64>,
    /// `maintenance_work_mem` of each index-building session on the target.
    /// Default 256 MB.
    #[serde(default = "default_index_maintenance_work_mem_mb")]
    pub index_maintenance_work_mem_mb: u32,
    /// TOAST compression of the loading sessions (`default_toast_compression`
    /// on the target): `lz4` (default; several times faster than pglz at
    /// about the same size, PostgreSQL 14+ built with lz4, as on RDS),
    /// `pglz`, or `server` to keep the target's setting. Columns with their
    /// own COMPRESSION keep it. Falls back to the server's setting, with a
    /// warning, where lz4 is not available.
    #[serde(default = "default_toast_compression")]
    pub toast_compression: ToastCompression,
    /// Tables whose heap is larger than this are copied in parts (block
    /// ranges read by TID range scans, PostgreSQL 14+ sources), so that one
    /// big table keeps every worker busy. 0 never splits. Default 512.
    #[serde(default = "default_split_tables_larger_than_mb")]
    pub split_tables_larger_than_mb: u64,
    /// Most parts one table is split into. Default: `workers`.
    #[serde(default)]
    pub max_parts: Option<usize>,
    /// How the data travels: `stream` (default; COPY piped source to target,
    /// no disk) or `dump` (`pg_dump -Fd -j` into a local directory, then
    /// `pg_restore -j`, for staging on disk).
    #[serde(default)]
    pub method: CopyMethod,
    /// Where the bulk data is read from, when not the source itself: for
    /// example a Heroku fork of the source made after `install`. Capture and
    /// everything else stay on the source. pgferry checks that this database
    /// holds the same migration with capture installed, which proves it was
    /// taken after the triggers committed (invariant 2).
    #[serde(default)]
    pub from: Option<SecretString>,
    /// Staging directory for `method = "dump"`. Default: a temporary
    /// directory, removed afterwards.
    #[serde(default)]
    pub dump_dir: Option<PathBuf>,
}

/// TOAST compression for the loading sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToastCompression {
    /// lz4.
    Lz4,
    /// PostgreSQL's own pglz.
    Pglz,
    /// Whatever the target's `default_toast_compression` says.
    Server,
}

/// How the bulk copy moves the data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMethod {
    /// COPY streamed from the source straight into the target.
    #[default]
    Stream,
    /// pg_dump -Fd -j N, then pg_restore -j N.
    Dump,
}

/// Delta drain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Tables drained in parallel. Default 2.
    #[serde(default = "default_sync_workers")]
    pub workers: usize,
    /// Pause between drain passes that found nothing to do. Default 200 ms.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Most changed rows per second the drain applies, all workers together.
    /// Default: unlimited.
    #[serde(default)]
    pub rate_rows_per_sec: Option<u64>,
    /// Back off when the source is under pressure: before each drain pass,
    /// pgferry counts the source's sessions waiting on a lock and times that
    /// query; above either limit it pauses, doubling the pause (up to 30 s)
    /// while the pressure lasts. The application's work wins. Default true.
    #[serde(default = "default_true")]
    pub adaptive: bool,
    /// Sessions of the source database waiting on locks, of any role, from
    /// which on the drain pauses. Default 4.
    #[serde(default = "default_max_lock_waiters")]
    pub max_lock_waiters: i64,
    /// Round trip of the pressure probe above which the drain pauses.
    /// Default 250 ms.
    #[serde(default = "default_max_probe_ms")]
    pub max_probe_ms: u64,
    /// A table's batch whose distinct changed keys reach this fraction of
    /// the table's estimated rows copies the whole table again instead
    /// (TRUNCATE and COPY on the target, as after a captured TRUNCATE):
    /// rewriting most rows one key at a time costs the target more than
    /// loading the table afresh. 0 never does. Default 0.5.
    #[serde(default = "default_recopy_fraction")]
    pub recopy_fraction: f64,
    /// Repeat on the target the partition maintenance done on the source
    /// while syncing (a partition created, attached, detached or dropped, as
    /// pg_partman does), capture and copy what it brings, and sync on.
    /// False: such a change stops sync as schema drift. Default true.
    #[serde(default = "default_true")]
    pub follow_partitions: bool,
    /// Repeat on the target the other schema changes an application's
    /// deploy makes while syncing that sync can follow: a table created,
    /// columns added or dropped (docs/design.md, "Schema changes during
    /// sync"). False: such a change stops sync as schema drift. Default
    /// true.
    #[serde(default = "default_true")]
    pub follow_schema_changes: bool,
}

/// Cutover.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutoverConfig {
    /// The fence is raised only when the backlog is at most this many delta
    /// rows after a drain pass. Default 10000.
    #[serde(default = "default_max_backlog_rows")]
    pub max_backlog_rows: i64,
    /// How long to keep draining before giving up on reaching that backlog.
    /// Default 300000 ms.
    #[serde(default = "default_catch_up_timeout_ms")]
    pub catch_up_timeout_ms: u64,
    /// How long to wait, with the fence up, for transactions that were already
    /// writing to finish; past it the cutover is aborted. Default 30000 ms.
    #[serde(default = "default_writer_wait_ms")]
    pub writer_wait_ms: u64,
    /// Shell command that points the application at the target, run after
    /// verification while writes are fenced. Its environment carries
    /// `PGFERRY_TARGET_URL`. A non-zero exit aborts the cutover. Default none.
    #[serde(default)]
    pub switch_command: Option<String>,
    /// Whether the work done with the fence up (the final drain and the copy
    /// of `copy_only` tables) keeps `sync.rate_rows_per_sec` and
    /// `copy.rate_bytes_per_sec`. Default false: the application cannot
    /// write then, and every second of that work is write downtime.
    #[serde(default)]
    pub rate_limited: bool,
    /// What the verification reads with the fence up. `changed` (the
    /// default) compares each table in full before the fence, in the
    /// snapshot of a drain batch, and then with the fence up only the rows
    /// whose keys changed since (a partitioned table with all its
    /// partitions together; tables in a classic inheritance hierarchy, and
    /// tables truncated or copied whole since, are still compared in full),
    /// so the write downtime follows the writes, not the size. `full`
    /// compares every row of every table with the fence up: the write
    /// downtime grows with the database (`check` says by how much).
    #[serde(default)]
    pub verify: VerifyScope,
    /// With `verify = "changed"`: the keys changed since a table was
    /// verified ahead of the fence that the fence may compare. Just before
    /// the catch-up, a table (a partitioned table with its partitions)
    /// whose ledger holds more is compared again ahead of the fence by
    /// those keys, which starts its ledger afresh, so the fence compares
    /// what changed in the last minutes, not since the first verification
    /// (hours before, at hundreds of gigabytes). Default 1000 (about 20 ms
    /// with the fence up).
    #[serde(default = "default_max_keys_under_fence")]
    pub max_keys_under_fence: i64,
    /// When the materialized views populated on the source are refreshed on
    /// the target. `fenced` (the default): with writes blocked, so at the
    /// switch they hold exactly what their queries give on the migrated
    /// data; the write downtime grows with the time those queries take.
    /// `after_switch`: just before the fence (populated at the switch, with
    /// the data of a moment before) and again after the switch, without
    /// blocking writes (CONCURRENTLY where a unique index allows it).
    #[serde(default)]
    pub materialized_views: MatviewRefresh,
    /// When a cutover fails with the fence up, how long pgferry keeps
    /// trying to lift it while the source cannot be reached (with backoff,
    /// `pgferry_fence_raised` staying 1) before it exits, fence still up,
    /// naming the command that lifts it. Default 3600000 ms (an hour: a
    /// failover or a network outage of the source's host usually ends well
    /// within it, and every minute given up early is a minute the
    /// application waits for an operator).
    #[serde(default = "default_fence_lift_timeout_ms")]
    pub fence_lift_timeout_ms: u64,
    /// After the switch, `migrate --cutover` keeps the old source fenced
    /// until no session that could write the captured tables is connected
    /// to it (pgferry's own and `release_ignore_roles` aside), or until this
    /// long has passed; then it cleans up, which lifts the fence. Default
    /// 900000 ms (15 minutes): longer than a dyno's 30 s shutdown, a
    /// preboot or rolling restart of a fleet, and PgBouncer's default
    /// `server_idle_timeout` (10 minutes), after which a pooler that was
    /// switched too has closed its idle sessions to the old source. Waiting
    /// costs nothing (the application writes to the target); releasing too
    /// early lets a straggler commit where nobody reads.
    #[serde(default = "default_release_after_ms")]
    pub release_after_ms: u64,
    /// Roles whose sessions never hold the fence after the switch (a
    /// read-only reporting role that still holds write grants, a
    /// platform's monitoring role). Default none.
    #[serde(default, deserialize_with = "list")]
    pub release_ignore_roles: Vec<String>,
    /// Whether the old source follows the new database after the switch,
    /// for a way back: capture is installed on the target before the fence
    /// (the RDS master user owns its tables), and after the switch the old
    /// source stays fenced while pgferry applies there what the application
    /// writes to the target (`pgferry fallback`; `migrate --cutover` goes
    /// on with it instead of cleaning up), until `pgferry finish`. Default
    /// false.
    #[serde(default)]
    pub fallback: bool,
    /// Shell command that points the application back at the old source,
    /// run by `pgferry switchback` after verification while writes to the
    /// target are fenced. Its environment carries `PGFERRY_SOURCE_URL`. A
    /// non-zero exit lifts the target's fence. Default none.
    #[serde(default)]
    pub switchback_command: Option<String>,
}

/// When the cutover refreshes materialized views on the target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatviewRefresh {
    /// With writes blocked.
    #[default]
    Fenced,
    /// Before the fence, and again after the switch.
    AfterSwitch,
}

/// What the cutover's verification compares with the fence up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyScope {
    /// Every row.
    Full,
    /// The rows changed since a full comparison made before the fence.
    #[default]
    Changed,
}

fn default_source_connections() -> usize {
    6
}
fn default_lock_timeout_ms() -> u64 {
    1000
}
fn default_max_keys_under_fence() -> i64 {
    1_000
}
fn default_trigger_lock_timeout_ms() -> u64 {
    50
}
fn default_lock_retries() -> u32 {
    60
}
fn default_retry_max_backoff_ms() -> u64 {
    5000
}
fn default_step_retries() -> u32 {
    10
}
fn default_copy_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(4))
}
fn default_index_maintenance_work_mem_mb() -> u32 {
    256
}
fn default_toast_compression() -> ToastCompression {
    ToastCompression::Lz4
}
fn default_split_tables_larger_than_mb() -> u64 {
    512
}
fn default_max_lock_waiters() -> i64 {
    4
}
fn default_max_probe_ms() -> u64 {
    250
}
fn default_recopy_fraction() -> f64 {
    0.5
}
fn default_sync_workers() -> usize {
    2
}
fn default_poll_interval_ms() -> u64 {
    200
}
fn default_max_backlog_rows() -> i64 {
    10_000
}
fn default_catch_up_timeout_ms() -> u64 {
    300_000
}
fn default_writer_wait_ms() -> u64 {
    30_000
}

fn default_fence_lift_timeout_ms() -> u64 {
    3_600_000
}

fn default_release_after_ms() -> u64 {
    900_000
}

impl Default for SourceLimits {
    fn default() -> Self {
        Self {
            max_connections: default_source_connections(),
            lock_timeout_ms: default_lock_timeout_ms(),
            trigger_lock_timeout_ms: default_trigger_lock_timeout_ms(),
            lock_retries: default_lock_retries(),
            retry_max_backoff_ms: default_retry_max_backoff_ms(),
            step_retries: default_step_retries(),
        }
    }
}
impl Default for CopyConfig {
    fn default() -> Self {
        Self {
            workers: default_copy_workers(),
            index_maintenance_work_mem_mb: default_index_maintenance_work_mem_mb(),
            rate_bytes_per_sec: None,
            toast_compression: default_toast_compression(),
            split_tables_larger_than_mb: default_split_tables_larger_than_mb(),
            max_parts: None,
            method: CopyMethod::Stream,
            from: None,
            dump_dir: None,
        }
    }
}
impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            workers: default_sync_workers(),
            poll_interval_ms: default_poll_interval_ms(),
            rate_rows_per_sec: None,
            adaptive: true,
            max_lock_waiters: default_max_lock_waiters(),
            max_probe_ms: default_max_probe_ms(),
            recopy_fraction: default_recopy_fraction(),
            follow_partitions: true,
            follow_schema_changes: true,
        }
    }
}
impl Default for CutoverConfig {
    fn default() -> Self {
        Self {
            max_backlog_rows: default_max_backlog_rows(),
            catch_up_timeout_ms: default_catch_up_timeout_ms(),
            writer_wait_ms: default_writer_wait_ms(),
            switch_command: None,
            rate_limited: false,
            verify: VerifyScope::Changed,
            max_keys_under_fence: default_max_keys_under_fence(),
            materialized_views: MatviewRefresh::Fenced,
            fence_lift_timeout_ms: default_fence_lift_timeout_ms(),
            release_after_ms: default_release_after_ms(),
            release_ignore_roles: Vec::new(),
            fallback: false,
            switchback_command: None,
        }
    }
}
