//! Running borg: the passphrase through `BORG_PASSPHRASE_FD` (a pipe whose read end only
//! the child inherits; never argv, never the environment), `--log-json` progress parsed
//! into status text, typed errors from borg's JSON log, per-operation timeouts.

use converge_core::DriverError;
use serde::Deserialize;
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{debug, info};

/// Environment variables that could carry a passphrase or change what borg reads;
/// never passed on from the agent's own environment.
const SCRUBBED: [&str; 6] = [
    "BORG_PASSPHRASE",
    "BORG_PASSCOMMAND",
    "BORG_NEW_PASSPHRASE",
    "BORG_PASSPHRASE_FD",
    "BORG_REPO",
    "BORG_KEY_FILE",
];

/// Where borg runs and keeps its cache/security/config files.
#[derive(Clone, Debug)]
pub struct Borg {
    pub binary: PathBuf,
    /// `BORG_BASE_DIR`: converge's borg cache and security data, under its data dir.
    pub base_dir: PathBuf,
}

/// What one borg call needs to reach a repository. `Debug` never shows the passphrase.
#[derive(Clone)]
pub struct Access {
    pub location: String,
    pub passphrase: Option<String>,
    /// SSH private key file for `ssh://` repositories.
    pub ssh_key: Option<PathBuf>,
    /// A key file written for this access from a sealed secret: removed when the last
    /// clone of the access is dropped.
    pub key_file: Option<std::sync::Arc<KeyFile>>,
}

/// A private key written out (0600) because ssh reads keys from files only; removed on
/// drop.
#[derive(Debug)]
pub struct KeyFile(pub PathBuf);

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("location", &self.location)
            .field(
                "passphrase",
                &self.passphrase.as_deref().map(converge_core::redact),
            )
            .field("ssh_key", &self.ssh_key)
            .finish()
    }
}

/// Live progress of a borg operation, shared with the status.
#[derive(Clone, Debug, Default)]
pub struct Progress(Arc<Mutex<String>>);

impl Progress {
    pub fn set(&self, s: String) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }
    pub fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Counters of a finished `borg create`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub files: u64,
    pub bytes: u64,
    pub deduplicated: u64,
}

/// A finished borg call.
#[derive(Debug)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stats: Stats,
    /// borg's warnings (it exited 1).
    pub warnings: Warnings,
}

/// borg's warnings of one call: the first few of each kind, and how many there were.
#[derive(Clone, Debug, Default)]
pub struct Warnings {
    pub count: usize,
    pub first: Vec<String>,
    /// Those that mean missing data (see [`warning_fails`]).
    pub failing_count: usize,
    pub failing: Vec<String>,
}

impl Warnings {
    fn push(&mut self, msg: String) {
        self.count += 1;
        if warning_fails(&msg) {
            self.failing_count += 1;
            if self.failing.len() < MAX_WARNINGS {
                self.failing.push(cut(msg.clone()));
            }
        }
        if self.first.len() < MAX_WARNINGS {
            self.first.push(cut(msg));
        }
    }

    /// `3 borg warning(s): a; b; c`, the failing ones first.
    pub fn describe(&self) -> String {
        let (count, list) = if self.failing_count > 0 {
            (self.failing_count, &self.failing)
        } else {
            (self.count, &self.first)
        };
        let more = if count > list.len() { "; …" } else { "" };
        format!("{count} borg warning(s): {}{more}", list.join("; "))
    }
}

/// One line of `--log-json` output (the fields converge reads).
#[derive(Deserialize)]
struct LogLine {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    original_size: Option<u64>,
    #[serde(default)]
    deduplicated_size: Option<u64>,
    #[serde(default)]
    nfiles: Option<u64>,
    #[serde(default)]
    finished: Option<bool>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    levelname: Option<String>,
    #[serde(default)]
    msgid: Option<String>,
    #[serde(default)]
    current: Option<u64>,
    #[serde(default)]
    total: Option<u64>,
}

/// `1.2 GB` style sizes for the status.
pub fn human(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// The passphrase pipe: its read end is inherited by the child only (cleared
/// close-on-exec between fork and exec); the passphrase is written before the spawn,
/// so a passphrase under the pipe buffer (64 KiB) never blocks.
fn passphrase_pipe(passphrase: &str) -> Result<OwnedFd, DriverError> {
    if passphrase.len() > 4096 {
        return Err(DriverError::Failed("passphrase over 4096 bytes".into()));
    }
    let (reader, mut writer) =
        std::io::pipe().map_err(|e| DriverError::io("create the passphrase pipe", e))?;
    writer
        .write_all(passphrase.as_bytes())
        .map_err(|e| DriverError::io("write the passphrase pipe", e))?;
    drop(writer);
    Ok(OwnedFd::from(reader))
}

/// A secret file's value as borg expects it: without the trailing newline.
pub fn trim_secret(s: &str) -> &str {
    s.strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .unwrap_or(s)
}

impl Borg {
    /// The command for `args` against `access`; the returned fd must stay open until
    /// the child is spawned.
    pub fn command(
        &self,
        access: &Access,
        args: &[OsString],
    ) -> Result<(Command, Option<OwnedFd>), DriverError> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(args);
        for v in SCRUBBED {
            cmd.env_remove(v);
        }
        cmd.env("BORG_BASE_DIR", &self.base_dir)
            .env("BORG_HOSTNAME_IS_UNIQUE", "yes")
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "no")
            .env("BORG_CHECK_I_KNOW_WHAT_I_AM_DOING", "NO")
            .env("BORG_DELETE_I_KNOW_WHAT_I_AM_DOING", "NO")
            .env("BORG_DISPLAY_PASSPHRASE", "no")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(key) = &access.ssh_key {
            cmd.env(
                "BORG_RSH",
                format!(
                    "ssh -i {} -o BatchMode=yes -o IdentitiesOnly=yes",
                    key.display()
                ),
            );
        }
        let fd = match &access.passphrase {
            Some(p) => {
                let fd = passphrase_pipe(trim_secret(p))?;
                let raw = fd.as_raw_fd();
                cmd.env("BORG_PASSPHRASE_FD", raw.to_string());
                // SAFETY: between fork and exec only async-signal-safe calls: fcntl.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::fcntl(raw, libc::F_SETFD, 0) == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                Some(fd)
            }
            None => None,
        };
        Ok((cmd, fd))
    }

    /// Spawns borg with stdout piped (for `export-tar … -`) and stderr piped (the export
    /// module drains it and quotes its end when borg fails).
    pub fn spawn_stdout(&self, access: &Access, args: &[OsString]) -> Result<Child, DriverError> {
        let (mut cmd, fd) = self.command(access, args)?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .map_err(|e| DriverError::io(format!("run {}", self.binary.display()), e))?;
        drop(fd);
        Ok(child)
    }

    /// Runs borg to completion (killed after `timeout`: SIGTERM, then SIGKILL 10 s
    /// later), reporting `--log-json` progress into `progress`. `cwd` is the working
    /// directory (extract). Exit 1 (warning) counts as success, as borg documents.
    pub async fn run(
        &self,
        access: &Access,
        args: &[OsString],
        cwd: Option<&Path>,
        timeout: Duration,
        progress: &Progress,
    ) -> Result<Output, DriverError> {
        let op = args
            .first()
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (mut cmd, fd) = self.command(access, args)?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| DriverError::io(format!("run {}", self.binary.display()), e))?;
        // The child has its copy of the read end now.
        drop(fd);
        let pid = child.id();
        debug!(op = %op, pid, repository = %access.location, "borg started");
        let stderr = child.stderr.take();
        let stdout = child.stdout.take();
        let started = Instant::now();
        let errors = Arc::new(Mutex::new(Vec::<String>::new()));
        let warnings = Arc::new(Mutex::new(Warnings::default()));
        let stats = Arc::new(Mutex::new(Stats::default()));
        let logged = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let read_err = {
            let (errors, stats, progress) = (errors.clone(), stats.clone(), progress.clone());
            let warnings = warnings.clone();
            let logged = logged.clone();
            let op = op.clone();
            async move {
                let Some(stderr) = stderr else { return };
                let mut lines = BufReader::new(stderr).lines();
                let mut last_log = Instant::now();
                while let Ok(Some(line)) = lines.next_line().await {
                    let Ok(l) = serde_json::from_str::<LogLine>(&line) else {
                        push_error(&errors, line);
                        continue;
                    };
                    match l.kind.as_str() {
                        "archive_progress" if l.finished != Some(true) => {
                            logged.store(true, std::sync::atomic::Ordering::Relaxed);
                            let bytes = l.original_size.unwrap_or(0);
                            let files = l.nfiles.unwrap_or(0);
                            let secs = started.elapsed().as_secs_f64().max(0.001);
                            *stats.lock().unwrap_or_else(|p| p.into_inner()) = Stats {
                                files,
                                bytes,
                                deduplicated: l.deduplicated_size.unwrap_or(0),
                            };
                            let text = format!(
                                "{}, {files} files, {}/s",
                                human(bytes),
                                human((bytes as f64 / secs) as u64)
                            );
                            if last_log.elapsed() >= Duration::from_secs(10) {
                                info!(op = %op, bytes, files, rate = (bytes as f64 / secs) as u64, "borg progress");
                                last_log = Instant::now();
                            }
                            progress.set(text);
                        }
                        "progress_percent" => {
                            logged.store(true, std::sync::atomic::Ordering::Relaxed);
                            if let (Some(c), Some(t)) = (l.current, l.total) {
                                let pct = (c * 100).checked_div(t).unwrap_or(100);
                                progress.set(format!("{pct} % of {}", human(t)));
                            }
                        }
                        "log_message" => {
                            let level = l.levelname.unwrap_or_default();
                            let msg = l.message.unwrap_or_default();
                            let msg = match l.msgid {
                                Some(id) => format!("{id}: {msg}"),
                                None => msg,
                            };
                            match level.as_str() {
                                "ERROR" | "CRITICAL" => push_error(&errors, msg),
                                "WARNING" => {
                                    warnings.lock().unwrap_or_else(|p| p.into_inner()).push(msg)
                                }
                                _ => {}
                            }
                        }
                        _ => {}
                    }
                }
            }
        };
        let read_out = async move {
            let mut buf = Vec::new();
            if let Some(mut o) = stdout {
                use tokio::io::AsyncReadExt;
                let _ = o.read_to_end(&mut buf).await;
            }
            buf
        };
        // Progress without `--progress` (which costs borg create ~10 % of its time
        // here): what borg has read so far (`rchar` in /proc/<pid>/io), every 2 s.
        // Progress lines, when borg prints them (extract), take precedence.
        let poll = {
            let progress = progress.clone();
            let logged = logged.clone();
            let op = op.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(2));
                let mut last_log = Instant::now();
                loop {
                    tick.tick().await;
                    let Some(bytes) = pid.and_then(read_chars) else {
                        continue;
                    };
                    if logged.load(std::sync::atomic::Ordering::Relaxed) {
                        continue;
                    }
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    let rate = (bytes as f64 / secs) as u64;
                    progress.set(format!("{} read, {}/s", human(bytes), human(rate)));
                    if last_log.elapsed() >= Duration::from_secs(10) {
                        info!(op = %op, bytes, rate, "borg progress");
                        last_log = Instant::now();
                    }
                }
            }
        };
        let wait = async {
            let join = Box::pin(async { tokio::join!(read_err, read_out, child.wait()) });
            let (_, out, status) = match futures::future::select(join, Box::pin(poll)).await {
                futures::future::Either::Left((r, _)) => r,
                futures::future::Either::Right(((), join)) => join.await,
            };
            (out, status)
        };
        let (out, status) = match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => {
                if let Some(pid) = pid {
                    // SIGTERM lets borg release its lock and write a checkpoint.
                    converge_core::host::signal(pid, converge_core::host::Signal::TERM);
                }
                if tokio::time::timeout(Duration::from_secs(10), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
                return Err(DriverError::Timeout {
                    op: format!("borg {op}"),
                    after: timeout,
                });
            }
        };
        let status = status.map_err(|e| DriverError::io(format!("wait for borg {op}"), e))?;
        let stats = *stats.lock().unwrap_or_else(|p| p.into_inner());
        let warnings = std::mem::take(&mut *warnings.lock().unwrap_or_else(|p| p.into_inner()));
        match status.code() {
            Some(0) | Some(1) => Ok(Output {
                stdout: out,
                stats,
                warnings,
            }),
            code => {
                let mut errs = errors.lock().unwrap_or_else(|p| p.into_inner()).join("; ");
                if errs.is_empty() && warnings.count > 0 {
                    errs = warnings.describe();
                }
                Err(DriverError::Failed(format!(
                    "borg {op} failed ({}): {}",
                    code.map_or_else(|| "killed by a signal".to_string(), |c| format!("exit {c}")),
                    if errs.is_empty() { "no message" } else { &errs }
                )))
            }
        }
    }
}

/// Bytes `pid` has read so far (`rchar` of /proc/<pid>/io).
fn read_chars(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
}

/// How many of borg's warnings a run keeps (a noisy borg never grows memory).
const MAX_WARNINGS: usize = 5;

/// One line of borg's output, cut to a size fit for a status (on a char boundary).
fn cut(mut line: String) -> String {
    if line.len() > 500 {
        let mut at = 500;
        while !line.is_char_boundary(at) {
            at -= 1;
        }
        line.truncate(at);
    }
    line
}

/// Keeps the last few error lines of a run (bounded: a noisy borg never grows memory).
fn push_error(errors: &Mutex<Vec<String>>, line: String) {
    let mut e = errors.lock().unwrap_or_else(|p| p.into_inner());
    if e.len() >= 5 {
        e.remove(0);
    }
    e.push(cut(line));
}

/// Whether a warning of `borg create` means data the operator asked for is missing (the
/// run failed). Harmless: a file that changed while it was read, or one removed between
/// the directory walk and its read (normal churn; a source itself that is gone is found
/// by the driver's own check). Anything else (a file that cannot be read, an I/O error,
/// an unknown warning) fails the run.
pub fn warning_fails(message: &str) -> bool {
    !(message.ends_with("file changed while we backed it up")
        || message.contains("[Errno 2] No such file or directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(999), "999 B");
        assert_eq!(human(1_234_567), "1.2 MB");
    }

    #[test]
    fn access_debug_redacts() {
        let a = Access {
            location: "/r".into(),
            passphrase: Some("hunter2".into()),
            ssh_key: None,
            key_file: None,
        };
        assert!(!format!("{a:?}").contains("hunter2"));
        assert_eq!(trim_secret("pw\n"), "pw");
        assert_eq!(trim_secret("pw\r\n"), "pw");
        assert_eq!(trim_secret("pw"), "pw");
    }

    #[test]
    fn which_warnings_fail_a_backup() {
        // Churn while borg reads: the archive is as good as it can be.
        assert!(!warning_fails(
            "/srv/data/log: file changed while we backed it up"
        ));
        assert!(!warning_fails(
            "/srv/data/tmp/x: [Errno 2] No such file or directory: 'x'"
        ));
        // An unreadable file, an I/O error, anything unknown.
        assert!(warning_fails(
            "/srv/data/key: [Errno 13] Permission denied: 'key'"
        ));
        assert!(warning_fails("/etc/x: [Errno 5] Input/output error"));
        assert!(warning_fails("something new"));
        let mut w = Warnings::default();
        w.push("/a: file changed while we backed it up".into());
        assert_eq!(
            w.describe(),
            "1 borg warning(s): /a: file changed while we backed it up"
        );
        w.push("/b: [Errno 13] Permission denied".into());
        assert_eq!((w.count, w.failing_count), (2, 1));
        assert_eq!(
            w.describe(),
            "1 borg warning(s): /b: [Errno 13] Permission denied"
        );
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let line = "é".repeat(400);
        let cut = cut(line);
        assert!(cut.len() <= 500 && cut.chars().all(|c| c == 'é'));
    }
}
