//! `edge-agent serve` end to end: the real binary on loopback, called through the clients
//! generated from the vendored TF Serving and KServe protos, with the real pretrained
//! EfficientNet-Lite0 so the answers are known (espresso, tripod).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use edge_e2e::shared_models;
use edge_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use edge_proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelMetadataRequest, ModelReadyRequest,
    ServerLiveRequest, ServerReadyRequest, infer_parameter, model_infer_request,
};
use edge_proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use edge_proto::tensorflow::serving::{GetModelMetadataRequest, PredictRequest, SignatureDefMap, model_spec};
use edge_proto::tensorflow::{DataType, TensorProto};
use edge_proto::tonic_health::pb::HealthCheckRequest;
use edge_proto::tonic_health::pb::health_check_response::ServingStatus;
use edge_proto::tonic_health::pb::health_client::HealthClient;
use edge_runtime::bundle::read_manifest;
use edge_runtime::preprocess::{ImageLimits, Preprocessor};
use prost::Message;

use crate::classify_photos::efficientnet_bundle;
pub use edge_e2e::pool::Server;
use edge_e2e::pool::{images_request, shape, spec};

pub fn photo(name: &str) -> Vec<u8> {
    std::fs::read(shared_models().join(name)).unwrap()
}

/// The input tensor our own preprocessing makes of a photo (what an agent sends with
/// `send = "tensor"`).
fn preprocessed(name: &str) -> (Vec<usize>, Vec<f32>) {
    let manifest = read_manifest(&efficientnet_bundle()).unwrap();
    let pre = Preprocessor::new(
        manifest.preprocessing.clone(),
        manifest.input.clone(),
        ImageLimits::default(),
    )
    .unwrap();
    let t = pre.tensor_from_bytes(&photo(name)).unwrap();
    let values = t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
    (manifest.input.shape.clone(), values)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tf_serving_predict_answers_like_the_inception_example_and_checks_the_model_spec() {
    let server = Server::start(&[]);
    let mut tf = PredictionServiceClient::new(server.channel().await);

    // Images signature: two photos in one request.
    let r = tf
        .predict(images_request(vec![photo("coffee.jpg"), photo("camera.jpg")]))
        .await
        .expect("Predict")
        .into_inner();
    let classes = &r.outputs["classes"];
    let scores = &r.outputs["scores"];
    let dims: Vec<i64> = classes
        .tensor_shape
        .as_ref()
        .unwrap()
        .dim
        .iter()
        .map(|d| d.size)
        .collect();
    assert_eq!(dims, [2, 5]);
    assert_eq!(classes.string_val[0], b"espresso");
    assert_eq!(classes.string_val[5], b"tripod");
    assert!(
        (scores.float_val[0] - 0.9547).abs() < 1e-3,
        "{}",
        scores.float_val[0]
    );
    // camera.jpg (512x512, crop 448 to 224) is decoded at full size (a half-size DCT decode
    // would land on 224 and skip the resize filter); ../shared/models' reference: 0.938.
    assert!(
        (scores.float_val[5] - 0.9408).abs() < 1e-3,
        "{}",
        scores.float_val[5]
    );
    assert_eq!(r.model_spec.as_ref().unwrap().signature_name, "predict_images");

    // Tensor signature, tensor_content, default signature name resolved by dtype.
    let (in_shape, values) = preprocessed("coffee.jpg");
    let dims: Vec<i64> = in_shape.iter().map(|&d| d as i64).collect();
    let req = PredictRequest {
        model_spec: spec("inception", ""),
        inputs: HashMap::from([(
            "input".to_owned(),
            TensorProto {
                dtype: DataType::DtFloat as i32,
                tensor_shape: shape(&dims),
                tensor_content: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ..TensorProto::default()
            },
        )]),
        ..PredictRequest::default()
    };
    let r = tf
        .predict(req.clone())
        .await
        .expect("Predict tensor")
        .into_inner();
    assert_eq!(
        r.outputs.keys().collect::<Vec<_>>(),
        ["scores"],
        "every class's score"
    );
    let p = &r.outputs["scores"];
    assert_eq!(p.tensor_shape, shape(&[1, 1000]));
    let best = p
        .float_val
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap();
    assert!((best.1 - 0.9547).abs() < 1e-3, "tensor path top-1 {best:?}");
    // `classes` asked for by name: the labelled top-k, scores pairwise.
    let mut top = req;
    top.output_filter = vec!["classes".into(), "scores".into()];
    let r = tf.predict(top).await.expect("Predict tensor top-k").into_inner();
    assert_eq!(r.outputs["classes"].tensor_shape, shape(&[1, 5]));
    assert_eq!(r.outputs["scores"].tensor_shape, shape(&[1, 5]));
    assert_eq!(r.outputs["classes"].string_val[0], b"espresso");
    assert!((r.outputs["scores"].float_val[0] - best.1).abs() < 1e-6);

    // Errors, with TF Serving's codes.
    let mut wrong = images_request(vec![photo("coffee.jpg")]);
    wrong.model_spec = spec("resnet", "");
    assert_eq!(tf.predict(wrong).await.unwrap_err().code(), tonic::Code::NotFound);
    let mut wrong = images_request(vec![photo("coffee.jpg")]);
    wrong.model_spec.as_mut().unwrap().version_choice = Some(model_spec::VersionChoice::Version(99));
    assert_eq!(tf.predict(wrong).await.unwrap_err().code(), tonic::Code::NotFound);
    let mut wrong = images_request(vec![photo("coffee.jpg")]);
    wrong.model_spec = spec("inception", "nope");
    assert_eq!(
        tf.predict(wrong).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let mut wrong = images_request(vec![photo("coffee.jpg")]);
    wrong.model_spec = None;
    assert_eq!(
        tf.predict(wrong).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let garbage = tf
        .predict(images_request(vec![b"not an image".to_vec()]))
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), tonic::Code::InvalidArgument, "{garbage:?}");
    let mut version = images_request(vec![photo("coffee.jpg")]);
    version.model_spec.as_mut().unwrap().version_choice = Some(model_spec::VersionChoice::Version(1));
    assert!(
        tf.predict(version).await.is_ok(),
        "the bundle's version 1 is served"
    );

    // GetModelMetadata: the signature defs, as TF Serving packs them.
    let meta = tf
        .get_model_metadata(GetModelMetadataRequest {
            model_spec: spec("inception", ""),
            metadata_field: vec!["signature_def".into()],
        })
        .await
        .expect("GetModelMetadata")
        .into_inner();
    let any = &meta.metadata["signature_def"];
    assert_eq!(
        any.type_url,
        "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    );
    let defs = SignatureDefMap::decode(any.value.as_slice()).unwrap();
    assert!(defs.signature_def["predict_images"].inputs.contains_key("images"));
    let tensor_outputs = &defs.signature_def["predict_tensor"].outputs;
    assert!(
        tensor_outputs.contains_key("scores") && tensor_outputs.contains_key("classes"),
        "{tensor_outputs:?}"
    );

    // Metrics count the calls.
    let (_, metrics) = edge_e2e::daemon::http_get(server.http_port, "/metrics").unwrap();
    assert!(metrics.contains("edge_pool_requests_total"), "{metrics}");
    assert!(metrics.contains("edge_pool_images_total 5"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_v2_infers_bytes_and_fp32_with_typed_and_raw_contents() {
    let server = Server::start(&[]);
    let mut ks = GrpcInferenceServiceClient::new(server.channel().await);
    assert!(
        ks.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        ks.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = |name: &str| ModelReadyRequest {
        name: name.into(),
        version: String::new(),
    };
    assert!(
        ks.model_ready(ready("inception"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(!ks.model_ready(ready("other")).await.unwrap().into_inner().ready);
    let meta = ks
        .model_metadata(ModelMetadataRequest {
            name: "inception".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.versions, ["1"]);
    assert!(meta.inputs.iter().any(|i| i.datatype == "BYTES"));

    let bytes_input = |contents: Option<InferTensorContents>| model_infer_request::InferInputTensor {
        name: "images".into(),
        datatype: "BYTES".into(),
        shape: vec![2],
        parameters: HashMap::new(),
        contents,
    };
    let images = vec![photo("coffee.jpg"), photo("camera.jpg")];
    let top3 = HashMap::from([(
        "top_k".to_owned(),
        InferParameter {
            parameter_choice: Some(infer_parameter::ParameterChoice::Int64Param(3)),
        },
    )]);
    // Typed contents.
    let r = ks
        .model_infer(ModelInferRequest {
            model_name: "inception".into(),
            id: "typed".into(),
            parameters: top3.clone(),
            inputs: vec![bytes_input(Some(InferTensorContents {
                bytes_contents: images.clone(),
                ..Default::default()
            }))],
            ..Default::default()
        })
        .await
        .expect("ModelInfer typed")
        .into_inner();
    assert_eq!(r.id, "typed");
    let classes = r.outputs.iter().find(|o| o.name == "classes").unwrap();
    assert_eq!(classes.shape, [2, 3]);
    let labels = &classes.contents.as_ref().unwrap().bytes_contents;
    assert_eq!(
        (labels[0].as_slice(), labels[3].as_slice()),
        (&b"espresso"[..], &b"tripod"[..])
    );
    // Raw contents: length-prefixed BYTES in, raw outputs back.
    let mut raw = Vec::new();
    for i in &images {
        raw.extend_from_slice(&(i.len() as u32).to_le_bytes());
        raw.extend_from_slice(i);
    }
    let r = ks
        .model_infer(ModelInferRequest {
            model_name: "inception".into(),
            inputs: vec![bytes_input(None)],
            raw_input_contents: vec![raw],
            ..Default::default()
        })
        .await
        .expect("ModelInfer raw")
        .into_inner();
    let i_scores = r.outputs.iter().position(|o| o.name == "scores").unwrap();
    let first = f32::from_le_bytes(r.raw_output_contents[i_scores][..4].try_into().unwrap());
    assert!((first - 0.9547).abs() < 1e-3, "{first}");

    // FP32 tensor, raw: every class's `scores`, or with top_k the labelled top-k.
    let (in_shape, values) = preprocessed("camera.jpg");
    let tensor_request = ModelInferRequest {
        model_name: "inception".into(),
        inputs: vec![model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: in_shape.iter().map(|&d| d as i64).collect(),
            parameters: HashMap::new(),
            contents: None,
        }],
        raw_input_contents: vec![values.iter().flat_map(|v| v.to_le_bytes()).collect()],
        ..Default::default()
    };
    let r = ks
        .model_infer(tensor_request.clone())
        .await
        .expect("ModelInfer FP32")
        .into_inner();
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(
        (r.outputs[0].name.as_str(), r.outputs[0].shape.as_slice()),
        ("scores", &[1, 1000][..])
    );
    let probs: Vec<f32> = r.raw_output_contents[0]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(probs.len(), 1000);
    let best = probs.iter().copied().fold(0.0f32, f32::max);
    assert!((best - 0.9408).abs() < 1e-3, "{best}");
    let r = ks
        .model_infer(ModelInferRequest {
            parameters: top3,
            ..tensor_request
        })
        .await
        .expect("ModelInfer FP32 top_k")
        .into_inner();
    let names: Vec<(&str, &[i64])> = r
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.shape.as_slice()))
        .collect();
    assert_eq!(names, [("classes", &[1, 3][..]), ("scores", &[1, 3][..])]);
    let labels = edge_agent::wire::split_raw_bytes(&r.raw_output_contents[0]).unwrap();
    assert_eq!(labels[0], b"tripod");
    let top1 = f32::from_le_bytes(r.raw_output_contents[1][..4].try_into().unwrap());
    assert!((top1 - best).abs() < 1e-6, "{top1} vs {best}");

    // Wrong model, wrong datatype, bad raw framing.
    let wrong = ks
        .model_infer(ModelInferRequest {
            model_name: "x".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(wrong.unwrap_err().code(), tonic::Code::NotFound);
    let bad = ks
        .model_infer(ModelInferRequest {
            model_name: "inception".into(),
            inputs: vec![bytes_input(None)],
            raw_input_contents: vec![vec![9, 9, 9]],
            ..Default::default()
        })
        .await;
    assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_concurrency_limit_requests_get_resource_exhausted() {
    let server = Server::start(&["--max-concurrent-requests", "1", "--workers", "1"]);
    let channel = server.channel().await;
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut tf = PredictionServiceClient::new(channel.clone());
        calls.push(tokio::spawn(async move {
            tf.predict(images_request(vec![photo("coffee.jpg"); 4]))
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }));
    }
    let mut codes = Vec::new();
    for c in calls {
        codes.push(c.await.unwrap());
    }
    assert!(codes.iter().any(|c| c.is_ok()), "{codes:?}");
    assert!(codes.contains(&Err(tonic::Code::ResourceExhausted)), "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| c.is_ok() || *c == Err(tonic::Code::ResourceExhausted)),
        "{codes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_health_not_serving_keeps_answering_then_exits_cleanly() {
    let mut server = Server::start(&[]);
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let mut tf = PredictionServiceClient::new(channel);
    let mut child = server.terminate();
    let end = Instant::now() + Duration::from_secs(2);
    let mut status = ServingStatus::Serving as i32;
    while Instant::now() < end && status == ServingStatus::Serving as i32 {
        status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
    }
    assert_eq!(
        status,
        ServingStatus::NotServing as i32,
        "health is NOT_SERVING while draining"
    );
    let (code, _) = edge_e2e::daemon::http_get(server.http_port, "/readyz").unwrap();
    assert_eq!(code, 503);
    // Requests are still served during the drain delay.
    tf.predict(images_request(vec![photo("coffee.jpg")]))
        .await
        .expect("served while draining");
    let end = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "serve did not exit after draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_batching_groups_concurrent_requests_and_answers_each_correctly() {
    let server = Server::start(&[
        "--max-batch-size",
        "4",
        "--max-queue-delay-ms",
        "50",
        "--workers",
        "1",
    ]);
    let channel = server.channel().await;
    let mut calls = Vec::new();
    for i in 0..8 {
        let mut tf = PredictionServiceClient::new(channel.clone());
        let name = if i % 2 == 0 { "coffee.jpg" } else { "camera.jpg" };
        calls.push(tokio::spawn(async move {
            let r = tf
                .predict(images_request(vec![photo(name)]))
                .await
                .expect("Predict")
                .into_inner();
            (name, r.outputs["classes"].string_val[0].clone())
        }));
    }
    for c in calls {
        let (name, top) = c.await.unwrap();
        let want: &[u8] = if name == "coffee.jpg" {
            b"espresso"
        } else {
            b"tripod"
        };
        assert_eq!(top, want, "{name}");
    }
    let (_, metrics) = edge_e2e::daemon::http_get(server.http_port, "/metrics").unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    let (items, turns) = (
        value("edge_pool_batch_size_sum"),
        value("edge_pool_batch_size_count"),
    );
    println!("batching: {items} items in {turns} turns");
    assert_eq!(items, 8.0);
    assert!(turns < 8.0, "no request was grouped: {turns} turns");
}

/// `--tuning auto` (the default outside tests): the pool measures its runtime settings at
/// load like the device agent, caches the choice in --tuning-cache, and answers the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_tunes_its_runtime_settings_caches_them_and_answers_the_same() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let server = Server::start(&[
        "--tuning",
        "auto",
        "--tuning-cache",
        dir,
        "--tuning-budget-secs",
        "20",
    ]);
    let mut tf = PredictionServiceClient::new(server.channel().await);
    let r = tf
        .predict(images_request(vec![photo("coffee.jpg")]))
        .await
        .expect("Predict")
        .into_inner();
    assert_eq!(r.outputs["classes"].string_val[0], b"espresso");
    let score = r.outputs["scores"].float_val[0];
    assert!((score - 0.9547).abs() < 1e-3, "{score}");
    // The choice is cached, keyed by the bundle and this CPU, for the next start.
    let cached =
        std::fs::read_to_string(cache.path().join("edge-tuning.json")).expect("tuning cache written");
    let cached: serde_json::Value = serde_json::from_str(&cached).unwrap();
    let entries = cached["entries"].as_array().expect("cache entries");
    assert_eq!(entries.len(), 1, "{cached}");
    let entry = &entries[0];
    assert_eq!(
        entry["bundle_sha256"].as_str().map(str::len),
        Some(64),
        "{cached}"
    );
    assert!(
        entry["settings"].is_object() && entry["measured"].is_object(),
        "{cached}"
    );
}
