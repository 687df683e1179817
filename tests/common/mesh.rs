//! A proxy node and workers meshed over WireGuard (real wireguard-go), with the proxy's
//! Caddy routes to the workers' containers: the documents, the agents and the Caddy
//! helpers shared by `tests/routes.rs` and `tests/update_traffic.rs`.

use super::agent::{data, reconciler, start_agent_bin, status, wireguard_key};
use super::podman::{PodmanService, TEST_IMAGE};
use super::sandbox::{converge_bin, wait_until, Spawned, TestNode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The Caddy under test: `$CONVERGE_TEST_CADDY`, else the one `install/deps.sh`
/// installs, else `caddy` on PATH.
pub fn caddy_bin() -> String {
    if let Some(p) = std::env::var_os("CONVERGE_TEST_CADDY") {
        return p.to_string_lossy().into_owned();
    }
    let installed = "/opt/converge/caddy/bin/caddy";
    if Path::new(installed).exists() {
        installed.to_string()
    } else {
        "caddy".to_string()
    }
}

pub fn caddy_version(bin: &str) -> String {
    Command::new(bin)
        .arg("version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .to_string()
        })
        .unwrap_or_else(|_| "?".into())
}

pub fn caddy_dir(node: &TestNode) -> PathBuf {
    data(node).join("caddy")
}

/// `curl --resolve HOST:443:ADDR` with Caddy's local CA; the body on success.
pub fn https_get(node: &TestNode, host: &str, addr: &str) -> Option<String> {
    https_get_from(node, node, host, addr, &[]).map(|(_, body)| body)
}

/// `curl --resolve HOST:443:ADDR` run in `client` (another node: from outside the
/// proxy), trusting the local CA of the Caddy on `proxy`, with `extra` curl arguments;
/// the response headers and body on success.
pub fn https_get_from(
    client: &TestNode,
    proxy: &TestNode,
    host: &str,
    addr: &str,
    extra: &[&str],
) -> Option<(String, String)> {
    let ca = caddy_dir(proxy).join("data/caddy/pki/authorities/local/root.crt");
    let headers = client.data_dir().join(format!("curl-headers-{host}"));
    let mut args: Vec<String> = vec![
        "-s".into(),
        "-m".into(),
        "3".into(),
        "--fail".into(),
        "--cacert".into(),
        ca.to_string_lossy().into_owned(),
        "--resolve".into(),
        format!("{host}:443:{addr}"),
        "-D".into(),
        headers.to_string_lossy().into_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(format!("https://{host}/"));
    let out = client.run("curl", args);
    out.status.success().then(|| {
        (
            std::fs::read_to_string(&headers).unwrap_or_default(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    })
}

/// One admin API call over the unix socket (empty Host: see the driver).
pub fn caddy_admin(node: &TestNode, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let sock = caddy_dir(node).join("admin.sock");
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-m",
        "20",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "--unix-socket",
    ])
    .arg(&sock)
    .args(["-H", "Host;", "-X", method]);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    cmd.arg(format!("http://caddy{path}"));
    let out = cmd.output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The instance new connections go to: `<caddy>/admin.sock` links to its socket.
pub fn active_dir(node: &TestNode) -> PathBuf {
    let link = std::fs::read_link(caddy_dir(node).join("admin.sock")).expect("admin link");
    caddy_dir(node).join(link.parent().expect("instance dir"))
}

/// The pid in a Caddy instance directory's pid file.
pub fn caddy_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("caddy.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The directories of converge's two Caddy instances.
pub fn instance_dirs(node: &TestNode) -> [PathBuf; 2] {
    ["a", "b"].map(|i| caddy_dir(node).join(i))
}

pub fn proxy_doc(node: &TestNode, generation: u64, routes: Value) -> Value {
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": node.name(), "mode": "proxy"},
        "generation": generation,
        "issuedAt": "2026-12-01T10:00:00Z",
        "routes": {"routes": routes},
    })
}

pub fn wait_routes(node: &TestNode, generation: u64) -> Value {
    let mut last = Value::Null;
    wait_until(
        Duration::from_secs(90),
        &format!("routes converged at {generation}"),
        || {
            last = reconciler(&status(node), "routes");
            let done = last["state"] == "Converged" && last["observedGeneration"] == generation;
            if !done && std::env::var_os("CONVERGE_TEST_TRACE").is_some() {
                eprintln!("routes: {last}");
            }
            done
        },
    );
    last
}

/// The agent arguments of a proxy node: the Caddy `bin`, a resync every `resync_secs`
/// and the `extra` arguments.
pub fn proxy_agent_args(
    bin: &str,
    secrets: &Path,
    resync_secs: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--proxy",
        "--resync-secs",
        resync_secs,
        "--caddy",
        bin,
        "--secrets-dir",
        secrets.to_str().expect("utf-8"),
    ]
    .map(String::from)
    .into();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts the agent binary `agent_bin` as a proxy with `args` (from
/// [`proxy_agent_args`]); the Caddy pair it starts is killed with the node.
pub fn start_proxy_agent_bin(node: &TestNode, agent_bin: &Path, args: &[String]) -> Spawned {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = start_agent_bin(node, agent_bin, &args);
    for d in instance_dirs(node) {
        node.track_pidfile(d.join("caddy.pid"));
    }
    agent
}

/// Starts a proxy agent with the Caddy `bin`, a resync every `resync_secs` and the
/// `extra` arguments.
pub fn start_proxy_agent(
    node: &TestNode,
    bin: &str,
    secrets: &Path,
    resync_secs: &str,
    extra: &[&str],
) -> Spawned {
    let args = proxy_agent_args(bin, secrets, resync_secs, extra);
    start_proxy_agent_bin(node, &converge_bin(), &args)
}

/// The agent arguments of a worker whose containers run on the Podman service `svc`.
pub fn worker_agent_args(svc: &PodmanService) -> Vec<String> {
    vec![
        "--runtime".into(),
        "podman".into(),
        "--podman-socket".into(),
        svc.socket.to_string_lossy().into_owned(),
        "--resync-secs".into(),
        "5".into(),
    ]
}

pub const WG_PORT: u16 = 51820;

pub fn key(node: &TestNode, tag: &str) -> (String, String) {
    let iface = format!("wg-{}-{tag}", std::process::id() % 100_000);
    let public = wireguard_key(node, &iface);
    (iface, public)
}

pub fn mesh_addr(i: u8) -> String {
    format!("10.78.1.{i}")
}

pub fn peer(node: &TestNode, key: &str, i: u8) -> Value {
    json!({
        "name": node.name(),
        "publicKey": key,
        "endpoint": format!("{}:{WG_PORT}", node.address()),
        "allowedIps": [format!("{}/32", mesh_addr(i))],
    })
}

pub fn worker_doc(w: &TestNode, iface: &str, i: u8, proxy_peer: Value) -> Value {
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": w.name(), "mode": "worker"},
        "generation": 1,
        "issuedAt": "2026-12-01T10:00:00Z",
        "containers": [{
            "name": "web",
            "image": TEST_IMAGE,
            "command": ["sh", "-c", format!("mkdir -p /www && echo {} > /www/index.html && exec httpd -f -p 8080 -h /www", w.name())],
            "ports": [{"containerPort": 8080}],
            "stopGracePeriod": "1s",
        }],
        "wireguard": {
            "interface": iface,
            "listenPort": WG_PORT,
            "addresses": [format!("{}/24", mesh_addr(i))],
            "peers": [proxy_peer],
        },
        "firewall": {
            "publishedPorts": [{"protocol": "tcp", "hostPort": 8080, "target": {"container": "web", "port": 8080}}],
        },
    })
}
