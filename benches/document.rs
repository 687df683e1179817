//! Benchmark of the document path on a large generated document (1,000 containers,
//! 1,000 WireGuard peers, 10,000 published ports, 5,000 DNS records, 2,000 routes):
//! parse + validate (target < 50 ms; includes the input-limits scan) and a no-op plan
//! (target < 20 ms).
//!
//! `cargo bench --bench document` prints a table. `-- --write-doc PATH` also writes the
//! document (for the idle-agent measurement in benches/idle_agent.sh).

use base64::Engine as _;
use converge::document::{parse, Format};
use converge_core::Facts;
use converge_dns::driver::Running;
use converge_dns::render::{desired_zone, render, Zone};
use converge_dns::{Layout, Observed};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn key(i: u32) -> String {
    // Deterministic distinct 32-byte keys.
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&i.to_be_bytes());
    b[31] = 0x5a;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The large document, proxy mode (routes need it), with only the node's own DNS
/// listening on `listen` (so the idle-agent run can converge it for real).
pub fn big_document(listen: &str) -> Value {
    let containers: Vec<Value> = (0..1000u32)
        .map(|i| {
            let ports: Vec<Value> = (0..10u32)
                .map(|p| json!({"containerPort": 8000 + p, "hostPort": 10_000 + i * 10 + p}))
                .collect();
            json!({
                "name": format!("svc-{i}"),
                "image": format!("registry.internal/team/svc-{i}:1.{i}"),
                "env": {"RUST_LOG": "info", "PORT": "8000"},
                "ports": ports,
                "resources": {"cpus": 0.5, "memory": "256Mi", "pids": 256},
                "labels": {"team": "core"}
            })
        })
        .collect();
    let peers: Vec<Value> = (0..1000u32)
        .map(|i| {
            json!({
                "name": format!("peer-{i}"),
                "publicKey": key(i),
                "endpoint": format!("192.0.2.{}:51820", i % 250 + 1),
                "allowedIps": [format!("10.200.{}.{}/32", i / 250, i % 250 + 1)],
                "persistentKeepalive": 25
            })
        })
        .collect();
    let records: Vec<Value> = (0..5000u32)
        .map(|i| json!({"name": format!("svc-{i}.internal"), "type": "A", "values": [format!("10.88.{}.{}", i / 250, i % 250 + 1)]}))
        .collect();
    let routes: Vec<Value> = (0..2000u32)
        .map(|i| {
            json!({
                "name": format!("route-{i}"),
                "hosts": [format!("app-{i}.example.com")],
                "upstreams": [{"container": format!("svc-{}", i % 1000), "port": 8000}]
            })
        })
        .collect();
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": "bench-node", "mode": "proxy"},
        "generation": 1,
        "issuedAt": "2026-11-24T10:00:00Z",
        "containers": containers,
        "wireguard": {"interface": "wg0", "privateKeySecret": "wg-key", "listenPort": 51820, "addresses": ["10.200.255.1/16"], "peers": peers},
        "dns": {"zone": "internal", "listen": [listen], "port": 53, "records": records},
        "routes": {"routes": routes}
    })
}

fn time<T>(iters: usize, mut f: impl FnMut() -> T) -> (Duration, Duration) {
    let mut samples: Vec<Duration> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        })
        .collect();
    samples.sort();
    (samples[0], samples[samples.len() / 2])
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or("127.0.0.1");
    let doc = big_document(listen);
    let text = serde_json::to_string(&doc).expect("serialise");
    if let Some(i) = args.iter().position(|a| a == "--write-doc") {
        let path = args.get(i + 1).expect("--write-doc PATH");
        std::fs::write(path, &text).expect("write doc");
        eprintln!("wrote {path} ({} bytes)", text.len());
        return;
    }
    let parsed = match parse(&text, Format::Json) {
        Ok(d) => d,
        Err(p) => panic!(
            "generated document is invalid: {:?}",
            p.iter().take(5).collect::<Vec<_>>()
        ),
    };
    // `cargo bench` passes --bench; under `cargo test --all-targets` one iteration is
    // enough to smoke-test the harness.
    let iters = if args.iter().any(|a| a == "--bench") {
        15
    } else {
        1
    };
    let value: Value = serde_json::from_str(&text).expect("json");
    let (jmin, jmed) = time(iters, || serde_json::from_str::<Value>(&text));
    let (smin, smed) = time(iters, || converge::schema::check(&value));
    let (dmin, dmed) = time(iters, || {
        serde_json::from_value::<converge::document::Document>(value.clone())
    });
    let (vmin, vmed) = time(iters, || {
        let mut p = converge_core::Problems::default();
        converge::validate::semantic(&parsed, &mut p);
        p
    });
    let limits = converge::limits::Limits::default();
    let (lmin, lmed) = time(iters, || converge::limits::check_json(&text, &limits));
    let (pmin, pmed) = time(iters, || parse(&text, Format::Json));
    let sections: Vec<(&str, (Duration, Duration))> = vec![
        (
            "    containers rules",
            time(iters, || {
                let mut p = converge_core::Problems::default();
                converge_containers::validate(
                    parsed.containers.as_deref().unwrap_or_default(),
                    "$.containers",
                    &mut p,
                );
                p
            }),
        ),
        (
            "    wireguard rules",
            time(iters, || {
                let mut p = converge_core::Problems::default();
                if let Some(w) = &parsed.wireguard {
                    converge_wireguard::validate(w, "$.wireguard", &mut p)
                }
                p
            }),
        ),
        (
            "    dns rules",
            time(iters, || {
                let mut p = converge_core::Problems::default();
                if let Some(d) = &parsed.dns {
                    converge_dns::validate(d, "$.dns", &mut p)
                }
                p
            }),
        ),
        (
            "    routes rules",
            time(iters, || {
                let mut p = converge_core::Problems::default();
                if let Some(r) = &parsed.routes {
                    converge_routes::validate(r, "$.routes", &mut p)
                }
                p
            }),
        ),
    ];

    // No-op plan: the DNS reconciler's plan against a host that already serves the
    // document (observed = rendered desired state, one dnsmasq on that config).
    let spec = parsed.dns.clone().expect("dns section");
    let layout = Layout::new("/var/lib/converge/dns");
    let facts = Facts::default();
    let zone = desired_zone(&spec, &facts, &Zone::new());
    let r = render(&spec, &zone, &layout);
    let observed = Observed {
        hosts: Some(r.hosts.clone()),
        confs: [(r.conf_hash.clone(), r.conf.clone())].into(),
        running: vec![Running {
            pid: 1,
            conf_hash: r.conf_hash.clone(),
        }],
    };
    let plan = converge_dns::plan(&spec, &observed, &facts, &layout);
    assert!(
        plan.is_empty(),
        "converged state must plan nothing: {:?}",
        plan.changes.first()
    );
    let (nmin, nmed) = time(iters, || {
        converge_dns::plan(&spec, &observed, &facts, &layout)
    });

    println!("document: {} bytes, 1000 containers, 10000 published ports, 1000 peers, 5000 DNS records, 2000 routes", text.len());
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>8}",
        "measurement", "min ms", "median ms", "target ms", "median/target"
    );
    let row = |name: &str, min: Duration, med: Duration, target: Option<f64>| {
        let (t, ratio) = match target {
            Some(t) => (
                format!("{t:.0}"),
                format!("{:.2}", med.as_secs_f64() * 1000.0 / t),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{name:<36} {:>10} {:>10} {t:>10} {ratio:>8}",
            ms(min),
            ms(med)
        );
    };
    row("  limits scan (items, strings, NUL)", lmin, lmed, None);
    row("  typed parse (serde)", dmin, dmed, None);
    row("  semantic rules", vmin, vmed, None);
    for (name, (min, med)) in &sections {
        row(name, *min, *med, None);
    }
    row("parse + validate (total)", pmin, pmed, Some(50.0));
    row("invalid-input path: text -> value", jmin, jmed, None);
    row("invalid-input path: schema (all errors)", smin, smed, None);
    row("no-op plan (dns, 5000 records)", nmin, nmed, Some(20.0));
}
