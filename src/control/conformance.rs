//! `converge control-plane conformance URL`: checks a running control plane as a node
//! would (docs/protocol.md), so a control plane written in any language can show it
//! speaks the protocol: over HTTPS, refusal of an unknown token, enrollment of a
//! throwaway identity, the plane's key, refusal of a used token; then on the transport
//! the plane hands out. HTTPS: a signed hello, a document over the long poll
//! (signature, domain, node, generation, sealed secrets, validity), a signed status, and
//! refusal of replayed, unsigned, forged, tampered, stale and misaddressed requests.
//! NATS: the node's nkey over the server's TLS, the document on the node's delivery
//! subject (the same checks), a status, and the server refusing this node another
//! node's documents and status subject and a write to the bucket. Answers are read up
//! to the node's own size caps.

use super::envelope::{self, Envelope};
use super::identity::{fingerprint, key_id, parse_public_key, Identity};
use super::protocol::{
    read_capped, EnrollRequest, EnrollResponse, Facts, NodeMessage, SignedRequest, StatusMessage,
    Transport, H_NODE, H_NONCE, H_SIGNATURE, H_TIME,
};
use crate::limits::Limits;
use std::time::Duration;

/// The enrollment answer is read up to this (as `converge join` does).
const ENROLL_MAX: usize = 64 << 10;

/// Options of `control-plane conformance`.
pub struct Options {
    pub url: String,
    pub ca_pem: Option<String>,
    pub token: String,
    /// The plane's signing key as `SHA256:…`; without it the fingerprint is shown only.
    pub plane_key: Option<String>,
    /// The throwaway node's name (default `conformance-<random>`).
    pub name: Option<String>,
    pub limits: Limits,
}

/// What became of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    /// Not applicable or not checkable (said why); does not fail the run.
    Skip,
}

/// One check and its reason.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = match self.outcome {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
        };
        write!(f, "{o}  {}: {}", self.name, self.detail)
    }
}

struct Run {
    checks: Vec<Check>,
}

impl Run {
    fn add(&mut self, name: &'static str, result: Result<String, String>) -> bool {
        let ok = result.is_ok();
        let (outcome, detail) = match result {
            Ok(d) => (Outcome::Pass, d),
            Err(d) => (Outcome::Fail, d),
        };
        self.checks.push(Check {
            name,
            outcome,
            detail,
        });
        ok
    }

    fn skip(&mut self, name: &'static str, why: &str) {
        self.checks.push(Check {
            name,
            outcome: Outcome::Skip,
            detail: why.to_string(),
        });
    }
}

/// The names of the checks after enrollment, skipped when it failed.
const AFTER_ENROLLMENT: &[&str] = &[
    "plane key",
    "used token refused",
    "signed hello",
    "document",
    "status accepted",
    "replayed request refused",
    "unsigned request refused",
    "forged request refused",
    "tampered body refused",
    "stale time refused",
    "other node's path refused",
];

/// The checks on NATS, after enrollment and the used token.
const NATS_CHECKS: &[&str] = &[
    "nats connection",
    "document",
    "status accepted",
    "other node's documents refused",
    "other node's status refused",
    "bucket write refused",
];

/// How long the NATS checks wait for the document, and for a permission violation.
const NATS_DOCUMENT_WAIT: Duration = Duration::from_secs(20);
const NATS_VIOLATION_WAIT: Duration = Duration::from_secs(3);

/// A request as the node signs it, with a given time and nonce.
struct Req<'a> {
    method: reqwest::Method,
    path: String,
    body: Vec<u8>,
    node: &'a str,
    time: i64,
    nonce: String,
}

impl<'a> Req<'a> {
    fn new(method: reqwest::Method, path: String, body: Vec<u8>, node: &'a str) -> Self {
        Req {
            method,
            path,
            body,
            node,
            time: chrono::Utc::now().timestamp(),
            nonce: super::protocol::nonce(),
        }
    }

    fn signature(&self, key: &ed25519_dalek::SigningKey) -> String {
        SignedRequest {
            method: self.method.as_str(),
            path_and_query: &self.path,
            time: self.time,
            nonce: &self.nonce,
            body: &self.body,
        }
        .sign(key)
    }

    /// The request with `signature` (and the body given, which may differ from the
    /// signed one).
    fn build(
        &self,
        client: &reqwest::Client,
        base: &str,
        signature: &str,
        body: Vec<u8>,
    ) -> reqwest::RequestBuilder {
        client
            .request(self.method.clone(), format!("{base}{}", self.path))
            .header(H_NODE, self.node)
            .header(H_TIME, self.time.to_string())
            .header(H_NONCE, &self.nonce)
            .header(H_SIGNATURE, signature)
            .header("content-type", "application/json")
            .body(body)
    }
}

/// Sends and returns the status code; the body (read up to 64 KiB) on failure.
async fn send(rb: reqwest::RequestBuilder) -> Result<(u16, String), String> {
    let resp = rb
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let code = resp.status().as_u16();
    let body = read_capped(resp, ENROLL_MAX).await.unwrap_or_default();
    Ok((
        code,
        String::from_utf8_lossy(&body).chars().take(200).collect(),
    ))
}

fn expect_refused(got: Result<(u16, String), String>) -> Result<String, String> {
    match got? {
        (401, _) => Ok("401".into()),
        (code, body) => Err(format!("HTTP {code}, want 401 {body}")),
    }
}

/// Runs every check; the first failure does not stop the others that can still run.
pub async fn run(opts: Options) -> anyhow::Result<Vec<Check>> {
    let base = opts.url.trim_end_matches('/').to_string();
    let client = super::protocol::http_client(
        opts.ca_pem.as_deref(),
        Duration::from_secs(super::https::POLL_SECS + 15),
    )?;
    let mut run = Run { checks: Vec::new() };
    let identity = Identity::ephemeral();
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| format!("conformance-{}", &super::protocol::nonce()[..8]));
    let facts = Facts {
        hostname: name.clone(),
        arch: std::env::consts::ARCH.to_string(),
        kernel: String::new(),
        converge_version: crate::VERSION.to_string(),
        container_runtime: "none".into(),
        wireguard_public_keys: Default::default(),
        mode: "worker".into(),
    };
    let enroll_req = |token: &str, id: &Identity| -> anyhow::Result<EnrollRequest> {
        Ok(EnrollRequest {
            token: token.to_string(),
            name: name.clone(),
            public_key: id.public_key_b64(),
            sealing_key: id.sealing_key_b64(),
            facts: facts.clone(),
            nats_key: Some(
                super::nats::nkey(id.signing_key())
                    .map_err(|e| anyhow::anyhow!(e))?
                    .0,
            ),
        })
    };
    let enroll_url = format!("{base}/v1/enroll");

    // An unknown token: 403 with a JSON error, nothing enrolled.
    let bogus = enroll_req("converge-conformance-unknown-token", &Identity::ephemeral())?;
    let got = send(client.post(&enroll_url).json(&bogus)).await;
    run.add(
        "unknown token refused",
        match got {
            Ok((403, body))
                if serde_json::from_str::<serde_json::Value>(&body)
                    .is_ok_and(|v| v["error"].is_string()) =>
            {
                Ok(format!("403 {body}"))
            }
            Ok((code, body)) => Err(format!("HTTP {code}, want 403 {{\"error\": …}}: {body}")),
            Err(e) => Err(e),
        },
    );

    // Enrollment of a throwaway identity.
    let req = enroll_req(&opts.token, &identity)?;
    let enrolled: Result<(EnrollResponse, usize, ed25519_dalek::VerifyingKey), String> = async {
        let resp = client
            .post(&enroll_url)
            .json(&req)
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let code = resp.status().as_u16();
        let body = read_capped(resp, ENROLL_MAX).await?;
        if code != 200 {
            return Err(format!(
                "HTTP {code}, want 200: {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ));
        }
        let answer: EnrollResponse = serde_json::from_slice(&body)
            .map_err(|e| format!("the answer is not an enrollment answer: {e}"))?;
        let valid_id = answer
            .node_id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && answer
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_id {
            return Err(format!(
                "nodeId {:?} is not [A-Za-z0-9][A-Za-z0-9_-]*",
                answer.node_id
            ));
        }
        let Some(pinned) = parse_public_key(&answer.signing_key) else {
            return Err("signingKey is not base64 of an Ed25519 public key".into());
        };
        Ok((answer, body.len(), pinned))
    }
    .await;
    let (answer, pinned) = match enrolled {
        Ok((a, size, pinned)) => {
            run.add(
                "enrollment",
                Ok(format!(
                    "enrolled as {:?} ({}), answer {size} bytes ≤ {ENROLL_MAX}",
                    a.node_id,
                    a.transport.describe()
                )),
            );
            (a, pinned)
        }
        Err(e) => {
            run.add("enrollment", Err(e));
            for name in AFTER_ENROLLMENT {
                run.skip(name, "needs an enrollment");
            }
            return Ok(run.checks);
        }
    };
    let node = answer.node_id.clone();

    let fp = fingerprint(&pinned);
    match &opts.plane_key {
        Some(want) => {
            run.add(
                "plane key",
                if *want == fp {
                    Ok(fp)
                } else {
                    Err(format!("the plane signs with {fp}, not {want}"))
                },
            );
        }
        None => run.skip(
            "plane key",
            &format!("signing key {fp} (give --plane-key to check it)"),
        ),
    }

    let got = send(client.post(&enroll_url).json(&req)).await;
    run.add(
        "used token refused",
        match got {
            Ok((code @ (403 | 409), body)) => Ok(format!("{code} {body}")),
            Ok((code, body)) => Err(format!("HTTP {code}, want 403 or 409: {body}")),
            Err(e) => Err(e),
        },
    );

    let base = match &answer.transport {
        Transport::Https { url } => url.trim_end_matches('/').to_string(),
        Transport::Nats { url, .. } => {
            let node = Node {
                id: &node,
                identity: &identity,
                pinned: &pinned,
                facts: &facts,
            };
            nats_checks(&mut run, url, &opts, &node).await;
            return Ok(run.checks);
        }
    };
    let key = identity.signing_key();
    let get = |path: String| Req::new(reqwest::Method::GET, path, Vec::new(), &node);
    let hello_path = format!("/v1/nodes/{node}/hello");

    let hello = get(hello_path.clone());
    let got = send(hello.build(&client, &base, &hello.signature(key), Vec::new())).await;
    run.add(
        "signed hello",
        match got {
            Ok((204, _)) => Ok("204".into()),
            Ok((code, body)) => Err(format!("HTTP {code}, want 204: {body}")),
            Err(e) => Err(e),
        },
    );

    // The long poll: the newest envelope for this node, or 204 once the plane held it.
    let cap = envelope::max_bytes(opts.limits.max_document_bytes);
    let poll = get(format!(
        "/v1/nodes/{node}/document?after=0&key={}",
        key_id(&pinned)
    ));
    let doc: Result<Option<String>, String> = async {
        let resp = poll
            .build(&client, &base, &poll.signature(key), Vec::new())
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        match resp.status().as_u16() {
            204 => return Ok(None),
            200 => {}
            code => return Err(format!("HTTP {code}, want 200 or 204")),
        }
        let bytes = read_capped(resp, cap).await?;
        check_document(&bytes, &pinned, &node, &identity, &opts.limits).map(Some)
    }
    .await;
    match doc {
        Ok(Some(d)) => {
            run.add("document", Ok(d));
        }
        Ok(None) => run.skip(
            "document",
            "no document for this node (204 after the long poll); give the plane one for --name to check it",
        ),
        Err(e) => {
            run.add("document", Err(e));
        }
    }

    // A signed status, then the very same request again.
    let msg = NodeMessage::Status(Box::new(StatusMessage {
        node_id: node.clone(),
        sent_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        accepted_generation: None,
        reconcilers: Vec::new(),
        facts: facts.clone(),
        heartbeat_secs: 15,
    }));
    let body = serde_json::to_vec(&msg)?;
    let status_path = format!("/v1/nodes/{node}/status");
    let post = Req::new(
        reqwest::Method::POST,
        status_path.clone(),
        body.clone(),
        &node,
    );
    let sig = post.signature(key);
    let got = send(post.build(&client, &base, &sig, body.clone())).await;
    run.add(
        "status accepted",
        match got {
            Ok((code @ 200..=299, _)) => Ok(code.to_string()),
            Ok((code, body)) => Err(format!("HTTP {code}, want 204: {body}")),
            Err(e) => Err(e),
        },
    );
    let got = send(post.build(&client, &base, &sig, body.clone())).await;
    run.add("replayed request refused", expect_refused(got));

    let got = send(client.get(format!("{base}{hello_path}"))).await;
    run.add("unsigned request refused", expect_refused(got));

    let forger = Identity::ephemeral();
    let forged = get(hello_path.clone());
    let got = send(forged.build(
        &client,
        &base,
        &forged.signature(forger.signing_key()),
        Vec::new(),
    ))
    .await;
    run.add("forged request refused", expect_refused(got));

    let tampered = Req::new(reqwest::Method::POST, status_path, body.clone(), &node);
    let mut other_body = body;
    other_body.extend_from_slice(b" ");
    let got = send(tampered.build(&client, &base, &tampered.signature(key), other_body)).await;
    run.add("tampered body refused", expect_refused(got));

    let mut stale = get(hello_path);
    stale.time -= 3 * super::protocol::MAX_SKEW_SECS;
    let got = send(stale.build(&client, &base, &stale.signature(key), Vec::new())).await;
    run.add("stale time refused", expect_refused(got));

    // Signed by this node, for another node's path.
    let other = format!("{node}-other");
    let misaddressed = get(format!("/v1/nodes/{other}/hello"));
    let got =
        send(misaddressed.build(&client, &base, &misaddressed.signature(key), Vec::new())).await;
    run.add("other node's path refused", expect_refused(got));

    Ok(run.checks)
}

/// Verifies an envelope as the node does (signer, domain, node, generation, the document
/// valid and for this node, its sealed secrets opened); says what it held.
fn check_document(
    bytes: &[u8],
    pinned: &ed25519_dalek::VerifyingKey,
    node: &str,
    identity: &Identity,
    limits: &Limits,
) -> Result<String, String> {
    let cap = envelope::max_bytes(limits.max_document_bytes);
    if bytes.len() > cap {
        return Err(format!(
            "{} bytes, over the node's cap of {cap}",
            bytes.len()
        ));
    }
    let env = Envelope::parse(bytes).map_err(|e| e.to_string())?;
    let signer = env.signer(pinned).map_err(|e| e.to_string())?;
    let document = env.verify(&signer, node, None).map_err(|e| e.to_string())?;
    if env.generation == 0 {
        return Err("generation 0 (generations start at 1)".into());
    }
    let parsed = crate::document::parse_bytes(&document, crate::document::Format::Json, limits)
        .map_err(|p| {
            format!(
                "the document is not valid ({} problems; first: {})",
                p.len(),
                p.0.first().map(|p| p.to_string()).unwrap_or_default()
            )
        })?;
    if parsed.generation != env.generation {
        return Err(format!(
            "document generation {} in an envelope of generation {}",
            parsed.generation, env.generation
        ));
    }
    if parsed.node.id != node {
        return Err(format!(
            "document for node {:?}, not {node:?}",
            parsed.node.id
        ));
    }
    let secrets = super::sealed::open_all(identity.sealing_secret(), parsed.secrets.as_ref())
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "generation {} signed by {}{}, {} sealed secret(s) opened, {} bytes ≤ {cap}",
        env.generation,
        key_id(&signer),
        if env.rotations.is_empty() {
            String::new()
        } else {
            format!(" after {} rotation(s)", env.rotations.len())
        },
        secrets.len(),
        bytes.len()
    ))
}

/// The enrolled throwaway node, as the NATS checks use it.
struct Node<'a> {
    id: &'a str,
    identity: &'a Identity,
    pinned: &'a ed25519_dalek::VerifyingKey,
    facts: &'a Facts,
}

/// The NATS transport as the node uses it: its nkey and inbox over the server's TLS,
/// its document, its status; and the server's per-node permissions, each forbidden
/// action answered by a permissions violation naming the subject.
async fn nats_checks(run: &mut Run, url: &str, opts: &Options, node: &Node<'_>) {
    use futures::StreamExt;
    let (violations_tx, mut violations) = tokio::sync::mpsc::unbounded_channel::<String>();
    let connected = async {
        let (_, seed) = super::nats::nkey(node.identity.signing_key())?;
        super::nats::with_tls(
            async_nats::ConnectOptions::with_nkey(seed),
            url,
            opts.ca_pem.as_deref(),
        )?
        .custom_inbox_prefix(super::protocol::inbox_prefix(node.id))
        .connection_timeout(Duration::from_secs(10))
        .event_callback(move |ev| {
            let tx = violations_tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = ev {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(super::nats::servers(url).as_slice())
        .await
        .map_err(|e| format!("connect {url}: {e}"))
    }
    .await;
    let client = match connected {
        Ok(c) => {
            let tls = c.server_info().tls_required;
            run.add(
                "nats connection",
                Ok(format!(
                    "connected with the node's nkey{}",
                    if tls { " over TLS" } else { " (no TLS)" }
                )),
            );
            c
        }
        Err(e) => {
            run.add("nats connection", Err(e));
            for name in &NATS_CHECKS[1..] {
                run.skip(name, "needs the NATS connection");
            }
            return;
        }
    };

    // The newest document arrives on the node's delivery subject once the plane made
    // the node's consumer; the node acknowledges it.
    let document = async {
        let mut docs = client
            .subscribe(super::nats::deliver_subject(node.id))
            .await
            .map_err(|e| format!("subscribe: {e}"))?;
        match tokio::time::timeout(NATS_DOCUMENT_WAIT, docs.next()).await {
            Ok(Some(m)) => {
                let checked = check_document(
                    &m.payload,
                    node.pinned,
                    node.id,
                    node.identity,
                    &opts.limits,
                );
                if let Some(reply) = m.reply {
                    let _ = client.publish(reply, Vec::new().into()).await;
                }
                checked.map(Some)
            }
            Ok(None) => Err("the subscription ended".into()),
            Err(_) => Ok(None),
        }
    }
    .await;
    match document {
        Ok(Some(d)) => {
            run.add("document", Ok(d));
        }
        Ok(None) => run.skip(
            "document",
            &format!(
                "nothing on {} within {} s; give the plane a document for --name to check it",
                super::nats::deliver_subject(node.id),
                NATS_DOCUMENT_WAIT.as_secs()
            ),
        ),
        Err(e) => {
            run.add("document", Err(e));
        }
    }

    // What the node may do passes without a violation; what it may not is refused.
    let status = NodeMessage::Status(Box::new(StatusMessage {
        node_id: node.id.to_string(),
        sent_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        accepted_generation: None,
        reconcilers: Vec::new(),
        facts: node.facts.clone(),
        heartbeat_secs: 15,
    }));
    let body = serde_json::to_vec(&status).unwrap_or_default();
    let own = super::protocol::status_subject(node.id);
    let sent = client.publish(own.clone(), body.clone().into()).await;
    let got = match sent {
        Err(e) => Err(format!("publish: {e}")),
        Ok(()) => match violation(&client, &mut violations).await {
            Some(v) => Err(format!("the server refused it: {v}")),
            None => Ok(format!("published on {own} without a violation")),
        },
    };
    run.add("status accepted", got);

    let other = format!("{}-other", node.id);
    let subject = super::nats::deliver_subject(&other);
    let refused = match client.subscribe(subject.clone()).await {
        Err(e) => Err(format!("subscribe: {e}")),
        Ok(_sub) => expect_violation(&client, &mut violations, &subject).await,
    };
    run.add("other node's documents refused", refused);

    let subject = super::protocol::status_subject(&other);
    let refused = match client.publish(subject.clone(), body.into()).await {
        Err(e) => Err(format!("publish: {e}")),
        Ok(()) => expect_violation(&client, &mut violations, &subject).await,
    };
    run.add("other node's status refused", refused);

    // The bucket as one stream: whatever the plane's split, a node may write no key.
    let subject = super::protocol::Shards::ONE.key_subject(node.id);
    let refused = match client.publish(subject.clone(), b"{}".to_vec().into()).await {
        Err(e) => Err(format!("publish: {e}")),
        Ok(()) => expect_violation(&client, &mut violations, &subject).await,
    };
    run.add("bucket write refused", refused);
}

/// The next permissions violation the server reports, if one comes within
/// [`NATS_VIOLATION_WAIT`] after a flush.
async fn violation(
    client: &async_nats::Client,
    violations: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
) -> Option<String> {
    let _ = client.flush().await;
    tokio::time::timeout(NATS_VIOLATION_WAIT, violations.recv())
        .await
        .ok()
        .flatten()
}

async fn expect_violation(
    client: &async_nats::Client,
    violations: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    subject: &str,
) -> Result<String, String> {
    match violation(client, violations).await {
        Some(v)
            if v.to_ascii_lowercase().contains("permissions violation") && v.contains(subject) =>
        {
            Ok(v)
        }
        Some(v) => Err(format!(
            "want a permissions violation for {subject}, got: {v}"
        )),
        None => Err(format!(
            "no permissions violation for {subject} within {} s",
            NATS_VIOLATION_WAIT.as_secs()
        )),
    }
}
