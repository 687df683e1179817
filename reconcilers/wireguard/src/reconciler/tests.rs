//! Reconciler tests on the fake driver: whole passes, the key file, the kept state and
//! its fast path, drift, and the idempotence property from any starting host.

use super::*;
use crate::driver::fake::Fake;
use crate::plan::{PeerState, Route};
use crate::spec::WireguardPeer;
use ipnet::IpNet;
use proptest::prelude::*;
use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;

fn key(i: u8) -> PublicKey {
    PublicKey([i; 32])
}

fn peer(i: u8, allowed: &[String]) -> WireguardPeer {
    WireguardPeer {
        name: format!("p{i}"),
        public_key: key(i).to_base64(),
        endpoint: Some(format!("192.0.2.{i}:51820")),
        allowed_ips: allowed.to_vec(),
        persistent_keepalive: None,
        preshared_key_secret: None,
    }
}

fn spec(peers: Vec<WireguardPeer>) -> WireguardSpec {
    WireguardSpec {
        interface: "wg0".into(),
        private_key_secret: None,
        listen_port: Some(51820),
        addresses: vec!["10.210.0.1/24".into(), "fd00:210::1/64".into()],
        mtu: Some(1380),
        routes: true,
        peers: peers.into(),
    }
}

struct Env {
    _dir: tempfile::TempDir,
    data: PathBuf,
    secrets: PathBuf,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    Env {
        data,
        secrets,
        _dir: dir,
    }
}

fn reconciler(e: &Env, full_read_after: Duration) -> WireguardReconciler<Fake> {
    let mut c = Config::new(&e.data, &e.secrets);
    c.full_read_after = full_read_after;
    WireguardReconciler::new(Fake::default(), c)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn pass(r: &WireguardReconciler<Fake>, s: &WireguardSpec) -> Plan<Action> {
    let obs = r.observe(s).await.unwrap();
    let p = r.plan(s, &obs, &Facts::default());
    drop(obs);
    let shown = p.clone();
    let out = r.apply(p).await;
    assert!(out.iter().all(|o| o.error.is_none()), "{out:?}");
    shown
}

async fn planned(r: &WireguardReconciler<Fake>, s: &WireguardSpec) -> Plan<Action> {
    let obs = r.observe(s).await.unwrap();
    r.plan(s, &obs, &Facts::default())
}

fn nets(i: u8) -> Vec<String> {
    vec![format!("10.99.{i}.0/24"), format!("fd00:99:{i}::/48")]
}

#[test]
fn first_pass_builds_everything_and_the_second_finds_it_converged() {
    let e = env();
    let r = reconciler(&e, Duration::from_secs(3600));
    let s = spec(vec![peer(1, &nets(1)), peer(2, &nets(2))]);
    rt().block_on(async {
        let p = pass(&r, &s).await;
        assert!(p.actions.len() > 5);
        assert!(planned(&r, &s).await.is_empty());
        // A new instance (agent restart) reads the host and changes nothing.
        let again = WireguardReconciler::new(Fake::default(), Config::new(&e.data, &e.secrets));
        *again.driver().host() = std::mem::take(&mut *r.driver().host());
        again.driver().host().calls.clear();
        let obs = again.observe(&s).await.unwrap();
        assert!(again.plan(&s, &obs, &Facts::default()).is_empty());
        let notes = again.notes(&obs);
        assert!(notes[0].note.contains("public key"), "{notes:?}");
        assert_eq!(notes.len(), 3);
        assert!(notes[1].object.starts_with("peer p1 ("), "{notes:?}");
        let Some(FactsUpdate::Wireguard(Some(f))) = again.publish(&obs) else {
            panic!("no facts")
        };
        assert_eq!(f.backend, "userspace");
        assert_eq!(
            Some(f.public_key.clone()),
            obs.state
                .device
                .as_ref()
                .unwrap()
                .public_key
                .map(|k| k.to_base64())
        );
        // The private key never shows.
        let private = std::fs::read_to_string(key_path(&e.data, "wg0")).unwrap();
        assert!(!format!("{notes:?} {f:?}").contains(private.trim()));
    });
    let meta = std::fs::metadata(key_path(&e.data, "wg0")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[test]
fn a_one_peer_change_reads_nothing_in_full() {
    let e = env();
    let r = reconciler(&e, Duration::from_secs(3600));
    let mut list: Vec<WireguardPeer> = (1..=200).map(|i| peer(i, &nets(i))).collect();
    rt().block_on(async {
        pass(&r, &spec(list.clone())).await;
        let reads = r.driver().host().device_reads;
        r.driver().host().calls.clear();
        list[120].persistent_keepalive = Some(25);
        list.remove(7);
        list.push(peer(250, &nets(250)));
        let p = pass(&r, &spec(list.clone())).await;
        assert_eq!(
            p.changes.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            vec![
                "- peer CAgICAgI…",
                "~ peer p121 (eXl5eXl5…)",
                "+ peer p250 (+vr6+vr6…)",
                "- route 10.99.8.0/24 ifindex 11",
                "- route fd00:99:8::/48 ifindex 11",
                "+ route 10.99.250.0/24 wg0",
                "+ route fd00:99:250::/48 wg0",
            ]
        );
        assert_eq!(r.driver().host().device_reads, reads);
        let calls = r.driver().host().calls.clone();
        assert!(!calls.contains(&"routes".to_string()), "{calls:?}");
        assert!(planned(&r, &spec(list.clone())).await.is_empty());
        // A full read finds the same.
        let fresh = reconciler(&e, Duration::ZERO);
        *fresh.driver().host() = std::mem::take(&mut *r.driver().host());
        assert!(planned(&fresh, &spec(list)).await.is_empty());
    });
}

#[test]
fn drift_is_repaired() {
    let e = env();
    let r = reconciler(&e, Duration::from_secs(3600));
    let s = spec(vec![peer(1, &nets(1)), peer(2, &nets(2))]);
    rt().block_on(async {
        pass(&r, &s).await;
        // A route deleted by hand: its notification drops the baseline.
        {
            let mut h = r.driver().host();
            let route = *h.routes.iter().next().unwrap();
            h.routes.remove(&route);
            h.changes.push(RouteChange::Removed(route));
        }
        let p = pass(&r, &s).await;
        assert_eq!(p.changes.len(), 1, "{:?}", p.changes);
        // An address deleted: read on every pass.
        r.driver().host().addresses.clear();
        assert_eq!(pass(&r, &s).await.changes.len(), 2);
        // The interface deleted (wireguard-go killed): rebuilt in one pass.
        r.driver().host().delete_link();
        pass(&r, &s).await;
        assert!(planned(&r, &s).await.is_empty());
        assert_eq!(r.driver().host().device.peers.len(), 2);
    });
    // A peer removed by hand is found by the next full read.
    let r2 = reconciler(&e, Duration::ZERO);
    rt().block_on(async {
        pass(&r2, &s).await;
        r2.driver().host().device.peers.remove(&key(2));
        let p = pass(&r2, &s).await;
        assert_eq!(p.changes[0].to_string(), "+ peer p2 (AgICAgIC…)");
        assert!(planned(&r2, &s).await.is_empty());
    });
}

#[test]
fn the_device_watch_sees_hand_changes_and_not_traffic_or_roaming() {
    let e = env();
    let r = reconciler(&e, Duration::from_secs(3600));
    let mut roaming = peer(3, &nets(3));
    roaming.endpoint = None;
    let s = spec(vec![peer(1, &nets(1)), peer(2, &nets(2)), roaming]);
    let look = |r: &WireguardReconciler<Fake>| devwatch::check(r.driver(), &r.cache);
    rt().block_on(async {
        // Nothing to compare before the first pass.
        assert!(look(&r).is_none());
        pass(&r, &s).await;
        assert!(look(&r).is_none());

        // Traffic, handshakes, and the peer without an endpoint roaming: no event.
        {
            let mut h = r.driver().host();
            for p in h.device.peers.values_mut() {
                p.rx_bytes += 1 << 20;
                p.tx_bytes += 4096;
                p.last_handshake = Some(SystemTime::now());
            }
            h.device.peers.get_mut(&key(3)).unwrap().endpoint =
                Some("198.51.100.3:40000".parse().unwrap());
        }
        assert!(look(&r).is_none());

        // Nothing compared while apply writes.
        r.driver().host().device.peers.remove(&key(2));
        r.cache().writing = true;
        assert!(look(&r).is_none());
        r.cache().writing = false;

        // A peer removed by hand: one event, and the next pass reads in full and
        // repairs it although the document did not change.
        let e1 = look(&r).expect("an event");
        assert_eq!(e1.0, "WireGuard device wg0 changed outside converge");
        assert!(look(&r).is_none(), "one event per change");
        let reads = r.driver().host().device_reads;
        let p = pass(&r, &s).await;
        assert_eq!(r.driver().host().device_reads, reads + 1);
        assert_eq!(p.changes[0].to_string(), "+ peer p2 (AgICAgIC…)");
        assert!(look(&r).is_none());

        // Peer 1's endpoint, which the document sets, changes during a live session
        // (WireGuard roams to where the peer's packets come from): one look sees it,
        // the pass keeps it, and the copy matches again.
        r.driver()
            .host()
            .device
            .peers
            .get_mut(&key(1))
            .unwrap()
            .endpoint = Some("198.51.100.1:40000".parse().unwrap());
        assert!(look(&r).is_some());
        assert!(pass(&r, &s).await.is_empty());
        assert!(look(&r).is_none());

        // Allowed IPs, keepalive and (with no session) the endpoint changed by hand.
        r.driver()
            .host()
            .device
            .peers
            .get_mut(&key(1))
            .unwrap()
            .last_handshake = None;
        for change in [
            |p: &mut PeerState| p.allowed = vec!["10.77.9.9/32".parse().unwrap()],
            |p: &mut PeerState| p.keepalive = 7,
            |p: &mut PeerState| p.endpoint = Some("192.0.2.99:1".parse().unwrap()),
        ] {
            change(r.driver().host().device.peers.get_mut(&key(1)).unwrap());
            assert!(look(&r).is_some());
            let p = pass(&r, &s).await;
            assert_eq!(p.changes.len(), 1, "{:?}", p.changes);
            assert!(look(&r).is_none());
        }

        // A foreign peer added and the listen port changed by hand.
        r.driver()
            .host()
            .device
            .peers
            .insert(key(9), PeerState::default());
        assert!(look(&r).is_some());
        pass(&r, &s).await;
        r.driver().host().device.listen_port = 1;
        assert!(look(&r).is_some());
        pass(&r, &s).await;
        assert!(planned(&r, &s).await.is_empty());
        assert!(look(&r).is_none());

        // Should a pass leave the copy differing from the device (a field read one way
        // by the look and another by the full read), that device state asks for no
        // second pass; a further change does.
        let pretend = |r: &WireguardReconciler<Fake>| {
            let mut c = r.cache();
            Arc::make_mut(&mut c.state)
                .device
                .as_mut()
                .unwrap()
                .listen_port = 2;
            c.device_version += 1;
            c.device_read_at = Some(Instant::now());
        };
        pretend(&r);
        assert!(look(&r).is_some());
        pretend(&r);
        assert!(look(&r).is_none());
        r.driver().host().device.peers.remove(&key(1));
        pretend(&r);
        assert!(look(&r).is_some());
    });
}

#[test]
fn routes_flushed_silently_by_the_kernel_are_restored() {
    let e = env();
    let r = reconciler(&e, Duration::from_secs(3600));
    let s = spec(vec![peer(1, &nets(1)), peer(2, &nets(2))]);
    let v4 = |h: &crate::driver::fake::FakeHost| {
        h.routes.iter().filter(|r| r.dst.addr().is_ipv4()).count()
    };
    rt().block_on(async {
        pass(&r, &s).await;
        assert_eq!(v4(&r.driver().host()), 2);
        // The last IPv4 address deleted by hand: its IPv4 routes go, unannounced.
        r.driver()
            .host()
            .delete_address("10.210.0.1/24".parse().unwrap());
        assert_eq!(v4(&r.driver().host()), 0);
        let p = pass(&r, &s).await;
        let shown: Vec<String> = p.changes.iter().map(|c| c.to_string()).collect();
        assert_eq!(shown.len(), 3, "the address and both routes: {shown:?}");
        assert_eq!(v4(&r.driver().host()), 2);
        assert!(planned(&r, &s).await.is_empty());
        // The link set down by hand: up again, with its routes.
        r.driver().host().set_down();
        assert!(r.driver().host().routes.is_empty());
        pass(&r, &s).await;
        assert_eq!(r.driver().host().routes.len(), 4);
        assert!(planned(&r, &s).await.is_empty());
    });
}

#[test]
fn rotate_key_sets_a_new_key_on_the_next_pass() {
    let e = env();
    let r = reconciler(&e, Duration::from_secs(3600));
    let s = spec(vec![peer(1, &nets(1))]);
    rt().block_on(async {
        pass(&r, &s).await;
        let old = r.driver().host().device.public_key;
        let new = rotate_key(&e.data, "wg0").unwrap();
        assert_ne!(old, Some(new));
        let p = pass(&r, &s).await;
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].fields[0].new, Some(new.short()));
        assert_eq!(r.driver().host().device.public_key, Some(new));
    });
}

#[test]
fn a_missing_secret_waits_and_changes_nothing_else() {
    let e = env();
    let r = reconciler(&e, Duration::from_secs(3600));
    let mut s = spec(vec![peer(1, &nets(1))]);
    s.private_key_secret = Some("node-key".into());
    rt().block_on(async {
        let p = pass(&r, &s).await;
        assert_eq!(p.waiting.len(), 1);
        assert!(p.waiting[0].reason.contains("node-key"));
        std::fs::write(
            e.secrets.join("node-key"),
            format!("{}\n", PublicKey([3; 32]).to_base64()),
        )
        .unwrap();
        let p = pass(&r, &s).await;
        assert_eq!(p.changes.len(), 1);
        assert!(p.waiting.is_empty());
        assert!(planned(&r, &s).await.is_empty());
    });
}

// ---- Idempotence from any host state ----

fn pool_net(k: u8, j: u8) -> IpNet {
    if j.is_multiple_of(2) {
        format!("10.{k}.{j}.0/24").parse().unwrap()
    } else {
        format!("fd00:{k}:{j}::/48").parse().unwrap()
    }
}

#[derive(Clone, Debug)]
struct PeerGen {
    key: u8,
    nets: Vec<u8>,
    endpoint: Option<u8>,
    keepalive: Option<u16>,
    psk: Option<u8>,
}

fn peer_gen() -> impl Strategy<Value = PeerGen> {
    (
        1u8..7,
        proptest::collection::vec(0u8..4, 0..3),
        proptest::option::of(1u8..3),
        proptest::option::of(prop_oneof![Just(25u16), Just(5u16)]),
        proptest::option::of(0u8..2),
    )
        .prop_map(|(key, nets, endpoint, keepalive, psk)| PeerGen {
            key,
            nets,
            endpoint,
            keepalive,
            psk,
        })
}

fn spec_gen() -> impl Strategy<Value = WireguardSpec> {
    (
        proptest::collection::vec(peer_gen(), 0..6),
        proptest::sample::subsequence(vec!["10.250.0.1/24", "fd00:250::1/64", "10.1.0.1/24"], 1..3),
        proptest::option::of(prop_oneof![Just(1380u16), Just(1420u16)]),
        proptest::option::of(Just(51820u16)),
        any::<bool>(),
    )
        .prop_map(|(peers, addrs, mtu, port, routes)| {
            let mut seen = HashSet::new();
            let list = peers
                .into_iter()
                .filter(|p| seen.insert(p.key))
                .map(|p| WireguardPeer {
                    name: format!("p{}", p.key),
                    public_key: key(p.key).to_base64(),
                    endpoint: p.endpoint.map(|e| format!("192.0.2.{e}:51820")),
                    allowed_ips: p
                        .nets
                        .iter()
                        .map(|j| pool_net(p.key, *j).to_string())
                        .collect(),
                    persistent_keepalive: p.keepalive,
                    preshared_key_secret: p.psk.map(|i| format!("psk-{i}")),
                })
                .collect::<Vec<_>>();
            WireguardSpec {
                interface: "wg0".into(),
                private_key_secret: None,
                listen_port: port,
                addresses: addrs.into_iter().map(String::from).collect(),
                mtu,
                routes,
                peers: list.into(),
            }
        })
}

#[derive(Clone, Debug)]
struct HostGen {
    link: Option<(u32, bool)>,
    addrs: Vec<u8>,
    peers: Vec<(PeerGen, u8, Option<u64>)>,
    routes: Vec<(u8, u8, bool)>,
    port: u16,
}

fn host_gen() -> impl Strategy<Value = HostGen> {
    (
        proptest::option::of((prop_oneof![Just(1380u32), Just(1500u32)], any::<bool>())),
        proptest::collection::vec(0u8..4, 0..3),
        proptest::collection::vec(
            (
                peer_gen(),
                1u8..8,
                proptest::option::of(prop_oneof![Just(10u64), Just(1000u64)]),
            ),
            0..6,
        ),
        proptest::collection::vec((1u8..8, 0u8..4, any::<bool>()), 0..5),
        prop_oneof![Just(0u16), Just(51820u16), Just(4000u16)],
    )
        .prop_map(|(link, addrs, peers, routes, port)| HostGen {
            link,
            addrs,
            peers,
            routes,
            port,
        })
}

fn build_host(fake: &Fake, g: &HostGen, now: SystemTime) {
    let mut h = fake.host();
    let Some((mtu, up)) = g.link else {
        // Stale routes of an earlier interface may remain.
        for (k, j, _) in &g.routes {
            h.routes.insert(Route {
                dst: pool_net(*k, *j),
                oif: 99,
            });
        }
        return;
    };
    h.link = Some(crate::plan::Link {
        index: 11,
        mtu,
        up,
        backend: Backend::Userspace,
    });
    h.next_index = 1;
    let pool = [
        "10.250.0.1/24",
        "fd00:250::1/64",
        "10.1.0.1/24",
        "10.9.9.9/32",
    ];
    h.addresses = g
        .addrs
        .iter()
        .map(|i| pool[*i as usize].parse().unwrap())
        .collect();
    h.device.listen_port = g.port;
    for (p, other, age) in &g.peers {
        // Hand-made peers may hold networks of other keys' pools.
        let up = PeerUpdate {
            key: key(p.key),
            label: String::new(),
            allowed: Some(p.nets.iter().map(|j| pool_net(*other, *j)).collect()),
            endpoint: p
                .endpoint
                .map(|e| format!("198.51.100.{e}:4000").parse().unwrap()),
            keepalive: p.keepalive,
            psk: p.psk.map(|i| Some(SecretKey([i + 100; 32]))),
        };
        crate::plan::apply_peer(&mut h.device, &up);
        let entry: &mut PeerState = h.device.peers.get_mut(&key(p.key)).unwrap();
        entry.allowed.sort();
        entry.last_handshake = age.map(|a| now - Duration::from_secs(a));
    }
    for (k, j, own) in &g.routes {
        h.routes.insert(Route {
            dst: pool_net(*k, *j),
            oif: if *own { 11 } else { 99 },
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// plan(spec, apply(plan(spec, s))) is empty from any host state, and the fast path
    /// (a baseline from an earlier document) ends where a full plan would.
    #[test]
    fn plans_converge_in_one_pass(first in spec_gen(), second in spec_gen(), host in host_gen()) {
        let e = env();
        for i in 0..2u8 {
            std::fs::write(e.secrets.join(format!("psk-{i}")), PublicKey([i + 100; 32]).to_base64()).unwrap();
        }
        let r = reconciler(&e, Duration::from_secs(3600));
        build_host(r.driver(), &host, SystemTime::now());
        rt().block_on(async {
            let obs = r.observe(&first).await.unwrap();
            let p = r.plan(&first, &obs, &Facts::default());
            drop(obs);
            let out = r.apply(p).await;
            prop_assert!(out.iter().all(|o| o.error.is_none()), "{:?}", out);
            // Judged by a fresh instance that reads everything.
            let judge = reconciler(&e, Duration::ZERO);
            *judge.driver().host() = std::mem::take(&mut *r.driver().host());
            let again = planned(&judge, &first).await;
            prop_assert!(again.is_empty(), "not converged: {:?}", again.changes);
            *r.driver().host() = std::mem::take(&mut *judge.driver().host());
            // Now incrementally to the second document.
            pass(&r, &second).await;
            *judge.driver().host() = std::mem::take(&mut *r.driver().host());
            let again = planned(&judge, &second).await;
            prop_assert!(again.is_empty(), "fast path differs: {:?}", again.changes);
            Ok(())
        })?;
    }
}

#[test]
fn notes_follow_the_device_and_the_names() {
    let e = env();
    // Every pass reads the device in full, as a resync does.
    let r = reconciler(&e, Duration::ZERO);
    let s = spec(vec![peer(1, &nets(1)), peer(2, &nets(2))]);
    rt().block_on(async {
        pass(&r, &s).await;
        let fresh = |obs: &Observed| {
            let other = reconciler(&e, Duration::ZERO);
            other.notes(obs)
        };
        let obs = r.observe(&s).await.unwrap();
        let first = r.notes(&obs);
        assert_eq!(first, fresh(&obs));
        assert!(first[1].note.contains("rx 0 B"), "{first:?}");
        drop(obs);
        // New statistics on a full read, a peer renamed in the document.
        r.driver()
            .host()
            .device
            .peers
            .get_mut(&key(2))
            .unwrap()
            .rx_bytes = 4242;
        let mut renamed = peer(1, &nets(1));
        renamed.name = "renamed".into();
        let s2 = spec(vec![renamed, peer(2, &nets(2))]);
        let obs = r.observe(&s2).await.unwrap();
        let second = r.notes(&obs);
        assert_eq!(second, fresh(&obs));
        assert!(second[1].object.starts_with("peer renamed ("), "{second:?}");
        assert!(second[2].note.contains("rx 4242 B"), "{second:?}");
        // A peer gone from the device has no note.
        drop(obs);
        r.driver().host().device.peers.remove(&key(1));
        let obs = r.observe(&s2).await.unwrap();
        assert_eq!(r.notes(&obs).len(), 2);
        assert_eq!(r.notes(&obs), fresh(&obs));
    });
}

#[test]
fn a_renamed_interface_replaces_the_old_one() {
    let e = env();
    let r = reconciler(&e, Duration::from_secs(3600));
    let s = spec(vec![peer(1, &nets(1))]);
    rt().block_on(async {
        pass(&r, &s).await;
        let renamed = WireguardSpec {
            interface: "wg1".into(),
            ..s.clone()
        };
        let p = pass(&r, &renamed).await;
        let shown: Vec<String> = p.changes.iter().map(|c| c.to_string()).collect();
        assert!(shown.contains(&"+ interface wg1".to_string()), "{shown:?}");
        assert_eq!(shown.last().map(String::as_str), Some("- interface wg0"));
        let calls = r.driver().host().calls.clone();
        assert_eq!(
            calls.last().map(String::as_str),
            Some("delete wg0"),
            "{calls:?}"
        );
        assert!(r.driver().host().others.is_empty());
        assert!(planned(&r, &renamed).await.is_empty());
    });
}
