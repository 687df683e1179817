//! Fuzz target: `converge::fuzzing::envelope` (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| converge::fuzzing::envelope(data));
