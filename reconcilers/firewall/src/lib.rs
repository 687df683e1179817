//! Firewall reconciler: the `firewall` section (host ports forwarded to containers or
//! addresses, input and forwarding filters, masquerading), its validation, and the
//! reconciler that keeps one nftables table, `inet converge`, equal to it.
//!
//! - `spec`: the section's types and validation;
//! - `plan`: the pure plan (element delta or rebuild, one batch);
//! - `incremental`: the plan from the difference between the last spec and the next;
//! - `ruleset`: the table as data (sets, chains, rules, elements) and its messages;
//! - `nfnl`: nf_tables netlink (encoding, batches, dumps, events), shared with the
//!   routes reconciler and so kept in `converge_core`;
//! - `driver`: reading the table back and committing batches in the kernel;
//! - `reconciler`: observe → plan → one atomic commit;
//! - `docker`: with Docker as the runtime, the one rule converge keeps in Docker's
//!   `DOCKER-USER` chain so published ports reach containers on Docker networks.

pub mod docker;
pub mod driver;
mod incremental;
pub use converge_core::nfnl;
pub mod plan;
mod reconciler;
pub mod ruleset;
mod spec;

pub use driver::{Kernel, NftDriver};
pub use incremental::{Patch, Source};
pub use plan::{plan, Action, Commit, Observed, Then};
pub use reconciler::Firewall;
pub use spec::*;
