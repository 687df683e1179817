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
use std::path::{Path, PathBuf};
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
        settings: Default::default(),
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

/// Lines of output the surface container writes at start (about 1.6 MB with the log
/// driver's framing), so a 1 MiB log limit must rotate or truncate.
const LOG_LINES: u32 = 25_000;

/// The settings half of the driver contract: a container created with every
/// [`ContainerSettings`] field set shows each one in effect, seen from inside (exec) and
/// in the runtime's own inspect. `exec(args)` runs the runtime CLI's `exec` with `args`
/// and returns trimmed stdout (None when it failed); `inspect(name)` returns the CLI's
/// inspect object. `runtime_checks(inspect)` checks what each runtime keeps its own
/// way: the log files on the host against the 1 MiB / 2 files rotation, and the device's
/// cgroup rule (read-only).
pub async fn settings_contract<R: ContainerRuntime>(
    driver: &R,
    node: &TestNode,
    exec: impl Fn(&[&str]) -> Option<String>,
    inspect: impl Fn(&str) -> serde_json::Value,
    runtime_checks: impl Fn(&serde_json::Value),
) {
    use converge_containers::driver::{
        ContainerSettings, LogSpec, RunState, StopSignal, TmpfsMount,
    };
    use converge_containers::{DeviceEntry, LogDriver};

    let name = "surface";
    let script = format!(
        "i=0; while [ $i -lt {LOG_LINES} ]; do echo 0123456789012345678901234567890123456789012345678901234567890123; i=$((i+1)); done; \
         trap 'exit 42' QUIT; echo ready; while true; do sleep 1; done"
    );
    let mut spec = simple_spec(node, name, &["-c", &script]);
    spec.command = Some(vec!["/bin/sh".into()]);
    spec.stop_grace = Duration::from_secs(10);
    spec.settings = ContainerSettings {
        user: Some("1000:100".into()),
        working_dir: Some("/srv/app".into()),
        hostname: Some("surface-1".into()),
        extra_hosts: vec![
            ("db.internal".into(), "10.0.0.5".parse().expect("ip")),
            ("v6.internal".into(), "fd00::5".parse().expect("ip")),
        ],
        cap_add: vec!["CAP_NET_ADMIN".into()],
        cap_drop: vec!["CAP_CHOWN".into()],
        read_only_rootfs: true,
        tmpfs: vec![TmpfsMount {
            target: "/run".into(),
            size: Some(8 << 20),
            mode: Some(0o1770),
        }],
        // Both: podman raises an unlisted nofile or nproc past this host's limit.
        ulimits: BTreeMap::from([
            ("nofile".to_string(), (512, 1024)),
            ("nproc".to_string(), (500, 1000)),
        ]),
        sysctls: BTreeMap::from([
            ("net.core.somaxconn".to_string(), "1000".to_string()),
            ("kernel.msgmax".to_string(), "12345".to_string()),
        ]),
        stop_signal: Some(StopSignal {
            name: "SIGQUIT".into(),
            number: 3,
        }),
        logging: Some(LogSpec {
            driver: LogDriver::JsonFile,
            max_size: Some(1 << 20),
            max_file: Some(2),
        }),
        devices: vec![DeviceEntry {
            host: "/dev/zero".into(),
            container: "/dev/zero2".into(),
            permissions: "r".into(),
        }],
        dns_servers: vec!["10.0.0.53".parse().expect("ip")],
        dns_search: vec!["svc.example".into()],
        dns_options: vec!["ndots:2".into()],
    };
    let id = driver
        .create(&spec)
        .await
        .expect("create with every setting");
    driver.start(&id).await.expect("start");
    wait_for(driver, &id, "running", Duration::from_secs(20), |c| {
        c.state == RunState::Running
    })
    .await;
    let sh = |user: Option<&str>, cmd: &str| -> Option<String> {
        let mut args: Vec<&str> = Vec::new();
        if let Some(u) = user {
            args.extend(["-u", u]);
        }
        args.extend([name, "sh", "-c", cmd]);
        exec(&args)
    };
    let ok = |user: Option<&str>, cmd: &str| -> String {
        sh(user, cmd).unwrap_or_else(|| panic!("exec {cmd:?} failed"))
    };

    // Inside the container.
    assert_eq!(
        ok(None, "busybox id -u; busybox id -g"),
        "1000\n100",
        "user"
    );
    assert_eq!(ok(None, "pwd"), "/srv/app", "workingDir");
    assert_eq!(ok(None, "busybox hostname"), "surface-1", "hostname");
    let hosts = ok(None, "cat /etc/hosts");
    for (ip, host) in [("10.0.0.5", "db.internal"), ("fd00::5", "v6.internal")] {
        assert!(
            hosts.lines().any(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some(ip) && w.any(|h| h == host)
            }),
            "extraHosts {host}: {hosts}"
        );
    }
    // On the default network both runtimes write the servers themselves.
    let resolv = ok(None, "cat /etc/resolv.conf");
    for want in [
        "nameserver 10.0.0.53",
        "search svc.example",
        "options ndots:2",
    ] {
        assert!(
            resolv.lines().any(|l| l.trim() == want),
            "dns {want:?}: {resolv}"
        );
    }
    let bounding = ok(None, "grep CapBnd /proc/self/status");
    let caps = u64::from_str_radix(
        bounding.split_whitespace().nth(1).expect("CapBnd value"),
        16,
    )
    .expect("hex caps");
    assert!(caps & (1 << 12) != 0, "capAdd NET_ADMIN: {bounding}");
    assert!(caps & 1 == 0, "capDrop CHOWN: {bounding}");
    // As root, so only the read-only root (not file permissions) can refuse.
    assert!(
        sh(Some("0"), "echo x > /probe").is_none(),
        "readOnlyRootfs: / is writable"
    );
    assert!(
        sh(Some("0"), "echo x > /run/probe && cat /run/probe").as_deref() == Some("x"),
        "tmpfs /run is not writable"
    );
    let mounts = ok(None, "cat /proc/mounts");
    let run = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/run"))
        .unwrap_or_else(|| panic!("no /run mount: {mounts}"));
    assert!(run.starts_with("tmpfs /run tmpfs "), "{run}");
    let opts: Vec<&str> = run
        .split_whitespace()
        .nth(3)
        .expect("mount options")
        .split(',')
        .collect();
    for want in ["rw", "noexec", "nosuid", "nodev", "size=8192k", "mode=1770"] {
        assert!(opts.contains(&want), "tmpfs option {want}: {run}");
    }
    // Podman's `--read-only` adds tmpfs on /tmp, /var/tmp and /run; through converge
    // neither runtime does.
    assert!(
        !mounts
            .lines()
            .any(|l| matches!(l.split_whitespace().nth(1), Some("/tmp" | "/var/tmp"))),
        "unexpected tmpfs: {mounts}"
    );
    // Of the container's process: an exec session gets the runtime's own limits.
    let limits = ok(None, "cat /proc/1/limits");
    for (row, soft, hard) in [
        ("Max open files", "512", "1024"),
        ("Max processes", "500", "1000"),
    ] {
        let line = limits
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("{row}: {limits}"));
        let words: Vec<&str> = line[row.len()..].split_whitespace().take(2).collect();
        assert_eq!(words, [soft, hard], "ulimits: {line}");
    }
    assert_eq!(
        ok(
            None,
            "cat /proc/sys/net/core/somaxconn /proc/sys/kernel/msgmax"
        ),
        "1000\n12345",
        "sysctls"
    );
    assert_eq!(
        ok(None, "busybox stat -c %t,%T /dev/zero2"),
        "1,5",
        "device /dev/zero as /dev/zero2"
    );
    assert_eq!(
        ok(Some("0"), "busybox head -c 3 /dev/zero2 | busybox wc -c"),
        "3",
        "device readable"
    );
    // Writing is not tried: device cgroup rules are not enforced on the test machines
    // (nested containers); `runtime_checks` looks at the rule the runtime set up.

    // In the runtime's inspect.
    let v = inspect(name);
    let config = &v["Config"];
    let host = &v["HostConfig"];
    assert_eq!(config["User"], "1000:100", "{config}");
    assert_eq!(config["WorkingDir"], "/srv/app");
    assert_eq!(config["Hostname"], "surface-1");
    // Podman 4 reports the entrypoint as one string.
    let entrypoint = &config["Entrypoint"];
    assert!(
        *entrypoint == serde_json::json!(["/bin/sh"]) || entrypoint == "/bin/sh",
        "Entrypoint {entrypoint}"
    );
    let stop = &config["StopSignal"];
    assert!(stop == "SIGQUIT" || stop == 3, "StopSignal {stop}");
    assert_eq!(host["ReadonlyRootfs"], true);
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    for h in ["db.internal:10.0.0.5", "v6.internal:fd00::5"] {
        assert!(
            strings(&host["ExtraHosts"]).iter().any(|e| e == h),
            "ExtraHosts {h}: {}",
            host["ExtraHosts"]
        );
    }
    assert!(
        strings(&host["CapAdd"]).contains(&"CAP_NET_ADMIN".to_string()),
        "{}",
        host["CapAdd"]
    );
    assert!(
        strings(&host["CapDrop"]).contains(&"CAP_CHOWN".to_string()),
        "{}",
        host["CapDrop"]
    );
    let ulimits = host["Ulimits"].as_array().cloned().unwrap_or_default();
    assert!(
        ulimits.iter().any(|u| {
            u["Name"].as_str().is_some_and(|n| {
                n.eq_ignore_ascii_case("nofile") || n.eq_ignore_ascii_case("RLIMIT_NOFILE")
            }) && u["Soft"] == 512
                && u["Hard"] == 1024
        }),
        "Ulimits {}",
        host["Ulimits"]
    );
    let devices = host["Devices"].as_array().cloned().unwrap_or_default();
    assert!(
        devices
            .iter()
            .any(|d| d["PathOnHost"] == "/dev/zero" && d["PathInContainer"] == "/dev/zero2"),
        "Devices {}",
        host["Devices"]
    );
    runtime_checks(&v);

    // The stop signal: the trap on SIGQUIT exits 42 (SIGTERM would not run it).
    driver
        .stop(&id, Duration::from_secs(10))
        .await
        .expect("stop");
    let stopped = wait_for(driver, &id, "exited", Duration::from_secs(15), |c| {
        c.state == RunState::Exited
    })
    .await;
    assert_eq!(stopped.exit_code, Some(42), "stopSignal SIGQUIT");
    driver.remove(&id).await.expect("remove");
}

/// The log files of a container on the host: the file at `path` and its rotated
/// siblings (`<path>.1`, …), with their sizes.
pub fn log_files(path: &str) -> Vec<(String, u64)> {
    let p = Path::new(path);
    let (Some(dir), Some(file)) = (p.parent(), p.file_name()) else {
        panic!("log path {path:?}");
    };
    let file = file.to_string_lossy().into_owned();
    let mut out: Vec<(String, u64)> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            (name == file || name.starts_with(&format!("{file}.")))
                .then(|| (name, e.metadata().map(|m| m.len()).unwrap_or(0)))
        })
        .collect();
    out.sort();
    out
}

/// A container runtime as a test drives it: its kind, the node it runs in, its API socket
/// and the CLI (with the per-node flags) for checks from outside the agent.
pub struct Runtime<'a> {
    pub kind: &'static str,
    pub node: &'a TestNode,
    pub socket: PathBuf,
    pub cli: Vec<String>,
}

impl<'a> Runtime<'a> {
    /// The Podman service `svc` of `node`, driven with the podman CLI on its storage.
    pub fn podman(node: &'a TestNode, svc: &super::podman::PodmanService) -> Runtime<'a> {
        Runtime {
            kind: "podman",
            node,
            socket: svc.socket.clone(),
            cli: std::iter::once("podman".to_string())
                .chain(svc.global_args())
                .collect(),
        }
    }

    /// The dockerd `daemon` of `node`, driven with Debian's docker CLI.
    pub fn docker(node: &'a TestNode, daemon: &super::docker::DockerDaemon) -> Runtime<'a> {
        Runtime {
            kind: "docker",
            node,
            socket: daemon.socket.clone(),
            cli: vec![super::docker::DOCKER_CLI.into(), "-H".into(), daemon.host()],
        }
    }
}

impl Runtime<'_> {
    /// `busybox nslookup NAME [SERVER]` inside `container`: the addresses it answered
    /// (busybox's own resolver reads resolv.conf, search domains included).
    pub fn nslookup(&self, container: &str, args: &[&str]) -> Vec<String> {
        let mut cmd = vec!["exec", container, "busybox", "timeout", "3", "nslookup"];
        cmd.extend_from_slice(args);
        let out = self.run(&cmd);
        let text = String::from_utf8_lossy(&out.stdout);
        // Answers follow the "Name:" line; the server's own address comes before it.
        text.split_once("Name:")
            .map(|(_, answers)| {
                answers
                    .lines()
                    .filter_map(|l| l.strip_prefix("Address:"))
                    .map(|a| a.trim().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The container's `/etc/resolv.conf`.
    pub fn resolv_conf(&self, container: &str) -> String {
        self.ok(&["exec", container, "cat", "/etc/resolv.conf"])
    }

    /// The container's address on its (one) network.
    pub fn ip(&self, name: &str) -> String {
        self.ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            name,
        ])
        .trim()
        .to_string()
    }

    /// The agent's flags for this runtime.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--runtime".into(),
            self.kind.into(),
            format!("--{}-socket", self.kind),
            self.socket.display().to_string(),
        ]
    }

    /// Runs the runtime's CLI in the node.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.node.command(&self.cli[0]);
        cmd.args(&self.cli[1..]).args(args);
        cmd.output().expect("run runtime cli")
    }

    /// Runs the CLI, asserts success, returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{} {args:?}: {}",
            self.kind,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
