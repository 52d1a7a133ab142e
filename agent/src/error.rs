//! The top-level error and its exit codes.
//!
//! Each phase has its own error enum and says, by implementing [`Failure`],
//! which exit code it maps to and whether a later attempt may succeed; the
//! top-level [`Error`] carries any of them without naming them, so this
//! module sits below the phases and never imports one (docs/design.md,
//! "Layout"). Causes are attached as `#[source]` and never pasted into
//! messages, so the printed chain (see [`crate::db::errors::report`]) does
//! not repeat itself.

use std::error::Error as StdError;
use std::fmt;

use crate::db::retry::Retryable;

/// What the top of the program needs to know of a phase's error.
pub trait Failure: StdError + Send + Sync + 'static {
    /// The exit code this error maps to.
    fn exit_code(&self) -> ExitCode {
        ExitCode::Runtime
    }

    /// True for failures that a later attempt of the same (resumable) step
    /// may get past: lost connections, restarts, lock timeouts, a client
    /// tool that failed on one of those.
    fn retryable(&self) -> bool {
        false
    }
}

/// Everything a command can fail with.
#[derive(Debug)]
pub enum Error {
    /// The preflight found blockers (the report has already been printed).
    CheckFailed(usize),
    /// Source and target differ after a cutover's final drain, or in `verify`.
    VerifyMismatch(usize),
    /// A command was run in a phase where it makes no sense.
    Phase(String),
    /// Stopped by SIGINT/SIGTERM before the work was done.
    Cancelled,
    /// A phase's own error (configuration, connection, control schema,
    /// capture, copy, drain, cutover, ...).
    Failed(Box<dyn Failure>),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::CheckFailed(n) => write!(f, "preflight check found {n} blocking problem(s)"),
            Error::VerifyMismatch(n) => {
                write!(
                    f,
                    "verification found {n} table(s) that differ between source and target"
                )
            }
            Error::Phase(text) => f.write_str(text),
            Error::Cancelled => {
                f.write_str("stopped by signal before the command finished; run it again to continue")
            }
            Error::Failed(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl StdError for Error {
    // Transparent: the phase's error speaks for itself, causes included.
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Failed(e) => e.source(),
            _ => None,
        }
    }
}

impl<E: Failure> From<E> for Error {
    fn from(e: E) -> Self {
        Error::Failed(Box::new(e))
    }
}

impl Error {
    /// The exit code this error maps to.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::CheckFailed(_) | Error::VerifyMismatch(_) => ExitCode::CheckFailed,
            Error::Phase(_) => ExitCode::Runtime,
            // SIGTERM is a normal stop (systemd): state is consistent and a
            // re-run continues.
            Error::Cancelled => ExitCode::Done,
            Error::Failed(e) => e.exit_code(),
        }
    }

    /// The phase's error of type `T` this is, if it is one.
    pub fn downcast_ref<T: Failure>(&self) -> Option<&T> {
        match self {
            Error::Failed(e) => (&**e as &(dyn StdError + 'static)).downcast_ref::<T>(),
            _ => None,
        }
    }

    /// [`Error::downcast_ref`], taking the error.
    pub fn downcast<T: Failure>(self) -> Result<T, Self> {
        match self {
            Error::Failed(e) if (&*e as &(dyn StdError + 'static)).is::<T>() => {
                let e: Box<dyn StdError + Send + Sync> = e;
                Ok(*e.downcast::<T>().expect("checked above"))
            }
            other => Err(other),
        }
    }
}

impl Retryable for Error {
    fn is_retryable(&self) -> bool {
        matches!(self, Error::Failed(e) if e.retryable())
    }
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

/// Bad flags, config file or environment.
impl Failure for crate::config::ConfigError {
    fn exit_code(&self) -> ExitCode {
        ExitCode::Usage
    }
}

/// A server that cannot be reached is a failed check, whichever command met
/// it.
impl Failure for crate::db::endpoint::ConnectError {
    fn exit_code(&self) -> ExitCode {
        ExitCode::CheckFailed
    }

    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

impl Failure for crate::db::errors::StatementFailed {
    fn retryable(&self) -> bool {
        crate::db::errors::is_retryable(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    impl Failure for Outer {
        fn exit_code(&self) -> ExitCode {
            ExitCode::Fenced
        }
    }

    #[test]
    fn a_phase_error_keeps_its_code_its_text_and_its_type() {
        let e: Error = Outer(std::io::Error::other("inner")).into();
        assert_eq!(e.exit_code(), ExitCode::Fenced);
        assert_eq!(crate::db::errors::report(&e), "outer\n  caused by: inner");
        assert!(e.downcast_ref::<Outer>().is_some());
        assert!(e.downcast::<Outer>().is_ok());
        assert!(!Error::Phase("x".into()).is_retryable());
    }
}
