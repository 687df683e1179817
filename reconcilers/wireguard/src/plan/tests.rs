//! Plan unit tests on hand-made observations: what a pass changes and how it shows.

use super::*;
use crate::spec::WireguardPeer;

pub(crate) fn key(i: u8) -> PublicKey {
    PublicKey([i; 32])
}

pub(crate) fn peer(i: u8, allowed: &[&str]) -> WireguardPeer {
    WireguardPeer {
        name: format!("p{i}"),
        public_key: key(i).to_base64(),
        endpoint: Some(format!("192.0.2.{i}:51820")),
        allowed_ips: allowed.iter().map(|s| s.to_string()).collect(),
        persistent_keepalive: None,
        preshared_key_secret: None,
    }
}

fn spec(peers: Vec<WireguardPeer>) -> WireguardSpec {
    WireguardSpec {
        interface: "wg0".into(),
        private_key_secret: None,
        listen_port: Some(51820),
        addresses: vec!["10.210.0.1/24".into()],
        mtu: None,
        routes: true,
        peers: peers.into(),
    }
}

const NODE_KEY: [u8; 32] = [7; 32];

/// A host where `s` is applied, as a full read would see it.
fn converged(s: &WireguardSpec) -> Observed {
    let mut device = Device {
        public_key: Some(SecretKey(NODE_KEY).public()),
        listen_port: 51820,
        peers: HashMap::new(),
    };
    let mut routes = HashSet::new();
    for w in s.peers.parsed().wants.iter().flatten() {
        apply_peer(
            &mut device,
            &PeerUpdate {
                key: w.key,
                label: String::new(),
                allowed: Some(w.allowed.clone()),
                endpoint: match &w.endpoint {
                    Some(Endpoint::Addr(ip, p)) => Some(SocketAddr::new(*ip, *p)),
                    _ => None,
                },
                keepalive: Some(w.keepalive),
                psk: None,
            },
        );
        for a in &w.allowed {
            if a.prefix_len() != 0 && a.to_string() != "10.210.0.0/24" {
                routes.insert(Route { dst: *a, oif: 5 });
            }
        }
    }
    Observed {
        interface: "wg0".into(),
        now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
        link: Some(Link {
            index: 5,
            mtu: 1420,
            up: true,
            backend: Backend::Userspace,
        }),
        addresses: vec!["10.210.0.1/24".parse().unwrap()],
        state: Arc::new(HostState {
            device: Some(device),
            routes,
            baseline: None,
        }),
        inputs: Inputs {
            private_key: KeyInput::Ready(SecretKey(NODE_KEY)),
            ..Inputs::default()
        },
        peers: s.peers.parsed().clone(),
        stale: Vec::new(),
    }
}

fn kinds(p: &Plan<Action>) -> Vec<String> {
    p.actions
        .iter()
        .map(|a| match &a.kind {
            ActionKind::Settle(_) => "settle".to_string(),
            k => format!("{} {}", a.object(), variant(k)),
        })
        .collect()
}

fn variant(k: &ActionKind) -> &'static str {
    match k {
        ActionKind::CreateInterface => "create",
        ActionKind::DeleteInterface => "delete",
        ActionKind::GenerateKey => "generate",
        ActionKind::SetPrivateKey(_) => "key",
        ActionKind::SetListenPort(_) => "port",
        ActionKind::SetMtu(_) => "mtu",
        ActionKind::SetUp => "up",
        ActionKind::AddAddress(_) => "add",
        ActionKind::DelAddress(_) => "del",
        ActionKind::SetPeer(_) => "set",
        ActionKind::RemovePeer { .. } => "remove",
        ActionKind::AddRoute(_) => "add",
        ActionKind::DelRoute(_) => "del",
        ActionKind::Settle(_) => "settle",
    }
}

#[test]
fn empty_host_gets_everything_in_order() {
    let s = spec(vec![peer(1, &["10.210.0.2/32", "10.99.1.0/24"])]);
    let obs = Observed {
        link: None,
        addresses: vec![],
        state: Arc::new(HostState::default()),
        inputs: Inputs::default(),
        ..converged(&s)
    };
    let p = plan(&s, &obs);
    assert_eq!(
        kinds(&p),
        vec![
            "interface wg0 create",
            "key wg0 generate",
            "interface wg0 listen port port",
            "interface wg0 up",
            "address 10.210.0.1/24 wg0 add",
            "peer p1 (AQEBAQEB…) set",
            "route 10.99.1.0/24 wg0 add",
            "route 10.210.0.2/32 wg0 add",
            "settle",
        ]
    );
    let shown: Vec<String> = p.changes.iter().map(|c| c.to_string()).collect();
    assert!(
        shown.contains(&"+ peer p1 (AQEBAQEB…)".to_string()),
        "{shown:?}"
    );
}

#[test]
fn converged_host_plans_nothing() {
    let s = spec(vec![
        peer(1, &["10.210.0.2/32"]),
        peer(2, &["10.210.0.3/32"]),
    ]);
    let p = plan(&s, &converged(&s));
    assert!(p.is_empty(), "{:?}", p.changes);
    assert_eq!(p.requeue_after, None);
}

#[test]
fn one_changed_peer_is_one_update_of_its_changed_fields() {
    let before = spec(vec![peer(1, &["10.99.1.0/24"]), peer(2, &["10.99.2.0/24"])]);
    let mut list: Vec<WireguardPeer> = before.peers.clone().into();
    list[1].allowed_ips = vec!["10.99.3.0/24".into()];
    let after = spec(list);
    let p = plan(&after, &converged(&before));
    assert_eq!(
        kinds(&p),
        vec![
            "peer p2 (AgICAgIC…) set",
            "route 10.99.2.0/24 del",
            "route 10.99.3.0/24 wg0 add",
            "settle"
        ]
    );
    let ActionKind::SetPeer(u) = &p.actions[0].kind else {
        panic!()
    };
    assert_eq!(u.allowed, Some(vec!["10.99.3.0/24".parse().unwrap()]));
    assert_eq!((u.endpoint, u.keepalive, &u.psk), (None, None, &None));
    assert_eq!(p.changes[0].fields[0].field, "allowedIps");
}

#[test]
fn unlisted_peers_are_removed_with_their_routes() {
    let before = spec(vec![peer(1, &["10.99.1.0/24"]), peer(2, &["10.99.2.0/24"])]);
    let after = spec(vec![peer(1, &["10.99.1.0/24"])]);
    let p = plan(&after, &converged(&before));
    assert_eq!(
        kinds(&p),
        vec!["peer AgICAgIC… remove", "route 10.99.2.0/24 del", "settle"]
    );
}

#[test]
fn roamed_endpoint_is_kept_while_the_peer_is_alive() {
    let s = spec(vec![peer(1, &["10.210.0.2/32"])]);
    let mut obs = converged(&s);
    let roamed: SocketAddr = "198.51.100.9:40000".parse().unwrap();
    {
        let st = Arc::make_mut(&mut obs.state);
        let p = st.device.as_mut().unwrap().peers.get_mut(&key(1)).unwrap();
        p.endpoint = Some(roamed);
        p.last_handshake = Some(obs.now - Duration::from_secs(30));
    }
    assert!(plan(&s, &obs).is_empty());
    // Silent for longer than the window: the document's endpoint again.
    Arc::make_mut(&mut obs.state)
        .device
        .as_mut()
        .unwrap()
        .peers
        .get_mut(&key(1))
        .unwrap()
        .last_handshake = Some(obs.now - ROAMING_WINDOW - Duration::from_secs(1));
    let p = plan(&s, &obs);
    let ActionKind::SetPeer(u) = &p.actions[0].kind else {
        panic!("{:?}", p.actions)
    };
    assert_eq!(u.endpoint, Some("192.0.2.1:51820".parse().unwrap()));
    assert_eq!(u.allowed, None);
}

#[test]
fn secrets_are_redacted_and_keys_shortened() {
    let mut list = vec![peer(1, &["10.210.0.2/32"])];
    list[0].preshared_key_secret = Some("psk-1".into());
    let s = spec(list);
    let mut obs = converged(&s);
    let psk = SecretKey([42; 32]);
    obs.inputs.psks.insert("psk-1".into(), Ok(psk.clone()));
    obs.inputs.private_key = KeyInput::Ready(SecretKey([9; 32]));
    let p = plan(&s, &obs);
    let text = format!("{:?} {}", p, serde_json::to_string(&p.changes).unwrap());
    for secret in [
        PublicKey([42; 32]).to_base64(),
        PublicKey([9; 32]).to_base64(),
    ] {
        assert!(!text.contains(&secret), "a secret leaked: {text}");
    }
    assert!(
        !text.contains(&key(1).to_base64()),
        "full keys are shortened"
    );
    assert!(text.contains("<redacted, hmac:"), "{text}");
    assert!(text.contains("AQEBAQEB…"), "{text}");
}

#[test]
fn dns_endpoints_ask_for_a_requeue_and_wait_when_unresolved() {
    let mut list = vec![peer(1, &["10.210.0.2/32"])];
    list[0].endpoint = Some("hub.example.net:51820".into());
    let s = spec(list);
    let mut obs = converged(&s);
    obs.inputs
        .resolved
        .insert("hub.example.net:51820".into(), Err("no such host".into()));
    let p = plan(&s, &obs);
    assert_eq!(p.requeue_after, Some(RERESOLVE_EVERY));
    assert_eq!(p.waiting.len(), 1);
    assert!(p.is_empty());
    obs.inputs.resolved.insert(
        "hub.example.net:51820".into(),
        Ok("203.0.113.5:51820".parse().unwrap()),
    );
    let p = plan(&s, &obs);
    assert_eq!(kinds(&p), vec!["peer p1 (AQEBAQEB…) set", "settle"]);
}

#[test]
fn with_a_baseline_only_changed_peers_are_compared() {
    let before = spec(
        (1..=50)
            .map(|i| peer(i, &[&format!("10.99.{i}.0/24")]))
            .collect(),
    );
    let mut obs = converged(&before);
    let parsed = before.peers.parsed();
    {
        let st = Arc::make_mut(&mut obs.state);
        st.baseline = Some(Baseline {
            digests: parsed.digests.clone(),
            keys: parsed.keys.clone(),
            routing: before.routing_digest(),
            oif: 5,
        });
        // Drift nobody was told about stays unseen until the next full read.
        st.device
            .as_mut()
            .unwrap()
            .peers
            .get_mut(&key(3))
            .unwrap()
            .keepalive = 9;
    }
    assert!(plan(&before, &obs).is_empty());
    let mut list: Vec<WireguardPeer> = before.peers.clone().into();
    list[39].persistent_keepalive = Some(25);
    list.remove(9);
    let after = spec(list);
    let p = plan(&after, &obs);
    assert_eq!(
        kinds(&p),
        vec![
            "peer CgoKCgoK… remove",
            "peer p40 (KCgoKCgo…) set",
            "route 10.99.10.0/24 del",
            "settle"
        ]
    );
    // Without the baseline the drift is found too.
    Arc::make_mut(&mut obs.state).baseline = None;
    assert_eq!(plan(&after, &obs).actions.len(), 5);
}

proptest::proptest! {
    /// The indexed patch of converge's device copy agrees with the plain one (and the
    /// index with the device) after any sequence of updates and removals.
    #[test]
    fn indexed_patch_agrees_with_apply_peer(
        ops in proptest::collection::vec(
            (0u8..4, proptest::option::of(proptest::collection::vec(0u8..6, 0..4)), proptest::bool::ANY),
            0..40,
        )
    ) {
        let net = |i: u8| -> IpNet { format!("10.1.{i}.0/24").parse().unwrap() };
        let mut plain = Device::default();
        let mut indexed = Device::default();
        let mut owners = owners_of(&indexed);
        for (k, allowed, remove) in ops {
            if remove {
                plain.peers.remove(&key(k));
                remove_peer_indexed(&mut indexed, &mut owners, &key(k));
            } else {
                let mut allowed: Option<Vec<IpNet>> =
                    allowed.map(|a| a.into_iter().map(net).collect());
                if let Some(a) = allowed.as_mut() {
                    a.sort();
                    a.dedup();
                }
                let u = PeerUpdate {
                    key: key(k),
                    label: String::new(),
                    allowed,
                    endpoint: None,
                    keepalive: Some(u16::from(k)),
                    psk: None,
                };
                apply_peer(&mut plain, &u);
                apply_peer_indexed(&mut indexed, &mut owners, &u);
            }
            proptest::prop_assert_eq!(&plain, &indexed);
            proptest::prop_assert_eq!(&owners, &owners_of(&indexed));
        }
    }
}

#[test]
fn a_renamed_interface_is_deleted_after_the_new_one_is_set_up() {
    let s = spec(vec![peer(1, &["10.210.0.2/32"])]);
    let obs = Observed {
        stale: vec!["wg-old".into()],
        ..converged(&s)
    };
    let p = plan(&s, &obs);
    let shown: Vec<String> = p.changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(shown, ["- interface wg-old"]);
    assert_eq!(
        p.actions.last().map(|a| (a.iface.as_str(), a.kind.clone())),
        Some(("wg-old", ActionKind::DeleteInterface))
    );
}
