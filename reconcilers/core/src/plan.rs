//! Plans: what a reconciler would change, for display (`changes`) and for apply (`actions`).

use crate::DriverError;
use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// Kind of change, printed terraform-style.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Create,
    Update,
    Delete,
}

impl Op {
    pub fn symbol(self) -> char {
        match self {
            Op::Create => '+',
            Op::Update => '~',
            Op::Delete => '-',
        }
    }
}

/// One field of an object that differs. Values are already rendered for display and
/// redacted where secret: a plan never holds a secret in clear text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    pub field: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new: Option<String>,
}

impl FieldChange {
    pub fn new(field: impl Into<String>, old: Option<String>, new: Option<String>) -> Self {
        Self {
            field: field.into(),
            old,
            new,
        }
    }
}

/// One object-level change as shown by `converge diff`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub op: Op,
    /// Object kind within the reconciler, e.g. `record`, `process`, `file`.
    pub kind: String,
    /// Stable object id, e.g. `web.internal A`.
    pub id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldChange>,
}

impl Change {
    pub fn new(op: Op, kind: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            op,
            kind: kind.into(),
            id: id.into(),
            fields: Vec::new(),
        }
    }

    pub fn with_field(mut self, f: FieldChange) -> Self {
        self.fields.push(f);
        self
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.op.symbol(), self.kind, self.id)
    }
}

/// An object that cannot converge yet and waits for something outside this pass (its
/// container's address, a crash-loop delay, a schedule slot). `converge diff` shows it;
/// nothing is applied for it and the reconciler is not Degraded because of it, unless it
/// is marked [`Waiting::failed`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Waiting {
    /// Object kind within the reconciler, as in [`Change::kind`].
    pub kind: String,
    pub id: String,
    /// What it waits for, e.g. `waiting for its address`.
    pub reason: String,
    /// When to look again; `None`: when a trigger (facts, an event) arrives.
    #[serde(skip)]
    pub retry_after: Option<Duration>,
    /// A step of a change under way (a replacement waiting for consumers to switch),
    /// not a lasting condition: the reconciler is Progressing, not Converged, meanwhile.
    #[serde(skip)]
    pub in_progress: bool,
    /// Stuck until the operator acts (a directory that is not a borg repository, a
    /// backup whose last run failed): the reconciler is Degraded and the object is listed
    /// with the errors, but nothing is retried hot: it is looked at again after
    /// `retry_after`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub failed: bool,
}

impl Waiting {
    pub fn new(kind: impl Into<String>, id: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            id: id.into(),
            reason: reason.into(),
            retry_after: None,
            in_progress: false,
            failed: false,
        }
    }

    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Marks it as a step of a change under way (see `in_progress`).
    pub fn in_progress(mut self) -> Self {
        self.in_progress = true;
        self
    }

    /// Marks it as failed (see `failed`).
    pub fn failed(mut self) -> Self {
        self.failed = true;
        self
    }
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.failed { "!" } else { "~" };
        write!(f, "{mark} {} {} ({})", self.kind, self.id, self.reason)
    }
}

/// Result of `plan()`: a pure, deterministic description of the work.
///
/// `changes` are what an operator reads; `actions` are the minimal driver operations
/// that realise them (one action may cover many changes, e.g. one file rewrite).
/// An empty plan (both empty) means converged; `waiting` objects and `requeue_after`
/// do not count as work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan<A> {
    pub changes: Vec<Change>,
    pub actions: Vec<A>,
    /// Objects that cannot converge yet (see [`Waiting`]).
    pub waiting: Vec<Waiting>,
    /// The latest time, from now, at which this reconciler wants its next pass (a
    /// schedule's next slot, re-resolving a DNS name); the engine honours the earliest
    /// of this, the waiting objects' delays and its own triggers.
    pub requeue_after: Option<Duration>,
}

impl<A> Default for Plan<A> {
    fn default() -> Self {
        Self {
            changes: Vec::new(),
            actions: Vec::new(),
            waiting: Vec::new(),
            requeue_after: None,
        }
    }
}

impl<A> Plan<A> {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.actions.is_empty()
    }
}

/// The earliest of `first` and `rest`.
pub fn earliest(
    first: Option<Duration>,
    rest: impl IntoIterator<Item = Duration>,
) -> Option<Duration> {
    rest.into_iter()
        .fold(first, |acc, d| Some(acc.map_or(d, |a| a.min(d))))
}

/// How the engine retries a failed object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Retry {
    /// Something is wrong (a daemon refuses, a file cannot be written): the reconciler
    /// is Degraded and retried with exponential back-off.
    #[default]
    Backoff,
    /// Expected to clear by itself within moments (a concurrent change raced ours):
    /// retried soon, not Degraded.
    Soon,
    /// This object waits for its own delay (crash-loop back-off): retried after it, on
    /// its own; the reconciler is not Degraded and not retried hot.
    After(Duration),
}

/// Outcome of applying one action, named by the object(s) it touched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectOutcome {
    pub object: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How a failure is retried (meaningless on success).
    #[serde(skip)]
    pub retry: Retry,
}

impl ObjectOutcome {
    pub fn ok(object: impl Into<String>) -> Self {
        Self {
            object: object.into(),
            error: None,
            retry: Retry::Backoff,
        }
    }

    /// A failure retried with back-off (the reconciler is Degraded meanwhile).
    pub fn failed(object: impl Into<String>, error: impl fmt::Display) -> Self {
        Self {
            object: object.into(),
            error: Some(error.to_string()),
            retry: Retry::Backoff,
        }
    }

    /// The outcome of a driver call, retried as the error's class says.
    pub fn from_result(object: impl Into<String>, r: Result<(), DriverError>) -> Self {
        match r {
            Ok(()) => Self::ok(object),
            Err(e) => Self {
                object: object.into(),
                retry: e.retry(),
                error: Some(e.to_string()),
            },
        }
    }
}

/// Something the operator should see about one object that is not a failure (a
/// restarted container, an unhealthy one); shown in status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ObjectNote {
    pub object: String,
    pub note: String,
}
