//! The containers reconciler: observe through a runtime, plan (pure, see `plan`), apply
//! with bounded concurrency and per-call timeouts, restart dead containers with a
//! crash-loop back-off, publish container addresses as facts.

use crate::driver::{
    ContainerRuntime, CreateSpec, Health, PullProgress, RunState, RuntimeContainer, LABEL_NAME,
};
use crate::plan::{self, Action, Crashes, NetStep, Observed, Secret, Step, CRASH_WINDOW};
use crate::registry::RegistryAuth;
use crate::spec::{PullPolicy, Registry, Workload};
use converge_core::{
    with_timeout, ContainerFacts, DriverError, Facts, FactsUpdate, HostEvent, ObjectNote,
    ObjectOutcome, Plan, Reconciler,
};
use converge_core::{SecretSource, Zeroizing};
use futures::stream::{BoxStream, StreamExt};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn, Instrument};

/// Node-level settings of the reconciler.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id (ownership label `converge.node`).
    pub node_id: String,
    /// Secret values: a local file `<secrets dir>/<name>` overrides the document's
    /// sealed value of the same name.
    pub secrets: SecretSource,
    /// Concurrent pulls / container operations.
    pub parallel: usize,
    /// Bound of one runtime call (create, start, stop, …).
    pub call_timeout: Duration,
    pub pull_timeout: Duration,
    /// How long a replacement may take to become healthy before it is abandoned.
    pub health_timeout: Duration,
    /// Prefetch pulls run in their own tasks (the agent) rather than in the pass
    /// (one-shot commands, which exit after it).
    pub background_prefetch: bool,
}

impl Config {
    pub fn new(node_id: impl Into<String>, secrets_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_id: node_id.into(),
            secrets: SecretSource::new(secrets_dir.into()),
            parallel: 4,
            call_timeout: Duration::from_secs(30),
            pull_timeout: Duration::from_secs(600),
            health_timeout: Duration::from_secs(120),
            background_prefetch: false,
        }
    }
}

/// A restart converge made, for the crash-loop back-off.
#[derive(Clone, Copy, Debug)]
struct Restarts {
    count: u32,
    last: Instant,
}

/// The reconciler over a runtime driver.
pub struct Containers<R> {
    /// Shared with background prefetches.
    runtime: Arc<R>,
    config: Config,
    crashes: Mutex<BTreeMap<String, Restarts>>,
    /// When each replacement instance (by id) was first seen ready under its
    /// temporary name: the switch-over's clock.
    ready_since: Mutex<BTreeMap<String, Instant>>,
    /// When this agent last pulled each image (for `pullPolicy: always`; tokio's clock,
    /// which tests can move).
    pulled_at: Mutex<BTreeMap<String, tokio::time::Instant>>,
    /// Prefetches, images seen, the last GC.
    images: images::ImagesState,
}

impl<R: ContainerRuntime> Containers<R> {
    pub fn new(runtime: R, config: Config) -> Self {
        Self {
            runtime: Arc::new(runtime),
            config,
            crashes: Mutex::new(BTreeMap::new()),
            ready_since: Mutex::new(BTreeMap::new()),
            pulled_at: Mutex::new(BTreeMap::new()),
            images: images::ImagesState::default(),
        }
    }

    /// Pulls `image` for a container (see [`pull_image`]) and records when.
    async fn pull(&self, image: &str, registry: Option<&Registry>) -> Result<(), DriverError> {
        let progress = PullProgress::default();
        pull_image(&*self.runtime, &self.config, image, registry, &progress).await?;
        self.pulled_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(image.to_string(), tokio::time::Instant::now());
        Ok(())
    }

    pub fn runtime(&self) -> &R {
        &self.runtime
    }

    async fn call<T>(
        &self,
        op: &str,
        fut: impl std::future::Future<Output = Result<T, DriverError>>,
    ) -> Result<T, DriverError> {
        with_timeout(op, self.config.call_timeout, fut).await
    }

    fn read_secret(&self, name: &str) -> Result<Secret, String> {
        read_secret(&self.config, name)
    }

    /// Records a restart of `name` (the plan already waited out its back-off).
    fn record_restart(&self, name: &str) -> u32 {
        let mut crashes = self.crashes.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let entry = crashes.entry(name.to_string()).or_insert(Restarts {
            count: 0,
            last: now,
        });
        if now.duration_since(entry.last) > CRASH_WINDOW {
            entry.count = 0;
        }
        entry.count += 1;
        entry.last = now;
        entry.count
    }

    /// How long each container's replacement (a fresh, ready instance still under the
    /// temporary name) has been ready, as the plan sees it.
    fn switching(&self, observed: &Observed) -> BTreeMap<String, Duration> {
        let mut since = self.ready_since.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut out = BTreeMap::new();
        let mut seen = Vec::new();
        for rc in &observed.containers {
            let Some(name) = rc.labels.get(LABEL_NAME) else {
                continue;
            };
            if rc.name != *name && observed.is_fresh(rc) && plan::ready(rc) {
                let t = *since.entry(rc.id.clone()).or_insert(now);
                out.insert(name.clone(), now.duration_since(t));
                seen.push(rc.id.clone());
            }
        }
        since.retain(|id, _| seen.contains(id));
        out
    }

    /// The restarts so far, as the plan sees them.
    fn crashes(&self) -> BTreeMap<String, Crashes> {
        let crashes = self.crashes.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        crashes
            .iter()
            .map(|(name, r)| {
                let since_last = now.duration_since(r.last);
                let count = if since_last > CRASH_WINDOW {
                    0
                } else {
                    r.count
                };
                (name.clone(), Crashes { count, since_last })
            })
            .collect()
    }

    async fn remove(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        with_timeout(
            "stop",
            self.config.call_timeout + grace,
            self.runtime.stop(id, grace),
        )
        .await?;
        self.call("remove", self.runtime.remove(id)).await
    }

    async fn create_and_start(
        &self,
        spec: &CreateSpec,
        start: bool,
    ) -> Result<String, DriverError> {
        let id = self.call("create", self.runtime.create(spec)).await?;
        if start {
            self.call("start", self.runtime.start(&id)).await?;
        }
        Ok(id)
    }

    /// Waits until a new instance is healthy (health check) or has kept running for a
    /// second (no check); fails if it exits or turns unhealthy.
    async fn wait_ready(&self, id: &str, has_check: bool) -> Result<(), DriverError> {
        // tokio's clock, so tests with paused time do not really wait.
        let deadline = tokio::time::Instant::now() + self.config.health_timeout;
        let mut running_since: Option<tokio::time::Instant> = None;
        loop {
            let rc = self
                .call("inspect", self.runtime.inspect(id))
                .await?
                .ok_or_else(|| DriverError::Failed("new instance disappeared".into()))?;
            match (rc.state, rc.health) {
                (RunState::Exited, _) => {
                    return Err(DriverError::Failed(format!(
                        "new instance exited ({})",
                        rc.exit_code.map(|c| c.to_string()).unwrap_or_default()
                    )))
                }
                (_, Some(Health::Unhealthy)) => {
                    return Err(DriverError::Failed("new instance is unhealthy".into()))
                }
                (RunState::Running, Some(Health::Healthy)) if has_check => return Ok(()),
                (RunState::Running, _) if !has_check => {
                    let since = *running_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= Duration::from_secs(1) {
                        return Ok(());
                    }
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DriverError::Failed(format!(
                    "new instance not ready after {:?}",
                    self.config.health_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts a replacement instance and waits until it is ready; one that does not get
    /// there is removed and the old instance stays.
    async fn start_replacement(&self, spec: &CreateSpec) -> Result<String, DriverError> {
        let id = self.create_and_start(spec, true).await?;
        if let Err(e) = self.wait_ready(&id, spec.health.is_some()).await {
            warn!(error = %e, "replacement not ready: keeping the old instance");
            let _ = self.call("remove", self.runtime.remove(&id)).await;
            return Err(e);
        }
        Ok(id)
    }

    async fn run_step(&self, name: &str, step: Step) -> Result<(), DriverError> {
        match step {
            Step::Create { spec, start } => {
                info!(image = %spec.image, "creating");
                self.create_and_start(&spec, start).await.map(drop)
            }
            Step::StartFirst {
                spec,
                old,
                final_name,
            } => {
                info!(image = %spec.image, "replacing: new instance first");
                let id = self.start_replacement(&spec).await?;
                for o in &old {
                    self.remove(o, spec.stop_grace).await?;
                }
                self.call("rename", self.runtime.rename(&id, &final_name))
                    .await
            }
            Step::StartNext { spec } => {
                info!(image = %spec.image, "replacing: new instance first, consumers switch before the old one stops");
                self.start_replacement(&spec).await.map(drop)
            }
            Step::Retire { id, grace } => {
                info!("consumers switched to the new instance: stopping the old one");
                tokio::time::sleep(plan::DRAIN_SETTLE).await;
                self.remove(&id, grace).await
            }
            Step::StopFirst { spec, old, start } => {
                info!(image = %spec.image, "replacing: old instance first (host ports)");
                for o in &old {
                    self.remove(o, spec.stop_grace).await?;
                }
                self.create_and_start(&spec, start).await.map(drop)
            }
            Step::Start { id, exit_code } => {
                let n = self.record_restart(name);
                info!(exit_code = ?exit_code, restarts = n, "starting");
                self.call("start", self.runtime.start(&id)).await
            }
            Step::Stop { id, grace } => {
                with_timeout(
                    "stop",
                    self.config.call_timeout + grace,
                    self.runtime.stop(&id, grace),
                )
                .await
            }
            Step::Remove { id, grace } => {
                info!("removing");
                self.remove(&id, grace).await
            }
            Step::Rename { id, to } => self.call("rename", self.runtime.rename(&id, &to)).await,
            Step::RemoveVolumes { names } => {
                for v in names {
                    info!(volume = %v, "removing volume (removeVolumesOnDelete)");
                    self.call("remove volume", self.runtime.remove_volume(&v))
                        .await?;
                }
                Ok(())
            }
        }
    }

    async fn run_network(&self, name: String, steps: Vec<NetStep>) -> ObjectOutcome {
        let span = tracing::info_span!("network", name = %name);
        let r = async {
            for step in steps {
                match step {
                    NetStep::RemoveContainer { id, grace } => {
                        info!(container = %id, "removing a container on the network being replaced");
                        self.remove(&id, grace).await?;
                    }
                    NetStep::Remove => {
                        info!("removing");
                        self.call("network remove", self.runtime.remove_network(&name))
                            .await?;
                    }
                    NetStep::Create(spec) => {
                        info!(subnets = ?spec.subnets, "creating");
                        self.call("network create", self.runtime.create_network(&spec))
                            .await?;
                    }
                }
            }
            Ok::<(), DriverError>(())
        }
        .instrument(span)
        .await;
        ObjectOutcome::from_result(format!("network {name}"), r)
    }

    async fn run_container(&self, name: String, steps: Vec<Step>) -> ObjectOutcome {
        let span = tracing::info_span!("container", name = %name);
        let r = async {
            for step in steps {
                self.run_step(&name, step).await?;
            }
            Ok::<(), DriverError>(())
        }
        .instrument(span)
        .await;
        ObjectOutcome::from_result(format!("container {name}"), r)
    }
}

fn read_secret(config: &Config, name: &str) -> Result<Secret, String> {
    match config.secrets.get(name) {
        Ok(Some(s)) => Ok(Secret(s.trim_end_matches('\n').to_string())),
        Ok(None) => Err(format!("{} not found", config.secrets.describe(name))),
        Err(e) => Err(e.to_string()),
    }
}

/// Pulls `image` with its registry's credentials (the password read now, dropped
/// after the call), then checks that a pinned digest is what the node now has.
async fn pull_image<R: ContainerRuntime>(
    runtime: &R,
    config: &Config,
    image: &str,
    registry: Option<&Registry>,
    progress: &PullProgress,
) -> Result<(), DriverError> {
    let auth = match registry {
        Some(r) => {
            let password = read_secret(config, &r.password_secret)
                .map_err(|e| DriverError::Failed(format!("registry {}: {e}", r.server)))?;
            Some(RegistryAuth {
                server: r.server.clone(),
                username: r.username.clone(),
                password: Zeroizing::new(password.0),
            })
        }
        None => None,
    };
    let server = crate::registry::server_of(image);
    info!(
        image,
        registry = server,
        authenticated = auth.is_some(),
        "pulling"
    );
    with_timeout(
        "pull",
        config.pull_timeout,
        runtime.pull(image, auth.as_ref(), progress),
    )
    .await
    .map_err(|e| DriverError::Failed(format!("pull from registry {server}: {e}")))?;
    drop(auth);
    if let Some(want) = crate::registry::pinned_digest(image) {
        let got = with_timeout("image inspect", config.call_timeout, runtime.image(image))
            .await?
            .map(|i| i.digests)
            .unwrap_or_default();
        if !got.iter().any(|d| d == want) {
            return Err(DriverError::Failed(format!(
                "image {image}: the node has digests [{}], not the pinned {want}",
                got.join(", ")
            )));
        }
    }
    Ok(())
}

impl<R: ContainerRuntime> Reconciler for Containers<R> {
    type Spec = Workload;
    type Observed = Observed;
    type Action = Action;

    fn name(&self) -> &'static str {
        "containers"
    }

    async fn observe(&self, spec: &Workload) -> Result<Observed, DriverError> {
        let workload = spec;
        let containers = self
            .call("list", self.runtime.list_managed(&self.config.node_id))
            .await
            .map_err(|e| {
                // The first call of a pass: name what was tried and how to change it.
                DriverError::Failed(format!(
                    "cannot list containers on {}: {e} (start it, or point converge elsewhere with --runtime, --podman-socket or --docker-socket)",
                    self.runtime.describe()
                ))
            })?;
        let mut networks = Vec::new();
        let mut network_users = BTreeMap::new();
        if spec.networks.is_some() {
            networks = self
                .call("network list", self.runtime.list_networks())
                .await?;
            for n in networks
                .iter()
                .filter(|n| plan::owned_network(n, &self.config.node_id))
            {
                let users = self
                    .call("network users", self.runtime.network_users(&n.name))
                    .await?;
                network_users.insert(n.name.clone(), users);
            }
        }
        let spec = spec.containers.as_deref().unwrap_or_default();
        let mut images = BTreeMap::new();
        for c in spec {
            if !images.contains_key(&c.image) {
                let local = self
                    .call("image inspect", self.runtime.image(&c.image))
                    .await?;
                images.insert(c.image.clone(), local);
            }
        }
        let refresh = {
            let pulled = self.pulled_at.lock().unwrap_or_else(|p| p.into_inner());
            spec.iter()
                .filter(|c| c.pull_policy == PullPolicy::Always)
                .filter(|c| {
                    pulled
                        .get(&c.image)
                        .is_none_or(|t| t.elapsed() >= plan::ALWAYS_PULL_EVERY)
                })
                .map(|c| c.image.clone())
                .collect()
        };
        let secrets: BTreeMap<String, Result<Secret, String>> = spec
            .iter()
            .flat_map(|c| c.secret_env.values())
            .map(|s| (s.clone(), self.read_secret(s)))
            .collect();
        // Built once here: the plan and the switch-over both need the spec hashes.
        let desired = spec
            .iter()
            .map(|c| {
                let d = plan::desired(c, &self.config.node_id, &secrets);
                (c.name.clone(), d)
            })
            .collect();
        let mut observed = Observed {
            containers,
            images,
            store: None,
            prefetch: BTreeMap::new(),
            refresh,
            secrets,
            crashes: self.crashes(),
            networks,
            network_users,
            desired,
            switching: BTreeMap::new(),
        };
        observed.switching = self.switching(&observed);
        if let Some(images) = &workload.images {
            self.observe_images(images, &mut observed).await?;
        }
        Ok(observed)
    }

    fn plan(&self, spec: &Workload, observed: &Observed, facts: &Facts) -> Plan<Action> {
        plan::plan(spec, observed, &self.config.node_id, facts)
    }

    async fn apply(&self, plan: Plan<Action>) -> Vec<ObjectOutcome> {
        let mut outcomes = Vec::new();
        // Pulls first (bounded); a container whose image could not be pulled fails
        // without touching its running instance.
        let mut blocked: BTreeMap<String, String> = BTreeMap::new();
        let mut blocked_networks: BTreeMap<String, String> = BTreeMap::new();
        let (images, actions): (Vec<Action>, Vec<Action>) = plan
            .actions
            .into_iter()
            .partition(|a| matches!(a, Action::Prefetch { .. } | Action::RemoveImage { .. }));
        let mut prefetch = Vec::new();
        let mut collect = Vec::new();
        for a in images {
            match a {
                Action::Prefetch { image, registry } => prefetch.push((image, registry)),
                Action::RemoveImage { image } => collect.push(image),
                _ => {}
            }
        }
        outcomes.extend(self.prefetch(prefetch).await);
        let (pulls, work): (Vec<Action>, Vec<Action>) = actions
            .into_iter()
            .partition(|a| matches!(a, Action::Pull { .. }));
        let pulled: Vec<(String, Vec<String>, Result<(), DriverError>)> =
            futures::stream::iter(pulls)
                .filter_map(|a| async move {
                    match a {
                        Action::Pull {
                            image,
                            for_containers,
                            registry,
                        } => Some((image, for_containers, registry)),
                        _ => None,
                    }
                })
                .map(|(image, users, registry)| async move {
                    let r = self.pull(&image, registry.as_ref()).await;
                    (image, users, r)
                })
                .buffer_unordered(self.config.parallel.max(1))
                .collect()
                .await;
        for (image, users, r) in pulled {
            if let Err(e) = &r {
                for u in users {
                    blocked.insert(u, format!("image {image} not available: {e}"));
                }
            }
            outcomes.push(ObjectOutcome::from_result(format!("image {image}"), r));
        }
        // Networks next; a container whose network could not be made fails untouched.
        let (nets, work): (Vec<Action>, Vec<Action>) = work
            .into_iter()
            .partition(|a| matches!(a, Action::Network { .. }));
        for a in nets {
            if let Action::Network { name, steps } = a {
                let outcome = self.run_network(name.clone(), steps).await;
                if let Some(e) = &outcome.error {
                    blocked_networks.insert(name, e.clone());
                }
                outcomes.push(outcome);
            }
        }
        for a in &work {
            if let Action::Container { name, steps } = a {
                let net = steps.iter().find_map(Step::network);
                if let Some((n, e)) = net.and_then(|n| blocked_networks.get_key_value(n)) {
                    blocked
                        .entry(name.clone())
                        .or_insert_with(|| format!("network {n} not available: {e}"));
                }
            }
        }
        let (removals, work): (Vec<Action>, Vec<Action>) = work
            .into_iter()
            .partition(|a| matches!(a, Action::RemoveNetwork { .. }));
        let results: Vec<ObjectOutcome> = futures::stream::iter(work)
            .map(|a| {
                let blocked = match &a {
                    Action::Container { name, .. } => blocked.get(name).cloned(),
                    _ => None,
                };
                async move {
                    match (a, blocked) {
                        (Action::Container { name, .. }, Some(e)) => {
                            ObjectOutcome::failed(format!("container {name}"), e)
                        }
                        (Action::Container { name, steps }, None) => {
                            self.run_container(name, steps).await
                        }
                        (Action::Invalid { object, error }, _) => {
                            ObjectOutcome::failed(object, error)
                        }
                        (Action::Pull { image, .. }, _) => {
                            ObjectOutcome::ok(format!("image {image}"))
                        }
                        (Action::Network { name, .. } | Action::RemoveNetwork { name }, _) => {
                            ObjectOutcome::ok(format!("network {name}"))
                        }
                        (Action::Prefetch { image, .. }, _) => {
                            ObjectOutcome::ok(format!("image {image}"))
                        }
                        (Action::RemoveImage { image }, _) => {
                            ObjectOutcome::ok(format!("image {}", image.name()))
                        }
                    }
                }
            })
            .buffer_unordered(self.config.parallel.max(1))
            .collect()
            .await;
        outcomes.extend(results);
        // Last: networks the document dropped (the containers leaving them are gone).
        for a in removals {
            if let Action::RemoveNetwork { name } = a {
                let r = self
                    .call("network remove", self.runtime.remove_network(&name))
                    .instrument(tracing::info_span!("network", name = %name))
                    .await;
                outcomes.push(ObjectOutcome::from_result(format!("network {name}"), r));
            }
        }
        // Image GC last: the containers removed above no longer hold their images.
        if !collect.is_empty() {
            outcomes.extend(self.collect(collect).await);
        }
        outcomes.sort_by(|a, b| a.object.cmp(&b.object));
        outcomes
    }

    fn publish(&self, observed: &Observed) -> Option<FactsUpdate> {
        let mut facts: BTreeMap<String, ContainerFacts> = BTreeMap::new();
        let mut chosen: BTreeMap<String, (bool, bool)> = BTreeMap::new();
        for rc in &observed.containers {
            let Some(name) = rc.labels.get(LABEL_NAME) else {
                continue;
            };
            let running = rc.state == RunState::Running;
            let entry = facts.entry(name.clone()).or_default();
            // A ready instance with the document's spec wins (during a replacement
            // consumers switch to it before the old one stops), then a running one under
            // the final name, then any running one.
            let rank = |rc: &RuntimeContainer| {
                (observed.is_fresh(rc) && plan::ready(rc), rc.name == *name)
            };
            let better = match chosen.get(name) {
                None => true,
                Some(best) => rank(rc) > *best,
            };
            if running && (!entry.running || better) {
                chosen.insert(name.clone(), rank(rc));
                let mut addresses = rc.addresses.clone();
                addresses.sort_by_key(|a| (a.is_ipv6(), *a));
                *entry = ContainerFacts { addresses, running };
            }
        }
        Some(FactsUpdate::Containers(facts))
    }

    /// Containers and networks carrying this node's ownership labels.
    fn owned(&self, observed: &Observed) -> Option<u64> {
        Some((observed.containers.len() + observed.network_users.len()) as u64)
    }

    /// Containers worth an operator's look: not running, unhealthy, or restarted.
    fn notes(&self, observed: &Observed) -> Vec<ObjectNote> {
        let mut notes = Vec::new();
        for rc in &observed.containers {
            let Some(name) = rc.labels.get(LABEL_NAME) else {
                continue;
            };
            if rc.name != *name {
                continue; // a temporary or stale instance; its own pass reports it
            }
            let mut parts = Vec::new();
            if rc.state != RunState::Running {
                parts.push(match rc.exit_code {
                    Some(code) => format!("{:?} (exit code {code})", rc.state).to_lowercase(),
                    None => format!("{:?}", rc.state).to_lowercase(),
                });
            }
            match rc.health {
                Some(Health::Unhealthy) => parts.push("unhealthy".into()),
                Some(Health::Starting) => parts.push("health check starting".into()),
                _ => {}
            }
            // What a tag resolved to when pulled (images built on the node have none).
            let pinned = crate::registry::pinned_digest(&rc.image).is_some();
            // (Podman lists every digest the image has had under this repository, e.g.
            // one from a local build and one from the registry: all are shown.)
            let digests = observed
                .images
                .values()
                .flatten()
                .find(|i| i.id == rc.image_id)
                .map(|i| i.digests.join(", "))
                .filter(|d| !d.is_empty());
            if let (Some(d), false) = (digests, pinned) {
                parts.push(format!("image digest {d}"));
            }
            if let Some(c) = observed.crashes.get(name).filter(|c| c.count > 0) {
                parts.push(format!(
                    "restarted {} times in the last {} min",
                    c.count,
                    CRASH_WINDOW.as_secs() / 60
                ));
            }
            if !parts.is_empty() {
                notes.push(ObjectNote {
                    object: format!("container {name}"),
                    note: parts.join(", "),
                });
            }
        }
        notes.extend(self.image_notes(observed));
        notes
    }

    fn host_events(&self) -> Option<BoxStream<'static, HostEvent>> {
        let runtime = self.runtime.events();
        // Background prefetches end as host events too (taken by the first caller).
        Some(match self.images.take_events() {
            Some(rx) => {
                let ends = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|e| (e, rx))
                });
                futures::stream::select(runtime, ends).boxed()
            }
            None => runtime,
        })
    }
}

mod images;

#[cfg(test)]
mod tests;
