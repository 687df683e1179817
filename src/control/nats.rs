//! NATS JetStream transport. The node receives its own key of the KV bucket `converge`
//! from a durable push consumer that the control plane makes for it (filtered to
//! `$KV.converge.<node>`, delivering to `_INBOX_<node>.docs`, the last value first, each
//! message acknowledged once the agent handled it), dry-run requests on
//! `_INBOX_<node>.plan`, and publishes status (and dry-run answers) on
//! `converge.status.<node>`. Nodes cannot make consumers: one made by a node could aim
//! its delivery at any subject, such as another node's status (nats-server does not
//! check a delivery subject against the creator's permissions). Only APIs of
//! nats-server 2.9 are used.

use super::protocol::{inbox_prefix, status_subject, NodeMessage, Shards};
use super::transport::{backoff, Event, Transport, TransportError};
use async_nats::jetstream::consumer::{push, AckPolicy, DeliverPolicy};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

/// The node's NATS client.
#[derive(Clone)]
pub struct NatsTransport {
    client: async_nats::Client,
    url: String,
    node_id: String,
    conn: Arc<tokio::sync::Mutex<mpsc::Receiver<async_nats::Event>>>,
}

/// The servers of a NATS URL list (`tls://a:4222,tls://b:4222`): a node or the plane
/// connects to one of them and moves to another when it dies (the servers of a cluster
/// also tell clients about each other).
pub fn servers(urls: &str) -> Vec<&str> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// TLS for a NATS connection: the server's certificate is verified against the public
/// roots and `ca_pem` (the CA pinned at join); a `tls://` URL refuses a server that
/// does not speak TLS (no downgrade), a `nats://` one uses TLS when the server asks.
pub fn with_tls(
    opts: async_nats::ConnectOptions,
    url: &str,
    ca_pem: Option<&str>,
) -> Result<async_nats::ConnectOptions, String> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.unwrap_or("").as_bytes()) {
        let cert = cert.map_err(|e| format!("CA certificate (PEM): {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("CA certificate: {e}"))?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(opts.tls_client_config(config).require_tls(
        servers(url)
            .iter()
            .any(|u| u.to_ascii_lowercase().starts_with("tls://")),
    ))
}

/// The node's identity key as a NATS user nkey: (public `U…`, seed `SU…`).
pub fn nkey(identity: &ed25519_dalek::SigningKey) -> Result<(String, String), String> {
    let kp = nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, identity.to_bytes())
        .map_err(|e| format!("nkey: {e}"))?;
    let seed = kp.seed().map_err(|e| format!("nkey seed: {e}"))?;
    Ok((kp.public_key(), seed))
}

/// Whether `nkey` is a user nkey of exactly `public` (what enrollment registered).
pub fn nkey_matches(nkey: &str, public: &ed25519_dalek::VerifyingKey) -> bool {
    let user = nkeys::KeyPair::from_public_key(nkey)
        .is_ok_and(|kp| kp.key_pair_type() == nkeys::KeyPairType::User);
    user && nkeys::from_public_key(nkey).is_ok_and(|(_, raw)| raw == public.to_bytes())
}

/// Connects (in the background: the first attempt may fail and is retried) as the node:
/// with its nkey (`identity`) when `password` is empty, over TLS verified with `ca_pem`
/// (see [`with_tls`]).
pub async fn connect(
    url: &str,
    user: &str,
    password: &str,
    identity: &ed25519_dalek::SigningKey,
    node_id: &str,
    ca_pem: Option<&str>,
) -> Result<NatsTransport, TransportError> {
    let (tx, rx) = mpsc::channel(64);
    let opts = if password.is_empty() {
        let (_, seed) = nkey(identity).map_err(TransportError::Failed)?;
        async_nats::ConnectOptions::with_nkey(seed)
    } else {
        async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
    };
    let client = with_tls(opts, url, ca_pem)
        .map_err(TransportError::Failed)?
        .custom_inbox_prefix(inbox_prefix(node_id))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(backoff)
        .event_callback(move |ev| {
            let tx = tx.clone();
            async move {
                let _ = tx.try_send(ev);
            }
        })
        .connect(servers(url).as_slice())
        .await
        .map_err(|e| TransportError::Failed(format!("nats connect {url}: {e}")))?;
    Ok(NatsTransport {
        client,
        url: url.to_string(),
        node_id: node_id.to_string(),
        conn: Arc::new(tokio::sync::Mutex::new(rx)),
    })
}

/// Name of the node's durable consumer (made by the control plane).
pub fn consumer_name(node_id: &str) -> String {
    format!("node-{node_id}")
}

/// Where the node's consumer delivers: under the node's own inbox, the only subjects
/// it may subscribe to.
pub fn deliver_subject(node_id: &str) -> String {
    format!("{}.docs", inbox_prefix(node_id))
}

/// Where the control plane publishes dry-run requests for a node (plain NATS, not
/// JetStream: a dry run is for now or never): under the node's own inbox, which it may
/// already subscribe to and which no other node may publish to, so no permission of an
/// enrolled node changes.
pub fn plan_subject(node_id: &str) -> String {
    format!("{}.plan", inbox_prefix(node_id))
}

/// The consumer the control plane makes for a node: its key only, to its inbox, the
/// newest value first, redelivered until the node acknowledges it (an agent killed
/// before it handled a document gets it again).
///
/// Its state (what was delivered and acknowledged) is kept in memory: the documents
/// themselves are in the file-backed bucket, and a consumer is only a cursor over one
/// key. On disk, every delivery and acknowledgement rewrote one small file per node,
/// most of the server's work in a generation for 10,000 nodes (BENCHMARKS.md, "10,000
/// nodes"). A consumer lost with a restarted standalone server is made again by the
/// plane ([`crate::control::plane`] on reconnect) and delivers the newest document once
/// more, which the node takes as the re-delivery it is; on a cluster its replicas keep it.
pub fn consumer_config(node_id: &str, shards: Shards) -> push::Config {
    push::Config {
        durable_name: Some(consumer_name(node_id)),
        deliver_subject: deliver_subject(node_id),
        filter_subject: shards.key_subject(node_id),
        deliver_policy: DeliverPolicy::LastPerSubject,
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        memory_storage: true,
        ..Default::default()
    }
}

/// Makes node `node_id`'s consumer on `stream`, or finds it. One an older plane made
/// keeps its state on disk and is made again as [`consumer_config`] says (the node gets
/// its newest document once more).
pub async fn make_consumer(
    stream: &async_nats::jetstream::stream::Stream,
    node_id: &str,
    shards: Shards,
) -> Result<(), async_nats::Error> {
    let name = consumer_name(node_id);
    let config = consumer_config(node_id, shards);
    let consumer = stream.get_or_create_consumer(&name, config.clone()).await?;
    if !consumer.cached_info().config.memory_storage {
        stream.delete_consumer(&name).await?;
        stream.create_consumer(config).await?;
    }
    Ok(())
}

impl NatsTransport {
    async fn run(self, events: mpsc::Sender<Event>) {
        let mut conn = self.conn.clone().lock_owned().await;
        let mut attempt = 0usize;
        loop {
            if self.client.connection_state() != async_nats::connection::State::Connected {
                // Wait for the client's own reconnect loop.
                match conn.recv().await {
                    Some(async_nats::Event::Connected) => {}
                    Some(_) => continue,
                    None => return,
                }
            }
            // The client renews the subscription on every reconnect by itself.
            let subscribed = async {
                let messages = self
                    .client
                    .subscribe(deliver_subject(&self.node_id))
                    .await?;
                let plans = self.client.subscribe(plan_subject(&self.node_id)).await?;
                Ok::<_, async_nats::SubscribeError>((messages, plans))
            };
            let (mut messages, mut plans) = match subscribed.await {
                Ok(s) => s,
                Err(e) => {
                    if events
                        .send(Event::Disconnected(format!("subscribe: {e}")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    continue;
                }
            };
            attempt = 0;
            if events.send(Event::Connected).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    m = messages.next() => match m {
                        Some(m) => {
                            let op = m.headers.as_ref().and_then(|h| h.get("KV-Operation")).map(|v| v.as_str().to_string());
                            if !matches!(op.as_deref(), Some("DEL" | "PURGE")) {
                                let (tx, rx) = oneshot::channel();
                                if events.send(Event::Envelope(m.payload.to_vec(), Some(tx))).await.is_err() {
                                    return;
                                }
                                // Handled (whatever the outcome): acknowledged; the
                                // client gone: not, so the server delivers it again.
                                if rx.await.is_err() {
                                    return;
                                }
                            }
                            if let Some(reply) = m.reply {
                                if let Err(e) = self.client.publish(reply, Vec::new().into()).await {
                                    debug!(error = %e, "ack not sent; the server delivers again");
                                }
                            }
                        }
                        None => break,
                    },
                    p = plans.next() => match p {
                        Some(p) => {
                            if events.send(Event::DryRun(p.payload.to_vec())).await.is_err() {
                                return;
                            }
                        }
                        None => break,
                    },
                    ev = conn.recv() => match ev {
                        Some(async_nats::Event::Connected) => {
                            if events.send(Event::Connected).await.is_err() {
                                return;
                            }
                        }
                        Some(async_nats::Event::Disconnected) => {
                            if events.send(Event::Disconnected("nats connection lost".into())).await.is_err() {
                                return;
                            }
                        }
                        Some(_) => {}
                        None => return,
                    }
                }
            }
        }
    }
}

impl Transport for NatsTransport {
    fn start(&self, events: mpsc::Sender<Event>, _after: u64) {
        tokio::spawn(self.clone().run(events));
    }

    async fn send(&self, msg: &NodeMessage) -> Result<(), TransportError> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(TransportError::Disconnected(self.url.clone()));
        }
        let body = serde_json::to_vec(msg).map_err(|e| TransportError::Failed(e.to_string()))?;
        self.client
            .publish(status_subject(&self.node_id), body.into())
            .await
            .map_err(|e| TransportError::Failed(e.to_string()))?;
        self.client
            .flush()
            .await
            .map_err(|e| TransportError::Failed(e.to_string()))
    }

    fn describe(&self) -> String {
        format!("nats {}", self.url)
    }
}

/// The permissions of one node's NATS user: publish its own status and the acks of its
/// own consumer, subscribe to its own inbox; nothing else (no JetStream API at all).
pub fn node_permissions(node_id: &str, shards: Shards) -> (Vec<String>, Vec<String>) {
    (
        vec![
            status_subject(node_id),
            format!(
                "$JS.ACK.{}.{}.>",
                shards.stream(shards.of(node_id)),
                consumer_name(node_id)
            ),
        ],
        vec![format!("{}.>", inbox_prefix(node_id))],
    )
}

/// One user of the server's authorization block.
pub struct User<'a> {
    pub user: &'a str,
    pub credential: Credential<'a>,
    /// `None`: everything (the control plane).
    pub permissions: Option<(Vec<String>, Vec<String>)>,
}

/// How a user proves who it is.
pub enum Credential<'a> {
    /// A password (nodes enrolled by an older converge, until re-enrolled).
    Password(&'a str),
    /// A public nkey (`U…`): the server checks a signature, the file holds no secret.
    Nkey(&'a str),
}

fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Renders an `authorization { users = [...] }` block for nats-server's configuration
/// (included from the main file; reloaded with SIGHUP).
pub fn render_authorization(users: &[User<'_>]) -> String {
    let mut out = String::from(
        "# Written by `converge control-plane serve`; do not edit.\nauthorization {\n  users = [\n",
    );
    for u in users {
        let perms = match &u.permissions {
            None => "{publish: \">\", subscribe: \">\"}".to_string(),
            Some((publish, subscribe)) => {
                let list =
                    |v: &Vec<String>| v.iter().map(|s| quoted(s)).collect::<Vec<_>>().join(", ");
                format!(
                    "{{publish: {{allow: [{}]}}, subscribe: {{allow: [{}]}}}}",
                    list(publish),
                    list(subscribe)
                )
            }
        };
        let who = match u.credential {
            Credential::Password(p) => format!("user: {}, password: {}", quoted(u.user), quoted(p)),
            Credential::Nkey(k) => format!("nkey: {}", quoted(k)),
        };
        out.push_str(&format!("    {{{who}, permissions: {perms}}}\n"));
    }
    out.push_str("  ]\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nkey_is_the_identity_key() {
        let id = crate::control::identity::Identity::ephemeral();
        let (public, seed) = nkey(id.signing_key()).unwrap();
        assert!(public.starts_with('U') && seed.starts_with("SU"));
        assert!(nkey_matches(&public, &id.public_key()));
        let other = crate::control::identity::Identity::ephemeral();
        assert!(!nkey_matches(&public, &other.public_key()));
        assert!(!nkey_matches("not a key", &id.public_key()));
    }
}
