//! The device watch's cost and repair time (`cargo bench -p converge-wireguard --bench
//! watch`, root, wireguard-go and wireguard-tools installed). At 10, 100 and 1,000 peers
//! (`BENCH_PEERS`), on a real wireguard-go device converge set up in a network
//! namespace of its own:
//! - one look: the watch's summed UAPI read (`WgDriver::device_sum`) against a full
//!   read through wireguard-control (`read_device`, what every resync does), as CPU time
//!   of this process and of wireguard-go per read (200 reads);
//! - idle: the reconciler's host-event streams polled on a 2-thread runtime, as in the
//!   agent, for `BENCH_SECS` (30) seconds without the watch (baseline) and with it (a
//!   look every second): CPU of this process and of wireguard-go, from getrusage and the
//!   wireguard-go threads' schedstat;
//! - repair: a loop that runs a pass on every host event (the engine's part), then
//!   `wg set <if> peer X remove` or `... allowed-ips ...` by hand, 5 times each: time
//!   until `wg show` has the peer back as configured.
//!
//! Under `cargo test --all-targets` (no `--bench`): 10 peers, 2 s phases, one repair.

use converge_core::{Facts, Reconciler};
use converge_wireguard::plan::Backend;
use converge_wireguard::{
    Config, PublicKey, System, SystemConfig, WgDriver, WireguardPeer, WireguardReconciler,
    WireguardSpec,
};
use futures::StreamExt;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Rec = WireguardReconciler<System>;

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn out(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn key(i: u32) -> PublicKey {
    let mut k = [3u8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    PublicKey(k)
}

fn peer(i: u32) -> WireguardPeer {
    WireguardPeer {
        name: format!("p{i}"),
        public_key: key(i).to_base64(),
        // Half with an endpoint (its changes count), half without (roaming).
        endpoint: i
            .is_multiple_of(2)
            .then(|| format!("10.97.{}.{}:51820", (i / 250) % 250, 1 + i % 250)),
        allowed_ips: vec![
            format!("10.{}.{}.{}/32", 64 + i / 65536, (i / 256) % 256, i % 256),
            format!("fd00:64::{:x}/128", i + 1),
        ],
        persistent_keepalive: None,
        preshared_key_secret: None,
    }
}

fn spec(iface: &str, n: u32) -> WireguardSpec {
    WireguardSpec {
        interface: iface.to_string(),
        private_key_secret: None,
        listen_port: Some(51821),
        addresses: vec!["10.63.0.1/16".into()],
        mtu: None,
        routes: true,
        peers: (0..n).map(peer).collect::<Vec<_>>().into(),
    }
}

/// CPU time of this process (every thread), from getrusage.
fn self_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// CPU time of a process: the sum of its threads' schedstat (nanoseconds on a CPU).
fn proc_cpu(pid: u32) -> Duration {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(ns)
}

/// CPU of this process and of wireguard-go while `f` runs, and the wall time.
fn measured<T>(wg: u32, f: impl FnOnce() -> T) -> (T, Duration, Duration, Duration) {
    let (s0, w0, t) = (self_cpu(), proc_cpu(wg), Instant::now());
    let r = f();
    (r, self_cpu() - s0, proc_cpu(wg) - w0, t.elapsed())
}

async fn pass(rec: &Rec, s: &WireguardSpec) -> bool {
    let obs = rec.observe(s).await.expect("observe");
    let plan = rec.plan(s, &obs, &Facts::default());
    drop(obs);
    let changed = !plan.is_empty();
    let out = rec.apply(plan).await;
    let failed: Vec<_> = out.iter().filter(|o| o.error.is_some()).collect();
    assert!(failed.is_empty(), "{failed:?}");
    changed
}

fn wg_pid(iface: &str) -> u32 {
    converge_wireguard::driver::wireguard_go_pids(iface)
        .first()
        .copied()
        .expect("wireguard-go runs")
}

struct Row {
    n: u32,
    /// Per read (the summed UAPI read, then a full read): our CPU, wireguard-go's, wall.
    look: [(Duration, Duration, Duration); 2],
    /// Idle, without and with the watch: this process's CPU %, wireguard-go's CPU %.
    idle: [(f64, f64); 2],
    /// Device-watch events during the idle phase with the watch (should be none).
    events: usize,
    /// Repair times: peer removed, peer's allowed IPs changed.
    repair: [Vec<Duration>; 2],
}

fn per(d: Duration, n: u32) -> Duration {
    d / n
}

fn pct(cpu: Duration, wall: Duration) -> f64 {
    cpu.as_secs_f64() / wall.as_secs_f64() * 100.0
}

fn run(n: u32, iface: &str, dir: &Path, secs: u64, reps: u32) -> Row {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let config = |watch| {
        let mut c = Config::new(dir.join("data"), dir.join("secrets"));
        c.watch_every = watch;
        // No full read but the ones the watch asks for.
        c.full_read_after = Duration::from_secs(3600);
        c
    };
    let system = || System::new(SystemConfig::default()).expect("netlink");
    let s = spec(iface, n);
    let off = Arc::new(WireguardReconciler::new(system(), config(None)));
    rt.block_on(pass(&off, &s));
    rt.block_on(pass(&off, &s));
    let wg = wg_pid(iface);

    // One look, both ways.
    let all = |_: &PublicKey| true;
    let reads = 200;
    let d = off.driver();
    let (_, c1, w1, t1) = measured(wg, || {
        for _ in 0..reads {
            d.device_sum(iface, Backend::Userspace, &all).expect("sum");
        }
    });
    let (_, c2, w2, t2) = measured(wg, || {
        for _ in 0..reads {
            d.read_device(iface, Backend::Userspace).expect("read");
        }
    });
    let look = [
        (per(c1, reads), per(w1, reads), per(t1, reads)),
        (per(c2, reads), per(w2, reads), per(t2, reads)),
    ];

    // Idle: the host-event streams polled as the engine does, nothing else.
    let idle = |rec: Arc<Rec>| -> (f64, f64, usize) {
        let (events, cpu, wgcpu, wall) = measured(wg, || {
            rt.block_on(async {
                let mut stream = rec.host_events().expect("host events");
                let mut events = 0;
                let end = tokio::time::sleep(Duration::from_secs(secs));
                tokio::pin!(end);
                loop {
                    tokio::select! {
                        _ = &mut end => break events,
                        e = stream.next() => if e.is_some() { events += 1 },
                    }
                }
            })
        });
        (pct(cpu, wall), pct(wgcpu, wall), events)
    };
    // (Without the watch, the netlink watch may report the link's creation, queued
    // since the driver was made: not counted.)
    let (b_self, b_wg, _) = idle(off.clone());
    let on = Arc::new(WireguardReconciler::new(
        system(),
        config(Some(Duration::from_secs(1))),
    ));
    rt.block_on(pass(&on, &s));
    let (w_self, w_wg, w_events) = idle(on.clone());

    // Repair: a pass on every host event, as the engine runs them.
    let engine = {
        let (rec, s) = (on.clone(), s.clone());
        rt.spawn(async move {
            let mut stream = rec.host_events().expect("host events");
            while stream.next().await.is_some() {
                // The engine's verify pass follows an applying pass.
                while pass(&rec, &s).await {}
            }
        })
    };
    // The peer's allowed IPs as `wg show` lists them (in any order), if it is there.
    let allowed_of = |k: &str| {
        out(&["wg", "show", iface, "allowed-ips"])
            .lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('\t').map(String::from))
            .map(|ips| {
                let mut v: Vec<String> = ips.split_whitespace().map(String::from).collect();
                v.sort();
                v
            })
    };
    let mut repair = [vec![], vec![]];
    let step = (n / reps).max(1);
    for rep in 0..reps {
        let k = key((1 + rep * step) % n).to_base64();
        let want = allowed_of(&k).expect("the peer is on the device");
        for (what, args) in [
            (0, vec!["wg", "set", iface, "peer", &k, "remove"]),
            (
                1,
                vec![
                    "wg",
                    "set",
                    iface,
                    "peer",
                    &k,
                    "allowed-ips",
                    "10.62.9.9/32",
                ],
            ),
        ] {
            let t = Instant::now();
            assert!(sh(&args), "{args:?}");
            loop {
                if allowed_of(&k).as_ref() == Some(&want) {
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(20), "not repaired");
                std::thread::sleep(Duration::from_millis(20));
            }
            repair[what].push(t.elapsed());
        }
    }
    engine.abort();
    sh(&["ip", "link", "del", iface]);
    wait_gone(iface);
    Row {
        n,
        look,
        idle: [(b_self, b_wg), (w_self, w_wg)],
        events: w_events,
        repair,
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

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn ms(d: &[Duration]) -> String {
    let mut v = d.to_vec();
    v.sort();
    format!(
        "{:.0}/{:.0}",
        v[v.len() / 2].as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // Under `cargo test --all-targets` (no `--bench`): one small smoke run.
    let bench = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<u32> = std::env::var("BENCH_PEERS")
        .unwrap_or_else(|_| if bench { "10,100,1000" } else { "10" }.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if bench { 30 } else { 2 });
    let pid = std::process::id();
    let ns = format!("cvgwg-watch-{pid}");
    assert!(sh(&["ip", "netns", "add", &ns]), "ip netns add (root?)");
    let iface = format!("wgw{}", pid % 100_000);
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
            rows.push(run(n, &ifc, &d, secs, if bench { 5 } else { 1 }));
            eprintln!("done");
        }
        rows
    })
    .join();
    for pid in converge_wireguard::driver::wireguard_go_pids(&iface) {
        // SAFETY: our own wireguard-go, if one is left.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let _ = std::fs::remove_file(format!("/var/run/wireguard/{iface}.sock"));
    sh(&["ip", "netns", "del", &ns]);
    let Ok(rows) = rows else {
        panic!("benchmark failed")
    };

    println!("\nWireGuard device watch (a look every 1 s), idle {secs} s per phase");
    println!(
        "{:>6} | {:>23} | {:>24} | {:>19} | {:>24} | {:>20} | {:>6} | {:>19}",
        "peers",
        "look: converge/wg-go µs",
        "full read: conv/wg-go µs",
        "idle off: conv/wg %",
        "idle watch: conv/wg-go %",
        "watch's cost: conv/wg",
        "events",
        "repair rm/chg ms",
    );
    for r in &rows {
        let [(c1, w1, _), (c2, w2, _)] = r.look;
        println!(
            "{:>6} | {:>23} | {:>24} | {:>19} | {:>24} | {:>20} | {:>6} | {:>19}",
            r.n,
            format!("{}/{}", us(c1), us(w1)),
            format!("{}/{}", us(c2), us(w2)),
            format!("{:.3}/{:.3}", r.idle[0].0, r.idle[0].1),
            format!("{:.3}/{:.3}", r.idle[1].0, r.idle[1].1),
            format!(
                "{:+.3}/{:+.3} %",
                r.idle[1].0 - r.idle[0].0,
                r.idle[1].1 - r.idle[0].1
            ),
            r.events,
            format!("{} / {}", ms(&r.repair[0]), ms(&r.repair[1])),
        );
    }
    println!(
        "look: CPU per read of the device, this process / wireguard-go (200 reads): the \
         watch's summed UAPI read vs a full read through wireguard-control. idle: CPU % of \
         one core over the phase, without the watch / with it, and the difference. repair: median/max of 5, \
         from `wg set` to `wg show` showing the peer as configured (polled every 20 ms)."
    );
}
