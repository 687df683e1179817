//! The Caddy processes converge runs (one per instance of the pair): started detached
//! (`caddy start` forks `caddy run` and exits once it is up, so Caddy outlives the
//! agent) as an unprivileged user (`user.rs`) with a cleared environment, found again
//! by scanning `/proc` for its config argument, and watched with pidfds so an exit is
//! an event.

use super::pair::admin_listen;
use super::user::{self, RunAs};
use converge_core::fsutil::write_atomic;
use converge_core::host;
use converge_core::{with_timeout, DriverError};
use serde_json::{json, Value};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(5);

fn config_file(dir: &Path) -> PathBuf {
    dir.join("caddy.json")
}

/// The configuration Caddy starts with: the admin endpoint only. Routes are added by
/// the pass that started it, so a start never depends on a route Caddy might refuse.
pub fn bootstrap(dir: &Path) -> Value {
    json!({
        "admin": {
            "listen": admin_listen(dir),
            // Caddy's own copy would only go stale: the document is the source of truth.
            "config": {"persist": false},
        }
    })
}

/// `caddy version` of `binary` (first word), `None` if it cannot be run.
pub fn version(binary: &Path) -> Option<String> {
    let out = std::process::Command::new(binary)
        .arg("version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().map(str::to_string)
}

/// `v2.11.7` or `2.6.2` → (2, 11).
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.trim_start_matches('v').split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Every `caddy run` process on our config file. Scanning /proc (not a pid file) also
/// finds one a crashed agent left behind.
pub fn running(dir: &Path) -> Result<Vec<u32>, DriverError> {
    let conf = config_file(dir);
    let conf = conf.as_os_str().as_encoded_bytes();
    let found = host::find(|args| {
        let is_run = args.get(1).is_some_and(|a| *a == b"run");
        is_run && args.windows(2).any(|w| w[0] == b"--config" && w[1] == conf)
    })
    .map_err(|e| DriverError::io("list /proc", e))?;
    Ok(found.into_iter().map(|p| p.pid).collect())
}

/// Stops `stop` (SIGTERM, then SIGKILL after a grace).
pub async fn stop(stop: &[u32]) {
    host::stop(stop, STOP_GRACE).await;
}

/// Environment variables Caddy is given from the agent's (the rest is not passed on:
/// the agent's environment is none of Caddy's business).
const PASSED_ENV: &[&str] = &[
    "PATH",
    "TZ",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// The directories a start needs, owned as described in `user.rs`: `shared` root's and
/// 0711; its `data` and `config` (certificates, shared by both instances) and the
/// instance's `dir` Caddy's user's, 0700.
fn prepare_dirs(dir: &Path, shared: &Path, run_as: Option<&RunAs>) -> Result<(), DriverError> {
    user::ensure_dir(shared, 0o711)?;
    for d in [
        shared.join("data"),
        shared.join("config"),
        dir.to_path_buf(),
    ] {
        user::ensure_dir(&d, 0o700)?;
        if let Some(u) = run_as {
            user::chown_tree(&d, u)?;
        }
    }
    if let Some(u) = run_as {
        user::check_reachable(u, dir)?;
    }
    Ok(())
}

/// Starts the Caddy of `dir` on the bootstrap configuration, its certificates and local
/// CA under `shared` (both instances use the same), as `run_as` (`None`: the agent's
/// own user); returns once its admin endpoint is up.
pub async fn start(
    binary: &Path,
    dir: &Path,
    shared: &Path,
    run_as: Option<&RunAs>,
) -> Result<(), DriverError> {
    // A pid file of an earlier run (possibly root's) is not Caddy's to overwrite;
    // processes are found through /proc anyway.
    let _ = std::fs::remove_file(dir.join("caddy.pid"));
    prepare_dirs(dir, shared, run_as)?;
    let conf = config_file(dir);
    let text = serde_json::to_vec_pretty(&bootstrap(dir))
        .map_err(|e| DriverError::Failed(format!("encode bootstrap config: {e}")))?;
    write_atomic(&conf, &text, 0o600)
        .map_err(|e| DriverError::io(format!("write {}", conf.display()), e))?;
    if let Some(u) = run_as {
        // Read by Caddy itself (`caddy run --config`).
        std::os::unix::fs::chown(&conf, Some(u.uid), Some(u.gid))
            .map_err(|e| DriverError::io(format!("chown {}", conf.display()), e))?;
    }
    // A stale socket file makes Caddy's listen fail.
    let _ = std::fs::remove_file(dir.join("admin.sock"));
    // Root's, 0600: Caddy writes to the descriptor it is handed, never opens the file.
    let log_path = dir.join("caddy.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|e| DriverError::io(format!("open {}", log_path.display()), e))?;
    log.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| DriverError::io(format!("chmod {}", log_path.display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| DriverError::io("duplicate log handle", e))?;
    // Its own systemd scope when systemd runs the host (outside the agent's cgroup),
    // started as `run_as`.
    let instance = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut cmd = host::daemon_command(
        binary,
        &format!("converge-caddy-{instance}"),
        run_as.map(|u| (u.uid, u.gid)),
    );
    cmd.env_clear();
    for (k, v) in std::env::vars_os().filter(|(k, _)| PASSED_ENV.iter().any(|p| k == *p)) {
        cmd.env(k, v);
    }
    cmd.arg("start")
        .arg("--config")
        .arg(&conf)
        .arg("--pidfile")
        .arg(dir.join("caddy.pid"))
        // Certificates and the local CA under converge's directory, not a home.
        .env("HOME", shared.join("data"))
        .env("XDG_DATA_HOME", shared.join("data"))
        .env("XDG_CONFIG_HOME", shared.join("config"))
        // The admin endpoint a wiped configuration falls back to (honoured by 2.7+;
        // 2.6 falls back to localhost:2019, and converge then restarts it).
        .env("CADDY_ADMIN", admin_listen(dir))
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2);
    // Its own session: a signal to the agent's process group does not reach Caddy.
    let mut child = host::spawn_detached(cmd)
        .map_err(|e| DriverError::io(format!("spawn {} start", binary.display()), e))?;
    // `caddy start` exits 0 once the background `caddy run` has loaded its config.
    let status = with_timeout("caddy start", START_TIMEOUT, async {
        child
            .wait()
            .await
            .map_err(|e| DriverError::io("wait for caddy start", e))
    })
    .await?;
    if !status.success() {
        let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(5).collect();
        return Err(DriverError::Failed(format!(
            "caddy start exited with {status}: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    Ok(())
}
