//! `pgferry-bench`: pgferry's speed, measured against the tools people use
//! today, on throwaway local clusters, in one run. Each subcommand prints
//! JSON on stdout (progress goes to stderr).
//!
//! - `capture`: what capture costs the source (pgbench TPS, a bulk UPDATE),
//!   against Bucardo's trigger design;
//! - `copy`: the bulk copy's wall time against `pg_dump | pg_restore`,
//!   `pg_dump -Fd -j` + `pg_restore -j` and `pgcopydb clone`;
//! - `drain`: how fast a backlog of changed rows is applied, against
//!   Bucardo's apply done the simple way;
//! - `lag`: end-to-end lag (a heartbeat) and delta storage under a fixed
//!   pgbench rate, then a burst.

use std::collections::HashMap;

mod capture;
mod copy;
mod drain;
mod lag;

const USAGE: &str = "usage: pgferry-bench capture [--scale N] [--clients N] [--secs N] [--rounds N]
       pgferry-bench copy [--scale X] [--rounds N] [--jobs N] [--tools a,b,...]
       pgferry-bench drain [--rows N] [--rounds N] [--workers N]
       pgferry-bench lag [--scale N] [--clients N] [--rate TPS] [--secs N] [--burst-secs N] [--poll-ms N]";

/// Parses `--name value` pairs, allowing only `known` names.
pub(crate) fn flags(v: &[String], known: &[&str]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in v.chunks(2) {
        if !known.contains(&pair[0].as_str()) || pair.len() < 2 {
            eprintln!("unknown flag or missing value: {}\n{USAGE}", pair[0]);
            std::process::exit(2);
        }
        out.insert(pair[0].clone(), pair[1].clone());
    }
    out
}

/// A numeric flag, or its default.
pub(crate) fn num<T: std::str::FromStr>(f: &HashMap<String, String>, name: &str, default: T) -> T {
    match f.get(name) {
        None => default,
        Some(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("{name} needs a number, not {v:?}");
            std::process::exit(2)
        }),
    }
}

/// The median; for an even count, the mean of the two middle values.
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 0 {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    } else {
        s[n / 2]
    }
}

/// A session as `app` (password `bench`) on 127.0.0.1.
pub(crate) async fn connect(port: u16, dbname: &str) -> tokio_postgres::Client {
    connect_as(port, "app", dbname).await
}

/// A session as `user` (password `bench`) on 127.0.0.1.
pub(crate) async fn connect_as(port: u16, user: &str, dbname: &str) -> tokio_postgres::Client {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(user)
        .password("bench")
        .dbname(dbname);
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    c
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let v: Vec<String> = std::env::args().collect();
    match v.get(1).map(String::as_str) {
        Some("capture") => capture::run(&v[2..]).await,
        Some("copy") => copy::run(&v[2..]).await,
        Some("drain") => drain::run(&v[2..]).await,
        Some("lag") => lag::run(&v[2..]).await,
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}
