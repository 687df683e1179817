//! The `containers` section of the document: the containers this node runs, and their
//! semantic validation.

use converge_core::Problems;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

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

/// Transport protocol of a port.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

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

/// Parses a duration such as `500ms`, `10s`, `1m30s` or `2h`: one or more
/// `<integer><unit>` parts with units `ms`, `s`, `m`, `h`, largest unit first.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut last_rank = usize::MAX;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, rank, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 0, 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1, 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 2, 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 3, 1)
        } else {
            return None;
        };
        if rank >= last_rank {
            return None;
        }
        last_rank = rank;
        rest = &rest[len..];
        let factor = u32::try_from(n).ok()?;
        total = total.checked_add(unit.checked_mul(factor)?)?;
    }
    Some(total)
}

/// Parses a memory size (`512Mi`, `1G`, `1048576`) to bytes.
pub fn parse_memory(s: &str) -> Option<u64> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let n: u64 = s[..digits].parse().ok()?;
    let mult: u64 = match &s[digits..] {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Whether `name` is a valid container, network or named-volume name.
pub fn is_object_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Whether `name` is a valid environment variable name (`[A-Za-z_][A-Za-z0-9_]*`).
pub fn is_env_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Whether `name` is a valid local secret name (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`, ≤ 253).
pub fn is_secret_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Whether two host bind addresses (absent: every address) can collide on one port.
/// `0.0.0.0` covers every IPv4 address and `::` every IPv6 address.
pub fn host_ips_overlap(a: Option<IpAddr>, b: Option<IpAddr>) -> bool {
    match (a, b) {
        (None, _) | (_, None) => true,
        (Some(a), Some(b)) => {
            a == b || (a.is_ipv4() == b.is_ipv4() && (a.is_unspecified() || b.is_unspecified()))
        }
    }
}

/// JSON path of the map entry `key` below `parent`: `parent.key` for identifier-like
/// keys, `parent["key"]` otherwise.
pub fn key_path(parent: &str, key: &str) -> String {
    if is_env_name(key) {
        format!("{parent}.{key}")
    } else {
        format!("{parent}[{key:?}]")
    }
}

/// Why `image` is not a well-formed, pinned image reference, if it is not.
pub fn check_image(image: &str) -> Result<(), String> {
    if image.is_empty() {
        return Err("image must not be empty".into());
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("image {image:?} contains whitespace"));
    }
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let ok = d.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if !ok {
            return Err(format!(
                "image digest {d:?} is not sha256:<64 lowercase hex digits>"
            ));
        }
    }
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        let b = t.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !ok {
            return Err(format!("image tag {t:?} is not valid"));
        }
    }
    if tag.is_none() && digest.is_none() {
        return Err(format!("image {image:?} has neither a tag nor a digest"));
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost") {
        let registry = parts.remove(0);
        let (host, port) = match registry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (registry, None),
        };
        let host_ok = converge_core::problems::is_dns_name(host, false) && !host.contains('*');
        let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0));
        if !host_ok || !port_ok {
            return Err(format!(
                "image registry {registry:?} is not a valid host[:port]"
            ));
        }
    }
    for p in &parts {
        let b = p.as_bytes();
        let ok = !b.is_empty()
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
            && b.iter().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-')
            })
            && !p.contains("..");
        if !ok {
            return Err(format!(
                "image repository component {p:?} is not valid (lowercase letters, digits and . _ - only)"
            ));
        }
    }
    Ok(())
}

/// Published host ports seen so far: (protocol, hostPort) to every (hostIp, path).
type Published = BTreeMap<(Protocol, u16), Vec<(Option<IpAddr>, String)>>;

/// Semantic checks of the section; `path` is its JSON path (`$.containers`).
pub fn validate(spec: &[Container], path: &str, problems: &mut Problems) {
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut published = Published::new();
    for (i, c) in spec.iter().enumerate() {
        let cp = format!("{path}[{i}]");
        if !is_object_name(&c.name) {
            problems.push_hint(
                format!("{cp}.name"),
                format!("invalid container name {:?}", c.name),
                "use [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 63 characters",
            );
        } else if let Some(first) = names.insert(&c.name, i) {
            problems.push_hint(
                format!("{cp}.name"),
                format!("duplicate container name {:?}", c.name),
                format!("already used by {path}[{first}]"),
            );
        }
        if let Err(e) = check_image(&c.image) {
            problems.push_hint(
                format!("{cp}.image"),
                e,
                "e.g. docker.io/library/nginx:1.27 or ghcr.io/acme/api@sha256:<64 hex digits>",
            );
        }
        if let Some(cmd) = &c.command {
            if cmd.first().is_some_and(String::is_empty) {
                problems.push(
                    format!("{cp}.command[0]"),
                    "the executable must not be empty",
                );
            }
        }
        for k in c.env.keys() {
            if !is_env_name(k) {
                problems.push_hint(
                    key_path(&format!("{cp}.env"), k),
                    format!("invalid environment variable name {k:?}"),
                    "use [A-Za-z_][A-Za-z0-9_]*",
                );
            }
        }
        for (k, secret) in &c.secret_env {
            let kp = key_path(&format!("{cp}.secretEnv"), k);
            if !is_env_name(k) {
                problems.push_hint(
                    kp.clone(),
                    format!("invalid environment variable name {k:?}"),
                    "use [A-Za-z_][A-Za-z0-9_]*",
                );
            } else if c.env.contains_key(k) {
                problems.push_hint(
                    kp.clone(),
                    format!("{k} is set in both env and secretEnv"),
                    "keep one of them",
                );
            }
            if !is_secret_name(secret) {
                problems.push(kp, format!("invalid secret name {secret:?}"));
            }
        }
        for (j, port) in c.ports.iter().enumerate() {
            validate_port(port, &format!("{cp}.ports[{j}]"), &mut published, problems);
        }
        let mut targets: BTreeMap<&str, usize> = BTreeMap::new();
        for (j, v) in c.volumes.iter().enumerate() {
            let vp = format!("{cp}.volumes[{j}]");
            if v.is_bind() {
                if v.source.contains("/../") || v.source.ends_with("/..") {
                    problems.push(
                        format!("{vp}.source"),
                        format!("bind source {:?} must not contain ..", v.source),
                    );
                }
            } else if !is_object_name(&v.source) {
                problems.push_hint(
                    format!("{vp}.source"),
                    format!("{:?} is neither an absolute host path nor a volume name", v.source),
                    "use an absolute path (/srv/data) for a bind mount, or a name ([a-zA-Z0-9][a-zA-Z0-9_.-]*) for a named volume",
                );
            }
            if !v.target.starts_with('/') {
                problems.push_hint(
                    format!("{vp}.target"),
                    format!("mount target {:?} is not an absolute path", v.target),
                    "e.g. /var/lib/postgresql/data",
                );
            } else if v.target == "/" {
                problems.push(format!("{vp}.target"), "cannot mount over /");
            } else if let Some(first) = targets.insert(v.target.trim_end_matches('/'), j) {
                problems.push_hint(
                    format!("{vp}.target"),
                    format!("{:?} is mounted twice", v.target),
                    format!("also the target of {cp}.volumes[{first}]"),
                );
            }
        }
        if let Some(r) = &c.resources {
            validate_resources(r, &format!("{cp}.resources"), problems);
        }
        if let Some(h) = &c.health_check {
            validate_health_check(h, &format!("{cp}.healthCheck"), problems);
        }
        for k in c.labels.keys() {
            let lp = key_path(&format!("{cp}.labels"), k);
            if k.is_empty() {
                problems.push(lp, "label key must not be empty");
            } else if k.to_ascii_lowercase().starts_with(RESERVED_LABEL_PREFIX) {
                problems.push_hint(
                    lp,
                    format!("label {k:?} uses the reserved prefix {RESERVED_LABEL_PREFIX:?}"),
                    "converge sets labels with this prefix itself; choose another prefix",
                );
            }
        }
        if let Some(n) = &c.network {
            if !is_object_name(n) {
                problems.push(
                    format!("{cp}.network"),
                    format!("invalid network name {n:?}"),
                );
            }
        }
        if let Some(ip) = &c.ip {
            match ip.parse::<IpAddr>() {
                Err(_) => problems.push(format!("{cp}.ip"), format!("not an IP address: {ip:?}")),
                Ok(a) if a.is_unspecified() || a.is_loopback() || a.is_multicast() => problems
                    .push(
                        format!("{cp}.ip"),
                        format!("{a} cannot be a container address"),
                    ),
                Ok(_) if c.network.is_none() => problems.push_hint(
                    format!("{cp}.ip"),
                    "a static ip requires a network",
                    "set network to the name of a user-defined network",
                ),
                Ok(_) => {}
            }
        }
        if parse_duration(&c.stop_grace_period).is_none() {
            problems.push_hint(
                format!("{cp}.stopGracePeriod"),
                format!("invalid duration {:?}", c.stop_grace_period),
                "e.g. 500ms, 10s, 1m30s, 2h",
            );
        }
    }
}

fn validate_port(
    port: &ContainerPort,
    pp: &str,
    published: &mut Published,
    problems: &mut Problems,
) {
    if port.container_port == 0 {
        problems.push(format!("{pp}.containerPort"), "port must be 1-65535");
    }
    let host_ip = match &port.host_ip {
        None => None,
        Some(s) => match s.parse::<IpAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                problems.push(format!("{pp}.hostIp"), format!("not an IP address: {s:?}"));
                return;
            }
        },
    };
    let Some(hp) = port.host_port else {
        if port.host_ip.is_some() {
            problems.push_hint(
                format!("{pp}.hostIp"),
                "hostIp without hostPort publishes nothing",
                "set hostPort, or remove hostIp",
            );
        }
        return;
    };
    if hp == 0 {
        problems.push(format!("{pp}.hostPort"), "port must be 1-65535");
        return;
    }
    let seen = published.entry((port.protocol, hp)).or_default();
    if let Some((_, first)) = seen.iter().find(|(ip, _)| host_ips_overlap(*ip, host_ip)) {
        problems.push_hint(
            format!("{pp}.hostPort"),
            format!(
                "host port {}/{hp} on {} is already published",
                port.protocol.as_str(),
                host_ip.map_or("all addresses".to_string(), |a| a.to_string()),
            ),
            format!("conflicts with {first}.hostPort"),
        );
    } else {
        seen.push((host_ip, pp.to_string()));
    }
}

fn validate_resources(r: &ContainerResources, rp: &str, problems: &mut Problems) {
    if let Some(c) = r.cpus {
        if !c.is_finite() || c <= 0.0 {
            problems.push(format!("{rp}.cpus"), "cpus must be a positive number");
        }
    }
    if let Some(m) = &r.memory {
        match parse_memory(m) {
            None => problems.push_hint(
                format!("{rp}.memory"),
                format!("invalid memory size {m:?}"),
                "a number with an optional unit Ki, Mi, Gi, Ti, K, M, G or T, e.g. 512Mi or 1G",
            ),
            Some(b) if b < 6 << 20 => problems.push_hint(
                format!("{rp}.memory"),
                format!("memory limit {m:?} is below the minimum of 6Mi"),
                "container runtimes refuse limits below 6Mi",
            ),
            Some(_) => {}
        }
    }
    if r.pids == Some(0) {
        problems.push_hint(
            format!("{rp}.pids"),
            "pids limit must be at least 1",
            "omit pids for no limit",
        );
    }
}

fn validate_health_check(h: &HealthCheck, hp: &str, problems: &mut Problems) {
    if h.command.first().is_none_or(String::is_empty) {
        problems.push_hint(
            format!("{hp}.command"),
            "health check command must not be empty",
            "e.g. [\"pg_isready\", \"-U\", \"postgres\"]",
        );
    }
    for (field, value, nonzero) in [
        ("interval", &h.interval, true),
        ("timeout", &h.timeout, true),
        ("startPeriod", &h.start_period, false),
    ] {
        let Some(v) = value else { continue };
        match parse_duration(v) {
            None => problems.push_hint(
                format!("{hp}.{field}"),
                format!("invalid duration {v:?}"),
                "e.g. 500ms, 10s, 1m30s, 2h",
            ),
            Some(d) if nonzero && d.is_zero() => {
                problems.push(format!("{hp}.{field}"), format!("{field} must be positive"))
            }
            Some(_) => {}
        }
    }
    if h.retries == Some(0) {
        problems.push(format!("{hp}.retries"), "retries must be at least 1");
    }
}

/// Names of all containers in the section (for cross-section checks).
pub fn container_names(spec: &[Container]) -> BTreeSet<&str> {
    spec.iter().map(|c| c.name.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> ContainersSpec {
        serde_json::from_value(v).unwrap()
    }

    fn problems(spec: &ContainersSpec) -> Vec<String> {
        let mut p = Problems::default();
        validate(spec, "$.containers", &mut p);
        p.iter().map(|p| p.path.clone()).collect()
    }

    fn good() -> serde_json::Value {
        json!([
            {
                "name": "web",
                "image": "docker.io/library/nginx:1.27",
                "ports": [
                    {"containerPort": 80, "hostPort": 8080},
                    {"containerPort": 53, "hostPort": 53, "protocol": "udp", "hostIp": "10.0.0.1"}
                ],
                "volumes": [{"source": "/srv/www", "target": "/usr/share/nginx/html", "readOnly": true}],
                "env": {"TZ": "UTC"},
                "secretEnv": {"API_TOKEN": "web-api-token"},
                "labels": {"team": "a"},
                "resources": {"cpus": 0.5, "memory": "512Mi", "pids": 256},
                "healthCheck": {"command": ["curl", "-f", "http://localhost/"], "interval": "30s",
                                 "timeout": "5s", "startPeriod": "0s", "retries": 3},
                "network": "apps",
                "ip": "10.88.0.10",
                "stopGracePeriod": "1m30s"
            },
            {
                "name": "db",
                "image": "postgres@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "ports": [{"containerPort": 5432, "hostPort": 8080, "protocol": "udp"}],
                "volumes": [{"source": "pgdata", "target": "/var/lib/postgresql/data"}],
                "restart": "unless-stopped",
                "desiredState": "stopped"
            },
            {
                "name": "cache",
                "image": "registry.internal:5000/cache/redis:7.4-alpine",
                "ports": [{"containerPort": 53, "hostPort": 53, "protocol": "udp", "hostIp": "10.0.0.2"}]
            }
        ])
    }

    #[test]
    fn good_spec_passes_and_defaults_apply() {
        let s = parse(good());
        assert_eq!(problems(&s), Vec::<String>::new());
        assert_eq!(s[1].restart, RestartPolicy::UnlessStopped);
        assert_eq!(s[0].restart, RestartPolicy::Always);
        assert_eq!(s[0].desired_state, ContainerState::Running);
        assert_eq!(s[0].ports[0].protocol, Protocol::Tcp);
        assert_eq!(s[1].stop_grace_period, "10s");
        assert!(!s[1].remove_volumes_on_delete);
        assert!(s[0].volumes[0].is_bind() && !s[1].volumes[0].is_bind());
        // Round trip.
        let back: ContainersSpec =
            serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<ContainersSpec, _> =
            serde_json::from_value(json!([{"name": "a", "imagee": "x:1"}]));
        assert!(r.is_err());
    }

    #[test]
    fn names_and_images() {
        let s = parse(json!([
            {"name": "web", "image": "nginx:1.27"},
            {"name": "web", "image": "nginx:1.27"},
            {"name": "-bad", "image": "nginx:1.27"},
            {"name": "a".repeat(64), "image": "nginx:1.27"},
            {"name": "e1", "image": ""},
            {"name": "e2", "image": "nginx"},
            {"name": "e3", "image": "Nginx:1"},
            {"name": "e4", "image": "nginx@sha256:abc"},
            {"name": "e5", "image": "nginx:bad tag"},
            {"name": "e6", "image": "bad_host:99999/x:1"}
        ]));
        assert_eq!(
            problems(&s),
            vec![
                "$.containers[1].name",
                "$.containers[2].name",
                "$.containers[3].name",
                "$.containers[4].image",
                "$.containers[5].image",
                "$.containers[6].image",
                "$.containers[7].image",
                "$.containers[8].image",
                "$.containers[9].image",
            ]
        );
    }

    #[test]
    fn host_port_conflicts() {
        let s = parse(json!([
            {"name": "a", "image": "x:1", "ports": [
                {"containerPort": 80, "hostPort": 80},
                {"containerPort": 53, "hostPort": 53, "protocol": "udp", "hostIp": "10.0.0.1"},
                {"containerPort": 443, "hostPort": 443, "hostIp": "::1"}
            ]},
            {"name": "b", "image": "x:1", "ports": [
                {"containerPort": 80, "hostPort": 80, "hostIp": "10.0.0.9"},
                {"containerPort": 53, "hostPort": 53, "protocol": "udp", "hostIp": "10.0.0.2"},
                {"containerPort": 53, "hostPort": 53, "protocol": "tcp", "hostIp": "10.0.0.1"},
                {"containerPort": 5353, "hostPort": 53, "protocol": "udp", "hostIp": "0.0.0.0"},
                {"containerPort": 443, "hostPort": 443, "hostIp": "10.0.0.1"}
            ]}
        ]));
        let mut p = Problems::default();
        validate(&s, "$.containers", &mut p);
        let got: Vec<_> = p
            .iter()
            .map(|p| (p.path.as_str(), p.hint.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "$.containers[1].ports[0].hostPort",
                    Some("conflicts with $.containers[0].ports[0].hostPort")
                ),
                (
                    "$.containers[1].ports[3].hostPort",
                    Some("conflicts with $.containers[0].ports[1].hostPort")
                ),
            ]
        );
    }

    #[test]
    fn port_rules() {
        let s = parse(json!([
            {"name": "a", "image": "x:1", "ports": [
                {"containerPort": 0},
                {"containerPort": 80, "hostPort": 0},
                {"containerPort": 80, "hostIp": "10.0.0.1"},
                {"containerPort": 80, "hostPort": 81, "hostIp": "10.0.0.300"}
            ]}
        ]));
        assert_eq!(
            problems(&s),
            vec![
                "$.containers[0].ports[0].containerPort",
                "$.containers[0].ports[1].hostPort",
                "$.containers[0].ports[2].hostIp",
                "$.containers[0].ports[3].hostIp",
            ]
        );
    }

    #[test]
    fn env_volumes_labels_network() {
        let s = parse(json!([
            {"name": "a", "image": "x:1",
             "env": {"1BAD": "x", "OK": "y"},
             "secretEnv": {"OK": "tok", "TOKEN": "bad secret"},
             "volumes": [
                {"source": "./data", "target": "/data"},
                {"source": "data", "target": "relative"},
                {"source": "/srv/a", "target": "/data/"}
             ],
             "labels": {"converge.owner": "me", "Converge.x": "y", "app": "a"},
             "ip": "10.88.0.5"
            },
            {"name": "b", "image": "x:1", "network": "bad net", "ip": "nope"}
        ]));
        assert_eq!(
            problems(&s),
            vec![
                "$.containers[0].env[\"1BAD\"]",
                "$.containers[0].secretEnv.OK",
                "$.containers[0].secretEnv.TOKEN",
                "$.containers[0].volumes[0].source",
                "$.containers[0].volumes[1].target",
                "$.containers[0].volumes[2].target",
                "$.containers[0].labels[\"Converge.x\"]",
                "$.containers[0].labels[\"converge.owner\"]",
                "$.containers[0].ip",
                "$.containers[1].network",
                "$.containers[1].ip",
            ]
        );
    }

    #[test]
    fn resources_health_durations() {
        let s = parse(json!([
            {"name": "a", "image": "x:1",
             "resources": {"cpus": 0.0, "memory": "512MB", "pids": 0},
             "healthCheck": {"command": [], "interval": "0s", "timeout": "5 s",
                             "startPeriod": "1h1h", "retries": 0},
             "stopGracePeriod": "10"
            },
            {"name": "b", "image": "x:1", "resources": {"memory": "1Mi"}}
        ]));
        assert_eq!(
            problems(&s),
            vec![
                "$.containers[0].resources.cpus",
                "$.containers[0].resources.memory",
                "$.containers[0].resources.pids",
                "$.containers[0].healthCheck.command",
                "$.containers[0].healthCheck.interval",
                "$.containers[0].healthCheck.timeout",
                "$.containers[0].healthCheck.startPeriod",
                "$.containers[0].healthCheck.retries",
                "$.containers[0].stopGracePeriod",
                "$.containers[1].resources.memory",
            ]
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_duration("1h2m3s4ms"),
            Some(Duration::from_millis(3_723_004))
        );
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        for bad in [
            "", "10", "s", "1x", "-1s", "1s1m", "1m1m", "1.5s", " 1s", "1d",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512Mi"), Some(512 << 20));
        assert_eq!(parse_memory("1G"), Some(1_000_000_000));
        assert_eq!(parse_memory("1048576"), Some(1 << 20));
        for bad in ["", "Mi", "1.5G", "1GB", "-1", "1 G", "1gi"] {
            assert_eq!(parse_memory(bad), None, "{bad}");
        }
    }

    #[test]
    fn ip_overlap() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert!(host_ips_overlap(None, ip("10.0.0.1")));
        assert!(host_ips_overlap(ip("0.0.0.0"), ip("10.0.0.1")));
        assert!(!host_ips_overlap(ip("0.0.0.0"), ip("fd00::1")));
        assert!(host_ips_overlap(ip("::"), ip("fd00::1")));
        assert!(!host_ips_overlap(ip("10.0.0.2"), ip("10.0.0.1")));
    }
}
