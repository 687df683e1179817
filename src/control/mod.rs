//! The control-plane connection: the node's identity, signed envelopes, sealed secrets,
//! enrollment, the transports (NATS JetStream, HTTPS) and the reference control plane.

pub mod admin;
pub mod artifacts;
pub mod client;
pub mod conformance;
pub mod dryrun;
pub mod enroll;
pub mod envelope;
pub mod fleetpage;
pub mod fleetplan;
pub mod https;
pub mod identity;
pub mod nats;
pub mod plane;
pub mod plane_shared;
pub mod plane_store;
pub mod protocol;
pub mod rollout;
pub mod sealed;
pub mod transport;
#[cfg(test)]
mod vectors;
