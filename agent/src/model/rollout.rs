//! Rollout steps of the device agent, I/O only (the daemon decides when and reports): the
//! bundle to serve at start, a reload (fetch, load, smoke test, keep the files) and a
//! rollback. Blocking; one at a time (the daemon runs them from one task).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use edge_runtime::runtime::{Classifier, RuntimeOptions};
use tracing::warn;

use super::fetch::{self, FetchLimits, Source};
use super::store::ModelStore;
use super::{ReloadError, load_checked};

/// A rollout request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Load `source` (default: the configured bundle, as SIGHUP does), checking `sha256`.
    Reload {
        source: Option<Source>,
        sha256: Option<String>,
    },
    /// Serve the previous bundle again.
    Rollback,
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Reload { .. } => "reload",
            Command::Rollback => "rollback",
        }
    }

    /// What the status names as the source.
    pub fn source_name(&self, configured: &Path) -> String {
        match self {
            Command::Reload { source: Some(s), .. } => s.display(),
            Command::Reload { source: None, .. } => configured.display().to_string(),
            Command::Rollback => "previous".into(),
        }
    }
}

pub struct Rollout {
    store: ModelStore,
    configured: PathBuf,
    options: RuntimeOptions,
    limits: FetchLimits,
    /// The file the served model came from.
    serving: Mutex<PathBuf>,
}

impl Rollout {
    pub fn new(store: ModelStore, configured: PathBuf, options: RuntimeOptions, limits: FetchLimits) -> Self {
        Self {
            serving: Mutex::new(configured.clone()),
            store,
            configured,
            options,
            limits,
        }
    }

    pub fn configured(&self) -> &Path {
        &self.configured
    }

    pub fn serving(&self) -> PathBuf {
        self.serving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_serving(&self, path: PathBuf) {
        *self
            .serving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = path;
    }

    /// The model to serve at start: the bundle rolled out last if there is one and it
    /// loads, else the configured bundle.
    pub fn load_initial(&self) -> Result<Classifier, ReloadError> {
        let current = self.store.current();
        if current.exists() {
            match load_checked(&current, &self.options) {
                Ok(c) => {
                    self.set_serving(current);
                    return Ok(c);
                }
                Err(e) => warn!(
                    bundle = %current.display(),
                    "the bundle rolled out last does not load ({e}); serving the configured bundle"
                ),
            }
        }
        let classifier = Classifier::load(&self.configured, &self.options)?;
        self.set_serving(self.configured.clone());
        Ok(classifier)
    }

    /// Runs a command; on success the returned model is to be swapped in (its bundle is
    /// already `current.bundle`), on failure nothing changed but the staging file.
    pub fn run(&self, command: &Command) -> Result<Classifier, ReloadError> {
        match command {
            Command::Reload { source, sha256 } => {
                let source = source
                    .clone()
                    .unwrap_or_else(|| Source::Path(self.configured.clone()));
                let sha256 = sha256.as_deref().map(fetch::parse_sha256).transpose()?;
                let staging = self.store.staging();
                fetch::fetch(&source, sha256.as_deref(), &staging, self.limits)?;
                let classifier = load_checked(&staging, &self.options).inspect_err(|_| {
                    let _ = std::fs::remove_file(&staging);
                })?;
                let current = self.store.promote(&self.serving())?;
                self.set_serving(current);
                Ok(classifier)
            }
            Command::Rollback => {
                let previous = self.store.previous();
                if !previous.exists() {
                    return Err(ReloadError::NoPrevious);
                }
                let classifier = load_checked(&previous, &self.options)?;
                let current = self.store.swap_previous()?;
                self.set_serving(current);
                Ok(classifier)
            }
        }
    }
}
