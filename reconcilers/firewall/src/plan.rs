//! The firewall plan, pure: one atomic batch from the difference between the spec the
//! table was built from and this one (when known and only published ports differ),
//! else an element delta between the observed and the desired table, else a rebuild.

use crate::incremental::{Patch, Source};
use crate::nfnl::Message;
use crate::ruleset::{self, Desired, ElementChange, Elements, SetDef, Snapshot, Structure};
use crate::FirewallSpec;
use converge_core::{Change, Facts, FieldChange, Op, Plan, Waiting};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What `observe` read: the ruleset generation and converge's table at that generation.
#[derive(Clone, Debug)]
pub struct Observed {
    pub genid: u32,
    pub table: Arc<Snapshot>,
    /// With Docker as the runtime: whether Docker's `DOCKER-USER` chain holds converge's
    /// rule (`docker::DockerUser`); `None` when not looked at.
    pub docker_user: Option<crate::docker::DockerUser>,
    /// What converge built this table from, when it committed it or found it
    /// converged: plan then compares specs instead of whole tables.
    pub source: Option<Arc<Source>>,
}

/// A driver operation.
#[derive(Clone, Debug)]
pub enum Action {
    /// Commit one atomic batch.
    Commit(Commit),
    /// The kernel already holds this spec's table (a restart, a drift that undid
    /// itself): remember what it is built from, so later passes plan from the spec
    /// difference. Changes nothing on the host.
    Remember { genid: u32, source: Arc<Source> },
    /// Insert converge's rule in Docker's `DOCKER-USER` chain (`docker`).
    DockerUser,
}

/// An atomic batch, guarded by the generation it was planned
/// against; `then` is the table once it is committed.
#[derive(Clone, Debug)]
pub struct Commit {
    pub genid: u32,
    pub messages: Vec<Message>,
    pub then: Then,
}

/// The table after a commit: a whole new one, or the observed one patched.
#[derive(Clone, Debug)]
pub enum Then {
    Table(Arc<Snapshot>, Arc<Source>),
    Patch(Patch),
}

/// Pure plan, one batch: from the difference between the spec the table was built from
/// and this one when that is known and only published ports differ; otherwise an
/// element delta between the observed and the desired table when their structure
/// matches, else a rebuild.
pub fn plan(spec: &FirewallSpec, observed: &Observed, facts: &Facts) -> Plan<Action> {
    let patch = observed
        .source
        .as_ref()
        .filter(|_| observed.table.exists)
        .and_then(|s| s.patch(spec, facts));
    match patch {
        Some(patch) => plan_patch(observed.genid, patch),
        None => plan_whole(spec, observed, facts),
    }
}

/// Published ports whose container has no address yet: shown, added once it has one.
fn waiting(unresolved: &[String]) -> Vec<Waiting> {
    unresolved
        .iter()
        .map(|u| Waiting::new("published-port", u, "waiting for its address"))
        .collect()
}

fn plan_patch(genid: u32, patch: Patch) -> Plan<Action> {
    let changes = patch.changes.iter().map(show).collect();
    let messages = delta_messages(&patch.changes);
    Plan {
        changes,
        waiting: waiting(&patch.unresolved),
        actions: if messages.is_empty() {
            Vec::new()
        } else {
            vec![Action::Commit(Commit {
                genid,
                messages,
                then: Then::Patch(patch),
            })]
        },
        ..Plan::default()
    }
}

fn plan_whole(spec: &FirewallSpec, observed: &Observed, facts: &Facts) -> Plan<Action> {
    let desired = ruleset::desired_keeping(spec, facts, Some(&observed.table));
    let have = &observed.table;
    let want = &desired.snapshot;
    let mut changes = Vec::new();
    let rebuild = !have.exists || have.structure != want.structure;
    if !have.exists {
        changes.push(Change::new(Op::Create, "table", "inet converge"));
    } else if rebuild {
        let mut c = Change::new(Op::Update, "table", "inet converge");
        c.fields = structure_diff(&have.structure, &want.structure);
        changes.push(c);
    }
    let empty = Elements::new();
    let mut delta = Vec::new();
    let names: std::collections::BTreeSet<&String> =
        have.elements.keys().chain(want.elements.keys()).collect();
    for name in names {
        let Some(def) = ruleset::set_def(name) else {
            continue;
        };
        let old = have.elements.get(name).unwrap_or(&empty);
        let new = want.elements.get(name).unwrap_or(&empty);
        element_delta(def, old, new, &mut delta);
    }
    changes.extend(delta.iter().map(show));
    let messages = if rebuild {
        ruleset::rebuild_messages(&desired)
    } else {
        delta_messages(&delta)
    };
    let Desired {
        snapshot,
        unresolved,
        ..
    } = desired;
    let waiting = waiting(&unresolved);
    let source = Arc::new(Source::new(spec, facts, unresolved));
    let action = if !messages.is_empty() {
        Action::Commit(Commit {
            genid: observed.genid,
            messages,
            then: Then::Table(Arc::new(snapshot), source),
        })
    } else if observed.source.as_ref() != Some(&source) {
        Action::Remember {
            genid: observed.genid,
            source,
        }
    } else {
        return Plan {
            changes,
            waiting,
            ..Plan::default()
        };
    };
    Plan {
        changes,
        actions: vec![action],
        waiting,
        ..Plan::default()
    }
}

/// Appends the changes that turn `old` into `new`, elements of one set.
fn element_delta(
    def: &'static SetDef,
    old: &Elements,
    new: &Elements,
    out: &mut Vec<ElementChange>,
) {
    let change =
        |key: &ruleset::Bytes, old: Option<&ruleset::Bytes>, new: Option<&ruleset::Bytes>| {
            ElementChange {
                set: def,
                key: key.clone(),
                old: old.cloned(),
                new: new.cloned(),
            }
        };
    // Both maps are sorted: one merge pass, no lookups.
    let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => break,
            (Some((ok, od)), Some((nk, nd))) if ok == nk => {
                if od != nd {
                    out.push(change(ok, Some(od), Some(nd)));
                }
                o.next();
                n.next();
            }
            (Some((ok, od)), next) if next.is_none_or(|(nk, _)| ok < nk) => {
                out.push(change(ok, Some(od), None));
                o.next();
            }
            (_, Some((nk, nd))) => {
                out.push(change(nk, None, Some(nd)));
                n.next();
            }
            (Some(_), None) => unreachable!("handled by the guard above"),
        }
    }
}

/// One element change as `converge diff` shows it.
fn show(c: &ElementChange) -> Change {
    let op = match (&c.old, &c.new) {
        (None, _) => Op::Create,
        (_, None) => Op::Delete,
        _ => Op::Update,
    };
    let change = Change::new(op, c.set.kind, ruleset::show_key(c.set, &c.key));
    // Plain sets have no value to show.
    let data = |d: &Option<ruleset::Bytes>| {
        d.as_ref()
            .filter(|d| !d.is_empty())
            .map(|d| ruleset::show_data(c.set, d))
    };
    let (old, new) = (data(&c.old), data(&c.new));
    if old.is_none() && new.is_none() {
        change
    } else {
        change.with_field(FieldChange::new("target", old, new))
    }
}

/// The batch messages of `changes` (sorted by set): every delete before any add, so a
/// changed map value or interval never collides with its old self.
fn delta_messages(changes: &[ElementChange]) -> Vec<Message> {
    let mut out = Vec::new();
    for add in [false, true] {
        for same_set in changes.chunk_by(|a, b| a.set.name == b.set.name) {
            let elems = same_set.iter().filter_map(|c| {
                let data = if add { &c.new } else { &c.old };
                data.as_ref().map(|d| (&c.key, d))
            });
            out.extend(ruleset::element_messages(same_set[0].set, elems, add));
        }
    }
    out
}

/// Field-level description of how the table's structure differs.
fn structure_diff(have: &Structure, want: &Structure) -> Vec<FieldChange> {
    fn chain(c: &ruleset::ChainState) -> String {
        let hook = match c.hook {
            Some(h) => format!(
                "{} hook {} priority {} policy {}",
                if h.nat { "nat" } else { "filter" },
                h.num,
                h.priority,
                if h.accept { "accept" } else { "drop" }
            ),
            None => "regular".into(),
        };
        format!("{hook}, {} rule(s)", c.rules.len())
    }
    fn diff<V: PartialEq>(
        fields: &mut Vec<FieldChange>,
        what: &str,
        old: &BTreeMap<String, V>,
        new: &BTreeMap<String, V>,
        show: impl Fn(&V) -> String,
    ) {
        let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        for k in keys {
            let (o, n) = (old.get(k), new.get(k));
            if o != n {
                let (os, ns) = (o.map(&show), n.map(&show));
                // Same hook and rule count but other rules: someone edited them.
                let os = if os == ns {
                    Some("rules edited".into())
                } else {
                    os
                };
                fields.push(FieldChange::new(format!("{what} {k}"), os, ns));
            }
        }
    }
    let mut fields = Vec::new();
    diff(&mut fields, "chain", &have.chains, &want.chains, chain);
    diff(&mut fields, "set", &have.sets, &want.sets, |s| {
        format!("{s:?}")
    });
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfnl::msg;
    use serde_json::json;

    fn spec(ports: std::ops::Range<u16>, target_port: u16) -> FirewallSpec {
        let published: Vec<_> = ports
            .map(|p| json!({"hostPort": p, "target": {"address": "10.0.0.2", "port": target_port}}))
            .collect();
        serde_json::from_value(json!({"publishedPorts": published})).unwrap()
    }

    fn observed(s: &FirewallSpec) -> Observed {
        Observed {
            genid: 7,
            table: Arc::new(ruleset::desired(s, &Facts::default()).snapshot),
            docker_user: None,
            source: None,
        }
    }

    /// The one batch of a plan.
    fn commit(p: &Plan<Action>) -> &Commit {
        match p.actions.as_slice() {
            [Action::Commit(c)] => c,
            other => panic!("want one commit, got {other:?}"),
        }
    }

    #[test]
    fn converged_table_plans_nothing_but_remembers_its_source() {
        let s = spec(1..100, 80);
        let p = plan(&s, &observed(&s), &Facts::default());
        assert!(p.changes.is_empty());
        assert!(
            matches!(p.actions.as_slice(), [Action::Remember { genid: 7, .. }]),
            "{:?}",
            p.actions
        );
        // Once remembered, the plan is empty.
        let known = Observed {
            source: match &p.actions[0] {
                Action::Remember { source, .. } => Some(source.clone()),
                Action::Commit(_) | Action::DockerUser => None,
            },
            ..observed(&s)
        };
        assert!(plan(&s, &known, &Facts::default()).is_empty());
    }

    /// After an agent restart the containers reconciler has not reported yet: a port to a
    /// container the facts do not know keeps the target in force (no moment without
    /// it); once the facts know the container, they decide.
    #[test]
    fn a_port_whose_container_is_not_known_yet_keeps_its_target_in_force() {
        let s: FirewallSpec = serde_json::from_value(json!({"publishedPorts": [
            {"hostPort": 3000, "target": {"container": "app", "port": 80}}
        ]}))
        .unwrap();
        let facts_with = |addresses: Vec<&str>| {
            let mut f = Facts::default();
            f.containers.insert(
                "app".into(),
                converge_core::ContainerFacts {
                    addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
                    running: !addresses.is_empty(),
                },
            );
            f
        };
        let in_force = Observed {
            genid: 7,
            table: Arc::new(ruleset::desired(&s, &facts_with(vec!["10.88.0.5"])).snapshot),
            docker_user: None,
            source: None,
        };
        // Facts not published yet: nothing removed, nothing waiting.
        let p = plan(&s, &in_force, &Facts::default());
        assert!(
            p.changes.is_empty() && p.waiting.is_empty(),
            "{:?}",
            p.changes
        );
        // The container known at another address: moved.
        let p = plan(&s, &in_force, &facts_with(vec!["10.88.0.9"]));
        assert_eq!(p.changes.len(), 1, "{:?}", p.changes);
        // Known without an address (stopped): removed, and the port waits.
        let p = plan(&s, &in_force, &facts_with(vec![]));
        assert_eq!(p.changes.len(), 1, "{:?}", p.changes);
        assert_eq!(p.waiting.len(), 1);
    }

    #[test]
    fn a_port_whose_container_has_no_address_waits_in_the_plan() {
        let s: FirewallSpec = serde_json::from_value(json!({"publishedPorts": [
            {"hostPort": 3000, "target": {"container": "app", "port": 80}}
        ]}))
        .unwrap();
        let p = plan(&s, &observed(&FirewallSpec::default()), &Facts::default());
        let shown: Vec<String> = p.waiting.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            shown,
            vec!["~ published-port tcp/3000 -> container app (waiting for its address)"]
        );
    }

    #[test]
    fn missing_table_is_built_in_one_batch() {
        let s = spec(1..3, 80);
        let p = plan(&s, &observed(&FirewallSpec::default()), &Facts::default());
        let p2 = plan(
            &s,
            &Observed {
                genid: 1,
                table: Arc::default(),
                docker_user: None,
                source: None,
            },
            &Facts::default(),
        );
        assert_eq!(p2.changes[0].to_string(), "+ table inet converge");
        assert_eq!(p2.actions.len(), 1);
        assert_eq!(commit(&p2).messages[0].ty, msg::NEWTABLE);
        // Table exists with the same structure: only the two elements are added.
        assert_eq!(p.actions.len(), 1);
        assert_eq!(commit(&p).messages.len(), 1);
        assert_eq!(commit(&p).genid, 7);
    }

    #[test]
    fn one_port_added_or_changed_is_one_element_delta() {
        let before = spec(1..1000, 80);
        let p = plan(&spec(1..1001, 80), &observed(&before), &Facts::default());
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].to_string(), "+ published-port ip tcp . 1000");
        let m = &commit(&p).messages;
        assert_eq!((m.len(), m[0].ty), (1, msg::NEWSETELEM));

        // A changed target is a delete and an add of the same key, in one batch.
        let mut after = before.clone();
        let mut ports = before.published_ports.to_vec();
        ports[5].target.port = 81;
        after.published_ports = ports.into();
        let p = plan(&after, &observed(&before), &Facts::default());
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].to_string(), "~ published-port ip tcp . 6");
        let types: Vec<u8> = commit(&p).messages.iter().map(|m| m.ty).collect();
        assert_eq!(types, [msg::DELSETELEM, msg::NEWSETELEM]);
    }

    #[test]
    fn a_known_source_plans_the_same_delta_from_the_spec_difference() {
        let before = spec(1..1000, 80);
        let d = ruleset::desired(&before, &Facts::default());
        let known = Observed {
            genid: 7,
            table: Arc::new(d.snapshot),
            docker_user: None,
            source: Some(Arc::new(Source::new(
                &before,
                &Facts::default(),
                d.unresolved,
            ))),
        };
        let mut after = spec(1..1001, 80);
        let mut ports = after.published_ports.to_vec();
        ports.remove(10);
        ports[5].target.port = 81;
        after.published_ports = ports.into();
        let whole = plan(&after, &observed(&before), &Facts::default());
        let fast = plan(&after, &known, &Facts::default());
        assert!(matches!(commit(&fast).then, Then::Patch(_)));
        assert_eq!(fast.changes, whole.changes);
        assert_eq!(fast.changes.len(), 3);
        let bytes = |p: &Plan<Action>| -> Vec<(u8, Vec<u8>)> {
            commit(p)
                .messages
                .iter()
                .map(|m| (m.ty, m.attrs.clone()))
                .collect()
        };
        assert_eq!(bytes(&fast), bytes(&whole));
        // The same spec again: nothing to do.
        assert!(plan(&before, &known, &Facts::default()).is_empty());
    }

    #[test]
    fn structure_change_rebuilds_and_names_the_difference() {
        let before = spec(1..3, 80);
        let mut after = before.clone();
        after.masquerade = true;
        let p = plan(&after, &observed(&before), &Facts::default());
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].to_string(), "~ table inet converge");
        assert_eq!(p.changes[0].fields[0].field, "chain postrouting");
        let m = &commit(&p).messages;
        assert_eq!(
            m[1].ty,
            msg::DELTABLE,
            "the old table is replaced in the batch"
        );
        assert!(m.iter().any(|m| m.ty == msg::NEWSETELEM));
    }
}
