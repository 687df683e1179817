//! DNS reconciler against a real dnsmasq in a sandbox node, driven through the real
//! agent: records served, changes visible within 1 s, drift repaired, no flap on agent
//! restart, and zero failed queries while 1,000 record updates are applied.

mod common;

use common::agent::{
    converge, data, dns_doc, push, push_ok, reconciler, start_agent, status, wait_ready,
};
use common::dnsq::{query, Answer};
use common::sandbox::{pid_alive, require_tool, wait_until, TestNode};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use serde_json::json;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Dns {
    sock: UdpSocket,
    server: SocketAddr,
}

impl Dns {
    fn new(node: &TestNode) -> Dns {
        let sock = node.in_netns(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
        Dns {
            sock,
            server: SocketAddr::new(node.address().into(), 53),
        }
    }
    fn ask(&self, name: &str, t: RecordType) -> Option<Answer> {
        query(&self.sock, self.server, name, t, Duration::from_millis(300)).ok()
    }
    fn values(&self, name: &str, t: RecordType) -> Vec<String> {
        self.ask(name, t).map(|a| a.values).unwrap_or_default()
    }
    /// Waits until `name` answers exactly `want`; returns how long that took.
    fn wait_for(&self, name: &str, t: RecordType, want: &[&str], within: Duration) -> Duration {
        let start = Instant::now();
        wait_until(within, &format!("{name} {t} = {want:?}"), || {
            self.values(name, t) == want
        });
        start.elapsed()
    }
}

fn pid_of_dnsmasq(node: &TestNode) -> u32 {
    let p = data(node).join("dns/dnsmasq.pid");
    std::fs::read_to_string(&p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn records(web: &str, www_target: &str) -> serde_json::Value {
    json!([
        {"name": "web.internal", "type": "A", "values": [web]},
        {"name": "www.internal", "type": "CNAME", "values": [www_target]},
        {"name": "web.internal", "type": "TXT", "values": ["v=1 owner=team-a"]},
        {"name": "_http._tcp.web.internal", "type": "SRV", "values": ["10 5 8080 web.internal"]},
        {"name": "db.internal", "type": "AAAA", "values": ["fd00::5"], "ttl": 30},
        {"name": "gone.internal", "type": "A", "values": ["10.88.0.99"]}
    ])
}

#[test]
fn records_are_served_and_changes_show_within_one_second() {
    require_tool("dnsmasq");
    let node = TestNode::new("dns-serve");
    let _agent = start_agent(&node, &["--resync-secs", "2"]);
    let dns = Dns::new(&node);

    push_ok(
        &node,
        &dns_doc(&node, 1, records("10.88.0.10", "web.internal")),
    );
    dns.wait_for(
        "web.internal",
        RecordType::A,
        &["10.88.0.10"],
        Duration::from_secs(5),
    );
    assert_eq!(
        dns.values("www.internal", RecordType::CNAME),
        vec!["web.internal."]
    );
    assert_eq!(
        dns.values("web.internal", RecordType::TXT),
        vec!["v=1 owner=team-a"]
    );
    assert_eq!(
        dns.values("_http._tcp.web.internal", RecordType::SRV),
        vec!["10 5 8080 web.internal."]
    );
    let aaaa = dns
        .ask("db.internal", RecordType::AAAA)
        .expect("AAAA answer");
    assert_eq!(aaaa.values, vec!["fd00::5"]);
    assert_eq!(aaaa.ttls, vec![30], "per-record TTL");
    assert_eq!(
        dns.ask("web.internal", RecordType::A).expect("A").ttls,
        vec![5],
        "zone TTL"
    );
    assert_eq!(
        dns.ask("nothing.internal", RecordType::A)
            .expect("answer")
            .rcode,
        ResponseCode::NXDomain
    );
    let pid = pid_of_dnsmasq(&node);

    // An address change goes through the hosts file: visible within 1 s, no restart.
    push_ok(
        &node,
        &dns_doc(&node, 2, records("10.88.0.11", "web.internal")),
    );
    let took = dns.wait_for(
        "web.internal",
        RecordType::A,
        &["10.88.0.11"],
        Duration::from_secs(1),
    );
    eprintln!("A change visible after {took:?}");
    assert_eq!(
        pid_of_dnsmasq(&node),
        pid,
        "an A change must not restart dnsmasq"
    );

    // A removal: the name disappears within 1 s.
    let mut without = records("10.88.0.11", "web.internal");
    without.as_array_mut().expect("array").pop();
    push_ok(&node, &dns_doc(&node, 3, without.clone()));
    let start = Instant::now();
    wait_until(Duration::from_secs(1), "gone.internal removed", || {
        dns.ask("gone.internal", RecordType::A)
            .is_some_and(|a| a.rcode == ResponseCode::NXDomain)
    });
    eprintln!("removal visible after {:?}", start.elapsed());

    // A CNAME change needs dnsmasq's configuration: one restart, still within 1 s.
    without[1]["values"] = json!(["db.internal"]);
    push_ok(&node, &dns_doc(&node, 4, without));
    let took = dns.wait_for(
        "www.internal",
        RecordType::CNAME,
        &["db.internal."],
        Duration::from_secs(1),
    );
    eprintln!("CNAME change visible after {took:?}");
    assert_ne!(pid_of_dnsmasq(&node), pid);

    wait_until(
        Duration::from_secs(5),
        "status converged at generation 4",
        || {
            let s = status(&node);
            s["generation"] == 4
                && reconciler(&s, "dns")["state"] == "Converged"
                && reconciler(&s, "dns")["observedGeneration"] == 4
        },
    );
}

#[test]
fn bad_stale_and_foreign_documents_change_nothing() {
    require_tool("dnsmasq");
    let node = TestNode::new("dns-bad");
    let _agent = start_agent(&node, &[]);
    let dns = Dns::new(&node);
    push_ok(
        &node,
        &dns_doc(&node, 5, records("10.88.0.10", "web.internal")),
    );
    dns.wait_for(
        "web.internal",
        RecordType::A,
        &["10.88.0.10"],
        Duration::from_secs(5),
    );

    let mut bad = dns_doc(&node, 6, records("10.88.0.12", "web.internal"));
    bad["dns"]["records"][0]["values"] = json!(["fd00::1"]);
    bad["dns"]["records"][2]["name"] = json!("bad_name.internal");
    let out = push(&node, &bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("$.dns.records[0].values[0]: invalid A value"),
        "{stderr}"
    );
    assert!(
        stderr.contains("$.dns.records[2].name"),
        "all problems at once: {stderr}"
    );

    for (doc, why) in [
        (
            dns_doc(&node, 5, records("10.88.0.13", "web.internal")),
            "replayed generation",
        ),
        (
            dns_doc(&node, 4, records("10.88.0.13", "web.internal")),
            "older generation",
        ),
    ] {
        let out = push(&node, &doc);
        assert_eq!(out.status.code(), Some(1), "{why} must be refused");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not newer"),
            "{why}"
        );
    }
    let mut other = dns_doc(&node, 7, records("10.88.0.13", "web.internal"));
    other["node"]["id"] = json!("someone-else");
    let out = push(&node, &other);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("$.node.id"),
        "document for another node is refused"
    );
    let mut proxy = dns_doc(&node, 7, records("10.88.0.13", "web.internal"));
    proxy["node"]["mode"] = json!("proxy");
    let out = push(&node, &proxy);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("$.node.mode"));
    // Refused before the store: nothing is under way that could change the answers.
    assert_eq!(
        dns.values("web.internal", RecordType::A),
        vec!["10.88.0.10"],
        "last good document stays in force"
    );
    assert_eq!(status(&node)["generation"], 5);
}

#[test]
fn drift_is_repaired_and_an_agent_restart_does_not_flap() {
    require_tool("dnsmasq");
    let node = TestNode::new("dns-drift");
    let mut agent = start_agent(&node, &["--resync-secs", "1"]);
    let dns = Dns::new(&node);
    push_ok(
        &node,
        &dns_doc(&node, 1, records("10.88.0.10", "web.internal")),
    );
    dns.wait_for(
        "web.internal",
        RecordType::A,
        &["10.88.0.10"],
        Duration::from_secs(5),
    );
    let hosts = data(&node).join("dns/hosts/converge.hosts");

    // A deleted hosts file is restored (inotify or the next resync). How long the record is
    // missing in between is not asserted: the inotify repair can beat dnsmasq's own reload.
    std::fs::remove_file(&hosts).expect("remove hosts file");
    wait_until(Duration::from_secs(4), "hosts file restored", || {
        hosts.exists()
    });
    dns.wait_for(
        "web.internal",
        RecordType::A,
        &["10.88.0.10"],
        Duration::from_secs(4),
    );

    // A hand edit is overwritten.
    std::fs::write(&hosts, "10.66.6.6 web.internal\n").expect("edit hosts");
    dns.wait_for(
        "web.internal",
        RecordType::A,
        &["10.88.0.10"],
        Duration::from_secs(4),
    );

    // A killed dnsmasq is started again.
    let pid = pid_of_dnsmasq(&node);
    assert!(node.kill_pidfile(data(&node).join("dns/dnsmasq.pid")));
    wait_until(Duration::from_secs(4), "dnsmasq restarted", || {
        pid_of_dnsmasq(&node) != pid && pid_alive(pid_of_dnsmasq(&node))
    });
    dns.wait_for(
        "web.internal",
        RecordType::A,
        &["10.88.0.10"],
        Duration::from_secs(2),
    );

    // Stopping the agent leaves DNS serving; a new agent adopts it without rewriting.
    let pid = pid_of_dnsmasq(&node);
    let mtime = std::fs::metadata(&hosts)
        .and_then(|m| m.modified())
        .expect("mtime");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
    let code = agent.wait().expect("agent exit");
    assert!(code.success(), "graceful shutdown exits 0: {code}");
    assert_eq!(
        dns.values("web.internal", RecordType::A),
        vec!["10.88.0.10"],
        "DNS keeps serving without the agent"
    );
    let _agent = start_agent(&node, &["--resync-secs", "1"]);
    wait_ready(&node, Duration::from_secs(30));
    assert_eq!(
        pid_of_dnsmasq(&node),
        pid,
        "restart of converge must not restart dnsmasq"
    );
    assert_eq!(
        std::fs::metadata(&hosts)
            .and_then(|m| m.modified())
            .expect("mtime"),
        mtime,
        "unchanged file not rewritten"
    );
    let journal = converge(&node, &["status"]);
    assert!(journal.status.success());
}

#[test]
fn file_drift_is_repaired_on_inotify_without_waiting_for_resync() {
    require_tool("dnsmasq");
    let node = TestNode::new("dns-inotify");
    let _agent = start_agent(&node, &[]); // default resync: 60 s
    let dns = Dns::new(&node);
    push_ok(
        &node,
        &dns_doc(&node, 1, records("10.88.0.10", "web.internal")),
    );
    dns.wait_for(
        "web.internal",
        RecordType::A,
        &["10.88.0.10"],
        Duration::from_secs(5),
    );
    let hosts = data(&node).join("dns/hosts/converge.hosts");
    std::fs::write(&hosts, "10.66.6.6 web.internal\n").expect("edit hosts");
    let start = Instant::now();
    wait_until(Duration::from_secs(2), "hand edit reverted", || {
        std::fs::read_to_string(&hosts).is_ok_and(|s| s.contains("10.88.0.10"))
    });
    eprintln!("hand edit reverted after {:?}", start.elapsed());
    std::fs::remove_file(&hosts).expect("remove");
    wait_until(Duration::from_secs(2), "deleted file restored", || {
        hosts.exists()
    });
    dns.wait_for(
        "web.internal",
        RecordType::A,
        &["10.88.0.10"],
        Duration::from_secs(1),
    );
}

/// The figure for the closing note: a query loop against a stable name and the name
/// being updated, while 1,000 A-record updates are pushed one after another and each
/// is confirmed visible before the next. Then 20 CNAME updates (restart path) for
/// comparison, reported but not asserted (a restart has a short gap by nature).
#[test]
fn zero_failed_queries_during_1000_record_updates() {
    require_tool("dnsmasq");
    let node = TestNode::new("dns-load");
    let _agent = start_agent(&node, &[]);
    let dns = Dns::new(&node);
    let doc = |g: u64, addr: String, cname: &str| {
        dns_doc(
            &node,
            g,
            json!([
                {"name": "stable.internal", "type": "A", "values": ["10.88.1.1"]},
                {"name": "moving.internal", "type": "A", "values": [addr]},
                {"name": "alias.internal", "type": "CNAME", "values": [cname]}
            ]),
        )
    };
    push_ok(&node, &doc(1, "10.89.0.0".into(), "stable.internal"));
    dns.wait_for(
        "moving.internal",
        RecordType::A,
        &["10.89.0.0"],
        Duration::from_secs(5),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (total, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let looper = {
        let sock = node.in_netns(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
        let server = dns.server;
        let (stop, total, failed) = (stop.clone(), total.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for name in ["stable.internal", "moving.internal"] {
                    let ok = match query(&sock, server, name, RecordType::A, Duration::from_secs(1))
                    {
                        Ok(a) => a.rcode == ResponseCode::NoError && a.values.len() == 1,
                        Err(_) => false,
                    };
                    total.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let mut latencies = Vec::new();
    let start = Instant::now();
    for i in 1..=1000u64 {
        let addr = format!("10.89.{}.{}", i / 250, i % 250 + 1);
        push_ok(&node, &doc(i + 1, addr.clone(), "stable.internal"));
        let t = Instant::now();
        wait_until(Duration::from_secs(2), "update visible", || {
            dns.values("moving.internal", RecordType::A) == [addr.as_str()]
        });
        latencies.push(t.elapsed());
    }
    let a_elapsed = start.elapsed();
    let (a_total, a_failed) = (
        total.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    for j in 0..20u64 {
        let target = if j % 2 == 0 {
            "moving.internal"
        } else {
            "stable.internal"
        };
        push_ok(&node, &doc(1002 + j, "10.89.9.9".into(), target));
        dns.wait_for(
            "alias.internal",
            RecordType::CNAME,
            &[&format!("{target}.")],
            Duration::from_secs(3),
        );
    }
    stop.store(true, Ordering::Relaxed);
    looper.join().expect("query loop");
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    eprintln!(
        "1000 A updates in {a_elapsed:?}: queries {a_total}, failed {a_failed}; push-ack→visible p50 {:?} p99 {:?} max {:?}",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    eprintln!(
        "20 CNAME updates (dnsmasq restart each): queries {}, failed {}",
        total.load(Ordering::Relaxed) - a_total,
        failed.load(Ordering::Relaxed) - a_failed
    );
    assert_eq!(a_failed, 0, "queries failed during A-record updates");
    assert!(a_total > 1000, "the query loop ran ({a_total} queries)");
}
