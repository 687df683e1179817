//! Fleet trust, checked from outside against the real binary (issue 24), one test per
//! item:
//! - `local_state_is_private`: the agent's store (with its WAL), keys and socket are
//!   0600 whatever the caller's umask, and a store an older converge left 0644 is made
//!   private at start; the data dir is 0711 (daemons that drop privileges reach their
//!   own subdirectories, nobody lists it).
//! - `socket_only_root_or_its_group`: a user other than root can neither push nor read
//!   the status (nor read the store behind it); with `--socket-group` its members push
//!   and read the status through the socket, but never inspect metadata.
//! - `plane_state_is_private`: the control plane's directory is 0700 and its database
//!   0600.
//! - `an_old_document_in_force_is_reported`: status warns when the document in force
//!   was issued longer ago than `--max-document-age-days`.

mod common;

use common::agent::{converge, data, push, push_ok, start_agent, status};
use common::sandbox::{converge_bin, require_tool, TestNode};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn doc(node: &TestNode, generation: u64) -> Value {
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": node.name(), "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-12-07T10:00:00Z",
    })
}

/// `converge ARGS` in the node as `nobody` (uid 65534, group nogroup), with a permissive
/// umask, as a careless local user would.
fn as_nobody(node: &TestNode, args: &[&str]) -> Output {
    let mut cmd = node.command("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(converge_bin())
        .arg("--data-dir")
        .arg(data(node))
        .args(args);
    cmd.output().expect("run setpriv")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn local_state_is_private() {
    let node = TestNode::new("secl");
    let dir = data(&node);
    {
        let agent = start_agent(&node, &[]);
        push_ok(&node, &doc(&node, 1));
        for f in [
            "state.db",
            "state.db-wal",
            "state.db-shm",
            "redaction.key",
            "converge.sock",
        ] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        assert_eq!(mode(&dir), 0o711);
        // No temp or socket directory is left behind.
        let leftovers: Vec<String> = std::fs::read_dir(&dir)
            .expect("data dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        drop(agent);
    }
    // A store an older converge left readable by everyone is made private at start.
    for f in ["state.db", "state.db-wal"] {
        let p = dir.join(f);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
    }
    let _agent = start_agent(&node, &[]);
    assert_eq!(mode(&dir.join("state.db")), 0o600);
    assert_eq!(status(&node)["agent"], "running");
}

#[test]
fn socket_only_root_or_its_group() {
    require_tool("setpriv");
    let node = TestNode::new("secs");
    let doc_path = node.data_dir().join("doc-2.json");
    std::fs::write(&doc_path, serde_json::to_vec(&doc(&node, 2)).expect("json")).expect("doc");
    std::fs::set_permissions(&doc_path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let doc_arg = doc_path.to_str().expect("utf-8");
    {
        let _agent = start_agent(&node, &[]);
        push_ok(&node, &doc(&node, 1));
        // Not root, no group: the socket does not let it in, and the store it would
        // fall back to is not readable.
        let out = as_nobody(&node, &["status"]);
        assert!(!out.status.success(), "{}", text(&out));
        let out = as_nobody(&node, &["push", doc_arg]);
        assert!(!out.status.success(), "{}", text(&out));
        assert_eq!(status(&node)["generation"], 1, "nothing pushed");
    }
    // Its group may push and read the status through the socket (0660 root:nogroup).
    let _agent = start_agent(&node, &["--socket-group", "nogroup"]);
    let sock = data(&node).join("converge.sock");
    assert_eq!(mode(&sock), 0o660);
    let out = as_nobody(&node, &["status", "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let st: Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(st["agent"], "running");
    assert_eq!(st["generation"], 1);
    let out = as_nobody(&node, &["push", doc_arg]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(status(&node)["generation"], 2);
    // Metadata entries stay root's.
    let out = as_nobody(&node, &["metadata", "inspect", "any"]);
    assert!(
        !out.status.success() && text(&out).contains("may not inspect metadata"),
        "{}",
        text(&out)
    );
    // Root still does everything.
    let out = push(&node, &doc(&node, 3));
    assert!(out.status.success(), "{}", text(&out));
    let out = converge(&node, &["metadata", "inspect", "any"]);
    assert!(!text(&out).contains("may not"), "{}", text(&out));
}

#[test]
fn plane_state_is_private() {
    let node = TestNode::new("secp");
    let plane = node.data_dir().join("plane");
    let out = converge(
        &node,
        &[
            "control-plane",
            "token",
            "--data",
            plane.to_str().expect("utf-8"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mode(&plane), 0o700);
    assert_eq!(mode(&plane.join("control-plane.db")), 0o600);
    for f in ["control-plane.db-wal", "control-plane.db-shm"] {
        let p = plane.join(f);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{f}");
        }
    }
}

#[test]
fn an_old_document_in_force_is_reported() {
    let node = TestNode::new("seco");
    let _agent = start_agent(&node, &["--max-document-age-days", "30"]);
    let mut old = doc(&node, 1);
    old["issuedAt"] = json!("2026-01-01T00:00:00Z");
    push_ok(&node, &old);
    let st = status(&node);
    let warnings = st["warnings"].as_array().cloned().unwrap_or_default();
    assert!(
        warnings.iter().any(|w| w
            .as_str()
            .is_some_and(|w| w.contains("generation 1") && w.contains("days ago"))),
        "{st}"
    );
    push_ok(&node, &doc(&node, 2));
    assert_eq!(status(&node)["warnings"], json!([]));
}
