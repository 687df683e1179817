//! OS plumbing for the daemons converge starts and finds again (dnsmasq, wireguard-go,
//! Caddy, borg), in one place: [`find`] processes by command line (a /proc scan, so one
//! a crashed agent left behind is found too), [`stop`] them (SIGTERM, a grace, SIGKILL),
//! start them so that they outlive the agent ([`daemon_command`], [`spawn_detached`]),
//! watch one exit ([`exit_watch`], a pidfd) and the files of a directory ([`dir_watch`],
//! inotify). Built on rustix and the inotify crate; two `unsafe` blocks (the `pre_exec`
//! hook of a detached start, the registration of a pidfd with tokio).

use crate::HostEvent;
use futures::stream::BoxStream;
use futures::StreamExt;
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags};
use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;
use tokio::io::unix::AsyncFd;

pub use rustix::process::Signal;

/// A process found by [`find`]: its pid and its arguments (`argv[0]` first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub args: Vec<Vec<u8>>,
}

/// Every running process (zombies left out) whose arguments `matches` accepts, by pid.
/// Processes that end or hide their command line during the scan are skipped.
pub fn find(mut matches: impl FnMut(&[&[u8]]) -> bool) -> io::Result<Vec<Process>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        // NUL-terminated arguments: the last split piece is the empty tail.
        let mut args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.last().is_some_and(|a| a.is_empty()) {
            args.pop();
        }
        if !args.is_empty() && matches(&args) && alive(pid) {
            let args = args.into_iter().map(<[u8]>::to_vec).collect();
            found.push(Process { pid, args });
        }
    }
    found.sort_by_key(|p| p.pid);
    Ok(found)
}

/// Whether `pid` is running; a zombie (exited, not yet reaped by its new parent) is not.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// The parent of `pid`, if it still runs.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn rustix_pid(pid: u32) -> io::Result<Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("pid {pid}")))
}

/// Sends `sig` to `pid` (a pid that no longer exists is ignored).
pub fn signal(pid: u32, sig: Signal) {
    if let Ok(pid) = rustix_pid(pid) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

fn open_pidfd(pid: u32) -> io::Result<OwnedFd> {
    Ok(pidfd_open(rustix_pid(pid)?, PidfdFlags::empty())?)
}

/// A watch on one process's exit (a pidfd: readable once the process has ended).
/// Signals sent through it reach that process only, never a later one with its pid.
pub struct ExitWatch(AsyncFd<OwnedFd>);

/// An event (`process NAME PID exited`) each time a watched process exits (a pidfd
/// becomes readable when its process ends); `pids` is updated by the driver whenever
/// it sees what runs (observe, start). The Caddy pair and dnsmasq are watched so.
pub fn exit_events(
    name: &'static str,
    pids: tokio::sync::watch::Receiver<Vec<u32>>,
) -> BoxStream<'static, HostEvent> {
    let exited = std::collections::BTreeSet::new();
    futures::stream::unfold((pids, exited), move |(mut pids, mut exited)| async move {
        loop {
            let current = pids.borrow_and_update().clone();
            // A pid reported once is not reported again while observe still lists it.
            exited.retain(|p| current.contains(p));
            let mut watched = Vec::new();
            for pid in current.iter().copied().filter(|p| !exited.contains(p)) {
                let Ok(watch) = exit_watch(pid) else {
                    // Already gone before we could watch it.
                    exited.insert(pid);
                    return Some((
                        HostEvent(format!("process {name} {pid} exited")),
                        (pids, exited),
                    ));
                };
                watched.push((pid, watch));
            }
            if watched.is_empty() {
                // Nothing (new) to watch: wait until observe or start sees a process.
                pids.changed().await.ok()?;
                continue;
            }
            let exits = watched.iter().map(|(pid, watch)| {
                Box::pin(async move {
                    watch.exited().await;
                    *pid
                })
            });
            tokio::select! {
                (pid, _, _) = futures::future::select_all(exits) => {
                    exited.insert(pid);
                    return Some((HostEvent(format!("process {name} {pid} exited")), (pids, exited)));
                }
                changed = pids.changed() => {
                    // Watch whatever runs now.
                    changed.ok()?;
                }
            }
        }
    })
    .boxed()
}

/// Watches `pid`; an error (`ESRCH`) when it is already gone. Needs a tokio runtime.
pub fn exit_watch(pid: u32) -> io::Result<ExitWatch> {
    let fd = open_pidfd(pid)?;
    // SAFETY: the OwnedFd moves into the AsyncFd, which keeps that descriptor open until
    // it is dropped (tokio's safe constructors are deprecated as unsound for other types).
    let afd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)? };
    Ok(ExitWatch(afd))
}

impl ExitWatch {
    /// Resolves once the process has exited.
    pub async fn exited(&self) {
        // An error here means the runtime is going away: nothing left to wait for.
        drop(self.0.readable().await);
    }

    /// Sends `sig` to the watched process (ignored once it has exited).
    pub fn signal(&self, sig: Signal) {
        let _ = pidfd_send_signal(self.0.get_ref(), sig);
    }
}

/// Stops `pids`: SIGTERM, up to `grace` for all of them to exit, then SIGKILL to those
/// still running. Waits on pidfds (no polling), and signals only the processes that had
/// these pids when called.
pub async fn stop(pids: &[u32], grace: Duration) {
    let watches: Vec<ExitWatch> = pids.iter().filter_map(|p| exit_watch(*p).ok()).collect();
    for w in &watches {
        w.signal(Signal::TERM);
    }
    let all = futures::future::join_all(watches.iter().map(ExitWatch::exited));
    if tokio::time::timeout(grace, all).await.is_err() {
        for w in &watches {
            w.signal(Signal::KILL);
        }
    }
}

/// [`stop`] for a caller on a blocking thread (no async context): the same steps,
/// waiting with poll(2) on the pidfds.
pub fn stop_blocking(pids: &[u32], grace: Duration) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds: Vec<OwnedFd> = pids.iter().filter_map(|p| open_pidfd(*p).ok()).collect();
    for fd in &fds {
        let _ = pidfd_send_signal(fd, Signal::TERM);
    }
    let deadline = std::time::Instant::now() + grace;
    while !fds.is_empty() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let mut polled: Vec<PollFd> = fds
            .iter()
            .map(|fd| PollFd::new(fd, PollFlags::IN))
            .collect();
        let timeout = Timespec::try_from(left).unwrap_or(Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        });
        if poll(&mut polled, Some(&timeout)).is_err() {
            break;
        }
        let ended: Vec<bool> = polled.iter().map(|p| !p.revents().is_empty()).collect();
        drop(polled);
        let mut ended = ended.into_iter();
        fds.retain(|_| !ended.next().unwrap_or(false));
    }
    for fd in &fds {
        let _ = pidfd_send_signal(fd, Signal::KILL);
    }
}

/// Makes `cmd` start its process in a new session, so that no signal to the agent's
/// process group (a Ctrl-C, a stop of its session) reaches it.
pub fn detach(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the hook only calls setsid(2), which is
    // async-signal-safe and touches no memory of this process.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            Ok(())
        })
    }
}

/// Spawns `cmd` [`detach`]ed, as a tokio child to wait for (daemons that fork and exit
/// once up: `caddy start`, dnsmasq).
pub fn spawn_detached(mut cmd: std::process::Command) -> io::Result<tokio::process::Child> {
    detach(&mut cmd);
    tokio::process::Command::from(cmd).spawn()
}

/// The names of entries of `dirs` as they change: a file written (closed after writing),
/// deleted, or renamed in or out. Names come in the order the kernel reports them;
/// consecutive ones that are ready together can be taken as one burst with
/// `ready_chunks`. The stream ends if the watch fails. Needs a tokio runtime.
pub fn dir_watch(dirs: &[&Path]) -> io::Result<BoxStream<'static, OsString>> {
    use inotify::{Inotify, WatchMask};
    let inotify = Inotify::init()?;
    let mask =
        WatchMask::CLOSE_WRITE | WatchMask::DELETE | WatchMask::MOVED_FROM | WatchMask::MOVED_TO;
    for dir in dirs {
        inotify.watches().add(dir, mask)?;
    }
    let events = inotify.into_event_stream(vec![0u8; 4096])?;
    Ok(events
        .take_while(|e| std::future::ready(e.is_ok()))
        .filter_map(|e| std::future::ready(e.ok().and_then(|e| e.name)))
        .boxed())
}

/// Whether systemd is PID 1 here (`/run/systemd/system` exists, as sd_booted(3) checks).
pub fn systemd_booted() -> bool {
    std::path::Path::new("/run/systemd/system").is_dir()
}

/// The command that starts a daemon converge leaves running (dnsmasq, wireguard-go,
/// Caddy). When systemd is PID 1 it runs `systemd-run --scope`, which puts itself in the
/// transient scope `<unit>.scope` and execs `program` (same pid), so the daemon and what
/// it forks live outside the agent's cgroup: stopping or killing the agent's unit leaves
/// them serving, and systemd reports no left-over processes. Without systemd, `program`
/// runs directly (the caller detaches it, e.g. with setsid). `user` (uid, gid) is the
/// account the daemon runs as; supplementary groups are dropped either way. Callers add
/// the daemon's own arguments.
pub fn daemon_command(
    program: &std::path::Path,
    unit: &str,
    user: Option<(u32, u32)>,
) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    if systemd_booted() {
        // Absolute: callers may clear the environment (PATH) of the command.
        let run = ["/usr/bin/systemd-run", "/bin/systemd-run"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("systemd-run");
        let mut cmd = std::process::Command::new(run);
        cmd.args(["--scope", "--quiet", "--collect"])
            .arg(format!("--unit={}", unit_name(unit)));
        if let Some((uid, gid)) = user {
            cmd.arg(format!("--uid={uid}")).arg(format!("--gid={gid}"));
        }
        cmd.arg("--").arg(program);
        cmd
    } else {
        let mut cmd = std::process::Command::new(program);
        if let Some((uid, gid)) = user {
            // std drops the supplementary groups too when it changes the uid from root.
            cmd.uid(uid).gid(gid);
        }
        cmd
    }
}

/// A unit name from `name`: characters systemd does not allow in unit names become `_`.
pub fn unit_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A `sleep 30 TAG`, returned once it has exec'd: until then /proc shows the test
    /// binary's own command line for the forked child. TAG is a duration too (sleep adds
    /// its arguments up and fails on anything else).
    fn sleep_with_tag(tag: &str) -> std::process::Child {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .arg(tag)
            .spawn()
            .expect("spawn sleep");
        let deadline = Instant::now() + Duration::from_secs(10);
        while find_tag(tag).is_empty() {
            assert!(Instant::now() < deadline, "sleep {tag} never exec'd");
            std::thread::yield_now();
        }
        child
    }

    fn find_tag(tag: &str) -> Vec<u32> {
        find(|args| {
            args.first().is_some_and(|a| a.ends_with(b"sleep"))
                && args.get(2) == Some(&tag.as_bytes())
        })
        .expect("scan /proc")
        .into_iter()
        .map(|p| p.pid)
        .collect()
    }

    #[tokio::test]
    async fn finds_a_process_by_its_arguments_and_stops_it() {
        let tag = format!("{}s", std::process::id());
        let mut child = sleep_with_tag(&tag);
        assert_eq!(find_tag(&tag), vec![child.id()]);
        let started = Instant::now();
        stop(&[child.id()], Duration::from_secs(5)).await;
        // SIGTERM ends sleep at once: no wait for the grace.
        assert!(started.elapsed() < Duration::from_secs(4));
        let status = child.wait().expect("wait");
        assert!(!status.success());
        assert!(find_tag(&tag).is_empty());
    }

    #[tokio::test]
    async fn a_process_ignoring_sigterm_is_killed_after_the_grace() {
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "trap '' TERM; echo ready; while :; do sleep 0.05; done",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("ready");
        let started = Instant::now();
        stop(&[child.id()], Duration::from_millis(300)).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        let status = child.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn stop_blocking_stops_a_process() {
        let tag = format!("{}m", std::process::id());
        let mut child = sleep_with_tag(&tag);
        stop_blocking(&find_tag(&tag), Duration::from_secs(5));
        assert!(!child.wait().expect("wait").success());
    }

    #[tokio::test]
    async fn an_exit_watch_sees_the_exit_and_a_detached_child_has_its_own_session() {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        let mut child = spawn_detached(cmd).expect("spawn");
        let pid = child.id().expect("pid");
        let sid = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let sid: u32 = sid
            .rsplit_once(')')
            .expect("stat")
            .1
            .split_whitespace()
            .nth(3)
            .expect("sid")
            .parse()
            .expect("number");
        assert_eq!(sid, pid);
        let watch = exit_watch(pid).expect("watch");
        let waiting = tokio::time::timeout(Duration::from_millis(50), watch.exited()).await;
        assert!(waiting.is_err(), "still running");
        watch.signal(Signal::TERM);
        tokio::time::timeout(Duration::from_secs(5), watch.exited())
            .await
            .expect("exit seen");
        child.wait().await.expect("reaped");
        assert!(exit_watch(pid).is_err(), "gone");
    }

    #[tokio::test]
    async fn a_dir_watch_sees_a_file_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut names = dir_watch(&[dir.path()]).expect("watch");
        crate::fsutil::write_atomic(&dir.path().join("a.conf"), b"x", 0o600).expect("write");
        let name = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let n = names.next().await.expect("stream open");
                if n == "a.conf" {
                    return n;
                }
            }
        })
        .await
        .expect("an event");
        assert_eq!(name, "a.conf");
    }

    #[test]
    fn unit_names_are_sanitised() {
        assert_eq!(
            super::unit_name("converge-wireguard-wg0"),
            "converge-wireguard-wg0"
        );
        assert_eq!(super::unit_name("converge-dns-a/b c"), "converge-dns-a_b_c");
    }
}
