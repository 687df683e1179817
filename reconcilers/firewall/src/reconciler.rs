//! The firewall reconciler's glue: observe converge's nftables table (skipping the dump
//! when the ruleset generation proves the cached table current), plan (see `plan`),
//! apply the batch and remember the table it leaves.

use crate::driver::{CommitError, NftDriver};
use crate::plan::{plan, Action, Commit, Observed, Then};
use crate::FirewallSpec;
use converge_core::{
    blocking, DriverError, Facts, FactsUpdate, HostEvent, ObjectOutcome, Plan, Reconciler,
};
use futures::stream::BoxStream;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tracing::{info, warn};

/// The firewall reconciler over a driver.
pub struct Firewall<D> {
    driver: Arc<D>,
    /// The table as of a generation. Any commit by anyone bumps the generation, so an
    /// unchanged generation proves the kernel still holds exactly this table and observe
    /// can skip the dump (one netlink round trip instead of reading every element).
    cache: Mutex<Option<Observed>>,
    /// The DNAT targets of the table at a generation (recomputed only when it moved).
    targets: Mutex<Option<(u32, BTreeSet<IpAddr>)>>,
}

impl<D: NftDriver> Firewall<D> {
    pub fn new(driver: D) -> Self {
        Self {
            driver: Arc::new(driver),
            cache: Mutex::new(None),
            targets: Mutex::new(None),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Option<Observed>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the table after a successful commit planned at `genid`.
    fn committed(&self, genid: u32, then: Then) {
        // One commit bumps the generation by exactly one (skipping 0); if that guess is
        // ever wrong the next observe just reads the table.
        let next = genid.wrapping_add(1).max(1);
        let mut cache = self.cache();
        *cache = match (then, cache.take()) {
            (Then::Table(table, source), _) => Some(Observed {
                genid: next,
                table,
                source: Some(source),
            }),
            // In place when the pass has let go of its observation (the engine does).
            (Then::Patch(patch), Some(mut o)) if o.genid == genid => match &mut o.source {
                Some(source) => {
                    Arc::make_mut(source).apply(&patch);
                    Arc::make_mut(&mut o.table).apply(&patch.changes);
                    o.genid = next;
                    Some(o)
                }
                None => None,
            },
            _ => None,
        };
    }
}

/// Batches up to this size are sent from the pass's own task. The kernel handles a
/// netlink request inside the send, so a small batch costs 20-30 µs of syscall: less
/// than handing it to a blocking thread and back (30-130 µs measured here, the more the
/// longer that thread's CPU was idle). Dumps and large batches (a rebuild: ~20 ms at
/// 10,000 ports) go to a blocking thread.
const INLINE_BATCH: usize = 16 * 1024;

impl<D: NftDriver> Reconciler for Firewall<D> {
    type Spec = FirewallSpec;
    type Observed = Observed;
    type Action = Action;

    fn name(&self) -> &'static str {
        "firewall"
    }

    /// Elements of the table's sets and maps (ports, addresses, DNAT targets).
    fn owned(&self, observed: &Observed) -> Option<u64> {
        let t = &observed.table;
        Some(t.elements.values().map(|e| e.len() as u64).sum())
    }

    /// Container targets follow the containers' addresses.
    fn watches_facts(&self) -> bool {
        true
    }

    /// The addresses the DNAT maps send traffic to, so that a replaced container is
    /// stopped only once this firewall no longer forwards to it.
    fn publish(&self, observed: &Observed) -> Option<FactsUpdate> {
        let mut memo = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        let addresses = match memo.as_ref() {
            Some((genid, t)) if *genid == observed.genid => t.clone(),
            _ => {
                let t = crate::ruleset::targets(&observed.table);
                *memo = Some((observed.genid, t.clone()));
                t
            }
        };
        Some(FactsUpdate::InUse {
            consumer: "firewall".into(),
            addresses,
        })
    }

    /// A deleted table, flushed chain or edited element is restored at once.
    fn host_events(&self) -> Option<BoxStream<'static, HostEvent>> {
        self.driver.events()
    }

    async fn observe(&self, _spec: &FirewallSpec) -> Result<Observed, DriverError> {
        // One small round trip, inline (see `INLINE_BATCH`).
        let genid = self.driver.generation()?;
        if let Some(o) = self.cache().as_ref().filter(|o| o.genid == genid) {
            return Ok(o.clone());
        }
        let d = self.driver.clone();
        let table = Arc::new(blocking("netlink task", move || d.read()).await?);
        let o = Observed {
            genid,
            table,
            source: None,
        };
        *self.cache() = Some(o.clone());
        Ok(o)
    }

    fn plan(&self, spec: &FirewallSpec, observed: &Observed, facts: &Facts) -> Plan<Action> {
        plan(spec, observed, facts)
    }

    async fn apply(&self, plan: Plan<Action>) -> Vec<ObjectOutcome> {
        let mut outcomes = Vec::new();
        for action in plan.actions {
            let commit = match action {
                Action::Commit(c) => c,
                Action::Remember { genid, source } => {
                    if let Some(o) = self.cache().as_mut().filter(|o| o.genid == genid) {
                        o.source = Some(source);
                    }
                    continue;
                }
            };
            let d = self.driver.clone();
            let Commit {
                genid,
                messages,
                then,
            } = commit;
            info!(messages = messages.len(), "committing nftables batch");
            let size: usize = messages.iter().map(|m| m.attrs.len()).sum();
            let r = if size <= INLINE_BATCH {
                Ok(d.commit(&messages, genid))
            } else {
                tokio::task::spawn_blocking(move || d.commit(&messages, genid)).await
            };
            let outcome = match r {
                Ok(Ok(())) => {
                    self.committed(genid, then);
                    Ok(())
                }
                // Someone changed the ruleset since observe: plan again soon, not a fault.
                Ok(Err(CommitError::Stale(e))) => {
                    warn!(error = %e, "nftables ruleset changed during the pass; will retry");
                    Err(DriverError::Transient(e.to_string()))
                }
                Ok(Err(CommitError::Failed(e))) => Err(DriverError::Failed(e.to_string())),
                Err(e) => Err(DriverError::Failed(format!("netlink task: {e}"))),
            };
            outcomes.push(ObjectOutcome::from_result("table inet converge", outcome));
        }
        outcomes
    }
}
