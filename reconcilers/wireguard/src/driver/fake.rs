//! An in-memory host for unit tests: one interface with WireGuard's semantics (an
//! allowed IP belongs to one peer at a time), addresses, and routes that carry the marker.

use super::{RouteChange, WgDriver};
use crate::plan::{Backend, Device, Link, PeerUpdate, Route, SecretKey};
use crate::spec::PublicKey;
use converge_core::DriverError;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Mutex, MutexGuard};

#[derive(Debug, Default)]
pub struct FakeHost {
    pub link: Option<Link>,
    pub addresses: BTreeSet<IpNet>,
    pub routes: HashSet<Route>,
    pub device: Device,
    pub next_index: u32,
    /// Route notifications not read yet (our own changes echo, as in the kernel).
    pub changes: Vec<RouteChange>,
    /// Operations performed, for assertions (`set_peers 2`, `add_route 10.0.0.1/32`).
    pub calls: Vec<String>,
    /// Number of full device reads.
    pub device_reads: usize,
    /// WireGuard links under other names (an interface the document renamed).
    pub others: BTreeMap<String, Link>,
    /// The name `link` was created under (None: it answers to any name).
    pub link_name: Option<String>,
}

impl FakeHost {
    /// Removes the interface (and, as the kernel does, its routes and addresses).
    pub fn delete_link(&mut self) {
        if let Some(l) = self.link.take() {
            let gone: Vec<Route> = self
                .routes
                .iter()
                .filter(|r| r.oif == l.index)
                .copied()
                .collect();
            for r in gone {
                self.routes.remove(&r);
                self.changes.push(RouteChange::Removed(r));
            }
        }
        self.addresses.clear();
        self.device = Device::default();
    }

    /// Deletes an address by hand. As the kernel does, removing the link's last IPv4
    /// address flushes its IPv4 routes without a notification.
    pub fn delete_address(&mut self, addr: IpNet) {
        self.addresses.remove(&addr);
        if addr.addr().is_ipv4() && !self.addresses.iter().any(|a| a.addr().is_ipv4()) {
            self.flush_ipv4_routes();
        }
    }

    /// Sets the link down by hand: the kernel flushes its IPv4 routes silently (IPv6
    /// ones go with a notification).
    pub fn set_down(&mut self) {
        let Some(l) = self.link.as_mut() else { return };
        l.up = false;
        let index = l.index;
        self.flush_ipv4_routes();
        let gone: Vec<Route> = self
            .routes
            .iter()
            .filter(|r| r.oif == index)
            .copied()
            .collect();
        for r in gone {
            self.routes.remove(&r);
            self.changes.push(RouteChange::Removed(r));
        }
    }

    fn flush_ipv4_routes(&mut self) {
        let index = self.link.as_ref().map(|l| l.index);
        self.routes
            .retain(|r| Some(r.oif) != index || !r.dst.addr().is_ipv4());
    }
}

#[derive(Default)]
pub struct Fake {
    host: Mutex<FakeHost>,
}

impl Fake {
    pub fn host(&self) -> MutexGuard<'_, FakeHost> {
        self.host.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn index(&self, index: u32) -> Result<MutexGuard<'_, FakeHost>, DriverError> {
        let h = self.host();
        match &h.link {
            Some(l) if l.index == index => Ok(h),
            _ => Err(DriverError::Failed(format!("no link {index}"))),
        }
    }

    fn device(&self) -> Result<MutexGuard<'_, FakeHost>, DriverError> {
        let h = self.host();
        if h.link.is_none() {
            return Err(DriverError::Transient("no device".into()));
        }
        Ok(h)
    }
}

impl WgDriver for Fake {
    fn link(&self, iface: &str) -> Result<Option<Link>, DriverError> {
        let h = self.host();
        let main = h.link_name.as_deref().is_none_or(|n| n == iface);
        Ok(h.others
            .get(iface)
            .cloned()
            .or_else(|| h.link.clone().filter(|_| main)))
    }

    fn addresses(&self, index: u32) -> Result<Vec<IpNet>, DriverError> {
        Ok(self.index(index)?.addresses.iter().copied().collect())
    }

    fn routes(&self) -> Result<HashSet<Route>, DriverError> {
        let mut h = self.host();
        h.calls.push("routes".into());
        Ok(h.routes.clone())
    }

    fn route_changes(&self) -> Result<Option<Vec<RouteChange>>, DriverError> {
        Ok(Some(std::mem::take(&mut self.host().changes)))
    }

    fn read_device(&self, _iface: &str, _backend: Backend) -> Result<Device, DriverError> {
        let mut h = self.device()?;
        h.device_reads += 1;
        Ok(h.device.clone())
    }

    fn create(&self, iface: &str) -> Result<Backend, DriverError> {
        let mut h = self.host();
        if let (Some(l), Some(name)) = (h.link.take(), h.link_name.take()) {
            // Another interface becomes one of the others; this one is created.
            if name != iface {
                h.others.insert(name, l);
            } else {
                h.link = Some(l);
                h.link_name = Some(name);
            }
        }
        if h.link.is_some() {
            return Err(DriverError::Failed("exists".into()));
        }
        h.link_name = Some(iface.to_string());
        h.next_index += 1;
        h.link = Some(Link {
            index: h.next_index + 10,
            mtu: 1420,
            up: false,
            backend: Backend::Userspace,
        });
        h.device = Device::default();
        h.calls.push("create".into());
        Ok(Backend::Userspace)
    }

    fn delete(&self, iface: &str) -> Result<(), DriverError> {
        let mut h = self.host();
        h.calls.push(format!("delete {iface}"));
        if h.others.remove(iface).is_none() && h.link_name.as_deref().is_none_or(|n| n == iface) {
            h.delete_link();
        }
        Ok(())
    }

    fn configure(
        &self,
        _iface: &str,
        _backend: Backend,
        private_key: Option<&SecretKey>,
        listen_port: Option<u16>,
    ) -> Result<(), DriverError> {
        let mut h = self.device()?;
        if let Some(k) = private_key {
            h.device.public_key = Some(k.public());
        }
        if let Some(p) = listen_port {
            h.device.listen_port = p;
        }
        h.calls.push("configure".into());
        Ok(())
    }

    fn set_peers(
        &self,
        _iface: &str,
        _backend: Backend,
        peers: &[&PeerUpdate],
    ) -> Result<(), DriverError> {
        let mut h = self.device()?;
        for p in peers {
            crate::plan::apply_peer(&mut h.device, p);
        }
        h.calls.push(format!("set_peers {}", peers.len()));
        Ok(())
    }

    fn remove_peers(
        &self,
        _iface: &str,
        _backend: Backend,
        keys: &[PublicKey],
    ) -> Result<(), DriverError> {
        let mut h = self.device()?;
        for k in keys {
            h.device.peers.remove(k);
        }
        h.calls.push(format!("remove_peers {}", keys.len()));
        Ok(())
    }

    fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), DriverError> {
        let mut h = self.index(index)?;
        if let Some(l) = h.link.as_mut() {
            l.mtu = mtu;
        }
        Ok(())
    }

    fn set_up(&self, index: u32) -> Result<(), DriverError> {
        let mut h = self.index(index)?;
        if let Some(l) = h.link.as_mut() {
            l.up = true;
        }
        Ok(())
    }

    fn add_address(&self, index: u32, addr: IpNet) -> Result<(), DriverError> {
        self.index(index)?.addresses.insert(addr);
        Ok(())
    }

    fn del_address(&self, index: u32, addr: IpNet) -> Result<(), DriverError> {
        self.index(index)?.addresses.remove(&addr);
        Ok(())
    }

    fn add_route(&self, dst: IpNet, oif: u32) -> Result<(), DriverError> {
        let mut h = self.index(oif)?;
        let r = Route { dst, oif };
        if !h.routes.insert(r) {
            return Err(DriverError::Failed(format!("route {dst} exists")));
        }
        h.changes.push(RouteChange::Added(r));
        h.calls.push(format!("add_route {dst}"));
        Ok(())
    }

    fn del_route(&self, route: Route) -> Result<(), DriverError> {
        let mut h = self.host();
        if h.routes.remove(&route) {
            h.changes.push(RouteChange::Removed(route));
        }
        h.calls.push(format!("del_route {}", route.dst));
        Ok(())
    }
}
