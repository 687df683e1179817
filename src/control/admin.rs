//! The plane's admin socket (`<data>/admin.sock`, 0600 in the 0700 data directory): how
//! `control-plane plan`, `rollout` and `rollouts` reach the running `serve`, which holds
//! every node's connection and drives rollouts (and `token` has a new token shared). One JSON request line per connection,
//! one JSON answer line; only whoever can enter the data directory reaches it.

use super::fleetplan::{PlanQuery, PlanReport};
use super::rollout::{Rollout, RolloutSpec};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Longest request line.
pub const MAX_REQUEST: usize = 64 << 10;

/// `<data>/admin.sock`.
pub fn socket(data: &Path) -> PathBuf {
    data.join("admin.sock")
}

/// What a command asks `serve`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Request {
    /// A fleet-wide dry run.
    Plan(PlanQuery),
    /// Start a staged rollout.
    Rollout(RolloutSpec),
    /// Rollouts, newest first, or the one with `id`.
    Rollouts {
        #[serde(default)]
        id: Option<String>,
    },
    /// Stop a running rollout: no further wave is published.
    Abort { id: String },
    /// Copy the tokens made on this instance to the shared bucket now (`--state nats`).
    ShareTokens,
}

/// `serve`'s answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Reply {
    Plan(PlanReport),
    Rollouts(Vec<Rollout>),
    /// Tokens of this instance still not shared (NATS unreachable).
    Tokens {
        unshared: usize,
    },
}

/// The answer line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Reply>,
}

impl From<anyhow::Result<Reply>> for Answer {
    fn from(r: anyhow::Result<Reply>) -> Self {
        match r {
            Ok(reply) => Answer {
                ok: true,
                error: None,
                reply: Some(reply),
            },
            Err(e) => Answer {
                ok: false,
                error: Some(format!("{e:#}")),
                reply: None,
            },
        }
    }
}

/// Asks the `serve` running with data directory `data` (the command's side).
pub async fn ask(data: &Path, req: &Request) -> anyhow::Result<Reply> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let path = socket(data);
    let mut stream = tokio::net::UnixStream::connect(&path)
        .await
        .with_context(|| {
            format!(
                "connect {} (is `control-plane serve --data {}` running?)",
                path.display(),
                data.display()
            )
        })?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    stream.shutdown().await?;
    let mut answer = String::new();
    tokio::io::BufReader::new(stream)
        .read_line(&mut answer)
        .await
        .context("read the plane's answer")?;
    let a: Answer = serde_json::from_str(&answer).context("the plane's answer")?;
    match (a.ok, a.reply) {
        (true, Some(r)) => Ok(r),
        _ => anyhow::bail!(a.error.unwrap_or_else(|| "the plane gave no answer".into())),
    }
}

/// [`ask`] for a dry run.
pub async fn plan(data: &Path, q: PlanQuery) -> anyhow::Result<PlanReport> {
    match ask(data, &Request::Plan(q)).await? {
        Reply::Plan(r) => Ok(r),
        _ => anyhow::bail!("the plane did not answer the dry run"),
    }
}

/// [`ask`] for rollouts.
pub async fn rollouts(data: &Path, req: Request) -> anyhow::Result<Vec<Rollout>> {
    match ask(data, &req).await? {
        Reply::Rollouts(r) => Ok(r),
        _ => anyhow::bail!("the plane did not answer with rollouts"),
    }
}
