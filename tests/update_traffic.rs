//! Agent updates and rollbacks under traffic (issue 25: "containers, tunnels, routes and
//! DNS keep serving throughout"). A proxy node and a worker meshed over WireGuard (real
//! wireguard-go); a busybox httpd container on the worker published by its firewall; two
//! Caddy routes on the proxy to it over the mesh (requests on A, an upgraded stream held
//! on B); the worker's DNS section served by dnsmasq. While clients send requests
//! through the proxy (a new connection each, HTTP/1.1 keep-alive with and without
//! retries, HTTP/2), hold the stream, ping the worker's mesh address from the proxy
//! 5 times a second and query the worker's dnsmasq 20 times a second, on both nodes at
//! once:
//! - **update**: the agent is stopped with SIGTERM (as systemd stops it), and another
//!   build (a copy of the binary with bytes appended) is started with the same data dir
//!   and flags, and waited for until it reports ready (every first pass done);
//! - **rollback**: that agent is stopped, a broken build (a script that exits 1) is
//!   started and seen to fail, and the previous build is started again until ready.
//!
//! No systemd runs here: the daemons converge started (the Caddy pair, wireguard-go,
//! dnsmasq, conmon) are detached and serve while no agent runs; the new agent adopts
//! them (same pids afterwards). Failed requests, broken streams, lost pings and failed
//! DNS answers are printed per phase and must all be 0; how long each node was without
//! an agent is printed (not asserted). A baseline phase (no agent touched) is the
//! control.
//!
//! Found by this test (2026-12-07) and fixed since: restarting the worker's agent alone
//! made requests to the container behind its published port fail for a moment (Caddy
//! answered 502) because the new agent's first firewall pass ran before the containers
//! reconciler had published the container addresses (facts); a published port whose
//! container the facts do not know yet now keeps its DNAT target in force.

mod common;

use common::agent::{data, push_ok, reconciler};
use common::dnsq::query;
use common::mesh::{
    caddy_bin, caddy_dir, caddy_version, https_get, key, mesh_addr, peer, proxy_agent_args,
    proxy_doc, start_proxy_agent_bin, worker_agent_args, worker_doc, WG_PORT,
};
use common::podman::start_podman;
use common::sandbox::{converge_bin, require_tool, wait_until, Spawned, TestNode};
use hickory_proto::rr::RecordType;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The build the test started from, copied at its start: `converge status` runs from
/// this copy, so a rebuild of the cargo binary during the run changes nothing here.
static CLI: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// `converge status --output json` of the node, run by the copied build.
fn status(node: &TestNode) -> Value {
    let out = node
        .command(CLI.get().expect("CLI set"))
        .arg("--data-dir")
        .arg(data(node))
        .args(["status", "--output", "json"])
        .stdin(Stdio::null())
        .output()
        .expect("converge status");
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status json")
}

/// One node's agent: the build it runs, its flags, the process.
struct Agent {
    bin: PathBuf,
    args: Vec<String>,
    proxy: bool,
    child: Spawned,
}

impl Agent {
    fn start(node: &TestNode, bin: &Path, args: &[String], proxy: bool) -> Agent {
        let child = if proxy {
            start_proxy_agent_bin(node, bin, args)
        } else {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            common::agent::start_agent_bin(node, bin, &a)
        };
        Agent {
            bin: bin.to_path_buf(),
            args: args.to_vec(),
            proxy,
            child,
        }
    }

    /// SIGTERM, as `systemctl stop` sends it; returns when the agent has exited (0).
    fn stop(&mut self) -> Instant {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.child.pid() as libc::pid_t, libc::SIGTERM) };
        let st = self.child.wait().expect("wait for the agent");
        assert!(st.success(), "the agent exits 0 on SIGTERM: {st}");
        Instant::now()
    }

    /// Starts `bin` with this agent's flags and waits until it reports ready.
    fn restart_with(&mut self, node: &TestNode, bin: &Path) {
        let next = Agent::start(node, bin, &self.args, self.proxy);
        *self = next;
        let pid = self.child.pid();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = status(node);
            if st["agent"] == "running"
                && st["agentInfo"]["pid"] == pid
                && st["agentInfo"]["ready"] == true
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the new agent (pid {pid}) not ready within 60 s: {st}",
                node.name()
            );
            // `converge status` is a process: ask every 50 ms.
            std::thread::sleep(Duration::from_millis(50));
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("agent exe");
        assert_eq!(exe, bin, "the agent runs the build it was started from");
    }
}

/// An update of one node: stop, start `next`, wait until ready. Returns the time the node
/// had no agent (exit of the old one until the new one reported ready).
fn update(node: &TestNode, agent: &mut Agent, next: &Path) -> Duration {
    let gone = agent.stop();
    agent.restart_with(node, next);
    gone.elapsed()
}

/// A failed update of one node: stop, the broken build fails, the previous build (the
/// one that ran) is started again and waited for. Returns the time without an agent.
fn rollback(node: &TestNode, agent: &mut Agent, broken: &Path) -> Duration {
    let previous = agent.bin.clone();
    let gone = agent.stop();
    let out = node
        .command(broken)
        .arg("--data-dir")
        .arg(data(node))
        .args(["agent", "--node-id", node.name()])
        .args(&agent.args)
        .stdin(Stdio::null())
        .output()
        .expect("run the broken build");
    assert_eq!(
        out.status.code(),
        Some(1),
        "the broken build fails: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.restart_with(node, &previous);
    gone.elapsed()
}

/// The daemons running in the node's namespace (name, pid): Caddy, wireguard-go,
/// dnsmasq, conmon. An agent that adopts them leaves this set unchanged.
fn daemons(node: &TestNode) -> BTreeSet<(String, u32)> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", node.netns_name()])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let comm = comm.trim().to_string();
            ["caddy", "wireguard-go", "dnsmasq", "conmon"]
                .contains(&comm.as_str())
                .then_some((comm, pid))
        })
        .collect()
}

/// What one phase's traffic saw.
struct Figures {
    http: Value,
    pings_sent: u64,
    pings_lost: u64,
    dns_queries: u64,
    dns_failed: u64,
    dns_failures: Vec<String>,
}

/// Traffic from the proxy node for the length of one phase.
struct Traffic {
    stopfile: PathBuf,
    outfile: PathBuf,
    _client: Spawned,
    ping: Spawned,
    ping_out: PathBuf,
    stop_dns: Arc<AtomicBool>,
    dns: std::thread::JoinHandle<(u64, u64, Vec<String>)>,
}

impl Traffic {
    fn start(px: &TestNode, w: &TestNode, phase: &str) -> Traffic {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/routes_traffic.py");
        let ca = caddy_dir(px).join("data/caddy/pki/authorities/local/root.crt");
        let stopfile = px.data_dir().join(format!("{phase}.stop"));
        let outfile = px.data_dir().join(format!("{phase}.json"));
        let mut cmd = px.command("python3");
        cmd.arg(&script)
            .args(["client", "127.0.0.1", "443", "a.test", "b.test"])
            .arg(&ca)
            .arg(&stopfile)
            .arg(&outfile);
        let client = px.spawn(&mut cmd);
        let ready = PathBuf::from(format!("{}.ready", outfile.display()));
        wait_until(Duration::from_secs(30), "stream on B up", || ready.exists());

        let ping_out = px.data_dir().join(format!("{phase}.ping"));
        let log = std::fs::File::create(&ping_out).expect("ping log");
        let ping = px.spawn(
            px.command("ping")
                .args(["-n", "-i", "0.2", &mesh_addr(2)])
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(Stdio::null()),
        );

        let stop_dns = Arc::new(AtomicBool::new(false));
        let sock = px.in_netns(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
        let server = SocketAddr::new(w.address().into(), 53);
        let want = vec![mesh_addr(2)];
        let stop = stop_dns.clone();
        let dns = std::thread::spawn(move || {
            let (mut sent, mut failed, mut why) = (0u64, 0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                sent += 1;
                let ans = query(
                    &sock,
                    server,
                    "web.internal",
                    RecordType::A,
                    Duration::from_secs(1),
                );
                let ok = matches!(&ans, Ok(a) if a.values == want);
                if !ok {
                    failed += 1;
                    if why.len() < 10 {
                        why.push(format!("{ans:?}"));
                    }
                }
                // Pacing: a query every 50 ms.
                std::thread::sleep(Duration::from_millis(50));
            }
            (sent, failed, why)
        });
        Traffic {
            stopfile,
            outfile,
            _client: client,
            ping,
            ping_out,
            stop_dns,
            dns,
        }
    }

    fn stop(mut self) -> Figures {
        // A second more, so that a loss at the very end shows as a gap before a reply.
        std::thread::sleep(Duration::from_secs(1));
        std::fs::write(&self.stopfile, "").expect("stop file");
        self.stop_dns.store(true, Ordering::Relaxed);
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.ping.pid() as libc::pid_t, libc::SIGINT) };
        let _ = self.ping.wait();
        let (dns_queries, dns_failed, dns_failures) = self.dns.join().expect("dns thread");
        wait_until(Duration::from_secs(30), "client summary", || {
            self.outfile.exists()
        });
        let http: Value =
            serde_json::from_str(&std::fs::read_to_string(&self.outfile).expect("summary"))
                .expect("summary json");
        // Replies by sequence number; a sequence number below the last reply without
        // a reply of its own was lost (the last ones may still be in flight).
        let text = std::fs::read_to_string(&self.ping_out).expect("ping output");
        let replies: BTreeSet<u64> = text
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        let last = replies.last().copied().unwrap_or(0);
        Figures {
            http,
            pings_sent: last,
            pings_lost: (1..=last).filter(|s| !replies.contains(s)).count() as u64,
            dns_queries,
            dns_failed,
            dns_failures,
        }
    }
}

/// Runs `op` on both nodes at once under traffic; returns the figures and each node's
/// time without an agent.
fn phase(
    name: &str,
    px: &TestNode,
    w: &TestNode,
    agents: (&mut Agent, &mut Agent),
    op: impl Fn(&TestNode, &mut Agent) -> Duration + Sync,
) -> (Figures, Duration, Duration) {
    let before = (daemons(px), daemons(w));
    let traffic = Traffic::start(px, w, name);
    // Some traffic before the agents stop, as a baseline.
    std::thread::sleep(Duration::from_secs(1));
    let (gap_p, gap_w) = std::thread::scope(|s| {
        let (ap, aw) = agents;
        let op = &op;
        let p = s.spawn(move || op(px, ap));
        let w = s.spawn(move || op(w, aw));
        (p.join().expect("proxy"), w.join().expect("worker"))
    });
    let figures = traffic.stop();
    assert_eq!(
        (daemons(px), daemons(w)),
        before,
        "{name}: the daemons were adopted, not restarted"
    );
    (figures, gap_p, gap_w)
}

fn http_failed(f: &Figures) -> u64 {
    [
        "failed",
        "ka_failed",
        "kr_failed",
        "h2_failed",
        "stream_broken",
    ]
    .iter()
    .map(|k| f.http[k].as_u64().unwrap_or(u64::MAX))
    .sum()
}

#[test]
fn daemons_keep_serving_through_agent_update_and_rollback() {
    for tool in [
        "wireguard-go",
        "wg",
        "curl",
        "podman",
        "python3",
        "dnsmasq",
        "ping",
    ] {
        require_tool(tool);
    }
    let caddy = caddy_bin();
    let version = caddy_version(&caddy);
    let px = TestNode::new("upp");
    let w = TestNode::new("upw");
    let (if_p, key_p) = key(&px, "p");
    let (if_w, key_w) = key(&w, "w");
    let svc = start_podman(&w);

    // The builds: the one cargo built, another (the same plus bytes, so a different
    // file and checksum) and a broken one that exits 1 at once.
    let builds = px.data_dir().join("builds");
    std::fs::create_dir_all(&builds).expect("builds dir");
    let first = builds.join("converge-1");
    let second = builds.join("converge-2");
    let broken = builds.join("converge-broken");
    let mut bytes = std::fs::read(converge_bin()).expect("read build");
    std::fs::write(&first, &bytes).expect("write build 1");
    bytes.extend_from_slice(b"\0converge build 2\0");
    std::fs::write(&second, &bytes).expect("write build 2");
    std::fs::write(&broken, "#!/bin/sh\necho 'broken build' >&2\nexit 1\n").expect("broken");
    for b in [&first, &second, &broken] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(b, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    CLI.set(first.clone()).expect("CLI set once");

    let secrets = px.data_dir().join("secrets");
    std::fs::create_dir_all(&secrets).expect("secrets");
    let mut ag_w = Agent::start(&w, &first, &worker_agent_args(&svc), false);
    let mut ag_p = Agent::start(
        &px,
        &first,
        &proxy_agent_args(&caddy, &secrets, "2", &[]),
        true,
    );

    let mut wdoc = worker_doc(&w, &if_w, 2, peer(&px, &key_p, 1));
    wdoc["dns"] = json!({
        "zone": "internal", "listen": [w.address().to_string()], "port": 53, "ttl": 5,
        "records": [{"name": "web.internal", "type": "A", "values": [mesh_addr(2)]}],
    });
    push_ok(&w, &wdoc);
    let mut pdoc = proxy_doc(
        &px,
        1,
        json!([
            {"name": "a", "hosts": ["a.test"], "tls": "internal",
             "upstreams": [{"peer": w.name(), "port": 8080}]},
            {"name": "b", "hosts": ["b.test"], "tls": "internal",
             "upstreams": [{"address": format!("{}:9000", mesh_addr(2))}]},
        ]),
    );
    pdoc["wireguard"] = json!({
        "interface": if_p,
        "listenPort": WG_PORT,
        "addresses": [format!("{}/24", mesh_addr(1))],
        "peers": [peer(&w, &key_w, 2)],
    });
    push_ok(&px, &pdoc);
    wait_until(Duration::from_secs(120), "worker converged", || {
        let st = status(&w);
        ["containers", "wireguard", "firewall", "dns"]
            .iter()
            .all(|n| {
                let r = reconciler(&st, n);
                r["state"] == "Converged" && r["observedGeneration"] == 1
            })
    });
    wait_until(Duration::from_secs(90), "routes converged", || {
        let r = reconciler(&status(&px), "routes");
        r["state"] == "Converged" && r["observedGeneration"] == 1
    });
    // The stream server behind route B, on the worker.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/routes_traffic.py");
    w.spawn(
        w.command("python3")
            .arg(&script)
            .args(["stream-server", "9000"]),
    );
    wait_until(Duration::from_secs(60), "a.test reaches the worker", || {
        https_get(&px, "a.test", "127.0.0.1").is_some_and(|b| b.trim() == w.name())
    });

    let (base, _, _) = phase("baseline", &px, &w, (&mut ag_p, &mut ag_w), |_, _| {
        // Nothing happens: a second more of traffic to compare the other phases with.
        std::thread::sleep(Duration::from_secs(1));
        Duration::ZERO
    });
    let (upd, upd_p, upd_w) = phase("update", &px, &w, (&mut ag_p, &mut ag_w), |n, a| {
        update(n, a, &second)
    });
    let (rb, rb_p, rb_w) = phase("rollback", &px, &w, (&mut ag_p, &mut ag_w), |n, a| {
        rollback(n, a, &broken)
    });

    eprintln!("caddy {version}: both nodes at once; traffic from the proxy node");
    eprintln!(
        "| phase | proxy without agent | worker without agent | HTTP new conn (failed/sent) | keep-alive | keep-alive+retry | HTTP/2 | stream B broken | pings lost/sent | DNS failed/sent |"
    );
    eprintln!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, f, gp, gw) in [
        ("baseline", &base, Duration::ZERO, Duration::ZERO),
        ("update", &upd, upd_p, upd_w),
        ("rollback", &rb, rb_p, rb_w),
    ] {
        let h = &f.http;
        eprintln!(
            "| {name} | {:.2} s | {:.2} s | {}/{} | {}/{} | {}/{} (retried {}) | {}/{} | {} | {}/{} | {}/{} |",
            gp.as_secs_f64(),
            gw.as_secs_f64(),
            h["failed"],
            h["requests"],
            h["ka_failed"],
            h["ka_requests"],
            h["kr_failed"],
            h["kr_requests"],
            h["kr_retried"],
            h["h2_failed"],
            h["h2_requests"],
            h["stream_broken"],
            f.pings_lost,
            f.pings_sent,
            f.dns_failed,
            f.dns_queries,
        );
    }
    for (name, f) in [("update", &upd), ("rollback", &rb)] {
        for k in ["requests", "ka_requests", "kr_requests", "h2_requests"] {
            assert!(
                f.http[k].as_u64().unwrap_or(0) > 0,
                "{name}: {k} sent: {}",
                f.http
            );
        }
        assert!(
            f.pings_sent > 0 && f.dns_queries > 0,
            "{name}: pings and DNS queries sent"
        );
        assert_eq!(http_failed(f), 0, "{name}: no request failed: {}", f.http);
        assert_eq!(f.pings_lost, 0, "{name}: no ping lost");
        assert_eq!(
            f.dns_failed, 0,
            "{name}: no DNS query failed: {:?}",
            f.dns_failures
        );
    }
    // Everything still converged at the same generations, under the rolled-back build.
    let st = status(&w);
    for n in ["containers", "wireguard", "firewall", "dns"] {
        let r = reconciler(&st, n);
        assert!(
            r["state"] == "Converged" && r["observedGeneration"] == 1,
            "worker {n}: {r}"
        );
    }
    wait_until(Duration::from_secs(90), "routes converged", || {
        let r = reconciler(&status(&px), "routes");
        r["state"] == "Converged" && r["observedGeneration"] == 1
    });
    assert_eq!(ag_p.bin, second);
    assert_eq!(ag_w.bin, second);
}
