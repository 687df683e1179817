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
    nats: Option<Spawned>,
    server: Option<Spawned>,
    use_nats: bool,
}

impl Cp {
    pub fn new(use_nats: bool) -> Cp {
        let node = TestNode::new("cp");
        let root = node.data_dir().join("cp");
        fs::create_dir_all(root.join("docs")).expect("docs dir");
        fs::create_dir_all(root.join("data")).expect("data dir");
        let mut cp = Cp {
            node,
            root,
            nats: None,
            server: None,
            use_nats,
        };
        // A private CA and a certificate for the control plane's address: HTTPS with
        // rustls, the CA trusted by the nodes through `join --ca`.
        require_tool("openssl");
        let r = |f: &str| cp.root.join(f).display().to_string();
        fs::write(
            cp.root.join("leaf.ext"),
            format!(
                "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:{}\n",
                cp.node.address()
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
            let conf = format!(
                "listen: \"{addr}:{NATS_PORT}\"\njetstream {{ store_dir: \"{js}\" }}\npid_file: \"{pid}\"\nlog_file: \"{log}\"\nmax_payload: 8MB\ntls {{ cert_file: \"{crt}\", key_file: \"{key}\" }}\ninclude ./auth.conf\n",
                addr = cp.node.address(),
                crt = cp.root.join("tls.crt").display(),
                key = cp.root.join("tls.key").display(),
                js = cp.root.join("js").display(),
                pid = cp.root.join("nats.pid").display(),
                log = cp.root.join("nats.log").display(),
            );
            fs::write(cp.root.join("nats.conf"), conf).expect("nats.conf");
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
            cp.start_nats();
        }
        cp.start_server();
        cp
    }

    /// NATS over TLS (the plane's certificate, signed by the CA nodes pin at join).
    pub fn nats_url(&self) -> String {
        format!("tls://{}:{NATS_PORT}", self.node.address())
    }

    pub fn http_url(&self) -> String {
        format!("https://{}:{HTTP_PORT}", self.node.address())
    }

    pub fn ca(&self) -> String {
        self.root.join("ca.crt").display().to_string()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.root.join("cp.log")).unwrap_or_default()
    }

    /// Whether the plane has read `generation` of `node`'s file (and signed it).
    pub fn read_generation(&self, node: &str, generation: u64) -> bool {
        self.log().contains(&format!(
            "publishing document node={node} generation={generation}"
        ))
    }

    pub fn start_nats(&mut self) {
        let log = self.root.join("nats.log");
        let _ = fs::remove_file(&log);
        let mut cmd = self.node.command(NATS_SERVER);
        cmd.arg("-c")
            .arg(self.root.join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.nats = Some(self.node.spawn(&mut cmd));
        wait_until(Duration::from_secs(15), "nats-server ready", || {
            fs::read_to_string(&log).is_ok_and(|l| l.contains("Server is ready"))
        });
    }

    pub fn stop_nats(&mut self) {
        if let Some(mut c) = self.nats.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_server(&mut self) {
        let before = self.log().matches("control plane serving").count();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("cp.log"))
            .expect("cp.log");
        let mut cmd = self.node.command(converge_bin());
        cmd.args(["control-plane", "serve", "--dir"])
            .arg(self.root.join("docs"))
            .arg("--data")
            .arg(self.root.join("data"))
            .args(["--listen", &format!("{}:{HTTP_PORT}", self.node.address())])
            .arg("--tls-cert")
            .arg(self.root.join("tls.crt"))
            .arg("--tls-key")
            .arg(self.root.join("tls.key"))
            .stdout(Stdio::null())
            .stderr(log);
        if self.use_nats {
            cmd.args(["--nats", &self.nats_url()])
                .args(["--nats-ca", &self.ca()])
                .arg("--nats-auth-file")
                .arg(self.root.join("auth.conf"))
                .arg("--nats-pid-file")
                .arg(self.root.join("nats.pid"));
        }
        self.server = Some(self.node.spawn(&mut cmd));
        wait_until(Duration::from_secs(15), "control plane serving", || {
            self.log().matches("control plane serving").count() > before
        });
    }

    pub fn stop_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.node
            .command(converge_bin())
            .args(args)
            .output()
            .expect("run converge control-plane")
    }

    pub fn data(&self) -> String {
        self.root.join("data").display().to_string()
    }

    pub fn token(&self, ttl: i64) -> String {
        let out = self.cli(&[
            "control-plane",
            "token",
            "--data",
            &self.data(),
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
        let out = self.cli(&[
            "control-plane",
            "nodes",
            "--data",
            &self.data(),
            "-o",
            "json",
        ]);
        assert!(out.status.success(), "nodes: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).expect("nodes json")
    }

    pub fn record(&self, id: &str) -> Value {
        self.nodes()
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
    let url = cp.http_url();
    let ca = cp.ca();
    let mut args = vec![
        "join", "--ca", &ca, "--url", &url, "--token", token, "--name", name,
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
