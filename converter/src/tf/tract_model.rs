//! Hands a frozen graph to tract-tensorflow, working around a tract 0.23.9 optimiser bug.
//!
//! With the batch fixed to 1 before decluttering, tract's `ChangeAxes` pass removes the batch
//! axis from whole regions of the network (between einsums) and may then push an axis back
//! through a convolution's bias input, failing with "Bias should be scalar or a vector with
//! one value per output channel ... bias is 1,384" (seen on Inception V3's mixed10, in the raw
//! Keras graph and in the batch-norm-folded one alike). Decluttering with a symbolic batch
//! first folds every bias into its convolution; fixing the batch afterwards is then safe.

use tract_tensorflow::prelude::*;

use super::{TfError, TfGraph};

/// The decluttered tract model of `graph`, input `graph.input` fixed to the f32 `shape`
/// (batch first), output `graph.output`. Call `into_optimized()` on it to run it, or
/// serialise it (NNEF).
pub fn tract_model(graph: &TfGraph, shape: &[usize]) -> Result<TypedModel, TfError> {
    let err = |stage: &str, e: TractError| TfError::Tract {
        stage: stage.to_string(),
        reason: format!("{e:?}"),
    };
    let bytes = super::encode_for_tract(&graph.graph);
    let mut model = tract_tensorflow::tensorflow()
        .model_for_read(&mut bytes.as_slice())
        .map_err(|e| err("reading the graph", e))?;
    model
        .select_inputs_by_name([&graph.input])
        .map_err(|e| err("selecting the input", e))?;
    model
        .select_outputs_by_name([&graph.output])
        .map_err(|e| err("selecting the output", e))?;
    let (&batch, rest) = shape.split_first().ok_or_else(|| TfError::Tract {
        stage: "fixing the input shape".into(),
        reason: "empty input shape".into(),
    })?;
    let n = model.symbols.sym("N");
    let dims: Vec<TDim> = std::iter::once(n.to_dim())
        .chain(rest.iter().map(|d| d.to_dim()))
        .collect();
    model
        .set_input_fact(0, f32::fact(dims).into())
        .map_err(|e| err("setting the input fact", e))?;
    model
        .set_output_fact(0, InferenceFact::default())
        .map_err(|e| err("setting the output fact", e))?;
    let typed = model
        .into_typed()
        .and_then(|m| m.into_decluttered())
        .map_err(|e| err("decluttering with a symbolic batch", e))?;
    let mut values = std::collections::HashMap::new();
    values.insert(n, batch.to_dim());
    typed
        .set_symbols(&values)
        .and_then(|m| m.into_decluttered())
        .map_err(|e| err("fixing the batch size", e))
}
