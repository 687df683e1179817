//! HTTPS transport (rustls through reqwest; plain `http://` is accepted for tests and
//! behind a TLS-terminating proxy). Documents arrive by long poll:
//! `GET /v1/nodes/<id>/document?after=<generation>` is held by the control plane until
//! a newer envelope exists (200) or the poll times out (204). Status goes to
//! `POST /v1/nodes/<id>/status`. Every request is signed with the node's key.

use super::protocol::{sign_request, NodeMessage, H_NODE, H_SIGNATURE, H_TIME};
use super::transport::{backoff, Event, Transport, TransportError};
use ed25519_dalek::SigningKey;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long the control plane holds a poll; the client waits a little longer.
pub const POLL_SECS: u64 = 25;

/// The node's HTTPS client.
#[derive(Clone)]
pub struct HttpsTransport {
    client: reqwest::Client,
    base: String,
    node_id: String,
    key: Arc<SigningKey>,
}

impl HttpsTransport {
    pub fn new(
        base: &str,
        node_id: &str,
        key: SigningKey,
        ca_pem: Option<&str>,
    ) -> Result<Self, TransportError> {
        let client = super::protocol::http_client(ca_pem, Duration::from_secs(POLL_SECS + 15))
            .map_err(|e| TransportError::Failed(format!("{e:#}")))?;
        Ok(HttpsTransport {
            client,
            base: base.trim_end_matches('/').to_string(),
            node_id: node_id.to_string(),
            key: Arc::new(key),
        })
    }

    fn signed(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
    ) -> reqwest::RequestBuilder {
        let time = chrono::Utc::now().timestamp();
        let sig = sign_request(&self.key, method.as_str(), path, time, &body);
        self.client
            .request(method, format!("{}{path}", self.base))
            .header(H_NODE, &self.node_id)
            .header(H_TIME, time.to_string())
            .header(H_SIGNATURE, sig)
            .body(body)
    }

    async fn poll(&self, after: u64) -> Result<Option<Vec<u8>>, String> {
        let path = format!("/v1/nodes/{}/document?after={after}", self.node_id);
        let resp = self
            .signed(reqwest::Method::GET, &path, Vec::new())
            .send()
            .await
            .map_err(|e| format!("poll: {e}"))?;
        match resp.status().as_u16() {
            200 => Ok(Some(
                resp.bytes()
                    .await
                    .map_err(|e| format!("poll: {e}"))?
                    .to_vec(),
            )),
            204 => Ok(None),
            s => Err(format!(
                "poll: HTTP {s}: {}",
                resp.text().await.unwrap_or_default()
            )),
        }
    }

    async fn run(self, events: mpsc::Sender<Event>, mut after: u64) {
        let mut attempt = 0usize;
        let mut connected = false;
        loop {
            match self.poll(after).await {
                Ok(got) => {
                    attempt = 0;
                    if !connected {
                        connected = true;
                        if events.send(Event::Connected).await.is_err() {
                            return;
                        }
                    }
                    if let Some(bytes) = got {
                        // Ask for something newer next time, whatever the agent decides
                        // about this one, so a refused envelope is not fetched in a loop.
                        if let Ok(env) = super::envelope::Envelope::parse(&bytes) {
                            after = after.max(env.generation);
                        }
                        if events.send(Event::Envelope(bytes)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    connected = false;
                    if events.send(Event::Disconnected(e)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }
}

impl Transport for HttpsTransport {
    fn start(&self, events: mpsc::Sender<Event>, after: u64) {
        tokio::spawn(self.clone().run(events, after));
    }

    async fn send(&self, msg: &NodeMessage) -> Result<(), TransportError> {
        let body = serde_json::to_vec(msg).map_err(|e| TransportError::Failed(e.to_string()))?;
        let path = format!("/v1/nodes/{}/status", self.node_id);
        let resp = self
            .signed(reqwest::Method::POST, &path, body)
            .header("content-type", "application/json")
            .send()
            .await
            .map_err(|e| TransportError::Disconnected(e.to_string()))?;
        let code = resp.status();
        if code.is_success() {
            Ok(())
        } else {
            let body = resp.text().await.unwrap_or_default();
            Err(TransportError::Failed(format!(
                "status: HTTP {code}: {}",
                body.chars().take(200).collect::<String>()
            )))
        }
    }

    fn describe(&self) -> String {
        format!("https {}", self.base)
    }
}
