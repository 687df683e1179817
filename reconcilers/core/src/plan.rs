//! Plans: what a reconciler would change, for display (`changes`) and for apply (`actions`).

use serde::Serialize;
use std::fmt;

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

/// Result of `plan()`: a pure, deterministic description of the work.
///
/// `changes` are what an operator reads; `actions` are the minimal driver operations
/// that realise them (one action may cover many changes, e.g. one file rewrite).
/// An empty plan (both empty) means converged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan<A> {
    pub changes: Vec<Change>,
    pub actions: Vec<A>,
}

impl<A> Default for Plan<A> {
    fn default() -> Self {
        Self {
            changes: Vec::new(),
            actions: Vec::new(),
        }
    }
}

impl<A> Plan<A> {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.actions.is_empty()
    }
}

/// Outcome of applying one action, named by the object(s) it touched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectOutcome {
    pub object: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ObjectOutcome {
    pub fn ok(object: impl Into<String>) -> Self {
        Self {
            object: object.into(),
            error: None,
        }
    }

    pub fn failed(object: impl Into<String>, error: impl fmt::Display) -> Self {
        Self {
            object: object.into(),
            error: Some(error.to_string()),
        }
    }

    pub fn from_result<E: fmt::Display>(object: impl Into<String>, r: Result<(), E>) -> Self {
        match r {
            Ok(()) => Self::ok(object),
            Err(e) => Self::failed(object, e),
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
