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
use super::{Scratch, SendPtr, activate, for_each_part, matmul, signed, split, threads};

/// Smallest output for which Winograd is used (tiles of 2x2 output pixels): below, the 16
/// products are too small for the matrix kernels to run near their peak (Inception V3's 8x8
/// maps, measured slower than the direct products on an AMD EPYC).
const MIN_TILES: usize = 100;
/// Fewest input channels for Winograd: the products are over the input channels, and with
/// fewer (Inception V3's 32-channel stem convolutions) they run far below the kernels' peak
/// (measured 2x slower than the direct products on an AMD EPYC).
const MIN_CHANNELS: usize = 64;

/// Whether Winograd F(2x2, 3x3) applies to `g` and is worth it.
pub(super) fn suits(g: &Geometry) -> bool {
    let (th, tw) = tiles(g);
    g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1 && th * tw >= MIN_TILES && g.c >= MIN_CHANNELS
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
