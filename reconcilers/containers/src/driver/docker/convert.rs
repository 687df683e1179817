//! Conversion between converge's container types and the Engine API's: the create body
//! from a [`CreateSpec`], and a [`RuntimeContainer`] from an inspect response.

use super::*;

/// Nanoseconds, as the Engine API spells health-check durations.
fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Translates a [`CreateSpec`] into the Engine API's create body.
pub(super) fn container_config(spec: &CreateSpec) -> Result<ContainerConfig<String>, DriverError> {
    let bad = |what: String| failed("create", &spec.name, what);

    let mut exposed: HashMap<String, HashMap<(), ()>> = HashMap::new();
    let mut bindings: HashMap<String, Option<Vec<DockerPortBinding>>> = HashMap::new();
    for p in &spec.ports {
        let key = format!("{}/{}", p.container_port, p.protocol.as_str());
        exposed.insert(key.clone(), HashMap::new());
        if let Some(host_port) = p.host_port {
            let binding = DockerPortBinding {
                // Empty means all host addresses.
                host_ip: Some(p.host_ip.clone().unwrap_or_default()),
                host_port: Some(host_port.to_string()),
            };
            bindings
                .entry(key)
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(binding);
        }
    }

    // Mounts (not Binds) so a missing bind source is an error instead of an empty
    // directory docker would create; named volumes are created on demand.
    let mounts = spec
        .volumes
        .iter()
        .map(|v| bollard::models::Mount {
            target: Some(v.target.clone()),
            source: Some(v.source.clone()),
            typ: Some(if v.is_bind() {
                MountTypeEnum::BIND
            } else {
                MountTypeEnum::VOLUME
            }),
            read_only: Some(v.read_only),
            ..Default::default()
        })
        .collect::<Vec<_>>();

    let nano_cpus = match spec.cpus {
        Some(c) if c.is_finite() && c > 0.0 => Some((c * 1e9).round() as i64),
        Some(c) => return Err(bad(format!("invalid cpu limit {c}"))),
        None => None,
    };
    let memory = spec
        .memory
        .map(i64::try_from)
        .transpose()
        .map_err(|_| bad("memory limit too large".into()))?;

    let host_config = HostConfig {
        port_bindings: (!bindings.is_empty()).then_some(bindings),
        mounts: (!mounts.is_empty()).then_some(mounts),
        nano_cpus,
        memory,
        pids_limit: spec.pids.map(i64::from),
        // converge restarts containers itself (with crash-loop back-off).
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        network_mode: spec.network.clone(),
        ..Default::default()
    };
    let host_config = with_settings(host_config, &spec.settings).map_err(bad)?;

    let networking_config = match (&spec.network, spec.ip) {
        (Some(network), ip) => {
            let ipam_config = ip.map(|ip| match ip {
                IpAddr::V4(v4) => EndpointIpamConfig {
                    ipv4_address: Some(v4.to_string()),
                    ..Default::default()
                },
                IpAddr::V6(v6) => EndpointIpamConfig {
                    ipv6_address: Some(v6.to_string()),
                    ..Default::default()
                },
            });
            Some(bollard::container::NetworkingConfig {
                endpoints_config: HashMap::from([(
                    network.clone(),
                    EndpointSettings {
                        ipam_config,
                        ..Default::default()
                    },
                )]),
            })
        }
        (None, Some(_)) => {
            return Err(bad(
                "a static ip needs a network (docker's default bridge has no static ips)".into(),
            ))
        }
        (None, None) => None,
    };

    let healthcheck = spec.health.as_ref().map(|h| HealthConfig {
        test: Some(
            std::iter::once("CMD".to_string())
                .chain(h.command.iter().cloned())
                .collect(),
        ),
        interval: Some(nanos(h.interval)),
        timeout: Some(nanos(h.timeout)),
        start_period: Some(nanos(h.start_period)),
        retries: Some(i64::from(h.retries)),
        start_interval: None,
    });

    Ok(ContainerConfig {
        image: Some(spec.image.clone()),
        entrypoint: spec.command.clone(),
        cmd: spec.args.clone(),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(
            spec.labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        healthcheck,
        stop_timeout: Some(ceil_secs(spec.stop_grace)),
        host_config: Some(host_config),
        networking_config,
        user: spec.settings.user.clone(),
        working_dir: spec.settings.working_dir.clone(),
        hostname: spec.settings.hostname.clone(),
        stop_signal: spec.settings.stop_signal.as_ref().map(|s| s.name.clone()),
        ..Default::default()
    })
}

/// Adds the host-side [`ContainerSettings`] to a host config; an error says what
/// Docker cannot do.
fn with_settings(mut h: HostConfig, s: &ContainerSettings) -> Result<HostConfig, String> {
    let some = |v: Vec<String>| (!v.is_empty()).then_some(v);
    h.extra_hosts = some(
        s.extra_hosts
            .iter()
            .map(|(host, ip)| format!("{host}:{ip}"))
            .collect(),
    );
    h.cap_add = some(s.cap_add.clone());
    h.cap_drop = some(s.cap_drop.clone());
    h.readonly_rootfs = s.read_only_rootfs.then_some(true);
    h.tmpfs = (!s.tmpfs.is_empty()).then(|| {
        s.tmpfs
            .iter()
            .map(|t| (t.target.clone(), t.options().join(",")))
            .collect()
    });
    if !s.ulimits.is_empty() {
        let mut limits = Vec::new();
        for (name, &(soft, hard)) in &s.ulimits {
            let int = |v: u64| i64::try_from(v).map_err(|_| format!("ulimit {name} {v} too large"));
            limits.push(ResourcesUlimits {
                name: Some(name.clone()),
                soft: Some(int(soft)?),
                hard: Some(int(hard)?),
            });
        }
        h.ulimits = Some(limits);
    }
    h.sysctls = (!s.sysctls.is_empty()).then(|| s.sysctls.clone().into_iter().collect());
    h.dns = some(s.dns_servers.iter().map(ToString::to_string).collect());
    h.dns_search = some(s.dns_search.clone());
    h.dns_options = some(s.dns_options.clone());
    if let Some(l) = &s.logging {
        let mut config = HashMap::new();
        match l.driver {
            LogDriver::K8sFile => {
                return Err("docker has no k8s-file log driver (use json-file)".into())
            }
            LogDriver::JsonFile => {
                if let Some(size) = l.max_size {
                    config.insert("max-size".to_string(), size.to_string());
                }
                if let Some(n) = l.max_file {
                    config.insert("max-file".to_string(), n.to_string());
                }
            }
            LogDriver::Journald | LogDriver::None => {}
        }
        h.log_config = Some(HostConfigLogConfig {
            typ: Some(l.driver.as_str().to_string()),
            config: Some(config),
        });
    }
    h.devices = (!s.devices.is_empty()).then(|| {
        s.devices
            .iter()
            .map(|d| DeviceMapping {
                path_on_host: Some(d.host.clone()),
                path_in_container: Some(d.container.clone()),
                cgroup_permissions: Some(d.permissions.clone()),
            })
            .collect()
    });
    Ok(h)
}

fn run_state(s: Option<&ContainerStateStatusEnum>) -> RunState {
    match s {
        Some(ContainerStateStatusEnum::CREATED) => RunState::Created,
        Some(ContainerStateStatusEnum::RUNNING) => RunState::Running,
        Some(ContainerStateStatusEnum::PAUSED) => RunState::Paused,
        Some(ContainerStateStatusEnum::RESTARTING) => RunState::Restarting,
        Some(ContainerStateStatusEnum::EXITED) => RunState::Exited,
        _ => RunState::Other,
    }
}

fn health(s: Option<&HealthStatusEnum>) -> Option<Health> {
    match s? {
        HealthStatusEnum::STARTING => Some(Health::Starting),
        HealthStatusEnum::HEALTHY => Some(Health::Healthy),
        HealthStatusEnum::UNHEALTHY => Some(Health::Unhealthy),
        HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
    }
}

/// Builds the driver's view from an inspect response.
pub(super) fn runtime_container(c: ContainerInspectResponse) -> RuntimeContainer {
    let config = c.config.unwrap_or_default();
    let host = c.host_config.unwrap_or_default();
    let state = c.state.unwrap_or_default();
    let run = run_state(state.status.as_ref());

    let mut networks: Vec<(String, EndpointSettings)> = c
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .collect();
    networks.sort_by(|a, b| a.0.cmp(&b.0));
    let addresses = networks
        .iter()
        .flat_map(|(_, ep)| [&ep.ip_address, &ep.global_ipv6_address])
        .filter_map(|a| a.as_deref()?.parse::<IpAddr>().ok())
        .collect();

    // Published ports as configured (HostConfig), so a stopped container reports the
    // same ports as a running one.
    let ports = port_bindings(host.port_bindings.unwrap_or_default(), |b| {
        (b.host_ip.as_deref(), b.host_port.as_deref())
    });

    let mut mounts: Vec<Mount> = c
        .mounts
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| {
            let source = match m.typ {
                Some(MountPointTypeEnum::VOLUME) => m.name?,
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

    RuntimeContainer {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        image: config.image.unwrap_or_default(),
        image_id: c.image.unwrap_or_default(),
        state: run,
        // Docker keeps the last exit code around while running; only report it once
        // the container is down.
        exit_code: match state.status {
            Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD) => {
                state.exit_code
            }
            _ => None,
        },
        health: health(state.health.as_ref().and_then(|h| h.status.as_ref())),
        addresses,
        ports,
        mounts,
        memory: host.memory.filter(|m| *m > 0).map(|m| m as u64),
        pids_limit: host
            .pids_limit
            .filter(|p| *p > 0)
            .and_then(|p| u32::try_from(p).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::sample_create_spec as spec;

    #[test]
    fn create_body_maps_every_field() {
        let c = container_config(&spec()).unwrap();
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["Entrypoint"], serde_json::json!(["httpd"]));
        assert_eq!(v["Cmd"], serde_json::json!(["-f"]));
        assert_eq!(v["Env"], serde_json::json!(["A=1"]));
        assert_eq!(v["StopTimeout"], 2);
        assert!(v["ExposedPorts"].get("53/udp").is_some());
        let hc = &v["HostConfig"];
        assert_eq!(hc["NanoCpus"], 500_000_000);
        assert_eq!(hc["Memory"], 64 << 20);
        assert_eq!(hc["PidsLimit"], 100);
        assert_eq!(hc["RestartPolicy"]["Name"], "no");
        assert_eq!(
            hc["PortBindings"]["8080/tcp"],
            serde_json::json!([
                {"HostIp": "", "HostPort": "18080"},
                {"HostIp": "127.0.0.1", "HostPort": "18081"}
            ])
        );
        assert!(hc["PortBindings"].get("53/udp").is_none());
        assert_eq!(hc["Mounts"][0]["Type"], "volume");
        assert_eq!(hc["Mounts"][1]["Type"], "bind");
        assert_eq!(hc["Mounts"][1]["ReadOnly"], true);
        assert_eq!(v["Healthcheck"]["Test"], serde_json::json!(["CMD", "true"]));
        assert_eq!(v["Healthcheck"]["Interval"], 500_000_000);
        assert!(v.get("NetworkingConfig").is_none());
        // The rest of the surface.
        assert_eq!(v["User"], "1000:100");
        assert_eq!(v["WorkingDir"], "/srv");
        assert_eq!(v["Hostname"], "web-1");
        assert_eq!(v["StopSignal"], "SIGQUIT");
        assert_eq!(
            hc["ExtraHosts"],
            serde_json::json!(["db.internal:10.0.0.5", "v6.internal:fd00::5"])
        );
        assert_eq!(hc["CapAdd"], serde_json::json!(["CAP_NET_ADMIN"]));
        assert_eq!(hc["CapDrop"], serde_json::json!(["CAP_MKNOD"]));
        assert_eq!(hc["ReadonlyRootfs"], true);
        assert_eq!(
            hc["Tmpfs"]["/run"],
            "rw,noexec,nosuid,nodev,size=67108864,mode=1777"
        );
        assert_eq!(
            hc["Ulimits"],
            serde_json::json!([{"Name": "nofile", "Soft": 512, "Hard": 1024}])
        );
        assert_eq!(hc["Sysctls"]["net.ipv4.ip_unprivileged_port_start"], "80");
        assert_eq!(
            hc["LogConfig"],
            serde_json::json!({"Type": "json-file",
                "Config": {"max-size": "10485760", "max-file": "3"}})
        );
        assert_eq!(
            hc["Devices"],
            serde_json::json!([{"PathOnHost": "/dev/zero", "PathInContainer": "/dev/zero2",
                "CgroupPermissions": "r"}])
        );
        assert_eq!(hc["Dns"], serde_json::json!(["10.89.7.1", "fd00:7::1"]));
        assert_eq!(hc["DnsSearch"], serde_json::json!(["internal"]));
        assert_eq!(hc["DnsOptions"], serde_json::json!(["ndots:2"]));
    }

    #[test]
    fn unset_settings_leave_the_runtime_defaults() {
        let mut s = spec();
        s.settings = Default::default();
        let v = serde_json::to_value(container_config(&s).unwrap()).unwrap();
        for key in ["User", "WorkingDir", "Hostname", "StopSignal"] {
            assert!(v.get(key).is_none(), "{key}");
        }
        let hc = &v["HostConfig"];
        for key in [
            "ExtraHosts",
            "CapAdd",
            "CapDrop",
            "ReadonlyRootfs",
            "Tmpfs",
            "Ulimits",
            "Sysctls",
            "LogConfig",
            "Devices",
            "Dns",
            "DnsSearch",
            "DnsOptions",
        ] {
            assert!(hc.get(key).is_none(), "{key}");
        }
    }

    #[test]
    fn log_drivers() {
        use crate::driver::LogSpec;
        use crate::spec::LogDriver;
        let mut s = spec();
        let log = |driver| LogSpec {
            driver,
            max_size: None,
            max_file: None,
        };
        s.settings.logging = Some(log(LogDriver::Journald));
        let v = serde_json::to_value(container_config(&s).unwrap()).unwrap();
        assert_eq!(
            v["HostConfig"]["LogConfig"],
            serde_json::json!({"Type": "journald", "Config": {}})
        );
        s.settings.logging = Some(log(LogDriver::None));
        let v = serde_json::to_value(container_config(&s).unwrap()).unwrap();
        assert_eq!(v["HostConfig"]["LogConfig"]["Type"], "none");
        // Docker has no k8s-file: refused with a message naming the alternative.
        s.settings.logging = Some(log(LogDriver::K8sFile));
        let e = container_config(&s).unwrap_err().to_string();
        assert!(e.contains("k8s-file") && e.contains("json-file"), "{e}");
    }

    #[test]
    fn static_ip_goes_to_the_endpoint() {
        let mut s = spec();
        s.network = Some("net1".into());
        s.ip = Some("10.5.0.7".parse().unwrap());
        let v = serde_json::to_value(container_config(&s).unwrap()).unwrap();
        assert_eq!(v["HostConfig"]["NetworkMode"], "net1");
        assert_eq!(
            v["NetworkingConfig"]["EndpointsConfig"]["net1"]["IPAMConfig"]["IPv4Address"],
            "10.5.0.7"
        );
        s.network = None;
        assert!(container_config(&s).is_err());
    }
}
