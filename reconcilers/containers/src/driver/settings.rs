//! The rest of the container surface as handed to a runtime: user, hostname, hosts
//! entries, capabilities, read-only root, tmpfs, ulimits, sysctls, stop signal, logging,
//! devices and resolver, already parsed and normalized from the document (see
//! `spec::settings` and `spec::dns`).

use crate::spec::{
    capability, parse_device, parse_memory, parse_mode, signal, Container, DeviceEntry, LogDriver,
};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Settings with their runtime defaults when empty ([`Default`] changes nothing).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContainerSettings {
    /// `user[:group]`.
    pub user: Option<String>,
    pub working_dir: Option<String>,
    pub hostname: Option<String>,
    /// `/etc/hosts` entries, in document order (sorted by name).
    pub extra_hosts: Vec<(String, IpAddr)>,
    /// `CAP_…` names, or `ALL`.
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub read_only_rootfs: bool,
    pub tmpfs: Vec<TmpfsMount>,
    /// Name (`nofile`) to (soft, hard).
    pub ulimits: BTreeMap<String, (u64, u64)>,
    pub sysctls: BTreeMap<String, String>,
    pub stop_signal: Option<StopSignal>,
    pub logging: Option<LogSpec>,
    pub devices: Vec<DeviceEntry>,
    /// resolv.conf name servers, search domains and options; each empty: the runtime's.
    pub dns_servers: Vec<IpAddr>,
    pub dns_search: Vec<String>,
    pub dns_options: Vec<String>,
}

/// A tmpfs mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TmpfsMount {
    pub target: String,
    /// Bytes.
    pub size: Option<u64>,
    /// Permission bits.
    pub mode: Option<u32>,
}

impl TmpfsMount {
    /// Mount options, spelled out so both runtimes mount the same way: Docker's
    /// defaults for `--tmpfs` (noexec, nosuid, nodev) plus size and mode.
    pub fn options(&self) -> Vec<String> {
        let mut o = vec![
            "rw".to_string(),
            "noexec".into(),
            "nosuid".into(),
            "nodev".into(),
        ];
        if let Some(s) = self.size {
            o.push(format!("size={s}"));
        }
        if let Some(m) = self.mode {
            o.push(format!("mode={m:o}"));
        }
        o
    }
}

/// A stop signal by name (Docker takes names) and number (Podman takes numbers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopSignal {
    pub name: String,
    pub number: i32,
}

/// Log driver with rotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSpec {
    pub driver: LogDriver,
    /// Bytes.
    pub max_size: Option<u64>,
    pub max_file: Option<u32>,
}

impl ContainerSettings {
    /// The settings of a document entry. Values that do not parse are left out: the
    /// document was validated before it got here.
    pub fn of(c: &Container) -> ContainerSettings {
        let dns = c.dns.as_ref();
        ContainerSettings {
            user: c.user.clone(),
            working_dir: c.working_dir.clone(),
            hostname: c.hostname.clone(),
            extra_hosts: c
                .extra_hosts
                .iter()
                .filter_map(|(h, ip)| Some((h.clone(), ip.parse().ok()?)))
                .collect(),
            cap_add: c.cap_add.iter().filter_map(|n| capability(n)).collect(),
            cap_drop: c.cap_drop.iter().filter_map(|n| capability(n)).collect(),
            read_only_rootfs: c.read_only_rootfs,
            tmpfs: c
                .tmpfs
                .iter()
                .map(|t| TmpfsMount {
                    target: t.target.clone(),
                    size: t.size.as_deref().and_then(parse_memory),
                    mode: t.mode.as_deref().and_then(parse_mode),
                })
                .collect(),
            ulimits: c
                .ulimits
                .iter()
                .map(|(n, l)| (n.clone(), (l.soft, l.hard)))
                .collect(),
            sysctls: c.sysctls.clone(),
            stop_signal: c
                .stop_signal
                .as_deref()
                .and_then(signal)
                .map(|(name, number)| StopSignal { name, number }),
            logging: c.logging.as_ref().map(|l| LogSpec {
                driver: l.driver,
                max_size: l
                    .options
                    .as_ref()
                    .and_then(|o| o.max_size.as_deref())
                    .and_then(parse_memory),
                max_file: l.options.as_ref().and_then(|o| o.max_file),
            }),
            devices: c
                .devices
                .iter()
                .filter_map(|d| parse_device(d).ok())
                .collect(),
            dns_servers: dns
                .and_then(|d| d.servers.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|s| s.parse().ok())
                .collect(),
            dns_search: dns.and_then(|d| d.search.clone()).unwrap_or_default(),
            dns_options: dns.and_then(|d| d.options.clone()).unwrap_or_default(),
        }
    }
}
