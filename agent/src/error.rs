//! The top-level error and its exit codes.
//!
//! Each phase has its own error enum; they meet here. Causes are attached as
//! `#[source]` and never pasted into messages, so the printed chain (see
//! [`crate::db::errors::report`]) does not repeat itself.

/// Everything a command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad flags, config file or environment.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A database could not be reached or refused the credentials.
    #[error(transparent)]
    Connect(#[from] crate::db::endpoint::ConnectError),
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

impl crate::db::retry::Retryable for Error {
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
            Error::Verify(crate::verify::VerifyError::Query { source, .. }) => crate::db::errors::is_retryable(source),
            Error::Verify(crate::verify::VerifyError::Connect(e)) => e.is_retryable(),
            Error::Cutover(CutoverError::Source(e) | CutoverError::Target(e)) => crate::db::errors::is_retryable(e),
            Error::Cutover(CutoverError::Connect(e)) => e.is_retryable(),
            _ => false,
        }
    }
}
