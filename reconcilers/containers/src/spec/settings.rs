//! The rest of a container's surface (Compose's names where it has them): process
//! identity, hostname and hosts file, capabilities, read-only root and tmpfs mounts,
//! ulimits, namespaced sysctls, stop signal, logging and devices. Their value types,
//! the names each accepts, and their semantic validation.

use super::*;
use converge_core::problems::is_dns_name;
use converge_core::vocab::key_path;
use converge_core::Problems;
use std::collections::BTreeSet;
use std::net::IpAddr;

/// A tmpfs mounted into the container (Compose `tmpfs`, with the long syntax's size
/// and mode).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Tmpfs {
    /// Absolute mount point inside the container, e.g. `/run` or `/tmp`.
    pub target: String,
    /// Size limit (`64Mi`, `1G`; same units as `resources.memory`); absent: the
    /// kernel's default (half of the host's memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// Permission bits in octal, e.g. `"1777"` or `"0755"`; absent: `1777`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// A resource limit of the container's processes (`setrlimit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Ulimit {
    /// The limit processes get; they may raise it up to `hard`.
    pub soft: u64,
    /// The ceiling; at least `soft`.
    pub hard: u64,
}

/// Where the container's output goes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Logging {
    /// Log driver.
    pub driver: LogDriver,
    /// Rotation of the log file (`json-file` and `k8s-file` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<LogOptions>,
}

/// Log driver of a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LogDriver {
    /// A log file on the host, rotated by `options`: Docker's json-file; Podman stores
    /// it as k8s-file.
    JsonFile,
    /// The host's systemd journal (needs journald on the host).
    Journald,
    /// Podman's own log file format (Podman only; Docker has no such driver).
    K8sFile,
    /// Output is discarded.
    None,
}

impl LogDriver {
    /// The driver's name, as the document and the runtimes spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            LogDriver::JsonFile => "json-file",
            LogDriver::Journald => "journald",
            LogDriver::K8sFile => "k8s-file",
            LogDriver::None => "none",
        }
    }
}

/// Log file rotation (Compose's `max-size` and `max-file` log options).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LogOptions {
    /// Size at which the log file is rotated (`10Mi`, `1G`; same units as
    /// `resources.memory`). Podman truncates its single file at this size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<String>,
    /// Log files kept, the current one included (requires `maxSize`). Docker only:
    /// Podman keeps one file whatever this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file: Option<u32>,
}

/// Linux capability names without their `CAP_` prefix (capabilities(7), up to 5.9).
pub const CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The capability as the runtimes take it (`CAP_NET_ADMIN`, or `ALL`), or None if
/// `name` is not one (case-insensitive, `CAP_` prefix optional).
pub fn capability(name: &str) -> Option<String> {
    let upper = name.to_ascii_uppercase();
    if upper == "ALL" {
        return Some(upper);
    }
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    CAPABILITIES.contains(&bare).then(|| format!("CAP_{bare}"))
}

/// Resource names `ulimits` accepts (Docker's and Podman's set, from setrlimit(2)).
pub const ULIMITS: &[&str] = &[
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

/// Standard Linux signals and their numbers (x86-64 and arm64 numbering).
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// First and last real-time signal as seen by programs (glibc reserves 32 and 33).
const SIGRTMIN: i32 = 34;
const SIGRTMAX: i32 = 64;

/// The signal's canonical name (`SIGTERM`, `SIGRTMIN+3`) and number, or None if `name`
/// is not a signal name (case-insensitive, `SIG` prefix optional).
pub fn signal(name: &str) -> Option<(String, i32)> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(&(n, num)) = SIGNALS.iter().find(|(n, _)| *n == bare) {
        return Some((format!("SIG{n}"), num));
    }
    let offset = |s: &str| -> Option<i32> {
        let n: i32 = s.parse().ok()?;
        (s.bytes().all(|b| b.is_ascii_digit()) && n <= SIGRTMAX - SIGRTMIN).then_some(n)
    };
    let num = match bare {
        "RTMIN" => SIGRTMIN,
        "RTMAX" => SIGRTMAX,
        _ => match (bare.strip_prefix("RTMIN+"), bare.strip_prefix("RTMAX-")) {
            (Some(n), _) => SIGRTMIN + offset(n)?,
            (_, Some(n)) => SIGRTMAX - offset(n)?,
            _ => return None,
        },
    };
    Some((format!("SIG{bare}"), num))
}

/// Whether a sysctl lives in a namespace of the container's own (network, IPC, POSIX
/// message queues), so setting it cannot change the host.
pub fn is_namespaced_sysctl(name: &str) -> bool {
    name.starts_with("net.")
        || name.starts_with("kernel.shm")
        || name.starts_with("kernel.msg")
        || name == "kernel.sem"
        || name.starts_with("fs.mqueue.")
}

/// One `devices` entry: host device, path inside the container, cgroup permissions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceEntry {
    pub host: String,
    pub container: String,
    pub permissions: String,
}

/// Parses `host-path[:container-path[:permissions]]` (Compose's short syntax: the
/// container path defaults to the host path, permissions to `rwm`; `host:rw` also works).
pub fn parse_device(s: &str) -> Result<DeviceEntry, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let is_perms = |p: &str| {
        !p.is_empty()
            && p.len() <= 3
            && p.bytes().all(|b| matches!(b, b'r' | b'w' | b'm'))
            && p.bytes().collect::<BTreeSet<u8>>().len() == p.len()
    };
    let (host, container, permissions) = match parts.as_slice() {
        [h] => (*h, *h, "rwm"),
        [h, p] if is_perms(p) => (*h, *h, *p),
        [h, c] => (*h, *c, "rwm"),
        [h, c, p] => (*h, *c, *p),
        _ => return Err(format!("{s:?} has more than three :-separated parts")),
    };
    if !host.starts_with("/dev/") || has_dot_dot(host) {
        return Err(format!("host device {host:?} is not a path under /dev/"));
    }
    if !container.starts_with('/') || container == "/" || has_dot_dot(container) {
        return Err(format!(
            "container path {container:?} is not an absolute path"
        ));
    }
    if !is_perms(permissions) {
        return Err(format!(
            "permissions {permissions:?} are not a combination of r, w and m"
        ));
    }
    Ok(DeviceEntry {
        host: host.to_string(),
        container: container.to_string(),
        permissions: permissions.to_string(),
    })
}

/// Parses a tmpfs `mode` (octal permission bits, at most `7777`).
pub fn parse_mode(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(s, 8).ok()
}

fn has_dot_dot(path: &str) -> bool {
    path.split('/').any(|p| p == "..")
}

/// Whether `user` is `user[:group]`, each a name or a numeric id.
fn is_user(user: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 32
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            && !p.starts_with('-')
    };
    match user.split_once(':') {
        Some((u, g)) => ok(u) && ok(g),
        None => ok(user),
    }
}

/// Checks of the fields above on container `c` at JSON path `cp`. `mounted` holds the
/// mount targets of its volumes (a tmpfs cannot share one).
pub(super) fn validate_settings(
    c: &Container,
    cp: &str,
    mounted: &BTreeMap<&str, usize>,
    problems: &mut Problems,
) {
    if let Some(ep) = &c.entrypoint {
        if c.command.is_some() {
            problems.push_hint(
                format!("{cp}.entrypoint"),
                "entrypoint and command are both set",
                "both replace the image's ENTRYPOINT; keep one (Compose's `command` is `args` here)",
            );
        }
        if ep.first().is_some_and(String::is_empty) {
            problems.push(
                format!("{cp}.entrypoint[0]"),
                "the executable must not be empty",
            );
        }
    }
    if let Some(u) = &c.user {
        if !is_user(u) {
            problems.push_hint(
                format!("{cp}.user"),
                format!("invalid user {u:?}"),
                "a user name or uid, optionally with :group or :gid, e.g. 1000:1000 or nobody",
            );
        }
    }
    if let Some(w) = &c.working_dir {
        if !w.starts_with('/') || has_dot_dot(w) {
            problems.push_hint(
                format!("{cp}.workingDir"),
                format!("working directory {w:?} is not an absolute path"),
                "e.g. /app",
            );
        }
    }
    if let Some(h) = &c.hostname {
        if h.len() > 63 || h.contains('*') || h.ends_with('.') || !is_dns_name(h, false) {
            problems.push_hint(
                format!("{cp}.hostname"),
                format!("invalid hostname {h:?}"),
                "letters, digits, - and ., at most 63 characters",
            );
        }
    }
    for (host, ip) in &c.extra_hosts {
        let hp = key_path(&format!("{cp}.extraHosts"), host);
        if host.contains('*') || !is_dns_name(host, false) {
            problems.push(hp.clone(), format!("invalid host name {host:?}"));
        }
        if ip.parse::<IpAddr>().is_err() {
            problems.push_hint(
                hp,
                format!("not an IP address: {ip:?}"),
                "map a host name to one IPv4 or IPv6 address",
            );
        }
    }
    // Dropping what is also added is contradictory (ALL aside: drop ALL, add a few).
    let mut added: BTreeSet<String> = BTreeSet::new();
    for (field, list) in [("capAdd", &c.cap_add), ("capDrop", &c.cap_drop)] {
        for (j, name) in list.iter().enumerate() {
            let Some(cap) = capability(name) else {
                problems.push_hint(
                    format!("{cp}.{field}[{j}]"),
                    format!("unknown capability {name:?}"),
                    "a name from capabilities(7) such as NET_ADMIN or CAP_NET_ADMIN, or ALL",
                );
                continue;
            };
            if field == "capAdd" {
                added.insert(cap);
            } else if cap != "ALL" && added.contains(&cap) {
                problems.push_hint(
                    format!("{cp}.capDrop[{j}]"),
                    format!("{cap} is both added and dropped"),
                    "keep it in one of capAdd and capDrop",
                );
            }
        }
    }
    let mut targets: BTreeSet<&str> = mounted.keys().copied().collect();
    for (j, t) in c.tmpfs.iter().enumerate() {
        let tp = format!("{cp}.tmpfs[{j}]");
        if !t.target.starts_with('/') || has_dot_dot(&t.target) {
            problems.push_hint(
                format!("{tp}.target"),
                format!("mount target {:?} is not an absolute path", t.target),
                "e.g. /run",
            );
        } else if t.target == "/" {
            problems.push(format!("{tp}.target"), "cannot mount over /");
        } else if !targets.insert(t.target.trim_end_matches('/')) {
            problems.push_hint(
                format!("{tp}.target"),
                format!("{:?} is mounted twice", t.target),
                "a volume or another tmpfs already uses it",
            );
        }
        if let Some(size) = &t.size {
            if parse_memory(size).is_none_or(|b| b == 0) {
                problems.push_hint(
                    format!("{tp}.size"),
                    format!("invalid size {size:?}"),
                    "a positive number with an optional unit Ki, Mi, Gi, Ti, K, M, G or T, e.g. 64Mi",
                );
            }
        }
        if let Some(mode) = &t.mode {
            if parse_mode(mode).is_none() {
                problems.push_hint(
                    format!("{tp}.mode"),
                    format!("invalid mode {mode:?}"),
                    "octal permission bits as a string, e.g. \"1777\" or \"0755\"",
                );
            }
        }
    }
    for (name, limit) in &c.ulimits {
        let up = key_path(&format!("{cp}.ulimits"), name);
        if !ULIMITS.contains(&name.as_str()) {
            problems.push_hint(
                up,
                format!("unknown ulimit {name:?}"),
                format!("one of {}", ULIMITS.join(", ")),
            );
        } else if limit.soft > limit.hard {
            problems.push(
                format!("{up}.soft"),
                format!(
                    "soft limit {} is above the hard limit {}",
                    limit.soft, limit.hard
                ),
            );
        } else if i64::try_from(limit.hard).is_err() {
            problems.push(format!("{up}.hard"), "limit too large (at most 2^63-1)");
        }
    }
    for (name, value) in &c.sysctls {
        let sp = key_path(&format!("{cp}.sysctls"), name);
        let well_formed = name.split('.').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        });
        if !well_formed || !is_namespaced_sysctl(name) {
            problems.push_hint(
                sp,
                format!("sysctl {name:?} is not namespaced: it would change the host"),
                "only net.*, kernel.shm*, kernel.msg*, kernel.sem and fs.mqueue.* can be set per container",
            );
        } else if name.starts_with("net.") && c.network.as_deref() == Some("host") {
            problems.push_hint(
                sp,
                format!("{name} would change the host's network namespace"),
                "a container on the host network cannot set net.* sysctls",
            );
        } else if value.is_empty() || value.chars().any(char::is_control) {
            problems.push(sp, format!("invalid sysctl value {value:?}"));
        }
    }
    if let Some(s) = &c.stop_signal {
        if signal(s).is_none() {
            problems.push_hint(
                format!("{cp}.stopSignal"),
                format!("unknown signal {s:?}"),
                "a signal name such as SIGTERM, SIGQUIT, SIGINT or SIGRTMIN+3",
            );
        }
    }
    if let Some(l) = &c.logging {
        validate_logging(l, &format!("{cp}.logging"), problems);
    }
    let mut device_paths: BTreeMap<String, usize> = BTreeMap::new();
    for (j, d) in c.devices.iter().enumerate() {
        let dp = format!("{cp}.devices[{j}]");
        match parse_device(d) {
            Err(e) => problems.push_hint(
                dp,
                e,
                "host-path[:container-path[:permissions]], e.g. /dev/fuse or /dev/ttyUSB0:/dev/modem:rw",
            ),
            Ok(dev) => {
                if let Some(first) = device_paths.insert(dev.container.clone(), j) {
                    problems.push_hint(
                        dp,
                        format!("{:?} is given twice", dev.container),
                        format!("also the container path of {cp}.devices[{first}]"),
                    );
                }
            }
        }
    }
    super::dns::validate_dns(c, cp, problems);
}

fn validate_logging(l: &Logging, lp: &str, problems: &mut Problems) {
    let Some(o) = &l.options else { return };
    if !matches!(l.driver, LogDriver::JsonFile | LogDriver::K8sFile) {
        problems.push_hint(
            format!("{lp}.options"),
            format!("the {} log driver has no file to rotate", l.driver.as_str()),
            "use options with json-file or k8s-file only",
        );
        return;
    }
    if let Some(m) = &o.max_size {
        match parse_memory(m) {
            Some(b) if b > 0 && i64::try_from(b).is_ok() => {}
            _ => problems.push_hint(
                format!("{lp}.options.maxSize"),
                format!("invalid size {m:?}"),
                "a positive number with an optional unit Ki, Mi, Gi, Ti, K, M, G or T, e.g. 10Mi",
            ),
        }
    }
    match o.max_file {
        Some(0) => problems.push(
            format!("{lp}.options.maxFile"),
            "maxFile must be at least 1",
        ),
        Some(_) if o.max_size.is_none() => problems.push_hint(
            format!("{lp}.options.maxFile"),
            "maxFile without maxSize rotates nothing",
            "set maxSize too",
        ),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(v: serde_json::Value) -> Vec<String> {
        let spec: ContainersSpec = serde_json::from_value(v).unwrap();
        let mut p = Problems::default();
        validate(&spec, "$.containers", &mut p);
        p.iter().map(|p| p.path.clone()).collect()
    }

    #[test]
    fn every_field_set_well_passes() {
        let got = problems(json!([{
            "name": "web", "image": "x:1",
            "entrypoint": ["/bin/httpd"], "args": ["-f"],
            "user": "1000:100", "workingDir": "/srv", "hostname": "web-1.example",
            "extraHosts": {"db.internal": "10.0.0.5", "v6": "fd00::5"},
            "capAdd": ["NET_ADMIN", "cap_sys_time"], "capDrop": ["ALL"],
            "readOnlyRootfs": true,
            "volumes": [{"source": "data", "target": "/data"}],
            "tmpfs": [{"target": "/run", "size": "64Mi", "mode": "1777"}, {"target": "/tmp"}],
            "ulimits": {"nofile": {"soft": 1024, "hard": 4096}, "core": {"soft": 0, "hard": 0}},
            "sysctls": {"net.core.somaxconn": "1024", "kernel.shmmax": "68719476736",
                        "kernel.msgmax": "65536", "kernel.sem": "250 32000 32 128",
                        "fs.mqueue.msg_max": "20"},
            "stopSignal": "SIGRTMIN+3",
            "logging": {"driver": "json-file", "options": {"maxSize": "10Mi", "maxFile": 3}},
            "devices": ["/dev/fuse", "/dev/ttyUSB0:/dev/modem:rw", "/dev/kvm:rwm"]
        }]));
        assert_eq!(got, Vec::<String>::new());
    }

    #[test]
    fn each_bad_value_reports_its_path() {
        let got = problems(json!([{
            "name": "a", "image": "x:1",
            "command": ["/bin/sh"], "entrypoint": [""],
            "user": "bad user", "workingDir": "srv", "hostname": "-bad",
            "extraHosts": {"ok.internal": "10.0.0.300", "bad host": "10.0.0.1"},
            "capAdd": ["NET_ADMIN", "CAP_FLY"], "capDrop": ["net_admin"],
            "volumes": [{"source": "data", "target": "/data"}],
            "tmpfs": [{"target": "/data"}, {"target": "run", "size": "0", "mode": "999"}],
            "ulimits": {"nofiles": {"soft": 1, "hard": 1}, "nproc": {"soft": 2, "hard": 1}},
            "sysctls": {"kernel.hostname": "x", "vm.swappiness": "0", "net.core.somaxconn": ""},
            "stopSignal": "SIGNOPE",
            "logging": {"driver": "json-file", "options": {"maxSize": "10MB", "maxFile": 0}},
            "devices": ["/etc/passwd", "/dev/a:/dev/x", "/dev/b:/dev/x", "/dev/c:/dev/c:rwx",
                        "/dev/d:dev/d"]
        }, {
            "name": "b", "image": "x:1", "network": "host",
            "sysctls": {"net.core.somaxconn": "1024"},
            "logging": {"driver": "journald", "options": {"maxSize": "1Mi"}}
        }, {
            "name": "c", "image": "x:1",
            "logging": {"driver": "k8s-file", "options": {"maxFile": 2}},
            "ulimits": {"nofile": {"soft": 1, "hard": 18446744073709551615u64}}
        }]));
        assert_eq!(
            got,
            vec![
                "$.containers[0].entrypoint",
                "$.containers[0].entrypoint[0]",
                "$.containers[0].user",
                "$.containers[0].workingDir",
                "$.containers[0].hostname",
                "$.containers[0].extraHosts[\"bad host\"]",
                "$.containers[0].extraHosts[\"ok.internal\"]",
                "$.containers[0].capAdd[1]",
                "$.containers[0].capDrop[0]",
                "$.containers[0].tmpfs[0].target",
                "$.containers[0].tmpfs[1].target",
                "$.containers[0].tmpfs[1].size",
                "$.containers[0].tmpfs[1].mode",
                "$.containers[0].ulimits.nofiles",
                "$.containers[0].ulimits.nproc.soft",
                "$.containers[0].sysctls[\"kernel.hostname\"]",
                "$.containers[0].sysctls[\"net.core.somaxconn\"]",
                "$.containers[0].sysctls[\"vm.swappiness\"]",
                "$.containers[0].stopSignal",
                "$.containers[0].logging.options.maxSize",
                "$.containers[0].logging.options.maxFile",
                "$.containers[0].devices[0]",
                "$.containers[0].devices[2]",
                "$.containers[0].devices[3]",
                "$.containers[0].devices[4]",
                "$.containers[1].sysctls[\"net.core.somaxconn\"]",
                "$.containers[1].logging.options",
                "$.containers[2].ulimits.nofile.hard",
                "$.containers[2].logging.options.maxFile",
            ]
        );
    }

    #[test]
    fn unknown_fields_and_drivers_are_refused() {
        for bad in [
            json!([{"name": "a", "image": "x:1", "logging": {"driver": "syslog"}}]),
            json!([{"name": "a", "image": "x:1", "logging": {"driver": "none", "opts": {}}}]),
            json!([{"name": "a", "image": "x:1", "ulimits": {"nofile": 1024}}]),
            json!([{"name": "a", "image": "x:1", "tmpfs": ["/run"]}]),
            json!([{"name": "a", "image": "x:1", "readOnly": true}]),
        ] {
            assert!(
                serde_json::from_value::<ContainersSpec>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(capability("net_admin").as_deref(), Some("CAP_NET_ADMIN"));
        assert_eq!(capability("CAP_BPF").as_deref(), Some("CAP_BPF"));
        assert_eq!(capability("all").as_deref(), Some("ALL"));
        assert_eq!(capability("CAP_ALL"), None);
        assert_eq!(signal("term"), Some(("SIGTERM".into(), 15)));
        assert_eq!(signal("SIGQUIT"), Some(("SIGQUIT".into(), 3)));
        assert_eq!(signal("SIGRTMIN+3"), Some(("SIGRTMIN+3".into(), 37)));
        assert_eq!(signal("rtmax-1"), Some(("SIGRTMAX-1".into(), 63)));
        for bad in [
            "",
            "SIG",
            "SIGRTMIN+31",
            "SIGRTMIN+-1",
            "SIGRTMIN+",
            "15",
            "SIGFOO",
        ] {
            assert_eq!(signal(bad), None, "{bad}");
        }
        assert_eq!(parse_mode("1777"), Some(0o1777));
        assert_eq!(parse_mode("755"), Some(0o755));
        assert_eq!(parse_mode("8"), None);
        assert_eq!(parse_mode("17777"), None);
        assert_eq!(
            parse_device("/dev/fuse"),
            Ok(DeviceEntry {
                host: "/dev/fuse".into(),
                container: "/dev/fuse".into(),
                permissions: "rwm".into()
            })
        );
        assert_eq!(
            parse_device("/dev/kvm:r").map(|d| (d.container, d.permissions)),
            Ok(("/dev/kvm".into(), "r".into()))
        );
        assert!(parse_device("/dev/a:/dev/b:rr").is_err());
        assert!(parse_device("/dev/../etc/shadow").is_err());
        assert!(parse_device("/dev/a:/b:r:x").is_err());
        assert_eq!(
            serde_json::to_value(LogDriver::K8sFile).unwrap(),
            "k8s-file"
        );
        assert_eq!(
            serde_json::to_value(LogDriver::JsonFile).unwrap(),
            "json-file"
        );
    }
}
