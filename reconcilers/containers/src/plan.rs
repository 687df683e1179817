//! Pure planning: what the runtime must do so its managed containers and networks match
//! the spec.

pub mod images;
mod networks;

pub use images::{ImageStore, PrefetchStatus};
pub use networks::{desired as network_spec, owned as owned_network, IN_USE_RETRY};

use crate::driver::{
    CreateSpec, Health, HealthSpec, ImageInfo, LocalImage, NetworkCreate, RunState,
    RuntimeContainer, RuntimeNetwork, LABEL_HASH, LABEL_MANAGED, LABEL_NAME, LABEL_NODE,
};
use crate::spec::{
    parse_duration, parse_memory, Container, ContainerState, PullPolicy, Registry, RestartPolicy,
    Workload,
};
use converge_core::{redact, Change, Facts, FieldChange, Op, Plan, Waiting};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Label holding the container's document entry (JSON; secret *names* only), so a diff
/// can show exactly which fields changed and a removal knows `removeVolumesOnDelete`.
pub const LABEL_SPEC: &str = "converge.spec";
/// Suffix of the temporary name a replacement runs under until the old one is gone.
pub const NEXT_SUFFIX: &str = "--next";

/// A secret value read from the node; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

/// What `observe` read.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Containers carrying this node's ownership labels.
    pub containers: Vec<RuntimeContainer>,
    /// The local image per image reference of the spec, containers and prefetch list
    /// (None: not present locally).
    pub images: BTreeMap<String, Option<LocalImage>>,
    /// The image store, for image GC (read only when the `images` section has `gc`),
    /// or why it could not be read (GC then waits; containers converge regardless).
    pub store: Option<Result<ImageStore, String>>,
    /// This agent's prefetch pulls by reference: under way, failed or done.
    pub prefetch: BTreeMap<String, PrefetchStatus>,
    /// Images of `pullPolicy: always` containers due for another pull (not pulled by
    /// this agent within [`ALWAYS_PULL_EVERY`]).
    pub refresh: BTreeSet<String>,
    /// Secret values by name, or why one could not be read.
    pub secrets: BTreeMap<String, Result<Secret, String>>,
    /// Restarts converge made per container (document name) in the crash-loop window,
    /// as of the observation.
    pub crashes: BTreeMap<String, Crashes>,
    /// Every network on the host (read only when the document has a networks section).
    pub networks: Vec<RuntimeNetwork>,
    /// The containers (runtime names, anyone's) attached to each network converge owns.
    pub network_users: BTreeMap<String, Vec<String>>,
    /// The runtime-level desired state of each document container with its spec hash
    /// ([`desired`], built once per pass), or why it cannot be built.
    pub desired: BTreeMap<String, Result<(CreateSpec, String), String>>,
    /// Per container being switched over: how long ago its new instance (still under
    /// the temporary name) was first seen ready.
    pub switching: BTreeMap<String, Duration>,
}

impl Observed {
    /// Whether a managed instance was created from its document entry as it is now.
    pub fn is_fresh(&self, rc: &RuntimeContainer) -> bool {
        let Some(name) = rc.labels.get(LABEL_NAME) else {
            return false;
        };
        match self.desired.get(name) {
            Some(Ok((_, hash))) => rc.labels.get(LABEL_HASH) == Some(hash),
            _ => false,
        }
    }
}

/// The stop grace period a document entry asks for (default 10 s).
pub fn stop_grace(entry: &Container) -> Duration {
    parse_duration(&entry.stop_grace_period).unwrap_or(Duration::from_secs(10))
}

/// The document entry a managed container was created from (its `converge.spec` label).
pub fn recorded(rc: &RuntimeContainer) -> Option<Container> {
    serde_json::from_str(rc.labels.get(LABEL_SPEC)?).ok()
}

/// How long an old instance keeps serving while consumers (the firewall) still send
/// traffic to it after its replacement is ready; then it is stopped anyway.
pub const SWITCH_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a pass looks whether the consumers have switched.
pub const SWITCH_POLL: Duration = Duration::from_millis(250);
/// Pause between the consumers' switch and stopping the old instance, so requests it
/// accepted just before finish.
pub const DRAIN_SETTLE: Duration = Duration::from_secs(1);

/// Whether an instance is running and, if it has a health check, healthy.
pub fn ready(rc: &RuntimeContainer) -> bool {
    rc.state == RunState::Running
        && !matches!(rc.health, Some(Health::Starting | Health::Unhealthy))
}

/// Restarts of one container within the crash-loop window, as observed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Crashes {
    /// Restarts in the window (0 after a quiet window).
    pub count: u32,
    /// Time since the last restart.
    pub since_last: Duration,
}

/// Crash-loop window: restarts older than this are forgotten.
pub const CRASH_WINDOW: Duration = Duration::from_secs(600);

/// Delay before restart number `n` (0-based) of a crashing container: the first two
/// are immediate, then 1 s doubling to 60 s.
pub fn crash_delay(n: u32) -> Duration {
    match n {
        0 | 1 => Duration::ZERO,
        n => Duration::from_secs(1u64 << (n - 2).min(6)).min(Duration::from_secs(60)),
    }
}

impl Crashes {
    /// How long the next restart must still wait (zero: it may happen now).
    pub fn wait(&self) -> Duration {
        if self.count == 0 || self.since_last > CRASH_WINDOW {
            return Duration::ZERO;
        }
        crash_delay(self.count).saturating_sub(self.since_last)
    }
}

/// One step of work on one container; steps of a container run in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Create under `spec.name` and start it unless the document wants it stopped.
    Create {
        spec: CreateSpec,
        start: bool,
    },
    /// Zero-downtime replace: create `spec` under a temporary name, start it, wait
    /// until healthy, stop and remove `old`, then rename it to `final_name`.
    StartFirst {
        spec: CreateSpec,
        old: Vec<String>,
        final_name: String,
    },
    /// Zero-drop replace, first half: create `spec` under a temporary name, start it and
    /// wait until healthy. A later pass stops the old instance once no consumer sends
    /// traffic to it (facts `in_use`), then renames the new one.
    StartNext {
        spec: CreateSpec,
    },
    /// Wait `DRAIN_SETTLE`, then stop (grace, then kill) and remove: an old instance
    /// the consumers have just switched away from.
    Retire {
        id: String,
        grace: Duration,
    },
    /// Replace when host ports forbid two instances: stop and remove `old`, then create.
    StopFirst {
        spec: CreateSpec,
        old: Vec<String>,
        start: bool,
    },
    Start {
        id: String,
        exit_code: Option<i64>,
    },
    Stop {
        id: String,
        grace: Duration,
    },
    /// Stop (grace, then kill) and remove.
    Remove {
        id: String,
        grace: Duration,
    },
    Rename {
        id: String,
        to: String,
    },
    RemoveVolumes {
        names: Vec<String>,
    },
}

impl Step {
    /// The network a new instance made by this step attaches to, if named.
    pub fn network(&self) -> Option<&str> {
        match self {
            Step::Create { spec, .. }
            | Step::StartFirst { spec, .. }
            | Step::StartNext { spec }
            | Step::StopFirst { spec, .. } => spec.network.as_deref(),
            _ => None,
        }
    }
}

/// One step of work on one network; steps of a network run in order.
#[derive(Clone, Debug, PartialEq)]
pub enum NetStep {
    /// Stop (grace, then kill) and remove a container of converge's attached to it.
    RemoveContainer {
        id: String,
        grace: Duration,
    },
    /// Remove the network.
    Remove,
    Create(NetworkCreate),
}

/// How often the image of a `pullPolicy: always` container is pulled again.
pub const ALWAYS_PULL_EVERY: Duration = Duration::from_secs(300);

/// One driver operation unit. `apply` runs pulls, then networks, then containers, then
/// network removals.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Pull an image needed by `for_containers` (runs before their steps), with the
    /// credentials of `registry` (its password secret is read at pull time).
    Pull {
        image: String,
        for_containers: Vec<String>,
        registry: Option<Registry>,
    },
    /// Create or replace a network (runs before every container's steps).
    Network { name: String, steps: Vec<NetStep> },
    /// Ordered steps for one container (by document name).
    Container { name: String, steps: Vec<Step> },
    /// Remove a network converge created (runs after every container's steps, so the
    /// containers leaving it are gone).
    RemoveNetwork { name: String },
    /// The object (`container web`, `network mesh`) cannot be built or changed (a
    /// secret is missing, a foreign network holds the name): reported as failed.
    Invalid { object: String, error: String },
    /// Pull an image of the `images.prefetch` list (in the agent in the background,
    /// its progress in the status).
    Prefetch {
        image: String,
        registry: Option<Registry>,
    },
    /// Remove an image nobody needs (image GC; runs last).
    RemoveImage { image: ImageInfo },
}

/// The runtime-level desired state of one document container, or why it cannot be built.
pub fn desired(
    c: &Container,
    node: &str,
    secrets: &BTreeMap<String, Result<Secret, String>>,
) -> Result<(CreateSpec, String), String> {
    let mut env = c.env.clone();
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(c).map_err(|e| e.to_string())?);
    for (var, secret) in &c.secret_env {
        match secrets.get(secret) {
            Some(Ok(Secret(v))) => {
                // Secret rotation must replace the container: hash the value in.
                hasher.update(format!("\0{var}\0{secret}\0").as_bytes());
                hasher.update(Sha256::digest(v.as_bytes()));
                env.insert(var.clone(), v.clone());
            }
            Some(Err(e)) => return Err(format!("secret {secret:?}: {e}")),
            None => return Err(format!("secret {secret:?} was not read")),
        }
    }
    let hash = hex::encode(hasher.finalize())[..16].to_string();
    let mut labels = c.labels.clone();
    labels.insert(LABEL_MANAGED.into(), "true".into());
    labels.insert(LABEL_NODE.into(), node.into());
    labels.insert(LABEL_NAME.into(), c.name.clone());
    labels.insert(LABEL_HASH.into(), hash.clone());
    labels.insert(
        LABEL_SPEC.into(),
        serde_json::to_string(c).map_err(|e| e.to_string())?,
    );
    let dur = |s: &Option<String>, default: u64| {
        s.as_deref()
            .and_then(parse_duration)
            .unwrap_or(Duration::from_secs(default))
    };
    let health = c.health_check.as_ref().map(|h| HealthSpec {
        command: h.command.clone(),
        interval: dur(&h.interval, 30),
        timeout: dur(&h.timeout, 30),
        start_period: dur(&h.start_period, 0),
        retries: h.retries.unwrap_or(3),
    });
    let resources = c.resources.as_ref();
    let spec = CreateSpec {
        name: c.name.clone(),
        image: c.image.clone(),
        // `entrypoint` is `command` under Compose's name (validation allows one).
        command: c.entrypoint.clone().or_else(|| c.command.clone()),
        args: c.args.clone(),
        env,
        ports: c.ports.clone(),
        volumes: c.volumes.clone(),
        cpus: resources.and_then(|r| r.cpus),
        memory: resources
            .and_then(|r| r.memory.as_deref())
            .and_then(parse_memory),
        pids: resources.and_then(|r| r.pids),
        health,
        labels,
        network: c.network.clone(),
        ip: c.ip.as_deref().and_then(|s| s.parse().ok()),
        stop_grace: stop_grace(c),
        settings: crate::driver::ContainerSettings::of(c),
    };
    Ok((spec, hash))
}

/// Whether the runtime's own inspect data still matches the desired spec (drift that
/// the spec-hash label cannot see: a tag that now points at another image, limits or
/// ports changed behind converge's back).
fn inspect_matches(
    rc: &RuntimeContainer,
    d: &CreateSpec,
    image_id: Option<&String>,
) -> Vec<String> {
    let mut drift = Vec::new();
    if let Some(id) = image_id {
        if &rc.image_id != id {
            drift.push(format!("image {} now resolves to {}", d.image, short(id)));
        }
    }
    if rc.memory != d.memory {
        drift.push("memory limit".into());
    }
    if d.pids.is_some() && rc.pids_limit != d.pids {
        drift.push("pids limit".into());
    }
    let want: BTreeSet<(String, u16, u16)> = d
        .ports
        .iter()
        .filter_map(|p| {
            Some((
                p.protocol.as_str().to_string(),
                p.container_port,
                p.host_port?,
            ))
        })
        .collect();
    let have: BTreeSet<(String, u16, u16)> = rc
        .ports
        .iter()
        .map(|p| (p.protocol.clone(), p.container_port, p.host_port))
        .collect();
    if want != have {
        drift.push("published ports".into());
    }
    let want: BTreeSet<&str> = d
        .volumes
        .iter()
        .map(|v| v.target.trim_end_matches('/'))
        .collect();
    let have: BTreeSet<&str> = rc
        .mounts
        .iter()
        .map(|m| m.target.trim_end_matches('/'))
        .collect();
    if !want.is_subset(&have) {
        drift.push("mounts".into());
    }
    drift
}

fn short(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
}

fn running(rc: &RuntimeContainer) -> bool {
    matches!(rc.state, RunState::Running | RunState::Restarting)
}

/// Whether the document's restart policy lets converge start an instance that is not
/// running: one that never ran always starts; an exited one per the policy.
fn restart_allowed(policy: RestartPolicy, rc: &RuntimeContainer) -> bool {
    if rc.state != RunState::Exited {
        return true;
    }
    match policy {
        RestartPolicy::Always | RestartPolicy::UnlessStopped => true,
        RestartPolicy::OnFailure => rc.exit_code != Some(0),
        RestartPolicy::No => false,
    }
}

/// Field-level differences between the document entry a container was created from
/// (its `converge.spec` label) and the desired one. Secret values never appear.
fn field_changes(old: Option<&str>, new: &Container) -> Vec<FieldChange> {
    let Ok(new_v) = serde_json::to_value(new) else {
        return Vec::new();
    };
    let old_v: serde_json::Value = old
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(serde_json::Value::Null);
    let empty = serde_json::Map::new();
    let (old_m, new_m) = (
        old_v.as_object().unwrap_or(&empty),
        new_v.as_object().unwrap_or(&empty),
    );
    let keys: BTreeSet<&String> = old_m.keys().chain(new_m.keys()).collect();
    keys.into_iter()
        .filter(|k| old_m.get(*k) != new_m.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map(|v| v.to_string());
            FieldChange::new(k.as_str(), show(old_m.get(k)), show(new_m.get(k)))
        })
        .collect()
}

/// The pure plan for the `containers` and `networks` sections (each may be absent:
/// then what converge created for it is left alone).
pub fn plan(spec: &Workload, observed: &Observed, node: &str, facts: &Facts) -> Plan<Action> {
    let containers = spec.containers.as_deref();
    let nets = match &spec.networks {
        Some(n) => networks::plan(n, containers, observed, node),
        None => networks::NetworkPlan::default(),
    };
    let mut plan = match containers {
        Some(c) => plan_containers(c, observed, node, facts, &nets, &spec.registries),
        None => Plan::default(),
    };
    let mut changes = nets.changes;
    changes.append(&mut plan.changes);
    plan.changes = changes;
    plan.waiting.extend(nets.waiting);
    // Pulls stay first; networks before the containers, removals after them.
    let pulls = plan
        .actions
        .iter()
        .take_while(|a| matches!(a, Action::Pull { .. }))
        .count();
    plan.actions.splice(pulls..pulls, nets.before);
    plan.actions.extend(nets.after);
    if let Some(images) = &spec.images {
        images::plan(images, observed, &spec.registries, &mut plan);
    }
    plan
}

/// The containers' part of the plan; the containers on a network `nets` replaces are
/// recreated (the network's own action removes their instances first).
fn plan_containers(
    spec: &[Container],
    observed: &Observed,
    node: &str,
    facts: &Facts,
    nets: &networks::NetworkPlan,
    registries: &[Registry],
) -> Plan<Action> {
    let replaced = &nets.replaced;
    let mut plan = Plan::default();
    let mut pulls: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // `always` images due for another pull (a tag that moved replaces its containers
    // at the pass after the pull, as any image drift does).
    for c in spec.iter().filter(|c| c.pull_policy == PullPolicy::Always) {
        if observed.refresh.contains(&c.image) {
            pulls
                .entry(c.image.clone())
                .or_default()
                .push(c.name.clone());
        }
    }
    for image in pulls.keys() {
        plan.changes.push(
            Change::new(Op::Update, "image", image).with_field(FieldChange::new(
                "pull",
                None,
                Some("again (pullPolicy: always)".into()),
            )),
        );
    }
    let mut by_name: BTreeMap<&str, Vec<&RuntimeContainer>> = BTreeMap::new();
    for rc in &observed.containers {
        if let Some(n) = rc.labels.get(LABEL_NAME) {
            by_name.entry(n.as_str()).or_default().push(rc);
        }
    }
    for c in spec {
        let mut cands = by_name.remove(c.name.as_str()).unwrap_or_default();
        // Instances on a network being replaced are removed by the network's action.
        let on_replaced = c.network.as_ref().filter(|n| replaced.contains(*n));
        if on_replaced.is_some() {
            cands.retain(|rc| !nets.removed.contains(&rc.name));
        }
        let recreated = on_replaced.filter(|_| {
            observed
                .containers
                .iter()
                .any(|rc| rc.labels.get(LABEL_NAME) == Some(&c.name))
        });
        let built = match observed.desired.get(&c.name) {
            Some(d) => d.clone(),
            None => desired(c, node, &observed.secrets),
        };
        let (want, hash) = match built {
            Ok(d) => d,
            Err(e) => {
                // Shown, and failed at apply time so the status names the container.
                plan.changes.push(
                    Change::new(Op::Update, "container", &c.name).with_field(FieldChange::new(
                        "error",
                        None,
                        Some(e.clone()),
                    )),
                );
                plan.actions.push(Action::Invalid {
                    object: format!("container {}", c.name),
                    error: e,
                });
                continue;
            }
        };
        let local = observed.images.get(&c.image).and_then(Option::as_ref);
        let image_id = local.map(|i| &i.id);
        let is_fresh = |rc: &&RuntimeContainer| {
            rc.labels.get(LABEL_HASH) == Some(&hash)
                && inspect_matches(rc, &want, image_id).is_empty()
        };
        // Prefer a fresh running instance, then one already under the final name.
        let mut fresh: Vec<&RuntimeContainer> =
            cands.iter().copied().filter(|rc| is_fresh(rc)).collect();
        fresh.sort_by_key(|rc| (!running(rc), rc.name != c.name, rc.id.clone()));
        let keep = fresh.first().copied();
        let grace = want.stop_grace;
        let wants_running = c.desired_state == ContainerState::Running;
        let mut steps = Vec::new();
        let mut change: Option<Change> = None;
        match keep {
            Some(k) => {
                // A ready replacement under the temporary name: the old instance goes
                // once no consumer sends traffic to it any more (or after a timeout).
                let switching = k.name != c.name && ready(k);
                let olds: Vec<&RuntimeContainer> = cands
                    .iter()
                    .copied()
                    .filter(|rc| rc.id != k.id && running(rc))
                    .collect();
                let old_addresses: Vec<std::net::IpAddr> =
                    olds.iter().flat_map(|rc| rc.addresses.clone()).collect();
                let users = facts.users_of(&old_addresses);
                let waited = observed.switching.get(&c.name).copied().unwrap_or_default();
                if switching && !users.is_empty() && waited < SWITCH_TIMEOUT {
                    plan.waiting.push(
                        Waiting::new(
                            "container",
                            &c.name,
                            format!(
                                "new instance ready; the old one serves until {} switch{} to it",
                                users.join(", "),
                                if users.len() == 1 { "es" } else { "" }
                            ),
                        )
                        .retry_after(SWITCH_POLL)
                        .in_progress(),
                    );
                    continue;
                }
                for rc in cands.iter().filter(|rc| rc.id != k.id) {
                    steps.push(if switching && running(rc) {
                        Step::Retire {
                            id: rc.id.clone(),
                            grace,
                        }
                    } else {
                        Step::Remove {
                            id: rc.id.clone(),
                            grace,
                        }
                    });
                    change
                        .get_or_insert_with(|| Change::new(Op::Update, "container", &c.name))
                        .fields
                        .push(FieldChange::new(
                            "remove stale instance",
                            Some(rc.name.clone()),
                            None,
                        ));
                }
                if k.name != c.name {
                    steps.push(Step::Rename {
                        id: k.id.clone(),
                        to: c.name.clone(),
                    });
                    change
                        .get_or_insert_with(|| Change::new(Op::Update, "container", &c.name))
                        .fields
                        .push(FieldChange::new(
                            "name",
                            Some(k.name.clone()),
                            Some(c.name.clone()),
                        ));
                }
                let crashes = observed.crashes.get(&c.name).copied().unwrap_or_default();
                let wait = crashes.wait();
                if wants_running && !running(k) && restart_allowed(c.restart, k) && !wait.is_zero()
                {
                    // Crash-loop back-off: not a failure, a wait on this container alone.
                    let exit = k
                        .exit_code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "?".into());
                    plan.waiting.push(
                        Waiting::new(
                            "container",
                            &c.name,
                            format!(
                                "crash loop back-off: exited with {exit}, {} restarts, next in {:.1}s",
                                crashes.count,
                                wait.as_secs_f64()
                            ),
                        )
                        .retry_after(wait),
                    );
                } else if wants_running && !running(k) && restart_allowed(c.restart, k) {
                    steps.push(Step::Start {
                        id: k.id.clone(),
                        exit_code: k.exit_code,
                    });
                    let was = match k.exit_code {
                        Some(code) if k.state == RunState::Exited => format!("exited ({code})"),
                        _ => format!("{:?}", k.state).to_lowercase(),
                    };
                    change
                        .get_or_insert_with(|| Change::new(Op::Update, "container", &c.name))
                        .fields
                        .push(FieldChange::new("state", Some(was), Some("running".into())));
                } else if !wants_running && running(k) {
                    steps.push(Step::Stop {
                        id: k.id.clone(),
                        grace,
                    });
                    change
                        .get_or_insert_with(|| Change::new(Op::Update, "container", &c.name))
                        .fields
                        .push(FieldChange::new(
                            "state",
                            Some("running".into()),
                            Some("stopped".into()),
                        ));
                }
            }
            None => {
                if image_id.is_none() {
                    if c.pull_policy == PullPolicy::Never {
                        plan.waiting.push(
                            Waiting::new(
                                "container",
                                &c.name,
                                format!("image {} is not on the node and its pullPolicy is never: load or pre-pull it", c.image),
                            )
                            .failed(),
                        );
                        continue;
                    }
                    let users = pulls.entry(c.image.clone()).or_default();
                    if !users.contains(&c.name) {
                        users.push(c.name.clone());
                    }
                }
                let old: Vec<String> = cands.iter().map(|rc| rc.id.clone()).collect();
                if cands.is_empty() {
                    let mut ch = Change::new(Op::Create, "container", &c.name)
                        .with_field(FieldChange::new("image", None, Some(c.image.clone())));
                    if let Some(d) = local.and_then(|i| i.digests.first()) {
                        ch = ch.with_field(FieldChange::new("digest", None, Some(d.clone())));
                    }
                    if !c.ports.is_empty() {
                        let ports: Vec<String> = c
                            .ports
                            .iter()
                            .map(|p| match p.host_port {
                                Some(h) => {
                                    format!("{h}:{}/{}", p.container_port, p.protocol.as_str())
                                }
                                None => format!("{}/{}", p.container_port, p.protocol.as_str()),
                            })
                            .collect();
                        ch = ch.with_field(FieldChange::new("ports", None, Some(ports.join(", "))));
                    }
                    change = Some(ch);
                    steps.push(Step::Create {
                        spec: want,
                        start: wants_running,
                    });
                } else {
                    let current = cands
                        .iter()
                        .find(|rc| running(rc))
                        .or(cands.first())
                        .copied();
                    let mut ch = Change::new(Op::Update, "container", &c.name);
                    ch.fields = field_changes(
                        current
                            .and_then(|rc| rc.labels.get(LABEL_SPEC))
                            .map(String::as_str),
                        c,
                    );
                    if let Some(rc) = current {
                        if rc.labels.get(LABEL_HASH) == Some(&hash) {
                            // Same spec: the drift comes from the runtime side.
                            for d in inspect_matches(rc, &want, image_id) {
                                ch.fields.push(FieldChange::new("drift", None, Some(d)));
                            }
                        } else if ch.fields.is_empty() {
                            ch.fields.push(FieldChange::new(
                                "secrets",
                                Some("<redacted>".into()),
                                Some("<redacted>".into()),
                            ));
                        }
                    }
                    let has_host_ports = want.ports.iter().any(|p| p.host_port.is_some());
                    let old_running = cands.iter().any(|rc| running(rc));
                    // Consumers sending traffic to the old instance switch before it stops.
                    let old_addresses: Vec<std::net::IpAddr> = cands
                        .iter()
                        .filter(|rc| running(rc))
                        .flat_map(|rc| rc.addresses.clone())
                        .collect();
                    let users = facts.users_of(&old_addresses);
                    // Two instances cannot hold the same host port or static address.
                    if wants_running && old_running && !has_host_ports && want.ip.is_none() {
                        let strategy = if users.is_empty() {
                            "start new, wait healthy, stop old".to_string()
                        } else {
                            format!(
                                "start new, wait healthy, switch {}, stop old",
                                users.join(", ")
                            )
                        };
                        ch.fields
                            .push(FieldChange::new("strategy", None, Some(strategy)));
                        let mut temp = want;
                        temp.name = format!("{}{NEXT_SUFFIX}", c.name);
                        // A stale temporary instance (an interrupted replace towards an
                        // older spec) holds the name the new one needs: remove it first.
                        let (stale_temp, old): (Vec<&RuntimeContainer>, Vec<&RuntimeContainer>) =
                            cands.iter().copied().partition(|rc| rc.name == temp.name);
                        for rc in stale_temp {
                            steps.push(Step::Remove {
                                id: rc.id.clone(),
                                grace: temp.stop_grace,
                            });
                        }
                        if users.is_empty() {
                            steps.push(Step::StartFirst {
                                spec: temp,
                                old: old.iter().map(|rc| rc.id.clone()).collect(),
                                final_name: c.name.clone(),
                            });
                        } else {
                            steps.push(Step::StartNext { spec: temp });
                        }
                    } else {
                        let strategy = if !(wants_running && old_running) {
                            "remove old, create new"
                        } else if has_host_ports {
                            "stop old, start new (host ports)"
                        } else {
                            "stop old, start new (static ip)"
                        };
                        ch.fields
                            .push(FieldChange::new("strategy", None, Some(strategy.into())));
                        steps.push(Step::StopFirst {
                            spec: want,
                            old,
                            start: wants_running,
                        });
                    }
                    change = Some(ch);
                }
            }
        }
        if let (Some(ch), Some(n)) = (change.as_mut(), recreated) {
            ch.op = Op::Update;
            ch.fields.push(FieldChange::new(
                "network",
                None,
                Some(format!("recreated on the replaced network {n}")),
            ));
        }
        if let Some(ch) = change {
            plan.changes.push(ch);
            plan.actions.push(Action::Container {
                name: c.name.clone(),
                steps,
            });
        }
    }
    // Managed containers the document no longer lists.
    for (name, cands) in by_name {
        let old: Option<Container> = cands.iter().find_map(|rc| recorded(rc));
        let grace = old.as_ref().map_or(Duration::from_secs(10), stop_grace);
        let mut steps: Vec<Step> = cands
            .iter()
            .map(|rc| Step::Remove {
                id: rc.id.clone(),
                grace,
            })
            .collect();
        let mut ch = Change::new(Op::Delete, "container", name);
        if let Some(o) = old.as_ref().filter(|o| o.remove_volumes_on_delete) {
            let names: Vec<String> = o
                .volumes
                .iter()
                .filter(|v| !v.is_bind())
                .map(|v| v.source.clone())
                .collect();
            if !names.is_empty() {
                ch = ch.with_field(FieldChange::new("volumes", Some(names.join(", ")), None));
                steps.push(Step::RemoveVolumes { names });
            }
        }
        plan.changes.push(ch);
        plan.actions.push(Action::Container {
            name: name.to_string(),
            steps,
        });
    }
    let pull_actions = pulls
        .into_iter()
        .map(|(image, for_containers)| Action::Pull {
            registry: crate::registry::for_image(registries, &image).cloned(),
            image,
            for_containers,
        });
    plan.actions.splice(0..0, pull_actions);
    plan
}

#[cfg(test)]
mod tests;
