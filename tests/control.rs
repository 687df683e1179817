//! The control-plane connection end to end: a real nats-server and the reference control
//! plane (`converge control-plane serve`) in their own sandbox node, real agents enrolled
//! with `converge join` in theirs. Enrollment tokens; refusal of forged, misaddressed and
//! replayed envelopes with the host unchanged; sealed secrets (round trip and absence
//! from logs, diff, status and stores); disconnect/reconnect on both transports; per-node
//! isolation on NATS. The plane and its servers: `tests/common/plane.rs`.

mod common;

use common::agent::{converge, data, status};
use common::plane::{
    agent_log, join, join_as, join_ok, join_through, start_agent, stderr, Cp, HTTP_PORT,
};
use common::sandbox::{converge_bin, require_tool, wait_until, TestNode};
use serde_json::{json, Value};
use std::fs;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `f` with an HTTPS client that trusts the plane's CA, in the plane's namespace.
fn with_client<T: Send, F: std::future::Future<Output = T>>(
    cp: &Cp,
    f: impl FnOnce(reqwest::Client) -> F + Send,
) -> T {
    let ca = fs::read(cp.ca()).expect("ca");
    cp.node.in_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("ca pem"))
            .build()
            .expect("client");
        rt.block_on(f(client))
    })
}

/// Asserts that the command failed and said `needle`.
fn assert_refused(out: &Output, needle: &str) {
    assert!(!out.status.success(), "succeeded: {}", stderr(out));
    assert!(stderr(out).contains(needle), "{}", stderr(out));
}

fn doc(node: &str, generation: u64) -> Value {
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": node, "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-11-24T10:00:00Z"
    })
}

fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_accepted(node: &TestNode, generation: u64) {
    poll(
        Duration::from_secs(30),
        &format!("{} accepts {generation}", node.name()),
        || (status(node)["generation"] == generation).then_some(()),
    );
}

/// Generations in the node's store.
fn stored_generations(node: &TestNode) -> Vec<u64> {
    let db = rusqlite::Connection::open(data(node).join("state.db")).expect("open store");
    let mut st = db
        .prepare("SELECT generation FROM documents ORDER BY generation")
        .expect("query");
    let rows = st
        .query_map([], |r| r.get::<_, i64>(0))
        .expect("rows")
        .map(|r| u64::try_from(r.expect("row")).expect("generation"))
        .collect();
    rows
}

fn control_json(node: &TestNode) -> Value {
    serde_json::from_slice(&fs::read(data(node).join("control.json")).expect("control.json"))
        .expect("control.json parses")
}

#[test]
fn enrollment_good_reused_and_expired_tokens() {
    use std::os::unix::fs::PermissionsExt;
    let cp = Cp::new(false);
    let a = TestNode::new("ea");
    let b = TestNode::new("eb");
    let token = cp.token(600);
    let out = join(&a, &cp, &token, &[]);
    assert!(out.status.success(), "good token: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ea");
    for f in ["control.json", "identity.key", "sealing.key"] {
        let mode = fs::metadata(data(&a).join(f))
            .expect(f)
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let pinned = control_json(&a);
    assert_eq!(pinned["nodeId"], "ea");
    assert_eq!(pinned["transport"]["kind"], "https");
    assert!(pinned["transport"]["url"]
        .as_str()
        .is_some_and(|u| u.starts_with("https://")));
    // Without trusting the control plane's certificate, no enrollment.
    let out = converge(
        &b,
        &[
            "join",
            "--url",
            &cp.http_url(),
            "--token",
            &cp.token(600),
            "--name",
            "eb",
        ],
    );
    assert_refused(&out, "cannot reach the control plane");
    let identity = fs::read_to_string(data(&a).join("identity.key")).expect("key");
    let record = cp.record("ea");
    assert_eq!(record["facts"]["arch"], std::env::consts::ARCH);
    assert!(!record["facts"]["kernel"]
        .as_str()
        .unwrap_or_default()
        .is_empty());
    // The private key never left the node.
    assert!(!fs::read(cp.root.join("data/control-plane.db"))
        .map(|b| String::from_utf8_lossy(&b).contains(identity.trim()))
        .unwrap_or(false));

    // Reused token: refused (on another node too).
    let out = join(&b, &cp, &token, &[]);
    assert_refused(&out, "already used");
    // Expired token.
    let out = join(&b, &cp, &cp.token(-1), &[]);
    assert_refused(&out, "expired");
    assert!(!data(&b).join("control.json").exists());
    // Unknown token.
    let out = join(&b, &cp, "0123456789abcdef", &[]);
    assert!(
        stderr(&out).contains("unknown registration token"),
        "{}",
        stderr(&out)
    );

    // An enrolled node refuses to join again without --force, and keeps its keys.
    let out = join(&a, &cp, &cp.token(600), &[]);
    assert_refused(&out, "already enrolled");
    assert_eq!(
        fs::read_to_string(data(&a).join("identity.key")).expect("key"),
        identity
    );
}

#[test]
fn enrollment_binds_a_token_to_one_node_and_never_replaces_keys_silently() {
    let cp = Cp::new(false);
    let a = TestNode::new("ta");
    let b = TestNode::new("tb");
    let c = TestNode::new("tc");
    join_ok(&a, &cp);
    let identity = fs::read_to_string(data(&a).join("identity.key")).expect("key");
    let key = cp.record("ta")["publicKey"].clone();
    let keys_unchanged = |what: &str| {
        assert_eq!(
            fs::read_to_string(data(&a).join("identity.key")).expect("key"),
            identity,
            "{what}: the node's keys are kept"
        );
        assert_eq!(
            cp.record("ta")["publicKey"],
            key,
            "{what}: the plane's record is kept"
        );
    };
    // Another host asking for an enrolled name with a fresh token: refused, and it is
    // left with no key files.
    let out = join_as(&b, "ta", &cp, &cp.token(600), &[]);
    assert_refused(&out, "re-enroll ta");
    for f in ["identity.key", "sealing.key", "control.json"] {
        assert!(!data(&b).join(f).exists(), "{f} left by a refused join");
    }
    keys_unchanged("takeover");
    // Names that normalise to the same id collide the same way.
    let out = join_as(&b, "t.b", &cp, &cp.token(600), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = join_as(&c, "t-b", &cp, &cp.token(600), &[]);
    assert_refused(&out, "enrolled already");
    // A token issued for one name enrolls that name only.
    let named = |name: &str| {
        let out = cp.cli(&[
            "control-plane",
            "token",
            "--data",
            &cp.data(),
            "--name",
            name,
        ]);
        assert!(out.status.success(), "token: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let for_tc = named("tc");
    let out = join_as(&c, "tc-other", &cp, &for_tc, &[]);
    assert_refused(&out, "is for node \"tc\"");
    let out = join(&c, &cp, &for_tc, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // `join --force` of the enrolled node with a token for any node: refused, and the
    // old keys stay (they are replaced only once an enrollment succeeded).
    let out = join(&a, &cp, &cp.token(600), &["--force"]);
    assert!(!out.status.success());
    keys_unchanged("--force refused");
    // Only `nodes re-enroll ta` gives ta new keys.
    let out = cp.cli(&[
        "control-plane",
        "nodes",
        "re-enroll",
        "ta",
        "--data",
        &cp.data(),
    ]);
    assert!(out.status.success(), "re-enroll: {}", stderr(&out));
    let reenroll = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = join_as(&b, "t.b", &cp, &reenroll, &["--force"]);
    assert!(
        !out.status.success(),
        "the re-enroll token of ta enrolls ta only"
    );
    let out = join(&a, &cp, &reenroll, &["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let now = fs::read_to_string(data(&a).join("identity.key")).expect("key");
    assert_ne!(now, identity);
    assert_ne!(cp.record("ta")["publicKey"], key);
}

#[test]
fn nats_refuses_forged_misaddressed_and_replayed_documents_and_isolates_nodes() {
    let cp = Cp::new(true);
    let a = TestNode::new("na");
    let b = TestNode::new("nb");
    join_ok(&a, &cp);
    join_ok(&b, &cp);
    assert_eq!(control_json(&a)["transport"]["kind"], "nats");
    let _agent_a = start_agent(&a);
    let _agent_b = start_agent(&b);
    let old = cp.sign("na", &doc("na", 1));
    // Signed now with a high generation, delivered after newer documents: its issue
    // time is then before the one in force.
    let early = cp.sign("na", &doc("na", 9));
    // Issue times are in milliseconds and a tie is not "before": the plane signs what
    // follows at least a millisecond later.
    let early_issued = issued_at(&early);
    wait_until(
        Duration::from_secs(1),
        "the clock past the early issue time",
        || chrono::Utc::now() >= early_issued + chrono::Duration::milliseconds(1),
    );
    cp.publish("na", &doc("na", 1));
    cp.publish("nb", &doc("nb", 1));
    wait_accepted(&a, 1);
    wait_accepted(&b, 1);
    cp.publish("na", &doc("na", 2));
    wait_accepted(&a, 2);
    // Status reaches the control plane: accepted and converged generation 2.
    poll(
        Duration::from_secs(20),
        "status of na at the control plane",
        || {
            let r = cp.record("na");
            (r["acceptedGeneration"] == 2 && r["convergedGeneration"] == 2).then_some(())
        },
    );
    assert_eq!(status(&a)["control"]["connected"], true);

    let refused = |what: &str, generation: u64, needle: &str| {
        poll(Duration::from_secs(20), what, || {
            let r = cp.record("na")["refused"].clone();
            (r["generation"] == generation
                && r["error"].as_str().is_some_and(|e| e.contains(needle)))
            .then_some(())
        });
        assert_eq!(status(&a)["generation"], 2, "{what}: host unchanged");
        assert_eq!(
            stored_generations(&a),
            vec![1, 2],
            "{what}: store unchanged"
        );
    };

    // A forged envelope: a valid signature of another document.
    let mut forged: Value = serde_json::from_str(&cp.sign("na", &doc("na", 5))).expect("envelope");
    let other = {
        use base64::Engine as _;
        let mut d = doc("na", 5);
        d["dns"] =
            json!({"zone": "evil", "listen": ["127.0.0.1"], "port": 53, "ttl": 5, "records": []});
        base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&d).expect("json"))
    };
    forged["document"] = json!(other);
    cp.put("na", &forged.to_string());
    refused("forged", 5, "bad signature");
    // Unsigned.
    forged["signature"] = json!("");
    forged["generation"] = json!(6);
    cp.put("na", &forged.to_string());
    refused("unsigned", 6, "unsigned");
    // Another node's (correctly signed) document offered under this node's key.
    cp.put("na", &cp.sign("nb", &doc("nb", 7)));
    refused("other node", 7, "is for node");
    // Replay of an old, correctly signed envelope (rollback).
    cp.put("na", &old);
    refused("replay", 1, "not newer");
    // A correctly signed envelope with a higher generation but issued before the
    // document in force (an old signature kept back).
    cp.put("na", &early);
    refused("issued earlier", 9, "is before");

    // Isolation: with na's credentials nothing of nb's is readable, and na cannot speak
    // for nb.
    let pinned = control_json(&a);
    let user = pinned["transport"]["user"]
        .as_str()
        .expect("user")
        .to_string();
    // No password: the node's NATS user is its identity key (an nkey), the plane's its
    // own nkey; the users file holds public keys only.
    assert!(pinned["transport"].get("password").is_none(), "{pinned}");
    let users = fs::read_to_string(cp.root.join("auth.conf")).expect("auth.conf");
    assert_eq!(users.matches("password").count(), 0, "{users}");
    assert!(users.matches("nkey: \"U").count() >= 3, "{users}");
    let identity = converge::control::identity::Identity::load(&data(&a)).expect("keys");
    let (_, seed) = converge::control::nats::nkey(identity.signing_key()).expect("nkey");
    let url = cp.nats_url();
    let ca_pem = fs::read_to_string(cp.ca()).expect("ca");
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let seen = std::thread::scope(|s| {
        let spy = s.spawn(|| {
            cp.node.in_netns(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(isolation_probe(&url, &user, &seed, &ca_pem, ready_tx, done))
            })
        });
        let _ = ready.recv_timeout(Duration::from_secs(60));
        cp.publish("nb", &doc("nb", 2));
        wait_accepted(&b, 2);
        let _ = done_tx.send(());
        spy.join().expect("probe thread")
    });
    assert!(seen.is_empty(), "na saw nb's data: {seen:?}");
    // The probe's own status, sent after the forged one on the same connection, reaches
    // the plane after it: once it is recorded, a forged status let through would be too.
    poll(
        Duration::from_secs(20),
        "the probe's own status at the control plane",
        || (cp.record("na")["refused"]["error"] == PROBE_DONE).then_some(()),
    );
    assert!(
        !cp.record("nb")["refused"]
            .to_string()
            .contains("forged by na"),
        "na published a status for nb"
    );
}

/// The error of the status the isolation probe sends for itself once it is done.
const PROBE_DONE: &str = "isolation probe done";

/// Runs as node `na`: tries to read `nb`'s document and to speak for it; signals `ready`
/// once its subscriptions are in place and listens on them until `done` (nb has its
/// next document). Returns what it managed to see (nothing, if the permissions hold).
/// An attempt ends with its answer, or with the server's report that the publish was
/// refused for want of permission (nothing will answer then), or after 3 s.
async fn isolation_probe(
    url: &str,
    user: &str,
    seed: &str,
    ca: &str,
    ready: std::sync::mpsc::Sender<()>,
    mut done: tokio::sync::oneshot::Receiver<()>,
) -> Vec<String> {
    use async_nats::jetstream::consumer::{push, AckPolicy, DeliverPolicy};
    use futures::StreamExt;
    let mut seen = Vec::new();
    let (errors, mut refused) = tokio::sync::mpsc::unbounded_channel();
    let opts = async_nats::ConnectOptions::with_nkey(seed.into()).event_callback(move |event| {
        let errors = errors.clone();
        async move {
            if let async_nats::Event::ServerError(async_nats::ServerError::Other(e)) = event {
                let _ = errors.send(e);
            }
        }
    });
    let client = converge::control::nats::with_tls(opts, url, Some(ca))
        .expect("tls")
        .custom_inbox_prefix(format!("_INBOX_{user}"))
        .connect(url)
        .await
        .expect("na connects with its own credentials");
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(3));
    let watch = |key: &str| push::Config {
        deliver_subject: client.new_inbox(),
        name: Some(format!("spy-{key}")),
        filter_subject: format!("$KV.converge.{key}"),
        deliver_policy: DeliverPolicy::LastPerSubject,
        ack_policy: AckPolicy::None,
        ..Default::default()
    };
    // Nodes make no consumers (the plane makes each node's): not on nb's key, and not on
    // its own key either, where it could aim the delivery at nb's status subject.
    let made = tokio::select! {
        made = js.create_consumer_on_stream(watch("nb"), "KV_converge") => {
            made.map_err(|e| e.to_string())
        }
        () = publish_refused(&mut refused, "$JS.API.CONSUMER.") => {
            Err("publish refused by the server".to_string())
        }
    };
    match made {
        Ok(c) => {
            let mut m = c.messages().await.expect("messages");
            if let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(3), m.next()).await {
                seen.push(format!("watch of nb: {} bytes", m.payload.len()));
            } else {
                seen.push("a consumer on nb's key was created".into());
            }
        }
        Err(e) => eprintln!("watch of nb refused: {e}"),
    }
    let aimed = push::Config {
        deliver_subject: "converge.status.nb".into(),
        ..watch(user)
    };
    let made = tokio::select! {
        made = js.create_consumer_on_stream(aimed, "KV_converge") => made.is_ok(),
        () = publish_refused(&mut refused, "$JS.API.CONSUMER.") => false,
    };
    if made {
        seen.push("a consumer delivering to nb's status subject was created".into());
    }
    // Raw API calls: a consumer without the filter in the subject, a durable one, direct
    // and stream message gets; changing or deleting its own consumer.
    for (subject, body) in [
        ("$JS.API.CONSUMER.DELETE.KV_converge.node-na", ""),
        (
            "$JS.API.CONSUMER.CREATE.KV_converge.node-na.$KV.converge.na",
            r#"{"stream_name":"KV_converge","config":{"durable_name":"node-na","filter_subject":"$KV.converge.na","deliver_subject":"converge.status.nb","deliver_policy":"last_per_subject","ack_policy":"none"}}"#,
        ),
        (
            "$JS.API.CONSUMER.CREATE.KV_converge",
            r#"{"stream_name":"KV_converge","config":{"filter_subject":"$KV.converge.nb","deliver_subject":"_INBOX_na.x","deliver_policy":"last_per_subject","ack_policy":"none"}}"#,
        ),
        (
            "$JS.API.CONSUMER.DURABLE.CREATE.KV_converge.spy",
            r#"{"stream_name":"KV_converge","config":{"durable_name":"spy","filter_subject":"$KV.converge.nb","deliver_subject":"_INBOX_na.x","deliver_policy":"last_per_subject","ack_policy":"none"}}"#,
        ),
        ("$JS.API.DIRECT.GET.KV_converge.$KV.converge.nb", ""),
        (
            "$JS.API.STREAM.MSG.GET.KV_converge",
            r#"{"last_by_subj":"$KV.converge.nb"}"#,
        ),
        // Purge and delete, of nb's key and of its own: the KV stream is the plane's.
        (
            "$JS.API.STREAM.PURGE.KV_converge",
            r#"{"filter":"$KV.converge.nb"}"#,
        ),
        (
            "$JS.API.STREAM.PURGE.KV_converge",
            r#"{"filter":"$KV.converge.na"}"#,
        ),
        ("$JS.API.STREAM.MSG.DELETE.KV_converge", r#"{"seq":1}"#),
    ] {
        let r = tokio::select! {
            r = tokio::time::timeout(
                Duration::from_secs(3),
                client.request(subject.to_string(), body.as_bytes().to_vec().into()),
            ) => r.ok().and_then(Result::ok),
            () = publish_refused(&mut refused, subject) => None,
        };
        if let Some(m) = r {
            let text = String::from_utf8_lossy(&m.payload).to_string();
            if !text.contains("\"error\"") {
                seen.push(format!("{subject}: {text}"));
            }
        }
    }
    // Subscriptions outside its inbox are refused by the server; whatever arrives on them
    // while nb receives generation 2 counts as seen.
    let mut subs = Vec::new();
    for subject in ["$KV.converge.nb", "_INBOX_nb.>", "_INBOX.>", ">"] {
        if let Ok(s) = client.subscribe(subject.to_string()).await {
            subs.push(s);
        }
    }
    // Speaking for nb: a status message on nb's subject.
    let forged = json!({"type": "refused", "nodeId": "nb", "sentAt": "2026-01-01T00:00:00Z",
        "generation": 99, "error": "forged by na"});
    let _ = client
        .publish(
            "converge.status.nb",
            serde_json::to_vec(&forged).expect("json").into(),
        )
        .await;
    // Then a status of its own (which it may send), the barrier the test waits for.
    // Sent now: the plane keeps a node's newest refusal by the node's clock.
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let own = json!({"type": "refused", "nodeId": "na", "sentAt": now,
        "generation": 98, "error": PROBE_DONE});
    let _ = client
        .publish(
            "converge.status.na",
            serde_json::to_vec(&own).expect("json").into(),
        )
        .await;
    let _ = client.flush().await;
    let _ = ready.send(());
    let deadline = tokio::time::sleep(Duration::from_secs(120));
    tokio::pin!(deadline);
    let mut all = futures::stream::select_all(subs);
    loop {
        tokio::select! {
            biased;
            m = all.next() => match m {
                Some(m) => seen.push(format!("{}: {} bytes", m.subject, m.payload.len())),
                None => break,
            },
            // Sent, or dropped by a failing test.
            _ = &mut done => break,
            () = &mut deadline => break,
        }
    }
    seen
}

/// Waits until the server reports a publish to a subject containing `subject` refused
/// for want of permission (it answers a refused publish with such an error, nothing else).
async fn publish_refused(errors: &mut tokio::sync::mpsc::UnboundedReceiver<String>, subject: &str) {
    while let Some(e) = errors.recv().await {
        if e.contains("Permissions Violation for Publish") && e.contains(subject) {
            return;
        }
    }
    std::future::pending().await
}

/// The `issuedAt` of an envelope.
fn issued_at(envelope: &str) -> chrono::DateTime<chrono::Utc> {
    let v: Value = serde_json::from_str(envelope).expect("envelope json");
    chrono::DateTime::parse_from_rfc3339(v["issuedAt"].as_str().expect("issuedAt"))
        .expect("rfc3339")
        .to_utc()
}

/// A WireGuard key used as the secret: its public half shows in status once the
/// reconciler has opened the sealed value and set it on the interface.
const WG_PRIVATE: [u8; 32] = [7; 32];

#[test]
fn sealed_secret_round_trip_and_absence_from_logs_diff_status_and_stores() {
    use base64::Engine as _;
    require_tool("wireguard-go");
    let b64 = base64::engine::general_purpose::STANDARD;
    let secret = b64.encode(WG_PRIVATE);
    let public = b64.encode(
        crypto_box::SecretKey::from(WG_PRIVATE)
            .public_key()
            .as_bytes(),
    );
    let cp = Cp::new(true);
    let node = TestNode::new("sa");
    join_ok(&node, &cp);
    let _agent = start_agent(&node);
    let iface = format!("wgc{}", std::process::id() % 100_000);
    let mut d = doc("sa", 1);
    d["wireguard"] = json!({"interface": iface, "privateKeySecret": "wg-key", "listenPort": 51820,
        "addresses": ["10.99.7.1/24"], "peers": []});
    d["secrets"] = json!({"wg-key": secret});
    cp.publish("sa", &d);
    wait_accepted(&node, 1);
    // Round trip: the interface runs with the key from the sealed secret.
    poll(
        Duration::from_secs(30),
        "wireguard converged with the sealed key",
        || {
            let s = status(&node);
            let wg = s["reconcilers"]
                .as_array()
                .and_then(|r| r.iter().find(|r| r["reconciler"] == "wireguard").cloned())
                .unwrap_or(Value::Null);
            (wg["state"] == "Converged" && wg.to_string().contains(&public)).then_some(())
        },
    );
    // What travelled and is stored is sealed: the store holds the document as received.
    let db = rusqlite::Connection::open(data(&node).join("state.db")).expect("store");
    let body: String = db
        .query_row("SELECT body FROM documents WHERE generation = 1", [], |r| {
            r.get(0)
        })
        .expect("stored document");
    let stored: Value = serde_json::from_str(&body).expect("stored json");
    let sealed = stored["secrets"]["wg-key"].as_str().expect("sealed value");
    assert_ne!(sealed, secret);
    assert!(
        b64.decode(sealed).expect("base64").len() >= 48 + 32,
        "a sealed box"
    );
    // `converge diff` of the stored document opens the secret in memory: no changes.
    let file = node.data_dir().join("stored.json");
    fs::write(&file, &body).expect("write");
    let diff = converge(&node, &["diff", file.to_str().expect("path")]);
    assert_eq!(diff.status.code(), Some(0), "diff: {}", stderr(&diff));
    let status_text = converge(&node, &["status"]);
    let mut places = vec![
        ("diff output".to_string(), stderr(&diff).into_bytes()),
        ("status".to_string(), stderr(&status_text).into_bytes()),
        (
            "status json".to_string(),
            status(&node).to_string().into_bytes(),
        ),
        (
            "control plane nodes".to_string(),
            serde_json::to_vec(&cp.nodes()).expect("json"),
        ),
    ];
    // Every file the node and the control plane wrote (store, WAL, logs), except the
    // control plane's document directory, which holds the plaintext by design.
    for dir in [
        data(&node),
        node.data_dir().to_path_buf(),
        cp.root.join("data"),
        cp.root.clone(),
    ] {
        for entry in fs::read_dir(&dir).expect("dir").flatten() {
            let p = entry.path();
            if p.is_file() && !p.starts_with(cp.root.join("docs")) {
                places.push((p.display().to_string(), fs::read(&p).unwrap_or_default()));
            }
        }
    }
    assert!(places
        .iter()
        .any(|(p, _)| p.ends_with("state.db-wal") || p.ends_with("state.db")));
    for (place, bytes) in &places {
        assert!(
            !String::from_utf8_lossy(bytes).contains(&secret),
            "the secret value appears in {place}"
        );
    }
    assert!(fs::read_to_string(agent_log(&node))
        .expect("agent log")
        .contains("accepted document"));
}

/// Stop the transport, publish two generations, bring it back: the node converges to the
/// newest and never stores the one in between; meanwhile status says disconnected.
fn disconnect_and_reconnect(use_nats: bool, name: &str) {
    let mut cp = Cp::new(use_nats);
    let node = TestNode::new(name);
    join_ok(&node, &cp);
    let _agent = start_agent(&node);
    cp.publish(name, &doc(name, 1));
    wait_accepted(&node, 1);
    poll(Duration::from_secs(10), "connected", || {
        (status(&node)["control"]["connected"] == true).then_some(())
    });
    if use_nats {
        cp.stop_nats();
    } else {
        cp.stop_server();
    }
    poll(Duration::from_secs(60), "disconnected in status", || {
        (status(&node)["control"]["connected"] == false).then_some(())
    });
    let text = String::from_utf8_lossy(&converge(&node, &["status"]).stdout).to_string();
    assert!(text.contains("control: disconnected"), "{text}");
    // On NATS the plane runs on and reads each generation (it cannot put it on NATS);
    // over HTTPS it is stopped and reads only the last file when it is back.
    for generation in [2, 3] {
        cp.publish(name, &doc(name, generation));
        if use_nats {
            wait_until(
                Duration::from_secs(10),
                &format!("the plane reads generation {generation}"),
                || cp.read_generation(name, generation),
            );
        }
    }
    if use_nats {
        cp.start_nats();
    } else {
        cp.start_server();
    }
    let t0 = Instant::now();
    wait_accepted(&node, 3);
    eprintln!(
        "{}: converged to generation 3 {:?} after the server came back",
        if use_nats { "nats" } else { "https" },
        t0.elapsed()
    );
    assert_eq!(
        stored_generations(&node),
        vec![1, 3],
        "generation 2 skipped"
    );
    poll(Duration::from_secs(20), "connected again", || {
        (status(&node)["control"]["connected"] == true).then_some(())
    });
    poll(
        Duration::from_secs(20),
        "status at the control plane",
        || (cp.record(name)["acceptedGeneration"] == 3).then_some(()),
    );
}

#[test]
fn nats_disconnect_and_reconnect_converges_to_the_newest() {
    disconnect_and_reconnect(true, "dn");
}

#[test]
fn https_disconnect_and_reconnect_converges_to_the_newest() {
    disconnect_and_reconnect(false, "dh");
}

#[test]
fn https_documents_and_status() {
    let cp = Cp::new(false);
    let node = TestNode::new("ha");
    join_ok(&node, &cp);
    let _agent = start_agent(&node);
    // Connected as soon as a signed request went through, not when the first long poll
    // (25 s, nothing published yet) returns.
    poll(
        Duration::from_secs(10),
        "connected before any document",
        || (status(&node)["control"]["connected"] == true).then_some(()),
    );
    cp.publish("ha", &doc("ha", 1));
    wait_accepted(&node, 1);
    cp.publish("ha", &doc("ha", 2));
    wait_accepted(&node, 2);
    poll(Duration::from_secs(20), "status over https", || {
        let r = cp.record("ha");
        (r["acceptedGeneration"] == 2 && r["convergedGeneration"] == 2).then_some(())
    });
    let text = String::from_utf8_lossy(
        &cp.cli(&["control-plane", "nodes", "--data", &cp.data()])
            .stdout,
    )
    .to_string();
    assert!(
        text.contains("ha") && text.contains("dns=Unmanaged"),
        "{text}"
    );
    // Requests not signed by the node's key are refused.
    let url = cp.http_url();
    let codes = with_client(&cp, |client| async move {
        let unsigned = client
            .get(format!("{url}/v1/nodes/ha/document?after=0"))
            .send()
            .await
            .expect("unsigned request");
        let forged = client
            .post(format!("{url}/v1/nodes/ha/status"))
            .header("x-converge-node", "ha")
            .header(
                "x-converge-time",
                chrono::Utc::now().timestamp().to_string(),
            )
            .header("x-converge-signature", "AAAA")
            .body("{}")
            .send()
            .await
            .expect("forged request");
        (unsigned.status().as_u16(), forged.status().as_u16())
    });
    assert_eq!(codes, (401, 401));
    // A request the node signed, captured and sent again: accepted once only.
    let identity = converge::control::identity::Identity::load(&data(&node)).expect("node keys");
    let url = cp.http_url();
    let codes = with_client(&cp, |client| async move {
        let (time, nonce) = (
            chrono::Utc::now().timestamp(),
            converge::control::protocol::nonce(),
        );
        let path = "/v1/nodes/ha/hello";
        let sig = converge::control::protocol::SignedRequest {
            method: "GET",
            path_and_query: path,
            time,
            nonce: &nonce,
            body: b"",
        }
        .sign(identity.signing_key());
        let mut codes = Vec::new();
        for _ in 0..2 {
            let resp = client
                .get(format!("{url}{path}"))
                .header("x-converge-node", "ha")
                .header("x-converge-time", time.to_string())
                .header("x-converge-nonce", &nonce)
                .header("x-converge-signature", &sig)
                .send()
                .await
                .expect("signed request");
            codes.push(resp.status().as_u16());
        }
        codes
    });
    assert_eq!(codes, [204, 401], "a replayed request is refused");
    assert!(cp.log().contains("a signed request was replayed"));
    // An invalid document is refused by the control plane itself: nothing is sent.
    cp.publish("ha", &json!({"apiVersion": "converge/v1", "generation": 3}));
    poll(
        Duration::from_secs(10),
        "the plane refusing to publish it",
        || cp.log().contains("document not published").then_some(()),
    );
    assert_eq!(status(&node)["generation"], 2);
}

#[test]
fn the_plane_key_is_trusted_only_over_an_authenticated_channel() {
    let cp = Cp::new(false);
    let a = TestNode::new("ka");
    // `token` prints the join command with the plane's key on stderr (stdout: the token).
    let out = cp.cli(&[
        "control-plane",
        "token",
        "--data",
        &cp.data(),
        "--name",
        "ka",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let hint = String::from_utf8_lossy(&out.stderr).to_string();
    let fingerprint = hint
        .split_whitespace()
        .skip_while(|w| *w != "--plane-key")
        .nth(1)
        .expect("--plane-key in the join hint")
        .to_string();
    assert!(fingerprint.starts_with("SHA256:"), "{hint}");
    // `serve` says the same key.
    assert!(cp.log().contains(&fingerprint), "{}", cp.log());
    let no_files = |node: &TestNode, what: &str| {
        for f in ["identity.key", "sealing.key", "control.json"] {
            assert!(!data(node).join(f).exists(), "{what}: {f} written");
        }
    };
    // A plane answering with another key: not enrolled, nothing written.
    let out = join_as(
        &a,
        "kx",
        &cp,
        &cp.token(600),
        &["--plane-key", "SHA256:bm90IHRoZSBrZXk"],
    );
    assert_refused(&out, "not the expected");
    no_files(&a, "wrong key");
    // Plain HTTP: refused before anything is sent.
    let plain = format!("http://{}:{HTTP_PORT}", cp.node.address());
    let out = converge(
        &a,
        &["join", "--url", &plain, "--token", &token, "--name", "ka"],
    );
    assert_refused(&out, "refusing to enroll over plain http://");
    no_files(&a, "plain http");
    // The right key: enrolled.
    let out = join(&a, &cp, &token, &["--plane-key", &fingerprint]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A plane on plain HTTP without --insecure-http enrolls nobody.
    let data2 = cp.root.join("data-plain");
    let log2 = fs::File::create(cp.root.join("cp-plain.log")).expect("log");
    let mut cmd = cp.node.command(converge_bin());
    cmd.args(["control-plane", "serve", "--dir"])
        .arg(cp.root.join("docs"))
        .arg("--data")
        .arg(&data2)
        .args(["--listen", &format!("{}:8444", cp.node.address())])
        .stdout(Stdio::null())
        .stderr(log2);
    let _plain_plane = cp.node.spawn(&mut cmd);
    wait_until(Duration::from_secs(15), "plain plane serving", || {
        fs::read_to_string(cp.root.join("cp-plain.log"))
            .is_ok_and(|l| l.contains("control plane serving"))
    });
    let out = cp.cli(&[
        "control-plane",
        "token",
        "--data",
        data2.to_str().expect("utf-8"),
    ]);
    let token2 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let b = TestNode::new("kb");
    let url2 = format!("http://{}:8444", cp.node.address());
    let out = converge(
        &b,
        &[
            "join",
            "--url",
            &url2,
            "--token",
            &token2,
            "--name",
            "kb",
            "--insecure-http",
        ],
    );
    assert_refused(&out, "does not enroll over plain HTTP");
    no_files(&b, "plain plane");
}

#[test]
fn nats_is_tls_verified_against_the_ca_pinned_at_join() {
    let cp = Cp::new(true);
    let good = TestNode::new("ta1");
    let bad = TestNode::new("ta2");
    join_ok(&good, &cp);
    join_ok(&bad, &cp);
    assert!(control_json(&good)["transport"]["url"]
        .as_str()
        .is_some_and(|u| u.starts_with("tls://")));
    // The second node pins another CA than the one that signed the server's certificate
    // (as if its server had been replaced): it must not connect.
    let other = bad.data_dir().join("other-ca");
    let out = bad.run(
        "openssl",
        [
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=another-ca",
            "-keyout",
            &format!("{}.key", other.display()),
            "-out",
            &format!("{}.crt", other.display()),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut pinned = control_json(&bad);
    pinned["caCert"] = json!(fs::read_to_string(format!("{}.crt", other.display())).expect("ca"));
    fs::write(
        data(&bad).join("control.json"),
        serde_json::to_vec_pretty(&pinned).expect("json"),
    )
    .expect("control.json");
    let _a = start_agent(&good);
    let _b = start_agent(&bad);
    cp.publish("ta1", &doc("ta1", 1));
    cp.publish("ta2", &doc("ta2", 1));
    wait_accepted(&good, 1);
    // The bad node has tried and failed: its TLS handshake refused the server (the NATS
    // client logs the failed connection, without the reason).
    poll(
        Duration::from_secs(20),
        "the bad node's failed connection",
        || {
            let log = fs::read_to_string(agent_log(&bad)).unwrap_or_default();
            log.contains("client error").then_some(())
        },
    );
    let st = status(&bad);
    assert_eq!(st["control"]["connected"], false, "{st}");
    assert_eq!(st["generation"], Value::Null, "nothing accepted: {st}");
}

/// `control-plane rotate-key`: an online node moves its pin on the re-signed document
/// it already has (no new generation, no refusal), a node offline during the rotation
/// follows the chain when it comes back, and the old key is refused afterwards.
fn key_rotation(use_nats: bool, on_name: &str, off_name: &str) {
    let cp = Cp::new(use_nats);
    let on = TestNode::new(on_name);
    let off = TestNode::new(off_name);
    join_ok(&on, &cp);
    join_ok(&off, &cp);
    let old_key = control_json(&on)["signingKey"].clone();
    let _agent_on = start_agent(&on);
    let mut agent_off = start_agent(&off);
    cp.publish(on_name, &doc(on_name, 1));
    cp.publish(off_name, &doc(off_name, 1));
    wait_accepted(&on, 1);
    wait_accepted(&off, 1);
    agent_off.kill().expect("stop the offline node's agent");
    agent_off.wait().expect("reap it");
    // Signed by the old key before the rotation, offered after it.
    let stale = cp.sign(on_name, &doc(on_name, 5));

    let out = cp.cli(&["control-plane", "rotate-key", "--data", &cp.data()]);
    assert!(out.status.success(), "rotate-key: {}", stderr(&out));
    let t0 = Instant::now();
    let new_key = poll(Duration::from_secs(30), "online node follows", || {
        let k = control_json(&on)["signingKey"].clone();
        (k != old_key).then_some(k)
    });
    eprintln!(
        "{}: online node pinned the new key {:?} after rotate-key",
        if use_nats { "nats" } else { "https" },
        t0.elapsed()
    );
    assert_eq!(stored_generations(&on), vec![1], "no new generation");
    assert_eq!(status(&on)["generation"], 1);
    let events = String::from_utf8_lossy(&converge(&on, &["status"]).stdout).to_string();
    assert!(!events.contains("refused"), "{events}");

    cp.publish(on_name, &doc(on_name, 2));
    wait_accepted(&on, 2);

    // The offline node: back after the rotation, pinned to the old key.
    assert_eq!(control_json(&off)["signingKey"], old_key);
    cp.publish(off_name, &doc(off_name, 2));
    let _agent_off = start_agent(&off);
    wait_accepted(&off, 2);
    assert_eq!(control_json(&off)["signingKey"], new_key);
    let log = fs::read_to_string(agent_log(&off)).unwrap_or_default();
    assert!(log.contains("signing key rotated"), "{log}");

    // The old key is refused from now on.
    if use_nats {
        cp.put(on_name, &stale);
        poll(Duration::from_secs(20), "old key refused", || {
            let r = cp.record(on_name)["refused"].clone();
            (r["generation"] == 5
                && r["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("not by the pinned control-plane key")))
            .then_some(())
        });
        assert_eq!(stored_generations(&on), vec![1, 2]);
    }
    // A node enrolling now pins the new key directly.
    let late = TestNode::new(&format!("{on_name}l"));
    join_ok(&late, &cp);
    assert_eq!(control_json(&late)["signingKey"], new_key);
}

#[test]
fn nats_signing_key_rotation_reaches_online_and_offline_nodes() {
    key_rotation(true, "rn", "ro");
}

#[test]
fn https_signing_key_rotation_reaches_online_and_offline_nodes() {
    key_rotation(false, "rh", "rf");
}

/// `control-plane plan` over one transport: four nodes at generation 1, candidates at
/// generation 2 — one unchanged, one with firewall changes (counts as `converge diff`
/// on the node gives them), one the node refuses (`$.node.mode`), one whose agent is
/// stopped (no answer within the timeout). Afterwards every host and store is as
/// before. Over NATS, a signed dry-run request put where envelopes go is refused.
fn fleet_dry_run(use_nats: bool, p: &str) {
    require_tool("nft");
    let cp = Cp::new(use_nats);
    let [u, c, r, x] = ["u", "c", "r", "x"].map(|s| format!("{p}{s}"));
    let nodes: Vec<TestNode> = [&u, &c, &r, &x].iter().map(|n| TestNode::new(n)).collect();
    let mut agents = Vec::new();
    for node in &nodes {
        join_ok(node, &cp);
        agents.push(start_agent(node));
        cp.publish(node.name(), &doc(node.name(), 1));
    }
    for node in &nodes {
        wait_accepted(node, 1);
        poll(Duration::from_secs(20), "connected", || {
            (status(node)["control"]["connected"] == true).then_some(())
        });
    }
    let mut stopped = agents.pop().expect("x's agent");
    let _ = stopped.kill();
    let _ = stopped.wait();
    let cand = cp.root.join(format!("candidates-{p}"));
    fs::create_dir_all(&cand).expect("candidates dir");
    let write = |n: &str, d: &Value| {
        fs::write(cand.join(format!("{n}.json")), d.to_string()).expect("candidate")
    };
    write(&u, &doc(&u, 2));
    let mut changed = doc(&c, 2);
    changed["firewall"] = json!({"publishedPorts": [
        {"protocol": "tcp", "hostPort": 8080, "target": {"address": "10.251.9.2", "port": 80}},
        {"protocol": "udp", "hostPort": 5353, "target": {"address": "10.251.9.3", "port": 53}}]});
    write(&c, &changed);
    let mut refused = doc(&r, 2);
    refused["node"]["mode"] = json!("proxy");
    write(&r, &refused);
    write(&x, &doc(&x, 2));
    let tables_before = nodes[1].run_ok("nft", ["list", "tables"]);

    let t0 = Instant::now();
    let out = cp.cli(&[
        "control-plane",
        "plan",
        cand.to_str().expect("path"),
        "--data",
        &cp.data(),
        "--nodes",
        &format!("{p}*"),
        "--timeout",
        "10s",
        "-o",
        "json",
    ]);
    eprintln!(
        "plan over {} answered in {:?}",
        if use_nats { "nats" } else { "https" },
        t0.elapsed()
    );
    assert_eq!(out.status.code(), Some(1), "plan: {}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("plan json");
    let s = &report["summary"];
    assert_eq!(
        (
            &s["nodes"],
            &s["unchanged"],
            &s["changes"],
            &s["refused"],
            &s["noAnswer"],
            &s["error"]
        ),
        (
            &json!(4),
            &json!(1),
            &json!(1),
            &json!(1),
            &json!(1),
            &json!(0)
        ),
        "{report:#}"
    );
    let node = |id: &str| {
        report["nodes"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["nodeId"] == id).cloned())
            .unwrap_or(Value::Null)
    };
    assert_eq!(node(&u)["verdict"], "unchanged", "{report:#}");
    assert_eq!(node(&x)["verdict"], "noAnswer", "{report:#}");
    assert_eq!(node(&r)["verdict"], "refused", "{report:#}");
    assert_eq!(node(&r)["refusedBy"], "node");
    assert_eq!(node(&r)["problems"][0]["path"], "$.node.mode", "{report:#}");
    // The counts are what `converge diff` of the same candidate says on that node.
    let file = nodes[1].data_dir().join("candidate.json");
    fs::write(&file, changed.to_string()).expect("write");
    let diff = converge(
        &nodes[1],
        &["diff", file.to_str().expect("path"), "--output", "json"],
    );
    assert_eq!(diff.status.code(), Some(2), "diff: {}", stderr(&diff));
    let diff: Value = serde_json::from_slice(&diff.stdout).expect("diff json");
    let mut want = serde_json::Map::new();
    for (name, v) in diff.as_object().expect("diff object") {
        let Some(changes) = v["changes"].as_array().filter(|c| !c.is_empty()) else {
            continue;
        };
        let count = |op: &str| changes.iter().filter(|c| c["op"] == op).count();
        want.insert(
            name.clone(),
            json!({"add": count("create"), "change": count("update"), "remove": count("delete")}),
        );
    }
    assert!(
        !want.is_empty(),
        "the candidate changes something: {diff:#}"
    );
    assert_eq!(node(&c)["verdict"], "changes", "{report:#}");
    assert_eq!(
        node(&c)["counts"],
        Value::Object(want.clone()),
        "{report:#}"
    );
    assert_eq!(s["counts"], Value::Object(want), "{report:#}");
    assert!(node(&c)["plan"]
        .as_str()
        .unwrap_or_default()
        .contains("firewall"));
    // Text output: the aggregate and the refusal's path.
    let text = cp.cli(&[
        "control-plane",
        "plan",
        cand.to_str().expect("path"),
        "--data",
        &cp.data(),
        "--nodes",
        &format!("{u},{r}"),
        "--timeout",
        "10s",
    ]);
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains("2 node(s): 1 unchanged, 0 with changes, 1 would refuse"),
        "{text}"
    );
    assert!(text.contains("$.node.mode"), "{text}");
    // Nothing changed: hosts, stores, the plane's record.
    assert_eq!(nodes[1].run_ok("nft", ["list", "tables"]), tables_before);
    for node in &nodes[..3] {
        assert_eq!(status(node)["generation"], 1);
        assert_eq!(stored_generations(node), vec![1]);
    }
    if use_nats {
        // A signed dry-run request put where envelopes go never applies.
        let keys = converge::control::plane::keys(&cp.root.join("data")).expect("plane keys");
        let issued = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let req = converge::control::dryrun::DryRunRequest::sign(
            &keys.signing,
            &u,
            "0123abcd",
            &issued,
            doc(&u, 5).to_string().as_bytes(),
        )
        .expect("sign");
        cp.put(&u, &serde_json::to_string(&req).expect("json"));
        poll(
            Duration::from_secs(20),
            "the node reports the refusal",
            || cp.record(&u)["refused"].is_object().then_some(()),
        );
        assert_eq!(status(&nodes[0])["generation"], 1);
        assert_eq!(stored_generations(&nodes[0]), vec![1]);
    }
}

#[test]
fn nats_fleet_dry_run() {
    fleet_dry_run(true, "pn");
}

#[test]
fn https_fleet_dry_run() {
    fleet_dry_run(false, "ph");
}

/// `control-plane conformance` as `name`, which the plane has a document for (with one
/// sealed secret), with a token for `name` and the plane key from the join hint.
fn conformance_with_a_document(cp: &Cp, name: &str) -> Output {
    let mut d = doc(name, 1);
    d["secrets"] = json!({"api-key": "s3cret"});
    cp.publish(name, &d);
    let (token, fingerprint) = token_and_plane_key(cp, name);
    conformance(cp, &token, &fingerprint, name)
}

/// A one-time token for `name` and the plane's key fingerprint from the join hint.
fn token_and_plane_key(cp: &Cp, name: &str) -> (String, String) {
    let out = cp.cli(&[
        "control-plane",
        "token",
        "--data",
        &cp.data(),
        "--name",
        name,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let hint = String::from_utf8_lossy(&out.stderr).to_string();
    let fingerprint = hint
        .split_whitespace()
        .skip_while(|w| *w != "--plane-key")
        .nth(1)
        .expect("--plane-key in the join hint")
        .to_string();
    (token, fingerprint)
}

/// `control-plane conformance` from the plane's node, against its HTTPS URL.
fn conformance(cp: &Cp, token: &str, plane_key: &str, name: &str) -> Output {
    cp.cli(&[
        "control-plane",
        "conformance",
        &cp.http_url(),
        "--ca",
        &cp.ca(),
        "--token",
        token,
        "--plane-key",
        plane_key,
        "--name",
        name,
    ])
}

/// The run passed the enrollment checks and every check of the transport in `checks`,
/// opened the document's one sealed secret and skipped nothing.
fn assert_conformance(out: &Output, checks: &[&str]) {
    let text = stderr(out);
    assert!(out.status.success(), "{text}");
    let enrollment = [
        "unknown token refused",
        "enrollment",
        "plane key",
        "used token refused",
    ];
    for check in enrollment.iter().chain(checks) {
        assert!(
            text.contains(&format!("PASS  {check}: ")),
            "{check}: {text}"
        );
    }
    assert!(text.contains("1 sealed secret(s) opened"), "{text}");
    assert!(text.contains("0 failed, 0 skipped"), "{text}");
}

/// `control-plane conformance` against the reference plane: every check passes (the
/// document path included: the plane has a document, with a secret, for the throwaway
/// node), and a wrong `--plane-key` fails its check and the run.
#[test]
fn conformance_checks_pass_against_the_reference_plane() {
    let cp = Cp::new(false);
    let out = conformance_with_a_document(&cp, "conf-1");
    assert_conformance(
        &out,
        &[
            "signed hello",
            "document",
            "status accepted",
            "replayed request refused",
            "unsigned request refused",
            "forged request refused",
            "tampered body refused",
            "stale time refused",
            "other node's path refused",
        ],
    );
    assert!(cp.log().contains("a signed request was replayed"));
    // The throwaway node's status reached the plane.
    assert!(
        cp.record("conf-1")["lastSeen"].is_string(),
        "{:?}",
        cp.record("conf-1")
    );

    // A plane answering with another key than the one expected: that check fails.
    let out = conformance(&cp, &cp.token(600), "SHA256:bm90IHRoZSBrZXk", "conf-2");
    let text = stderr(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("FAIL  plane key: the plane signs with"),
        "{text}"
    );
    // Nothing for conf-2: the document check says so instead of failing.
    assert!(text.contains("SKIP  document: no document"), "{text}");
}

/// `control-plane conformance` against the reference plane handing out NATS (TLS,
/// nkeys): the document arrives on the throwaway node's delivery subject and verifies,
/// its status goes through, and the server refuses it another node's documents and
/// status subject and a write to the bucket.
#[test]
fn conformance_checks_pass_over_nats() {
    let cp = Cp::new(true);
    let out = conformance_with_a_document(&cp, "confn-1");
    assert_conformance(
        &out,
        &[
            "nats connection",
            "document",
            "status accepted",
            "other node's documents refused",
            "other node's status refused",
            "bucket write refused",
        ],
    );
    assert!(stderr(&out).contains("over TLS"), "{}", stderr(&out));
    // The throwaway node's status reached the plane over NATS.
    wait_until(
        Duration::from_secs(10),
        "confn-1's status at the plane",
        || cp.record("confn-1")["lastSeen"].is_string(),
    );
}

/// `control-plane rollout` over HTTPS with four nodes: waves in order, each gated on
/// its nodes converging; a refused canary halts the rollout and, with --revert, gets its
/// previous document back under a newer generation while the other nodes are never
/// touched; a rollout survives a kill -9 of the plane; an abort stops one.
#[test]
fn staged_rollout_waves_halt_revert_resume_and_abort() {
    require_tool("nft");
    let mut cp = Cp::new(false);
    let ids = ["ra", "rb", "rc", "rd"];
    let nodes: Vec<TestNode> = ids.iter().map(|n| TestNode::new(n)).collect();
    let with_ports = |id: &str, generation: u64, port: u16| {
        let mut d = doc(id, generation);
        d["firewall"] = json!({"publishedPorts": [
            {"protocol": "tcp", "hostPort": port, "target": {"address": "10.251.9.2", "port": 80}}]});
        d
    };
    let mut agents = Vec::new();
    for node in &nodes {
        join_ok(node, &cp);
        agents.push(start_agent(node));
        cp.publish(node.name(), &with_ports(node.name(), 1, 8001));
    }
    for node in &nodes {
        wait_accepted(node, 1);
    }
    let root = cp.root.clone();
    let candidates = |tag: &str, docs: &[Value]| {
        let dir = root.join(format!("rollout-{tag}"));
        fs::create_dir_all(&dir).expect("candidates dir");
        for d in docs {
            let id = d["node"]["id"].as_str().expect("id");
            fs::write(dir.join(format!("{id}.json")), d.to_string()).expect("candidate");
        }
        dir.display().to_string()
    };
    let rollout = |cp: &Cp, dir: &str, extra: &[&str]| {
        let data = cp.data();
        let mut args = vec!["control-plane", "rollout", dir, "--data", &data];
        args.extend_from_slice(extra);
        cp.cli(&args)
    };
    let rollouts = |cp: &Cp, id: &str| -> Value {
        let out = cp.cli(&[
            "control-plane",
            "rollouts",
            "--data",
            &cp.data(),
            "--id",
            id,
            "-o",
            "json",
        ]);
        assert!(out.status.success(), "rollouts: {}", stderr(&out));
        let list: Value = serde_json::from_slice(&out.stdout).expect("rollouts json");
        list[0].clone()
    };
    let accepted = |i: usize| status(&nodes[i])["generation"].as_u64();

    // 1. Canary, then 50% batches: three waves, each started after the one before passed.
    let gen2: Vec<Value> = ids.iter().map(|id| with_ports(id, 2, 8002)).collect();
    let out = rollout(
        &cp,
        &candidates("2", &gen2),
        &[
            "--canary", "1", "--batch", "50%", "--wait", "60s", "-o", "json",
        ],
    );
    assert!(out.status.success(), "rollout: {}", stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).expect("rollout json");
    assert_eq!(r["phase"], "succeeded", "{r:#}");
    let waves = r["waves"].as_array().expect("waves");
    let sizes: Vec<usize> = waves
        .iter()
        .map(|w| w["nodes"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(sizes, vec![1, 2, 1], "{r:#}");
    for pair in waves.windows(2) {
        assert!(
            pair[1]["startedMs"].as_i64() >= pair[0]["endedMs"].as_i64(),
            "a wave started before the one before passed: {r:#}"
        );
    }
    for i in 0..4 {
        assert_eq!(accepted(i), Some(2));
    }

    // 2. The canary refuses its document: halted at once, reverted, nobody else touched.
    let mut gen3: Vec<Value> = ids.iter().map(|id| with_ports(id, 3, 8003)).collect();
    gen3[0]["node"]["mode"] = json!("proxy");
    let t0 = Instant::now();
    let out = rollout(
        &cp,
        &candidates("3", &gen3),
        &[
            "--canary", "1", "--batch", "50%", "--wait", "60s", "--revert",
        ],
    );
    let halted_in = t0.elapsed();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("Reverted"), "{text}");
    assert!(text.contains("ra refused the document"), "{text}");
    eprintln!("a refused canary halted and reverted the rollout in {halted_in:?}");
    // The previous document, as generation 4 (above the refused 3).
    poll(
        Duration::from_secs(30),
        "ra takes the reverted document",
        || (accepted(0) == Some(4)).then_some(()),
    );
    let back: Value =
        serde_json::from_slice(&fs::read(cp.root.join("docs/ra.json")).expect("ra's document"))
            .expect("json");
    assert_eq!(back["generation"], 4);
    assert_eq!(back["firewall"], gen2[0]["firewall"]);
    for i in 1..4 {
        assert_eq!(accepted(i), Some(2), "{} was touched", ids[i]);
        assert_eq!(stored_generations(&nodes[i]), vec![1, 2]);
    }

    // 3. kill -9 of the plane mid-rollout: the restarted plane carries on.
    let gen5: Vec<Value> = ids.iter().map(|id| with_ports(id, 5, 8005)).collect();
    let out = rollout(
        &cp,
        &candidates("5", &gen5),
        &[
            "--canary", "1", "--batch", "1", "--wait", "60s", "--detach", "-o", "json",
        ],
    );
    assert!(out.status.success(), "rollout: {}", stderr(&out));
    let id = serde_json::from_slice::<Value>(&out.stdout).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    poll(Duration::from_secs(30), "the canary wave published", || {
        rollouts(&cp, &id)["waves"][0]["startedMs"]
            .is_i64()
            .then_some(())
    });
    cp.stop_server();
    cp.start_server();
    let busy = rollout(&cp, &candidates("2", &gen2), &[]);
    assert_refused(&busy, "still running");
    let r = poll(Duration::from_secs(60), "the rollout finished", || {
        let r = rollouts(&cp, &id);
        (r["phase"] != "running").then_some(r)
    });
    assert_eq!(r["phase"], "succeeded", "{r:#}");
    for i in 0..4 {
        assert_eq!(accepted(i), Some(5));
    }

    // 4. A node that never answers holds its wave; the operator aborts the rollout.
    let mut stopped = agents.pop().expect("rd's agent");
    let _ = stopped.kill();
    let _ = stopped.wait();
    let out = rollout(
        &cp,
        &candidates("6", &[with_ports("rd", 6, 8006)]),
        &["--wait", "10m", "--detach", "-o", "json"],
    );
    assert!(out.status.success(), "rollout: {}", stderr(&out));
    let id = serde_json::from_slice::<Value>(&out.stdout).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    // The fleet page, in headless Chromium, while the rollout holds its wave.
    let page = poll(
        Duration::from_secs(20),
        "the page shows the waiting wave",
        || {
            let dom = cp.fleet_page("rollout-running");
            dom.contains("canary 1/1 (rd): waiting").then_some(dom)
        },
    );
    assert!(page.contains(&id) && page.contains(">running<"), "{page}");
    for id in ids {
        assert!(page.contains(&format!("id=\"node-{id}\"")), "{id}: {page}");
    }
    assert!(page.contains("firewall=Converged"), "{page}");
    let out = cp.cli(&[
        "control-plane",
        "rollouts",
        "abort",
        &id,
        "--data",
        &cp.data(),
    ]);
    assert!(out.status.success(), "abort: {}", stderr(&out));
    assert_eq!(rollouts(&cp, &id)["phase"], "aborted");
    let out = cp.cli(&["control-plane", "rollouts", "--data", &cp.data()]);
    let text = stderr(&out);
    assert!(
        text.contains("Aborted") && text.contains("Succeeded"),
        "{text}"
    );
    let page = cp.fleet_page("rollout-aborted");
    assert!(
        page.contains(">aborted<") && page.contains("aborted by the operator"),
        "{page}"
    );
}

/// The plane and its nodes on a 3-server JetStream cluster (three namespaces, the
/// documents bucket R3, nodes given all three URLs): each server in turn is killed -9
/// while a new generation is published; every node converges to it, the plane records
/// every node's newest status, and a node enrolls while a server is down.
#[test]
fn nats_cluster_failover_keeps_nodes_converging_and_enrolling() {
    require_tool("curl");
    let mut cp = Cp::cluster(3);
    let ids = ["ka", "kb", "kc"];
    let mut nodes: Vec<TestNode> = ids[..2].iter().map(|n| TestNode::new(n)).collect();
    let mut agents = Vec::new();
    for node in &nodes {
        join_ok(node, &cp);
        assert_eq!(
            control_json(node)["transport"]["url"],
            cp.nats_url(),
            "the node is given every server"
        );
        agents.push(start_agent(node));
        cp.publish(node.name(), &doc(node.name(), 1));
    }
    for node in &nodes {
        wait_accepted(node, 1);
    }
    let mut generation = 1;
    let mut table = Vec::new();
    for victim in 0..3 {
        cp.stop_nats_server(victim);
        let t0 = Instant::now();
        generation += 1;
        for node in &nodes {
            cp.publish(node.name(), &doc(node.name(), generation));
        }
        for node in &nodes {
            wait_accepted(node, generation);
            table.push((victim, node.name().to_string(), t0.elapsed()));
        }
        if victim == 2 {
            // Enrollment with a server down: the others reload the users file.
            let node = TestNode::new(ids[2]);
            join_ok(&node, &cp);
            agents.push(start_agent(&node));
            cp.publish(node.name(), &doc(node.name(), generation));
            wait_accepted(&node, generation);
            nodes.push(node);
        }
        // No status lost: the plane has each node's newest.
        for node in &nodes {
            poll(
                Duration::from_secs(30),
                "the plane records the newest status",
                || (cp.record(node.name())["acceptedGeneration"] == generation).then_some(()),
            );
        }
        cp.start_nats_server(victim, true);
        for i in 0..3 {
            cp.wait_nats_healthy(i);
        }
    }
    eprintln!("server killed | node | kill to new generation accepted");
    for (victim, node, took) in &table {
        eprintln!("n{victim} | {node} | {took:?}");
    }
    // The clients' own failover (disconnected to connected to another server), from
    // their logs, apart from the stream's leader election that a publish waits for.
    let mut logs = vec![("plane".to_string(), cp.log())];
    for node in &nodes {
        logs.push((
            node.name().to_string(),
            fs::read_to_string(agent_log(node)).unwrap_or_default(),
        ));
    }
    for (who, log) in logs {
        eprintln!("{who}: reconnected after {:?}", reconnects(&log));
    }
}

/// Two plane instances sharing their state on a 3-server cluster (`--state nats`, the
/// documents bucket over 4 streams):
/// nodes enroll through either with a token made on either (each token spent once); a
/// rollout is started; then the instance driving it and the NATS server a node is
/// attached to are killed -9. The other instance finishes the rollout, publishes a new
/// generation, enrolls a new node; every node converges to the newest generation, and
/// both instances' stores (the one restarted too) hold each node's newest status.
#[test]
fn two_plane_instances_survive_a_server_and_an_instance_dying() {
    require_tool("curl");
    let mut cp = Cp::two_instances();
    let mut nodes: Vec<TestNode> = ["sa", "sb"].iter().map(|n| TestNode::new(n)).collect();
    // sa through instance 0 with a token made on 1, sb the other way round.
    for (i, node) in nodes.iter().enumerate() {
        let out = join_through(node, &cp, i, &cp.token_on(1 - i, 600));
        assert!(
            out.status.success(),
            "join {}: {}",
            node.name(),
            stderr(&out)
        );
    }
    // A token spent through one instance is spent for the other.
    let token = cp.token_on(0, 600);
    let out = join_through(&TestNode::new("sx"), &cp, 1, &token);
    assert!(out.status.success(), "join sx: {}", stderr(&out));
    assert_refused(
        &join_through(&TestNode::new("sy"), &cp, 0, &token),
        "already used",
    );
    let mut agents: Vec<_> = nodes.iter().map(start_agent).collect();
    for node in &nodes {
        cp.publish(node.name(), &doc(node.name(), 1));
    }
    let newest_everywhere = |cp: &Cp, nodes: &[TestNode], generation: u64| {
        for i in 0..2 {
            for node in nodes {
                poll(
                    Duration::from_secs(30),
                    &format!("instance {i} has {}'s newest status", node.name()),
                    || {
                        let r = cp.record_on(i, node.name());
                        (r["acceptedGeneration"] == generation
                            && r["convergedGeneration"] == generation)
                            .then_some(())
                    },
                );
            }
        }
    };
    newest_everywhere(&cp, &nodes, 1);

    // A rollout of generation 2, started on instance 0.
    let dir = cp.root.join("rollout-2");
    fs::create_dir_all(&dir).expect("candidates dir");
    for node in &nodes {
        let d = doc(node.name(), 2);
        fs::write(dir.join(format!("{}.json", node.name())), d.to_string()).expect("candidate");
    }
    let data0 = cp.data();
    let out = cp.cli(&[
        "control-plane",
        "rollout",
        dir.to_str().expect("path"),
        "--data",
        &data0,
        "--canary",
        "1",
        "--wait",
        "60s",
        "--detach",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "rollout: {}", stderr(&out));
    let id = serde_json::from_slice::<Value>(&out.stdout).expect("rollout json")["id"]
        .as_str()
        .expect("rollout id")
        .to_string();
    let driver = (0..2)
        .find(|i| cp.log_of(*i).contains("this instance drives rollouts"))
        .expect("an instance holds the rollout lease");
    let survivor = 1 - driver;
    let nkey = cp.record_on(survivor, "sa")["natsKey"]
        .as_str()
        .expect("sa's nkey")
        .to_string();
    let server = cp.server_of(&nkey).expect("the server sa is attached to");
    let t0 = Instant::now();
    let killed_ms = chrono::Utc::now().timestamp_millis();
    cp.stop_instance(driver);
    cp.stop_nats_server(server);
    let rollout_of = |cp: &Cp, i: usize| -> Value {
        let out = cp.cli(&[
            "control-plane",
            "rollouts",
            "--data",
            &cp.data_dir(i).display().to_string(),
            "--id",
            &id,
            "-o",
            "json",
        ]);
        assert!(out.status.success(), "rollouts: {}", stderr(&out));
        serde_json::from_slice::<Value>(&out.stdout).expect("rollouts json")[0].clone()
    };
    let r = poll(
        Duration::from_secs(90),
        "the surviving instance finishes the rollout",
        || {
            let r = rollout_of(&cp, survivor);
            (r["phase"] != "running").then_some(r)
        },
    );
    let rollout_done = t0.elapsed();
    assert_eq!(r["phase"], "succeeded", "{r:#}");
    for node in &nodes {
        wait_accepted(node, 2);
    }
    // A plain publish of generation 3, and a node enrolled through the survivor.
    let t1 = Instant::now();
    for node in &nodes {
        cp.publish(node.name(), &doc(node.name(), 3));
    }
    let mut took = Vec::new();
    for node in &nodes {
        wait_accepted(node, 3);
        took.push((node.name().to_string(), t1.elapsed()));
    }
    let late = TestNode::new("sc");
    let out = join_through(&late, &cp, survivor, &cp.token_on(survivor, 600));
    assert!(out.status.success(), "join sc: {}", stderr(&out));
    agents.push(start_agent(&late));
    cp.publish(late.name(), &doc(late.name(), 3));
    wait_accepted(&late, 3);
    nodes.push(late);
    // The dead come back: the restarted instance's store catches up from the buckets.
    cp.start_nats_server(server, true);
    // Routes up again (a dry run is plain NATS, now or never: a request published before
    // the restarted server has its routes would reach no one).
    for i in 0..3 {
        cp.wait_nats_routes(i);
    }
    cp.start_instance(driver);
    newest_everywhere(&cp, &nodes, 3);
    // A dry run asked through either instance gets every node's answer, though the
    // queue group hands about half of them to the other instance, which forwards them.
    let cand = cp.root.join("plan-4");
    fs::create_dir_all(&cand).expect("candidates dir");
    for node in &nodes {
        let d = doc(node.name(), 4);
        fs::write(cand.join(format!("{}.json", node.name())), d.to_string()).expect("candidate");
    }
    for i in 0..2 {
        let out = cp.cli(&[
            "control-plane",
            "plan",
            cand.to_str().expect("path"),
            "--data",
            &cp.data_dir(i).display().to_string(),
            "--timeout",
            "20s",
            "-o",
            "json",
        ]);
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("plan on instance {i}: {e}: {}", stderr(&out)));
        let s = &report["summary"];
        let dry_run_lines = |log: String| {
            log.lines()
                .filter(|l| {
                    ["dry run", "forward", "WARN", "connected to"]
                        .iter()
                        .any(|w| l.contains(w))
                })
                .map(str::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            (&s["nodes"], &s["noAnswer"], &s["refused"], &s["error"]),
            (&json!(3), &json!(0), &json!(0), &json!(0)),
            "instance {i}: {report:#}\ninstance 0:\n{}\ninstance 1:\n{}\nsc's interest:\n{}\nagents:\n{}",
            dry_run_lines(cp.log_of(0)),
            dry_run_lines(cp.log_of(1)),
            cp.interest("_INBOX_sc.plan"),
            nodes
                .iter()
                .map(|n| format!(
                    "{}: {}",
                    n.name(),
                    dry_run_lines(fs::read_to_string(agent_log(n)).unwrap_or_default())
                ))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // Each node's acks name its shard's stream: none refused (nor anything else).
    assert_eq!(cp.nats_violations(), Vec::<String>::new());
    poll(
        Duration::from_secs(30),
        "the restarted instance has the rollout as finished",
        || (rollout_of(&cp, driver)["phase"] == "succeeded").then_some(()),
    );
    eprintln!("killed instance {driver} (driving the rollout) and NATS server n{server} (sa's)");
    eprintln!("kill to rollout succeeded on instance {survivor}: {rollout_done:?}");
    for (i, w) in r["waves"].as_array().expect("waves").iter().enumerate() {
        let since = |k: &str| w[k].as_i64().map(|t| t - killed_ms);
        eprintln!(
            "wave {i}: started {:?} ms, passed {:?} ms after the kill",
            since("startedMs"),
            since("endedMs")
        );
    }
    for (node, t) in &took {
        eprintln!("generation 3 published to {node} accepted after {t:?}");
    }
    eprintln!(
        "sa reconnected after {:?}",
        reconnects(&fs::read_to_string(agent_log(&nodes[0])).unwrap_or_default())
    );
}

/// Each disconnected-to-connected interval of an async-nats client, from its log.
fn reconnects(log: &str) -> Vec<Duration> {
    let time = |l: &str| {
        l.split_whitespace()
            .next()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    let mut down = None;
    let mut out = Vec::new();
    for l in log.lines() {
        if l.contains("event: disconnected") {
            down = down.or(time(l));
        } else if l.contains("event: connected") {
            if let (Some(a), Some(b)) = (down.take(), time(l)) {
                out.push((b - a).to_std().unwrap_or_default());
            }
        }
    }
    out
}
