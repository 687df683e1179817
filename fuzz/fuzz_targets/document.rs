//! Fuzz target: `converge::fuzzing::document` (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| converge::fuzzing::document(data));
