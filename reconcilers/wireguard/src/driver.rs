//! The driver: every operation on the host the reconciler needs, as a trait, and the
//! real driver. WireGuard itself goes through wireguard-control (UAPI to wireguard-go,
//! or netlink to the kernel module), peer by peer; the interface's addresses, MTU, link
//! state and converge's routes go through rtnetlink ([`crate::rtnl`]); wireguard-go is
//! started as its own long-lived process and found again by its UAPI socket.
//!
//! Methods are synchronous. "Quick" ones are single netlink round trips bounded by the
//! socket timeout; the others may block for longer (wireguard-go reads cost ~15 µs per
//! peer) and are run on a blocking thread under a deadline by the reconciler.

use crate::plan::{Backend, Device, Link, PeerState, PeerUpdate, Route, SecretKey};
use crate::rtnl::{self, Notice, Rtnl};
use crate::spec::PublicKey;
use crate::sum::{Counted, DeviceSum};
use converge_core::{DriverError, HostEvent};
use futures::stream::BoxStream;
use ipnet::IpNet;
use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wireguard_control::{DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

#[cfg(test)]
pub mod fake;
pub mod uapi;

/// A change of one of converge's routes, as notified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteChange {
    Added(Route),
    Removed(Route),
}

/// What the reconciler needs from the host.
pub trait WgDriver: Send + Sync + 'static {
    /// Quick: the interface, `None` when it does not exist. An interface of that name
    /// that is no WireGuard device is an error.
    fn link(&self, iface: &str) -> Result<Option<Link>, DriverError>;
    /// Quick: the interface's addresses (link-local ones left out), sorted.
    fn addresses(&self, index: u32) -> Result<Vec<IpNet>, DriverError>;
    /// Every route carrying converge's marker (a full dump).
    fn routes(&self) -> Result<HashSet<Route>, DriverError>;
    /// Quick: changes of converge's routes notified since the last call (including
    /// converge's own); `None` when notifications were lost (re-list with `routes`).
    fn route_changes(&self) -> Result<Option<Vec<RouteChange>>, DriverError>;
    /// The device: keys, port, peers with their statistics.
    fn read_device(&self, iface: &str, backend: Backend) -> Result<Device, DriverError>;
    /// The device's configuration as a [`DeviceSum`] (`counted`: whose endpoint counts),
    /// for the device watch, which calls it every second: as cheap as the backend
    /// allows. By default a full read, summed.
    fn device_sum(
        &self,
        iface: &str,
        backend: Backend,
        counted: Counted<'_>,
    ) -> Result<DeviceSum, DriverError> {
        Ok(DeviceSum::of(&self.read_device(iface, backend)?, counted))
    }
    /// Creates the interface: a kernel link where the module exists, else wireguard-go.
    fn create(&self, iface: &str) -> Result<Backend, DriverError>;
    /// Deletes a WireGuard interface converge created (wireguard-go exits when its
    /// device goes); a missing one is success.
    fn delete(&self, iface: &str) -> Result<(), DriverError>;
    /// Sets the private key and/or listen port (never touches peers).
    fn configure(
        &self,
        iface: &str,
        backend: Backend,
        private_key: Option<&SecretKey>,
        listen_port: Option<u16>,
    ) -> Result<(), DriverError>;
    /// Adds or changes these peers, each only in the fields given. One request: on an
    /// error, the peers before the failing one may be applied.
    fn set_peers(
        &self,
        iface: &str,
        backend: Backend,
        peers: &[&PeerUpdate],
    ) -> Result<(), DriverError>;
    /// Removes these peers (no other peer is touched).
    fn remove_peers(
        &self,
        iface: &str,
        backend: Backend,
        keys: &[PublicKey],
    ) -> Result<(), DriverError>;
    fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), DriverError>;
    fn set_up(&self, index: u32) -> Result<(), DriverError>;
    fn add_address(&self, index: u32, addr: IpNet) -> Result<(), DriverError>;
    fn del_address(&self, index: u32, addr: IpNet) -> Result<(), DriverError>;
    /// Adds a route with converge's marker; an existing route to `dst` is an error.
    fn add_route(&self, dst: IpNet, oif: u32) -> Result<(), DriverError>;
    /// Deletes one of converge's routes; an already missing route is success.
    fn del_route(&self, route: Route) -> Result<(), DriverError>;
    /// Tells the event watch which interface to report on.
    fn watch(&self, _iface: &str, _index: Option<u32>) {}
    /// Whether the event watch saw the interface go down or lose an address since the
    /// last call: the kernel may then have flushed its IPv4 routes without notifying
    /// (so the route cache must be listed again).
    fn routes_flushed(&self) -> bool {
        false
    }
    /// "Something changed" pings: the interface deleted (which is also what a killed
    /// wireguard-go looks like: its TUN device goes with it) or set down, an address
    /// removed from it, one of converge's routes removed.
    fn host_events(&self) -> Option<BoxStream<'static, HostEvent>> {
        None
    }
}

/// Stand-in when the real driver cannot be built (no netlink socket): every call fails
/// with the reason, so a document with a `wireguard` section reports it as Degraded.
pub struct Unavailable(pub String);

impl Unavailable {
    fn err<T>(&self) -> Result<T, DriverError> {
        Err(DriverError::Failed(self.0.clone()))
    }
}

impl WgDriver for Unavailable {
    fn link(&self, _: &str) -> Result<Option<Link>, DriverError> {
        self.err()
    }
    fn addresses(&self, _: u32) -> Result<Vec<IpNet>, DriverError> {
        self.err()
    }
    fn routes(&self) -> Result<HashSet<Route>, DriverError> {
        self.err()
    }
    fn route_changes(&self) -> Result<Option<Vec<RouteChange>>, DriverError> {
        self.err()
    }
    fn read_device(&self, _: &str, _: Backend) -> Result<Device, DriverError> {
        self.err()
    }
    fn create(&self, _: &str) -> Result<Backend, DriverError> {
        self.err()
    }
    fn configure(
        &self,
        _: &str,
        _: Backend,
        _: Option<&SecretKey>,
        _: Option<u16>,
    ) -> Result<(), DriverError> {
        self.err()
    }
    fn set_peers(&self, _: &str, _: Backend, _: &[&PeerUpdate]) -> Result<(), DriverError> {
        self.err()
    }
    fn remove_peers(&self, _: &str, _: Backend, _: &[PublicKey]) -> Result<(), DriverError> {
        self.err()
    }
    fn delete(&self, _: &str) -> Result<(), DriverError> {
        self.err()
    }
    fn set_mtu(&self, _: u32, _: u32) -> Result<(), DriverError> {
        self.err()
    }
    fn set_up(&self, _: u32) -> Result<(), DriverError> {
        self.err()
    }
    fn add_address(&self, _: u32, _: IpNet) -> Result<(), DriverError> {
        self.err()
    }
    fn del_address(&self, _: u32, _: IpNet) -> Result<(), DriverError> {
        self.err()
    }
    fn add_route(&self, _: IpNet, _: u32) -> Result<(), DriverError> {
        self.err()
    }
    fn del_route(&self, _: Route) -> Result<(), DriverError> {
        self.err()
    }
}

/// Settings of the real driver.
#[derive(Clone, Debug)]
pub struct SystemConfig {
    /// The wireguard-go binary (found on `PATH` by default).
    pub wireguard_go: PathBuf,
    /// Try the kernel module first (`false`: always wireguard-go).
    pub try_kernel: bool,
    /// Bound of every netlink request.
    pub netlink_timeout: Duration,
    /// How long wireguard-go may take to bring its interface up.
    pub start_timeout: Duration,
}

impl Default for SystemConfig {
    fn default() -> Self {
        Self {
            wireguard_go: PathBuf::from("wireguard-go"),
            try_kernel: true,
            netlink_timeout: Duration::from_secs(2),
            start_timeout: Duration::from_secs(10),
        }
    }
}

/// Where wireguard-go keeps its UAPI sockets (shared by every network namespace).
pub const UAPI_DIR: &str = "/var/run/wireguard";

fn uapi_socket(iface: &str) -> PathBuf {
    Path::new(UAPI_DIR).join(format!("{iface}.sock"))
}

/// Whether a wireguard-go serves `iface` (its UAPI socket accepts connections).
pub fn wireguard_go_running(iface: &str) -> bool {
    UnixStream::connect(uapi_socket(iface)).is_ok()
}

/// The wireguard-go processes serving `iface` (wireguard-go re-executes itself with the
/// same arguments when it daemonises, so its command line is `wireguard-go <iface>`).
pub fn wireguard_go_pids(iface: &str) -> Vec<u32> {
    converge_core::host::find(|args| {
        args.first().is_some_and(|p| p.ends_with(b"wireguard-go"))
            && args.get(1) == Some(&iface.as_bytes())
    })
    .map(|found| found.into_iter().map(|p| p.pid).collect())
    .unwrap_or_default()
}

/// Stops the wireguard-go of `iface`: SIGTERM, then SIGKILL after `grace` (called on a
/// blocking thread, like every driver call).
fn stop_wireguard_go(iface: &str, grace: Duration) {
    converge_core::host::stop_blocking(&wireguard_go_pids(iface), grace);
}

fn nl(op: &str, e: io::Error) -> DriverError {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => DriverError::Timeout {
            op: op.to_string(),
            after: Duration::from_secs(2),
        },
        Some(libc::EBUSY) | Some(libc::EINTR) => DriverError::Transient(format!("{op}: {e}")),
        _ => DriverError::io(op, e),
    }
}

fn ifname(iface: &str) -> Result<InterfaceName, DriverError> {
    iface
        .parse()
        .map_err(|e| DriverError::Failed(format!("interface name {iface:?}: {e}")))
}

fn wg_backend(b: Backend) -> wireguard_control::Backend {
    match b {
        Backend::Kernel => wireguard_control::Backend::Kernel,
        Backend::Userspace => wireguard_control::Backend::Userspace,
    }
}

fn peer_builder(p: &PeerUpdate) -> PeerConfigBuilder {
    let mut b = PeerConfigBuilder::new(&Key(p.key.0));
    if let Some(allowed) = &p.allowed {
        // Replaces this peer's allowed IPs only; other peers keep theirs.
        b = b.replace_allowed_ips();
        for n in allowed {
            b = b.add_allowed_ip(n.addr(), n.prefix_len());
        }
    }
    if let Some(e) = p.endpoint {
        b = b.set_endpoint(e);
    }
    if let Some(k) = p.keepalive {
        b = b.set_persistent_keepalive_interval(k);
    }
    match &p.psk {
        Some(Some(k)) => b = b.set_preshared_key(Key(k.0)),
        Some(None) => b = b.unset_preshared_key(),
        None => {}
    }
    b
}

/// The interface the event watch reports on.
#[derive(Default)]
struct Target {
    iface: Mutex<String>,
    index: AtomicU32,
    /// Set by the watch on a link down or an address removal, taken by `routes_flushed`.
    flushed: AtomicBool,
}

/// The real driver.
pub struct System {
    config: SystemConfig,
    rtnl: Rtnl,
    /// Route notifications, drained by `route_changes` (the route cache's feed).
    route_feed: Mutex<(netlink_sys::Socket, Vec<u8>)>,
    /// Link, address and route notifications for `host_events`, taken once.
    events: Mutex<Option<netlink_sys::Socket>>,
    target: Arc<Target>,
    /// The last private key's fingerprint the device watch saw, with its public key:
    /// deriving it (a curve multiplication) is paid once per key, not once per read.
    public_memo: Mutex<Option<(u64, PublicKey)>>,
    /// The device watch's UAPI connection and the interface it serves.
    uapi: Mutex<Option<(String, UnixStream)>>,
}

/// SO_RCVBUFFORCE (root) so that a burst of our own route changes (thousands at the
/// first apply) rarely overflows the feed; an overflow only costs a re-list.
fn force_rcvbuf(sock: &netlink_sys::Socket, bytes: usize) {
    let v = bytes as libc::c_int;
    // SAFETY: setsockopt with a pointer to an int that lives for the call.
    let _ = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

impl System {
    /// Opens the netlink sockets in the calling thread's network namespace.
    pub fn new(config: SystemConfig) -> io::Result<Self> {
        let rtnl = Rtnl::new(config.netlink_timeout)?;
        let feed = rtnl::open(&[rtnl::RTNLGRP_IPV4_ROUTE, rtnl::RTNLGRP_IPV6_ROUTE], 0)?;
        force_rcvbuf(&feed, 8 << 20);
        let events = rtnl::open(
            &[
                rtnl::RTNLGRP_LINK,
                rtnl::RTNLGRP_IPV4_IFADDR,
                rtnl::RTNLGRP_IPV6_IFADDR,
                rtnl::RTNLGRP_IPV4_ROUTE,
                rtnl::RTNLGRP_IPV6_ROUTE,
            ],
            0,
        )?;
        force_rcvbuf(&events, 1 << 20);
        events.set_non_blocking(true)?;
        Ok(Self {
            config,
            rtnl,
            route_feed: Mutex::new((feed, Vec::with_capacity(1 << 16))),
            events: Mutex::new(Some(events)),
            target: Arc::default(),
            public_memo: Mutex::default(),
            uapi: Mutex::default(),
        })
    }

    /// Starts wireguard-go for `iface` as its own process: in a new session (so no
    /// signal to the agent's process group reaches it) and daemonised by wireguard-go
    /// itself, so it is no child of the agent and outlives it. Found again after an
    /// agent restart through its UAPI socket.
    fn start_wireguard_go(&self, iface: &str) -> Result<(), DriverError> {
        let sock = uapi_socket(iface);
        if wireguard_go_running(iface) {
            if self
                .rtnl
                .link(iface)
                .map_err(|e| nl("read link", e))?
                .is_some()
            {
                return Ok(());
            }
            // Its interface was deleted under it: a wireguard-go converge started for
            // this interface, now serving nothing. Replace it.
            stop_wireguard_go(iface, Duration::from_secs(3));
        }
        // A socket left by a killed wireguard-go (kill -9 leaves it behind).
        let _ = std::fs::remove_file(&sock);
        std::fs::create_dir_all(UAPI_DIR).map_err(|e| DriverError::io(UAPI_DIR, e))?;
        // Its own systemd scope when systemd runs the host: outside the agent's cgroup.
        let mut cmd = converge_core::host::daemon_command(
            &self.config.wireguard_go,
            &format!("converge-wireguard-go-{iface}"),
            None,
        );
        cmd.arg(iface)
            .env_remove("WG_PROCESS_FOREGROUND")
            .env_remove("LOG_LEVEL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = converge_core::host::detach(&mut cmd).spawn().map_err(|e| {
            DriverError::io(format!("start {}", self.config.wireguard_go.display()), e)
        })?;
        // The first process creates the TUN device and the UAPI socket, starts the
        // daemon and exits.
        let deadline = Instant::now() + self.config.start_timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(DriverError::Timeout {
                        op: format!("start wireguard-go {iface}"),
                        after: self.config.start_timeout,
                    });
                }
                Err(e) => return Err(DriverError::io("wait for wireguard-go", e)),
            }
        };
        if !status.success() {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = io::Read::read_to_string(&mut s, &mut err);
            }
            return Err(DriverError::Failed(format!(
                "wireguard-go {iface} failed ({status}): {}",
                err.trim()
            )));
        }
        while !wireguard_go_running(iface) {
            if Instant::now() >= deadline {
                return Err(DriverError::Failed(format!(
                    "wireguard-go {iface} started but {} does not answer",
                    sock.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    fn update(&self, iface: &str, backend: Backend, u: DeviceUpdate) -> Result<(), DriverError> {
        // wireguard-control starts wireguard-go as its own child when the socket is
        // missing: refuse instead, so that only `create` starts it (detached).
        if backend == Backend::Userspace && !wireguard_go_running(iface) {
            return Err(DriverError::Transient(format!(
                "wireguard-go for {iface} is not running"
            )));
        }
        u.apply(&ifname(iface)?, wg_backend(backend))
            .map_err(|e| DriverError::io(format!("configure {iface}"), e))
    }
}

impl WgDriver for System {
    fn link(&self, iface: &str) -> Result<Option<Link>, DriverError> {
        let Some(d) = self.rtnl.link(iface).map_err(|e| nl("read link", e))? else {
            return Ok(None);
        };
        let backend = match d.kind.as_deref() {
            Some("wireguard") => Backend::Kernel,
            _ if Path::new(&uapi_socket(iface)).exists() => Backend::Userspace,
            kind => {
                return Err(DriverError::Failed(format!(
                    "interface {iface} exists and is not a WireGuard device (kind {})",
                    kind.unwrap_or("unknown")
                )))
            }
        };
        Ok(Some(Link {
            index: d.index,
            mtu: d.mtu,
            up: d.up,
            backend,
        }))
    }

    fn addresses(&self, index: u32) -> Result<Vec<IpNet>, DriverError> {
        self.rtnl
            .addresses(index)
            .map_err(|e| nl("read addresses", e))
    }

    fn routes(&self) -> Result<HashSet<Route>, DriverError> {
        Ok(self
            .rtnl
            .routes()
            .map_err(|e| nl("read routes", e))?
            .into_iter()
            .map(|(dst, oif)| Route { dst, oif })
            .collect())
    }

    fn route_changes(&self) -> Result<Option<Vec<RouteChange>>, DriverError> {
        let mut feed = self.route_feed.lock().unwrap_or_else(|p| p.into_inner());
        let (sock, buf) = &mut *feed;
        let notices = rtnl::drain(sock, buf).map_err(|e| nl("read route notifications", e))?;
        Ok(notices.map(|n| {
            n.into_iter()
                .filter_map(|n| match n {
                    Notice::RouteAdded(dst, oif) => Some(RouteChange::Added(Route { dst, oif })),
                    Notice::RouteRemoved(dst, oif) => {
                        Some(RouteChange::Removed(Route { dst, oif }))
                    }
                    _ => None,
                })
                .collect()
        }))
    }

    fn read_device(&self, iface: &str, backend: Backend) -> Result<Device, DriverError> {
        if backend == Backend::Userspace && !wireguard_go_running(iface) {
            return Err(DriverError::Transient(format!(
                "wireguard-go for {iface} is not running"
            )));
        }
        let d = wireguard_control::Device::get(&ifname(iface)?, wg_backend(backend))
            .map_err(|e| DriverError::io(format!("read device {iface}"), e))?;
        let mut peers = HashMap::with_capacity(d.peers.len());
        for p in d.peers {
            let mut allowed: Vec<IpNet> = p
                .config
                .allowed_ips
                .iter()
                .filter_map(|a| IpNet::new(a.address, a.cidr).ok().map(|n| n.trunc()))
                .collect();
            allowed.sort();
            allowed.dedup();
            let psk = p
                .config
                .preshared_key
                .filter(|k| k.0 != [0u8; 32])
                .map(|k| SecretKey(k.0).fingerprint());
            peers.insert(
                PublicKey(p.config.public_key.0),
                PeerState {
                    endpoint: p.config.endpoint,
                    allowed,
                    keepalive: p.config.persistent_keepalive_interval.unwrap_or(0),
                    psk,
                    last_handshake: p.stats.last_handshake_time,
                    rx_bytes: p.stats.rx_bytes,
                    tx_bytes: p.stats.tx_bytes,
                },
            );
        }
        Ok(Device {
            public_key: d.public_key.map(|k| PublicKey(k.0)),
            listen_port: d.listen_port.unwrap_or(0),
            peers,
        })
    }

    fn device_sum(
        &self,
        iface: &str,
        backend: Backend,
        counted: Counted<'_>,
    ) -> Result<DeviceSum, DriverError> {
        if backend == Backend::Kernel {
            // One netlink dump; the kernel gives the public key itself.
            return Ok(DeviceSum::of(&self.read_device(iface, backend)?, counted));
        }
        let mut public_of = |k: &SecretKey| {
            let fp = k.fingerprint();
            let mut memo = self.public_memo.lock().unwrap_or_else(|p| p.into_inner());
            match *memo {
                Some((f, public)) if f == fp => public,
                _ => {
                    let public = k.public();
                    *memo = Some((fp, public));
                    public
                }
            }
        };
        let mut conn = self.uapi.lock().unwrap_or_else(|p| p.into_inner());
        // The kept connection first (it fails once when wireguard-go was restarted),
        // then a new one.
        if let Some((_, s)) = conn.take().filter(|(i, _)| i == iface) {
            let mut s = s;
            if let Ok(sum) = uapi::get_sum(&mut s, counted, &mut public_of) {
                *conn = Some((iface.to_string(), s));
                return Ok(sum);
            }
        }
        uapi::connect(&uapi_socket(iface), self.config.netlink_timeout)
            .and_then(|mut s| {
                let sum = uapi::get_sum(&mut s, counted, &mut public_of)?;
                *conn = Some((iface.to_string(), s));
                Ok(sum)
            })
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    DriverError::Transient(format!("wireguard-go for {iface} is not running"))
                }
                _ => DriverError::io(format!("read device {iface}"), e),
            })
    }

    fn create(&self, iface: &str) -> Result<Backend, DriverError> {
        if self.config.try_kernel {
            match self.rtnl.add_wireguard_link(iface) {
                Ok(()) => return Ok(Backend::Kernel),
                // No module: "Unknown device type".
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) => return Err(nl(&format!("create interface {iface}"), e)),
            }
        }
        self.start_wireguard_go(iface)?;
        Ok(Backend::Userspace)
    }

    fn configure(
        &self,
        iface: &str,
        backend: Backend,
        private_key: Option<&SecretKey>,
        listen_port: Option<u16>,
    ) -> Result<(), DriverError> {
        let mut u = DeviceUpdate::new();
        if let Some(k) = private_key {
            u = u.set_private_key(Key(k.0));
        }
        if let Some(p) = listen_port {
            u = u.set_listen_port(p);
        }
        self.update(iface, backend, u)
    }

    fn set_peers(
        &self,
        iface: &str,
        backend: Backend,
        peers: &[&PeerUpdate],
    ) -> Result<(), DriverError> {
        let mut u = DeviceUpdate::new();
        for p in peers {
            u = u.add_peer(peer_builder(p));
        }
        self.update(iface, backend, u)
    }

    fn remove_peers(
        &self,
        iface: &str,
        backend: Backend,
        keys: &[PublicKey],
    ) -> Result<(), DriverError> {
        let mut u = DeviceUpdate::new();
        for k in keys {
            u = u.remove_peer_by_key(&Key(k.0));
        }
        self.update(iface, backend, u)
    }

    fn delete(&self, iface: &str) -> Result<(), DriverError> {
        // `link` refuses an interface of that name that is no WireGuard device.
        match self.link(iface)? {
            Some(l) => self
                .rtnl
                .del_link(l.index)
                .map_err(|e| nl("delete link", e)),
            None => Ok(()),
        }
    }

    fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), DriverError> {
        self.rtnl.set_mtu(index, mtu).map_err(|e| nl("set mtu", e))
    }

    fn set_up(&self, index: u32) -> Result<(), DriverError> {
        self.rtnl.set_up(index).map_err(|e| nl("set link up", e))
    }

    fn add_address(&self, index: u32, addr: IpNet) -> Result<(), DriverError> {
        match self.rtnl.add_address(index, addr) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r.map_err(|e| nl(&format!("add address {addr}"), e)),
        }
    }

    fn del_address(&self, index: u32, addr: IpNet) -> Result<(), DriverError> {
        match self.rtnl.del_address(index, addr) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
            r => r.map_err(|e| nl(&format!("delete address {addr}"), e)),
        }
    }

    fn add_route(&self, dst: IpNet, oif: u32) -> Result<(), DriverError> {
        match self.rtnl.add_route(dst, oif) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Err(DriverError::Failed(format!(
                "a route to {dst} exists that converge does not own; remove it or the peer's allowed IPs"
            ))),
            r => r.map_err(|e| nl(&format!("add route {dst}"), e)),
        }
    }

    fn del_route(&self, route: Route) -> Result<(), DriverError> {
        match self.rtnl.del_route(route.dst, route.oif) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH) | Some(libc::ENODEV)) => Ok(()),
            r => r.map_err(|e| nl(&format!("delete route {}", route.dst), e)),
        }
    }

    fn watch(&self, iface: &str, index: Option<u32>) {
        let mut name = self.target.iface.lock().unwrap_or_else(|p| p.into_inner());
        if *name != iface {
            *name = iface.to_string();
        }
        self.target
            .index
            .store(index.unwrap_or(0), Ordering::Relaxed);
    }

    fn routes_flushed(&self) -> bool {
        self.target.flushed.swap(false, Ordering::Relaxed)
    }

    fn host_events(&self) -> Option<BoxStream<'static, HostEvent>> {
        let sock = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        let target = self.target.clone();
        Some(Box::pin(futures::stream::unfold(
            (
                None::<tokio::io::unix::AsyncFd<netlink_sys::Socket>>,
                Some(sock),
                target,
                Vec::with_capacity(1 << 16),
            ),
            |(mut fd, mut sock, target, mut buf)| async move {
                loop {
                    if fd.is_none() {
                        // Registered on first poll, inside the engine's runtime.
                        let s = sock.take()?;
                        // SAFETY: the socket owns its descriptor until it is dropped,
                        // which only the AsyncFd does.
                        let r = unsafe {
                            tokio::io::unix::AsyncFd::register_with_interest(
                                s,
                                tokio::io::Interest::READABLE,
                            )
                        };
                        fd = Some(r.ok()?);
                    }
                    let afd = fd.as_ref()?;
                    let mut guard = afd.readable().await.ok()?;
                    let drained = rtnl::drain(afd.get_ref(), &mut buf);
                    guard.clear_ready();
                    let event = match drained {
                        Ok(Some(notices)) => interesting(&target, &notices),
                        Ok(None) => Some("netlink notifications were lost".to_string()),
                        Err(_) => None,
                    };
                    if let Some(e) = event {
                        return Some((HostEvent(e), (fd, sock, target, buf)));
                    }
                }
            },
        )))
    }
}

/// The first notification worth a pass, named (the rest of the batch coalesces).
fn interesting(target: &Target, notices: &[Notice]) -> Option<String> {
    let iface = target
        .iface
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if iface.is_empty() {
        return None;
    }
    let index = target.index.load(Ordering::Relaxed);
    let flushing = notices.iter().any(|n| match n {
        Notice::LinkChanged(l) => l.name == iface && !l.up,
        Notice::AddressRemoved(i, _) => *i == index && index != 0,
        _ => false,
    });
    if flushing {
        // Before the event is handed on: the pass it causes must see the flag.
        target.flushed.store(true, Ordering::Relaxed);
    }
    notices.iter().find_map(|n| match n {
        Notice::LinkRemoved(l) if l.name == iface => Some(format!(
            "interface {iface} deleted (or its wireguard-go exited)"
        )),
        Notice::LinkChanged(l) if l.name == iface && !l.up => {
            Some(format!("interface {iface} is down"))
        }
        Notice::AddressRemoved(i, a) if *i == index && index != 0 => {
            Some(format!("address {a} removed from {iface}"))
        }
        Notice::RouteRemoved(dst, _) => Some(format!("route {dst} removed")),
        _ => None,
    })
}
