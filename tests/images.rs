//! The `images` section through the real agent, on Podman and on Docker.
//!
//! GC: the daemon's storage root is a small tmpfs, so its usage is measurable. Images
//! of a few MB each are imported: one a converge container uses, one a stopped foreign
//! container uses, one in `keep`, and two unused (the older first). Thresholds are set
//! from the measured usage so that removing the older unused image is enough: `diff`
//! shows it without removing it, then the agent removes exactly it; the rest, the
//! foreign container included, is untouched. The time and space freed are printed.
//!
//! Prefetch: a registry in the node (TLS, htpasswd) serves a 24 MB image; the node's
//! loopback is shaped to 16 Mbit/s so the pull takes seconds. The status shows its
//! progress (bytes and layers) while it runs, then `prefetched`, and the image is on
//! the node before any container uses it.

mod common;

use common::agent::{converge, push_ok, reconciler, start_agent, status};
use common::images::{import_image, tmpfs, usage, MB};
use common::registry::{start_registry, PASSWORD, USER};
use common::runtime::TEST_IMAGE;
use common::sandbox::{wait_until, TestNode};
use converge_containers::driver::ContainerRuntime;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

/// Random (incompressible) payload of each GC test image.
const PAYLOAD: u64 = 6 * MB;

fn doc(node: &TestNode, generation: u64, extra: Value) -> Value {
    let mut d = json!({
        "apiVersion": "converge/v1",
        "node": {"id": node.name(), "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-12-07T10:00:00Z",
    });
    if let (Some(d), Some(extra)) = (d.as_object_mut(), extra.as_object()) {
        d.extend(extra.clone());
    }
    d
}

fn app(name: &str, image: &str) -> Value {
    json!({"name": name, "image": image, "command": ["sleep", "3600"], "stopGracePeriod": "1s"})
}

fn containers_status(node: &TestNode) -> Value {
    reconciler(&status(node), "containers")
}

/// A daemon CLI call (any exit status).
type Cli<'a> = Box<dyn Fn(&[&str]) -> std::process::Output + 'a>;

/// The daemon, as the GC scenario drives it.
struct Daemon<'a> {
    kind: &'static str,
    agent_args: Vec<String>,
    /// The storage root (a tmpfs).
    root: std::path::PathBuf,
    cli: Cli<'a>,
    import: Box<dyn Fn(&str) -> Command + 'a>,
}

impl Daemon<'_> {
    fn ok(&self, args: &[&str]) -> String {
        let out = (self.cli)(args);
        assert!(
            out.status.success(),
            "{} {args:?}: {}",
            self.kind,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn has_image(&self, name: &str) -> bool {
        (self.cli)(&["image", "inspect", name]).status.success()
    }
}

fn gc_scenario(node: &TestNode, d: &Daemon) {
    let kind = d.kind;
    // Oldest first: gc-old is built before gc-new.
    for name in ["gc-old", "gc-used", "gc-foreign", "gc-kept", "gc-new"] {
        import_image(
            node,
            &format!("localhost/{name}:1"),
            PAYLOAD,
            (d.import)(&format!("localhost/{name}:1")),
        );
        std::thread::sleep(Duration::from_millis(1100)); // distinct build times (seconds)
    }
    let _agent = start_agent(
        node,
        &d.agent_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    push_ok(
        node,
        &doc(
            node,
            1,
            json!({"containers": [app("app", "localhost/gc-used:1")]}),
        ),
    );
    wait_until(Duration::from_secs(60), "app converged", || {
        containers_status(node)["state"] == "Converged"
    });
    // A stopped container converge does not own.
    d.ok(&[
        "create",
        "--name",
        "foreign",
        "localhost/gc-foreign:1",
        "sleep",
        "1",
    ]);

    // Thresholds from what is used now: at or above high, and low such that the older
    // unused image (at least PAYLOAD bytes) is more than enough.
    let (used, cap) = usage(&d.root);
    let high = used * 100 / cap;
    let low = ((used - PAYLOAD * 3 / 4) * 100).div_ceil(cap);
    assert!(
        low >= 1 && low < high,
        "{kind}: usage {used} of {cap} leaves no room for thresholds ({low}, {high})"
    );
    let gc = json!({"containers": [app("app", "localhost/gc-used:1")],
        "images": {"gc": {"highPercent": high, "lowPercent": low, "minAge": "0s",
                          "keep": ["localhost/gc-kept", "localhost/busybox"]}}});
    let file = node.data_dir().join("gc.json");
    std::fs::write(&file, doc(node, 2, gc.clone()).to_string()).expect("doc");

    // A dry run shows what would go, and removes nothing.
    let mut diff_args = vec![
        "diff",
        file.to_str().expect("path"),
        "--reconciler",
        "containers",
    ];
    let agent_args: Vec<&str> = d.agent_args.iter().map(String::as_str).collect();
    diff_args.extend(&agent_args);
    let out = converge(node, &diff_args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("- image localhost/gc-old:1"),
        "{kind}: {text}"
    );
    assert!(
        !text.contains("gc-new") && !text.contains("gc-kept"),
        "{kind}: {text}"
    );
    assert!(
        d.has_image("localhost/gc-old:1"),
        "{kind}: diff removed an image"
    );

    let started = Instant::now();
    push_ok(node, &doc(node, 2, gc));
    wait_until(Duration::from_secs(60), "gc-old collected", || {
        !d.has_image("localhost/gc-old:1")
    });
    let took = started.elapsed();
    wait_until(Duration::from_secs(30), "the gc note", || {
        containers_status(node)["objects"]
            .to_string()
            .contains("removed 1 images")
    });
    let (after, _) = usage(&d.root);
    for kept in [
        "localhost/gc-new:1",
        "localhost/gc-used:1",
        "localhost/gc-foreign:1",
        "localhost/gc-kept:1",
        TEST_IMAGE,
    ] {
        assert!(d.has_image(kept), "{kind}: {kept} was removed");
    }
    let foreign = d.ok(&[
        "ps",
        "-a",
        "--filter",
        "name=foreign",
        "--format",
        "{{.Names}}",
    ]);
    assert_eq!(foreign, "foreign", "{kind}: the foreign container");
    let st = containers_status(node);
    assert_eq!(st["state"], "Converged", "{kind}: {st}");
    let events = converge(node, &["events", "--output", "json"]);
    assert!(
        String::from_utf8_lossy(&events.stdout).contains("image localhost/gc-old:1"),
        "{kind}: the removal is not in the journal"
    );
    let note = st["objects"]
        .as_array()
        .and_then(|o| o.iter().find(|n| n["object"] == "image store"))
        .map(|n| n["note"].to_string())
        .unwrap_or_default();
    eprintln!(
        "{kind} gc: store {used} -> {after} bytes of {cap} (freed {}), high {high}% low {low}%, push to removed {:.2}s; note: {note}",
        used.saturating_sub(after),
        took.as_secs_f64()
    );
}

#[test]
fn gc_frees_space_without_touching_foreign_kept_or_used_images_on_podman() {
    let node = TestNode::new("gc-podman");
    tmpfs(&node.podman_root(), "64m");
    let svc = common::podman::start_podman(&node);
    let g = svc.global_args();
    let d = Daemon {
        kind: "podman",
        agent_args: vec![
            "--runtime".into(),
            "podman".into(),
            "--podman-socket".into(),
            svc.socket.display().to_string(),
        ],
        root: node.podman_root(),
        cli: Box::new(|args: &[&str]| common::podman::podman(&node, &svc, args)),
        import: Box::new(|name: &str| {
            let mut cmd = node.command("podman");
            cmd.args(&g).args(["import", "-q", "-", name]);
            cmd
        }),
    };
    gc_scenario(&node, &d);
}

#[test]
fn gc_frees_space_without_touching_foreign_kept_or_used_images_on_docker() {
    let node = TestNode::new("gc-docker");
    tmpfs(&node.data_dir().join("docker"), "64m");
    let daemon = common::docker::start_docker(&node);
    let host = daemon.host();
    let d = Daemon {
        kind: "docker",
        agent_args: vec![
            "--runtime".into(),
            "docker".into(),
            "--docker-socket".into(),
            daemon.socket.display().to_string(),
        ],
        root: daemon.data_root.clone(),
        cli: Box::new(|args: &[&str]| common::docker::docker(&node, &daemon, args)),
        import: Box::new(|name: &str| {
            let mut cmd = Command::new(common::docker::DOCKER_CLI);
            cmd.args(["-H", &host, "import", "-", name]);
            cmd
        }),
    };
    gc_scenario(&node, &d);
}

/// Shapes the node's loopback (the registry and the daemon share it) to `rate`.
fn shape_loopback(node: &TestNode, rate: &str) {
    let out = node
        .command("tc")
        .args([
            "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate, "burst", "256kb",
            "latency", "2s",
        ])
        .output()
        .expect("tc");
    assert!(
        out.status.success(),
        "tc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn prefetch_scenario(
    kind: &str,
    node: &TestNode,
    agent_args: &[String],
    podman_args: &[String],
    has_image: &dyn Fn(&str) -> bool,
) {
    let registry = start_registry(node, 5443);
    let server = registry.server.clone();
    // A 24 MB image in the registry, pushed from the node's Podman store.
    let mut import = node.command("podman");
    import
        .args(podman_args)
        .args(["import", "-q", "-", "localhost/big:1"]);
    import_image(node, "localhost/big:1", 24 * MB, import);
    registry.push(node, podman_args, "localhost/big:1", "converge/big:1");
    // Its layers must come from the registry, not from the store that pushed them.
    let rmi = node
        .command("podman")
        .args(podman_args)
        .args(["rmi", "localhost/big:1"])
        .output()
        .expect("podman rmi");
    assert!(
        rmi.status.success(),
        "{}",
        String::from_utf8_lossy(&rmi.stderr)
    );
    let image = format!("{server}/converge/big:1");
    let secrets = node.data_dir().join("secrets");
    std::fs::create_dir_all(&secrets).expect("secrets dir");
    std::fs::write(secrets.join("registry"), format!("{PASSWORD}\n")).expect("secret");
    let secrets_arg = secrets.display().to_string();
    let mut args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    args.extend(["--secrets-dir", &secrets_arg]);
    let _agent = start_agent(node, &args);
    shape_loopback(node, "16mbit");

    push_ok(
        node,
        &doc(
            node,
            1,
            json!({
                "registries": [{"server": server, "username": USER, "passwordSecret": "registry"}],
                "images": {"prefetch": [image]}
            }),
        ),
    );
    let started = Instant::now();
    let mut seen_progress = None;
    wait_until(Duration::from_secs(120), "prefetched", || {
        let st = containers_status(node);
        let text = st.to_string();
        if seen_progress.is_none() && text.contains("pulling: ") && text.contains(" MB of ") {
            seen_progress = Some(
                st["waiting"]
                    .as_array()
                    .and_then(|w| w.first())
                    .map(|w| w["error"].to_string())
                    .unwrap_or(text.clone()),
            );
        }
        text.contains("prefetched: ")
    });
    let took = started.elapsed();
    let progress =
        seen_progress.unwrap_or_else(|| panic!("{kind}: no progress seen while pulling"));
    assert!(progress.contains("layers"), "{kind}: {progress}");
    assert!(has_image(&image), "{kind}: {image} is not on the node");
    let st = containers_status(node);
    assert_eq!(st["state"], "Converged", "{kind}: {st}");
    let note = st["objects"].to_string();
    eprintln!(
        "{kind} prefetch: {:.1}s; while pulling: {progress}; done: {note}",
        took.as_secs_f64()
    );
    shape_loopback(node, "10gbit");
}

#[test]
fn prefetch_shows_progress_and_pulls_ahead_on_podman() {
    let node = TestNode::new("pf-podman");
    let svc = common::podman::start_podman(&node);
    let agent_args = vec![
        "--runtime".into(),
        "podman".into(),
        "--podman-socket".into(),
        svc.socket.display().to_string(),
    ];
    let has = |i: &str| {
        common::podman::podman(&node, &svc, &["image", "exists", i])
            .status
            .success()
    };
    prefetch_scenario("podman", &node, &agent_args, &svc.global_args(), &has);
}

#[test]
fn prefetch_shows_progress_and_pulls_ahead_on_docker() {
    let node = TestNode::new("pf-docker");
    // The image is pushed from a Podman store of the node.
    let svc = common::podman::start_podman(&node);
    let daemon = common::docker::start_docker(&node);
    let agent_args = vec![
        "--runtime".into(),
        "docker".into(),
        "--docker-socket".into(),
        daemon.socket.display().to_string(),
    ];
    let has = |i: &str| {
        common::docker::docker(&node, &daemon, &["image", "inspect", i])
            .status
            .success()
    };
    prefetch_scenario("docker", &node, &agent_args, &svc.global_args(), &has);
}

/// The image half of the driver contract: the image list (ids, names, sizes, build
/// times), the users (a stopped container counts), the store's disk; a removal is
/// refused while a container uses the image (never forced) and succeeds after, and a
/// missing image is success.
async fn driver_contract<R: ContainerRuntime>(driver: &R, cli: &dyn Fn(&[&str]) -> String) {
    let images = driver.list_images().await.expect("list images");
    let image = images
        .iter()
        .find(|i| i.tags.iter().any(|t| t == TEST_IMAGE))
        .unwrap_or_else(|| panic!("{TEST_IMAGE} not listed: {images:?}"))
        .clone();
    assert!(
        image.id.starts_with("sha256:") && image.size > 1_000_000 && image.created > 0,
        "{image:?}"
    );
    let disk = driver.image_disk().await.expect("image disk");
    assert!(
        disk.capacity > 0 && disk.used > 0 && disk.used <= disk.capacity,
        "{disk:?}"
    );
    cli(&["create", "--name", "user", TEST_IMAGE, "sleep", "1"]);
    assert!(driver
        .image_users()
        .await
        .expect("users")
        .contains(&image.id));
    let err = driver
        .remove_image(&image)
        .await
        .expect_err("refused while used");
    assert!(err.to_string().contains("image remove"), "{err}");
    assert!(
        driver.image(TEST_IMAGE).await.expect("inspect").is_some(),
        "the image survived"
    );
    cli(&["rm", "user"]);
    assert!(!driver
        .image_users()
        .await
        .expect("users")
        .contains(&image.id));
    driver
        .remove_image(&image)
        .await
        .expect("removed once unused");
    assert!(driver.image(TEST_IMAGE).await.expect("inspect").is_none());
    driver
        .remove_image(&image)
        .await
        .expect("a missing image is success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_driver_lists_and_removes_images_never_forced() {
    let node = TestNode::new("img-drv-p");
    let svc = common::podman::start_podman(&node);
    let driver = converge_containers::podman::Podman::new(&svc.socket);
    driver_contract(&driver, &|args| {
        common::podman::podman_ok(&node, &svc, args)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_driver_lists_and_removes_images_never_forced() {
    let node = TestNode::new("img-drv-d");
    let daemon = common::docker::start_docker(&node);
    let driver = converge_containers::docker::Docker::new(daemon.socket.clone());
    driver_contract(&driver, &|args| {
        common::docker::docker_ok(&node, &daemon, args)
    })
    .await;
}
