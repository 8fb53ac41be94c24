//! A real pretrained classifier proves preprocessing: EfficientNet-Lite0 converted with its
//! own preprocessing must name the two photos as ONNX Runtime does (../shared/models/README.md).

use std::process::Command;

use edge_e2e::{bin, run, shared_models, stderr, stdout};
use serde_json::Value;

pub use edge_e2e::efficientnet_bundle;

#[test]
fn efficientnet_names_espresso_and_tripod_like_onnx_runtime() {
    let bundle = efficientnet_bundle();
    let models = shared_models();
    let out = run(Command::new(bin("edge-agent"))
        .args(["classify", "--json", "--top-k", "5", "--bundle"])
        .arg(&bundle)
        .arg(models.join("coffee.jpg"))
        .arg(models.join("camera.jpg")));
    assert!(out.status.success(), "classify failed:\n{}", stderr(&out));
    let doc: Value = serde_json::from_str(&stdout(&out)).expect("classify --json prints JSON");
    let results = doc["results"].as_array().expect("results array");
    assert_eq!(results.len(), 2);
    // (photo, expected top-1, ONNX Runtime's score per the README)
    for (result, (photo, label, score)) in results
        .iter()
        .zip([("coffee.jpg", "espresso", 0.954), ("camera.jpg", "tripod", 0.938)])
    {
        let top = &result["top"][0];
        let got = top["score"].as_f64().unwrap();
        println!(
            "{photo}: {} {got:.4} (ONNX Runtime: {label} {score})",
            top["label"]
        );
        assert_eq!(top["label"], label, "{photo}: {result}");
        assert!((got - score).abs() <= 0.03, "{photo}: score {got} vs {score}");
        assert_eq!(result["top"].as_array().unwrap().len(), 5);
    }
}

#[test]
fn dct_scaled_decoding_of_a_large_photo_classifies_like_a_full_decode() {
    // coffee.jpg upscaled to 4032x3024 (a phone photo's size): the DCT-scaled decode reads it
    // at 1/8 (504x378, still larger than the 224 crop) instead of 12 MP.
    let dir = tempfile::tempdir().unwrap();
    let photo = image::open(shared_models().join("coffee.jpg")).unwrap();
    let big = photo.resize_exact(4032, 3024, image::imageops::FilterType::Triangle);
    let path = dir.path().join("coffee-12mp.jpg");
    big.to_rgb8().save(&path).unwrap();
    let bundle = efficientnet_bundle();
    let mut scores = Vec::new();
    for flag in [None, Some("--no-dct-scaling")] {
        let out = run(Command::new(bin("edge-agent"))
            .args(["classify", "--json", "--bundle"])
            .arg(&bundle)
            .arg(&path)
            .args(flag));
        assert!(out.status.success(), "{}", stderr(&out));
        let doc: Value = serde_json::from_str(&stdout(&out)).unwrap();
        let result = &doc["results"][0];
        println!(
            "{}: {} {} preprocess {:.1} ms",
            flag.unwrap_or("dct scaling"),
            result["top"][0]["label"],
            result["top"][0]["score"],
            result["timings_ms"]["preprocess"]
        );
        assert_eq!(result["top"][0]["label"], "espresso");
        scores.push(result["top"][0]["score"].as_f64().unwrap());
    }
    assert!(
        (scores[0] - scores[1]).abs() < 0.05,
        "DCT-scaled {} vs full {}",
        scores[0],
        scores[1]
    );
}

#[test]
fn the_runtime_kernels_name_the_photos_with_the_same_top_5_as_tracts() {
    // EfficientNet-Lite0 mixes what the runtime's kernels take (1x1 products, the strided stem
    // convolution) with what stays tract's (depthwise convolutions, ReLU6).
    use edge_runtime::runtime::{Classifier, RuntimeOptions, RuntimeSettings, Tuning};
    let bundle = efficientnet_bundle();
    let load = |tuning| {
        let options = RuntimeOptions {
            tuning,
            ..RuntimeOptions::default()
        };
        Classifier::load(&bundle, &options).unwrap()
    };
    let tract = load(Tuning::Off);
    let ours = load(Tuning::Fixed(
        RuntimeSettings::new([("EDGE_KERNELS", "gemm")]).unwrap(),
    ));
    for (photo, label) in [("coffee.jpg", "espresso"), ("camera.jpg", "tripod")] {
        let image = std::fs::read(shared_models().join(photo)).unwrap();
        let (a, b) = (
            tract.classify(&image, 5).unwrap(),
            ours.classify(&image, 5).unwrap(),
        );
        let labels = |c: &edge_runtime::runtime::Classification| -> Vec<String> {
            c.top.iter().map(|p| p.label.clone()).collect()
        };
        let worst = edge_e2e::max_abs_diff(&a.probabilities, &b.probabilities);
        println!(
            "{photo}: tract {:?} {:.4}, runtime kernels {:?} {:.4}, max abs diff {worst:.2e}",
            labels(&a),
            a.top[0].score,
            labels(&b),
            b.top[0].score
        );
        assert_eq!(b.top[0].label, label, "{photo}");
        assert_eq!(labels(&a), labels(&b), "{photo}: top-5 differs");
        assert!(worst < 1e-4, "{photo}: probabilities differ by {worst}");
    }
}
