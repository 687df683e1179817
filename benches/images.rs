//! Image GC benchmark on real daemons: N unused images of a 4 MB payload each on a
//! daemon whose storage root is a 512 MB tmpfs; `converge apply` with an `images.gc`
//! section whose thresholds make it collect all of them (time of the whole one-shot
//! command, space freed by statvfs), side by side with the usual scripts: one
//! `rmi` per image, and one `image prune -a`. Podman and Docker. Prints a table.
//!
//! Run: `cargo bench --bench images` (root; about a minute). Under
//! `cargo test --all-targets` it does nothing (it needs daemons).

#[path = "../tests/common/mod.rs"]
mod common;

use common::images::{import_image, tmpfs, usage, MB};
use common::sandbox::{converge_bin, TestNode};
use serde_json::json;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const PAYLOAD: u64 = 4 * MB;

struct Daemon<'a> {
    kind: &'static str,
    node: &'a TestNode,
    root: PathBuf,
    /// The daemon's CLI with its global arguments, run in the node.
    cli: Vec<String>,
    converge_args: Vec<String>,
}

impl Daemon<'_> {
    fn cmd(&self) -> Command {
        let mut c = self.node.command(&self.cli[0]);
        c.args(&self.cli[1..]);
        c
    }

    fn run(&self, args: &[&str]) {
        let out = self.cmd().args(args).output().expect("cli");
        assert!(
            out.status.success(),
            "{} {args:?}: {}",
            self.kind,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn import(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let name = format!("localhost/bench-{i}:1");
                let mut cmd = self.cmd();
                cmd.args(["import", "-", &name]);
                import_image(self.node, &name, PAYLOAD, cmd);
                name
            })
            .collect()
    }

    /// `converge apply` with GC thresholds that collect every unused image: the whole
    /// command's time, and the GC's own (its `image gc done … took_ms=` log line: the
    /// users read again, the removals, statvfs before and after).
    fn converge_gc(&self, generation: u64) -> (Duration, Duration) {
        let (used, cap) = usage(&self.root);
        let high = (used * 100 / cap).max(2);
        let doc = json!({"apiVersion": "converge/v1", "node": {"id": "bench", "mode": "worker"},
            "generation": generation, "issuedAt": "2026-12-07T10:00:00Z",
            "images": {"gc": {"highPercent": high, "lowPercent": 1, "minAge": "0s", "keep": ["localhost/busybox"]}}});
        let path = self.node.data_dir().join(format!("gc-{generation}.json"));
        std::fs::write(&path, doc.to_string()).expect("doc");
        let mut cmd = self.node.command(converge_bin());
        cmd.arg("--data-dir")
            .arg(self.node.data_dir().join("cv"))
            .args(&self.converge_args)
            .arg("apply")
            .arg(&path)
            .env("CONVERGE_LOG", "info");
        let t = Instant::now();
        let out = cmd.output().expect("converge apply");
        let took = t.elapsed();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{}: converge apply failed: {log}",
            self.kind
        );
        let gc_ms: u64 = log
            .lines()
            .filter(|l| l.contains("image gc done"))
            .find_map(|l| l.split("took_ms=").nth(1))
            .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .unwrap_or_else(|| panic!("{}: no `image gc done` line in {log}", self.kind));
        (took, Duration::from_millis(gc_ms))
    }
}

struct Row {
    kind: &'static str,
    n: usize,
    converge: Duration,
    gc: Duration,
    freed: u64,
    rmi: Duration,
    prune: Duration,
}

fn bench(d: &Daemon, n: usize, generation: u64) -> Row {
    d.import(n);
    let (before, _) = usage(&d.root);
    let (converge, gc) = d.converge_gc(generation);
    let (after, _) = usage(&d.root);
    let freed = before.saturating_sub(after);

    let names = d.import(n);
    let t = Instant::now();
    for name in &names {
        d.run(&["rmi", name]);
    }
    let rmi = t.elapsed();

    d.import(n);
    let t = Instant::now();
    d.run(&["image", "prune", "-a", "-f"]);
    let prune = t.elapsed();
    // prune -a also took the busybox test image; nothing else uses it here.
    Row {
        kind: d.kind,
        n,
        converge,
        gc,
        freed,
        rmi,
        prune,
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let mut rows = Vec::new();
    {
        let node = TestNode::new("bench-img-p");
        tmpfs(&node.podman_root(), "512m");
        let svc = common::podman::start_podman(&node);
        let mut cli = vec!["podman".to_string()];
        cli.extend(svc.global_args());
        let d = Daemon {
            kind: "podman",
            node: &node,
            root: node.podman_root(),
            cli,
            converge_args: vec![
                "--runtime".into(),
                "podman".into(),
                "--podman-socket".into(),
                svc.socket.display().to_string(),
            ],
        };
        rows.push(bench(&d, 10, 1));
        rows.push(bench(&d, 50, 2));
    }
    {
        let node = TestNode::new("bench-img-d");
        tmpfs(&node.data_dir().join("docker"), "512m");
        let daemon = common::docker::start_docker(&node);
        let d = Daemon {
            kind: "docker",
            node: &node,
            root: daemon.data_root.clone(),
            cli: vec![
                common::docker::DOCKER_CLI.into(),
                "-H".into(),
                daemon.host(),
            ],
            converge_args: vec![
                "--runtime".into(),
                "docker".into(),
                "--docker-socket".into(),
                daemon.socket.display().to_string(),
            ],
        };
        rows.push(bench(&d, 10, 1));
        rows.push(bench(&d, 50, 2));
    }
    println!("| daemon | images | freed (statvfs) | GC removals | per image | whole `converge apply` | `rmi` × N (vs GC) | `image prune -a` (vs GC) |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let gc = r.gc.as_secs_f64();
        println!(
            "| {} | {} | {:.1} MB | {:.2} s | {:.0} ms | {:.2} s | {:.2} s ({:.1}×) | {:.2} s ({:.1}×) |",
            r.kind,
            r.n,
            r.freed as f64 / MB as f64,
            gc,
            gc * 1000.0 / r.n as f64,
            r.converge.as_secs_f64(),
            r.rmi.as_secs_f64(),
            r.rmi.as_secs_f64() / gc,
            r.prune.as_secs_f64(),
            r.prune.as_secs_f64() / gc,
        );
    }
}
