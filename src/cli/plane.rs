//! `converge control-plane …`: the reference control plane's commands.

use super::*;
use crate::control::protocol::Shards;

/// `converge control-plane …`.
pub(super) async fn control_plane(
    command: ControlPlaneCommand,
    limits: Limits,
) -> anyhow::Result<ExitCode> {
    use crate::control::plane;
    match command {
        ControlPlaneCommand::Serve {
            dir,
            data,
            listen,
            public_url,
            nats,
            nats_public_url,
            nats_auth_file,
            nats_pid_file,
            nats_replicas,
            nats_ca,
            tls_cert,
            tls_key,
            insecure_http,
            artifacts,
            fleet_page,
            state,
            nats_shards,
        } => {
            let nats = match nats {
                Some(url) => Some(plane::NatsOptions {
                    public_url: nats_public_url.unwrap_or_else(|| url.clone()),
                    url,
                    key: plane::nats_key(&data)?,
                    auth_file: nats_auth_file.ok_or_else(|| {
                        anyhow::anyhow!(
                            "--nats needs --nats-auth-file (per-node users are written there)"
                        )
                    })?,
                    pid_files: nats_pid_file,
                    replicas: usize::from(nats_replicas),
                    ca_pem: read_pem(nats_ca.as_deref())?,
                    shared_state: state == PlaneState::Nats,
                    shards: plane::shards(&data, nats_shards)?,
                }),
                None => None,
            };
            plane::serve(plane::ServeOptions {
                docs: dir,
                data,
                listen,
                public_url,
                nats,
                limits,
                tls: tls_cert.zip(tls_key),
                insecure_http,
                artifacts,
                fleet_page,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        ControlPlaneCommand::Token {
            data,
            ttl_secs,
            name,
        } => {
            let scope = crate::control::plane_store::TokenScope {
                node: name
                    .as_deref()
                    .map(crate::control::protocol::sanitize_node_id),
                reenroll: false,
            };
            let token = plane::new_token(&data, ttl_secs, &scope)?;
            share_token(&data).await;
            println!("{token}");
            join_hint(&data, &token, name.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        ControlPlaneCommand::Nodes {
            command:
                Some(NodesCommand::ReEnroll {
                    name,
                    data,
                    ttl_secs,
                }),
            ..
        } => {
            let id = crate::control::protocol::sanitize_node_id(&name);
            let store = crate::control::plane_store::PlaneStore::open(&plane::db_path(&data))?;
            if store.node(&id)?.is_none() {
                anyhow::bail!("no enrolled node {id:?} (a new node needs `control-plane token`)");
            }
            let scope = crate::control::plane_store::TokenScope {
                node: Some(id),
                reenroll: true,
            };
            let token = plane::new_token(&data, ttl_secs, &scope)?;
            share_token(&data).await;
            println!("{token}");
            join_hint(&data, &token, Some(&name))?;
            Ok(ExitCode::SUCCESS)
        }
        ControlPlaneCommand::Nodes {
            data,
            output,
            command: None,
        } => {
            let data = data.ok_or_else(|| anyhow::anyhow!("--data DIR is required"))?;
            let nodes =
                crate::control::plane_store::PlaneStore::open(&plane::db_path(&data))?.nodes()?;
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&nodes)?),
                OutputFormat::Text => print!("{}", nodes_text(&nodes)),
            }
            Ok(ExitCode::SUCCESS)
        }
        ControlPlaneCommand::RotateKey { data } => {
            let old = plane::keys(&data)?.signing.verifying_key();
            let new = plane::rotate_key(&data)?.signing.verifying_key();
            println!(
                "signing key rotated: {} -> {}",
                crate::control::identity::fingerprint(&old),
                crate::control::identity::fingerprint(&new)
            );
            eprintln!("a running `control-plane serve` signs every document again within a second; new joins pin the new key");
            Ok(ExitCode::SUCCESS)
        }
        ControlPlaneCommand::Plan {
            dir,
            data,
            nodes,
            timeout,
            output,
        } => {
            // `serve` may run from another directory.
            let dir = std::fs::canonicalize(&dir)
                .with_context(|| format!("documents directory {}", dir.display()))?;
            let query = crate::control::fleetplan::PlanQuery {
                dir,
                nodes,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            };
            let report = crate::control::admin::plan(&data, query).await?;
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                OutputFormat::Text => print!("{}", report.text()),
            }
            Ok(ExitCode::from(report.exit_code()))
        }
        ControlPlaneCommand::Rollout {
            dir,
            data,
            nodes,
            canary,
            batch,
            wait,
            revert,
            detach,
            output,
        } => {
            use crate::control::admin::{self, Request};
            let dir = std::fs::canonicalize(&dir)
                .with_context(|| format!("documents directory {}", dir.display()))?;
            let spec = crate::control::rollout::RolloutSpec {
                dir,
                nodes,
                canary,
                batch,
                wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                revert,
            };
            let mut r = admin::rollouts(&data, Request::Rollout(spec))
                .await?
                .pop()
                .ok_or_else(|| anyhow::anyhow!("the plane did not say which rollout started"))?;
            let text = output == OutputFormat::Text;
            if text {
                println!(
                    "rollout {}: {} node(s) in {} wave(s)",
                    r.id,
                    r.waves.iter().map(|w| w.nodes.len()).sum::<usize>(),
                    r.waves.len()
                );
            }
            if !detach {
                r = follow_rollout(&data, r, text).await?;
            }
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&r)?),
                OutputFormat::Text if detach => {}
                OutputFormat::Text => print!("{}", r.text()),
            }
            Ok(ExitCode::from(if detach { 0 } else { r.exit_code() }))
        }
        ControlPlaneCommand::Rollouts {
            command: Some(RolloutsCommand::Abort { id, data }),
            ..
        } => {
            use crate::control::admin::{self, Request};
            for r in admin::rollouts(&data, Request::Abort { id }).await? {
                print!("{}", r.text());
            }
            Ok(ExitCode::SUCCESS)
        }
        ControlPlaneCommand::Rollouts {
            data,
            id,
            output,
            command: None,
        } => {
            let data = data.ok_or_else(|| anyhow::anyhow!("--data DIR is required"))?;
            // From the store: readable while `serve` is down.
            let store = crate::control::plane_store::PlaneStore::open(&plane::db_path(&data))?;
            let list = store.rollouts(id.as_deref(), 20)?;
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                OutputFormat::Text if list.is_empty() => println!("no rollouts"),
                OutputFormat::Text => list.iter().for_each(|r| print!("{}", r.text())),
            }
            Ok(ExitCode::SUCCESS)
        }
        ControlPlaneCommand::Sign { data, node, file } => {
            let store = crate::control::plane_store::PlaneStore::open(&plane::db_path(&data))?;
            let record = store
                .node(&node)?
                .ok_or_else(|| anyhow::anyhow!("no enrolled node {node:?}"))?;
            let (_, bytes) = plane::build_envelope(&plane::keys(&data)?, &file, &record, &limits)?;
            println!("{}", String::from_utf8_lossy(&bytes));
            Ok(ExitCode::SUCCESS)
        }
        ControlPlaneCommand::NatsAuth { data, out } => {
            let key = plane::nats_key(&data)?;
            let store = crate::control::plane_store::PlaneStore::open(&plane::db_path(&data))?;
            let shards = plane::recorded_shards(&data)?.unwrap_or(Shards::ONE);
            plane::write_nats_authorization(&store, &key, &out, shards)?;
            eprintln!(
                "wrote {} (control plane {}, {} node(s))",
                out.display(),
                key.public,
                store.nodes()?.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        ControlPlaneCommand::Conformance {
            url,
            ca,
            token,
            plane_key,
            name,
        } => {
            let checks = crate::control::conformance::run(crate::control::conformance::Options {
                url,
                ca_pem: read_pem(ca.as_deref())?,
                token,
                plane_key,
                name,
                limits,
            })
            .await?;
            for c in &checks {
                println!("{c}");
            }
            let failed = checks
                .iter()
                .filter(|c| c.outcome == crate::control::conformance::Outcome::Fail)
                .count();
            println!(
                "{} checks: {} passed, {failed} failed, {} skipped",
                checks.len(),
                checks
                    .iter()
                    .filter(|c| c.outcome == crate::control::conformance::Outcome::Pass)
                    .count(),
                checks
                    .iter()
                    .filter(|c| c.outcome == crate::control::conformance::Outcome::Skip)
                    .count()
            );
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        ControlPlaneCommand::Put {
            nats,
            data,
            nats_ca,
            node,
            file,
        } => {
            let bytes = std::fs::read(&file).with_context(|| format!("read {}", file.display()))?;
            let ca = read_pem(nats_ca.as_deref())?;
            let key = plane::nats_key(&data)?;
            let shards = plane::recorded_shards(&data)?.unwrap_or(Shards::ONE);
            plane::put(&nats, &key, ca.as_deref(), shards, &node, bytes).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Follows a rollout until it ends, printing each wave's line when it changes (`text`).
async fn follow_rollout(
    data: &std::path::Path,
    mut r: crate::control::rollout::Rollout,
    text: bool,
) -> anyhow::Result<crate::control::rollout::Rollout> {
    use crate::control::admin::{self, Request};
    let mut shown: Vec<String> = vec![String::new(); r.waves.len()];
    loop {
        for (i, seen) in shown.iter_mut().enumerate() {
            let line = r.wave_line(i);
            if r.waves[i].started_ms.is_some() && *seen != line {
                if text {
                    println!("{line}");
                }
                *seen = line;
            }
        }
        if r.phase.is_done() {
            return Ok(r);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let id = Some(r.id.clone());
        r = admin::rollouts(data, Request::Rollouts { id })
            .await?
            .pop()
            .ok_or_else(|| anyhow::anyhow!("the rollout is gone from the plane"))?;
    }
}

pub(super) fn nodes_text(nodes: &[crate::control::plane_store::NodeRecord]) -> String {
    use std::fmt::Write;
    let g = |v: Option<u64>| v.map(|g| g.to_string()).unwrap_or_else(|| "-".into());
    let mut out = format!(
        "{:<20} {:>8} {:>9}  {:<24} {:<20} CONDITIONS\n",
        "NODE", "ACCEPTED", "CONVERGED", "LAST SEEN", "VERSION"
    );
    for n in nodes {
        let conditions: Vec<String> = n
            .reconcilers()
            .iter()
            .map(|r| {
                format!(
                    "{}={}",
                    r["reconciler"].as_str().unwrap_or("?"),
                    r["state"].as_str().unwrap_or("?")
                )
            })
            .collect();
        let version = n.version();
        let _ = writeln!(
            out,
            "{:<20} {:>8} {:>9}  {:<24} {:<20} {}",
            n.id,
            g(n.accepted_generation),
            g(n.converged_generation),
            n.last_seen.as_deref().unwrap_or("never"),
            version,
            conditions.join(" ")
        );
        if let Some(r) = &n.refused {
            let _ = writeln!(
                out,
                "{:<20} refused generation {}: {}",
                "",
                r["generation"],
                r["error"].as_str().unwrap_or_default()
            );
        }
    }
    out
}

/// The join command for a new token, on stderr (stdout carries the token alone, for
/// scripts): with the plane's key fingerprint, so the node pins the right key.
pub(super) fn join_hint(data: &Path, token: &str, name: Option<&str>) -> anyhow::Result<()> {
    let key = crate::control::plane::keys(data)?.signing.verifying_key();
    eprintln!(
        "join with: converge join --url https://<control plane> --token {token} --plane-key {}{}",
        crate::control::identity::fingerprint(&key),
        name.map(|n| format!(" --name {n}")).unwrap_or_default()
    );
    Ok(())
}

/// The PEM text of `path`, if given.
pub(super) fn read_pem(path: Option<&Path>) -> anyhow::Result<Option<String>> {
    path.map(|p| std::fs::read_to_string(p).with_context(|| format!("read {}", p.display())))
        .transpose()
}

/// Has a running `serve` with shared state (`--state nats`) copy a new token to the
/// shared bucket at once, so every instance enrolls with it from now on. Without a
/// running `serve` there is nothing to do: an instance shares its tokens when it starts.
async fn share_token(data: &std::path::Path) {
    use crate::control::admin::{ask, Reply, Request};
    if let Ok(Reply::Tokens { unshared }) = ask(data, &Request::ShareTokens).await {
        if unshared > 0 {
            eprintln!(
                "warning: the plane cannot reach NATS: the token is not shared with its \
                 other instances yet (it will be once NATS answers)"
            );
        }
    }
}
