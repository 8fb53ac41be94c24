//! The bundle manifest: everything a runtime needs besides the network itself: where the model
//! came from, how to turn an image into the input tensor, and how to read the output.
//!
//! Serialized as `manifest.json`, the first entry of the bundle (see [`super`]).

use serde::{Deserialize, Serialize};

/// Version of the bundle layout and of this manifest schema. A loader refuses any other.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub model: ModelInfo,
    pub source: SourceInfo,
    /// Version of tract that wrote the NNEF graph (`tract_nnef::tract_core::VERSION`-style).
    pub tract_version: String,
    /// Version of edge-convert that wrote the bundle.
    pub converter_version: String,
    pub input: InputSpec,
    pub preprocessing: Preprocessing,
    pub output: OutputSpec,
    /// Class names; index `i` names output `i + output.label_offset`.
    pub labels: Vec<String>,
    /// The converter's check that the bundle computes what the source computes.
    pub verification: Option<Verification>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceFormat {
    Onnx,
    TensorflowFrozen,
    TensorflowSavedModel,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    pub format: SourceFormat,
    /// File (or SavedModel directory) name as given to the converter, without its parent path.
    pub file: String,
    /// sha256 of the source file (for a SavedModel: of `saved_model.pb`), lowercase hex.
    pub sha256: String,
    /// SavedModel signature that was converted, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Layout {
    Nhwc,
    Nchw,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    /// Fixed input shape, batch first (the bundle's batch size; 1 for edge bundles).
    pub shape: Vec<usize>,
    pub layout: Layout,
    /// Element type; only `f32` for now.
    pub dtype: String,
}

impl InputSpec {
    /// (height, width) of the image the network takes.
    pub fn image_size(&self) -> Option<(u32, u32)> {
        if self.shape.len() != 4 {
            return None;
        }
        let (h, w) = match self.layout {
            Layout::Nhwc => (self.shape[1], self.shape[2]),
            Layout::Nchw => (self.shape[2], self.shape[3]),
        };
        Some((u32::try_from(h).ok()?, u32::try_from(w).ok()?))
    }
}

/// How the decoded image is brought to the input size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ResizePolicy {
    /// Resize the whole image to the input size, ignoring aspect ratio (Inception preset).
    Stretch,
    /// TensorFlow's `central_crop(fraction)`: keep the central `fraction` of each axis
    /// (offset `floor((len - len * fraction) / 2)`), then resize.
    CentralFraction { fraction: f32 },
    /// Square centre crop of side `floor(fraction * min(h, w))`, top-left at
    /// `((h - side + 1) / 2, (w - side + 1) / 2)`, then resize (timm / torchvision style).
    SquareCenterCrop { fraction: f32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeFilter {
    Nearest,
    /// Triangle filter, antialiased when shrinking.
    Bilinear,
    /// Catmull-Rom (Keys a = -0.5), antialiased when shrinking, as Pillow's BICUBIC.
    Bicubic,
    Lanczos3,
    /// TensorFlow 1 `ResizeBilinear` (align_corners=false, half_pixel_centers=false): source
    /// coordinate `dst * in / out`, no antialiasing, interpolated in float (no 8-bit rounding
    /// before normalisation); JPEGs are decoded at full size. Matches TF Serving exports.
    TfLegacyBilinear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

/// Image to tensor: decode to 8-bit RGB, crop and resize per `resize`/`filter` to the input
/// size, reorder channels, then `value = (pixel * scale - mean[c]) / std[c]` with `pixel` in
/// 0..=255, laid out as the input's layout says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    pub resize: ResizePolicy,
    pub filter: ResizeFilter,
    pub channel_order: ChannelOrder,
    pub scale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocessing {
    /// Inception / TF-slim: full-image resize, `x / 127.5 - 1`.
    pub fn inception() -> Self {
        Preprocessing {
            resize: ResizePolicy::Stretch,
            filter: ResizeFilter::Bilinear,
            channel_order: ChannelOrder::Rgb,
            scale: 1.0,
            mean: [127.5; 3],
            std: [127.5; 3],
        }
    }

    /// torchvision ImageNet: `(x / 255 - mean) / std`, centre crop 0.875, bilinear.
    pub fn imagenet() -> Self {
        Preprocessing {
            resize: ResizePolicy::SquareCenterCrop { fraction: 0.875 },
            filter: ResizeFilter::Bilinear,
            channel_order: ChannelOrder::Rgb,
            scale: 1.0 / 255.0,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// EfficientNet-Lite (TF): square centre crop 0.875, bicubic, `(x - 127) / 128`.
    pub fn efficientnet_lite() -> Self {
        Preprocessing {
            resize: ResizePolicy::SquareCenterCrop { fraction: 0.875 },
            filter: ResizeFilter::Bicubic,
            channel_order: ChannelOrder::Rgb,
            scale: 1.0,
            mean: [127.0; 3],
            std: [128.0; 3],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputKind {
    /// Already a probability distribution (softmax applied in the graph).
    Probabilities,
    /// Raw scores; the runtime applies softmax.
    Logits,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub name: String,
    pub kind: OutputKind,
    /// Number of output classes, including any offset class (1001 for TF-slim Inception).
    pub classes: usize,
    /// Output index of `labels[0]`: 1 when class 0 is a background class.
    pub label_offset: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verification {
    /// What the bundle was compared with (the source model's file name).
    pub against: String,
    pub samples: usize,
    pub max_abs_diff: f32,
    pub tolerance: f32,
    pub passed: bool,
}
