//! The backups driver: the trait the reconciler calls, and the real driver (`Host`):
//! backups here; borg (`driver/borg.rs`), the durable run record (`driver/state.rs`),
//! the container runtime CLI for volumes, hooks and freezes (`driver/runtime.rs`),
//! restores (`driver/restore.rs`) and the S3 export (`driver/export.rs`). The fake for
//! unit tests is `driver/fake.rs`.

pub mod borg;
mod export;
#[cfg(test)]
pub mod fake;
mod restore;
pub mod runtime;
pub mod state;

pub use restore::Cleaned;

use crate::plan::{BackupRun, ForeignBorg, RepoObserved, State};
use crate::spec::{BackupRepository, Export, Restore};
use borg::{human, Access, Borg, Progress};
use chrono::{DateTime, Utc};
use converge_core::{DriverError, SecretSource};
use runtime::RuntimeCli;
use serde::{Deserialize, Serialize};
use state::StateFile;
use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// A finished export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportDone {
    pub message: String,
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

/// What the reconciler needs from the host.
pub trait BackupsDriver: Send + Sync + 'static {
    /// The current time (a test clock may compress it).
    fn now(&self) -> DateTime<Utc>;
    /// When this agent (driver) started.
    fn agent_start(&self) -> DateTime<Utc>;
    /// How many times faster than real time `now` runs (1 in production; tests
    /// compress time): the reconciler divides its wake-up delays by it.
    fn time_scale(&self) -> u32 {
        1
    }
    fn read_state(&self) -> Result<State, DriverError>;
    /// Durably replaces the record (atomic write).
    fn write_state(&self, s: &State) -> Result<(), DriverError>;
    /// Whether the repository exists, and whether a borg process this agent did not
    /// start uses it.
    fn repository(&self, r: &BackupRepository, state: &State) -> Result<RepoObserved, DriverError>;
    /// `borg init`; an existing repository is success.
    fn init(&self, r: &BackupRepository) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// One backup: hooks, `borg create`, prune (+ compact); returns the summary.
    fn backup(
        &self,
        run: &BackupRun,
        progress: &Progress,
    ) -> impl Future<Output = Result<String, DriverError>> + Send;
    fn restore(
        &self,
        r: &Restore,
        repo: &BackupRepository,
        progress: &Progress,
    ) -> impl Future<Output = Result<String, DriverError>> + Send;
    fn export(
        &self,
        e: &Export,
        repo: &BackupRepository,
        progress: &Progress,
    ) -> impl Future<Output = Result<ExportDone, DriverError>> + Send;
    /// Ids of restores with a journal: under way, or cut short (kill -9).
    fn journaled_restores(&self) -> Vec<String>;
    /// Finishes or undoes restore `id`, cut short (see `driver/restore.rs`).
    fn clean_restore(&self, id: &str) -> impl Future<Output = Result<Cleaned, DriverError>> + Send;
}

/// Per-operation time limits (generous: a backup of a large volume takes hours).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub init: Duration,
    pub create: Duration,
    pub hook: Duration,
    pub prune: Duration,
    pub extract: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            init: Duration::from_secs(120),
            create: Duration::from_secs(12 * 3600),
            hook: Duration::from_secs(3600),
            prune: Duration::from_secs(3600),
            extract: Duration::from_secs(12 * 3600),
        }
    }
}

/// The clock the driver reads (tests pass a compressed one).
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// Settings of the real driver.
#[derive(Clone)]
pub struct HostConfig {
    /// `<data-dir>/backups`: the record, borg's base dir, the export journal.
    pub dir: PathBuf,
    pub borg: PathBuf,
    /// The container runtime (volumes, hooks in containers, freezes); `None`: volumes
    /// and container hooks fail with a clear message.
    pub runtime: Option<RuntimeCli>,
    pub secrets: SecretSource,
    pub clock: Clock,
    /// See [`BackupsDriver::time_scale`]; must match `clock`.
    pub time_scale: u32,
    pub timeouts: Timeouts,
}

impl HostConfig {
    pub fn new(data_dir: &Path, secrets: SecretSource) -> Self {
        Self {
            dir: data_dir.join("backups"),
            borg: PathBuf::from("borg"),
            runtime: None,
            secrets,
            clock: Arc::new(Utc::now),
            time_scale: 1,
            timeouts: Timeouts::default(),
        }
    }

    /// Test-only compressed time: `now` runs `scale` times faster than real time from
    /// `epoch` on (continuous across agent restarts that use the same epoch).
    pub fn compressed_clock(&mut self, scale: u32, epoch: DateTime<Utc>) {
        let scale = scale.max(1);
        self.time_scale = scale;
        self.clock =
            Arc::new(move || epoch + (Utc::now() - epoch) * i32::try_from(scale).unwrap_or(1));
    }
}

/// The real driver.
pub struct Host {
    cfg: HostConfig,
    borg: Borg,
    state: StateFile,
    started: DateTime<Utc>,
}

/// What converge writes in an archive's comment: where each source came from, so a
/// restore knows which directory of the archive a volume is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveSources {
    pub converge: u32,
    pub sources: Vec<Source>,
}

/// One source of an archive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The host path as archived (absolute), or the dump's file name.
    pub path: String,
    #[serde(default)]
    pub dump: bool,
}

fn os(v: &[&str]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

/// Archives of `schedule`, and no other schedule's (names are `<schedule>-<slot>`).
pub fn schedule_glob(schedule: &str) -> String {
    format!("{schedule}-[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]T[0-9][0-9][0-9][0-9]Z")
}

/// `borg prune` arguments for a schedule's retention.
pub fn prune_args(run: &BackupRun) -> Option<Vec<String>> {
    let r = run.schedule.retention.as_ref()?;
    let mut v = vec![
        "prune".to_string(),
        "--log-json".into(),
        "--lock-wait".into(),
        "60".into(),
        "--glob-archives".into(),
        schedule_glob(&run.schedule.name),
    ];
    v.extend(r.prune_args());
    v.push(run.repository.url.clone());
    Some(v)
}

impl Host {
    pub fn new(cfg: HostConfig) -> Self {
        let borg = Borg {
            binary: cfg.borg.clone(),
            base_dir: cfg.dir.join("borg"),
        };
        let state = StateFile::new(&cfg.dir);
        let started = (cfg.clock)();
        // Key files a killed agent left behind (a running agent removes its own).
        let _ = std::fs::remove_dir_all(cfg.dir.join("ssh"));
        Self {
            cfg,
            borg,
            state,
            started,
        }
    }

    /// How borg reaches `repo`: location, passphrase (read now, kept only for the call).
    pub fn access(&self, repo: &BackupRepository) -> Result<Access, DriverError> {
        let secret = |name: &Option<String>| -> Result<Option<String>, DriverError> {
            let Some(n) = name else { return Ok(None) };
            match self.cfg.secrets.get(n) {
                Ok(Some(v)) => Ok(Some(v)),
                Ok(None) => Err(DriverError::Failed(format!(
                    "{} is missing",
                    self.cfg.secrets.describe(n)
                ))),
                Err(e) => Err(DriverError::Failed(e.to_string())),
            }
        };
        let passphrase = secret(&repo.passphrase_secret)?;
        let (ssh_key, key_file) = match (&repo.credentials_secret, repo.url.starts_with("ssh://")) {
            (Some(n), true) => {
                let local = self.cfg.secrets.dir().join(n);
                if local.is_file() {
                    (Some(local), None)
                } else {
                    // A sealed key: ssh reads keys from files only, so it is written for
                    // this access (0600, in the private data dir) and removed after it.
                    let value = secret(&repo.credentials_secret)?.unwrap_or_default();
                    let file = self.key_file(n, &value)?;
                    (Some(file.0.clone()), Some(Arc::new(file)))
                }
            }
            _ => (None, None),
        };
        Ok(Access {
            location: repo.url.clone(),
            passphrase,
            ssh_key,
            key_file,
        })
    }

    /// Where sealed SSH keys are written while a borg call uses them.
    fn key_dir(&self) -> PathBuf {
        self.cfg.dir.join("ssh")
    }

    /// Writes `value` as the private key of secret `name` for one access. Each access has
    /// its own file (runs may overlap), numbered.
    fn key_file(&self, name: &str, value: &str) -> Result<borg::KeyFile, DriverError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = self.key_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| DriverError::io(format!("create {}", dir.display()), e))?;
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{name}.{n}"));
        // ssh refuses a key without its final newline.
        let mut key = value.trim_end().to_string();
        key.push('\n');
        let key = converge_core::Zeroizing::new(key);
        converge_core::fsutil::write_atomic(&path, key.as_bytes(), 0o600)
            .map_err(|e| DriverError::io(format!("write {}", path.display()), e))?;
        Ok(borg::KeyFile(path))
    }

    fn runtime(&self) -> Result<&RuntimeCli, DriverError> {
        self.cfg.runtime.as_ref().ok_or_else(|| {
            DriverError::Failed(
                "no container runtime configured: volumes and container hooks are unavailable"
                    .into(),
            )
        })
    }

    /// Whether `archive` exists in the repository (a retried slot whose killed run
    /// got as far as committing it).
    async fn archive_exists(&self, access: &Access, archive: &str) -> Result<bool, DriverError> {
        let args = os(&["list", "--json", "--lock-wait", "60", &access.location]);
        let out = self
            .borg
            .run(
                access,
                &args,
                None,
                self.cfg.timeouts.init,
                &Progress::default(),
            )
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| DriverError::Failed(format!("borg list: unexpected output: {e}")))?;
        Ok(v["archives"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["name"] == archive)))
    }

    /// Breaks a lock left by a killed borg, and only such a lock: a local repository
    /// whose lock holders are all processes of this host that no longer exist, while no
    /// borg process on this host uses the repository. Anything else is left alone (a
    /// live borg: wait; another host's lock: report).
    async fn clear_stale_lock(&self, access: &Access) -> Result<(), DriverError> {
        let repo = Path::new(&access.location);
        if !access.location.starts_with('/') {
            // Remote: borg itself removes stale locks of dead local processes
            // (BORG_HOSTNAME_IS_UNIQUE=yes).
            return Ok(());
        }
        let holders = lock_holders(repo);
        if holders.is_empty() {
            return Ok(());
        }
        if let Some(pid) = borg_users(&access.location, false).first() {
            return Err(DriverError::RetryAfter {
                message: format!(
                    "repository {} locked by live borg pid {pid}",
                    access.location
                ),
                after: Duration::from_secs(30),
            });
        }
        let host = hostname();
        for (h, pid) in &holders {
            if *h != host {
                return Err(DriverError::Failed(format!(
                    "repository {} is locked by host {h} (pid {pid}); not breaking another host's lock",
                    access.location
                )));
            }
            if converge_core::host::alive(*pid) {
                return Err(DriverError::RetryAfter {
                    message: format!("repository {} locked by live pid {pid}", access.location),
                    after: Duration::from_secs(30),
                });
            }
        }
        warn!(repository = %access.location, holders = holders.len(), "breaking a stale borg lock left by a killed run");
        self.borg
            .run(
                access,
                &os(&["break-lock", &access.location]),
                None,
                self.cfg.timeouts.init,
                &Progress::default(),
            )
            .await?;
        Ok(())
    }

    async fn hook(
        &self,
        what: &str,
        command: &[String],
        container: &Option<String>,
    ) -> Result<(), DriverError> {
        let argv = match container {
            Some(c) => self.runtime()?.exec_argv(c, command),
            None => command.to_vec(),
        };
        let Some((bin, args)) = argv.split_first() else {
            return Err(DriverError::Failed(format!("{what}: empty command")));
        };
        let started = Instant::now();
        let out = tokio::time::timeout(
            self.cfg.timeouts.hook,
            tokio::process::Command::new(bin)
                .args(args)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| DriverError::Timeout {
            op: what.to_string(),
            after: self.cfg.timeouts.hook,
        })?
        .map_err(|e| DriverError::io(format!("run {what}"), e))?;
        if !out.status.success() {
            let mut err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            err.truncate(300);
            return Err(DriverError::Failed(format!(
                "{what} failed ({}): {err}",
                out.status
            )));
        }
        info!(
            hook = what,
            ms = started.elapsed().as_millis() as u64,
            "hook ran"
        );
        Ok(())
    }

    async fn create(
        &self,
        run: &BackupRun,
        access: &Access,
        progress: &Progress,
    ) -> Result<String, DriverError> {
        let s = &run.schedule;
        let mut sources = Vec::new();
        for v in &s.volumes {
            let p = self.runtime()?.volume_path(v).await?;
            sources.push(Source {
                volume: Some(v.clone()),
                path: p.display().to_string(),
                dump: false,
            });
        }
        for p in &s.paths {
            sources.push(Source {
                volume: None,
                path: p.clone(),
                dump: false,
            });
        }
        if let Some(d) = &s.dump {
            sources.push(Source {
                volume: None,
                path: d.file_name.clone(),
                dump: true,
            });
        }
        // borg only warns about a source that is missing and archives the rest: a typo
        // would be a "successful" backup of nothing.
        if let Some(why) = sources
            .iter()
            .filter(|x| !x.dump)
            .find_map(|x| unreadable(Path::new(&x.path)))
        {
            return Err(DriverError::Failed(format!("{why}: nothing archived")));
        }
        let comment = serde_json::to_string(&ArchiveSources {
            converge: 1,
            sources: sources.clone(),
        })
        .unwrap_or_default()
        // borg expands `{placeholders}` in comments; `{{`/`}}` are literal braces.
        .replace('{', "{{")
        .replace('}', "}}");
        let target = format!("{}::{}", access.location, run.archive);
        let mut args: Vec<OsString> = os(&[
            "create",
            "--log-json",
            "--json",
            "--lock-wait",
            "60",
            "--comment",
            &comment,
        ]);
        match &s.dump {
            Some(d) => {
                args.extend(os(&[
                    "--stdin-name",
                    &d.file_name,
                    "--content-from-command",
                    &target,
                    "--",
                ]));
                let argv = match &d.container {
                    Some(c) => self.runtime()?.exec_argv(c, &d.command),
                    None => d.command.clone(),
                };
                args.extend(argv.into_iter().map(OsString::from));
            }
            None => {
                args.push(target.into());
                args.extend(sources.iter().map(|x| OsString::from(&x.path)));
            }
        }
        let started = Instant::now();
        let out = self
            .borg
            .run(access, &args, None, self.cfg.timeouts.create, progress)
            .await?;
        // The final statistics (`--json` on stdout) are exact; progress lines may stop
        // short of the last file.
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let st = &v["archive"]["stats"];
        let bytes = st["original_size"].as_u64().unwrap_or(out.stats.bytes);
        let files = st["nfiles"].as_u64().unwrap_or(out.stats.files);
        let dedup = st["deduplicated_size"]
            .as_u64()
            .unwrap_or(out.stats.deduplicated);
        let secs = started.elapsed().as_secs_f64();
        let w = &out.warnings;
        info!(archive = %run.archive, bytes, files, deduplicated = dedup, secs, warnings = w.count, "archive created");
        let summary = format!(
            "archive {}: {files} files, {} ({} new) in {secs:.1} s",
            run.archive,
            human(bytes),
            human(dedup)
        );
        // A source gone while borg ran is only a warning to borg.
        let gone = sources
            .iter()
            .filter(|x| !x.dump)
            .find_map(|x| unreadable(Path::new(&x.path)));
        if let Some(why) = gone {
            return Err(DriverError::Failed(format!("{summary}, incomplete: {why}")));
        }
        if w.failing_count > 0 {
            warn!(archive = %run.archive, warnings = w.failing_count, "archive incomplete");
            return Err(DriverError::Failed(format!(
                "{summary}, incomplete: {}",
                w.describe()
            )));
        }
        if w.count > 0 {
            return Ok(format!("{summary}; {}", w.describe()));
        }
        Ok(summary)
    }

    /// Running containers that use the schedule's volumes (a torn copy risk).
    async fn volume_users(&self, run: &BackupRun) -> Result<Vec<String>, DriverError> {
        let mut users = Vec::new();
        for v in &run.schedule.volumes {
            for c in self.runtime()?.running_users(v).await? {
                if !users.contains(&c) {
                    users.push(c);
                }
            }
        }
        Ok(users)
    }

    async fn backup_inner(
        &self,
        run: &BackupRun,
        progress: &Progress,
    ) -> Result<String, DriverError> {
        let s = &run.schedule;
        let access = self.access(&run.repository)?;
        self.clear_stale_lock(&access).await?;
        if run.attempt > 1 && self.archive_exists(&access, &run.archive).await? {
            info!(archive = %run.archive, "archive already complete: a killed run committed it");
            let pruned = self.prune(run, &access).await?;
            return Ok(format!(
                "archive {} was completed by an earlier, interrupted run{pruned}",
                run.archive
            ));
        }
        let users = if s.volumes.is_empty() {
            Vec::new()
        } else {
            self.volume_users(run).await?
        };
        if !users.is_empty() && !s.freeze && s.pre_hook.is_none() {
            return Err(DriverError::Failed(format!(
                "volumes in use by running container(s) {}: not archived (a copy could be torn); add a preHook or a dump, or set freeze",
                users.join(", ")
            )));
        }
        if let Some(h) = &s.pre_hook {
            self.hook("preHook", &h.command, &h.container).await?;
        }
        let mut frozen = Vec::new();
        let mut result = Ok(String::new());
        if s.freeze {
            for c in &users {
                match self.runtime()?.pause(c, true).await {
                    Ok(()) => frozen.push(c.clone()),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        if result.is_ok() {
            result = self.create(run, &access, progress).await;
        }
        for c in &frozen {
            if let Err(e) = self.runtime()?.pause(c, false).await {
                warn!(container = %c, error = %e, "cannot unpause after the backup");
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        if let Some(h) = &s.post_hook {
            if let Err(e) = self.hook("postHook", &h.command, &h.container).await {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        let summary = result?;
        let pruned = self.prune(run, &access).await?;
        Ok(format!("{summary}{pruned}"))
    }

    /// Prune (and compact) after a successful backup.
    async fn prune(&self, run: &BackupRun, access: &Access) -> Result<String, DriverError> {
        let Some(args) = prune_args(run) else {
            return Ok(String::new());
        };
        let args: Vec<OsString> = args.into_iter().map(OsString::from).collect();
        self.borg
            .run(
                access,
                &args,
                None,
                self.cfg.timeouts.prune,
                &Progress::default(),
            )
            .await?;
        if run.schedule.compact {
            self.borg
                .run(
                    access,
                    &os(&[
                        "compact",
                        "--log-json",
                        "--lock-wait",
                        "60",
                        &access.location,
                    ]),
                    None,
                    self.cfg.timeouts.prune,
                    &Progress::default(),
                )
                .await?;
            return Ok("; pruned and compacted".into());
        }
        Ok("; pruned".into())
    }
}

/// Why a source cannot be archived (missing, or not readable: a directory is listed,
/// a file opened), if it cannot.
fn unreadable(path: &Path) -> Option<String> {
    let shown = path.display();
    let opened = std::fs::metadata(path).and_then(|m| {
        if m.is_dir() {
            std::fs::read_dir(path).map(drop)
        } else {
            std::fs::File::open(path).map(drop)
        }
    });
    match opened {
        Ok(()) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Some(format!("source {shown} does not exist"))
        }
        Err(e) => Some(format!("source {shown} cannot be read: {e}")),
    }
}

/// This host's name as borg writes it in lock names.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Holders of a local repository's lock: `(host, pid)` from `lock.exclusive/<host>@<node>.<pid>-<thread>`
/// and the roster.
pub fn lock_holders(repo: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let mut add = |hostid: &str, pid: u32| {
        let host = hostid.split('@').next().unwrap_or_default().to_string();
        if !out.contains(&(host.clone(), pid)) {
            out.push((host, pid));
        }
    };
    if let Ok(rd) = std::fs::read_dir(repo.join("lock.exclusive")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((hostid, rest)) = name.rsplit_once('.') {
                if let Some(pid) = rest.split('-').next().and_then(|p| p.parse().ok()) {
                    add(hostid, pid);
                }
            }
        }
    }
    if let Ok(b) = std::fs::read(repo.join("lock.roster")) {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) {
            for kind in ["exclusive", "shared"] {
                for h in v[kind].as_array().into_iter().flatten() {
                    if let (Some(hostid), Some(pid)) = (h[0].as_str(), h[1].as_u64()) {
                        add(hostid, u32::try_from(pid).unwrap_or(u32::MAX));
                    }
                }
            }
        }
    }
    out
}

/// Live borg processes on this host whose arguments name `location` (`own`: also
/// those this process started).
pub fn borg_users(location: &str, own: bool) -> Vec<u32> {
    borg_uses(location, own)
        .into_iter()
        .map(|b| b.pid)
        .collect()
}

/// [`borg_users`] with the archive each one names (`REPO::ARCHIVE`), if any.
pub fn borg_uses(location: &str, own: bool) -> Vec<ForeignBorg> {
    let me = std::process::id();
    let names = |a: &[u8]| {
        a.starts_with(location.as_bytes())
            && matches!(a.get(location.len()), None | Some(b':') | Some(b'/'))
    };
    let found = converge_core::host::find(|args| {
        let is_borg = args
            .iter()
            .take(2)
            .any(|a| a.ends_with(b"/borg") || *a == b"borg");
        is_borg && args.iter().any(|a| names(a))
    });
    found
        .unwrap_or_default()
        .into_iter()
        .filter(|p| own || converge_core::host::parent_of(p.pid) != Some(me))
        .map(|p| ForeignBorg {
            pid: p.pid,
            archive: p.args.iter().find_map(|a| {
                let rest = a.strip_prefix(location.as_bytes())?.strip_prefix(b"::")?;
                Some(String::from_utf8_lossy(rest).into_owned())
            }),
        })
        .collect()
}

/// What is at a local repository's path: `Ok(true)` a borg repository, `Ok(false)`
/// nothing (or an empty directory: borg initialises it), `Err(why)` something else, which
/// converge never initialises over.
fn local_repository(path: &Path) -> Result<bool, String> {
    let shown = path.display();
    if let Ok(config) = std::fs::read_to_string(path.join("config")) {
        if config.contains("[repository]") {
            return Ok(true);
        }
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("cannot look at {shown}: {e}")),
        Ok(m) if !m.is_dir() => {
            return Err(format!(
                "{shown} exists and is not a directory: not a borg repository"
            ))
        }
        Ok(_) => {}
    }
    match std::fs::read_dir(path).map(|mut d| d.next().is_none()) {
        Ok(true) => Ok(false),
        Ok(false) => Err(format!(
            "{shown} is not empty and is not a borg repository: converge does not initialise over it (empty it, or name another path)"
        )),
        Err(e) => Err(format!("cannot read {shown}: {e}")),
    }
}

impl BackupsDriver for Host {
    fn now(&self) -> DateTime<Utc> {
        (self.cfg.clock)()
    }

    fn agent_start(&self) -> DateTime<Utc> {
        self.started
    }

    fn time_scale(&self) -> u32 {
        self.cfg.time_scale
    }

    fn read_state(&self) -> Result<State, DriverError> {
        self.state.read()
    }

    fn write_state(&self, s: &State) -> Result<(), DriverError> {
        self.state.write(s)
    }

    fn repository(&self, r: &BackupRepository, state: &State) -> Result<RepoObserved, DriverError> {
        let (initialised, unusable) = if r.url.starts_with('/') {
            match local_repository(Path::new(&r.url)) {
                Ok(is) => (is, None),
                Err(why) => (false, Some(why)),
            }
        } else {
            (state.initialised.contains(&r.name), None)
        };
        Ok(RepoObserved {
            initialised,
            foreign_borg: borg_uses(&r.url, false).into_iter().next(),
            unusable,
        })
    }

    async fn init(&self, r: &BackupRepository) -> Result<(), DriverError> {
        let access = self.access(r)?;
        if r.url.starts_with('/') {
            if let Some(parent) = Path::new(&r.url).parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| DriverError::io(format!("create {}", parent.display()), e))?;
            }
        }
        let enc = format!("--encryption={}", r.encryption_mode().as_str());
        let res = self
            .borg
            .run(
                &access,
                &os(&["init", "--log-json", &enc, &r.url]),
                None,
                self.cfg.timeouts.init,
                &Progress::default(),
            )
            .await;
        match res {
            Ok(_) => {
                info!(repository = %r.name, encryption = r.encryption_mode().as_str(), "repository initialised");
                Ok(())
            }
            // Not `PathAlreadyExists`: something else is there, never initialised over.
            Err(DriverError::Failed(m)) if m.contains("Repository.AlreadyExists:") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn backup(&self, run: &BackupRun, progress: &Progress) -> Result<String, DriverError> {
        self.backup_inner(run, progress).await
    }

    async fn restore(
        &self,
        r: &Restore,
        repo: &BackupRepository,
        progress: &Progress,
    ) -> Result<String, DriverError> {
        self.restore_inner(r, repo, progress).await
    }

    async fn export(
        &self,
        e: &Export,
        repo: &BackupRepository,
        progress: &Progress,
    ) -> Result<ExportDone, DriverError> {
        export::run(self, e, repo, progress).await
    }

    fn journaled_restores(&self) -> Vec<String> {
        Host::journaled_restores(self)
    }

    async fn clean_restore(&self, id: &str) -> Result<Cleaned, DriverError> {
        Host::clean_restore(self, id).await
    }
}
