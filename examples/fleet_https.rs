//! Simulated fleet over HTTPS: N lightweight node clients in one process against the
//! reference control plane (`converge control-plane serve --tls-cert --tls-key`).
//! Each client enrolls with its own one-time token (`POST /v1/enroll`, fresh Ed25519 and
//! X25519 keys), then runs the node's real `HttpsTransport` (its own reqwest client, so
//! its own connections; signed long poll `GET /v1/nodes/<id>/document?after=G`); it
//! verifies each envelope with the pinned key and acknowledges it with a status message
//! (`POST /v1/nodes/<id>/status`, `acceptedGeneration`) through `Transport::send`, also
//! on connecting and every heartbeat, as the agent does. No reconcilers.
//!
//! Generation 1 is written for every node first (the setup ends when all acknowledged
//! it); after an idle window, generation 2 is written into the documents directory for
//! all N nodes. Printed: the time from the start of writing until each node received its
//! envelope and until its status was recorded by the control plane (the `204` of the
//! status request: the plane writes it to SQLite before answering), p50/p99/max; the
//! plane's 300 ms scan period is part of these. Also this process's RSS per node and idle
//! CPU, and the control plane's RSS (now, peak) and CPU (idle, and during the update).
//!
//! Run through `benches/fleet_https.sh` (makes the CA, starts the plane), or by hand:
//! `cargo run --release --example fleet_https -- https://127.0.0.1:8443 CA.pem DOCS DATA PLANE_PID N [HEARTBEAT_SECS]`

use anyhow::Context;
use converge::control::envelope::Envelope;
use converge::control::https::HttpsTransport;
use converge::control::identity::{parse_public_key, Identity};
use converge::control::plane_store::PlaneStore;
use converge::control::protocol::{
    EnrollRequest, EnrollResponse, Facts, NodeMessage, StatusMessage,
};
use converge::control::transport::{backoff, Event, Transport};
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// VmRSS and VmHWM of a process, in KiB.
fn rss_kb(pid: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// utime + stime of a process, in seconds (clock ticks at 100 Hz on Linux).
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn facts(name: &str) -> Facts {
    Facts {
        hostname: name.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        kernel: "bench".into(),
        converge_version: env!("CARGO_PKG_VERSION").into(),
        container_runtime: "none".into(),
        wireguard_public_keys: Default::default(),
        mode: "worker".into(),
    }
}

/// One enrolled simulated node.
struct Enrolled {
    id: String,
    identity: Identity,
    pinned: ed25519_dalek::VerifyingKey,
}

/// Enrollment with a fresh one-time token, over the real protocol.
async fn enroll(
    client: &reqwest::Client,
    base: &str,
    token: String,
    name: String,
) -> anyhow::Result<Enrolled> {
    let identity = Identity::ephemeral();
    let req = EnrollRequest {
        token,
        name: name.clone(),
        public_key: identity.public_key_b64(),
        sealing_key: identity.sealing_key_b64(),
        facts: facts(&name),
        nats_key: None,
    };
    let resp = client
        .post(format!("{base}/v1/enroll"))
        .json(&req)
        .send()
        .await
        .with_context(|| format!("enroll {name}"))?;
    let code = resp.status();
    if !code.is_success() {
        anyhow::bail!("enroll {name}: HTTP {code}: {}", resp.text().await?);
    }
    let answer: EnrollResponse = resp.json().await.context("enrollment answer")?;
    let pinned = parse_public_key(&answer.signing_key)
        .ok_or_else(|| anyhow::anyhow!("bad signing key in the enrollment answer"))?;
    Ok(Enrolled {
        id: answer.node_id,
        identity,
        pinned,
    })
}

/// What a node reports to the measuring loop.
enum Report {
    /// Received, verified envelope of this generation.
    Received(u64),
    /// The control plane answered the status acknowledging this generation.
    Acked(u64),
}

/// A minimal valid document for `id` (what tests/control.rs uses).
fn write_doc(docs: &Path, id: &str, generation: u64) -> anyhow::Result<()> {
    let doc = serde_json::json!({
        "apiVersion": "converge/v1",
        "node": {"id": id, "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-11-24T10:00:00Z"
    });
    // Written aside and renamed: the plane's scan ignores `.tmp` and never sees half a file.
    let tmp = docs.join(format!("{id}.json.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&doc)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, docs.join(format!("{id}.json")))
        .with_context(|| format!("rename {}", tmp.display()))?;
    Ok(())
}

/// Sends a status with `accepted`, retrying a few times with the agent's backoff.
async fn ack(t: &HttpsTransport, id: &str, name: &str, accepted: u64, heartbeat: u64) -> bool {
    let msg = NodeMessage::Status(Box::new(StatusMessage {
        node_id: id.to_string(),
        sent_at: now(),
        accepted_generation: Some(accepted),
        reconcilers: Vec::new(),
        facts: facts(name),
        heartbeat_secs: heartbeat,
    }));
    for attempt in 0..6 {
        match t.send(&msg).await {
            Ok(()) => return true,
            Err(_) => tokio::time::sleep(backoff(attempt)).await,
        }
    }
    false
}

/// One node: the transport's events, acknowledgements, heartbeats.
async fn run_node(
    node: Enrolled,
    t: HttpsTransport,
    name: String,
    heartbeat: u64,
    reports: mpsc::UnboundedSender<(usize, Report, Instant)>,
    index: usize,
    errors: Arc<AtomicUsize>,
) {
    let (tx, mut rx) = mpsc::channel(16);
    t.start(tx, 0);
    let accepted = Arc::new(AtomicU64::new(0));
    if heartbeat > 0 {
        let (t, id, name, accepted) = (t.clone(), node.id.clone(), name.clone(), accepted.clone());
        tokio::spawn(async move {
            // Spread over the period, as independent nodes would be.
            let period = Duration::from_secs(heartbeat);
            tokio::time::sleep(period.mul_f64(fastrand::f64())).await;
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let g = accepted.load(Ordering::Relaxed);
                if g > 0 {
                    ack(&t, &id, &name, g, heartbeat).await;
                }
            }
        });
    }
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Connected => {
                let g = accepted.load(Ordering::Relaxed);
                if g > 0 {
                    ack(&t, &node.id, &name, g, heartbeat).await;
                }
            }
            Event::Disconnected(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            // Simulated nodes do not answer dry runs (not measured yet).
            Event::DryRun(_) => {}
            Event::Envelope(bytes, reply) => {
                let applied = Some(accepted.load(Ordering::Relaxed)).filter(|g| *g > 0);
                let verified = Envelope::parse(&bytes).ok().and_then(|env| {
                    env.verify(&node.pinned, &node.id, applied)
                        .ok()
                        .map(|_| env.generation)
                });
                if let Some(reply) = reply {
                    let _ = reply.send(verified.max(applied));
                }
                let Some(g) = verified else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let _ = reports.send((index, Report::Received(g), Instant::now()));
                accepted.store(g, Ordering::Relaxed);
                if ack(&t, &node.id, &name, g, heartbeat).await {
                    let _ = reports.send((index, Report::Acked(g), Instant::now()));
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

fn quantiles(mut lat: Vec<Duration>) -> (Duration, Duration, Duration) {
    lat.sort();
    let q = |f: f64| {
        lat.get(((lat.len() as f64 * f) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    (q(0.50), q(0.99), lat.last().copied().unwrap_or_default())
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, ca, docs, data, plane_pid, n, heartbeat) = match args.as_slice() {
        [u, c, d, a, p, n] => (u, c, d, a, p, n, 15),
        [u, c, d, a, p, n, h] => (u, c, d, a, p, n, h.parse()?),
        _ => anyhow::bail!(
            "usage: fleet_https URL CA_PEM DOCS DATA PLANE_PID NODES [HEARTBEAT_SECS]"
        ),
    };
    let base = url.trim_end_matches('/').to_string();
    let n: usize = n.parse()?;
    let docs = PathBuf::from(docs);
    let ca_pem = std::fs::read_to_string(ca).with_context(|| format!("read {ca}"))?;
    let me = std::process::id().to_string();
    let wait_limit = Duration::from_secs(60);

    // Tokens straight into the plane's store (what `control-plane token` does), N of them.
    let started = Instant::now();
    let tokens = {
        let store = PlaneStore::open(&converge::control::plane::db_path(Path::new(data)))?;
        let mut tokens = Vec::with_capacity(n);
        for _ in 0..n {
            let mut raw = [0u8; 24];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut raw);
            let token = hex::encode(raw);
            store.add_token(&token, 3600, &Default::default())?;
            tokens.push(token);
        }
        tokens
    };
    let enroll_client =
        converge::control::protocol::http_client(Some(&ca_pem), Duration::from_secs(30))?;
    let enrolled: Vec<anyhow::Result<Enrolled>> =
        futures::stream::iter(tokens.into_iter().enumerate().map(|(i, token)| {
            let (client, base) = (&enroll_client, &base);
            async move { enroll(client, base, token, format!("fleet-{i}")).await }
        }))
        .buffered(8)
        .collect()
        .await;
    let enrolled = enrolled.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    drop(enroll_client);
    let enroll_time = started.elapsed();

    // Generation 1 for everyone: the clients start on it (their first poll answers at once).
    for e in &enrolled {
        write_doc(&docs, &e.id, 1)?;
    }
    let rss0 = rss_kb(&me).0;
    let (rtx, mut reports) = mpsc::unbounded_channel();
    let errors = Arc::new(AtomicUsize::new(0));
    let mut ids = Vec::with_capacity(n);
    for (i, node) in enrolled.into_iter().enumerate() {
        let t = HttpsTransport::new(
            &base,
            &node.id,
            node.identity.signing_key().clone(),
            Some(&ca_pem),
            converge::control::envelope::max_bytes(converge::limits::DEFAULT_MAX_DOCUMENT_BYTES),
            None,
        )?;
        ids.push(node.id.clone());
        tokio::spawn(run_node(
            node,
            t,
            format!("fleet-{i}"),
            heartbeat,
            rtx.clone(),
            i,
            errors.clone(),
        ));
    }
    let mut acked1 = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while acked1 < n {
        match tokio::time::timeout_at(deadline, reports.recv()).await {
            Ok(Some((_, Report::Acked(1), _))) => acked1 += 1,
            Ok(Some(_)) => {}
            _ => anyhow::bail!("setup: only {acked1}/{n} nodes acknowledged generation 1 in 120 s"),
        }
    }
    let setup = started.elapsed();
    let rss_conn = rss_kb(&me).0;

    // Idle: every node holds a long poll (renewed every 25 s) and sends its heartbeat.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_secs = 20.0;
    let (c0, p0) = (cpu_secs(&me), cpu_secs(plane_pid));
    tokio::time::sleep(Duration::from_secs_f64(idle_secs)).await;
    let idle_cpu = (cpu_secs(&me) - c0) / idle_secs * 100.0;
    let plane_idle_cpu = (cpu_secs(plane_pid) - p0) / idle_secs * 100.0;
    let rss_idle = rss_kb(&me).0;

    // Generation 2 for all N nodes, timed from the start of writing.
    let (c1, p1) = (cpu_secs(&me), cpu_secs(plane_pid));
    let t0 = Instant::now();
    for id in &ids {
        write_doc(&docs, id, 2)?;
    }
    let written = t0.elapsed();
    let (mut got, mut acked) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let deadline = tokio::time::Instant::now() + wait_limit;
    while acked.len() < n {
        match tokio::time::timeout_at(deadline, reports.recv()).await {
            Ok(Some((_, Report::Received(2), at))) => got.push(at - t0),
            Ok(Some((_, Report::Acked(2), at))) => acked.push(at - t0),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let update_cpu = cpu_secs(&me) - c1;
    let plane_update_cpu = cpu_secs(plane_pid) - p1;
    let (plane_rss, plane_hwm) = rss_kb(plane_pid);
    // What the control plane has on record (its store, as `control-plane nodes` shows it).
    let recorded = PlaneStore::open(&converge::control::plane::db_path(Path::new(data)))?
        .nodes()?
        .iter()
        .filter(|r| r.accepted_generation == Some(2))
        .count();

    let (g50, g99, gmax) = quantiles(got.clone());
    let (a50, a99, amax) = quantiles(acked.clone());
    let per_node_kb = rss_conn.saturating_sub(rss0) as f64 / n as f64;
    println!(
        "nodes {n}: enrolled in {enroll_time:.1?}, all on generation 1 after {setup:.1?}; generation 2 written in {written:.1?}"
    );
    println!(
        "  received {}/{n}: p50 {}, p99 {}, max {}",
        got.len(),
        ms(g50),
        ms(g99),
        ms(gmax)
    );
    println!(
        "  status recorded {}/{n} (plane's store: {recorded} at generation 2): p50 {}, p99 {}, max {}",
        acked.len(),
        ms(a50),
        ms(a99),
        ms(amax)
    );
    println!(
        "  15 s polling would take 7.5 s on average (15 s at worst) plus the same processing; p50 here is {:.0}x shorter",
        7.5 / a50.as_secs_f64().max(0.001)
    );
    println!(
        "  client process: RSS {:.1} MB for {n} nodes ({per_node_kb:.0} KB each; idle {:.1} MB), idle CPU {idle_cpu:.2} % for all, {update_cpu:.2} s CPU for the update; transport errors {}",
        rss_conn as f64 / 1024.0,
        rss_idle as f64 / 1024.0,
        errors.load(Ordering::Relaxed)
    );
    println!(
        "  control plane: RSS {:.1} MB (peak {:.1} MB), idle CPU {plane_idle_cpu:.1} %, {plane_update_cpu:.2} s CPU for the update",
        plane_rss as f64 / 1024.0,
        plane_hwm as f64 / 1024.0
    );
    // One table row for the driver script.
    println!(
        "ROW | {n} | {} | {} | {} | {}/{n} | {} | {} | {}/{n} | {per_node_kb:.0} KB | {idle_cpu:.1} % | {:.0} MB ({:.0} MB peak) | {plane_idle_cpu:.1} % | {plane_update_cpu:.1} s |",
        ms(g50),
        ms(g99),
        ms(gmax),
        got.len(),
        ms(a50),
        ms(a99),
        recorded,
        plane_rss as f64 / 1024.0,
        plane_hwm as f64 / 1024.0
    );
    Ok(())
}
