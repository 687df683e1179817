//! Host access for the DNS reconciler: the real dnsmasq driver and an in-memory fake.

use crate::render::{conf_hash_of, Layout};
use converge_core::fsutil::{read_optional, write_atomic};
use converge_core::host;
use converge_core::{with_timeout, DriverError, HostEvent};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A dnsmasq process started by converge, found by its config file argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    pub pid: u32,
    pub conf_hash: String,
}

/// What the DNS reconciler needs from the host.
pub trait DnsDriver: Send + Sync + 'static {
    fn layout(&self) -> &Layout;
    fn read_hosts(&self) -> Result<Option<String>, DriverError>;
    fn write_hosts(&self, content: &str) -> Result<(), DriverError>;
    /// Our config files by hash.
    fn read_confs(&self) -> Result<BTreeMap<String, String>, DriverError>;
    fn write_conf(&self, hash: &str, content: &str) -> Result<(), DriverError>;
    /// Removes config files of hashes other than `keep`.
    fn remove_stale_confs(&self, keep: &str) -> Result<(), DriverError>;
    /// Every dnsmasq process running one of our config files.
    fn running(&self) -> Result<Vec<Running>, DriverError>;
    /// Stops `old` processes, then starts dnsmasq on the config `hash`.
    fn restart(
        &self,
        old: &[Running],
        hash: &str,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// An event naming the file whenever one of our files changes on disk (drift, or
    /// our own write), and one when a dnsmasq `running` found exits.
    fn file_events(&self) -> Option<BoxStream<'static, HostEvent>> {
        None
    }
}

/// The real driver: files under the layout's directory, dnsmasq processes on this host.
pub struct Dnsmasq {
    layout: Layout,
    binary: PathBuf,
    /// The dnsmasq pids observe last found, for the exit watch (a killed dnsmasq is
    /// started again at once, not at the next resync).
    pids: tokio::sync::watch::Sender<Vec<u32>>,
}

const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(3);

impl Dnsmasq {
    pub fn new(layout: Layout, binary: impl Into<PathBuf>) -> Self {
        Self {
            layout,
            binary: binary.into(),
            pids: tokio::sync::watch::Sender::new(Vec::new()),
        }
    }

    fn ensure_dirs(&self) -> Result<(), DriverError> {
        use std::os::unix::fs::DirBuilderExt;
        for d in [self.layout.dir.clone(), self.layout.hosts_dir()] {
            // 0755: dnsmasq drops privileges and must still read its hosts directory
            // (set explicitly: the agent's umask is 077).
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&d)
                .and_then(|()| {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))
                })
                .map_err(|e| DriverError::io(format!("create {}", d.display()), e))?;
        }
        Ok(())
    }

    fn conf_files(&self) -> Result<Vec<PathBuf>, DriverError> {
        let dir = &self.layout.dir;
        match std::fs::read_dir(dir) {
            Ok(entries) => Ok(entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| conf_hash_of(p).is_some())
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(DriverError::io(format!("list {}", dir.display()), e)),
        }
    }

    fn conf_prefix(&self) -> String {
        format!("--conf-file={}/dnsmasq-", self.layout.dir.display())
    }
}

fn read(path: &Path) -> Result<Option<String>, DriverError> {
    read_optional(path).map_err(|e| DriverError::io(format!("read {}", path.display()), e))
}

fn write(path: &Path, content: &str) -> Result<(), DriverError> {
    write_atomic(path, content.as_bytes(), 0o644)
        .map_err(|e| DriverError::io(format!("write {}", path.display()), e))
}

impl DnsDriver for Dnsmasq {
    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn read_hosts(&self) -> Result<Option<String>, DriverError> {
        read(&self.layout.hosts_file())
    }

    fn write_hosts(&self, content: &str) -> Result<(), DriverError> {
        self.ensure_dirs()?;
        write(&self.layout.hosts_file(), content)
    }

    fn read_confs(&self) -> Result<BTreeMap<String, String>, DriverError> {
        let mut confs = BTreeMap::new();
        for p in self.conf_files()? {
            if let (Some(hash), Some(content)) = (conf_hash_of(&p), read(&p)?) {
                confs.insert(hash, content);
            }
        }
        Ok(confs)
    }

    fn write_conf(&self, hash: &str, content: &str) -> Result<(), DriverError> {
        self.ensure_dirs()?;
        write(&self.layout.conf_file(hash), content)
    }

    fn remove_stale_confs(&self, keep: &str) -> Result<(), DriverError> {
        for p in self.conf_files()? {
            if conf_hash_of(&p).is_some_and(|h| h != keep) {
                std::fs::remove_file(&p)
                    .map_err(|e| DriverError::io(format!("remove {}", p.display()), e))?;
            }
        }
        Ok(())
    }

    fn running(&self) -> Result<Vec<Running>, DriverError> {
        // Scan /proc instead of trusting the pid file: an instance orphaned by a crash
        // mid-restart is found too, by the config argument only converge passes.
        let prefix = self.conf_prefix();
        let prefix = prefix.as_bytes();
        let procs = host::find(|args| args.iter().any(|a| a.starts_with(prefix)))
            .map_err(|e| DriverError::io("list /proc", e))?;
        let mut found = Vec::new();
        for p in procs {
            for arg in &p.args {
                if let Some(hash) = arg
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.strip_suffix(b".conf"))
                {
                    found.push(Running {
                        pid: p.pid,
                        conf_hash: String::from_utf8_lossy(hash).into_owned(),
                    });
                }
            }
        }
        let pids: Vec<u32> = found.iter().map(|r| r.pid).collect();
        self.pids.send_if_modified(|seen| {
            let changed = *seen != pids;
            *seen = pids;
            changed
        });
        Ok(found)
    }

    async fn restart(&self, old: &[Running], hash: &str) -> Result<(), DriverError> {
        let pids: Vec<u32> = old.iter().map(|r| r.pid).collect();
        host::stop(&pids, STOP_GRACE).await;
        let conf = self.layout.conf_file(hash);
        let log = self.layout.dir.join("dnsmasq.start.log");
        let stderr = std::fs::File::create(&log)
            .map_err(|e| DriverError::io(format!("create {}", log.display()), e))?;
        // Its own systemd scope when systemd runs the host: outside the agent's cgroup.
        let unit = format!("converge-dnsmasq-{}", hash.get(..12).unwrap_or(hash));
        let mut cmd = host::daemon_command(&self.binary, &unit, None);
        cmd.arg(format!("--conf-file={}", conf.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr);
        let mut child = host::spawn_detached(cmd)
            .map_err(|e| DriverError::io(format!("spawn {}", self.binary.display()), e))?;
        // dnsmasq forks into the background; the parent exits once the daemon has
        // bound its sockets, with a non-zero status if it could not.
        let status = with_timeout("dnsmasq start", START_TIMEOUT, async {
            child
                .wait()
                .await
                .map_err(|e| DriverError::io("wait for dnsmasq", e))
        })
        .await?;
        if !status.success() {
            let msg = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(DriverError::Failed(format!(
                "dnsmasq exited with {status}: {}",
                msg.trim()
            )));
        }
        Ok(())
    }

    fn file_events(&self) -> Option<BoxStream<'static, HostEvent>> {
        let watch = || -> std::io::Result<BoxStream<'static, HostEvent>> {
            self.ensure_dirs().map_err(std::io::Error::other)?;
            let names = host::dir_watch(&[&self.layout.hosts_dir(), &self.layout.dir])?;
            // Only our own files matter (not dnsmasq's pid/log files or temp names).
            Ok(names
                .filter_map(|name| {
                    let name = name.to_string_lossy().into_owned();
                    std::future::ready(
                        (name == "converge.hosts"
                            || (name.starts_with("dnsmasq-") && name.ends_with(".conf")))
                        .then(|| HostEvent(format!("file {name}"))),
                    )
                })
                .boxed())
        };
        // dnsmasq's exit (kill -9 leaves its pid file, so no file event says it).
        let exits = host::exit_events("dnsmasq", self.pids.subscribe());
        match watch() {
            Ok(s) => Some(futures::stream::select(s, exits).boxed()),
            Err(e) => {
                tracing::warn!(error = %e, "no inotify on the dns directory: file drift is repaired at resync only");
                Some(exits)
            }
        }
    }
}

#[cfg(test)]
pub mod fake;
