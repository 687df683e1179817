//! WireGuard benchmark (`cargo bench -p converge-wireguard --bench wireguard`, root,
//! wireguard-go and wireguard-tools installed): at 10 to 10,000 peers, the initial apply
//! and a one-peer add / change / remove as converge's whole pass (observe, plan, apply)
//! against `wg syncconf` with the full config and a `wg-quick`-style down/up (delete
//! the interface, start wireguard-go, `wg setconf`, addresses and routes in one `ip
//! -batch`). Runs in a network namespace of its own with no link out of it. Prints a
//! table; `BENCH_PEERS=10,100` picks the sizes.

use converge_core::{Facts, Reconciler};
use converge_wireguard::{
    Config, PublicKey, System, SystemConfig, WireguardPeer, WireguardReconciler, WireguardSpec,
};
use std::io::Write;
use std::process::Command;
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

async fn pass(rec: &Rec, s: &WireguardSpec) -> Duration {
    let t = Instant::now();
    let obs = rec.observe(s).await.expect("observe");
    let t1 = t.elapsed();
    let plan = rec.plan(s, &obs, &Facts::default());
    let t2 = t.elapsed();
    drop(obs);
    let out = rec.apply(plan).await;
    let d = t.elapsed();
    if std::env::var_os("BENCH_PHASES").is_some() {
        eprintln!(
            "  {} peers: observe {:.0} µs, plan {:.0} µs, apply {:.0} µs",
            s.peers.len(),
            t1.as_secs_f64() * 1e6,
            (t2 - t1).as_secs_f64() * 1e6,
            (d - t2).as_secs_f64() * 1e6
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
}

fn run(n: u32, iface: &str, dir: &std::path::Path) -> Row {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let driver = System::new(SystemConfig::default()).expect("netlink");
    let rec = WireguardReconciler::new(driver, Config::new(dir.join("data"), dir.join("secrets")));
    let base: Vec<WireguardPeer> = (0..n).map(|i| peer(i, 1)).collect();
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
    let reps = if n >= 10_000 { 5 } else { 9 };
    let mut c = [vec![], vec![], vec![]];
    for _ in 0..reps {
        for (k, s) in [&s_add, &s_change, &s0].into_iter().enumerate() {
            c[k].push(rt.block_on(pass(&rec, s)));
        }
    }
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
    for _ in 0..reps {
        for (k, f) in files.iter().enumerate() {
            let f = f.to_string_lossy().to_string();
            w[k].push(timed(|| sh(&["wg", "syncconf", iface, &f])));
        }
    }
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
    let downup = timed(|| {
        sh(&["ip", "link", "del", iface])
            && wait_gone(iface)
            && sh(&["wireguard-go", iface])
            && sh(&["wg", "setconf", iface, &conf0])
            && sh(&["ip", "-batch", &batch])
    });
    sh(&["ip", "link", "del", iface]);
    wait_gone(iface);
    Row {
        n,
        initial,
        converge,
        syncconf,
        downup,
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
            let row = run(n, &ifc, &d);
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
    sh(&["ip", "netns", "del", &ns]);
    let Ok(rows) = rows else {
        panic!("benchmark failed")
    };

    println!("\nWireGuard, wireguard-go {} (ms, median)", wg_go_version());
    println!(
        "{:>6} | {:>9} | {:>24} | {:>24} | {:>8} | {:>16} | {:>12}",
        "peers",
        "initial",
        "converge add/chg/rm",
        "wg syncconf add/chg/rm",
        "down/up",
        "syncconf÷conv(chg)",
        "down/up÷conv"
    );
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
            "{:>6} | {:>9} | {:>24} | {:>24} | {:>8} | {:>17.1}x | {:>11.1}x",
            r.n,
            ms(r.initial),
            c,
            w,
            ms(r.downup),
            r.syncconf[1].as_secs_f64() / r.converge[1].as_secs_f64(),
            r.downup.as_secs_f64() / r.converge[1].as_secs_f64(),
        );
    }
    if let (Some(small), Some(big)) = (rows.first(), rows.last()) {
        let worst = |r: &Row| r.converge.iter().max().copied().unwrap_or_default();
        println!(
            "one-peer change at {} peers vs {}: {:.2}x (slowest of add/change/remove: {:.2}x)",
            big.n,
            small.n,
            big.converge[1].as_secs_f64() / small.converge[1].as_secs_f64(),
            worst(big).as_secs_f64() / worst(small).as_secs_f64(),
        );
    }
    println!("down/up resets every session on the interface; converge and syncconf reset none.");
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
