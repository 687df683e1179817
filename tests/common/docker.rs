//! A real dockerd per sandbox test node: its own socket, data root, exec root (and so its
//! own supervised containerd), running in the node's network namespace so its bridge,
//! iptables rules and published ports stay inside that node. Torn down on drop (also
//! after a panic): containers removed, daemon stopped, mounts below the node's data dir
//! detached.
//!
//! Always uses `/usr/bin/docker` (Debian's client, matching Debian's dockerd 20.10): the
//! machine image's newer `/usr/local/bin/docker` may not speak API 1.41.

use super::runtime::import_busybox;
use super::sandbox::{pid_alive, require_tool, unmount_below, Spawned, TestNode};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Debian's docker CLI.
pub const DOCKER_CLI: &str = "/usr/bin/docker";
/// The busybox image imported into every test daemon.
pub use super::runtime::TEST_IMAGE;
/// Applets linked in the test image's `/bin`.
/// A running dockerd started by [`start_docker`].
pub struct DockerDaemon {
    /// API socket (`<data>/docker.sock`).
    pub socket: PathBuf,
    pub data_root: PathBuf,
    pub exec_root: PathBuf,
    pub pidfile: PathBuf,
    /// dockerd's stdout+stderr (also containerd's, which it supervises).
    pub log: PathBuf,
    child: Option<Spawned>,
}

impl DockerDaemon {
    /// `unix://<socket>`, for `docker -H`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The last lines of the daemon log, for assertion messages.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Removes every container of this daemon (force, so running ones are killed).
    pub fn remove_all_containers(&self) {
        let Some(out) = cli_with_timeout(self, &["ps", "-aq"], Duration::from_secs(20)) else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if ids.is_empty() {
            return;
        }
        let mut args = vec!["rm", "-f"];
        args.extend(ids.iter().map(String::as_str));
        if let Some(out) = cli_with_timeout(self, &args, Duration::from_secs(60)) {
            if !out.status.success() {
                eprintln!(
                    "docker helper: rm -f failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }
}

/// Runs the CLI against `daemon` outside any namespace (a unix socket needs none),
/// killing it after `timeout` so a wedged daemon cannot hang a teardown.
fn cli_with_timeout(daemon: &DockerDaemon, args: &[&str], timeout: Duration) -> Option<Output> {
    let mut child = Command::new(DOCKER_CLI)
        .arg("-H")
        .arg(daemon.host())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    // Read the pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take()?;
    let mut stderr = child.stderr.take()?;
    let out_t = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_t = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                eprintln!("docker helper: docker {args:?} timed out; killing it");
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    Some(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

/// Runs `docker -H <daemon> args…` inside the node's namespace; any exit status.
pub fn docker(node: &TestNode, daemon: &DockerDaemon, args: &[&str]) -> Output {
    node.command(DOCKER_CLI)
        .arg("-H")
        .arg(daemon.host())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker {args:?}: {e}"))
}

/// Like [`docker`], but asserts success and returns trimmed stdout.
pub fn docker_ok(node: &TestNode, daemon: &DockerDaemon, args: &[&str]) -> String {
    let out = docker(node, daemon, args);
    assert!(
        out.status.success(),
        "docker {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Starts dockerd in `node`'s namespace with everything below the node's data dir, waits
/// until it answers and imports [`TEST_IMAGE`]. Panics (with the daemon log) on failure.
pub fn start_docker(node: &TestNode) -> DockerDaemon {
    require_tool("dockerd");
    require_tool("containerd");
    require_tool("runc");
    assert!(
        Path::new(DOCKER_CLI).is_file(),
        "missing {DOCKER_CLI}: install docker.io (./tests/run.sh does)"
    );
    assert!(
        Path::new("/bin/busybox").is_file(),
        "missing /bin/busybox for the test image: install busybox-static"
    );

    let data = node.data_dir();
    let daemon_json = data.join("docker-daemon.json");
    // An empty config file keeps a host /etc/docker/daemon.json out of the test.
    fs::write(&daemon_json, "{}\n").expect("write docker-daemon.json");
    let log = data.join("dockerd.log");
    let log_file = fs::File::create(&log).expect("create dockerd.log");
    let log_err = log_file.try_clone().expect("clone dockerd.log handle");

    let mut daemon = DockerDaemon {
        socket: data.join("docker.sock"),
        data_root: data.join("docker"),
        exec_root: data.join("docker-exec"),
        pidfile: data.join("docker.pid"),
        log,
        child: None,
    };
    // The containerd namespaces only matter if a system containerd is running (dockerd
    // then uses it instead of starting its own): they keep two test daemons apart.
    let ns = format!("cvg-{}", node.netns_name());
    let mut cmd = node.command("dockerd");
    cmd.arg("--host")
        .arg(daemon.host())
        .arg("--data-root")
        .arg(&daemon.data_root)
        .arg("--exec-root")
        .arg(&daemon.exec_root)
        .arg("--pidfile")
        .arg(&daemon.pidfile)
        .arg("--config-file")
        .arg(&daemon_json)
        .arg("--containerd-namespace")
        .arg(&ns)
        .arg("--containerd-plugins-namespace")
        .arg(format!("{ns}-plugins"))
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    daemon.child = Some(node.spawn(&mut cmd));
    node.track_pidfile(&daemon.pidfile);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(child) = daemon.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("dockerd exited early ({status}):\n{}", daemon.log_tail());
            }
        }
        if daemon.socket.exists() {
            let out = cli_with_timeout(
                &daemon,
                &["info", "--format", "{{.ID}}"],
                Duration::from_secs(10),
            );
            if out.is_some_and(|o| o.status.success()) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "dockerd did not answer within 60 s:\n{}",
            daemon.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    import_busybox_image(node, &daemon);
    daemon
}

/// Builds a minimal busybox rootfs in the node's data dir and imports it.
fn import_busybox_image(node: &TestNode, daemon: &DockerDaemon) {
    let mut cmd = Command::new(DOCKER_CLI);
    cmd.args(["-H", &daemon.host(), "import", "-", TEST_IMAGE]);
    let out = import_busybox(&node.data_dir().join("busybox-rootfs"), cmd);
    assert!(
        out.status.success(),
        "importing {TEST_IMAGE} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log_tail()
    );
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain syscall on a pid we started (or read from our daemon's pid file).
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

impl Drop for DockerDaemon {
    fn drop(&mut self) {
        // Container processes live in their own namespaces: killing the node's namespace
        // would not reach them, so remove them through the daemon first.
        self.remove_all_containers();
        let containerd_pid = fs::read_to_string(self.exec_root.join("containerd/containerd.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            signal(pid, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Ok(None) => {
                        eprintln!("docker helper: dockerd ignored SIGTERM; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        // dockerd stops the containerd it supervises; after a SIGKILL it may not have.
        if let Some(pid) = containerd_pid.filter(|p| pid_alive(*p)) {
            // Only if the pid still is that containerd (not a reused pid).
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let exec_root = self.exec_root.as_os_str().as_encoded_bytes();
            if cmdline.windows(exec_root.len()).any(|w| w == exec_root) {
                signal(pid, libc::SIGKILL);
            }
        }
        unmount_below(&self.data_root);
        unmount_below(&self.exec_root);
    }
}
