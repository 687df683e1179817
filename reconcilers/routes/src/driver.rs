//! Host access for the routes reconciler: the driver trait, and the real driver — Caddy's
//! admin API on a unix socket (`admin.rs`) and, unless an existing Caddy's socket is
//! given, the pair of Caddy processes converge starts and finds again (`process.rs`,
//! `pair.rs`), unprivileged (`user.rs`), with the nf_tables switch between them
//! (`redirect.rs`).

use crate::plan::{Config, Process, UpstreamStatus};
use converge_core::{DriverError, HostEvent, SecretSource};
use futures::stream::BoxStream;
use futures::StreamExt;
use pair::Instance;
use serde_json::Value;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

pub mod admin;
pub mod pair;
pub mod process;
pub mod redirect;
pub mod user;

/// A configuration change that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Caddy refused the configuration (it keeps the previous one): its error.
    #[error("caddy refused the configuration: {0}")]
    Refused(String),
    /// Could not talk to Caddy, or the configuration changed meanwhile (412, transient).
    #[error(transparent)]
    Driver(#[from] DriverError),
}

/// What the routes reconciler needs from the host.
pub trait CaddyDriver: Send + Sync + 'static {
    /// Whether converge runs Caddy itself, and its processes.
    fn process(&self) -> Result<Process, DriverError>;
    /// Whether this Caddy has `stream_close_delay` (2.7+).
    fn stream_close_delay(&self) -> bool;
    /// The whole configuration with its ETag.
    fn get_config(&self) -> impl Future<Output = Result<Config, DriverError>> + Send;
    /// Replaces the whole configuration: one reload. With `etag`, only if the
    /// configuration is still that one (412 → `Transient`).
    fn load(
        &self,
        config: &Value,
        etag: Option<&str>,
    ) -> impl Future<Output = Result<(), LoadError>> + Send;
    /// Caddy's view of every reverse-proxy upstream.
    fn upstreams(&self) -> impl Future<Output = Result<Vec<UpstreamStatus>, DriverError>> + Send;
    /// How long the next load must wait to keep loads the minimum reload interval
    /// apart; `None`: it may go now.
    fn load_hold(&self) -> Option<Duration> {
        None
    }
    /// Sends the public ports to the serving instance again (managed mode: the kernel's
    /// redirect was flushed or edited); no Caddy reload.
    fn redirect(&self) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// Starts Caddy on its bootstrap configuration, stopping `stop` first.
    fn start(&self, stop: &[u32]) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// A secret (local file or sealed in the document), `None` when missing.
    fn read_secret(&self, name: &str) -> Result<Option<String>, DriverError>;
    /// An event as soon as a Caddy process converge watches exits, or the redirect
    /// table changes.
    fn events(&self) -> Option<BoxStream<'static, HostEvent>> {
        None
    }
}

/// Settings of the real driver.
#[derive(Clone, Debug)]
pub struct CaddyConfig {
    /// The caddy binary (managed mode; also asked for its version).
    pub binary: PathBuf,
    /// `<data-dir>/caddy`: the instances' directories (`a/`, `b/`: config, admin
    /// socket, pid file, log), Caddy's data shared by both (certificates, the local CA),
    /// and `admin.sock`, a link to the active instance's socket.
    pub dir: PathBuf,
    /// An existing Caddy's admin socket (a systemd unit runs Caddy): converge then
    /// neither starts nor stops Caddy, and loads into it directly.
    pub external_admin: Option<PathBuf>,
    /// Certificates and keys: local files (`--secrets-dir`) or the document's sealed
    /// secrets.
    pub secrets: SecretSource,
    /// Least time between two configuration loads (see `CaddyDriver::load_hold`).
    pub min_reload_interval: Duration,
    /// The system user the managed pair runs as (`user.rs`; default
    /// [`user::DEFAULT_USER`]); `root` runs it as root, with a warning.
    pub user: String,
    /// How long the old instance drains after a switch (default [`DRAIN`]).
    pub drain: Duration,
}

/// How long the old instance keeps serving the connections it accepted before the
/// switch, answering each request with `Connection: close` (see `pair.rs`), before it
/// is reloaded: a TLS handshake and a first request fit well in it, and a client
/// sending on a kept-alive connection gets its last answer there and leaves. Longer
/// requests (uploads, slow clients) need a longer drain: `--caddy-drain-ms`.
pub const DRAIN: Duration = Duration::from_millis(500);

/// The real driver.
pub struct Caddy {
    config: CaddyConfig,
    /// External mode: the one Caddy's admin client.
    external: Option<admin::Admin>,
    /// Managed mode: the pair's admin clients, by instance (A, B).
    pair: [admin::Admin; 2],
    /// The instance new connections go to, as last read from the kernel or switched to.
    active: Mutex<Instance>,
    /// Held by a load until the old instance has been drained and reloaded too: the
    /// next load (into that instance) waits for it; a read meanwhile leaves the
    /// draining instance out.
    settle: Arc<tokio::sync::Mutex<()>>,
    /// Asked of the binary on first use (not at construction: workers never need it).
    has_stream_close_delay: std::sync::OnceLock<bool>,
    watch: Arc<tokio::sync::watch::Sender<Vec<u32>>>,
    /// An old instance's reload after its drain failed: a pass puts the pair right
    /// (reads leave a draining instance out, so no verify pass would see it).
    drain_failed: tokio::sync::mpsc::UnboundedSender<HostEvent>,
    drain_failures: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<HostEvent>>>,
    /// When converge's last configuration load succeeded.
    last_load: Mutex<Option<Instant>>,
}

impl Caddy {
    pub fn new(config: CaddyConfig) -> Self {
        let admin = |i: Instance| admin::Admin::new(i.dir(&config.dir).join("admin.sock"));
        let (drain_failed, drain_failures) = tokio::sync::mpsc::unbounded_channel();
        Self {
            drain_failed,
            drain_failures: Mutex::new(Some(drain_failures)),
            external: config.external_admin.clone().map(admin::Admin::new),
            pair: [admin(Instance::A), admin(Instance::B)],
            config,
            active: Mutex::new(Instance::A),
            settle: Arc::new(tokio::sync::Mutex::new(())),
            has_stream_close_delay: std::sync::OnceLock::new(),
            watch: Arc::new(tokio::sync::watch::channel(Vec::new()).0),
            last_load: Mutex::new(None),
        }
    }

    /// The instance new connections go to (managed mode), as last read or switched to.
    pub fn serving(&self) -> Option<Instance> {
        self.external.is_none().then(|| self.active())
    }

    fn admin(&self, inst: Instance) -> &admin::Admin {
        &self.pair[match inst {
            Instance::A => 0,
            Instance::B => 1,
        }]
    }

    fn active(&self) -> Instance {
        *self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_active(&self, inst: Instance) {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = inst;
        // `<dir>/admin.sock` follows the active instance, for operators and tools.
        let link = self.config.dir.join("admin.sock");
        let tmp = self.config.dir.join(".admin.sock.new");
        let _ = std::fs::remove_file(&tmp);
        let target = Path::new(inst.name()).join("admin.sock");
        if let Err(e) =
            std::os::unix::fs::symlink(&target, &tmp).and_then(|()| std::fs::rename(&tmp, &link))
        {
            tracing::warn!(error = %e, link = %link.display(), "caddy admin link not updated");
        }
    }

    fn loaded(&self) {
        *self.last_load.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Returns once the last load's old instance has been drained and reloaded.
    pub async fn settled(&self) {
        drop(self.settle.lock().await);
    }

    /// Switches the drain marker of `inst` on or off (see `pair.rs`).
    fn drain_marker(&self, inst: Instance, on: bool) -> Result<(), DriverError> {
        let path = pair::drain_marker(&self.config.dir, inst);
        let r = if on {
            // Root's, empty, 0640 with the group of the instance directory (Caddy's
            // user's): Caddy's `file` matcher needs to read it, not just stat it.
            use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
            let gid = path
                .parent()
                .and_then(|d| std::fs::metadata(d).ok())
                .map(|m| m.gid());
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o640)
                .open(&path)
                .and_then(|f| {
                    std::os::unix::fs::fchown(&f, Some(0), gid)?;
                    f.set_permissions(std::fs::Permissions::from_mode(0o640))
                })
        } else {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            }
        };
        r.map_err(|e| DriverError::io(format!("drain marker {}", path.display()), e))
    }
}

impl CaddyDriver for Caddy {
    fn process(&self) -> Result<Process, DriverError> {
        if self.external.is_some() {
            return Ok(Process::External);
        }
        let mut pids = Vec::new();
        let mut missing = false;
        for inst in Instance::BOTH {
            let found = process::running(&inst.dir(&self.config.dir))?;
            missing |= found.is_empty();
            pids.extend(found);
        }
        pids.sort_unstable();
        self.watch.send_replace(pids.clone());
        Ok(Process::Managed {
            pids,
            missing,
            bootstrap: process::bootstrap(&self.config.dir),
        })
    }

    fn stream_close_delay(&self) -> bool {
        *self.has_stream_close_delay.get_or_init(|| {
            let version = process::version(&self.config.binary);
            let has = version
                .as_deref()
                .and_then(process::parse_version)
                .is_some_and(|v| v >= (2, 7));
            tracing::info!(version = ?version, stream_close_delay = has, "caddy");
            has
        })
    }

    /// Managed: the active instance's configuration as the plan sees it, with the
    /// standby's (left out while it drains: it is reloaded when the drain ends) and
    /// whether the kernel sends the public ports to the active one. Never waits for a
    /// drain, so a flushed redirect is seen and put back at once.
    async fn get_config(&self) -> Result<Config, DriverError> {
        if let Some(a) = &self.external {
            return a.get_config().await;
        }
        // Held for the read, so a load cannot start draining the standby meanwhile.
        let settled = self.settle.try_lock().ok();
        let kernel = redirect::active().await?;
        let active = kernel.unwrap_or_else(|| self.active());
        if kernel.is_some() && kernel != Some(self.active()) {
            self.set_active(active);
        }
        let standby = active.other();
        let read_standby = async {
            match &settled {
                Some(_) => Some(self.admin(standby).get_config().await),
                None => None,
            }
        };
        let (now, other) = tokio::join!(self.admin(active).get_config(), read_standby);
        let now = now?;
        let dir = &self.config.dir;
        Ok(Config {
            etag: now.etag,
            value: pair::to_canonical(&now.value, dir, active),
            standby: match other {
                Some(other) => Some(pair::to_canonical(&other?.value, dir, standby)),
                None => None,
            },
            redirected: kernel.is_some(),
        })
    }

    /// Managed: into the standby instance, then new connections switched to it (one
    /// nf_tables transaction), then the old instance drained — `Connection: close` on
    /// every answer for the drain time — and, in the background, the next load waiting for it,
    /// reloaded with the same configuration. Caddy's refusal leaves everything as it
    /// was. `etag` is checked against the active instance's configuration first.
    async fn load(&self, config: &Value, etag: Option<&str>) -> Result<(), LoadError> {
        if let Some(a) = &self.external {
            a.load(config, etag).await?;
            self.loaded();
            return Ok(());
        }
        let settled = self.settle.clone().lock_owned().await;
        let active = self.active();
        if let Some(tag) = etag {
            let now = self.admin(active).get_config().await?;
            if now.etag.as_deref() != Some(tag) {
                return Err(LoadError::Driver(DriverError::Transient(
                    "caddy's configuration was changed by someone else meanwhile: planning again"
                        .into(),
                )));
            }
        }
        let standby = active.other();
        let dir = &self.config.dir;
        self.admin(standby)
            .load(&pair::to_instance(config, dir, standby), None)
            .await?;
        // The instance taking the traffic keeps connections alive; the old one starts
        // closing them as soon as it no longer receives new ones.
        self.drain_marker(standby, false)?;
        redirect::switch(standby).await?;
        self.set_active(standby);
        self.loaded();
        if let Err(e) = self.drain_marker(active, true) {
            // Its kept-alive clients then meet the reload unwarned: logged, not fatal.
            tracing::warn!(error = %e, "old caddy instance not told to drain");
        }
        let old = self.admin(active).clone();
        let same = pair::to_instance(config, dir, active);
        let span = tracing::info_span!("caddy drain", instance = active.name());
        let failed = self.drain_failed.clone();
        let drain = self.config.drain;
        tokio::spawn(
            async move {
                tokio::time::sleep(drain).await;
                let r = old.load(&same, None).await;
                drop(settled);
                if let Err(e) = r {
                    // A pass then sees the pair out of sync and loads again.
                    tracing::warn!(error = %e, "old caddy instance not reloaded");
                    let _ = failed.send(HostEvent(format!(
                        "caddy instance {} not reloaded after its drain",
                        active.name()
                    )));
                }
            }
            .instrument(span),
        );
        Ok(())
    }

    fn load_hold(&self) -> Option<Duration> {
        let last = (*self.last_load.lock().unwrap_or_else(|p| p.into_inner()))?;
        let wait = self
            .config
            .min_reload_interval
            .saturating_sub(last.elapsed());
        (!wait.is_zero()).then_some(wait)
    }

    async fn redirect(&self) -> Result<(), DriverError> {
        if self.external.is_some() {
            return Ok(());
        }
        let active = self.active();
        self.drain_marker(active, false)?;
        redirect::switch(active).await
    }

    async fn upstreams(&self) -> Result<Vec<UpstreamStatus>, DriverError> {
        match &self.external {
            Some(a) => a.upstreams().await,
            None => self.admin(self.active()).upstreams().await,
        }
    }

    /// Stops `stop`, then starts each instance that is not running.
    async fn start(&self, stop: &[u32]) -> Result<(), DriverError> {
        if self.external.is_some() {
            return Err(DriverError::Failed(
                "caddy is run by someone else (external admin socket): not starting it".into(),
            ));
        }
        // Before stopping anything: a missing user leaves what runs running.
        let run_as = user::resolve(&self.config.user)?;
        process::stop(stop).await;
        let dir = &self.config.dir;
        let mut starts = Vec::new();
        for inst in Instance::BOTH {
            let inst_dir = inst.dir(dir);
            if process::running(&inst_dir)?.is_empty() {
                let binary = &self.config.binary;
                let run_as = run_as.as_ref();
                starts.push(async move { process::start(binary, &inst_dir, dir, run_as).await });
            }
        }
        for r in futures::future::join_all(starts).await {
            r?;
        }
        if !dir.join("admin.sock").exists() {
            self.set_active(self.active());
        }
        self.process()?;
        Ok(())
    }

    fn read_secret(&self, name: &str) -> Result<Option<String>, DriverError> {
        self.config
            .secrets
            .get(name)
            .map_err(|e| DriverError::Failed(e.to_string()))
    }

    fn events(&self) -> Option<BoxStream<'static, HostEvent>> {
        if self.external.is_some() {
            return None;
        }
        let mut streams = vec![converge_core::host::exit_events(
            "caddy",
            self.watch.subscribe(),
        )];
        streams.extend(redirect::events());
        if let Some(mut rx) = self
            .drain_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            streams.push(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed());
        }
        Some(futures::stream::select_all(streams).boxed())
    }
}

#[cfg(test)]
pub mod fake;
