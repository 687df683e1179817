//! Containers resolve through the node, end to end on BOTH real daemons (Podman and
//! Docker, each in its own sandbox node): a container on a network of the `networks`
//! section gets the node's dnsmasq (on the network's gateway) as its resolver and the
//! zone as its search domain, with no resolv.conf of its own; a container's `dns`
//! overrides that; with an input policy of `drop` the gateway still answers, and only it.

mod common;

use common::agent::{push_ok, start_agent, status};
use common::runtime::Runtime;
use common::sandbox::{require_tool, wait_until, TestNode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const IMAGE: &str = "localhost/busybox:test";
const SUBNET: &str = "10.231.7.0/24";
const GATEWAY: &str = "10.231.7.1";

/// Polls `cond` (a runtime exec each time, so not as fast as `wait_until`) until it
/// holds; panics naming `what` after `timeout`.
fn poll(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn doc(node: &TestNode, generation: u64, input_drop: bool) -> Value {
    let sleeper = |name: &str| {
        json!({"name": name, "image": IMAGE, "command": ["sleep", "3600"],
               "network": "apps", "stopGracePeriod": "1s"})
    };
    let mut custom = sleeper("custom");
    // Another server (the node's own address, where dnsmasq listens too), search
    // domain and option: the container's own choice wins over the node's default.
    custom["dns"] = json!({"servers": [node.address().to_string()],
                           "search": ["svc.internal"], "options": ["ndots:3"]});
    let mut d = json!({
        "apiVersion": "converge/v1",
        "node": {"id": node.name(), "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-11-24T10:00:00Z",
        "networks": [{"name": "apps", "subnets": [{"subnet": SUBNET}]}],
        "containers": [
            json!({"name": "api", "image": IMAGE, "command": ["httpd", "-f", "-p", "8080", "-h", "/bin"],
                   "network": "apps", "stopGracePeriod": "1s"}),
            sleeper("client"),
            custom,
        ],
        "dns": {"zone": "internal", "listen": [node.address().to_string()], "port": 53, "ttl": 5,
                "records": [
                    {"name": "api.internal", "type": "A", "container": "api"},
                    {"name": "web.svc.internal", "type": "A", "values": ["10.1.2.3"]}
                ]}
    });
    if input_drop {
        // Nothing admitted but what converge adds itself: the gateways' resolver.
        d["firewall"] = json!({"input": {"policy": "drop"}});
    }
    d
}

fn wait_converged(node: &TestNode, generation: u64) {
    wait_until(
        Duration::from_secs(90),
        &format!("converged at generation {generation}"),
        || {
            let s = status(node);
            s["reconcilers"].as_array().is_some_and(|rs| {
                ["containers", "dns"]
                    .iter()
                    .all(|name| rs.iter().any(|r| r["reconciler"] == *name))
                    && rs.iter().all(|r| {
                        r["observedGeneration"] == generation
                            && (r["state"] == "Converged" || r["state"] == "Unmanaged")
                    })
            })
        },
    );
}

fn scenario(rt: &Runtime) {
    let node = rt.node;
    let args = rt.agent_args();
    let _agent = start_agent(node, &args.iter().map(String::as_str).collect::<Vec<_>>());
    push_ok(node, &doc(node, 1, false));
    wait_converged(node, 1);
    let api = rt.ip("api");

    // No resolv.conf written by hand: the runtime wrote the node's resolver into it.
    let conf = rt.resolv_conf("client");
    assert!(conf.contains("search internal"), "{}: {conf}", rt.kind);
    if rt.kind == "podman" {
        assert!(conf.contains(&format!("nameserver {GATEWAY}")), "{conf}");
    } else {
        // Docker's embedded resolver (127.0.0.11) forwards to the servers given.
        let dns = rt.ok(&["inspect", "-f", "{{json .HostConfig.Dns}}", "client"]);
        assert_eq!(dns.trim(), format!("[\"{GATEWAY}\"]"));
    }
    // By its full name and through the search domain.
    poll(
        Duration::from_secs(20),
        "api.internal from inside client",
        || rt.nslookup("client", &["api.internal"]) == [api.clone()],
    );
    assert_eq!(rt.nslookup("client", &["api"]), [api.as_str()]);
    // The node's own address answers the containers too, until the input policy drops.
    let node_ip = node.address().to_string();
    assert_eq!(
        rt.nslookup("client", &["api.internal", &node_ip]),
        [api.as_str()]
    );

    // The container's own dns: its server, search domain and option.
    let conf = rt.resolv_conf("custom");
    assert!(conf.contains("search svc.internal"), "{}: {conf}", rt.kind);
    assert!(conf.contains("ndots:3"), "{}: {conf}", rt.kind);
    if rt.kind == "podman" {
        assert!(
            conf.contains(&format!("nameserver {}", node.address())),
            "{conf}"
        );
    } else {
        let dns = rt.ok(&["inspect", "-f", "{{json .HostConfig.Dns}}", "custom"]);
        assert_eq!(dns.trim(), format!("[\"{}\"]", node.address()));
    }
    poll(Duration::from_secs(10), "web via svc.internal", || {
        rt.nslookup("custom", &["web"]) == ["10.1.2.3"]
    });

    // Input policy drop: the gateway still answers (converge admits udp/tcp 53 from the
    // network to it), while the node's other address, where dnsmasq listens as well,
    // is dropped for the containers.
    push_ok(node, &doc(node, 2, true));
    wait_converged(node, 2);
    let rules = node.run_ok("nft", ["list", "set", "inet", "converge", "input4"]);
    assert!(
        rules.contains(&format!("{SUBNET} . {GATEWAY} . udp . 53")),
        "{rules}"
    );
    poll(
        Duration::from_secs(20),
        "api.internal through the gateway under input drop",
        || rt.nslookup("client", &["api.internal"]) == [api.clone()],
    );
    let dropped = rt.nslookup("client", &["api.internal", &node_ip]);
    assert!(
        dropped.is_empty(),
        "the node's address answered under input drop: {dropped:?}"
    );
}

#[test]
fn podman_containers_resolve_through_the_node() {
    require_tool("podman");
    require_tool("dnsmasq");
    require_tool("nft");
    let node = TestNode::new("cdns-podman");
    let svc = common::podman::start_podman(&node);
    let rt = Runtime::podman(&node, &svc);
    scenario(&rt);
}

#[test]
fn docker_containers_resolve_through_the_node() {
    require_tool("dockerd");
    require_tool("dnsmasq");
    require_tool("nft");
    let node = TestNode::new("cdns-docker");
    let daemon = common::docker::start_docker(&node);
    let rt = Runtime::docker(&node, &daemon);
    scenario(&rt);
}
