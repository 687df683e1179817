//! The WireGuard reconciler against real wireguard-go in network namespaces: a mesh with
//! IPv4 and IPv6 pings through the tunnel, peer churn that never disturbs another
//! peer's session, removing and restoring a peer, drift repair (by hand with `wg` and
//! `ip`, interface deleted, wireguard-go killed) and a restart that adopts the interface.

mod common;

use common::{Mesh, WgPeer};
use converge_core::{HostEvent, Reconciler};
use converge_wireguard::{ActionKind, PublicKey, WireguardPeer, WireguardSpec};
use futures::StreamExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn with_peer(spec: &WireguardSpec, p: WireguardPeer) -> WireguardSpec {
    let mut list: Vec<WireguardPeer> = spec.peers.clone().into();
    list.push(p);
    WireguardSpec {
        peers: list.into(),
        ..spec.clone()
    }
}

fn without(spec: &WireguardSpec, name: &str) -> WireguardSpec {
    let list: Vec<WireguardPeer> = spec
        .peers
        .iter()
        .filter(|p| p.name != name)
        .cloned()
        .collect();
    WireguardSpec {
        peers: list.into(),
        ..spec.clone()
    }
}

fn assert_pings(m: &Mesh, from: usize, to: usize) {
    for addr in [Mesh::addr4(to), Mesh::addr6(to)] {
        let (sent, recv) = m.nodes[from].ping(&addr, 3, "0.2");
        assert_eq!((sent, recv), (3, 3), "node{from} -> {addr}");
    }
}

#[test]
fn mesh_pings_and_peer_churn_never_disturbs_another_session() {
    let m = Mesh::new(2, Duration::from_secs(50));
    let specs = m.up();
    assert_pings(&m, 0, 1);
    assert_pings(&m, 1, 0);
    let (a, b) = (&m.nodes[0], &m.nodes[1]);
    let b_key = b.public_key();
    let before: WgPeer = a.wg_peer(&b_key).expect("B on A");
    assert!(before.handshake > 0, "A-B handshook");

    // A continuous ping A -> B for ~10 s while peer C churns on A.
    let net = format!("--net=/run/netns/{}", a.ns);
    let replies_before = a.snmp("Icmp", "InEchoReps");
    let ping = Command::new("nsenter")
        .args([
            net.as_str(),
            "ping",
            "-n",
            "-q",
            "-c",
            "2000",
            "-i",
            "0.005",
            "-W",
            "2",
        ])
        .arg(Mesh::addr4(1))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ping");
    // The churn starts once the ping runs: its first reply is in (A pings nothing else).
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.snmp("Icmp", "InEchoReps") == replies_before {
        assert!(Instant::now() < deadline, "no reply to the ping A -> B");
        std::thread::sleep(Duration::from_millis(5));
    }
    let c_key = PublicKey([0x5c; 32]);
    // C's endpoints are unused addresses of A's own underlay: nothing answers there.
    let prefix = a.underlay.rsplit_once('.').expect("ipv4").0.to_string();
    let c = |i: u32| WireguardPeer {
        name: "node-c".into(),
        public_key: c_key.to_base64(),
        endpoint: Some(format!("{prefix}.{}:{}", 200 + i % 3, 51820 + i % 2)),
        allowed_ips: vec![
            format!("10.77.{}.0/24", 1 + i % 5),
            format!("fd00:77:{}::/48", 1 + i % 5),
        ],
        persistent_keepalive: i.is_multiple_of(2).then_some(25),
        preshared_key_secret: None,
    };
    let started = Instant::now();
    for i in 0..100 {
        for spec in [
            with_peer(&specs[0], c(i)),
            with_peer(&specs[0], c(i + 1)),
            specs[0].clone(),
        ] {
            let plan = a.converge(&spec);
            for act in &plan.actions {
                match &act.kind {
                    ActionKind::SetPeer(u) => assert_eq!(u.key, c_key),
                    ActionKind::RemovePeer { key } => assert_eq!(*key, c_key),
                    ActionKind::AddRoute(d) => assert!(!d.to_string().starts_with("10.77.0.")),
                    ActionKind::DelRoute(r) => assert!(!r.dst.to_string().starts_with("10.77.0.")),
                    ActionKind::Settle(_) => {}
                    k => panic!("unexpected action {k:?}"),
                }
            }
        }
    }
    let churn = started.elapsed();
    let out = ping.wait_with_output().expect("ping");
    let (sent, recv) = common::parse_ping(&String::from_utf8_lossy(&out.stdout));
    eprintln!("300 churn passes in {churn:?}; ping A->B {recv}/{sent}");
    assert!(
        churn < Duration::from_secs(9),
        "churn outlasted the ping: {churn:?}"
    );
    assert_eq!((sent, recv), (2000, 2000), "A-B lost packets during churn");
    let after = a.wg_peer(&b_key).expect("B on A");
    assert_eq!(after.handshake, before.handshake, "A-B handshake was reset");
    assert!(
        after.rx > before.rx && after.tx > before.tx,
        "counters went on: {before:?} {after:?}"
    );
    assert!(a.wg_peer(&c_key).is_none(), "C removed at the end");
}

#[test]
fn removing_a_peer_stops_its_traffic_and_restoring_restores_it() {
    let m = Mesh::new(2, Duration::from_secs(50));
    let specs = m.up();
    assert_pings(&m, 0, 1);
    let a = &m.nodes[0];
    a.converge(&without(&specs[0], "node1"));
    assert!(a.wg_peer(&m.nodes[1].public_key()).is_none());
    let (sent, recv) = a.ping(&Mesh::addr4(1), 3, "0.2");
    assert_eq!((sent, recv), (3, 0), "traffic to a removed peer");
    let routes = a.ns_ok(&["ip", "route", "show", "proto", "156"]);
    assert!(
        !routes.contains("10.77.0.2"),
        "its route went too: {routes}"
    );
    a.converge(&specs[0]);
    assert_pings(&m, 0, 1);
}

#[test]
fn drift_is_repaired() {
    // Every pass reads the device in full, as the resync pass does.
    let m = Mesh::new(2, Duration::ZERO);
    let specs = m.up();
    let (a, b) = (&m.nodes[0], &m.nodes[1]);
    let b_key = b.public_key().to_base64();
    assert_pings(&m, 0, 1);

    // A peer removed, then changed, by hand.
    a.ns_ok(&["wg", "set", &a.iface, "peer", &b_key, "remove"]);
    let p = a.converge(&specs[0]);
    assert_eq!(
        p.changes[0]
            .to_string()
            .split(' ')
            .take(3)
            .collect::<Vec<_>>(),
        ["+", "peer", "node1"]
    );
    a.ns_ok(&[
        "wg",
        "set",
        &a.iface,
        "peer",
        &b_key,
        "allowed-ips",
        "10.77.9.9/32",
        "persistent-keepalive",
        "7",
    ]);
    let p = a.converge(&specs[0]);
    assert_eq!(p.changes[0].fields.len(), 2, "{:?}", p.changes);
    assert_pings(&m, 0, 1);

    // An address and a route deleted by hand.
    a.ns_ok(&["ip", "addr", "del", "fd00:77::1/64", "dev", &a.iface]);
    a.ns_ok(&["ip", "route", "del", "10.77.0.2/32", "dev", &a.iface]);
    let p = a.converge(&specs[0]);
    assert_eq!(p.changes.len(), 2, "{:?}", p.changes);
    assert_pings(&m, 0, 1);

    // The interface deleted, then wireguard-go killed: noticed at once by the watch.
    let iface = a.iface.clone();
    let pid = a.wireguard_go_pid().expect("wireguard-go runs");
    let spec = specs[0].clone();
    let events: Vec<HostEvent> = a.run(move |ctx| {
        Box::pin(async move {
            let mut stream = ctx.rec.host_events().expect("host events");
            let mut got = Vec::new();
            // The watch learns the interface on observe.
            common::converge(&ctx.rec, &spec).await;
            let out = Command::new("ip")
                .args(["link", "del", &iface])
                .output()
                .expect("ip");
            assert!(out.status.success());
            got.push(next_event(&mut stream).await);
            common::converge(&ctx.rec, &spec).await;
            let new_pid = common::wireguard_go_pids(&iface)[0];
            assert_ne!(new_pid, pid);
            // Drain the events of our own repair.
            while tokio::time::timeout(Duration::from_millis(300), stream.next())
                .await
                .is_ok()
            {}
            // SAFETY: kill -9 of the wireguard-go serving our test interface.
            unsafe { libc::kill(new_pid as i32, libc::SIGKILL) };
            got.push(next_event(&mut stream).await);
            common::converge(&ctx.rec, &spec).await;
            got
        })
    });
    eprintln!("events: {events:?}");
    assert!(events.iter().all(|e| e.0.contains(&a.iface)), "{events:?}");
    assert_eq!(common::wireguard_go_pids(&a.iface).len(), 1);
    // B still has A's old key and endpoint: the new device answers with the same key.
    assert_pings(&m, 0, 1);
}

async fn next_event(stream: &mut futures::stream::BoxStream<'static, HostEvent>) -> HostEvent {
    tokio::time::timeout(Duration::from_secs(3), stream.next())
        .await
        .expect("an event within 3 s")
        .expect("stream open")
}

#[test]
fn a_restart_adopts_the_interface_without_touching_a_peer() {
    let m = Mesh::new(2, Duration::from_secs(50));
    let specs = m.up();
    assert_pings(&m, 0, 1);
    let a = &m.nodes[0];
    let b_key = m.nodes[1].public_key();
    let pid = a.wireguard_go_pid();
    let before = a.wg_peer(&b_key).expect("B on A");
    let spec = specs[0].clone();
    let plan = a.run(move |ctx| {
        Box::pin(async move {
            ctx.restart();
            common::converge(&ctx.rec, &spec).await
        })
    });
    assert!(
        plan.is_empty(),
        "a restart changed something: {:?}",
        plan.changes
    );
    assert_eq!(a.wireguard_go_pid(), pid, "wireguard-go was restarted");
    let after = a.wg_peer(&b_key).expect("B on A");
    assert_eq!(after.handshake, before.handshake);
    assert!(after.rx >= before.rx && after.tx >= before.tx);
    assert_pings(&m, 0, 1);
}
