//! Routes benchmark against a real Caddy in a sandbox node: one route changed among 10,
//! 500 and 2,000 routes — converge's pass (observe + plan + one guarded change) vs a
//! full `/load` of the whole configuration vs one admin call per route (the approach of
//! agents that sync each route with its own call) — with Caddy's CPU time per change
//! (from /proc/<pid>/task/*/schedstat, both instances of converge's pair) and failed
//! requests of clients running meanwhile (a new connection per request, HTTP/1.1
//! keep-alive never retrying, keep-alive retrying as RFC 9112 allows); then 50 routes changed in one document:
//! converge's single change vs 50 separate calls. The baselines act on the serving
//! instance directly, as an agent driving one Caddy does.
//!
//! Run: `cargo bench --bench routes` (root; Caddy from `CONVERGE_TEST_CADDY`, else
//! install/caddy.sh's, else PATH). Under `cargo test --all-targets` a smoke run (10
//! routes, a few changes) checks that it works.

#[path = "../tests/common/mod.rs"]
mod common;

use common::sandbox::TestNode;
use converge_core::{Facts, Reconciler};
use converge_routes::driver::admin::Admin;
use converge_routes::driver::pair::{self, Instance};
use converge_routes::driver::{Caddy, CaddyConfig, CaddyDriver};
use converge_routes::{Routes, RoutesInput, RoutesSpec};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn caddy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CONVERGE_TEST_CADDY") {
        return PathBuf::from(p);
    }
    let installed = Path::new("/opt/converge/caddy/bin/caddy");
    if installed.exists() {
        installed.to_path_buf()
    } else {
        PathBuf::from("caddy")
    }
}

/// `n` plain-HTTP routes (no certificates to issue), route `changed` with another header.
fn spec(n: usize, changed: &[usize], tag: u32) -> RoutesInput {
    let routes: Vec<Value> = (0..n)
        .map(|i| {
            let t = if changed.contains(&i) { tag } else { 0 };
            json!({"name": format!("r{i}"), "hosts": [format!("r{i}.test")], "tls": "off",
                   "upstreams": [{"address": "127.0.0.1:8080"}],
                   "responseHeaders": {"set": {"X-Tag": t.to_string()}}})
        })
        .collect();
    RoutesInput {
        spec: serde_json::from_value::<RoutesSpec>(json!({ "routes": routes })).expect("spec"),
        peers: Default::default(),
    }
}

/// Caddy's CPU time so far, in ms: the sum of its threads' time on CPU from
/// /proc/<pid>/task/*/schedstat (nanoseconds; /proc/<pid>/stat counts 10 ms ticks, too
/// coarse for one small change).
fn cpu_ms(pids: &[u32]) -> f64 {
    let ns: u64 = pids
        .iter()
        .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/task")).ok())
        .flat_map(|tasks| tasks.flatten())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum();
    ns as f64 / 1e6
}

/// How a client uses its connections.
#[derive(Clone, Copy)]
enum Kind {
    /// A new connection per request.
    New,
    /// HTTP/1.1 keep-alive; `retry`: a request whose reused connection closed before
    /// any byte of the answer is sent once more on a new one (RFC 9112 9.3.1), else it
    /// fails (python-requests, most scripts).
    KeepAlive { retry: bool },
}

/// One request on `conn`: Ok((answered 200, the server closes after it)); Err(true)
/// when the connection closed before any byte of the answer.
fn request(conn: &mut TcpStream) -> Result<(bool, bool), bool> {
    use std::io::{BufRead, BufReader};
    conn.write_all(b"GET / HTTP/1.1\r\nHost: r0.test\r\n\r\n")
        .map_err(|_| true)?;
    let mut reader = BufReader::new(conn);
    let mut status = String::new();
    match reader.read_line(&mut status) {
        Ok(0) | Err(_) => return Err(true),
        Ok(_) => {}
    }
    let (mut length, mut close) = (0usize, false);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return Err(false),
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
        let (k, v) = line.split_once(':').unwrap_or((&line, ""));
        if k.eq_ignore_ascii_case("content-length") {
            length = v.trim().parse().unwrap_or(0);
        }
        close |= k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close");
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(|_| false)?;
    Ok((status.starts_with("HTTP/1.1 200"), close))
}

fn connect() -> std::io::Result<TcpStream> {
    let s = TcpStream::connect("127.0.0.1:80")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// A client sending requests to route r0 back to back; counts.
struct Client {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl Client {
    fn start(kind: Kind) -> Client {
        let c = Client {
            stop: Arc::new(AtomicBool::new(false)),
            sent: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicU64::new(0)),
        };
        let (stop, sent, failed) = (c.stop.clone(), c.sent.clone(), c.failed.clone());
        std::thread::spawn(move || {
            let mut kept: Option<TcpStream> = None;
            while !stop.load(Ordering::Relaxed) {
                let ok = match kind {
                    Kind::New => connect()
                        .ok()
                        .and_then(|mut c| request(&mut c).ok())
                        .is_some_and(|(ok, _)| ok),
                    Kind::KeepAlive { retry } => {
                        let reused = kept.is_some();
                        let mut r = kept
                            .take()
                            .map_or_else(|| connect().map_err(|_| false), Ok)
                            .and_then(|mut c| request(&mut c).map(|r| (r, c)));
                        if matches!(r, Err(true)) && retry && reused {
                            r = connect()
                                .map_err(|_| false)
                                .and_then(|mut c| request(&mut c).map(|r| (r, c)));
                        }
                        match r {
                            Ok(((ok, close), conn)) => {
                                kept = (!close).then_some(conn);
                                ok
                            }
                            Err(_) => false,
                        }
                    }
                };
                sent.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        c
    }

    fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One measured change: wall time, Caddy CPU, failed requests meanwhile of clients on
/// new connections, on kept-alive ones that never retry, and on kept-alive ones that
/// retry.
struct Sample {
    wall_ms: f64,
    cpu_ms: f64,
    failed: [u64; 3],
    calls: usize,
}

async fn converge_pass(r: &Routes<Caddy>, input: &RoutesInput) -> usize {
    let obs = r.observe(input).await.expect("observe");
    let plan = r.plan(input, &obs, &Facts::default());
    let n = plan.actions.len();
    let out = r.apply(plan).await;
    assert!(out.iter().all(|o| o.error.is_none()), "pass failed");
    n
}

/// The whole configuration converge would send for `input` (built outside the timing).
async fn full_config(r: &Routes<Caddy>, input: &RoutesInput) -> Value {
    let obs = r.observe(input).await.expect("observe");
    match r.plan(input, &obs, &Facts::default()).actions.last() {
        Some(converge_routes::plan::Action::Load(l)) => l.config.clone(),
        _ => panic!("no change planned"),
    }
}

/// One PATCH per route in `names`, each setting that route's tag.
async fn per_route(admin: &Admin, cfg: &Value, names: &[usize], tag: u32) -> usize {
    let routes = converge_routes::plan::extract(cfg);
    for i in names {
        let name = format!("r{i}");
        let mut obj = routes.get(&name).expect("route").route.clone();
        obj["handle"][0]["response"]["set"]["X-Tag"] = json!([tag.to_string()]);
        admin
            .patch(&format!("/id/converge-route-{name}"), &obj)
            .await
            .expect("patch");
    }
    names.len()
}

/// What one approach does, so it can run twice: once alone (wall time, Caddy CPU),
/// once under client traffic (failed requests).
enum Approach<'a> {
    Converge(usize, &'a [usize]),
    Load(usize),
    PerRoute(&'a [usize]),
}

struct Bench<'a> {
    r: &'a Routes<Caddy>,
    /// `<data-dir>/caddy` of converge's pair.
    dir: &'a Path,
    pids: Vec<u32>,
    tag: u32,
}

impl Bench<'_> {
    /// The Caddy instance serving now, and its admin client.
    fn serving(&self) -> (Instance, Admin) {
        let inst = self.r.driver().serving().expect("managed caddy");
        (inst, Admin::new(inst.dir(self.dir).join("admin.sock")))
    }

    /// Runs the approach once; returns its calls and the time of what it measures
    /// (converge: the whole pass; /load and per-route calls: the calls alone, the
    /// configuration they send being built beforehand).
    async fn once(&mut self, a: &Approach<'_>) -> (usize, Duration) {
        self.tag += 1;
        let tag = self.tag;
        match a {
            Approach::Converge(n, changed) => {
                let input = spec(*n, changed, tag);
                let t = Instant::now();
                let calls = converge_pass(self.r, &input).await;
                (calls, t.elapsed())
            }
            Approach::Load(n) => {
                let cfg = full_config(self.r, &spec(*n, &[n / 2], tag)).await;
                let (inst, admin) = self.serving();
                let cfg = pair::to_instance(&cfg, self.dir, inst);
                let t = Instant::now();
                admin.load(&cfg, None).await.expect("load");
                (1, t.elapsed())
            }
            Approach::PerRoute(names) => {
                let (_, admin) = self.serving();
                let cfg = admin.get_config().await.expect("config").value;
                let t = Instant::now();
                let calls = per_route(&admin, &cfg, names, tag).await;
                (calls, t.elapsed())
            }
        }
    }

    async fn measure(&mut self, a: Approach<'_>) -> Sample {
        // Alone: wall time and Caddy's CPU (its CPU while finishing the old servers
        // after answering is counted too, up to 300 ms later; for converge also the
        // reload of the old instance after the drain, which a read waits for).
        // converge's previous change settled first (its old instance reloaded after the
        // drain), so neither its time nor its CPU lands in this sample.
        self.r.driver().settled().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let c0 = cpu_ms(&self.pids);
        let (calls, took) = self.once(&a).await;
        let wall_ms = took.as_secs_f64() * 1e3;
        self.r.driver().settled().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cpu = cpu_ms(&self.pids) - c0;
        // Under traffic: failed requests of each kind of client.
        self.r.driver().settled().await;
        let clients = [
            Kind::New,
            Kind::KeepAlive { retry: false },
            Kind::KeepAlive { retry: true },
        ]
        .map(Client::start);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let f0 = clients.each_ref().map(Client::failed);
        self.once(&a).await;
        self.r.driver().settled().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let failed = [0, 1, 2].map(|i| clients[i].failed() - f0[i]);
        drop(clients);
        tokio::time::sleep(Duration::from_millis(50)).await;
        Sample {
            wall_ms,
            cpu_ms: cpu,
            failed,
            calls,
        }
    }
}

fn row(label: &str, n: usize, s: &Sample, base: &Sample) -> String {
    let [new, ka, kr] = s.failed;
    format!(
        "{label:<34} {n:>6} {:>6} {:>10.1} {:>8.1}x {:>10.1} {:>8.1}x {:>14}",
        s.calls,
        s.wall_ms,
        s.wall_ms / base.wall_ms.max(0.001),
        s.cpu_ms,
        s.cpu_ms / base.cpu_ms.max(0.001),
        format!("{new} / {ka} / {kr}")
    )
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let node = TestNode::new("bench-rt");
    let www = node.data_dir().join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("index.html"), "ok\n").expect("index");
    node.spawn(
        node.command("busybox")
            .args(["httpd", "-f", "-p", "127.0.0.1:8080", "-h"])
            .arg(&www),
    );
    let dir = node.data_dir().join("caddy");
    for inst in Instance::BOTH {
        node.track_pidfile(inst.dir(&dir).join("caddy.pid"));
    }
    let bin = caddy_bin();
    let version = std::process::Command::new(&bin)
        .arg("version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .to_string()
        })
        .unwrap_or_default();
    let sizes: &[usize] = if full { &[10, 500, 2000] } else { &[10] };
    // One admin call per route: all of them at 10 and 500; at 2,000 the first 300,
    // extrapolated linearly (each call reloads the whole configuration).
    let per_route_cap = if full { 300 } else { 10 };
    let multi = if full { 50 } else { 5 };
    let multi_at = if full { 500 } else { 10 };
    let lines = node.in_netns(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let r = Routes::new(Caddy::new(CaddyConfig {
                binary: bin,
                dir: dir.clone(),
                external_admin: None,
                secrets: converge_core::SecretSource::new(dir.join("secrets")),
                // A pass's own cost is measured: changes timed back to back, no hold.
                min_reload_interval: Duration::ZERO,
                user: converge_routes::driver::user::DEFAULT_USER.to_string(),
                drain: converge_routes::driver::DRAIN,
            }));
            let mut lines = vec![format!(
                "caddy {version}; times in ms; ratios against converge's pass; failed = requests to r0 that \
                 failed meanwhile, of a client on new connections / on kept-alive ones that never retries / \
                 on kept-alive ones that retries (RFC 9112 9.3.1)"
            )];
            lines.push(format!(
                "{:<34} {:>6} {:>6} {:>10} {:>9} {:>10} {:>9} {:>14}",
                "approach", "routes", "calls", "wall", "ratio", "caddy cpu", "ratio", "failed"
            ));
            let mut b = Bench { r: &r, dir: &dir, pids: Vec::new(), tag: 1 };
            for &n in sizes {
                // Set up n routes; Caddy started by the first pass.
                converge_pass(&r, &spec(n, &[], 0)).await;
                b.pids = match r.driver().process() {
                    Ok(converge_routes::plan::Process::Managed { pids, .. }) => pids,
                    _ => panic!("caddy not running"),
                };
                let mid = [n / 2];
                let conv = b.measure(Approach::Converge(n, &mid)).await;
                let load = b.measure(Approach::Load(n)).await;
                // One admin call per route; beyond the cap, extrapolated linearly
                // (every call reloads the whole configuration).
                let calls: Vec<usize> = (0..n.min(per_route_cap)).collect();
                let mut per = b.measure(Approach::PerRoute(&calls)).await;
                let label = if calls.len() < n {
                    let k = n as f64 / calls.len() as f64;
                    per.wall_ms *= k;
                    per.cpu_ms *= k;
                    per.failed = per.failed.map(|f| (f as f64 * k).round() as u64);
                    per.calls = n;
                    format!("one call per route ({} timed)", calls.len())
                } else {
                    "one call per route".to_string()
                };
                lines.push(row("converge pass (1 change)", n, &conv, &conv));
                lines.push(row("full /load", n, &load, &conv));
                lines.push(row(&label, n, &per, &conv));
                if n == multi_at {
                    let changed: Vec<usize> = (0..multi.min(n)).collect();
                    let conv_m = b.measure(Approach::Converge(n, &changed)).await;
                    let sep = b.measure(Approach::PerRoute(&changed)).await;
                    lines.push(row(&format!("converge pass ({} changed)", changed.len()), n, &conv_m, &conv_m));
                    lines.push(row(&format!("{} separate calls", changed.len()), n, &sep, &conv_m));
                }
            }
            lines
        })
    });
    for l in lines {
        println!("{l}");
    }
}
