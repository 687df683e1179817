//! Observed-state snapshot shared between reconcilers through the engine.
//!
//! Reconcilers never import each other. A reconciler that observes something another
//! one needs (a container's current address) returns it as a [`FactsUpdate`] from
//! `Reconciler::publish`; the engine merges it into one read-only [`Facts`] snapshot and
//! wakes the reconcilers that declared `watches_facts`.

use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// What the containers reconciler last saw of one container it manages.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ContainerFacts {
    /// Current addresses on the container network, IPv4 first.
    pub addresses: Vec<IpAddr>,
    pub running: bool,
}

/// This node's WireGuard identity (published by `wireguard`): what the control plane
/// builds the other nodes' peers from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WireguardFacts {
    pub interface: String,
    /// Base64 public key (never the private key).
    pub public_key: String,
    /// `kernel` or `userspace`.
    pub backend: String,
}

/// Read-only snapshot of facts published by reconcilers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Facts {
    /// Managed containers by document name (published by `containers`).
    pub containers: BTreeMap<String, ContainerFacts>,
    /// The node's WireGuard interface, once it has a key (published by `wireguard`).
    pub wireguard: Option<WireguardFacts>,
    /// The addresses each consumer (`firewall`, …) sends traffic to right now, as it
    /// has them in force on the host. The containers reconciler stops an instance it
    /// replaced only once no consumer uses its address any more (deploys that drop
    /// nothing).
    pub in_use: BTreeMap<String, BTreeSet<IpAddr>>,
}

/// A replacement for one part of [`Facts`], owned by exactly one reconciler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FactsUpdate {
    Containers(BTreeMap<String, ContainerFacts>),
    Wireguard(Option<WireguardFacts>),
    /// The addresses one consumer has in force (replaces that consumer's entry).
    InUse {
        consumer: String,
        addresses: BTreeSet<IpAddr>,
    },
}

impl Facts {
    /// The consumers that send traffic to any of `addresses` right now.
    pub fn users_of(&self, addresses: &[IpAddr]) -> Vec<&str> {
        self.in_use
            .iter()
            .filter(|(_, used)| addresses.iter().any(|a| used.contains(a)))
            .map(|(consumer, _)| consumer.as_str())
            .collect()
    }

    /// Applies `update`; returns true when the snapshot changed.
    pub fn merge(&mut self, update: FactsUpdate) -> bool {
        match update {
            FactsUpdate::Containers(c) => {
                if self.containers == c {
                    return false;
                }
                self.containers = c;
                true
            }
            FactsUpdate::Wireguard(w) => {
                if self.wireguard == w {
                    return false;
                }
                self.wireguard = w;
                true
            }
            FactsUpdate::InUse {
                consumer,
                addresses,
            } => {
                if self.in_use.get(&consumer) == Some(&addresses) {
                    return false;
                }
                self.in_use.insert(consumer, addresses);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_reports_change_only_when_different() {
        let mut f = Facts::default();
        let mut c = BTreeMap::new();
        c.insert(
            "web".to_string(),
            ContainerFacts {
                addresses: vec!["10.88.0.2".parse().unwrap()],
                running: true,
            },
        );
        assert!(f.merge(FactsUpdate::Containers(c.clone())));
        assert!(!f.merge(FactsUpdate::Containers(c)));
    }
}
