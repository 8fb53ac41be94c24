//! End-to-end tests: the real `edge-convert` and `edge-agent` binaries on real models
//! (TensorFlow-made Inception V3 fixtures with seeded weights, the pretrained EfficientNet-Lite0).

mod bad_inputs;
mod classify_photos;
mod conformance;
mod daemon;
mod defects;
mod faults;
mod fuzz_regressions;
mod ingress;
mod mlserver;
mod offload;
mod outbox;
mod pages;
mod pool;
mod powercut;
mod powercut_lazyfs;
mod profile;
mod reload;
mod sources;
