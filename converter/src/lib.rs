//! The converter behind `edge-convert`: source-model readers (ONNX, TensorFlow frozen GraphDef
//! and SavedModel, `tf/`) and the conversion to a verified edge bundle (`convert/`). The bundle
//! format and the runtime it verifies with are the `edge-runtime` crate's.

pub mod convert;
pub mod tf;
