//! Starts the node's control-plane client on the transport named in `control.json`.

use super::envelope::Pin;
use super::identity::Identity;
use super::protocol::{ControlConfig, Transport as Wire};
use super::transport::{run_client, Node};
use std::sync::Arc;
use std::time::Duration;
use tracing::error;

/// Runs the client for the agent's lifetime; `max_document` is the largest document the
/// agent accepts (an envelope carries it in base64). `pin` is the plane key the agent
/// trusts now (the HTTPS poll names it).
pub async fn run(
    config: ControlConfig,
    identity: Identity,
    pin: Option<Pin>,
    node: Arc<dyn Node>,
    max_document: usize,
) {
    let heartbeat = Duration::from_secs(config.heartbeat_secs.max(1));
    match &config.transport {
        Wire::Nats {
            url,
            user,
            password,
        } => match super::nats::connect(
            url,
            user,
            password,
            identity.signing_key(),
            &config.node_id,
            config.ca_cert.as_deref(),
        )
        .await
        {
            Ok(t) => run_client(t, node, heartbeat).await,
            Err(e) => error!(error = %e, "control-plane client not started"),
        },
        Wire::Https { url } => {
            match super::https::HttpsTransport::new(
                url,
                &config.node_id,
                identity.signing_key().clone(),
                config.ca_cert.as_deref(),
                super::envelope::max_bytes(max_document),
                pin,
            ) {
                Ok(t) => run_client(t, node, heartbeat).await,
                Err(e) => error!(error = %e, "control-plane client not started"),
            }
        }
    }
}
