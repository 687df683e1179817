//! Running the real `converge` binary inside a test node: one-shot commands and the agent.

use super::sandbox::{converge_bin, wait_until, Spawned, TestNode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

/// Runs `converge --data-dir <node data> ARGS` inside the node.
pub fn converge(node: &TestNode, args: &[&str]) -> Output {
    let mut cmd = node.command(converge_bin());
    cmd.arg("--data-dir").arg(data(node)).args(args);
    cmd.output()
        .unwrap_or_else(|e| panic!("run converge {args:?}: {e}"))
}

/// The node's converge data dir.
pub fn data(node: &TestNode) -> PathBuf {
    node.data_dir().join("converge")
}

/// Starts `converge agent` in the node and waits for its socket. dnsmasq instances it
/// starts are killed with the node.
pub fn start_agent(node: &TestNode, extra: &[&str]) -> Spawned {
    start_agent_bin(node, &converge_bin(), extra)
}

/// Like [`start_agent`], with another build of the agent (`bin`, e.g. an update).
pub fn start_agent_bin(node: &TestNode, bin: &Path, extra: &[&str]) -> Spawned {
    start_agent_with(node, bin, extra, |_| {})
}

/// Like [`start_agent_bin`], with `tweak` applied to the command last (an environment
/// variable, stderr to a log file).
pub fn start_agent_with(
    node: &TestNode,
    bin: &Path,
    extra: &[&str],
    tweak: impl FnOnce(&mut std::process::Command),
) -> Spawned {
    let sock = data(node).join("converge.sock");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = node.command(bin);
    cmd.arg("--data-dir")
        .arg(data(node))
        .args(["agent", "--node-id", node.name()])
        .args(extra)
        .stdout(Stdio::null());
    if std::env::var_os("CONVERGE_TEST_LOGS").is_none() {
        cmd.stderr(Stdio::null());
    }
    tweak(&mut cmd);
    let child = node.spawn(&mut cmd);
    node.track_pidfile(data(node).join("dns/dnsmasq.pid"));
    wait_until(Duration::from_secs(10), "agent socket", || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    child
}

/// Writes `doc` to a file in the node's data dir and pushes it; returns the output.
pub fn push(node: &TestNode, doc: &Value) -> Output {
    let path = node
        .data_dir()
        .join(format!("doc-{}.json", doc["generation"]));
    std::fs::write(&path, serde_json::to_vec(doc).expect("serialise")).expect("write doc");
    converge(node, &["push", path.to_str().expect("utf-8 path")])
}

/// Asserts a push was accepted.
pub fn push_ok(node: &TestNode, doc: &Value) {
    let out = push(node, doc);
    assert!(
        out.status.success(),
        "push refused: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A worker document with only a `dns` section listening on the node's address.
pub fn dns_doc(node: &TestNode, generation: u64, records: Value) -> Value {
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": node.name(), "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-11-24T10:00:00Z",
        "dns": {"zone": "internal", "listen": [node.address().to_string()], "port": 53, "ttl": 5, "records": records}
    })
}

/// `converge status --output json` of the node: the running agent's answer, or (exit
/// 3, `"agent": "not running"`) the last state stored when none runs.
pub fn status(node: &TestNode) -> Value {
    let out = converge(node, &["status", "--output", "json"]);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status json")
}

/// Waits until the agent answering now has finished every reconciler's first pass
/// (systemd's READY): a status stored by an earlier agent does not count.
pub fn wait_ready(node: &TestNode, within: Duration) {
    wait_until(within, "the agent ready (every first pass done)", || {
        status(node)["agentInfo"]["ready"] == true
    });
}

/// The status entry of reconciler `name` (Null if absent).
pub fn reconciler(status: &Value, name: &str) -> Value {
    status["reconcilers"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["reconciler"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Generates the node's WireGuard key for `iface` with `converge wireguard rotate-key`
/// (before its agent runs); returns the public key it prints.
pub fn wireguard_key(node: &TestNode, iface: &str) -> String {
    let out = converge(node, &["wireguard", "rotate-key", "--interface", iface]);
    assert!(
        out.status.success(),
        "rotate-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
