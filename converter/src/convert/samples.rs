//! Deterministic sample inputs for verification: synthetic images (smooth gradients plus
//! seeded noise) pushed through the model's own preprocessing, so values are in the range
//! the model sees in service.

use tract_core::prelude::Tensor;

use edge_runtime::bundle::Manifest;
use edge_runtime::preprocess::{ImageLimits, Preprocessor, RgbImage};

/// `count` input tensors for `manifest`'s model; the same every run.
pub fn sample_inputs(manifest: &Manifest, count: usize) -> Result<Vec<Tensor>, String> {
    let pre = Preprocessor::new(
        manifest.preprocessing.clone(),
        manifest.input.clone(),
        ImageLimits::default(),
    )
    .map_err(|e| e.to_string())?;
    let (h, w) = manifest.input.image_size().ok_or("input is not an image")?;
    (0..count)
        .map(|i| {
            let image = synthetic_image(w, h, i as u64);
            pre.tensor_from_image(&image).map_err(|e| e.to_string())
        })
        .collect()
}

/// A w x h RGB image: per-sample gradient directions and frequencies plus xorshift noise.
pub fn synthetic_image(width: u32, height: u32, seed: u64) -> RgbImage {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let f = 1.0 + (seed % 5) as f32;
    let mut pixels = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            let (u, v) = (x as f32 / width as f32, y as f32 / height as f32);
            for c in 0..3u32 {
                let wave = ((u * f + v * (c + 1) as f32 + seed as f32) * std::f32::consts::PI).sin();
                let noise = (next() % 64) as f32 - 32.0;
                pixels.push((127.5 + 100.0 * wave + noise).clamp(0.0, 255.0) as u8);
            }
        }
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}
