//! The `tf.map_fn` loop that decodes each JPEG, in either control-flow form: where the network
//! starts (the loop's stacked output, walking back from the network output), and the per-image
//! value the loop body stores (walked back to the decoder by [`super::detect`]).
//!
//! - Control flow v1 (TF1 graph mode): `Enter`/`Merge`/`Switch`/`Exit` nodes in the graph, a
//!   `TensorArrayWriteV3` in the loop, a `TensorArrayGatherV3` (or pack/concat) after it.
//! - Control flow v2 (`tf.compat.v1` under TF 2.x): one `While`/`StatelessWhile` node whose
//!   `body` is a library function; the body returns `TensorListSetItem(list, i, image)` for
//!   the loop variable a `TensorListStack` after the loop stacks.

use std::collections::{HashMap, VecDeque};

use edge_proto::tensorflow::{GraphDef, NodeDef, attr_value::Value};

use super::super::TfError;
use super::super::graph::{TensorRef, attr};
use super::nodes::Nodes;

/// Ops that end the network walking back from the output: the decoding loop's outputs.
const LOOP_OUTPUTS: &[&str] = &[
    "TensorArrayGatherV3",
    "TensorArrayGatherV2",
    "TensorArrayPackV3",
    "TensorArrayConcatV3",
    "TensorListStack",
    "TensorListGather",
];
pub(super) const DECODERS: &[&str] = &[
    "DecodeJpeg",
    "DecodeAndCropJpeg",
    "DecodeImage",
    "DecodePng",
    "DecodeBmp",
    "DecodeGif",
];
const WHILE_OPS: &[&str] = &["While", "StatelessWhile"];
const HINT: &str = "Export a signature that takes float32 images, or a frozen graph, and pass the preprocessing \
                    with --preset";

/// The per-image value the loop body stores, in the scope (graph or body function) holding it.
pub(super) struct LoopValue<'a> {
    pub nodes: Nodes<'a>,
    pub value: TensorRef,
    /// The loop, for notes and messages (`the control-flow-v2 While loop "map/while" ...`).
    pub loop_desc: String,
}

/// Walks back from the output; the network ends at the decoding loop's output tensor.
pub(super) fn find_cut<'a>(
    nodes: &Nodes<'a>,
    output: &TensorRef,
    string_input: &str,
) -> Result<(TensorRef, &'a NodeDef), TfError> {
    // Each node reached, with the consumer it was reached from (to describe the path).
    let mut reached: HashMap<String, Option<String>> = HashMap::from([(output.node.clone(), None)]);
    let mut queue = VecDeque::from([output.clone()]);
    let mut cuts: Vec<TensorRef> = Vec::new();
    while let Some(t) = queue.pop_front() {
        let n = nodes
            .get(&t)
            .ok_or_else(|| TfError::graph(&t.node, "input names no node in the graph"))?;
        if LOOP_OUTPUTS.contains(&n.op.as_str()) {
            if !cuts.contains(&t) {
                cuts.push(t);
            }
            continue;
        }
        if n.name == string_input || DECODERS.contains(&n.op.as_str()) {
            return Err(TfError::Unsupported {
                flavour: format!(
                    "the network reads the JPEG input through {} (node {:?}) without a tf.map_fn decoding loop \
                     it recognises; walking back from the output it found {}",
                    n.op,
                    n.name,
                    describe_path(nodes, &reached, &n.name)
                ),
                hint: HINT.into(),
            });
        }
        for i in nodes.inputs(n) {
            if !reached.contains_key(&i.node) {
                reached.insert(i.node.clone(), Some(n.name.clone()));
                queue.push_back(i);
            }
        }
    }
    match cuts.as_slice() {
        [one] => Ok((
            one.clone(),
            nodes
                .get(one)
                .ok_or_else(|| TfError::graph(&one.node, "vanished"))?,
        )),
        _ => Err(TfError::Unsupported {
            flavour: format!(
                "a JPEG signature whose network starts at {} decoding-loop outputs {:?} (expected one)",
                cuts.len(),
                cuts.iter()
                    .map(|c| format!(
                        "{} {:?}",
                        nodes.get(c).map_or("?", |n| n.op.as_str()),
                        c.to_input()
                    ))
                    .collect::<Vec<_>>()
            ),
            hint: HINT.into(),
        }),
    }
}

/// The ops from `last` back up to the output, loops named with their body functions.
fn describe_path(nodes: &Nodes<'_>, reached: &HashMap<String, Option<String>>, last: &str) -> String {
    let mut steps = Vec::new();
    let mut cur = Some(last.to_string());
    while let Some(name) = cur.take() {
        let step = match nodes.get(&TensorRef::new(&name, 0)) {
            Some(n) if WHILE_OPS.contains(&n.op.as_str()) => format!(
                "a control-flow-v2 {} loop {:?} (body {:?}) whose outputs no TensorListStack stacks",
                n.op,
                n.name,
                func_attr(n, "body").unwrap_or("?")
            ),
            Some(n) => format!("{} {:?}", n.op, n.name),
            None => format!("{name:?}"),
        };
        steps.push(step);
        cur = reached.get(&name).cloned().flatten();
    }
    if steps.len() > 8 {
        let tail = steps.split_off(steps.len() - 3);
        steps.truncate(5);
        steps.push("...".into());
        steps.extend(tail);
    }
    steps.join(" <- ")
}

fn func_attr<'a>(n: &'a NodeDef, key: &str) -> Option<&'a str> {
    match attr(n, key) {
        Some(Value::Func(f)) => Some(f.name.as_str()),
        _ => None,
    }
}

/// The shape of one stacked image, when the loop output declares it fully (`[299, 299, 3]`):
/// the `element_shape` attribute (TensorArrays) or constant input (TensorLists).
pub(super) fn element_shape(nodes: &Nodes<'_>, cut_node: &NodeDef) -> Option<Vec<i64>> {
    let dims: Vec<i64> = match attr(cut_node, "element_shape") {
        Some(Value::Shape(s)) if !s.unknown_rank => s.dim.iter().map(|d| d.size).collect(),
        Some(_) => return None,
        None if cut_node.op.starts_with("TensorList") => nodes
            .constant(&nodes.inputs(cut_node).into_iter().nth(1)?)?
            .into_iter()
            .map(|d| d as i64)
            .collect(),
        None => return None,
    };
    (!dims.is_empty() && dims.iter().all(|&d| d > 0)).then_some(dims)
}

/// The value the loop stores per image, for the loop output `cut_node`.
pub(super) fn loop_value<'a>(
    graph: &'a GraphDef,
    nodes: &Nodes<'a>,
    cut_node: &NodeDef,
) -> Result<LoopValue<'a>, TfError> {
    let fail = |found: String| TfError::Preprocessing { found };
    let (container, array) = nodes
        .input(cut_node, 0)
        .and_then(|(t, _)| nodes.trace(&t, false))
        .ok_or_else(|| {
            fail(format!(
                "{} {:?} reads no TensorArray or TensorList",
                cut_node.op, cut_node.name
            ))
        })?;
    if WHILE_OPS.contains(&array.op.as_str()) {
        return v2_loop_value(graph, array, container.index);
    }
    if cut_node.op.starts_with("TensorList") {
        return Err(fail(format!(
            "{} {:?} stacks a TensorList made by {} {:?}, not by a control-flow-v2 While loop",
            cut_node.op, cut_node.name, array.op, array.name
        )));
    }
    let writers: Vec<&NodeDef> = nodes
        .all()
        .filter(|n| n.op.starts_with("TensorArrayWrite"))
        .filter(|n| {
            nodes
                .input(n, 0)
                .and_then(|(t, _)| nodes.trace(&t, false))
                .is_some_and(|(_, a)| a.name == array.name)
        })
        .collect();
    let [writer] = writers.as_slice() else {
        return Err(fail(format!(
            "{} writes into the loop's TensorArray {:?} (v1 control flow)",
            writers.len(),
            array.name
        )));
    };
    let (value, _) = nodes
        .input(writer, 2)
        .ok_or_else(|| fail(format!("{:?} writes no value", writer.name)))?;
    Ok(LoopValue {
        nodes: Nodes::graph(graph),
        value,
        loop_desc: format!("the v1 control-flow loop writing TensorArray {:?}", array.name),
    })
}

/// Control flow v2: loop variable `index` of `while_node` is a TensorList; its body function
/// must return `TensorListSetItem(list, i, image)` for it.
fn v2_loop_value<'a>(
    graph: &'a GraphDef,
    while_node: &'a NodeDef,
    index: usize,
) -> Result<LoopValue<'a>, TfError> {
    let body_name = func_attr(while_node, "body").unwrap_or_default();
    let loop_desc = format!(
        "the control-flow-v2 {} loop {:?} (body function {body_name:?}, loop variable {index})",
        while_node.op, while_node.name
    );
    let fail = |what: String| TfError::Preprocessing {
        found: format!("{loop_desc} {what}"),
    };
    let library = graph
        .library
        .as_ref()
        .map(|l| l.function.as_slice())
        .unwrap_or_default();
    let Some(body) = library
        .iter()
        .find(|f| f.signature.as_ref().is_some_and(|s| s.name == body_name))
    else {
        return Err(fail("whose body is not in the graph's function library".into()));
    };
    let out_args = body
        .signature
        .as_ref()
        .map(|s| s.output_arg.as_slice())
        .unwrap_or_default();
    let ret = out_args
        .get(index)
        .and_then(|a| body.ret.get(&a.name))
        .ok_or_else(|| fail(format!("whose body returns {} values", out_args.len())))?;
    let nodes = Nodes::function(body, body_name);
    let returned = nodes.parse(ret).and_then(|t| nodes.trace(&t, false));
    let set_item = match returned {
        Some((_, n)) if n.op == "TensorListSetItem" => n,
        Some((_, n)) => {
            return Err(fail(format!(
                "whose body returns {} {:?} for it, not a TensorListSetItem",
                n.op, n.name
            )));
        }
        None => return Err(fail(format!("whose body returns {ret:?}, which names no node"))),
    };
    // The item written is the third input (handle, index, item); check it is a body node.
    let value = nodes
        .inputs(set_item)
        .into_iter()
        .nth(2)
        .filter(|t| nodes.get(t).is_some())
        .ok_or_else(|| {
            fail(format!(
                "whose TensorListSetItem {:?} stores no computed value",
                set_item.name
            ))
        })?;
    Ok(LoopValue {
        nodes,
        value,
        loop_desc,
    })
}
