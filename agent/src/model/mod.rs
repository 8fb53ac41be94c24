//! The model being served, and replacing it while it serves (rollout, hot reload, rollback).
//!
//! [`Current`] holds the served model behind an `Arc`: a request clones the `Arc` once when it
//! starts and classifies with that model to the end, so a swap never disturbs a request in
//! flight; requests that start after the swap get the new model. A candidate is fetched
//! ([`fetch`]), loaded and put through a smoke inference ([`load_checked`]) before it is
//! swapped in; the files kept for restarts and rollback are in [`store`].

pub mod fetch;
pub mod rollout;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use edge_runtime::bundle::BundleError;
use edge_runtime::runtime::{Classifier, RuntimeError, RuntimeOptions, Tensor};

/// A value replaced atomically while readers keep the one they took.
pub struct Current<T> {
    slot: RwLock<Arc<T>>,
}

impl<T> Current<T> {
    pub fn new(value: T) -> Self {
        Self {
            slot: RwLock::new(Arc::new(value)),
        }
    }

    /// The value now; it stays valid for the holder after a [`replace`](Self::replace).
    pub fn get(&self) -> Arc<T> {
        self.slot.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Swaps in `value`; returns the one it replaced.
    pub fn replace(&self, value: Arc<T>) -> Arc<T> {
        let mut slot = self.slot.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *slot, value)
    }
}

/// Why a reload or rollback was refused; the old model keeps serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    #[error("invalid reload command: {0}")]
    InvalidCommand(String),
    #[error("a URL source needs its sha256")]
    MissingChecksum,
    #[error("cannot fetch {source_name}: {reason}")]
    Fetch { source_name: String, reason: String },
    #[error("fetching {source_name} timed out after {secs} s")]
    Timeout { source_name: String, secs: u64 },
    #[error("{source_name} is larger than the limit of {limit} bytes")]
    TooLarge { source_name: String, limit: u64 },
    #[error("sha256 mismatch for {source_name}: expected {expected}, got {actual}")]
    Checksum {
        source_name: String,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Load(#[from] RuntimeError),
    #[error("the smoke inference failed: {0}")]
    Smoke(String),
    #[error("no previous model to roll back to")]
    NoPrevious,
    #[error("cannot store the bundle at {path}: {source}")]
    Store { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Internal(String),
}

impl ReloadError {
    /// A stable word for the status (`model_reload.kind`) and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidCommand(_) => "invalid_command",
            Self::MissingChecksum => "missing_checksum",
            Self::Fetch { .. } => "fetch_failed",
            Self::Timeout { .. } => "timeout",
            Self::TooLarge { .. } => "too_large",
            Self::Checksum { .. } => "checksum_mismatch",
            Self::Load(RuntimeError::Bundle(
                BundleError::UnsupportedFormat { .. } | BundleError::NewerTract { .. },
            )) => "unsupported_bundle",
            Self::Load(RuntimeError::Bundle(BundleError::TooLarge { .. })) => "too_large",
            Self::Load(_) => "invalid_bundle",
            Self::Smoke(_) => "smoke_failed",
            Self::NoPrevious => "no_previous",
            Self::Store { .. } => "storage",
            Self::Internal(_) => "internal",
        }
    }
}

/// Loads a bundle and checks it can classify: one inference on a zero input (mid-grey after
/// the usual normalisations) must give `output.classes` finite values.
pub fn load_checked(path: &Path, options: &RuntimeOptions) -> Result<Classifier, ReloadError> {
    let classifier = Classifier::load(path, options)?;
    smoke_test(&classifier).map_err(ReloadError::Smoke)?;
    Ok(classifier)
}

/// One inference on a zero tensor of the input shape; the reason names what was wrong.
pub fn smoke_test(classifier: &Classifier) -> Result<(), String> {
    let manifest = classifier.manifest();
    let shape = &manifest.input.shape;
    let input = Tensor::from_shape(shape, &vec![0f32; shape.iter().product()])
        .map_err(|e| format!("cannot build a {shape:?} input: {e}"))?;
    let output = classifier.infer(input).map_err(|e| e.to_string())?;
    if output.len() != manifest.output.classes {
        return Err(format!(
            "the model gave {} values, the manifest declares {} classes",
            output.len(),
            manifest.output.classes
        ));
    }
    if let Some(i) = output.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "the model gave a non-finite score ({}) for class {i} on a blank image",
            output[i]
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_keeps_its_value_across_a_replace() {
        let current = Current::new(1);
        let held = current.get();
        let old = current.replace(Arc::new(2));
        assert_eq!((*held, *old, *current.get()), (1, 1, 2));
    }
}
