//! Backups reconciler: scheduled borg backups of volumes and paths (cron in a time
//! zone, each slot exactly once across restarts), pruning, exactly-once restores and
//! exports of an archive to S3 with a presigned link.
//!
//! Layout follows the reconciler contract: `spec.rs` (section + validation), `cron.rs`
//! (slots, pure), `plan.rs` (pure), `driver.rs` (+ `driver/{borg,state,runtime,restore,
//! export}.rs`; test-only `driver/fake.rs`), `reconciler.rs` (glue, background runs);
//! `export.rs` is the S3 upload module (`driver/export.rs` wires an export to it).

pub mod cron;
pub mod driver;
pub mod export;
pub mod plan;
pub mod reconciler;
pub mod spec;

pub use driver::{Host, HostConfig};
pub use plan::{plan, Action, Observed};
pub use reconciler::Backups;
pub use spec::*;
