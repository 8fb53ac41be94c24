//! [`EdgePool`]: 2D max and average (or sum) pooling of f32 maps, channels first or last,
//! split over the threads; a channels-last input that tract moves to channels first just for
//! the pool (Inception V3's first max pool: a 5.5 MB transpose) is read as it is.

use tract_core::internal::*;
use tract_core::ops::cnn::{MaxPool, SumPool};
use tract_core::ops::nn::DataFormat;

use super::{Scratch, SendPtr, eval_images, for_each_part, split, threads};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Reduce {
    Max,
    /// The sum, divided by the window's size (padding counted or not) when `normalize`.
    Sum {
        normalize: bool,
        count_padding: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EdgePool {
    reduce: Reduce,
    /// Layout of the input and of the output.
    input_channels_last: bool,
    output_channels_last: bool,
    batch: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    /// Padding before: top, left.
    pad: [usize; 2],
    ho: usize,
    wo: usize,
    output_shape: TVec<usize>,
}

impl EdgePool {
    /// Our form of tract's max or sum pool at `node`, and the outlet it reads (before the
    /// axis move feeding it, when that move only serves the pool).
    pub(super) fn from_tract(
        model: &TypedModel,
        node: &TypedNode,
    ) -> TractResult<Option<(EdgePool, OutletId)>> {
        let (spec, reduce) = if let Some(max) = node.op_as::<MaxPool>() {
            if max.with_index_outputs.is_some() {
                return Ok(None);
            }
            (&max.pool_spec, Reduce::Max)
        } else if let Some(sum) = node.op_as::<SumPool>() {
            let reduce = Reduce::Sum {
                normalize: sum.normalize,
                count_padding: sum.count_include_pad,
            };
            (&sum.pool_spec, reduce)
        } else {
            return Ok(None);
        };
        let input = model.outlet_fact(node.inputs[0])?;
        if spec.kernel_shape.len() != 2
            || spec.dilations().iter().any(|d| *d != 1)
            || input.datum_type != f32::datum_type()
            || node.outputs.len() != 1
        {
            return Ok(None);
        }
        let (Some(shape), Some(out_shape)) = (
            input.shape.as_concrete(),
            node.outputs[0].fact.shape.as_concrete(),
        ) else {
            return Ok(None);
        };
        let data = spec.data_format.shape(shape.to_vec())?;
        let hw = data.hw_dims().to_vec();
        let padding = spec.computed_padding(&hw);
        let strides = spec.strides();
        let output_channels_last = spec.data_format.c_is_last();
        let mut pool = EdgePool {
            reduce,
            input_channels_last: output_channels_last,
            output_channels_last,
            batch: data.n().copied().unwrap_or(1),
            c: *data.c(),
            h: hw[0],
            w: hw[1],
            kh: spec.kernel_shape[0],
            kw: spec.kernel_shape[1],
            sh: strides[0],
            sw: strides[1],
            pad: [padding[0].pad_before, padding[1].pad_before],
            ho: padding[0].convoluted,
            wo: padding[1].convoluted,
            output_shape: out_shape.into(),
        };
        let expected = spec
            .data_format
            .from_n_c_hw(pool.batch, pool.c, [pool.ho, pool.wo].as_slice())?;
        if expected.shape.as_slice() != out_shape || pool.ho == 0 || pool.wo == 0 {
            return Ok(None);
        }
        // A move from channels last to channels first that only feeds this pool.
        let mut from = node.inputs[0];
        let producer = &model.nodes[from.node];
        let moved_to_first = matches!(
            (producer.op_as::<AxisOp>(), spec.data_format),
            (Some(AxisOp::Move(3, 1)), DataFormat::NCHW) | (Some(AxisOp::Move(2, 0)), DataFormat::CHW)
        );
        if moved_to_first && producer.outputs[0].successors.len() == 1 {
            pool.input_channels_last = true;
            from = producer.inputs[0];
        }
        Ok(Some((pool, from)))
    }

    /// One image.
    fn run(&self, x: &[f32], y: &mut [f32]) {
        let transpose = self.input_channels_last != self.output_channels_last;
        let mut scratch = Scratch::take(if transpose { y.len() } else { 0 });
        let out: &mut [f32] = if transpose { &mut scratch.0[..y.len()] } else { y };
        if self.input_channels_last {
            channels_last(self, x, out);
        } else {
            channels_first(self, x, out);
        }
        if transpose {
            // [ho * wo][c] -> [c][ho * wo].
            let pixels = self.ho * self.wo;
            for (p, values) in scratch.0[..y.len()].chunks_exact(self.c).enumerate() {
                for (ch, v) in values.iter().enumerate() {
                    y[ch * pixels + p] = *v;
                }
            }
        }
    }

    /// Rows `y0..y1` of the window of output row `yy` (clipped to the input), and the same for
    /// columns.
    #[inline(always)]
    fn window(&self, out: usize, stride: usize, pad: usize, k: usize, size: usize) -> (usize, usize) {
        let start = (out * stride) as isize - pad as isize;
        let from = start.max(0) as usize;
        let to = ((start + k as isize).max(0) as usize).min(size);
        (from, to.max(from))
    }

    #[inline(always)]
    fn finish(&self, value: f32, rows: usize, cols: usize) -> f32 {
        match self.reduce {
            Reduce::Max => value,
            Reduce::Sum { normalize: false, .. } => value,
            Reduce::Sum {
                count_padding: true, ..
            } => value / (self.kh * self.kw) as f32,
            Reduce::Sum { .. } => value / (rows * cols).max(1) as f32,
        }
    }

    #[inline(always)]
    fn init(&self) -> f32 {
        match self.reduce {
            Reduce::Max => f32::NEG_INFINITY,
            Reduce::Sum { .. } => 0.0,
        }
    }

    #[inline(always)]
    fn combine(&self, a: &mut [f32], b: &[f32]) {
        match self.reduce {
            Reduce::Max => a.iter_mut().zip(b).for_each(|(a, b)| *a = a.max(*b)),
            Reduce::Sum { .. } => a.iter_mut().zip(b).for_each(|(a, b)| *a += b),
        }
    }

    /// Whether every output pixel is the input pixel at the same place, its window around it
    /// (stride 1, output as large as the input: Inception V3's 3x3 average pools).
    fn same_size(&self) -> bool {
        self.sh == 1 && self.sw == 1 && self.ho == self.h && self.wo == self.w
    }
}

widest! {
    /// `x` `[h][w][c]`, `y` `[ho][wo][c]`: every output pixel reduces its window's channel
    /// vectors; output rows split over the threads.
    fn channels_last(pool: &EdgePool, x: &[f32], y: &mut [f32]) {
        let c = pool.c;
        let parts = split(pool.ho, threads(), 1);
        let (y_ptr, y_len) = (SendPtr(y.as_mut_ptr()), y.len());
        for_each_part(parts.len(), |part| {
            // SAFETY: parts write the disjoint output rows of their range.
            let y = unsafe { std::slice::from_raw_parts_mut(y_ptr.get(), y_len) };
            for yy in parts[part].clone() {
                let (r0, r1) = pool.window(yy, pool.sh, pool.pad[0], pool.kh, pool.h);
                for xx in 0..pool.wo {
                    let (c0, c1) = pool.window(xx, pool.sw, pool.pad[1], pool.kw, pool.w);
                    let out = &mut y[(yy * pool.wo + xx) * c..][..c];
                    out.fill(pool.init());
                    for r in r0..r1 {
                        for col in c0..c1 {
                            pool.combine(out, &x[(r * pool.w + col) * c..][..c]);
                        }
                    }
                    let (rows, cols) = (r1 - r0, c1 - c0);
                    out.iter_mut().for_each(|v| *v = pool.finish(*v, rows, cols));
                }
            }
        });
    }
}

widest! {
    /// [`EdgePool::channels_first`] for [`EdgePool::same_size`] pools: each plane reduced along its
    /// rows, then along its columns, each a few passes over the whole plane (one pass per
    /// kernel tap, over the flat `h * w` values: vectors even on 8x8 maps, where a loop per
    /// row ran 8 values at a time), then scaled by each pixel's count.
    fn same_size_channels_first(pool: &EdgePool, x: &[f32], y: &mut [f32]) {
        let (h, w) = (pool.h, pool.w);
        let hw = h * w;
        // Per kernel column: its offset along the row, and for each pixel whether that tap
        // falls inside the row.
        let taps: Vec<(isize, Vec<bool>)> = (0..pool.kw)
            .map(|kx| {
                let d = kx as isize - pool.pad[1] as isize;
                let inside = (0..hw)
                    .map(|p| {
                        let col = (p % w) as isize + d;
                        col >= 0 && (col as usize) < w
                    })
                    .collect();
                (d, inside)
            })
            .collect();
        // 1 / the window's size, per pixel (zero: no division).
        let scale: Vec<f32> = match pool.reduce {
            Reduce::Sum {
                normalize: true,
                count_padding,
            } => (0..hw)
                .map(|p| {
                    let (r, c) = (p / w, p % w);
                    let (r0, r1) = pool.window(r, 1, pool.pad[0], pool.kh, h);
                    let (c0, c1) = pool.window(c, 1, pool.pad[1], pool.kw, w);
                    let n = if count_padding {
                        pool.kh * pool.kw
                    } else {
                        (r1 - r0) * (c1 - c0)
                    };
                    1.0 / n.max(1) as f32
                })
                .collect(),
            _ => Vec::new(),
        };
        // The flat range of pixels `p` for which `p + d` is in the plane.
        // (Empty when the tap is off the plane for every pixel: a kernel larger than the map.)
        let range = |d: isize| {
            let end = (hw as isize - d).clamp(0, hw as isize) as usize;
            ((-d).max(0) as usize).min(end)..end
        };
        let parts = split(pool.c, threads(), 1);
        let (y_ptr, y_len) = (SendPtr(y.as_mut_ptr()), y.len());
        for_each_part(parts.len(), |part| {
            // SAFETY: parts write the disjoint channels of their range.
            let y = unsafe { std::slice::from_raw_parts_mut(y_ptr.get(), y_len) };
            let mut rows = Scratch::take(hw);
            let rows = &mut rows.0[..hw];
            for ch in parts[part].clone() {
                let plane = &x[ch * hw..][..hw];
                let out = &mut y[ch * hw..][..hw];
                rows.fill(pool.init());
                for (d, inside) in &taps {
                    let pixels = range(*d);
                    if pixels.is_empty() {
                        continue;
                    }
                    let from = &plane[(pixels.start as isize + d) as usize..][..pixels.len()];
                    let to = rows[pixels.clone()].iter_mut().zip(&inside[pixels]).zip(from);
                    match pool.reduce {
                        Reduce::Max => to.for_each(|((o, &i), &v)| *o = if i { o.max(v) } else { *o }),
                        Reduce::Sum { .. } => to.for_each(|((o, &i), &v)| *o += if i { v } else { 0.0 }),
                    }
                }
                out.fill(pool.init());
                for ky in 0..pool.kh {
                    let d = (ky as isize - pool.pad[0] as isize) * w as isize;
                    let pixels = range(d);
                    if pixels.is_empty() {
                        continue;
                    }
                    let from = &rows[(pixels.start as isize + d) as usize..][..pixels.len()];
                    pool.combine(&mut out[pixels], from);
                }
                if !scale.is_empty() {
                    out.iter_mut().zip(&scale).for_each(|(v, s)| *v *= s);
                }
            }
        });
    }
}

widest! {
    /// `x` `[c][h][w]`, `y` `[c][ho][wo]`: per output row, the window's rows reduced first
    /// (whole rows at once), then each output's columns; channels split over the threads.
    fn channels_first(pool: &EdgePool, x: &[f32], y: &mut [f32]) {
        if pool.same_size() {
            return same_size_channels_first(pool, x, y);
        }
        let parts = split(pool.c, threads(), 1);
        let (y_ptr, y_len) = (SendPtr(y.as_mut_ptr()), y.len());
        for_each_part(parts.len(), |part| {
            // SAFETY: parts write the disjoint channels of their range.
            let y = unsafe { std::slice::from_raw_parts_mut(y_ptr.get(), y_len) };
            let mut acc = vec![0f32; pool.w];
            // Per kernel column, the outputs whose window has it inside the input; per output,
            // its window's columns inside the input (padding counted or not).
            let columns: Vec<std::ops::Range<usize>> = (0..pool.kw)
                .map(|kx| {
                    let inside = |xx: &usize| {
                        let col = (xx * pool.sw + kx) as isize - pool.pad[1] as isize;
                        col >= 0 && (col as usize) < pool.w
                    };
                    let first = (0..pool.wo).find(inside).unwrap_or(pool.wo);
                    let end = (first..pool.wo).find(|xx| !inside(xx)).unwrap_or(pool.wo);
                    first..end
                })
                .collect();
            let counts: Vec<f32> = (0..pool.wo)
                .map(|xx| match pool.reduce {
                    Reduce::Sum {
                        count_padding: true, ..
                    } => pool.kw as f32,
                    _ => columns.iter().filter(|r| r.contains(&xx)).count() as f32,
                })
                .collect();
            let three_by_two = pool.kw == 3 && pool.sw == 2 && pool.pad[1] == 0 && 2 * pool.wo < pool.w;
            for ch in parts[part].clone() {
                let plane = &x[ch * pool.h * pool.w..][..pool.h * pool.w];
                for yy in 0..pool.ho {
                    let (r0, r1) = pool.window(yy, pool.sh, pool.pad[0], pool.kh, pool.h);
                    let row = |r: usize| &plane[r * pool.w..][..pool.w];
                    match r1 - r0 {
                        0 => acc.fill(pool.init()),
                        // Three rows (3x3 windows) in one pass.
                        3 => {
                            let rows = acc.iter_mut().zip(row(r0)).zip(row(r0 + 1)).zip(row(r0 + 2));
                            match pool.reduce {
                                Reduce::Max => rows.for_each(|(((o, a), b), c)| *o = a.max(*b).max(*c)),
                                Reduce::Sum { .. } => rows.for_each(|(((o, a), b), c)| *o = a + b + c),
                            }
                        }
                        _ => {
                            acc.copy_from_slice(row(r0));
                            for r in r0 + 1..r1 {
                                pool.combine(&mut acc, row(r));
                            }
                        }
                    }
                    let out = &mut y[(ch * pool.ho + yy) * pool.wo..][..pool.wo];
                    if three_by_two {
                        // The stride-2 3x3 windows of a valid pool (Inception V3's max pools):
                        // one pass, pairs and the next value read in vectors.
                        let (pairs, _) = acc.as_chunks::<2>();
                        let next = acc[2..].iter().step_by(2);
                        let windows = out.iter_mut().zip(pairs).zip(next);
                        match pool.reduce {
                            Reduce::Max => windows.for_each(|((o, p), n)| *o = p[0].max(p[1]).max(*n)),
                            Reduce::Sum { .. } => windows.for_each(|((o, p), n)| *o = p[0] + p[1] + n),
                        }
                        if let Reduce::Sum {
                            normalize: true,
                            count_padding,
                        } = pool.reduce
                        {
                            let n = (3 * if count_padding { pool.kh } else { r1 - r0 }) as f32;
                            out.iter_mut().for_each(|v| *v /= n);
                        }
                        continue;
                    }
                    out.fill(pool.init());
                    // Each kernel column in turn, over the outputs whose window has it inside
                    // the input: shifted (strided) slices of the row reduced above.
                    // (One loop per reduction, on zipped slices: no bounds check or match per
                    // value.)
                    for (kx, outputs) in columns.iter().enumerate() {
                        if outputs.is_empty() {
                            continue;
                        }
                        let first = outputs.start * pool.sw + kx - pool.pad[1];
                        let taps = acc[first..].iter().step_by(pool.sw);
                        let outs = out[outputs.clone()].iter_mut();
                        match pool.reduce {
                            Reduce::Max => outs.zip(taps).for_each(|(o, v)| *o = o.max(*v)),
                            Reduce::Sum { .. } => outs.zip(taps).for_each(|(o, v)| *o += v),
                        }
                    }
                    if let Reduce::Sum {
                        normalize: true,
                        count_padding,
                    } = pool.reduce
                    {
                        let rows = if count_padding { pool.kh } else { r1 - r0 } as f32;
                        for (v, cols) in out.iter_mut().zip(&counts) {
                            *v /= rows * cols;
                        }
                    }
                }
            }
        });
    }
}

impl Op for EdgePool {
    fn name(&self) -> StaticName {
        match self.reduce {
            Reduce::Max => "EdgeMaxPool".into(),
            Reduce::Sum { .. } => "EdgeSumPool".into(),
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let layout = |last: bool| if last { "channels last" } else { "channels first" };
        Ok(vec![format!(
            "{}x{} stride {}x{}, {} channels, {} to {}",
            self.kh,
            self.kw,
            self.sh,
            self.sw,
            self.c,
            layout(self.input_channels_last),
            layout(self.output_channels_last),
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for EdgePool {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let sizes = (self.batch, self.c * self.h * self.w, self.c * self.ho * self.wo);
        // `run` writes every output value.
        eval_images("EdgePool", inputs, &self.output_shape, sizes, |x, y| {
            self.run(x, y);
            Ok(())
        })
    }
}

impl TypedOp for EdgePool {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(self.output_shape.as_slice())))
    }

    as_op!();
}
