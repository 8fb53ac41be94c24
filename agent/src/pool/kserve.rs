//! KServe v2 / Open Inference Protocol: `inference.GRPCInferenceService` on the shared
//! engine.
//!
//! `ModelInfer` takes one input: `BYTES` `[N]` of encoded JPEG/PNG images (outputs `classes`,
//! BYTES `[N, k]`, and `scores`, FP32 `[N, k]`; `k` from the request parameter `top_k`, else
//! the server's `--top-k`), or `FP32` `[N, ...]` with the bundle's input shape after the batch
//! (output `scores`, FP32 `[N, classes]`, every output class; with a `top_k` parameter or
//! `classes` among the requested outputs, `classes` and `scores` `[N, k]` as for images: see
//! [`super::outputs`]). Inputs come as typed `contents` or as
//! `raw_input_contents` (BYTES elements each prefixed by their u32 little-endian length,
//! FP32 little-endian); replies use raw contents when the request did, typed otherwise.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use edge_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use edge_proto::inference::{
    InferTensorContents, ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest,
    ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse, infer_parameter, model_infer_response,
    model_metadata_response,
};

use super::Pool;
use super::engine::Item;
use super::outputs::{Asked, Outputs};
use crate::wire;

pub struct KServe {
    pub pool: Arc<Pool>,
}

impl KServe {
    fn check_model(&self, name: &str, version: &str) -> Result<(), Status> {
        let p = &self.pool;
        if name != p.model_name {
            return Err(Status::not_found(format!(
                "model `{name}` is not served here (this server serves `{}`)",
                p.model_name
            )));
        }
        let served = p.model_version();
        if !version.is_empty() && version != served {
            return Err(Status::not_found(format!(
                "version `{version}` of `{name}` is not served here (version {served})"
            )));
        }
        Ok(())
    }

    async fn infer_inner(&self, req: ModelInferRequest) -> Result<ModelInferResponse, Status> {
        self.check_model(&req.model_name, &req.model_version)?;
        let p = &self.pool;
        if req.inputs.len() != 1 {
            return Err(Status::invalid_argument(format!(
                "expected exactly one input, got {}",
                req.inputs.len()
            )));
        }
        let raw = !req.raw_input_contents.is_empty();
        if raw && req.raw_input_contents.len() != req.inputs.len() {
            return Err(Status::invalid_argument(
                "raw_input_contents must have one entry per input",
            ));
        }
        let input = &req.inputs[0];
        if raw && input.contents.is_some() {
            return Err(Status::invalid_argument(
                "an input cannot have both typed contents and raw_input_contents",
            ));
        }
        let top_k = match req
            .parameters
            .get("top_k")
            .and_then(|p| p.parameter_choice.as_ref())
        {
            None => None,
            Some(infer_parameter::ParameterChoice::Int64Param(k)) if *k >= 1 => Some(*k as usize),
            Some(other) => {
                return Err(Status::invalid_argument(format!(
                    "parameter top_k must be a positive int64, got {other:?}"
                )));
            }
        };
        let (model, scored, asked) = match input.datatype.as_str() {
            "BYTES" => {
                let images: Vec<Vec<u8>> = if raw {
                    wire::split_raw_bytes(&req.raw_input_contents[0]).map_err(Status::invalid_argument)?
                } else {
                    input
                        .contents
                        .as_ref()
                        .map(|c| c.bytes_contents.clone())
                        .unwrap_or_default()
                };
                if input.shape.len() != 1 || input.shape[0] != images.len() as i64 {
                    return Err(Status::invalid_argument(format!(
                        "BYTES input shape {:?} does not match its {} elements (expected [N])",
                        input.shape,
                        images.len()
                    )));
                }
                p.check_batch(images.len())?;
                let (model, scored) = p.score(images.into_iter().map(Item::Encoded).collect()).await?;
                (model, scored, Asked::TopK(top_k.unwrap_or(p.top_k)))
            }
            "FP32" => {
                let values: Vec<f32> = if raw {
                    wire::le_f32s(&req.raw_input_contents[0]).map_err(Status::invalid_argument)?
                } else {
                    input
                        .contents
                        .as_ref()
                        .map(|c| c.fp32_contents.clone())
                        .unwrap_or_default()
                };
                let items = p
                    .split_tensor(&input.shape, values)
                    .map_err(Status::invalid_argument)?;
                let (model, scored) = p.score(items).await?;
                // A top-k or `classes` asked for: the labelled top-k; else every class's score.
                let asked = match top_k {
                    Some(k) => Asked::TopK(k),
                    None if req.outputs.iter().any(|o| o.name == "classes") => Asked::TopK(p.top_k),
                    None => Asked::Every,
                };
                (model, scored, asked)
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "input datatype {other} is not supported (BYTES images or FP32 tensor)"
                )));
            }
        };
        let answer = Outputs::new(&model, scored, asked);
        let mut outputs = Vec::new();
        let mut raw_outputs = Vec::new();
        if let Some((shape, classes)) = answer.classes {
            let out = output("classes", "BYTES", shape);
            if raw {
                outputs.push(out);
                raw_outputs.push(wire::join_raw_bytes(&classes));
            } else {
                outputs.push(with_contents(
                    out,
                    InferTensorContents {
                        bytes_contents: classes,
                        ..Default::default()
                    },
                ));
            }
        }
        let (shape, scores) = answer.scores;
        let out = output("scores", "FP32", shape);
        if raw {
            outputs.push(out);
            raw_outputs.push(wire::f32s_le(&scores));
        } else {
            outputs.push(with_contents(
                out,
                InferTensorContents {
                    fp32_contents: scores,
                    ..Default::default()
                },
            ));
        }
        // Requested outputs filter the reply.
        let wanted: Vec<&str> = req.outputs.iter().map(|o| o.name.as_str()).collect();
        for w in &wanted {
            if !outputs.iter().any(|o| o.name == *w) {
                return Err(Status::invalid_argument(format!("unknown output `{w}`")));
            }
        }
        let keep = |name: &str| wanted.is_empty() || wanted.contains(&name);
        let mut kept = Vec::new();
        let mut kept_raw = Vec::new();
        for (i, o) in outputs.into_iter().enumerate() {
            if keep(&o.name) {
                if let Some(r) = raw_outputs.get(i) {
                    kept_raw.push(r.clone());
                }
                kept.push(o);
            }
        }
        Ok(ModelInferResponse {
            model_name: p.model_name.clone(),
            model_version: p.model_version(),
            id: req.id,
            parameters: Default::default(),
            outputs: kept,
            raw_output_contents: kept_raw,
        })
    }
}

fn output(name: &str, datatype: &str, shape: Vec<i64>) -> model_infer_response::InferOutputTensor {
    model_infer_response::InferOutputTensor {
        name: name.to_owned(),
        datatype: datatype.to_owned(),
        shape,
        parameters: Default::default(),
        contents: None,
    }
}

fn with_contents(
    mut o: model_infer_response::InferOutputTensor,
    contents: InferTensorContents,
) -> model_infer_response::InferOutputTensor {
    o.contents = Some(contents);
    o
}

#[tonic::async_trait]
impl GrpcInferenceService for KServe {
    async fn server_live(
        &self,
        _r: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _r: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: !self.pool.is_draining(),
        }))
    }

    async fn model_ready(
        &self,
        r: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = r.into_inner();
        let ready = self.check_model(&r.name, &r.version).is_ok() && !self.pool.is_draining();
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _r: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "edge-agent".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        r: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = r.into_inner();
        self.check_model(&r.name, &r.version)?;
        let p = &self.pool;
        let model = p.engine.classifier();
        let manifest = model.manifest();
        let mut tensor_shape = vec![-1i64];
        tensor_shape.extend(manifest.input.shape.iter().skip(1).map(|&d| d as i64));
        let meta = |name: &str, datatype: &str, shape: Vec<i64>| model_metadata_response::TensorMetadata {
            name: name.to_owned(),
            datatype: datatype.to_owned(),
            shape,
        };
        Ok(Response::new(ModelMetadataResponse {
            name: p.model_name.clone(),
            versions: vec![manifest.model.version.clone()],
            platform: "tract_nnef".into(),
            inputs: vec![
                meta("images", "BYTES", vec![-1]),
                meta(&manifest.input.name, "FP32", tensor_shape),
            ],
            outputs: vec![
                meta("classes", "BYTES", vec![-1, p.answer_k(manifest) as i64]),
                // k for a top-k, every output class for a tensor without one.
                meta("scores", "FP32", vec![-1, -1]),
            ],
        }))
    }

    async fn model_infer(
        &self,
        r: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let start = Instant::now();
        let result = match self.pool.admit() {
            Ok(_admission) => self.infer_inner(r.into_inner()).await,
            Err(e) => Err(e),
        };
        self.pool.record("kserve.ModelInfer", &result, start);
        result.map(Response::new)
    }
}
