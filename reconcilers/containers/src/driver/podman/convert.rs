//! Conversion between converge's container types and libpod's: the create body from a
//! [`CreateSpec`], and a [`RuntimeContainer`] from an inspect response.

use super::*;

/// Translates a [`CreateSpec`] into libpod's create body (a SpecGenerator, as JSON:
/// podman-api's builder cannot express every field, see [`log_configuration`]).
pub(super) fn create_body(spec: &CreateSpec) -> Result<serde_json::Value, DriverError> {
    let bad = |what: String| failed("create", &spec.name, what);

    let mut b = ContainerCreateOpts::builder()
        .name(&spec.name)
        .image(&spec.image)
        .annotations([(IMAGE_ANNOTATION, spec.image.as_str())])
        .env(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .labels(spec.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        // converge restarts containers itself (crash-loop back-off, events).
        .restart_policy(ContainerRestartPolicy::No)
        .stop_timeout(spec.stop_grace.as_secs_f64().ceil() as u64);
    if let Some(cmd) = &spec.command {
        b = b.entrypoint(cmd);
    }
    if let Some(args) = &spec.args {
        b = b.command(args);
    }

    // Ports without a host port are reachable on the container's address anyway.
    let ports: Vec<PortMapping> = spec
        .ports
        .iter()
        .filter_map(|p| {
            Some(PortMapping {
                container_port: Some(p.container_port),
                host_port: Some(p.host_port?),
                host_ip: p.host_ip.clone(),
                protocol: Some(p.protocol.as_str().to_string()),
                range: None,
            })
        })
        .collect();
    if !ports.is_empty() {
        b = b.portmappings(ports);
    }

    let rw = |ro: bool| if ro { "ro" } else { "rw" }.to_string();
    let (binds, named): (Vec<_>, Vec<_>) = spec.volumes.iter().partition(|v| v.is_bind());
    if !named.is_empty() {
        // Created on demand by podman when missing.
        b = b.volumes(named.into_iter().map(|v| NamedVolume {
            name: Some(v.source.clone()),
            dest: Some(v.target.clone()),
            options: Some(vec![rw(v.read_only)]),
            is_anonymous: None,
        }));
    }
    let mounts: Vec<ContainerMount> = binds
        .into_iter()
        .map(|v| ContainerMount {
            _type: Some("bind".into()),
            source: Some(v.source.clone()),
            destination: Some(v.target.clone()),
            options: Some(vec![rw(v.read_only)]),
            uid_mappings: None,
            gid_mappings: None,
        })
        .chain(spec.settings.tmpfs.iter().map(|t| ContainerMount {
            _type: Some("tmpfs".into()),
            source: Some("tmpfs".into()),
            destination: Some(t.target.clone()),
            options: Some(t.options()),
            uid_mappings: None,
            gid_mappings: None,
        }))
        .collect();
    if !mounts.is_empty() {
        b = b.mounts(mounts);
    }

    let cpu = match spec.cpus {
        Some(c) if c.is_finite() && c > 0.0 => {
            const PERIOD: u64 = 100_000;
            Some(LinuxCpu {
                period: Some(PERIOD),
                quota: Some((c * PERIOD as f64).round() as i64),
                cpus: None,
                mems: None,
                realtime_period: None,
                realtime_runtime: None,
                shares: None,
            })
        }
        Some(c) => return Err(bad(format!("invalid cpu limit {c}"))),
        None => None,
    };
    let memory = match spec.memory {
        Some(m) => Some(LinuxMemory {
            limit: Some(i64::try_from(m).map_err(|_| bad(format!("memory limit {m} too large")))?),
            disable_oom_killer: None,
            kernel: None,
            kernel_tcp: None,
            reservation: None,
            swap: None,
            swappiness: None,
            use_hierarchy: None,
        }),
        None => None,
    };
    let pids = spec.pids.map(|p| LinuxPids {
        limit: Some(i64::from(p)),
    });
    if cpu.is_some() || memory.is_some() || pids.is_some() {
        b = b.resource_limits(LinuxResources {
            cpu,
            memory,
            pids,
            block_io: None,
            devices: None,
            hugepage_limits: None,
            network: None,
            rdma: None,
            unified: None,
        });
    }

    if let Some(h) = &spec.health {
        if h.command.is_empty() {
            return Err(bad("empty health-check command".into()));
        }
        let ns = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        let mut test = vec!["CMD".to_string()];
        test.extend(h.command.iter().cloned());
        b = b.health_config(Schema2HealthConfig {
            test: Some(test),
            interval: Some(ns(h.interval)),
            timeout: Some(ns(h.timeout)),
            start_period: Some(ns(h.start_period)),
            retries: Some(i64::from(h.retries)),
        });
    }

    // A static address needs an explicit network; `podman` is the default one. It gets
    // a MAC derived from it, as Docker does: a replacement keeps the address *and* the
    // MAC, so the host's neighbour entry stays right (a new random MAC left traffic to
    // the address black-holed until the entry went stale, 11-45 s).
    let network = match (&spec.network, spec.ip) {
        (Some(n), _) => Some(n.as_str()),
        (None, Some(_)) => Some("podman"),
        (None, None) => None,
    };
    if let Some(net) = network {
        let mut opts = serde_json::Map::new();
        if let Some(ip) = spec.ip {
            opts.insert("static_ips".into(), serde_json::json!([ip.to_string()]));
            opts.insert("static_mac".into(), serde_json::json!(static_mac(ip)));
        }
        b = b
            .net_namespace(Namespace {
                nsmode: Some("bridge".into()),
                value: None,
            })
            .networks([(net, serde_json::Value::Object(opts))]);
    }

    let b = with_settings(b, &spec.settings);
    let mut body: serde_json::Value = serde_json::from_str(
        &b.build()
            .serialize()
            .map_err(|e| bad(format!("create body: {e}")))?,
    )
    .map_err(|e| bad(format!("create body: {e}")))?;
    if let (Some(l), Some(map)) = (&spec.settings.logging, body.as_object_mut()) {
        // podman-api 0.10's `log_configuration` takes Docker's `{Type, Config}` shape,
        // which libpod ignores: set libpod's own here.
        map.insert("log_configuration".into(), log_configuration(l));
    }
    Ok(body)
}

/// Adds the rest of the [`ContainerSettings`] but logging (see [`create_body`]).
fn with_settings(
    mut b: ContainerCreateOptsBuilder,
    s: &ContainerSettings,
) -> ContainerCreateOptsBuilder {
    if let Some(u) = &s.user {
        b = b.user(u);
    }
    if let Some(w) = &s.working_dir {
        // Created when the image lacks it, as Docker does.
        b = b.work_dir(w).create_working_dir(true);
    }
    if let Some(h) = &s.hostname {
        b = b.hostname(h);
    }
    if !s.extra_hosts.is_empty() {
        b = b.hosts_add(s.extra_hosts.iter().map(|(h, ip)| format!("{h}:{ip}")));
    }
    if !s.cap_add.is_empty() {
        b = b.add_capabilities(&s.cap_add);
    }
    if !s.cap_drop.is_empty() {
        b = b.drop_capabilities(&s.cap_drop);
    }
    if s.read_only_rootfs {
        // Unlike `podman run --read-only`, the API adds no tmpfs on /tmp, /var/tmp
        // and /run (read_write_tmpfs stays false): the same as Docker.
        b = b.read_only_fs(true);
    }
    if !s.ulimits.is_empty() {
        // Once any is given, libpod drops containers.conf's `default_ulimits` and sets
        // nofile and nproc, unless given, to 1048576 (see `start` for the hint).
        b = b.r_limits(s.ulimits.iter().map(|(name, &(soft, hard))| PosixRlimit {
            type_: Some(name.clone()),
            soft: Some(soft),
            hard: Some(hard),
        }));
    }
    if !s.sysctls.is_empty() {
        b = b.sysctl(s.sysctls.iter());
    }
    if let Some(sig) = &s.stop_signal {
        b = b.stop_signal(i64::from(sig.number));
    }
    if !s.dns_servers.is_empty() {
        b = b.dns_server(s.dns_servers.iter().map(ToString::to_string));
    }
    if !s.dns_search.is_empty() {
        b = b.dns_search(&s.dns_search);
    }
    if !s.dns_options.is_empty() {
        b = b.dns_option(&s.dns_options);
    }
    if !s.devices.is_empty() {
        // libpod reads only `path`, in the CLI's `host:container:permissions` form.
        b = b.devices(s.devices.iter().map(|d| LinuxDevice {
            path: Some(format!("{}:{}:{}", d.host, d.container, d.permissions)),
            file_mode: None,
            gid: None,
            major: None,
            minor: None,
            type_: None,
            uid: None,
        }));
    }
    b
}

/// libpod's `log_configuration`. Podman spells Docker's json-file `k8s-file` (its own
/// format) and keeps a single file, truncated at `size`: `max_file` has no equivalent.
fn log_configuration(l: &LogSpec) -> serde_json::Value {
    let driver = match l.driver {
        LogDriver::JsonFile | LogDriver::K8sFile => "k8s-file",
        LogDriver::Journald => "journald",
        LogDriver::None => "none",
    };
    let mut v = serde_json::json!({ "driver": driver });
    if let Some(size) = l.max_size.filter(|_| driver == "k8s-file") {
        v["size"] = serde_json::json!(size);
    }
    v
}

pub(super) fn run_state(status: &str) -> RunState {
    match status {
        "created" | "configured" | "initialized" => RunState::Created,
        "running" => RunState::Running,
        "paused" => RunState::Paused,
        "restarting" => RunState::Restarting,
        "exited" | "stopped" => RunState::Exited,
        _ => RunState::Other,
    }
}

pub(super) fn health(status: &str) -> Option<Health> {
    match status {
        "starting" => Some(Health::Starting),
        "healthy" => Some(Health::Healthy),
        "unhealthy" => Some(Health::Unhealthy),
        _ => None,
    }
}

/// Podman reports bare hex image ids; the runtime contract (and Docker) uses `sha256:…`.
pub(super) fn image_id(id: &str) -> String {
    if id.is_empty() || id.contains(':') {
        id.to_string()
    } else {
        format!("sha256:{id}")
    }
}

/// Builds the driver's view from an inspect response.
pub(super) fn runtime_container(c: InspectContainerData) -> RuntimeContainer {
    let config = c.config;
    let host = c.host_config;
    let state = c.state;
    let status = state
        .as_ref()
        .and_then(|s| s.status.clone())
        .unwrap_or_default();
    let run = run_state(&status);

    let net = c.network_settings;
    let mut networks: Vec<_> = net
        .as_ref()
        .and_then(|n| n.networks.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    networks.sort_by(|a, b| a.0.cmp(&b.0));
    let mut addresses: Vec<IpAddr> = Vec::new();
    for (_, n) in &networks {
        for a in [&n.ip_address, &n.global_i_pv_6_address]
            .into_iter()
            .flatten()
            .chain(
                [&n.secondary_ip_addresses, &n.secondary_i_pv_6_addresses]
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|a| a.addr.as_ref()),
            )
        {
            if let Ok(ip) = a.parse::<IpAddr>() {
                if !addresses.contains(&ip) {
                    addresses.push(ip);
                }
            }
        }
    }

    // Published ports as configured (HostConfig), so a stopped container reports the
    // same ports as a running one; NetworkSettings only when HostConfig has none.
    let bindings = host
        .as_ref()
        .and_then(|h| h.port_bindings.clone())
        .filter(|b| !b.is_empty())
        .or_else(|| net.as_ref().and_then(|n| n.ports.clone()))
        .unwrap_or_default();
    let ports = port_bindings(bindings, |b| (b.host_ip.as_deref(), b.host_port.as_deref()));

    let mut mounts: Vec<Mount> = c
        .mounts
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| {
            let source = match m.type_.as_deref() {
                Some("volume") => m.name?,
                _ => m.source?,
            };
            Some(Mount {
                source,
                target: m.destination?,
                read_only: !m.rw.unwrap_or(true),
            })
        })
        .collect();
    mounts.sort();

    let labels: BTreeMap<String, String> = config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    let image = config
        .as_ref()
        .and_then(|c| c.annotations.as_ref()?.get(IMAGE_ANNOTATION).cloned())
        .or(c.image_name)
        .or_else(|| config.as_ref().and_then(|c| c.image.clone()))
        .unwrap_or_default();

    RuntimeContainer {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        labels,
        image,
        image_id: image_id(c.image.as_deref().unwrap_or_default()),
        state: run,
        // Only meaningful once the container is down.
        exit_code: match run {
            RunState::Exited => state.as_ref().and_then(|s| s.exit_code).map(i64::from),
            _ => None,
        },
        health: state
            .as_ref()
            .and_then(|s| s.health.as_ref())
            .and_then(|h| h.status.as_deref())
            .and_then(health),
        addresses,
        ports,
        mounts,
        memory: host
            .as_ref()
            .and_then(|h| h.memory)
            .filter(|m| *m > 0)
            .map(|m| m as u64),
        pids_limit: host
            .as_ref()
            .and_then(|h| h.pids_limit)
            .filter(|p| *p > 0)
            .and_then(|p| u32::try_from(p).ok()),
    }
}

/// `02:42:` and the address's last four bytes (Docker's scheme for IPv4; a fixed
/// address in a subnet differs from its neighbours in those bytes).
fn static_mac(ip: std::net::IpAddr) -> String {
    let o = match ip {
        std::net::IpAddr::V4(v4) => v4.octets(),
        std::net::IpAddr::V6(v6) => {
            let b = v6.octets();
            [b[12], b[13], b[14], b[15]]
        }
    };
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}
