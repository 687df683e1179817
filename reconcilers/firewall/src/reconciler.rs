//! The firewall reconciler's glue: observe converge's nftables table (skipping the dump
//! when the ruleset generation proves the cached table current), plan (see `plan`),
//! apply the batch and remember the table it leaves.

use crate::driver::{CommitError, NftDriver};
use crate::plan::{plan, Action, Commit, Observed, Then};
use crate::FirewallSpec;
use converge_core::{
    blocking, Change, DriverError, Facts, FactsUpdate, HostEvent, ObjectOutcome, Op, Plan,
    Reconciler,
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
    /// Docker is the runtime: keep converge's rule in `DOCKER-USER` (`docker`).
    docker: bool,
}

impl<D: NftDriver> Firewall<D> {
    pub fn new(driver: D) -> Self {
        Self {
            driver: Arc::new(driver),
            cache: Mutex::new(None),
            targets: Mutex::new(None),
            docker: false,
        }
    }

    /// With Docker as the container runtime: published ports also need converge's rule
    /// in Docker's `DOCKER-USER` chain (see `docker`).
    pub fn with_docker(mut self, docker: bool) -> Self {
        self.docker = docker;
        self
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
            (Then::Table(table, source), old) => Some(Observed {
                genid: next,
                table,
                source: Some(source),
                // An nftables commit of converge's own table leaves Docker's chain as it was.
                docker_user: old.and_then(|o| o.docker_user),
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

/// Published ports reach containers on Docker networks only through converge's rule in
/// `DOCKER-USER`: planned when Docker's chain exists without it.
fn needs_docker_user(spec: &FirewallSpec, observed: &Observed) -> bool {
    observed.docker_user == Some(crate::docker::DockerUser::Missing)
        && !spec.published_ports.is_empty()
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
        // iptables-nft's changes move the same generation, so Docker's chain is read
        // again only when the ruleset changed.
        let docker_user = match self.docker {
            true => Some(blocking("iptables", crate::docker::observe).await?),
            false => None,
        };
        let o = Observed {
            genid,
            table,
            source: None,
            docker_user,
        };
        *self.cache() = Some(o.clone());
        Ok(o)
    }

    fn plan(&self, spec: &FirewallSpec, observed: &Observed, facts: &Facts) -> Plan<Action> {
        let mut p = plan(spec, observed, facts);
        if needs_docker_user(spec, observed) {
            p.changes.push(Change::new(
                Op::Create,
                "docker-user rule",
                format!(
                    "{} accept DNAT ({})",
                    crate::docker::CHAIN,
                    crate::docker::COMMENT
                ),
            ));
            p.actions.push(Action::DockerUser);
        }
        p
    }

    async fn apply(&self, plan: Plan<Action>) -> Vec<ObjectOutcome> {
        let mut outcomes = Vec::new();
        for action in plan.actions {
            let commit = match action {
                Action::Commit(c) => c,
                Action::DockerUser => {
                    info!(
                        chain = crate::docker::CHAIN,
                        "inserting converge's rule for Docker networks"
                    );
                    let r = blocking("iptables", crate::docker::insert).await;
                    outcomes.push(ObjectOutcome::from_result(
                        format!("{} rule", crate::docker::CHAIN),
                        r,
                    ));
                    continue;
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::fake::Fake;
    use crate::ruleset;
    use converge_core::Retry;
    use serde_json::json;

    fn spec(ports: std::ops::Range<u16>) -> FirewallSpec {
        let published: Vec<_> = ports
            .map(|p| json!({"hostPort": p, "target": {"address": "10.0.0.2", "port": 80}}))
            .collect();
        serde_json::from_value(json!({"publishedPorts": published})).unwrap()
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// One pass as the engine runs it: observe, plan, (the observation dropped) apply.
    fn pass(fw: &Firewall<Fake>, spec: &FirewallSpec) -> (Plan<Action>, Vec<ObjectOutcome>) {
        block_on(async {
            let observed = fw.observe(spec).await.unwrap();
            let p = fw.plan(spec, &observed, &Facts::default());
            drop(observed);
            let shown = Plan {
                changes: p.changes.clone(),
                actions: Vec::new(),
                waiting: p.waiting.clone(),
                requeue_after: p.requeue_after,
            };
            let outcomes = fw.apply(p).await;
            (shown, outcomes)
        })
    }

    fn desired(spec: &FirewallSpec) -> ruleset::Snapshot {
        ruleset::desired(spec, &Facts::default()).snapshot
    }

    fn fw() -> Firewall<Fake> {
        Firewall::new(Fake::new())
    }

    #[test]
    fn a_pass_builds_the_table_in_one_batch_and_the_next_plans_nothing() {
        let fw = fw();
        let s = spec(1000..1010);
        let (p, outcomes) = pass(&fw, &s);
        assert!(!p.changes.is_empty());
        assert_eq!(outcomes.len(), 1);
        assert_eq!(outcomes[0].error, None);
        {
            let k = fw.driver.state();
            assert_eq!(k.commits.len(), 1);
            assert_eq!(k.commits[0][0], "add table inet converge");
            assert_eq!(k.table, desired(&s));
            assert_eq!(k.genid, 1);
        }
        // Converged: nothing planned, nothing committed, and the table not dumped again
        // (the generation proves the cached table current).
        let (p, outcomes) = pass(&fw, &s);
        assert!(p.changes.is_empty(), "{:?}", p.changes);
        assert!(outcomes.is_empty());
        let k = fw.driver.state();
        assert_eq!((k.commits.len(), k.reads), (1, 1));
        // The DNAT target is published as in use.
        drop(k);
        let o = block_on(fw.observe(&s)).unwrap();
        let Some(FactsUpdate::InUse { addresses, .. }) = fw.publish(&o) else {
            panic!("no in-use facts")
        };
        assert_eq!(addresses, BTreeSet::from(["10.0.0.2".parse().unwrap()]));
    }

    #[test]
    fn a_changed_port_list_is_patched_in_place() {
        let fw = fw();
        pass(&fw, &spec(1000..1010));
        let next = spec(1000..1012);
        let (p, outcomes) = pass(&fw, &next);
        assert!(!p.changes.is_empty());
        assert!(outcomes.iter().all(|o| o.error.is_none()));
        {
            let k = fw.driver.state();
            assert_eq!(k.table, desired(&next));
            // Elements only: no table rebuilt.
            assert!(
                k.commits[1].iter().all(|w| !w.contains("table")),
                "{:?}",
                k.commits[1]
            );
        }
        let (p, _) = pass(&fw, &next);
        assert!(p.changes.is_empty());
        assert_eq!(fw.driver.state().reads, 1);
    }

    #[test]
    fn a_refused_commit_is_reported_and_changes_nothing() {
        let fw = fw();
        let s = spec(1000..1003);
        fw.driver.state().refuse_next = Some(libc::EINVAL);
        let (_, outcomes) = pass(&fw, &s);
        assert_eq!(outcomes.len(), 1);
        assert_eq!(outcomes[0].object, "table inet converge");
        let err = outcomes[0].error.as_deref().unwrap();
        assert!(err.contains("refused"), "{err}");
        assert_eq!(outcomes[0].retry, Retry::Backoff);
        assert!(!fw.driver.state().table.exists);
        // The next pass plans from the kernel again and succeeds.
        let (_, outcomes) = pass(&fw, &s);
        assert_eq!(outcomes[0].error, None);
        assert_eq!(fw.driver.state().table, desired(&s));
    }

    #[test]
    fn a_ruleset_changed_during_the_pass_is_retried_soon() {
        let fw = fw();
        let s = spec(1000..1003);
        block_on(async {
            let observed = fw.observe(&s).await.unwrap();
            let p = fw.plan(&s, &observed, &Facts::default());
            drop(observed);
            // Someone commits between observe and apply.
            fw.driver.drift(|_| {});
            let outcomes = fw.apply(p).await;
            assert_eq!(outcomes.len(), 1);
            assert_eq!(outcomes[0].retry, Retry::Soon);
            assert!(outcomes[0].error.is_some());
        });
        assert!(!fw.driver.state().table.exists);
        let (_, outcomes) = pass(&fw, &s);
        assert_eq!(outcomes[0].error, None);
    }

    #[test]
    fn drift_is_repaired_by_the_next_pass() {
        let fw = fw();
        let s = spec(1000..1005);
        pass(&fw, &s);
        // An element deleted by hand.
        fw.driver.drift(|t| {
            let map = t.elements.values_mut().find(|e| !e.is_empty()).unwrap();
            let k = map.keys().next().unwrap().clone();
            map.remove(&k);
        });
        let (p, outcomes) = pass(&fw, &s);
        assert!(!p.changes.is_empty());
        assert!(outcomes.iter().all(|o| o.error.is_none()));
        assert_eq!(fw.driver.state().table, desired(&s));
        // A deleted table: rebuilt.
        fw.driver.drift(|t| *t = ruleset::Snapshot::default());
        let (_, outcomes) = pass(&fw, &s);
        assert!(outcomes.iter().all(|o| o.error.is_none()));
        assert_eq!(fw.driver.state().table, desired(&s));
        let (p, outcomes) = pass(&fw, &s);
        assert!(p.changes.is_empty() && outcomes.is_empty());
    }
}
