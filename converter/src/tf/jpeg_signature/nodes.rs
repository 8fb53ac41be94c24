//! A read-only view of one node scope (the top-level graph, or one function body of its
//! library) for walking a JPEG signature backwards: producers by name, data inputs, traces
//! through identities and constant operands.

use std::collections::HashMap;

use edge_proto::tensorflow::{FunctionDef, GraphDef, NodeDef};

use super::super::graph::{TensorRef, const_value, data_inputs};
use super::super::tensor::Data;

pub(super) struct Nodes<'a> {
    by_name: HashMap<&'a str, &'a NodeDef>,
    /// The function whose body this is; `None` for the top-level graph.
    function: Option<&'a str>,
}

impl<'a> Nodes<'a> {
    pub fn graph(graph: &'a GraphDef) -> Self {
        Nodes {
            by_name: graph.node.iter().map(|n| (n.name.as_str(), n)).collect(),
            function: None,
        }
    }

    pub fn function(f: &'a FunctionDef, name: &'a str) -> Self {
        Nodes {
            by_name: f.node_def.iter().map(|n| (n.name.as_str(), n)).collect(),
            function: Some(name),
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &'a NodeDef> + '_ {
        self.by_name.values().copied()
    }

    /// Where these nodes live, for messages: `the graph` or `function "f"`.
    pub fn scope(&self) -> String {
        self.function
            .map_or_else(|| "the graph".to_string(), |f| format!("function {f:?}"))
    }

    pub fn get(&self, t: &TensorRef) -> Option<&'a NodeDef> {
        self.by_name.get(t.node.as_str()).copied()
    }

    /// A tensor name as `n`'s scope writes it. Function bodies name `node:out_arg:index` (read
    /// as output `index`: the walks only follow single-output-arg ops) or a bare argument.
    pub fn parse(&self, input: &str) -> Option<TensorRef> {
        if self.function.is_none() || input.starts_with('^') {
            return TensorRef::parse(input);
        }
        match input.split(':').collect::<Vec<_>>().as_slice() {
            [arg] => Some(TensorRef::new(*arg, 0)),
            [node, _, index] => Some(TensorRef::new(*node, index.parse().ok()?)),
            _ => None,
        }
    }

    pub fn inputs(&self, n: &NodeDef) -> Vec<TensorRef> {
        match self.function {
            None => data_inputs(n).collect(),
            Some(_) => n.input.iter().filter_map(|i| self.parse(i)).collect(),
        }
    }

    pub fn input(&self, n: &NodeDef, k: usize) -> Option<(TensorRef, &'a NodeDef)> {
        let t = self.inputs(n).into_iter().nth(k)?;
        let node = self.get(&t)?;
        Some((t, node))
    }

    /// Follows `Identity`/`Enter` (and for constants, `Cast`) producers back from `t`.
    pub fn trace(&self, t: &TensorRef, through_cast: bool) -> Option<(TensorRef, &'a NodeDef)> {
        let (mut t, mut n) = (t.clone(), self.get(t)?);
        for _ in 0..64 {
            let passes = matches!(n.op.as_str(), "Identity" | "Enter" | "StopGradient")
                || (through_cast && n.op == "Cast");
            if !passes {
                return Some((t, n));
            }
            (t, n) = self.input(n, 0)?;
        }
        None
    }

    /// A constant operand (through identities and casts) as f64 values.
    pub fn constant(&self, t: &TensorRef) -> Option<Vec<f64>> {
        let (_, n) = self.trace(t, true).filter(|(_, n)| n.op == "Const")?;
        let v = const_value(n).ok()?;
        Some(match v.data {
            Data::F32(v) => v.into_iter().map(f64::from).collect(),
            Data::F64(v) => v,
            Data::I32(v) => v.into_iter().map(f64::from).collect(),
            Data::I64(v) => v.into_iter().map(|x| x as f64).collect(),
            _ => return None,
        })
    }
}
