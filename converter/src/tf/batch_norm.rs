//! Batch-norm folding, as grappler does it: per-channel `x * a + b` arithmetic (Keras' batch
//! norm after constant folding, inference-mode `FusedBatchNorm*`, bias adds) that follows a
//! convolution goes into the convolution's filter plus one rank-1 `BiasAdd`. Also rewrites any
//! remaining `[1, .., 1, C]` constant operand of an elementwise op to rank 1 where that cannot
//! change broadcasting: tract 0.23 rejects such biases when it fuses them into a convolution.

use std::collections::{HashMap, HashSet};

use edge_proto::tensorflow::{GraphDef, NodeDef, attr_value::Value};

use super::TfError;
use super::graph::{
    TensorRef, attr_b, attr_f, attr_ints, attr_s, const_node, const_value, consumers, data_inputs, f32_op,
    fresh_name, index_by_name, is_nhwc, set_attr, topo_order,
};
use super::tensor::HostTensor;

/// What `fold_batch_norms` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct BatchNormReport {
    /// Convolutions whose following per-channel affine chain went into their filter and bias.
    pub folded_into_conv: usize,
    /// Inference-mode `FusedBatchNorm*` nodes rewritten as `Mul` + `BiasAdd`.
    pub fused_rewritten: usize,
}

/// Rewrites fused batch norms as arithmetic, then folds per-channel arithmetic into the
/// convolutions before it, on a constant-folded, pruned graph. `protected` names nodes whose
/// values must not change (the graph output). Leaves dead nodes for the next prune.
pub(crate) fn fold_batch_norms(graph: &mut GraphDef, protected: &[&str]) -> Result<BatchNormReport, TfError> {
    let mut taken: HashSet<String> = graph.node.iter().map(|n| n.name.clone()).collect();
    let fused_rewritten = rewrite_fused_batch_norms(graph, &mut taken)?;
    let folded_into_conv = fold_into_convolutions(graph, &mut taken, protected)?;
    Ok(BatchNormReport {
        folded_into_conv,
        fused_rewritten,
    })
}

/// Rewrites `[1, .., 1, C]` constant operands of elementwise ops as `[C]` where the other
/// operand's rank is known to be at least as large (so broadcasting is unchanged); run on a
/// pruned graph. Returns how many operands were rewritten.
pub(crate) fn rank1_constants(graph: &mut GraphDef) -> Result<usize, TfError> {
    let mut taken: HashSet<String> = graph.node.iter().map(|n| n.name.clone()).collect();
    rewrite_rank1_constants(graph, &mut taken)
}

/// `y = x * scale + offset` of an inference-mode fused batch norm on constants.
fn rewrite_fused_batch_norms(graph: &mut GraphDef, taken: &mut HashSet<String>) -> Result<usize, TfError> {
    let used_extra_outputs: HashSet<String> = graph
        .node
        .iter()
        .flat_map(data_inputs)
        .filter(|t| t.index > 0)
        .map(|t| t.node)
        .collect();
    let index: HashMap<String, usize> = index_by_name(graph)
        .into_iter()
        .map(|(k, v)| (k.into(), v))
        .collect();
    let mut new_nodes = Vec::new();
    let mut count = 0;
    for i in 0..graph.node.len() {
        let node = &graph.node[i];
        if !node.op.starts_with("FusedBatchNorm") || node.op == "FusedBatchNormGrad" {
            continue;
        }
        if attr_b(node, "is_training") != Some(false)
            || !is_nhwc(node)
            || used_extra_outputs.contains(&node.name)
        {
            continue;
        }
        let ins: Vec<TensorRef> = data_inputs(node).collect();
        if ins.len() != 5 {
            return Err(TfError::graph(
                &node.name,
                format!("{} with {} inputs (expected 5)", node.op, ins.len()),
            ));
        }
        let mut params = Vec::new();
        for t in &ins[1..] {
            match index.get(&t.node).map(|&p| &graph.node[p]) {
                Some(p) if p.op == "Const" && t.index == 0 => params.push(const_value(p)?),
                _ => break,
            }
        }
        let [gamma, beta, mean, var] = params.as_slice() else {
            continue;
        };
        let (Some(gamma), Some(beta), Some(mean), Some(var)) =
            (gamma.as_f32(), beta.as_f32(), mean.as_f32(), var.as_f32())
        else {
            continue;
        };
        let c = gamma.len();
        if [beta.len(), mean.len(), var.len()] != [c; 3] {
            return Err(TfError::graph(
                &node.name,
                "batch-norm parameters of different lengths",
            ));
        }
        let eps = attr_f(node, "epsilon").unwrap_or(1e-4);
        let scale: Vec<f32> = (0..c).map(|k| gamma[k] / (var[k] + eps).sqrt()).collect();
        let offset: Vec<f32> = (0..c).map(|k| beta[k] - mean[k] * scale[k]).collect();
        let name = node.name.clone();
        let x = node.input[0].clone();
        let scale_name = fresh_name(taken, &format!("{name}/folded_scale"));
        let mul_name = fresh_name(taken, &format!("{name}/folded_mul"));
        let offset_name = fresh_name(taken, &format!("{name}/folded_offset"));
        new_nodes.push(const_node(&scale_name, &HostTensor::f32(vec![c], scale)));
        new_nodes.push(f32_op(&mul_name, "Mul", vec![x, scale_name]));
        new_nodes.push(const_node(&offset_name, &HostTensor::f32(vec![c], offset)));
        graph.node[i] = f32_op(name, "BiasAdd", vec![mul_name, offset_name]);
        count += 1;
    }
    graph.node.extend(new_nodes);
    Ok(count)
}

/// Per-channel constant operand: all dims 1 except the last, which is `channels` (or 1).
fn per_channel(t: &HostTensor, channels: usize) -> Option<Vec<f32>> {
    let v = t.as_f32()?;
    let (last, lead) = t.shape.split_last().map_or((1, &[][..]), |(l, r)| (*l, r));
    if t.shape.len() > 4 || lead.iter().any(|&d| d != 1) {
        return None;
    }
    match last {
        l if l == channels => Some(v.to_vec()),
        1 => Some(vec![v[0]; channels]),
        _ => None,
    }
}

fn fold_into_convolutions(
    graph: &mut GraphDef,
    taken: &mut HashSet<String>,
    protected: &[&str],
) -> Result<usize, TfError> {
    let index: HashMap<String, usize> = index_by_name(graph)
        .into_iter()
        .map(|(k, v)| (k.into(), v))
        .collect();
    let users = consumers(graph);
    let single_user = |name: &str| -> Option<usize> {
        match users.get(name).map(Vec::as_slice) {
            Some([u]) if !protected.contains(&name) => Some(*u),
            _ => None,
        }
    };
    let const_of = |t: &TensorRef| -> Option<&NodeDef> {
        index
            .get(&t.node)
            .map(|&p| &graph.node[p])
            .filter(|p| p.op == "Const" && t.index == 0)
    };
    let mut rewrites = Vec::new();
    for (ci, conv) in graph.node.iter().enumerate() {
        let depthwise = match conv.op.as_str() {
            "Conv2D" => false,
            "DepthwiseConv2dNative" => true,
            _ => continue,
        };
        let ins: Vec<TensorRef> = data_inputs(conv).collect();
        let (Some(filter_node), true) = (ins.get(1).and_then(const_of), is_nhwc(conv)) else {
            continue;
        };
        let filter = const_value(filter_node)?;
        let (Some(_), 4) = (filter.as_f32(), filter.shape.len()) else {
            continue;
        };
        let channels = if depthwise {
            filter.shape[2] * filter.shape[3]
        } else {
            filter.shape[3]
        };
        let (mut scale, mut shift) = (vec![1f32; channels], vec![0f32; channels]);
        let mut cur = conv.name.clone();
        let mut end = None;
        while let Some(u) = single_user(&cur) {
            let user = &graph.node[u];
            let uins: Vec<TensorRef> = data_inputs(user).collect();
            let [a, b] = uins.as_slice() else { break };
            let (ours_first, other) = match (a.node == cur && a.index == 0, b.node == cur && b.index == 0) {
                (true, false) => (true, b),
                (false, true) => (false, a),
                _ => break,
            };
            let Some(c) = const_of(other)
                .map(const_value)
                .transpose()?
                .and_then(|t| per_channel(&t, channels))
            else {
                break;
            };
            match (user.op.as_str(), ours_first) {
                ("Mul", _) => {
                    (0..channels).for_each(|k| (scale[k], shift[k]) = (scale[k] * c[k], shift[k] * c[k]))
                }
                ("Add" | "AddV2", _) | ("BiasAdd", true) => (0..channels).for_each(|k| shift[k] += c[k]),
                ("Sub", true) => (0..channels).for_each(|k| shift[k] -= c[k]),
                ("Sub", false) => {
                    (0..channels).for_each(|k| (scale[k], shift[k]) = (-scale[k], c[k] - shift[k]))
                }
                ("RealDiv", true) => {
                    (0..channels).for_each(|k| (scale[k], shift[k]) = (scale[k] / c[k], shift[k] / c[k]))
                }
                _ => break,
            }
            if user.op == "BiasAdd" && !is_nhwc(user) {
                break;
            }
            end = Some(u);
            cur = user.name.clone();
        }
        let Some(end) = end else { continue };
        let mut kernel = filter.clone();
        if let super::tensor::Data::F32(k) = &mut kernel.data {
            k.iter_mut()
                .enumerate()
                .for_each(|(i, w)| *w *= scale[i % channels]);
        }
        rewrites.push((ci, end, kernel, shift));
    }
    let count = rewrites.len();
    for (ci, end, kernel, shift) in rewrites {
        let conv_name = graph.node[ci].name.clone();
        let end_name = graph.node[end].name.clone();
        let filter_name = fresh_name(taken, &format!("{conv_name}/folded_filter"));
        let bias_name = fresh_name(taken, &format!("{end_name}/folded_bias"));
        graph.node[ci].input[1] = filter_name.clone();
        graph.node.push(const_node(filter_name, &kernel));
        graph
            .node
            .push(const_node(&bias_name, &HostTensor::f32(vec![shift.len()], shift)));
        let mut bias_add = f32_op(end_name, "BiasAdd", vec![conv_name, bias_name]);
        set_attr(&mut bias_add, "data_format", Value::S(b"NHWC".to_vec()));
        graph.node[end] = bias_add;
    }
    Ok(count)
}

/// Ranks that follow from the graph alone (placeholders, constants, and ops with fixed or
/// input-preserving ranks); absent where unknown.
fn infer_ranks(graph: &GraphDef) -> Result<HashMap<String, usize>, TfError> {
    let mut ranks: HashMap<String, usize> = HashMap::new();
    for i in topo_order(graph)? {
        let n = &graph.node[i];
        let ins: Vec<TensorRef> = data_inputs(n).collect();
        let r = |k: usize| ins.get(k).and_then(|t| ranks.get(&t.node)).copied();
        let rank = match n.op.as_str() {
            "Placeholder" => match super::graph::attr(n, "shape") {
                Some(Value::Shape(s)) if !s.unknown_rank => Some(s.dim.len()),
                _ => None,
            },
            "Const" => const_value(n).ok().map(|t| t.shape.len()),
            "Conv2D" | "DepthwiseConv2dNative" | "MaxPool" | "AvgPool" | "ResizeBilinear" => Some(4),
            "MatMul" => Some(2),
            "Relu" | "Relu6" | "Elu" | "Selu" | "Sigmoid" | "Tanh" | "Softmax" | "Identity" | "Rsqrt"
            | "Sqrt" | "Neg" | "Abs" | "Exp" | "Log" | "Cast" | "BiasAdd" | "ConcatV2" | "Pad"
            | "MirrorPad" | "LeakyRelu" => r(0),
            "Add" | "AddV2" | "Sub" | "Mul" | "RealDiv" | "Maximum" | "Minimum" => {
                r(0).zip(r(1)).map(|(a, b)| a.max(b))
            }
            "Mean" | "Sum" | "Max" | "Min" | "Prod" => {
                if attr_b(n, "keep_dims") == Some(true) {
                    r(0)
                } else {
                    let axes = ins
                        .get(1)
                        .and_then(|t| graph.node.iter().find(|p| p.name == t.node));
                    let axes = axes.filter(|p| p.op == "Const").and_then(|p| const_value(p).ok());
                    axes.and_then(|a| a.as_i64s()).and_then(|a| {
                        let unique: HashSet<i64> = a.into_iter().collect();
                        r(0).and_then(|x| x.checked_sub(unique.len()))
                    })
                }
            }
            "Squeeze" => attr_ints(n, "squeeze_dims")
                .filter(|d| !d.is_empty())
                .and_then(|d| r(0)?.checked_sub(d.len())),
            _ => None,
        };
        if let Some(rank) = rank {
            ranks.insert(n.name.clone(), rank);
        }
    }
    Ok(ranks)
}

fn rewrite_rank1_constants(graph: &mut GraphDef, taken: &mut HashSet<String>) -> Result<usize, TfError> {
    let ranks = infer_ranks(graph)?;
    let index: HashMap<String, usize> = index_by_name(graph)
        .into_iter()
        .map(|(k, v)| (k.into(), v))
        .collect();
    let mut new_nodes: Vec<NodeDef> = Vec::new();
    let mut count = 0;
    for i in 0..graph.node.len() {
        let n = &graph.node[i];
        if !matches!(
            n.op.as_str(),
            "Add" | "AddV2" | "Sub" | "Mul" | "RealDiv" | "Maximum" | "Minimum"
        ) {
            continue;
        }
        let ins: Vec<TensorRef> = data_inputs(n).collect();
        if ins.len() != 2 || attr_s(n, "data_format").is_some() {
            continue;
        }
        for j in 0..2 {
            let (k, other) = (&ins[j], &ins[1 - j]);
            let Some(p) = index
                .get(&k.node)
                .map(|&p| &graph.node[p])
                .filter(|p| p.op == "Const" && k.index == 0)
            else {
                continue;
            };
            let value = const_value(p)?;
            let rank = value.shape.len();
            let leading_ones = value
                .shape
                .split_last()
                .is_some_and(|(_, lead)| lead.iter().all(|&d| d == 1));
            let other_rank = ranks.get(&other.node).copied();
            if rank < 2 || !leading_ones || other_rank.is_none_or(|r| r < rank) {
                continue;
            }
            let name = fresh_name(taken, &format!("{}/rank1", k.node));
            let c = value.shape[rank - 1];
            new_nodes.push(const_node(
                &name,
                &HostTensor {
                    shape: vec![c],
                    data: value.data,
                },
            ));
            let slot = graph.node[i]
                .input
                .iter()
                .position(|s| TensorRef::parse(s).as_ref() == Some(k));
            if let Some(slot) = slot {
                graph.node[i].input[slot] = name;
                count += 1;
            }
            break;
        }
    }
    graph.node.extend(new_nodes);
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::super::graph::test_util::*;
    use super::super::graph::{prune, set_attr};
    use super::*;

    fn conv(name: &str, x: &str, filter: &str) -> NodeDef {
        let mut n = op(name, "Conv2D", &[x, filter]);
        set_attr(
            &mut n,
            "strides",
            Value::List(edge_proto::tensorflow::attr_value::ListValue {
                i: vec![1, 1, 1, 1],
                ..Default::default()
            }),
        );
        set_attr(&mut n, "padding", Value::S(b"VALID".to_vec()));
        n
    }

    /// x [1,2,2,2] -> 1x1 conv to 3 channels -> body -> Relu "out".
    fn conv_graph(body: Vec<NodeDef>, last: &str) -> GraphDef {
        let mut nodes = vec![
            placeholder("x", &[1, 2, 2, 2]),
            konst("w", &[1, 1, 2, 3], vec![1.0, 2.0, -1.0, 0.5, -0.5, 3.0]),
            conv("conv", "x", "w"),
        ];
        nodes.extend(body);
        nodes.push(op("out", "Relu", &[last]));
        graph(nodes)
    }

    fn input() -> Vec<f32> {
        vec![0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, 0.8]
    }

    #[test]
    fn keras_affine_chain_goes_into_filter_and_one_rank1_bias() {
        let original = conv_graph(
            vec![
                konst("a", &[1, 1, 1, 3], vec![2.0, 0.5, -1.0]),
                konst("b", &[1, 1, 1, 3], vec![0.25, 1.0, 2.0]),
                op("mul", "Mul", &["conv", "a"]),
                op("add", "AddV2", &["mul", "b"]),
            ],
            "add",
        );
        let mut g = original.clone();
        let report = fold_batch_norms(&mut g, &["out"]).unwrap();
        prune(&mut g, &["out"]).unwrap();
        assert_eq!(report.folded_into_conv, 1);
        let ops: Vec<_> = g
            .node
            .iter()
            .filter(|n| n.op != "Const")
            .map(|n| n.op.as_str())
            .collect();
        assert_eq!(ops, ["Placeholder", "Conv2D", "BiasAdd", "Relu"]);
        let bias = g
            .node
            .iter()
            .find(|n| n.name == "add/folded_bias")
            .map(|n| const_value(n).unwrap());
        assert_eq!(bias, Some(HostTensor::f32(vec![3], vec![0.25, 1.0, 2.0])));
        assert_close(
            &run_tract(&g, &[1, 2, 2, 2], &input()),
            &run_tract(&original, &[1, 2, 2, 2], &input()),
        );
    }

    #[test]
    fn subtract_mean_then_scale_form_folds_too() {
        // (conv - m) * a + b, with b - c written as Sub(c, ..) in the middle.
        let original = conv_graph(
            vec![
                konst("m", &[3], vec![0.5, -0.5, 1.0]),
                konst("a", &[1, 1, 1, 3], vec![2.0, 0.5, -1.0]),
                konst("c", &[], vec![3.0]),
                op("sub", "Sub", &["conv", "m"]),
                op("mul", "Mul", &["a", "sub"]),
                op("rsub", "Sub", &["c", "mul"]),
            ],
            "rsub",
        );
        let mut g = original.clone();
        assert_eq!(fold_batch_norms(&mut g, &["out"]).unwrap().folded_into_conv, 1);
        prune(&mut g, &["out"]).unwrap();
        assert_eq!(g.node.iter().filter(|n| n.op != "Const").count(), 4);
        assert_close(
            &run_tract(&g, &[1, 2, 2, 2], &input()),
            &run_tract(&original, &[1, 2, 2, 2], &input()),
        );
    }

    #[test]
    fn fused_batch_norm_v3_in_inference_mode_folds_into_the_conv() {
        let bn = |op_name: &str| {
            let mut n = op("bn", op_name, &["conv", "gamma", "beta", "mean", "var"]);
            set_attr(&mut n, "epsilon", Value::F(0.001));
            set_attr(&mut n, "is_training", Value::B(false));
            n
        };
        let params = || {
            vec![
                konst("gamma", &[3], vec![1.0, 2.0, 0.5]),
                konst("beta", &[3], vec![0.1, 0.2, 0.3]),
                konst("mean", &[3], vec![0.5, -0.5, 0.25]),
                konst("var", &[3], vec![4.0, 0.25, 1.0]),
            ]
        };
        let mut g = conv_graph([params(), vec![bn("FusedBatchNormV3")]].concat(), "bn");
        let report = fold_batch_norms(&mut g, &["out"]).unwrap();
        prune(&mut g, &["out"]).unwrap();
        assert_eq!((report.fused_rewritten, report.folded_into_conv), (1, 1));
        assert!(g.node.iter().all(|n| !n.op.starts_with("FusedBatchNorm")));
        // tract reads FusedBatchNorm (v1), which computes the same in inference mode.
        let reference = conv_graph([params(), vec![bn("FusedBatchNorm")]].concat(), "bn");
        assert_close(
            &run_tract(&g, &[1, 2, 2, 2], &input()),
            &run_tract(&reference, &[1, 2, 2, 2], &input()),
        );
    }

    #[test]
    fn a_shared_intermediate_or_a_protected_conv_is_left_alone() {
        let body = vec![
            konst("a", &[3], vec![2.0, 0.5, -1.0]),
            op("mul", "Mul", &["conv", "a"]),
            op("other", "Relu", &["conv"]),
            op("sum", "AddV2", &["mul", "other"]),
        ];
        let mut g = conv_graph(body, "sum");
        assert_eq!(fold_batch_norms(&mut g, &["out"]).unwrap().folded_into_conv, 0);
        let mut g = conv_graph(
            vec![
                konst("a", &[3], vec![2.0, 0.5, -1.0]),
                op("mul", "Mul", &["conv", "a"]),
            ],
            "mul",
        );
        assert_eq!(fold_batch_norms(&mut g, &["conv"]).unwrap().folded_into_conv, 0);
    }

    #[test]
    fn rank4_constants_of_elementwise_ops_become_rank1_when_broadcasting_allows() {
        let mut g = graph(vec![
            placeholder("x", &[1, 2, 2, 3]),
            placeholder("v", &[-1, 3]),
            konst("k", &[1, 1, 1, 3], vec![1.0, 2.0, 3.0]),
            op("on_image", "Mul", &["x", "k"]),
            op("on_vector", "Mul", &["v", "k"]),
        ]);
        assert_eq!(rank1_constants(&mut g).unwrap(), 1);
        assert_eq!(node(&g, "on_image").input[1], "k/rank1");
        assert_eq!(const_value(node(&g, "k/rank1")).unwrap().shape, [3]);
        // [N,3] * [1,1,1,3] is rank 4: rewriting it would change the result's shape.
        assert_eq!(node(&g, "on_vector").input[1], "k");
    }
}
