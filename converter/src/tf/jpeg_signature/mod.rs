//! JPEG-input signatures (TF Serving's `inception_saved_model.py` style): the network's image
//! tensor is produced by a `tf.map_fn` loop that decodes, crops, resizes and scales each JPEG,
//! in TF1's control flow or TF 2.x's (a `While` op with a library body function; see
//! [`decoding_loop`]). We cut the graph at the loop's output (a new float32 `Placeholder` takes
//! its place), read the preprocessing off the loop body ([`detect`]), keep the probabilities a
//! `top_k` reads, and take over the label strings the `classes` output gathers from.

mod decoding_loop;
mod detect;
mod nodes;

use std::collections::HashSet;

use edge_proto::tensorflow::{DataType, GraphDef, NodeDef, SignatureDef, attr_value::Value};
use edge_runtime::bundle::manifest::Preprocessing;

use super::graph::{TensorRef, const_value, fresh_name, set_attr, tensor_ref};
use super::tensor::Data;
use super::{LoadOptions, TfError};
use nodes::Nodes;

/// The source graph cut at the decoded image, with what was learnt on the way.
pub(crate) struct Cut {
    /// The source graph, with the cut tensor's consumers reading `input` instead.
    pub graph: GraphDef,
    pub input: String,
    pub output: TensorRef,
    pub output_name: String,
    pub preprocessing: Option<Preprocessing>,
    pub labels: Option<Vec<String>>,
    pub notes: Vec<String>,
}

pub(crate) fn prepare(
    graph: &GraphDef,
    sig: &SignatureDef,
    input_key: &str,
    options: &LoadOptions,
) -> Result<Cut, TfError> {
    let nodes = Nodes::graph(graph);
    let string_input = sig
        .inputs
        .get(input_key)
        .map(tensor_ref)
        .transpose()?
        .map(|t| t.node)
        .unwrap_or_default();
    let (output, topk) = network_output(&nodes, sig, options)?;
    let labels = topk.as_ref().and_then(|k| labels_for(&nodes, sig, k));
    let (cut, cut_node) = decoding_loop::find_cut(&nodes, &output, &string_input)?;
    let element_shape = decoding_loop::element_shape(&nodes, cut_node);
    let mut notes = vec![format!(
        "cut the graph at {} (output of the JPEG-decoding loop {:?}); the network starts there",
        cut.to_input(),
        cut_node.op
    )];
    let preprocessing = if options.preprocessing_override {
        notes.push("preprocessing detection skipped: the caller supplies it".into());
        None
    } else {
        let found = decoding_loop::loop_value(graph, &nodes, cut_node)?;
        notes.push(format!("reading the preprocessing off {}", found.loop_desc));
        Some(detect::detect(&found, &mut notes)?)
    };

    let mut g = graph.clone();
    let mut taken: HashSet<String> = g.node.iter().map(|n| n.name.clone()).collect();
    let input = fresh_name(&mut taken, "input");
    let shape: Vec<i64> = match &element_shape {
        Some(dims) => std::iter::once(1).chain(dims.iter().copied()).collect(),
        None => vec![1, -1, -1, 3],
    };
    notes.push(format!(
        "new float32 input {input:?} {shape:?} (NHWC) replaces it"
    ));
    for n in &mut g.node {
        for i in &mut n.input {
            if TensorRef::parse(i).as_ref() == Some(&cut) {
                *i = input.clone();
            }
        }
    }
    let mut placeholder = NodeDef {
        name: input.clone(),
        op: "Placeholder".into(),
        ..Default::default()
    };
    set_attr(&mut placeholder, "dtype", Value::Type(DataType::DtFloat as i32));
    set_attr(
        &mut placeholder,
        "shape",
        Value::Shape(super::tensor::shape_proto_i64(&shape)),
    );
    g.node.push(placeholder);
    if let Some(l) = &labels {
        notes.push(format!(
            "took over {} labels from the constant the classes output gathers from",
            l.len()
        ));
    }
    let output_name = output.node.clone();
    Ok(Cut {
        graph: g,
        input,
        output,
        output_name,
        preprocessing,
        labels,
        notes,
    })
}

/// The float tensor to keep: `options.output`, or what the signature's outputs compute before
/// any `TopKV2` (returned too, to find the labels).
fn network_output<'a>(
    nodes: &Nodes<'a>,
    sig: &SignatureDef,
    options: &LoadOptions,
) -> Result<(TensorRef, Option<&'a NodeDef>), TfError> {
    if let Some(w) = &options.output {
        let t = match sig.outputs.get(w) {
            Some(info) => tensor_ref(info)?,
            None => TensorRef::parse_user(w),
        };
        return Ok((t, None));
    }
    let mut candidates: Vec<(TensorRef, Option<&NodeDef>)> = Vec::new();
    for info in sig.outputs.values() {
        if DataType::try_from(info.dtype) != Ok(DataType::DtFloat) {
            continue;
        }
        let Some((t, n)) = nodes.trace(&tensor_ref(info)?, false) else {
            continue;
        };
        let found = if n.op == "TopKV2" {
            (nodes.input(n, 0).map(|(t, _)| t), Some(n))
        } else {
            (Some(t), None)
        };
        if let (Some(t), k) = found
            && !candidates.iter().any(|(c, _)| *c == t)
        {
            candidates.push((t, k));
        }
    }
    match candidates.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(TfError::Ambiguous {
            what: "network output",
            reason: format!(
                "the signature's float outputs lead to {:?}; name the output to keep explicitly",
                candidates.iter().map(|(t, _)| t.to_input()).collect::<Vec<_>>()
            ),
        }),
    }
}

/// Label strings: a signature output gathering from a string constant with `topk`'s indices.
fn labels_for(nodes: &Nodes<'_>, sig: &SignatureDef, topk: &NodeDef) -> Option<Vec<String>> {
    sig.outputs.values().find_map(|info| {
        let (_, gather) = nodes.trace(&tensor_ref(info).ok()?, false)?;
        if !matches!(gather.op.as_str(), "GatherV2" | "Gather") {
            return None;
        }
        let (indices, _) = nodes.input(gather, 1)?;
        let (_, params) = nodes.input(gather, 0)?;
        let (_, params) = nodes.trace(&TensorRef::new(&params.name, 0), false)?;
        if indices != TensorRef::new(&topk.name, 1) || params.op != "Const" {
            return None;
        }
        match const_value(params).ok()?.data {
            Data::Str(s) => Some(
                s.iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect(),
            ),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests;
