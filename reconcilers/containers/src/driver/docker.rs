//! Docker driver: [`ContainerRuntime`] over the Docker Engine API (bollard) on a unix
//! socket. The API version is negotiated on first use (Debian's dockerd 20.10 speaks 1.41).

use crate::driver::{
    inspect_all, port_bindings, ContainerRuntime, CreateSpec, Health, Mount, NetworkCreate,
    RunState, RuntimeContainer, RuntimeNetwork, LABEL_MANAGED, LABEL_NAME, LABEL_NODE,
};
use bollard::container::{
    Config as ContainerConfig, CreateContainerOptions, ListContainersOptions,
    RemoveContainerOptions, RenameContainerOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::errors::Error as BollardError;
use bollard::image::CreateImageOptions;
use bollard::models::{
    ContainerInspectResponse, ContainerStateStatusEnum, EndpointIpamConfig, EndpointSettings,
    EventMessage, HealthConfig, HealthStatusEnum, HostConfig, Ipam, IpamConfig, MountPointTypeEnum,
    MountTypeEnum, PortBinding as DockerPortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::network::{CreateNetworkOptions, ListNetworksOptions};
use bollard::system::EventsOptions;
use converge_core::{DriverError, HostEvent};
use futures::stream::{BoxStream, StreamExt};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;
use tracing::{debug, warn};

/// Docker's default API socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Per-request bound inside bollard (response headers only; streams are unbounded).
/// Generous on purpose: the reconciler bounds every call itself, and a stop only answers
/// once the grace period has run out.
const REQUEST_TIMEOUT_SECS: u64 = 600;

/// Pause before the event stream reconnects after the daemon went away.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Container events that change what `observe` would see. Exec events (one per health
/// probe) are left out on purpose: they would trigger a pass every probe interval.
const WATCHED_EVENTS: &[&str] = &[
    "create",
    "start",
    "die",
    "destroy",
    "health_status",
    "oom",
    "pause",
    "unpause",
    "rename",
];

/// The Docker runtime. Cheap to clone; connects lazily, so it can be built before the
/// daemon is up (a failed connection is retried on the next call).
#[derive(Clone)]
pub struct Docker {
    inner: Arc<Inner>,
}

struct Inner {
    socket: PathBuf,
    client: OnceCell<bollard::Docker>,
}

impl std::fmt::Debug for Docker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Docker")
            .field("socket", &self.inner.socket)
            .finish_non_exhaustive()
    }
}

fn failed(op: &str, id: &str, e: impl std::fmt::Display) -> DriverError {
    DriverError::Failed(format!("docker {op} {id}: {e}"))
}

/// An API error as one line: the daemon's own message where there is one (bollard's
/// `Display` drops it for stream errors), else the error with its sources.
fn describe(e: &BollardError) -> String {
    match e {
        BollardError::DockerStreamError { error } => error.clone(),
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => format!("{} (HTTP {status_code})", message.trim()),
        _ => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

fn api_failed(op: &str, id: &str, e: BollardError) -> DriverError {
    failed(op, id, describe(&e))
}

fn status_code(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn is_not_found(e: &BollardError) -> bool {
    status_code(e) == Some(404)
}

/// Whole seconds, rounded up so a sub-second grace never becomes an immediate SIGKILL.
fn ceil_secs(d: Duration) -> i64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl Inner {
    async fn client(&self) -> Result<&bollard::Docker, DriverError> {
        self.client
            .get_or_try_init(|| async {
                let socket = self.socket.to_string_lossy();
                let client = bollard::Docker::connect_with_unix(
                    &socket,
                    REQUEST_TIMEOUT_SECS,
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(|e| api_failed("connect", &socket, e))?;
                // Lowers the client's version to the daemon's when that is older; clones
                // share the version, so this settles it for every later request.
                client
                    .negotiate_version()
                    .await
                    .map_err(|e| api_failed("connect", &socket, e))
            })
            .await
    }
}

impl Docker {
    /// A driver for the daemon listening on `socket` (e.g. [`DEFAULT_SOCKET`]).
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                socket: socket.into(),
                client: OnceCell::new(),
            }),
        }
    }

    /// The API socket this driver talks to.
    pub fn socket(&self) -> &Path {
        &self.inner.socket
    }

    /// Checks that the daemon answers (and negotiates the API version).
    pub async fn ping(&self) -> Result<(), DriverError> {
        let socket = self.inner.socket.to_string_lossy();
        let client = self.inner.client().await?;
        client
            .ping()
            .await
            .map(drop)
            .map_err(|e| api_failed("ping", &socket, e))
    }

    async fn client(&self) -> Result<&bollard::Docker, DriverError> {
        self.inner.client().await
    }
}

/// Translates a [`CreateSpec`] into the Engine API's create body.
fn container_config(spec: &CreateSpec) -> Result<ContainerConfig<String>, DriverError> {
    let bad = |what: String| failed("create", &spec.name, what);

    let mut exposed: HashMap<String, HashMap<(), ()>> = HashMap::new();
    let mut bindings: HashMap<String, Option<Vec<DockerPortBinding>>> = HashMap::new();
    for p in &spec.ports {
        let key = format!("{}/{}", p.container_port, p.protocol.as_str());
        exposed.insert(key.clone(), HashMap::new());
        if let Some(host_port) = p.host_port {
            let binding = DockerPortBinding {
                // Empty means all host addresses.
                host_ip: Some(p.host_ip.clone().unwrap_or_default()),
                host_port: Some(host_port.to_string()),
            };
            bindings
                .entry(key)
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(binding);
        }
    }

    // Mounts (not Binds) so a missing bind source is an error instead of an empty
    // directory docker would create; named volumes are created on demand.
    let mounts = spec
        .volumes
        .iter()
        .map(|v| bollard::models::Mount {
            target: Some(v.target.clone()),
            source: Some(v.source.clone()),
            typ: Some(if v.is_bind() {
                MountTypeEnum::BIND
            } else {
                MountTypeEnum::VOLUME
            }),
            read_only: Some(v.read_only),
            ..Default::default()
        })
        .collect::<Vec<_>>();

    let nano_cpus = match spec.cpus {
        Some(c) if c.is_finite() && c > 0.0 => Some((c * 1e9).round() as i64),
        Some(c) => return Err(bad(format!("invalid cpu limit {c}"))),
        None => None,
    };
    let memory = spec
        .memory
        .map(i64::try_from)
        .transpose()
        .map_err(|_| bad("memory limit too large".into()))?;

    let host_config = HostConfig {
        port_bindings: (!bindings.is_empty()).then_some(bindings),
        mounts: (!mounts.is_empty()).then_some(mounts),
        nano_cpus,
        memory,
        pids_limit: spec.pids.map(i64::from),
        // converge restarts containers itself (with crash-loop back-off).
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        network_mode: spec.network.clone(),
        ..Default::default()
    };

    let networking_config = match (&spec.network, spec.ip) {
        (Some(network), ip) => {
            let ipam_config = ip.map(|ip| match ip {
                IpAddr::V4(v4) => EndpointIpamConfig {
                    ipv4_address: Some(v4.to_string()),
                    ..Default::default()
                },
                IpAddr::V6(v6) => EndpointIpamConfig {
                    ipv6_address: Some(v6.to_string()),
                    ..Default::default()
                },
            });
            Some(bollard::container::NetworkingConfig {
                endpoints_config: HashMap::from([(
                    network.clone(),
                    EndpointSettings {
                        ipam_config,
                        ..Default::default()
                    },
                )]),
            })
        }
        (None, Some(_)) => {
            return Err(bad(
                "a static ip needs a network (docker's default bridge has no static ips)".into(),
            ))
        }
        (None, None) => None,
    };

    let healthcheck = spec.health.as_ref().map(|h| HealthConfig {
        test: Some(
            std::iter::once("CMD".to_string())
                .chain(h.command.iter().cloned())
                .collect(),
        ),
        interval: Some(nanos(h.interval)),
        timeout: Some(nanos(h.timeout)),
        start_period: Some(nanos(h.start_period)),
        retries: Some(i64::from(h.retries)),
        start_interval: None,
    });

    Ok(ContainerConfig {
        image: Some(spec.image.clone()),
        entrypoint: spec.command.clone(),
        cmd: spec.args.clone(),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(
            spec.labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        healthcheck,
        stop_timeout: Some(ceil_secs(spec.stop_grace)),
        host_config: Some(host_config),
        networking_config,
        ..Default::default()
    })
}

fn run_state(s: Option<&ContainerStateStatusEnum>) -> RunState {
    match s {
        Some(ContainerStateStatusEnum::CREATED) => RunState::Created,
        Some(ContainerStateStatusEnum::RUNNING) => RunState::Running,
        Some(ContainerStateStatusEnum::PAUSED) => RunState::Paused,
        Some(ContainerStateStatusEnum::RESTARTING) => RunState::Restarting,
        Some(ContainerStateStatusEnum::EXITED) => RunState::Exited,
        _ => RunState::Other,
    }
}

fn health(s: Option<&HealthStatusEnum>) -> Option<Health> {
    match s? {
        HealthStatusEnum::STARTING => Some(Health::Starting),
        HealthStatusEnum::HEALTHY => Some(Health::Healthy),
        HealthStatusEnum::UNHEALTHY => Some(Health::Unhealthy),
        HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
    }
}

/// Builds the driver's view from an inspect response.
fn runtime_container(c: ContainerInspectResponse) -> RuntimeContainer {
    let config = c.config.unwrap_or_default();
    let host = c.host_config.unwrap_or_default();
    let state = c.state.unwrap_or_default();
    let run = run_state(state.status.as_ref());

    let mut networks: Vec<(String, EndpointSettings)> = c
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .collect();
    networks.sort_by(|a, b| a.0.cmp(&b.0));
    let addresses = networks
        .iter()
        .flat_map(|(_, ep)| [&ep.ip_address, &ep.global_ipv6_address])
        .filter_map(|a| a.as_deref()?.parse::<IpAddr>().ok())
        .collect();

    // Published ports as configured (HostConfig), so a stopped container reports the
    // same ports as a running one.
    let ports = port_bindings(host.port_bindings.unwrap_or_default(), |b| {
        (b.host_ip.as_deref(), b.host_port.as_deref())
    });

    let mut mounts: Vec<Mount> = c
        .mounts
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| {
            let source = match m.typ {
                Some(MountPointTypeEnum::VOLUME) => m.name?,
                _ => m.source?,
            };
            Some(Mount {
                source,
                target: m.destination?,
                read_only: !m.rw.unwrap_or(true),
            })
        })
        .collect();
    mounts.sort();

    RuntimeContainer {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        image: config.image.unwrap_or_default(),
        image_id: c.image.unwrap_or_default(),
        state: run,
        // Docker keeps the last exit code around while running; only report it once
        // the container is down.
        exit_code: match state.status {
            Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD) => {
                state.exit_code
            }
            _ => None,
        },
        health: health(state.health.as_ref().and_then(|h| h.status.as_ref())),
        addresses,
        ports,
        mounts,
        memory: host.memory.filter(|m| *m > 0).map(|m| m as u64),
        pids_limit: host
            .pids_limit
            .filter(|p| *p > 0)
            .and_then(|p| u32::try_from(p).ok()),
    }
}

impl ContainerRuntime for Docker {
    fn kind(&self) -> &'static str {
        "docker"
    }

    async fn list_managed(&self, node: &str) -> Result<Vec<RuntimeContainer>, DriverError> {
        let client = self.client().await?;
        // Several label filters are ANDed by the daemon.
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_NODE}={node}"),
            ],
        )]);
        let list = client
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters,
                ..Default::default()
            }))
            .await
            .map_err(|e| api_failed("list", node, e))?;
        let ids = list.into_iter().filter_map(|summary| summary.id).collect();
        inspect_all(ids, |id| async move { self.inspect(&id).await }).await
    }

    async fn image_id(&self, image: &str) -> Result<Option<String>, DriverError> {
        let client = self.client().await?;
        match client.inspect_image(image).await {
            Ok(i) => Ok(i.id),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(api_failed("image inspect", image, e)),
        }
    }

    async fn pull(&self, image: &str) -> Result<(), DriverError> {
        let client = self.client().await?;
        let mut progress = client.create_image(
            Some(CreateImageOptions {
                from_image: image,
                ..Default::default()
            }),
            None,
            None,
        );
        // Errors can arrive mid-stream (bollard turns an `error` message into Err).
        while let Some(item) = progress.next().await {
            let info = item.map_err(|e| api_failed("pull", image, e))?;
            if let Some(status) = info.status {
                debug!(image, status, progress = info.progress, "docker pull");
            }
        }
        Ok(())
    }

    async fn create(&self, spec: &CreateSpec) -> Result<String, DriverError> {
        let client = self.client().await?;
        let config = container_config(spec)?;
        let created = client
            .create_container(
                Some(CreateContainerOptions {
                    name: spec.name.as_str(),
                    platform: None,
                }),
                config,
            )
            .await
            .map_err(|e| api_failed("create", &spec.name, e))?;
        for w in created.warnings {
            warn!(container = %spec.name, warning = %w, "docker create");
        }
        Ok(created.id)
    }

    async fn start(&self, id: &str) -> Result<(), DriverError> {
        // 304 (already running) is success in bollard.
        self.client()
            .await?
            .start_container(id, None::<StartContainerOptions<String>>)
            .await
            .map_err(|e| api_failed("start", id, e))
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        let t = ceil_secs(grace);
        match self
            .client()
            .await?
            .stop_container(id, Some(StopContainerOptions { t }))
            .await
        {
            // 304 (already stopped) is success in bollard; a missing container is not
            // running either.
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(api_failed("stop", id, e)),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), DriverError> {
        match self
            .client()
            .await?
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    // Named volumes stay unless the document asks (remove_volume).
                    v: false,
                    link: false,
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(api_failed("remove", id, e)),
        }
    }

    async fn rename(&self, id: &str, new_name: &str) -> Result<(), DriverError> {
        self.client()
            .await?
            .rename_container(id, RenameContainerOptions { name: new_name })
            .await
            .map_err(|e| api_failed("rename", id, e))
    }

    async fn remove_volume(&self, name: &str) -> Result<(), DriverError> {
        match self.client().await?.remove_volume(name, None).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(api_failed("volume remove", name, e)),
        }
    }

    async fn list_networks(&self) -> Result<Vec<RuntimeNetwork>, DriverError> {
        let listed = self
            .client()
            .await?
            .list_networks(None::<ListNetworksOptions<String>>)
            .await
            .map_err(|e| api_failed("network list", "", e))?;
        Ok(listed
            .into_iter()
            .filter_map(|n| {
                Some(RuntimeNetwork {
                    name: n.name?,
                    labels: n.labels.unwrap_or_default().into_iter().collect(),
                    subnets: n
                        .ipam
                        .and_then(|i| i.config)
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|c| Some((c.subnet?, c.gateway)))
                        .collect(),
                })
            })
            .collect())
    }

    async fn network_users(&self, network: &str) -> Result<Vec<String>, DriverError> {
        let filters = HashMap::from([("network".to_string(), vec![network.to_string()])]);
        let listed = self
            .client()
            .await?
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters,
                ..Default::default()
            }))
            .await
            .map_err(|e| api_failed("list", network, e))?;
        Ok(listed
            .into_iter()
            .filter_map(|c| c.names?.into_iter().next())
            .map(|n| n.trim_start_matches('/').to_string())
            .collect())
    }

    async fn create_network(&self, spec: &NetworkCreate) -> Result<(), DriverError> {
        let config = spec
            .subnets
            .iter()
            .map(|(net, gw)| IpamConfig {
                subnet: Some(net.to_string()),
                gateway: Some(gw.to_string()),
                ..Default::default()
            })
            .collect();
        let opts = CreateNetworkOptions {
            name: spec.name.clone(),
            check_duplicate: true,
            driver: "bridge".to_string(),
            ipam: Ipam {
                config: Some(config),
                ..Default::default()
            },
            enable_ipv6: spec.subnets.iter().any(|(net, _)| net.addr().is_ipv6()),
            labels: spec.labels.clone().into_iter().collect(),
            ..Default::default()
        };
        self.client()
            .await?
            .create_network(opts)
            .await
            .map(drop)
            .map_err(|e| api_failed("network create", &spec.name, e))
    }

    async fn remove_network(&self, name: &str) -> Result<(), DriverError> {
        match self.client().await?.remove_network(name).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(api_failed("network remove", name, e)),
        }
    }

    async fn inspect(&self, id: &str) -> Result<Option<RuntimeContainer>, DriverError> {
        match self.client().await?.inspect_container(id, None).await {
            Ok(c) => Ok(Some(runtime_container(c))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(api_failed("inspect", id, e)),
        }
    }

    fn describe(&self) -> String {
        format!("Docker at {}", self.inner.socket.display())
    }

    fn events(&self) -> BoxStream<'static, HostEvent> {
        let inner = self.inner.clone();
        futures::stream::unfold(EventState::Connect { missed: false }, move |state| {
            let inner = inner.clone();
            async move { Some(next_event(&inner, state).await) }
        })
        .boxed()
    }
}

/// The host event for one Docker event: the container's document name and the action.
fn event_of(ev: EventMessage) -> HostEvent {
    let actor = ev.actor.unwrap_or_default();
    let name = actor
        .attributes
        .and_then(|mut a| a.remove(LABEL_NAME))
        .or(actor.id.map(|id| id.chars().take(12).collect()))
        .unwrap_or_default();
    HostEvent(format!(
        "container {name} {}",
        ev.action.unwrap_or_default()
    ))
}

type EventStream = BoxStream<'static, Result<EventMessage, BollardError>>;

enum EventState {
    /// Not subscribed; `missed` when events may have been lost since the last stream.
    Connect {
        missed: bool,
    },
    Open(EventStream),
}

/// Waits for the next ping, (re)subscribing as needed; never gives up.
async fn next_event(inner: &Inner, mut state: EventState) -> (HostEvent, EventState) {
    loop {
        state = match state {
            EventState::Connect { missed } => match subscribe(inner).await {
                Ok(stream) if missed => {
                    // Something may have changed while we were away: one ping to resync.
                    let reconnected = HostEvent("docker events reconnected".into());
                    return (reconnected, EventState::Open(stream));
                }
                Ok(stream) => EventState::Open(stream),
                Err(e) => {
                    debug!(error = %e, "docker events: daemon unreachable, retrying");
                    tokio::time::sleep(RECONNECT_DELAY).await;
                    EventState::Connect { missed: true }
                }
            },
            EventState::Open(mut stream) => match stream.next().await {
                Some(Ok(ev)) => return (event_of(ev), EventState::Open(stream)),
                Some(Err(e)) => {
                    warn!(error = %e, "docker events: stream failed, reconnecting");
                    tokio::time::sleep(RECONNECT_DELAY).await;
                    EventState::Connect { missed: true }
                }
                None => {
                    debug!("docker events: stream ended, reconnecting");
                    tokio::time::sleep(RECONNECT_DELAY).await;
                    EventState::Connect { missed: true }
                }
            },
        };
    }
}

/// Opens a filtered event stream. The ping first makes "connected" observable: bollard's
/// stream only reports a dead socket when polled.
async fn subscribe(inner: &Inner) -> Result<EventStream, DriverError> {
    let socket = inner.socket.to_string_lossy();
    let client = inner.client().await?;
    client
        .ping()
        .await
        .map_err(|e| api_failed("events", &socket, e))?;
    let filters: HashMap<String, Vec<String>> = HashMap::from([
        ("type".into(), vec!["container".into()]),
        ("label".into(), vec![format!("{LABEL_MANAGED}=true")]),
        (
            "event".into(),
            WATCHED_EVENTS.iter().map(|e| e.to_string()).collect(),
        ),
    ]);
    Ok(client
        .events(Some(EventsOptions {
            since: None,
            until: None,
            filters,
        }))
        .boxed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::sample_create_spec as spec;

    #[test]
    fn create_body_maps_every_field() {
        let c = container_config(&spec()).unwrap();
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["Entrypoint"], serde_json::json!(["httpd"]));
        assert_eq!(v["Cmd"], serde_json::json!(["-f"]));
        assert_eq!(v["Env"], serde_json::json!(["A=1"]));
        assert_eq!(v["StopTimeout"], 2);
        assert!(v["ExposedPorts"].get("53/udp").is_some());
        let hc = &v["HostConfig"];
        assert_eq!(hc["NanoCpus"], 500_000_000);
        assert_eq!(hc["Memory"], 64 << 20);
        assert_eq!(hc["PidsLimit"], 100);
        assert_eq!(hc["RestartPolicy"]["Name"], "no");
        assert_eq!(
            hc["PortBindings"]["8080/tcp"],
            serde_json::json!([
                {"HostIp": "", "HostPort": "18080"},
                {"HostIp": "127.0.0.1", "HostPort": "18081"}
            ])
        );
        assert!(hc["PortBindings"].get("53/udp").is_none());
        assert_eq!(hc["Mounts"][0]["Type"], "volume");
        assert_eq!(hc["Mounts"][1]["Type"], "bind");
        assert_eq!(hc["Mounts"][1]["ReadOnly"], true);
        assert_eq!(v["Healthcheck"]["Test"], serde_json::json!(["CMD", "true"]));
        assert_eq!(v["Healthcheck"]["Interval"], 500_000_000);
        assert!(v.get("NetworkingConfig").is_none());
    }

    #[test]
    fn static_ip_goes_to_the_endpoint() {
        let mut s = spec();
        s.network = Some("net1".into());
        s.ip = Some("10.5.0.7".parse().unwrap());
        let v = serde_json::to_value(container_config(&s).unwrap()).unwrap();
        assert_eq!(v["HostConfig"]["NetworkMode"], "net1");
        assert_eq!(
            v["NetworkingConfig"]["EndpointsConfig"]["net1"]["IPAMConfig"]["IPv4Address"],
            "10.5.0.7"
        );
        s.network = None;
        assert!(container_config(&s).is_err());
    }

    #[test]
    fn durations_round_up_to_seconds() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(10)), 10);
    }
}
