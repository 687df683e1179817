//! The node's host name and message of the day through the real agent (`metadata.
//! hostname`, `metadata.motd`), in its own UTS namespace and with its /etc files under
//! the test's directory: applied, shown in the diff, and repaired after a change by
//! hand within a resync.

mod common;

use common::agent::{converge, data, push_ok, reconciler, status};
use common::sandbox::{converge_bin, require_tool, wait_until, TestNode};
use serde_json::json;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn hostname_and_motd_are_applied_and_repaired() {
    require_tool("unshare");
    let node = TestNode::new("node-set");
    let etc = node.data_dir().join("etc");
    std::fs::create_dir_all(&etc).expect("etc");
    let sock = data(&node).join("converge.sock");
    let mut cmd = node.command("unshare");
    cmd.arg("--uts")
        .arg("--")
        .arg(converge_bin())
        .arg("--data-dir")
        .arg(data(&node))
        .args(["agent", "--node-id", node.name(), "--resync-secs", "1"])
        .env("CONVERGE_TEST_ETC_DIR", &etc)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let agent = node.spawn(&mut cmd);
    wait_until(Duration::from_secs(10), "agent socket", || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    // The agent's own UTS namespace: `hostname` run inside it.
    let uts = |args: &[&str]| {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--uts=/proc/{}/ns/uts", agent.pid()))
            .arg("hostname")
            .args(args)
            .output()
            .expect("nsenter hostname");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let doc = json!({
        "apiVersion": "converge/v1",
        "node": {"id": node.name(), "mode": "worker"},
        "generation": 1,
        "issuedAt": "2026-12-07T10:00:00Z",
        "metadata": {"hostname": "web-7", "motd": "Managed by converge: web-7\n"}
    });
    let file = node.data_dir().join("doc.json");
    std::fs::write(&file, doc.to_string()).expect("doc");
    let diff = converge(&node, &["diff", &file.display().to_string()]);
    let shown = String::from_utf8_lossy(&diff.stdout);
    assert!(
        shown.contains("~ hostname node") && shown.contains("~ motd /etc/motd"),
        "{shown}"
    );
    push_ok(&node, &doc);
    wait_until(Duration::from_secs(30), "hostname set", || {
        uts(&[]) == "web-7"
    });
    assert_eq!(
        std::fs::read_to_string(etc.join("hostname")).expect("hostname"),
        "web-7\n"
    );
    assert_eq!(
        std::fs::read_to_string(etc.join("motd")).expect("motd"),
        "Managed by converge: web-7\n"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(etc.join("motd"))
        .expect("motd")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644, "others read the motd");
    // Changed by hand: repaired within a resync (1 s here).
    uts(&["someone-else"]);
    std::fs::write(etc.join("motd"), "edited\n").expect("edit motd");
    wait_until(Duration::from_secs(10), "hostname repaired", || {
        uts(&[]) == "web-7"
    });
    wait_until(Duration::from_secs(10), "motd repaired", || {
        std::fs::read_to_string(etc.join("motd")).is_ok_and(|m| m.starts_with("Managed"))
    });
    assert_eq!(reconciler(&status(&node), "metadata")["state"], "Converged");
}
