//! Shared vocabulary of every converge reconciler: the `Reconciler` trait, plans,
//! per-object outcomes, the observed-facts hand-off, validation problems and small
//! host helpers (atomic file writes, secret redaction).

pub mod facts;
pub mod fsutil;
pub mod plan;
pub mod problems;
pub mod reconciler;
pub mod redact;

pub use facts::{ContainerFacts, Facts, FactsUpdate};
pub use plan::{Change, FieldChange, ObjectNote, ObjectOutcome, Op, Plan};
pub use problems::{Problem, Problems};
pub use reconciler::{with_timeout, DriverError, Reconciler};
pub use redact::redact;
