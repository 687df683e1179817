//! The metadata reconciler's glue: observe the database and the listeners, plan (see
//! `plan`), apply one transaction per changed project, then the listener changes.

use crate::driver::MetadataDriver;
use crate::plan::{plan, Action, Observed, Served};
use converge_core::{DriverError, Facts, ObjectOutcome, Plan, Reconciler};
use tracing::info_span;

/// The metadata reconciler over a driver.
pub struct Metadata<D> {
    driver: D,
}

impl<D: MetadataDriver> Metadata<D> {
    pub fn new(driver: D) -> Self {
        Self { driver }
    }

    pub fn driver(&self) -> &D {
        &self.driver
    }
}

impl<D: MetadataDriver> Reconciler for Metadata<D> {
    type Spec = Served;
    type Observed = Observed;
    type Action = Action;

    fn name(&self) -> &'static str {
        "metadata"
    }

    /// Projects stored.
    fn owned(&self, observed: &Observed) -> Option<u64> {
        Some(observed.projects.len() as u64)
    }

    async fn observe(&self, spec: &Served) -> Result<Observed, DriverError> {
        Ok(Observed {
            projects: self.driver.read()?,
            listening: self.driver.listening(),
            hostname: match spec.hostname {
                Some(_) => Some(self.driver.hostname()?),
                None => None,
            },
            motd: match spec.motd {
                Some(_) => Some(self.driver.motd()?),
                None => None,
            },
        })
    }

    fn plan(&self, spec: &Served, observed: &Observed, facts: &Facts) -> Plan<Action> {
        plan(spec, observed, facts)
    }

    async fn apply(&self, plan: Plan<Action>) -> Vec<ObjectOutcome> {
        let mut outcomes = Vec::with_capacity(plan.actions.len());
        for action in plan.actions {
            let outcome = match action {
                Action::Write(w) => {
                    let _span = info_span!("project", id = %w.id).entered();
                    ObjectOutcome::from_result(format!("project {}", w.id), self.driver.write(&w))
                }
                Action::Remove(id) => {
                    let _span = info_span!("project", id = %id).entered();
                    ObjectOutcome::from_result(format!("project {id}"), self.driver.remove(&id))
                }
                Action::Listen(a) => {
                    ObjectOutcome::from_result(format!("listener {a}"), self.driver.listen(a))
                }
                Action::Unlisten(a) => {
                    ObjectOutcome::from_result(format!("listener {a}"), self.driver.unlisten(a))
                }
                Action::SetHostname(h) => {
                    ObjectOutcome::from_result("hostname node", self.driver.set_hostname(&h))
                }
                Action::WriteMotd(m) => {
                    ObjectOutcome::from_result("motd /etc/motd", self.driver.write_motd(&m))
                }
            };
            outcomes.push(outcome);
        }
        outcomes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::fake::Fake;
    use crate::spec::MetadataSpec;
    use serde_json::json;

    const H1: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const H2: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    async fn pass(r: &Metadata<Fake>, s: &Served) -> Vec<ObjectOutcome> {
        let o = r.observe(s).await.unwrap();
        let p = r.plan(s, &o, &Facts::default());
        r.apply(p).await
    }

    #[tokio::test]
    async fn one_failing_project_does_not_block_the_others() {
        let spec: MetadataSpec = serde_json::from_value(json!({"projects": [
            {"id": "a", "tokenSha256": H1, "entries": {"x": 1}},
            {"id": "b", "tokenSha256": H2, "entries": {"y": 2}}
        ]}))
        .unwrap();
        let served = Served::new(&spec, &[]);
        let r = Metadata::new(Fake::default());
        r.driver().fail.lock().unwrap().insert("a".into());
        let out = pass(&r, &served).await;
        assert_eq!(out.iter().filter(|o| o.error.is_some()).count(), 1);
        assert!(r.driver().projects.lock().unwrap().contains_key("b"));
        r.driver().fail.lock().unwrap().clear();
        pass(&r, &served).await;
        let writes = *r.driver().writes.lock().unwrap();
        // Converged: a further pass writes nothing.
        assert!(pass(&r, &served).await.is_empty());
        assert_eq!(*r.driver().writes.lock().unwrap(), writes);
        assert_eq!(r.driver().listening.lock().unwrap().len(), 1);
    }
}
