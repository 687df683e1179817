//! The `routes` section of the document: the HTTP(S) reverse-proxy routes a `--proxy`
//! node serves through the Caddy converge runs, and their semantic validation. The
//! reconciler itself (rendering and reloading Caddy's config) lands in a later issue.

use converge_core::problems::is_dns_name;
use converge_core::vocab::{is_name, key_path, Unique};
use converge_core::Problems;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Reverse-proxy routes (proxy nodes only). Present: exactly these routes are served.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RoutesSpec {
    /// The routes. A request goes to the route with its host and the longest matching
    /// path prefix.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Contact address given to the ACME CA for `tls: auto` certificates (expiry notices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme_email: Option<String>,
}

/// One route: requests for `hosts` (and `path`) proxied to one upstream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Route {
    /// Route name, unique in the section (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 63
    /// characters); shown in status and logs.
    pub name: String,
    /// Host names served, e.g. `app.example.com`; a leading `*.` matches one label.
    pub hosts: Vec<String>,
    /// Path prefix, starting with `/`, e.g. `/api/`; absent: every path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Where requests go: exactly one of `container`, `peer` and `address`.
    pub upstream: RouteUpstream,
    /// Upstream port; required with `container` or `peer`, not allowed with `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// How the route's certificate is obtained.
    #[serde(default)]
    pub tls: TlsMode,
    /// Headers set on the request forwarded to the upstream, name to value (replacing
    /// any the client sent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// The upstream of a route: exactly one of the three.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteUpstream {
    /// Name of a container of the containers section (on this node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Name of a wireguard peer; requests go to the first address of its `allowedIps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// A fixed `host:port` or `[ipv6]:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// Certificate source of a route.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Public certificate from an ACME CA (Let's Encrypt); HTTP is redirected to HTTPS.
    #[default]
    Auto,
    /// Certificate from Caddy's local CA (for internal names).
    Internal,
    /// Plain HTTP only.
    Off,
}

/// Whether `name` is an HTTP header field name (an RFC 9110 token).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Headers converge manages itself; setting them would break proxying.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
];

/// Parses an upstream address `host:port` or `[ipv6]:port` into (host, port).
pub fn parse_address(s: &str) -> Option<(String, u16)> {
    let (host, port, bracketed) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (h, p, true)
    } else {
        let (h, p) = s.rsplit_once(':')?;
        (h, p, false)
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let ok = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => bracketed,
        Ok(IpAddr::V4(_)) => !bracketed,
        Err(_) => !bracketed && is_dns_name(host, false) && !host.starts_with('*'),
    };
    ok.then(|| (host.to_string(), port))
}

/// The normalized path prefix of a route (`/` when absent).
pub fn normalized_path(path: Option<&str>) -> &str {
    match path.map(|p| p.trim_end_matches('/')) {
        None | Some("") => "/",
        Some(p) => p,
    }
}

/// Semantic checks of the section; `path` is its JSON path (`$.routes`).
pub fn validate(spec: &RoutesSpec, path: &str, problems: &mut Problems) {
    let mut names = Unique::new("route name", format!("{path}.routes"));
    let mut host_paths: BTreeMap<(String, String), String> = BTreeMap::new();
    for (i, r) in spec.routes.iter().enumerate() {
        let rp = format!("{path}.routes[{i}]");
        if !is_name(&r.name) {
            problems.push_hint(
                format!("{rp}.name"),
                format!("invalid route name {:?}", r.name),
                "use [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 63 characters",
            );
        } else {
            names.check(&r.name, i, format!("{rp}.name"), problems);
        }
        let path_ok = match &r.path {
            Some(p) if !p.starts_with('/') => {
                problems.push_hint(
                    format!("{rp}.path"),
                    format!("path {p:?} does not start with /"),
                    format!("e.g. /{p}"),
                );
                false
            }
            Some(p)
                if p.contains(|c: char| {
                    c.is_whitespace() || c.is_control() || "*?#".contains(c)
                }) =>
            {
                problems.push_hint(
                    format!("{rp}.path"),
                    format!("path {p:?} contains whitespace, *, ? or #"),
                    "a plain path prefix such as /api/",
                );
                false
            }
            _ => true,
        };
        if r.hosts.is_empty() {
            problems.push(format!("{rp}.hosts"), "at least one host is required");
        }
        for (j, h) in r.hosts.iter().enumerate() {
            let hp = format!("{rp}.hosts[{j}]");
            let bare = h.strip_prefix("*.").unwrap_or(h);
            if !is_dns_name(bare, false) || bare.contains('*') || h.ends_with('.') {
                problems.push_hint(
                    hp,
                    format!("not a valid host name: {h:?}"),
                    "e.g. app.example.com or *.apps.example.com",
                );
                continue;
            }
            if h.starts_with("*.") && r.tls == TlsMode::Auto {
                problems.push_hint(
                    hp.clone(),
                    format!("wildcard host {h:?} cannot get a certificate with tls auto"),
                    "ACME wildcard certificates need a DNS challenge; use tls internal or list the hosts",
                );
            }
            if path_ok {
                let key = (
                    h.to_ascii_lowercase(),
                    normalized_path(r.path.as_deref()).to_string(),
                );
                if let Some(first) = host_paths.get(&key) {
                    problems.push_hint(
                        hp,
                        format!("host {h:?} with path {:?} is already routed", key.1),
                        format!("by {first}"),
                    );
                } else {
                    host_paths.insert(key, hp);
                }
            }
        }
        let up = format!("{rp}.upstream");
        let u = &r.upstream;
        let kinds = [u.container.is_some(), u.peer.is_some(), u.address.is_some()]
            .iter()
            .filter(|k| **k)
            .count();
        if kinds != 1 {
            problems.push_hint(
                up.clone(),
                if kinds == 0 {
                    "upstream has none of container, peer and address"
                } else {
                    "upstream has more than one of container, peer and address"
                },
                "set exactly one of them",
            );
        }
        if let Some(c) = &u.container {
            if !is_name(c) {
                problems.push(
                    format!("{up}.container"),
                    format!("invalid container name {c:?}"),
                );
            }
        }
        if let Some(p) = &u.peer {
            if !is_name(p) {
                problems.push(format!("{up}.peer"), format!("invalid peer name {p:?}"));
            }
        }
        if let Some(a) = &u.address {
            if parse_address(a).is_none() {
                problems.push_hint(
                    format!("{up}.address"),
                    format!("invalid upstream address {a:?}"),
                    "host:port or [ipv6]:port, e.g. 10.210.0.9:8080",
                );
            }
            if r.port.is_some() && kinds == 1 {
                problems.push_hint(
                    format!("{rp}.port"),
                    "port is not allowed with upstream.address",
                    "put the port in the address (host:port)",
                );
            }
        } else if kinds == 1 && r.port.is_none() {
            problems.push_hint(
                format!("{rp}.port"),
                "port is required with upstream.container and upstream.peer",
                "the port the upstream listens on, e.g. 8080",
            );
        }
        if r.port == Some(0) {
            problems.push(format!("{rp}.port"), "port must be 1-65535");
        }
        for (k, v) in &r.headers {
            let hp = key_path(&format!("{rp}.headers"), k);
            if !is_header_name(k) {
                problems.push(hp, format!("invalid header name {k:?}"));
            } else if RESERVED_HEADERS.contains(&k.to_ascii_lowercase().as_str()) {
                problems.push_hint(
                    hp,
                    format!("header {k:?} is managed by the proxy"),
                    "remove it",
                );
            } else if v.contains(['\r', '\n', '\0']) {
                problems.push(hp, "header value must not contain CR, LF or NUL");
            }
        }
    }
    if let Some(e) = &spec.acme_email {
        let ok = e.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !local.contains(|c: char| c.is_whitespace() || c == '@')
                && domain.contains('.')
                && is_dns_name(domain, false)
        });
        if !ok {
            problems.push(
                format!("{path}.acmeEmail"),
                format!("not an email address: {e:?}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> RoutesSpec {
        serde_json::from_value(v).unwrap()
    }

    fn problems(spec: &RoutesSpec) -> Vec<String> {
        let mut p = Problems::default();
        validate(spec, "$.routes", &mut p);
        p.iter().map(|p| p.path.clone()).collect()
    }

    #[test]
    fn good_spec_passes() {
        let s = spec(json!({
            "acmeEmail": "ops@example.com",
            "routes": [
                {"name": "web", "hosts": ["example.com", "www.example.com"],
                 "upstream": {"container": "web"}, "port": 8080},
                {"name": "api", "hosts": ["example.com"], "path": "/api/",
                 "upstream": {"peer": "worker-fra1-07"}, "port": 8081,
                 "headers": {"X-Forwarded-Prefix": "/api"}},
                {"name": "apps", "hosts": ["*.apps.internal"], "tls": "internal",
                 "upstream": {"address": "[fd00:210::9]:8080"}},
                {"name": "legacy", "hosts": ["legacy.example.com"], "tls": "off",
                 "upstream": {"address": "legacy.internal:80"}}
            ]
        }));
        assert_eq!(problems(&s), Vec::<String>::new());
        assert_eq!(s.routes[0].tls, TlsMode::Auto);
        let back: RoutesSpec = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn route_rules() {
        let s = spec(json!({
            "acmeEmail": "not-an-email",
            "routes": [
                {"name": "web", "hosts": ["example.com"], "path": "/", "upstream": {"container": "web"}, "port": 80},
                {"name": "web", "hosts": ["EXAMPLE.com", "bad_host.com", "*.wild.example.com"],
                 "upstream": {"container": "web", "peer": "p"}, "port": 80},
                {"name": "x", "hosts": [], "path": "api", "upstream": {}},
                {"name": "y", "hosts": ["y.example.com"], "upstream": {"address": "y.internal"}, "port": 0},
                {"name": "z", "hosts": ["z.example.com"], "upstream": {"peer": "hub"},
                 "headers": {"Host": "x", "Bad Header": "y", "X-Ok": "a\nb"}}
            ]
        }));
        assert_eq!(
            problems(&s),
            vec![
                "$.routes.routes[1].name",
                "$.routes.routes[1].hosts[0]",
                "$.routes.routes[1].hosts[1]",
                "$.routes.routes[1].hosts[2]",
                "$.routes.routes[1].upstream",
                "$.routes.routes[2].path",
                "$.routes.routes[2].hosts",
                "$.routes.routes[2].upstream",
                "$.routes.routes[3].upstream.address",
                "$.routes.routes[3].port",
                "$.routes.routes[3].port",
                "$.routes.routes[4].port",
                "$.routes.routes[4].headers[\"Bad Header\"]",
                "$.routes.routes[4].headers.Host",
                "$.routes.routes[4].headers[\"X-Ok\"]",
                "$.routes.acmeEmail",
            ]
        );
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_address("10.0.0.1:80"), Some(("10.0.0.1".into(), 80)));
        assert_eq!(parse_address("[fd00::1]:80"), Some(("fd00::1".into(), 80)));
        for bad in [
            "fd00::1:80",
            "[10.0.0.1]:80",
            "host",
            "host:0",
            "*.x:80",
            "[fd00::1]80",
        ] {
            assert_eq!(parse_address(bad), None, "{bad}");
        }
    }
}
