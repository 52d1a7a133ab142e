//! Metrics: every name pgferry exports, described once, and the typed events
//! that record them (once per table, batch or sample, never per row).
//!
//! Prometheus text is served on `metrics.listen` (default
//! `127.0.0.1:9187/metrics`). Labels come from bounded sets only: `table`
//! (the captured tables), `phase`, `op`, `outcome`, `kind`.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Current phase: 1 for the phase the migration is in, 0 for the others.
pub const PHASE: &str = "pgferry_phase";
/// Rows copied by the bulk copy, per table.
pub const COPY_ROWS: &str = "pgferry_copy_rows_total";
/// Bytes streamed by the bulk copy (binary COPY format), per table.
pub const COPY_BYTES: &str = "pgferry_copy_bytes_total";
/// 1 when a table's bulk copy is done, 0 while pending.
pub const COPY_DONE: &str = "pgferry_copy_table_done";
/// Estimated size of each table on the source, for progress and ETA.
pub const TABLE_BYTES: &str = "pgferry_table_size_bytes";
/// Unconsumed delta rows per table.
pub const BACKLOG: &str = "pgferry_backlog_rows";
/// Seconds since the snapshot of the table's last applied batch: everything
/// committed before it is on the target, so this bounds the age of the oldest
/// unconsumed delta.
pub const TABLE_LAG: &str = "pgferry_table_lag_seconds";
/// The largest table lag: end-to-end replication lag.
pub const LAG: &str = "pgferry_lag_seconds";
/// Rows written to the target by the drain, per table and operation.
pub const APPLIED: &str = "pgferry_applied_rows_total";
/// Drain batches, per table and outcome.
pub const BATCHES: &str = "pgferry_batches_total";
/// Duration of drain batches that applied something.
pub const BATCH_SECONDS: &str = "pgferry_batch_duration_seconds";
/// Retries of transient failures, per kind of operation.
pub const RETRIES: &str = "pgferry_retries_total";
/// Failed operations (retried or not), per kind of operation.
pub const ERRORS: &str = "pgferry_errors_total";
/// Sessions pgferry holds open to the source.
pub const SOURCE_CONNECTIONS: &str = "pgferry_source_connections";
/// 1 while the write fence is up.
pub const FENCE: &str = "pgferry_fence_raised";
/// Seconds the fence has been up (writes blocked), 0 when down.
pub const FENCE_SECONDS: &str = "pgferry_fence_seconds";
/// Age in transactions of the oldest snapshot pgferry holds on the source.
pub const XMIN_AGE: &str = "pgferry_source_xmin_age_xids";
/// Disk used by pgferry's control schema and delta tables on the source.
pub const DELTA_BYTES: &str = "pgferry_delta_storage_bytes";
/// Waits on the copy and drain rate limits (the sum is the time throttled).
pub const THROTTLED: &str = "pgferry_rate_limit_wait_seconds";
/// The drain's current pause for source pressure (0 when not paused).
pub const SYNC_BACKOFF: &str = "pgferry_sync_backoff_seconds";
/// After a cutover with `cutover.fallback`: changes on the target not yet
/// applied to the old source (0 otherwise).
pub const REVERSE_BACKLOG: &str = "pgferry_reverse_backlog_rows";
/// Seconds since the snapshot of the way back's last complete pass (0 when
/// there is no way back).
pub const REVERSE_LAG: &str = "pgferry_reverse_lag_seconds";
/// 1 while the agent runs and samples the source; absent when it is down.
pub const UP: &str = "pgferry_up";
/// Schema changes of the source sync repeated on the target, by kind.
pub const SCHEMA_FOLLOWED: &str = "pgferry_schema_changes_followed_total";

/// Every metric name, for documentation and tests.
pub const ALL: &[&str] = &[
    PHASE,
    COPY_ROWS,
    COPY_BYTES,
    COPY_DONE,
    TABLE_BYTES,
    BACKLOG,
    TABLE_LAG,
    LAG,
    APPLIED,
    BATCHES,
    BATCH_SECONDS,
    RETRIES,
    ERRORS,
    SOURCE_CONNECTIONS,
    FENCE,
    FENCE_SECONDS,
    XMIN_AGE,
    DELTA_BYTES,
    THROTTLED,
    SYNC_BACKOFF,
    REVERSE_BACKLOG,
    REVERSE_LAG,
    UP,
    SCHEMA_FOLLOWED,
];

/// The values of the `phase` label: the control state's phases as stored
/// (a unit test of the control state keeps the two lists equal).
pub const PHASES: [&str; 6] = [
    "installing",
    "installed",
    "copying",
    "syncing",
    "cutting_over",
    "cut_over",
];

/// Starts the exporter on `listen` (inside the current runtime) and describes
/// every metric. A port already in use is logged, not fatal: the migration
/// matters more than its dashboard.
pub fn install(listen: SocketAddr) {
    let builder = PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(
            Matcher::Full(BATCH_SECONDS.to_string()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(THROTTLED.to_string()),
                &[0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0],
            )
        })
        .expect("non-empty buckets");
    match builder.install() {
        Ok(()) => tracing::info!(%listen, "Serving metrics"),
        Err(e) => {
            tracing::warn!(%listen, error = %e, "Metrics are not served");
            return;
        }
    }
    describe_gauge!(PHASE, "Current phase of the migration (1 for the current phase).");
    describe_counter!(COPY_ROWS, Unit::Count, "Rows copied by the bulk copy.");
    describe_counter!(COPY_BYTES, Unit::Bytes, "Bytes streamed by the bulk copy.");
    describe_gauge!(COPY_DONE, "1 when the table's bulk copy is done.");
    describe_gauge!(TABLE_BYTES, Unit::Bytes, "Size of the table on the source.");
    describe_gauge!(
        BACKLOG,
        Unit::Count,
        "Captured changes not yet applied to the target."
    );
    describe_gauge!(
        TABLE_LAG,
        Unit::Seconds,
        "Seconds since the snapshot of the table's last applied batch."
    );
    describe_gauge!(
        LAG,
        Unit::Seconds,
        "End-to-end replication lag (the largest table lag)."
    );
    describe_counter!(APPLIED, Unit::Count, "Rows written to the target by the drain.");
    describe_counter!(BATCHES, Unit::Count, "Drain batches.");
    describe_histogram!(
        BATCH_SECONDS,
        Unit::Seconds,
        "Duration of drain batches that applied changes."
    );
    describe_counter!(RETRIES, Unit::Count, "Retries after transient failures.");
    describe_counter!(ERRORS, Unit::Count, "Failed operations, retried or not.");
    describe_gauge!(
        SOURCE_CONNECTIONS,
        Unit::Count,
        "Sessions pgferry holds open to the source."
    );
    describe_gauge!(FENCE, "1 while writes to the source are fenced.");
    describe_gauge!(FENCE_SECONDS, Unit::Seconds, "Seconds writes have been fenced.");
    describe_gauge!(
        XMIN_AGE,
        Unit::Count,
        "Age of the oldest snapshot pgferry holds on the source."
    );
    describe_gauge!(
        DELTA_BYTES,
        Unit::Bytes,
        "Disk used by pgferry's objects on the source."
    );
    describe_gauge!(
        REVERSE_BACKLOG,
        Unit::Count,
        "Changes on the target not yet applied to the old source (cutover.fallback)."
    );
    describe_gauge!(
        REVERSE_LAG,
        Unit::Seconds,
        "Seconds since the way back's last complete pass (cutover.fallback)."
    );
    describe_gauge!(UP, "1 while the agent runs and samples the source.");
    describe_counter!(
        SCHEMA_FOLLOWED,
        Unit::Count,
        "Schema changes of the source repeated on the target while syncing, by kind."
    );
    describe_gauge!(
        SYNC_BACKOFF,
        Unit::Seconds,
        "The drain's current pause for pressure on the source (0: not paused)."
    );
    describe_histogram!(
        THROTTLED,
        Unit::Seconds,
        "Waits on the copy and drain rate limits."
    );
}

/// The migration entered `phase`.
pub fn phase(current: &str) {
    for p in PHASES {
        gauge!(PHASE, "phase" => p).set(if p == current { 1.0 } else { 0.0 });
    }
}

/// Bytes of a table's copy went through (recorded per write batch).
pub fn copy_progress(table: &str, bytes: usize) {
    counter!(COPY_BYTES, "table" => table.to_string()).increment(bytes as u64);
}

/// A table's bulk copy committed.
pub fn table_copied(table: &str, rows: u64) {
    counter!(COPY_ROWS, "table" => table.to_string()).increment(rows);
    gauge!(COPY_DONE, "table" => table.to_string()).set(1.0);
}

/// A drain batch committed on the target.
pub fn batch_applied(table: &str, deleted: u64, inserted: u64, resync: bool, took: Duration) {
    let t = table.to_string();
    counter!(APPLIED, "table" => t.clone(), "op" => "delete").increment(deleted);
    counter!(APPLIED, "table" => t.clone(), "op" => if resync { "resync" } else { "insert" })
        .increment(inserted);
    counter!(BATCHES, "table" => t, "outcome" => "applied").increment(1);
    histogram!(BATCH_SECONDS).record(took.as_secs_f64());
}

/// The drain's pause for source pressure changed (`secs` 0: running).
pub fn sync_backoff(secs: f64) {
    gauge!(SYNC_BACKOFF).set(secs);
}

/// A drain batch found nothing to do, or another agent held the table.
pub fn batch_idle(table: &str, busy: bool) {
    let outcome = if busy { "busy" } else { "empty" };
    counter!(BATCHES, "table" => table.to_string(), "outcome" => outcome).increment(1);
}

/// An operation of `kind` failed transiently and is retried.
pub fn retried(kind: &'static str) {
    counter!(RETRIES, "kind" => kind).increment(1);
}

/// A worker waited `took` on the `kind` (copy or sync) rate limit.
pub fn throttled(kind: &'static str, took: Duration) {
    histogram!(THROTTLED, "kind" => kind).record(took.as_secs_f64());
}

/// An operation of `kind` failed (it may still be retried).
pub fn failed(kind: &'static str) {
    counter!(ERRORS, "kind" => kind).increment(1);
}

/// What one sample of the source shows.
#[derive(Debug, Default)]
pub struct Sample {
    /// Phase, when a migration is under way.
    pub phase: Option<&'static str>,
    /// Per table: name, copy done, backlog rows, lag seconds, size bytes.
    pub tables: Vec<(String, bool, i64, Option<f64>, i64)>,
    /// Fence up, and for how long.
    pub fence: Option<f64>,
    /// Sessions open to the source.
    pub source_connections: usize,
    /// Oldest snapshot held by pgferry, in transactions.
    pub xmin_age: i64,
    /// Bytes used by pgferry's objects on the source.
    pub delta_bytes: i64,
    /// The way back's backlog rows and lag seconds, while there is one.
    pub reverse: Option<(i64, f64)>,
}

/// Records a sample.
pub fn sampled(s: &Sample) {
    if let Some(p) = s.phase {
        phase(p);
    }
    let mut lag: f64 = 0.0;
    for (table, done, backlog, table_lag, size) in &s.tables {
        gauge!(COPY_DONE, "table" => table.clone()).set(if *done { 1.0 } else { 0.0 });
        gauge!(BACKLOG, "table" => table.clone()).set(*backlog as f64);
        gauge!(TABLE_BYTES, "table" => table.clone()).set(*size as f64);
        if let Some(l) = table_lag {
            gauge!(TABLE_LAG, "table" => table.clone()).set(*l);
            lag = lag.max(*l);
        }
    }
    gauge!(LAG).set(lag);
    gauge!(FENCE).set(if s.fence.is_some() { 1.0 } else { 0.0 });
    gauge!(FENCE_SECONDS).set(s.fence.unwrap_or(0.0));
    gauge!(SOURCE_CONNECTIONS).set(s.source_connections as f64);
    gauge!(XMIN_AGE).set(s.xmin_age as f64);
    gauge!(DELTA_BYTES).set(s.delta_bytes as f64);
    let (backlog, lag) = s.reverse.unwrap_or((0, 0.0));
    gauge!(REVERSE_BACKLOG).set(backlog as f64);
    gauge!(REVERSE_LAG).set(lag);
    gauge!(UP).set(1.0);
}

/// Pre-registers the counters so that a scrape shows them at zero before
/// anything happened (a rate over a series that appears late is wrong).
pub fn register_counters(tables: &[String]) {
    for t in tables {
        counter!(COPY_ROWS, "table" => t.clone()).increment(0);
        counter!(COPY_BYTES, "table" => t.clone()).increment(0);
        for op in ["delete", "insert", "resync"] {
            counter!(APPLIED, "table" => t.clone(), "op" => op).increment(0);
        }
        for outcome in ["applied", "empty", "busy"] {
            counter!(BATCHES, "table" => t.clone(), "outcome" => outcome).increment(0);
        }
    }
    for kind in KINDS {
        counter!(RETRIES, "kind" => *kind).increment(0);
        counter!(ERRORS, "kind" => *kind).increment(0);
    }
    for kind in SCHEMA_KINDS {
        counter!(SCHEMA_FOLLOWED, "kind" => *kind).increment(0);
    }
}

/// The kinds of schema change sync follows (the `kind` label of
/// [`SCHEMA_FOLLOWED`]).
pub const SCHEMA_KINDS: &[&str] = &[
    "partition_attached",
    "partition_detached",
    "partition_dropped",
    "table_created",
    "columns_added",
    "columns_dropped",
    "column_widened",
    "enum_value_added",
    "table_renamed",
    "table_dropped",
    "column_renamed",
    "column_altered",
];

/// Sync repeated a schema change of the source's on the target.
pub fn schema_change_followed(kind: &'static str) {
    counter!(SCHEMA_FOLLOWED, "kind" => kind).increment(1);
}

/// The kinds of retried operation (the `kind` label).
pub const KINDS: &[&str] = &[
    "ddl", "copy", "index", "batch", "install", "sync", "cutover", "cleanup",
];

/// The fence is known to be up while the source cannot be read (the abort
/// path retrying its lift): the alert must keep firing.
pub fn fence_still_up() {
    gauge!(FENCE).set(1.0);
}
