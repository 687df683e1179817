//! converge: a node agent that makes one Linux host match a desired-state document.
//!
//! Data flows one way: document → validate → store → engine (observe → plan → apply per
//! reconciler) → status. See ARCHITECTURE.md for the code map and invariants.

pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod document;
pub mod engine;
pub mod events;
pub mod fuzzing;
pub mod generate;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod output;
pub mod privacy;
pub mod registry;
pub mod reset;
pub mod schema;
pub mod status;
pub mod store;
pub mod validate;

/// The release and the build: `0.1.0 (3f2c1ab)`, the commit the binary was built from
/// ("unknown" outside a git checkout). `converge --version` and `converge status` show it.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("CONVERGE_GIT_COMMIT"),
    ")"
);
