//! Simulated fleet against the reference control plane (`converge control-plane serve`):
//! N lightweight node clients in one process, each on the transport the plane hands out
//! at enrollment, as `converge join` takes it: HTTPS long poll, or NATS JetStream when
//! the plane serves with `--nats` (TLS verified against the CA, the node's identity key
//! as its nkey, per-node permissions). Each client enrolls with its own one-time token
//! (`POST /v1/enroll`, fresh Ed25519 and X25519 keys), then runs the node's real
//! transport (`HttpsTransport`: its own reqwest client and connections, signed long poll;
//! `NatsTransport`: its own connection to the durable consumer the plane makes for it);
//! it verifies each envelope with the pinned key and acknowledges it with a status
//! message (`acceptedGeneration`) through `Transport::send`, also on connecting and
//! every heartbeat, as the agent does. No reconcilers.
//!
//! Generation 1 is written for every node first (the setup ends when all acknowledged
//! it); after an idle window (`IDLE_SECS`, default 20), generation 2 is written for all
//! N nodes (staged as `.tmp` files, then renamed into the documents directory). Printed:
//! the time from the first rename until each node received its envelope and until its
//! status was sent (HTTPS: the `204` of the status request, after the plane wrote it to
//! SQLite; NATS: published and flushed to the server), p50/p99/max; the plane's 300 ms
//! scan period is part of these. Also this process's RSS per node and idle CPU, and the
//! control plane's RSS (now, peak) and CPU (idle, and during the update).
//!
//! Dry runs (`PLANS=K`, `CONVERGE=<the converge binary>`): each node answers a dry-run
//! request as the agent does: the request verified against the pinned key in its own
//! signature domain, for this node, within the clock window; the candidate parsed and
//! validated by converge's own parser and checked against the accepted generation.
//! The simulated node has no host, so its plan is synthetic: every network, container
//! and DNS record of the candidate is to be created, in the real answer format (a
//! `planned` message with counts by reconciler and the plan text). The candidates
//! (generation 3: a network, five containers and 20 DNS records per node) are written
//! to `<DOCS>/../candidates`; then `converge control-plane plan` runs K times, each
//! timed from its start until it exited having printed the aggregate (`-o json`, its
//! summary checked: every node answered with changes).
//!
//! Run through `benches/fleet_https.sh` or `benches/fleet_plan.sh` (they make the CA
//! and start the plane), or by hand:
//! `cargo run --release --example fleet_plane -- https://127.0.0.1:8443 CA.pem DOCS DATA PLANE_PID N [HEARTBEAT_SECS]`

use anyhow::Context;
use converge::control::dryrun::{DryRunError, DryRunRequest, Outcome, PlanAnswer, Problem};
use converge::control::envelope::Envelope;
use converge::control::https::HttpsTransport;
use converge::control::identity::{parse_public_key, Identity};
use converge::control::plane_store::PlaneStore;
use converge::control::protocol::{
    EnrollRequest, EnrollResponse, Facts, NodeMessage, StatusMessage, Transport as Link,
};
use converge::control::transport::{backoff, Event, Transport};
use futures::StreamExt;
use std::collections::BTreeMap;
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

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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
    transport: Link,
}

/// Enrollment with a fresh one-time token, over the real protocol (with the identity
/// key as the NATS nkey, which a plane without NATS ignores).
async fn enroll(
    client: &reqwest::Client,
    base: &str,
    token: String,
    name: String,
) -> anyhow::Result<Enrolled> {
    let identity = Identity::ephemeral();
    let (nats_key, _) =
        converge::control::nats::nkey(identity.signing_key()).map_err(|e| anyhow::anyhow!(e))?;
    let req = EnrollRequest {
        token,
        name: name.clone(),
        public_key: identity.public_key_b64(),
        sealing_key: identity.sealing_key_b64(),
        facts: facts(&name),
        nats_key: Some(nats_key),
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
        transport: answer.transport,
    })
}

/// What a node reports to the measuring loop.
enum Report {
    /// Received, verified envelope of this generation.
    Received(u64),
    /// The status acknowledging this generation was sent.
    Acked(u64),
}

/// Writes `doc` as `<dir>/<id>.json`, aside and renamed: the plane's scan ignores
/// `.tmp` and never sees half a file.
fn write_json(dir: &Path, id: &str, doc: &serde_json::Value) -> anyhow::Result<()> {
    let tmp = stage_json(dir, id, doc)?;
    std::fs::rename(&tmp, dir.join(format!("{id}.json")))
        .with_context(|| format!("rename {}", tmp.display()))?;
    Ok(())
}

/// Writes `doc` as `<dir>/<id>.json.tmp` (invisible to the scan); returns its path.
fn stage_json(dir: &Path, id: &str, doc: &serde_json::Value) -> anyhow::Result<PathBuf> {
    let tmp = dir.join(format!("{id}.json.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(doc)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    Ok(tmp)
}

/// A minimal valid document for `id` (what tests/control.rs uses).
fn doc(id: &str, generation: u64) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "converge/v1",
        "node": {"id": id, "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-11-24T10:00:00Z"
    })
}

/// A dry run's candidate for `id`: a network, five containers on it and 20 DNS records
/// (about 2 KB, a small worker).
fn write_candidate(dir: &Path, id: &str, generation: u64) -> anyhow::Result<()> {
    let containers: Vec<serde_json::Value> = (0..5)
        .map(|i| {
            serde_json::json!({
                "name": format!("svc-{i}"),
                "image": "localhost/busybox:test",
                "command": ["httpd", "-f", "-p", (8080 + i).to_string(), "-h", "/bin"],
                "env": {"RUST_LOG": "info"},
                "resources": {"cpus": 0.5, "memory": "256Mi"},
                "network": "apps",
                "ip": format!("10.89.7.{}", 10 + i)
            })
        })
        .collect();
    let records: Vec<serde_json::Value> = (0..20)
        .map(|i| serde_json::json!({"name": format!("svc-{i}.internal"), "type": "A", "values": [format!("10.89.7.{}", 10 + i)]}))
        .collect();
    let doc = serde_json::json!({
        "apiVersion": "converge/v1",
        "node": {"id": id, "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-11-24T10:00:00Z",
        "networks": [{"name": "apps", "subnets": [{"subnet": "10.89.7.0/24"}]}],
        "containers": containers,
        "dns": {"zone": "internal", "listen": ["127.0.0.1"], "records": records}
    });
    write_json(dir, id, &doc)
}

/// The node's answer to a dry-run request, as the agent's: verified (pinned key or its
/// rotation chain, this node, clock window), the candidate parsed and validated, its
/// generation above the accepted one; then a synthetic plan (no host): everything in
/// the candidate is created. `None` for bytes that are not a request (the agent too
/// answers nothing then).
fn plan_answer(node: &Enrolled, bytes: &[u8], accepted: u64) -> Option<PlanAnswer> {
    let req = DryRunRequest::parse(bytes).ok()?;
    let mut answer = PlanAnswer::without_plan(&req.request_id, &node.id, Outcome::Error);
    let verified = req
        .signer(&node.pinned)
        .map_err(DryRunError::from)
        .and_then(|key| req.verify(&key, &node.id, chrono::Utc::now().timestamp()));
    let bytes = match verified {
        Ok(b) => b,
        Err(e) => {
            answer.error = Some(e.to_string());
            return Some(answer);
        }
    };
    let limits = converge::limits::Limits::default();
    let refused = |mut answer: PlanAnswer, problems: Vec<Problem>| {
        answer.outcome = Outcome::Refused;
        answer.set_problems(problems);
        Some(answer)
    };
    let doc =
        match converge::document::parse_bytes(&bytes, converge::document::Format::Json, &limits) {
            Ok(d) => d,
            Err(p) => {
                let problems = p.0.iter().map(|p| Problem {
                    path: p.path.clone(),
                    message: p.message.clone(),
                });
                return refused(answer, problems.collect());
            }
        };
    if doc.node.id != node.id || doc.generation <= accepted {
        let message = format!(
            "node {:?} generation {} (this node: {:?}, accepted {accepted})",
            doc.node.id, doc.generation, node.id
        );
        return refused(
            answer,
            vec![Problem {
                path: "$".into(),
                message,
            }],
        );
    }
    // The synthetic plan: what a bare host would get, named from the validated candidate.
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let names = |v: Option<&serde_json::Value>| -> Vec<String> {
        v.and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.get("name")?.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let sections = [
        ("containers", "network", names(value.get("networks"))),
        ("containers", "container", names(value.get("containers"))),
        (
            "dns",
            "record",
            names(value.get("dns").and_then(|d| d.get("records"))),
        ),
    ];
    let mut counts: BTreeMap<String, converge::control::dryrun::Counts> = BTreeMap::new();
    let mut text = String::new();
    for (reconciler, kind, list) in &sections {
        for name in list {
            counts.entry(reconciler.to_string()).or_default().add += 1;
            text.push_str(&format!("  + {reconciler}/{kind} {name}: create\n"));
        }
    }
    answer.outcome = if counts.is_empty() {
        Outcome::Unchanged
    } else {
        Outcome::Changes
    };
    answer.counts = counts;
    answer.set_plan(text);
    Some(answer)
}

/// Sends a status with `accepted`, retrying a few times with the agent's backoff.
async fn ack<T: Transport>(t: &T, id: &str, name: &str, accepted: u64, heartbeat: u64) -> bool {
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

/// Counters shared by every node.
#[derive(Default)]
struct Counters {
    /// Transport disconnections and failed sends.
    errors: AtomicUsize,
    /// Dry-run answers sent.
    planned: AtomicUsize,
}

/// One node: the transport's events, acknowledgements, dry-run answers, heartbeats.
async fn run_node<T: Transport>(
    node: Arc<Enrolled>,
    t: T,
    name: String,
    heartbeat: u64,
    reports: mpsc::UnboundedSender<(usize, Report, Instant)>,
    index: usize,
    counters: Arc<Counters>,
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
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            Event::DryRun(bytes) => {
                // Off the loop, as the agent plans (envelopes and status go on).
                let (node, t, counters) = (node.clone(), t.clone(), counters.clone());
                let g = accepted.load(Ordering::Relaxed);
                tokio::spawn(async move {
                    let Some(answer) = plan_answer(&node, &bytes, g) else {
                        return;
                    };
                    match t.send(&NodeMessage::Planned(Box::new(answer))).await {
                        Ok(()) => counters.planned.fetch_add(1, Ordering::Relaxed),
                        Err(_) => counters.errors.fetch_add(1, Ordering::Relaxed),
                    };
                });
            }
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
                    // A redelivery of what was applied is no error.
                    if applied.is_none() {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                };
                let _ = reports.send((index, Report::Received(g), Instant::now()));
                accepted.store(g, Ordering::Relaxed);
                if ack(&t, &node.id, &name, g, heartbeat).await {
                    let _ = reports.send((index, Report::Acked(g), Instant::now()));
                } else {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
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

/// One `converge control-plane plan` run: wall time from its start to its exit (the
/// aggregate printed), and the summary it printed.
fn run_plan(
    converge: &Path,
    candidates: &Path,
    data: &str,
    timeout: &str,
) -> anyhow::Result<(Duration, serde_json::Value)> {
    let t0 = Instant::now();
    let out = std::process::Command::new(converge)
        .args(["control-plane", "plan"])
        .arg(candidates)
        .args(["--data", data, "--timeout", timeout, "-o", "json"])
        .output()
        .with_context(|| format!("run {}", converge.display()))?;
    let took = t0.elapsed();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "control-plane plan (exit {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((took, report["summary"].clone()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, ca, docs, data, plane_pid, n, heartbeat) = match args.as_slice() {
        [u, c, d, a, p, n] => (u, c, d, a, p, n, 15),
        [u, c, d, a, p, n, h] => (u, c, d, a, p, n, h.parse()?),
        _ => anyhow::bail!(
            "usage: fleet_plane URL CA_PEM DOCS DATA PLANE_PID NODES [HEARTBEAT_SECS]"
        ),
    };
    let base = url.trim_end_matches('/').to_string();
    let n: usize = n.parse()?;
    let docs = PathBuf::from(docs);
    let ca_pem = std::fs::read_to_string(ca).with_context(|| format!("read {ca}"))?;
    let me = std::process::id().to_string();
    let wait_limit = Duration::from_secs(60);
    let plans: usize = env_or("PLANS", 0);
    let idle_secs: f64 = env_or("IDLE_SECS", 20.0);
    let converge_bin = PathBuf::from(env_or("CONVERGE", "converge".to_string()));
    let plan_timeout = env_or("PLAN_TIMEOUT", "30s".to_string());

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
    let transport = enrolled
        .first()
        .map(|e| e.transport.describe())
        .unwrap_or_default();
    let label = match enrolled.first().map(|e| &e.transport) {
        Some(Link::Nats { .. }) => "NATS",
        _ => "HTTPS",
    };

    // Generation 1 for everyone: the clients start on it (their first poll answers at once).
    for e in &enrolled {
        write_json(&docs, &e.id, &doc(&e.id, 1))?;
    }
    let rss0 = rss_kb(&me).0;
    let (rtx, mut reports) = mpsc::unbounded_channel();
    let counters = Arc::new(Counters::default());
    let mut ids = Vec::with_capacity(n);
    for (i, node) in enrolled.into_iter().enumerate() {
        let node = Arc::new(node);
        ids.push(node.id.clone());
        let name = format!("fleet-{i}");
        let (rtx, counters) = (rtx.clone(), counters.clone());
        match &node.transport {
            Link::Https { .. } => {
                let t = HttpsTransport::new(
                    &base,
                    &node.id,
                    node.identity.signing_key().clone(),
                    Some(&ca_pem),
                    converge::control::envelope::max_bytes(
                        converge::limits::DEFAULT_MAX_DOCUMENT_BYTES,
                    ),
                    None,
                )?;
                tokio::spawn(run_node(node, t, name, heartbeat, rtx, i, counters));
            }
            Link::Nats {
                url,
                user,
                password,
            } => {
                let t = converge::control::nats::connect(
                    url,
                    user,
                    password,
                    node.identity.signing_key(),
                    &node.id,
                    Some(&ca_pem),
                )
                .await?;
                tokio::spawn(run_node(node, t, name, heartbeat, rtx, i, counters));
            }
        }
    }
    let mut acked1 = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while acked1 < n {
        match tokio::time::timeout_at(deadline, reports.recv()).await {
            Ok(Some((_, Report::Acked(1), _))) => acked1 += 1,
            Ok(Some(_)) => {}
            _ => anyhow::bail!("setup: only {acked1}/{n} nodes acknowledged generation 1 in 180 s"),
        }
    }
    let setup = started.elapsed();
    let rss_conn = rss_kb(&me).0;

    // Idle: every node holds its connection (HTTPS: a long poll renewed every 25 s) and
    // sends its heartbeat.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (c0, p0) = (cpu_secs(&me), cpu_secs(plane_pid));
    tokio::time::sleep(Duration::from_secs_f64(idle_secs)).await;
    let idle_cpu = (cpu_secs(&me) - c0) / idle_secs.max(0.001) * 100.0;
    let plane_idle_cpu = (cpu_secs(plane_pid) - p0) / idle_secs.max(0.001) * 100.0;
    let rss_idle = rss_kb(&me).0;

    // Generation 2 for all N nodes: staged first (writing 2,000 files took up to 2 s on
    // a loaded machine), then renamed into place, timed from the first rename.
    let staged = ids
        .iter()
        .map(|id| stage_json(&docs, id, &doc(id, 2)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (c1, p1) = (cpu_secs(&me), cpu_secs(plane_pid));
    let t0 = Instant::now();
    for (id, tmp) in ids.iter().zip(&staged) {
        std::fs::rename(tmp, docs.join(format!("{id}.json")))
            .with_context(|| format!("rename {}", tmp.display()))?;
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
    // What the control plane has on record (its store, as `control-plane nodes` shows
    // it; NATS status is recorded as it arrives, so give it a moment).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let recorded = PlaneStore::open(&converge::control::plane::db_path(Path::new(data)))?
        .nodes()?
        .iter()
        .filter(|r| r.accepted_generation == Some(2))
        .count();

    let (g50, g99, gmax) = quantiles(got.clone());
    let (a50, a99, amax) = quantiles(acked.clone());
    let per_node_kb = rss_conn.saturating_sub(rss0) as f64 / n as f64;
    println!(
        "nodes {n} on {transport}: enrolled in {enroll_time:.1?}, all on generation 1 after {setup:.1?}; generation 2 renamed into place in {written:.1?}"
    );
    println!(
        "  received {}/{n}: p50 {}, p99 {}, max {}",
        got.len(),
        ms(g50),
        ms(g99),
        ms(gmax)
    );
    println!(
        "  status sent {}/{n} (plane's store: {recorded} at generation 2): p50 {}, p99 {}, max {}",
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
        counters.errors.load(Ordering::Relaxed)
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
    if plans == 0 {
        return Ok(());
    }

    // Dry runs: a generation-3 candidate per node, `control-plane plan` K times.
    let candidates = docs.with_file_name("candidates");
    std::fs::create_dir_all(&candidates)
        .with_context(|| format!("create {}", candidates.display()))?;
    for id in &ids {
        write_candidate(&candidates, id, 3)?;
    }
    let mut took = Vec::with_capacity(plans);
    let mut answered = Vec::with_capacity(plans);
    let (c2, p2) = (cpu_secs(&me), cpu_secs(plane_pid));
    for run in 0..plans {
        let planned0 = counters.planned.load(Ordering::Relaxed);
        let (converge_bin, candidates, data, timeout) = (
            converge_bin.clone(),
            candidates.clone(),
            data.clone(),
            plan_timeout.clone(),
        );
        let (t, summary) = tokio::task::spawn_blocking(move || {
            run_plan(&converge_bin, &candidates, &data, &timeout)
        })
        .await??;
        let count = |k: &str| summary[k].as_u64().unwrap_or(0);
        let ok = count("nodes") - count("noAnswer");
        println!(
            "  dry run {}: {} — {} nodes: {} with changes, {} unchanged, {} refused, {} error, {} no answer (answers sent by the nodes: {})",
            run + 1,
            ms(t),
            count("nodes"),
            count("changes"),
            count("unchanged"),
            count("refused"),
            count("error"),
            count("noAnswer"),
            counters.planned.load(Ordering::Relaxed) - planned0
        );
        took.push(t);
        answered.push(ok);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let plane_plan_cpu = (cpu_secs(plane_pid) - p2) / plans as f64;
    let nodes_plan_cpu = (cpu_secs(&me) - c2) / plans as f64;
    let (d50, d99, dmax) = quantiles(took);
    let min_answered = answered.iter().min().copied().unwrap_or(0);
    println!(
        "  dry run over {plans} runs: p50 {}, p99 {}, max {}; answered at least {min_answered}/{n} each run; CPU per run: plane {plane_plan_cpu:.2} s, the {n} nodes {nodes_plan_cpu:.2} s; {:.1}x the generation's p99 (status sent)",
        ms(d50),
        ms(d99),
        ms(dmax),
        d99.as_secs_f64() / a99.as_secs_f64().max(0.001)
    );
    println!(
        "PLANROW | {label} | {n} | {plans} | {} | {} | {} | {min_answered}/{n} | {} | {} | {:.1}x | {plane_plan_cpu:.2} s | {nodes_plan_cpu:.2} s |",
        ms(d50),
        ms(d99),
        ms(dmax),
        ms(a50),
        ms(a99),
        d99.as_secs_f64() / a99.as_secs_f64().max(0.001)
    );
    Ok(())
}
