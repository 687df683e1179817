//! Raw nf_tables netlink: attribute encoding and decoding, atomic batches sent on one
//! socket with a send buffer sized to the batch, dumps, the ruleset generation id and the
//! ruleset-change event stream.
//!
//! rustables encodes the table and chain messages (`table.rs`); this
//! module carries what it cannot: rule expressions it lacks (`fib`, `redir`-style port
//! NAT, maps and concatenated keys in 32-bit registers; `expr`), set elements with data,
//! element dumps of an `inet` table, batches larger than one socket buffer, and the batch
//! generation guard. Constants are from `linux/netfilter/nf_tables.h`. Used by the
//! firewall (its `inet converge` table) and the routes reconciler (the redirect of the
//! public ports to the active Caddy).

pub mod expr;
mod table;

pub use table::{rule_message, table_and_chains, ChainDef, Hook};

use crate::HostEvent;
use futures::stream::BoxStream;
use futures::StreamExt;
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

pub const NFPROTO_INET: u8 = 1;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFNL_BATCH_GENID: u16 = 1;
const NFNLGRP_NFTABLES: u32 = 7;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// nf_tables message types (`enum nf_tables_msg_types`).
pub mod msg {
    pub const NEWTABLE: u8 = 0;
    pub const GETTABLE: u8 = 1;
    pub const GETCHAIN: u8 = 4;
    pub const DELTABLE: u8 = 2;
    pub const NEWRULE: u8 = 6;
    pub const GETRULE: u8 = 7;
    pub const DELRULE: u8 = 8;
    pub const NEWSET: u8 = 9;
    pub const GETSET: u8 = 10;
    pub const NEWSETELEM: u8 = 12;
    pub const GETSETELEM: u8 = 13;
    pub const DELSETELEM: u8 = 14;
    pub const NEWGEN: u8 = 15;
    pub const GETGEN: u8 = 16;
}

/// Netlink attribute builder: type-length-value, 4-byte aligned, nests flagged.
#[derive(Default)]
pub struct Attrs {
    buf: Vec<u8>,
}

impl Attrs {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn bytes(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align(self.buf.len()), 0);
        self
    }

    pub fn u32_be(&mut self, ty: u16, v: u32) -> &mut Self {
        self.bytes(ty, &v.to_be_bytes())
    }

    /// A NUL-terminated string, as the kernel's NLA_STRING/NLA_NUL_STRING expect.
    pub fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.bytes(ty, &v)
    }

    pub fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        let mut inner = Attrs {
            buf: std::mem::take(&mut self.buf),
        };
        f(&mut inner);
        self.buf = inner.buf;
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// A nest whose content is already encoded (attributes built separately).
    pub fn nest_raw(&mut self, ty: u16, content: &[u8]) -> &mut Self {
        self.bytes(ty | NLA_F_NESTED, content)
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterates the attributes in `buf` as (type without flags, payload).
pub fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            return None;
        }
        let payload = &rest[4..len];
        rest = &rest[align(len).min(rest.len())..];
        Some((ty, payload))
    })
}

/// The payload of attribute `ty` in `buf`, if present.
pub fn attr(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(buf).find(|(t, _)| *t == ty).map(|(_, p)| p)
}

pub fn attr_str(buf: &[u8], ty: u16) -> Option<String> {
    attr(buf, ty).map(|p| {
        let end = p.iter().position(|b| *b == 0).unwrap_or(p.len());
        String::from_utf8_lossy(&p[..end]).into_owned()
    })
}

pub fn attr_u32_be(buf: &[u8], ty: u16) -> Option<u32> {
    attr(buf, ty).and_then(|p| Some(u32::from_be_bytes(p.get(..4)?.try_into().ok()?)))
}

/// A rule's comment as nft writes it (udata TLV type 0, NUL-terminated), so `nft list`
/// shows it and a dump tells converge's rules apart from edited ones.
pub fn rule_comment(text: &str) -> Vec<u8> {
    let mut udata = vec![0u8, (text.len() + 1) as u8];
    udata.extend_from_slice(text.as_bytes());
    udata.push(0);
    udata
}

/// The comment in a rule's udata (attribute NFTA_RULE_USERDATA), if any.
pub fn parse_rule_comment(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while rest.len() >= 2 {
        let (t, l) = (rest[0], rest[1] as usize);
        let v = rest.get(2..2 + l)?;
        if t == 0 {
            let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
            return Some(String::from_utf8_lossy(&v[..end]).into_owned());
        }
        rest = &rest[2 + l..];
    }
    None
}

/// One nf_tables request: message type, flags, family and its attributes; `what` names it
/// in errors ("add element to set dnat4_any").
#[derive(Clone, Debug)]
pub struct Message {
    pub ty: u8,
    pub flags: u16,
    pub family: u8,
    pub attrs: Vec<u8>,
    pub what: String,
}

impl Message {
    pub fn new(ty: u8, flags: u16, attrs: Attrs, what: impl Into<String>) -> Self {
        Self {
            ty,
            flags,
            family: NFPROTO_INET,
            attrs: attrs.into_bytes(),
            what: what.into(),
        }
    }

    /// A message already encoded by rustables (nlmsghdr + nfgenmsg + attributes); only
    /// its sequence number is rewritten when the batch is built.
    pub fn encoded(raw: &[u8], what: impl Into<String>) -> Option<Self> {
        if raw.len() < 20 {
            return None;
        }
        let ty = u16::from_ne_bytes([raw[4], raw[5]]);
        Some(Self {
            ty: (ty & 0xff) as u8,
            flags: u16::from_ne_bytes([raw[6], raw[7]]) & !(NLM_F_REQUEST | NLM_F_ACK),
            family: raw[16],
            attrs: raw[20..].to_vec(),
            what: what.into(),
        })
    }
}

/// Splits a buffer of netlink messages (as `rustables::Batch::finalize` returns) into
/// the individual messages.
pub fn split_messages(mut buf: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        out.push(&buf[..len]);
        buf = &buf[align(len).min(buf.len())..];
    }
    out
}

fn header(out: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, len: usize) {
    out.extend_from_slice(&((16 + 4 + len) as u32).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(0); // NFNETLINK_V0
    out.extend_from_slice(&res_id.to_be_bytes());
}

fn nft_type(op: u8) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | op as u16
}

/// Failure of a netlink exchange; `Rejected` carries the kernel's errno and the message
/// it refused.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error("netlink: {0}")]
    Io(#[from] io::Error),
    #[error("the kernel refused to {what}: {source}")]
    Rejected {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the ruleset changed while converge was planning (generation {expected}); the batch was not applied")]
    GenerationChanged { expected: u32 },
    #[error("netlink: malformed reply: {0}")]
    Malformed(&'static str),
}

/// An nf_tables netlink socket in the current network namespace.
pub struct Nft {
    sock: Socket,
    seq: u32,
}

const RECV_TIMEOUT: Duration = Duration::from_secs(10);
const RECV_BUF: usize = 1 << 20;

impl Nft {
    pub fn open() -> Result<Self, NlError> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        set_opt(&sock, libc::SO_RCVTIMEO, &timeval(RECV_TIMEOUT))?;
        // Acks of a large batch and big dumps must not overflow the default buffer.
        set_buf(&sock, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, RECV_BUF)?;
        Ok(Self { sock, seq: 1 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// The ruleset generation: every committed change to any table bumps it by one.
    pub fn generation(&mut self) -> Result<u32, NlError> {
        let seq = self.next_seq();
        let mut out = Vec::new();
        header(&mut out, nft_type(msg::GETGEN), NLM_F_REQUEST, seq, 0, 0, 0);
        self.sock.send(&out, 0)?;
        let mut genid = None;
        self.receive(seq, |ty, payload| {
            if ty == nft_type(msg::NEWGEN) {
                genid = attr_u32_be(payload, 1); // NFTA_GEN_ID
                return Ok(true);
            }
            Ok(false)
        })?;
        genid.ok_or(NlError::Malformed("no generation in reply"))
    }

    /// Dumps objects of type `op` (GETSET, GETRULE, GETSETELEM, …) filtered by `attrs`;
    /// returns each reply's attributes. ENOENT (no such table/set) is an empty dump.
    pub fn dump(&mut self, op: u8, attrs: Attrs) -> Result<Vec<Vec<u8>>, NlError> {
        let seq = self.next_seq();
        let mut out = Vec::new();
        let a = attrs.into_bytes();
        header(
            &mut out,
            nft_type(op),
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            NFPROTO_INET,
            0,
            a.len(),
        );
        out.extend_from_slice(&a);
        self.sock.send(&out, 0)?;
        let mut items = Vec::new();
        let r = self.receive(seq, |ty, payload| {
            if ty >> 8 == NFNL_SUBSYS_NFTABLES {
                items.push(payload.to_vec());
            }
            Ok(false)
        });
        match r {
            Err(NlError::Rejected { source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(Vec::new())
            }
            Err(e) => Err(e),
            Ok(()) => Ok(items),
        }
    }

    /// Sends `messages` as ONE atomic batch: the kernel commits all or none. With
    /// `genid`, the kernel refuses the batch if the ruleset changed since that generation.
    pub fn commit(&mut self, messages: &[Message], genid: Option<u32>) -> Result<(), NlError> {
        if messages.is_empty() {
            return Ok(());
        }
        let first = self.next_seq();
        let mut out = Vec::with_capacity(messages.iter().map(|m| m.attrs.len() + 20).sum());
        let mut begin = Attrs::new();
        if let Some(g) = genid {
            begin.u32_be(NFNL_BATCH_GENID, g);
        }
        let begin = begin.into_bytes();
        header(
            &mut out,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            first,
            0,
            NFNL_SUBSYS_NFTABLES,
            begin.len(),
        );
        out.extend_from_slice(&begin);
        for (i, m) in messages.iter().enumerate() {
            header(
                &mut out,
                nft_type(m.ty),
                NLM_F_REQUEST | NLM_F_ACK | m.flags,
                first.wrapping_add(1 + i as u32),
                m.family,
                0,
                m.attrs.len(),
            );
            out.extend_from_slice(&m.attrs);
        }
        let end_seq = first.wrapping_add(1 + messages.len() as u32);
        header(
            &mut out,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            end_seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            0,
        );
        self.seq = end_seq;
        // The whole batch is one datagram: the send buffer must hold it.
        set_buf(
            &self.sock,
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            out.len() + 4096,
        )?;
        let sent = self.sock.send(&out, 0)?;
        if sent != out.len() {
            return Err(NlError::Malformed("short send of a batch"));
        }
        let mut acked = 0usize;
        let mut failure: Option<NlError> = None;
        let last = messages.len();
        let r = self.receive_acks(first, |seq, errno| {
            let idx = seq.wrapping_sub(first) as usize;
            if errno != 0 && failure.is_none() {
                failure = Some(if idx == 0 && errno == libc::ERESTART {
                    NlError::GenerationChanged {
                        expected: genid.unwrap_or(0),
                    }
                } else {
                    NlError::Rejected {
                        what: messages
                            .get(idx.wrapping_sub(1))
                            .map(|m| m.what.clone())
                            .unwrap_or_else(|| "commit the batch".into()),
                        source: io::Error::from_raw_os_error(errno),
                    }
                });
            }
            acked += 1;
            // Every message asked for an ack; after a refusal the kernel may stop early.
            acked >= last || failure.is_some()
        });
        match (failure, r) {
            (Some(f), _) => Err(f),
            (None, r) => r,
        }
    }

    /// Reads the replies to request `seq` until DONE (dumps) or until `f` returns true;
    /// an error reply ends the exchange with `Rejected`. Replies to earlier requests
    /// (acks left over after a refused batch) are skipped.
    fn receive(
        &mut self,
        seq: u32,
        mut f: impl FnMut(u16, &[u8]) -> Result<bool, NlError>,
    ) -> Result<(), NlError> {
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let n = self.sock.recv(&mut &mut buf[..], 0)?;
            for m in split_messages(&buf[..n]) {
                if msg_seq(m) != seq {
                    continue;
                }
                let ty = u16::from_ne_bytes([m[4], m[5]]);
                match ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let errno = error_code(m);
                        if errno == 0 {
                            continue;
                        }
                        return Err(NlError::Rejected {
                            what: "answer a query".into(),
                            source: io::Error::from_raw_os_error(errno),
                        });
                    }
                    _ => {
                        if m.len() >= 20 && f(ty, &m[20..])? {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// Reads acks (NLMSG_ERROR with errno, 0 = success) of the batch whose sequence
    /// numbers start at `first` until `f` returns true.
    fn receive_acks(
        &mut self,
        first: u32,
        mut f: impl FnMut(u32, i32) -> bool,
    ) -> Result<(), NlError> {
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let n = self.sock.recv(&mut &mut buf[..], 0)?;
            for m in split_messages(&buf[..n]) {
                let seq = msg_seq(m);
                if u16::from_ne_bytes([m[4], m[5]]) != NLMSG_ERROR
                    || seq.wrapping_sub(first) > self.seq.wrapping_sub(first)
                {
                    continue;
                }
                if f(seq, error_code(m)) {
                    return Ok(());
                }
            }
        }
    }
}

fn msg_seq(m: &[u8]) -> u32 {
    u32::from_ne_bytes([m[8], m[9], m[10], m[11]])
}

/// The positive errno of an NLMSG_ERROR message (0 for an ack).
fn error_code(m: &[u8]) -> i32 {
    m.get(16..20)
        .map(|b| -i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(libc::EPROTO)
}

fn timeval(d: Duration) -> libc::timeval {
    libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    }
}

fn set_opt<T>(sock: &Socket, opt: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the size passed.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets a buffer size past the sysctl limit when allowed (CAP_NET_ADMIN), else as far
/// as the limit goes.
fn set_buf(sock: &Socket, force: libc::c_int, plain: libc::c_int, size: usize) -> io::Result<()> {
    let size = size.min(i32::MAX as usize) as libc::c_int;
    set_opt(sock, force, &size).or_else(|_| set_opt(sock, plain, &size))
}

/// Host events for every change to `table` (a flushed ruleset, an edit, converge's own
/// commits), named `table inet <table>`: the one nf_tables watch the reconcilers that
/// own a table share. `None` (with a warning) when netlink notifications cannot be
/// had: the table is then repaired at the next resync.
pub fn table_events(table: &'static str) -> Option<BoxStream<'static, HostEvent>> {
    match watch_table(table) {
        Ok(mut rx) => Some(
            futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
                .map(move |()| HostEvent(format!("table inet {table}")))
                .boxed(),
        ),
        Err(e) => {
            tracing::warn!(error = %e, table, "no nftables notifications: the table is repaired at the next resync");
            None
        }
    }
}

/// Ruleset-change notifications (the NFNLGRP_NFTABLES multicast group) for `table`:
/// each yields once per received burst that touched it. Runs on its own thread, which
/// ends when the receiver is dropped.
fn watch_table(table: &'static str) -> io::Result<tokio::sync::mpsc::Receiver<()>> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.add_membership(NFNLGRP_NFTABLES)?;
    set_opt(&sock, libc::SO_RCVTIMEO, &timeval(Duration::from_secs(1)))?;
    let _ = set_buf(&sock, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, RECV_BUF);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    std::thread::Builder::new()
        .name("nft-events".into())
        .spawn(move || {
            let mut buf = vec![0u8; RECV_BUF];
            while !tx.is_closed() {
                let hit = match sock.recv(&mut &mut buf[..], 0) {
                    Ok(n) => split_messages(&buf[..n]).iter().any(|m| {
                        let ty = u16::from_ne_bytes([m[4], m[5]]);
                        // Every nf_tables object message carries its table name as
                        // attribute 1 (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, …).
                        ty >> 8 == NFNL_SUBSYS_NFTABLES
                            && (ty & 0xff) as u8 != msg::NEWGEN
                            && m.len() >= 20
                            && attr_str(&m[20..], 1).as_deref() == Some(table)
                    }),
                    // Missed notifications: something may have changed.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => true,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        false
                    }
                    Err(_) => break,
                };
                if hit {
                    let _ = tx.try_send(());
                }
            }
        })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_nests_and_padding() {
        let mut a = Attrs::new();
        a.str(1, "converge").u32_be(3, 7).nest(4, |n| {
            n.bytes(1, &[1, 2, 3]);
        });
        let b = a.into_bytes();
        assert_eq!(b.len() % 4, 0);
        assert_eq!(attr_str(&b, 1).as_deref(), Some("converge"));
        assert_eq!(attr_u32_be(&b, 3), Some(7));
        let nest = attr(&b, 4).unwrap();
        assert_eq!(attr(nest, 1), Some(&[1u8, 2, 3][..]));
    }

    #[test]
    fn truncated_attributes_end_the_iteration() {
        let mut a = Attrs::new();
        a.u32_be(1, 1);
        let b = a.into_bytes();
        assert_eq!(attrs(&b[..6]).count(), 0);
        assert_eq!(attrs(&[]).count(), 0);
    }
}
