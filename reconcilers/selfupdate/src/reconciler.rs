//! The self-update reconciler's glue: observe the running build, plan, apply (download,
//! verify, hand over), and a note with the version and the last update's outcome.

use crate::driver::Host;
use crate::plan::{plan, Action, Observed};
use crate::spec::AgentSpec;
use converge_core::{blocking, DriverError, Facts, ObjectNote, ObjectOutcome, Plan, Reconciler};
use std::sync::Arc;

const OBJECT: &str = "binary converge";

pub struct SelfUpdate {
    host: Arc<Host>,
}

impl SelfUpdate {
    pub fn new(host: Host) -> Self {
        SelfUpdate {
            host: Arc::new(host),
        }
    }
}

impl Reconciler for SelfUpdate {
    type Spec = AgentSpec;
    type Observed = Observed;
    type Action = Action;

    fn name(&self) -> &'static str {
        "agent"
    }

    async fn observe(&self, spec: &AgentSpec) -> Result<Observed, DriverError> {
        let (host, spec) = (self.host.clone(), spec.clone());
        blocking("observe the running binary", move || host.observe(&spec)).await
    }

    fn plan(&self, spec: &AgentSpec, observed: &Observed, _facts: &Facts) -> Plan<Action> {
        plan(spec, observed)
    }

    async fn apply(&self, plan: Plan<Action>) -> Vec<ObjectOutcome> {
        let mut outcomes = Vec::new();
        for action in plan.actions {
            let r = match action {
                Action::Update(spec) => match self.host.download(&spec).await {
                    Ok(staged) => self.host.start(&spec, &staged).await,
                    Err(e) => Err(e),
                },
                Action::Refuse(why) => Err(DriverError::Failed(why)),
                Action::RemoveStaged => self.host.remove_staged(),
            };
            outcomes.push(ObjectOutcome::from_result(OBJECT, r));
        }
        outcomes
    }

    fn notes(&self, observed: &Observed) -> Vec<ObjectNote> {
        let mut note = format!("running {}", observed.version);
        if let Some(last) = &observed.last {
            let what = if last.exit == 0 { "updated" } else { "failed" };
            note.push_str(&format!("; last update {what}: {}", last.message));
        }
        vec![ObjectNote {
            object: OBJECT.into(),
            note,
        }]
    }
}
