//! Release artifacts the reference control plane serves, so a node installs and updates
//! with no other registry reachable: the agent binary (the plane's own executable, whose
//! version and architecture it knows) and every file of `--artifacts DIR` (a pinned
//! Caddy, other converge releases), each with its SHA-256 and an Ed25519 signature by
//! the plane's signing key; and the install scripts (`/setup.sh`, `/update.sh`).
//!
//! The signature covers `converge/artifact/v1\n<name>\n<hex sha256>`; `install/setup.sh`
//! checks it with `openssl pkeyutl` against the plane key (pinned by `--plane-key`).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// First line of the bytes an artifact signature covers.
pub const DOMAIN: &str = "converge/artifact/v1";

/// The install scripts, as built into this binary (the plane serves its own release's).
pub const SETUP_SH: &str = include_str!("../../install/setup.sh");
pub const UPDATE_SH: &str = include_str!("../../install/update.sh");
/// The systemd units setup.sh installs, by name.
pub const UNITS: [(&str, &str); 2] = [
    (
        "converge.service",
        include_str!("../../systemd/converge.service"),
    ),
    (
        "converge-proxy.service",
        include_str!("../../systemd/converge-proxy.service"),
    ),
];

/// One downloadable file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    pub name: String,
    pub size: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// Base64 Ed25519 signature of [`signed_bytes`] by the plane's signing key.
    pub signature: String,
}

/// `GET /v1/artifacts`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// The plane's signing key (base64), which the signatures verify with.
    pub signing_key: String,
    /// Name of the agent binary of the plane's own release (`converge-<version>-<arch>`).
    pub agent: String,
    pub artifacts: Vec<Artifact>,
}

impl Index {
    /// The index as lines a shell script reads without a JSON parser:
    /// `signing-key <base64>`, `agent <name>`, then `artifact <name> <size> <sha256>
    /// <signature>` per file.
    pub fn to_text(&self) -> String {
        let mut out = format!("signing-key {}\nagent {}\n", self.signing_key, self.agent);
        for a in &self.artifacts {
            out.push_str(&format!(
                "artifact {} {} {} {}\n",
                a.name, a.size, a.sha256, a.signature
            ));
        }
        out
    }
}

/// The name of this build's agent binary.
pub fn agent_name() -> String {
    format!(
        "converge-{}-{}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    )
}

pub fn signed_bytes(name: &str, sha256: &str) -> String {
    format!("{DOMAIN}\n{name}\n{sha256}")
}

/// Names that may be served: plain file names, nothing hidden.
fn servable(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
}

fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let size = std::io::copy(&mut f, &mut h)?;
    Ok((size, hex::encode(h.finalize())))
}

/// What the plane serves: name → (path, signed description). Files are hashed once per
/// (size, modification time).
#[derive(Default)]
pub struct Catalog {
    entries: BTreeMap<String, Entry>,
    /// The directory's modification time at the last scan (a file added, removed or
    /// renamed into it changes it).
    dir_mtime: Option<SystemTime>,
    key_id: String,
}

struct Entry {
    path: PathBuf,
    stamp: (u64, Option<SystemTime>),
    artifact: Artifact,
}

impl Catalog {
    /// Brings the catalog up to date with the plane's executable and `dir`, signing
    /// with `key`. Cheap when nothing changed.
    pub fn refresh(&mut self, key: &SigningKey, dir: Option<&Path>) -> std::io::Result<()> {
        let key_id = super::identity::key_id(&key.verifying_key());
        let dir_mtime = match dir {
            Some(d) => Some(std::fs::metadata(d)?.modified()?),
            None => None,
        };
        if key_id == self.key_id && dir_mtime == self.dir_mtime && !self.entries.is_empty() {
            return Ok(());
        }
        let mut files = vec![(agent_name(), std::env::current_exe()?)];
        if let Some(d) = dir {
            for e in std::fs::read_dir(d)? {
                let e = e?;
                let name = e.file_name().to_string_lossy().to_string();
                if servable(&name) && e.file_type()?.is_file() && name != files[0].0 {
                    files.push((name, e.path()));
                }
            }
        }
        let mut entries = BTreeMap::new();
        for (name, path) in files {
            let meta = std::fs::metadata(&path)?;
            let stamp = (meta.len(), meta.modified().ok());
            let artifact = match self.entries.remove(&name) {
                Some(old) if old.stamp == stamp && old.path == path && key_id == self.key_id => {
                    old.artifact
                }
                _ => {
                    let (size, sha256) = hash_file(&path)?;
                    let signature =
                        B64.encode(key.sign(signed_bytes(&name, &sha256).as_bytes()).to_bytes());
                    Artifact {
                        name: name.clone(),
                        size,
                        sha256,
                        signature,
                    }
                }
            };
            entries.insert(
                name,
                Entry {
                    path,
                    stamp,
                    artifact,
                },
            );
        }
        self.entries = entries;
        self.dir_mtime = dir_mtime;
        self.key_id = key_id;
        Ok(())
    }

    pub fn index(&self, key: &VerifyingKey) -> Index {
        Index {
            signing_key: B64.encode(key.as_bytes()),
            agent: agent_name(),
            artifacts: self.entries.values().map(|e| e.artifact.clone()).collect(),
        }
    }

    /// The file behind `name`, if served.
    pub fn path(&self, name: &str) -> Option<PathBuf> {
        self.entries.get(name).map(|e| e.path.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Verifier;

    /// Whether `a` is signed by `key` (as setup.sh checks it, with openssl).
    fn verify(key: &VerifyingKey, a: &Artifact) -> bool {
        let Some(sig) = B64
            .decode(&a.signature)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
        else {
            return false;
        };
        key.verify(
            signed_bytes(&a.name, &a.sha256).as_bytes(),
            &ed25519_dalek::Signature::from_bytes(&sig),
        )
        .is_ok()
    }

    #[test]
    fn the_catalog_signs_the_plane_binary_and_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("caddy-2.11.7-x86_64"), b"caddy").unwrap();
        std::fs::write(dir.path().join(".hidden"), b"x").unwrap();
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut c = Catalog::default();
        c.refresh(&key, Some(dir.path())).unwrap();
        let index = c.index(&key.verifying_key());
        let names: Vec<_> = index.artifacts.iter().map(|a| a.name.as_str()).collect();
        assert!(names.contains(&"caddy-2.11.7-x86_64"), "{names:?}");
        assert!(names.contains(&agent_name().as_str()));
        assert!(!names.contains(&".hidden"));
        let caddy = index
            .artifacts
            .iter()
            .find(|a| a.name.starts_with("caddy"))
            .unwrap();
        assert_eq!(caddy.sha256, hex::encode(Sha256::digest(b"caddy")));
        assert!(verify(&key.verifying_key(), caddy));
        let mut renamed = caddy.clone();
        renamed.name = "caddy-evil".into();
        assert!(!verify(&key.verifying_key(), &renamed));
        let other = SigningKey::from_bytes(&[4; 32]);
        assert!(!verify(&other.verifying_key(), caddy));
        assert_eq!(c.path("../etc/passwd"), None);
        // A rotated key signs everything again.
        c.refresh(&other, Some(dir.path())).unwrap();
        assert!(c
            .index(&other.verifying_key())
            .artifacts
            .iter()
            .all(|a| verify(&other.verifying_key(), a)));
    }
}
