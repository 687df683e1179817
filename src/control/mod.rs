//! The control-plane connection: the node's identity, signed envelopes, sealed secrets,
//! enrollment, the transports (NATS JetStream, HTTPS) and the reference control plane.

pub mod envelope;
pub mod identity;
pub mod sealed;
