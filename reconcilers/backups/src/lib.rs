//! The `backups` section of the document: backup repositories and scheduled backup
//! jobs, and their semantic validation. The reconciler itself (timers, runs, pruning)
//! lands in a later issue.

pub mod export;
pub mod spec;

pub use spec::*;
