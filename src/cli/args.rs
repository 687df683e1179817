//! The command line as clap parses it: global options, commands and their arguments.

use super::*;

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
pub enum RolloutsCommand {
    /// Stop a running rollout: no further wave is published; nodes keep what they have.
    Abort {
        id: String,
        #[arg(long)]
        data: PathBuf,
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
        /// NATS server URL, or a cluster's URLs comma-separated: documents in the KV
        /// bucket `converge`, status on `converge.status.<node>`.
        #[arg(long)]
        nats: Option<String>,
        /// NATS URL(s) handed to nodes (default: --nats); nodes move to another server
        /// of the list when theirs dies.
        #[arg(long)]
        nats_public_url: Option<String>,
        /// Authorization file included by nats-server; rewritten on each enrollment.
        #[arg(long)]
        nats_auth_file: Option<PathBuf>,
        /// nats-server's pid file (SIGHUP reloads the authorization file); repeat it for
        /// each server of a cluster on this host.
        #[arg(long)]
        nats_pid_file: Vec<PathBuf>,
        /// Replicas of the documents bucket (3 on a cluster of 3 or more servers).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
        nats_replicas: u8,
        /// PEM of the CA of the NATS server's certificate (a tls:// URL requires TLS).
        #[arg(long)]
        nats_ca: Option<PathBuf>,
        /// Where enrollment, status, tokens and rollouts live: `sqlite` (this instance
        /// alone, `<data>/control-plane.db`) or `nats` (JetStream KV buckets shared by
        /// every instance serving the same cluster; SQLite is each one's cache). Needs
        /// --nats for `nats`.
        #[arg(long, value_enum, default_value_t = PlaneState::Sqlite, requires_if("nats", "nats"))]
        state: PlaneState,
        /// Split the documents bucket over N streams by node id (nats-server 2.9: a put
        /// costs more the more consumers its stream has; ~1,000 nodes per stream keeps it
        /// flat). Fixed at the first start (`<data>/nats-shards`); default 1.
        #[arg(long, requires = "nats", value_parser = clap::value_parser!(u16).range(1..=1024))]
        nats_shards: Option<u16>,
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
        /// Serve the read-only fleet page at /fleet: nodes, the newest rollout, the last
        /// dry run. Open it once with `?token=` and the token in
        /// `<data>/fleet-page.token` (made on first use).
        #[arg(long)]
        fleet_page: bool,
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
    /// Dry run across the fleet: send each selected node its candidate document from
    /// DIR (`<node-id>.json|yaml`) as a signed dry-run request through the running
    /// `serve` (same --data), and print what each node would do: unchanged, changes
    /// (counts by reconciler and action), would refuse (with JSON paths), or no answer.
    /// Nothing is applied anywhere. Exit 0: all unchanged, 2: changes, 1: a refusal, an
    /// error or a node that did not answer.
    Plan {
        /// Candidate documents, one file per node id.
        dir: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// Node ids or globs, comma-separated (`web-*,db-1`); default: every node.
        #[arg(long)]
        nodes: Option<String>,
        /// How long to wait for answers (`30s`, `500ms`, `2m`).
        #[arg(long, default_value = "30s", value_parser = parse_timeout)]
        timeout: std::time::Duration,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Staged rollout: publish the candidate documents in DIR (`<node-id>.json|yaml`)
    /// wave by wave through the running `serve` (same --data): the canary first, then
    /// batches. A wave passes when each of its nodes reports the new generation
    /// Converged; the rollout halts on a refusal, a Degraded reconciler or a wave that
    /// misses --wait, and with --revert sends the nodes it changed their previous
    /// documents again. An `agent` section (self-update) rolls out the same way. Follows
    /// the rollout until it ends (exit 0: succeeded, 1: anything else) unless --detach;
    /// `serve` drives it either way, across its own restarts.
    Rollout {
        /// Candidate documents, one file per node id.
        dir: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// Node ids or globs, comma-separated (`web-*,db-1`); default: every node.
        #[arg(long)]
        nodes: Option<String>,
        /// Nodes in the first wave, alone.
        #[arg(long, default_value_t = 1)]
        canary: usize,
        /// Nodes in each later wave: N, or P% of the rollout's nodes.
        #[arg(long, default_value = "10%")]
        batch: crate::control::rollout::Batch,
        /// How long each wave may take to converge (`120s`, `2m`).
        #[arg(long, default_value = "120s", value_parser = parse_timeout)]
        wait: std::time::Duration,
        /// On a halt, publish the previous documents to the nodes already changed.
        #[arg(long)]
        revert: bool,
        /// Start it and return (follow it with `control-plane rollouts`).
        #[arg(long)]
        detach: bool,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Staged rollouts, newest first: phase, waves and each node's outcome.
    #[command(args_conflicts_with_subcommands = true)]
    Rollouts {
        #[arg(long)]
        data: Option<PathBuf>,
        /// Only this rollout.
        #[arg(long)]
        id: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: OutputFormat,
        #[command(subcommand)]
        command: Option<RolloutsCommand>,
    },
    /// Print the signed envelope of FILE for NODE (secrets sealed to it).
    Sign {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        node: String,
        file: PathBuf,
    },
    /// Write nats-server's authorization file: the control plane's NATS user (its nkey,
    /// `<data>/nats.key`, made here on first use) and every enrolled node's. Run it
    /// before nats-server first starts; `serve` keeps the file up to date afterwards.
    NatsAuth {
        #[arg(long)]
        data: PathBuf,
        /// The file nats-server includes (`include ./auth.conf`).
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a running control plane as a node would (docs/protocol.md): enrolls a
    /// throwaway node with TOKEN over HTTPS, checks the plane's key, then on the transport
    /// the plane hands out a document, a status, and the refusals (HTTPS: replayed,
    /// unsigned and forged requests; NATS: another node's subjects, a bucket write).
    /// Prints each check PASS/FAIL/SKIP; exits 0 only if none failed.
    Conformance {
        /// The control plane's URL, as nodes join it (e.g. https://cp.example:8443).
        url: String,
        /// PEM file of the certificate (or CA) to trust for its HTTPS (and NATS TLS).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// A one-time registration token (consumed: the throwaway node stays enrolled).
        #[arg(long, env = "CONVERGE_JOIN_TOKEN")]
        token: String,
        /// The plane's signing key (`SHA256:…`): the check fails if it answers with
        /// another.
        #[arg(long)]
        plane_key: Option<String>,
        /// The throwaway node's name (default conformance-<random>); give the plane a
        /// document for it to check the document path.
        #[arg(long)]
        name: Option<String>,
    },
    /// Put an envelope (JSON file) under NODE's key of the NATS KV bucket as is.
    Put {
        #[arg(long)]
        nats: String,
        /// Control-plane state: the plane's NATS key is read from it.
        #[arg(long)]
        data: PathBuf,
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

/// `30s`, `500ms`, `2m` or plain seconds.
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration such as 30s, 500ms or 2m"))?;
    let d = match unit {
        "ms" => std::time::Duration::from_millis(n),
        "" | "s" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(format!("{s:?}: the unit is ms, s or m")),
    };
    if d.is_zero() {
        return Err("the timeout must be more than zero".into());
    }
    Ok(d)
}

/// Where `control-plane serve` keeps its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PlaneState {
    Sqlite,
    Nats,
}
