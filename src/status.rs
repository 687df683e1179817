//! Status of each reconciler as the operator and the control plane see it: its state,
//! why its last pass ran, and the objects that failed or wait. Shared by the engine
//! (which produces it), the store (which keeps it) and the CLI (which prints it).

use chrono::{DateTime, Utc};
use converge_core::{ObjectNote, ObjectOutcome, Retry, Waiting};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Coarse state of one reconciler, as reported to the operator and control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// No pass has finished yet: no document so far, or its first pass is running.
    Pending,
    /// Host matches the document's section (objects may still be waiting, listed).
    Converged,
    /// Working on a new generation, verifying the last apply, or retrying a failure
    /// expected to clear by itself.
    Progressing,
    /// The last pass failed or some objects could not be converged; retrying with
    /// back-off.
    Degraded,
    /// The document has no section for this reconciler: nothing is managed.
    Unmanaged,
}

/// Why a pass ran (kube-rs `ReconcileReason`), in its tracing span and in status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "object")]
pub enum Reason {
    /// A new document arrived (or the agent started with one).
    Document,
    /// Another reconciler published new facts this one watches.
    Facts,
    /// The host changed (a runtime event, a netlink notification, a file edit).
    HostEvent(String),
    /// The periodic drift-repair pass.
    Resync,
    /// The reconciler asked to run again at this time (a schedule, a waiting object).
    Requeue,
    /// Retrying after a failure.
    Retry,
    /// Re-observing right after an apply.
    Verify,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Document => f.write_str("new document"),
            Reason::Facts => f.write_str("facts changed"),
            Reason::HostEvent(o) => write!(f, "host event: {o}"),
            Reason::Resync => f.write_str("resync"),
            Reason::Requeue => f.write_str("requested wake-up"),
            Reason::Retry => f.write_str("retry"),
            Reason::Verify => f.write_str("verify"),
        }
    }
}

/// One object the last pass could not converge, or that waits for something.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectError {
    pub object: String,
    pub error: String,
    /// When this object is tried again on its own (crash-loop back-off, a wait).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_secs: Option<f64>,
}

/// Status of one reconciler.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcilerStatus {
    pub reconciler: String,
    pub state: State,
    pub message: String,
    /// Generation of the document the last completed pass worked from.
    pub observed_generation: Option<u64>,
    pub last_transition: DateTime<Utc>,
    pub last_pass: Option<DateTime<Utc>>,
    /// Why the last pass ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub object_errors: Vec<ObjectError>,
    /// Objects that cannot converge yet and wait (an address, a crash-loop delay).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<ObjectError>,
    /// Notes about objects that are not failures (restarts, health).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<ObjectNote>,
    /// How many objects it owns on the host, as its last pass observed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned: Option<u64>,
}

impl ReconcilerStatus {
    /// The status of a reconciler before its first pass.
    pub fn pending(reconciler: &str) -> Self {
        Self {
            reconciler: reconciler.to_string(),
            state: State::Pending,
            message: "waiting for its first pass".into(),
            observed_generation: None,
            last_transition: Utc::now(),
            last_pass: None,
            reason: None,
            object_errors: Vec::new(),
            waiting: Vec::new(),
            objects: Vec::new(),
            owned: None,
        }
    }
}

/// The failures of a pass, by how they are retried.
#[derive(Debug, Default)]
pub struct Failures {
    /// Retried with back-off; the reconciler is Degraded.
    pub backoff: Vec<ObjectError>,
    /// Retried soon; not Degraded.
    pub soon: Vec<ObjectError>,
    /// Each retried on its own delay; not Degraded.
    pub later: Vec<ObjectError>,
    /// The earliest of the `later` delays.
    pub later_after: Option<Duration>,
}

impl Failures {
    pub fn of(outcomes: &[ObjectOutcome]) -> Self {
        let mut f = Failures::default();
        for o in outcomes {
            let Some(error) = &o.error else { continue };
            let mut e = ObjectError {
                object: o.object.clone(),
                error: error.clone(),
                retry_in_secs: None,
            };
            match o.retry {
                Retry::Backoff => f.backoff.push(e),
                Retry::Soon => f.soon.push(e),
                Retry::After(d) => {
                    e.retry_in_secs = Some(d.as_secs_f64());
                    f.later_after = Some(f.later_after.map_or(d, |a| a.min(d)));
                    f.later.push(e);
                }
            }
        }
        f
    }

    pub fn is_empty(&self) -> bool {
        self.backoff.is_empty() && self.soon.is_empty() && self.later.is_empty()
    }

    /// Every failure, back-off ones first.
    pub fn all(&self) -> Vec<ObjectError> {
        self.backoff
            .iter()
            .chain(&self.soon)
            .chain(&self.later)
            .cloned()
            .collect()
    }
}

/// The status message of a pass in which objects failed: which ones (the first few by
/// name, their errors are listed beside it) and how many of the pass's objects are
/// converged, so "1 of 1 actions failed" never hides that 23 other routes are in force.
pub fn failed_message(outcomes: &[ObjectOutcome], failed: &[ObjectError]) -> String {
    const SHOWN: usize = 3;
    let mut names: Vec<&str> = failed
        .iter()
        .take(SHOWN)
        .map(|e| e.object.as_str())
        .collect();
    let more = failed.len().saturating_sub(SHOWN);
    let more = (more > 0).then(|| format!("and {more} more"));
    names.extend(more.as_deref());
    let ok = outcomes.iter().filter(|o| o.error.is_none()).count();
    format!(
        "{} failed; {ok} of {} objects converged",
        names.join(", "),
        outcomes.len()
    )
}

/// The generation a node has converged to: the lowest generation any managed
/// reconciler's last pass worked from; the accepted one when nothing is managed. The
/// control plane's `nodes` and the agent's metrics both report this.
pub fn converged_generation(accepted: Option<u64>, statuses: &[ReconcilerStatus]) -> Option<u64> {
    if statuses.iter().all(|r| r.state == State::Unmanaged) {
        return accepted;
    }
    statuses
        .iter()
        .filter(|r| r.state != State::Unmanaged)
        .map(|r| r.observed_generation)
        .min()
        .flatten()
}

/// Waiting objects as status entries; those marked failed are left out (they go with
/// the errors: [`stuck`]).
pub fn waiting(items: &[Waiting]) -> Vec<ObjectError> {
    entries(items.iter().filter(|w| !w.failed))
}

/// Waiting objects marked failed, as status errors.
pub fn stuck(items: &[Waiting]) -> Vec<ObjectError> {
    entries(items.iter().filter(|w| w.failed))
}

fn entries<'a>(items: impl Iterator<Item = &'a Waiting>) -> Vec<ObjectError> {
    items
        .map(|w| ObjectError {
            object: format!("{} {}", w.kind, w.id),
            error: w.reason.clone(),
            retry_in_secs: w.retry_after.map(|d| d.as_secs_f64()),
        })
        .collect()
}
