//! The `routes` section of the document: the HTTP(S) reverse-proxy routes a `--proxy`
//! node serves through the Caddy converge runs, and their semantic validation (header
//! values and redirect targets may use only the request placeholders of
//! [`placeholders`]).

use converge_core::problems::is_dns_name;
use converge_core::vocab::{is_name, is_secret_name, key_path, Unique};
use converge_core::Problems;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

pub mod placeholders;

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

/// What the routes reconciler is given: its section plus the WireGuard peers' mesh
/// addresses (the first address of each peer's `allowedIps`), resolved from the
/// document by the agent, since a reconciler sees only its own section.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoutesInput {
    pub spec: RoutesSpec,
    /// Peer name to the address its `peer` upstreams dial.
    pub peers: BTreeMap<String, IpAddr>,
}

/// One route: requests for `hosts` (and `path`) proxied to its upstreams, or redirected.
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
    /// Where requests go (at least one unless `redirect` is set; none with `redirect`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<Upstream>,
    /// How requests are spread over several upstreams.
    #[serde(default, skip_serializing_if = "is_default")]
    pub load_balancing: LoadBalancing,
    /// Active health check: upstreams failing it get no requests until they pass again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// How the route's certificate is obtained.
    #[serde(default)]
    pub tls: TlsMode,
    /// With `tls: certificate`: the secret holding the PEM certificate chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_secret: Option<String>,
    /// With `tls: certificate`: the secret holding the PEM private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret: Option<String>,
    /// Header changes on the request forwarded to the upstream.
    #[serde(default, skip_serializing_if = "HeaderChanges::is_empty")]
    pub request_headers: HeaderChanges,
    /// Header changes on the response sent back to the client.
    #[serde(default, skip_serializing_if = "HeaderChanges::is_empty")]
    pub response_headers: HeaderChanges,
    /// Answer every request with a redirect instead of proxying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    /// Largest request body accepted, in bytes (larger ones get 413); absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// One upstream of a route: exactly one of `container`, `peer` and `address`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Upstream {
    /// Name of a container of the containers section (on this node); its current
    /// address comes from the containers reconciler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Name of a wireguard peer: requests go to the first address of its `allowedIps`
    /// (a port that node publishes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// A fixed `host:port` or `[ipv6]:port` (a mesh address and port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Port; required with `container` or `peer`, not allowed with `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// Load-balancing policy over a route's upstreams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancing {
    /// Each upstream in turn.
    #[default]
    RoundRobin,
    /// The upstream with the fewest requests in flight.
    LeastConn,
    /// A random upstream.
    Random,
    /// The first available upstream in the list (fail-over).
    First,
    /// By the client's address (the same client keeps its upstream).
    IpHash,
}

impl LoadBalancing {
    /// Caddy's `selection_policy` name.
    pub fn caddy_policy(self) -> &'static str {
        match self {
            LoadBalancing::RoundRobin => "round_robin",
            LoadBalancing::LeastConn => "least_conn",
            LoadBalancing::Random => "random",
            LoadBalancing::First => "first",
            LoadBalancing::IpHash => "ip_hash",
        }
    }
}

/// Active health check of a route's upstreams.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    /// Path requested on each upstream, e.g. `/healthz`.
    pub path: String,
    /// Time between checks (`500ms`, `10s`, `1m`).
    #[serde(default = "default_interval")]
    pub interval: String,
    /// Time a check may take.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Status a healthy upstream answers; absent: any 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<u16>,
}

fn default_interval() -> String {
    "10s".to_string()
}

fn default_timeout() -> String {
    "5s".to_string()
}

/// Header changes: `set` replaces (or adds) headers, `remove` deletes them. Values may
/// use request placeholders such as `{http.request.host}`, `{http.request.uri}`,
/// `{http.request.remote.host}`, `{http.request.header.NAME}` or their shorthands
/// (`{host}`, `{uri}`, `{remote_host}`, `{header.NAME}`); any other placeholder, e.g.
/// `{env.*}`, `{file.*}` or `{system.*}`, is refused. A literal brace is `\{`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderChanges {
    /// Header name to value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Header names removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderChanges {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// A redirect answered by the proxy itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Redirect {
    /// Target URL, e.g. `https://www.example.com{uri}` (`{uri}` is the request's path
    /// and query); the same placeholders as header values.
    pub to: String,
    /// 301, 302, 307 or 308.
    #[serde(default = "default_redirect_status")]
    pub status: u16,
}

fn default_redirect_status() -> u16 {
    308
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
    /// The certificate and key in `certificateSecret` and `keySecret`.
    Certificate,
}

/// Whether `s` is a Go duration converge accepts: digits then `ms`, `s`, `m` or `h`,
/// not zero.
pub fn is_duration(s: &str) -> bool {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (n, unit) = s.split_at(digits);
    (1..=9).contains(&n.len())
        && n.bytes().any(|b| b != b'0')
        && ["ms", "s", "m", "h"].contains(&unit)
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
                    // Braces: Caddy's path matcher expands placeholders too.
                    c.is_whitespace() || c.is_control() || "*?#{}".contains(c)
                }) =>
            {
                problems.push_hint(
                    format!("{rp}.path"),
                    format!("path {p:?} contains whitespace, *, ?, #, {{ or }}"),
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
        validate_upstreams(r, &rp, problems);
        if let Some(h) = &r.health_check {
            let hp = format!("{rp}.healthCheck");
            if !h.path.starts_with('/')
                || h.path
                    .contains(|c: char| c.is_whitespace() || c.is_control())
            {
                problems.push_hint(
                    format!("{hp}.path"),
                    format!("invalid health check path {:?}", h.path),
                    "e.g. /healthz",
                );
            }
            for (field, v) in [("interval", &h.interval), ("timeout", &h.timeout)] {
                if !is_duration(v) {
                    problems.push_hint(
                        format!("{hp}.{field}"),
                        format!("invalid duration {v:?}"),
                        "e.g. 500ms, 10s, 1m",
                    );
                }
            }
            if let Some(st) = h.expect_status {
                if !(100..=599).contains(&st) {
                    problems.push(
                        format!("{hp}.expectStatus"),
                        format!("{st} is not an HTTP status"),
                    );
                }
            }
            if r.redirect.is_some() {
                problems.push(hp, "a redirect route has no upstreams to check");
            }
        }
        validate_tls(r, &rp, problems);
        validate_headers(
            &r.request_headers,
            &format!("{rp}.requestHeaders"),
            problems,
        );
        validate_headers(
            &r.response_headers,
            &format!("{rp}.responseHeaders"),
            problems,
        );
        if let Some(rd) = &r.redirect {
            let rdp = format!("{rp}.redirect");
            if let Some(ph) = placeholders::refused(&rd.to) {
                problems.push_hint(
                    format!("{rdp}.to"),
                    format!("placeholder {ph} is not allowed in a redirect target"),
                    placeholders::ALLOWED_HINT,
                );
            } else if !(rd.to.starts_with("https://")
                || rd.to.starts_with("http://")
                || rd.to.starts_with('/'))
                || rd
                    .to
                    .contains(|c: char| c.is_whitespace() || c.is_control())
            {
                problems.push_hint(
                    format!("{rdp}.to"),
                    format!("invalid redirect target {:?}", rd.to),
                    "an absolute URL or a path, e.g. https://www.example.com{uri}",
                );
            }
            if ![301, 302, 307, 308].contains(&rd.status) {
                problems.push_hint(
                    format!("{rdp}.status"),
                    format!("{} is not a redirect status", rd.status),
                    "301, 302, 307 or 308",
                );
            }
        }
        if r.max_body_bytes == Some(0) {
            problems.push(
                format!("{rp}.maxBodyBytes"),
                "maxBodyBytes must be at least 1",
            );
        }
    }
    if let Some(e) = &spec.acme_email {
        // No braces: Caddy expands placeholders in the ACME email too.
        let ok = e.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !local.contains(|c: char| c.is_whitespace() || "@{}".contains(c))
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

fn validate_upstreams(r: &Route, rp: &str, problems: &mut Problems) {
    if r.redirect.is_some() {
        if !r.upstreams.is_empty() {
            problems.push_hint(
                format!("{rp}.upstreams"),
                "a redirect route has no upstreams",
                "remove upstreams or redirect",
            );
        }
        return;
    }
    if r.upstreams.is_empty() {
        problems.push_hint(
            format!("{rp}.upstreams"),
            "at least one upstream is required",
            "or set redirect",
        );
    }
    for (j, u) in r.upstreams.iter().enumerate() {
        let up = format!("{rp}.upstreams[{j}]");
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
            if u.port.is_some() && kinds == 1 {
                problems.push_hint(
                    format!("{up}.port"),
                    "port is not allowed with address",
                    "put the port in the address (host:port)",
                );
            }
        } else if kinds == 1 && u.port.is_none() {
            problems.push_hint(
                format!("{up}.port"),
                "port is required with container and peer",
                "the port the upstream listens on, e.g. 8080",
            );
        }
        if u.port == Some(0) {
            problems.push(format!("{up}.port"), "port must be 1-65535");
        }
    }
}

fn validate_tls(r: &Route, rp: &str, problems: &mut Problems) {
    let is_cert = r.tls == TlsMode::Certificate;
    for (field, v) in [
        ("certificateSecret", &r.certificate_secret),
        ("keySecret", &r.key_secret),
    ] {
        match v {
            Some(name) if !is_cert => problems.push_hint(
                format!("{rp}.{field}"),
                format!("{field} {name:?} is only used with tls certificate"),
                "set tls to certificate or remove it",
            ),
            Some(name) if !is_secret_name(name) => problems.push(
                format!("{rp}.{field}"),
                format!("invalid secret name {name:?}"),
            ),
            None if is_cert => problems.push_hint(
                format!("{rp}.{field}"),
                format!("{field} is required with tls certificate"),
                "the name of a local secret holding the PEM data",
            ),
            _ => {}
        }
    }
}

fn validate_headers(h: &HeaderChanges, path: &str, problems: &mut Problems) {
    let check_name = |hp: String, k: &str, problems: &mut Problems| {
        if !is_header_name(k) {
            problems.push(hp, format!("invalid header name {k:?}"));
            false
        } else if RESERVED_HEADERS.contains(&k.to_ascii_lowercase().as_str()) {
            problems.push_hint(
                hp,
                format!("header {k:?} is managed by the proxy"),
                "remove it",
            );
            false
        } else {
            true
        }
    };
    for (k, v) in &h.set {
        let hp = key_path(&format!("{path}.set"), k);
        if !check_name(hp.clone(), k, problems) {
            continue;
        }
        if v.contains(['\r', '\n', '\0']) {
            problems.push(hp, "header value must not contain CR, LF or NUL");
        } else if let Some(ph) = placeholders::refused(v) {
            problems.push_hint(
                hp,
                format!("placeholder {ph} is not allowed in a header value"),
                placeholders::ALLOWED_HINT,
            );
        }
    }
    for (i, k) in h.remove.iter().enumerate() {
        check_name(format!("{path}.remove[{i}]"), k, problems);
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
                 "upstreams": [{"container": "web", "port": 8080}]},
                {"name": "api", "hosts": ["example.com"], "path": "/api/",
                 "upstreams": [{"peer": "worker-fra1-07", "port": 8081},
                               {"address": "10.210.0.8:8081"}],
                 "loadBalancing": "leastConn",
                 "healthCheck": {"path": "/healthz", "interval": "2s", "expectStatus": 200},
                 "requestHeaders": {"set": {"X-Forwarded-Prefix": "/api"}, "remove": ["X-Debug"]},
                 "responseHeaders": {"set": {"Strict-Transport-Security": "max-age=31536000"}},
                 "maxBodyBytes": 10485760},
                {"name": "apps", "hosts": ["*.apps.internal"], "tls": "internal",
                 "upstreams": [{"address": "[fd00:210::9]:8080"}]},
                {"name": "legacy", "hosts": ["legacy.example.com"], "tls": "off",
                 "upstreams": [{"address": "legacy.internal:80"}]},
                {"name": "own", "hosts": ["own.example.com"], "tls": "certificate",
                 "certificateSecret": "own-crt", "keySecret": "own-key",
                 "upstreams": [{"address": "10.210.0.9:80"}]},
                {"name": "old", "hosts": ["old.example.com"],
                 "redirect": {"to": "https://example.com{uri}", "status": 301}}
            ]
        }));
        assert_eq!(problems(&s), Vec::<String>::new());
        assert_eq!(s.routes[0].tls, TlsMode::Auto);
        assert_eq!(s.routes[1].health_check.as_ref().unwrap().timeout, "5s");
        let back: RoutesSpec = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn route_rules() {
        let s = spec(json!({
            "acmeEmail": "not-an-email",
            "routes": [
                {"name": "web", "hosts": ["example.com"], "path": "/", "upstreams": [{"container": "web", "port": 80}]},
                {"name": "web", "hosts": ["EXAMPLE.com", "bad_host.com", "*.wild.example.com"],
                 "upstreams": [{"container": "web", "peer": "p", "port": 80}]},
                {"name": "x", "hosts": [], "path": "api", "upstreams": []},
                {"name": "y", "hosts": ["y.example.com"], "upstreams": [{"address": "y.internal", "port": 0}]},
                {"name": "z", "hosts": ["z.example.com"], "upstreams": [{"peer": "hub"}],
                 "requestHeaders": {"set": {"Host": "x", "Bad Header": "y", "X-Ok": "a\nb"}, "remove": ["Connection"]}},
                {"name": "t", "hosts": ["t.example.com"], "tls": "certificate", "keySecret": "k/../x",
                 "upstreams": [{"address": "10.0.0.1:80"}],
                 "healthCheck": {"path": "health", "interval": "0s", "timeout": "5 s", "expectStatus": 700},
                 "maxBodyBytes": 0},
                {"name": "r", "hosts": ["r.example.com"], "certificateSecret": "c",
                 "upstreams": [{"address": "10.0.0.1:80"}],
                 "redirect": {"to": "example.com", "status": 200}}
            ]
        }));
        assert_eq!(
            problems(&s),
            vec![
                "$.routes.routes[1].name",
                "$.routes.routes[1].hosts[0]",
                "$.routes.routes[1].hosts[1]",
                "$.routes.routes[1].hosts[2]",
                "$.routes.routes[1].upstreams[0]",
                "$.routes.routes[2].path",
                "$.routes.routes[2].hosts",
                "$.routes.routes[2].upstreams",
                "$.routes.routes[3].upstreams[0].address",
                "$.routes.routes[3].upstreams[0].port",
                "$.routes.routes[3].upstreams[0].port",
                "$.routes.routes[4].upstreams[0].port",
                "$.routes.routes[4].requestHeaders.set[\"Bad Header\"]",
                "$.routes.routes[4].requestHeaders.set.Host",
                "$.routes.routes[4].requestHeaders.set[\"X-Ok\"]",
                "$.routes.routes[4].requestHeaders.remove[0]",
                "$.routes.routes[5].healthCheck.path",
                "$.routes.routes[5].healthCheck.interval",
                "$.routes.routes[5].healthCheck.timeout",
                "$.routes.routes[5].healthCheck.expectStatus",
                "$.routes.routes[5].certificateSecret",
                "$.routes.routes[5].keySecret",
                "$.routes.routes[5].maxBodyBytes",
                "$.routes.routes[6].upstreams",
                "$.routes.routes[6].certificateSecret",
                "$.routes.routes[6].redirect.to",
                "$.routes.routes[6].redirect.status",
                "$.routes.acmeEmail",
            ]
        );
    }

    #[test]
    fn routes_host_placeholders_refused_with_paths() {
        let s = spec(json!({
            "acmeEmail": "{env.USER}@example.com",
            "routes": [
                {"name": "ok", "hosts": ["ok.example.com"], "upstreams": [{"address": "10.0.0.1:80"}],
                 "requestHeaders": {"set": {"X-Real-Host": "{host}", "X-Path": "{http.request.uri.path}",
                                             "X-Id": "{header.X-Request-Id}", "X-Lit": "\\{env.HOME\\}"}},
                 "responseHeaders": {"set": {"X-Client": "{http.request.remote.host}"}}},
                {"name": "env", "hosts": ["env.example.com"], "upstreams": [{"address": "10.0.0.1:80"}],
                 "requestHeaders": {"set": {"X-Token": "{env.CONVERGE_TOKEN}"}},
                 "responseHeaders": {"set": {"X-Node": "{system.hostname}", "X-Key": "k={file./etc/converge/key}"}}},
                {"name": "redir", "hosts": ["redir.example.com"],
                 "redirect": {"to": "https://{env.HOME}.example.com{uri}"}},
                {"name": "vars", "hosts": ["vars.example.com"], "path": "/{env.X}/",
                 "redirect": {"to": "/x?{http.vars.secret}"}}
            ]
        }));
        assert_eq!(
            problems(&s),
            vec![
                "$.routes.routes[1].requestHeaders.set[\"X-Token\"]",
                "$.routes.routes[1].responseHeaders.set[\"X-Key\"]",
                "$.routes.routes[1].responseHeaders.set[\"X-Node\"]",
                "$.routes.routes[2].redirect.to",
                "$.routes.routes[3].path",
                "$.routes.routes[3].redirect.to",
                "$.routes.acmeEmail",
            ]
        );
        let mut p = Problems::default();
        validate(&s, "$.routes", &mut p);
        let text: Vec<String> = p.iter().map(|p| p.message.clone()).collect();
        assert!(
            text.iter().any(|m| m.contains("{env.CONVERGE_TOKEN}")),
            "{text:?}"
        );
    }

    #[test]
    fn durations() {
        for ok in ["1s", "500ms", "10m", "2h"] {
            assert!(is_duration(ok), "{ok}");
        }
        for bad in ["", "0s", "s", "1", "1.5s", "-1s", "1d", "1234567890s"] {
            assert!(!is_duration(bad), "{bad}");
        }
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
