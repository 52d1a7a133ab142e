//! What a failure says: an error's chain rendered for people ([`report`]),
//! and SQLSTATE classification (what a failed statement means, read from
//! its code and never from its message).

use std::error::Error as StdError;
use std::fmt::Write as _;

pub use tokio_postgres::error::SqlState;

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

/// A statement failed on one side, in a step whose own error has no more to
/// say (a catalog read, a role listing).
#[derive(Debug, thiserror::Error)]
#[error("a statement failed on the {side}")]
pub struct StatementFailed {
    /// Which side.
    pub side: crate::db::endpoint::Side,
    /// The driver's error.
    #[source]
    pub source: tokio_postgres::Error,
}

impl StatementFailed {
    /// On the source.
    pub fn source(source: tokio_postgres::Error) -> Self {
        Self {
            side: crate::db::endpoint::Side::Source,
            source,
        }
    }

    /// On the target.
    pub fn target(source: tokio_postgres::Error) -> Self {
        Self {
            side: crate::db::endpoint::Side::Target,
            source,
        }
    }
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
