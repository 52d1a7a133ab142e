//! Scratch directories (schema archives, the `dump` method's staged data)
//! that do not outlive the agent, even one killed without a chance to
//! remove them.
//!
//! Each holds a `lock` file locked exclusively (`flock`) for as long as its
//! [`Scratch`] lives; the kernel releases the lock when the process dies,
//! however it dies. Making a new directory first removes those of the same
//! kind whose lock can be taken: their agent is gone. Under systemd's
//! `PrivateTmp` the temporary directory goes with the service anyway, but
//! `copy.dump_dir` is elsewhere, and a dump killed there and dumped again
//! would take the disk twice over.

use std::fs::File;
use std::path::{Path, PathBuf};

const LOCK: &str = "lock";

/// A scratch directory, removed when this is dropped.
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
    // Held for the directory's life; dropped after it is removed.
    _lock: File,
}

impl Scratch {
    /// Makes a directory named `prefix` and a random suffix in `parent`,
    /// after removing the ones of the same prefix left by dead agents.
    pub fn new_in(parent: &Path, prefix: &str) -> std::io::Result<Scratch> {
        sweep(parent, prefix);
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(parent)?;
        let lock = File::create(dir.path().join(LOCK))?;
        lock.try_lock()
            .map_err(|e| std::io::Error::other(format!("lock a new scratch directory: {e}")))?;
        Ok(Scratch { dir, _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes the directories of `prefix` in `parent` that no live agent
/// holds. One without a lock file (being made this instant, or made by an
/// older version) is left alone. Failures are logged, not returned: a
/// leftover costs space, not correctness.
fn sweep(parent: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(prefix) {
            continue;
        }
        let dir: PathBuf = entry.path();
        let Ok(lock) = File::open(dir.join(LOCK)) else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "Removed the scratch directory of an agent that is gone")
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "Could not remove an old scratch directory")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(parent: &Path) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        dirs.sort();
        dirs
    }

    #[test]
    fn a_scratch_directory_of_a_gone_agent_is_removed_a_live_ones_kept() {
        let parent = tempfile::tempdir().unwrap();
        let live = Scratch::new_in(parent.path(), "pgferry-data-").unwrap();
        // A dead agent's: its lock file, locked by nobody.
        let dead = parent.path().join("pgferry-data-dead");
        std::fs::create_dir(&dead).unwrap();
        File::create(dead.join(LOCK)).unwrap();
        std::fs::write(dead.join("big"), b"staged rows").unwrap();
        // Not one of ours, or without a lock file: left alone.
        let other = parent.path().join("pgferry-schema-dead");
        std::fs::create_dir(&other).unwrap();
        File::create(other.join(LOCK)).unwrap();
        let unlocked = parent.path().join("pgferry-data-old");
        std::fs::create_dir(&unlocked).unwrap();

        let next = Scratch::new_in(parent.path(), "pgferry-data-").unwrap();
        let dirs = listed(parent.path());
        assert!(!dirs.contains(&dead), "{dirs:?}");
        for kept in [live.path(), next.path(), &other, &unlocked] {
            assert!(
                dirs.iter().any(|d| d == kept),
                "{} kept: {dirs:?}",
                kept.display()
            );
        }
        let next_path = next.path().to_path_buf();
        drop(next);
        assert!(!next_path.exists(), "removed when dropped");
    }
}
