//! Podman driver: [`ContainerRuntime`] over the libpod REST API (podman-api) on a unix
//! socket (`podman system service`).
//!
//! What differs from Docker, or from what podman-api offers, is handled here:
//! - Podman schedules health checks with systemd timers. On a host without systemd
//!   (containers, CI machines, the test sandbox) nothing would ever run them and a
//!   container would stay `starting` forever, so the driver then runs them itself over
//!   the API (`/healthcheck`) at the container's interval while it is running.
//! - Podman emits `health_status` on every probe, not only on a change: the event stream
//!   re-inspects the container and pings only when its health actually changed.
//! - `stop` sends the stop signal and SIGKILLs after the grace itself: podman-api 0.10
//!   spells the stop endpoint's `timeout` parameter `Timeout`, which libpod ignores.
//! - `create` posts a body built here (`raw`): podman-api 0.10's builder writes
//!   `log_configuration` in Docker's shape, which libpod ignores.

mod convert;
mod events;
mod health;
mod raw;

use convert::*;
use events::*;
use health::*;

use crate::driver::{disk_usage, DiskUsage, ImageInfo, PullProgress};
use crate::driver::{
    inspect_all, port_bindings, repo_digests, ContainerRuntime, CreateSpec, Health, LocalImage,
    Mount, NetworkCreate, RunState, RuntimeContainer, RuntimeNetwork, LABEL_MANAGED, LABEL_NAME,
    LABEL_NODE,
};
use crate::driver::{ContainerSettings, LogSpec};
use crate::registry::RegistryAuth;
use crate::spec::LogDriver;
use converge_core::{DriverError, HostEvent};
use futures::channel::mpsc;
use futures::stream::{BoxStream, StreamExt};
use podman_api::models::{
    ContainerMount, InspectContainerData, LinuxCpu, LinuxMemory, LinuxPids, LinuxResources,
    NamedVolume, Namespace, PortMapping, Schema2HealthConfig, Subnet,
};
use podman_api::models::{LinuxDevice, PosixRlimit};
use podman_api::opts::ContainerCreateOptsBuilder;
use podman_api::opts::{
    ContainerCreateOpts, ContainerDeleteOpts, ContainerListFilter, ContainerListOpts,
    ContainerRestartPolicy, EventsOpts, ImageListOpts, NetworkCreateOpts, NetworkListOpts,
};
use podman_api::Error as PodmanError;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, warn};

/// Podman's default rootful API socket.
pub const DEFAULT_SOCKET: &str = "/run/podman/podman.sock";

/// Annotation recording the image reference exactly as given at create time: libpod's
/// inspect only reports the resolved name (`busybox` → `docker.io/library/busybox:latest`).
const IMAGE_ANNOTATION: &str = "converge.image";

/// Pause before the event stream reconnects after the service went away.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// How often `stop` looks whether the container is down yet.
const STOP_POLL: Duration = Duration::from_millis(100);

/// How long `stop` waits for a container to go down after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// Podman's default health-check interval (used when the container's config has none).
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(30);

/// The Podman runtime. Cheap to clone; connecting is lazy (every call opens its own
/// connection), so it can be built before the service is up.
#[derive(Clone)]
pub struct Podman {
    inner: Arc<Inner>,
}

struct Inner {
    socket: PathBuf,
    api: podman_api::Podman,
    /// For the create call podman-api cannot make (see `raw`).
    raw: raw::Raw,
    /// The Docker-compatible API on the same socket, for pulls (see `pull`).
    compat: super::docker::Docker,
    /// The storage root (`store.graphRoot`), read once: libpod's info call gathers the
    /// whole host's facts (a quarter of a second here).
    graph_root: tokio::sync::OnceCell<PathBuf>,
    /// Set when the driver runs health checks itself (no systemd on this host).
    health: Option<Arc<HealthTicks>>,
    inspected: Arc<InspectCache>,
}

/// Inspect results of containers that have not changed since, so a pass over hundreds
/// of containers (and the restart after an event) does not inspect every one of them.
/// An entry is used only while (1) no event named its container since, (2) the list
/// still shows the same state, start/exit times, exit code, pid, names and image, and
/// (3) it is younger than [`INSPECT_TTL`], so that what neither events nor the list show
/// (a `podman update`) is still seen within one resync period. It is only used while
/// the event stream is connected: without events, every list inspects everything.
#[derive(Default)]
struct InspectCache {
    entries: std::sync::Mutex<HashMap<String, (ListKey, tokio::time::Instant, RuntimeContainer)>>,
    live: std::sync::atomic::AtomicBool,
}

const INSPECT_TTL: Duration = Duration::from_secs(30);

/// What the list says of a container: if any of it changes, the inspect is redone.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ListKey {
    state: Option<String>,
    status: Option<String>,
    started_at: Option<i64>,
    exited_at: Option<i64>,
    exit_code: Option<i32>,
    pid: Option<i64>,
    names: Option<Vec<String>>,
    image_id: Option<String>,
}

impl InspectCache {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (ListKey, tokio::time::Instant, RuntimeContainer)>>
    {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns the cache on (events flowing) or off (stream lost: forget everything).
    fn set_live(&self, live: bool) {
        self.live.store(live, std::sync::atomic::Ordering::SeqCst);
        if !live {
            self.lock().clear();
        }
    }

    fn get(&self, id: &str, key: &ListKey) -> Option<RuntimeContainer> {
        if !self.live.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let cache = self.lock();
        let (k, at, c) = cache.get(id)?;
        (k == key && at.elapsed() < INSPECT_TTL).then(|| c.clone())
    }

    fn forget(&self, id: &str) {
        self.lock().remove(id);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(h) = &self.health {
            h.abort_all();
        }
    }
}

impl std::fmt::Debug for Podman {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Podman")
            .field("socket", &self.inner.socket)
            .field("drives_health_checks", &self.inner.health.is_some())
            .finish_non_exhaustive()
    }
}

impl Podman {
    /// A driver for the libpod API at `socket`. Health checks are run by the driver when
    /// the host has no systemd (see the module docs).
    pub fn new(socket: impl AsRef<Path>) -> Podman {
        // sd_booted(3): systemd is the init system iff this directory exists.
        let systemd = Path::new("/run/systemd/system").exists();
        Podman::with_health_checks(socket, !systemd)
    }

    /// Like [`Podman::new`], choosing explicitly whether the driver runs health checks.
    pub fn with_health_checks(socket: impl AsRef<Path>, drive_health_checks: bool) -> Podman {
        let socket = socket.as_ref().to_path_buf();
        Podman {
            inner: Arc::new(Inner {
                api: podman_api::Podman::unix(&socket),
                raw: raw::Raw::unix(&socket),
                compat: super::docker::Docker::new(&socket),
                graph_root: tokio::sync::OnceCell::new(),
                socket,
                health: drive_health_checks.then(|| Arc::new(HealthTicks::default())),
                inspected: Arc::default(),
            }),
        }
    }

    /// The API socket this driver talks to.
    pub fn socket(&self) -> &Path {
        &self.inner.socket
    }

    /// Whether this driver runs health checks itself.
    pub fn drives_health_checks(&self) -> bool {
        self.inner.health.is_some()
    }

    fn api(&self) -> &podman_api::Podman {
        &self.inner.api
    }

    async fn inspect_raw(&self, id: &str) -> Result<Option<InspectContainerData>, DriverError> {
        match self.api().containers().get(id).inspect().await {
            Ok(c) => Ok(Some(c)),
            Err(e) if status_is(&e, 404) => Ok(None),
            Err(e) => Err(failed("inspect", id, e)),
        }
    }

    /// Inspects and, when this driver runs health checks, makes sure a running
    /// container with a check has its ticker (covers agent restarts and containers
    /// started behind converge's back).
    async fn inspect_tracked(&self, id: &str) -> Result<Option<RuntimeContainer>, DriverError> {
        let Some(data) = self.inspect_raw(id).await? else {
            return Ok(None);
        };
        self.ensure_health_ticker(&data);
        Ok(Some(runtime_container(data)))
    }

    /// Polls (list by id: cheaper than inspect) until the container is no longer
    /// running, or `timeout` passes; true when it stopped (or is gone).
    async fn wait_stopped(&self, id: &str, timeout: Duration) -> Result<bool, DriverError> {
        let opts = ContainerListOpts::builder()
            .all(true)
            .filter([ContainerListFilter::Id(id.into())])
            .build();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let listed = self
                .api()
                .containers()
                .list(&opts)
                .await
                .map_err(|e| failed("stop", id, e))?;
            let alive = listed.iter().any(|c| {
                matches!(
                    c.state.as_deref(),
                    Some("running" | "paused" | "restarting" | "stopping")
                )
            });
            if !alive {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(STOP_POLL.min(deadline - tokio::time::Instant::now())).await;
        }
    }

    fn ensure_health_ticker(&self, data: &InspectContainerData) {
        let Some(ticks) = &self.inner.health else {
            return;
        };
        let running = data
            .state
            .as_ref()
            .and_then(|s| s.status.as_deref())
            .is_some_and(|s| s == "running");
        let Some(check) = data.config.as_ref().and_then(|c| c.healthcheck.as_ref()) else {
            return;
        };
        let has_test = check
            .test
            .as_ref()
            .is_some_and(|t| !t.is_empty() && t[0] != "NONE");
        let (Some(id), true, true) = (data.id.as_deref(), running, has_test) else {
            return;
        };
        let interval = match check.interval {
            Some(ns) if ns > 0 => Duration::from_nanos(ns as u64),
            _ => DEFAULT_HEALTH_INTERVAL,
        }
        .max(Duration::from_millis(100));
        ticks.ensure(self.api().clone(), id, interval);
    }
}

fn failed(op: &str, id: &str, e: impl std::fmt::Display) -> DriverError {
    DriverError::Failed(format!("podman {op} {id}: {e}"))
}

/// Explains runc's refusal of the nofile/nproc podman picks itself: with any `ulimits`
/// given, libpod sets those two, unless given, to 1048576, which a host without
/// CAP_SYS_RESOURCE for the service (a nested container) cannot grant.
fn rlimit_hint(message: String) -> String {
    if message.contains("error setting rlimit") {
        format!(
            "{message} (with ulimits set, podman raises nofile and nproc to 1048576 unless \
             they are listed too: add both to ulimits, within the host's limits)"
        )
    } else {
        message
    }
}

fn status(e: &PodmanError) -> Option<u16> {
    match e {
        PodmanError::Fault { code, .. } => Some(code.as_u16()),
        _ => None,
    }
}

fn status_is(e: &PodmanError, code: u16) -> bool {
    status(e) == Some(code)
}

impl ContainerRuntime for Podman {
    fn kind(&self) -> &'static str {
        "podman"
    }

    async fn list_managed(&self, node: &str) -> Result<Vec<RuntimeContainer>, DriverError> {
        let opts = ContainerListOpts::builder()
            .all(true)
            .filter([
                ContainerListFilter::LabelKeyVal(LABEL_MANAGED.into(), "true".into()),
                ContainerListFilter::LabelKeyVal(LABEL_NODE.into(), node.into()),
            ])
            .build();
        let listed = self
            .api()
            .containers()
            .list(&opts)
            .await
            .map_err(|e| failed("list", node, e))?;
        let mut fresh = Vec::new();
        let mut to_inspect = Vec::new();
        let mut keys = HashMap::new();
        for c in listed {
            // Label filters are ANDed by podman; checked again so a server that ORs them
            // can never make converge touch a foreign container.
            let labels = c.labels.unwrap_or_default();
            let ours = labels.get(LABEL_MANAGED).map(String::as_str) == Some("true")
                && labels.get(LABEL_NODE).map(String::as_str) == Some(node);
            let Some(id) = c.id.filter(|_| ours) else {
                continue;
            };
            let key = ListKey {
                state: c.state,
                status: c.status,
                started_at: c.started_at,
                exited_at: c.exited_at,
                exit_code: c.exit_code,
                pid: c.pid,
                names: c.names,
                image_id: c.image_id,
            };
            match self.inner.inspected.get(&id, &key) {
                Some(known) => fresh.push(known),
                None => to_inspect.push(id.clone()),
            }
            keys.insert(id, key);
        }
        let inspected = inspect_all(
            to_inspect,
            |id| async move { self.inspect_tracked(&id).await },
        )
        .await?;
        {
            let now = tokio::time::Instant::now();
            let mut cache = self.inner.inspected.lock();
            cache.retain(|id, _| keys.contains_key(id));
            for c in &inspected {
                if let Some(key) = keys.get(&c.id) {
                    cache.insert(c.id.clone(), (key.clone(), now, c.clone()));
                }
            }
        }
        fresh.extend(inspected);
        fresh.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        Ok(fresh)
    }

    async fn image(&self, image: &str) -> Result<Option<LocalImage>, DriverError> {
        match self.api().images().get(image).inspect().await {
            Ok(i) => Ok(i.id.as_deref().map(|id| LocalImage {
                id: image_id(id),
                digests: repo_digests(image, i.repo_digests.iter().flatten()),
            })),
            Err(e) if status_is(&e, 404) => Ok(None),
            Err(e) => Err(failed("image inspect", image, e)),
        }
    }

    async fn pull(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        progress: &PullProgress,
    ) -> Result<(), DriverError> {
        // Through the Docker-compatible endpoint on the same socket: libpod's pull
        // stream names the blobs but not their sizes or progress.
        self.inner
            .compat
            .pull_stream(image, auth, progress)
            .await
            .map_err(|e| failed("pull", image, e))?;
        debug!(image, "pulled");
        Ok(())
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, DriverError> {
        let listed = self
            .api()
            .images()
            .list(&ImageListOpts::builder().all(false).build())
            .await
            .map_err(|e| failed("image list", "", e))?;
        Ok(listed
            .into_iter()
            .filter_map(|i| {
                Some(ImageInfo {
                    id: image_id(&i.id?),
                    tags: i.repo_tags.unwrap_or_default(),
                    digests: i.repo_digests.unwrap_or_default(),
                    size: i.size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    created: i.created.unwrap_or(0),
                    // Build containers included, which the container list omits.
                    in_use: i.containers.unwrap_or(0) > 0,
                })
            })
            .collect())
    }

    async fn image_users(&self) -> Result<BTreeSet<String>, DriverError> {
        let listed = self
            .api()
            .containers()
            .list(&ContainerListOpts::builder().all(true).build())
            .await
            .map_err(|e| failed("list", "", e))?;
        Ok(listed
            .into_iter()
            .filter_map(|c| c.image_id)
            .map(|id| image_id(&id))
            .collect())
    }

    async fn remove_image(&self, image: &ImageInfo) -> Result<(), DriverError> {
        // Names first, then the id, never forced: libpod's force also removes the
        // containers using the image.
        for name in image.tags.iter().chain(&image.digests).chain([&image.id]) {
            match self.api().images().get(name).delete().await {
                Ok(()) => {}
                Err(e) if status_is(&e, 404) => {}
                Err(e) => return Err(failed("image remove", name, e)),
            }
        }
        Ok(())
    }

    async fn image_disk(&self) -> Result<DiskUsage, DriverError> {
        let root = self
            .inner
            .graph_root
            .get_or_try_init(|| async {
                let info = self.api().info().await.map_err(|e| failed("info", "", e))?;
                info.store
                    .and_then(|s| s.graph_root)
                    .map(PathBuf::from)
                    .ok_or_else(|| failed("info", "", "no store.graphRoot"))
            })
            .await?
            .clone();
        converge_core::blocking("statvfs", move || disk_usage(&root)).await
    }

    async fn create(&self, spec: &CreateSpec) -> Result<String, DriverError> {
        let body = create_body(spec)?;
        let created = self
            .inner
            .raw
            .create(&body)
            .await
            .map_err(|e| failed("create", &spec.name, e))?;
        for w in created.warnings.iter().filter(|w| !w.is_empty()) {
            warn!(container = %spec.name, "podman create: {w}");
        }
        Ok(created.id)
    }

    async fn start(&self, id: &str) -> Result<(), DriverError> {
        match self.api().containers().get(id).start(None).await {
            Ok(()) => {}
            // 304: already running.
            Err(e) if status_is(&e, 304) => {}
            Err(e) => return Err(failed("start", id, rlimit_hint(e.to_string()))),
        }
        if self.inner.health.is_some() {
            if let Some(data) = self.inspect_raw(id).await? {
                self.ensure_health_ticker(&data);
            }
        }
        Ok(())
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        // libpod's stop endpoint would only honour a `timeout` query parameter, which
        // podman-api 0.10 spells `Timeout` (ignored: podman then waits the container's
        // own stop timeout). So stop by hand, like `podman stop` does: the container's
        // stop signal, wait up to `grace`, then SIGKILL.
        let Some(data) = self.inspect_raw(id).await? else {
            return Err(failed("stop", id, "no such container"));
        };
        let status = data.state.as_ref().and_then(|s| s.status.as_deref());
        if !matches!(
            status,
            Some("running" | "paused" | "restarting" | "stopping")
        ) {
            return Ok(());
        }
        let signal = data
            .config
            .as_ref()
            .and_then(|c| c.stop_signal)
            .filter(|s| *s > 0)
            .unwrap_or(15);
        // The full id: `wait_stopped` filters by id, and `id` may be a name.
        let full_id = data.id.clone().unwrap_or_else(|| id.to_string());
        let container = self.api().containers().get(&full_id);
        match container.send_signal(signal.to_string()).await {
            Ok(()) => {}
            // 409: not running (any more).
            Err(e) if status_is(&e, 409) => return Ok(()),
            Err(e) => return Err(failed("stop", id, e)),
        }
        if self.wait_stopped(&full_id, grace).await? {
            return Ok(());
        }
        debug!(container = id, ?grace, "podman: grace period over, SIGKILL");
        match container.send_signal("SIGKILL").await {
            Ok(()) => {}
            Err(e) if status_is(&e, 409) => return Ok(()),
            Err(e) => return Err(failed("stop", id, e)),
        }
        if self.wait_stopped(&full_id, KILL_WAIT).await? {
            Ok(())
        } else {
            Err(failed(
                "stop",
                id,
                format!("still running {KILL_WAIT:?} after SIGKILL"),
            ))
        }
    }

    async fn remove(&self, id: &str) -> Result<(), DriverError> {
        // force: kill a running one at once (timeout 0); v: its anonymous volumes too
        // (named volumes are never removed here).
        let opts = ContainerDeleteOpts::builder()
            .force(true)
            .volumes(true)
            .timeout(0)
            .build();
        match self.api().containers().get(id).delete(&opts).await {
            Ok(()) => Ok(()),
            Err(e) if status_is(&e, 404) => Ok(()),
            Err(e) => Err(failed("remove", id, e)),
        }
    }

    async fn rename(&self, id: &str, new_name: &str) -> Result<(), DriverError> {
        self.api()
            .containers()
            .get(id)
            .rename(new_name)
            .await
            .map_err(|e| failed("rename", id, format!("to {new_name}: {e}")))
    }

    async fn remove_volume(&self, name: &str) -> Result<(), DriverError> {
        // Not forced: a volume still in use stays (and reports why).
        match self.api().volumes().get(name).delete().await {
            Ok(()) => Ok(()),
            Err(e) if status_is(&e, 404) => Ok(()),
            Err(e) => Err(failed("volume remove", name, e)),
        }
    }

    async fn list_networks(&self) -> Result<Vec<RuntimeNetwork>, DriverError> {
        let listed = self
            .api()
            .networks()
            .list(&NetworkListOpts::default())
            .await
            .map_err(|e| failed("network list", "", e))?;
        Ok(listed
            .into_iter()
            .filter_map(|n| {
                Some(RuntimeNetwork {
                    name: n.name?,
                    labels: n.labels.unwrap_or_default().into_iter().collect(),
                    subnets: n
                        .subnets
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|s| Some((s.subnet?, s.gateway)))
                        .collect(),
                })
            })
            .collect())
    }

    async fn network_users(&self, network: &str) -> Result<Vec<String>, DriverError> {
        let opts = ContainerListOpts::builder()
            .all(true)
            .filter([ContainerListFilter::Network(network.into())])
            .build();
        let listed = self
            .api()
            .containers()
            .list(&opts)
            .await
            .map_err(|e| failed("list", network, e))?;
        Ok(listed
            .into_iter()
            .filter_map(|c| c.names?.into_iter().next())
            .collect())
    }

    async fn create_network(&self, spec: &NetworkCreate) -> Result<(), DriverError> {
        let subnets = spec.subnets.iter().map(|(net, gw)| Subnet {
            subnet: Some(net.to_string()),
            gateway: Some(gw.to_string()),
            lease_range: None,
        });
        let opts = NetworkCreateOpts::builder()
            .name(&spec.name)
            .driver("bridge")
            .labels(spec.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .ipv6_enabled(spec.subnets.iter().any(|(net, _)| net.addr().is_ipv6()))
            .subnets(subnets)
            .build();
        self.api()
            .networks()
            .create(&opts)
            .await
            .map(drop)
            .map_err(|e| failed("network create", &spec.name, e))
    }

    async fn remove_network(&self, name: &str) -> Result<(), DriverError> {
        // `delete`, never podman-api's `remove`: that one forces, which removes every
        // container on the network, foreign ones included.
        match self.api().networks().get(name).delete().await {
            Ok(reports) => match reports.into_iter().find_map(|r| r.err) {
                Some(e) if !e.is_empty() => Err(failed("network remove", name, e)),
                _ => Ok(()),
            },
            Err(e) if status_is(&e, 404) => Ok(()),
            Err(e) => Err(failed("network remove", name, e)),
        }
    }

    async fn inspect(&self, id: &str) -> Result<Option<RuntimeContainer>, DriverError> {
        self.inspect_tracked(id).await
    }

    fn describe(&self) -> String {
        format!("Podman at {}", self.inner.socket.display())
    }

    fn events(&self) -> BoxStream<'static, HostEvent> {
        // The pump owns the client and borrows it for the libpod stream; it is polled as
        // part of the returned stream (no spawn), so dropping the stream stops it.
        let (tx, rx) = mpsc::channel(1);
        let pump = pump_events(self.inner.api.clone(), self.inner.inspected.clone(), tx);
        let pump = futures::stream::once(pump).filter_map(|()| async { None::<HostEvent> });
        futures::stream::select(pump, rx).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::sample_create_spec;

    /// The shared sample, on a named network with a static address.
    fn spec() -> CreateSpec {
        let mut s = sample_create_spec();
        s.network = Some("net1".into());
        s.ip = Some("10.1.2.3".parse().unwrap());
        s
    }

    #[test]
    fn create_body_maps_every_field() {
        let body = create_body(&spec()).unwrap();
        assert_eq!(body["name"], "web");
        assert_eq!(body["image"], "localhost/busybox:test");
        assert_eq!(
            body["annotations"][IMAGE_ANNOTATION],
            "localhost/busybox:test"
        );
        assert_eq!(body["entrypoint"], serde_json::json!(["httpd"]));
        assert_eq!(body["command"], serde_json::json!(["-f"]));
        assert_eq!(body["env"]["A"], "1");
        assert_eq!(body["restart_policy"], "no");
        assert_eq!(body["stop_timeout"], 2);
        // Only ports with a host port are mapped.
        assert_eq!(body["portmappings"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            body["portmappings"][1],
            serde_json::json!({"container_port": 8080, "host_port": 18081,
                "host_ip": "127.0.0.1", "protocol": "tcp"})
        );
        assert_eq!(body["volumes"][0]["Name"], "data");
        assert_eq!(body["volumes"][0]["Dest"], "/data");
        assert_eq!(body["mounts"][0]["type"], "bind");
        assert_eq!(body["mounts"][0]["options"], serde_json::json!(["ro"]));
        assert_eq!(body["resource_limits"]["memory"]["limit"], 64 << 20);
        assert_eq!(body["resource_limits"]["pids"]["limit"], 100);
        assert_eq!(body["resource_limits"]["cpu"]["quota"], 50_000);
        assert_eq!(body["resource_limits"]["cpu"]["period"], 100_000);
        assert_eq!(
            body["healthconfig"]["Test"],
            serde_json::json!(["CMD", "true"])
        );
        assert_eq!(body["healthconfig"]["Interval"], 500_000_000i64);
        assert_eq!(body["netns"]["nsmode"], "bridge");
        assert_eq!(
            body["Networks"]["net1"]["static_ips"],
            serde_json::json!(["10.1.2.3"])
        );
        // A replacement keeps the MAC with the address (the host's neighbour entry).
        assert_eq!(body["Networks"]["net1"]["static_mac"], "02:42:0a:01:02:03");
        // The rest of the surface.
        assert_eq!(body["user"], "1000:100");
        assert_eq!(body["work_dir"], "/srv");
        assert_eq!(body["create_working_dir"], true);
        assert_eq!(body["hostname"], "web-1");
        assert_eq!(
            body["hostadd"],
            serde_json::json!(["db.internal:10.0.0.5", "v6.internal:fd00::5"])
        );
        assert_eq!(body["cap_add"], serde_json::json!(["CAP_NET_ADMIN"]));
        assert_eq!(body["cap_drop"], serde_json::json!(["CAP_MKNOD"]));
        assert_eq!(body["read_only_filesystem"], true);
        assert_eq!(
            body["mounts"][1],
            serde_json::json!({"type": "tmpfs", "source": "tmpfs", "destination": "/run",
                "options": ["rw", "noexec", "nosuid", "nodev", "size=67108864", "mode=1777"]})
        );
        assert_eq!(
            body["r_limits"],
            serde_json::json!([{"type": "nofile", "soft": 512, "hard": 1024}])
        );
        assert_eq!(body["sysctl"]["net.ipv4.ip_unprivileged_port_start"], "80");
        assert_eq!(body["stop_signal"], 3);
        assert_eq!(
            body["log_configuration"],
            serde_json::json!({"driver": "k8s-file", "size": 10 << 20})
        );
        assert_eq!(body["devices"][0]["path"], "/dev/zero:/dev/zero2:r");
        assert_eq!(
            body["dns_server"],
            serde_json::json!(["10.89.7.1", "fd00:7::1"])
        );
        assert_eq!(body["dns_search"], serde_json::json!(["internal"]));
        assert_eq!(body["dns_option"], serde_json::json!(["ndots:2"]));
    }

    #[test]
    fn unset_settings_leave_the_runtime_defaults() {
        let mut s = spec();
        s.settings = Default::default();
        let body = create_body(&s).unwrap();
        for key in [
            "user",
            "work_dir",
            "hostname",
            "hostadd",
            "cap_add",
            "cap_drop",
            "read_only_filesystem",
            "r_limits",
            "sysctl",
            "stop_signal",
            "log_configuration",
            "devices",
            "dns_server",
            "dns_search",
            "dns_option",
        ] {
            assert!(body.get(key).is_none(), "{key}");
        }
        // Only the bind mount.
        assert_eq!(body["mounts"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn log_drivers() {
        use crate::driver::LogSpec;
        let mut s = spec();
        for (driver, want) in [
            (
                LogDriver::K8sFile,
                serde_json::json!({"driver": "k8s-file", "size": 4096}),
            ),
            (
                LogDriver::Journald,
                serde_json::json!({"driver": "journald"}),
            ),
            (LogDriver::None, serde_json::json!({"driver": "none"})),
        ] {
            s.settings.logging = Some(LogSpec {
                driver,
                max_size: Some(4096),
                max_file: Some(2),
            });
            assert_eq!(create_body(&s).unwrap()["log_configuration"], want);
        }
    }

    #[test]
    fn bad_cpu_is_an_error() {
        let mut s = spec();
        s.cpus = Some(f64::NAN);
        assert!(create_body(&s).is_err());
    }

    #[test]
    fn states_and_ids() {
        assert_eq!(run_state("running"), RunState::Running);
        assert_eq!(run_state("configured"), RunState::Created);
        assert_eq!(run_state("stopped"), RunState::Exited);
        assert_eq!(run_state("removing"), RunState::Other);
        assert_eq!(health("healthy"), Some(Health::Healthy));
        assert_eq!(health(""), None);
        assert_eq!(image_id("abc"), "sha256:abc");
        assert_eq!(image_id("sha256:abc"), "sha256:abc");
        assert_eq!(
            crate::driver::parse_port_key("53/udp"),
            Some((53, "udp".into()))
        );
    }
}
