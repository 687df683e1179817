//! The container runtime seen by the reconciler: one trait, implemented by the Podman
//! driver (libpod API via podman-api), the Docker driver (bollard) and, for unit tests
//! only, an in-memory fake.

pub mod docker;
#[cfg(test)]
pub mod fake;
mod images;
pub mod podman;
mod settings;

pub use images::*;
pub use settings::*;

use crate::registry::RegistryAuth;
use crate::spec::{ContainerPort, ContainerVolume};
use converge_core::{DriverError, HostEvent};
use futures::stream::BoxStream;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

/// Labels converge puts on every container it creates; ownership is decided by them.
pub const LABEL_MANAGED: &str = "converge.managed";
pub const LABEL_NODE: &str = "converge.node";
pub const LABEL_NAME: &str = "converge.name";
pub const LABEL_HASH: &str = "converge.spec-hash";

/// Run state reported by the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Created,
    Running,
    Paused,
    Restarting,
    Exited,
    Other,
}

/// Health-check state reported by the runtime (None when the container has no check).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

/// One published port as the runtime reports it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortBinding {
    pub protocol: String,
    pub container_port: u16,
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
}

/// One mount as the runtime reports it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mount {
    /// Named volume name, or absolute host path for a bind mount.
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

/// What the runtime's inspect says about a container converge manages.
#[derive(Clone, Debug, PartialEq)]
pub struct RuntimeContainer {
    pub id: String,
    /// The runtime's name for it (without a leading `/`).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Image reference it was created from, as given at create time.
    pub image: String,
    /// Resolved image id (`sha256:…`).
    pub image_id: String,
    pub state: RunState,
    pub exit_code: Option<i64>,
    pub health: Option<Health>,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<PortBinding>,
    pub mounts: Vec<Mount>,
    /// Memory limit in bytes (None = unlimited).
    pub memory: Option<u64>,
    pub pids_limit: Option<u32>,
}

/// A container network as the runtime reports it (any network, converge's or not).
#[derive(Clone, Debug, PartialEq)]
pub struct RuntimeNetwork {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Its subnets with their gateways, as the runtime reports them (unparsed).
    pub subnets: Vec<(String, Option<String>)>,
}

/// Everything needed to create one network: a bridge with these subnets and gateways.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkCreate {
    pub name: String,
    pub subnets: Vec<(IpNet, IpAddr)>,
    /// converge's ownership labels.
    pub labels: BTreeMap<String, String>,
}

/// Health check as handed to the runtime (durations already parsed).
#[derive(Clone, Debug, PartialEq)]
pub struct HealthSpec {
    /// Command run with exec semantics (`CMD`), e.g. `["wget", "-q", "-O-", "http://localhost/"]`.
    pub command: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub start_period: Duration,
    pub retries: u32,
}

/// Everything needed to create one container. `env` may hold secret values: never log
/// or display it (the `Debug` impl redacts it).
#[derive(Clone, PartialEq)]
pub struct CreateSpec {
    /// Runtime name to create it under.
    pub name: String,
    pub image: String,
    /// Replaces the image's entrypoint when set.
    pub command: Option<Vec<String>>,
    /// Replaces the image's cmd when set.
    pub args: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub ports: Vec<ContainerPort>,
    pub volumes: Vec<ContainerVolume>,
    pub cpus: Option<f64>,
    pub memory: Option<u64>,
    pub pids: Option<u32>,
    pub health: Option<HealthSpec>,
    /// User labels plus converge's ownership labels.
    pub labels: BTreeMap<String, String>,
    /// Network to attach to (runtime default when None).
    pub network: Option<String>,
    pub ip: Option<IpAddr>,
    /// SIGTERM → SIGKILL grace used by `stop`.
    pub stop_grace: Duration,
    /// User, hostname, capabilities, tmpfs, ulimits, logging and the rest; the
    /// default leaves all of it to the runtime.
    pub settings: ContainerSettings,
}

impl std::fmt::Debug for CreateSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateSpec")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("env", &format_args!("<{} vars, redacted>", self.env.len()))
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

/// An image on the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalImage {
    /// `sha256:<64 hex>`, what containers made from it report as their image id.
    pub id: String,
    /// Its registry manifest digests (`sha256:…`), one per repository it was pulled from.
    pub digests: Vec<String>,
}

/// The `sha256:…` digests among an image's `RepoDigests` (`name@sha256:…`) that belong
/// to the repository `image` names (an image has one per repository it came from).
pub fn repo_digests<'a>(image: &str, entries: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let repo = crate::registry::repository(image);
    let mut v: Vec<String> = entries
        .into_iter()
        .filter_map(|e| e.rsplit_once('@'))
        .filter(|(r, _)| crate::registry::repository(r) == repo)
        .map(|(_, d)| d.to_string())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The runtime operations converge needs. Every call is bounded by a timeout in the
/// reconciler; drivers map "already in that state" (start of a running container,
/// stop of a stopped one, remove of a missing one) to success.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// `podman` or `docker`, for logs and status.
    fn kind(&self) -> &'static str;

    /// Every container carrying `converge.managed=true` and `converge.node=<node>`.
    fn list_managed(
        &self,
        node: &str,
    ) -> impl Future<Output = Result<Vec<RuntimeContainer>, DriverError>> + Send;

    /// The local image for a reference, or None if not present.
    fn image(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Option<LocalImage>, DriverError>> + Send;

    /// Pulls an image, with credentials for its registry if any, reporting bytes and
    /// layers to `progress`. A digest-pinned reference is verified by the runtime as it
    /// pulls.
    fn pull(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        progress: &PullProgress,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Every image on the node (converge's or not), for image GC.
    fn list_images(&self) -> impl Future<Output = Result<Vec<ImageInfo>, DriverError>> + Send;

    /// The ids of the images any container on the node uses (converge's or not,
    /// running or not).
    fn image_users(&self) -> impl Future<Output = Result<BTreeSet<String>, DriverError>> + Send;

    /// Removes an image, never forced: each of its names, then its id (a missing one is
    /// success). The runtime refuses while a container uses it.
    fn remove_image(
        &self,
        image: &ImageInfo,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// The filesystem holding the runtime's image store (its storage root).
    fn image_disk(&self) -> impl Future<Output = Result<DiskUsage, DriverError>> + Send;

    /// Creates (does not start) a container; returns its id.
    fn create(&self, spec: &CreateSpec)
        -> impl Future<Output = Result<String, DriverError>> + Send;

    fn start(&self, id: &str) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Removes a stopped container (force-kills a running one).
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), DriverError>> + Send;

    fn rename(
        &self,
        id: &str,
        new_name: &str,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Removes a named volume (only when the document asks for it).
    fn remove_volume(&self, name: &str) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Every network on the host (the reconciler decides ownership by labels).
    fn list_networks(
        &self,
    ) -> impl Future<Output = Result<Vec<RuntimeNetwork>, DriverError>> + Send;

    /// The names of every container attached to a network, whoever created them.
    fn network_users(
        &self,
        network: &str,
    ) -> impl Future<Output = Result<Vec<String>, DriverError>> + Send;

    /// Creates a bridge network.
    fn create_network(
        &self,
        spec: &NetworkCreate,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Removes a network (a missing one is success; one still in use fails).
    fn remove_network(&self, name: &str) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Re-inspects one container (health and state while waiting during a replace).
    fn inspect(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<RuntimeContainer>, DriverError>> + Send;

    /// An event naming the container for every lifecycle event (die, start, health
    /// change, destroy) of a converge-managed one. Reconnects on its own if the daemon
    /// restarts (and then reports the reconnection, since events may have been missed).
    fn events(&self) -> BoxStream<'static, HostEvent>;

    /// Which runtime and endpoint this is (`Podman at /run/podman/podman.sock`), so an
    /// operator reading an error knows what was tried.
    fn describe(&self) -> String;
}

/// Stand-in when no runtime socket was found: every call fails with the reason, so a
/// document with containers reports Degraded with a clear message instead of hiding it.
pub struct NoRuntime(pub String);

impl NoRuntime {
    fn err<T>(&self) -> Result<T, DriverError> {
        Err(DriverError::Failed(self.0.clone()))
    }
}

impl ContainerRuntime for NoRuntime {
    fn kind(&self) -> &'static str {
        "none"
    }
    async fn list_managed(&self, _: &str) -> Result<Vec<RuntimeContainer>, DriverError> {
        self.err()
    }
    async fn image(&self, _: &str) -> Result<Option<LocalImage>, DriverError> {
        self.err()
    }
    async fn pull(
        &self,
        _: &str,
        _: Option<&RegistryAuth>,
        _: &PullProgress,
    ) -> Result<(), DriverError> {
        self.err()
    }
    async fn list_images(&self) -> Result<Vec<ImageInfo>, DriverError> {
        self.err()
    }
    async fn image_users(&self) -> Result<BTreeSet<String>, DriverError> {
        self.err()
    }
    async fn remove_image(&self, _: &ImageInfo) -> Result<(), DriverError> {
        self.err()
    }
    async fn image_disk(&self) -> Result<DiskUsage, DriverError> {
        self.err()
    }
    async fn create(&self, _: &CreateSpec) -> Result<String, DriverError> {
        self.err()
    }
    async fn start(&self, _: &str) -> Result<(), DriverError> {
        self.err()
    }
    async fn stop(&self, _: &str, _: Duration) -> Result<(), DriverError> {
        self.err()
    }
    async fn remove(&self, _: &str) -> Result<(), DriverError> {
        self.err()
    }
    async fn rename(&self, _: &str, _: &str) -> Result<(), DriverError> {
        self.err()
    }
    async fn remove_volume(&self, _: &str) -> Result<(), DriverError> {
        self.err()
    }
    async fn inspect(&self, _: &str) -> Result<Option<RuntimeContainer>, DriverError> {
        self.err()
    }
    async fn list_networks(&self) -> Result<Vec<RuntimeNetwork>, DriverError> {
        self.err()
    }
    async fn network_users(&self, _: &str) -> Result<Vec<String>, DriverError> {
        self.err()
    }
    async fn create_network(&self, _: &NetworkCreate) -> Result<(), DriverError> {
        self.err()
    }
    async fn remove_network(&self, _: &str) -> Result<(), DriverError> {
        self.err()
    }
    fn events(&self) -> BoxStream<'static, HostEvent> {
        Box::pin(futures::stream::pending())
    }
    fn describe(&self) -> String {
        "no container runtime".into()
    }
}

/// The published ports of an inspect response, from the runtime's port map
/// (`"8080/tcp"` → bindings of `(host ip, host port)`), sorted and without duplicates.
/// Both runtimes use this shape; only their binding types differ.
pub fn port_bindings<B>(
    map: impl IntoIterator<Item = (String, Option<Vec<B>>)>,
    host: impl Fn(&B) -> (Option<&str>, Option<&str>),
) -> Vec<PortBinding> {
    let mut ports: Vec<PortBinding> = map
        .into_iter()
        .filter_map(|(key, b)| Some((parse_port_key(&key)?, b?)))
        .flat_map(|((container_port, protocol), b)| {
            b.into_iter()
                .filter_map(|b| {
                    let (ip, port) = host(&b);
                    Some(PortBinding {
                        protocol: protocol.clone(),
                        container_port,
                        host_ip: ip.and_then(|ip| ip.parse().ok()),
                        host_port: port?.parse().ok()?,
                    })
                })
                .collect::<Vec<_>>()
        })
        .collect();
    ports.sort();
    ports.dedup();
    ports
}

/// Parses `"8080/tcp"` (no protocol: tcp).
pub(crate) fn parse_port_key(key: &str) -> Option<(u16, String)> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    Some((port.parse().ok()?, proto.to_string()))
}

/// Inspects listed containers, several at a time (a pass over hundreds of containers
/// is dominated by these round trips); containers gone since the list are skipped.
/// The result is sorted by name, then id.
pub async fn inspect_all<F, Fut>(
    ids: Vec<String>,
    inspect: F,
) -> Result<Vec<RuntimeContainer>, DriverError>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<Option<RuntimeContainer>, DriverError>>,
{
    use futures::StreamExt;
    const PARALLEL: usize = 8;
    let results: Vec<Result<Option<RuntimeContainer>, DriverError>> = futures::stream::iter(ids)
        .map(inspect)
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        if let Some(c) = r? {
            out.push(c);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
    Ok(out)
}

/// A `CreateSpec` using every field, for the drivers' request-mapping tests.
#[cfg(test)]
pub(crate) fn sample_create_spec() -> CreateSpec {
    use crate::spec::Protocol;
    CreateSpec {
        name: "web".into(),
        image: "localhost/busybox:test".into(),
        command: Some(vec!["httpd".into()]),
        args: Some(vec!["-f".into()]),
        env: BTreeMap::from([("A".into(), "1".into())]),
        ports: vec![
            ContainerPort {
                container_port: 8080,
                host_port: Some(18080),
                protocol: Protocol::Tcp,
                host_ip: None,
            },
            ContainerPort {
                container_port: 8080,
                host_port: Some(18081),
                protocol: Protocol::Tcp,
                host_ip: Some("127.0.0.1".into()),
            },
            ContainerPort {
                container_port: 53,
                host_port: None,
                protocol: Protocol::Udp,
                host_ip: None,
            },
        ],
        volumes: vec![
            ContainerVolume {
                source: "data".into(),
                target: "/data".into(),
                read_only: false,
            },
            ContainerVolume {
                source: "/etc".into(),
                target: "/host-etc".into(),
                read_only: true,
            },
        ],
        cpus: Some(0.5),
        memory: Some(64 << 20),
        pids: Some(100),
        health: Some(HealthSpec {
            command: vec!["true".into()],
            interval: Duration::from_millis(500),
            timeout: Duration::from_secs(2),
            start_period: Duration::ZERO,
            retries: 3,
        }),
        labels: BTreeMap::from([(LABEL_MANAGED.into(), "true".into())]),
        network: None,
        ip: None,
        stop_grace: Duration::from_millis(1500),
        settings: sample_settings(),
    }
}

/// Every [`ContainerSettings`] field set, for the drivers' request-mapping tests.
#[cfg(test)]
fn sample_settings() -> ContainerSettings {
    use crate::spec::{DeviceEntry, LogDriver};
    ContainerSettings {
        user: Some("1000:100".into()),
        working_dir: Some("/srv".into()),
        hostname: Some("web-1".into()),
        extra_hosts: vec![
            ("db.internal".into(), "10.0.0.5".parse().unwrap()),
            ("v6.internal".into(), "fd00::5".parse().unwrap()),
        ],
        cap_add: vec!["CAP_NET_ADMIN".into()],
        cap_drop: vec!["CAP_MKNOD".into()],
        read_only_rootfs: true,
        tmpfs: vec![TmpfsMount {
            target: "/run".into(),
            size: Some(64 << 20),
            mode: Some(0o1777),
        }],
        ulimits: BTreeMap::from([("nofile".into(), (512, 1024))]),
        sysctls: BTreeMap::from([("net.ipv4.ip_unprivileged_port_start".into(), "80".into())]),
        stop_signal: Some(StopSignal {
            name: "SIGQUIT".into(),
            number: 3,
        }),
        logging: Some(LogSpec {
            driver: LogDriver::JsonFile,
            max_size: Some(10 << 20),
            max_file: Some(3),
        }),
        devices: vec![DeviceEntry {
            host: "/dev/zero".into(),
            container: "/dev/zero2".into(),
            permissions: "r".into(),
        }],
        dns_servers: vec!["10.89.7.1".parse().unwrap(), "fd00:7::1".parse().unwrap()],
        dns_search: vec!["internal".into()],
        dns_options: vec!["ndots:2".into()],
    }
}
