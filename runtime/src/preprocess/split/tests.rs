//! The split decode against libjpeg-turbo's one-thread decode, byte for byte.

use jpeg_encoder::{ColorType, Encoder, SamplingFactor};

use super::layout::Layout;
use super::*;

/// A photo-like picture: gradients, texture and edges, so that blocks carry many
/// coefficients of every size.
fn picture(width: usize, height: usize) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let noise = ((x * 7919 + y * 104_729) ^ (x * y)) % 61;
            let edge = if (x / 37 + y / 23) % 2 == 0 { 60 } else { 0 };
            rgb.push(((x * 255 / width) + noise) as u8);
            rgb.push(((y * 255 / height) as u8).wrapping_add(edge));
            rgb.push((96 + (x ^ y) % 97 + noise / 2) as u8);
        }
    }
    rgb
}

struct Jpeg {
    sampling: SamplingFactor,
    grey: bool,
    optimised: bool,
    restart: u16,
    progressive: bool,
}

const PLAIN: Jpeg = Jpeg {
    sampling: SamplingFactor::R_4_2_0,
    grey: false,
    optimised: false,
    restart: 0,
    progressive: false,
};

fn encode(width: usize, height: usize, how: &Jpeg) -> Vec<u8> {
    let rgb = picture(width, height);
    let mut out = Vec::new();
    let mut encoder = Encoder::new(&mut out, 90);
    encoder.set_sampling_factor(how.sampling);
    encoder.set_optimized_huffman_tables(how.optimised);
    encoder.set_restart_interval(how.restart);
    encoder.set_progressive(how.progressive);
    let (w, h) = (width as u16, height as u16);
    if how.grey {
        let luma: Vec<u8> = rgb.chunks_exact(3).map(|p| p[1]).collect();
        encoder.encode(&luma, w, h, ColorType::Luma).unwrap();
    } else {
        encoder.encode(&rgb, w, h, ColorType::Rgb).unwrap();
    }
    out
}

/// libjpeg-turbo's one-thread decode at 1/`denom` scale.
fn whole(jpeg: &[u8], denom: usize) -> (Vec<u8>, usize, usize) {
    let mut d = turbojpeg::Decompressor::new().unwrap();
    let scaling = turbojpeg::ScalingFactor::new(1, denom);
    d.set_scaling_factor(scaling).unwrap();
    let header = d.read_header(jpeg).unwrap().scaled(scaling);
    let mut image = turbojpeg::Image {
        pixels: vec![0u8; header.width * header.height * 3],
        width: header.width,
        pitch: header.width * 3,
        height: header.height,
        format: turbojpeg::PixelFormat::RGB,
    };
    d.decompress(jpeg, image.as_deref_mut()).unwrap();
    (image.pixels, header.width, header.height)
}

/// [`decode`] on two threads of its own: the runtime's helper may be lent to another test.
fn decode(jpeg: &[u8], denom: usize) -> Option<(Vec<u8>, usize, usize)> {
    decode_on(jpeg, denom, |f| {
        std::thread::scope(|s| {
            s.spawn(|| f(1));
            f(0);
        });
        true
    })
}

fn assert_same(jpeg: &[u8], denom: usize) {
    let (split, w, h) = decode(jpeg, denom).expect("the JPEG is split");
    let (reference, rw, rh) = whole(jpeg, denom);
    assert_eq!((w, h), (rw, rh));
    if let Some(i) = split.iter().zip(&reference).position(|(a, b)| a != b) {
        panic!("1/{denom}: first difference at row {}", i / (w * 3));
    }
}

#[test]
fn split_decode_is_the_one_thread_decode_for_every_sampling_and_scale() {
    for sampling in [
        SamplingFactor::R_4_4_4,
        SamplingFactor::R_4_2_2,
        SamplingFactor::R_4_2_0,
    ] {
        // A frame, and a size that is no whole number of MCUs.
        for (width, height) in [(1920, 1080), (1001, 777)] {
            let jpeg = encode(width, height, &Jpeg { sampling, ..PLAIN });
            for denom in [1, 2, 4, 8] {
                assert_same(&jpeg, denom);
            }
        }
    }
}

#[test]
fn grey_and_optimised_tables_are_split_too() {
    let grey = encode(1280, 720, &Jpeg { grey: true, ..PLAIN });
    assert_same(&grey, 1);
    assert_same(&grey, 2);
    let optimised = encode(
        1280,
        720,
        &Jpeg {
            optimised: true,
            ..PLAIN
        },
    );
    // Optimised tables may lack the codes the made-up row needs; split or not, never wrong.
    if decode(&optimised, 2).is_some() {
        assert_same(&optimised, 2);
    }
}

#[test]
fn the_rest_of_a_scan_resumes_at_every_row_of_mcus() {
    // Each row starts at another bit of a byte: every case of the made-up row's last block.
    let jpeg = encode(
        640,
        480,
        &Jpeg {
            sampling: SamplingFactor::R_4_4_4,
            ..PLAIN
        },
    );
    let layout = Layout::parse(&jpeg).unwrap();
    let (reference, width, _) = whole(&jpeg, 1);
    let (_, rows) = layout.mcus();
    let mut leftovers = std::collections::BTreeSet::new();
    for row in 1..rows {
        let resume = resume::walk(&layout, &jpeg, row).unwrap();
        leftovers.insert(resume.leftover_bits());
        let rest = resume::resumed_jpeg(&layout, &jpeg, row, &resume).unwrap();
        let (pixels, w, _) = whole(&rest, 1);
        assert_eq!(w, width);
        // Skip the made-up row of 8 pixel rows: the rest is the image from `row` on.
        let from = row * 8 * width * 3;
        assert!(pixels[8 * width * 3..] == reference[from..], "row {row}");
    }
    assert!(leftovers.len() >= 6, "bit offsets covered: {leftovers:?}");
}

#[test]
fn what_is_not_one_baseline_scan_is_left_to_the_usual_decode() {
    let restarts = encode(1280, 720, &Jpeg { restart: 4, ..PLAIN });
    assert!(Layout::parse(&restarts).is_none());
    let progressive = encode(
        1280,
        720,
        &Jpeg {
            progressive: true,
            ..PLAIN
        },
    );
    assert!(Layout::parse(&progressive).is_none());
    // Too small to be worth a thread.
    let small = encode(299, 299, &PLAIN);
    assert!(Layout::parse(&small).is_some());
    assert!(decode(&small, 1).is_none());
}

#[test]
fn corrupt_scans_fail_or_decode_never_panic() {
    let jpeg = encode(
        1280,
        720,
        &Jpeg {
            sampling: SamplingFactor::R_4_4_4,
            ..PLAIN
        },
    );
    let layout = Layout::parse(&jpeg).unwrap();
    let scan = layout.scan_start..jpeg.len() - 2;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..40 {
        let mut bad = jpeg.clone();
        for _ in 0..3 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = scan.start + (state as usize) % scan.len();
            bad[at] ^= 1 << (state >> 60 & 7);
        }
        let _ = decode(&bad, 2);
        // Cut anywhere in the scan.
        let cut = scan.start + (state as usize >> 3) % scan.len();
        let _ = decode(&bad[..cut], 2);
    }
}

/// Where each row of MCUs starts (bits into the scan) and its DC predictions: by the walk,
/// or by reading one symbol at a time.
fn row_starts(jpeg: &[u8], walk: bool) -> Vec<Option<(u64, Vec<i64>)>> {
    // Optimised tables may be refused by the split (a table no conforming decoder takes).
    let Some(layout) = Layout::parse(jpeg) else {
        return Vec::new();
    };
    let (across, rows) = layout.mcus();
    let skipper = skip::Skipper::new(&layout);
    (0..rows)
        .map(|row| {
            let mut bits = huffman::BitReader::new(&jpeg[layout.scan_start..]);
            let mut predictions = vec![0i64; layout.components.len()];
            let blocks = (across * layout.blocks_in_mcu() * row) as u64;
            if walk {
                skipper.skip(&mut bits, blocks, &mut predictions)?;
            } else {
                symbol_by_symbol(&layout, &mut bits, across * row, &mut predictions)?;
            }
            Some((bits.position(), predictions))
        })
        .collect()
}

/// Reads `mcus` MCUs one symbol at a time (ITU T.81 F.2.2), summing DC differences.
fn symbol_by_symbol(
    layout: &Layout,
    bits: &mut huffman::BitReader,
    mcus: usize,
    predictions: &mut [i64],
) -> Option<()> {
    for _ in 0..mcus {
        for (c, component) in layout.components.iter().enumerate() {
            for _ in 0..component.h * component.v {
                bits.refill();
                let size = u32::from(component.dc.decode(bits)?);
                predictions[c] += i64::from(huffman::extend(bits.take(size), size));
                let mut k = 1;
                while k < 64 {
                    bits.refill();
                    let symbol = component.ac.decode(bits)?;
                    let (run, size) = (u32::from(symbol >> 4), u32::from(symbol & 15));
                    if size == 0 && run != 15 {
                        break;
                    }
                    bits.take(size);
                    k += run + 1;
                }
            }
        }
    }
    Some(())
}

#[test]
fn the_walk_reads_what_a_symbol_by_symbol_reading_reads() {
    for sampling in [
        SamplingFactor::R_4_4_4,
        SamplingFactor::R_4_2_2,
        SamplingFactor::R_4_2_0,
    ] {
        for optimised in [false, true] {
            let jpeg = encode(
                640,
                480,
                &Jpeg {
                    sampling,
                    optimised,
                    ..PLAIN
                },
            );
            assert_eq!(
                row_starts(&jpeg, true),
                row_starts(&jpeg, false),
                "{sampling:?} {optimised}"
            );
        }
    }
    let grey = encode(640, 480, &Jpeg { grey: true, ..PLAIN });
    assert_eq!(row_starts(&grey, true), row_starts(&grey, false));
}

#[test]
fn the_cut_moves_to_where_both_parts_end_together() {
    // Times proportional to rows: the caller 5.3 ms a frame, the helper's walk 1.5 and its
    // decoding 6.8 (denser rows at the bottom), then the same with the helper at 60% speed.
    for (a, w, b) in [(5.3, 1.5, 6.8), (5.3, 2.5, 11.3)] {
        let even = b / (a + b - w);
        let mut share = FIRST_SHARE;
        for _ in 0..12 {
            let (caller, walk) = (a * share, w * share);
            share = next_share(share, share, caller, walk + b * (1.0 - share), walk);
        }
        assert!((share - even).abs() < 1e-3, "{share} against {even}");
        assert!(SHARES.contains(&share));
    }
    // A helper far slower than the caller: no further than the bound.
    let mut share = FIRST_SHARE;
    for _ in 0..20 {
        share = next_share(share, share, 1.0 * share, 20.0 - 10.0 * share, 10.0 * share);
    }
    assert!(
        (share - *SHARES.end()).abs() < 1e-3 && share <= *SHARES.end(),
        "{share}"
    );
    // Times that say nothing leave the share.
    assert_eq!(next_share(0.6, 0.6, 0.0, 1.0, 0.5), 0.6);
    assert_eq!(next_share(0.6, 0.6, f64::NAN, 1.0, 0.5), 0.6);
    assert_eq!(next_share(0.6, 0.6, 3.0, 1.0, 2.0), 0.6);
}
