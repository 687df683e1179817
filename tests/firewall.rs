//! Firewall reconciler against kernel nftables in sandbox nodes, through the real agent:
//! traffic reaches the targets (TCP, UDP, IPv4, IPv6, from other hosts and from the host
//! itself), allowFrom blocks others, a removed port stops, other tables are never touched,
//! drift is repaired on netlink events, an agent restart does not rewrite the table, and
//! the table comes back after `nft flush ruleset`.

mod common;

use common::agent::{push_ok, reconciler, start_agent, status, wait_ready};
use common::sandbox::{require_tool, wait_until, Backend, TestNode};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

fn doc(node: &TestNode, generation: u64, firewall: Value) -> Value {
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": node.name(), "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-11-24T10:00:00Z",
        "firewall": firewall
    })
}

/// Waits until the firewall reconciler reports Converged for `generation`.
fn wait_converged(node: &TestNode, generation: u64) {
    wait_until(Duration::from_secs(10), "firewall converged", || {
        let r = reconciler(&status(node), "firewall");
        r["state"] == "Converged" && r["observedGeneration"] == generation
    });
}

/// TCP (answers `tag`) and UDP echo servers on `port`, both families, in the backend.
fn serve(backend: &Backend, port: u16, tag: &'static str) {
    let tcp = backend.in_netns(|| TcpListener::bind(("::", port)).expect("bind tcp"));
    std::thread::spawn(move || {
        for mut s in tcp.incoming().flatten() {
            let _ = s.write_all(tag.as_bytes());
        }
    });
    let udp = backend.in_netns(|| UdpSocket::bind(("::", port)).expect("bind udp"));
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
}

/// What a TCP connection from `node` to `to` reads, or None if it cannot connect.
fn tcp_get(node: &TestNode, to: SocketAddr) -> Option<String> {
    node.in_netns(|| {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(700)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
}

/// The UDP echo of "ping" from `node` via `to`, if any.
fn udp_echo(node: &TestNode, to: SocketAddr) -> Option<String> {
    node.in_netns(|| {
        let bind: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let s = UdpSocket::bind(bind).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(700))).ok()?;
        s.send_to(b"ping", to).ok()?;
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// `nft list ruleset` without converge's table: what converge must never change.
fn other_tables(node: &TestNode) -> String {
    let all = node.run_ok("nft", ["list", "ruleset"]);
    let mut out = String::new();
    let mut ours = false;
    for line in all.lines() {
        if line.starts_with("table ") {
            ours = line.starts_with("table inet converge ");
        }
        if !ours {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn nft(node: &TestNode, args: &[&str]) -> String {
    node.run_ok("nft", args)
}

fn map(node: &TestNode, name: &str) -> String {
    nft(node, &["list", "map", "inet", "converge", name])
}

fn ruleset_generation(node: &TestNode) -> u32 {
    node.in_netns(|| {
        converge_firewall::nfnl::Nft::open()
            .and_then(|mut n| n.generation())
            .expect("read nftables generation")
    })
}

#[test]
fn published_ports_carry_traffic_and_follow_the_document() {
    require_tool("nft");
    let host = TestNode::new("fw");
    let client = TestNode::new("fwc");
    let stranger = TestNode::new("fws");
    let backend = host.backend(1);
    serve(&backend, 9000, "backend");
    let _agent = start_agent(&host, &[]);
    // Before any document, every reconciler is listed as pending.
    let before = status(&host);
    for r in before["reconcilers"].as_array().expect("reconcilers") {
        assert_eq!(r["state"], "Pending", "{r}");
        assert!(r["observedGeneration"].is_null(), "{r}");
    }
    assert_eq!(
        reconciler(&before, "firewall")["state"],
        "Pending",
        "{before:#}"
    );
    let b4 = backend.v4.to_string();
    let b6 = backend.v6.to_string();
    let host6: IpAddr = "fd00:251:1::1".parse().expect("literal");
    let ports = |with_8080: bool| {
        let mut p = vec![
            json!({"protocol": "udp", "hostPort": 8053, "target": {"address": b4, "port": 9000}}),
            json!({"protocol": "tcp", "hostPort": 8443, "hostIp": host6.to_string(),
                   "target": {"address": b6, "port": 9000}}),
            json!({"protocol": "tcp", "hostPort": 8081, "target": {"address": b4, "port": 9000},
                   "allowFrom": [format!("{}/32", client.address())]}),
        ];
        if with_8080 {
            p.push(json!({"protocol": "tcp", "hostPort": 8080, "target": {"address": b4, "port": 9000}}));
        }
        // IPv6 from other hosts: on every address, and restricted to the client.
        p.push(
            json!({"protocol": "tcp", "hostPort": 8444, "target": {"address": b6, "port": 9000}}),
        );
        p.push(
            json!({"protocol": "tcp", "hostPort": 8445, "target": {"address": b6, "port": 9000},
                      "allowFrom": [format!("{}/128", client.address6())]}),
        );
        json!({"publishedPorts": p})
    };
    push_ok(&host, &doc(&host, 1, ports(true)));
    wait_converged(&host, 1);

    // The kernel's own view (nft's decoder is an independent oracle of the encoding).
    assert!(map(&host, "dnat4_any").contains(&format!("tcp . 8080 : {b4} . 9000")));
    assert!(map(&host, "dnat6_on").contains(&format!("{host6} . tcp . 8443 : {b6} . 9000")));

    let a = host.address();
    assert_eq!(tcp_get(&client, at(a, 8080)).as_deref(), Some("backend"));
    assert_eq!(udp_echo(&client, at(a, 8053)).as_deref(), Some("ping"));
    // From the host itself (output hook), IPv4 and IPv6.
    assert_eq!(tcp_get(&host, at(a, 8080)).as_deref(), Some("backend"));
    assert_eq!(tcp_get(&host, at(host6, 8443)).as_deref(), Some("backend"));
    // allowFrom: the client may, a stranger's packets are dropped.
    assert_eq!(tcp_get(&client, at(a, 8081)).as_deref(), Some("backend"));
    assert_eq!(tcp_get(&stranger, at(a, 8081)), None);
    assert_eq!(tcp_get(&stranger, at(a, 8080)).as_deref(), Some("backend"));
    // IPv6 from other hosts, through prerouting and forwarding.
    let a6 = host.address6();
    assert_eq!(tcp_get(&client, at(a6, 8444)).as_deref(), Some("backend"));
    assert_eq!(tcp_get(&stranger, at(a6, 8444)).as_deref(), Some("backend"));
    assert_eq!(tcp_get(&client, at(a6, 8445)).as_deref(), Some("backend"));
    assert_eq!(tcp_get(&stranger, at(a6, 8445)), None);

    // Removing a port stops its traffic and leaves the others alone.
    push_ok(&host, &doc(&host, 2, ports(false)));
    wait_converged(&host, 2);
    assert_eq!(tcp_get(&client, at(a, 8080)), None);
    assert_eq!(udp_echo(&client, at(a, 8053)).as_deref(), Some("ping"));
    assert!(!map(&host, "dnat4_any").contains("8080"));
}

#[test]
fn owns_only_its_table_repairs_drift_and_does_not_flap() {
    require_tool("nft");
    require_tool("iptables-nft");
    let host = TestNode::new("fwo");
    // Someone else's rules: an admin table, and an iptables-nft NAT rule (Docker's way).
    let admin = "table ip admin {\n set blocked { type ipv4_addr; elements = { 192.0.2.1 } }\n chain input { type filter hook input priority 10; ip saddr @blocked drop; }\n}\ntable inet other { chain c { counter; }; }\n";
    let path = host.data_dir().join("admin.nft");
    std::fs::write(&path, admin).expect("write admin ruleset");
    host.run_ok("nft", ["-f", path.to_str().expect("utf-8")]);
    host.run_ok(
        "iptables-nft",
        [
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "9999",
            "-j",
            "DNAT",
            "--to-destination",
            "10.9.9.9:99",
        ],
    );
    let before = other_tables(&host);

    let mut agent = start_agent(&host, &[]);
    let firewall = json!({
        "publishedPorts": [
            {"protocol": "tcp", "hostPort": 8080, "target": {"address": "10.251.9.2", "port": 80}},
            {"protocol": "udp", "hostPort": 5353, "target": {"address": "fd00::2", "port": 53},
             "allowFrom": ["fd00:1::/64"]}
        ],
        "input": {"policy": "accept"},
        "forward": {"policy": "drop", "allow": [{"from": ["10.88.0.0/16"]}]},
        "masquerade": true
    });
    push_ok(&host, &doc(&host, 1, firewall.clone()));
    wait_converged(&host, 1);
    assert_eq!(
        other_tables(&host),
        before,
        "converge touched another table"
    );

    let want = "tcp . 8080 : 10.251.9.2 . 80";
    let repaired = |what: &str, check: &dyn Fn() -> bool| {
        let start = Instant::now();
        // The resync interval is 60 s: a repair this fast comes from the netlink event.
        wait_until(Duration::from_secs(5), what, check);
        eprintln!("{what}: repaired in {:?}", start.elapsed());
    };
    nft(
        &host,
        &[
            "delete",
            "element",
            "inet",
            "converge",
            "dnat4_any",
            "{ tcp . 8080 }",
        ],
    );
    repaired("deleted element", &|| {
        map(&host, "dnat4_any").contains(want)
    });
    // One nft transaction, so converge cannot repair in between.
    nft(
        &host,
        &["delete element inet converge dnat4_any { tcp . 8080 }; add element inet converge dnat4_any { tcp . 8080 : 10.9.9.9 . 1 }"],
    );
    repaired("edited element", &|| map(&host, "dnat4_any").contains(want));
    nft(&host, &["flush", "chain", "inet", "converge", "prerouting"]);
    repaired("flushed chain", &|| {
        nft(&host, &["list", "chain", "inet", "converge", "prerouting"]).contains("jump published")
    });
    nft(&host, &["delete", "table", "inet", "converge"]);
    repaired("deleted table", &|| {
        host.run("nft", ["list", "map", "inet", "converge", "dnat4_any"])
            .status
            .success()
            && map(&host, "dnat4_any").contains(want)
    });
    assert_eq!(
        other_tables(&host),
        before,
        "a repair touched another table"
    );

    // A batch the kernel refuses half-way changes nothing, and the socket stays usable.
    let listed = nft(&host, &["list", "table", "inet", "converge"]);
    host.in_netns(|| {
        use converge_firewall::ruleset::{element_messages, Bytes, DNAT4_ANY, RESTRICTED4};
        let add = [(
            Bytes::from_slice(&[6, 0, 0, 0, 0x1f, 0x91, 0, 0]), // tcp . 8081
            Bytes::from_slice(&[10, 251, 9, 2, 0, 80, 0, 0]),
        )];
        let mut batch = element_messages(&DNAT4_ANY, add.iter().map(|(k, d)| (k, d)), true);
        // A map value for a plain set: refused.
        batch.extend(element_messages(
            &RESTRICTED4,
            add.iter().map(|(k, d)| (k, d)),
            true,
        ));
        let mut sock = converge_firewall::nfnl::Nft::open().expect("netlink");
        let err = sock.commit(&batch, None).expect_err("refused");
        eprintln!("refused batch: {err}");
        sock.generation().expect("socket still answers");
    });
    assert_eq!(nft(&host, &["list", "table", "inet", "converge"]), listed);

    // An agent restart adopts the table: nothing is committed.
    let generation = ruleset_generation(&host);
    let _ = agent.kill();
    let _ = agent.wait();
    let _agent = start_agent(&host, &[]);
    wait_ready(&host, Duration::from_secs(30));
    wait_converged(&host, 1);
    assert_eq!(
        ruleset_generation(&host),
        generation,
        "restart rewrote the ruleset"
    );

    // The admin flushes everything: converge's table comes back, nobody else's.
    nft(&host, &["flush", "ruleset"]);
    repaired("flushed ruleset", &|| {
        host.run("nft", ["list", "map", "inet", "converge", "dnat4_any"])
            .status
            .success()
    });
    assert_eq!(other_tables(&host), "");
}
