//! Preprocessing detection: the value a JPEG-decoding loop stores per image, walked back to the
//! decoder, read as crop, resize and per-channel `(pixel - mean) / std`.

use std::collections::{HashSet, VecDeque};

use edge_proto::tensorflow::NodeDef;
use edge_runtime::bundle::manifest::{ChannelOrder, Preprocessing, ResizeFilter, ResizePolicy};

use super::super::TfError;
use super::super::graph::{TensorRef, attr_b, attr_i};
use super::decoding_loop::{DECODERS, LoopValue};
use super::nodes::Nodes;

const TRANSPARENT: &[&str] = &[
    "Identity",
    "Enter",
    "Squeeze",
    "ExpandDims",
    "Reshape",
    "Cast",
    "StopGradient",
];

/// Reads the preprocessing off the value the decoding loop stores per image, walked back to
/// the decoder.
pub(super) fn detect(found: &LoopValue<'_>, notes: &mut Vec<String>) -> Result<Preprocessing, TfError> {
    let fail = |what: String| TfError::Preprocessing {
        found: format!("in {} ({}): {what}", found.loop_desc, found.nodes.scope()),
    };
    let nodes = &found.nodes;
    let mut cur = found.value.clone();
    let (mut a, mut b) = ([1f64; 3], [0f64; 3]);
    let mut steps: Vec<String> = Vec::new();
    let (mut resize, mut crop): (Option<(ResizeFilter, String)>, Option<f32>) = (None, None);
    let per_channel = |v: Vec<f64>| match v.as_slice() {
        [x] => Some([*x; 3]),
        [r, g, b] => Some([*r, *g, *b]),
        _ => None,
    };
    let decoder = loop {
        let n = nodes
            .get(&cur)
            .ok_or_else(|| fail(format!("{} names no node", cur.node)))?;
        let op = n.op.as_str();
        let ins: Vec<TensorRef> = nodes.inputs(n);
        if steps.len() > 64 {
            return Err(fail(format!(
                "a chain of more than 64 ops: {}",
                steps.join(" <- ")
            )));
        }
        if DECODERS.contains(&op) {
            break n;
        }
        steps.push(op.to_string());
        let operands = |n: &NodeDef| -> Option<(TensorRef, [f64; 3], bool)> {
            let [x, y] = ins.as_slice() else { return None };
            if let Some(c) = nodes.constant(y).and_then(per_channel) {
                return Some((x.clone(), c, true));
            }
            nodes
                .constant(x)
                .and_then(per_channel)
                .map(|c| (y.clone(), c, n.op == "Mul" || n.op.starts_with("Add")))
        };
        let next = match op {
            _ if TRANSPARENT.contains(&op) => ins.first().cloned(),
            "Mul" | "RealDiv" | "Div" | "Add" | "AddV2" | "Sub" => {
                let Some((x, c, x_first)) = operands(n) else {
                    return Err(fail(format!(
                        "{op} {:?} without a constant operand, after {}",
                        n.name,
                        steps.join(" <- ")
                    )));
                };
                for k in 0..3 {
                    match (op, x_first) {
                        ("Mul", _) => a[k] *= c[k],
                        ("RealDiv" | "Div", true) => a[k] /= c[k],
                        ("Add" | "AddV2", _) => b[k] += a[k] * c[k],
                        ("Sub", true) => b[k] -= a[k] * c[k],
                        ("Sub", false) => (a[k], b[k]) = (-a[k], b[k] + a[k] * c[k]),
                        _ => return Err(fail(format!("constant divided by the image in {:?}", n.name))),
                    }
                }
                Some(x)
            }
            "ResizeBilinear" | "ResizeBicubic" | "ResizeNearestNeighbor" => {
                if crop.is_some() {
                    return Err(fail("a crop after the resize".into()));
                }
                let legacy = !attr_b(n, "align_corners").unwrap_or(false)
                    && !attr_b(n, "half_pixel_centers").unwrap_or(false);
                let filter = match op {
                    "ResizeBilinear" if legacy => ResizeFilter::TfLegacyBilinear,
                    "ResizeBilinear" => ResizeFilter::Bilinear,
                    "ResizeBicubic" => ResizeFilter::Bicubic,
                    _ => ResizeFilter::Nearest,
                };
                let size = ins.get(1).and_then(|t| nodes.constant(t)).unwrap_or_default();
                let size: Vec<String> = size.iter().map(|d| format!("{d}")).collect();
                let desc = format!(
                    "{op} to {} (align_corners={}, half_pixel_centers={})",
                    size.join("x"),
                    attr_b(n, "align_corners").unwrap_or(false),
                    attr_b(n, "half_pixel_centers").unwrap_or(false)
                );
                resize = Some((filter, desc));
                ins.first().cloned()
            }
            "Slice" => {
                let fraction = ins.get(1).and_then(|t| crop_fraction(nodes, t)).ok_or_else(|| {
                    fail(format!(
                        "Slice {:?} whose crop fraction could not be found",
                        n.name
                    ))
                })?;
                crop = Some(fraction);
                ins.first().cloned()
            }
            _ => {
                return Err(fail(format!(
                    "unsupported op {op} ({:?}) after {}",
                    n.name,
                    steps.join(" <- ")
                )));
            }
        };
        cur = next.ok_or_else(|| fail(format!("{op} {:?} without inputs", n.name)))?;
    };
    let channels = attr_i(decoder, "channels").unwrap_or(0);
    if !matches!(channels, 0 | 3) {
        return Err(fail(format!(
            "{} with channels={channels}; edge bundles decode to RGB",
            decoder.op
        )));
    }
    let Some((filter, resize_desc)) = resize else {
        return Err(fail(format!(
            "no resize between {} and the network: {}",
            decoder.op,
            steps.join(" <- ")
        )));
    };
    if a.iter().any(|&x| x <= 0.0 || !x.is_finite()) {
        return Err(fail(format!("pixel scaling {a:?} is not positive")));
    }
    let tidy = |x: f64| {
        let r = (x * 1e4).round() / 1e4;
        (if (r - x).abs() <= 1e-6 * x.abs().max(1.0) {
            r
        } else {
            x
        }) as f32
    };
    let std = [tidy(1.0 / a[0]), tidy(1.0 / a[1]), tidy(1.0 / a[2])];
    let mean = [tidy(-b[0] / a[0]), tidy(-b[1] / a[1]), tidy(-b[2] / a[2])];
    let p = Preprocessing {
        resize: crop.map_or(ResizePolicy::Stretch, |fraction| ResizePolicy::CentralFraction {
            fraction,
        }),
        filter,
        channel_order: ChannelOrder::Rgb,
        scale: 1.0,
        mean,
        std,
    };
    steps.reverse();
    notes.push(format!(
        "detected preprocessing: {} (channels={channels}) -> {}; crop {:?}, {resize_desc}; value = (pixel - {mean:?}) / {std:?}",
        decoder.op,
        steps.join(" -> "),
        p.resize
    ));
    if resize_desc.contains("half_pixel_centers=false")
        && !matches!(filter, ResizeFilter::Nearest | ResizeFilter::TfLegacyBilinear)
    {
        notes.push(
            "the graph resizes with TF1 legacy sampling (half_pixel_centers=false, no antialiasing); \
             edge preprocessing resamples with pixel centres, so results differ slightly"
                .into(),
        );
    }
    Ok(p)
}

/// `tf.image.central_crop`: the crop offset is `(len - len * fraction) / 2`; find the
/// constant fraction multiplied in among the offset's ancestors.
fn crop_fraction(nodes: &Nodes<'_>, begin: &TensorRef) -> Option<f32> {
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([begin.clone()]);
    let mut found: Vec<f64> = Vec::new();
    while let Some(t) = queue.pop_front() {
        let Some(n) = nodes.get(&t) else {
            continue; // a function argument
        };
        // Shapes do not depend on pixel values: stop there (the image's own scaling is upstream).
        if !seen.insert(n.name.clone())
            || seen.len() > 256
            || matches!(n.op.as_str(), "Shape" | "Size" | "Rank")
        {
            continue;
        }
        if n.op == "Mul" {
            for i in nodes.inputs(n) {
                if let Some([f]) = nodes.constant(&i).as_deref()
                    && *f > 0.0
                    && *f < 1.0
                {
                    found.push(*f);
                }
            }
        }
        queue.extend(nodes.inputs(n));
    }
    found.sort_by(f64::total_cmp);
    found.dedup();
    match found.as_slice() {
        [f] => Some(*f as f32),
        _ => None,
    }
}
