//! The bodies of the fuzz targets, and the seeds they start from.
//!
//! Each target takes arbitrary bytes through the same code the agent runs on untrusted input
//! and checks what must hold of the result, not only that nothing panics. The cargo-fuzz
//! binaries in `fuzz_targets/` are one line each around these functions; the test suite
//! (`tests/e2e/fuzz_regressions.rs`) compiles this file too and replays the seeds and every
//! input in `fuzz/regressions/<target>/` through them, so a crash found once stays fixed.

use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use edge_agent::config::Config;
use edge_agent::mqtt::Message;
use edge_agent::queue::{Protocol, UnixMillis};
use edge_agent::request::{RequestPolicy, valid_reply_topic};
use edge_runtime::bundle::manifest::{
    ChannelOrder, InputSpec, Layout, Manifest, ModelInfo, OutputKind, OutputSpec, Preprocessing,
    ResizeFilter, ResizePolicy, SourceFormat, SourceInfo,
};
use edge_runtime::preprocess::{ImageLimits, Preprocessor};
use edge_runtime::runtime::{Classifier, RuntimeOptions};

/// The targets, by the name of their binary and of their regression folder.
pub const TARGETS: [&str; 4] = ["mqtt_request", "image", "bundle", "config"];

/// Runs target `name` on `data`: `Some(true)` if the input went all the way through (a
/// request queued, a tensor made, a bundle serving, a configuration loaded), `Some(false)` if
/// it was refused as it should be, `None` if there is no such target.
pub fn run(name: &str, data: &[u8]) -> Option<bool> {
    match name {
        "mqtt_request" => Some(mqtt_request(data)),
        "image" => Some(image(data)),
        "bundle" => Some(bundle(data)),
        "config" => Some(config(data)),
        _ => None,
    }
}

/// Largest image the request target accepts: small, so the fuzzer reaches the limit.
const MAX_IMAGE_BYTES: usize = 64 << 10;
/// Largest MQTT packet the request target decodes (the agent's `mqtt.max_packet_bytes`).
const MAX_PACKET_BYTES: usize = 1 << 20;
/// A fixed clock, so a run is reproducible.
const NOW: UnixMillis = UnixMillis(1_800_000_000_000);

/// Request decoding: the first byte picks the protocol (bit 0: 3.1.1) and a default
/// deadline (bit 1); the rest is one MQTT PUBLISH packet as it comes off the wire, decoded
/// by rumqttc as the agent's connection does, then turned into a request by the agent.
pub fn mqtt_request(data: &[u8]) -> bool {
    let Some((&selector, packet)) = data.split_first() else {
        return false;
    };
    let mut buf = BytesMut::from(packet);
    let message = if selector & 1 == 0 {
        use rumqttc::v5::mqttbytes::v5::Packet;
        match Packet::read(&mut buf, Some(MAX_PACKET_BYTES as u32)) {
            Ok(Packet::Publish(p)) => Message::from_v5(p),
            _ => return false,
        }
    } else {
        use rumqttc::mqttbytes::v4::Packet;
        match Packet::read(&mut buf, MAX_PACKET_BYTES) {
            Ok(Packet::Publish(p)) => Message::from_v311(p),
            _ => return false,
        }
    };
    let policy = RequestPolicy {
        device_id: "cam-fuzz".into(),
        default_reply_topic: "edge/cam-fuzz/result".into(),
        max_image_bytes: MAX_IMAGE_BYTES,
        max_top_k: 100,
        default_deadline: (selector & 2 != 0).then_some(Duration::from_secs(5)),
    };
    match policy.parse(&message.inbound(), NOW) {
        Ok(request) => {
            assert_eq!(request.protocol, message.protocol);
            assert!(
                valid_reply_topic(&request.reply_topic),
                "{:?}",
                request.reply_topic
            );
            assert!(!request.payload.is_empty() && request.payload.len() <= MAX_IMAGE_BYTES);
            assert!(request.top_k.is_none_or(|k| (1..=100).contains(&k)));
            assert!(!request.request_id.is_empty());
            assert!(request.deadline.is_none_or(|d| d >= NOW));
            if request.protocol == Protocol::V5 {
                assert_eq!(&request.payload[..], &message.payload[..]);
            }
            true
        }
        Err(rejected) => {
            assert!(
                valid_reply_topic(&rejected.reply.topic),
                "{:?}",
                rejected.reply.topic
            );
            let doc: serde_json::Value =
                serde_json::from_slice(&rejected.reply.payload).expect("an error reply is JSON");
            assert_eq!(doc["error"]["code"], rejected.code.as_str(), "{doc}");
            assert_eq!(doc["id"], rejected.reply.request_id.as_str());
            false
        }
    }
}

/// The preprocessing variant the image target runs, chosen by the first byte.
fn variant(selector: u8) -> (Preprocessing, InputSpec) {
    let mut spec = match selector % 3 {
        0 => Preprocessing::inception(),
        1 => Preprocessing::imagenet(),
        _ => Preprocessing::efficientnet_lite(),
    };
    spec.filter = match (selector / 3) % 5 {
        0 => spec.filter,
        1 => ResizeFilter::Nearest,
        2 => ResizeFilter::Lanczos3,
        3 => ResizeFilter::TfLegacyBilinear,
        _ => ResizeFilter::Bilinear,
    };
    if selector & 0x40 != 0 {
        spec.resize = ResizePolicy::CentralFraction { fraction: 0.875 };
        spec.channel_order = ChannelOrder::Bgr;
    }
    // Small input sizes keep an iteration fast; the code is the same at 299x299.
    let (layout, shape) = if selector & 0x80 == 0 {
        (Layout::Nhwc, vec![1, 33, 47, 3])
    } else {
        (Layout::Nchw, vec![1, 3, 40, 24])
    };
    let input = InputSpec {
        name: "input".into(),
        shape,
        layout,
        dtype: "f32".into(),
    };
    (spec, input)
}

/// Image decode and preprocessing: the first byte picks the preprocessing; the rest is the
/// encoded image. A tensor must have the input's shape and finite values within the
/// normalised range of 0..=255 pixels; a refusal must carry one of the reply error codes.
pub fn image(data: &[u8]) -> bool {
    let Some((&selector, bytes)) = data.split_first() else {
        return false;
    };
    let (spec, input) = variant(selector);
    // Tighter than the agent's defaults (50 MP) so a decoded bomb cannot slow the fuzzer;
    // the checks are the same code.
    let limits = ImageLimits {
        max_bytes: 1 << 20,
        max_pixels: 4 << 20,
        max_side: 8192,
    };
    let pre = Preprocessor::new(spec.clone(), input.clone(), limits)
        .expect("the fuzz input specs are images")
        .with_dct_scaling(selector & 0x20 == 0);
    match pre.tensor_from_bytes(bytes) {
        Ok(tensor) => {
            assert_eq!(tensor.shape(), &input.shape[..]);
            let values = tensor
                .try_as_plain_ram()
                .and_then(|v| v.as_slice::<f32>())
                .expect("an f32 tensor");
            // Bicubic and Lanczos overshoot 0..=255 a little at sharp edges: 10% margin.
            let bound = (0..3)
                .map(|c| (spec.mean[c].abs() + 255.0 * spec.scale) / spec.std[c].abs())
                .fold(0.0f32, f32::max)
                * 1.1;
            assert!(
                values.iter().all(|v| v.is_finite() && v.abs() <= bound),
                "values outside +-{bound}"
            );
            true
        }
        Err(e) => {
            assert!(
                matches!(e.code(), "too_large" | "unsupported_format" | "invalid_image"),
                "unexpected {}: {e}",
                e.code()
            );
            false
        }
    }
}

/// Bundle loading: the bytes are a bundle file (tar: manifest, NNEF graph, weights). What
/// loads must also optimise, plan and pass the agent's smoke inference, as a model reload
/// does before it serves.
pub fn bundle(data: &[u8]) -> bool {
    let Ok(bundle) = edge_runtime::bundle::from_bytes(Path::new("fuzz.bundle"), data) else {
        return false;
    };
    assert!(bundle.manifest.validate().is_ok());
    let options = RuntimeOptions {
        threads: std::num::NonZeroUsize::MIN,
        adaptive: false,
        ..RuntimeOptions::default()
    };
    let Ok(classifier) = Classifier::from_model(bundle.manifest, bundle.model, &options) else {
        return false;
    };
    // A model may compute NaN (the agent refuses it then); it must not panic.
    edge_agent::model::smoke_test(&classifier).is_ok()
}

/// Configuration parsing: the bytes are the TOML file. A configuration that loads prints
/// (`--print-config`) to TOML that loads back to the same configuration.
pub fn config(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(config) = Config::from_toml(text) else {
        return false;
    };
    let _ = config.queue_limits();
    let printed = toml::to_string(&config).expect("a loaded configuration prints");
    let again = Config::from_toml(&printed)
        .unwrap_or_else(|e| panic!("printed config does not load: {e}\n{printed}"));
    assert_eq!(again, config, "printed:\n{printed}");
    true
}

/// Seeds for each target: inputs that reach deep into its code (a real request packet,
/// real images, a real bundle, the documented example configuration). The regression test
/// checks that each seed succeeds, so the fuzzer starts from the paths that matter.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "mqtt_request" => mqtt_seeds(),
        "image" => image_seeds(),
        "bundle" => vec![tiny_bundle()],
        "config" => vec![
            include_bytes!("../../agent/examples/agent.toml").to_vec(),
            b"device_id = \"cam-1\"\n[mqtt]\nbroker = \"mqtts://broker:8883\"\ntls_ca = \"/etc/ca.pem\"\n\
              username = \"u\"\npassword = \"p\"\n[queue]\nmax_items = 10\n[offload]\nendpoints = [\"http://pool:8500\"]\n"
                .to_vec(),
        ],
        _ => Vec::new(),
    }
}

fn tiny_png(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 5) as u8, 128])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("PNG encodes");
    out.into_inner()
}

/// A JPEG of noise: every block carries many coefficients, so the scan is large.
fn noisy_jpeg(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        let n = (x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)) % 251;
        image::Rgb([n as u8, (n * 3 + x) as u8, (n * 7 + y) as u8])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&img)
        .expect("JPEG encodes");
    out
}

fn tiny_jpeg(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 3) as u8, 60])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
        .encode_image(&img)
        .expect("JPEG encodes");
    out
}

fn mqtt_seeds() -> Vec<Vec<u8>> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
    let image = tiny_jpeg(16, 12);
    let properties = PublishProperties {
        response_topic: Some("app/replies".into()),
        correlation_data: Some(b"corr-1".to_vec().into()),
        user_properties: vec![
            ("id".into(), "req-1".into()),
            ("top_k".into(), "3".into()),
            ("deadline_ms".into(), "2000".into()),
        ],
        content_type: Some("image/jpeg".into()),
        ..PublishProperties::default()
    };
    let mut v5 = Publish::new(
        "edge/cam-fuzz/classify",
        QoS::AtLeastOnce,
        image.clone(),
        Some(properties),
    );
    v5.pkid = 7;
    let mut packet = BytesMut::new();
    v5.write(&mut packet).expect("a PUBLISH encodes");
    let mut v5_seed = vec![0u8];
    v5_seed.extend_from_slice(&packet);

    use base64::Engine as _;
    let envelope = serde_json::json!({
        "id": "req-2",
        "image_b64": base64::engine::general_purpose::STANDARD.encode(&image),
        "reply_to": "app/replies",
        "top_k": 5,
        "deadline_ms": 1500,
    });
    let mut v4 = rumqttc::mqttbytes::v4::Publish::new(
        "edge/cam-fuzz/classify",
        rumqttc::mqttbytes::QoS::AtLeastOnce,
        serde_json::to_vec(&envelope).expect("JSON encodes"),
    );
    v4.pkid = 8;
    let mut packet = BytesMut::new();
    v4.write(&mut packet).expect("a PUBLISH encodes");
    let mut v4_seed = vec![1u8];
    v4_seed.extend_from_slice(&packet);
    vec![v5_seed, v4_seed]
}

fn image_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (selector, bytes) in [
        (0u8, tiny_png(20, 14)),
        (0x81, tiny_jpeg(64, 48)),
        (0x42, tiny_jpeg(130, 90)),
        (0x07, tiny_png(3, 50)),
        // Large enough a scan (> 64 KB) to be decoded on two threads.
        (0x00, noisy_jpeg(320, 240)),
    ] {
        let mut seed = vec![selector];
        seed.extend_from_slice(&bytes);
        seeds.push(seed);
    }
    seeds
}

/// A complete bundle around edge-convert's synthetic tiny model (1x8x8x3 in, 2 classes out).
pub fn tiny_bundle() -> Vec<u8> {
    let model = edge_runtime::bundle::synthetic_tiny_model().expect("the tiny model builds");
    let manifest = Manifest {
        format_version: edge_runtime::bundle::manifest::FORMAT_VERSION,
        model: ModelInfo {
            name: "synthetic-tiny".into(),
            version: "1".into(),
        },
        source: SourceInfo {
            format: SourceFormat::Onnx,
            file: "synthetic-tiny.onnx".into(),
            sha256: "0".repeat(64),
            signature: None,
        },
        tract_version: edge_runtime::bundle::TRACT_VERSION.into(),
        converter_version: "0.1.0".into(),
        input: InputSpec {
            name: "input".into(),
            shape: vec![1, 8, 8, 3],
            layout: Layout::Nhwc,
            dtype: "f32".into(),
        },
        preprocessing: Preprocessing::inception(),
        output: OutputSpec {
            name: "fc".into(),
            kind: OutputKind::Logits,
            classes: 2,
            label_offset: 0,
        },
        labels: vec!["synthetic_a".into(), "synthetic_b".into()],
        verification: None,
    };
    let tar = edge_runtime::bundle::nnef_tar(&model).expect("the tiny model serialises");
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("tiny.bundle");
    edge_runtime::bundle::write(&path, &manifest, &tar).expect("the tiny bundle writes");
    std::fs::read(&path).expect("the tiny bundle reads back")
}
