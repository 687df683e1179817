//! In-memory container runtime for unit tests of the reconciler's logic.

use crate::driver::{
    ContainerRuntime, CreateSpec, Health, LocalImage, Mount, NetworkCreate, PortBinding, RunState,
    RuntimeContainer, RuntimeNetwork, LABEL_MANAGED, LABEL_NODE,
};
use crate::driver::{DiskUsage, ImageInfo, PullProgress};
use crate::registry::RegistryAuth;
use converge_core::{DriverError, HostEvent};
use futures::stream::BoxStream;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

/// State of the fake runtime; tests read and poke it directly.
#[derive(Debug, Default)]
pub struct FakeState {
    pub containers: BTreeMap<String, RuntimeContainer>,
    /// Image reference → id.
    pub images: BTreeMap<String, String>,
    /// Images a pull can fetch (reference → id).
    pub registry: BTreeMap<String, String>,
    pub volumes: BTreeSet<String>,
    pub next_id: u32,
    /// Operation log, e.g. `create web`, `start c1`.
    pub log: Vec<String>,
    /// New containers of these names exit immediately after start (crash).
    pub crash_on_start: BTreeSet<String>,
    /// Networks by name (the default `podman` network is implicit).
    pub networks: BTreeMap<String, RuntimeNetwork>,
    /// The network each container (by id) is attached to.
    pub attached: BTreeMap<String, String>,
    /// Size and creation time (Unix seconds) per image id (absent: 1 MB, time 0).
    pub image_meta: BTreeMap<String, (u64, i64)>,
    /// The image store's filesystem; removing an image frees its size.
    pub disk: DiskUsage,
}

/// The runtime's default network, which always exists in the fake.
pub const DEFAULT_NETWORK: &str = "podman";

/// The fake runtime.
#[derive(Default)]
pub struct FakeRuntime {
    pub state: Mutex<FakeState>,
}

impl FakeRuntime {
    pub fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn missing(op: &str, id: &str) -> DriverError {
    DriverError::Failed(format!("fake {op} {id}: no such container"))
}

impl ContainerRuntime for FakeRuntime {
    fn kind(&self) -> &'static str {
        "fake"
    }

    async fn list_managed(&self, node: &str) -> Result<Vec<RuntimeContainer>, DriverError> {
        Ok(self.with(|s| {
            s.containers
                .values()
                .filter(|c| c.labels.get(LABEL_MANAGED).map(String::as_str) == Some("true"))
                .filter(|c| c.labels.get(LABEL_NODE).map(String::as_str) == Some(node))
                .cloned()
                .collect()
        }))
    }

    async fn image(&self, image: &str) -> Result<Option<LocalImage>, DriverError> {
        Ok(self.with(|s| {
            s.images.get(image).map(|id| LocalImage {
                id: id.clone(),
                digests: crate::registry::pinned_digest(image)
                    .map(String::from)
                    .into_iter()
                    .collect(),
            })
        }))
    }

    async fn pull(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        progress: &PullProgress,
    ) -> Result<(), DriverError> {
        progress.update(Some("layer1"), "Downloading", Some(1), Some(2));
        self.with(|s| {
            match auth {
                Some(a) => s.log.push(format!("pull {image} as {}", a.username)),
                None => s.log.push(format!("pull {image}")),
            }
            match s.registry.get(image).cloned() {
                Some(id) => {
                    s.images.insert(image.to_string(), id);
                    Ok(())
                }
                None => Err(DriverError::Failed(format!("fake pull {image}: not found"))),
            }
        })
    }

    async fn create(&self, spec: &CreateSpec) -> Result<String, DriverError> {
        self.with(|s| {
            if s.containers.values().any(|c| c.name == spec.name) {
                return Err(DriverError::Failed(format!(
                    "fake create: name {} in use",
                    spec.name
                )));
            }
            let image_id = s.images.get(&spec.image).cloned().ok_or_else(|| {
                DriverError::Failed(format!("fake create: no image {}", spec.image))
            })?;
            let network = spec.network.as_deref().unwrap_or(DEFAULT_NETWORK);
            if network != DEFAULT_NETWORK && !s.networks.contains_key(network) {
                return Err(DriverError::Failed(format!(
                    "fake create: no network {network}"
                )));
            }
            s.next_id += 1;
            let id = format!("c{}", s.next_id);
            s.attached.insert(id.clone(), network.to_string());
            s.log.push(format!("create {}", spec.name));
            for v in spec.volumes.iter().filter(|v| !v.is_bind()) {
                s.volumes.insert(v.source.clone());
            }
            s.containers.insert(
                id.clone(),
                RuntimeContainer {
                    id: id.clone(),
                    name: spec.name.clone(),
                    labels: spec.labels.clone(),
                    image: spec.image.clone(),
                    image_id,
                    state: RunState::Created,
                    exit_code: None,
                    health: None,
                    addresses: Vec::new(),
                    ports: spec
                        .ports
                        .iter()
                        .filter_map(|p| {
                            Some(PortBinding {
                                protocol: p.protocol.as_str().into(),
                                container_port: p.container_port,
                                host_ip: None,
                                host_port: p.host_port?,
                            })
                        })
                        .collect(),
                    mounts: spec
                        .volumes
                        .iter()
                        .map(|v| Mount {
                            source: v.source.clone(),
                            target: v.target.clone(),
                            read_only: v.read_only,
                        })
                        .collect(),
                    memory: spec.memory,
                    pids_limit: spec.pids,
                },
            );
            Ok(id)
        })
    }

    async fn start(&self, id: &str) -> Result<(), DriverError> {
        self.with(|s| {
            let n = s.next_id;
            let crash = s
                .containers
                .get(id)
                .is_some_and(|c| s.crash_on_start.contains(&c.name));
            let c = s
                .containers
                .get_mut(id)
                .ok_or_else(|| missing("start", id))?;
            if crash {
                c.state = RunState::Exited;
                c.exit_code = Some(1);
            } else {
                c.state = RunState::Running;
                c.exit_code = None;
                c.addresses = vec![format!("10.88.0.{}", n % 250 + 2)
                    .parse()
                    .map_err(|_| missing("start", id))?];
                if c.labels.contains_key("test.health") {
                    c.health = Some(Health::Healthy);
                }
            }
            let name = c.name.clone();
            s.log.push(format!("start {name}"));
            Ok(())
        })
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), DriverError> {
        self.with(|s| {
            if let Some(c) = s.containers.get_mut(id) {
                c.state = RunState::Exited;
                c.exit_code = Some(0);
                c.addresses.clear();
                let name = c.name.clone();
                s.log.push(format!("stop {name}"));
            }
            Ok(())
        })
    }

    async fn remove(&self, id: &str) -> Result<(), DriverError> {
        self.with(|s| {
            if let Some(c) = s.containers.remove(id) {
                s.attached.remove(id);
                s.log.push(format!("remove {}", c.name));
            }
            Ok(())
        })
    }

    async fn rename(&self, id: &str, new_name: &str) -> Result<(), DriverError> {
        self.with(|s| {
            let c = s
                .containers
                .get_mut(id)
                .ok_or_else(|| missing("rename", id))?;
            s.log.push(format!("rename {} {new_name}", c.name));
            c.name = new_name.to_string();
            Ok(())
        })
    }

    async fn remove_volume(&self, name: &str) -> Result<(), DriverError> {
        self.with(|s| {
            s.volumes.remove(name);
            s.log.push(format!("remove volume {name}"));
        });
        Ok(())
    }

    async fn inspect(&self, id: &str) -> Result<Option<RuntimeContainer>, DriverError> {
        Ok(self.with(|s| s.containers.get(id).cloned()))
    }

    async fn list_networks(&self) -> Result<Vec<RuntimeNetwork>, DriverError> {
        Ok(self.with(|s| s.networks.values().cloned().collect()))
    }

    async fn network_users(&self, network: &str) -> Result<Vec<String>, DriverError> {
        Ok(self.with(|s| {
            s.attached
                .iter()
                .filter(|(_, n)| *n == network)
                .filter_map(|(id, _)| s.containers.get(id).map(|c| c.name.clone()))
                .collect()
        }))
    }

    async fn create_network(&self, spec: &NetworkCreate) -> Result<(), DriverError> {
        self.with(|s| {
            if s.networks.contains_key(&spec.name) {
                return Err(DriverError::Failed(format!(
                    "fake network create: {} exists",
                    spec.name
                )));
            }
            s.log.push(format!("create network {}", spec.name));
            let subnets = spec
                .subnets
                .iter()
                .map(|(net, gw)| (net.to_string(), Some(gw.to_string())))
                .collect();
            s.networks.insert(
                spec.name.clone(),
                RuntimeNetwork {
                    name: spec.name.clone(),
                    labels: spec.labels.clone(),
                    subnets,
                },
            );
            Ok(())
        })
    }

    async fn remove_network(&self, name: &str) -> Result<(), DriverError> {
        self.with(|s| {
            if s.attached.values().any(|n| n == name) {
                return Err(DriverError::Failed(format!(
                    "fake network remove: {name} is in use"
                )));
            }
            if s.networks.remove(name).is_some() {
                s.log.push(format!("remove network {name}"));
            }
            Ok(())
        })
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, DriverError> {
        Ok(self.with(|s| {
            let mut by_id: BTreeMap<String, ImageInfo> = BTreeMap::new();
            for (name, id) in &s.images {
                let (size, created) = s.image_meta.get(id).copied().unwrap_or((1_000_000, 0));
                let i = by_id.entry(id.clone()).or_insert_with(|| ImageInfo {
                    id: id.clone(),
                    size,
                    created,
                    ..Default::default()
                });
                if name.contains('@') {
                    i.digests.push(name.clone());
                } else {
                    i.tags.push(name.clone());
                }
            }
            by_id.into_values().collect()
        }))
    }

    async fn image_users(&self) -> Result<BTreeSet<String>, DriverError> {
        Ok(self.with(|s| s.containers.values().map(|c| c.image_id.clone()).collect()))
    }

    async fn remove_image(&self, image: &ImageInfo) -> Result<(), DriverError> {
        self.with(|s| {
            if s.containers.values().any(|c| c.image_id == image.id) {
                return Err(DriverError::Failed(format!(
                    "fake image remove {}: in use",
                    image.id
                )));
            }
            let before = s.images.len();
            s.images.retain(|_, id| *id != image.id);
            if s.images.len() != before {
                let (size, _) = s
                    .image_meta
                    .get(&image.id)
                    .copied()
                    .unwrap_or((1_000_000, 0));
                s.disk.used = s.disk.used.saturating_sub(size);
                s.log.push(format!("remove image {}", image.name()));
            }
            Ok(())
        })
    }

    async fn image_disk(&self) -> Result<DiskUsage, DriverError> {
        Ok(self.with(|s| s.disk))
    }

    fn events(&self) -> BoxStream<'static, HostEvent> {
        Box::pin(futures::stream::pending())
    }

    fn describe(&self) -> String {
        "the fake runtime".into()
    }
}
