//! The driver: the metadata database and, in the agent, the API server whose listeners
//! and published snapshot follow what was committed. The fake for unit tests is in
//! `driver/fake.rs`.

pub mod db;
#[cfg(test)]
pub mod fake;
pub mod node;

use crate::api::Server;
use crate::plan::{ProjectWrite, StoredProject};
use crate::snapshot::{ProjectData, Published};
use converge_core::DriverError;
use db::Db;
use node::NodeFiles;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tracing::{info, warn};

/// What the reconciler needs from the host.
pub trait MetadataDriver: Send + Sync + 'static {
    /// Every stored project (the database as it is on disk).
    fn read(&self) -> Result<BTreeMap<String, StoredProject>, DriverError>;
    /// One project's write, in one transaction; readers see it whole once committed.
    fn write(&self, w: &ProjectWrite) -> Result<(), DriverError>;
    fn remove(&self, id: &str) -> Result<(), DriverError>;
    /// Addresses served now; `None` when this process does not serve.
    fn listening(&self) -> Option<BTreeSet<SocketAddr>>;
    fn listen(&self, addr: SocketAddr) -> Result<(), DriverError>;
    fn unlisten(&self, addr: SocketAddr) -> Result<(), DriverError>;
    /// The kernel's host name and `/etc/hostname`.
    fn hostname(&self) -> Result<(String, String), DriverError>;
    fn set_hostname(&self, name: &str) -> Result<(), DriverError>;
    /// `/etc/motd`, None when absent.
    fn motd(&self) -> Result<Option<String>, DriverError>;
    fn write_motd(&self, text: &str) -> Result<(), DriverError>;
}

/// The real driver: `<data-dir>/metadata.db`, the API when serving, the node's files.
pub struct Host {
    db: Db,
    server: Option<Arc<Server>>,
    node: NodeFiles,
}

/// The database file under the data directory.
pub fn db_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("metadata.db")
}

impl Host {
    /// A driver that only writes the database (one-shot commands).
    pub fn offline(data_dir: &Path) -> Host {
        Host {
            db: Db::new(db_path(data_dir)),
            server: None,
            node: NodeFiles::default(),
        }
    }

    /// The agent's driver: loads the last committed data and listen addresses and
    /// serves them at once, before the first pass (needs a tokio runtime). A database
    /// that cannot be read starts empty; the first pass reports why.
    pub fn serving(data_dir: &Path) -> Host {
        let db = Db::new(db_path(data_dir));
        let server = Arc::new(Server::new(Published::new()));
        match db.read_all() {
            Ok(projects) => server.published().replace_all(
                projects
                    .iter()
                    .map(|(id, p)| (id.clone(), Arc::new(ProjectData::from_stored(id, p))))
                    .collect(),
            ),
            Err(e) => warn!(error = %e, "metadata: cannot load stored projects"),
        }
        match db.listen_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    if let Err(e) = server.listen(a) {
                        warn!(addr = %a, error = %e, "metadata: cannot listen");
                    }
                }
            }
            Err(e) => warn!(error = %e, "metadata: cannot load listen addresses"),
        }
        Host {
            db,
            server: Some(server),
            node: NodeFiles::default(),
        }
    }

    /// The node's files under `etc` instead of `/etc` (tests).
    pub fn with_etc(mut self, etc: impl Into<std::path::PathBuf>) -> Host {
        self.node = NodeFiles::new(etc);
        self
    }

    pub fn server(&self) -> Option<&Arc<Server>> {
        self.server.as_ref()
    }

    pub fn db(&self) -> &Db {
        &self.db
    }
}

impl MetadataDriver for Host {
    fn read(&self) -> Result<BTreeMap<String, StoredProject>, DriverError> {
        Ok(self.db.read_all()?)
    }

    fn write(&self, w: &ProjectWrite) -> Result<(), DriverError> {
        let index = self.db.write(w)?;
        if let Some(s) = &self.server {
            let mut data = ProjectData::new(&w.id, &w.token_sha256, w.rate_limit, index);
            data.entries = w
                .entries
                .iter()
                .map(|(k, v)| (k.clone(), bytes::Bytes::copy_from_slice(v.as_bytes())))
                .collect();
            s.published().update(&w.id, Some(Arc::new(data)));
        }
        info!(project = %w.id, index, set = w.set.len(), deleted = w.delete.len(), "project written");
        Ok(())
    }

    fn remove(&self, id: &str) -> Result<(), DriverError> {
        self.db.remove(id)?;
        if let Some(s) = &self.server {
            s.published().update(id, None);
        }
        info!(project = %id, "project removed");
        Ok(())
    }

    fn listening(&self) -> Option<BTreeSet<SocketAddr>> {
        self.server.as_ref().map(|s| s.listening())
    }

    fn listen(&self, addr: SocketAddr) -> Result<(), DriverError> {
        let Some(s) = &self.server else {
            return Ok(());
        };
        s.listen(addr)
            .map_err(|e| DriverError::io(format!("listen on {addr}"), e))?;
        Ok(self.db.set_listen(addr, true)?)
    }

    fn unlisten(&self, addr: SocketAddr) -> Result<(), DriverError> {
        if let Some(s) = &self.server {
            s.unlisten(addr);
        }
        Ok(self.db.set_listen(addr, false)?)
    }

    fn hostname(&self) -> Result<(String, String), DriverError> {
        self.node.hostname()
    }

    fn set_hostname(&self, name: &str) -> Result<(), DriverError> {
        self.node.set_hostname(name)?;
        info!(hostname = name, "host name set");
        Ok(())
    }

    fn motd(&self) -> Result<Option<String>, DriverError> {
        self.node.motd()
    }

    fn write_motd(&self, text: &str) -> Result<(), DriverError> {
        self.node.write_motd(text)?;
        info!(bytes = text.len(), "motd written");
        Ok(())
    }
}
