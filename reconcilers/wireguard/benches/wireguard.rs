//! WireGuard benchmark (`cargo bench -p converge-wireguard --bench wireguard`, root,
//! wireguard-go and wireguard-tools installed): at 10 to 10,000 peers, the initial apply
//! and a one-peer add / change / remove as converge's whole pass (observe, plan, apply)
//! against `wg syncconf` with the full config and a `wg-quick`-style down/up (delete
//! the interface, start wireguard-go, `wg setconf`, addresses and routes in one `ip
//! -batch`). Runs in a network namespace of its own with no link out of it. Prints a
//! table; `BENCH_PEERS=10,100` picks the sizes.
//!
//! An unrelated live tunnel runs throughout: a second namespace (joined to the first by
//! a veth pair, nothing else) with its own wireguard-go is a real peer of the benched
//! interface, pinged through the tunnel every 5 ms during each method's measured
//! operations. For each method the table shows the packets lost on it and whether its
//! session was reset (latest handshake changed or transfer counters went back).

use converge_core::{Facts, Reconciler};
use converge_wireguard::{
    rotate_key, Config, PublicKey, System, SystemConfig, WireguardPeer, WireguardReconciler,
    WireguardSpec,
};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type Rec = WireguardReconciler<System>;

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn key(i: u32, salt: u8) -> PublicKey {
    let mut k = [salt; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    PublicKey(k)
}

fn peer(i: u32, salt: u8) -> WireguardPeer {
    WireguardPeer {
        name: format!("p{i}"),
        public_key: key(i, salt).to_base64(),
        // Nothing is sent: no peer has traffic or keepalive, and the namespace has no way out.
        endpoint: Some(format!("10.97.{}.{}:51820", (i / 250) % 250, 1 + i % 250)),
        allowed_ips: vec![format!(
            "10.{}.{}.{}/32",
            64 + i / 65536,
            (i / 256) % 256,
            i % 256
        )],
        persistent_keepalive: None,
        preshared_key_secret: None,
    }
}

fn spec(iface: &str, peers: Vec<WireguardPeer>) -> WireguardSpec {
    WireguardSpec {
        interface: iface.to_string(),
        private_key_secret: None,
        listen_port: Some(51820),
        addresses: vec!["10.63.0.1/16".into()],
        mtu: None,
        routes: true,
        peers: peers.into(),
    }
}

/// The benched interface's address, and the live partner's address behind it.
const LIVE_ADDR: &str = "10.63.255.254";
/// The veth link between the bench namespace (.1) and the partner's (.2).
const LINK_NET: &str = "10.96.0";

/// Runs `args` inside network namespace `ns`.
fn in_ns(ns: &str, args: &[&str]) -> bool {
    let net = format!("--net=/run/netns/{ns}");
    let mut all = vec!["nsenter", net.as_str()];
    all.extend_from_slice(args);
    sh(&all)
}

/// The partner of the live tunnel: its own namespace and wireguard-go.
struct Partner {
    ns: String,
    iface: String,
    public_key: String,
}

impl Partner {
    /// Creates the partner namespace, the veth pair to `bench_ns` and the partner's
    /// interface (address `LIVE_ADDR`), peered with `bench_key` at the bench side.
    /// Run from the initial namespace.
    fn new(pid: u32, bench_ns: &str, bench_key: &PublicKey, dir: &Path) -> Partner {
        let ns = format!("cvgwg-benchp-{pid}");
        let iface = format!("wgp{}", pid % 100_000);
        assert!(sh(&["ip", "netns", "add", &ns]), "ip netns add {ns}");
        // From here on, drop removes what was made.
        let mut p = Partner {
            ns: ns.clone(),
            iface: iface.clone(),
            public_key: String::new(),
        };
        let (here, there) = (
            format!("lvb{}", pid % 100_000),
            format!("lvp{}", pid % 100_000),
        );
        assert!(
            sh(&[
                "ip", "link", "add", &here, "netns", bench_ns, "type", "veth", "peer", "name",
                &there, "netns", &ns,
            ]),
            "veth pair"
        );
        let inb = |args: &[&str]| in_ns(bench_ns, args);
        let inp = |args: &[&str]| in_ns(&ns, args);
        for ok in [
            inb(&[
                "ip",
                "addr",
                "add",
                &format!("{LINK_NET}.1/30"),
                "dev",
                &here,
            ]),
            inb(&["ip", "link", "set", &here, "up"]),
            inp(&["ip", "link", "set", "lo", "up"]),
            inp(&[
                "ip",
                "addr",
                "add",
                &format!("{LINK_NET}.2/30"),
                "dev",
                &there,
            ]),
            inp(&["ip", "link", "set", &there, "up"]),
            inp(&["wireguard-go", &iface]),
        ] {
            assert!(ok, "live tunnel setup");
        }
        let private = String::from_utf8(
            Command::new("wg")
                .arg("genkey")
                .output()
                .expect("wg genkey")
                .stdout,
        )
        .expect("key text");
        let key_file = dir.join("partner.key");
        std::fs::write(&key_file, &private).expect("write partner key");
        let mut wg = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("wg pubkey");
        wg.stdin
            .take()
            .expect("stdin")
            .write_all(private.as_bytes())
            .expect("write key");
        let public = wg.wait_with_output().expect("wg pubkey");
        let key_file = key_file.to_string_lossy().to_string();
        for ok in [
            inp(&[
                "wg",
                "set",
                &iface,
                "private-key",
                &key_file,
                "listen-port",
                "51820",
                "peer",
                &bench_key.to_base64(),
                "endpoint",
                &format!("{LINK_NET}.1:51820"),
                "allowed-ips",
                "10.63.0.1/32",
            ]),
            inp(&[
                "ip",
                "addr",
                "add",
                &format!("{LIVE_ADDR}/16"),
                "dev",
                &iface,
            ]),
            inp(&["ip", "link", "set", &iface, "up"]),
        ] {
            assert!(ok, "live partner setup");
        }
        p.public_key = String::from_utf8_lossy(&public.stdout).trim().to_string();
        p
    }

    /// The benched interface's peer entry for the partner.
    fn peer(&self) -> WireguardPeer {
        WireguardPeer {
            name: "live".into(),
            public_key: self.public_key.clone(),
            endpoint: Some(format!("{LINK_NET}.2:51820")),
            allowed_ips: vec![format!("{LIVE_ADDR}/32")],
            persistent_keepalive: None,
            preshared_key_secret: None,
        }
    }
}

impl Drop for Partner {
    fn drop(&mut self) {
        for pid in wg_pids(&self.iface) {
            // SAFETY: the partner's own wireguard-go, found by its interface name.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.iface));
        sh(&["ip", "netns", "del", &self.ns]);
    }
}

/// The live peer as the benched interface reports it: (latest handshake, rx, tx).
fn live_state(iface: &str, key: &str) -> (u64, u64, u64) {
    let out = Command::new("wg")
        .args(["show", iface, "dump"])
        .output()
        .expect("wg show");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find(|f| f[0] == key)
        .map(|f| {
            let n = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
            (n(4), n(5), n(6))
        })
        .unwrap_or_default()
}

/// What happened to the live tunnel during one method's operations.
#[derive(Clone, Copy, Default)]
struct Live {
    sent: u32,
    lost: u32,
    reset: bool,
}

/// A ping every 5 ms to the partner through the tunnel (from the bench namespace).
struct LivePing {
    child: Child,
    out: PathBuf,
}

impl LivePing {
    fn start(dir: &Path) -> LivePing {
        let out = dir.join("live-ping.txt");
        let file = std::fs::File::create(&out).expect("ping output");
        let child = Command::new("ping")
            .args(["-n", "-i", "0.005", LIVE_ADDR])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("ping");
        let p = LivePing { child, out };
        let t = Instant::now();
        while !std::fs::read_to_string(&p.out).is_ok_and(|t| t.contains("icmp_seq=")) {
            assert!(t.elapsed() < Duration::from_secs(10), "no live ping reply");
            std::thread::sleep(Duration::from_millis(5));
        }
        p
    }

    /// Stops it (SIGINT: it prints its summary); (sent, lost as [`lost`] counts them).
    fn stop(mut self) -> (u32, u32) {
        assert!(
            self.child.try_wait().ok().flatten().is_none(),
            "the live ping ended early"
        );
        // SAFETY: SIGINT to the ping this benchmark started.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let sent: u32 = text
            .lines()
            .find_map(|l| l.split_once(" packets transmitted"))
            .and_then(|(n, _)| n.trim().parse().ok())
            .unwrap_or(0);
        let answered: HashSet<u32> = text
            .lines()
            .filter(|l| l.contains(" bytes from "))
            .filter_map(|l| l.split("icmp_seq=").nth(1))
            .filter_map(|r| r.split(' ').next()?.parse().ok())
            .collect();
        (sent, lost(sent, &answered).len() as u32)
    }
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

/// Runs `ops` while the live tunnel is pinged; the window ends 200 ms after them, so
/// packets lost while a restarted interface handshakes again count too.
fn watched<T>(iface: &str, partner: &str, dir: &Path, ops: impl FnOnce() -> T) -> (T, Live) {
    let ping = LivePing::start(dir);
    std::thread::sleep(Duration::from_millis(50));
    let before = live_state(iface, partner);
    let r = ops();
    std::thread::sleep(Duration::from_millis(200));
    let after = live_state(iface, partner);
    let (sent, lost) = ping.stop();
    let reset = after.0 != before.0 || after.1 < before.1 || after.2 < before.2;
    (r, Live { sent, lost, reset })
}

async fn pass(rec: &Rec, s: &WireguardSpec) -> Duration {
    let t = Instant::now();
    let obs = rec.observe(s).await.expect("observe");
    let t1 = t.elapsed();
    let plan = rec.plan(s, &obs, &Facts::default());
    let t2 = t.elapsed();
    let phases = std::env::var_os("BENCH_PHASES").is_some();
    // The agent also builds the status notes of every pass (one per peer); shown with
    // the phases, not part of the measured pass.
    let notes = phases.then(|| {
        let t = Instant::now();
        let n = rec.notes(&obs).len();
        (n, t.elapsed())
    });
    let t2n = t.elapsed();
    drop(obs);
    let out = rec.apply(plan).await;
    let d = t.elapsed() - (t2n - t2);
    if let Some((n, notes)) = notes {
        eprintln!(
            "  {} peers: observe {:.0} µs, plan {:.0} µs, apply {:.0} µs (notes: {n} in {:.0} µs)",
            s.peers.len(),
            t1.as_secs_f64() * 1e6,
            (t2 - t1).as_secs_f64() * 1e6,
            (d - t2).as_secs_f64() * 1e6,
            notes.as_secs_f64() * 1e6,
        );
    }
    let failed: Vec<_> = out.iter().filter(|o| o.error.is_some()).collect();
    assert!(failed.is_empty(), "{failed:?}");
    d
}

fn render(s: &WireguardSpec, private: &str) -> String {
    let mut t = format!("[Interface]\nPrivateKey = {private}\nListenPort = 51820\n");
    for p in s.peers.iter() {
        t.push_str(&format!(
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = {}\nEndpoint = {}\n",
            p.public_key,
            p.allowed_ips.join(","),
            p.endpoint.as_deref().unwrap_or_default()
        ));
    }
    t
}

fn timed(f: impl FnOnce() -> bool) -> Duration {
    let t = Instant::now();
    assert!(f(), "command failed");
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

struct Row {
    n: u32,
    initial: Duration,
    converge: [Duration; 3],
    syncconf: [Duration; 3],
    downup: Duration,
    /// The live tunnel during converge's, syncconf's and down/up's operations.
    live: [Live; 3],
}

fn run(n: u32, iface: &str, dir: &std::path::Path, partner: &WireguardPeer) -> Row {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let driver = System::new(SystemConfig::default()).expect("netlink");
    let rec = WireguardReconciler::new(driver, Config::new(dir.join("data"), dir.join("secrets")));
    let base: Vec<WireguardPeer> = std::iter::once(partner.clone())
        .chain((0..n).map(|i| peer(i, 1)))
        .collect();
    let s0 = spec(iface, base.clone());
    let extra = |allowed: &str| {
        let mut p = peer(n + 7, 2);
        p.allowed_ips = vec![allowed.to_string()];
        p
    };
    let mut with = base.clone();
    with.push(extra("10.62.0.1/32"));
    let s_add = spec(iface, with.clone());
    with.pop();
    with.push(extra("10.62.0.2/32"));
    let s_change = spec(iface, with);

    let initial = rt.block_on(pass(&rec, &s0));
    // The pass after an apply (the engine's verify pass) settles the cache.
    rt.block_on(pass(&rec, &s0));
    let t = Instant::now();
    while !sh(&["ping", "-c1", "-W1", LIVE_ADDR]) {
        assert!(t.elapsed() < Duration::from_secs(10), "live tunnel is down");
    }
    let key = partner.public_key.as_str();
    let reps = if n >= 10_000 { 5 } else { 9 };
    let mut c = [vec![], vec![], vec![]];
    let ((), live_converge) = watched(iface, key, dir, || {
        for _ in 0..reps {
            for (k, s) in [&s_add, &s_change, &s0].into_iter().enumerate() {
                c[k].push(rt.block_on(pass(&rec, s)));
            }
        }
    });
    let converge = c.map(median);

    let private = std::fs::read_to_string(dir.join("data/wireguard").join(format!("{iface}.key")))
        .expect("key file");
    let files: Vec<std::path::PathBuf> = [&s_add, &s_change, &s0]
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let p = dir.join(format!("{iface}-{k}.conf"));
            std::fs::write(&p, render(s, private.trim())).expect("write conf");
            p
        })
        .collect();
    let mut w = [vec![], vec![], vec![]];
    let ((), live_syncconf) = watched(iface, key, dir, || {
        for _ in 0..reps {
            for (k, f) in files.iter().enumerate() {
                let f = f.to_string_lossy().to_string();
                w[k].push(timed(|| sh(&["wg", "syncconf", iface, &f])));
            }
        }
    });
    let syncconf = w.map(median);

    // wg-quick style: the interface goes, everything is set again.
    let batch = dir.join(format!("{iface}.ip"));
    let mut text = format!("address add 10.63.0.1/16 dev {iface}\nlink set {iface} up\n");
    for p in s0.peers.iter() {
        text.push_str(&format!("route add {} dev {iface}\n", p.allowed_ips[0]));
    }
    std::fs::write(&batch, text).expect("write batch");
    let conf0 = files[2].to_string_lossy().to_string();
    let batch = batch.to_string_lossy().to_string();
    let (downup, live_downup) = watched(iface, key, dir, || {
        timed(|| {
            sh(&["ip", "link", "del", iface])
                && wait_gone(iface)
                && sh(&["wireguard-go", iface])
                && sh(&["wg", "setconf", iface, &conf0])
                && sh(&["ip", "-batch", &batch])
        })
    });
    sh(&["ip", "link", "del", iface]);
    wait_gone(iface);
    Row {
        n,
        initial,
        converge,
        syncconf,
        downup,
        live: [live_converge, live_syncconf, live_downup],
    }
}

/// wireguard-go exits once its TUN device is gone; wait for its socket to go too.
fn wait_gone(iface: &str) -> bool {
    let sock = format!("/var/run/wireguard/{iface}.sock");
    for _ in 0..500 {
        if std::os::unix::net::UnixStream::connect(&sock).is_err() {
            let _ = std::fs::remove_file(&sock);
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // Under `cargo test --all-targets` (no `--bench`): one small smoke run, so the
    // benchmark keeps working without costing the suite minutes.
    let default = if std::env::args().any(|a| a == "--bench") {
        "10,100,1000,10000"
    } else {
        "10"
    };
    let sizes: Vec<u32> = std::env::var("BENCH_PEERS")
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let pid = std::process::id();
    let ns = format!("cvgwg-bench-{pid}");
    assert!(sh(&["ip", "netns", "add", &ns]), "ip netns add (root?)");
    let iface = format!("wgb{}", pid % 100_000);
    let dir = tempfile::tempdir().expect("tempdir");
    // The benched interface's key, made now so that the partner knows it.
    let bench_key = rotate_key(&dir.path().join("data"), &iface).expect("key file");
    let partner = Partner::new(pid, &ns, &bench_key, dir.path());
    let live = partner.peer();
    let path = format!("/run/netns/{ns}");
    let (ifc, d) = (iface.clone(), dir.path().to_path_buf());
    let rows = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("netns");
        // SAFETY: setns on this thread (and the threads and processes it starts).
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0);
        sh(&["ip", "link", "set", "lo", "up"]);
        let mut rows = Vec::new();
        for n in sizes {
            eprint!("{n} peers… ");
            let _ = std::io::stderr().flush();
            let row = run(n, &ifc, &d, &live);
            eprintln!("done");
            rows.push(row);
        }
        rows
    })
    .join();
    for pid in wg_pids(&iface) {
        // SAFETY: our own wireguard-go, if one is left.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = std::fs::remove_file(format!("/var/run/wireguard/{iface}.sock"));
    drop(partner);
    sh(&["ip", "netns", "del", &ns]);
    let Ok(rows) = rows else {
        panic!("benchmark failed")
    };

    println!("\nWireGuard, wireguard-go {} (ms, median)", wg_go_version());
    println!(
        "{:>6} | {:>9} | {:>20} | {:>22} | {:>8} | {:>12} | {:>12} | {:>18} | {:>18} | {:>18}",
        "peers",
        "initial",
        "converge add/chg/rm",
        "wg syncconf add/chg/rm",
        "down/up",
        "sync÷conv chg",
        "d/u÷conv chg",
        "live: converge",
        "live: syncconf",
        "live: down/up",
    );
    let live = |l: &Live| {
        format!(
            "{}/{} lost, {}",
            l.lost,
            l.sent,
            if l.reset { "RESET" } else { "kept" }
        )
    };
    for r in &rows {
        let c = format!(
            "{}/{}/{}",
            ms(r.converge[0]),
            ms(r.converge[1]),
            ms(r.converge[2])
        );
        let w = format!(
            "{}/{}/{}",
            ms(r.syncconf[0]),
            ms(r.syncconf[1]),
            ms(r.syncconf[2])
        );
        println!(
            "{:>6} | {:>9} | {:>20} | {:>22} | {:>8} | {:>12.1}x | {:>11.1}x | {:>18} | {:>18} | {:>18}",
            r.n,
            ms(r.initial),
            c,
            w,
            ms(r.downup),
            r.syncconf[1].as_secs_f64() / r.converge[1].as_secs_f64(),
            r.downup.as_secs_f64() / r.converge[1].as_secs_f64(),
            live(&r.live[0]),
            live(&r.live[1]),
            live(&r.live[2]),
        );
    }
    if let (Some(small), Some(big)) = (rows.first(), rows.last()) {
        let ratio = |k: usize| big.converge[k].as_secs_f64() / small.converge[k].as_secs_f64();
        println!(
            "one-peer change as a whole pass at {} peers vs {}: add {:.2}x, change {:.2}x, remove {:.2}x",
            big.n,
            small.n,
            ratio(0),
            ratio(1),
            ratio(2),
        );
    }
    println!(
        "live: a peer of the benched interface in its own namespace, pinged every 5 ms during each \
         method's operations (+200 ms); lost/sent packets, and whether its session was reset \
         (latest handshake changed or counters went back)."
    );
}

fn wg_pids(iface: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let mut a = c.split(|b| *b == 0);
            if a.next().is_some_and(|p| p.ends_with(b"wireguard-go"))
                && a.next() == Some(iface.as_bytes())
            {
                out.push(pid);
            }
        }
    }
    out
}

fn wg_go_version() -> String {
    Command::new("wireguard-go")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(1)
                .map(String::from)
        })
        .unwrap_or_default()
}
