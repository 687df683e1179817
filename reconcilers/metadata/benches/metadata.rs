//! Metadata API benchmark: GET throughput and p50/p99 latency at 1, 16 and 64 keep-alive
//! connections from a bounded load generator on 127.0.0.1, side by side with Caddy
//! serving the same JSON as a static file (the ceiling for a plain HTTP server here);
//! then the swap of a 1,000-entry project (one transaction + publish) and a whole
//! reconciler pass for it.
//!
//! Run: `cargo bench -p converge-metadata --bench metadata` (`BENCH_SECS` per level,
//! default 5). Under `cargo test` it runs a smoke version (short, no Caddy) that checks
//! only that every request succeeded.

use converge_core::{Facts, Reconciler};
use converge_metadata::plan::{ProjectWrite, Served};
use converge_metadata::{Host, Metadata, MetadataDriver, MetadataSpec};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const TOKEN: &str = "bench-token";

/// The value served: a realistic settings object (~300 bytes).
fn value() -> serde_json::Value {
    json!({
        "database": {"host": "postgres.internal", "port": 5432, "name": "storefront", "pool": 20},
        "cache": {"url": "redis://redis.internal:6379/0", "ttlSeconds": 300},
        "features": {"newCheckout": true, "searchV2": false, "recommendations": true},
        "endpoints": ["https://pay-1.example.net", "https://pay-2.example.net"]
    })
}

struct Level {
    requests: u64,
    errors: u64,
    secs: f64,
    p50: Duration,
    p99: Duration,
}

/// `conns` connections, each sending the next request as soon as the last answer is
/// read (closed loop: the load is bounded by the connections), for `secs`.
async fn load(addr: SocketAddr, path: &str, conns: usize, secs: f64) -> Level {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: metadata.internal\r\nConverge-Metadata: true\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    );
    let request: Arc<[u8]> = Arc::from(request.into_bytes());
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            let Ok(stream) = TcpStream::connect(addr).await else {
                return (lat, 1);
            };
            let _ = stream.set_nodelay(true);
            let mut s = BufReader::new(stream);
            let mut line = String::new();
            let mut body = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                if s.get_mut().write_all(&request).await.is_err() {
                    errors += 1;
                    break;
                }
                line.clear();
                if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                    errors += 1;
                    break;
                }
                let ok = line.split_whitespace().nth(1) == Some("200");
                let mut len = 0usize;
                loop {
                    line.clear();
                    if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                        break;
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = l.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                }
                body.resize(len, 0);
                if s.read_exact(&mut body).await.is_err() {
                    errors += 1;
                    break;
                }
                lat.push(t.elapsed());
                if !ok {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((lat, e)) = t.await {
            all.extend(lat);
            errors += e;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Level {
        requests: all.len() as u64,
        errors,
        secs,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18500)
}

/// Caddy serving `dir` on `port`, if installed.
fn caddy(dir: &std::path::Path, port: u16) -> Option<Child> {
    let bin = ["/usr/bin/caddy", "/usr/local/bin/caddy"]
        .into_iter()
        .find(|b| std::path::Path::new(b).exists())?;
    let child = Command::new(bin)
        .args(["file-server", "--root"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("HOME", dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn spec(generation: u64, entries: usize, listen: SocketAddr) -> MetadataSpec {
    let mut e: BTreeMap<String, serde_json::Value> = (0..entries)
        .map(|i| {
            (
                format!("bulk/k{i:04}"),
                json!({"generation": generation, "i": i}),
            )
        })
        .collect();
    e.insert("config".into(), value());
    serde_json::from_value(json!({
        "projects": [{"id": "bench", "tokenSha256": hex::encode(Sha256::digest(TOKEN)),
                      "rateLimit": u32::MAX, "entries": e}],
        "listen": [listen.to_string()]
    }))
    .expect("spec")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let secs: f64 = if full {
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5.0)
    } else {
        0.2
    };
    let levels: &[usize] = if full { &[1, 16, 64] } else { &[1, 4] };
    let dir = tempfile::tempdir().expect("tempdir");

    // The server in a runtime of its own (two workers, like Caddy's GOMAXPROCS here).
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("server runtime");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let reconciler = {
        let _guard = server_rt.enter();
        Metadata::new(Host::serving(dir.path()))
    };
    let pass = |s: &Served| {
        server_rt.block_on(async {
            let o = reconciler.observe(s).await.expect("observe");
            let p = reconciler.plan(s, &o, &Facts::default());
            let out = reconciler.apply(p).await;
            assert!(out.iter().all(|o| o.error.is_none()), "{out:?}");
        })
    };
    // The first pass writes the project and binds the listener.
    pass(&Served::new(&spec(0, 1000, addr), &[]));

    let static_dir = dir.path().join("www");
    std::fs::create_dir_all(static_dir.join("v1/metadata")).expect("www");
    std::fs::write(
        static_dir.join("v1/metadata/config"),
        serde_json::to_vec(&value()).expect("json"),
    )
    .expect("static file");
    let caddy_port = free_port();
    let mut caddy_child = if full {
        caddy(&static_dir, caddy_port)
    } else {
        None
    };

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    let mut rows = Vec::new();
    for &c in levels {
        let ours = client_rt.block_on(load(addr, "/v1/metadata/config", c, secs));
        assert_eq!(ours.errors, 0, "errors at {c} connections");
        assert!(ours.requests > 0);
        let ceiling = caddy_child.as_ref().map(|_| {
            client_rt.block_on(load(
                ([127, 0, 0, 1], caddy_port).into(),
                "/v1/metadata/config",
                c,
                secs,
            ))
        });
        rows.push((c, ours, ceiling));
    }
    if let Some(c) = caddy_child.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }

    println!(
        "| connections | converge req/s | p50 | p99 | Caddy static req/s | p50 | p99 | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (c, o, s) in &rows {
        let rps = o.requests as f64 / o.secs;
        match s {
            Some(s) => {
                let srps = s.requests as f64 / s.secs;
                println!(
                    "| {c} | {rps:.0} | {:.3} ms | {:.3} ms | {srps:.0} | {:.3} ms | {:.3} ms | {:.0} % |",
                    o.p50.as_secs_f64() * 1e3,
                    o.p99.as_secs_f64() * 1e3,
                    s.p50.as_secs_f64() * 1e3,
                    s.p99.as_secs_f64() * 1e3,
                    100.0 * rps / srps
                );
            }
            None => println!(
                "| {c} | {rps:.0} | {:.3} ms | {:.3} ms | – | – | – | – |",
                o.p50.as_secs_f64() * 1e3,
                o.p99.as_secs_f64() * 1e3
            ),
        }
    }

    // The swap of a 1,000-entry project: every entry changes (one transaction, then the
    // snapshot is published), measured at the driver; then a whole pass (observe reads
    // the database, plan, apply).
    let runs = if full { 21 } else { 3 };
    let mut swaps = Vec::new();
    let mut passes = Vec::new();
    for g in 1..=runs {
        let served = Served::new(&spec(g * 2, 1000, addr), &[]);
        let project = &served.projects["bench"];
        let write = ProjectWrite {
            id: "bench".into(),
            token_sha256: project.token_sha256.clone(),
            rate_limit: project.rate_limit,
            set: project
                .entries
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            delete: Vec::new(),
            entries: project.entries.clone(),
        };
        let t = Instant::now();
        reconciler.driver().write(&write).expect("swap");
        swaps.push(t.elapsed());
        let next = Served::new(&spec(g * 2 + 1, 1000, addr), &[]);
        let t = Instant::now();
        pass(&next);
        passes.push(t.elapsed());
    }
    println!(
        "1,000-entry project swap: median {:.2} ms, max {:.2} ms; whole pass (observe + plan + apply): median {:.2} ms ({runs} runs)",
        median(swaps.clone()).as_secs_f64() * 1e3,
        swaps.iter().max().copied().unwrap_or_default().as_secs_f64() * 1e3,
        median(passes).as_secs_f64() * 1e3
    );
}
