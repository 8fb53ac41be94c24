//! Where an inference spends its time: every node of the optimised plan timed on its own
//! (`SimpleState::run_plan_with_eval` around tract's own `plan::eval`), the median over
//! several runs, with tract's cost model (`op.cost()` multiply-adds) for GFLOP/s. Grouped by
//! operator kind and listed per node; `edge-convert profile` prints it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tract_core::internal::{Cost, TValue};
use tract_core::plan::{EvalContext, eval};
use tract_core::prelude::{IntoTValue, TypedModel, TypedRunnableModel, tvec};
use tract_linalg::multithread::Executor;

use super::{RuntimeError, Tensor, run_on};

/// One node of the plan: its median time over the runs and its cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeTime {
    pub id: usize,
    pub name: String,
    /// Operator kind (`OptMatMul`, `OptSumPool`, ...).
    pub op: String,
    /// Shape of the node's first output (e.g. `1,35,35,288,F32`).
    pub output: String,
    /// What the operator says of itself (e.g. `3x3 stride 1x1, 80->192 channels, channels
    /// first, Winograd F(2x2,3x3), ReLU`), empty when it says nothing.
    pub info: String,
    pub ms: f64,
    /// Time the plan spent between the previous node and this one (releasing the values no
    /// longer needed, gathering this node's inputs).
    pub before_ms: f64,
    /// Share of the summed node times.
    pub share: f64,
    /// Multiply-adds in tract's cost model (0 for data movement).
    pub multiply_adds: u64,
    /// `2 * multiply_adds / time`, 0 when the node does no multiply-adds.
    pub gflops: f64,
}

/// Every node of one operator kind.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpTime {
    pub op: String,
    pub nodes: usize,
    pub ms: f64,
    pub share: f64,
    pub multiply_adds: u64,
    pub gflops: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Profile {
    pub runs: usize,
    /// Median wall time of a whole timed inference (includes the timing's own overhead).
    pub total_ms: f64,
    /// Sum of the per-node medians.
    pub nodes_ms: f64,
    pub multiply_adds: u64,
    /// By time spent, slowest kind first.
    pub ops: Vec<OpTime>,
    /// In plan order.
    pub nodes: Vec<NodeTime>,
}

impl Profile {
    /// The `n` slowest nodes, slowest first.
    pub fn top_nodes(&self, n: usize) -> Vec<&NodeTime> {
        let mut nodes: Vec<&NodeTime> = self.nodes.iter().collect();
        nodes.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.id.cmp(&b.id)));
        nodes.truncate(n);
        nodes
    }
}

/// Runs `plan` on `input` `runs` times (after one warm-up run) on `executor`, timing every node.
pub(super) fn profile(
    plan: &std::sync::Arc<TypedRunnableModel>,
    executor: Executor,
    input: &Tensor,
    runs: usize,
) -> Result<Profile, RuntimeError> {
    let failed = |e: tract_core::prelude::TractError| RuntimeError::Inference(format!("{e:#}"));
    let model = plan.model();
    let runs = runs.max(1);
    // per_node[id][run]
    let mut per_node: Vec<Vec<f64>> = vec![Vec::with_capacity(runs); model.nodes.len()];
    let mut gaps: Vec<Vec<f64>> = vec![Vec::with_capacity(runs); model.nodes.len()];
    let mut totals = Vec::with_capacity(runs);
    for run in 0..=runs {
        // As `Classifier::infer` runs (`run_on`), with every node timed.
        let (times, before, elapsed) = run_on(&executor, || {
            let mut state = plan.spawn().map_err(failed)?;
            let mut times = vec![Duration::ZERO; model.nodes.len()];
            let mut before = vec![Duration::ZERO; model.nodes.len()];
            let start = Instant::now();
            let mut last = start;
            state
                .run_plan_with_eval(
                    tvec![input.clone().into_tvalue()],
                    |ctx: &EvalContext, op_state, node, inputs: tract_core::prelude::TVec<TValue>| {
                        let start = Instant::now();
                        before[node.id] += start - last;
                        let out = eval(ctx, op_state, node, inputs);
                        last = Instant::now();
                        times[node.id] += last - start;
                        out
                    },
                )
                .map_err(failed)?;
            Ok::<_, RuntimeError>((times, before, start.elapsed()))
        })?;
        // Run 0 warms caches and allocations up and is not counted.
        if run > 0 {
            totals.push(elapsed.as_secs_f64() * 1e3);
            for (id, t) in times.iter().enumerate() {
                per_node[id].push(t.as_secs_f64() * 1e3);
                gaps[id].push(before[id].as_secs_f64() * 1e3);
            }
        }
    }
    let costs = multiply_adds(model)?;
    let mut nodes = Vec::new();
    for &id in plan_order(model).iter() {
        let node = model.node(id);
        let op = node.op().name().to_string();
        let ms = median(&mut per_node[id]);
        let before_ms = median(&mut gaps[id]);
        // Sources and constants cost nothing unless the plan makes them.
        if (op == "Source" || op == "Const") && ms < 0.01 {
            continue;
        }
        let output = node
            .outputs
            .first()
            .map(|o| format!("{:?}", o.fact))
            .unwrap_or_default();
        let info = node.op().info().map(|i| i.join("; ")).unwrap_or_default();
        nodes.push(NodeTime {
            id,
            name: node.name.clone(),
            op,
            output,
            info,
            ms,
            before_ms,
            share: 0.0,
            multiply_adds: costs[id],
            gflops: gflops(costs[id], ms),
        });
    }
    let nodes_ms: f64 = nodes.iter().map(|n| n.ms).sum();
    let mut by_op: BTreeMap<String, OpTime> = BTreeMap::new();
    for n in &mut nodes {
        n.share = if nodes_ms > 0.0 { n.ms / nodes_ms } else { 0.0 };
        let e = by_op.entry(n.op.clone()).or_insert_with(|| OpTime {
            op: n.op.clone(),
            nodes: 0,
            ms: 0.0,
            share: 0.0,
            multiply_adds: 0,
            gflops: 0.0,
        });
        e.nodes += 1;
        e.ms += n.ms;
        e.share += n.share;
        e.multiply_adds += n.multiply_adds;
    }
    let mut ops: Vec<OpTime> = by_op.into_values().collect();
    for o in &mut ops {
        o.gflops = gflops(o.multiply_adds, o.ms);
    }
    ops.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.op.cmp(&b.op)));
    Ok(Profile {
        runs,
        total_ms: median(&mut totals),
        nodes_ms,
        multiply_adds: nodes.iter().map(|n| n.multiply_adds).sum(),
        ops,
        nodes,
    })
}

/// Multiply-adds of every node (indexed by node id) in tract's cost model.
fn multiply_adds(model: &TypedModel) -> Result<Vec<u64>, RuntimeError> {
    let failed = |e: tract_core::prelude::TractError| RuntimeError::Inference(format!("{e:#}"));
    let mut out = vec![0u64; model.nodes.len()];
    for node in model.nodes() {
        let facts = model.node_input_facts(node.id).map_err(failed)?;
        for (cost, count) in node.op.cost(&facts).map_err(failed)? {
            if let (Cost::FMA(_), Ok(n)) = (cost, count.to_i64()) {
                out[node.id] += u64::try_from(n).unwrap_or(0);
            }
        }
    }
    Ok(out)
}

/// Node ids in evaluation order.
fn plan_order(model: &TypedModel) -> Vec<usize> {
    model
        .eval_order()
        .unwrap_or_else(|_| (0..model.nodes.len()).collect())
}

fn gflops(multiply_adds: u64, ms: f64) -> f64 {
    if multiply_adds == 0 || ms <= 0.0 {
        0.0
    } else {
        2.0 * multiply_adds as f64 / (ms * 1e-3) / 1e9
    }
}

/// Median of a non-empty sample (0 for an empty one).
pub(crate) fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn gflops_from_multiply_adds() {
        // 1 G multiply-adds in 20 ms: 100 GFLOP/s.
        assert!((gflops(1_000_000_000, 20.0) - 100.0).abs() < 1e-9);
        assert_eq!(gflops(0, 20.0), 0.0);
    }
}
