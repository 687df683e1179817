//! A private container registry for tests: distribution (Debian's `docker-registry`) in a
//! node's network namespace, serving TLS with a throwaway CA and asking for htpasswd
//! credentials. Podman and dockerd trust the CA through their `certs.d/<host:port>/`
//! directories (written for this registry's address only, removed on drop); the registry
//! is stopped on drop.

use super::sandbox::{require_tool, wait_until, Spawned, TestNode};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub const USER: &str = "ci";
pub const PASSWORD: &str = "registry-test-password-7c1e";

/// A running registry (see the module doc).
pub struct Registry {
    /// `ip:port`, as image references name it.
    pub server: String,
    /// The CA that signed its certificate (`ca.crt` inside).
    pub cert_dir: PathBuf,
    trusted: Vec<PathBuf>,
    _child: Spawned,
}

impl Drop for Registry {
    fn drop(&mut self) {
        for d in &self.trusted {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts a registry on the node's address, port `port`.
pub fn start_registry(node: &TestNode, port: u16) -> Registry {
    for tool in ["docker-registry", "htpasswd", "openssl", "curl"] {
        require_tool(tool);
    }
    let dir = node.data_dir().join("registry");
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).expect("registry dir");
    let ip = node.address().to_string();
    let server = format!("{ip}:{port}");
    let p = |n: &str| certs.join(n).display().to_string();
    run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=converge test registry CA",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.crt"),
    ]));
    run(Command::new("openssl").args([
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        &format!("/CN={ip}"),
        "-keyout",
        &p("server.key"),
        "-out",
        &p("server.csr"),
    ]));
    std::fs::write(certs.join("san.ext"), format!("subjectAltName=IP:{ip}\n")).expect("san");
    run(Command::new("openssl").args([
        "x509",
        "-req",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p("san.ext"),
        "-out",
        &p("server.crt"),
    ]));
    let htpasswd = dir.join("htpasswd");
    let out = Command::new("htpasswd")
        .args(["-Bbn", USER, PASSWORD])
        .output()
        .expect("htpasswd");
    assert!(out.status.success());
    std::fs::write(&htpasswd, out.stdout).expect("write htpasswd");
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {server}\n  tls:\n    certificate: {}\n    key: {}\n\
             auth:\n  htpasswd:\n    realm: converge-test\n    path: {}\n",
            dir.join("data").display(),
            p("server.crt"),
            p("server.key"),
            htpasswd.display()
        ),
    )
    .expect("registry config");
    let mut cmd = node.command("docker-registry");
    cmd.arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = node.spawn(&mut cmd);
    let url = format!("https://{server}/v2/");
    wait_until(Duration::from_secs(30), "the registry answers", || {
        node.command("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                &p("ca.crt"),
                &url,
            ])
            .output()
            .is_ok_and(|o| o.stdout == b"401")
    });
    // Both daemons look for `certs.d/<host:port>/ca.crt`; `podman push` for a directory
    // holding only CA certificates.
    let cert_dir = dir.join("trust");
    std::fs::create_dir_all(&cert_dir).expect("trust dir");
    std::fs::copy(certs.join("ca.crt"), cert_dir.join("ca.crt")).expect("trust the CA");
    let mut trusted = Vec::new();
    for base in ["/etc/containers/certs.d", "/etc/docker/certs.d"] {
        let d = Path::new(base).join(&server);
        std::fs::create_dir_all(&d).expect("certs.d");
        std::fs::copy(certs.join("ca.crt"), d.join("ca.crt")).expect("trust the CA");
        trusted.push(d);
    }
    Registry {
        server,
        cert_dir,
        trusted,
        _child: child,
    }
}

impl Registry {
    /// Pushes local image `image` (of the podman storage `podman_args` names) as
    /// `<server>/<name>`, with the registry's credentials; returns its manifest digest.
    pub fn push(&self, node: &TestNode, podman_args: &[String], image: &str, name: &str) -> String {
        let digest_file = node
            .data_dir()
            .join(format!("registry/{}.digest", name.replace(['/', ':'], "_")));
        let out = node
            .command("podman")
            .args(podman_args)
            .arg("push")
            .arg("--cert-dir")
            .arg(&self.cert_dir)
            .args(["--creds", &format!("{USER}:{PASSWORD}")])
            .arg("--digestfile")
            .arg(&digest_file)
            .arg(image)
            .arg(format!("{}/{name}", self.server))
            .output()
            .expect("podman push");
        assert!(
            out.status.success(),
            "podman push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(&digest_file)
            .expect("digest file")
            .trim()
            .to_string()
    }
}
