//! Protocol and file-format messages and gRPC services, generated at build time from the vendored
//! `.proto` files in `proto/` (see `proto/README.md` for where each file comes from and how it is
//! checked against upstream).
//!
//! One Rust module per protobuf package, nested the way the package names are: messages of
//! package `tensorflow` are in [`tensorflow`], those of `tensorflow.serving` in
//! [`tensorflow::serving`], those of `inference` (KServe v2) in [`inference`]. Well-known types
//! (`google.protobuf.Any`, wrappers) are [`prost_types`] (wrappers as plain Rust scalars).
//!
//! Each gRPC service `Foo` of a package gets, next to its messages, a tonic server
//! (`foo_server::Foo`, the trait to implement, and `foo_server::FooServer`, its
//! `tower::Service` to add to a [`tonic::transport::Server`]) and a tonic client
//! (`foo_client::FooClient`, with `connect` over [`tonic::transport::Channel`]):
//!
//! - TensorFlow Serving: [`tensorflow::serving::prediction_service_server::PredictionService`],
//!   [`tensorflow::serving::prediction_service_client::PredictionServiceClient`];
//! - KServe v2 / Open Inference Protocol:
//!   [`inference::grpc_inference_service_server::GrpcInferenceService`],
//!   [`inference::grpc_inference_service_client::GrpcInferenceServiceClient`];
//! - gRPC health checking (`grpc.health.v1`): the [`tonic_health`] crate, re-exported.
//!
//! [`tonic`] and [`prost`] are re-exported so users build servers and clients with the same
//! versions the generated code was compiled against.

#![allow(clippy::all, missing_docs, rustdoc::all)]

pub use prost;
pub use prost_types;
pub use tonic;
pub use tonic_health;

/// Encoded `google.protobuf.FileDescriptorSet` of every vendored file and its imports (for
/// reflection, and to check the vendored files against their upstream descriptors).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/file_descriptor_set.bin"));

/// TensorFlow core framework, SavedModel and `tf.train.Example` messages (package
/// `tensorflow`): `GraphDef`, `NodeDef`, `FunctionDef`, `TensorProto`, `SavedModel`,
/// `MetaGraphDef`, `SavedObjectGraph`, `TrackableObjectGraph`,
/// `BundleHeaderProto`/`BundleEntryProto`, `Example`/`Features`, ...
pub mod tensorflow {
    include!(concat!(env!("OUT_DIR"), "/tensorflow.rs"));

    impl TensorShapeProto {
        /// A known-rank shape with these dimension sizes (-1 for unknown).
        pub fn from_dims(dims: &[i64]) -> Self {
            Self {
                dim: dims
                    .iter()
                    .map(|&size| tensor_shape_proto::Dim {
                        size,
                        name: String::new(),
                    })
                    .collect(),
                unknown_rank: false,
            }
        }

        /// The dimension sizes.
        pub fn sizes(&self) -> Vec<i64> {
            self.dim.iter().map(|d| d.size).collect()
        }
    }

    /// TensorFlow Serving's gRPC API (package `tensorflow.serving`): service
    /// `PredictionService` (`Predict`, `Classify`, `Regress`, `MultiInference`,
    /// `GetModelMetadata`) with its server ([`serving::prediction_service_server`]) and client
    /// ([`serving::prediction_service_client`]), and its messages: `PredictRequest`,
    /// `PredictResponse`, `ModelSpec`, `GetModelMetadataRequest`, ...
    pub mod serving {
        include!(concat!(env!("OUT_DIR"), "/tensorflow.serving.rs"));
    }
}

/// KServe v2 / Open Inference Protocol gRPC API (package `inference`): service
/// `GRPCInferenceService` (`ServerLive`, `ServerReady`, `ModelReady`, `ServerMetadata`,
/// `ModelMetadata`, `ModelInfer`) with its server ([`inference::grpc_inference_service_server`])
/// and client ([`inference::grpc_inference_service_client`]), and its messages:
/// `ModelInferRequest`, `ModelInferResponse`, `InferParameter`, `InferTensorContents`, ...
pub mod inference {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::collections::HashMap;

    #[test]
    fn predict_request_with_string_images_round_trips() {
        use tensorflow::serving::{ModelSpec, PredictRequest, model_spec::VersionChoice};
        use tensorflow::{DataType, TensorProto, TensorShapeProto, tensor_shape_proto::Dim};

        let jpegs = vec![
            b"\xff\xd8\xff\xe0 first".to_vec(),
            b"\xff\xd8\xff\xe0 second".to_vec(),
        ];
        let images = TensorProto {
            dtype: DataType::DtString as i32,
            tensor_shape: Some(TensorShapeProto {
                dim: vec![Dim {
                    size: 2,
                    name: String::new(),
                }],
                unknown_rank: false,
            }),
            string_val: jpegs.clone(),
            ..Default::default()
        };
        let request = PredictRequest {
            model_spec: Some(ModelSpec {
                name: "inception".into(),
                signature_name: "serving_default".into(),
                version_choice: Some(VersionChoice::Version(3)),
            }),
            inputs: HashMap::from([("images".to_string(), images)]),
            output_filter: vec!["scores".into()],
            ..Default::default()
        };

        let bytes = request.encode_to_vec();
        let decoded = PredictRequest::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(decoded, request);
        let images = &decoded.inputs["images"];
        assert_eq!(images.dtype(), DataType::DtString);
        assert_eq!(images.string_val, jpegs);
        assert_eq!(images.tensor_shape.as_ref().map(|s| s.dim[0].size), Some(2));
        let spec = decoded.model_spec.expect("model_spec");
        assert_eq!(spec.version_choice, Some(VersionChoice::Version(3)));

        // Wire check against the official numbering: PredictRequest.inputs is field 2 (map
        // entry: key 1, value 2), TensorProto.dtype 1, string_val 8; ModelSpec.name 1.
        let spec_only = PredictRequest {
            model_spec: Some(ModelSpec {
                name: "m".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(spec_only.encode_to_vec(), [0x0a, 0x03, 0x0a, 0x01, b'm']);
        let one = TensorProto {
            dtype: DataType::DtString as i32,
            string_val: vec![b"x".to_vec()],
            ..Default::default()
        };
        assert_eq!(one.encode_to_vec(), [0x08, 0x07, 0x42, 0x01, b'x']);
    }

    #[test]
    fn model_infer_request_with_raw_contents_round_trips() {
        use inference::infer_parameter::ParameterChoice;
        use inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
        use inference::{InferParameter, ModelInferRequest, ModelInferResponse};

        let pixels: Vec<u8> = (0..2 * 3 * 4 * 4).map(|i| i as u8).collect();
        let mut raw = Vec::new();
        for v in [1.5f32, -2.0] {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        let request = ModelInferRequest {
            model_name: "inception".into(),
            model_version: "1".into(),
            id: "req-42".into(),
            parameters: HashMap::from([
                (
                    "priority".to_string(),
                    InferParameter {
                        parameter_choice: Some(ParameterChoice::Int64Param(2)),
                    },
                ),
                (
                    "binary".to_string(),
                    InferParameter {
                        parameter_choice: Some(ParameterChoice::BoolParam(true)),
                    },
                ),
            ]),
            inputs: vec![
                InferInputTensor {
                    name: "images".into(),
                    datatype: "UINT8".into(),
                    shape: vec![2, 3, 4, 4],
                    ..Default::default()
                },
                InferInputTensor {
                    name: "scale".into(),
                    datatype: "FP32".into(),
                    shape: vec![2],
                    ..Default::default()
                },
            ],
            outputs: vec![InferRequestedOutputTensor {
                name: "scores".into(),
                parameters: HashMap::new(),
            }],
            raw_input_contents: vec![pixels.clone(), raw.clone()],
        };

        let bytes = request.encode_to_vec();
        let decoded = ModelInferRequest::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(decoded, request);
        assert_eq!(decoded.raw_input_contents, [pixels, raw]);
        assert_eq!(
            decoded.parameters["priority"].parameter_choice,
            Some(ParameterChoice::Int64Param(2))
        );

        // Wire check against the spec's numbering: raw_input_contents is field 7,
        // ModelInferResponse.raw_output_contents field 6.
        let only_raw = ModelInferRequest {
            raw_input_contents: vec![vec![9]],
            ..Default::default()
        };
        assert_eq!(only_raw.encode_to_vec(), [0x3a, 0x01, 9]);
        let response = ModelInferResponse {
            raw_output_contents: vec![vec![9]],
            ..Default::default()
        };
        assert_eq!(response.encode_to_vec(), [0x32, 0x01, 9]);
        assert_eq!(
            ModelInferResponse::decode(&[0x32, 0x01, 9][..]).expect("decodes"),
            response
        );
    }

    /// `(client_streaming, server_streaming, input_type, output_type)` of each method of
    /// `service` (a fully qualified name) in [`FILE_DESCRIPTOR_SET`].
    fn methods(service: &str) -> HashMap<String, (bool, bool, String, String)> {
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("decodes");
        let mut found = None;
        for file in &fds.file {
            for s in &file.service {
                if format!("{}.{}", file.package(), s.name()) == service {
                    assert!(found.is_none(), "{service} declared twice");
                    found = Some(
                        s.method
                            .iter()
                            .map(|m| {
                                let streaming = (m.client_streaming(), m.server_streaming());
                                let types = (m.input_type().to_string(), m.output_type().to_string());
                                (m.name().to_string(), (streaming.0, streaming.1, types.0, types.1))
                            })
                            .collect(),
                    );
                }
            }
        }
        found.unwrap_or_else(|| panic!("service {service} not in FILE_DESCRIPTOR_SET"))
    }

    #[test]
    fn descriptor_set_has_the_services() {
        let tfs = methods("tensorflow.serving.PredictionService");
        let mut names: Vec<_> = tfs.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "Classify",
                "GetModelMetadata",
                "MultiInference",
                "Predict",
                "Regress"
            ]
        );
        assert_eq!(
            tfs["Predict"],
            (
                false,
                false,
                ".tensorflow.serving.PredictRequest".to_string(),
                ".tensorflow.serving.PredictResponse".to_string()
            )
        );
        assert_eq!(
            tfs["GetModelMetadata"].2,
            ".tensorflow.serving.GetModelMetadataRequest"
        );

        let kserve = methods("inference.GRPCInferenceService");
        let mut names: Vec<_> = kserve.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "ModelInfer",
                "ModelMetadata",
                "ModelReady",
                "ServerLive",
                "ServerMetadata",
                "ServerReady"
            ]
        );
        for (name, (client_streaming, server_streaming, input, output)) in &kserve {
            assert!(!client_streaming && !server_streaming, "{name} is unary");
            assert_eq!(input, &format!(".inference.{name}Request"));
            assert_eq!(output, &format!(".inference.{name}Response"));
        }

        // The generated servers route on the same names.
        use tonic::server::NamedService;
        assert_eq!(
            <tensorflow::serving::prediction_service_server::PredictionServiceServer<TestServer> as NamedService>::NAME,
            "tensorflow.serving.PredictionService"
        );
        assert_eq!(
            <inference::grpc_inference_service_server::GrpcInferenceServiceServer<TestServer> as NamedService>::NAME,
            "inference.GRPCInferenceService"
        );
    }

    /// Serves both services and grpc.health.v1 on a loopback port and calls them through the
    /// generated clients.
    #[tokio::test]
    async fn generated_servers_and_clients_talk_over_loopback() {
        use inference::grpc_inference_service_client::GrpcInferenceServiceClient;
        use inference::grpc_inference_service_server::GrpcInferenceServiceServer;
        use tensorflow::serving::prediction_service_client::PredictionServiceClient;
        use tensorflow::serving::prediction_service_server::PredictionServiceServer;
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<GrpcInferenceServiceServer<TestServer>>()
            .await;
        let incoming =
            tonic::transport::server::TcpIncoming::bind(([127, 0, 0, 1], 0).into()).expect("binds");
        let addr = incoming.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(PredictionServiceServer::new(TestServer))
                .add_service(GrpcInferenceServiceServer::new(TestServer))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connects");

        let mut tfs = PredictionServiceClient::new(channel.clone());
        let request = tensorflow::serving::PredictRequest {
            inputs: HashMap::from([(
                "images".to_string(),
                tensorflow::TensorProto {
                    dtype: tensorflow::DataType::DtString as i32,
                    string_val: vec![b"jpeg".to_vec()],
                    ..Default::default()
                },
            )]),
            ..Default::default()
        };
        let response = tfs.predict(request.clone()).await.expect("predict").into_inner();
        assert_eq!(response.outputs, request.inputs);
        let status = tfs
            .regress(tensorflow::serving::RegressionRequest::default())
            .await
            .expect_err("unimplemented");
        assert_eq!(status.code(), tonic::Code::Unimplemented);

        let mut kserve = GrpcInferenceServiceClient::new(channel.clone());
        let live = kserve
            .server_live(inference::ServerLiveRequest {})
            .await
            .expect("live")
            .into_inner();
        assert!(live.live);
        let request = inference::ModelInferRequest {
            model_name: "m".into(),
            raw_input_contents: vec![vec![1, 2, 3]],
            ..Default::default()
        };
        let response = kserve.model_infer(request).await.expect("infer").into_inner();
        assert_eq!(response.model_name, "m");
        assert_eq!(response.raw_output_contents, [vec![3, 2, 1]]);

        let mut health = HealthClient::new(channel);
        let check = HealthCheckRequest {
            service: "inference.GRPCInferenceService".into(),
        };
        let serving = health.check(check).await.expect("health").into_inner();
        assert_eq!(serving.status(), ServingStatus::Serving);

        let _ = stop.send(());
        server.await.expect("server task").expect("server");
    }

    /// Answers Predict (echo), ServerLive and ModelInfer (raw contents reversed); the rest is
    /// unimplemented.
    struct TestServer;

    #[tonic::async_trait]
    impl tensorflow::serving::prediction_service_server::PredictionService for TestServer {
        async fn classify(
            &self,
            _: tonic::Request<tensorflow::serving::ClassificationRequest>,
        ) -> Result<tonic::Response<tensorflow::serving::ClassificationResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn regress(
            &self,
            _: tonic::Request<tensorflow::serving::RegressionRequest>,
        ) -> Result<tonic::Response<tensorflow::serving::RegressionResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn predict(
            &self,
            request: tonic::Request<tensorflow::serving::PredictRequest>,
        ) -> Result<tonic::Response<tensorflow::serving::PredictResponse>, tonic::Status> {
            let request = request.into_inner();
            Ok(tonic::Response::new(tensorflow::serving::PredictResponse {
                model_spec: request.model_spec,
                outputs: request.inputs,
            }))
        }
        async fn multi_inference(
            &self,
            _: tonic::Request<tensorflow::serving::MultiInferenceRequest>,
        ) -> Result<tonic::Response<tensorflow::serving::MultiInferenceResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn get_model_metadata(
            &self,
            _: tonic::Request<tensorflow::serving::GetModelMetadataRequest>,
        ) -> Result<tonic::Response<tensorflow::serving::GetModelMetadataResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
    }

    #[tonic::async_trait]
    impl inference::grpc_inference_service_server::GrpcInferenceService for TestServer {
        async fn server_live(
            &self,
            _: tonic::Request<inference::ServerLiveRequest>,
        ) -> Result<tonic::Response<inference::ServerLiveResponse>, tonic::Status> {
            Ok(tonic::Response::new(inference::ServerLiveResponse { live: true }))
        }
        async fn server_ready(
            &self,
            _: tonic::Request<inference::ServerReadyRequest>,
        ) -> Result<tonic::Response<inference::ServerReadyResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn model_ready(
            &self,
            _: tonic::Request<inference::ModelReadyRequest>,
        ) -> Result<tonic::Response<inference::ModelReadyResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn server_metadata(
            &self,
            _: tonic::Request<inference::ServerMetadataRequest>,
        ) -> Result<tonic::Response<inference::ServerMetadataResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn model_metadata(
            &self,
            _: tonic::Request<inference::ModelMetadataRequest>,
        ) -> Result<tonic::Response<inference::ModelMetadataResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn model_infer(
            &self,
            request: tonic::Request<inference::ModelInferRequest>,
        ) -> Result<tonic::Response<inference::ModelInferResponse>, tonic::Status> {
            let request = request.into_inner();
            let raw_output_contents = request
                .raw_input_contents
                .into_iter()
                .map(|mut raw| {
                    raw.reverse();
                    raw
                })
                .collect();
            Ok(tonic::Response::new(inference::ModelInferResponse {
                model_name: request.model_name,
                id: request.id,
                raw_output_contents,
                ..Default::default()
            }))
        }
    }
}
