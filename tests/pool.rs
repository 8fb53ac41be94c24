//! `edge-agent serve` processes for the tests and benchmarks, and the TF Serving requests
//! they are called with.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edge_proto::tensorflow::serving::{ModelSpec, PredictRequest};
use edge_proto::tensorflow::{DataType, TensorProto, TensorShapeProto};
use edge_proto::tonic::transport::Channel;
use edge_proto::tonic_health::pb::HealthCheckRequest;
use edge_proto::tonic_health::pb::health_check_response::ServingStatus;
use edge_proto::tonic_health::pb::health_client::HealthClient;

use crate::daemon::free_port;
use crate::{bin, efficientnet_bundle};

/// A running `edge-agent serve` on loopback.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub http_port: u16,
}

impl Server {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra)
    }

    /// A pool serving EfficientNet-Lite0 as model `inception` on `port`.
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        Self::start_bundle(&efficientnet_bundle(), port, extra)
    }

    /// A pool serving `bundle` as model `inception` on `port`.
    pub fn start_bundle(bundle: &Path, port: u16, extra: &[&str]) -> Self {
        let http_port = free_port();
        let child = Command::new(bin("edge-agent"))
            .arg("serve")
            .arg("--bundle")
            .arg(bundle)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
            .args(["--model-name", "inception", "--drain-delay-secs", "2"])
            // Tests run tract's defaults unless they ask for tuning (it takes seconds per start).
            .args(if extra.contains(&"--tuning") {
                &[][..]
            } else {
                &["--tuning", "off"][..]
            })
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start edge-agent serve");
        Server {
            child: Some(child),
            port,
            http_port,
        }
    }

    pub async fn channel(&self) -> Channel {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(c) = Channel::from_shared(format!("http://127.0.0.1:{}", self.port))
                .unwrap()
                .connect()
                .await
            {
                let mut health = HealthClient::new(c.clone());
                if let Ok(r) = health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    && r.into_inner().status == ServingStatus::Serving as i32
                {
                    return c;
                }
            }
            assert!(Instant::now() < end, "edge-agent serve not SERVING after 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGHUP (reload the bundle file).
    pub fn sighup(&self) {
        crate::daemon::signal(self.child.as_ref().expect("running"), "-HUP");
    }

    pub fn terminate(&mut self) -> Child {
        let child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        child
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn shape(dims: &[i64]) -> Option<TensorShapeProto> {
    Some(TensorShapeProto::from_dims(dims))
}

pub fn spec(name: &str, signature: &str) -> Option<ModelSpec> {
    Some(ModelSpec {
        name: name.into(),
        signature_name: signature.into(),
        version_choice: None,
    })
}

/// A TF Serving Predict of JPEG/PNG bytes through the `predict_images` signature of model
/// `inception`.
pub fn images_request(images: Vec<Vec<u8>>) -> PredictRequest {
    let n = images.len() as i64;
    PredictRequest {
        model_spec: spec("inception", "predict_images"),
        inputs: HashMap::from([(
            "images".to_owned(),
            TensorProto {
                dtype: DataType::DtString as i32,
                tensor_shape: shape(&[n]),
                string_val: images,
                ..TensorProto::default()
            },
        )]),
        ..PredictRequest::default()
    }
}
