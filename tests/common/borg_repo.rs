//! What borg tests share (the root's tests/backups.rs and the backups crate's
//! tests/borg.rs, which includes this file by path): deterministic incompressible data,
//! and whether a borg transaction is open in a local repository.

use std::path::Path;

/// Deterministic incompressible bytes (xorshift64*), so runs are comparable.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Whether a borg transaction is open in `repo`: its lock held, and data written to a
/// segment newer than the last commit (the number of the `index.N` file).
pub fn mid_transaction(repo: &Path) -> bool {
    let numbers = |dir: &Path, prefix: &str| -> Vec<u64> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok())
            .collect()
    };
    let committed = numbers(repo, "index.").into_iter().max();
    let newest = std::fs::read_dir(repo.join("data"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| numbers(&d.path(), ""))
        .max();
    repo.join("lock.exclusive").exists()
        && matches!((committed, newest), (Some(c), Some(n)) if n > c)
}
