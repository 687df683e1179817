//! The `wireguard` section of the document: this node's WireGuard interface and its
//! peers, and their semantic validation. The reconciler itself (per-peer changes that
//! never restart the interface) lands in a later issue.

use converge_core::problems::{is_dns_name, is_wireguard_key};
use converge_core::Problems;
use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// One WireGuard interface owned by converge. Absent section: converge leaves the
/// interface it created earlier alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WireguardSpec {
    /// Interface name, e.g. `wg0`: at most 15 characters of `[a-zA-Z0-9_=+.-]`.
    pub interface: String,
    /// Name of the local secret holding this node's private key. The key itself never
    /// appears in the document.
    pub private_key_secret: String,
    /// UDP port to listen on; absent: a random port (fine for nodes that only dial out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    /// Addresses of the interface in CIDR form, e.g. `10.210.0.7/24`, `fd00:210::7/64`.
    pub addresses: Vec<String>,
    /// Interface MTU; absent: the kernel default (1420).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// The peers. Peers not listed are removed; listed peers are changed one by one,
    /// without disturbing the sessions of the others.
    #[serde(default)]
    pub peers: Vec<WireguardPeer>,
}

/// One WireGuard peer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WireguardPeer {
    /// Peer name, unique in the section (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 63
    /// characters); routes refer to peers by it.
    pub name: String,
    /// The peer's public key: base64 of 32 bytes.
    pub public_key: String,
    /// Where to reach the peer: `host:port` or `[ipv6]:port`; absent: the peer dials in.
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

/// Where a peer can be reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A literal address.
    Addr(IpAddr, u16),
    /// A DNS name, resolved when the peer is configured.
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

fn is_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn is_secret_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
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
    if is_wireguard_key(&spec.private_key_secret) {
        problems.push_hint(
            format!("{path}.privateKeySecret"),
            "this looks like a key, not the name of a secret",
            "store the private key as a local secret and put the secret's name here; rotate the leaked key",
        );
    } else if !is_secret_name(&spec.private_key_secret) {
        problems.push(
            format!("{path}.privateKeySecret"),
            format!("invalid secret name {:?}", spec.private_key_secret),
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
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
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
        } else if let Some(first) = names.insert(&p.name, i) {
            problems.push_hint(
                format!("{pp}.name"),
                format!("duplicate peer name {:?}", p.name),
                format!("already used by {path}.peers[{first}]"),
            );
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
            if is_wireguard_key(s) {
                problems.push_hint(
                    format!("{pp}.presharedKeySecret"),
                    "this looks like a key, not the name of a secret",
                    "store the pre-shared key as a local secret and put the secret's name here; rotate the leaked key",
                );
            } else if !is_secret_name(s) {
                problems.push(
                    format!("{pp}.presharedKeySecret"),
                    format!("invalid secret name {s:?}"),
                );
            }
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
    }

    #[test]
    fn interface_rules() {
        let mut s = good();
        s.interface = "wireguard-interface0".into();
        s.private_key_secret = K1.into();
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
        let mut s = good();
        s.peers[1].name = "hub".into();
        s.peers[1].public_key = K1.into();
        s.peers[1].endpoint = Some("2001:db8::1:51820".into());
        s.peers[1].allowed_ips = vec!["10.210.0.5/32".into(), "10.211.0.1/16".into()];
        s.peers[2].public_key = "not-a-key".into();
        s.peers[2].allowed_ips = vec!["10.300.0.0/16".into()];
        s.peers[2].persistent_keepalive = Some(0);
        s.peers[2].preshared_key_secret = Some(K2.into());
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
