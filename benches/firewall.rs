//! Firewall benchmark on kernel nftables in a sandbox node, side by side with the common
//! approaches: a full table rebuild with `nft -f` (one atomic file) and one iptables DNAT
//! rule per port (legacy). At 10, 1,000 and 10,000 published ports: initial apply, adding,
//! changing and removing ONE port, and first-packet connect latency to the last port.
//! Prints a table with ratios and the targets.
//!
//! Run: `cargo bench --bench firewall` (root). Under `cargo test --all-targets` it does
//! nothing.

#[path = "../tests/common/mod.rs"]
mod common;

use common::sandbox::TestNode;
use converge_core::{Facts, Reconciler};
use converge_firewall::nfnl::Nft;
use converge_firewall::ruleset::{element_messages, Bytes, DNAT4_ANY};
use converge_firewall::{Firewall, FirewallSpec, Kernel, PublishedPorts};
use serde_json::json;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

const BASE: u16 = 10_000;
const FRONT: &str = "10.99.0.1";
const BACK: &str = "10.99.0.2";
const REPEAT: usize = 9;

fn spec(n: u16, changed: Option<u16>) -> FirewallSpec {
    let ports: Vec<_> = (0..n)
        .map(|i| {
            let port = if Some(i) == changed { 9001 } else { 9000 };
            json!({"hostPort": BASE + i, "target": {"address": BACK, "port": port}})
        })
        .collect();
    serde_json::from_value(json!({"publishedPorts": ports})).expect("spec")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn timed(program: &str, args: &[&str]) -> Duration {
    let t = Instant::now();
    sh(program, args);
    t.elapsed()
}

/// `nft -f` input for the whole table with `n` ports (the common atomic approach).
fn nft_file(n: u16, dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join(format!("rebuild-{n}.nft"));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    // `table …; delete table …` makes the file work whether or not the table exists.
    writeln!(
        f,
        "table ip bench {{}}\ndelete table ip bench\ntable ip bench {{"
    )
    .ok();
    writeln!(
        f,
        " map ports {{ type inet_service : ipv4_addr . inet_service;"
    )
    .ok();
    if n > 0 {
        write!(f, "  elements = {{ ").ok();
        for i in 0..n {
            let sep = if i + 1 == n { "" } else { ", " };
            write!(f, "{} : {BACK} . 9000{sep}", BASE + i).ok();
        }
        writeln!(f, " }}").ok();
    }
    writeln!(f, " }}").ok();
    for (chain, hook) in [("pre", "prerouting"), ("out", "output")] {
        writeln!(f, " chain {chain} {{ type nat hook {hook} priority -100; fib daddr type local dnat ip to tcp dport map @ports; }}").ok();
    }
    writeln!(f, "}}").ok();
    drop(f);
    path
}

/// Median first-packet connect time to the last port (through the DNAT of each approach).
fn connect_latency(port: u16) -> Duration {
    let to: SocketAddr = format!("{FRONT}:{port}").parse().expect("addr");
    let samples: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("connect");
            let d = t.elapsed();
            drop(s);
            d
        })
        .collect();
    median(samples)
}

struct Row {
    op: String,
    converge: f64,
    nft_f: Option<f64>,
    iptables: Option<f64>,
}

/// converge's passes at `n` ports: [initial, add one, change one, remove one, kernel
/// delete cost, connect latency] in ms; pushes the netlink-batch-only rows.
fn converge_runs(rt: &tokio::runtime::Runtime, n: u16, rows: &mut Vec<Row>) -> [f64; 6] {
    sh("nft", &["flush", "ruleset"]);
    let fw = Firewall::new(Kernel::new());
    let facts = Facts::default();
    // Whole pass, and the netlink batch alone (apply).
    let pass = |s: &FirewallSpec| -> (Duration, Duration) {
        let t = Instant::now();
        let batch = rt.block_on(async {
            let o = fw.observe(s).await.expect("observe");
            let p = fw.plan(s, &o, &facts);
            drop(o); // as the engine does
            let a = Instant::now();
            for out in fw.apply(p).await {
                assert!(out.error.is_none(), "{out:?}");
            }
            a.elapsed()
        });
        (t.elapsed(), batch)
    };
    let full = spec(n, None);
    let initial = pass(&full).0;
    // Add, change, remove one port, back and forth.
    let (mut add, mut change, mut remove) = (Vec::new(), Vec::new(), Vec::new());
    let (plus, changed) = (spec(n + 1, None), spec(n, Some(n - 1)));
    for _ in 0..REPEAT {
        add.push(pass(&plus));
        remove.push(pass(&full));
        change.push(pass(&changed));
        pass(&full);
    }
    let batch = |v: &[(Duration, Duration)]| ms(median(v.iter().map(|x| x.1).collect()));
    let whole = |v: &[(Duration, Duration)]| median(v.iter().map(|x| x.0).collect());
    for (what, v) in [("add", &add), ("change", &change), ("remove", &remove)] {
        rows.push(Row {
            op: format!("{n:>6} ports: {what} one port, netlink batch only"),
            converge: batch(v),
            nft_f: None,
            iptables: None,
        });
    }
    // What a pass no longer does: the per-port digests are taken once, when the
    // document is read (next to parsing it).
    let ports = full.published_ports.to_vec();
    let digests = median(
        (0..REPEAT)
            .map(|_| {
                let ports = ports.clone();
                let t = Instant::now();
                let digested = PublishedPorts::from(ports);
                let d = t.elapsed();
                drop(std::hint::black_box(digested));
                d
            })
            .collect(),
    );
    let (parse, validate) = {
        let doc = serde_json::to_string(&full).expect("serialize");
        let t = Instant::now();
        let parsed: FirewallSpec = serde_json::from_str(&doc).expect("parse");
        let parse = t.elapsed();
        let mut problems = converge_core::Problems::default();
        let t = Instant::now();
        converge_firewall::validate(&parsed, "$.firewall", &mut problems);
        assert!(problems.is_empty());
        (parse, t.elapsed())
    };
    rows.push(Row {
        op: format!(
            "{n:>6} ports: port digests, once per document (parse {:.3}, validate {:.3})",
            ms(parse),
            ms(validate)
        ),
        converge: ms(digests),
        nft_f: None,
        iptables: None,
    });
    let latency = connect_latency(BASE + n - 1);
    let kernel = kernel_delete_cost(n);
    [
        ms(initial),
        ms(whole(&add)),
        ms(whole(&change)),
        ms(whole(&remove)),
        ms(kernel),
        ms(latency),
    ]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let node = TestNode::new("bench-fw");
    // Both ends local: the DNAT happens in the output hook, as for a host-local client.
    for a in [FRONT, BACK] {
        node.run_ok("ip", ["addr", "add", &format!("{a}/32"), "dev", "lo"]);
    }
    let dir = node.data_dir().to_path_buf();
    let (rows, summary) = node.in_netns(move || {
        let listener = TcpListener::bind(format!("{BACK}:9000")).expect("bind backend");
        std::thread::spawn(move || for _ in listener.incoming() {});
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut rows = Vec::new();
        let mut summary = Vec::new();
        for n in [10u16, 1_000, 10_000] {
            let [c_init, c_add, c_change, c_remove, k_del, c_latency] =
                converge_runs(&rt, n, &mut rows);

            // nft -f: the whole table each time.
            sh("nft", &["flush", "ruleset"]);
            let (full, plus) = (nft_file(n, &dir), nft_file(n + 1, &dir));
            let f_init = median((0..3).map(|_| timed("nft", &["-f", full.to_str().unwrap_or("")])).collect());
            let f_latency = connect_latency(BASE + n - 1);
            let f_add = median(
                (0..REPEAT)
                    .map(|_| {
                        let t = timed("nft", &["-f", plus.to_str().unwrap_or("")]);
                        sh("nft", &["-f", full.to_str().unwrap_or("")]);
                        t
                    })
                    .collect(),
            );
            // For orientation: the same one-port change as one `nft` element command.
            let last = format!("{{ {} }}", BASE + n - 1);
            let f_del = median(
                (0..REPEAT)
                    .map(|_| {
                        let t = timed("nft", &["delete", "element", "ip", "bench", "ports", &last]);
                        sh("nft", &["add", "element", "ip", "bench", "ports", &format!("{{ {} : {BACK} . 9000 }}", BASE + n - 1)]);
                        t
                    })
                    .collect(),
            );

            // iptables: one DNAT rule per port, loaded with iptables-restore.
            sh("nft", &["flush", "ruleset"]);
            let rules = dir.join(format!("ipt-{n}"));
            let mut f = std::io::BufWriter::new(std::fs::File::create(&rules).expect("create"));
            writeln!(f, "*nat").ok();
            for i in 0..n {
                for chain in ["PREROUTING", "OUTPUT"] {
                    writeln!(f, "-A {chain} -d {FRONT} -p tcp --dport {} -j DNAT --to-destination {BACK}:9000", BASE + i).ok();
                }
            }
            writeln!(f, "COMMIT").ok();
            drop(f);
            let i_init = {
                let t = Instant::now();
                let out = Command::new("iptables-legacy-restore")
                    .arg(&rules)
                    .output()
                    .expect("iptables-restore");
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                t.elapsed()
            };
            let i_latency = connect_latency(BASE + n - 1);
            let one = |op: &str| {
                let port = (BASE + n).to_string();
                timed("iptables-legacy", &["-t", "nat", op, "OUTPUT", "-d", FRONT, "-p", "tcp", "--dport", &port, "-j", "DNAT", "--to-destination", &format!("{BACK}:9000")])
            };
            let (mut i_add, mut i_del) = (Vec::new(), Vec::new());
            for _ in 0..REPEAT {
                i_add.push(one("-A"));
                i_del.push(one("-D"));
            }
            sh("iptables-legacy", &["-t", "nat", "-F"]);

            summary.push((n, c_add, c_change, c_remove, ms(f_add), k_del, c_latency, ms(i_latency)));
            rows.push(Row { op: format!("{n:>6} ports: initial apply"), converge: c_init, nft_f: Some(ms(f_init)), iptables: Some(ms(i_init)) });
            rows.push(Row { op: format!("{n:>6} ports: add one port"), converge: c_add, nft_f: Some(ms(f_add)), iptables: Some(ms(median(i_add))) });
            rows.push(Row { op: format!("{n:>6} ports: change one port's target"), converge: c_change, nft_f: Some(ms(f_add)), iptables: None });
            rows.push(Row { op: format!("{n:>6} ports: remove one port"), converge: c_remove, nft_f: Some(ms(f_add)), iptables: Some(ms(median(i_del))) });
            rows.push(Row { op: format!("{n:>6} ports: `nft delete element` (one process)"), converge: ms(f_del), nft_f: None, iptables: None });
            rows.push(Row { op: format!("{n:>6} ports: kernel cost of one element delete (raw netlink)"), converge: k_del, nft_f: None, iptables: None });
            rows.push(Row { op: format!("{n:>6} ports: first-packet connect (median)"), converge: c_latency, nft_f: Some(ms(f_latency)), iptables: Some(ms(i_latency)) });
        }
        (rows, summary)
    });
    println!(
        "\n{:<58} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "operation (ms)", "converge", "nft -f", "iptables", "nft/cvg", "ipt/cvg"
    );
    for r in &rows {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        let ratio = |v: Option<f64>| {
            v.map(|v| format!("{:.1}x", v / r.converge))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{:<58} {:>10.3} {:>10} {:>10} {:>9} {:>9}",
            r.op,
            r.converge,
            f(r.nft_f),
            f(r.iptables),
            ratio(r.nft_f),
            ratio(r.iptables)
        );
    }
    if let (Some(small), Some(big)) = (summary.first(), summary.last()) {
        let (n, add, change, remove, rebuild, kernel, lat, ipt_lat) = *big;
        println!("\nTargets at {n} ports (same run):");
        println!(
            "  add one port vs nft -f rebuild: {:.1}x faster (target >= 50x)",
            rebuild / add
        );
        println!("  change / remove one port: {change:.3} / {remove:.3} ms vs kernel element delete + 1 ms = {:.3} ms", kernel + 1.0);
        println!(
            "  vs the same change at {} ports: add {:.1}x, change {:.1}x, remove {:.1}x (target within 2x)",
            small.0, add / small.1, change / small.2, remove / small.3
        );
        println!("  first-packet connect: {lat:.3} ms at {n} vs {:.3} ms at {} (iptables {ipt_lat:.3} vs {:.3})", small.6, small.0, small.7);
    }
    println!("\nconverge = one whole reconcile pass (observe, plan, one atomic netlink batch).");
    println!("nft -f = full rebuild of a table holding the same DNAT map; iptables = legacy, one DNAT rule per port (initial: iptables-restore).");
}

/// Median kernel time to delete one element of converge's map (raw netlink batch,
/// re-added after each sample): the floor for changing or removing a port.
fn kernel_delete_cost(n: u16) -> Duration {
    let port = (BASE + n - 1).to_be_bytes();
    let key = Bytes::from_slice(&[6, 0, 0, 0, port[0], port[1], 0, 0]);
    let data = Bytes::from_slice(&[10, 99, 0, 2, 0x23, 0x28, 0, 0]); // 10.99.0.2 . 9000
    let one = [(key, data)];
    let msgs = |add| element_messages(&DNAT4_ANY, one.iter().map(|(k, d)| (k, d)), add);
    let mut nft = Nft::open().expect("netlink");
    let samples = (0..REPEAT)
        .map(|_| {
            let del = msgs(false);
            let t = Instant::now();
            nft.commit(&del, None).expect("delete element");
            let d = t.elapsed();
            nft.commit(&msgs(true), None).expect("re-add element");
            d
        })
        .collect();
    median(samples)
}
