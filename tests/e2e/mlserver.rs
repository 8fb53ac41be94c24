//! The agent against a KServe v2 pool nobody here wrote: Seldon MLServer (PyPI) serving the
//! seeded Inception V3 ONNX through onnxruntime (tests/conformance/mlserver_inception.py), in
//! the shapes classifiers are commonly served with. The agent's cluster reply must pair each
//! label with MLServer's own score for it, as MLServer answers an application asking it
//! directly over HTTP (tests/conformance/mlserver_client.py) in the same test (for logits,
//! their softmax); an answer without scores must be refused with a reason, and answered
//! locally.

use std::process::Command;

use edge_e2e::daemon::{Mosquitto, TestClient};
use edge_e2e::mlserver::{MlServer, python};
use edge_e2e::{fixtures, run, stderr, stdout};
use serde_json::{Value, json};

use crate::conformance::{photos, script, tensor_file};
use crate::daemon::inception_bundle;
use crate::offload::{agent_of, ask};

/// (model name on MLServer, what its reply holds: see mlserver_inception.py)
const MODELS: [(&str, &str); 5] = [
    ("inception-scores-top5", "scores+top5"),
    ("inception-top5", "top5"),
    ("inception-scores", "scores"),
    ("inception-logits-top5", "logits+top5"),
    ("inception-classes", "classes"),
];

fn pairs(v: &Value) -> Vec<(String, f64)> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list of labels: {v}"))
        .iter()
        .map(|p| {
            let (label, score) = match p {
                Value::Array(a) => (&a[0], &a[1]),
                other => (&other["label"], &other["score"]),
            };
            (label.as_str().unwrap().to_owned(), score.as_f64().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlserver_pool_s_scores_reach_the_reply_with_their_own_labels_in_every_shape() {
    let f = fixtures();
    let settings: Vec<Value> = MODELS
        .iter()
        .map(|(name, answer)| {
            json!({
                "name": name,
                "implementation": "mlserver_inception.OnnxClassifier",
                "parameters": {
                    "uri": f.join("inception_v3_seeded_nhwc.onnx"),
                    "extra": {
                        "labels": f.join("inception_v3_seeded_labels.txt"),
                        "answer": answer,
                    },
                },
            })
        })
        .collect();
    let conformance = edge_e2e::workspace().join("tests/conformance");
    let server = tokio::task::block_in_place(|| MlServer::start(&conformance, &settings));

    // MLServer's own answers for the preprocessed coffee photo, asked directly.
    let bundle = inception_bundle();
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = tensor_file(&bundle, &photos()[0], dir.path());
    let out = tokio::task::block_in_place(|| {
        run(Command::new(python())
            .arg(script("mlserver_client.py"))
            .arg(server.http_port.to_string())
            .arg(&file)
            .arg(f.join("inception_v3_seeded_labels.txt"))
            .args(MODELS.iter().map(|(name, _)| name)))
    });
    assert!(
        out.status.success(),
        "mlserver_client.py failed:\n{}",
        stderr(&out)
    );
    let direct: Value = serde_json::from_str(stdout(&out).lines().last().unwrap_or("")).unwrap();

    // One agent per model, asking MLServer over gRPC with the tensor (every answer is below
    // min_confidence 1, so each request goes to the cluster); the logits model's agent says
    // `pool_scores = "logits"`, and its reply must hold their softmax, probabilities.
    let broker = Mosquitto::start();
    let endpoint = [format!("127.0.0.1:{}", server.grpc_port)];
    let agents: Vec<_> = MODELS
        .iter()
        .enumerate()
        .map(|(i, (name, answer))| {
            let pool_scores = if answer.starts_with("logits") {
                "logits"
            } else {
                "probabilities"
            };
            agent_of(
                &bundle,
                &format!("cam-ml{i}"),
                &broker,
                &endpoint,
                &[
                    ("EDGE_AGENT_OFFLOAD__PROTOCOL", "kserve"),
                    ("EDGE_AGENT_OFFLOAD__SEND", "tensor"),
                    ("EDGE_AGENT_OFFLOAD__MODEL_NAME", name),
                    ("EDGE_AGENT_OFFLOAD__MIN_CONFIDENCE", "1"),
                    ("EDGE_AGENT_OFFLOAD__MAX_LOCAL_WAIT_MS", "0"),
                    ("EDGE_AGENT_OFFLOAD__TIMEOUT_MS", "30000"),
                    ("EDGE_AGENT_OFFLOAD__POOL_SCORES", pool_scores),
                ],
            )
        })
        .collect();
    let topics: Vec<String> = (0..MODELS.len()).map(|i| format!("app/cam-ml{i}")).collect();
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let client = TestClient::connect(broker.port, "t-ml", &topics).await;

    for (i, (name, answer)) in MODELS.iter().enumerate() {
        let v = ask(&client, &format!("cam-ml{i}"), &format!("m{i}")).await;
        let outputs = &direct[name]["outputs"];
        if *answer == "classes" {
            assert_eq!(
                (v["source"].as_str(), v["reason"].as_str()),
                (Some("local"), Some("low_confidence_cluster_failed")),
                "{name}: {v}"
            );
            let log = agents[i].log();
            assert!(
                log.contains("unusable answer: the reply has no `scores` output (outputs: classes)"),
                "{name}: the agent should say why: {log}"
            );
            println!("{name} ({outputs}): answered locally, the agent logged: no `scores` output");
            continue;
        }
        assert_eq!(
            (v["source"].as_str(), v["reason"].as_str()),
            (Some("cluster"), Some("low_confidence")),
            "{name}: {v}"
        );
        assert_eq!(v["score_kind"], "probability", "{v}");
        let got = pairs(&v["top"]);
        let want = pairs(&direct[name]["pairs"]);
        println!("{name} ({outputs}):\n  agent reply {got:?}\n  MLServer    {want:?}");
        assert_eq!(got.len(), 5, "{name}: {v}");
        assert_eq!(got.len(), want.len(), "{name}");
        for ((gl, gs), (wl, ws)) in got.iter().zip(&want) {
            assert_eq!(gl, wl, "{name}: {got:?} vs MLServer {want:?}");
            assert!(
                (gs - ws).abs() < 1e-6,
                "{name}: {gl} scored {gs}, MLServer says {ws}"
            );
        }
        // The labels are the bundle's, mapped to its output indices.
        for t in v["top"].as_array().unwrap() {
            let index = t["index"].as_u64().unwrap();
            assert_eq!(t["label"], format!("seeded_class_{index:04}"), "{t}");
        }
    }
    drop(agents);
}
