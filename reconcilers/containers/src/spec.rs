//! The `containers` section of the document: the containers this node runs, and their
//! semantic validation.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The containers this node runs. Absent section: converge leaves containers it created
/// earlier alone. Present: exactly these containers exist; any other container converge
/// created is removed. Containers converge did not create are never touched.
pub type ContainersSpec = Vec<Container>;

/// The container networks converge creates and owns on this node. Absent section:
/// networks converge created earlier are left alone. Present: exactly these exist; any
/// other network converge created is removed once no container uses it. Networks
/// converge did not create (`podman`, `bridge`, an operator's own) are never touched,
/// and containers may still attach to them by name.
pub type NetworksSpec = Vec<Network>;

/// Container registries that need credentials to pull from. Images from any other
/// registry are pulled anonymously.
pub type RegistriesSpec = Vec<Registry>;

/// What the containers reconciler manages: the `containers` and `networks` sections
/// (networks are created before the containers that use them and removed after them,
/// so one reconciler orders both), the `registries` their images come from, and the
/// `images` section (prefetch and image GC need to know which images containers use).
/// Any of `containers`, `networks` and `images` may be absent (unmanaged).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Workload {
    pub containers: Option<ContainersSpec>,
    pub networks: Option<NetworksSpec>,
    pub registries: RegistriesSpec,
    pub images: Option<ImagesSpec>,
}

/// Credentials for one registry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Registry {
    /// The registry as image references name it: `host[:port]`, e.g.
    /// `registry.example.com:5000`, or `docker.io` for Docker Hub (no scheme, no path).
    pub server: String,
    /// User name the registry knows (sent with the password).
    pub username: String,
    /// Secret holding the password or access token (sealed in the document's `secrets`,
    /// or a local secret file). Read at each pull, never logged, shown or stored.
    pub password_secret: String,
}

/// When converge pulls a container's image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Only when the node does not have the image (the default).
    #[default]
    Missing,
    /// Also again every few minutes: a tag moved to another image replaces the
    /// container (the same zero-drop way as any replacement); an unchanged one does not.
    Always,
    /// Never: the image must be on the node already (loaded or pre-pulled).
    Never,
}

impl PullPolicy {
    fn is_default(&self) -> bool {
        *self == PullPolicy::Missing
    }
}

/// A bridge network for containers, e.g. the node's slice of the mesh's container
/// address space that its WireGuard peers route to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Network {
    /// Network name, unique on the node (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 63
    /// characters); containers attach with `network: <name>`.
    pub name: String,
    /// One IPv4 and at most one IPv6 subnet. Subnets must not overlap each other, the
    /// WireGuard addresses or any peer's allowed IPs. Changing them replaces the network
    /// (and recreates the containers converge runs on it) unless a container converge
    /// does not manage uses it.
    #[schemars(length(min = 1, max = 2))]
    pub subnets: Vec<NetworkSubnet>,
}

/// One subnet of a container network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkSubnet {
    /// CIDR, e.g. `10.210.1.0/24` or `fd00:210:1::/64`; host bits must be zero.
    pub subnet: String,
    /// Gateway address on the host's bridge, inside the subnet; absent: its first
    /// address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// Label prefix reserved for converge's own bookkeeping labels.
pub const RESERVED_LABEL_PREFIX: &str = "converge.";

/// Default `stopGracePeriod`.
pub const DEFAULT_STOP_GRACE_PERIOD: &str = "10s";

/// One container.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Container {
    /// Container name, unique on the node: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 63
    /// characters. Other sections (firewall, routes, dns) refer to containers by it.
    pub name: String,
    /// Image reference with an explicit tag or digest, e.g. `docker.io/library/nginx:1.27`
    /// or `ghcr.io/acme/api@sha256:<64 hex digits>`. A digest pins the exact image.
    pub image: String,
    /// Replaces the image's ENTRYPOINT (argv form), as Kubernetes' `command` does.
    /// `entrypoint` is the same thing under Compose's name: set at most one of them.
    /// Compose's `command` is `args` here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's CMD, the arguments given to the entrypoint (argv form):
    /// Compose's `command`, Kubernetes' `args`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Environment variables, name to value. Never put secrets here: use `secretEnv`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Environment variables filled from local secrets: variable name to secret name.
    /// The values never appear in the document, logs, diffs or status.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, String>,
    /// Container ports; those with a `hostPort` are published on the host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    /// Named volumes and bind mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<ContainerVolume>,
    /// Resource limits; absent: no limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ContainerResources>,
    /// When converge restarts the container after it exits (converge, not the runtime,
    /// owns restarts, with a crash-loop back-off).
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Health check run inside the container; absent: the image's own, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Extra container labels. Keys starting with `converge.` are reserved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Name of the container network to attach to: one of `networks`, or a network that
    /// exists on the host; absent: the runtime's default network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Static address on `network` (requires `network`; inside its subnet when it is one
    /// of `networks`); absent: assigned by the runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Whether the container should be running or exist stopped.
    #[serde(default)]
    pub desired_state: ContainerState,
    /// Time between SIGTERM and SIGKILL when stopping, e.g. `10s`, `1m30s`.
    #[serde(default = "default_stop_grace_period")]
    pub stop_grace_period: String,
    /// When the container is removed from the document, also remove its named volumes.
    /// Default false: data outlives the container.
    #[serde(default, skip_serializing_if = "is_false")]
    pub remove_volumes_on_delete: bool,
    // The fields below are absent from the serialized entry when unset, so adding them
    // did not change the spec hash of existing containers (no mass replacement).
    /// Replaces the image's ENTRYPOINT (argv form), as Compose's `entrypoint` does; the
    /// same as `command` (set at most one). Arguments go in `args`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// User the process runs as: a name or uid, optionally with `:group` or `:gid`,
    /// e.g. `1000:1000` or `nobody`; absent: the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Absolute working directory of the process; absent: the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Hostname inside the container (at most 63 characters); absent: the runtime's
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Extra `/etc/hosts` entries: host name to IPv4 or IPv6 address (Compose's map
    /// form of `extra_hosts`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_hosts: BTreeMap<String, String>,
    /// Capabilities added to the runtime's default set, e.g. `NET_ADMIN` (the `CAP_`
    /// prefix is optional, case does not matter), or `ALL`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Capabilities removed from the default set; `ALL` with a few `capAdd` gives a
    /// minimal set. A capability cannot be both added and dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// Mount the image's root filesystem read-only; writable places then come from
    /// `volumes` and `tmpfs` only, on both runtimes (unlike `podman run --read-only`,
    /// no tmpfs is added on /tmp, /var/tmp and /run).
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only_rootfs: bool,
    /// tmpfs mounts, mounted `rw,noexec,nosuid,nodev` (Docker's defaults) on both runtimes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tmpfs: Vec<Tmpfs>,
    /// Process resource limits by name (`nofile`, `nproc`, `core`, `memlock`, …).
    /// Absent names keep the runtime's defaults, except on Podman: once any is set,
    /// Podman ignores its configured defaults and raises `nofile` and `nproc` to
    /// 1048576 unless they are listed too (list them where the host cannot grant that).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ulimits: BTreeMap<String, Ulimit>,
    /// Kernel parameters of the container's own namespaces, name to value (a string,
    /// e.g. `"1024"`). Only namespaced ones: `net.*`, `kernel.shm*`, `kernel.msg*`,
    /// `kernel.sem`, `fs.mqueue.*`; anything else would change the host.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctls: BTreeMap<String, String>,
    /// Signal that asks the container to stop (before SIGKILL after
    /// `stopGracePeriod`), e.g. `SIGQUIT` or `SIGRTMIN+3`; absent: the image's, else
    /// SIGTERM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Log driver and rotation; absent: the runtime's default (Docker: json-file
    /// without rotation; Podman: its configured driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
    /// Host devices made available in the container:
    /// `host-path[:container-path[:permissions]]`, e.g. `/dev/fuse` or
    /// `/dev/ttyUSB0:/dev/modem:rw` (permissions from `rwm`, default `rwm`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// `missing` (default), `always` or `never`: see [`PullPolicy`].
    #[serde(default, skip_serializing_if = "PullPolicy::is_default")]
    pub pull_policy: PullPolicy,
    /// The container's resolver; see [`ContainerDns`] for the node's default on
    /// converge's networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<ContainerDns>,
}

fn default_stop_grace_period() -> String {
    DEFAULT_STOP_GRACE_PERIOD.to_string()
}

fn is_false(b: &bool) -> bool {
    !*b
}

pub use converge_core::vocab::Protocol;

/// A container port, optionally published on the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerPort {
    /// Port inside the container (1-65535).
    pub container_port: u16,
    /// Port on the host to publish it on (1-65535); absent: not published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Host address to publish on (IPv4 or IPv6; requires `hostPort`); absent: all
    /// host addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

/// A volume mount: a named volume (source is a name) or a bind mount (source is an
/// absolute host path).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerVolume {
    /// Named volume (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`, created if missing) or absolute host
    /// path to bind-mount.
    pub source: String,
    /// Absolute mount point inside the container.
    pub target: String,
    /// Mount read-only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

impl ContainerVolume {
    /// Whether this is a bind mount of a host path (rather than a named volume).
    pub fn is_bind(&self) -> bool {
        self.source.starts_with('/')
    }
}

/// Resource limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerResources {
    /// CPU limit in cores, e.g. `0.5` or `2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Memory limit: a number of bytes with an optional unit, binary (`Ki`, `Mi`, `Gi`,
    /// `Ti`) or decimal (`K`, `M`, `G`, `T`), e.g. `512Mi`, `1G`. At least `6Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Maximum number of processes/threads in the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

/// Restart policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart.
    No,
    /// Restart when the container exits with a non-zero status.
    OnFailure,
    /// Always restart.
    #[default]
    Always,
    /// Always restart, except after an explicit stop.
    UnlessStopped,
}

/// Health check run inside the container.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    /// Command (argv form, not run through a shell; use `["sh", "-c", "..."]` for one);
    /// exit status 0 means healthy.
    pub command: Vec<String>,
    /// Time between checks, e.g. `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Time after which one check counts as failed, e.g. `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Grace period after start during which failures do not count, e.g. `1m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period: Option<String>,
    /// Consecutive failures before the container is unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

/// Desired run state of a container.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    /// Created and running.
    #[default]
    Running,
    /// Created but stopped.
    Stopped,
}

mod dns;
mod images;
mod settings;
mod validate;
mod values;

pub use dns::*;
pub use images::*;
pub use settings::*;
pub use validate::*;
pub use values::*;
