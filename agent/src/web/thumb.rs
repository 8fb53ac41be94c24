//! Thumbnails for the device page's last requests (only when `http.recent_images` > 0):
//! the request's image decoded with the model's own limits, box-filtered down to at most
//! `MAX_SIDE` pixels a side and encoded as PNG, in memory only.

use edge_runtime::preprocess::{Preprocessor, RgbImage};

/// Longest side of a thumbnail, pixels.
pub const MAX_SIDE: u32 = 96;

/// The PNG thumbnail of an encoded image, or `None` when it cannot be decoded (the reply
/// already said why).
pub fn thumbnail(preprocessor: &Preprocessor, encoded: &[u8]) -> Option<Vec<u8>> {
    let image = preprocessor.decode(encoded).ok()?;
    png(&downscale(&image, MAX_SIDE))
}

/// Averages each output pixel's box of input pixels; never upscales.
pub fn downscale(image: &RgbImage, max_side: u32) -> RgbImage {
    let (w, h) = (image.width.max(1), image.height.max(1));
    let scale = (f64::from(max_side.max(1)) / f64::from(w.max(h))).min(1.0);
    let tw = ((f64::from(w) * scale).round() as u32).max(1);
    let th = ((f64::from(h) * scale).round() as u32).max(1);
    let mut pixels = Vec::with_capacity((tw * th * 3) as usize);
    for ty in 0..th {
        let (y0, y1) = span(ty, th, h);
        for tx in 0..tw {
            let (x0, x1) = span(tx, tw, w);
            let mut sum = [0u64; 3];
            let mut n = 0u64;
            for y in y0..y1 {
                for x in x0..x1 {
                    let i = ((y * w + x) * 3) as usize;
                    if let Some(p) = image.pixels.get(i..i + 3) {
                        sum[0] += u64::from(p[0]);
                        sum[1] += u64::from(p[1]);
                        sum[2] += u64::from(p[2]);
                        n += 1;
                    }
                }
            }
            let n = n.max(1);
            pixels.extend(sum.iter().map(|s| (s / n) as u8));
        }
    }
    RgbImage {
        width: tw,
        height: th,
        pixels,
    }
}

/// The input rows (or columns) output row `t` of `out` covers, of `len`.
fn span(t: u32, out: u32, len: u32) -> (u32, u32) {
    let a = (u64::from(t) * u64::from(len) / u64::from(out)) as u32;
    let b = (u64::from(t + 1) * u64::from(len) / u64::from(out)) as u32;
    (a, b.max(a + 1).min(len))
}

fn png(image: &RgbImage) -> Option<Vec<u8>> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            &image.pixels,
            image.width,
            image.height,
            image::ExtendedColorType::Rgb8,
        )
        .ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_images_shrink_to_the_limit_keeping_their_aspect_and_colour() {
        let (w, h) = (1920u32, 1080u32);
        let image = RgbImage {
            width: w,
            height: h,
            pixels: [200u8, 100, 50].repeat((w * h) as usize),
        };
        let t = downscale(&image, MAX_SIDE);
        assert_eq!((t.width, t.height), (96, 54));
        assert_eq!(t.pixels.len(), 96 * 54 * 3);
        assert_eq!(&t.pixels[..3], &[200, 100, 50]);
        let encoded = png(&t).unwrap();
        assert!(encoded.starts_with(b"\x89PNG") && encoded.len() < 96 * 54 * 3);
        // Small images are not enlarged; a 1-pixel-high strip keeps a row.
        let small = RgbImage {
            width: 10,
            height: 1,
            pixels: vec![7; 30],
        };
        assert_eq!(
            (
                downscale(&small, MAX_SIDE).width,
                downscale(&small, MAX_SIDE).height
            ),
            (10, 1)
        );
    }
}
