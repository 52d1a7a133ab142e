//! The top-level error, its exit codes, and SQLSTATE classification.
//!
//! Each phase has its own error enum; they meet here. Causes are attached as
//! `#[source]` and never pasted into messages, so the printed chain (see
//! [`report`]) does not repeat itself.

use std::error::Error as StdError;
use std::fmt::Write as _;

use tokio_postgres::error::SqlState;

/// Everything a command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad flags, config file or environment.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A database could not be reached or refused the credentials.
    #[error(transparent)]
    Connect(#[from] crate::endpoint::ConnectError),
    /// The preflight found blockers (the report has already been printed).
    #[error("preflight check found {0} blocking problem(s)")]
    CheckFailed(usize),
    /// Source and target differ after a cutover's final drain, or in `verify`.
    #[error("verification found {0} table(s) that differ between source and target")]
    VerifyMismatch(usize),
    /// A command was run in a phase where it makes no sense.
    #[error("{0}")]
    Phase(String),
    /// Control-schema bookkeeping failed.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// Capture trigger installation or removal failed.
    #[error(transparent)]
    Capture(#[from] crate::capture::CaptureError),
    /// Schema transfer (pg_dump / pg_restore) failed.
    #[error(transparent)]
    Schema(#[from] crate::schema::SchemaError),
    /// Bulk copy failed.
    #[error(transparent)]
    Copy(#[from] crate::copy::CopyError),
    /// Delta drain failed.
    #[error(transparent)]
    Sync(#[from] crate::drain::SyncError),
    /// Cutover failed.
    #[error(transparent)]
    Cutover(#[from] crate::cutover::CutoverError),
    /// Verification could not run.
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    /// Cleanup failed.
    #[error(transparent)]
    Cleanup(#[from] crate::cleanup::CleanupError),
    /// Reading or copying extensions' configuration rows failed.
    #[error(transparent)]
    ExtensionConfig(#[from] crate::extension_config::ExtensionConfigError),
    /// The local sandbox clusters (demo, tests) failed.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// An RDS API call failed.
    #[error(transparent)]
    Rds(#[from] crate::rds::RdsError),
    /// Stopped by SIGINT/SIGTERM before the work was done.
    #[error("stopped by signal before the command finished; run it again to continue")]
    Cancelled,
}

/// Process exit codes, as docs/design.md defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// The command did what it was asked.
    Done = 0,
    /// A check failed or verification found a mismatch.
    CheckFailed = 1,
    /// Usage or configuration error.
    Usage = 2,
    /// Anything else that went wrong at run time.
    Runtime = 3,
    /// A cutover failed and the source is still fenced: the application
    /// cannot write until `pgferry cutover --abort` lifts the fence.
    Fenced = 4,
}

impl Error {
    /// The exit code this error maps to.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Config(_) | Error::Rds(crate::rds::RdsError::Invalid(_)) => ExitCode::Usage,
            // A server that cannot be reached is a failed check, whichever
            // command met it (verify wraps it in its own error).
            Error::CheckFailed(_)
            | Error::VerifyMismatch(_)
            | Error::Connect(_)
            | Error::Verify(crate::verify::VerifyError::Connect(_)) => ExitCode::CheckFailed,
            Error::Cutover(
                crate::cutover::CutoverError::VerifyMismatch(_)
                | crate::cutover::CutoverError::MismatchBeforeFence(_)
                | crate::cutover::CutoverError::SchemaChanged(_),
            ) => ExitCode::CheckFailed,
            Error::Cutover(crate::cutover::CutoverError::StillFenced { .. }) => ExitCode::Fenced,
            // SIGTERM is a normal stop (systemd): state is consistent and a
            // re-run continues.
            Error::Cancelled => ExitCode::Done,
            _ => ExitCode::Runtime,
        }
    }
}

impl crate::retry::Retryable for Error {
    /// True for failures that a later attempt of the same (resumable) step
    /// may get past: lost connections, restarts, lock timeouts, a client tool
    /// that failed on one of those.
    fn is_retryable(&self) -> bool {
        use crate::cutover::CutoverError;
        match self {
            Error::Connect(e) => e.is_retryable(),
            Error::State(e) => e.is_retryable(),
            Error::Capture(e) => e.is_retryable(),
            Error::Copy(e) => e.is_retryable(),
            Error::Sync(e) => e.is_retryable(),
            Error::Cleanup(e) => e.is_retryable(),
            Error::ExtensionConfig(e) => e.is_retryable(),
            Error::Schema(e) => e.is_retryable(),
            Error::Verify(crate::verify::VerifyError::Query { source, .. }) => is_retryable(source),
            Error::Verify(crate::verify::VerifyError::Connect(e)) => e.is_retryable(),
            Error::Cutover(CutoverError::Source(e) | CutoverError::Target(e)) => is_retryable(e),
            Error::Cutover(CutoverError::Connect(e)) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Renders an error and its `source()` chain, one cause per line.
pub fn report(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    let mut last = out.clone();
    while let Some(cause) = cur {
        let text = cause.to_string();
        // tokio-postgres wraps a DbError in an Error that prints the same text.
        if text != last && !text.is_empty() {
            let _ = write!(out, "\n  caused by: {text}");
            if let Some(db) = cause.downcast_ref::<tokio_postgres::error::DbError>() {
                if let Some(detail) = db.detail() {
                    let _ = write!(out, "\n  detail: {detail}");
                }
                if let Some(hint) = db.hint() {
                    let _ = write!(out, "\n  hint: {hint}");
                }
            }
            last = text;
        }
        cur = cause.source();
    }
    out
}

/// Whether a failed database operation may succeed if simply tried again.
///
/// Reads the SQLSTATE class, never the message: connection exceptions (08),
/// serialization failures and deadlocks (40001, 40P01), lock timeouts (55P03),
/// operator intervention such as a terminated backend or a shutdown (57P01..03),
/// and insufficient resources (53) are retryable; everything else is not.
/// An error without a SQLSTATE that comes from a closed or broken connection is
/// retryable too.
pub fn is_retryable(err: &tokio_postgres::Error) -> bool {
    match err.code() {
        Some(code) => sqlstate_is_retryable(code.code()),
        None => err.is_closed() || err.source().is_some_and(|s| s.is::<std::io::Error>()),
    }
}

/// SQLSTATE classification behind [`is_retryable`].
pub fn sqlstate_is_retryable(code: &str) -> bool {
    const RETRYABLE: &[&str] = &["40001", "40P01", "55P03", "57P01", "57P02", "57P03"];
    code.starts_with("08") || code.starts_with("53") || RETRYABLE.contains(&code)
}

/// The server's own message for a statement's failure (without the
/// driver's wrapping), or the driver's error when the server sent none.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string())
}

/// True when the error is a `lock_timeout` expiry.
pub fn is_lock_timeout(err: &tokio_postgres::Error) -> bool {
    err.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_classes() {
        for code in ["08006", "08001", "40001", "40P01", "55P03", "57P01", "53300"] {
            assert!(sqlstate_is_retryable(code), "{code} should be retryable");
        }
        for code in ["42P01", "42501", "23505", "28P01", "22P02", "25006", "P0001"] {
            assert!(!sqlstate_is_retryable(code), "{code} should be fatal");
        }
    }

    #[test]
    fn report_walks_the_chain_without_repeating() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(report(&e), "outer\n  caused by: inner");
    }
}
