//! What prefetch and image GC need from a runtime, the same on both: the node's images,
//! the disk of the image store (statvfs of the daemon's storage root) and the progress
//! of a pull, read from the Docker-compatible pull stream that both daemons speak
//! (dockerd natively, Podman on the same socket as libpod).

use converge_core::DriverError;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// One image on the node (any image, converge's or not), as the runtime lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageInfo {
    /// `sha256:<64 hex>`.
    pub id: String,
    /// Its `repo:tag` names (none for a dangling image).
    pub tags: Vec<String>,
    /// Its `repo@sha256:…` references.
    pub digests: Vec<String>,
    /// Bytes on disk as the runtime reports them (layers shared with other images
    /// counted in full, as both daemons and the kubelet count them).
    pub size: u64,
    /// When the image was built (Unix seconds; not when it was pulled).
    pub created: i64,
    /// Whether the runtime counts containers using it itself (Podman also counts build
    /// containers, which its container list does not show).
    pub in_use: bool,
}

impl ImageInfo {
    /// How it is shown: its first tag, else its first digest reference, else its id.
    pub fn name(&self) -> String {
        self.tags
            .first()
            .or(self.digests.first())
            .cloned()
            .unwrap_or_else(|| self.id.clone())
    }
}

/// The filesystem holding the image store, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub capacity: u64,
    /// Capacity minus what unprivileged writers may still use (the kubelet's reading).
    pub used: u64,
}

impl DiskUsage {
    /// Used share in percent.
    pub fn percent(&self) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        self.used as f64 * 100.0 / self.capacity as f64
    }
}

/// statvfs of `path` (blocking: run it on a blocking thread).
pub fn disk_usage(path: &Path) -> Result<DiskUsage, DriverError> {
    let st = rustix::fs::statvfs(path).map_err(|e| {
        DriverError::io(
            format!("statvfs {} (the image store)", path.display()),
            e.into(),
        )
    })?;
    let capacity = st.f_blocks.saturating_mul(st.f_frsize);
    let available = st.f_bavail.saturating_mul(st.f_frsize);
    Ok(DiskUsage {
        capacity,
        used: capacity.saturating_sub(available),
    })
}

/// Bytes in decimal units, as the daemons print them (`12.3 MB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One layer (blob) of a pull.
#[derive(Clone, Copy, Debug, Default)]
struct Layer {
    current: u64,
    total: Option<u64>,
    done: bool,
    /// Already on the node: nothing to download.
    cached: bool,
}

/// A pull's progress, updated by the driver from the pull stream and read by the
/// status while the pull runs. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct PullProgress(Arc<Mutex<BTreeMap<String, Layer>>>);

/// Where a pull is: bytes downloaded of the sizes known so far, layers done of those
/// announced so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PullSummary {
    pub bytes: u64,
    pub total: u64,
    pub layers_done: usize,
    pub layers: usize,
}

impl std::fmt::Display for PullSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.layers == 0 {
            return f.write_str("starting");
        }
        write!(
            f,
            "{} of {}, {} of {} layers",
            human_bytes(self.bytes),
            human_bytes(self.total),
            self.layers_done,
            self.layers
        )
    }
}

impl PullProgress {
    /// One message of the Docker-compatible pull stream: `id` is the layer's short
    /// digest, `status` the daemon's word for the step. Messages about the whole pull
    /// (`Pulling from …`, `Digest: …`, `Status: …`) are ignored.
    pub fn update(&self, id: Option<&str>, status: &str, current: Option<i64>, total: Option<i64>) {
        let Some(id) = id.filter(|i| !i.is_empty()) else {
            return;
        };
        let known = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).filter(|v| *v > 0);
        let mut layers = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let layer = match status {
            "Pulling fs layer" | "Waiting" | "Downloading" | "Verifying Checksum"
            | "Download complete" | "Extracting" | "Pull complete" | "Already exists" => {
                layers.entry(id.to_string()).or_default()
            }
            _ => return,
        };
        match status {
            "Downloading" => {
                layer.current = known(current).unwrap_or(layer.current);
                layer.total = known(total).or(layer.total);
            }
            "Verifying Checksum" => layer.current = layer.total.unwrap_or(layer.current),
            // Podman's last word for a blob; Docker's before it extracts the layer.
            "Download complete" | "Pull complete" => {
                layer.current = layer.total.unwrap_or(layer.current);
                layer.done = true;
            }
            "Already exists" => {
                layer.done = true;
                layer.cached = true;
            }
            _ => {}
        }
    }

    pub fn summary(&self) -> PullSummary {
        let layers = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = PullSummary {
            layers: layers.len(),
            ..Default::default()
        };
        for l in layers.values() {
            s.layers_done += usize::from(l.done);
            if !l.cached {
                s.bytes += l.current;
                s.total += l.total.unwrap_or(l.current);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_pull_stream() {
        let p = PullProgress::default();
        assert_eq!(p.summary().to_string(), "starting");
        p.update(Some("1"), "Pulling from converge/busybox", None, None);
        p.update(Some("aaa"), "Pulling fs layer", None, None);
        p.update(Some("bbb"), "Already exists", None, None);
        p.update(Some("ccc"), "Waiting", None, None);
        p.update(Some("aaa"), "Downloading", Some(1_500_000), Some(4_000_000));
        let s = p.summary();
        assert_eq!(
            (s.bytes, s.total, s.layers_done, s.layers),
            (1_500_000, 4_000_000, 1, 3)
        );
        assert_eq!(s.to_string(), "1.5 MB of 4.0 MB, 1 of 3 layers");
        p.update(Some("aaa"), "Verifying Checksum", None, None);
        p.update(Some("aaa"), "Download complete", None, None);
        p.update(Some("aaa"), "Extracting", Some(10), Some(4_000_000));
        p.update(Some("aaa"), "Pull complete", None, None);
        p.update(Some("ccc"), "Downloading", Some(100), Some(2_000_000));
        p.update(Some("ccc"), "Pull complete", None, None);
        p.update(None, "Digest: sha256:00", None, None);
        p.update(None, "Status: Downloaded newer image", None, None);
        let s = p.summary();
        assert_eq!(
            (s.bytes, s.total, s.layers_done, s.layers),
            (6_000_000, 6_000_000, 3, 3)
        );
    }

    #[test]
    fn podman_compat_pull_stream() {
        // Podman reports blobs (the config among them) and ends each with
        // "Download complete".
        let p = PullProgress::default();
        p.update(Some("5d7616f4f9bf"), "Pulling fs layer", None, None);
        p.update(Some("0540e3c14a89"), "Pulling fs layer", None, None);
        p.update(
            Some("0540e3c14a89"),
            "Downloading",
            Some(245_760),
            Some(4_087_003),
        );
        p.update(Some("0540e3c14a89"), "Download complete", None, None);
        assert_eq!(p.summary().to_string(), "4.1 MB of 4.1 MB, 1 of 2 layers");
    }

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_000), "1.0 kB");
        assert_eq!(human_bytes(157_000_000), "157.0 MB");
        assert_eq!(human_bytes(3_200_000_000), "3.2 GB");
        let d = DiskUsage {
            capacity: 200,
            used: 170,
        };
        assert_eq!(d.percent(), 85.0);
        assert_eq!(DiskUsage::default().percent(), 0.0);
    }

    #[test]
    fn names() {
        let mut i = ImageInfo {
            id: "sha256:ab".into(),
            ..Default::default()
        };
        assert_eq!(i.name(), "sha256:ab");
        i.digests = vec!["r/a@sha256:cd".into()];
        assert_eq!(i.name(), "r/a@sha256:cd");
        i.tags = vec!["r/a:1".into()];
        assert_eq!(i.name(), "r/a:1");
    }

    #[test]
    fn statvfs_reads_a_filesystem() {
        let d = disk_usage(Path::new("/")).unwrap();
        assert!(d.capacity > 0 && d.used <= d.capacity);
        assert!(disk_usage(Path::new("/nonexistent/converge")).is_err());
    }
}
