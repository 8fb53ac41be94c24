//! The TensorFlow front-end's error type: every variant names the file, node or signature at
//! fault, and the unsupported-model ones say what to run instead.

use std::path::PathBuf;

/// What went wrong reading or freezing a TensorFlow model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TfError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path} is {size} bytes, more than the {limit} bytes a {what} may have")]
    TooLarge {
        path: PathBuf,
        what: &'static str,
        size: u64,
        limit: u64,
    },

    #[error("{path} is not a valid {what}: {source}")]
    Decode {
        path: PathBuf,
        what: &'static str,
        source: prost::DecodeError,
    },

    /// The `variables/` checkpoint (tensor bundle) is malformed or uses a feature we do not read.
    #[error("checkpoint {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },

    /// A variable the graph reads has no value in the checkpoint.
    #[error("variable {node:?} (checkpoint key {key:?}) is not in the checkpoint {path}")]
    MissingVariable {
        node: String,
        key: String,
        path: PathBuf,
    },

    /// The graph is inconsistent or uses a construct we cannot freeze, at `node`.
    #[error("node {node:?}: {reason}")]
    Graph { node: String, reason: String },

    /// No or several candidates where one was needed (inputs, outputs, signatures, versions).
    #[error("{what}: {reason}")]
    Ambiguous { what: &'static str, reason: String },

    /// A model flavour this converter cannot freeze; `hint` says what to export instead.
    #[error("{flavour}, which edge-convert cannot convert. {hint}")]
    Unsupported { flavour: String, hint: String },

    /// tract-tensorflow could not load or declutter the frozen graph.
    #[error("tract could not load the frozen graph ({stage}): {reason}")]
    Tract { stage: String, reason: String },

    /// In-graph image preprocessing that could not be recognised.
    #[error(
        "could not recognise the image preprocessing inside the graph: {found}. Pass the \
         preprocessing explicitly (--preset, or --resize/--mean/--std/--scale) so detection is skipped"
    )]
    Preprocessing { found: String },
}

impl TfError {
    /// True when the model itself is outside what the converter supports (as opposed to a
    /// damaged file or an I/O failure): re-exporting the model differently can help.
    pub fn is_unsupported_model(&self) -> bool {
        matches!(self, TfError::Unsupported { .. } | TfError::Preprocessing { .. })
    }

    pub(crate) fn graph(node: impl Into<String>, reason: impl Into<String>) -> Self {
        TfError::Graph {
            node: node.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TfError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Hint for models we cannot freeze: the two exports that always work.
pub(crate) const EXPORT_HINT: &str = "Export the model as a frozen GraphDef instead \
(tf.function + convert_variables_to_constants_v2, then graph_def.SerializeToString()), or as \
ONNX with `python -m tf2onnx.convert --saved-model DIR --signature_def serving_default \
--output model.onnx`, and convert that file";
