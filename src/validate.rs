//! Semantic validation: each section's own rules (in its reconciler crate) plus the
//! rules that span sections (names that must resolve, host ports that must not clash).

use crate::document::{Document, Mode, MAX_GENERATION};
use converge_core::vocab::host_ips_overlap;
use converge_core::Problems;
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::net::IpAddr;

/// Runs every semantic rule, appending all problems found.
pub fn semantic(doc: &Document, problems: &mut Problems) {
    // The schema states these too; they are checked here because a document that
    // deserialises cleanly skips the schema pass (see `document::parse`).
    if doc.generation == 0 {
        problems.push_hint(
            "$.generation",
            "generation must be at least 1",
            "the control plane numbers documents from 1",
        );
    } else if doc.generation > MAX_GENERATION {
        problems.push_hint(
            "$.generation",
            format!(
                "generation {} is larger than {MAX_GENERATION} (2^53 - 1)",
                doc.generation
            ),
            "generations must stay exact in JSON and leave room to move forward",
        );
    }
    let id = &doc.node.id;
    let id_ok = !id.is_empty()
        && id.len() <= 128
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !id_ok {
        problems.push_hint(
            "$.node.id",
            format!("invalid node id {id:?}"),
            "1-128 characters of [A-Za-z0-9._-], starting with a letter or digit",
        );
    }
    if let Some(c) = &doc.containers {
        converge_containers::validate(c, "$.containers", problems);
    }
    if let Some(r) = &doc.registries {
        converge_containers::validate_registries(r, "$.registries", problems);
    }
    if let Some(i) = &doc.images {
        converge_containers::validate_images(i, "$.images", problems);
    }
    let subnets = doc
        .networks
        .as_ref()
        .map(|n| converge_containers::validate_networks(n, "$.networks", problems))
        .unwrap_or_default();
    if let Some(w) = &doc.wireguard {
        converge_wireguard::validate(w, "$.wireguard", problems);
    }
    if let Some(f) = &doc.firewall {
        converge_firewall::validate(f, "$.firewall", problems);
    }
    if let Some(d) = &doc.dns {
        converge_dns::validate(d, "$.dns", problems);
    }
    if let Some(r) = &doc.routes {
        converge_routes::validate(r, "$.routes", problems);
    }
    if let Some(b) = &doc.backups {
        converge_backups::validate(b, "$.backups", problems);
    }
    if let Some(m) = &doc.metadata {
        converge_metadata::validate(m, "$.metadata", problems);
    }
    if let Some(a) = &doc.agent {
        converge_selfupdate::validate(a, "$.agent", problems);
    }
    cross_section(doc, problems);
    container_networks(doc, &subnets, problems);
}

/// Rules between the networks converge owns and the rest: a container's static address
/// lies inside its network, and no container subnet overlaps the mesh (the WireGuard
/// addresses and every peer's allowed IPs), or routing to it would be ambiguous.
fn container_networks(doc: &Document, subnets: &[(IpNet, String)], problems: &mut Problems) {
    let Some(networks) = &doc.networks else {
        return;
    };
    for (i, c) in doc.containers.iter().flatten().enumerate() {
        let (Some(n), Some(ip)) = (&c.network, &c.ip) else {
            continue;
        };
        let (Some(net), Ok(ip)) = (networks.iter().find(|x| &x.name == n), ip.parse::<IpAddr>())
        else {
            continue;
        };
        let want = converge_containers::plan::network_spec(net, &doc.node.id);
        match want.subnets.iter().find(|(s, _)| s.contains(&ip)) {
            None => problems.push_hint(
                format!("$.containers[{i}].ip"),
                format!("{ip} is not inside network {n}"),
                format!(
                    "its subnets: {}",
                    want.subnets
                        .iter()
                        .map(|(s, _)| s.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Some((s, gw)) if ip == *gw || ip == s.network() || ip == s.broadcast() => problems
                .push(
                    format!("$.containers[{i}].ip"),
                    format!("{ip} is the gateway, network or broadcast address of {s}"),
                ),
            Some(_) => {}
        }
    }
    let Some(wg) = &doc.wireguard else { return };
    let mesh = wg
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| (a, format!("$.wireguard.addresses[{i}]")))
        .chain(wg.peers.iter().enumerate().flat_map(|(i, p)| {
            p.allowed_ips
                .iter()
                .enumerate()
                .map(move |(j, a)| (a, format!("$.wireguard.peers[{i}].allowedIps[{j}]")))
        }));
    for (text, at) in mesh {
        let Ok(net) = text.parse::<IpNet>() else {
            continue; // reported by the wireguard section's own checks
        };
        let net = net.trunc();
        for (subnet, sp) in subnets {
            if converge_containers::nets_overlap(subnet, &net) {
                problems.push_hint(
                    sp.clone(),
                    format!("{subnet} overlaps {text} ({at})"),
                    "container subnets must lie outside the mesh addresses and every peer's allowed IPs",
                );
            }
        }
    }
}

fn cross_section(doc: &Document, problems: &mut Problems) {
    let containers: BTreeSet<&str> = doc
        .containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    let need_container = |problems: &mut Problems, path: String, name: &str| {
        if doc.containers.is_none() {
            problems.push_hint(
                path,
                format!("names container {name:?} but the document has no containers section"),
                "add the container to $.containers or name an address instead",
            );
        } else if !containers.contains(name) {
            let known: Vec<&str> = containers.iter().copied().collect();
            problems.push_hint(
                path,
                format!("names container {name:?}, which is not in $.containers"),
                format!("known containers: {}", known.join(", ")),
            );
        }
    };
    if let Some(dns) = &doc.dns {
        for (i, r) in dns.records.iter().enumerate() {
            if let Some(c) = &r.container {
                need_container(problems, format!("$.dns.records[{i}].container"), c);
            }
        }
    }
    if let Some(fw) = &doc.firewall {
        for (i, p) in fw.published_ports.iter().enumerate() {
            if let Some(c) = &p.target.container {
                need_container(
                    problems,
                    format!("$.firewall.publishedPorts[{i}].target.container"),
                    c,
                );
            }
        }
    }
    if let Some(routes) = &doc.routes {
        let peers: BTreeSet<&str> = doc
            .wireguard
            .iter()
            .flat_map(|w| w.peers.iter().map(|p| p.name.as_str()))
            .collect();
        for (i, r) in routes.routes.iter().enumerate() {
            for (j, u) in r.upstreams.iter().enumerate() {
                let up = format!("$.routes.routes[{i}].upstreams[{j}]");
                if let Some(c) = &u.container {
                    need_container(problems, format!("{up}.container"), c);
                }
                if let Some(p) = &u.peer {
                    if !peers.contains(p.as_str()) {
                        problems.push_hint(
                            format!("{up}.peer"),
                            format!(
                                "names WireGuard peer {p:?}, which is not in $.wireguard.peers"
                            ),
                            "add the peer or route to a container or address",
                        );
                    }
                }
            }
        }
        if doc.node.mode != Mode::Proxy {
            problems.push_hint(
                "$.routes",
                "routes are served only by proxy nodes, and this document is for a worker",
                "set $.node.mode to proxy or move the routes to a proxy node's document",
            );
        }
    }
    host_port_conflicts(doc, problems);
}

/// A firewall port clashes with a container's published port when protocol and port
/// match and the bind addresses overlap (absent = all, `0.0.0.0`/`::` = all of a family).
fn host_port_conflicts(doc: &Document, problems: &mut Problems) {
    let Some(fw) = &doc.firewall else { return };
    let ip = |s: &Option<String>| s.as_deref().and_then(|s| s.parse::<IpAddr>().ok());
    let container_ports: Vec<_> = doc
        .containers
        .iter()
        .flatten()
        .enumerate()
        .flat_map(|(ci, c)| c.ports.iter().enumerate().map(move |(pi, p)| (ci, pi, p)))
        .filter_map(|(ci, pi, p)| {
            Some((
                p.protocol,
                p.host_port?,
                ip(&p.host_ip),
                format!("$.containers[{ci}].ports[{pi}].hostPort"),
            ))
        })
        .collect();
    for (i, p) in fw.published_ports.iter().enumerate() {
        let clash = container_ports.iter().find(|(proto, port, addr, _)| {
            *proto == p.protocol && *port == p.host_port && host_ips_overlap(*addr, ip(&p.host_ip))
        });
        if let Some((_, _, _, other)) = clash {
            problems.push_hint(
                format!("$.firewall.publishedPorts[{i}].hostPort"),
                format!(
                    "host port {}/{} is already published by {other}",
                    p.host_port,
                    p.protocol.as_str()
                ),
                "publish each host port once, either on the container or in the firewall",
            );
        }
    }
}
