//! The model directory: the bundle being served and the one before it, kept so a restart
//! serves the model last rolled out and `rollback` has something to go back to.
//!
//! ```text
//! <dir>/staging.bundle    a candidate being fetched and checked (removed if refused)
//! <dir>/current.bundle    the bundle rolled out last (absent: serve the configured bundle)
//! <dir>/previous.bundle   what served before it
//! ```
//!
//! Every change is a rename within the directory followed by a sync of the directory, so a
//! crash leaves either the old or the new file under each name. At start the agent serves
//! `current.bundle` when it exists and loads, else the configured `model.bundle`.

use std::path::{Path, PathBuf};

use super::ReloadError;

pub struct ModelStore {
    dir: PathBuf,
}

impl ModelStore {
    /// Opens (creates) the directory.
    pub fn open(dir: &Path) -> Result<Self, ReloadError> {
        std::fs::create_dir_all(dir).map_err(|source| ReloadError::Store {
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
            std::fs::copy(serving, &tmp).map_err(|source| ReloadError::Store {
                path: tmp.clone(),
                source,
            })?;
            self.rename(&tmp, &self.previous())?;
        }
        self.rename(&self.staging(), &current)?;
        self.sync()?;
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
        self.sync()?;
        Ok(current)
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), ReloadError> {
        std::fs::rename(from, to).map_err(|source| ReloadError::Store {
            path: to.to_owned(),
            source,
        })
    }

    fn sync(&self) -> Result<(), ReloadError> {
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| ReloadError::Store {
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
