//! One agent node carrying every section at once (tests/common/wholenode.rs: a proxy
//! with containers on a Podman network, published ports, WireGuard peers on
//! wireguard-go, dnsmasq, metadata, a borg schedule and Caddy routes), through the real
//! agent and the real daemons.
//!
//! Drift, one test per reconciler: each drift class of issue 30 injected by hand while
//! the six other reconcilers run beside it, then polled until repaired, within one
//! resync period plus the repair's own work (at once where an event exists); each repair
//! must show in the event journal (a pass started by a resync or a host event) and in
//! `converge_drift_repairs_total{reconciler}`, and leave every reconciler converged. A
//! table of repair times is printed (never asserted beyond the bound).
//!
//! kill -9: `CHAOS_ROUNDS` rounds (default 3) of a large document touching every
//! section (`CHAOS_SCALE`: containers, ports, records, peers, routes, metadata projects,
//! a backup due every few seconds), the agent SIGKILLed at a random moment of the apply
//! (seed `CHAOS_SEED`), restarted, converged, and checked; after the last: exactly the
//! document's containers, network, DNAT elements, peers, routes and metadata entries,
//! one dnsmasq, one Caddy pair, no borg lock, no temporary file of an interrupted write
//! in the data dir, and `PRAGMA integrity_check` ok on `state.db` and `metadata.db`.

mod common;

use common::dnsq::query;
use common::mesh::{caddy_admin, caddy_pid, https_get};
use common::metrics::{scrape, sum};
use common::sandbox::{pid_alive, wait_until};
use common::wholenode::{is_running, Expected, Scale, WholeNode, METRICS, PASSPHRASE};
use hickory_proto::rr::RecordType;
use serde_json::Value;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The drift tests' resync period.
const RESYNC_SECS: u64 = 5;
/// The backups clock runs this much faster: a `* * * * *` slot every 5 s.
const TIME_SCALE: u32 = 12;

/// One whole node at a time in this binary: each runs Podman, a Caddy pair, dnsmasq,
/// wireguard-go and borg, and two at once on 2 cores would mostly time each other.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A whole node converged on the small document (generation 1), its first archive
/// made and the `web` route served.
fn converged_node(name: &str, tag: &str) -> WholeNode {
    let mut w = WholeNode::new(name, tag, RESYNC_SECS, TIME_SCALE);
    w.start();
    w.push(&w.doc(1, Scale::SMALL, 0, true));
    w.wait_converged(1, Duration::from_secs(180));
    wait_until(Duration::from_secs(60), "web.test served", || {
        https_get(&w.node, "web.test", "127.0.0.1").as_deref() == Some("web0\n")
    });
    wait_until(Duration::from_secs(60), "a first archive", || {
        w.last_success().is_some()
    });
    w
}

/// One repair: what drifted, how long until repaired, the pass that repaired it.
struct Repair {
    reconciler: &'static str,
    drift: &'static str,
    took: Duration,
    reason: String,
    counted: f64,
}

fn drift_metric(w: &WholeNode, reconciler: &str) -> f64 {
    sum(
        &scrape(&w.node, METRICS),
        &format!("converge_drift_repairs_total{{reconciler=\"{reconciler}\""),
    )
}

/// The bound of a repair: one resync period (+10 % jitter) and the repair's own work
/// (creating a container, starting a daemon, a borg run) on a loaded 2-core machine.
fn bound() -> Duration {
    Duration::from_secs(RESYNC_SECS).mul_f64(1.1) + Duration::from_secs(20)
}

/// Injects one drift, waits until `repaired`, then for its event and its count, and
/// until every reconciler is converged again.
fn drift(
    w: &WholeNode,
    rows: &mut Vec<Repair>,
    reconciler: &'static str,
    what: &'static str,
    inject: impl FnOnce(),
    repaired: impl FnMut() -> bool,
) {
    let before = drift_metric(w, reconciler);
    let after = w.last_event_id();
    inject();
    let took = w.time(bound(), &format!("{reconciler}: {what} repaired"), repaired);
    let mut reason = String::new();
    wait_until(
        Duration::from_secs(15),
        &format!("{reconciler}: an event of the repair of {what}"),
        || {
            reason = w
                .events_after(after)
                .iter()
                .filter(|e| e["reconciler"] == reconciler)
                .filter_map(|e| e["reason"].as_str())
                .find(|r| *r == "resync" || r.starts_with("host event"))
                .unwrap_or_default()
                .to_string();
            !reason.is_empty()
        },
    );
    let mut counted = 0.0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while counted <= 0.0 && Instant::now() < deadline {
        counted = drift_metric(w, reconciler) - before;
        std::thread::sleep(Duration::from_millis(50));
    }
    // Counted also when a retry pass finished the repair (the first attempt raced the
    // hand-made change, e.g. a name still taken).
    assert!(
        counted > 0.0,
        "{reconciler}: the repair of {what} is not in converge_drift_repairs_total"
    );
    w.wait_converged(1, bound());
    eprintln!(
        "drift: {reconciler}: {what} repaired after {took:.2?} ({reason}, {counted} counted)"
    );
    rows.push(Repair {
        reconciler,
        drift: what,
        took,
        reason,
        counted,
    });
}

fn print_table(rows: &[Repair]) {
    eprintln!("\n| reconciler | drift | repaired after | pass | repairs counted |");
    eprintln!("|---|---|---|---|---|");
    for r in rows {
        eprintln!(
            "| {} | {} | {:.2} s | {} | {} |",
            r.reconciler,
            r.drift,
            r.took.as_secs_f64(),
            r.reason,
            r.counted
        );
    }
}

/// The document's view of the host, for the checks after a repair.
fn expected(w: &WholeNode) -> Expected {
    WholeNode::expected(&w.doc(1, Scale::SMALL, 0, true))
}

fn inspect(w: &WholeNode, name: &str, template: &str) -> String {
    let out = w.podman(&["inspect", "-f", template, name]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every container of the document running on the network at its address.
fn containers_whole(w: &WholeNode) -> bool {
    let cs = w.containers();
    let want = expected(w).containers;
    cs.keys()
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        == want
        && cs.values().all(|s| is_running(s))
        && want.iter().all(|name| {
            let i: usize = name.trim_start_matches("web").parse().unwrap_or(0);
            inspect(
                w,
                name,
                &format!(
                    "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                    w.network
                ),
            ) == format!("10.89.0.{}", 10 + i)
        })
}

#[test]
fn drift_containers() {
    let _one = one_at_a_time();
    let w = converged_node("wn-cont", "c1");
    let mut rows = Vec::new();
    drift(
        &w,
        &mut rows,
        "containers",
        "container stopped",
        || {
            w.podman_ok(&["stop", "-t", "0", "web1"]);
        },
        || w.running("web1"),
    );
    drift(
        &w,
        &mut rows,
        "containers",
        "container removed",
        || {
            w.podman_ok(&["rm", "-f", "-t", "0", "web1"]);
        },
        || w.running("web1"),
    );
    // Recreated by hand with converge's labels (copied from inspect, as a hand-made
    // `podman run` would) but another memory limit and no network: converge's inspect
    // comparison sees it and replaces it.
    let labels: serde_json::Map<String, Value> =
        serde_json::from_str(&inspect(&w, "web2", "{{json .Config.Labels}}")).expect("labels");
    drift(
        &w,
        &mut rows,
        "containers",
        "container recreated by hand",
        || {
            // `--replace` removes converge's instance first; converge may recreate
            // its own in between (the removal is an event): then again.
            let mut args: Vec<String> = [
                "run",
                "-d",
                "--replace",
                "--name",
                "web2",
                "--memory",
                "64m",
            ]
            .map(String::from)
            .into();
            for (k, v) in &labels {
                args.push("--label".into());
                args.push(format!("{k}={}", v.as_str().unwrap_or_default()));
            }
            args.extend([common::podman::TEST_IMAGE, "sleep", "1000"].map(String::from));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            wait_until(Duration::from_secs(20), "web2 recreated by hand", || {
                w.podman(&args).status.success()
            });
        },
        || {
            w.running("web2")
                && inspect(&w, "web2", "{{.HostConfig.Memory}}") == "0"
                && containers_whole(&w)
        },
    );
    drift(
        &w,
        &mut rows,
        "containers",
        "network removed",
        || {
            // Force: the network's containers go with it.
            w.podman_ok(&["network", "rm", "-f", &w.network]);
        },
        || w.networks().contains(&w.network) && containers_whole(&w),
    );
    // The route to web0 follows its new address.
    wait_until(bound(), "web.test served again", || {
        https_get(&w.node, "web.test", "127.0.0.1").as_deref() == Some("web0\n")
    });
    print_table(&rows);
}

#[test]
fn drift_firewall() {
    let _one = one_at_a_time();
    let w = converged_node("wn-fw", "f1");
    let want = expected(&w).ports;
    let whole = || w.dnat_keys() == want;
    assert!(whole(), "{:?}", w.dnat_keys());
    let mut rows = Vec::new();
    drift(
        &w,
        &mut rows,
        "firewall",
        "table deleted",
        || {
            w.node
                .run_ok("nft", ["delete", "table", "inet", "converge"]);
        },
        whole,
    );
    drift(
        &w,
        &mut rows,
        "firewall",
        "map element removed",
        || {
            w.node.run_ok(
                "nft",
                ["delete element inet converge dnat4_any { tcp . 20001 }"],
            );
        },
        whole,
    );
    drift(
        &w,
        &mut rows,
        "firewall",
        "nft flush ruleset",
        || {
            w.node.run_ok("nft", ["flush", "ruleset"]);
        },
        whole,
    );
    // The routes reconciler's table came back too (its own repair).
    wait_until(bound(), "converge_proxy back", || {
        w.has_table("converge_proxy")
    });
    print_table(&rows);
}

#[test]
fn drift_wireguard() {
    let _one = one_at_a_time();
    let w = converged_node("wn-wg", "w1");
    let want = expected(&w).peers;
    let whole = || w.wg_peers() == want && w.wg_addresses().contains("10.78.0.1/16");
    assert!(whole());
    let mut rows = Vec::new();
    let some_peer = want.iter().next().cloned().expect("a peer");
    drift(
        &w,
        &mut rows,
        "wireguard",
        "peer removed",
        || {
            w.node
                .run_ok("wg", ["set", &w.iface, "peer", &some_peer, "remove"]);
        },
        whole,
    );
    drift(
        &w,
        &mut rows,
        "wireguard",
        "address flushed",
        || {
            // `ip` flushes in rounds until nothing is left, and gives up ("Flush
            // remains incomplete") when converge puts the address back meanwhile.
            let out = w.node.run("ip", ["addr", "flush", "dev", &w.iface]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() || err.contains("Flush remains incomplete"),
                "ip addr flush: {err}"
            );
        },
        whole,
    );
    drift(
        &w,
        &mut rows,
        "wireguard",
        "link deleted",
        || {
            w.node.run_ok("ip", ["link", "del", &w.iface]);
        },
        whole,
    );
    let pids = converge_wireguard::driver::wireguard_go_pids(&w.iface);
    assert_eq!(pids.len(), 1, "one wireguard-go");
    drift(
        &w,
        &mut rows,
        "wireguard",
        "wireguard-go killed",
        || {
            // SAFETY: kill(2) of the wireguard-go serving this test's interface.
            unsafe { libc::kill(pids[0] as libc::pid_t, libc::SIGKILL) };
        },
        || {
            let now = converge_wireguard::driver::wireguard_go_pids(&w.iface);
            now.len() == 1 && now != pids && whole()
        },
    );
    print_table(&rows);
}

fn dns_answers(w: &WholeNode, sock: &UdpSocket, name: &str, want: &str) -> bool {
    let server = SocketAddr::new(w.node.address().into(), 53);
    query(
        sock,
        server,
        name,
        RecordType::A,
        Duration::from_millis(300),
    )
    .is_ok_and(|a| a.values == [want])
}

#[test]
fn drift_dns() {
    let _one = one_at_a_time();
    let w = converged_node("wn-dns", "d1");
    let sock = w
        .node
        .in_netns(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
    let serving = || dns_answers(&w, &sock, "h2.internal", "10.88.0.3");
    assert!(serving());
    let dir = common::agent::data(&w.node).join("dns");
    let conf = std::fs::read_dir(&dir)
        .expect("dns dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("dnsmasq-") && n.ends_with(".conf"))
        })
        .expect("dnsmasq config");
    let conf_text = std::fs::read_to_string(&conf).expect("read config");
    let hosts = dir.join("hosts/converge.hosts");
    let hosts_text = std::fs::read_to_string(&hosts).expect("read hosts");
    let mut rows = Vec::new();
    let pids = w.dnsmasq_pids();
    assert_eq!(pids.len(), 1, "one dnsmasq");
    drift(
        &w,
        &mut rows,
        "dns",
        "dnsmasq killed",
        || {
            // SAFETY: kill(2) of the dnsmasq this test's agent started.
            unsafe { libc::kill(pids[0] as libc::pid_t, libc::SIGKILL) };
            wait_until(Duration::from_secs(5), "dnsmasq gone", || {
                !pid_alive(pids[0])
            });
        },
        || {
            let now = w.dnsmasq_pids();
            now.len() == 1 && now != pids && serving()
        },
    );
    drift(
        &w,
        &mut rows,
        "dns",
        "config edited",
        || {
            std::fs::write(
                &conf,
                format!("{conf_text}address=/evil.internal/10.66.6.6\n"),
            )
            .expect("edit config");
        },
        || std::fs::read_to_string(&conf).is_ok_and(|t| t == conf_text) && serving(),
    );
    drift(
        &w,
        &mut rows,
        "dns",
        "hosts file edited",
        || {
            std::fs::write(&hosts, "10.66.6.6 h2.internal\n").expect("edit hosts");
        },
        || std::fs::read_to_string(&hosts).is_ok_and(|t| t == hosts_text) && serving(),
    );
    assert_eq!(w.dnsmasq_pids().len(), 1, "one dnsmasq");
    print_table(&rows);
}

#[test]
fn drift_routes() {
    let _one = one_at_a_time();
    let w = converged_node("wn-rt", "r1");
    let want = expected(&w).routes;
    let served = || https_get(&w.node, "web.test", "127.0.0.1").as_deref() == Some("web0\n");
    let whole = || w.caddy_routes() == want && served();
    assert!(whole(), "{:?}", w.caddy_routes());
    let mut rows = Vec::new();
    drift(
        &w,
        &mut rows,
        "routes",
        "route deleted through the admin API",
        || {
            let (code, body) = caddy_admin(&w.node, "DELETE", "/id/converge-route-r1", None);
            assert_eq!(code, 200, "{body}");
        },
        whole,
    );
    let active = w.active_caddy();
    let pid = caddy_pid(&active).expect("caddy pid");
    drift(
        &w,
        &mut rows,
        "routes",
        "serving Caddy killed",
        || {
            // SAFETY: kill(2) of the Caddy this test's agent started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        },
        || w.caddy_pids().len() == 2 && !w.caddy_pids().contains(&pid) && whole(),
    );
    print_table(&rows);
}

/// The stored value of one metadata entry (None without the file or row).
fn db_value(w: &WholeNode, project: &str, path: &str) -> Option<String> {
    let db = common::agent::data(&w.node).join("metadata.db");
    if !db.exists() {
        return None;
    }
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row(
        "SELECT value FROM entries WHERE project = ?1 AND path = ?2",
        [project, path],
        |r| r.get::<_, String>(0),
    )
    .ok()
}

#[test]
fn drift_metadata() {
    let _one = one_at_a_time();
    let w = converged_node("wn-meta", "m1");
    let mut rows = Vec::new();
    assert_eq!(db_value(&w, "proj0", "k5").as_deref(), Some("0"));
    drift(
        &w,
        &mut rows,
        "metadata",
        "row edited",
        || {
            let db = common::agent::data(&w.node).join("metadata.db");
            let conn = rusqlite::Connection::open(&db).expect("open metadata.db");
            conn.execute(
                "UPDATE entries SET value = '\"tampered\"' WHERE project = 'proj0' AND path = 'k5'",
                [],
            )
            .expect("edit");
        },
        || db_value(&w, "proj0", "k5").as_deref() == Some("0"),
    );
    drift(
        &w,
        &mut rows,
        "metadata",
        "metadata.db deleted",
        || {
            let db = common::agent::data(&w.node).join("metadata.db");
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
            }
        },
        || db_value(&w, "proj1", "k9").as_deref() == Some("0") && w.metadata_projects().len() == 2,
    );
    print_table(&rows);
}

/// The backups repairs happen in a slot's run (a requested wake-up, not a drift pass,
/// so `converge_drift_repairs_total` does not count them): the run's journal entry.
fn backups_event(w: &WholeNode, after: i64) -> String {
    let mut found = String::new();
    wait_until(Duration::from_secs(15), "a backups event", || {
        found = w
            .events_after(after)
            .iter()
            .find(|e| e["reconciler"] == "backups")
            .map(|e| format!("{}: {} ({})", e["object"], e["message"], e["reason"]))
            .unwrap_or_default();
        !found.is_empty()
    });
    found.replace('"', "")
}

#[test]
fn drift_backups() {
    let _one = one_at_a_time();
    let w = converged_node("wn-bk", "b1");
    let repo = w.repo.display().to_string();
    let mut rows = Vec::new();
    let newest = |w: &WholeNode| -> Option<String> {
        w.archives()?
            .into_iter()
            .filter(|a| !a.ends_with(".checkpoint"))
            .max()
    };

    // A lock left behind by a borg killed -9 (its pid dead, this host): broken before
    // the next slot's run, which then makes its archive.
    wait_until(Duration::from_secs(60), "no borg running", || {
        w.borg_pids().is_empty()
    });
    let before = newest(&w).expect("an archive");
    let success = w.last_success();
    let after_lock = w.last_event_id();
    let locked_at = Instant::now();
    // In the node, as a borg of this host (borg's host id includes a MAC address).
    let mut holder = w
        .node
        .command("borg")
        .args(["with-lock", &repo, "sleep", "600"])
        .env("BORG_PASSPHRASE", PASSPHRASE)
        .env("BORG_BASE_DIR", w.node.data_dir().join("test-borg"))
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("borg with-lock");
    wait_until(Duration::from_secs(30), "the test's lock taken", || {
        w.repo_locked() && w.borg_pids().contains(&holder.id())
    });
    let sleeper = converge_core::host::find(|args| {
        args.len() == 2 && args[0].ends_with(b"sleep") && args[1] == b"600"
    })
    .unwrap_or_default();
    let _ = holder.kill();
    let _ = holder.wait();
    for p in sleeper {
        // SAFETY: kill(2) of the `sleep 600` the test's borg started.
        unsafe { libc::kill(p.pid as libc::pid_t, libc::SIGKILL) };
    }
    assert!(w.repo_locked(), "a stale lock left");
    let t = Instant::now();
    // Polled in the record: a borg of the test would keep the repository busy.
    wait_until(bound(), "backups: stale lock broken, a new archive", || {
        w.last_success() != success && !w.repo_locked()
    });
    let took = t.elapsed();
    assert!(newest(&w).is_some_and(|n| n > before), "a new archive");
    eprintln!(
        "drift: backups: stale lock broken and a new archive after {took:.2?} (lock held {:.2?})",
        locked_at.elapsed() - took
    );
    rows.push(Repair {
        reconciler: "backups",
        drift: "stale borg lock",
        took,
        reason: backups_event(&w, after_lock),
        counted: 0.0,
    });

    // An archive deleted: converge records each slot as done and never runs it again, so
    // the deleted archive is not made again; the next slot's archive is the next one.
    wait_until(Duration::from_secs(60), "no borg running", || {
        w.borg_pids().is_empty()
    });
    let victim = newest(&w).expect("an archive");
    let out = w.borg(&["delete", &format!("{repo}::{victim}")]);
    assert!(
        out.status.success(),
        "borg delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let success = w.last_success();
    let after_delete = w.last_event_id();
    let t = Instant::now();
    wait_until(bound(), "backups: a newer archive after a deletion", || {
        w.last_success() != success
    });
    let took = t.elapsed();
    assert!(newest(&w).is_some_and(|n| n > victim), "a newer archive");
    assert!(
        !w.archives().unwrap_or_default().contains(&victim),
        "the deleted archive is not made again (its slot is done)"
    );
    eprintln!("drift: backups: archive deleted, the next slot's archive after {took:.2?}");
    rows.push(Repair {
        reconciler: "backups",
        drift: "archive deleted (not remade; next slot)",
        took,
        reason: backups_event(&w, after_delete),
        counted: 0.0,
    });
    w.wait_converged(1, bound());
    print_table(&rows);
}

/// `CHAOS_SCALE` (`containers,ports,records,peers,routes,projects,entries`), else the
/// issue's shape: tens of containers, thousands of ports and records, hundreds of peers
/// and routes, metadata projects.
fn chaos_scale() -> Scale {
    let default = Scale {
        containers: 20,
        ports: 2000,
        records: 2000,
        peers: 200,
        routes: 200,
        projects: 10,
        entries: 100,
    };
    let Ok(text) = std::env::var("CHAOS_SCALE") else {
        return default;
    };
    let n: Vec<usize> = text
        .split(',')
        .map(|s| s.trim().parse().expect("CHAOS_SCALE: numbers"))
        .collect();
    assert_eq!(n.len(), 7, "CHAOS_SCALE: seven numbers");
    Scale {
        containers: n[0],
        ports: n[1],
        records: n[2],
        peers: n[3],
        routes: n[4],
        projects: n[5],
        entries: n[6],
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: a number")))
        .unwrap_or(default)
}

/// Where one round's kill landed.
struct Kill {
    round: u64,
    after: Duration,
    /// `after` as a fraction of the round's kill window (the unkilled apply's length).
    fraction: f64,
    /// Reconcilers that had not passed the round's generation when it was killed.
    pending: Vec<&'static str>,
    borg_running: bool,
    /// From the restart to every reconciler converged.
    recovered: Duration,
}

/// The host holds exactly what `doc` says, one dnsmasq and one Caddy pair.
fn check_exact(w: &WholeNode, doc: &Value, round: u64) {
    let want = WholeNode::expected(doc);
    let mut got = w.host_state();
    // Settling: a Caddy instance reloaded after its drain, a replaced container's name.
    let deadline = Instant::now() + Duration::from_secs(30);
    while got != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        got = w.host_state();
    }
    for (what, g, e) in [
        (
            "containers",
            format!("{:?}", got.containers),
            format!("{:?}", want.containers),
        ),
        (
            "networks",
            format!("{:?}", got.networks),
            format!("{:?}", want.networks),
        ),
        (
            "dnat elements",
            format!(
                "{} {:?}",
                got.ports.len(),
                got.ports
                    .difference(&want.ports)
                    .take(5)
                    .collect::<Vec<_>>()
            ),
            format!(
                "{} {:?}",
                want.ports.len(),
                want.ports
                    .difference(&got.ports)
                    .take(5)
                    .collect::<Vec<_>>()
            ),
        ),
        (
            "peers",
            format!("{}", got.peers.len()),
            format!("{}", want.peers.len()),
        ),
        (
            "routes",
            format!(
                "{:?}",
                got.routes.difference(&want.routes).collect::<Vec<_>>()
            ),
            format!(
                "{:?}",
                want.routes.difference(&got.routes).collect::<Vec<_>>()
            ),
        ),
    ] {
        assert_eq!(g, e, "round {round}: {what} (host vs document)");
    }
    assert_eq!(got.peers, want.peers, "round {round}: peers");
    assert_eq!(got.ports, want.ports, "round {round}: dnat elements");
    assert_eq!(got.routes, want.routes, "round {round}: routes");
    assert_eq!(got.entries, want.entries, "round {round}: metadata entries");
    assert!(
        w.containers().values().all(|s| is_running(s)),
        "round {round}: every container running: {:?}",
        w.containers()
    );
    assert_eq!(w.dnsmasq_pids().len(), 1, "round {round}: one dnsmasq");
    assert_eq!(w.caddy_pids().len(), 2, "round {round}: one Caddy pair");
}

#[test]
fn kill_9_during_large_applies_of_every_section() {
    let _one = one_at_a_time();
    let rounds = env_u64("CHAOS_ROUNDS", 3);
    let seed = env_u64(
        "CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1),
    );
    let scale = chaos_scale();
    eprintln!("chaos: {rounds} rounds, seed {seed}, scale {scale:?}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut w = WholeNode::new("wn-chaos", "k1", RESYNC_SECS, TIME_SCALE);
    w.start();
    let t = Instant::now();
    w.push(&w.doc(1, scale, 0, true));
    w.wait_converged(1, Duration::from_secs(600));
    let first = t.elapsed();
    // The kill window: how long an apply of one round's change takes unkilled.
    let t = Instant::now();
    w.push(&w.doc(2, scale, 1, true));
    w.wait_converged(2, Duration::from_secs(600));
    let window = t.elapsed();
    eprintln!("chaos: first apply {first:.2?}, one round's change {window:.2?} (the kill window)");
    check_exact(&w, &w.doc(2, scale, 1, true), 0);

    let mut kills = Vec::new();
    let mut g = 2;
    for round in 1..=rounds {
        g += 1;
        let last = round == rounds;
        // Variants alternate what changes; the last document stops the schedule being
        // due, so that no borg holds the lock when the end is checked.
        let doc = w.doc(g, scale, round + 1, !last);
        if round % 3 == 0 && !last {
            // Every third round, the kill lands while a backup runs (a slot every 5 s).
            let t = Instant::now();
            while w.borg_pids().is_empty() && t.elapsed() < Duration::from_secs(15) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        w.push(&doc);
        let pushed = Instant::now();
        // Half the kills land in the first 300 ms, where every reconciler is still
        // at work, the others anywhere in the window.
        let span = if rng.bool() {
            window.min(Duration::from_millis(300))
        } else {
            window
        };
        let after = span.mul_f64(rng.f64());
        while pushed.elapsed() < after {
            std::thread::sleep(Duration::from_millis(2));
        }
        let st = common::agent::status(&w.node);
        let pending: Vec<&'static str> = common::wholenode::reconcilers()
            .filter(|n| common::agent::reconciler(&st, n)["observedGeneration"] != g)
            .collect();
        let borg_running = !w.borg_pids().is_empty();
        let after = pushed.elapsed();
        w.kill9();
        w.start();
        let t = Instant::now();
        w.wait_converged(g, Duration::from_secs(600));
        let recovered = t.elapsed();
        check_exact(&w, &doc, round);
        assert_eq!(w.integrity("state.db"), "ok", "round {round}: state.db");
        assert_eq!(
            w.integrity("metadata.db"),
            "ok",
            "round {round}: metadata.db"
        );
        eprintln!(
            "chaos: round {round}: killed {after:.2?} after the push ({:.0} % of the window), pending {pending:?}, borg running {borg_running}; converged {recovered:.2?} after the restart",
            100.0 * after.as_secs_f64() / window.as_secs_f64()
        );
        kills.push(Kill {
            round,
            after,
            fraction: after.as_secs_f64() / window.as_secs_f64(),
            pending,
            borg_running,
            recovered,
        });
    }

    // The end: exactly the last document, nothing half done.
    let last = w.doc(g, scale, rounds + 1, false);
    check_exact(&w, &last, rounds);
    wait_until(Duration::from_secs(120), "no borg running", || {
        w.borg_pids().is_empty()
    });
    assert!(!w.repo_locked(), "no borg lock left");
    let temps = w.temp_files();
    assert!(temps.is_empty(), "half-written files left: {temps:?}");
    assert_eq!(w.integrity("state.db"), "ok");
    assert_eq!(w.integrity("metadata.db"), "ok");
    assert_eq!(
        https_get(&w.node, "web.test", "127.0.0.1").as_deref(),
        Some("web0\n"),
        "web.test served"
    );
    let archives = w.archives().expect("borg list");
    let check = w.borg(&["check", "--repository-only", &w.repo.display().to_string()]);
    assert!(
        check.status.success(),
        "borg check: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    eprintln!("\n| round | killed after push | of the window | pending reconcilers | borg running | restart to converged |");
    eprintln!("|---|---|---|---|---|---|");
    for k in &kills {
        eprintln!(
            "| {} | {:.2} s | {:.0} % | {} | {} | {:.2} s |",
            k.round,
            k.after.as_secs_f64(),
            100.0 * k.fraction,
            k.pending.join(" "),
            k.borg_running,
            k.recovered.as_secs_f64()
        );
    }
    // The spread of the kill points and what each landed in.
    let mut fractions: Vec<f64> = kills.iter().map(|k| k.fraction).collect();
    fractions.sort_by(f64::total_cmp);
    let q = |p: f64| fractions[((fractions.len() - 1) as f64 * p).round() as usize];
    let mut in_flight = std::collections::BTreeMap::<&str, usize>::new();
    for k in &kills {
        for p in &k.pending {
            *in_flight.entry(p).or_default() += 1;
        }
    }
    let mut recovered: Vec<Duration> = kills.iter().map(|k| k.recovered).collect();
    recovered.sort();
    eprintln!(
        "\nchaos: {rounds} rounds, seed {seed}, 0 failures; kill window {window:.2?}; kill points (fraction of the window) min {:.2} / q1 {:.2} / median {:.2} / q3 {:.2} / max {:.2}; borg running at {} kills; {} kills before any reconciler finished, {} after all; reconcilers in flight at the kill: {in_flight:?}; restart to converged median {:.2?}, max {:.2?}; {} archives, borg check ok",
        q(0.0),
        q(0.25),
        q(0.5),
        q(0.75),
        q(1.0),
        kills.iter().filter(|k| k.borg_running).count(),
        kills.iter().filter(|k| k.pending.len() == common::wholenode::reconcilers().count()).count(),
        kills.iter().filter(|k| k.pending.is_empty()).count(),
        recovered[recovered.len() / 2],
        recovered[recovered.len() - 1],
        archives.len(),
    );
}
