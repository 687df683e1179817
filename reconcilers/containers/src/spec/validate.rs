//! Semantic validation of the `containers` section: names, images, ports, volumes,
//! resources and health checks, every problem with its JSON path.

use super::*;
use converge_core::vocab::{
    host_ips_overlap, is_env_name, is_name, is_secret_name, key_path, Unique,
};
use converge_core::Problems;
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::net::IpAddr;

/// Published host ports seen so far: (protocol, hostPort) to every (hostIp, path).
type Published = BTreeMap<(Protocol, u16), Vec<(Option<IpAddr>, String)>>;

/// Semantic checks of the `registries` section; `path` is its JSON path.
pub fn validate_registries(spec: &[Registry], path: &str, problems: &mut Problems) {
    let mut servers = Unique::new("registry server", path);
    for (i, r) in spec.iter().enumerate() {
        let rp = format!("{path}[{i}]");
        if let Err(e) = check_server(&r.server) {
            problems.push_hint(
                format!("{rp}.server"),
                e,
                "host[:port] as image references name it, e.g. registry.example.com:5000 or docker.io",
            );
        } else {
            servers.check(&r.server, i, format!("{rp}.server"), problems);
        }
        if r.username.is_empty() || r.username.chars().any(char::is_control) {
            problems.push(
                format!("{rp}.username"),
                "the username must be non-empty, without control characters",
            );
        }
        if !is_secret_name(&r.password_secret) {
            problems.push(
                format!("{rp}.passwordSecret"),
                format!("invalid secret name {:?}", r.password_secret),
            );
        }
    }
}

/// A registry server: a host name or IPv4 address, or an IPv6 address in brackets, with
/// an optional port.
fn check_server(server: &str) -> Result<(), String> {
    let bad = |why: &str| format!("invalid registry server {server:?}: {why}");
    if server.contains('/') {
        return Err(bad("no scheme or path"));
    }
    let (ip6, port) = match server.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((h, tail)) if h.parse::<std::net::Ipv6Addr>().is_ok() => {
                (true, tail.strip_prefix(':'))
            }
            _ => return Err(bad("not an IPv6 address in brackets")),
        },
        None => (false, server.split_once(':').map(|(_, p)| p)),
    };
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad("the port is not 1-65535"));
        }
    }
    let host = server.split(':').next().unwrap_or_default();
    let name = host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ip6 || name {
        Ok(())
    } else {
        Err(bad("not a host name or address"))
    }
}

/// Semantic checks of the section; `path` is its JSON path (`$.containers`).
pub fn validate(spec: &[Container], path: &str, problems: &mut Problems) {
    let mut names = Unique::new("container name", path);
    let mut published = Published::new();
    for (i, c) in spec.iter().enumerate() {
        let cp = format!("{path}[{i}]");
        if !is_name(&c.name) {
            problems.push_hint(
                format!("{cp}.name"),
                format!("invalid container name {:?}", c.name),
                "use [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 63 characters",
            );
        } else {
            names.check(&c.name, i, format!("{cp}.name"), problems);
        }
        if let Err(e) = check_image(&c.image) {
            problems.push_hint(
                format!("{cp}.image"),
                e,
                "e.g. docker.io/library/nginx:1.27 or ghcr.io/acme/api@sha256:<64 hex digits>",
            );
        }
        if let Some(cmd) = &c.command {
            if cmd.first().is_some_and(String::is_empty) {
                problems.push(
                    format!("{cp}.command[0]"),
                    "the executable must not be empty",
                );
            }
        }
        for k in c.env.keys() {
            if !is_env_name(k) {
                problems.push_hint(
                    key_path(&format!("{cp}.env"), k),
                    format!("invalid environment variable name {k:?}"),
                    "use [A-Za-z_][A-Za-z0-9_]*",
                );
            }
        }
        for (k, secret) in &c.secret_env {
            let kp = key_path(&format!("{cp}.secretEnv"), k);
            if !is_env_name(k) {
                problems.push_hint(
                    kp.clone(),
                    format!("invalid environment variable name {k:?}"),
                    "use [A-Za-z_][A-Za-z0-9_]*",
                );
            } else if c.env.contains_key(k) {
                problems.push_hint(
                    kp.clone(),
                    format!("{k} is set in both env and secretEnv"),
                    "keep one of them",
                );
            }
            if !is_secret_name(secret) {
                problems.push(kp, format!("invalid secret name {secret:?}"));
            }
        }
        for (j, port) in c.ports.iter().enumerate() {
            validate_port(port, &format!("{cp}.ports[{j}]"), &mut published, problems);
        }
        let mut targets: BTreeMap<&str, usize> = BTreeMap::new();
        for (j, v) in c.volumes.iter().enumerate() {
            let vp = format!("{cp}.volumes[{j}]");
            if v.is_bind() {
                if v.source.contains("/../") || v.source.ends_with("/..") {
                    problems.push(
                        format!("{vp}.source"),
                        format!("bind source {:?} must not contain ..", v.source),
                    );
                }
            } else if !is_name(&v.source) {
                problems.push_hint(
                    format!("{vp}.source"),
                    format!("{:?} is neither an absolute host path nor a volume name", v.source),
                    "use an absolute path (/srv/data) for a bind mount, or a name ([a-zA-Z0-9][a-zA-Z0-9_.-]*) for a named volume",
                );
            }
            if !v.target.starts_with('/') {
                problems.push_hint(
                    format!("{vp}.target"),
                    format!("mount target {:?} is not an absolute path", v.target),
                    "e.g. /var/lib/postgresql/data",
                );
            } else if v.target == "/" {
                problems.push(format!("{vp}.target"), "cannot mount over /");
            } else if let Some(first) = targets.insert(v.target.trim_end_matches('/'), j) {
                problems.push_hint(
                    format!("{vp}.target"),
                    format!("{:?} is mounted twice", v.target),
                    format!("also the target of {cp}.volumes[{first}]"),
                );
            }
        }
        if let Some(r) = &c.resources {
            validate_resources(r, &format!("{cp}.resources"), problems);
        }
        if let Some(h) = &c.health_check {
            validate_health_check(h, &format!("{cp}.healthCheck"), problems);
        }
        for k in c.labels.keys() {
            let lp = key_path(&format!("{cp}.labels"), k);
            if k.is_empty() {
                problems.push(lp, "label key must not be empty");
            } else if k.to_ascii_lowercase().starts_with(RESERVED_LABEL_PREFIX) {
                problems.push_hint(
                    lp,
                    format!("label {k:?} uses the reserved prefix {RESERVED_LABEL_PREFIX:?}"),
                    "converge sets labels with this prefix itself; choose another prefix",
                );
            }
        }
        if let Some(n) = &c.network {
            if !is_name(n) {
                problems.push(
                    format!("{cp}.network"),
                    format!("invalid network name {n:?}"),
                );
            }
        }
        if let Some(ip) = &c.ip {
            match ip.parse::<IpAddr>() {
                Err(_) => problems.push(format!("{cp}.ip"), format!("not an IP address: {ip:?}")),
                Ok(a) if a.is_unspecified() || a.is_loopback() || a.is_multicast() => problems
                    .push(
                        format!("{cp}.ip"),
                        format!("{a} cannot be a container address"),
                    ),
                Ok(_) if c.network.is_none() => problems.push_hint(
                    format!("{cp}.ip"),
                    "a static ip requires a network",
                    "set network to the name of a user-defined network",
                ),
                Ok(_) => {}
            }
        }
        if parse_duration(&c.stop_grace_period).is_none() {
            problems.push_hint(
                format!("{cp}.stopGracePeriod"),
                format!("invalid duration {:?}", c.stop_grace_period),
                "e.g. 500ms, 10s, 1m30s, 2h",
            );
        }
        validate_settings(c, &cp, &targets, problems);
    }
}

fn validate_port(
    port: &ContainerPort,
    pp: &str,
    published: &mut Published,
    problems: &mut Problems,
) {
    if port.container_port == 0 {
        problems.push(format!("{pp}.containerPort"), "port must be 1-65535");
    }
    let host_ip = match &port.host_ip {
        None => None,
        Some(s) => match s.parse::<IpAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                problems.push(format!("{pp}.hostIp"), format!("not an IP address: {s:?}"));
                return;
            }
        },
    };
    let Some(hp) = port.host_port else {
        if port.host_ip.is_some() {
            problems.push_hint(
                format!("{pp}.hostIp"),
                "hostIp without hostPort publishes nothing",
                "set hostPort, or remove hostIp",
            );
        }
        return;
    };
    if hp == 0 {
        problems.push(format!("{pp}.hostPort"), "port must be 1-65535");
        return;
    }
    let seen = published.entry((port.protocol, hp)).or_default();
    if let Some((_, first)) = seen.iter().find(|(ip, _)| host_ips_overlap(*ip, host_ip)) {
        problems.push_hint(
            format!("{pp}.hostPort"),
            format!(
                "host port {}/{hp} on {} is already published",
                port.protocol.as_str(),
                host_ip.map_or("all addresses".to_string(), |a| a.to_string()),
            ),
            format!("conflicts with {first}.hostPort"),
        );
    } else {
        seen.push((host_ip, pp.to_string()));
    }
}

fn validate_resources(r: &ContainerResources, rp: &str, problems: &mut Problems) {
    if let Some(c) = r.cpus {
        if !c.is_finite() || c <= 0.0 {
            problems.push(format!("{rp}.cpus"), "cpus must be a positive number");
        }
    }
    if let Some(m) = &r.memory {
        match parse_memory(m) {
            None => problems.push_hint(
                format!("{rp}.memory"),
                format!("invalid memory size {m:?}"),
                "a number with an optional unit Ki, Mi, Gi, Ti, K, M, G or T, e.g. 512Mi or 1G",
            ),
            Some(b) if b < 6 << 20 => problems.push_hint(
                format!("{rp}.memory"),
                format!("memory limit {m:?} is below the minimum of 6Mi"),
                "container runtimes refuse limits below 6Mi",
            ),
            Some(_) => {}
        }
    }
    if r.pids == Some(0) {
        problems.push_hint(
            format!("{rp}.pids"),
            "pids limit must be at least 1",
            "omit pids for no limit",
        );
    }
}

fn validate_health_check(h: &HealthCheck, hp: &str, problems: &mut Problems) {
    if h.command.first().is_none_or(String::is_empty) {
        problems.push_hint(
            format!("{hp}.command"),
            "health check command must not be empty",
            "e.g. [\"pg_isready\", \"-U\", \"postgres\"]",
        );
    }
    for (field, value, nonzero) in [
        ("interval", &h.interval, true),
        ("timeout", &h.timeout, true),
        ("startPeriod", &h.start_period, false),
    ] {
        let Some(v) = value else { continue };
        match parse_duration(v) {
            None => problems.push_hint(
                format!("{hp}.{field}"),
                format!("invalid duration {v:?}"),
                "e.g. 500ms, 10s, 1m30s, 2h",
            ),
            Some(d) if nonzero && d.is_zero() => {
                problems.push(format!("{hp}.{field}"), format!("{field} must be positive"))
            }
            Some(_) => {}
        }
    }
    if h.retries == Some(0) {
        problems.push(format!("{hp}.retries"), "retries must be at least 1");
    }
}

/// Semantic checks of the `networks` section; `path` is its JSON path (`$.networks`).
/// Returns the parsed subnets with their paths, for the cross-section overlap checks.
pub fn validate_networks(
    spec: &[Network],
    path: &str,
    problems: &mut Problems,
) -> Vec<(IpNet, String)> {
    let mut names = Unique::new("network name", path);
    let mut all: Vec<(IpNet, String)> = Vec::new();
    for (i, n) in spec.iter().enumerate() {
        let np = format!("{path}[{i}]");
        if !is_name(&n.name) {
            problems.push_hint(
                format!("{np}.name"),
                format!("invalid network name {:?}", n.name),
                "use [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 63 characters",
            );
        } else {
            names.check(&n.name, i, format!("{np}.name"), problems);
        }
        if n.subnets.is_empty() || n.subnets.len() > 2 {
            problems.push_hint(
                format!("{np}.subnets"),
                format!("{} subnets", n.subnets.len()),
                "give one IPv4 subnet and at most one IPv6 subnet",
            );
        }
        let mut families = BTreeSet::new();
        for (j, s) in n.subnets.iter().enumerate() {
            let sp = format!("{np}.subnets[{j}]");
            let Some(net) = parse_subnet(&s.subnet, &format!("{sp}.subnet"), problems) else {
                continue;
            };
            if !families.insert(matches!(net, IpNet::V6(_))) {
                problems.push_hint(
                    format!("{sp}.subnet"),
                    "a second subnet of the same address family",
                    "give one IPv4 subnet and at most one IPv6 subnet",
                );
            }
            if let Some(g) = &s.gateway {
                match g.parse::<IpAddr>() {
                    Err(_) => {
                        problems.push(format!("{sp}.gateway"), format!("not an IP address: {g:?}"))
                    }
                    Ok(a) if !net.contains(&a) || a == net.network() || a == net.broadcast() => {
                        problems.push_hint(
                            format!("{sp}.gateway"),
                            format!("{a} is not a host address of {net}"),
                            "leave it out to use the subnet's first address",
                        )
                    }
                    Ok(_) => {}
                }
            }
            if let Some((other, op)) = all.iter().find(|(o, _)| nets_overlap(o, &net)) {
                problems.push_hint(
                    format!("{sp}.subnet"),
                    format!("{net} overlaps {other}"),
                    format!("{op} already uses it; give every network its own range"),
                );
            }
            all.push((net, format!("{sp}.subnet")));
        }
    }
    all
}

/// Parses a container subnet: a CIDR with zero host bits and room for a gateway and
/// containers (at most /30 for IPv4, /126 for IPv6).
fn parse_subnet(s: &str, at: &str, problems: &mut Problems) -> Option<IpNet> {
    let Ok(net) = s.parse::<IpNet>() else {
        problems.push_hint(
            at,
            format!("not a CIDR subnet: {s:?}"),
            "e.g. 10.210.1.0/24 or fd00:210:1::/64",
        );
        return None;
    };
    if net.trunc() != net {
        problems.push_hint(
            at,
            format!("{s} has host bits set"),
            format!("the subnet is {}", net.trunc()),
        );
        return None;
    }
    if net.prefix_len() > net.max_prefix_len() - 2 {
        problems.push_hint(
            at,
            format!("{s} is too small for a gateway and containers"),
            "use at most /30 for IPv4 and /126 for IPv6",
        );
        return None;
    }
    Some(net)
}

/// Whether two networks share an address.
pub fn nets_overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn parse(v: serde_json::Value) -> ContainersSpec {
        serde_json::from_value(v).unwrap()
    }

    fn problems(spec: &ContainersSpec) -> Vec<String> {
        let mut p = Problems::default();
        validate(spec, "$.containers", &mut p);
        p.iter().map(|p| p.path.clone()).collect()
    }

    fn good() -> serde_json::Value {
        json!([
            {
                "name": "web",
                "image": "docker.io/library/nginx:1.27",
                "ports": [
                    {"containerPort": 80, "hostPort": 8080},
                    {"containerPort": 53, "hostPort": 53, "protocol": "udp", "hostIp": "10.0.0.1"}
                ],
                "volumes": [{"source": "/srv/www", "target": "/usr/share/nginx/html", "readOnly": true}],
                "env": {"TZ": "UTC"},
                "secretEnv": {"API_TOKEN": "web-api-token"},
                "labels": {"team": "a"},
                "resources": {"cpus": 0.5, "memory": "512Mi", "pids": 256},
                "healthCheck": {"command": ["curl", "-f", "http://localhost/"], "interval": "30s",
                                 "timeout": "5s", "startPeriod": "0s", "retries": 3},
                "network": "apps",
                "ip": "10.88.0.10",
                "stopGracePeriod": "1m30s"
            },
            {
                "name": "db",
                "image": "postgres@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "ports": [{"containerPort": 5432, "hostPort": 8080, "protocol": "udp"}],
                "volumes": [{"source": "pgdata", "target": "/var/lib/postgresql/data"}],
                "restart": "unless-stopped",
                "desiredState": "stopped"
            },
            {
                "name": "cache",
                "image": "registry.internal:5000/cache/redis:7.4-alpine",
                "ports": [{"containerPort": 53, "hostPort": 53, "protocol": "udp", "hostIp": "10.0.0.2"}]
            }
        ])
    }

    #[test]
    fn good_spec_passes_and_defaults_apply() {
        let s = parse(good());
        assert_eq!(problems(&s), Vec::<String>::new());
        assert_eq!(s[1].restart, RestartPolicy::UnlessStopped);
        assert_eq!(s[0].restart, RestartPolicy::Always);
        assert_eq!(s[0].desired_state, ContainerState::Running);
        assert_eq!(s[0].ports[0].protocol, Protocol::Tcp);
        assert_eq!(s[1].stop_grace_period, "10s");
        assert!(!s[1].remove_volumes_on_delete);
        assert!(s[0].volumes[0].is_bind() && !s[1].volumes[0].is_bind());
        // Round trip.
        let back: ContainersSpec =
            serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<ContainersSpec, _> =
            serde_json::from_value(json!([{"name": "a", "imagee": "x:1"}]));
        assert!(r.is_err());
    }

    #[test]
    fn names_and_images() {
        let s = parse(json!([
            {"name": "web", "image": "nginx:1.27"},
            {"name": "web", "image": "nginx:1.27"},
            {"name": "-bad", "image": "nginx:1.27"},
            {"name": "a".repeat(64), "image": "nginx:1.27"},
            {"name": "e1", "image": ""},
            {"name": "e2", "image": "nginx"},
            {"name": "e3", "image": "Nginx:1"},
            {"name": "e4", "image": "nginx@sha256:abc"},
            {"name": "e5", "image": "nginx:bad tag"},
            {"name": "e6", "image": "bad_host:99999/x:1"}
        ]));
        assert_eq!(
            problems(&s),
            vec![
                "$.containers[1].name",
                "$.containers[2].name",
                "$.containers[3].name",
                "$.containers[4].image",
                "$.containers[5].image",
                "$.containers[6].image",
                "$.containers[7].image",
                "$.containers[8].image",
                "$.containers[9].image",
            ]
        );
    }

    #[test]
    fn host_port_conflicts() {
        let s = parse(json!([
            {"name": "a", "image": "x:1", "ports": [
                {"containerPort": 80, "hostPort": 80},
                {"containerPort": 53, "hostPort": 53, "protocol": "udp", "hostIp": "10.0.0.1"},
                {"containerPort": 443, "hostPort": 443, "hostIp": "::1"}
            ]},
            {"name": "b", "image": "x:1", "ports": [
                {"containerPort": 80, "hostPort": 80, "hostIp": "10.0.0.9"},
                {"containerPort": 53, "hostPort": 53, "protocol": "udp", "hostIp": "10.0.0.2"},
                {"containerPort": 53, "hostPort": 53, "protocol": "tcp", "hostIp": "10.0.0.1"},
                {"containerPort": 5353, "hostPort": 53, "protocol": "udp", "hostIp": "0.0.0.0"},
                {"containerPort": 443, "hostPort": 443, "hostIp": "10.0.0.1"}
            ]}
        ]));
        let mut p = Problems::default();
        validate(&s, "$.containers", &mut p);
        let got: Vec<_> = p
            .iter()
            .map(|p| (p.path.as_str(), p.hint.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "$.containers[1].ports[0].hostPort",
                    Some("conflicts with $.containers[0].ports[0].hostPort")
                ),
                (
                    "$.containers[1].ports[3].hostPort",
                    Some("conflicts with $.containers[0].ports[1].hostPort")
                ),
            ]
        );
    }

    #[test]
    fn port_rules() {
        let s = parse(json!([
            {"name": "a", "image": "x:1", "ports": [
                {"containerPort": 0},
                {"containerPort": 80, "hostPort": 0},
                {"containerPort": 80, "hostIp": "10.0.0.1"},
                {"containerPort": 80, "hostPort": 81, "hostIp": "10.0.0.300"}
            ]}
        ]));
        assert_eq!(
            problems(&s),
            vec![
                "$.containers[0].ports[0].containerPort",
                "$.containers[0].ports[1].hostPort",
                "$.containers[0].ports[2].hostIp",
                "$.containers[0].ports[3].hostIp",
            ]
        );
    }

    #[test]
    fn env_volumes_labels_network() {
        let s = parse(json!([
            {"name": "a", "image": "x:1",
             "env": {"1BAD": "x", "OK": "y"},
             "secretEnv": {"OK": "tok", "TOKEN": "bad secret"},
             "volumes": [
                {"source": "./data", "target": "/data"},
                {"source": "data", "target": "relative"},
                {"source": "/srv/a", "target": "/data/"}
             ],
             "labels": {"converge.owner": "me", "Converge.x": "y", "app": "a"},
             "ip": "10.88.0.5"
            },
            {"name": "b", "image": "x:1", "network": "bad net", "ip": "nope"}
        ]));
        assert_eq!(
            problems(&s),
            vec![
                "$.containers[0].env[\"1BAD\"]",
                "$.containers[0].secretEnv.OK",
                "$.containers[0].secretEnv.TOKEN",
                "$.containers[0].volumes[0].source",
                "$.containers[0].volumes[1].target",
                "$.containers[0].volumes[2].target",
                "$.containers[0].labels[\"Converge.x\"]",
                "$.containers[0].labels[\"converge.owner\"]",
                "$.containers[0].ip",
                "$.containers[1].network",
                "$.containers[1].ip",
            ]
        );
    }

    #[test]
    fn resources_health_durations() {
        let s = parse(json!([
            {"name": "a", "image": "x:1",
             "resources": {"cpus": 0.0, "memory": "512MB", "pids": 0},
             "healthCheck": {"command": [], "interval": "0s", "timeout": "5 s",
                             "startPeriod": "1h1h", "retries": 0},
             "stopGracePeriod": "10"
            },
            {"name": "b", "image": "x:1", "resources": {"memory": "1Mi"}}
        ]));
        assert_eq!(
            problems(&s),
            vec![
                "$.containers[0].resources.cpus",
                "$.containers[0].resources.memory",
                "$.containers[0].resources.pids",
                "$.containers[0].healthCheck.command",
                "$.containers[0].healthCheck.interval",
                "$.containers[0].healthCheck.timeout",
                "$.containers[0].healthCheck.startPeriod",
                "$.containers[0].healthCheck.retries",
                "$.containers[0].stopGracePeriod",
                "$.containers[1].resources.memory",
            ]
        );
    }

    #[test]
    fn registries() {
        let spec: RegistriesSpec = serde_json::from_value(json!([
            {"server": "registry.example.com:5000", "username": "ci", "passwordSecret": "reg"},
            {"server": "[fd00::1]:5000", "username": "ci", "passwordSecret": "reg"},
            {"server": "10.0.0.5", "username": "ci", "passwordSecret": "reg"},
            {"server": "https://r.example/v2", "username": "", "passwordSecret": "bad secret"},
            {"server": "r.example:0", "username": "ci", "passwordSecret": "reg"},
            {"server": "registry.example.com:5000", "username": "ci", "passwordSecret": "reg"}
        ]))
        .unwrap();
        let mut p = Problems::default();
        validate_registries(&spec, "$.registries", &mut p);
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "$.registries[3].server",
                "$.registries[3].username",
                "$.registries[3].passwordSecret",
                "$.registries[4].server",
                "$.registries[5].server",
            ],
            "{p:?}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_duration("1h2m3s4ms"),
            Some(Duration::from_millis(3_723_004))
        );
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        for bad in [
            "", "10", "s", "1x", "-1s", "1s1m", "1m1m", "1.5s", " 1s", "1d",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512Mi"), Some(512 << 20));
        assert_eq!(parse_memory("1G"), Some(1_000_000_000));
        assert_eq!(parse_memory("1048576"), Some(1 << 20));
        for bad in ["", "Mi", "1.5G", "1GB", "-1", "1 G", "1gi"] {
            assert_eq!(parse_memory(bad), None, "{bad}");
        }
    }

    #[test]
    fn ip_overlap() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert!(host_ips_overlap(None, ip("10.0.0.1")));
        assert!(host_ips_overlap(ip("0.0.0.0"), ip("10.0.0.1")));
        assert!(!host_ips_overlap(ip("0.0.0.0"), ip("fd00::1")));
        assert!(host_ips_overlap(ip("::"), ip("fd00::1")));
        assert!(!host_ips_overlap(ip("10.0.0.2"), ip("10.0.0.1")));
    }
}
