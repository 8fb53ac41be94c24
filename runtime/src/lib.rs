//! The edge bundle format and the inference runtime: what `edge-agent` (daemon, pool, one-shot
//! classify) loads and runs on the device, and what `edge-convert` writes and verifies with.
//! No model readers here (ONNX, TensorFlow): those stay in the converter crate, so a device
//! build carries only `tract-core`, `tract-nnef` and `tract-linalg`.

pub mod bundle;
pub mod preprocess;
pub mod runtime;

/// An error and its causes on one line, each cause once: typed errors here often repeat their
/// source's text in their own message, which a plain `{:#}` would print twice.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        next = e.source();
    }
    out
}
