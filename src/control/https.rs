//! HTTPS transport (rustls through reqwest; plain `http://` is accepted for tests and
//! behind a TLS-terminating proxy). Documents arrive by long poll:
//! `GET /v1/nodes/<id>/document?after=<generation>` is held by the control plane until
//! a newer envelope exists (200) or the poll times out (204); the cursor moves only past
//! envelopes that verified, and answers are read up to a size cap; the same poll
//! carries dry-run requests (header `x-converge-kind: dry-run`). Status and dry-run
//! answers go to `POST /v1/nodes/<id>/status`. Every request is signed with the node's key and
//! carries a nonce the plane accepts once. "Connected" is reported once a signed
//! `GET /v1/nodes/<id>/hello` answered, not when the first long poll returns.

use super::envelope::Pin;
use super::protocol::{
    read_capped, NodeMessage, SignedRequest, H_NODE, H_NONCE, H_SIGNATURE, H_TIME,
};
use super::transport::{backoff, Event, Transport, TransportError};
use ed25519_dalek::SigningKey;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long the control plane holds a poll; the client waits a little longer.
pub const POLL_SECS: u64 = 25;

/// What a long poll brought.
enum Polled {
    Envelope(Vec<u8>),
    /// A dry-run request (the answer's `x-converge-kind: dry-run`); it never moves the
    /// cursor, and being routed by an unsigned header changes nothing: its signature is
    /// in a domain of its own.
    DryRun(Vec<u8>),
}

/// The node's HTTPS client.
#[derive(Clone)]
pub struct HttpsTransport {
    client: reqwest::Client,
    base: String,
    node_id: String,
    key: Arc<SigningKey>,
    /// Largest answer read (an envelope of the largest document accepted).
    max_body: usize,
    /// The plane key the node trusts now: a poll names it, and the plane answers with
    /// the current envelope when it is signed by a newer key (a rotation).
    pin: Option<Pin>,
}

impl HttpsTransport {
    pub fn new(
        base: &str,
        node_id: &str,
        key: SigningKey,
        ca_pem: Option<&str>,
        max_body: usize,
        pin: Option<Pin>,
    ) -> Result<Self, TransportError> {
        let client = super::protocol::http_client(ca_pem, Duration::from_secs(POLL_SECS + 15))
            .map_err(|e| TransportError::Failed(format!("{e:#}")))?;
        Ok(HttpsTransport {
            client,
            base: base.trim_end_matches('/').to_string(),
            node_id: node_id.to_string(),
            key: Arc::new(key),
            max_body,
            pin,
        })
    }

    fn signed(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
    ) -> reqwest::RequestBuilder {
        let time = chrono::Utc::now().timestamp();
        let nonce = super::protocol::nonce();
        let sig = SignedRequest {
            method: method.as_str(),
            path_and_query: path,
            time,
            nonce: &nonce,
            body: &body,
        }
        .sign(&self.key);
        self.client
            .request(method, format!("{}{path}", self.base))
            .header(H_NODE, &self.node_id)
            .header(H_TIME, time.to_string())
            .header(H_NONCE, nonce)
            .header(H_SIGNATURE, sig)
            .body(body)
    }

    /// One quick signed request: the TLS session is up and the plane knows this node.
    async fn hello(&self) -> Result<(), String> {
        let path = format!("/v1/nodes/{}/hello", self.node_id);
        let resp = self
            .signed(reqwest::Method::GET, &path, Vec::new())
            .send()
            .await
            .map_err(|e| format!("hello: {e}"))?;
        match resp.status().as_u16() {
            204 => Ok(()),
            s => Err(format!("hello: HTTP {s}")),
        }
    }

    async fn poll(&self, after: u64) -> Result<Option<Polled>, String> {
        let mut path = format!("/v1/nodes/{}/document?after={after}", self.node_id);
        if let Some(pin) = &self.pin {
            let pinned = *pin.lock().unwrap_or_else(|p| p.into_inner());
            path.push_str(&format!("&key={}", super::identity::key_id(&pinned)));
        }
        let resp = self
            .signed(reqwest::Method::GET, &path, Vec::new())
            .send()
            .await
            .map_err(|e| format!("poll: {e}"))?;
        match resp.status().as_u16() {
            200 => {
                let dry_run = resp
                    .headers()
                    .get(super::dryrun::H_KIND)
                    .is_some_and(|v| v == super::dryrun::KIND);
                let body = read_capped(resp, self.max_body)
                    .await
                    .map_err(|e| format!("poll: {e}"))?;
                Ok(Some(if dry_run {
                    Polled::DryRun(body)
                } else {
                    Polled::Envelope(body)
                }))
            }
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
            // A (re)connection starts with a signed hello; then documents are polled.
            let step = if connected {
                self.poll(after).await
            } else {
                self.hello().await.map(|()| None)
            };
            let got = match step {
                Ok(got) => got,
                Err(e) => {
                    connected = false;
                    if events.send(Event::Disconnected(e)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    continue;
                }
            };
            if !connected {
                connected = true;
                if events.send(Event::Connected).await.is_err() {
                    return;
                }
            }
            let bytes = match got {
                None => {
                    attempt = 0;
                    continue;
                }
                // Handled by the client; the cursor does not move.
                Some(Polled::DryRun(bytes)) => {
                    attempt = 0;
                    if events.send(Event::DryRun(bytes)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Some(Polled::Envelope(bytes)) => bytes,
            };
            // Past this envelope only once the client verified it (a verified one the
            // agent refused is not fetched in a loop either); an unverified one is asked
            // for again after a back-off.
            let (tx, rx) = oneshot::channel();
            if events.send(Event::Envelope(bytes, Some(tx))).await.is_err() {
                return;
            }
            match rx.await {
                Ok(Some(g)) => {
                    attempt = 0;
                    after = after.max(g);
                }
                Ok(None) => {
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                Err(_) => return,
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

#[cfg(test)]
mod tests {
    //! The transport against a real HTTP server on loopback that answers polls from a
    //! script, recording the cursor of each poll.

    use super::*;
    use crate::control::envelope::Envelope;
    use crate::control::identity::Identity;
    use axum::extract::{Query, State};
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Script {
        /// Answers to polls, in order; then 204 (after a short wait).
        answers: Mutex<VecDeque<Vec<u8>>>,
        /// The `after` of every poll.
        cursors: Mutex<Vec<u64>>,
    }

    async fn document(
        State(s): State<Arc<Script>>,
        Query(q): Query<HashMap<String, String>>,
    ) -> axum::response::Response {
        let after = q.get("after").and_then(|a| a.parse().ok()).unwrap_or(0);
        s.cursors.lock().unwrap().push(after);
        let next = s.answers.lock().unwrap().pop_front();
        match next {
            Some(body) => body.into_response(),
            None => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                StatusCode::NO_CONTENT.into_response()
            }
        }
    }

    async fn serve(script: Arc<Script>) -> String {
        let app = axum::Router::new()
            .route("/v1/nodes/{id}/document", axum::routing::get(document))
            .route(
                "/v1/nodes/{id}/hello",
                axum::routing::get(|| async { StatusCode::NO_CONTENT }),
            )
            .with_state(script);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn envelope(key: &SigningKey, generation: u64) -> Vec<u8> {
        let env = Envelope::sign(key, "n1", generation, "2026-12-07T00:00:00Z", b"{}").unwrap();
        serde_json::to_vec(&env).unwrap()
    }

    /// Runs the transport; answers each envelope with `verdict(generation)` and collects
    /// the events until `until` of them arrived.
    async fn run(
        script: Arc<Script>,
        max_body: usize,
        verdict: impl Fn(u64) -> Option<u64>,
        until: usize,
    ) -> Vec<String> {
        let base = serve(script).await;
        let t = HttpsTransport::new(
            &base,
            "n1",
            Identity::ephemeral().signing_key().clone(),
            None,
            max_body,
            None,
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        t.start(tx, 0);
        let mut seen = Vec::new();
        while seen.len() < until {
            match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
                Ok(Some(Event::Envelope(bytes, reply))) => {
                    let g = Envelope::parse(&bytes).unwrap().generation;
                    seen.push(format!("envelope {g}"));
                    reply.unwrap().send(verdict(g)).unwrap();
                }
                Ok(Some(Event::Connected)) => seen.push("connected".into()),
                Ok(Some(Event::Disconnected(e))) => seen.push(format!("disconnected: {e}")),
                Ok(Some(Event::DryRun(_))) => seen.push("dry run".into()),
                Ok(None) | Err(_) => break,
            }
        }
        seen
    }

    #[tokio::test]
    async fn the_cursor_moves_only_past_verified_envelopes() {
        let plane = Identity::ephemeral();
        let forger = Identity::ephemeral();
        let script = Arc::new(Script::default());
        // A forged envelope with the highest generation, then the plane's generation 2.
        script.answers.lock().unwrap().extend([
            envelope(forger.signing_key(), u64::MAX),
            envelope(plane.signing_key(), 2),
        ]);
        // The client's verdict: only generation 2 verifies (what the agent does with
        // the pinned key).
        let seen = run(script.clone(), 1 << 20, |g| (g == 2).then_some(2), 3).await;
        assert_eq!(
            seen,
            ["connected", &format!("envelope {}", u64::MAX), "envelope 2"]
        );
        // Polled from 0 before and after the forged one; past 2 once 2 verified.
        let cursors = script.cursors.lock().unwrap().clone();
        assert_eq!(&cursors[..2], &[0, 0], "{cursors:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cursors = script.cursors.lock().unwrap().clone();
        assert!(cursors[2..].iter().all(|c| *c == 2), "{cursors:?}");
    }

    #[tokio::test]
    async fn an_oversized_answer_is_not_read() {
        let plane = Identity::ephemeral();
        let script = Arc::new(Script::default());
        let big = envelope(plane.signing_key(), 3);
        script.answers.lock().unwrap().push_back(big.clone());
        let seen = run(script, big.len() - 1, Some, 2).await;
        assert_eq!(seen[0], "connected");
        assert!(
            seen[1].starts_with("disconnected: poll: answer larger than"),
            "{seen:?}"
        );
    }
}
