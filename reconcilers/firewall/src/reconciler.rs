//! The firewall reconciler: observe converge's nftables table, plan an element-level delta
//! (or a rebuild when the structure differs), apply it as one atomic batch.

use crate::driver::{CommitError, NftDriver};
use crate::nfnl::Message;
use crate::ruleset::{self, set_def, Bytes, Desired, Elements, SetDef, Snapshot, Structure};
use crate::FirewallSpec;
use converge_core::{Change, DriverError, Facts, FieldChange, ObjectOutcome, Op, Plan, Reconciler};
use futures::stream::BoxStream;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tracing::{info, warn};

/// What `observe` read: the ruleset generation and converge's table at that generation.
#[derive(Clone, Debug)]
pub struct Observed {
    pub genid: u32,
    pub table: Arc<Snapshot>,
}

/// The one driver operation: an atomic batch, guarded by the generation it was planned
/// against; `result` is the table once it is committed.
#[derive(Clone, Debug)]
pub struct Commit {
    pub genid: u32,
    pub messages: Vec<Message>,
    pub result: Arc<Snapshot>,
}

/// The firewall reconciler over a driver.
pub struct Firewall<D> {
    driver: Arc<D>,
    /// The table as of a generation. Any commit by anyone bumps the generation, so an
    /// unchanged generation proves the kernel still holds exactly this table and observe
    /// can skip the dump (one netlink round trip instead of reading every element).
    cache: Mutex<Option<(u32, Arc<Snapshot>)>>,
}

impl<D: NftDriver> Firewall<D> {
    pub fn new(driver: D) -> Self {
        Self {
            driver: Arc::new(driver),
            cache: Mutex::new(None),
        }
    }

    fn cached(&self, genid: u32) -> Option<Arc<Snapshot>> {
        let cache = self.cache.lock().ok()?;
        cache
            .as_ref()
            .filter(|(g, _)| *g == genid)
            .map(|(_, s)| s.clone())
    }

    fn remember(&self, genid: u32, table: Arc<Snapshot>) {
        if let Ok(mut c) = self.cache.lock() {
            *c = Some((genid, table));
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DriverError> + Send + 'static,
) -> Result<T, DriverError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DriverError::Failed(format!("netlink task: {e}")))?
}

impl<D: NftDriver> Reconciler for Firewall<D> {
    type Spec = FirewallSpec;
    type Observed = Observed;
    type Action = Commit;

    fn name(&self) -> &'static str {
        "firewall"
    }

    /// Container targets follow the containers' addresses.
    fn watches_facts(&self) -> bool {
        true
    }

    /// A deleted table, flushed chain or edited element is restored at once.
    fn host_events(&self) -> Option<BoxStream<'static, ()>> {
        self.driver.events()
    }

    async fn observe(&self, _spec: &FirewallSpec) -> Result<Observed, DriverError> {
        let d = self.driver.clone();
        let genid = blocking(move || d.generation()).await?;
        if let Some(table) = self.cached(genid) {
            return Ok(Observed { genid, table });
        }
        let d = self.driver.clone();
        let table = Arc::new(blocking(move || d.read()).await?);
        self.remember(genid, table.clone());
        Ok(Observed { genid, table })
    }

    fn plan(&self, spec: &FirewallSpec, observed: &Observed, facts: &Facts) -> Plan<Commit> {
        plan(spec, observed, facts)
    }

    async fn apply(&self, _spec: &FirewallSpec, plan: Plan<Commit>) -> Vec<ObjectOutcome> {
        let mut outcomes = Vec::new();
        for commit in plan.actions {
            let d = self.driver.clone();
            let Commit {
                genid,
                messages,
                result,
            } = commit;
            info!(messages = messages.len(), "committing nftables batch");
            let r = tokio::task::spawn_blocking(move || d.commit(&messages, genid)).await;
            let outcome = match r {
                Ok(Ok(())) => {
                    // One commit bumps the generation by exactly one (skipping 0); if
                    // that guess is ever wrong the next observe just reads the table.
                    let next = genid.wrapping_add(1).max(1);
                    self.remember(next, result);
                    Ok(())
                }
                Ok(Err(CommitError::Stale(e))) => {
                    warn!(error = %e, "nftables ruleset changed during the pass; will retry");
                    Err(e.to_string())
                }
                Ok(Err(CommitError::Failed(e))) => Err(e.to_string()),
                Err(e) => Err(format!("netlink task: {e}")),
            };
            outcomes.push(match outcome {
                Ok(()) => ObjectOutcome::ok("table inet converge"),
                Err(e) => ObjectOutcome::failed("table inet converge", e),
            });
        }
        outcomes
    }
}

/// Pure plan: element delta when the structure matches, else a rebuild; one batch.
pub fn plan(spec: &FirewallSpec, observed: &Observed, facts: &Facts) -> Plan<Commit> {
    let desired = ruleset::desired(spec, facts);
    for u in &desired.unresolved {
        warn!(port = %u, "published port skipped");
    }
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
    let mut deletes = Vec::new();
    let mut adds = Vec::new();
    let names: std::collections::BTreeSet<&String> =
        have.elements.keys().chain(want.elements.keys()).collect();
    for name in names {
        let Some(def) = set_def(name) else { continue };
        let old = have.elements.get(name).unwrap_or(&empty);
        let new = want.elements.get(name).unwrap_or(&empty);
        let (del, add) = element_delta(def, old, new, &mut changes);
        if !del.is_empty() {
            deletes.push((def, del));
        }
        if !add.is_empty() {
            adds.push((def, add));
        }
    }
    let messages = if rebuild {
        ruleset::rebuild_messages(&desired)
    } else {
        delta_messages(&deletes, &adds)
    };
    if messages.is_empty() {
        return Plan {
            changes,
            actions: Vec::new(),
        };
    }
    let Desired { snapshot, .. } = desired;
    Plan {
        changes,
        actions: vec![Commit {
            genid: observed.genid,
            messages,
            result: Arc::new(snapshot),
        }],
    }
}

type Delta<'a> = Vec<(&'a Bytes, &'a Bytes)>;

/// Elements to delete and to add to turn `old` into `new` (a changed map value is a
/// delete plus an add in the same batch), with one display change per element.
fn element_delta<'a>(
    def: &SetDef,
    old: &'a Elements,
    new: &'a Elements,
    changes: &mut Vec<Change>,
) -> (Delta<'a>, Delta<'a>) {
    let kind = def.kind;
    let mut del = Vec::new();
    let mut add = Vec::new();
    let data = |d: &Bytes| (!d.is_empty()).then(|| ruleset::show_data(def, d));
    // Plain sets have no value to show.
    let change = |op, k: &Bytes, old: Option<String>, new: Option<String>| {
        let c = Change::new(op, kind, ruleset::show_key(def, k));
        if old.is_none() && new.is_none() {
            c
        } else {
            c.with_field(FieldChange::new("target", old, new))
        }
    };
    // Both maps are sorted: one merge pass, no lookups.
    let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => break,
            (Some((ok, od)), Some((nk, nd))) if ok == nk => {
                if od != nd {
                    del.push((*ok, *od));
                    add.push((*nk, *nd));
                    changes.push(change(Op::Update, ok, data(od), data(nd)));
                }
                o.next();
                n.next();
            }
            (Some((ok, od)), next) if next.is_none_or(|(nk, _)| ok < nk) => {
                del.push((*ok, *od));
                changes.push(change(Op::Delete, ok, data(od), None));
                o.next();
            }
            (_, Some((nk, nd))) => {
                add.push((*nk, *nd));
                changes.push(change(Op::Create, nk, None, data(nd)));
                n.next();
            }
            (Some(_), None) => unreachable!("handled by the guard above"),
        }
    }
    (del, add)
}

fn delta_messages(deletes: &[(&SetDef, Delta)], adds: &[(&SetDef, Delta)]) -> Vec<Message> {
    let mut out = Vec::new();
    for (def, elems) in deletes {
        out.extend(ruleset::element_messages(def, elems.iter().copied(), false));
    }
    for (def, elems) in adds {
        out.extend(ruleset::element_messages(def, elems.iter().copied(), true));
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
        }
    }

    #[test]
    fn converged_table_plans_nothing() {
        let s = spec(1..100, 80);
        assert!(plan(&s, &observed(&s), &Facts::default()).is_empty());
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
            },
            &Facts::default(),
        );
        assert_eq!(p2.changes[0].to_string(), "+ table inet converge");
        assert_eq!(p2.actions.len(), 1);
        assert_eq!(p2.actions[0].messages[0].ty, msg::NEWTABLE);
        // Table exists with the same structure: only the two elements are added.
        assert_eq!(p.actions.len(), 1);
        assert_eq!(p.actions[0].messages.len(), 1);
        assert_eq!(p.actions[0].genid, 7);
    }

    #[test]
    fn one_port_added_or_changed_is_one_element_delta() {
        let before = spec(1..1000, 80);
        let p = plan(&spec(1..1001, 80), &observed(&before), &Facts::default());
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].to_string(), "+ published-port ip tcp . 1000");
        let m = &p.actions[0].messages;
        assert_eq!((m.len(), m[0].ty), (1, msg::NEWSETELEM));

        // A changed target is a delete and an add of the same key, in one batch.
        let mut after = before.clone();
        after.published_ports[5].target.port = 81;
        let p = plan(&after, &observed(&before), &Facts::default());
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].to_string(), "~ published-port ip tcp . 6");
        let types: Vec<u8> = p.actions[0].messages.iter().map(|m| m.ty).collect();
        assert_eq!(types, [msg::DELSETELEM, msg::NEWSETELEM]);
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
        let m = &p.actions[0].messages;
        assert_eq!(
            m[1].ty,
            msg::DELTABLE,
            "the old table is replaced in the batch"
        );
        assert!(m.iter().any(|m| m.ty == msg::NEWSETELEM));
    }
}
