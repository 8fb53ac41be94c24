//! Source models: detect the format of what the user gave us and read it into a tract
//! inference model with a fixed input shape.

use std::io::Read;
use std::path::{Path, PathBuf};

use edge_runtime::bundle::manifest::{Layout, Preprocessing, SourceFormat};
use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::tf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} is not a model edge-convert can read: {reason}. Supported: ONNX (.onnx), \
         TensorFlow frozen GraphDef (.pb), TensorFlow SavedModel directory"
    )]
    Unrecognised { path: PathBuf, reason: String },
    #[error("cannot read {path} as {format}: {reason}")]
    Parse {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Tensorflow(#[from] tf::TfError),
    #[error("{0}")]
    Shape(String),
}

/// What the user asked for about the input, overriding what the model declares.
#[derive(Debug, Clone, Default)]
pub struct InputOverrides {
    /// Full input shape, batch first.
    pub shape: Option<Vec<usize>>,
    pub layout: Option<Layout>,
    /// SavedModel signature key.
    pub signature: Option<String>,
    /// TensorFlow graph input / output node names.
    pub input_name: Option<String>,
    pub output_name: Option<String>,
    /// The caller gives the preprocessing: don't require recognising in-graph decoding.
    pub preprocessing_given: bool,
}

/// A source model read by tract, with what we learnt about it.
pub struct SourceModel {
    pub format: SourceFormat,
    pub path: PathBuf,
    pub sha256: String,
    /// Decluttered, input shape fixed.
    pub model: TypedModel,
    pub input_name: String,
    pub output_name: String,
    pub shape: Vec<usize>,
    pub layout: Layout,
    pub signature: Option<String>,
    /// Preprocessing found in the source (in-graph JPEG decoding), if any.
    pub preprocessing: Option<Preprocessing>,
    /// Labels found in the source (a `classes` lookup constant), if any.
    pub labels: Option<Vec<String>>,
    pub notes: Vec<String>,
}

/// Which reader a path needs.
pub fn detect(path: &Path) -> Result<SourceFormat, SourceError> {
    let meta = std::fs::metadata(path).map_err(|source| SourceError::Io {
        path: path.to_owned(),
        source,
    })?;
    if meta.is_dir() {
        return Ok(SourceFormat::TensorflowSavedModel);
    }
    let unrecognised = |reason: &str| SourceError::Unrecognised {
        path: path.to_owned(),
        reason: reason.into(),
    };
    if meta.len() == 0 {
        return Err(unrecognised("the file is empty"));
    }
    let mut head = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|_| unrecognised("the file is too short"))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match (ext.as_str(), head[0]) {
        ("onnx", _) => Ok(SourceFormat::Onnx),
        ("pb", _) if path.file_name().is_some_and(|n| n == "saved_model.pb") => {
            Ok(SourceFormat::TensorflowSavedModel)
        }
        ("pb" | "graphdef", _) => Ok(SourceFormat::TensorflowFrozen),
        // Sniff: ONNX ModelProto starts with ir_version (field 1, varint); a GraphDef with
        // its first node (field 1, length-delimited).
        (_, 0x08) => Ok(SourceFormat::Onnx),
        (_, 0x0a) => Ok(SourceFormat::TensorflowFrozen),
        (_, 0x1f) => Err(unrecognised("it looks gzip-compressed; decompress it first")),
        _ => Err(unrecognised("unknown file signature")),
    }
}

/// Reads a source model and fixes its input shape (batch 1 unless overridden).
pub fn load(path: &Path, overrides: &InputOverrides) -> Result<SourceModel, SourceError> {
    let format = detect(path)?;
    match format {
        SourceFormat::Onnx => load_onnx(path, overrides),
        SourceFormat::TensorflowFrozen => {
            let graph = tf::load_frozen_graph_with(path, &tf_options(overrides))?;
            from_tf_graph(path, format, graph, overrides)
        }
        SourceFormat::TensorflowSavedModel => {
            let dir = if path.is_file() {
                path.parent().unwrap_or(Path::new("."))
            } else {
                path
            };
            let graph = tf::load_saved_model_with(dir, &tf_options(overrides))?;
            from_tf_graph(dir, format, graph, overrides)
        }
    }
}

fn tf_options(overrides: &InputOverrides) -> tf::LoadOptions {
    tf::LoadOptions {
        signature: overrides.signature.clone(),
        output: overrides.output_name.clone(),
        preprocessing_override: overrides.preprocessing_given,
    }
}

fn load_onnx(path: &Path, overrides: &InputOverrides) -> Result<SourceModel, SourceError> {
    let parse = |reason: String| SourceError::Parse {
        path: path.to_owned(),
        format: "ONNX",
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| SourceError::Io {
        path: path.to_owned(),
        source,
    })?;
    let sha256 = hex_sha256(&bytes);
    let mut model = guard(|| tract_onnx::onnx().model_for_read(&mut bytes.as_slice())).map_err(parse)?;
    if model.inputs.len() != 1 {
        return Err(parse(format!(
            "it has {} inputs; edge bundles take one image input",
            model.inputs.len()
        )));
    }
    if model.outputs.len() != 1 {
        return Err(parse(format!(
            "it has {} outputs; edge bundles keep one",
            model.outputs.len()
        )));
    }
    let declared = model.input_fact(0).map_err(|e| parse(e.to_string()))?.clone();
    let declared: Vec<Option<usize>> = declared
        .shape
        .dims()
        .map(|d| {
            d.concretize()
                .and_then(|d| d.to_i64().ok())
                .and_then(|d| usize::try_from(d).ok())
        })
        .collect();
    let input_name = model.node(model.inputs[0].node).name.clone();
    let output_name = model.node(model.outputs[0].node).name.clone();
    let (shape, layout) = fix_shape(&declared, overrides)?;
    model
        .set_input_fact(0, f32::fact(&shape).into())
        .map_err(|e| parse(e.to_string()))?;
    // A symbolic batch in the declared output fact would not unify with the fixed input.
    model
        .set_output_fact(0, InferenceFact::default())
        .map_err(|e| parse(e.to_string()))?;
    let model = guard(|| model.into_typed()?.into_decluttered()).map_err(parse)?;
    Ok(SourceModel {
        format: SourceFormat::Onnx,
        path: path.to_owned(),
        sha256,
        model,
        input_name,
        output_name,
        shape,
        layout,
        signature: None,
        preprocessing: None,
        labels: None,
        notes: Vec::new(),
    })
}

fn from_tf_graph(
    path: &Path,
    format: SourceFormat,
    graph: tf::TfGraph,
    overrides: &InputOverrides,
) -> Result<SourceModel, SourceError> {
    let sha_file = if path.is_dir() {
        find_saved_model_pb(path)
    } else {
        path.to_owned()
    };
    let sha256 = std::fs::read(&sha_file)
        .map(|b| hex_sha256(&b))
        .map_err(|source| SourceError::Io {
            path: sha_file.clone(),
            source,
        })?;
    let mut graph = graph;
    if let Some(input) = &overrides.input_name {
        graph.input = input.clone();
    }
    let (shape, layout) = fix_shape(&graph.input_shape, overrides)?;
    if layout != Layout::Nhwc {
        return Err(SourceError::Shape(
            "TensorFlow graphs take NHWC input; --layout nchw does not apply".into(),
        ));
    }
    let model = tf::tract_model(&graph, &shape)?;
    let (input_name, output_name) = (graph.input.clone(), graph.output.clone());
    Ok(SourceModel {
        format,
        path: path.to_owned(),
        sha256,
        model,
        input_name,
        output_name,
        shape,
        layout,
        signature: graph.signature,
        preprocessing: graph.preprocessing,
        labels: graph.labels,
        notes: graph.notes,
    })
}

/// `saved_model.pb` of a SavedModel directory (or of its highest numeric version).
fn find_saved_model_pb(dir: &Path) -> PathBuf {
    let direct = dir.join("saved_model.pb");
    if direct.exists() {
        return direct;
    }
    let best = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u64>().ok()?, e.path())))
        .max_by_key(|(v, _)| *v);
    best.map(|(_, p)| p.join("saved_model.pb")).unwrap_or(direct)
}

/// Decides the fixed input shape and layout from what the model declares and the overrides.
fn fix_shape(
    declared: &[Option<usize>],
    overrides: &InputOverrides,
) -> Result<(Vec<usize>, Layout), SourceError> {
    let shape_err = |m: String| SourceError::Shape(m);
    if let Some(shape) = &overrides.shape {
        if shape.len() != 4 || shape.contains(&0) {
            return Err(shape_err(format!(
                "--input-shape {shape:?} must be 4 positive dims, batch first"
            )));
        }
        if declared.len() == 4 {
            for (i, (d, s)) in declared.iter().zip(shape).enumerate() {
                if let Some(d) = d
                    && d != s
                {
                    return Err(shape_err(format!(
                        "--input-shape {shape:?} conflicts with the model's declared dim {i} = {d}"
                    )));
                }
            }
        }
    }
    if declared.len() != 4 && overrides.shape.is_none() {
        return Err(shape_err(format!(
            "the model's input has rank {}; an image model takes a 4-D tensor (give --input-shape)",
            declared.len()
        )));
    }
    let dims: Vec<Option<usize>> = match &overrides.shape {
        Some(s) => s.iter().map(|d| Some(*d)).collect(),
        None => declared.to_vec(),
    };
    let layout = match overrides.layout {
        Some(l) => l,
        None => match (dims[1], dims[3]) {
            (Some(3), d3) if d3 != Some(3) => Layout::Nchw,
            (d1, Some(3)) if d1 != Some(3) => Layout::Nhwc,
            _ => {
                return Err(shape_err(format!(
                    "cannot tell the layout of input {dims:?}; give --layout nhwc or nchw"
                )));
            }
        },
    };
    let mut shape = Vec::with_capacity(4);
    for (i, d) in dims.iter().enumerate() {
        shape.push(match (i, d) {
            (_, Some(d)) => *d,
            (0, None) => 1,
            _ => {
                return Err(shape_err(format!(
                    "input dim {i} is not fixed by the model ({dims:?}); give --input-shape"
                )));
            }
        });
    }
    Ok((shape, layout))
}

pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs a tract call that may panic on malformed input, turning a panic into an error.
pub fn guard<T>(f: impl FnOnce() -> TractResult<T>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(panic) => Err(format!(
            "the model reader failed on malformed input ({})",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("panic")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_inferred_from_the_channel_axis() {
        let o = InputOverrides::default();
        assert_eq!(
            fix_shape(&[None, Some(3), Some(224), Some(224)], &o).unwrap(),
            (vec![1, 3, 224, 224], Layout::Nchw)
        );
        assert_eq!(
            fix_shape(&[None, Some(299), Some(299), Some(3)], &o).unwrap(),
            (vec![1, 299, 299, 3], Layout::Nhwc)
        );
        assert!(
            fix_shape(&[None, None, None, Some(3)], &o).is_err(),
            "spatial dims unknown"
        );
        assert!(fix_shape(&[Some(1), Some(3)], &o).is_err());
    }

    #[test]
    fn overrides_must_agree_with_declared_dims() {
        let o = InputOverrides {
            shape: Some(vec![1, 224, 224, 3]),
            ..Default::default()
        };
        assert!(fix_shape(&[None, Some(299), Some(299), Some(3)], &o).is_err());
        assert_eq!(
            fix_shape(&[None, None, None, Some(3)], &o).unwrap().0,
            vec![1, 224, 224, 3]
        );
    }
}
