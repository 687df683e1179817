//! The device watch's read of a wireguard-go device: one UAPI `get` over a connection
//! kept open between looks (wireguard-go answers any number of requests on one: no
//! connect, accept and new goroutine per look), streamed through a buffer on the stack
//! and summed line by line into a [`DeviceSum`], allocating nothing. Statistics lines
//! (handshakes, counters) are skipped unparsed. A full read through wireguard-control
//! builds every peer (strings, vectors) and derives the public key on every call.

use crate::plan::SecretKey;
use crate::spec::PublicKey;
use crate::sum::{Counted, DeviceSum, PeerSum};
use ipnet::IpNet;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How wireguard-go shows "no pre-shared key".
const ZERO_KEY: &[u8] = &[b'0'; 64];

/// Bytes read per `read` call (a UAPI line is under 100 bytes; 1,000 peers ~350 KB).
const BUF: usize = 32 * 1024;

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("UAPI: bad {what}"))
}

/// Hex digit values; 0xff: not a hex digit.
const HEX: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

fn hex_key(v: &[u8]) -> io::Result<[u8; 32]> {
    if v.len() != 64 {
        return Err(bad("key"));
    }
    let mut k = [0u8; 32];
    let mut invalid = 0u8;
    for (i, pair) in v.chunks_exact(2).enumerate() {
        let (h, l) = (HEX[usize::from(pair[0])], HEX[usize::from(pair[1])]);
        invalid |= (h | l) & 0xf0;
        k[i] = h << 4 | (l & 0x0f);
    }
    if invalid != 0 {
        return Err(bad("key"));
    }
    Ok(k)
}

fn text<'a>(v: &'a [u8], what: &str) -> io::Result<&'a str> {
    std::str::from_utf8(v).map_err(|_| bad(what))
}

fn number<T: std::str::FromStr>(v: &[u8], what: &str) -> io::Result<T> {
    text(v, what)?.parse().map_err(|_| bad(what))
}

/// `address/prefix` (ipnet's own parser allocates per call).
fn net(v: &[u8]) -> Option<IpNet> {
    let slash = memchr::memrchr(b'/', v)?;
    let addr: IpAddr = std::str::from_utf8(&v[..slash]).ok()?.parse().ok()?;
    let prefix: u8 = std::str::from_utf8(&v[slash + 1..]).ok()?.parse().ok()?;
    IpNet::new(addr, prefix).ok()
}

/// Sums a UAPI `get` answer line by line.
struct Summer<'a> {
    counted: Counted<'a>,
    /// The public key of a private key (the caller may remember the last one).
    public_of: &'a mut dyn FnMut(&SecretKey) -> PublicKey,
    sum: DeviceSum,
    peer: Option<PeerSum>,
}

impl Summer<'_> {
    fn finish_peer(&mut self) {
        if let Some(p) = self.peer.take() {
            self.sum.add(&p, self.counted);
        }
    }

    fn peer(&mut self) -> io::Result<&mut PeerSum> {
        self.peer
            .as_mut()
            .ok_or_else(|| bad("peer field before public_key"))
    }

    /// One `key=value` line; `Ok(true)` at the end of the answer (`errno=0`).
    fn line(&mut self, line: &[u8]) -> io::Result<bool> {
        let eq = memchr::memchr(b'=', line).ok_or_else(|| bad("line"))?;
        let (key, v) = (&line[..eq], &line[eq + 1..]);
        match key {
            b"last_handshake_time_sec"
            | b"last_handshake_time_nsec"
            | b"tx_bytes"
            | b"rx_bytes"
            | b"protocol_version"
            | b"fwmark" => {}
            b"public_key" => {
                self.finish_peer();
                self.peer = Some(PeerSum::new(PublicKey(hex_key(v)?)));
            }
            b"allowed_ip" => {
                let n = net(v).ok_or_else(|| bad("allowed_ip"))?;
                self.peer()?.allowed(n);
            }
            b"endpoint" => {
                let e: SocketAddr = number(v, "endpoint")?;
                self.peer()?.endpoint(Some(e));
            }
            b"persistent_keepalive_interval" => {
                let k = number(v, "persistent_keepalive_interval")?;
                self.peer()?.keepalive(k);
            }
            b"preshared_key" => {
                // wireguard-go prints zeros for "none", the common case.
                let fp = match v {
                    ZERO_KEY => None,
                    _ => {
                        let k = hex_key(v)?;
                        (k != [0u8; 32]).then(|| SecretKey(k).fingerprint())
                    }
                };
                self.peer()?.psk(fp);
            }
            b"private_key" => {
                let k = SecretKey(hex_key(v)?);
                self.sum.public_key = Some((self.public_of)(&k));
            }
            b"listen_port" => self.sum.listen_port = number(v, "listen_port")?,
            b"errno" => {
                let errno: i32 = number(v, "errno")?;
                if errno != 0 {
                    return Err(io::Error::other(format!("UAPI get: errno {errno}")));
                }
                self.finish_peer();
                return Ok(true);
            }
            // A field a newer wireguard-go adds.
            _ => {}
        }
        Ok(false)
    }
}

/// Reads one UAPI `get` answer from `r` (after the request was sent) into a sum.
pub fn read_sum(
    r: &mut impl Read,
    counted: Counted<'_>,
    public_of: &mut dyn FnMut(&SecretKey) -> PublicKey,
) -> io::Result<DeviceSum> {
    let mut s = Summer {
        counted,
        public_of,
        sum: DeviceSum::default(),
        peer: None,
    };
    let mut buf = [0u8; BUF];
    let (mut start, mut end) = (0, 0);
    loop {
        while let Some(nl) = memchr::memchr(b'\n', &buf[start..end]) {
            let line = &buf[start..start + nl];
            start += nl + 1;
            if s.line(line)? {
                return Ok(s.sum);
            }
        }
        buf.copy_within(start..end, 0);
        end -= start;
        start = 0;
        if end == buf.len() {
            return Err(bad("line (too long)"));
        }
        match r.read(&mut buf[end..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => end += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Opens a UAPI connection (wireguard-go serves any number of requests on one).
pub fn connect(sock: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// Asks for the device on an open UAPI connection and sums the answer. After an error
/// the connection is in an unknown state: drop it.
pub fn get_sum(
    s: &mut UnixStream,
    counted: Counted<'_>,
    public_of: &mut dyn FnMut(&SecretKey) -> PublicKey,
) -> io::Result<DeviceSum> {
    s.write_all(b"get=1\n\n")?;
    read_sum(s, counted, public_of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Device, PeerState};

    fn hex(k: &[u8; 32]) -> String {
        k.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A wireguard-go answer for `d` (peers and allowed IPs in the order given).
    fn answer(private: &SecretKey, d: &Device, order: &[PublicKey]) -> String {
        let mut s = format!(
            "private_key={}\nlisten_port={}\n",
            hex(&private.0),
            d.listen_port
        );
        for k in order {
            let p = &d.peers[k];
            s += &format!(
                "public_key={}\npreshared_key={}\nprotocol_version=1\n",
                hex(&k.0),
                hex(&[0; 32])
            );
            if let Some(e) = p.endpoint {
                s += &format!("endpoint={e}\n");
            }
            s += &format!(
                "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\ntx_bytes=92\nrx_bytes=4711\npersistent_keepalive_interval={}\n",
                p.keepalive
            );
            for n in p.allowed.iter().rev() {
                s += &format!("allowed_ip={n}\n");
            }
        }
        s + "errno=0\n\n"
    }

    #[test]
    fn a_uapi_answer_sums_as_the_device_it_describes() {
        let private = SecretKey([5; 32]);
        let mut d = Device {
            public_key: Some(private.public()),
            listen_port: 51820,
            ..Device::default()
        };
        for i in 1..=40u8 {
            d.peers.insert(
                PublicKey([i; 32]),
                PeerState {
                    endpoint: (i % 2 == 0).then(|| format!("[fd00::{i}]:51820").parse().unwrap()),
                    allowed: vec![
                        format!("10.1.{i}.0/24").parse().unwrap(),
                        format!("fd00:1::{i}/128").parse().unwrap(),
                    ],
                    keepalive: u16::from(i % 3) * 10,
                    ..PeerState::default()
                },
            );
        }
        let mut order: Vec<PublicKey> = d.peers.keys().copied().collect();
        order.sort();
        order.reverse();
        let text = answer(&private, &d, &order);
        let all = |_: &PublicKey| true;
        let mut derived = 0;
        let mut public_of = |k: &SecretKey| {
            derived += 1;
            k.public()
        };
        // Read in small pieces, so lines straddle reads.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(buf.len()).min(7);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let got = read_sum(&mut Trickle(text.as_bytes()), &all, &mut public_of).unwrap();
        assert_eq!(got, DeviceSum::of(&d, &all));
        assert_eq!(derived, 1);

        // A peer's allowed IP changed by hand.
        let mut changed = d.clone();
        changed.peers.get_mut(&PublicKey([3; 32])).unwrap().allowed[0] =
            "10.9.9.9/32".parse().unwrap();
        let text = answer(&private, &changed, &order);
        let got = read_sum(&mut text.as_bytes(), &all, &mut |k| k.public()).unwrap();
        assert_ne!(got, DeviceSum::of(&d, &all));
    }

    #[test]
    fn errors_and_truncation_are_errors() {
        let all = |_: &PublicKey| true;
        let mut pk = |k: &SecretKey| k.public();
        for text in [
            "listen_port=1\nerrno=19\n\n",
            "listen_port=1\n",
            "allowed_ip=10.0.0.0/8\nerrno=0\n\n",
            "listen_port=x\nerrno=0\n\n",
        ] {
            assert!(
                read_sum(&mut text.as_bytes(), &all, &mut pk).is_err(),
                "{text}"
            );
        }
        let empty = read_sum(&mut "errno=0\n\n".as_bytes(), &all, &mut pk).unwrap();
        assert_eq!(empty, DeviceSum::default());
    }
}
