//! Containers benchmark on a real Podman service in a sandbox node, side by side with
//! the common approach (one `podman run` / `podman rm` per container, sequentially):
//! converging 50 and 200 containers from empty, changing one container among 200,
//! CPU time of a no-op pass over 200 containers (target < 50 ms), and events-to-restart
//! latency of a killed container. Prints a table with ratios.
//!
//! Run: `cargo bench --bench containers` (root; takes a few minutes). Under
//! `cargo test --all-targets` it does nothing (it needs minutes and a daemon).

#[path = "../tests/common/mod.rs"]
mod common;

use common::sandbox::{converge_bin, TestNode};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

const IMAGE: &str = "localhost/busybox:test";

struct Bench<'a> {
    node: &'a TestNode,
    socket: String,
    podman: Vec<String>,
}

impl Bench<'_> {
    fn podman(&self, args: &[&str]) -> bool {
        let mut cmd = self.node.command(&self.podman[0]);
        cmd.args(&self.podman[1..]).args(args);
        cmd.output().map(|o| o.status.success()).unwrap_or(false)
    }

    fn converge(&self, args: &[&str]) -> bool {
        let mut cmd = self.node.command(converge_bin());
        cmd.args([
            "--data-dir",
            &self.node.data_dir().join("cv").display().to_string(),
            "--runtime",
            "podman",
            "--podman-socket",
            &self.socket,
        ]);
        cmd.args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd.status().map(|s| s.code() == Some(0)).unwrap_or(false)
    }

    fn apply(&self, generation: u64, n: usize, changed: Option<usize>) -> Duration {
        let containers: Vec<_> = (0..n)
            .map(|i| {
                let v = if changed == Some(i) { "2" } else { "1" };
                json!({"name": format!("c{i}"), "image": IMAGE, "command": ["sleep", "3600"], "env": {"V": v}, "stopGracePeriod": "1s"})
            })
            .collect();
        let doc = json!({"apiVersion": "converge/v1", "node": {"id": "bench", "mode": "worker"}, "generation": generation,
                         "issuedAt": "2026-11-24T10:00:00Z", "containers": containers});
        let path = self.node.data_dir().join(format!("doc-{generation}.json"));
        std::fs::write(&path, doc.to_string()).expect("write doc");
        let t = Instant::now();
        assert!(
            self.converge(&["apply", &path.display().to_string()]),
            "converge apply failed"
        );
        t.elapsed()
    }

    fn shell_run(&self, i: usize, v: &str) {
        let name = format!("s{i}");
        assert!(self.podman(&[
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            "bench=shell",
            "-e",
            &format!("V={v}"),
            IMAGE,
            "sleep",
            "3600"
        ]));
    }

    fn shell_rm(&self, i: usize) {
        assert!(self.podman(&["rm", "-f", "-t", "1", &format!("s{i}")]));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let node = TestNode::new("bench-ctr");
    let svc = common::podman::start_podman(&node);
    let b = Bench {
        node: &node,
        socket: svc.socket.display().to_string(),
        podman: vec![
            "podman".into(),
            "--root".into(),
            node.podman_root().display().to_string(),
            "--runroot".into(),
            node.podman_runroot().display().to_string(),
        ],
    };
    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    let mut generation = 0;
    // `-- --latency-only`: skip the (slow) side-by-side runs, measure the no-op pass and
    // restart latency over 200 converged containers only.
    if std::env::args().any(|a| a == "--latency-only") {
        generation += 1;
        b.apply(generation, 200, Some(7));
    } else {
        side_by_side(&b, &mut rows, &mut generation);
    }
    // No-op pass over 200 converged containers: observe + plan in this process.
    let (noop, noop_events) = noop_pass(&b.socket);

    // Events → restart latency through the agent.
    let restart = restart_latency(&b);

    println!(
        "\ncontainers on Podman 4.3 (busybox, {} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:<36} {:>12} {:>16} {:>8}",
        "operation", "converge ms", "podman CLI ms", "speedup"
    );
    for (name, cv, sh) in &rows {
        println!("{name:<36} {cv:>12.0} {sh:>16.0} {:>7.1}x", sh / cv);
    }
    println!(
        "{:<36} {:>12.1} {:>16} {:>8}",
        "no-op pass, 200 containers: wall",
        ms(noop.0),
        "-",
        "-"
    );
    println!(
        "{:<36} {:>12.1} {:>16} {:>8}",
        "no-op pass, 200 containers: CPU",
        ms(noop.1),
        "target < 50",
        format!("{:.2}", ms(noop.1) / 50.0)
    );
    println!(
        "{:<36} {:>12.1} {:>16} {:>8}",
        "  same, event stream connected: wall",
        ms(noop_events.0),
        "-",
        "-"
    );
    println!(
        "{:<36} {:>12.1} {:>16} {:>8}",
        "  same, event stream connected: CPU",
        ms(noop_events.1),
        "target < 50",
        format!("{:.2}", ms(noop_events.1) / 50.0)
    );
    println!(
        "{:<36} {:>12.0} {:>16} {:>8}",
        "killed container running again (median of 5)",
        ms(restart),
        "-",
        "-"
    );
}

/// Converge vs one podman CLI call per container, sequentially.
fn side_by_side(b: &Bench, rows: &mut Vec<(String, f64, f64)>, generation: &mut u64) {
    for n in [50usize, 200] {
        *generation += 1;
        let cv_create = b.apply(*generation, n, None);
        *generation += 1;
        let cv_remove = b.apply(*generation, 0, None);
        let t = Instant::now();
        for i in 0..n {
            b.shell_run(i, "1");
        }
        let sh_create = t.elapsed();
        let t = Instant::now();
        for i in 0..n {
            b.shell_rm(i);
        }
        let sh_remove = t.elapsed();
        rows.push((
            format!("create {n} containers from empty"),
            ms(cv_create),
            ms(sh_create),
        ));
        rows.push((
            format!("remove {n} containers"),
            ms(cv_remove),
            ms(sh_remove),
        ));
    }
    // Change one among 200.
    *generation += 1;
    b.apply(*generation, 200, None);
    *generation += 1;
    let cv_change = b.apply(*generation, 200, Some(7));
    for i in 0..200 {
        b.shell_run(i, "1");
    }
    let t = Instant::now();
    b.shell_rm(7);
    b.shell_run(7, "2");
    let sh_change = t.elapsed();
    rows.push((
        "change 1 of 200 (CLI: rm -f + run)".into(),
        ms(cv_change),
        ms(sh_change),
    ));
    // Like for like: what converge does without downtime, by hand. Start the new
    // instance, give it converge's readiness wait (1 s running, no health check), stop
    // the old one with its grace period, remove it, rename the new one.
    let t = Instant::now();
    assert!(b.podman(&[
        "run",
        "-d",
        "--name",
        "s7--next",
        "--label",
        "bench=shell",
        "-e",
        "V=3",
        IMAGE,
        "sleep",
        "3600",
    ]));
    std::thread::sleep(Duration::from_secs(1));
    assert!(b.podman(&["stop", "-t", "1", "s7"]));
    assert!(b.podman(&["rm", "s7"]));
    assert!(b.podman(&["rename", "s7--next", "s7"]));
    rows.push((
        "change 1 of 200 (CLI: zero-downtime)".into(),
        ms(cv_change),
        ms(t.elapsed()),
    ));
    for i in 0..200 {
        b.shell_rm(i);
    }
}

/// Best of 5 no-op passes (wall, CPU): without and with the event stream connected.
fn noop_pass(socket: &str) -> ((Duration, Duration), (Duration, Duration)) {
    use converge_containers::podman::Podman;
    use converge_containers::{Config, Containers};
    use converge_core::{Facts, Reconciler};
    use futures::StreamExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let spec = converge_containers::Workload {
        containers: Some(serde_json::from_value(json!((0..200)
            .map(|i| json!({"name": format!("c{i}"), "image": IMAGE, "command": ["sleep", "3600"], "env": {"V": if i == 7 { "2" } else { "1" }}, "stopGracePeriod": "1s"}))
            .collect::<Vec<_>>()))
        .expect("spec")),
        networks: None,
        registries: Vec::new(),
        images: None,
    };
    let c = Containers::new(
        Podman::new(Path::new(socket)),
        Config::new("bench", "/nonexistent"),
    );
    let passes = || async {
        let mut best = (Duration::MAX, Duration::MAX);
        for _ in 0..5 {
            let (t, cpu) = (Instant::now(), cpu_time());
            let obs = c.observe(&spec).await.expect("observe");
            let plan = c.plan(&spec, &obs, &Facts::default());
            assert!(plan.is_empty(), "not a no-op: {:?}", plan.changes.first());
            best = (best.0.min(t.elapsed()), best.1.min(cpu_time() - cpu));
        }
        best
    };
    rt.block_on(async {
        let cold = passes().await;
        // As in the agent: with the event stream connected, unchanged containers are
        // not inspected again.
        let mut events = c.host_events().expect("podman events");
        let drain = tokio::spawn(async move { while events.next().await.is_some() {} });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let warm = passes().await;
        drain.abort();
        (cold, warm)
    })
}

fn restart_latency(b: &Bench) -> Duration {
    let mut cmd = b.node.command(converge_bin());
    cmd.args([
        "--data-dir",
        &b.node.data_dir().join("cv").display().to_string(),
        "--runtime",
        "podman",
        "--podman-socket",
        &b.socket,
        "agent",
        "--node-id",
        "bench",
    ]);
    cmd.stderr(std::process::Stdio::null());
    let _agent = b.node.spawn(&mut cmd);
    std::thread::sleep(Duration::from_secs(3));
    let mut samples = Vec::new();
    let started = |name: &str| {
        let mut cmd = b.node.command(&b.podman[0]);
        cmd.args(&b.podman[1..]).args([
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.StartedAt}}",
            name,
        ]);
        cmd.output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    for i in 0..5 {
        let name = format!("c{}", i * 10);
        let before = started(&name);
        assert!(b.podman(&["kill", &name]));
        let t = Instant::now();
        // Running again with a new start time: converge saw the event and restarted it.
        loop {
            let now = started(&name);
            if now.starts_with("running") && now != before {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{name} not restarted"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        samples.push(t.elapsed());
        std::thread::sleep(Duration::from_secs(1));
    }
    samples.sort();
    samples[samples.len() / 2]
}
