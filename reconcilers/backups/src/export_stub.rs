//! TEMPORARY stand-in for `export.rs` (the S3 streamed upload, written on the `export`
//! branch): the same signatures, no upload. Delete this file and switch the one `use`
//! in `export_glue.rs` to `crate::export` when that branch is merged.
// The stand-in reads none of the target's fields.
#![allow(dead_code)]

use chrono::{DateTime, Utc};
use std::path::Path;
use std::time::Duration;

/// Where an export goes. `Debug` never shows the secret key.
pub struct S3Target {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub key: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// A finished upload.
pub struct ExportOutcome {
    pub bytes: u64,
    pub parts: u32,
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

/// Progress of an upload.
pub struct ExportProgress {
    pub bytes: u64,
    pub parts: u32,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("S3 export is not available in this build (the export module is not merged yet)")]
    Unavailable,
}

/// Stand-in: kills the child and fails.
pub async fn export(
    mut child: tokio::process::Child,
    _target: &S3Target,
    _url_ttl: Duration,
    _journal_dir: &Path,
    _progress: impl Fn(ExportProgress) + Send + Sync,
) -> Result<ExportOutcome, ExportError> {
    let _ = child.kill().await;
    Err(ExportError::Unavailable)
}

/// Stand-in: nothing recorded, nothing aborted.
pub async fn abort_orphans(_journal_dir: &Path, _target: &S3Target) -> Result<usize, ExportError> {
    Ok(0)
}
