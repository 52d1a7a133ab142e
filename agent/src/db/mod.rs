//! The bottom layer: reaching a database and talking to it safely.
//! Endpoints and URLs ([`endpoint`], [`tls`], [`libpq`]), the handles every
//! phase works with ([`Migration`]), identifier quoting ([`ident`]),
//! error reports and SQLSTATE classification ([`errors`]), retry ([`retry`]) and rate
//! limits ([`throttle`]). Nothing here imports anything above it
//! (docs/design.md, "Layout").

pub mod endpoint;
pub mod errors;
mod handles;
pub mod ident;
pub mod libpq;
pub mod retry;
pub mod throttle;
pub mod tls;

pub use handles::Migration;
