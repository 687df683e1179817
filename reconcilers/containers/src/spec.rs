//! The `containers` section of the document: the containers this node runs, and their
//! semantic validation.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The containers this node runs. Absent section: converge leaves containers it created
/// earlier alone. Present: exactly these containers exist; any other container converge
/// created is removed. Containers converge did not create are never touched.
pub type ContainersSpec = Vec<Container>;

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
    /// Overrides the image's entrypoint (argv form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Overrides the image's default arguments (argv form).
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
    /// Name of the container network to attach to; absent: the runtime's default network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Static address on `network` (requires `network`); absent: assigned by the runtime.
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

mod validate;
mod values;

pub use validate::*;
pub use values::*;
