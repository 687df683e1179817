//! The `metadata` section of the document: node labels and annotations, hostname and
//! message of the day, and their semantic validation. The reconciler itself lands in a
//! later issue.

pub mod spec;

pub use spec::*;
