//! A container's resolver (`dns`): its type, its validation, and the node's default for
//! containers on converge's networks (the node's dnsmasq on the network's gateway, the
//! zone as search domain), folded into the entry before it is planned so that it is part
//! of the spec hash, the `converge.spec` label and the diff like any field.

use super::*;
use converge_core::problems::is_dns_name;
use converge_core::Problems;
use std::net::IpAddr;

/// The container's `/etc/resolv.conf`. Default: on a network of the `networks` section,
/// when the document has a `dns` section answering on port 53, the node's dnsmasq on
/// that network's gateway with the zone as search domain; elsewhere the runtime's own.
/// Each field given replaces that default's; an empty list leaves the field to the
/// runtime (which copies the host's).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerDns {
    /// Name servers, IPv4 or IPv6 addresses (port 53: a resolv.conf cannot name
    /// another), at most 3 (the resolver reads no more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub servers: Option<Vec<String>>,
    /// Search domains, e.g. `internal` (at most 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<Vec<String>>,
    /// Resolver options (resolv.conf(5)), e.g. `ndots:2`, `timeout:1`, `edns0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Vec<String>>,
}

/// Most name servers a resolv.conf uses (glibc's and musl's MAXNS).
pub const MAX_DNS_SERVERS: usize = 3;
/// Most search domains (the traditional resolv.conf limit, still musl's).
pub const MAX_DNS_SEARCH: usize = 6;

/// Network modes that have no resolver of their own to set.
fn shares_resolver(network: Option<&str>) -> bool {
    matches!(network, Some("host" | "none"))
}

/// Whether `o` is a resolv.conf option: a name, or `name:number`.
fn is_resolver_option(o: &str) -> bool {
    let (name, value) = o.split_once(':').unwrap_or((o, ""));
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && (!o.contains(':')
            || (!value.is_empty() && value.len() <= 5 && value.bytes().all(|b| b.is_ascii_digit())))
}

/// Checks of `c.dns` at JSON path `cp` (the container's).
pub(super) fn validate_dns(c: &Container, cp: &str, problems: &mut Problems) {
    let Some(d) = &c.dns else { return };
    let dp = format!("{cp}.dns");
    if shares_resolver(c.network.as_deref()) {
        problems.push_hint(
            dp.clone(),
            format!(
                "a container on network {:?} has no resolver of its own",
                c.network.as_deref().unwrap_or_default()
            ),
            "remove dns, or attach the container to a bridge network",
        );
    }
    if let Some(servers) = &d.servers {
        if servers.len() > MAX_DNS_SERVERS {
            problems.push_hint(
                format!("{dp}.servers"),
                format!(
                    "{} servers: a resolver reads at most {MAX_DNS_SERVERS}",
                    servers.len()
                ),
                "keep the first three",
            );
        }
        for (j, s) in servers.iter().enumerate() {
            match s.parse::<IpAddr>() {
                Ok(a) if !a.is_unspecified() && !a.is_multicast() => {}
                _ => problems.push_hint(
                    format!("{dp}.servers[{j}]"),
                    format!("not a name server address: {s:?}"),
                    "an IPv4 or IPv6 address, e.g. 10.89.7.1 (no port: a resolver asks port 53)",
                ),
            }
        }
    }
    if let Some(search) = &d.search {
        if search.len() > MAX_DNS_SEARCH {
            problems.push_hint(
                format!("{dp}.search"),
                format!("{} search domains: at most {MAX_DNS_SEARCH}", search.len()),
                "keep the ones names are looked up in most",
            );
        }
        for (j, s) in search.iter().enumerate() {
            if s.contains('*') || !is_dns_name(s, false) {
                problems.push_hint(
                    format!("{dp}.search[{j}]"),
                    format!("not a search domain: {s:?}"),
                    "a DNS name, e.g. internal or svc.example.com",
                );
            }
        }
    }
    for (j, o) in d.options.iter().flatten().enumerate() {
        if !is_resolver_option(o) {
            problems.push_hint(
                format!("{dp}.options[{j}]"),
                format!("not a resolver option: {o:?}"),
                "a resolv.conf option such as ndots:2, timeout:1, attempts:3, edns0 or rotate",
            );
        }
    }
}

/// The node's resolver as its containers get it: the zone (their search domain) and,
/// per network of the `networks` section (by name), the gateways where the node's
/// dnsmasq answers (IPv4 first).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeResolver {
    pub zone: String,
    pub gateways: BTreeMap<String, Vec<IpAddr>>,
}

impl NodeResolver {
    /// The resolver for `networks` of node `node` answering for `zone`.
    pub fn new(zone: &str, networks: &[Network], node: &str) -> NodeResolver {
        let gateways = networks
            .iter()
            .map(|n| {
                let mut gws: Vec<IpAddr> = crate::plan::network_spec(n, node)
                    .subnets
                    .into_iter()
                    .map(|(_, gw)| gw)
                    .collect();
                gws.sort_by_key(|g| g.is_ipv6());
                (n.name.clone(), gws)
            })
            .collect();
        NodeResolver {
            zone: zone.trim_end_matches('.').to_ascii_lowercase(),
            gateways,
        }
    }

    /// `c.dns` with the node's default filled in where `c` leaves it: servers and search
    /// for a container on one of the resolver's networks; anything else unchanged.
    pub fn apply(&self, c: &mut Container) {
        let Some(gateways) = c.network.as_ref().and_then(|n| self.gateways.get(n)) else {
            return;
        };
        let d = c.dns.get_or_insert_with(Default::default);
        if d.servers.is_none() {
            d.servers = Some(gateways.iter().map(ToString::to_string).collect());
        }
        if d.search.is_none() {
            d.search = Some(vec![self.zone.clone()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn containers(v: serde_json::Value) -> ContainersSpec {
        serde_json::from_value(v).unwrap()
    }

    fn problems(spec: &ContainersSpec) -> Vec<String> {
        let mut p = Problems::default();
        validate(spec, "$.containers", &mut p);
        p.iter().map(|p| p.path.clone()).collect()
    }

    #[test]
    fn good_and_bad_values_with_their_paths() {
        let good = containers(json!([{"name": "a", "image": "x:1", "network": "apps",
            "dns": {"servers": ["10.0.0.1", "fd00::1"], "search": ["internal", "svc.example.com."],
                    "options": ["ndots:2", "edns0", "single-request-reopen"]}},
            {"name": "b", "image": "x:1", "dns": {"servers": [], "search": [], "options": []}}]));
        assert_eq!(problems(&good), Vec::<String>::new());
        let bad = containers(json!([{"name": "a", "image": "x:1", "network": "host",
            "dns": {"servers": ["10.0.0.1:53", "0.0.0.0", "1.1.1.1", "8.8.8.8"],
                    "search": ["bad_domain", "*.internal", "a", "b", "c", "d", "e"],
                    "options": ["ndots:", "Rotate", "ndots:2", "timeout:1x"]}}]));
        assert_eq!(
            problems(&bad),
            vec![
                "$.containers[0].dns",
                "$.containers[0].dns.servers",
                "$.containers[0].dns.servers[0]",
                "$.containers[0].dns.servers[1]",
                "$.containers[0].dns.search",
                "$.containers[0].dns.search[0]",
                "$.containers[0].dns.search[1]",
                "$.containers[0].dns.options[0]",
                "$.containers[0].dns.options[1]",
                "$.containers[0].dns.options[3]",
            ]
        );
        assert!(serde_json::from_value::<ContainerDns>(json!({"server": ["10.0.0.1"]})).is_err());
    }

    #[test]
    fn the_node_default_fills_what_the_entry_leaves() {
        let nets: NetworksSpec = serde_json::from_value(json!([
            {"name": "apps", "subnets": [{"subnet": "fd00:7::/64", "gateway": "fd00:7::1"}, {"subnet": "10.89.7.0/24"}]},
            {"name": "db", "subnets": [{"subnet": "10.89.8.0/24", "gateway": "10.89.8.254"}]}
        ]))
        .unwrap();
        let r = NodeResolver::new("Internal.", &nets, "n1");
        let mut cs = containers(json!([
            {"name": "a", "image": "x:1", "network": "apps"},
            {"name": "b", "image": "x:1", "network": "db", "dns": {"options": ["ndots:1"]}},
            {"name": "c", "image": "x:1", "network": "db", "dns": {"servers": [], "search": ["x"]}},
            {"name": "d", "image": "x:1", "network": "podman"},
            {"name": "e", "image": "x:1", "dns": {"servers": ["9.9.9.9"]}}
        ]));
        let before = cs.clone();
        for c in &mut cs {
            r.apply(c);
        }
        let dns = |i: usize| serde_json::to_value(&cs[i].dns).unwrap();
        assert_eq!(
            dns(0),
            json!({"servers": ["10.89.7.1", "fd00:7::1"], "search": ["internal"]})
        );
        assert_eq!(
            dns(1),
            json!({"servers": ["10.89.8.254"], "search": ["internal"], "options": ["ndots:1"]})
        );
        assert_eq!(dns(2), json!({"servers": [], "search": ["x"]}));
        // Not on a network of the section: as written.
        assert_eq!(cs[3], before[3]);
        assert_eq!(cs[4], before[4]);
        // What the runtimes get.
        let s = crate::driver::ContainerSettings::of(&cs[1]);
        assert_eq!(s.dns_servers, ["10.89.8.254".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            (s.dns_search, s.dns_options),
            (vec!["internal".to_string()], vec!["ndots:1".to_string()])
        );
        // Another zone is another entry, so another spec hash: the containers are replaced.
        let mut other = before[0].clone();
        NodeResolver::new("example", &nets, "n1").apply(&mut other);
        let hash = |c: &Container| crate::plan::desired(c, "n1", &BTreeMap::new()).unwrap().1;
        assert_ne!(hash(&other), hash(&cs[0]));
    }
}
