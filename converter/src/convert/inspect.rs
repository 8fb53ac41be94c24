//! `edge-convert inspect`: what a model or bundle takes, gives and costs.

use std::collections::BTreeMap;
use std::path::Path;

use edge_runtime::bundle::{self, Manifest};
use tract_core::ops::{Cost, konst::Const};
use tract_onnx::prelude::*;

use super::{ConvertError, InputOverrides, source};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub kind: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// Operator name to node count, decluttered graph.
    pub ops: BTreeMap<String, usize>,
    pub parameters: u64,
    pub weight_bytes: u64,
    pub multiply_adds: u64,
    pub manifest: Option<Manifest>,
    pub notes: Vec<String>,
}

/// Inspects a bundle (manifest + stored model) or a source model (read, input fixed, decluttered).
pub fn inspect(path: &Path, overrides: &InputOverrides) -> Result<Report, ConvertError> {
    if bundle::read_manifest(path).is_ok() {
        let loaded = bundle::load(path, u64::MAX)?;
        let model = source::guard(|| loaded.model.into_decluttered()).map_err(ConvertError::Model)?;
        let mut report = report_for(&model, "edge bundle")?;
        report.manifest = Some(loaded.manifest);
        return Ok(report);
    }
    let source = source::load(path, overrides)?;
    let mut report = report_for(&source.model, &format!("{:?} source", source.format))?;
    report.notes = source.notes;
    Ok(report)
}

fn report_for(model: &TypedModel, kind: &str) -> Result<Report, ConvertError> {
    let err = |e: TractError| ConvertError::Model(format!("{e:#}"));
    let describe = |outlets: &[OutletId]| -> Result<Vec<String>, ConvertError> {
        outlets
            .iter()
            .map(|o| {
                Ok(format!(
                    "{} {:?}",
                    model.node(o.node).name,
                    model.outlet_fact(*o).map_err(err)?
                ))
            })
            .collect()
    };
    let mut ops = BTreeMap::new();
    let (mut parameters, mut weight_bytes, mut multiply_adds) = (0u64, 0u64, 0u64);
    for node in model.nodes() {
        if let Some(k) = node.op_as::<Const>() {
            let t = k.val();
            if t.len() > 1 {
                parameters += t.len() as u64;
                weight_bytes += (t.len() * t.datum_type().size_of()) as u64;
            }
            continue;
        }
        *ops.entry(node.op().name().to_string()).or_insert(0) += 1;
        let facts = model.node_input_facts(node.id).map_err(err)?;
        for (cost, count) in node.op.cost(&facts).map_err(err)? {
            if let (Cost::FMA(_), Ok(n)) = (cost, count.to_i64()) {
                multiply_adds += n as u64;
            }
        }
    }
    Ok(Report {
        kind: kind.to_string(),
        inputs: describe(&model.inputs)?,
        outputs: describe(&model.outputs)?,
        ops,
        parameters,
        weight_bytes,
        multiply_adds,
        manifest: None,
        notes: Vec::new(),
    })
}
