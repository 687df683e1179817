//! WireGuard reconciler end to end through the real agent: three sandbox nodes, each with
//! its own agent and wireguard-go, meshed by their documents. Every node pings every
//! other over the tunnel (IPv4 and IPv6); status reports the public key and the peers,
//! never a private key; kill -9 of an agent and a restart adopt the running interface
//! without touching a peer; removing a peer stops its traffic and restoring it restores
//! it, without disturbing the other peer's session; `converge wireguard rotate-key` is
//! applied by the running agent at once.
//!
//! Churn: while A pings B every 5 ms, peer C is added, changed (endpoint, allowed IPs,
//! keepalive) and removed 100 times on A, each step a generation pushed to A's agent
//! and converged before the next: no A–B packet is lost and A–B's session is not reset.
//! Drift: an address or route deleted by hand, the interface deleted and wireguard-go
//! killed are repaired at once by an agent with a 300 s resync (netlink watch); a peer
//! removed or changed by hand with `wg set` (no event) within seconds (the device
//! watch); traffic, handshakes and a peer's roaming cause no pass (the pass count in
//! the metrics stays flat).

mod common;

use common::agent::{converge, data, push_ok, reconciler, start_agent, status, wireguard_key};
use common::netstat::snmp_counter;
use common::sandbox::{pid_alive, require_tool, wait_until, Spawned, TestNode};
use converge_wireguard::driver::wireguard_go_pids;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const PORT: u16 = 51820;
/// Frequent resyncs: status (peer handshakes) follows within seconds, and every pass
/// during the test must leave the sessions alone.
const RESYNC: &[&str] = &["--resync-secs", "2"];
/// No resync during a test: what is repaired was noticed through an event.
const NO_RESYNC: &[&str] = &["--resync-secs", "300"];
/// Where the agents of the drift test serve their metrics (each in its node).
const METRICS: &str = "127.0.0.1:9464";

/// One meshed node: the sandbox node, its interface, its public key and its agent.
struct Mesh {
    node: TestNode,
    /// 1, 2, 3: the node's mesh addresses are 10.77.0.<n> and fd00:77::<n>.
    n: u8,
    iface: String,
    public_key: String,
    agent: Option<Spawned>,
}

impl Mesh {
    fn v4(&self) -> IpAddr {
        format!("10.77.0.{}", self.n).parse().expect("v4")
    }

    fn v6(&self) -> IpAddr {
        format!("fd00:77::{}", self.n).parse().expect("v6")
    }

    fn peer(&self) -> Value {
        json!({
            "name": self.node.name(),
            "publicKey": self.public_key,
            "endpoint": format!("{}:{PORT}", self.node.address()),
            "allowedIps": [format!("{}/32", self.v4()), format!("{}/128", self.v6())],
        })
    }

    /// The node's document meshing it with `peers`.
    fn doc(&self, generation: u64, peers: &[&Mesh]) -> Value {
        self.doc_with(generation, peers, None)
    }

    /// The node's document with `peers` and one more peer entry, if given.
    fn doc_with(&self, generation: u64, peers: &[&Mesh], extra: Option<Value>) -> Value {
        let mut list: Vec<Value> = peers.iter().map(|p| p.peer()).collect();
        list.extend(extra);
        json!({
            "apiVersion": "converge/v1",
            "node": {"id": self.node.name(), "mode": "worker"},
            "generation": generation,
            "issuedAt": "2026-11-24T10:00:00Z",
            "wireguard": {
                "interface": self.iface,
                "listenPort": PORT,
                "addresses": [format!("{}/24", self.v4()), format!("{}/64", self.v6())],
                "peers": list,
            }
        })
    }

    fn wg(&self, what: &str) -> BTreeMap<String, String> {
        let out = self.node.run_ok("wg", ["show", &self.iface, what]);
        out.lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pings(&self, to: IpAddr) -> bool {
        self.node
            .run("ping", ["-c1", "-W1", &to.to_string()])
            .status
            .success()
    }

    fn key_file(&self) -> PathBuf {
        data(&self.node)
            .join("wireguard")
            .join(format!("{}.key", self.iface))
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // wireguard-go dies with the namespace; its UAPI socket is in a shared directory.
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.iface));
    }
}

/// Creates node `n` and its key with `converge wireguard rotate-key` (before any
/// agent runs), checked against `wg pubkey` of the key file, and starts its agent with
/// `agent_args`. `tag` keeps the interface names of tests running at once apart (the
/// UAPI socket directory is shared by every namespace).
fn mesh_node(tag: &str, n: u8, agent_args: &[&str]) -> Mesh {
    let letter = char::from(b'a' + n - 1);
    let node = TestNode::new(&format!("wg{letter}"));
    let iface = format!("wg{tag}-{}-{letter}", std::process::id());
    let public_key = wireguard_key(&node, &iface);
    let mut m = Mesh {
        node,
        n,
        iface,
        public_key,
        agent: None,
    };
    let private = std::fs::read_to_string(m.key_file()).expect("key file");
    let mut wg = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("wg pubkey");
    std::io::Write::write_all(&mut wg.stdin.take().expect("stdin"), private.as_bytes())
        .expect("write key");
    let derived = wg.wait_with_output().expect("wg pubkey output");
    assert_eq!(
        String::from_utf8_lossy(&derived.stdout).trim(),
        m.public_key,
        "rotate-key prints the public key of the key file"
    );
    m.agent = Some(start_agent(&m.node, agent_args));
    m
}

/// A continuous ping (every 5 ms) from a node, its replies written to a file in the
/// node's data dir; stopped with SIGINT. The only ping of its node while it runs.
struct LivePing {
    child: Spawned,
    out: PathBuf,
    /// The node's ICMP echo requests sent before this ping started.
    echoes_before: u64,
}

impl LivePing {
    fn start(from: &Mesh, to: IpAddr) -> LivePing {
        let echoes_before = snmp_counter(&from.node, "Icmp", "OutEchos");
        let out = from.node.data_dir().join(format!("ping-{to}.txt"));
        let file = std::fs::File::create(&out).expect("ping output file");
        let mut cmd = from.node.command("ping");
        cmd.args(["-n", "-i", "0.005", &to.to_string()])
            .stdout(file)
            .stderr(std::process::Stdio::null());
        let ping = LivePing {
            child: from.node.spawn(&mut cmd),
            out,
            echoes_before,
        };
        wait_until(Duration::from_secs(5), "the first ping reply", || {
            std::fs::read_to_string(&ping.out).is_ok_and(|t| t.contains("icmp_seq="))
        });
        ping
    }

    /// The highest sequence number answered so far.
    fn last_answered(&self) -> u32 {
        answered(&std::fs::read_to_string(&self.out).unwrap_or_default())
            .into_iter()
            .max()
            .unwrap_or(0)
    }

    /// Waits (at most `within`) until the reply to every ping sent by now is in, or
    /// that to a later one (then any unanswered one before it counts as lost).
    fn settle(&self, node: &TestNode, within: Duration) {
        let sent = snmp_counter(node, "Icmp", "OutEchos") - self.echoes_before;
        let deadline = Instant::now() + within;
        while u64::from(self.last_answered()) < sent && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the ping, which must still be running; returns how many were sent and
    /// the sequence numbers of those lost (see [`lost`]).
    fn stop(mut self) -> (u32, Vec<u32>) {
        assert!(
            self.child.try_wait().expect("ping status").is_none(),
            "the ping ended before it was stopped"
        );
        // SAFETY: SIGINT to the ping this test started (nsenter execs it: same pid).
        unsafe { libc::kill(self.child.pid() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.out).expect("ping output");
        let sent: u32 = text
            .lines()
            .find_map(|l| l.split_once(" packets transmitted"))
            .and_then(|(n, _)| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ping summary in {text}"));
        (sent, lost(sent, &answered(&text)))
    }
}

/// The sequence numbers answered in a ping's output.
fn answered(text: &str) -> HashSet<u32> {
    text.lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|r| r.split(' ').next()?.parse().ok())
        .collect()
}

/// The lost pings among `sent`: those unanswered below the highest answered one, and
/// the unanswered tail too when it is longer than 100 ms of pings (the tunnel did not
/// come back); a shorter tail may still have been in flight when the ping was stopped.
fn lost(sent: u32, answered: &HashSet<u32>) -> Vec<u32> {
    let last = answered.iter().copied().max().unwrap_or(0);
    let tail = if sent - last.min(sent) > 20 {
        sent
    } else {
        last
    };
    (1..=tail).filter(|s| !answered.contains(s)).collect()
}

/// One peer of `wg show <iface> dump`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct WgPeer {
    endpoint: String,
    /// Sorted.
    allowed: Vec<String>,
    handshake: u64,
    rx: u64,
    tx: u64,
    /// Seconds, or `off`.
    keepalive: String,
}

/// `wg show <iface> dump` on `m`, peers only, by public key.
fn wg_dump(m: &Mesh) -> BTreeMap<String, WgPeer> {
    let out = m.node.run_ok("wg", ["show", &m.iface, "dump"]);
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let n = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut allowed: Vec<String> = f.get(3)?.split(',').map(String::from).collect();
            allowed.sort();
            let peer = WgPeer {
                endpoint: f.get(2)?.to_string(),
                allowed,
                handshake: n(4),
                rx: n(5),
                tx: n(6),
                keepalive: f.get(7)?.to_string(),
            };
            Some((f[0].to_string(), peer))
        })
        .collect()
}

fn wait_converged(m: &Mesh, generation: u64) -> Value {
    let mut last = Value::Null;
    wait_until(Duration::from_secs(20), "wireguard converged", || {
        last = reconciler(&status(&m.node), "wireguard");
        last["state"] == "Converged" && last["observedGeneration"] == generation
    });
    last
}

fn wait_pings(from: &Mesh, to: IpAddr) {
    wait_until(
        Duration::from_secs(15),
        &format!("{} pings {to}", from.node.name()),
        || from.pings(to),
    );
}

#[test]
fn three_nodes_mesh_restart_adopts_and_peers_change_one_by_one() {
    for tool in ["wireguard-go", "wg", "ping"] {
        require_tool(tool);
    }
    let [a, b, c] = [1, 2, 3].map(|n| mesh_node("", n, RESYNC));
    let all = [&a, &b, &c];
    for m in all {
        let peers: Vec<&Mesh> = all.iter().copied().filter(|p| p.n != m.n).collect();
        push_ok(&m.node, &m.doc(1, &peers));
    }

    // Full mesh, both families.
    for from in all {
        for to in all.iter().filter(|t| t.n != from.n) {
            wait_pings(from, to.v4());
            wait_pings(from, to.v6());
        }
    }

    // Status: the public key and one note per peer with its handshake (as of the last
    // resync); the private key nowhere.
    for m in all {
        wait_converged(m, 1);
        let notes = |st: &Value| -> Vec<(String, String)> {
            st["objects"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| {
                    let s = |k: &str| n[k].as_str().unwrap_or_default().to_string();
                    (s("object"), s("note"))
                })
                .collect()
        };
        let note = |st: &Value, object: &str| {
            notes(st)
                .into_iter()
                .find(|(o, _)| o.starts_with(object))
                .map(|(_, n)| n)
        };
        let mut st = Value::Null;
        wait_until(Duration::from_secs(10), "peer handshakes in status", || {
            st = reconciler(&status(&m.node), "wireguard");
            all.iter().filter(|p| p.n != m.n).all(|p| {
                note(&st, &format!("peer {}", p.node.name()))
                    .is_some_and(|n| n.starts_with("last handshake 20"))
            })
        });
        let iface = note(&st, &format!("interface {}", m.iface)).unwrap_or_default();
        assert!(iface.contains(&m.public_key), "{iface}");
        assert!(iface.contains("backend userspace"), "{iface}");
        assert!(iface.contains(", key from 20"), "{iface}");
        for p in all.iter().filter(|p| p.n != m.n) {
            let peer = note(&st, &format!("peer {}", p.node.name())).unwrap_or_default();
            let endpoint = format!("endpoint {}:{PORT}", p.node.address());
            assert!(peer.contains("rx ") && peer.contains(&endpoint), "{peer}");
        }
        let private = std::fs::read_to_string(m.key_file()).expect("key file");
        let text = String::from_utf8_lossy(&converge(&m.node, &["status"]).stdout).into_owned();
        assert!(
            text.contains(&m.public_key),
            "text status shows the key: {text}"
        );
        assert!(text.contains("last handshake"), "{text}");
        for shown in [text, status(&m.node).to_string()] {
            assert!(!shown.contains(private.trim()), "private key in status");
        }
    }

    // kill -9 of A's agent and a restart: the interface is adopted, no peer is touched.
    let go_pids = wireguard_go_pids(&a.iface);
    assert_eq!(go_pids.len(), 1, "one wireguard-go for {}", a.iface);
    let handshakes = a.wg("latest-handshakes");
    let transfer = a.wg("transfer");
    assert_eq!(handshakes.len(), 2, "{handshakes:?}");
    let mut a = a;
    let mut agent = a.agent.take().expect("agent");
    let pid = agent.pid();
    agent.kill().expect("kill -9 the agent");
    let _ = agent.wait();
    assert!(!pid_alive(pid));
    assert_eq!(
        wireguard_go_pids(&a.iface),
        go_pids,
        "wireguard-go outlives the agent"
    );
    let before = reconciler(&status(&a.node), "wireguard")["lastPass"].clone();
    a.agent = Some(start_agent(&a.node, RESYNC));
    wait_until(Duration::from_secs(20), "a pass of the new agent", || {
        let r = reconciler(&status(&a.node), "wireguard");
        r["lastPass"] != before && r["state"] == "Converged"
    });
    assert_eq!(
        wireguard_go_pids(&a.iface),
        go_pids,
        "the restarted agent adopts wireguard-go"
    );
    assert_eq!(
        a.wg("latest-handshakes"),
        handshakes,
        "no session was reset"
    );
    for (key, t) in a.wg("transfer") {
        let old = &transfer[&key];
        let n = |s: &str| -> Vec<u64> { s.split('\t').map(|x| x.parse().unwrap_or(0)).collect() };
        assert!(
            n(&t).iter().zip(n(old)).all(|(now, then)| *now >= then),
            "counters of {key} not reset: {old} -> {t}"
        );
    }
    for to in [&b, &c] {
        assert!(
            a.pings(to.v4()),
            "A reaches {} after the restart",
            to.node.name()
        );
    }

    // Removing C from A's document stops A–C traffic only; restoring it restores it.
    let b_handshake = handshakes[&b.public_key].clone();
    push_ok(&a.node, &a.doc(2, &[&b]));
    wait_converged(&a, 2);
    assert!(!a.wg("latest-handshakes").contains_key(&c.public_key));
    assert!(!a.pings(c.v4()), "A no longer reaches C");
    assert!(!c.pings(a.v4()), "C no longer reaches A");
    assert!(!a.pings(c.v6()), "A no longer reaches C over IPv6");
    assert!(a.pings(b.v4()), "A still reaches B");
    assert_eq!(
        a.wg("latest-handshakes")[&b.public_key],
        b_handshake,
        "B's session untouched by C's removal"
    );
    push_ok(&a.node, &a.doc(3, &[&b, &c]));
    wait_converged(&a, 3);
    wait_pings(&a, c.v4());
    wait_pings(&c, a.v6());
    assert_eq!(
        a.wg("latest-handshakes")[&b.public_key],
        b_handshake,
        "B's session untouched by C's return"
    );

    // Key rotation while the agent runs: applied at once (the agent watches the key
    // file), not at the next resync; the peers reach A again once they have the new key.
    let out = converge(&a.node, &["wireguard", "rotate-key"]);
    assert!(
        out.status.success(),
        "rotate-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let old_key = std::mem::replace(
        &mut a.public_key,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    );
    assert_ne!(old_key, a.public_key);
    wait_until(
        Duration::from_secs(5),
        "the new key on the interface",
        || a.node.run_ok("wg", ["show", &a.iface, "public-key"]).trim() == a.public_key,
    );
    wait_until(Duration::from_secs(5), "the new key in status", || {
        reconciler(&status(&a.node), "wireguard")["objects"]
            .to_string()
            .contains(&a.public_key)
    });
    push_ok(&b.node, &b.doc(2, &[&a, &c]));
    push_ok(&c.node, &c.doc(2, &[&a, &b]));
    wait_pings(&a, b.v4());
    wait_pings(&c, a.v6());
}

#[test]
fn churn_of_one_peer_through_the_agent_loses_no_packet_of_another() {
    for tool in ["wireguard-go", "wg", "ping"] {
        require_tool(tool);
    }
    let [a, b, c] = [1, 2, 3].map(|n| mesh_node("c", n, RESYNC));
    // C does not know A: it never answers A's handshakes, so A never treats C's endpoint
    // as roamed and every endpoint change is applied.
    push_ok(&a.node, &a.doc(1, &[&b]));
    push_ok(&b.node, &b.doc(1, &[&a, &c]));
    push_ok(&c.node, &c.doc(1, &[&b]));
    wait_converged(&a, 1);
    wait_pings(&a, b.v4());
    let c_peer = |i: u32| -> (Value, (String, Vec<String>, String)) {
        let endpoint = format!("{}:{}", c.node.address(), PORT + (i % 2) as u16);
        let mut allowed = vec![
            format!("{}/32", c.v4()),
            format!("10.77.{}.0/24", 10 + i % 5),
        ];
        allowed.sort();
        let mut v = json!({
            "name": c.node.name(),
            "publicKey": c.public_key,
            "endpoint": endpoint,
            "allowedIps": allowed,
        });
        let keepalive = if i % 2 == 0 {
            v["persistentKeepalive"] = json!(25);
            "25"
        } else {
            "off"
        };
        (v, (endpoint, allowed, keepalive.to_string()))
    };

    // Started once a reply came back: the A-B session carries it from here on.
    let ping = LivePing::start(&a, b.v4());
    let before = wg_dump(&a)[&b.public_key].clone();
    let started = Instant::now();
    let mut generation = 1;
    for i in 0..100 {
        for step in [Some(i), Some(i + 1), None] {
            generation += 1;
            let (extra, want) = step.map(c_peer).unzip();
            push_ok(&a.node, &a.doc_with(generation, &[&b], extra));
            wait_converged(&a, generation);
            // Really applied, field by field, before the next push.
            let have = wg_dump(&a)
                .get(&c.public_key)
                .map(|p| (p.endpoint.clone(), p.allowed.clone(), p.keepalive.clone()));
            assert_eq!(have, want, "C on A after generation {generation}");
        }
    }
    let churn = started.elapsed();
    let after = wg_dump(&a)[&b.public_key].clone();
    // The replies to the pings sent during the churn.
    ping.settle(&a.node, Duration::from_secs(5));
    let (sent, lost) = ping.stop();
    let pushes = generation - 1;
    eprintln!(
        "churn: {pushes} generations pushed and converged in {churn:.2?} ({:.1} pushes/s); ping A->B every 5 ms: {sent} sent, {} lost",
        f64::from(pushes as u32) / churn.as_secs_f64(),
        lost.len()
    );
    assert!(lost.is_empty(), "A-B packets lost: icmp_seq {lost:?}");
    assert_eq!(
        after.handshake, before.handshake,
        "A-B latest handshake changed (reset)"
    );
    assert!(
        after.rx > before.rx && after.tx > before.tx,
        "A-B transfer counters only grow: {before:?} -> {after:?}"
    );
    assert_eq!(
        (&after.endpoint, &after.allowed, &after.keepalive),
        (&before.endpoint, &before.allowed, &before.keepalive),
        "B's peer entry on A untouched"
    );
    assert!(
        !wg_dump(&a).contains_key(&c.public_key),
        "C gone at the end"
    );
    let routes = a.node.run_ok("ip", ["route", "show", "proto", "156"]);
    assert!(
        !routes.contains("10.77.0.3") && !routes.contains("10.77.1"),
        "C's routes gone: {routes}"
    );
}

/// The passes the node's wireguard reconciler has run, from the agent's metrics.
fn passes(m: &Mesh) -> u64 {
    let body = m.node.in_netns(|| {
        let mut s = TcpStream::connect(METRICS).expect("connect to metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        body
    });
    body.lines()
        .find_map(|l| {
            l.strip_prefix("converge_pass_duration_seconds_count{reconciler=\"wireguard\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no wireguard pass count in {body}"))
}

/// Polls `done` (10 s at most) and prints how long the repair took.
fn repaired(what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    wait_until(Duration::from_secs(10), what, &mut done);
    eprintln!("drift: {what} after {:.2?}", t.elapsed());
}

/// Whether A's interface has everything its document gives it towards `b`: up, both
/// addresses, both routes, B as a peer with its allowed IPs and no keepalive.
fn complete(a: &Mesh, b: &Mesh) -> bool {
    let run = |args: &[&str]| {
        let out = a.node.run("ip", args);
        if out.status.success() {
            String::from_utf8_lossy(&out.stdout).into_owned()
        } else {
            String::new()
        }
    };
    let addrs = run(&["addr", "show", "dev", &a.iface]);
    let up = addrs.lines().next().is_some_and(|l| l.contains(",UP"));
    let routes = run(&["route", "show", "proto", "156", "dev", &a.iface])
        + &run(&["-6", "route", "show", "proto", "156", "dev", &a.iface]);
    let out = a.node.run("wg", ["show", &a.iface, "dump"]);
    let peer_ok = out.status.success() && {
        let want = {
            let mut v = vec![format!("{}/32", b.v4()), format!("{}/128", b.v6())];
            v.sort();
            v
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .any(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                let mut allowed: Vec<String> = f
                    .get(3)
                    .unwrap_or(&"")
                    .split(',')
                    .map(String::from)
                    .collect();
                allowed.sort();
                f[0] == b.public_key && allowed == want && f.get(7) == Some(&"off")
            })
    };
    up && addrs.contains(&format!("{}/24", a.v4()))
        && addrs.contains(&format!("{}/64", a.v6()))
        && routes.contains(&format!("{} ", b.v4()))
        && routes.contains(&format!("{} ", b.v6()))
        && peer_ok
}

#[test]
fn drift_through_the_agent_is_repaired_within_seconds() {
    for tool in ["wireguard-go", "wg", "ping", "ip"] {
        require_tool(tool);
    }
    let args = [NO_RESYNC, &["--metrics-listen", METRICS]].concat();
    let mut a = mesh_node("d", 1, &args);
    let b = mesh_node("d", 2, &args);
    push_ok(&a.node, &a.doc(1, &[&b]));
    // B learns A's endpoint from A's handshakes (roaming).
    let roaming = |mut doc: Value| {
        for p in doc["wireguard"]["peers"].as_array_mut().expect("peers") {
            p.as_object_mut().expect("peer").remove("endpoint");
        }
        doc
    };
    push_ok(&b.node, &roaming(b.doc(1, &[&a])));
    wait_converged(&a, 1);
    wait_converged(&b, 1);

    // Traffic from the first packet on (a handshake, counters moving, B learning A's
    // endpoint) runs no pass on either node: the device watch compares no statistics
    // and no endpoint the document does not set.
    let before = [passes(&a), passes(&b)];
    let ping = LivePing::start(&a, b.v4());
    wait_until(Duration::from_secs(20), "5 s of pings", || {
        ping.last_answered() >= 1000
    });
    ping.stop();
    let learned = b.wg("endpoints");
    assert_eq!(
        learned.get(&a.public_key).map(String::as_str),
        Some(format!("{}:{PORT}", a.node.address()).as_str()),
        "B learned A's endpoint"
    );
    assert!(wg_dump(&b)[&a.public_key].rx > 0);
    assert_eq!(
        [passes(&a), passes(&b)],
        before,
        "no pass during traffic and roaming"
    );
    wait_pings(&a, b.v4());
    wait_pings(&a, b.v6());
    assert!(complete(&a, &b));

    // With a 300 s resync, what the netlink watch reports is repaired at once.
    let iface = a.iface.clone();
    for (what, cmd) in [
        (
            "IPv4 address deleted",
            vec!["addr", "del", "10.77.0.1/24", "dev", &iface],
        ),
        (
            "IPv6 address deleted",
            vec!["-6", "addr", "del", "fd00:77::1/64", "dev", &iface],
        ),
        (
            "route deleted",
            vec!["route", "del", "10.77.0.2/32", "dev", &iface],
        ),
        (
            "IPv6 route deleted",
            vec!["-6", "route", "del", "fd00:77::2/128", "dev", &iface],
        ),
        ("interface set down", vec!["link", "set", &iface, "down"]),
        ("interface deleted", vec!["link", "del", &iface]),
    ] {
        let pids = wireguard_go_pids(&a.iface);
        // Succeeds, so the drift happened (the repair may be done before a check here).
        a.node.run_ok("ip", &cmd);
        repaired(what, || complete(&a, &b));
        if what == "interface deleted" {
            wait_until(Duration::from_secs(5), "a new wireguard-go", || {
                let now = wireguard_go_pids(&a.iface);
                now.len() == 1 && now != pids
            });
        }
        wait_pings(&a, b.v4());
        wait_pings(&a, b.v6());
    }

    // wireguard-go killed: its TUN device goes with it, which the watch reports.
    let pids = wireguard_go_pids(&a.iface);
    assert_eq!(pids.len(), 1, "one wireguard-go");
    // SAFETY: kill -9 of the wireguard-go serving this test's interface.
    unsafe { libc::kill(pids[0] as libc::pid_t, libc::SIGKILL) };
    wait_until(Duration::from_secs(5), "wireguard-go gone", || {
        !pid_alive(pids[0])
    });
    repaired("wireguard-go killed", || {
        let now = wireguard_go_pids(&a.iface);
        now.len() == 1 && now != pids && complete(&a, &b)
    });
    wait_pings(&a, b.v4());
    wait_converged(&a, 1);

    // A peer removed or changed with `wg set` makes no netlink event: the device watch
    // (a look every second) sees it and the pass it asks for repairs it, with the
    // resync 300 s away.
    a.node
        .run_ok("wg", ["set", &a.iface, "peer", &b.public_key, "remove"]);
    repaired("peer removed with wg set", || complete(&a, &b));
    wait_pings(&a, b.v4());
    a.node.run_ok(
        "wg",
        [
            "set",
            &a.iface,
            "peer",
            &b.public_key,
            "allowed-ips",
            "10.77.9.9/32",
            "persistent-keepalive",
            "7",
        ],
    );
    repaired("peer changed with wg set", || complete(&a, &b));
    wait_pings(&a, b.v4());
    wait_pings(&a, b.v6());

    // The document renames A's interface: the new one is created (with a key of its
    // own), the old one deleted, and its wireguard-go exits with its device.
    let old_iface = a.iface.clone();
    let old_pids = wireguard_go_pids(&old_iface);
    a.iface = format!("{old_iface}r");
    push_ok(&a.node, &a.doc(2, &[&b]));
    wait_converged(&a, 2);
    assert!(
        !a.node
            .run("ip", ["link", "show", &old_iface])
            .status
            .success(),
        "{old_iface} deleted"
    );
    wait_until(Duration::from_secs(5), "the old wireguard-go exits", || {
        old_pids.iter().all(|p| !pid_alive(*p))
    });
    a.public_key = a
        .node
        .run_ok("wg", ["show", &a.iface, "public-key"])
        .trim()
        .to_string();
    push_ok(&b.node, &b.doc(2, &[&a]));
    wait_pings(&a, b.v4());
}
