#![no_main]
//! See `edge_fuzz::mqtt_request` (fuzz/src/lib.rs) for what this target feeds and checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    edge_fuzz::mqtt_request(data);
});
