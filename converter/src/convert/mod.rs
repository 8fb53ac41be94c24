//! `edge-convert`'s library side: source model to verified edge bundle, and the `inspect` and
//! `verify` reports. The binary (`src/main.rs`) only parses flags and prints.

pub mod inspect;
pub mod progress;
pub mod rewrite;
pub mod samples;
pub mod source;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edge_runtime::bundle::{
    self, BundleError, Manifest,
    manifest::{self as m, OutputKind, Preprocessing},
};
use edge_runtime::runtime::{Classifier, RuntimeOptions};
use tract_onnx::prelude::*;

pub use progress::Progress;
pub use source::{InputOverrides, SourceError, SourceModel};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("cannot optimise the model: {0}")]
    Model(String),
    #[error("{0}")]
    Labels(String),
    #[error(
        "verification failed: the bundle differs from the source by {max_abs_diff:e} (tolerance {tolerance:e}) \
         over {samples} sample inputs"
    )]
    Mismatch {
        max_abs_diff: f32,
        tolerance: f32,
        samples: usize,
    },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub input: InputOverrides,
    /// Explicit preprocessing; else what the source declares; else the Inception preset.
    pub preprocessing: Option<Preprocessing>,
    pub labels: Option<Vec<String>>,
    pub label_offset: Option<usize>,
    pub output_kind: Option<OutputKind>,
    pub name: Option<String>,
    pub version: String,
    /// Sample inputs compared between source and bundle.
    pub samples: usize,
    pub tolerance: f32,
    /// Rewrite the graph for speed (`rewrite`); the verify step checks the result.
    pub rewrites: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            input: InputOverrides::default(),
            preprocessing: None,
            labels: None,
            label_offset: None,
            output_kind: None,
            name: None,
            version: "1".into(),
            samples: 3,
            tolerance: 1e-4,
            rewrites: true,
        }
    }
}

/// The outcome of a conversion.
#[derive(Debug)]
pub struct Converted {
    pub manifest: Manifest,
    pub notes: Vec<String>,
}

/// Converts `source` into a verified bundle at `output`.
pub fn convert(
    source_path: &Path,
    output: &Path,
    options: &ConvertOptions,
    progress: &Progress,
) -> Result<Converted, ConvertError> {
    let source = progress.step("reading source model", || {
        source::load(source_path, &options.input)
    })?;
    let mut notes = source.notes.clone();
    let mut typed = source.model.clone();
    // Source metadata (ONNX producer strings, doc strings) is not always valid NNEF literal
    // syntax, and the manifest records what matters: drop it.
    typed.properties.clear();
    let classes = output_classes(&typed)?;
    if options.rewrites {
        let moved = progress.step("rewriting for speed", || {
            source::guard(|| rewrite::pools_after_pointwise_convs(&mut typed)).map_err(ConvertError::Model)
        })?;
        if moved > 0 {
            notes.push(format!(
                "moved {moved} average pools after the 1x1 convolution that follows them (they commute; \
                 the pool then runs on fewer channels)"
            ));
        }
    }

    let preprocessing = match (&options.preprocessing, &source.preprocessing) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => {
            notes.push("preprocessing taken from the source's in-graph image decoding".into());
            p.clone()
        }
        (None, None) => {
            notes.push(
                "no preprocessing given: using the Inception preset (x/127.5 - 1, full-image resize)".into(),
            );
            Preprocessing::inception()
        }
    };
    let labels = options
        .labels
        .clone()
        .or_else(|| source.labels.clone())
        .unwrap_or_default();
    let label_offset = label_offset(options.label_offset, labels.len(), classes);
    if !labels.is_empty() && labels.len() + label_offset != classes {
        return Err(ConvertError::Labels(format!(
            "{} labels at offset {label_offset} do not match the model's {classes} output classes",
            labels.len()
        )));
    }
    if labels.is_empty() {
        notes.push("no labels given: results will name classes by index".into());
    }
    let file_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut manifest = Manifest {
        format_version: m::FORMAT_VERSION,
        model: m::ModelInfo {
            name: options.name.clone().unwrap_or_else(|| default_name(&source.path)),
            version: options.version.clone(),
        },
        source: m::SourceInfo {
            format: source.format,
            file: file_name(&source.path),
            sha256: source.sha256.clone(),
            signature: source.signature.clone(),
        },
        tract_version: bundle::TRACT_VERSION.into(),
        converter_version: env!("CARGO_PKG_VERSION").into(),
        input: m::InputSpec {
            name: source.input_name.clone(),
            shape: source.shape.clone(),
            layout: source.layout,
            dtype: "f32".into(),
        },
        preprocessing,
        output: m::OutputSpec {
            name: source.output_name.clone(),
            kind: options.output_kind.unwrap_or(OutputKind::Probabilities),
            classes,
            label_offset,
        },
        labels,
        verification: None,
    };
    manifest.validate().map_err(ConvertError::Invalid)?;

    let nnef = progress.step("serialising to NNEF", || bundle::nnef_tar(&typed))?;
    drop(typed);
    let bundle_model = progress.step("reloading the NNEF model", || bundle::model_from_nnef(&nnef))?;
    let inputs = samples::sample_inputs(&manifest, options.samples.max(1)).map_err(ConvertError::Invalid)?;
    let source_plan = progress.step("optimising the source model", || optimise(source.model))?;
    let (source_outputs, bundle_outputs) =
        progress.step("verifying the bundle against the source", || {
            let source_outputs = run_all(&source_plan, &inputs)?;
            // Raw outputs on both sides: no softmax whatever the output kind.
            let mut raw = manifest.clone();
            raw.output.kind = OutputKind::Probabilities;
            let classifier = Classifier::from_model(raw, bundle_model, &RuntimeOptions::default())
                .map_err(|e| ConvertError::Model(e.to_string()))?;
            let bundle_outputs = inputs
                .iter()
                .map(|t| {
                    classifier
                        .infer(t.clone())
                        .map_err(|e| ConvertError::Model(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, ConvertError>((source_outputs, bundle_outputs))
        })?;
    if options.output_kind.is_none() && !source_outputs.iter().all(|o| is_distribution(o)) {
        manifest.output.kind = OutputKind::Logits;
        notes.push("outputs do not sum to 1: recorded as logits (the runtime applies softmax)".into());
    }
    let max_abs_diff = max_abs_diff(&source_outputs, &bundle_outputs);
    manifest.verification = Some(m::Verification {
        against: manifest.source.file.clone(),
        samples: inputs.len(),
        max_abs_diff,
        tolerance: options.tolerance,
        passed: max_abs_diff <= options.tolerance,
    });
    if max_abs_diff.is_nan() || max_abs_diff > options.tolerance {
        return Err(ConvertError::Mismatch {
            max_abs_diff,
            tolerance: options.tolerance,
            samples: inputs.len(),
        });
    }
    progress.step("writing the bundle", || bundle::write(output, &manifest, &nnef))?;
    Ok(Converted { manifest, notes })
}

/// Result of comparing a bundle with its source.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub samples: usize,
    pub max_abs_diff: f32,
    pub tolerance: f32,
    pub passed: bool,
    /// Whether the bundle was compared with a source model, or only checked for sane outputs.
    pub against: Option<PathBuf>,
}

/// Runs the bundle (and the source, if given) on sample inputs and compares their outputs.
pub fn verify(
    bundle_path: &Path,
    against: Option<&Path>,
    samples: usize,
    tolerance: f32,
    progress: &Progress,
) -> Result<VerifyReport, ConvertError> {
    let loaded = progress.step("loading the bundle", || bundle::load(bundle_path, u64::MAX))?;
    let manifest = loaded.manifest.clone();
    let classifier = Classifier::from_model(manifest.clone(), loaded.model, &RuntimeOptions::default())
        .map_err(|e| ConvertError::Model(e.to_string()))?;
    let inputs = samples::sample_inputs(&manifest, samples.max(1)).map_err(ConvertError::Invalid)?;
    let run_bundle = |t: &Tensor| {
        classifier
            .infer(t.clone())
            .map_err(|e| ConvertError::Model(e.to_string()))
    };
    let bundle_outputs = progress.step("running the bundle", || {
        inputs.iter().map(run_bundle).collect::<Result<Vec<_>, _>>()
    })?;
    let Some(source_path) = against else {
        let sane = bundle_outputs
            .iter()
            .all(|o| o.iter().all(|v| v.is_finite()) && is_distribution(o));
        return Ok(VerifyReport {
            samples: inputs.len(),
            max_abs_diff: 0.0,
            tolerance,
            passed: sane,
            against: None,
        });
    };
    let overrides = InputOverrides {
        shape: Some(manifest.input.shape.clone()),
        layout: Some(manifest.input.layout),
        signature: manifest.source.signature.clone(),
        input_name: None,
        output_name: None,
        preprocessing_given: true,
    };
    let source = progress.step("reading the source model", || {
        source::load(source_path, &overrides)
    })?;
    let plan = progress.step("optimising the source model", || optimise(source.model))?;
    let mut source_outputs = progress.step("running the source model", || run_all(&plan, &inputs))?;
    if manifest.output.kind == OutputKind::Logits {
        source_outputs
            .iter_mut()
            .for_each(|o| edge_runtime::runtime::softmax(o));
    }
    let max_abs_diff = max_abs_diff(&source_outputs, &bundle_outputs);
    Ok(VerifyReport {
        samples: inputs.len(),
        max_abs_diff,
        tolerance,
        passed: max_abs_diff <= tolerance,
        against: Some(source_path.to_owned()),
    })
}

/// Reads a source model as the converter does and prepares it to run (the "load the
/// source" side of the load-time comparison).
pub fn prepare_source(
    path: &Path,
    overrides: &InputOverrides,
) -> Result<Arc<TypedRunnableModel>, ConvertError> {
    optimise(source::load(path, overrides)?.model)
}

fn optimise(model: TypedModel) -> Result<Arc<TypedRunnableModel>, ConvertError> {
    source::guard(|| model.into_optimized()?.into_runnable()).map_err(ConvertError::Model)
}

fn run_all(plan: &Arc<TypedRunnableModel>, inputs: &[Tensor]) -> Result<Vec<Vec<f32>>, ConvertError> {
    inputs
        .iter()
        .map(|t| {
            let out = plan
                .run(tvec![t.clone().into_tvalue()])
                .map_err(|e| ConvertError::Model(format!("{e:#}")))?;
            let first = out
                .first()
                .ok_or_else(|| ConvertError::Model("no output".into()))?;
            let values = first.try_as_plain_ram().and_then(|v| v.as_slice::<f32>());
            Ok(values.map_err(|e| ConvertError::Model(e.to_string()))?.to_vec())
        })
        .collect()
}

/// Number of classes of the single `[1, C]` (or `[1, 1, 1, C]`) output.
fn output_classes(model: &TypedModel) -> Result<usize, ConvertError> {
    if model.outputs.len() != 1 {
        return Err(ConvertError::Model(format!(
            "the model has {} outputs; bundles keep one",
            model.outputs.len()
        )));
    }
    let fact = model
        .output_fact(0)
        .map_err(|e| ConvertError::Model(e.to_string()))?;
    let shape = fact
        .shape
        .as_concrete()
        .ok_or_else(|| ConvertError::Model(format!("output shape {:?} is not fixed", fact.shape)))?;
    if fact.datum_type != f32::datum_type() {
        return Err(ConvertError::Model(format!(
            "output type {:?} is not f32",
            fact.datum_type
        )));
    }
    match shape.split_last() {
        Some((&c, rest)) if c > 1 && rest.iter().all(|&d| d == 1) => Ok(c),
        _ => Err(ConvertError::Model(format!(
            "output shape {shape:?} is not a [1, classes] score vector"
        ))),
    }
}

/// The output index of the first label: as given, else 1 when there is exactly one class
/// more than labels (TF-slim's background class 0 of 1001), else 0.
fn label_offset(given: Option<usize>, labels: usize, classes: usize) -> usize {
    match given {
        Some(o) => o,
        None if labels > 0 && labels + 1 == classes => 1,
        None => 0,
    }
}

fn is_distribution(v: &[f32]) -> bool {
    v.iter().all(|x| (0.0..=1.0).contains(x)) && (v.iter().sum::<f32>() - 1.0).abs() < 1e-3
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let mut max = 0f32;
    for (x, y) in a.iter().zip(b) {
        if x.len() != y.len() {
            return f32::INFINITY;
        }
        for (p, q) in x.iter().zip(y) {
            let d = (p - q).abs();
            if d.is_nan() {
                return f32::INFINITY;
            }
            max = max.max(d);
        }
    }
    max
}

fn default_name(path: &Path) -> String {
    let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().into_owned());
    // TF Serving layout: <name>/<version>/saved_model.pb
    let mut p = path;
    while p
        .file_name()
        .is_some_and(|n| n.to_string_lossy().chars().all(|c| c.is_ascii_digit()) || n == "saved_model.pb")
    {
        p = p.parent().unwrap_or(Path::new("model"));
    }
    stem(p).unwrap_or_else(|| "model".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_class_gives_label_offset_one() {
        assert_eq!(
            label_offset(None, 1000, 1001),
            1,
            "TF-slim Inception: 1001 outputs, 1000 labels"
        );
        assert_eq!(label_offset(None, 1000, 1000), 0);
        assert_eq!(label_offset(None, 0, 1001), 0, "no labels, no offset");
        assert_eq!(label_offset(Some(3), 1000, 1001), 3, "explicit wins");
    }

    #[test]
    fn max_abs_diff_treats_nan_and_shape_mismatch_as_infinite() {
        assert_eq!(max_abs_diff(&[vec![1.0, 2.0]], &[vec![1.5, 2.0]]), 0.5);
        assert_eq!(max_abs_diff(&[vec![1.0]], &[vec![f32::NAN]]), f32::INFINITY);
        assert_eq!(max_abs_diff(&[vec![1.0]], &[vec![1.0, 2.0]]), f32::INFINITY);
    }
}
