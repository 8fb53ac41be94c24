//! Fixture tests: the TensorFlow exports of the seeded Inception V3 built by
//! `scripts/fixtures.sh` (directory in `$EDGE_FIXTURES`; these tests fail when it is unset,
//! they never skip) go through the GraphDef path into tract and must reproduce TensorFlow's
//! probabilities on the reference inputs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use edge_runtime::bundle::manifest::{ChannelOrder, ResizeFilter, ResizePolicy};
use tract_tensorflow::prelude::*;

use super::*;

const SIZE: usize = 299;

fn fixtures() -> PathBuf {
    let dir = std::env::var_os("EDGE_FIXTURES").expect(
        "EDGE_FIXTURES is not set: point it at the fixture directory printed by scripts/fixtures.sh \
         (these tests need the TensorFlow exports and never skip)",
    );
    let dir = PathBuf::from(dir);
    assert!(
        dir.join("fixtures.json").is_file(),
        "{} has no fixtures.json",
        dir.display()
    );
    dir
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

struct Case {
    name: String,
    input: Vec<f32>,
    probs: Vec<f32>,
    top5: Vec<usize>,
}

/// Reference cases of `kind` ("tensor": network inputs; "jpeg" / "jpeg_tf2": the TF1 / TF 2.x
/// JPEG export's preprocessed JPEGs).
fn cases(kind: &str) -> Vec<Case> {
    let dir = fixtures().join("reference");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).expect("reference.json"))
            .expect("json");
    let cases: Vec<Case> = json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| c["kind"] == kind)
        .map(|c| Case {
            name: c["name"].as_str().expect("name").to_string(),
            input: read_f32(&dir.join(c["input"].as_str().expect("input"))),
            probs: read_f32(&dir.join(c["output"].as_str().expect("output"))),
            top5: c["top5_indices"]
                .as_array()
                .expect("top5")
                .iter()
                .map(|v| v.as_u64().expect("index") as usize)
                .collect(),
        })
        .collect();
    assert!(!cases.is_empty(), "no {kind} cases in reference.json");
    cases
}

fn top5(p: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    idx.truncate(5);
    idx
}

/// Loads `g` in tract as the converter does, runs every case, asserts, returns the max diff.
fn check_against_tensorflow(g: &TfGraph, kind: &str) -> f32 {
    let start = Instant::now();
    let model = tract_model(g, &[1, SIZE, SIZE, 3]).expect("tract loads and declutters the graph");
    let plan = model
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .expect("tract optimises the graph");
    eprintln!(
        "tract load + optimise: {:.1?} ({} nodes in)",
        start.elapsed(),
        g.graph.node.len()
    );
    let mut worst = 0f32;
    for case in cases(kind) {
        let x = tract_ndarray::ArrayD::from_shape_vec(vec![1, SIZE, SIZE, 3], case.input).expect("shape");
        let t = Instant::now();
        let out = plan.run(tvec!(Tensor::from(x).into())).expect("tract runs");
        let got: Vec<f32> = out[0]
            .to_plain_array_view::<f32>()
            .expect("f32")
            .iter()
            .copied()
            .collect();
        assert_eq!(got.len(), case.probs.len(), "{}: output length", case.name);
        let diff = got
            .iter()
            .zip(&case.probs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{:16} max abs diff {diff:.2e}, run {:.1?}",
            case.name,
            t.elapsed()
        );
        assert!(diff <= 1e-4, "{}: max abs diff {diff} vs TensorFlow", case.name);
        assert_eq!(
            top5(&got),
            case.top5,
            "{}: top-5 differs from TensorFlow",
            case.name
        );
        worst = worst.max(diff);
    }
    worst
}

fn ops(g: &TfGraph) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for n in &g.graph.node {
        *m.entry(n.op.clone()).or_insert(0) += 1;
    }
    m
}

#[test]
fn frozen_keras_inception_folds_and_matches_tensorflow() {
    let g = load_frozen_graph(&fixtures().join("inception_v3_seeded_frozen.pb")).expect("converts");
    eprintln!("{:#?}\n{:?}", g.notes, ops(&g));
    assert_eq!((g.input.as_str(), g.output.as_str()), ("input", "probabilities"));
    assert_eq!(g.input_shape, [Some(1), Some(SIZE), Some(SIZE), Some(3)]);
    assert!(
        g.notes.iter().any(|n| n.contains("folded 94 batch-norm blocks")),
        "{:?}",
        g.notes
    );
    let ops = ops(&g);
    for gone in ["Rsqrt", "Sub", "Mul", "AddV2", "Reshape"] {
        assert!(!ops.contains_key(gone), "{gone} left in {ops:?}");
    }
    assert_eq!(ops.get("Identity"), Some(&1), "only the named output");
    assert_eq!(
        ops.get("BiasAdd"),
        Some(&95),
        "94 folded batch norms + the classifier bias"
    );
    let diff = check_against_tensorflow(&g, "tensor");
    eprintln!("frozen graph: max abs diff {diff:.2e}");
}

#[test]
fn tf2_saved_model_inlines_freezes_and_matches_tensorflow() {
    // The TF Serving layout: the model directory holding version 1.
    let g = load_saved_model(&fixtures().join("inception_v3_seeded"), None).expect("converts");
    eprintln!("{:#?}\n{:?}", g.notes, ops(&g));
    assert_eq!(g.signature.as_deref(), Some("serving_default"));
    assert_eq!(g.output, "probabilities");
    assert_eq!(g.input_shape, [None, Some(SIZE), Some(SIZE), Some(3)]);
    assert!(
        g.notes.iter().any(|n| n.contains("froze 378 variable reads")),
        "{:?}",
        g.notes
    );
    assert!(
        g.notes.iter().any(|n| n.contains("folded 94 batch-norm blocks")),
        "{:?}",
        g.notes
    );
    let ops = ops(&g);
    for gone in [
        "StatefulPartitionedCall",
        "ReadVariableOp",
        "VarHandleOp",
        "Rsqrt",
        "Mul",
    ] {
        assert!(!ops.contains_key(gone), "{gone} left in {ops:?}");
    }
    let diff = check_against_tensorflow(&g, "tensor");
    eprintln!("TF2 SavedModel: max abs diff {diff:.2e}");
}

/// What both JPEG exports (TF1 and TF 2.x control flow) must come out as.
fn check_jpeg_export(g: &TfGraph) {
    assert_eq!(g.output, "probabilities");
    assert_eq!(g.input_shape, [Some(1), Some(SIZE), Some(SIZE), Some(3)]);
    let p = g.preprocessing.clone().expect("preprocessing detected");
    assert_eq!(p.resize, ResizePolicy::CentralFraction { fraction: 0.875 });
    assert_eq!(
        (p.filter, p.channel_order, p.scale),
        (ResizeFilter::TfLegacyBilinear, ChannelOrder::Rgb, 1.0)
    );
    assert_eq!((p.mean, p.std), ([127.5; 3], [127.5; 3]));
    let labels = g.labels.clone().expect("labels taken over");
    let file =
        std::fs::read_to_string(fixtures().join("inception_v3_seeded_labels.txt")).expect("labels.txt");
    assert_eq!(labels, file.lines().collect::<Vec<_>>());
    let ops = ops(g);
    for gone in [
        "FusedBatchNormV3",
        "VariableV2",
        "TopKV2",
        "DecodeJpeg",
        "Merge",
        "TensorArrayGatherV3",
        "While",
        "StatelessWhile",
        "TensorListStack",
    ] {
        assert!(!ops.contains_key(gone), "{gone} left in {ops:?}");
    }
}

#[test]
fn jpeg_saved_model_is_cut_at_the_decoded_image_and_matches_tensorflow() {
    let g = load_saved_model(
        &fixtures().join("inception_v3_seeded_jpeg/1"),
        Some("predict_images"),
    )
    .expect("converts");
    eprintln!("{:#?}\n{:?}", g.notes, ops(&g));
    check_jpeg_export(&g);
    let diff = check_against_tensorflow(&g, "jpeg");
    eprintln!("JPEG SavedModel: max abs diff {diff:.2e}");
}

#[test]
fn tf2_jpeg_saved_model_with_a_while_loop_is_cut_at_the_stacked_images_and_matches_tensorflow() {
    // The same TF Serving code exported under TF 2.x: map_fn is a control-flow-v2 While whose
    // body function decodes; the images come out of a TensorListStack.
    let g = load_saved_model(&fixtures().join("inception_v3_seeded_jpeg_tf2"), None).expect("converts");
    eprintln!("{:#?}\n{:?}", g.notes, ops(&g));
    assert_eq!(g.signature.as_deref(), Some("serving_default"));
    check_jpeg_export(&g);
    let note = |needle: &str| {
        assert!(
            g.notes.iter().any(|n| n.contains(needle)),
            "no note with {needle:?}: {:#?}",
            g.notes
        );
    };
    note("TensorListStack");
    note("control-flow-v2 While loop \"map/while\"");
    note("detected preprocessing: DecodeJpeg (channels=3)");
    let diff = check_against_tensorflow(&g, "jpeg_tf2");
    eprintln!("TF 2.x JPEG SavedModel: max abs diff {diff:.2e}");
}

#[test]
fn jpeg_saved_model_with_preprocessing_override_skips_detection() {
    let options = LoadOptions {
        preprocessing_override: true,
        ..Default::default()
    };
    let g = load_saved_model_with(&fixtures().join("inception_v3_seeded_jpeg"), &options).expect("converts");
    assert_eq!(g.signature.as_deref(), Some("serving_default"));
    assert!(g.preprocessing.is_none());
    assert!(g.labels.is_some());
}

#[test]
fn unknown_signature_lists_the_available_ones() {
    let err = load_saved_model(&fixtures().join("inception_v3_seeded/1"), Some("nope"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"nope\"") && err.contains("serving_default"),
        "{err}"
    );
}
