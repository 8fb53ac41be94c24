//! JPEG-input signatures (TF Serving's `inception_saved_model.py` style): the network's image
//! tensor is produced by a `tf.map_fn` loop that decodes, crops, resizes and scales each JPEG.
//! We cut the graph at the loop's output (a new float32 `Placeholder` takes its place), read
//! the preprocessing off the loop body, keep the probabilities a `top_k` reads, and take over
//! the label strings the `classes` output gathers from.

use std::collections::{HashMap, HashSet, VecDeque};

use edge_proto::tensorflow::{DataType, GraphDef, NodeDef, SignatureDef, attr_value::Value};

use super::graph::{TensorRef, attr, attr_b, attr_i, const_value, data_inputs, fresh_name, set_attr};
use super::saved_model::tensor_ref;
use super::tensor::Data;
use super::{LoadOptions, TfError};
use crate::bundle::manifest::{ChannelOrder, Preprocessing, ResizeFilter, ResizePolicy};

/// The source graph cut at the decoded image, with what was learnt on the way.
pub(crate) struct Cut {
    /// The source graph, with the cut tensor's consumers reading `input` instead.
    pub graph: GraphDef,
    pub input: String,
    pub output: TensorRef,
    pub output_name: String,
    pub preprocessing: Option<Preprocessing>,
    pub labels: Option<Vec<String>>,
    pub notes: Vec<String>,
}

/// Ops that end the network walking back from the output: the decoding loop's outputs.
const LOOP_OUTPUTS: &[&str] = &[
    "TensorArrayGatherV3",
    "TensorArrayGatherV2",
    "TensorArrayPackV3",
    "TensorArrayConcatV3",
];
const DECODERS: &[&str] = &[
    "DecodeJpeg",
    "DecodeAndCropJpeg",
    "DecodeImage",
    "DecodePng",
    "DecodeBmp",
    "DecodeGif",
];
const TRANSPARENT: &[&str] = &[
    "Identity",
    "Enter",
    "Squeeze",
    "ExpandDims",
    "Reshape",
    "Cast",
    "StopGradient",
];

struct Nodes<'a>(HashMap<&'a str, &'a NodeDef>);

impl<'a> Nodes<'a> {
    fn get(&self, t: &TensorRef) -> Option<&'a NodeDef> {
        self.0.get(t.node.as_str()).copied()
    }

    fn input(&self, n: &NodeDef, k: usize) -> Option<(TensorRef, &'a NodeDef)> {
        let t = data_inputs(n).nth(k)?;
        Some((t.clone(), self.get(&t)?))
    }

    /// Follows `Identity`/`Enter` (and for constants, `Cast`) producers back from `t`.
    fn trace(&self, t: &TensorRef, through_cast: bool) -> Option<(TensorRef, &'a NodeDef)> {
        let (mut t, mut n) = (t.clone(), self.get(t)?);
        for _ in 0..64 {
            let passes = matches!(n.op.as_str(), "Identity" | "Enter" | "StopGradient")
                || (through_cast && n.op == "Cast");
            if !passes {
                return Some((t, n));
            }
            (t, n) = self.input(n, 0)?;
        }
        None
    }

    /// A constant operand (through identities and casts) as f64 values.
    fn constant(&self, t: &TensorRef) -> Option<Vec<f64>> {
        let (_, n) = self.trace(t, true).filter(|(_, n)| n.op == "Const")?;
        let v = const_value(n).ok()?;
        Some(match v.data {
            Data::F32(v) => v.into_iter().map(f64::from).collect(),
            Data::F64(v) => v,
            Data::I32(v) => v.into_iter().map(f64::from).collect(),
            Data::I64(v) => v.into_iter().map(|x| x as f64).collect(),
            _ => return None,
        })
    }
}

pub(crate) fn prepare(
    graph: &GraphDef,
    sig: &SignatureDef,
    input_key: &str,
    options: &LoadOptions,
) -> Result<Cut, TfError> {
    let nodes = Nodes(graph.node.iter().map(|n| (n.name.as_str(), n)).collect());
    let string_input = sig
        .inputs
        .get(input_key)
        .map(tensor_ref)
        .transpose()?
        .map(|t| t.node)
        .unwrap_or_default();
    let (output, topk) = network_output(&nodes, sig, options)?;
    let labels = topk.as_ref().and_then(|k| labels_for(&nodes, sig, k));
    let (cut, cut_node) = find_cut(&nodes, &output, &string_input)?;

    let element_shape = match attr(cut_node, "element_shape") {
        Some(Value::Shape(s)) if !s.unknown_rank && s.dim.iter().all(|d| d.size > 0) => {
            Some(s.dim.iter().map(|d| d.size).collect::<Vec<_>>())
        }
        _ => None,
    };
    let mut notes = vec![format!(
        "cut the graph at {} (output of the JPEG-decoding loop {:?}); the network starts there",
        cut.to_input(),
        cut_node.op
    )];
    let preprocessing = if options.preprocessing_override {
        notes.push("preprocessing detection skipped: the caller supplies it".into());
        None
    } else {
        let found = detect(&nodes, cut_node, &mut notes)?;
        Some(found)
    };

    let mut g = graph.clone();
    let mut taken: HashSet<String> = g.node.iter().map(|n| n.name.clone()).collect();
    let input = fresh_name(&mut taken, "input");
    let shape: Vec<i64> = match &element_shape {
        Some(dims) => std::iter::once(1).chain(dims.iter().copied()).collect(),
        None => vec![1, -1, -1, 3],
    };
    notes.push(format!(
        "new float32 input {input:?} {shape:?} (NHWC) replaces it"
    ));
    for n in &mut g.node {
        for i in &mut n.input {
            if TensorRef::parse(i).as_ref() == Some(&cut) {
                *i = input.clone();
            }
        }
    }
    let mut placeholder = NodeDef {
        name: input.clone(),
        op: "Placeholder".into(),
        ..Default::default()
    };
    set_attr(&mut placeholder, "dtype", Value::Type(DataType::DtFloat as i32));
    set_attr(
        &mut placeholder,
        "shape",
        Value::Shape(super::tensor::shape_proto_i64(&shape)),
    );
    g.node.push(placeholder);
    if let Some(l) = &labels {
        notes.push(format!(
            "took over {} labels from the constant the classes output gathers from",
            l.len()
        ));
    }
    let output_name = output.node.clone();
    Ok(Cut {
        graph: g,
        input,
        output,
        output_name,
        preprocessing,
        labels,
        notes,
    })
}

/// The float tensor to keep: `options.output`, or what the signature's outputs compute before
/// any `TopKV2` (returned too, to find the labels).
fn network_output<'a>(
    nodes: &Nodes<'a>,
    sig: &SignatureDef,
    options: &LoadOptions,
) -> Result<(TensorRef, Option<&'a NodeDef>), TfError> {
    if let Some(w) = &options.output {
        let t = match sig.outputs.get(w) {
            Some(info) => tensor_ref(info)?,
            None => TensorRef::parse_user(w),
        };
        return Ok((t, None));
    }
    let mut candidates: Vec<(TensorRef, Option<&NodeDef>)> = Vec::new();
    for info in sig.outputs.values() {
        if DataType::try_from(info.dtype) != Ok(DataType::DtFloat) {
            continue;
        }
        let Some((t, n)) = nodes.trace(&tensor_ref(info)?, false) else {
            continue;
        };
        let found = if n.op == "TopKV2" {
            (nodes.input(n, 0).map(|(t, _)| t), Some(n))
        } else {
            (Some(t), None)
        };
        if let (Some(t), k) = found
            && !candidates.iter().any(|(c, _)| *c == t)
        {
            candidates.push((t, k));
        }
    }
    match candidates.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(TfError::Ambiguous {
            what: "network output",
            reason: format!(
                "the signature's float outputs lead to {:?}; name the output to keep explicitly",
                candidates.iter().map(|(t, _)| t.to_input()).collect::<Vec<_>>()
            ),
        }),
    }
}

/// Label strings: a signature output gathering from a string constant with `topk`'s indices.
fn labels_for(nodes: &Nodes<'_>, sig: &SignatureDef, topk: &NodeDef) -> Option<Vec<String>> {
    sig.outputs.values().find_map(|info| {
        let (_, gather) = nodes.trace(&tensor_ref(info).ok()?, false)?;
        if !matches!(gather.op.as_str(), "GatherV2" | "Gather") {
            return None;
        }
        let (indices, _) = nodes.input(gather, 1)?;
        let (_, params) = nodes.input(gather, 0)?;
        let (_, params) = nodes.trace(&TensorRef::new(&params.name, 0), false)?;
        if indices != TensorRef::new(&topk.name, 1) || params.op != "Const" {
            return None;
        }
        match const_value(params).ok()?.data {
            Data::Str(s) => Some(
                s.iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect(),
            ),
            _ => None,
        }
    })
}

/// Walks back from the output; the network ends at the decoding loop's output tensor.
fn find_cut<'a>(
    nodes: &Nodes<'a>,
    output: &TensorRef,
    string_input: &str,
) -> Result<(TensorRef, &'a NodeDef), TfError> {
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([output.clone()]);
    let mut cuts: Vec<TensorRef> = Vec::new();
    while let Some(t) = queue.pop_front() {
        let n = nodes
            .get(&t)
            .ok_or_else(|| TfError::graph(&t.node, "input names no node in the graph"))?;
        if LOOP_OUTPUTS.contains(&n.op.as_str()) {
            if !cuts.contains(&t) {
                cuts.push(t);
            }
            continue;
        }
        if n.name == string_input || DECODERS.contains(&n.op.as_str()) {
            return Err(TfError::Unsupported {
                flavour: format!(
                    "the network reads the JPEG input through {} (node {:?}) without a tf.map_fn decoding loop",
                    n.op, n.name
                ),
                hint: "Export a signature that takes float32 images, or a frozen graph, and pass the preprocessing \
                       with --preset"
                    .into(),
            });
        }
        if seen.insert(n.name.clone()) {
            queue.extend(data_inputs(n));
        }
    }
    match cuts.as_slice() {
        [one] => Ok((one.clone(), nodes.get(one).ok_or_else(|| TfError::graph(&one.node, "vanished"))?)),
        _ => Err(TfError::Unsupported {
            flavour: format!(
                "a JPEG signature whose network starts at {} decoding-loop outputs {:?} (expected one)",
                cuts.len(),
                cuts.iter().map(TensorRef::to_input).collect::<Vec<_>>()
            ),
            hint: "Export a signature that takes float32 images, or a frozen graph, and pass the preprocessing with \
                   --preset"
                .into(),
        }),
    }
}

/// Reads the preprocessing off the loop body: the value written into the loop's output
/// TensorArray, walked back to the decoder.
fn detect(nodes: &Nodes<'_>, cut_node: &NodeDef, notes: &mut Vec<String>) -> Result<Preprocessing, TfError> {
    let fail = |found: String| TfError::Preprocessing { found };
    let (_, array) = nodes
        .input(cut_node, 0)
        .and_then(|(t, _)| nodes.trace(&t, false))
        .ok_or_else(|| {
            fail(format!(
                "{} {:?} reads no TensorArray",
                cut_node.op, cut_node.name
            ))
        })?;
    let writers: Vec<&NodeDef> = nodes
        .0
        .values()
        .copied()
        .filter(|n| n.op.starts_with("TensorArrayWrite"))
        .filter(|n| {
            nodes
                .input(n, 0)
                .and_then(|(t, _)| nodes.trace(&t, false))
                .is_some_and(|(_, a)| a.name == array.name)
        })
        .collect();
    let [writer] = writers.as_slice() else {
        return Err(fail(format!(
            "{} writes into the loop's TensorArray {:?}",
            writers.len(),
            array.name
        )));
    };
    let (mut cur, _) = nodes
        .input(writer, 2)
        .ok_or_else(|| fail(format!("{:?} writes no value", writer.name)))?;
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
        let ins: Vec<TensorRef> = data_inputs(n).collect();
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
        let n = nodes.get(&t)?;
        // Shapes do not depend on pixel values: stop there (the image's own scaling is upstream).
        if !seen.insert(n.name.clone())
            || seen.len() > 256
            || matches!(n.op.as_str(), "Shape" | "Size" | "Rank")
        {
            continue;
        }
        if n.op == "Mul" {
            for i in data_inputs(n) {
                if let Some([f]) = nodes.constant(&i).as_deref()
                    && *f > 0.0
                    && *f < 1.0
                {
                    found.push(*f);
                }
            }
        }
        queue.extend(data_inputs(n));
    }
    found.sort_by(f64::total_cmp);
    found.dedup();
    match found.as_slice() {
        [f] => Some(*f as f32),
        _ => None,
    }
}
