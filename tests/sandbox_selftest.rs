//! Checks the sandbox harness itself: nodes reach each other over the bridge, sockets can be
//! opened inside a node, and teardown leaves nothing behind even when a test panics.

mod common;

use common::netstat::{snmp_counter, tcp_sockets, TCP_ESTABLISHED, TCP_LISTEN};
use common::sandbox::{pid_alive, require_tool, TestNode};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

#[test]
fn two_nodes_ping_each_other() {
    require_tool("ping");
    let a = TestNode::new("ping-a");
    let b = TestNode::new("ping-b");
    assert_ne!(a.address(), b.address());
    a.run_ok("ping", ["-c1", "-W1", &b.address().to_string()]);
    b.run_ok("ping", ["-c1", "-W1", &a.address().to_string()]);
}

#[test]
fn in_netns_sockets_live_in_the_node() {
    let a = TestNode::new("udpa");
    let b = TestNode::new("udpb");
    // The node address exists only inside the node, so binding proves the namespace.
    let rx = a.in_netns(|| UdpSocket::bind((a.address(), 0)).expect("bind in node a"));
    let tx = b.in_netns(|| UdpSocket::bind((b.address(), 0)).expect("bind in node b"));
    assert!(
        UdpSocket::bind((a.address(), 0)).is_err(),
        "node address must not exist in the test's own namespace"
    );
    // Used from this (root-namespace) thread, the sockets still talk over the bridge.
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tx.send_to(b"hello", rx.local_addr().unwrap()).unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = rx.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(from, tx.local_addr().unwrap());
}

#[test]
fn netstat_shows_the_node_sockets_queues_and_counters() {
    require_tool("ping");
    let node = TestNode::new("netstat");
    let (listener, mut client) = node.in_netns(|| {
        let l = TcpListener::bind((node.address(), 0)).expect("listen");
        let c = TcpStream::connect(l.local_addr().unwrap()).expect("connect");
        (l, c)
    });
    let (server_addr, client_addr) = (listener.local_addr().unwrap(), client.local_addr().unwrap());
    let find = |local, remote| {
        tcp_sockets(&node)
            .into_iter()
            .find(|s| s.local == local && s.remote == remote)
    };
    // Not accepted yet: the listener counts it as waiting.
    let waiting = tcp_sockets(&node)
        .into_iter()
        .find(|s| s.local == server_addr && s.state == TCP_LISTEN)
        .expect("the listener");
    assert_eq!(waiting.rx_queue, 1, "{waiting:?}");
    client.write_all(b"hello").unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let unread = find(server_addr, client_addr).expect("the server end");
    assert_eq!(
        (unread.state, unread.rx_queue),
        (TCP_ESTABLISHED, 5),
        "{unread:?}"
    );
    let mut buf = [0u8; 5];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(
        find(server_addr, client_addr)
            .expect("the server end")
            .rx_queue,
        0
    );
    assert_eq!(
        find(client_addr, server_addr)
            .expect("the client end")
            .tx_queue,
        0
    );
    assert!(
        tcp_sockets(&TestNode::new("netstat-b")).is_empty(),
        "another node has none of them"
    );

    let echoes = snmp_counter(&node, "Icmp", "OutEchos");
    node.run_ok("ping", ["-c2", "-i0.2", &node.address().to_string()]);
    assert_eq!(snmp_counter(&node, "Icmp", "OutEchos"), echoes + 2);
}

#[test]
fn drop_cleans_up_after_a_panic() {
    let mut seen: Option<(PathBuf, PathBuf, u32, u32)> = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let node = TestNode::new("boom");
        let child = node.spawn(node.command("sleep").arg("600"));
        // A self-daemonizing process: its parent exits, only the pid file knows it. Started
        // outside the namespace so that only track_pidfile (not the namespace sweep) kills it.
        let pidfile = node.data_dir().join("daemon.pid");
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "sleep 600 >/dev/null 2>&1 & echo $! > {}",
                pidfile.display()
            ))
            .status()
            .unwrap();
        assert!(status.success());
        node.track_pidfile(&pidfile);
        let daemon: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(node.netns_path().exists());
        assert!(pid_alive(child.pid()) && pid_alive(daemon));
        seen = Some((
            node.netns_path(),
            node.data_dir().to_owned(),
            child.pid(),
            daemon,
        ));
        panic!("deliberate panic to test teardown");
    }));
    assert!(result.is_err());
    let (netns, data, child, daemon) = seen.expect("node was created");
    assert!(!netns.exists(), "{} survived the panic", netns.display());
    assert!(!data.exists(), "{} survived the panic", data.display());
    assert!(!pid_alive(child), "spawned child {child} survived");
    assert!(!pid_alive(daemon), "pid-file daemon {daemon} survived");
}
