//! The container runtime as the backups driver needs it, through its CLI (podman or
//! docker, optionally against a given API socket): a volume's host mount point, the
//! running containers using a volume, `exec` for hooks, `pause`/`unpause` for a freeze.
//! Reconcilers never import each other, so this does not use the containers crate.

use converge_core::DriverError;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// Which CLI, and the global arguments naming its socket.
#[derive(Clone, Debug)]
pub struct RuntimeCli {
    pub binary: PathBuf,
    pub global_args: Vec<String>,
}

impl RuntimeCli {
    /// Podman against the given libpod socket (`podman --remote --url unix://…`).
    pub fn podman(socket: Option<&std::path::Path>) -> Self {
        Self {
            binary: "podman".into(),
            global_args: socket
                .map(|s| {
                    vec![
                        "--remote".into(),
                        "--url".into(),
                        format!("unix://{}", s.display()),
                    ]
                })
                .unwrap_or_default(),
        }
    }

    /// Docker against the given socket (`docker -H unix://…`).
    pub fn docker(socket: Option<&std::path::Path>) -> Self {
        Self {
            binary: "/usr/bin/docker".into(),
            global_args: socket
                .map(|s| vec!["-H".into(), format!("unix://{}", s.display())])
                .unwrap_or_default(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.binary);
        c.args(&self.global_args)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    async fn output(&self, args: &[&str], timeout: Duration) -> Result<String, DriverError> {
        let what = format!("{} {}", self.binary.display(), args.join(" "));
        let out = tokio::time::timeout(timeout, self.command(args).output())
            .await
            .map_err(|_| DriverError::Timeout {
                op: what.clone(),
                after: timeout,
            })?
            .map_err(|e| DriverError::io(format!("run {what}"), e))?;
        if !out.status.success() {
            let mut err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            err.truncate(500);
            return Err(DriverError::Failed(format!("{what}: {err}")));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The host directory of volume `name`.
    pub async fn volume_path(&self, name: &str) -> Result<PathBuf, DriverError> {
        let p = self
            .output(
                &[
                    "volume",
                    "inspect",
                    "--format",
                    "{{.Mountpoint}}",
                    "--",
                    name,
                ],
                Duration::from_secs(30),
            )
            .await?;
        if !p.starts_with('/') {
            return Err(DriverError::Failed(format!(
                "volume {name}: no host mount point ({p:?})"
            )));
        }
        Ok(PathBuf::from(p))
    }

    /// Creates volume `name` (side-by-side restores) and returns its host directory.
    pub async fn create_volume(&self, name: &str) -> Result<PathBuf, DriverError> {
        self.output(&["volume", "create", "--", name], Duration::from_secs(30))
            .await?;
        self.volume_path(name).await
    }

    /// Removes volume `name` (a side-by-side restore's, cut short).
    pub async fn remove_volume(&self, name: &str) -> Result<(), DriverError> {
        self.output(&["volume", "rm", "--", name], Duration::from_secs(30))
            .await
            .map(|_| ())
    }

    /// Names of the running containers that mount volume `name`.
    pub async fn running_users(&self, name: &str) -> Result<Vec<String>, DriverError> {
        let filter = format!("volume={name}");
        let out = self
            .output(
                &["ps", "--filter", &filter, "--format", "{{.Names}}"],
                Duration::from_secs(30),
            )
            .await?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// The argv that runs `command` inside `container`.
    pub fn exec_argv(&self, container: &str, command: &[String]) -> Vec<String> {
        let mut v = vec![self.binary.display().to_string()];
        v.extend(self.global_args.iter().cloned());
        v.extend(["exec".to_string(), container.to_string()]);
        v.extend(command.iter().cloned());
        v
    }

    pub async fn pause(&self, container: &str, pause: bool) -> Result<(), DriverError> {
        let verb = if pause { "pause" } else { "unpause" };
        self.output(&[verb, container], Duration::from_secs(60))
            .await
            .map(|_| ())
    }
}
