//! Benchmark of the streamed S3 export (not pass/fail; prints a table): a borg archive of
//! incompressible data (1 GB and 4 GB, `BENCH_SIZES=1,4`) uploaded to a local moto server
//! by (a) converge's `export()`, `borg export-tar … -` straight into the multipart upload,
//! and (b) the common approach, `borg export-tar` to a temporary file, then a multipart
//! upload of that file (object_store's `WriteMultipart`, same part size and concurrency).
//!
//! Each variant runs in its own process (this binary re-executed) so that its peak RSS
//! (VmHWM) is its own; borg's peak RSS is read as the maxrss of that process's children.
//! The repositories are generated once under `BENCH_DIR` (default /var/tmp/converge-bench-export)
//! and reused. moto is restarted for every run so that objects do not pile up in its memory.
//! `cargo bench` passes --bench; under `cargo test --all-targets` a 40 MB smoke run checks
//! the harness.

#[path = "../tests/export_support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use converge_backups::export::{build_store, export, S3Target, CONCURRENCY, PART_SIZE};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, WriteMultipart};
use support::{borg, create_bucket, Moto};
use tokio::io::AsyncReadExt;

const MB: u64 = 1_000_000;
const BUCKET: &str = "bench";

fn main() {
    if let Ok(role) = std::env::var("BENCH_EXPORT_ROLE") {
        role_main(&role);
        return;
    }
    if !Path::new(support::MOTO).exists() {
        eprintln!(
            "SKIPPED: {} is absent (install/deps.sh installs it)",
            support::MOTO
        );
        return;
    }
    // Sizes in MB: BENCH_SIZES is in GB.
    let sizes: Vec<u64> = if std::env::args().any(|a| a == "--bench") {
        std::env::var("BENCH_SIZES")
            .unwrap_or_else(|_| "1,4".into())
            .split(',')
            .filter_map(|s| s.trim().parse::<u64>().ok())
            .map(|gb| gb * 1000)
            .collect()
    } else {
        vec![40]
    };
    let dir = PathBuf::from(
        std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp/converge-bench-export".into()),
    );
    std::fs::create_dir_all(&dir).expect("bench dir");
    let repo = dir.join("repo");
    if !repo.exists() {
        borg::init(&dir);
    }

    let mut rows = Vec::new();
    for &mb in &sizes {
        let archive = ensure_archive(&dir, &repo, mb);
        let streamed = run_variant("streamed", &repo, &archive, &dir);
        let tempfile = run_variant("tempfile", &repo, &archive, &dir);
        rows.push((label(mb), streamed, tempfile));
    }

    println!();
    println!(
        "export of a borg archive to S3 (moto on 127.0.0.1), part size {} MiB, {} parts in flight",
        PART_SIZE >> 20,
        CONCURRENCY
    );
    println!(
        "{:>5} | {:<31} | {:>9} | {:>8} | {:>14} | {:>13} | {:>15}",
        "size", "variant", "wall s", "MB/s", "uploader RSS", "borg RSS", "extra disk"
    );
    println!("{}", "-".repeat(113));
    for (size, a, b) in &rows {
        for (name, r) in [
            ("(a) converge streamed", a),
            ("(b) export-tar to file + upload", b),
        ] {
            println!(
                "{:>5} | {:<31} | {:>9.1} | {:>8.0} | {:>11.1} MB | {:>10.1} MB | {:>12.1} MB",
                size,
                name,
                r.wall,
                r.bytes as f64 / 1e6 / r.wall,
                r.hwm_kb as f64 / 1024.0,
                r.borg_kb as f64 / 1024.0,
                r.disk as f64 / 1e6
            );
        }
        println!(
            "{:>5} | ratio (a)/(b)                   | {:>9.2} |          | {:>14.2} | {:>13} | {:>15}",
            size,
            a.wall / b.wall,
            a.hwm_kb as f64 / b.hwm_kb.max(1) as f64,
            "",
            format!("0 vs {:.0} MB", b.disk as f64 / 1e6)
        );
    }
}

#[derive(Debug)]
struct Run {
    wall: f64,
    bytes: u64,
    hwm_kb: u64,
    borg_kb: u64,
    disk: u64,
}

/// "1G", "40M".
fn label(mb: u64) -> String {
    if mb.is_multiple_of(1000) {
        format!("{}G", mb / 1000)
    } else {
        format!("{mb}M")
    }
}

/// A borg archive of `mb` MB of seeded random data, created once and reused.
fn ensure_archive(dir: &Path, repo: &Path, mb: u64) -> String {
    let name = format!("m{mb}");
    let marker = dir.join(format!("{name}.done"));
    if marker.exists() {
        return name;
    }
    let data = dir.join(format!("data-{name}"));
    std::fs::create_dir_all(&data).expect("data dir");
    eprintln!("generating {mb} MB of incompressible data and archive {name}…");
    // Several files, like a real volume; the generator is seeded, so every run is the same.
    for i in 0..4 {
        support::random_file(&data.join(format!("blob-{i}.bin")), mb * MB / 4, mb + i);
    }
    borg::create(repo, &name, dir, &format!("data-{name}"));
    std::fs::remove_dir_all(&data).expect("remove source data");
    std::fs::write(&marker, b"").expect("marker");
    name
}

fn run_variant(variant: &str, repo: &Path, archive: &str, dir: &Path) -> Run {
    let moto = Moto::start();
    create_bucket(&moto, BUCKET);
    let spec = format!(
        "{variant}\n{}\n{}\n{archive}\n{}",
        moto.endpoint(),
        repo.display(),
        dir.display()
    );
    eprintln!("{archive}: {variant}…");
    let out = Command::new(std::env::current_exe().expect("current exe"))
        .env("BENCH_EXPORT_ROLE", spec)
        .stderr(Stdio::inherit())
        .output()
        .expect("run variant");
    assert!(out.status.success(), "variant {variant} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, rest)| rest))
        .expect("result line");
    let f: Vec<f64> = line
        .split_whitespace()
        .map(|v| v.parse().expect("number"))
        .collect();
    Run {
        wall: f[0],
        bytes: f[1] as u64,
        hwm_kb: f[2] as u64,
        borg_kb: f[3] as u64,
        disk: f[4] as u64,
    }
}

fn role_main(spec: &str) {
    let parts: Vec<&str> = spec.lines().collect();
    let [variant, endpoint, repo, archive, dir] = parts[..] else {
        panic!("bad role spec");
    };
    let repo = PathBuf::from(repo);
    let target = S3Target {
        endpoint: endpoint.into(),
        region: "us-east-1".into(),
        bucket: BUCKET.into(),
        key: format!("{archive}-{variant}.tar"),
        access_key_id: "bench".into(),
        secret_access_key: "bench-secret".into(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let (bytes, disk) = rt.block_on(async {
        match variant {
            "streamed" => {
                let child = borg::export_tar(&repo, archive).spawn().expect("borg");
                let journal = Path::new(dir).join("journal");
                let out = export(child, &target, Duration::from_secs(3600), &journal, |_| {})
                    .await
                    .expect("export");
                (out.bytes, 0)
            }
            _ => {
                let tmp = Path::new(dir).join(format!("{archive}.tar"));
                let status = borg::command(&repo)
                    .arg("export-tar")
                    .arg(format!("{}::{archive}", repo.display()))
                    .arg(&tmp)
                    .status()
                    .expect("borg");
                assert!(status.success(), "borg export-tar failed");
                let disk = std::fs::metadata(&tmp).expect("temp file").len();
                let bytes = upload_file(&tmp, &target).await;
                std::fs::remove_file(&tmp).expect("remove temp file");
                (bytes, disk)
            }
        }
    });
    let wall = started.elapsed().as_secs_f64();
    println!(
        "RESULT {wall} {bytes} {} {} {disk}",
        vm_hwm_kb(),
        children_maxrss_kb()
    );
}

/// The common approach's upload: the file read in part-sized chunks into object_store's
/// WriteMultipart, with the same part size and concurrency as converge.
async fn upload_file(file: &Path, t: &S3Target) -> u64 {
    // The store exactly as converge's export builds it (client options, path style).
    let store = build_store(t).expect("store");
    let upload = store
        .put_multipart(&ObjectPath::from(t.key.as_str()))
        .await
        .expect("create upload");
    let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let mut f = tokio::fs::File::open(file).await.expect("open temp file");
    let mut buf = vec![0u8; PART_SIZE];
    let mut total = 0u64;
    loop {
        w.wait_for_capacity(CONCURRENCY).await.expect("part upload");
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..]).await.expect("read temp file");
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        w.write(&buf[..filled]);
        total += filled as u64;
    }
    w.finish().await.expect("complete upload");
    total
}

fn vm_hwm_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn children_maxrss_kb() -> u64 {
    // SAFETY: getrusage fills the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0;
    }
    usage.ru_maxrss as u64
}
