//! Freezing: builds one flat GraphDef holding exactly what the requested outputs need.
//!
//! Starting from the outputs, each needed node of the top-level graph is copied; calls into
//! the function library (`StatefulPartitionedCall`, `PartitionedCall`, or a function used as
//! an op) are inlined, recursively, under the call's name; variables become `Const` nodes with
//! their checkpoint values (`VariableV2` directly, resource variables where a `ReadVariableOp`
//! reads them); `Identity`-like nodes are bypassed; control inputs are dropped (an inference
//! graph's control edges only order asserts and variable reads).
//!
//! Function bodies name tensors `node:output_arg:index`; these become flat output indices via
//! the op's `OpDef` (the SavedModel's stripped op list, or a small table of common ops).

use std::collections::{HashMap, HashSet};

use edge_proto::tensorflow::{FunctionDef, GraphDef, NodeDef, OpDef, attr_value};

use super::TfError;
use super::error::EXPORT_HINT;
use super::graph::{TensorRef, attr, const_node, fresh_name};
use super::tensor::HostTensor;

/// What a tensor is while freezing: a tensor of the output graph, or a resource handle to a
/// checkpointed variable (identified by its checkpoint key).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Tensor(TensorRef),
    Variable { key: String, node: String },
}

/// Where variable values come from.
pub(crate) trait VariableSource {
    /// Checkpoint key of the variable created by top-level node `node` (a `VarHandleOp` or
    /// `VariableV2`), or `None` if it is not a variable this source knows.
    fn key_for(&self, node: &NodeDef) -> Option<String>;
    fn read(&self, key: &str, node: &str) -> Result<HostTensor, TfError>;
}

/// No checkpoint (a frozen GraphDef): any variable is an error.
pub(crate) struct NoVariables;

impl VariableSource for NoVariables {
    fn key_for(&self, _: &NodeDef) -> Option<String> {
        None
    }
    fn read(&self, key: &str, node: &str) -> Result<HostTensor, TfError> {
        Err(TfError::graph(
            node,
            format!("reads variable {key:?} but the model has no checkpoint"),
        ))
    }
}

const CALL_OPS: &[&str] = &["StatefulPartitionedCall", "PartitionedCall"];
const PASS_THROUGH: &[&str] = &[
    "Identity",
    "IdentityN",
    "StopGradient",
    "Snapshot",
    "PreventGradient",
];
const TF2_CONTROL_FLOW: &[&str] = &[
    "While",
    "StatelessWhile",
    "If",
    "StatelessIf",
    "Case",
    "StatelessCase",
];
const TF1_CONTROL_FLOW: &[&str] = &["Enter", "Exit", "Merge", "Switch", "NextIteration", "LoopCond"];

/// Output args of common multi-output ops, for function bodies whose SavedModel has no OpDef.
const KNOWN_OUTPUTS: &[(&str, &[&str])] = &[
    (
        "FusedBatchNorm",
        &[
            "y",
            "batch_mean",
            "batch_variance",
            "reserve_space_1",
            "reserve_space_2",
        ],
    ),
    (
        "FusedBatchNormV2",
        &[
            "y",
            "batch_mean",
            "batch_variance",
            "reserve_space_1",
            "reserve_space_2",
        ],
    ),
    (
        "FusedBatchNormV3",
        &[
            "y",
            "batch_mean",
            "batch_variance",
            "reserve_space_1",
            "reserve_space_2",
            "reserve_space_3",
        ],
    ),
    ("TopKV2", &["values", "indices"]),
    ("Unique", &["y", "idx"]),
];

/// One function instance being inlined: its body, argument values and name prefix.
struct Scope<'a> {
    body: HashMap<&'a str, &'a NodeDef>,
    args: HashMap<&'a str, Value>,
    prefix: String,
    function: &'a str,
}

pub(crate) struct Freezer<'a> {
    graph: &'a GraphDef,
    top: HashMap<&'a str, &'a NodeDef>,
    library: HashMap<&'a str, &'a FunctionDef>,
    op_defs: HashMap<&'a str, &'a OpDef>,
    vars: &'a dyn VariableSource,
    out: Vec<NodeDef>,
    taken: HashSet<String>,
    /// (scope prefix, node name) -> outputs already materialised.
    done: HashMap<(String, String), Outputs>,
    /// Function names already inlined, for the notes.
    pub inlined: Vec<String>,
    pub variables_frozen: usize,
}

#[derive(Debug, Clone)]
enum Outputs {
    /// A node of the output graph: output `i` is `name:i`.
    Node(String),
    /// Computed per output (bypassed identities, inlined calls, resources).
    List(Vec<Value>),
}

impl<'a> Freezer<'a> {
    pub fn new(graph: &'a GraphDef, op_defs: &'a [OpDef], vars: &'a dyn VariableSource) -> Self {
        let library = graph.library.iter().flat_map(|l| &l.function);
        let library = library
            .filter_map(|f| Some((f.signature.as_ref()?.name.as_str(), f)))
            .collect();
        Freezer {
            graph,
            top: graph.node.iter().map(|n| (n.name.as_str(), n)).collect(),
            library,
            op_defs: op_defs.iter().map(|o| (o.name.as_str(), o)).collect(),
            vars,
            out: Vec::new(),
            taken: graph.node.iter().map(|n| n.name.clone()).collect(),
            done: HashMap::new(),
            inlined: Vec::new(),
            variables_frozen: 0,
        }
    }

    /// The value of top-level tensor `t`, materialising everything it needs.
    pub fn tensor(&mut self, t: &TensorRef) -> Result<TensorRef, TfError> {
        match self.value(None, &t.node, t.index)? {
            Value::Tensor(t) => Ok(t),
            Value::Variable { node, .. } => Err(TfError::graph(
                node,
                "the output is a variable handle, not a tensor",
            )),
        }
    }

    /// The frozen graph (nodes in dependency order), with `versions` of the source.
    pub fn finish(self) -> GraphDef {
        GraphDef {
            node: self.out,
            versions: self.graph.versions.clone(),
            ..Default::default()
        }
    }

    /// Output `index` of node `name` in `scope` (top level when `None`). Materialises the
    /// node's needed ancestors first, depth-first with an explicit stack (deep networks would
    /// overflow a recursive walk).
    fn value(&mut self, scope: Option<&Scope<'a>>, name: &str, index: usize) -> Result<Value, TfError> {
        let prefix = scope.map_or("", |s| s.prefix.as_str()).to_string();
        let mut stack = vec![(name.to_string(), false)];
        let mut visiting = HashSet::new();
        while let Some((n, expanded)) = stack.pop() {
            if self.done.contains_key(&(prefix.clone(), n.clone()))
                || scope.is_some_and(|s| s.args.contains_key(n.as_str()))
            {
                continue;
            }
            let node = self.lookup(scope, &n)?;
            if expanded {
                let outputs = self.materialise(scope, node)?;
                self.done.insert((prefix.clone(), n), outputs);
                continue;
            }
            if !visiting.insert(n.clone()) {
                // An ancestor of itself: a TensorFlow 1 loop on the path to the output.
                return Err(TfError::Unsupported {
                    flavour: format!(
                        "the network has a loop through node {:?} (TensorFlow 1 control flow)",
                        format!("{prefix}{n}")
                    ),
                    hint: EXPORT_HINT.into(),
                });
            }
            stack.push((n, true));
            if node.op == "Const" || node.op == "Placeholder" {
                continue;
            }
            for input in node.input.iter().filter(|i| !i.starts_with('^')) {
                let dep = input.split(':').next().unwrap_or(input).to_string();
                if !self.done.contains_key(&(prefix.clone(), dep.clone())) {
                    stack.push((dep, false));
                }
            }
        }
        self.output_of(scope, name, index)
    }

    fn lookup(&self, scope: Option<&Scope<'a>>, name: &str) -> Result<&'a NodeDef, TfError> {
        let found = match scope {
            Some(s) => s.body.get(name).copied(),
            None => self.top.get(name).copied(),
        };
        found.ok_or_else(|| match scope {
            Some(s) => TfError::graph(name, format!("not found in function {:?}", s.function)),
            None => TfError::graph(name, "input names no node in the graph"),
        })
    }

    fn output_of(&self, scope: Option<&Scope<'a>>, name: &str, index: usize) -> Result<Value, TfError> {
        if let Some(v) = scope.and_then(|s| s.args.get(name)) {
            return Ok(v.clone());
        }
        let prefix = scope.map_or("", |s| s.prefix.as_str()).to_string();
        match self.done.get(&(prefix, name.to_string())) {
            Some(Outputs::Node(n)) => Ok(Value::Tensor(TensorRef::new(n.clone(), index))),
            Some(Outputs::List(values)) => values
                .get(index)
                .cloned()
                .ok_or_else(|| TfError::graph(name, format!("has no output {index}"))),
            None => Err(TfError::graph(name, "used before it was frozen (cycle?)")),
        }
    }

    /// Value of a data input string of a node in `scope`.
    fn input_value(
        &self,
        scope: Option<&Scope<'a>>,
        consumer: &NodeDef,
        input: &str,
    ) -> Result<Value, TfError> {
        let Some(s) = scope else {
            let t = TensorRef::parse(input).ok_or_else(|| TfError::graph(&consumer.name, "control input"))?;
            return self.output_of(None, &t.node, t.index);
        };
        let parts: Vec<&str> = input.split(':').collect();
        match parts.as_slice() {
            [arg] => self.output_of(scope, arg, 0),
            [node, arg, idx] => {
                let idx: usize = idx
                    .parse()
                    .map_err(|_| TfError::graph(&consumer.name, format!("bad input {input:?}")))?;
                let producer = self.lookup(scope, node)?;
                let flat = self.flat_index(s, producer, arg, idx)?;
                self.output_of(scope, node, flat)
            }
            _ => Err(TfError::graph(
                &consumer.name,
                format!("bad function-body input {input:?}"),
            )),
        }
    }

    /// Flat output index of `node:arg:idx` in a function body.
    fn flat_index(&self, s: &Scope<'a>, node: &NodeDef, arg: &str, idx: usize) -> Result<usize, TfError> {
        if CALL_OPS.contains(&node.op.as_str()) {
            return Ok(idx); // single list output "output"
        }
        if let Some(f) = self.library.get(node.op.as_str()) {
            let args = f
                .signature
                .as_ref()
                .map(|s| s.output_arg.as_slice())
                .unwrap_or_default();
            if let Some(pos) = args.iter().position(|a| a.name == arg) {
                return Ok(pos + idx);
            }
        }
        if let Some(def) = self.op_defs.get(node.op.as_str()) {
            let mut offset = 0;
            for a in &def.output_arg {
                if a.name == arg {
                    return Ok(offset + idx);
                }
                offset += if !a.number_attr.is_empty() {
                    super::graph::attr_i(node, &a.number_attr).unwrap_or(1).max(0) as usize
                } else if !a.type_list_attr.is_empty() {
                    match attr(node, &a.type_list_attr) {
                        Some(attr_value::Value::List(l)) => l.r#type.len(),
                        _ => 1,
                    }
                } else {
                    1
                };
            }
        } else if let Some((_, args)) = KNOWN_OUTPUTS.iter().find(|(op, _)| *op == node.op) {
            if let Some(pos) = args.iter().position(|a| *a == arg) {
                return Ok(pos + idx);
            }
        } else if idx == 0 || arg == "output" {
            // Without an OpDef, assume the usual single output arg.
            return Ok(idx);
        }
        Err(TfError::graph(
            format!("{}{}", s.prefix, node.name),
            format!(
                "cannot tell which output of op {} is {arg:?} (no OpDef in the SavedModel)",
                node.op
            ),
        ))
    }

    fn materialise(&mut self, scope: Option<&Scope<'a>>, node: &'a NodeDef) -> Result<Outputs, TfError> {
        let prefix = scope.map_or("", |s| s.prefix.as_str());
        let full_name = format!("{prefix}{}", node.name);
        let op = node.op.as_str();
        let inputs: Vec<&str> = node
            .input
            .iter()
            .map(String::as_str)
            .filter(|i| !i.starts_with('^'))
            .collect();
        if TF2_CONTROL_FLOW.contains(&op) || TF1_CONTROL_FLOW.contains(&op) {
            let kind = if TF2_CONTROL_FLOW.contains(&op) {
                "TensorFlow 2"
            } else {
                "TensorFlow 1"
            };
            return Err(TfError::Unsupported {
                flavour: format!("the network uses {kind} control flow ({op} node {full_name:?})"),
                hint: EXPORT_HINT.into(),
            });
        }
        if PASS_THROUGH.contains(&op) {
            let values = inputs
                .iter()
                .map(|i| self.input_value(scope, node, i))
                .collect::<Result<_, _>>()?;
            return Ok(Outputs::List(values));
        }
        if scope.is_none() && matches!(op, "VarHandleOp" | "VariableV2" | "Variable") {
            let key = self.vars.key_for(node).ok_or_else(|| {
                TfError::graph(
                    &node.name,
                    format!("{op} that is not in the checkpoint (no variable key found)"),
                )
            })?;
            if op == "VarHandleOp" {
                return Ok(Outputs::List(vec![Value::Variable {
                    key,
                    node: node.name.clone(),
                }]));
            }
            // A reference variable's output is its value.
            return self.emit_variable(&full_name, &key);
        }
        if op == "ReadVariableOp" {
            return match inputs
                .first()
                .map(|i| self.input_value(scope, node, i))
                .transpose()?
            {
                Some(Value::Variable { key, .. }) => self.emit_variable(&full_name, &key),
                _ => Err(TfError::graph(
                    &full_name,
                    "ReadVariableOp of something that is not a checkpointed variable",
                )),
            };
        }
        let callee = if CALL_OPS.contains(&op) {
            match attr(node, "f") {
                Some(attr_value::Value::Func(f)) => Some(f.name.as_str()),
                _ => return Err(TfError::graph(&full_name, format!("{op} without a function"))),
            }
        } else {
            self.library.contains_key(op).then_some(op)
        };
        if let Some(callee) = callee {
            let args = inputs
                .iter()
                .map(|i| self.input_value(scope, node, i))
                .collect::<Result<Vec<_>, _>>()?;
            return self.inline(callee, args, &full_name).map(Outputs::List);
        }
        let mut copy = node.clone();
        copy.name = if scope.is_some() {
            fresh_name(&mut self.taken, &full_name)
        } else {
            node.name.clone()
        };
        copy.input.clear();
        for i in &inputs {
            match self.input_value(scope, node, i)? {
                Value::Tensor(t) => copy.input.push(t.to_input()),
                Value::Variable { key, .. } => {
                    return Err(TfError::Unsupported {
                        flavour: format!("op {op} (node {full_name:?}) uses variable {key:?} directly"),
                        hint: EXPORT_HINT.into(),
                    });
                }
            }
        }
        if copy
            .attr
            .values()
            .any(|a| matches!(a.value, Some(attr_value::Value::Placeholder(_))))
        {
            return Err(TfError::graph(
                &full_name,
                "attribute placeholders (polymorphic function) are not supported",
            ));
        }
        copy.attr.remove("_output_shapes");
        // SavedModels strip attributes equal to their default; tract needs them spelled out.
        if let Some(def) = self.op_defs.get(op) {
            for a in &def.attr {
                if let Some(default) = &a.default_value {
                    copy.attr.entry(a.name.clone()).or_insert_with(|| default.clone());
                }
            }
        }
        let name = copy.name.clone();
        self.out.push(copy);
        Ok(Outputs::Node(name))
    }

    fn emit_variable(&mut self, name: &str, key: &str) -> Result<Outputs, TfError> {
        let value = self.vars.read(key, name)?;
        let name = if self.top.contains_key(name) {
            name.to_string()
        } else {
            fresh_name(&mut self.taken, name)
        };
        self.out.push(const_node(&name, &value));
        self.variables_frozen += 1;
        Ok(Outputs::Node(name))
    }

    /// Inlines function `name` called with `args`; returns its outputs.
    fn inline(&mut self, name: &'a str, args: Vec<Value>, call: &str) -> Result<Vec<Value>, TfError> {
        let Some(&f) = self.library.get(name) else {
            return Err(TfError::graph(
                call,
                format!("calls function {name:?}, which is not in the graph's library"),
            ));
        };
        let Some(sig) = f.signature.as_ref() else {
            return Err(TfError::graph(
                call,
                format!("function {name:?} has no signature"),
            ));
        };
        if sig.input_arg.len() != args.len() {
            return Err(TfError::graph(
                call,
                format!(
                    "passes {} inputs to function {name:?}, which takes {}",
                    args.len(),
                    sig.input_arg.len()
                ),
            ));
        }
        if self.inlined.len() < 64 && !self.inlined.iter().any(|n| n == name) {
            self.inlined.push(name.to_string());
        }
        let scope = Scope {
            body: f.node_def.iter().map(|n| (n.name.as_str(), n)).collect(),
            args: sig.input_arg.iter().map(|a| a.name.as_str()).zip(args).collect(),
            prefix: format!("{call}/"),
            function: name,
        };
        let mut outputs = Vec::new();
        for out in &sig.output_arg {
            if !out.number_attr.is_empty() || !out.type_list_attr.is_empty() {
                return Err(TfError::graph(
                    call,
                    format!("function {name:?} has list output {:?}", out.name),
                ));
            }
            let ret = f.ret.get(&out.name).ok_or_else(|| {
                TfError::graph(
                    call,
                    format!("function {name:?} does not return its output {:?}", out.name),
                )
            })?;
            let producer = ret.split(':').next().unwrap_or(ret);
            if !scope.args.contains_key(producer) {
                self.value(Some(&scope), producer, 0)?;
            }
            let fake = NodeDef {
                name: format!("{call} (return {:?})", out.name),
                ..Default::default()
            };
            outputs.push(self.input_value(Some(&scope), &fake, ret)?);
        }
        Ok(outputs)
    }
}

/// Names of the ops a node needs tract to know, with one node each, for error messages.
pub(crate) fn unsupported_ops(graph: &GraphDef) -> Vec<(String, String)> {
    let known = tract_tensorflow::tensorflow().op_register.0;
    let mut seen = HashSet::new();
    graph
        .node
        .iter()
        .filter(|n| !known.contains_key(&n.op) && seen.insert(n.op.clone()))
        .map(|n| (n.op.clone(), n.name.clone()))
        .collect()
}
