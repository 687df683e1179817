//! converge's own binary as a reconciler: the document's optional `agent` section names
//! a build (version, URL, SHA-256); the node downloads and verifies it, and a transient
//! systemd unit outside the agent's cgroup runs `update.sh` (swap, restart, wait for
//! READY and every first pass, roll back on failure). A build that failed is reported,
//! never retried until the document names another.

pub mod driver;
pub mod plan;
pub mod reconciler;
pub mod spec;

pub use driver::{Host, HostConfig};
pub use reconciler::SelfUpdate;
pub use spec::{validate, AgentSpec};
