//! The backups reconciler against real borg (1.2) in a temp dir: back up, change and
//! delete files, restore in both modes (byte-identical, modes and links included);
//! the passphrase never in a borg process's arguments or environment; a lock left by
//! a borg killed with SIGKILL is broken and the next backup succeeds, `borg check`
//! clean; restores run once; a missing source fails the run and names it; a directory
//! that is not a repository is never initialised; a restore cut short is undone (or,
//! in its last step, completed) on the next pass. Needs `borg` on PATH
//! (install/deps.sh).

use chrono::{DateTime, Utc};
use converge_backups::driver::{borg_users, BackupsDriver};
use converge_backups::plan::{RunStatus, State};
use converge_backups::{Backups, BackupsSpec, Host, HostConfig};
use converge_core::{Facts, Reconciler, SecretSource};
use serde_json::json;
use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "../../../tests/common/borg_repo.rs"]
mod borg_repo;
use borg_repo::{mid_transaction, random_bytes};

/// Every entry under `root`: relative path -> (type, mode, content or link target).
fn tree(root: &Path) -> BTreeMap<String, (char, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (char, u32, Vec<u8>)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                out.insert(
                    rel,
                    (
                        'l',
                        0,
                        std::fs::read_link(&p)
                            .unwrap()
                            .display()
                            .to_string()
                            .into_bytes(),
                    ),
                );
            } else if m.is_dir() {
                out.insert(rel, ('d', mode, Vec::new()));
                walk(root, &p, out);
            } else {
                out.insert(rel, ('f', mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    walk(root, root, &mut out);
    out
}

struct Env {
    dir: tempfile::TempDir,
    clock: Arc<Mutex<DateTime<Utc>>>,
    passphrase: String,
}

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let passphrase = format!(
            "pw-{:016x}",
            u64::from_le_bytes(
                random_bytes(std::process::id().into(), 8)
                    .try_into()
                    .unwrap()
            )
        );
        std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
        std::fs::write(
            dir.path().join("secrets/borg-pass"),
            format!("{passphrase}\n"),
        )
        .unwrap();
        Env {
            dir,
            clock: Arc::new(Mutex::new(t("2026-12-01T10:00:30Z"))),
            passphrase,
        }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn set(&self, s: &str) {
        *self.clock.lock().unwrap() = t(s);
    }
    fn reconciler(&self, background: bool) -> Backups<Host> {
        let mut cfg = HostConfig::new(&self.path("data"), SecretSource::new(self.path("secrets")));
        let c = self.clock.clone();
        cfg.clock = Arc::new(move || *c.lock().unwrap());
        Backups::new(Host::new(cfg), background)
    }
    fn spec(&self, extra: serde_json::Value) -> BackupsSpec {
        let mut v = json!({
            "repositories": [{"name": "local", "kind": "borg", "url": self.path("repo").display().to_string(),
                              "passphraseSecret": "borg-pass"}],
            "schedules": [{"name": "src", "repository": "local", "paths": [self.path("src").display().to_string()],
                           "cron": "* * * * *", "retention": {"keepHourly": 2}}]
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                o.insert(k.clone(), x.clone());
            }
        }
        serde_json::from_value(v).unwrap()
    }
    /// A borg command for checks, with the passphrase in its environment (tests only).
    fn borg(&self, args: &[&str]) -> std::process::Output {
        Command::new("borg")
            .args(args)
            .env("BORG_PASSPHRASE", &self.passphrase)
            .env("BORG_BASE_DIR", self.path("data/backups/borg"))
            .output()
            .unwrap()
    }
    fn archives(&self) -> Vec<String> {
        let out = self.borg(&["list", "--short", &self.path("repo").display().to_string()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect()
    }
    fn state(&self) -> State {
        serde_json::from_slice(&std::fs::read(self.path("data/backups/state.json")).unwrap())
            .unwrap()
    }
}

async fn pass(r: &Backups<Host>, s: &BackupsSpec) -> Vec<String> {
    let o = r.observe(s).await.unwrap();
    let p = r.plan(s, &o, &Facts::default());
    let changes = p.changes.iter().map(|c| c.to_string()).collect();
    let out = r.apply(p).await;
    assert!(out.iter().all(|o| o.error.is_none()), "{out:?}");
    changes
}

fn make_source(root: &Path) {
    std::fs::create_dir_all(root.join("dir/sub")).unwrap();
    std::fs::write(root.join("a.txt"), b"hello\n").unwrap();
    std::fs::write(root.join("dir/b.bin"), random_bytes(7, 3 << 20)).unwrap();
    std::fs::write(root.join("dir/sub/empty"), b"").unwrap();
    std::fs::write(root.join("secret.conf"), b"k=v\n").unwrap();
    std::fs::set_permissions(
        root.join("secret.conf"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    symlink("a.txt", root.join("link")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_change_restore_both_modes_byte_identical() {
    let env = Env::new();
    make_source(&env.path("src"));
    let r = env.reconciler(false);
    let s = env.spec(json!({}));
    let c = pass(&r, &s).await;
    assert_eq!(c, ["+ repository local", "+ schedule src"]);
    assert!(env.path("repo/config").exists());
    // Not a slot yet: nothing.
    assert!(pass(&r, &s).await.is_empty());
    env.set("2026-12-01T10:01:00.5Z");
    assert_eq!(pass(&r, &s).await, ["+ archive src-20261201T1001Z"]);
    assert_eq!(env.archives(), ["src-20261201T1001Z"]);
    let before = tree(&env.path("src"));
    // Change, delete, add.
    std::fs::write(env.path("src/a.txt"), b"changed\n").unwrap();
    std::fs::remove_file(env.path("src/dir/b.bin")).unwrap();
    std::fs::remove_dir_all(env.path("src/dir/sub")).unwrap();
    std::fs::write(env.path("src/new"), b"new file").unwrap();
    std::fs::set_permissions(
        env.path("src/secret.conf"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    assert_ne!(tree(&env.path("src")), before);
    let target = env.path("src").display().to_string();
    let s = env.spec(json!({"restores": [
        {"id": "r1", "repository": "local", "archive": "src-20261201T1001Z", "targetPath": target, "mode": "replace"},
        {"id": "r2", "repository": "local", "archive": "src-20261201T1001Z", "targetPath": target, "mode": "side-by-side"}
    ]}));
    // One operation per repository: r1 this pass, r2 the next.
    assert_eq!(pass(&r, &s).await, ["+ restore r1"]);
    assert_eq!(pass(&r, &s).await, ["+ restore r2"]);
    assert_eq!(
        tree(&env.path("src")),
        before,
        "replace: byte-identical to the backed-up state"
    );
    assert_eq!(
        tree(&env.path("src.restore-r2")),
        before,
        "side-by-side: byte-identical"
    );
    // Exactly once: recorded, never again (even with a new reconciler = agent restart).
    let st = env.state();
    assert_eq!(
        st.restores["r1"].status,
        RunStatus::Done,
        "{:?}",
        st.restores["r1"]
    );
    assert_eq!(st.restores["r2"].status, RunStatus::Done);
    std::fs::write(env.path("src/a.txt"), b"changed after the restore\n").unwrap();
    let r2 = env.reconciler(false);
    assert!(pass(&r2, &s).await.is_empty());
    assert_eq!(
        std::fs::read(env.path("src/a.txt")).unwrap(),
        b"changed after the restore\n"
    );
    // No staging leftovers.
    let leftovers: Vec<_> = std::fs::read_dir(env.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".converge"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passphrase_never_in_borg_cmdline_or_environ() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("src")).unwrap();
    for i in 0..4 {
        std::fs::write(
            env.path(&format!("src/big{i}")),
            random_bytes(100 + i, 40 << 20),
        )
        .unwrap();
    }
    let r = env.reconciler(true);
    let s = env.spec(json!({}));
    pass(&r, &s).await;
    env.set("2026-12-01T10:01:00.5Z");
    pass(&r, &s).await;
    let repo = env.path("repo").display().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    while r.busy() && Instant::now() < deadline {
        for pid in borg_users(&repo, true) {
            let (Ok(cmd), Ok(environ)) = (
                std::fs::read(format!("/proc/{pid}/cmdline")),
                std::fs::read(format!("/proc/{pid}/environ")),
            ) else {
                continue;
            };
            let has = |b: &[u8]| {
                b.windows(env.passphrase.len())
                    .any(|w| w == env.passphrase.as_bytes())
            };
            assert!(!has(&cmd), "passphrase in /proc/{pid}/cmdline");
            assert!(!has(&environ), "passphrase in /proc/{pid}/environ");
            assert!(environ
                .split(|b| *b == 0)
                .any(|v| v.starts_with(b"BORG_PASSPHRASE_FD=")));
            assert!(!environ
                .split(|b| *b == 0)
                .any(|v| v.starts_with(b"BORG_PASSPHRASE=")));
            seen += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(seen > 0, "never saw borg running");
    while r.busy() {
        assert!(Instant::now() < deadline, "backup still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = env.state();
    let last = st.schedules["src"].last.clone().unwrap();
    assert_eq!(last.status, RunStatus::Done, "{last:?}");
    assert!(
        !std::fs::read_to_string(env.path("data/backups/state.json"))
            .unwrap()
            .contains(&env.passphrase)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_of_a_killed_borg_is_broken_and_the_next_backup_succeeds() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("src")).unwrap();
    std::fs::write(env.path("src/big"), random_bytes(3, 200 << 20)).unwrap();
    let r = env.reconciler(false);
    let s = env.spec(json!({}));
    pass(&r, &s).await;
    // A borg run killed with SIGKILL mid-backup (as when the agent and its borg die).
    let repo = env.path("repo").display().to_string();
    let mut child = Command::new("borg")
        .args([
            "create",
            &format!("{repo}::killed"),
            &env.path("src").display().to_string(),
        ])
        .env("BORG_PASSPHRASE", &env.passphrase)
        .env("BORG_BASE_DIR", env.path("data/backups/borg"))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env.path("repo/lock.exclusive").exists() {
        assert!(
            Instant::now() < deadline,
            "borg never locked the repository"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    while !mid_transaction(&env.path("repo")) {
        assert!(
            Instant::now() < deadline,
            "borg never wrote to the repository"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        env.path("repo/lock.exclusive").exists(),
        "the killed borg left its lock"
    );
    env.set("2026-12-01T10:01:00.5Z");
    assert_eq!(pass(&r, &s).await, ["+ archive src-20261201T1001Z"]);
    let last = env.state().schedules["src"].last.clone().unwrap();
    assert_eq!(last.status, RunStatus::Done, "{last:?}");
    assert!(!env.path("repo/lock.exclusive").exists());
    let check = env.borg(&["check", &repo]);
    assert!(
        check.status.success(),
        "borg check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(env.archives().contains(&"src-20261201T1001Z".to_string()));
}

/// One pass whose outcomes may fail; returns the plan's waiting objects as shown.
async fn pass_waiting(r: &Backups<Host>, s: &BackupsSpec) -> Vec<converge_core::Waiting> {
    let o = r.observe(s).await.unwrap();
    let p = r.plan(s, &o, &Facts::default());
    let waiting = p.waiting.clone();
    r.apply(p).await;
    waiting
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_source_fails_the_run_and_names_it() {
    let env = Env::new();
    make_source(&env.path("src"));
    let r = env.reconciler(false);
    let typo = env.path("srcc").display().to_string();
    let mut s = env.spec(json!({}));
    s.schedules[0].paths.push(typo.clone());
    pass(&r, &s).await;
    env.set("2026-12-01T10:01:00.5Z");
    pass_waiting(&r, &s).await;
    let last = env.state().schedules["src"].last.clone().unwrap();
    assert_eq!(last.status, RunStatus::Failed, "{last:?}");
    assert!(
        last.message
            .contains(&format!("source {typo} does not exist")),
        "{last:?}"
    );
    assert!(
        env.archives().is_empty(),
        "nothing archived: {:?}",
        env.archives()
    );
    // Until a run succeeds the schedule is a failed object (the reconciler Degraded).
    let w = pass_waiting(&r, &s).await;
    assert!(
        w.iter()
            .any(|w| w.failed && w.id == "src" && w.reason.contains(&typo)),
        "{w:?}"
    );
    // The typo fixed: the next slot runs and the failure is gone.
    s.schedules[0].paths.pop();
    env.set("2026-12-01T10:02:00.5Z");
    assert_eq!(pass(&r, &s).await, ["+ archive src-20261201T1002Z"]);
    assert!(pass_waiting(&r, &s).await.iter().all(|w| !w.failed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_that_is_not_a_repository_is_never_initialised() {
    let env = Env::new();
    make_source(&env.path("src"));
    std::fs::create_dir_all(env.path("repo")).unwrap();
    std::fs::write(env.path("repo/notes.txt"), b"someone else's files\n").unwrap();
    let r = env.reconciler(false);
    let s = env.spec(json!({}));
    let o = r.observe(&s).await.unwrap();
    let p = r.plan(&s, &o, &Facts::default());
    // Not a pending add: a failed object naming the path, and nothing to apply for it.
    assert!(
        !p.changes.iter().any(|c| c.kind == "repository"),
        "{:?}",
        p.changes
    );
    let w = p.waiting.iter().find(|w| w.kind == "repository").unwrap();
    assert!(w.failed, "{w:?}");
    assert!(
        w.reason.contains(&env.path("repo").display().to_string())
            && w.reason.contains("not a borg repository"),
        "{w:?}"
    );
    // borg's own refusal is an error, never taken for "already initialised".
    let repo = s.repositories[0].clone();
    let err = r.driver().init(&repo).await.unwrap_err().to_string();
    assert!(err.contains("There is already something at"), "{err}");
    assert_eq!(
        std::fs::read_dir(env.path("repo")).unwrap().count(),
        1,
        "the directory is left alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_cut_short_is_undone_or_completed_on_the_next_pass() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("src")).unwrap();
    for i in 0..16 {
        std::fs::write(env.path(&format!("src/f{i:02}")), random_bytes(i, 4 << 20)).unwrap();
    }
    let r = env.reconciler(false);
    let s = env.spec(json!({}));
    pass(&r, &s).await;
    env.set("2026-12-01T10:01:00.5Z");
    assert_eq!(pass(&r, &s).await, ["+ archive src-20261201T1001Z"]);
    let before = tree(&env.path("src"));
    std::fs::write(env.path("src/mine"), b"written after the backup\n").unwrap();
    let after = tree(&env.path("src"));
    let target = env.path("src").display().to_string();
    let s = env.spec(json!({"restores": [
        {"id": "r1", "repository": "local", "archive": "src-20261201T1001Z", "targetPath": target, "mode": "replace"}
    ]}));
    // The agent stops mid-extraction: the pass is dropped (its borg killed) once the
    // staging directory holds part of the archive, as a kill -9 would leave it.
    let staging = env.path(".converge-restore-r1");
    let o = r.observe(&s).await.unwrap();
    let p = r.plan(&s, &o, &Facts::default());
    tokio::select! {
        out = r.apply(p) => panic!("the restore finished before it could be cut short: {out:?}"),
        _ = async {
            while std::fs::read_dir(&staging).map_or(0, |d| d.count()) < 2 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        } => {}
    }
    assert!(staging.exists(), "a partial extraction is there");
    // Dropping the pass killed its borg (SIGKILL): let it be gone, as after a kill -9.
    let repo = env.path("repo").display().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !borg_users(&repo, true).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the extraction's borg outlived its pass"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The next agent: the restore is recorded failed, its debris removed, the target
    // exactly as it was.
    let r2 = env.reconciler(false);
    let changes = pass(&r2, &s).await;
    assert!(
        changes.contains(&"- restore-staging r1".to_string()),
        "{changes:?}"
    );
    let names: Vec<String> = std::fs::read_dir(env.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".converge"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    assert_eq!(tree(&env.path("src")), after, "the target is untouched");
    let rec = env.state().restores["r1"].clone();
    assert_eq!(rec.status, RunStatus::Failed, "{rec:?}");
    assert!(rec.message.contains("use a new id"), "{rec:?}");
    assert!(pass(&r2, &s).await.is_empty(), "never run twice");

    // Cut short in the last step (the restored entries half moved in): completed.
    let s = env.spec(json!({"restores": [
        {"id": "r2", "repository": "local", "archive": "src-20261201T1001Z", "targetPath": target, "mode": "replace"}
    ]}));
    let (staging, old) = (
        env.path(".converge-restore-r2"),
        env.path(".converge-old-r2"),
    );
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(&old).unwrap();
    // The target's entries were moved aside; half of the extracted ones are in, the
    // rest still staged.
    for e in std::fs::read_dir(env.path("src")).unwrap() {
        let e = e.unwrap();
        std::fs::rename(e.path(), old.join(e.file_name())).unwrap();
    }
    for (i, (name, (_, _, data))) in before.iter().enumerate() {
        let into = if i % 2 == 0 {
            env.path("src")
        } else {
            staging.clone()
        };
        std::fs::write(into.join(name), data).unwrap();
    }
    std::fs::create_dir_all(env.path("data/backups/restores")).unwrap();
    std::fs::write(
        env.path("data/backups/restores/r2.json"),
        json!({"step": "moving-in", "staging": staging, "dest": env.path("src"), "old": old})
            .to_string(),
    )
    .unwrap();
    {
        let mut st = env.state();
        st.restores.insert(
            "r2".into(),
            converge_backups::plan::RunRecord {
                status: RunStatus::Started,
                started: t("2026-12-01T10:01:30Z"),
                finished: None,
                message: String::new(),
                url: None,
                expires_at: None,
            },
        );
        std::fs::write(
            env.path("data/backups/state.json"),
            serde_json::to_vec(&st).unwrap(),
        )
        .unwrap();
    }
    let r3 = env.reconciler(false);
    pass(&r3, &s).await;
    assert_eq!(tree(&env.path("src")), before, "the restore is completed");
    assert!(!staging.exists() && !old.exists());
    let rec = env.state().restores["r2"].clone();
    assert_eq!(rec.status, RunStatus::Done, "{rec:?}");
}

/// Podman with its own storage under the test's temp dir (no service, no network).
struct Podman {
    args: Vec<String>,
    root: PathBuf,
}

impl Podman {
    fn new(root: &Path) -> Podman {
        Podman {
            root: root.join("root"),
            args: vec![
                "--root".into(),
                root.join("root").display().to_string(),
                "--runroot".into(),
                root.join("run").display().to_string(),
            ],
        }
    }
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("podman")
            .args(&self.args)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(&self.args)
            .args(["rm", "-fa", "-t", "0"])
            .output();
        // Podman's overlay driver bind-mounts its own directory; the temp dir can only
        // be removed once it is gone.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.root.join("overlay"))
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_in_use_needs_a_hook_and_a_dump_streams_or_fails_cleanly() {
    let env = Env::new();
    let pm = Podman::new(&env.path("podman"));
    // A busybox image, a volume with data, a running container using it.
    let rootfs = env.path("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for a in ["sh", "cat", "sleep", "sync", "true"] {
        symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
    let tar = env.path("rootfs.tar");
    assert!(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap()
        .success());
    pm.run(&[
        "import",
        &tar.display().to_string(),
        "localhost/busybox:backups",
    ]);
    pm.run(&["volume", "create", "appdata"]);
    let vol = PathBuf::from(pm.run(&[
        "volume",
        "inspect",
        "--format",
        "{{.Mountpoint}}",
        "appdata",
    ]));
    make_source(&vol);
    pm.run(&[
        "run",
        "-d",
        "--name",
        "app",
        "--network",
        "none",
        "-v",
        "appdata:/data",
        "localhost/busybox:backups",
        "sleep",
        "600",
    ]);

    let mut cfg = HostConfig::new(&env.path("data"), SecretSource::new(env.path("secrets")));
    let c = env.clock.clone();
    cfg.clock = Arc::new(move || *c.lock().unwrap());
    cfg.runtime = Some(converge_backups::driver::runtime::RuntimeCli {
        binary: "podman".into(),
        global_args: pm.args.clone(),
    });
    let r = Backups::new(Host::new(cfg), false);
    let repo = env.path("repo").display().to_string();
    let spec = |sched: serde_json::Value, restores: serde_json::Value| -> BackupsSpec {
        serde_json::from_value(json!({
            "repositories": [{"name": "local", "kind": "borg", "url": repo, "passphraseSecret": "borg-pass"}],
            "schedules": [sched],
            "restores": restores
        })).unwrap()
    };
    // In use, no hook, no freeze: refused, nothing archived.
    let s = spec(
        json!({"name": "vol", "repository": "local", "volumes": ["appdata"], "cron": "* * * * *"}),
        json!([]),
    );
    pass(&r, &s).await;
    env.set("2026-12-01T10:01:00.5Z");
    pass(&r, &s).await;
    let last = env.state().schedules["vol"].last.clone().unwrap();
    assert_eq!(last.status, RunStatus::Failed);
    assert!(
        last.message.contains("in use by running container(s) app"),
        "{}",
        last.message
    );
    assert!(env.archives().is_empty());
    // With a preHook run inside the container (here `sync`): archived.
    let s = spec(
        json!({"name": "vol", "repository": "local", "volumes": ["appdata"], "cron": "* * * * *",
                        "preHook": {"command": ["sync"], "container": "app"}}),
        json!([]),
    );
    env.set("2026-12-01T10:02:00.5Z");
    pass(&r, &s).await;
    let last = env.state().schedules["vol"].last.clone().unwrap();
    assert_eq!(last.status, RunStatus::Done, "{last:?}");
    // A dump streamed from the container with --content-from-command.
    let s = spec(
        json!({"name": "db", "repository": "local", "cron": "* * * * *",
                        "dump": {"command": ["cat", "/data/dir/b.bin"], "container": "app", "fileName": "b.dump"}}),
        json!([]),
    );
    pass(&r, &s).await; // baseline
    env.set("2026-12-01T10:03:00.5Z");
    pass(&r, &s).await;
    assert_eq!(
        env.state().schedules["db"].last.clone().unwrap().status,
        RunStatus::Done
    );
    // A dump that fails half-way: the run fails, no archive is left.
    let s = spec(
        json!({"name": "db", "repository": "local", "cron": "* * * * *",
                        "dump": {"command": ["sh", "-c", "cat /data/a.txt; exit 3"], "container": "app", "fileName": "b.dump"}}),
        json!([]),
    );
    env.set("2026-12-01T10:04:00.5Z");
    pass(&r, &s).await;
    let last = env.state().schedules["db"].last.clone().unwrap();
    assert_eq!(last.status, RunStatus::Failed, "{last:?}");
    let names = env.archives();
    assert_eq!(
        names,
        ["vol-20261201T1002Z", "db-20261201T1003Z"],
        "no archive from the failed dump"
    );
    // Restores: the volume side-by-side into a new volume, the dump into a path.
    let dumpdir = env.path("dump-out").display().to_string();
    let s = spec(
        json!({"name": "db", "repository": "local", "cron": "0 0 1 1 *"}),
        json!([
            {"id": "r1", "repository": "local", "archive": "vol-20261201T1002Z", "targetVolume": "appdata", "mode": "side-by-side"},
            {"id": "r2", "repository": "local", "archive": "db-20261201T1003Z", "targetPath": dumpdir, "mode": "replace"}
        ]),
    );
    let mut s = s;
    s.schedules[0].dump =
        Some(serde_json::from_value(json!({"command": ["true"], "fileName": "x"})).unwrap());
    pass(&r, &s).await;
    pass(&r, &s).await;
    let st = env.state();
    assert_eq!(
        st.restores["r1"].status,
        RunStatus::Done,
        "{:?}",
        st.restores["r1"]
    );
    assert_eq!(
        st.restores["r2"].status,
        RunStatus::Done,
        "{:?}",
        st.restores["r2"]
    );
    let restored = PathBuf::from(pm.run(&[
        "volume",
        "inspect",
        "--format",
        "{{.Mountpoint}}",
        "appdata-restore-r1",
    ]));
    assert_eq!(tree(&restored), tree(&vol));
    assert_eq!(
        std::fs::read(env.path("dump-out/b.dump")).unwrap(),
        std::fs::read(vol.join("dir/b.bin")).unwrap()
    );
    // The documented freeze: no hook, `freeze: true`: the containers using the volume
    // are paused for the archive and running again afterwards.
    let s = spec(
        json!({"name": "frz", "repository": "local", "volumes": ["appdata"], "cron": "* * * * *", "freeze": true}),
        json!([]),
    );
    pass(&r, &s).await; // baseline at 10:04:00.5
    env.set("2026-12-01T10:05:00.5Z");
    pass(&r, &s).await;
    let last = env.state().schedules["frz"].last.clone().unwrap();
    assert_eq!(last.status, RunStatus::Done, "{last:?}");
    assert_eq!(
        pm.run(&["inspect", "--format", "{{.State.Status}}", "app"]),
        "running"
    );
    assert!(env.archives().contains(&"frz-20261201T1005Z".to_string()));
}

#[test]
fn a_sealed_ssh_key_is_written_private_for_the_access_and_removed_after() {
    use std::os::unix::fs::PermissionsExt as _;
    let env = Env::new();
    let secrets = SecretSource::new(env.path("secrets"));
    secrets.set_sealed(BTreeMap::from([(
        "offsite-key".to_string(),
        converge_core::Zeroizing::new(
            "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----"
                .to_string(),
        ),
    )]));
    let host = Host::new(HostConfig::new(&env.path("data"), secrets));
    let repo: converge_backups::BackupRepository = serde_json::from_value(json!({
        "name": "offsite", "kind": "borg", "url": "ssh://borg@backup.example:22/./repo",
        "passphraseSecret": "borg-pass", "credentialsSecret": "offsite-key"
    }))
    .unwrap();
    let access = host.access(&repo).unwrap();
    let key = access.ssh_key.clone().expect("a key file");
    assert!(key.starts_with(env.path("data/backups/ssh")), "{key:?}");
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .ends_with("KEY-----\n"));
    let again = access.clone();
    drop(access);
    assert!(key.exists(), "kept while a clone of the access is in use");
    drop(again);
    assert!(!key.exists(), "removed with the access");
    // A local secret file is used in place, never copied.
    std::fs::write(env.path("secrets/offsite-key"), "local key\n").unwrap();
    let access = host.access(&repo).unwrap();
    assert_eq!(access.ssh_key, Some(env.path("secrets/offsite-key")));
}
