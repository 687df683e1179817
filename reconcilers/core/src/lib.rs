//! Shared vocabulary of every converge reconciler: the `Reconciler` trait, plans,
//! per-object outcomes and how they are retried, the observed-facts hand-off,
//! validation problems, the vocabulary every section shares (names, protocols, address
//! helpers) and small host helpers (atomic file writes, secret redaction).

pub mod facts;
pub mod fsutil;
pub mod host;
pub mod nfnl;
pub mod observe;
pub mod plan;
pub mod problems;
pub mod reconciler;
pub mod redact;
pub mod secrets;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod vocab;

pub use facts::{ContainerFacts, Facts, FactsUpdate};
pub use plan::{
    earliest, Change, FieldChange, ObjectNote, ObjectOutcome, Op, Plan, Retry, Waiting,
};
pub use problems::{Problem, Problems};
pub use reconciler::{blocking, with_timeout, DriverError, HostEvent, Reconciler};
pub use redact::redact;
pub use secrets::{SecretError, SecretSource, Zeroizing};
