//! SavedModel loading: find the version directory, the `serve` meta graph and the signature,
//! then freeze the signature's output (cutting JPEG-decoding signatures at the decoded image)
//! with the variables of `variables/` (see [`super::variables`]).

use std::path::{Path, PathBuf};

use edge_proto::tensorflow::{DataType, MetaGraphDef, SavedModel, SignatureDef, TensorInfo};
use prost::Message;

use super::freeze::Freezer;
use super::graph::{TensorRef, tensor_ref};
use super::variables::CheckpointVars;
use super::{LoadOptions, TfError, TfGraph, finish, jpeg_signature, read_limited};

const SERVE_TAG: &str = "serve";
const DEFAULT_SIGNATURE: &str = "serving_default";

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
    let graph = meta
        .graph_def
        .as_ref()
        .ok_or_else(|| TfError::graph("<saved_model.pb>", "meta graph without a graph"))?;
    let vars = CheckpointVars::open(&version_dir, meta)?;
    let op_defs = meta
        .meta_info_def
        .as_ref()
        .and_then(|m| m.stripped_op_list.as_ref());
    let op_defs = op_defs.map(|l| l.op.as_slice()).unwrap_or_default();

    let [(input_key, input)] = sig.inputs.iter().collect::<Vec<_>>()[..] else {
        let keys: Vec<&String> = sig.inputs.keys().collect();
        return Err(TfError::Ambiguous {
            what: "signature input",
            reason: format!(
                "signature {key:?} has inputs {keys:?}; edge bundles take exactly one image input"
            ),
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
            finish(
                freezer.finish(),
                &frozen_in.node,
                frozen_out,
                Some(out_name),
                &mut notes,
            )?
        }
        Ok(DataType::DtString) => {
            let cut = jpeg_signature::prepare(graph, sig, input_key, options)?;
            notes.extend(cut.notes.iter().cloned());
            let mut freezer = Freezer::new(&cut.graph, op_defs, &vars);
            let frozen_out = freezer.tensor(&cut.output)?;
            describe(&freezer, &mut notes);
            let mut g = finish(
                freezer.finish(),
                &cut.input,
                frozen_out,
                Some(cut.output_name.clone()),
                &mut notes,
            )?;
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

fn describe(freezer: &Freezer<'_>, notes: &mut Vec<String>) {
    if !freezer.inlined.is_empty() {
        notes.push(format!("inlined functions {}", freezer.inlined.join(", ")));
    }
    notes.push(format!(
        "froze {} variable reads into constants",
        freezer.variables_frozen
    ));
}

/// `dir` itself if it holds `saved_model.pb`, else its highest numeric version subdirectory.
fn version_dir(dir: &Path) -> Result<PathBuf, TfError> {
    if dir.join("saved_model.pb").is_file() {
        return Ok(dir.to_owned());
    }
    if dir.join("saved_model.pbtxt").is_file() {
        return Err(TfError::Unsupported {
            flavour: format!(
                "{} is a text-format SavedModel (saved_model.pbtxt)",
                dir.display()
            ),
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
    let tags = |m: &MetaGraphDef| {
        m.meta_info_def
            .as_ref()
            .map(|i| i.tags.clone())
            .unwrap_or_default()
    };
    let serve: Vec<&MetaGraphDef> = saved
        .meta_graphs
        .iter()
        .filter(|m| tags(m).iter().any(|t| t == SERVE_TAG))
        .collect();
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

fn signature<'a>(
    meta: &'a MetaGraphDef,
    wanted: Option<&str>,
) -> Result<(&'a str, &'a SignatureDef), TfError> {
    let mut public: Vec<&String> = meta
        .signature_def
        .keys()
        .filter(|k| !k.starts_with("__"))
        .collect();
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
    let probs: Vec<(&String, &TensorInfo)> = outputs
        .iter()
        .copied()
        .filter(|(k, _)| k.contains("prob"))
        .collect();
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use edge_proto::tensorflow::{
        FunctionDef, FunctionDefLibrary, GraphDef, NameAttrList, NodeDef, OpDef, OpList,
        SavedConcreteFunction, SavedObjectGraph, TrackableObjectGraph, attr_value,
        meta_graph_def::MetaInfoDef, op_def, trackable_object_graph,
    };

    use super::super::bundle_reader::tests::write_test_bundle;
    use super::super::graph::set_attr;
    use super::super::graph::test_util::{assert_close, op, placeholder, run_tract, tensor_info as info};
    use super::super::tensor::{Data, HostTensor};
    use super::super::variables::OBJECT_GRAPH_KEY;
    use super::*;

    fn arg(name: &str, dtype: DataType) -> op_def::ArgDef {
        op_def::ArgDef {
            name: name.into(),
            r#type: dtype as i32,
            ..Default::default()
        }
    }

    fn matmul_op_def() -> OpDef {
        let default_false = edge_proto::tensorflow::AttrValue {
            value: Some(attr_value::Value::B(false)),
        };
        let attr = |name: &str| op_def::AttrDef {
            name: name.into(),
            r#type: "bool".into(),
            default_value: Some(default_false.clone()),
            ..Default::default()
        };
        OpDef {
            name: "MatMul".into(),
            output_arg: vec![op_def::ArgDef {
                name: "product".into(),
                ..Default::default()
            }],
            attr: vec![attr("transpose_a"), attr("transpose_b")],
            ..Default::default()
        }
    }

    /// x [1,2] -> StatefulPartitionedCall(F, x, w) where F reads variable w and returns
    /// x @ w; `body_op` replaces the MatMul (to plant unsupported ops).
    fn saved_model(dir: &Path, tf2: bool, body_op: &str) {
        let mut handle = NodeDef {
            name: "unknown".into(),
            op: "VarHandleOp".into(),
            ..Default::default()
        };
        set_attr(
            &mut handle,
            "shared_name",
            attr_value::Value::S(if tf2 {
                b"w_1".to_vec()
            } else {
                b"dense/kernel".to_vec()
            }),
        );
        let mut call = op("call", "StatefulPartitionedCall", &["x", "unknown"]);
        set_attr(
            &mut call,
            "f",
            attr_value::Value::Func(NameAttrList {
                name: "F".into(),
                ..Default::default()
            }),
        );
        let mut read = op("read", "ReadVariableOp", &["w"]);
        set_attr(
            &mut read,
            "dtype",
            attr_value::Value::Type(DataType::DtFloat as i32),
        );
        let body = vec![read, op("mm", body_op, &["x", "read:value:0"])];
        let function = FunctionDef {
            signature: Some(OpDef {
                name: "F".into(),
                input_arg: vec![arg("x", DataType::DtFloat), arg("w", DataType::DtResource)],
                output_arg: vec![arg("y", DataType::DtFloat)],
                ..Default::default()
            }),
            node_def: body,
            ret: HashMap::from([("y".to_string(), "mm:product:0".to_string())]),
            ..Default::default()
        };
        let graph = GraphDef {
            node: vec![
                placeholder("x", &[1, 2]),
                handle,
                call,
                op("out", "Identity", &["call:0"]),
            ],
            library: Some(FunctionDefLibrary {
                function: vec![function],
                ..Default::default()
            }),
            ..Default::default()
        };
        let sig = SignatureDef {
            inputs: HashMap::from([("x".to_string(), info("x:0", DataType::DtFloat))]),
            outputs: HashMap::from([("y".to_string(), info("out:0", DataType::DtFloat))]),
            ..Default::default()
        };
        let mut meta = MetaGraphDef {
            meta_info_def: Some(MetaInfoDef {
                tags: vec!["serve".into()],
                stripped_op_list: Some(OpList {
                    op: vec![matmul_op_def()],
                }),
                ..Default::default()
            }),
            graph_def: Some(graph),
            signature_def: HashMap::from([("serving_default".to_string(), sig)]),
            ..Default::default()
        };
        let kernel = HostTensor::f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        std::fs::create_dir_all(dir.join("variables")).unwrap();
        let prefix = dir.join("variables/variables");
        if tf2 {
            // The call's last argument is captured: object 1, whose checkpoint key is positional.
            let key = "variables/0/.ATTRIBUTES/VARIABLE_VALUE";
            meta.object_graph_def = Some(SavedObjectGraph {
                concrete_functions: HashMap::from([(
                    "F".to_string(),
                    SavedConcreteFunction {
                        bound_inputs: vec![1],
                        ..Default::default()
                    },
                )]),
                ..Default::default()
            });
            let attribute = trackable_object_graph::trackable_object::SerializedTensor {
                name: "VARIABLE_VALUE".into(),
                checkpoint_key: key.into(),
                ..Default::default()
            };
            let objects = TrackableObjectGraph {
                nodes: vec![
                    Default::default(),
                    trackable_object_graph::TrackableObject {
                        attributes: vec![attribute],
                        ..Default::default()
                    },
                ],
            };
            let objects = HostTensor {
                shape: vec![],
                data: Data::Str(vec![objects.encode_to_vec()]),
            };
            write_test_bundle(&prefix, &[(key, kernel), (OBJECT_GRAPH_KEY, objects)]);
        } else {
            write_test_bundle(&prefix, &[("dense/kernel", kernel)]);
        }
        let saved = SavedModel {
            saved_model_schema_version: 1,
            meta_graphs: vec![meta],
        };
        std::fs::write(dir.join("saved_model.pb"), saved.encode_to_vec()).unwrap();
    }

    fn check_inlined(g: &TfGraph) {
        assert_eq!(
            (g.input.as_str(), g.output.as_str(), g.signature.as_deref()),
            ("x", "y", Some("serving_default"))
        );
        let ops: Vec<&str> = g.graph.node.iter().map(|n| n.op.as_str()).collect();
        assert!(
            !ops.iter()
                .any(|o| ["StatefulPartitionedCall", "ReadVariableOp", "VarHandleOp"].contains(o)),
            "{ops:?}"
        );
        let mm = g
            .graph
            .node
            .iter()
            .find(|n| n.op == "MatMul")
            .expect("inlined MatMul");
        assert_eq!(mm.name, "call/mm");
        assert!(
            mm.attr.contains_key("transpose_a"),
            "stripped default attrs are restored from the OpDef"
        );
        assert_close(&run_tract(&g.graph, &[1, 2], &[1.0, 1.0]), &[4.0, 6.0]);
    }

    #[test]
    fn tf1_style_resource_variable_is_frozen_by_name_through_an_inlined_call() {
        let dir = tempfile::tempdir().unwrap();
        saved_model(&dir.path().join("7"), false, "MatMul");
        std::fs::create_dir(dir.path().join("not_a_version")).unwrap();
        // The TF Serving layout: the highest numeric version directory is used.
        let g = super::super::load_saved_model(dir.path(), None).unwrap();
        check_inlined(&g);
    }

    #[test]
    fn tf2_captured_variable_is_found_through_the_object_graph() {
        let dir = tempfile::tempdir().unwrap();
        saved_model(dir.path(), true, "MatMul");
        check_inlined(&super::super::load_saved_model(dir.path(), None).unwrap());
    }

    #[test]
    fn control_flow_and_unknown_ops_say_what_to_export_instead() {
        let dir = tempfile::tempdir().unwrap();
        saved_model(dir.path(), false, "StatelessWhile");
        let err = super::super::load_saved_model(dir.path(), None).unwrap_err();
        assert!(err.is_unsupported_model());
        let msg = err.to_string();
        assert!(
            msg.contains("TensorFlow 2 control flow") && msg.contains("tf2onnx"),
            "{msg}"
        );

        saved_model(dir.path(), false, "Einsum");
        let msg = super::super::load_saved_model(dir.path(), None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("Einsum (node \"call/mm\")") && msg.contains("tf2onnx"),
            "{msg}"
        );
    }

    #[test]
    fn missing_checkpoint_entry_names_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        saved_model(dir.path(), false, "MatMul");
        write_test_bundle(
            &dir.path().join("variables/variables"),
            &[("other", HostTensor::f32(vec![1], vec![0.0]))],
        );
        let msg = super::super::load_saved_model(dir.path(), None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("\"unknown\"") && msg.contains("VarHandleOp"),
            "{msg}"
        );
    }
}
