//! The `firewall` section: host ports forwarded to containers or addresses, input and
//! forwarding filters, masquerading, and their semantic validation.

use converge_core::Problems;
use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;

pub use converge_core::vocab::Protocol;

/// The host firewall rules converge owns (its own nftables table; other tables are never
/// touched). Absent section: converge leaves its table as it is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FirewallSpec {
    /// Host ports forwarded (DNAT) to a container or an address. These are in addition
    /// to the `hostPort`s of the containers section and must not collide with them.
    #[serde(default)]
    #[schemars(with = "Vec<PublishedPort>")]
    pub published_ports: PublishedPorts,
    /// Filter for traffic addressed to this host itself (the `input` hook); absent:
    /// converge adds no input rules and the host's own policy applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<InputFilter>,
    /// Filter for traffic routed through this host (the `forward` hook); absent:
    /// converge adds no forwarding rules and the host's own policy applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<Forwarding>,
    /// Masquerade (source-NAT to the outgoing interface's address) traffic that this host
    /// forwards out, so that replies to containers and peers find their way back.
    #[serde(default, skip_serializing_if = "is_false")]
    pub masquerade: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The published ports, each with a digest taken once when the document is read: a
/// pass finds the ports that changed since the last one by comparing 8-byte digests
/// instead of every field (and string) of every port. Read-only, so a digest always
/// matches its port; build one from a `Vec` to change it.
#[derive(Clone, Debug, Default)]
pub struct PublishedPorts {
    ports: Vec<PublishedPort>,
    digests: Vec<u64>,
}

impl PublishedPorts {
    /// One digest per port, keyed per process (SipHash with random keys), so that no
    /// document can be crafted to make two different ports look alike.
    pub fn digests(&self) -> &[u64] {
        &self.digests
    }

    /// Replaces the ports in `range` with `with`.
    pub fn splice(&mut self, range: std::ops::Range<usize>, with: &[PublishedPort]) {
        self.ports.splice(range.clone(), with.iter().cloned());
        self.digests.splice(range, with.iter().map(digest));
    }
}

fn digest(p: &PublishedPort) -> u64 {
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    std::hash::BuildHasher::hash_one(KEYS.get_or_init(Default::default), p)
}

impl From<Vec<PublishedPort>> for PublishedPorts {
    fn from(ports: Vec<PublishedPort>) -> Self {
        let digests = ports.iter().map(digest).collect();
        Self { ports, digests }
    }
}

impl<'a> IntoIterator for &'a PublishedPorts {
    type Item = &'a PublishedPort;
    type IntoIter = std::slice::Iter<'a, PublishedPort>;
    fn into_iter(self) -> Self::IntoIter {
        self.ports.iter()
    }
}

impl From<PublishedPorts> for Vec<PublishedPort> {
    fn from(p: PublishedPorts) -> Self {
        p.ports
    }
}

impl std::ops::Deref for PublishedPorts {
    type Target = [PublishedPort];
    fn deref(&self) -> &[PublishedPort] {
        &self.ports
    }
}

impl PartialEq for PublishedPorts {
    fn eq(&self, other: &Self) -> bool {
        self.ports == other.ports
    }
}

impl Serialize for PublishedPorts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.ports.serialize(s)
    }
}

impl<'de> Deserialize<'de> for PublishedPorts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<PublishedPort>::deserialize(d).map(Self::from)
    }
}

/// A host port forwarded to a container or an address.
#[derive(Clone, Debug, PartialEq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PublishedPort {
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Port on the host (1-65535).
    pub host_port: u16,
    /// Host address (IPv4 or IPv6) the port is published on; absent: every address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    /// Where the traffic goes.
    pub target: PortTarget,
    /// Source networks (CIDR) allowed to connect; absent: everyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_from: Option<Vec<String>>,
}

/// Destination of a published port: exactly one of `container` and `address`.
#[derive(Clone, Debug, PartialEq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortTarget {
    /// Name of a container of the containers section; its current address is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// A fixed IPv4 or IPv6 address, e.g. a WireGuard peer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Destination port (1-65535).
    pub port: u16,
}

/// Verdict for traffic no rule accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FilterPolicy {
    /// Let it through.
    Accept,
    /// Drop it silently.
    Drop,
}

/// Input filter. Loopback traffic, replies (established/related connections), ICMP and
/// ICMPv6 (needed for path MTU discovery and neighbor discovery), and traffic a NAT rule
/// redirected to this host (a proxy's ports 443/80 to its active Caddy) are always
/// accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InputFilter {
    /// Verdict for incoming traffic that no `allow` rule matches; default `accept`. With
    /// `drop`, make sure SSH and the WireGuard listen port are allowed.
    #[serde(default = "policy_accept")]
    pub policy: FilterPolicy,
    /// Incoming flows to accept (only meaningful with policy `drop`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<FilterRule>,
}

/// Forwarding filter. Replies (established/related connections) and the traffic of
/// published ports are always forwarded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Forwarding {
    /// Verdict for forwarded traffic that no `allow` rule matches; default `drop`.
    #[serde(default = "policy_drop")]
    pub policy: FilterPolicy,
    /// Forwarded flows to accept (only meaningful with policy `drop`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<FilterRule>,
}

fn policy_accept() -> FilterPolicy {
    FilterPolicy::Accept
}

fn policy_drop() -> FilterPolicy {
    FilterPolicy::Drop
}

/// One accepted flow. Empty lists match anything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FilterRule {
    /// Source networks (CIDR network form); empty: any source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<String>,
    /// Destination networks (CIDR network form); empty: any destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// Transport protocol; absent: any (then `ports` must be empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Destination ports (1-65535); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// Parses a CIDR network that must have no host bits set; on failure, the problem
/// (message, hint).
fn parse_network(s: &str) -> Result<IpNet, (String, String)> {
    match s.parse::<IpNet>() {
        Ok(n) if n.trunc() == n => Ok(n),
        Ok(n) => Err((
            format!("{s} has host bits set"),
            format!("use the network form {}", n.trunc()),
        )),
        Err(_) => match s.parse::<IpAddr>() {
            Ok(a) => Err((
                format!("not a CIDR network: {s:?}"),
                format!(
                    "for a single address write {a}/{}",
                    if a.is_ipv4() { 32 } else { 128 }
                ),
            )),
            Err(_) => Err((
                format!("not a CIDR network: {s:?}"),
                "e.g. 10.0.0.0/8 or fd00::/8".to_string(),
            )),
        },
    }
}

fn family(v4: bool) -> &'static str {
    if v4 {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Semantic checks of the section; `path` is its JSON path (`$.firewall`).
pub fn validate(spec: &FirewallSpec, path: &str, problems: &mut Problems) {
    // Earlier entries by protocol and host port, so that 10,000 ports are not compared
    // pairwise: every entry, and those that bind (a valid address, no clash).
    type Earlier = HashMap<(Protocol, u16), Vec<usize>>;
    let (mut earlier, mut bound): (Earlier, Earlier) = Default::default();
    let ports = &spec.published_ports;
    let host_ip_of = |p: &PublishedPort| p.host_ip.as_deref().and_then(|s| s.parse().ok());
    for (i, p) in ports.iter().enumerate() {
        let pp = format!("{path}.publishedPorts[{i}]");
        let same_port = (p.protocol, p.host_port);
        let mut host_ip = None;
        let mut host_ip_ok = true;
        if let Some(s) = &p.host_ip {
            match s.parse::<IpAddr>() {
                Ok(a) => host_ip = Some(a),
                Err(_) => {
                    host_ip_ok = false;
                    problems.push(format!("{pp}.hostIp"), format!("not an IP address: {s:?}"));
                }
            }
        }
        if p.host_port == 0 {
            problems.push(format!("{pp}.hostPort"), "port must be 1-65535");
        } else if host_ip_ok {
            let others = bound.get(&same_port).map(Vec::as_slice).unwrap_or_default();
            let clash = others
                .iter()
                .find(|&&j| converge_core::vocab::host_ips_overlap(host_ip_of(&ports[j]), host_ip));
            if let Some(j) = clash {
                problems.push_hint(
                    format!("{pp}.hostPort"),
                    format!(
                        "host port {}/{} is published twice",
                        p.protocol.as_str(),
                        p.host_port
                    ),
                    format!("conflicts with {path}.publishedPorts[{j}].hostPort"),
                );
            } else {
                bound.entry(same_port).or_default().push(i);
            }
        }
        let tp = format!("{pp}.target");
        match (&p.target.container, &p.target.address) {
            (Some(_), Some(_)) => problems.push_hint(
                tp.clone(),
                "target has both container and address",
                "keep exactly one of them",
            ),
            (None, None) => problems.push_hint(
                tp.clone(),
                "target has neither container nor address",
                "set container (a container name) or address (an IP address)",
            ),
            _ => {}
        }
        if let Some(c) = &p.target.container {
            if !converge_core::vocab::is_name(c) {
                problems.push(
                    format!("{tp}.container"),
                    format!("invalid container name {c:?}"),
                );
            }
        }
        if let Some(a) = &p.target.address {
            match a.parse::<IpAddr>() {
                Err(_) => problems.push_hint(
                    format!("{tp}.address"),
                    format!("not an IP address: {a:?}"),
                    "an IPv4 or IPv6 address without port; the port goes in target.port",
                ),
                Ok(t) if t.is_unspecified() || t.is_multicast() => problems.push(
                    format!("{tp}.address"),
                    format!("{t} cannot be a forwarding target"),
                ),
                Ok(t) => {
                    if let Some(h) = host_ip.filter(|h| h.is_ipv4() != t.is_ipv4()) {
                        problems.push_hint(
                            format!("{tp}.address"),
                            format!(
                                "{} target {t} cannot be reached from {} hostIp {h}",
                                family(t.is_ipv4()),
                                family(h.is_ipv4())
                            ),
                            "use addresses of the same family",
                        );
                    }
                }
            }
        }
        if p.target.port == 0 {
            problems.push(format!("{tp}.port"), "port must be 1-65535");
        }
        // allowFrom restricts a protocol/port on every host address of a family.
        let others = earlier
            .get(&same_port)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let clash = others.iter().copied().find(|&j| {
            [false, true].into_iter().any(|v6| {
                matches!((restriction(&ports[j], v6), restriction(p, v6)), (Some(a), Some(b)) if a != b)
            })
        });
        earlier.entry(same_port).or_default().push(i);
        if let Some(j) = clash {
            problems.push_hint(
                format!("{pp}.allowFrom"),
                format!(
                    "{}/{} has a different allowFrom than {path}.publishedPorts[{j}]",
                    p.protocol.as_str(),
                    p.host_port
                ),
                "give every entry of the same protocol, host port and address family the same allowFrom",
            );
        }
        if let Some(allow) = &p.allow_from {
            if allow.is_empty() {
                problems.push_hint(
                    format!("{pp}.allowFrom"),
                    "an empty allowFrom would accept no one",
                    "omit allowFrom to accept everyone, or remove the published port",
                );
            }
            for (j, s) in allow.iter().enumerate() {
                let ap = format!("{pp}.allowFrom[{j}]");
                match parse_network(s) {
                    Err((m, h)) => problems.push_hint(ap, m, h),
                    Ok(n) => {
                        if let Some(h) =
                            host_ip.filter(|h| h.is_ipv4() != matches!(n, IpNet::V4(_)))
                        {
                            problems.push_hint(
                                ap,
                                format!(
                                    "{} network {n} can never reach {} hostIp {h}",
                                    family(!h.is_ipv4()),
                                    family(h.is_ipv4())
                                ),
                                "remove it, or publish on both families",
                            );
                        }
                    }
                }
            }
        }
    }
    if let Some(f) = &spec.input {
        validate_filter(f.policy, &f.allow, &format!("{path}.input"), problems);
    }
    if let Some(f) = &spec.forward {
        validate_filter(f.policy, &f.allow, &format!("{path}.forward"), problems);
    }
}

/// The sources `p` admits for one address family: `None` when `p` is not published on
/// that family, `Some(None)` when everyone is admitted.
fn restriction(p: &PublishedPort, v6: bool) -> Option<Option<Vec<&str>>> {
    let host_ip: Option<IpAddr> = p.host_ip.as_deref().and_then(|s| s.parse().ok());
    if host_ip.is_some_and(|h| h.is_ipv6() != v6) {
        return None;
    }
    Some(p.allow_from.as_ref().map(|nets| {
        let mut own: Vec<&str> = nets
            .iter()
            .map(String::as_str)
            .filter(|n| n.contains(':') == v6)
            .collect();
        own.sort_unstable();
        own
    }))
}

fn validate_filter(policy: FilterPolicy, allow: &[FilterRule], fp: &str, problems: &mut Problems) {
    if policy == FilterPolicy::Accept && !allow.is_empty() {
        problems.push_hint(
            format!("{fp}.allow"),
            "allow rules have no effect with policy accept",
            "set policy to drop, or remove the allow rules",
        );
    }
    for (i, r) in allow.iter().enumerate() {
        let rp = format!("{fp}.allow[{i}]");
        for (field, list) in [("from", &r.from), ("to", &r.to)] {
            for (j, s) in list.iter().enumerate() {
                if let Err((m, h)) = parse_network(s) {
                    problems.push_hint(format!("{rp}.{field}[{j}]"), m, h);
                }
            }
        }
        for (j, port) in r.ports.iter().enumerate() {
            if *port == 0 {
                problems.push(format!("{rp}.ports[{j}]"), "port must be 1-65535");
            }
        }
        if !r.ports.is_empty() && r.protocol.is_none() {
            problems.push_hint(
                format!("{rp}.ports"),
                "ports require a protocol",
                "set protocol to tcp or udp",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> FirewallSpec {
        serde_json::from_value(v).unwrap()
    }

    fn problems(spec: &FirewallSpec) -> Vec<String> {
        let mut p = Problems::default();
        validate(spec, "$.firewall", &mut p);
        p.iter().map(|p| p.path.clone()).collect()
    }

    #[test]
    fn good_spec_passes() {
        let s = spec(json!({
            "publishedPorts": [
                {"protocol": "tcp", "hostPort": 443, "target": {"container": "web", "port": 8443}},
                {"hostPort": 443, "protocol": "udp", "target": {"container": "web", "port": 8443}},
                {"hostPort": 5432, "hostIp": "10.210.0.7",
                 "target": {"address": "10.211.0.5", "port": 5432},
                 "allowFrom": ["10.210.0.0/24"]},
                {"hostPort": 5432, "hostIp": "fd00:210::7",
                 "target": {"address": "fd00:211::5", "port": 5432},
                 "allowFrom": ["fd00:210::/64"]}
            ],
            "input": {"policy": "drop", "allow": [
                {"protocol": "tcp", "ports": [80, 443]},
                {"from": ["10.210.0.0/24"], "protocol": "tcp", "ports": [22]}
            ]},
            "forward": {"policy": "drop", "allow": [
                {"from": ["10.210.0.0/24"], "to": ["10.88.0.0/16"], "protocol": "tcp", "ports": [80, 443]},
                {"from": ["10.88.0.0/16"]}
            ]},
            "masquerade": true
        }));
        assert_eq!(problems(&s), Vec::<String>::new());
        assert_eq!(s.published_ports[0].protocol, Protocol::Tcp);
        let back: FirewallSpec = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        let d = spec(json!({"forward": {}, "input": {}}));
        assert_eq!(d.forward.unwrap().policy, FilterPolicy::Drop);
        assert_eq!(d.input.unwrap().policy, FilterPolicy::Accept);
        assert!(!d.masquerade);
    }

    #[test]
    fn published_port_rules() {
        let s = spec(json!({
            "publishedPorts": [
                {"hostPort": 80, "target": {"container": "web", "port": 80}},
                {"hostPort": 80, "hostIp": "10.0.0.1", "target": {"container": "web", "address": "10.0.0.9", "port": 80}},
                {"hostPort": 0, "target": {"port": 0}},
                {"hostPort": 81, "hostIp": "10.0.0.1", "target": {"address": "fd00::1", "port": 81},
                 "allowFrom": ["10.0.0.1/8", "fd00::/8", "bogus", "10.1.2.3"]},
                {"hostPort": 82, "hostIp": "not-ip", "target": {"container": "bad name", "port": 82},
                 "allowFrom": []},
                {"hostPort": 83, "hostIp": "10.0.0.1", "target": {"address": "10.0.0.9", "port": 83}},
                {"hostPort": 83, "hostIp": "10.0.0.2", "target": {"address": "10.0.0.9", "port": 83},
                 "allowFrom": ["10.0.0.0/8"]}
            ]
        }));
        assert_eq!(
            problems(&s),
            vec![
                "$.firewall.publishedPorts[1].hostPort",
                "$.firewall.publishedPorts[1].target",
                "$.firewall.publishedPorts[2].hostPort",
                "$.firewall.publishedPorts[2].target",
                "$.firewall.publishedPorts[2].target.port",
                "$.firewall.publishedPorts[3].target.address",
                "$.firewall.publishedPorts[3].allowFrom[0]",
                "$.firewall.publishedPorts[3].allowFrom[1]",
                "$.firewall.publishedPorts[3].allowFrom[2]",
                "$.firewall.publishedPorts[3].allowFrom[3]",
                "$.firewall.publishedPorts[4].hostIp",
                "$.firewall.publishedPorts[4].target.container",
                "$.firewall.publishedPorts[4].allowFrom",
                "$.firewall.publishedPorts[6].allowFrom",
            ]
        );
    }

    #[test]
    fn filter_rules() {
        let s = spec(json!({"input": {"allow": [{"protocol": "udp", "ports": [51820]}]}}));
        assert_eq!(problems(&s), vec!["$.firewall.input.allow"]);
        let s = spec(json!({"forward": {"policy": "accept", "allow": [
            {"from": ["10.0.0.0/33"], "to": ["10.0.0.1/24"], "ports": [0, 80]}
        ]}}));
        assert_eq!(
            problems(&s),
            vec![
                "$.firewall.forward.allow",
                "$.firewall.forward.allow[0].from[0]",
                "$.firewall.forward.allow[0].to[0]",
                "$.firewall.forward.allow[0].ports[0]",
                "$.firewall.forward.allow[0].ports",
            ]
        );
    }
}
