//! The model directory: the bundle being served and the one before it, kept so a restart
//! serves the model last rolled out and `rollback` has something to go back to.
//!
//! ```text
//! <dir>/staging.bundle    a candidate being fetched and checked (removed if refused)
//! <dir>/current.bundle    the bundle rolled out last (absent: serve the configured bundle)
//! <dir>/previous.bundle   what served before it
//! ```
//!
//! A power cut must leave a whole bundle under each name, old or new, never a torn one: every
//! file is fsynced before it is renamed into place (the fetch syncs `staging.bundle`; the copy
//! of the configured bundle is synced here), and every rename is followed by an fsync of the
//! directory before the next step. At start the agent serves `current.bundle` when it exists
//! and loads, else the configured `model.bundle` (also what a cut between two renames of a
//! change leaves: both steps of a change keep a whole bundle under each name).

use std::path::{Path, PathBuf};

use super::ReloadError;

pub struct ModelStore {
    dir: PathBuf,
}

impl ModelStore {
    /// Opens (creates) the directory; a new directory is synced into its parent.
    pub fn open(dir: &Path) -> Result<Self, ReloadError> {
        crate::durable::create_dir(dir).map_err(|source| ReloadError::Store {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self { dir: dir.to_owned() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn staging(&self) -> PathBuf {
        self.dir.join("staging.bundle")
    }

    pub fn current(&self) -> PathBuf {
        self.dir.join("current.bundle")
    }

    pub fn previous(&self) -> PathBuf {
        self.dir.join("previous.bundle")
    }

    /// The checked staging file becomes current; `serving` (the bundle that served until
    /// now: `current.bundle` or the configured file) becomes previous.
    pub fn promote(&self, serving: &Path) -> Result<PathBuf, ReloadError> {
        let current = self.current();
        if serving == current {
            self.rename(&current, &self.previous())?;
        } else {
            let tmp = self.dir.join("previous.bundle.tmp");
            std::fs::copy(serving, &tmp)
                .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
                .map_err(|source| ReloadError::Store {
                    path: tmp.clone(),
                    source,
                })?;
            self.rename(&tmp, &self.previous())?;
        }
        self.rename(&self.staging(), &current)?;
        Ok(current)
    }

    /// Rollback: previous and current trade places. Fails with `NoPrevious` when there is
    /// no previous bundle.
    pub fn swap_previous(&self) -> Result<PathBuf, ReloadError> {
        let (current, previous, tmp) = (self.current(), self.previous(), self.staging());
        if !previous.exists() {
            return Err(ReloadError::NoPrevious);
        }
        self.rename(&previous, &tmp)?;
        if current.exists() {
            self.rename(&current, &previous)?;
        }
        self.rename(&tmp, &current)?;
        Ok(current)
    }

    /// Renames within the directory and makes the rename durable before returning.
    fn rename(&self, from: &Path, to: &Path) -> Result<(), ReloadError> {
        std::fs::rename(from, to).map_err(|source| ReloadError::Store {
            path: to.to_owned(),
            source,
        })?;
        self.sync()
    }

    fn sync(&self) -> Result<(), ReloadError> {
        crate::durable::sync_dir(&self.dir).map_err(|source| ReloadError::Store {
            path: self.dir.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn promote_then_rollback_trade_current_and_previous() {
        let dir = tempfile::tempdir().unwrap();
        let configured = dir.path().join("configured.bundle");
        std::fs::write(&configured, "A").unwrap();
        let store = ModelStore::open(&dir.path().join("models")).unwrap();
        assert_eq!(store.swap_previous().unwrap_err().kind(), "no_previous");

        std::fs::write(store.staging(), "B").unwrap();
        let current = store.promote(&configured).unwrap();
        assert_eq!(
            (read(&current), read(&store.previous())),
            ("B".into(), "A".into())
        );
        assert_eq!(read(&configured), "A", "the configured file is left alone");

        std::fs::write(store.staging(), "C").unwrap();
        store.promote(&current).unwrap();
        assert_eq!(
            (read(&current), read(&store.previous())),
            ("C".into(), "B".into())
        );

        store.swap_previous().unwrap();
        assert_eq!(
            (read(&current), read(&store.previous())),
            ("B".into(), "C".into())
        );
        assert!(!store.staging().exists());
    }
}
