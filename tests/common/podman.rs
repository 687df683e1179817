//! A real Podman API service per sandbox test node: its own `--root`, `--runroot` and
//! tmp dir (so its event log too) below the node's data dir, running in the node's
//! network namespace so the CNI bridge, its firewall rules and published ports stay
//! inside that node. The busybox test image is imported as [`TEST_IMAGE`]. Torn down on
//! drop (also after a panic): containers removed, service stopped, mounts below the
//! node's data dir detached (podman leaves overlay and shm mounts behind).

use super::runtime::import_busybox;
use super::sandbox::{require_tool, Spawned, TestNode};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The busybox image imported into every test service.
pub use super::runtime::TEST_IMAGE;
/// Applets linked in the test image's `/bin`.
/// A running `podman system service` started by [`start_podman`].
pub struct PodmanService {
    /// libpod API socket (`<data>/podman.sock`).
    pub socket: PathBuf,
    pub root: PathBuf,
    pub runroot: PathBuf,
    /// libpod tmp dir (events log, exit files); recorded in the root's database, so
    /// later CLI calls with only `--root`/`--runroot` use it too.
    pub tmpdir: PathBuf,
    /// The service's stdout+stderr.
    pub log: PathBuf,
    /// The node's network namespace path, for CLI calls during teardown.
    netns: PathBuf,
    child: Option<Spawned>,
}

impl PodmanService {
    /// `--root R --runroot RR --tmpdir T`, for the podman CLI.
    pub fn global_args(&self) -> Vec<String> {
        global_args(&self.root, &self.runroot, &self.tmpdir)
    }

    /// The last lines of the service log, for assertion messages.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Removes every container of this service (force, so running ones are killed).
    pub fn remove_all_containers(&self) {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .arg("--")
            .arg("podman")
            .args(self.global_args())
            .args(["rm", "-af", "-t", "0"]);
        match output_with_timeout(&mut cmd, Duration::from_secs(60)) {
            Some(out) if !out.status.success() => eprintln!(
                "podman helper: rm -af failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Some(_) => {}
            None => eprintln!("podman helper: rm -af timed out"),
        }
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        // Containers first, while the service and the namespace still exist, so the
        // network plugins can release their addresses.
        self.remove_all_containers();
        self.kill_service();
        // Anything left (conmon of a container rm could not remove) dies with the node's
        // namespace; the node's drop detaches the mounts below its data dir.
    }
}

/// The node's own storage, run and tmp dirs, and its own network config dir: network
/// definitions (CNI or netavark) are host-global by default (`/etc/cni/net.d`), and
/// a network one test node creates must not exist for another.
fn global_args(root: &Path, runroot: &Path, tmpdir: &Path) -> Vec<String> {
    vec![
        "--root".into(),
        root.display().to_string(),
        "--runroot".into(),
        runroot.display().to_string(),
        "--tmpdir".into(),
        tmpdir.display().to_string(),
        "--network-config-dir".into(),
        root.with_file_name("networks").display().to_string(),
    ]
}

/// Runs `cmd` with stdin closed, killing it after `timeout` (None then).
fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Option<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().ok(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Starts the libpod API service inside `node`, waits until it answers and imports the
/// busybox test image. Panics (never skips) if podman, runc or busybox are missing.
pub fn start_podman(node: &TestNode) -> PodmanService {
    require_tool("podman");
    require_tool("runc");
    require_tool("busybox");
    let conf = fs::read_to_string("/etc/containers/containers.conf").unwrap_or_default();
    assert!(
        conf.contains("runtime = \"runc\""),
        "/etc/containers/containers.conf must select runc: run install/deps.sh"
    );

    release_stale_cni_reservations();
    let base = node.data_dir().join("podman");
    let tmpdir = base.join("tmp");
    fs::create_dir_all(&tmpdir).expect("create podman tmp dir");
    fs::create_dir_all(node.podman_root().with_file_name("networks"))
        .expect("create podman network config dir");
    let svc = PodmanService {
        socket: node.data_dir().join("podman.sock"),
        root: node.podman_root(),
        runroot: node.podman_runroot(),
        tmpdir,
        log: base.join("service.log"),
        netns: node.netns_path(),
        child: None,
    };

    // The import is the first podman call on this root: it records the tmp dir in the
    // root's database before the service opens it.
    import_test_image(node, &svc);

    let mut svc = svc;
    svc.spawn_service(node);
    svc
}

impl PodmanService {
    /// Stops the API service (SIGKILL; containers keep running under conmon) and starts
    /// it again on the same storage, for reconnect tests.
    pub fn restart(&mut self, node: &TestNode) {
        self.kill_service();
        self.spawn_service(node);
    }

    fn kill_service(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(&self.socket);
    }

    /// Starts `podman system service` in the node (log appended) and waits for its ping.
    fn spawn_service(&mut self, node: &TestNode) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open podman service log");
        let mut cmd = node.command("podman");
        cmd.args(self.global_args())
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", self.socket.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log);
        self.child = Some(node.spawn(&mut cmd));

        let started = Instant::now();
        while !ping(&self.socket) {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("podman service exited ({status}):\n{}", self.log_tail());
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "podman service did not answer on {} within 30 s:\n{}",
                self.socket.display(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether the service answers `GET /_ping` on `socket`.
fn ping(socket: &Path) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf.starts_with(b"HTTP/1.") && buf.windows(6).any(|w| w == b" 200 O")
}

/// Builds a busybox rootfs and imports it as [`TEST_IMAGE`].
fn import_test_image(node: &TestNode, svc: &PodmanService) {
    let mut cmd = node.command("podman");
    cmd.args(svc.global_args())
        .args(["import", "-q", "-", TEST_IMAGE]);
    let out = import_busybox(&node.data_dir().join("podman/rootfs"), cmd);
    assert!(
        out.status.success(),
        "podman import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the podman CLI against `svc`'s storage inside `node` (for test assertions and
/// foreign containers); returns its output whatever the status.
pub fn podman(node: &TestNode, svc: &PodmanService, args: &[&str]) -> Output {
    let mut cmd = node.command("podman");
    cmd.args(svc.global_args()).args(args).stdin(Stdio::null());
    cmd.output()
        .unwrap_or_else(|e| panic!("run podman {args:?}: {e}"))
}

/// Like [`podman`], asserting success; returns trimmed stdout.
pub fn podman_ok(node: &TestNode, svc: &PodmanService, args: &[&str]) -> String {
    let out = podman(node, svc, args);
    assert!(
        out.status.success(),
        "podman {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Deletes CNI address reservations (`/var/lib/cni/networks/<net>/<ip>`, host-wide and
/// keyed only by network name) that no running container holds: a test run killed
/// before its teardown leaves them behind, and a later run's container asking for the
/// same fixed address on a network of the same name then fails to start. A reservation
/// is stale when no process (conmon names its container) mentions its container id and
/// it is over a minute old, so a container starting right now keeps its own.
fn release_stale_cni_reservations() {
    let Ok(networks) = fs::read_dir("/var/lib/cni/networks") else {
        return;
    };
    let cmdlines: Vec<String> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|p| fs::read(p.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .collect();
    let reservations = networks
        .flatten()
        .filter_map(|n| fs::read_dir(n.path()).ok())
        .flatten()
        .flatten()
        .filter(|f| {
            f.file_name()
                .to_string_lossy()
                .parse::<std::net::IpAddr>()
                .is_ok()
        });
    for file in reservations {
        let path = file.path();
        let old = file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(60));
        let id = fs::read_to_string(&path).unwrap_or_default();
        let id = id.lines().next().unwrap_or_default().trim();
        if old && id.len() == 64 && !cmdlines.iter().any(|c| c.contains(id)) {
            let _ = fs::remove_file(&path);
        }
    }
}
