//! The metadata reconciler and read API through the real agent in a sandbox node: the
//! authorization and hardening matrix, a blocking watch woken by an update, a reader
//! hammering the API during 1,000 document updates (no error, never two generations
//! mixed), an agent restart that serves the stored data at once, drift in the database
//! repaired, and a Podman container on a converge network reading its metadata as
//! `metadata.internal:8500` through the DNS reconciler; the Authorization and proxy-header
//! rules; one project flooding the API (2,000 connections and watches from one source)
//! while another project is served.

mod common;

use common::agent::{converge, data, reconciler, start_agent, status};
use common::netstat::{tcp_sockets, tcp_sockets_here, TcpSocket};
use common::podman::{podman, start_podman, TEST_IMAGE};
use common::sandbox::{converge_bin, require_tool, wait_until, Spawned, TestNode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const API: &str = "127.0.0.1:8500";
const API_PORT: u16 = 8500;

fn sha(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn envelope(node: &TestNode, generation: u64) -> Value {
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": node.name(), "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-12-01T10:00:00Z",
    })
}

/// Pushes over the agent socket directly (no process per push: 1,000 of them).
fn push_fast(node: &TestNode, doc: &Value) {
    let mut s = std::os::unix::net::UnixStream::connect(data(node).join("converge.sock"))
        .expect("agent socket");
    s.write_all(b"{\"op\":\"push\",\"yaml\":false}\n")
        .expect("header");
    s.write_all(&serde_json::to_vec(doc).expect("json"))
        .expect("body");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("response");
    let v: Value = serde_json::from_str(&resp).expect("response json");
    assert_eq!(v["ok"], true, "push refused: {resp}");
}

fn wait_converged(node: &TestNode, generation: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = reconciler(&status(node), "metadata");
        if r["state"] == "Converged" && r["observedGeneration"] == generation {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "metadata not converged at {generation}: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP response: status, headers (lower-case names), body.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Resp {
    fn index(&self) -> u64 {
        self.headers
            .get("x-converge-index")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// A minimal HTTP/1.1 client on a keep-alive connection (requests are hand-made so
/// that malformed ones can be sent too).
struct Client(BufReader<TcpStream>);

impl Client {
    /// Connects from inside the node's network namespace.
    fn connect(node: &TestNode, addr: &str) -> std::io::Result<Client> {
        let addr = addr.to_string();
        node.in_netns(move || TcpStream::connect(addr))
            .map(|s| Client(BufReader::new(s)))
    }

    fn raw(&mut self, request: &str) -> std::io::Result<Resp> {
        self.send(request)?;
        self.response()
    }

    fn send(&mut self, request: &str) -> std::io::Result<()> {
        self.0.get_mut().write_all(request.as_bytes())
    }

    /// Reads the next response on the connection.
    fn response(&mut self) -> std::io::Result<Resp> {
        let mut line = String::new();
        self.0.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            self.0.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        self.0.read_exact(&mut body)?;
        Ok(Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// A GET with the required header and `token` (if any) plus `extra` header lines.
    fn get(&mut self, path: &str, token: Option<&str>, extra: &str) -> std::io::Result<Resp> {
        self.raw(&get_request(path, token, extra))
    }

    /// The port of this end of the connection.
    fn local_port(&self) -> u16 {
        self.0.get_ref().local_addr().expect("local address").port()
    }
}

/// The text of a GET with the required header and `token` (if any) plus `extra` header
/// lines.
fn get_request(path: &str, token: Option<&str>, extra: &str) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: metadata.internal\r\nConverge-Metadata: true\r\n{auth}{extra}\r\n"
    )
}

/// Whether the API has read all that the client on local port `client_port` sent it:
/// every byte acknowledged, none left unread on the agent's end. The handler gets a
/// request as soon as it is read, and a watch parks before the handler first waits.
fn request_read(sockets: &[TcpSocket], client_port: u16) -> bool {
    let end = |local: u16, remote: u16| {
        sockets
            .iter()
            .find(|s| s.local.port() == local && s.remote.port() == remote)
    };
    match (end(client_port, API_PORT), end(API_PORT, client_port)) {
        (Some(client), Some(agent)) => client.tx_queue == 0 && agent.rx_queue == 0,
        _ => false,
    }
}

/// A fresh connection per request (a refused request may close the connection).
fn get(node: &TestNode, path: &str, token: Option<&str>, extra: &str) -> Resp {
    Client::connect(node, API)
        .and_then(|mut c| c.get(path, token, extra))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Starts the agent with debug logs into a file (to check what never appears in them).
fn start_logged_agent(node: &TestNode) -> (Spawned, std::path::PathBuf) {
    let log = node.data_dir().join("agent.log");
    let sock = data(node).join("converge.sock");
    let mut cmd = node.command(converge_bin());
    cmd.arg("--data-dir")
        .arg(data(node))
        .args(["agent", "--node-id", node.name()])
        .env("CONVERGE_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    let child = node.spawn(&mut cmd);
    wait_until(Duration::from_secs(10), "agent socket", || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    (child, log)
}

fn matrix_doc(node: &TestNode, generation: u64) -> Value {
    let mut d = envelope(node, generation);
    d["metadata"] = json!({"projects": [
        {"id": "alpha", "tokenSha256": sha("token-alpha"), "rateLimit": 1000,
         "entries": {"name": "alpha", "db/host": "10.0.0.1", "db/port": 5432, "flags": {"x": true}}},
        {"id": "beta", "tokenSha256": sha("token-beta"), "rateLimit": 1000,
         "entries": {"name": "beta", "only-beta": [1, 2]}},
        {"id": "slow", "tokenSha256": sha("token-slow"), "rateLimit": 2, "entries": {"k": 1}}
    ]});
    d
}

#[test]
fn authorization_matrix_and_hardening() {
    let node = TestNode::new("mdauth");
    let (_agent, log) = start_logged_agent(&node);
    push_fast(&node, &matrix_doc(&node, 1));
    wait_converged(&node, 1);

    // Each token reads its own project only; the path space is the project's.
    let a = get(&node, "/v1/metadata/name", Some("token-alpha"), "");
    assert_eq!((a.status, a.body.as_str()), (200, "\"alpha\""), "{a:?}");
    assert!(a.index() > 0);
    assert_eq!(a.headers["content-type"], "application/json");
    let b = get(&node, "/v1/metadata/name", Some("token-beta"), "");
    assert_eq!((b.status, b.body.as_str()), (200, "\"beta\""));
    let cross = get(&node, "/v1/metadata/only-beta", Some("token-alpha"), "");
    assert_eq!(
        cross.status, 404,
        "token A must not see project B: {cross:?}"
    );
    let list = get(&node, "/v1/metadata/?prefix=db/", Some("token-alpha"), "");
    assert_eq!(list.status, 200);
    let listed: Value = serde_json::from_str(&list.body).expect("listing json");
    assert_eq!(listed, json!({"db/host": "10.0.0.1", "db/port": 5432}));
    let all: Value =
        serde_json::from_str(&get(&node, "/v1/metadata/", Some("token-beta"), "").body).unwrap();
    assert_eq!(all, json!({"name": "beta", "only-beta": [1, 2]}));

    // 401: who is asking is unknown.
    for (token_header, why) in [
        ("", "missing token"),
        (
            "Authorization: Basic dXNlcjpwYXNz\r\n",
            "not a bearer token",
        ),
        ("Authorization: Bearer \r\n", "empty token"),
        ("Authorization: Bearer token-gamma\r\n", "wrong token"),
        ("Authorization: Bearer token-alpha-\r\n", "near miss"),
    ] {
        let r = get(&node, "/v1/metadata/name", None, token_header);
        assert_eq!(r.status, 401, "{why}: {r:?}");
        assert_eq!(
            r.headers.get("www-authenticate").map(String::as_str),
            Some("Bearer")
        );
        assert!(!r.body.contains("alpha"), "{why}: {r:?}");
    }
    // 403: refused whatever the token (SSRF through a proxy or redirect).
    let mut c = Client::connect(&node, API).unwrap();
    let no_header = c
        .raw("GET /v1/metadata/name HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer token-alpha\r\n\r\n")
        .unwrap();
    assert_eq!(no_header.status, 403, "{no_header:?}");
    let forwarded = get(
        &node,
        "/v1/metadata/name",
        Some("token-alpha"),
        "X-Forwarded-For: 10.0.0.9\r\n",
    );
    assert_eq!(forwarded.status, 403, "{forwarded:?}");
    // 404 for unknown entries and endpoints; 400 for a bad path or query.
    assert_eq!(
        get(&node, "/v1/metadata/nope", Some("token-alpha"), "").status,
        404
    );
    assert_eq!(get(&node, "/v2/other", Some("token-alpha"), "").status, 404);
    assert_eq!(
        get(&node, "/v1/metadata/a//b", Some("token-alpha"), "").status,
        400
    );
    assert_eq!(
        get(&node, "/v1/metadata/name?index=x", Some("token-alpha"), "").status,
        400
    );
    // Size limits: a body, an oversized head.
    let body = get(
        &node,
        "/v1/metadata/name",
        Some("token-alpha"),
        "Content-Length: 5\r\n\r\nhello",
    );
    assert_eq!(body.status, 413, "{body:?}");
    let big = Client::connect(&node, API).and_then(|mut c| {
        c.get(
            "/v1/metadata/name",
            Some("token-alpha"),
            &format!("X-Pad: {}\r\n", "p".repeat(16 * 1024)),
        )
    });
    assert!(
        big.as_ref().map(|r| r.status == 431).unwrap_or(true),
        "oversized head: {big:?}"
    );
    // 429 past the project's rate (2/s here), others unaffected.
    let codes: Vec<u16> = (0..4)
        .map(|_| get(&node, "/v1/metadata/k", Some("token-slow"), "").status)
        .collect();
    assert!(codes.contains(&429), "{codes:?}");
    assert_eq!(
        get(&node, "/v1/metadata/name", Some("token-alpha"), "").status,
        200
    );

    // Admin: any project, only through the agent socket.
    let out = converge(&node, &["metadata", "inspect", "beta"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspected: Value = serde_json::from_slice(&out.stdout).expect("inspect json");
    assert_eq!(
        inspected["entries"],
        json!({"name": "beta", "only-beta": [1, 2]})
    );
    assert!(
        !inspected.to_string().contains(&sha("token-beta")),
        "full hash shown"
    );
    assert!(!converge(&node, &["metadata", "inspect", "nope"])
        .status
        .success());

    // Debug logs name projects, never a token, a full token hash or a value.
    let logged = std::fs::read_to_string(&log).expect("agent log");
    assert!(logged.contains("project written"), "{logged}");
    for secret in [
        "token-alpha".to_string(),
        "token-beta".to_string(),
        sha("token-alpha"),
        sha("token-beta"),
        "10.0.0.1".to_string(),
        "only-beta\":".to_string(),
    ] {
        assert!(!logged.contains(&secret), "{secret} in the agent's log");
    }
}

/// Generation `g`: project `hammer` with 20 entries all carrying `g`, so a reader can
/// tell two generations apart inside one response.
fn hammer_doc(node: &TestNode, g: u64) -> Value {
    let entries: serde_json::Map<String, Value> = (0..20)
        .map(|i| (format!("gen/k{i:02}"), json!(g)))
        .collect();
    let mut d = envelope(node, g);
    d["metadata"] = json!({"projects": [
        {"id": "hammer", "tokenSha256": sha("token-hammer"), "rateLimit": 1_000_000, "entries": entries},
        {"id": "quiet", "tokenSha256": sha("token-quiet"), "entries": {"fixed": "same"}}
    ]});
    d
}

#[test]
fn watch_hammer_restart_and_drift() {
    let node = TestNode::new("mdwatch");
    let mut agent = start_agent(&node, &["--resync-secs", "2"]);
    push_fast(&node, &hammer_doc(&node, 1));
    wait_converged(&node, 1);

    // A blocking watch wakes on the update with the new index.
    let first = get(&node, "/v1/metadata/gen/k00", Some("token-hammer"), "");
    let quiet_index = get(&node, "/v1/metadata/fixed", Some("token-quiet"), "").index();
    let n = first.index();
    let mut watcher = Client::connect(&node, API).unwrap();
    let watcher_port = watcher.local_port();
    watcher
        .send(&get_request(
            &format!("/v1/metadata/gen/k00?index={n}&wait=30s"),
            Some("token-hammer"),
            "",
        ))
        .expect("watch");
    let handle = std::thread::spawn(move || (watcher.response().expect("watch"), Instant::now()));
    // The push must find the watch in flight (parked), not yet to be read.
    wait_until(
        Duration::from_secs(10),
        "the watch read by the agent",
        || request_read(&tcp_sockets(&node), watcher_port),
    );
    let pushed = Instant::now();
    push_fast(&node, &hammer_doc(&node, 2));
    let (woke, at) = handle.join().expect("watch thread");
    assert_eq!((woke.status, woke.body.as_str()), (200, "2"), "{woke:?}");
    assert!(woke.index() > n, "new index: {woke:?}");
    let latency = at.saturating_duration_since(pushed);
    println!("watch woke {latency:?} after the push was accepted");
    assert!(
        latency < Duration::from_secs(20),
        "woken by the update, not the wait"
    );
    // An unchanged project is not rewritten: its index stays.
    wait_converged(&node, 2);
    assert_eq!(
        get(&node, "/v1/metadata/fixed", Some("token-quiet"), "").index(),
        quiet_index
    );

    // A reader hammering the API during 1,000 document updates.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let latest = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, reads, latest) = (stop.clone(), reads.clone(), latest.clone());
        let mut c = Client::connect(&node, API).unwrap();
        std::thread::spawn(move || {
            let (mut errors, mut mixed, mut last) = (Vec::new(), 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match c.get("/v1/metadata/?prefix=gen/", Some("token-hammer"), "") {
                    Ok(r) if r.status == 200 => {
                        let v: BTreeMap<String, u64> =
                            serde_json::from_str(&r.body).unwrap_or_default();
                        let gens: std::collections::BTreeSet<u64> = v.values().copied().collect();
                        if v.len() != 20 || gens.len() != 1 {
                            mixed += 1;
                        } else if let Some(g) = gens.first() {
                            if *g < last {
                                errors.push(format!("went back from {last} to {g}"));
                            }
                            last = *g;
                            latest.store(last, Ordering::Relaxed);
                        }
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => errors.push(format!("{} {}", r.status, r.body)),
                    Err(e) => {
                        errors.push(e.to_string());
                        break;
                    }
                }
            }
            (errors, mixed, last)
        })
    };
    let started = Instant::now();
    for g in 3..=1002 {
        push_fast(&node, &hammer_doc(&node, g));
    }
    wait_converged(&node, 1002);
    let took = started.elapsed();
    wait_until(
        Duration::from_secs(5),
        "reader saw the last generation",
        || get(&node, "/v1/metadata/gen/k19", Some("token-hammer"), "").body == "1002",
    );
    // ... the hammering reader too (unless it stopped on an error), before it stops.
    let deadline = Instant::now() + Duration::from_secs(5);
    while latest.load(Ordering::Relaxed) != 1002
        && !reader.is_finished()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let (errors, mixed, last) = reader.join().expect("reader");
    println!(
        "1,000 updates in {took:?}; {} reads, {} errors, {mixed} mixed, last generation seen {last}",
        reads.load(Ordering::Relaxed),
        errors.len()
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(mixed, 0, "a response mixed two generations");
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!(last, 1002);

    // Drift: a value edited by hand and then the whole database deleted; the API keeps
    // serving the last good data meanwhile, the next passes repair the file.
    let db = data(&node).join("metadata.db");
    {
        let conn = rusqlite::Connection::open(&db).expect("open db");
        conn.execute(
            "UPDATE entries SET value = '\"tampered\"' WHERE project = 'hammer' AND path = 'gen/k00'",
            [],
        )
        .expect("edit");
    }
    let inspect = |node: &TestNode| -> Value {
        let out = converge(node, &["metadata", "inspect", "hammer"]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    wait_until(Duration::from_secs(10), "edited value repaired", || {
        inspect(&node)["entries"]["gen/k00"] == 1002
    });
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    assert_eq!(
        get(&node, "/v1/metadata/gen/k00", Some("token-hammer"), "").body,
        "1002"
    );
    wait_until(
        Duration::from_secs(10),
        "deleted database rewritten",
        || inspect(&node)["entries"]["gen/k05"] == 1002,
    );

    // Restart: killed hard, the new agent serves the stored data at once.
    let before = get(&node, "/v1/metadata/gen/k00", Some("token-hammer"), "");
    agent.kill().expect("kill agent");
    let _ = agent.wait();
    let restarted = Instant::now();
    let _agent = start_agent(&node, &["--resync-secs", "2"]);
    let mut served = None;
    wait_until(Duration::from_secs(10), "API back after restart", || {
        served = Client::connect(&node, API)
            .and_then(|mut c| c.get("/v1/metadata/gen/k00", Some("token-hammer"), ""))
            .ok();
        served.is_some()
    });
    let served = served.expect("served");
    println!(
        "served again {:?} after the restart began",
        restarted.elapsed()
    );
    assert_eq!((served.status, served.body.as_str()), (200, "1002"));
    assert_eq!(served.index(), before.index(), "same data, not rewritten");
}

#[test]
fn a_container_reads_its_metadata_by_name() {
    require_tool("podman");
    require_tool("dnsmasq");
    let node = TestNode::new("mdpod");
    let svc = start_podman(&node);
    let _agent = start_agent(
        &node,
        &[
            "--runtime",
            "podman",
            "--podman-socket",
            svc.socket.to_str().expect("utf-8 socket path"),
        ],
    );
    let gateway = "10.231.5.1";
    let mut d = envelope(&node, 1);
    d["networks"] = json!([{"name": "apps", "subnets": [{"subnet": "10.231.5.0/24"}]}]);
    // No resolv.conf of its own: on a network of the `networks` section the container's
    // resolver is the node's dnsmasq on the gateway, which serves the name.
    let script = "while true; do \
           wget -q -O - --header 'Converge-Metadata: true' --header 'Authorization: Bearer token-app' \
             http://metadata.internal:8500/v1/metadata/greeting && echo; \
           sleep 0.5; \
         done";
    d["containers"] = json!([{
        "name": "reader",
        "image": TEST_IMAGE,
        "command": ["sh", "-c", script],
        "network": "apps",
        "stopGracePeriod": "1s",
    }]);
    d["dns"] = json!({
        "zone": "internal", "listen": [node.address().to_string()], "port": 53, "ttl": 5,
        "records": [{"name": "metadata.internal", "type": "A", "values": [gateway]}]
    });
    d["metadata"] = json!({"projects": [
        {"id": "app", "tokenSha256": sha("token-app"), "entries": {"greeting": "hello from converge"}}
    ]});
    push_fast(&node, &d);
    let mut logs = String::new();
    wait_until(
        Duration::from_secs(60),
        "the container read its metadata",
        || {
            let out = podman(&node, &svc, &["logs", "reader"]);
            logs = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            logs.contains("\"hello from converge\"")
        },
    );
    let st = status(&node);
    assert_eq!(reconciler(&st, "metadata")["state"], "Converged", "{st}");
}

/// Two projects, both with room in their rate limits, for the header and flood tests.
fn two_projects_doc(node: &TestNode, generation: u64) -> Value {
    let mut d = envelope(node, generation);
    d["metadata"] = json!({"projects": [
        {"id": "flood", "tokenSha256": sha("token-flood"), "rateLimit": 10_000,
         "entries": {"k": generation}},
        {"id": "quiet", "tokenSha256": sha("token-quiet"), "rateLimit": 10_000,
         "entries": {"k": generation}}
    ]});
    d
}

#[test]
fn metadata_authorization_header_rules() {
    let node = TestNode::new("mdhdr");
    let _agent = start_agent(&node, &[]);
    push_fast(&node, &two_projects_doc(&node, 1));
    wait_converged(&node, 1);

    // The scheme is case-insensitive (RFC 7235), with one or more spaces after it.
    for auth in [
        "Bearer token-quiet",
        "bearer token-quiet",
        "BEARER token-quiet",
        "bEaReR  token-quiet",
    ] {
        let r = get(
            &node,
            "/v1/metadata/k",
            None,
            &format!("Authorization: {auth}\r\n"),
        );
        assert_eq!((r.status, r.body.as_str()), (200, "1"), "{auth}: {r:?}");
    }
    // Two Authorization headers: 400, whether they agree or not.
    for (first, second) in [
        ("token-quiet", "token-quiet"),
        ("token-quiet", "token-flood"),
        ("token-nope", "token-quiet"),
    ] {
        let r = get(
            &node,
            "/v1/metadata/k",
            None,
            &format!("Authorization: Bearer {first}\r\nAuthorization: Bearer {second}\r\n"),
        );
        assert_eq!(r.status, 400, "{first} + {second}: {r:?}");
        assert!(!r.body.contains('1'), "{r:?}");
    }
    // Every header a proxy adds is refused like X-Forwarded-For, whatever the token.
    for h in [
        "X-Forwarded-For: 10.0.0.9",
        "Forwarded: for=10.0.0.9",
        "X-Real-IP: 10.0.0.9",
        "x-real-ip: 10.0.0.9",
        "Via: 1.1 proxy.internal",
    ] {
        let r = get(
            &node,
            "/v1/metadata/k",
            Some("token-quiet"),
            &format!("{h}\r\n"),
        );
        assert_eq!(r.status, 403, "{h}: {r:?}");
    }
    // Still 401 for what is no bearer token at all.
    for auth in ["Bearertoken-quiet", "Bearer", "Basic dG9rZW4tcXVpZXQ="] {
        let r = get(
            &node,
            "/v1/metadata/k",
            None,
            &format!("Authorization: {auth}\r\n"),
        );
        assert_eq!(r.status, 401, "{auth}: {r:?}");
    }
}

/// A TCP connection from `source` (an address of the node's loopback, so that two
/// clients count as two sources).
fn connect_from(
    source: std::net::Ipv4Addr,
    to: std::net::SocketAddrV4,
) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let sockaddr = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a new descriptor, which the TcpStream then owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let from = sockaddr(std::net::SocketAddrV4::new(source, 0));
        if libc::bind(fd, (&from as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let dest = sockaddr(to);
        if libc::connect(fd, (&dest as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// How a flooding connection was answered.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Nothing within the read timeout: a parked watch, or an idle connection kept.
    Open,
    Status(u16),
    /// Closed without an answer (reset, or end of stream).
    Closed,
    ConnectFailed,
}

/// How the connection was answered, for a connection whose answer is due already.
fn outcome(stream: &mut TcpStream) -> Outcome {
    outcome_within(stream, Duration::from_millis(20))
}

/// How the connection was answered, waiting at most `wait` for an answer.
fn outcome_within(stream: &mut TcpStream, wait: Duration) -> Outcome {
    let _ = stream.set_read_timeout(Some(wait));
    let mut buf = [0u8; 512];
    match stream.read(&mut buf) {
        Ok(0) => Outcome::Closed,
        Ok(n) => String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .map_or(Outcome::Closed, Outcome::Status),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Outcome::Open
        }
        Err(_) => Outcome::Closed,
    }
}

/// What the flood test saw inside the node.
struct Flood {
    watches: BTreeMap<Outcome, usize>,
    idle: BTreeMap<Outcome, usize>,
    parked_streams: Vec<TcpStream>,
    others_open: Vec<TcpStream>,
    quiet_watches: Vec<TcpStream>,
    latencies: Vec<Duration>,
    quiet_failures: Vec<String>,
    parked_quiet: usize,
    flooder_again: Outcome,
}

/// Whether the API has dealt with every connection to it: none is waiting to be accepted,
/// every request sent has been read (and acknowledged).
fn flood_settled(sockets: &[TcpSocket]) -> bool {
    sockets.iter().all(|s| {
        if s.local.port() == API_PORT {
            // The agent's end; for the listener, the connections not yet accepted.
            s.rx_queue == 0
        } else if s.remote.port() == API_PORT {
            // A client's end.
            s.tx_queue == 0
        } else {
            true
        }
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

#[test]
fn metadata_one_project_cannot_starve_another() {
    use converge_metadata::api::{MAX_CONNECTIONS_PER_SOURCE, MAX_WATCHES_PER_PROJECT};
    use std::net::{Ipv4Addr, SocketAddrV4};
    const WATCHES: usize = 1_500;
    const IDLE: usize = 500;
    const QUIET_REQUESTS: usize = 1_000;
    let node = TestNode::new("mdflood");
    let _agent = start_agent(&node, &[]);
    push_fast(&node, &two_projects_doc(&node, 1));
    wait_converged(&node, 1);
    let api = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8500);
    let (flooder, other) = (Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2));
    let index = get(&node, "/v1/metadata/k", Some("token-flood"), "").index();
    let quiet_index = get(&node, "/v1/metadata/k", Some("token-quiet"), "").index();
    let request = |token: &str, query: &str| {
        format!(
            "GET /v1/metadata/k{query} HTTP/1.1\r\nHost: metadata.internal\r\nConverge-Metadata: true\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
    };

    let report = node.in_netns(|| {
        // The flood: 1,500 watches, then 500 connections that send nothing, all from
        // one source and one project.
        let watch = request("token-flood", &format!("?index={index}&wait=120s"));
        let mut flood: Vec<Result<TcpStream, std::io::Error>> = Vec::new();
        for i in 0..WATCHES + IDLE {
            let s = connect_from(flooder, api).and_then(|mut s| {
                if i < WATCHES {
                    s.write_all(watch.as_bytes())?;
                }
                Ok(s)
            });
            flood.push(s);
        }
        // Every immediate answer (429, 503) has arrived once the agent has accepted every
        // connection and read every request: it answers a request as it reads it, and
        // writes a refusal before reading what the refused connection sent.
        wait_until(
            Duration::from_secs(60),
            "every flooding connection accepted and its request read",
            || flood_settled(&tcp_sockets_here()),
        );
        let mut watches = BTreeMap::<Outcome, usize>::new();
        let mut idle = BTreeMap::<Outcome, usize>::new();
        // Parked watches first (in order), then every other connection still open (429
        // answers on kept-alive connections, idle ones): all held, so the source keeps
        // its share in use while the other project is measured.
        let mut parked_streams = Vec::new();
        let mut others_open = Vec::new();
        for (i, s) in flood.into_iter().enumerate() {
            let o = match s {
                Ok(mut s) => {
                    let o = outcome(&mut s);
                    match o {
                        Outcome::Open if i < WATCHES => parked_streams.push(s),
                        Outcome::Open | Outcome::Status(429) => others_open.push(s),
                        _ => {}
                    }
                    o
                }
                Err(_) => Outcome::ConnectFailed,
            };
            *if i < WATCHES { &mut watches } else { &mut idle }
                .entry(o)
                .or_default() += 1;
        }
        // A new connection of the flooding source is refused while its share is in use.
        let flooder_again = connect_from(flooder, api)
            .map(|mut s| {
                let _ = s.write_all(request("token-flood", "").as_bytes());
                // Refused at once; still open after this long, it was not refused.
                outcome_within(&mut s, Duration::from_secs(5))
            })
            .unwrap_or(Outcome::ConnectFailed);
        // Meanwhile the other project, from its own source: watches park, and every
        // request on a new connection is answered.
        let mut quiet_watches = Vec::new();
        for _ in 0..5 {
            let mut s = connect_from(other, api).expect("quiet watch connects");
            s.write_all(
                request("token-quiet", &format!("?index={quiet_index}&wait=120s")).as_bytes(),
            )
            .expect("quiet watch sent");
            quiet_watches.push(s);
        }
        let mut latencies = Vec::with_capacity(QUIET_REQUESTS);
        let mut quiet_failures = Vec::new();
        let plain = request("token-quiet", "");
        for _ in 0..QUIET_REQUESTS {
            let start = Instant::now();
            let r = connect_from(other, api).and_then(|s| {
                let mut c = Client(BufReader::new(s));
                c.raw(&plain)
            });
            latencies.push(start.elapsed());
            match r {
                Ok(r) if r.status == 200 && r.body == "1" => {}
                Ok(r) => quiet_failures.push(format!("{} {}", r.status, r.body)),
                Err(e) => quiet_failures.push(e.to_string()),
            }
        }
        let parked_quiet = quiet_watches
            .iter_mut()
            .map(outcome)
            .filter(|o| *o == Outcome::Open)
            .count();
        Flood {
            watches,
            idle,
            parked_streams,
            others_open,
            quiet_watches,
            latencies,
            quiet_failures,
            parked_quiet,
            flooder_again,
        }
    });
    let Flood {
        watches,
        idle,
        parked_streams,
        others_open,
        quiet_watches,
        mut latencies,
        quiet_failures,
        parked_quiet,
        flooder_again,
    } = report;
    latencies.sort();
    let parked = watches.get(&Outcome::Open).copied().unwrap_or(0);
    let too_many = watches.get(&Outcome::Status(429)).copied().unwrap_or(0);
    let refused = |m: &BTreeMap<Outcome, usize>| {
        m.iter()
            .filter(|(o, _)| {
                matches!(
                    o,
                    Outcome::Status(503) | Outcome::Closed | Outcome::ConnectFailed
                )
            })
            .map(|(_, n)| n)
            .sum::<usize>()
    };
    println!(
        "flood from one source, one project: {WATCHES} watches -> {parked} parked, {too_many} got 429, {} refused (503/closed) {watches:?}; {IDLE} idle connections -> {idle:?}",
        refused(&watches)
    );
    println!(
        "other project meanwhile: {QUIET_REQUESTS} requests on new connections, {} failed, p50 {:?}, p99 {:?}, max {:?}; {parked_quiet}/5 of its watches parked; a new flooding connection: {flooder_again:?}",
        quiet_failures.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
    );

    // The other project is served in full.
    assert!(quiet_failures.is_empty(), "{quiet_failures:?}");
    assert_eq!(parked_quiet, 5, "the other project's watches park");
    // The flooding project gets its share and no more: its watches park up to the cap,
    // its other requests get 429, connections over its source's share are refused.
    assert!(
        parked > 0 && parked <= MAX_WATCHES_PER_PROJECT as usize,
        "{watches:?}"
    );
    assert!(too_many > 0, "watches over the cap get 429: {watches:?}");
    let accepted = parked + too_many + idle.get(&Outcome::Open).copied().unwrap_or(0);
    assert!(
        accepted <= MAX_CONNECTIONS_PER_SOURCE,
        "{watches:?} {idle:?}"
    );
    assert_eq!(
        accepted + refused(&watches) + refused(&idle),
        WATCHES + IDLE,
        "every flooding connection parked, got 429, or was refused: {watches:?} {idle:?}"
    );
    assert!(
        watches.get(&Outcome::Status(503)).copied().unwrap_or(0) > 0,
        "refused connections are told so (503): {watches:?}"
    );
    assert!(
        matches!(flooder_again, Outcome::Status(503) | Outcome::Closed),
        "{flooder_again:?}"
    );

    // An update wakes every parked watch, of both projects.
    push_fast(&node, &two_projects_doc(&node, 2));
    wait_converged(&node, 2);
    drop(others_open);
    let mut woken = 0;
    for s in parked_streams.into_iter().chain(quiet_watches) {
        let mut c = Client(BufReader::new(s));
        let _ =
            c.0.get_mut()
                .set_read_timeout(Some(Duration::from_secs(10)));
        if let Ok(r) = c.raw("") {
            if r.status == 200 && r.body == "2" {
                woken += 1;
            }
        }
    }
    assert_eq!(
        woken,
        parked + 5,
        "every parked watch answered with the update"
    );
    // Its connections closed, the flooding project is served again.
    wait_until(
        Duration::from_secs(15),
        "flooding source's share back",
        || get(&node, "/v1/metadata/k", Some("token-flood"), "").status == 200,
    );
}
