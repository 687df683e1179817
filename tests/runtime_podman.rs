//! The Podman driver against a real `podman system service` (one per test node, in the
//! node's network namespace), exercised only through the `ContainerRuntime` trait; the
//! podman CLI sets up foreign containers and cross-checks what the driver reports.

mod common;

use common::runtime::{
    expect_no_ping, expect_ping, labels, settle, simple_spec, wait_for, watch_events,
};

use common::podman::{podman, podman_ok, start_podman, PodmanService, TEST_IMAGE};
use common::sandbox::{require_tool, TestNode};
use converge_containers::driver::{
    ContainerRuntime, Health, HealthSpec, Mount, PortBinding, RunState, LABEL_MANAGED, LABEL_NODE,
};
use converge_containers::podman::Podman;
use converge_containers::{ContainerPort, ContainerVolume, Protocol};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

const HOST_PORT: u16 = 18080;

fn health_check(cmd: &[&str], retries: u32) -> HealthSpec {
    HealthSpec {
        command: cmd.iter().map(|s| s.to_string()).collect(),
        interval: Duration::from_millis(500),
        timeout: Duration::from_secs(2),
        start_period: Duration::ZERO,
        retries,
    }
}

fn driver(svc: &PodmanService) -> Podman {
    // Explicit: the test hosts have no systemd, so podman cannot schedule checks.
    Podman::with_health_checks(&svc.socket, true)
}

/// Fetches `url` with curl from inside the node's namespace (the host's static busybox
/// wget crashes in glibc's resolver).
fn fetch(node: &TestNode, url: &str) -> Option<String> {
    let out = node.run("curl", ["-s", "-m", "3", url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_through_the_driver() {
    require_tool("curl");
    let node = TestNode::new("pdm-life");
    let svc = start_podman(&node);
    let driver = driver(&svc);
    assert_eq!(driver.kind(), "podman");

    // Bind-mount source served by httpd (read-only in the container).
    let www = node.data_dir().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from podman\n").unwrap();
    let www_src = www.display().to_string();

    let image_id = driver
        .image(TEST_IMAGE)
        .await
        .expect("image inspect")
        .expect("test image present")
        .id;
    assert!(image_id.starts_with("sha256:"), "{image_id}");

    let mut spec = simple_spec(&node, "web", &["httpd", "-f", "-p", "8080", "-h", "/www"]);
    spec.env = BTreeMap::from([
        ("GREETING".to_string(), "hello env".to_string()),
        ("SECRET_TOKEN".to_string(), "s3cr3t".to_string()),
    ]);
    spec.ports = vec![ContainerPort {
        container_port: 8080,
        host_port: Some(HOST_PORT),
        protocol: Protocol::Tcp,
        host_ip: None,
    }];
    spec.volumes = vec![
        ContainerVolume {
            source: "webdata".into(),
            target: "/data".into(),
            read_only: false,
        },
        ContainerVolume {
            source: www_src.clone(),
            target: "/www".into(),
            read_only: true,
        },
    ];
    spec.cpus = Some(0.5);
    spec.memory = Some(64 << 20);
    spec.pids = Some(64);
    spec.health = Some(health_check(&["sh", "-c", "true"], 2));
    // The container's own stop timeout; `stop` below passes a shorter grace explicitly.
    spec.stop_grace = Duration::from_secs(20);

    let id = driver.create(&spec).await.expect("create");
    let created = driver.inspect(&id).await.expect("inspect").expect("exists");
    assert_eq!(created.state, RunState::Created);
    assert_eq!(created.exit_code, None);

    driver.start(&id).await.expect("start");
    let c = wait_for(
        &driver,
        &id,
        "running and healthy",
        Duration::from_secs(30),
        |c| c.state == RunState::Running && c.health == Some(Health::Healthy),
    )
    .await;

    assert_eq!(c.id, id);
    assert_eq!(c.name, "web");
    assert_eq!(c.image, TEST_IMAGE);
    assert_eq!(c.image_id, image_id);
    assert_eq!(c.exit_code, None);
    for (k, v) in labels(&node, "web") {
        assert_eq!(c.labels.get(&k), Some(&v), "label {k}");
    }
    assert!(
        c.addresses.iter().any(|a| matches!(a, IpAddr::V4(_))),
        "an IPv4 address on the podman network: {:?}",
        c.addresses
    );
    assert_eq!(
        c.ports,
        vec![PortBinding {
            protocol: "tcp".into(),
            container_port: 8080,
            host_ip: None,
            host_port: HOST_PORT,
        }]
    );
    assert!(
        c.mounts.contains(&Mount {
            source: "webdata".into(),
            target: "/data".into(),
            read_only: false,
        }),
        "{:?}",
        c.mounts
    );
    assert!(
        c.mounts.contains(&Mount {
            source: www_src.clone(),
            target: "/www".into(),
            read_only: true,
        }),
        "{:?}",
        c.mounts
    );
    assert_eq!(c.memory, Some(64 << 20));
    assert_eq!(c.pids_limit, Some(64));

    // Cross-checks with the CLI: env, CPU quota, read-only bind, restart policy.
    assert_eq!(
        podman_ok(&node, &svc, &["exec", "web", "sh", "-c", "echo $GREETING"]),
        "hello env"
    );
    assert_eq!(
        podman_ok(
            &node,
            &svc,
            &["inspect", "-f", "{{.HostConfig.CpuQuota}} {{.HostConfig.CpuPeriod}} {{.HostConfig.RestartPolicy.Name}}|", "web"]
        ),
        "50000 100000 no|",
        "cpu quota/period, restart policy no"
    );
    assert!(
        !podman(&node, &svc, &["exec", "web", "sh", "-c", "echo x > /www/x"])
            .status
            .success(),
        "bind mount is read-only"
    );
    podman_ok(
        &node,
        &svc,
        &["exec", "web", "sh", "-c", "echo x > /data/x"],
    );

    // Traffic through the published port, from inside the node.
    let url = format!("http://{}:{HOST_PORT}/index.html", node.address());
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        if let Some(body) = fetch(&node, &url) {
            break body;
        }
        assert!(Instant::now() < deadline, "no answer from {url}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(body, "hello from podman\n");
    let local = format!("http://127.0.0.1:{HOST_PORT}/index.html");
    assert_eq!(fetch(&node, &local).as_deref(), Some("hello from podman\n"));

    // list_managed sees it, fully filled in.
    let listed = driver.list_managed(node.name()).await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, id);
    assert_eq!(listed[0].ports, c.ports);
    assert_eq!(listed[0].mounts, c.mounts);

    // Already running: fine.
    driver.start(&id).await.expect("start running");

    // httpd is PID 1 without a SIGTERM handler: the kernel ignores SIGTERM for it, so
    // stop must fall back to SIGKILL after the grace period given to `stop` (not the
    // 20 s the container was created with).
    let t = Instant::now();
    driver
        .stop(&id, Duration::from_secs(1))
        .await
        .expect("stop");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "stop took {took:?}"
    );
    let stopped = driver.inspect(&id).await.unwrap().unwrap();
    assert_eq!(stopped.state, RunState::Exited);
    assert_eq!(stopped.exit_code, Some(137));
    assert_eq!(
        stopped.ports, c.ports,
        "configured ports reported when stopped"
    );
    driver
        .stop(&id, Duration::from_secs(1))
        .await
        .expect("stop stopped");

    driver.rename(&id, "web--old").await.expect("rename");
    assert_eq!(driver.inspect(&id).await.unwrap().unwrap().name, "web--old");

    driver.remove(&id).await.expect("remove");
    assert!(driver.inspect(&id).await.unwrap().is_none());
    driver.remove(&id).await.expect("remove missing");

    assert!(podman(&node, &svc, &["volume", "exists", "webdata"])
        .status
        .success());
    driver
        .remove_volume("webdata")
        .await
        .expect("remove volume");
    assert!(!podman(&node, &svc, &["volume", "exists", "webdata"])
        .status
        .success());
    driver
        .remove_volume("webdata")
        .await
        .expect("remove missing volume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_ping_for_managed_containers_only() {
    let node = TestNode::new("pdm-events");
    let svc = start_podman(&node);
    let driver = driver(&svc);

    let id = driver
        .create(&simple_spec(&node, "sleeper", &["sleep", "300"]))
        .await
        .expect("create");
    driver.start(&id).await.expect("start");
    podman_ok(
        &node,
        &svc,
        &["run", "-d", "--name", "foreign", TEST_IMAGE, "sleep", "300"],
    );

    let (mut rx, task) = watch_events(&driver);
    // Subscribed and quiet (a first connect may or may not ping).
    settle(&mut rx, Duration::from_millis(1500)).await;

    podman_ok(&node, &svc, &["kill", "foreign"]);
    expect_no_ping(
        &mut rx,
        Duration::from_secs(2),
        "no ping for a container converge does not manage",
    )
    .await;

    podman_ok(&node, &svc, &["kill", "sleeper"]);
    let event = expect_ping(&mut rx, Duration::from_secs(10), "a ping after podman kill").await;
    // The event names the container by its document name, for the pass's reason.
    assert!(event.0.starts_with("container sleeper "), "{event:?}");
    let dead = driver.inspect(&id).await.unwrap().unwrap();
    assert_eq!(dead.state, RunState::Exited);
    assert_eq!(dead.exit_code, Some(137));

    // Start and removal ping too.
    settle(&mut rx, Duration::from_millis(500)).await;
    driver.start(&id).await.expect("restart");
    expect_ping(&mut rx, Duration::from_secs(10), "a ping after start").await;
    settle(&mut rx, Duration::from_millis(500)).await;
    driver.remove(&id).await.expect("remove");
    expect_ping(&mut rx, Duration::from_secs(10), "a ping after remove").await;

    // With events connected, lists reuse earlier inspects of unchanged containers:
    // after changes behind converge's back they must equal an uncached list.
    let id = driver
        .create(&simple_spec(&node, "cached", &["sleep", "300"]))
        .await
        .expect("create");
    driver.start(&id).await.expect("start");
    settle(&mut rx, Duration::from_millis(500)).await;
    let before = driver.list_managed(node.name()).await.expect("list");
    podman_ok(&node, &svc, &["kill", "cached"]);
    podman_ok(&node, &svc, &["rename", "cached", "renamed"]);
    settle(&mut rx, Duration::from_millis(500)).await;
    let cached = driver.list_managed(node.name()).await.expect("list");
    let uncached = Podman::with_health_checks(&svc.socket, false)
        .list_managed(node.name())
        .await
        .expect("list");
    assert_ne!(cached, before);
    assert_eq!(cached, uncached);
    assert_eq!(cached[0].name, "renamed");
    assert_eq!(cached[0].state, RunState::Exited);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_health_network_and_edge_cases() {
    let node = TestNode::new("pdm-edge");
    let svc = start_podman(&node);
    let driver = driver(&svc);

    // Ownership: only managed=true AND node=<this node> is listed.
    let ours = driver
        .create(&simple_spec(&node, "ours", &["sleep", "300"]))
        .await
        .expect("create ours");
    let mut other = simple_spec(&node, "other-node", &["sleep", "300"]);
    other
        .labels
        .insert(LABEL_NODE.to_string(), "someone-else".to_string());
    driver.create(&other).await.expect("create other node's");
    let mut unmanaged = simple_spec(&node, "unmanaged", &["sleep", "300"]);
    unmanaged
        .labels
        .insert(LABEL_MANAGED.to_string(), "false".to_string());
    driver.create(&unmanaged).await.expect("create unmanaged");
    podman_ok(
        &node,
        &svc,
        &["create", "--name", "cli-made", TEST_IMAGE, "sleep", "300"],
    );
    let listed = driver.list_managed(node.name()).await.expect("list");
    let names: Vec<&str> = listed.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["ours"]);
    assert_eq!(listed[0].id, ours);

    // Same name twice: an error naming the operation.
    let err = driver
        .create(&simple_spec(&node, "ours", &["sleep", "1"]))
        .await
        .expect_err("duplicate name");
    assert!(err.to_string().starts_with("podman create ours:"), "{err}");

    // A failing health check turns the container unhealthy.
    let mut sick = simple_spec(&node, "sick", &["sleep", "300"]);
    sick.health = Some(health_check(&["sh", "-c", "exit 1"], 1));
    let sick = driver.create(&sick).await.expect("create sick");
    driver.start(&sick).await.expect("start sick");
    wait_for(&driver, &sick, "unhealthy", Duration::from_secs(30), |c| {
        c.health == Some(Health::Unhealthy)
    })
    .await;
    // A container without a check reports no health.
    driver.start(&ours).await.expect("start ours");
    let c = wait_for(&driver, &ours, "running", Duration::from_secs(10), |c| {
        c.state == RunState::Running
    })
    .await;
    assert_eq!(c.health, None);
    assert_eq!(c.memory, None);
    // (pids: podman applies its own default limit, 2048, which is reported as is.)

    // Static address on a named network (the default `podman` one, 10.88.0.0/16); a
    // per-process address so parallel test processes sharing the CNI store don't clash.
    let ip: IpAddr = format!("10.88.{}.{}", 200 + std::process::id() % 50, 10)
        .parse()
        .unwrap();
    let mut fixed = simple_spec(&node, "fixed", &["sleep", "300"]);
    fixed.network = Some("podman".into());
    fixed.ip = Some(ip);
    let fixed = driver.create(&fixed).await.expect("create fixed");
    driver.start(&fixed).await.expect("start fixed");
    let c = driver.inspect(&fixed).await.unwrap().unwrap();
    assert_eq!(c.addresses, vec![ip]);

    // Entrypoint override (command) plus args.
    let mut ep = simple_spec(&node, "ep", &["-c", "echo $0-ok; sleep 300", "entry"]);
    ep.command = Some(vec!["sh".into()]);
    let ep = driver.create(&ep).await.expect("create ep");
    driver.start(&ep).await.expect("start ep");
    wait_for(&driver, &ep, "running", Duration::from_secs(10), |c| {
        c.state == RunState::Running
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !podman_ok(&node, &svc, &["logs", "ep"]).contains("entry-ok") {
        assert!(Instant::now() < deadline, "entrypoint did not run");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Missing things.
    assert_eq!(
        driver
            .image("localhost/nope:missing")
            .await
            .expect("image inspect"),
        None
    );
    assert!(driver.inspect("no-such-container").await.unwrap().is_none());
    driver
        .remove("no-such-container")
        .await
        .expect("remove missing");
    driver
        .remove_volume("no-such-volume")
        .await
        .expect("remove missing volume");
    assert!(driver.rename("no-such-container", "x").await.is_err());
    assert!(driver.start("no-such-container").await.is_err());

    // No registry here: a pull fails, and quickly.
    let t = Instant::now();
    let pulled = tokio::time::timeout(
        Duration::from_secs(60),
        driver.pull("localhost:1/nope/missing:latest", None, &Default::default()),
    )
    .await
    .expect("pull returned within 60 s");
    let err = pulled.expect_err("pull of a missing image fails");
    assert!(
        err.to_string()
            .starts_with("podman pull localhost:1/nope/missing:latest:"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(60));

    // remove force-kills a running container.
    driver.remove(&fixed).await.expect("remove running");
    assert!(driver.inspect(&fixed).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reconnect_after_service_restart() {
    let node = TestNode::new("pdm-reconn");
    let mut svc = start_podman(&node);
    let driver = driver(&svc);
    let id = driver
        .create(&simple_spec(&node, "survivor", &["sleep", "300"]))
        .await
        .expect("create");
    driver.start(&id).await.expect("start");

    let (mut rx, task) = watch_events(&driver);
    settle(&mut rx, Duration::from_millis(1500)).await;

    svc.restart(&node);
    // Reconnected (the reconnect itself pings: events may have been missed meanwhile).
    expect_ping(
        &mut rx,
        Duration::from_secs(15),
        "a ping after the service came back",
    )
    .await;
    settle(&mut rx, Duration::from_millis(1500)).await;

    // And real events flow again on the new connection.
    podman_ok(&node, &svc, &["kill", "survivor"]);
    expect_ping(
        &mut rx,
        Duration::from_secs(10),
        "a ping for a kill after the reconnect",
    )
    .await;
    assert_eq!(
        driver.inspect(&id).await.unwrap().unwrap().state,
        RunState::Exited
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_through_the_driver() {
    let node = TestNode::new("pdm-net");
    let svc = start_podman(&node);
    let driver = driver(&svc);
    common::runtime::network_contract(
        &driver,
        &node,
        |net, name| {
            podman_ok(
                &node,
                &svc,
                &[
                    "run",
                    "-d",
                    "--name",
                    name,
                    "--network",
                    net,
                    TEST_IMAGE,
                    "sleep",
                    "600",
                ],
            );
        },
        |name| {
            podman_ok(&node, &svc, &["rm", "-f", "-t", "0", name]);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_container_setting_takes_effect() {
    let node = TestNode::new("pdm-set");
    let svc = start_podman(&node);
    let driver = driver(&svc);
    common::runtime::settings_contract(
        &driver,
        &node,
        |args| {
            let mut all = vec!["exec"];
            all.extend_from_slice(args);
            let out = podman(&node, &svc, &all);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        },
        |name| {
            let out = podman_ok(&node, &svc, &["inspect", name]);
            let v: serde_json::Value = serde_json::from_str(&out).expect("inspect JSON");
            v[0].clone()
        },
        |v| {
            // Podman keeps one k8s-file log, truncated at the size limit.
            let log = &v["HostConfig"]["LogConfig"];
            assert_eq!(log["Type"], "k8s-file", "{log}");
            let path = log["Path"].as_str().expect("log path");
            let files = common::runtime::log_files(path);
            assert_eq!(files.len(), 1, "{files:?}");
            assert!(files[0].1 <= 1 << 20, "log above its limit: {files:?}");
            // Podman's inspect leaves CgroupPermissions empty: read the OCI config.
            let id = v["Id"].as_str().expect("id");
            let config = svc
                .root
                .join("overlay-containers")
                .join(id)
                .join("userdata/config.json");
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&config).expect("read config.json"))
                    .expect("config.json");
            let rules = &config["linux"]["resources"]["devices"];
            assert!(
                rules
                    .as_array()
                    .is_some_and(|r| r.iter().any(|d| d["allow"] == true
                        && d["major"] == 1
                        && d["minor"] == 5
                        && d["access"] == "r")),
                "device rule: {rules}"
            );
        },
    )
    .await;
}
