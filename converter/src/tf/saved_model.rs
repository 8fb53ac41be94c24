//! SavedModel loading: find the version directory, the `serve` meta graph and the signature,
//! map variables to checkpoint keys (TF2: through the object graph; TF1: by name), then
//! freeze the signature's output (cutting JPEG-decoding signatures at the decoded image).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use edge_proto::tensorflow::{
    DataType, MetaGraphDef, NodeDef, SavedModel, SignatureDef, TensorInfo, TrackableObjectGraph, attr_value,
    tensor_info::Encoding,
};
use prost::Message;

use super::bundle_reader::Bundle;
use super::error::EXPORT_HINT;
use super::freeze::{Freezer, VariableSource};
use super::graph::{TensorRef, attr, attr_s};
use super::tensor::{Data, HostTensor};
use super::{LoadOptions, TfError, TfGraph, finish, jpeg_signature, read_limited};

const SERVE_TAG: &str = "serve";
const DEFAULT_SIGNATURE: &str = "serving_default";
const OBJECT_GRAPH_KEY: &str = "_CHECKPOINTABLE_OBJECT_GRAPH";

pub(crate) fn load(dir: &Path, options: &LoadOptions) -> Result<TfGraph, TfError> {
    let version_dir = version_dir(dir)?;
    let pb = version_dir.join("saved_model.pb");
    let bytes = read_limited(&pb, "SavedModel")?;
    let saved = SavedModel::decode(bytes.as_slice()).map_err(|source| TfError::Decode {
        path: pb.clone(),
        what: "SavedModel",
        source,
    })?;
    let meta = serve_meta_graph(&saved, &pb)?;
    let (key, sig) = signature(meta, options.signature.as_deref())?;
    let graph = meta.graph_def.as_ref().ok_or_else(|| TfError::graph("<saved_model.pb>", "meta graph without a graph"))?;
    let vars = CheckpointVars::open(&version_dir, meta)?;
    let op_defs = meta.meta_info_def.as_ref().and_then(|m| m.stripped_op_list.as_ref());
    let op_defs = op_defs.map(|l| l.op.as_slice()).unwrap_or_default();

    let [(input_key, input)] = sig.inputs.iter().collect::<Vec<_>>()[..] else {
        let keys: Vec<&String> = sig.inputs.keys().collect();
        return Err(TfError::Ambiguous {
            what: "signature input",
            reason: format!("signature {key:?} has inputs {keys:?}; edge bundles take exactly one image input"),
        });
    };
    let mut notes = vec![format!("SavedModel {}, signature {key:?}", version_dir.display())];
    let mut tf_graph = match DataType::try_from(input.dtype) {
        Ok(DataType::DtFloat) => {
            let input_ref = tensor_ref(input)?;
            let (out, out_name) = pick_output(sig, options.output.as_deref())?;
            let mut freezer = Freezer::new(graph, op_defs, &vars);
            let frozen_out = freezer.tensor(&out)?;
            let frozen_in = freezer.tensor(&input_ref)?;
            describe(&freezer, &mut notes);
            let g = finish(freezer.finish(), &frozen_in.node, frozen_out, Some(out_name), &mut notes)?;
            TfGraph { input_shape: g.input_shape.clone(), ..g }
        }
        Ok(DataType::DtString) => {
            let cut = jpeg_signature::prepare(graph, sig, input_key, options)?;
            notes.extend(cut.notes.iter().cloned());
            let mut freezer = Freezer::new(&cut.graph, op_defs, &vars);
            let frozen_out = freezer.tensor(&cut.output)?;
            describe(&freezer, &mut notes);
            let mut g = finish(freezer.finish(), &cut.input, frozen_out, Some(cut.output_name.clone()), &mut notes)?;
            g.preprocessing = cut.preprocessing;
            g.labels = cut.labels;
            g
        }
        _ => {
            return Err(TfError::Unsupported {
                flavour: format!(
                    "signature {key:?} takes input {input_key:?} of type {}",
                    DataType::try_from(input.dtype).map_or("unknown", |t| t.as_str_name())
                ),
                hint: "edge bundles take float32 image tensors (or JPEG strings decoded in the graph); \
                       export a signature with a float32 NHWC image input"
                    .into(),
            });
        }
    };
    tf_graph.signature = Some(key.to_string());
    Ok(tf_graph)
}

/// The graph tensor a signature entry names (dense tensors only).
pub(crate) fn tensor_ref(info: &TensorInfo) -> Result<TensorRef, TfError> {
    match &info.encoding {
        Some(Encoding::Name(name)) => Ok(TensorRef::parse_user(name)),
        _ => Err(TfError::Unsupported {
            flavour: "a signature with sparse or composite tensors".into(),
            hint: "export a signature whose input and outputs are dense tensors".into(),
        }),
    }
}

fn describe(freezer: &Freezer<'_>, notes: &mut Vec<String>) {
    if !freezer.inlined.is_empty() {
        notes.push(format!("inlined functions {}", freezer.inlined.join(", ")));
    }
    notes.push(format!("froze {} variable reads into constants", freezer.variables_frozen));
}

/// `dir` itself if it holds `saved_model.pb`, else its highest numeric version subdirectory.
fn version_dir(dir: &Path) -> Result<PathBuf, TfError> {
    if dir.join("saved_model.pb").is_file() {
        return Ok(dir.to_owned());
    }
    if dir.join("saved_model.pbtxt").is_file() {
        return Err(TfError::Unsupported {
            flavour: format!("{} is a text-format SavedModel (saved_model.pbtxt)", dir.display()),
            hint: "Re-save it in binary form (tf.saved_model.save writes saved_model.pb)".into(),
        });
    }
    let entries = std::fs::read_dir(dir).map_err(|e| TfError::io(dir, e))?;
    let best = entries
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u64>().ok()?, e.path())))
        .filter(|(_, p)| p.join("saved_model.pb").is_file())
        .max_by_key(|(v, _)| *v);
    best.map(|(_, p)| p).ok_or_else(|| TfError::Ambiguous {
        what: "SavedModel",
        reason: format!(
            "{} holds no saved_model.pb and no numeric version directory with one (TF Serving layout: MODEL/1/saved_model.pb)",
            dir.display()
        ),
    })
}

fn serve_meta_graph<'a>(saved: &'a SavedModel, pb: &Path) -> Result<&'a MetaGraphDef, TfError> {
    let tags = |m: &MetaGraphDef| m.meta_info_def.as_ref().map(|i| i.tags.clone()).unwrap_or_default();
    let serve: Vec<&MetaGraphDef> = saved.meta_graphs.iter().filter(|m| tags(m).iter().any(|t| t == SERVE_TAG)).collect();
    match (serve.as_slice(), saved.meta_graphs.as_slice()) {
        ([one], _) => Ok(one),
        ([], [one]) => Ok(one),
        _ => Err(TfError::Ambiguous {
            what: "meta graph",
            reason: format!(
                "{} has meta graphs tagged {:?}; expected one tagged {SERVE_TAG:?}",
                pb.display(),
                saved.meta_graphs.iter().map(tags).collect::<Vec<_>>()
            ),
        }),
    }
}

fn signature<'a>(meta: &'a MetaGraphDef, wanted: Option<&str>) -> Result<(&'a str, &'a SignatureDef), TfError> {
    let mut public: Vec<&String> = meta.signature_def.keys().filter(|k| !k.starts_with("__")).collect();
    public.sort();
    let key = match wanted {
        Some(w) => w,
        None if meta.signature_def.contains_key(DEFAULT_SIGNATURE) => DEFAULT_SIGNATURE,
        None if public.len() == 1 => public[0].as_str(),
        None => "",
    };
    match meta.signature_def.get_key_value(key) {
        Some((k, s)) => Ok((k.as_str(), s)),
        None => Err(TfError::Ambiguous {
            what: "signature",
            reason: format!(
                "{} signature {key:?}; available: {public:?}",
                if key.is_empty() { "no default" } else { "no" }
            ),
        }),
    }
}

/// The signature output to keep and the node name to give it: `wanted` (an output key or a
/// tensor name), the only output, or the one whose key says probabilities.
fn pick_output(sig: &SignatureDef, wanted: Option<&str>) -> Result<(TensorRef, String), TfError> {
    if let Some(w) = wanted {
        return Ok(match sig.outputs.get(w) {
            Some(info) => (tensor_ref(info)?, w.to_string()),
            None => (TensorRef::parse_user(w), TensorRef::parse_user(w).node),
        });
    }
    let outputs: Vec<(&String, &TensorInfo)> = sig.outputs.iter().collect();
    let probs: Vec<(&String, &TensorInfo)> = outputs.iter().copied().filter(|(k, _)| k.contains("prob")).collect();
    let (key, info) = match (outputs.as_slice(), probs.as_slice()) {
        ([one], _) | (_, [one]) => *one,
        _ => {
            return Err(TfError::Ambiguous {
                what: "signature output",
                reason: format!(
                    "outputs {:?}; name the one to keep (probabilities or logits) explicitly",
                    outputs.iter().map(|(k, _)| k).collect::<Vec<_>>()
                ),
            });
        }
    };
    Ok((tensor_ref(info)?, key.clone()))
}

/// Variables of a SavedModel: TF2 keys from the object graph, TF1 keys by variable name.
struct CheckpointVars {
    bundle: Option<Bundle>,
    prefix: PathBuf,
    /// Top-level VarHandleOp node name -> checkpoint key (TF2 captures).
    captured: HashMap<String, String>,
}

impl CheckpointVars {
    fn open(version_dir: &Path, meta: &MetaGraphDef) -> Result<Self, TfError> {
        let prefix = version_dir.join("variables").join("variables");
        let mut index = prefix.clone().into_os_string();
        index.push(".index");
        let bundle = if Path::new(&index).is_file() { Some(Bundle::open(&prefix)?) } else { None };
        let captured = match &bundle {
            Some(b) => captured_variable_keys(meta, b)?,
            None => HashMap::new(),
        };
        Ok(CheckpointVars { bundle, prefix, captured })
    }
}

impl VariableSource for CheckpointVars {
    fn key_for(&self, node: &NodeDef) -> Option<String> {
        if let Some(k) = self.captured.get(&node.name) {
            return Some(k.clone());
        }
        let bundle = self.bundle.as_ref()?;
        let shared = attr_s(node, "shared_name").filter(|s| !s.is_empty());
        [Some(node.name.clone()), shared].into_iter().flatten().find(|k| bundle.contains(k))
    }

    fn read(&self, key: &str, node: &str) -> Result<HostTensor, TfError> {
        match &self.bundle {
            Some(b) if b.contains(key) => b.read(key),
            Some(b) => Err(TfError::MissingVariable { node: node.into(), key: key.into(), path: b.index_path() }),
            None => Err(TfError::MissingVariable { node: node.into(), key: key.into(), path: self.prefix.clone() }),
        }
    }
}

/// TF2: a call's captured inputs are the last `bound_inputs.len()` arguments of its concrete
/// function; each bound input is an object-graph node id, and the checkpoint's own object
/// graph (same ids) names that variable's `VARIABLE_VALUE` checkpoint key.
fn captured_variable_keys(meta: &MetaGraphDef, bundle: &Bundle) -> Result<HashMap<String, String>, TfError> {
    let mut keys = HashMap::new();
    let (Some(objects), Some(graph)) = (&meta.object_graph_def, &meta.graph_def) else { return Ok(keys) };
    let nodes: HashMap<&str, &NodeDef> = graph.node.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut trackable: Option<TrackableObjectGraph> = None;
    for call in graph.node.iter().filter(|n| matches!(n.op.as_str(), "StatefulPartitionedCall" | "PartitionedCall")) {
        let Some(attr_value::Value::Func(f)) = attr(call, "f") else { continue };
        let Some(concrete) = objects.concrete_functions.get(&f.name) else { continue };
        let inputs: Vec<TensorRef> = super::graph::data_inputs(call).collect();
        let Some(first) = inputs.len().checked_sub(concrete.bound_inputs.len()) else { continue };
        for (input, &id) in inputs[first..].iter().zip(&concrete.bound_inputs) {
            let mut node = nodes.get(input.node.as_str()).copied();
            while let Some(n) = node.filter(|n| n.op == "Identity") {
                node = n.input.first().and_then(|i| nodes.get(TensorRef::parse_user(i).node.as_str()).copied());
            }
            let Some(var) = node.filter(|n| n.op == "VarHandleOp") else { continue };
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
    let err = |reason: String| TfError::Bundle { path: bundle.index_path(), reason };
    if !bundle.contains(OBJECT_GRAPH_KEY) {
        return Err(err(format!("TF2 SavedModel checkpoint without {OBJECT_GRAPH_KEY}")));
    }
    let t = bundle.read(OBJECT_GRAPH_KEY)?;
    let Data::Str(s) = &t.data else { return Err(err(format!("{OBJECT_GRAPH_KEY} is not a string"))) };
    let bytes = s.first().ok_or_else(|| err(format!("{OBJECT_GRAPH_KEY} is empty")))?;
    TrackableObjectGraph::decode(bytes.as_slice()).map_err(|e| err(format!("{OBJECT_GRAPH_KEY}: {e}")))
}
