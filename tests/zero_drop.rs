//! Deploys that drop nothing, end to end through the real agent on Podman and kernel
//! nftables: a client on another node sends requests without pause to a port the
//! firewall reconciler forwards to a container, while the container is replaced 20
//! times (a new generation each). The new instance starts and becomes ready, the
//! firewall switches to its address (facts), and only then does the old one stop.

mod common;

use common::agent::{push_ok, reconciler, start_agent, status};
use common::podman::{podman_ok, start_podman, TEST_IMAGE};
use common::sandbox::{require_tool, wait_until, TestNode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const PORT: u16 = 18080;
const REPLACEMENTS: u64 = 20;

fn doc(node: &TestNode, generation: u64) -> Value {
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": node.name(), "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-12-01T10:00:00Z",
        "containers": [{
            "name": "web",
            "image": TEST_IMAGE,
            "command": ["sh", "-c", "mkdir -p /www && echo \"$VERSION\" > /www/index.html && exec httpd -f -p 8080 -h /www"],
            "env": {"VERSION": format!("v{generation}")},
            "stopGracePeriod": "500ms",
        }],
        "firewall": {
            "publishedPorts": [
                {"protocol": "tcp", "hostPort": PORT, "target": {"container": "web", "port": 8080}}
            ]
        }
    })
}

#[test]
fn replacing_a_container_behind_a_published_port_drops_no_request() {
    for tool in ["curl", "podman", "nft"] {
        require_tool(tool);
    }
    let node = TestNode::new("zda");
    let client = TestNode::new("zdb");
    let svc = start_podman(&node);
    let args = [
        "--runtime",
        "podman",
        "--podman-socket",
        svc.socket.to_str().expect("utf-8 socket path"),
    ];
    let _agent = start_agent(&node, &args);
    let converged = |generation: u64| {
        wait_until(
            Duration::from_secs(60),
            &format!("generation {generation} converged with one instance"),
            || {
                let st = status(&node);
                let ok = ["containers", "firewall"].iter().all(|n| {
                    let r = reconciler(&st, n);
                    r["state"] == "Converged" && r["observedGeneration"] == generation
                });
                ok && podman_ok(&node, &svc, &["ps", "-a", "--format", "{{.Names}}"])
                    .lines()
                    .count()
                    == 1
            },
        )
    };
    push_ok(&node, &doc(&node, 1));
    converged(1);

    // The client: requests one after another until told to stop; prints "ok failed".
    let url = format!("http://{}:{PORT}/", node.address());
    let stop = client.data_dir().join("stop");
    let script = format!(
        "ok=0; failed=0; while [ ! -e {stop} ]; do \
           if curl -sf -m 3 -o /dev/null {url}; then ok=$((ok+1)); else failed=$((failed+1)); fi; \
         done; echo $ok $failed",
        stop = stop.display()
    );
    wait_until(Duration::from_secs(10), "the client reaches web", || {
        client
            .run("curl", ["-sf", "-m", "2", &url])
            .status
            .success()
    });
    let loop_ = std::thread::spawn({
        let mut cmd = client.command("sh");
        cmd.args(["-c", &script]);
        move || cmd.output().expect("client loop")
    });

    let started = Instant::now();
    for generation in 2..=REPLACEMENTS + 1 {
        push_ok(&node, &doc(&node, generation));
        converged(generation);
        let body = client.run_ok("curl", ["-sf", "-m", "2", &url]);
        assert_eq!(
            body.trim(),
            format!("v{generation}"),
            "serving the new instance"
        );
    }
    let took = started.elapsed();
    std::fs::write(&stop, b"").expect("stop the client");
    let out = loop_.join().expect("client thread");
    let counts = String::from_utf8_lossy(&out.stdout).into_owned();
    let (ok, failed): (u64, u64) = counts
        .split_once(' ')
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
        .unwrap_or_else(|| panic!("client output {counts:?}"));
    eprintln!("{REPLACEMENTS} replacements in {took:?}: {ok} requests ok, {failed} failed");
    assert!(ok > 100, "the client kept sending ({ok})");
    assert_eq!(failed, 0, "requests failed during replacements");
}
