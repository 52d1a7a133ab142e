//! The drain: applies captured deltas to the target, batch by batch.
//!
//! - `pass`: one batch for every table (`drain_pass`), and what a failed
//!   batch means (a type or enum changed on the source);
//! - `batch`: the batch protocol below (snapshot, keys, apply, consume,
//!   record), and the whole-table copy a batch makes instead;
//! - `ahead`: a batch that also verifies its table ahead of the fence
//!   (`cutover.verify = "changed"`) and keeps its ledger;
//! - `pending`: the backlog each table has;
//! - `types`: whether the target's column types take the source's values;
//! - `pressure`: pausing while the source is busy.
//!
//! On entry: the copy has finished (phase `syncing` or later). A batch for
//! table T:
//! 1. takes a session advisory lock for T on the source, so that no other
//!    agent drains T at the same time (two overlapping batches could commit
//!    on the target in the wrong order);
//! 2. opens a REPEATABLE READ transaction on the source; its snapshot S
//!    decides everything: the batch consumes exactly the delta rows visible
//!    in S, every one of them (invariants 4 and 5);
//! 3. on the target, in one transaction, deletes every key named by those
//!    deltas and inserts the source rows for those keys as of S (state-based:
//!    re-applying changes nothing, invariant 3); a TRUNCATE delta replaces the
//!    whole table with its contents as of S;
//! 4. only after the target commit, deletes on the source exactly the delta
//!    rows visible in S: in the source transaction of step 2 itself, which
//!    commits last. A transaction that committed after S keeps its deltas
//!    for the next batch, whatever its xid or commit order; a delta row needs
//!    no transaction id or other watermark (control schema v11).
//!
//! A crash anywhere leaves deltas that are re-applied harmlessly. Workers stop
//! between batches, never inside one.

mod ahead;
mod batch;
mod pass;
mod pending;
mod pressure;
pub mod types;

pub(crate) use ahead::{ledger_after, ledger_keys, unit_pages, SETTLE_ROUNDS, SMALL_UNIT_PAGES};
pub use ahead::{verify_ahead, Ahead};
pub(crate) use batch::forget_deltas;
pub use pass::{check_drift, drain_pass};
pub use pending::backlog;
pub(crate) use pressure::Backoff;

use crate::db::endpoint::Side;
use crate::db::retry::Retryable;
use crate::verify::TableVerdict;

/// Drain failures.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A statement of a batch failed.
    #[error("drain batch for {table} failed on the {side}")]
    Batch {
        /// The table.
        table: String,
        /// Which side failed.
        side: Side,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Counting the backlog failed.
    #[error("could not count the backlog of {table}")]
    Backlog {
        /// The table.
        table: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A session could not be opened.
    #[error(transparent)]
    Connect(#[from] crate::db::endpoint::ConnectError),
    /// Recording progress failed.
    #[error(transparent)]
    State(#[from] crate::control::state::StateError),
    /// A worker task panicked.
    #[error("a drain worker stopped unexpectedly")]
    Worker(#[source] tokio::task::JoinError),
    /// The source schema changed since install.
    #[error(
        "the source schema changed since install: {}. Make the same change on the target, then run \
         `pgferry install` (it captures new tables and marks changed ones for a fresh copy) and \
         `pgferry copy`, then sync again",
        .0.join("; ")
    )]
    SchemaDrift(Vec<String>),
    /// The target refused a value of an enum type that the source extended
    /// since the copy.
    #[error(
        "the source's enum types gained values since the copy, which the target refuses: {}. Run these on the \
         target, then sync again (nothing needs copying)",
        .0.join("; ")
    )]
    EnumDrift(Vec<String>),
    /// A batch failed on a column whose type the source changed since the
    /// copy (the drift check compares names, not types).
    #[error(
        "column types changed on the source since the copy, which the target's table does not take: {}. Make \
         the same change on the target, then sync again (nothing needs copying)",
        .0.join("; ")
    )]
    TypeDrift(Vec<String>),
    /// Reading the source catalog for drift failed.
    #[error("could not read the source catalog")]
    Catalog(#[source] tokio_postgres::Error),
    /// Repeating the source's schema change on the target failed.
    #[error(
        "could not follow the source's schema change on the target ({what}); sync again to retry, or set \
         sync.follow_partitions (partitions) or sync.follow_schema_changes (the rest) to false and make the \
         change on the target by hand"
    )]
    Follow {
        /// The step.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Comparing a table before the fence failed.
    #[error(transparent)]
    Verify(Box<crate::verify::VerifyError>),
}

impl Retryable for SyncError {
    fn is_retryable(&self) -> bool {
        match self {
            SyncError::Batch { source, .. } | SyncError::Backlog { source, .. } => {
                crate::db::errors::is_retryable(source)
            }
            SyncError::Connect(e) => e.is_retryable(),
            SyncError::State(e) => e.is_retryable(),
            SyncError::Catalog(source) | SyncError::Follow { source, .. } => {
                crate::db::errors::is_retryable(source)
            }
            SyncError::Worker(_)
            | SyncError::SchemaDrift(_)
            | SyncError::EnumDrift(_)
            | SyncError::TypeDrift(_)
            | SyncError::Verify(_) => false,
        }
    }
}

impl crate::error::Failure for SyncError {
    fn retryable(&self) -> bool {
        crate::db::retry::Retryable::is_retryable(self)
    }
}

/// What a drain did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SyncReport {
    /// Passes over all tables.
    pub passes: u64,
    /// Distinct keys applied.
    pub keys_applied: u64,
    /// Rows written to the target.
    pub rows_written: u64,
    /// Whole-table resynchronisations after TRUNCATE.
    pub truncates_applied: u64,
    /// Whole-table copies made because most of a table's rows changed (see
    /// `sync.recopy_fraction`).
    pub recopies: u64,
    /// Batches skipped because another agent was draining the table.
    pub busy: u64,
    /// Batches that applied one part of a large backlog (see [`PARTS`]).
    pub parts: u64,
    /// The source's partition maintenance repeated on the target (see
    /// `sync.follow_partitions`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions_followed: Vec<String>,
    /// The source's other schema changes repeated on the target: tables
    /// created, columns added or dropped (see `sync.follow_schema_changes`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schema_changes_followed: Vec<String>,
    /// Delta rows left when `--until-caught-up` stopped (written while the
    /// last pass ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog_left: Option<i64>,
}

impl SyncReport {
    /// True when the pass found nothing to apply and no table was skipped.
    pub fn is_idle(&self) -> bool {
        self.keys_applied == 0 && self.truncates_applied == 0 && self.busy == 0
    }

    /// Adds up a pass's counts into the report of the whole run.
    pub(crate) fn merge(&mut self, pass: &SyncReport) {
        self.passes += pass.passes;
        self.keys_applied += pass.keys_applied;
        self.rows_written += pass.rows_written;
        self.truncates_applied += pass.truncates_applied;
        self.recopies += pass.recopies;
        self.busy += pass.busy;
        self.parts += pass.parts;
    }

    pub(crate) fn add(&mut self, b: &BatchStats) {
        self.keys_applied += b.keys;
        self.rows_written += b.rows_written;
        self.truncates_applied += u64::from(b.truncated);
        self.recopies += u64::from(b.recopied);
        self.busy += u64::from(b.busy);
        self.parts += u64::from(b.part);
    }
}

/// One batch's outcome.
#[derive(Debug, Clone, Default)]
pub(crate) struct BatchStats {
    pub(crate) keys: u64,
    pub(crate) rows_deleted: u64,
    pub(crate) rows_written: u64,
    pub(crate) truncated: bool,
    /// Most of the table changed: copied whole instead of key by key.
    pub(crate) recopied: bool,
    /// Another agent held the table's batch lock.
    pub(crate) busy: bool,
    /// The batch applied one part of the table's keys.
    pub(crate) part: bool,
    /// The tables compared in full in the batch's snapshot, when asked.
    pub(crate) verified: Option<Vec<TableVerdict>>,
}
