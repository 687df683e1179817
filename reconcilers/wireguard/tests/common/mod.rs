//! Test nodes for the WireGuard tests: network namespaces joined by a veth pair, each
//! with a thread inside it that runs the real driver (wireguard-go, rtnetlink) on a
//! current-thread runtime. `wg` and `ip` are used only as independent oracles and to
//! make drift. Everything is torn down on drop, also when a test panics.

#![allow(dead_code)]

use converge_core::{Facts, Plan, Reconciler};
use converge_wireguard::{
    Action, Config, PublicKey, System, SystemConfig, WireguardPeer, WireguardReconciler,
    WireguardSpec,
};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

pub type Rec = WireguardReconciler<System>;

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn unique() -> String {
    format!(
        "{}{}",
        std::process::id() % 1000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    out
}

pub fn ok(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

type Job = Box<dyn FnOnce(&mut Ctx) -> Pin<Box<dyn Future<Output = ()> + '_>> + Send>;

/// What a node's thread keeps.
pub struct Ctx {
    pub rec: Arc<Rec>,
    pub config: Config,
}

impl Ctx {
    /// A new reconciler instance (an agent restart), with nothing kept.
    pub fn restart(&mut self) {
        self.rec = Arc::new(new_rec(&self.config));
    }
}

fn new_rec(config: &Config) -> Rec {
    let driver = System::new(SystemConfig::default()).expect("netlink sockets");
    WireguardReconciler::new(driver, config.clone())
}

/// One test node: a namespace, an interface name, a thread inside the namespace.
pub struct Node {
    pub ns: String,
    pub iface: String,
    pub underlay: String,
    pub dir: tempfile::TempDir,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    pub fn nsenter(&self, args: &[&str]) -> Output {
        let net = format!("--net=/run/netns/{}", self.ns);
        let mut all = vec!["nsenter", net.as_str()];
        all.extend_from_slice(args);
        sh(&all)
    }

    pub fn ns_ok(&self, args: &[&str]) -> String {
        let out = self.nsenter(args);
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.ns,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on the node's thread (inside its namespace) and returns its result.
    pub fn run<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a mut Ctx) -> Pin<Box<dyn Future<Output = T> + 'a>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |ctx| {
            Box::pin(async move {
                let v = f(ctx).await;
                let _ = tx.send(v);
            })
        });
        self.jobs
            .as_ref()
            .expect("node thread")
            .send(job)
            .expect("node thread alive");
        rx.recv_timeout(Duration::from_secs(120))
            .expect("node job finished (or panicked)")
    }

    /// Passes until converged; returns the first plan. Panics on failed actions or
    /// when it does not converge within 3 passes.
    pub fn converge(&self, spec: &WireguardSpec) -> Plan<Action> {
        let spec = spec.clone();
        self.run(move |ctx| Box::pin(async move { converge(&ctx.rec, &spec).await }))
    }

    /// One plan without applying it.
    pub fn plan(&self, spec: &WireguardSpec) -> Plan<Action> {
        let spec = spec.clone();
        self.run(move |ctx| {
            Box::pin(async move {
                let obs = ctx.rec.observe(&spec).await.expect("observe");
                ctx.rec.plan(&spec, &obs, &Facts::default())
            })
        })
    }

    pub fn public_key(&self) -> PublicKey {
        let out = self.ns_ok(&["wg", "show", &self.iface, "public-key"]);
        PublicKey::from_base64(out.trim()).expect("public key")
    }

    /// `wg show dump` peer lines: key → (endpoint, allowed, handshake, rx, tx, keepalive).
    pub fn wg_peers(&self) -> Vec<WgPeer> {
        let out = self.ns_ok(&["wg", "show", &self.iface, "dump"]);
        out.lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                WgPeer {
                    key: f[0].to_string(),
                    endpoint: f[2].to_string(),
                    allowed: f[3].to_string(),
                    handshake: f[4].parse().unwrap_or(0),
                    rx: f[5].parse().unwrap_or(0),
                    tx: f[6].parse().unwrap_or(0),
                    keepalive: f[7].to_string(),
                }
            })
            .collect()
    }

    pub fn wg_peer(&self, key: &PublicKey) -> Option<WgPeer> {
        let k = key.to_base64();
        self.wg_peers().into_iter().find(|p| p.key == k)
    }

    /// Sent and received of `ping -c count`.
    pub fn ping(&self, addr: &str, count: u32, interval: &str) -> (u32, u32) {
        let c = count.to_string();
        let out = self.nsenter(&[
            "ping", "-n", "-q", "-c", &c, "-i", interval, "-W", "1", addr,
        ]);
        parse_ping(&String::from_utf8_lossy(&out.stdout))
    }

    /// The pid of this node's wireguard-go, if one runs.
    pub fn wireguard_go_pid(&self) -> Option<u32> {
        wireguard_go_pids(&self.iface).into_iter().next()
    }

    /// Counter `name` of protocol `proto` in the node's `/proc/net/snmp` (e.g. `("Icmp",
    /// "InEchoReps")`): each protocol has a line of names, then one of values.
    pub fn snmp(&self, proto: &str, name: &str) -> u64 {
        let text = self.ns_ok(&["cat", "/proc/net/snmp"]);
        let prefix = format!("{proto}:");
        let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
        let (names, values) = (lines.next(), lines.next());
        names
            .and_then(|n| n.split_whitespace().position(|n| n == name))
            .and_then(|i| values?.split_whitespace().nth(i)?.parse().ok())
            .unwrap_or_else(|| panic!("no counter {proto} {name} in {text}"))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgPeer {
    pub key: String,
    pub endpoint: String,
    pub allowed: String,
    pub handshake: u64,
    pub rx: u64,
    pub tx: u64,
    pub keepalive: String,
}

pub fn parse_ping(text: &str) -> (u32, u32) {
    // "1000 packets transmitted, 1000 received, 0% packet loss, time 5004ms"
    for l in text.lines() {
        if let Some((sent, rest)) = l.split_once(" packets transmitted, ") {
            let recv = rest.split(' ').next().unwrap_or("0");
            return (sent.trim().parse().unwrap_or(0), recv.parse().unwrap_or(0));
        }
    }
    (0, 0)
}

pub async fn converge(rec: &Rec, spec: &WireguardSpec) -> Plan<Action> {
    let mut first = None;
    for _ in 0..3 {
        let obs = rec.observe(spec).await.expect("observe");
        let plan = rec.plan(spec, &obs, &Facts::default());
        drop(obs);
        if plan.is_empty() {
            return first.unwrap_or(plan);
        }
        let shown = plan.clone();
        let out = rec.apply(plan).await;
        let failed: Vec<_> = out.iter().filter(|o| o.error.is_some()).collect();
        assert!(failed.is_empty(), "failed actions: {failed:?}");
        first.get_or_insert(shown);
    }
    panic!("not converged after 3 passes");
}

/// wireguard-go processes serving `iface` (by their command line): the driver's own
/// finder, a /proc scan (`converge_core::host::find`).
pub use converge_wireguard::driver::wireguard_go_pids;

/// Two or more namespaces on one veth "switch" (a bridge namespace would be more
/// general; a chain of veth pairs from node 0 is enough for these tests).
pub struct Mesh {
    pub nodes: Vec<Node>,
    hub: Option<String>,
}

impl Mesh {
    /// `n` nodes: namespaces `cvgwg-<x>-<i>`, underlay 10.98.<x>.<i+1>/24 on veth pairs to
    /// a hub namespace with a bridge; interfaces `wg<x><i>`.
    pub fn new(n: usize, full_read_after: Duration) -> Mesh {
        let x = unique();
        let hub = format!("cvgwg-{x}-hub");
        ok(&["ip", "netns", "add", &hub]);
        let mut mesh = Mesh {
            nodes: Vec::new(),
            hub: Some(hub.clone()),
        };
        let hubnet = format!("--net=/run/netns/{hub}");
        ok(&[
            "nsenter", &hubnet, "ip", "link", "add", "br0", "type", "bridge",
        ]);
        ok(&["nsenter", &hubnet, "ip", "link", "set", "br0", "up"]);
        let oct = (SEQ.fetch_add(1, Ordering::Relaxed) % 200) + 20;
        for i in 0..n {
            let ns = format!("cvgwg-{x}-{i}");
            ok(&["ip", "netns", "add", &ns]);
            let (a, b) = (format!("cvh{x}{i}"), format!("cvn{x}{i}"));
            ok(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b]);
            ok(&["ip", "link", "set", &a, "netns", &hub]);
            ok(&["ip", "link", "set", &b, "netns", &ns]);
            ok(&[
                "nsenter", &hubnet, "ip", "link", "set", &a, "master", "br0", "up",
            ]);
            let net = format!("--net=/run/netns/{ns}");
            let underlay = format!("10.98.{oct}.{}", i + 1);
            ok(&[
                "nsenter",
                &net,
                "ip",
                "addr",
                "add",
                &format!("{underlay}/24"),
                "dev",
                &b,
            ]);
            ok(&["nsenter", &net, "ip", "link", "set", &b, "up"]);
            ok(&["nsenter", &net, "ip", "link", "set", "lo", "up"]);
            let iface = format!("wg{x}{i}");
            let dir = tempfile::tempdir().expect("tempdir");
            let mut config = Config::new(dir.path().join("data"), dir.path().join("secrets"));
            config.full_read_after = full_read_after;
            let (tx, rx) = mpsc::channel::<Job>();
            let path = format!("/run/netns/{ns}");
            let thread = std::thread::spawn(move || {
                let f = std::fs::File::open(&path).expect("netns file");
                // SAFETY: setns on this thread only, with a valid namespace descriptor.
                let r =
                    unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let mut ctx = Ctx {
                    rec: Arc::new(new_rec(&config)),
                    config,
                };
                while let Ok(job) = rx.recv() {
                    rt.block_on(job(&mut ctx));
                }
            });
            mesh.nodes.push(Node {
                ns,
                iface,
                underlay,
                dir,
                jobs: Some(tx),
                thread: Some(thread),
            });
        }
        mesh
    }

    /// Mesh addresses of node `i`.
    pub fn addr4(i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    pub fn addr6(i: usize) -> String {
        format!("fd00:77::{}", i + 1)
    }

    /// The section of node `i` with every other node as a peer (keys as given).
    pub fn spec(&self, i: usize, keys: &[PublicKey]) -> WireguardSpec {
        let peers = (0..self.nodes.len())
            .filter(|j| *j != i)
            .map(|j| WireguardPeer {
                name: format!("node{j}"),
                public_key: keys[j].to_base64(),
                endpoint: Some(format!("{}:{}", self.nodes[j].underlay, 51820)),
                allowed_ips: vec![
                    format!("{}/32", Self::addr4(j)),
                    format!("{}/128", Self::addr6(j)),
                ],
                persistent_keepalive: None,
                preshared_key_secret: None,
            })
            .collect::<Vec<_>>();
        WireguardSpec {
            interface: self.nodes[i].iface.clone(),
            private_key_secret: None,
            listen_port: Some(51820),
            addresses: vec![
                format!("{}/24", Self::addr4(i)),
                format!("{}/64", Self::addr6(i)),
            ],
            mtu: None,
            routes: true,
            peers: peers.into(),
        }
    }

    /// Brings every node up (first without peers, to learn the generated keys) and
    /// converges the full mesh; returns the section of each node.
    pub fn up(&self) -> Vec<WireguardSpec> {
        let none: Vec<PublicKey> = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let mut s = self.spec(i, &vec![PublicKey([0; 32]); self.nodes.len()]);
            s.peers = Vec::new().into();
            n.converge(&s);
        }
        let _ = none;
        let keys: Vec<PublicKey> = self.nodes.iter().map(|n| n.public_key()).collect();
        let specs: Vec<WireguardSpec> =
            (0..self.nodes.len()).map(|i| self.spec(i, &keys)).collect();
        for (n, s) in self.nodes.iter().zip(&specs) {
            n.converge(s);
        }
        specs
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.jobs.take();
            if let Some(t) = n.thread.take() {
                let _ = t.join();
            }
            for pid in wireguard_go_pids(&n.iface) {
                // SAFETY: kill with a pid we found serving our own interface.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", n.iface));
            let _ = sh(&["ip", "netns", "del", &n.ns]);
        }
        if let Some(h) = self.hub.take() {
            let _ = sh(&["ip", "netns", "del", &h]);
        }
    }
}

pub fn data_dir(n: &Node) -> PathBuf {
    n.dir.path().join("data")
}
