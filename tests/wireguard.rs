//! WireGuard reconciler end to end through the real agent: three sandbox nodes, each with
//! its own agent and wireguard-go, meshed by their documents. Every node pings every
//! other over the tunnel (IPv4 and IPv6); status reports the public key and the peers,
//! never a private key; kill -9 of an agent and a restart adopt the running interface
//! without touching a peer; removing a peer stops its traffic and restoring it restores
//! it, without disturbing the other peer's session; `converge wireguard rotate-key` is
//! applied by the running agent at once.

mod common;

use common::agent::{converge, data, push_ok, reconciler, start_agent, status};
use common::sandbox::{pid_alive, require_tool, wait_until, Spawned, TestNode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

const PORT: u16 = 51820;
/// Frequent resyncs: status (peer handshakes) follows within seconds, and every pass
/// during the test must leave the sessions alone.
const RESYNC: &[&str] = &["--resync-secs", "2"];

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
        json!({
            "apiVersion": "converge/v1",
            "node": {"id": self.node.name(), "mode": "worker"},
            "generation": generation,
            "issuedAt": "2026-11-24T10:00:00Z",
            "wireguard": {
                "interface": self.iface,
                "listenPort": PORT,
                "addresses": [format!("{}/24", self.v4()), format!("{}/64", self.v6())],
                "peers": peers.iter().map(|p| p.peer()).collect::<Vec<_>>(),
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
/// agent runs), checked against `wg pubkey` of the key file.
fn mesh_node(n: u8) -> Mesh {
    let letter = char::from(b'a' + n - 1);
    let node = TestNode::new(&format!("wg{letter}"));
    let iface = format!("wg-{}-{letter}", std::process::id());
    let out = converge(&node, &["wireguard", "rotate-key", "--interface", &iface]);
    assert!(
        out.status.success(),
        "rotate-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public_key = String::from_utf8_lossy(&out.stdout).trim().to_string();
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
    m.agent = Some(start_agent(&m.node, RESYNC));
    m
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

/// The pids of the wireguard-go serving `iface` (its command line is `wireguard-go <iface>`).
fn wireguard_go_pids(iface: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.first().is_some_and(|p| p.ends_with(b"wireguard-go"))
            && args.get(1) == Some(&iface.as_bytes())
        {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids
}

#[test]
fn three_nodes_mesh_restart_adopts_and_peers_change_one_by_one() {
    for tool in ["wireguard-go", "wg", "ping"] {
        require_tool(tool);
    }
    let [a, b, c] = [mesh_node(1), mesh_node(2), mesh_node(3)];
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
