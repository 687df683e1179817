//! Helpers shared by the export tests and the export benchmark: a moto S3 server on a
//! free 127.0.0.1 port, bucket and multipart-upload queries through boto3 (from moto's
//! venv), borg repositories, and seeded incompressible files.
#![allow(dead_code)] // each includer uses a different subset

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const MOTO: &str = "/usr/local/bin/moto_server";
pub const PYTHON: &str = "/opt/converge-tests/venv/bin/python";

/// A moto S3 server, killed on drop.
pub struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Moto {
    /// Starts moto on a free port; fails the test when it is not installed (as every
    /// test of the suite does for a missing tool: `./tests/run.sh` installs it).
    pub fn start() -> Self {
        assert!(
            Path::new(MOTO).exists(),
            "missing tool {MOTO}: run ./tests/run.sh which installs it"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(MOTO)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a boto3 snippet against moto (`s3` is the client) and returns its stdout.
pub fn boto(moto: &Moto, code: &str) -> String {
    let script = format!(
        "import boto3, sys\n\
         s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
             aws_access_key_id='testing', aws_secret_access_key='testing')\n{code}\n"
    );
    let out = Command::new(PYTHON)
        .arg("-c")
        .arg(script)
        .arg(moto.endpoint())
        .output()
        .expect("run boto3");
    assert!(
        out.status.success(),
        "boto3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn create_bucket(moto: &Moto, bucket: &str) {
    boto(moto, &format!("s3.create_bucket(Bucket={bucket:?})"));
}

/// ListMultipartUploads: how many uploads are open in `bucket`.
pub fn open_uploads(moto: &Moto, bucket: &str) -> usize {
    boto(
        moto,
        &format!("print(len(s3.list_multipart_uploads(Bucket={bucket:?}).get('Uploads', [])))"),
    )
    .parse()
    .expect("upload count")
}

/// Runs a command to success, with its output in the failure message.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `len` incompressible bytes from a fixed seed (splitmix64).
pub fn random_file(path: &Path, len: u64, seed: u64) {
    let mut f =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).expect("create"));
    let mut state = seed;
    let mut left = len;
    let mut block = vec![0u8; 1 << 16];
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n]).expect("write");
        left -= n as u64;
    }
    f.flush().expect("flush");
}

/// borg with a repository passphrase in the environment (test harness only: converge
/// itself hands passphrases over BORG_PASSPHRASE_FD) and its state under the repo's parent.
pub mod borg {
    use super::*;

    pub const PASSPHRASE: &str = "export-test-passphrase";

    fn base(repo: &Path) -> PathBuf {
        repo.parent().expect("repo parent").join("borg-base")
    }

    pub fn command(repo: &Path) -> Command {
        let mut cmd = Command::new("borg");
        cmd.env("BORG_PASSPHRASE", PASSPHRASE)
            .env("BORG_BASE_DIR", base(repo))
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes");
        cmd
    }

    /// `borg init --encryption=repokey <dir>/repo`.
    pub fn init(dir: &Path) -> PathBuf {
        let repo = dir.join("repo");
        run(command(&repo)
            .args(["init", "--encryption=repokey"])
            .arg(&repo));
        repo
    }

    /// `borg create --compression none REPO::name what`, run in `cwd` so paths are relative.
    pub fn create(repo: &Path, name: &str, cwd: &Path, what: &str) {
        run(command(repo)
            .current_dir(cwd)
            .args(["create", "--compression", "none"])
            .arg(format!("{}::{name}", repo.display()))
            .arg(what));
    }

    /// `borg export-tar REPO::name -` with stdout and stderr piped.
    pub fn export_tar(repo: &Path, name: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::from(command(repo));
        cmd.arg("export-tar")
            .arg(format!("{}::{name}", repo.display()))
            .arg("-")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}
