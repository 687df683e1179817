//! Streamed S3 export: a child's stdout (`borg export-tar REPO::ARCHIVE -`) goes straight
//! into an S3 multipart upload, part by part, with bounded memory and no temporary file;
//! the upload is journaled so that one left behind by a killed run can be aborted later,
//! and the finished object is handed out as a presigned GET URL.
//!
//! Memory: at most [`CONCURRENCY`] parts in flight plus the one being filled, each
//! [`PART_SIZE`] bytes (8 MiB), whatever the archive size. Parts all have the same size
//! (except the last) because some S3 implementations (R2) require it, so an archive can
//! hold at most 10,000 × [`PART_SIZE`] bytes (78 GiB).

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use chrono::{DateTime, NaiveDateTime, Utc};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ClientOptions, MultipartId, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;
use tokio::task::JoinSet;

/// Size of every part but the last. S3 wants at least 5 MiB; 8 MiB keeps memory low while
/// leaving room for 78 GiB archives within S3's 10,000-part limit.
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts uploaded at the same time. Enough to keep a link busy while the next part is read.
pub const CONCURRENCY: usize = 3;
/// S3's limit on the number of parts of one upload.
pub const MAX_PARTS: usize = 10_000;
/// Longest lifetime of a presigned URL.
pub const MAX_URL_TTL: Duration = Duration::from_secs(24 * 3600);
/// How much of the child's stderr is kept for the error message.
const STDERR_TAIL: usize = 2048;

/// Where an export goes and the credentials to put it there.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Target {
    /// `http(s)://host[:port]`; requests use path-style addressing (`endpoint/bucket/key`).
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Object key, e.g. `exports/pg-2026-12-01.tar`.
    pub key: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl fmt::Debug for S3Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Target")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("key", &self.key)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &converge_core::redact(&self.secret_access_key),
            )
            .finish()
    }
}

/// A finished export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportOutcome {
    /// Bytes uploaded (the size of the object).
    pub bytes: u64,
    /// Parts the object was uploaded in.
    pub parts: u32,
    /// Presigned GET URL of the object.
    pub url: String,
    /// When `url` stops working.
    pub expires_at: DateTime<Utc>,
}

/// Progress of a running export, reported after each uploaded part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportProgress {
    /// Bytes of the parts uploaded so far.
    pub bytes: u64,
    /// Parts uploaded so far.
    pub parts: u32,
}

/// Why an export, an orphan cleanup or a presign failed. Messages name the bucket and key,
/// never credentials.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("invalid S3 target s3://{bucket}/{key}: {reason}")]
    InvalidTarget {
        bucket: String,
        key: String,
        reason: String,
    },
    #[error("URL lifetime of {secs} s is out of range (1 s to 24 h)")]
    InvalidTtl { secs: u64 },
    #[error("export to s3://{bucket}/{key}: the exporting process has no piped stdout")]
    NoStdout { bucket: String, key: String },
    #[error("export to s3://{bucket}/{key}: reading the archive stream failed: {source}")]
    Read {
        bucket: String,
        key: String,
        #[source]
        source: io::Error,
    },
    #[error("export to s3://{bucket}/{key}: the exporting process failed ({status}){stderr}")]
    ChildFailed {
        bucket: String,
        key: String,
        status: String,
        /// The end of its stderr (when piped), prefixed with ": ".
        stderr: String,
    },
    #[error("export to s3://{bucket}/{key}: the archive needs more than {max} parts of {part_size} bytes")]
    TooLarge {
        bucket: String,
        key: String,
        max: usize,
        part_size: usize,
    },
    #[error("s3://{bucket}/{key}: {operation} failed: {source}")]
    Store {
        bucket: String,
        key: String,
        operation: &'static str,
        // Boxed: object_store's error is large and would bloat every Result.
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("export to s3://{bucket}/{key}: an upload task failed: {reason}")]
    Task {
        bucket: String,
        key: String,
        reason: String,
    },
    #[error("export journal {}: {source}", path.display())]
    Journal {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("presigning s3://{bucket}/{key}: {reason}")]
    Presign {
        bucket: String,
        key: String,
        reason: String,
    },
}

/// Streams `child`'s stdout (e.g. `borg export-tar ARCHIVE -`, spawned by the caller with
/// stdout piped) into an S3 multipart upload; completes only if the child exits 0, aborts the
/// upload otherwise. `journal_dir` records the in-flight upload id before parts are sent.
///
/// If the child's stderr is piped too, it is drained and its end quoted in
/// [`ExportError::ChildFailed`]. On any failure the child is killed and the upload aborted;
/// if the future is dropped mid-way, the abort is spawned on the current runtime.
pub async fn export(
    mut child: Child,
    target: &S3Target,
    url_ttl: Duration,
    journal_dir: &Path,
    progress: impl Fn(ExportProgress) + Send + Sync,
) -> Result<ExportOutcome, ExportError> {
    let checked =
        check_ttl(url_ttl).and_then(|()| Ok((object_path(target)?, build_store(target)?)));
    let (path, store) = match checked {
        Ok((path, store)) => (path, Arc::new(store)),
        Err(e) => {
            kill(&mut child).await;
            return Err(e);
        }
    };
    let Some(stdout) = child.stdout.take() else {
        kill(&mut child).await;
        return Err(ExportError::NoStdout {
            bucket: target.bucket.clone(),
            key: target.key.clone(),
        });
    };
    let stderr_tail = child.stderr.take().map(|s| tokio::spawn(read_tail(s)));
    let started = Instant::now();

    let upload_id = match store.create_multipart(&path).await {
        Ok(id) => id,
        Err(e) => {
            kill(&mut child).await;
            return Err(store_error(target, "creating the multipart upload", e));
        }
    };
    // The upload id is on disk before the first part leaves, so a kill -9 from here on
    // leaves something abort_orphans can find.
    let journal = match Journal::record(journal_dir, target, &upload_id).await {
        Ok(j) => j,
        Err(e) => {
            kill(&mut child).await;
            if let Err(abort) = store.abort_multipart(&path, &upload_id).await {
                tracing::warn!(bucket = %target.bucket, key = %target.key, error = %abort,
                    "aborting the multipart upload failed");
            }
            return Err(e);
        }
    };
    tracing::info!(bucket = %target.bucket, key = %target.key, upload_id = %upload_id,
        "export started");
    let mut guard = AbortOnDrop {
        store: Arc::clone(&store),
        path: path.clone(),
        upload_id: upload_id.clone(),
        journal: Some(journal),
    };

    let streamed = stream_parts(&store, &path, &upload_id, target, stdout, &progress).await;
    let result = match streamed {
        Ok((parts, bytes)) => match child.wait().await {
            Ok(status) if status.success() => Ok((parts, bytes)),
            Ok(status) => Err(ExportError::ChildFailed {
                bucket: target.bucket.clone(),
                key: target.key.clone(),
                status: status.to_string(),
                stderr: tail_text(stderr_tail).await,
            }),
            Err(e) => Err(ExportError::Read {
                bucket: target.bucket.clone(),
                key: target.key.clone(),
                source: e,
            }),
        },
        Err(e) => {
            kill(&mut child).await;
            Err(e)
        }
    };

    let (parts, bytes) = match result {
        Ok(done) => done,
        Err(e) => {
            tracing::warn!(bucket = %target.bucket, key = %target.key, error = %e,
                "export failed, aborting the multipart upload");
            guard.abort(target).await;
            return Err(e);
        }
    };
    let part_count = u32::try_from(parts.len()).unwrap_or(u32::MAX);
    if let Err(e) = store
        .complete_multipart(&path, &upload_id, parts)
        .await
        .map_err(|e| store_error(target, "completing the multipart upload", e))
    {
        guard.abort(target).await;
        return Err(e);
    }
    guard.disarm().await;
    tracing::info!(bucket = %target.bucket, key = %target.key, bytes, parts = part_count,
        seconds = started.elapsed().as_secs_f64(), "export uploaded");

    let (url, expires_at) = presign_with(&store, target, &path, url_ttl)?;
    Ok(ExportOutcome {
        bytes,
        parts: part_count,
        url,
        expires_at,
    })
}

/// Aborts multipart uploads recorded in `journal_dir` by a run that was killed (kill -9).
///
/// Only entries for `target`'s endpoint and bucket are handled (the credentials are
/// `target`'s); entries of exports still running, in this process or another live one,
/// are left alone. Returns how many uploads were aborted; an entry whose upload is already
/// gone (completed or aborted before the journal was cleaned) is removed without counting.
pub async fn abort_orphans(journal_dir: &Path, target: &S3Target) -> Result<usize, ExportError> {
    let entries = match std::fs::read_dir(journal_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(ExportError::Journal {
                path: journal_dir.to_path_buf(),
                source,
            })
        }
    };
    let mut store: Option<AmazonS3> = None;
    let mut aborted = 0;
    let mut first_error = None;
    for entry in entries {
        let entry = entry.map_err(|source| ExportError::Journal {
            path: journal_dir.to_path_buf(),
            source,
        })?;
        let file = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = stale_tmp_pid(&name) {
            // A temporary journal file of a writer that died before its rename.
            if !process_alive(pid) {
                let _ = std::fs::remove_file(&file);
            }
            continue;
        }
        if !(name.starts_with("upload-") && name.ends_with(".json")) {
            continue;
        }
        let record: JournalRecord = match std::fs::read(&file)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "unreadable export journal entry");
                continue;
            }
        };
        if record.endpoint != target.endpoint || record.bucket != target.bucket {
            continue;
        }
        // This process's entries are orphans unless their export is still running (an abort
        // that failed leaves one behind); another process's only once that process is gone.
        let running = if record.pid == std::process::id() {
            in_flight(&name)
        } else {
            record.owner_alive()
        };
        if running {
            continue;
        }
        let Ok(path) = ObjectPath::parse(&record.key) else {
            tracing::warn!(file = %file.display(), "export journal entry with an invalid key");
            continue;
        };
        let store = match &store {
            Some(s) => s,
            None => store.insert(build_store(target)?),
        };
        let record_target = S3Target {
            key: record.key.clone(),
            ..target.clone()
        };
        match store.abort_multipart(&path, &record.upload_id).await {
            Ok(()) => {
                aborted += 1;
                tracing::info!(bucket = %record.bucket, key = %record.key,
                    upload_id = %record.upload_id, "aborted an orphaned multipart upload");
            }
            Err(object_store::Error::NotFound { .. }) => {
                tracing::info!(bucket = %record.bucket, key = %record.key,
                    upload_id = %record.upload_id, "orphaned multipart upload already gone");
            }
            Err(e) => {
                first_error.get_or_insert(store_error(
                    &record_target,
                    "aborting an orphaned multipart upload",
                    e,
                ));
                continue;
            }
        }
        if let Err(source) = std::fs::remove_file(&file) {
            first_error.get_or_insert(ExportError::Journal { path: file, source });
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(aborted),
    }
}

/// A presigned GET URL for an existing object (ttl at most 24 h).
pub fn presign_get(
    target: &S3Target,
    ttl: Duration,
) -> Result<(String, DateTime<Utc>), ExportError> {
    check_ttl(ttl)?;
    let path = object_path(target)?;
    let store = build_store(target)?;
    presign_with(&store, target, &path, ttl)
}

fn presign_with(
    store: &AmazonS3,
    target: &S3Target,
    path: &ObjectPath,
    ttl: Duration,
) -> Result<(String, DateTime<Utc>), ExportError> {
    let presign_error = |reason: String| ExportError::Presign {
        bucket: target.bucket.clone(),
        key: target.key.clone(),
        reason,
    };
    // Signer is async for credential providers that fetch tokens; with the static keys
    // used here it finishes on its first poll, which keeps presign_get synchronous.
    let mut fut = pin!(store.signed_url(http::Method::GET, path, ttl));
    let url = match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(url)) => url,
        Poll::Ready(Err(e)) => return Err(presign_error(e.to_string())),
        Poll::Pending => return Err(presign_error("the signer did not finish at once".into())),
    };
    // The expiry counts from the signature's own X-Amz-Date, not from our clock reading.
    let signed_at = url
        .query_pairs()
        .find(|(k, _)| k == "X-Amz-Date")
        .and_then(|(_, v)| NaiveDateTime::parse_from_str(&v, "%Y%m%dT%H%M%SZ").ok())
        .map(|t| t.and_utc())
        .ok_or_else(|| presign_error("the signed URL has no X-Amz-Date".into()))?;
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    Ok((
        url.to_string(),
        signed_at + chrono::Duration::seconds(ttl_secs),
    ))
}

/// Reads `reader` into parts and uploads them, at most [`CONCURRENCY`] at a time. Returns
/// the part ids in order and the byte count. A failed part stops everything at once (the
/// caller aborts the upload; dropping the JoinSet cancels the other parts).
async fn stream_parts(
    store: &Arc<AmazonS3>,
    path: &ObjectPath,
    upload_id: &MultipartId,
    target: &S3Target,
    mut reader: impl AsyncRead + Unpin,
    progress: &(impl Fn(ExportProgress) + Send + Sync),
) -> Result<(Vec<PartId>, u64), ExportError> {
    let mut tasks: JoinSet<(usize, u64, object_store::Result<PartId>)> = JoinSet::new();
    let mut ids: Vec<Option<PartId>> = Vec::new();
    let mut buf = BytesMut::with_capacity(PART_SIZE);
    let mut eof = false;
    let mut done = ExportProgress { bytes: 0, parts: 0 };
    loop {
        // Ship a full buffer, or the last one (an empty one too when nothing came at all,
        // since S3 cannot complete an upload with no part), as soon as a slot is free.
        let last = eof && (!buf.is_empty() || ids.is_empty());
        if (buf.len() == PART_SIZE || last) && tasks.len() < CONCURRENCY {
            let idx = ids.len();
            if idx >= MAX_PARTS {
                return Err(ExportError::TooLarge {
                    bucket: target.bucket.clone(),
                    key: target.key.clone(),
                    max: MAX_PARTS,
                    part_size: PART_SIZE,
                });
            }
            let next = if eof {
                BytesMut::new()
            } else {
                BytesMut::with_capacity(PART_SIZE)
            };
            let data = std::mem::replace(&mut buf, next).freeze();
            let len = data.len() as u64;
            let (store, path, id) = (Arc::clone(store), path.clone(), upload_id.clone());
            tasks.spawn(async move {
                let r = store
                    .put_part(&path, &id, idx, PutPayload::from_bytes(data))
                    .await;
                (idx, len, r)
            });
            ids.push(None);
            continue;
        }
        if eof && buf.is_empty() && tasks.is_empty() {
            break;
        }
        // Read only while the buffer has room: this is what bounds memory.
        let want_read = !eof && buf.len() < PART_SIZE;
        tokio::select! {
            joined = tasks.join_next(), if !tasks.is_empty() => {
                let Some(joined) = joined else { continue };
                let (idx, len, result) = joined.map_err(|e| ExportError::Task {
                    bucket: target.bucket.clone(),
                    key: target.key.clone(),
                    reason: e.to_string(),
                })?;
                let part = result.map_err(|e| store_error(target, "uploading a part", e))?;
                ids[idx] = Some(part);
                done.parts += 1;
                done.bytes += len;
                tracing::debug!(bucket = %target.bucket, key = %target.key, part = idx + 1,
                    bytes = done.bytes, "part uploaded");
                progress(done);
            }
            // read_buf is cancel safe: if the join branch wins, no data was lost.
            read = reader.read_buf(&mut buf), if want_read => match read {
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(source) => return Err(ExportError::Read {
                    bucket: target.bucket.clone(),
                    key: target.key.clone(),
                    source,
                }),
            },
            else => {
                // Unreachable by the conditions above (no free slot means a task to join);
                // failing beats spinning if that reasoning is ever broken.
                return Err(ExportError::Task {
                    bucket: target.bucket.clone(),
                    key: target.key.clone(),
                    reason: "upload loop stalled".into(),
                });
            }
        }
    }
    let parts = ids.into_iter().flatten().collect();
    Ok((parts, done.bytes))
}

fn check_ttl(ttl: Duration) -> Result<(), ExportError> {
    if ttl < Duration::from_secs(1) || ttl > MAX_URL_TTL {
        return Err(ExportError::InvalidTtl {
            secs: ttl.as_secs(),
        });
    }
    Ok(())
}

fn object_path(target: &S3Target) -> Result<ObjectPath, ExportError> {
    let invalid = |reason: String| ExportError::InvalidTarget {
        bucket: target.bucket.clone(),
        key: target.key.clone(),
        reason,
    };
    if target.bucket.is_empty() {
        return Err(invalid("empty bucket name".into()));
    }
    if !(target.endpoint.starts_with("http://") || target.endpoint.starts_with("https://")) {
        return Err(invalid(format!(
            "endpoint {:?} is not an http(s) URL",
            target.endpoint
        )));
    }
    if target.key.is_empty() {
        return Err(invalid("empty object key".into()));
    }
    ObjectPath::parse(&target.key).map_err(|e| invalid(e.to_string()))
}

/// The S3 client an export uploads through (public for the benchmark's baseline, which
/// must upload the same way).
pub fn build_store(target: &S3Target) -> Result<AmazonS3, ExportError> {
    AmazonS3Builder::new()
        .with_endpoint(&target.endpoint)
        .with_region(&target.region)
        .with_bucket_name(&target.bucket)
        .with_access_key_id(&target.access_key_id)
        .with_secret_access_key(&target.secret_access_key)
        // Path-style (endpoint/bucket/key) works on every S3 implementation, including
        // local ones without wildcard DNS.
        .with_virtual_hosted_style_request(false)
        // One part is 8 MiB: give slow uplinks time (the default is 30 s per request).
        // Set before allow_http: with_client_options replaces the whole client options.
        .with_client_options(ClientOptions::new().with_timeout(Duration::from_secs(300)))
        .with_allow_http(target.endpoint.starts_with("http://"))
        .build()
        .map_err(|e| ExportError::InvalidTarget {
            bucket: target.bucket.clone(),
            key: target.key.clone(),
            reason: e.to_string(),
        })
}

fn store_error(
    target: &S3Target,
    operation: &'static str,
    source: object_store::Error,
) -> ExportError {
    ExportError::Store {
        bucket: target.bucket.clone(),
        key: target.key.clone(),
        operation,
        source: Box::new(source),
    }
}

async fn kill(child: &mut Child) {
    // The child may already be gone; either way it must not outlive a failed export.
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Drains a stream, keeping its last [`STDERR_TAIL`] bytes.
async fn read_tail(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut tail = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return tail,
            Ok(n) => {
                tail.extend_from_slice(&chunk[..n]);
                if tail.len() > STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
        }
    }
}

async fn tail_text(task: Option<tokio::task::JoinHandle<Vec<u8>>>) -> String {
    let Some(task) = task else {
        return String::new();
    };
    // The child has exited: its stderr reaches EOF unless a grandchild holds it open.
    match tokio::time::timeout(Duration::from_secs(2), task).await {
        Ok(Ok(bytes)) if !bytes.is_empty() => {
            format!(": {}", String::from_utf8_lossy(&bytes).trim())
        }
        _ => String::new(),
    }
}

/// Journal file names of exports running in this process: `abort_orphans` must not abort
/// them. Names, not paths, so that the journal directory may be spelled differently; they
/// hash endpoint, bucket, key and upload id, so they are unique.
static IN_FLIGHT: Mutex<Option<HashSet<String>>> = Mutex::new(None);

fn in_flight(name: &str) -> bool {
    IN_FLIGHT
        .lock()
        .map(|set| set.as_ref().is_some_and(|s| s.contains(name)))
        .unwrap_or(true)
}

fn set_in_flight(file: &Path, on: bool) {
    let Some(name) = file.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    if let Ok(mut set) = IN_FLIGHT.lock() {
        let set = set.get_or_insert_with(HashSet::new);
        if on {
            set.insert(name);
        } else {
            set.remove(&name);
        }
    }
}

/// One journal file: `upload-<hash>.json`, written atomically (tmp, fsync, rename).
#[derive(Debug, Serialize, Deserialize)]
struct JournalRecord {
    endpoint: String,
    bucket: String,
    key: String,
    upload_id: String,
    /// The exporting process, and its start time (clock ticks after boot, from
    /// /proc/<pid>/stat) so that a reused pid is not taken for it.
    pid: u32,
    process_start: Option<u64>,
    started_at: String,
}

impl JournalRecord {
    fn owner_alive(&self) -> bool {
        self.process_start.is_some() && process_start(self.pid) == self.process_start
    }
}

struct Journal {
    file: PathBuf,
}

impl Journal {
    async fn record(dir: &Path, target: &S3Target, upload_id: &str) -> Result<Self, ExportError> {
        let record = JournalRecord {
            endpoint: target.endpoint.clone(),
            bucket: target.bucket.clone(),
            key: target.key.clone(),
            upload_id: upload_id.to_owned(),
            pid: std::process::id(),
            process_start: process_start(std::process::id()),
            started_at: Utc::now().to_rfc3339(),
        };
        let digest = Sha256::digest(
            format!(
                "{}\n{}\n{}\n{}",
                record.endpoint, record.bucket, record.key, record.upload_id
            )
            .as_bytes(),
        );
        let file = dir.join(format!("upload-{}.json", &hex::encode(digest)[..24]));
        let body = serde_json::to_vec_pretty(&record).map_err(|e| ExportError::Journal {
            path: file.clone(),
            source: io::Error::other(e),
        })?;
        let (dir_owned, file_owned) = (dir.to_path_buf(), file.clone());
        set_in_flight(&file, true);
        let written = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir_owned)?;
            converge_core::fsutil::write_atomic(&file_owned, &body, 0o600)
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        match written {
            Ok(()) => Ok(Journal { file }),
            Err(source) => {
                set_in_flight(&file, false);
                Err(ExportError::Journal { path: file, source })
            }
        }
    }

    fn remove(&self) -> Result<(), io::Error> {
        match std::fs::remove_file(&self.file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Aborts the upload unless disarmed: on error paths explicitly, and from Drop when the
/// export future is cancelled.
struct AbortOnDrop {
    store: Arc<AmazonS3>,
    path: ObjectPath,
    upload_id: MultipartId,
    journal: Option<Journal>,
}

impl AbortOnDrop {
    async fn abort(&mut self, target: &S3Target) {
        let Some(journal) = self.journal.take() else {
            return;
        };
        match self
            .store
            .abort_multipart(&self.path, &self.upload_id)
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                if let Err(e) = journal.remove() {
                    tracing::warn!(file = %journal.file.display(), error = %e,
                        "removing the export journal entry failed");
                }
            }
            // The journal entry stays: abort_orphans retries it (it is no longer in flight).
            Err(e) => tracing::warn!(bucket = %target.bucket, key = %target.key, error = %e,
                "aborting the multipart upload failed; abort_orphans will retry"),
        }
        set_in_flight(&journal.file, false);
    }

    async fn disarm(&mut self) {
        if let Some(journal) = self.journal.take() {
            let file = journal.file.clone();
            let removed = tokio::task::spawn_blocking(move || journal.remove()).await;
            if !matches!(removed, Ok(Ok(()))) {
                // Harmless: abort_orphans finds the upload gone and drops the entry.
                tracing::warn!(file = %file.display(), "removing the export journal entry failed");
            }
            set_in_flight(&file, false);
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(journal) = self.journal.take() else {
            return;
        };
        set_in_flight(&journal.file, false);
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, path, id) = (
            Arc::clone(&self.store),
            self.path.clone(),
            self.upload_id.clone(),
        );
        handle.spawn(async move {
            if store.abort_multipart(&path, &id).await.is_ok() {
                let _ = journal.remove();
            }
        });
    }
}

/// The pid in a temporary journal file name (`.upload-….json.tmp.<pid>`, see
/// `converge_core::fsutil::write_atomic`).
fn stale_tmp_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(".upload-")?;
    let (_, pid) = rest.rsplit_once(".tmp.")?;
    pid.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Start time of a process in clock ticks after boot (field 22 of /proc/<pid>/stat).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> S3Target {
        S3Target {
            endpoint: "http://127.0.0.1:9".into(),
            region: "us-east-1".into(),
            bucket: "b".into(),
            key: "exports/a.tar".into(),
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
        }
    }

    #[test]
    fn debug_redacts_the_secret() {
        let shown = format!("{:?}", target());
        assert!(!shown.contains("wJalrXUtnFEMI"), "{shown}");
        assert!(shown.contains("exports/a.tar"));
    }

    #[test]
    fn ttl_over_a_day_or_under_a_second_is_refused() {
        for ttl in [
            MAX_URL_TTL + Duration::from_secs(1),
            Duration::from_millis(500),
        ] {
            assert!(matches!(
                presign_get(&target(), ttl),
                Err(ExportError::InvalidTtl { .. })
            ));
        }
        assert!(presign_get(&target(), MAX_URL_TTL).is_ok());
    }

    #[test]
    fn presign_works_without_a_runtime_and_reports_the_expiry() {
        let before = Utc::now() - chrono::Duration::seconds(1);
        let (url, expires) = presign_get(&target(), Duration::from_secs(600)).expect("presign");
        assert!(
            url.starts_with("http://127.0.0.1:9/b/exports/a.tar?"),
            "{url}"
        );
        assert!(url.contains("X-Amz-Expires=600"), "{url}");
        assert!(
            !url.contains("wJalrXUtnFEMI"),
            "the secret must not leak: {url}"
        );
        let delta = (expires - before).num_seconds();
        assert!((600..=603).contains(&delta), "{delta}");
    }

    #[test]
    fn invalid_targets_are_refused_without_secrets_in_the_message() {
        for t in [
            S3Target {
                key: "a//b".into(),
                ..target()
            },
            S3Target {
                key: String::new(),
                ..target()
            },
            S3Target {
                endpoint: "ftp://x".into(),
                ..target()
            },
        ] {
            let e = presign_get(&t, Duration::from_secs(60)).expect_err("invalid");
            assert!(matches!(e, ExportError::InvalidTarget { .. }), "{e}");
            assert!(!e.to_string().contains("wJalrXUtnFEMI"));
        }
    }

    #[test]
    fn process_start_identifies_this_process() {
        let me = process_start(std::process::id());
        assert!(me.is_some());
        assert_eq!(stale_tmp_pid(".upload-abc.json.tmp.42"), Some(42));
        assert_eq!(stale_tmp_pid("upload-abc.json"), None);
    }
}
