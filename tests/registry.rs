//! Images from a private registry through the real agent, on both daemons: a real
//! registry (distribution, TLS with a test CA, htpasswd) in the node's namespace holds
//! the busybox test image. A pull with the credentials of the `registries` section runs
//! the container and its status shows the digest the tag resolved to; a wrong password
//! fails that container with an error naming the registry (the others keep running); a
//! digest the registry does not have is refused; the right pinned digest runs;
//! `pullPolicy: never` does not pull. The password appears in no status, event or log.

mod common;

use common::agent::{converge, data, push_ok, reconciler, start_agent, status, wait_ready};
use common::registry::{start_registry, PASSWORD, USER};
use common::runtime::TEST_IMAGE;
use common::sandbox::{wait_until, TestNode};
use serde_json::{json, Value};
use std::time::Duration;

fn doc(node: &TestNode, generation: u64, server: &str, containers: Value) -> Value {
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": node.name(), "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-12-07T10:00:00Z",
        "registries": [{"server": server, "username": USER, "passwordSecret": "registry"}],
        "containers": containers
    })
}

fn app(name: &str, image: &str) -> Value {
    json!({"name": name, "image": image, "command": ["sleep", "3600"], "stopGracePeriod": "1s"})
}

/// The backups-free status line of `object` among the containers reconciler's errors,
/// waiting objects and notes.
fn containers_status(node: &TestNode) -> Value {
    reconciler(&status(node), "containers")
}

fn scenario(kind: &str, node: &TestNode, agent_args: &[String], podman_args: &[String]) {
    let registry = start_registry(node, 5443);
    let server = registry.server.clone();
    let digest = registry.push(node, podman_args, TEST_IMAGE, "converge/busybox:1");
    registry.push(node, podman_args, TEST_IMAGE, "converge/other:1");
    let secrets = node.data_dir().join("secrets");
    std::fs::create_dir_all(&secrets).expect("secrets dir");
    std::fs::write(secrets.join("registry"), format!("{PASSWORD}\n")).expect("secret");
    let mut args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let secrets_arg = secrets.display().to_string();
    args.extend(["--secrets-dir", &secrets_arg]);
    let _agent = start_agent(node, &args);

    // Good credentials: pulled, running, the tag's digest in the status.
    let tagged = format!("{server}/converge/busybox:1");
    push_ok(node, &doc(node, 1, &server, json!([app("app", &tagged)])));
    wait_until(Duration::from_secs(120), "app converged", || {
        containers_status(node)["state"] == "Converged"
    });
    let st = containers_status(node);
    assert!(
        st["objects"].to_string().contains(digest.as_str()),
        "{kind}: {st}"
    );

    // A wrong password: that container fails, naming the registry; app keeps running.
    std::fs::write(secrets.join("registry"), "wrong\n").expect("secret");
    let other = format!("{server}/converge/other:1");
    push_ok(
        node,
        &doc(
            node,
            2,
            &server,
            json!([app("app", &tagged), app("other", &other)]),
        ),
    );
    wait_until(Duration::from_secs(120), "other failed", || {
        containers_status(node)["objectErrors"]
            .to_string()
            .contains("image ")
    });
    let st = containers_status(node);
    let errors = st["objectErrors"].to_string();
    assert!(
        errors.contains(&format!("pull from registry {server}")),
        "{kind}: {errors}"
    );
    assert_eq!(st["state"], "Degraded", "{kind}: {st}");

    // A pinned digest the registry does not have is refused; the real one runs.
    std::fs::write(secrets.join("registry"), format!("{PASSWORD}\n")).expect("secret");
    let missing = format!("{server}/converge/other@sha256:{}", "0".repeat(64));
    push_ok(
        node,
        &doc(
            node,
            3,
            &server,
            json!([app("app", &tagged), app("other", &missing)]),
        ),
    );
    wait_until(
        Duration::from_secs(120),
        "the unknown digest refused",
        || {
            containers_status(node)["objectErrors"]
                .to_string()
                .contains(&"0".repeat(64))
        },
    );
    let pinned = format!("{server}/converge/other@{digest}");
    push_ok(
        node,
        &doc(
            node,
            4,
            &server,
            json!([app("app", &tagged), app("other", &pinned)]),
        ),
    );
    wait_until(Duration::from_secs(120), "pinned converged", || {
        containers_status(node)["state"] == "Converged"
    });

    // `pullPolicy: never` with an image the node lacks: not pulled, a failed object.
    let absent = format!("{server}/converge/busybox:absent");
    let mut never = app("never", &absent);
    never["pullPolicy"] = json!("never");
    push_ok(
        node,
        &doc(node, 5, &server, json!([app("app", &tagged), never])),
    );
    wait_until(Duration::from_secs(60), "never reported", || {
        containers_status(node)["objectErrors"]
            .to_string()
            .contains("pullPolicy is never")
    });

    // The password is nowhere the operator looks (status, events), nor in the store.
    let events = converge(node, &["events", "--output", "json"]);
    for (what, text) in [
        ("status", status(node).to_string()),
        (
            "events",
            String::from_utf8_lossy(&events.stdout).into_owned(),
        ),
        (
            "store",
            String::from_utf8_lossy(
                &std::fs::read(data(node).join("state.db")).unwrap_or_default(),
            )
            .into_owned(),
        ),
    ] {
        assert!(
            !text.contains(PASSWORD),
            "{kind}: the password is in the {what}"
        );
    }
    wait_ready(node, Duration::from_secs(10));
}

#[test]
fn private_registry_pulls_on_podman() {
    let node = TestNode::new("reg-podman");
    let svc = common::podman::start_podman(&node);
    let agent_args = vec![
        "--runtime".into(),
        "podman".into(),
        "--podman-socket".into(),
        svc.socket.display().to_string(),
    ];
    scenario("podman", &node, &agent_args, &svc.global_args());
}

#[test]
fn private_registry_pulls_on_docker() {
    let node = TestNode::new("reg-docker");
    // The image is pushed from a Podman store of the node (dockerd's has no push of an
    // image to a registry it must first tag in).
    let svc = common::podman::start_podman(&node);
    let daemon = common::docker::start_docker(&node);
    let agent_args = vec![
        "--runtime".into(),
        "docker".into(),
        "--docker-socket".into(),
        daemon.socket.display().to_string(),
    ];
    scenario("docker", &node, &agent_args, &svc.global_args());
}
