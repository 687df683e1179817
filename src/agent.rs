//! The daemon (`converge agent`): stores accepted documents, runs the engine, persists
//! status, serves the unix socket (`push`, `status`, `events`, `metadatainspect`; 0600,
//! or 0660 with `--socket-group`), runs the control-plane client when the node is
//! enrolled, and tells systemd when it is ready.
//!
//! Socket protocol, one request per connection: the client sends a header line (a JSON
//! [`Request`] ending in `\n`, at most 64 KiB); a `push` header is followed by the
//! document's raw bytes up to the end of the stream (the client shuts down its write
//! side). The agent reads at most `--max-document-bytes` + 1 of them, answers with one
//! JSON [`Response`] and closes.

use crate::control::dryrun::{DryRunError, DryRunRequest, PlanAnswer};
use crate::control::envelope::{Envelope, EnvelopeError, Pin};
use crate::control::identity::Identity;
use crate::control::protocol::{ControlConfig, StatusMessage};
use crate::control::sealed;
use crate::control::transport::{Accepted, ControlState};
use crate::document::{self, Document, Format, Mode};
use crate::engine::{Engine, EngineConfig, PassResult, Report};
use crate::limits::{self, Limits};
use crate::privacy::{Access, SocketAccess};
use crate::status::ReconcilerStatus;
use crate::store::{Store, StoreError};
use anyhow::Context;
use converge_core::{Problems, SecretSource};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

/// Longest request header line on the socket.
const MAX_HEADER: u64 = 64 << 10;
/// After refusing an oversized document the agent reads (and drops) what the client
/// still sends, at most this much for this long, so that the client gets to read the
/// answer instead of a broken pipe.
const DRAIN_BYTES: u64 = 1 << 30;
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// The header line of a request on the agent socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// The document follows the header, raw (JSON, or YAML if `yaml`).
    Push {
        yaml: bool,
    },
    Status,
    /// Admin: one metadata project as stored (entries included). Only on this socket,
    /// never on the metadata API's TCP listeners.
    MetadataInspect {
        project: String,
    },
    /// The event journal: the newest `limit` events, or (with `after`) up to `limit`
    /// events after that id, oldest first (`converge events [--follow]`).
    Events {
        #[serde(default)]
        after: Option<i64>,
        limit: u32,
    },
}

impl Request {
    fn access(&self) -> Access {
        match self {
            Request::Push { .. } | Request::Status | Request::Events { .. } => Access::Operate,
            Request::MetadataInspect { .. } => Access::Inspect,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Request::Push { .. } => "push",
            Request::Status => "read the status",
            Request::MetadataInspect { .. } => "inspect metadata",
            Request::Events { .. } => "read the events",
        }
    }
}

/// The agent's answer.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Problems::is_empty")]
    pub problems: Problems,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<ReconcilerStatus>,
    /// The answer to `MetadataInspect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    /// The control-plane connection, with `Status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<crate::control::transport::ControlState>,
    /// What an operator should look at (an old document in force), with `Status`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The running agent itself, with `Status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentInfo>,
    /// The answer to `Events`, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<crate::store::Event>,
}

/// The running agent, as `converge status` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    /// Release and build (`converge --version`).
    pub version: String,
    pub pid: u32,
    /// When this agent process started (RFC 3339).
    pub started_at: String,
    /// Every reconciler finished its first pass since this agent started (systemd got
    /// READY=1).
    pub ready: bool,
    /// Reconcilers still in their first pass.
    pub first_passes_pending: usize,
}

impl Response {
    fn error(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            ..Default::default()
        }
    }
}

/// Paths inside the data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("converge.sock")
}

pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("state.db")
}

/// Agent settings from the command line.
pub struct AgentOptions {
    pub data_dir: PathBuf,
    pub host: crate::registry::HostOptions,
    /// Documents for another node id are refused.
    pub node_id: String,
    pub proxy: bool,
    pub engine: EngineConfig,
    /// Input limits for pushed documents.
    pub limits: Limits,
    /// Who may use the agent socket besides root.
    pub socket: SocketAccess,
    /// A document in force issued longer ago than this is reported in status (a node
    /// cut off from its control plane, a plane that stopped publishing); zero: never.
    pub max_document_age: Duration,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (`--metrics-listen`).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

pub(crate) struct Shared {
    store: Mutex<Store>,
    engine: Engine,
    mode: Mode,
    node_id: String,
    limits: Limits,
    /// Opens the document's sealed secrets (the node's sealing key).
    sealing: crypto_box::SecretKey,
    /// The reconcilers' secret source: updated when a document is accepted.
    secrets: SecretSource,
    /// Notified when a reconciler's status is saved (the control client reports it).
    status_changed: Arc<tokio::sync::Notify>,
    data_dir: PathBuf,
    host: crate::registry::HostOptions,
    /// The control plane's signing key pinned at enrollment, moved on by its rotations
    /// (`None`: not enrolled).
    pinned: Option<Pin>,
    /// Status is sent at least this often while connected.
    heartbeat: Duration,
    socket: SocketAccess,
    max_document_age: Duration,
    /// systemd notifications (READY, STATUS, WATCHDOG).
    notifier: Arc<crate::notify::Notifier>,
    started_at: chrono::DateTime<chrono::Utc>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions),
        // nor a key half-written (a plain copy).
        Err(p) => p.into_inner(),
    }
}

impl Shared {
    /// Pins `to`, reached from the pinned key by the plane's signed rotation statements:
    /// from now on only `to` (or its own successors) is trusted. `control.json` is
    /// rewritten so a restart keeps it; if that fails the next envelope's chain moves the
    /// pin again.
    fn follow_rotation(&self, pin: &Pin, to: ed25519_dalek::VerifyingKey) {
        let from = std::mem::replace(&mut *lock(pin), to);
        let (from_id, to_id) = (
            crate::control::identity::key_id(&from),
            crate::control::identity::key_id(&to),
        );
        info!(from = %from_id, to = %to_id, "control-plane signing key rotated; the old key is refused from now on");
        let saved = ControlConfig::load(&self.data_dir).and_then(|c| {
            let mut c = c.ok_or_else(|| anyhow::anyhow!("control.json is gone"))?;
            c.signing_key =
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, to.as_bytes());
            c.save(&self.data_dir)
        });
        if let Err(e) = saved {
            warn!(error = %format!("{e:#}"), "cannot record the rotated control-plane key");
        }
        let entry = (
            "control-plane".to_string(),
            format!("signing key rotated: {from_id} -> {to_id}"),
        );
        if let Err(e) = lock(&self.store).journal("control", &[entry]) {
            warn!(error = %e, "cannot journal the key rotation");
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    let started = std::time::SystemTime::now();
    crate::privacy::prepare_data_dir(&opts.data_dir)?;
    crate::privacy::load_redaction_key(&opts.data_dir, true)?;
    let mut store = Store::open(&store_path(&opts.data_dir)).context("open store")?;
    let mode = if opts.proxy {
        Mode::Proxy
    } else {
        Mode::Worker
    };
    let identity = Identity::load_or_create(&opts.data_dir).context("node keys")?;
    let control = ControlConfig::load(&opts.data_dir)?;
    if let Some(c) = &control {
        if c.node_id != opts.node_id {
            anyhow::bail!(
                "this node is enrolled as {:?} ({}), not {:?}: drop --node-id or enroll again",
                c.node_id,
                ControlConfig::path(&opts.data_dir).display(),
                opts.node_id
            );
        }
    }
    let secrets = SecretSource::new(&opts.host.secrets_dir);
    let initial = match store.last_good()? {
        Some((g, body)) => match document::parse_with(&body, Format::Json, &opts.limits) {
            Ok(doc) if doc.node.id != opts.node_id => {
                error!(generation = g, document_node = %doc.node.id, "stored document is for another node; waiting for a new one");
                None
            }
            Ok(doc) => match sealed::open_all(identity.sealing_secret(), doc.secrets.as_ref()) {
                Ok(values) => {
                    info!(generation = g, "resuming from the last good document");
                    secrets.set_sealed(values);
                    Some(Arc::new(doc))
                }
                Err(e) => {
                    error!(generation = g, error = %e, "stored document's secrets cannot be opened; waiting for a new one");
                    None
                }
            },
            Err(p) => {
                error!(generation = g, problems = %p.len(), "stored document no longer validates; waiting for a new one");
                log_problems(&p);
                None
            }
        },
        None => None,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let mut engine_cfg = opts.engine.clone();
    let metrics = opts.metrics_listen.map(|_| {
        let m = Arc::new(crate::metrics::Metrics::new());
        converge_core::observe::set_request_observer(m.clone());
        engine_cfg.metrics = Some(m.clone());
        m
    });
    let sections = crate::registry::agent_sections(
        &opts.data_dir,
        &opts.host,
        &opts.node_id,
        opts.engine.resync,
        &secrets,
    );
    // Every reconciler is listed from the start, so that "every reconciler reports
    // generation N" is never true of an empty list right after a push.
    let known: Vec<String> = store
        .statuses()
        .context("read statuses")?
        .into_iter()
        .map(|s| s.reconciler)
        .collect();
    for s in &sections {
        if !known.iter().any(|k| k == s.name()) {
            store
                .put_status(&ReconcilerStatus::pending(s.name()))
                .context("save status")?;
        }
    }
    // The socket appears only now: whoever waits for it (`converge status`, which reads
    // the store) then sees every reconciler listed.
    let sock = socket_path(&opts.data_dir);
    let listener = bind_socket(&sock, opts.socket.gid()).await?;
    // A write cut short by kill -9 of an earlier agent leaves its temp file (never
    // renamed): no other agent serves this data dir now, and this one has not written.
    let stale = converge_core::fsutil::remove_stale_temps(&opts.data_dir, started);
    if stale > 0 {
        info!(
            files = stale,
            "removed the temp files of interrupted writes"
        );
    }
    let engine = Engine::start(sections, engine_cfg, initial, tx);
    let shared = Arc::new(Shared {
        store: Mutex::new(store),
        engine,
        mode,
        node_id: opts.node_id.clone(),
        limits: opts.limits,
        sealing: identity.sealing_secret().clone(),
        secrets,
        status_changed: Arc::new(tokio::sync::Notify::new()),
        data_dir: opts.data_dir.clone(),
        host: opts.host.clone(),
        pinned: match &control {
            Some(c) => Some(Arc::new(Mutex::new(c.pinned_key()?))),
            None => None,
        },
        heartbeat: Duration::from_secs(control.as_ref().map_or(15, |c| c.heartbeat_secs.max(1))),
        socket: opts.socket,
        max_document_age: opts.max_document_age,
        notifier: Arc::new(crate::notify::Notifier::default()),
        started_at: chrono::Utc::now(),
    });
    let persister = tokio::spawn(persist_reports(shared.clone(), rx));
    if let (Some(addr), Some(metrics)) = (opts.metrics_listen, metrics) {
        let reader = shared.clone();
        let snapshot = Arc::new(move || {
            let store = lock(&reader.store);
            let stored = stored_status(&store).unwrap_or_default();
            drop(store);
            crate::metrics::Snapshot {
                accepted: stored.generation,
                statuses: stored.statuses,
                control: stored.control,
                backups: crate::metrics::backups_record(&reader.data_dir),
            }
        });
        crate::metrics::serve(addr, metrics, snapshot).await?;
    }
    info!(socket = %sock.display(), ?mode, version = crate::VERSION, "agent started");
    tokio::spawn(notify_ready(shared.clone()));
    tokio::spawn(crate::notify::watchdog(
        shared.notifier.clone(),
        shared.engine.heartbeat(),
    ));
    if let Some(control) = control {
        tokio::spawn(crate::control::client::run(
            control,
            identity,
            shared.pinned.clone(),
            Arc::new(ControlNode(shared.clone())),
            shared.limits.max_document_bytes,
        ));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, &shared).await {
                            warn!(error = %e, "socket client failed");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "accept failed"),
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    info!("shutting down: converged state stays in place");
    shared.notifier.stopping();
    drop(listener);
    let _ = std::fs::remove_file(&sock);
    shared.engine.shutdown().await;
    // Workers are gone, so the report channel closes once the last report is saved.
    let _ = persister.await;
    Ok(())
}

/// Binds the agent socket with its final mode and owner before it appears: bound in a
/// private directory, given 0600 (0660 and the group with `--socket-group`), then
/// renamed into place, so nobody can connect in between.
async fn bind_socket(sock: &Path, gid: Option<u32>) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if sock.exists() {
        if UnixStream::connect(sock).await.is_ok() {
            anyhow::bail!("another agent is already serving {}", sock.display());
        }
        std::fs::remove_file(sock).with_context(|| format!("remove stale {}", sock.display()))?;
    }
    let mut random = [0u8; 8];
    getrandom::getrandom(&mut random).context("randomness")?;
    let dir = sock
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!(".socket-{}", hex::encode(random)));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("create {}", dir.display()))?;
    }
    let tmp = dir.join("converge.sock");
    let placed = (|| {
        let listener =
            UnixListener::bind(&tmp).with_context(|| format!("bind {}", tmp.display()))?;
        let mode = if gid.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(&tmp, Some(0), Some(gid))
                .with_context(|| format!("chown {}", tmp.display()))?;
        }
        std::fs::rename(&tmp, sock)
            .with_context(|| format!("move the socket to {}", sock.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    placed
}

/// Sends READY=1 once every reconciler has finished its first pass (at once when the
/// agent starts without a document).
async fn notify_ready(shared: Arc<Shared>) {
    let mut pending = shared.engine.first_passes();
    if pending.wait_for(|n| *n == 0).await.is_err() {
        return;
    }
    let line = status_line(&shared);
    shared.notifier.ready(&line);
    // CONVERGE_KEEP_STARTUP_PAGES=1 keeps them, for benches/idle_control.sh's baseline.
    if std::env::var_os("CONVERGE_KEEP_STARTUP_PAGES").is_none() {
        let released = crate::memory::release_startup_pages();
        tracing::debug!(kib = released / 1024, "start-up code pages released");
    }
}

/// The one-line summary of the stored statuses (systemd's STATUS=).
fn status_line(shared: &Shared) -> String {
    let store = lock(&shared.store);
    match (store.current_generation(), store.statuses()) {
        (Ok(g), Ok(s)) => crate::notify::summary(g, &s),
        (Err(e), _) | (_, Err(e)) => format!("cannot read the store: {e}"),
    }
}

async fn persist_reports(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Report>) {
    while let Some(report) = rx.recv().await {
        let writer = shared.clone();
        let res = tokio::task::spawn_blocking(move || {
            let mut store = lock(&writer.store);
            store.put_status(&report.status)?;
            let reason = report
                .status
                .reason
                .as_ref()
                .map(|r| r.to_string())
                .unwrap_or_default();
            store.journal_why(
                &report.status.reconciler,
                &reason,
                report.status.observed_generation,
                &report.journal,
            )?;
            drop(store);
            Ok::<_, StoreError>(status_line(&writer))
        })
        .await;
        crate::memory::trim();
        shared.status_changed.notify_one();
        match res {
            Ok(Ok(line)) => shared.notifier.status(&line),
            Ok(Err(e)) => error!(error = %e, "cannot persist status"),
            Err(e) => error!(error = %e, "status writer failed"),
        }
    }
}

/// Reads a request's header line (JSON, at most [`MAX_HEADER`] bytes, ended by a newline);
/// a push's document follows it on the same stream.
pub(crate) async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<Result<Request, serde_json::Error>> {
    let mut header = Vec::new();
    reader
        .take(MAX_HEADER)
        .read_until(b'\n', &mut header)
        .await?;
    Ok(serde_json::from_slice::<Request>(&header))
}

async fn serve(stream: UnixStream, shared: &Shared) -> anyhow::Result<()> {
    // Who is asking, from the kernel (SO_PEERCRED), not from anything the client says.
    let peer = stream.peer_cred().context("peer credentials")?;
    let allowed = |what| shared.socket.allows(peer.uid(), peer.gid(), what);
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    let mut oversized = false;
    let response = match read_request(&mut reader).await? {
        Ok(req) if !allowed(req.access()) => {
            warn!(uid = peer.uid(), op = req.name(), "socket request refused");
            Response::error(format!(
                "uid {} may not {} (root{})",
                peer.uid(),
                req.name(),
                if req.access() == Access::Operate {
                    " or a member of --socket-group"
                } else {
                    " only"
                }
            ))
        }
        Ok(Request::Push { yaml }) => {
            let format = if yaml { Format::Yaml } else { Format::Json };
            let bytes = limits::read_document_async(&mut reader, &shared.limits).await?;
            oversized = bytes.len() > shared.limits.max_document_bytes;
            accept(shared, &bytes, format)
        }
        Ok(Request::Status) => status(shared),
        Ok(Request::MetadataInspect { project }) => metadata_inspect(shared, &project),
        Ok(Request::Events { after, limit }) => events(shared, after, limit),
        Err(e) => Response::error(format!("bad request: {e}")),
    };
    write.write_all(&serde_json::to_vec(&response)?).await?;
    write.shutdown().await?;
    crate::memory::trim();
    if oversized {
        let mut rest = reader.take(DRAIN_BYTES);
        let mut sink = tokio::io::sink();
        let _ = tokio::time::timeout(DRAIN_TIME, tokio::io::copy(&mut rest, &mut sink)).await;
    }
    Ok(())
}

fn accept(shared: &Shared, bytes: &[u8], format: Format) -> Response {
    accept_expecting(shared, bytes, format, None)
}

/// Logs each problem of a refused document with its JSON path (the first 20: a
/// document with thousands of bad entries does not flood the journal).
fn log_problems(problems: &converge_core::Problems) {
    const SHOWN: usize = 20;
    for p in problems.0.iter().take(SHOWN) {
        warn!(path = %p.path, problem = %p.message, "document problem");
    }
    if problems.len() > SHOWN {
        warn!(
            more = problems.len() - SHOWN,
            "more document problems not logged"
        );
    }
}

/// A document's secrets, opened (in memory only).
type Opened = std::collections::BTreeMap<String, zeroize::Zeroizing<String>>;

/// The checks a document passes before it is stored, shared by the accept path and the
/// dry run: limits, schema and semantic validation, the envelope's generation
/// (`expected`), mode, node id, sealed secrets openable. Returns the document and its
/// opened secrets (in memory only), or the refusal.
fn check_document(
    shared: &Shared,
    bytes: &[u8],
    format: Format,
    expected: Option<u64>,
) -> Result<(Document, Opened), Box<Response>> {
    let doc = match document::parse_bytes(bytes, format, &shared.limits) {
        Ok(d) => d,
        Err(problems) => {
            return Err(Box::new(Response {
                ok: false,
                error: Some("document is invalid".into()),
                problems,
                ..Default::default()
            }));
        }
    };
    if let Some(g) = expected.filter(|g| *g != doc.generation) {
        return Err(Box::new(Response::error(format!(
            "$.generation: the envelope signed generation {g} but the document says {}",
            doc.generation
        ))));
    }
    if let Err(e) = check_mode(&doc, shared.mode) {
        return Err(Box::new(Response::error(e)));
    }
    if doc.node.id != shared.node_id {
        return Err(Box::new(Response::error(format!(
            "$.node.id: document is for node {:?} but this agent is node {:?} (hint: check the target, or start the agent with --node-id)",
            doc.node.id, shared.node_id
        ))));
    }
    // Secrets are opened before anything is stored: a document whose secrets this node
    // cannot open is refused like an invalid one. Values stay in memory only.
    match sealed::open_all(&shared.sealing, doc.secrets.as_ref()) {
        Ok(opened) => Ok((doc, opened)),
        Err(e) => Err(Box::new(Response::error(e.to_string()))),
    }
}

/// [`accept`], refusing a document whose generation is not `expected` (the generation
/// a control-plane envelope signed).
fn accept_expecting(
    shared: &Shared,
    bytes: &[u8],
    format: Format,
    expected: Option<u64>,
) -> Response {
    let (doc, opened) = match check_document(shared, bytes, format, expected) {
        Ok(checked) => checked,
        Err(refusal) => {
            if !refusal.problems.is_empty() {
                warn!(
                    problems = refusal.problems.len(),
                    "refused an invalid document; the last good one stays in force"
                );
                log_problems(&refusal.problems);
            }
            return *refusal;
        }
    };
    let canonical = match serde_json::to_string(&doc) {
        Ok(c) => c,
        Err(e) => return Response::error(format!("cannot serialise document: {e}")),
    };
    match lock(&shared.store).accept(doc.generation, &canonical) {
        Ok(()) => {}
        Err(e @ StoreError::Stale { .. }) => return Response::error(e.to_string()),
        Err(e) => return Response::error(format!("not stored: {e}")),
    }
    info!(
        generation = doc.generation,
        secrets = opened.len(),
        "accepted document"
    );
    shared.secrets.set_sealed(opened);
    let generation = doc.generation;
    shared.engine.push(Arc::new(doc));
    Response {
        ok: true,
        generation: Some(generation),
        ..Default::default()
    }
}

/// A control-plane dry run (`control-plane plan`): the request verified like an
/// envelope but in its own signature domain (never applied), its document checked like
/// one to accept (plus the generation against the one in force), then planned by
/// exactly what `converge diff` runs. Nothing on the host changes and the store is only
/// read: the accepted document, the secrets in force and the pin stay as they are.
async fn dry_run(shared: Arc<Shared>, bytes: Vec<u8>) -> Option<PlanAnswer> {
    use crate::control::dryrun::{problem_from_message, Outcome, Problem};
    let req = match DryRunRequest::parse(&bytes) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "ignored a malformed dry-run request");
            return None;
        }
    };
    let mut answer = PlanAnswer::without_plan(&req.request_id, &shared.node_id, Outcome::Error);
    let Some(pin) = &shared.pinned else {
        answer.error = Some("no pinned control-plane key".into());
        return Some(answer);
    };
    let pinned = *lock(pin);
    let now = chrono::Utc::now().timestamp();
    let verified = req
        .signer(&pinned)
        .map_err(DryRunError::from)
        .and_then(|key| req.verify(&key, &shared.node_id, now));
    let bytes = match verified {
        Ok(b) => b,
        Err(e) => {
            warn!(request = %req.request_id, error = %e, "refused a dry-run request");
            answer.error = Some(e.to_string());
            return Some(answer);
        }
    };
    let refused = |mut answer: PlanAnswer, problems: Vec<Problem>| {
        answer.outcome = Outcome::Refused;
        answer.set_problems(problems);
        Some(answer)
    };
    let (doc, opened) = match check_document(&shared, &bytes, Format::Json, None) {
        Ok(checked) => checked,
        Err(r) if !r.problems.is_empty() => {
            let problems = r.problems.0.iter().map(|p| Problem {
                path: p.path.clone(),
                message: p.message.clone(),
            });
            return refused(answer, problems.collect());
        }
        Err(r) => {
            let message = r.error.unwrap_or_else(|| "refused".into());
            return refused(answer, vec![problem_from_message(&message)]);
        }
    };
    // The store would refuse an older generation, or another document at the same one.
    let in_force = lock(&shared.store).last_good().ok().flatten();
    if let Some((g, body)) = in_force {
        let same = serde_json::to_string(&doc).is_ok_and(|c| c == body);
        if doc.generation < g || (doc.generation == g && !same) {
            let message = format!(
                "generation {} is not newer than the accepted generation {g} (replay or rollback)",
                doc.generation
            );
            return refused(
                answer,
                vec![Problem {
                    path: "$.generation".into(),
                    message,
                }],
            );
        }
    }
    let secrets = SecretSource::new(&shared.host.secrets_dir);
    secrets.set_sealed(opened);
    let (results, unbuilt) =
        crate::registry::diff(&shared.data_dir, &shared.host, doc, &secrets, None).await;
    let mut failed = Vec::new();
    for (name, r) in &results {
        match r {
            PassResult::Ran { changes, .. } if !changes.is_empty() => {
                let c = answer.counts.entry(name.to_string()).or_default();
                for change in changes {
                    match change.op {
                        converge_core::Op::Create => c.add += 1,
                        converge_core::Op::Update => c.change += 1,
                        converge_core::Op::Delete => c.remove += 1,
                    }
                }
            }
            PassResult::Failed { error, .. } => failed.push(format!("{name}: {error}")),
            _ => {}
        }
    }
    answer.outcome = if !failed.is_empty() {
        answer.error = Some(failed.join("; "));
        Outcome::Error
    } else if answer.counts.is_empty() {
        Outcome::Unchanged
    } else {
        Outcome::Changes
    };
    answer.set_plan(crate::output::plan_text(&results, &unbuilt, false));
    Some(answer)
}

/// Refuses a document meant for the other kind of node.
pub fn check_mode(doc: &Document, mode: Mode) -> Result<(), String> {
    if doc.node.mode == mode {
        Ok(())
    } else {
        Err(format!(
            "$.node.mode: document is for a {:?} node but this agent runs as {:?} (hint: start the agent with{} --proxy)",
            doc.node.mode,
            mode,
            if doc.node.mode == Mode::Proxy { "" } else { "out" }
        ))
    }
}

/// One project as the metadata database holds it: the token hash shortened, entries in
/// full (the socket is root's only, 0600).
fn metadata_inspect(shared: &Shared, project: &str) -> Response {
    let path = converge_metadata::db_path(&shared.data_dir);
    match converge_metadata::inspect(&path, project) {
        Ok(Some(p)) => {
            let entries: serde_json::Map<String, serde_json::Value> = p
                .entries
                .iter()
                .map(|(k, v)| {
                    let value = serde_json::from_str(v).unwrap_or(serde_json::Value::Null);
                    (k.clone(), value)
                })
                .collect();
            Response {
                ok: true,
                metadata: Some(serde_json::json!({
                    "project": project,
                    "tokenSha256": format!("{}…", p.token_sha256.get(..12).unwrap_or("")),
                    "rateLimit": p.rate_limit,
                    "index": p.index,
                    "entries": entries,
                })),
                ..Default::default()
            }
        }
        Ok(None) => Response::error(format!("no metadata project {project:?} on this node")),
        Err(e) => Response::error(e.to_string()),
    }
}

/// The journal, oldest first: the newest `limit` events, or those after `after`.
fn events(shared: &Shared, after: Option<i64>, limit: u32) -> Response {
    let limit = usize::try_from(limit.clamp(1, 10_000)).unwrap_or(10_000);
    let store = lock(&shared.store);
    let read = match after {
        Some(id) => store.events_after(id, limit),
        None => store.events(limit).map(|mut e| {
            e.reverse();
            e
        }),
    };
    match read {
        Ok(events) => Response {
            ok: true,
            events,
            ..Default::default()
        },
        Err(e) => Response::error(e.to_string()),
    }
}

fn status(shared: &Shared) -> Response {
    let store = lock(&shared.store);
    let mut resp = match stored_status(&store) {
        Ok(r) => r,
        Err(e) => return Response::error(e.to_string()),
    };
    let pending = *shared.engine.first_passes().borrow();
    resp.agent = Some(AgentInfo {
        version: crate::VERSION.to_string(),
        pid: std::process::id(),
        started_at: shared
            .started_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ready: pending == 0,
        first_passes_pending: pending,
    });
    if !shared.max_document_age.is_zero() {
        let issued = store.last_good().ok().flatten().and_then(|(g, body)| {
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let t = chrono::DateTime::parse_from_rfc3339(v["issuedAt"].as_str()?).ok()?;
            Some((g, t.to_utc()))
        });
        if let Some((g, t)) = issued {
            let age = (chrono::Utc::now() - t).to_std().unwrap_or_default();
            if age > shared.max_document_age {
                resp.warnings.push(format!(
                    "the document in force (generation {g}) was issued {} days ago, more than --max-document-age-days {}",
                    age.as_secs() / 86_400,
                    shared.max_document_age.as_secs() / 86_400
                ));
            }
        }
    }
    resp
}

/// The status as stored: what the agent answers, and what `converge status` shows
/// (labelled) when no agent answers.
pub fn stored_status(store: &Store) -> Result<Response, StoreError> {
    Ok(Response {
        ok: true,
        generation: store.current_generation()?,
        statuses: store.statuses()?,
        control: store
            .get_state(CONTROL_STATE_KEY)?
            .and_then(|s| serde_json::from_str(&s).ok()),
        ..Default::default()
    })
}

/// Client side: sends one request without a body to the agent socket and reads the
/// answer.
pub async fn request(data_dir: &Path, req: &Request) -> anyhow::Result<Response> {
    let mut stream = connect(data_dir, req).await?;
    stream.shutdown().await?;
    read_response(&mut stream).await
}

/// Client side: pushes a document (its raw bytes) to the agent and reads the answer.
pub async fn push(data_dir: &Path, yaml: bool, document: &[u8]) -> anyhow::Result<Response> {
    let mut stream = connect(data_dir, &Request::Push { yaml }).await?;
    // The agent may answer before it has read everything (an oversized document) and
    // close: its answer is still readable, so read it before giving up on the write.
    let sent = stream.write_all(document).await;
    let _ = stream.shutdown().await;
    match read_response(&mut stream).await {
        Ok(resp) => Ok(resp),
        Err(e) => {
            sent.context("send the document to the agent")?;
            Err(e)
        }
    }
}

async fn connect(data_dir: &Path, req: &Request) -> anyhow::Result<UnixStream> {
    let sock = socket_path(data_dir);
    let mut stream = UnixStream::connect(&sock).await.with_context(|| {
        format!(
            "cannot reach the agent at {} (is `converge agent` running?)",
            sock.display()
        )
    })?;
    let mut header = serde_json::to_vec(req)?;
    header.push(b'\n');
    stream.write_all(&header).await?;
    Ok(stream)
}

async fn read_response(stream: &mut UnixStream) -> anyhow::Result<Response> {
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    serde_json::from_slice(&buf).context("bad response from agent")
}

/// Store key of the control-plane connection state (shown by `converge status`).
pub const CONTROL_STATE_KEY: &str = "control";
/// Store key of the SHA-256 of the last document accepted from the control plane, so a
/// re-delivery of that very document is not reported as a replay.
const CONTROL_DOCUMENT_KEY: &str = "control_document_sha256";

/// Store key of the `issuedAt` of the last document accepted from the control plane.
const CONTROL_ISSUED_KEY: &str = "control_issued_at";

/// The agent as the control-plane client sees it: envelopes go through the same accept
/// path as a socket push, after the envelope is verified.
struct ControlNode(Arc<Shared>);

/// A refusal of an envelope that verified: about its document, not its origin.
fn verified_refusal(generation: u64, error: String) -> Accepted {
    Accepted::Refused {
        generation: Some(generation),
        error,
        verified: true,
    }
}

impl crate::control::transport::Node for ControlNode {
    fn accept_envelope(&self, bytes: &[u8]) -> Accepted {
        let shared = &self.0;
        let refused = |generation, error: String| Accepted::Refused {
            generation,
            error,
            verified: false,
        };
        let env = match Envelope::parse(bytes) {
            Ok(e) => e,
            Err(e) => return refused(None, e.to_string()),
        };
        let Some(pin) = &shared.pinned else {
            return refused(Some(env.generation), "no pinned control-plane key".into());
        };
        let pinned = *lock(pin);
        let signer = match env.signer(&pinned) {
            Ok(k) => k,
            Err(e) => return refused(Some(env.generation), e.to_string()),
        };
        let applied = match lock(&shared.store).current_generation() {
            Ok(g) => g,
            Err(e) => return refused(Some(env.generation), e.to_string()),
        };
        let verified = env.verify(&signer, &shared.node_id, applied);
        let signature_ok = !matches!(
            verified,
            Err(EnvelopeError::BadSignature
                | EnvelopeError::Malformed(_)
                | EnvelopeError::Unsigned)
        );
        if signer != pinned && signature_ok {
            shared.follow_rotation(pin, signer);
        }
        let doc = match verified {
            Ok(d) => d,
            Err(EnvelopeError::Stale { offered, applied }) if offered == applied => {
                // The same document again (a reconnect re-delivers the newest value)?
                let seen = lock(&shared.store)
                    .get_state(CONTROL_DOCUMENT_KEY)
                    .ok()
                    .flatten();
                let this = env
                    .verify(&signer, &shared.node_id, None)
                    .map(|d| hex::encode(sha2::Sha256::digest(&d)))
                    .ok();
                if this.is_some() && seen == this {
                    return Accepted::AlreadyApplied;
                }
                return refused(
                    Some(offered),
                    EnvelopeError::Stale { offered, applied }.to_string(),
                );
            }
            Err(e) => return refused(Some(env.generation), e.to_string()),
        };
        // The signed issue time only moves forward too: a document the plane issued
        // before the one in force (a replay of an old signed generation numbered
        // higher by mistake, a restored plane) is refused.
        let issued = chrono::DateTime::parse_from_rfc3339(&env.issued_at).map(|t| t.to_utc());
        let newest = lock(&shared.store)
            .get_state(CONTROL_ISSUED_KEY)
            .ok()
            .flatten()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(&s).ok())
            .map(|t| t.to_utc());
        match (issued, newest) {
            (Err(e), _) => {
                return verified_refusal(env.generation, format!("issuedAt {:?}: {e}", env.issued_at))
            }
            (Ok(t), Some(n)) if t < n => {
                return verified_refusal(
                    env.generation,
                    format!(
                        "issuedAt {} is before {} of the document already accepted from the control plane",
                        t.to_rfc3339(),
                        n.to_rfc3339()
                    ),
                )
            }
            _ => {}
        }
        // The envelope's generation is what was signed; the document must agree.
        let resp = accept_expecting(shared, &doc, Format::Json, Some(env.generation));
        if resp.ok {
            let digest = hex::encode(sha2::Sha256::digest(&doc));
            let mut store = lock(&shared.store);
            for (key, value) in [
                (CONTROL_DOCUMENT_KEY, digest.as_str()),
                (CONTROL_ISSUED_KEY, env.issued_at.as_str()),
            ] {
                if let Err(e) = store.put_state(key, value) {
                    warn!(error = %e, key, "cannot record the accepted document");
                }
            }
            drop(store);
            Accepted::Accepted(env.generation)
        } else {
            let mut error = resp.error.unwrap_or_else(|| "refused".into());
            if !resp.problems.is_empty() {
                let first: Vec<String> = resp
                    .problems
                    .0
                    .iter()
                    .take(5)
                    .map(|p| p.to_string())
                    .collect();
                error = format!("{error}: {}", first.join("; "));
            }
            verified_refusal(env.generation, error)
        }
    }

    fn status(&self) -> StatusMessage {
        let shared = &self.0;
        let store = lock(&shared.store);
        StatusMessage {
            node_id: shared.node_id.clone(),
            sent_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            accepted_generation: store.current_generation().ok().flatten(),
            reconcilers: store.statuses().unwrap_or_default(),
            facts: crate::control::enroll::facts(
                &shared.data_dir,
                &shared.host,
                shared.mode == Mode::Proxy,
            ),
            heartbeat_secs: shared.heartbeat.as_secs(),
        }
    }

    fn applied(&self) -> Option<u64> {
        lock(&self.0.store).current_generation().ok().flatten()
    }

    fn set_control_state(&self, state: &ControlState) {
        let res = serde_json::to_string(state)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                lock(&self.0.store)
                    .put_state(CONTROL_STATE_KEY, &s)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = res {
            warn!(error = %e, "cannot record the control-plane connection state");
        }
    }

    fn status_changed(&self) -> Arc<tokio::sync::Notify> {
        self.0.status_changed.clone()
    }

    fn dry_run(
        &self,
        bytes: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<PlanAnswer>> + Send>> {
        Box::pin(dry_run(self.0.clone(), bytes))
    }
}
