//! Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions: every 4x4 tile of the padded input
//! (stride 2) is transformed (`V = Bt d B`), the 16 transformed positions are 16 independent
//! matrix products with the transformed weights (`M = V U`, `U = G g Gt`, over the input
//! channels), and every product tile gives 2x2 output pixels (`Y = At M A`). 16 products of
//! 4 values per 4 output pixels instead of 36: 2.25x fewer multiply-adds, for transforms that
//! are additions only. The transforms' constants are 0, ±1 and ±1/2, so rounding stays at
//! the level of a direct convolution's (checked against tract in the kernels' tests).
//!
//! Layouts follow the input's: channels last, `V` is `[16][tiles][c]` and `M` `[16][tiles][o]`;
//! channels first, `[16][c][tiles]` and `[16][o][tiles]`, so every transform loop runs over
//! contiguous values.

use super::conv::{Geometry, pad_to};
use super::panel::{self, ALIGN, Isa, MAX_MR, aligned};
use super::{Scratch, SendPtr, activate, for_each_part, matmul, signed, split, threads};

/// Smallest output for which Winograd is used (tiles of 2x2 output pixels): below, the 16
/// products are too small for the matrix kernels to run near their peak (Inception V3's 8x8
/// maps, measured slower than the direct products on an AMD EPYC).
const MIN_TILES: usize = 100;
/// Fewest input channels for Winograd: the products are over the input channels. Through
/// `gemm::gemm` ([`run`]), fewer (Inception V3's 32-channel stem convolutions) ran far below
/// the kernels' peak (measured 2x slower than the direct products on an AMD EPYC).
const MIN_CHANNELS: usize = 64;
/// The same on our micro-kernels, block by block ([`run_panels`]): Inception V3's two
/// 147x147 stem convolutions of 32 input channels are faster by Winograd there (Intel Xeon,
/// 1 thread: 9.6 -> 7.2 ms together, the whole model 0.953 in a paired comparison).
const MIN_CHANNELS_PANELS: usize = 32;

/// Whether Winograd F(2x2, 3x3) applies to `g` and is worth it; `panels`: whether it would
/// run on our micro-kernels ([`run_panels`]).
pub(super) fn suits(g: &Geometry, panels: bool) -> bool {
    let (th, tw) = tiles(g);
    let min_channels = if panels { MIN_CHANNELS_PANELS } else { MIN_CHANNELS };
    g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1 && th * tw >= MIN_TILES && g.c >= min_channels
}

/// Tiles down and across.
fn tiles(g: &Geometry) -> (usize, usize) {
    (g.ho.div_ceil(2), g.wo.div_ceil(2))
}

/// The transformed weights `U`: 16 matrices `c x o` of [`u_strides`], from the convolution's
/// weights (`[3 * 3 * c, o]` of [`Geometry::weight_strides`]).
#[allow(clippy::needless_range_loop)] // the transform reads clearest indexed
pub(super) fn transform_weights(g: &Geometry, weights: &[f32], u: &mut [f32]) {
    let (c, o) = (g.c, g.o);
    let (ws, us) = (g.weight_strides(), u_strides(g));
    for ci in 0..c {
        for oo in 0..o {
            let w = |ky: usize, kx: usize| weights[((ky * 3 + kx) * c + ci) * ws.0 + oo * ws.1];
            // t = G g (4x3), then U = t Gt (4x4).
            let mut t = [[0f32; 3]; 4];
            for kx in 0..3 {
                let (g0, g1, g2) = (w(0, kx), w(1, kx), w(2, kx));
                t[0][kx] = g0;
                t[1][kx] = 0.5 * (g0 + g1 + g2);
                t[2][kx] = 0.5 * (g0 - g1 + g2);
                t[3][kx] = g2;
            }
            for (xi, row) in t.iter().enumerate() {
                let [a, b, cc] = *row;
                let values = [a, 0.5 * (a + b + cc), 0.5 * (a - b + cc), cc];
                for (nu, v) in values.into_iter().enumerate() {
                    u[(xi * 4 + nu) * c * o + ci * us.0 + oo * us.1] = v;
                }
            }
        }
    }
}

/// (between input channels, between output channels) of each of the 16 matrices of `U`: as
/// the convolution's weights are laid out, for the same reason.
fn u_strides(g: &Geometry) -> (usize, usize) {
    if g.channels_last { (g.o, 1) } else { (1, g.c) }
}

/// One image: `x` its input, `y` its output, `u` the transformed weights.
pub(super) fn run(g: &Geometry, u: &[f32], x: &[f32], y: &mut [f32], bias: &[f32], relu: bool) {
    let (th, tw) = tiles(g);
    let t = th * tw;
    let (hp, wp) = (2 * th + 2, 2 * tw + 2);
    let padded = pad_to(g, x, (hp, wp));
    let (c, o) = (g.c, g.o);
    // Both written whole before they are read.
    let mut v = Scratch::take(16 * t * c);
    let mut m = Scratch::take(16 * t * o);
    let (v, m) = (&mut v.0[..16 * t * c], &mut m.0[..16 * t * o]);
    let parts = threads();

    // V = Bt d B, per tile and channel.
    let v_ptr = SendPtr(v.as_mut_ptr());
    let v_len = v.len();
    if g.channels_last {
        let ranges = split(t, parts, 1);
        for_each_part(ranges.len(), |part| {
            // SAFETY: parts write the disjoint tiles of their range.
            let v = unsafe { std::slice::from_raw_parts_mut(v_ptr.get(), v_len) };
            let mut rows = vec![0f32; 4 * 4 * c];
            for tile in ranges[part].clone() {
                let (ty, tx) = (tile / tw, tile % tw);
                let row = |i: usize| &padded[((2 * ty + i) * wp + 2 * tx) * c..][..4 * c];
                let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                let (t0, rest) = rows.split_at_mut(4 * c);
                let (t1, rest) = rest.split_at_mut(4 * c);
                let (t2, t3) = rest.split_at_mut(4 * c);
                for k in 0..4 * c {
                    t0[k] = r0[k] - r2[k];
                    t1[k] = r1[k] + r2[k];
                    t2[k] = r2[k] - r1[k];
                    t3[k] = r1[k] - r3[k];
                }
                for i in 0..4 {
                    let ti = &rows[i * 4 * c..][..4 * c];
                    let (a, b, cc, d) = (&ti[..c], &ti[c..2 * c], &ti[2 * c..3 * c], &ti[3 * c..]);
                    for (j, out) in [0, 1, 2, 3].into_iter().map(|j| (j, (4 * i + j) * t + tile)) {
                        let out = &mut v[out * c..][..c];
                        for k in 0..c {
                            out[k] = match j {
                                0 => a[k] - cc[k],
                                1 => b[k] + cc[k],
                                2 => cc[k] - b[k],
                                _ => b[k] - d[k],
                            };
                        }
                    }
                }
            }
        });
    } else {
        let ranges = split(c, parts, 1);
        for_each_part(ranges.len(), |part| {
            // SAFETY: parts write the disjoint channels of their range.
            let v = unsafe { std::slice::from_raw_parts_mut(v_ptr.get(), v_len) };
            let mut rows = vec![0f32; 4 * wp];
            let (mut even, mut odd) = (vec![0f32; tw + 1], vec![0f32; tw + 1]);
            for ch in ranges[part].clone() {
                let plane = &padded[ch * hp * wp..][..hp * wp];
                for ty in 0..th {
                    let row = |i: usize| &plane[(2 * ty + i) * wp..][..wp];
                    let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                    let (t0, rest) = rows.split_at_mut(wp);
                    let (t1, rest) = rest.split_at_mut(wp);
                    let (t2, t3) = rest.split_at_mut(wp);
                    for k in 0..wp {
                        t0[k] = r0[k] - r2[k];
                        t1[k] = r1[k] + r2[k];
                        t2[k] = r2[k] - r1[k];
                        t3[k] = r1[k] - r3[k];
                    }
                    for i in 0..4 {
                        // Tile tx reads columns 2tx..2tx+4: even[tx], odd[tx], even[tx+1],
                        // odd[tx+1].
                        let ti = &rows[i * wp..][..wp];
                        for (k, pair) in ti.chunks_exact(2).enumerate() {
                            even[k] = pair[0];
                            odd[k] = pair[1];
                        }
                        let (e0, e1) = (&even[..tw], &even[1..tw + 1]);
                        let (o0, o1) = (&odd[..tw], &odd[1..tw + 1]);
                        let out = |j: usize| ((4 * i + j) * c + ch) * t + ty * tw;
                        let (a, b) = (out(0), out(1));
                        for (k, v) in v[a..a + tw].iter_mut().enumerate() {
                            *v = e0[k] - e1[k];
                        }
                        for (k, v) in v[b..b + tw].iter_mut().enumerate() {
                            *v = o0[k] + e1[k];
                        }
                        let (a, b) = (out(2), out(3));
                        for (k, v) in v[a..a + tw].iter_mut().enumerate() {
                            *v = e1[k] - o0[k];
                        }
                        for (k, v) in v[b..b + tw].iter_mut().enumerate() {
                            *v = o0[k] - o1[k];
                        }
                    }
                }
            }
        });
    }

    // M = V U: 16 products, split over the threads.
    let (lhs_strides, dst_strides) = if g.channels_last {
        ((c, 1), (o, 1))
    } else {
        ((1, t), (1, t))
    };
    let (v_ptr, u_ptr, m_ptr) = (
        SendPtr(v.as_mut_ptr()),
        SendPtr(u.as_ptr() as *mut f32),
        SendPtr(m.as_mut_ptr()),
    );
    let ranges = split(16, parts, 1);
    for_each_part(ranges.len(), |part| {
        for k in ranges[part].clone() {
            // SAFETY: product k reads V's and U's k-th blocks and writes M's k-th block.
            unsafe {
                matmul(
                    (t, o, c),
                    m_ptr.get().add(k * t * o),
                    signed(dst_strides),
                    false,
                    v_ptr.get().add(k * t * c),
                    signed(lhs_strides),
                    u_ptr.get().add(k * c * o),
                    signed(u_strides(g)),
                )
            }
        }
    });

    // Y = At M A, plus bias and ReLU.
    let apply = |v: f32, b: f32| activate(v, b, relu);
    let y_ptr = SendPtr(y.as_mut_ptr());
    let y_len = y.len();
    let (ho, wo) = (g.ho, g.wo);
    if g.channels_last {
        let ranges = split(t, parts, 1);
        for_each_part(ranges.len(), |part| {
            // SAFETY: parts write the disjoint output pixels of their tiles.
            let y = unsafe { std::slice::from_raw_parts_mut(y_ptr.get(), y_len) };
            let mut r = vec![0f32; 2 * 4 * o];
            for tile in ranges[part].clone() {
                let (ty, tx) = (tile / tw, tile % tw);
                let mk = |k: usize| &m[(k * t + tile) * o..][..o];
                for nu in 0..4 {
                    let (m0, m1, m2, m3) = (mk(nu), mk(4 + nu), mk(8 + nu), mk(12 + nu));
                    let (r0, r1) = r.split_at_mut(4 * o);
                    let (r0, r1) = (&mut r0[nu * o..][..o], &mut r1[nu * o..][..o]);
                    for k in 0..o {
                        r0[k] = m0[k] + m1[k] + m2[k];
                        r1[k] = m1[k] - m2[k] - m3[k];
                    }
                }
                for i in 0..2 {
                    let yy = 2 * ty + i;
                    if yy >= ho {
                        continue;
                    }
                    let ri = &r[i * 4 * o..][..4 * o];
                    let (a, b, cc, d) = (&ri[..o], &ri[o..2 * o], &ri[2 * o..3 * o], &ri[3 * o..]);
                    for j in 0..2 {
                        let xx = 2 * tx + j;
                        if xx >= wo {
                            continue;
                        }
                        let out = &mut y[(yy * wo + xx) * o..][..o];
                        for k in 0..o {
                            let v = if j == 0 {
                                a[k] + b[k] + cc[k]
                            } else {
                                b[k] - cc[k] - d[k]
                            };
                            out[k] = apply(v, bias[k]);
                        }
                    }
                }
            }
        });
    } else {
        let ranges = split(o, parts, 1);
        for_each_part(ranges.len(), |part| {
            // SAFETY: parts write the disjoint output channels of their range.
            let y = unsafe { std::slice::from_raw_parts_mut(y_ptr.get(), y_len) };
            let mut r = vec![0f32; 2 * 4 * tw];
            let mut pairs = vec![0f32; 2 * tw];
            for oo in ranges[part].clone() {
                let b = bias[oo];
                for ty in 0..th {
                    let mk = |k: usize| &m[(k * o + oo) * t + ty * tw..][..tw];
                    for nu in 0..4 {
                        let (m0, m1, m2, m3) = (mk(nu), mk(4 + nu), mk(8 + nu), mk(12 + nu));
                        let (r0, r1) = r.split_at_mut(4 * tw);
                        let (r0, r1) = (&mut r0[nu * tw..][..tw], &mut r1[nu * tw..][..tw]);
                        for k in 0..tw {
                            r0[k] = m0[k] + m1[k] + m2[k];
                            r1[k] = m1[k] - m2[k] - m3[k];
                        }
                    }
                    for i in 0..2 {
                        let yy = 2 * ty + i;
                        if yy >= ho {
                            continue;
                        }
                        let ri = &r[i * 4 * tw..][..4 * tw];
                        let (a, bb, cc, d) = (&ri[..tw], &ri[tw..2 * tw], &ri[2 * tw..3 * tw], &ri[3 * tw..]);
                        for (tx, pair) in pairs.chunks_exact_mut(2).enumerate() {
                            pair[0] = apply(a[tx] + bb[tx] + cc[tx], b);
                            pair[1] = apply(bb[tx] - cc[tx] - d[tx], b);
                        }
                        y[(oo * ho + yy) * wo..][..wo].copy_from_slice(&pairs[..wo]);
                    }
                }
            }
        });
    }
}

/// A run of consecutive tiles in one tile row: `len` tiles from (`ty`, `tx`), rows `at..` of
/// their block.
#[derive(Clone, Copy, Default)]
struct Run {
    at: usize,
    ty: usize,
    tx: usize,
    len: usize,
}

/// The runs of the `len` tiles from tile `first` (raster order, `tw` tiles across): at most
/// one per tile row they cross.
fn runs(first: usize, len: usize, tw: usize) -> impl Iterator<Item = Run> {
    let mut tile = first;
    std::iter::from_fn(move || {
        (tile < first + len).then(|| {
            let (ty, tx) = (tile / tw, tile % tw);
            let n = (tw - tx).min(first + len - tile);
            let run = Run {
                at: tile - first,
                ty,
                tx,
                len: n,
            };
            tile += n;
            run
        })
    })
}

/// Values the transforms' loops may run past a run's last tile (they run over whole vectors).
const SLACK: usize = 16;

widest! {
    /// [`run`] for channels first on our micro-kernels, every transform in the caches: the
    /// tiles go in blocks of [`Isa::mr`] (raster order). For a block, the input transform
    /// writes `V` straight in the layout the micro-kernels read (`[16][c][mr]`: each of the
    /// 16 left matrices a packed panel); then for each panel of [`Isa::nr`] output channels
    /// the 16 products land in a buffer of 16 tiles (24 KB on AVX-512) that the output
    /// transform reads at once. Neither `V` (480 KB for 96 channels) nor `M` leaves the
    /// caches, where [`run`] writes and reads both whole (4 MB for a 35x35 96 -> 96
    /// convolution). The padded input is kept with each row's even and odd columns apart,
    /// so that every transform loop reads and writes contiguous values.
    pub(super) fn run_panels(
        g: &Geometry,
        isa: Isa,
        u: &[f32],
        x: &[f32],
        y: &mut [f32],
        bias: &[f32],
        relu: bool,
    ) {
        let (th, tw) = tiles(g);
        let t = th * tw;
        let (c, o, mr, nr) = (g.c, g.o, isa.mr, isa.nr);
        let (ho, wo) = (g.ho, g.wo);
        debug_assert!(u.len() == 16 * c * o && y.len() == o * ho * wo && mr <= MAX_MR);
        let split_input = split_columns(g, x);
        let split_input: &[f32] = &split_input.0;
        // Tiles split evenly (in whole vectors), then each part's in blocks: a part of whole
        // blocks could hold one more than another (35x35: 6 blocks, the last of 4 tiles).
        let ranges = split(t, threads(), 16);
        let y_ptr = SendPtr(y.as_mut_ptr());
        let y_len = y.len();
        // Between two columns of a block's `V`: the transform may write past a column's
        // last tile.
        let cs = mr + SLACK;
        let avx512 = avx512::available();
        for_each_part(ranges.len(), |part| {
            // SAFETY: parts write the output pixels of their disjoint tiles.
            let y = unsafe { std::slice::from_raw_parts_mut(y_ptr.get(), y_len) };
            // Zeroed: the loops over whole vectors read past what they wrote (finite values,
            // never denormal garbage).
            let mut v = Scratch::take(16 * c * cs + ALIGN);
            let v = &mut v.0[..16 * c * cs + ALIGN];
            v.fill(0.0);
            let v = aligned(v);
            let mut m = Scratch::take(16 * mr * nr + SLACK + ALIGN);
            let m = &mut m.0[..16 * mr * nr + SLACK + ALIGN];
            m.fill(0.0);
            let m = aligned(m);
            let mut tile_runs = [Run::default(); MAX_MR];
            let mine = ranges[part].clone();
            for first in mine.clone().step_by(mr) {
                let rb = mr.min(mine.end - first);
                let mut n = 0;
                for run in runs(first, rb, tw) {
                    tile_runs[n] = run;
                    n += 1;
                }
                let tile_runs = &tile_runs[..n];
                if avx512 {
                    // SAFETY: this CPU has AVX-512F.
                    unsafe { avx512::transform_input(split_input, g, (c, cs), tile_runs, v) }
                } else {
                    transform_input(split_input, g, (c, cs), tile_runs, v);
                }
                if rb < mr {
                    // Rows the micro-kernels may load past the block's last tile.
                    for column in v.chunks_exact_mut(cs).take(16 * c) {
                        column[rb..mr].fill(0.0);
                    }
                }
                for c0 in (0..o).step_by(nr) {
                    let cb = nr.min(o - c0);
                    for k in 0..16 {
                        // SAFETY: `V`'s k-th panel holds `c` columns of `mr` values `cs`
                        // apart, `U`'s k-th matrix `o` channels of `c` values, `m` 16 tiles
                        // of `mr x nr`.
                        unsafe {
                            panel::tile_product(
                                isa,
                                (rb, cb, c),
                                m[k * mr * nr..].as_mut_ptr(),
                                mr,
                                v[k * c * cs..].as_ptr(),
                                cs,
                                u[k * c * o + c0 * c..].as_ptr(),
                                (1, c),
                            )
                        }
                    }
                    for j in 0..cb {
                        let ch = c0 + j;
                        if let (Some(first), Some(last)) = (tile_runs.first(), tile_runs.last()) {
                            let rows = 2 * first.ty..(2 * last.ty + 2).min(ho);
                            let ahead = (ch + AHEAD) * ho * wo;
                            prefetch(y.get(ahead + rows.start * wo..ahead + rows.end * wo).unwrap_or_default());
                        }
                        let out = &mut y[ch * ho * wo..][..ho * wo];
                        let (layout, bias) = ((mr, nr), bias[ch]);
                        if avx512 {
                            // SAFETY: this CPU has AVX-512F.
                            unsafe { avx512::transform_output(m, layout, j, tile_runs, (ho, wo), out, bias, relu) }
                        } else {
                            transform_output(m, layout, j, tile_runs, (ho, wo), out, bias, relu);
                        }
                    }
                }
            }
        });
    }
}

/// Asks the cache for `values` ahead of their use: the transforms read each channel's rows of
/// a block (a few hundred bytes) and write its output rows, short runs the hardware
/// prefetchers do not follow from one channel's plane to the next.
#[inline(always)]
fn prefetch(values: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in values.chunks(16) {
        // SAFETY: a prefetch only hints the cache, and the address is in `values`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// Channels ahead the transforms prefetch.
const AHEAD: usize = 4;

/// The values of `run`'s rows in channel `ch`'s plane of [`split_columns`]'s layout, from
/// the first run's first row to the last run's last.
fn block_rows<'a>(split: &'a [f32], g: &Geometry, ch: usize, runs: &[Run]) -> &'a [f32] {
    let (half, hp) = (half_row(g), 2 * tiles(g).0 + 2);
    let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
        return &[];
    };
    let rows = 2 * first.ty..2 * last.ty + 4;
    split
        .get((ch * hp + rows.start) * 2 * half..(ch * hp + rows.end) * 2 * half)
        .unwrap_or_default()
}

/// Row length of one parity in [`split_columns`]'s layout: a tile row's even or odd columns.
fn half_row(g: &Geometry) -> usize {
    tiles(g).1 + 1
}

/// The input zero-padded to whole tiles (`2 * th + 2` rows of `2 * tw + 2`), each row's even
/// columns then its odd ones (`[c][rows][2][tw + 1]`), and [`SLACK`] values more for the
/// transform's whole vectors.
fn split_columns(g: &Geometry, x: &[f32]) -> Scratch {
    let (th, _) = tiles(g);
    let (hp, half) = (2 * th + 2, half_row(g));
    let len = g.c * hp * 2 * half;
    let mut out = Scratch::take(len + 2 * SLACK + 1);
    out.0[..len + 2 * SLACK + 1].fill(0.0);
    let (top, left) = (g.pad[0], g.pad[1]);
    // Input column 2k lands at padded column 2k + left, 2k + 1 at 2k + 1 + left: with an even
    // left padding at index k + left / 2 of the even and the odd half; with an odd one, at
    // k + left / 2 of the odd half and k + left / 2 + 1 of the even one.
    let swapped = left % 2 == 1;
    let (evens_at, odds_at) = (left / 2, left / 2 + usize::from(swapped));
    for ch in 0..g.c {
        for yy in 0..g.h {
            let from = &x[(ch * g.h + yy) * g.w..][..g.w];
            let row = &mut out.0[(ch * hp + yy + top) * 2 * half..][..2 * half];
            let (pairs, rest) = from.as_chunks::<2>();
            let (a, b) = row.split_at_mut(half);
            let (evens, odds) = if swapped { (b, a) } else { (a, b) };
            let (evens, odds) = (
                &mut evens[evens_at..][..pairs.len() + rest.len()],
                &mut odds[odds_at..][..pairs.len()],
            );
            for (k, pair) in pairs.iter().enumerate() {
                evens[k] = pair[0];
                odds[k] = pair[1];
            }
            if let [last] = rest {
                evens[pairs.len()] = *last;
            }
        }
    }
    out
}

/// `V = Bt d B` for the tiles of `runs` (a block) and every channel of the input in
/// [`split_columns`]'s layout, into `v` (`[16][c]` columns `cs` apart, the tile at row
/// `run.at + i` of its block). Runs over whole vectors: a run's column gets up to [`SLACK`]
/// values past its end, which the next run (or nothing) overwrites.
#[inline(always)]
fn transform_input(split: &[f32], g: &Geometry, (c, cs): (usize, usize), runs: &[Run], v: &mut [f32]) {
    const L: usize = MAX_MR + 2 * SLACK;
    let half = half_row(g);
    let hp = 2 * tiles(g).0 + 2;
    // The 4 rows of `Bt d`, even and odd columns.
    let mut te = [[0f32; L]; 4];
    let mut to = [[0f32; L]; 4];
    for ch in 0..c {
        prefetch(block_rows(split, g, ch + AHEAD, runs));
        let plane = &split[ch * hp * 2 * half..];
        for run in runs {
            // Tile tx reads columns 2tx..2tx+4: even[tx], odd[tx], even[tx+1], odd[tx+1].
            let len = run.len.next_multiple_of(SLACK);
            let width = len + SLACK;
            let row = |i: usize, odd: bool| {
                &plane[((2 * run.ty + i) * 2 + usize::from(odd)) * half + run.tx..][..width]
            };
            for (t, odd) in [(&mut te, false), (&mut to, true)] {
                let (r0, r1, r2, r3) = (row(0, odd), row(1, odd), row(2, odd), row(3, odd));
                let [t0, t1, t2, t3] = t;
                let rows = r0.iter().zip(r1).zip(r2.iter().zip(r3));
                let ts = (t0[..width].iter_mut().zip(&mut t1[..width]))
                    .zip(t2[..width].iter_mut().zip(&mut t3[..width]));
                for (((t0, t1), (t2, t3)), ((r0, r1), (r2, r3))) in ts.zip(rows) {
                    *t0 = r0 - r2;
                    *t1 = r1 + r2;
                    *t2 = r2 - r1;
                    *t3 = r1 - r3;
                }
            }
            for i in 0..4 {
                let (e0, e1) = (&te[i][..len], &te[i][1..len + 1]);
                let (o0, o1) = (&to[i][..len], &to[i][1..len + 1]);
                let out = |j: usize| ((4 * i + j) * c + ch) * cs + run.at;
                let (a, b, cc, d) = (out(0), out(1), out(2), out(3));
                for (v, (x, y)) in v[a..a + len].iter_mut().zip(e0.iter().zip(e1)) {
                    *v = x - y;
                }
                for (v, (x, y)) in v[b..b + len].iter_mut().zip(o0.iter().zip(e1)) {
                    *v = x + y;
                }
                for (v, (x, y)) in v[cc..cc + len].iter_mut().zip(e1.iter().zip(o0)) {
                    *v = x - y;
                }
                for (v, (x, y)) in v[d..d + len].iter_mut().zip(o0.iter().zip(o1)) {
                    *v = x - y;
                }
            }
        }
    }
}

/// `Y = At M A` plus the bias and ReLU for column `j` of the 16 product tiles in `m`
/// (`[16][nr][mr]`, then [`SLACK`] values) over the tiles of `runs`, into `out`, that
/// channel's output plane.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn transform_output(
    m: &[f32],
    (mr, nr): (usize, usize),
    j: usize,
    runs: &[Run],
    (ho, wo): (usize, usize),
    out: &mut [f32],
    bias: f32,
    relu: bool,
) {
    const L: usize = MAX_MR + SLACK;
    let mut r = [[0f32; L]; 8];
    let mut pairs = [0f32; 2 * L];
    let mut ys = [[0f32; L]; 2];
    for run in runs {
        let len = run.len.next_multiple_of(SLACK);
        let mk = |k: usize| &m[(k * nr + j) * mr + run.at..][..len];
        for nu in 0..4 {
            let (m0, m1, m2, m3) = (mk(nu), mk(4 + nu), mk(8 + nu), mk(12 + nu));
            let (r0, r1) = r.split_at_mut(4);
            let rs = r0[nu][..len].iter_mut().zip(&mut r1[nu][..len]);
            for ((r0, r1), ((m0, m1), (m2, m3))) in rs.zip(m0.iter().zip(m1).zip(m2.iter().zip(m3))) {
                *r0 = m0 + m1 + m2;
                *r1 = m1 - m2 - m3;
            }
        }
        let x0 = 2 * run.tx;
        let width = (2 * run.len).min(wo - x0);
        for i in 0..2 {
            let yy = 2 * run.ty + i;
            if yy >= ho {
                continue;
            }
            let [a, b, cc, d] = [&r[4 * i], &r[4 * i + 1], &r[4 * i + 2], &r[4 * i + 3]];
            let [y0, y1] = &mut ys;
            let (y0, y1) = (&mut y0[..len], &mut y1[..len]);
            for ((y0, y1), ((a, b), (cc, d))) in
                y0.iter_mut().zip(y1).zip(a.iter().zip(b).zip(cc.iter().zip(d)))
            {
                *y0 = activate(a + b + cc, bias, relu);
                *y1 = activate(b - cc - d, bias, relu);
            }
            // Interleaved in blocks of 16 pixel pairs (shuffles, not scalar moves).
            let (y0, y1) = (ys[0][..len].as_chunks::<16>().0, ys[1][..len].as_chunks::<16>().0);
            for ((to, y0), y1) in pairs[..2 * len]
                .as_chunks_mut::<32>()
                .0
                .iter_mut()
                .zip(y0)
                .zip(y1)
            {
                *to = std::array::from_fn(|i| if i % 2 == 0 { y0[i / 2] } else { y1[i / 2] });
            }
            out[yy * wo + x0..][..width].copy_from_slice(&pairs[..width]);
        }
    }
}

/// The transforms of [`run_panels`] in AVX-512 intrinsics, 16 tiles to a register: the
/// compiler keeps [`transform_input`]'s and [`transform_output`]'s intermediate rows in
/// memory, these keep every value in registers (Winograd convolutions 0.95 of the time with
/// the portable transforms, Inception V3 on an Intel Xeon). Same arithmetic, same order: the
/// same results.
mod avx512 {
    /// Whether this CPU runs them.
    pub(super) fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) use imp::{transform_input, transform_output};

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) use super::{transform_input, transform_output};

    #[cfg(target_arch = "x86_64")]
    mod imp {
        use std::arch::x86_64::*;

        use super::super::{Geometry, Run, half_row, tiles};

        /// `Bt d` down 4 rows.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn down([r0, r1, r2, r3]: [__m512; 4]) -> [__m512; 4] {
            [
                _mm512_sub_ps(r0, r2),
                _mm512_add_ps(r1, r2),
                _mm512_sub_ps(r2, r1),
                _mm512_sub_ps(r1, r3),
            ]
        }

        /// [`super::super::transform_input`].
        ///
        /// # Safety
        /// The CPU must have AVX-512F.
        #[target_feature(enable = "avx512f")]
        pub(in super::super) unsafe fn transform_input(
            split: &[f32],
            g: &Geometry,
            (c, cs): (usize, usize),
            runs: &[Run],
            v: &mut [f32],
        ) {
            let half = half_row(g);
            let hp = 2 * tiles(g).0 + 2;
            for ch in 0..c {
                super::super::prefetch(super::super::block_rows(split, g, ch + super::super::AHEAD, runs));
                let plane = &split[ch * hp * 2 * half..];
                for run in runs {
                    for q in (0..run.len).step_by(16) {
                        let at = run.tx + q;
                        // 17 values of each row: the last tile's next even and odd columns.
                        let rows = |odd: usize, next: usize| -> [__m512; 4] {
                            std::array::from_fn(|i| {
                                let row = &plane[((2 * run.ty + i) * 2 + odd) * half + at + next..][..16];
                                // SAFETY: 16 values, checked by the slice.
                                unsafe { _mm512_loadu_ps(row.as_ptr()) }
                            })
                        };
                        let (e0, o0) = (down(rows(0, 0)), down(rows(1, 0)));
                        let (e1, o1) = (down(rows(0, 1)), down(rows(1, 1)));
                        for i in 0..4 {
                            let values = [
                                _mm512_sub_ps(e0[i], e1[i]),
                                _mm512_add_ps(o0[i], e1[i]),
                                _mm512_sub_ps(e1[i], o0[i]),
                                _mm512_sub_ps(o0[i], o1[i]),
                            ];
                            for (j, values) in values.into_iter().enumerate() {
                                let to = &mut v[((4 * i + j) * c + ch) * cs + run.at + q..][..16];
                                // SAFETY: 16 values, checked by the slice.
                                unsafe { _mm512_storeu_ps(to.as_mut_ptr(), values) }
                            }
                        }
                    }
                }
            }
        }

        /// [`super::super::transform_output`].
        ///
        /// # Safety
        /// The CPU must have AVX-512F.
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::too_many_arguments)]
        pub(in super::super) unsafe fn transform_output(
            m: &[f32],
            (mr, nr): (usize, usize),
            j: usize,
            runs: &[Run],
            (ho, wo): (usize, usize),
            out: &mut [f32],
            bias: f32,
            relu: bool,
        ) {
            let b = _mm512_set1_ps(bias);
            let zero = _mm512_setzero_ps();
            // `f32::max(v, 0)`: 0 for a NaN too, as `_mm512_max_ps` returns its second operand
            // then.
            let finish = |v: __m512| {
                let v = _mm512_add_ps(v, b);
                if relu { _mm512_max_ps(v, zero) } else { v }
            };
            let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            for run in runs {
                let end = (2 * (run.tx + run.len)).min(wo);
                for q in (0..run.len).step_by(16) {
                    let mk: [__m512; 16] = std::array::from_fn(|k| {
                        let values = &m[(k * nr + j) * mr + run.at + q..][..16];
                        // SAFETY: 16 values, checked by the slice.
                        unsafe { _mm512_loadu_ps(values.as_ptr()) }
                    });
                    let r0: [__m512; 4] = std::array::from_fn(|nu| {
                        _mm512_add_ps(_mm512_add_ps(mk[nu], mk[4 + nu]), mk[8 + nu])
                    });
                    let r1: [__m512; 4] = std::array::from_fn(|nu| {
                        _mm512_sub_ps(_mm512_sub_ps(mk[4 + nu], mk[8 + nu]), mk[12 + nu])
                    });
                    let x0 = 2 * (run.tx + q);
                    let n = (end - x0).min(32);
                    for (i, [a, bb, cc, d]) in [r0, r1].into_iter().enumerate() {
                        let yy = 2 * run.ty + i;
                        if yy >= ho {
                            continue;
                        }
                        let y0 = finish(_mm512_add_ps(_mm512_add_ps(a, bb), cc));
                        let y1 = finish(_mm512_sub_ps(_mm512_sub_ps(bb, cc), d));
                        let to = &mut out[yy * wo + x0..][..n];
                        let (n0, n1) = (n.min(16), n.saturating_sub(16));
                        // SAFETY: the masks cover the first `n0` and the next `n1` of the `n`
                        // values of `to`.
                        unsafe {
                            _mm512_mask_storeu_ps(
                                to.as_mut_ptr(),
                                mask(n0),
                                _mm512_permutex2var_ps(y0, low, y1),
                            );
                            if n1 > 0 {
                                _mm512_mask_storeu_ps(
                                    to.as_mut_ptr().add(16),
                                    mask(n1),
                                    _mm512_permutex2var_ps(y0, high, y1),
                                );
                            }
                        }
                    }
                }
            }
        }

        /// The first `n` (at most 16) lanes.
        #[inline]
        fn mask(n: usize) -> __mmask16 {
            ((1u32 << n) - 1) as __mmask16
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::tune::pseudo_random;

    fn values(len: usize) -> Vec<f32> {
        let t = pseudo_random(&[len]);
        t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    /// The AVX-512 transforms compute what the portable ones do, bit for bit (the same sums in
    /// the same order), on a block that starts and ends inside tile rows, with an odd left
    /// padding and edge tiles. The kernel tests run one of the two, whichever the CPU takes.
    #[test]
    fn avx512_transforms_equal_the_portable_ones() {
        if !avx512::available() {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        let (c, o, h, w) = (5, 7, 13, 11);
        let g = Geometry {
            channels_last: false,
            batch: 1,
            c,
            o,
            h,
            w,
            kh: 3,
            kw: 3,
            sh: 1,
            sw: 1,
            pad: [1, 1, 1, 1],
            ho: h,
            wo: w,
            output_shape: [1, o, h, w].into_iter().collect(),
        };
        let x = values(c * h * w);
        let split = split_columns(&g, &x);
        let (th, tw) = tiles(&g);
        let (mr, nr) = (64, 6);
        let cs = mr + SLACK;
        let block: Vec<Run> = runs(tw + 2, (th * tw - tw - 3).min(mr), tw).collect();
        assert!(block.len() >= 3, "the block crosses tile rows");

        let (mut portable, mut simd) = (vec![0f32; 16 * c * cs], vec![0f32; 16 * c * cs]);
        transform_input(&split.0, &g, (c, cs), &block, &mut portable);
        // SAFETY: this CPU has AVX-512F.
        unsafe { avx512::transform_input(&split.0, &g, (c, cs), &block, &mut simd) };
        assert!(
            portable
                .iter()
                .zip(&simd)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert!(portable.iter().any(|v| *v != 0.0));

        let m = values(16 * mr * nr + SLACK);
        for relu in [false, true] {
            for j in 0..nr {
                let (mut portable, mut simd) = (vec![0f32; h * w], vec![0f32; h * w]);
                transform_output(&m, (mr, nr), j, &block, (h, w), &mut portable, 0.25, relu);
                // SAFETY: this CPU has AVX-512F.
                unsafe { avx512::transform_output(&m, (mr, nr), j, &block, (h, w), &mut simd, 0.25, relu) };
                assert!(
                    portable
                        .iter()
                        .zip(&simd)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "column {j}, relu {relu}"
                );
                assert!(portable.iter().any(|v| *v != 0.0));
            }
        }
    }
}
