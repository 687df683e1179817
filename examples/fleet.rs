//! Simulated fleet over NATS JetStream: N lightweight node clients (a real connection
//! each, subscribed to the delivery of the durable consumer the plane makes for it, as
//! the agent is; an acknowledgement on its status subject per envelope, and the
//! consumer ack; no reconcilers), one publisher that also makes the consumers. Prints the time from the start of publishing one new generation for all
//! nodes until each node's acknowledgement arrived (p50, p99, max), and this process's
//! RSS and CPU per connection. Without a CA every client uses the bench user (no
//! per-node permissions); with one (`CA_PEM`), the connection is TLS verified against it
//! and each node authenticates as the agent does, with its own nkey and the per-node
//! permissions `fleet users N` prints for nats-server.
//! Usage: `fleet NATS_URL USER PASSWORD N [CA_PEM]`, `fleet users N USER PASSWORD`.

use converge::control::nats::{consumer_config, deliver_subject};
use futures::StreamExt;
use std::time::{Duration, Instant};

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn cpu_secs() -> f64 {
    // utime + stime in clock ticks (100 Hz on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

/// Node `i`'s identity key (deterministic, so `users` and the run agree) as an nkey:
/// (public, seed).
fn node_nkey(i: usize) -> anyhow::Result<(String, String)> {
    use sha2::Digest;
    let seed: [u8; 32] = sha2::Sha256::digest(format!("converge-fleet-{i}")).into();
    converge::control::nats::nkey(&ed25519_dalek::SigningKey::from_bytes(&seed))
        .map_err(|e| anyhow::anyhow!(e))
}

/// nats-server's users for `n` nodes (nkeys, per-node permissions) and the publisher.
fn users(n: usize, user: &str, password: &str) -> anyhow::Result<String> {
    use converge::control::nats::{node_permissions, render_authorization, Credential, User};
    let keys = (0..n).map(node_nkey).collect::<anyhow::Result<Vec<_>>>()?;
    let ids: Vec<String> = (0..n).map(|i| format!("bench-{i}")).collect();
    let mut list = vec![User {
        user,
        credential: Credential::Password(password),
        permissions: None,
    }];
    for (id, (public, _)) in ids.iter().zip(&keys) {
        list.push(User {
            user: id,
            credential: Credential::Nkey(public),
            permissions: Some(node_permissions(id)),
        });
    }
    Ok(render_authorization(&list))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, n, user, password] = args.as_slice() {
        if mode == "users" {
            print!("{}", users(n.parse()?, user, password)?);
            return Ok(());
        }
    }
    let (url, user, password, n, ca) = match args.as_slice() {
        [url, user, password, n] => (url, user, password, n, None),
        [url, user, password, n, ca] => {
            (url, user, password, n, Some(std::fs::read_to_string(ca)?))
        }
        _ => anyhow::bail!(
            "usage: fleet NATS_URL USER PASSWORD NODES [CA_PEM] | fleet users NODES USER PASSWORD"
        ),
    };
    let (url, user, password) = (url.clone(), user.clone(), password.clone());
    let n: usize = n.parse()?;
    // The publisher: the bench user (over TLS when a CA is given).
    let tls = |opts: async_nats::ConnectOptions| match &ca {
        Some(pem) => {
            converge::control::nats::with_tls(opts, &url, Some(pem)).map_err(|e| anyhow::anyhow!(e))
        }
        None => Ok(opts),
    };
    let cp = tls(async_nats::ConnectOptions::with_user_and_password(
        user.clone(),
        password.clone(),
    ))?
    .connect(url.clone())
    .await?;
    // A node: its own nkey and inbox (as the agent) with a CA, else the bench user.
    let node_options = |i: usize| -> anyhow::Result<async_nats::ConnectOptions> {
        match &ca {
            Some(_) => {
                let (_, seed) = node_nkey(i)?;
                tls(
                    async_nats::ConnectOptions::with_nkey(seed).custom_inbox_prefix(
                        converge::control::protocol::inbox_prefix(&format!("bench-{i}")),
                    ),
                )
            }
            None => Ok(async_nats::ConnectOptions::with_user_and_password(
                user.clone(),
                password.clone(),
            )),
        }
    };
    let js = async_nats::jetstream::new(cp.clone());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "KV_converge".into(),
        subjects: vec!["$KV.converge.>".into()],
        max_messages_per_subject: 1,
        allow_rollup: true,
        allow_direct: true,
        ..Default::default()
    })
    .await?;
    let mut acks = cp.subscribe("converge.status.*").await?;
    let rss0 = rss_kb();
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel::<()>(n);
    let started = Instant::now();
    for i in 0..n {
        let client = loop {
            match node_options(i)?.connect(url.clone()).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let ready_tx = ready_tx.clone();
        let id = format!("bench-{i}");
        // The plane's side: the node's consumer (as `control-plane serve` makes it).
        js.get_stream("KV_converge")
            .await?
            .get_or_create_consumer(
                &converge::control::nats::consumer_name(&id),
                consumer_config(&id),
            )
            .await?;
        tokio::spawn(async move {
            let Ok(mut messages) = client.subscribe(deliver_subject(&id)).await else {
                return;
            };
            let _ = ready_tx.send(()).await;
            while let Some(m) = messages.next().await {
                let _ = client
                    .publish(format!("converge.status.{id}"), m.payload.clone())
                    .await;
                if let Some(reply) = m.reply {
                    let _ = client.publish(reply, Vec::new().into()).await;
                }
            }
        });
    }
    for _ in 0..n {
        ready.recv().await;
    }
    let setup = started.elapsed();
    let rss_conn = rss_kb();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu_idle0 = cpu_secs();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu = (cpu_secs() - cpu_idle0) / 10.0 * 100.0;
    // One new generation for every node; a 1 KiB envelope-sized payload.
    let payload: Vec<u8> = vec![b'x'; 1024];
    let t0 = Instant::now();
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        pending.push(
            js.publish(format!("$KV.converge.bench-{i}"), payload.clone().into())
                .await?,
        );
    }
    let published = t0.elapsed();
    let mut lat = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while lat.len() < n {
        match tokio::time::timeout_at(deadline, acks.next()).await {
            Ok(Some(_)) => lat.push(t0.elapsed()),
            _ => break,
        }
    }
    for p in pending {
        let _ = p.await;
    }
    lat.sort();
    let q = |f: f64| {
        lat.get(((lat.len() as f64 * f) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "nodes {n}: setup {setup:?}, publish loop {published:?}; acknowledged {}/{n}: p50 {:?}, p99 {:?}, max {:?}",
        lat.len(),
        q(0.50),
        q(0.99),
        lat.last().copied().unwrap_or_default()
    );
    println!(
        "client process: RSS {:.1} MB for {n} connections ({:.1} KB each), idle CPU {:.2} % for all",
        rss_conn as f64 / 1024.0,
        (rss_conn.saturating_sub(rss0)) as f64 / n as f64,
        idle_cpu
    );
    Ok(())
}
