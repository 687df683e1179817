//! The pure plan: what observe saw (interface, addresses, routes, peers, and the inputs
//! read for this pass: keys, pre-shared keys, resolved endpoints) diffed against the
//! section, peer by peer, keyed by public key. No I/O, no clock (observe stamps `now`).

use crate::spec::{Endpoint, Parsed, PeerWant, PublicKey, WireguardSpec};
use converge_core::{redact, Change, FieldChange, Op, Plan, Waiting};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A peer whose last handshake is more recent than this keeps the endpoint it roamed
/// to (WireGuard rekeys every 2 minutes on a live session, so 180 s means "alive").
pub const ROAMING_WINDOW: Duration = Duration::from_secs(180);
/// How often a pass runs to re-resolve DNS-name endpoints.
pub const RERESOLVE_EVERY: Duration = Duration::from_secs(120);
/// Retry delay for a DNS name that failed to resolve or a secret that cannot be read.
pub const INPUT_RETRY: Duration = Duration::from_secs(10);

/// Which WireGuard implementation carries the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The kernel module (a `wireguard` link).
    Kernel,
    /// wireguard-go (a TUN device and a UAPI socket), where the module is missing.
    Userspace,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Kernel => "kernel",
            Backend::Userspace => "userspace (wireguard-go)",
        })
    }
}

/// The interface as netlink shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub mtu: u32,
    pub up: bool,
    pub backend: Backend,
}

/// A 32-byte secret (private or pre-shared key). Never printed: `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(pub [u8; 32]);

impl SecretKey {
    /// The public key of this private key.
    pub fn public(&self) -> PublicKey {
        PublicKey(wireguard_control::Key(self.0).get_public().0)
    }

    /// An in-memory fingerprint (keyed per process) to compare keys without keeping them.
    pub fn fingerprint(&self) -> u64 {
        crate::spec::digest(&self.0)
    }

    /// The redacted form shown in diffs.
    pub fn redacted(&self) -> String {
        redact(&PublicKey(self.0).to_base64())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// One peer as the device reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerState {
    pub endpoint: Option<SocketAddr>,
    /// Sorted, without repeats.
    pub allowed: Vec<IpNet>,
    /// 0: off.
    pub keepalive: u16,
    /// Fingerprint of the pre-shared key ([`SecretKey::fingerprint`]); `None`: no key.
    pub psk: Option<u64>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The WireGuard device (keys, port, peers) as last read, patched by converge's writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Device {
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub peers: HashMap<PublicKey, PeerState>,
}

/// A route converge owns (it carries converge's route protocol number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub dst: IpNet,
    pub oif: u32,
}

/// The document whose peers and routes the host was last found (or made) equal to,
/// with nothing foreign changed since as far as the watches tell. While it holds, a
/// pass compares only the peers whose digest differs from it (and those with inputs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Baseline {
    pub digests: Arc<[u64]>,
    pub keys: Arc<[Option<PublicKey>]>,
    /// [`WireguardSpec::routing_digest`] of that document.
    pub routing: u64,
    /// The interface index it was established on.
    pub oif: u32,
}

/// What converge keeps of the host between passes: the device (a full read costs
/// ~15 µs per peer in wireguard-go, 150 ms at 10,000 peers) and converge's routes,
/// kept current by netlink route notifications, both re-read in full periodically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostState {
    /// `None`: no device (no interface yet).
    pub device: Option<Device>,
    /// Every route carrying converge's marker, on any interface.
    pub routes: HashSet<Route>,
    pub baseline: Option<Baseline>,
}

/// The node's private key as found for this pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyInput {
    /// No key yet: converge generates one (no `privateKeySecret` and no key file).
    Missing,
    Ready(SecretKey),
    /// The secret or key file cannot be read or parsed (the message names the path).
    Unreadable(String),
}

/// What observe read for this pass besides the host: secrets and DNS answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inputs {
    pub private_key: KeyInput,
    /// Pre-shared keys by secret name.
    pub psks: BTreeMap<String, Result<SecretKey, String>>,
    /// DNS-name endpoints (`host:port`) and what they resolved to.
    pub resolved: BTreeMap<String, Result<SocketAddr, String>>,
}

impl Default for Inputs {
    fn default() -> Self {
        Self {
            private_key: KeyInput::Missing,
            psks: BTreeMap::new(),
            resolved: BTreeMap::new(),
        }
    }
}

/// What observe hands to plan.
#[derive(Clone, Debug)]
pub struct Observed {
    pub interface: String,
    /// When observe read the host (roaming is judged against it).
    pub now: SystemTime,
    /// `None`: the interface does not exist.
    pub link: Option<Link>,
    /// The interface's addresses (link-local ones left out), sorted.
    pub addresses: Vec<IpNet>,
    pub state: Arc<HostState>,
    pub inputs: Inputs,
    /// The section's peers as parsed (names for notes).
    pub peers: Arc<Parsed>,
    /// Interfaces converge created that the section no longer names (renamed) and that
    /// still exist: removed.
    pub stale: Vec<String>,
}

/// One peer change, only the fields that differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUpdate {
    pub key: PublicKey,
    /// `name (key…)` for outcomes and logs.
    pub label: String,
    /// Replace this peer's allowed IPs (and only this peer's).
    pub allowed: Option<Vec<IpNet>>,
    pub endpoint: Option<SocketAddr>,
    pub keepalive: Option<u16>,
    /// `Some(None)`: remove the pre-shared key.
    pub psk: Option<Option<SecretKey>>,
}

/// One driver operation on interface `iface`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    pub iface: String,
    pub kind: ActionKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActionKind {
    /// A kernel `wireguard` link, or wireguard-go where the module is missing.
    CreateInterface,
    /// Generate the node's key, keep it in the data directory and set it.
    GenerateKey,
    SetPrivateKey(SecretKey),
    SetListenPort(u16),
    SetMtu(u32),
    SetUp,
    AddAddress(IpNet),
    DelAddress(IpNet),
    SetPeer(PeerUpdate),
    RemovePeer {
        key: PublicKey,
    },
    AddRoute(IpNet),
    DelRoute(Route),
    /// Delete an interface converge created under a name the section no longer uses.
    DeleteInterface,
    /// Bookkeeping, no host change: when every earlier action succeeded, the host now
    /// matches this document (the reconciler records it as the baseline).
    Settle(Baseline),
}

impl Action {
    /// The object named in outcomes, logs and spans.
    pub fn object(&self) -> String {
        let i = &self.iface;
        match &self.kind {
            ActionKind::CreateInterface
            | ActionKind::DeleteInterface
            | ActionKind::SetMtu(_)
            | ActionKind::SetUp => format!("interface {i}"),
            ActionKind::SetListenPort(_) => format!("interface {i} listen port"),
            ActionKind::GenerateKey | ActionKind::SetPrivateKey(_) => format!("key {i}"),
            ActionKind::AddAddress(a) | ActionKind::DelAddress(a) => format!("address {a} {i}"),
            ActionKind::SetPeer(p) => format!("peer {}", p.label),
            ActionKind::RemovePeer { key } => format!("peer {}", key.short()),
            ActionKind::AddRoute(d) => format!("route {d} {i}"),
            ActionKind::DelRoute(r) => format!("route {}", r.dst),
            ActionKind::Settle(_) => format!("wireguard {i}"),
        }
    }
}

/// `name (key…)`.
pub fn peer_label(name: &str, key: &PublicKey) -> String {
    format!("{name} ({})", key.short())
}

struct Builder<'a> {
    iface: &'a str,
    plan: Plan<Action>,
}

impl Builder<'_> {
    fn act(&mut self, kind: ActionKind) {
        self.plan.actions.push(Action {
            iface: self.iface.to_string(),
            kind,
        });
    }

    fn change(&mut self, c: Change) {
        self.plan.changes.push(c);
    }
}

/// The networks the interface reaches through its own addresses: no route is added
/// for them (the kernel's connected route exists).
fn own_networks(spec: &WireguardSpec) -> Vec<IpNet> {
    spec.addresses
        .iter()
        .filter_map(|a| a.parse::<IpNet>().ok())
        .map(|n| n.trunc())
        .collect()
}

fn routable(dst: &IpNet, own: &[IpNet]) -> bool {
    dst.prefix_len() != 0 && !own.contains(dst)
}

/// The differing middle of two digest lists: `(old range, new range)` after the common
/// head and tail (a one-peer change anywhere costs one pass over 8 bytes per peer).
fn changed_range(old: &[u64], new: &[u64]) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let head = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let tail = old[head..]
        .iter()
        .rev()
        .zip(new[head..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    (head..old.len() - tail, head..new.len() - tail)
}

/// Pure diff of the section against what observe saw. Empty when converged.
pub fn plan(spec: &WireguardSpec, obs: &Observed) -> Plan<Action> {
    let iface = spec.interface.as_str();
    let mut b = Builder {
        iface,
        plan: Plan::default(),
    };
    let parsed = spec.peers.parsed();
    let empty = Device::default();
    let link = obs.link.as_ref();
    let device = match link {
        None => {
            b.change(Change::new(Op::Create, "interface", iface));
            b.act(ActionKind::CreateInterface);
            &empty
        }
        Some(_) => obs.state.device.as_ref().unwrap_or(&empty),
    };

    plan_key(&mut b, device, &obs.inputs.private_key);
    if let Some(port) = spec.listen_port {
        if link.is_none() || device.listen_port != port {
            b.change(
                Change::new(Op::Update, "interface", iface).with_field(FieldChange::new(
                    "listenPort",
                    link.map(|_| device.listen_port.to_string()),
                    Some(port.to_string()),
                )),
            );
            b.act(ActionKind::SetListenPort(port));
        }
    }
    if let Some(mtu) = spec.mtu.map(u32::from) {
        if link.is_none_or(|l| l.mtu != mtu) {
            b.change(
                Change::new(Op::Update, "interface", iface).with_field(FieldChange::new(
                    "mtu",
                    link.map(|l| l.mtu.to_string()),
                    Some(mtu.to_string()),
                )),
            );
            b.act(ActionKind::SetMtu(mtu));
        }
    }
    // Up before addresses and routes: IPv6 refuses both on a link that is down.
    if link.is_none_or(|l| !l.up) {
        b.change(
            Change::new(Op::Update, "interface", iface).with_field(FieldChange::new(
                "up",
                link.map(|_| "false".into()),
                Some("true".into()),
            )),
        );
        b.act(ActionKind::SetUp);
    }
    let want_addrs: BTreeSet<IpNet> = spec
        .addresses
        .iter()
        .filter_map(|a| a.parse::<IpNet>().ok())
        .collect();
    let have_addrs: BTreeSet<IpNet> = obs.addresses.iter().copied().collect();
    for a in want_addrs.difference(&have_addrs) {
        b.change(Change::new(Op::Create, "address", format!("{a} {iface}")));
        b.act(ActionKind::AddAddress(*a));
    }
    for a in have_addrs.difference(&want_addrs) {
        b.change(Change::new(Op::Delete, "address", format!("{a} {iface}")));
        b.act(ActionKind::DelAddress(*a));
    }

    plan_peers(&mut b, spec, parsed, obs, link, device);

    if !b.plan.actions.is_empty() {
        b.act(ActionKind::Settle(Baseline {
            digests: parsed.digests.clone(),
            keys: parsed.keys.clone(),
            routing: spec.routing_digest(),
            // Filled in by apply when the interface is created by this plan.
            oif: link.map_or(0, |l| l.index),
        }));
    }
    // The old interface of a rename goes last, once the new one carries the peers.
    for name in &obs.stale {
        b.plan
            .changes
            .push(Change::new(Op::Delete, "interface", name.as_str()));
        b.plan.actions.push(Action {
            iface: name.clone(),
            kind: ActionKind::DeleteInterface,
        });
    }
    let dns_names = parsed.with_inputs.iter().any(|&i| {
        parsed.wants[i]
            .as_ref()
            .is_some_and(|w| matches!(w.endpoint, Some(Endpoint::Host(..))))
    });
    if dns_names {
        b.plan.requeue_after = Some(RERESOLVE_EVERY);
    }
    b.plan
}

fn plan_key(b: &mut Builder<'_>, device: &Device, key: &KeyInput) {
    let iface = b.iface;
    match key {
        KeyInput::Missing => {
            b.change(
                Change::new(Op::Create, "key", iface).with_field(FieldChange::new(
                    "privateKey",
                    None,
                    Some("generated".into()),
                )),
            );
            b.act(ActionKind::GenerateKey);
        }
        KeyInput::Ready(k) => {
            let public = k.public();
            if device.public_key != Some(public) {
                b.change(
                    Change::new(Op::Update, "key", iface).with_field(FieldChange::new(
                        "publicKey",
                        device.public_key.map(|k| k.short()),
                        Some(public.short()),
                    )),
                );
                b.act(ActionKind::SetPrivateKey(k.clone()));
            }
        }
        KeyInput::Unreadable(why) => {
            b.plan.waiting.push(
                Waiting::new("key", iface, format!("waiting for the private key: {why}"))
                    .retry_after(INPUT_RETRY),
            );
        }
    }
}

fn plan_peers(
    b: &mut Builder<'_>,
    spec: &WireguardSpec,
    parsed: &Parsed,
    obs: &Observed,
    link: Option<&Link>,
    device: &Device,
) {
    let fast = match (&obs.state.baseline, link) {
        (Some(bl), Some(l)) if bl.oif == l.index && bl.routing == spec.routing_digest() => Some(bl),
        _ => None,
    };
    let (candidates, removed): (Vec<usize>, Vec<PublicKey>) = match fast {
        Some(bl) => {
            let (old, new) = changed_range(&bl.digests, &parsed.digests);
            let mut c: Vec<usize> = new.chain(parsed.with_inputs.iter().copied()).collect();
            c.sort_unstable();
            c.dedup();
            let mut r: Vec<PublicKey> = bl.keys[old]
                .iter()
                .flatten()
                .filter(|k| !parsed.index.contains_key(k) && device.peers.contains_key(k))
                .copied()
                .collect();
            r.sort_unstable();
            r.dedup();
            (c, r)
        }
        None => {
            let mut r: Vec<PublicKey> = device
                .peers
                .keys()
                .filter(|k| !parsed.index.contains_key(k))
                .copied()
                .collect();
            r.sort_unstable();
            ((0..parsed.wants.len()).collect(), r)
        }
    };

    for key in &removed {
        b.change(Change::new(Op::Delete, "peer", key.short()));
        b.act(ActionKind::RemovePeer { key: *key });
    }
    for &i in &candidates {
        let (Some(w), Some(p)) = (&parsed.wants[i], spec.peers.get(i)) else {
            continue;
        };
        // A repeated key (refused by validation) is planned once, from its first entry.
        if parsed.index.get(&w.key) != Some(&i) {
            continue;
        }
        plan_peer(b, &p.name, w, device.peers.get(&w.key), obs);
    }

    // Routes: the whole set without a baseline; with one, only those of the peers
    // looked at (validation keeps every network on one peer, so a network a changed
    // peer dropped is wanted by no unchanged peer).
    let own = own_networks(spec);
    let oif = link.map(|l| l.index);
    let routes = &obs.state.routes;
    let mut want: BTreeSet<IpNet> = BTreeSet::new();
    if spec.routes {
        for &i in &candidates {
            if let Some(w) = &parsed.wants[i] {
                want.extend(w.allowed.iter().filter(|d| routable(d, &own)));
            }
        }
    }
    let mut drop: BTreeSet<Route> = BTreeSet::new();
    match fast {
        Some(_) => {
            let old_allowed = candidates
                .iter()
                .filter_map(|&i| parsed.wants[i].as_ref())
                .filter_map(|w| device.peers.get(&w.key))
                .chain(removed.iter().filter_map(|k| device.peers.get(k)))
                .flat_map(|p| p.allowed.iter());
            for dst in old_allowed {
                if let Some(oif) = oif {
                    let r = Route { dst: *dst, oif };
                    if !want.contains(dst) && routes.contains(&r) {
                        drop.insert(r);
                    }
                }
            }
        }
        None => {
            drop.extend(
                routes
                    .iter()
                    .filter(|r| Some(r.oif) != oif || !want.contains(&r.dst))
                    .copied(),
            );
        }
    }
    for r in drop {
        b.change(Change::new(
            Op::Delete,
            "route",
            format!("{} ifindex {}", r.dst, r.oif),
        ));
        b.act(ActionKind::DelRoute(r));
    }
    for dst in want {
        if oif.is_none_or(|oif| !routes.contains(&Route { dst, oif })) {
            b.change(Change::new(
                Op::Create,
                "route",
                format!("{dst} {}", b.iface),
            ));
            b.act(ActionKind::AddRoute(dst));
        }
    }
}

fn endpoint_str(e: &Endpoint) -> String {
    match e {
        Endpoint::Addr(ip, port) => SocketAddr::new(*ip, *port).to_string(),
        Endpoint::Host(h, port) => format!("{h}:{port}"),
    }
}

fn plan_peer(
    b: &mut Builder<'_>,
    name: &str,
    w: &PeerWant,
    have: Option<&PeerState>,
    obs: &Observed,
) {
    let label = peer_label(name, &w.key);
    let mut fields = Vec::new();
    let mut up = PeerUpdate {
        key: w.key,
        label: label.clone(),
        allowed: None,
        endpoint: None,
        keepalive: None,
        psk: None,
    };
    let want_endpoint = match &w.endpoint {
        None => None,
        Some(Endpoint::Addr(ip, port)) => Some(SocketAddr::new(*ip, *port)),
        Some(e @ Endpoint::Host(..)) => {
            let s = endpoint_str(e);
            match obs.inputs.resolved.get(&s) {
                Some(Ok(a)) => Some(*a),
                Some(Err(why)) => {
                    b.plan.waiting.push(
                        Waiting::new("peer", &label, format!("cannot resolve {s}: {why}"))
                            .retry_after(INPUT_RETRY),
                    );
                    None
                }
                None => None,
            }
        }
    };
    let want_psk: Option<Option<&SecretKey>> = match &w.psk_secret {
        None => Some(None),
        Some(n) => match obs.inputs.psks.get(n) {
            Some(Ok(k)) => Some(Some(k)),
            Some(Err(why)) => {
                b.plan.waiting.push(
                    Waiting::new(
                        "peer",
                        &label,
                        format!("waiting for its pre-shared key: {why}"),
                    )
                    .retry_after(INPUT_RETRY),
                );
                None
            }
            None => None,
        },
    };
    let show_allowed = |a: &[IpNet]| {
        a.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let op = match have {
        None => {
            up.allowed = Some(w.allowed.clone());
            fields.push(FieldChange::new(
                "allowedIps",
                None,
                Some(show_allowed(&w.allowed)),
            ));
            if let Some(e) = want_endpoint {
                up.endpoint = Some(e);
                fields.push(FieldChange::new("endpoint", None, Some(e.to_string())));
            }
            if w.keepalive != 0 {
                up.keepalive = Some(w.keepalive);
                fields.push(FieldChange::new(
                    "persistentKeepalive",
                    None,
                    Some(w.keepalive.to_string()),
                ));
            }
            if let Some(Some(k)) = want_psk {
                up.psk = Some(Some(k.clone()));
                fields.push(FieldChange::new("presharedKey", None, Some(k.redacted())));
            }
            Op::Create
        }
        Some(h) => {
            if h.allowed != w.allowed {
                up.allowed = Some(w.allowed.clone());
                fields.push(FieldChange::new(
                    "allowedIps",
                    Some(show_allowed(&h.allowed)),
                    Some(show_allowed(&w.allowed)),
                ));
            }
            if let Some(e) = want_endpoint {
                let roamed = h.endpoint.is_some()
                    && h.last_handshake.is_some_and(|t| {
                        obs.now.duration_since(t).unwrap_or_default() < ROAMING_WINDOW
                    });
                if h.endpoint != Some(e) && !roamed {
                    up.endpoint = Some(e);
                    fields.push(FieldChange::new(
                        "endpoint",
                        h.endpoint.map(|a| a.to_string()),
                        Some(e.to_string()),
                    ));
                }
            }
            if h.keepalive != w.keepalive {
                up.keepalive = Some(w.keepalive);
                let show = |k: u16| (k != 0).then(|| k.to_string());
                fields.push(FieldChange::new(
                    "persistentKeepalive",
                    show(h.keepalive),
                    show(w.keepalive),
                ));
            }
            if let Some(want) = want_psk {
                if h.psk != want.map(SecretKey::fingerprint) {
                    up.psk = Some(want.cloned());
                    fields.push(FieldChange::new(
                        "presharedKey",
                        h.psk.map(|_| "<redacted>".to_string()),
                        want.map(SecretKey::redacted),
                    ));
                }
            }
            Op::Update
        }
    };
    if fields.is_empty() {
        return;
    }
    let mut c = Change::new(op, "peer", label);
    c.fields = fields;
    b.change(c);
    b.act(ActionKind::SetPeer(up));
}

/// Applies one peer update to a device as WireGuard does: an allowed IP given to this
/// peer is taken from any other peer that had it. Keeps converge's copy of the device
/// current after its own writes (and is the fake driver's model).
pub fn apply_peer(dev: &mut Device, p: &PeerUpdate) {
    if let Some(allowed) = &p.allowed {
        for (k, other) in dev.peers.iter_mut() {
            if *k != p.key {
                other.allowed.retain(|n| !allowed.contains(n));
            }
        }
    }
    set_fields(dev.peers.entry(p.key).or_default(), p);
}

/// Sets the fields `p` gives on the device copy's peer.
fn set_fields(e: &mut PeerState, p: &PeerUpdate) {
    if let Some(a) = &p.allowed {
        e.allowed = a.clone();
    }
    if let Some(ep) = p.endpoint {
        e.endpoint = Some(ep);
    }
    if let Some(k) = p.keepalive {
        e.keepalive = k;
    }
    if let Some(psk) = &p.psk {
        e.psk = psk.as_ref().map(SecretKey::fingerprint);
    }
}

/// Which peer holds each allowed IP of a device (WireGuard gives an allowed IP to one
/// peer at a time), so that [`apply_peer_indexed`] need not look at every peer.
pub type Owners = HashMap<IpNet, PublicKey>;

/// The owner index of `dev`: one pass over its peers.
pub fn owners_of(dev: &Device) -> Owners {
    let mut owners = HashMap::with_capacity(dev.peers.len());
    for (k, p) in &dev.peers {
        for n in &p.allowed {
            owners.insert(*n, *k);
        }
    }
    owners
}

/// [`apply_peer`] with the owner index kept alongside: costs the size of this update,
/// not of the device (the loop over every peer is what a one-peer change at 10,000
/// peers must not pay). `owners` must be [`owners_of`] `dev` on entry; it is on exit.
pub fn apply_peer_indexed(dev: &mut Device, owners: &mut Owners, p: &PeerUpdate) {
    if let Some(allowed) = &p.allowed {
        if let Some(old) = dev.peers.get(&p.key) {
            for n in &old.allowed {
                if !allowed.contains(n) && owners.get(n) == Some(&p.key) {
                    owners.remove(n);
                }
            }
        }
        for n in allowed {
            match owners.insert(*n, p.key) {
                Some(k) if k != p.key => {
                    if let Some(other) = dev.peers.get_mut(&k) {
                        other.allowed.retain(|x| x != n);
                    }
                }
                _ => {}
            }
        }
    }
    set_fields(dev.peers.entry(p.key).or_default(), p);
}

/// Removes a peer from `dev` and its allowed IPs from `owners` (as [`owners_of`]).
pub fn remove_peer_indexed(dev: &mut Device, owners: &mut Owners, key: &PublicKey) {
    if let Some(p) = dev.peers.remove(key) {
        for n in &p.allowed {
            if owners.get(n) == Some(key) {
                owners.remove(n);
            }
        }
    }
}

#[cfg(test)]
mod tests;
