//! Pure planning of the networks converge owns: create the missing ones, replace one
//! whose subnets changed (only when no foreign container uses it), remove the ones the
//! document dropped once nothing that stays uses them.

use super::{recorded, stop_grace, Action, NetStep, Observed};
use crate::driver::{
    NetworkCreate, RuntimeContainer, RuntimeNetwork, LABEL_MANAGED, LABEL_NAME, LABEL_NODE,
};
use crate::spec::{Container, Network};
use converge_core::{Change, FieldChange, Op, Waiting};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

/// How long a network the document dropped waits before the next look when a
/// container converge does not manage still uses it.
pub const IN_USE_RETRY: Duration = Duration::from_secs(30);

/// The networks' part of a plan.
#[derive(Debug, Default)]
pub struct NetworkPlan {
    pub changes: Vec<Change>,
    /// Run before the containers' actions: creates and replacements.
    pub before: Vec<Action>,
    /// Run after the containers' actions: removals.
    pub after: Vec<Action>,
    pub waiting: Vec<Waiting>,
    /// Networks being replaced: the containers converge runs on them are recreated.
    pub replaced: BTreeSet<String>,
    /// Runtime names of converge's containers a network action removes first.
    pub removed: BTreeSet<String>,
}

/// Whether a runtime network carries this node's ownership labels.
pub fn owned(n: &RuntimeNetwork, node: &str) -> bool {
    n.labels.get(LABEL_MANAGED).map(String::as_str) == Some("true")
        && n.labels.get(LABEL_NODE).map(String::as_str) == Some(node)
}

/// The runtime-level desired state of a document network (gateways filled in: the
/// subnet's first address unless given). Validation has checked every value.
pub fn desired(n: &Network, node: &str) -> NetworkCreate {
    let mut subnets: Vec<(IpNet, IpAddr)> = n
        .subnets
        .iter()
        .filter_map(|s| {
            let net: IpNet = s.subnet.parse().ok()?;
            let gateway = match s.gateway.as_deref().and_then(|g| g.parse().ok()) {
                Some(g) => g,
                None => net.hosts().next()?,
            };
            Some((net, gateway))
        })
        .collect();
    subnets.sort();
    let labels = BTreeMap::from([
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (LABEL_NODE.to_string(), node.to_string()),
        (LABEL_NAME.to_string(), n.name.clone()),
    ]);
    NetworkCreate {
        name: n.name.clone(),
        subnets,
        labels,
    }
}

/// The subnets a runtime network has, parsed; a gateway the runtime does not report
/// counts as the subnet's first address (the default both runtimes use).
fn current(n: &RuntimeNetwork) -> Vec<(IpNet, Option<IpAddr>)> {
    let mut have: Vec<(IpNet, Option<IpAddr>)> = n
        .subnets
        .iter()
        .filter_map(|(s, g)| {
            let net: IpNet = s.parse().ok()?;
            let gw = g
                .as_deref()
                .and_then(|g| g.parse().ok())
                .or_else(|| net.hosts().next());
            Some((net, gw))
        })
        .collect();
    have.sort();
    have
}

fn show(subnets: impl IntoIterator<Item = (IpNet, Option<IpAddr>)>) -> String {
    subnets
        .into_iter()
        .map(|(net, gw)| match gw {
            Some(gw) => format!("{net} via {gw}"),
            None => net.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Steps removing converge's containers `rcs` (with their stop grace).
fn remove_first(rcs: &[&RuntimeContainer]) -> Vec<NetStep> {
    rcs.iter()
        .map(|rc| NetStep::RemoveContainer {
            id: rc.id.clone(),
            grace: recorded(rc).map_or(Duration::from_secs(10), |c| stop_grace(&c)),
        })
        .collect()
}

/// The networks' plan. `containers` is the document's containers section (None:
/// unmanaged, so every container converge runs stays where it is).
pub fn plan(
    networks: &[Network],
    containers: Option<&[Container]>,
    observed: &Observed,
    node: &str,
) -> NetworkPlan {
    let mut out = NetworkPlan::default();
    let on_host: BTreeMap<&str, &RuntimeNetwork> = observed
        .networks
        .iter()
        .map(|n| (n.name.as_str(), n))
        .collect();
    // Runtime name -> document name of the containers converge manages.
    let managed: BTreeMap<&str, &str> = observed
        .containers
        .iter()
        .filter_map(|rc| Some((rc.name.as_str(), rc.labels.get(LABEL_NAME)?.as_str())))
        .collect();
    let users = |name: &str| -> &[String] {
        observed
            .network_users
            .get(name)
            .map(Vec::as_slice)
            .unwrap_or_default()
    };
    let foreign = |name: &str| -> Vec<&str> {
        users(name)
            .iter()
            .filter(|u| !managed.contains_key(u.as_str()))
            .map(String::as_str)
            .collect()
    };
    for n in networks {
        let want = desired(n, node);
        let want_shown = show(want.subnets.iter().map(|(s, g)| (*s, Some(*g))));
        let Some(rn) = on_host.get(n.name.as_str()) else {
            // converge's containers created on it while it existed (removed by hand,
            // e.g. `podman network rm -f`, whose teardown may also take down the bridge
            // of instances converge restarted meanwhile): recreated on the new one, as
            // on a replaced network, or they would run detached from it.
            let stranded: Vec<&RuntimeContainer> = observed
                .containers
                .iter()
                .filter(|rc| {
                    recorded(rc).is_some_and(|c| c.network.as_deref() == Some(n.name.as_str()))
                })
                .collect();
            let mut change = Change::new(Op::Create, "network", &n.name)
                .with_field(FieldChange::new("subnets", None, Some(want_shown)));
            let mut steps = remove_first(&stranded);
            if !stranded.is_empty() {
                change.fields.push(FieldChange::new(
                    "strategy",
                    None,
                    Some("it vanished under converge's containers: remove them, create it, recreate them".into()),
                ));
                out.replaced.insert(n.name.clone());
                out.removed
                    .extend(stranded.iter().map(|rc| rc.name.clone()));
            }
            steps.push(NetStep::Create(want));
            out.changes.push(change);
            out.before.push(Action::Network {
                name: n.name.clone(),
                steps,
            });
            continue;
        };
        if !owned(rn, node) {
            let error = format!(
                "a network named {} exists and converge did not create it; rename one of them",
                n.name
            );
            out.changes.push(
                Change::new(Op::Update, "network", &n.name).with_field(FieldChange::new(
                    "error",
                    None,
                    Some(error.clone()),
                )),
            );
            out.before.push(Action::Invalid {
                object: format!("network {}", n.name),
                error,
            });
            continue;
        }
        let have = current(rn);
        let want_cmp: Vec<(IpNet, Option<IpAddr>)> =
            want.subnets.iter().map(|(s, g)| (*s, Some(*g))).collect();
        if have == want_cmp {
            continue;
        }
        let change = Change::new(Op::Update, "network", &n.name).with_field(FieldChange::new(
            "subnets",
            Some(show(have)),
            Some(want_shown),
        ));
        let strangers = foreign(&n.name);
        if !strangers.is_empty() {
            let error = format!(
                "its subnets changed, but containers converge does not manage use it ({}): not replaced; move them off it",
                strangers.join(", ")
            );
            out.changes.push(change.with_field(FieldChange::new(
                "error",
                None,
                Some(error.clone()),
            )));
            out.before.push(Action::Invalid {
                object: format!("network {}", n.name),
                error,
            });
            continue;
        }
        // converge's own containers on it go first (they are recreated on the new one).
        let ours: Vec<&RuntimeContainer> = users(&n.name)
            .iter()
            .filter_map(|u| observed.containers.iter().find(|rc| &rc.name == u))
            .collect();
        out.removed.extend(ours.iter().map(|rc| rc.name.clone()));
        let mut steps = remove_first(&ours);
        steps.push(NetStep::Remove);
        steps.push(NetStep::Create(want));
        out.changes.push(change.with_field(FieldChange::new(
            "strategy",
            None,
            Some("remove converge's containers on it, replace it, recreate them".into()),
        )));
        out.replaced.insert(n.name.clone());
        out.before.push(Action::Network {
            name: n.name.clone(),
            steps,
        });
    }
    // Networks converge created that the document dropped.
    let wanted: BTreeSet<&str> = networks.iter().map(|n| n.name.as_str()).collect();
    let staying_on = |network: &str, runtime_name: &str| -> bool {
        let (Some(doc_name), Some(spec)) = (managed.get(runtime_name), containers) else {
            return true; // not converge's, or containers unmanaged: it stays
        };
        spec.iter()
            .any(|c| c.name == *doc_name && c.network.as_deref() == Some(network))
    };
    for rn in observed
        .networks
        .iter()
        .filter(|rn| owned(rn, node) && !wanted.contains(rn.name.as_str()))
    {
        let staying: Vec<&str> = users(&rn.name)
            .iter()
            .filter(|u| staying_on(&rn.name, u))
            .map(String::as_str)
            .collect();
        if staying.is_empty() {
            out.changes
                .push(Change::new(Op::Delete, "network", &rn.name));
            out.after.push(Action::RemoveNetwork {
                name: rn.name.clone(),
            });
        } else {
            out.waiting.push(
                Waiting::new(
                    "network",
                    &rn.name,
                    format!("removal waits: still used by {}", staying.join(", ")),
                )
                .retry_after(IN_USE_RETRY),
            );
        }
    }
    out
}
