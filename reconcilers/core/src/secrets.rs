//! Where reconcilers read secret values: a local file override in the secrets directory
//! first, then the values the agent opened from the accepted document's sealed `secrets`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
pub use zeroize::Zeroizing;

/// A cloneable handle on the node's secret values. The agent replaces the opened values
/// when it accepts a document; every clone sees the change. Values live only in memory
/// and are never printed (`Debug` shows names only).
#[derive(Clone, Default)]
pub struct SecretSource {
    dir: PathBuf,
    /// Zeroed when replaced or dropped.
    opened: Arc<RwLock<BTreeMap<String, Zeroizing<String>>>>,
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.read().keys().cloned().collect();
        f.debug_struct("SecretSource")
            .field("dir", &self.dir)
            .field("sealed", &names)
            .finish()
    }
}

/// A secret that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read secret file {path}: {source}")]
pub struct SecretError {
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

impl SecretSource {
    /// A source with only local files (`<dir>/<name>`) until sealed values are set.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            opened: Arc::default(),
        }
    }

    /// The directory of local override files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Zeroizing<String>>> {
        // A panicked writer replaced the whole map or nothing: the data is consistent.
        self.opened.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the opened (sealed) values, e.g. with those of a newly accepted document;
    /// the values replaced are zeroed.
    pub fn set_sealed(&self, values: BTreeMap<String, Zeroizing<String>>) {
        let mut w = self.opened.write().unwrap_or_else(|p| p.into_inner());
        *w = values;
    }

    /// The value of secret `name`: the file `<dir>/<name>` if it exists (the operator's
    /// local override), else the opened sealed value, else `None`. The copy returned
    /// goes into what the reconciler renders (an env value, a Caddy configuration).
    pub fn get(&self, name: &str) -> Result<Option<String>, SecretError> {
        let path = self.dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SecretError {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
        Ok(self.read().get(name).map(|v| v.to_string()))
    }

    /// Where `name` would be looked up, for messages (never the value).
    pub fn describe(&self, name: &str) -> String {
        format!(
            "secret {name:?} (file {} or the document's sealed secrets)",
            self.dir.join(name).display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_sealed_and_clones_share_updates() {
        let dir = tempfile::tempdir().unwrap();
        let s = SecretSource::new(dir.path());
        let clone = s.clone();
        assert_eq!(clone.get("db").unwrap(), None);
        s.set_sealed(BTreeMap::from([(
            "db".to_string(),
            Zeroizing::new("s3cr3t".to_string()),
        )]));
        assert_eq!(clone.get("db").unwrap().as_deref(), Some("s3cr3t"));
        std::fs::write(dir.path().join("db"), "local\n").unwrap();
        assert_eq!(clone.get("db").unwrap().as_deref(), Some("local\n"));
        assert!(!format!("{clone:?}").contains("s3cr3t"));
        assert!(!format!("{clone:?}").contains("local"));
    }
}
