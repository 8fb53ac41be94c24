//! Constant folding: evaluates every node whose inputs are all constants (identities, float
//! arithmetic with numpy broadcasting, reshapes, casts) and replaces it by a `Const` of the
//! same name, so what remains of e.g. Keras' batch-norm arithmetic is `x * a + b` on constants.

use edge_proto::tensorflow::{DataType, GraphDef};

use super::TfError;
use super::graph::{
    TensorRef, attr_ints, attr_type, const_value, data_inputs, index_by_name, make_const, topo_order,
};
use super::tensor::{Data, HostTensor, element_count};

/// Ops `fold_constants` can evaluate.
const FOLDABLE: &[&str] = &[
    "Identity",
    "StopGradient",
    "Snapshot",
    "PreventGradient",
    "Rsqrt",
    "Sqrt",
    "Reciprocal",
    "Inv",
    "Neg",
    "Square",
    "Abs",
    "Add",
    "AddV2",
    "Sub",
    "Mul",
    "RealDiv",
    "Div",
    "Maximum",
    "Minimum",
    "BiasAdd",
    "Reshape",
    "Squeeze",
    "ExpandDims",
    "Cast",
];

/// Folds every foldable node whose data inputs are all `Const`, in topological order (so
/// chains fold completely). Returns how many nodes became constants. Expects a pruned graph
/// (no control inputs).
pub(crate) fn fold_constants(graph: &mut GraphDef) -> Result<usize, TfError> {
    let order = topo_order(graph)?;
    let index: std::collections::HashMap<String, usize> = index_by_name(graph)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let mut folded = 0;
    for i in order {
        let node = &graph.node[i];
        if !FOLDABLE.contains(&node.op.as_str()) || node.input.is_empty() {
            continue;
        }
        let inputs: Vec<TensorRef> = data_inputs(node).collect();
        let producers: Option<Vec<usize>> = inputs
            .iter()
            .map(|t| {
                index
                    .get(&t.node)
                    .copied()
                    .filter(|&p| t.index == 0 && graph.node[p].op == "Const")
            })
            .collect();
        let Some(producers) = producers else { continue };
        let values = producers
            .iter()
            .map(|&p| const_value(&graph.node[p]))
            .collect::<Result<Vec<_>, _>>()?;
        let node = &graph.node[i];
        if let Some(result) = eval(node, values).map_err(|e| TfError::graph(&node.name, e))? {
            make_const(&mut graph.node[i], &result);
            folded += 1;
        }
    }
    Ok(folded)
}

/// Evaluates one node on constant inputs; `Ok(None)` when this dtype/op combination is not
/// handled (the node is left alone).
fn eval(
    node: &edge_proto::tensorflow::NodeDef,
    mut v: Vec<HostTensor>,
) -> Result<Option<HostTensor>, String> {
    let arity = match node.op.as_str() {
        "Add" | "AddV2" | "Sub" | "Mul" | "RealDiv" | "Div" | "Maximum" | "Minimum" | "BiasAdd"
        | "Reshape" | "ExpandDims" => 2,
        _ => 1,
    };
    if v.len() != arity {
        return Err(format!("{} with {} inputs (expected {arity})", node.op, v.len()));
    }
    let b = if arity == 2 { v.pop() } else { None };
    let Some(a) = v.pop() else { return Ok(None) };
    let unary = |f: fn(f32) -> f32| {
        a.as_f32()
            .map(|x| HostTensor::f32(a.shape.clone(), x.iter().map(|&v| f(v)).collect()))
    };
    Ok(match (node.op.as_str(), b) {
        ("Identity" | "StopGradient" | "Snapshot" | "PreventGradient", _) => Some(a),
        ("Rsqrt", _) => unary(|x| 1.0 / x.sqrt()),
        ("Sqrt", _) => unary(f32::sqrt),
        ("Reciprocal" | "Inv", _) => unary(|x| 1.0 / x),
        ("Neg", _) => unary(|x| -x),
        ("Square", _) => unary(|x| x * x),
        ("Abs", _) => unary(f32::abs),
        ("Cast", _) => cast(a, attr_type(node, "DstT")),
        ("Reshape", Some(shape)) => Some(reshape(a, &shape)?),
        ("ExpandDims", Some(dim)) => Some(expand_dims(a, &dim)?),
        ("Squeeze", _) => Some(squeeze(a, &attr_ints(node, "squeeze_dims").unwrap_or_default())?),
        ("BiasAdd", Some(b)) => {
            if b.shape.len() != 1 || a.shape.last() != b.shape.first() {
                return Err(format!("BiasAdd of bias {:?} on value {:?}", b.shape, a.shape));
            }
            binary(&node.op, a, b)?
        }
        (op, Some(b)) => binary(op, a, b)?,
        _ => None,
    })
}

fn binary(op: &str, a: HostTensor, b: HostTensor) -> Result<Option<HostTensor>, String> {
    let out = match (&a.data, &b.data) {
        (Data::F32(x), Data::F32(y)) => {
            let f: fn(f32, f32) -> f32 = match op {
                "Add" | "AddV2" | "BiasAdd" => |p, q| p + q,
                "Sub" => |p, q| p - q,
                "Mul" => |p, q| p * q,
                "RealDiv" | "Div" => |p, q| p / q,
                "Maximum" => f32::max,
                "Minimum" => f32::min,
                _ => return Ok(None),
            };
            let (data, shape) = broadcast(x, &a.shape, y, &b.shape, f)?;
            HostTensor {
                shape,
                data: Data::F32(data),
            }
        }
        (Data::I32(x), Data::I32(y)) => {
            let f: fn(i32, i32) -> i32 = match op {
                "Add" | "AddV2" | "BiasAdd" => i32::wrapping_add,
                "Sub" => i32::wrapping_sub,
                "Mul" => i32::wrapping_mul,
                "Maximum" => i32::max,
                "Minimum" => i32::min,
                _ => return Ok(None),
            };
            let (data, shape) = broadcast(x, &a.shape, y, &b.shape, f)?;
            HostTensor {
                shape,
                data: Data::I32(data),
            }
        }
        (Data::I64(x), Data::I64(y)) => {
            let f: fn(i64, i64) -> i64 = match op {
                "Add" | "AddV2" | "BiasAdd" => i64::wrapping_add,
                "Sub" => i64::wrapping_sub,
                "Mul" => i64::wrapping_mul,
                "Maximum" => i64::max,
                "Minimum" => i64::min,
                _ => return Ok(None),
            };
            let (data, shape) = broadcast(x, &a.shape, y, &b.shape, f)?;
            HostTensor {
                shape,
                data: Data::I64(data),
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(out))
}

/// Numpy broadcasting of `f` over `a` and `b`.
pub(crate) fn broadcast<T: Copy>(
    a: &[T],
    sa: &[usize],
    b: &[T],
    sb: &[usize],
    f: impl Fn(T, T) -> T,
) -> Result<(Vec<T>, Vec<usize>), String> {
    let shape =
        broadcast_shape(sa, sb).ok_or_else(|| format!("shapes {sa:?} and {sb:?} do not broadcast"))?;
    let rank = shape.len();
    let strides = |s: &[usize]| -> Vec<usize> {
        let padded: Vec<usize> = std::iter::repeat_n(1, rank - s.len())
            .chain(s.iter().copied())
            .collect();
        let mut st = vec![0; rank];
        let mut acc = 1;
        for d in (0..rank).rev() {
            st[d] = if padded[d] == 1 { 0 } else { acc };
            acc *= padded[d];
        }
        st
    };
    let (st_a, st_b) = (strides(sa), strides(sb));
    let n = element_count(&shape)?;
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; rank];
    let (mut ia, mut ib) = (0usize, 0usize);
    for _ in 0..n {
        out.push(f(a[ia], b[ib]));
        for d in (0..rank).rev() {
            idx[d] += 1;
            ia += st_a[d];
            ib += st_b[d];
            if idx[d] < shape[d] {
                break;
            }
            ia -= st_a[d] * shape[d];
            ib -= st_b[d] * shape[d];
            idx[d] = 0;
        }
    }
    Ok((out, shape))
}

pub(crate) fn broadcast_shape(sa: &[usize], sb: &[usize]) -> Option<Vec<usize>> {
    let rank = sa.len().max(sb.len());
    let dim = |s: &[usize], d: usize| {
        if d + s.len() >= rank {
            s[d + s.len() - rank]
        } else {
            1
        }
    };
    (0..rank)
        .map(|d| match (dim(sa, d), dim(sb, d)) {
            (x, y) if x == y || y == 1 => Some(x),
            (1, y) => Some(y),
            _ => None,
        })
        .collect()
}

fn reshape(a: HostTensor, shape: &HostTensor) -> Result<HostTensor, String> {
    let dims = shape.as_i64s().ok_or("Reshape with a non-integer shape")?;
    let n = a.len();
    let known: usize = dims.iter().filter(|&&d| d >= 0).map(|&d| d as usize).product();
    let out: Vec<usize> = match dims.iter().filter(|&&d| d < 0).count() {
        0 => dims.iter().map(|&d| d as usize).collect(),
        1 if known > 0 && n.is_multiple_of(known) => dims
            .iter()
            .map(|&d| if d < 0 { n / known } else { d as usize })
            .collect(),
        _ => return Err(format!("cannot reshape {:?} to {dims:?}", a.shape)),
    };
    if element_count(&out)? != n {
        return Err(format!("cannot reshape {:?} to {dims:?}", a.shape));
    }
    Ok(HostTensor {
        shape: out,
        data: a.data,
    })
}

fn squeeze(a: HostTensor, axes: &[i64]) -> Result<HostTensor, String> {
    let rank = a.shape.len() as i64;
    let axes: Vec<usize> = axes
        .iter()
        .map(|&x| (if x < 0 { x + rank } else { x }) as usize)
        .collect();
    if axes.iter().any(|&x| x >= a.shape.len() || a.shape[x] != 1) {
        return Err(format!("cannot squeeze axes {axes:?} of {:?}", a.shape));
    }
    let shape = a
        .shape
        .iter()
        .enumerate()
        .filter(|&(i, &d)| {
            !(if axes.is_empty() {
                d == 1
            } else {
                axes.contains(&i)
            })
        })
        .map(|(_, &d)| d)
        .collect();
    Ok(HostTensor { shape, data: a.data })
}

fn expand_dims(mut a: HostTensor, dim: &HostTensor) -> Result<HostTensor, String> {
    let d = dim
        .as_i64s()
        .filter(|d| d.len() == 1)
        .ok_or("ExpandDims with a non-scalar axis")?[0];
    let rank = a.shape.len() as i64;
    let axis = if d < 0 { d + rank + 1 } else { d };
    if !(0..=rank).contains(&axis) {
        return Err(format!("ExpandDims axis {d} out of range for {:?}", a.shape));
    }
    a.shape.insert(axis as usize, 1);
    Ok(a)
}

fn cast(a: HostTensor, to: Option<DataType>) -> Option<HostTensor> {
    let as_f64: Vec<f64> = match &a.data {
        Data::F32(v) => v.iter().map(|&x| x as f64).collect(),
        Data::F64(v) => v.clone(),
        Data::I32(v) => v.iter().map(|&x| x as f64).collect(),
        Data::I64(v) => v.iter().map(|&x| x as f64).collect(),
        _ => return None,
    };
    let data = match to? {
        DataType::DtFloat => Data::F32(as_f64.iter().map(|&x| x as f32).collect()),
        DataType::DtDouble => Data::F64(as_f64),
        DataType::DtInt32 => Data::I32(as_f64.iter().map(|&x| x as i32).collect()),
        DataType::DtInt64 => Data::I64(as_f64.iter().map(|&x| x as i64).collect()),
        _ => return None,
    };
    Some(HostTensor { shape: a.shape, data })
}

#[cfg(test)]
mod tests {
    use super::super::graph::test_util::*;
    use super::super::graph::{const_node, prune};
    use super::*;

    fn value(g: &GraphDef, name: &str) -> HostTensor {
        let n = node(g, name);
        assert_eq!(n.op, "Const", "{name} was not folded");
        const_value(n).unwrap()
    }

    #[test]
    fn broadcasting_follows_numpy() {
        let (v, s) = broadcast(&[1.0f32, 2.0], &[2, 1], &[10.0, 20.0, 30.0], &[3], |a, b| a + b).unwrap();
        assert_eq!(s, [2, 3]);
        assert_eq!(v, [11.0, 21.0, 31.0, 12.0, 22.0, 32.0]);
        assert!(broadcast(&[1.0f32, 2.0], &[2], &[1.0, 2.0, 3.0], &[3], |a, b| a + b).is_err());
    }

    #[test]
    fn keras_batch_norm_arithmetic_folds_to_constants() {
        // Keras 3 inference batch norm: a = rsqrt(var + eps) (reshaped), b = beta - mean * a.
        let mut g = graph(vec![
            konst("var", &[2], vec![3.0, 15.0]),
            konst("shape", &[0], vec![]),
            konst("eps", &[], vec![1.0]),
            konst("mean", &[2], vec![1.0, 2.0]),
            konst("beta", &[2], vec![0.5, -0.5]),
            const_node(
                "shape4",
                &HostTensor {
                    shape: vec![4],
                    data: Data::I32(vec![1, 1, 1, -1]),
                },
            ),
            op("var_r", "Reshape", &["var", "shape4"]),
            op("read", "Identity", &["var_r"]),
            op("add", "AddV2", &["read", "eps"]),
            op("rsqrt", "Rsqrt", &["add"]),
            op("mul_1", "Mul", &["mean", "rsqrt"]),
            op("sub", "Sub", &["beta", "mul_1"]),
            placeholder("x", &[1, 2, 2, 2]),
            op("mul", "Mul", &["x", "rsqrt"]),
            op("out", "AddV2", &["mul", "sub"]),
        ]);
        prune(&mut g, &["out"]).unwrap();
        let n = fold_constants(&mut g).unwrap();
        assert_eq!(n, 6);
        assert_eq!(
            value(&g, "rsqrt"),
            HostTensor::f32(vec![1, 1, 1, 2], vec![0.5, 0.25])
        );
        // beta - mean * a = [0.5 - 0.5, -0.5 - 0.5]: broadcast [2] with [1,1,1,2].
        assert_eq!(
            value(&g, "sub"),
            HostTensor::f32(vec![1, 1, 1, 2], vec![0.0, -1.0])
        );
        assert_eq!(node(&g, "mul").op, "Mul");
        assert_eq!(node(&g, "out").op, "AddV2");
    }

    #[test]
    fn squeeze_expand_dims_and_cast_fold() {
        let mut g = graph(vec![
            konst("k", &[1, 3, 1], vec![1.5, 2.5, -1.5]),
            op("sq", "Squeeze", &["k"]),
            const_node(
                "ax",
                &HostTensor {
                    shape: vec![],
                    data: Data::I32(vec![-1]),
                },
            ),
            op("ed", "ExpandDims", &["sq", "ax"]),
            op("c", "Cast", &["ed"]),
        ]);
        super::super::graph::set_attr(
            &mut g.node[4],
            "DstT",
            edge_proto::tensorflow::attr_value::Value::Type(DataType::DtInt32 as i32),
        );
        prune(&mut g, &["c"]).unwrap();
        fold_constants(&mut g).unwrap();
        assert_eq!(value(&g, "sq").shape, [3]);
        assert_eq!(value(&g, "ed").shape, [3, 1]);
        assert_eq!(value(&g, "c").data, Data::I32(vec![1, 2, -1]));
    }

    #[test]
    fn inconsistent_constants_are_an_error_naming_the_node() {
        let mut g = graph(vec![
            konst("a", &[2], vec![1.0, 2.0]),
            konst("b", &[3], vec![1.0; 3]),
            op("bad", "Mul", &["a", "b"]),
        ]);
        let err = fold_constants(&mut g).unwrap_err().to_string();
        assert!(err.contains("\"bad\"") && err.contains("broadcast"), "{err}");
    }
}
