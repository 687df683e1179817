//! Wire types shared by the node and the reference control plane (docs/protocol.md):
//! enrollment, the transport credentials, the node's pinned `control.json`, the
//! messages a node sends (status, refusal, dry-run answer) and the signature on HTTPS
//! requests.

use crate::status::ReconcilerStatus;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The KV bucket holding one envelope per node (key = node id).
pub const BUCKET: &str = "converge";

/// The documents bucket split over streams (`serve --nats-shards N`), node ids by hash:
/// with nats-server 2.9 a put costs more the more consumers its stream has (one per
/// node). Fixed at the plane's first start; one shard is [`BUCKET`] itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shards(pub u16);

impl Shards {
    pub const ONE: Shards = Shards(1);

    /// The shard of `node_id`: the first four bytes of its SHA-256, modulo the count.
    pub fn of(self, node_id: &str) -> u16 {
        let digest = Sha256::digest(node_id.as_bytes());
        let head = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        (head % u32::from(self.0.max(1))) as u16
    }

    /// Every shard.
    pub fn all(self) -> std::ops::Range<u16> {
        0..self.0.max(1)
    }

    /// The bucket of shard `k`.
    pub fn bucket(self, k: u16) -> String {
        match self.0 {
            0 | 1 => BUCKET.to_string(),
            _ => format!("{BUCKET}-{k}"),
        }
    }

    /// The stream behind the bucket of shard `k`.
    pub fn stream(self, k: u16) -> String {
        format!("KV_{}", self.bucket(k))
    }

    /// The subject of a node's key.
    pub fn key_subject(self, node_id: &str) -> String {
        format!("$KV.{}.{node_id}", self.bucket(self.of(node_id)))
    }
}

/// Subject a node publishes its status and refusals on.
pub fn status_subject(node_id: &str) -> String {
    format!("converge.status.{node_id}")
}

/// The node's inbox prefix (its only subscribe permission).
pub fn inbox_prefix(node_id: &str) -> String {
    format!("_INBOX_{node_id}")
}

/// `POST /v1/enroll` body. `Debug` redacts the token.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollRequest {
    pub token: String,
    /// Requested node name (the host name by default); the id may differ.
    pub name: String,
    /// Base64 Ed25519 public key (the node's identity).
    pub public_key: String,
    /// Base64 X25519 public key (secrets are sealed to it).
    pub sealing_key: String,
    pub facts: Facts,
    /// The identity key as a NATS user nkey (`U…`): the node authenticates to NATS
    /// with it, so no password exists. Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_key: Option<String>,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("token", &converge_core::redact(&self.token))
            .field("name", &self.name)
            .field("public_key", &self.public_key)
            .field("sealing_key", &self.sealing_key)
            .field("facts", &self.facts)
            .finish()
    }
}

/// What a node reports about itself at enrollment and in every status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    pub hostname: String,
    pub arch: String,
    pub kernel: String,
    pub converge_version: String,
    /// `podman`, `docker` or `none` (which API socket exists).
    pub container_runtime: String,
    /// WireGuard public keys of the interfaces whose generated key exists.
    #[serde(default)]
    pub wireguard_public_keys: std::collections::BTreeMap<String, String>,
    /// `worker` or `proxy`.
    pub mode: String,
}

/// How the node reaches the control plane after enrollment. `Debug` redacts the
/// password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Transport {
    Nats {
        url: String,
        user: String,
        /// Empty: the node authenticates with its nkey (the identity key).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        password: String,
    },
    Https {
        url: String,
    },
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Nats {
                url,
                user,
                password,
            } => f
                .debug_struct("Nats")
                .field("url", url)
                .field("user", user)
                .field("password", &converge_core::redact(password))
                .finish(),
            Transport::Https { url } => f.debug_struct("Https").field("url", url).finish(),
        }
    }
}

impl Transport {
    pub fn describe(&self) -> String {
        match self {
            Transport::Nats { url, .. } => format!("nats {url}"),
            Transport::Https { url } => format!("https {url}"),
        }
    }
}

/// `POST /v1/enroll` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollResponse {
    pub node_id: String,
    /// Base64 Ed25519 public key the control plane signs documents with.
    pub signing_key: String,
    pub transport: Transport,
}

/// `<data-dir>/control.json`: the enrollment the agent runs its client from (0600: it
/// holds the transport password).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlConfig {
    /// The control plane's enrollment URL.
    pub url: String,
    pub node_id: String,
    /// The pinned signing key (base64 Ed25519).
    pub signing_key: String,
    pub transport: Transport,
    pub enrolled_at: String,
    /// PEM certificate(s) the node trusts for the control plane's HTTPS, besides the
    /// public roots (a private CA or a self-signed certificate), from `join --ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
    /// Seconds between status messages when nothing changes (heartbeat).
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
}

fn default_heartbeat() -> u64 {
    15
}

/// An HTTP client for the control plane (rustls; public roots plus `ca_pem` if given).
pub fn http_client(
    ca_pem: Option<&str>,
    timeout: std::time::Duration,
) -> anyhow::Result<reqwest::Client> {
    use anyhow::Context;
    let mut b = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(timeout);
    if let Some(pem) = ca_pem {
        for cert in
            reqwest::Certificate::from_pem_bundle(pem.as_bytes()).context("CA certificate (PEM)")?
        {
            b = b.add_root_certificate(cert);
        }
    }
    b.build().context("HTTP client")
}

impl ControlConfig {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("control.json")
    }

    /// The pinned configuration, if the node is enrolled.
    pub fn load(data_dir: &Path) -> anyhow::Result<Option<ControlConfig>> {
        use anyhow::Context;
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).with_context(|| format!("parse {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }

    pub fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        let path = Self::path(data_dir);
        let body = serde_json::to_vec_pretty(self)?;
        converge_core::fsutil::write_atomic(&path, &body, 0o600)
            .with_context(|| format!("write {}", path.display()))
    }

    pub fn pinned_key(&self) -> anyhow::Result<VerifyingKey> {
        super::identity::parse_public_key(&self.signing_key)
            .ok_or_else(|| anyhow::anyhow!("control.json: signingKey is not an Ed25519 key"))
    }
}

/// What a node sends to the control plane.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum NodeMessage {
    /// Sent on change (coalesced) and every heartbeat.
    Status(Box<StatusMessage>),
    /// A document the node refused; nothing changed on the host.
    Refused {
        #[serde(rename = "nodeId")]
        node_id: String,
        #[serde(rename = "sentAt")]
        sent_at: String,
        generation: Option<u64>,
        error: String,
    },
    /// The answer to a dry run (`control-plane plan`): nothing changed on the host.
    Planned(Box<super::dryrun::PlanAnswer>),
}

/// The node's status.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusMessage {
    pub node_id: String,
    pub sent_at: String,
    /// The generation the node accepted (received, validated, stored).
    pub accepted_generation: Option<u64>,
    /// Per-reconciler conditions; each carries the generation it converged to.
    pub reconcilers: Vec<ReconcilerStatus>,
    pub facts: Facts,
    pub heartbeat_secs: u64,
}

/// Headers of a signed HTTPS request.
pub const H_NODE: &str = "x-converge-node";
pub const H_TIME: &str = "x-converge-time";
pub const H_NONCE: &str = "x-converge-nonce";
pub const H_SIGNATURE: &str = "x-converge-signature";
/// How far a signed request's time may be from the control plane's clock; the plane
/// remembers each request's nonce for twice this long, so no request is accepted twice.
pub const MAX_SKEW_SECS: i64 = 300;

/// A fresh request nonce: 16 random bytes, hex.
pub fn nonce() -> String {
    use rand_core::RngCore;
    let mut raw = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut raw);
    hex::encode(raw)
}

/// What a node signs for one HTTPS request.
pub struct SignedRequest<'a> {
    pub method: &'a str,
    pub path_and_query: &'a str,
    /// Unix time, seconds.
    pub time: i64,
    pub nonce: &'a str,
    pub body: &'a [u8],
}

impl SignedRequest<'_> {
    /// `converge/request/v2\n<METHOD>\n<path and query>\n<unix time>\n<nonce>\n<hex sha256
    /// of body>`.
    pub fn bytes(&self) -> Vec<u8> {
        format!(
            "converge/request/v2\n{}\n{}\n{}\n{}\n{}",
            self.method,
            self.path_and_query,
            self.time,
            self.nonce,
            hex::encode(Sha256::digest(self.body))
        )
        .into_bytes()
    }

    /// The signature header value.
    pub fn sign(&self, key: &SigningKey) -> String {
        B64.encode(key.sign(&self.bytes()).to_bytes())
    }

    /// Checks the signature and the time window (the nonce's freshness is the
    /// control plane's to check).
    pub fn verify(&self, key: &VerifyingKey, signature: &str, now: i64) -> bool {
        if (now - self.time).abs() > MAX_SKEW_SECS || self.nonce.len() != 32 {
            return false;
        }
        let Some(sig) = B64
            .decode(signature)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
        else {
            return false;
        };
        key.verify(&self.bytes(), &Signature::from_bytes(&sig))
            .is_ok()
    }
}

/// Reads a response body of at most `max` bytes; a larger one is an error, read no
/// further (a control plane, or whoever answers in its place, cannot make the node
/// buffer without bound).
pub async fn read_capped(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(format!("answer larger than {max} bytes"));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > max {
            return Err(format!("answer larger than {max} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Node ids the control plane assigns: `[A-Za-z0-9_-]`, no dots, because the id is a
/// single token of NATS subjects and permissions.
pub fn sanitize_node_id(name: &str) -> String {
    let mut id: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if !id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) {
        id.insert(0, 'n');
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_keep_one_bucket_by_default_and_spread_nodes_stably() {
        // One shard is the bucket nodes and older planes know.
        assert_eq!(Shards::ONE.stream(0), "KV_converge");
        assert_eq!(Shards::ONE.key_subject("web-1"), "$KV.converge.web-1");
        let s = Shards(8);
        // A node's shard never moves (its consumer and permissions name it).
        assert_eq!(s.of("web-1"), s.of("web-1"));
        assert_eq!(
            s.key_subject("web-1"),
            format!("$KV.converge-{}.web-1", s.of("web-1"))
        );
        let mut per = [0usize; 8];
        for i in 0..8000 {
            per[usize::from(s.of(&format!("node-{i}")))] += 1;
        }
        assert!(per.iter().all(|n| (800..1200).contains(n)), "{per:?}");
    }

    #[test]
    fn request_signatures_bind_method_path_time_nonce_and_body() {
        let id = crate::control::identity::Identity::ephemeral();
        let n = nonce();
        let req = |method, path, nonce, body| SignedRequest {
            method,
            path_and_query: path,
            time: 100,
            nonce,
            body,
        };
        let sig = req("POST", "/v1/x", n.as_str(), b"{}").sign(id.signing_key());
        let pk = id.public_key();
        assert!(req("POST", "/v1/x", &n, b"{}").verify(&pk, &sig, 120));
        assert!(!req("GET", "/v1/x", &n, b"{}").verify(&pk, &sig, 120));
        assert!(!req("POST", "/v1/y", &n, b"{}").verify(&pk, &sig, 120));
        assert!(!req("POST", "/v1/x", &n, b"{ }").verify(&pk, &sig, 120));
        let other = nonce();
        assert!(!req("POST", "/v1/x", &other, b"{}").verify(&pk, &sig, 120));
        assert!(!req("POST", "/v1/x", &n, b"{}").verify(&pk, &sig, 1000));
    }

    #[test]
    fn debug_output_redacts_credentials() {
        let t = Transport::Nats {
            url: "nats://x".into(),
            user: "n1".into(),
            password: "pa55word".into(),
        };
        let cfg = ControlConfig {
            url: "https://cp".into(),
            node_id: "n1".into(),
            signing_key: String::new(),
            transport: t,
            ca_cert: None,
            enrolled_at: String::new(),
            heartbeat_secs: 15,
        };
        assert!(!format!("{cfg:?}").contains("pa55word"));
        let req = EnrollRequest {
            token: "t0ken-secret".into(),
            name: "n1".into(),
            public_key: String::new(),
            sealing_key: String::new(),
            facts: Facts::default(),
            nats_key: None,
        };
        assert!(!format!("{req:?}").contains("t0ken-secret"));
    }

    #[test]
    fn node_ids_are_one_subject_token() {
        assert_eq!(sanitize_node_id("web.example.com"), "web-example-com");
        assert_eq!(sanitize_node_id("-x"), "n-x");
        assert_eq!(sanitize_node_id("cvg-a_1"), "cvg-a_1");
    }
}
