//! The routes reconciler against a real Caddy (the one `install/deps.sh` installs, or
//! `CONVERGE_TEST_CADDY`), through real agents:
//! - `drift_refusal_and_one_change_per_pass`: one proxy node. Routes served with
//!   `tls internal` by Caddy running unprivileged (uid checked in /proc, the old
//!   instance still seeing converge's root-owned drain marker); 30 routes changed in
//!   one document are one configuration load of each of converge's two Caddy
//!   instances, an unchanged document none; a foreign server edited concurrently is
//!   kept; the serving Caddy killed, its apps wiped, its whole configuration wiped:
//!   routes back; a route Caddy refuses (bad certificate) is reported while the others
//!   apply.
//! - `flushed_ruleset_repaired_at_once_and_a_burst_never_degraded`: a proxy with no
//!   reload interval (`--caddy-min-reload-ms 0`) given a burst of documents, each
//!   applied and verified while the next arrives, never reports Degraded; then `nft
//!   flush ruleset` (as `systemctl restart nftables` does) is seen through nf_tables
//!   notifications and the redirect to the serving Caddy put back without a reload:
//!   the time until port 443 answers again and the connections refused meanwhile are
//!   printed, and a kept-alive connection idle across the flush lives on.
//! - `proxy_routes_over_the_mesh_to_containers_on_two_workers`: a proxy and two
//!   workers joined by the WireGuard reconciler; busybox httpd containers on the
//!   workers published by their firewall reconciler; route A balances over both, route
//!   B holds an upgraded stream to a worker. While clients send requests to A back to
//!   back (a new connection each, HTTP/1.1 keep-alive with and without retries, HTTP/2)
//!   and hold the stream on B open: a burst of documents (one every 50 ms)
//!   changing other routes and A's upstream set, which the agent coalesces into at
//!   most one change per `--caddy-min-reload-ms`. Failed requests and broken streams
//!   are counted and printed (per Caddy version and client): no failure for clients on
//!   new connections, retrying keep-alive or HTTP/2; no broken stream on 2.7+.
//!   Then 20 replacements of A's container: 0 failures.

mod common;

use common::agent::{push_ok, reconciler, start_agent, status};
use common::mesh::{
    active_dir, caddy_admin, caddy_bin, caddy_dir, caddy_pid, caddy_version, https_get,
    instance_dirs, key, mesh_addr, peer, proxy_doc, start_proxy_agent, wait_routes,
    worker_agent_args, worker_doc, WG_PORT,
};
use common::podman::start_podman;
use common::sandbox::{require_tool, wait_until, TestNode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn caddy_config(node: &TestNode) -> Value {
    let (code, body) = caddy_admin(node, "GET", "/config/", None);
    assert_eq!(code, 200, "GET /config/: {body}");
    serde_json::from_str(&body).expect("config json")
}

/// Configuration loads the two Caddy instances received together (`POST /config/` in
/// their logs): one converge change is one load of each.
fn loads(node: &TestNode) -> usize {
    instance_dirs(node)
        .iter()
        .map(|d| {
            std::fs::read_to_string(d.join("caddy.log"))
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    l.contains("\"received request\"")
                        && l.contains("\"method\":\"POST\"")
                        && l.contains("\"uri\":\"/config/\"")
                })
                .count()
        })
        .sum()
}

/// Waits until the last change's old instance has been reloaded after its drain (in
/// the background, after the change is reported converged): every change is then one
/// load of each instance, so the loads add up to an even number.
fn wait_settled(node: &TestNode) {
    wait_until(
        Duration::from_secs(10),
        "old caddy instance reloaded",
        || loads(node) % 2 == 0,
    );
}

/// Caddy runs as an unprivileged user (not uid 0) and owns only its instance
/// directories and certificate storage; what converge writes stays root's and private.
fn assert_caddy_unprivileged(node: &TestNode) {
    use std::os::unix::fs::MetadataExt;
    let meta = |p: &Path| std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    for d in instance_dirs(node) {
        let pid = caddy_pid(&d).expect("caddy pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let uids: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .expect("Uid line")
            .split_whitespace()
            .filter_map(|u| u.parse().ok())
            .collect();
        println!("caddy {} (pid {pid}) runs as uid {uids:?}", d.display());
        assert!(
            uids.len() == 4 && uids.iter().all(|u| *u != 0),
            "caddy pid {pid} runs as root: {uids:?}"
        );
        let m = meta(&d);
        assert_eq!(
            (m.uid(), m.mode() & 0o777),
            (uids[0], 0o700),
            "{}",
            d.display()
        );
        let log = meta(&d.join("caddy.log"));
        assert_eq!((log.uid(), log.mode() & 0o777), (0, 0o600), "caddy.log");
        if let Ok(marker) = std::fs::metadata(d.join("draining")) {
            assert_eq!(
                (
                    marker.uid(),
                    marker.gid(),
                    marker.mode() & 0o777,
                    marker.len()
                ),
                (0, m.gid(), 0o640, 0),
                "drain marker: root's, readable by Caddy's group only"
            );
        }
        let data = meta(&caddy_dir(node).join("data"));
        assert_eq!(
            (data.uid(), data.mode() & 0o777),
            (uids[0], 0o700),
            "certificate storage"
        );
    }
    let shared = meta(&caddy_dir(node));
    assert_eq!(
        (shared.uid(), shared.mode() & 0o777),
        (0, 0o711),
        "<data-dir>/caddy"
    );
}

/// The `Connection` header an instance's own HTTPS port answers `r0.test` with (HTTP/1.1,
/// where the drain route's `Connection: close` shows); `Err` when curl fails.
fn connection_header(node: &TestNode, port: u16) -> Result<Option<String>, String> {
    let ca = caddy_dir(node).join("data/caddy/pki/authorities/local/root.crt");
    let out = node.run(
        "curl",
        [
            "-sS".to_string(),
            "--http1.1".into(),
            "-m".into(),
            "3".into(),
            "-D".into(),
            "-".into(),
            "-o".into(),
            "/dev/null".into(),
            "--cacert".into(),
            ca.to_string_lossy().into_owned(),
            "--resolve".into(),
            format!("r0.test:{port}:127.0.0.1"),
            format!("https://r0.test:{port}/"),
        ],
    );
    if !out.status.success() {
        return Err(format!(
            "curl port {port}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("connection")
            .then(|| v.trim().to_ascii_lowercase())
    }))
}

/// A local upstream on 127.0.0.1:8080 that answers `w-local`, and the node's secrets
/// directory.
fn local_upstream(p: &TestNode) -> PathBuf {
    let www = p.data_dir().join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("index.html"), "w-local\n").expect("index");
    p.spawn(
        p.command("busybox")
            .args(["httpd", "-f", "-p", "127.0.0.1:8080", "-h"])
            .arg(&www),
    );
    let secrets = p.data_dir().join("secrets");
    std::fs::create_dir_all(&secrets).expect("secrets");
    secrets
}

fn local_routes(n: usize, tag: &str) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"name": format!("r{i}"), "hosts": [format!("r{i}.test")], "tls": "internal",
                   "upstreams": [{"address": "127.0.0.1:8080"}],
                   "responseHeaders": {"set": {"X-Tag": tag}}})
        })
        .collect()
}

#[test]
fn drift_refusal_and_one_change_per_pass() {
    for tool in ["curl", "busybox"] {
        require_tool(tool);
    }
    let bin = caddy_bin();
    let version = caddy_version(&bin);
    let p = TestNode::new("rtd");
    let secrets = local_upstream(&p);
    let _agent = start_proxy_agent(&p, &bin, &secrets, "2", &[]);

    push_ok(&p, &proxy_doc(&p, 1, json!(local_routes(30, "1"))));
    wait_routes(&p, 1);
    wait_until(Duration::from_secs(20), "r0 served over https", || {
        https_get(&p, "r0.test", "127.0.0.1").as_deref() == Some("w-local\n")
    });

    // 30 routes changed in one document: one load; an unchanged document: none.
    wait_settled(&p);
    // Unprivileged Caddy still sees the drain marker converge (root) keeps on the old
    // instance: that one answers `Connection: close`, the serving one keeps connections.
    assert_caddy_unprivileged(&p);
    let active = active_dir(&p);
    let (serving, old) = if active.ends_with("a") {
        (14443, 24443)
    } else {
        (24443, 14443)
    };
    assert!(
        active.join("draining").metadata().is_err(),
        "serving instance not draining"
    );
    // Retried: the old instance may still be in its post-drain reload.
    let mut seen = Err(String::new());
    wait_until(
        Duration::from_secs(10),
        "old instance answers Connection: close",
        || {
            seen = connection_header(&p, old);
            seen.as_ref().is_ok_and(|h| h.as_deref() == Some("close"))
        },
    );
    assert_eq!(
        connection_header(&p, serving),
        Ok(None),
        "serving: {seen:?}"
    );
    let before = loads(&p);
    push_ok(&p, &proxy_doc(&p, 2, json!(local_routes(30, "2"))));
    wait_routes(&p, 2);
    // The old instance is reloaded after the drain, in the background.
    wait_until(
        Duration::from_secs(10),
        "30 changed routes, one configuration load of each instance",
        || loads(&p) >= before + 2,
    );
    assert_eq!(loads(&p), before + 2, "one load of each instance");
    push_ok(&p, &proxy_doc(&p, 3, json!(local_routes(30, "2"))));
    wait_routes(&p, 3);
    // A resync pass too (every 2 s here): a later pass than the one that applied 3.
    let applied = reconciler(&status(&p), "routes")["lastPass"].clone();
    wait_until(Duration::from_secs(10), "a resync pass", || {
        reconciler(&status(&p), "routes")["lastPass"] != applied
    });
    assert_eq!(loads(&p), before + 2, "nothing changed, no load");

    // A foreign server, edited continuously while converge changes its routes: an edit
    // racing converge's change is seen (ETag) and planned again, and the foreign object
    // survives.
    let (code, body) = caddy_admin(
        &p,
        "POST",
        "/config/apps/http/servers/foreign",
        Some(
            r#"{"listen":["127.0.0.1:9999"],"routes":[{"handle":[{"handler":"static_response","body":"foreign-0"}]}]}"#,
        ),
    );
    assert_eq!(code, 200, "{body}");
    let stop = Arc::new(AtomicBool::new(false));
    let edits = Arc::new(AtomicUsize::new(0));
    let editor = {
        let (stop, edits) = (stop.clone(), edits.clone());
        let sock_node_dir = caddy_dir(&p);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = edits.fetch_add(1, Ordering::Relaxed) + 1;
                let _ = Command::new("curl")
                    .args(["-s", "-m", "10", "--unix-socket"])
                    .arg(sock_node_dir.join("admin.sock"))
                    .args([
                        "-H",
                        "Host;",
                        "-H",
                        "Content-Type: application/json",
                        "-X",
                        "PATCH",
                    ])
                    .args(["-d", &format!("\"foreign-{n}\"")])
                    .arg("http://caddy/config/apps/http/servers/foreign/routes/0/handle/0/body")
                    .output();
                // Pacing: an edit every few milliseconds, not a wait for anything.
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    for g in 4..=13u64 {
        push_ok(
            &p,
            &proxy_doc(&p, g, json!(local_routes(30, &g.to_string()))),
        );
        wait_routes(&p, g);
    }
    stop.store(true, Ordering::Relaxed);
    editor.join().expect("editor thread");
    let cfg = caddy_config(&p);
    let body = cfg
        .pointer("/apps/http/servers/foreign/routes/0/handle/0/body")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    assert!(body.starts_with("foreign-"), "foreign server kept: {cfg}");
    // Served by both instances (the standby holds the edit converge last copied).
    let served = p.run("curl", ["-s", "-m", "3", "http://127.0.0.1:9999/"]);
    assert!(
        String::from_utf8_lossy(&served.stdout).starts_with("foreign-"),
        "foreign server served"
    );
    eprintln!(
        "caddy {version}: {} foreign edits during 10 documents",
        edits.load(Ordering::Relaxed)
    );

    // The serving Caddy killed: restarted at once (process watch), routes back.
    let killed = active_dir(&p);
    let pid = caddy_pid(&killed).expect("caddy pid");
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    wait_until(
        Duration::from_secs(30),
        "caddy restarted, r0 served",
        || {
            caddy_pid(&killed).is_some_and(|n| n != pid)
                && https_get(&p, "r0.test", "127.0.0.1").as_deref() == Some("w-local\n")
        },
    );

    // Its apps wiped: restored (ETag/config comparison on the next pass).
    let (code, _) = caddy_admin(&p, "DELETE", "/config/apps", None);
    assert_eq!(code, 200);
    wait_until(
        Duration::from_secs(30),
        "routes restored after apps wipe",
        || https_get(&p, "r5.test", "127.0.0.1").as_deref() == Some("w-local\n"),
    );
    // The whole configuration wiped (admin endpoint included: Caddy 2.6 then listens
    // on localhost:2019 instead, and converge restarts it).
    let (code, _) = caddy_admin(&p, "DELETE", "/config/", None);
    assert_eq!(code, 200);
    wait_until(
        Duration::from_secs(30),
        "routes restored after full wipe",
        || https_get(&p, "r7.test", "127.0.0.1").as_deref() == Some("w-local\n"),
    );

    // A route Caddy refuses (its certificate secret is not PEM) is reported with
    // Caddy's error; the other changes of the same document apply.
    std::fs::write(secrets.join("bad.crt"), "not a certificate").expect("secret");
    std::fs::write(secrets.join("bad.key"), "not a key").expect("secret");
    let mut routes = local_routes(30, "14");
    routes.push(
        json!({"name": "bad", "hosts": ["bad.test"], "tls": "certificate",
                       "certificateSecret": "bad.crt", "keySecret": "bad.key",
                       "upstreams": [{"address": "127.0.0.1:8080"}]}),
    );
    routes.push(
        json!({"name": "fresh", "hosts": ["fresh.test"], "tls": "internal",
                       "upstreams": [{"address": "127.0.0.1:8080"}]}),
    );
    push_ok(&p, &proxy_doc(&p, 14, json!(routes)));
    let mut st = Value::Null;
    wait_until(Duration::from_secs(60), "route bad reported", || {
        st = reconciler(&status(&p), "routes");
        st["observedGeneration"] == 14
            && st["objectErrors"].as_array().is_some_and(|e| {
                e.iter().any(|e| {
                    e["object"] == "route bad"
                        && e["error"]
                            .as_str()
                            .is_some_and(|m| m.contains("caddy refused"))
                })
            })
    });
    let errors = st["objectErrors"].as_array().cloned().unwrap_or_default();
    assert_eq!(errors.len(), 1, "only the refused route fails: {st}");
    // The status says which route failed and how many serve.
    assert_eq!(
        st["message"], "route bad failed; 31 of 32 objects converged",
        "{st}"
    );
    let msg = errors[0]["error"].as_str().unwrap_or_default();
    assert!(msg.contains("caddy refused"), "{msg}");
    assert!(!msg.contains("not a key"), "no secret in status: {msg}");
    eprintln!("caddy {version}: refused route reported as: {msg}");
    wait_until(Duration::from_secs(20), "fresh served, bad not", || {
        https_get(&p, "fresh.test", "127.0.0.1").as_deref() == Some("w-local\n")
    });
    let cfg = caddy_config(&p);
    assert!(cfg.to_string().contains("converge-route-fresh"));
    assert!(!cfg.to_string().contains("converge-route-bad"));
    let r0 = cfg
        .pointer("/apps/http/servers/converge-https/routes")
        .and_then(Value::as_array)
        .and_then(|rs| rs.iter().find(|r| r["@id"] == "converge-route-r0"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        r0.pointer("/handle/0/response/set/X-Tag/0"),
        Some(&json!("14")),
        "the other routes' changes applied: {r0}"
    );
}

/// One HTTP/1.1 request on a kept-alive plain connection; the status line.
fn http1_on(conn: &mut std::net::TcpStream, host: &str) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    write!(conn, "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")?;
    let mut reader = BufReader::new(conn);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(status.trim_end().to_string())
}

#[test]
fn flushed_ruleset_repaired_at_once_and_a_burst_never_degraded() {
    for tool in ["curl", "busybox", "nft"] {
        require_tool(tool);
    }
    let bin = caddy_bin();
    let version = caddy_version(&bin);
    let p = TestNode::new("rtf");
    let secrets = local_upstream(&p);
    // A resync far away: a repair within seconds is the nf_tables watch's doing.
    let _agent = start_proxy_agent(&p, &bin, &secrets, "600", &["--caddy-min-reload-ms", "0"]);
    // Three TLS routes, and one on plain HTTP for a kept-alive connection (port 80's
    // redirects to HTTPS close the connection).
    let routes = |tag: &str| {
        let mut r = local_routes(3, tag);
        r.push(
            json!({"name": "plain", "hosts": ["plain.test"], "tls": "off",
                      "upstreams": [{"address": "127.0.0.1:8080"}]}),
        );
        json!(r)
    };
    push_ok(&p, &proxy_doc(&p, 1, routes("1")));
    wait_routes(&p, 1);
    wait_until(Duration::from_secs(20), "r0 served over https", || {
        https_get(&p, "r0.test", "127.0.0.1").as_deref() == Some("w-local\n")
    });

    // A burst: every document changes the routes, none waits for the one before.
    let last = 1 + env_count("CONVERGE_TEST_BURST", 40);
    let mut degraded = Vec::new();
    for g in 2..=last {
        push_ok(&p, &proxy_doc(&p, g, routes(&g.to_string())));
        let st = reconciler(&status(&p), "routes");
        if st["state"] == "Degraded" {
            degraded.push(st);
        }
    }
    wait_routes(&p, last);
    assert!(
        degraded.is_empty(),
        "Degraded during the burst: {degraded:?}"
    );
    let tag = caddy_config(&p).to_string();
    assert!(
        tag.contains(&format!("\"X-Tag\":[\"{last}\"]")),
        "newest applied"
    );

    for round in 1..=3 {
        let (refused, repaired, idle) = p.in_netns(|| {
            // A kept-alive connection, idle across the flush.
            let mut idle = std::net::TcpStream::connect("127.0.0.1:80").expect("connect :80");
            idle.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let before = http1_on(&mut idle, "plain.test").expect("first request");
            let flush = std::process::Command::new("nft")
                .args(["flush", "ruleset"])
                .status()
                .expect("nft");
            assert!(flush.success(), "nft flush ruleset");
            // Counted from the end of `nft flush ruleset`: the flush is committed then.
            let flushed = std::time::Instant::now();
            let mut refused = 0u32;
            while std::net::TcpStream::connect_timeout(
                &"127.0.0.1:443".parse().expect("addr"),
                Duration::from_secs(1),
            )
            .is_err()
            {
                refused += 1;
                assert!(
                    flushed.elapsed() < Duration::from_secs(30),
                    "the redirect was not repaired within 30 s"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            let repaired = flushed.elapsed();
            let after = http1_on(&mut idle, "plain.test");
            (refused, repaired, (before, after))
        });
        eprintln!(
            "caddy {version}: flush {round}: port 443 back {:.1} ms after `nft flush ruleset` returned, \
             {refused} connections refused meanwhile; idle kept-alive connection: {:?} then {:?}",
            repaired.as_secs_f64() * 1e3,
            idle.0,
            idle.1
        );
        // Correctness: back long before any resync, and a connection that sent
        // nothing while the redirect was gone lives on.
        assert!(repaired < Duration::from_secs(10), "{repaired:?}");
        assert!(
            idle.1.as_ref().is_ok_and(|s| s.starts_with("HTTP/1.1 200")),
            "the idle connection survived: {idle:?}"
        );
        assert_eq!(
            https_get(&p, "r0.test", "127.0.0.1").as_deref(),
            Some("w-local\n")
        );
    }
    let st = reconciler(&status(&p), "routes");
    assert_eq!(st["state"], "Converged", "{st}");
}

// ---- the mesh scenario ----

/// Route A over `a_peers`, route B (the stream) to worker 1's stream server, and
/// `others` routes that change.
fn mesh_routes(a_peers: &[&str], others: usize, tag: u64) -> Value {
    let mut routes = vec![
        json!({"name": "a", "hosts": ["a.test"], "tls": "internal",
               "upstreams": a_peers.iter().map(|p| json!({"peer": p, "port": 8080})).collect::<Vec<_>>()}),
        json!({"name": "b", "hosts": ["b.test"], "tls": "internal",
               "upstreams": [{"address": format!("{}:9000", mesh_addr(2))}]}),
    ];
    for i in 0..others {
        routes.push(
            json!({"name": format!("o{i}"), "hosts": [format!("o{i}.test")], "tls": "internal",
                           "upstreams": [{"address": format!("{}:8080", mesh_addr(3))}],
                           "responseHeaders": {"set": {"X-Gen": tag.to_string()}}}),
        );
    }
    json!(routes)
}

fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn proxy_routes_over_the_mesh_to_containers_on_two_workers() {
    for tool in ["wireguard-go", "wg", "curl", "podman", "python3"] {
        require_tool(tool);
    }
    let bin = caddy_bin();
    let version = caddy_version(&bin);
    let px = TestNode::new("rtp");
    let w1 = TestNode::new("rtw1");
    let w2 = TestNode::new("rtw2");
    let (if_p, key_p) = key(&px, "p");
    let (if_1, key_1) = key(&w1, "1");
    let (if_2, key_2) = key(&w2, "2");
    let svc1 = start_podman(&w1);
    let svc2 = start_podman(&w2);
    let a1 = worker_agent_args(&svc1);
    let a2 = worker_agent_args(&svc2);
    let _ag1 = start_agent(&w1, &a1.iter().map(String::as_str).collect::<Vec<_>>());
    let _ag2 = start_agent(&w2, &a2.iter().map(String::as_str).collect::<Vec<_>>());
    let secrets = px.data_dir().join("secrets");
    std::fs::create_dir_all(&secrets).expect("secrets");
    let _agp = start_proxy_agent(&px, &bin, &secrets, "2", &[]);

    push_ok(&w1, &worker_doc(&w1, &if_1, 2, peer(&px, &key_p, 1)));
    push_ok(&w2, &worker_doc(&w2, &if_2, 3, peer(&px, &key_p, 1)));
    let proxy_wg = json!({
        "interface": if_p,
        "listenPort": WG_PORT,
        "addresses": [format!("{}/24", mesh_addr(1))],
        "peers": [peer(&w1, &key_1, 2), peer(&w2, &key_2, 3)],
    });
    let doc = |g: u64, routes: Value| {
        let mut d = proxy_doc(&px, g, routes);
        d["wireguard"] = proxy_wg.clone();
        d
    };
    let both = [w1.name(), w2.name()];
    push_ok(&px, &doc(1, mesh_routes(&both, 3, 1)));
    for w in [&w1, &w2] {
        wait_until(Duration::from_secs(120), "worker converged", || {
            let st = status(w);
            ["containers", "wireguard", "firewall"].iter().all(|n| {
                let r = reconciler(&st, n);
                r["state"] == "Converged" && r["observedGeneration"] == 1
            })
        });
    }
    wait_routes(&px, 1);

    // The stream server on worker 1 (a process in its namespace, on its mesh address).
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/routes_traffic.py");
    w1.spawn(
        w1.command("python3")
            .arg(&script)
            .args(["stream-server", "9000"]),
    );

    // Each worker's container answers through the proxy, over the mesh.
    let mut seen = std::collections::BTreeSet::new();
    wait_until(
        Duration::from_secs(60),
        "a.test reaches both workers",
        || {
            if let Some(body) = https_get(&px, "a.test", "127.0.0.1") {
                seen.insert(body.trim().to_string());
            }
            seen.len() == 2
        },
    );
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), [w1.name(), w2.name()]);

    // Traffic: requests to A back to back, an upgraded stream held on B.
    let ca = caddy_dir(&px).join("data/caddy/pki/authorities/local/root.crt");
    let stopfile = px.data_dir().join("traffic.stop");
    let outfile = px.data_dir().join("traffic.json");
    let mut client = px.command("python3");
    client
        .arg(&script)
        .args(["client", "127.0.0.1", "443", "a.test", "b.test"])
        .arg(&ca)
        .arg(&stopfile)
        .arg(&outfile);
    let _client = px.spawn(&mut client);
    let ready = PathBuf::from(format!("{}.ready", outfile.display()));
    wait_until(Duration::from_secs(30), "stream on B up", || ready.exists());
    // Some traffic before any change, as a baseline.
    std::thread::sleep(Duration::from_secs(2));

    let other_changes = env_count("CONVERGE_TEST_ROUTE_CHANGES", 500);
    let a_changes = env_count("CONVERGE_TEST_UPSTREAM_CHANGES", 50);
    let sets: [&[&str]; 3] = [&both, &[w1.name()], &[w2.name()]];
    let (mut g, mut set, mut a_changed) = (1u64, 0usize, 0u64);
    let loads_before = loads(&px);
    // A burst: a document every PUSH_GAP, not waiting for each to apply (the agent
    // holds changes that come faster than its minimum reload interval and applies the
    // newest together). Each document changes the other routes; every tenth also
    // moves A to the next upstream set (both workers, worker 1 only, worker 2 only, ...).
    const PUSH_GAP: Duration = Duration::from_millis(50);
    for i in 0..other_changes {
        g += 1;
        if i % 10 == 9 && a_changed < a_changes {
            set = (set + 1) % 3;
            a_changed += 1;
        }
        push_ok(&px, &doc(g, mesh_routes(sets[set], 3, g)));
        std::thread::sleep(PUSH_GAP);
    }
    // The rest of A's upstream changes, one document each.
    let tag = g;
    while a_changed < a_changes {
        g += 1;
        set = (set + 1) % 3;
        a_changed += 1;
        push_ok(&px, &doc(g, mesh_routes(sets[set], 3, tag)));
        std::thread::sleep(PUSH_GAP);
    }
    wait_routes(&px, g);
    // The last document is what Caddy serves.
    let last = caddy_config(&px).to_string();
    assert!(
        last.contains(&format!("\"X-Gen\":[\"{tag}\"]")),
        "the newest document applied"
    );
    let loads_during = loads(&px) - loads_before;
    std::fs::write(&stopfile, "").expect("stop file");
    wait_until(Duration::from_secs(30), "client summary", || {
        outfile.exists()
    });
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(&outfile).expect("summary")).expect("json");
    eprintln!(
        "caddy {version}: {} documents ({} changed A's upstreams), {loads_during} caddy loads (both instances); \
         stream on B: {} lines, {} broken {}",
        g - 1,
        a_changes,
        summary["stream_lines"],
        summary["stream_broken"],
        summary["breaks"],
    );
    let changes = (loads_during / 2).max(1);
    print_clients(&version, &summary, changes);
    assert_clients(&summary);
    assert!(
        (loads_during as u64) < g - 1,
        "a burst of {} documents coalesced into fewer loads: {loads_during}",
        g - 1
    );
    let broken = summary["stream_broken"].as_u64().unwrap_or(u64::MAX);
    let minor = version
        .trim_start_matches('v')
        .split('.')
        .nth(1)
        .and_then(|m| m.parse::<u32>().ok())
        .unwrap_or(0);
    if minor >= 7 {
        // Streams of unchanged routes survive reloads (stream_close_delay).
        assert_eq!(
            broken, 0,
            "the stream on B survived every reload: {summary}"
        );
    }

    // Deploys behind route A: worker 1's container is replaced again and again (a new
    // generation each, no route change, so no Caddy load). Worker 1's firewall switches
    // its published port to each new instance before the old one stops (facts
    // `in_use`): no request fails.
    // Route A to worker 1 only, so every request meets the replacements.
    g += 1;
    push_ok(&px, &doc(g, mesh_routes(&[w1.name()], 3, tag)));
    wait_routes(&px, g);
    wait_settled(&px);
    let stop2 = px.data_dir().join("traffic2.stop");
    let out2 = px.data_dir().join("traffic2.json");
    let mut client2 = px.command("python3");
    client2
        .arg(&script)
        .args(["client", "127.0.0.1", "443", "a.test", "b.test"])
        .arg(&ca)
        .arg(&stop2)
        .arg(&out2);
    let _client2 = px.spawn(&mut client2);
    let ready2 = PathBuf::from(format!("{}.ready", out2.display()));
    wait_until(Duration::from_secs(30), "second client up", || {
        ready2.exists()
    });
    let replacements = env_count("CONVERGE_TEST_REPLACEMENTS", 20);
    let loads_before = loads(&px);
    for r in 0..replacements {
        let generation = 2 + r;
        let mut d = worker_doc(&w1, &if_1, 2, peer(&px, &key_p, 1));
        d["generation"] = json!(generation);
        d["containers"][0]["env"] = json!({"DEPLOY": generation.to_string()});
        push_ok(&w1, &d);
        wait_until(Duration::from_secs(60), "replacement done", || {
            let r = reconciler(&status(&w1), "containers");
            r["state"] == "Converged" && r["observedGeneration"] == generation
        });
    }
    std::fs::write(&stop2, "").expect("stop file");
    wait_until(Duration::from_secs(30), "client summary", || out2.exists());
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(&out2).expect("summary")).expect("json");
    eprintln!("caddy {version}: {replacements} replacements of worker 1's container");
    print_clients(&version, &summary, 0);
    assert_eq!(
        loads(&px),
        loads_before,
        "deploys behind a route load nothing"
    );
    assert_clients(&summary);
    assert_eq!(
        summary["ka_failed"].as_u64(),
        Some(0),
        "no kept-alive request failed during the replacements (no Caddy change): {summary}"
    );
}

/// The traffic client's figures, per kind of client (`changes`: Caddy changes meanwhile).
fn print_clients(version: &str, summary: &Value, changes: usize) {
    for (prefix, what) in [
        ("", "new connection per request"),
        ("ka_", "HTTP/1.1 keep-alive, never retries"),
        (
            "kr_",
            "HTTP/1.1 keep-alive, retries as RFC 9112 9.3.1 allows",
        ),
        ("h2_", "HTTP/2 (curl)"),
    ] {
        let sent = summary[format!("{prefix}requests")].as_u64().unwrap_or(0);
        let failed = summary[format!("{prefix}failed")].as_u64().unwrap_or(0);
        eprintln!(
            "caddy {version}: {what}: {sent} requests, {failed} failed ({:.2} per change) {}",
            failed as f64 / changes.max(1) as f64,
            summary[format!("{prefix}failures")]
        );
    }
    eprintln!(
        "caddy {version}: retried on a new connection: {}",
        summary["kr_retried"]
    );
}

/// Correctness, not a timing: every kind of client sent requests, and none failed for
/// clients that open a connection per request, that retry as HTTP/1.1 allows, or that
/// speak HTTP/2 (the old instance answers `Connection: close` / GOAWAY while it drains).
/// Keep-alive clients that never retry are measured, not asserted: HTTP/1.1 cannot
/// close an idle connection without a race.
fn assert_clients(summary: &Value) {
    for prefix in ["", "ka_", "kr_", "h2_"] {
        assert!(
            summary[format!("{prefix}requests")].as_u64().unwrap_or(0) > 0,
            "{prefix}requests: {summary}"
        );
    }
    for prefix in ["", "kr_", "h2_"] {
        assert_eq!(
            summary[format!("{prefix}failed")].as_u64(),
            Some(0),
            "no {prefix}request failed: {summary}"
        );
    }
}
