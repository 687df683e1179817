//! The containers reconciler end to end through the real agent, the same scenario on
//! BOTH real daemons (Podman via its libpod API, Docker via dockerd), each in its own
//! sandbox node: create, facts hand-off to DNS, published port traffic, restart of a
//! killed container, zero-downtime replace, stop-first replace for host ports,
//! adoption across an agent restart, removal keeping volumes, foreign containers left
//! alone, and no orphans after kill -9 in the middle of a replace.

mod common;

use common::agent::{data, push_ok, reconciler, start_agent, status, wait_ready};
use common::dnsq::query;
use common::runtime::Runtime;
use common::sandbox::{require_tool, wait_until, Spawned, TestNode};
use hickory_proto::rr::RecordType;
use serde_json::{json, Value};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IMAGE: &str = "localhost/busybox:test";

/// The runtime under test: how the agent reaches it and how the test inspects it.
impl Runtime<'_> {
    /// `name state` of every container with converge.name=`name`.
    fn instances(&self, name: &str) -> Vec<(String, String)> {
        self.ok(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=converge.name={name}"),
            "--format",
            "{{.Names}} {{.State}}",
        ])
        .lines()
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(n, s)| (n.to_string(), s.to_lowercase()))
        })
        .collect()
    }

    fn running(&self, name: &str) -> usize {
        self.instances(name)
            .iter()
            .filter(|(_, s)| s.starts_with("running") || s.starts_with("up"))
            .count()
    }

    fn inspect(&self, name: &str, template: &str) -> String {
        self.ok(&["inspect", "-f", template, name])
            .trim()
            .to_string()
    }
}

fn doc(
    node: &TestNode,
    generation: u64,
    web_env: &str,
    pinned_env: &str,
    with_worker: bool,
) -> Value {
    let mut containers = vec![
        json!({"name": "web", "image": IMAGE, "command": ["httpd", "-f", "-p", "8080", "-h", "/bin"],
               "env": {"VERSION": web_env},
               "healthCheck": {"command": ["sh", "-c", "true"], "interval": "1s", "timeout": "1s", "retries": 2},
               "stopGracePeriod": "2s"}),
        json!({"name": "pinned", "image": IMAGE, "command": ["httpd", "-f", "-p", "8081", "-h", "/bin"],
               "env": {"VERSION": pinned_env}, "ports": [{"containerPort": 8081, "hostPort": 18081}],
               "stopGracePeriod": "1s"}),
    ];
    if with_worker {
        containers.push(json!({"name": "worker", "image": IMAGE, "command": ["sleep", "3600"],
                               "volumes": [{"source": "workerdata", "target": "/data"}], "stopGracePeriod": "1s"}));
    }
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": node.name(), "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-11-24T10:00:00Z",
        "containers": containers,
        "dns": {"zone": "internal", "listen": [node.address().to_string()], "ttl": 5,
                "records": [{"name": "web.internal", "type": "A", "container": "web"}]},
        // converge's nftables table beside the runtime's own port rules.
        "firewall": {"publishedPorts": [
            {"hostPort": 28080, "target": {"container": "web", "port": 8080}}
        ]}
    })
}

fn wait_converged(node: &TestNode, generation: u64, within: Duration) {
    wait_until(
        within,
        &format!("converged at generation {generation}"),
        || {
            let s = status(node);
            // The agent lists every reconciler from start (Pending); naming the
            // document's sections keeps `all` from passing on an empty list should it
            // ever stop doing so.
            s["reconcilers"].as_array().is_some_and(|rs| {
                ["containers", "dns", "firewall"]
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

fn dns_a(node: &TestNode, name: &str) -> Vec<String> {
    let sock = node.in_netns(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
    query(
        &sock,
        SocketAddr::new(node.address().into(), 53),
        name,
        RecordType::A,
        Duration::from_millis(500),
    )
    .map(|a| a.values)
    .unwrap_or_default()
}

fn sigterm(child: &mut Spawned) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.pid() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

fn scenario(rt: &Runtime) {
    let node = rt.node;
    let mut agent = start_agent(
        node,
        &rt.agent_args()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );

    // A container converge does not own must survive everything below.
    rt.ok(&["create", "--name", "admin-thing", IMAGE, "sleep", "3600"]);

    push_ok(node, &doc(node, 1, "v1", "p1", true));
    wait_converged(node, 1, Duration::from_secs(60));
    for name in ["web", "pinned", "worker"] {
        assert_eq!(rt.running(name), 1, "{name} runs once");
    }
    // Facts hand-off: DNS serves the container's current address.
    let ip = rt.ip("web");
    wait_until(
        Duration::from_secs(3),
        "web.internal = container address",
        || dns_a(node, "web.internal") == [ip.clone()],
    );
    // Published host port carries traffic.
    let body = node.run_ok("wget", ["-q", "-O", "-", "http://127.0.0.1:18081/echo"]);
    assert!(
        !body.is_empty(),
        "served /bin/echo through the published port"
    );
    // The firewall section's port reaches web by name, next to the runtime's rules.
    let via_firewall = || {
        node.run(
            "wget",
            [
                "-q",
                "-T",
                "1",
                "-O",
                "-",
                &format!("http://{}:28080/echo", node.address()),
            ],
        )
        .status
        .success()
    };
    wait_until(
        Duration::from_secs(5),
        "firewall port 28080 -> web",
        via_firewall,
    );

    // A killed container is restarted (runtime events), and it is the same container.
    let id = rt.inspect("web", "{{.Id}}");
    rt.ok(&["kill", "web"]);
    let t = Instant::now();
    wait_until(Duration::from_secs(5), "killed web restarted", || {
        rt.running("web") == 1 && rt.inspect("web", "{{.State.Status}}") == "running"
    });
    eprintln!(
        "{}: killed container running again after {:?}",
        rt.kind,
        t.elapsed()
    );
    assert_eq!(rt.inspect("web", "{{.Id}}"), id);

    // Spec change without host ports: new instance first; never zero running.
    let stop = Arc::new(AtomicBool::new(false));
    let min_running = Arc::new(AtomicUsize::new(usize::MAX));
    std::thread::scope(|s| {
        let (stop2, min2) = (stop.clone(), min_running.clone());
        s.spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                min2.fetch_min(rt.running("web"), Ordering::Relaxed);
            }
        });
        push_ok(node, &doc(node, 2, "v2", "p1", true));
        wait_converged(node, 2, Duration::from_secs(60));
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(
        min_running.load(Ordering::Relaxed),
        1,
        "web always had a running instance during the replace"
    );
    assert_eq!(rt.instances("web").len(), 1, "old instance removed");
    assert_ne!(rt.inspect("web", "{{.Id}}"), id, "replaced");
    let new_ip = rt.ip("web");
    wait_until(
        Duration::from_secs(3),
        "DNS follows the new address",
        || dns_a(node, "web.internal") == [new_ip.clone()],
    );
    wait_until(
        Duration::from_secs(5),
        "firewall port follows the new address",
        via_firewall,
    );

    // Host ports forbid two instances: stop first, then start.
    let pinned = rt.inspect("pinned", "{{.Id}}");
    push_ok(node, &doc(node, 3, "v2", "p2", true));
    wait_converged(node, 3, Duration::from_secs(60));
    assert_ne!(rt.inspect("pinned", "{{.Id}}"), pinned);
    assert_eq!(rt.instances("pinned").len(), 1);

    // Adoption: a new agent does not restart healthy containers.
    let started = rt.inspect("web", "{{.State.StartedAt}}");
    sigterm(&mut agent);
    assert_eq!(
        rt.running("web"),
        1,
        "containers keep running without the agent"
    );
    let mut agent = start_agent(
        node,
        &rt.agent_args()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    wait_ready(node, Duration::from_secs(30));
    wait_converged(node, 3, Duration::from_secs(10));
    assert_eq!(
        rt.inspect("web", "{{.State.StartedAt}}"),
        started,
        "adopted, not restarted"
    );

    // Removal: graceful stop and remove; the named volume stays.
    push_ok(node, &doc(node, 4, "v2", "p2", false));
    wait_converged(node, 4, Duration::from_secs(60));
    assert!(rt.instances("worker").is_empty());
    assert!(
        rt.ok(&["volume", "ls", "--format", "{{.Name}}"])
            .lines()
            .any(|v| v == "workerdata"),
        "volume kept"
    );

    // kill -9 of the agent in the middle of a replace leaves no orphan after a restart.
    push_ok(node, &doc(node, 5, "v3", "p2", false));
    wait_until(Duration::from_secs(30), "replacement started", || {
        rt.instances("web").len() == 2
    });
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    let _ = agent.wait();
    let _agent = start_agent(
        node,
        &rt.agent_args()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    wait_converged(node, 5, Duration::from_secs(60));
    let web = rt.instances("web");
    assert_eq!(web.len(), 1, "no orphan: {web:?}");
    assert_eq!(web[0].0, "web");

    assert!(
        rt.run(&["inspect", "admin-thing"]).status.success(),
        "foreign container untouched"
    );
    let _ = data(node);
}

#[test]
fn podman_end_to_end() {
    require_tool("podman");
    require_tool("dnsmasq");
    let node = TestNode::new("ctr-podman");
    let mut svc = common::podman::start_podman(&node);
    let rt = Runtime::podman(&node, &svc);
    scenario(&rt);

    // Adoption across a restart of the Podman service (the agent keeps running): the
    // containers live on under conmon, the agent reconnects, nothing is restarted.
    let started = rt.inspect("web", "{{.State.StartedAt}}");
    svc.restart(&node);
    // The agent's next pass after the restart (its event stream reconnects and asks
    // for one) talks to the new service.
    let back = chrono::Utc::now();
    wait_until(
        Duration::from_secs(20),
        "a containers pass after the service restart",
        || {
            reconciler(&status(&node), "containers")["lastPass"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t >= back)
        },
    );
    wait_converged(&node, 5, Duration::from_secs(10));
    assert_eq!(
        rt.inspect("web", "{{.State.StartedAt}}"),
        started,
        "adopted across a service restart, not restarted"
    );
}

#[test]
fn docker_end_to_end() {
    require_tool("dockerd");
    require_tool("dnsmasq");
    let node = TestNode::new("ctr-docker");
    let daemon = common::docker::start_docker(&node);
    let rt = Runtime::docker(&node, &daemon);
    scenario(&rt);
}
