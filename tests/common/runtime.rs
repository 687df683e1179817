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

/// The network half of the driver contract, the same on every runtime: a converge
/// network is created with its subnets and labels, a container gets a static address on
/// it, the network lists its users (`foreign`, a container the runtime's CLI attached,
/// included) and cannot be removed while used, then is removed; removing a missing one
/// is success. `attach_foreign(network, name)` starts a foreign container on it with
/// the runtime's CLI, `remove_foreign(name)` removes it.
pub async fn network_contract<R: ContainerRuntime>(
    driver: &R,
    node: &TestNode,
    attach_foreign: impl Fn(&str, &str),
    remove_foreign: impl Fn(&str),
) {
    use converge_containers::driver::NetworkCreate;
    let name = format!("cvg-{}", node.name());
    let v4: ipnet::IpNet = "10.231.5.0/24".parse().expect("subnet");
    let v6: ipnet::IpNet = "fd00:231:5::/64".parse().expect("subnet");
    let gw4: std::net::IpAddr = "10.231.5.1".parse().expect("gateway");
    let gw6: std::net::IpAddr = "fd00:231:5::1".parse().expect("gateway");
    let mut net_labels = labels(node, &name);
    net_labels.remove(LABEL_HASH);
    let spec = NetworkCreate {
        name: name.clone(),
        subnets: vec![(v4, gw4), (v6, gw6)],
        labels: net_labels.clone(),
    };
    driver.create_network(&spec).await.expect("create network");
    let listed = driver.list_networks().await.expect("list networks");
    let n = listed
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("{name} not listed: {listed:?}"));
    for (k, v) in &net_labels {
        assert_eq!(n.labels.get(k), Some(v), "label {k} on {name}");
    }
    let mut subnets: Vec<(String, Option<String>)> = n.subnets.clone();
    subnets.sort();
    assert_eq!(
        subnets,
        [
            (v4.to_string(), Some(gw4.to_string())),
            (v6.to_string(), Some(gw6.to_string()))
        ]
    );
    assert!(
        driver.create_network(&spec).await.is_err(),
        "a second network of the same name is refused"
    );

    let mut c = simple_spec(node, "on-net", &["sleep", "600"]);
    c.network = Some(name.clone());
    c.ip = Some("10.231.5.10".parse().expect("ip"));
    let id = driver.create(&c).await.expect("create on the network");
    driver.start(&id).await.expect("start");
    let rc = driver.inspect(&id).await.expect("inspect").expect("exists");
    assert!(
        rc.addresses.contains(&"10.231.5.10".parse().expect("ip")),
        "static address on the network: {:?}",
        rc.addresses
    );
    attach_foreign(&name, "foreign-on-net");
    let mut users = driver.network_users(&name).await.expect("users");
    users.sort();
    assert_eq!(users, ["foreign-on-net", "on-net"]);
    let err = driver
        .remove_network(&name)
        .await
        .expect_err("a network in use is not removed");
    assert!(err.to_string().contains(&name), "{err}");

    driver.remove(&id).await.expect("remove container");
    assert_eq!(
        driver.network_users(&name).await.expect("users"),
        ["foreign-on-net"]
    );
    assert!(driver.remove_network(&name).await.is_err(), "still used");
    remove_foreign("foreign-on-net");
    driver.remove_network(&name).await.expect("remove network");
    let listed = driver.list_networks().await.expect("list networks");
    assert!(!listed.iter().any(|n| n.name == name), "{listed:?}");
    driver
        .remove_network(&name)
        .await
        .expect("removing a missing network is success");
}
