//! Replays the committed fuzz corpus and crash reproducers (`fuzz/corpus/<target>/`,
//! `fuzz/artifacts/<target>/`) through the same entry points the cargo-fuzz targets call
//! (`converge::fuzzing`), on stable: an input that once crashed a target stays fixed.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    for dir in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries.flatten() {
            let bytes = std::fs::read(entry.path()).expect("read a corpus file");
            run(&bytes);
            count += 1;
        }
    }
    assert!(count > 0, "no corpus for {target} under {}", root.display());
}

#[test]
fn document_corpus() {
    replay("document", converge::fuzzing::document);
}

#[test]
fn envelope_corpus() {
    replay("envelope", converge::fuzzing::envelope);
}

#[test]
fn socket_request_corpus() {
    replay("socket_request", converge::fuzzing::socket_request);
}

#[test]
fn metadata_request_corpus() {
    replay("metadata_request", converge::fuzzing::metadata_request);
}
