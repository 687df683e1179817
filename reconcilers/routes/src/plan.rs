//! Pure planning for the routes reconciler: each route is rendered as the Caddy JSON
//! objects converge owns (tagged `@id`), those are spliced into the configuration Caddy
//! reported, and the result is compared with it: at most one configuration change per
//! pass, none when they are equal.

use crate::spec::{normalized_path, parse_address, Route, RoutesInput, TlsMode, Upstream};
use converge_core::{redact, Change, Facts, FieldChange, Op, Plan, Waiting};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

mod render;
pub use render::{describe, render_route};

/// The server converge owns for routes with TLS (`auto`, `internal`, `certificate`).
pub const HTTPS_SERVER: &str = "converge-https";
/// The server converge owns for `tls: off` routes; Caddy appends its HTTP→HTTPS
/// redirects for the HTTPS routes to it.
pub const HTTP_SERVER: &str = "converge-http";
const ROUTE_ID: &str = "converge-route-";
const TLS_ID: &str = "converge-tls-";
const CERT_ID: &str = "converge-cert-";

/// How long a streaming connection (WebSocket, SSE, any hijacked connection) on the old
/// configuration may live after a reload (Caddy 2.7+); without it Caddy closes them all
/// on every reload.
pub const STREAM_CLOSE_DELAY: &str = "1h";

/// Where a route lives: which of converge's servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Https,
    Http,
}

/// The objects one route owns in Caddy's configuration.
#[derive(Clone, PartialEq)]
pub struct OwnedRoute {
    pub server: Server,
    /// The route object (`@id: converge-route-<name>`).
    pub route: Value,
    /// Its TLS automation policy (`@id: converge-tls-<name>`), if it needs one.
    pub policy: Option<Value>,
    /// Its `load_pem` certificate (`@id: converge-cert-<name>`); holds the private key.
    pub certificate: Option<Value>,
}

impl fmt::Debug for OwnedRoute {
    // The certificate entry holds a private key: never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedRoute")
            .field("server", &self.server)
            .field("id", &self.route.get("@id"))
            .finish_non_exhaustive()
    }
}

/// A secret's content, read from `--secrets-dir`; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

/// How converge reaches Caddy.
#[derive(Clone, Debug, PartialEq)]
pub enum Process {
    /// converge runs Caddy, a pair of instances (see `driver/pair.rs`): these `caddy
    /// run` processes are theirs (normally two; none when Caddy is not running),
    /// `missing` when one instance has no process. `bootstrap` is the configuration a
    /// fresh start has (the admin endpoint only).
    Managed {
        pids: Vec<u32>,
        missing: bool,
        bootstrap: Value,
    },
    /// Caddy is run by someone else (a systemd unit); converge only talks to its socket.
    External,
}

/// Caddy's configuration as read from the admin API.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The `ETag` of `GET /config/`, sent back as `If-Match`.
    pub etag: Option<String>,
    pub value: Value,
    /// Managed pair: the standby instance's configuration (as the plan sees it); its
    /// converge-owned objects must be the desired ones too. `None` for an external Caddy.
    pub standby: Option<Value>,
    /// Whether the public ports are redirected to the instance `value` was read from
    /// (always for an external Caddy).
    pub redirected: bool,
}

/// Every address Caddy's configuration dials (`"dial": "ip:port"` anywhere in it): the
/// upstreams this proxy sends traffic to right now (facts `in_use`).
pub fn dialed(config: &Value) -> std::collections::BTreeSet<std::net::IpAddr> {
    let mut out = std::collections::BTreeSet::new();
    let mut stack = vec![config];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                if let Some(addr) = m
                    .get("dial")
                    .and_then(Value::as_str)
                    .and_then(|d| d.parse::<std::net::SocketAddr>().ok())
                {
                    out.insert(addr.ip());
                }
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    out
}

/// One upstream as Caddy's `/reverse_proxy/upstreams` reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct UpstreamStatus {
    pub address: String,
    #[serde(default)]
    pub num_requests: i64,
    #[serde(default)]
    pub fails: i64,
}

/// What observe read.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub process: Process,
    /// `None`: the admin API did not answer (Caddy not running, or its admin endpoint
    /// gone after a configuration wipe on Caddy < 2.10).
    pub config: Option<Config>,
    /// Secrets the routes name, by secret name; a missing file is absent.
    pub secrets: BTreeMap<String, Secret>,
    pub upstreams: Vec<UpstreamStatus>,
    /// Whether this Caddy has `stream_close_delay` (2.7+).
    pub stream_close_delay: bool,
    /// How long a load must still wait (the minimum reload interval); `None`: now.
    pub load_hold: Option<Duration>,
}

/// One configuration change: the whole configuration is replaced by `config`, guarded
/// by `etag`. `base`, `current` and `desired` let apply narrow a refused change down to
/// the routes Caddy refuses.
#[derive(Clone, PartialEq)]
pub struct Load {
    pub base: Value,
    pub etag: Option<String>,
    /// converge's routes in force now.
    pub current: BTreeMap<String, OwnedRoute>,
    /// converge's routes wanted.
    pub desired: BTreeMap<String, OwnedRoute>,
    /// Routes whose objects differ between `current` and `desired`.
    pub changed: Vec<String>,
    pub config: Value,
}

/// One driver operation.
#[derive(Clone, PartialEq)]
pub enum Action {
    /// Start Caddy, stopping the `stop` processes first (managed mode only).
    Start { stop: Vec<u32> },
    /// Send the public ports to the serving instance again (its redirect was flushed
    /// or edited); no Caddy reload, never held by the reload interval.
    Redirect,
    /// The pass's one configuration change.
    Load(Box<Load>),
}

impl fmt::Debug for Action {
    // A load carries certificates and keys: only the route names are printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Start { stop } => write!(f, "Start {{ stop: {stop:?} }}"),
            Action::Redirect => f.write_str("Redirect"),
            Action::Load(l) => write!(f, "Load {{ changed: {:?} }}", l.changed),
        }
    }
}

pub fn route_id(name: &str) -> String {
    format!("{ROUTE_ID}{name}")
}

pub fn tls_id(name: &str) -> String {
    format!("{TLS_ID}{name}")
}

pub fn cert_id(name: &str) -> String {
    format!("{CERT_ID}{name}")
}

fn id_of(v: &Value) -> Option<&str> {
    v.get("@id").and_then(Value::as_str)
}

fn pointer_array<'a>(v: &'a Value, path: &str) -> impl Iterator<Item = &'a Value> {
    v.pointer(path)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// converge's routes as found in a configuration, by route name.
pub fn extract(config: &Value) -> BTreeMap<String, OwnedRoute> {
    let mut out = BTreeMap::new();
    for (server, key) in [(Server::Https, HTTPS_SERVER), (Server::Http, HTTP_SERVER)] {
        for r in pointer_array(config, &format!("/apps/http/servers/{key}/routes")) {
            if let Some(name) = id_of(r).and_then(|id| id.strip_prefix(ROUTE_ID)) {
                out.insert(
                    name.to_string(),
                    OwnedRoute {
                        server,
                        route: r.clone(),
                        policy: None,
                        certificate: None,
                    },
                );
            }
        }
    }
    for p in pointer_array(config, "/apps/tls/automation/policies") {
        if let Some(name) = id_of(p).and_then(|id| id.strip_prefix(TLS_ID)) {
            if let Some(o) = out.get_mut(name) {
                o.policy = Some(p.clone());
            }
        }
    }
    for c in pointer_array(config, "/apps/tls/certificates/load_pem") {
        if let Some(name) = id_of(c).and_then(|id| id.strip_prefix(CERT_ID)) {
            if let Some(o) = out.get_mut(name) {
                o.certificate = Some(c.clone());
            }
        }
    }
    out
}

fn is_ours(v: &Value, prefix: &str) -> bool {
    id_of(v).is_some_and(|id| id.starts_with(prefix))
}

/// Object at `path` (created as an empty object when missing or not an object).
fn object_at<'a>(v: &'a mut Value, path: &[&str]) -> &'a mut Map<String, Value> {
    let mut cur = v;
    for key in path {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Value::Object(map) = cur else {
            unreachable!("made an object above")
        };
        cur = map
            .entry(key.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !cur.is_object() {
        *cur = Value::Object(Map::new());
    }
    match cur {
        Value::Object(map) => map,
        _ => unreachable!("made an object above"),
    }
}

/// Order in which Caddy tries routes: longer path prefixes first, then routes with
/// exact hosts before wildcard-only ones, then by name (stable).
fn order_key(name: &str, r: &OwnedRoute) -> (std::cmp::Reverse<usize>, bool, String) {
    let m = r.route.pointer("/match/0");
    let path_len = m
        .and_then(|m| m.pointer("/path/0"))
        .and_then(Value::as_str)
        .map_or(0, |p| p.trim_end_matches('*').len());
    let wildcard_only = m
        .and_then(|m| m.get("host"))
        .and_then(Value::as_array)
        .is_some_and(|h| {
            h.iter()
                .all(|h| h.as_str().is_some_and(|h| h.starts_with("*.")))
        });
    (std::cmp::Reverse(path_len), wildcard_only, name.to_string())
}

/// `base` with every converge-owned object replaced by `routes`' objects; everything
/// else is left as it was.
pub fn splice(base: &Value, routes: &BTreeMap<String, OwnedRoute>) -> Value {
    let mut v = base.clone();
    // Strip what is ours (only where it exists: no empty containers are created).
    if let Some(servers) = v
        .pointer_mut("/apps/http/servers")
        .and_then(Value::as_object_mut)
    {
        servers.remove(HTTPS_SERVER);
        servers.remove(HTTP_SERVER);
    }
    if let Some(p) = v
        .pointer_mut("/apps/tls/automation/policies")
        .and_then(Value::as_array_mut)
    {
        p.retain(|p| !is_ours(p, TLS_ID));
    }
    if let Some(c) = v
        .pointer_mut("/apps/tls/certificates/load_pem")
        .and_then(Value::as_array_mut)
    {
        c.retain(|c| !is_ours(c, CERT_ID));
    }
    // Insert ours.
    let mut ordered: Vec<(&String, &OwnedRoute)> = routes.iter().collect();
    ordered.sort_by_cached_key(|(n, r)| order_key(n, r));
    for (server, key, listen) in [
        (Server::Https, HTTPS_SERVER, ":443"),
        (Server::Http, HTTP_SERVER, ":80"),
    ] {
        let rs: Vec<&OwnedRoute> = ordered
            .iter()
            .filter(|(_, r)| r.server == server)
            .map(|(_, r)| *r)
            .collect();
        if rs.is_empty() {
            continue;
        }
        let mut srv = json!({
            "@id": format!("{key}-server"),
            "listen": [listen],
            "routes": rs.iter().map(|r| r.route.clone()).collect::<Vec<_>>(),
        });
        // Hosts with a certificate from secrets: Caddy must not also try ACME for them.
        let skip: BTreeSet<&str> = rs
            .iter()
            .filter(|r| r.certificate.is_some())
            .flat_map(|r| pointer_array(&r.route, "/match/0/host"))
            .filter_map(Value::as_str)
            .collect();
        if !skip.is_empty() {
            srv["automatic_https"] = json!({ "skip_certificates": skip });
        }
        object_at(&mut v, &["apps", "http", "servers"]).insert(key.to_string(), srv);
    }
    let internal = ordered.iter().any(|(_, r)| {
        r.policy
            .as_ref()
            .and_then(|p| p.pointer("/issuers/0/module"))
            .is_some_and(|m| m == "internal")
    });
    if internal {
        // Caddy would otherwise install its local CA into the host's trust store on
        // every load; a proxy's clients get the root from <data-dir>/caddy instead.
        // Only set when nobody configured it (a foreign setting is kept).
        object_at(&mut v, &["apps", "pki", "certificate_authorities", "local"])
            .entry("install_trust")
            .or_insert(Value::Bool(false));
    }
    let policies: Vec<Value> = ordered
        .iter()
        .filter_map(|(_, r)| r.policy.clone())
        .collect();
    if !policies.is_empty() {
        let automation = object_at(&mut v, &["apps", "tls", "automation"]);
        let list = automation
            .entry("policies")
            .or_insert_with(|| Value::Array(Vec::new()));
        if !list.is_array() {
            *list = Value::Array(Vec::new());
        }
        if let Value::Array(list) = list {
            // Ours first: Caddy uses the first policy whose subjects match, and a
            // foreign catch-all policy (no subjects) would otherwise shadow ours.
            let foreign = std::mem::take(list);
            list.extend(policies);
            list.extend(foreign);
        }
    }
    let certs: Vec<Value> = ordered
        .iter()
        .filter_map(|(_, r)| r.certificate.clone())
        .collect();
    if !certs.is_empty() {
        let c = object_at(&mut v, &["apps", "tls", "certificates"]);
        let list = c
            .entry("load_pem")
            .or_insert_with(|| Value::Array(Vec::new()));
        if !list.is_array() {
            *list = Value::Array(Vec::new());
        }
        if let Value::Array(list) = list {
            list.extend(certs);
        }
    }
    v
}

/// Where an upstream sends requests, or why it cannot be known yet.
fn dial(u: &Upstream, input: &RoutesInput, facts: &Facts) -> Result<String, String> {
    let with_port = |ip: IpAddr, port: Option<u16>| match ip {
        IpAddr::V4(a) => format!("{a}:{}", port.unwrap_or(0)),
        IpAddr::V6(a) => format!("[{a}]:{}", port.unwrap_or(0)),
    };
    if let Some(a) = &u.address {
        return parse_address(a)
            .map(|_| a.clone())
            .ok_or_else(|| format!("invalid address {a:?}"));
    }
    if let Some(p) = &u.peer {
        return input
            .peers
            .get(p)
            .map(|ip| with_port(*ip, u.port))
            .ok_or_else(|| format!("waiting for peer {p}'s mesh address"));
    }
    if let Some(c) = &u.container {
        return match facts.containers.get(c) {
            Some(cf) if cf.running => cf
                .addresses
                .first()
                .map(|ip| with_port(*ip, u.port))
                .ok_or_else(|| format!("waiting for container {c}'s address")),
            Some(_) => Err(format!("waiting for container {c} to run")),
            None => Err(format!("waiting for container {c}'s address")),
        };
    }
    Err("upstream has no target".to_string())
}

/// A route rendered, or the reason it must wait.
fn resolve(
    route: &Route,
    input: &RoutesInput,
    observed: &Observed,
    facts: &Facts,
) -> Result<OwnedRoute, Waiting> {
    let dials = route
        .upstreams
        .iter()
        .map(|u| dial(u, input, facts))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|why| Waiting::new("route", &route.name, why))?;
    let pem = if route.tls == TlsMode::Certificate {
        let get = |s: &Option<String>| s.as_ref().and_then(|n| observed.secrets.get(n));
        match (get(&route.certificate_secret), get(&route.key_secret)) {
            (Some(c), Some(k)) => Some((c.0.as_str(), k.0.as_str())),
            _ => {
                let missing: Vec<&str> = [&route.certificate_secret, &route.key_secret]
                    .into_iter()
                    .flatten()
                    .filter(|n| !observed.secrets.contains_key(*n))
                    .map(String::as_str)
                    .collect();
                return Err(Waiting::new(
                    "route",
                    &route.name,
                    format!("waiting for secret {}", missing.join(", ")),
                )
                .retry_after(Duration::from_secs(30)));
            }
        }
    } else {
        None
    };
    Ok(render_route(
        route,
        input.spec.acme_email.as_deref(),
        &dials,
        pem,
        observed.stream_close_delay,
    ))
}

/// The field-level difference of two renderings of one route (nothing secret: the
/// description shows fingerprints only).
fn field_changes(old: &OwnedRoute, new: &OwnedRoute) -> Vec<FieldChange> {
    let (a, b) = (describe(old), describe(new));
    let keys: BTreeSet<&&str> = a.keys().chain(b.keys()).collect();
    let mut out: Vec<FieldChange> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| FieldChange::new(*k, a.get(k).cloned(), b.get(k).cloned()))
        .collect();
    if out.is_empty() {
        out.push(FieldChange::new(
            "caddy objects",
            Some("edited outside converge".into()),
            Some("as rendered".into()),
        ));
    }
    out
}

/// Desired against observed: a Caddy start if it is not running (managed mode), and
/// one configuration change covering every changed route.
pub fn plan(input: &RoutesInput, observed: &Observed, facts: &Facts) -> Plan<Action> {
    let mut plan = Plan::default();
    let (base, etag, current) = match (&observed.config, &observed.process) {
        (Some(c), _) => (c.value.clone(), c.etag.clone(), extract(&c.value)),
        (
            None,
            Process::Managed {
                pids,
                missing,
                bootstrap,
            },
        ) => {
            let (op, state, stop) = match (pids.is_empty(), missing) {
                (true, _) => (Op::Create, "not running", vec![]),
                // Only the missing instance is started; the running one keeps serving.
                (false, true) => (Op::Update, "one instance not running", vec![]),
                (false, false) => (Op::Update, "admin API not answering", pids.clone()),
            };
            plan.changes.push(
                Change::new(op, "process", "caddy").with_field(FieldChange::new(
                    "state",
                    Some(state.into()),
                    Some("running".into()),
                )),
            );
            plan.actions.push(Action::Start { stop });
            (bootstrap.clone(), None, BTreeMap::new())
        }
        // observe fails the pass instead when an external Caddy does not answer.
        (None, Process::External) => return plan,
    };
    let mut desired = BTreeMap::new();
    for route in &input.spec.routes {
        match resolve(route, input, observed, facts) {
            Ok(r) => {
                desired.insert(route.name.clone(), r);
            }
            Err(w) => {
                // Unknown is not absent: what is in force stays until it can be rendered.
                if let Some(cur) = current.get(&route.name) {
                    desired.insert(route.name.clone(), cur.clone());
                }
                plan.waiting.push(w);
            }
        }
    }
    let mut changed = Vec::new();
    let names: BTreeSet<&String> = current.keys().chain(desired.keys()).collect();
    for name in names {
        match (current.get(name), desired.get(name)) {
            (None, Some(new)) => {
                let mut c = Change::new(Op::Create, "route", name.as_str());
                for (k, v) in describe(new) {
                    c = c.with_field(FieldChange::new(k, None, Some(v)));
                }
                plan.changes.push(c);
            }
            (Some(_), None) => plan
                .changes
                .push(Change::new(Op::Delete, "route", name.as_str())),
            (Some(old), Some(new)) if old != new => {
                let mut c = Change::new(Op::Update, "route", name.as_str());
                c.fields = field_changes(old, new);
                plan.changes.push(c);
            }
            _ => continue,
        }
        changed.push(name.clone());
    }
    let config = splice(&base, &desired);
    let started = !plan.actions.is_empty();
    // The managed pair's public ports not sent to the serving instance (a flushed
    // ruleset): put back first, at once, whatever else this pass changes.
    if observed.config.as_ref().is_some_and(|c| !c.redirected) {
        plan.changes.insert(
            0,
            Change::new(Op::Update, "redirect", "caddy").with_field(FieldChange::new(
                "tcp 443, 80",
                Some("not redirected".into()),
                Some("to the serving instance".into()),
            )),
        );
        plan.actions.push(Action::Redirect);
    }
    // The managed pair: a standby without the desired routes (a failed reload, an edit)
    // is made right by a load.
    let in_sync = observed
        .config
        .as_ref()
        .is_none_or(|c| c.standby.as_ref().is_none_or(|s| extract(s) == desired));
    if config != base || started || !in_sync {
        if changed.is_empty() && !started {
            let (field, was) = if config != base {
                ("converge-owned objects", "edited outside converge")
            } else {
                ("caddy pair", "standby routes not as the serving instance's")
            };
            plan.changes
                .push(
                    Change::new(Op::Update, "config", "caddy").with_field(FieldChange::new(
                        field,
                        Some(was.into()),
                        Some("as rendered".into()),
                    )),
                );
        }
        // A load came less than the minimum reload interval ago: hold this one and look
        // again when the interval is over, with whatever document is newest by then.
        // Each load is a Caddy reload that can cost connections in flight, so a burst
        // of documents becomes one reload per interval. A start is never held.
        if let (Some(wait), false) = (observed.load_hold, started) {
            // Only the redirect's change (if any) goes ahead: it comes first.
            let ahead = plan.actions.len();
            let held = plan.changes.len() - ahead;
            plan.changes.truncate(ahead);
            plan.waiting.push(
                Waiting::new(
                    "config",
                    "caddy",
                    format!(
                        "{held} change{} held for {} ms (at most one Caddy reload per --caddy-min-reload-ms)",
                        if held == 1 { "" } else { "s" },
                        wait.as_millis()
                    ),
                )
                .retry_after(wait)
                .in_progress(),
            );
            return plan;
        }
        plan.actions.push(Action::Load(Box::new(Load {
            base,
            etag,
            current,
            desired,
            changed,
            config,
        })));
    }
    plan
}

/// Per-route notes: each upstream's state as Caddy reports it.
pub fn notes(observed: &Observed) -> Vec<converge_core::ObjectNote> {
    let Some(c) = &observed.config else {
        return Vec::new();
    };
    let by_addr: BTreeMap<&str, &UpstreamStatus> = observed
        .upstreams
        .iter()
        .map(|u| (u.address.as_str(), u))
        .collect();
    let mut notes = Vec::new();
    for (name, r) in extract(&c.value) {
        let dials: Vec<&str> = r
            .route
            .pointer("/handle")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .flat_map(|h| pointer_array(h, "/upstreams"))
            .filter_map(|u| u.get("dial").and_then(Value::as_str))
            .collect();
        if dials.is_empty() {
            continue;
        }
        let parts: Vec<String> = dials
            .iter()
            .map(|d| match by_addr.get(d) {
                Some(u) if u.fails > 0 => {
                    format!(
                        "{d} failing ({} recent failures, {} in flight)",
                        u.fails, u.num_requests
                    )
                }
                Some(u) => format!("{d} up ({} in flight)", u.num_requests),
                None => format!("{d} unknown"),
            })
            .collect();
        notes.push(converge_core::ObjectNote {
            object: format!("route {name}"),
            note: format!("upstreams: {}", parts.join(", ")),
        });
    }
    notes
}

/// `normalized_path` as a Caddy path matcher (`/api` → `/api*`, matching `/api`,
/// `/api/` and below; `None` for every path).
pub fn path_matcher(path: Option<&str>) -> Option<Vec<String>> {
    match normalized_path(path) {
        "/" => None,
        p => Some(vec![p.to_string(), format!("{p}/*")]),
    }
}

#[cfg(test)]
mod tests;
