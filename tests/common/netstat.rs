//! What the kernel knows about a test node's network namespace, for tests that wait on
//! it instead of sleeping: its TCP sockets with their queues (`/proc/net/tcp`, `tcp6`)
//! and its protocol counters (`/proc/net/snmp`).
//!
//! `/proc/thread-self/net` shows the namespace of the calling thread, so the `*_here`
//! functions are for code already running in [`TestNode::in_netns`]; the others enter
//! the node's namespace themselves.

use super::sandbox::TestNode;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `TCP_ESTABLISHED` in the kernel's numbering of TCP states.
pub const TCP_ESTABLISHED: u8 = 0x01;
/// `TCP_LISTEN` in the kernel's numbering of TCP states.
pub const TCP_LISTEN: u8 = 0x0A;

/// One TCP socket of a namespace (a line of `/proc/net/tcp` or `/proc/net/tcp6`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's TCP state ([`TCP_ESTABLISHED`], [`TCP_LISTEN`], ...).
    pub state: u8,
    /// Bytes sent and not yet acknowledged by the peer.
    pub tx_queue: u32,
    /// Bytes received and not yet read by the socket's owner; for a listener, the
    /// connections waiting to be accepted.
    pub rx_queue: u32,
}

/// The TCP sockets of `node`'s namespace.
pub fn tcp_sockets(node: &TestNode) -> Vec<TcpSocket> {
    node.in_netns(tcp_sockets_here)
}

/// The TCP sockets of the calling thread's namespace.
pub fn tcp_sockets_here() -> Vec<TcpSocket> {
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|table| {
            std::fs::read_to_string(format!("/proc/thread-self/net/{table}"))
                .unwrap_or_default()
                .lines()
                .skip(1)
                .filter_map(tcp_line)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `sl local_address rem_address st tx_queue:rx_queue ...`
fn tcp_line(line: &str) -> Option<TcpSocket> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let (tx, rx) = f.get(4)?.split_once(':')?;
    Some(TcpSocket {
        local: proc_addr(f.get(1)?)?,
        remote: proc_addr(f.get(2)?)?,
        state: u8::from_str_radix(f.get(3)?, 16).ok()?,
        tx_queue: u32::from_str_radix(tx, 16).ok()?,
        rx_queue: u32::from_str_radix(rx, 16).ok()?,
    })
}

/// `0100007F:2134`: the address as 32-bit words printed in host byte order (one for
/// IPv4, four for IPv6), then the port.
fn proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..ip.len()).step_by(8) {
        let word = u32::from_str_radix(ip.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Counter `name` of protocol `proto` in `node`'s namespace (`/proc/net/snmp`, e.g.
/// `("Icmp", "OutEchos")`); panics if there is no such counter.
pub fn snmp_counter(node: &TestNode, proto: &str, name: &str) -> u64 {
    let text = node.in_netns(|| std::fs::read_to_string("/proc/thread-self/net/snmp"));
    snmp_value(&text.expect("read /proc/net/snmp"), proto, name)
        .unwrap_or_else(|| panic!("no counter {proto} {name} in /proc/net/snmp"))
}

/// Counter `name` of protocol `proto` in the text of a `/proc/net/snmp`: each protocol
/// has a line of names then a line of values, both starting with `<proto>:`.
pub fn snmp_value(text: &str, proto: &str, name: &str) -> Option<u64> {
    let prefix = format!("{proto}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
}
