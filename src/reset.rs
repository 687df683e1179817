//! `converge reset [--dry-run] [--purge-state]`: decommissions a node by removing what
//! converge owns on it: managed containers and networks (the containers reconciler's
//! own delete plan against empty `containers`/`networks` sections), the nftables tables
//! `inet converge` and `inet converge_proxy`, the WireGuard interface of the accepted
//! document (and its wireguard-go), the dnsmasq and Caddy processes started from this
//! data directory, and with `--purge-state` the data directory itself. `--dry-run`
//! lists each item and changes nothing.
//!
//! It refuses while an agent answers on the data directory's socket: a running agent
//! would put everything back at its next pass. Stop (and disable) the unit first; reset
//! does not stop it itself, since only the service manager knows how it was started.
//! Without `--purge-state` the store keeps the last document, so an agent started
//! again re-applies it. Backup repositories are never touched.

use crate::agent;
use crate::document::{self, Document, Format};
use crate::engine::{run_once, PassResult};
use crate::limits::Limits;
use crate::registry::{self, HostOptions};
use crate::store::Store;
use converge_dns::driver::DnsDriver;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// The nftables tables converge owns (firewall; routes' switch between the Caddy pair).
pub const TABLES: [&str; 2] = ["converge", "converge_proxy"];

/// Options of `converge reset`.
pub struct ResetOptions<'a> {
    pub data_dir: &'a Path,
    pub host: &'a HostOptions,
    /// The node id containers are labelled with (default: the accepted document's,
    /// else the host name).
    pub node_id: Option<String>,
    pub dry_run: bool,
    pub purge_state: bool,
    pub limits: &'a Limits,
}

/// One thing to remove, as the preview lists it.
#[derive(Debug)]
enum Item {
    /// A change of the containers reconciler's delete plan (`container web`).
    Container(String),
    Table(&'static str),
    /// converge's rule in Docker's `DOCKER-USER` chain.
    DockerUser,
    Interface {
        name: String,
        pids: Vec<u32>,
    },
    Dnsmasq(u32),
    Caddy(Vec<u32>),
    DataDir(PathBuf),
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Item::Container(c) => write!(f, "{c} (containers reconciler)"),
            Item::Table(t) => write!(f, "nftables table inet {t}"),
            Item::DockerUser => write!(
                f,
                "the {} rule \"{}\"",
                converge_firewall::docker::CHAIN,
                converge_firewall::docker::COMMENT
            ),
            Item::Interface { name, pids } if pids.is_empty() => {
                write!(f, "WireGuard interface {name}")
            }
            Item::Interface { name, pids } => {
                write!(f, "WireGuard interface {name} (wireguard-go pid {pids:?})")
            }
            Item::Dnsmasq(pid) => write!(f, "dnsmasq pid {pid}"),
            Item::Caddy(pids) => write!(f, "Caddy pair, pids {pids:?}"),
            Item::DataDir(d) => write!(f, "data directory {}", d.display()),
        }
    }
}

/// The accepted document, if the store holds one that still parses.
fn accepted(data_dir: &Path, limits: &Limits) -> Option<Document> {
    let path = agent::store_path(data_dir);
    if !path.exists() {
        return None;
    }
    let store = Store::open(&path).ok()?;
    let (_, body) = store.last_good().ok()??;
    document::parse_with(&body, Format::Json, limits).ok()
}

/// A document that manages only containers and networks, and wants none of either.
fn empty_workload(base: Option<&Document>, node_id: &str) -> anyhow::Result<Document> {
    let mut doc: Document = match base {
        Some(d) => d.clone(),
        None => serde_json::from_value(serde_json::json!({
            "apiVersion": "converge/v1",
            "node": {"id": node_id, "mode": "worker"},
            "generation": 1,
            "issuedAt": "1970-01-01T00:00:00Z",
        }))?,
    };
    doc.node.id = node_id.to_string();
    doc.containers = Some(Vec::new());
    doc.networks = Some(Vec::new());
    doc.wireguard = None;
    doc.firewall = None;
    doc.dns = None;
    doc.routes = None;
    doc.backups = None;
    doc.metadata = None;
    doc.secrets = None;
    Ok(doc)
}

fn table_exists(table: &str) -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "inet", table])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// SIGTERM, up to 3 s, then SIGKILL.
async fn stop(pids: &[u32]) {
    converge_core::host::stop(pids, Duration::from_secs(3)).await;
}

/// Runs `converge reset`.
pub async fn reset(opts: ResetOptions<'_>) -> anyhow::Result<ExitCode> {
    let sock = agent::socket_path(opts.data_dir);
    if tokio::net::UnixStream::connect(&sock).await.is_ok() {
        eprintln!(
            "refused: an agent is running on {} and would put everything back; stop it first \
             (systemctl disable --now converge converge-proxy)",
            sock.display()
        );
        return Ok(ExitCode::from(1));
    }
    let doc = accepted(opts.data_dir, opts.limits);
    let node_id = match (&opts.node_id, &doc) {
        (Some(id), _) => id.clone(),
        (None, Some(d)) => d.node.id.clone(),
        (None, None) => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
    };
    let mut items = Vec::new();
    let mut problems = Vec::new();

    // Containers and networks: the reconciler's own plan against empty sections.
    let workload = Arc::new(empty_workload(doc.as_ref(), &node_id)?);
    let secrets = converge_core::SecretSource::new(&opts.host.secrets_dir);
    let containers = vec![registry::containers(opts.host, &node_id, &secrets, false)];
    // No runtime socket at all (`--runtime auto`): no container can be running.
    let no_runtime = opts.host.runtime == registry::RuntimeChoice::Auto
        && !opts.host.podman_socket.exists()
        && !opts.host.docker_socket.exists();
    let planned = if no_runtime {
        None
    } else {
        run_once(&containers, workload.clone(), true)
            .await
            .remove("containers")
    };
    match planned {
        Some(PassResult::Ran { changes, .. }) => items.extend(
            changes
                .iter()
                .map(|c| Item::Container(format!("{} {}", c.kind, c.id))),
        ),
        Some(PassResult::Failed { error, .. }) => {
            problems.push(format!("containers: cannot list ({error}); none removed"))
        }
        _ => {}
    }
    for t in TABLES {
        if table_exists(t) {
            items.push(Item::Table(t));
        }
    }
    if converge_firewall::docker::observe().ok()
        == Some(converge_firewall::docker::DockerUser::Present)
    {
        items.push(Item::DockerUser);
    }
    if let Some(w) = doc.as_ref().and_then(|d| d.wireguard.as_ref()) {
        let exists = Path::new("/sys/class/net").join(&w.interface).exists();
        let pids = converge_wireguard::driver::wireguard_go_pids(&w.interface);
        if exists || !pids.is_empty() {
            items.push(Item::Interface {
                name: w.interface.clone(),
                pids,
            });
        }
    }
    let dns = converge_dns::driver::Dnsmasq::new(
        converge_dns::Layout::new(opts.data_dir.join("dns")),
        "dnsmasq",
    );
    match dns.running() {
        Ok(running) => items.extend(running.into_iter().map(|r| Item::Dnsmasq(r.pid))),
        Err(e) => problems.push(format!("dnsmasq: {e}")),
    }
    match converge_routes::driver::process::running(&opts.data_dir.join("caddy")) {
        Ok(pids) if !pids.is_empty() => items.push(Item::Caddy(pids)),
        Ok(_) => {}
        Err(e) => problems.push(format!("caddy: {e}")),
    }
    if opts.purge_state && opts.data_dir.exists() {
        items.push(Item::DataDir(opts.data_dir.to_path_buf()));
    }

    if opts.dry_run {
        if items.is_empty() {
            println!("nothing converge owns was found on this node");
        } else {
            println!("converge reset would remove:");
            for i in &items {
                println!("  - {i}");
            }
        }
        if !opts.purge_state {
            println!(
                "(the data directory {} stays: add --purge-state to remove it)",
                opts.data_dir.display()
            );
        }
        for p in &problems {
            eprintln!("warning: {p}");
        }
        return Ok(ExitCode::SUCCESS);
    }

    // Containers first (they may use the networks, the firewall and DNS), state last.
    if items.iter().any(|i| matches!(i, Item::Container(_))) {
        if let Some(PassResult::Ran { outcomes, .. }) = run_once(&containers, workload, false)
            .await
            .remove("containers")
        {
            for o in outcomes {
                match &o.error {
                    None => println!("removed {}", o.object),
                    Some(e) => problems.push(format!("{}: {e}", o.object)),
                }
            }
        }
    }
    for item in &items {
        let res = match item {
            Item::Container(_) => continue,
            Item::Table(t) => run("nft", &["delete", "table", "inet", t]),
            Item::DockerUser => converge_firewall::docker::remove().map_err(|e| e.to_string()),
            Item::Interface { name, pids } => {
                let r = if Path::new("/sys/class/net").join(name).exists() {
                    run("ip", &["link", "del", "dev", name])
                } else {
                    Ok(())
                };
                stop(pids).await;
                r
            }
            Item::Dnsmasq(pid) => {
                stop(&[*pid]).await;
                Ok(())
            }
            Item::Caddy(pids) => {
                converge_routes::driver::process::stop(pids).await;
                Ok(())
            }
            Item::DataDir(d) => {
                std::fs::remove_dir_all(d).map_err(|e| format!("remove {}: {e}", d.display()))
            }
        };
        match res {
            Ok(()) => println!("removed {item}"),
            Err(e) => problems.push(format!("{item}: {e}")),
        }
    }
    if items.is_empty() {
        println!("nothing converge owns was found on this node");
    }
    for p in &problems {
        eprintln!("failed: {p}");
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
