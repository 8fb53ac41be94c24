//! `tensorflow.serving.PredictionService` on the shared engine.
//!
//! Signatures (`model_spec.signature_name`):
//! - `predict_images` (also `serving_default` and the empty name when the input is a string
//!   tensor): the TF Serving Inception example. Input `images`, DT_STRING `[N]` of encoded
//!   JPEG/PNG; outputs `classes` (DT_STRING `[N, k]`, label names) and `scores`
//!   (DT_FLOAT `[N, k]`), best first; `k` = the server's `--top-k` (5, as in the example).
//! - `predict_tensor` (also `serving_default` and the empty name when the input is a float
//!   tensor): input DT_FLOAT `[N, ...]` with the bundle's input shape after the batch (the
//!   input key is free: a request has exactly one input); output `scores` (DT_FLOAT
//!   `[N, classes]`, every output class), or, when the output filter names `classes`,
//!   `classes` and `scores` `[N, k]` as for images (see [`super::outputs`]).
//!
//! Errors use TF Serving's status codes: a missing model spec, a bad signature, input or
//! output filter is `INVALID_ARGUMENT`, an unknown model or version `NOT_FOUND`, the
//! concurrency limit `RESOURCE_EXHAUSTED`, draining `UNAVAILABLE`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use tonic::{Request, Response, Status};

use edge_proto::tensorflow::serving::prediction_service_server::PredictionService;
use edge_proto::tensorflow::serving::{
    ClassificationRequest, ClassificationResponse, GetModelMetadataRequest, GetModelMetadataResponse,
    ModelSpec, MultiInferenceRequest, MultiInferenceResponse, PredictRequest, PredictResponse,
    RegressionRequest, RegressionResponse, SignatureDefMap, model_spec::VersionChoice,
};
use edge_proto::tensorflow::{DataType, SignatureDef, TensorInfo, TensorShapeProto, tensor_info};

use super::Pool;
use super::engine::Item;
use super::outputs::{Asked, Outputs};
use crate::wire;

pub const SIG_IMAGES: &str = "predict_images";
pub const SIG_TENSOR: &str = "predict_tensor";
pub const SIG_DEFAULT: &str = "serving_default";

pub struct TfServing {
    pub pool: Arc<Pool>,
}

impl TfServing {
    /// Checks the model spec; returns the signature to use (resolved later by input dtype
    /// for the default names).
    fn check_spec(&self, spec: Option<&ModelSpec>) -> Result<String, Status> {
        let spec = spec.ok_or_else(|| Status::invalid_argument("Missing ModelSpec"))?;
        let p = &self.pool;
        if spec.name != p.model_name {
            return Err(Status::not_found(format!(
                "Servable not found for request: Latest({}); this server serves {}",
                spec.name, p.model_name
            )));
        }
        match &spec.version_choice {
            None => {}
            Some(VersionChoice::Version(v)) if Some(*v) == p.model_version_number() => {}
            Some(VersionChoice::VersionLabel(l)) if l == "stable" || *l == p.model_version() => {}
            Some(other) => {
                return Err(Status::not_found(format!(
                    "Servable not found for request: {other:?} of {}; this server has version {}",
                    spec.name,
                    p.model_version()
                )));
            }
        }
        Ok(spec.signature_name.clone())
    }

    /// The spec of a response; `version` is that of the model that answered.
    fn response_spec(&self, signature: &str, version: &str) -> ModelSpec {
        ModelSpec {
            name: self.pool.model_name.clone(),
            signature_name: signature.to_owned(),
            version_choice: version.parse().ok().map(VersionChoice::Version),
        }
    }

    async fn predict_inner(&self, req: PredictRequest) -> Result<PredictResponse, Status> {
        let signature = self.check_spec(req.model_spec.as_ref())?;
        if req.inputs.len() != 1 {
            return Err(Status::invalid_argument(format!(
                "expected exactly one input tensor, got {} ({})",
                req.inputs.len(),
                req.inputs.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let Some((key, tensor)) = req.inputs.into_iter().next() else {
            return Err(Status::invalid_argument("no input tensor"));
        };
        let is_string = tensor.dtype == DataType::DtString as i32;
        let is_float = tensor.dtype == DataType::DtFloat as i32;
        let signature = match signature.as_str() {
            "" | SIG_DEFAULT if is_string => SIG_IMAGES,
            "" | SIG_DEFAULT if is_float => SIG_TENSOR,
            SIG_IMAGES => SIG_IMAGES,
            SIG_TENSOR => SIG_TENSOR,
            "" | SIG_DEFAULT => {
                return Err(Status::invalid_argument(format!(
                    "input `{key}` must be DT_STRING (encoded images) or DT_FLOAT (input tensor), got dtype {}",
                    tensor.dtype
                )));
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "Serving signature key \"{other}\" not found (signatures: {SIG_IMAGES}, {SIG_TENSOR}, {SIG_DEFAULT})"
                )));
            }
        };
        let outputs = ["classes", "scores"];
        for f in &req.output_filter {
            if !outputs.contains(&f.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "output tensor alias `{f}` not found in signature {signature} (outputs: {})",
                    outputs.join(", ")
                )));
            }
        }
        let wanted = |name: &str| req.output_filter.is_empty() || req.output_filter.iter().any(|f| f == name);
        let p = &self.pool;
        let (model, scored, asked) = if signature == SIG_IMAGES {
            if !is_string {
                return Err(Status::invalid_argument(format!(
                    "signature {SIG_IMAGES} takes `images` as DT_STRING, got dtype {}",
                    tensor.dtype
                )));
            }
            let images = tensor.string_val;
            p.check_batch(images.len())?;
            let (model, scored) = p.score(images.into_iter().map(Item::Encoded).collect()).await?;
            let k = p.answer_k(model.manifest());
            (model, scored, Asked::TopK(k))
        } else {
            if !is_float {
                return Err(Status::invalid_argument(format!(
                    "signature {SIG_TENSOR} takes a DT_FLOAT tensor, got dtype {}",
                    tensor.dtype
                )));
            }
            let values = wire::float_values(&tensor).map_err(Status::invalid_argument)?;
            let items = p
                .split_tensor(&wire::dims(&tensor), values)
                .map_err(Status::invalid_argument)?;
            let (model, scored) = p.score(items).await?;
            // `classes` asked for by name: the labelled top-k; else every class's score.
            let asked = if req.output_filter.iter().any(|f| f == "classes") {
                Asked::TopK(p.answer_k(model.manifest()))
            } else {
                Asked::Every
            };
            (model, scored, asked)
        };
        let version = model.manifest().model.version.clone();
        let answer = Outputs::new(&model, scored, asked);
        let mut out = HashMap::new();
        if let Some((shape, classes)) = answer.classes
            && wanted("classes")
        {
            out.insert("classes".to_owned(), wire::string_tensor(&shape, classes));
        }
        if wanted("scores") {
            let (shape, scores) = answer.scores;
            out.insert("scores".to_owned(), wire::float_tensor(&shape, scores, false));
        }
        Ok(PredictResponse {
            model_spec: Some(self.response_spec(signature, &version)),
            outputs: out,
        })
    }

    fn signature_defs(&self) -> SignatureDefMap {
        let p = &self.pool;
        let model = p.engine.classifier();
        let input = &model.manifest().input;
        let mut tensor_dims = vec![-1i64];
        tensor_dims.extend(input.shape.iter().skip(1).map(|&d| d as i64));
        let info = |name: &str, dtype: DataType, dims: &[i64]| TensorInfo {
            dtype: dtype as i32,
            tensor_shape: Some(TensorShapeProto::from_dims(dims)),
            encoding: Some(tensor_info::Encoding::Name(name.to_owned())),
        };
        let k = p.answer_k(model.manifest()) as i64;
        let images = SignatureDef {
            inputs: [("images".to_owned(), info("images", DataType::DtString, &[-1]))].into(),
            outputs: [
                (
                    "classes".to_owned(),
                    info("classes", DataType::DtString, &[-1, k]),
                ),
                ("scores".to_owned(), info("scores", DataType::DtFloat, &[-1, k])),
            ]
            .into(),
            method_name: "tensorflow/serving/predict".into(),
            ..SignatureDef::default()
        };
        // `scores` of every output class (a background class included: the shape of the
        // model's output), or of the top k when `classes` is asked for: [-1, -1].
        let tensor = SignatureDef {
            inputs: [(
                input.name.clone(),
                info(&input.name, DataType::DtFloat, &tensor_dims),
            )]
            .into(),
            outputs: [
                (
                    "classes".to_owned(),
                    info("classes", DataType::DtString, &[-1, k]),
                ),
                ("scores".to_owned(), info("scores", DataType::DtFloat, &[-1, -1])),
            ]
            .into(),
            method_name: "tensorflow/serving/predict".into(),
            ..SignatureDef::default()
        };
        SignatureDefMap {
            signature_def: [
                (SIG_IMAGES.to_owned(), images.clone()),
                (SIG_DEFAULT.to_owned(), images),
                (SIG_TENSOR.to_owned(), tensor),
            ]
            .into(),
        }
    }
}

#[tonic::async_trait]
impl PredictionService for TfServing {
    async fn predict(&self, request: Request<PredictRequest>) -> Result<Response<PredictResponse>, Status> {
        let start = Instant::now();
        let result = match self.pool.admit() {
            Ok(_admission) => self.predict_inner(request.into_inner()).await,
            Err(e) => Err(e),
        };
        self.pool.record("tfserving.Predict", &result, start);
        result.map(Response::new)
    }

    async fn get_model_metadata(
        &self,
        request: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        let req = request.into_inner();
        self.check_spec(req.model_spec.as_ref())?;
        for field in &req.metadata_field {
            if field != "signature_def" {
                return Err(Status::invalid_argument(format!(
                    "Metadata field {field} is not supported (only signature_def)"
                )));
            }
        }
        let any = prost_types::Any {
            type_url: "type.googleapis.com/tensorflow.serving.SignatureDefMap".into(),
            value: self.signature_defs().encode_to_vec(),
        };
        Ok(Response::new(GetModelMetadataResponse {
            model_spec: Some(self.response_spec("", &self.pool.model_version())),
            metadata: [("signature_def".to_owned(), any)].into(),
        }))
    }

    async fn classify(
        &self,
        _request: Request<ClassificationRequest>,
    ) -> Result<Response<ClassificationResponse>, Status> {
        Err(Status::unimplemented(
            "Classify is not served; use Predict with signature predict_images",
        ))
    }

    async fn regress(
        &self,
        _request: Request<RegressionRequest>,
    ) -> Result<Response<RegressionResponse>, Status> {
        Err(Status::unimplemented(
            "Regress is not served: this is an image classifier",
        ))
    }

    async fn multi_inference(
        &self,
        _request: Request<MultiInferenceRequest>,
    ) -> Result<Response<MultiInferenceResponse>, Status> {
        Err(Status::unimplemented("MultiInference is not served; use Predict"))
    }
}
