//! Simulated fleet over NATS JetStream: N lightweight node clients (a real connection
//! each, subscribed to the delivery of the durable consumer the plane makes for it, as
//! the agent is; an acknowledgement on its status subject per envelope, and the
//! consumer ack; no reconcilers), one publisher that also makes the consumers. Prints the
//! time from the start of publishing one new generation for all nodes until each node's
//! acknowledgement arrived (p50, p99, max), what one KV put costs (sequential, so the
//! stream's replication is in it), and this process's RSS and CPU per connection.
//! Without a CA every client uses the bench user (no per-node permissions); with one
//! (`CA_PEM`), the connection is TLS verified against it and each node authenticates as
//! the agent does, with its own nkey and the per-node permissions `fleet users N` prints
//! for nats-server.
//! Environment: `FLEET_NODE_URLS` (comma-separated) spreads the node clients over these
//! servers round-robin (a cluster's members, or leaf nodes) while the publisher stays on
//! NATS_URL; `FLEET_REPLICAS` sets the bucket stream's replicas (default 1);
//! `FLEET_SHARDS` splits the bucket over that many streams as `serve --nats-shards` does
//! (node ids by hash, `protocol::Shards`): it shows what one put costs with fewer
//! consumers per stream (BENCHMARKS.md, "10,000 nodes"). The users file (`users` mode)
//! takes the same variable. `FLEET_CONSUMERS=file` keeps the consumers' state on disk
//! (the baseline; the plane keeps it in memory). `FLEET_SERVER_PIDS` (space-separated) adds the servers' CPU
//! during the generation to this process's own.
//! Usage: `fleet NATS_URL USER PASSWORD N [CA_PEM]`, `fleet users N USER PASSWORD`.

use converge::control::nats::{consumer_config, deliver_subject};
use converge::control::plane_shared::bucket;
use converge::control::protocol::Shards;
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

/// A count from the environment, `default` when unset or not a number.
fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds used so far by process `pid` ("self" for this one).
fn cpu_secs_of(pid: &str) -> f64 {
    // utime + stime in clock ticks (100 Hz on Linux).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn cpu_secs() -> f64 {
    cpu_secs_of("self")
}

/// CPU seconds used so far by the servers in `FLEET_SERVER_PIDS` (space-separated).
fn servers_cpu_secs() -> f64 {
    std::env::var("FLEET_SERVER_PIDS")
        .unwrap_or_default()
        .split_whitespace()
        .map(cpu_secs_of)
        .sum()
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
fn users(n: usize, user: &str, password: &str, shards: Shards) -> anyhow::Result<String> {
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
            permissions: Some(node_permissions(id, shards)),
        });
    }
    Ok(render_authorization(&list))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The bucket split over several streams: with nats-server 2.9 a put's cost grows with
    // the consumers on its stream.
    let shards = Shards(u16::try_from(env_usize("FLEET_SHARDS", 1).max(1))?);
    if let [mode, n, user, password] = args.as_slice() {
        if mode == "users" {
            print!("{}", users(n.parse()?, user, password, shards)?);
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
    let node_urls: Vec<String> = match std::env::var("FLEET_NODE_URLS") {
        Ok(list) => list.split(',').map(str::to_string).collect(),
        Err(_) => vec![url.clone()],
    };
    let replicas = env_usize("FLEET_REPLICAS", 1);
    // The baseline: consumers keeping their state on disk, as before the plane kept it in
    // memory (`nats::consumer_config`).
    let file_consumers = std::env::var("FLEET_CONSUMERS").is_ok_and(|v| v == "file");
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
    // Each shard's bucket as the plane makes it (`plane_shared::bucket`).
    let mut streams = Vec::new();
    for k in shards.all() {
        // A cluster just started has no JetStream leader for a few seconds.
        let deadline = Instant::now() + Duration::from_secs(30);
        let bucket = loop {
            match bucket(&js, &shards.bucket(k), replicas, true).await {
                Ok(b) => break b,
                Err(e) if Instant::now() > deadline => {
                    anyhow::bail!("cannot make the bucket: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        streams.push(bucket.stream);
    }
    let mut acks = cp.subscribe("converge.status.*").await?;
    let rss0 = rss_kb();
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel::<()>(n);
    let started = Instant::now();
    // Connections and consumers are made 64 at a time, as nodes arrive at a real plane.
    let (node_options, node_urls) = (&node_options, &node_urls);
    let setup = futures::stream::iter(0..n).map(|i| {
        let id = format!("bench-{i}");
        let stream = streams[usize::from(shards.of(&id))].clone();
        let ready_tx = ready_tx.clone();
        async move {
            let node_url = &node_urls[i % node_urls.len()];
            let client = loop {
                match node_options(i)?.connect(node_url.as_str()).await {
                    Ok(c) => break c,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            // The plane's side: the node's consumer (as `control-plane serve` makes it,
            // retried as its next scan would: a loaded cluster times some out).
            let mut config = consumer_config(&id, shards);
            config.memory_storage = !file_consumers;
            let mut attempt = 0;
            while let Err(e) = stream
                .get_or_create_consumer(
                    &converge::control::nats::consumer_name(&id),
                    config.clone(),
                )
                .await
            {
                attempt += 1;
                if attempt == 10 {
                    anyhow::bail!("{id}: consumer: {e}");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let mut messages = client.subscribe(deliver_subject(&id)).await?;
            tokio::spawn(async move {
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
            anyhow::Ok(())
        }
    });
    let mut setup = setup.buffer_unordered(64);
    let mut made = 0;
    while let Some(node) = setup.next().await {
        node?;
        made += 1;
        if made % 1000 == 0 {
            eprintln!("setup: {made} nodes after {:?}", started.elapsed());
        }
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
    // What one put costs: 200 sequential puts to a key no node watches (with R3 each
    // waits for the stream's quorum).
    let mut put = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        js.publish(
            format!("$KV.{}.probe", shards.bucket(0)),
            vec![b'x'; 1024].into(),
        )
        .await?
        .await?;
        put.push(t.elapsed());
    }
    put.sort();
    // One new generation for every node; a 1 KiB envelope-sized payload, 256 puts in
    // flight as the plane does. Each ack is awaited: an unawaited ack future keeps one of
    // async-nats' 5,000 in-flight permits, which stalled the 8,000-node run.
    let payload: Vec<u8> = vec![b'x'; 1024];
    let (client_cpu0, servers_cpu0) = (cpu_secs(), servers_cpu_secs());
    let t0 = Instant::now();
    let puts = futures::stream::iter(0..n)
        .map(|i| {
            let (js, payload) = (js.clone(), payload.clone());
            let subject = shards.key_subject(&format!("bench-{i}"));
            async move {
                js.publish(subject, payload.into())
                    .await?
                    .await
                    .map_err(anyhow::Error::from)
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>();
    let mut lat = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let collect = async {
        while lat.len() < n {
            match tokio::time::timeout_at(deadline, acks.next()).await {
                Ok(Some(_)) => lat.push(t0.elapsed()),
                _ => break,
            }
        }
    };
    let (puts, ()) = tokio::join!(
        async {
            let r = puts.await;
            (r, t0.elapsed())
        },
        collect
    );
    let (puts, published) = puts;
    let (client_cpu, servers_cpu) = (cpu_secs() - client_cpu0, servers_cpu_secs() - servers_cpu0);
    let failed = puts.iter().filter(|p| p.is_err()).count();
    lat.sort();
    let q = |f: f64| {
        lat.get(((lat.len() as f64 * f) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "one put (sequential, 200): p50 {:?}, p99 {:?}",
        put[100], put[197]
    );
    println!(
        "nodes {n}: setup {setup:?}, all puts acknowledged {published:?} ({failed} failed); acknowledged {}/{n}: p50 {:?}, p99 {:?}, max {:?}",
        lat.len(),
        q(0.50),
        q(0.99),
        lat.last().copied().unwrap_or_default()
    );
    println!(
        "CPU during the generation: this process {client_cpu:.2} s, servers {servers_cpu:.2} s (over {:.2} s)",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "client process: RSS {:.1} MB for {n} connections ({:.1} KB each), idle CPU {:.2} % for all",
        rss_conn as f64 / 1024.0,
        (rss_conn.saturating_sub(rss0)) as f64 / n as f64,
        idle_cpu
    );
    Ok(())
}
