//! The pure plan: run the build the document names, unless it is running, being
//! installed, or already failed (then say so, and never try it again).

use crate::spec::AgentSpec;
use converge_core::{Change, FieldChange, Op, Plan, Waiting};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What the last `update.sh` run reported (`<data>/selfupdate/result.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub sha256: String,
    /// update.sh's exit code: 0 updated; 10 verify; 11 check; 12 install; 13 rolled
    /// back; 14 rollback failed.
    pub exit: i32,
    pub message: String,
}

/// The running agent and the self-update's own record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// `converge --version` of this process (release and commit).
    pub version: String,
    /// SHA-256 of the running executable.
    pub sha256: String,
    /// systemd runs the host (an update needs it to restart the agent and to outlive it).
    pub systemd: bool,
    /// The build an update was started for and is still under way.
    pub in_progress: Option<String>,
    pub last: Option<Outcome>,
    /// A downloaded build is left over (removed once the wanted build runs).
    pub staged: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Download, verify and hand over to update.sh in a transient unit.
    Update(AgentSpec),
    /// A build that failed before: reported as a failure, not tried again.
    Refuse(String),
    RemoveStaged,
}

const KIND: &str = "binary";
const ID: &str = "converge";

pub fn plan(spec: &AgentSpec, observed: &Observed) -> Plan<Action> {
    let mut p = Plan::default();
    let wanted = spec.sha256.to_ascii_lowercase();
    if observed.sha256 == wanted {
        if observed.staged {
            p.actions.push(Action::RemoveStaged);
        }
        return p;
    }
    if observed.in_progress.as_deref() == Some(wanted.as_str()) {
        p.waiting.push(
            Waiting::new(KIND, ID, format!("updating to {}", spec.version))
                .in_progress()
                .retry_after(Duration::from_secs(5)),
        );
        return p;
    }
    let change = Change::new(Op::Update, KIND, ID).with_field(FieldChange::new(
        "version",
        Some(observed.version.clone()),
        Some(format!("{} (sha256 {})", spec.version, &wanted[..12])),
    ));
    p.changes.push(change);
    match &observed.last {
        Some(o) if o.sha256 == wanted && o.exit != 0 => p.actions.push(Action::Refuse(format!(
            "update to {} failed (update.sh exit {}: {}); not tried again until the document names another build",
            spec.version, o.exit, o.message
        ))),
        _ if !observed.systemd => p.actions.push(Action::Refuse(
            "self-update needs systemd (to restart the agent and roll back); update with install/update.sh".into(),
        )),
        _ => p.actions.push(Action::Update(spec.clone())),
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AgentSpec {
        AgentSpec {
            version: "0.2.0".into(),
            url: "https://cp/v1/artifacts/converge-0.2.0-x86_64".into(),
            sha256: "ab".repeat(32),
            timeout_secs: 300,
        }
    }

    fn running(sha: &str) -> Observed {
        Observed {
            version: "converge 0.1.0 (abc)".into(),
            sha256: sha.into(),
            systemd: true,
            in_progress: None,
            last: None,
            staged: false,
        }
    }

    #[test]
    fn the_named_build_running_is_converged() {
        assert!(plan(&spec(), &running(&"ab".repeat(32))).is_empty());
        let mut o = running(&"ab".repeat(32));
        o.staged = true;
        assert_eq!(plan(&spec(), &o).actions, [Action::RemoveStaged]);
    }

    #[test]
    fn another_build_is_installed_once_and_a_failed_one_never_again() {
        let o = running(&"cd".repeat(32));
        assert_eq!(plan(&spec(), &o).actions, [Action::Update(spec())]);
        let mut busy = o.clone();
        busy.in_progress = Some("ab".repeat(32));
        let p = plan(&spec(), &busy);
        assert!(p.actions.is_empty() && p.waiting[0].in_progress);
        let mut failed = o.clone();
        failed.last = Some(Outcome {
            sha256: "ab".repeat(32),
            exit: 13,
            message: "did not start".into(),
        });
        assert!(
            matches!(&plan(&spec(), &failed).actions[..], [Action::Refuse(m)] if m.contains("exit 13"))
        );
        // Another build after a failed one is tried.
        let mut other = spec();
        other.sha256 = "ef".repeat(32);
        assert_eq!(
            plan(&other, &failed).actions,
            [Action::Update(other.clone())]
        );
        let mut no_systemd = o;
        no_systemd.systemd = false;
        assert!(
            matches!(&plan(&spec(), &no_systemd).actions[..], [Action::Refuse(m)] if m.contains("systemd"))
        );
    }
}
