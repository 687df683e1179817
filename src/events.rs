//! `converge events [--follow] [--output json]`: the agent's event journal for an
//! operator: what changed, why (the pass's trigger), when, from which generation.
//! Read through the agent socket (members of `--socket-group` may, the store is root's
//! only); `--follow` asks again every second for the events after the last one shown.

use crate::agent::{self, Request};
use crate::output::OutputFormat;
use crate::store::Event;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// How often `--follow` asks the agent for new events.
const POLL: Duration = Duration::from_secs(1);
/// Most events one follow request returns.
const BATCH: u32 = 1000;

/// One event as a line: `AT  RECONCILER  OBJECT: MESSAGE  (REASON, generation G)`.
pub fn line(e: &Event) -> String {
    let mut why = Vec::new();
    if !e.reason.is_empty() {
        why.push(e.reason.clone());
    }
    if let Some(g) = e.generation {
        why.push(format!("generation {g}"));
    }
    let why = if why.is_empty() {
        String::new()
    } else {
        format!("  ({})", why.join(", "))
    };
    format!(
        "{}  {:<10} {}: {}{why}",
        e.at, e.reconciler, e.object, e.message
    )
}

fn print(events: &[Event], output: OutputFormat) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for e in events {
        let text = match output {
            OutputFormat::Text => line(e),
            // One JSON object per line, so a follow stream can be piped to jq.
            OutputFormat::Json => serde_json::to_string(e)?,
        };
        if writeln!(out, "{text}").is_err() {
            // A closed pipe (`| head`): stop quietly.
            return Ok(());
        }
    }
    let _ = out.flush();
    Ok(())
}

async fn ask(data_dir: &Path, req: &Request) -> anyhow::Result<Vec<Event>> {
    let resp = agent::request(data_dir, req).await?;
    if !resp.ok {
        anyhow::bail!(
            "the agent refused: {}",
            resp.error.unwrap_or_else(|| "no reason given".into())
        );
    }
    Ok(resp.events)
}

/// The newest `limit` events from the store itself (root, when no agent answers).
fn stored(data_dir: &Path, limit: u32) -> anyhow::Result<Vec<Event>> {
    let store = crate::store::Store::open(&agent::store_path(data_dir))?;
    let mut events = store.events(usize::try_from(limit).unwrap_or(usize::MAX))?;
    events.reverse();
    Ok(events)
}

/// Prints the newest `limit` events, then (with `follow`) new ones as they come. When
/// no agent answers, the store's journal is printed (said so on stderr).
pub async fn run(
    data_dir: &Path,
    follow: bool,
    limit: u32,
    output: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let first = match ask(data_dir, &Request::Events { after: None, limit }).await {
        Ok(events) => events,
        Err(e) if agent::store_path(data_dir).exists() => {
            let events = stored(data_dir, limit).map_err(|s| e.context(s))?;
            eprintln!("agent not running: the journal as stored");
            events
        }
        Err(e) => return Err(e),
    };
    print(&first, output)?;
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    let mut last = first.last().map_or(0, |e| e.id);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            _ = tokio::time::sleep(POLL) => {}
        }
        let req = Request::Events {
            after: Some(last),
            limit: BATCH,
        };
        match ask(data_dir, &req).await {
            Ok(events) => {
                if let Some(e) = events.last() {
                    last = e.id;
                }
                print(&events, output)?;
            }
            // The agent restarting: keep following.
            Err(e) => tracing::debug!(error = %e, "events: agent not answering"),
        }
    }
}
