//! Failpoints: named places where a test can freeze the agent to kill it.
//!
//! `PGFERRY_FAILPOINTS=copy.table_done@2,sync.after_target_commit` makes the
//! agent print `pgferry failpoint reached: NAME` to stderr at the named place
//! (at its Nth hit with `@N`, else the first) and then wait forever, so the
//! test can SIGKILL it at a known point. With `PGFERRY_FAILPOINT_RELEASE=FILE`
//! it waits only until that file exists and then carries on, so a test can
//! act inside a precise window (say, between a batch's snapshot and its
//! delta removal). Unset, a failpoint costs one lookup.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

fn armed() -> &'static HashMap<String, u32> {
    static ARMED: OnceLock<HashMap<String, u32>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("PGFERRY_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| match s.trim().split_once('@') {
                Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
                None => (s.trim().to_string(), 1),
            })
            .collect()
    })
}

fn counts() -> &'static Mutex<HashMap<String, AtomicU32>> {
    static COUNTS: OnceLock<Mutex<HashMap<String, AtomicU32>>> = OnceLock::new();
    COUNTS.get_or_init(Default::default)
}

/// Freezes here forever if the failpoint `name` is armed and this is its hit.
pub async fn hit(name: &str) {
    let Some(&nth) = armed().get(name) else {
        return;
    };
    let n = {
        let mut counts = counts().lock().unwrap_or_else(|p| p.into_inner());
        counts
            .entry(name.to_string())
            .or_insert_with(|| AtomicU32::new(0))
            .fetch_add(1, Ordering::SeqCst)
            + 1
    };
    if n == nth {
        {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "pgferry failpoint reached: {name}");
            let _ = err.flush();
        }
        match std::env::var_os("PGFERRY_FAILPOINT_RELEASE") {
            Some(file) => {
                let file = std::path::PathBuf::from(file);
                while !file.exists() {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}
