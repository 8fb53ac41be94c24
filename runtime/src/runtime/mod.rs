//! The inference runtime: a bundle loaded, optimised and ready to classify images. One
//! `Classifier` is shared by any number of threads (the plan is immutable; each call spawns
//! its own state).
//!
//! A model is optimised under [`RuntimeSettings`] (tract knobs in a scoped `KnobScope`): tract's
//! defaults, settings given by the caller, or settings measured on this machine by [`tune`] and
//! cached beside the bundle.

mod heap;
pub mod kernels;
pub mod profile;
pub mod settings;
pub mod tune;

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tract_core::prelude::{IntoTValue, RunOptions, TypedModel, TypedRunnableModel, tvec};
use tract_linalg::multithread::{Executor, multithread_tract_scope};

use crate::bundle::{self, BundleError, Manifest, manifest::OutputKind};
use crate::preprocess::{ImageError, ImageLimits, Preprocessor};

pub use profile::Profile;
pub use settings::RuntimeSettings;
pub use tune::{SettingsReport, TuneOptions, Tuning};

/// The tensor type inputs are given in.
pub use tract_core::prelude::Tensor;

#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Threads tract uses for an inference (matrix products split across them).
    pub threads: NonZeroUsize,
    /// Adaptive parallelism: an inference that runs alone uses `threads` threads (lowest
    /// latency); while another inference is running it runs on its caller's thread only (one
    /// single-threaded inference per core gives the highest throughput, and threads split
    /// across concurrent inferences only contend). The runtime's own kernels decide again at
    /// every parallel section, so an inference takes the cores others leave and gives them
    /// back when another starts.
    pub adaptive: bool,
    /// Largest bundle file accepted.
    pub max_bundle_bytes: u64,
    pub image_limits: ImageLimits,
    /// DCT-scaled JPEG decoding for large photos (see [`Preprocessor::with_dct_scaling`]).
    pub dct_scaling: bool,
    /// Which tract knobs the model is optimised with (default: tract's own).
    pub tuning: Tuning,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            threads: NonZeroUsize::MIN,
            adaptive: true,
            max_bundle_bytes: 2 << 30,
            image_limits: ImageLimits::default(),
            dct_scaling: true,
            tuning: Tuning::Off,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("cannot prepare the model: {0}")]
    Prepare(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("invalid runtime setting: {0}")]
    Settings(String),
}

impl RuntimeError {
    /// Stable reply code (DESIGN.md section 4).
    pub fn code(&self) -> &'static str {
        match self {
            RuntimeError::Image(e) => e.code(),
            _ => "internal",
        }
    }
}

/// One class of a result.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prediction {
    /// Index in the model's output (label offset included).
    pub index: usize,
    pub label: String,
    pub score: f32,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Classification {
    pub top: Vec<Prediction>,
    /// Every class's probability (for confidence measures beyond the top-1 score).
    #[serde(skip)]
    pub probabilities: Vec<f32>,
    /// Decode, crop, resize and normalise.
    #[serde(serialize_with = "ser_ms")]
    pub preprocess: Duration,
    #[serde(serialize_with = "ser_ms")]
    pub inference: Duration,
    /// Threads the inference started on (see [`Parallelism`]); with adaptive parallelism the
    /// runtime's kernels then take all of them while no other inference runs and one while
    /// others do, decided again at each parallel section.
    pub threads: usize,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// How many of its threads an inference may use, with adaptive parallelism on (without it,
/// every inference uses them all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Parallelism {
    /// Every thread when no other inference of the classifier is running, else one.
    #[default]
    Auto,
    /// Starts on one thread (the caller's): the caller knows that more work is about to take
    /// the other cores, e.g. requests waiting in its queue for another worker. Starting alone
    /// on every thread would then only fight that work for the cores. tract's own ops keep to
    /// that thread; the runtime's kernels still decide at each parallel section and take the
    /// other threads while no other inference runs (`kernels::Adaptive`), e.g. when the other
    /// workers are between two requests, or done with the backlog.
    Single,
}

pub struct Classifier {
    manifest: Manifest,
    plan: Arc<TypedRunnableModel>,
    preprocessor: Preprocessor,
    /// `threads` > 1: the pool an inference splits its matrix products over.
    pool: Option<Executor>,
    /// The pool's threads (1 without a pool).
    threads: usize,
    adaptive: bool,
    /// Inferences running now (adaptive parallelism).
    running: AtomicUsize,
    /// The settings the model was optimised with, and where they came from.
    settings: SettingsReport,
}

impl Classifier {
    /// Loads, optimises and plans a bundle; with [`Tuning::Auto`], under the settings cached
    /// beside it for this CPU, or measured now (and cached) when there are none.
    pub fn load(path: &Path, options: &RuntimeOptions) -> Result<Self, RuntimeError> {
        // First: the instruction set is fixed for the process once tract looks at the CPU.
        let isa = tune::isa_before_load(path, options);
        let _retain = heap::RetainHeap::new();
        let bundle = bundle::load(path, options.max_bundle_bytes)?;
        let settings = tune::settings_for(Some(path), &bundle.model, options, isa)?;
        Self::build(bundle.manifest, bundle.model, options, settings)
    }

    /// Builds a classifier from a manifest and a decluttered model (the converter uses this
    /// to verify a bundle before writing it). [`Tuning::Auto`] measures without a cache.
    pub fn from_model(
        manifest: Manifest,
        model: TypedModel,
        options: &RuntimeOptions,
    ) -> Result<Self, RuntimeError> {
        let settings = tune::settings_for(None, &model, options, Default::default())?;
        Self::build(manifest, model, options, settings)
    }

    fn build(
        manifest: Manifest,
        model: TypedModel,
        options: &RuntimeOptions,
        settings: SettingsReport,
    ) -> Result<Self, RuntimeError> {
        let plan = prepare(model, &settings.settings)?;
        let preprocessor = Preprocessor::new(
            manifest.preprocessing.clone(),
            manifest.input.clone(),
            options.image_limits,
        )?
        .with_dct_scaling(options.dct_scaling);
        Ok(Classifier {
            manifest,
            plan,
            preprocessor,
            pool: pool(options.threads),
            threads: options.threads.get(),
            adaptive: options.adaptive,
            running: AtomicUsize::new(0),
            settings,
        })
    }

    /// The runtime settings in effect and where they came from.
    pub fn settings(&self) -> &SettingsReport {
        &self.settings
    }

    /// Times every node of the plan over `runs` inferences of `input` (after a warm-up), on
    /// all of this classifier's threads.
    pub fn profile(&self, input: &Tensor, runs: usize) -> Result<Profile, RuntimeError> {
        let executor = self.pool.clone().unwrap_or(Executor::SingleThread);
        profile::profile(&self.plan, executor, input, runs)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }

    /// Runs the network on one input tensor; returns the probabilities of every output
    /// class (softmax applied when the model outputs logits).
    pub fn infer(&self, input: Tensor) -> Result<Vec<f32>, RuntimeError> {
        self.run(input, Parallelism::Auto)
            .map(|(probabilities, _)| probabilities)
    }

    /// The probabilities, and the threads the inference started on.
    fn run(&self, input: Tensor, parallelism: Parallelism) -> Result<(Vec<f32>, usize), RuntimeError> {
        let running = Running::enter(&self.running);
        let all = !self.adaptive || (running.alone && parallelism == Parallelism::Auto);
        let (executor, threads) = match &self.pool {
            Some(pool) if all => (pool.clone(), self.threads),
            _ => (Executor::SingleThread, 1),
        };
        // The runtime's kernels decide again at every parallel section (see `Adaptive`).
        let adaptive = (self.adaptive && self.pool.is_some()).then(|| kernels::Adaptive::enter(self.threads));
        let mut probabilities = run_on(&executor, || first_output(&self.plan, input))?;
        drop(adaptive);
        drop(running);
        if self.manifest.output.kind == OutputKind::Logits {
            softmax(&mut probabilities);
        }
        Ok((probabilities, threads))
    }

    /// Decodes, preprocesses and classifies one encoded image.
    pub fn classify(&self, image: &[u8], top_k: usize) -> Result<Classification, RuntimeError> {
        self.classify_with(image, top_k, Parallelism::Auto)
    }

    /// [`Classifier::classify`], told how many threads the inference may use.
    pub fn classify_with(
        &self,
        image: &[u8],
        top_k: usize,
        parallelism: Parallelism,
    ) -> Result<Classification, RuntimeError> {
        let start = Instant::now();
        let input = self.preprocessor.tensor_from_bytes(image)?;
        let preprocess = start.elapsed();
        let start = Instant::now();
        let (probabilities, threads) = self.run(input, parallelism)?;
        let inference = start.elapsed();
        Ok(Classification {
            top: self.top_k(&probabilities, top_k),
            probabilities,
            preprocess,
            inference,
            threads,
        })
    }

    /// The `k` most probable labelled classes, best first.
    pub fn top_k(&self, probabilities: &[f32], k: usize) -> Vec<Prediction> {
        top_k(&self.manifest, probabilities, k)
    }
}

/// Optimises a decluttered model under `settings` (knobs read while it is optimised and
/// planned) and plans it. The plan carries no executor: each inference picks one.
pub(crate) fn prepare(
    model: TypedModel,
    settings: &RuntimeSettings,
) -> Result<Arc<TypedRunnableModel>, RuntimeError> {
    let scope = settings.scope()?;
    let start = Instant::now();
    let failed = |e: tract_core::prelude::TractError| RuntimeError::Prepare(format!("{e:#}"));
    let model = scope.enter(|| model.into_decluttered()).map_err(failed)?;
    let decluttered = start.elapsed();
    let model = match settings.edge_kernels() {
        Some(options) => {
            let (model, done) = kernels::rewrite(model, options).map_err(failed)?;
            tracing::debug!(?done, "the runtime's own kernels took the place of tract's");
            model
        }
        None => model,
    };
    let rewritten = start.elapsed();
    // Decluttered already: tract's code generation passes only.
    let plan = scope.enter(|| {
        let mut model = model;
        model.optimize()?;
        model.into_runnable_with_options(&RunOptions::default())
    });
    tracing::debug!(
        declutter_ms = decluttered.as_secs_f64() * 1e3,
        rewrite_ms = (rewritten - decluttered).as_secs_f64() * 1e3,
        optimise_and_plan_ms = (start.elapsed() - rewritten).as_secs_f64() * 1e3,
        "model prepared"
    );
    plan.map_err(failed)
}

/// Runs `f` as an inference runs on `executor`: on the caller's thread, with tract's executor
/// set to it (parallel parts go to its pool). Running the whole inference on one of the pool's
/// threads instead was measured slower with 2 threads (Inception V3: 102-107 ms against 79):
/// the other thread is then asleep when a part is handed to it.
pub(crate) fn run_on<R>(executor: &Executor, f: impl FnOnce() -> R) -> R {
    let result = multithread_tract_scope(executor.clone(), f);
    if matches!(executor, Executor::MultiThread(_)) {
        kernels::spin::rest();
    }
    result
}

/// Runs the plan on `input` and returns its first output's values.
pub(crate) fn first_output(plan: &Arc<TypedRunnableModel>, input: Tensor) -> Result<Vec<f32>, RuntimeError> {
    let outputs = plan
        .run(tvec![input.into_tvalue()])
        .map_err(|e| RuntimeError::Inference(format!("{e:#}")))?;
    let output = outputs
        .first()
        .ok_or_else(|| RuntimeError::Inference("model gave no output".into()))?;
    output
        .try_as_plain_ram()
        .and_then(|v| v.as_slice::<f32>().map(<[f32]>::to_vec))
        .map_err(|e| RuntimeError::Inference(e.to_string()))
}

/// The thread pool an inference of `threads` threads splits its matrix products over.
pub(crate) fn pool(threads: NonZeroUsize) -> Option<Executor> {
    match threads.get() {
        1 => None,
        n => Some(Executor::multithread_with_name(n, "edge-infer")),
    }
}

/// Counts an inference as running for as long as it lives.
struct Running<'a> {
    count: &'a AtomicUsize,
    /// No other inference was running when this one started.
    alone: bool,
}

impl<'a> Running<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        let before = count.fetch_add(1, Ordering::AcqRel);
        Running {
            count,
            alone: before == 0,
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The `k` most probable classes, best first; classes below the label offset (a background
/// class) are skipped. Ties keep the lower index first.
pub fn top_k(manifest: &Manifest, probabilities: &[f32], k: usize) -> Vec<Prediction> {
    let offset = manifest.output.label_offset;
    let mut indices: Vec<usize> = (offset..probabilities.len()).collect();
    let key = |i: &usize| std::cmp::Reverse(ordered(probabilities[*i]));
    let k = k.min(indices.len());
    if k == 0 {
        return Vec::new();
    }
    indices.select_nth_unstable_by_key(k - 1, key);
    indices.truncate(k);
    indices.sort_by_key(|i| (key(i), *i));
    indices
        .into_iter()
        .map(|index| Prediction {
            index,
            label: manifest
                .labels
                .get(index - offset)
                .cloned()
                .unwrap_or_else(|| format!("class_{index}")),
            score: probabilities[index],
        })
        .collect()
}

/// Total order on f32 for sorting scores (NaN sorts lowest).
fn ordered(x: f32) -> i64 {
    if x.is_nan() {
        i64::MIN
    } else {
        i64::from(x.to_bits() as i32 ^ (((x.to_bits() as i32) >> 31) & 0x7fff_ffff))
    }
}

pub fn softmax(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in values.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    if sum > 0.0 {
        values.iter_mut().for_each(|v| *v /= sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_is_monotonic() {
        let xs = [-3.0f32, -0.5, -0.0, 0.0, 1e-9, 0.25, 1.0, 7.0];
        for w in xs.windows(2) {
            assert!(ordered(w[0]) <= ordered(w[1]), "{} {}", w[0], w[1]);
        }
        assert!(ordered(f32::NAN) < ordered(-1e30));
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut v = vec![1.0, 2.0, 3.0];
        softmax(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(v[2] > v[1] && v[1] > v[0]);
    }
}
