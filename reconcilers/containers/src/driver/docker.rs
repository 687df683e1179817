//! Docker driver: [`ContainerRuntime`] over the Docker Engine API (bollard) on a unix
//! socket. The API version is negotiated on first use (Debian's dockerd 20.10 speaks 1.41).

mod convert;
mod events;

use convert::*;
use events::*;

use crate::driver::ContainerSettings;
use crate::driver::{disk_usage, DiskUsage, ImageInfo, PullProgress};
use crate::driver::{
    inspect_all, port_bindings, repo_digests, ContainerRuntime, CreateSpec, Health, LocalImage,
    Mount, NetworkCreate, RunState, RuntimeContainer, RuntimeNetwork, LABEL_MANAGED, LABEL_NAME,
    LABEL_NODE,
};
use crate::registry::RegistryAuth;
use crate::spec::LogDriver;
use bollard::container::{
    Config as ContainerConfig, CreateContainerOptions, ListContainersOptions,
    RemoveContainerOptions, RenameContainerOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::errors::Error as BollardError;
use bollard::image::{CreateImageOptions, ListImagesOptions, RemoveImageOptions};
use bollard::models::{
    ContainerInspectResponse, ContainerStateStatusEnum, EndpointIpamConfig, EndpointSettings,
    EventMessage, HealthConfig, HealthStatusEnum, HostConfig, Ipam, IpamConfig, MountPointTypeEnum,
    MountTypeEnum, PortBinding as DockerPortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::models::{DeviceMapping, HostConfigLogConfig, ResourcesUlimits};
use bollard::network::{CreateNetworkOptions, ListNetworksOptions};
use bollard::system::EventsOptions;
use converge_core::{DriverError, HostEvent};
use futures::stream::{BoxStream, StreamExt};
use std::collections::{BTreeSet, HashMap};
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

/// The Docker runtime. Cheap to clone; connects lazily, so it can be built before the
/// daemon is up (a failed connection is retried on the next call).
#[derive(Clone)]
pub struct Docker {
    inner: Arc<Inner>,
}

struct Inner {
    socket: PathBuf,
    client: OnceCell<bollard::Docker>,
    /// `DockerRootDir`, read once.
    root: OnceCell<PathBuf>,
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
                root: OnceCell::new(),
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

    /// Pulls through `POST /images/create`, feeding `progress` from the stream; the
    /// error is the daemon's message. Also Podman's pull (its Docker-compatible
    /// endpoint reports bytes per layer, libpod's only the blobs' names).
    pub(crate) async fn pull_stream(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        progress: &PullProgress,
    ) -> Result<(), String> {
        let client = self.client().await.map_err(|e| e.to_string())?;
        let credentials = auth.map(|a| bollard::auth::DockerCredentials {
            username: Some(a.username.clone()),
            password: Some(a.password.to_string()),
            serveraddress: Some(a.server.clone()),
            ..Default::default()
        });
        let mut stream = client.create_image(
            Some(CreateImageOptions {
                from_image: image,
                ..Default::default()
            }),
            None,
            credentials,
        );
        // Errors can arrive mid-stream (bollard turns an `error` message into Err).
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| describe(&e))?;
            if let Some(status) = info.status.as_deref() {
                let detail = info.progress_detail.as_ref();
                progress.update(
                    info.id.as_deref(),
                    status,
                    detail.and_then(|d| d.current),
                    detail.and_then(|d| d.total),
                );
                debug!(image, status, id = info.id, "pull");
            }
        }
        Ok(())
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

    async fn image(&self, image: &str) -> Result<Option<LocalImage>, DriverError> {
        let client = self.client().await?;
        match client.inspect_image(image).await {
            Ok(i) => Ok(i.id.map(|id| LocalImage {
                id,
                digests: repo_digests(image, i.repo_digests.iter().flatten()),
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(api_failed("image inspect", image, e)),
        }
    }

    async fn pull(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        progress: &PullProgress,
    ) -> Result<(), DriverError> {
        self.pull_stream(image, auth, progress)
            .await
            .map_err(|e| failed("pull", image, e))
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, DriverError> {
        let listed = self
            .client()
            .await?
            .list_images(Some(ListImagesOptions::<String> {
                all: false,
                ..Default::default()
            }))
            .await
            .map_err(|e| api_failed("image list", "", e))?;
        Ok(listed
            .into_iter()
            .map(|i| ImageInfo {
                id: i.id,
                tags: i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect(),
                digests: i
                    .repo_digests
                    .into_iter()
                    .filter(|d| d != "<none>@<none>")
                    .collect(),
                size: u64::try_from(i.size).unwrap_or(0),
                created: i.created,
                // -1 unless asked for (and then costly): the container list decides.
                in_use: i.containers > 0,
            })
            .collect())
    }

    async fn image_users(&self) -> Result<BTreeSet<String>, DriverError> {
        let listed = self
            .client()
            .await?
            .list_containers(Some(ListContainersOptions::<String> {
                all: true,
                ..Default::default()
            }))
            .await
            .map_err(|e| api_failed("list", "", e))?;
        Ok(listed.into_iter().filter_map(|c| c.image_id).collect())
    }

    async fn remove_image(&self, image: &ImageInfo) -> Result<(), DriverError> {
        let client = self.client().await?;
        // Names first: removing an id that still has several names needs `force`,
        // which would also take an image a stopped container uses.
        for name in image.tags.iter().chain(&image.digests).chain([&image.id]) {
            let opts = RemoveImageOptions {
                force: false,
                noprune: false,
            };
            match client.remove_image(name, Some(opts), None).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(api_failed("image remove", name, e)),
            }
        }
        Ok(())
    }

    async fn image_disk(&self) -> Result<DiskUsage, DriverError> {
        let root = self
            .inner
            .root
            .get_or_try_init(|| async {
                let info = self
                    .client()
                    .await?
                    .info()
                    .await
                    .map_err(|e| api_failed("info", "", e))?;
                info.docker_root_dir
                    .map(PathBuf::from)
                    .ok_or_else(|| failed("info", "", "no DockerRootDir"))
            })
            .await?
            .clone();
        converge_core::blocking("statvfs", move || disk_usage(&root)).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_up_to_seconds() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(10)), 10);
    }
}
