//! A device's configuration as one small value, [`DeviceSum`]: its public key, listen
//! port, peer count and a digest of every peer's configuration (key, allowed IPs,
//! keepalive, pre-shared key, and the endpoint where converge sets one). Peer
//! statistics (handshakes, counters) and the endpoints of peers without a configured one
//! (WireGuard learns them from the peer: roaming) are left out, since they change on
//! their own. The device watch compares the sum of a cheap read of the device with the
//! sum of converge's copy; a difference means someone changed the device.
//!
//! Peers and their allowed IPs come in any order (wireguard-go lists its peers from a Go
//! map), so their digests are added (wrapping), not chained. Digests are keyed per
//! process ([`crate::spec::digest`]).

use crate::plan::Device;
use crate::spec::{digest, PublicKey};
use ipnet::IpNet;
use std::net::SocketAddr;
use std::sync::OnceLock;

/// Whether a peer's endpoint counts (converge sets it), by public key.
pub type Counted<'a> = &'a dyn Fn(&PublicKey) -> bool;

/// A device's configuration as far as converge sets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceSum {
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub peers: usize,
    /// The wrapping sum of every peer's [`PeerSum`] digest.
    pub digest: u64,
}

/// One peer's configuration, fed field by field (in any order after `new`).
pub struct PeerSum {
    key: PublicKey,
    endpoint: Option<SocketAddr>,
    keepalive: u16,
    psk: Option<u64>,
    /// The wrapping sum of its allowed IPs' mixes (hashed with the key in `digest`).
    allowed: u64,
}

impl PeerSum {
    pub fn new(key: PublicKey) -> Self {
        Self {
            key,
            endpoint: None,
            keepalive: 0,
            psk: None,
            allowed: 0,
        }
    }

    pub fn key(&self) -> &PublicKey {
        &self.key
    }

    pub fn endpoint(&mut self, e: Option<SocketAddr>) {
        self.endpoint = e;
    }

    /// 0: off.
    pub fn keepalive(&mut self, k: u16) {
        self.keepalive = k;
    }

    /// The pre-shared key's fingerprint ([`crate::plan::SecretKey::fingerprint`]).
    pub fn psk(&mut self, fingerprint: Option<u64>) {
        self.psk = fingerprint;
    }

    /// One allowed IP (truncated to its network, as converge keeps them).
    pub fn allowed(&mut self, n: IpNet) {
        self.allowed = self.allowed.wrapping_add(mix(n));
    }

    fn digest(&self, counted: Counted<'_>) -> u64 {
        let endpoint = self.endpoint.filter(|_| counted(&self.key));
        digest(&(self.key.0, endpoint, self.keepalive, self.psk, self.allowed))
    }
}

/// A keyed mix of one allowed IP: a multiply-fold under per-process random keys, a
/// few nanoseconds against SipHash's ~50 (a look at 1,000 peers sums 2,000 of them).
/// The peer's key binds them in [`PeerSum`]'s digest.
fn mix(n: IpNet) -> u64 {
    static KEYS: OnceLock<[u64; 2]> = OnceLock::new();
    let k = KEYS.get_or_init(|| [digest(&1u8) | 1, digest(&2u8)]);
    let (bits, family) = match n.trunc() {
        IpNet::V4(v) => (u128::from(u32::from(v.addr())), 4u64),
        IpNet::V6(v) => (u128::from(v.addr()), 6u64),
    };
    let tag = (family << 8 | u64::from(n.prefix_len())) << 48;
    let a = (bits >> 64) as u64 ^ k[0];
    let b = bits as u64 ^ k[1] ^ tag;
    let m = u128::from(a) * u128::from(b);
    (m as u64) ^ ((m >> 64) as u64)
}

impl DeviceSum {
    /// Adds a finished peer.
    pub fn add(&mut self, p: &PeerSum, counted: Counted<'_>) {
        self.peers += 1;
        self.digest = self.digest.wrapping_add(p.digest(counted));
    }

    /// The sum of a device as converge keeps it (or as a full read returns it).
    pub fn of(d: &Device, counted: Counted<'_>) -> DeviceSum {
        let mut s = DeviceSum {
            public_key: d.public_key,
            listen_port: d.listen_port,
            ..DeviceSum::default()
        };
        for (k, p) in &d.peers {
            let mut ps = PeerSum::new(*k);
            ps.endpoint(p.endpoint);
            ps.keepalive(p.keepalive);
            ps.psk(p.psk);
            for n in &p.allowed {
                ps.allowed(*n);
            }
            s.add(&ps, counted);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PeerState;
    use std::time::SystemTime;

    fn dev() -> Device {
        let mut d = Device {
            public_key: Some(PublicKey([9; 32])),
            listen_port: 51820,
            ..Device::default()
        };
        for i in 1..=3u8 {
            d.peers.insert(
                PublicKey([i; 32]),
                PeerState {
                    endpoint: Some(format!("192.0.2.{i}:51820").parse().unwrap()),
                    allowed: vec![
                        format!("10.0.{i}.0/24").parse().unwrap(),
                        format!("fd00::{i}/128").parse().unwrap(),
                    ],
                    ..PeerState::default()
                },
            );
        }
        d
    }

    fn all(_: &PublicKey) -> bool {
        true
    }

    #[test]
    fn statistics_and_uncounted_endpoints_do_not_count() {
        let d = dev();
        let base = DeviceSum::of(&d, &all);
        let mut busy = d.clone();
        for p in busy.peers.values_mut() {
            p.rx_bytes += 1000;
            p.tx_bytes += 7;
            p.last_handshake = Some(SystemTime::now());
        }
        assert_eq!(DeviceSum::of(&busy, &all), base);

        // Peer 1 roams: counts only where converge sets its endpoint.
        let mut roamed = d.clone();
        roamed.peers.get_mut(&PublicKey([1; 32])).unwrap().endpoint =
            Some("198.51.100.1:4000".parse().unwrap());
        assert_ne!(DeviceSum::of(&roamed, &all), base);
        let not_one = |k: &PublicKey| k.0[0] != 1;
        assert_eq!(
            DeviceSum::of(&roamed, &not_one),
            DeviceSum::of(&d, &not_one)
        );
    }

    #[test]
    fn every_configured_field_counts() {
        let d = dev();
        let base = DeviceSum::of(&d, &all);
        fn two(d: &mut Device) -> &mut PeerState {
            d.peers.get_mut(&PublicKey([2; 32])).unwrap()
        }
        let changes: [fn(&mut Device); 8] = [
            |d| d.public_key = Some(PublicKey([8; 32])),
            |d| d.listen_port = 1,
            |d| {
                d.peers.remove(&PublicKey([2; 32]));
            },
            |d| {
                two(d).allowed.pop();
            },
            |d| two(d).keepalive = 25,
            |d| two(d).psk = Some(1),
            // An allowed IP moved from one peer to another.
            |d| {
                let n = two(d).allowed.remove(0);
                let three = d.peers.get_mut(&PublicKey([3; 32])).unwrap();
                three.allowed.push(n);
            },
            |d| {
                d.peers.insert(PublicKey([7; 32]), PeerState::default());
            },
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut c = d.clone();
            change(&mut c);
            assert_ne!(DeviceSum::of(&c, &all), base, "change {i}");
        }
    }

    #[test]
    fn order_does_not_count() {
        let d = dev();
        let mut s = DeviceSum {
            public_key: d.public_key,
            listen_port: d.listen_port,
            ..DeviceSum::default()
        };
        // Peers and allowed IPs in reverse order.
        let mut keys: Vec<_> = d.peers.keys().copied().collect();
        keys.sort();
        for k in keys.iter().rev() {
            let p = &d.peers[k];
            let mut ps = PeerSum::new(*k);
            for n in p.allowed.iter().rev() {
                ps.allowed(*n);
            }
            ps.endpoint(p.endpoint);
            s.add(&ps, &all);
        }
        assert_eq!(s, DeviceSum::of(&d, &all));
    }
}
