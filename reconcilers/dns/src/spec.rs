//! The `dns` section of the document and its semantic validation.

use converge_core::problems::is_dns_name;
use converge_core::Problems;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Service-discovery DNS for this node, served by a dnsmasq that converge runs and owns.
///
/// Absent section: converge leaves any dnsmasq it started earlier, and its files, alone.
/// Present: the records listed are exactly the records served; `records: []` serves none.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DnsSpec {
    /// Zone answered locally and never forwarded, e.g. `internal`. Every record name
    /// must be inside it; unknown names in it get NXDOMAIN.
    pub zone: String,
    /// Addresses dnsmasq listens on (it binds only these, each once the host has it).
    /// With port 53 it also answers on the gateway of every network of the `networks`
    /// section: the resolver of the containers on them.
    #[schemars(length(min = 1))]
    pub listen: Vec<IpAddr>,
    /// UDP/TCP port to listen on. Containers are given the node's resolver only on 53
    /// (a resolv.conf cannot name another port).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Upstream resolvers for names outside the zone, as `IP` or `IP#port`. Empty: names
    /// outside the zone are refused rather than forwarded.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// Default TTL in seconds for the zone's answers.
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// The zone's records. Several records of one name and type are merged.
    #[serde(default)]
    pub records: Vec<Record>,
}

fn default_port() -> u16 {
    53
}

fn default_ttl() -> u32 {
    60
}

/// Record types converge can serve.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum RecordType {
    A,
    AAAA,
    CNAME,
    TXT,
    SRV,
}

impl RecordType {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordType::A => "A",
            RecordType::AAAA => "AAAA",
            RecordType::CNAME => "CNAME",
            RecordType::TXT => "TXT",
            RecordType::SRV => "SRV",
        }
    }
}

/// One DNS record set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Record {
    /// Fully qualified name inside the zone, e.g. `web.internal`; SRV names start with
    /// `_service._proto.`.
    pub name: String,
    /// Record type.
    #[serde(rename = "type")]
    pub kind: RecordType,
    /// Values: addresses for A/AAAA, one target name for CNAME, strings for TXT, and
    /// `priority weight port target` for SRV.
    #[serde(default)]
    pub values: Vec<String>,
    /// A/AAAA only: take the addresses of this container (as the containers reconciler
    /// observes them) instead of fixed `values`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// TTL in seconds; defaults to the section's `ttl`. Not supported for TXT and SRV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
}

/// A parsed SRV value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
}

impl Srv {
    pub fn parse(s: &str) -> Option<Srv> {
        let mut it = s.split_whitespace();
        let srv = Srv {
            priority: it.next()?.parse().ok()?,
            weight: it.next()?.parse().ok()?,
            port: it.next()?.parse().ok()?,
            target: it.next()?.trim_end_matches('.').to_string(),
        };
        (it.next().is_none() && is_dns_name(&srv.target, false)).then_some(srv)
    }
}

/// Parses an upstream `IP` or `IP#port` (dnsmasq's own notation).
pub fn parse_upstream(s: &str) -> Option<SocketAddr> {
    match s.split_once('#') {
        Some((ip, port)) => Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?)),
        None => Some(SocketAddr::new(s.parse().ok()?, 53)),
    }
}

/// Whether `name` equals `zone` or lies below it.
pub fn in_zone(name: &str, zone: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let zone = zone.trim_end_matches('.').to_ascii_lowercase();
    name == zone || name.ends_with(&format!(".{zone}"))
}

/// Semantic checks of the section; `path` is its JSON path (`$.dns`).
pub fn validate(spec: &DnsSpec, path: &str, problems: &mut Problems) {
    if !is_dns_name(&spec.zone, false) || spec.zone.starts_with("*.") {
        problems.push(format!("{path}.zone"), "not a valid DNS zone name");
    }
    if spec.listen.is_empty() {
        problems.push(
            format!("{path}.listen"),
            "at least one listen address is required",
        );
    }
    if spec.port == 0 {
        problems.push(format!("{path}.port"), "port must be 1-65535");
    }
    for (i, u) in spec.upstreams.iter().enumerate() {
        if parse_upstream(u).is_none() {
            problems.push_hint(
                format!("{path}.upstreams[{i}]"),
                format!("not an IP address or IP#port: {u:?}"),
                "e.g. 9.9.9.9 or 10.0.0.2#5353",
            );
        }
    }
    let mut seen: BTreeMap<(String, RecordType), usize> = BTreeMap::new();
    let mut kinds_by_name: BTreeMap<String, Vec<(RecordType, usize)>> = BTreeMap::new();
    for (i, r) in spec.records.iter().enumerate() {
        let rp = format!("{path}.records[{i}]");
        let srv = r.kind == RecordType::SRV;
        if !is_dns_name(&r.name, srv) {
            problems.push(
                format!("{rp}.name"),
                format!("not a valid DNS name: {:?}", r.name),
            );
        } else if !in_zone(&r.name, &spec.zone) {
            problems.push_hint(
                format!("{rp}.name"),
                format!("{:?} is outside the zone {:?}", r.name, spec.zone),
                format!("use a name ending in .{}", spec.zone),
            );
        }
        let key = (r.name.trim_end_matches('.').to_ascii_lowercase(), r.kind);
        if let Some(first) = seen.insert(key.clone(), i) {
            problems.push_hint(
                format!("{rp}.name"),
                format!("duplicate {} record for {:?}", r.kind.as_str(), r.name),
                format!("merge its values into {path}.records[{first}]"),
            );
        }
        kinds_by_name.entry(key.0).or_default().push((r.kind, i));
        validate_values(r, &rp, problems);
        if r.ttl.is_some() && matches!(r.kind, RecordType::TXT | RecordType::SRV) {
            problems.push_hint(
                format!("{rp}.ttl"),
                format!("per-record TTL is not supported for {}", r.kind.as_str()),
                "remove it; the section ttl applies",
            );
        }
    }
    for kinds in kinds_by_name.values() {
        if kinds.len() > 1 {
            if let Some((_, i)) = kinds.iter().find(|(k, _)| *k == RecordType::CNAME) {
                problems.push_hint(
                    format!("{path}.records[{i}].name"),
                    "a CNAME name cannot have other records",
                    "remove the other records of this name or the CNAME",
                );
            }
        }
    }
}

fn validate_values(r: &Record, rp: &str, problems: &mut Problems) {
    if r.container.is_some() {
        if !matches!(r.kind, RecordType::A | RecordType::AAAA) {
            problems.push(
                format!("{rp}.container"),
                "only A and AAAA records can name a container",
            );
        }
        if !r.values.is_empty() {
            problems.push_hint(
                format!("{rp}.values"),
                "values and container are mutually exclusive",
                "keep one of them",
            );
        }
        return;
    }
    if r.values.is_empty() {
        problems.push(format!("{rp}.values"), "at least one value is required");
    }
    if r.kind == RecordType::CNAME && r.values.len() > 1 {
        problems.push_hint(
            format!("{rp}.values"),
            "a CNAME has exactly one target",
            "keep one value",
        );
    }
    for (j, v) in r.values.iter().enumerate() {
        let vp = format!("{rp}.values[{j}]");
        let ok = match r.kind {
            RecordType::A => v.parse::<Ipv4Addr>().is_ok(),
            RecordType::AAAA => v.parse::<Ipv6Addr>().is_ok(),
            RecordType::CNAME => is_dns_name(v, false) && !v.starts_with("*."),
            // dnsmasq's config syntax cannot carry a double quote or a newline.
            RecordType::TXT => !v.contains(['"', '\n', '\r', '\\']) && v.len() <= 1024,
            RecordType::SRV => Srv::parse(v).is_some(),
        };
        if !ok {
            let hint = match r.kind {
                RecordType::A => "an IPv4 address, e.g. 10.88.0.10 (IPv6 goes in an AAAA record)",
                RecordType::AAAA => "an IPv6 address, e.g. fd00::5 (IPv4 goes in an A record)",
                RecordType::CNAME => "a DNS name, e.g. web.internal",
                RecordType::TXT => {
                    "text up to 1024 characters without quotes, backslashes or newlines"
                }
                RecordType::SRV => {
                    "\"priority weight port target\", e.g. \"10 5 8080 web.internal\""
                }
            };
            problems.push_hint(
                vp,
                format!("invalid {} value {:?}", r.kind.as_str(), v),
                hint,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(records: serde_json::Value) -> DnsSpec {
        serde_json::from_value(serde_json::json!({
            "zone": "internal", "listen": ["127.0.0.1"], "records": records
        }))
        .unwrap()
    }

    fn paths(spec: &DnsSpec) -> Vec<String> {
        let mut p = Problems::default();
        validate(spec, "$.dns", &mut p);
        p.iter().map(|p| p.path.clone()).collect()
    }

    #[test]
    fn good_records_pass() {
        let s = spec(serde_json::json!([
            {"name": "web.internal", "type": "A", "values": ["10.0.0.1", "10.0.0.2"]},
            {"name": "web.internal", "type": "AAAA", "values": ["fd00::1"], "ttl": 5},
            {"name": "web.internal", "type": "TXT", "values": ["v=1"]},
            {"name": "www.internal", "type": "CNAME", "values": ["web.internal"]},
            {"name": "_http._tcp.web.internal", "type": "SRV", "values": ["10 5 80 web.internal"]},
            {"name": "api.internal", "type": "A", "container": "api"}
        ]));
        assert_eq!(paths(&s), Vec::<String>::new());
        assert_eq!(s.port, 53);
        assert_eq!(s.ttl, 60);
    }

    #[test]
    fn each_rule_reports_its_path() {
        let s = spec(serde_json::json!([
            {"name": "bad_name.internal", "type": "A", "values": ["10.0.0.1"]},
            {"name": "web.example.com", "type": "A", "values": ["10.0.0.1"]},
            {"name": "v6.internal", "type": "A", "values": ["fd00::1"]},
            {"name": "c.internal", "type": "CNAME", "values": ["a.internal", "b.internal"]},
            {"name": "c.internal", "type": "TXT", "values": ["x"]},
            {"name": "s.internal", "type": "SRV", "values": ["10 5 web.internal"]},
            {"name": "v6.internal", "type": "A", "values": ["10.0.0.1"]},
            {"name": "t.internal", "type": "TXT", "values": ["x"], "ttl": 5},
            {"name": "k.internal", "type": "CNAME", "container": "api"}
        ]));
        let p = paths(&s);
        for want in [
            "$.dns.records[0].name",
            "$.dns.records[1].name",
            "$.dns.records[2].values[0]",
            "$.dns.records[3].values",
            "$.dns.records[3].name",
            "$.dns.records[5].values[0]",
            "$.dns.records[6].name",
            "$.dns.records[7].ttl",
            "$.dns.records[8].container",
        ] {
            assert!(p.contains(&want.to_string()), "missing {want} in {p:?}");
        }
    }

    #[test]
    fn upstreams_and_zone() {
        let mut s = spec(serde_json::json!([]));
        s.upstreams = vec![
            "9.9.9.9".into(),
            "10.0.0.2#5353".into(),
            "dns.google".into(),
        ];
        s.zone = "-bad".into();
        assert_eq!(paths(&s), vec!["$.dns.zone", "$.dns.upstreams[2]"]);
        assert_eq!(
            parse_upstream("10.0.0.2#5353"),
            Some("10.0.0.2:5353".parse().unwrap())
        );
    }
}
