//! [`EdgeMatMul`]: the f32 product of an activation with a constant weight matrix (what tract
//! makes of a 1x1 convolution or a dense layer: `EinSum` with one contracted axis), with an
//! optional bias and ReLU, on the `gemm` crate's matrix products.

use tract_core::internal::*;
use tract_core::ops::einsum::EinSum;

use super::panel::{self, Activations, Isa, Packed, Segment};
use super::{
    SendPtr, activate, const_f32, f32_tensor, for_each_block, for_each_part, matmul, signed, split, threads,
};

/// Sizes and element strides of the product `out (m x n) = data (m x k) * weights (k x n)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Layout {
    m: usize,
    n: usize,
    k: usize,
    /// (between rows, between columns) of each matrix.
    data: (usize, usize),
    weights: (usize, usize),
    out: (usize, usize),
    /// Position of the `n` axis in the output (where a bias varies).
    pub(super) n_axis: usize,
    output_shape: TVec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeMatMul {
    pub(super) layout: Layout,
    /// `k x n` of strides `layout.weights`, for `gemm::gemm`: when the product does not run
    /// on our micro-kernels (`packed`).
    pub(super) weights: Option<Arc<Tensor>>,
    /// The weights for our micro-kernels: channel-major when the output's rows are
    /// contiguous, in panels of [`panel::Isa::mr`] columns when its columns are.
    pub(super) packed: Option<Packed>,
    /// `[n]`, added to every row.
    pub(super) bias: Option<Arc<Tensor>>,
    pub(super) relu: bool,
    /// A last input of the output's shape is added to the product (before the bias and
    /// ReLU): the sum of products tract makes of a 1x1 convolution after a concat.
    pub(super) accumulate: bool,
    /// The depth of each data input (they come first, in this order): one, or the inputs of
    /// a concat the product runs over in place ([`EdgeMatMul::chained`]); `layout.k` is their
    /// sum.
    pub(super) depths: TVec<usize>,
}

impl EdgeMatMul {
    /// Our form of tract's `einsum` at `node` and the outlet of its activation, when it is a
    /// product we handle: two f32 inputs, one of them a constant matrix, one contracted axis,
    /// the activation's other axes flattening to rows in the same order in the output.
    pub(super) fn from_tract(
        model: &TypedModel,
        node: &TypedNode,
        einsum: &EinSum,
        isa: Option<Isa>,
    ) -> TractResult<Option<(EdgeMatMul, OutletId)>> {
        if einsum.q_params.is_some()
            || einsum.operating_dt != f32::datum_type()
            || node.inputs.len() != 2
            || node.outputs[0].fact.datum_type != f32::datum_type()
        {
            return Ok(None);
        }
        let (w_slot, weights) = match (
            const_f32(model, node.inputs[0])?,
            const_f32(model, node.inputs[1])?,
        ) {
            (None, Some(w)) => (1, w),
            (Some(w), None) => (0, w),
            _ => return Ok(None),
        };
        let d_slot = 1 - w_slot;
        let data_fact = model.outlet_fact(node.inputs[d_slot])?;
        let (Some(data_shape), Some(out_shape)) = (
            data_fact.shape.as_concrete(),
            node.outputs[0].fact.shape.as_concrete(),
        ) else {
            return Ok(None);
        };
        if data_fact.datum_type != f32::datum_type() || weights.rank() != 2 {
            return Ok(None);
        }
        let (data_shape, out_shape) = (data_shape.to_vec(), out_shape.to_vec());
        let w_shape = weights.shape().to_vec();
        let strides = |shape: &[usize]| -> Vec<usize> {
            let mut s = vec![1; shape.len()];
            for i in (0..shape.len().saturating_sub(1)).rev() {
                s[i] = s[i + 1] * shape[i + 1];
            }
            s
        };
        let (d_strides, w_strides, o_strides) =
            (strides(&data_shape), strides(&w_shape), strides(&out_shape));
        let mut k_axis = None;
        let mut n_axis = None;
        // Rows: (position in data, position in output) of axes longer than 1.
        let mut rows: Vec<(usize, usize, usize)> = Vec::new();
        for axis in einsum.axes.iter_all_axes() {
            let (d, w, o) = (&axis.inputs[d_slot], &axis.inputs[w_slot], &axis.outputs[0]);
            if d.len() > 1 || w.len() > 1 || o.len() > 1 {
                return Ok(None);
            }
            match (d.first(), w.first(), o.first()) {
                (Some(&d), Some(&w), None) if k_axis.is_none() => k_axis = Some((d, w)),
                (None, Some(&w), Some(&o)) if n_axis.is_none() => n_axis = Some((w, o)),
                (Some(&d), None, Some(&o)) => {
                    if data_shape[d] != out_shape[o] {
                        return Ok(None);
                    }
                    if data_shape[d] > 1 {
                        rows.push((d, o, data_shape[d]));
                    }
                }
                (Some(&d), None, None) if data_shape[d] == 1 => {}
                (None, None, Some(&o)) if out_shape[o] == 1 => {}
                _ => return Ok(None),
            }
        }
        let (Some((kd, kw)), Some((nw, no))) = (k_axis, n_axis) else {
            return Ok(None);
        };
        // The row axes, in data order, must be in the same order in the output and each one
        // must be the next one's length times its stride on both sides (they flatten).
        rows.sort();
        if rows.windows(2).any(|p| p[0].1 > p[1].1)
            || rows.windows(2).any(|p| {
                d_strides[p[0].0] != d_strides[p[1].0] * p[1].2
                    || o_strides[p[0].1] != o_strides[p[1].1] * p[1].2
            })
        {
            return Ok(None);
        }
        let m: usize = rows.iter().map(|r| r.2).product();
        let (data_rs, out_rs) = rows.last().map_or((1, 1), |r| (d_strides[r.0], o_strides[r.1]));
        let mut layout = Layout {
            m,
            n: w_shape[nw],
            k: data_shape[kd],
            data: (data_rs, d_strides[kd]),
            weights: (w_strides[kw], w_strides[nw]),
            out: (out_rs, o_strides[no]),
            n_axis: no,
            output_shape: out_shape.iter().copied().collect(),
        };
        if layout.k != w_shape[kw] || layout.n != out_shape[no] {
            return Ok(None);
        }
        // Fewer rows than a vector's lanes (a dense layer on one image) waste most of the
        // micro-kernels' lanes: `gemm` has a matrix-vector path for those.
        if let Some(isa) = isa.filter(|_| layout.m >= 16) {
            let width = match layout.shape() {
                Shape::PixelsByChannels => Some(0),
                Shape::ChannelsByPixels => Some(isa.mr),
                Shape::Other => None,
            };
            if let Some(width) = width {
                let w = weights.try_as_plain_ram()?;
                let packed = Packed::new(w.as_slice::<f32>()?, (layout.k, layout.n), layout.weights, width)?;
                let op = EdgeMatMul {
                    depths: tvec![layout.k],
                    layout,
                    weights: None,
                    packed: Some(packed),
                    bias: None,
                    relu: false,
                    accumulate: false,
                };
                return Ok(Some((op, node.inputs[d_slot])));
            }
        }
        // A column-major output makes `gemm` read the weights as its right-hand matrix, in
        // place when their rows are contiguous (else it packs a copy at every call): store
        // them `[n][k]` then.
        let weights = if layout.out.1 >= layout.out.0 && layout.weights.0 != 1 {
            let (k, n, (rs, cs)) = (layout.k, layout.n, layout.weights);
            let w = weights.try_as_plain_ram()?;
            let w = w.as_slice::<f32>()?;
            layout.weights = (1, k);
            // In blocks of 16 columns, as `reorder_kernel` does, for sequential reads.
            let t = f32_tensor(k * n, |out| {
                for block in (0..n).step_by(16) {
                    for i in 0..k {
                        for j in block..(block + 16).min(n) {
                            out[j * k + i] = w[i * rs + j * cs];
                        }
                    }
                }
            })?;
            Arc::new(t.into_shape(&[n, k])?)
        } else {
            weights
        };
        let op = EdgeMatMul {
            depths: tvec![layout.k],
            layout,
            weights: Some(weights),
            packed: None,
            bias: None,
            relu: false,
            accumulate: false,
        };
        Ok(Some((op, node.inputs[d_slot])))
    }

    /// Whether `next`, a product accumulated onto `self`'s output, can be one product with
    /// it ([`EdgeMatMul::chained`]): only products whose output's pixels are contiguous, the
    /// layout `pixels_by_channels` reads every input in (the same pixels, each input's
    /// channels `m` values apart), on our micro-kernels.
    pub(super) fn chains_into(&self, next: &EdgeMatMul) -> bool {
        let (a, b) = (&self.layout, &next.layout);
        let widths = (self.packed.as_ref(), next.packed.as_ref());
        next.accumulate
            && self.bias.is_none()
            && !self.relu
            && matches!(a.shape(), Shape::PixelsByChannels)
            && (a.m, a.n, a.data, a.out, a.n_axis, &a.output_shape)
                == (b.m, b.n, b.data, b.out, b.n_axis, &b.output_shape)
            && matches!(widths, (Some(pa), Some(pb)) if pa.width == 0 && pb.width == 0)
    }

    /// A chain of products, each accumulated onto the one before ([`Self::chains_into`]), as
    /// one product over all their data inputs (the weights stacked along the depth): the
    /// output written once instead of read and written again by each product.
    pub(super) fn chained(chain: &[&EdgeMatMul]) -> TractResult<EdgeMatMul> {
        let (Some(first), Some(last)) = (chain.first(), chain.last()) else {
            bail!("EdgeMatMul: an empty chain");
        };
        ensure!(
            chain.windows(2).all(|pair| pair[0].chains_into(pair[1])),
            "EdgeMatMul: products that do not chain"
        );
        let n = last.layout.n;
        let parts = chain
            .iter()
            .map(|op| {
                let packed = op
                    .packed
                    .as_ref()
                    .context("EdgeMatMul: a chained product without packed weights")?;
                Ok((packed.depth, packed.data.try_as_plain_ram()?))
            })
            .collect::<TractResult<Vec<_>>>()?;
        let depth: usize = parts.iter().map(|(k, _)| k).sum();
        let parts = parts
            .iter()
            .map(|(k, w)| {
                let w = w.as_slice::<f32>()?;
                ensure!(w.len() == n * k, "EdgeMatMul: packed weights");
                Ok((*k, w))
            })
            .collect::<TractResult<Vec<_>>>()?;
        // Channel-major: each channel's depth runs through the products in turn.
        let weights = f32_tensor(n * depth, |w| {
            for (ch, row) in w.chunks_exact_mut(depth.max(1)).enumerate() {
                let mut at = 0;
                for (k, part) in &parts {
                    row[at..at + k].copy_from_slice(&part[ch * k..][..*k]);
                    at += k;
                }
            }
        })?;
        let mut layout = last.layout.clone();
        layout.k = depth;
        Ok(EdgeMatMul {
            layout,
            weights: None,
            packed: Some(Packed::channel_major(weights, depth, n)?),
            bias: last.bias.clone(),
            relu: last.relu,
            accumulate: first.accumulate,
            depths: chain.iter().flat_map(|op| op.depths.iter().copied()).collect(),
        })
    }

    fn run(&self, xs: &[&[f32]], y: &mut [f32]) -> TractResult<()> {
        let l = &self.layout;
        let bias = self.bias.as_ref().map(|b| b.try_as_plain_ram()).transpose()?;
        let bias = bias.as_ref().map(|b| b.as_slice::<f32>()).transpose()?;
        if let (Some(packed), Some(isa)) = (&self.packed, panel::isa()) {
            return run_packed(self, isa, packed, xs, y, bias);
        }
        let [x] = xs else {
            bail!("EdgeMatMul over {} inputs without our micro-kernels", xs.len());
        };
        let weights = self.weights.as_ref().context("EdgeMatMul without weights")?;
        let weights = weights.try_as_plain_ram()?;
        let weights = weights.as_slice::<f32>()?;
        let by_rows = l.m >= l.n;
        let parts = if by_rows {
            split(l.m, threads(), 16)
        } else {
            split(l.n, threads(), 16)
        };
        let (x, w, y) = (
            SendPtr(x.as_ptr() as *mut f32),
            SendPtr(weights.as_ptr() as *mut f32),
            SendPtr(y.as_mut_ptr()),
        );
        for_each_part(parts.len(), |i| {
            let range = parts[i].clone();
            let (rows, cols) = if by_rows { (range, 0..l.n) } else { (0..l.m, range) };
            // SAFETY: the part's rows and columns are inside data, weights and output (the
            // layout was checked against their shapes), and parts write disjoint outputs.
            unsafe {
                let dst = y.get().add(rows.start * l.out.0 + cols.start * l.out.1);
                matmul(
                    (rows.len(), cols.len(), l.k),
                    dst,
                    signed(l.out),
                    self.accumulate,
                    x.get().add(rows.start * l.data.0),
                    signed(l.data),
                    w.get().add(cols.start * l.weights.1),
                    signed(l.weights),
                );
                if bias.is_some() || self.relu {
                    epilogue(dst, l.out, rows.len(), cols.clone(), bias, self.relu);
                }
            }
        });
        Ok(())
    }
}

widest! {
    /// [`EdgeMatMul::run`] on our micro-kernels, each tile written to `y` with the addend, bias
    /// and ReLU; compiled for the widest vector instructions of this CPU (see [`widest`]).
    fn run_packed(
        op: &EdgeMatMul,
        isa: Isa,
        packed: &Packed,
        xs: &[&[f32]],
        y: &mut [f32],
        bias: Option<&[f32]>,
    ) -> TractResult<()> {
        let l = &op.layout;
        let w = packed.data.try_as_plain_ram()?;
        let w = w.as_slice::<f32>()?;
        ensure!(
            xs.len() == 1 || matches!(l.shape(), Shape::PixelsByChannels),
            "EdgeMatMul: several inputs of another shape"
        );
        let segments: TVec<Segment> = xs
            .iter()
            .zip(&op.depths)
            .map(|(x, &len)| Segment {
                start: x.as_ptr(),
                len,
            })
            .collect();
        let act = Activations {
            segments: &segments,
            depth_stride: l.data.1,
            pixel_stride: l.data.0,
            grid: None,
        };
        let (relu, accumulate) = (op.relu, op.accumulate);
        let out = SendPtr(y.as_mut_ptr());
        // Writes `from` (+ the addend in `to`) + the bias (one value for the whole run, or one
        // per value), ReLU applied, to `to`: one loop per case, each vectorised (a bias behind
        // a `dyn Iterator` was a call per value once this function was compiled per ISA).
        let put_one = move |to: &mut [f32], from: &[f32], b: f32| match accumulate {
            true => (to.iter_mut().zip(from)).for_each(|(d, s)| *d = activate(*s + *d, b, relu)),
            false => (to.iter_mut().zip(from)).for_each(|(d, s)| *d = activate(*s, b, relu)),
        };
        let put_each = move |to: &mut [f32], from: &[f32], bias: &[f32]| match accumulate {
            true => {
                (to.iter_mut().zip(from).zip(bias)).for_each(|((d, s), b)| *d = activate(*s + *d, *b, relu))
            }
            false => (to.iter_mut().zip(from).zip(bias)).for_each(|((d, s), b)| *d = activate(*s, *b, relu)),
        };
        let zeros = vec![0f32; l.n];
        let bias = bias.unwrap_or(&zeros);
        match l.shape() {
            Shape::PixelsByChannels => {
                for_each_block((l.m, l.n), l.m >= l.n, (16, isa.nr), |rows, cols| {
                    // SAFETY: the layout was checked against the data's shape; parts write
                    // disjoint tiles.
                    unsafe {
                        panel::pixels_by_channels(isa, rows, cols, act, packed, w, |t| {
                            for (j, col) in t.cols.clone().enumerate() {
                                let from = &t.values[j * t.stride..][..t.rows.len()];
                                let to = out.get().add(col * l.out.1 + t.rows.start);
                                let to = std::slice::from_raw_parts_mut(to, t.rows.len());
                                put_one(to, from, bias[col]);
                            }
                        })
                    }
                });
            }
            Shape::ChannelsByPixels => {
                let by_pixels = l.m >= 4 * isa.nr * threads();
                for_each_block((l.m, l.n), by_pixels, (isa.nr, isa.mr), |pixels, channels| {
                    // SAFETY: as above.
                    unsafe {
                        panel::channels_by_pixels(isa, channels, pixels, act, packed, w, |t| {
                            for (j, p) in t.cols.clone().enumerate() {
                                let from = &t.values[j * t.stride..][..t.rows.len()];
                                let to = out.get().add(p * l.out.0 + t.rows.start);
                                let to = std::slice::from_raw_parts_mut(to, t.rows.len());
                                put_each(to, from, &bias[t.rows.clone()]);
                            }
                        })
                    }
                });
            }
            Shape::Other => bail!("EdgeMatMul: packed weights for a product of another shape"),
        }
        Ok(())
    }
}

/// How a product maps on our micro-kernels.
enum Shape {
    /// The output's rows contiguous, and the data's: the tiles' vectors run along rows.
    PixelsByChannels,
    /// The output's columns contiguous: the tiles' vectors run along columns, the data is
    /// broadcast in place.
    ChannelsByPixels,
    Other,
}

impl Layout {
    fn shape(&self) -> Shape {
        if self.out.0 == 1 && self.data.0 == 1 {
            Shape::PixelsByChannels
        } else if self.out.1 == 1 {
            Shape::ChannelsByPixels
        } else {
            Shape::Other
        }
    }
}

/// Adds the bias of each column and applies the ReLU to a `rows x cols` block at `dst`.
///
/// # Safety
/// The block must be inside one allocation that nothing else reads or writes meanwhile.
unsafe fn epilogue(
    dst: *mut f32,
    (rs, cs): (usize, usize),
    rows: usize,
    cols: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    relu: bool,
) {
    let apply = |v: f32, b: f32| activate(v, b, relu);
    let bias_of = |j: usize| bias.map_or(0.0, |b| b[j]);
    unsafe {
        if cs == 1 {
            let b: Vec<f32> = cols.clone().map(bias_of).collect();
            for i in 0..rows {
                let row = std::slice::from_raw_parts_mut(dst.add(i * rs), cols.len());
                row.iter_mut().zip(&b).for_each(|(v, b)| *v = apply(*v, *b));
            }
        } else if rs == 1 {
            for (j, col) in cols.clone().enumerate() {
                let b = bias_of(col);
                let column = std::slice::from_raw_parts_mut(dst.add(j * cs), rows);
                column.iter_mut().for_each(|v| *v = apply(*v, b));
            }
        } else {
            for i in 0..rows {
                for (j, col) in cols.clone().enumerate() {
                    let v = dst.add(i * rs + j * cs);
                    *v = apply(*v, bias_of(col));
                }
            }
        }
    }
}

impl Op for EdgeMatMul {
    fn name(&self) -> StaticName {
        "EdgeMatMul".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let l = &self.layout;
        let inputs = match self.depths.as_slice() {
            [_] => String::new(),
            depths => format!(
                " ({})",
                depths.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("+")
            ),
        };
        Ok(vec![format!(
            "m={} k={}{inputs} n={}{}{}{}",
            l.m,
            l.k,
            l.n,
            if self.accumulate { ", accumulated" } else { "" },
            if self.bias.is_some() { ", bias" } else { "" },
            if self.relu { ", ReLU" } else { "" },
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for EdgeMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let l = &self.layout;
        let data = self.depths.len();
        ensure!(
            inputs.len() == data + usize::from(self.accumulate),
            "EdgeMatMul inputs"
        );
        let mut output = if self.accumulate {
            // The addend becomes the output (moved when nothing else holds it).
            let addend = inputs.remove(data).into_tensor();
            ensure!(
                addend.shape() == l.output_shape.as_slice(),
                "EdgeMatMul addend shape"
            );
            addend
        } else {
            // SAFETY: the product writes every output value (read_dst is false).
            unsafe { Tensor::uninitialized::<f32>(&l.output_shape)? }
        };
        let views = inputs
            .iter()
            .map(|x| x.try_as_plain_ram())
            .collect::<TractResult<TVec<_>>>()?;
        let xs = views
            .iter()
            .map(|x| x.as_slice::<f32>())
            .collect::<TractResult<TVec<_>>>()?;
        for (x, depth) in xs.iter().zip(&self.depths) {
            ensure!(x.len() == l.m * depth, "EdgeMatMul input of {} values", x.len());
        }
        {
            let mut view = output.try_as_plain_ram_mut()?;
            self.run(&xs, view.as_slice_mut::<f32>()?)?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for EdgeMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == self.depths.len() + usize::from(self.accumulate));
        ensure!(inputs.iter().all(|i| i.datum_type == f32::datum_type()));
        Ok(tvec!(f32::fact(self.layout.output_shape.as_slice())))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let l = &self.layout;
        Ok(tvec!((Cost::FMA(f32::datum_type()), (l.m * l.n * l.k).to_dim())))
    }

    as_op!();
}
