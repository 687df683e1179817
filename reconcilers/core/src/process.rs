//! Processes converge starts and finds again by scanning /proc (dnsmasq, Caddy): whether
//! one still runs, and signalling it; how a daemon is started so that it outlives the
//! agent (its own systemd scope when systemd is PID 1).

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

/// Sends `sig` to `pid` (a pid that no longer exists is ignored).
pub fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
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
    #[test]
    fn unit_names_are_sanitised() {
        assert_eq!(
            super::unit_name("converge-wireguard-wg0"),
            "converge-wireguard-wg0"
        );
        assert_eq!(super::unit_name("converge-dns-a/b c"), "converge-dns-a_b_c");
    }
}
