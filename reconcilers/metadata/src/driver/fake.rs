//! A fake driver for unit tests: projects and listeners in memory, failures on demand.

use super::MetadataDriver;
use crate::plan::{ProjectWrite, StoredProject};
use converge_core::DriverError;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Mutex;

#[derive(Default)]
pub struct Fake {
    pub projects: Mutex<BTreeMap<String, StoredProject>>,
    pub listening: Mutex<BTreeSet<SocketAddr>>,
    /// Project ids whose writes fail.
    pub fail: Mutex<BTreeSet<String>>,
    pub writes: Mutex<usize>,
    counter: Mutex<u64>,
    pub hostname: Mutex<String>,
    pub motd: Mutex<Option<String>>,
}

impl MetadataDriver for Fake {
    fn read(&self) -> Result<BTreeMap<String, StoredProject>, DriverError> {
        Ok(self.projects.lock().unwrap().clone())
    }

    fn write(&self, w: &ProjectWrite) -> Result<(), DriverError> {
        if self.fail.lock().unwrap().contains(&w.id) {
            return Err(DriverError::Failed("disk full".into()));
        }
        *self.writes.lock().unwrap() += 1;
        let mut c = self.counter.lock().unwrap();
        *c += 1;
        self.projects.lock().unwrap().insert(
            w.id.clone(),
            StoredProject {
                token_sha256: w.token_sha256.clone(),
                rate_limit: w.rate_limit,
                index: *c,
                entries: w.entries.clone(),
            },
        );
        Ok(())
    }

    fn remove(&self, id: &str) -> Result<(), DriverError> {
        self.projects.lock().unwrap().remove(id);
        Ok(())
    }

    fn listening(&self) -> Option<BTreeSet<SocketAddr>> {
        Some(self.listening.lock().unwrap().clone())
    }

    fn listen(&self, addr: SocketAddr) -> Result<(), DriverError> {
        self.listening.lock().unwrap().insert(addr);
        Ok(())
    }

    fn unlisten(&self, addr: SocketAddr) -> Result<(), DriverError> {
        self.listening.lock().unwrap().remove(&addr);
        Ok(())
    }

    fn hostname(&self) -> Result<(String, String), DriverError> {
        let h = self.hostname.lock().unwrap().clone();
        Ok((h.clone(), h))
    }

    fn set_hostname(&self, name: &str) -> Result<(), DriverError> {
        *self.hostname.lock().unwrap() = name.to_string();
        Ok(())
    }

    fn motd(&self) -> Result<Option<String>, DriverError> {
        Ok(self.motd.lock().unwrap().clone())
    }

    fn write_motd(&self, text: &str) -> Result<(), DriverError> {
        *self.motd.lock().unwrap() = Some(text.to_string());
        Ok(())
    }
}
