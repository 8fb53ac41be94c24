//! GraphDef plumbing shared by the passes: tensor names (`node:index`, `^control`), attribute
//! access, node builders, topological order and pruning to what an output needs.

use std::collections::{HashMap, HashSet};

use edge_proto::tensorflow::{AttrValue, DataType, GraphDef, NodeDef, TensorInfo, attr_value, tensor_info};

use super::TfError;
use super::tensor::HostTensor;

/// One output of one node, as GraphDef inputs name it (`node` or `node:index`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TensorRef {
    pub node: String,
    pub index: usize,
}

impl TensorRef {
    pub fn new(node: impl Into<String>, index: usize) -> Self {
        TensorRef {
            node: node.into(),
            index,
        }
    }

    /// Parses a GraphDef data input (`name` or `name:3`); `None` for `^control` inputs.
    pub fn parse(input: &str) -> Option<Self> {
        if input.starts_with('^') {
            return None;
        }
        if let Some((node, idx)) = input.rsplit_once(':')
            && let Ok(index) = idx.parse()
        {
            return Some(TensorRef::new(node, index));
        }
        Some(TensorRef::new(input, 0))
    }

    /// Parses a SignatureDef tensor name (`name:0`) or a user-given node/tensor name.
    pub fn parse_user(name: &str) -> Self {
        TensorRef::parse(name.trim_start_matches('^')).unwrap_or_else(|| TensorRef::new(name, 0))
    }

    pub fn to_input(&self) -> String {
        if self.index == 0 {
            self.node.clone()
        } else {
            format!("{}:{}", self.node, self.index)
        }
    }
}

/// The graph tensor a SavedModel signature entry names (dense tensors only).
pub(crate) fn tensor_ref(info: &TensorInfo) -> Result<TensorRef, TfError> {
    match &info.encoding {
        Some(tensor_info::Encoding::Name(name)) => Ok(TensorRef::parse_user(name)),
        _ => Err(TfError::Unsupported {
            flavour: "a signature with sparse or composite tensors".into(),
            hint: "export a signature whose input and outputs are dense tensors".into(),
        }),
    }
}

pub(crate) fn data_inputs(node: &NodeDef) -> impl Iterator<Item = TensorRef> + '_ {
    node.input.iter().filter_map(|i| TensorRef::parse(i))
}

// ---------------------------------------------------------------------------- attributes

pub(crate) fn attr<'a>(node: &'a NodeDef, key: &str) -> Option<&'a attr_value::Value> {
    node.attr.get(key).and_then(|a| a.value.as_ref())
}

pub(crate) fn attr_type(node: &NodeDef, key: &str) -> Option<DataType> {
    match attr(node, key) {
        Some(attr_value::Value::Type(t)) => DataType::try_from(*t).ok(),
        _ => None,
    }
}

pub(crate) fn attr_i(node: &NodeDef, key: &str) -> Option<i64> {
    match attr(node, key) {
        Some(attr_value::Value::I(i)) => Some(*i),
        _ => None,
    }
}

pub(crate) fn attr_f(node: &NodeDef, key: &str) -> Option<f32> {
    match attr(node, key) {
        Some(attr_value::Value::F(f)) => Some(*f),
        _ => None,
    }
}

pub(crate) fn attr_b(node: &NodeDef, key: &str) -> Option<bool> {
    match attr(node, key) {
        Some(attr_value::Value::B(b)) => Some(*b),
        _ => None,
    }
}

pub(crate) fn attr_s(node: &NodeDef, key: &str) -> Option<String> {
    match attr(node, key) {
        Some(attr_value::Value::S(s)) => Some(String::from_utf8_lossy(s).into_owned()),
        _ => None,
    }
}

pub(crate) fn attr_ints(node: &NodeDef, key: &str) -> Option<Vec<i64>> {
    match attr(node, key) {
        Some(attr_value::Value::List(l)) => Some(l.i.clone()),
        _ => None,
    }
}

/// Value of a `Const` node.
pub(crate) fn const_value(node: &NodeDef) -> Result<HostTensor, TfError> {
    match attr(node, "value") {
        Some(attr_value::Value::Tensor(t)) => {
            HostTensor::from_proto(t).map_err(|e| TfError::graph(&node.name, e))
        }
        _ => Err(TfError::graph(&node.name, "Const without a tensor value")),
    }
}

/// `NHWC` unless the node says otherwise.
pub(crate) fn is_nhwc(node: &NodeDef) -> bool {
    attr_s(node, "data_format").is_none_or(|f| f == "NHWC")
}

// ---------------------------------------------------------------------------- builders

pub(crate) fn set_attr(node: &mut NodeDef, key: &str, value: attr_value::Value) {
    node.attr
        .insert(key.to_string(), AttrValue { value: Some(value) });
}

pub(crate) fn const_node(name: impl Into<String>, value: &HostTensor) -> NodeDef {
    let mut node = NodeDef {
        name: name.into(),
        op: "Const".into(),
        ..Default::default()
    };
    set_attr(
        &mut node,
        "dtype",
        attr_value::Value::Type(value.data.dtype() as i32),
    );
    set_attr(&mut node, "value", attr_value::Value::Tensor(value.to_proto()));
    node
}

/// A float32 binary op (`Mul`, `BiasAdd`, ...) named `name`.
pub(crate) fn f32_op(name: impl Into<String>, op: &str, inputs: Vec<String>) -> NodeDef {
    let mut node = NodeDef {
        name: name.into(),
        op: op.into(),
        input: inputs,
        ..Default::default()
    };
    set_attr(&mut node, "T", attr_value::Value::Type(DataType::DtFloat as i32));
    node
}

/// Turns `node` into a `Const` holding `value`, keeping its name (so consumers are untouched).
pub(crate) fn make_const(node: &mut NodeDef, value: &HostTensor) {
    let name = std::mem::take(&mut node.name);
    *node = const_node(name, value);
}

/// A name not yet in `taken`, starting from `base` (`base`, `base_1`, ...), reserved on return.
pub(crate) fn fresh_name(taken: &mut HashSet<String>, base: &str) -> String {
    let mut name = base.to_string();
    let mut i = 1;
    while taken.contains(&name) {
        name = format!("{base}_{i}");
        i += 1;
    }
    taken.insert(name.clone());
    name
}

// ---------------------------------------------------------------------------- structure

pub(crate) fn index_by_name(graph: &GraphDef) -> HashMap<&str, usize> {
    graph
        .node
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect()
}

/// Consumers of each node's outputs (data edges only): node name -> consumer node indices.
pub(crate) fn consumers(graph: &GraphDef) -> HashMap<String, Vec<usize>> {
    let mut out: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for t in data_inputs(n) {
            out.entry(t.node).or_default().push(i);
        }
    }
    out
}

/// Node indices with producers before consumers (data and control edges). Errors on a cycle
/// (v1 control flow loops) or a dangling input.
pub(crate) fn topo_order(graph: &GraphDef) -> Result<Vec<usize>, TfError> {
    let index = index_by_name(graph);
    let mut pending = vec![0usize; graph.node.len()];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); graph.node.len()];
    for (i, n) in graph.node.iter().enumerate() {
        for input in &n.input {
            let name = TensorRef::parse(input)
                .map(|t| t.node)
                .unwrap_or_else(|| input[1..].to_string());
            let &p = index.get(name.as_str()).ok_or_else(|| {
                TfError::graph(&n.name, format!("input {input:?} names no node in the graph"))
            })?;
            pending[i] += 1;
            users[p].push(i);
        }
    }
    let mut ready: Vec<usize> = (0..graph.node.len()).filter(|&i| pending[i] == 0).collect();
    ready.reverse();
    let mut order = Vec::with_capacity(graph.node.len());
    while let Some(i) = ready.pop() {
        order.push(i);
        for &u in &users[i] {
            pending[u] -= 1;
            if pending[u] == 0 {
                ready.push(u);
            }
        }
    }
    if order.len() != graph.node.len() {
        let stuck = (0..graph.node.len())
            .find(|&i| pending[i] > 0)
            .map(|i| graph.node[i].name.clone());
        return Err(TfError::graph(
            stuck.unwrap_or_default(),
            "the graph has a cycle (TensorFlow 1 control flow loop) on the path to the output",
        ));
    }
    Ok(order)
}

/// Keeps only the nodes `outputs` need through data edges, drops every control input, and
/// orders the nodes topologically. Errors on a data input naming a missing node.
pub(crate) fn prune(graph: &mut GraphDef, outputs: &[&str]) -> Result<(), TfError> {
    let index = index_by_name(graph);
    let mut keep = vec![false; graph.node.len()];
    let mut stack: Vec<usize> = Vec::new();
    for o in outputs {
        let &i = index
            .get(o)
            .ok_or_else(|| TfError::graph(*o, "output node is not in the graph"))?;
        stack.push(i);
    }
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut keep[i], true) {
            continue;
        }
        for t in data_inputs(&graph.node[i]) {
            let &p = index.get(t.node.as_str()).ok_or_else(|| {
                TfError::graph(
                    &graph.node[i].name,
                    format!("input {:?} names no node in the graph", t.node),
                )
            })?;
            stack.push(p);
        }
    }
    let nodes = std::mem::take(&mut graph.node);
    graph.node = nodes
        .into_iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(mut n, _)| {
            n.input.retain(|i| !i.starts_with('^'));
            n
        })
        .collect();
    let order = topo_order(graph)?;
    let mut slots: Vec<Option<NodeDef>> = std::mem::take(&mut graph.node).into_iter().map(Some).collect();
    graph.node = order.into_iter().filter_map(|i| slots[i].take()).collect();
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Small graph builders for the passes' unit tests.
    use super::*;

    pub fn op(name: &str, op: &str, inputs: &[&str]) -> NodeDef {
        f32_op(name, op, inputs.iter().map(|s| s.to_string()).collect())
    }

    pub fn konst(name: &str, shape: &[usize], values: Vec<f32>) -> NodeDef {
        const_node(name, &HostTensor::f32(shape.to_vec(), values))
    }

    pub fn placeholder(name: &str, shape: &[i64]) -> NodeDef {
        let mut n = NodeDef {
            name: name.into(),
            op: "Placeholder".into(),
            ..Default::default()
        };
        set_attr(&mut n, "dtype", attr_value::Value::Type(DataType::DtFloat as i32));
        let shape = edge_proto::tensorflow::TensorShapeProto {
            dim: shape
                .iter()
                .map(|&size| edge_proto::tensorflow::tensor_shape_proto::Dim {
                    size,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        };
        set_attr(&mut n, "shape", attr_value::Value::Shape(shape));
        n
    }

    /// A SignatureDef entry naming `name` (`node:0`).
    pub fn tensor_info(name: &str, dtype: DataType) -> TensorInfo {
        TensorInfo {
            encoding: Some(tensor_info::Encoding::Name(name.into())),
            dtype: dtype as i32,
            ..Default::default()
        }
    }

    pub fn graph(nodes: Vec<NodeDef>) -> GraphDef {
        GraphDef {
            node: nodes,
            ..Default::default()
        }
    }

    pub fn node<'a>(g: &'a GraphDef, name: &str) -> &'a NodeDef {
        g.node
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Runs `g` (single float input, single sink output) through tract-tensorflow.
    pub fn run_tract(g: &GraphDef, shape: &[usize], input: &[f32]) -> Vec<f32> {
        use tract_tensorflow::prelude::*;
        let bytes = crate::tf::encode_for_tract(g);
        let mut model = tract_tensorflow::tensorflow()
            .model_for_read(&mut bytes.as_slice())
            .expect("tract reads the graph");
        model
            .set_input_fact(0, f32::fact(shape).into())
            .expect("input fact");
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .expect("tract optimises the graph");
        let x = tract_ndarray::ArrayD::from_shape_vec(shape, input.to_vec()).expect("input shape");
        let out = plan
            .run(tvec!(Tensor::from(x).into()))
            .expect("tract runs the graph");
        out[0]
            .to_plain_array_view::<f32>()
            .expect("f32 output")
            .iter()
            .copied()
            .collect()
    }

    pub fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        let diff = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-5, "max abs diff {diff}: got {got:?}, want {want:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    #[test]
    fn tensor_names_parse_with_and_without_index() {
        assert_eq!(TensorRef::parse("a/b"), Some(TensorRef::new("a/b", 0)));
        assert_eq!(TensorRef::parse("a/b:2"), Some(TensorRef::new("a/b", 2)));
        assert_eq!(TensorRef::parse("^a"), None);
        assert_eq!(TensorRef::parse_user("x:0").to_input(), "x");
        assert_eq!(TensorRef::new("x", 1).to_input(), "x:1");
    }

    #[test]
    fn prune_keeps_only_what_the_output_needs_in_topological_order() {
        let mut g = graph(vec![
            op("out", "Relu", &["mid", "^noise"]),
            op("noise", "Relu", &["x"]),
            op("mid", "Relu", &["x"]),
            placeholder("x", &[1]),
        ]);
        prune(&mut g, &["out"]).unwrap();
        let names: Vec<_> = g.node.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["x", "mid", "out"]);
        assert_eq!(node(&g, "out").input, ["mid"]);
    }

    #[test]
    fn cycles_and_dangling_inputs_are_errors_naming_the_node() {
        let mut g = graph(vec![op("a", "Merge", &["b"]), op("b", "NextIteration", &["a"])]);
        assert!(prune(&mut g, &["a"]).unwrap_err().to_string().contains("cycle"));
        let mut g = graph(vec![op("a", "Relu", &["ghost"])]);
        assert!(prune(&mut g, &["a"]).unwrap_err().to_string().contains("ghost"));
    }
}
