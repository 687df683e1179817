//! Helpers shared by the Podman and Docker driver tests: the busybox test image, specs
//! of managed containers, and waiting on inspect data or event pings.

use super::sandbox::TestNode;
use converge_containers::driver::{
    ContainerRuntime, CreateSpec, RuntimeContainer, LABEL_HASH, LABEL_MANAGED, LABEL_NAME,
    LABEL_NODE,
};
use converge_core::HostEvent;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The image every runtime test imports (no registry here).
pub const TEST_IMAGE: &str = "localhost/busybox:test";

const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "sleep", "httpd", "nc", "wget", "echo", "true",
];

/// Builds a fresh busybox rootfs in `rootfs` and runs `import` (a `podman import -` or
/// `docker import -` command naming [`TEST_IMAGE`]) with the rootfs tarball on stdin.
pub fn import_busybox(rootfs: &Path, mut import: Command) -> Output {
    let bin = rootfs.join("bin");
    // A restarted daemon on the same node imports again from a fresh tree.
    let _ = fs::remove_dir_all(rootfs);
    fs::create_dir_all(&bin).expect("create rootfs/bin");
    fs::copy("/bin/busybox", bin.join("busybox")).expect("copy busybox (package busybox-static)");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("link applet");
    }
    let tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .args(["-c", "."])
        .output()
        .expect("run tar");
    assert!(tar.status.success(), "tar rootfs failed");
    let mut child = import
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn image import");
    let mut stdin = child.stdin.take().expect("import stdin");
    let data = tar.stdout;
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("wait image import");
    let _ = writer.join();
    out
}

/// converge's ownership labels for `name` on this node, plus one user label.
pub fn labels(node: &TestNode, name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (LABEL_NODE.to_string(), node.name().to_string()),
        (LABEL_NAME.to_string(), name.to_string()),
        (LABEL_HASH.to_string(), "0123abcd".to_string()),
        ("app".to_string(), name.to_string()),
    ])
}

/// A plain managed container running `args` (no ports, volumes or limits).
pub fn simple_spec(node: &TestNode, name: &str, args: &[&str]) -> CreateSpec {
    CreateSpec {
        name: name.into(),
        image: TEST_IMAGE.into(),
        command: None,
        args: Some(args.iter().map(|s| s.to_string()).collect()),
        env: BTreeMap::new(),
        ports: Vec::new(),
        volumes: Vec::new(),
        cpus: None,
        memory: None,
        pids: None,
        health: None,
        labels: labels(node, name),
        network: None,
        ip: None,
        stop_grace: Duration::from_secs(1),
    }
}

/// Polls `inspect` until `cond` holds; panics with the last state after `timeout`.
pub async fn wait_for<R: ContainerRuntime>(
    driver: &R,
    id: &str,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&RuntimeContainer) -> bool,
) -> RuntimeContainer {
    let deadline = Instant::now() + timeout;
    loop {
        let c = driver
            .inspect(id)
            .await
            .expect("inspect")
            .unwrap_or_else(|| panic!("container {id} vanished while waiting for {what}"));
        if cond(&c) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Forwards the driver's events into a channel (the stream subscribes on first poll).
pub fn watch_events<R: ContainerRuntime>(
    driver: &R,
) -> (
    mpsc::UnboundedReceiver<HostEvent>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut events = driver.events();
    let task = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    (rx, task)
}

/// Asserts that a ping arrives within `within`; `what` names the expected cause.
pub async fn expect_ping(
    rx: &mut mpsc::UnboundedReceiver<HostEvent>,
    within: Duration,
    what: &str,
) -> HostEvent {
    tokio::time::timeout(within, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no ping within {within:?}: expected {what}"))
        .expect("event stream alive")
}

/// Asserts that no ping arrives within `within`.
pub async fn expect_no_ping(
    rx: &mut mpsc::UnboundedReceiver<HostEvent>,
    within: Duration,
    why: &str,
) {
    assert!(
        tokio::time::timeout(within, rx.recv()).await.is_err(),
        "{why}"
    );
}

/// Waits until no ping has arrived for `quiet`, so later assertions see only new ones.
pub async fn settle(rx: &mut mpsc::UnboundedReceiver<HostEvent>, quiet: Duration) {
    while tokio::time::timeout(quiet, rx.recv()).await.is_ok() {}
}
