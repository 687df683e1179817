//! Host access for the routes reconciler: the driver trait, and the real driver — Caddy's
//! admin API on a unix socket (`admin.rs`), and, unless an existing Caddy's socket is
//! given, the Caddy process converge starts and finds again (`process.rs`).

use crate::plan::{Config, Process, UpstreamStatus};
use converge_core::{DriverError, HostEvent, SecretSource};
use futures::stream::BoxStream;
use serde_json::Value;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod admin;
pub mod process;

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
    /// Starts Caddy on its bootstrap configuration, stopping `stop` first.
    fn start(&self, stop: &[u32]) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// A secret (local file or sealed in the document), `None` when missing.
    fn read_secret(&self, name: &str) -> Result<Option<String>, DriverError>;
    /// An event as soon as the Caddy process converge watches exits.
    fn events(&self) -> Option<BoxStream<'static, HostEvent>> {
        None
    }
}

/// Settings of the real driver.
#[derive(Clone, Debug)]
pub struct CaddyConfig {
    /// The caddy binary (managed mode; also asked for its version).
    pub binary: PathBuf,
    /// `<data-dir>/caddy`: bootstrap config, admin socket, Caddy's data (certificates,
    /// the local CA) and log.
    pub dir: PathBuf,
    /// An existing Caddy's admin socket (a systemd unit runs Caddy): converge then
    /// neither starts nor stops Caddy.
    pub external_admin: Option<PathBuf>,
    /// Certificates and keys: local files (`--secrets-dir`) or the document's sealed
    /// secrets.
    pub secrets: SecretSource,
    /// Least time between two configuration loads (see `CaddyDriver::load_hold`).
    pub min_reload_interval: Duration,
}

/// The real driver.
pub struct Caddy {
    config: CaddyConfig,
    admin: admin::Admin,
    /// Asked of the binary on first use (not at construction: workers never need it).
    has_stream_close_delay: std::sync::OnceLock<bool>,
    watch: Arc<tokio::sync::watch::Sender<Vec<u32>>>,
    /// When converge's last configuration load succeeded.
    last_load: Mutex<Option<Instant>>,
}

impl Caddy {
    pub fn new(config: CaddyConfig) -> Self {
        let socket = config
            .external_admin
            .clone()
            .unwrap_or_else(|| config.dir.join("admin.sock"));
        Self {
            admin: admin::Admin::new(socket),
            config,
            has_stream_close_delay: std::sync::OnceLock::new(),
            watch: Arc::new(tokio::sync::watch::channel(Vec::new()).0),
            last_load: Mutex::new(None),
        }
    }

    pub fn admin_socket(&self) -> &std::path::Path {
        self.admin.socket()
    }
}

impl CaddyDriver for Caddy {
    fn process(&self) -> Result<Process, DriverError> {
        if self.config.external_admin.is_some() {
            return Ok(Process::External);
        }
        let pids = process::running(&self.config.dir)?;
        self.watch.send_replace(pids.clone());
        Ok(Process::Managed {
            pids,
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

    async fn get_config(&self) -> Result<Config, DriverError> {
        self.admin.get_config().await
    }

    async fn load(&self, config: &Value, etag: Option<&str>) -> Result<(), LoadError> {
        self.admin.load(config, etag).await?;
        *self.last_load.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
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

    async fn upstreams(&self) -> Result<Vec<UpstreamStatus>, DriverError> {
        self.admin.upstreams().await
    }

    async fn start(&self, stop: &[u32]) -> Result<(), DriverError> {
        if self.config.external_admin.is_some() {
            return Err(DriverError::Failed(
                "caddy is run by someone else (external admin socket): not starting it".into(),
            ));
        }
        process::start(&self.config.binary, &self.config.dir, stop).await?;
        let pids = process::running(&self.config.dir)?;
        self.watch.send_replace(pids);
        Ok(())
    }

    fn read_secret(&self, name: &str) -> Result<Option<String>, DriverError> {
        self.config
            .secrets
            .get(name)
            .map_err(|e| DriverError::Failed(e.to_string()))
    }

    fn events(&self) -> Option<BoxStream<'static, HostEvent>> {
        if self.config.external_admin.is_some() {
            return None;
        }
        Some(process::exit_events(self.watch.subscribe()))
    }
}

#[cfg(test)]
pub mod fake;
