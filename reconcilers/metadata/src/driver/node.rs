//! The node's host name and message of the day (`metadata.hostname`, `metadata.motd`):
//! the kernel's host name (of the agent's UTS namespace) with `/etc/hostname`, and
//! `/etc/motd`. Both files are world-readable (0644), as other programs read them.

use converge_core::DriverError;
use std::path::{Path, PathBuf};

/// Where the node's settings live: `/etc` on a host (a test points it elsewhere).
#[derive(Clone, Debug)]
pub struct NodeFiles {
    etc: PathBuf,
}

impl Default for NodeFiles {
    fn default() -> Self {
        Self {
            etc: PathBuf::from("/etc"),
        }
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> DriverError {
    DriverError::io(format!("{what} {}", path.display()), e)
}

impl NodeFiles {
    pub fn new(etc: impl Into<PathBuf>) -> Self {
        Self { etc: etc.into() }
    }

    /// The kernel's host name, and `/etc/hostname` (absent: empty).
    pub fn hostname(&self) -> Result<(String, String), DriverError> {
        let kernel = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        let path = self.etc.join("hostname");
        let file = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io("read", &path, e)),
        };
        Ok((kernel, file))
    }

    /// Sets the kernel's host name and writes `/etc/hostname` (so a reboot keeps it).
    pub fn set_hostname(&self, name: &str) -> Result<(), DriverError> {
        let path = self.etc.join("hostname");
        converge_core::fsutil::write_atomic(&path, format!("{name}\n").as_bytes(), 0o644)
            .map_err(|e| io("write", &path, e))?;
        rustix::system::sethostname(name.as_bytes())
            .map_err(|e| DriverError::io("set the host name", e.into()))
    }

    /// `/etc/motd`, or None when there is none.
    pub fn motd(&self) -> Result<Option<String>, DriverError> {
        let path = self.etc.join("motd");
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &path, e)),
        }
    }

    pub fn write_motd(&self, text: &str) -> Result<(), DriverError> {
        let path = self.etc.join("motd");
        converge_core::fsutil::write_atomic(&path, text.as_bytes(), 0o644)
            .map_err(|e| io("write", &path, e))
    }
}
