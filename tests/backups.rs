//! The backups reconciler through the real agent in a sandbox node, against real borg:
//! a `* * * * *` schedule under compressed test time (`CONVERGE_TEST_BACKUPS_TIME`,
//! the agent's backups clock runs N times faster) gives exactly one archive per slot,
//! also across a kill -9 and restart of the agent; a kill -9 of the agent during a
//! backup (its orphaned borg finishes the archive), then of the agent and its borg
//! together (a stale lock): the next agent finishes each slot (one archive), `borg
//! check` is clean, and the passphrase was never in the running borg's arguments or
//! environment; an export to an S3 server (moto, in the node's namespace) through the
//! agent: the presigned URL in the record downloads exactly what `borg export-tar` gives.

mod common;

use common::agent::{converge, data, push_ok, reconciler, start_agent_with, status, wait_ready};
use common::borg_repo::{mid_transaction, random_bytes};
use common::sandbox::{converge_bin, pid_alive, require_tool, wait_until, Spawned, TestNode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PASSPHRASE: &str = "converge-test-passphrase-5f1e2d";

/// Starts the agent with compressed backups time (`scale` x from `epoch`).
fn start_agent(node: &TestNode, scale: u32, epoch: i64) -> Spawned {
    let secrets = node.data_dir().join("secrets");
    let secrets = secrets.to_str().expect("utf-8 path");
    start_agent_with(node, &converge_bin(), &["--secrets-dir", secrets], |cmd| {
        cmd.env("CONVERGE_TEST_BACKUPS_TIME", format!("{scale}@{epoch}"));
    })
}

fn kill9(agent: &mut Spawned) {
    agent.kill().expect("kill -9 the agent");
    agent.wait().expect("reap the agent");
}

fn doc(node: &TestNode, generation: u64) -> Value {
    let d = node.data_dir();
    json!({
        "apiVersion": "converge/v1",
        "node": {"id": node.name(), "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-12-01T10:00:00Z",
        "backups": {
            "repositories": [{"name": "local", "kind": "borg", "url": d.join("repo"),
                              "passphraseSecret": "borg-pass"}],
            "schedules": [{"name": "src", "repository": "local", "paths": [d.join("src")],
                           "cron": "* * * * *", "missed": "run-once"}]
        }
    })
}

fn setup(node: &TestNode, bytes: usize) {
    let d = node.data_dir();
    std::fs::create_dir_all(d.join("secrets")).expect("secrets dir");
    std::fs::write(d.join("secrets/borg-pass"), format!("{PASSPHRASE}\n")).expect("secret");
    std::fs::create_dir_all(d.join("src")).expect("src");
    std::fs::write(d.join("src/small.txt"), b"hello\n").expect("small");
    // Several files, so a kill lands mid-archive.
    for i in 0..4u64 {
        std::fs::write(
            d.join(format!("src/big{i}")),
            random_bytes(11 + i, bytes / 4),
        )
        .expect("big");
    }
}

fn borg(node: &TestNode, args: &[&str]) -> std::process::Output {
    Command::new("borg")
        .args(args)
        .env("BORG_PASSPHRASE", PASSPHRASE)
        .env("BORG_BASE_DIR", data(node).join("backups/borg"))
        .output()
        .expect("run borg")
}

fn archives(node: &TestNode) -> Vec<String> {
    let repo = node.data_dir().join("repo").display().to_string();
    let out = borg(node, &["list", "--short", &repo]);
    assert!(
        out.status.success(),
        "borg list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

fn state(node: &TestNode) -> Value {
    std::fs::read(data(node).join("backups/state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// Live borg processes naming the node's repository.
fn borg_pids(repo: &Path) -> Vec<u32> {
    converge_backups::driver::borg_users(&repo.display().to_string(), true)
}

fn wait_no_borg(repo: &Path) {
    wait_until(Duration::from_secs(120), "borg processes to exit", || {
        borg_pids(repo).is_empty()
    });
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Every archive name is a slot of `src`, each at most once, and the record agrees.
fn check_one_archive_per_slot(node: &TestNode) -> Vec<String> {
    let names = archives(node);
    let mut slots: Vec<&str> = names
        .iter()
        .filter(|n| !n.ends_with(".checkpoint"))
        .map(|n| n.strip_prefix("src-").expect("archive of schedule src"))
        .collect();
    let n = slots.len();
    slots.sort();
    slots.dedup();
    assert_eq!(slots.len(), n, "an archive twice: {names:?}");
    names
}

/// Waits until `n` more slots of schedule `src` have run to `done` (as the durable record
/// says), counting from now.
fn wait_slots_done(node: &TestNode, n: usize) {
    let mut seen = std::collections::BTreeSet::new();
    let start = state(node)["schedules"]["src"]["lastSlot"].to_string();
    wait_until(
        Duration::from_secs(60),
        &format!("{n} more slots done"),
        || {
            let s = state(node);
            let slot = s["schedules"]["src"]["lastSlot"].to_string();
            if slot != start && s["schedules"]["src"]["last"]["status"] == "done" {
                seen.insert(slot);
            }
            seen.len() >= n
        },
    );
}

#[test]
fn schedule_under_compressed_time_one_archive_per_slot_across_kill9_restart() {
    require_tool("borg");
    let node = TestNode::new("bk-sched");
    setup(&node, 64 << 10);
    // 20x: a slot every 3 s of real time.
    let epoch = now_secs();
    let mut agent = start_agent(&node, 20, epoch);
    push_ok(&node, &doc(&node, 1));
    let done = |node: &TestNode| state(node)["schedules"]["src"]["last"]["status"] == "done";
    wait_until(Duration::from_secs(30), "a first backup", || done(&node));
    wait_slots_done(&node, 3);
    let before = check_one_archive_per_slot(&node);
    assert!(before.len() >= 3, "{before:?}");
    // Between runs the reconciler is Converged and says when the last run ended (a run
    // under way reads Progressing, so wait for the gap between two slots).
    let mut st = Value::Null;
    wait_until(
        Duration::from_secs(30),
        "backups Converged between runs",
        || {
            st = reconciler(&status(&node), "backups");
            st["state"] == "Converged"
        },
    );
    assert!(
        st["objects"].to_string().contains("last run done at"),
        "{st}"
    );
    // kill -9, down for ~2 fast minutes, restart: the missed slots run once.
    kill9(&mut agent);
    let repo = node.data_dir().join("repo");
    wait_no_borg(&repo);
    std::thread::sleep(Duration::from_secs(6));
    let mut agent = start_agent(&node, 20, epoch);
    let last_before = state(&node)["schedules"]["src"]["lastSlot"].clone();
    wait_until(
        Duration::from_secs(30),
        "a backup after the restart",
        || {
            let s = state(&node);
            s["schedules"]["src"]["lastSlot"] != last_before
                && s["schedules"]["src"]["last"]["status"] == "done"
        },
    );
    wait_slots_done(&node, 3);
    kill9(&mut agent);
    wait_no_borg(&repo);
    let after = check_one_archive_per_slot(&node);
    assert!(after.len() >= before.len() + 3, "{before:?} -> {after:?}");
    for a in &before {
        assert!(after.contains(a), "{a} gone (no retention set)");
    }
    // No run failed (a repeated slot would fail with "archive already exists").
    let s = state(&node);
    assert_ne!(s["schedules"]["src"]["last"]["status"], "failed", "{s}");
    let check = borg(&node, &["check", &repo.display().to_string()]);
    assert!(
        check.status.success(),
        "borg check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let _ = converge(&node, &["status"]);
}

#[test]
fn kill9_during_backup_next_agent_finishes_the_slot_borg_check_clean() {
    require_tool("borg");
    let node = TestNode::new("bk-kill");
    setup(&node, 600 << 20);
    let repo: PathBuf = node.data_dir().join("repo");
    // 10x: the first slot within 6 s; later slots coalesce while the repository is busy.
    let epoch = now_secs();
    let mut agent = start_agent(&node, 10, epoch);
    push_ok(&node, &doc(&node, 1));
    // Catch the agent's borg create mid-run.
    let deadline = Instant::now() + Duration::from_secs(60);
    let pid = loop {
        let creating: Vec<u32> = borg_pids(&repo)
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"create"))
            })
            .collect();
        if let Some(p) = creating.first() {
            break *p;
        }
        assert!(Instant::now() < deadline, "no borg create seen");
        std::thread::sleep(Duration::from_millis(10));
    };
    // The passphrase is in neither its arguments nor its environment.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let has = |b: &[u8]| {
        b.windows(PASSPHRASE.len())
            .any(|w| w == PASSPHRASE.as_bytes())
    };
    assert!(
        !has(&cmdline) && !has(&environ),
        "passphrase visible in /proc/{pid}"
    );
    wait_until(Duration::from_secs(10), "the slot recorded started", || {
        state(&node)["schedules"]["src"]["started"].is_object()
    });
    let started = state(&node)["schedules"]["src"]["started"].clone();
    assert!(
        started.is_object(),
        "the slot is recorded started: {}",
        state(&node)
    );
    kill9(&mut agent);
    // borg may outlive the agent (it was its child): whatever it does, the next agent
    // must finish this slot exactly once.
    let mut agent = start_agent(&node, 10, epoch);
    let slot = started["slot"].clone();
    // While the orphaned borg still runs, the status says what the schedule waits for.
    // borg releases its lock and exits on its own schedule, so a pass may land just as
    // it ends: poll until the status names it, or it is gone.
    wait_ready(&node, Duration::from_secs(30));
    let archive = slot_archive(&slot);
    let mut named = false;
    wait_until(
        Duration::from_secs(30),
        "the status to name the orphaned borg",
        || {
            let waiting = reconciler(&status(&node), "backups")["waiting"].to_string();
            named = waiting.contains(&format!("borg pid {pid}")) && waiting.contains(&archive);
            named || !pid_alive(pid)
        },
    );
    if !named {
        eprintln!("the orphaned borg ended before a pass named it");
    }
    wait_until(
        Duration::from_secs(180),
        "the interrupted slot finished",
        || {
            let s = state(&node)["schedules"]["src"].clone();
            s["started"].is_null()
                && s["lastSlot"] != Value::Null
                && s["last"]["status"] != Value::Null
                && s["lastSlot"].as_str() >= slot.as_str()
        },
    );
    let s = state(&node)["schedules"]["src"].clone();
    assert_eq!(s["last"]["status"], "done", "{s}");
    assert_slot_archived(&node, &slot);

    // Second: kill -9 the agent *and* its borg (a whole-cgroup kill): the lock stays
    // behind; the next agent breaks it (its holder is dead, no borg uses the repo) and
    // runs the slot again.
    std::fs::write(node.data_dir().join("src/new"), random_bytes(99, 400 << 20)).expect("new data");
    let agent_pid = agent.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (pid, started) = loop {
        let st = state(&node)["schedules"]["src"]["started"].clone();
        let creating = borg_pids(&repo).into_iter().find(|p| {
            converge_core::host::parent_of(*p) == Some(agent_pid)
                && std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"create"))
        });
        if let (Some(p), true) = (creating, st.is_object()) {
            break (p, st);
        }
        assert!(Instant::now() < deadline, "no second borg create seen");
        std::thread::sleep(Duration::from_millis(10));
    };
    // Killed mid-run: with a transaction open (unless borg was done first).
    wait_until(
        Duration::from_secs(60),
        "borg writing to the repository",
        || mid_transaction(&repo) || !pid_alive(pid),
    );
    kill9(&mut agent);
    // SAFETY: plain kill(2) of the borg process this test saw.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    wait_no_borg(&repo);
    let lock_left = repo.join("lock.exclusive").exists();
    let mut agent = start_agent(&node, 10, epoch);
    let slot2 = started["slot"].clone();
    wait_until(Duration::from_secs(180), "the killed slot finished", || {
        let s = state(&node)["schedules"]["src"].clone();
        s["started"].is_null() && s["lastSlot"].as_str() >= slot2.as_str()
    });
    kill9(&mut agent);
    wait_no_borg(&repo);
    assert_slot_archived(&node, &slot2);
    assert!(!repo.join("lock.exclusive").exists(), "lock left behind");
    let check = borg(&node, &["check", &repo.display().to_string()]);
    assert!(
        check.status.success(),
        "borg check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    eprintln!("second kill: stale lock left by the killed borg: {lock_left}");
}

/// The archive of `slot` exists, once, and no archive is there twice.
/// The archive of `slot` (an RFC 3339 time in the record).
fn slot_archive(slot: &Value) -> String {
    format!(
        "src-{}",
        chrono::DateTime::parse_from_rfc3339(slot.as_str().expect("slot"))
            .expect("rfc3339")
            .format("%Y%m%dT%H%MZ")
    )
}

fn assert_slot_archived(node: &TestNode, slot: &Value) {
    let names = check_one_archive_per_slot(node);
    let slot_archive = slot_archive(slot);
    assert!(
        names.contains(&slot_archive),
        "{slot_archive} not in {names:?}"
    );
}

#[test]
fn export_through_the_agent_downloads_what_borg_export_tar_gives() {
    for tool in ["borg", "curl", "moto_server"] {
        require_tool(tool);
    }
    let node = TestNode::new("bk-export");
    setup(&node, 4 << 20);
    std::fs::write(
        node.data_dir().join("secrets/s3"),
        r#"{"accessKeyId": "test", "secretAccessKey": "test"}"#,
    )
    .expect("secret");
    // An S3 server in the node's own network namespace, where the agent reaches it.
    let endpoint = "http://127.0.0.1:5055";
    let mut moto = node.command("moto_server");
    moto.args(["-H", "127.0.0.1", "-p", "5055"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _moto = node.spawn(&mut moto);
    let curl = |args: &[&str]| node.command("curl").args(args).output().expect("curl");
    wait_until(Duration::from_secs(30), "moto up", || {
        curl(&["-sf", "-o", "/dev/null", endpoint]).status.success()
    });
    assert!(curl(&["-sf", "-X", "PUT", &format!("{endpoint}/exports")])
        .status
        .success());

    let mut agent = start_agent(&node, 20, now_secs());
    let mut d = doc(&node, 1);
    push_ok(&node, &d);
    wait_until(Duration::from_secs(30), "a first backup", || {
        state(&node)["schedules"]["src"]["last"]["status"] == "done"
    });
    let archive = archives(&node)
        .into_iter()
        .find(|a| !a.ends_with(".checkpoint"))
        .expect("an archive");
    d["generation"] = json!(2);
    d["backups"]["exports"] = json!([{"id": "e1", "repository": "local", "archive": archive,
        "s3": {"endpoint": endpoint, "bucket": "exports", "key": "e1.tar",
               "credentialsSecret": "s3"},
        "urlTtl": "1h"}]);
    push_ok(&node, &d);
    let mut e1 = Value::Null;
    wait_until(Duration::from_secs(60), "export e1 ended", || {
        e1 = state(&node)["exports"]["e1"].clone();
        e1["status"] == "done" || e1["status"] == "failed"
    });
    assert_eq!(e1["status"], "done", "{e1}");
    let url = e1["url"].as_str().expect("presigned URL").to_string();
    let st = reconciler(&status(&node), "backups");
    assert!(st["objects"].to_string().contains("export e1"), "{st}");
    let got = curl(&["-sf", &url]);
    assert!(got.status.success(), "download through the presigned URL");
    let repo = node.data_dir().join("repo").display().to_string();
    let want = borg(&node, &["export-tar", &format!("{repo}::{archive}"), "-"]);
    assert!(want.status.success());
    assert_eq!(got.stdout.len(), want.stdout.len());
    assert!(
        got.stdout == want.stdout,
        "downloaded tar differs from borg export-tar"
    );
    kill9(&mut agent);
    wait_no_borg(&node.data_dir().join("repo"));
}
