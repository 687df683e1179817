//! Fuzz target: `converge::fuzzing::socket_request` (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| converge::fuzzing::socket_request(data));
