//! Our driver around the `gemm` crate's register micro-kernels, for products with constant
//! weights: the weights are packed once, at load, in the panels the micro-kernels read, and
//! every micro-kernel tile lands in a small buffer that an epilogue (bias, ReLU, an addend,
//! a wide grid's dropped columns) moves to the output while it is in the L1 cache.
//!
//! Why not `gemm::gemm`: it packs an operand at every call (Inception V3 at 1 thread on an
//! Intel Xeon: 7.8 ms of 77 in its packing), a KxK convolution is K*K products each
//! reading and writing the whole output again, and bias and ReLU cost another pass over it.
//!
//! Two shapes of product, after the output's contiguous axis (the micro-kernels' vectors run
//! along a tile's rows, [`Isa::mr`] of them, and broadcast [`Isa::nr`] columns):
//! - [`pixels_by_channels`]: the output's pixels are contiguous (channels first). The tile's
//!   rows are pixels: the activations are packed, [`Isa::mr`] pixels at a time for the
//!   whole depth (gathering a KxK convolution's taps from the input as they go), and the
//!   weights are panels of [`Isa::nr`] output channels.
//! - [`channels_by_pixels`]: the output's channels are contiguous (channels last). The tile's
//!   rows are output channels, the weights panels of [`Isa::mr`] of them, and the
//!   activations are broadcast in place, [`Isa::nr`] pixels at a time.

use std::ops::Range;
use std::sync::OnceLock;

use tract_core::internal::*;

use super::Scratch;

/// A `gemm` micro-kernel: `dst (m x n) = alpha * dst + beta * lhs (m x k) * rhs (k x n)`,
/// `lhs` read in columns of [`Isa::mr`] values `lhs_cs` apart, `rhs` at `rhs_rs` (along k)
/// and `rhs_cs` (along n). `alpha_status`: 0 ignores `dst`, 1 adds to it.
type MicroKernel = unsafe fn(
    usize,
    usize,
    usize,
    *mut f32,
    *const f32,
    *const f32,
    isize,
    isize,
    isize,
    isize,
    isize,
    f32,
    f32,
    u8,
    bool,
    bool,
    bool,
    *const f32,
);

/// Most rows and columns of a micro-kernel tile on any instruction set.
pub(super) const MAX_MR: usize = 64;
pub(super) const MAX_NR: usize = 6;

/// The micro-kernels of this CPU.
#[derive(Clone, Copy)]
pub(super) struct Isa {
    /// Rows of a tile: vectors of `lanes` values, up to 4 of them.
    pub(super) mr: usize,
    lanes: usize,
    /// Columns of a tile.
    pub(super) nr: usize,
    /// By (vectors - 1, columns - 1).
    kernels: &'static [[MicroKernel; MAX_NR]],
}

impl std::fmt::Debug for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{} tiles", self.mr, self.nr)
    }
}

/// The micro-kernels for this CPU: AVX-512 (64 x 6 tiles), else AVX2 with FMA (16 x 6), else
/// none (products then go through `gemm::gemm`).
pub(super) fn isa() -> Option<Isa> {
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Option<Isa> {
    if std::is_x86_feature_detected!("avx512f") {
        use gemm_f32::microkernel::avx512f::f32 as k;
        return Some(Isa {
            mr: k::MR_DIV_N * 16,
            lanes: 16,
            nr: k::NR,
            kernels: &k::UKR,
        });
    }
    if std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2") {
        use gemm_f32::microkernel::fma::f32 as k;
        return Some(Isa {
            mr: k::MR_DIV_N * 8,
            lanes: 8,
            nr: k::NR,
            kernels: &k::UKR,
        });
    }
    None
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Option<Isa> {
    None
}

impl Isa {
    fn kernel(&self, rows: usize, cols: usize) -> MicroKernel {
        self.kernels[rows.div_ceil(self.lanes) - 1][cols - 1]
    }
}

/// A constant `depth x channels` matrix as a micro-kernel reads it: `width` 0, each
/// channel's depth contiguous (`[channels][depth]`, read by [`pixels_by_channels`], whose
/// micro-kernels broadcast it along the depth with unit stride, the case they are compiled
/// best for); else in panels of `width` channels, each `[depth][width]`, the last one padded
/// with zeros (read by [`channels_by_pixels`] in vectors of `width`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Packed {
    pub(super) data: Arc<Tensor>,
    pub(super) depth: usize,
    pub(super) channels: usize,
    pub(super) width: usize,
}

impl Packed {
    /// Packs `w`, whose value `(d, ch)` is at `w[d * rs + ch * cs]`.
    pub(super) fn new(
        w: &[f32],
        (depth, channels): (usize, usize),
        (rs, cs): (usize, usize),
        width: usize,
    ) -> TractResult<Packed> {
        ensure!(
            depth == 0 || channels == 0 || (depth - 1) * rs + (channels - 1) * cs < w.len(),
            "weights of {} values for {depth} x {channels}",
            w.len()
        );
        let len = if width == 0 {
            channels * depth
        } else {
            channels.div_ceil(width) * depth * width
        };
        // On a cache line boundary, as the panels the micro-kernels load in vectors.
        let mut data = Tensor::zero_aligned::<f32>(&[len], ALIGN * 4)?;
        {
            let mut view = data.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            if width == 0 {
                for (ch, row) in out.chunks_exact_mut(depth.max(1)).enumerate() {
                    for (d, v) in row.iter_mut().enumerate() {
                        *v = w[d * rs + ch * cs];
                    }
                }
            } else {
                for (p, panel) in out.chunks_exact_mut((depth * width).max(1)).enumerate() {
                    let cols = p * width..((p + 1) * width).min(channels);
                    for d in 0..depth {
                        for (j, ch) in cols.clone().enumerate() {
                            panel[d * width + j] = w[d * rs + ch * cs];
                        }
                    }
                }
            }
        }
        Ok(Packed {
            data: Arc::new(data),
            depth,
            channels,
            width,
        })
    }

    /// A channel-major matrix as it is: `t` holds `channels` rows of `depth` values.
    pub(super) fn channel_major(t: Tensor, depth: usize, channels: usize) -> TractResult<Packed> {
        ensure!(
            t.len() == depth * channels,
            "weights of {} values for {depth} x {channels}",
            t.len()
        );
        Ok(Packed {
            data: Arc::new(t),
            depth,
            channels,
            width: 0,
        })
    }

    /// Where `channel` (the first of a panel) starts at depth `d`, and the strides (along the
    /// depth, between channels) from there.
    fn at(&self, values: &[f32], channel: usize, d: usize) -> (*const f32, isize, isize) {
        match channel.checked_div(self.width) {
            None => (
                values[channel * self.depth + d..].as_ptr(),
                1,
                self.depth as isize,
            ),
            Some(panel) => {
                let at = (panel * self.depth + d) * self.width;
                (values[at..].as_ptr(), self.width as isize, 1)
            }
        }
    }
}

/// Where the activations of a product are: the depth runs through `segments` in turn (e.g. a
/// convolution's taps or kernel rows, or the inputs of a concat), and the value at depth `i`
/// of segment `s` for pixel `p` is at `segments[s].start + i * depth_stride + p * pixel_stride`,
/// or with a `grid`, at `segments[s].start + i * depth_stride + grid.offset(p)`.
#[derive(Clone, Copy)]
pub(super) struct Activations<'a> {
    pub(super) segments: &'a [Segment],
    pub(super) depth_stride: usize,
    pub(super) pixel_stride: usize,
    pub(super) grid: Option<Grid>,
}

/// Pixels laid out in rows of `width`, `row_step` values apart, `col_step` apart in a row: a
/// strided convolution's output pixels over its (padded) input, which [`pixels_by_channels`]
/// gathers as it packs (an im2col matrix never written whole).
#[derive(Clone, Copy, Debug)]
pub(super) struct Grid {
    pub(super) width: usize,
    pub(super) row_step: usize,
    pub(super) col_step: usize,
}

/// A run of depth of the activations: `len` values from `start` (see [`Activations`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Segment {
    pub(super) start: *const f32,
    pub(super) len: usize,
}

impl Segment {
    /// A segment of `len` values at each of `offsets` in `values` (a convolution's taps in
    /// its padded input, which holds every tap's reads).
    pub(super) fn at(values: &[f32], offsets: impl IntoIterator<Item = usize>, len: usize) -> Vec<Segment> {
        offsets
            .into_iter()
            .map(|at| Segment {
                start: values[at..].as_ptr(),
                len,
            })
            .collect()
    }
}

// SAFETY: activations are only read, by every thread of an op while the op runs.
unsafe impl Send for Activations<'_> {}
unsafe impl Sync for Activations<'_> {}
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

impl Activations<'_> {
    fn depth(&self) -> usize {
        self.segments.iter().map(|s| s.len).sum()
    }
}

/// A finished tile: `values[j * stride + i]` is row `rows.start + i`, column `cols.start + j`
/// of the product.
pub(super) struct Tile<'a> {
    pub(super) rows: Range<usize>,
    pub(super) cols: Range<usize>,
    pub(super) values: &'a [f32],
    pub(super) stride: usize,
}

/// Most depth one pass over a part's tiles covers: a pass streams `KC` rows of the weights
/// (`KC` x all channels: 384 KB for 384 channels) past every tile, so they stay in the L2
/// cache, instead of streaming all the weights past each tile (Inception V3's 3x3 448 -> 384
/// convolution has 6 MB of them).
const KC: usize = 512;

/// A run of depth inside one segment of the activations: segment `seg`, values `range`,
/// the first of them at depth `depth` of the product.
#[derive(Clone, Debug)]
struct Piece {
    seg: usize,
    range: Range<usize>,
    depth: usize,
}

/// The depth in passes of at most [`KC`] (more when one segment is longer than that, split in
/// pieces of [`KC`]), each a list of pieces in depth order.
fn passes(act: &Activations) -> Vec<Vec<Piece>> {
    let mut passes: Vec<Vec<Piece>> = Vec::new();
    let mut depth = KC;
    let mut first = 0;
    for (seg, segment) in act.segments.iter().enumerate() {
        for start in (0..segment.len).step_by(KC) {
            let range = start..(start + KC).min(segment.len);
            if depth + range.len() > KC {
                passes.push(Vec::new());
                depth = 0;
            }
            depth += range.len();
            if let Some(pass) = passes.last_mut() {
                pass.push(Piece {
                    seg,
                    range: range.clone(),
                    depth: first + range.start,
                });
            }
        }
        first += segment.len;
    }
    passes
}

/// Most channels for which [`pixels_by_channels`] reads the activations in place (`gemm`'s
/// threshold: 8 panels of 6).
const IN_PLACE_CHANNELS: usize = 48;

/// Most packed activations [`pixels_by_channels`] keeps for one pass (1 MB).
const PACKED_VALUES: usize = 256 << 10;

/// Values in a cache line: the micro-kernels' vector loads and stores must not straddle two
/// (each would cost two accesses).
pub(super) const ALIGN: usize = 16;

/// The part of `buffer` from its first value on a cache line boundary.
pub(super) fn aligned(buffer: &mut [f32]) -> &mut [f32] {
    let skip = buffer.as_ptr().align_offset(ALIGN * 4).min(buffer.len());
    &mut buffer[skip..]
}

/// A tile's values, on a cache line boundary.
#[repr(align(64))]
struct TileBuffer([f32; MAX_MR * MAX_NR]);

/// Where tiles accumulate between passes: one tile on the stack when there is one pass, else
/// a matrix of the part's rows x columns (column-major).
struct Accumulator {
    matrix: Option<Scratch>,
    rows: Range<usize>,
    cols: Range<usize>,
    tile: TileBuffer,
}

impl Accumulator {
    fn new(passes: usize, rows: Range<usize>, cols: Range<usize>) -> Accumulator {
        let matrix = (passes > 1).then(|| Scratch::take(Self::stride(&rows) * cols.len() + ALIGN));
        Accumulator {
            matrix,
            rows,
            cols,
            tile: TileBuffer([0f32; MAX_MR * MAX_NR]),
        }
    }

    /// Between two columns of the matrix: whole cache lines.
    fn stride(rows: &Range<usize>) -> usize {
        rows.len().next_multiple_of(ALIGN)
    }

    /// The tile at (`r0`, `c0`) and its column stride.
    fn at(&mut self, r0: usize, c0: usize, mr: usize) -> (*mut f32, usize) {
        let stride = Self::stride(&self.rows);
        match &mut self.matrix {
            Some(m) => {
                let at = (c0 - self.cols.start) * stride + (r0 - self.rows.start);
                (aligned(&mut m.0)[at..].as_mut_ptr(), stride)
            }
            None => (self.tile.0.as_mut_ptr(), mr),
        }
    }

    fn tile(&self, rows: Range<usize>, cols: Range<usize>, mr: usize) -> Tile<'_> {
        let (values, stride) = match &self.matrix {
            Some(m) => {
                let stride = Self::stride(&self.rows);
                let at = (cols.start - self.cols.start) * stride + (rows.start - self.rows.start);
                let skip = m.0.as_ptr().align_offset(ALIGN * 4).min(m.0.len());
                (&m.0[skip + at..], stride)
            }
            None => (&self.tile.0[..], mr),
        };
        Tile {
            rows,
            cols,
            values,
            stride,
        }
    }
}

/// Rows `pixels` x columns `channels` of `activations * weights` (pixels contiguous in the
/// activations: `pixel_stride == 1`), each tile handed to `epilogue`. The weights are
/// channel-major (`width` 0).
///
/// # Safety
/// Every activation addressed for the pixels and the weights' depth must be readable.
#[inline(always)]
pub(super) unsafe fn pixels_by_channels(
    isa: Isa,
    pixels: Range<usize>,
    channels: Range<usize>,
    act: Activations,
    weights: &Packed,
    w: &[f32],
    mut epilogue: impl FnMut(Tile),
) {
    debug_assert!(act.pixel_stride == 1 && weights.width == 0 && act.depth() == weights.depth);
    let (mr, nr) = (isa.mr, isa.nr);
    let passes = passes(&act);
    // Few channels (a few panels of weights): the micro-kernels read whole row blocks of the
    // activations in place, as `gemm` does (a packed copy is read too few times to pay).
    let in_place = channels.len() <= IN_PLACE_CHANNELS && act.segments.len() == 1 && act.grid.is_none();
    // Rows in chunks whose packed activations (`[row block][depth][mr]`) fit in the L2 cache
    // beside the pass's weights.
    let most = (PACKED_VALUES / (KC.min(act.depth()).max(1) * mr)).max(1) * mr;
    // As even as whole row blocks allow (each chunk streams all the weights).
    let chunk = pixels
        .len()
        .div_ceil(pixels.len().div_ceil(most).max(1))
        .next_multiple_of(mr);
    let mut packed = Scratch::take(chunk * KC + ALIGN);
    let packed = aligned(&mut packed.0);
    for start in pixels.clone().step_by(chunk) {
        let rows = start..(start + chunk).min(pixels.end);
        let mut acc = Accumulator::new(passes.len(), rows.clone(), channels.clone());
        for (p, pass) in passes.iter().enumerate() {
            let last = p + 1 == passes.len();
            let d0 = pass[0].depth;
            let depth: usize = pass.iter().map(|piece| piece.range.len()).sum();
            for (b, r0) in rows.clone().step_by(mr).enumerate() {
                let rb = mr.min(rows.end - r0);
                if in_place && rb == mr {
                    continue;
                }
                let a = &mut packed[b * depth * mr..][..depth * mr];
                // SAFETY: the caller vouches for the activations.
                unsafe {
                    match (act.grid, mr, rb == mr) {
                        (Some(grid), ..) => pack_grid(a, mr, &act, grid, pass, r0, rb),
                        (None, 64, true) => pack_full::<64>(a, &act, pass, r0),
                        (None, 16, true) => pack_full::<16>(a, &act, pass, r0),
                        _ => pack_part(a, mr, &act, pass, r0, rb),
                    }
                }
            }
            // A panel of weights (`depth x nr`) stays in the L1 cache while every row block's
            // packed activations stream past it.
            for c0 in channels.clone().step_by(nr) {
                let cb = nr.min(channels.end - c0);
                let (rhs, rhs_rs, rhs_cs) = weights.at(w, c0, d0);
                for (b, r0) in rows.clone().step_by(mr).enumerate() {
                    let rb = mr.min(rows.end - r0);
                    let (dst, stride) = acc.at(r0, c0, mr);
                    let (lhs, lhs_cs) = if in_place && rb == mr {
                        let at = pass[0].range.start * act.depth_stride + r0;
                        // SAFETY: the caller vouches for the activations.
                        (unsafe { act.segments[0].start.add(at) }, act.depth_stride)
                    } else {
                        (packed[b * depth * mr..].as_ptr(), mr)
                    };
                    // SAFETY: `packed` holds `depth` columns of `mr` values per row block, the
                    // panel `depth` rows of `nr` from `d0`, the accumulator `cb` columns of
                    // `rb` at `dst`.
                    unsafe {
                        isa.kernel(rb, cb)(
                            rb,
                            cb,
                            depth,
                            dst,
                            lhs,
                            rhs,
                            stride as isize,
                            1,
                            lhs_cs as isize,
                            rhs_rs,
                            rhs_cs,
                            if p == 0 { 0.0 } else { 1.0 },
                            1.0,
                            u8::from(p > 0),
                            false,
                            false,
                            false,
                            std::ptr::null(),
                        )
                    };
                    if last {
                        epilogue(acc.tile(r0..r0 + rb, c0..c0 + cb, mr));
                    }
                }
            }
        }
    }
}

/// One micro-kernel tile: `dst` (`rows x cols`, column-major, columns `dst_cs` apart) becomes
/// `lhs * rhs`, `lhs` in columns of `rows` values `lhs_cs` apart (one per step of the depth),
/// `rhs` `depth x cols` at strides (along the depth, between columns).
///
/// # Safety
/// `rows <= isa.mr`, `cols <= isa.nr`, and every value addressed must be in bounds.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile_product(
    isa: Isa,
    (rows, cols, depth): (usize, usize, usize),
    dst: *mut f32,
    dst_cs: usize,
    lhs: *const f32,
    lhs_cs: usize,
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    // SAFETY: the caller vouches for the sizes and the pointers.
    unsafe {
        isa.kernel(rows, cols)(
            rows,
            cols,
            depth,
            dst,
            lhs,
            rhs,
            dst_cs as isize,
            1,
            lhs_cs as isize,
            rhs_rs as isize,
            rhs_cs as isize,
            0.0,
            1.0,
            0,
            false,
            false,
            false,
            std::ptr::null(),
        )
    }
}

/// Packs `MR` pixels from `r0` of the pass's depth into `a` (`[depth][MR]`): copies of a
/// length known at compile time, a few vector moves each.
///
/// # Safety
/// As [`pixels_by_channels`].
#[inline(always)]
unsafe fn pack_full<const MR: usize>(a: &mut [f32], act: &Activations, pass: &[Piece], r0: usize) {
    let mut columns = a.as_chunks_mut::<MR>().0.iter_mut();
    for piece in pass {
        let seg = act.segments[piece.seg].start;
        for (i, to) in piece.range.clone().zip(&mut columns) {
            // SAFETY: the caller vouches for the activations.
            let from = unsafe { &*(seg.add(i * act.depth_stride + r0) as *const [f32; MR]) };
            // In pieces of 16 (whole copies of 256 bytes become calls to memcpy).
            for (to, from) in to
                .as_chunks_mut::<16>()
                .0
                .iter_mut()
                .zip(from.as_chunks::<16>().0)
            {
                *to = *from;
            }
        }
    }
}

/// [`pack_full`] for `rb < mr` pixels, the rest of each column zeros.
///
/// # Safety
/// As [`pixels_by_channels`].
#[inline(always)]
unsafe fn pack_part(a: &mut [f32], mr: usize, act: &Activations, pass: &[Piece], r0: usize, rb: usize) {
    let mut columns = a.chunks_exact_mut(mr);
    for piece in pass {
        let seg = act.segments[piece.seg].start;
        for (i, to) in piece.range.clone().zip(&mut columns) {
            // SAFETY: the caller vouches for the activations.
            let from = unsafe { std::slice::from_raw_parts(seg.add(i * act.depth_stride + r0), rb) };
            to[..rb].copy_from_slice(from);
            to[rb..].fill(0.0);
        }
    }
}

/// [`pack_part`] for pixels on a [`Grid`]: each row of the grid the pixels cross is a run,
/// copied (`col_step` 1) or gathered.
///
/// # Safety
/// As [`pixels_by_channels`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_grid(
    a: &mut [f32],
    mr: usize,
    act: &Activations,
    grid: Grid,
    pass: &[Piece],
    r0: usize,
    rb: usize,
) {
    // (first in the column, offset of its first pixel, length), one per grid row crossed.
    let mut runs = [(0, 0, 0); MAX_MR];
    let mut n = 0;
    let mut p = r0;
    while p < r0 + rb && n < runs.len() {
        let (row, col) = (p / grid.width, p % grid.width);
        let len = (grid.width - col).min(r0 + rb - p);
        runs[n] = (p - r0, row * grid.row_step + col * grid.col_step, len);
        n += 1;
        p += len;
    }
    let mut columns = a.chunks_exact_mut(mr);
    for piece in pass {
        let seg = act.segments[piece.seg].start;
        for (i, to) in piece.range.clone().zip(&mut columns) {
            // SAFETY: the caller vouches for the activations.
            let base = unsafe { seg.add(i * act.depth_stride) };
            for &(at, from, len) in &runs[..n] {
                let to = &mut to[at..at + len];
                if grid.col_step == 1 {
                    // SAFETY: as above.
                    to.copy_from_slice(unsafe { std::slice::from_raw_parts(base.add(from), len) });
                } else {
                    for (j, v) in to.iter_mut().enumerate() {
                        // SAFETY: as above.
                        *v = unsafe { *base.add(from + j * grid.col_step) };
                    }
                }
            }
            to[rb..].fill(0.0);
        }
    }
}

/// Rows `channels` x columns `pixels` of `weights' * activations'` (the transposed product:
/// the output's channels contiguous), each tile handed to `epilogue`. `channels.start` is a
/// multiple of `weights.width`, which is `isa.mr`.
///
/// # Safety
/// Every activation addressed for the pixels and the weights' depth must be readable.
#[inline(always)]
pub(super) unsafe fn channels_by_pixels(
    isa: Isa,
    channels: Range<usize>,
    pixels: Range<usize>,
    act: Activations,
    weights: &Packed,
    w: &[f32],
    mut epilogue: impl FnMut(Tile),
) {
    debug_assert!(weights.width == isa.mr && act.depth() == weights.depth);
    let (mr, nr) = (isa.mr, isa.nr);
    let passes = passes(&act);
    let mut acc = Accumulator::new(passes.len(), channels.clone(), pixels.clone());
    for (p, pass) in passes.iter().enumerate() {
        let last = p + 1 == passes.len();
        for p0 in pixels.clone().step_by(nr) {
            let pb = nr.min(pixels.end - p0);
            for c0 in channels.clone().step_by(mr) {
                let cb = mr.min(channels.end - c0);
                let kernel = isa.kernel(cb, pb);
                let (dst, stride) = acc.at(c0, p0, mr);
                for (j, piece) in pass.iter().enumerate() {
                    let first = p == 0 && j == 0;
                    let d = piece.depth;
                    let at = piece.range.start * act.depth_stride + p0 * act.pixel_stride;
                    // SAFETY: the caller vouches for the activations; the panel holds `depth`
                    // rows of `mr`, the accumulator `pb` columns of `cb` at `dst`.
                    unsafe {
                        kernel(
                            cb,
                            pb,
                            piece.range.len(),
                            dst,
                            weights.at(w, c0, d).0,
                            act.segments[piece.seg].start.add(at),
                            stride as isize,
                            1,
                            mr as isize,
                            act.depth_stride as isize,
                            act.pixel_stride as isize,
                            if first { 0.0 } else { 1.0 },
                            1.0,
                            u8::from(!first),
                            false,
                            false,
                            false,
                            std::ptr::null(),
                        )
                    }
                }
                if last {
                    epilogue(acc.tile(c0..c0 + cb, p0..p0 + pb, mr));
                }
            }
        }
    }
}
