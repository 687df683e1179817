//! In-memory DNS driver for unit tests (not built into release binaries).

use super::{DnsDriver, Running};
use crate::render::Layout;
use converge_core::DriverError;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// In-memory driver for unit tests of the reconciler's logic.
pub struct FakeDriver {
    pub state: Mutex<FakeState>,
    layout: Layout,
}

#[derive(Clone, Debug, Default)]
pub struct FakeState {
    pub hosts: Option<String>,
    pub confs: BTreeMap<String, String>,
    pub running: Vec<Running>,
    pub restarts: usize,
    pub hosts_writes: usize,
    pub fail_restart: bool,
}

impl FakeDriver {
    pub fn new(layout: Layout) -> Self {
        Self {
            state: Mutex::default(),
            layout,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut guard)
    }

    pub fn snapshot(&self) -> FakeState {
        self.with(|s| s.clone())
    }
}

impl DnsDriver for FakeDriver {
    fn layout(&self) -> &Layout {
        &self.layout
    }
    fn read_hosts(&self) -> Result<Option<String>, DriverError> {
        Ok(self.with(|s| s.hosts.clone()))
    }
    fn write_hosts(&self, content: &str) -> Result<(), DriverError> {
        self.with(|s| {
            s.hosts = Some(content.to_string());
            s.hosts_writes += 1;
        });
        Ok(())
    }
    fn read_confs(&self) -> Result<BTreeMap<String, String>, DriverError> {
        Ok(self.with(|s| s.confs.clone()))
    }
    fn write_conf(&self, hash: &str, content: &str) -> Result<(), DriverError> {
        self.with(|s| s.confs.insert(hash.to_string(), content.to_string()));
        Ok(())
    }
    fn remove_stale_confs(&self, keep: &str) -> Result<(), DriverError> {
        self.with(|s| s.confs.retain(|h, _| h == keep));
        Ok(())
    }
    fn running(&self) -> Result<Vec<Running>, DriverError> {
        Ok(self.with(|s| s.running.clone()))
    }
    async fn restart(&self, _old: &[Running], hash: &str) -> Result<(), DriverError> {
        self.with(|s| {
            if s.fail_restart {
                return Err(DriverError::Failed("dnsmasq: failed to bind".into()));
            }
            s.restarts += 1;
            s.running = vec![Running {
                pid: 1000 + s.restarts as u32,
                conf_hash: hash.to_string(),
            }];
            Ok(())
        })
    }
}
