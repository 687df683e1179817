//! What the reconciler keeps between passes (the device as last read, its routes, the
//! link, resolved endpoints, the device watch's reference) and how converge's own
//! writes patch it, so that a one-peer change does not pay for a full read of the
//! device.

use super::devwatch::Watched;
use crate::plan::{self, Backend, Device, HostState, Link, PeerUpdate};
use crate::spec::PublicKey;
use crate::sum::DeviceSum;
use converge_core::DriverError;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

#[derive(Default)]
pub(super) struct Cache {
    pub(super) state: Arc<HostState>,
    /// Whether `state.routes` was listed and the notification feed has been intact since.
    pub(super) routes_listed: bool,
    /// The interface's addresses as the last pass saw them. The kernel flushes a link's
    /// IPv4 routes without a notification when its last IPv4 address goes or the link
    /// is set down, so either makes a pass list the routes again.
    pub(super) seen_addresses: Vec<IpNet>,
    pub(super) device_read_at: Option<Instant>,
    /// The link the device belongs to (a re-created link has a new index).
    pub(super) link: Option<Link>,
    /// Who holds each allowed IP of `state.device`, built on first use after the device
    /// was (re)read and kept current by converge's own peer writes.
    pub(super) owners: Option<plan::Owners>,
    pub(super) resolved: HashMap<String, (Instant, SocketAddr)>,
    /// Bumped whenever `state.device` or `watched` changes: the device watch trusts a
    /// read only if no change happened while it read, and recomputes `expected` then.
    pub(super) device_version: u64,
    /// While apply writes (the device is ahead of this copy until it is patched).
    pub(super) writing: bool,
    /// What the device watch looks at, as of the last pass.
    pub(super) watched: Option<Watched>,
    /// The sum of `state.device` at `device_version` (the device watch's reference).
    pub(super) expected: Option<(u64, DeviceSum)>,
    /// The device as the device watch last asked for a pass about it.
    pub(super) fired: Option<DeviceSum>,
}

impl Cache {
    /// The interface's index and backend, if it exists.
    pub(super) fn backend(&self) -> Result<(u32, Backend), DriverError> {
        self.link
            .as_ref()
            .map(|l| (l.index, l.backend))
            .ok_or_else(|| DriverError::Transient("the interface does not exist".into()))
    }

    /// Forgets the device so the next pass reads it in full (after a failed write:
    /// wireguard-go applies a request line by line, so part of it may have landed).
    pub(super) fn invalidate_device(&mut self) {
        self.device_version += 1;
        self.device_read_at = None;
        self.owners = None;
        Arc::make_mut(&mut self.state).baseline = None;
    }

    pub(super) fn patch_device(&mut self, f: impl FnOnce(&mut Device)) {
        self.device_version += 1;
        let state = Arc::make_mut(&mut self.state);
        f(state.device.get_or_insert_with(Device::default));
    }

    /// Patches the device after converge's own peer writes (`set`: these updates;
    /// `removed`: these keys), through the owner index: the cost of the change, not of
    /// the device.
    pub(super) fn patch_peers(&mut self, set: &[PeerUpdate], removed: &[PublicKey]) {
        self.device_version += 1;
        let device = Arc::make_mut(&mut self.state)
            .device
            .get_or_insert_with(Device::default);
        let owners = self.owners.get_or_insert_with(|| plan::owners_of(device));
        for u in set {
            plan::apply_peer_indexed(device, owners, u);
        }
        for k in removed {
            plan::remove_peer_indexed(device, owners, k);
        }
    }
}
