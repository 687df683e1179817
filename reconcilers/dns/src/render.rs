//! Pure rendering of the desired zone into dnsmasq's files, and parsing them back.
//!
//! A/AAAA records with the zone's default TTL go to a hosts file in dnsmasq's
//! `--hostsdir`, which dnsmasq re-reads on inotify: no restart, no lost query.
//! CNAME, TXT, SRV and A/AAAA with their own TTL exist only as dnsmasq configuration,
//! which dnsmasq reads at start-up only, so they go to a content-addressed config file
//! (`dnsmasq-<sha>.conf`); a new hash means one restart, batched with every other
//! config change of the same pass.

use crate::spec::{DnsSpec, RecordType, Srv};
use converge_core::Facts;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Where the reconciler keeps its files; everything under `dir` is owned by converge.
#[derive(Clone, Debug)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn hosts_dir(&self) -> PathBuf {
        self.dir.join("hosts")
    }
    pub fn hosts_file(&self) -> PathBuf {
        self.hosts_dir().join("converge.hosts")
    }
    pub fn conf_file(&self, hash: &str) -> PathBuf {
        self.dir.join(format!("dnsmasq-{hash}.conf"))
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("dnsmasq.pid")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("dnsmasq.log")
    }
}

/// One record set as served: sorted values and effective TTL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordSet {
    pub values: Vec<String>,
    pub ttl: u32,
}

/// Records keyed by (lower-case name, type).
pub type Zone = BTreeMap<(String, RecordType), RecordSet>;

/// Everything dnsmasq would serve, in a comparable form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Server settings (zone, listen, port, upstreams, ttl) as display strings.
    pub settings: BTreeMap<&'static str, String>,
    pub records: Zone,
}

/// Rendered files for one desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub hosts: String,
    pub conf: String,
    pub conf_hash: String,
}

const HEADER: &str = "# Managed by converge: changes here are overwritten.\n";

/// Resolves the desired zone: fixed values plus container addresses from `facts`.
///
/// A container the facts do not know yet (the containers reconciler has not reported
/// since start-up, or is not managing this node) keeps the values served now, so an
/// agent restart never flaps a record; a known container without an address (stopped)
/// has its record removed until it has one again.
pub fn desired_zone(spec: &DnsSpec, facts: &Facts, current: &Zone) -> Zone {
    let mut zone = Zone::new();
    for r in &spec.records {
        let name = r.name.trim_end_matches('.').to_ascii_lowercase();
        let mut values: Vec<String> = match &r.container {
            Some(c) if !facts.containers.contains_key(c) => current
                .get(&(name.clone(), r.kind))
                .map(|set| set.values.clone())
                .unwrap_or_default(),
            Some(c) => facts
                .containers
                .get(c)
                .map(|f| {
                    f.addresses
                        .iter()
                        .filter(|a| {
                            matches!(
                                (a, r.kind),
                                (IpAddr::V4(_), RecordType::A) | (IpAddr::V6(_), RecordType::AAAA)
                            )
                        })
                        .map(|a| a.to_string())
                        .collect()
                })
                .unwrap_or_default(),
            None => r.values.iter().map(|v| normalize(r.kind, v)).collect(),
        };
        values.sort();
        values.dedup();
        if values.is_empty() {
            continue;
        }
        zone.insert(
            (name, r.kind),
            RecordSet {
                values,
                ttl: r.ttl.unwrap_or(spec.ttl),
            },
        );
    }
    zone
}

/// Canonical text of a value so that equal values compare equal after a round trip.
fn normalize(kind: RecordType, v: &str) -> String {
    match kind {
        RecordType::A | RecordType::AAAA => v
            .parse::<IpAddr>()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| v.to_string()),
        RecordType::CNAME => v.trim_end_matches('.').to_ascii_lowercase(),
        RecordType::SRV => Srv::parse(v)
            .map(|s| {
                format!(
                    "{} {} {} {}",
                    s.priority,
                    s.weight,
                    s.port,
                    s.target.to_ascii_lowercase()
                )
            })
            .unwrap_or_else(|| v.to_string()),
        RecordType::TXT => v.to_string(),
    }
}

fn settings(spec: &DnsSpec) -> BTreeMap<&'static str, String> {
    let join = |v: Vec<String>| {
        if v.is_empty() {
            "(none)".to_string()
        } else {
            v.join(", ")
        }
    };
    BTreeMap::from([
        ("zone", spec.zone.trim_end_matches('.').to_ascii_lowercase()),
        (
            "listen",
            join(spec.listen.iter().map(|a| a.to_string()).collect()),
        ),
        ("port", spec.port.to_string()),
        ("upstreams", join(spec.upstreams.clone())),
        ("ttl", spec.ttl.to_string()),
    ])
}

/// What the desired state serves, for comparison with [`parse`] of the host's files.
pub fn desired_served(spec: &DnsSpec, zone: &Zone) -> Served {
    Served {
        settings: settings(spec),
        records: zone.clone(),
    }
}

/// Renders the hosts file and the dnsmasq configuration.
pub fn render(spec: &DnsSpec, zone: &Zone, layout: &Layout) -> Rendered {
    let mut hosts = String::from(HEADER);
    let mut conf = String::from(HEADER);
    let s = settings(spec);
    // Only this file configures the instance: no /etc/hosts, no resolv.conf, bind
    // exactly the listen addresses, never forward plain names or private reverses.
    // `bind-dynamic`, not `bind-interfaces`: a listen address that does not exist yet (a
    // container network's gateway before its bridge is up, a WireGuard address) is bound
    // when it appears and released when it goes, instead of failing the start.
    for flag in [
        "no-resolv",
        "no-hosts",
        "bind-dynamic",
        "domain-needed",
        "bogus-priv",
    ] {
        conf.push_str(flag);
        conf.push('\n');
    }
    let mut line = |k: &str, v: &dyn std::fmt::Display| conf.push_str(&format!("{k}={v}\n"));
    line("pid-file", &layout.pid_file().display());
    line("log-facility", &layout.log_file().display());
    line("hostsdir", &layout.hosts_dir().display());
    line("port", &spec.port);
    for a in &spec.listen {
        line("listen-address", a);
    }
    line("local", &format!("/{}/", s["zone"]));
    for u in &spec.upstreams {
        line("server", u);
    }
    line("local-ttl", &spec.ttl);
    for ((name, kind), set) in zone {
        match kind {
            RecordType::A | RecordType::AAAA if set.ttl == spec.ttl => {
                for v in &set.values {
                    hosts.push_str(&format!("{v} {name}\n"));
                }
            }
            RecordType::A | RecordType::AAAA => {
                for v in &set.values {
                    line("host-record", &format!("{name},{v},{}", set.ttl));
                }
            }
            RecordType::CNAME => line("cname", &format!("{name},{},{}", set.values[0], set.ttl)),
            RecordType::TXT => {
                for v in &set.values {
                    line("txt-record", &format!("{name},\"{v}\""));
                }
            }
            RecordType::SRV => {
                for v in &set.values {
                    if let Some(srv) = Srv::parse(v) {
                        line(
                            "srv-host",
                            &format!(
                                "{name},{},{},{},{}",
                                srv.target, srv.port, srv.priority, srv.weight
                            ),
                        );
                    }
                }
            }
        }
    }
    let conf_hash = hex::encode(Sha256::digest(conf.as_bytes()))[..16].to_string();
    Rendered {
        hosts,
        conf,
        conf_hash,
    }
}

/// Parses the host's files back into what dnsmasq serves from them. Unknown lines
/// are ignored (a hand edit then shows up as a byte difference, not as records).
pub fn parse(hosts: Option<&str>, conf: Option<&str>) -> Served {
    let mut served = Served::default();
    let mut default_ttl = 0;
    let mut listen = Vec::new();
    let mut upstreams = Vec::new();
    if let Some(conf) = conf {
        for l in conf.lines() {
            let Some((k, v)) = l.split_once('=') else {
                continue;
            };
            match k {
                "local-ttl" => default_ttl = v.parse().unwrap_or(0),
                "port" => {
                    served.settings.insert("port", v.to_string());
                }
                "listen-address" => listen.push(v.to_string()),
                "server" => upstreams.push(v.to_string()),
                "local" => {
                    served
                        .settings
                        .insert("zone", v.trim_matches('/').to_string());
                }
                _ => {}
            }
        }
        let join = |v: Vec<String>| {
            if v.is_empty() {
                "(none)".to_string()
            } else {
                v.join(", ")
            }
        };
        served.settings.insert("listen", join(listen));
        served.settings.insert("upstreams", join(upstreams));
        served.settings.insert("ttl", default_ttl.to_string());
        for l in conf.lines() {
            let Some((k, v)) = l.split_once('=') else {
                continue;
            };
            let f: Vec<&str> = v.split(',').collect();
            let (key, value, ttl) = match (k, f.as_slice()) {
                ("host-record", [name, addr, ttl]) => {
                    let kind = if addr.contains(':') {
                        RecordType::AAAA
                    } else {
                        RecordType::A
                    };
                    (
                        ((*name).to_string(), kind),
                        addr.to_string(),
                        ttl.parse().unwrap_or(0),
                    )
                }
                ("cname", [name, target, ttl]) => (
                    ((*name).to_string(), RecordType::CNAME),
                    target.to_string(),
                    ttl.parse().unwrap_or(0),
                ),
                ("txt-record", _) => {
                    let Some((name, text)) = v.split_once(',') else {
                        continue;
                    };
                    (
                        (name.to_string(), RecordType::TXT),
                        text.trim_matches('"').to_string(),
                        default_ttl,
                    )
                }
                ("srv-host", [name, target, port, prio, weight]) => (
                    ((*name).to_string(), RecordType::SRV),
                    format!("{prio} {weight} {port} {target}"),
                    default_ttl,
                ),
                _ => continue,
            };
            add(&mut served.records, key, value, ttl);
        }
    }
    for l in hosts.unwrap_or_default().lines() {
        let mut it = l.split_whitespace();
        let (Some(addr), Some(name)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(ip) = addr.parse::<IpAddr>() else {
            continue;
        };
        let kind = if ip.is_ipv4() {
            RecordType::A
        } else {
            RecordType::AAAA
        };
        add(
            &mut served.records,
            (name.to_string(), kind),
            ip.to_string(),
            default_ttl,
        );
    }
    served
}

fn add(zone: &mut Zone, key: (String, RecordType), value: String, ttl: u32) {
    let set = zone.entry(key).or_insert(RecordSet {
        values: Vec::new(),
        ttl,
    });
    set.values.push(value);
    set.values.sort();
}

/// Extracts the config hash from a config file name such as `dnsmasq-<hash>.conf`.
pub fn conf_hash_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    Some(
        name.strip_prefix("dnsmasq-")?
            .strip_suffix(".conf")?
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DnsSpec {
        serde_json::from_value(serde_json::json!({
            "zone": "internal", "listen": ["127.0.0.1"], "port": 5353, "upstreams": ["9.9.9.9"],
            "records": [
                {"name": "web.internal", "type": "A", "values": ["10.0.0.2", "10.0.0.1"]},
                {"name": "web.internal", "type": "AAAA", "values": ["fd00::1"], "ttl": 5},
                {"name": "Web.internal", "type": "TXT", "values": ["v=1 a", "x"]},
                {"name": "www.internal", "type": "CNAME", "values": ["web.internal."]},
                {"name": "_http._tcp.web.internal", "type": "SRV", "values": ["10 5 80 web.internal"]},
                {"name": "api.internal", "type": "A", "container": "api"}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn render_then_parse_round_trips() {
        let s = spec();
        let mut facts = Facts::default();
        facts.containers.insert(
            "api".into(),
            converge_core::ContainerFacts {
                addresses: vec!["10.88.0.7".parse().unwrap(), "fd00::7".parse().unwrap()],
                running: true,
            },
        );
        let zone = desired_zone(&s, &facts, &Zone::new());
        assert_eq!(
            zone[&("api.internal".into(), RecordType::A)].values,
            vec!["10.88.0.7"]
        );
        let layout = Layout::new("/var/lib/converge/dns");
        let r = render(&s, &zone, &layout);
        assert!(r
            .hosts
            .contains("10.0.0.1 web.internal\n10.0.0.2 web.internal\n"));
        assert!(r.conf.contains("host-record=web.internal,fd00::1,5\n"));
        assert!(r.conf.contains("cname=www.internal,web.internal,60\n"));
        assert!(r
            .conf
            .contains("srv-host=_http._tcp.web.internal,web.internal,80,10,5\n"));
        assert!(r.conf.contains("no-resolv\n"));
        assert!(r.conf.contains("bind-dynamic\n"));
        assert_eq!(
            parse(Some(&r.hosts), Some(&r.conf)),
            desired_served(&s, &zone)
        );
        // Same input, same bytes: the hash is stable.
        assert_eq!(render(&s, &zone, &layout), r);
    }

    #[test]
    fn unknown_container_keeps_served_values_known_empty_one_is_removed() {
        let key = ("api.internal".to_string(), RecordType::A);
        let zone = desired_zone(&spec(), &Facts::default(), &Zone::new());
        assert!(!zone.contains_key(&key));
        let mut current = Zone::new();
        let served = RecordSet {
            values: vec!["10.88.0.9".into()],
            ttl: 60,
        };
        current.insert(key.clone(), served.clone());
        assert_eq!(
            desired_zone(&spec(), &Facts::default(), &current)[&key],
            served
        );
        let mut facts = Facts::default();
        facts.containers.insert("api".into(), Default::default());
        assert!(!desired_zone(&spec(), &facts, &current).contains_key(&key));
    }

    #[test]
    fn hash_from_file_name() {
        assert_eq!(
            conf_hash_of(Path::new("/x/dnsmasq-abc.conf")).as_deref(),
            Some("abc")
        );
        assert_eq!(conf_hash_of(Path::new("/x/other.conf")), None);
    }
}
