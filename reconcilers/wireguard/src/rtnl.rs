//! A small synchronous rtnetlink client (netlink-packet-route messages over a
//! netlink-sys socket) for the interface's link state, MTU, addresses and converge's
//! routes, plus the decoding of route, address and link notifications.
//!
//! Requests are a few tens of microseconds; they run on the caller's thread, bounded by
//! the socket's receive timeout (a hop to a blocking thread would cost more than the
//! request). One request is in flight per socket at a time (the socket sits behind a
//! mutex), so replies are matched by sequence number alone.

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::Duration;

/// The route protocol number that marks converge's WireGuard routes (`proto 0x9c`,
/// unused by the protocols in iproute2's rt_protos). Only routes carrying it are ever
/// listed, changed or deleted.
pub const ROUTE_PROTOCOL: u8 = 156;

/// rtnetlink multicast groups (linux/rtnetlink.h).
pub const RTNLGRP_LINK: u32 = 1;
pub const RTNLGRP_IPV4_IFADDR: u32 = 5;
pub const RTNLGRP_IPV4_ROUTE: u32 = 7;
pub const RTNLGRP_IPV6_IFADDR: u32 = 9;
pub const RTNLGRP_IPV6_ROUTE: u32 = 11;

/// What a link message says about one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkDesc {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub up: bool,
    /// `wireguard` for a kernel WireGuard link, `tun` for wireguard-go's device.
    pub kind: Option<String>,
}

fn set_timeout(sock: &Socket, opt: libc::c_int, after: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: after.as_secs() as libc::time_t,
        tv_usec: after.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt with a pointer to a timeval that lives for the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a route netlink socket, optionally subscribed to `groups`.
pub fn open(groups: &[u32], rcvbuf: usize) -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    for g in groups {
        sock.add_membership(*g)?;
    }
    if rcvbuf > 0 {
        sock.set_rx_buf_sz(rcvbuf)?;
    }
    Ok(sock)
}

/// The request socket.
pub struct Rtnl {
    inner: Mutex<Inner>,
}

struct Inner {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    pub fn new(timeout: Duration) -> io::Result<Self> {
        let sock = open(&[], 0)?;
        set_timeout(&sock, libc::SO_RCVTIMEO, timeout)?;
        set_timeout(&sock, libc::SO_SNDTIMEO, timeout)?;
        // Dumps are filtered by the kernel where it can (strict checking).
        let _ = sock.set_netlink_get_strict_chk(true);
        Ok(Self {
            inner: Mutex::new(Inner {
                sock,
                seq: 0,
                buf: Vec::with_capacity(1 << 16),
            }),
        })
    }

    /// Sends one request and collects the messages of its reply (a dump's entries, or
    /// nothing for an acknowledged change).
    pub fn request(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *inner;
        inner.seq = inner.seq.wrapping_add(1);
        let seq = inner.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut out = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut out);
        inner.sock.send_to(&out, &SocketAddr::new(0, 0), 0)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut found = Vec::new();
        loop {
            inner.buf.clear();
            inner.sock.recv(&mut inner.buf, 0)?;
            let mut off = 0;
            while off < inner.buf.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&inner.buf[off..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    // A late reply to a request that timed out.
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(found),
                    NetlinkPayload::Error(e) => {
                        if e.code.is_none() && !dump {
                            return Ok(found);
                        }
                        return Err(e.to_io());
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        found.push(m);
                        // A plain get is answered by one message, without an ACK.
                        if !dump && flags & NLM_F_ACK == 0 {
                            return Ok(found);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// The link named `name`, `None` when there is none.
    pub fn link(&self, name: &str) -> io::Result<Option<LinkDesc>> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(m), 0) {
            Ok(found) => Ok(found.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_desc(&l)),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a kernel WireGuard link; fails with EOPNOTSUPP without the module.
    pub fn add_wireguard_link(&self, name: &str) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Wireguard,
            )]));
        self.request(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Deletes link `index`; one already gone is success.
    pub fn del_link(&self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        match self.request(RouteNetlinkMessage::DelLink(m), NLM_F_ACK) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn set_mtu(&self, index: u32, mtu: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_ACK)
            .map(drop)
    }

    pub fn set_up(&self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_ACK)
            .map(drop)
    }

    /// The addresses of interface `index`, without link-local ones (the kernel's).
    pub fn addresses(&self, index: u32) -> io::Result<Vec<IpNet>> {
        let mut m = AddressMessage::default();
        m.header.index = index;
        let found = self.request(RouteNetlinkMessage::GetAddress(m), NLM_F_DUMP)?;
        let mut out: Vec<IpNet> = found
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => address_of(a),
                _ => None,
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    pub fn add_address(&self, index: u32, addr: IpNet) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::NewAddress(address_message(index, addr)),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    pub fn del_address(&self, index: u32, addr: IpNet) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::DelAddress(address_message(index, addr)),
            NLM_F_ACK,
        )
        .map(drop)
    }

    /// Every route of the main table that carries converge's marker, both families.
    pub fn routes(&self) -> io::Result<Vec<(IpNet, u32)>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut m = RouteMessage::default();
            m.header.address_family = family;
            m.header.table = RouteHeader::RT_TABLE_MAIN;
            m.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
            for r in self.request(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)? {
                if let RouteNetlinkMessage::NewRoute(r) = r {
                    out.extend(our_route(&r));
                }
            }
        }
        Ok(out)
    }

    pub fn add_route(&self, dst: IpNet, oif: u32) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::NewRoute(route_message(dst, oif)),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    pub fn del_route(&self, dst: IpNet, oif: u32) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::DelRoute(route_message(dst, oif)),
            NLM_F_ACK,
        )
        .map(drop)
    }
}

pub fn link_desc(l: &LinkMessage) -> LinkDesc {
    let mut d = LinkDesc {
        index: l.header.index,
        name: String::new(),
        mtu: 0,
        up: l.header.flags.contains(LinkFlags::Up),
        kind: None,
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => d.name = n.clone(),
            LinkAttribute::Mtu(m) => d.mtu = *m,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        d.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    d
}

fn family_of(addr: &IpNet) -> AddressFamily {
    match addr {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    }
}

fn address_message(index: u32, addr: IpNet) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = family_of(&addr);
    m.header.prefix_len = addr.prefix_len();
    m.header.index = index;
    m.header.scope = AddressScope::Universe;
    m.attributes.push(AddressAttribute::Local(addr.addr()));
    m.attributes.push(AddressAttribute::Address(addr.addr()));
    m
}

/// The address of an address message, `None` for link-local ones.
pub fn address_of(a: &AddressMessage) -> Option<IpNet> {
    if a.header.scope == AddressScope::Link {
        return None;
    }
    // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS
    // may be the peer's there.
    let ip = a
        .attributes
        .iter()
        .find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
        .or_else(|| {
            a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })?;
    IpNet::new(ip, a.header.prefix_len).ok()
}

fn route_message(dst: IpNet, oif: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family_of(&dst);
    m.header.destination_prefix_length = dst.prefix_len();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
    m.header.scope = RouteScope::Link;
    m.header.kind = RouteType::Unicast;
    m.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(
            dst.network(),
        )));
    m.attributes.push(RouteAttribute::Oif(oif));
    m
}

/// `(destination, output interface)` of a route carrying converge's marker in the main
/// table; `None` for any other route.
pub fn our_route(r: &RouteMessage) -> Option<(IpNet, u32)> {
    if r.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
        return None;
    }
    let mut table = u32::from(r.header.table);
    let mut dst: Option<IpAddr> = None;
    let mut oif = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some((*ip).into()),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = Some((*ip).into()),
            RouteAttribute::Oif(o) => oif = Some(*o),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let dst = match dst {
        Some(ip) => IpNet::new(ip, r.header.destination_prefix_length).ok()?,
        None => match r.header.address_family {
            AddressFamily::Inet6 => IpNet::new(std::net::Ipv6Addr::UNSPECIFIED.into(), 0).ok()?,
            _ => IpNet::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0).ok()?,
        },
    };
    Some((dst, oif?))
}

/// One decoded notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    RouteAdded(IpNet, u32),
    RouteRemoved(IpNet, u32),
    LinkChanged(LinkDesc),
    LinkRemoved(LinkDesc),
    AddressRemoved(u32, IpNet),
    AddressAdded(u32, IpNet),
}

/// Decodes the notifications in one datagram.
pub fn decode(buf: &[u8]) -> Vec<Notice> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < buf.len() {
        let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..]) else {
            break;
        };
        let len = msg.header.length as usize;
        if len == 0 {
            break;
        }
        off += (len + 3) & !3;
        if let NetlinkPayload::InnerMessage(m) = msg.payload {
            match m {
                RouteNetlinkMessage::NewRoute(r) => {
                    out.extend(our_route(&r).map(|(d, o)| Notice::RouteAdded(d, o)))
                }
                RouteNetlinkMessage::DelRoute(r) => {
                    out.extend(our_route(&r).map(|(d, o)| Notice::RouteRemoved(d, o)))
                }
                RouteNetlinkMessage::NewLink(l) => out.push(Notice::LinkChanged(link_desc(&l))),
                RouteNetlinkMessage::DelLink(l) => out.push(Notice::LinkRemoved(link_desc(&l))),
                RouteNetlinkMessage::NewAddress(a) => {
                    out.extend(address_of(&a).map(|n| Notice::AddressAdded(a.header.index, n)))
                }
                RouteNetlinkMessage::DelAddress(a) => {
                    out.extend(address_of(&a).map(|n| Notice::AddressRemoved(a.header.index, n)))
                }
                _ => {}
            }
        }
    }
    out
}

/// Reads every queued notification without blocking. `Ok(None)`: the kernel dropped
/// some (ENOBUFS), so whatever they described must be read again in full.
pub fn drain(sock: &Socket, buf: &mut Vec<u8>) -> io::Result<Option<Vec<Notice>>> {
    let mut out = Vec::new();
    let mut lost = false;
    loop {
        buf.clear();
        match sock.recv(buf, libc::MSG_DONTWAIT) {
            Ok(_) => out.extend(decode(buf)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => lost = true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((!lost).then_some(out))
}
