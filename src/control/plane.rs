//! The reference control plane (`converge control-plane serve`): enrolls nodes with
//! one-time tokens, signs and publishes `<dir>/<node-id>.json|yaml` (sealing plaintext
//! `secrets` values for the node), over NATS JetStream KV or HTTPS long poll, and
//! records what nodes report. Small on purpose: docs/protocol.md is the contract.

use super::artifacts::Catalog;
use super::dryrun::{DryRunRequest, PlanAnswer};
use super::envelope::{Envelope, Rotation};
use super::fleetplan::{NodeResult, PlanQuery, PlanReport, Verdict};
use super::identity::{parse_public_key, parse_sealing_key, read_or_make};
use super::plane_shared::Shared;
use super::plane_store::{NodeRecord, NodeState, PlaneError, PlaneStore, TokenScope};
use super::protocol::{
    sanitize_node_id, EnrollRequest, EnrollResponse, NodeMessage, Shards, SignedRequest, Transport,
    H_NODE, H_NONCE, H_SIGNATURE, H_TIME, MAX_SKEW_SECS,
};
use super::rollout::{Rollout, RolloutSpec};
use crate::document::{self, Format};
use crate::limits::Limits;
use anyhow::Context;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::SigningKey;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{error, info, warn};

/// NATS settings of the control plane.
#[derive(Clone, Debug)]
pub struct NatsOptions {
    /// Where the control plane connects.
    pub url: String,
    /// The URL handed to nodes (default: `url`).
    pub public_url: String,
    /// The plane's own NATS user key (`<data>/nats.key`, see [`nats_key`]).
    pub key: NatsKey,
    /// The authorization file nats-server includes; rewritten on each enrollment.
    pub auth_file: PathBuf,
    /// nats-server's pid files (one per server of a cluster on this host): SIGHUP makes
    /// each reload the authorization file.
    pub pid_files: Vec<PathBuf>,
    /// Replicas of the bucket's stream (3 on a 3-server cluster).
    pub replicas: usize,
    /// The documents bucket's split over streams (see [`shards`]).
    pub shards: Shards,
    /// PEM of the CA that signed the NATS server's certificate (besides public roots).
    pub ca_pem: Option<String>,
    /// `--state nats`: enrollment, status, tokens and rollouts shared through JetStream
    /// KV with the plane's other instances (`control::plane_shared`); SQLite is this
    /// instance's cache.
    pub shared_state: bool,
}

/// `control-plane serve` options.
pub struct ServeOptions {
    pub docs: PathBuf,
    pub data: PathBuf,
    pub listen: SocketAddr,
    /// The URL nodes use for HTTPS documents (default: `http://<listen>`).
    pub public_url: Option<String>,
    pub nats: Option<NatsOptions>,
    pub limits: Limits,
    /// TLS certificate chain and key (PEM): serve HTTPS (rustls) instead of plain HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Enroll over plain HTTP too (a TLS-terminating proxy in front, a trusted network).
    pub insecure_http: bool,
    /// More files to serve as signed artifacts (a pinned Caddy, other releases).
    pub artifacts: Option<PathBuf>,
    /// Serve the fleet page at `/fleet` (`control::fleetpage`).
    pub fleet_page: bool,
}

/// `<data>/control-plane.db`.
pub fn db_path(data: &Path) -> PathBuf {
    data.join("control-plane.db")
}

/// The plane's data directory, created 0700: it holds node credentials and the key.
fn prepare_dir(data: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(data).with_context(|| format!("create {}", data.display()))?;
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", data.display()))
}

/// The control plane's NATS user key: a user nkey of its own, `<data>/nats.key` (0600,
/// made on first use), apart from the signing key (a NATS server picks the nonce the
/// client signs, so the key that signs documents never signs for NATS). The server's
/// authorization file holds only its public half.
#[derive(Clone)]
pub struct NatsKey {
    pub public: String,
    seed: String,
}

impl std::fmt::Debug for NatsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl NatsKey {
    /// Connect options that authenticate with this key.
    fn connect_options(&self) -> async_nats::ConnectOptions {
        async_nats::ConnectOptions::with_nkey(self.seed.clone())
    }
}

/// Reads (or makes) the plane's NATS user key in `data`.
pub fn nats_key(data: &Path) -> anyhow::Result<NatsKey> {
    prepare_dir(data)?;
    let seed = read_or_make(&data.join("nats.key"))?;
    let (public, seed) =
        super::nats::nkey(&SigningKey::from_bytes(&seed)).map_err(|e| anyhow::anyhow!(e))?;
    Ok(NatsKey { public, seed })
}

/// Writes nats-server's authorization file: the plane's nkey user (every permission) and
/// each enrolled node's user (its nkey, or the password an older agent enrolled with),
/// limited to its own subjects. No file written here holds a secret of the plane.
pub fn write_nats_authorization(
    store: &PlaneStore,
    plane: &NatsKey,
    auth_file: &Path,
    shards: Shards,
) -> anyhow::Result<()> {
    use super::nats::{Credential, User};
    let nodes = store.nodes()?;
    let mut users = vec![User {
        user: "control-plane",
        credential: Credential::Nkey(&plane.public),
        permissions: None,
    }];
    for node in &nodes {
        let credential = match (&node.nats_key, &node.nats_password) {
            (Some(k), _) => Credential::Nkey(k),
            (None, Some(pw)) => Credential::Password(pw),
            (None, None) => continue,
        };
        users.push(User {
            user: &node.id,
            credential,
            permissions: Some(super::nats::node_permissions(&node.id, shards)),
        });
    }
    let text = super::nats::render_authorization(&users);
    converge_core::fsutil::write_atomic(auth_file, text.as_bytes(), 0o600)
        .with_context(|| format!("write {}", auth_file.display()))
}

/// How many streams the documents bucket is split over (`serve`'s side): fixed at the
/// plane's first start on NATS in `<data>/nats-shards`, `asked` (`--nats-shards`) or one;
/// a different count asked later is refused (nodes' consumers and permissions name their
/// stream; moving them is not supported).
pub fn shards(data: &Path, asked: Option<u16>) -> anyhow::Result<Shards> {
    let file = data.join("nats-shards");
    match (recorded_shards(data)?, asked) {
        (Some(r), Some(a)) if r != Shards(a) => anyhow::bail!(
            "this plane's documents bucket is split over {} stream(s) (fixed at its first start, {}); --nats-shards {a} would move nodes between streams, which is not supported",
            r.0,
            file.display()
        ),
        (Some(r), _) => Ok(r),
        (None, asked) => {
            let n = asked.unwrap_or(1);
            prepare_dir(data)?;
            converge_core::fsutil::write_atomic(&file, format!("{n}\n").as_bytes(), 0o600)
                .with_context(|| format!("write {}", file.display()))?;
            Ok(Shards(n))
        }
    }
}

/// The split recorded by [`shards`], if the plane ran on NATS (the tools' side).
pub fn recorded_shards(data: &Path) -> anyhow::Result<Option<Shards>> {
    let file = data.join("nats-shards");
    match std::fs::read_to_string(&file) {
        Ok(text) => Ok(Some(Shards(text.trim().parse::<u16>().with_context(
            || format!("{}: not a number of shards", file.display()),
        )?))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", file.display())),
    }
}

/// The plane's signing key and the rotations that lead to it from older keys (attached
/// to every envelope, so a node pinned to an older key can follow them).
#[derive(Clone)]
pub struct Keys {
    pub signing: SigningKey,
    pub rotations: Vec<Rotation>,
}

impl Keys {
    fn key_id(&self) -> String {
        super::identity::key_id(&self.signing.verifying_key())
    }

    /// The JSON envelope of `document` for `node`, signed by the current key, with the
    /// rotations that lead to it.
    fn envelope(
        &self,
        node: &str,
        generation: u64,
        issued_at: &str,
        document: &[u8],
    ) -> anyhow::Result<Vec<u8>> {
        let mut env = Envelope::sign(&self.signing, node, generation, issued_at, document)?;
        env.rotations = self.rotations.clone();
        Ok(serde_json::to_vec(&env)?)
    }
}

/// `<data>/rotations.json`: the rotation statements, oldest first.
fn rotations_path(data: &Path) -> PathBuf {
    data.join("rotations.json")
}

fn read_rotations(data: &Path) -> anyhow::Result<Vec<Rotation>> {
    let path = rotations_path(data);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parse {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// The control plane's keys: the signing key (`<data>/signing.key`, 0600, made on first
/// use) and its rotations. A rotation interrupted after its statement was written is
/// finished here; one interrupted before is dropped (no node can have seen it).
pub fn keys(data: &Path) -> anyhow::Result<Keys> {
    prepare_dir(data)?;
    let rotations = read_rotations(data)?;
    let (current, next) = (data.join("signing.key"), data.join("signing.key.next"));
    if let Some(seed) = super::identity::read_key(&next)? {
        let new_key = B64.encode(SigningKey::from_bytes(&seed).verifying_key().as_bytes());
        if rotations.last().is_some_and(|r| r.new_key == new_key) {
            std::fs::rename(&next, &current).context("finish the key rotation")?;
        } else {
            std::fs::remove_file(&next).context("drop an unfinished key rotation")?;
        }
    }
    let seed = read_or_make(&current)?;
    Ok(Keys {
        signing: SigningKey::from_bytes(&seed),
        rotations,
    })
}

/// Replaces the signing key with a new one and records the rotation statement, signed
/// by the old key. A running plane re-signs every node's document with the new key
/// (same document, same generation) within a second; nodes move their pin on it.
/// Order for crash safety: the new key, then the statement, then the switch.
pub fn rotate_key(data: &Path) -> anyhow::Result<Keys> {
    use rand_core::RngCore;
    let old = keys(data)?;
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    rand_core::OsRng.fill_bytes(seed.as_mut());
    let next = SigningKey::from_bytes(&seed);
    super::identity::write_key(&data.join("signing.key.next"), &seed)?;
    let issued = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut rotations = old.rotations;
    rotations.push(Rotation::sign(&old.signing, &next.verifying_key(), &issued));
    let path = rotations_path(data);
    converge_core::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(&rotations)?, 0o600)
        .with_context(|| format!("write {}", path.display()))?;
    keys(data)
}

/// A new one-time registration token valid for `ttl_secs`, for what `scope` allows.
pub fn new_token(data: &Path, ttl_secs: i64, scope: &TokenScope) -> anyhow::Result<String> {
    use rand_core::RngCore;
    prepare_dir(data)?;
    let mut raw = [0u8; 24];
    rand_core::OsRng.fill_bytes(&mut raw);
    let token = hex::encode(raw);
    PlaneStore::open(&db_path(data))?.add_token(&token, ttl_secs, scope)?;
    Ok(token)
}

/// One node's current envelope.
struct Published {
    file_hash: String,
    /// Key id of the signing key of `bytes`.
    key_id: String,
    sealing_key: String,
    generation: u64,
    bytes: Arc<Vec<u8>>,
    on_nats: bool,
}

struct Plane {
    store: Mutex<PlaneStore>,
    /// The signing key and its rotations; replaced when `rotate-key` ran.
    keys: Mutex<Keys>,
    data: PathBuf,
    docs: PathBuf,
    limits: Limits,
    public_url: String,
    nats: Option<NatsOptions>,
    js: tokio::sync::OnceCell<async_nats::jetstream::Context>,
    /// Signed downloads: the agent binary and `artifacts_dir`.
    catalog: Mutex<Catalog>,
    artifacts_dir: Option<PathBuf>,
    /// Nodes whose NATS consumer is known to exist (made by the plane, never by nodes).
    consumers: Mutex<std::collections::HashSet<String>>,
    published: Mutex<HashMap<String, Published>>,
    /// Bumped whenever an envelope changes; long polls wait on it.
    changed: tokio::sync::watch::Sender<u64>,
    /// Enrollment is served: over TLS, or plain HTTP by the operator's choice. Otherwise
    /// a node would take the signing key from an unauthenticated answer.
    enrollment_open: bool,
    /// Nonces of the signed requests seen within the clock window, with the time each
    /// may be forgotten: a captured request is not accepted a second time.
    nonces: Mutex<Nonces>,
    /// Dry runs under way (`control-plane plan`), by request id.
    plans: Mutex<HashMap<String, PlanWait>>,
    /// Dry-run requests waiting for an HTTPS node's long poll, by node, each with the
    /// time it expires (the node would refuse it then anyway).
    dry_runs: Mutex<HashMap<String, std::collections::VecDeque<QueuedDryRun>>>,
    /// The newest dry run's report, for the fleet page.
    last_plan: Mutex<Option<Arc<PlanReport>>>,
    /// The fleet page's token; `None`: no page.
    page_token: Option<String>,
    /// Held through a rollout step and an abort, so neither crosses the other.
    rollout_step: tokio::sync::Mutex<()>,
    /// `--state nats`: the buckets shared with the plane's other instances, once open.
    shared: tokio::sync::OnceCell<Shared>,
    /// The documents bucket, one store per shard (with shared state, puts are
    /// compare-and-set).
    docs_kv: tokio::sync::OnceCell<Vec<async_nats::jetstream::kv::Store>>,
    /// Shared statuses of nodes whose enrollment has not reached the cache yet.
    early_states: Mutex<HashMap<String, NodeState>>,
    /// Nodes whose status changed here and is not in the shared bucket yet.
    unshared: Mutex<std::collections::HashSet<String>>,
    unshared_added: tokio::sync::Notify,
    /// The shared bucket's revision of each rollout this instance has seen.
    rollout_revisions: Mutex<HashMap<String, u64>>,
    /// Until when this instance holds the rollout driver's lease (unix ms).
    lease_until: AtomicI64,
    /// Changes to the NATS users asked for (an enrollment here or elsewhere), and the
    /// last of them written with its outcome: one file write and reload serves every
    /// change asked for since the one before ([`Plane::flush_users`]).
    users_asked: AtomicU64,
    users_wake: tokio::sync::Notify,
    users_written: tokio::sync::watch::Sender<(u64, Option<String>)>,
    /// This instance's nodes are complete enough to write the users file: always on its
    /// own, with shared state once the nodes bucket's watch caught up (an older cache
    /// would drop the users of nodes enrolled elsewhere, whose connections nats-server
    /// then closes).
    users_ready: AtomicBool,
}

/// One dry run under way: the nodes asked, where their answers go.
struct PlanWait {
    asked: std::collections::HashSet<String>,
    answers: tokio::sync::mpsc::UnboundedSender<PlanAnswer>,
}

/// A dry-run request waiting for a long poll: when it expires (unix seconds), its bytes.
type QueuedDryRun = (i64, Arc<Vec<u8>>);

/// KV puts in flight at once when a scan publishes many envelopes.
const PUBLISH_WINDOW: usize = 256;
/// Consumers made at once when a scan finds nodes without one.
const CONSUMER_WINDOW: usize = 64;
/// How often a dry run's request goes again, over NATS, to the nodes that have not
/// answered: plain NATS is now or never, and a node reconnecting at that moment (its
/// server restarted or left the cluster) would miss it. A node answers a repeat again;
/// the plane keeps one answer per node.
const DRY_RUN_RESEND: Duration = Duration::from_secs(2);

/// Dry-run requests kept per HTTPS node (the oldest are dropped).
const MAX_QUEUED_DRY_RUNS: usize = 4;

/// Request nonces by `node/nonce`, each with the time it may be forgotten.
#[derive(Default)]
struct Nonces {
    seen: HashMap<String, i64>,
    /// When expired entries were last dropped (at most once a second).
    pruned: i64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One document file made ready for `node`: secrets sealed to the node, validated, for
/// this node. Returns its generation and bytes, or what is wrong with it (JSON paths;
/// a file that cannot be read or parsed is one problem at `$`). The plaintext stays in
/// the file on this host.
pub fn seal_document(
    file: &Path,
    node: &NodeRecord,
    limits: &Limits,
) -> Result<(u64, Vec<u8>), converge_core::Problems> {
    let one = |message: String| {
        let mut p = converge_core::Problems::default();
        p.push("$", message);
        p
    };
    let raw = std::fs::read(file).map_err(|e| one(format!("read {}: {e}", file.display())))?;
    let mut value: serde_json::Value = match Format::from_path(file) {
        Format::Yaml => serde_yaml::from_slice(&raw).map_err(|e| one(format!("YAML: {e}")))?,
        Format::Json => serde_json::from_slice(&raw).map_err(|e| one(format!("JSON: {e}")))?,
    };
    if let Some(secrets) = value.get_mut("secrets").and_then(|s| s.as_object_mut()) {
        let to = parse_sealing_key(&node.sealing_key)
            .ok_or_else(|| one(format!("node {} has no valid sealing key", node.id)))?;
        for (name, v) in secrets.iter_mut() {
            let mut at = converge_core::Problems::default();
            let Some(plain) = v.as_str() else {
                at.push(format!("$.secrets.{name}"), "not a string");
                return Err(at);
            };
            let sealed = super::sealed::seal(&to, name, plain.as_bytes())
                .map_err(|e| one(format!("seal {name}: {e}")))?;
            *v = serde_json::Value::String(sealed);
        }
    }
    let bytes = serde_json::to_vec(&value).map_err(|e| one(e.to_string()))?;
    let doc = document::parse_bytes(&bytes, Format::Json, limits)?;
    if doc.node.id != node.id {
        let mut p = converge_core::Problems::default();
        p.push(
            "$.node.id",
            format!("is {:?}, the file is for {:?}", doc.node.id, node.id),
        );
        return Err(p);
    }
    Ok((doc.generation, bytes))
}

/// Builds the envelope for one document file ([`seal_document`]), signed.
pub fn build_envelope(
    keys: &Keys,
    file: &Path,
    node: &NodeRecord,
    limits: &Limits,
) -> anyhow::Result<(u64, Vec<u8>)> {
    let (generation, bytes) = seal_document(file, node, limits).map_err(|p| {
        anyhow::anyhow!(
            "invalid document ({} problems; first: {})",
            p.len(),
            p.0.first().map(|p| p.to_string()).unwrap_or_default()
        )
    })?;
    let issued = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    Ok((
        generation,
        keys.envelope(&node.id, generation, &issued, &bytes)?,
    ))
}

impl Plane {
    /// Writes the NATS users file and has the servers reload it. Through [`Plane::flush_users`]
    /// once serving: a reload per enrollment (66 a second when 2,000 nodes enroll) kept
    /// nats-server's JetStream API from answering.
    fn write_nats_auth(&self) -> anyhow::Result<()> {
        let Some(n) = &self.nats else { return Ok(()) };
        write_nats_authorization(&lock(&self.store), &n.key, &n.auth_file, n.shards)?;
        // A cluster member that is down reads the file when it starts again: one reload
        // is enough for the credentials to be in force.
        let mut failed = Vec::new();
        for pid_file in &n.pid_files {
            let signalled = std::fs::read_to_string(pid_file)
                .with_context(|| format!("read {}", pid_file.display()))
                .and_then(|s| {
                    s.trim()
                        .parse::<i32>()
                        .with_context(|| format!("{}: not a pid", pid_file.display()))
                })
                .and_then(|pid| {
                    // SAFETY: plain syscall on a pid read from nats-server's own pid file.
                    match unsafe { libc::kill(pid, libc::SIGHUP) } {
                        0 => Ok(()),
                        _ => Err(anyhow::anyhow!(
                            "cannot signal nats-server ({pid}) to reload"
                        )),
                    }
                });
            if let Err(e) = signalled {
                warn!(error = %format!("{e:#}"), "a NATS server did not reload its users");
                failed.push(e);
            }
        }
        match failed.pop() {
            Some(e) if failed.len() + 1 == n.pid_files.len() => Err(e),
            _ => Ok(()),
        }
    }

    async fn enroll(&self, req: EnrollRequest) -> Result<EnrollResponse, (StatusCode, String)> {
        if !self.enrollment_open {
            return Err((
                StatusCode::FORBIDDEN,
                "this control plane does not enroll over plain HTTP (serve with --tls-cert/--tls-key, or --insecure-http)".into(),
            ));
        }
        let bad = |m: &str| (StatusCode::BAD_REQUEST, m.to_string());
        if parse_public_key(&req.public_key).is_none() {
            return Err(bad("publicKey is not an Ed25519 public key"));
        }
        if parse_sealing_key(&req.sealing_key).is_none() {
            return Err(bad("sealingKey is not an X25519 public key"));
        }
        let id = sanitize_node_id(&req.name);
        // Over NATS a node authenticates with its nkey (its identity key): no secret is
        // made or stored. An agent too old to send one gets a password as before.
        let nats_key = match (&self.nats, &req.nats_key) {
            (Some(_), Some(k)) => {
                let matches = parse_public_key(&req.public_key)
                    .is_some_and(|pk| super::nats::nkey_matches(k, &pk));
                if !matches {
                    return Err(bad("natsKey is not the user nkey of publicKey"));
                }
                Some(k.clone())
            }
            _ => None,
        };
        let password = match (&self.nats, &nats_key) {
            (Some(_), None) => {
                use rand_core::RngCore;
                let mut raw = [0u8; 24];
                rand_core::OsRng.fill_bytes(&mut raw);
                Some(hex::encode(raw))
            }
            _ => None,
        };
        let record = NodeRecord {
            id: id.clone(),
            name: req.name.clone(),
            public_key: req.public_key.clone(),
            sealing_key: req.sealing_key.clone(),
            facts: serde_json::to_value(&req.facts).unwrap_or_default(),
            enrolled_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            nats_password: password.clone(),
            nats_key,
            last_seen: None,
            accepted_generation: None,
            converged_generation: None,
            status: None,
            refused: None,
        };
        self.enroll_record(&req.token, &record)
            .await
            .map_err(|e| match e {
                PlaneError::Sql(_) | PlaneError::Io(_) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                }
                PlaneError::Shared(_) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                PlaneError::Enrolled { .. } => (StatusCode::CONFLICT, e.to_string()),
                other => (StatusCode::FORBIDDEN, other.to_string()),
            })?;
        // A re-enrolled node has a new sealing key: seal its document again.
        lock(&self.published).remove(&id);
        let users = self.users_changed();
        self.users_in_force(users)
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")))?;
        info!(node = %id, "node enrolled");
        let transport = match &self.nats {
            Some(n) => Transport::Nats {
                url: n.public_url.clone(),
                user: id.clone(),
                password: password.unwrap_or_default(),
            },
            None => Transport::Https {
                url: self.public_url.clone(),
            },
        };
        Ok(EnrollResponse {
            node_id: id,
            signing_key: B64.encode(lock(&self.keys).signing.verifying_key().as_bytes()),
            transport,
        })
    }

    /// Enrolls `record` with `token`: in this instance's store or, with shared state, in
    /// the shared buckets first (a token made on this instance and not copied there yet
    /// is copied now), then into this instance's cache.
    async fn enroll_record(&self, token: &str, record: &NodeRecord) -> Result<(), PlaneError> {
        if !self.shared_state() {
            return lock(&self.store).enroll(token, record);
        }
        // Just started: the buckets open within a second or two once NATS answers.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let shared = loop {
            match self.shared.get() {
                Some(shared) => break shared,
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                None => return Err(PlaneError::Shared("not connected yet".into())),
            }
        };
        self.share_tokens(shared).await;
        // A server that just died fails a request or two until the cluster moved on.
        loop {
            match shared
                .enroll(&super::plane_store::hash(token), record)
                .await
            {
                Err(PlaneError::Shared(e)) if tokio::time::Instant::now() < deadline => {
                    warn!(error = %e, "enrollment: NATS did not answer; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                done => break done?,
            }
        }
        let store = lock(&self.store);
        // This instance's copy of the token (if it was made here) is spent too.
        store.mark_token_used(token, &record.id)?;
        store.put_enrollment(record)
    }

    /// Asks for the NATS users file to be written again; the number to wait for with
    /// [`Plane::users_in_force`].
    fn users_changed(&self) -> u64 {
        let asked = self.users_asked.fetch_add(1, Ordering::SeqCst) + 1;
        self.users_wake.notify_one();
        asked
    }

    /// Waits until the users file holding change `asked` was written and reloaded.
    async fn users_in_force(&self, asked: u64) -> anyhow::Result<()> {
        if self.nats.is_none() {
            return Ok(());
        }
        let mut written = self.users_written.subscribe();
        let done = written.wait_for(|(done, _)| *done >= asked);
        let (_, error) = tokio::time::timeout(Duration::from_secs(30), done)
            .await
            .map_err(|_| anyhow::anyhow!("the NATS users file was not written in 30 s"))??
            .clone();
        error.map_or(Ok(()), |e| Err(anyhow::anyhow!(e)))
    }

    /// Writes the NATS users file for the changes asked so far, a tenth of a second after
    /// the first (so that a burst of enrollments costs one write and one reload), and
    /// again a second after a failure.
    async fn flush_users(self: Arc<Plane>) {
        loop {
            self.users_wake.notified().await;
            if !self.users_ready.load(Ordering::Relaxed) {
                continue; // woken again once ready
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let asked = self.users_asked.load(Ordering::SeqCst);
            let outcome = self.write_nats_auth();
            if let Err(e) = &outcome {
                warn!(error = %format!("{e:#}"), "cannot write the NATS users; retrying");
                let p = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    p.users_wake.notify_one();
                });
            }
            self.users_written
                .send_replace((asked, outcome.err().map(|e| format!("{e:#}"))));
        }
    }

    fn shared_state(&self) -> bool {
        self.nats.as_ref().is_some_and(|n| n.shared_state)
    }

    /// Copies the tokens made on this instance (`control-plane token --data` of this
    /// instance) to the shared bucket, where any instance can spend them.
    async fn share_tokens(&self, shared: &Shared) {
        let tokens = match lock(&self.store).unshared_tokens() {
            Ok(t) => t,
            Err(e) => return warn!(error = %e, "cannot read the tokens"),
        };
        for (hash, expires_at, scope) in tokens {
            match shared.share_token(&hash, expires_at, &scope).await {
                Ok(()) => {
                    if let Err(e) = lock(&self.store).mark_token_shared(&hash) {
                        warn!(error = %e, "cannot mark a token shared");
                    }
                }
                Err(e) => warn!(error = %e, "a token was not shared; retrying"),
            }
        }
    }

    /// The admin socket's `ShareTokens`: how many of this instance's tokens are still
    /// not shared afterwards (none without shared state).
    async fn share_tokens_now(&self) -> anyhow::Result<super::admin::Reply> {
        if let Some(shared) = self.shared.get() {
            self.share_tokens(shared).await;
        }
        let unshared = match self.shared_state() {
            true => lock(&self.store).unshared_tokens()?.len(),
            false => 0,
        };
        Ok(super::admin::Reply::Tokens { unshared })
    }

    /// After `rotate-key`: the new key signs every published document again (same
    /// document bytes, generation and issue time), with the rotation chain attached, so
    /// each node moves its pin without a new generation.
    fn pick_up_rotation(&self) {
        let known = lock(&self.keys).rotations.len();
        match read_rotations(&self.data) {
            Ok(r) if r.len() > known => {}
            Ok(_) => return,
            Err(e) => return warn!(error = %format!("{e:#}"), "cannot read key rotations"),
        }
        let keys = match keys(&self.data) {
            Ok(k) => k,
            Err(e) => return error!(error = %format!("{e:#}"), "cannot load the rotated key"),
        };
        info!(key_id = %keys.key_id(), fingerprint = %super::identity::fingerprint(&keys.signing.verifying_key()), "signing key rotated; signing every document again");
        for (id, p) in lock(&self.published).iter_mut() {
            let Ok(old) = Envelope::parse(&p.bytes) else {
                continue; // a file that did not build: nothing published
            };
            let resigned = B64
                .decode(&old.document)
                .map_err(anyhow::Error::from)
                .and_then(|doc| keys.envelope(id, old.generation, &old.issued_at, &doc));
            match resigned {
                Ok(bytes) => {
                    p.bytes = Arc::new(bytes);
                    p.key_id = keys.key_id();
                    p.on_nats = false;
                }
                Err(e) => warn!(node = %id, error = %format!("{e:#}"), "cannot sign again"),
            }
        }
        *lock(&self.keys) = keys;
        self.changed.send_modify(|n| *n += 1);
    }

    /// Makes the NATS consumer of every node that has none yet (see
    /// `nats::consumer_config`), [`CONSUMER_WINDOW`] at a time: one by one, 10,000 nodes
    /// (a plane restarted on a big fleet) waited minutes for their consumers.
    async fn ensure_consumers(&self, nodes: &[NodeRecord]) {
        use futures::StreamExt;
        let Some(js) = self.js.get() else { return };
        if js.client().connection_state() != async_nats::connection::State::Connected {
            return;
        }
        let missing: Vec<String> = {
            let made = lock(&self.consumers);
            nodes
                .iter()
                .filter(|n| n.nats_key.is_some() || n.nats_password.is_some())
                .filter(|n| !made.contains(&n.id))
                .map(|n| n.id.clone())
                .collect()
        };
        let (Some(docs), Some(n)) = (self.docs_kv.get(), &self.nats) else {
            return;
        };
        if missing.is_empty() {
            return;
        }
        let mut made = futures::stream::iter(missing)
            .map(|id| {
                let stream = &docs[usize::from(n.shards.of(&id))].stream;
                async move {
                    let made = super::nats::make_consumer(stream, &id, n.shards).await;
                    (id, made)
                }
            })
            .buffer_unordered(CONSUMER_WINDOW);
        while let Some((id, made)) = made.next().await {
            match made {
                Ok(()) => {
                    lock(&self.consumers).insert(id);
                }
                Err(e) => {
                    warn!(node = %id, error = %e, "cannot make the node's consumer; retrying")
                }
            }
        }
    }

    /// A (re-)enrolled node starts from the newest document: its old consumer, which may
    /// be past it, is dropped and made again here. A scan may make or find the consumer
    /// meanwhile (the node is visible once enrolled); whatever it did, the consumer left
    /// is one made after the delete.
    async fn reset_consumer(&self, id: &str) {
        let (Some(docs), Some(n)) = (self.docs_kv.get(), &self.nats) else {
            lock(&self.consumers).remove(id);
            return;
        };
        let stream = &docs[usize::from(n.shards.of(id))].stream;
        // Absent (a first enrollment) is fine.
        let _ = stream
            .delete_consumer(&super::nats::consumer_name(id))
            .await;
        match super::nats::make_consumer(stream, id, n.shards).await {
            Ok(()) => {
                lock(&self.consumers).insert(id.to_string());
            }
            Err(e) => {
                warn!(node = %id, error = %e, "cannot make the node's consumer; retrying");
                lock(&self.consumers).remove(id);
            }
        }
    }

    /// Hashes and signs what changed among the artifacts (a stat when nothing did).
    fn refresh_artifacts(&self) {
        let key = lock(&self.keys).signing.clone();
        if let Err(e) = lock(&self.catalog).refresh(&key, self.artifacts_dir.as_deref()) {
            warn!(error = %e, "cannot list the artifacts");
        }
    }

    /// One pass over the documents directory: (re)builds and publishes changed files.
    async fn scan(&self) {
        self.pick_up_rotation();
        self.refresh_artifacts();
        if let Some(shared) = self.shared.get() {
            self.share_tokens(shared).await;
        }
        let nodes = match lock(&self.store).nodes() {
            Ok(n) => n,
            Err(e) => {
                error!(error = %e, "cannot read nodes");
                return;
            }
        };
        self.ensure_consumers(&nodes).await;
        let Ok(dir) = std::fs::read_dir(&self.docs) else {
            return;
        };
        let mut to_publish = Vec::new();
        for entry in dir.flatten() {
            let path = entry.path();
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or_default();
            if !matches!(ext, "json" | "yaml" | "yml") {
                continue;
            }
            let Some(id) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let Some(node) = nodes.iter().find(|n| n.id == id) else {
                continue;
            };
            let Ok(raw) = std::fs::read(&path) else {
                continue;
            };
            let file_hash = hex::encode(Sha256::digest(&raw));
            let current = lock(&self.published).get(id).map(|p| {
                (
                    p.file_hash == file_hash && p.sealing_key == node.sealing_key,
                    p.on_nats,
                )
            });
            let (fresh, on_nats) = current.unwrap_or((false, false));
            if !fresh {
                let keys = lock(&self.keys).clone();
                match build_envelope(&keys, &path, node, &self.limits) {
                    Ok((generation, bytes)) => {
                        // A node that already has this generation (a control-plane
                        // restart re-reads every file) is not sent a re-sealed copy,
                        // which it would report as a replay.
                        let has_it = node.accepted_generation.is_some_and(|a| a >= generation);
                        info!(node = %id, generation, "publishing document");
                        lock(&self.published).insert(
                            id.to_string(),
                            Published {
                                file_hash,
                                key_id: keys.key_id(),
                                sealing_key: node.sealing_key.clone(),
                                generation,
                                bytes: Arc::new(bytes),
                                on_nats: has_it,
                            },
                        );
                        self.changed.send_modify(|n| *n += 1);
                    }
                    Err(e) => {
                        // Remember the bad file so it is not rebuilt every pass.
                        warn!(file = %path.display(), error = %format!("{e:#}"), "document not published");
                        lock(&self.published).insert(
                            id.to_string(),
                            Published {
                                file_hash,
                                key_id: String::new(),
                                sealing_key: node.sealing_key.clone(),
                                generation: 0,
                                bytes: Arc::new(Vec::new()),
                                on_nats: true,
                            },
                        );
                        continue;
                    }
                }
            } else if on_nats {
                continue;
            }
            to_publish.push(id.to_string());
            // Put as they are built: building 2,000 envelopes takes ~0.5 s.
            if to_publish.len() == PUBLISH_WINDOW {
                self.publish_nats(&to_publish).await;
                to_publish.clear();
            }
        }
        self.publish_nats(&to_publish).await;
    }

    /// Puts the current envelopes of `ids` into the bucket, up to [`PUBLISH_WINDOW`]
    /// in flight at once (one at a time, each waiting for the stream's acknowledgement,
    /// one generation for 2,000 nodes took 4.9 s at p99: benches/fleet_plan.sh). Each is
    /// marked as on NATS once acknowledged; the others go again on the next pass.
    async fn publish_nats(&self, ids: &[String]) {
        if self.shared_state() {
            return self.publish_shared(ids).await;
        }
        let (Some(js), Some(n)) = (self.js.get(), &self.nats) else {
            return;
        };
        let shards = n.shards;
        for chunk in ids.chunks(PUBLISH_WINDOW) {
            // While disconnected the client would buffer the messages and send them on
            // reconnect, after newer ones maybe: publish only current files, when connected.
            if js.client().connection_state() != async_nats::connection::State::Connected {
                return;
            }
            let mut acks = Vec::with_capacity(chunk.len());
            for id in chunk {
                let bytes = match lock(&self.published).get(id) {
                    Some(p) if !p.bytes.is_empty() => p.bytes.clone(),
                    _ => continue,
                };
                let subject = shards.key_subject(id);
                match js.publish(subject, bytes.to_vec().into()).await {
                    Ok(ack) => acks.push((id, bytes, ack)),
                    Err(e) => {
                        warn!(node = %id, error = %e, "KV put failed; retrying on the next pass")
                    }
                }
            }
            for (id, bytes, ack) in acks {
                match ack.await {
                    Ok(_) => {
                        // Only the envelope that was put (an enrollment may have dropped it).
                        if let Some(p) = lock(&self.published).get_mut(id) {
                            if Arc::ptr_eq(&p.bytes, &bytes) {
                                p.on_nats = true;
                            }
                        }
                    }
                    Err(e) => {
                        warn!(node = %id, error = %e, "KV put failed; retrying on the next pass")
                    }
                }
            }
        }
    }

    /// [`Plane::publish_nats`] with shared state: each generation is put once across
    /// instances (`plane_shared::publish_once`), and the envelope the bucket holds is the
    /// one this instance serves.
    async fn publish_shared(&self, ids: &[String]) {
        let (Some(docs), Some(n)) = (self.docs_kv.get(), &self.nats) else {
            return;
        };
        let current: Vec<(String, u64, Arc<Vec<u8>>)> = {
            let published = lock(&self.published);
            ids.iter()
                .filter_map(|id| published.get(id).map(|p| (id, p)))
                .filter(|(_, p)| !p.bytes.is_empty())
                .map(|(id, p)| (id.clone(), p.generation, p.bytes.clone()))
                .collect()
        };
        let mut puts = futures::stream::iter(current)
            .map(|(id, generation, bytes)| async move {
                let docs = &docs[usize::from(n.shards.of(&id))];
                let held =
                    super::plane_shared::publish_once(docs, &id, generation, bytes.to_vec().into())
                        .await;
                (id, bytes, held)
            })
            .buffer_unordered(PUBLISH_WINDOW);
        while let Some((id, bytes, held)) = puts.next().await {
            match held {
                Ok(held) => {
                    if let Some(p) = lock(&self.published).get_mut(&id) {
                        if Arc::ptr_eq(&p.bytes, &bytes) {
                            if held[..] != p.bytes[..] {
                                // Another instance's envelope, of this generation or newer.
                                if let Ok(env) = Envelope::parse(&held) {
                                    p.generation = env.generation;
                                    p.key_id = env.key_id;
                                }
                                p.bytes = Arc::new(held.to_vec());
                                self.changed.send_modify(|n| *n += 1);
                            }
                            p.on_nats = true;
                        }
                    }
                }
                Err(e) => {
                    warn!(node = %id, error = %e, "KV put failed; retrying on the next pass")
                }
            }
        }
    }

    fn record(&self, id: &str, msg: NodeMessage) {
        let store = lock(&self.store);
        let res = match &msg {
            NodeMessage::Status(s) => {
                let converged =
                    crate::status::converged_generation(s.accepted_generation, &s.reconcilers);
                store.put_status(
                    id,
                    s.accepted_generation,
                    converged,
                    &serde_json::to_value(&msg).unwrap_or_default(),
                )
            }
            NodeMessage::Refused {
                generation, error, ..
            } => {
                warn!(node = %id, ?generation, %error, "node refused a document");
                store.put_refusal(id, &serde_json::to_value(&msg).unwrap_or_default())
            }
            NodeMessage::Planned(answer) => {
                drop(store);
                // The authenticated sender, whatever the answer says.
                let mut answer = (**answer).clone();
                answer.node_id = id.to_string();
                self.answered(answer);
                return;
            }
        };
        match res {
            Ok(Some(_)) if self.shared_state() => {
                lock(&self.unshared).insert(id.to_string());
                self.unshared_added.notify_one();
            }
            Ok(_) => {}
            Err(e) => error!(node = %id, error = %e, "cannot record status"),
        }
    }

    /// A node's dry-run answer: to this instance's dry run under way that asked the node,
    /// or (another instance's request: with shared state, the queue group may hand an
    /// answer to any instance) forwarded to the instance that asked.
    fn answered(&self, answer: PlanAnswer) {
        if self.deliver_answer(&answer) {
            return;
        }
        let Some(js) = self.js.get().filter(|_| self.shared_state()) else {
            return;
        };
        let client = js.client();
        tokio::spawn(async move {
            let subject = forwarded_subject(&answer.request_id);
            let bytes = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(e) = client.publish(subject, bytes.into()).await {
                warn!(error = %e, "a dry-run answer was not forwarded");
            }
        });
    }

    /// Hands a dry-run answer to this instance's dry run under way that asked the node;
    /// false when no such dry run is under way here.
    fn deliver_answer(&self, answer: &PlanAnswer) -> bool {
        let plans = lock(&self.plans);
        let Some(w) = plans.get(&answer.request_id) else {
            return false;
        };
        if w.asked.contains(&answer.node_id) {
            let _ = w.answers.send(answer.clone());
        }
        true
    }

    /// Writes the statuses recorded here to the shared bucket, as they come: each node's
    /// newest, merged with what other instances wrote. A node whose write fails is tried
    /// again a second later (its newest status then), so an outage loses nothing.
    async fn push_states(&self, shared: &Shared) {
        const WINDOW: usize = 64;
        loop {
            let ids: Vec<String> = std::mem::take(&mut *lock(&self.unshared))
                .into_iter()
                .collect();
            if ids.is_empty() {
                self.unshared_added.notified().await;
                continue;
            }
            let mut writes = futures::stream::iter(ids)
                .map(|id| async move {
                    let state = lock(&self.store).node(&id).ok().flatten();
                    let written = match state {
                        Some(n) => shared.push_state(&id, &NodeState::of(&n)).await,
                        None => Ok(()),
                    };
                    (id, written)
                })
                .buffer_unordered(WINDOW);
            let mut failed = false;
            while let Some((id, written)) = writes.next().await {
                if let Err(e) = written {
                    warn!(node = %id, error = %e, "status not shared; retrying");
                    lock(&self.unshared).insert(id);
                    failed = true;
                }
            }
            if failed {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    /// The next dry-run request queued for an HTTPS node, expired ones dropped.
    fn take_dry_run(&self, id: &str) -> Option<Arc<Vec<u8>>> {
        let mut queues = lock(&self.dry_runs);
        let queue = queues.get_mut(id)?;
        let now = chrono::Utc::now().timestamp();
        let next = std::iter::from_fn(|| queue.pop_front()).find(|(expires, _)| *expires > now);
        if queue.is_empty() {
            queues.remove(id);
        }
        next.map(|(_, bytes)| bytes)
    }

    /// Publishes dry-run requests (node id, bytes) over NATS. Not connected: nothing is
    /// sent (the next send, or no answer, reported as such).
    async fn send_dry_runs(&self, requests: &[(&str, &Arc<Vec<u8>>)]) {
        let Some(c) = self
            .js
            .get()
            .map(|js| js.client())
            .filter(|c| c.connection_state() == async_nats::connection::State::Connected)
        else {
            return;
        };
        for (id, bytes) in requests {
            let subject = super::nats::plan_subject(id);
            if let Err(e) = c.publish(subject, bytes.to_vec().into()).await {
                warn!(node = %id, error = %e, "dry run not sent");
            }
        }
        let _ = c.flush().await;
    }

    /// A fleet-wide dry run (`control-plane plan`): each selected node with a file in
    /// `q.dir` gets its candidate as a signed dry-run request (over NATS or in its next
    /// HTTPS long poll); answers are gathered until every node answered or the timeout.
    async fn plan(&self, q: PlanQuery) -> anyhow::Result<PlanReport> {
        let started = std::time::Instant::now();
        let nodes = lock(&self.store).nodes()?;
        let request_id = super::dryrun::request_id();
        let issued = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let keys = lock(&self.keys).clone();
        let (mut results, mut no_document, mut asked) = (Vec::new(), Vec::new(), Vec::new());
        for node in nodes
            .iter()
            .filter(|n| super::fleetplan::selected(q.nodes.as_deref(), &n.id))
        {
            let Some(file) = super::fleetplan::candidate_file(&q.dir, &node.id) else {
                no_document.push(node.id.clone());
                continue;
            };
            match seal_document(&file, node, &self.limits) {
                Ok((_, bytes)) => {
                    let mut req =
                        DryRunRequest::sign(&keys.signing, &node.id, &request_id, &issued, &bytes)?;
                    req.rotations = keys.rotations.clone();
                    asked.push((node, Arc::new(serde_json::to_vec(&req)?)));
                }
                Err(problems) => {
                    let mut r = NodeResult::bare(&node.id, Verdict::Refused);
                    r.refused_by = Some("plane".into());
                    r.problem_count = problems.len();
                    r.problems = problems
                        .0
                        .into_iter()
                        .take(super::dryrun::MAX_PROBLEMS)
                        .map(|p| super::dryrun::Problem {
                            path: p.path,
                            message: p.message,
                        })
                        .collect();
                    results.push(r);
                }
            }
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        lock(&self.plans).insert(
            request_id.clone(),
            PlanWait {
                asked: asked.iter().map(|(n, _)| n.id.clone()).collect(),
                answers: tx,
            },
        );
        let built = started.elapsed();
        info!(request = %request_id, nodes = asked.len(), "dry run");
        let expires = chrono::Utc::now().timestamp() + MAX_SKEW_SECS;
        let mut queued = false;
        let mut on_nats = Vec::new();
        for (node, bytes) in &asked {
            if self.nats.is_some() && (node.nats_key.is_some() || node.nats_password.is_some()) {
                on_nats.push((node.id.as_str(), bytes));
            } else {
                let mut queues = lock(&self.dry_runs);
                let queue = queues.entry(node.id.clone()).or_default();
                queue.push_back((expires, bytes.clone()));
                while queue.len() > MAX_QUEUED_DRY_RUNS {
                    queue.pop_front();
                }
                queued = true;
            }
        }
        self.send_dry_runs(&on_nats).await;
        if queued {
            self.changed.send_modify(|n| *n += 1);
        }
        let sent = started.elapsed();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(q.timeout_ms);
        let mut answers: HashMap<String, PlanAnswer> = HashMap::new();
        let mut resend =
            tokio::time::interval_at(tokio::time::Instant::now() + DRY_RUN_RESEND, DRY_RUN_RESEND);
        while answers.len() < asked.len() {
            tokio::select! {
                answer = tokio::time::timeout_at(deadline, rx.recv()) => match answer {
                    Ok(Some(a)) => {
                        answers.insert(a.node_id.clone(), a);
                    }
                    _ => break,
                },
                _ = resend.tick() => {
                    on_nats.retain(|(id, _)| !answers.contains_key(*id));
                    if !on_nats.is_empty() {
                        info!(request = %request_id, nodes = on_nats.len(), "dry run sent again to the nodes that have not answered");
                        self.send_dry_runs(&on_nats).await;
                    }
                }
            }
        }
        lock(&self.plans).remove(&request_id);
        // Where the time went: the requests built (sealed, signed), sent, answered.
        info!(
            request = %request_id,
            answered = answers.len(),
            asked = asked.len(),
            build_ms = built.as_millis() as u64,
            send_ms = (sent - built).as_millis() as u64,
            answers_ms = (started.elapsed() - sent).as_millis() as u64,
            "dry run answers gathered"
        );
        // Requests not picked up are of no use any more.
        let mut queues = lock(&self.dry_runs);
        for (node, bytes) in &asked {
            if let Some(queue) = queues.get_mut(&node.id) {
                queue.retain(|(_, b)| !Arc::ptr_eq(b, bytes));
                if queue.is_empty() {
                    queues.remove(&node.id);
                }
            }
        }
        drop(queues);
        for (node, _) in &asked {
            results.push(match answers.remove(&node.id) {
                Some(a) => NodeResult::answered(a),
                None => NodeResult::bare(&node.id, Verdict::NoAnswer),
            });
        }
        let report = PlanReport::new(request_id, results, no_document);
        *lock(&self.last_plan) = Some(Arc::new(report.clone()));
        Ok(report)
    }

    /// Starts a staged rollout of the candidates in `spec.dir` (see `control::rollout`):
    /// each is validated and sealed as a publish would, and must be newer than what its
    /// node accepted; nothing is written until the driver publishes the first wave.
    async fn start_rollout(&self, spec: RolloutSpec) -> anyhow::Result<Rollout> {
        let _step = self.rollout_step.lock().await;
        let r = self.new_rollout(spec)?;
        anyhow::ensure!(self.save_rollout(&r, true).await?, "rollout id taken");
        info!(rollout = %r.id, nodes = r.waves.iter().map(|w| w.nodes.len()).sum::<usize>(), waves = r.waves.len(), "rollout started");
        Ok(r)
    }

    /// The rollout [`Plane::start_rollout`] starts, unsaved.
    fn new_rollout(&self, spec: RolloutSpec) -> anyhow::Result<Rollout> {
        use super::rollout::{DocFile, NodeStep, Outcome, Phase, StartError, Wave};
        let store = lock(&self.store);
        if let Some(r) = store.running_rollout()? {
            return Err(StartError::Busy(r.id).into());
        }
        let (mut steps, mut skipped) = (Vec::new(), Vec::new());
        for node in store
            .nodes()?
            .iter()
            .filter(|n| super::fleetplan::selected(spec.nodes.as_deref(), &n.id))
        {
            let invalid = |problem: String| StartError::Invalid {
                node: node.id.clone(),
                problem,
            };
            let Some(file) = super::fleetplan::candidate_file(&spec.dir, &node.id) else {
                skipped.push(node.id.clone());
                continue;
            };
            let text = std::fs::read_to_string(&file)
                .map_err(|e| invalid(format!("read {}: {e}", file.display())))?;
            let previous = super::rollout::doc_file(&self.docs, &node.id);
            if previous.as_ref().is_some_and(|p| p.text == text) {
                skipped.push(node.id.clone());
                continue;
            }
            let (generation, _) = seal_document(&file, node, &self.limits).map_err(|p| {
                invalid(format!(
                    "{} problem(s); first: {}",
                    p.len(),
                    p.0.first().map(|p| p.to_string()).unwrap_or_default()
                ))
            })?;
            if let Some(a) = node.accepted_generation.filter(|a| *a >= generation) {
                return Err(invalid(format!(
                    "generation {generation} is not newer than the {a} the node accepted"
                ))
                .into());
            }
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            steps.push(NodeStep {
                node_id: node.id.clone(),
                generation,
                candidate: DocFile { name, text },
                previous,
                outcome: Outcome::Pending,
                detail: None,
                at_ms: None,
            });
        }
        if steps.is_empty() {
            return Err(StartError::Empty(spec.dir.clone()).into());
        }
        let ids: Vec<String> = steps.iter().map(|s| s.node_id.clone()).collect();
        let mut by_id: HashMap<String, NodeStep> =
            steps.into_iter().map(|s| (s.node_id.clone(), s)).collect();
        let waves = super::rollout::waves(&ids, spec.canary, spec.batch)
            .into_iter()
            .map(|ids| Wave {
                nodes: ids.iter().filter_map(|id| by_id.remove(id)).collect(),
                started_ms: None,
                ended_ms: None,
            })
            .collect();
        let r = Rollout {
            id: super::rollout::new_id(),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            spec,
            phase: Phase::Running,
            waves,
            message: None,
            skipped,
            ended_ms: None,
        };
        Ok(r)
    }

    /// Saves a rollout: with shared state first to the shared bucket, at the revision
    /// this instance last saw (`fresh`: a new one); false when another instance changed
    /// it first (nothing saved; its change reaches this instance's cache by the watch).
    async fn save_rollout(&self, r: &Rollout, fresh: bool) -> anyhow::Result<bool> {
        if self.shared_state() {
            let shared = self
                .shared
                .get()
                .ok_or_else(|| anyhow::anyhow!("the plane's shared state is not connected yet"))?;
            let revision = match fresh {
                true => None,
                false => lock(&self.rollout_revisions).get(&r.id).copied(),
            };
            match shared.put_rollout(r, revision).await? {
                Some(rev) => {
                    lock(&self.rollout_revisions).insert(r.id.clone(), rev);
                }
                None => return Ok(false),
            }
        }
        lock(&self.store).put_rollout(r)?;
        Ok(true)
    }

    /// Stops a running rollout where it is.
    async fn abort_rollout(&self, id: &str) -> anyhow::Result<Rollout> {
        use super::rollout::Phase;
        let _step = self.rollout_step.lock().await;
        for _ in 0..5 {
            let mut r = lock(&self.store)
                .rollouts(Some(id), 1)?
                .pop()
                .ok_or_else(|| anyhow::anyhow!("no rollout {id:?}"))?;
            if r.phase != Phase::Running {
                return Ok(r);
            }
            let now = chrono::Utc::now().timestamp_millis();
            r.phase = Phase::Aborted;
            r.message = Some("aborted by the operator".into());
            r.ended_ms = Some(now);
            for w in r.waves.iter_mut().filter(|w| w.started_ms.is_some()) {
                w.ended_ms.get_or_insert(now);
            }
            if self.save_rollout(&r, false).await? {
                warn!(rollout = %r.id, "rollout aborted");
                return Ok(r);
            }
            // The driver (another instance) saved a step first: abort that one.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("rollout {id} kept changing; try again")
    }

    /// Whether this instance drives rollouts: always on its own, with shared state while
    /// it holds the lease (with half a second to spare, for a step's writes).
    fn drives_rollouts(&self) -> bool {
        !self.shared_state()
            || self.lease_until.load(Ordering::Relaxed)
                > chrono::Utc::now().timestamp_millis() + 500
    }

    /// One step of the running rollout, if any, saved before the next (an abort waits for
    /// the step, and with shared state a step another instance changed is not saved).
    async fn drive_rollout(&self) {
        if !self.drives_rollouts() {
            return;
        }
        let _step = self.rollout_step.lock().await;
        let mut r = match lock(&self.store).running_rollout() {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => return error!(error = %e, "cannot read the running rollout"),
        };
        // With shared state, only a rollout as the bucket has it: a cache left by an
        // earlier run of this instance may be steps behind until the watch brings it.
        if self.shared_state() && !lock(&self.rollout_revisions).contains_key(&r.id) {
            return;
        }
        let driver = super::rollout::Driver {
            docs: &self.docs,
            now_ms: chrono::Utc::now().timestamp_millis(),
        };
        let before: Vec<_> = r.waves.iter().map(|w| (w.started_ms, w.ended_ms)).collect();
        let stepped = driver.advance(&mut r, |id| lock(&self.store).node(id).ok().flatten());
        match stepped {
            Ok(false) => return,
            Ok(true) => {
                for (i, w) in r.waves.iter().enumerate() {
                    if before.get(i) != Some(&(w.started_ms, w.ended_ms)) {
                        info!(rollout = %r.id, "{}", r.wave_line(i));
                    }
                }
                if r.phase.is_done() {
                    let m = r.message.as_deref().unwrap_or_default();
                    info!(rollout = %r.id, phase = ?r.phase, message = m, "rollout ended");
                }
            }
            Err(e) => {
                // Nothing more can be published: stop rather than retry every step.
                error!(rollout = %r.id, error = %e, "cannot write the documents directory; rollout halted");
                r.phase = super::rollout::Phase::Halted;
                r.message = Some(format!("cannot write the documents directory: {e}"));
                r.ended_ms = Some(driver.now_ms);
            }
        }
        match self.save_rollout(&r, false).await {
            Ok(true) => {}
            Ok(false) => {
                warn!(rollout = %r.id, "the rollout changed elsewhere (aborted?); step not saved")
            }
            Err(e) => error!(rollout = %r.id, error = %format!("{e:#}"), "cannot save the rollout"),
        }
    }

    /// Checks a node's request signature; returns the node.
    fn authenticate(
        &self,
        id: &str,
        method: &str,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<NodeRecord, (StatusCode, String)> {
        let h = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        };
        let denied = || {
            (
                StatusCode::UNAUTHORIZED,
                "bad request signature".to_string(),
            )
        };
        if h(H_NODE) != id {
            return Err(denied());
        }
        let node = lock(&self.store)
            .node(id)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .ok_or_else(denied)?;
        let key = parse_public_key(&node.public_key).ok_or_else(denied)?;
        let time: i64 = h(H_TIME).parse().map_err(|_| denied())?;
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let now = chrono::Utc::now().timestamp();
        let req = SignedRequest {
            method,
            path_and_query: path,
            time,
            nonce: h(H_NONCE),
            body,
        };
        if !req.verify(&key, h(H_SIGNATURE), now) {
            return Err(denied());
        }
        // Checked after the signature, so only the node itself can fill its entries.
        let mut nonces = lock(&self.nonces);
        if nonces.pruned != now {
            nonces.pruned = now;
            nonces.seen.retain(|_, forget_at| *forget_at > now);
        }
        if nonces
            .seen
            .insert(format!("{id}/{}", req.nonce), time + 2 * MAX_SKEW_SECS)
            .is_some()
        {
            warn!(node = %id, "a signed request was replayed");
            return Err((
                StatusCode::UNAUTHORIZED,
                "replayed request (its nonce was used already)".to_string(),
            ));
        }
        Ok(node)
    }
}

fn err(code: StatusCode, msg: String) -> Response {
    (code, Json(serde_json::json!({ "error": msg }))).into_response()
}

async fn enroll(State(plane): State<Arc<Plane>>, Json(req): Json<EnrollRequest>) -> Response {
    match plane.enroll(req).await {
        Ok(r) => {
            plane.reset_consumer(&r.node_id).await;
            Json(r).into_response()
        }
        Err((code, msg)) => {
            warn!(%msg, "enrollment refused");
            err(code, msg)
        }
    }
}

#[derive(serde::Deserialize)]
struct After {
    #[serde(default)]
    after: u64,
    /// Key id the node trusts: a document signed by another (newer) key is sent even
    /// at the node's generation, so the node follows a rotation.
    key: Option<String>,
}

async fn document(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<After>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Err((c, m)) = plane.authenticate(&id, "GET", &uri, &headers, b"") {
        return err(c, m);
    }
    let mut changed = plane.changed.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(super::https::POLL_SECS);
    loop {
        // A dry run waiting for this node goes first; it never moves the node's cursor.
        if let Some(bytes) = plane.take_dry_run(&id) {
            return (
                [
                    ("content-type", "application/json"),
                    (super::dryrun::H_KIND, super::dryrun::KIND),
                ],
                bytes.to_vec(),
            )
                .into_response();
        }
        let ready = lock(&plane.published)
            .get(&id)
            .filter(|p| {
                let rotated = q.key.as_ref().is_some_and(|k| *k != p.key_id);
                (p.generation > q.after || rotated) && !p.bytes.is_empty()
            })
            .map(|p| p.bytes.clone());
        if let Some(bytes) = ready {
            return ([("content-type", "application/json")], bytes.to_vec()).into_response();
        }
        match tokio::time::timeout_at(deadline, changed.changed()).await {
            Ok(Ok(())) => continue,
            _ => return StatusCode::NO_CONTENT.into_response(),
        }
    }
}

async fn script(text: &'static str) -> Response {
    ([("content-type", "text/x-shellscript")], text).into_response()
}

/// `GET /v1/artifacts`: what can be downloaded, signed (`.txt`: for shell scripts).
async fn artifacts(State(plane): State<Arc<Plane>>, uri: Uri) -> Response {
    let key = lock(&plane.keys).signing.verifying_key();
    let index = lock(&plane.catalog).index(&key);
    if uri.path().ends_with(".txt") {
        return ([("content-type", "text/plain")], index.to_text()).into_response();
    }
    Json(index).into_response()
}

/// `GET /units/<name>`: the systemd units of this release.
async fn unit(UrlPath(name): UrlPath<String>) -> Response {
    match super::artifacts::UNITS.iter().find(|(n, _)| *n == name) {
        Some((_, text)) => ([("content-type", "text/plain")], *text).into_response(),
        None => err(StatusCode::NOT_FOUND, format!("no unit {name:?}")),
    }
}

/// `GET /v1/artifacts/<name>`: the file, streamed.
async fn artifact(State(plane): State<Arc<Plane>>, UrlPath(name): UrlPath<String>) -> Response {
    let Some(path) = lock(&plane.catalog).path(&name) else {
        return err(StatusCode::NOT_FOUND, format!("no artifact {name:?}"));
    };
    match tokio::fs::File::open(&path).await {
        Ok(f) => (
            [("content-type", "application/octet-stream")],
            axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(f)),
        )
            .into_response(),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, format!("{name}: {e}")),
    }
}

#[derive(serde::Deserialize)]
struct PageQuery {
    token: Option<String>,
}

/// `GET /fleet`: the fleet page, to the holder of its token (404 when not enabled).
async fn fleet_page(
    State(plane): State<Arc<Plane>>,
    axum::extract::Query(q): axum::extract::Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    use super::fleetpage::{access, render, Access, COOKIE};
    let Some(token) = &plane.page_token else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let cookie = headers
        .get(axum::http::header::COOKIE)
        .and_then(|v| v.to_str().ok());
    let how = access(q.token.as_deref(), cookie, token);
    if how == Access::Denied {
        return err(
            StatusCode::UNAUTHORIZED,
            "open /fleet?token=… with the token in <data>/fleet-page.token".into(),
        );
    }
    let (nodes, rollout) = {
        let store = lock(&plane.store);
        (
            store.nodes().unwrap_or_default(),
            store.rollouts(None, 1).ok().and_then(|mut r| r.pop()),
        )
    };
    let plan = lock(&plane.last_plan).clone();
    let page = render(
        &nodes,
        rollout.as_ref(),
        plan.as_deref(),
        chrono::Utc::now(),
    );
    let mut resp = axum::response::Html(page).into_response();
    let h = resp.headers_mut();
    h.insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    h.insert(
        "content-security-policy",
        axum::http::HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    if how == Access::Query {
        // Secure only over HTTPS: a plain-HTTP plane behind a terminating proxy still works.
        let secure = if plane.public_url.starts_with("https:") {
            "; Secure"
        } else {
            ""
        };
        let value = format!("{COOKIE}={token}; Path=/fleet; HttpOnly; SameSite=Strict{secure}");
        if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
            h.insert(axum::http::header::SET_COOKIE, v);
        }
    }
    resp
}

/// A signed no-op: the node knows its TLS session is up and the plane accepts it.
async fn hello(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    match plane.authenticate(&id, "GET", &uri, &headers, b"") {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err((c, m)) => err(c, m),
    }
}

async fn status(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err((c, m)) = plane.authenticate(&id, "POST", &uri, &headers, &body) {
        return err(c, m);
    }
    match serde_json::from_slice::<NodeMessage>(&body) {
        Ok(msg) => {
            plane.record(&id, msg);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => err(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// Connects to NATS as the control plane, makes the bucket, records status messages.
async fn run_nats(plane: Arc<Plane>, n: NatsOptions) -> anyhow::Result<()> {
    // After a reconnect every node's consumer is looked for again: one held in memory
    // by a standalone server that restarted is gone (`nats::consumer_config`).
    let p = plane.clone();
    let client = super::nats::with_tls(n.key.connect_options(), &n.url, n.ca_pem.as_deref())
        .map_err(|e| anyhow::anyhow!(e))?
        .event_callback(move |event| {
            let p = p.clone();
            async move {
                if matches!(event, async_nats::Event::Connected) {
                    lock(&p.consumers).clear();
                }
            }
        })
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|n| super::transport::backoff_capped(n, Duration::from_secs(2)))
        .connect(super::nats::servers(&n.url).as_slice())
        .await
        .with_context(|| format!("connect {}", n.url))?;
    let js = async_nats::jetstream::new(client.clone());
    let mut docs = Vec::new();
    for k in n.shards.all() {
        let bucket = n.shards.bucket(k);
        docs.push(loop {
            match super::plane_shared::bucket(&js, &bucket, n.replicas, true).await {
                Ok(store) => break store,
                Err(e) => {
                    warn!(%bucket, error = %e, "cannot open the KV bucket's stream; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
    }
    let _ = plane.docs_kv.set(docs);
    if n.shared_state {
        let shared = loop {
            match Shared::open(&js, n.replicas, instance_name()).await {
                Ok(s) => break s,
                Err(e) => {
                    warn!(error = %e, "cannot open the shared state's buckets; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        info!(instance = %shared.instance, "plane state shared on NATS");
        let _ = plane.shared.set(shared);
        follow_shared(&plane);
    }
    let _ = plane.js.set(js);
    // Dry-run answers another instance received for this one's requests.
    let mut forwarded = client.subscribe(forwarded_subject("*")).await?;
    let p = plane.clone();
    tokio::spawn(async move {
        while let Some(m) = forwarded.next().await {
            // Never forwarded again: the instance that asked is subscribed, or gone.
            match serde_json::from_slice::<PlanAnswer>(&m.payload) {
                Ok(answer) => {
                    p.deliver_answer(&answer);
                }
                Err(e) => warn!(error = %e, "bad forwarded dry-run answer"),
            }
        }
    });
    // Everything not yet on NATS goes out on the next scan. Status is handled once, by
    // one instance of the plane (a queue group).
    let mut sub = client
        .queue_subscribe("converge.status.*", "converge-plane".into())
        .await?;
    info!(url = %n.url, "control plane on NATS");
    while let Some(m) = sub.next().await {
        let id = m
            .subject
            .as_str()
            .trim_start_matches("converge.status.")
            .to_string();
        match serde_json::from_slice::<NodeMessage>(&m.payload) {
            Ok(msg) => plane.record(&id, msg),
            Err(e) => warn!(node = %id, error = %e, "bad status message"),
        }
    }
    Ok(())
}

/// Where an instance forwards a dry-run answer to the instance that asked (plane users
/// only: a node may publish on its own subjects alone).
fn forwarded_subject(request_id: &str) -> String {
    format!("converge.plane.plan.{request_id}")
}

/// This instance's name in the lease: host name and process id.
fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// With shared state: the watches that bring the other instances' writes into this
/// instance's cache, the status writer, and the rollout driver's lease.
fn follow_shared(plane: &Arc<Plane>) {
    use super::plane_shared::follow;
    let Some(shared) = plane.shared.get() else {
        return;
    };
    let p = plane.clone();
    let nodes = shared.nodes.clone();
    let caught_up = move |p: &Plane| {
        if !p.users_ready.swap(true, Ordering::Relaxed) {
            p.users_changed();
        }
    };
    let follow_nodes = follow(shared.nodes.clone(), move |id, _, value, current| {
        if current {
            caught_up(&p);
        }
        let Some(record) = super::plane_shared::enrollment(value) else {
            return warn!(node = %id, "bad shared enrollment record");
        };
        let known = lock(&p.store).node(id).ok().flatten();
        if known
            .as_ref()
            .is_some_and(|k| k.public_key == record.public_key)
        {
            return;
        }
        if let Err(e) = lock(&p.store).put_enrollment(&record) {
            return error!(node = %id, error = %e, "cannot cache an enrollment");
        }
        // A status that came before the enrollment.
        if let Some(state) = lock(&p.early_states).remove(id) {
            if let Err(e) = lock(&p.store).merge_state(id, state) {
                error!(node = %id, error = %e, "cannot cache a status");
            }
        }
        // Enrolled (again) elsewhere: new keys, so a new envelope and consumer.
        lock(&p.published).remove(id);
        lock(&p.consumers).remove(id);
        p.users_changed();
    });
    let p = plane.clone();
    tokio::spawn(async move {
        // An empty bucket has no entry to say the watch caught up.
        loop {
            match nodes.status().await {
                Ok(s) if s.values() == 0 => break caught_up(&p),
                Ok(_) => break,
                Err(e) => warn!(error = %e, "cannot read the shared nodes bucket; retrying"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        follow_nodes.await
    });
    let p = plane.clone();
    tokio::spawn(follow(shared.status.clone(), move |id, _, value, _| {
        match serde_json::from_slice::<NodeState>(value) {
            Ok(state) => match lock(&p.store).merge_state(id, state.clone()) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    // Its enrollment has not reached this cache yet.
                    lock(&p.early_states).insert(id.to_string(), state);
                }
                Err(e) => error!(node = %id, error = %e, "cannot cache a status"),
            },
            Err(e) => warn!(node = %id, error = %e, "bad shared status"),
        }
    }));
    let p = plane.clone();
    tokio::spawn(follow(
        shared.rollouts.clone(),
        move |id, revision, value, _| {
            if lock(&p.rollout_revisions)
                .get(id)
                .is_some_and(|known| *known >= revision)
            {
                return;
            }
            match serde_json::from_slice::<Rollout>(value) {
                Ok(r) => {
                    if let Err(e) = lock(&p.store).put_rollout(&r) {
                        return error!(rollout = %id, error = %e, "cannot cache a rollout");
                    }
                    lock(&p.rollout_revisions).insert(id.to_string(), revision);
                }
                Err(e) => warn!(rollout = %id, error = %e, "bad shared rollout"),
            }
        },
    ));
    let p = plane.clone();
    tokio::spawn(async move {
        if let Some(shared) = p.shared.get() {
            p.push_states(shared).await;
        }
    });
    let p = plane.clone();
    tokio::spawn(async move {
        let Some(shared) = p.shared.get() else { return };
        loop {
            let now = chrono::Utc::now().timestamp_millis();
            match shared.lease(now).await {
                Ok(Some(until)) => {
                    if p.lease_until.swap(until, Ordering::Relaxed) < now {
                        info!(instance = %shared.instance, "this instance drives rollouts");
                    }
                }
                Ok(None) => p.lease_until.store(0, Ordering::Relaxed),
                Err(e) => warn!(error = %e, "cannot renew the rollout driver's lease"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// Runs the control plane until SIGTERM/SIGINT.
pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let keys = keys(&opts.data)?;
    let key = keys.signing.verifying_key();
    let store = PlaneStore::open(&db_path(&opts.data))?;
    let (changed, _) = tokio::sync::watch::channel(0);
    let plane = Arc::new(Plane {
        store: Mutex::new(store),
        keys: Mutex::new(keys),
        data: opts.data.clone(),
        docs: opts.docs.clone(),
        limits: opts.limits,
        public_url: opts.public_url.clone().unwrap_or_else(|| {
            let scheme = if opts.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{}", opts.listen)
        }),
        nats: opts.nats.clone(),
        js: tokio::sync::OnceCell::new(),
        consumers: Mutex::new(std::collections::HashSet::new()),
        catalog: Mutex::new(Catalog::default()),
        artifacts_dir: opts.artifacts.clone(),
        published: Mutex::new(HashMap::new()),
        changed,
        enrollment_open: opts.tls.is_some() || opts.insecure_http,
        nonces: Mutex::new(Nonces::default()),
        plans: Mutex::new(HashMap::new()),
        dry_runs: Mutex::new(HashMap::new()),
        last_plan: Mutex::new(None),
        page_token: match opts.fleet_page {
            true => Some(super::fleetpage::token(&opts.data)?),
            false => None,
        },
        rollout_step: tokio::sync::Mutex::new(()),
        shared: tokio::sync::OnceCell::new(),
        docs_kv: tokio::sync::OnceCell::new(),
        early_states: Mutex::new(HashMap::new()),
        unshared: Mutex::new(std::collections::HashSet::new()),
        unshared_added: tokio::sync::Notify::new(),
        rollout_revisions: Mutex::new(HashMap::new()),
        lease_until: AtomicI64::new(0),
        users_asked: AtomicU64::new(0),
        users_wake: tokio::sync::Notify::new(),
        users_written: tokio::sync::watch::channel((0, None)).0,
        users_ready: AtomicBool::new(!opts.nats.as_ref().is_some_and(|n| n.shared_state)),
    });
    let plane_url = plane.public_url.clone();
    if let Some(n) = opts.nats.clone() {
        if plane.users_ready.load(Ordering::Relaxed) {
            plane.write_nats_auth()?;
        }
        tokio::spawn(plane.clone().flush_users());
        let p = plane.clone();
        tokio::spawn(async move {
            if let Err(e) = run_nats(p, n).await {
                error!(error = %format!("{e:#}"), "NATS side stopped");
            }
        });
    }
    plane.refresh_artifacts();
    let scanner = plane.clone();
    tokio::spawn(async move {
        loop {
            scanner.scan().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let roller = plane.clone();
    tokio::spawn(async move {
        loop {
            roller.drive_rollout().await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let admin = super::admin::socket(&opts.data);
    let _ = std::fs::remove_file(&admin);
    let listener = tokio::net::UnixListener::bind(&admin)
        .with_context(|| format!("bind {}", admin.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&admin, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod {}", admin.display()))?;
    }
    tokio::spawn(serve_admin(plane.clone(), listener));
    let app = axum::Router::new()
        .route("/v1/enroll", axum::routing::post(enroll))
        .route("/v1/nodes/{id}/document", axum::routing::get(document))
        .route("/v1/nodes/{id}/status", axum::routing::post(status))
        .route("/v1/nodes/{id}/hello", axum::routing::get(hello))
        .route(
            "/setup.sh",
            axum::routing::get(|| script(super::artifacts::SETUP_SH)),
        )
        .route(
            "/update.sh",
            axum::routing::get(|| script(super::artifacts::UPDATE_SH)),
        )
        .route("/units/{name}", axum::routing::get(unit))
        .route("/v1/artifacts", axum::routing::get(artifacts))
        .route("/v1/artifacts.txt", axum::routing::get(artifacts))
        .route("/v1/artifacts/{name}", axum::routing::get(artifact))
        .route("/fleet", axum::routing::get(fleet_page))
        .with_state(plane);
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("listen on {}", opts.listen))?;
    let fingerprint = super::identity::fingerprint(&key);
    info!(listen = %opts.listen, key_id = %super::identity::key_id(&key), %fingerprint, "control plane serving");
    // On stdout too: what operators hand to `converge join --plane-key` (a closed
    // stdout must not stop the plane).
    let _ = writeln!(std::io::stdout(), "control plane signing key {fingerprint}");
    if opts.fleet_page {
        let file = opts.data.join("fleet-page.token");
        info!(url = %format!("{}/fleet", plane_url), token_file = %file.display(), "fleet page served (open it once with ?token=)");
    }
    if opts.tls.is_none() && !opts.insecure_http {
        warn!("plain HTTP without --insecure-http: enrollment is refused (nodes would trust an unauthenticated key)");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    if let Some((cert, key)) = &opts.tls {
        let acceptor = tls_acceptor(cert, key)?;
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => {
                        tokio::spawn(serve_tls(acceptor.clone(), tcp, app.clone()));
                    }
                    Err(e) => warn!(error = %e, "accept failed"),
                },
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        return Ok(());
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}

/// The admin socket ([`super::admin`]): one request line per connection, one answer.
async fn serve_admin(plane: Arc<Plane>, listener: tokio::net::UnixListener) {
    use super::admin::{Answer, Reply, Request};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "admin socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let plane = plane.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let limit = super::admin::MAX_REQUEST as u64;
            let answer = match tokio::io::BufReader::new(read.take(limit))
                .read_line(&mut line)
                .await
            {
                Err(e) => Err(anyhow::anyhow!("read: {e}")),
                Ok(_) => match serde_json::from_str::<Request>(&line) {
                    Ok(Request::Plan(q)) => plane.plan(q).await.map(Reply::Plan),
                    Ok(Request::Rollout(spec)) => plane
                        .start_rollout(spec)
                        .await
                        .map(|r| Reply::Rollouts(vec![r])),
                    Ok(Request::Rollouts { id }) => lock(&plane.store)
                        .rollouts(id.as_deref(), 50)
                        .map(Reply::Rollouts)
                        .map_err(anyhow::Error::from),
                    Ok(Request::Abort { id }) => plane
                        .abort_rollout(&id)
                        .await
                        .map(|r| Reply::Rollouts(vec![r])),
                    Ok(Request::ShareTokens) => plane.share_tokens_now().await,
                    Err(e) => Err(anyhow::anyhow!("bad request: {e}")),
                },
            };
            let mut out = serde_json::to_vec(&Answer::from(answer)).unwrap_or_default();
            out.push(b'\n');
            let _ = write.write_all(&out).await;
        });
    }
}

/// A rustls server configuration from PEM files (ring provider, TLS 1.2 and 1.3).
fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("read the TLS key {}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("TLS certificate and key")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// One HTTPS connection: handshake (bounded), then HTTP/1.1 with keep-alive.
async fn serve_tls(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    app: axum::Router,
) {
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let service = hyper_util::service::TowerToHyperService::new(app);
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(error = %e, "HTTPS connection ended");
    }
}

/// Puts raw envelope bytes under a node's key (an operator tool: publish an envelope
/// signed elsewhere; the tests use it to offer forged and replayed envelopes).
pub async fn put(
    url: &str,
    key: &NatsKey,
    ca_pem: Option<&str>,
    shards: Shards,
    node: &str,
    bytes: Vec<u8>,
) -> anyhow::Result<()> {
    let client = super::nats::with_tls(key.connect_options(), url, ca_pem)
        .map_err(|e| anyhow::anyhow!(e))?
        .connect(super::nats::servers(url).as_slice())
        .await
        .with_context(|| format!("connect {url}"))?;
    let js = async_nats::jetstream::new(client.clone());
    // A JetStream publish to the key's subject, acknowledged by the stream.
    js.publish(shards.key_subject(node), bytes.into())
        .await
        .context("put")?
        .await
        .context("put")?;
    client.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shard_count_is_fixed_at_the_first_start() {
        let dir = tempfile::tempdir().unwrap();
        let (one, eight) = (dir.path().join("one"), dir.path().join("eight"));
        // A plane that first ran without the flag has one stream, recorded.
        assert_eq!(recorded_shards(&one).unwrap(), None);
        assert_eq!(shards(&one, None).unwrap(), Shards::ONE);
        assert_eq!(recorded_shards(&one).unwrap(), Some(Shards::ONE));
        let e = shards(&one, Some(8)).unwrap_err().to_string();
        assert!(e.contains("split over 1 stream(s)"), "{e}");
        // Later starts keep the first count, with or without the flag.
        assert_eq!(shards(&eight, Some(8)).unwrap(), Shards(8));
        assert_eq!(shards(&eight, None).unwrap(), Shards(8));
        assert_eq!(shards(&eight, Some(8)).unwrap(), Shards(8));
        assert!(shards(&eight, Some(4)).is_err());
    }
}
