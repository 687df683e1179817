//! Command line: argument definitions and the commands (validate, schema, diff, apply,
//! agent, push, status, events, reset, wireguard rotate-key, metadata inspect, join,
//! control-plane …; the hidden generate).
//!
//! `args.rs` the clap definitions, `local.rs` the commands that work on this host's
//! state directly (apply, wireguard rotate-key and their helpers), `plane.rs` the
//! reference control plane's commands; `run` dispatches.

mod args;
mod local;
mod plane;

pub use args::*;
use local::*;
use plane::*;

use crate::agent::{self, AgentOptions};
use crate::document::{self, Document, Format, Mode};
use crate::engine::{journal, run_once, EngineConfig, PassResult};
use crate::limits::{self, Limits};
use crate::output::{self, OutputFormat};
use crate::registry::{self, HostOptions};
use crate::status::{self, ReconcilerStatus, State};
use crate::store::Store;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Runs the parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let color = std::io::stdout().is_terminal();
    let limits = cli.limits.limits();
    match cli.command {
        Command::Validate { file, output } => Ok(match document::load(&file, &limits)? {
            Ok(doc) => {
                match output {
                    OutputFormat::Text => {
                        println!("{}: valid (generation {})", file.display(), doc.generation)
                    }
                    OutputFormat::Json => println!(
                        "{}",
                        serde_json::json!({"valid": true, "generation": doc.generation})
                    ),
                }
                ExitCode::SUCCESS
            }
            Err(problems) => {
                print_problems(&file, &problems, output);
                ExitCode::from(1)
            }
        }),
        Command::Schema => {
            print!("{}", crate::schema::json());
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff {
            file,
            reconciler,
            output,
        } => {
            // The node's fingerprints of secrets, so the diff's agree with the status.
            crate::privacy::load_redaction_key(&cli.data_dir, false)?;
            let Some(doc) = load_valid(&file, output, &limits)? else {
                return Ok(ExitCode::from(1));
            };
            let secrets = secret_source(&cli.data_dir, &cli.host, &doc)?;
            if let Some(r) = &reconciler {
                if !registry::ALL.contains(&r.as_str()) {
                    anyhow::bail!(
                        "unknown reconciler {r:?}; known: {}",
                        registry::ALL.join(", ")
                    );
                }
            }
            let (results, unbuilt) = registry::diff(
                &cli.data_dir,
                &cli.host,
                doc,
                &secrets,
                reconciler.as_deref(),
            )
            .await;
            match output {
                OutputFormat::Text => print!("{}", output::plan_text(&results, &unbuilt, color)),
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&output::plan_json(&results))?
                ),
            }
            let failed = results
                .values()
                .any(|r| matches!(r, PassResult::Failed { .. }));
            Ok(ExitCode::from(if failed {
                1
            } else if output::has_changes(&results) {
                2
            } else {
                0
            }))
        }
        Command::Apply { file, output } => {
            crate::privacy::load_redaction_key(&cli.data_dir, false)?;
            apply(&cli.data_dir, &cli.host, &file, output, color, &limits).await
        }
        Command::Agent {
            proxy,
            node_id,
            resync_secs,
            socket_group,
            max_document_age_days,
            metrics_listen,
        } => {
            let engine = EngineConfig {
                resync: Duration::from_secs(resync_secs.max(1)),
                ..Default::default()
            };
            let node_id = match node_id {
                Some(id) => id,
                None => hostname()?,
            };
            agent::run(AgentOptions {
                data_dir: cli.data_dir,
                host: cli.host,
                node_id,
                proxy,
                engine,
                limits,
                socket: crate::privacy::SocketAccess::new(socket_group.as_deref())?,
                max_document_age: Duration::from_secs(max_document_age_days.saturating_mul(86_400)),
                metrics_listen,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Push { file } => {
            // Bounded read; the size is checked here too so that an oversized file is
            // refused without a round trip. Everything else is the agent's to check.
            let refused = match limits::read_file(&file, &limits)
                .with_context(|| format!("cannot read {}", file.display()))?
            {
                Ok(bytes) if bytes.len() <= limits.max_document_bytes => Ok(bytes),
                // Not a regular file, read up to the limit + 1.
                Ok(_) => Err(limits::too_large(&limits)),
                Err(p) => Err(p),
            };
            let bytes = match refused {
                Ok(bytes) => bytes,
                Err(p) => {
                    let problems = converge_core::Problems(vec![p]);
                    print_problems(&file, &problems, OutputFormat::Text);
                    return Ok(ExitCode::from(1));
                }
            };
            let yaml = Format::from_path(&file) == Format::Yaml;
            let resp = agent::push(&cli.data_dir, yaml, &bytes).await?;
            if resp.ok {
                println!(
                    "accepted generation {}",
                    resp.generation.unwrap_or_default()
                );
                return Ok(ExitCode::SUCCESS);
            }
            if !resp.problems.is_empty() {
                print_problems(&file, &resp.problems, OutputFormat::Text);
            }
            if let Some(e) = resp.error {
                eprintln!("refused: {e}");
            }
            Ok(ExitCode::from(1))
        }
        Command::Status { output } => {
            // The running agent answers (readable by members of --socket-group, who
            // cannot read the store); when none does, the store's last state is shown
            // as such, with exit code 3.
            let (resp, running) = match agent::request(&cli.data_dir, &agent::Request::Status).await
            {
                Ok(resp) if resp.ok => (resp, true),
                Ok(resp) => anyhow::bail!(
                    "the agent refused: {}",
                    resp.error.unwrap_or_else(|| "no reason given".into())
                ),
                Err(e) => {
                    let store = Store::open(&agent::store_path(&cli.data_dir))
                        .with_context(|| format!("{e:#}; and cannot open the store"))?;
                    (agent::stored_status(&store)?, false)
                }
            };
            let agent_state = if running { "running" } else { "not running" };
            match output {
                OutputFormat::Text => {
                    match &resp.agent {
                        _ if !running => println!(
                            "agent: not running (no answer on {}): the last state it stored, not converging",
                            agent::socket_path(&cli.data_dir).display()
                        ),
                        Some(a) => println!(
                            "agent: running converge {}, pid {}, since {}, {}",
                            a.version,
                            a.pid,
                            a.started_at,
                            if a.ready {
                                "ready".to_string()
                            } else {
                                format!("{} first passes running", a.first_passes_pending)
                            }
                        ),
                        None => println!("agent: running"),
                    }
                    for w in &resp.warnings {
                        println!("warning: {w}");
                    }
                    print!(
                        "{}",
                        if running {
                            output::status_text(resp.generation, &resp.statuses, color)
                        } else {
                            output::stored_status_text(resp.generation, &resp.statuses)
                        }
                    );
                    if let Some(c) = &resp.control {
                        println!("{}", control_line(c));
                    }
                }
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "agent": agent_state,
                        "agentInfo": resp.agent,
                        "generation": resp.generation,
                        "reconcilers": resp.statuses,
                        "control": resp.control,
                        "warnings": resp.warnings,
                    }))?
                ),
            }
            Ok(if running {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Command::Wireguard {
            command: WireguardCommand::RotateKey { interface },
        } => rotate_key(&cli.data_dir, interface, &limits),
        Command::Metadata {
            command: MetadataCommand::Inspect { project },
        } => {
            let resp =
                agent::request(&cli.data_dir, &agent::Request::MetadataInspect { project }).await?;
            match resp.metadata {
                Some(m) if resp.ok => {
                    println!("{}", serde_json::to_string_pretty(&m)?);
                    Ok(ExitCode::SUCCESS)
                }
                _ => {
                    eprintln!("{}", resp.error.unwrap_or_else(|| "no answer".into()));
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Join {
            url,
            token,
            name,
            proxy,
            force,
            ca,
            plane_key,
            insecure_http,
        } => {
            let ca_pem = read_pem(ca.as_deref())?;
            let name = match name {
                Some(n) => n,
                None => hostname()?,
            };
            let config = crate::control::enroll::join(
                &cli.data_dir,
                &cli.host,
                crate::control::enroll::JoinOptions {
                    url: &url,
                    token: &token,
                    name,
                    proxy,
                    force,
                    ca_pem,
                    plane_key,
                    insecure_http,
                },
            )
            .await?;
            println!("{}", config.node_id);
            eprintln!(
                "enrolled as {:?}; documents over {}; start (or restart) `converge agent`",
                config.node_id,
                config.transport.describe()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::ControlPlane { command } => control_plane(command, limits).await,
        Command::Reset {
            dry_run,
            purge_state,
            node_id,
        } => {
            crate::reset::reset(crate::reset::ResetOptions {
                data_dir: &cli.data_dir,
                host: &cli.host,
                node_id,
                dry_run,
                purge_state,
                limits: &limits,
            })
            .await
        }
        Command::Generate { what, dir } => {
            crate::generate::generate(what, &dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Events {
            follow,
            limit,
            output,
        } => crate::events::run(&cli.data_dir, follow, limit, output).await,
    }
}

/// `control: connected (nats …) since T` / `control: disconnected since T (…); the last
/// good document stays in force`.
fn control_line(c: &crate::control::transport::ControlState) -> String {
    if c.connected {
        format!("control: connected ({}) since {}", c.transport, c.since)
    } else {
        format!(
            "control: disconnected ({}) since {}{}; converging the last good document",
            c.transport,
            c.since,
            c.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )
    }
}

fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("cannot read the host name; pass --node-id")?;
    Ok(name.trim().to_string())
}

/// Sets up tracing on stderr: readable by default, JSON with `--log-format json`.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONVERGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}
