//! The durable record of runs: `<data-dir>/backups/state.json`, replaced atomically
//! (temp + fsync + rename + fsync dir) on every change, so a kill -9 leaves either the
//! old or the new record, never a torn one.

use crate::plan::State;
use converge_core::fsutil::write_atomic;
use converge_core::DriverError;
use std::path::{Path, PathBuf};

/// The state file.
#[derive(Clone, Debug)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join("state.json"),
        }
    }

    /// The record; a missing file is an empty record (first start).
    pub fn read(&self) -> Result<State, DriverError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                DriverError::Failed(format!(
                    "{} is not a valid record: {e}",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(DriverError::io(format!("read {}", self.path.display()), e)),
        }
    }

    pub fn write(&self, s: &State) -> Result<(), DriverError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| DriverError::io(format!("create {}", dir.display()), e))?;
        }
        let bytes = serde_json::to_vec_pretty(s)
            .map_err(|e| DriverError::Failed(format!("encode the backups record: {e}")))?;
        write_atomic(&self.path, &bytes, 0o600)
            .map_err(|e| DriverError::io(format!("write {}", self.path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(&dir.path().join("backups"));
        assert_eq!(f.read().unwrap(), State::default());
        let mut s = State::default();
        s.initialised.insert("local".into());
        f.write(&s).unwrap();
        assert_eq!(f.read().unwrap(), s);
    }
}
