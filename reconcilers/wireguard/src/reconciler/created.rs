//! The record of the interfaces converge created (`<data-dir>/wireguard/interfaces`, one
//! name per line), so that one the document renamed is deleted and one converge did not
//! create is never touched.

use super::keys::{key_dir, make_key_dir};
use converge_core::fsutil::write_atomic;
use converge_core::DriverError;
use std::path::{Path, PathBuf};

/// Next to the keys, but not a `*.key` file, so writing it does not wake the key watch.
fn created_path(data_dir: &Path) -> PathBuf {
    key_dir(data_dir).join("interfaces")
}

/// The interfaces converge created, as recorded.
pub(super) fn created(data_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(created_path(data_dir))
        .map(|t| {
            t.lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Records that converge created (`add`) or deleted `iface`.
pub(super) fn record_created(data_dir: &Path, iface: &str, add: bool) -> Result<(), DriverError> {
    let mut names = created(data_dir);
    names.retain(|n| n != iface);
    if add {
        names.push(iface.to_string());
    }
    let text: String = names.iter().map(|n| format!("{n}\n")).collect();
    make_key_dir(&key_dir(data_dir))
        .and_then(|()| write_atomic(&created_path(data_dir), text.as_bytes(), 0o600))
        .map_err(|e| DriverError::io("record the interfaces converge created", e))
}
