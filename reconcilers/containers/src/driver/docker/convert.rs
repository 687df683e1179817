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
        ..Default::default()
    })
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
