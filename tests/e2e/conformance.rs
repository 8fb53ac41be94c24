//! Pool conformance with clients nobody here wrote: TensorFlow Serving's Python client
//! (tensorflow-serving-api) and NVIDIA's tritonclient (KServe v2) against `edge-agent serve`;
//! their answers must equal the local runtime's. The clients are installed by
//! scripts/clients.sh (scripts/test.sh exports its variables).

use std::path::{Path, PathBuf};
use std::process::Command;

use edge_e2e::{bin, run, shared_models, stderr, stdout};
use edge_runtime::bundle::read_manifest;
use edge_runtime::preprocess::{ImageLimits, Preprocessor};
use edge_runtime::runtime::{Classifier, RuntimeOptions, Tensor};
use serde_json::Value;

use crate::classify_photos::efficientnet_bundle;
use crate::pool::Server;

pub(crate) fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests with scripts/test.sh, or `eval export $(scripts/clients.sh)`"
        )
    })
}

pub(crate) fn script(name: &str) -> PathBuf {
    edge_e2e::workspace().join("tests/conformance").join(name)
}

pub(crate) fn photos() -> Vec<PathBuf> {
    let m = shared_models();
    vec![m.join("coffee.jpg"), m.join("camera.jpg")]
}

/// The local runtime's top-5 for each photo, from `edge-agent classify --json`.
pub(crate) fn local_top5() -> Vec<Vec<(String, f64)>> {
    let out = run(Command::new(bin("edge-agent"))
        .args(["classify", "--json", "--top-k", "5", "--bundle"])
        .arg(efficientnet_bundle())
        .args(photos()));
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p["label"].as_str().unwrap().to_owned(),
                        p["score"].as_f64().unwrap(),
                    )
                })
                .collect()
        })
        .collect()
}

/// `photo` preprocessed for `bundle`'s model, written to `dir` as little-endian float32 values
/// with its shape in `<file>.shape` (as tests/conformance's clients read it); returns the file
/// and the tensor.
pub(crate) fn tensor_file(bundle: &Path, photo: &Path, dir: &Path) -> (PathBuf, Tensor) {
    let manifest = read_manifest(bundle).unwrap();
    let pre = Preprocessor::new(
        manifest.preprocessing.clone(),
        manifest.input.clone(),
        ImageLimits::default(),
    )
    .unwrap();
    let tensor = pre.tensor_from_bytes(&std::fs::read(photo).unwrap()).unwrap();
    let values = tensor.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap();
    let file = dir.join("input.f32");
    std::fs::write(
        &file,
        values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
    )
    .unwrap();
    let dims: Vec<String> = manifest.input.shape.iter().map(|d| d.to_string()).collect();
    std::fs::write(dir.join("input.f32.shape"), dims.join(",")).unwrap();
    (file, tensor)
}

pub(crate) fn assert_same_top5(got: &Value, want: &[Vec<(String, f64)>], who: &str) {
    let got = got
        .as_array()
        .unwrap_or_else(|| panic!("{who}: no images in the answer"));
    assert_eq!(got.len(), want.len(), "{who}");
    for (g, w) in got.iter().zip(want) {
        let g = g.as_array().unwrap();
        assert_eq!(g.len(), 5, "{who}: {g:?}");
        for (pair, (label, score)) in g.iter().zip(w) {
            assert_eq!(pair[0].as_str().unwrap(), label, "{who}");
            assert!(
                (pair[1].as_f64().unwrap() - score).abs() < 1e-5,
                "{who}: {pair} vs {score}"
            );
        }
    }
}

/// A client's answers for the coffee photo's `tensor`: `tensor`, every class's score, must be
/// the local runtime's probabilities; `tensor_top`, the labelled top 5, its top 5.
fn assert_tensor_answers(answer: &Value, tensor: Tensor, who: &str) {
    let local = Classifier::load(&efficientnet_bundle(), &RuntimeOptions::default())
        .unwrap()
        .infer(tensor)
        .unwrap();
    let remote: Vec<f64> = answer["tensor"][0]
        .as_array()
        .unwrap_or_else(|| panic!("{who}: no scores in {answer}"))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(remote.len(), local.len(), "{who}");
    let diff = remote
        .iter()
        .zip(&local)
        .map(|(r, l)| (r - f64::from(*l)).abs())
        .fold(0.0, f64::max);
    println!("{who}: `scores` max abs diff vs local {diff:.2e}");
    assert!(diff < 1e-6, "{who}: {diff}");
    let top5 = local_top5();
    assert_same_top5(&answer["tensor_top"], &top5[..1], &format!("{who} with classes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorflow_serving_python_client_gets_the_local_answers() {
    let (python, pythonpath) = (var("EDGE_TFS_PYTHON"), var("EDGE_TFS_PYTHONPATH"));
    let server = Server::start(&[]);
    let _ = server.channel().await;
    // The preprocessed coffee photo, as the tensor signature takes it.
    let bundle = efficientnet_bundle();
    let dir = tempfile::tempdir().unwrap();
    let (file, tensor) = tensor_file(&bundle, &photos()[0], dir.path());

    let out = tokio::task::block_in_place(|| {
        run(Command::new(&python)
            .env("PYTHONPATH", &pythonpath)
            .env("TF_CPP_MIN_LOG_LEVEL", "3")
            .arg(script("tfs_client.py"))
            .arg(format!("127.0.0.1:{}", server.port))
            .arg("inception")
            .arg(&file)
            .args(photos()))
    });
    assert!(out.status.success(), "tfs_client.py failed:\n{}", stderr(&out));
    let answer: Value = serde_json::from_str(stdout(&out).lines().last().unwrap_or("")).unwrap();
    assert_same_top5(
        &answer["images"],
        &local_top5(),
        "tensorflow-serving-api Predict(images)",
    );

    assert_tensor_answers(&answer, tensor, "tensorflow-serving-api Predict(tensor)");
    let sigs: Vec<&str> = answer["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        sigs.contains(&"predict_images") && sigs.contains(&"serving_default"),
        "{sigs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_gets_the_local_answers() {
    let python = var("EDGE_TRITON_PYTHON");
    let server = Server::start(&[]);
    let _ = server.channel().await;
    let dir = tempfile::tempdir().unwrap();
    let (file, tensor) = tensor_file(&efficientnet_bundle(), &photos()[0], dir.path());
    let out = tokio::task::block_in_place(|| {
        run(Command::new(&python)
            .arg(script("triton_client.py"))
            .arg("--tensor")
            .arg(&file)
            .arg(format!("127.0.0.1:{}", server.port))
            .arg("inception")
            .args(photos()))
    });
    assert!(out.status.success(), "triton_client.py failed:\n{}", stderr(&out));
    let answer: Value = serde_json::from_str(stdout(&out).lines().last().unwrap_or("")).unwrap();
    assert_eq!(answer["live"], true);
    assert_eq!(answer["ready"], true);
    assert_eq!(answer["model_ready"], true);
    assert_eq!(answer["metadata"]["name"], "inception");
    assert_same_top5(&answer["images"], &local_top5(), "tritonclient ModelInfer(BYTES)");
    assert_tensor_answers(&answer, tensor, "tritonclient ModelInfer(FP32)");
}
