//! pgferry: moves a live PostgreSQL database to a managed target (AWS RDS /
//! Aurora) from a source that grants no superuser and no replication
//! privilege, with seconds of write downtime.
//!
//! One module per phase, each owning its SQL and errors: [`plan`] (preflight),
//! [`capture`] (install), [`copy`], [`sync`], [`cutover`], [`verify`],
//! [`cleanup`]; [`state`] is the only reader and writer of the control schema.

pub mod capture;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod control;
pub mod copy;
pub mod cutover;
pub mod db;
pub mod ddl;
pub mod demo;
pub mod drain;
pub mod error;
pub mod extension_config;
pub mod failpoint;
pub mod fallback;
pub mod follow;
pub mod migrate;
pub mod parallel;
pub mod plan;
pub mod progress;
pub mod rds;
pub mod roles;
pub mod rows;
pub mod sandbox;
pub mod schema;
pub mod scratch;
pub mod status;
pub mod sync;
pub mod telemetry;
pub mod verify;

pub use db::Migration;
pub use error::{Error, ExitCode};
