//! Graph rewrites that feed tract its fast paths (issue 20), applied to the decluttered model
//! before it is serialised; the converter's verify step then compares the bundle with the
//! source model, as for every bundle.
//!
//! # Average pools after the 1x1 convolution that follows them
//!
//! Every pool branch of Inception is `avg_pool 3x3 stride 1 SAME -> conv 1x1 (C -> O)`, with
//! O much smaller than C (192 -> 32, 768 -> 192, 2048 -> 192). Both are linear and act on
//! different axes: an average pool is, at each output position, a weighted sum of input
//! positions with the same weights for every channel; a 1x1 convolution without its bias is,
//! at each position, the same matrix applied to the channels. So they commute exactly (up to
//! float rounding), and the pool can run on O channels instead of C. The bias stays after
//! both (tract keeps it as a separate `Add` after the matrix product).
//!
//! Decluttered, the 1x1 convolution is an `EinSum` of the pooled tensor with a constant
//! [O, C] matrix. The rewrite applies when: the pool is an average (`SumPool` normalised)
//! whose output feeds only that `EinSum`, as one of its two operands; the `EinSum` is a plain
//! float product with a constant other operand that contracts exactly the pool's channel
//! axis and keeps every other axis of the pooled tensor in place; the pool keeps the spatial
//! size (so the product does not grow) and the channels shrink.

use tract_core::internal::*;
use tract_core::ops::cnn::SumPool;
use tract_core::ops::einsum::EinSum;

/// Moves every average pool after the 1x1 convolution that follows it, where that is exact
/// and cheaper (see the module doc). Returns how many were moved.
pub fn pools_after_pointwise_convs(model: &mut TypedModel) -> TractResult<usize> {
    let mut moved = 0;
    // One rewrite per pass: each patch changes node ids.
    while let Some(patch) = next_pool_move(model)? {
        patch.apply(model)?;
        model.compact()?;
        moved += 1;
    }
    Ok(moved)
}

/// A patch moving the first eligible pool, or `None`.
fn next_pool_move(model: &TypedModel) -> TractResult<Option<TypedModelPatch>> {
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(pool) = node.op_as::<SumPool>() else {
            continue;
        };
        if let Some(patch) = move_pool(model, node, pool)? {
            return Ok(Some(patch));
        }
    }
    Ok(None)
}

fn move_pool(
    model: &TypedModel,
    pool_node: &TypedNode,
    pool: &SumPool,
) -> TractResult<Option<TypedModelPatch>> {
    if !pool.normalize || pool_node.outputs.len() != 1 {
        return Ok(None);
    }
    let pooled = OutletId::new(pool_node.id, 0);
    let successors = model.outlet_successors(pooled);
    if successors.len() != 1 || successors[0].slot > 1 || model.output_outlets()?.contains(&pooled) {
        return Ok(None);
    }
    // The pooled tensor is one operand of the product (tract may order them either way), the
    // constant matrix the other.
    let (data, matrix) = (successors[0].slot, 1 - successors[0].slot);
    let product_node = model.node(successors[0].node);
    let Some(product) = product_node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if product.q_params.is_some() || product_node.inputs.len() != 2 {
        return Ok(None);
    }
    let weights = model.outlet_fact(product_node.inputs[matrix])?;
    if weights.konst.is_none() {
        return Ok(None);
    }
    let input = model.outlet_fact(pool_node.inputs[0])?;
    let output = model.outlet_fact(pooled)?;
    if input.datum_type != f32::datum_type() || input.shape != output.shape {
        return Ok(None); // the pool changes the spatial size: the product would grow
    }
    let shape = pool.pool_spec.data_format.shape(input.shape.to_tvec())?;
    let c_axis = shape.c_axis();
    let rank = input.rank();
    // The product contracts the channel axis, and only it, of the pooled tensor, and keeps
    // every other axis where it was.
    let axes = &product.axes;
    if axes.rank(InOut::Out(0)) != rank {
        return Ok(None);
    }
    for position in 0..rank {
        let axis = axes.axis((InOut::In(data), position))?;
        let kept = axis.outputs[0].as_slice() == [position] && axis.inputs[data].len() == 1;
        let contracted =
            axis.outputs[0].is_empty() && axis.inputs[data].len() == 1 && axis.inputs[matrix].len() == 1;
        let ok = if position == c_axis {
            contracted
        } else {
            kept && axis.inputs[matrix].is_empty()
        };
        if !ok {
            return Ok(None);
        }
    }
    let product_out = model.outlet_fact(OutletId::new(product_node.id, 0))?;
    let channels_in = shape.c().to_usize()?;
    let channels_out = product_out.shape[c_axis].to_usize()?;
    if channels_out >= channels_in {
        return Ok(None);
    }

    let mut patch = TypedModelPatch::new("average pool after the 1x1 convolution");
    let mut operands = [
        patch.tap_model(model, product_node.inputs[0])?,
        patch.tap_model(model, product_node.inputs[1])?,
    ];
    operands[data] = patch.tap_model(model, pool_node.inputs[0])?;
    let mixed = patch.wire_node(&product_node.name, product.clone(), &operands)?[0];
    let mut moved = pool.clone();
    moved.pool_spec.input_channels = channels_out;
    moved.pool_spec.output_channels = channels_out;
    let pooled_after = patch.wire_node(&pool_node.name, moved, &[mixed])?[0];
    patch.shunt_outside(model, OutletId::new(product_node.id, 0), pooled_after)?;
    Ok(Some(patch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
    use tract_core::ops::nn::DataFormat;

    /// A KxK stride-1 NHWC window from `cin` to `cout` channels.
    fn nhwc(k: usize, padding: PaddingSpec, cin: usize, cout: usize) -> PoolSpec {
        PoolSpec {
            data_format: DataFormat::NHWC,
            kernel_shape: tvec!(k, k),
            padding,
            dilations: None,
            strides: None,
            input_channels: cin,
            output_channels: cout,
        }
    }

    /// x [1, 9, 9, C] -> average pool 3x3 s1 SAME -> 1x1 conv (C -> O, with bias), NHWC.
    fn pool_then_pointwise(c: usize, o: usize) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 9, 9, c]))?;
        let pool = SumPool {
            pool_spec: nhwc(3, PaddingSpec::SameUpper, c, c),
            count_include_pad: false,
            normalize: true,
        };
        let pooled = model.wire_node("pool", pool, &[x])?[0];
        // HWIO kernel, as TensorFlow exports it.
        let kernel: Vec<f32> = (0..c * o).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let kernel = model.add_const("kernel", tensor1(&kernel).into_shape(&[1, 1, c, o])?)?;
        let bias: Vec<f32> = (0..o).map(|i| i as f32 / 3.0 - 1.0).collect();
        let bias = model.add_const("bias", tensor1(&bias))?;
        let conv = Conv {
            pool_spec: nhwc(1, PaddingSpec::Valid, c, o),
            kernel_fmt: KernelFormat::HWIO,
            group: 1,
            q_params: None,
        };
        let y = model.wire_node("conv", conv, &[pooled, kernel, bias])?;
        model.select_output_outlets(&y)?;
        model.into_decluttered()
    }

    fn run(model: TypedModel, input: &Tensor) -> TractResult<Tensor> {
        let plan = model.into_optimized()?.into_runnable()?;
        Ok(plan.run(tvec!(input.clone().into()))?.remove(0).into_tensor())
    }

    fn input(c: usize) -> Tensor {
        let values: Vec<f32> = (0..81 * c).map(|i| ((i * 13 % 29) as f32 - 14.0) / 5.0).collect();
        tensor1(&values).into_shape(&[1, 9, 9, c]).expect("shape")
    }

    #[test]
    fn the_pool_moves_after_a_narrowing_pointwise_conv_and_the_outputs_stay() -> TractResult<()> {
        let (c, o) = (24, 6);
        let before = pool_then_pointwise(c, o)?;
        let mut after = before.clone();
        assert_eq!(pools_after_pointwise_convs(&mut after)?, 1);
        // The pool now runs on the narrow side: its input is the product's output.
        let pool = after
            .nodes()
            .iter()
            .find(|n| n.op_is::<SumPool>())
            .expect("the pool is still there");
        let pool_input = after.outlet_fact(pool.inputs[0])?;
        assert_eq!(
            pool_input.shape.to_tvec(),
            tvec!(1.to_dim(), 9.to_dim(), 9.to_dim(), o.to_dim())
        );
        let producer = after.node(pool.inputs[0].node);
        assert!(producer.op_is::<EinSum>(), "fed by {}", producer.op().name());

        let x = input(c);
        let (expected, got) = (run(before, &x)?, run(after, &x)?);
        assert_eq!(expected.shape(), got.shape());
        let worst = expected
            .to_plain_array_view::<f32>()?
            .iter()
            .zip(got.to_plain_array_view::<f32>()?.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "max abs diff {worst}");
        Ok(())
    }

    #[test]
    fn a_widening_pointwise_conv_keeps_the_pool_first() -> TractResult<()> {
        let mut model = pool_then_pointwise(4, 16)?;
        assert_eq!(pools_after_pointwise_convs(&mut model)?, 0);
        Ok(())
    }

    #[test]
    fn a_pool_feeding_two_nodes_stays() -> TractResult<()> {
        let mut model = pool_then_pointwise(24, 6)?;
        let pool = model
            .nodes()
            .iter()
            .find(|n| n.op_is::<SumPool>())
            .map(|n| OutletId::new(n.id, 0))
            .expect("a pool");
        let mut outputs = model.output_outlets()?.to_vec();
        outputs.push(pool);
        model.select_output_outlets(&outputs)?;
        assert_eq!(pools_after_pointwise_convs(&mut model)?, 0);
        Ok(())
    }
}
