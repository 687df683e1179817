//! Which reconcilers this build runs, bound to their document sections.

use crate::document::Document;
use crate::engine::{Bound, Section};
use converge_backups::driver::runtime::RuntimeCli;
use converge_backups::{Backups, BackupsSpec};
use converge_containers::driver::NoRuntime;
use converge_containers::{Config as ContainersConfig, Containers, NodeResolver, Workload};
use converge_core::SecretSource;
use converge_dns::driver::Dnsmasq;
use converge_dns::{Dns, DnsSpec, Layout};
use converge_firewall::{FilterPolicy, FilterRule, Firewall, FirewallSpec, Kernel, Protocol};
use converge_metadata::{Metadata, Served};
use converge_routes::driver::{Caddy, CaddyConfig};
use converge_routes::{Routes, RoutesInput};
use converge_wireguard::driver::Unavailable;
use converge_wireguard::{
    Config as WireguardConfig, System, SystemConfig, WireguardReconciler, WireguardSpec,
};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Which container runtime the node uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeChoice {
    /// Podman if its socket exists, else Docker if its socket exists.
    Auto,
    Podman,
    Docker,
}

/// Host settings shared by every command that touches the host.
#[derive(Clone, Debug, clap::Args)]
pub struct HostOptions {
    /// Container runtime.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "CONVERGE_RUNTIME",
        default_value = "auto"
    )]
    pub runtime: RuntimeChoice,
    /// Podman API socket (libpod).
    #[arg(
        long,
        global = true,
        env = "CONVERGE_PODMAN_SOCKET",
        default_value = "/run/podman/podman.sock"
    )]
    pub podman_socket: PathBuf,
    /// Docker API socket.
    #[arg(
        long,
        global = true,
        env = "CONVERGE_DOCKER_SOCKET",
        default_value = "/var/run/docker.sock"
    )]
    pub docker_socket: PathBuf,
    /// Directory of local secret files, one file per secret name.
    #[arg(
        long,
        global = true,
        env = "CONVERGE_SECRETS_DIR",
        default_value = "/etc/converge/secrets"
    )]
    pub secrets_dir: PathBuf,
    /// The caddy binary the routes reconciler runs (proxy nodes).
    #[arg(long, global = true, env = "CONVERGE_CADDY", default_value = "caddy")]
    pub caddy: PathBuf,
    /// Admin socket of a Caddy run by someone else (e.g. its systemd unit, with
    /// `admin unix//run/caddy/admin.sock` in its config): converge then talks to it and
    /// neither starts nor stops Caddy. Default: converge runs its own Caddy under
    /// `<data-dir>/caddy/`.
    #[arg(long, global = true, env = "CONVERGE_CADDY_ADMIN_SOCKET")]
    pub caddy_admin_socket: Option<PathBuf>,
    /// Least time between two Caddy configuration loads, in ms: every load reloads
    /// Caddy and can cost connections in flight, so changes arriving faster are held
    /// and applied together (as kube-proxy's min sync period). 0: no hold.
    #[arg(
        long,
        global = true,
        env = "CONVERGE_CADDY_MIN_RELOAD_MS",
        default_value_t = 1000
    )]
    pub caddy_min_reload_ms: u64,
    /// After a configuration switch, how long (ms) the old Caddy instance keeps
    /// answering the connections it already had (each answer closes its connection)
    /// before it is reloaded. Raise it for long requests (large uploads); 0-600000.
    #[arg(
        long,
        global = true,
        env = "CONVERGE_CADDY_DRAIN_MS",
        default_value_t = 500,
        value_parser = clap::value_parser!(u64).range(0..=600_000)
    )]
    pub caddy_drain_ms: u64,
    /// System user converge runs its Caddy instances as (created by
    /// `install/setup.sh --proxy`); a missing user is an error. `root` runs Caddy as
    /// root (not recommended).
    #[arg(
        long,
        global = true,
        env = "CONVERGE_CADDY_USER",
        default_value = converge_routes::driver::user::DEFAULT_USER
    )]
    pub caddy_user: String,
}

/// The containers reconciler on the chosen runtime (also `converge reset`'s). In the
/// agent (`background`) prefetch pulls run in their own tasks.
pub fn containers(
    host: &HostOptions,
    node_id: &str,
    secrets: &SecretSource,
    background: bool,
) -> Arc<dyn Section> {
    let mut config = ContainersConfig::new(node_id, &host.secrets_dir);
    config.secrets = secrets.clone();
    config.background_prefetch = background;
    fn select(d: &Document) -> Option<Cow<'_, Workload>> {
        if d.containers.is_none() && d.networks.is_none() && d.images.is_none() {
            return None;
        }
        let mut containers = d.containers.clone();
        if let (Some(cs), Some(r)) = (containers.as_mut(), node_resolver(d)) {
            cs.iter_mut().for_each(|c| r.apply(c));
        }
        Some(Cow::Owned(Workload {
            containers,
            networks: d.networks.clone(),
            registries: d.registries.clone().unwrap_or_default(),
            images: d.images.clone(),
        }))
    }
    let podman = || {
        Arc::new(Bound::new(
            Containers::new(
                converge_containers::podman::Podman::new(&host.podman_socket),
                config.clone(),
            ),
            select,
        )) as Arc<dyn Section>
    };
    let docker = || {
        Arc::new(Bound::new(
            Containers::new(
                converge_containers::docker::Docker::new(&host.docker_socket),
                config.clone(),
            ),
            select,
        )) as Arc<dyn Section>
    };
    match host.runtime {
        RuntimeChoice::Podman => podman(),
        RuntimeChoice::Docker => docker(),
        RuntimeChoice::Auto if host.podman_socket.exists() => podman(),
        RuntimeChoice::Auto if uses_docker(host) => docker(),
        RuntimeChoice::Auto => {
            let why = format!(
                "neither {} nor {} exists",
                host.podman_socket.display(),
                host.docker_socket.display()
            );
            Arc::new(Bound::new(Containers::new(NoRuntime(why), config), select))
        }
    }
}

/// Every reconciler, in document order (the containers reconciler also owns the
/// `networks` section).
pub const ALL: [&str; 8] = [
    "containers",
    "wireguard",
    "firewall",
    "dns",
    "routes",
    "backups",
    "metadata",
    "agent",
];

/// The dnsmasq binary: `$CONVERGE_DNSMASQ`, else Debian's path, else `dnsmasq` on PATH.
fn dnsmasq_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CONVERGE_DNSMASQ") {
        return PathBuf::from(p);
    }
    let debian = Path::new("/usr/sbin/dnsmasq");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("dnsmasq")
    }
}

/// The wireguard-go binary: `$CONVERGE_WIREGUARD_GO`, else `wireguard-go` on PATH.
fn wireguard_go_binary() -> PathBuf {
    std::env::var_os("CONVERGE_WIREGUARD_GO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("wireguard-go"))
}

/// The WireGuard reconciler: generated keys under `<data_dir>/wireguard/`, secrets from
/// `--secrets-dir`. Its netlink sockets are opened here, in the agent's network
/// namespace; if that fails every pass reports why.
fn wireguard(
    data_dir: &Path,
    host: &HostOptions,
    resync: Duration,
    secrets: &SecretSource,
) -> Arc<dyn Section> {
    let mut config = WireguardConfig::new(data_dir, &host.secrets_dir);
    config.secrets = secrets.clone();
    // Every resync reads the device in full (jitter takes up to 10 % off the period).
    config.full_read_after = config.full_read_after.min(resync.mul_f64(0.85));
    fn select(d: &Document) -> Option<Cow<'_, WireguardSpec>> {
        d.wireguard.as_ref().map(Cow::Borrowed)
    }
    let driver = System::new(SystemConfig {
        wireguard_go: wireguard_go_binary(),
        ..SystemConfig::default()
    });
    match driver {
        Ok(d) => Arc::new(Bound::new(WireguardReconciler::new(d, config), select)),
        Err(e) => {
            let why = format!("cannot open netlink sockets: {e}");
            Arc::new(Bound::new(
                WireguardReconciler::new(Unavailable(why), config),
                select,
            ))
        }
    }
}

/// The backups reconciler: its record and borg's cache under `<data_dir>/backups/`,
/// borg from `$CONVERGE_BORG` (else `borg` on PATH), volumes and container hooks through
/// the chosen runtime's CLI against its socket. In the agent (`background`) a backup runs
/// in its own task and a later pass records it; one-shot commands wait for it.
fn backups(
    data_dir: &Path,
    host: &HostOptions,
    secrets: &SecretSource,
    background: bool,
) -> Arc<dyn Section> {
    let mut cfg = converge_backups::HostConfig::new(data_dir, secrets.clone());
    if let Some(b) = std::env::var_os("CONVERGE_BORG") {
        cfg.borg = PathBuf::from(b);
    }
    // Test-only compressed time: `SCALE@UNIX_SECONDS` (tests/backups.rs).
    if let Ok(v) = std::env::var("CONVERGE_TEST_BACKUPS_TIME") {
        let parsed = v.split_once('@').and_then(|(s, e)| {
            let epoch = chrono::DateTime::from_timestamp(e.parse().ok()?, 0)?;
            Some((s.parse::<u32>().ok()?, epoch))
        });
        if let Some((scale, epoch)) = parsed {
            tracing::warn!(scale, "backups: compressed test time");
            cfg.compressed_clock(scale, epoch);
        }
    }
    let podman = || Some(RuntimeCli::podman(Some(&host.podman_socket)));
    let docker = || Some(RuntimeCli::docker(Some(&host.docker_socket)));
    cfg.runtime = match host.runtime {
        RuntimeChoice::Podman => podman(),
        RuntimeChoice::Docker => docker(),
        RuntimeChoice::Auto if host.podman_socket.exists() => podman(),
        RuntimeChoice::Auto if host.docker_socket.exists() => docker(),
        RuntimeChoice::Auto => None,
    };
    fn select(d: &Document) -> Option<Cow<'_, BackupsSpec>> {
        d.backups.as_ref().map(Cow::Borrowed)
    }
    Arc::new(Bound::new(
        Backups::new(converge_backups::Host::new(cfg), background),
        select,
    ))
}

/// The zone of the node's resolver for the containers on its networks: the `dns`
/// section's, answered on the gateway of every network of the `networks` section, when
/// the section answers on port 53 (a container's resolv.conf cannot name another port).
fn resolver_zone(d: &Document) -> Option<&str> {
    let dns = d.dns.as_ref().filter(|s| s.port == 53)?;
    d.networks.as_ref().filter(|n| !n.is_empty())?;
    Some(&dns.zone)
}

/// That resolver with the gateways of each network, as the containers get it.
fn node_resolver(d: &Document) -> Option<NodeResolver> {
    let networks = d.networks.as_deref().unwrap_or_default();
    Some(NodeResolver::new(resolver_zone(d)?, networks, &d.node.id))
}

/// The dns section as served: its `listen` addresses plus the gateways of the node's
/// resolver for containers.
fn dns_served(d: &Document) -> Option<Cow<'_, DnsSpec>> {
    let spec = d.dns.as_ref()?;
    let Some(r) = node_resolver(d) else {
        return Some(Cow::Borrowed(spec));
    };
    let mut spec = spec.clone();
    for gw in r.gateways.values().flatten() {
        if !spec.listen.contains(gw) {
            spec.listen.push(*gw);
        }
    }
    Some(Cow::Owned(spec))
}

/// Whether the containers run on Docker (chosen, or found when no Podman socket is):
/// the firewall then keeps its rule in Docker's `DOCKER-USER` chain.
fn uses_docker(host: &HostOptions) -> bool {
    match host.runtime {
        RuntimeChoice::Docker => true,
        RuntimeChoice::Podman => false,
        RuntimeChoice::Auto => !host.podman_socket.exists() && host.docker_socket.exists(),
    }
}

/// The firewall section as enforced: with an input policy of `drop`, the containers of
/// each network reach the node's resolver on their gateway (udp and tcp 53), where
/// their resolv.conf sends them.
fn firewall_enforced(d: &Document) -> Option<Cow<'_, FirewallSpec>> {
    let spec = d.firewall.as_ref()?;
    let drops = spec
        .input
        .as_ref()
        .is_some_and(|i| i.policy == FilterPolicy::Drop);
    if !drops || resolver_zone(d).is_none() {
        return Some(Cow::Borrowed(spec));
    }
    let rules = d
        .networks
        .iter()
        .flatten()
        .flat_map(|n| converge_containers::plan::network_spec(n, &d.node.id).subnets)
        .flat_map(|(net, gw)| {
            [Protocol::Udp, Protocol::Tcp].map(|protocol| FilterRule {
                from: vec![net.to_string()],
                to: vec![ipnet::IpNet::from(gw).to_string()],
                protocol: Some(protocol),
                ports: vec![53],
            })
        });
    let mut spec = spec.clone();
    if let Some(input) = spec.input.as_mut() {
        input.allow.extend(rules);
    }
    Some(Cow::Owned(spec))
}

/// The metadata section resolved against the document: its default listen addresses
/// include the gateway of every container network (where containers reach the node),
/// so the metadata reconciler needs no knowledge of the containers section.
fn served(d: &Document) -> Option<Cow<'_, Served>> {
    let m = d.metadata.as_ref()?;
    let gateways: Vec<std::net::IpAddr> = d
        .networks
        .iter()
        .flatten()
        .flat_map(|n| converge_containers::plan::network_spec(n, &d.node.id).subnets)
        .map(|(_, gw)| gw)
        .collect();
    Some(Cow::Owned(Served::new(m, &gateways)))
}

/// The metadata reconciler: the database `<data_dir>/metadata.db`, and in the agent
/// (`serve`) the read API, serving the stored data from construction on.
fn metadata(data_dir: &Path, serve: bool) -> Arc<dyn Section> {
    let mut driver = if serve {
        converge_metadata::Host::serving(data_dir)
    } else {
        converge_metadata::Host::offline(data_dir)
    };
    // Test-only: the node's /etc files (hostname, motd) under another directory
    // (tests/node_settings.rs; the host name itself is the agent's UTS namespace's).
    if let Some(etc) = std::env::var_os("CONVERGE_TEST_ETC_DIR") {
        tracing::warn!(etc = ?etc, "metadata: test /etc directory");
        driver = driver.with_etc(etc);
    }
    Arc::new(Bound::new(Metadata::new(driver), served))
}

/// The agent's reconcilers: as [`sections`], plus the metadata read API served by
/// this process (needs the tokio runtime).
pub fn agent_sections(
    data_dir: &Path,
    host: &HostOptions,
    node_id: &str,
    resync: Duration,
    secrets: &SecretSource,
) -> Vec<Arc<dyn Section>> {
    build(data_dir, host, node_id, resync, secrets, true)
}

/// The routes reconciler: Caddy under `<data_dir>/caddy/` (or the given admin socket).
/// It sees its section plus each WireGuard peer's mesh address (the first address of
/// its `allowedIps`), which `peer` upstreams dial.
fn routes(data_dir: &Path, host: &HostOptions, secrets: &SecretSource) -> Arc<dyn Section> {
    let driver = Caddy::new(CaddyConfig {
        binary: host.caddy.clone(),
        dir: data_dir.join("caddy"),
        external_admin: host.caddy_admin_socket.clone(),
        secrets: secrets.clone(),
        min_reload_interval: Duration::from_millis(host.caddy_min_reload_ms),
        user: host.caddy_user.clone(),
        drain: Duration::from_millis(host.caddy_drain_ms),
    });
    fn select(d: &Document) -> Option<Cow<'_, RoutesInput>> {
        let spec = d.routes.as_ref()?;
        let peers = d
            .wireguard
            .iter()
            .flat_map(|w| w.peers.iter())
            .filter_map(|p| {
                let first = p.allowed_ips.first()?.parse::<ipnet::IpNet>().ok()?;
                Some((p.name.clone(), first.addr()))
            })
            .collect();
        Some(Cow::Owned(RoutesInput {
            spec: spec.clone(),
            peers,
        }))
    }
    Arc::new(Bound::new(Routes::new(driver), select))
}

/// The reconcilers of this build with their real drivers: files under `data_dir`,
/// containers labelled with `node_id`; `resync` is the engine's drift-repair period;
/// secrets from `secrets` (local files, and the document's opened sealed values). For
/// one-shot commands (`apply`, `diff`): the metadata database is written, nothing served.
pub fn sections(
    data_dir: &Path,
    host: &HostOptions,
    node_id: &str,
    resync: Duration,
    secrets: &SecretSource,
) -> Vec<Arc<dyn Section>> {
    build(data_dir, host, node_id, resync, secrets, false)
}

/// What `converge diff` computes for a candidate document: one dry pass of every
/// reconciler this build has (publishers first, then the fact watchers, as `run_once`
/// does) against the real host, and the sections this build cannot run yet. With `only`,
/// the plan of that reconciler alone (planned with the facts it watches). Nothing on the
/// host changes; the control plane's dry run (`converge control-plane plan`) runs this
/// too, in the agent.
pub async fn diff(
    data_dir: &Path,
    host: &HostOptions,
    doc: Document,
    secrets: &SecretSource,
    only: Option<&str>,
) -> (
    std::collections::BTreeMap<&'static str, crate::engine::PassResult>,
    Vec<&'static str>,
) {
    let mut sections = sections(
        data_dir,
        host,
        &doc.node.id,
        crate::engine::EngineConfig::default().resync,
        secrets,
    );
    let mut unbuilt: Vec<&'static str> = ALL
        .into_iter()
        .filter(|n| has_section(&doc, n) && !sections.iter().any(|s| s.name() == *n))
        .collect();
    if let Some(r) = only {
        // A reconciler that uses facts (container addresses) is planned with them: the
        // publishers run too, and only its plan is shown.
        let watches = sections.iter().any(|s| s.name() == r && s.watches_facts());
        sections.retain(|s| s.name() == r || (watches && !s.watches_facts()));
        unbuilt.retain(|u| *u == r);
    }
    let mut results = crate::engine::run_once(&sections, Arc::new(doc), true).await;
    if let Some(r) = only {
        results.retain(|name, _| *name == r);
    }
    (results, unbuilt)
}

fn build(
    data_dir: &Path,
    host: &HostOptions,
    node_id: &str,
    resync: Duration,
    secrets: &SecretSource,
    serve: bool,
) -> Vec<Arc<dyn Section>> {
    let dns = Dns::new(Dnsmasq::new(
        Layout::new(data_dir.join("dns")),
        dnsmasq_binary(),
    ));
    let firewall = Firewall::new(Kernel::new()).with_docker(uses_docker(host));
    vec![
        containers(host, node_id, secrets, serve),
        wireguard(data_dir, host, resync, secrets),
        Arc::new(Bound::new(firewall, firewall_enforced)),
        Arc::new(Bound::new(dns, dns_served)),
        backups(data_dir, host, secrets, serve),
        metadata(data_dir, serve),
        // Unmanaged on workers: validation refuses a routes section there.
        routes(data_dir, host, secrets),
        selfupdate(data_dir),
    ]
}

/// The self-update reconciler: downloads under `<data_dir>/selfupdate`, trusting the
/// control plane's CA (from join) besides the public roots.
fn selfupdate(data_dir: &Path) -> Arc<dyn Section> {
    let ca_pem = crate::control::protocol::ControlConfig::load(data_dir)
        .ok()
        .flatten()
        .and_then(|c| c.ca_cert);
    let host = converge_selfupdate::Host::new(converge_selfupdate::HostConfig {
        dir: data_dir.join("selfupdate"),
        data_dir: data_dir.to_path_buf(),
        version: format!("converge {}", crate::VERSION),
        update_script: crate::control::artifacts::UPDATE_SH,
        ca_pem,
    });
    Arc::new(Bound::new(
        converge_selfupdate::SelfUpdate::new(host),
        |d: &Document| d.agent.as_ref().map(Cow::Borrowed),
    ))
}

/// Whether the document has a section for reconciler `name`.
pub fn has_section(doc: &Document, name: &str) -> bool {
    match name {
        "containers" => doc.containers.is_some() || doc.networks.is_some() || doc.images.is_some(),
        "wireguard" => doc.wireguard.is_some(),
        "firewall" => doc.firewall.is_some(),
        "dns" => doc.dns.is_some(),
        "routes" => doc.routes.is_some(),
        "backups" => doc.backups.is_some(),
        "metadata" => doc.metadata.is_some(),
        "agent" => doc.agent.is_some(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::{parse, Format};

    fn worker() -> Document {
        let text = include_str!("../fixtures/worker.json");
        parse(text, Format::Json).expect("fixture parses")
    }

    #[test]
    fn the_node_resolver_reaches_containers_dnsmasq_and_the_firewall() {
        let d = worker();
        // The network's gateways, IPv4 first (the IPv6 one as the network defaults it).
        let apps = &d.networks.as_ref().unwrap()[0];
        let gws: Vec<String> = converge_containers::plan::network_spec(apps, &d.node.id)
            .subnets
            .iter()
            .map(|(_, gw)| gw.to_string())
            .collect();
        assert_eq!(gws[0], "10.89.7.1");
        let v6 = gws[1].clone();
        // Containers on `apps` get the gateways and the zone.
        let mut web = d.containers.as_ref().unwrap()[0].clone();
        assert_eq!(web.network.as_deref(), Some("apps"));
        node_resolver(&d).unwrap().apply(&mut web);
        assert_eq!(
            serde_json::to_value(&web.dns).unwrap(),
            serde_json::json!({"servers": ["10.89.7.1", v6], "search": ["internal"]})
        );
        // dnsmasq also listens on the gateways.
        let served = dns_served(&d).unwrap();
        let listen: Vec<String> = served.listen.iter().map(ToString::to_string).collect();
        assert_eq!(listen, ["10.210.0.7", "10.89.7.1", &v6]);
        // Input policy drop: the subnets reach their gateway on udp/tcp 53.
        let fw = firewall_enforced(&d).unwrap();
        let allow = &fw.input.as_ref().unwrap().allow;
        let added = &allow[d
            .firewall
            .as_ref()
            .unwrap()
            .input
            .as_ref()
            .unwrap()
            .allow
            .len()..];
        let shown: Vec<String> = added
            .iter()
            .map(|r| format!("{} {} {:?} {:?}", r.from[0], r.to[0], r.protocol, r.ports))
            .collect();
        assert_eq!(
            shown,
            [
                "10.89.7.0/24 10.89.7.1/32 Some(Udp) [53]".to_string(),
                "10.89.7.0/24 10.89.7.1/32 Some(Tcp) [53]".into(),
                format!("fd00:89:7::/64 {v6}/128 Some(Udp) [53]"),
                format!("fd00:89:7::/64 {v6}/128 Some(Tcp) [53]"),
            ]
        );
    }

    #[test]
    fn no_resolver_without_port_53_or_networks() {
        let mut d = worker();
        d.dns.as_mut().unwrap().port = 5353;
        assert!(matches!(dns_served(&d), Some(Cow::Borrowed(_))));
        assert!(matches!(firewall_enforced(&d), Some(Cow::Borrowed(_))));
        assert!(node_resolver(&d).is_none());
        let mut d = worker();
        d.networks = None;
        assert!(matches!(dns_served(&d), Some(Cow::Borrowed(_))));
        // An input policy of accept needs no rule.
        let mut d = worker();
        d.firewall.as_mut().unwrap().input.as_mut().unwrap().policy = FilterPolicy::Accept;
        assert!(matches!(firewall_enforced(&d), Some(Cow::Borrowed(_))));
    }
}
