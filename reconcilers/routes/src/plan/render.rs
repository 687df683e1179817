//! One route as Caddy JSON (route object, TLS policy, certificate), and the other way
//! round: a rendering described field by field for `converge diff` (no secrets).

use super::{cert_id, path_matcher, route_id, tls_id, OwnedRoute, Server, STREAM_CLOSE_DELAY};
use crate::spec::{placeholders, LoadBalancing, Route, TlsMode};
use converge_core::redact;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

fn header_ops(set: &BTreeMap<String, String>, remove: &[String]) -> Map<String, Value> {
    let mut ops = Map::new();
    if !set.is_empty() {
        // Shorthands as full names: Caddy's JSON knows only those.
        let s: Map<String, Value> = set
            .iter()
            .map(|(k, v)| (k.clone(), json!([placeholders::expand(v)])))
            .collect();
        ops.insert("set".into(), Value::Object(s));
    }
    if !remove.is_empty() {
        ops.insert("delete".into(), json!(remove));
    }
    ops
}

/// The Caddy objects of `route`, with its upstreams resolved to `dials` and, for
/// `tls: certificate`, the PEM certificate and key.
pub fn render_route(
    route: &Route,
    acme_email: Option<&str>,
    dials: &[String],
    pem: Option<(&str, &str)>,
    stream_close_delay: bool,
) -> OwnedRoute {
    let name = &route.name;
    let mut m = json!({ "host": route.hosts });
    if let Some(p) = path_matcher(route.path.as_deref()) {
        m["path"] = json!(p);
    }
    let mut handle = Vec::new();
    if let Some(max) = route.max_body_bytes {
        handle.push(json!({"handler": "request_body", "max_size": max}));
    }
    let rh = &route.response_headers;
    if !rh.is_empty() {
        let mut resp = header_ops(&rh.set, &rh.remove);
        // Deferred: applied to the upstream's response, so removals see its headers.
        resp.insert("deferred".into(), json!(true));
        handle.push(json!({"handler": "headers", "response": resp}));
    }
    if let Some(r) = &route.redirect {
        handle.push(json!({
            "handler": "static_response",
            "status_code": r.status,
            "headers": {"Location": [placeholders::expand(&r.to)]},
        }));
    } else {
        let mut rp = json!({
            "handler": "reverse_proxy",
            "upstreams": dials.iter().map(|d| json!({"dial": d})).collect::<Vec<_>>(),
        });
        if route.load_balancing != LoadBalancing::RoundRobin || dials.len() > 1 {
            rp["load_balancing"] =
                json!({"selection_policy": {"policy": route.load_balancing.caddy_policy()}});
        }
        if let Some(h) = &route.health_check {
            let mut active = json!({"uri": h.path, "interval": h.interval, "timeout": h.timeout});
            if let Some(s) = h.expect_status {
                active["expect_status"] = json!(s);
            }
            rp["health_checks"] = json!({ "active": active });
        }
        let q = &route.request_headers;
        if !q.is_empty() {
            rp["headers"] = json!({ "request": header_ops(&q.set, &q.remove) });
        }
        if stream_close_delay {
            // Keeps WebSockets and other streams of unchanged routes open across the
            // reload every configuration change causes (Caddy 2.7+).
            rp["stream_close_delay"] = json!(STREAM_CLOSE_DELAY);
        }
        handle.push(rp);
    }
    let r = json!({
        "@id": route_id(name),
        "match": [m],
        "handle": handle,
        "terminal": true,
    });
    let policy = match route.tls {
        TlsMode::Internal => Some(json!({
            "@id": tls_id(name),
            "subjects": route.hosts,
            "issuers": [{"module": "internal"}],
        })),
        TlsMode::Auto => acme_email.map(|e| {
            json!({
                "@id": tls_id(name),
                "subjects": route.hosts,
                "issuers": [{"module": "acme", "email": e}],
            })
        }),
        TlsMode::Off | TlsMode::Certificate => None,
    };
    let certificate = pem.map(|(c, k)| {
        json!({
            "@id": cert_id(name),
            "certificate": c,
            "key": k,
            "tags": [cert_id(name)],
        })
    });
    OwnedRoute {
        server: if route.tls == TlsMode::Off {
            Server::Http
        } else {
            Server::Https
        },
        route: r,
        policy,
        certificate,
    }
}

fn compact(v: &Value) -> String {
    v.to_string()
}

/// A rendering described field by field, for `converge diff`; the certificate shows
/// as a fingerprint only.
pub fn describe(r: &OwnedRoute) -> BTreeMap<&'static str, String> {
    let mut d = BTreeMap::new();
    let m = r.route.pointer("/match/0");
    if let Some(h) = m.and_then(|m| m.get("host")) {
        d.insert("hosts", compact(h));
    }
    if let Some(p) = m.and_then(|m| m.pointer("/path/0")) {
        d.insert("path", p.as_str().unwrap_or_default().to_string());
    }
    for h in r
        .route
        .get("handle")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match h.get("handler").and_then(Value::as_str) {
            Some("request_body") => {
                d.insert(
                    "maxBodyBytes",
                    h.get("max_size").map(compact).unwrap_or_default(),
                );
            }
            Some("headers") => {
                let mut resp = h.get("response").cloned().unwrap_or(Value::Null);
                if let Some(o) = resp.as_object_mut() {
                    o.remove("deferred");
                }
                d.insert("responseHeaders", compact(&resp));
            }
            Some("static_response") => {
                let to = h
                    .pointer("/headers/Location/0")
                    .map(compact)
                    .unwrap_or_default();
                let st = h.get("status_code").map(compact).unwrap_or_default();
                d.insert("redirect", format!("{st} {to}"));
            }
            Some("reverse_proxy") => {
                let ups: Vec<&str> = h
                    .get("upstreams")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|u| u.get("dial").and_then(Value::as_str))
                    .collect();
                d.insert("upstreams", ups.join(", "));
                if let Some(p) = h.pointer("/load_balancing/selection_policy/policy") {
                    d.insert("loadBalancing", p.as_str().unwrap_or_default().to_string());
                }
                if let Some(a) = h.pointer("/health_checks/active") {
                    d.insert("healthCheck", compact(a));
                }
                if let Some(q) = h.pointer("/headers/request") {
                    d.insert("requestHeaders", compact(q));
                }
            }
            _ => {}
        }
    }
    let tls = match (&r.server, &r.policy, &r.certificate) {
        (Server::Http, _, _) => "off".to_string(),
        (_, _, Some(c)) => format!(
            "certificate {}",
            redact(&format!(
                "{}{}",
                c.get("certificate").map(compact).unwrap_or_default(),
                c.get("key").map(compact).unwrap_or_default()
            ))
        ),
        (_, Some(p), _) => match p.pointer("/issuers/0/module").and_then(Value::as_str) {
            Some("internal") => "internal".to_string(),
            _ => format!(
                "auto ({})",
                p.pointer("/issuers/0/email")
                    .and_then(Value::as_str)
                    .unwrap_or("")
            ),
        },
        (_, None, None) => "auto".to_string(),
    };
    d.insert("tls", tls);
    d
}
