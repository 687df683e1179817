//! Command line: argument definitions and the commands (validate, schema, diff, apply,
//! agent, push, status, events, reset, wireguard rotate-key, metadata inspect, join,
//! control-plane …; the hidden generate).

use crate::agent::{self, AgentOptions};
use crate::document::{self, Document, Format, Mode};
use crate::engine::{journal, run_once, EngineConfig, PassResult};
use crate::limits::{self, Limits};
use crate::output::{self, OutputFormat};
use crate::registry::{self, HostOptions};
use crate::status::{self, Failures, ReconcilerStatus, State};
use crate::store::Store;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "converge",
    version = crate::VERSION,
    about = "Converges this host to a desired-state document"
)]
pub struct Cli {
    /// Configuration file: one key per `converge agent` flag (src/config.rs); the
    /// command line and CONVERGE_* variables override it.
    #[arg(
        long,
        global = true,
        env = "CONVERGE_CONFIG",
        default_value = crate::config::DEFAULT_PATH
    )]
    pub config: PathBuf,
    /// Agent state directory (store, socket, reconciler files).
    #[arg(
        long,
        global = true,
        env = "CONVERGE_DATA_DIR",
        default_value = "/var/lib/converge"
    )]
    pub data_dir: PathBuf,
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "CONVERGE_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub host: HostOptions,
    #[command(flatten)]
    pub limits: LimitOptions,
    #[command(subcommand)]
    pub command: Command,
}

/// Input limits (see `src/limits.rs`), applied wherever a document is read: `validate`,
/// `diff`, `apply` and `push` on this side, the agent on its socket.
#[derive(clap::Args, Clone, Debug)]
pub struct LimitOptions {
    /// Largest document accepted, in bytes (default 16 MiB).
    #[arg(
        long,
        global = true,
        env = "CONVERGE_MAX_DOCUMENT_BYTES",
        default_value_t = limits::DEFAULT_MAX_DOCUMENT_BYTES as u64,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_document_bytes: u64,
    /// Most items in one array, or entries in one object, of a document.
    #[arg(
        long,
        global = true,
        env = "CONVERGE_MAX_ITEMS",
        default_value_t = limits::DEFAULT_MAX_ITEMS as u64,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_items: u64,
    /// Longest string (or object key) in a document, in bytes (default 64 KiB).
    #[arg(
        long,
        global = true,
        env = "CONVERGE_MAX_STRING_BYTES",
        default_value_t = limits::DEFAULT_MAX_STRING_BYTES as u64,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_string_bytes: u64,
}

impl LimitOptions {
    pub fn limits(&self) -> Limits {
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Limits {
            max_document_bytes: size(self.max_document_bytes),
            max_items: size(self.max_items),
            max_string_bytes: size(self.max_string_bytes),
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate a document (JSON or YAML); exit 1 listing every problem.
    Validate {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Print the document's JSON Schema.
    Schema,
    /// Dry run: show what applying FILE would change on this host. Exit 0 = no
    /// changes, 2 = changes, 1 = error.
    Diff {
        file: PathBuf,
        /// Only this reconciler.
        #[arg(long)]
        reconciler: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Converge once to FILE and print per-reconciler results; exit 1 if any is Degraded.
    Apply {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Run the node agent.
    Agent {
        /// Run as a proxy node (TLS and public routes).
        #[arg(
            long,
            env = "CONVERGE_PROXY",
            value_parser = clap::builder::BoolishValueParser::new()
        )]
        proxy: bool,
        /// This node's id: documents for another node are refused, and containers are
        /// labelled with it. Defaults to the host name.
        #[arg(long, env = "CONVERGE_NODE_ID")]
        node_id: Option<String>,
        /// Seconds between drift-repair passes.
        #[arg(long, env = "CONVERGE_RESYNC_SECS", default_value_t = 60)]
        resync_secs: u64,
        /// Members of this group may push documents and read the status through the
        /// agent socket (0660 root:GROUP); without it only root may.
        #[arg(long, env = "CONVERGE_SOCKET_GROUP")]
        socket_group: Option<String>,
        /// Status warns when the document in force was issued longer ago (0: never).
        #[arg(long, env = "CONVERGE_MAX_DOCUMENT_AGE_DAYS", default_value_t = 30)]
        max_document_age_days: u64,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464); off
        /// by default.
        #[arg(long, env = "CONVERGE_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Decommission this node: remove what converge owns (managed containers and
    /// networks, nftables tables inet converge and inet converge_proxy, the WireGuard
    /// interface, dnsmasq, the Caddy pair). Refused while the agent runs: stop it first.
    Reset {
        /// List what would be removed, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also remove the data directory (store, keys, enrollment).
        #[arg(long)]
        purge_state: bool,
        /// The node id containers are labelled with (default: the accepted document's).
        #[arg(long)]
        node_id: Option<String>,
    },
    /// Write man pages or shell completions into DIR (for packaging).
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: crate::generate::What,
        dir: PathBuf,
    },
    /// The event journal (what changed, why, when), oldest first, as the running agent
    /// keeps it; `--follow` keeps printing new events.
    Events {
        /// Keep printing new events until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// How many of the newest events to print first.
        #[arg(short = 'n', long, default_value_t = 50)]
        limit: u32,
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Hand a document to the running agent.
    Push { file: PathBuf },
    /// Show the accepted generation and each reconciler's status, as the running agent
    /// reports it. Exit 3 when no agent answers (the last state it stored is shown).
    Status {
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// WireGuard: the node's key.
    Wireguard {
        #[command(subcommand)]
        command: WireguardCommand,
    },
    /// Metadata: inspect what the node serves (through the agent socket; root only).
    Metadata {
        #[command(subcommand)]
        command: MetadataCommand,
    },
    /// Enroll this node with a control plane (one-time registration token). The agent
    /// then receives signed documents from it; `push` stays the operator's local path.
    Join {
        /// The control plane's URL (e.g. https://cp.example:8443).
        #[arg(long)]
        url: String,
        /// One-time registration token (`converge control-plane token`).
        #[arg(long, env = "CONVERGE_JOIN_TOKEN")]
        token: String,
        /// Node name to ask for (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// This node is a proxy.
        #[arg(long)]
        proxy: bool,
        /// Enroll again with new keys although this node is enrolled.
        #[arg(long)]
        force: bool,
        /// PEM file of the certificate (or CA) to trust for the control plane's HTTPS,
        /// besides the public roots; pinned in control.json.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The control plane's signing key (`SHA256:…`, as `control-plane serve` and
        /// `control-plane token` print it): enrollment fails if the plane answers with
        /// another.
        #[arg(long, env = "CONVERGE_PLANE_KEY")]
        plane_key: Option<String>,
        /// Allow enrolling over plain http:// (the plane's key is then unauthenticated:
        /// give --plane-key).
        #[arg(long)]
        insecure_http: bool,
    },
    /// The reference control plane.
    ControlPlane {
        #[command(subcommand)]
        command: ControlPlaneCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodesCommand {
    /// Print a one-time token that gives the enrolled node NAME new keys (its next
    /// `converge join --force` with it); the only way a node's keys are replaced.
    ReEnroll {
        name: String,
        #[arg(long)]
        data: PathBuf,
        /// Seconds the token stays valid.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: i64,
    },
}

#[derive(Subcommand, Debug)]
pub enum MetadataCommand {
    /// Print one project as stored: index, rate limit, token hash prefix, every entry.
    Inspect { project: String },
}

#[derive(Subcommand, Debug)]
// Parsed once per process: the size of one variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum ControlPlaneCommand {
    /// Serve enrollment and documents from DIR (`<node-id>.json|yaml`, republished when
    /// a file changes); over NATS JetStream with --nats, else over HTTPS long poll.
    Serve {
        /// Documents, one file per node id; plaintext `secrets` values are sealed to the
        /// node on the way out.
        #[arg(long)]
        dir: PathBuf,
        /// Control-plane state (signing key, tokens, nodes, status).
        #[arg(long)]
        data: PathBuf,
        /// HTTP listen address (enrollment; documents and status without --nats).
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        /// URL nodes use to reach this server (default http://<listen>).
        #[arg(long)]
        public_url: Option<String>,
        /// NATS server URL: documents in the KV bucket `converge`, status on
        /// `converge.status.<node>`.
        #[arg(long)]
        nats: Option<String>,
        /// NATS URL handed to nodes (default: --nats).
        #[arg(long)]
        nats_public_url: Option<String>,
        #[arg(long, default_value = "converge-cp")]
        nats_user: String,
        #[arg(long, env = "CONVERGE_NATS_PASSWORD", default_value = "")]
        nats_password: String,
        /// Authorization file included by nats-server; rewritten on each enrollment.
        #[arg(long)]
        nats_auth_file: Option<PathBuf>,
        /// nats-server's pid file (SIGHUP reloads the authorization file).
        #[arg(long)]
        nats_pid_file: Option<PathBuf>,
        /// PEM of the CA of the NATS server's certificate (a tls:// URL requires TLS).
        #[arg(long)]
        nats_ca: Option<PathBuf>,
        /// TLS certificate chain (PEM): serve HTTPS. Needs --tls-key.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Enroll nodes over plain HTTP (without --tls-cert): only behind a
        /// TLS-terminating proxy, or on a network you trust.
        #[arg(long)]
        insecure_http: bool,
        /// More files to serve, signed, at /v1/artifacts/NAME besides this binary (a
        /// pinned Caddy `caddy-<version>-<arch>`, other converge releases).
        #[arg(long)]
        artifacts: Option<PathBuf>,
    },
    /// Print a new one-time registration token: for the node NAME (`--name`), or for
    /// any new node (the id its join asks for, if no node has it yet).
    Token {
        #[arg(long)]
        data: PathBuf,
        /// Seconds the token stays valid.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: i64,
        /// The only node this token enrolls (normalised to its id).
        #[arg(long)]
        name: Option<String>,
    },
    /// Enrolled nodes: accepted and converged generation, conditions, last seen.
    #[command(args_conflicts_with_subcommands = true)]
    Nodes {
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: OutputFormat,
        #[command(subcommand)]
        command: Option<NodesCommand>,
    },
    /// Replace the signing key: a rotation statement signed by the old key goes with
    /// every envelope from now on, and a running `serve` signs every node's document
    /// again with the new key. Nodes move their pinned key on it and refuse the old one.
    RotateKey {
        #[arg(long)]
        data: PathBuf,
    },
    /// Print the signed envelope of FILE for NODE (secrets sealed to it).
    Sign {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        node: String,
        file: PathBuf,
    },
    /// Put an envelope (JSON file) under NODE's key of the NATS KV bucket as is.
    Put {
        #[arg(long)]
        nats: String,
        #[arg(long, default_value = "converge-cp")]
        nats_user: String,
        #[arg(long, env = "CONVERGE_NATS_PASSWORD", default_value = "")]
        nats_password: String,
        /// PEM of the CA of the NATS server's certificate (a tls:// URL requires TLS).
        #[arg(long)]
        nats_ca: Option<PathBuf>,
        #[arg(long)]
        node: String,
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum WireguardCommand {
    /// Replace this node's generated private key (or create it) and print the new public
    /// key. A running agent sets it on the interface at once; tunnels stay down until
    /// each peer has the new public key (hand it to the control plane).
    RotateKey {
        /// The interface whose key to rotate (default: the accepted document's).
        #[arg(long)]
        interface: Option<String>,
    },
}

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
            let mut sections = registry::sections(
                &cli.data_dir,
                &cli.host,
                &doc.node.id,
                EngineConfig::default().resync,
                &secrets,
            );
            let mut unbuilt = unbuilt_sections(&doc, &sections);
            if let Some(r) = &reconciler {
                if !registry::ALL.contains(&r.as_str()) {
                    anyhow::bail!(
                        "unknown reconciler {r:?}; known: {}",
                        registry::ALL.join(", ")
                    );
                }
                // A reconciler that uses facts (container addresses) is planned with
                // them: the publishers run too, and only its plan is shown.
                let watches = sections.iter().any(|s| s.name() == r && s.watches_facts());
                sections.retain(|s| s.name() == r || (watches && !s.watches_facts()));
                unbuilt.retain(|u| u == r);
            }
            let mut results = run_once(&sections, Arc::new(doc), true).await;
            if let Some(r) = &reconciler {
                results.retain(|name, _| name == r);
            }
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

/// `converge wireguard rotate-key`: writes a new key file for the interface and prints
/// its public key; the agent watches the key directory and applies it at once. Refused
/// when the accepted document takes this interface's key from a secret.
fn rotate_key(
    data_dir: &Path,
    interface: Option<String>,
    limits: &Limits,
) -> anyhow::Result<ExitCode> {
    let accepted = accepted_document(data_dir, limits)?;
    let section = accepted.as_ref().and_then(|d| d.wireguard.as_ref());
    let iface = match (interface, section) {
        (Some(i), _) => i,
        (None, Some(w)) => w.interface.clone(),
        (None, None) => anyhow::bail!(
            "the accepted document has no wireguard section; name the interface with --interface"
        ),
    };
    if !converge_wireguard::is_interface_name(&iface) {
        anyhow::bail!("{iface:?} is not an interface name (1-15 characters of [a-zA-Z0-9_=+.-])");
    }
    if let Some(w) = section.filter(|w| w.interface == iface) {
        if let Some(secret) = &w.private_key_secret {
            eprintln!(
                "refused: the document takes the key of {iface} from secret {secret:?}; replace that secret instead"
            );
            return Ok(ExitCode::from(1));
        }
    }
    crate::privacy::prepare_data_dir(data_dir)?;
    let public = converge_wireguard::rotate_key(data_dir, &iface)?;
    println!("{}", public.to_base64());
    let running = std::os::unix::net::UnixStream::connect(agent::socket_path(data_dir)).is_ok();
    eprintln!(
        "{iface}: new key written to {}; {}. Peers must get the new public key before they can handshake again.",
        converge_wireguard::key_path(data_dir, &iface).display(),
        if running {
            "the running agent sets it on the interface now"
        } else {
            "the agent sets it on the interface when it next runs"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Secrets for one-shot commands: local files, then the document's sealed values opened
/// with this node's key (when it has one). Values stay in memory.
fn secret_source(
    data_dir: &Path,
    host: &HostOptions,
    doc: &Document,
) -> anyhow::Result<converge_core::SecretSource> {
    let source = converge_core::SecretSource::new(&host.secrets_dir);
    if doc.secrets.as_ref().is_some_and(|s| !s.is_empty()) {
        let identity = crate::control::identity::Identity::load(data_dir)
            .context("the document has sealed secrets but this node has no sealing key")?;
        source.set_sealed(crate::control::sealed::open_all(
            identity.sealing_secret(),
            doc.secrets.as_ref(),
        )?);
    }
    Ok(source)
}

/// The accepted document, if the store has one that still parses.
fn accepted_document(data_dir: &Path, limits: &Limits) -> anyhow::Result<Option<Document>> {
    let path = agent::store_path(data_dir);
    if !path.exists() {
        return Ok(None);
    }
    let store = Store::open(&path).context("open store")?;
    Ok(match store.last_good()? {
        Some((_, body)) => document::parse_with(&body, Format::Json, limits).ok(),
        None => None,
    })
}

fn print_problems(file: &Path, problems: &converge_core::Problems, output: OutputFormat) {
    match output {
        OutputFormat::Text => eprint!(
            "{}",
            output::problems_text(&file.display().to_string(), problems)
        ),
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({"valid": false, "problems": problems})
        ),
    }
}

fn load_valid(
    file: &Path,
    output: OutputFormat,
    limits: &Limits,
) -> anyhow::Result<Option<Document>> {
    match document::load(file, limits)? {
        Ok(d) => Ok(Some(d)),
        Err(problems) => {
            print_problems(file, &problems, output);
            Ok(None)
        }
    }
}

/// Sections present in the document whose reconciler this build does not have yet.
fn unbuilt_sections(
    doc: &Document,
    sections: &[Arc<dyn crate::engine::Section>],
) -> Vec<&'static str> {
    registry::ALL
        .into_iter()
        .filter(|n| registry::has_section(doc, n) && !sections.iter().any(|s| s.name() == *n))
        .collect()
}

/// `converge apply`: store the document (refusing an older generation), converge once,
/// verify with a second dry pass, record statuses.
async fn apply(
    data_dir: &Path,
    host: &HostOptions,
    file: &Path,
    output: OutputFormat,
    color: bool,
    limits: &Limits,
) -> anyhow::Result<ExitCode> {
    let Some(doc) = load_valid(file, output, limits)? else {
        return Ok(ExitCode::from(1));
    };
    crate::privacy::prepare_data_dir(data_dir)?;
    let mut store = Store::open(&agent::store_path(data_dir)).context("open store")?;
    let canonical = serde_json::to_string(&doc)?;
    match store.last_good()? {
        // Re-applying the accepted document repairs drift; anything else must be newer.
        Some((g, body)) if g == doc.generation && body == canonical => {}
        _ => {
            if let Err(e) = store.accept(doc.generation, &canonical) {
                eprintln!("refused: {e}");
                return Ok(ExitCode::from(1));
            }
        }
    }
    let mode = if doc.node.mode == Mode::Proxy {
        "proxy"
    } else {
        "worker"
    };
    let generation = doc.generation;
    let secrets = secret_source(data_dir, host, &doc)?;
    let sections = registry::sections(
        data_dir,
        host,
        &doc.node.id,
        EngineConfig::default().resync,
        &secrets,
    );
    let unbuilt = unbuilt_sections(&doc, &sections);
    let doc = Arc::new(doc);
    let applied = run_once(&sections, doc.clone(), false).await;
    let verify = run_once(&sections, doc, true).await;
    let mut degraded = false;
    let now = chrono::Utc::now();
    for (name, r) in &applied {
        let (state, message, errors) = match (r, verify.get(name)) {
            (PassResult::Unmanaged, _) => (
                State::Unmanaged,
                "no section in the document".to_string(),
                vec![],
            ),
            (PassResult::Failed { error, .. }, _) => (State::Degraded, error.clone(), vec![]),
            // One shot: nothing retries later, so any failure counts.
            (PassResult::Ran { outcomes, .. }, _) if outcomes.iter().any(|o| o.error.is_some()) => {
                let errors = Failures::of(outcomes).all();
                let msg = status::failed_message(outcomes, &errors);
                (State::Degraded, msg, errors)
            }
            (_, Some(PassResult::Ran { changes, .. })) if !changes.is_empty() => (
                State::Degraded,
                format!("{} changes remain after apply", changes.len()),
                vec![],
            ),
            (_, Some(PassResult::Failed { error, .. })) => {
                (State::Degraded, format!("verify: {error}"), vec![])
            }
            _ => (
                State::Converged,
                "host matches the document".to_string(),
                vec![],
            ),
        };
        degraded |= state == State::Degraded;
        if let PassResult::Ran { changes, .. } = r {
            store.journal(name, &journal(changes, &errors))?;
        }
        store.put_status(&ReconcilerStatus {
            reconciler: name.to_string(),
            state,
            message,
            observed_generation: Some(generation),
            last_transition: now,
            last_pass: Some(now),
            reason: Some(status::Reason::Document),
            object_errors: errors,
            waiting: match verify.get(name) {
                Some(PassResult::Ran { waiting, .. }) => status::waiting(waiting),
                _ => Vec::new(),
            },
            objects: match verify.get(name) {
                Some(PassResult::Ran { notes, .. }) => notes.clone(),
                _ => Vec::new(),
            },
            owned: match verify.get(name) {
                Some(PassResult::Ran { owned, .. }) => *owned,
                _ => None,
            },
        })?;
    }
    match output {
        OutputFormat::Text => {
            print!("{}", output::plan_text(&applied, &unbuilt, color));
            let statuses = store.statuses()?;
            println!();
            print!(
                "{}",
                output::status_text(Some(generation), &statuses, color)
            );
            println!("({mode} node)");
        }
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"generation": generation, "applied": output::plan_json(&applied), "reconcilers": store.statuses()?})
            )?
        ),
    }
    Ok(ExitCode::from(if degraded { 1 } else { 0 }))
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

/// `converge control-plane …`.
async fn control_plane(command: ControlPlaneCommand, limits: Limits) -> anyhow::Result<ExitCode> {
    use crate::control::plane;
    match command {
        ControlPlaneCommand::Serve {
            dir,
            data,
            listen,
            public_url,
            nats,
            nats_public_url,
            nats_user,
            nats_password,
            nats_auth_file,
            nats_pid_file,
            nats_ca,
            tls_cert,
            tls_key,
            insecure_http,
            artifacts,
        } => {
            let nats = match nats {
                // The plane's NATS user may do everything: never without a credential.
                Some(_) if nats_password.is_empty() => anyhow::bail!(
                    "--nats needs the control plane's NATS password (CONVERGE_NATS_PASSWORD): \
                     its user may read and write every node's documents"
                ),
                Some(url) => Some(plane::NatsOptions {
                    public_url: nats_public_url.unwrap_or_else(|| url.clone()),
                    url,
                    user: nats_user,
                    password: nats_password,
                    auth_file: nats_auth_file.ok_or_else(|| {
                        anyhow::anyhow!(
                            "--nats needs --nats-auth-file (per-node users are written there)"
                        )
                    })?,
                    pid_file: nats_pid_file,
                    ca_pem: read_pem(nats_ca.as_deref())?,
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
        ControlPlaneCommand::Sign { data, node, file } => {
            let store = crate::control::plane_store::PlaneStore::open(&plane::db_path(&data))?;
            let record = store
                .node(&node)?
                .ok_or_else(|| anyhow::anyhow!("no enrolled node {node:?}"))?;
            let (_, bytes) = plane::build_envelope(&plane::keys(&data)?, &file, &record, &limits)?;
            println!("{}", String::from_utf8_lossy(&bytes));
            Ok(ExitCode::SUCCESS)
        }
        ControlPlaneCommand::Put {
            nats,
            nats_user,
            nats_password,
            nats_ca,
            node,
            file,
        } => {
            let bytes = std::fs::read(&file).with_context(|| format!("read {}", file.display()))?;
            let ca = read_pem(nats_ca.as_deref())?;
            plane::put(
                &nats,
                &nats_user,
                &nats_password,
                ca.as_deref(),
                &node,
                bytes,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn nodes_text(nodes: &[crate::control::plane_store::NodeRecord]) -> String {
    use std::fmt::Write;
    let g = |v: Option<u64>| v.map(|g| g.to_string()).unwrap_or_else(|| "-".into());
    let mut out = format!(
        "{:<20} {:>8} {:>9}  {:<24} {:<20} CONDITIONS\n",
        "NODE", "ACCEPTED", "CONVERGED", "LAST SEEN", "VERSION"
    );
    for n in nodes {
        let conditions: Vec<String> = n
            .status
            .as_ref()
            .and_then(|s| s["reconcilers"].as_array())
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        format!(
                            "{}={}",
                            r["reconciler"].as_str().unwrap_or("?"),
                            r["state"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        // The version the node last reported, else the one it enrolled with.
        let version = n
            .status
            .as_ref()
            .and_then(|s| s["facts"]["convergeVersion"].as_str())
            .or_else(|| n.facts["convergeVersion"].as_str())
            .unwrap_or("-");
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
fn join_hint(data: &Path, token: &str, name: Option<&str>) -> anyhow::Result<()> {
    let key = crate::control::plane::keys(data)?.signing.verifying_key();
    eprintln!(
        "join with: converge join --url https://<control plane> --token {token} --plane-key {}{}",
        crate::control::identity::fingerprint(&key),
        name.map(|n| format!(" --name {n}")).unwrap_or_default()
    );
    Ok(())
}

/// The PEM text of `path`, if given.
fn read_pem(path: Option<&Path>) -> anyhow::Result<Option<String>> {
    path.map(|p| std::fs::read_to_string(p).with_context(|| format!("read {}", p.display())))
        .transpose()
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
