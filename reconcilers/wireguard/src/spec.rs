//! The `wireguard` section of the document (this node's interface and its peers), the
//! peers as parsed once when the document is read, and the section's semantic validation.

use base64::Engine as _;
use converge_core::problems::{is_dns_name, is_wireguard_key};
use converge_core::vocab::{is_name, is_secret_name, Unique};
use converge_core::Problems;
use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

/// One WireGuard interface owned by converge. Absent section: converge leaves the
/// interface it created earlier alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WireguardSpec {
    /// Interface name, e.g. `wg0`: at most 15 characters of `[a-zA-Z0-9_=+.-]`.
    pub interface: String,
    /// Name of a local secret holding this node's private key, for operators who bring
    /// their own key; absent (the default): converge generates the key on first use and
    /// keeps it in its data directory (0600). The key never appears in the document,
    /// logs, diffs or status; the public key is reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_secret: Option<String>,
    /// UDP port to listen on; absent: a random port (fine for nodes that only dial out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    /// Addresses of the interface in CIDR form, e.g. `10.210.0.7/24`, `fd00:210::7/64`.
    pub addresses: Vec<String>,
    /// Interface MTU; absent: the default of the backend (1420).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Install a route through the interface for every peer's allowed IPs (default
    /// true). Networks already reached through one of the interface's own addresses and
    /// default routes (`/0`) are never routed. Turn off when another component routes.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub routes: bool,
    /// The peers. Peers not listed are removed; listed peers are changed one by one,
    /// without disturbing the sessions of the others.
    #[serde(default)]
    #[schemars(with = "Vec<WireguardPeer>")]
    pub peers: Peers,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// One WireGuard peer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WireguardPeer {
    /// Peer name, unique in the section (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 63
    /// characters); routes refer to peers by it.
    pub name: String,
    /// The peer's public key: base64 of 32 bytes.
    pub public_key: String,
    /// Where to reach the peer: `host:port` or `[ipv6]:port`; absent: the peer dials in.
    /// A peer that handshook recently keeps the endpoint it roamed to; this one is
    /// applied when the peer is new or silent. Host names are re-resolved periodically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Networks routed to this peer and accepted from it, in CIDR network form
    /// (no host bits), e.g. `10.210.0.2/32`.
    pub allowed_ips: Vec<String>,
    /// Keepalive interval in seconds (1-65535), for peers behind NAT; absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
    /// Name of the local secret holding the pre-shared key with this peer, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key_secret: Option<String>,
}

/// A WireGuard public key (32 bytes). Shown shortened in diffs and status.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Parses the base64 form printed by `wg pubkey`.
    pub fn from_base64(s: &str) -> Option<Self> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// The first 8 characters of the base64 form and an ellipsis, for diffs and status.
    pub fn short(&self) -> String {
        let mut s = self.to_base64();
        s.truncate(8);
        s.push('…');
        s
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// Where a peer can be reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A literal address.
    Addr(IpAddr, u16),
    /// A DNS name, resolved by observe and re-resolved periodically.
    Host(String, u16),
}

/// Parses an endpoint: `host:port`, `ipv4:port` or `[ipv6]:port`.
pub fn parse_endpoint(s: &str) -> Option<Endpoint> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (h, p)
    } else {
        s.rsplit_once(':')?
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    if s.starts_with('[') {
        return match host.parse::<IpAddr>().ok()? {
            a @ IpAddr::V6(_) => Some(Endpoint::Addr(a, port)),
            IpAddr::V4(_) => None,
        };
    }
    match host.parse::<IpAddr>() {
        Ok(a @ IpAddr::V4(_)) => Some(Endpoint::Addr(a, port)),
        Ok(IpAddr::V6(_)) => None,
        Err(_) => (is_dns_name(host, false) && !host.starts_with('*'))
            .then(|| Endpoint::Host(host.to_string(), port)),
    }
}

/// Whether `name` is a valid Linux interface name for WireGuard.
pub fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'=' | b'+' | b'.' | b'-'))
}

/// One peer as the plan needs it, parsed once when the document is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerWant {
    pub key: PublicKey,
    /// Allowed IPs, sorted and without repeats (WireGuard keeps a set).
    pub allowed: Vec<IpNet>,
    pub endpoint: Option<Endpoint>,
    /// Keepalive in seconds; 0 is off (as WireGuard reports it).
    pub keepalive: u16,
    pub psk_secret: Option<String>,
}

impl PeerWant {
    fn parse(p: &WireguardPeer) -> Option<Self> {
        let key =
            PublicKey::from_base64(&p.public_key).filter(|_| is_wireguard_key(&p.public_key))?;
        let mut allowed = p
            .allowed_ips
            .iter()
            .map(|a| a.parse::<IpNet>().ok().map(|n| n.trunc()))
            .collect::<Option<Vec<_>>>()?;
        allowed.sort();
        allowed.dedup();
        let endpoint = match &p.endpoint {
            Some(e) => Some(parse_endpoint(e)?),
            None => None,
        };
        Some(Self {
            key,
            allowed,
            endpoint,
            keepalive: p.persistent_keepalive.unwrap_or(0),
            psk_secret: p.preshared_key_secret.clone(),
        })
    }

    /// Whether this peer depends on something outside the document that can change
    /// between passes (a secret file, a DNS answer), so it is compared on every pass.
    pub fn has_inputs(&self) -> bool {
        self.psk_secret.is_some() || matches!(self.endpoint, Some(Endpoint::Host(..)))
    }
}

/// The peers, each parsed and digested once when the document is read: a pass finds
/// the peers that changed since the last converged document by comparing 8-byte digests
/// instead of parsing every key and network of every peer (which at 10,000 peers would
/// cost more than the one-peer change itself). Read-only, so the parsed form always
/// matches its peer; build one from a `Vec` to change it.
#[derive(Clone, Default)]
pub struct Peers {
    list: Vec<WireguardPeer>,
    parsed: Arc<Parsed>,
}

/// What [`Peers`] derives from the list.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Per peer; `None` for a peer that fails validation (never planned).
    pub wants: Vec<Option<PeerWant>>,
    /// Per peer, keyed per process (SipHash with random keys) so that no document can
    /// be crafted to make two different peers look alike.
    pub digests: Arc<[u64]>,
    /// Per peer, its key (`None` when invalid).
    pub keys: Arc<[Option<PublicKey>]>,
    /// Position of each key (the first, if repeated).
    pub index: HashMap<PublicKey, usize>,
    /// Peers compared on every pass (see [`PeerWant::has_inputs`]).
    pub with_inputs: Vec<usize>,
    /// Per peer, its name (for status notes).
    pub names: Vec<String>,
}

pub(crate) fn digest<T: Hash>(v: &T) -> u64 {
    static KEYS: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    KEYS.get_or_init(Default::default).hash_one(v)
}

impl Peers {
    pub fn parsed(&self) -> &Arc<Parsed> {
        &self.parsed
    }
}

impl From<Vec<WireguardPeer>> for Peers {
    fn from(list: Vec<WireguardPeer>) -> Self {
        let wants: Vec<Option<PeerWant>> = list.iter().map(PeerWant::parse).collect();
        let digests = list.iter().map(digest).collect();
        let keys = wants.iter().map(|w| w.as_ref().map(|w| w.key)).collect();
        let mut index = HashMap::with_capacity(wants.len());
        let mut with_inputs = Vec::new();
        for (i, w) in wants.iter().enumerate() {
            if let Some(w) = w {
                index.entry(w.key).or_insert(i);
                if w.has_inputs() {
                    with_inputs.push(i);
                }
            }
        }
        let names = list.iter().map(|p| p.name.clone()).collect();
        Self {
            list,
            parsed: Arc::new(Parsed {
                wants,
                digests,
                keys,
                index,
                with_inputs,
                names,
            }),
        }
    }
}

impl std::ops::Deref for Peers {
    type Target = [WireguardPeer];
    fn deref(&self) -> &[WireguardPeer] {
        &self.list
    }
}

impl<'a> IntoIterator for &'a Peers {
    type Item = &'a WireguardPeer;
    type IntoIter = std::slice::Iter<'a, WireguardPeer>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

impl From<Peers> for Vec<WireguardPeer> {
    fn from(p: Peers) -> Self {
        p.list
    }
}

impl fmt::Debug for Peers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.list.fmt(f)
    }
}

impl PartialEq for Peers {
    fn eq(&self, other: &Self) -> bool {
        self.list == other.list
    }
}

impl Serialize for Peers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.list.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Peers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<WireguardPeer>::deserialize(d).map(Self::from)
    }
}

impl WireguardSpec {
    /// Digest of what, besides the peers, decides the routes (the interface, its
    /// addresses, whether routes are on): a converged baseline holds only while it is
    /// unchanged.
    pub fn routing_digest(&self) -> u64 {
        digest(&(&self.interface, &self.addresses, self.routes))
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn check_secret_name(name: &str, field: String, what: &str, problems: &mut Problems) {
    if is_wireguard_key(name) {
        problems.push_hint(
            field,
            "this looks like a key, not the name of a secret",
            format!("store the {what} as a local secret and put the secret's name here; rotate the leaked key"),
        );
    } else if !is_secret_name(name) {
        problems.push(field, format!("invalid secret name {name:?}"));
    }
}

/// Semantic checks of the section; `path` is its JSON path (`$.wireguard`).
pub fn validate(spec: &WireguardSpec, path: &str, problems: &mut Problems) {
    if !is_interface_name(&spec.interface) {
        problems.push_hint(
            format!("{path}.interface"),
            format!("invalid interface name {:?}", spec.interface),
            "at most 15 characters of [a-zA-Z0-9_=+.-], e.g. wg0",
        );
    }
    if let Some(s) = &spec.private_key_secret {
        check_secret_name(
            s,
            format!("{path}.privateKeySecret"),
            "private key",
            problems,
        );
    }
    if spec.listen_port == Some(0) {
        problems.push_hint(
            format!("{path}.listenPort"),
            "port must be 1-65535",
            "omit listenPort for a random port",
        );
    }
    if spec.addresses.is_empty() {
        problems.push(
            format!("{path}.addresses"),
            "at least one address is required",
        );
    }
    let mut own: Vec<(IpNet, usize)> = Vec::new();
    for (i, a) in spec.addresses.iter().enumerate() {
        match a.parse::<IpNet>() {
            Ok(net) => {
                if let Some((_, first)) = own.iter().find(|(n, _)| n.addr() == net.addr()) {
                    problems.push_hint(
                        format!("{path}.addresses[{i}]"),
                        format!("address {} is listed twice", net.addr()),
                        format!("also {path}.addresses[{first}]"),
                    );
                }
                own.push((net, i));
            }
            Err(_) => problems.push_hint(
                format!("{path}.addresses[{i}]"),
                format!("not a CIDR address: {a:?}"),
                "e.g. 10.210.0.7/24 or fd00:210::7/64",
            ),
        }
    }
    if let Some(mtu) = spec.mtu {
        let min = if own.iter().any(|(n, _)| matches!(n, IpNet::V6(_))) {
            1280
        } else {
            576
        };
        if !(min..=9000).contains(&mtu) {
            problems.push_hint(
                format!("{path}.mtu"),
                format!("mtu {mtu} is out of range {min}-9000"),
                "omit mtu for the default of 1420",
            );
        }
    }
    let mut names = Unique::new("peer name", format!("{path}.peers"));
    let mut keys: BTreeMap<&str, usize> = BTreeMap::new();
    let mut routed: Vec<(IpNet, String)> = Vec::new();
    for (i, p) in spec.peers.iter().enumerate() {
        let pp = format!("{path}.peers[{i}]");
        if !is_name(&p.name) {
            problems.push_hint(
                format!("{pp}.name"),
                format!("invalid peer name {:?}", p.name),
                "use [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 63 characters",
            );
        } else {
            names.check(&p.name, i, format!("{pp}.name"), problems);
        }
        if !is_wireguard_key(&p.public_key) {
            problems.push_hint(
                format!("{pp}.publicKey"),
                "not a WireGuard public key",
                "base64 of 32 bytes (44 characters ending in '='), as printed by `wg pubkey`",
            );
        } else if let Some(first) = keys.insert(&p.public_key, i) {
            problems.push_hint(
                format!("{pp}.publicKey"),
                "duplicate public key",
                format!("already the key of {path}.peers[{first}]"),
            );
        }
        if let Some(e) = &p.endpoint {
            if parse_endpoint(e).is_none() {
                problems.push_hint(
                    format!("{pp}.endpoint"),
                    format!("invalid endpoint {e:?}"),
                    "host:port or [ipv6]:port, e.g. vpn.example.com:51820 or [2001:db8::1]:51820",
                );
            }
        }
        for (j, a) in p.allowed_ips.iter().enumerate() {
            let ap = format!("{pp}.allowedIps[{j}]");
            let net = match a.parse::<IpNet>() {
                Ok(n) => n,
                Err(_) => {
                    problems.push_hint(
                        ap,
                        format!("not a CIDR network: {a:?}"),
                        "e.g. 10.210.0.2/32 or fd00:210::/64",
                    );
                    continue;
                }
            };
            if net.trunc() != net {
                problems.push_hint(
                    ap,
                    format!("{a} has host bits set"),
                    format!("use the network form {}", net.trunc()),
                );
                continue;
            }
            if let Some((other, first)) = routed.iter().find(|(n, _)| overlaps(n, &net)) {
                problems.push_hint(
                    ap.clone(),
                    format!("{net} overlaps {other}"),
                    format!("already routed by {first}; each address must be routed to one peer"),
                );
            }
            routed.push((net, ap));
        }
        if p.persistent_keepalive == Some(0) {
            problems.push_hint(
                format!("{pp}.persistentKeepalive"),
                "keepalive must be 1-65535 seconds",
                "omit persistentKeepalive to turn it off",
            );
        }
        if let Some(s) = &p.preshared_key_secret {
            check_secret_name(
                s,
                format!("{pp}.presharedKeySecret"),
                "pre-shared key",
                problems,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const K1: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const K2: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const K3: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn problems(spec: &WireguardSpec) -> Vec<String> {
        let mut p = Problems::default();
        validate(spec, "$.wireguard", &mut p);
        p.iter().map(|p| p.path.clone()).collect()
    }

    fn good() -> WireguardSpec {
        serde_json::from_value(json!({
            "interface": "wg0",
            "privateKeySecret": "wg0-private-key",
            "listenPort": 51820,
            "addresses": ["10.210.0.7/24", "fd00:210::7/64"],
            "mtu": 1420,
            "peers": [
                {"name": "hub", "publicKey": K1, "endpoint": "hub.example.net:51820",
                 "allowedIps": ["10.210.0.0/24", "fd00:210::/64"], "persistentKeepalive": 25},
                {"name": "db-1", "publicKey": K2, "endpoint": "[2001:db8::1]:51820",
                 "allowedIps": ["10.211.0.0/16"], "presharedKeySecret": "psk-db-1"},
                {"name": "laptop", "publicKey": K3, "endpoint": "192.0.2.5:4500",
                 "allowedIps": ["10.212.0.9/32"]}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn good_spec_passes() {
        assert_eq!(problems(&good()), Vec::<String>::new());
        let back: WireguardSpec =
            serde_json::from_value(serde_json::to_value(good()).unwrap()).unwrap();
        assert_eq!(back, good());
        assert!(good().routes, "routes default to on");
    }

    #[test]
    fn private_key_is_optional() {
        let s: WireguardSpec = serde_json::from_value(json!({
            "interface": "wg0", "addresses": ["10.210.0.7/24"], "routes": false
        }))
        .unwrap();
        assert_eq!(s.private_key_secret, None);
        assert!(!s.routes);
        assert_eq!(problems(&s), Vec::<String>::new());
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["routes"], json!(false));
        assert!(v.get("privateKeySecret").is_none());
    }

    #[test]
    fn peers_are_parsed_once() {
        let s = good();
        let parsed = s.peers.parsed();
        assert_eq!(parsed.wants.len(), 3);
        let hub = parsed.wants[0].as_ref().unwrap();
        assert_eq!(hub.key.to_base64(), K1);
        assert_eq!(hub.keepalive, 25);
        assert_eq!(parsed.index[&hub.key], 0);
        // The DNS-name endpoint and the pre-shared key are inputs of their own.
        assert_eq!(parsed.with_inputs, vec![0, 1]);
        assert_eq!(hub.key.short(), "yAnz5TF+…");
        let again = good();
        assert_eq!(again.peers.parsed().digests, parsed.digests);
        let mut other = good();
        let mut list: Vec<WireguardPeer> = other.peers.clone().into();
        list[2].persistent_keepalive = Some(5);
        other.peers = list.into();
        assert_eq!(other.peers.parsed().digests[..2], parsed.digests[..2]);
        assert_ne!(other.peers.parsed().digests[2], parsed.digests[2]);
    }

    #[test]
    fn interface_rules() {
        let mut s = good();
        s.interface = "wireguard-interface0".into();
        s.private_key_secret = Some(K1.into());
        s.listen_port = Some(0);
        s.addresses = vec![
            "10.210.0.7".into(),
            "10.210.0.8/24".into(),
            "10.210.0.8/16".into(),
        ];
        s.mtu = Some(100);
        assert_eq!(
            problems(&s),
            vec![
                "$.wireguard.interface",
                "$.wireguard.privateKeySecret",
                "$.wireguard.listenPort",
                "$.wireguard.addresses[0]",
                "$.wireguard.addresses[2]",
                "$.wireguard.mtu",
            ]
        );
        s.addresses.clear();
        assert!(problems(&s).contains(&"$.wireguard.addresses".to_string()));
    }

    #[test]
    fn peer_rules() {
        let s = good();
        let mut list: Vec<WireguardPeer> = s.peers.clone().into();
        list[1].name = "hub".into();
        list[1].public_key = K1.into();
        list[1].endpoint = Some("2001:db8::1:51820".into());
        list[1].allowed_ips = vec!["10.210.0.5/32".into(), "10.211.0.1/16".into()];
        list[2].public_key = "not-a-key".into();
        list[2].allowed_ips = vec!["10.300.0.0/16".into()];
        list[2].persistent_keepalive = Some(0);
        list[2].preshared_key_secret = Some(K2.into());
        let s = WireguardSpec {
            peers: list.into(),
            ..s
        };
        let mut p = Problems::default();
        validate(&s, "$.wireguard", &mut p);
        let got: Vec<_> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            got,
            vec![
                "$.wireguard.peers[1].name",
                "$.wireguard.peers[1].publicKey",
                "$.wireguard.peers[1].endpoint",
                "$.wireguard.peers[1].allowedIps[0]",
                "$.wireguard.peers[1].allowedIps[1]",
                "$.wireguard.peers[2].publicKey",
                "$.wireguard.peers[2].allowedIps[0]",
                "$.wireguard.peers[2].persistentKeepalive",
                "$.wireguard.peers[2].presharedKeySecret",
            ]
        );
        assert_eq!(p.0[0].message, "duplicate peer name \"hub\"");
        assert_eq!(
            p.0[0].hint.as_deref(),
            Some("already used by $.wireguard.peers[0]")
        );
        assert_eq!(
            p.0[3]
                .hint
                .as_deref()
                .map(|h| h.contains("$.wireguard.peers[0].allowedIps[0]")),
            Some(true)
        );
        assert_eq!(
            p.0[4].hint.as_deref(),
            Some("use the network form 10.211.0.0/16")
        );
        // Invalid peers are never planned.
        assert!(s.peers.parsed().wants[2].is_none());
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("[fd00::1]:51820"),
            Some(Endpoint::Addr("fd00::1".parse().unwrap(), 51820))
        );
        assert_eq!(
            parse_endpoint("vpn.example.com:1"),
            Some(Endpoint::Host("vpn.example.com".into(), 1))
        );
        for bad in [
            "vpn.example.com",
            "1.2.3.4:0",
            "fd00::1:51820",
            "[1.2.3.4]:5",
            "a b:1",
            ":5",
        ] {
            assert_eq!(parse_endpoint(bad), None, "{bad}");
        }
    }
}
