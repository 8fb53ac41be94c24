//! Image to input tensor: decode (JPEG, PNG) within limits, crop and resize as the manifest
//! says, normalise, and lay out as the model's input. Shared by `classify`, the daemon and the
//! pool so every path preprocesses identically.

use std::io::Cursor;
use std::sync::{Mutex, PoisonError};

use fast_image_resize::{self as fr, images::Image, images::ImageRef};
use tract_core::prelude::*;

mod split;

use crate::bundle::manifest::{ChannelOrder, InputSpec, Layout, Preprocessing, ResizeFilter, ResizePolicy};

/// Bounds on what an untrusted image may cost before and while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest encoded image accepted, in bytes.
    pub max_bytes: usize,
    /// Largest decoded image accepted, in pixels (width x height), checked from the header
    /// before any pixel buffer is allocated.
    pub max_pixels: u64,
    /// Largest width or height accepted.
    pub max_side: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        // 50 MP covers phone cameras (4032x3024 = 12 MP) with room; 16384 is JPEG's practical max.
        ImageLimits {
            max_bytes: 32 << 20,
            max_pixels: 50_000_000,
            max_side: 16_384,
        }
    }
}

/// Why an image was refused. Each kind maps to a stable error code in replies.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    #[error("image is {size} bytes, the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("image of {width}x{height} pixels exceeds the limit ({reason})")]
    TooManyPixels { width: u32, height: u32, reason: String },
    #[error("unsupported image format: {0}")]
    UnsupportedFormat(String),
    #[error("invalid image: {0}")]
    Invalid(String),
    #[error("cannot build the input tensor: {0}")]
    Internal(String),
}

impl ImageError {
    /// The stable error code for replies (DESIGN.md section 4).
    pub fn code(&self) -> &'static str {
        match self {
            ImageError::TooLarge { .. } | ImageError::TooManyPixels { .. } => "too_large",
            ImageError::UnsupportedFormat(_) => "unsupported_format",
            ImageError::Invalid(_) => "invalid_image",
            ImageError::Internal(_) => "internal",
        }
    }
}

/// A decoded 8-bit RGB image.
#[derive(Debug, Clone)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Turns encoded images into input tensors for one model.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    spec: Preprocessing,
    input: InputSpec,
    size: (u32, u32),
    limits: ImageLimits,
    /// Decode large JPEGs at 1/2, 1/4 or 1/8 scale in the DCT when the crop stays at least
    /// [`DCT_SCALING_GAP`] times the input size: less time and memory, slightly different
    /// pixels (never with the TensorFlow legacy bilinear filter, which must see TensorFlow's
    /// pixels).
    dct_scaling: bool,
    /// Decode large baseline JPEGs on two threads when the second core is idle (see
    /// [`split`]).
    split_decode: bool,
}

impl Preprocessor {
    pub fn new(spec: Preprocessing, input: InputSpec, limits: ImageLimits) -> Result<Self, ImageError> {
        let size = input
            .image_size()
            .ok_or_else(|| ImageError::Internal(format!("input shape {:?} is not an image", input.shape)))?;
        Ok(Preprocessor {
            spec,
            input,
            size,
            limits,
            dct_scaling: true,
            split_decode: std::thread::available_parallelism().is_ok_and(|n| n.get() > 1),
        })
    }

    pub fn with_dct_scaling(mut self, on: bool) -> Self {
        self.dct_scaling = on;
        self
    }

    /// Whether large JPEGs may be decoded on two threads (on by default where the machine has
    /// more than one core); the pixels are the same either way.
    pub fn with_split_decode(mut self, on: bool) -> Self {
        self.split_decode = on;
        self
    }

    pub fn limits(&self) -> ImageLimits {
        self.limits
    }

    /// Encoded bytes to the input tensor (batch 1).
    pub fn tensor_from_bytes(&self, bytes: &[u8]) -> Result<Tensor, ImageError> {
        if self.split_decode {
            // The helper wakes while the headers are read.
            split::prewake(bytes);
        }
        let (format, width, height) = self.check(bytes)?;
        let mut split = self.split_decode;
        if format == image::ImageFormat::Jpeg {
            match self.tensor_on_two_cores(bytes, width, height) {
                Some(Ok(tensor)) => return Ok(tensor),
                // Offered and refused or failed: not tried again for the whole image.
                Some(Err(())) => split = false,
                None => {}
            }
        }
        let image = self.decode_checked(bytes, format, width, height, split)?;
        self.tensor_from_image(&image)
    }

    /// Decodes a JPEG or PNG to 8-bit RGB: grey is replicated, alpha dropped, 16-bit
    /// reduced, CMYK converted. Limits are checked from the header before decoding. JPEGs go
    /// to libjpeg-turbo (SIMD, DCT scaling); what it does not take, and PNGs, to the `image`
    /// crate (zune-jpeg, png).
    pub fn decode(&self, bytes: &[u8]) -> Result<RgbImage, ImageError> {
        if self.split_decode {
            split::prewake(bytes);
        }
        let (format, width, height) = self.check(bytes)?;
        self.decode_checked(bytes, format, width, height, self.split_decode)
    }

    /// The format and size of an image whose size, format, completeness and dimensions are
    /// within what this preprocessor takes.
    fn check(&self, bytes: &[u8]) -> Result<(image::ImageFormat, u32, u32), ImageError> {
        if bytes.len() > self.limits.max_bytes {
            return Err(ImageError::TooLarge {
                size: bytes.len(),
                limit: self.limits.max_bytes,
            });
        }
        let format = image::guess_format(bytes).map_err(|_| {
            ImageError::UnsupportedFormat("not a JPEG or PNG (unrecognised signature)".into())
        })?;
        if !matches!(format, image::ImageFormat::Jpeg | image::ImageFormat::Png) {
            return Err(ImageError::UnsupportedFormat(format!(
                "{format:?}; only JPEG and PNG"
            )));
        }
        if format == image::ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
            // Decoders fill a truncated scan with grey and succeed; a half image would then
            // be classified as if it were whole.
            return Err(ImageError::Invalid(
                "truncated JPEG (no end-of-image marker after the last scan)".into(),
            ));
        }
        // libjpeg-turbo reads a JPEG's size in ~1 us, the `image` crate in ~15.
        let turbo_size = if format == image::ImageFormat::Jpeg {
            jpeg_size(bytes)
        } else {
            None
        };
        let (width, height) = match turbo_size {
            Some(size) => size,
            None => {
                let reader = image::ImageReader::with_format(Cursor::new(bytes), format);
                reader.into_dimensions().map_err(decode_error)?
            }
        };
        self.check_dimensions(width, height)?;
        Ok((format, width, height))
    }

    /// [`decode`](Self::decode) after [`check`](Self::check), a large JPEG on two cores if
    /// `split`.
    fn decode_checked(
        &self,
        bytes: &[u8],
        format: image::ImageFormat,
        width: u32,
        height: u32,
        split: bool,
    ) -> Result<RgbImage, ImageError> {
        if format == image::ImageFormat::Jpeg
            && let Some(image) = self.decode_jpeg_turbo(bytes, width, height, split)
        {
            return Ok(image);
        }
        let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(self.limits.max_side);
        limits.max_image_height = Some(self.limits.max_side);
        // RGBA 16-bit is the widest decode we accept: 8 bytes per pixel, plus conversion.
        limits.max_alloc = Some(self.limits.max_pixels.saturating_mul(8));
        reader.limits(limits);
        let decoded = reader.decode().map_err(decode_error)?;
        let rgb = decoded.into_rgb8();
        let (width, height) = rgb.dimensions();
        Ok(RgbImage {
            width,
            height,
            pixels: rgb.into_raw(),
        })
    }

    fn check_dimensions(&self, width: u32, height: u32) -> Result<(), ImageError> {
        let too_large = |reason: String| ImageError::TooManyPixels {
            width,
            height,
            reason,
        };
        if width == 0 || height == 0 {
            return Err(ImageError::Invalid(format!(
                "image has no pixels ({width}x{height})"
            )));
        }
        if width > self.limits.max_side || height > self.limits.max_side {
            return Err(too_large(format!("max side {}", self.limits.max_side)));
        }
        if u64::from(width) * u64::from(height) > self.limits.max_pixels {
            return Err(too_large(format!("max {} pixels", self.limits.max_pixels)));
        }
        Ok(())
    }

    /// Decodes a baseline or progressive JPEG with libjpeg-turbo, at 1/2, 1/4 or 1/8 scale in
    /// the DCT where the crop stays at least [`DCT_SCALING_GAP`] times the input size (and DCT
    /// scaling is on).
    /// `None` when libjpeg-turbo cannot or would not decode it to RGB exactly (CMYK, 12-bit,
    /// a corrupt stream it only warns about): the general decoder then decides.
    fn decode_jpeg_turbo(&self, bytes: &[u8], width: u32, height: u32, split: bool) -> Option<RgbImage> {
        let factor = self.dct_factor(width, height);
        let result = TURBO.with_borrow_mut(|slot| {
            let decompressor = turbo(slot)?;
            let header = decompressor.read_header(bytes)?;
            if !matches!(
                header.colorspace,
                turbojpeg::Colorspace::YCbCr | turbojpeg::Colorspace::Gray | turbojpeg::Colorspace::RGB
            ) || header.is_lossless
                || (header.width, header.height) != (width as usize, height as usize)
            {
                return Ok(None);
            }
            if split && let Some(decoded) = split::decode(bytes, factor as usize) {
                return Ok(Some(decoded));
            }
            let scaling = turbojpeg::ScalingFactor::new(1, factor as usize);
            decompressor.set_scaling_factor(scaling)?;
            let scaled = header.scaled(scaling);
            let mut image = turbojpeg::Image {
                pixels: vec![0u8; scaled.width * scaled.height * 3],
                width: scaled.width,
                pitch: scaled.width * 3,
                height: scaled.height,
                format: turbojpeg::PixelFormat::RGB,
            };
            decompressor.decompress(bytes, image.as_deref_mut())?;
            Ok::<_, turbojpeg::Error>(Some((image.pixels, image.width, image.height)))
        });
        match result {
            Ok(Some((pixels, width, height))) => Some(RgbImage {
                width: u32::try_from(width).ok()?,
                height: u32::try_from(height).ok()?,
                pixels,
            }),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!("libjpeg-turbo did not decode the JPEG ({e}); trying the general decoder");
                None
            }
        }
    }

    /// The DCT scaling denominator (1, 2, 4 or 8) for a `width` x `height` JPEG: the largest
    /// that keeps the crop at least [`DCT_SCALING_GAP`] times the input size.
    fn dct_factor(&self, width: u32, height: u32) -> u32 {
        if !self.dct_scaling || self.spec.filter == ResizeFilter::TfLegacyBilinear {
            return 1;
        }
        let (crop_w, crop_h) = crop_size(self.spec.resize, width, height);
        let (target_h, target_w) = self.size;
        let leaves_gap = |side: u32, target: u32| f64::from(side) >= DCT_SCALING_GAP * f64::from(target);
        [8u32, 4, 2]
            .into_iter()
            .find(|f| leaves_gap(crop_w / f, target_w) && leaves_gap(crop_h / f, target_h))
            .unwrap_or(1)
    }

    /// The input tensor of a large JPEG decoded on two cores ([`split::Plan`]), each core then
    /// resizing the band of the input whose filter windows fall in the rows it decoded: the
    /// values [`decode`](Self::decode) and [`tensor_from_image`](Self::tensor_from_image)
    /// give, with the resize on two cores too. `None` where that does not apply (the JPEG,
    /// the filter, an inference running), `Some(Err)` when the split was offered and no
    /// helper took it or a part failed.
    fn tensor_on_two_cores(&self, bytes: &[u8], width: u32, height: u32) -> Option<Result<Tensor, ()>> {
        // Nearest picks rows by rounding a position, and TensorFlow's legacy bilinear resize
        // is not fast_image_resize's: those take one band.
        let support = match self.spec.filter {
            ResizeFilter::Bilinear => 1.0,
            ResizeFilter::Bicubic => 2.0,
            ResizeFilter::Lanczos3 => 3.0,
            ResizeFilter::Nearest | ResizeFilter::TfLegacyBilinear => return None,
        };
        if !self.split_decode || !split::helper_idle() {
            return None;
        }
        let factor = self.dct_factor(width, height);
        let (w, h) = (width.div_ceil(factor), height.div_ceil(factor));
        let crop = crop_box(self.spec.resize, w, h);
        let (out_h, out_w) = self.size;
        let scale = f64::from(crop.3) / f64::from(out_h);
        // fast_image_resize reads the rows within `radius` of an output row's centre.
        let radius = support * scale.max(1.0);
        let plan = split::Plan::new(bytes, factor as usize, (2.0 * radius).ceil() as usize + 3)?;
        if (plan.width, plan.height) != (w as usize, h as usize) {
            return None;
        }
        let (top_rows, bottom_rows) = (plan.top_rows(), plan.bottom_rows());
        let centre = |row: u32| f64::from(crop.1) + (f64::from(row) + 0.5) * scale;
        // The second band starts at the first output row whose window lies in the second
        // part's rows; the first band's windows must then lie in the first part's.
        let split_at = (0..out_h).find(|&row| centre(row) - radius >= bottom_rows.start as f64 + 1.0)?;
        if split_at == 0 || centre(split_at - 1) + radius > top_rows.end as f64 - 1.0 {
            return None;
        }
        let row_bytes = out_w as usize * 3;
        let mut resized = vec![0u8; out_h as usize * row_bytes];
        // Where a band's values lie together in the tensor (NHWC), each part normalises its
        // band too; NCHW's planes are normalised after.
        let mut tensor = match self.input.layout {
            // SAFETY: not read before written: the two bands' values are all of the tensor's
            // (checked below), each written whole by `normalise_into`; when a part fails the
            // tensor is dropped unread.
            Layout::Nhwc => Some(unsafe { Tensor::uninitialized::<f32>(&self.input.shape) }.ok()?),
            Layout::Nchw => None,
        };
        let mut view = match tensor.as_mut() {
            Some(t) => Some(t.to_plain_array_view_mut::<f32>().ok()?),
            None => None,
        };
        let values: &mut [f32] = match view.as_mut() {
            Some(v) => v.as_slice_mut().filter(|v| v.len() == resized.len())?,
            None => &mut [],
        };
        let at = (split_at as usize * row_bytes).min(values.len());
        let (first, second) = resized.split_at_mut(split_at as usize * row_bytes);
        let (first_values, second_values) = values.split_at_mut(at);
        let bands = [
            Mutex::new((first, first_values)),
            Mutex::new((second, second_values)),
        ];
        let then = |part: usize, pixels: &[u8]| {
            let (rows, from) = if part == 0 {
                (0..split_at, 0)
            } else {
                (split_at..out_h, bottom_rows.start)
            };
            let mut band = bands[part].lock().unwrap_or_else(PoisonError::into_inner);
            let (band, values) = &mut *band;
            self.resize_band(pixels, w, from, crop, rows, band).ok()?;
            if !values.is_empty() {
                self.normalise_into(band, values);
            }
            Some(())
        };
        // Not zeroed: libjpeg-turbo writes every byte, and nothing reads them before.
        let mut top = Box::new_uninit_slice(top_rows.end * w as usize * 3);
        let mut bottom = Box::new_uninit_slice(bottom_rows.len() * w as usize * 3);
        if !plan.run(bytes, &mut top, &mut bottom, &then, split::run_pair) {
            return Some(Err(()));
        }
        drop(view);
        Some(Ok(tensor.unwrap_or_else(|| self.normalise(&resized))))
    }

    /// Output rows `rows` of the resized `crop` (left, top, width, height of the decoded
    /// image), from `pixels`: the decoded image's rows from `first` on, `width` wide.
    fn resize_band(
        &self,
        pixels: &[u8],
        width: u32,
        first: usize,
        crop: (u32, u32, u32, u32),
        rows: std::ops::Range<u32>,
        out: &mut [u8],
    ) -> Result<(), ImageError> {
        let internal = |e: &dyn std::fmt::Display| ImageError::Internal(e.to_string());
        let (left, top, crop_w, crop_h) = crop;
        let available = pixels.len() / (width as usize * 3).max(1);
        let available_rows = u32::try_from(available).map_err(|e| internal(&e))?;
        let src =
            ImageRef::new(width, available_rows, pixels, fr::PixelType::U8x3).map_err(|e| internal(&e))?;
        let mut dst = Image::from_slice_u8(self.size.1, rows.len() as u32, out, fr::PixelType::U8x3)
            .map_err(|e| internal(&e))?;
        let (band_top, band_height) = if rows == (0..self.size.0) {
            // The whole crop: its own bounds, so the filter's scale is exactly the crop's.
            (f64::from(top) - first as f64, f64::from(crop_h))
        } else {
            let scale = f64::from(crop_h) / f64::from(self.size.0);
            let band_top = f64::from(top) + f64::from(rows.start) * scale - first as f64;
            (
                band_top,
                (f64::from(rows.len() as u32) * scale).min(available as f64 - band_top),
            )
        };
        let options = fr::ResizeOptions::new().resize_alg(self.resize_alg()).crop(
            f64::from(left),
            band_top,
            f64::from(crop_w),
            band_height,
        );
        RESIZER
            .with_borrow_mut(|resizer| resizer.resize(&src, &mut dst, &options))
            .map_err(|e| internal(&e))
    }

    fn resize_alg(&self) -> fr::ResizeAlg {
        match self.spec.filter {
            ResizeFilter::Nearest => fr::ResizeAlg::Nearest,
            ResizeFilter::Bilinear | ResizeFilter::TfLegacyBilinear => {
                fr::ResizeAlg::Convolution(fr::FilterType::Bilinear)
            }
            ResizeFilter::Bicubic => fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom),
            ResizeFilter::Lanczos3 => fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3),
        }
    }

    /// Crop, resize, normalise and lay out a decoded image.
    pub fn tensor_from_image(&self, image: &RgbImage) -> Result<Tensor, ImageError> {
        Ok(if self.spec.filter == ResizeFilter::TfLegacyBilinear {
            self.normalise(&self.resize_tf_legacy_bilinear(image))
        } else {
            self.normalise(&self.resize(image)?)
        })
    }

    /// TensorFlow 1 `ResizeBilinear` (no antialiasing, `src = dst * in / out`) of the crop
    /// region, in float, row-major HWC, values 0..=255.
    fn resize_tf_legacy_bilinear(&self, image: &RgbImage) -> Vec<f32> {
        let (out_h, out_w) = (self.size.0 as usize, self.size.1 as usize);
        let (left, top, crop_w, crop_h) = crop_box(self.spec.resize, image.width, image.height);
        let (left, top, crop_w, crop_h) = (left as usize, top as usize, crop_w as usize, crop_h as usize);
        let stride = image.width as usize * 3;
        let px =
            |y: usize, x: usize, c: usize| f32::from(image.pixels[(top + y) * stride + (left + x) * 3 + c]);
        // (low, high, fraction) of each output coordinate in the crop.
        let taps = |out: usize, len: usize| -> Vec<(usize, usize, f32)> {
            let scale = len as f32 / out as f32;
            (0..out)
                .map(|i| {
                    let f = i as f32 * scale;
                    let lo = (f.floor() as usize).min(len - 1);
                    (lo, (lo + 1).min(len - 1), f - lo as f32)
                })
                .collect()
        };
        let (ys, xs) = (taps(out_h, crop_h), taps(out_w, crop_w));
        let mut out = Vec::with_capacity(out_h * out_w * 3);
        for &(y0, y1, dy) in &ys {
            for &(x0, x1, dx) in &xs {
                for c in 0..3 {
                    let upper = px(y0, x0, c) + (px(y0, x1, c) - px(y0, x0, c)) * dx;
                    let lower = px(y1, x0, c) + (px(y1, x1, c) - px(y1, x0, c)) * dx;
                    out.push(upper + (lower - upper) * dy);
                }
            }
        }
        out
    }

    /// Crop and resize to the input size, 8-bit RGB, row-major HWC.
    pub fn resize(&self, image: &RgbImage) -> Result<Vec<u8>, ImageError> {
        let (height, width) = self.size;
        let mut out = vec![0u8; width as usize * height as usize * 3];
        let crop = crop_box(self.spec.resize, image.width, image.height);
        self.resize_band(&image.pixels, image.width, 0, crop, 0..height, &mut out)?;
        Ok(out)
    }

    /// HWC RGB values (0..=255) at the input size to the normalised input tensor.
    pub fn normalise<T: Copy + Into<f32>>(&self, hwc: &[T]) -> Tensor {
        let (height, width) = (self.size.0 as usize, self.size.1 as usize);
        let len = height * width * 3;
        // The shape was checked to be 1x3xHxW or 1xHxWx3 with these H and W.
        let shape = self.input.shape.as_slice();
        let shape = if shape.iter().product::<usize>() == len {
            shape
        } else {
            &[len]
        };
        let mut tensor = match Tensor::zero::<f32>(shape) {
            Ok(t) => t,
            Err(_) => return tensor1::<f32>(&[]),
        };
        if let Ok(mut view) = tensor.to_plain_array_view_mut::<f32>()
            && let Some(out) = view.as_slice_mut()
        {
            self.normalise_into(hwc, out);
        }
        tensor
    }

    /// [`normalise`](Self::normalise) into `out` (the tensor's values, in its layout).
    fn normalise_into<T: Copy + Into<f32>>(&self, hwc: &[T], out: &mut [f32]) {
        let p = &self.spec;
        let order: [usize; 3] = match p.channel_order {
            ChannelOrder::Rgb => [0, 1, 2],
            ChannelOrder::Bgr => [2, 1, 0],
        };
        // One multiply-add per value: (x * scale - mean) / std == x * a + b.
        let a: [f32; 3] = std::array::from_fn(|c| p.scale / p.std[c]);
        let b: [f32; 3] = std::array::from_fn(|c| -p.mean[c] / p.std[c]);
        match (self.input.layout, p.channel_order) {
            (Layout::Nhwc, ChannelOrder::Rgb) => normalise_interleaved::<T, false>(hwc, out, a, b),
            (Layout::Nhwc, ChannelOrder::Bgr) => normalise_interleaved::<T, true>(hwc, out, a, b),
            (Layout::Nchw, _) => {
                let plane = out.len() / 3;
                for (i, px) in hwc.chunks_exact(3).enumerate().take(plane) {
                    for c in 0..3 {
                        out[c * plane + i] = px[order[c]].into() * a[c] + b[c];
                    }
                }
            }
        }
    }
}

/// `out[i] = hwc[i] * a[c] + b[c]` for interleaved RGB (`SWAP`: written as BGR), in runs of 16
/// pixels with the channel of every position known at compile time, so that it vectorises.
fn normalise_interleaved<T: Copy + Into<f32>, const SWAP: bool>(
    hwc: &[T],
    out: &mut [f32],
    a: [f32; 3],
    b: [f32; 3],
) {
    const RUN: usize = 48;
    let source = |i: usize| if SWAP { i - i % 3 + 2 - i % 3 } else { i };
    let ka: [f32; RUN] = std::array::from_fn(|i| a[i % 3]);
    let kb: [f32; RUN] = std::array::from_fn(|i| b[i % 3]);
    let mut src = hwc.chunks_exact(RUN);
    let mut dst = out.chunks_exact_mut(RUN);
    for (s, d) in (&mut src).zip(&mut dst) {
        for i in 0..RUN {
            d[i] = s[source(i)].into() * ka[i] + kb[i];
        }
    }
    for (px, d) in src
        .remainder()
        .chunks_exact(3)
        .zip(dst.into_remainder().chunks_exact_mut(3))
    {
        for c in 0..3 {
            d[c] = px[source(c)].into() * a[c] + b[c];
        }
    }
}

/// A DCT-scaled decode must leave the crop at least this many times the input size, so that
/// the model's own resize filter still does a real reduction (Pillow's `thumbnail` leaves 2.0
/// the same way). A decode that lands on the input size replaces that filter by the IDCT's:
/// EfficientNet-Lite0's tripod photo (512x512, crop 448 to 224) scored 0.961 that way, 0.941
/// with a full decode, against 0.938 for the reference pipeline. 1.5 keeps a 1080p frame for a
/// 299x299 input at half size (a 1.8x gap).
const DCT_SCALING_GAP: f64 = 1.5;

/// Most scans a progressive JPEG may have (libjpeg-turbo's advice for untrusted input is a
/// limit; real encoders write about 10).
const MAX_JPEG_SCANS: u32 = 500;

thread_local! {
    /// One libjpeg-turbo decompressor per thread, reused across images.
    static TURBO: std::cell::RefCell<Option<turbojpeg::Decompressor>> =
        const { std::cell::RefCell::new(None) };
    /// One resizer per thread, reused across images (its buffers, its CPU detection).
    static RESIZER: std::cell::RefCell<fr::Resizer> = std::cell::RefCell::new(fr::Resizer::new());
}

/// This thread's libjpeg-turbo decompressor, made on first use.
fn turbo(
    slot: &mut Option<turbojpeg::Decompressor>,
) -> Result<&mut turbojpeg::Decompressor, turbojpeg::Error> {
    let decompressor = match slot.take() {
        Some(d) => d,
        None => {
            let mut d = turbojpeg::Decompressor::new()?;
            // A progressive JPEG may carry thousands of tiny scans, each a pass over the whole
            // image: libjpeg-turbo's advice for untrusted input.
            d.set_scan_limit(MAX_JPEG_SCANS)?;
            d
        }
    };
    Ok(slot.insert(decompressor))
}

/// A JPEG's width and height from its frame header, read by libjpeg-turbo; `None` where it
/// does not read it.
fn jpeg_size(bytes: &[u8]) -> Option<(u32, u32)> {
    TURBO.with_borrow_mut(|slot| {
        let header = turbo(slot).ok()?.read_header(bytes).ok()?;
        Some((
            u32::try_from(header.width).ok()?,
            u32::try_from(header.height).ok()?,
        ))
    })
}

/// Whether a JPEG's last scan (SOS marker) is followed by an end-of-image marker. Entropy-coded
/// data stuffs every 0xFF with 0x00, so marker pairs cannot occur inside it. Read from both
/// ends (the last EOI, a first SOS) rather than through the whole scan.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let marker = |m: u8| move |w: &[u8]| w[0] == 0xFF && w[1] == m;
    let Some(eoi) = bytes.windows(2).rposition(marker(0xD9)) else {
        return false;
    };
    bytes[..eoi].windows(2).any(marker(0xDA)) && !bytes[eoi..].windows(2).any(marker(0xDA))
}

/// Size of the crop region for `policy` in a `width` x `height` image.
fn crop_size(policy: ResizePolicy, width: u32, height: u32) -> (u32, u32) {
    let (_, _, w, h) = crop_box(policy, width, height);
    (w, h)
}

/// (left, top, width, height) of the region resized to the input.
fn crop_box(policy: ResizePolicy, width: u32, height: u32) -> (u32, u32, u32, u32) {
    match policy {
        ResizePolicy::Stretch => (0, 0, width, height),
        ResizePolicy::CentralFraction { fraction } => {
            // tf.image.central_crop: start = int((len - len * fraction) / 2), size = len - 2 * start
            let start = |len: u32| ((f64::from(len) - f64::from(len) * f64::from(fraction)) / 2.0) as u32;
            let (top, left) = (start(height), start(width));
            (left, top, width - 2 * left, height - 2 * top)
        }
        ResizePolicy::SquareCenterCrop { fraction } => {
            let side = ((f64::from(fraction) * f64::from(width.min(height))).floor() as u32).max(1);
            (
                (width - side).div_ceil(2),
                (height - side).div_ceil(2),
                side,
                side,
            )
        }
    }
}

fn decode_error(e: image::ImageError) -> ImageError {
    match e {
        image::ImageError::Limits(l) => ImageError::TooManyPixels {
            width: 0,
            height: 0,
            reason: l.to_string(),
        },
        image::ImageError::Unsupported(u) => ImageError::UnsupportedFormat(u.to_string()),
        other => ImageError::Invalid(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_jpeg_is_detected() {
        let whole = [
            0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02, 0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD9,
        ];
        assert!(jpeg_is_complete(&whole));
        assert!(!jpeg_is_complete(&whole[..10]));
        // A thumbnail's EOI before the main scan does not count.
        let thumb_then_cut = [0xFF, 0xD8, 0xFF, 0xD9, 0xFF, 0xDA, 0x00, 0x02, 0x12];
        assert!(!jpeg_is_complete(&thumb_then_cut));
    }

    #[test]
    fn square_center_crop_matches_reference_formula() {
        let policy = ResizePolicy::SquareCenterCrop { fraction: 0.875 };
        // c = floor(0.875 * 480) = 420; top = (480 - 420 + 1) / 2 = 30; left = (640 - 420 + 1) / 2 = 110
        assert_eq!(crop_box(policy, 640, 480), (110, 30, 420, 420));
    }

    #[test]
    fn central_fraction_matches_tensorflow() {
        let policy = ResizePolicy::CentralFraction { fraction: 0.875 };
        // TF: start = int((480 - 420) / 2) = 30, int((640 - 560) / 2) = 40
        assert_eq!(crop_box(policy, 640, 480), (40, 30, 560, 420));
    }

    /// A batch-1 f32 image input of `height` x `width` in `layout`.
    fn input_spec(layout: Layout, height: usize, width: usize) -> InputSpec {
        let shape = match layout {
            Layout::Nhwc => vec![1, height, width, 3],
            Layout::Nchw => vec![1, 3, height, width],
        };
        InputSpec {
            name: "input".into(),
            shape,
            layout,
            dtype: "f32".into(),
        }
    }

    fn inception_299() -> Preprocessor {
        let input = input_spec(Layout::Nhwc, 299, 299);
        Preprocessor::new(Preprocessing::inception(), input, ImageLimits::default()).unwrap()
    }

    #[test]
    fn normalise_lays_out_every_order_and_layout_as_the_formula_says() {
        // 7x5: two runs of 16 pixels and a remainder of 3.
        let (h, w) = (5usize, 7usize);
        let hwc: Vec<u8> = (0..h * w * 3).map(|i| (i * 37 % 256) as u8).collect();
        for layout in [Layout::Nhwc, Layout::Nchw] {
            for order in [ChannelOrder::Rgb, ChannelOrder::Bgr] {
                let input = input_spec(layout, h, w);
                let spec = Preprocessing {
                    channel_order: order,
                    ..Preprocessing::imagenet()
                };
                let p = Preprocessor::new(spec.clone(), input.clone(), ImageLimits::default()).unwrap();
                let tensor = p.normalise(&hwc);
                assert_eq!(tensor.shape(), input.shape.as_slice());
                let values = tensor.to_plain_array_view::<f32>().unwrap();
                let values = values.as_slice().unwrap();
                for y in 0..h {
                    for x in 0..w {
                        for c in 0..3 {
                            let source = match order {
                                ChannelOrder::Rgb => c,
                                ChannelOrder::Bgr => 2 - c,
                            };
                            let v = f32::from(hwc[(y * w + x) * 3 + source]);
                            let want = (v * spec.scale - spec.mean[c]) / spec.std[c];
                            let at = match layout {
                                Layout::Nhwc => (y * w + x) * 3 + c,
                                Layout::Nchw => c * h * w + y * w + x,
                            };
                            assert!(
                                (values[at] - want).abs() < 1e-5,
                                "{layout:?} {order:?} ({y},{x},{c})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A smooth colour picture with some texture, as `width` x `height` RGB.
    fn picture(width: u32, height: u32) -> image::RgbImage {
        image::RgbImage::from_fn(width, height, |x, y| {
            let t = ((x * 7 + y * 13) % 32) as u8;
            image::Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, 96 + t])
        })
    }

    fn encode_jpeg<P>(img: &image::ImageBuffer<P, Vec<u8>>) -> Vec<u8>
    where
        P: image::PixelWithColorType + image::Pixel<Subpixel = u8>,
    {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut Cursor::new(&mut out), 92)
            .encode_image(img)
            .unwrap();
        out
    }

    fn mean_abs_difference(a: &[u8], b: &[u8]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(&x, &y)| f64::from(x.abs_diff(y)))
            .sum::<f64>()
            / a.len() as f64
    }

    #[test]
    fn libjpeg_turbo_decodes_what_the_general_decoder_decodes() {
        let jpeg = encode_jpeg(&picture(320, 240));
        // 320x240 is too small to scale for a 299x299 input: a full-size decode.
        let ours = inception_299()
            .decode_jpeg_turbo(&jpeg, 320, 240, true)
            .expect("libjpeg-turbo decodes it");
        let reference = image::load_from_memory(&jpeg).unwrap().into_rgb8();
        assert_eq!((ours.width, ours.height), (320, 240));
        // Two correct IDCTs differ by rounding only.
        let diff = mean_abs_difference(&ours.pixels, reference.as_raw());
        assert!(diff < 1.0, "mean abs difference {diff}");
    }

    #[test]
    fn large_jpeg_is_decoded_scaled_in_the_dct() {
        let jpeg = encode_jpeg(&picture(1920, 1080));
        let pre = inception_299();
        let scaled = pre.decode(&jpeg).unwrap();
        // 1080 / 2 = 540 >= 1.5 x 299, 1080 / 4 = 270 is not: half size.
        assert_eq!((scaled.width, scaled.height), (960, 540));
        let full = pre.clone().with_dct_scaling(false).decode(&jpeg).unwrap();
        assert_eq!((full.width, full.height), (1920, 1080));
        // Half size in the DCT is about the full decode averaged over 2x2 blocks.
        let full = image::RgbImage::from_raw(1920, 1080, full.pixels).unwrap();
        let halved = image::imageops::resize(&full, 960, 540, image::imageops::FilterType::Triangle);
        let diff = mean_abs_difference(&scaled.pixels, halved.as_raw());
        assert!(diff < 2.0, "mean abs difference {diff}");
    }

    #[test]
    fn a_jpeg_decoded_on_two_threads_has_the_pixels_of_one() {
        // Noise so that the scan is large enough to be split.
        let noisy = image::RgbImage::from_fn(1920, 1080, |x, y| {
            let n = (x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)) % 97;
            image::Rgb([(x % 256) as u8 ^ n as u8, (y % 256) as u8, (n * 2) as u8])
        });
        let jpeg = encode_jpeg(&noisy);
        // The runtime's helper thread may be lent to another test for a while.
        let split = (0..500).find_map(|_| {
            split::decode(&jpeg, 2).or_else(|| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                None
            })
        });
        let (pixels, width, height) = split.expect("the JPEG is split");
        let pre = inception_299();
        let two = RgbImage {
            width: width as u32,
            height: height as u32,
            pixels,
        };
        let one = pre.clone().with_split_decode(false).decode(&jpeg).unwrap();
        assert_eq!((two.width, two.height), (960, 540));
        assert!(two.pixels == one.pixels);
    }

    #[test]
    fn a_tensor_resized_in_two_bands_is_the_tensor_of_one() {
        let noisy = |width: u32, height: u32| {
            image::RgbImage::from_fn(width, height, |x, y| {
                let n = (x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)) % 97;
                image::Rgb([
                    (x % 256) as u8 ^ n as u8,
                    (y * 3 % 256) as u8,
                    (n * 2) as u8 ^ (x / 7) as u8,
                ])
            })
        };
        let presets = [
            Preprocessing::inception(),
            Preprocessing::imagenet(),
            Preprocessing::efficientnet_lite(),
            Preprocessing {
                filter: ResizeFilter::Lanczos3,
                ..Preprocessing::inception()
            },
        ];
        // A frame (half size by DCT scaling), an odd size decoded at full size.
        for (width, height) in [(1920, 1080), (1001, 1377)] {
            let jpeg = encode_jpeg(&noisy(width, height));
            for spec in &presets {
                for (side, layout) in [(299usize, Layout::Nhwc), (224, Layout::Nhwc), (224, Layout::Nchw)] {
                    let input = input_spec(layout, side, side);
                    let pre = Preprocessor::new(spec.clone(), input, ImageLimits::default()).unwrap();
                    // The runtime's helper thread may be lent to another test for a while
                    // (seconds, when the machine is loaded: 5 s once was not enough in CI).
                    let two = (0..3000)
                        .find_map(|_| {
                            pre.tensor_on_two_cores(&jpeg, width, height)
                                .and_then(Result::ok)
                                .or_else(|| {
                                    std::thread::sleep(std::time::Duration::from_millis(10));
                                    None
                                })
                        })
                        .expect("resized on two cores");
                    let one = pre
                        .clone()
                        .with_split_decode(false)
                        .tensor_from_bytes(&jpeg)
                        .unwrap();
                    assert!(
                        two == one,
                        "{width}x{height} to {side} {layout:?}, {:?}",
                        spec.filter
                    );
                }
            }
        }
    }

    #[test]
    fn dct_scaling_leaves_the_resize_filter_a_real_reduction() {
        // 1280x720 for 299x299: half size (360 rows) would leave only a 1.2x reduction.
        let decoded = inception_299().decode(&encode_jpeg(&picture(1280, 720))).unwrap();
        assert_eq!((decoded.width, decoded.height), (1280, 720));
    }

    #[test]
    fn grey_jpeg_becomes_rgb_with_equal_channels() {
        let grey = image::GrayImage::from_fn(64, 48, |x, y| image::Luma([(x * 3 + y) as u8]));
        let decoded = inception_299()
            .decode_jpeg_turbo(&encode_jpeg(&grey), 64, 48, true)
            .expect("libjpeg-turbo decodes it");
        assert_eq!((decoded.width, decoded.height), (64, 48));
        assert!(
            decoded
                .pixels
                .chunks_exact(3)
                .all(|p| p[0] == p[1] && p[1] == p[2])
        );
    }

    #[test]
    fn corrupt_jpegs_are_refused_or_decoded_never_a_panic() {
        let jpeg = encode_jpeg(&picture(96, 64));
        let pre = inception_299();
        let mut refused = 0;
        // Single-byte damage all over the file, headers and entropy-coded data alike.
        for i in (2..jpeg.len() - 2).step_by(3) {
            for value in [0x00, 0xFF, jpeg[i] ^ 0x5A] {
                let mut bad = jpeg.clone();
                bad[i] = value;
                match pre.decode(&bad) {
                    Ok(image) => assert_eq!(image.pixels.len(), (image.width * image.height * 3) as usize),
                    Err(
                        ImageError::Invalid(_)
                        | ImageError::UnsupportedFormat(_)
                        | ImageError::TooManyPixels { .. },
                    ) => refused += 1,
                    Err(other) => panic!("byte {i} = {value:#x}: unexpected error {other}"),
                }
            }
        }
        assert!(refused > 0, "no damaged JPEG was refused");
    }
}
