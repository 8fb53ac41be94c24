//! [`EdgeConv`]: a 2D f32 convolution (group 1, dilation 1) with bias and an optional ReLU,
//! channels first or last, on the `gemm` crate's matrix products.

use tract_core::internal::*;
use tract_core::ops::cnn::{Conv, KernelFormat};

use super::panel::{self, Activations, Grid, Isa, Packed, Segment};
use super::winograd;
use super::{
    Scratch, SendPtr, activate, bias_values, const_f32, eval_images, f32_tensor, for_each_block,
    for_each_part, matmul, signed, split, threads,
};

/// Largest share of the wide grid's columns that may be wasted (computed and dropped) before an
/// explicit im2col is cheaper (measured in Inception V3 on an AMD EPYC: 5x5 on 35x35, 10% of
/// the columns wasted, is faster wide; 1x7 on 17x17 (26%) and 1x3 on 8x8 (20%) by im2col).
const MAX_WIDE_WASTE: f64 = 0.15;

/// Sizes of one convolution, all concrete.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Geometry {
    pub(super) channels_last: bool,
    pub(super) batch: usize,
    pub(super) c: usize,
    pub(super) o: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) sh: usize,
    pub(super) sw: usize,
    /// Padding: top, left, bottom, right.
    pub(super) pad: [usize; 4],
    pub(super) ho: usize,
    pub(super) wo: usize,
    pub(super) output_shape: TVec<usize>,
}

impl Geometry {
    fn hp(&self) -> usize {
        self.h + self.pad[0] + self.pad[2]
    }

    fn wp(&self) -> usize {
        self.w + self.pad[1] + self.pad[3]
    }

    fn padded(&self) -> bool {
        self.pad.iter().any(|p| *p > 0)
    }

    /// Stride 1 with few wasted columns: K*K shifted products over the wide grid.
    fn wide(&self) -> bool {
        let waste = (self.wp() - self.wo) as f64 / self.wp() as f64;
        self.sh == 1 && self.sw == 1 && waste <= MAX_WIDE_WASTE
    }

    /// Values in one output channel's kernel, `kh * kw * c`.
    pub(super) fn depth(&self) -> usize {
        self.kh * self.kw * self.c
    }

    /// (between rows `(ky, kx, ci)`, between output channels) of the reordered weights:
    /// `[kh, kw, c, o]` for channels last, `[o, kh, kw, c]` for channels first. Either way the
    /// weights are the matrix the products read with unit stride along the depth or the
    /// output channels as `gemm` reads them without packing a copy at every call: the product
    /// of a channels-first convolution is column-major (pixels are its rows, contiguous), and
    /// `gemm` reads a right-hand matrix of unit row stride in place.
    pub(super) fn weight_strides(&self) -> (usize, usize) {
        if self.channels_last {
            (self.o, 1)
        } else {
            (1, self.depth())
        }
    }

    /// (between pixels, between channels) of the padded input.
    fn input_strides(&self) -> (usize, usize) {
        if self.channels_last {
            (self.c, 1)
        } else {
            (1, self.hp() * self.wp())
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeConv {
    pub(super) geometry: Geometry,
    /// `[kh * kw * c, o]` as a matrix of strides [`Geometry::weight_strides`]: row
    /// `(ky * kw + kx) * c + ci`; for `gemm::gemm`, when this CPU has no micro-kernels of
    /// ours ([`panel::isa`]) and the convolution does not run by Winograd.
    pub(super) weights: Option<Arc<Tensor>>,
    /// The same matrix for our micro-kernels (channel-major channels first, in panels of
    /// [`panel::Isa::mr`] channels channels last).
    pub(super) packed: Option<Packed>,
    /// `[o]`.
    pub(super) bias: Arc<Tensor>,
    pub(super) relu: bool,
    /// The Winograd-transformed weights, 16 matrices `c x o` of strides
    /// [`Geometry::weight_strides`] with `kh = kw = 1`, when this convolution runs that way.
    pub(super) winograd: Option<Arc<Tensor>>,
    /// Whether Winograd runs on our micro-kernels ([`winograd::run_panels`]: channels first,
    /// micro-kernels on this CPU and not turned off by the settings), which also decided
    /// whether it suits this convolution.
    pub(super) panels: bool,
}

impl EdgeConv {
    /// Our form of tract's `conv` at `node`, when we handle it.
    pub(super) fn from_tract(
        model: &TypedModel,
        node: &TypedNode,
        conv: &Conv,
        winograd: bool,
        isa: Option<Isa>,
    ) -> TractResult<Option<EdgeConv>> {
        let spec = &conv.pool_spec;
        let input = model.outlet_fact(node.inputs[0])?;
        if conv.q_params.is_some()
            || conv.group != 1
            || spec.kernel_shape.len() != 2
            || spec.dilations().iter().any(|d| *d != 1)
            || input.datum_type != f32::datum_type()
            || node.outputs[0].fact.datum_type != f32::datum_type()
            || node.inputs.len() != 3
        {
            return Ok(None);
        }
        let (Some(shape), Some(out_shape)) = (
            input.shape.as_concrete(),
            node.outputs[0].fact.shape.as_concrete(),
        ) else {
            return Ok(None);
        };
        let (Some(kernel), Some(bias)) = (
            const_f32(model, node.inputs[1])?,
            const_f32(model, node.inputs[2])?,
        ) else {
            return Ok(None);
        };
        let data = spec.data_format.shape(shape.to_vec())?;
        let (c, hw) = (*data.c(), data.hw_dims().to_vec());
        let o = spec.output_channels;
        let padding = spec.computed_padding(&hw);
        let strides = spec.strides();
        let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
        let geometry = Geometry {
            channels_last: spec.data_format.c_is_last(),
            batch: data.n().copied().unwrap_or(1),
            c,
            o,
            h: hw[0],
            w: hw[1],
            kh,
            kw,
            sh: strides[0],
            sw: strides[1],
            pad: [
                padding[0].pad_before,
                padding[1].pad_before,
                padding[0].pad_after,
                padding[1].pad_after,
            ],
            ho: padding[0].convoluted,
            wo: padding[1].convoluted,
            output_shape: out_shape.into(),
        };
        let expected =
            spec.data_format
                .from_n_c_hw(geometry.batch, o, [geometry.ho, geometry.wo].as_slice())?;
        if expected.shape.as_slice() != out_shape
            || geometry.ho + geometry.kh > geometry.hp() + 1
            || geometry.wo + geometry.kw > geometry.wp() + 1
            || c != spec.input_channels
        {
            return Ok(None);
        }
        let Some(weights_tensor) = reorder_kernel(&kernel, conv.kernel_fmt, &geometry)? else {
            return Ok(None);
        };
        let bias = bias_values(&bias, o)?;
        let (mut weights, mut packed, mut transformed) = (None, None, None);
        let panels = isa.is_some() && !geometry.channels_last;
        if winograd && winograd::suits(&geometry, panels) {
            let plain = weights_tensor.try_as_plain_ram()?;
            let plain = plain.as_slice::<f32>()?;
            transformed = Some(Arc::new(f32_tensor(16 * c * o, |u| {
                winograd::transform_weights(&geometry, plain, u)
            })?));
        } else if let Some(isa) = isa.filter(|_| geometry.wide() || !geometry.channels_last) {
            packed = Some(if geometry.channels_last {
                let plain = weights_tensor.try_as_plain_ram()?;
                Packed::new(
                    plain.as_slice::<f32>()?,
                    (geometry.depth(), o),
                    geometry.weight_strides(),
                    isa.mr,
                )?
            } else {
                // `[o][kh][kw][c]` is already each channel's depth contiguous.
                Packed::channel_major(weights_tensor, geometry.depth(), o)?
            });
        } else {
            weights = Some(Arc::new(weights_tensor));
        }
        Ok(Some(EdgeConv {
            geometry,
            weights,
            packed,
            bias: Arc::new(tensor1(&bias)),
            relu: false,
            winograd: transformed,
            panels,
        }))
    }

    /// One image: `x` its input, `y` its output.
    fn run(&self, x: &[f32], y: &mut [f32]) -> TractResult<()> {
        let g = &self.geometry;
        let bias = self.bias.try_as_plain_ram()?;
        let bias = bias.as_slice::<f32>()?;
        if let Some(u) = &self.winograd {
            let u = u.try_as_plain_ram()?;
            let u = u.as_slice::<f32>()?;
            match panel::isa().filter(|_| self.panels) {
                Some(isa) => winograd::run_panels(g, isa, u, x, y, bias, self.relu),
                None => winograd::run(g, u, x, y, bias, self.relu),
            }
            return Ok(());
        }
        let padded = pad(g, x);
        if let (Some(packed), Some(isa)) = (&self.packed, panel::isa()) {
            return run_packed(g, self.relu, isa, packed, &padded, y, bias);
        }
        let weights = self.weights.as_ref().context("EdgeConv without weights")?;
        let weights = weights.try_as_plain_ram()?;
        let weights = weights.as_slice::<f32>()?;
        if g.wide() {
            let wp = g.wp();
            let direct = wp == g.wo;
            // Rows of the wide grid past the last output row's columns are neither written
            // nor read: stale scratch is fine.
            let mut wide = Scratch::take(if direct { 0 } else { g.ho * wp * g.o });
            let dst = if direct {
                y.as_mut_ptr()
            } else {
                wide.0.as_mut_ptr()
            };
            let rows = (g.ho - 1) * wp + g.wo;
            let dst_strides = if g.channels_last { (g.o, 1) } else { (1, g.ho * wp) };
            self.products(rows, &padded, weights, dst, dst_strides, |part, lhs, rhs, dst| {
                let (px, pc) = g.input_strides();
                if g.channels_last {
                    // A kernel row's taps read kw consecutive pixels: kw * c contiguous values
                    // per output row, one product of depth kw * c per kernel row (rows of the
                    // left matrix overlap, which a product only reading them allows).
                    let (m, n, _) = part;
                    for ky in 0..g.kh {
                        // SAFETY: as below, the last row read ends at the padded input's end.
                        unsafe {
                            matmul(
                                (m, n, g.kw * g.c),
                                dst,
                                signed(dst_strides),
                                ky > 0,
                                lhs.add(ky * wp * px),
                                signed((px, 1)),
                                rhs.add(ky * g.kw * g.c * g.o),
                                signed((g.o, 1)),
                            )
                        }
                    }
                    return;
                }
                let ws = g.weight_strides();
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let tap = ky * g.kw + kx;
                        // SAFETY: the shifted view of the wide rows ends at the padded
                        // input's last element ((ho-1+kh-1)*wp + wo-1+kw-1 < hp*wp).
                        unsafe {
                            matmul(
                                part,
                                dst,
                                signed(dst_strides),
                                tap > 0,
                                lhs.add((ky * wp + kx) * px),
                                signed((px, pc)),
                                rhs.add(tap * g.c * ws.0),
                                signed(ws),
                            )
                        }
                    }
                }
            });
            let src = if direct {
                None
            } else {
                Some(&wide.0[..g.ho * wp * g.o])
            };
            finish(g, src, wp, y, bias, self.relu);
        } else {
            let (col, col_strides) = im2col(g, &padded);
            let kd = g.kh * g.kw * g.c;
            let rows = g.ho * g.wo;
            let dst_strides = if g.channels_last { (g.o, 1) } else { (1, rows) };
            let dst = y.as_mut_ptr();
            self.products(
                rows,
                &col.0,
                weights,
                dst,
                dst_strides,
                |(m, n, _), lhs, rhs, dst| {
                    // SAFETY: the part's rows and columns are inside col, weights and y.
                    unsafe {
                        matmul(
                            (m, n, kd),
                            dst,
                            signed(dst_strides),
                            false,
                            lhs,
                            signed(col_strides),
                            rhs,
                            signed(g.weight_strides()),
                        )
                    }
                },
            );
            finish(g, None, g.wo, y, bias, self.relu);
        }
        Ok(())
    }

    /// Splits the product `rows x o` into one part per thread (along the larger side) and runs
    /// `each((rows, cols, c), lhs, rhs, dst)` with the pointers moved to the part's corner.
    #[allow(clippy::type_complexity)]
    fn products(
        &self,
        rows: usize,
        lhs: &[f32],
        rhs: &[f32],
        dst: *mut f32,
        (dst_rs, dst_cs): (usize, usize),
        each: impl Fn((usize, usize, usize), *const f32, *const f32, *mut f32) + Sync,
    ) {
        let g = &self.geometry;
        let threads = threads();
        let by_rows = rows >= g.o;
        let parts = if by_rows {
            split(rows, threads, 16)
        } else {
            split(g.o, threads, 16)
        };
        let (lhs, rhs, dst) = (
            SendPtr(lhs.as_ptr() as *mut f32),
            SendPtr(rhs.as_ptr() as *mut f32),
            SendPtr(dst),
        );
        // Elements between two rows of the left matrix: pixels of the padded input when wide,
        // rows of the im2col matrix else.
        let row_step = match (g.wide(), g.channels_last) {
            (true, _) => g.input_strides().0,
            (false, true) => g.kh * g.kw * g.c,
            (false, false) => 1,
        };
        for_each_part(parts.len(), |i| {
            let range = parts[i].clone();
            // SAFETY: offsets stay inside the buffers: ranges are within rows / o.
            unsafe {
                if by_rows {
                    each(
                        (range.len(), g.o, g.c),
                        lhs.get().add(range.start * row_step),
                        rhs.get(),
                        dst.get().add(range.start * dst_rs),
                    )
                } else {
                    each(
                        (rows, range.len(), g.c),
                        lhs.get(),
                        rhs.get().add(range.start * g.weight_strides().1),
                        dst.get().add(range.start * dst_cs),
                    )
                }
            }
        });
    }
}

widest! {
    /// [`EdgeConv::run`] on our micro-kernels: every tap of the kernel in one product whose
    /// tiles are written to `y` with the bias and ReLU (and without a wide grid's extra
    /// columns); compiled for the widest vector instructions of this CPU (see [`widest`]).
    fn run_packed(
        g: &Geometry,
        relu: bool,
        isa: Isa,
        packed: &Packed,
        padded: &[f32],
        y: &mut [f32],
        bias: &[f32],
    ) -> TractResult<()> {
        let w = packed.data.try_as_plain_ram()?;
        let w = w.as_slice::<f32>()?;
        let (hp, wp) = (g.hp(), g.wp());
        // The activations and the pixels the product runs over: the wide grid's positions
        // (stride 1: row `yy * wp + xx`, kept when `xx < wo`), or the output's pixels, their
        // patches gathered from the input as the product packs them (channels first).
        let segments: Vec<Segment>;
        let (act, pixels, grid_w) = if g.wide() {
            let rows = (g.ho - 1) * wp + g.wo;
            let act = if g.channels_last {
                // A kernel row's taps are kw * c consecutive values.
                segments = Segment::at(padded, (0..g.kh).map(|ky| ky * wp * g.c), g.kw * g.c);
                Activations {
                    segments: &segments,
                    depth_stride: 1,
                    pixel_stride: g.c,
                    grid: None,
                }
            } else {
                segments = Segment::at(padded, (0..g.kh * g.kw).map(|t| (t / g.kw) * wp + t % g.kw), g.c);
                Activations {
                    segments: &segments,
                    depth_stride: hp * wp,
                    pixel_stride: 1,
                    grid: None,
                }
            };
            (act, rows, wp)
        } else {
            ensure!(
                !g.channels_last,
                "EdgeConv: packed weights for a channels-last im2col"
            );
            segments = Segment::at(padded, (0..g.kh * g.kw).map(|t| (t / g.kw) * wp + t % g.kw), g.c);
            let act = Activations {
                segments: &segments,
                depth_stride: hp * wp,
                pixel_stride: 1,
                grid: Some(Grid {
                    width: g.wo,
                    row_step: g.sh * wp,
                    col_step: g.sw,
                }),
            };
            (act, g.ho * g.wo, g.wo)
        };
        let out = SendPtr(y.as_mut_ptr());
        let plane = g.ho * g.wo;
        // Output pixel of grid position `p`, when it is one.
        let pixel = move |p: usize| {
            let (yy, xx) = (p / grid_w, p % grid_w);
            (xx < g.wo).then_some(yy * g.wo + xx)
        };
        if g.channels_last {
            for_each_block((pixels, g.o), true, (isa.nr, isa.mr), |pixels, channels| {
                // SAFETY: the activations cover every position and tap (wide: the last
                // position's last tap is the padded input's last value); parts write the
                // disjoint pixels of their range.
                unsafe {
                    panel::channels_by_pixels(isa, channels, pixels, act, packed, w, |t| {
                        for (j, p) in t.cols.clone().enumerate() {
                            let Some(px) = pixel(p) else { continue };
                            let from = &t.values[j * t.stride..][..t.rows.len()];
                            let to = std::slice::from_raw_parts_mut(
                                out.get().add(px * g.o + t.rows.start),
                                t.rows.len(),
                            );
                            for ((d, s), b) in to.iter_mut().zip(from).zip(&bias[t.rows.clone()]) {
                                *d = activate(*s, *b, relu);
                            }
                        }
                    })
                }
            });
        } else {
            for_each_block((pixels, g.o), pixels >= g.o, (16, isa.nr), |rows, cols| {
                // SAFETY: as above; parts write disjoint pixels or channels.
                unsafe {
                    panel::pixels_by_channels(isa, rows, cols, act, packed, w, |t| {
                        // The tile's runs of output pixels: (first in the tile, first pixel,
                        // length), one per grid row it crosses.
                        let mut runs = [(0, 0, 0); 64];
                        let mut n = 0;
                        let mut p = t.rows.start;
                        while p < t.rows.end && n < runs.len() {
                            let (yy, xx) = (p / grid_w, p % grid_w);
                            let row_end = (yy * grid_w + g.wo).min(t.rows.end);
                            if xx < g.wo {
                                runs[n] = (p - t.rows.start, yy * g.wo + xx, row_end - p);
                                n += 1;
                            }
                            p = (yy + 1) * grid_w;
                        }
                        for (j, ch) in t.cols.clone().enumerate() {
                            let b = bias[ch];
                            let from = &t.values[j * t.stride..][..t.rows.len()];
                            let to = out.get().add(ch * plane);
                            for &(at, px, len) in &runs[..n] {
                                let to = std::slice::from_raw_parts_mut(to.add(px), len);
                                for (d, s) in to.iter_mut().zip(&from[at..at + len]) {
                                    *d = activate(*s, b, relu);
                                }
                            }
                        }
                    })
                }
            });
        }
        Ok(())
    }
}

/// The weights as `[kh, kw, c, o]` (channels last) or `[o, kh, kw, c]` (first), from tract's
/// kernel format (see [`Geometry::weight_strides`]).
fn reorder_kernel(kernel: &Tensor, format: KernelFormat, g: &Geometry) -> TractResult<Option<Tensor>> {
    let (o, c, kh, kw) = (g.o, g.c, g.kh, g.kw);
    let expected: [usize; 4] = match format {
        KernelFormat::OIHW => [o, c, kh, kw],
        KernelFormat::HWIO => [kh, kw, c, o],
        KernelFormat::OHWI => [o, kh, kw, c],
    };
    if kernel.shape() != expected {
        return Ok(None);
    }
    let k = kernel.try_as_plain_ram()?;
    let k = k.as_slice::<f32>()?;
    let from = |oo: usize, ci: usize, ky: usize, kx: usize| match format {
        KernelFormat::OIHW => ((oo * c + ci) * kh + ky) * kw + kx,
        KernelFormat::HWIO => ((ky * kw + kx) * c + ci) * o + oo,
        KernelFormat::OHWI => ((oo * kh + ky) * kw + kx) * c + ci,
    };
    let weights = f32_tensor(o * c * kh * kw, |out| {
        if !g.channels_last {
            // Output channel by output channel: both sides are read and written in order for
            // OHWI kernels, and in runs of kw (OIHW) or o (HWIO) values else.
            for oo in 0..o {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let row = oo * g.depth() + (ky * kw + kx) * c;
                        for ci in 0..c {
                            out[row + ci] = k[from(oo, ci, ky, kx)];
                        }
                    }
                }
            }
            return;
        }
        // In blocks of 16 output channels: each write fills a cache line, each read stream is
        // sequential (an element-wise transpose of Inception's 24 M weights cost 30 ms at load).
        for block in (0..o).step_by(16) {
            let block = block..(block + 16).min(o);
            for ky in 0..kh {
                for kx in 0..kw {
                    for ci in 0..c {
                        let row = ((ky * kw + kx) * c + ci) * o;
                        for oo in block.clone() {
                            out[row + oo] = k[from(oo, ci, ky, kx)];
                        }
                    }
                }
            }
        }
    })?;
    Ok(Some(weights))
}

/// The input with its padding made explicit (zeros), in the same layout.
fn pad<'a>(g: &Geometry, x: &'a [f32]) -> Padded<'a> {
    pad_to(g, x, (g.hp(), g.wp()))
}

/// The input with its padding made explicit (zeros) and zeros below and to the right up to
/// `hp x wp` (at least the padded size), in the same layout.
pub(super) fn pad_to<'a>(g: &Geometry, x: &'a [f32], (hp, wp): (usize, usize)) -> Padded<'a> {
    if !g.padded() && (hp, wp) == (g.h, g.w) {
        return Padded::Input(x);
    }
    let [top, left, ..] = g.pad;
    let len = hp * wp * g.c;
    let mut scratch = Scratch::take(len);
    // Rows (channels last) or channels (first), split over the threads; each part zeroes
    // and fills its own region.
    let (units, unit) = if g.channels_last {
        (hp, wp * g.c)
    } else {
        (g.c, hp * wp)
    };
    let parts = split(units, threads(), 1);
    let out = SendPtr(scratch.0.as_mut_ptr());
    for_each_part(parts.len(), |part| {
        let range = parts[part].clone();
        // SAFETY: parts write the disjoint units of their range, inside the scratch.
        let out =
            unsafe { std::slice::from_raw_parts_mut(out.get().add(range.start * unit), range.len() * unit) };
        out.fill(0.0);
        for (i, u) in range.enumerate() {
            let out = &mut out[i * unit..][..unit];
            if g.channels_last {
                // Padded row u holds input row u - top.
                if u >= top && u - top < g.h {
                    let row = g.w * g.c;
                    out[left * g.c..][..row].copy_from_slice(&x[(u - top) * row..][..row]);
                }
            } else {
                for yy in 0..g.h {
                    let to = (yy + top) * wp + left;
                    out[to..to + g.w].copy_from_slice(&x[(u * g.h + yy) * g.w..][..g.w]);
                }
            }
        }
    });
    Padded::Scratch(scratch, len)
}

/// An input as a convolution reads it: as given, or padded in a scratch buffer.
pub(super) enum Padded<'a> {
    Input(&'a [f32]),
    Scratch(Scratch, usize),
}

impl std::ops::Deref for Padded<'_> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            Padded::Input(x) => x,
            Padded::Scratch(s, len) => &s.0[..*len],
        }
    }
}

/// The im2col matrix of the padded input and its (row, column) strides: one row per output
/// pixel, one column per `(ky, kx, ci)`; pixel-major for channels last, column-major else.
fn im2col(g: &Geometry, padded: &[f32]) -> (Scratch, (usize, usize)) {
    let (hp, wp) = (g.hp(), g.wp());
    let kd = g.kh * g.kw * g.c;
    let rows = g.ho * g.wo;
    // Every value is written below: output pixels (channels last) or columns of the matrix
    // (first) split over the threads.
    let mut scratch = Scratch::take(rows * kd);
    let col = SendPtr(scratch.0.as_mut_ptr());
    let (units, unit) = if g.channels_last { (rows, kd) } else { (kd, rows) };
    let parts = split(units, threads(), 1);
    for_each_part(parts.len(), |part| {
        let range = parts[part].clone();
        // SAFETY: parts write the disjoint units of their range, inside the scratch.
        let col =
            unsafe { std::slice::from_raw_parts_mut(col.get().add(range.start * unit), range.len() * unit) };
        for (i, u) in range.enumerate() {
            let out = &mut col[i * unit..][..unit];
            if g.channels_last {
                let (yy, xx) = (u / g.wo, u % g.wo);
                let run = g.kw * g.c;
                for ky in 0..g.kh {
                    let from = ((yy * g.sh + ky) * wp + xx * g.sw) * g.c;
                    out[ky * run..][..run].copy_from_slice(&padded[from..from + run]);
                }
            } else {
                // Column u is (ky, kx, ch).
                let (tap, ch) = (u / g.c, u % g.c);
                let (ky, kx) = (tap / g.kw, tap % g.kw);
                let plane = &padded[ch * hp * wp..][..hp * wp];
                for yy in 0..g.ho {
                    let line = &plane[(yy * g.sh + ky) * wp + kx..];
                    let out = &mut out[yy * g.wo..][..g.wo];
                    if g.sw == 1 {
                        out.copy_from_slice(&line[..g.wo]);
                    } else {
                        for (xx, v) in out.iter_mut().enumerate() {
                            *v = line[xx * g.sw];
                        }
                    }
                }
            }
        }
    });
    (scratch, if g.channels_last { (kd, 1) } else { (1, rows) })
}

/// Writes the output: bias added, ReLU applied, from `src` (the wide grid, `src_w` columns a
/// row) or in place in `y` (`src` None, then `src_w` is the output's width).
fn finish(g: &Geometry, src: Option<&[f32]>, src_w: usize, y: &mut [f32], bias: &[f32], relu: bool) {
    let apply = |v: f32, b: f32| activate(v, b, relu);
    let rows = if g.channels_last { g.ho } else { g.o };
    let parts = split(rows, threads(), 1);
    let y_ptr = SendPtr(y.as_mut_ptr());
    let y_len = y.len();
    for_each_part(parts.len(), |i| {
        // SAFETY: every part writes the disjoint rows of its range.
        let y = unsafe { std::slice::from_raw_parts_mut(y_ptr.get(), y_len) };
        for r in parts[i].clone() {
            if g.channels_last {
                for xx in 0..g.wo {
                    let out = &mut y[(r * g.wo + xx) * g.o..][..g.o];
                    match src {
                        Some(src) => {
                            let from = &src[(r * src_w + xx) * g.o..][..g.o];
                            for ((d, s), b) in out.iter_mut().zip(from).zip(bias) {
                                *d = apply(*s, *b);
                            }
                        }
                        None => out.iter_mut().zip(bias).for_each(|(d, b)| *d = apply(*d, *b)),
                    }
                }
            } else {
                let b = bias[r];
                for yy in 0..g.ho {
                    let out = &mut y[(r * g.ho + yy) * g.wo..][..g.wo];
                    match src {
                        Some(src) => {
                            let from = &src[(r * g.ho + yy) * src_w..][..g.wo];
                            for (d, s) in out.iter_mut().zip(from) {
                                *d = apply(*s, b);
                            }
                        }
                        None => out.iter_mut().for_each(|d| *d = apply(*d, b)),
                    }
                }
            }
        }
    });
}

impl Op for EdgeConv {
    fn name(&self) -> StaticName {
        "EdgeConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        Ok(vec![format!(
            "{}x{} stride {}x{}, {}->{} channels, {}, {}{}",
            g.kh,
            g.kw,
            g.sh,
            g.sw,
            g.c,
            g.o,
            if g.channels_last {
                "channels last"
            } else {
                "channels first"
            },
            match (&self.winograd, g.wide()) {
                (Some(_), _) => "Winograd F(2x2,3x3)",
                (None, true) => "shifted products",
                (None, false) if self.packed.is_some() => "im2col gathered as it is packed",
                (None, false) => "im2col",
            },
            if self.relu { ", ReLU" } else { "" },
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for EdgeConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let g = &self.geometry;
        let sizes = (g.batch, g.c * g.h * g.w, g.o * g.ho * g.wo);
        // `run` writes every output value (products then `finish`).
        eval_images("EdgeConv", inputs, &g.output_shape, sizes, |x, y| self.run(x, y))
    }
}

impl TypedOp for EdgeConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(self.geometry.output_shape.as_slice())))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let g = &self.geometry;
        let fma = g.batch * g.ho * g.wo * g.o * g.kh * g.kw * g.c;
        Ok(tvec!((Cost::FMA(f32::datum_type()), fma.to_dim())))
    }

    as_op!();
}
