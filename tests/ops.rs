//! Day-2 operation through the real agent in a sandbox node: the Prometheus metrics
//! agree with `converge status` (generations, per-reconciler state and owned objects),
//! count a drift repair and the metadata API's answers by status; `converge events`
//! prints the journal and `--follow` streams new events; `converge reset` previews and
//! then removes what converge owns (DNS + firewall; Podman container and network +
//! wireguard-go interface).

mod common;

use common::agent::{converge, data, push_ok, reconciler, start_agent, status, wireguard_key};
use common::metrics::{scrape, series};
use common::podman::{podman_ok, start_podman, TEST_IMAGE};
use common::sandbox::{require_tool, wait_until, TestNode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::Duration;

const METRICS: &str = "127.0.0.1:9464";

fn doc(node: &TestNode, generation: u64, records: Value) -> Value {
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": node.name(), "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-11-24T10:00:00Z",
        "dns": {"zone": "internal", "listen": [node.address().to_string()], "port": 53, "ttl": 5, "records": records},
        "firewall": {
            "publishedPorts": [
                {"protocol": "tcp", "hostPort": 8080, "target": {"address": "10.251.9.2", "port": 80}}
            ],
            "input": {"policy": "accept"}
        }
    })
}

fn records(n: usize) -> Value {
    (0..n)
        .map(|i| json!({"name": format!("r{i}.internal"), "type": "A", "values": [format!("10.88.0.{}", i + 1)]}))
        .collect()
}

const METADATA: &str = "127.0.0.1:8500";

fn sha_hex(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// `GET /v1/metadata/k` from inside the node; the HTTP status.
fn metadata_get(node: &TestNode, token: Option<&str>) -> u16 {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    node.in_netns(|| {
        let mut s = TcpStream::connect(METADATA).expect("connect to metadata");
        write!(
            s,
            "GET /v1/metadata/k HTTP/1.1\r\nHost: metadata.internal\r\nConverge-Metadata: true\r\n{auth}Connection: close\r\n\r\n"
        )
        .expect("send");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        body.get(9..12)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status in {body:?}"))
    })
}

/// What status says and what the metrics say, reduced to comparable values.
fn agreement(node: &TestNode) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let st = status(node);
    let text = scrape(node, METRICS);
    let mut from_status = BTreeMap::new();
    let mut from_metrics = BTreeMap::new();
    from_status.insert("accepted".to_string(), st["generation"].to_string());
    let accepted = series(&text, "converge_accepted_generation").map(|v| v as u64);
    from_metrics.insert(
        "accepted".to_string(),
        accepted.map_or("null".into(), |g| g.to_string()),
    );
    for r in st["reconcilers"].as_array().expect("reconcilers") {
        let name = r["reconciler"].as_str().expect("name");
        let state = r["state"].as_str().expect("state");
        from_status.insert(format!("{name} state"), state.to_string());
        from_status.insert(
            format!("{name} generation"),
            r["observedGeneration"].as_u64().unwrap_or(0).to_string(),
        );
        from_status.insert(format!("{name} owned"), r["owned"].to_string());
        let lbl = format!("{{reconciler=\"{name}\"");
        let in_state = [
            "Pending",
            "Converged",
            "Progressing",
            "Degraded",
            "Unmanaged",
        ]
        .into_iter()
        .filter(|s| {
            series(
                &text,
                &format!("converge_reconciler_state{lbl},state=\"{s}\"}}"),
            ) == Some(1.0)
        })
        .collect::<Vec<_>>()
        .join("+");
        from_metrics.insert(format!("{name} state"), in_state);
        from_metrics.insert(
            format!("{name} generation"),
            series(
                &text,
                &format!("converge_reconciler_observed_generation{lbl}}}"),
            )
            .map_or("missing".into(), |g| (g as u64).to_string()),
        );
        from_metrics.insert(
            format!("{name} owned"),
            series(&text, &format!("converge_objects_owned{lbl}}}"))
                .map_or("null".into(), |n| (n as u64).to_string()),
        );
    }
    (from_status, from_metrics)
}

fn converged(node: &TestNode, generation: u64) {
    wait_until(
        Duration::from_secs(15),
        "dns and firewall converged",
        || {
            let st = status(node);
            ["dns", "firewall"].iter().all(|n| {
                let r = reconciler(&st, n);
                r["state"] == "Converged" && r["observedGeneration"] == generation
            })
        },
    );
}

#[test]
fn metrics_agree_with_status_and_count_drift_repairs() {
    require_tool("dnsmasq");
    require_tool("nft");
    let node = TestNode::new("ops-metrics");
    let _agent = start_agent(&node, &["--metrics-listen", METRICS]);
    let with_metadata = |generation, n| {
        let mut d = doc(&node, generation, records(n));
        d["metadata"] = json!({"listen": [METADATA], "projects": [{
            "id": "alpha", "tokenSha256": sha_hex("token-alpha"), "rateLimit": 100,
            "entries": {"k": 1}
        }]});
        d
    };
    push_ok(&node, &with_metadata(1, 3));
    converged(&node, 1);
    wait_until(Duration::from_secs(10), "metadata converged", || {
        reconciler(&status(&node), "metadata")["state"] == "Converged"
    });
    // Metadata API answers, counted by status.
    assert_eq!(metadata_get(&node, Some("token-alpha")), 200);
    assert_eq!(metadata_get(&node, Some("token-alpha")), 200);
    assert_eq!(metadata_get(&node, None), 401);
    let text = scrape(&node, METRICS);
    assert_eq!(
        series(
            &text,
            "converge_api_requests_total{api=\"metadata\",status=\"200\"}"
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        series(
            &text,
            "converge_api_requests_total{api=\"metadata\",status=\"401\"}"
        ),
        Some(1.0)
    );

    // Status and metrics read the same store: they agree once nothing moves.
    let mut last = None;
    wait_until(Duration::from_secs(10), "status and metrics agree", || {
        let (s, m) = agreement(&node);
        let same = s == m;
        last = Some((s, m));
        same
    });
    let (s, _) = last.expect("compared");
    assert_eq!(s["accepted"], "1");
    assert_eq!(s["dns owned"], "3", "three A records served");
    assert_eq!(s["firewall owned"], "1", "one published port");
    assert_eq!(s["metadata owned"], "1", "one project");
    assert_eq!(s["containers state"], "Unmanaged");
    let text = scrape(&node, METRICS);
    assert_eq!(series(&text, "converge_converged_generation"), Some(1.0));
    assert!(
        series(
            &text,
            "converge_pass_duration_seconds_count{reconciler=\"dns\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(text.contains("# TYPE converge_pass_duration_seconds histogram"));

    // Drift: the table deleted behind converge's back comes back, counted as a repair.
    node.run_ok("nft", ["delete", "table", "inet", "converge"]);
    wait_until(Duration::from_secs(10), "drift repair counted", || {
        scrape(&node, METRICS)
            .lines()
            .any(|l| l.starts_with("converge_drift_repairs_total{reconciler=\"firewall\""))
    });
    node.run_ok("nft", ["list", "table", "inet", "converge"]);

    // A new generation: both sides move together.
    push_ok(&node, &with_metadata(2, 5));
    converged(&node, 2);
    wait_until(Duration::from_secs(10), "agree on generation 2", || {
        let (s, m) = agreement(&node);
        s == m && s["dns owned"] == "5" && s["accepted"] == "2"
    });
}

#[test]
fn events_print_the_journal_and_follow_new_ones() {
    require_tool("dnsmasq");
    require_tool("nft");
    let node = TestNode::new("ops-events");
    let _agent = start_agent(&node, &[]);
    push_ok(&node, &doc(&node, 1, records(2)));
    converged(&node, 1);

    let out = converge(&node, &["events", "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    let created = events
        .iter()
        .find(|e| e["reconciler"] == "dns" && e["object"] == "record r1.internal A")
        .unwrap_or_else(|| panic!("no event for r1: {events:#?}"));
    assert_eq!(created["message"], "create");
    assert_eq!(created["reason"], "new document");
    assert_eq!(created["generation"], 1);
    let text = converge(&node, &["events"]);
    assert!(
        String::from_utf8_lossy(&text.stdout)
            .contains("dns        record r1.internal A: create  (new document, generation 1)"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    // --follow prints what happens after it started, and only that.
    let mut follow = node.spawn(
        node.command(common::sandbox::converge_bin())
            .arg("--data-dir")
            .arg(data(&node))
            .args(["events", "--follow", "--limit", "1", "--output", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let stdout = follow.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("newest event");
    assert!(first.contains("\"id\""), "{first}");
    push_ok(&node, &doc(&node, 2, records(3)));
    let mut seen = Vec::new();
    let found = loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l.contains("r2.internal") => break Some(l),
            Ok(l) => seen.push(l),
            Err(_) => break None,
        }
    };
    let found = found.unwrap_or_else(|| panic!("no follow event for r2; saw {seen:#?}"));
    let e: Value = serde_json::from_str(&found).expect("json");
    assert_eq!(e["generation"], 2);
    let _ = follow.kill();
}

#[test]
fn reset_previews_then_removes_what_converge_owns() {
    require_tool("dnsmasq");
    require_tool("nft");
    let node = TestNode::new("ops-reset");
    let mut agent = start_agent(&node, &[]);
    push_ok(&node, &doc(&node, 1, records(2)));
    converged(&node, 1);
    let dnsmasq = std::fs::read_to_string(data(&node).join("dns/dnsmasq.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .expect("dnsmasq pid");

    // A running agent would put everything back: refused.
    let out = converge(&node, &["reset", "--dry-run"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop it first"));

    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &agent.pid().to_string()])
        .status()
        .expect("kill");
    assert!(stopped.success());
    let _ = agent.wait();

    let out = converge(&node, &["reset", "--dry-run", "--purge-state"]);
    let preview = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    for want in [
        "nftables table inet converge".to_string(),
        format!("dnsmasq pid {dnsmasq}"),
        format!("data directory {}", data(&node).display()),
    ] {
        assert!(preview.contains(&want), "{want:?} missing from\n{preview}");
    }
    // The preview changed nothing.
    node.run_ok("nft", ["list", "table", "inet", "converge"]);
    assert!(common::sandbox::pid_alive(dnsmasq));

    let out = converge(&node, &["reset", "--purge-state"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(!node
        .run("nft", ["list", "table", "inet", "converge"])
        .status
        .success());
    wait_until(Duration::from_secs(5), "dnsmasq stopped", || {
        !common::sandbox::pid_alive(dnsmasq)
    });
    assert!(!data(&node).exists(), "data directory purged");

    let again = converge(&node, &["reset"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing converge owns"));
}

#[test]
fn reset_removes_containers_networks_and_the_wireguard_interface() {
    for tool in ["podman", "wireguard-go", "wg", "nft"] {
        require_tool(tool);
    }
    let node = TestNode::new("ops-reset2");
    let svc = start_podman(&node);
    let iface = format!("wg-{}-rs", std::process::id());
    wireguard_key(&node, &iface);
    let peer = node.run_ok("sh", ["-c", "wg genkey | wg pubkey"]);
    let socket = svc.socket.to_str().expect("utf-8 socket path").to_string();
    let runtime = ["--runtime", "podman", "--podman-socket", socket.as_str()];
    let mut agent = start_agent(&node, &runtime);
    push_ok(
        &node,
        &json!({
            "apiVersion": "converge/v1",
            "node": {"id": node.name(), "mode": "worker"},
            "generation": 1,
            "issuedAt": "2026-11-24T10:00:00Z",
            "networks": [{"name": "apps", "subnets": [{"subnet": "10.89.7.0/24"}]}],
            "containers": [{"name": "web", "image": TEST_IMAGE, "command": ["sleep", "3600"],
                            "network": "apps", "stopGracePeriod": "1s"}],
            "wireguard": {"interface": iface, "listenPort": 51820, "addresses": ["10.77.9.1/24"],
                          "peers": [{"name": "other", "publicKey": peer.trim(), "allowedIps": ["10.77.9.2/32"]}]},
            "firewall": {"input": {"policy": "accept"}}
        }),
    );
    wait_until(Duration::from_secs(60), "converged", || {
        let st = status(&node);
        ["containers", "wireguard", "firewall"]
            .iter()
            .all(|n| reconciler(&st, n)["state"] == "Converged")
    });
    let ps = || {
        podman_ok(
            &node,
            &svc,
            &[
                "ps",
                "-a",
                "--filter",
                "label=converge.managed=true",
                "--format",
                "{{.Names}}",
            ],
        )
    };
    assert_eq!(ps().trim(), "web");
    let wg_go = converge_wireguard::driver::wireguard_go_pids(&iface);
    assert!(!wg_go.is_empty(), "wireguard-go runs for {iface}");

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &agent.pid().to_string()])
        .status();
    let _ = agent.wait();

    let mut args = vec!["reset", "--dry-run"];
    args.extend(runtime);
    let out = converge(&node, &args);
    let preview = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    for want in [
        "container web (containers reconciler)".to_string(),
        "network apps (containers reconciler)".to_string(),
        format!("WireGuard interface {iface}"),
        "nftables table inet converge".to_string(),
    ] {
        assert!(preview.contains(&want), "{want:?} missing from\n{preview}");
    }
    assert_eq!(ps().trim(), "web", "the preview removed nothing");

    let mut args = vec!["reset"];
    args.extend(runtime);
    let out = converge(&node, &args);
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ps().trim(), "", "managed containers removed");
    let nets = podman_ok(&node, &svc, &["network", "ls", "--format", "{{.Name}}"]);
    assert!(!nets.lines().any(|n| n == "apps"), "{nets}");
    assert!(!node.run("ip", ["link", "show", &iface]).status.success());
    wait_until(Duration::from_secs(5), "wireguard-go gone", || {
        converge_wireguard::driver::wireguard_go_pids(&iface).is_empty()
    });
    assert!(
        data(&node).join("state.db").exists(),
        "state kept without --purge-state"
    );
}
