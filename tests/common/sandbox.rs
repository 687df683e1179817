//! Sandbox test nodes: each node is a network namespace with its own data dir, all nodes of
//! a test process joined by one bridge, so tests run the real binary and real daemons as if
//! on separate hosts without touching the host's own network.
//!
//! ```text
//! netns cvg-hub-<pid>             br0 ── v<seq> ─┐ (veth)
//! netns cvg-<name>-<pid>-<seq>    eth0 10.231.0.<idx>/24, fd00:231::<idx>/64 ──┘
//! ```
//!
//! Nothing is configured in the root network namespace: both veth ends are created directly
//! in their target namespaces. Dropping a node kills what it started and deletes its
//! namespace and data dir, also after a panic; leftovers of a killed test process (whose pid
//! is gone) are removed when the next process creates its first node.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

/// Where `ip netns` mounts named namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Name of the node's interface on the bridge.
pub const NODE_IFACE: &str = "eth0";
/// Prefix length of node addresses (all nodes share 10.231.0.0/24).
pub const PREFIX_LEN: u8 = 24;
const NAME_PREFIX: &str = "cvg-";
const BRIDGE: &str = "br0";

/// Per-process bridge bookkeeping. The hub namespace lives while at least one node does.
struct Hub {
    nodes: usize,
    used: BTreeSet<u8>,
    next: u8,
}

static HUB: Mutex<Hub> = Mutex::new(Hub {
    nodes: 0,
    used: BTreeSet::new(),
    next: 2,
});
/// Makes namespace, veth and data dir names unique within the process.
static NEXT_SEQ: AtomicU32 = AtomicU32::new(1);
static STALE_CLEANUP: Once = Once::new();

fn hub() -> MutexGuard<'static, Hub> {
    // A panic while holding the lock must not wedge every later test.
    HUB.lock().unwrap_or_else(|e| e.into_inner())
}

fn hub_netns() -> String {
    format!("{NAME_PREFIX}hub-{}", std::process::id())
}

/// The `converge` binary built by cargo for this test run, or `$CONVERGE_TEST_BIN` (a
/// long run pins its build while the tree is rebuilt).
pub fn converge_bin() -> PathBuf {
    std::env::var_os("CONVERGE_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_converge")))
}

/// Panics unless `name` is an executable on PATH: tests never skip silently.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            fs::metadata(dir.join(name))
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
    });
    assert!(
        found,
        "missing tool {name}: run ./tests/run.sh which installs it"
    );
}

/// Whether `pid` is a live process (zombies count as gone).
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ") ".
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Polls `cond` every 5 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sigkill_and_wait(pid: u32) {
    if pid == 0 || pid == std::process::id() {
        return;
    }
    // SAFETY: plain syscall; a stale pid at worst yields ESRCH.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True if `pid` is a child of this process that nobody has reaped yet (so the pid cannot
/// have been reused), without reaping it.
fn unreaped_child(pid: u32) -> bool {
    // SAFETY: siginfo_t is plain data; waitid only writes into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: valid pointer to a local siginfo_t.
    unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) == 0 }
}

fn run_quiet(cmd: &mut Command) -> io::Result<Output> {
    cmd.stdin(Stdio::null()).output()
}

/// Runs a setup command and panics with its stderr if it fails.
fn must(cmd: &mut Command) -> String {
    let out = run_quiet(cmd).unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn in_ns(netns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={NETNS_DIR}/{netns}"))
        .arg("--")
        .arg(program);
    cmd
}

fn ip(args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    cmd
}

/// Kills every process whose network namespace is `netns`, then deletes the namespace.
fn destroy_netns(netns: &str) {
    if let Ok(out) = run_quiet(&mut ip(&["netns", "pids", netns])) {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
        {
            sigkill_and_wait(pid);
        }
    }
    if Path::new(NETNS_DIR).join(netns).exists() {
        match run_quiet(&mut ip(&["netns", "del", netns])) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "sandbox: ip netns del {netns}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("sandbox: ip netns del {netns}: {e}"),
        }
    }
}

/// Detaches every mount at or below `dir` (podman leaves overlay and shm mounts; dockerd
/// bind-mounts its data root onto itself), deepest first, so the directory can be removed.
pub fn unmount_below(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The pid encoded in a name made by this module (`cvg-hub-<pid>`, `cvg-<name>-<pid>-<seq>`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let parts: Vec<&str> = rest.split('-').collect();
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        ["hub", pid] if numeric(pid) => pid.parse().ok(),
        [.., pid, seq] if parts.len() >= 3 && numeric(pid) && numeric(seq) => pid.parse().ok(),
        _ => None,
    }
}

fn process_exists(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes namespaces and data dirs left by test processes that no longer exist.
fn cleanup_stale() {
    let me = std::process::id();
    let stale = |name: &str| owner_pid(name).is_some_and(|pid| pid != me && !process_exists(pid));
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                eprintln!("sandbox: removing stale namespace {name}");
                destroy_netns(&name);
            }
        }
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // Data dirs are `cvg-<name>-<pid>-<seq>.<random>`.
            let Some((base, _)) = name.split_once('.') else {
                continue;
            };
            if stale(base) {
                let path = e.path();
                unmount_below(&path);
                let _ = fs::remove_dir_all(&path);
            }
        }
    }
}

/// Runs `f` on a fresh thread joined to the network namespace at `path`.
fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> T {
    let ns = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    std::thread::scope(|s| {
        let handle = s.spawn(move || {
            // SAFETY: ns is an open namespace fd for the duration of the call.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert!(
                rc == 0,
                "setns {}: {}",
                path.display(),
                io::Error::last_os_error()
            );
            drop(ns);
            f()
        });
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A host behind a [`TestNode`] (see [`TestNode::backend`]); removed on drop.
pub struct Backend {
    netns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Backend {
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&Path::new(NETNS_DIR).join(&self.netns), f)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = run_quiet(&mut ip(&["netns", "del", &self.netns]));
    }
}

/// One simulated host: a network namespace on the shared bridge plus a private data dir.
pub struct TestNode {
    name: String,
    netns: String,
    index: u8,
    hub_veth: String,
    children: Mutex<Vec<u32>>,
    pidfiles: Mutex<Vec<PathBuf>>,
    data: tempfile::TempDir,
}

impl TestNode {
    /// Creates node `name` (lowercase letters, digits, `-`; ≤ 16 chars). Panics if not root or a
    /// needed tool is missing.
    pub fn new(name: &str) -> TestNode {
        // SAFETY: trivial syscall.
        let euid = unsafe { libc::geteuid() };
        assert!(
            euid == 0,
            "TestNode needs root (network namespaces): run ./tests/run.sh as root"
        );
        require_tool("ip");
        require_tool("nsenter");
        assert!(
            !name.is_empty()
                && name.len() <= 16
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "node name {name:?} must be 1-16 chars of [a-z0-9-]"
        );
        STALE_CLEANUP.call_once(cleanup_stale);

        let pid = std::process::id();
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        let netns = format!("{NAME_PREFIX}{name}-{pid}-{seq}");
        let data = tempfile::Builder::new()
            .prefix(&format!("{netns}."))
            .tempdir()
            .expect("create node data dir");
        // Daemons that drop privileges must still reach their files below it.
        fs::set_permissions(data.path(), fs::Permissions::from_mode(0o755))
            .expect("chmod node data dir");

        let index = {
            let mut hub = hub();
            assert!(
                hub.used.len() < 253,
                "more than 253 live test nodes in one process"
            );
            if hub.nodes == 0 {
                create_hub();
            }
            // Round-robin, so a fresh node rarely inherits a just-freed address that
            // peers may still have in their neighbour cache.
            let mut index = hub.next;
            while hub.used.contains(&index) {
                index = if index >= 254 { 2 } else { index + 1 };
            }
            hub.next = if index >= 254 { 2 } else { index + 1 };
            hub.used.insert(index);
            hub.nodes += 1;
            index
        };

        // From here on Drop undoes whatever part of the setup succeeded.
        let node = TestNode {
            name: name.to_owned(),
            netns,
            index,
            hub_veth: format!("v{seq}"),
            children: Mutex::new(Vec::new()),
            pidfiles: Mutex::new(Vec::new()),
            data,
        };
        node.setup();
        node
    }

    fn setup(&self) {
        let hub = hub_netns();
        must(&mut ip(&["netns", "add", &self.netns]));
        veth_pair((NODE_IFACE, &self.netns), (&self.hub_veth, &hub));
        let addr = format!("{}/{PREFIX_LEN}", self.address());
        let addr6 = format!("{}/64", self.address6());
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", &addr, "dev", NODE_IFACE],
            &["-6", "addr", "add", &addr6, "dev", NODE_IFACE, "nodad"],
            &["link", "set", NODE_IFACE, "up"],
        ] {
            must(in_ns(&self.netns, "ip").args(args));
        }
        must(in_ns(&hub, "ip").args(["link", "set", &self.hub_veth, "master", BRIDGE, "up"]));
    }

    /// The name given to [`TestNode::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Name of the network namespace (`ip netns` name).
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// `/run/netns/<name>`, for `nsenter --net=` or `setns`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// The node's address on the bridge (10.231.0.2 ..= 10.231.0.254).
    pub fn address(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, 0, self.index)
    }

    /// The node's IPv6 address on the bridge (fd00:231::2 ..= fd00:231::fe).
    pub fn address6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x231, 0, 0, 0, 0, 0, u16::from(self.index))
    }

    /// The node's interface on the bridge, inside its namespace.
    pub fn iface(&self) -> &str {
        NODE_IFACE
    }

    /// Private directory for this node, removed on drop.
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// `--root` for podman on this node (created on first call).
    pub fn podman_root(&self) -> PathBuf {
        self.subdir("podman/root")
    }

    /// `--runroot` for podman on this node (created on first call).
    pub fn podman_runroot(&self) -> PathBuf {
        self.subdir("podman/run")
    }

    fn subdir(&self, rel: &str) -> PathBuf {
        let dir = self.data_dir().join(rel);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        dir
    }

    /// A command that runs `program` inside the node's network namespace. `nsenter --net`
    /// (unlike `ip netns exec`) leaves /sys and cgroups alone, which runc needs.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        in_ns(&self.netns, program)
    }

    /// Spawns `cmd` (usually from [`TestNode::command`]); the child is SIGKILLed and reaped
    /// when the node drops unless the caller has reaped it first.
    pub fn spawn(&self, cmd: &mut Command) -> Spawned {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("node {}: cannot spawn {cmd:?}: {e}", self.name));
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Spawned(child)
    }

    /// Runs `program args…` in the namespace and returns its output, whatever the status.
    pub fn run<I, S>(&self, program: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        run_quiet(&mut cmd)
            .unwrap_or_else(|e| panic!("node {}: cannot run {cmd:?}: {e}", self.name))
    }

    /// Runs `program args…` in the namespace, asserts success and returns stdout; panics with
    /// stderr otherwise.
    pub fn run_ok<I, S>(&self, program: &str, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        must(&mut cmd)
    }

    /// Runs `f` on a fresh thread that has joined the node's network namespace (setns is
    /// per thread); sockets created there keep that namespace after `f` returns.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.netns_path(), f)
    }

    /// A host routed behind this node: its own namespace, linked to this one by a veth
    /// pair (`10.251.<n>.1/30` + `fd00:251:<n>::1/64` on this side, `.2`/`::2` there),
    /// default routes via this node, forwarding enabled here. Like a container network.
    pub fn backend(&self, n: u8) -> Backend {
        let netns = format!("{NAME_PREFIX}back{n}-{}-{}", std::process::id(), self.index);
        let here = format!("bk{n}");
        must(&mut ip(&["netns", "add", &netns]));
        let backend = Backend {
            netns: netns.clone(),
            v4: Ipv4Addr::new(10, 251, n, 2),
            v6: format!("fd00:251:{n}::2").parse().expect("v6 literal"),
        };
        veth_pair((&here, &self.netns), ("eth0", &netns));
        let v4_here = format!("10.251.{n}.1/30");
        let v6_here = format!("fd00:251:{n}::1/64");
        for args in [
            &["addr", "add", &v4_here, "dev", &here][..],
            &["-6", "addr", "add", &v6_here, "dev", &here, "nodad"],
            &["link", "set", &here, "up"],
        ] {
            must(in_ns(&self.netns, "ip").args(args));
        }
        let v4_there = format!("{}/30", backend.v4);
        let v6_there = format!("{}/64", backend.v6);
        let gw6 = format!("fd00:251:{n}::1");
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", &v4_there, "dev", "eth0"],
            &["-6", "addr", "add", &v6_there, "dev", "eth0", "nodad"],
            &["link", "set", "eth0", "up"],
            &["route", "add", "default", "via", &format!("10.251.{n}.1")],
            &["-6", "route", "add", "default", "via", &gw6],
        ] {
            must(in_ns(&netns, "ip").args(args));
        }
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            must(in_ns(&self.netns, "sysctl").args(["-qw", key]));
        }
        backend
    }

    /// SIGKILLs the pid in `path` (for self-daemonizing programs like dnsmasq) and waits
    /// until it is gone. Returns false if there was no such file or process.
    pub fn kill_pidfile(&self, path: impl AsRef<Path>) -> bool {
        let pid = fs::read_to_string(path.as_ref())
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        match pid {
            Some(pid) if pid_alive(pid) => {
                sigkill_and_wait(pid);
                true
            }
            _ => false,
        }
    }

    /// Makes drop kill the pid found in `path` at that time (the file may not exist yet).
    pub fn track_pidfile(&self, path: impl Into<PathBuf>) {
        self.pidfiles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.into());
    }
}

/// A child started by [`TestNode::spawn`]; derefs to [`std::process::Child`]. The node owns
/// its lifetime, so unlike a bare `Child` it needs no `wait()` (which clippy's
/// `zombie_processes` lint would otherwise demand at every call site).
pub struct Spawned(Child);

impl Spawned {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// A veth pair with each end created directly in its namespace: `(name, netns)`.
fn veth_pair(a: (&str, &str), b: (&str, &str)) {
    must(&mut ip(&[
        "link", "add", a.0, "netns", a.1, "type", "veth", "peer", "name", b.0, "netns", b.1,
    ]));
}

fn create_hub() {
    let hub = hub_netns();
    // A previous hub of this process may have survived a panic half-way through setup.
    destroy_netns(&hub);
    must(&mut ip(&["netns", "add", &hub]));
    for args in [
        &["link", "set", "lo", "up"][..],
        &["link", "add", BRIDGE, "type", "bridge"],
        &["link", "set", BRIDGE, "up"],
    ] {
        must(in_ns(&hub, "ip").args(args));
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for pid in children {
            if unreaped_child(pid) {
                sigkill_and_wait(pid);
                let mut status = 0;
                // SAFETY: pid is our unreaped child.
                unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
            }
        }
        let pidfiles =
            std::mem::take(&mut *self.pidfiles.lock().unwrap_or_else(|e| e.into_inner()));
        for path in pidfiles {
            self.kill_pidfile(path);
        }
        // Anything else still running in the namespace (daemons spawned by daemons) goes too.
        destroy_netns(&self.netns);
        unmount_below(self.data.path());

        let mut hub = hub();
        hub.used.remove(&self.index);
        hub.nodes -= 1;
        if hub.nodes == 0 {
            destroy_netns(&hub_netns());
        }
    }
}
