//! Backup of a 1 GB volume-like directory: converge's path (a reconciler pass that runs
//! the schedule's slot: record, `borg create --log-json --progress --json` with the
//! passphrase through a pipe, record) vs a plain `borg create` of the same data.
//! Incompressible data from a fixed seed; each approach gets a fresh repository and
//! its own cold borg cache; the data is read once beforehand so both see it in the
//! page cache. Rounds alternate (plain, converge, ...) to spread the machine's noise.
//! `cargo bench -p converge-backups --bench backups` (`BENCH_BACKUP_MB`, `BENCH_ROUNDS`).
//! Not a pass/fail test: it prints a table. Under `cargo test` it runs a 16 MiB smoke
//! version.

use chrono::{DateTime, Utc};
use converge_backups::plan::{RunStatus, State};
use converge_backups::{Backups, BackupsSpec, Host, HostConfig};
use converge_core::{Facts, Reconciler, SecretSource};
use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

const PASSPHRASE: &str = "bench-passphrase";

fn write_data(dir: &Path, mb: usize) {
    std::fs::create_dir_all(dir).expect("data dir");
    let per_file = 64usize << 20;
    let files = (mb << 20).div_ceil(per_file);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    for f in 0..files {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(dir.join(format!("f{f:03}"))).expect("file"),
        );
        for _ in 0..(per_file >> 20) {
            for chunk in buf.chunks_exact_mut(8) {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                chunk.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
            }
            out.write_all(&buf).expect("write");
        }
    }
}

fn borg(base: &Path, args: &[&str]) -> std::process::Output {
    Command::new("borg")
        .args(args)
        .env("BORG_PASSPHRASE", PASSPHRASE)
        .env("BORG_BASE_DIR", base)
        .output()
        .expect("borg")
}

/// Writes back what earlier runs left dirty, so no run pays for another's writes.
fn settle() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

/// A plain `borg create` (`flags`: extra options, e.g. converge's progress flags).
fn plain(work: &Path, data: &Path, round: usize, flags: &[&str]) -> f64 {
    let tag = if flags.is_empty() { "plain" } else { "flags" };
    let repo = work.join(format!("{tag}-repo-{round}"));
    let base = work.join(format!("{tag}-base-{round}"));
    let r = repo.display().to_string();
    assert!(borg(&base, &["init", "--encryption=repokey-blake2", &r])
        .status
        .success());
    settle();
    let target = format!("{r}::plain");
    let d = data.display().to_string();
    let mut args = vec!["create"];
    args.extend_from_slice(flags);
    args.push(&target);
    args.push(&d);
    let t = Instant::now();
    let out = borg(&base, &args);
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("time")
        .with_timezone(&Utc)
}

async fn converge(work: &Path, data: &Path, round: usize) -> (f64, f64) {
    let dir = work.join(format!("converge-{round}"));
    std::fs::create_dir_all(dir.join("secrets")).expect("secrets");
    std::fs::write(dir.join("secrets/pass"), PASSPHRASE).expect("secret");
    let clock = Arc::new(Mutex::new(t("2026-12-01T10:00:30Z")));
    let mut cfg = HostConfig::new(&dir.join("data"), SecretSource::new(dir.join("secrets")));
    let c = clock.clone();
    cfg.clock = Arc::new(move || *c.lock().unwrap_or_else(|p| p.into_inner()));
    let r = Backups::new(Host::new(cfg), false);
    let spec: BackupsSpec = serde_json::from_value(json!({
        "repositories": [{"name": "local", "kind": "borg", "url": dir.join("repo"), "passphraseSecret": "pass"}],
        "schedules": [{"name": "vol", "repository": "local", "paths": [data], "cron": "* * * * *"}]
    }))
    .expect("spec");
    pass(&r, &spec).await; // init + baseline, not timed
    *clock.lock().unwrap_or_else(|p| p.into_inner()) = t("2026-12-01T10:01:00.5Z");
    settle();
    let start = Instant::now();
    pass(&r, &spec).await;
    let secs = start.elapsed().as_secs_f64();
    let st: State =
        serde_json::from_slice(&std::fs::read(dir.join("data/backups/state.json")).expect("state"))
            .expect("state json");
    let last = st.schedules["vol"].last.clone().expect("ran");
    assert_eq!(last.status, RunStatus::Done, "{last:?}");
    // The driver's own measure of `borg create` ("… in 9.8 s").
    let create = last
        .message
        .rsplit_once(" in ")
        .and_then(|(_, t)| t.trim_end_matches(" s").parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    (secs, create)
}

async fn pass(r: &Backups<Host>, spec: &BackupsSpec) {
    let o = r.observe(spec).await.expect("observe");
    let p = r.plan(spec, &o, &Facts::default());
    let out = r.apply(p).await;
    assert!(out.iter().all(|o| o.error.is_none()), "{out:?}");
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; under `cargo test --all-targets` a 16 MiB, one-round
    // smoke run checks the harness.
    let full = std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (mb, rounds) = if full {
        (env("BENCH_BACKUP_MB", 1024), env("BENCH_ROUNDS", 3))
    } else {
        (16, 1)
    };
    let work = tempfile::Builder::new()
        .prefix("converge-bench-backups.")
        .tempdir_in("/var/tmp")
        .expect("work dir");
    let data = work.path().join("volume");
    write_data(&data, mb);
    // Page cache warm for both approaches.
    for e in std::fs::read_dir(&data).expect("data").flatten() {
        let _ = std::fs::read(e.path());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (mut p, mut f, mut c, mut k) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let flags = ["--log-json", "--json"];
    println!("| round | plain borg create (s) | borg create --log-json --json (s) | converge pass (s) | of which borg create (s) | converge / plain |");
    println!("|---|---|---|---|---|---|");
    for i in 0..rounds {
        // Alternate the order so neither approach always runs first.
        let (a, b, (cv, cr)) = if i % 2 == 0 {
            let a = plain(work.path(), &data, i, &[]);
            let b = plain(work.path(), &data, i, &flags);
            (a, b, rt.block_on(converge(work.path(), &data, i)))
        } else {
            let cv = rt.block_on(converge(work.path(), &data, i));
            let b = plain(work.path(), &data, i, &flags);
            (plain(work.path(), &data, i, &[]), b, cv)
        };
        println!(
            "| {} | {a:.2} | {b:.2} | {cv:.2} | {cr:.1} | {:.3} |",
            i + 1,
            cv / a
        );
        p.push(a);
        f.push(b);
        c.push(cv);
        k.push(cr);
    }
    let (mp, mf, mc, mk) = (
        median(&mut p),
        median(&mut f),
        median(&mut c),
        median(&mut k),
    );
    println!(
        "| median | {mp:.2} | {mf:.2} | {mc:.2} | {mk:.1} | {:.3} |",
        mc / mp
    );
    println!("data: {mb} MiB incompressible (fixed seed), repokey-blake2, lz4 (borg default)");
    println!(
        "overhead of converge: {:+.1} % (target <= 5 %)",
        (mc / mp - 1.0) * 100.0
    );
}
