//! The two Caddy instances converge runs (managed mode): their directories and internal
//! ports, and the translation between the configuration the plan works on (public ports
//! 443/80, one admin socket) and the one each instance loads.
//!
//! Why two: a Caddy reload stops the old HTTP servers, and Go ≥ 1.25 then drops the first
//! request of every connection accepted but not read yet (golang/go#75591), so a reload
//! of the Caddy that takes the traffic loses requests. converge therefore loads a change
//! into the standby instance, moves new connections to it (`redirect.rs`, one nf_tables
//! transaction), and reloads the old one only once the connections it accepted have been
//! read.
//!
//! Draining: each instance's converge servers begin with a route that, while the file
//! `<instance dir>/draining` exists, answers every request with `Connection: close`
//! (Caddy's `file` matcher looks at each request, so no reload is needed to switch it
//! on). Set on the old instance at a switch, it makes HTTP/1.1 keep-alive clients close
//! after their next response and HTTP/2 clients get a GOAWAY (Go's HTTP/2 server turns
//! `Connection: close` into a graceful GOAWAY), so by the time the old instance is
//! reloaded the clients that were sending have left it.

use crate::plan::{HTTPS_SERVER, HTTP_SERVER};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// One Caddy of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instance {
    A,
    B,
}

impl Instance {
    pub const BOTH: [Instance; 2] = [Instance::A, Instance::B];

    pub fn name(self) -> &'static str {
        match self {
            Instance::A => "a",
            Instance::B => "b",
        }
    }

    pub fn other(self) -> Instance {
        match self {
            Instance::A => Instance::B,
            Instance::B => Instance::A,
        }
    }

    /// Where the public HTTPS port (443) of this host is redirected when it is active.
    pub fn https_port(self) -> u16 {
        match self {
            Instance::A => 14443,
            Instance::B => 24443,
        }
    }

    /// Where the public HTTP port (80) is redirected when it is active.
    pub fn http_port(self) -> u16 {
        match self {
            Instance::A => 14080,
            Instance::B => 24080,
        }
    }

    /// The instance whose ports these are.
    pub fn by_https_port(port: u16) -> Option<Instance> {
        Self::BOTH.into_iter().find(|i| i.https_port() == port)
    }

    /// `<caddy-dir>/<a|b>`: the instance's config file, admin socket, pid file and log.
    pub fn dir(self, caddy_dir: &Path) -> PathBuf {
        caddy_dir.join(self.name())
    }
}

/// The file whose presence makes an instance answer `Connection: close` (see above).
pub fn drain_marker(caddy_dir: &Path, inst: Instance) -> PathBuf {
    inst.dir(caddy_dir).join(DRAIN_FILE)
}

const DRAIN_FILE: &str = "draining";
const DRAIN_ROUTE_ID: &str = "converge-drain";

/// The first route of an instance's converge `server`: `Connection: close` on every
/// response while the drain marker exists (non-terminal: the routes after it answer).
/// Its `@id` names the server (Caddy wants ids unique).
fn drain_route(inst_dir: &Path, server: &str) -> Value {
    json!({
        "@id": format!("{DRAIN_ROUTE_ID}-{server}"),
        "match": [{"file": {"root": inst_dir.display().to_string(), "try_files": [format!("/{DRAIN_FILE}")]}}],
        // Deferred: set when the response header is written, after the proxied
        // response's headers, so nothing downstream replaces it.
        "handle": [{"handler": "headers", "response": {"set": {"Connection": ["close"]}, "deferred": true}}],
    })
}

/// The converge servers' route lists in `v`, by server name.
fn converge_routes(v: &mut Value) -> impl Iterator<Item = (&String, &mut Vec<Value>)> {
    v.pointer_mut("/apps/http/servers")
        .and_then(Value::as_object_mut)
        .into_iter()
        .flat_map(|servers| servers.iter_mut())
        .filter(|(name, _)| name.as_str() == HTTPS_SERVER || name.as_str() == HTTP_SERVER)
        .filter_map(|(name, s)| Some((name, s.get_mut("routes")?.as_array_mut()?)))
}

/// The public ports every route is served on; the plan renders these.
pub const PUBLIC_HTTPS: &str = ":443";
pub const PUBLIC_HTTP: &str = ":80";

/// `unix/<dir>/admin.sock`: the admin endpoint of the Caddy started with `dir`.
pub fn admin_listen(dir: &Path) -> String {
    format!("unix/{}", dir.join("admin.sock").display())
}

/// The plan's configuration as `inst` loads it: public listen ports → the instance's,
/// Caddy's `http_port`/`https_port` set to them (so automatic HTTPS redirects to and
/// serves on the right servers, and redirects show no port), the canonical admin socket
/// → the instance's.
pub fn to_instance(config: &Value, caddy_dir: &Path, inst: Instance) -> Value {
    let mut v = config.clone();
    map_admin(
        &mut v,
        &admin_listen(caddy_dir),
        &admin_listen(&inst.dir(caddy_dir)),
    );
    map_listen(
        &mut v,
        &[
            (PUBLIC_HTTPS, format!(":{}", inst.https_port())),
            (PUBLIC_HTTP, format!(":{}", inst.http_port())),
        ],
    );
    if let Some(http) = v.pointer_mut("/apps/http").and_then(Value::as_object_mut) {
        http.insert("http_port".into(), inst.http_port().into());
        http.insert("https_port".into(), inst.https_port().into());
    }
    let inst_dir = inst.dir(caddy_dir);
    for (server, routes) in converge_routes(&mut v) {
        routes.insert(0, drain_route(&inst_dir, server));
    }
    v
}

/// The inverse of [`to_instance`]: what `inst` runs, as the plan sees it.
pub fn to_canonical(config: &Value, caddy_dir: &Path, inst: Instance) -> Value {
    let mut v = config.clone();
    map_admin(
        &mut v,
        &admin_listen(&inst.dir(caddy_dir)),
        &admin_listen(caddy_dir),
    );
    map_listen(
        &mut v,
        &[
            (&format!(":{}", inst.https_port()), PUBLIC_HTTPS.to_string()),
            (&format!(":{}", inst.http_port()), PUBLIC_HTTP.to_string()),
        ],
    );
    if let Some(http) = v.pointer_mut("/apps/http").and_then(Value::as_object_mut) {
        for (key, port) in [
            ("http_port", inst.http_port()),
            ("https_port", inst.https_port()),
        ] {
            if http.get(key).and_then(Value::as_u64) == Some(u64::from(port)) {
                http.remove(key);
            }
        }
    }
    for (_, routes) in converge_routes(&mut v) {
        routes.retain(|r| {
            !r.get("@id")
                .and_then(Value::as_str)
                .is_some_and(|id| id.starts_with(DRAIN_ROUTE_ID))
        });
    }
    v
}

fn map_admin(v: &mut Value, from: &str, to: &str) {
    if let Some(listen) = v.pointer_mut("/admin/listen") {
        if listen.as_str() == Some(from) {
            *listen = to.into();
        }
    }
}

fn map_listen(v: &mut Value, pairs: &[(&str, String)]) {
    let Some(servers) = v
        .pointer_mut("/apps/http/servers")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    for listen in servers
        .values_mut()
        .filter_map(|s| s.get_mut("listen").and_then(Value::as_array_mut))
        .flatten()
    {
        if let Some((_, to)) = pairs
            .iter()
            .find(|(from, _)| listen.as_str() == Some(*from))
        {
            *listen = to.as_str().into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn instance_translation_round_trips() {
        let dir = Path::new("/d/caddy");
        let canonical = json!({
            "admin": {"listen": "unix//d/caddy/admin.sock", "config": {"persist": false}},
            "apps": {"http": {"servers": {
                "converge-https": {"listen": [":443"], "routes": [{"@id": "converge-route-r"}]},
                "converge-http": {"listen": [":80"], "routes": []},
                "foreign": {"listen": ["127.0.0.1:9999"]},
            }}},
        });
        for inst in Instance::BOTH {
            let loaded = to_instance(&canonical, dir, inst);
            assert_eq!(
                loaded.pointer("/admin/listen"),
                Some(&json!(format!("unix//d/caddy/{}/admin.sock", inst.name())))
            );
            assert_eq!(
                loaded.pointer("/apps/http/servers/converge-https/listen/0"),
                Some(&json!(format!(":{}", inst.https_port())))
            );
            assert_eq!(
                loaded.pointer("/apps/http/servers/converge-http/listen/0"),
                Some(&json!(format!(":{}", inst.http_port())))
            );
            assert_eq!(
                loaded.pointer("/apps/http/https_port"),
                Some(&json!(inst.https_port()))
            );
            // Each converge server starts with the drain route, on the instance's marker.
            for server in ["converge-https", "converge-http"] {
                let first = &loaded["apps"]["http"]["servers"][server]["routes"][0];
                assert_eq!(first["@id"], format!("converge-drain-{server}"));
                assert_eq!(
                    first.pointer("/match/0/file/root"),
                    Some(&json!(format!("/d/caddy/{}", inst.name())))
                );
            }
            assert!(loaded
                .pointer("/apps/http/servers/foreign/routes")
                .is_none());
            assert_eq!(
                loaded.pointer("/apps/http/servers/foreign/listen/0"),
                Some(&json!("127.0.0.1:9999"))
            );
            assert_eq!(to_canonical(&loaded, dir, inst), canonical);
        }
        // The bootstrap configuration (no apps) gains no http app.
        let bootstrap = json!({"admin": {"listen": "unix//d/caddy/admin.sock"}});
        let loaded = to_instance(&bootstrap, dir, Instance::B);
        assert!(loaded.get("apps").is_none());
        assert_eq!(to_canonical(&loaded, dir, Instance::B), bootstrap);
        assert_eq!(Instance::by_https_port(24443), Some(Instance::B));
        assert_eq!(Instance::by_https_port(443), None);
    }
}
