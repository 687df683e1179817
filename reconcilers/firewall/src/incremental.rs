//! The incremental plan. When the kernel holds the table converge built from a known
//! spec, the next spec is compared with that one and only the elements of the published
//! ports that differ are recomputed: a pass that changes one port of 10,000 does not
//! rebuild 10,000 elements to find it.

use crate::ruleset::{self, Element, ElementChange, Group};
use crate::{FirewallSpec, PublishedPort};
use converge_core::Facts;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// What a table converge committed (or found converged) was built from: the table is
/// exactly `ruleset::desired(spec, facts)` for any facts with these addresses.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    spec: FirewallSpec,
    /// Every container's addresses: the only facts the table depends on.
    addresses: Vec<(String, Vec<IpAddr>)>,
    /// Published ports skipped for want of a container address.
    unresolved: Vec<String>,
}

/// How the table of a [`Source`] turns into that of a new spec: the element changes,
/// and the edit of the port list (`removed` ports at `at` replaced by `inserted`).
#[derive(Clone, Debug)]
pub struct Patch {
    pub changes: Vec<ElementChange>,
    pub unresolved: Vec<String>,
    at: usize,
    removed: usize,
    inserted: Vec<PublishedPort>,
}

impl Source {
    pub fn new(spec: &FirewallSpec, facts: &Facts, unresolved: Vec<String>) -> Self {
        Self {
            spec: spec.clone(),
            addresses: facts
                .containers
                .iter()
                .map(|(name, f)| (name.clone(), f.addresses.clone()))
                .collect(),
            unresolved,
        }
    }

    fn same_addresses(&self, facts: &Facts) -> bool {
        self.addresses.len() == facts.containers.len()
            && self
                .addresses
                .iter()
                .zip(&facts.containers)
                .all(|((n, a), (m, f))| n == m && *a == f.addresses)
    }

    /// The patch from this source's table to the table of `spec`, or `None` when more
    /// than the published ports differ (filters, masquerading, container addresses):
    /// then the whole table is planned.
    pub fn patch(&self, spec: &FirewallSpec, facts: &Facts) -> Option<Patch> {
        let old = &self.spec;
        if old.input != spec.input
            || old.forward != spec.forward
            || old.masquerade != spec.masquerade
            || !self.same_addresses(facts)
        {
            return None;
        }
        // The ports that differ lie between the common head and the common tail.
        let (a, b) = (&old.published_ports[..], &spec.published_ports[..]);
        let (da, db) = (
            old.published_ports.digests(),
            spec.published_ports.digests(),
        );
        let at = da.iter().zip(db).take_while(|(x, y)| x == y).count();
        let tail = da[at..]
            .iter()
            .rev()
            .zip(db[at..].iter().rev())
            .take_while(|(x, y)| x == y)
            .count();
        let (gone, came) = (&a[at..a.len() - tail], &b[at..b.len() - tail]);

        // Validation makes map keys unique per port, so a port's elements are its own.
        let mut changed: BTreeMap<(&'static str, ruleset::Bytes), ElementChange> = BTreeMap::new();
        let mut record = |(set, key, data): Element, new: bool| {
            let c = changed
                .entry((set.name, key.clone()))
                .or_insert_with(|| ElementChange {
                    set,
                    key,
                    old: None,
                    new: None,
                });
            if new {
                c.new = Some(data);
            } else {
                c.old = Some(data);
            }
        };
        let mut unresolved = self.unresolved.clone();
        for p in gone {
            match ruleset::port_elements(p, facts) {
                Some(e) => e.into_iter().for_each(|e| record(e, false)),
                None => {
                    let note = ruleset::unresolved_note(p);
                    if let Some(i) = unresolved.iter().position(|u| *u == note) {
                        unresolved.remove(i);
                    }
                }
            }
        }
        for p in came {
            match ruleset::port_elements(p, facts) {
                Some(e) => e.into_iter().for_each(|e| record(e, true)),
                None => unresolved.push(ruleset::unresolved_note(p)),
            }
        }
        // `allowFrom` elements belong to all the ports of a protocol and port: recompute
        // the groups a differing port with `allowFrom` is in, before and after.
        let groups: BTreeSet<Group> = gone
            .iter()
            .chain(came)
            .filter(|p| p.allow_from.is_some())
            .map(ruleset::group_of)
            .collect();
        for g in groups {
            for (ports, new) in [(a, false), (b, true)] {
                let members = ports.iter().filter(|p| {
                    p.allow_from.is_some()
                        && ruleset::group_of(p) == g
                        && ruleset::port_elements(p, facts).is_some()
                });
                for e in ruleset::allow_elements(g, members) {
                    record(e, new);
                }
            }
        }
        Some(Patch {
            changes: changed.into_values().filter(|c| c.old != c.new).collect(),
            unresolved,
            at,
            removed: gone.len(),
            inserted: came.to_vec(),
        })
    }

    /// The source of the table once `patch` is committed.
    pub fn apply(&mut self, patch: &Patch) {
        self.spec
            .published_ports
            .splice(patch.at..patch.at + patch.removed, &patch.inserted);
        self.unresolved.clone_from(&patch.unresolved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use converge_core::{ContainerFacts, Problems};
    use proptest::prelude::*;
    use serde_json::json;

    /// Small value ranges so that ports collide, share allowFrom groups, and resolve or not.
    fn port() -> impl Strategy<Value = serde_json::Value> {
        (
            prop_oneof![Just("tcp"), Just("udp")],
            1u16..4,
            prop_oneof![Just(None), Just(Some("192.168.1.1")), Just(Some("fd00::1"))],
            prop_oneof![
                Just(json!({"address": "10.0.0.2", "port": 80})),
                Just(json!({"address": "fd00::2", "port": 81})),
                Just(json!({"container": "a", "port": 82})),
                Just(json!({"container": "b", "port": 83})),
            ],
            prop_oneof![
                Just(None),
                Just(Some(json!(["10.0.0.0/8"]))),
                Just(Some(json!(["10.0.0.0/8", "fd00::/8"]))),
                Just(Some(json!(["10.1.0.0/16", "192.168.0.0/16"]))),
            ],
        )
            .prop_map(|(proto, port, host_ip, target, allow)| {
                let mut p = json!({"protocol": proto, "hostPort": port, "target": target});
                if let Some(h) = host_ip {
                    p["hostIp"] = json!(h);
                }
                if let Some(a) = allow {
                    p["allowFrom"] = a;
                }
                p
            })
    }

    fn facts(a: Option<&str>, b: Option<&str>) -> Facts {
        let mut f = Facts::default();
        for (name, addr) in [("a", a), ("b", b)] {
            f.containers.insert(
                name.into(),
                ContainerFacts {
                    addresses: addr.into_iter().filter_map(|s| s.parse().ok()).collect(),
                    running: true,
                },
            );
        }
        f
    }

    fn valid(ports: &[serde_json::Value]) -> Option<FirewallSpec> {
        let spec: FirewallSpec = serde_json::from_value(json!({"publishedPorts": ports})).ok()?;
        let mut problems = Problems::default();
        crate::validate(&spec, "$.firewall", &mut problems);
        problems.is_empty().then_some(spec)
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    proptest! {
        /// Patching the table of one spec step by step gives exactly the table (and the
        /// skipped ports) planned from scratch for each next spec.
        #[test]
        fn patching_equals_planning_from_scratch(
            first in proptest::collection::vec(port(), 0..4),
            edits in proptest::collection::vec(
                (0usize..10, 0usize..3, proptest::collection::vec(port(), 0..3)), 1..12),
        ) {
            let f = facts(Some("10.88.0.3"), None);
            let mut ports = first;
            let Some(spec) = valid(&ports) else { return Ok(()) };
            let d = ruleset::desired(&spec, &f);
            let mut table = d.snapshot;
            let mut source = Source::new(&spec, &f, d.unresolved);
            for (at, removed, inserted) in edits {
                let at = at.min(ports.len());
                let removed = removed.min(ports.len() - at);
                let mut next = ports.clone();
                next.splice(at..at + removed, inserted);
                let Some(spec) = valid(&next) else { continue };
                ports = next;
                let patch = source.patch(&spec, &f).expect("only ports changed");
                table.apply(&patch.changes);
                source.apply(&patch);
                let want = ruleset::desired(&spec, &f);
                prop_assert_eq!(&table, &want.snapshot);
                prop_assert_eq!(sorted(source.unresolved.clone()), sorted(want.unresolved));
                prop_assert_eq!(&source.spec, &spec);
                prop_assert_eq!(source.spec.published_ports.digests(), spec.published_ports.digests());
            }
        }
    }

    #[test]
    fn other_changes_are_planned_whole() {
        let spec = valid(&[json!({"hostPort": 1, "target": {"container": "a", "port": 1}})])
            .expect("valid");
        let f = facts(Some("10.88.0.3"), None);
        let source = Source::new(&spec, &f, Vec::new());
        assert!(source
            .patch(&spec, &f)
            .is_some_and(|p| p.changes.is_empty()));
        // A container moved: every port may target it.
        assert!(source
            .patch(&spec, &facts(Some("10.88.0.4"), None))
            .is_none());
        let mut masq = spec.clone();
        masq.masquerade = true;
        assert!(source.patch(&masq, &f).is_none());
    }
}
