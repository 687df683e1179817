//! Fuzz target: `converge::fuzzing::metadata_request` (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| converge::fuzzing::metadata_request(data));
