//! Runtime settings chosen by measurement, per bundle and per CPU.
//!
//! [`Tuning::Auto`] tries candidate [`RuntimeSettings`] on the machine that runs the model and
//! keeps the fastest: starting from tract's defaults, each candidate in [`CANDIDATES`] is
//! added to the best settings so far, the model optimised under them, and timed against the
//! best in interleaved rounds (same input, same threads); it is kept when it is at least
//! [`MIN_GAIN`] faster. A candidate whose optimised graph is the same as the best one's is
//! not timed. Tuning stops at the time budget (the candidate being timed is dropped).
//!
//! The choice is cached in `edge-tuning.json` beside the bundle (or in a given directory),
//! keyed by the bundle's sha256, the CPU (architecture, model name, the instruction sets tract
//! detected), the tract version, the thread count and the candidate list's version
//! ([`SEARCH_VERSION`]): a later load with the same key pays nothing. To avoid hashing the
//! bundle at every start, an entry also records the file's size, inode and modification time;
//! when they all match the file is taken as unchanged (as git's index does), otherwise it is
//! hashed. A cache that cannot be read or written costs a new tuning, never a failed load:
//! every candidate computes the same function up to float rounding.
//!
//! Before any of that, and before the bundle is even read, the instruction set tract's kernels
//! use is chosen the same way (tract's detection against AVX2 on AVX-512 CPUs), in child
//! processes because tract reads it once per process: see [`isa`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tract_core::prelude::{TypedModel, TypedRunnableModel};
use tract_linalg::multithread::Executor;

use super::profile::median;
use super::{RuntimeError, RuntimeOptions, RuntimeSettings, Tensor, first_output, pool, prepare, run_on};

mod cache;
pub mod isa;
pub use cache::{CacheEntry, CacheFile, CacheKey, FileId, cpu_description, sha256_file};
pub use isa::IsaTrial;

/// How a model's runtime settings are chosen.
#[derive(Debug, Clone, Default)]
pub enum Tuning {
    /// tract's defaults.
    #[default]
    Off,
    /// These settings.
    Fixed(RuntimeSettings),
    /// Measured on this machine, cached (see the module doc).
    Auto(TuneOptions),
}

#[derive(Debug, Clone)]
pub struct TuneOptions {
    /// Most time spent measuring knob candidates (optimising them included); comparing
    /// instruction sets in child processes, when it applies, takes at most half of it more.
    pub budget: Duration,
    /// Directory of the cache file; `None`: the bundle's directory.
    pub cache_dir: Option<PathBuf>,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions {
            budget: Duration::from_secs(30),
            cache_dir: None,
        }
    }
}

/// Name of the cache file in its directory.
pub const CACHE_FILE: &str = "edge-tuning.json";
/// Version of [`CANDIDATES`] and of the search: a change makes cached choices stale. Also
/// bumped when a candidate's kernels change enough to change the choice (5: Winograd block by
/// block on the micro-kernels, from 32 channels, where `EDGE_WINOGRAD=off` had tied).
pub const SEARCH_VERSION: u32 = 5;
/// A candidate is kept when it takes at most this fraction of the best time so far.
pub const MIN_GAIN: f64 = 0.97;
/// Largest difference a candidate's output may show against the defaults', relative to the
/// largest magnitude of the latter (summation order differs between kernels; a wrong kernel
/// differs by far more).
pub const MAX_OUTPUT_DIFFERENCE: f32 = 1e-3;
/// Interleaved timing rounds per candidate (one inference of each side per round).
const ROUNDS: usize = 5;

/// The candidates, tried in this order, each on top of the best settings so far. Only
/// scopable knobs that changed an Inception V3 bundle's time on the CPUs measured are here
/// (`edge-convert profile --setting`, BENCHMARKS.md, issue 20): the direct spatial
/// convolution (ONNX forms' stem convolutions; about 10% of the time on an AMD EPYC, slower
/// than im2col + matrix product there) and eager im2col (faster matrix products for KxK
/// convolutions on an Intel Xeon, but a copy that costs more than it saves on the EPYC).
/// `TRACT_ENABLE_BLOCKED_CONV` changed nothing measurable; `TRACT_AVGPOOL_SEPARABLE` does
/// change times but is read at evaluation, so a scope cannot set it per model;
/// `TRACT_CPU_ISA` is read once per process and compared in child processes ([`isa`]).
/// First, the runtime's own convolution and 1x1 kernels ([`super::kernels`]): 15% faster than
/// tract's on an AMD EPYC (BENCHMARKS.md); kept only where they are faster and agree with
/// tract's output ([`MAX_OUTPUT_DIFFERENCE`]).
pub const CANDIDATES: &[&[(&str, &str)]] = &[
    &[(super::settings::EDGE_KERNELS, "gemm")],
    // With them: 3x3 convolutions computed directly rather than by Winograd F(2x2, 3x3).
    &[(super::settings::EDGE_WINOGRAD, "off")],
    // With them: every product through `gemm::gemm` rather than our micro-kernel driver.
    &[(super::settings::EDGE_MICRO_KERNELS, "off")],
    &[("TRACT_DISABLE_DIRECT_SPATIAL", "true")],
    // Eager im2col for every kernel size, up to 8 MB of patch scratch per convolution.
    &[
        ("TRACT_LAZY_IM2COL_MIN_KERNEL", "1000"),
        ("TRACT_LAZY_IM2COL_MAX_EAGER_BYTES", "8388608"),
    ],
];

/// Where the settings in effect came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// tract's defaults (tuning off).
    Default,
    /// Given by the caller.
    Given,
    /// Measured earlier on this CPU, read from the cache.
    Cached,
    /// Measured during this load.
    Tuned,
}

/// The settings a model runs with, for status and `profile`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SettingsReport {
    pub settings: RuntimeSettings,
    pub origin: Origin,
    /// The measurement behind a tuned choice (this load's or the cached one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
    /// Time this load spent tuning (0 when the cache answered).
    pub tuning_ms: f64,
    /// The cache file consulted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<PathBuf>,
    /// Something the operator should know (cache not writable, budget reached).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The instruction sets compared (this load's or the cached comparison), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isa: Option<IsaTrial>,
}

impl SettingsReport {
    fn plain(settings: RuntimeSettings, origin: Origin) -> Self {
        SettingsReport {
            settings,
            origin,
            measured: None,
            tuning_ms: 0.0,
            cache: None,
            note: None,
            isa: None,
        }
    }
}

/// What [`isa_before_load`] did, for [`settings_for`] to report and cache.
#[derive(Debug, Clone, Default)]
pub(super) struct IsaOutcome {
    trial: Option<IsaTrial>,
    note: Option<String>,
    /// The bundle's sha256 if the cache lookup had to hash it (not hashed twice).
    sha256: Option<String>,
}

/// Call before the bundle is read (tract has not looked at the CPU yet): with
/// [`Tuning::Auto`], installs the instruction set cached for this bundle and CPU, or compares
/// them now in child processes and installs the faster (see [`isa`]).
pub(super) fn isa_before_load(bundle: &Path, options: &RuntimeOptions) -> IsaOutcome {
    let Tuning::Auto(tune) = &options.tuning else {
        return IsaOutcome::default();
    };
    if std::env::var_os("TRACT_CPU_ISA").is_some() || isa::candidates().is_empty() {
        return IsaOutcome::default(); // set by the operator, or nothing to compare
    }
    let cache_path = cache_dir(bundle, tune).join(CACHE_FILE);
    let mut sha256 = None;
    let cached = CacheFile::read(&cache_path).ok().and_then(|cache| {
        let file = FileId::of(bundle).ok()?;
        let key = CacheKey::here(options.threads.get());
        let i = cache
            .find(&key, &file, &mut || {
                let d = sha256_file(bundle)?;
                sha256 = Some(d.clone());
                Ok(d)
            })
            .ok()??;
        Some(cache.entries[i].isa.clone())
    });
    let trial = match cached {
        Some(trial) => trial,
        None => isa::compare(
            bundle,
            options.threads.get(),
            options.max_bundle_bytes,
            tune.budget / 2,
        ),
    };
    let note = match &trial {
        Some(t) if t.kept => isa::install(&t.candidate).err(),
        _ => None,
    };
    if let Some(t) = &trial {
        tracing::info!(
            candidate = %t.candidate, native_ms = t.native_ms, candidate_ms = t.candidate_ms,
            kept = t.kept, "instruction sets compared"
        );
    }
    IsaOutcome { trial, note, sha256 }
}

fn cache_dir(bundle: &Path, tune: &TuneOptions) -> PathBuf {
    match &tune.cache_dir {
        Some(d) => d.clone(),
        None => bundle
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned(),
    }
}

/// What the tuner measured on this machine.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Measured {
    pub threads: usize,
    /// Median ms per inference with tract's defaults, and the chosen settings' time derived
    /// from it by the kept trials' interleaved ratios.
    pub default_ms: f64,
    pub chosen_ms: f64,
    /// Wall time the tuning took.
    pub tuning_ms: f64,
    pub trials: Vec<Trial>,
}

/// One candidate tried.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Trial {
    pub settings: RuntimeSettings,
    /// Candidate ms over best-so-far ms, interleaved medians (None: not timed).
    pub ratio: Option<f64>,
    pub kept: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// The settings `model` is to be optimised with under `options`; `bundle` (its file) keys the
/// cache, `None` tunes without one.
pub(super) fn settings_for(
    bundle: Option<&Path>,
    model: &TypedModel,
    options: &RuntimeOptions,
    isa: IsaOutcome,
) -> Result<SettingsReport, RuntimeError> {
    let mut report = settings_without_isa(bundle, model, options, isa.trial.clone(), isa.sha256)?;
    report.isa = isa.trial;
    if let Some(n) = isa.note {
        report.note = Some(match report.note.take() {
            Some(other) => format!("{other}; {n}"),
            None => n,
        });
    }
    Ok(report)
}

fn settings_without_isa(
    bundle: Option<&Path>,
    model: &TypedModel,
    options: &RuntimeOptions,
    isa: Option<IsaTrial>,
    known_sha256: Option<String>,
) -> Result<SettingsReport, RuntimeError> {
    let tune = match &options.tuning {
        Tuning::Off => return Ok(SettingsReport::plain(RuntimeSettings::default(), Origin::Default)),
        Tuning::Fixed(s) => return Ok(SettingsReport::plain(s.clone(), Origin::Given)),
        Tuning::Auto(t) => t,
    };
    let key = CacheKey::here(options.threads.get());
    let Some(bundle) = bundle else {
        let measured = measure(model, options, tune.budget)?;
        return Ok(tuned_report(measured.0, measured.1, None, None));
    };
    let cache_path = cache_dir(bundle, tune).join(CACHE_FILE);
    let mut cache = CacheFile::read(&cache_path).unwrap_or_else(|reason| {
        tracing::warn!(cache = %cache_path.display(), "ignoring the tuning cache: {reason}");
        CacheFile::default()
    });
    let file = FileId::of(bundle)
        .map_err(|e| RuntimeError::Settings(format!("cannot stat {}: {e}", bundle.display())))?;
    let mut digest = known_sha256;
    let found = cache.find(&key, &file, &mut || {
        if let Some(d) = &digest {
            return Ok(d.clone());
        }
        let d = sha256_file(bundle)?;
        digest = Some(d.clone());
        Ok(d)
    });
    match found {
        Ok(Some(i)) => {
            let entry = cache.entries[i].clone();
            // Found by hashing: record the file's identity so the next start skips the hash.
            if let Some(sha) = digest.clone() {
                cache.entries[i].file = file;
                cache.entries[i].bundle_sha256 = sha;
                let _ = cache.write(&cache_path);
            }
            // A cache edited into invalid settings is ignored like a missing one.
            if RuntimeSettings::new(entry.settings.knobs().clone()).is_ok() {
                let mut report = SettingsReport::plain(entry.settings, Origin::Cached);
                report.measured = Some(entry.measured);
                report.cache = Some(cache_path);
                return Ok(report);
            }
        }
        Ok(None) => {}
        Err(e) => {
            return Err(RuntimeError::Settings(format!(
                "cannot hash {} for the tuning cache: {e}",
                bundle.display()
            )));
        }
    }
    let sha = match digest {
        Some(d) => d,
        None => sha256_file(bundle)
            .map_err(|e| RuntimeError::Settings(format!("cannot hash {}: {e}", bundle.display())))?,
    };
    let (settings, measured) = measure(model, options, tune.budget)?;
    cache.insert(CacheEntry {
        bundle_sha256: sha,
        file,
        key,
        settings: settings.clone(),
        measured: measured.clone(),
        isa,
        at_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    let note = match cache.write(&cache_path) {
        Ok(()) => None,
        Err(e) => {
            tracing::warn!(cache = %cache_path.display(), "cannot write the tuning cache: {e}");
            Some(format!(
                "cannot write the tuning cache {}: {e}; the next start tunes again",
                cache_path.display()
            ))
        }
    };
    Ok(tuned_report(settings, measured, Some(cache_path), note))
}

fn tuned_report(
    settings: RuntimeSettings,
    measured: Measured,
    cache: Option<PathBuf>,
    note: Option<String>,
) -> SettingsReport {
    tracing::info!(
        settings = %settings, default_ms = measured.default_ms, chosen_ms = measured.chosen_ms,
        tuning_ms = measured.tuning_ms, threads = measured.threads, "runtime settings tuned"
    );
    SettingsReport {
        settings,
        origin: Origin::Tuned,
        tuning_ms: measured.tuning_ms,
        measured: Some(measured),
        cache,
        note,
        isa: None,
    }
}

/// The search: greedy over [`CANDIDATES`], within `budget`.
fn measure(
    model: &TypedModel,
    options: &RuntimeOptions,
    budget: Duration,
) -> Result<(RuntimeSettings, Measured), RuntimeError> {
    let start = Instant::now();
    let deadline = start + budget;
    let executor = pool(options.threads).unwrap_or(Executor::SingleThread);
    let mut best_settings = RuntimeSettings::default();
    let mut best = Candidate::new(model, &best_settings)?;
    let input = input_for(model)?;
    // Warm-up, and the defaults' output every candidate must agree with.
    best.run(&executor, &input)?;
    let reference = best.output(&executor, &input)?;
    let mut default_ms = None;
    // The chosen settings' time relative to the defaults: the product of the kept trials'
    // ratios, each measured interleaved with what it replaced (times measured minutes apart
    // on a busy machine are not comparable; ratios in one interleaving are).
    let mut chosen_ratio = 1.0;
    let mut trials = Vec::new();
    for delta in CANDIDATES {
        let mut settings = best_settings.clone();
        for (k, v) in delta.iter() {
            settings = settings.with(k, v);
        }
        let mut trial = Trial {
            settings: settings.clone(),
            ratio: None,
            kept: false,
            skipped: None,
        };
        if Instant::now() >= deadline {
            trial.skipped = Some("time budget reached".into());
            trials.push(trial);
            continue;
        }
        let candidate = match Candidate::new(model, &settings) {
            Ok(c) => c,
            Err(e) => {
                trial.skipped = Some(format!("does not prepare: {e}"));
                trials.push(trial);
                continue;
            }
        };
        if candidate.graph == best.graph {
            trial.skipped = Some("same optimised graph".into());
            trials.push(trial);
            continue;
        }
        let difference = difference(&reference, &candidate.output(&executor, &input)?);
        if difference > MAX_OUTPUT_DIFFERENCE {
            trial.skipped = Some(format!(
                "its output differs from tract's defaults' by {difference:.2e} (relative)"
            ));
            trials.push(trial);
            continue;
        }
        let Some((ours, theirs)) = interleave(&best, &candidate, &executor, &input, deadline)? else {
            trial.skipped = Some("time budget reached".into());
            trials.push(trial);
            continue;
        };
        default_ms.get_or_insert(ours);
        let ratio = theirs / ours;
        trial.ratio = Some(ratio);
        if ratio <= MIN_GAIN {
            trial.kept = true;
            best = candidate;
            chosen_ratio *= ratio;
            best_settings = settings;
        }
        trials.push(trial);
    }
    let default_ms = match default_ms {
        Some(ms) => ms,
        // Nothing was timed against the defaults: time them alone.
        None => {
            let mut t: Vec<f64> = (0..3)
                .map(|_| best.run(&executor, &input))
                .collect::<Result<_, _>>()?;
            median(&mut t)
        }
    };
    let chosen_ms = default_ms * chosen_ratio;
    Ok((
        best_settings,
        Measured {
            threads: options.threads.get(),
            default_ms,
            chosen_ms,
            tuning_ms: start.elapsed().as_secs_f64() * 1e3,
            trials,
        },
    ))
}

/// One set of settings, prepared.
struct Candidate {
    plan: std::sync::Arc<TypedRunnableModel>,
    /// The optimised graph's operators in order: equal graphs run the same code.
    graph: Vec<String>,
}

impl Candidate {
    fn new(model: &TypedModel, settings: &RuntimeSettings) -> Result<Self, RuntimeError> {
        let plan = prepare(model.clone(), settings)?;
        let graph = plan
            .model()
            .nodes()
            .iter()
            .map(|n| format!("{} {:?}", n.op().name(), n.op().info().unwrap_or_default()))
            .collect();
        Ok(Candidate { plan, graph })
    }

    /// The first output's values for `input`.
    fn output(&self, executor: &Executor, input: &Tensor) -> Result<Vec<f32>, RuntimeError> {
        run_on(executor, || first_output(&self.plan, input.clone()))
    }

    /// One inference as `Classifier::infer` runs it, timed.
    fn run(&self, executor: &Executor, input: &Tensor) -> Result<f64, RuntimeError> {
        let start = Instant::now();
        run_on(executor, || first_output(&self.plan, input.clone()))?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }
}

/// Medians of `a` and `b` over interleaved rounds (after a warm-up of `b`); `None` when the
/// deadline passes first.
fn interleave(
    a: &Candidate,
    b: &Candidate,
    executor: &Executor,
    input: &Tensor,
    deadline: Instant,
) -> Result<Option<(f64, f64)>, RuntimeError> {
    b.run(executor, input)?;
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        if Instant::now() >= deadline {
            return Ok(None);
        }
        // Alternate which side goes first, so neither always runs on a warmer cache.
        if round % 2 == 0 {
            ta.push(a.run(executor, input)?);
            tb.push(b.run(executor, input)?);
        } else {
            tb.push(b.run(executor, input)?);
            ta.push(a.run(executor, input)?);
        }
    }
    Ok(Some((median(&mut ta), median(&mut tb))))
}

/// Largest absolute difference between two outputs over the largest magnitude of the first
/// (infinite when their lengths differ or a value is not finite).
fn difference(reference: &[f32], other: &[f32]) -> f32 {
    if reference.len() != other.len() {
        return f32::INFINITY;
    }
    let scale = reference.iter().fold(f32::MIN_POSITIVE, |m, v| m.max(v.abs()));
    let worst = reference
        .iter()
        .zip(other)
        .map(|(a, b)| {
            if a.is_finite() && b.is_finite() {
                (a - b).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0f32, f32::max);
    worst / scale
}

/// A fixed pseudo-random input in [-1, 1) of the model's input shape.
pub(crate) fn input_for(model: &TypedModel) -> Result<Tensor, RuntimeError> {
    let fact = model
        .input_fact(0)
        .map_err(|e| RuntimeError::Prepare(format!("{e:#}")))?;
    let shape: Vec<usize> = fact
        .shape
        .as_concrete()
        .ok_or_else(|| RuntimeError::Prepare(format!("input shape {:?} is not fixed", fact.shape)))?
        .to_vec();
    Ok(pseudo_random(&shape))
}

/// A fixed pseudo-random tensor in [-1, 1) of `shape` (the input tuning and profiling run on).
pub fn pseudo_random(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = 0x2545_f491_u32;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_shape(shape, &data).unwrap_or_else(|_| Tensor::from(0f32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_difference_is_relative_to_the_reference_and_refuses_the_unusable() {
        assert_eq!(difference(&[2.0, -4.0], &[2.0, -4.0]), 0.0);
        assert!((difference(&[2.0, -4.0], &[2.0, -3.996]) - 1e-3).abs() < 1e-6);
        assert_eq!(difference(&[1.0], &[1.0, 2.0]), f32::INFINITY);
        assert_eq!(difference(&[1.0], &[f32::NAN]), f32::INFINITY);
    }
}
