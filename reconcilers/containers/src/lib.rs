//! Containers reconciler: runs the document's containers on Podman or Docker, owning
//! only the containers it labelled, replacing drifted ones without downtime where host
//! ports allow, restarting dead ones on runtime events, and publishing their addresses.

pub mod driver;
pub mod plan;
pub mod reconciler;
pub mod registry;
mod spec;

pub use driver::{docker, podman};
pub use reconciler::{Config, Containers};
pub use spec::*;
