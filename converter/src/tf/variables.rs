//! SavedModel variables: which checkpoint key holds the value of each variable the graph
//! reads. TF2 exports capture resource handles into functions: a call's captured arguments
//! are its concrete function's `bound_inputs` (object-graph node ids), and the checkpoint's own
//! object graph (same ids) gives each one's `VARIABLE_VALUE` key. TF1 exports restore by name:
//! the key is the variable node's name (or its `shared_name`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use edge_proto::tensorflow::{MetaGraphDef, NodeDef, TrackableObjectGraph, attr_value};
use prost::Message;

use super::TfError;
use super::bundle_reader::Bundle;
use super::error::EXPORT_HINT;
use super::freeze::VariableSource;
use super::graph::{TensorRef, attr, attr_s};
use super::tensor::{Data, HostTensor};

/// Checkpoint key of the serialized `TrackableObjectGraph`.
pub(crate) const OBJECT_GRAPH_KEY: &str = "_CHECKPOINTABLE_OBJECT_GRAPH";

/// Variables of a SavedModel: TF2 keys from the object graph, TF1 keys by variable name.
pub(crate) struct CheckpointVars {
    bundle: Option<Bundle>,
    prefix: PathBuf,
    /// Top-level VarHandleOp node name -> checkpoint key (TF2 captures).
    captured: HashMap<String, String>,
}

impl CheckpointVars {
    /// Opens `version_dir/variables/variables` if there is one (a model may have no variables).
    pub fn open(version_dir: &Path, meta: &MetaGraphDef) -> Result<Self, TfError> {
        let prefix = version_dir.join("variables").join("variables");
        let mut index = prefix.clone().into_os_string();
        index.push(".index");
        let has_variables = meta.graph_def.as_ref().is_some_and(|g| {
            g.node
                .iter()
                .any(|n| matches!(n.op.as_str(), "VarHandleOp" | "VariableV2" | "Variable"))
        });
        let bundle = if Path::new(&index).is_file() {
            Some(Bundle::open(&prefix)?)
        } else if has_variables {
            return Err(TfError::Io {
                path: PathBuf::from(&index),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the graph has variables but their checkpoint index is missing (incomplete export?)",
                ),
            });
        } else {
            None
        };
        let captured = match &bundle {
            Some(b) => captured_variable_keys(meta, b)?,
            None => HashMap::new(),
        };
        Ok(CheckpointVars {
            bundle,
            prefix,
            captured,
        })
    }
}

impl VariableSource for CheckpointVars {
    fn key_for(&self, node: &NodeDef) -> Option<String> {
        if let Some(k) = self.captured.get(&node.name) {
            return Some(k.clone());
        }
        let bundle = self.bundle.as_ref()?;
        let shared = attr_s(node, "shared_name").filter(|s| !s.is_empty());
        [Some(node.name.clone()), shared]
            .into_iter()
            .flatten()
            .find(|k| bundle.contains(k))
    }

    fn read(&self, key: &str, node: &str) -> Result<HostTensor, TfError> {
        match &self.bundle {
            Some(b) if b.contains(key) => b.read(key),
            Some(b) => Err(TfError::MissingVariable {
                node: node.into(),
                key: key.into(),
                path: b.index_path(),
            }),
            None => Err(TfError::MissingVariable {
                node: node.into(),
                key: key.into(),
                path: self.prefix.clone(),
            }),
        }
    }
}

/// TF2: a call's captured inputs are the last `bound_inputs.len()` arguments of its concrete
/// function; each bound input is an object-graph node id, and the checkpoint's own object
/// graph (same ids) names that variable's `VARIABLE_VALUE` checkpoint key.
fn captured_variable_keys(meta: &MetaGraphDef, bundle: &Bundle) -> Result<HashMap<String, String>, TfError> {
    let mut keys = HashMap::new();
    let (Some(objects), Some(graph)) = (&meta.object_graph_def, &meta.graph_def) else {
        return Ok(keys);
    };
    let nodes: HashMap<&str, &NodeDef> = graph.node.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut trackable: Option<TrackableObjectGraph> = None;
    for call in graph
        .node
        .iter()
        .filter(|n| matches!(n.op.as_str(), "StatefulPartitionedCall" | "PartitionedCall"))
    {
        let Some(attr_value::Value::Func(f)) = attr(call, "f") else {
            continue;
        };
        let Some(concrete) = objects.concrete_functions.get(&f.name) else {
            continue;
        };
        let inputs: Vec<TensorRef> = super::graph::data_inputs(call).collect();
        let Some(first) = inputs.len().checked_sub(concrete.bound_inputs.len()) else {
            continue;
        };
        for (input, &id) in inputs[first..].iter().zip(&concrete.bound_inputs) {
            let mut node = nodes.get(input.node.as_str()).copied();
            while let Some(n) = node.filter(|n| n.op == "Identity") {
                node = n
                    .input
                    .first()
                    .and_then(|i| nodes.get(TensorRef::parse_user(i).node.as_str()).copied());
            }
            let Some(var) = node.filter(|n| n.op == "VarHandleOp") else {
                continue;
            };
            if trackable.is_none() {
                trackable = Some(read_object_graph(bundle)?);
            }
            let object = trackable.as_ref().and_then(|t| t.nodes.get(id as usize));
            let attribute = object.and_then(|o| o.attributes.iter().find(|a| a.name == "VARIABLE_VALUE"));
            match attribute {
                Some(a) => keys.insert(var.name.clone(), a.checkpoint_key.clone()),
                None => {
                    return Err(TfError::Unsupported {
                        flavour: format!(
                            "captured variable {:?} (object {id}) has no VARIABLE_VALUE in the checkpoint's object graph",
                            var.name
                        ),
                        hint: EXPORT_HINT.into(),
                    });
                }
            };
        }
    }
    Ok(keys)
}

fn read_object_graph(bundle: &Bundle) -> Result<TrackableObjectGraph, TfError> {
    let err = |reason: String| TfError::Bundle {
        path: bundle.index_path(),
        reason,
    };
    if !bundle.contains(OBJECT_GRAPH_KEY) {
        return Err(err(format!(
            "TF2 SavedModel checkpoint without {OBJECT_GRAPH_KEY}"
        )));
    }
    let t = bundle.read(OBJECT_GRAPH_KEY)?;
    let Data::Str(s) = &t.data else {
        return Err(err(format!("{OBJECT_GRAPH_KEY} is not a string")));
    };
    let bytes = s
        .first()
        .ok_or_else(|| err(format!("{OBJECT_GRAPH_KEY} is empty")))?;
    TrackableObjectGraph::decode(bytes.as_slice()).map_err(|e| err(format!("{OBJECT_GRAPH_KEY}: {e}")))
}
