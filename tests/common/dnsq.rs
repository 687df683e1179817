//! A small DNS client for tests: one UDP query, parsed with hickory-proto.

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

/// Rcode and answer values (RData rendered as text) of one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub values: Vec<String>,
    pub ttls: Vec<u32>,
}

/// Sends one query and waits up to `timeout` for the matching response.
pub fn query(
    sock: &UdpSocket,
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
    timeout: Duration,
) -> io::Result<Answer> {
    let fqdn = Name::from_ascii(format!("{}.", name.trim_end_matches('.')))
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut msg = Message::query();
    msg.add_query(Query::query(fqdn, rtype));
    msg.metadata.recursion_desired = true;
    let id = msg.metadata.id;
    let bytes = msg.to_vec().map_err(|e| io::Error::other(e.to_string()))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send_to(&bytes, server)?;
    let mut buf = [0u8; 4096];
    loop {
        let (n, _) = sock.recv_from(&mut buf)?;
        let resp = Message::from_vec(&buf[..n]).map_err(|e| io::Error::other(e.to_string()))?;
        if resp.metadata.id != id {
            continue; // a late answer to an earlier, timed-out query
        }
        let mut values: Vec<String> = resp
            .answers
            .iter()
            .filter(|r| r.record_type() == rtype)
            .map(|r| r.data.to_string())
            .collect();
        values.sort();
        let ttls = resp.answers.iter().map(|r| r.ttl).collect();
        return Ok(Answer {
            rcode: resp.metadata.response_code,
            values,
            ttls,
        });
    }
}
