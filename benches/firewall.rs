//! Firewall benchmark on kernel nftables in a sandbox node, side by side with the common
//! approaches: a full table rebuild with `nft -f` of the same ruleset (converge's own
//! table as `nft list` prints it, one atomic file) and one iptables DNAT rule per port
//! (legacy). At 10, 1,000 and 10,000 published ports: initial apply (from an empty
//! ruleset, converge and `nft -f` interleaved, with converge's phases), adding, changing
//! and removing ONE port, a pass with nothing to change, and first-packet connect latency
//! to the last port. Prints a table with ratios and the targets.
//!
//! Run: `cargo bench --bench firewall` (root); `BENCH_PORTS=10000` picks the sizes.
//! Under `cargo test --all-targets` it does nothing.

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
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BASE: u16 = 10_000;
const FRONT: &str = "10.99.0.1";
const BACK: &str = "10.99.0.2";
const REPEAT: usize = 9;
/// Initial applies per approach and size (each from an empty ruleset, interleaved).
const ROUNDS: usize = 7;

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

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn timed(program: &str, args: &[&str]) -> Duration {
    let t = Instant::now();
    sh(program, args);
    t.elapsed()
}

fn nft_f(file: &Path) -> Duration {
    timed("nft", &["-f", file.to_str().unwrap_or("")])
}

/// One converge pass, by phase: observe, plan, apply (the netlink batch), whole pass.
#[derive(Clone, Copy)]
struct Phases([Duration; 4]);

fn pass(rt: &tokio::runtime::Runtime, fw: &Firewall<Kernel>, s: &FirewallSpec) -> Phases {
    let facts = Facts::default();
    rt.block_on(async {
        let t = Instant::now();
        let o = fw.observe(s).await.expect("observe");
        let observe = t.elapsed();
        let p = fw.plan(s, &o, &facts);
        let plan = t.elapsed() - observe;
        drop(o); // as the engine does
        let a = Instant::now();
        for out in fw.apply(p).await {
            assert!(out.error.is_none(), "{out:?}");
        }
        Phases([observe, plan, a.elapsed(), t.elapsed()])
    })
}

fn medians(v: &[Phases]) -> [f64; 4] {
    std::array::from_fn(|i| ms(median(v.iter().map(|p| p.0[i]).collect())))
}

/// converge's table for `s` as `nft list` prints it, built by a fresh converge on an
/// empty ruleset (the baseline's `nft -f` input is exactly converge's ruleset), and the
/// time of that pass.
fn listing(rt: &tokio::runtime::Runtime, s: &FirewallSpec) -> (String, Phases) {
    sh("nft", &["flush", "ruleset"]);
    let took = pass(rt, &Firewall::new(Kernel::new()), s);
    (sh("nft", &["list", "table", "inet", "converge"]), took)
}

/// `nft -f` input holding `listing`; `replace`: preceded by `table …; delete table …`,
/// so the file replaces the table whether or not it exists (the common full rebuild).
fn nft_file(dir: &Path, name: &str, listing: &str, replace: bool) -> PathBuf {
    let path = dir.join(format!("{name}.nft"));
    let prefix = if replace {
        "table inet converge {}\ndelete table inet converge\n"
    } else {
        ""
    };
    std::fs::write(&path, format!("{prefix}{listing}")).expect("write nft file");
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

impl Row {
    fn converge_only(op: String, converge: f64) -> Self {
        Row {
            op,
            converge,
            nft_f: None,
            iptables: None,
        }
    }
}

/// The `nft -f` files of one size: the full table, one port more, one target changed;
/// `initial` without the replace prefix (loaded into an empty ruleset).
struct NftFiles {
    initial: PathBuf,
    full: PathBuf,
    plus: PathBuf,
    changed: PathBuf,
}

/// Also returns the full table's listing and the time of converge's first pass at `n`
/// ports (the process's first of all at the first size: cold caches and allocator).
fn nft_files(rt: &tokio::runtime::Runtime, n: u16, dir: &Path) -> (NftFiles, String, Phases) {
    let (full, first) = listing(rt, &spec(n, None));
    let (plus, _) = listing(rt, &spec(n + 1, None));
    let (changed, _) = listing(rt, &spec(n, Some(n - 1)));
    let files = NftFiles {
        initial: nft_file(dir, &format!("initial-{n}"), &full, false),
        full: nft_file(dir, &format!("full-{n}"), &full, true),
        plus: nft_file(dir, &format!("plus-{n}"), &plus, true),
        changed: nft_file(dir, &format!("changed-{n}"), &changed, true),
    };
    (files, full, first)
}

/// Initial apply into an empty ruleset, converge (a new reconciler, as at an agent's
/// first pass) and `nft -f` of the same ruleset, interleaved (alternating which goes
/// first); then converge again with its nftables event watch open, as in the agent
/// (the kernel then also sends a notification per element, which the watch reads).
/// Returns converge's phases, nft's times and converge's phases with the watch.
fn initial_apply(
    rt: &tokio::runtime::Runtime,
    n: u16,
    files: &NftFiles,
    listed: &str,
) -> (Vec<Phases>, Vec<Duration>, Vec<Phases>) {
    let full = spec(n, None);
    let (mut c, mut f) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for first in [round % 2 == 0, round % 2 != 0] {
            sh("nft", &["flush", "ruleset"]);
            if first {
                let fw = Firewall::new(Kernel::new());
                c.push(pass(rt, &fw, &full));
            } else {
                f.push(nft_f(&files.initial));
                // The same ruleset: what nft -f loaded lists exactly as converge's table.
                if round == 0 {
                    let again = sh("nft", &["list", "table", "inet", "converge"]);
                    assert!(again == listed, "nft -f did not rebuild converge's table");
                }
            }
        }
    }
    let watched = (0..ROUNDS)
        .map(|_| {
            sh("nft", &["flush", "ruleset"]);
            let fw = Firewall::new(Kernel::new());
            let events = fw.host_events().expect("nftables event watch");
            let took = pass(rt, &fw, &full);
            drop(events);
            took
        })
        .collect();
    (c, f, watched)
}

/// converge's passes at `n` ports: [add one, change one, remove one, no change, kernel
/// delete cost, connect latency] in ms; pushes the netlink-batch-only rows.
fn converge_runs(rt: &tokio::runtime::Runtime, n: u16, rows: &mut Vec<Row>) -> [f64; 6] {
    sh("nft", &["flush", "ruleset"]);
    let fw = Firewall::new(Kernel::new());
    let full = spec(n, None);
    pass(rt, &fw, &full);
    // Add, change, remove one port, back and forth; then passes with nothing to do.
    let (mut add, mut change, mut remove, mut noop) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (plus, changed) = (spec(n + 1, None), spec(n, Some(n - 1)));
    for _ in 0..REPEAT {
        add.push(pass(rt, &fw, &plus));
        remove.push(pass(rt, &fw, &full));
        change.push(pass(rt, &fw, &changed));
        pass(rt, &fw, &full);
        noop.push(pass(rt, &fw, &full));
    }
    for (what, v) in [("add", &add), ("change", &change), ("remove", &remove)] {
        rows.push(Row::converge_only(
            format!("{n:>6} ports: {what} one port, netlink batch only"),
            medians(v)[2],
        ));
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
    rows.push(Row::converge_only(
        format!(
            "{n:>6} ports: port digests, once per document (parse {:.3}, validate {:.3})",
            ms(parse),
            ms(validate)
        ),
        ms(digests),
    ));
    let latency = connect_latency(BASE + n - 1);
    let kernel = kernel_delete_cost(n);
    [
        medians(&add)[3],
        medians(&change)[3],
        medians(&remove)[3],
        medians(&noop)[3],
        ms(kernel),
        ms(latency),
    ]
}

/// `nft -f` of the same ruleset at `n` ports: [add one, change one, remove one, no
/// change (the same file again), connect latency] in ms, each a whole-table rebuild.
fn nft_runs(n: u16, files: &NftFiles) -> [f64; 5] {
    sh("nft", &["flush", "ruleset"]);
    nft_f(&files.full);
    let f_latency = connect_latency(BASE + n - 1);
    let (mut add, mut change, mut remove, mut noop) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..REPEAT {
        add.push(nft_f(&files.plus));
        remove.push(nft_f(&files.full));
        change.push(nft_f(&files.changed));
        nft_f(&files.full);
        noop.push(nft_f(&files.full));
    }
    [
        ms(median(add)),
        ms(median(change)),
        ms(median(remove)),
        ms(median(noop)),
        ms(f_latency),
    ]
}

/// iptables (legacy), one DNAT rule per port and chain: [initial (iptables-restore into
/// an empty table), add one, change one, remove one, no change (the same file restored
/// again), connect latency] in ms. One-port changes touch the OUTPUT chain only.
fn iptables_runs(n: u16, dir: &Path) -> [f64; 6] {
    sh("nft", &["flush", "ruleset"]);
    let rules = dir.join(format!("ipt-{n}"));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&rules).expect("create"));
    writeln!(f, "*nat").ok();
    for i in 0..n {
        for chain in ["PREROUTING", "OUTPUT"] {
            writeln!(
                f,
                "-A {chain} -d {FRONT} -p tcp --dport {} -j DNAT --to-destination {BACK}:9000",
                BASE + i
            )
            .ok();
        }
    }
    writeln!(f, "COMMIT").ok();
    drop(f);
    let restore = || timed("iptables-legacy-restore", &[rules.to_str().unwrap_or("")]);
    let initial = restore();
    let latency = connect_latency(BASE + n - 1);
    let rule = |op: &str, port: u16, to: u16| {
        let (port, to) = (port.to_string(), format!("{BACK}:{to}"));
        let last = n.to_string();
        let mut args = vec!["-t", "nat", op, "OUTPUT"];
        if op == "-R" {
            args.push(&last);
        }
        args.extend(["-d", FRONT, "-p", "tcp", "--dport", &port, "-j", "DNAT"]);
        args.extend(["--to-destination", &to]);
        timed("iptables-legacy", &args)
    };
    let (mut add, mut change, mut remove, mut noop) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..REPEAT {
        add.push(rule("-A", BASE + n, 9000));
        remove.push(rule("-D", BASE + n, 9000));
        change.push(rule("-R", BASE + n - 1, 9001));
        rule("-R", BASE + n - 1, 9000);
        noop.push(restore());
    }
    sh("iptables-legacy", &["-t", "nat", "-F"]);
    [
        ms(initial),
        ms(median(add)),
        ms(median(change)),
        ms(median(remove)),
        ms(median(noop)),
        ms(latency),
    ]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let sizes: Vec<u16> = std::env::var("BENCH_PORTS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10, 1_000, 10_000]);
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
        for n in sizes {
            let (files, listed, first) = nft_files(&rt, n, &dir);
            let (c_init, f_init, c_watched) = initial_apply(&rt, n, &files, &listed);
            let [c_add, c_change, c_remove, c_noop, k_del, c_latency] =
                converge_runs(&rt, n, &mut rows);
            let [f_add, f_change, f_remove, f_noop, f_latency] = nft_runs(n, &files);
            // For orientation: the same one-port change as one `nft` element command.
            let port = BASE + n - 1;
            let f_del = median(
                (0..REPEAT)
                    .map(|_| {
                        let t = timed(
                            "nft",
                            &[
                                "delete",
                                "element",
                                "inet",
                                "converge",
                                "dnat4_any",
                                &format!("{{ tcp . {port} }}"),
                            ],
                        );
                        sh(
                            "nft",
                            &[
                                "add",
                                "element",
                                "inet",
                                "converge",
                                "dnat4_any",
                                &format!("{{ tcp . {port} : {BACK} . 9000 }}"),
                            ],
                        );
                        t
                    })
                    .collect(),
            );
            let [i_init, i_add, i_change, i_remove, i_noop, i_latency] = iptables_runs(n, &dir);

            let init = medians(&c_init);
            let f_init = ms(median(f_init));
            summary.push((
                n, c_add, c_change, c_remove, f_add, k_del, c_latency, i_latency, init[3], f_init,
            ));
            let row = |what: &str, c: f64, f: Option<f64>, i: Option<f64>| Row {
                op: format!("{n:>6} ports: {what}"),
                converge: c,
                nft_f: f,
                iptables: i,
            };
            rows.push(row(
                "initial apply (empty ruleset)",
                init[3],
                Some(f_init),
                Some(i_init),
            ));
            for (i, phase) in ["observe", "plan", "apply (netlink batch)"]
                .into_iter()
                .enumerate()
            {
                rows.push(row(
                    &format!("  initial apply: {phase}"),
                    init[i],
                    None,
                    None,
                ));
            }
            let watched = medians(&c_watched)[3];
            let with_watch = "initial apply with the event watch open (as in the agent)";
            rows.push(row(with_watch, watched, Some(f_init), None));
            let cold = "initial apply, converge's first pass at this size (once)";
            rows.push(row(cold, ms(first.0[3]), None, None));
            rows.push(row("add one port", c_add, Some(f_add), Some(i_add)));
            rows.push(row(
                "change one port's target",
                c_change,
                Some(f_change),
                Some(i_change),
            ));
            rows.push(row(
                "remove one port",
                c_remove,
                Some(f_remove),
                Some(i_remove),
            ));
            rows.push(row(
                "no change (converged)",
                c_noop,
                Some(f_noop),
                Some(i_noop),
            ));
            rows.push(row(
                "`nft delete element` (one process)",
                ms(f_del),
                None,
                None,
            ));
            rows.push(row(
                "kernel cost of one element delete (raw netlink)",
                k_del,
                None,
                None,
            ));
            rows.push(row(
                "first-packet connect (median)",
                c_latency,
                Some(f_latency),
                Some(i_latency),
            ));
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
        let (n, add, change, remove, rebuild, kernel, lat, ipt_lat, init, f_init) = *big;
        println!("\nTargets at {n} ports (same run):");
        println!(
            "  initial apply vs nft -f of the same ruleset: {:.2}x (target >= 1.0x)",
            f_init / init
        );
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
    println!("\nconverge = one whole reconcile pass (observe, plan, one atomic netlink batch); initial: a new reconciler, median of {ROUNDS} from an empty ruleset, phases each their own median.");
    println!("nft -f = converge's own table as `nft list` prints it, loaded whole (initial: into an empty ruleset, interleaved with converge; then a full rebuild per change); iptables = legacy, one DNAT rule per port (initial and no change: iptables-restore; one-port changes: one iptables call on OUTPUT).");
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
