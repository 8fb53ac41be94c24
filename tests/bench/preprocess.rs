//! Benchmark 2: Preprocessing: a 1920x1080 and a 4032x3024 JPEG to the 299x299 input tensor, ours
//! against a naive `image` decode + resize, time and peak heap.

use std::io::Cursor;
use std::time::Instant;

use anyhow::{Context, Result};
use edge_runtime::bundle::read_manifest;
use edge_runtime::preprocess::{ImageLimits, Preprocessor};
use edge_runtime::runtime::Tensor;
use image::imageops::FilterType;

use crate::Ctx;
use crate::alloc::peak_of;
use crate::report::{Report, Target};
use crate::stats::{median, ms};

const S: &str = "preprocess";

/// A `width`x`height` JPEG (quality 90) made from a real photo, so it compresses like one;
/// full-resolution chroma (4:4:4, as the `image` crate encodes).
pub fn photo_jpeg(width: u32, height: u32) -> Result<Vec<u8>> {
    let big = photo(width, height)?;
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut Cursor::new(&mut out), 90)
        .encode_image(&big)
        .context("cannot encode the JPEG")?;
    Ok(out)
}

/// The same with chroma halved both ways (4:2:0), as cameras and phones write.
fn camera_jpeg(width: u32, height: u32) -> Result<Vec<u8>> {
    let big = photo(width, height)?;
    let (w, h) = (u16::try_from(width)?, u16::try_from(height)?);
    let mut out = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, 90);
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
    encoder
        .encode(big.as_raw(), w, h, jpeg_encoder::ColorType::Rgb)
        .context("cannot encode the JPEG")?;
    Ok(out)
}

fn photo(width: u32, height: u32) -> Result<image::RgbImage> {
    let src = edge_e2e::shared_models().join("coffee.jpg");
    let img = image::open(&src).with_context(|| format!("cannot read {}", src.display()))?;
    Ok(img.resize_exact(width, height, FilterType::Triangle).to_rgb8())
}

/// What a first implementation does: decode everything, resize with `image`, normalise.
fn naive(bytes: &[u8], size: u32) -> Result<Tensor> {
    let img = image::load_from_memory(bytes)?;
    let rgb = img.resize_exact(size, size, FilterType::Triangle).to_rgb8();
    let data: Vec<f32> = rgb.as_raw().iter().map(|&p| f32::from(p) / 127.5 - 1.0).collect();
    Tensor::from_shape(&[1, size as usize, size as usize, 3], &data)
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let manifest = read_manifest(&ctx.bundle)?;
    let ours = Preprocessor::new(
        manifest.preprocessing.clone(),
        manifest.input.clone(),
        ImageLimits::default(),
    )?;
    let (side, _) = manifest
        .input
        .image_size()
        .context("the bundle's input is not an image")?;
    let tensor_bytes = manifest.input.shape.iter().product::<usize>() * 4;
    let cases = [
        ("1920x1080", 1920, 1080, false),
        ("1920x1080 4:2:0 (as cameras write)", 1920, 1080, true),
        ("4032x3024 (12 MP)", 4032, 3024, false),
    ];
    for (label, w, h, camera) in cases {
        let jpeg = if camera {
            camera_jpeg(w, h)?
        } else {
            photo_jpeg(w, h)?
        };
        // Ours without DCT scaling, timed in the same rounds: a full-size decode (libjpeg-turbo)
        // and a resize from full size.
        let full_path = ours.clone().with_dct_scaling(false);
        prepare(&ours, &jpeg)?;
        prepare(&full_path, &jpeg)?;
        naive(&jpeg, side)?;
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ctx.rounds {
            for _ in 0..2 {
                let start = Instant::now();
                prepare(&ours, &jpeg)?;
                a.push(ms(start.elapsed()));
                let start = Instant::now();
                naive(&jpeg, side)?;
                b.push(ms(start.elapsed()));
                let start = Instant::now();
                prepare(&full_path, &jpeg)?;
                c.push(ms(start.elapsed()));
            }
        }
        let (ours_ms, naive_ms) = (median(&a), median(&b));
        report.note(
            S,
            format!(
                "{label}: JPEG to tensor with DCT-scaled decoding (libjpeg-turbo, ours) {ours_ms:.1} ms; \
                 with a full-size decode (libjpeg-turbo) and resize {:.1} ms.",
                median(&c)
            ),
        );
        let decode: Vec<f64> = (0..5)
            .map(|_| {
                let start = Instant::now();
                ours.decode(&jpeg).map(|_| ms(start.elapsed()))
            })
            .collect::<Result<_, _>>()?;
        let image = ours.decode(&jpeg)?;
        let full: Vec<f64> = (0..5)
            .map(|_| {
                let start = Instant::now();
                image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg)
                    .map(|_| ms(start.elapsed()))
            })
            .collect::<Result<_, _>>()?;
        report.note(
            S,
            format!(
                "{label}: a full-size decode by the image crate (zune-jpeg) takes {:.1} ms.",
                median(&full)
            ),
        );
        report.note(
            S,
            format!(
                "{label}: of our {ours_ms:.1} ms, decoding (to {}x{} by DCT scaling) takes {:.1} ms; \
                 resize and normalise the rest.",
                image.width,
                image.height,
                median(&decode)
            ),
        );
        // The target is on the 4:4:4 frame (the first row); the 4:2:0 one is context.
        let small = w < 2000 && !camera;
        report.row(
            S,
            format!("{label} JPEG to tensor, time"),
            ours_ms,
            "ms",
            Some(("naive image decode + resize", naive_ms)),
            if small {
                Target::RatioAtMost(0.2)
            } else {
                Target::None
            },
        );
        if small {
            report.row(
                S,
                format!("{label} JPEG to tensor, absolute"),
                ours_ms,
                "ms",
                None,
                Target::ValueAtMost(10.0),
            );
        }
        let (_, ours_peak) = peak_of(|| prepare(&ours, &jpeg));
        let (_, naive_peak) = peak_of(|| naive(&jpeg, side));
        let budget = 3.0 * (tensor_bytes + jpeg.len()) as f64;
        report.row(
            S,
            format!(
                "{label} JPEG to tensor, peak heap (budget 3x(tensor {:.2} MB + file {:.2} MB))",
                tensor_bytes as f64 / 1e6,
                jpeg.len() as f64 / 1e6
            ),
            ours_peak as f64 / 1e6,
            "MB",
            Some(("naive", naive_peak as f64 / 1e6)),
            if w < 2000 {
                Target::None
            } else {
                Target::ValueAtMost(budget / 1e6)
            },
        );
    }
    report.note(
        S,
        format!(
            "JPEGs (quality 90) made from ../shared/models/coffee.jpg at each size, 4:4:4 (the image crate's \
             encoder) or, on the camera row, 4:2:0 (jpeg-encoder). Ours: edge-runtime's \
             Preprocessor with the bundle's manifest (Inception preset: full-image bilinear resize, \
             x/127.5-1), DCT-scaled JPEG decoding (large baseline JPEGs split across two threads: \
             the second walks the Huffman codes to the cut and decodes the rest; each then \
             resizes and normalises its band of the input), fast_image_resize. Naive: image::load_from_memory, resize_exact (Triangle), normalise. \
             {} rounds of 2 each side, interleaved. Peak heap: the bench's counting global \
             allocator, bytes allocated above the start (the input file is already in memory and \
             not counted in it).",
            ctx.rounds
        ),
    );
    Ok(())
}

fn prepare(p: &Preprocessor, jpeg: &[u8]) -> Result<Tensor> {
    Ok(p.tensor_from_bytes(jpeg)?)
}
