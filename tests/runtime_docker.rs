//! The Docker driver against a real dockerd (one per test node, in the node's network
//! namespace), exercised only through the `ContainerRuntime` trait; the docker CLI is
//! used to set up foreign containers and to cross-check what the driver reports.

mod common;

use common::runtime::{
    expect_no_ping, expect_ping, labels, settle, simple_spec, wait_for, watch_events,
};

use common::docker::{docker, docker_ok, start_docker, DockerDaemon, TEST_IMAGE};
use common::sandbox::TestNode;
use converge_containers::docker::Docker;
use converge_containers::driver::{
    ContainerRuntime, CreateSpec, Health, HealthSpec, Mount, PortBinding, RunState,
};
use converge_containers::{ContainerPort, ContainerVolume, Protocol};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const HOST_PORT: u16 = 18080;

fn drain(rx: &mut mpsc::UnboundedReceiver<converge_core::HostEvent>) -> usize {
    let mut n = 0;
    while rx.try_recv().is_ok() {
        n += 1;
    }
    n
}

/// A plain HTTP/1.0 GET from inside the node's namespace; returns the body of a 200.
fn http_get(node: &TestNode, addr: SocketAddr, path: &str) -> String {
    node.in_netns(|| {
        let timeout = Duration::from_secs(5);
        let mut conn = TcpStream::connect_timeout(&addr, timeout)
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        conn.set_read_timeout(Some(timeout)).expect("read timeout");
        write!(conn, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").expect("send request");
        let mut response = String::new();
        conn.read_to_string(&mut response)
            .unwrap_or_else(|e| panic!("read from {addr}: {e}"));
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP response from {addr}: {response:?}"));
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        body.to_string()
    })
}

fn daemon_driver(daemon: &DockerDaemon) -> Docker {
    Docker::new(&daemon.socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_through_the_driver() {
    let node = TestNode::new("dkr-life");
    let daemon = start_docker(&node);
    let driver = daemon_driver(&daemon);
    assert_eq!(driver.kind(), "docker");
    driver.ping().await.expect("ping");

    // Bind-mount source served by httpd (read-only in the container).
    let www = node.data_dir().join("www");
    std::fs::create_dir_all(&www).expect("mkdir www");
    std::fs::write(www.join("index.html"), "hello-from-bind\n").expect("write index.html");
    let www_str = www.to_str().expect("utf-8 path").to_string();

    let spec = CreateSpec {
        name: "web".into(),
        image: TEST_IMAGE.into(),
        command: Some(vec!["httpd".into()]),
        args: Some(vec![
            "-f".into(),
            "-p".into(),
            "8080".into(),
            "-h".into(),
            "/srv".into(),
        ]),
        env: BTreeMap::from([
            ("GREETING".to_string(), "hi there".to_string()),
            ("MODE".to_string(), "test".to_string()),
        ]),
        ports: vec![ContainerPort {
            container_port: 8080,
            host_port: Some(HOST_PORT),
            protocol: Protocol::Tcp,
            host_ip: None,
        }],
        volumes: vec![
            ContainerVolume {
                source: "webdata".into(),
                target: "/data".into(),
                read_only: false,
            },
            ContainerVolume {
                source: www_str.clone(),
                target: "/srv".into(),
                read_only: true,
            },
        ],
        cpus: Some(0.5),
        memory: Some(64 << 20),
        pids: Some(64),
        health: Some(HealthSpec {
            command: vec!["sh".into(), "-c".into(), "true".into()],
            interval: Duration::from_millis(300),
            timeout: Duration::from_secs(2),
            start_period: Duration::ZERO,
            retries: 3,
        }),
        labels: labels(&node, "web"),
        network: None,
        ip: None,
        stop_grace: Duration::from_secs(2),
        settings: Default::default(),
    };

    let (mut events, events_task) = watch_events(&driver);

    let id = driver.create(&spec).await.expect("create");
    let created = driver.inspect(&id).await.expect("inspect").expect("exists");
    assert_eq!(created.state, RunState::Created);
    assert_eq!(created.exit_code, None);
    assert!(created.addresses.is_empty(), "{created:?}");

    driver.start(&id).await.expect("start");
    // Starting a running container is fine.
    driver.start(&id).await.expect("start again");

    let c = wait_for(&driver, &id, "healthy", Duration::from_secs(30), |c| {
        c.health == Some(Health::Healthy)
    })
    .await;
    assert_eq!(c.id, id);
    assert_eq!(c.name, "web");
    assert_eq!(c.state, RunState::Running);
    assert_eq!(c.exit_code, None);
    assert_eq!(c.image, TEST_IMAGE);
    let image_id = driver
        .image(TEST_IMAGE)
        .await
        .expect("image inspect")
        .expect("test image present")
        .id;
    assert!(image_id.starts_with("sha256:"), "{image_id}");
    assert_eq!(c.image_id, image_id);
    assert_eq!(c.labels, spec.labels);
    let v4: Vec<IpAddr> = c
        .addresses
        .iter()
        .copied()
        .filter(IpAddr::is_ipv4)
        .collect();
    assert_eq!(v4.len(), 1, "one bridge address: {:?}", c.addresses);
    let cli_ip = docker_ok(
        &node,
        &daemon,
        &[
            "inspect",
            "-f",
            "{{.NetworkSettings.Networks.bridge.IPAddress}}",
            &id,
        ],
    );
    assert_eq!(v4[0].to_string(), cli_ip);
    assert_eq!(
        c.ports,
        vec![PortBinding {
            protocol: "tcp".into(),
            container_port: 8080,
            host_ip: None,
            host_port: HOST_PORT,
        }]
    );
    assert_eq!(
        c.mounts,
        vec![
            Mount {
                source: www_str.clone(),
                target: "/srv".into(),
                read_only: true,
            },
            Mount {
                source: "webdata".into(),
                target: "/data".into(),
                read_only: false,
            },
        ]
    );
    assert_eq!(c.memory, Some(64 << 20));
    assert_eq!(c.pids_limit, Some(64));
    assert_eq!(
        docker_ok(&node, &daemon, &["inspect", "-f", "{{.HostConfig.NanoCpus}} {{.HostConfig.RestartPolicy.Name}} {{.Config.StopTimeout}}", &id]),
        "500000000 no 2"
    );

    // Env, volume (writable) and bind mount (read-only) as the container sees them.
    assert_eq!(
        docker_ok(
            &node,
            &daemon,
            &["exec", &id, "sh", "-c", "echo \"$GREETING/$MODE\""]
        ),
        "hi there/test"
    );
    docker_ok(
        &node,
        &daemon,
        &["exec", &id, "sh", "-c", "echo x > /data/probe"],
    );
    let ro = docker(
        &node,
        &daemon,
        &["exec", &id, "sh", "-c", "echo x > /srv/probe"],
    );
    assert!(!ro.status.success(), "bind mount must be read-only");

    // Traffic through the published port, from inside the node's namespace (DNAT on the
    // node address, userland proxy on loopback), and straight to the bridge address.
    let published = [
        SocketAddr::new(node.address().into(), HOST_PORT),
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), HOST_PORT),
        SocketAddr::new(v4[0], 8080),
    ];
    for addr in published {
        assert_eq!(
            http_get(&node, addr, "/index.html"),
            "hello-from-bind\n",
            "via {addr}"
        );
    }

    // Ownership: only converge-labelled containers of this node are listed.
    docker_ok(
        &node,
        &daemon,
        &[
            "run", "-d", "--name", "foreign", TEST_IMAGE, "sleep", "1000",
        ],
    );
    docker_ok(
        &node,
        &daemon,
        &[
            "create",
            "--name",
            "other-node",
            "--label",
            "converge.managed=true",
            "--label",
            "converge.node=someone-else",
            TEST_IMAGE,
            "sleep",
            "1000",
        ],
    );
    docker_ok(
        &node,
        &daemon,
        &[
            "create",
            "--name",
            "unmanaged",
            "--label",
            &format!("converge.node={}", node.name()),
            TEST_IMAGE,
            "true",
        ],
    );
    let listed = driver
        .list_managed(node.name())
        .await
        .expect("list_managed");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        listed[0],
        driver.inspect(&id).await.expect("inspect").expect("exists")
    );
    let other = driver
        .list_managed("someone-else")
        .await
        .expect("list other");
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].name, "other-node");
    assert_eq!(other[0].state, RunState::Created);
    assert!(driver
        .list_managed("nobody")
        .await
        .expect("list")
        .is_empty());

    // Events: a ping when the managed container dies; none for foreign containers.
    settle(&mut events, Duration::from_millis(700)).await;
    docker_ok(&node, &daemon, &["kill", "foreign"]);
    expect_no_ping(
        &mut events,
        Duration::from_secs(1),
        "a foreign container's death must not ping",
    )
    .await;
    docker_ok(&node, &daemon, &["kill", "web"]);
    expect_ping(
        &mut events,
        Duration::from_secs(10),
        "a ping after docker kill",
    )
    .await;
    let dead = wait_for(&driver, &id, "exited", Duration::from_secs(10), |c| {
        c.state == RunState::Exited
    })
    .await;
    assert_eq!(dead.exit_code, Some(137));
    assert!(
        dead.addresses.is_empty(),
        "stopped container has no address: {:?}",
        dead.addresses
    );
    // Published ports and limits are still reported while stopped.
    assert_eq!(dead.ports, c.ports);
    assert_eq!(dead.memory, c.memory);

    // Start again (pings), then stop with grace: httpd exits on SIGTERM at once.
    settle(&mut events, Duration::from_millis(300)).await;
    drain(&mut events);
    driver.start(&id).await.expect("restart");
    wait_for(&driver, &id, "running", Duration::from_secs(10), |c| {
        c.state == RunState::Running
    })
    .await;
    expect_ping(&mut events, Duration::from_secs(10), "a ping after start").await;
    driver
        .stop(&id, Duration::from_secs(5))
        .await
        .expect("stop");
    let stopped = driver.inspect(&id).await.expect("inspect").expect("exists");
    assert_eq!(stopped.state, RunState::Exited);
    // Stopping a stopped container is fine.
    driver
        .stop(&id, Duration::from_secs(1))
        .await
        .expect("stop again");

    driver.rename(&id, "web-old").await.expect("rename");
    let renamed = driver.inspect(&id).await.expect("inspect").expect("exists");
    assert_eq!(renamed.name, "web-old");
    assert_eq!(
        driver
            .inspect("web-old")
            .await
            .expect("by name")
            .map(|c| c.id),
        Some(id.clone())
    );

    driver.remove(&id).await.expect("remove");
    assert!(driver.inspect(&id).await.expect("inspect").is_none());
    driver.remove(&id).await.expect("remove again");
    assert!(driver
        .list_managed(node.name())
        .await
        .expect("list")
        .is_empty());

    // The named volume survives the container until asked for.
    let volumes = docker_ok(&node, &daemon, &["volume", "ls", "-q"]);
    assert!(volumes.lines().any(|v| v == "webdata"), "{volumes}");
    driver
        .remove_volume("webdata")
        .await
        .expect("remove_volume");
    let volumes = docker_ok(&node, &daemon, &["volume", "ls", "-q"]);
    assert!(!volumes.lines().any(|v| v == "webdata"), "{volumes}");
    driver
        .remove_volume("webdata")
        .await
        .expect("remove_volume again");

    events_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn already_in_state_missing_and_failures() {
    let node = TestNode::new("dkr-edge");
    let daemon = start_docker(&node);
    let driver = daemon_driver(&daemon);

    // Missing things.
    assert_eq!(
        driver
            .image("localhost/missing:1")
            .await
            .expect("image inspect"),
        None
    );
    assert!(driver
        .inspect("no-such-container")
        .await
        .expect("inspect")
        .is_none());
    driver
        .remove("no-such-container")
        .await
        .expect("remove missing");
    driver
        .stop("no-such-container", Duration::from_secs(1))
        .await
        .expect("stop missing");
    driver
        .remove_volume("no-such-volume")
        .await
        .expect("remove missing volume");
    let err = driver
        .rename("no-such-container", "x")
        .await
        .expect_err("rename missing");
    assert!(
        err.to_string()
            .starts_with("docker rename no-such-container:"),
        "{err}"
    );
    let err = driver
        .start("no-such-container")
        .await
        .expect_err("start missing");
    assert!(
        err.to_string()
            .starts_with("docker start no-such-container:"),
        "{err}"
    );

    // A pull that cannot succeed fails, and fast (a registry port nobody listens on,
    // inside the node's namespace).
    let started = Instant::now();
    let pulled = tokio::time::timeout(
        Duration::from_secs(60),
        driver.pull("127.0.0.1:1/converge/missing:1", None, &Default::default()),
    )
    .await
    .expect("pull must not hang");
    let err = pulled.expect_err("pull of a missing image");
    assert!(
        err.to_string()
            .starts_with("docker pull 127.0.0.1:1/converge/missing:1:"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        driver
            .image("127.0.0.1:1/converge/missing:1")
            .await
            .expect("image inspect"),
        None
    );

    // Creating from a missing image fails (the reconciler pulls first).
    let mut spec = simple_spec(&node, "noimage", &["true"]);
    spec.image = "localhost/missing:1".into();
    let err = driver
        .create(&spec)
        .await
        .expect_err("create from a missing image");
    assert!(
        err.to_string().starts_with("docker create noimage:"),
        "{err}"
    );

    // Idempotent start/stop/remove on a real container.
    let spec = simple_spec(&node, "idle", &["sleep", "1000"]);
    let id = driver.create(&spec).await.expect("create");
    let dup = driver.create(&spec).await.expect_err("duplicate name");
    assert!(dup.to_string().contains("docker create idle:"), "{dup}");
    // Stopping a never-started container is fine.
    driver
        .stop(&id, Duration::from_secs(1))
        .await
        .expect("stop created");
    driver.start(&id).await.expect("start");
    driver.start(&id).await.expect("start running");
    let c = driver.inspect(&id).await.expect("inspect").expect("exists");
    assert_eq!(c.state, RunState::Running);
    assert_eq!(c.health, None);
    assert!(c.ports.is_empty() && c.mounts.is_empty());
    assert_eq!((c.memory, c.pids_limit), (None, None));

    // Grace: `sleep` as pid 1 ignores SIGTERM, so stop waits out the grace, then kills.
    let t0 = Instant::now();
    driver
        .stop(&id, Duration::from_secs(1))
        .await
        .expect("stop");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(15),
        "stop took {took:?}"
    );
    let c = driver.inspect(&id).await.expect("inspect").expect("exists");
    assert_eq!((c.state, c.exit_code), (RunState::Exited, Some(137)));
    driver
        .stop(&id, Duration::from_secs(1))
        .await
        .expect("stop stopped");

    // Remove force-kills a running container.
    driver.start(&id).await.expect("start");
    driver.remove(&id).await.expect("remove running");
    assert!(driver.inspect(&id).await.expect("inspect").is_none());
    driver.remove(&id).await.expect("remove removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_daemon_fails_calls_and_events_keep_waiting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = Docker::new(dir.path().join("docker.sock"));
    let err = driver.list_managed("n").await.expect_err("no daemon");
    assert!(err.to_string().starts_with("docker connect "), "{err}");
    // The event stream neither ends nor pings while there is nothing to connect to.
    let mut events = driver.events();
    assert!(tokio::time::timeout(Duration::from_secs(3), events.next())
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_resubscribe_after_daemon_restart() {
    let node = TestNode::new("dkr-evts");
    let mut daemon = start_docker(&node);
    let driver = daemon_driver(&daemon);
    let (mut events, events_task) = watch_events(&driver);

    let id = driver
        .create(&simple_spec(&node, "blip", &["sleep", "1000"]))
        .await
        .expect("create");
    expect_ping(&mut events, Duration::from_secs(10), "a ping after create").await;

    // Restart the daemon: the stream must come back by itself and ping once it does
    // (events while it was down are lost).
    drop(daemon);
    settle(&mut events, Duration::from_millis(500)).await;
    daemon = start_docker(&node);
    expect_ping(
        &mut events,
        Duration::from_secs(15),
        "a resync ping after the daemon came back",
    )
    .await;
    settle(&mut events, Duration::from_millis(1500)).await;
    drain(&mut events);

    // Same driver, new daemon: calls work again and new events arrive.
    let id2 = driver
        .create(&simple_spec(&node, "blip2", &["sleep", "1000"]))
        .await
        .expect("create after restart");
    assert_ne!(id, id2);
    driver.start(&id2).await.expect("start");
    expect_ping(
        &mut events,
        Duration::from_secs(10),
        "a ping after start on the new daemon",
    )
    .await;

    events_task.abort();
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_through_the_driver() {
    let node = TestNode::new("dkr-net");
    let daemon = start_docker(&node);
    let driver = daemon_driver(&daemon);
    common::runtime::network_contract(
        &driver,
        &node,
        |net, name| {
            docker_ok(
                &node,
                &daemon,
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
            docker_ok(&node, &daemon, &["rm", "-f", name]);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_container_setting_takes_effect() {
    let node = TestNode::new("dkr-set");
    let daemon = start_docker(&node);
    let driver = daemon_driver(&daemon);
    common::runtime::settings_contract(
        &driver,
        &node,
        |args| {
            let mut all = vec!["exec"];
            all.extend_from_slice(args);
            let out = docker(&node, &daemon, &all);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        },
        |name| {
            let out = docker_ok(&node, &daemon, &["inspect", name]);
            let v: serde_json::Value = serde_json::from_str(&out).expect("inspect JSON");
            v[0].clone()
        },
        |v| {
            // json-file rotated at 1 MiB, two files kept.
            let log = &v["HostConfig"]["LogConfig"];
            assert_eq!(log["Type"], "json-file", "{log}");
            assert_eq!(log["Config"]["max-size"], "1048576", "{log}");
            assert_eq!(log["Config"]["max-file"], "2", "{log}");
            let files = common::runtime::log_files(v["LogPath"].as_str().expect("LogPath"));
            assert_eq!(files.len(), 2, "{files:?}");
            // Rotated once a write crosses the limit: at most a line above it.
            let limit = (1 << 20) + 4096;
            assert!(files.iter().all(|(_, size)| *size <= limit), "{files:?}");
            let devices = &v["HostConfig"]["Devices"];
            assert_eq!(devices[0]["CgroupPermissions"], "r", "{devices}");
        },
    )
    .await;
}
