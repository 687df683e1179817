//! A container on worker A reachable from node B through the WireGuard mesh, end to end
//! through two real agents: A's document owns a container network (Podman) whose subnet
//! B's peer entry for A carries in its allowed IPs, and A's firewall forwards only what
//! its `forward` rules allow into that subnet. Then A's subnet changes: converge
//! replaces the network and recreates the container on it, and B follows the new
//! address; finally the network is dropped with its container.

mod common;

use common::agent::{push_ok, reconciler, start_agent, status, wireguard_key};
use common::podman::{podman_ok, start_podman, TEST_IMAGE};
use common::sandbox::{require_tool, wait_until, TestNode};
use serde_json::{json, Value};
use std::time::Duration;

const PORT: u16 = 51820;
const RESYNC: &[&str] = &["--resync-secs", "5"];

/// A node's WireGuard interface name and public key, made before its agent runs.
fn key(node: &TestNode, letter: char) -> (String, String) {
    let iface = format!("wg-{}-n{letter}", std::process::id());
    let public = wireguard_key(node, &iface);
    (iface, public)
}

fn wireguard(iface: &str, me: u8, peer: &TestNode, peer_key: &str, peer_ips: &[&str]) -> Value {
    json!({
        "interface": iface,
        "listenPort": PORT,
        "addresses": [format!("10.77.1.{me}/24")],
        "peers": [{
            "name": peer.name(),
            "publicKey": peer_key,
            "endpoint": format!("{}:{PORT}", peer.address()),
            "allowedIps": peer_ips,
        }],
    })
}

fn envelope(node: &TestNode, generation: u64) -> Value {
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": node.name(), "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-12-01T10:00:00Z",
    })
}

/// A's document: network `apps` on `subnet` with `web` at `ip` serving on 8080 and
/// 8081; the firewall forwards only B -> web:8080 into the subnet.
fn doc_a(a: &TestNode, generation: u64, wg: Value, subnet: &str, ip: &str) -> Value {
    let mut d = envelope(a, generation);
    d["networks"] = json!([{"name": "apps", "subnets": [{"subnet": subnet}]}]);
    d["containers"] = json!([{
        "name": "web",
        "image": TEST_IMAGE,
        "command": ["sh", "-c", "mkdir -p /www && echo mesh-ok > /www/index.html && httpd -p 8081 -h /www && exec httpd -f -p 8080 -h /www"],
        "network": "apps",
        "ip": ip,
        "stopGracePeriod": "1s",
    }]);
    d["wireguard"] = wg;
    d["firewall"] = json!({
        "forward": {"policy": "drop", "allow": [
            {"from": ["10.77.1.2/32"], "to": [format!("{ip}/32")], "protocol": "tcp", "ports": [8080]}
        ]}
    });
    d
}

fn fetch(node: &TestNode, url: &str) -> Option<String> {
    let out = node.run("curl", ["-s", "-m", "2", url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until each of `names` reports `generation` converged (the last status in the
/// panic message otherwise).
fn wait_converged(node: &TestNode, names: &[&str], generation: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(node);
        let done = names.iter().all(|n| {
            let r = reconciler(&st, n);
            r["state"] == "Converged" && r["observedGeneration"] == generation
        });
        if done {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} not converged at {generation}: {st:#}",
            node.name()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const A_RECONCILERS: &[&str] = &["containers", "wireguard", "firewall"];

#[test]
fn a_container_on_worker_a_is_reachable_from_b_through_the_mesh() {
    for tool in ["wireguard-go", "wg", "curl", "podman"] {
        require_tool(tool);
    }
    let a = TestNode::new("mna");
    let b = TestNode::new("mnb");
    let svc = start_podman(&a);
    let (iface_a, key_a) = key(&a, 'a');
    let (iface_b, key_b) = key(&b, 'b');
    let runtime = [
        "--runtime",
        "podman",
        "--podman-socket",
        svc.socket.to_str().expect("utf-8 socket path"),
    ];
    let mut args_a: Vec<&str> = runtime.to_vec();
    args_a.extend(RESYNC);
    let _agent_a = start_agent(&a, &args_a);
    let _agent_b = start_agent(&b, RESYNC);

    let wg_a = wireguard(&iface_a, 1, &b, &key_b, &["10.77.1.2/32"]);
    push_ok(
        &a,
        &doc_a(&a, 1, wg_a.clone(), "10.231.1.0/24", "10.231.1.10"),
    );
    let mut doc_b = envelope(&b, 1);
    doc_b["wireguard"] = wireguard(&iface_b, 2, &a, &key_a, &["10.77.1.1/32", "10.231.1.0/24"]);
    push_ok(&b, &doc_b);
    wait_converged(&a, A_RECONCILERS, 1);
    wait_converged(&b, &["wireguard"], 1);

    // The network is converge's, with the document's subnet and gateway.
    let apps = |format: &str| {
        podman_ok(
            &a,
            &svc,
            &["network", "inspect", "apps", "--format", format],
        )
        .trim()
        .to_string()
    };
    assert_eq!(
        apps("{{range .Subnets}}{{.Subnet}} {{.Gateway}}{{end}} {{index .Labels \"converge.managed\"}}"),
        "10.231.1.0/24 10.231.1.1 true"
    );

    // B reaches web through the tunnel; A's firewall forwards 8080 only.
    wait_until(
        Duration::from_secs(20),
        "B fetches web over the mesh",
        || fetch(&b, "http://10.231.1.10:8080/").as_deref() == Some("mesh-ok\n"),
    );
    assert_eq!(
        fetch(&a, "http://10.231.1.10:8081/").as_deref(),
        Some("mesh-ok\n"),
        "8081 serves on A itself"
    );
    assert_eq!(
        fetch(&b, "http://10.231.1.10:8081/"),
        None,
        "A's forward policy drops B -> 8081"
    );

    // A's subnet changes: the network is replaced, web recreated on it; B follows.
    let wg_a2 = wireguard(&iface_a, 1, &b, &key_b, &["10.77.1.2/32"]);
    push_ok(&a, &doc_a(&a, 2, wg_a2, "10.231.2.0/24", "10.231.2.10"));
    doc_b["generation"] = json!(2);
    doc_b["wireguard"] = wireguard(&iface_b, 2, &a, &key_a, &["10.77.1.1/32", "10.231.2.0/24"]);
    push_ok(&b, &doc_b);
    wait_converged(&a, A_RECONCILERS, 2);
    wait_converged(&b, &["wireguard"], 2);
    assert_eq!(
        apps("{{range .Subnets}}{{.Subnet}}{{end}}"),
        "10.231.2.0/24"
    );
    wait_until(
        Duration::from_secs(20),
        "B fetches web at its new address",
        || fetch(&b, "http://10.231.2.10:8080/").as_deref() == Some("mesh-ok\n"),
    );

    // Dropped from the document with its container: both gone, podman's own network stays.
    let mut d3 = envelope(&a, 3);
    d3["networks"] = json!([]);
    d3["containers"] = json!([]);
    d3["wireguard"] = wg_a;
    push_ok(&a, &d3);
    wait_until(Duration::from_secs(30), "network apps removed", || {
        let r = reconciler(&status(&a), "containers");
        r["state"] == "Converged"
            && r["observedGeneration"] == 3
            && !podman_ok(&a, &svc, &["network", "ls", "--format", "{{.Name}}"])
                .lines()
                .any(|l| l == "apps")
    });
    assert!(
        podman_ok(&a, &svc, &["network", "ls", "--format", "{{.Name}}"])
            .lines()
            .any(|l| l == "podman")
    );
}
