//! The reference control plane in a sandbox node of its own, as the control-plane and
//! end-to-end tests run it: a private CA and a certificate for the plane's address,
//! `converge control-plane serve` over HTTPS and, for NATS, a real nats-server with TLS
//! and nkeys (the plane writes its users file); enrollment with `converge join` and the
//! enrolled agent.
//!
//! The servers listen on the control-plane node's bridge address rather than 127.0.0.1:
//! the agents run in other network namespaces, where the host's loopback is not reachable.

use super::agent::{converge, data};
use super::sandbox::{converge_bin, require_tool, wait_until, Spawned, TestNode};
use serde_json::Value;
use std::fs;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

pub const NATS_SERVER: &str = "/usr/sbin/nats-server";
pub const NATS_PORT: u16 = 4222;
pub const HTTP_PORT: u16 = 8443;

/// A control plane (and, for NATS, its nats-server) in a sandbox node of its own.
pub struct Cp {
    pub node: TestNode,
    /// Its files: CA, certificates, NATS configuration, `docs/`, `data/`, logs.
    pub root: PathBuf,
    /// The namespaces of NATS servers 1.. of a cluster (server 0 runs in `node`).
    nats_hosts: Vec<TestNode>,
    nats: Vec<Option<Spawned>>,
    /// The plane's instances: the first in `node`, a second (shared state) in the
    /// namespace of NATS server 1.
    planes: [Option<Spawned>; 2],
    use_nats: bool,
    /// `--state nats`: the instances share enrollment, status and rollouts.
    shared: bool,
}

impl Cp {
    pub fn new(use_nats: bool) -> Cp {
        Cp::build(use_nats, 1, false)
    }

    /// A plane on a JetStream cluster of `n` nats-servers, each in its own namespace
    /// (routes between them; the documents bucket with `n` replicas, at most 3).
    pub fn cluster(n: usize) -> Cp {
        Cp::build(true, n, false)
    }

    /// Two plane instances with shared state (`--state nats`) on a cluster of 3, the
    /// documents bucket split over 4 streams (`--nats-shards 4`): the second has its own
    /// data directory with the first one's keys, the same documents directory and users
    /// file, and listens in the namespace of NATS server 1.
    pub fn two_instances() -> Cp {
        let mut cp = Cp::build(true, 3, true);
        let b = cp.data_dir(1);
        fs::create_dir_all(&b).expect("second data dir");
        fs::set_permissions(&b, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod");
        for key in ["signing.key", "nats.key"] {
            fs::copy(cp.data_dir(0).join(key), b.join(key)).expect("copy the plane's keys");
        }
        cp.start_instance(1);
        cp
    }

    fn build(use_nats: bool, servers: usize, shared: bool) -> Cp {
        let node = TestNode::new("cp");
        let root = node.data_dir().join("cp");
        fs::create_dir_all(root.join("docs")).expect("docs dir");
        fs::create_dir_all(root.join("data")).expect("data dir");
        let mut cp = Cp {
            node,
            root,
            nats_hosts: (1..servers)
                .map(|i| TestNode::new(&format!("nats{i}")))
                .collect(),
            nats: Vec::new(),
            planes: [None, None],
            use_nats,
            shared,
        };
        // A private CA and a certificate for the control plane's address: HTTPS with
        // rustls, the CA trusted by the nodes through `join --ca`.
        require_tool("openssl");
        let r = |f: &str| cp.root.join(f).display().to_string();
        fs::write(
            cp.root.join("leaf.ext"),
            format!(
                "basicConstraints=critical,CA:FALSE\nsubjectAltName={}\n",
                (0..servers)
                    .map(|i| format!("IP:{}", cp.nats_host(i).address()))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        )
        .expect("ext");
        for args in [
            vec![
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=converge test CA",
                "-keyout",
                &r("ca.key"),
                "-out",
                &r("ca.crt"),
            ],
            vec![
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                "/CN=converge-cp",
                "-keyout",
                &r("tls.key"),
                "-out",
                &r("tls.csr"),
            ],
            vec![
                "x509",
                "-req",
                "-in",
                &r("tls.csr"),
                "-CA",
                &r("ca.crt"),
                "-CAkey",
                &r("ca.key"),
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &r("leaf.ext"),
                "-out",
                &r("tls.crt"),
            ],
        ] {
            let out = std::process::Command::new("openssl")
                .args(&args)
                .output()
                .expect("openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
        }
        if use_nats {
            require_tool("nats-server");
            let routes: Vec<String> = (0..servers)
                .map(|i| format!("\"nats-route://{}:6222\"", cp.nats_host(i).address()))
                .collect();
            for i in 0..servers {
                let r = |f: &str| cp.root.join(f).display().to_string();
                let mut conf = format!(
                    "server_name: n{i}\nlisten: \"{addr}:{NATS_PORT}\"\njetstream {{ store_dir: \"{js}\" }}\npid_file: \"{pid}\"\nlog_file: \"{log}\"\nmax_payload: 8MB\ntls {{ cert_file: \"{crt}\", key_file: \"{key}\" }}\ninclude ./auth.conf\n",
                    addr = cp.nats_host(i).address(),
                    crt = r("tls.crt"),
                    key = r("tls.key"),
                    js = r(&format!("js-{i}")),
                    pid = r(&format!("nats-{i}.pid")),
                    log = r(&format!("nats-{i}.log")),
                );
                if servers > 1 {
                    // Monitoring, for /healthz (JetStream current after a restart).
                    conf.push_str(&format!("http: \"{}:8222\"\n", cp.nats_host(i).address()));
                    conf.push_str(&format!(
                        "cluster {{ name: converge, listen: \"{}:6222\", routes: [{}] }}\n",
                        cp.nats_host(i).address(),
                        routes.join(", ")
                    ));
                }
                fs::write(cp.root.join(format!("nats-{i}.conf")), conf).expect("nats.conf");
            }
            // The plane's own NATS user (its nkey) before the server first starts.
            let auth = cp.root.join("auth.conf");
            let out = cp.cli(&[
                "control-plane",
                "nats-auth",
                "--data",
                &cp.data(),
                "--out",
                auth.to_str().expect("path"),
            ]);
            assert!(out.status.success(), "nats-auth: {}", stderr(&out));
            cp.nats = (0..servers).map(|_| None).collect();
            for i in 0..servers {
                cp.start_nats_server(i, false);
            }
            for i in 0..servers {
                cp.wait_nats_server(i);
            }
        }
        cp.start_server();
        cp
    }

    /// The namespace of NATS server `i`.
    pub fn nats_host(&self, i: usize) -> &TestNode {
        match i {
            0 => &self.node,
            i => &self.nats_hosts[i - 1],
        }
    }

    /// NATS over TLS (the plane's certificate, signed by the CA nodes pin at join); a
    /// cluster's servers comma-separated.
    pub fn nats_url(&self) -> String {
        (0..self.nats.len().max(1))
            .map(|i| format!("tls://{}:{NATS_PORT}", self.nats_host(i).address()))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn http_url(&self) -> String {
        self.http_url_of(0)
    }

    /// The HTTPS URL of plane instance `i`.
    pub fn http_url_of(&self, i: usize) -> String {
        format!("https://{}:{HTTP_PORT}", self.nats_host(i).address())
    }

    /// The data directory of plane instance `i`.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        match i {
            0 => self.root.join("data"),
            i => self.root.join(format!("data-{i}")),
        }
    }

    pub fn ca(&self) -> String {
        self.root.join("ca.crt").display().to_string()
    }

    pub fn log(&self) -> String {
        self.log_of(0)
    }

    /// The log of plane instance `i`.
    pub fn log_of(&self, i: usize) -> String {
        fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    fn log_path(&self, i: usize) -> PathBuf {
        match i {
            0 => self.root.join("cp.log"),
            i => self.root.join(format!("cp-{i}.log")),
        }
    }

    /// What the NATS servers logged about permissions violations.
    pub fn nats_violations(&self) -> Vec<String> {
        (0..self.nats.len())
            .flat_map(|i| {
                fs::read_to_string(self.root.join(format!("nats-{i}.log")))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("Violation"))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// What NATS server `i`'s monitoring endpoint answers at `path` (None: no answer or
    /// an error status).
    fn monitor(&self, i: usize, path: &str) -> Option<String> {
        let url = format!("http://{}:8222/{path}", self.nats_host(i).address());
        self.nats_host(i)
            .command("curl")
            .args(["-sf", "-m", "2", &url])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// The NATS server (index) a client authenticated with the user `nkey` is connected
    /// to, from each server's monitoring endpoint.
    pub fn server_of(&self, nkey: &str) -> Option<usize> {
        (0..self.nats.len()).find(|&i| {
            self.monitor(i, "connz?auth=1")
                .is_some_and(|body| body.contains(nkey))
        })
    }

    /// For a failure message: for each server, whether one of its own clients subscribes
    /// to `subject`, and what its subscription list matches for it (`/subsz`, local and
    /// over routes).
    pub fn interest(&self, subject: &str) -> String {
        (0..self.nats.len())
            .map(|i| {
                let get = |path: &str| self.monitor(i, path).unwrap_or_default();
                let local = get("connz?subs=1").contains(subject);
                let matches = get(&format!("subsz?subs=1&test={subject}"));
                format!(
                    "n{i}: local subscriber {local}; subsz: {}",
                    matches.split_whitespace().collect::<String>()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether the plane has read `generation` of `node`'s file (and signed it).
    pub fn read_generation(&self, node: &str, generation: u64) -> bool {
        self.log().contains(&format!(
            "publishing document node={node} generation={generation}"
        ))
    }

    pub fn start_nats(&mut self) {
        self.start_nats_server(0, true);
    }

    pub fn stop_nats(&mut self) {
        self.stop_nats_server(0);
    }

    /// Starts NATS server `i` (its log anew), waiting until it is ready if `wait`.
    pub fn start_nats_server(&mut self, i: usize, wait: bool) {
        let _ = fs::remove_file(self.root.join(format!("nats-{i}.log")));
        let mut cmd = self.nats_host(i).command(NATS_SERVER);
        cmd.arg("-c")
            .arg(self.root.join(format!("nats-{i}.conf")))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.nats[i] = Some(self.nats_host(i).spawn(&mut cmd));
        if wait {
            self.wait_nats_server(i);
        }
    }

    pub fn wait_nats_server(&self, i: usize) {
        let log = self.root.join(format!("nats-{i}.log"));
        wait_until(Duration::from_secs(30), "nats-server ready", || {
            fs::read_to_string(&log).is_ok_and(|l| l.contains("Server is ready"))
        });
    }

    /// Waits until server `i` says its JetStream assets are current (`/healthz`).
    pub fn wait_nats_healthy(&self, i: usize) {
        wait_until(Duration::from_secs(60), "nats-server healthy", || {
            self.monitor(i, "healthz").is_some()
        });
    }

    /// Waits until server `i` has its routes to every other server of the cluster
    /// (`/routez`): core NATS interest crosses the cluster again.
    pub fn wait_nats_routes(&self, i: usize) {
        let others = self.nats.len() - 1;
        wait_until(Duration::from_secs(60), "nats-server routes", || {
            self.monitor(i, "routez")
                .and_then(|body| serde_json::from_str::<Value>(&body).ok())
                .is_some_and(|r| r["num_routes"].as_u64() >= Some(others as u64))
        });
    }

    /// kill -9 of NATS server `i`.
    pub fn stop_nats_server(&mut self, i: usize) {
        if let Some(mut c) = self.nats[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_server(&mut self) {
        self.start_instance(0);
    }

    /// Starts plane instance `i` and waits until it serves (with shared state: until its
    /// buckets are open).
    pub fn start_instance(&mut self, i: usize) {
        let ready = match self.shared {
            true => "plane state shared on NATS",
            false => "control plane serving",
        };
        let before = self.log_of(i).matches(ready).count();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("cp.log");
        let host = self.nats_host(i);
        let mut cmd = host.command(converge_bin());
        cmd.args(["control-plane", "serve", "--dir"])
            .arg(self.root.join("docs"))
            .arg("--data")
            .arg(self.data_dir(i))
            .args(["--listen", &format!("{}:{HTTP_PORT}", host.address())])
            .arg("--tls-cert")
            .arg(self.root.join("tls.crt"))
            .arg("--tls-key")
            .arg(self.root.join("tls.key"))
            .arg("--fleet-page")
            .stdout(Stdio::null())
            .stderr(log);
        if self.use_nats {
            cmd.args(["--nats", &self.nats_url()])
                .args(["--nats-ca", &self.ca()])
                .arg("--nats-auth-file")
                .arg(self.root.join("auth.conf"))
                .args(["--nats-replicas", &self.nats.len().min(3).to_string()]);
            for i in 0..self.nats.len() {
                cmd.arg("--nats-pid-file")
                    .arg(self.root.join(format!("nats-{i}.pid")));
            }
            if self.shared {
                cmd.args(["--state", "nats", "--nats-shards", "4"]);
            }
        }
        self.planes[i] = Some(host.spawn(&mut cmd));
        wait_until(Duration::from_secs(30), "control plane serving", || {
            self.log_of(i).matches(ready).count() > before
        });
    }

    pub fn stop_server(&mut self) {
        self.stop_instance(0);
    }

    /// kill -9 of plane instance `i`.
    pub fn stop_instance(&mut self, i: usize) {
        if let Some(mut c) = self.planes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The fleet page as headless Chromium renders it (its DOM); a screenshot goes to
    /// `$CARGO_TARGET_TMPDIR/fleet-<shot>.png` and its path to the test output. Without the token the page
    /// is refused.
    pub fn fleet_page(&self, shot: &str) -> String {
        require_tool("chromium");
        let token =
            fs::read_to_string(self.root.join("data/fleet-page.token")).expect("fleet page token");
        let url = format!("{}/fleet?token={}", self.http_url(), token.trim());
        let chromium = |extra: &[String]| {
            let profile = tempfile::tempdir().expect("profile dir");
            let out = self
                .node
                .command("chromium")
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    // The plane's certificate is from the test CA.
                    "--ignore-certificate-errors",
                    "--window-size=1200,900",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .args(extra)
                .output()
                .expect("run chromium");
            assert!(out.status.success(), "chromium: {}", stderr(&out));
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        // Kept after the test: cargo's scratch directory for integration tests.
        let png = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fleet-{shot}.png"));
        chromium(&[format!("--screenshot={}", png.display()), url.clone()]);
        eprintln!("fleet page screenshot: {}", png.display());
        let denied = chromium(&[
            "--dump-dom".into(),
            format!("{}/fleet?token=wrong", self.http_url()),
        ]);
        assert!(!denied.contains("converge fleet"), "{denied}");
        chromium(&["--dump-dom".into(), url])
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.node
            .command(converge_bin())
            .args(args)
            .output()
            .expect("run converge control-plane")
    }

    pub fn data(&self) -> String {
        self.data_dir(0).display().to_string()
    }

    pub fn token(&self, ttl: i64) -> String {
        self.token_on(0, ttl)
    }

    /// A token made on plane instance `i`.
    pub fn token_on(&self, i: usize, ttl: i64) -> String {
        let out = self.cli(&[
            "control-plane",
            "token",
            "--data",
            &self.data_dir(i).display().to_string(),
            // `=`: a negative ttl (an expired token) is not taken for a flag.
            &format!("--ttl-secs={ttl}"),
        ]);
        assert!(out.status.success(), "token: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Writes `<docs>/<node>.json` atomically (the control plane never reads half a file).
    pub fn publish(&self, node: &str, doc: &Value) {
        let tmp = self.root.join(format!(".{node}.tmp"));
        fs::write(&tmp, serde_json::to_vec_pretty(doc).expect("json")).expect("write doc");
        fs::rename(&tmp, self.root.join("docs").join(format!("{node}.json"))).expect("rename");
    }

    pub fn nodes(&self) -> Vec<Value> {
        self.nodes_on(0)
    }

    /// The nodes as plane instance `i` has them (its store: with shared state, its cache).
    pub fn nodes_on(&self, i: usize) -> Vec<Value> {
        let out = self.cli(&[
            "control-plane",
            "nodes",
            "--data",
            &self.data_dir(i).display().to_string(),
            "-o",
            "json",
        ]);
        assert!(out.status.success(), "nodes: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).expect("nodes json")
    }

    pub fn record(&self, id: &str) -> Value {
        self.record_on(0, id)
    }

    pub fn record_on(&self, i: usize, id: &str) -> Value {
        self.nodes_on(i)
            .into_iter()
            .find(|n| n["id"] == id)
            .unwrap_or(Value::Null)
    }

    /// The control plane's signed envelope of `doc` for `node`.
    pub fn sign(&self, node: &str, doc: &Value) -> String {
        let file = self
            .root
            .join(format!("sign-{node}-{}.json", doc["generation"]));
        fs::write(&file, serde_json::to_vec(doc).expect("json")).expect("write");
        let out = self.cli(&[
            "control-plane",
            "sign",
            "--data",
            &self.data(),
            "--node",
            node,
            file.to_str().expect("path"),
        ]);
        assert!(out.status.success(), "sign: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Puts raw envelope text under `node`'s key, bypassing the directory.
    pub fn put(&self, node: &str, envelope: &str) {
        let file = self.root.join(format!("put-{node}.json"));
        fs::write(&file, envelope).expect("write");
        let out = self.cli(&[
            "control-plane",
            "put",
            "--nats",
            &self.nats_url(),
            "--data",
            &self.data(),
            "--nats-ca",
            &self.ca(),
            "--node",
            node,
            file.to_str().expect("path"),
        ]);
        assert!(out.status.success(), "put: {}", stderr(&out));
    }
}

pub fn stderr(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn join(node: &TestNode, cp: &Cp, token: &str, extra: &[&str]) -> Output {
    join_as(node, node.name(), cp, token, extra)
}

/// `converge join` on `node` asking for the node name `name`.
pub fn join_as(node: &TestNode, name: &str, cp: &Cp, token: &str, extra: &[&str]) -> Output {
    join_at(node, name, cp, &cp.http_url(), token, extra)
}

/// `converge join` through plane instance `i` (`Cp::two_instances`).
pub fn join_through(node: &TestNode, cp: &Cp, i: usize, token: &str) -> Output {
    join_at(node, node.name(), cp, &cp.http_url_of(i), token, &[])
}

fn join_at(node: &TestNode, name: &str, cp: &Cp, url: &str, token: &str, extra: &[&str]) -> Output {
    let ca = cp.ca();
    let mut args = vec![
        "join", "--ca", &ca, "--url", url, "--token", token, "--name", name,
    ];
    args.extend_from_slice(extra);
    converge(node, &args)
}

pub fn join_ok(node: &TestNode, cp: &Cp) {
    let out = join(node, cp, &cp.token(600), &[]);
    assert!(out.status.success(), "join: {}", stderr(&out));
}

pub fn agent_log(node: &TestNode) -> PathBuf {
    node.data_dir().join("agent.log")
}

/// Starts the enrolled agent with its log in `agent.log` and a private secrets dir.
pub fn start_agent(node: &TestNode) -> Spawned {
    start_enrolled_agent(node, &[], &[])
}

/// Like [`start_agent`], with `extra` agent arguments (`--proxy`, `--runtime` …) and
/// environment. dnsmasq and a proxy's Caddy pair are killed with the node.
pub fn start_enrolled_agent(node: &TestNode, extra: &[&str], env: &[(&str, &str)]) -> Spawned {
    let sock = data(node).join("converge.sock");
    let _ = fs::remove_file(&sock);
    let secrets = node.data_dir().join("secrets");
    fs::create_dir_all(&secrets).expect("secrets dir");
    let log = fs::File::create(agent_log(node)).expect("agent log");
    let mut cmd = node.command(converge_bin());
    cmd.arg("--data-dir")
        .arg(data(node))
        .arg("--secrets-dir")
        .arg(&secrets)
        .args(["agent", "--node-id", node.name()])
        .args(extra)
        .env("CONVERGE_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log);
    let child = node.spawn(&mut cmd);
    node.track_pidfile(data(node).join("dns/dnsmasq.pid"));
    for i in ["a", "b"] {
        node.track_pidfile(data(node).join("caddy").join(i).join("caddy.pid"));
    }
    wait_until(Duration::from_secs(10), "agent socket", || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    child
}
