//! Reading an agent's Prometheus metrics (`--metrics-listen`) from inside its node.

use super::sandbox::TestNode;
use std::io::{Read, Write};
use std::net::TcpStream;

/// `GET /metrics` from inside the node, from the agent listening on `addr`; the whole
/// HTTP answer (status line, headers, body).
pub fn scrape(node: &TestNode, addr: &str) -> String {
    node.in_netns(|| {
        let mut s = TcpStream::connect(addr).expect("connect to metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        body
    })
}

/// The value of one series (exact name and labels), if present.
pub fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The sum of every series whose name and labels start with `prefix` (e.g. every
/// `kind` of `converge_drift_repairs_total{reconciler="dns",`).
pub fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum()
}
