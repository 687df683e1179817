//! One agent node carrying every section at once, for `tests/wholenode.rs`: containers
//! on a converge network (Podman), published ports, a WireGuard interface with peers
//! (wireguard-go), DNS (dnsmasq), metadata, a borg backup schedule under compressed time,
//! and Caddy routes. Routes are served by proxy nodes only, and a proxy may carry every
//! other section too, so the node runs `--proxy`: one agent, seven reconcilers.
//!
//! The documents come at any [`Scale`] and in variants (round `v` changes about a tenth
//! of every section), and [`Expected`] says exactly what a converged host then holds,
//! for the checks read from the host itself ([`WholeNode::host_state`]).

use super::agent::{converge, data, push_ok, reconciler, start_agent_with, status};
use super::borg_repo::random_bytes;
use super::mesh::{active_dir, caddy_admin, caddy_bin, caddy_dir, instance_dirs, key};
use super::podman::{podman, podman_ok, start_podman, PodmanService, TEST_IMAGE};
use super::sandbox::{converge_bin, require_tool, wait_until, Spawned, TestNode};
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Where the agent serves its metrics, inside its node.
pub const METRICS: &str = "127.0.0.1:9464";
/// The borg passphrase (a local secret file).
pub const PASSPHRASE: &str = "converge-wholenode-passphrase-1b7c";
/// The container network's subnet.
const SUBNET: &str = "10.89.0";
/// The host port published to container `web0` port 8080.
pub const WEB_PORT: u16 = 18080;
const WG_PORT: u16 = 51820;
/// The reconcilers a whole node runs: every one but `agent` (no such section here, so
/// it stays Unmanaged).
pub fn reconcilers() -> impl Iterator<Item = &'static str> {
    converge::registry::ALL
        .into_iter()
        .filter(|r| *r != "agent")
}

/// How much of each section a document carries.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub containers: usize,
    pub ports: usize,
    pub records: usize,
    pub peers: usize,
    pub routes: usize,
    pub projects: usize,
    pub entries: usize,
}

impl Scale {
    /// Small enough that every change is quick: the drift matrix.
    pub const SMALL: Scale = Scale {
        containers: 3,
        ports: 20,
        records: 20,
        peers: 5,
        routes: 5,
        projects: 2,
        entries: 10,
    };
}

/// What a converged host holds for a document.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Expected {
    pub containers: BTreeSet<String>,
    pub networks: BTreeSet<String>,
    /// `tcp . PORT` keys of the DNAT maps.
    pub ports: BTreeSet<String>,
    pub peers: BTreeSet<String>,
    pub routes: BTreeSet<String>,
    /// Per project, its entries (path → JSON value).
    pub entries: BTreeMap<String, BTreeMap<String, Value>>,
}

/// A deterministic WireGuard public key (base64) from `seed`.
pub fn wg_public(seed: &str) -> String {
    let bytes: [u8; 32] = sha2::Sha256::digest(seed.as_bytes()).into();
    let public = crypto_box::SecretKey::from_bytes(bytes).public_key();
    base64::engine::general_purpose::STANDARD.encode(public.as_bytes())
}

pub fn sha_hex(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// The node: its Podman service, WireGuard interface, secrets, borg repository and
/// backup source, and the agent (restartable).
pub struct WholeNode {
    // Dropped in this order: the Podman service removes its containers while the
    // node's namespace still exists.
    pub agent: Option<Spawned>,
    pub podman: PodmanService,
    pub node: TestNode,
    pub iface: String,
    /// The container network: unique on the host, as CNI's address allocations
    /// (`/var/lib/cni/networks/<name>`) are host-wide, not per node.
    pub network: String,
    pub secrets: PathBuf,
    pub repo: PathBuf,
    pub src: PathBuf,
    resync_secs: u64,
    /// Backups clock speed-up (`CONVERGE_TEST_BACKUPS_TIME`).
    time_scale: u32,
    epoch: i64,
}

impl WholeNode {
    /// Creates node `name` (≤ 16 chars; `tag` ≤ 3 chars makes its WireGuard interface
    /// name unique on the host) with its daemons' prerequisites; no agent yet.
    pub fn new(name: &str, tag: &str, resync_secs: u64, time_scale: u32) -> WholeNode {
        for tool in [
            "podman",
            "nft",
            "wireguard-go",
            "wg",
            "dnsmasq",
            "borg",
            "curl",
            "busybox",
        ] {
            require_tool(tool);
        }
        let node = TestNode::new(name);
        let podman = start_podman(&node);
        let (iface, _public) = key(&node, tag);
        let secrets = node.data_dir().join("secrets");
        std::fs::create_dir_all(&secrets).expect("secrets dir");
        std::fs::write(secrets.join("borg-pass"), format!("{PASSPHRASE}\n")).expect("secret");
        let src = node.data_dir().join("src");
        std::fs::create_dir_all(&src).expect("backup source");
        std::fs::write(src.join("small.txt"), b"hello\n").expect("small");
        std::fs::write(src.join("big"), random_bytes(7, 256 * 1024)).expect("big");
        let repo = node.data_dir().join("repo");
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        WholeNode {
            node,
            podman,
            iface,
            network: format!("wn{tag}-{}", std::process::id() % 100_000),
            secrets,
            repo,
            src,
            agent: None,
            resync_secs,
            time_scale,
            epoch,
        }
    }

    pub fn resync(&self) -> Duration {
        Duration::from_secs(self.resync_secs)
    }

    /// The agent's log (appended across restarts).
    pub fn log(&self) -> PathBuf {
        self.node.data_dir().join("agent.log")
    }

    /// Starts the agent: a proxy, Podman, metrics, compressed backups time; its stderr
    /// appended to [`WholeNode::log`].
    pub fn start(&mut self) {
        let resync = self.resync_secs.to_string();
        let socket = self.podman.socket.to_string_lossy().into_owned();
        let secrets = self.secrets.to_string_lossy().into_owned();
        let caddy = caddy_bin();
        let args = [
            "--proxy",
            "--resync-secs",
            &resync,
            "--caddy",
            &caddy,
            "--secrets-dir",
            &secrets,
            "--runtime",
            "podman",
            "--podman-socket",
            &socket,
            "--metrics-listen",
            METRICS,
        ];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("agent log");
        let clock = format!("{}@{}", self.time_scale, self.epoch);
        let agent = start_agent_with(&self.node, &converge_bin(), &args, |cmd| {
            cmd.env("CONVERGE_TEST_BACKUPS_TIME", clock).stderr(log);
        });
        for d in instance_dirs(&self.node) {
            self.node.track_pidfile(d.join("caddy.pid"));
        }
        self.agent = Some(agent);
    }

    /// SIGKILLs the agent and reaps it (what it started keeps running).
    pub fn kill9(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }

    /// The document of generation `g` at `scale`, variant `v`. `backups_due`: a schedule
    /// every minute of the compressed clock, else one that is never due during a test.
    pub fn doc(&self, g: u64, scale: Scale, v: u64, backups_due: bool) -> Value {
        let n = &self.node;
        // About a tenth of each section changes from one variant to the next.
        let tenth = |len: usize, i: usize| i < len.div_ceil(10);
        let containers: Vec<Value> = (0..scale.containers)
            .map(|i| {
                let version = if tenth(scale.containers, i) { v } else { 0 };
                json!({
                    "name": format!("web{i}"),
                    "image": TEST_IMAGE,
                    "command": ["sh", "-c", format!("mkdir -p /www && echo web{i} > /www/index.html && exec httpd -f -p 8080 -h /www")],
                    "env": {"VERSION": version.to_string()},
                    "network": self.network,
                    "ip": format!("{SUBNET}.{}", 10 + i),
                    "stopGracePeriod": "1s",
                })
            })
            .collect();
        // Ports: web0's, then a window of address targets that moves by a tenth.
        let shift = (v as usize % 2) * scale.ports.div_ceil(10);
        let mut ports = vec![json!({"protocol": "tcp", "hostPort": WEB_PORT,
            "target": {"container": "web0", "port": 8080}})];
        ports.extend((1..scale.ports).map(|i| {
            let port = 20000 + i + shift;
            json!({"protocol": "tcp", "hostPort": port,
                   "target": {"address": format!("10.251.{}.{}", i / 250, i % 250 + 2), "port": 9000}})
        }));
        let mut records = vec![
            json!({"name": "web0.internal", "type": "A", "container": "web0"}),
            json!({"name": "www.internal", "type": "CNAME", "values": ["web0.internal"]}),
        ];
        records.extend((2..scale.records).map(|i| {
            let last = if tenth(scale.records, i) { v % 200 } else { 0 };
            json!({"name": format!("h{i}.internal"), "type": "A",
                   "values": [format!("10.88.{}.{}", i / 250, ((i % 250) as u64 + last) % 250 + 1)]})
        }));
        let peers: Vec<Value> = (0..scale.peers)
            .map(|i| {
                let gen = if tenth(scale.peers, i) { v % 2 } else { 0 };
                json!({
                    "name": format!("p{i}"),
                    "publicKey": wg_public(&format!("peer-{i}-{gen}")),
                    "endpoint": format!("10.231.0.250:{WG_PORT}"),
                    "allowedIps": [format!("10.78.{}.{}/32", 1 + i / 250, i % 250 + 1)],
                })
            })
            .collect();
        let mut routes = vec![
            json!({"name": "web", "hosts": ["web.test"], "tls": "internal",
            "upstreams": [{"container": "web0", "port": 8080}]}),
        ];
        routes.extend((1..scale.routes).map(|i| {
            let tag = if tenth(scale.routes, i) { v } else { 0 };
            json!({"name": format!("r{i}"), "hosts": [format!("r{i}.test")], "tls": "off",
                   "upstreams": [{"peer": format!("p{}", i % scale.peers.max(1)), "port": 8080}],
                   "responseHeaders": {"set": {"X-Variant": tag.to_string()}}})
        }));
        let projects: Vec<Value> = (0..scale.projects)
            .map(|p| {
                let entries: serde_json::Map<String, Value> = (0..scale.entries)
                    .map(|e| {
                        let value = if tenth(scale.entries, e) { v } else { 0 };
                        (format!("k{e}"), json!(value))
                    })
                    .collect();
                json!({"id": format!("proj{p}"), "tokenSha256": sha_hex(&format!("token-{p}")),
                       "entries": entries})
            })
            .collect();
        let cron = if backups_due {
            "* * * * *"
        } else {
            "0 0 1 1 *"
        };
        json!({
            "apiVersion": "converge/v1",
            "node": {"id": n.name(), "mode": "proxy"},
            "generation": g,
            "issuedAt": "2026-12-07T10:00:00Z",
            "networks": [{"name": self.network, "subnets": [{"subnet": format!("{SUBNET}.0/24")}]}],
            "containers": containers,
            "firewall": {"publishedPorts": ports},
            "wireguard": {
                "interface": self.iface,
                "listenPort": WG_PORT,
                "addresses": ["10.78.0.1/16"],
                "peers": peers,
            },
            "dns": {"zone": "internal", "listen": [n.address().to_string()], "port": 53, "ttl": 5,
                    "records": records},
            "routes": {"routes": routes},
            "metadata": {"projects": projects},
            "backups": {
                "repositories": [{"name": "local", "kind": "borg", "url": self.repo,
                                  "passphraseSecret": "borg-pass"}],
                "schedules": [{"name": "src", "repository": "local", "paths": [self.src],
                               "cron": cron, "missed": "run-once"}]
            }
        })
    }

    /// What a host converged on `doc` holds.
    pub fn expected(doc: &Value) -> Expected {
        let names = |v: &Value, field: &str| -> BTreeSet<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x[field].as_str().map(String::from))
                .collect()
        };
        let ports = doc["firewall"]["publishedPorts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("tcp . {}", p["hostPort"]))
            .collect();
        let entries = doc["metadata"]["projects"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let e = p["entries"]
                    .as_object()
                    .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default();
                (p["id"].as_str().unwrap_or_default().to_string(), e)
            })
            .collect();
        Expected {
            containers: names(&doc["containers"], "name"),
            networks: names(&doc["networks"], "name"),
            ports,
            peers: names(&doc["wireguard"]["peers"], "publicKey"),
            routes: names(&doc["routes"]["routes"], "name"),
            entries,
        }
    }

    pub fn push(&self, doc: &Value) {
        push_ok(&self.node, doc);
    }

    /// Whether every reconciler has passed generation `g` and is Converged (backups may
    /// be Progressing: a run under way is a waiting object in progress).
    pub fn converged(&self, g: u64) -> bool {
        let st = status(&self.node);
        reconcilers().all(|name| {
            let r = reconciler(&st, name);
            let state_ok =
                r["state"] == "Converged" || (name == "backups" && r["state"] == "Progressing");
            state_ok && r["observedGeneration"] == g
        })
    }

    /// Waits until [`WholeNode::converged`] at `g`, naming what is not after `within`.
    pub fn wait_converged(&self, g: u64, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        while !self.converged(g) {
            if std::time::Instant::now() > deadline {
                let st = status(&self.node);
                let lagging: Vec<String> = reconcilers()
                    .map(|n| reconciler(&st, n))
                    .filter(|r| r["state"] != "Converged" || r["observedGeneration"] != g)
                    .map(|r| r.to_string())
                    .collect();
                panic!(
                    "not converged at {g} after {within:?}:\n{}\nagent log: {}",
                    lagging.join("\n"),
                    self.log().display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn podman(&self, args: &[&str]) -> Output {
        podman(&self.node, &self.podman, args)
    }

    pub fn podman_ok(&self, args: &[&str]) -> String {
        podman_ok(&self.node, &self.podman, args)
    }

    /// Whether container `name` of converge runs.
    pub fn running(&self, name: &str) -> bool {
        self.containers().get(name).is_some_and(|s| is_running(s))
    }

    /// converge's containers: name → state (lowercase).
    pub fn containers(&self) -> BTreeMap<String, String> {
        self.podman_ok(&[
            "ps",
            "-a",
            "--filter",
            "label=converge.managed=true",
            "--format",
            "{{.Names}} {{.State}}",
        ])
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, s)| (n.to_string(), s.to_lowercase()))
        .collect()
    }

    pub fn networks(&self) -> BTreeSet<String> {
        self.podman_ok(&[
            "network",
            "ls",
            "--filter",
            "label=converge.managed=true",
            "--format",
            "{{.Name}}",
        ])
        .lines()
        .map(String::from)
        .collect()
    }

    /// `tcp . PORT` keys of every DNAT map of converge's table (empty without it).
    pub fn dnat_keys(&self) -> BTreeSet<String> {
        let out = self
            .node
            .run("nft", ["-j", "list", "table", "inet", "converge"]);
        if !out.status.success() {
            return BTreeSet::new();
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let mut keys = BTreeSet::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let map = &item["map"];
            if !map["name"].as_str().is_some_and(|n| n.starts_with("dnat")) {
                continue;
            }
            for e in map["elem"].as_array().into_iter().flatten() {
                // [key, data]; the key is a concatenation whose last two parts are
                // protocol and port.
                let parts = e[0]["concat"].as_array().cloned().unwrap_or_default();
                if parts.len() >= 2 {
                    let proto = &parts[parts.len() - 2];
                    let port = &parts[parts.len() - 1];
                    let proto = proto
                        .as_str()
                        .map(String::from)
                        .unwrap_or(proto.to_string());
                    keys.insert(format!("{proto} . {port}"));
                }
            }
        }
        keys
    }

    /// Whether `nft list table inet NAME` succeeds.
    pub fn has_table(&self, name: &str) -> bool {
        self.node
            .run("nft", ["list", "table", "inet", name])
            .status
            .success()
    }

    /// Public keys of the interface's peers (empty without the interface).
    pub fn wg_peers(&self) -> BTreeSet<String> {
        let out = self.node.run("wg", ["show", &self.iface, "peers"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect()
    }

    /// The interface's IPv4 addresses (`ip -o -4 addr show dev IFACE`).
    pub fn wg_addresses(&self) -> String {
        let out = self
            .node
            .run("ip", ["-o", "-4", "addr", "show", "dev", &self.iface]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Route names converge holds in the serving Caddy (`@id` `converge-route-NAME`).
    pub fn caddy_routes(&self) -> BTreeSet<String> {
        let (code, body) = caddy_admin(&self.node, "GET", "/config/", None);
        if code != 200 {
            return BTreeSet::new();
        }
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let mut ids = BTreeSet::new();
        collect_ids(&v, &mut ids);
        ids.into_iter()
            .filter_map(|id| id.strip_prefix("converge-route-").map(String::from))
            .collect()
    }

    /// `converge metadata inspect PROJECT`'s entries (empty if it fails).
    pub fn metadata_entries(&self, project: &str) -> BTreeMap<String, Value> {
        let out = converge(&self.node, &["metadata", "inspect", project]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["entries"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Live dnsmasq processes started from the node's converge data dir.
    pub fn dnsmasq_pids(&self) -> Vec<u32> {
        let prefix = format!("--conf-file={}/dns/dnsmasq-", data(&self.node).display());
        procs(|args| args.iter().any(|a| a.starts_with(prefix.as_bytes())))
    }

    /// Live Caddy processes running a configuration below the node's `<data>/caddy/`.
    pub fn caddy_pids(&self) -> Vec<u32> {
        let dir = caddy_dir(&self.node).display().to_string();
        procs(|args| {
            args.get(1).is_some_and(|a| *a == b"run")
                && args
                    .iter()
                    .any(|a| a.starts_with(dir.as_bytes()) && a.ends_with(b".json"))
        })
    }

    /// Live borg processes naming the repository.
    pub fn borg_pids(&self) -> Vec<u32> {
        converge_backups::driver::borg_users(&self.repo.display().to_string(), true)
    }

    /// When schedule `src` last succeeded, from the backups record (read without
    /// running borg: a borg of the test would make the repository busy for converge).
    pub fn last_success(&self) -> Option<String> {
        let path = data(&self.node).join("backups/state.json");
        let v: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        v["schedules"]["src"]["lastSuccess"]
            .as_str()
            .map(String::from)
    }

    /// Whether the repository holds a lock (`lock.exclusive` or a non-empty roster).
    pub fn repo_locked(&self) -> bool {
        self.repo.join("lock.exclusive").exists()
    }

    /// borg against the repository (passphrase in the environment: the test's own
    /// process, never the agent's).
    pub fn borg(&self, args: &[&str]) -> Output {
        Command::new("borg")
            .args(args)
            .env("BORG_PASSPHRASE", PASSPHRASE)
            .env("BORG_BASE_DIR", self.node.data_dir().join("test-borg"))
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .output()
            .expect("run borg")
    }

    /// The repository's archive names (empty if borg fails, e.g. while it is locked).
    pub fn archives(&self) -> Option<Vec<String>> {
        let out = self.borg(&[
            "list",
            "--short",
            "--lock-wait",
            "5",
            &self.repo.display().to_string(),
        ]);
        out.status.success().then(|| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(String::from)
                .collect()
        })
    }

    /// Everything [`Expected`] covers, read from the host.
    pub fn host_state(&self) -> Expected {
        let containers = self.containers();
        let entries = self
            .metadata_projects()
            .into_iter()
            .map(|p| {
                let e = self.metadata_entries(&p);
                (p, e)
            })
            .collect();
        Expected {
            containers: containers.into_keys().collect(),
            networks: self.networks(),
            ports: self.dnat_keys(),
            peers: self.wg_peers(),
            routes: self.caddy_routes(),
            entries,
        }
    }

    /// Projects in metadata.db.
    pub fn metadata_projects(&self) -> BTreeSet<String> {
        let db = data(&self.node).join("metadata.db");
        let Ok(conn) =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        else {
            return BTreeSet::new();
        };
        let Ok(mut st) = conn.prepare("SELECT DISTINCT project FROM entries") else {
            return BTreeSet::new();
        };
        st.query_map([], |r| r.get::<_, String>(0))
            .map(|rows| rows.flatten().collect())
            .unwrap_or_default()
    }

    /// The instance directory serving new connections.
    pub fn active_caddy(&self) -> PathBuf {
        active_dir(&self.node)
    }

    /// Files below the converge data dir named like an interrupted atomic write
    /// (`.NAME.tmp.RANDOM`) or ending in `.tmp`.
    pub fn temp_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(&data(&self.node), &mut |p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.contains(".tmp.") || name.ends_with(".tmp") {
                out.push(p.to_path_buf());
            }
        });
        out
    }

    /// `PRAGMA integrity_check` of a store (opened read-only, the agent may run).
    pub fn integrity(&self, file: &str) -> String {
        let db = data(&self.node).join(file);
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap_or_else(|e| panic!("open {}: {e}", db.display()));
        conn.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
            .unwrap_or_else(|e| format!("integrity_check failed: {e}"))
    }

    /// The journal's events after `after` (`converge events --output json`).
    pub fn events_after(&self, after: i64) -> Vec<Value> {
        let out = converge(&self.node, &["events", "--output", "json"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["id"].as_i64().is_some_and(|id| id > after))
            .collect()
    }

    /// The newest event id (0 without events).
    pub fn last_event_id(&self) -> i64 {
        self.events_after(0)
            .iter()
            .filter_map(|e| e["id"].as_i64())
            .max()
            .unwrap_or(0)
    }

    /// Waits until `cond` holds, at most `within`; returns how long it took.
    pub fn time(&self, within: Duration, what: &str, cond: impl FnMut() -> bool) -> Duration {
        let t = std::time::Instant::now();
        wait_until(within, what, cond);
        t.elapsed()
    }
}

impl Drop for WholeNode {
    /// After a failure (or with `WHOLENODE_KEEP_LOGS`), keeps the agent's log: the
    /// node's data dir goes with the node.
    fn drop(&mut self) {
        // Containers before the node (the Podman service's own drop does it again): CNI then
        // frees their addresses, and the network's allocation directory (host-wide,
        // one per run as the name is) can go once nothing but its lock is left.
        // The agent first, or it would start them again.
        self.kill9();
        self.podman.remove_all_containers();
        let dir = Path::new("/var/lib/cni/networks").join(&self.network);
        let empty = std::fs::read_dir(&dir).is_ok_and(|files| {
            files.flatten().all(|f| {
                let n = f.file_name().to_string_lossy().into_owned();
                n == "lock" || n.starts_with("last_reserved_ip")
            })
        });
        if empty {
            let _ = std::fs::remove_dir_all(&dir);
        }
        if std::thread::panicking() || std::env::var_os("WHOLENODE_KEEP_LOGS").is_some() {
            let keep = std::env::temp_dir().join(format!("{}-agent.log", self.node.name()));
            if std::fs::copy(self.log(), &keep).is_ok() {
                eprintln!("agent log kept: {}", keep.display());
            }
        }
    }
}

/// A `podman ps` state of a running container (`running`, or `Up 3 seconds` on 4.3).
pub fn is_running(state: &str) -> bool {
    state.starts_with("running") || state.starts_with("up")
}

fn collect_ids(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(id) = m.get("@id").and_then(Value::as_str) {
                out.insert(id.to_string());
            }
            m.values().for_each(|x| collect_ids(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_ids(x, out)),
        _ => {}
    }
}

fn procs(matches: impl Fn(&[&[u8]]) -> bool) -> Vec<u32> {
    converge_core::host::find(|args| matches(args))
        .map(|ps| ps.into_iter().map(|p| p.pid).collect())
        .unwrap_or_default()
}

fn walk(dir: &Path, f: &mut impl FnMut(&Path)) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&p, f),
            Ok(_) => f(&p),
            Err(_) => {}
        }
    }
}
