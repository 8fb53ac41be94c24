//! Protocol and file-format messages, generated at build time from the vendored `.proto` files
//! in `proto/` (see `proto/README.md` for where each file comes from).
//!
//! One Rust module per protobuf package, nested the way the package names are: messages of
//! package `tensorflow` are in [`tensorflow`]; a package `tensorflow.serving` would go in
//! `tensorflow::serving`. Well-known types (`google.protobuf.Any`, wrappers) are
//! [`prost_types`].

#![allow(clippy::all, missing_docs, rustdoc::all)]

pub use prost_types;

/// Encoded `google.protobuf.FileDescriptorSet` of every vendored file and its imports (for
/// reflection, and to check the vendored files against their upstream descriptors).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/file_descriptor_set.bin"));

/// TensorFlow core framework and SavedModel messages (package `tensorflow`): `GraphDef`,
/// `NodeDef`, `FunctionDef`, `TensorProto`, `SavedModel`, `MetaGraphDef`, `SavedObjectGraph`,
/// `TrackableObjectGraph`, `BundleHeaderProto`/`BundleEntryProto`, ...
pub mod tensorflow {
    include!(concat!(env!("OUT_DIR"), "/tensorflow.rs"));
}
