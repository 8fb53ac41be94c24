//! TensorFlow front-end: turns a frozen GraphDef or a SavedModel (TF2 functions + variables,
//! or a TF-Serving-style export with in-graph JPEG decoding, TF1 or TF 2.x control flow) into
//! a frozen, pruned, folded GraphDef that tract-tensorflow 0.23 loads and optimises.
//!
//! Pipeline: read (`saved_model`, `bundle_reader`) -> cut at the decoded image if the
//! signature takes JPEG bytes (`jpeg_signature`) -> freeze: inline functions, variables to
//! constants, prune to the output (`freeze`) -> fold constants (`fold`) -> fold batch norms
//! into convolutions (`batch_norm`) -> check every op is one tract reads. [`tract_model`] then
//! loads the result into tract (declutter with a symbolic batch first: see `tract_model.rs`).

mod batch_norm;
mod bundle_reader;
mod error;
mod fold;
mod freeze;
mod graph;
mod jpeg_signature;
mod saved_model;
mod sstable;
mod tensor;
mod tract_model;
mod variables;

use std::path::Path;

use edge_proto::tensorflow::{DataType, GraphDef, NodeDef, attr_value};
use edge_runtime::bundle::manifest::Preprocessing;
use prost::Message;

pub use error::TfError;
pub use tract_model::tract_model;

use graph::TensorRef;

/// A frozen graph ready for tract, and what we learnt about it.
#[derive(Debug, Clone)]
pub struct TfGraph {
    /// Frozen: no variables, no functions, no control flow, only what the output needs.
    pub graph: GraphDef,
    /// Name of the `Placeholder` feeding the network (a float32 image tensor).
    pub input: String,
    /// Input shape as declared (`None` = unknown dim); NHWC for image networks.
    pub input_shape: Vec<Option<usize>>,
    /// Node name of the network output kept (probabilities or logits).
    pub output: String,
    /// SavedModel signature key used, if any.
    pub signature: Option<String>,
    /// Preprocessing detected from in-graph decoding (JPEG signatures), if any.
    pub preprocessing: Option<Preprocessing>,
    /// Class names taken over from a string constant the `classes` output looks up, if any;
    /// `labels[i]` names output `i`.
    pub labels: Option<Vec<String>>,
    /// Human-readable notes on what was done.
    pub notes: Vec<String>,
}

/// Choices the caller can make instead of letting the loader decide.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// SavedModel signature key (default: `serving_default`, or the only signature).
    pub signature: Option<String>,
    /// Output to keep: a signature output key (SavedModel), or a node / `node:index` tensor
    /// name of the source graph. Default: the signature's probabilities (through any top-k),
    /// or the frozen graph's single sink node.
    pub output: Option<String>,
    /// The caller supplies the preprocessing itself (e.g. a `--preset`): skip detecting it in
    /// a JPEG signature, and do not fail when it cannot be recognised (`preprocessing` is then
    /// `None`). The graph is still cut at the decoded image.
    pub preprocessing_override: bool,
}

/// Protobuf messages cannot exceed 2 GiB.
const MAX_PROTO_BYTES: u64 = 2 << 30;

/// Reads a frozen GraphDef (`.pb`) and folds it; input = its single float `Placeholder`,
/// output = its single sink node.
pub fn load_frozen_graph(path: &Path) -> Result<TfGraph, TfError> {
    load_frozen_graph_with(path, &LoadOptions::default())
}

/// [`load_frozen_graph`] with options (`output`; `signature` does not apply).
pub fn load_frozen_graph_with(path: &Path, options: &LoadOptions) -> Result<TfGraph, TfError> {
    let bytes = read_limited(path, "GraphDef")?;
    let source = GraphDef::decode(bytes.as_slice()).map_err(|source| TfError::Decode {
        path: path.to_owned(),
        what: "frozen GraphDef (if it is a SavedModel's saved_model.pb, give its directory)",
        source,
    })?;
    let input = single_float_placeholder(&source)?;
    let output = match &options.output {
        Some(o) => TensorRef::parse_user(o),
        None => TensorRef::new(single_sink(&source)?, 0),
    };
    let mut freezer = freeze::Freezer::new(&source, &[], &freeze::NoVariables);
    let out = freezer.tensor(&output)?;
    let inlined = freezer.inlined.clone();
    let mut notes = Vec::new();
    if !inlined.is_empty() {
        notes.push(format!("inlined functions {}", inlined.join(", ")));
    }
    // Keep the output's name even when it was an Identity the freezer bypassed.
    let wanted_name = (output.index == 0).then(|| output.node.clone());
    let mut g = finish(freezer.finish(), &input.name, out, wanted_name, &mut notes)?;
    g.input_shape = declared_shape(&input);
    Ok(g)
}

/// Reads a SavedModel directory (the version directory with `saved_model.pb`, or its parent
/// holding numeric version directories: the highest is used) and freezes `signature`
/// (default `serving_default`).
pub fn load_saved_model(dir: &Path, signature: Option<&str>) -> Result<TfGraph, TfError> {
    load_saved_model_with(
        dir,
        &LoadOptions {
            signature: signature.map(String::from),
            ..Default::default()
        },
    )
}

/// [`load_saved_model`] with options.
pub fn load_saved_model_with(dir: &Path, options: &LoadOptions) -> Result<TfGraph, TfError> {
    saved_model::load(dir, options)
}

/// The protobuf encoding of `graph`, for `tract_tensorflow::tensorflow().model_for_read(..)`.
pub fn encode_for_tract(graph: &GraphDef) -> Vec<u8> {
    graph.encode_to_vec()
}

/// Common tail: name the output, prune, fold constants and batch norms, prune again, check
/// that tract knows every op. `out` is the frozen output tensor; `name` the node name to give
/// it (an `Identity` is added when it differs).
fn finish(
    mut graph: GraphDef,
    input: &str,
    out: TensorRef,
    name: Option<String>,
    notes: &mut Vec<String>,
) -> Result<TfGraph, TfError> {
    let taken: std::collections::HashSet<String> = graph.node.iter().map(|n| n.name.clone()).collect();
    let output = match name {
        Some(name) if name != out.node || out.index != 0 => {
            let mut taken = taken;
            let name = graph::fresh_name(&mut taken, &name);
            graph
                .node
                .push(graph::f32_op(&name, "Identity", vec![out.to_input()]));
            name
        }
        _ if out.index != 0 => {
            let mut taken = taken;
            let name = graph::fresh_name(&mut taken, &format!("{}_{}", out.node, out.index));
            graph
                .node
                .push(graph::f32_op(&name, "Identity", vec![out.to_input()]));
            name
        }
        _ => out.node,
    };
    graph::prune(&mut graph, &[&output])?;
    if !graph.node.iter().any(|n| n.name == input) {
        return Err(TfError::graph(
            &output,
            format!("the output does not depend on the input {input:?}"),
        ));
    }
    let folded = fold::fold_constants(&mut graph)?;
    let report = batch_norm::fold_batch_norms(&mut graph, &[&output])?;
    graph::prune(&mut graph, &[&output])?;
    let rank1 = batch_norm::rank1_constants(&mut graph)?;
    graph::prune(&mut graph, &[&output])?;
    notes.push(format!("folded {folded} constant subgraph nodes"));
    if report.folded_into_conv > 0 {
        notes.push(format!(
            "folded {} batch-norm blocks into their convolutions (filter scaled per output channel, rank-1 BiasAdd)",
            report.folded_into_conv
        ));
    }
    if report.fused_rewritten > 0 {
        notes.push(format!(
            "rewrote {} FusedBatchNorm nodes as per-channel arithmetic",
            report.fused_rewritten
        ));
    }
    if rank1 > 0 {
        notes.push(format!("reshaped {rank1} [1,..,1,C] constants to rank 1"));
    }
    let unknown = freeze::unsupported_ops(&graph);
    if !unknown.is_empty() {
        let list: Vec<String> = unknown
            .iter()
            .map(|(op, node)| format!("{op} (node {node:?})"))
            .collect();
        return Err(TfError::Unsupported {
            flavour: format!(
                "the frozen network uses ops tract-tensorflow cannot load: {}",
                list.join(", ")
            ),
            hint: "Export it as ONNX with `python -m tf2onnx.convert --saved-model DIR --output model.onnx` \
                   (or --graphdef FILE --inputs .. --outputs ..) and convert that file"
                .into(),
        });
    }
    notes.push(format!("frozen graph: {} nodes", graph.node.len()));
    let input_node = graph.node.iter().find(|n| n.name == input);
    let input_shape = input_node.map(declared_shape).unwrap_or_default();
    Ok(TfGraph {
        graph,
        input: input.to_string(),
        input_shape,
        output,
        signature: None,
        preprocessing: None,
        labels: None,
        notes: std::mem::take(notes),
    })
}

fn read_limited(path: &Path, what: &'static str) -> Result<Vec<u8>, TfError> {
    let len = std::fs::metadata(path).map_err(|e| TfError::io(path, e))?.len();
    if len > MAX_PROTO_BYTES {
        return Err(TfError::TooLarge {
            path: path.to_owned(),
            what,
            size: len,
            limit: MAX_PROTO_BYTES,
        });
    }
    std::fs::read(path).map_err(|e| TfError::io(path, e))
}

fn declared_shape(node: &NodeDef) -> Vec<Option<usize>> {
    match graph::attr(node, "shape") {
        Some(attr_value::Value::Shape(s)) if !s.unknown_rank => {
            s.dim.iter().map(|d| usize::try_from(d.size).ok()).collect()
        }
        _ => Vec::new(),
    }
}

fn single_float_placeholder(g: &GraphDef) -> Result<NodeDef, TfError> {
    let placeholders: Vec<&NodeDef> = g.node.iter().filter(|n| n.op == "Placeholder").collect();
    let floats: Vec<&NodeDef> = placeholders
        .iter()
        .copied()
        .filter(|n| graph::attr_type(n, "dtype") == Some(DataType::DtFloat))
        .collect();
    match floats.as_slice() {
        [one] => Ok((*one).clone()),
        _ => {
            let list: Vec<String> = placeholders
                .iter()
                .map(|n| {
                    let dtype = graph::attr_type(n, "dtype").map_or("?", |t| t.as_str_name());
                    format!("{} ({dtype})", n.name)
                })
                .collect();
            Err(TfError::Ambiguous {
                what: "network input",
                reason: format!(
                    "expected exactly one float32 Placeholder, found {} float ones among [{}]",
                    floats.len(),
                    list.join(", ")
                ),
            })
        }
    }
}

/// The one node nothing consumes (ignoring constants and no-ops).
fn single_sink(g: &GraphDef) -> Result<String, TfError> {
    let mut used = std::collections::HashSet::new();
    for n in &g.node {
        for i in &n.input {
            used.insert(TensorRef::parse(i).map_or_else(|| i[1..].to_string(), |t| t.node));
        }
    }
    let sinks: Vec<&str> = g
        .node
        .iter()
        .filter(|n| {
            !used.contains(&n.name) && !matches!(n.op.as_str(), "Const" | "NoOp" | "Placeholder" | "Assert")
        })
        .map(|n| n.name.as_str())
        .collect();
    match sinks.as_slice() {
        [one] => Ok(one.to_string()),
        _ => Err(TfError::Ambiguous {
            what: "network output",
            reason: format!(
                "expected exactly one sink node, found [{}]; name the output explicitly",
                sinks.join(", ")
            ),
        }),
    }
}

#[cfg(test)]
mod fixture_tests;
