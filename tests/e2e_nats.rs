//! Three nodes end to end over NATS (issue 30, "End to end"): two workers, one on Podman
//! and one on Docker, and a proxy, each in its own sandbox node, enrolled with the
//! reference control plane (`converge control-plane serve --nats`, a real nats-server
//! with TLS and nkeys, in a node of its own) and given every section it can carry by
//! files in the plane's docs dir (secrets sealed by the plane): container networks and
//! containers, a WireGuard mesh between all three, published ports open to the proxy's
//! mesh address only, an input policy of `drop`, DNS, metadata on the workers; routes
//! over the mesh, an input policy of `drop`, DNS and metadata on the proxy; on all three
//! a borg schedule (compressed test time), restores and S3 exports (moto, in the plane's
//! node). The proxy's metadata is served on its loopback only: carried, not checked.
//!
//! Checked from outside only (the plane's node is the outside client; inside containers
//! through the runtimes' CLIs; archives with the borg CLI; the export's URL from the
//! status the node sent to the plane):
//! - HTTPS through the proxy (Caddy, `tls internal`) reaches each worker's web container
//!   over the mesh (the upstream is the worker's mesh address; its published port admits
//!   only the proxy's), and the published port is closed to anyone else;
//! - the proxy's DNS answers; names resolve inside the containers of both workers (the
//!   node's dnsmasq on the network's gateway), the previous generation's name is gone;
//! - a container reads its metadata by name (`metadata.internal:8500`);
//! - on each node an archive of the generation's data appears; the next generation
//!   restores it (side by side) byte-identical and exports it to S3, and the presigned
//!   URL downloads exactly what `borg export-tar` gives.
//!
//! Then a new generation for all three through the plane (the files edited), and the
//! same checks, [`GENERATIONS`] times. The matrix and the run time are printed.

mod common;

use common::agent::{converge, data};
use common::borg_repo::random_bytes;
use common::dnsq;
use common::docker::start_docker;
use common::mesh::{caddy_bin, https_get_from, key, mesh_addr, peer, WG_PORT};
use common::plane::{agent_log, join, start_enrolled_agent, stderr, Cp};
use common::podman::{start_podman, TEST_IMAGE};
use common::runtime::Runtime;
use common::sandbox::{require_tool, Spawned, TestNode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Generations published through the plane (the first, then new ones for all three).
const GENERATIONS: u64 = 3;
/// The workers' backups clock runs this many times faster: a `* * * * *` slot every 6 s,
/// with room between runs for a restore or an export.
const BACKUPS_TIME_SCALE: u32 = 10;
const MD_TOKEN: &str = "e2e-metadata-token-3c9a";
const PASSPHRASE: &str = "e2e-borg-passphrase-81d0";
const S3_PORT: u16 = 5055;
const S3_BUCKET: &str = "exports";
const S3_CREDENTIALS: &str = r#"{"accessKeyId": "test", "secretAccessKey": "test"}"#;
/// How long a check may take to hold after its generation was accepted (the first
/// generation starts everything: images, networks, the mesh, Caddy's CA).
const FIRST_TIMEOUT: Duration = Duration::from_secs(150);
const TIMEOUT: Duration = Duration::from_secs(90);

fn sha(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A worker: its node, runtime, index (1, 2: mesh address `mesh_addr(index + 1)`,
/// container subnet `10.66.<index>.0/24`) and WireGuard interface and key.
struct Worker<'a> {
    rt: Runtime<'a>,
    index: u8,
    iface: String,
    key: String,
}

impl Worker<'_> {
    fn node(&self) -> &TestNode {
        self.rt.node
    }
    fn name(&self) -> &str {
        self.rt.node.name()
    }
    fn mesh(&self) -> u8 {
        self.index + 1
    }
    fn subnet(&self) -> String {
        format!("10.66.{}.0/24", self.index)
    }
    fn gateway(&self) -> String {
        format!("10.66.{}.1", self.index)
    }
    fn web_ip(&self) -> String {
        format!("10.66.{}.10", self.index)
    }
    fn host(&self) -> String {
        format!("{}.e2e.test", self.name())
    }
    /// What its web container serves in generation `g`.
    fn page(&self, g: u64) -> String {
        format!("{} gen{g}\n", self.name())
    }
}

/// The directory a node's schedule archives.
fn src(node: &TestNode) -> PathBuf {
    node.data_dir().join("src")
}

/// The node's borg repository.
fn repo(node: &TestNode) -> PathBuf {
    node.data_dir().join("repo")
}

/// Where its restores land (side by side: `<this>.restore-<id>`).
fn restore_target(node: &TestNode) -> PathBuf {
    node.data_dir().join("restored")
}

/// A node's `backups` section of generation `g`: a `* * * * *` schedule of [`src`]; from
/// the second generation on, a restore of `archive` (made in the generation before) and
/// its export to the S3 server at `s3`.
fn backups(node: &TestNode, g: u64, archive: Option<&str>, s3: &str) -> Value {
    let mut b = json!({
        "repositories": [{"name": "local", "kind": "borg", "url": repo(node),
                          "passphraseSecret": "borg-pass"}],
        "schedules": [{"name": "src", "repository": "local", "paths": [src(node)],
                       "cron": "* * * * *", "missed": "run-once"}],
    });
    if let Some(a) = archive {
        b["restores"] = json!([{"id": format!("r{g}"), "repository": "local", "archive": a,
            "targetPath": restore_target(node), "mode": "side-by-side"}]);
        b["exports"] = json!([{"id": format!("e{g}"), "repository": "local", "archive": a,
            "s3": {"endpoint": s3, "bucket": S3_BUCKET,
                   "key": format!("{}/e{g}.tar", node.name()), "credentialsSecret": "s3"},
            "urlTtl": "1h"}]);
    }
    b
}

/// The secrets of [`backups`], sealed to the node by the plane.
fn backup_secrets() -> Value {
    json!({"borg-pass": PASSPHRASE, "s3": S3_CREDENTIALS})
}

/// The address of name `gen<g>.internal` on node `i` (0: the proxy).
fn gen_addr(g: u64, i: u8) -> String {
    format!("10.99.{g}.{}", i + 1)
}

/// The worker's document of generation `g` (`archive`, `s3`: see [`backups`]).
fn worker_doc(
    w: &Worker,
    other: &Worker,
    proxy: (&TestNode, &str),
    g: u64,
    archive: Option<&str>,
    s3: &str,
) -> Value {
    let name = w.name();
    let web = format!(
        "mkdir -p /www && echo '{name} gen{g}' > /www/index.html && exec httpd -f -p 8080 -h /www"
    );
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": name, "mode": "worker"},
        "generation": g,
        "issuedAt": now(),
        "networks": [{"name": "apps", "subnets": [{"subnet": w.subnet()}]}],
        "containers": [
            {"name": "web", "image": TEST_IMAGE, "command": ["sh", "-c", web],
             "network": "apps", "ip": w.web_ip(), "stopGracePeriod": "1s"},
            {"name": "client", "image": TEST_IMAGE, "command": ["sleep", "3600"],
             "network": "apps", "stopGracePeriod": "1s"},
        ],
        "wireguard": {
            "interface": w.iface,
            "listenPort": WG_PORT,
            "addresses": [format!("{}/24", mesh_addr(w.mesh()))],
            "peers": [peer(proxy.0, proxy.1, 1), peer(other.node(), &other.key, other.mesh())],
        },
        "firewall": {
            "publishedPorts": [{"protocol": "tcp", "hostPort": 8080,
                                "target": {"container": "web", "port": 8080},
                                "allowFrom": [format!("{}/32", mesh_addr(1))]}],
            "input": {"policy": "drop", "allow": [
                {"protocol": "udp", "ports": [WG_PORT]},
                {"from": [w.subnet()], "to": [format!("{}/32", w.gateway())],
                 "protocol": "tcp", "ports": [8500]},
            ]},
        },
        "dns": {"zone": "internal", "listen": [w.node().address().to_string()], "port": 53, "ttl": 5,
                "records": [
                    {"name": "web.internal", "type": "A", "container": "web"},
                    {"name": "metadata.internal", "type": "A", "values": [w.gateway()]},
                    {"name": format!("gen{g}.internal"), "type": "A", "values": [gen_addr(g, w.index)]},
                ]},
        "metadata": {"projects": [{"id": "app", "tokenSha256": sha(MD_TOKEN),
                                   "entries": {"greeting": format!("{name} gen{g}")}}]},
        "backups": backups(w.node(), g, archive, s3),
        "secrets": backup_secrets(),
    })
}

/// The proxy's document of generation `g`: the mesh to both workers, a route to each
/// worker's published port over it, DNS answering outside, metadata, backups.
fn proxy_doc(
    px: &TestNode,
    iface: &str,
    workers: &[&Worker],
    g: u64,
    archive: Option<&str>,
    s3: &str,
) -> Value {
    let routes: Vec<Value> = workers
        .iter()
        .map(|w| {
            json!({"name": w.name(), "hosts": [w.host()], "tls": "internal",
                   "upstreams": [{"peer": w.name(), "port": 8080}],
                   "responseHeaders": {"set": {"X-Generation": g.to_string()}}})
        })
        .collect();
    let mut records: Vec<Value> = workers
        .iter()
        .map(|w| json!({"name": format!("{}.internal", w.name()), "type": "A", "values": [mesh_addr(w.mesh())]}))
        .collect();
    records
        .push(json!({"name": format!("gen{g}.internal"), "type": "A", "values": [gen_addr(g, 0)]}));
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": px.name(), "mode": "proxy"},
        "generation": g,
        "issuedAt": now(),
        "wireguard": {
            "interface": iface,
            "listenPort": WG_PORT,
            "addresses": [format!("{}/24", mesh_addr(1))],
            "peers": workers.iter().map(|w| peer(w.node(), &w.key, w.mesh())).collect::<Vec<_>>(),
        },
        "routes": {"routes": routes},
        "firewall": {"input": {"policy": "drop", "allow": [
            {"protocol": "tcp", "ports": [443]},
            {"protocol": "udp", "ports": [WG_PORT, 53]},
        ]}},
        "dns": {"zone": "internal", "listen": [px.address().to_string()], "port": 53, "ttl": 5,
                "records": records},
        "metadata": {"projects": [{"id": "ops", "tokenSha256": sha(MD_TOKEN),
                                   "entries": {"generation": g}}]},
        "backups": backups(px, g, archive, s3),
        "secrets": backup_secrets(),
    })
}

/// With `CONVERGE_TEST_KEEP_LOGS=DIR`, copies each node's agent log there when dropped
/// (also after a failed check), before the nodes and their data dirs go.
/// Its entries: file name there, log path.
struct KeepLogs(Vec<(String, PathBuf)>);

impl Drop for KeepLogs {
    fn drop(&mut self) {
        let Some(dir) = std::env::var_os("CONVERGE_TEST_KEEP_LOGS") else {
            return;
        };
        for (name, log) in &self.0 {
            let to = Path::new(&dir).join(name);
            if let Err(e) = std::fs::copy(log, &to) {
                eprintln!("keep {}: {e}", to.display());
            }
        }
    }
}

/// One row of the printed matrix.
struct Row {
    check: String,
    node: String,
    daemon: &'static str,
    generation: u64,
    took: Duration,
}

/// The nodes' own view for a failure message: `converge status` of each.
fn diagnosis(nodes: &[&TestNode]) -> String {
    let mut s = String::new();
    for n in nodes {
        let out = converge(n, &["status"]);
        let _ = writeln!(
            s,
            "--- {}:\n{}",
            n.name(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    s
}

/// Polls `f` every 200 ms until it gives a value; after `timeout` panics naming `what`,
/// its last complaint and the nodes' status. `CONVERGE_TEST_TRACE` prints each new
/// complaint as it comes.
fn poll<T>(
    nodes: &[&TestNode],
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    let deadline = start + timeout;
    let trace = std::env::var_os("CONVERGE_TEST_TRACE").is_some();
    let mut seen = String::new();
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) => {
                if trace && last != seen {
                    eprintln!("{:>6.1} s {what}: {last}", start.elapsed().as_secs_f64());
                    seen = last.clone();
                }
                if Instant::now() >= deadline {
                    panic!(
                        "timed out after {timeout:?} waiting for {what}; last: {last}\n{}",
                        diagnosis(nodes)
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// borg on a node's repository, as an operator runs it (its own base dir).
fn borg(node: &TestNode, args: &[&str]) -> std::process::Output {
    Command::new("borg")
        .args(args)
        .env("BORG_PASSPHRASE", PASSPHRASE)
        .env("BORG_BASE_DIR", node.data_dir().join("borg-cli"))
        .stdin(Stdio::null())
        .output()
        .expect("run borg")
}

/// The repository's archives, oldest first (None while borg cannot read it, e.g. the
/// agent's run holds its lock for longer than we wait).
fn archives(node: &TestNode) -> Option<Vec<String>> {
    let repo = repo(node).display().to_string();
    let out = borg(node, &["list", "--short", "--lock-wait", "5", &repo]);
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.ends_with(".checkpoint"))
            .map(String::from)
            .collect()
    })
}

/// Writes generation `g`'s data into the node's source directory (`seed` makes it the
/// node's own); returns it as relative path → bytes.
fn write_src(node: &TestNode, seed: u64, g: u64) -> BTreeMap<String, Vec<u8>> {
    let files = BTreeMap::from([
        (
            "generation.txt".to_string(),
            format!("{} gen{g}\n", node.name()).into_bytes(),
        ),
        (
            "data/blob".to_string(),
            random_bytes(g * 10 + seed, 256 << 10),
        ),
    ]);
    for (rel, bytes) in &files {
        let path = src(node).join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("src dir");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).expect("write src");
        std::fs::rename(&tmp, &path).expect("rename src");
    }
    files
}

/// Every regular file below `dir`: relative path → bytes.
fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                let rel = p
                    .strip_prefix(dir)
                    .expect("below dir")
                    .display()
                    .to_string();
                out.insert(rel, bytes);
            }
        }
    }
    out
}

/// `cmd` inside `container` of the worker's runtime; its stdout on success.
fn exec(w: &Worker, container: &str, cmd: &[&str]) -> Result<String, String> {
    let mut args = vec!["exec", container];
    args.extend_from_slice(cmd);
    let out = w.rt.run(&args);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(stderr(&out))
    }
}

/// Starts moto (S3) in the plane's node on its bridge address and makes the bucket.
fn start_s3(cp: &Cp) -> Spawned {
    let mut moto = cp.node.command("moto_server");
    moto.args([
        "-H",
        &cp.node.address().to_string(),
        "-p",
        &S3_PORT.to_string(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let child = cp.node.spawn(&mut moto);
    let endpoint = format!("http://{}:{S3_PORT}", cp.node.address());
    let curl = |args: &[&str]| cp.node.run("curl", args).status.success();
    poll(&[], Duration::from_secs(30), "moto up", || {
        curl(&["-sf", "-o", "/dev/null", &endpoint])
            .then_some(())
            .ok_or_else(|| "no answer".to_string())
    });
    assert!(curl(&[
        "-sf",
        "-X",
        "PUT",
        &format!("{endpoint}/{S3_BUCKET}")
    ]));
    child
}

#[test]
fn three_nodes_end_to_end_over_nats() {
    for tool in [
        "wireguard-go",
        "wg",
        "curl",
        "podman",
        "dockerd",
        "borg",
        "moto_server",
        "nats-server",
        "dnsmasq",
        "nft",
    ] {
        require_tool(tool);
    }
    let started = Instant::now();
    let mut matrix: Vec<Row> = Vec::new();
    let cp = Cp::new(true);
    // S3 in the plane's node: outside the workers, reachable by them and by the client.
    let _moto = start_s3(&cp);
    let s3 = format!("http://{}:{S3_PORT}", cp.node.address());
    let n1 = TestNode::new("w1-podman");
    let n2 = TestNode::new("w2-docker");
    let px = TestNode::new("proxy");
    // The two daemons start side by side (dockerd takes a few seconds).
    let (svc, dockerd) = std::thread::scope(|s| {
        let d = s.spawn(|| start_docker(&n2));
        let p = start_podman(&n1);
        (p, d.join().expect("start dockerd"))
    });
    let (if_p, key_p) = key(&px, "p");
    let (if_1, key_1) = key(&n1, "1");
    let (if_2, key_2) = key(&n2, "2");
    let w1 = Worker {
        rt: Runtime::podman(&n1, &svc),
        index: 1,
        iface: if_1,
        key: key_1,
    };
    let w2 = Worker {
        rt: Runtime::docker(&n2, &dockerd),
        index: 2,
        iface: if_2,
        key: key_2,
    };
    let workers = [&w1, &w2];
    let all: [&TestNode; 3] = [&n1, &n2, &px];
    let mut kept: Vec<(String, PathBuf)> = all
        .iter()
        .map(|n| (format!("{}.log", n.name()), agent_log(n)))
        .collect();
    kept.push(("control-plane.log".into(), cp.root.join("cp.log")));
    kept.push(("nats.log".into(), cp.root.join("nats-0.log")));
    let _logs = KeepLogs(kept);
    let enrolled = Instant::now();
    for (node, extra) in [(&n1, &[][..]), (&n2, &[][..]), (&px, &["--proxy"][..])] {
        let out = join(node, &cp, &cp.token(600), extra);
        assert!(
            out.status.success(),
            "join {}: {}",
            node.name(),
            stderr(&out)
        );
    }
    let control: Value = serde_json::from_slice(
        &std::fs::read(data(&n1).join("control.json")).expect("control.json"),
    )
    .expect("control.json parses");
    assert_eq!(control["transport"]["kind"], "nats", "{control}");

    let backups_time = format!("{BACKUPS_TIME_SCALE}@{}", chrono::Utc::now().timestamp());
    let resync = ["--resync-secs", "5"];
    let mut agents: Vec<Spawned> = Vec::new();
    for w in &workers {
        let mut args = w.rt.agent_args();
        args.extend(resync.map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        agents.push(start_enrolled_agent(
            w.node(),
            &args,
            &[("CONVERGE_TEST_BACKUPS_TIME", &backups_time)],
        ));
    }
    let caddy = caddy_bin();
    agents.push(start_enrolled_agent(
        &px,
        &["--proxy", "--caddy", &caddy, resync[0], resync[1]],
        &[("CONVERGE_TEST_BACKUPS_TIME", &backups_time)],
    ));
    let t_setup = started.elapsed();

    // Per node: the archive of the generation before (name, data), to restore and export.
    let mut previous: BTreeMap<&str, (String, BTreeMap<String, Vec<u8>>)> = BTreeMap::new();
    // The nodes with backups: node, seed of its data, its container runtime.
    let backed: [(&TestNode, u64, &'static str); 3] =
        [(&n1, 1, "podman"), (&n2, 2, "docker"), (&px, 3, "-")];
    for g in 1..=GENERATIONS {
        let t_gen = Instant::now();
        let timeout = if g == 1 { FIRST_TIMEOUT } else { TIMEOUT };
        let mut row = |check: &str, node: &str, daemon: &'static str, took: Duration| {
            matrix.push(Row {
                check: check.into(),
                node: node.into(),
                daemon,
                generation: g,
                took,
            })
        };
        // This generation's data, then the documents (the plane reads each file whole:
        // `publish` renames it into place). The archives listed once the data is written:
        // an archive of it is the second one not listed (the first may have begun before).
        let mut data_g = BTreeMap::new();
        let mut before = BTreeMap::new();
        for (node, seed, _) in backed {
            data_g.insert(node.name(), write_src(node, seed, g));
            let listed = if g == 1 {
                Vec::new() // no repository before the first document
            } else {
                poll(&all, TIMEOUT, "borg list", || {
                    archives(node).ok_or_else(|| "locked".into())
                })
            };
            before.insert(node.name(), listed);
        }
        let archive_of = |node: &TestNode| previous.get(node.name()).map(|(a, _)| a.clone());
        for (w, other) in [(&w1, &w2), (&w2, &w1)] {
            let archive = archive_of(w.node());
            let doc = worker_doc(w, other, (&px, &key_p), g, archive.as_deref(), &s3);
            cp.publish(w.name(), &doc);
        }
        let archive = archive_of(&px);
        let doc = proxy_doc(&px, &if_p, &workers, g, archive.as_deref(), &s3);
        cp.publish(px.name(), &doc);

        // Accepted over NATS, as the nodes report to the plane.
        for n in all {
            poll(
                &all,
                TIMEOUT,
                &format!("{} accepts generation {g}", n.name()),
                || {
                    let r = cp.record(n.name());
                    if r["acceptedGeneration"] == g {
                        Ok(())
                    } else {
                        Err(format!(
                            "record: accepted {} refused {}",
                            r["acceptedGeneration"], r["refused"]
                        ))
                    }
                },
            );
        }
        row(
            "accepted over NATS (plane's record)",
            "all three",
            "-",
            t_gen.elapsed(),
        );

        // HTTPS through the proxy, from outside, to each worker's container over the mesh.
        for w in &workers {
            let t = Instant::now();
            let want = w.page(g);
            poll(
                &all,
                timeout,
                &format!("https://{} through the proxy at {g}", w.host()),
                || match https_get_from(&cp.node, &px, &w.host(), &px.address().to_string(), &[]) {
                    Some((headers, body))
                        if body == want
                            && headers
                                .to_ascii_lowercase()
                                .contains(&format!("x-generation: {g}")) =>
                    {
                        Ok(())
                    }
                    Some((headers, body)) => Err(format!("{body:?} {headers:?}")),
                    None => Err("no answer".into()),
                },
            );
            row(
                "HTTPS via proxy -> container over the mesh",
                w.name(),
                w.rt.kind,
                t.elapsed(),
            );
            // On Docker that went through converge's rule in DOCKER-USER (dockerd's
            // FORWARD policy drops what it did not DNAT itself); nobody else added one.
            if w.rt.kind == "docker" {
                let chain = w.node().run("iptables", ["-S", "DOCKER-USER"]);
                let chain = String::from_utf8_lossy(&chain.stdout);
                assert!(
                    chain.contains("--comment \"converge: published ports\""),
                    "{chain}"
                );
            }
            // The published port is the proxy's only: closed to the outside.
            let t = Instant::now();
            let direct = cp.node.run(
                "curl",
                [
                    "-s",
                    "-m",
                    "1",
                    &format!("http://{}:8080/", w.node().address()),
                ],
            );
            assert!(
                !direct.status.success(),
                "{}'s port 8080 answered the outside",
                w.name()
            );
            row(
                "published port closed to others (allowFrom)",
                w.name(),
                w.rt.kind,
                t.elapsed(),
            );
        }

        // The proxy's DNS, asked from outside.
        let t = Instant::now();
        let server = std::net::SocketAddr::from((px.address(), 53));
        poll(&all, timeout, "the proxy's DNS", || {
            cp.node.in_netns(|| {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
                let mut got = Vec::new();
                let mut want = Vec::new();
                for (name, addr) in workers
                    .iter()
                    .map(|w| (format!("{}.internal", w.name()), mesh_addr(w.mesh())))
                    .chain([(format!("gen{g}.internal"), gen_addr(g, 0))])
                {
                    let a = dnsq::query(
                        &sock,
                        server,
                        &name,
                        hickory_proto::rr::RecordType::A,
                        Duration::from_secs(1),
                    )
                    .map_err(|e| format!("{name}: {e}"))?;
                    got.push(a.values);
                    want.push(vec![addr]);
                }
                (got == want).then_some(()).ok_or(format!("{got:?}"))
            })
        });
        row("DNS answers from outside", px.name(), "-", t.elapsed());

        for w in &workers {
            // Names resolve inside a container (the node's dnsmasq on its gateway).
            let t = Instant::now();
            let gen_name = format!("gen{g}.internal");
            poll(
                &all,
                timeout,
                &format!("names in {}'s client at {g}", w.name()),
                || {
                    let web = w.rt.nslookup("client", &["web.internal"]);
                    let gen = w.rt.nslookup("client", &[&gen_name]);
                    let old = if g > 1 {
                        w.rt.nslookup("client", &[&format!("gen{}.internal", g - 1)])
                    } else {
                        Vec::new()
                    };
                    (web == [w.web_ip()] && gen == [gen_addr(g, w.index)] && old.is_empty())
                        .then_some(())
                        .ok_or(format!("web {web:?} {gen_name} {gen:?} previous {old:?}"))
                },
            );
            row(
                "names resolve inside a container",
                w.name(),
                w.rt.kind,
                t.elapsed(),
            );

            // The container reads its metadata by name.
            let t = Instant::now();
            let want = format!("\"{} gen{g}\"", w.name());
            let auth = format!("Authorization: Bearer {MD_TOKEN}");
            poll(
                &all,
                timeout,
                &format!("{}'s container reads its metadata at {g}", w.name()),
                || {
                    let got = exec(
                        w,
                        "client",
                        &[
                            // busybox's own timeout: its `wget -T` segfaults here.
                            "busybox",
                            "timeout",
                            "5",
                            "wget",
                            "-q",
                            "-O",
                            "-",
                            "--header",
                            "Converge-Metadata: true",
                            "--header",
                            &auth,
                            "http://metadata.internal:8500/v1/metadata/greeting",
                        ],
                    )?;
                    (got.trim() == want).then_some(()).ok_or(got)
                },
            );
            row(
                "a container reads its metadata",
                w.name(),
                w.rt.kind,
                t.elapsed(),
            );
        }
        // Backups on all three: an archive of this generation's data, and (from the
        // second generation on) the previous one's restored and exported.
        for (node, _, daemon) in backed {
            // An archive of this generation's data: the second run not listed after it
            // was written (the first may have begun before).
            let t = Instant::now();
            let seen = &before[node.name()];
            let archive = poll(
                &all,
                timeout,
                &format!("{}: an archive of generation {g}", node.name()),
                || {
                    let now = archives(node).ok_or("locked")?;
                    let new: Vec<&String> = now.iter().filter(|a| !seen.contains(a)).collect();
                    match new.as_slice() {
                        [_, .., last] => Ok((*last).clone()),
                        _ => Err(format!("{now:?}")),
                    }
                },
            );
            row(
                "an archive appears (borg list)",
                node.name(),
                daemon,
                t.elapsed(),
            );

            if let Some((prev, prev_data)) = previous.get(node.name()) {
                // Restored side by side, byte-identical to the data it archived.
                let t = Instant::now();
                let dest =
                    PathBuf::from(format!("{}.restore-r{g}", restore_target(node).display()));
                poll(
                    &all,
                    timeout,
                    &format!("{}: restore r{g} of {prev}", node.name()),
                    || {
                        dest.is_dir()
                            .then_some(())
                            .ok_or_else(|| format!("no {}", dest.display()))
                    },
                );
                let restored = read_tree(&dest);
                assert!(
                    restored == *prev_data,
                    "{}: restore of {prev} differs: {:?} vs {:?}",
                    node.name(),
                    restored.keys().collect::<Vec<_>>(),
                    prev_data.keys().collect::<Vec<_>>()
                );
                row(
                    "restore byte-identical (side by side)",
                    node.name(),
                    daemon,
                    t.elapsed(),
                );

                // The export's presigned URL, from the status the node sent to the plane,
                // downloads exactly `borg export-tar`.
                let t = Instant::now();
                let url = poll(
                    &all,
                    timeout,
                    &format!("{}: export e{g}'s URL at the plane", node.name()),
                    || {
                        let status = cp.record(node.name())["status"].clone();
                        let note = status["reconcilers"]
                            .as_array()
                            .and_then(|rs| rs.iter().find(|r| r["reconciler"] == "backups"))
                            .and_then(|r| r["objects"].as_array())
                            .and_then(|os| {
                                os.iter().find(|o| o["object"] == format!("export e{g}"))
                            })
                            .and_then(|o| o["note"].as_str())
                            .ok_or("no note on the export yet")?
                            .to_string();
                        let marker = "; url ";
                        let u = note
                            .find(marker)
                            .ok_or_else(|| format!("no url yet: {note}"))?;
                        let url = &note[u + marker.len()..];
                        let end = url.find(" (expires").ok_or("no expiry")?;
                        Ok(url[..end].to_string())
                    },
                );
                let got = cp.node.run("curl", ["-sf", "-m", "30", &url]);
                assert!(got.status.success(), "download {url}: {}", stderr(&got));
                let repo = repo(node).display().to_string();
                let want = borg(
                    node,
                    &[
                        "export-tar",
                        "--lock-wait",
                        "60",
                        &format!("{repo}::{prev}"),
                        "-",
                    ],
                );
                assert!(want.status.success(), "borg export-tar: {}", stderr(&want));
                assert!(
                    got.stdout == want.stdout,
                    "{}: the export of {prev} ({} bytes) differs from borg export-tar ({} bytes)",
                    node.name(),
                    got.stdout.len(),
                    want.stdout.len()
                );
                row(
                    "export: presigned URL downloads export-tar",
                    node.name(),
                    daemon,
                    t.elapsed(),
                );
            }
            let data = data_g.remove(node.name()).expect("data");
            previous.insert(node.name(), (archive, data));
        }
        row("generation total", "all three", "-", t_gen.elapsed());
    }

    let mut table =
        String::from("| check | node | daemon | gen | passed after |\n|---|---|---|---|---|\n");
    for r in &matrix {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {:.1} s |",
            r.check,
            r.node,
            r.daemon,
            r.generation,
            r.took.as_secs_f64()
        );
    }
    eprintln!(
        "{table}setup (plane, NATS, S3, nodes, daemons, keys, enrollment, agents): {:.1} s; enrollment to the last check: {:.1} s; total: {:.1} s",
        t_setup.as_secs_f64(),
        enrolled.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
