//! The self-update's host side: what runs now, the record of the last update, the
//! download (streamed, hashed, size-capped) and the hand-over to `update.sh` in a
//! transient systemd unit, which outlives the agent it restarts.

use crate::plan::{Observed, Outcome};
use crate::spec::AgentSpec;
use converge_core::DriverError;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;
use tracing::info;

/// The largest binary downloaded.
const MAX_BINARY: u64 = 512 << 20;
/// The transient unit update.sh runs in.
pub const UNIT: &str = "converge-selfupdate";

pub struct HostConfig {
    /// `<data-dir>/selfupdate`: the download, update.sh, its report.
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    /// `converge --version` of this build.
    pub version: String,
    /// install/update.sh as built into this binary.
    pub update_script: &'static str,
    /// PEM to trust besides the public roots (the control plane's CA, from join).
    pub ca_pem: Option<String>,
}

/// The real host.
pub struct Host {
    cfg: HostConfig,
    /// SHA-256 of the running executable, hashed once.
    running: OnceLock<String>,
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> DriverError + '_ {
    move |e| DriverError::io(what, e)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Host {
    pub fn new(cfg: HostConfig) -> Self {
        Host {
            cfg,
            running: OnceLock::new(),
        }
    }

    fn staged(&self) -> PathBuf {
        self.cfg.dir.join("converge.staged")
    }
    fn pending(&self) -> PathBuf {
        self.cfg.dir.join("pending")
    }
    fn result(&self) -> PathBuf {
        self.cfg.dir.join("result.json")
    }

    fn running_sha256(&self) -> Result<String, DriverError> {
        if let Some(s) = self.running.get() {
            return Ok(s.clone());
        }
        let mut f = std::fs::File::open("/proc/self/exe").map_err(io("open /proc/self/exe"))?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h).map_err(io("hash the running binary"))?;
        Ok(self
            .running
            .get_or_init(|| hex::encode(h.finalize()))
            .clone())
    }

    pub fn observe(&self, spec: &AgentSpec) -> Result<Observed, DriverError> {
        let mut last: Option<Outcome> = match std::fs::read(self.result()) {
            Ok(b) => serde_json::from_slice(&b).ok(),
            Err(_) => None,
        };
        // An update under way: started (pending) and not reported since. One that left
        // no report within its time (killed with its unit) counts as failed.
        let mut in_progress = None;
        if let Ok(sha) = std::fs::read_to_string(self.pending()) {
            let sha = sha.trim().to_string();
            let started = modified(&self.pending());
            let reported = modified(&self.result())
                .zip(started)
                .is_some_and(|(r, s)| r >= s);
            let age = started
                .and_then(|s| s.elapsed().ok())
                .unwrap_or(Duration::MAX);
            if !reported && age < Duration::from_secs(spec.timeout_secs + 120) {
                in_progress = Some(sha);
            } else if !reported {
                last = Some(Outcome {
                    sha256: sha,
                    exit: -1,
                    message: "update.sh left no report (killed?)".into(),
                });
            }
        }
        Ok(Observed {
            version: self.cfg.version.clone(),
            sha256: self.running_sha256()?,
            systemd: Path::new("/run/systemd/system").exists(),
            in_progress,
            last,
            staged: self.staged().exists(),
        })
    }

    /// Streams `spec.url` to the staging file, refusing it unless its SHA-256 is the one
    /// the signed document names.
    pub async fn download(&self, spec: &AgentSpec) -> Result<PathBuf, DriverError> {
        std::fs::create_dir_all(&self.cfg.dir).map_err(io("create the selfupdate dir"))?;
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600));
        if let Some(pem) = &self.cfg.ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| DriverError::Failed(format!("CA certificate: {e}")))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        let client = b
            .build()
            .map_err(|e| DriverError::Failed(format!("HTTP client: {e}")))?;
        let resp = client
            .get(&spec.url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| DriverError::Failed(format!("download {}: {e}", spec.url)))?;
        let tmp = self.cfg.dir.join("converge.download");
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(io("create the download"))?;
        let (mut hash, mut size) = (Sha256::new(), 0u64);
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| DriverError::Failed(format!("download {}: {e}", spec.url)))?;
            size += chunk.len() as u64;
            if size > MAX_BINARY {
                return Err(DriverError::Failed(format!(
                    "download {}: larger than {MAX_BINARY} bytes",
                    spec.url
                )));
            }
            hash.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(io("write the download"))?;
        }
        file.sync_all().await.map_err(io("sync the download"))?;
        drop(file);
        let got = hex::encode(hash.finalize());
        if got != spec.sha256.to_ascii_lowercase() {
            let _ = std::fs::remove_file(&tmp);
            return Err(DriverError::Failed(format!(
                "download {}: SHA-256 {got}, not the {} the document names",
                spec.url, spec.sha256
            )));
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod the download"))?;
        std::fs::rename(&tmp, self.staged()).map_err(io("stage the download"))?;
        Ok(self.staged())
    }

    /// Checks that the staged build is the release the document names, then starts
    /// update.sh in the transient unit [`UNIT`] (it swaps the binary, restarts the agent,
    /// waits for it, rolls back on failure and writes its report).
    pub async fn start(&self, spec: &AgentSpec, staged: &Path) -> Result<(), DriverError> {
        let out = tokio::process::Command::new(staged)
            .arg("--version")
            .output()
            .await
            .map_err(io("run the new binary"))?;
        let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let release = printed.strip_prefix("converge ").unwrap_or_default();
        if release.split_whitespace().next() != Some(spec.version.as_str()) {
            return Err(DriverError::Failed(format!(
                "the new binary says {printed:?}, not converge {}",
                spec.version
            )));
        }
        let script = self.cfg.dir.join("update.sh");
        converge_core::fsutil::write_atomic(&script, self.cfg.update_script.as_bytes(), 0o700)
            .map_err(io("write update.sh"))?;
        converge_core::fsutil::write_atomic(&self.pending(), spec.sha256.as_bytes(), 0o600)
            .map_err(io("write the pending record"))?;
        let exe = std::env::current_exe().map_err(io("the running binary's path"))?;
        info!(version = %spec.version, unit = UNIT, "handing over to update.sh");
        let out = tokio::process::Command::new("systemd-run")
            .arg(format!("--unit={UNIT}"))
            .args(["--collect", "--quiet", "--service-type=exec"])
            .arg(format!("--setenv=CONVERGE_BIN={}", exe.display()))
            .arg(format!(
                "--setenv=CONVERGE_DATA_DIR={}",
                self.cfg.data_dir.display()
            ))
            .arg("/bin/bash")
            .arg(&script)
            .arg("--binary")
            .arg(staged)
            .args(["--sha256", &spec.sha256])
            .args(["--timeout", &spec.timeout_secs.to_string()])
            .arg("--report")
            .arg(self.result())
            .output()
            .await
            .map_err(io("systemd-run"))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(self.pending());
            return Err(DriverError::Failed(format!(
                "systemd-run {UNIT}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    pub fn remove_staged(&self) -> Result<(), DriverError> {
        match std::fs::remove_file(self.staged()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(DriverError::io("remove the staged binary", e))
            }
            _ => Ok(()),
        }
    }
}
