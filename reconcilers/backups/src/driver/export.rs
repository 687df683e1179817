//! Wires an `exports` entry to the S3 upload module: credentials from the secret
//! (`{"accessKeyId": "…", "secretAccessKey": "…"}`), orphaned uploads of a killed run
//! aborted first, then `borg export-tar REPO::ARCHIVE -` streamed into the upload.

use super::{ExportDone, Host};
use crate::driver::borg::{human, Progress};
use crate::export;
use crate::spec::{parse_ttl, BackupRepository, Export, MAX_URL_TTL};
use converge_core::DriverError;
use serde::Deserialize;
use std::ffi::OsString;
use std::time::Instant;
use tracing::{info, warn};

/// The credentials secret's format.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Credentials {
    access_key_id: String,
    secret_access_key: String,
}

pub(crate) async fn run(
    host: &Host,
    e: &Export,
    repo: &BackupRepository,
    progress: &Progress,
) -> Result<ExportDone, DriverError> {
    let cfg = &host.cfg;
    let name = &e.s3.credentials_secret;
    let raw = cfg
        .secrets
        .get(name)
        .map_err(|err| DriverError::Failed(err.to_string()))?
        .ok_or_else(|| DriverError::Failed(format!("{} is missing", cfg.secrets.describe(name))))?;
    // The parse error is not shown: it could quote the secret.
    let creds: Credentials = serde_json::from_str(&raw).map_err(|_| {
        DriverError::Failed(format!(
            "secret {name:?} is not {{\"accessKeyId\": …, \"secretAccessKey\": …}} JSON"
        ))
    })?;
    let ttl = parse_ttl(&e.url_ttl)
        .filter(|d| *d <= MAX_URL_TTL)
        .ok_or_else(|| DriverError::Failed(format!("invalid urlTtl {:?}", e.url_ttl)))?;
    let target = export::S3Target {
        endpoint: e.s3.endpoint.clone(),
        region: e.s3.region.clone().unwrap_or_else(|| "us-east-1".into()),
        bucket: e.s3.bucket.clone(),
        key: e.s3.key.clone(),
        access_key_id: creds.access_key_id,
        secret_access_key: creds.secret_access_key,
    };
    let journal = cfg.dir.join("exports").join(&e.id);
    std::fs::create_dir_all(&journal)
        .map_err(|err| DriverError::io(format!("create {}", journal.display()), err))?;
    match export::abort_orphans(&journal, &target).await {
        Ok(0) => {}
        Ok(n) => warn!(export = %e.id, aborted = n, "aborted multipart uploads of a killed run"),
        Err(err) => {
            return Err(DriverError::Failed(format!(
                "abort orphaned uploads: {err}"
            )))
        }
    }
    let access = host.access(repo)?;
    let args: Vec<OsString> = ["export-tar", "--lock-wait", "60"]
        .into_iter()
        .map(OsString::from)
        .chain([
            OsString::from(format!("{}::{}", access.location, e.archive)),
            OsString::from("-"),
        ])
        .collect();
    let child = host.borg.spawn_stdout(&access, &args)?;
    let started = Instant::now();
    let p = progress.clone();
    let out = export::export(
        child,
        &target,
        ttl,
        &journal,
        move |x: export::ExportProgress| {
            let secs = started.elapsed().as_secs_f64().max(0.001);
            p.set(format!(
                "{} uploaded in {} parts, {}/s",
                human(x.bytes),
                x.parts,
                human((x.bytes as f64 / secs) as u64)
            ));
        },
    )
    .await
    .map_err(|err| DriverError::Failed(format!("export: {err}")))?;
    info!(export = %e.id, bytes = out.bytes, parts = out.parts, expires = %out.expires_at, "export uploaded");
    Ok(ExportDone {
        message: format!(
            "archive {} uploaded to s3://{}/{}: {} in {} parts",
            e.archive,
            e.s3.bucket,
            e.s3.key,
            human(out.bytes),
            out.parts
        ),
        url: out.url,
        expires_at: out.expires_at,
    })
}
